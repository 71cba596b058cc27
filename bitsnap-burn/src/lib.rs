//! bitsnap-burn: compressed, asynchronous checkpoints for Burn training.
//!
//! - [`BitSnapCheckpointer`]: Burn's `Checkpointer` for `ModuleRecord`,
//!   `OptimizerRecord` and `LrSchedulerRecord`, so `SupervisedTraining` saves into one
//!   bitsnap store with one line:
//!   `.with_custom_checkpointers(ckpt.clone(), ckpt.clone(), ckpt)`.
//! - [`StepSaver`]: for hand-written loops, snapshots of model and optimizer by step,
//!   taken without stalling the training thread (it hands over tensor handles; read-back,
//!   compression and writing run in the background), with exact restore.
//! - [`BitSnapModuleStore`]: Burn's `ModuleStore`, for `module.save_into(&mut store)` and
//!   `module.load_from(&mut store)` outside training.
//! - [`bridge`]: the conversion between Burn's records and bitsnap tensors.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod bridge;
mod checkpointer;
mod error;
mod module_store;
mod saver;

pub use checkpointer::{BitSnapCheckpointer, BurnRecord};
pub use error::Error;
pub use module_store::{BitSnapModuleStore, MODULE_SERIES};
pub use saver::{Restored, SaveStats, StepSaver, StepSaverConfig};
