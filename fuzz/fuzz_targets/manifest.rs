//! Any text given to the Git sync's manifest parser is accepted or refused
//! with an error; it never panics, and what it accepts is placed in the
//! source's namespace.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(manifests) = caravan_controller::gitsource::parse_file("fuzz.yaml", text, "ns", "src")
    {
        for m in manifests {
            assert_eq!(m.object["metadata"]["namespace"], "ns");
        }
    }
});
