//! The command line's arguments: commands and the encoding options they share.

use bitsnap_core::codec::QuantBits;
use bitsnap_core::{ErrorBudget, Lossiness, Policy};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::error::CliError;
#[cfg(unix)]
use crate::keep;
use crate::roles::{self, RoleRule};
use crate::{bench, inspect, ls, pack, retain, unpack, verify};

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
pub struct Cli {
    /// Rayon worker threads for encoding and decoding (default: one per core).
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
    /// Delete the snapshots a retention policy does not keep (no re-encoding).
    #[command(long_about = retain::prune_long_about())]
    Prune(retain::PruneArgs),
    /// Delete one snapshot (no re-encoding; a base a delta reads is retired).
    #[command(long_about = retain::rm_long_about())]
    Rm(retain::RmArgs),
    /// Pin a snapshot: prune keeps it and rm refuses it.
    Pin(retain::PinArgs),
    /// Unpin a snapshot.
    Unpin(retain::PinArgs),
    /// Rewrite deltas on retired snapshots so their files can be removed now.
    Compact(retain::CompactArgs),
    /// Compare every codec and baseline on a series of safetensors files.
    #[command(long_about = bench::command::long_about())]
    Bench(bench::command::BenchArgs),
    /// Hold the latest snapshots in memory for trainers; persist them in the background.
    #[cfg(unix)]
    #[command(long_about = keep::long_about())]
    Keep(keep::KeepArgs),
}

/// `--policy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PolicyKind {
    /// Every tensor restores bit for bit.
    Lossless,
    /// Optimizer moments may be stored lossily within an error budget (see --max-error)
    /// or at a fixed width (see --bits); everything else lossless.
    LossyOptimizer,
}

/// Encoding options shared by `pack` and `bench`.
#[derive(Debug, Clone, Args)]
pub struct PolicyArgs {
    /// What may be lost.
    #[arg(long, value_enum, default_value_t = PolicyKind::Lossless)]
    pub policy: PolicyKind,
    /// Fixed bits per quantized optimizer-moment element (with --policy lossy-optimizer;
    /// instead of --max-error).
    #[arg(long, value_name = "2|3|4|6|8|16", value_parser = parse_bits, conflicts_with = "max_error")]
    pub bits: Option<QuantBits>,
    /// Relative L2 error allowed per optimizer-moment tensor (with --policy
    /// lossy-optimizer): the cheapest width (2-16 bits), domain (linear, log, or a ratio
    /// or delta against the base snapshot's tensor) or reuse of the base's tensor within
    /// it, scaled per save by the stage metadata (bitsnap.step, bitsnap.lr,
    /// bitsnap.peak_lr, bitsnap.warmup_steps) [default: 0.12].
    #[arg(long, value_name = "E", value_parser = parse_max_error)]
    pub max_error: Option<ErrorBudget>,
    /// A full snapshot at least every N snapshots, bounding restore chains to N files.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub full_every: u32,
    /// Override guessed tensor roles: tensors whose name matches REGEX (anywhere; anchor
    /// with ^…$) get ROLE (weight, other, moment1, moment2). Repeatable; the first
    /// matching rule wins; unmatched tensors get a role guessed from their name.
    #[arg(long = "role", value_name = "REGEX=ROLE", value_parser = roles::parse_rule)]
    pub roles: Vec<RoleRule>,
}

fn parse_bits(s: &str) -> Result<QuantBits, String> {
    s.parse::<u32>()
        .ok()
        .and_then(QuantBits::from_bits)
        .ok_or_else(|| format!("`{s}` is not 2, 3, 4, 6, 8 or 16"))
}

fn parse_max_error(s: &str) -> Result<ErrorBudget, String> {
    s.parse::<f64>()
        .ok()
        .and_then(ErrorBudget::new)
        .ok_or_else(|| format!("`{s}` is not a relative error in (0, 1]"))
}

impl PolicyArgs {
    /// The policy these options ask for.
    pub fn policy(&self) -> Result<Policy, CliError> {
        let lossiness = match (self.policy, self.bits, self.max_error) {
            (PolicyKind::Lossless, None, None) => Lossiness::Lossless,
            (PolicyKind::Lossless, _, _) => {
                return Err(CliError::Usage(
                    "--bits and --max-error apply only with --policy lossy-optimizer".into(),
                ));
            }
            (PolicyKind::LossyOptimizer, Some(bits), None) => Lossiness::LossyOptimizer { bits },
            (PolicyKind::LossyOptimizer, None, max_error) => Lossiness::LossyOptimizerBudget {
                max_error: max_error.unwrap_or_default(),
            },
            (PolicyKind::LossyOptimizer, Some(_), Some(_)) => {
                return Err(CliError::Usage(
                    "--bits and --max-error exclude each other".into(),
                ));
            }
        };
        Ok(Policy::default()
            .with_lossiness(lossiness)
            .with_full_every(self.full_every))
    }
}
