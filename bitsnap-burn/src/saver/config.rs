//! Settings of a [`StepSaver`](super::StepSaver).

use std::path::PathBuf;

use bitsnap_core::Policy;

use super::optim::OptimizerSpec;

/// Settings of a [`StepSaver`](super::StepSaver). Build with the `with_*` methods; each
/// documents its default.
#[derive(Debug, Clone)]
pub struct StepSaverConfig {
    /// Encoding policy (default: lossless, a full snapshot every 8 saves).
    pub policy: Policy,
    /// Snapshots that may wait in the queue while one is being saved (default 1). Each
    /// queued snapshot keeps the tensors it references alive: on a GPU that is up to one
    /// extra copy of the model and optimizer state per queued snapshot, until it is read
    /// back. 0 makes `submit` wait until the previous save has started.
    pub queue_depth: usize,
    /// Keep only this many most recent persisted step snapshots (default: keep all).
    pub keep_last: Option<usize>,
    /// Bytes of state that snapshots in flight (queued, or being read back and saved) may
    /// hold at once (default: no limit beyond `queue_depth`). `submit` waits while the
    /// snapshots in flight and the new one together would exceed it; a snapshot larger than
    /// the whole budget is let through alone. The bytes are the snapshot's raw size (model,
    /// optimizer state, scheduler), the previous snapshot's size standing in for the new
    /// one's until it is read back.
    pub memory_budget: Option<u64>,
    /// Persist every N-th snapshot handed over (default 1: every one). Every snapshot is
    /// read back and held in memory, replacing the previous one, so that a restore in the
    /// same process (after an error in the training loop) gets the latest snapshot handed
    /// over; every N-th is also written to the store by a second background thread while
    /// the next ones are read back and held; `flush` and `close` persist the one held.
    pub persist_every: u64,
    /// Whether a snapshot due for the disk may replace one still waiting for the persist
    /// thread (default `false`). Snapshots due for the disk are written by their own
    /// thread while later ones are read back and held; when one is due while the previous
    /// is still being written and another already waits, `false` makes the read-back
    /// thread wait (and, once the queue is full, `submit`), so that every
    /// `persist_every`-th snapshot reaches the disk; `true` lets the newer one take the
    /// waiting one's place (counted in [`SaveStats::replaced`](super::SaveStats::replaced)),
    /// so that a disk slower than training never stalls it. Either way a restore in this
    /// process gets the latest snapshot handed over, and a killed process finds on disk the
    /// last snapshot whose write completed; with `false` training slows to the disk's pace,
    /// so that one is at most about `2 × persist_every` steps old, with `true` it is as many
    /// steps older as training runs during one write. With a keeper every snapshot goes to
    /// the keeper and this does not apply.
    pub latest_wins: bool,
    /// Unix socket of a running keeper (`bitsnap keep STORE --socket PATH`, on the same
    /// store): every snapshot is handed to it, and it persists them (its own
    /// `persist_every`; this saver's `persist_every` and `keep_last` then do not apply);
    /// `restore` and `latest` ask it before the disk. A keeper that cannot be reached
    /// (at `open` or later) is logged and the saver writes to the store itself (default:
    /// none).
    pub keeper: Option<PathBuf>,
    /// `bitsnap.optimizer` metadata written with every snapshot (default: none; set by
    /// [`StepSaverConfig::with_optimizer`]).
    pub optimizer_rule: Option<String>,
    /// `bitsnap.peak_lr` written with every snapshot (default: none).
    pub peak_lr: Option<f64>,
    /// `bitsnap.warmup_steps` written with every snapshot (default: none).
    pub warmup_steps: Option<u64>,
}

impl Default for StepSaverConfig {
    fn default() -> Self {
        StepSaverConfig {
            policy: Policy::default(),
            queue_depth: 1,
            keep_last: None,
            memory_budget: None,
            persist_every: 1,
            latest_wins: false,
            keeper: None,
            optimizer_rule: None,
            peak_lr: None,
            warmup_steps: None,
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

    /// Sets [`StepSaverConfig::keep_last`] (at least 1).
    pub fn with_keep_last(mut self, n: usize) -> Self {
        self.keep_last = Some(n.max(1));
        self
    }

    /// Sets [`StepSaverConfig::memory_budget`] in bytes.
    pub fn with_memory_budget(mut self, bytes: u64) -> Self {
        self.memory_budget = Some(bytes);
        self
    }

    /// Sets [`StepSaverConfig::persist_every`] (at least 1).
    pub fn with_persist_every(mut self, n: u64) -> Self {
        self.persist_every = n.max(1);
        self
    }

    /// Sets [`StepSaverConfig::latest_wins`].
    pub fn with_latest_wins(mut self, latest_wins: bool) -> Self {
        self.latest_wins = latest_wins;
        self
    }

    /// Sets [`StepSaverConfig::keeper`].
    pub fn with_keeper(mut self, socket: impl Into<PathBuf>) -> Self {
        self.keeper = Some(socket.into());
        self
    }

    /// Names the optimizer's update rule in every snapshot's metadata
    /// (`bitsnap.optimizer`), so that the replay codec predicts the next state exactly
    /// instead of estimating the hyperparameters. A configuration the replay does not model
    /// (AMSGrad, cautious weight decay) writes nothing.
    pub fn with_optimizer(mut self, config: &impl OptimizerSpec) -> Self {
        self.optimizer_rule = config.replay_rule();
        self
    }

    /// Sets [`StepSaverConfig::peak_lr`] and [`StepSaverConfig::warmup_steps`]: the
    /// schedule the lossy policy's stage rule reads.
    pub fn with_schedule(mut self, peak_lr: f64, warmup_steps: u64) -> Self {
        self.peak_lr = Some(peak_lr);
        self.warmup_steps = Some(warmup_steps);
        self
    }
}
