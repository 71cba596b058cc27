//! `Checkpointer` for Burn's `SupervisedTraining`: model, optimizer and scheduler records
//! of every epoch in one bitsnap store.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bitsnap_core::{Policy, Store};
use burn::lr_scheduler::LrSchedulerRecord;
use burn::optim::OptimizerRecord;
use burn::store::ModuleRecord;
use burn::train::checkpoint::{Checkpoint, Checkpointer, CheckpointerError};

use crate::Error;
use crate::OptimizerSpec;
use crate::bridge::{self, RecordKind};

/// A Burn record type bitsnap knows how to store.
pub trait BurnRecord: Checkpoint {
    /// Which record it is.
    const KIND: RecordKind;
}

impl BurnRecord for ModuleRecord {
    const KIND: RecordKind = RecordKind::Module;
}
impl BurnRecord for OptimizerRecord {
    const KIND: RecordKind = RecordKind::Optimizer;
}
impl BurnRecord for LrSchedulerRecord {
    const KIND: RecordKind = RecordKind::LrScheduler;
}

/// One bitsnap store holding the model, optimizer and learning-rate scheduler records of
/// every saved epoch, each record kind as its own delta series (`model`, `optim`,
/// `scheduler`). It is a cheap handle: clone it to hand one to each of
/// `SupervisedTraining::with_custom_checkpointers`'s three slots.
///
/// Saves behave as Burn's `FileCheckpointer`'s: `save(epoch)` replaces that epoch,
/// `delete(epoch)` removes it if present (a later epoch that is a delta on it is rebased
/// first, so Burn's `KeepLastNCheckpoints` never breaks a kept one), and `restore(epoch)`
/// decodes it (from memory when it is the latest save of this process).
///
/// ```no_run
/// # use bitsnap_burn::BitSnapCheckpointer;
/// # use bitsnap_core::Policy;
/// let ckpt = BitSnapCheckpointer::open("runs/exp1/checkpoints", Policy::default())?;
/// // SupervisedTraining::new(..).with_custom_checkpointers(ckpt.clone(), ckpt.clone(), ckpt)
/// # Ok::<(), bitsnap_burn::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct BitSnapCheckpointer {
    store: Arc<Mutex<Store>>,
    dir: PathBuf,
    optimizer_rule: Option<String>,
}

impl BitSnapCheckpointer {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: impl AsRef<Path>, policy: Policy) -> Result<Self, Error> {
        let store = Store::open_or_create(dir.as_ref(), policy)?;
        Ok(BitSnapCheckpointer {
            store: Arc::new(Mutex::new(store)),
            dir: dir.as_ref().to_path_buf(),
            optimizer_rule: None,
        })
    }

    /// Names the optimizer's update rule in every optimizer record's metadata
    /// (`bitsnap.optimizer`), so that the replay codec needs no estimation (default:
    /// none). A configuration the replay does not model writes nothing.
    pub fn with_optimizer(mut self, config: &impl OptimizerSpec) -> Self {
        self.optimizer_rule = config.replay_rule();
        self
    }

    /// The underlying store (to list or inspect snapshots). Saves wait while it is held.
    pub fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock cannot leave the store inconsistent on disk (every
        // change is committed by one rename), so a poisoned lock is still usable.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn name(epoch: usize) -> String {
        format!("epoch-{epoch}")
    }

    /// Saves `record` as `epoch` of its series.
    pub fn save_record<R: BurnRecord>(&self, epoch: usize, record: R) -> Result<(), Error> {
        let kind = R::KIND;
        let bytes = record
            .checkpoint_into_bytes()
            .map_err(|source| Error::Record {
                what: kind.name(),
                source,
            })?;
        let (tensors, mut metadata) = bridge::from_burnpack(bytes, kind, "")?;
        if let (RecordKind::Optimizer, Some(rule)) = (kind, &self.optimizer_rule) {
            metadata.push(("bitsnap.optimizer".into(), rule.clone()));
        }
        let mut store = self.store();
        let previous = store.find(kind.name(), &Self::name(epoch)).map(|s| s.id);
        let report = store.save_in(kind.name(), &Self::name(epoch), tensors, metadata)?;
        tracing::debug!(
            series = kind.name(),
            epoch,
            id = report.info.id,
            raw = report.info.raw_bytes,
            stored = report.info.stored_bytes,
            "saved"
        );
        if let Some(old) = previous {
            store.delete(old)?;
        }
        Ok(())
    }

    /// Restores `epoch` of `R`'s series.
    pub fn restore_record<R: BurnRecord>(&self, epoch: usize) -> Result<R, Error> {
        let kind = R::KIND;
        let store = self.store();
        let info = store
            .find(kind.name(), &Self::name(epoch))
            .ok_or_else(|| Error::NotFound {
                store: self.dir.clone(),
                what: "epoch",
                step: epoch as u64,
            })?;
        let snap = store.load(info.id)?;
        drop(store);
        if snap.from_memory {
            tracing::info!(
                series = kind.name(),
                epoch,
                "restored from the in-memory copy of the latest save"
            );
        }
        let bytes = bridge::to_burnpack(&snap.tensors, &snap.metadata, kind, "")?;
        R::checkpoint_from_bytes(bytes).map_err(|source| Error::Record {
            what: kind.name(),
            source,
        })
    }

    /// Deletes `epoch` of `R`'s series, if present.
    pub fn delete_record<R: BurnRecord>(&self, epoch: usize) -> Result<(), Error> {
        let mut store = self.store();
        if let Some(id) = store.find(R::KIND.name(), &Self::name(epoch)).map(|s| s.id) {
            store.delete(id)?;
        }
        Ok(())
    }
}

impl<R: BurnRecord> Checkpointer<R> for BitSnapCheckpointer {
    fn save(&self, epoch: usize, record: R) -> Result<(), CheckpointerError> {
        Ok(self.save_record(epoch, record)?)
    }

    fn delete(&self, epoch: usize) -> Result<(), CheckpointerError> {
        Ok(self.delete_record::<R>(epoch)?)
    }

    fn restore(&self, epoch: usize) -> Result<R, CheckpointerError> {
        Ok(self.restore_record(epoch)?)
    }
}
