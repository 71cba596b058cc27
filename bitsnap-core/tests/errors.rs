//! Corrupted, truncated and hostile files: every one gives a clear error naming the file
//! (and the tensor where there is one), never a panic, never wrong data.

mod common;

use std::path::{Path, PathBuf};

use bitsnap_core::format::{Header, SnapshotFile};
use bitsnap_core::{DType, Error, Policy, Role, Store};
use common::{mutate, random_tensor};

/// A store with a full snapshot and a delta on it; returns the dir and both files.
fn two_snapshots() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    let a = random_tensor("layer.weight", DType::F32, &[300], Role::Weight, 1);
    let b = random_tensor("layer.bias", DType::BF16, &[40], Role::Weight, 2);
    let s0 = store.save("s0", vec![a.clone(), b.clone()]).unwrap();
    let s1 = store
        .save("s1", vec![mutate(&a, 50, 3), mutate(&b, 500, 4)])
        .unwrap();
    assert!(s1.info.base.is_some());
    let f0 = dir.path().join(&s0.info.file);
    let f1 = dir.path().join(&s1.info.file);
    (dir, f0, f1)
}

fn load_all(dir: &Path) -> Result<(), Error> {
    let store = Store::open(dir)?;
    for s in store.snapshots() {
        store.load(s.id)?;
    }
    Ok(())
}

#[test]
fn every_flipped_byte_is_detected() {
    let (dir, f0, f1) = two_snapshots();
    for file in [&f0, &f1] {
        let good = std::fs::read(file).unwrap();
        for pos in 0..good.len() {
            let mut bad = good.clone();
            bad[pos] ^= 0x5a;
            std::fs::write(file, &bad).unwrap();
            let err = load_all(dir.path()).expect_err(&format!(
                "flip at {pos} of {} went unnoticed",
                file.display()
            ));
            let msg = err.to_string();
            assert!(
                msg.contains(&file.display().to_string()),
                "message does not name the file: {msg}"
            );
        }
        std::fs::write(file, &good).unwrap();
    }
    load_all(dir.path()).unwrap();
}

#[test]
fn every_truncation_is_detected() {
    let (dir, _f0, f1) = two_snapshots();
    let good = std::fs::read(&f1).unwrap();
    for len in 0..good.len() {
        std::fs::write(&f1, &good[..len]).unwrap();
        let err = load_all(dir.path()).expect_err("truncated file accepted");
        assert!(err.to_string().contains(&f1.display().to_string()), "{err}");
    }
}

#[test]
fn corrupted_payload_names_file_tensor_and_offset() {
    let (dir, f0, _) = two_snapshots();
    let file = SnapshotFile::open(&f0).unwrap();
    let entry = file
        .header
        .entries
        .iter()
        .find(|e| e.name == "layer.bias")
        .unwrap()
        .clone();
    let mut bytes = std::fs::read(&f0).unwrap();
    bytes[entry.offset as usize + 3] ^= 1;
    std::fs::write(&f0, &bytes).unwrap();
    let err = Store::open(dir.path()).unwrap().load(1).unwrap_err();
    match &err {
        Error::Checksum {
            tensor,
            what,
            offset,
            ..
        } => {
            assert_eq!(tensor.as_deref(), Some("layer.bias"));
            assert_eq!(*what, "payload");
            assert_eq!(*offset, entry.offset);
        }
        other => panic!("expected a payload checksum error, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("layer.bias") && msg.contains(&f0.display().to_string()),
        "{msg}"
    );
}

#[test]
fn missing_base_is_named() {
    let (dir, f0, f1) = two_snapshots();
    std::fs::remove_file(&f0).unwrap();
    let store = Store::open(dir.path()).unwrap();
    let err = store.load(2).unwrap_err();
    assert!(err.to_string().contains(&f0.display().to_string()), "{err}");
    // verify names the failures and does not stop at the first.
    let report = store.verify().unwrap();
    assert_eq!(report.failed.len(), 2);
    let _ = f1;
}

#[test]
fn a_base_replaced_by_another_snapshot_is_refused() {
    let (dir, f0, _) = two_snapshots();
    // Overwrite snapshot 1 with a valid snapshot of different content but the same id.
    let other = tempfile::tempdir().unwrap();
    let mut s = Store::open_or_create(other.path(), Policy::default()).unwrap();
    let r = s
        .save(
            "x",
            vec![random_tensor(
                "layer.weight",
                DType::F32,
                &[300],
                Role::Weight,
                77,
            )],
        )
        .unwrap();
    std::fs::copy(other.path().join(&r.info.file), &f0).unwrap();
    let store = Store::open(dir.path()).unwrap();
    let err = store.load(2).unwrap_err();
    assert!(matches!(err, Error::MissingBase { .. }), "{err:?}");
}

fn rewrite_header(path: &Path, edit: impl FnOnce(&mut Header)) {
    let file = SnapshotFile::open(path).unwrap();
    let mut header = file.header.clone();
    edit(&mut header);
    let bytes = std::fs::read(path).unwrap();
    let trailer = &bytes[bytes.len() - bitsnap_core::format::TRAILER_BYTES..];
    let data_end = u64::from_le_bytes(trailer[..8].try_into().unwrap()) as usize;
    let body = bitsnap_core::format::encode_header_region(&header.encode());
    let mut out = bytes[..data_end].to_vec();
    out.extend_from_slice(&body);
    out.extend_from_slice(&(data_end as u64).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&body).to_le_bytes());
    out.extend_from_slice(&bitsnap_core::format::END_MAGIC);
    std::fs::write(path, out).unwrap();
}

#[test]
fn absurd_sizes_in_a_checksummed_header_are_refused_before_allocating() {
    let (_dir, f0, _) = two_snapshots();
    let good = std::fs::read(&f0).unwrap();
    rewrite_header(&f0, |h| h.entries[0].shape = vec![1 << 40, 1 << 30]);
    let err = SnapshotFile::open(&f0).unwrap_err();
    assert!(err.to_string().contains("layer.weight"), "{err}");
    std::fs::write(&f0, &good).unwrap();
    rewrite_header(&f0, |h| h.entries[0].shape = vec![u64::MAX, 3]);
    assert!(SnapshotFile::open(&f0).is_err());
}

#[test]
fn payloads_must_tile_the_data_section() {
    let (_dir, f0, _) = two_snapshots();
    rewrite_header(&f0, |h| h.entries[1].offset -= 1);
    let err = SnapshotFile::open(&f0).unwrap_err();
    assert!(matches!(err, Error::Malformed { .. }), "{err:?}");
}

#[test]
fn unknown_version_and_foreign_files_are_refused() {
    let (_dir, f0, _) = two_snapshots();
    let mut bytes = std::fs::read(&f0).unwrap();
    bytes[8] = 9;
    std::fs::write(&f0, &bytes).unwrap();
    let err = SnapshotFile::open(&f0).unwrap_err();
    assert!(
        matches!(err, Error::UnsupportedVersion { version: 9, .. }),
        "{err:?}"
    );
    std::fs::write(&f0, b"{\"not\": \"a snapshot\"}").unwrap();
    assert!(matches!(
        SnapshotFile::open(&f0).unwrap_err(),
        Error::BadMagic { .. }
    ));
    std::fs::write(&f0, b"").unwrap();
    assert!(matches!(
        SnapshotFile::open(&f0).unwrap_err(),
        Error::Truncated { .. }
    ));
}

#[test]
fn corrupted_manifest_is_refused_by_name() {
    let (dir, _, _) = two_snapshots();
    let path = dir.path().join(bitsnap_core::MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"s1\"", "\"s2\"")).unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Checksum {
                what: "manifest",
                ..
            }
        ),
        "{err:?}"
    );
    std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("MANIFEST"), "{err}");
}

#[test]
fn a_second_writer_is_refused() {
    let (dir, _, _) = two_snapshots();
    let mut a = Store::open(dir.path()).unwrap();
    let mut b = Store::open(dir.path()).unwrap();
    let t = random_tensor("x", DType::U8, &[10], Role::Other, 1);
    a.save("a", vec![t.clone()]).unwrap();
    let err = b.save("b", vec![t]).unwrap_err();
    assert!(err.to_string().contains("another process"), "{err}");
}

#[test]
fn debris_of_an_interrupted_save_is_cleaned_and_ignored() {
    let (dir, f0, _) = two_snapshots();
    // What a crash between "rename snapshot" and "rename manifest" leaves behind.
    std::fs::copy(&f0, dir.path().join("snap-00000000000000000003.bsnap")).unwrap();
    std::fs::write(
        dir.path().join("snap-00000000000000000004.bsnap.tmp"),
        b"partial",
    )
    .unwrap();
    std::fs::write(dir.path().join("MANIFEST.9.tmp"), b"{").unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    assert_eq!(store.snapshots().len(), 2);
    assert_eq!(store.verify().unwrap().orphans.len(), 3);
    let t = random_tensor("x", DType::U8, &[10], Role::Other, 1);
    let r = store.save("after", vec![t.clone()]).unwrap();
    assert_eq!(r.info.id, 3);
    let reopened = Store::open(dir.path()).unwrap();
    assert!(reopened.verify().unwrap().orphans.is_empty());
    assert_eq!(reopened.load(3).unwrap().tensors, vec![t]);
    load_all(dir.path()).unwrap();
}

#[test]
fn invalid_tensors_are_refused_with_their_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    let mut t = random_tensor("w", DType::F32, &[10], Role::Weight, 1);
    t.data.pop();
    let err = store.save("bad", vec![t]).unwrap_err();
    assert!(err.to_string().contains("`w`"), "{err}");
    let t = random_tensor("dup", DType::F32, &[10], Role::Weight, 1);
    assert!(store.save("bad", vec![t.clone(), t]).is_err());
    assert!(store.snapshots().is_empty());
}

/// Regression (review): a save whose metadata the reader would refuse must fail, not
/// write an unreadable snapshot.
#[test]
fn metadata_over_the_limits_is_refused_at_save() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    let t = random_tensor("w", DType::F32, &[10], Role::Weight, 1);
    let long_key = vec![("k".repeat(80_000), "v".to_string())];
    assert!(
        store
            .save_with_metadata("a", vec![t.clone()], long_key)
            .is_err()
    );
    let many: Vec<(String, String)> = (0..70_000)
        .map(|i| (format!("k{i}"), String::new()))
        .collect();
    assert!(
        store
            .save_with_metadata("b", vec![t.clone()], many)
            .is_err()
    );
    assert!(store.snapshots().is_empty());
    store.save("ok", vec![t]).unwrap();
    load_all(dir.path()).unwrap();
}

/// Regression (review): a tiny file declaring a huge raw tensor is refused before the
/// output is allocated.
#[test]
fn a_huge_tensor_declared_by_a_tiny_payload_is_refused_before_allocating() {
    let (_dir, f0, _) = two_snapshots();
    rewrite_header(&f0, |h| {
        h.entries[0].shape = vec![1 << 32];
        h.entries[0].dtype = DType::F32;
        h.entries[0].codec = bitsnap_core::codec::CodecId::Raw;
    });
    let file = SnapshotFile::open(&f0).unwrap();
    let start = std::time::Instant::now();
    let err = file.decode(&file.header.entries[0], None).unwrap_err();
    assert!(
        start.elapsed() < std::time::Duration::from_secs(1),
        "took {:?}",
        start.elapsed()
    );
    assert!(err.to_string().contains("layer.weight"), "{err}");
}

/// Regression (review): manifests of the default series carry no `series` field, and
/// files that predate the field open.
#[test]
fn manifests_without_series_open() {
    let (dir, _, _) = two_snapshots();
    let text = std::fs::read_to_string(dir.path().join(bitsnap_core::MANIFEST_FILE)).unwrap();
    assert!(!text.contains("series"), "{text}");
    assert_eq!(Store::open(dir.path()).unwrap().snapshots().len(), 2);
}

/// Regression (review): creating a store where snapshot files lie without a manifest
/// refuses instead of deleting them as debris.
#[test]
fn creating_a_store_over_snapshot_files_without_manifest_refuses() {
    let (dir, f0, _) = two_snapshots();
    std::fs::remove_file(dir.path().join(bitsnap_core::MANIFEST_FILE)).unwrap();
    let err = Store::open_or_create(dir.path(), Policy::default()).unwrap_err();
    assert!(err.to_string().contains("no MANIFEST"), "{err}");
    assert!(f0.exists());
}
