//! The decode budget (issue #14.3): a snapshot's decoded size is checked against the
//! store's budget before anything is decoded, with an error naming file and tensor.

mod common;

use std::path::Path;

use bitsnap_core::codec::{Codec, CodecId, EncodeInput, Planes};
use bitsnap_core::format::{Decision, Entry, SnapshotWriter};
use bitsnap_core::{DType, Error, Policy, Role, Store, Tensor};
use common::{mutate, random_tensor};

/// Elements per chunk the reader accepts at most (`codec::chunks::MAX_CHUNK_BYTES`).
const MAX_CHUNK_ELEMS: u32 = 1 << 26;

/// A planes payload of `chunks` chunks of `chunk_elems` f32 zeros each: every chunk body
/// is the same few bytes of constant planes, whatever the chunk's length.
fn constant_planes(chunk_elems: u32, chunks: u32) -> Vec<u8> {
    let zeros = vec![0u8; 4 * 1024];
    let input = EncodeInput {
        shape: &[],
        dtype: DType::F32,
        role: Role::Weight,
        data: &zeros,
        base: None,
    };
    let one = Planes::default().encode(&input).unwrap().unwrap().payload;
    // One chunk: [elems][count = 1][body length][body].
    assert_eq!(one[4..8], 1u32.to_le_bytes());
    let len = u32::from_le_bytes(one[8..12].try_into().unwrap());
    let body = &one[12..12 + len as usize];
    let mut out = chunk_elems.to_le_bytes().to_vec();
    out.extend_from_slice(&chunks.to_le_bytes());
    (0..chunks).for_each(|_| out.extend_from_slice(&len.to_le_bytes()));
    (0..chunks).for_each(|_| out.extend_from_slice(body));
    out
}

/// Replaces snapshot `id`'s file in `dir` with a one-tensor snapshot `huge` whose
/// payload is `payload` (planes) declaring `numel` f32 elements.
fn plant(dir: &Path, file: &str, id: u64, payload: &[u8], numel: u64) {
    let path = dir.join(file);
    let mut w = SnapshotWriter::new(Vec::new(), &path, id, "planted", None).unwrap();
    let entry = Entry {
        name: "huge".into(),
        dtype: DType::F32,
        role: Role::Weight,
        codec: CodecId::Planes,
        shape: vec![numel],
        offset: 0,
        len: 0,
        payload_hash: 0,
        raw_hash: 0,
        decision: Decision::default(),
        references: Vec::new(),
    };
    w.push(entry, payload).unwrap();
    let (_, bytes) = w.finish().unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn the_crafted_payload_really_amplifies() {
    // The construction decodes: 2 chunks of 1024 zeros from a payload that would be as
    // small for chunks of 2^26.
    let small = constant_planes(1024, 2);
    let out = bitsnap_core::codec::decode(CodecId::Planes, &small, DType::F32, 2048, None).unwrap();
    assert_eq!(out, vec![0u8; 2048 * 4]);
    let huge = constant_planes(MAX_CHUNK_ELEMS, 256);
    // Measured: 7 176 bytes (8 + 256 x 28) declaring 64 GiB.
    assert!(huge.len() < 8 << 10, "{} bytes", huge.len());
}

/// Regression (#14.3): a ~6 KB payload declaring a 64 GiB tensor was decoded (and its
/// output allocated, aborting the process) with no per-snapshot budget.
#[test]
fn a_tiny_payload_declaring_64_gib_is_refused_by_the_default_budget() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    let t = random_tensor("w", DType::F32, &[16], Role::Weight, 1);
    let s = store.save("small", vec![t]).unwrap();
    let numel = 256 * MAX_CHUNK_ELEMS as u64; // 64 GiB of f32
    plant(
        dir.path(),
        &s.info.file,
        s.info.id,
        &constant_planes(MAX_CHUNK_ELEMS, 256),
        numel,
    );
    let store = Store::open(dir.path()).unwrap();
    assert!(
        store.decode_budget() < 64 << 30,
        "this test needs less than 128 GiB of RAM"
    );
    match store.load(s.info.id).unwrap_err() {
        Error::Budget {
            file,
            tensor,
            needed,
            budget,
        } => {
            assert_eq!(file, dir.path().join(&s.info.file));
            assert_eq!(tensor, "huge");
            assert_eq!(needed, numel * 4);
            assert_eq!(budget, store.decode_budget());
        }
        other => panic!("expected a budget error, got {other:?}"),
    }
    // verify goes through the same check.
    let report = store.verify().unwrap();
    assert!(
        matches!(report.failed.as_slice(), [(_, Error::Budget { .. })]),
        "{:?}",
        report.failed
    );
}

/// The budget is the store's, settable, and counts the base a delta is decoded against.
#[test]
fn the_budget_is_settable_and_counts_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    let a = random_tensor("w", DType::F32, &[25_000], Role::Weight, 1); // 100 000 bytes
    let first = store.save("a", vec![a.clone()]).unwrap();
    let second = store.save("b", vec![mutate(&a, 5, 2)]).unwrap();
    assert_eq!(second.info.base, Some(first.info.id));
    // The full snapshot needs 100 000 bytes; the delta 200 000 (its base is held while
    // it decodes).
    let store = Store::open(dir.path()).unwrap().with_decode_budget(150_000);
    assert_eq!(store.decode_budget(), 150_000);
    assert_eq!(store.load(first.info.id).unwrap().tensors[0], a);
    match store.load(second.info.id).unwrap_err() {
        Error::Budget {
            tensor,
            needed,
            budget,
            file,
        } => {
            assert_eq!((tensor.as_str(), needed, budget), ("w", 200_000, 150_000));
            assert_eq!(file, dir.path().join(&second.info.file));
        }
        other => panic!("expected a budget error, got {other:?}"),
    }
    let mut store = store;
    store.set_decode_budget(200_000);
    store.load(second.info.id).unwrap();
    assert!(bitsnap_core::default_decode_budget() > 0);
}

/// A store's own tensors round-trip under the default budget.
#[test]
fn ordinary_snapshots_fit_the_default_budget() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    let t = Tensor::from_f32("x", &[3], Role::Weight, &[1.0, 2.0, 3.0]).unwrap();
    let s = store.save("x", vec![t.clone()]).unwrap();
    assert_eq!(
        Store::open(dir.path())
            .unwrap()
            .load(s.info.id)
            .unwrap()
            .tensors,
        vec![t]
    );
}
