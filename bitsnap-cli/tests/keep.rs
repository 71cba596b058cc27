//! `bitsnap keep` as a real process, with trainers as real processes that are killed.
//!
//! `harness = false`: this binary is both the test runner and, re-executed with
//! `BITSNAP_KEEP_TEST_ROLE` set, the trainer and restorer children the tests kill and
//! start (so no test function doubles as a child entry point).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

use bitsnap_core::keeper::KeeperClient;
use bitsnap_core::{DType, Error, Role, Store, Tensor};

const BIN: &str = env!("CARGO_BIN_EXE_bitsnap");
/// Which child this process is (unset: the test runner).
const ROLE: &str = "BITSNAP_KEEP_TEST_ROLE";
/// The keeper's socket, for the children.
const SOCKET: &str = "BITSNAP_KEEP_TEST_SOCKET";
const SERIES: &str = "train";

fn main() {
    match std::env::var(ROLE).ok().as_deref() {
        Some("trainer") => return trainer(),
        Some("restorer") => return restorer(),
        Some(other) => panic!("unknown {ROLE} {other}"),
        None => {}
    }
    let tests: &[(&str, fn())] = &[
        (
            "a_killed_trainer_restarts_from_keeper_memory",
            a_killed_trainer_restarts_from_keeper_memory,
        ),
        (
            "a_killed_keeper_fails_clients_cleanly_and_its_store_serves_the_restart",
            a_killed_keeper_fails_clients_cleanly_and_its_store_serves_the_restart,
        ),
        (
            "sigterm_persists_the_latest_of_every_series",
            sigterm_persists_the_latest_of_every_series,
        ),
        (
            "two_clients_and_a_hostile_one",
            two_clients_and_a_hostile_one,
        ),
        ("usage_errors", usage_errors),
    ];
    // `cargo test --test keep NAME` runs the tests whose name contains NAME.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mut ran = 0;
    for (name, test) in tests {
        if filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())) {
            print!("test {name} ... ");
            std::io::stdout().flush().unwrap();
            test();
            println!("ok");
            ran += 1;
        }
    }
    println!("\ntest result: ok. {ran} passed; 0 failed");
}

/// The training state at `step`: 3 MiB of weights and moments that change every step,
/// and the step counter. Deterministic, so any process can check a snapshot bit for bit.
fn state(step: u64) -> Vec<Tensor> {
    let n = 256 * 1024;
    let w: Vec<f32> = (0..n)
        .map(|i| ((i as u64 * 31 + step * 7) % 1000) as f32 * 1e-3)
        .collect();
    let m1: Vec<f32> = w.iter().map(|x| x * 1e-2 + step as f32).collect();
    let m2: Vec<f32> = w.iter().map(|x| x * x * 1e-4).collect();
    vec![
        Tensor::from_f32("w", &[512, 512], Role::Weight, &w).unwrap(),
        Tensor::from_f32("w.moment_1", &[512, 512], Role::OptimizerMoment(1), &m1).unwrap(),
        Tensor::from_f32("w.moment_2", &[512, 512], Role::OptimizerMoment(2), &m2).unwrap(),
        Tensor::new(
            "step",
            DType::U64,
            vec![],
            Role::Other,
            step.to_le_bytes().to_vec(),
        )
        .unwrap(),
    ]
}

fn meta(step: u64) -> Vec<(String, String)> {
    vec![("bitsnap.step".into(), step.to_string())]
}

fn step_of(s: &bitsnap_core::Snapshot) -> u64 {
    s.metadata
        .iter()
        .find(|(k, _)| k == "bitsnap.step")
        .and_then(|(_, v)| v.parse().ok())
        .expect("bitsnap.step")
}

/// Child: puts a snapshot every step and prints `acked N` once the keeper holds step N.
fn trainer() {
    let socket = std::env::var(SOCKET).unwrap();
    let mut c = KeeperClient::connect(&socket).unwrap();
    let mut out = std::io::stdout().lock();
    for step in 1..=100_000 {
        c.put(SERIES, &format!("step-{step}"), &meta(step), &state(step))
            .unwrap();
        writeln!(out, "acked {step}").unwrap();
        out.flush().unwrap();
    }
}

/// Child: a restarted trainer. Gets the latest snapshot (it is not told where the store
/// is), checks it bit for bit against the state of its step, prints `restored N memory`
/// (or `disk`), then flushes and prints `flushed`.
fn restorer() {
    let socket = std::env::var(SOCKET).unwrap();
    let mut c = KeeperClient::connect(&socket).unwrap();
    let s = c
        .latest(SERIES)
        .unwrap()
        .expect("the keeper has a snapshot");
    let step = step_of(&s);
    assert_eq!(s.tensors, state(step), "bit for bit");
    assert_eq!(s.info.name, format!("step-{step}"));
    let from = if s.from_memory { "memory" } else { "disk" };
    println!("restored {step} {from}");
    std::io::stdout().flush().unwrap();
    c.flush().unwrap();
    println!("flushed");
}

fn child(role: &str, socket: &Path) -> (Child, BufReader<ChildStdout>) {
    let mut c = Command::new(std::env::current_exe().unwrap())
        .env(ROLE, role)
        .env(SOCKET, socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(c.stdout.take().unwrap());
    (c, out)
}

/// A running `bitsnap keep`; killed when dropped.
struct KeeperProcess {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl KeeperProcess {
    fn start(store: &Path, socket: &Path, args: &[&str]) -> KeeperProcess {
        let mut child = Command::new(BIN)
            .arg("keep")
            .arg(store)
            .arg("--socket")
            .arg(socket)
            .args(args)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut ready = String::new();
        out.read_line(&mut ready).unwrap();
        assert!(ready.starts_with("keeping "), "{ready:?}");
        KeeperProcess { child, out }
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name}");
    }
}

impl Drop for KeeperProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn a_killed_trainer_restarts_from_keeper_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (store, socket) = (dir.path().join("store"), dir.path().join("k.sock"));
    // Nothing is persisted before a flush: whatever the restart gets cannot come from disk.
    let _keeper = KeeperProcess::start(
        &store,
        &socket,
        &["--persist-every", "0", "--keep-in-memory", "2"],
    );
    let (mut trainer, mut lines) = child("trainer", &socket);
    let mut last_acked = 0;
    let mut line = String::new();
    while last_acked < 8 {
        line.clear();
        assert!(
            lines.read_line(&mut line).unwrap() > 0,
            "trainer ended early"
        );
        last_acked = line.trim().strip_prefix("acked ").unwrap().parse().unwrap();
    }
    // SIGKILL mid-run: the trainer is putting step last_acked + 1 (or about to).
    trainer.kill().unwrap();
    trainer.wait().unwrap();
    assert!(
        Store::open(&store).unwrap().snapshots().is_empty(),
        "nothing on disk yet"
    );

    let (mut restorer, mut lines) = child("restorer", &socket);
    let mut restored = String::new();
    lines.read_line(&mut restored).unwrap();
    let mut flushed = String::new();
    lines.read_line(&mut flushed).unwrap();
    assert!(
        restorer.wait().unwrap().success(),
        "restorer: {restored:?} {flushed:?}"
    );
    let parts: Vec<&str> = restored.split_whitespace().collect();
    assert_eq!(parts.first(), Some(&"restored"), "{restored:?}");
    assert_eq!(parts.get(2), Some(&"memory"), "{restored:?}");
    let step: u64 = parts[1].parse().unwrap();
    // The last acknowledged put, or the one after it if the keeper had received all of
    // it when the trainer died (a put cut short is discarded).
    assert!(
        step == last_acked || step == last_acked + 1,
        "restored {step}, acked {last_acked}"
    );
    assert_eq!(flushed.trim(), "flushed");

    // After the flush the store has it, bit for bit.
    let s = Store::open(&store).unwrap();
    let id = s.latest_in(SERIES).unwrap().id;
    let on_disk = s.load(id).unwrap();
    assert_eq!(on_disk.tensors, state(step));
    assert_eq!(step_of(&on_disk), step);
}

fn a_killed_keeper_fails_clients_cleanly_and_its_store_serves_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (store, socket) = (dir.path().join("store"), dir.path().join("k.sock"));
    let mut keeper = KeeperProcess::start(&store, &socket, &["--persist-every", "1"]);
    let mut c = KeeperClient::connect(&socket).unwrap();
    for step in 1..=2 {
        c.put(SERIES, &format!("step-{step}"), &meta(step), &state(step))
            .unwrap();
    }
    c.flush().unwrap();
    c.put(SERIES, "step-3", &meta(3), &state(3)).unwrap();
    keeper.child.kill().unwrap();
    keeper.child.wait().unwrap();

    match c.put(SERIES, "step-4", &meta(4), &state(4)) {
        Err(Error::Io { path, .. }) => assert_eq!(path, socket),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    match KeeperClient::connect(&socket) {
        Err(Error::Io { path, source }) => {
            assert_eq!(path, socket);
            assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused);
        }
        other => panic!("expected connection refused, got {other:?}"),
    }
    // The store is whole: step 2 (flushed) or 3 (if its background save finished).
    let s = Store::open(&store).unwrap();
    let report = s.verify().unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let latest = s.load(s.latest_in(SERIES).unwrap().id).unwrap();
    let on_disk = step_of(&latest);
    assert!(on_disk == 2 || on_disk == 3);
    assert_eq!(latest.tensors, state(on_disk));

    // A keeper restarted on the same (stale) socket starts empty and serves the store.
    let _again = KeeperProcess::start(&store, &socket, &[]);
    let (mut restorer, mut lines) = child("restorer", &socket);
    let mut restored = String::new();
    lines.read_line(&mut restored).unwrap();
    assert!(restorer.wait().unwrap().success());
    assert_eq!(restored.trim(), format!("restored {on_disk} disk"));
}

fn sigterm_persists_the_latest_of_every_series() {
    let dir = tempfile::tempdir().unwrap();
    let (store, socket) = (dir.path().join("store"), dir.path().join("k.sock"));
    let mut keeper = KeeperProcess::start(&store, &socket, &["--persist-every", "0"]);
    let mut c = KeeperClient::connect(&socket).unwrap();
    for step in 1..=4 {
        c.put(SERIES, &format!("step-{step}"), &meta(step), &state(step))
            .unwrap();
    }
    c.put("other", "o", &[], &state(40)).unwrap();
    keeper.signal("TERM");
    let status = keeper.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let mut rest = String::new();
    keeper.out.read_to_string(&mut rest).unwrap();
    assert!(
        rest.starts_with("stopped on SIGTERM after 5 puts: 2 snapshots saved"),
        "{rest:?}"
    );
    assert!(!socket.exists(), "the socket is removed");
    let s = Store::open(&store).unwrap();
    assert_eq!(s.snapshots().len(), 2);
    assert_eq!(
        s.load(s.latest_in(SERIES).unwrap().id).unwrap().tensors,
        state(4)
    );
    assert_eq!(
        s.load(s.latest_in("other").unwrap().id).unwrap().tensors,
        state(40)
    );
}

fn two_clients_and_a_hostile_one() {
    let dir = tempfile::tempdir().unwrap();
    let (store, socket) = (dir.path().join("store"), dir.path().join("k.sock"));
    let _keeper = KeeperProcess::start(&store, &socket, &["--persist-every", "2"]);
    let clients: Vec<_> = [("a", 0u64), ("b", 1000)]
        .into_iter()
        .map(|(series, salt)| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut c = KeeperClient::connect(&socket).unwrap();
                for step in 1..=6 {
                    c.put(series, "s", &meta(step + salt), &state(step + salt))
                        .unwrap();
                }
                c.flush().unwrap();
            })
        })
        .collect();
    // Meanwhile, bytes that are not a keeper frame: refused with a reason, then closed.
    let mut hostile = UnixStream::connect(&socket).unwrap();
    hostile.write_all(&[0xff; 64]).unwrap();
    let mut answer = Vec::new();
    hostile.read_to_end(&mut answer).unwrap();
    assert_eq!(&answer[..4], b"BSKP");
    assert_eq!(answer[4], 9, "a failed frame");
    for c in clients {
        c.join().unwrap();
    }
    let s = Store::open(&store).unwrap();
    for (series, salt) in [("a", 0), ("b", 1000)] {
        let latest = s.load(s.latest_in(series).unwrap().id).unwrap();
        assert_eq!(latest.tensors, state(6 + salt));
    }
    let mut c = KeeperClient::connect(&socket).unwrap();
    let a = c.latest("a").unwrap().unwrap();
    assert!(a.from_memory);
    assert_eq!(a.tensors, state(6));
}

fn usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(BIN)
        .args(["keep", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "--socket is required");
    let not_a_socket = dir.path().join("file");
    std::fs::write(&not_a_socket, b"x").unwrap();
    let o = Command::new(BIN)
        .arg("keep")
        .arg(dir.path().join("store"))
        .arg("--socket")
        .arg(&not_a_socket)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not a socket"), "{err}");
}
