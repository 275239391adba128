//! The documentation a user reads points only at what the repository holds:
//! every relative link and every path in a code span of its Markdown files
//! names a file or directory inside the repository, and every test
//! THREAT_MODEL.md names as the proof of a defence exists.

use std::path::{Component, Path, PathBuf};

use caravan_tests::repo_root;

/// Markdown files of the repository (not under `target/` or hidden directories).
fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if path.is_dir() {
            markdown_files(&path, out);
        } else if name.ends_with(".md") {
            out.push(path);
        }
    }
}

/// Relative paths a Markdown text refers to: link targets, and code spans
/// that look like a relative path to a file.
fn references(text: &str) -> Vec<String> {
    let mut refs = Vec::new();
    for (i, _) in text.match_indices("](") {
        let rest = &text[i + 2..];
        if let Some(end) = rest.find(')') {
            refs.push(rest[..end].to_string());
        }
    }
    for (n, span) in text.split('`').enumerate() {
        let path_like = span.starts_with("../") || span.starts_with("./");
        if n % 2 == 1 && path_like && !span.contains(' ') {
            refs.push(span.to_string());
        }
    }
    refs.into_iter()
        .map(|r| r.split('#').next().unwrap_or_default().to_string())
        .filter(|r| !r.is_empty() && !r.contains("://") && !r.starts_with("mailto:"))
        .collect()
}

/// `path` with `.` and `..` resolved lexically, or `None` if it climbs above its start.
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Some(out)
}

#[test]
fn the_docs_refer_only_to_files_in_the_repository() {
    let root = repo_root();
    let mut files = Vec::new();
    markdown_files(&root, &mut files);
    assert!(files.iter().any(|f| f.ends_with("README.md")));
    assert!(files.iter().any(|f| f.ends_with("ARCHITECTURE.md")));
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let dir = file.parent().unwrap().strip_prefix(&root).unwrap();
        for r in references(&text) {
            let target = normalize(&dir.join(&r));
            let inside = target.as_ref().is_some_and(|t| root.join(t).exists());
            if !inside {
                problems.push(format!(
                    "{}: {r}",
                    file.strip_prefix(&root).unwrap().display()
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "references outside the repository or to nothing: {problems:#?}"
    );
}

#[test]
fn references_outside_the_repository_are_caught() {
    let text =
        "See `../shared/DESIGN.md`, [the code](controller/src/lib.rs#L1), [web](https://x.io).";
    assert_eq!(
        references(text),
        ["controller/src/lib.rs", "../shared/DESIGN.md"]
    );
    assert_eq!(normalize(Path::new("../shared/DESIGN.md")), None);
    assert_eq!(normalize(Path::new("a/../b")), Some(PathBuf::from("b")));
}

/// Every `.rs` file of the repository, as text.
fn sources(dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if path.is_dir() {
            sources(&path, out);
        } else if name.ends_with(".rs") {
            out.push(std::fs::read_to_string(&path).unwrap());
        }
    }
}

#[test]
fn every_test_the_threat_model_names_exists() {
    let root = repo_root();
    let text = std::fs::read_to_string(root.join("THREAT_MODEL.md")).unwrap();
    let mut code = Vec::new();
    sources(&root, &mut code);
    let mut named = 0;
    let mut missing = Vec::new();
    for (n, span) in text.split('`').enumerate() {
        let Some(test) = span
            .rsplit("::")
            .next()
            .filter(|_| n % 2 == 1 && span.contains("::"))
        else {
            continue;
        };
        if test.is_empty()
            || test == "tests"
            || !test
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            continue;
        }
        named += 1;
        let decl = format!("fn {test}(");
        if !code.iter().any(|c| c.contains(&decl)) {
            missing.push(span.to_string());
        }
    }
    assert!(named >= 10, "THREAT_MODEL.md names only {named} tests");
    assert!(
        missing.is_empty(),
        "THREAT_MODEL.md names tests that do not exist: {missing:#?}"
    );
}
