//! The snapshot builder: what a training step hands over.

use std::time::Instant;

use burn::lr_scheduler::LrSchedulerRecord;
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::train::checkpoint::Checkpoint;
use serde::Serialize;

use super::derive;
use super::state::{self, MODEL_PREFIX, OPTIM_PREFIX, SCHEDULER_PREFIX};
use super::worker::{Job, ReadBack};
use super::{StepSaver, readback};
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
            let (mut tensors, mut meta) = readback::module_tensors(&model, MODEL_PREFIX)?;
            drop(model);
            let optim_bytes = record(
                RecordKind::Optimizer,
                optimizer.to_record().checkpoint_into_bytes(),
            )?;
            let (t, m) = bridge::from_burnpack(optim_bytes, RecordKind::Optimizer, OPTIM_PREFIX)?;
            tensors.extend(t);
            meta.extend(m);
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
            Ok((tensors, meta))
        });
        saver.enqueue(Job {
            step,
            read_back,
            estimate,
            queued: Instant::now(),
            wait: Default::default(),
        })
    }
}
