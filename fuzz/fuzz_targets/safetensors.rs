//! libFuzzer entry point: see `bitsnap_fuzz::safetensors`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bitsnap_fuzz::safetensors(data));
