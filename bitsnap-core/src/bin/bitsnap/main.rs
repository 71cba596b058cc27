//! `bitsnap`: pack safetensors checkpoints into a bitsnap store, restore them, list,
//! inspect and verify snapshots, and benchmark every codec on a checkpoint series.
//!
//! Errors are one line on stderr, `bitsnap: <message>`, naming the file (and the tensor
//! and offset where known); exit code 1, or 2 for usage errors.
#![forbid(unsafe_code)]

mod bench;
mod error;
mod inspect;
mod ls;
mod pack;
mod progress;
mod roles;
mod table;
mod unpack;
mod verify;

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use bitsnap_core::codec::QuantBits;
use bitsnap_core::{Lossiness, Policy, SnapshotInfo, Store};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::error::{CliError, EXIT_USAGE};
use crate::roles::RoleRule;

/// Small, fast checkpoints for LLM training.
#[derive(Debug, Parser)]
#[command(name = "bitsnap", version)]
#[command(after_long_help = "\
Errors are reported on stderr as one line, `bitsnap: <message>`, naming the file (and the \
tensor and byte offset where known). Exit codes: 0 success, 1 failure (including a failed \
`verify`), 2 usage error.

STORE_DIR may be an `s3://bucket/prefix` URL: S3 settings come from the environment \
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION; AWS_ENDPOINT and AWS_ALLOW_HTTP=true \
for S3-compatible servers).

Progress bars are drawn on stderr only when it is a terminal. Logs go to stderr; set \
RUST_LOG (for example RUST_LOG=info) to see more of them.")]
struct Cli {
    /// Rayon worker threads for encoding and decoding (default: one per core).
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Append safetensors files, in order, to a store as its next snapshots.
    #[command(long_about = pack::long_about())]
    Pack(pack::PackArgs),
    /// Restore one snapshot as a safetensors file.
    #[command(long_about = unpack::long_about())]
    Unpack(unpack::UnpackArgs),
    /// List the snapshots of a store.
    #[command(long_about = ls::long_about())]
    Ls(ls::LsArgs),
    /// Show per tensor how a snapshot is stored.
    #[command(long_about = inspect::long_about())]
    Inspect(inspect::InspectArgs),
    /// Decode every snapshot and check every checksum.
    #[command(long_about = verify::long_about())]
    Verify(verify::VerifyArgs),
    /// Compare every codec and baseline on a series of safetensors files.
    #[command(long_about = bench::long_about())]
    Bench(bench::BenchArgs),
}

/// `--policy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PolicyKind {
    /// Every tensor restores bit for bit.
    Lossless,
    /// Optimizer moments may be cluster-quantized (see --bits); everything else lossless.
    LossyOptimizer,
}

/// Encoding options shared by `pack` and `bench`.
#[derive(Debug, Clone, Args)]
struct PolicyArgs {
    /// What may be lost.
    #[arg(long, value_enum, default_value_t = PolicyKind::Lossless)]
    policy: PolicyKind,
    /// Bits per quantized optimizer-moment element (with --policy lossy-optimizer) [default: 8].
    #[arg(long, value_name = "4|8|16", value_parser = parse_bits)]
    bits: Option<QuantBits>,
    /// A full snapshot at least every N snapshots, bounding restore chains to N files.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    full_every: u32,
    /// Override guessed tensor roles: tensors whose name matches REGEX (anywhere; anchor
    /// with ^…$) get ROLE (weight, other, moment1, moment2). Repeatable; the first
    /// matching rule wins; unmatched tensors get a role guessed from their name.
    #[arg(long = "role", value_name = "REGEX=ROLE", value_parser = roles::parse_rule)]
    roles: Vec<RoleRule>,
}

fn parse_bits(s: &str) -> Result<QuantBits, String> {
    s.parse::<u32>()
        .ok()
        .and_then(QuantBits::from_bits)
        .ok_or_else(|| format!("`{s}` is not 4, 8 or 16"))
}

impl PolicyArgs {
    fn policy(&self) -> Result<Policy, CliError> {
        let lossiness = match (self.policy, self.bits) {
            (PolicyKind::Lossless, Some(_)) => {
                return Err(CliError::Usage(
                    "--bits applies only with --policy lossy-optimizer".into(),
                ));
            }
            (PolicyKind::Lossless, None) => Lossiness::Lossless,
            (PolicyKind::LossyOptimizer, bits) => Lossiness::LossyOptimizer {
                bits: bits.unwrap_or_default(),
            },
        };
        Ok(Policy::default()
            .with_lossiness(lossiness)
            .with_full_every(self.full_every))
    }
}

/// A snapshot chosen by a `SNAPSHOT` argument, with its position in the store.
struct Chosen<'a> {
    index: usize,
    info: &'a SnapshotInfo,
}

/// Resolves a `SNAPSHOT` argument: a decimal index into the store's snapshots (from 0,
/// oldest first), else the name of a snapshot (the latest of that name).
fn choose_snapshot<'a>(store: &'a Store, arg: &str) -> Result<Chosen<'a>, CliError> {
    let snaps = store.snapshots();
    let unknown = |what: String| {
        CliError::Core(bitsnap_core::Error::UnknownSnapshot {
            store: store.dir().to_path_buf(),
            snapshot: what,
        })
    };
    if !arg.is_empty() && arg.bytes().all(|b| b.is_ascii_digit()) {
        let index = arg.parse::<usize>().unwrap_or(usize::MAX);
        return match snaps.get(index) {
            Some(info) => Ok(Chosen { index, info }),
            None if snaps.is_empty() => Err(unknown(format!(
                "at index {arg} (the store has no snapshots)"
            ))),
            None => Err(unknown(format!(
                "at index {arg} (the store has {} snapshots: indices 0 to {})",
                snaps.len(),
                snaps.len() - 1
            ))),
        };
    }
    let info = store
        .find_by_name(arg)
        .ok_or_else(|| unknown(format!("named `{arg}`")))?;
    let index = snaps
        .iter()
        .position(|s| s.id == info.id)
        .unwrap_or_default();
    Ok(Chosen { index, info })
}

/// Position of the snapshot with id `id` in the store, if it is there.
fn index_of(store: &Store, id: u64) -> Option<usize> {
    store.snapshots().iter().position(|s| s.id == id)
}

/// Opens an existing store: a directory, or an `s3://bucket/prefix` URL.
fn open_store(dir: &Path) -> Result<Store, CliError> {
    match store_url(dir) {
        Some(url) => Ok(Store::open_url(url)?),
        None => Ok(Store::open(dir)?),
    }
}

/// The URL a store argument names, if it is one (`s3://bucket/prefix`) rather than a
/// directory.
fn store_url(arg: &Path) -> Option<&str> {
    arg.to_str().filter(|s| bitsnap_core::backend::is_url(s))
}

/// The snapshot name of a file: its stem.
fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
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

fn run(cli: Cli) -> Result<(), CliError> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n as usize)
            .build_global()
            .map_err(|e| CliError::Failed(format!("cannot start {n} threads: {e}")))?;
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match cli.command {
        Command::Pack(a) => pack::run(a, &mut out),
        Command::Unpack(a) => unpack::run(a, &mut out),
        Command::Ls(a) => ls::run(a, &mut out),
        Command::Inspect(a) => inspect::run(a, &mut out),
        Command::Verify(a) => verify::run(a, &mut out),
        Command::Bench(a) => bench::run(a, &mut out),
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

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
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
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bitsnap: {}", one_line(&e.to_string()));
            ExitCode::from(e.exit_code())
        }
    }
}
