//! Commands that act on the cluster directly (through the kubeconfig, like
//! `kubectl`): bootstrap tokens and agent approval.

use anyhow::Context as _;
use caravan_api::v1alpha1::{Agent, BootstrapToken, BootstrapTokenSpec, Site, TokenString};
use clap::Subcommand;
use kube::{
    api::{DeleteParams, Patch, PatchParams, PostParams},
    Api, Client, Resource as _,
};

#[derive(Subcommand)]
pub enum SiteCommand {
    /// Give a site's relay a new credential: the old one stops working at
    /// once, the relay's Secret holds the new one and its pods roll. Agents
    /// renew theirs with their own keys; nothing enrolls again.
    RotateRelayCredential {
        /// The Site.
        site: String,
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
}

pub async fn site(command: SiteCommand) -> anyhow::Result<()> {
    let SiteCommand::RotateRelayCredential { site, namespace } = command;
    let sites: Api<Site> = namespaced(namespace).await?;
    let value = hex::encode(rand::random::<[u8; 16]>());
    let patch = serde_json::json!({
        "metadata": { "annotations": { caravan_api::labels::RELAY_CREDENTIAL_ROTATION: value } }
    });
    let rotated = sites
        .patch(&site, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("rotating the relay credential of Site {site}"))?;
    eprintln!(
        "site {site}: relay credential is now key {}",
        rotated.relay_key_id()
    );
    Ok(())
}

#[derive(Subcommand)]
pub enum AgentCommand {
    /// Let an agent in: its relay serves it from its next request on. An
    /// Agent another machine asks to take over (`spec.replacement`: the
    /// same machine reinstalled) is handed to that machine: it enrolls with
    /// its own secret and key; the machine it was is refused its reports and
    /// renewals (its current credential lasts until it expires).
    Approve {
        /// The Agent's name (`kubectl get agents`).
        name: String,
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// Hand the Agent to the machine asking to take it over, whose key
        /// has this ID: check it against the `key` that machine's agent
        /// logs (the request passed through a relay, which could have put
        /// its own key in it).
        #[arg(long, value_name = "KEY_ID")]
        replacement: Option<String>,
        /// Approve the Agent's current machine although another asks to take
        /// it over (that request stays pending).
        #[arg(long, conflicts_with = "replacement")]
        keep_current: bool,
    },
    /// Cut an agent off: its relay turns it away at its next request, and it
    /// keeps what it has installed. `approve` lets it back in. (Deleting
    /// the Agent does not keep the machine out: it enrolls again with its
    /// bootstrap token, as a new Agent.)
    Revoke {
        name: String,
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
}

pub async fn agent(command: AgentCommand) -> anyhow::Result<()> {
    let (name, namespace, approved, checked, keep_current) = match command {
        AgentCommand::Approve {
            name,
            namespace,
            replacement,
            keep_current,
        } => (name, namespace, true, replacement, keep_current),
        AgentCommand::Revoke { name, namespace } => (name, namespace, false, None, false),
    };
    let agents: Api<Agent> = namespaced(namespace).await?;
    let agent = agents
        .get(&name)
        .await
        .with_context(|| format!("reading Agent {name}"))?;
    let pending = agent.spec.replacement.as_ref().map(|r| {
        let key = caravan_api::signing::parse_public(&r.public_key)
            .map_or_else(|_| "?".into(), |k| caravan_api::signing::key_id(&k));
        (r, key)
    });
    let handover = match (&pending, checked) {
        (Some((r, key)), Some(checked)) if *key == checked => Some(*r),
        (Some((r, key)), Some(checked)) => anyhow::bail!(
            "the machine asking to take Agent {name} over (host {}, {}) has key {key}, not {checked}: do not approve it unless that machine's log says {key}",
            r.hostname,
            r.requested
        ),
        (None, Some(_)) => anyhow::bail!("no machine asks to take Agent {name} over"),
        // An approval while a handover waits is one or the other, said.
        (Some((r, key)), None) if approved && !keep_current => anyhow::bail!(
            "a machine asks to take Agent {name} over (host {}, {}, key {key}): hand it over with --replacement {key} once that machine's log shows that key, or approve the current machine with --keep-current",
            r.hostname,
            r.requested
        ),
        _ => None,
    };
    let patch = match handover {
        // Guarded by the resourceVersion read: a newer request to take it
        // over is not approved unseen.
        Some(r) => serde_json::json!({
            "metadata": { "resourceVersion": agent.metadata.resource_version },
            "spec": {
                "approved": true,
                "secretHash": r.secret_hash,
                "publicKey": r.public_key,
                "hostname": if r.hostname.is_empty() { &agent.spec.hostname } else { &r.hostname },
                "replacement": null,
            },
        }),
        None => serde_json::json!({ "spec": { "approved": approved } }),
    };
    agents
        .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .with_context(|| format!("updating Agent {name}"))?;
    match handover {
        Some(r) => {
            // Its reports are signed with its own key, from its own sequence.
            agents
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({ "status": { "reportSequence": null } })),
                )
                .await
                .with_context(|| format!("updating Agent {name}'s status"))?;
            eprintln!(
                "agent {name} approved for the machine that asked to take it over (host {}, {}); the machine it was keeps its credential until it expires, and is refused its renewal",
                r.hostname, r.requested
            );
        }
        None => eprintln!(
            "agent {name} {}",
            if approved { "approved" } else { "revoked" }
        ),
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Make a bootstrap token for agents of a site to enroll with. The token
    /// is printed once, on standard output; only its sha256 is stored.
    Create {
        /// The Site agents enroll at.
        #[arg(long)]
        site: String,
        /// How long the token is good for (`30m`, `24h`, `7d`).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// Enrollments the token allows (1: single-use; unset: any number
        /// until it expires).
        #[arg(long)]
        max_uses: Option<u32>,
        /// Also write an enrollment bundle to this file (mode 0600): the
        /// token with the root of trust and the CA the site's agents pin,
        /// for `caravan-agent run --bundle`.
        #[arg(long)]
        bundle: Option<std::path::PathBuf>,
        /// What the token is for.
        #[arg(long, default_value = "")]
        description: String,
        /// Namespace of the Site (default: the kubeconfig's).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
    /// Revoke a bootstrap token (by its id, the part before the dot): no
    /// agent can enroll with it any more. Enrolled agents are not affected.
    Revoke {
        id: String,
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
}

async fn namespaced<K>(namespace: Option<String>) -> anyhow::Result<Api<K>>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    let client = Client::try_default()
        .await
        .context("connecting to the cluster (kubeconfig)")?;
    let ns = namespace.unwrap_or_else(|| client.default_namespace().to_string());
    Ok(Api::namespaced(client, &ns))
}

pub async fn token(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            site,
            ttl,
            max_uses,
            description,
            bundle,
            namespace,
        } => {
            let sites: Api<Site> = namespaced(namespace.clone()).await?;
            let site_obj = sites
                .get_opt(&site)
                .await?
                .with_context(|| format!("there is no Site {site}"))?;
            // What the bundle pins, checked before a token is made.
            let trust = match &bundle {
                None => None,
                Some(_) => {
                    let status = site_obj.status.clone().unwrap_or_default();
                    let root = status.trust_root_sha256.with_context(|| {
                        format!("Site {site} has no trust root in its status yet: is the controller running?")
                    })?;
                    let ca = status.ca.with_context(|| {
                        format!("Site {site} has no CA in its status: it serves its own certificate (spec.relay.tlsSecret), or the controller has not looked at it yet; give agents that CA with --ca-file")
                    })?;
                    Some((root, ca))
                }
            };
            // Bound to the Site's first UID, which a restore keeps.
            let uid = Some(caravan_api::original_uid(site_obj.meta()))
                .filter(|u| !u.is_empty())
                .context("the Site has no UID")?
                .to_string();
            let token = TokenString::new(rand::random(), rand::random());
            let ttl = chrono::Duration::from_std(ttl).context("--ttl is too long")?;
            let mut record = BootstrapToken::new(
                &token.id,
                BootstrapTokenSpec {
                    site: site.clone(),
                    site_uid: uid,
                    secret_sha256: token.secret_sha256(),
                    expires: chrono::Utc::now() + ttl,
                    max_uses,
                    description,
                },
            );
            // Deleted with its Site wherever a garbage collector runs (the
            // controller refuses it from that moment on either way).
            record.metadata.owner_references = site_obj.controller_owner_ref(&()).map(|mut o| {
                o.controller = Some(false);
                vec![o]
            });
            // Written first: a token is never made without its bundle.
            if let (Some(path), Some((trust_root_sha256, ca))) = (&bundle, trust) {
                let bundle = caravan_api::trust::EnrollmentBundle {
                    bootstrap_token: token.to_string(),
                    trust_root_sha256,
                    ca,
                };
                caravan_net::fs::write_private(
                    path,
                    &serde_json::to_vec_pretty(&bundle)?,
                    caravan_net::fs::Existing::Replace,
                )
                .with_context(|| format!("writing {}", path.display()))?;
            }
            let tokens: Api<BootstrapToken> = namespaced(namespace).await?;
            let created = tokens.create(&PostParams::default(), &record).await;
            if let Err(e) = created {
                if let Some(path) = &bundle {
                    let _ = std::fs::remove_file(path);
                }
                return Err(e).context("creating the BootstrapToken");
            }
            if let Some(path) = &bundle {
                eprintln!(
                    "enrollment bundle written to {} (give agents --bundle {0})",
                    path.display()
                );
            }
            eprintln!(
                "bootstrap token {} for site {site}, expires {}{}",
                token.id,
                record.spec.expires.to_rfc3339(),
                max_uses
                    .map(|n| format!(", {n} use(s)"))
                    .unwrap_or_default()
            );
            println!("{token}");
            Ok(())
        }
        TokenCommand::Revoke { id, namespace } => {
            let tokens: Api<BootstrapToken> = namespaced(namespace).await?;
            tokens
                .delete(&id, &DeleteParams::default())
                .await
                .with_context(|| format!("revoking bootstrap token {id}"))?;
            eprintln!("bootstrap token {id} revoked");
            Ok(())
        }
    }
}
