//! libFuzzer entry point: see `bitsnap_fuzz::decode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bitsnap_fuzz::decode(bitsnap_core::codec::CodecId::Planes, data);
});
