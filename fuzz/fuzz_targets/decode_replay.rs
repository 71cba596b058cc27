//! libFuzzer entry point: see `bitsnap_fuzz::decode_replay` (the optimizer-replay
//! decoder against deterministic base and referenced tensors).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bitsnap_fuzz::decode_replay(data);
});
