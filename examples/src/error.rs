//! The examples' error type.

use std::path::PathBuf;

/// Everything the examples can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A bitsnap-burn operation (save, restore) failed.
    #[error(transparent)]
    Burn(#[from] bitsnap_burn::Error),
    /// A bitsnap store operation failed.
    #[error(transparent)]
    Store(#[from] bitsnap_core::Error),
    /// Reading or writing a file of the run failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The requested device cannot be used.
    #[error("device: {0}")]
    Device(String),
    /// Drawing the plot failed.
    #[error("plot {path}: {message}")]
    Plot {
        /// The PNG being written.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A resumed run did not reproduce the losses it should have.
    #[error("resume check failed: {0}")]
    Resume(String),
    /// The run stopped on request (`--stop-after`), leaving its saves unfinished.
    #[error("stopped after step {0} as asked; continue with --resume")]
    Stopped(u64),
    /// Options that do not fit together.
    #[error("{0}")]
    Usage(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}
