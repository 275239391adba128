//! Agents nobody hears from: one that has not reported for
//! `--agent-stale-after-seconds` gets `Stale=True` (a condition and a
//! column, and a Warning), and one silent for `--agent-delete-after-seconds`
//! (when set) is deleted, with a Warning on its Site, once it has been that
//! silent with its site's relay connected: behind a relay that is away (or
//! was, or since this controller started) silence says nothing, so the
//! wait starts again from then. An Agent that never
//! reported counts from its creation; one that never enrolled (declared in
//! Git ahead of its machine) is never deleted, and one not approved
//! (awaiting approval, or revoked: it cannot report) is left alone. The next report an agent
//! delivers drops `Stale` (the reports writer owns the conditions it
//! writes, and writes only its own).
//!
//! Runs on the leader, over the Agent cache: a write only when an Agent
//! turns stale or is deleted.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use caravan_api::{
    conditions::{self, reasons},
    v1alpha1::{Agent, Site},
};
use chrono::{DateTime, Utc};
use kube::{
    api::{DeleteParams, Patch, PatchParams},
    runtime::events::{Event, EventType},
    Resource as _, ResourceExt,
};
use tokio_util::sync::CancellationToken;

use crate::{
    context::Context, field_managers, index::SiteKey, site::RelayContacts, stores::Stores,
};

/// When Agents turn stale and are deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub stale_after: Duration,
    /// None: Agents are never deleted.
    pub delete_after: Option<Duration>,
}

/// What becomes of an Agent at a given time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Heard from lately (or already marked stale).
    Fine,
    /// Silent since then: mark it.
    Stale(DateTime<Utc>),
    /// Silent since then for longer than the policy keeps it.
    Delete(DateTime<Utc>),
}

impl Policy {
    /// The policy the flags say, if it makes sense: Agents are marked stale
    /// before they are deleted.
    pub fn new(stale_after_seconds: u64, delete_after_seconds: u64) -> anyhow::Result<Self> {
        anyhow::ensure!(
            delete_after_seconds == 0 || delete_after_seconds > stale_after_seconds,
            "--agent-delete-after-seconds {delete_after_seconds} is not longer than --agent-stale-after-seconds {stale_after_seconds}: Agents would be deleted before anyone saw them stale (0 keeps them)"
        );
        Ok(Self {
            stale_after: Duration::from_secs(stale_after_seconds),
            delete_after: (delete_after_seconds > 0)
                .then(|| Duration::from_secs(delete_after_seconds)),
        })
    }

    /// What becomes of `agent` at `now`.
    pub fn judge(&self, agent: &Agent, now: DateTime<Utc>) -> Verdict {
        // Awaiting approval or revoked: not served, so it cannot report.
        // Silence says nothing of it, and deleting it would undo a
        // revocation (it would enroll again).
        if !agent.spec.approved {
            return Verdict::Fine;
        }
        let status = agent.status.as_ref();
        let heard = status
            .and_then(|s| s.last_seen.as_deref())
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
            .or_else(|| {
                let created = agent.meta().creation_timestamp.as_ref()?.0;
                DateTime::from_timestamp(created.as_second(), 0)
            });
        let Some(heard) = heard else {
            return Verdict::Fine;
        };
        let silent = (now - heard).to_std().unwrap_or_default();
        let enrolled = !agent.spec.secret_hash.is_empty();
        if enrolled && self.delete_after.is_some_and(|d| silent > d) {
            return Verdict::Delete(heard);
        }
        if silent > self.stale_after && !marked(agent) {
            return Verdict::Stale(heard);
        }
        Verdict::Fine
    }

    /// How often the Agents are looked at: a quarter of the shortest time,
    /// at least every second and at most every minute.
    fn interval(&self) -> Duration {
        let shortest = self
            .delete_after
            .map_or(self.stale_after, |d| d.min(self.stale_after));
        (shortest / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }
}

/// Whether `agent` is marked stale already.
fn marked(agent: &Agent) -> bool {
    agent
        .status
        .as_ref()
        .is_some_and(|s| conditions::is_true(&s.conditions, conditions::STALE))
}

/// Looks at every Agent each [`Policy::interval`] until shutdown.
pub async fn run(
    ctx: Arc<Context>,
    stores: Stores,
    relays: Arc<RelayContacts>,
    policy: Policy,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(policy.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When each site's relay was last seen away: its agents' silence counts
    // only from then (they could not report), and this process's start
    // counts as such a time.
    let mut away: HashMap<SiteKey, Instant> = HashMap::new();
    let started = Instant::now();
    while stores.next_round(&mut tick, &shutdown).await {
        let now = Utc::now();
        // Whether each site's relay is connected, asked once per round.
        let mut connected: HashMap<SiteKey, bool> = HashMap::new();
        for agent in stores.agents.state() {
            let outcome = match policy.judge(&agent, now) {
                Verdict::Fine => continue,
                Verdict::Stale(heard) => mark(&ctx, &agent, heard, &policy).await,
                // Behind a relay that is away, or was lately, silence says
                // nothing of the agents: they are kept (marked) until they
                // have been as silent for as long with their relay there.
                Verdict::Delete(heard) => {
                    let site = (
                        agent.namespace().unwrap_or_default(),
                        agent.spec.site.clone(),
                    );
                    let up = match connected.get(&site) {
                        Some(up) => *up,
                        None => {
                            let up = relays.heard(&site).await.connected();
                            connected.insert(site.clone(), up);
                            up
                        }
                    };
                    if !up {
                        away.insert(site.clone(), Instant::now());
                    }
                    let since = away.get(&site).copied().unwrap_or(started);
                    let delete_after = policy.delete_after.unwrap_or_default();
                    if up && since.elapsed() >= delete_after {
                        delete(&ctx, &stores, &agent, heard).await
                    } else if marked(&agent) {
                        continue;
                    } else {
                        mark(&ctx, &agent, heard, &policy).await
                    }
                }
            };
            if let Err(e) = outcome {
                tracing::warn!(agent = %agent.name_any(), error = %e, "stale agent not handled; next round");
            }
        }
    }
    Ok(())
}

/// Adds `Stale=True` to the Agent's conditions, and says so in a Warning.
async fn mark(
    ctx: &Context,
    agent: &Agent,
    heard: DateTime<Utc>,
    policy: &Policy,
) -> Result<(), kube::Error> {
    let heard = heard.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let message = match policy.delete_after {
        Some(d) => format!(
            "not heard from since {heard} (more than {} s); deleted once silent for {} s",
            policy.stale_after.as_secs(),
            d.as_secs()
        ),
        None => format!(
            "not heard from since {heard} (more than {} s)",
            policy.stale_after.as_secs()
        ),
    };
    let mut conditions: Vec<_> = agent
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    conditions.retain(|c| c.type_ != conditions::STALE);
    conditions.push(conditions::new(
        conditions::STALE,
        true,
        reasons::NOT_HEARD_FROM,
        message.clone(),
        agent.meta().generation,
    ));
    // Only the conditions: everything else in the status is the reports
    // writer's, and stays. Guarded by the resourceVersion read: a report
    // taken meanwhile is not overwritten (the next round looks again).
    let patch = serde_json::json!({
        "apiVersion": Agent::api_version(&()),
        "kind": Agent::kind(&()),
        "metadata": { "resourceVersion": agent.resource_version() },
        "status": { "conditions": conditions },
    });
    ctx.namespaced::<Agent>(&agent.namespace().unwrap_or_default())
        .patch_status(
            &agent.name_any(),
            &PatchParams::apply(field_managers::STALE).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    tracing::info!(agent = %agent.name_any(), %heard, "agent is stale");
    warn(ctx, agent, "Stale", message).await;
    Ok(())
}

/// Deletes the Agent (as it was read: one heard from meanwhile stays), with
/// a Warning on its Site.
async fn delete(
    ctx: &Context,
    stores: &Stores,
    agent: &Agent,
    heard: DateTime<Utc>,
) -> Result<(), kube::Error> {
    let ns = agent.namespace().unwrap_or_default();
    let params = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            resource_version: agent.resource_version(),
            uid: agent.uid(),
        }),
        ..Default::default()
    };
    match ctx
        .namespaced::<Agent>(&ns)
        .delete(&agent.name_any(), &params)
        .await
    {
        Ok(_) => {}
        // Gone already, or changed since it was read (a report): not now.
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => return Ok(()),
        Err(e) => return Err(e),
    }
    let heard = heard.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    tracing::info!(agent = %agent.name_any(), %heard, "stale agent deleted");
    let site = stores
        .sites
        .get(&kube::runtime::reflector::ObjectRef::<Site>::new(&agent.spec.site).within(&ns));
    if let Some(site) = site {
        let note = format!(
            "Agent {} (host {}) deleted: not heard from since {heard}",
            agent.name_any(),
            agent.spec.hostname
        );
        warn(ctx, site.as_ref(), "StaleAgentDeleted", note).await;
    }
    Ok(())
}

/// A Warning about `obj`.
async fn warn<K: kube::Resource<DynamicType = ()>>(
    ctx: &Context,
    obj: &K,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note),
        action: "Sweep".into(),
        secondary: None,
    };
    ctx.publish(&event, obj).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::fixtures::agent;

    fn seen(mut a: Agent, at: &str) -> Agent {
        a.status.get_or_insert_with(Default::default).last_seen = Some(at.into());
        a.spec.secret_hash = "enrolled".into();
        a
    }

    #[test]
    fn agents_are_marked_stale_before_they_are_deleted() {
        assert!(Policy::new(600, 0).is_ok());
        assert!(Policy::new(600, 601).is_ok());
        let e = Policy::new(600, 60).unwrap_err().to_string();
        assert!(
            e.contains("--agent-delete-after-seconds 60 is not longer"),
            "{e}"
        );
        assert!(Policy::new(600, 600).is_err());
    }

    #[test]
    fn an_agent_turns_stale_once_and_is_deleted_only_by_policy_and_only_if_enrolled() {
        let now = DateTime::parse_from_rfc3339("2026-12-07T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let hour = Duration::from_secs(3600);
        let keep = Policy {
            stale_after: hour,
            delete_after: None,
        };
        let sweep = Policy {
            delete_after: Some(hour * 24),
            ..keep
        };
        let fresh = seen(agent("a", "hq"), "2026-12-07T11:30:00Z");
        assert_eq!(keep.judge(&fresh, now), Verdict::Fine);
        let quiet = seen(agent("a", "hq"), "2026-12-07T10:00:00Z");
        let at = DateTime::parse_from_rfc3339("2026-12-07T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(keep.judge(&quiet, now), Verdict::Stale(at));
        assert_eq!(sweep.judge(&quiet, now), Verdict::Stale(at));
        // Marked already: nothing more to write.
        let mut marked = quiet.clone();
        marked
            .status
            .as_mut()
            .unwrap()
            .conditions
            .push(conditions::new(
                conditions::STALE,
                true,
                reasons::NOT_HEARD_FROM,
                "",
                None,
            ));
        assert_eq!(keep.judge(&marked, now), Verdict::Fine);
        // Two days: deleted only where the policy says so.
        let gone = seen(agent("a", "hq"), "2026-12-05T11:00:00Z");
        assert!(matches!(sweep.judge(&gone, now), Verdict::Delete(_)));
        assert!(matches!(keep.judge(&gone, now), Verdict::Stale(_)));
        // Declared in Git, never enrolled: marked, never deleted.
        let mut declared = gone.clone();
        declared.spec.secret_hash.clear();
        assert!(matches!(sweep.judge(&declared, now), Verdict::Stale(_)));
        // Awaiting approval or revoked: left alone, however silent.
        let mut revoked = gone.clone();
        revoked.spec.approved = false;
        assert_eq!(sweep.judge(&revoked, now), Verdict::Fine);
        // Never reported: counted from its creation.
        let mut silent = agent("a", "hq");
        silent.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-12-07T10:30:00Z".parse().unwrap(),
            ));
        assert!(matches!(keep.judge(&silent, now), Verdict::Stale(_)));
    }
}
