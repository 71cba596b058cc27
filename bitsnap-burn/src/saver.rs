//! Step-level snapshots for hand-written training loops, saved in the background.
//!
//! The training thread only clones the model and the optimizer (reference-counted tensor
//! handles: no copy, no device sync) and queues them. A background thread reads the
//! tensors back from the device, and the store compresses them on all cores and writes
//! them. The queue is bounded ([`StepSaverConfig::queue_depth`]): when the disk or the
//! encoder cannot keep up, `snapshot` waits instead of piling up memory. An error in the
//! background is never lost: each failed save's error is returned by one later call to
//! `snapshot`, `flush` or `restore`, oldest first.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bitsnap_core::{Policy, Store, Tensor};
use burn::module::Module;
use burn::optim::{ModuleOptimizer, OptimizerRecord};
use burn::store::ModuleRecord;
use burn::train::checkpoint::Checkpoint;
use crossbeam::channel::{Receiver, Sender, bounded};

use crate::Error;
use crate::bridge::{self, Metadata, RecordKind};

/// Series name of step snapshots in the store.
pub const STEP_SERIES: &str = "steps";
const MODEL_PREFIX: &str = "model/";
const OPTIM_PREFIX: &str = "optim/";

/// Settings of a [`StepSaver`].
#[derive(Debug, Clone)]
pub struct StepSaverConfig {
    /// Encoding policy (default: lossless, a full snapshot every 8 saves).
    pub policy: Policy,
    /// Snapshots that may wait in the queue while one is being saved (default 1). Each
    /// queued snapshot keeps the tensors it references alive: on a GPU that is up to one
    /// extra copy of the model and optimizer state per queued snapshot, until it is read
    /// back. 0 makes `snapshot` wait until the previous save has started.
    pub queue_depth: usize,
    /// Keep only this many most recent step snapshots (default: keep all).
    pub keep_last: Option<usize>,
}

impl Default for StepSaverConfig {
    fn default() -> Self {
        StepSaverConfig {
            policy: Policy::default(),
            queue_depth: 1,
            keep_last: None,
        }
    }
}

impl StepSaverConfig {
    /// Sets [`StepSaverConfig::policy`].
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets [`StepSaverConfig::queue_depth`].
    pub fn with_queue_depth(mut self, depth: usize) -> Self {
        self.queue_depth = depth;
        self
    }

    /// Sets [`StepSaverConfig::keep_last`].
    pub fn with_keep_last(mut self, n: usize) -> Self {
        self.keep_last = Some(n.max(1));
        self
    }
}

/// What one background save did.
#[derive(Debug, Clone, PartialEq)]
pub struct SaveStats {
    /// Training step.
    pub step: u64,
    /// Time to read every tensor back from the device (background thread).
    pub readback: Duration,
    /// Time to encode and write the snapshot (background thread).
    pub encode_write: Duration,
    /// Decoded size of the snapshot.
    pub raw_bytes: u64,
    /// Size of its file.
    pub stored_bytes: u64,
    /// Whether it is a full snapshot (no base).
    pub full: bool,
}

/// A restored training state.
#[derive(Debug)]
pub struct Restored {
    /// The step it was saved at.
    pub step: u64,
    /// The model's record: `model.load_record(restored.model)`.
    pub model: ModuleRecord,
    /// The optimizer's record: `optim.load_record(restored.optimizer)`.
    pub optimizer: OptimizerRecord,
    /// Whether it came from memory (the latest save of this process) rather than disk.
    pub from_memory: bool,
}

type Job = (
    u64,
    Box<dyn FnOnce() -> Result<(Vec<Tensor>, Metadata), Error> + Send>,
);

#[derive(Default)]
struct Progress {
    submitted: u64,
    done: u64,
    /// Failed saves not yet reported, oldest first: each call reports one.
    errors: std::collections::VecDeque<Error>,
    stats: Vec<SaveStats>,
    stopped: Option<String>,
}

struct Shared {
    store: Mutex<Store>,
    progress: Mutex<Progress>,
    changed: Condvar,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        // Every store change is committed by one rename: a panic while the lock was held
        // cannot have left it half-changed, so a poisoned lock is still usable.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Asynchronous step snapshots of a model and its optimizer.
///
/// ```no_run
/// # use bitsnap_burn::{StepSaver, StepSaverConfig};
/// # fn train<M: burn::module::Module + 'static>(model: M, optim: burn::optim::ModuleOptimizer) -> Result<(), bitsnap_burn::Error> {
/// let saver = StepSaver::open("runs/exp1/steps", StepSaverConfig::default())?;
/// for step in 1..=1000u64 {
///     // ... forward, backward, optim.step ...
///     if step % 100 == 0 {
///         saver.snapshot(step, &model, &optim)?; // returns at once
///     }
/// }
/// saver.flush()?; // every queued snapshot is on disk
/// let restored = saver.latest()?.expect("a snapshot");
/// let model = model.load_record(restored.model);
/// let optim = optim.load_record(restored.optimizer);
/// # Ok(()) }
/// ```
pub struct StepSaver {
    tx: Option<Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    dir: PathBuf,
    keep_last: Option<usize>,
}

impl std::fmt::Debug for StepSaver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepSaver").field("dir", &self.dir).finish()
    }
}

impl StepSaver {
    /// Opens (or creates) a step store in `dir` and starts its background thread.
    pub fn open(dir: impl AsRef<Path>, config: StepSaverConfig) -> Result<StepSaver, Error> {
        let dir = dir.as_ref().to_path_buf();
        let store = Store::open_or_create(&dir, config.policy)?;
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            progress: Mutex::new(Progress::default()),
            changed: Condvar::new(),
        });
        let (tx, rx) = bounded::<Job>(config.queue_depth);
        let worker_shared = shared.clone();
        let keep_last = config.keep_last;
        let worker_dir = dir.clone();
        let worker = std::thread::Builder::new()
            .name("bitsnap-saver".into())
            .spawn(move || run(rx, worker_shared, keep_last, worker_dir))
            .map_err(|e| bitsnap_core::Error::Io {
                path: dir.clone(),
                source: e,
            })?;
        Ok(StepSaver {
            tx: Some(tx),
            worker: Some(worker),
            shared,
            dir,
            keep_last,
        })
    }

    /// Queues a snapshot of `model` and `optimizer` at `step` and returns: the caller only
    /// pays for cloning tensor handles (and waits if the queue is full). Returns the error
    /// of an earlier background save, if one failed since the last call.
    pub fn snapshot<M: Module + 'static>(
        &self,
        step: u64,
        model: &M,
        optimizer: &ModuleOptimizer,
    ) -> Result<(), Error> {
        self.take_error()?;
        let model = model.clone();
        let optimizer = optimizer.clone();
        let job: Job = (
            step,
            Box::new(move || {
                let record = |kind: RecordKind,
                              bytes: Result<burn::tensor::Bytes, burn::store::RecordError>| {
                    bytes.map_err(|source| Error::Record {
                        what: kind.name(),
                        source,
                    })
                };
                let model_bytes = record(
                    RecordKind::Module,
                    model.into_record().checkpoint_into_bytes(),
                )?;
                let optim_bytes = record(
                    RecordKind::Optimizer,
                    optimizer.to_record().checkpoint_into_bytes(),
                )?;
                let (mut tensors, mut metadata) =
                    bridge::from_burnpack(model_bytes, RecordKind::Module, MODEL_PREFIX)?;
                let (t, m) =
                    bridge::from_burnpack(optim_bytes, RecordKind::Optimizer, OPTIM_PREFIX)?;
                tensors.extend(t);
                metadata.extend(m);
                Ok((tensors, metadata))
            }),
        );
        self.shared.progress().submitted += 1;
        let sent = self.tx.as_ref().map(|tx| tx.send(job));
        if !matches!(sent, Some(Ok(()))) {
            let mut p = self.shared.progress();
            p.submitted -= 1;
            return Err(Error::SaverStopped {
                store: self.dir.clone(),
                reason: p
                    .stopped
                    .clone()
                    .unwrap_or_else(|| "the saver is closed".into()),
            });
        }
        Ok(())
    }

    fn take_error(&self) -> Result<(), Error> {
        let mut p = self.shared.progress();
        if let Some(e) = p.errors.pop_front() {
            return Err(e);
        }
        if let Some(why) = &p.stopped {
            return Err(Error::SaverStopped {
                store: self.dir.clone(),
                reason: why.clone(),
            });
        }
        Ok(())
    }

    /// Waits until every queued snapshot is written; returns the oldest background error
    /// not yet reported (call again for the next one).
    pub fn flush(&self) -> Result<(), Error> {
        let mut p = self.shared.progress();
        while p.done < p.submitted && p.stopped.is_none() {
            // A worker that died outside its panic guard would never signal: notice it.
            if self.worker.as_ref().is_none_or(|w| w.is_finished()) {
                p.stopped
                    .get_or_insert_with(|| "the saver thread ended with saves pending".into());
                break;
            }
            p = self
                .shared
                .changed
                .wait_timeout(p, Duration::from_millis(200))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        drop(p);
        self.take_error()
    }

    /// Statistics of every completed background save, oldest first.
    pub fn stats(&self) -> Vec<SaveStats> {
        self.shared.progress().stats.clone()
    }

    /// Steps with a committed snapshot, oldest first.
    pub fn steps(&self) -> Vec<u64> {
        self.shared
            .store()
            .snapshots()
            .iter()
            .filter(|s| s.series == STEP_SERIES)
            .filter_map(|s| parse_step(&s.name))
            .collect()
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `f` with the store (to list or inspect snapshots) after pending saves finished.
    pub fn with_store<T>(&self, f: impl FnOnce(&Store) -> T) -> Result<T, Error> {
        self.flush()?;
        Ok(f(&self.shared.store()))
    }

    /// Restores the snapshot of `step` (after finishing queued saves).
    pub fn restore(&self, step: u64) -> Result<Restored, Error> {
        self.flush()?;
        let store = self.shared.store();
        let info = store
            .find(STEP_SERIES, &step_name(step))
            .ok_or_else(|| Error::NotFound {
                store: self.dir.clone(),
                what: "step",
                step,
            })?;
        let snap = store.load(info.id)?;
        drop(store);
        if snap.from_memory {
            tracing::info!(step, "restored from the in-memory copy of the latest save");
        }
        let rebuild = |kind: RecordKind, prefix: &str| {
            bridge::to_burnpack(&snap.tensors, &snap.metadata, kind, prefix)
        };
        let model = ModuleRecord::checkpoint_from_bytes(rebuild(RecordKind::Module, MODEL_PREFIX)?)
            .map_err(|source| Error::Record {
                what: RecordKind::Module.name(),
                source,
            })?;
        let optimizer =
            OptimizerRecord::checkpoint_from_bytes(rebuild(RecordKind::Optimizer, OPTIM_PREFIX)?)
                .map_err(|source| Error::Record {
                what: RecordKind::Optimizer.name(),
                source,
            })?;
        Ok(Restored {
            step,
            model,
            optimizer,
            from_memory: snap.from_memory,
        })
    }

    /// Restores the latest snapshot, if any.
    pub fn latest(&self) -> Result<Option<Restored>, Error> {
        self.flush()?;
        match self.steps().last() {
            Some(&step) => self.restore(step).map(Some),
            None => Ok(None),
        }
    }

    /// Finishes every queued save, stops the background thread and returns the first
    /// error, if any. Dropping a `StepSaver` does the same but can only log the error.
    pub fn close(mut self) -> Result<(), Error> {
        self.shutdown();
        self.take_error()
    }

    fn shutdown(&mut self) {
        self.tx.take();
        if let Some(w) = self.worker.take()
            && w.join().is_err()
        {
            self.shared
                .progress()
                .stopped
                .get_or_insert_with(|| "the saver thread panicked".into());
        }
    }

    /// How many snapshots the saver keeps, if limited.
    pub fn keep_last(&self) -> Option<usize> {
        self.keep_last
    }
}

impl Drop for StepSaver {
    fn drop(&mut self) {
        self.shutdown();
        for e in self.shared.progress().errors.drain(..) {
            tracing::error!(error = %e, "a background save failed and was not collected before the saver was dropped");
        }
    }
}

fn step_name(step: u64) -> String {
    format!("step-{step}")
}

fn parse_step(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// The background thread: read back, encode and write each queued snapshot.
fn run(rx: Receiver<Job>, shared: Arc<Shared>, keep_last: Option<usize>, store_dir: PathBuf) {
    for (step, job) in rx {
        let t0 = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let (tensors, metadata) = job()?;
            let readback = t0.elapsed();
            let t1 = Instant::now();
            let mut store = shared.store();
            let report = store.save_in(STEP_SERIES, &step_name(step), tensors, metadata)?;
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
            Ok::<_, Error>(SaveStats {
                step,
                readback,
                encode_write: t1.elapsed(),
                raw_bytes: report.info.raw_bytes,
                stored_bytes: report.info.stored_bytes,
                full: report.info.base.is_none(),
            })
        }));
        let mut p = shared.progress();
        match outcome {
            Ok(Ok(stats)) => {
                tracing::debug!(
                    step,
                    raw = stats.raw_bytes,
                    stored = stats.stored_bytes,
                    "snapshot saved"
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
                        store: store_dir.clone(),
                        message: msg,
                    }),
                });
            }
        }
        p.done += 1;
        shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};

    #[derive(Module, Debug)]
    struct Net {
        a: Linear,
    }

    /// A closed saver (only reachable from inside: `close` consumes it) refuses further
    /// snapshots with an error that names its store.
    #[test]
    fn a_closed_saver_refuses_snapshots_naming_its_store() {
        let dir = tempfile::tempdir().unwrap();
        let mut saver = StepSaver::open(dir.path(), StepSaverConfig::default()).unwrap();
        saver.shutdown();
        let device = burn::tensor::Device::flex();
        let net = Net {
            a: LinearConfig::new(2, 2).init(&device),
        };
        let optim: ModuleOptimizer = burn::optim::AdamWConfig::new().init();
        let err = saver.snapshot(1, &net, &optim).unwrap_err();
        assert!(
            matches!(&err, Error::SaverStopped { store, .. } if store == dir.path()),
            "{err:?}"
        );
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }
}
