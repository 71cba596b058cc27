//! Step-level snapshots of the whole training state for hand-written loops, saved in the
//! background.
//!
//! The training thread only clones the model and the optimizer (reference-counted tensor
//! handles: no copy, no device sync), serializes the small values it hands over (scheduler
//! record, RNG states, data position, user metadata) and queues them. A background thread
//! reads the tensors back from the device — the model's parameters and, for an optimizer
//! built by [`OptimizerSpec::init_on`] or [`optimizer_on`] (Adam, AdamW), its state tensors
//! too, in one Burn `Transaction` — and holds the snapshot in memory; a second thread has
//! the store compress on all cores and write the snapshots due for the disk
//! ([`StepSaverConfig::persist_every`]) while later ones are read back. The queue is
//! bounded ([`StepSaverConfig::queue_depth`], and optionally by bytes,
//! [`StepSaverConfig::memory_budget`]): when the device read-back cannot keep up, `submit`
//! waits instead of piling up memory; when the disk cannot keep up, the read-back waits
//! for it, or with [`StepSaverConfig::latest_wins`] the newest snapshot due for the disk
//! replaces the one waiting. An error in the background is never lost: each failed save's
//! error is returned by one later call to `submit`, `flush` or `restore`, oldest first.
//!
//! # What a crash loses
//!
//! - An error in the training loop (the process lives on): nothing handed over.
//!   [`StepSaver::latest`] waits for the snapshots handed over to be read back (never for
//!   a write) and returns the newest, from memory.
//! - A killed process, without a keeper: the snapshots not yet on disk — those since the
//!   latest `persist_every`-th whose write completed. By default training slows to the
//!   disk's pace when writes take longer than `persist_every` steps; with `latest_wins` it
//!   does not, and a snapshot due for the disk that a newer one replaced is never written:
//!   the disk lags by as many steps as training runs during one write.
//! - A killed process, with a keeper ([`StepSaverConfig::keeper`]): every snapshot is
//!   handed to the keeper right after its read-back, so at most the snapshot being read
//!   back and the one queued (`queue_depth`).
//!
//! Readers ([`StepSaver::steps`], [`StepSaver::restore`], [`StepSaver::latest`]) never take
//! the lock a save holds: they read the held snapshot, or open their own read-only view of
//! the store.
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

mod capture;
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

pub use config::StepSaverConfig;
pub use optim::{OptimizerSpec, optimizer_on};
pub use request::SnapshotRequest;
pub use restored::{Restored, RestoredFrom};

use crate::Error;
use worker::{Job, Shared, Snap, WorkerConfig};

/// Series name of step snapshots in the store.
pub const STEP_SERIES: &str = "steps";

/// How one snapshot was read back from the device.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct ReadBackStats {
    /// Registering the tensors and building the optimizer's record: its scalars, and the
    /// state of optimizers not built by [`OptimizerSpec::init_on`]/[`optimizer_on`], which
    /// Burn reads here one tensor at a time.
    pub record: Duration,
    /// The one transaction that reads the model's parameters and (with
    /// [`OptimizerSpec::init_on`]) the optimizer's state tensors back together.
    pub device: Duration,
    /// Turning the read buffers into bitsnap tensors and metadata.
    pub convert: Duration,
    /// Bytes of the model's parameters.
    pub model_bytes: u64,
    /// Bytes of the optimizer's state.
    pub optimizer_bytes: u64,
    /// Optimizer state tensors read in the transaction (0: the whole state went through
    /// Burn's record path).
    pub optimizer_in_transaction: usize,
}

/// What one background save did. Times are of the background threads unless named.
#[derive(Debug, Clone, PartialEq)]
pub struct SaveStats {
    /// Training step.
    pub step: u64,
    /// Time the training thread waited in `submit` for room in the queue or the memory
    /// budget.
    pub wait: Duration,
    /// Time to read every tensor back from the device (all of [`SaveStats::read`]).
    pub readback: Duration,
    /// The read-back's parts: model and optimizer bytes, device and conversion times.
    pub read: ReadBackStats,
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
    /// Snapshots due for the disk that this one replaced while they waited for the persist
    /// thread ([`StepSaverConfig::latest_wins`]).
    pub replaced: u64,
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
    reader: Option<JoinHandle<()>>,
    persister: Option<JoinHandle<()>>,
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
    /// Opens (or creates) a step store in `dir` and starts its background threads.
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
        // Opening takes no lock: each save takes the store's lock only for its commit, so
        // a keeper, `bitsnap prune` or another writer may work on the same store.
        let store = Store::open_or_create(&dir, config.policy)?;
        let shared = Arc::new(Shared {
            store: std::sync::Mutex::new(store),
            progress: Default::default(),
            changed: Default::default(),
            held: Default::default(),
            keeper: std::sync::Mutex::new(keeper),
        });
        let worker_config = Arc::new(WorkerConfig {
            keep_last: config.keep_last,
            persist_every: config.persist_every.max(1),
            latest_wins: config.latest_wins,
            dir: dir.clone(),
        });
        let spawn = |name: &str, f: fn(Arc<Shared>, &WorkerConfig)| {
            let (shared, config) = (shared.clone(), worker_config.clone());
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || f(shared, &config))
                .map_err(|e| bitsnap_core::Error::Io {
                    path: dir.clone(),
                    source: e,
                })
        };
        let reader = spawn("bitsnap-readback", worker::read_loop)?;
        let persister = spawn("bitsnap-persist", worker::persist_loop)?;
        Ok(StepSaver {
            reader: Some(reader),
            persister: Some(persister),
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

    /// Whether a background thread has ended (they end only when the saver shuts down).
    fn threads_ended(&self) -> bool {
        [&self.reader, &self.persister]
            .iter()
            .any(|t| t.as_ref().is_none_or(|w| w.is_finished()))
    }

    /// Waits for room (queue depth, memory budget), then queues `job`.
    fn enqueue(&self, mut job: Job) -> Result<(), Error> {
        self.take_error()?;
        let depth = self.config.queue_depth as u64;
        let budget = self.config.memory_budget;
        let mut p = self.shared.progress();
        loop {
            let queued = p.queue.len() as u64;
            let room = queued < depth.max(1) && (depth > 0 || p.started == p.done);
            let fits = budget.is_none_or(|b| p.in_flight == 0 || p.in_flight + job.estimate <= b);
            if (room && fits) || p.stopped.is_some() {
                break;
            }
            if self.threads_ended() {
                p.stopped
                    .get_or_insert_with(|| "the saver thread ended with saves pending".into());
                break;
            }
            p = self.shared.wait(p);
        }
        if let Some(why) = &p.stopped {
            return Err(Error::SaverStopped {
                store: self.dir.clone(),
                reason: why.clone(),
            });
        }
        if p.closed {
            return Err(Error::SaverStopped {
                store: self.dir.clone(),
                reason: "the saver is closed".into(),
            });
        }
        job.wait = job.queued.elapsed();
        p.submitted += 1;
        job.seq = p.submitted;
        p.in_flight += job.estimate;
        p.queue.push_back(job);
        drop(p);
        self.shared.changed.notify_all();
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

    /// Waits until `done` holds (or a background thread died).
    fn wait_for(&self, done: impl Fn(&worker::Progress) -> bool) {
        let mut p = self.shared.progress();
        while !done(&p) && p.stopped.is_none() {
            // A thread that died outside its panic guard would never signal: notice it.
            if self.threads_ended() {
                p.stopped
                    .get_or_insert_with(|| "the saver thread ended with saves pending".into());
                break;
            }
            p = self.shared.wait(p);
        }
    }

    /// Waits until every snapshot handed over has been read back (and held, or handed to
    /// the keeper or the persist thread); never for an encode or a write.
    fn drain(&self) {
        self.wait_for(worker::Progress::read_back);
    }

    /// Persists the snapshot held in memory unless it is on disk already (a keeper that
    /// holds it persists it).
    fn persist_held(&self) -> Result<(), Error> {
        let mut held = self.shared.held();
        if held.as_ref().is_some_and(|h| h.kept) {
            drop(held);
            if let Some(client) = self.shared.keeper().as_mut() {
                client.flush()?;
            }
            return Ok(());
        }
        let settled = self.shared.progress().settled;
        if let Some(h) = held.take_if(|h| Some(h.step) != settled) {
            drop(held);
            let (step, tensors, metadata) = worker::owned(h);
            worker::persist(&self.shared, step, tensors, metadata, self.config.keep_last)?;
            self.shared.progress().settled = Some(step);
        }
        Ok(())
    }

    /// Waits until every snapshot handed over is saved, persists the one held in memory
    /// ([`StepSaverConfig::persist_every`]), and returns the oldest background error not
    /// yet reported (call again for the next one).
    pub fn flush(&self) -> Result<(), Error> {
        self.wait_for(|p| p.read_back() && p.persisted());
        self.take_error()?;
        self.persist_held()
    }

    /// Statistics of every completed background save, in the order they completed.
    pub fn stats(&self) -> Vec<SaveStats> {
        self.shared.progress().stats.clone()
    }

    /// A read-only view of the store as it is on disk now: readers never wait for the
    /// save the background may be making.
    fn view(&self) -> Result<Store, Error> {
        Ok(Store::open(&self.dir)?)
    }

    /// Steps with a snapshot persisted in the store, oldest first. Reads the store's
    /// manifest (another process, such as a keeper, may write it); never waits for a save.
    pub fn steps(&self) -> Vec<u64> {
        match self.view() {
            Ok(view) => step_list(&view),
            Err(e) => {
                tracing::warn!(error = %e, "the store's manifest could not be read");
                step_list(&self.shared.store())
            }
        }
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

    /// Restores the snapshot of `step`, once the snapshots handed over were read back
    /// (never waiting for a save, except for a snapshot being written that is no longer
    /// held): from memory when it is held, waits for the disk, or is the store's cached
    /// latest save; else from the keeper, else from disk.
    pub fn restore(&self, step: u64) -> Result<Restored, Error> {
        let started = Instant::now();
        self.drain();
        self.take_error()?;
        if let Some(snap) = self.in_memory(step) {
            return Restored::from_tensors(
                step,
                &snap.tensors,
                snap.metadata.clone(),
                RestoredFrom::Memory,
                started.elapsed(),
            );
        }
        if let Some(snap) = self.keeper_latest(Some(step)) {
            return Restored::from_keeper(step, snap, started.elapsed());
        }
        let name = step_name(step);
        // The saver's own store serves its latest save from memory, when no save holds it.
        let cached = self.shared.store_if_free().and_then(|store| {
            let info = store.latest_in(STEP_SERIES).filter(|s| s.name == name)?;
            Some(store.load(info.id))
        });
        let snap = match cached {
            Some(snap) => snap?,
            None => {
                let view = self.view()?;
                let info = view
                    .find(STEP_SERIES, &name)
                    .ok_or_else(|| Error::NotFound {
                        store: self.dir.clone(),
                        what: "step",
                        step,
                    })?;
                view.load(info.id)?
            }
        };
        let from = if snap.from_memory {
            RestoredFrom::Memory
        } else {
            RestoredFrom::Disk
        };
        Restored::from_tensors(step, &snap.tensors, snap.metadata, from, started.elapsed())
    }

    /// The snapshot of `step` if this process holds it: the latest read back, or one
    /// waiting for the persist thread. One the persist thread is writing (and no longer
    /// holds) is waited for: it is then on disk.
    fn in_memory(&self, step: u64) -> Option<Arc<Snap>> {
        if let Some(h) = self.shared.held().as_ref().filter(|h| h.step == step) {
            return Some(h.clone());
        }
        let p = self.shared.progress();
        if let Some(pending) = p.slot.as_ref().filter(|s| s.snap.step == step) {
            return Some(pending.snap.clone());
        }
        drop(p);
        self.wait_for(|p| p.persisting != Some(step));
        None
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
    /// keeper's, else the latest persisted one; `None` if there is none. Waits for the
    /// snapshots handed over to be read back, never for a save.
    pub fn latest(&self) -> Result<Option<Restored>, Error> {
        let started = Instant::now();
        self.drain();
        self.take_error()?;
        let held = self.shared.held().clone();
        if let Some(h) = held {
            return Restored::from_tensors(
                h.step,
                &h.tensors,
                h.metadata.clone(),
                RestoredFrom::Memory,
                started.elapsed(),
            )
            .map(Some);
        }
        if let Some(snap) = self.keeper_latest(None)
            && let Some(step) = snapshot_step(&snap.info.name)
        {
            return Restored::from_keeper(step, snap, started.elapsed()).map(Some);
        }
        match self.steps().last() {
            Some(&step) => self.restore(step).map(Some),
            None => Ok(None),
        }
    }

    /// Finishes every queued save, persists the snapshot held in memory, stops the
    /// background threads and returns the first error, if any. Dropping a `StepSaver` does
    /// the same but can only log the error.
    pub fn close(mut self) -> Result<(), Error> {
        self.shutdown();
        self.take_error()?;
        self.persist_held()
    }

    fn shutdown(&mut self) {
        self.shared.progress().closed = true;
        self.shared.changed.notify_all();
        let reader = self.reader.take().map(|w| w.join().is_ok());
        // The read-back thread opens the way out for the persist thread as it ends; if it
        // panicked outside its guard, open it here.
        self.shared.progress().persist_closed = true;
        self.shared.changed.notify_all();
        let persister = self.persister.take().map(|w| w.join().is_ok());
        if reader == Some(false) || persister == Some(false) {
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

/// The steps of the step series in `store`, oldest first.
fn step_list(store: &Store) -> Vec<u64> {
    store
        .snapshots()
        .iter()
        .filter(|s| s.series == STEP_SERIES)
        .filter_map(|s| snapshot_step(&s.name))
        .collect()
}

fn step_name(step: u64) -> String {
    format!("step-{step}")
}

/// The step of a [`StepSaver`] snapshot, read from its name (`step-<N>`); `None` for any
/// other name.
///
/// ```
/// assert_eq!(bitsnap_burn::snapshot_step("step-120"), Some(120));
/// assert_eq!(bitsnap_burn::snapshot_step("epoch-3"), None);
/// ```
pub fn snapshot_step(name: &str) -> Option<u64> {
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

    fn net() -> (Net, ModuleOptimizer) {
        let device = burn::tensor::Device::flex();
        let net = Net {
            a: LinearConfig::new(2, 2).init(&device),
        };
        (net, burn::optim::AdamWConfig::new().init_on(&device))
    }

    /// A closed saver (only reachable from inside: `close` consumes it) refuses further
    /// snapshots with an error that names its store.
    #[test]
    fn a_closed_saver_refuses_snapshots_naming_its_store() {
        let dir = tempfile::tempdir().unwrap();
        let mut saver = StepSaver::open(dir.path(), StepSaverConfig::default()).unwrap();
        saver.shutdown();
        let (net, optim) = net();
        let err = saver.snapshot(1, &net, &optim).submit().unwrap_err();
        assert!(
            matches!(&err, Error::SaverStopped { store, .. } if store == dir.path()),
            "{err:?}"
        );
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }

    /// While a save holds the store (here the test holds the writer's lock, as a save to a
    /// slow disk does for its whole duration), `steps`, `latest` and `restore` answer: from
    /// the disk as it is, and from the snapshot held in memory.
    #[test]
    fn readers_do_not_wait_for_a_save() {
        let dir = tempfile::tempdir().unwrap();
        let saver = StepSaver::open(dir.path(), StepSaverConfig::default()).unwrap();
        let (net, optim) = net();
        saver.snapshot(1, &net, &optim).submit().unwrap();
        saver.flush().unwrap();
        let writing = saver.shared.store();
        saver.snapshot(2, &net, &optim).submit().unwrap();
        saver.wait_for(|p| p.persisting == Some(2));
        assert_eq!(saver.steps(), vec![1]);
        let latest = saver.latest().unwrap().expect("held");
        assert_eq!((latest.step, latest.from), (2, RestoredFrom::Memory));
        let one = saver.restore(1).unwrap();
        assert_eq!((one.step, one.from), (1, RestoredFrom::Disk));
        let two = saver.restore(2).unwrap();
        assert_eq!((two.step, two.from), (2, RestoredFrom::Memory));
        assert_eq!(saver.shared.progress().persisting, Some(2), "still saving");
        drop(writing);
        saver.flush().unwrap();
        assert_eq!(saver.steps(), vec![1, 2]);
    }

    /// Snapshots due for the disk while one is being written: by default each is written
    /// in turn (the read-back waits, then `submit`); with `latest_wins` the newest replaces
    /// the one waiting, and `submit` never waits for the disk.
    #[test]
    fn snapshots_due_while_the_disk_is_busy_wait_or_are_replaced() {
        for latest_wins in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let config = StepSaverConfig::default().with_latest_wins(latest_wins);
            let saver = StepSaver::open(dir.path(), config).unwrap();
            let (net, optim) = net();
            let writing = saver.shared.store();
            saver.snapshot(1, &net, &optim).submit().unwrap();
            saver.wait_for(|p| p.persisting == Some(1));
            // Without `latest_wins`: 2 is read back and waits for 1's write, 3 is queued;
            // a fourth `submit` would wait. With it: 2 waits in the slot, 3 and 4 replace
            // it in turn.
            let last = if latest_wins { 4 } else { 3 };
            for step in 2..=last {
                saver.snapshot(step, &net, &optim).submit().unwrap();
            }
            if latest_wins {
                let latest = saver.latest().unwrap().expect("held");
                assert_eq!((latest.step, latest.from), (4, RestoredFrom::Memory));
            }
            drop(writing);
            saver.flush().unwrap();
            let stats = saver.stats();
            if latest_wins {
                assert_eq!(saver.steps(), vec![1, 4]);
                let four = stats.iter().find(|s| s.step == 4).unwrap();
                assert_eq!((four.persisted, four.replaced), (true, 2));
                assert!(stats.iter().filter(|s| s.persisted).count() == 2);
            } else {
                assert_eq!(saver.steps(), vec![1, 2, 3]);
                assert!(stats.iter().all(|s| s.persisted && s.replaced == 0));
            }
            assert_eq!(stats.len() as u64, last);
        }
    }
}
