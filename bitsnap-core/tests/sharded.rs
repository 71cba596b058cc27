//! Sharded commits are bound to one attempt (issue #14.6): a shard left by an earlier,
//! interrupted attempt is never committed or loaded as part of a later one.

mod common;

use std::time::Duration;

use bitsnap_core::shard::{default_attempt, new_attempt, shard_file_name};
use bitsnap_core::{DType, Error, Policy, Role, Store, Tensor};
use common::random_tensor;

fn part(rank: u32, seed: u64) -> Vec<Tensor> {
    vec![random_tensor(
        &format!("layer{rank}.w"),
        DType::F32,
        &[64],
        Role::Weight,
        seed,
    )]
}

/// Regression (#14.6): the commit checked only each shard's id and name, so a stale
/// shard of an earlier attempt (same id, rank and name) was committed with the new ones.
#[test]
fn a_stale_shard_of_an_earlier_attempt_is_not_committed() {
    let dir = tempfile::tempdir().unwrap();
    Store::open_or_create(dir.path(), Policy::default()).unwrap();
    let (a, b) = (new_attempt(), new_attempt());
    assert_ne!(a, b);
    // Attempt A: both ranks wrote their shards, then the job died before the commit.
    for rank in 0..2 {
        let mut s = Store::open(dir.path()).unwrap();
        s.save_shard_attempt("m", 4, "step-4", rank, 2, a, part(rank, 1), Vec::new())
            .unwrap();
    }
    // Attempt B: rank 0 is done, rank 1 is not yet.
    let mut r0 = Store::open(dir.path()).unwrap();
    r0.save_shard_attempt("m", 4, "step-4", 0, 2, b, part(0, 2), Vec::new())
        .unwrap();
    let mut committer = Store::open(dir.path()).unwrap();
    let err = committer
        .commit_sharded_attempt("m", 4, "step-4", 2, b, Duration::from_millis(100))
        .unwrap_err();
    match err {
        Error::StaleShard {
            file,
            expected,
            actual,
        } => {
            assert_eq!(file, dir.path().join(shard_file_name(4, 1)));
            assert_eq!((expected, actual), (b, a));
        }
        other => panic!("expected a stale shard, got {other:?}"),
    }
    assert!(Store::open(dir.path()).unwrap().snapshots().is_empty());
    // Rank 1 of attempt B arrives: the commit takes it.
    let mut r1 = Store::open(dir.path()).unwrap();
    r1.save_shard_attempt("m", 4, "step-4", 1, 2, b, part(1, 3), Vec::new())
        .unwrap();
    let info = committer
        .commit_sharded_attempt("m", 4, "step-4", 2, b, Duration::from_secs(5))
        .unwrap();
    assert!(info.shards.iter().all(|s| s.attempt == b));
    let store = Store::open(dir.path()).unwrap();
    let loaded = store.load(4).unwrap();
    assert_eq!(loaded.tensors, [part(0, 2), part(1, 3)].concat());
}

/// At load: a shard file that is not of the attempt the manifest lists is refused.
#[test]
fn a_shard_of_another_attempt_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    for d in [&dir, &other] {
        Store::open_or_create(d.path(), Policy::default()).unwrap();
    }
    let (a, b) = (new_attempt(), new_attempt());
    let mut s = Store::open(dir.path()).unwrap();
    s.save_shard_attempt("m", 1, "step-1", 0, 1, a, part(0, 1), Vec::new())
        .unwrap();
    s.commit_sharded_attempt("m", 1, "step-1", 1, a, Duration::from_secs(5))
        .unwrap();
    // The same shard, of another attempt, written elsewhere and copied over it.
    let mut o = Store::open(other.path()).unwrap();
    o.save_shard_attempt("m", 1, "step-1", 0, 1, b, part(0, 1), Vec::new())
        .unwrap();
    let name = shard_file_name(1, 0);
    std::fs::copy(other.path().join(&name), dir.path().join(&name)).unwrap();
    let store = Store::open(dir.path()).unwrap();
    let err = store.load(1).unwrap_err();
    assert!(
        matches!(err, Error::StaleShard { expected, actual, .. } if expected == a && actual == b),
        "{err:?}"
    );
}

/// The attempt-less API still works: every rank derives the same default attempt.
#[test]
fn default_attempts_agree_across_ranks() {
    let dir = tempfile::tempdir().unwrap();
    Store::open_or_create(dir.path(), Policy::default()).unwrap();
    for rank in 0..3 {
        let mut s = Store::open(dir.path()).unwrap();
        s.save_shard("m", 2, "step-2", rank, 3, part(rank, 7), Vec::new())
            .unwrap();
    }
    let mut c = Store::open(dir.path()).unwrap();
    let info = c
        .commit_sharded("m", 2, "step-2", 3, Duration::from_secs(5))
        .unwrap();
    let want = default_attempt("m", 2, "step-2", 3);
    assert!(info.shards.iter().all(|s| s.attempt == want));
    // The chain reader gives one checked chain per rank.
    let chains = c.restore_chains(2).unwrap();
    assert_eq!(chains.len(), 3);
    for (rank, chain) in chains.iter().enumerate() {
        assert_eq!(chain.rank(), Some(rank as u32));
        assert_eq!(chain.decode().unwrap(), part(rank as u32, 7));
        assert_eq!(
            chain.target().path,
            dir.path().join(shard_file_name(2, rank as u32))
        );
    }
}
