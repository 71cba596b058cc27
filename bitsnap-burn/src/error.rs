//! The crate's one error type.

use std::path::PathBuf;

/// An error of a device runtime (CubeCL's `ServerError`, Burn's `ExecutionError`), kept as
/// the source of [`Error::Device`].
pub type DeviceSource = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in bitsnap-burn.
///
/// Corrupt or inconsistent snapshot data is reported as [`Error::Store`] with the core
/// error that names the file, the tensor and the offset (`Malformed`, `Checksum`,
/// `MissingBase`), whichever path (CPU or device) found it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bitsnap store failed (I/O, corruption, missing or mismatched base, ...); the
    /// core error names the file and tensor.
    #[error(transparent)]
    Store(#[from] bitsnap_core::Error),
    /// Burn could not turn a record into bytes or back.
    #[error("burn {what} record: {source}")]
    Record {
        /// Which record (`model`, `optimizer`, `lr scheduler`).
        what: &'static str,
        /// Burn's error.
        #[source]
        source: burn::store::RecordError,
    },
    /// Burnpack bytes of a record could not be read or written.
    #[error("burn {what} record: burnpack: {source}")]
    Burnpack {
        /// Which record (`model`, `optimizer`, `lr scheduler`).
        what: &'static str,
        /// burn-pack's error.
        #[source]
        source: burn::store::burn_pack::Error,
    },
    /// An entry of a record's metadata that bitsnap wrote (a tensor's Burn dtype or
    /// parameter id, a scalar) cannot be read back.
    #[error("burn {what} record: `{key}`: {reason}")]
    RecordMetadata {
        /// Which record (`model`, `optimizer`, `lr scheduler`).
        what: &'static str,
        /// The tensor or scalar the entry describes.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor whose Burn dtype bitsnap cannot store (quantized tensors).
    #[error("tensor `{tensor}`: dtype {dtype} cannot be stored by bitsnap")]
    UnsupportedDType {
        /// The tensor.
        tensor: String,
        /// The Burn dtype, as Burn prints it.
        dtype: String,
    },
    /// A module snapshot is missing or cannot be applied to the module
    /// ([`crate::BitSnapModuleStore`]).
    #[error("{}: {reason}", store.display())]
    Incomplete {
        /// The store directory.
        store: PathBuf,
        /// What is missing or does not fit.
        reason: String,
    },
    /// A snapshot lacks a tensor that a restore needs.
    #[error("{}: snapshot {snapshot} has no tensor `{tensor}`", store.display())]
    MissingTensor {
        /// The store directory.
        store: PathBuf,
        /// The snapshot id.
        snapshot: u64,
        /// The tensor asked for.
        tensor: String,
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
    /// A training-state value (RNG state, data position, user metadata) could not be
    /// written as JSON, or a stored one does not parse as the type asked for.
    #[error("snapshot metadata `{key}`: {source}")]
    StateValue {
        /// The metadata key (`bitsnap.state.rng.<name>`, `bitsnap.state.data_position`,
        /// `bitsnap.state.user`).
        key: String,
        /// serde_json's error.
        #[source]
        source: serde_json::Error,
    },
    /// The device failed: a read-back, a synchronisation.
    #[error("device: {operation}: {source}")]
    Device {
        /// What was being done (`reading tensor `w` back`, `synchronising`).
        operation: String,
        /// The runtime's error.
        #[source]
        source: DeviceSource,
    },
    /// A restored tensor was asked for with another rank than it has.
    #[error("tensor `{tensor}` has rank {actual}, rank {requested} was requested")]
    Rank {
        /// The tensor.
        tensor: String,
        /// Its rank.
        actual: usize,
        /// The rank asked for.
        requested: usize,
    },
    /// The background saver thread panicked (the panic's message is `reason`) or was
    /// closed: pending saves are lost and no further save is accepted.
    #[error("{}: the background saver stopped: {reason}", store.display())]
    SaverStopped {
        /// The store directory of the saver.
        store: PathBuf,
        /// The panic message, or why the saver no longer accepts saves.
        reason: String,
    },
    /// A background save panicked: a bug, or a fault while reading tensors back. The
    /// saver goes on with the next save.
    #[error("{}: a background save panicked: {message}", store.display())]
    Panicked {
        /// The store directory of the saver.
        store: PathBuf,
        /// The panic message.
        message: String,
    },
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
            Error::Record { source, .. } => {
                burn::train::checkpoint::CheckpointerError::Record(source)
            }
            other => burn::train::checkpoint::CheckpointerError::Unknown(other.to_string()),
        }
    }
}
