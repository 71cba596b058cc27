//! The command line's error type and exit codes.

/// Exit code of a failed command.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code of a usage error (clap's own code for them).
pub const EXIT_USAGE: u8 = 2;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The library failed; its message names the file, tensor and offset.
    #[error(transparent)]
    Core(#[from] bitsnap_core::Error),
    /// The arguments do not make sense together (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// The command ran and found something wrong (exit code 1).
    #[error("{0}")]
    Failed(String),
    /// Writing to standard output failed.
    #[error("writing to standard output: {0}")]
    Output(#[source] std::io::Error),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            _ => EXIT_FAILURE,
        }
    }

    /// Whether this is standard output being closed early (`bitsnap ls | head`), which is
    /// not worth a message.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, CliError::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::Output(e)
    }
}

impl From<serde_json::Error> for CliError {
    fn from(e: serde_json::Error) -> Self {
        CliError::Output(e.into())
    }
}
