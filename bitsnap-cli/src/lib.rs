//! The `bitsnap` command line as a library: pack safetensors checkpoints into a bitsnap
//! store, restore them, list, inspect and verify snapshots, and benchmark every codec on
//! a checkpoint series. The `bitsnap` binary is [`run`] over the process's arguments;
//! tests and other tools drive the same code in-process.
//!
//! Errors are one line on stderr, `bitsnap: <message>`, naming the file (and the tensor
//! and offset where known); exit code [`EXIT_FAILURE`] (1), or [`EXIT_USAGE`] (2) for
//! usage errors.
//!
//! ```
//! use std::ffi::OsString;
//! use std::process::ExitCode;
//!
//! let dir = tempfile::tempdir()?;
//! let file = dir.path().join("step-1.safetensors");
//! let w = bitsnap_core::Tensor::from_f32("w", &[2], bitsnap_core::Role::Weight, &[1.0, 2.0])?;
//! bitsnap_core::safetensors::write_file(&file, &[w], &[])?;
//! let store = dir.path().join("store");
//!
//! // The first item is the program name, as in `std::env::args_os()`.
//! let args: Vec<OsString> = vec!["bitsnap".into(), "pack".into(), store.clone().into(), file.into()];
//! assert_eq!(bitsnap_cli::run(args), ExitCode::SUCCESS);
//! assert_eq!(bitsnap_core::Store::open(&store)?.snapshots().len(), 1);
//!
//! // A usage error: exit code 2 and one line on stderr.
//! assert_eq!(bitsnap_cli::run(["bitsnap", "pack"]), ExitCode::from(bitsnap_cli::EXIT_USAGE));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod args;
pub mod bench;
mod error;
mod inspect;
#[cfg(unix)]
mod keep;
mod ls;
mod pack;
mod progress;
mod retain;
mod roles;
mod store;
mod table;
mod unpack;
mod verify;

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, Command};
use crate::error::CliError;
pub use crate::error::{EXIT_FAILURE, EXIT_USAGE};

/// Runs the command line on `args` (the program name first, as `std::env::args_os()`
/// gives them): writes its output to stdout and any error as one line on stderr, and
/// returns the exit code: success, [`EXIT_FAILURE`] or [`EXIT_USAGE`].
///
/// `--threads N` runs the command on a rayon pool of its own, so `run` can be called
/// more than once in a process.
pub fn run<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // `bitsnap` alone: the help, on stderr, as a usage error.
            let _ = e.print();
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            eprintln!(
                "bitsnap: {} (see `bitsnap --help`)",
                one_line_clap_error(&e)
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    init_logging();
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bitsnap: {}", one_line(&e.to_string()));
            ExitCode::from(e.exit_code())
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .try_init();
}

/// Runs a parsed command, on a pool of `--threads` workers when asked.
fn execute(cli: Cli) -> Result<(), CliError> {
    match cli.threads {
        None => dispatch(cli.command),
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n as usize)
            .build()
            .map_err(|e| CliError::Failed(format!("cannot start {n} threads: {e}")))?
            .install(|| dispatch(cli.command)),
    }
}

fn dispatch(command: Command) -> Result<(), CliError> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match command {
        Command::Pack(a) => pack::run(a, &mut out),
        Command::Unpack(a) => unpack::run(a, &mut out),
        Command::Ls(a) => ls::run(a, &mut out),
        Command::Inspect(a) => inspect::run(a, &mut out),
        Command::Verify(a) => verify::run(a, &mut out),
        Command::Prune(a) => retain::prune(a, &mut out),
        Command::Rm(a) => retain::rm(a, &mut out),
        Command::Pin(a) => retain::pin(a, true, &mut out),
        Command::Unpin(a) => retain::pin(a, false, &mut out),
        Command::Compact(a) => retain::compact(a, &mut out),
        Command::Bench(a) => bench::command::run(a, &mut out),
        #[cfg(unix)]
        Command::Keep(a) => keep::run(a, &mut out),
    }?;
    out.flush()?;
    Ok(())
}

/// A clap error as one line: its message and any hints, without the usage block.
fn one_line_clap_error(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut parts = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if !line.is_empty() {
            parts.push(line.strip_prefix("error: ").unwrap_or(line).to_string());
        }
    }
    parts.join(" ")
}

fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}
