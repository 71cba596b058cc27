//! The keeper itself: listens on a Unix-domain socket, holds what clients put, answers
//! `latest` from memory (or from its store when memory has nothing), and persists in the
//! background.

use std::collections::HashMap;
use std::io::{BufReader, ErrorKind};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::memory::{Held, Memory};
use super::persist::{PersistCounts, Persister};
use super::wire::{self, Frame, HeadReader, HeadWriter, Kind, PROTOCOL_VERSION, SnapshotHead};
use crate::backend::Backend;
use crate::{Error, Store};

/// Reads from a client go through a buffer of this size (bulk tensor reads bypass it).
const READ_BUFFER_BYTES: usize = 256 << 10;

/// How a keeper runs. Every setter documents its default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeeperOptions {
    persist_every: u64,
    keep_in_memory: usize,
    max_snapshot_bytes: u64,
}

impl Default for KeeperOptions {
    fn default() -> Self {
        KeeperOptions {
            persist_every: 1,
            keep_in_memory: 1,
            max_snapshot_bytes: crate::default_decode_budget(),
        }
    }
}

impl KeeperOptions {
    /// Persist every `n`-th put of each series (and always the latest on flush and
    /// shutdown). Default 1: every put. 0 is taken as "only on flush and shutdown".
    pub fn with_persist_every(mut self, n: u64) -> KeeperOptions {
        self.persist_every = n;
        self
    }

    /// Hold the latest `k` snapshots of each series in memory (at least 1). Default 1.
    pub fn with_keep_in_memory(mut self, k: usize) -> KeeperOptions {
        self.keep_in_memory = k.max(1);
        self
    }

    /// Refuse puts whose tensors total more than `bytes` (checked from the frame header,
    /// before anything is allocated). Default: [`crate::default_decode_budget`], half
    /// the machine's memory.
    pub fn with_max_snapshot_bytes(mut self, bytes: u64) -> KeeperOptions {
        self.max_snapshot_bytes = bytes;
        self
    }

    /// Every how many puts of a series one is persisted (0: only on flush/shutdown).
    pub fn persist_every(&self) -> u64 {
        self.persist_every
    }

    /// Snapshots held per series.
    pub fn keep_in_memory(&self) -> usize {
        self.keep_in_memory
    }

    /// Largest put accepted, in bytes of tensor data.
    pub fn max_snapshot_bytes(&self) -> u64 {
        self.max_snapshot_bytes
    }
}

/// What a keeper has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeeperStats {
    /// Puts held.
    pub puts: u64,
    /// Snapshots held in memory now.
    pub held: usize,
    /// Decoded bytes held in memory now.
    pub held_bytes: u64,
    /// Connections refused or closed for a malformed or hostile frame.
    pub bad_frames: u64,
    /// The persistence thread's counters.
    pub persist: PersistCounts,
}

struct Shared {
    socket: PathBuf,
    options: KeeperOptions,
    memory: Mutex<Memory>,
    persister: Persister,
    /// Opens a reader of the store for `latest` when memory has nothing.
    backend: Arc<dyn Backend>,
    stopping: AtomicBool,
    puts: AtomicU64,
    bad_frames: AtomicU64,
    next_conn: AtomicU64,
    conns: Mutex<HashMap<u64, UnixStream>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data consistent; a panic in one is not a reason
    // to stop serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running keeper: a listening socket, a thread per client and a persistence thread.
/// Dropping it shuts it down as [`Keeper::shutdown`] does (errors are logged).
///
/// ```
/// use bitsnap_core::keeper::{Keeper, KeeperClient, KeeperOptions};
/// use bitsnap_core::{Policy, Role, Store, Tensor};
///
/// let dir = tempfile::tempdir()?;
/// let store = Store::open_or_create(dir.path().join("store"), Policy::default())?;
/// let socket = dir.path().join("keeper.sock");
/// let keeper = Keeper::spawn(store, &socket, KeeperOptions::default().with_persist_every(0))?;
///
/// let mut client = KeeperClient::connect(&socket)?;
/// let w = Tensor::from_f32("w", &[3], Role::Weight, &[1.0, 2.0, 3.0])?;
/// let receipt = client.put("model", "step-1", &[("bitsnap.step".into(), "1".into())], &[w.clone()])?;
/// assert_eq!(receipt.bytes, 12);
/// // Held: a trainer killed now loses nothing. Served from the keeper's memory:
/// let latest = client.latest("model")?.expect("held");
/// assert!(latest.from_memory);
/// assert_eq!(latest.tensors, vec![w]);
/// client.flush()?; // now in the store too
/// assert_eq!(Store::open(dir.path().join("store"))?.snapshots().len(), 1);
/// keeper.shutdown()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Keeper {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    /// [`KEEPER_LOCK_FILE`], held while it runs (local stores).
    _one_per_store: Option<std::fs::File>,
}

/// File in a local store that its keeper holds locked (`flock`) while it runs, so that a
/// second keeper of the store is refused (FORMAT.md 1). Writers do not look at it.
pub const KEEPER_LOCK_FILE: &str = "KEEPER";

/// Takes [`KEEPER_LOCK_FILE`] of a local store (`None` for remote stores, which have no
/// locks); fails with `WouldBlock` naming it while another keeper holds it.
fn one_keeper_per_store(store: &Store) -> Result<Option<std::fs::File>, Error> {
    if !store.backend().exclusive() {
        return Ok(None);
    }
    let path = store.backend().path_of(KEEPER_LOCK_FILE);
    let f = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    f.try_lock().map_err(|e| match e {
        std::fs::TryLockError::WouldBlock => Error::io(
            &path,
            std::io::Error::new(ErrorKind::WouldBlock, "another keeper keeps this store"),
        ),
        std::fs::TryLockError::Error(e) => Error::io(&path, e),
    })?;
    Ok(Some(f))
}

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keeper")
            .field("socket", &self.shared.socket)
            .field("options", &self.shared.options)
            .finish()
    }
}

impl Keeper {
    /// Starts a keeper of `store` on `socket`: refuses a store another keeper keeps
    /// ([`KEEPER_LOCK_FILE`]), becomes one of the store's writers (a lease, and the debris
    /// of dead writers removed; other writers, `bitsnap prune` for one, may commit beside
    /// it), binds the socket (replacing a stale socket file left
    /// by a keeper that died; refusing if a live keeper answers there) and returns once
    /// clients can connect.
    pub fn spawn(
        mut store: Store,
        socket: impl AsRef<Path>,
        options: KeeperOptions,
    ) -> Result<Keeper, Error> {
        let socket = socket.as_ref().to_path_buf();
        let one_per_store = one_keeper_per_store(&store)?;
        store.become_writer()?;
        let listener = bind(&socket)?;
        let backend = store.backend().clone();
        let persister = Persister::start(store).map_err(|e| Error::io(&socket, e))?;
        let shared = Arc::new(Shared {
            socket: socket.clone(),
            memory: Mutex::new(Memory::new(options.keep_in_memory)),
            options,
            persister,
            backend,
            stopping: AtomicBool::new(false),
            puts: AtomicU64::new(0),
            bad_frames: AtomicU64::new(0),
            next_conn: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            workers: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name("bitsnap-keeper-accept".into())
            .spawn(move || accept_loop(listener, s))
            .map_err(|e| Error::io(&socket, e))?;
        tracing::info!(socket = %socket.display(), "keeper listening");
        Ok(Keeper {
            shared,
            accept: Some(accept),
            _one_per_store: one_per_store,
        })
    }

    /// The socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.shared.socket
    }

    /// Its options.
    pub fn options(&self) -> &KeeperOptions {
        &self.shared.options
    }

    /// What it has done so far.
    pub fn stats(&self) -> KeeperStats {
        let (held, held_bytes) = locked(&self.shared.memory).usage();
        KeeperStats {
            puts: self.shared.puts.load(Ordering::Relaxed),
            held,
            held_bytes,
            bad_frames: self.shared.bad_frames.load(Ordering::Relaxed),
            persist: self.shared.persister.counts(),
        }
    }

    /// Stops accepting, closes every connection, persists the latest snapshot of every
    /// series not persisted yet, ends the persistence thread (ending its writer lease)
    /// and removes the socket file. Returns the final counters, or the error of a save
    /// that failed.
    pub fn shutdown(mut self) -> Result<KeeperStats, Error> {
        self.stop()
    }

    fn stop(&mut self) -> Result<KeeperStats, Error> {
        let Some(accept) = self.accept.take() else {
            return Ok(self.stats());
        };
        let sh = &self.shared;
        sh.stopping.store(true, Ordering::SeqCst);
        // Wake the accept loop, then close every client's connection.
        let _ = UnixStream::connect(&sh.socket);
        let _ = accept.join();
        for (_, c) in locked(&sh.conns).drain() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        for w in std::mem::take(&mut *locked(&sh.workers)) {
            let _ = w.join();
        }
        let targets = locked(&sh.memory).latest_of_all();
        let flushed = sh.persister.flush(targets);
        sh.persister.stop();
        let _ = std::fs::remove_file(&sh.socket);
        let stats = self.stats();
        tracing::info!(socket = %sh.socket.display(), puts = stats.puts,
            saved = stats.persist.saved, skipped = stats.persist.skipped, "keeper stopped");
        flushed.map_err(|reason| Error::Keeper {
            socket: sh.socket.clone(),
            reason: format!("persisting on shutdown: {reason}"),
        })?;
        Ok(stats)
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!(error = %e, "keeper shutdown");
        }
    }
}

/// Binds `socket`, replacing a stale socket file whose keeper is gone.
fn bind(socket: &Path) -> Result<UnixListener, Error> {
    match UnixListener::bind(socket) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == ErrorKind::AddrInUse => {
            let is_socket = std::fs::symlink_metadata(socket)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            if !is_socket {
                return Err(Error::io(
                    socket,
                    std::io::Error::new(ErrorKind::AlreadyExists, "exists and is not a socket"),
                ));
            }
            if UnixStream::connect(socket).is_ok() {
                return Err(Error::io(
                    socket,
                    std::io::Error::new(ErrorKind::AddrInUse, "a keeper is listening here"),
                ));
            }
            tracing::info!(socket = %socket.display(), "replacing a stale keeper socket");
            std::fs::remove_file(socket).map_err(|e| Error::io(socket, e))?;
            UnixListener::bind(socket).map_err(|e| Error::io(socket, e))
        }
        Err(e) => Err(Error::io(socket, e)),
    }
}

fn accept_loop(listener: UnixListener, sh: Arc<Shared>) {
    for conn in listener.incoming() {
        if sh.stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "keeper accept");
                continue;
            }
        };
        let id = sh.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = stream.try_clone() {
            locked(&sh.conns).insert(id, c);
        }
        let s = sh.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("bitsnap-keeper-conn-{id}"))
            .spawn(move || {
                serve_connection(&s, stream);
                locked(&s.conns).remove(&id);
            });
        match spawned {
            Ok(h) => {
                let mut w = locked(&sh.workers);
                w.retain(|h| !h.is_finished());
                w.push(h);
            }
            Err(e) => tracing::error!(error = %e, "keeper cannot start a connection thread"),
        }
    }
}

/// Serves one client until it closes the connection or sends a bad frame.
fn serve_connection(sh: &Shared, stream: UnixStream) {
    let mut reader = match stream.try_clone() {
        Ok(s) => BufReader::with_capacity(READ_BUFFER_BYTES, s),
        Err(e) => {
            tracing::warn!(error = %e, "keeper connection");
            return;
        }
    };
    let mut writer = &stream;
    let mut greeted = false;
    loop {
        let frame = match wire::read_frame(&mut reader, &sh.socket, sh.options.max_snapshot_bytes) {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => return refuse(sh, &mut writer, &e),
        };
        if !greeted && frame.kind != Kind::Hello {
            let e = wire::malformed(
                &sh.socket,
                0,
                format!("expected hello, got {:?}", frame.kind),
            );
            return refuse(sh, &mut writer, &e);
        }
        let answer = match frame.kind {
            Kind::Hello => hello(sh, &frame).map(|head| {
                greeted = true;
                (Kind::Welcome, head)
            }),
            Kind::Put => match put(sh, &frame, &mut reader) {
                Ok((head, evicted)) => {
                    // Answer first, then free what the put displaced.
                    let sent = wire::write_frame(&mut writer, Kind::Held, &head, &[]);
                    let freed = locked(&sh.memory).recycle(evicted);
                    drop(freed);
                    if sent.is_err() {
                        return;
                    }
                    continue;
                }
                // The keeper's own limits, not the peer's bytes: report and go on.
                Err(e @ (Error::Alloc { .. } | Error::Keeper { .. })) => {
                    Ok((Kind::Failed, failed(&e)))
                }
                Err(e) => Err(e),
            },
            Kind::Latest => match latest(sh, &frame, &mut writer) {
                Ok(Ok(())) => continue,
                // The answer could not be written: the client is gone.
                Ok(Err(_)) => return,
                // The request or the store failed (a store error may be an I/O error
                // too): the connection stays usable.
                Err(e) => Ok((Kind::Failed, failed(&e))),
            },
            Kind::Flush => Ok(flush(sh)),
            other => Err(wire::malformed(
                &sh.socket,
                4,
                format!("a client may not send {other:?} frames"),
            )),
        };
        match answer {
            Ok((kind, head)) => {
                if wire::write_frame(&mut writer, kind, &head, &[]).is_err() {
                    return;
                }
            }
            Err(e) => return refuse(sh, &mut writer, &e),
        }
    }
}

/// Answers a frame that cannot be served (and after which the stream cannot be trusted)
/// with a `failed` frame, and closes the connection.
fn refuse(sh: &Shared, writer: &mut &UnixStream, e: &Error) {
    if matches!(e, Error::Io { .. }) {
        return; // the client went away
    }
    sh.bad_frames.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(error = %e, "keeper closed a connection after a bad frame");
    let _ = wire::write_frame(writer, Kind::Failed, &failed(e), &[]);
    let _ = writer.shutdown(std::net::Shutdown::Both);
}

/// The head of a `failed` frame for `e` (its reason alone if it is the keeper's own).
fn failed(e: &Error) -> Vec<u8> {
    match e {
        Error::Keeper { reason, .. } => failed_text(reason),
        e => failed_text(&e.to_string()),
    }
}

fn failed_text(message: &str) -> Vec<u8> {
    let mut h = HeadWriter::default();
    h.str(message);
    h.0
}

fn hello(sh: &Shared, frame: &Frame) -> Result<Vec<u8>, Error> {
    let mut r = HeadReader::new(&frame.head, &sh.socket);
    let version = r.u16()?;
    if version != PROTOCOL_VERSION {
        return Err(Error::UnsupportedVersion {
            file: sh.socket.clone(),
            version,
            supported: PROTOCOL_VERSION,
        });
    }
    let mut h = HeadWriter::default();
    h.u16(PROTOCOL_VERSION);
    h.u64(sh.options.persist_every);
    h.u64(sh.options.keep_in_memory as u64);
    h.u64(sh.options.max_snapshot_bytes);
    h.u32(std::process::id());
    Ok(h.0)
}

/// Holds a put; returns the `held` answer and the snapshots it displaced.
fn put(
    sh: &Shared,
    frame: &Frame,
    reader: &mut impl std::io::Read,
) -> Result<(Vec<u8>, Vec<Arc<Held>>), Error> {
    let mut r = HeadReader::new(&frame.head, &sh.socket);
    let head = SnapshotHead::decode(&mut r, frame.data_len)?;
    r.finish()?;
    let mut spare = locked(&sh.memory).take_spare(&head.series);
    let tensors = wire::read_tensors(reader, &head.tensors, &sh.socket, &mut spare)?;
    drop(spare);
    let hashes: Vec<u64> = head.tensors.iter().map(|t| t.hash).collect();
    let (held, count, evicted) = {
        let mut m = locked(&sh.memory);
        let seq = m.take_seq();
        let held = Arc::new(Held::new(
            seq,
            head.series,
            head.name,
            head.metadata,
            tensors,
            hashes,
        ));
        let (count, evicted) = m.hold(held.clone());
        (held, count, evicted)
    };
    sh.puts.fetch_add(1, Ordering::Relaxed);
    let every = sh.options.persist_every;
    let persist = every > 0 && count % every == 0;
    if persist {
        sh.persister.submit(held.clone());
    }
    let mut h = HeadWriter::default();
    h.u64(held.seq);
    h.u64(held.bytes());
    h.u8(u8::from(persist));
    Ok((h.0, evicted))
}

/// Where a `snapshot` answer comes from.
pub(crate) const SOURCE_MEMORY: u8 = 0;
pub(crate) const SOURCE_DISK: u8 = 1;

/// Answers `latest`. The outer error: the request or the store failed (nothing was
/// written); the inner one: writing the answer failed.
fn latest(
    sh: &Shared,
    frame: &Frame,
    writer: &mut &UnixStream,
) -> Result<std::io::Result<()>, Error> {
    let mut r = HeadReader::new(&frame.head, &sh.socket);
    let series = r.str(crate::MAX_NAME_BYTES, "series")?;
    r.finish()?;
    let held = locked(&sh.memory).latest(&series);
    let mut h = HeadWriter::default();
    if let Some(held) = held {
        let info = held.info();
        h.u8(1);
        h.u8(SOURCE_MEMORY);
        h.u64(held.seq);
        put_info(&mut h, &info);
        held.head().encode(&mut h);
        let data: Vec<&[u8]> = held.tensors.iter().map(|t| t.data.as_slice()).collect();
        return Ok(wire::write_frame(writer, Kind::Snapshot, &h.0, &data));
    }
    // Nothing held (a keeper restarted after a crash): the latest in the store.
    let store = Store::open_backend(sh.backend.clone())?;
    let Some(id) = store.latest_in(&series).map(|s| s.id) else {
        h.u8(0);
        return Ok(wire::write_frame(writer, Kind::Snapshot, &h.0, &[]));
    };
    let snap = store.load(id)?;
    h.u8(1);
    h.u8(SOURCE_DISK);
    h.u64(0);
    put_info(&mut h, &snap.info);
    let desc = SnapshotHead::describe(&series, &snap.info.name, &snap.metadata, &snap.tensors)?;
    desc.encode(&mut h);
    let data: Vec<&[u8]> = snap.tensors.iter().map(|t| t.data.as_slice()).collect();
    Ok(wire::write_frame(writer, Kind::Snapshot, &h.0, &data))
}

/// The store's view of a snapshot in a `snapshot` answer (see FORMAT.md).
fn put_info(h: &mut HeadWriter, info: &crate::SnapshotInfo) {
    h.u64(info.id);
    h.u64(info.base.unwrap_or(0));
    h.u64(info.state_hash);
    h.u64(info.stored_bytes);
    h.str(&info.file);
}

fn flush(sh: &Shared) -> (Kind, Vec<u8>) {
    let targets = locked(&sh.memory).latest_of_all();
    match sh.persister.flush(targets) {
        Ok(c) => {
            let mut h = HeadWriter::default();
            h.u64(c.saved);
            h.u64(c.skipped);
            (Kind::Flushed, h.0)
        }
        Err(reason) => (Kind::Failed, failed_text(&format!("persisting: {reason}"))),
    }
}
