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

/// Two handles on one store both write: the lock covers each commit only (the lock
/// error and its wait are tested in `concurrency.rs`).
#[test]
fn a_second_writer_commits_too() {
    let (dir, _, _) = two_snapshots();
    let mut a = Store::open(dir.path()).unwrap();
    let mut b = Store::open(dir.path()).unwrap();
    let t = random_tensor("x", DType::U8, &[10], Role::Other, 1);
    let ra = a.save("a", vec![t.clone()]).unwrap();
    let rb = b.save("b", vec![t]).unwrap();
    assert_eq!((ra.info.id, rb.info.id), (3, 4));
    assert_eq!(Store::open(dir.path()).unwrap().snapshots().len(), 4);
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
    // Refused by the payload's structure (a raw payload must hold every byte), before
    // the 16 GiB output is asked for; limits.rs bounds the allocations themselves.
    let err = file.decode(&file.header.entries[0], None).unwrap_err();
    assert!(
        matches!(&err, Error::Malformed { tensor: Some(t), what: "payload", .. } if t == "layer.weight"),
        "{err:?}"
    );
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
    assert!(
        matches!(&err, Error::NotAStore { store, file } if store == dir.path() && file == &f0),
        "{err:?}"
    );
    assert!(f0.exists());
}

/// The manifest's text with `edit` applied and its checksum recomputed (xxh3 of the
/// compact JSON of everything but the checksum, FORMAT.md 4).
fn rewrite_manifest(dir: &Path, edit: impl FnOnce(String) -> String) {
    let path = dir.join(bitsnap_core::MANIFEST_FILE);
    let text = edit(std::fs::read_to_string(&path).unwrap());
    let mut compact = String::new();
    let mut in_string = false;
    let mut escaped = false;
    for c in text.chars() {
        if in_string {
            compact.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
            compact.push(c);
        } else if !c.is_whitespace() {
            compact.push(c);
        }
    }
    let at = compact.find(",\"checksum\":").unwrap();
    let body = format!("{}}}", &compact[..at]);
    let sum = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(body.as_bytes()));
    let old = &compact[at + 13..at + 13 + 16];
    std::fs::write(&path, text.replace(old, &sum)).unwrap();
}

/// Regression (#14.5): a crafted manifest listing `MANIFEST`, the lock file, a
/// directory, `../x` or another snapshot's name as a snapshot file opened, and `delete`
/// then removed the manifest it had just written.
#[test]
fn manifests_listing_files_the_store_does_not_generate_are_refused() {
    let (dir, _, f1) = two_snapshots();
    let name = f1.file_name().unwrap().to_str().unwrap().to_string();
    // The helper itself keeps a valid manifest valid.
    rewrite_manifest(dir.path(), |t| t);
    Store::open(dir.path()).unwrap();
    let good = std::fs::read(dir.path().join(bitsnap_core::MANIFEST_FILE)).unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    for bad in [
        bitsnap_core::MANIFEST_FILE,
        bitsnap_core::LOCK_FILE,
        "sub",
        "../x",
        ".",
        "snap-00000000000000000001.bsnap", // snapshot 1's file, listed for snapshot 2
        "snap-00000000000000000002-s00000.bsnap",
    ] {
        std::fs::write(dir.path().join(bitsnap_core::MANIFEST_FILE), &good).unwrap();
        rewrite_manifest(dir.path(), |t| {
            t.replace(&format!("\"{name}\""), &format!("\"{bad}\""))
        });
        let err = Store::open(dir.path()).unwrap_err();
        match &err {
            Error::Malformed {
                what: "manifest",
                reason,
                ..
            } => assert!(reason.contains(bad), "{err}"),
            other => panic!("`{bad}` accepted: {other:?}"),
        }
    }
    std::fs::write(dir.path().join(bitsnap_core::MANIFEST_FILE), &good).unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    store.delete(2).unwrap();
    assert!(dir.path().join(bitsnap_core::MANIFEST_FILE).exists());
}

#[test]
fn unknown_snapshots_are_named() {
    let (dir, _, _) = two_snapshots();
    let store = Store::open(dir.path()).unwrap();
    let err = store.load(99).unwrap_err();
    assert!(
        matches!(&err, Error::UnknownSnapshot { store: s, snapshot } if s == dir.path() && snapshot == "99"),
        "{err:?}"
    );
    assert!(store.restore_chains(99).is_err());
}

#[test]
fn impossible_allocations_fail_instead_of_aborting() {
    use bitsnap_core::backend::{Backend, LocalDir};
    let (dir, f0, _) = two_snapshots();
    let local = LocalDir::new(dir.path());
    let name = f0.file_name().unwrap().to_str().unwrap();
    let err = local.read_range(name, 0..u64::MAX).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Alloc {
                bytes: u64::MAX,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn invalid_tensors_are_the_invalid_tensor_variant() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    let t = random_tensor("dup", DType::F32, &[10], Role::Weight, 1);
    let err = store.save("bad", vec![t.clone(), t]).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidTensor { tensor, .. } if tensor == "dup"),
        "{err:?}"
    );
}

/// The variants that replaced `Error::Config`, one negative test each.
#[test]
fn option_errors_are_specific() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    let t = random_tensor("w", DType::F32, &[10], Role::Weight, 1);
    // InputLimit: a snapshot name and metadata over the format's limits.
    let err = store.save(&"n".repeat(5000), vec![t.clone()]).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::InputLimit {
                value: 5000,
                limit: 4096,
                ..
            }
        ),
        "{err:?}"
    );
    let err = store
        .save_with_metadata(
            "m",
            vec![t.clone()],
            vec![("k".repeat(5000), String::new())],
        )
        .unwrap_err();
    assert!(
        matches!(&err, Error::InputLimit { what, .. } if what.contains("metadata key")),
        "{err:?}"
    );
    // InvalidRank.
    let err = store
        .save_shard("s", 5, "x", 2, 2, vec![t.clone()], Vec::new())
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidRank {
                rank: 2,
                world: 2,
                ..
            }
        ),
        "{err:?}"
    );
    // WrongKind: a sharded snapshot's single file; a shard of an unsharded snapshot.
    let plain = store.save("plain", vec![t.clone()]).unwrap().info.id;
    let id = store.snapshots().len() as u64 + 5;
    let mut shard_writer = Store::open(dir.path()).unwrap();
    shard_writer
        .save_shard("s", id, "sharded", 0, 1, vec![t.clone()], Vec::new())
        .unwrap();
    store
        .commit_sharded("s", id, "sharded", 1, std::time::Duration::from_secs(5))
        .unwrap();
    let err = store.open_file(id).unwrap_err();
    assert!(
        matches!(err, Error::WrongKind { snapshot, .. } if snapshot == id),
        "{err:?}"
    );
    let err = store.load_shard(plain, 0).unwrap_err();
    assert!(
        matches!(err, Error::WrongKind { snapshot, .. } if snapshot == plain),
        "{err:?}"
    );
    // InUse: the base of shard deltas cannot be deleted.
    let big = random_tensor("big", DType::F32, &[10_000], Role::Weight, 3);
    let mut next = Store::open(dir.path()).unwrap();
    for (k, t) in [big.clone(), mutate(&big, 5, 4)].into_iter().enumerate() {
        let sid = id + 1 + k as u64;
        next.save_shard("big", sid, "b", 0, 1, vec![t], Vec::new())
            .unwrap();
        store
            .commit_sharded("big", sid, "b", 1, std::time::Duration::from_secs(5))
            .unwrap();
    }
    assert_eq!(store.get(id + 2).unwrap().shards[0].base, Some(id + 1));
    let err = store.delete(id + 1).unwrap_err();
    assert!(
        matches!(err, Error::InUse { snapshot, user, .. } if snapshot == id + 1 && user == id + 2),
        "{err:?}"
    );
    // Json: a manifest that is not JSON keeps serde_json's error as its source.
    let path = dir.path().join(bitsnap_core::MANIFEST_FILE);
    std::fs::write(&path, b"{\"version\": 1,").unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Json {
                what: "manifest",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(std::error::Error::source(&err).is_some());
    // InvalidLocation: a path with no file name to write safetensors to.
    let err = bitsnap_core::safetensors::write_file(Path::new("/"), &[], &[]).unwrap_err();
    assert!(matches!(err, Error::InvalidLocation { .. }), "{err:?}");
}
