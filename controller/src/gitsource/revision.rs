//! Which commit a GitSource's `ref` names — a branch, a tag, the highest
//! tag in a semver range, or one commit on a branch — how it is fetched
//! (the refspec into `refs/caravan/…`), and the manifest files it holds.

use std::path::Path;

use caravan_api::{conditions::reasons, v1alpha1::GitRef};

use crate::error::ErrorClass;

/// Manifest files of a revision: path relative to the repository root, contents.
pub type Files = Vec<(String, Vec<u8>)>;

/// Why a fetch found nothing to apply.
#[derive(Debug)]
pub struct Refused {
    pub reason: &'static str,
    pub message: String,
    /// Whether trying again soon may help (a network error), or only a
    /// change in Git or in the Secret can.
    pub class: ErrorClass,
}

impl Refused {
    pub(super) fn stalled(reason: &'static str, message: String) -> Self {
        Self {
            reason,
            message,
            class: ErrorClass::Stalled,
        }
    }
}

/// The revision a GitSource's ref names, and how it is fetched.
pub(super) enum Wanted<'a> {
    Branch(&'a str),
    Tag(&'a str),
    Semver(semver::VersionReq, &'a str),
    Commit(git2::Oid, &'a str),
}

const LOCAL: &str = "refs/caravan";

impl<'a> Wanted<'a> {
    pub(super) fn of(r: &'a GitRef) -> Result<Self, Refused> {
        let invalid = |what: String| Refused::stalled(reasons::INVALID_REF, what);
        let name_ok = |prefix: &str, name: &str| {
            !name.contains(['*', ':']) && git2::Reference::is_valid_name(&format!("{prefix}{name}"))
        };
        if !name_ok("refs/heads/", &r.branch) {
            return Err(invalid(format!(
                "ref.branch {:?} is not a branch name",
                r.branch
            )));
        }
        if let Some(commit) = &r.commit {
            let id = (commit.len() == 40)
                .then(|| git2::Oid::from_str(commit).ok())
                .flatten()
                .ok_or_else(|| {
                    invalid(format!(
                        "ref.commit {commit:?} is not a full commit id (40 hex digits)"
                    ))
                })?;
            return Ok(Self::Commit(id, &r.branch));
        }
        if let Some(range) = &r.semver {
            let req = semver::VersionReq::parse(range)
                .map_err(|e| invalid(format!("ref.semver {range:?} is not a semver range: {e}")))?;
            return Ok(Self::Semver(req, range));
        }
        if let Some(tag) = &r.tag {
            if !name_ok("refs/tags/", tag) {
                return Err(invalid(format!("ref.tag {tag:?} is not a tag name")));
            }
            return Ok(Self::Tag(tag));
        }
        Ok(Self::Branch(&r.branch))
    }

    pub(super) fn refspec(&self) -> String {
        match self {
            Self::Branch(b) | Self::Commit(_, b) => format!("+refs/heads/{b}:{LOCAL}/heads/{b}"),
            Self::Tag(t) => format!("+refs/tags/{t}:{LOCAL}/tags/{t}"),
            Self::Semver(..) => format!("+refs/tags/*:{LOCAL}/tags/*"),
        }
    }

    pub(super) fn describe(&self) -> String {
        match self {
            Self::Branch(b) => format!("branch {b}"),
            Self::Tag(t) => format!("tag {t}"),
            Self::Semver(_, range) => format!("semver {range}"),
            Self::Commit(id, b) => format!("commit {} on branch {b}", &id.to_string()[..12]),
        }
    }

    /// The commit to apply, and where it was found.
    pub(super) fn resolve<'r>(
        &self,
        repo: &'r git2::Repository,
    ) -> Result<(git2::Commit<'r>, String), Refused> {
        let not_found = |why: String| Refused::stalled(reasons::REVISION_NOT_FOUND, why);
        let peel = |name: &str| {
            repo.find_reference(name)
                .and_then(|r| r.peel_to_commit())
                .map_err(|_| not_found(format!("{} not found in the repository", self.describe())))
        };
        match self {
            Self::Branch(b) => Ok((peel(&format!("{LOCAL}/heads/{b}"))?, self.describe())),
            Self::Tag(t) => Ok((peel(&format!("{LOCAL}/tags/{t}"))?, self.describe())),
            Self::Commit(id, b) => {
                let tip = peel(&format!("{LOCAL}/heads/{b}"))?;
                let on_branch =
                    tip.id() == *id || repo.graph_descendant_of(tip.id(), *id).unwrap_or(false);
                if !on_branch {
                    return Err(not_found(format!(
                        "{} is not on branch {b}",
                        self.describe()
                    )));
                }
                let commit = repo
                    .find_commit(*id)
                    .map_err(|e| not_found(format!("{}: {}", self.describe(), e.message())))?;
                Ok((commit, self.describe()))
            }
            Self::Semver(req, range) => {
                let tags = repo
                    .references_glob(&format!("{LOCAL}/tags/*"))
                    .map_err(|e| not_found(e.message().to_string()))?;
                let best = tags
                    .filter_map(Result::ok)
                    .filter_map(|r| {
                        let tag = r
                            .name()
                            .ok()?
                            .strip_prefix(&format!("{LOCAL}/tags/"))?
                            .to_string();
                        let v =
                            semver::Version::parse(tag.strip_prefix('v').unwrap_or(&tag)).ok()?;
                        req.matches(&v).then_some((v, tag))
                    })
                    .max();
                let Some((_, tag)) = best else {
                    return Err(not_found(format!("no tag matches semver {range}")));
                };
                Ok((
                    peel(&format!("{LOCAL}/tags/{tag}"))?,
                    format!("tag {tag} (semver {range})"),
                ))
            }
        }
    }
}

/// Every manifest file under `path` in `commit`.
pub(super) fn read_files(
    repo: &git2::Repository,
    commit: &git2::Commit,
    path: &str,
) -> Result<Files, git2::Error> {
    let root = commit.tree()?;
    let path = path.trim_matches('/');
    let (tree, prefix) = if path.is_empty() || path == "." {
        (root, String::new())
    } else {
        let entry = root.get_path(Path::new(path))?;
        (entry.to_object(repo)?.peel_to_tree()?, format!("{path}/"))
    };
    let mut files = Vec::new();
    let mut failure = None;
    tree.walk(git2::TreeWalkMode::PreOrder, |dir, entry| {
        let name = entry.name().unwrap_or_default();
        if entry.kind() == Some(git2::ObjectType::Blob)
            && (name.ends_with(".yaml") || name.ends_with(".yml"))
        {
            match entry.to_object(repo).and_then(|o| o.peel_to_blob()) {
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
        return Err(e);
    }
    files.sort();
    Ok(files)
}
