//! The background thread: read back, encode and write (or hold) each snapshot handed over.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bitsnap_core::keeper::KeeperClient;
use bitsnap_core::{Store, Tensor};
use crossbeam::channel::Receiver;

use super::{STEP_SERIES, SaveStats, step_name};
use crate::Error;
use crate::bridge::Metadata;

/// Reads a snapshot's tensors back from the device (runs on the background thread).
pub(super) type ReadBack = Box<dyn FnOnce() -> Result<(Vec<Tensor>, Metadata), Error> + Send>;

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
}

/// The latest snapshot read back but not persisted (`persist_every` > 1).
pub(super) struct Held {
    pub step: u64,
    /// Whether a keeper holds it too (and persists it): then the saver never writes it.
    pub kept: bool,
    pub tensors: Vec<Tensor>,
    pub metadata: Metadata,
}

#[derive(Default)]
pub(super) struct Progress {
    pub submitted: u64,
    pub started: u64,
    pub done: u64,
    /// Bytes of state held by snapshots in flight (estimates until read back).
    pub in_flight: u64,
    /// Raw size of the latest snapshot read back.
    pub last_raw: Option<u64>,
    /// Failed saves not yet reported, oldest first: each call reports one.
    pub errors: std::collections::VecDeque<Error>,
    pub stats: Vec<SaveStats>,
    pub stopped: Option<String>,
}

pub(super) struct Shared {
    pub store: Mutex<Store>,
    pub progress: Mutex<Progress>,
    pub changed: Condvar,
    pub held: Mutex<Option<Held>>,
    /// The keeper snapshots are handed to, while it answers.
    pub keeper: Mutex<Option<KeeperClient>>,
    /// Whether this saver has written the store (holds its write lock).
    pub wrote: std::sync::atomic::AtomicBool,
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

    pub fn progress(&self) -> MutexGuard<'_, Progress> {
        lock(&self.progress)
    }

    pub fn held(&self) -> MutexGuard<'_, Option<Held>> {
        lock(&self.held)
    }

    pub fn keeper(&self) -> MutexGuard<'_, Option<KeeperClient>> {
        lock(&self.keeper)
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
    shared
        .wrote
        .store(true, std::sync::atomic::Ordering::Release);
    let stored = t0.elapsed();
    let t1 = Instant::now();
    if let Some(n) = keep_last {
        let steps: Vec<u64> = store
            .snapshots()
            .iter()
            .filter(|s| s.series == STEP_SERIES)
            .map(|s| s.id)
            .collect();
        for id in steps.iter().take(steps.len().saturating_sub(n)) {
            store.delete(*id)?;
        }
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

/// Settings the background thread needs.
pub(super) struct WorkerConfig {
    pub keep_last: Option<usize>,
    pub persist_every: u64,
    pub dir: PathBuf,
}

/// The background thread's loop.
pub(super) fn run(rx: Receiver<Job>, shared: Arc<Shared>, config: WorkerConfig) {
    let mut handed: u64 = 0;
    for job in rx {
        shared.progress().started += 1;
        let step = job.step;
        let mut accounted = job.estimate;
        let t0 = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let (tensors, metadata) = (job.read_back)()?;
            let readback = t0.elapsed();
            let raw: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
            {
                let mut p = shared.progress();
                p.in_flight = p.in_flight.saturating_sub(accounted) + raw;
                p.last_raw = Some(raw);
            }
            accounted = raw;
            handed += 1;
            let mut held = shared.held();
            if shared.hand_to_keeper(step, &tensors, &metadata) {
                *held = Some(Held {
                    step,
                    kept: true,
                    tensors,
                    metadata,
                });
                Ok::<_, Error>(SaveStats {
                    step,
                    wait: job.wait,
                    readback,
                    encode_write: Duration::ZERO,
                    stages: Default::default(),
                    retention: Duration::ZERO,
                    raw_bytes: raw,
                    stored_bytes: 0,
                    full: false,
                    persisted: false,
                })
            } else if handed.is_multiple_of(config.persist_every) {
                *held = None;
                let done = persist(&shared, step, tensors, metadata, config.keep_last)?;
                Ok(SaveStats {
                    step,
                    wait: job.wait,
                    readback,
                    encode_write: done.store,
                    stages: done.stages,
                    retention: done.retention,
                    raw_bytes: done.raw_bytes,
                    stored_bytes: done.stored_bytes,
                    full: done.full,
                    persisted: true,
                })
            } else {
                *held = Some(Held {
                    step,
                    kept: false,
                    tensors,
                    metadata,
                });
                Ok(SaveStats {
                    step,
                    wait: job.wait,
                    readback,
                    encode_write: Duration::ZERO,
                    stages: Default::default(),
                    retention: Duration::ZERO,
                    raw_bytes: raw,
                    stored_bytes: 0,
                    full: false,
                    persisted: false,
                })
            }
        }));
        let mut p = shared.progress();
        p.in_flight = p.in_flight.saturating_sub(accounted);
        match outcome {
            Ok(Ok(stats)) => {
                tracing::debug!(
                    step,
                    raw = stats.raw_bytes,
                    stored = stats.stored_bytes,
                    persisted = stats.persisted,
                    since_handed_over_ms = job.queued.elapsed().as_millis() as u64,
                    "snapshot taken"
                );
                p.stats.push(stats);
            }
            Ok(Err(e)) => {
                tracing::error!(step, error = %e, "background save failed");
                // Every failed step is reported, one per call: none is silently lost.
                p.errors.push_back(Error::Background {
                    step,
                    source: Box::new(e),
                });
            }
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(step, panic = %msg, "background save panicked");
                p.errors.push_back(Error::Background {
                    step,
                    source: Box::new(Error::Panicked {
                        store: config.dir.clone(),
                        message: msg,
                    }),
                });
            }
        }
        p.done += 1;
        shared.changed.notify_all();
    }
}
