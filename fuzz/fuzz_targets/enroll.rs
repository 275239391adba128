//! Any bytes sent to enroll (by an agent at a relay, by a relay at the
//! controller) are refused or taken, and the host ID rule decides on any
//! text without panicking; an accepted host ID is a valid label value.
#![no_main]

use caravan_api::{names, wire::EnrollRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = serde_json::from_slice::<EnrollRequest>(data) else {
        return;
    };
    if names::host_id(&req.host_id).is_ok() {
        assert!(names::object_name(&req.host_id).is_ok(), "{:?}", req.host_id);
    }
    let _ = names::package_name(&req.hostname);
});
