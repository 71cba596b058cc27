//! Readers and writers of one store at the same time: readers never wait for a save, and
//! a second writer gets a clear error instead of waiting or corrupting the store.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bitsnap_core::{DType, Error, Policy, Role, Store};
use common::random_tensor;

/// While one thread saves large snapshots, another opens the store and lists, chains and
/// loads its first snapshot over and over: some of those reads must complete while a
/// save is in progress (they would all wait for it if readers took the writer lock).
#[test]
fn readers_do_not_wait_for_a_save() {
    let dir = tempfile::tempdir().unwrap();
    let small = random_tensor("w", DType::F32, &[1024], Role::Weight, 1);
    let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    store.save("first", vec![small.clone()]).unwrap();
    let saving = Arc::new(AtomicBool::new(true));
    let during = Arc::new(AtomicUsize::new(0));
    let writer = {
        let saving = saving.clone();
        std::thread::spawn(move || {
            // Random data (incompressible): each save encodes and fsyncs 32 MB.
            for step in 0..3u64 {
                let big = random_tensor("big", DType::F32, &[8 << 20], Role::Weight, step + 2);
                store.save(&format!("big-{step}"), vec![big]).unwrap();
            }
            saving.store(false, Ordering::SeqCst);
            store
        })
    };
    let mut reads = 0;
    while saving.load(Ordering::SeqCst) {
        let reader = Store::open(dir.path()).unwrap();
        assert!(!reader.snapshots().is_empty());
        assert_eq!(reader.chain(1).unwrap(), vec![1]);
        let snap = reader.load(1).unwrap();
        assert_eq!(snap.tensors, vec![small.clone()]);
        reads += 1;
        // Counted only if the save was still running after the read finished.
        if saving.load(Ordering::SeqCst) {
            during.fetch_add(1, Ordering::SeqCst);
        }
    }
    let store = writer.join().unwrap();
    assert_eq!(store.snapshots().len(), 4);
    assert!(
        during.load(Ordering::SeqCst) >= 1,
        "no read completed during the saves ({reads} reads in all)"
    );
    // Every snapshot the writer committed reads back.
    let reader = Store::open(dir.path()).unwrap();
    assert!(reader.verify().unwrap().failed.is_empty());
}

/// A second writer on a store whose writer lock is held fails at once, naming the lock
/// file and saying why, and the first writer's saves are unaffected.
#[test]
fn a_second_writer_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let t = random_tensor("w", DType::F32, &[1024], Role::Weight, 9);
    let mut first = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    first.save("a", vec![t.clone()]).unwrap();
    let mut second = Store::open(dir.path()).unwrap();
    match second.save("b", vec![t.clone()]) {
        Err(Error::Io { path, source }) => {
            assert!(path.ends_with(bitsnap_core::LOCK_FILE), "{path:?}");
            assert_eq!(source.kind(), std::io::ErrorKind::WouldBlock);
            assert!(source.to_string().contains("another process is writing"));
        }
        other => panic!("expected a lock error, got {other:?}"),
    }
    first.save("c", vec![t]).unwrap();
    let names: Vec<String> = Store::open(dir.path())
        .unwrap()
        .snapshots()
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(names, ["a", "c"]);
}
