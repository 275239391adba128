//! Any bytes an agent sends its relay as a report, or a relay sends the
//! controller as a batch, are refused or taken: the relay reads whose a
//! report claims to be, the controller verifies it (with a fixed agent key,
//! so nothing made up verifies); a report that parses prints and parses
//! back to itself.
#![no_main]

use caravan_api::{
    trust::{self, Envelope},
    wire::AgentReport,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
    if let Ok(report) = serde_json::from_slice::<AgentReport>(data) {
        let again: AgentReport = serde_json::from_slice(&serde_json::to_vec(&report).unwrap()).unwrap();
        assert_eq!(again, report);
    }
    if let Ok(batch) = serde_json::from_slice::<Vec<Envelope>>(data) {
        for envelope in &batch {
            if let Ok(agent) = trust::report_agent(envelope) {
                assert!(trust::verify_report(envelope, &key, &agent, 0).is_err());
            }
        }
    }
    if let Ok(envelope) = serde_json::from_slice::<Envelope>(data) {
        let _ = trust::report_agent(&envelope);
    }
});
