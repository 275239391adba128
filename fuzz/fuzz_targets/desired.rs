//! Any bytes a relay (or anything posing as one) sends an agent as its
//! desired state are refused or taken; what is taken prints and parses back
//! to itself, and the agent's plan over it never panics, whatever it holds.
#![no_main]

use caravan_agent::{
    plan::{plan, Situation},
    state::{Installed, InstalledRecord},
};
use caravan_api::wire::AgentDesired;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
            };
            (a.package.clone(), r)
        })
        .collect();
    let live = installed.keys().cloned().collect();
    let drifted = Default::default();
    let waiting = Default::default();
    let p = plan(&Situation {
        desired: &desired,
        installed: &installed,
        live: &live,
        drifted: &drifted,
        waiting: &waiting,
    });
    assert!(desired.frozen || p.decisions.len() == desired.assignments.len());
});
