//! Any bytes a relay (or anything posing as one) sends an agent as its
//! desired state (a document and the assignment lists it names) are
//! refused: no document verifies that the controller's key did not sign. And any payload the controller could sign prints and
//! parses back to itself, and the agent's plan over it never panics,
//! whatever it holds.
#![no_main]

use caravan_agent::{
    plan::{plan, Situation},
    state::{Installed, InstalledRecord},
};
use caravan_api::{
    trust::{verify_desired, Root},
    wire::{AgentDesired, AgentServed},
};
use libfuzzer_sys::fuzz_target;

fn root() -> &'static Root {
    static ROOT: std::sync::OnceLock<Root> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        Root::first(&Root::signed(1, &[&key]), None).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(served) = serde_json::from_slice::<AgentServed>(data) {
        let verdict = verify_desired(&served, root(), "a1", None, chrono::Utc::now());
        assert!(verdict.is_err(), "a document nobody signed was taken");
    }
    let Ok(desired) = serde_json::from_slice::<AgentDesired>(data) else {
        return;
    };
    let again: AgentDesired = serde_json::from_slice(&serde_json::to_vec(&desired).unwrap()).unwrap();
    assert_eq!(again, desired);
    // As if every other assignment were installed already, and everything live.
    let installed: Installed = desired
        .assignments
        .iter()
        .step_by(2)
        .map(|a| {
            let r = InstalledRecord {
                name: a.package.clone(),
                version: a.version.clone(),
                digest: a.digest,
                job: a.job.clone(),
                install: a.install.clone(),
                detected: false,
            };
            (a.package.clone(), r)
        })
        .collect();
    let live = installed.keys().cloned().collect();
    let drifted = Default::default();
    let waiting = Default::default();
    let not_applicable = Default::default();
    let (zone, choices) = (jiff::tz::TimeZone::UTC, Default::default());
    let p = plan(&Situation {
        desired: &desired,
        installed: &installed,
        live: &live,
        drifted: &drifted,
        waiting: &waiting,
        not_applicable: &not_applicable,
        now: chrono::Utc::now(),
        zone: &zone,
        choices: &choices,
    });
    assert!(desired.frozen || p.decisions.len() == desired.assignments.len());
});
