//! bitsnap-burn: compressed, asynchronous checkpoints for Burn training.
//!
//! - [`BitSnapCheckpointer`]: Burn's `Checkpointer` for `ModuleRecord`,
//!   `OptimizerRecord` and `LrSchedulerRecord`, so `SupervisedTraining` saves into one
//!   bitsnap store with one line:
//!   `.with_custom_checkpointers(ckpt.clone(), ckpt.clone(), ckpt)`.
//! - [`StepSaver`]: for hand-written loops, snapshots of the whole training state by step
//!   (model, optimizer, LR scheduler, RNG states, data position, user metadata), taken
//!   without stalling the training thread (it hands over tensor handles; read-back,
//!   compression and writing run in the background), with exact restore; the optimizer's
//!   state lands on the model's device ([`OptimizerSpec::init_on`]).
//! - [`BitSnapModuleStore`]: Burn's `ModuleStore`, for `module.save_into(&mut store)` and
//!   `module.load_from(&mut store)` outside training.
//! - [`gpu::DeviceLoader`]: restores a snapshot onto a Burn device; on wgpu the compact
//!   form crosses the bus and CubeCL kernels expand bitmask deltas and dequantize codes.
//! - [`bridge`]: the conversion between Burn's records and bitsnap tensors.
// Kernel launches are the only `unsafe`: one file, `gpu/kernels.rs`, SAFETY on each.
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod bridge;
mod checkpointer;
mod error;
pub mod gpu;
mod module_store;
mod saver;

pub use checkpointer::{BitSnapCheckpointer, BurnRecord};
pub use error::Error;
pub use module_store::{BitSnapModuleStore, MODULE_SERIES};
pub use saver::{
    OptimizerSpec, ReadBackStats, Restored, RestoredFrom, SaveStats, SnapshotRequest, StepSaver,
    StepSaverConfig, optimizer_on, snapshot_step,
};
