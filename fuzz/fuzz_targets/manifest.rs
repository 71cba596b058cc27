//! libFuzzer entry point: see `bitsnap_fuzz::manifest`. A manifest that opens lists
//! only snapshot file names the store generates (FORMAT.md 1).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bitsnap_fuzz::manifest(data));
