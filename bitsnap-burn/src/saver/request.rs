//! The snapshot builder: what a training step hands over.

use std::time::Instant;

use burn::lr_scheduler::LrSchedulerRecord;
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::train::checkpoint::Checkpoint;
use serde::Serialize;

use super::readback::{Batch, Part};
use super::state::{self, MODEL_PREFIX, OPTIM_PREFIX, SCHEDULER_PREFIX};
use super::worker::{Job, ReadBack};
use super::{ReadBackStats, StepSaver, capture, derive};
use crate::Error;
use crate::bridge::{self, Metadata, RecordKind};

/// A snapshot being described: model and optimizer, plus whatever else of the training
/// state the step hands over. Nothing is taken until [`SnapshotRequest::submit`].
///
/// Built by [`StepSaver::snapshot`]; each setter is optional.
#[must_use = "nothing is saved until `submit` is called"]
pub struct SnapshotRequest<'a, M> {
    pub(super) saver: &'a StepSaver,
    pub(super) step: u64,
    pub(super) model: &'a M,
    pub(super) optimizer: &'a ModuleOptimizer,
    pub(super) scheduler: Option<LrSchedulerRecord>,
    pub(super) metadata: Metadata,
    /// The first error of a setter, returned by `submit`.
    pub(super) error: Option<Error>,
}

impl<M: Module + 'static> SnapshotRequest<'_, M> {
    /// The learning rate of the update that produced this state (`bitsnap.lr`; the value
    /// `scheduler.step()` returned before that `optim.step`). The lossy policy's stage
    /// rule and the replay codec read it.
    pub fn lr(mut self, lr: f64) -> Self {
        self.metadata.push((state::LR.into(), format!("{lr}")));
        self
    }

    /// The LR scheduler's state, `scheduler.to_record()` (scalars only; Burn's
    /// `ModuleLrScheduler` and every `LrScheduler` have it), restored as
    /// [`Restored::scheduler`](super::Restored::scheduler).
    pub fn scheduler(mut self, record: LrSchedulerRecord) -> Self {
        self.scheduler = Some(record);
        self
    }

    /// An RNG state named `name` (e.g. the data shuffler's `ChaCha8Rng` with rand_chacha's
    /// `serde` feature, or the seed the step's dropout used), stored as JSON and returned
    /// by [`Restored::rng`](super::Restored::rng).
    pub fn rng(self, name: &str, state: &impl Serialize) -> Self {
        let key = format!("{}{name}", state::RNG);
        self.json(key, state)
    }

    /// The data loader's position (epoch, batch index, sampler state), returned by
    /// [`Restored::data_position`](super::Restored::data_position).
    pub fn data_position(self, position: &impl Serialize) -> Self {
        self.json(state::DATA_POSITION.into(), position)
    }

    /// User metadata (run config, metrics), returned by
    /// [`Restored::user_metadata`](super::Restored::user_metadata).
    pub fn metadata(self, value: &impl Serialize) -> Self {
        self.json(state::USER.into(), value)
    }

    fn json(mut self, key: String, value: &impl Serialize) -> Self {
        match state::to_json(&key, value) {
            Ok(v) => self.metadata.push((key, v)),
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
        self
    }

    /// Hands the snapshot over and returns: the training thread pays for cloning tensor
    /// handles and serializing the small values above, and waits only when the queue or
    /// the memory budget is full. Returns the error of a setter, or of an earlier
    /// background save that failed since the last call.
    pub fn submit(self) -> Result<(), Error> {
        let SnapshotRequest {
            saver,
            step,
            model,
            optimizer,
            scheduler,
            mut metadata,
            error,
        } = self;
        if let Some(e) = error {
            return Err(e);
        }
        let config = &saver.config;
        metadata.push((state::STEP.into(), step.to_string()));
        if let Some(rule) = &config.optimizer_rule {
            metadata.push((state::OPTIMIZER.into(), rule.clone()));
        }
        if let Some(lr) = config.peak_lr {
            metadata.push((state::PEAK_LR.into(), format!("{lr}")));
        }
        if let Some(n) = config.warmup_steps {
            metadata.push((state::WARMUP_STEPS.into(), n.to_string()));
        }
        if scheduler.is_some() {
            metadata.push((state::SCHEDULER.into(), "1".into()));
        }
        let estimate = saver.estimate_bytes(model);
        let model = model.clone();
        let optimizer = optimizer.clone();
        let read_back: ReadBack = Box::new(move || {
            let record =
                |kind: RecordKind, bytes: Result<burn::tensor::Bytes, burn::store::RecordError>| {
                    bytes.map_err(|source| Error::Record {
                        what: kind.name(),
                        source,
                    })
                };
            let (mut tensors, mut meta, mut stats) = read_state(&model, &optimizer)?;
            drop((model, optimizer));
            let t = Instant::now();
            if let Some(s) = scheduler {
                let bytes = record(RecordKind::LrScheduler, s.checkpoint_into_bytes())?;
                let (t, m) =
                    bridge::from_burnpack(bytes, RecordKind::LrScheduler, SCHEDULER_PREFIX)?;
                tensors.extend(t);
                meta.extend(m);
            }
            meta.extend(metadata);
            if let Some(rules) = derive::replay_rules(&tensors, &meta) {
                meta.push((derive::DERIVE.into(), rules));
            }
            stats.convert += t.elapsed();
            Ok((tensors, meta, stats))
        });
        saver.enqueue(Job {
            step,
            read_back,
            estimate,
            queued: Instant::now(),
            wait: Default::default(),
            seq: 0,
        })
    }
}

/// Reads `model`'s parameters and `optimizer`'s state back: the tensors and metadata the
/// record path gives (`model/<path>`, `optim/<param id>.<field>`, parameter ids, Burn
/// dtypes, the optimizer's scalars and paths), the model's and (for optimizers built by
/// [`OptimizerSpec::init_on`](super::OptimizerSpec::init_on)) the optimizer's tensors in
/// one transaction.
pub(super) fn read_state<M: Module>(
    model: &M,
    optimizer: &ModuleOptimizer,
) -> Result<(Vec<bitsnap_core::Tensor>, Metadata, ReadBackStats), Error> {
    let mut stats = ReadBackStats::default();
    let t = Instant::now();
    let mut batch = Batch::default();
    batch.add_module(model);
    // Adam states of an optimizer built by `init_on` register their tensors in the same
    // batch; the record keeps the scalars (and any state read the Burn way).
    let record = capture::optimizer_record(&mut batch, optimizer);
    stats.optimizer_in_transaction = batch.count(Part::Optimizer);
    let record_bytes = record
        .checkpoint_into_bytes()
        .map_err(|source| Error::Record {
            what: RecordKind::Optimizer.name(),
            source,
        })?;
    stats.record = t.elapsed();
    let t = Instant::now();
    let read = batch.execute()?;
    stats.device = t.elapsed();
    stats.model_bytes = read.bytes(Part::Model);
    let t = Instant::now();
    let (mut tensors, mut meta) =
        bridge::from_pack_tensors(read.model, RecordKind::Module, MODEL_PREFIX)?;
    let (mut optim, m) = bridge::from_burnpack(record_bytes, RecordKind::Optimizer, OPTIM_PREFIX)?;
    meta.extend(m);
    let (captured, m) =
        bridge::from_pack_tensors(read.optimizer, RecordKind::Optimizer, OPTIM_PREFIX)?;
    meta.extend(m);
    optim.extend(captured);
    // Burnpack lists tensors by name: the order the record path gives.
    optim.sort_by(|a, b| a.name.cmp(&b.name));
    stats.optimizer_bytes = optim.iter().map(|t| t.data.len() as u64).sum();
    tensors.extend(optim);
    stats.convert = t.elapsed();
    Ok((tensors, meta, stats))
}
