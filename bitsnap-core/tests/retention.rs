//! Retention without re-encoding: deletes retire what a kept delta reads, prune/pin/
//! compact, the file bound of keep-last-N, and manifest compatibility.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use bitsnap_core::{DType, Error, Policy, Retention, Role, Store, Tensor};
use common::{mutate, random_tensor};

/// Every snapshot file in `dir` with its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".bsnap"))
        .map(|e| {
            (
                e.file_name().into_string().unwrap(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

struct Trainer {
    w: Tensor,
    m: Tensor,
    step: u64,
}

impl Trainer {
    fn new() -> Trainer {
        Trainer {
            w: random_tensor("w", DType::BF16, &[20_000], Role::Weight, 1),
            m: random_tensor("m", DType::F32, &[5_000], Role::OptimizerMoment(1), 2),
            step: 0,
        }
    }

    fn save(&mut self, store: &mut Store) -> (u64, Vec<Tensor>) {
        self.step += 1;
        self.w = mutate(&self.w, 20, self.step);
        self.m = mutate(&self.m, 500, 1000 + self.step);
        let tensors = vec![self.w.clone(), self.m.clone()];
        let id = store
            .save(&format!("step-{}", self.step), tensors.clone())
            .unwrap()
            .info
            .id;
        (id, tensors)
    }
}

/// Every listed snapshot of the store in `dir`, reopened, decodes to what was saved.
fn check_all(dir: &Path, saved: &BTreeMap<u64, Vec<Tensor>>) {
    let store = Store::open(dir).unwrap();
    for s in store.snapshots() {
        assert_eq!(
            &store.load(s.id).unwrap().tensors,
            &saved[&s.id],
            "snapshot {}",
            s.id
        );
    }
    let report = store.verify().unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert!(report.orphans.is_empty(), "{:?}", report.orphans);
}

#[test]
fn deleting_a_chain_root_writes_nothing_and_keeps_its_dependants_readable() {
    let dir = tempfile::tempdir().unwrap();
    let mut store =
        Store::open_or_create(dir.path(), Policy::default().with_full_every(100)).unwrap();
    let mut t = Trainer::new();
    let saved: BTreeMap<u64, Vec<Tensor>> = (0..4).map(|_| t.save(&mut store)).collect();
    let before = files(dir.path());
    store.delete(1).unwrap();
    // Not one payload byte re-encoded: no file written, none changed.
    assert_eq!(files(dir.path()), before);
    assert!(store.get(1).is_none());
    assert_eq!(store.snapshots().first().unwrap().id, 2);
    assert_eq!(
        store.retired().iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![1]
    );
    check_all(dir.path(), &saved);
    assert_eq!(
        Store::open(dir.path()).unwrap().verify().unwrap().retired,
        vec![1]
    );
    // Deleting the next root retires it too; deleting the rest removes every file.
    store.delete(2).unwrap();
    assert_eq!(files(dir.path()), before);
    store.delete(4).unwrap();
    assert_eq!(files(dir.path()).len(), 3, "4 had no dependant: removed");
    store.delete(3).unwrap();
    assert!(files(dir.path()).is_empty());
    assert!(store.retired().is_empty());
}

#[test]
fn keep_last_over_fifty_saves_stays_within_full_every_plus_n_files() {
    const FULL_EVERY: u32 = 8;
    const KEEP: usize = 2;
    let dir = tempfile::tempdir().unwrap();
    let mut store =
        Store::open_or_create(dir.path(), Policy::default().with_full_every(FULL_EVERY)).unwrap();
    let mut t = Trainer::new();
    let mut saved = BTreeMap::new();
    let mut most_files = 0;
    for _ in 0..50 {
        let (id, tensors) = t.save(&mut store);
        saved.insert(id, tensors);
        most_files = most_files.max(files(dir.path()).len());
        // KeepLastN, as Burn's checkpointer and StepSaver's keep_last do.
        while store.snapshots().len() > KEEP {
            let oldest = store.snapshots()[0].id;
            let before = files(dir.path());
            store.delete(oldest).unwrap();
            let after = files(dir.path());
            // Deleting writes nothing: the files left are a subset, byte for byte.
            assert!(after.iter().all(|(n, b)| before.get(n) == Some(b)));
            saved.remove(&oldest);
        }
        most_files = most_files.max(files(dir.path()).len());
        if id % 7 == 0 {
            check_all(dir.path(), &saved);
        }
    }
    check_all(dir.path(), &saved);
    // Measured: 10 files at most (FULL_EVERY + KEEP), just after the first delta on a
    // new chain's full snapshot is saved, before its delete removes the old chain.
    assert_eq!(most_files, FULL_EVERY as usize + KEEP, "{most_files} files");
}

#[test]
fn prune_keeps_last_every_and_pinned_and_rm_refuses_a_pin() {
    let dir = tempfile::tempdir().unwrap();
    let mut store =
        Store::open_or_create(dir.path(), Policy::default().with_full_every(100)).unwrap();
    let mut t = Trainer::new();
    let mut saved: BTreeMap<u64, Vec<Tensor>> = (0..10).map(|_| t.save(&mut store)).collect();
    store.pin(2).unwrap();
    assert!(matches!(
        store.delete(2),
        Err(Error::WrongKind { snapshot: 2, .. })
    ));
    let retention = Retention::default().with_keep_last(2).with_keep_every(4);
    let plan = store.plan_prune(None, &retention);
    assert_eq!(plan.kept, vec![2, 4, 8, 9, 10]);
    assert_eq!(plan.deleted, vec![1, 3, 5, 6, 7]);
    // 1 is the root every kept delta reads; all deleted ones are in kept chains.
    assert!(plan.removed.is_empty());
    let before = files(dir.path());
    let report = store.prune(None, &retention).unwrap();
    assert_eq!(report, plan);
    assert_eq!(files(dir.path()), before);
    for id in &report.deleted {
        saved.remove(id);
    }
    check_all(dir.path(), &saved);
    assert_eq!(Store::open(dir.path()).unwrap().pinned(), &[2]);
    // Compacting frees the retired files now; every kept snapshot still decodes the same.
    let compacted = store.compact().unwrap();
    assert!(!compacted.rewritten.is_empty());
    assert_eq!(compacted.removed, vec![1, 3, 5, 6, 7]);
    assert!(store.retired().is_empty());
    check_all(dir.path(), &saved);
    assert_eq!(files(dir.path()).len(), 5);
    store.unpin(2).unwrap();
    store.delete(2).unwrap();
    saved.remove(&2);
    check_all(dir.path(), &saved);
}

#[test]
fn prune_of_one_series_leaves_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    let t = Tensor::from_f32("w", &[4], Role::Weight, &[1.0, 2.0, 3.0, 4.0]).unwrap();
    for i in 0..3 {
        for series in ["model", "optim"] {
            store
                .save_in(series, &format!("{i}"), vec![t.clone()], Vec::new())
                .unwrap();
        }
    }
    let report = store
        .prune(Some("optim"), &Retention::default().with_keep_last(1))
        .unwrap();
    assert_eq!(report.deleted, vec![2, 4]);
    assert_eq!(report.kept, vec![1, 3, 5, 6]);
}

#[test]
fn manifest_version_is_bumped_only_while_retired_or_pinned_entries_exist() {
    let dir = tempfile::tempdir().unwrap();
    let mut store =
        Store::open_or_create(dir.path(), Policy::default().with_full_every(100)).unwrap();
    let mut t = Trainer::new();
    for _ in 0..3 {
        t.save(&mut store);
    }
    let version = || -> u64 {
        let text = std::fs::read(dir.path().join("MANIFEST")).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        v["version"].as_u64().unwrap()
    };
    assert_eq!(version(), 1);
    store.delete(1).unwrap();
    assert_eq!(
        version(),
        3,
        "an older reader must refuse a manifest with retired entries"
    );
    store.delete(2).unwrap();
    store.delete(3).unwrap();
    assert_eq!(version(), 1);
    t.save(&mut store);
    store.pin(4).unwrap();
    assert_eq!(version(), 3);
    store.unpin(4).unwrap();
    assert_eq!(version(), 1);
}

/// A store written before retention existed (`tests/fixtures/store-v1`: manifest version
/// 1, written by `bitsnap pack --full-every 100` of three files `step-N.safetensors`
/// holding [`fixture_weights`]`(N)` as tensor `w`) opens, loads, and takes deletes.
#[test]
fn todays_manifests_still_read_and_take_deletes() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v1");
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let ids: Vec<u64> = store.snapshots().iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![1, 2, 3]);
    let expect: Vec<Tensor> = store.load(3).unwrap().tensors;
    assert_eq!(expect[0].to_f32().unwrap(), fixture_weights(3));
    let mut store = Store::open(dir.path()).unwrap();
    store.delete(1).unwrap();
    let reopened = Store::open(dir.path()).unwrap();
    assert_eq!(reopened.load(3).unwrap().tensors, expect);
    assert_eq!(
        reopened.load(2).unwrap().tensors[0].to_f32().unwrap(),
        fixture_weights(2)
    );
}

/// What snapshot `n` of the `store-v1` fixture holds in tensor `w`.
fn fixture_weights(n: usize) -> Vec<f32> {
    let mut w: Vec<f32> = (0..256).map(|i| i as f32 * 0.25).collect();
    for step in 0..n {
        w[step * 3] = -1.5;
    }
    w
}
