//! Readers and writers of one store at the same time: the commit lock covers each commit
//! only, so readers never wait for a save, two writers both commit, a save whose base
//! another writer deleted never commits a dangling delta, and a writer that starts
//! cleans up after dead writers but never touches a live writer's files in progress.
//!
//! Interleavings are forced with a backend that parks a save (or kills its process)
//! right after its snapshot file is written and before its commit: no timing.

mod common;

use std::any::Any;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use bitsnap_core::backend::{Backend, LocalDir, ObjectVersion, ObjectWriter};
use bitsnap_core::{DType, Error, Policy, Retention, Role, Store, Tensor};
use common::{mutate, random_tensor};

/// What a [`Gated`] backend does once a save's snapshot file is written (renamed into
/// place, not committed).
#[derive(Debug)]
enum Then {
    /// Waits at `parked`, then at `release`: the test acts in between.
    Park { parked: Barrier, release: Barrier },
    /// Kills the process (a crash after the file, before the manifest).
    Abort,
}

/// A local directory whose next finished snapshot file triggers `then` (once armed).
#[derive(Debug)]
struct Gated {
    inner: LocalDir,
    armed: Arc<AtomicBool>,
    then: Arc<Then>,
}

impl Gated {
    fn new(dir: &Path, then: Then) -> Gated {
        Gated {
            inner: LocalDir::new(dir),
            armed: Arc::new(AtomicBool::new(false)),
            then: Arc::new(then),
        }
    }
}

struct GatedWriter {
    inner: Box<dyn ObjectWriter>,
    armed: Arc<AtomicBool>,
    then: Arc<Then>,
}

impl Write for GatedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl ObjectWriter for GatedWriter {
    fn finish(self: Box<Self>) -> Result<u64, Error> {
        let n = self.inner.finish()?;
        if self.armed.swap(false, Ordering::SeqCst) {
            match &*self.then {
                Then::Park { parked, release } => {
                    parked.wait();
                    release.wait();
                }
                Then::Abort => std::process::abort(),
            }
        }
        Ok(n)
    }
}

impl Backend for Gated {
    fn location(&self) -> &Path {
        self.inner.location()
    }
    fn exclusive(&self) -> bool {
        self.inner.exclusive()
    }
    fn lock(&self) -> Result<Option<Box<dyn Any + Send + Sync>>, Error> {
        self.inner.lock()
    }
    fn lease(&self, nonce: u64) -> Result<Option<Box<dyn Any + Send + Sync>>, Error> {
        self.inner.lease(nonce)
    }
    fn lease_alive(&self, nonce: u64) -> Result<bool, Error> {
        self.inner.lease_alive(nonce)
    }
    fn reserve(&self, name: &str) -> Result<(), Error> {
        self.inner.reserve(name)
    }
    fn unreserve(&self, name: &str) -> Result<(), Error> {
        self.inner.unreserve(name)
    }
    fn list(&self) -> Result<Vec<String>, Error> {
        self.inner.list()
    }
    fn size(&self, name: &str) -> Result<Option<u64>, Error> {
        self.inner.size(name)
    }
    fn read(&self, name: &str, limit: u64) -> Result<Option<Vec<u8>>, Error> {
        self.inner.read(name, limit)
    }
    fn read_range(&self, name: &str, range: Range<u64>) -> Result<Vec<u8>, Error> {
        self.inner.read_range(name, range)
    }
    fn create(&self, name: &str) -> Result<Box<dyn ObjectWriter>, Error> {
        Ok(Box::new(GatedWriter {
            inner: self.inner.create(name)?,
            armed: self.armed.clone(),
            then: self.then.clone(),
        }))
    }
    fn remove(&self, name: &str) -> Result<(), Error> {
        self.inner.remove(name)
    }
    fn sync(&self) -> Result<(), Error> {
        self.inner.sync()
    }
    fn read_versioned(
        &self,
        name: &str,
        limit: u64,
    ) -> Result<Option<(Vec<u8>, ObjectVersion)>, Error> {
        self.inner.read_versioned(name, limit)
    }
    fn commit_manifest(
        &self,
        name: &str,
        bytes: &[u8],
        expected: Option<&ObjectVersion>,
    ) -> Result<ObjectVersion, Error> {
        self.inner.commit_manifest(name, bytes, expected)
    }
}

/// A save parked between its file and its commit, on its own thread.
struct Parked {
    gate: Arc<Then>,
    thread: std::thread::JoinHandle<(Store, Result<bitsnap_core::SaveReport, Error>)>,
}

impl Parked {
    /// Starts saving `tensors` as `name` through a gated handle on `dir` and returns once
    /// the snapshot file is written and the commit not begun.
    fn start(dir: &Path, name: &str, tensors: Vec<Tensor>) -> Parked {
        let gated = Gated::new(
            dir,
            Then::Park {
                parked: Barrier::new(2),
                release: Barrier::new(2),
            },
        );
        let (armed, gate) = (gated.armed.clone(), gated.then.clone());
        let mut store = Store::open_backend(Arc::new(gated)).unwrap();
        armed.store(true, Ordering::SeqCst);
        let name = name.to_string();
        let thread = std::thread::spawn(move || {
            let r = store.save(&name, tensors);
            (store, r)
        });
        let Then::Park { parked, .. } = &*gate else {
            unreachable!()
        };
        parked.wait();
        Parked { gate, thread }
    }

    /// Lets the save commit; returns the store and what the save returned.
    fn finish(self) -> (Store, Result<bitsnap_core::SaveReport, Error>) {
        let Then::Park { release, .. } = &*self.gate else {
            unreachable!()
        };
        release.wait();
        self.thread.join().unwrap()
    }
}

/// A weight of 64 Ki f32 and its step-`k` version (a few elements changed: a delta).
fn weight(k: u64) -> Tensor {
    let base = random_tensor("w", DType::F32, &[1 << 16], Role::Weight, 7);
    if k == 0 { base } else { mutate(&base, 2, k) }
}

/// Names of the files in `dir` that start with `snap-`, sorted.
fn snapshot_files(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("snap-"))
        .collect();
    out.sort();
    out
}

/// Every listed snapshot loads, `verify` passes and no file is left unlisted.
fn check_clean(dir: &Path) -> Store {
    let store = Store::open(dir).unwrap();
    let report = store.verify().unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert!(report.orphans.is_empty(), "{:?}", report.orphans);
    let listed: Vec<String> = store
        .snapshots()
        .iter()
        .chain(store.retired())
        .flat_map(|s| {
            std::iter::once(s.file.clone()).chain(s.shards.iter().map(|h| h.file.clone()))
        })
        .collect();
    for f in snapshot_files(dir) {
        assert!(listed.contains(&f), "{f} is not listed");
    }
    store
}

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

/// A save parked between writing its file and committing it holds no lock: meanwhile a
/// reader loads, and a second writer (another handle) saves, pins, prunes and deletes,
/// every change committing at once. Then the first save commits too, with an id the
/// second writer's saves did not take. Before commit-only locking the second writer
/// failed with `WouldBlock` on `LOCK` (the parked save held it); with a cleanup that
/// ignored leases it removed the parked save's file as debris (the commit then listed a
/// missing file and `check_clean` failed).
#[test]
fn a_parked_save_blocks_neither_readers_nor_another_writer() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    b.save("s0", vec![weight(0)]).unwrap();
    b.save("s1", vec![weight(1)]).unwrap();
    let parked = Parked::start(dir.path(), "a", vec![weight(2)]);
    // The parked save's file is there, unlisted.
    assert_eq!(snapshot_files(dir.path()).len(), 3);
    // A reader.
    let reader = Store::open(dir.path()).unwrap();
    assert_eq!(reader.load(2).unwrap().tensors, vec![weight(1)]);
    // Another writer: everything commits while the save is parked.
    let b3 = b.save("b3", vec![weight(3)]).unwrap();
    let b4 = b.save("b4", vec![weight(4)]).unwrap();
    b.pin(b3.info.id).unwrap();
    b.unpin(b3.info.id).unwrap();
    b.delete(b4.info.id).unwrap();
    let pruned = b
        .prune(None, &Retention::default().with_keep_last(2))
        .unwrap();
    assert_eq!(pruned.deleted, vec![1]);
    let (a, saved) = parked.finish();
    let saved = saved.unwrap();
    // Its id was reserved before b's saves: below theirs, committed after them.
    assert!(
        saved.info.id < b3.info.id,
        "{} vs {}",
        saved.info.id,
        b3.info.id
    );
    assert_eq!(a.latest().map(|s| s.id), Some(saved.info.id));
    assert_eq!(
        saved.info.base,
        Some(2),
        "a delta on the latest when it began"
    );
    let store = check_clean(dir.path());
    assert_eq!(store.load(saved.info.id).unwrap().tensors, vec![weight(2)]);
    assert_eq!(store.load(b3.info.id).unwrap().tensors, vec![weight(3)]);
}

/// Two writers (threads, one handle each) save into the same series and into their own
/// at once, from a barrier: every save commits, ids are unique, each snapshot decodes to
/// what was saved, whatever base it found. Before, the second writer failed with
/// `WouldBlock`; with ids taken from `next_id` at save time, one of two saves that
/// overlapped failed with a conflict.
#[test]
fn two_writers_saving_at_once_both_commit() {
    let dir = tempfile::tempdir().unwrap();
    Store::open_or_create(dir.path(), Policy::default()).unwrap();
    let start = Arc::new(Barrier::new(2));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (dir, start) = (dir.path().to_path_buf(), start.clone());
            std::thread::spawn(move || {
                let mut store = Store::open(&dir).unwrap();
                start.wait();
                let mut saved = Vec::new();
                for k in 0..6u64 {
                    let series = if k % 2 == 0 {
                        "shared"
                    } else {
                        ["a", "b"][w as usize]
                    };
                    let t = weight(1 + w * 100 + k);
                    let r = store
                        .save_in(series, &format!("w{w}-{k}"), vec![t.clone()], Vec::new())
                        .unwrap();
                    saved.push((r.info.id, t));
                }
                saved
            })
        })
        .collect();
    let saved: Vec<(u64, Tensor)> = writers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let store = check_clean(dir.path());
    assert_eq!(store.snapshots().len(), 12);
    let mut ids: Vec<u64> = saved.iter().map(|s| s.0).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 12, "ids are unique");
    for (id, t) in saved {
        assert_eq!(store.load(id).unwrap().tensors, vec![t], "snapshot {id}");
    }
}

/// A save encoded against a base that another writer deletes before the save commits.
/// If a listed delta (here the other writer's own save) still reads the base, the delete
/// retires it, the save commits onto it and keeps it retired even once that delta is
/// deleted too. Before commit-only locking the deleting writer was refused; with a
/// commit that wanted the base *listed*, the save failed although its base was intact.
#[test]
fn a_save_commits_onto_a_base_retired_meanwhile_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    b.save("s0", vec![weight(0)]).unwrap();
    b.save("s1", vec![weight(1)]).unwrap();
    let parked = Parked::start(dir.path(), "a", vec![weight(2)]);
    let other = b.save("b", vec![weight(3)]).unwrap();
    assert_eq!(other.info.base, Some(2));
    b.delete(2).unwrap();
    assert_eq!(
        b.retired().iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![2]
    );
    let (_a, saved) = parked.finish();
    let saved = saved.unwrap();
    assert_eq!(saved.info.base, Some(2));
    // Nothing listed but the parked save reads 2 now: it stays retired.
    b.delete(other.info.id).unwrap();
    assert_eq!(
        b.retired().iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![2]
    );
    let store = check_clean(dir.path());
    assert_eq!(store.load(saved.info.id).unwrap().tensors, vec![weight(2)]);
}

/// A save encoded against a base that another writer deletes outright (nothing listed
/// read it, so its file is removed) fails at its commit with a conflict naming the base,
/// commits nothing and leaves no file behind; the next save of that handle succeeds.
/// With the old commit check (the base listed at the writer's own last look) the delta
/// was committed onto a missing file: `check_clean`'s `verify` failed.
#[test]
fn a_save_whose_base_was_deleted_outright_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    b.save("s0", vec![weight(0)]).unwrap();
    b.save("s1", vec![weight(1)]).unwrap();
    let parked = Parked::start(dir.path(), "a", vec![weight(2)]);
    b.delete(2).unwrap();
    assert!(b.retired().is_empty());
    let (mut a, saved) = parked.finish();
    match saved {
        Err(Error::Conflict { reason, .. }) => {
            assert!(reason.contains("base snapshot 2 was deleted"), "{reason}")
        }
        other => panic!("expected a conflict naming the base, got {other:?}"),
    }
    let store = check_clean(dir.path());
    assert_eq!(
        store.snapshots().iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![1]
    );
    let again = a.save("a", vec![weight(2)]).unwrap();
    assert_eq!(again.info.base, Some(1));
    assert_eq!(
        check_clean(dir.path()).load(again.info.id).unwrap().tensors,
        vec![weight(2)]
    );
}

/// A writer whose commit lock another process holds waits; past its wait it fails,
/// naming the lock file and saying why, and commits nothing.
#[test]
fn a_commit_waits_for_the_lock_then_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    first.save("a", vec![weight(0)]).unwrap();
    // Someone holds the commit lock (as a stuck commit would). Taken with a blocking
    // `lock`: `first`'s own lock can outlive its save for a moment where another test
    // thread spawns a child process (the child's copy of the descriptor keeps the
    // flock until it execs), which made a `try_lock` here fail on a loaded CI box.
    let held = std::fs::File::options()
        .write(true)
        .open(dir.path().join(bitsnap_core::LOCK_FILE))
        .unwrap();
    held.lock().unwrap();
    let backend = LocalDir::new(dir.path()).with_lock_wait(Duration::from_millis(50));
    let mut second = Store::open_backend(Arc::new(backend)).unwrap();
    match second.save("b", vec![weight(1)]) {
        Err(Error::Io { path, source }) => {
            assert!(path.ends_with(bitsnap_core::LOCK_FILE), "{path:?}");
            assert_eq!(source.kind(), std::io::ErrorKind::WouldBlock);
            assert!(source.to_string().contains("commit lock"), "{source}");
        }
        other => panic!("expected a lock error, got {other:?}"),
    }
    drop(held);
    // A writer commits once the lock is free (with the default wait: a child
    // process spawned meanwhile may hold a copy of `held` for a moment).
    let mut second = Store::open_backend(Arc::new(LocalDir::new(dir.path()))).unwrap();
    second.save("c", vec![weight(2)]).unwrap();
    let names: Vec<String> = check_clean(dir.path())
        .snapshots()
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(names, ["a", "c"]);
}

const CRASH_CHILD_ENV: &str = "BITSNAP_CONCURRENCY_CRASH_CHILD";

/// The crashing writer of [`a_dead_writers_leftovers_go_a_live_writers_stay`]: saves
/// into the store `BITSNAP_CONCURRENCY_CRASH_CHILD` names and kills its own process once
/// the snapshot file is written, before the commit. Ignored in a normal run (so it never
/// counts as a pass); run by that test with `--ignored --exact`.
#[test]
#[ignore = "the crashing child process of a_dead_writers_leftovers_go_a_live_writers_stay"]
fn crash_child_entry() {
    let dir = PathBuf::from(std::env::var_os(CRASH_CHILD_ENV).expect("names the store"));
    let gated = Gated::new(&dir, Then::Abort);
    gated.armed.store(true, Ordering::SeqCst);
    let mut store = Store::open_backend(Arc::new(gated)).unwrap();
    store.save("crashed", vec![weight(9)]).unwrap();
    unreachable!("the save aborts the process");
}

/// A writer process dies between writing its snapshot file and committing it, while
/// another writer's save is parked at the same point. The last good checkpoint is
/// intact; `verify` reports the dead writer's leftovers (its file and its lease) but not
/// the live writer's file; the next writer to start removes the former and keeps the
/// latter, which then commits. Before leases, cleanup removed every unlisted file: the
/// parked save's file too (its commit then listed a missing file).
#[test]
fn a_dead_writers_leftovers_go_a_live_writers_stay() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    store.save("good", vec![weight(0)]).unwrap();
    drop(store);
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "crash_child_entry",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD_ENV, dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the child must have died mid-save");
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("snap-") || n.starts_with("writer-"))
        .collect();
    assert_eq!(
        left.len(),
        3,
        "good snapshot, crashed snapshot, dead lease: {left:?}"
    );
    // The last good checkpoint is intact, and the dead writer's files are orphans.
    let reader = Store::open(dir.path()).unwrap();
    assert_eq!(reader.load(1).unwrap().tensors, vec![weight(0)]);
    let orphans = reader.verify().unwrap().orphans;
    assert_eq!(orphans.len(), 2, "{orphans:?}");
    // The next writer to start removes them; its own save parks with its file written.
    let parked = Parked::start(dir.path(), "live", vec![weight(1)]);
    for o in &orphans {
        assert!(!o.exists(), "{o:?} was not removed");
    }
    assert!(reader.verify().unwrap().orphans.is_empty());
    // Another writer starts (and cleans up) while it is parked: its file stays.
    let mut c = Store::open(dir.path()).unwrap();
    c.save("after", vec![weight(2)]).unwrap();
    let (_a, live) = parked.finish();
    let live = live.unwrap();
    let store = check_clean(dir.path());
    assert_eq!(store.load(live.info.id).unwrap().tensors, vec![weight(1)]);
    assert_eq!(store.snapshots().len(), 3);
}

/// Ranks write the shards of snapshot 10 while another writer saves: the save reserves
/// an id below the shards' (shard files do not count), so `next_id` stays at or below 10
/// and the sharded commit still succeeds. Counting them, the save took id 11 and the
/// sharded commit then failed: "snapshot id 10 was taken".
#[test]
fn a_save_beside_pending_shards_leaves_their_id_free() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    store.save("first", vec![weight(0)]).unwrap();
    for rank in 0..2u32 {
        let mut r = Store::open(dir.path()).unwrap();
        let t = random_tensor(&format!("part{rank}"), DType::F32, &[256], Role::Weight, 5);
        r.save_shard("model", 10, "step-10", rank, 2, vec![t], Vec::new())
            .unwrap();
    }
    let saved = store.save("beside", vec![weight(1)]).unwrap();
    assert!(saved.info.id < 10, "{}", saved.info.id);
    let info = store
        .commit_sharded("model", 10, "step-10", 2, Duration::from_secs(5))
        .unwrap();
    assert_eq!(info.id, 10);
    let store = check_clean(dir.path());
    assert_eq!(store.snapshots().len(), 3);
}
