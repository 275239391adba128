//! Fetching a GitSource's repository with git2 into a bare repository of its
//! own under the data directory, and reading the manifest files of the
//! revision to apply.

use std::path::Path;

use caravan_api::v1alpha1::GitSourceSpec;

use crate::error::Error;

/// Manifest files of a revision: path relative to the repository root, contents.
pub type Files = Vec<(String, Vec<u8>)>;

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
}
