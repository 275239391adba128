//! Any byte string given to the archive reader the agent uses either extracts inside
//! the target directory or is refused; nothing is ever written beside it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = dir.path().join("out");
    let limits = caravan_archive::Limits::default();
    let checked = caravan_archive::check(data, &limits);
    let extracted = caravan_archive::extract(data, &out, &limits);
    // What the check pass refuses, extraction refuses too.
    assert!(
        checked.is_ok() || extracted.is_err(),
        "check refused what extract took: {checked:?}"
    );
    let beside: Vec<_> = std::fs::read_dir(dir.path())
        .expect("the directory is readable")
        .map(|e| e.expect("an entry").file_name())
        .filter(|n| n != "out")
        .collect();
    assert!(
        beside.is_empty(),
        "archive wrote outside its target: {beside:?}"
    );
});
