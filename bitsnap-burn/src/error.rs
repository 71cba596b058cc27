//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in bitsnap-burn.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bitsnap store failed (I/O, corruption, missing base, ...); the message names the
    /// file and tensor.
    #[error(transparent)]
    Store(#[from] bitsnap_core::Error),
    /// Burn could not turn a record into bytes or back.
    #[error("burn record ({what}): {message}")]
    Record {
        /// Which record (`model`, `optimizer`, `lr scheduler`).
        what: &'static str,
        /// Burn's message.
        message: String,
    },
    /// A tensor whose Burn dtype bitsnap cannot store (quantized tensors).
    #[error("tensor `{tensor}`: dtype {dtype} cannot be stored by bitsnap")]
    UnsupportedDType {
        /// The tensor.
        tensor: String,
        /// The Burn dtype, as Burn prints it.
        dtype: String,
    },
    /// A snapshot lacks something a restore needs.
    #[error("{}: {reason}", store.display())]
    Incomplete {
        /// The store directory.
        store: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// No snapshot for this step or epoch.
    #[error("{}: no snapshot for {what} {step}", store.display())]
    NotFound {
        /// The store directory.
        store: PathBuf,
        /// `step` or `epoch`.
        what: &'static str,
        /// The step or epoch asked for.
        step: u64,
    },
    /// A background save failed; this is its error, reported on the next call.
    #[error("background save of step {step} failed: {source}")]
    Background {
        /// The step whose save failed.
        step: u64,
        /// Why.
        #[source]
        source: Box<Error>,
    },
    /// The device failed (a read-back, a kernel) or a restored tensor was used wrongly.
    #[error("device: {0}")]
    Device(String),
    /// The background saver thread stopped (it panicked); pending saves are lost and no
    /// further save is accepted.
    #[error("the background saver stopped: {0}")]
    SaverStopped(String),
}

impl From<Error> for burn::train::checkpoint::CheckpointerError {
    fn from(e: Error) -> Self {
        match e {
            Error::Store(bitsnap_core::Error::Io { path, source }) => {
                burn::train::checkpoint::CheckpointerError::IOError(std::io::Error::new(
                    source.kind(),
                    format!("{}: {source}", path.display()),
                ))
            }
            other => burn::train::checkpoint::CheckpointerError::Unknown(other.to_string()),
        }
    }
}
