//! libFuzzer entry point: see `bitsnap_fuzz::snapshot_header`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bitsnap_fuzz::snapshot_header(data));
