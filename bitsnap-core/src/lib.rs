//! bitsnap-core: small, fast, crash-safe checkpoints for LLM training.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod codec;
mod dtype;
mod error;
pub mod format;
mod policy;
mod role;
mod store;
mod tensor;

pub use dtype::DType;
pub use error::Error;
pub use format::{Decision, Header};
pub use policy::{EXACT_TRIAL_BYTES, Lossiness, Policy, SAMPLE_WINDOW_BYTES, SAMPLE_WINDOWS};
pub use role::Role;
pub use store::{
    LOCK_FILE, MANIFEST_FILE, MAX_MANIFEST_BYTES, SaveReport, Snapshot, SnapshotInfo, Store,
    VerifyReport,
};
pub use tensor::{MAX_NAME_BYTES, MAX_RANK, MAX_TENSOR_BYTES, Tensor};
