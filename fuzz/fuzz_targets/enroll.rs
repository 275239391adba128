//! Any bytes sent to enroll (by an agent at a relay, by a relay at the
//! controller) are refused or taken: the host ID rule decides on any text
//! without panicking (an accepted host ID is a valid label value), and a
//! bootstrap token parses only in its one shape, naming an object.
#![no_main]

use caravan_api::{
    names,
    v1alpha1::{TokenString, TOKEN_ID_HEX},
    wire::SiteEnroll,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(SiteEnroll {
        bootstrap_token,
        request: req,
    }) = serde_json::from_slice::<SiteEnroll>(data)
    else {
        return;
    };
    if names::host_id(&req.host_id).is_ok() {
        assert!(names::object_name(&req.host_id).is_ok(), "{:?}", req.host_id);
    }
    let _ = names::package_name(&req.hostname);
    if let Ok(token) = TokenString::parse(&bootstrap_token) {
        assert_eq!(token.id.len(), TOKEN_ID_HEX);
        assert!(names::object_name(&token.id).is_ok(), "{}", token.id);
        assert_eq!(token.to_string(), bootstrap_token);
    }
});
