//! libFuzzer entry point: see `bitsnap_fuzz::decode`. Inputs declare up to 2^34
//! elements; the decoder must refuse what its structure check refuses before allocating
//! (`-malloc_limit_mb=256` reports one that does not), and a valid payload declaring more
//! than `bitsnap_fuzz::MAX_FUZZ_BYTES` (8 MiB, the stand-in for the snapshot reader's
//! decoded-size budget) is only checked, never decoded.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bitsnap_fuzz::decode(bitsnap_core::codec::CodecId::GroupedDelta, data);
});
