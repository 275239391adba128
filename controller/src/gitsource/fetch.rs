//! Fetching a GitSource's repository with git2 into a bare repository of its
//! own under the data directory, and reading the manifest files of the
//! revision to apply.

use std::path::{Path, PathBuf};

use caravan_api::v1alpha1::GitSourceSpec;

use crate::error::Error;

/// Manifest files of a revision: path relative to the repository root, contents.
pub type Files = Vec<(String, Vec<u8>)>;

/// Which repositories a GitSource may name: `https://` and `ssh://` URLs and
/// `[user@]host:path`; a local repository (`file://` or an absolute path)
/// only beneath a directory the controller allows (`--allow-local-git-under`),
/// so a GitSource cannot read the controller's own files (another source's
/// checkout, say). Anything else (plain `http://`, `ext::` commands) is
/// refused. Returns what is wrong.
pub fn check_url(url: &str, local_roots: &[PathBuf]) -> Result<(), String> {
    let shown = redact(url);
    let local = url
        .strip_prefix("file://")
        .or(url.starts_with('/').then_some(url));
    if let Some(path) = local {
        let real =
            std::fs::canonicalize(path).map_err(|e| format!("local repository {shown}: {e}"))?;
        let allowed = local_roots
            .iter()
            .filter_map(|root| std::fs::canonicalize(root).ok())
            .any(|root| real.starts_with(root));
        return if allowed {
            Ok(())
        } else {
            Err(format!(
                "local repository {shown} is not beneath a directory the controller allows (--allow-local-git-under)"
            ))
        };
    }
    if url.starts_with("https://") || url.starts_with("ssh://") {
        return Ok(());
    }
    // scp-like: `[user@]host:path` (no scheme).
    let scp_like = !url.contains("://")
        && url.split_once(':').is_some_and(|(authority, path)| {
            let host = authority.rsplit('@').next().unwrap_or_default();
            !path.is_empty()
                && !path.starts_with(':')
                && !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        });
    if scp_like {
        return Ok(());
    }
    Err(format!(
        "repository URL {shown} is not allowed: use https://, ssh:// or user@host:path"
    ))
}

/// Fetches the source and returns the commit id and every `*.yaml`/`*.yml` file
/// under its path (paths relative to the repository root).
pub fn fetch(dir: &Path, spec: &GitSourceSpec) -> Result<(String, Files), Error> {
    let repo = match git2::Repository::open_bare(dir) {
        Ok(r) => r,
        Err(_) => {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            git2::Repository::init_bare(dir)?
        }
    };
    let local_ref = format!("refs/caravan/{}", spec.branch);
    let refspec = format!("+refs/heads/{}:{local_ref}", spec.branch);
    let mut remote = repo.remote_anonymous(&spec.url)?;
    remote
        .fetch(&[&refspec], None, None)
        .map_err(|source| Error::GitFetch {
            url: spec.url.clone(),
            source,
        })?;
    let commit = match &spec.commit {
        Some(c) => repo.revparse_single(c)?.peel_to_commit()?,
        None => repo.find_reference(&local_ref)?.peel_to_commit()?,
    };
    let root = commit.tree()?;
    let path = spec.path.trim_matches('/');
    let (tree, prefix) = if path.is_empty() || path == "." {
        (root, String::new())
    } else {
        let entry = root.get_path(Path::new(path))?;
        (entry.to_object(&repo)?.peel_to_tree()?, format!("{path}/"))
    };
    let mut files = Vec::new();
    let mut failure = None;
    tree.walk(git2::TreeWalkMode::PreOrder, |dir, entry| {
        let name = entry.name().unwrap_or_default();
        if entry.kind() == Some(git2::ObjectType::Blob)
            && (name.ends_with(".yaml") || name.ends_with(".yml"))
        {
            match entry.to_object(&repo).and_then(|o| o.peel_to_blob()) {
                Ok(blob) => files.push((format!("{prefix}{dir}{name}"), blob.content().to_vec())),
                Err(e) => {
                    failure = Some(e);
                    return git2::TreeWalkResult::Abort;
                }
            }
        }
        git2::TreeWalkResult::Ok
    })?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    files.sort();
    Ok((commit.id().to_string(), files))
}

/// The URL without any credentials in it, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_urls_never_reach_messages() {
        assert_eq!(
            redact("https://bot:s3cret@git.example.com/fleet.git"),
            "https://***@git.example.com/fleet.git"
        );
        assert_eq!(
            redact("https://git.example.com/a@b.git"),
            "https://git.example.com/a@b.git"
        );
        assert_eq!(redact("/srv/git/fleet.git"), "/srv/git/fleet.git");
    }

    #[test]
    fn only_remote_urls_and_allowed_local_repositories_are_fetched() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("git");
        let secret = dir.path().join("controller");
        std::fs::create_dir_all(allowed.join("fleet.git")).unwrap();
        std::fs::create_dir_all(&secret).unwrap();
        let roots = [allowed.clone()];
        for ok in [
            "https://git.example.com/fleet.git",
            "ssh://git@git.example.com/fleet.git",
            "git@github.com:acme/fleet.git",
        ] {
            assert_eq!(check_url(ok, &roots), Ok(()), "{ok}");
        }
        let inside = format!("file://{}", allowed.join("fleet.git").display());
        assert_eq!(check_url(&inside, &roots), Ok(()));
        let sneaky = format!("file://{}/../controller", allowed.display());
        let e = check_url(&sneaky, &roots).unwrap_err();
        assert!(e.contains("--allow-local-git-under"), "{e}");
        let e = check_url(&secret.display().to_string(), &roots).unwrap_err();
        assert!(e.contains("not beneath"), "{e}");
        assert!(
            check_url(&inside, &[]).is_err(),
            "no local repository unless allowed"
        );
        for bad in [
            "http://git.example.com/fleet.git",
            "ext::sh -c touch% /tmp/pwned",
            "fleet.git",
            "",
        ] {
            assert!(check_url(bad, &roots).is_err(), "{bad:?}");
        }
        let e = check_url("http://bot:s3cret@git.example.com/x", &roots).unwrap_err();
        assert!(!e.contains("s3cret"), "{e}");
    }
}
