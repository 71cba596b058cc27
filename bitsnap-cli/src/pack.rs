//! `bitsnap pack`: append safetensors files to a store, one snapshot each.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use bitsnap_core::fmt::{Ratio, bytes};
use bitsnap_core::{Lossiness, Store};
use clap::Args;

use crate::args::{DeriveArgs, PolicyArgs};
use crate::error::CliError;
use crate::pipeline::{self, StageTotals};
use crate::store::{file_stem, index_of, read_indexes, store_url};
use crate::{progress, roles};

/// The long help of the command.
pub fn long_about() -> String {
    "\
Append safetensors files, in the order given, to a store as its next snapshots. The store \
directory is created if it does not exist. Each snapshot is named after its file's stem \
(`step-100.safetensors` -> `step-100`) and keeps the file's `__metadata__`; it is a delta \
on the previous snapshot unless the full-snapshot interval is reached or a delta would \
not pay.

Every file's header is checked before anything is written: a file that is not \
safetensors, or holds a dtype bitsnap does not store, stops the command with nothing \
packed. Each snapshot is committed atomically.

Tensor roles come from --role rules, else are guessed from names: optimizer moments only \
from optimizer-state conventions (PyTorch/DeepSpeed `state.N.exp_avg`, `exp_avg_sq`, \
Megatron `optimizer.state.exp_avg.*`, Optax `opt_state.N.mu`/`nu`, Burn `moment_1`/ \
`moment_2`); `v`, `m` or `momentum` elsewhere (T5's `SelfAttention.v.weight`, MoCo's \
`momentum_encoder.*`) are weights. With --policy lossy-optimizer, the tensors guessed \
moments are listed on stderr before encoding, and a moment guessed only from a sibling \
weight of the same shape (`X.m` beside `X`) stops the command (exit 2) until a --role \
rule says what it is.

Prints one line per snapshot: its index, name, base, sizes and ratio, and under \
--policy lossy-optimizer the largest quantization error of its moments. With --stages, \
also the wall-clock seconds of each stage of each save (read, base, encode, references, \
checksum, write, sync, commit) and a table of their totals with raw GB/s."
        .to_string()
}

/// Arguments of `bitsnap pack`.
#[derive(Debug, Args)]
pub struct PackArgs {
    /// Store directory (created if missing), or an `s3://bucket/prefix` URL.
    #[arg(value_name = "STORE_DIR")]
    store: PathBuf,
    /// safetensors files, oldest first.
    #[arg(value_name = "FILE.safetensors", required = true)]
    files: Vec<PathBuf>,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Print the time of each stage of each save, and a table of totals.
    #[arg(long)]
    stages: bool,
    #[command(flatten)]
    derive: DeriveArgs,
}

/// Runs `bitsnap pack`.
pub fn run(args: PackArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let policy = args.policy.policy()?;
    // Check every header first: a bad file in the list stops the command before any
    // snapshot is written.
    let indexes = read_indexes(&args.files)?;
    let total: u64 = indexes.iter().map(|i| i.data_bytes()).sum();
    // Roles are settled for the whole series before anything is encoded: a lossy pack
    // refuses ambiguous guesses and lists what it will quantize.
    let roles = roles::resolve(&args.policy.roles, &indexes);
    if matches!(
        policy.lossiness,
        Lossiness::LossyOptimizer { .. } | Lossiness::LossyOptimizerBudget { .. }
    ) {
        roles.check_lossy()?;
    }
    let mut store = match store_url(&args.store) {
        Some(url) => Store::open_or_create_url(url, policy)?,
        None => Store::open_or_create(&args.store, policy)?,
    };
    let bar = progress::bytes(total, "packing");
    let mut totals = StageTotals::default();
    for (i, f) in args.files.iter().enumerate() {
        let name = file_stem(f);
        bar.set_message(format!("packing {name}"));
        let read_start = Instant::now();
        let (tensors, mut metadata) = pipeline::read_tensors(f, |n| roles.role(n))?;
        let read = read_start.elapsed();
        args.derive.apply(i, &mut metadata);
        let raw: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
        let report = store.save_with_metadata(&name, tensors, metadata)?;
        totals.add(read, &report.timings, raw);
        bar.inc(raw);
        let index = store.snapshots().len().saturating_sub(1);
        let base = match (report.info.base, report.full_reason) {
            (Some(b), _) => format!(
                "delta on {}",
                index_of(&store, b).map_or(format!("id {b}"), |i| i.to_string())
            ),
            (None, Some(why)) => format!("full ({why})"),
            (None, None) => "full".into(),
        };
        let mut line = format!(
            "snapshot {index} `{}`: {base}, {} tensors, {} -> {} ({})",
            report.info.name,
            report.info.tensors,
            bytes(report.info.raw_bytes),
            bytes(report.info.stored_bytes),
            Ratio(report.info.ratio())
        );
        let lossy: Vec<_> = report
            .header
            .entries
            .iter()
            .filter_map(|e| e.decision.error.filter(|_| !e.codec.is_lossless()))
            .collect();
        if !lossy.is_empty() {
            let rel = lossy.iter().map(|q| q.rel_l2).fold(0.0, f64::max);
            let abs = lossy.iter().map(|q| q.max_abs).fold(0.0, f64::max);
            line.push_str(&format!(
                "; lossy: quantized {} of {} tensors, max rel. L2 error {rel:.2e}, max abs. error {abs:.2e}",
                lossy.len(),
                report.info.tensors
            ));
        }
        if args.stages {
            let mut one = StageTotals::default();
            one.add(read, &report.timings, raw);
            line.push_str(&format!("\n  stages: {}", one.line()));
        }
        bar.suspend(|| writeln!(out, "{line}"))?;
    }
    bar.finish_and_clear();
    if args.stages {
        writeln!(out, "stage totals over {} files:", args.files.len())?;
        totals.write_table(out)?;
    }
    Ok(())
}
