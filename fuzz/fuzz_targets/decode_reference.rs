//! libFuzzer entry point: see `bitsnap_fuzz::decode_reference` (the `cast` and
//! `identical` reference decoders against a deterministic referenced tensor).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bitsnap_fuzz::decode_reference(data);
});
