//! bitsnap-core: small, fast, crash-safe checkpoints for LLM training.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod codec;
mod dtype;
mod error;
mod role;
mod tensor;

pub use dtype::DType;
pub use error::Error;
pub use role::Role;
pub use tensor::{MAX_NAME_BYTES, MAX_RANK, MAX_TENSOR_BYTES, Tensor};
