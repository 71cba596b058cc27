//! libFuzzer entry point: see `bitsnap_fuzz::snapshot_header`. Headers may declare any
//! shape the format allows (up to `MAX_TENSOR_BYTES` per tensor); what is decoded goes
//! through the snapshot decode budget (`bitsnap_core::check_decode_budget`), as in the
//! stores, so a payload that declares more than the budget is refused before any output
//! is allocated (a regression shows as a `-malloc_limit_mb` crash).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bitsnap_fuzz::snapshot_header(data));
