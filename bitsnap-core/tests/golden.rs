//! Golden bytes freeze the format (and the encoder's choices): a store written today must
//! produce exactly the committed version-2 files, and the committed files of every
//! version (1 and 2) must decode to the same tensors forever.
//! Regenerate the version-2 files (only with a format change, which needs a version bump)
//! with `BITSNAP_BLESS=1 cargo test --test golden`; version-1 files are never rewritten.

use std::path::PathBuf;

use bitsnap_core::format::{Entry, RefScope, Reference, SnapshotFile, SnapshotWriter};
use bitsnap_core::{DType, Decision, Lossiness, Policy, Role, Store, Tensor, codec::QuantBits};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn series() -> Vec<Vec<Tensor>> {
    let w: Vec<f32> = (0..600).map(|i| ((i as f32) * 0.37).sin() * 0.1).collect();
    let v: Vec<f32> = (0..256).map(|i| 1e-6 * (1.0 + (i % 13) as f32)).collect();
    let bf: Vec<u8> = (0..100u16)
        .flat_map(|i| half::bf16::from_f32(i as f32 * 0.5).to_le_bytes())
        .collect();
    let step = Tensor::new(
        "opt.step",
        DType::I64,
        vec![],
        Role::Other,
        7i64.to_le_bytes().to_vec(),
    )
    .unwrap();
    let first = vec![
        Tensor::from_f32("w", &[20, 30], Role::Weight, &w).unwrap(),
        Tensor::from_f32("opt.w.moment_2", &[256], Role::OptimizerMoment(2), &v).unwrap(),
        Tensor::new("emb", DType::BF16, vec![100], Role::Weight, bf.clone()).unwrap(),
        step,
    ];
    let mut second = first.clone();
    let mut w2 = w.clone();
    w2[5] += 0.25;
    w2[599] = -0.0;
    second[0] = Tensor::from_f32("w", &[20, 30], Role::Weight, &w2).unwrap();
    second[3] = Tensor::new(
        "opt.step",
        DType::I64,
        vec![],
        Role::Other,
        8i64.to_le_bytes().to_vec(),
    )
    .unwrap();
    vec![first, second]
}

fn policy() -> Policy {
    Policy::default().with_lossiness(Lossiness::LossyOptimizer {
        bits: QuantBits::B4,
    })
}

/// Writes the series into a fresh store; returns it and its snapshot files.
fn write_series() -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_or_create(dir.path(), policy()).unwrap();
    let mut written = Vec::new();
    for (i, tensors) in series().into_iter().enumerate() {
        let r = store.save(&format!("golden-{i}"), tensors).unwrap();
        written.push(dir.path().join(&r.info.file));
    }
    (dir, written)
}

/// Compares `bytes` with fixture `name` (writing it under `BITSNAP_BLESS`).
fn check_frozen(bytes: &[u8], name: &str) {
    let golden = fixtures().join(name);
    if std::env::var_os("BITSNAP_BLESS").is_some() {
        std::fs::write(&golden, bytes).unwrap();
    }
    let frozen =
        std::fs::read(&golden).expect("golden fixture missing: run with BITSNAP_BLESS=1 once");
    assert!(
        bytes == frozen,
        "{} differs: the on-disk format changed",
        golden.display()
    );
}

/// Loads every snapshot of `dir` with its files replaced by the fixtures `names` and
/// checks it against the series (moments dequantized).
fn fixtures_decode_to_the_series(written: &[PathBuf], names: &[String], version: u16) {
    let copy = tempfile::tempdir().unwrap();
    let dir = written[0].parent().unwrap();
    for f in std::fs::read_dir(dir).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), copy.path().join(f.file_name())).unwrap();
    }
    for (new, golden) in written.iter().zip(names) {
        let golden = fixtures().join(golden);
        assert_eq!(SnapshotFile::open(&golden).unwrap().version(), version);
        std::fs::copy(golden, copy.path().join(new.file_name().unwrap())).unwrap();
    }
    let store = Store::open(copy.path()).unwrap();
    for (i, expect) in series().iter().enumerate() {
        let snap = store.load(store.snapshots()[i].id).unwrap();
        assert_eq!(snap.tensors.len(), expect.len());
        for (got, want) in snap.tensors.iter().zip(expect) {
            if want.role.is_moment() {
                assert_eq!(got.shape, want.shape);
            } else {
                assert_eq!(got, want);
            }
        }
    }
    let report = store.verify().unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
}

#[test]
fn version_2_bytes_are_frozen() {
    let (_dir, written) = write_series();
    let names: Vec<String> = (0..written.len())
        .map(|i| format!("golden-v2-{i}.bsnap"))
        .collect();
    for (new, name) in written.iter().zip(&names) {
        let bytes = std::fs::read(new).unwrap();
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 2);
        check_frozen(&bytes, name);
    }
    fixtures_decode_to_the_series(&written, &names, 2);
}

#[test]
fn version_1_files_still_read() {
    let (_dir, written) = write_series();
    let names: Vec<String> = (0..written.len())
        .map(|i| format!("golden-v1-{i}.bsnap"))
        .collect();
    fixtures_decode_to_the_series(&written, &names, 1);
}

/// The v2 additions, frozen: a shard header's attempt nonce and an entry's references
/// extension (no codec emits references yet; the bytes are written by `SnapshotWriter`).
#[test]
fn version_2_extensions_are_frozen() {
    let path = std::path::Path::new("golden-v2-ext.bsnap");
    let mut w = SnapshotWriter::new(Vec::new(), path, 7, "ext", None).unwrap();
    w.set_attempt(0x0123_4567_89ab_cdef);
    w.set_metadata(vec![("k".into(), "v".into())]);
    let a: Vec<u8> = (0..16u8).collect();
    let entry = |name: &str, references: Vec<Reference>| Entry {
        name: name.into(),
        dtype: DType::U8,
        role: Role::Other,
        codec: bitsnap_core::codec::CodecId::Raw,
        shape: vec![16],
        offset: 0,
        len: 0,
        payload_hash: 0,
        raw_hash: xxhash_rust::xxh3::xxh3_64(&a),
        decision: Decision::default(),
        references,
    };
    // `b` references `a` (same snapshot): `a` is decoded first although listed second.
    w.push(
        entry(
            "b",
            vec![Reference {
                scope: RefScope::Snapshot,
                name: "a".into(),
            }],
        ),
        &a,
    )
    .unwrap();
    w.push(entry("a", Vec::new()), &a).unwrap();
    let (header, bytes) = w.finish().unwrap();
    check_frozen(&bytes, "golden-v2-ext.bsnap");
    let file = SnapshotFile::from_bytes(bytes, path).unwrap();
    assert_eq!(file.header, header);
    assert_eq!(file.header.attempt, 0x0123_4567_89ab_cdef);
    assert_eq!(file.header.decode_order(), vec![1, 0]);
    for e in &file.header.entries {
        assert_eq!(file.decode(e, None).unwrap(), a);
    }
}
