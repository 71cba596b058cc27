//! The command line's arguments: commands and the encoding options they share.

use bitsnap_core::codec::QuantBits;
use bitsnap_core::references::replay::{Hyper, keys};
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
    /// First moments may take F times the error budget (after the stage rule, at most 1):
    /// Adam forgets an error in its first moment by beta1 per step, one in its second
    /// moment only by beta2 (with --policy lossy-optimizer, without --bits)
    /// [default: 2].
    #[arg(long, value_name = "F", value_parser = parse_factor, conflicts_with = "bits")]
    pub first_moment_factor: Option<f64>,
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

fn parse_factor(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|f| ErrorBudget::DEFAULT.with_first_moment_factor(*f).is_some())
        .ok_or_else(|| format!("`{s}` is not a factor in (0, 100]"))
}

impl PolicyArgs {
    /// The policy these options ask for.
    pub fn policy(&self) -> Result<Policy, CliError> {
        let budget_flags = self.max_error.is_some() || self.first_moment_factor.is_some();
        let lossiness = match (self.policy, self.bits, budget_flags) {
            (PolicyKind::Lossless, None, false) => Lossiness::Lossless,
            (PolicyKind::Lossless, _, _) => {
                return Err(CliError::Usage(
                    "--bits, --max-error and --first-moment-factor apply only with --policy lossy-optimizer".into(),
                ));
            }
            (PolicyKind::LossyOptimizer, Some(bits), false) => Lossiness::LossyOptimizer { bits },
            (PolicyKind::LossyOptimizer, None, _) => {
                let max_error = self.max_error.unwrap_or_default();
                Lossiness::LossyOptimizerBudget {
                    max_error: match self.first_moment_factor {
                        Some(f) => max_error.with_first_moment_factor(f).ok_or_else(|| {
                            CliError::Usage(format!("--first-moment-factor {f}: not in (0, 100]"))
                        })?,
                        None => max_error,
                    },
                }
            }
            (PolicyKind::LossyOptimizer, Some(_), true) => {
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

/// What `pack` and `bench` tell the encoder about tensors that are functions of others:
/// the optimizer that produced the files (for optimizer replay) and `--derive` rules.
/// Both are written into each snapshot's metadata (`bitsnap.optimizer`, `bitsnap.lr`,
/// `bitsnap.step`, `bitsnap.derive`), where a saver would have put them.
#[derive(Debug, Clone, Args, Default)]
pub struct DeriveArgs {
    /// The optimizer of a file series whose metadata does not say: RULE:lr=..,beta1=..,
    /// beta2=..,eps=..,weight_decay=..[,step=N], RULE one of adamw-torch,
    /// adamw-torch-fused, adamw-burn, adam-burn (adamw = adamw-torch); step is the first
    /// file's optimizer step count (Adam's t), one more per following file. Replaces the
    /// files' own optimizer keys. A wrong value costs bytes, never bits.
    #[arg(long, value_name = "SPEC", value_parser = parse_optimizer)]
    pub optimizer: Option<Hyper>,
    /// Tensors that are functions of others, where names cannot tell: cast:HALF=F32
    /// (HALF is the bf16/f16 rounding of F32) or replay:WEIGHT=M,V (M and V are
    /// WEIGHT's Adam moments). Repeatable.
    #[arg(long = "derive", value_name = "RULE", value_parser = parse_derive)]
    pub derive: Vec<String>,
}

fn parse_optimizer(s: &str) -> Result<Hyper, String> {
    Hyper::parse(s).map_err(|e| e.to_string())
}

fn parse_derive(s: &str) -> Result<String, String> {
    let bad = || format!("`{s}` is not cast:HALF=F32 or replay:WEIGHT=M,V");
    let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
    let (left, right) = rest.split_once('=').ok_or_else(bad)?;
    let ok = !left.is_empty()
        && !s.contains(';')
        && match kind {
            "cast" => !right.is_empty(),
            "replay" => right
                .split_once(',')
                .is_some_and(|(m, v)| !m.is_empty() && !v.is_empty() && !v.contains(',')),
            _ => false,
        };
    if ok { Ok(s.to_string()) } else { Err(bad()) }
}

impl DeriveArgs {
    /// Adds these options to the metadata of the `index`-th file of the series.
    pub fn apply(&self, index: usize, metadata: &mut Vec<(String, String)>) {
        let mut set = |k: &str, v: String| {
            metadata.retain(|(key, _)| key != k);
            metadata.push((k.to_string(), v));
        };
        if let Some(h) = &self.optimizer {
            let rule = h.rule.map_or("adamw-torch", |r| r.name());
            set(
                keys::OPTIMIZER,
                format!(
                    "{rule}:beta1={},beta2={},eps={},weight_decay={}",
                    h.beta1, h.beta2, h.eps, h.weight_decay
                ),
            );
            if let Some(lr) = h.lr {
                set(keys::LR, format!("{lr}"));
            }
            if let Some(step) = h.step {
                set(keys::STEP, (step + index as u64).to_string());
            }
        }
        if !self.derive.is_empty() {
            set(keys::DERIVE, self.derive.join(";"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derive_args_write_the_metadata_keys() {
        let d = DeriveArgs {
            optimizer: Some(Hyper::parse("adamw:lr=1e-3,step=10").unwrap()),
            derive: vec!["cast:h=f".into()],
        };
        let mut meta = vec![("bitsnap.step".to_string(), "99".to_string())];
        d.apply(2, &mut meta);
        let get = |k: &str| {
            meta.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("bitsnap.step"), Some("12"));
        assert_eq!(get("bitsnap.lr"), Some("0.001"));
        assert_eq!(
            get("bitsnap.optimizer"),
            Some("adamw-torch:beta1=0.9,beta2=0.999,eps=0.00000001,weight_decay=0")
        );
        assert_eq!(get("bitsnap.derive"), Some("cast:h=f"));
        let h = bitsnap_core::references::replay::Hyper::from_metadata(&meta).unwrap();
        assert_eq!((h.lr, h.step, h.eps), (Some(1e-3), Some(12), 1e-8));
    }

    #[test]
    fn derive_rules_are_checked() {
        assert!(parse_derive("replay:w=m,v").is_ok());
        assert!(parse_derive("cast:h=f").is_ok());
        for bad in [
            "replay:w=m",
            "cast:=f",
            "copy:a=b",
            "replay:w=m,v,x",
            "cast:h=f;cast:a=b",
        ] {
            assert!(parse_derive(bad).is_err(), "{bad}");
        }
    }
}
