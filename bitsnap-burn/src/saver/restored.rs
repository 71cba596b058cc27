//! A restored training state.

use std::time::Duration;

use bitsnap_core::Tensor;
use burn::lr_scheduler::LrSchedulerRecord;
use burn::optim::OptimizerRecord;
use burn::store::ModuleRecord;
use burn::train::checkpoint::Checkpoint;
use serde::de::DeserializeOwned;

use super::state::{self, MODEL_PREFIX, OPTIM_PREFIX, SCHEDULER_PREFIX};
use crate::Error;
use crate::bridge::{self, Metadata, RecordKind};

/// Where a restore found its snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RestoredFrom {
    /// This process's memory: the latest snapshot handed over (held, or cached by the
    /// store after its save). No disk read.
    Memory,
    /// A keeper process's memory. No disk read.
    Keeper,
    /// The store on disk.
    Disk,
}

/// A restored training state: everything a [`SnapshotRequest`](super::SnapshotRequest)
/// handed over.
#[derive(Debug)]
pub struct Restored {
    /// The step it was saved at.
    pub step: u64,
    /// The model's record: `model.load_record(restored.model)`.
    pub model: ModuleRecord,
    /// The optimizer's record:
    /// `config.init_on(&device).load_record(restored.optimizer)`
    /// ([`OptimizerSpec::init_on`](crate::OptimizerSpec::init_on) keeps the state on the
    /// model's device).
    pub optimizer: OptimizerRecord,
    /// The LR scheduler's record, when one was handed over:
    /// `scheduler.load_record(record)`.
    pub scheduler: Option<LrSchedulerRecord>,
    /// Where the snapshot came from.
    pub from: RestoredFrom,
    /// How long the restore took (finding, reading and decoding the snapshot, rebuilding
    /// the records).
    pub took: Duration,
    /// The snapshot's metadata (`bitsnap.*` keys, Burn's record metadata).
    pub metadata: Metadata,
}

impl Restored {
    /// Rebuilds Burn's records from a snapshot the keeper answered with: from its memory
    /// ([`RestoredFrom::Keeper`]) or, after a keeper restart, from its store.
    pub(crate) fn from_keeper(
        step: u64,
        snap: bitsnap_core::Snapshot,
        took: Duration,
    ) -> Result<Restored, Error> {
        let from = if snap.from_memory {
            RestoredFrom::Keeper
        } else {
            RestoredFrom::Disk
        };
        Restored::from_tensors(step, &snap.tensors, snap.metadata, from, took)
    }

    /// Rebuilds Burn's records from a decoded step snapshot.
    pub(crate) fn from_tensors(
        step: u64,
        tensors: &[Tensor],
        metadata: Metadata,
        from: RestoredFrom,
        took: Duration,
    ) -> Result<Restored, Error> {
        fn record<R: Checkpoint>(
            tensors: &[Tensor],
            metadata: &Metadata,
            kind: RecordKind,
            prefix: &str,
        ) -> Result<R, Error> {
            let bytes = bridge::to_burnpack(tensors, metadata, kind, prefix)?;
            R::checkpoint_from_bytes(bytes).map_err(|source| Error::Record {
                what: kind.name(),
                source,
            })
        }
        let started = std::time::Instant::now();
        let model = record(tensors, &metadata, RecordKind::Module, MODEL_PREFIX)?;
        let optimizer = record(tensors, &metadata, RecordKind::Optimizer, OPTIM_PREFIX)?;
        let scheduler = match state::lookup(&metadata, state::SCHEDULER) {
            Some(_) => Some(record(
                tensors,
                &metadata,
                RecordKind::LrScheduler,
                SCHEDULER_PREFIX,
            )?),
            None => None,
        };
        Ok(Restored {
            step,
            model,
            optimizer,
            scheduler,
            from,
            took: took + started.elapsed(),
            metadata,
        })
    }

    /// The learning rate of the update that produced this state (`bitsnap.lr`), if it was
    /// handed over.
    pub fn lr(&self) -> Option<f64> {
        state::lookup(&self.metadata, state::LR).and_then(|v| v.parse().ok())
    }

    /// The RNG state handed over as `name` ([`SnapshotRequest::rng`](super::SnapshotRequest::rng)).
    pub fn rng<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, Error> {
        state::from_json(&self.metadata, &format!("{}{name}", state::RNG))
    }

    /// The data loader's position
    /// ([`SnapshotRequest::data_position`](super::SnapshotRequest::data_position)).
    pub fn data_position<T: DeserializeOwned>(&self) -> Result<Option<T>, Error> {
        state::from_json(&self.metadata, state::DATA_POSITION)
    }

    /// The user metadata ([`SnapshotRequest::metadata`](super::SnapshotRequest::metadata)).
    pub fn user_metadata<T: DeserializeOwned>(&self) -> Result<Option<T>, Error> {
        state::from_json(&self.metadata, state::USER)
    }
}
