//! Stores on a real S3-compatible server (`s3s-fs`, started on 127.0.0.1 for each test):
//! a series through the library, conditional manifest commits, a writer killed
//! mid-upload, and four rank processes writing one sharded snapshot. (The command line
//! over `s3://` URLs is tested in `bitsnap-cli/tests/remote.rs`.)
//!
//! `s3s-fs` is found on `PATH` (or at `$BITSNAP_S3S_FS`); `.ci/run` installs it. Without
//! it these tests fail when `CI` is set and are skipped (with a note) otherwise.

mod common;
#[path = "common/s3.rs"]
mod s3;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bitsnap_core::{DType, Error, Policy, Role, Store, Tensor};
use common::{mutate, random_tensor};
use s3::S3Server;

/// Rank `rank`'s tensors at `step` (1-based): random at step 1, then 1% of elements
/// changed per step. 5 tensors of 4 MiB: each shard file takes a multipart upload.
fn rank_tensors(rank: u32, step: u64) -> Vec<Tensor> {
    (0..5u64)
        .map(|i| {
            let seed = 1 + 1000 * rank as u64 + i;
            let name = format!("rank{rank}.layer{i}.weight");
            let mut t = random_tensor(&name, DType::F32, &[1024, 1024], Role::Weight, seed);
            for s in 2..=step {
                t = mutate(&t, 10, seed * 7919 + s);
            }
            t
        })
        .collect()
}

/// Runs this test binary's `child_process` entry with `role` and extra environment.
fn spawn_child(role: &str, server: &S3Server, env: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args([
        "--ignored",
        "--exact",
        "child_process",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("BITSNAP_TEST_ROLE", role)
    .env_remove("RUST_LOG")
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for (k, v) in server.env().iter().chain(env) {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn child")
}

fn env_u64(key: &str) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} not set"))
}

/// The processes the tests start: a writer to kill, and the ranks of a sharded save.
#[test]
#[ignore = "entry point of child processes started by the other tests"]
fn child_process() {
    let role = std::env::var("BITSNAP_TEST_ROLE").expect("BITSNAP_TEST_ROLE");
    let url = std::env::var("BITSNAP_TEST_URL").expect("BITSNAP_TEST_URL");
    match role.as_str() {
        "writer" => {
            // A committed snapshot, then a large one to be killed during its upload.
            let mut store = Store::open_or_create_url(&url, Policy::default()).expect("store");
            let small = vec![random_tensor("w", DType::F32, &[256, 256], Role::Weight, 3)];
            store.save("step-1", small).expect("first save");
            println!("committed 1");
            let big: Vec<Tensor> = (0..24u64)
                .map(|i| {
                    random_tensor(
                        &format!("big{i}"),
                        DType::U8,
                        &[4 << 20],
                        Role::Other,
                        9 + i,
                    )
                })
                .collect();
            store.save("step-2", big).expect("second save");
            println!("committed 2");
        }
        "rank" => {
            let rank = env_u64("BITSNAP_TEST_RANK") as u32;
            let world = env_u64("BITSNAP_TEST_WORLD") as u32;
            let steps = env_u64("BITSNAP_TEST_STEPS");
            // Optionally, one rank saves 96 MiB more at step 2 (a long upload to kill).
            let big_rank = std::env::var("BITSNAP_TEST_BIG_RANK").ok();
            let wait = Duration::from_secs(60);
            let mut store = Store::open_url(&url).expect("store");
            for step in 1..=steps {
                let mut tensors = rank_tensors(rank, step);
                if step == 2 && big_rank == Some(rank.to_string()) {
                    tensors.extend((0..24u64).map(|i| {
                        random_tensor(
                            &format!("extra{i}"),
                            DType::U8,
                            &[4 << 20],
                            Role::Other,
                            50 + i,
                        )
                    }));
                }
                let report = store
                    .save_shard(
                        "model",
                        step,
                        &format!("step-{step}"),
                        rank,
                        world,
                        tensors,
                        Vec::new(),
                    )
                    .expect("save shard");
                println!(
                    "rank {rank} step {step} base {:?} bytes {}",
                    report.info.base, report.info.stored_bytes
                );
                if rank == 0 {
                    store
                        .commit_sharded("model", step, &format!("step-{step}"), world, wait)
                        .expect("commit");
                } else {
                    // Wait for the commit, as ranks wait at a barrier after a save.
                    let deadline = Instant::now() + wait;
                    while Store::open_url(&url).expect("reopen").get(step).is_none() {
                        assert!(Instant::now() < deadline, "step {step} never committed");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
            println!("rank {rank} done");
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn library_series_on_s3_restores_like_the_local_store() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut local = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    let mut remote =
        Store::open_or_create_backend(server.backend("lib"), Policy::default()).unwrap();
    let mut states = Vec::new();
    // 24 MiB: the first save of each is a multipart upload.
    let mut ts: Vec<Tensor> = (0..6u64)
        .map(|i| {
            random_tensor(
                &format!("t{i}"),
                DType::F32,
                &[1 << 20],
                Role::Weight,
                40 + i,
            )
        })
        .collect();
    for step in 0..4u64 {
        let l = local.save(&format!("step-{step}"), ts.clone()).unwrap();
        let r = remote.save(&format!("step-{step}"), ts.clone()).unwrap();
        assert_eq!(l.info.state_hash, r.info.state_hash);
        assert_eq!(l.info.base, r.info.base);
        assert_eq!(l.header.entries.len(), r.header.entries.len());
        states.push((r.info.id, ts.clone()));
        ts = ts.iter().map(|t| mutate(t, 20, 77 + step)).collect();
    }
    let reopened = Store::open_backend(server.backend("lib")).unwrap();
    assert_eq!(reopened.snapshots().len(), 4);
    for (id, want) in &states {
        let got = reopened.load(*id).unwrap();
        assert!(!got.from_memory);
        assert_eq!(&got.tensors, want, "snapshot {id}");
    }
    let report = reopened.verify().unwrap();
    assert_eq!(report.ok.len(), 4);
    assert!(report.failed.is_empty() && report.orphans.is_empty());
    // Delete (with a rebase of its dependant) works remotely too.
    remote.delete(states[1].0).unwrap();
    let after = Store::open_backend(server.backend("lib")).unwrap();
    assert_eq!(after.load(states[2].0).unwrap().tensors, states[2].1);
    assert!(after.verify().unwrap().orphans.is_empty());
}

#[test]
fn manifest_commits_are_conditional_on_the_server() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let b = server.backend("cas");
    let v1 = b.commit_manifest("MANIFEST", b"one", None).unwrap();
    // A second "first" manifest loses: If-None-Match: *.
    assert!(matches!(
        b.commit_manifest("MANIFEST", b"two", None),
        Err(Error::Conflict { .. })
    ));
    let v2 = b.commit_manifest("MANIFEST", b"two", Some(&v1)).unwrap();
    // A writer still holding the first version loses: If-Match: <e-tag>.
    let err = b
        .commit_manifest("MANIFEST", b"three", Some(&v1))
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
    assert!(
        err.to_string().contains("s3://bitsnap/cas/MANIFEST"),
        "{err}"
    );
    let (bytes, v) = b.read_versioned("MANIFEST", 1 << 20).unwrap().unwrap();
    assert_eq!((bytes.as_slice(), v), (&b"two"[..], v2));

    // Two stores that read the same manifest: the second commit re-reads and retries.
    let mut a = Store::open_or_create_backend(server.backend("race"), Policy::default()).unwrap();
    let mut c = Store::open_backend(server.backend("race")).unwrap();
    let t = random_tensor("w", DType::F32, &[1000], Role::Weight, 5);
    let first = a.save("a", vec![t.clone()]).unwrap();
    let second = c.save("c", vec![t.clone()]).unwrap();
    assert!(second.info.id > first.info.id);
    let s = Store::open_backend(server.backend("race")).unwrap();
    assert_eq!(s.snapshots().len(), 2);
    assert_eq!(s.verify().unwrap().ok.len(), 2);
}

#[test]
fn writer_killed_mid_upload_leaves_only_complete_snapshots() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let url = server.url("killed");
    let mut child = spawn_child("writer", &server, &[("BITSNAP_TEST_URL", url.clone())]);
    // The child's stdout reaches us only when it exits: watch the store instead.
    let deadline = Instant::now() + Duration::from_secs(120);
    while Store::open_backend(server.backend("killed")).map_or(true, |s| s.get(1).is_none()) {
        assert!(
            Instant::now() < deadline,
            "the writer never committed snapshot 1"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while !server.upload_in_progress() {
        assert!(
            Instant::now() < deadline,
            "the second upload never started: {:?}",
            std::fs::read_dir(server.root.path())
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL, mid-upload
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the writer finished before it was killed"
    );
    let store = Store::open_backend(server.backend("killed")).unwrap();
    assert_eq!(
        store.snapshots().len(),
        1,
        "only the complete snapshot is listed"
    );
    let report = store.verify().unwrap();
    assert_eq!(report.ok, vec![1]);
    assert!(report.failed.is_empty());
    // A new writer carries on from the committed state.
    let mut store =
        Store::open_or_create_backend(server.backend("killed"), Policy::default()).unwrap();
    let t = random_tensor("w", DType::F32, &[256, 256], Role::Weight, 3);
    let next = store.save("step-2", vec![mutate(&t, 10, 4)]).unwrap();
    assert_eq!(next.info.base, Some(1));
    assert_eq!(store.verify().unwrap().ok.len(), 2);
}

#[test]
fn four_rank_processes_write_one_sharded_snapshot_series() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let url = server.url("sharded");
    Store::open_or_create_backend(server.backend("sharded"), Policy::default()).unwrap();
    let world = 4u32;
    let steps = 3u64;
    let children: Vec<Child> = (0..world)
        .map(|rank| {
            spawn_child(
                "rank",
                &server,
                &[
                    ("BITSNAP_TEST_URL", url.clone()),
                    ("BITSNAP_TEST_RANK", rank.to_string()),
                    ("BITSNAP_TEST_WORLD", world.to_string()),
                    ("BITSNAP_TEST_STEPS", steps.to_string()),
                ],
            )
        })
        .collect();
    for mut c in children {
        let out: Vec<String> = BufReader::new(c.stdout.take().unwrap())
            .lines()
            .map_while(Result::ok)
            .collect();
        let status = c.wait().unwrap();
        assert!(status.success(), "rank failed: {out:?}");
    }
    let store = Store::open_backend(server.backend("sharded")).unwrap();
    assert_eq!(store.snapshots().len(), steps as usize);
    for step in 1..=steps {
        let info = store.get(step).unwrap();
        assert_eq!(info.shards.len(), world as usize);
        for h in &info.shards {
            // Deltas per shard: each rank's shard is a delta on its previous one.
            assert_eq!(
                h.base,
                (step > 1).then_some(step - 1),
                "step {step} rank {}",
                h.rank
            );
            if step > 1 {
                assert!(
                    h.stored_bytes * 4 < h.raw_bytes,
                    "delta shard is small: {h:?}"
                );
            }
        }
        let all = store.load(step).unwrap();
        let want: Vec<Tensor> = (0..world).flat_map(|r| rank_tensors(r, step)).collect();
        assert_eq!(all.tensors, want, "step {step}: every shard, bit-exact");
        let own = store.load_shard(step, 2).unwrap();
        assert_eq!(
            own.tensors,
            rank_tensors(2, step),
            "step {step}: rank 2 alone"
        );
    }
    let report = store.verify().unwrap();
    assert_eq!(report.ok.len(), steps as usize);
    assert!(report.failed.is_empty() && report.orphans.is_empty());
}

#[test]
fn sharded_commit_with_a_missing_rank_commits_nothing() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let mut store =
        Store::open_or_create_backend(server.backend("partial"), Policy::default()).unwrap();
    // Ranks 0-2 save their shard of step 1; rank 3 has not (slow, or died).
    for rank in 0..3 {
        let mut r = Store::open_backend(server.backend("partial")).unwrap();
        r.save_shard(
            "model",
            1,
            "step-1",
            rank,
            4,
            rank_tensors(rank, 1),
            Vec::new(),
        )
        .unwrap();
    }
    let err = store
        .commit_sharded("model", 1, "step-1", 4, Duration::from_millis(300))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("snap-00000000000000000001-s00003.bsnap"),
        "{err}"
    );
    let reopened = Store::open_backend(server.backend("partial")).unwrap();
    assert!(reopened.snapshots().is_empty(), "nothing committed");
    // The shards already there are pending, not orphans, until rank 3 catches up.
    assert!(reopened.verify().unwrap().orphans.is_empty());
    let mut r3 = Store::open_backend(server.backend("partial")).unwrap();
    r3.save_shard("model", 1, "step-1", 3, 4, rank_tensors(3, 1), Vec::new())
        .unwrap();
    // A restarted rank saves its uncommitted shard again: the old one is replaced.
    let mut r1 = Store::open_backend(server.backend("partial")).unwrap();
    r1.save_shard("model", 1, "step-1", 1, 4, rank_tensors(1, 1), Vec::new())
        .unwrap();
    let info = store
        .commit_sharded("model", 1, "step-1", 4, Duration::from_secs(5))
        .unwrap();
    assert_eq!(info.tensors, 20);
    assert_eq!(
        Store::open_backend(server.backend("partial"))
            .unwrap()
            .load_shard(1, 3)
            .unwrap()
            .tensors,
        rank_tensors(3, 1)
    );
}

#[test]
fn sharded_snapshots_in_a_local_directory() {
    let dir = tempfile::tempdir().unwrap();
    Store::open_or_create(dir.path(), Policy::default()).unwrap();
    for step in 1..=2u64 {
        for rank in 0..2u32 {
            let mut r = Store::open(dir.path()).unwrap();
            r.save_shard(
                "model",
                step,
                &format!("step-{step}"),
                rank,
                2,
                rank_tensors(rank, step),
                Vec::new(),
            )
            .unwrap();
        }
        let mut s = Store::open(dir.path()).unwrap();
        s.commit_sharded(
            "model",
            step,
            &format!("step-{step}"),
            2,
            Duration::from_secs(5),
        )
        .unwrap();
    }
    let s = Store::open(dir.path()).unwrap();
    assert_eq!(s.get(2).unwrap().shards[1].base, Some(1));
    assert_eq!(s.load_shard(2, 1).unwrap().tensors, rank_tensors(1, 2));
    assert_eq!(s.verify().unwrap().ok, vec![1, 2]);
    // Saving over a committed id is refused.
    let mut r = Store::open(dir.path()).unwrap();
    let err = r
        .save_shard("model", 2, "again", 0, 2, rank_tensors(0, 2), Vec::new())
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
    // The manifest of a sharded store is version 2.
    let text = std::fs::read_to_string(dir.path().join("MANIFEST")).unwrap();
    assert!(text.contains("\"version\": 2"), "{text}");
}

#[test]
fn rank_killed_mid_upload_leaves_the_sharded_snapshot_uncommitted() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let prefix = "sharded-killed";
    let url = server.url(prefix);
    Store::open_or_create_backend(server.backend(prefix), Policy::default()).unwrap();
    let world = 4u32;
    let mut children: Vec<Child> = (0..world)
        .map(|rank| {
            spawn_child(
                "rank",
                &server,
                &[
                    ("BITSNAP_TEST_URL", url.clone()),
                    ("BITSNAP_TEST_RANK", rank.to_string()),
                    ("BITSNAP_TEST_WORLD", world.to_string()),
                    ("BITSNAP_TEST_STEPS", "2".into()),
                    ("BITSNAP_TEST_BIG_RANK", "3".into()),
                ],
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Store::open_backend(server.backend(prefix)).map_or(true, |s| s.get(1).is_none()) {
        assert!(Instant::now() < deadline, "step 1 never committed");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Step 2's shards of ranks 0-2 are small deltas (one PUT each): the only multipart
    // upload now is rank 3's.
    while !server.upload_in_progress() {
        assert!(
            Instant::now() < deadline,
            "rank 3's step-2 upload never started"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    children[3].kill().unwrap(); // SIGKILL, mid-upload
    assert!(!children[3].wait().unwrap().success());
    // Rank 0's commit of step 2 can only time out; stop the ranks waiting for it.
    std::thread::sleep(Duration::from_secs(2));
    for c in &mut children[..3] {
        let _ = c.kill();
        let _ = c.wait();
    }
    let store = Store::open_backend(server.backend(prefix)).unwrap();
    let ids: Vec<u64> = store.snapshots().iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![1], "only the complete sharded snapshot is listed");
    let want: Vec<Tensor> = (0..world).flat_map(|r| rank_tensors(r, 1)).collect();
    assert_eq!(store.load(1).unwrap().tensors, want);
    let report = store.verify().unwrap();
    assert_eq!(report.ok, vec![1]);
    assert!(
        report.orphans.is_empty(),
        "step 2's shards are pending, not debris"
    );
    assert!(
        store
            .backend()
            .size(&bitsnap_core::shard::shard_file_name(2, 3))
            .unwrap()
            .is_none(),
        "the killed upload left no object"
    );
}
