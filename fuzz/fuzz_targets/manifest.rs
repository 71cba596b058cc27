//! libFuzzer entry point: see `bitsnap_fuzz::manifest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bitsnap_fuzz::manifest(data));
