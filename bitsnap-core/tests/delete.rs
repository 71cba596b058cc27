//! Deleting snapshots (as Burn's KeepLastN does) never makes a kept one unreadable, and
//! compacting afterwards (the explicit rebase) neither.

mod common;

use bitsnap_core::{DType, Policy, Role, Store};
use common::{mutate, random_tensor};

fn series(store: &mut Store, n: usize) -> Vec<(u64, Vec<bitsnap_core::Tensor>)> {
    let mut w = random_tensor("w", DType::BF16, &[40_000], Role::Weight, 7);
    let mut m = random_tensor("m", DType::F32, &[10_000], Role::OptimizerMoment(1), 8);
    let frozen = random_tensor("frozen", DType::F32, &[1000], Role::Weight, 9);
    (0..n)
        .map(|i| {
            w = mutate(&w, 20, i as u64);
            m = mutate(&m, 900, 100 + i as u64);
            let tensors = vec![w.clone(), m.clone(), frozen.clone()];
            (
                store
                    .save(&format!("epoch-{i}"), tensors.clone())
                    .unwrap()
                    .info
                    .id,
                tensors,
            )
        })
        .collect()
}

#[test]
fn keep_last_n_deletes_keep_every_kept_snapshot_readable() {
    let dir = tempfile::tempdir().unwrap();
    let mut store =
        Store::open_or_create(dir.path(), Policy::default().with_full_every(100)).unwrap();
    let saved = series(&mut store, 6);
    // All but the first are deltas.
    assert!(store.snapshots().iter().skip(1).all(|s| s.base.is_some()));
    // KeepLastN(2): delete the oldest ones one by one, as Burn does after each epoch.
    for (id, _) in &saved[..4] {
        store.delete(*id).unwrap();
        let reopened = Store::open(dir.path()).unwrap();
        for s in reopened.snapshots() {
            let expect = &saved.iter().find(|(i, _)| *i == s.id).unwrap().1;
            assert_eq!(
                &reopened.load(s.id).unwrap().tensors,
                expect,
                "snapshot {} after deleting {id}",
                s.id
            );
        }
        assert!(reopened.verify().unwrap().failed.is_empty());
    }
    let left: Vec<u64> = store.snapshots().iter().map(|s| s.id).collect();
    assert_eq!(left, vec![saved[4].0, saved[5].0]);
    // Nothing was rewritten: the oldest kept one is still a delta on a retired snapshot.
    assert_eq!(store.snapshots()[0].base, Some(saved[3].0));
    let retired: Vec<u64> = store.retired().iter().map(|s| s.id).collect();
    assert_eq!(
        retired,
        saved[..4].iter().map(|(id, _)| *id).collect::<Vec<_>>()
    );
    let files = |dir: &std::path::Path| {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        files
    };
    // Manifest, lock, the writer's lease, four retired and two kept snapshots.
    assert_eq!(files(dir.path()).len(), 9, "{:?}", files(dir.path()));
    // Compacting rewrites the oldest kept one as a full snapshot; the newest is still a
    // delta on it; no stray files: manifest, lock, lease and two snapshots.
    store.compact().unwrap();
    assert_eq!(store.snapshots()[0].base, None);
    assert_eq!(store.snapshots()[1].base, Some(saved[4].0));
    assert_eq!(files(dir.path()).len(), 5, "{:?}", files(dir.path()));
    let reopened = Store::open(dir.path()).unwrap();
    for (id, tensors) in &saved[4..] {
        assert_eq!(&reopened.load(*id).unwrap().tensors, tensors);
    }
}

#[test]
fn deleting_from_the_middle_retires_it_and_compact_rebases_onto_its_base() {
    let dir = tempfile::tempdir().unwrap();
    let mut store =
        Store::open_or_create(dir.path(), Policy::default().with_full_every(100)).unwrap();
    let saved = series(&mut store, 4);
    store.delete(saved[1].0).unwrap();
    assert_eq!(store.get(saved[2].0).unwrap().base, Some(saved[1].0));
    assert_eq!(store.retired()[0].id, saved[1].0);
    store.compact().unwrap();
    assert_eq!(store.get(saved[2].0).unwrap().base, Some(saved[0].0));
    assert!(store.retired().is_empty());
    store.delete(saved[3].0).unwrap();
    let reopened = Store::open(dir.path()).unwrap();
    for (id, tensors) in [&saved[0], &saved[2]] {
        assert_eq!(&reopened.load(*id).unwrap().tensors, tensors);
    }
    // Saving continues after deleting the latest.
    let next = random_tensor("w", DType::BF16, &[40_000], Role::Weight, 99);
    let r = store.save("later", vec![next.clone()]).unwrap();
    assert_eq!(
        Store::open(dir.path())
            .unwrap()
            .load(r.info.id)
            .unwrap()
            .tensors,
        vec![next]
    );
}

#[test]
fn lossy_snapshots_survive_rebase_unchanged() {
    use bitsnap_core::{Lossiness, codec::QuantBits};
    let dir = tempfile::tempdir().unwrap();
    let policy = Policy::default()
        .with_full_every(100)
        .with_lossiness(Lossiness::LossyOptimizer {
            bits: QuantBits::B4,
        });
    let mut store = Store::open_or_create(dir.path(), policy).unwrap();
    series(&mut store, 3);
    let ids: Vec<u64> = store.snapshots().iter().map(|s| s.id).collect();
    let before: Vec<_> = ids
        .iter()
        .map(|id| store.load(*id).unwrap().tensors)
        .collect();
    let before_disk: Vec<_> = ids
        .iter()
        .map(|id| Store::open(dir.path()).unwrap().load(*id).unwrap().tensors)
        .collect();
    assert_eq!(before, before_disk);
    store.delete(ids[0]).unwrap();
    store.compact().unwrap();
    let reopened = Store::open(dir.path()).unwrap();
    assert_eq!(reopened.load(ids[1]).unwrap().tensors, before[1]);
    assert_eq!(reopened.load(ids[2]).unwrap().tensors, before[2]);
}
