//! Step-level snapshots of the whole training state for hand-written loops, saved in the
//! background.
//!
//! The training thread only clones the model and the optimizer (reference-counted tensor
//! handles: no copy, no device sync), serializes the small values it hands over (scheduler
//! record, RNG states, data position, user metadata) and queues them. A background thread
//! reads the tensors back from the device, and the store compresses them on all cores and
//! writes them. The queue is bounded ([`StepSaverConfig::queue_depth`], and optionally by
//! bytes, [`StepSaverConfig::memory_budget`]): when the disk or the encoder cannot keep
//! up, `submit` waits instead of piling up memory. An error in the background is never
//! lost: each failed save's error is returned by one later call to `submit`, `flush` or
//! `restore`, oldest first.
//!
//! # Resuming bit for bit
//!
//! A resumed run repeats the uninterrupted one exactly when every input of a step is
//! either restored or a function of the step:
//!
//! 1. **Model and optimizer**: `model.load_record(r.model)` and
//!    `config.init_on(&device).load_record(r.optimizer)`
//!    ([`OptimizerSpec::init_on`]: the state stays on the model's device; no
//!    `BURN_DEVICE` needed).
//! 2. **Learning rate**: hand the scheduler over (`.scheduler(s.to_record())`) and
//!    `s = s.load_record(r.scheduler.unwrap())` on resume; `.lr(lr)` records the rate of the
//!    update for the policy.
//! 3. **Dropout and other device randomness**: Burn's device RNG state cannot be read, so
//!    seed it from the step: `device.seed(run_seed ^ step)` before each forward pass.
//!    Restoring the step restores the seed.
//! 4. **A shuffled data loader**: keep the shuffler's RNG (e.g. `ChaCha8Rng`, serde
//!    feature) and the position in the epoch; hand both over (`.rng("data", &rng)`,
//!    `.data_position(&(epoch, batch))`) and rebuild the loader from them on resume.
//! 5. **Everything else** (config, metrics so far): `.metadata(&value)`.
//!
//! ```no_run
//! # use bitsnap_burn::{OptimizerSpec, StepSaver, StepSaverConfig};
//! # use burn::optim::AdamWConfig;
//! # fn train<M: burn::module::Module + 'static>(model: M, device: burn::tensor::Device) -> Result<(), bitsnap_burn::Error> {
//! let adamw = AdamWConfig::new();
//! let config = StepSaverConfig::default().with_optimizer(&adamw);
//! let saver = StepSaver::open("runs/exp1/steps", config)?;
//! let (mut model, mut optim, mut start) = (model, adamw.init_on(&device), 0);
//! let mut shuffle_seed: u64 = 7; // the data order's RNG state
//! if let Some(r) = saver.latest()? {
//!     shuffle_seed = r.rng("data")?.expect("saved with every snapshot");
//!     start = r.step;
//!     model = model.load_record(r.model);
//!     optim = optim.load_record(r.optimizer);
//! }
//! for step in start + 1..=1000u64 {
//!     device.seed(42 ^ step); // dropout masks are a function of the step
//!     // ... batch from (shuffle_seed, step), forward, backward, optim.step(lr, ..) ...
//!     saver.snapshot(step, &model, &optim).lr(1e-3).rng("data", &shuffle_seed).submit()?;
//! }
//! saver.flush()?; // every snapshot handed over is on disk
//! # Ok(()) }
//! ```

mod config;
mod derive;
mod optim;
mod readback;
mod request;
mod restored;
mod state;
mod worker;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bitsnap_core::Store;
use bitsnap_core::keeper::KeeperClient;
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use crossbeam::channel::{Sender, unbounded};

pub use config::StepSaverConfig;
pub use optim::{OptimizerSpec, optimizer_on};
pub use request::SnapshotRequest;
pub use restored::{Restored, RestoredFrom};

use crate::Error;
use worker::{Job, Shared, WorkerConfig};

/// Series name of step snapshots in the store.
pub const STEP_SERIES: &str = "steps";

/// What one background save did. Times are of the background thread unless named.
#[derive(Debug, Clone, PartialEq)]
pub struct SaveStats {
    /// Training step.
    pub step: u64,
    /// Time the training thread waited in `submit` for room in the queue or the memory
    /// budget.
    pub wait: Duration,
    /// Time to read every tensor back from the device.
    pub readback: Duration,
    /// Time to encode, write and commit the snapshot (zero when it was only held).
    pub encode_write: Duration,
    /// The store's stages of `encode_write` (base, encode, references, checksum, write,
    /// sync, commit); all zero when the snapshot was only held.
    pub stages: bitsnap_core::SaveTimings,
    /// Time to apply `keep_last` after the commit.
    pub retention: Duration,
    /// Decoded size of the snapshot.
    pub raw_bytes: u64,
    /// Size of its file (0 when it was only held in memory).
    pub stored_bytes: u64,
    /// Whether it is a full snapshot (no base).
    pub full: bool,
    /// Whether it was persisted, rather than held in memory
    /// ([`StepSaverConfig::persist_every`]).
    pub persisted: bool,
}

/// Asynchronous step snapshots of the whole training state (see the
/// [module documentation](self) for the resume recipe).
///
/// ```no_run
/// # use bitsnap_burn::{StepSaver, StepSaverConfig};
/// # fn train<M: burn::module::Module + 'static>(model: M, optim: burn::optim::ModuleOptimizer) -> Result<(), bitsnap_burn::Error> {
/// let saver = StepSaver::open("runs/exp1/steps", StepSaverConfig::default())?;
/// for step in 1..=1000u64 {
///     // ... forward, backward, optim.step ...
///     if step % 100 == 0 {
///         saver.snapshot(step, &model, &optim).submit()?; // returns at once
///     }
/// }
/// saver.flush()?; // every snapshot handed over is on disk
/// let restored = saver.latest()?.expect("a snapshot");
/// let model = model.load_record(restored.model);
/// # Ok(()) }
/// ```
pub struct StepSaver {
    tx: Option<Sender<Job>>,
    worker: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    dir: PathBuf,
    config: StepSaverConfig,
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
        let keeper =
            config
                .keeper
                .as_ref()
                .and_then(|socket| match KeeperClient::connect(socket) {
                    Ok(client) => Some(client),
                    Err(e) => {
                        tracing::warn!(socket = %socket.display(), error = %e,
                        "no keeper answers: the saver persists by itself");
                        None
                    }
                });
        // An existing store is opened without its write lock (a keeper may hold it); the
        // lock is taken by the first save this saver makes itself.
        let store = Store::open_or_create(&dir, config.policy)?;
        let shared = Arc::new(Shared {
            store: std::sync::Mutex::new(store),
            progress: Default::default(),
            changed: Default::default(),
            held: Default::default(),
            keeper: std::sync::Mutex::new(keeper),
            wrote: Default::default(),
        });
        let (tx, rx) = unbounded::<Job>();
        let worker_shared = shared.clone();
        let worker_config = WorkerConfig {
            keep_last: config.keep_last,
            persist_every: config.persist_every.max(1),
            dir: dir.clone(),
        };
        let worker = std::thread::Builder::new()
            .name("bitsnap-saver".into())
            .spawn(move || worker::run(rx, worker_shared, worker_config))
            .map_err(|e| bitsnap_core::Error::Io {
                path: dir.clone(),
                source: e,
            })?;
        Ok(StepSaver {
            tx: Some(tx),
            worker: Some(worker),
            shared,
            dir,
            config,
        })
    }

    /// Describes a snapshot of `model` and `optimizer` at `step` (optimizer steps taken);
    /// add the rest of the training state with the request's setters and hand it over with
    /// [`SnapshotRequest::submit`].
    pub fn snapshot<'a, M: Module + 'static>(
        &'a self,
        step: u64,
        model: &'a M,
        optimizer: &'a ModuleOptimizer,
    ) -> SnapshotRequest<'a, M> {
        SnapshotRequest {
            saver: self,
            step,
            model,
            optimizer,
            scheduler: None,
            metadata: Vec::new(),
            error: None,
        }
    }

    /// The bytes the memory budget counts for a snapshot not yet read back: the previous
    /// snapshot's size, or (for the first) the model's parameters thrice (Adam's state).
    fn estimate_bytes<M: Module>(&self, model: &M) -> u64 {
        if self.config.memory_budget.is_none() {
            return 0;
        }
        self.shared
            .progress()
            .last_raw
            .unwrap_or_else(|| model.num_params() as u64 * 4 * 3)
    }

    /// Waits for room (queue depth, memory budget), then queues `job`.
    fn enqueue(&self, mut job: Job) -> Result<(), Error> {
        self.take_error()?;
        let depth = self.config.queue_depth as u64;
        let budget = self.config.memory_budget;
        let mut p = self.shared.progress();
        loop {
            let queued = p.submitted - p.started;
            let room = queued < depth.max(1) && (depth > 0 || p.started == p.done);
            let fits = budget.is_none_or(|b| p.in_flight == 0 || p.in_flight + job.estimate <= b);
            if (room && fits) || p.stopped.is_some() {
                break;
            }
            if self.worker.as_ref().is_none_or(|w| w.is_finished()) {
                p.stopped
                    .get_or_insert_with(|| "the saver thread ended with saves pending".into());
                break;
            }
            p = self.wait(p);
        }
        if let Some(why) = &p.stopped {
            return Err(Error::SaverStopped {
                store: self.dir.clone(),
                reason: why.clone(),
            });
        }
        job.wait = job.queued.elapsed();
        let estimate = job.estimate;
        p.submitted += 1;
        p.in_flight += estimate;
        let sent = self.tx.as_ref().map(|tx| tx.send(job));
        if !matches!(sent, Some(Ok(()))) {
            p.submitted -= 1;
            p.in_flight -= estimate;
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

    fn wait<'a>(
        &self,
        p: std::sync::MutexGuard<'a, worker::Progress>,
    ) -> std::sync::MutexGuard<'a, worker::Progress> {
        self.shared
            .changed
            .wait_timeout(p, Duration::from_millis(200))
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0)
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

    /// Waits until every snapshot handed over has been read back and saved or held.
    fn drain(&self) {
        let mut p = self.shared.progress();
        while p.done < p.submitted && p.stopped.is_none() {
            // A worker that died outside its panic guard would never signal: notice it.
            if self.worker.as_ref().is_none_or(|w| w.is_finished()) {
                p.stopped
                    .get_or_insert_with(|| "the saver thread ended with saves pending".into());
                break;
            }
            p = self.wait(p);
        }
    }

    /// Persists the snapshot held in memory, if any (a keeper that holds it persists it).
    fn persist_held(&self) -> Result<(), Error> {
        let mut held = self.shared.held();
        if held.as_ref().is_some_and(|h| h.kept) {
            drop(held);
            if let Some(client) = self.shared.keeper().as_mut() {
                client.flush()?;
            }
            return Ok(());
        }
        if let Some(h) = held.take() {
            worker::persist(
                &self.shared,
                h.step,
                h.tensors,
                h.metadata,
                self.config.keep_last,
            )?;
        }
        Ok(())
    }

    /// Waits until every snapshot handed over is saved, persists the one held in memory
    /// ([`StepSaverConfig::persist_every`]), and returns the oldest background error not
    /// yet reported (call again for the next one).
    pub fn flush(&self) -> Result<(), Error> {
        self.drain();
        self.take_error()?;
        self.persist_held()
    }

    /// Statistics of every completed background save, oldest first.
    pub fn stats(&self) -> Vec<SaveStats> {
        self.shared.progress().stats.clone()
    }

    /// With a keeper writing the store, re-reads its manifest (this saver's view is
    /// otherwise the one it opened).
    fn refresh_view(&self) -> Result<(), Error> {
        if self.config.keeper.is_some() {
            let mut store = self.shared.store();
            if !self.shared.wrote.load(std::sync::atomic::Ordering::Acquire) {
                *store = Store::open(&self.dir)?;
            }
        }
        Ok(())
    }

    /// Steps with a snapshot persisted in the store, oldest first.
    pub fn steps(&self) -> Vec<u64> {
        if let Err(e) = self.refresh_view() {
            tracing::warn!(error = %e, "the store's manifest could not be re-read");
        }
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

    /// Restores the snapshot of `step`, after the snapshots handed over were read back:
    /// from memory when it is the latest (held, or the store's cached latest save), else
    /// from disk.
    pub fn restore(&self, step: u64) -> Result<Restored, Error> {
        let started = Instant::now();
        self.drain();
        self.take_error()?;
        if let Some(h) = self.shared.held().as_ref().filter(|h| h.step == step) {
            return Restored::from_tensors(
                step,
                &h.tensors,
                h.metadata.clone(),
                RestoredFrom::Memory,
                started.elapsed(),
            );
        }
        if let Some(snap) = self.keeper_latest(Some(step)) {
            return Restored::from_keeper(step, snap, started.elapsed());
        }
        self.refresh_view()?;
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
        let from = if snap.from_memory {
            RestoredFrom::Memory
        } else {
            RestoredFrom::Disk
        };
        Restored::from_tensors(step, &snap.tensors, snap.metadata, from, started.elapsed())
    }

    /// The keeper's latest step snapshot, if a keeper answers and has one (of `step`, when
    /// given). A keeper that fails is logged and dropped: the disk answers instead.
    fn keeper_latest(&self, step: Option<u64>) -> Option<bitsnap_core::Snapshot> {
        let mut keeper = self.shared.keeper();
        let client = keeper.as_mut()?;
        match client.latest(STEP_SERIES) {
            Ok(snap) => snap.filter(|s| step.is_none_or(|n| s.info.name == step_name(n))),
            Err(e) => {
                tracing::warn!(error = %e, "the keeper did not answer: restoring from disk");
                *keeper = None;
                None
            }
        }
    }

    /// Restores the latest snapshot handed over: held in this process's memory, else the
    /// keeper's, else the latest persisted one; `None` if there is none.
    pub fn latest(&self) -> Result<Option<Restored>, Error> {
        let started = Instant::now();
        self.drain();
        self.take_error()?;
        let held = self.shared.held().as_ref().map(|h| h.step);
        if let Some(step) = held {
            return self.restore(step).map(Some);
        }
        if let Some(snap) = self.keeper_latest(None)
            && let Some(step) = parse_step(&snap.info.name)
        {
            return Restored::from_keeper(step, snap, started.elapsed()).map(Some);
        }
        match self.steps().last() {
            Some(&step) => self.restore(step).map(Some),
            None => Ok(None),
        }
    }

    /// Finishes every queued save, persists the snapshot held in memory, stops the
    /// background thread and returns the first error, if any. Dropping a `StepSaver` does
    /// the same but can only log the error.
    pub fn close(mut self) -> Result<(), Error> {
        self.shutdown();
        self.take_error()?;
        self.persist_held()
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
        self.config.keep_last
    }
}

impl Drop for StepSaver {
    fn drop(&mut self) {
        self.shutdown();
        if let Err(e) = self.persist_held() {
            tracing::error!(error = %e, "the snapshot held in memory could not be persisted when the saver was dropped");
        }
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
        let err = saver.snapshot(1, &net, &optim).submit().unwrap_err();
        assert!(
            matches!(&err, Error::SaverStopped { store, .. } if store == dir.path()),
            "{err:?}"
        );
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }
}
