//! How a job reaches its destinations: in batches, behind a gate that
//! pauses the rollout when too many of a batch fail. The controller keeps
//! where the rollout stands in the job's status.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A rollout in batches. Without one a job rolls out gated: one
/// destination first, then 10%, then the rest, pausing when 10% of a
/// batch's finished destinations failed. Everyone at once is a choice:
/// `batches: [{size: 100%}]`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// The batches, in order: each gives the job to more destinations, and
    /// the next starts once every destination of this one finished (and
    /// `wait` passed); the last takes every destination left. Destinations
    /// are taken in an order fixed per job (a hash of the agent's name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub batches: Vec<Batch>,
    /// Pause the rollout when this many of a batch's finished destinations
    /// failed for good (retries spent), or this share of them (`10%`, the
    /// default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<IntOrString>,
    /// The threshold applies once this many of a batch's destinations
    /// finished (or all of a smaller batch). Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_completed: Option<u32>,
    /// How long to wait after a batch finished before the next starts
    /// (`30m`, `2h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub wait: Option<String>,
    /// Raise it to go on with the next batch now: a paused rollout
    /// continues, a batch still under way is not waited for (what
    /// `caravan job resume` does).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resume: u32,
}

/// One batch of a rollout.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Batch {
    /// How many destinations have the job once this batch starts, those
    /// of earlier batches counted: a number, or a percentage (`25%`) of the
    /// destinations (of `sites`, when given). Default `100%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<IntOrString>,
    /// Only destinations at these sites and the sites below them: a site
    /// partition (a pilot site first, then a region, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub sites: Vec<String>,
}

/// Where a job's rollout stands.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The batch under way, from 1.
    pub batch: u32,
    /// How many batches there are.
    pub batches: u32,
    /// Destinations that have the job so far.
    pub released: u32,
    /// Why the rollout is paused, if it is: the next batch waits until
    /// `spec.rollout.resume` is raised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
    /// The `spec.rollout.resume` last acted on.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resumed: u32,
    /// When the batch under way finished: the next starts
    /// `spec.rollout.wait` later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "super::schedule::date_time")]
    pub finished_at: Option<DateTime<Utc>>,
    /// The packages (by digest) the rollout is for: another version starts
    /// the rollout again from its first batch.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub revision: String,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The default `failureThreshold`.
pub const DEFAULT_FAILURE_THRESHOLD: &str = "10%";
/// The default `minCompleted`.
pub const DEFAULT_MIN_COMPLETED: u32 = 10;

/// A rollout, read: sizes and threshold checked, defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct RolloutPlan {
    pub batches: Vec<PlannedBatch>,
    pub failure_threshold: Share,
    pub min_completed: u32,
    pub wait: Option<chrono::Duration>,
    pub resume: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PlannedBatch {
    pub size: Share,
    pub sites: Vec<String>,
}

/// A number, or a percentage of a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Share {
    Count(u32),
    Percent(u32),
}

impl Share {
    fn parse(field: &str, v: &IntOrString) -> Result<Self, String> {
        let shown = match v {
            IntOrString::Int(n) => n.to_string(),
            IntOrString::String(s) => format!("{s:?}"),
        };
        let bad = || format!("{field} {shown}: a number from 1, or a percentage from 1% to 100%");
        match v {
            IntOrString::Int(n) => u32::try_from(*n)
                .ok()
                .filter(|n| *n >= 1)
                .map(Share::Count)
                .ok_or_else(bad),
            IntOrString::String(s) => match s.strip_suffix('%') {
                Some(p) => p
                    .parse::<u32>()
                    .ok()
                    .filter(|p| (1..=100).contains(p))
                    .map(Share::Percent)
                    .ok_or_else(bad),
                None => s
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .map(Share::Count)
                    .ok_or_else(bad),
            },
        }
    }

    /// How many of `whole` this is: a percentage rounds up (1% of 50 is
    /// one destination), and a count is at most the whole.
    pub fn of(self, whole: u32) -> u32 {
        match self {
            Share::Count(n) => n.min(whole),
            Share::Percent(p) => (u64::from(whole) * u64::from(p)).div_ceil(100) as u32,
        }
    }
}

impl std::fmt::Display for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Share::Count(n) => write!(f, "{n}"),
            Share::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Rollout {
    /// The rollout of a job that names none: gated.
    pub fn gated() -> Self {
        let size = |s: &str| Batch {
            size: Some(IntOrString::String(s.into())),
            sites: vec![],
        };
        Rollout {
            batches: vec![size("1"), size("10%"), size("100%")],
            ..Default::default()
        }
    }

    /// Reads the rollout (of a job: `None` is the gated default), naming
    /// the field that cannot be read.
    pub fn plan(rollout: Option<&Rollout>) -> Result<RolloutPlan, String> {
        let gated = Rollout::gated();
        let r = rollout.unwrap_or(&gated);
        let batches = if r.batches.is_empty() {
            &gated.batches
        } else {
            &r.batches
        };
        if let Some(last) = batches.last().filter(|b| !b.sites.is_empty()) {
            return Err(format!(
                "rollout.batches[{}].sites {:?}: the last batch takes every destination left, \
                 whatever its sites",
                batches.len() - 1,
                last.sites
            ));
        }
        let batches = batches
            .iter()
            .enumerate()
            .map(|(i, b)| {
                Ok(PlannedBatch {
                    size: match &b.size {
                        None => Share::Percent(100),
                        Some(v) => Share::parse(&format!("rollout.batches[{i}].size"), v)?,
                    },
                    sites: b.sites.clone(),
                })
            })
            .collect::<Result<_, String>>()?;
        let failure_threshold = match &r.failure_threshold {
            None => Share::parse("", &IntOrString::String(DEFAULT_FAILURE_THRESHOLD.into()))?,
            Some(v) => Share::parse("rollout.failureThreshold", v)?,
        };
        let wait = match &r.wait {
            None => None,
            Some(w) => {
                let d: jiff::SignedDuration = w
                    .parse()
                    .map_err(|e: jiff::Error| format!("rollout.wait {w:?}: {e}"))?;
                if d.is_negative() || d > jiff::SignedDuration::from_hours(24 * 30) {
                    return Err(format!("rollout.wait {w:?}: from nothing to 30 days"));
                }
                Some(
                    chrono::Duration::from_std(d.unsigned_abs())
                        .map_err(|e| format!("rollout.wait {w:?}: {e}"))?,
                )
            }
        };
        Ok(RolloutPlan {
            batches,
            failure_threshold,
            min_completed: r.min_completed.unwrap_or(DEFAULT_MIN_COMPLETED),
            wait,
            resume: r.resume,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<RolloutPlan, String> {
        let r: Rollout = serde_yaml_ng::from_str(yaml).unwrap();
        Rollout::plan(Some(&r))
    }

    #[test]
    fn a_job_without_a_rollout_is_gated() {
        let p = Rollout::plan(None).unwrap();
        let sizes: Vec<_> = p.batches.iter().map(|b| b.size).collect();
        assert_eq!(
            sizes,
            [Share::Count(1), Share::Percent(10), Share::Percent(100)]
        );
        assert_eq!(p.failure_threshold, Share::Percent(10));
        assert_eq!(p.min_completed, DEFAULT_MIN_COMPLETED);
        // A rollout that names no batches is gated the same way.
        assert_eq!(parse("{resume: 2}").unwrap().batches, p.batches);
    }

    #[test]
    fn sizes_are_counts_or_percentages_that_round_up() {
        let p = parse(
            "batches: [{size: 5, sites: [pilot]}, {size: '1%'}, {size: '7'}, {}]\n\
             failureThreshold: 3\nminCompleted: 4\nwait: 1h30m\n",
        )
        .unwrap();
        let sizes: Vec<_> = p.batches.iter().map(|b| b.size).collect();
        assert_eq!(
            sizes,
            [
                Share::Count(5),
                Share::Percent(1),
                Share::Count(7),
                Share::Percent(100)
            ]
        );
        assert_eq!(p.batches[0].sites, ["pilot"]);
        assert_eq!(
            (p.failure_threshold, p.min_completed, p.wait),
            (Share::Count(3), 4, Some(chrono::Duration::minutes(90)))
        );
        assert_eq!(Share::Percent(1).of(50), 1);
        assert_eq!(Share::Percent(10).of(5000), 500);
        assert_eq!(Share::Percent(10).of(0), 0);
        assert_eq!(Share::Count(5).of(3), 3);
    }

    #[test]
    fn a_rollout_that_cannot_be_read_names_the_field() {
        for (yaml, field) in [
            ("batches: [{size: 0}]", "rollout.batches[0].size 0"),
            (
                "batches: [{}, {size: '150%'}]",
                "rollout.batches[1].size \"150%\"",
            ),
            (
                "batches: [{size: 'half'}]",
                "rollout.batches[0].size \"half\"",
            ),
            ("failureThreshold: -1", "rollout.failureThreshold -1"),
            ("wait: soon", "rollout.wait \"soon\""),
            ("wait: '-5m'", "rollout.wait \"-5m\""),
            (
                "wait: 3000000000h",
                "rollout.wait \"3000000000h\": from nothing to 30 days",
            ),
            (
                "batches: [{size: 1}, {sites: [eu]}]",
                "rollout.batches[1].sites [\"eu\"]",
            ),
        ] {
            let e = parse(yaml).unwrap_err();
            assert!(e.contains(field), "{yaml}: {e}");
        }
    }
}
