//! The keeper in process: put, latest from memory, flush to the store, restart from
//! disk, hostile frames, two clients, a keeper that is gone.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use bitsnap_core::keeper::{
    FRAME_HEADER_BYTES, FRAME_MAGIC, Keeper, KeeperClient, KeeperOptions, PROTOCOL_VERSION,
};
use bitsnap_core::{Error, Policy, Role, Store, Tensor};
use xxhash_rust::xxh3::xxh3_64;

/// A small training state whose values depend on `step`: a weight, two moments and a
/// step counter.
fn state(step: u32) -> Vec<Tensor> {
    let w: Vec<f32> = (0..4096)
        .map(|i| (i as f32 * 0.01 + step as f32).sin())
        .collect();
    let m1: Vec<f32> = w.iter().map(|x| x * 1e-3).collect();
    let m2: Vec<f32> = w.iter().map(|x| x * x * 1e-6).collect();
    vec![
        Tensor::from_f32("layer.weight", &[64, 64], Role::Weight, &w).unwrap(),
        Tensor::from_f32(
            "layer.weight.moment_1",
            &[64, 64],
            Role::OptimizerMoment(1),
            &m1,
        )
        .unwrap(),
        Tensor::from_f32(
            "layer.weight.moment_2",
            &[64, 64],
            Role::OptimizerMoment(2),
            &m2,
        )
        .unwrap(),
        Tensor::new(
            "step",
            bitsnap_core::DType::I64,
            vec![],
            Role::Other,
            i64::from(step).to_le_bytes().to_vec(),
        )
        .unwrap(),
    ]
}

fn meta(step: u32) -> Vec<(String, String)> {
    vec![
        ("bitsnap.step".into(), step.to_string()),
        ("bitsnap.lr".into(), "0.001".into()),
    ]
}

fn keeper(dir: &Path, options: KeeperOptions) -> Keeper {
    let store = Store::open_or_create(dir.join("store"), Policy::default()).unwrap();
    Keeper::spawn(store, dir.join("k.sock"), options).unwrap()
}

#[test]
fn put_is_held_latest_comes_from_memory_and_flush_persists() {
    let dir = tempfile::tempdir().unwrap();
    let k = keeper(dir.path(), KeeperOptions::default().with_persist_every(0));
    let mut c = KeeperClient::connect(dir.path().join("k.sock")).unwrap();
    assert_eq!(c.info().persist_every, 0);
    assert!(c.latest("model").unwrap().is_none());
    for step in 1..=3 {
        let r = c
            .put("model", &format!("step-{step}"), &meta(step), &state(step))
            .unwrap();
        assert_eq!(r.seq, u64::from(step));
        assert_eq!(r.bytes, 3 * 4096 * 4 + 8);
        assert!(!r.persist);
    }
    // Nothing is on disk, so the answer can only come from the keeper's memory.
    assert!(
        Store::open(dir.path().join("store"))
            .unwrap()
            .snapshots()
            .is_empty()
    );
    let got = c.latest("model").unwrap().unwrap();
    assert!(got.from_memory);
    assert_eq!(got.tensors, state(3));
    assert_eq!(got.metadata, meta(3));
    assert_eq!(got.info.name, "step-3");
    assert_eq!(got.info.id, 0, "not persisted yet");

    c.flush().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let on_disk = store.latest_in("model").unwrap().clone();
    assert_eq!(
        store.snapshots().len(),
        1,
        "only the latest is persisted on flush"
    );
    let loaded = store.load(on_disk.id).unwrap();
    assert_eq!(loaded.tensors, state(3));
    assert_eq!(loaded.metadata, meta(3));
    // The state hash the keeper computed from the put's checksums is the store's.
    let again = c.latest("model").unwrap().unwrap();
    assert_eq!(again.info.state_hash, on_disk.state_hash);
    assert_eq!(again.info.id, on_disk.id);
    let stats = k.shutdown().unwrap();
    assert_eq!(stats.puts, 3);
    assert_eq!(stats.persist.saved, 1);
}

#[test]
fn persist_every_n_and_a_restarted_keeper_serves_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let k = keeper(
        dir.path(),
        KeeperOptions::default()
            .with_persist_every(2)
            .with_keep_in_memory(2),
    );
    let mut c = KeeperClient::connect(dir.path().join("k.sock")).unwrap();
    for step in 1..=5 {
        let r = c
            .put("model", &format!("step-{step}"), &meta(step), &state(step))
            .unwrap();
        assert_eq!(r.persist, step % 2 == 0, "step {step}");
    }
    let stats = k.shutdown().unwrap();
    // Steps 2 and 4 persisted in the background (or 2 skipped for 4), 5 on shutdown.
    assert!(
        stats.persist.saved + stats.persist.skipped == 3,
        "{stats:?}"
    );
    assert_eq!(stats.held, 2);
    assert!(
        c.put("model", "late", &[], &state(6)).is_err(),
        "keeper is gone"
    );

    let k2 = keeper(dir.path(), KeeperOptions::default());
    let mut c2 = KeeperClient::connect(dir.path().join("k.sock")).unwrap();
    let got = c2.latest("model").unwrap().unwrap();
    assert!(!got.from_memory, "a restarted keeper starts empty");
    assert_eq!(got.tensors, state(5));
    assert_eq!(got.metadata, meta(5));
    assert!(got.info.id > 0 && !got.info.file.is_empty());
    assert!(c2.latest("other").unwrap().is_none());
    k2.shutdown().unwrap();
}

#[test]
fn two_clients_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let k = keeper(dir.path(), KeeperOptions::default().with_persist_every(3));
    let sock = dir.path().join("k.sock");
    let threads: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|series| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut c = KeeperClient::connect(&sock).unwrap();
                for step in 1..=12 {
                    let salt = if series == "a" { 0 } else { 1000 };
                    c.put(
                        series,
                        &format!("s{step}"),
                        &meta(step),
                        &state(step + salt),
                    )
                    .unwrap();
                    let got = c.latest(series).unwrap().unwrap();
                    assert!(got.from_memory);
                    assert_eq!(got.tensors, state(step + salt));
                }
                c.flush().unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let store = Store::open(dir.path().join("store")).unwrap();
    for (series, salt) in [("a", 0), ("b", 1000)] {
        let id = store.latest_in(series).unwrap().id;
        assert_eq!(store.load(id).unwrap().tensors, state(12 + salt));
    }
    let stats = k.shutdown().unwrap();
    assert_eq!(stats.puts, 24);
    assert_eq!(stats.persist.failed, 0);
}

/// A frame header as FORMAT.md specifies it.
fn frame(kind: u8, head: &[u8], data_len: u64) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&FRAME_MAGIC);
    f.push(kind);
    f.extend_from_slice(&[0; 3]);
    f.extend_from_slice(&(head.len() as u64).to_le_bytes());
    f.extend_from_slice(&data_len.to_le_bytes());
    f.extend_from_slice(&xxh3_64(head).to_le_bytes());
    f.extend_from_slice(head);
    assert_eq!(f.len(), FRAME_HEADER_BYTES + head.len());
    f
}

/// Sends `bytes` on a fresh connection and returns what the keeper answered.
fn raw(sock: &Path, bytes: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(sock).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[test]
fn hostile_frames_are_refused_and_the_keeper_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let k = keeper(
        dir.path(),
        KeeperOptions::default().with_max_snapshot_bytes(1 << 20),
    );
    let sock = dir.path().join("k.sock");
    let mut good = KeeperClient::connect(&sock).unwrap();
    good.put("m", "x", &[], &state(1)).unwrap();

    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage",
            b"GET / HTTP/1.1\r\n\r\n and more bytes to fill a header".to_vec(),
        ),
        ("truncated header", FRAME_MAGIC.to_vec()),
        ("unknown kind", frame(200, b"", 0)),
        ("put before hello", frame(3, b"", 0)),
        ("flush with data", frame(7, b"", 1 << 40)),
        ("huge head", {
            let mut f = frame(1, b"", 0);
            f[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
            f
        }),
        ("unsupported version", frame(1, &99u16.to_le_bytes(), 0)),
        ("bad head checksum", {
            let mut f = frame(1, &[1, 0], 0);
            f[24..32].copy_from_slice(&1u64.to_le_bytes());
            f
        }),
    ];
    for (what, bytes) in &cases {
        let answer = raw(&sock, bytes);
        // Every refusal is a `failed` frame (kind 9) with a reason, then the close.
        assert!(answer.len() > FRAME_HEADER_BYTES, "{what}: {answer:?}");
        assert_eq!(answer[..4], FRAME_MAGIC, "{what}");
        assert_eq!(answer[4], 9, "{what}");
    }

    // A put over the keeper's limit is refused before it is sent.
    let big = vec![
        Tensor::new(
            "big",
            bitsnap_core::DType::U8,
            vec![2 << 20],
            Role::Other,
            vec![0; 2 << 20],
        )
        .unwrap(),
    ];
    assert!(matches!(
        good.put("m", "big", &[], &big),
        Err(Error::InputLimit { .. })
    ));
    // The well-behaved client is still served, its state intact.
    assert_eq!(good.latest("m").unwrap().unwrap().tensors, state(1));
    let stats = k.shutdown().unwrap();
    assert_eq!(stats.bad_frames, cases.len() as u64);
}

#[test]
fn a_client_killed_mid_put_leaves_the_last_held_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let k = keeper(dir.path(), KeeperOptions::default().with_persist_every(0));
    let sock = dir.path().join("k.sock");
    let mut c = KeeperClient::connect(&sock).unwrap();
    c.put("m", "one", &meta(1), &state(1)).unwrap();
    // A hand-built hello (FORMAT.md), then a put that stops mid-head.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(&frame(1, &PROTOCOL_VERSION.to_le_bytes(), 0))
        .unwrap();
    let mut welcome = [0u8; FRAME_HEADER_BYTES];
    s.read_exact(&mut welcome).unwrap();
    assert_eq!(welcome[4], 2, "welcome");
    // A put header that promises 1 KiB of head, then the connection closes.
    let mut partial = frame(3, b"", 0);
    partial[8..16].copy_from_slice(&1024u64.to_le_bytes());
    partial.extend_from_slice(&[0; 100]);
    s.write_all(&partial).unwrap();
    drop(s);
    let got = c.latest("m").unwrap().unwrap();
    assert_eq!(got.tensors, state(1));
    assert_eq!(got.info.name, "one");
    k.shutdown().unwrap();
}

#[test]
fn a_keeper_that_is_gone_gives_io_errors_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    match KeeperClient::connect(&sock) {
        Err(Error::Io { path, .. }) => assert_eq!(path, sock),
        other => panic!("{other:?}"),
    }
    let k = keeper(dir.path(), KeeperOptions::default());
    let mut c = KeeperClient::connect(dir.path().join("k.sock")).unwrap();
    c.put("m", "a", &[], &state(1)).unwrap();
    k.shutdown().unwrap();
    assert!(matches!(c.latest("m"), Err(Error::Io { .. })));
    assert!(matches!(c.flush(), Err(Error::Io { .. })));
    // Its store is complete and readable.
    let store = Store::open(dir.path().join("store")).unwrap();
    assert!(store.verify().unwrap().failed.is_empty());
}

#[test]
fn a_second_keeper_on_the_same_store_or_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _k = keeper(dir.path(), KeeperOptions::default());
    let again = Store::open_or_create(dir.path().join("store"), Policy::default()).unwrap();
    assert!(Keeper::spawn(again, dir.path().join("k2.sock"), KeeperOptions::default()).is_err());
    let other = Store::open_or_create(dir.path().join("store2"), Policy::default()).unwrap();
    assert!(Keeper::spawn(other, dir.path().join("k.sock"), KeeperOptions::default()).is_err());
}
