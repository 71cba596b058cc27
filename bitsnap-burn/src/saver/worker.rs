//! The two background threads: one reads each snapshot back and holds it (or hands it to
//! the keeper), the other persists the snapshots due for the disk.
//!
//! ```text
//! submit ──queue (queue_depth, memory_budget)──▶ read-back thread ──held (latest)
//!                                                       │ every persist_every-th
//!                                                       ▼
//!                                         persist slot (one) ──▶ persist thread ──▶ Store
//! ```
//!
//! The read-back thread never waits for an encode or a write, except when a snapshot due
//! for the disk arrives while the previous one is still being written: then it waits,
//! unless [`StepSaverConfig::latest_wins`](super::StepSaverConfig::latest_wins) lets the
//! newer snapshot take the slot (replacing one already waiting there).

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bitsnap_core::keeper::KeeperClient;
use bitsnap_core::{Store, Tensor};

use super::{ReadBackStats, STEP_SERIES, SaveStats, step_name};
use crate::Error;
use crate::bridge::Metadata;

/// Reads a snapshot's tensors back from the device (runs on the read-back thread).
pub(super) type ReadBack =
    Box<dyn FnOnce() -> Result<(Vec<Tensor>, Metadata, ReadBackStats), Error> + Send>;

/// One snapshot handed over.
pub(super) struct Job {
    pub step: u64,
    pub read_back: ReadBack,
    /// Bytes the memory budget counts for it until it is read back.
    pub estimate: u64,
    /// When the training thread began handing it over.
    pub queued: Instant,
    /// How long the training thread waited for room (queue depth, memory budget).
    pub wait: Duration,
    /// 1 for the first snapshot handed over, then 2, 3, ...: decides which are persisted.
    pub seq: u64,
}

/// A snapshot read back: the latest is held (for restores in this process); those due for
/// the disk are shared with the persist thread.
pub(super) struct Snap {
    pub step: u64,
    /// Whether a keeper holds it too (and persists it): then the saver never writes it.
    pub kept: bool,
    pub tensors: Vec<Tensor>,
    pub metadata: Metadata,
}

/// A snapshot waiting for the persist thread.
pub(super) struct Pending {
    pub snap: Arc<Snap>,
    pub stats: SaveStats,
    /// Bytes the memory budget counts for it until it is persisted.
    pub accounted: u64,
}

#[derive(Default)]
pub(super) struct Progress {
    /// Snapshots handed over and not yet started by the read-back thread.
    pub queue: VecDeque<Job>,
    /// No more snapshots will be handed over: the read-back thread ends once it is idle.
    pub closed: bool,
    pub submitted: u64,
    pub started: u64,
    /// Snapshots the read-back thread is done with (held, handed on, or failed).
    pub done: u64,
    /// The snapshot waiting for the persist thread.
    pub slot: Option<Pending>,
    /// The step the persist thread is writing.
    pub persisting: Option<u64>,
    /// The read-back thread has ended: the persist thread ends once the slot is empty.
    pub persist_closed: bool,
    /// Step of the latest snapshot the persist thread finished with (persisted, or failed
    /// and reported): `flush` does not write it again.
    pub settled: Option<u64>,
    /// Bytes of state held by snapshots in flight (estimates until read back).
    pub in_flight: u64,
    /// Raw size of the latest snapshot read back.
    pub last_raw: Option<u64>,
    /// Failed saves not yet reported, oldest first: each call reports one.
    pub errors: VecDeque<Error>,
    pub stats: Vec<SaveStats>,
    pub stopped: Option<String>,
}

impl Progress {
    /// Every snapshot handed over has been read back (or failed).
    pub fn read_back(&self) -> bool {
        self.done >= self.submitted
    }

    /// Nothing is waiting for or being persisted.
    pub fn persisted(&self) -> bool {
        self.slot.is_none() && self.persisting.is_none()
    }
}

pub(super) struct Shared {
    /// The store the saver writes (each commit takes the store's lock only while it
    /// commits). Readers use it only when it is free; otherwise they open their own
    /// read-only view.
    pub store: Mutex<Store>,
    pub progress: Mutex<Progress>,
    pub changed: Condvar,
    /// The latest snapshot read back.
    pub held: Mutex<Option<Arc<Snap>>>,
    /// The keeper snapshots are handed to, while it answers.
    pub keeper: Mutex<Option<KeeperClient>>,
}

/// Every store change is committed by one rename, and the other guarded values are
/// replaced whole: a panic while a lock was held cannot have left them half-changed, so a
/// poisoned lock is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// The writer's store if no save holds it now.
    pub fn store_if_free(&self) -> Option<MutexGuard<'_, Store>> {
        match self.store.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    pub fn progress(&self) -> MutexGuard<'_, Progress> {
        lock(&self.progress)
    }

    pub fn held(&self) -> MutexGuard<'_, Option<Arc<Snap>>> {
        lock(&self.held)
    }

    pub fn keeper(&self) -> MutexGuard<'_, Option<KeeperClient>> {
        lock(&self.keeper)
    }

    /// Waits on `changed` (with a timeout, so that a caller can notice a dead thread).
    pub fn wait<'a>(&self, p: MutexGuard<'a, Progress>) -> MutexGuard<'a, Progress> {
        self.changed
            .wait_timeout(p, Duration::from_millis(200))
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0)
    }

    /// Hands a snapshot to the keeper, if one is connected; `false` when there is none
    /// (or it stopped answering: it is then dropped, and the saver persists by itself).
    fn hand_to_keeper(&self, step: u64, tensors: &[Tensor], metadata: &Metadata) -> bool {
        let mut keeper = self.keeper();
        let Some(client) = keeper.as_mut() else {
            return false;
        };
        match client.put(STEP_SERIES, &step_name(step), metadata, tensors) {
            Ok(receipt) => {
                tracing::debug!(step, seq = receipt.seq, "held by the keeper");
                true
            }
            Err(e) => {
                tracing::warn!(step, error = %e, "the keeper stopped answering: the saver persists by itself from now on");
                *keeper = None;
                false
            }
        }
    }
}

/// What persisting one snapshot did.
pub(super) struct Persisted {
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub full: bool,
    pub store: Duration,
    pub stages: bitsnap_core::SaveTimings,
    pub retention: Duration,
}

/// The tensors of `snap`, moved out when nobody else holds it, else copied.
pub(super) fn owned(snap: Arc<Snap>) -> (u64, Vec<Tensor>, Metadata) {
    match Arc::try_unwrap(snap) {
        Ok(s) => (s.step, s.tensors, s.metadata),
        Err(shared) => (shared.step, shared.tensors.clone(), shared.metadata.clone()),
    }
}

/// Saves a snapshot to the store and applies `keep_last`.
pub(super) fn persist(
    shared: &Shared,
    step: u64,
    tensors: Vec<Tensor>,
    metadata: Metadata,
    keep_last: Option<usize>,
) -> Result<Persisted, Error> {
    let t0 = Instant::now();
    let mut store = shared.store();
    let report = store.save_in(STEP_SERIES, &step_name(step), tensors, metadata)?;
    let stored = t0.elapsed();
    let t1 = Instant::now();
    if let Some(n) = keep_last {
        // Planned against the manifest as it is at commit time: another writer (a
        // `bitsnap prune` or `rm`) may have deleted some of them meanwhile.
        store.prune(
            Some(STEP_SERIES),
            &bitsnap_core::Retention::default().with_keep_last(n),
        )?;
    }
    Ok(Persisted {
        raw_bytes: report.info.raw_bytes,
        stored_bytes: report.info.stored_bytes,
        full: report.info.base.is_none(),
        store: stored,
        stages: report.timings,
        retention: t1.elapsed(),
    })
}

/// Settings the background threads need.
pub(super) struct WorkerConfig {
    pub keep_last: Option<usize>,
    pub persist_every: u64,
    pub latest_wins: bool,
    pub dir: PathBuf,
}

/// The message of a caught panic.
fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// Records a failed step, to be reported by one later call.
fn failed(p: &mut Progress, step: u64, outcome: Result<Error, String>, dir: &std::path::Path) {
    let source = match outcome {
        Ok(e) => {
            tracing::error!(step, error = %e, "background save failed");
            e
        }
        Err(msg) => {
            tracing::error!(step, panic = %msg, "background save panicked");
            Error::Panicked {
                store: dir.to_path_buf(),
                message: msg,
            }
        }
    };
    // Every failed step is reported, one per call: none is silently lost.
    p.errors.push_back(Error::Background {
        step,
        source: Box::new(source),
    });
}

/// The read-back thread's loop.
pub(super) fn read_loop(shared: Arc<Shared>, config: &WorkerConfig) {
    // Sequence number of the latest snapshot read back.
    let mut last_seq: u64 = 0;
    loop {
        let job = {
            let mut p = shared.progress();
            loop {
                if let Some(job) = p.queue.pop_front() {
                    p.started += 1;
                    break Some(job);
                }
                if p.closed {
                    break None;
                }
                p = shared.changed.wait(p).unwrap_or_else(|e| e.into_inner());
            }
        };
        let Some(job) = job else { break };
        shared.changed.notify_all();
        read_one(&shared, config, job, &mut last_seq);
    }
    shared.progress().persist_closed = true;
    shared.changed.notify_all();
}

/// Reads one snapshot back and holds it, hands it to the keeper or to the persist thread.
fn read_one(shared: &Shared, config: &WorkerConfig, job: Job, last_seq: &mut u64) {
    let step = job.step;
    let t0 = Instant::now();
    let read = std::panic::catch_unwind(AssertUnwindSafe(job.read_back));
    let readback = t0.elapsed();
    let (tensors, metadata, read) = match read {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return finish_failed(shared, config, step, job.estimate, Ok(e)),
        Err(panic) => {
            let msg = panic_message(panic);
            return finish_failed(shared, config, step, job.estimate, Err(msg));
        }
    };
    let raw: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
    {
        let mut p = shared.progress();
        p.in_flight = p.in_flight.saturating_sub(job.estimate) + raw;
        p.last_raw = Some(raw);
    }
    // Persisted: the snapshot that crosses a multiple of `persist_every` (the first
    // after it when the one at it failed).
    let due = job.seq / config.persist_every > *last_seq / config.persist_every;
    *last_seq = job.seq;
    let kept = shared.hand_to_keeper(step, &tensors, &metadata);
    let snap = Arc::new(Snap {
        step,
        kept,
        tensors,
        metadata,
    });
    *shared.held() = Some(snap.clone());
    let stats = SaveStats {
        step,
        wait: job.wait,
        readback,
        read,
        encode_write: Duration::ZERO,
        stages: Default::default(),
        retention: Duration::ZERO,
        raw_bytes: raw,
        stored_bytes: 0,
        full: false,
        persisted: false,
        replaced: 0,
    };
    tracing::debug!(
        step,
        raw,
        readback_ms = readback.as_millis() as u64,
        since_handed_over_ms = job.queued.elapsed().as_millis() as u64,
        "snapshot read back"
    );
    let mut p = shared.progress();
    if kept || !due {
        p.in_flight = p.in_flight.saturating_sub(raw);
        p.stats.push(stats);
    } else {
        let mut pending = Pending {
            snap,
            stats,
            accounted: raw,
        };
        // Without `latest_wins` a snapshot due for the disk waits until the previous one is
        // written: at most one snapshot waits for the disk beyond the one being written
        // and the one queued, as when one thread did both.
        while !config.latest_wins && p.persisting.is_some() && p.stopped.is_none() {
            p = shared.wait(p);
        }
        while let Some(waiting) = p.slot.take() {
            if config.latest_wins {
                // The newer snapshot takes the place of the one not yet started: it stays
                // unpersisted (it was held until this one replaced it).
                p.in_flight = p.in_flight.saturating_sub(waiting.accounted);
                pending.stats.replaced += waiting.stats.replaced + 1;
                p.stats.push(waiting.stats);
                break;
            }
            p.slot = Some(waiting);
            if p.stopped.is_some() {
                break;
            }
            p = shared.wait(p);
        }
        if p.slot.is_none() {
            p.slot = Some(pending);
        }
    }
    p.done += 1;
    drop(p);
    shared.changed.notify_all();
}

fn finish_failed(
    shared: &Shared,
    config: &WorkerConfig,
    step: u64,
    estimate: u64,
    outcome: Result<Error, String>,
) {
    let mut p = shared.progress();
    p.in_flight = p.in_flight.saturating_sub(estimate);
    failed(&mut p, step, outcome, &config.dir);
    p.done += 1;
    drop(p);
    shared.changed.notify_all();
}

/// The persist thread's loop.
pub(super) fn persist_loop(shared: Arc<Shared>, config: &WorkerConfig) {
    loop {
        let pending = {
            let mut p = shared.progress();
            loop {
                if let Some(pending) = p.slot.take() {
                    p.persisting = Some(pending.snap.step);
                    break Some(pending);
                }
                if p.persist_closed {
                    break None;
                }
                p = shared.changed.wait(p).unwrap_or_else(|e| e.into_inner());
            }
        };
        let Some(Pending {
            snap,
            mut stats,
            accounted,
        }) = pending
        else {
            break;
        };
        shared.changed.notify_all();
        let step = snap.step;
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let (step, tensors, metadata) = owned(snap);
            persist(&shared, step, tensors, metadata, config.keep_last)
        }));
        let mut p = shared.progress();
        p.in_flight = p.in_flight.saturating_sub(accounted);
        match outcome {
            Ok(Ok(done)) => {
                stats.encode_write = done.store;
                stats.stages = done.stages;
                stats.retention = done.retention;
                stats.raw_bytes = done.raw_bytes;
                stats.stored_bytes = done.stored_bytes;
                stats.full = done.full;
                stats.persisted = true;
                p.stats.push(stats);
            }
            Ok(Err(e)) => failed(&mut p, step, Ok(e), &config.dir),
            Err(panic) => failed(&mut p, step, Err(panic_message(panic)), &config.dir),
        }
        p.persisting = None;
        p.settled = Some(step);
        drop(p);
        shared.changed.notify_all();
    }
}
