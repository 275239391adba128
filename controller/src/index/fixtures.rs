//! Builders for the index's tests: each reads as the situation it sets up,
//! e.g. `job("j", &["hello"]).to_site_and_lower("hq")`.

use std::sync::Arc;

use caravan_api::{
    v1alpha1::*,
    wire::{AssignmentPhase, JobState},
    Digest,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt as _;

pub const NS: &str = "ns";

/// The time the tests compute for: noon on the fixtures' day.
pub fn now() -> chrono::DateTime<chrono::Utc> {
    at("12:00")
}

/// `hh:mm` on the fixtures' day.
pub fn at(time: &str) -> chrono::DateTime<chrono::Utc> {
    format!("2026-12-01T{time}:00Z").parse().expect("hh:mm")
}

fn meta(name: &str) -> kube::api::ObjectMeta {
    kube::api::ObjectMeta {
        name: Some(name.into()),
        namespace: Some(NS.into()),
        generation: Some(1),
        ..Default::default()
    }
}

/// Shares the objects as the caches hold them.
pub fn all<T>(items: impl IntoIterator<Item = T>) -> Vec<Arc<T>> {
    items.into_iter().map(Arc::new).collect()
}

/// The key of an object of the fixtures' namespace.
pub fn key(name: &str) -> (String, String) {
    (NS.into(), name.into())
}

pub fn site(name: &str) -> Site {
    Site {
        metadata: meta(name),
        spec: Default::default(),
        status: None,
    }
}

pub trait SiteFixture {
    fn below(self, parent: &str) -> Self;
}

impl SiteFixture for Site {
    fn below(mut self, parent: &str) -> Self {
        self.spec.parent = Some(parent.into());
        self
    }
}

/// An approved agent of `site`, labelled `ring: canary`.
pub fn agent(name: &str, site: &str) -> Agent {
    let mut a = Agent::new(
        name,
        AgentSpec {
            site: site.into(),
            host_id: format!("host-{name}"),
            hostname: String::new(),
            approved: true,
            secret_hash: String::new(),
            public_key: String::new(),
            replacement: None,
        },
    );
    a.metadata = meta(name);
    a.metadata.labels = Some([("ring".to_string(), "canary".to_string())].into());
    a
}

pub trait AgentFixture {
    fn unapproved(self) -> Self;
    /// The agent carries label `key: value` too.
    fn labelled(self, key: &str, value: &str) -> Self;
    /// The agent reports `phase` for job `ns/<job>`'s package `package` at `digest`.
    fn reporting(
        self,
        job: &str,
        package: &str,
        digest: Digest,
        phase: AssignmentPhase,
        message: &str,
    ) -> Self;
}

impl AgentFixture for Agent {
    fn unapproved(mut self) -> Self {
        self.spec.approved = false;
        self
    }

    fn labelled(mut self, key: &str, value: &str) -> Self {
        self.labels_mut().insert(key.into(), value.into());
        self
    }

    fn reporting(
        mut self,
        job: &str,
        package: &str,
        digest: Digest,
        phase: AssignmentPhase,
        message: &str,
    ) -> Self {
        self.status
            .get_or_insert_with(Default::default)
            .jobs
            .push(JobState {
                job: format!("{NS}/{job}"),
                package: package.into(),
                digest,
                action: JobAction::Install,
                phase,
                message: message.into(),
                time: String::new(),
                attempts: 0,
                retry_at: None,
            });
        self
    }
}

/// The digest of the artifact of `package(name, version)`.
pub fn digest_of(name: &str, version: &str) -> Digest {
    Digest::of(format!("{name}-{version}").as_bytes())
}

/// Package `name` `version` in cabinet `main`, 10 bytes.
pub fn package(name: &str, version: &str) -> Package {
    let mut p = Package::new(
        &format!("{name}-{version}"),
        PackageSpec {
            cabinet: "main".into(),
            name: name.into(),
            version: version.into(),
            artifact: Artifact {
                digest: digest_of(name, version),
                size: 10,
                manifest: None,
            },
            install: Default::default(),
            signatures: vec![],
            description: None,
        },
    );
    p.metadata = meta(&format!("{name}-{version}"));
    p
}

pub fn cabinet(name: &str) -> Cabinet {
    let mut c = Cabinet::new(
        name,
        CabinetSpec {
            store: Default::default(),
            description: None,
            trusted_keys: vec![],
            require_signatures: false,
        },
    );
    c.metadata = meta(name);
    c
}

pub trait CabinetFixture {
    fn http(self, url: &str) -> Self;
}

impl CabinetFixture for Cabinet {
    fn http(mut self, url: &str) -> Self {
        self.spec.store = CabinetStore {
            type_: StoreType::Http,
            url: Some(url.into()),
            ..Default::default()
        };
        self
    }
}

/// A job installing the highest version of each of `packages`, aimed nowhere yet.
pub fn job(name: &str, packages: &[&str]) -> DistributionJob {
    let mut j = DistributionJob::new(
        name,
        DistributionJobSpec {
            packages: packages
                .iter()
                .map(|p| PackageRef {
                    name: p.to_string(),
                    version: None,
                })
                .collect(),
            action: JobAction::Install,
            destinations: Default::default(),
            suspend: false,
            repair: false,
            allow_downgrade: false,
            priority: 0,
            retries: DEFAULT_RETRIES,
            retry: None,
            schedule: None,
            optional: false,
            deferral: None,
            // Everyone at once, unless a test says otherwise.
            rollout: Some(Rollout {
                batches: vec![Batch {
                    size: Some(IntOrString::String("100%".into())),
                    sites: vec![],
                }],
                ..Default::default()
            }),
        },
    );
    j.metadata = meta(name);
    j
}

pub trait JobFixture {
    fn to_site(self, site: &str) -> Self;
    /// An "all lower clients" job: the site and every site below it.
    fn to_site_and_lower(self, site: &str) -> Self;
    fn to_agent(self, agent: &str) -> Self;
    fn suspended(self) -> Self;
    fn at_version(self, package: &str, version: &str) -> Self;
    fn uninstalling(self) -> Self;
    fn with_priority(self, priority: i32) -> Self;
    /// Created at `hh:mm` on the fixtures' day.
    fn created_at(self, time: &str) -> Self;
    /// Installs from `not_before` to `deadline` (`hh:mm`) on the fixtures' day.
    fn scheduled(self, not_before: Option<&str>, deadline: Option<&str>) -> Self;
}

impl JobFixture for DistributionJob {
    fn to_site(mut self, site: &str) -> Self {
        self.spec.destinations.sites.push(SiteDestination {
            name: site.into(),
            include_lower: false,
        });
        self
    }

    fn to_site_and_lower(mut self, site: &str) -> Self {
        self.spec.destinations.sites.push(SiteDestination {
            name: site.into(),
            include_lower: true,
        });
        self
    }

    fn to_agent(mut self, agent: &str) -> Self {
        self.spec.destinations.agents.push(agent.into());
        self
    }

    fn suspended(mut self) -> Self {
        self.spec.suspend = true;
        self
    }

    fn at_version(mut self, package: &str, version: &str) -> Self {
        for r in self.spec.packages.iter_mut().filter(|r| r.name == package) {
            r.version = Some(version.into());
        }
        self
    }

    fn uninstalling(mut self) -> Self {
        self.spec.action = JobAction::Uninstall;
        self
    }

    fn with_priority(mut self, priority: i32) -> Self {
        self.spec.priority = priority;
        self
    }

    fn scheduled(mut self, not_before: Option<&str>, deadline: Option<&str>) -> Self {
        self.spec.schedule = Some(Schedule {
            not_before: not_before.map(at),
            deadline: deadline.map(at),
            ..Default::default()
        });
        self
    }

    fn created_at(mut self, time: &str) -> Self {
        let t = at(time).to_rfc3339().parse().expect("a time");
        self.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t));
        self
    }
}
