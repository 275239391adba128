//! Any bytes an agent sends its relay as a report, or a relay sends the
//! controller as a batch, are refused or taken; what is taken prints and
//! parses back to itself.
#![no_main]

use caravan_api::wire::AgentReport;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(report) = serde_json::from_slice::<AgentReport>(data) {
        let again: AgentReport = serde_json::from_slice(&serde_json::to_vec(&report).unwrap()).unwrap();
        assert_eq!(again, report);
    }
    if let Ok(batch) = serde_json::from_slice::<Vec<AgentReport>>(data) {
        let again: Vec<AgentReport> = serde_json::from_slice(&serde_json::to_vec(&batch).unwrap()).unwrap();
        assert_eq!(again, batch);
    }
});
