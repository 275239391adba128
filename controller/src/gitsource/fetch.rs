//! Fetching a GitSource's repository with git2 into a bare repository of its
//! own under the data directory, and reading the manifest files of the
//! revision to apply. Credentials go only to the host of `url`; SSH hosts
//! must be in `known_hosts`, HTTPS hosts must have a certificate from the
//! system's roots or the Secret's `ca.crt`; a fetch is bounded in time and
//! bytes, and shallow where the transport allows.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use caravan_api::{conditions::reasons, v1alpha1::GitSourceSpec};

use super::{
    access::{self, Access, Remote},
    revision::{read_files, Files, Refused, Wanted},
    signature,
};
use crate::error::{Error, ErrorClass};

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

/// What a fetch found: the commit to apply, the ref it was found at
/// (`branch main`, `tag v1.4.0`…) and its manifest files.
pub struct Fetched {
    pub commit: String,
    pub found_at: String,
    /// When the commit was made (Unix seconds).
    pub committed_at: i64,
    pub files: Files,
}

/// Bounds on one fetch.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub timeout: Duration,
    /// Most bytes of objects a fetch may receive.
    pub max_bytes: u64,
}

/// libgit2's socket timeouts are process-wide: a host that stops answering
/// fails the fetch instead of holding its thread forever.
fn set_socket_timeouts() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: libgit2's global options are written once, through this
        // `Once`, which every fetch passes before it touches libgit2, and
        // nothing else in the controller uses libgit2.
        #[allow(unsafe_code)]
        let set = unsafe {
            git2::opts::set_server_connect_timeout_in_milliseconds(15_000)
                .and_then(|()| git2::opts::set_server_timeout_in_milliseconds(30_000))
        };
        if let Err(e) = set {
            tracing::warn!(error = %e, "git socket timeouts not set");
        }
    });
}

/// What the callbacks saw, to tell why libgit2 gave up.
#[derive(Default)]
struct Seen {
    /// The host refused the credentials given (or asked for some there are not).
    credentials: Option<String>,
    /// The host's certificate or key is not trusted.
    untrusted: Option<String>,
    /// A limit was passed.
    limit: Option<String>,
}

/// Fetches the revision `spec.ref` names into the bare repository `dir`,
/// checks its signature when `signers` are given, and reads every
/// `*.yaml`/`*.yml` file under `spec.path` (paths relative to the
/// repository root).
pub fn fetch(
    dir: &Path,
    spec: &GitSourceSpec,
    access: &Access,
    signers: &[ssh_key::PublicKey],
    limits: Limits,
) -> Result<Fetched, Refused> {
    set_socket_timeouts();
    let io = |e: Error| Refused {
        reason: reasons::FETCH_FAILED,
        message: e.to_string(),
        class: ErrorClass::Transient,
    };
    let repo = match git2::Repository::open_bare(dir) {
        Ok(r) => r,
        Err(_) => {
            std::fs::create_dir_all(dir).map_err(|e| io(Error::io(dir, e)))?;
            git2::Repository::init_bare(dir).map_err(|e| io(e.into()))?
        }
    };
    let wanted = Wanted::of(&spec.reference)?;
    let remote_at = Remote::parse(&spec.url);
    access.check_host(remote_at.as_ref()).map_err(|why| {
        Refused::stalled(
            reasons::AUTHENTICATION_FAILED,
            format!("spec.secretRef: {why}"),
        )
    })?;
    let seen = std::cell::RefCell::new(Seen::default());
    let mut options = git2::FetchOptions::new();
    options
        .remote_callbacks(callbacks(remote_at.as_ref(), access, &seen, limits))
        .download_tags(git2::AutotagOption::None)
        .prune(git2::FetchPrune::On)
        .proxy_options({
            let mut p = git2::ProxyOptions::new();
            p.auto();
            p
        });
    // Only the tip is needed, except to find a pinned commit on its branch.
    // (libgit2 cannot fetch shallow from a local repository.)
    if remote_at.is_some() && spec.reference.commit.is_none() {
        options.depth(1);
    } else if spec.reference.commit.is_some() && repo.is_shallow() {
        // A pinned commit needs the branch's history: deepen what an
        // earlier shallow fetch left (libgit2's "unshallow").
        options.depth(i32::MAX);
    }
    let mut remote = repo.remote_anonymous(&spec.url).map_err(|e| io(e.into()))?;
    if let Err(e) = remote.fetch(&[wanted.refspec()], Some(&mut options), None) {
        let seen = std::mem::take(&mut *seen.borrow_mut());
        let shown = redact(&spec.url);
        return Err(match (seen.credentials, seen.untrusted, seen.limit) {
            (Some(why), ..) => Refused::stalled(
                reasons::AUTHENTICATION_FAILED,
                format!("{shown}: {why}"),
            ),
            (_, Some(why), _) => Refused::stalled(reasons::HOST_NOT_TRUSTED, format!("{shown}: {why}")),
            (.., Some(why)) => Refused {
                reason: reasons::FETCH_FAILED,
                message: format!("fetching {shown}: {why}"),
                class: ErrorClass::Transient,
            },
            // libgit2 keeps the class of a certificate it (with OpenSSL and
            // the system's roots) refused, not the code.
            _ if e.class() == git2::ErrorClass::Ssl => Refused::stalled(
                reasons::HOST_NOT_TRUSTED,
                match access.ca {
                    None => format!(
                        "fetching {shown}: {} (signed by a private CA? put it in the Secret's `ca.crt`)",
                        e.message()
                    ),
                    Some(_) => format!("fetching {shown}: {}", e.message()),
                },
            ),
            _ => Refused {
                reason: reasons::FETCH_FAILED,
                message: format!("fetching {shown} ({}): {}", wanted.describe(), e.message()),
                class: ErrorClass::Transient,
            },
        });
    }
    let (commit, found_at) = wanted.resolve(&repo)?;
    if !signers.is_empty() {
        signature::verify_commit(&repo, commit.id(), signers)
            .map_err(|why| Refused::stalled(reasons::SIGNATURE_INVALID, why))?;
    }
    let files = read_files(&repo, &commit, &spec.path).map_err(|e| {
        Refused::stalled(
            reasons::INVALID_MANIFEST,
            format!("reading {} of commit {}: {e}", spec.path, commit.id()),
        )
    })?;
    Ok(Fetched {
        commit: commit.id().to_string(),
        found_at,
        committed_at: commit.time().seconds(),
        files,
    })
}

/// The callbacks that decide what the Git host gets and is trusted with.
fn callbacks<'a>(
    remote: Option<&'a Remote>,
    access: &'a Access,
    seen: &'a std::cell::RefCell<Seen>,
    limits: Limits,
) -> git2::RemoteCallbacks<'a> {
    let mut cb = git2::RemoteCallbacks::new();
    let mut asked = 0;
    cb.credentials(move |url, user_from_url, allowed| {
        // SSH asks for the user name alone first: not an attempt.
        if allowed == git2::CredentialType::USERNAME {
            let user = remote
                .and_then(|r| r.user.clone())
                .or_else(|| access.username.clone())
                .unwrap_or_else(|| "git".into());
            return git2::Cred::username(&user);
        }
        asked += 1;
        let refuse = |why: String| {
            seen.borrow_mut().credentials = Some(why.clone());
            Err(git2::Error::from_str(&why))
        };
        if asked > 1 {
            return refuse("the Git host refused the credentials of the Secret".into());
        }
        let Some(remote) = remote.filter(|r| r.same_host(url) || r.ssh) else {
            return refuse(format!("credentials are sent only to the host of `url`, not to {}", redact(url)));
        };
        if allowed.contains(git2::CredentialType::SSH_KEY) {
            let Some(identity) = &access.identity else {
                return refuse("the Git host asks for an SSH key: put one in the Secret's `identity` (spec.secretRef)".into());
            };
            let user = user_from_url
                .map(str::to_string)
                .or_else(|| remote.user.clone())
                .or_else(|| access.username.clone())
                .unwrap_or_else(|| "git".into());
            return git2::Cred::ssh_key_from_memory(&user, None, identity, None).or_else(|e| {
                refuse(format!("the Secret's `identity` is not a usable SSH private key: {}", e.message()))
            });
        }
        if allowed.contains(git2::CredentialType::USER_PASS_PLAINTEXT) {
            let Some(password) = &access.password else {
                return refuse("the Git host asks for a username and password: put them in the Secret's `username` and `password` (spec.secretRef)".into());
            };
            let user = access.username.as_deref().unwrap_or("git");
            return git2::Cred::userpass_plaintext(user, password);
        }
        refuse(format!("the Git host asks for credentials of a kind Caravan does not have ({allowed:?})"))
    });
    cb.certificate_check(move |cert, host| {
        let untrusted = |why: String| {
            seen.borrow_mut().untrusted = Some(why.clone());
            Err(git2::Error::from_str(&why))
        };
        if let Some(hostkey) = cert.as_hostkey() {
            let Some(remote) = remote else {
                return untrusted(format!("an SSH host key from {host} for a repository that is not remote"));
            };
            let Some(known) = &access.known_hosts else {
                return untrusted(format!("no `known_hosts` in the Secret (spec.secretRef): the host key of {} cannot be checked", remote.known_hosts_name()));
            };
            let Some(key) = hostkey.hostkey() else {
                return untrusted(format!("{host} sent no host key"));
            };
            return match access::check_host_key(known, &remote.known_hosts_name(), key) {
                Ok(()) => Ok(git2::CertificateCheckStatus::CertificateOk),
                Err(why) => untrusted(why),
            };
        }
        match (cert.as_x509(), &access.ca) {
            (Some(x509), Some(ca)) => match access::check_certificate(ca, x509.data(), host) {
                Ok(()) => Ok(git2::CertificateCheckStatus::CertificateOk),
                Err(why) => untrusted(why),
            },
            // The system's roots, as libgit2 checked them.
            _ => Ok(git2::CertificateCheckStatus::CertificatePassthrough),
        }
    });
    let started = Instant::now();
    cb.transfer_progress(move |p| {
        let why = if p.received_bytes() as u64 > limits.max_bytes {
            Some(format!(
                "the repository is larger than the controller takes ({} MiB, --git-fetch-limit-bytes)",
                limits.max_bytes >> 20
            ))
        } else if started.elapsed() > limits.timeout {
            Some(format!(
                "the fetch took longer than {} s (spec.timeoutSeconds)",
                limits.timeout.as_secs()
            ))
        } else {
            None
        };
        match why {
            Some(why) => {
                seen.borrow_mut().limit = Some(why);
                false
            }
            None => true,
        }
    });
    cb
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

    /// A repository with `fleet/site.yaml` in three commits on `main`, tags
    /// `v1.0.0`, `v1.2.0` (annotated), `2.0.0` and `junk`; the last commit
    /// is SSH-signed by `signer` (seed 1).
    struct Upstream {
        _dir: tempfile::TempDir,
        url: String,
        commits: Vec<git2::Oid>,
        aside: git2::Oid,
    }

    fn signer(seed: u8) -> ssh_key::PrivateKey {
        ssh_key::PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&[seed; 32]))
    }

    fn upstream() -> Upstream {
        let dir = tempfile::tempdir().unwrap();
        let repo = git2::Repository::init_bare(dir.path().join("fleet.git")).unwrap();
        let sig = git2::Signature::now("t", "t@caravan.invalid").unwrap();
        let mut commits: Vec<git2::Oid> = vec![];
        for (i, tag) in ["v1.0.0", "v1.2.0", "2.0.0"].iter().enumerate() {
            let blob = repo.blob(format!("site {i}\n").as_bytes()).unwrap();
            let mut inner = repo.treebuilder(None).unwrap();
            inner.insert("site.yaml", blob, 0o100644).unwrap();
            let inner = inner.write().unwrap();
            let mut root = repo.treebuilder(None).unwrap();
            root.insert("fleet", inner, 0o040000).unwrap();
            let tree = repo.find_tree(root.write().unwrap()).unwrap();
            let parents: Vec<_> = commits
                .last()
                .map(|c| repo.find_commit(*c).unwrap())
                .into_iter()
                .collect();
            let parents: Vec<_> = parents.iter().collect();
            let id = if i == 2 {
                let buf = repo
                    .commit_create_buffer(&sig, &sig, "signed", &tree, &parents)
                    .unwrap();
                let armored = signer(1)
                    .sign("git", ssh_key::HashAlg::Sha512, &buf)
                    .unwrap()
                    .to_pem(ssh_key::LineEnding::LF)
                    .unwrap();
                let id = repo
                    .commit_signed(buf.as_str().unwrap(), &armored, None)
                    .unwrap();
                repo.reference("refs/heads/main", id, true, "signed")
                    .unwrap();
                id
            } else {
                repo.commit(Some("refs/heads/main"), &sig, &sig, "c", &tree, &parents)
                    .unwrap()
            };
            let obj = repo.find_object(id, None).unwrap();
            if i == 1 {
                repo.tag(tag, &obj, &sig, "annotated", false).unwrap();
            } else {
                repo.tag_lightweight(tag, &obj, false).unwrap();
            }
            commits.push(id);
        }
        let first = repo.find_object(commits[0], None).unwrap();
        repo.tag_lightweight("junk", &first, false).unwrap();
        // A commit on another branch only.
        let tree = repo.find_commit(commits[0]).unwrap().tree().unwrap();
        let aside = repo
            .commit(Some("refs/heads/aside"), &sig, &sig, "aside", &tree, &[])
            .unwrap();
        Upstream {
            url: format!("file://{}", dir.path().join("fleet.git").display()),
            _dir: dir,
            commits,
            aside,
        }
    }

    fn spec(url: &str, reference: serde_json::Value) -> GitSourceSpec {
        serde_json::from_value(serde_json::json!({"url": url, "ref": reference, "path": "fleet"}))
            .unwrap()
    }

    const LIMITS: Limits = Limits {
        timeout: Duration::from_secs(60),
        max_bytes: 1 << 20,
    };

    fn fetch_ref(up: &Upstream, reference: serde_json::Value) -> Result<Fetched, Refused> {
        let into = tempfile::tempdir().unwrap();
        fetch(
            into.path(),
            &spec(&up.url, reference),
            &Access::default(),
            &[],
            LIMITS,
        )
    }

    #[test]
    fn a_ref_is_a_branch_a_tag_a_semver_range_or_a_commit() {
        let up = upstream();
        let got = |r| fetch_ref(&up, r).map(|f| (f.commit, f.found_at)).unwrap();
        let c = |i: usize| up.commits[i].to_string();
        assert_eq!(got(serde_json::json!({})), (c(2), "branch main".into()));
        assert_eq!(
            got(serde_json::json!({"tag": "v1.2.0"})),
            (c(1), "tag v1.2.0".into()),
            "annotated tags peel to their commit"
        );
        assert_eq!(
            got(serde_json::json!({"tag": "v1.0.0"})),
            (c(0), "tag v1.0.0".into())
        );
        assert_eq!(
            got(serde_json::json!({"semver": ">=1.0, <2"})),
            (c(1), "tag v1.2.0 (semver >=1.0, <2)".into()),
            "the highest tag in range, `v` or not; `junk` ignored"
        );
        assert_eq!(got(serde_json::json!({"semver": "*"})).0, c(2));
        assert_eq!(
            got(serde_json::json!({"commit": c(1), "semver": "*"})).0,
            c(1),
            "commit wins"
        );
        let files = fetch_ref(&up, serde_json::json!({"commit": c(0)}))
            .unwrap()
            .files;
        assert_eq!(
            files,
            vec![("fleet/site.yaml".to_string(), b"site 0\n".to_vec())]
        );
    }

    #[test]
    fn a_ref_that_is_wrong_or_not_there_is_refused_naming_it() {
        let up = upstream();
        let refused = |r| fetch_ref(&up, r).err().expect("refused");
        let e = refused(serde_json::json!({"commit": up.aside.to_string()}));
        assert_eq!(e.reason, reasons::REVISION_NOT_FOUND);
        assert!(e.message.contains("is not on branch main"), "{}", e.message);
        let e = refused(serde_json::json!({"commit": "abc123"}));
        assert_eq!(e.reason, reasons::INVALID_REF);
        assert!(e.message.contains("not a full commit id"), "{}", e.message);
        let e = refused(serde_json::json!({"semver": ">=3"}));
        assert_eq!(
            (e.reason, e.message.as_str()),
            (reasons::REVISION_NOT_FOUND, "no tag matches semver >=3")
        );
        let e = refused(serde_json::json!({"semver": "one"}));
        assert_eq!(e.reason, reasons::INVALID_REF);
        let e = refused(serde_json::json!({"tag": "v9"}));
        assert_eq!(
            (e.reason, e.message.as_str()),
            (
                reasons::REVISION_NOT_FOUND,
                "tag v9 not found in the repository"
            )
        );
        let e = refused(serde_json::json!({"branch": "gone"}));
        assert_eq!(e.message, "branch gone not found in the repository");
        for bad in ["main:refs/heads/x", "*", "a..b", "-x/.lock"] {
            let e = refused(serde_json::json!({"branch": bad}));
            assert_eq!(e.reason, reasons::INVALID_REF, "{bad}: {}", e.message);
        }
        assert_eq!(
            refused(serde_json::json!({"tag": "v*"})).reason,
            reasons::INVALID_REF
        );
    }

    #[test]
    fn only_commits_signed_by_a_listed_key_are_applied() {
        let up = upstream();
        let into = tempfile::tempdir().unwrap();
        let run = |reference, keys: &[ssh_key::PublicKey]| {
            fetch(
                into.path(),
                &spec(&up.url, reference),
                &Access::default(),
                keys,
                LIMITS,
            )
        };
        let alice = [signer(1).public_key().clone()];
        let signed = run(serde_json::json!({}), &alice).unwrap();
        assert_eq!(signed.commit, up.commits[2].to_string());
        let e = run(serde_json::json!({"tag": "v1.0.0"}), &alice)
            .err()
            .unwrap();
        assert_eq!(e.reason, reasons::SIGNATURE_INVALID);
        assert!(e.message.ends_with("is not signed"), "{}", e.message);
        let e = run(serde_json::json!({}), &[signer(2).public_key().clone()])
            .err()
            .unwrap();
        assert!(e.message.contains("not a signing key"), "{}", e.message);
    }

    #[test]
    fn a_repository_larger_than_the_limit_is_not_fetched() {
        let up = upstream();
        let into = tempfile::tempdir().unwrap();
        let small = Limits {
            max_bytes: 16,
            ..LIMITS
        };
        let e = fetch(
            into.path(),
            &spec(&up.url, serde_json::json!({})),
            &Access::default(),
            &[],
            small,
        )
        .err()
        .unwrap();
        assert_eq!(e.reason, reasons::FETCH_FAILED);
        assert!(
            e.message.contains("larger than the controller takes"),
            "{}",
            e.message
        );
    }

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
