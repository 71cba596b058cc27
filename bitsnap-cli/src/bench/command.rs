//! `bitsnap bench`: every codec and baseline side by side on a series of files.

use std::io::Write;
use std::path::PathBuf;

use crate::bench::{Bench, Synthetic};
use bitsnap_core::safetensors;
use clap::Args;

use crate::args::{DeriveArgs, PolicyArgs};
use crate::error::CliError;
use crate::store::{file_stem, read_indexes};
use crate::{progress, roles};

/// The `--json` output of `bitsnap bench`, documented in the command's long help.
pub const JSON_DOC: &str = "\
With --json, prints one JSON object (sizes in bytes, speeds in GB/s of raw bytes, 1 GB =
1e9 bytes, times in seconds of wall clock):
  threads, policy, zstd_level, file_count, raw_bytes
  methods        array, one per method (zstd-1, planes, xor, bitmask, bitsnap):
                 {method, description, raw_bytes, stored_bytes, ratio, delta_ratio
                 (files 1.. only; null for one file), encode_seconds, decode_seconds,
                 encode_gbps, decode_gbps}
  bitmask_bound  {raw_bytes, bound_bytes, ratio} over every tensor with a base, or null
  files          array, one per file: {index, name, tensors, tensors_without_base,
                 raw_bytes, compared_elements, changed_elements, changed_fraction (null
                 for the first file), bitmask_bound (as above, or null), methods (array of
                 {method, raw_bytes, stored_bytes, ratio, encode_seconds, decode_seconds,
                 encode_gbps, decode_gbps}), bitsnap_delta (whether bitsnap stored it as a
                 delta), bitsnap_codecs (object: codec name -> tensors)}
  dtypes         array, one per dtype: {dtype, tensors, methods (as in files)}
  roles          array, bitsnap per role (weight, moment1, moment2, other): {role,
                 tensors, raw_bytes, stored_bytes, ratio, max_rel_l2, max_abs (null when
                 lossless)}
  whole_file_zstd  {file_bytes, stored_bytes, ratio, encode_gbps}: zstd over each whole
                 input file as one frame, or null for --synthetic";

/// The long help of the command.
pub fn long_about() -> String {
    format!(
        "\
Measure, on the same bytes in the same run, every codec and baseline over a series of \
safetensors files (or a synthetic series): file i's tensors are deltas on file i-1's \
tensors of the same name, dtype and shape.

Methods: `zstd-1` (zstd over each tensor's raw bytes, one frame per tensor), `planes` \
(byte planes + zstd), `xor` (XOR with the previous file + byte planes + zstd), `bitmask` \
(bitmask sparse delta; `xor` and `bitmask` use `planes` where a tensor has no base), and \
`bitsnap` (the adaptive policy exactly as `pack` runs it, with --policy). Also the \
bitmask-only bound bits/(1 + bits*p) for changed fraction p, the changed fraction of \
every file, bitsnap per role, and every method per dtype.

Tensors of one dtype in one file are coded together on all rayon threads (see --threads); \
GB/s is raw bytes over wall-clock seconds. Every decode is checked against its input.

--synthetic generates the series in memory instead of reading files: 8 layers of 1M to 4M \
elements (times --scale), each an f32 weight, its bf16 copy and Adam first and second \
moments (f32), plus an i64 step counter; 280 MB per step at scale 1. Step 0 is random \
(weights N(0, 0.02), moments log-normal over decades); steps 1 to 4 take one Adam step \
(lr 1e-4) with a gradient on a random 100%, 10%, 1% and 0.1% of the elements: the \
weights change there only, the moments everywhere (Adam decays them where the gradient \
is 0).

Prints markdown tables: totals per method, ratio per file, GB/s per file, per dtype, and \
bitsnap per role.

With --io, measures instead, on the files and in one run, what the disk and the hardware \
allow: the disk's write+fsync throughput (64 MiB blocks, like `dd conv=fdatasync`), \
`pack` of every file into a new store, `verify` of it, `unpack` of its first and last \
snapshots, and the `zstd` binary (`zstd -1 -T<threads>` over every file, `zstd -d` of the \
last), every output fsynced before its clock stops; GB/s of raw tensor bytes with each \
ratio to its baseline, the pack's per-stage times (read, base, encode, references, \
checksum, write, sync, commit), its peak RSS against the largest file, and the adaptive \
encoder's speed on 1, 2, 4, ... threads. Stores and outputs go under --work-dir and are \
removed.\n\n{JSON_DOC}"
    )
}

/// Arguments of `bitsnap bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// safetensors files, oldest first.
    #[arg(
        value_name = "FILE.safetensors",
        required_unless_present = "synthetic",
        conflicts_with = "synthetic"
    )]
    files: Vec<PathBuf>,
    /// Generate a synthetic training series in memory instead of reading files.
    #[arg(long)]
    synthetic: bool,
    /// Size of the synthetic series: multiplies every tensor's element count [default: 1].
    #[arg(long, value_name = "F", value_parser = parse_scale)]
    scale: Option<f64>,
    /// Print JSON instead of markdown (see the long help for the fields).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Measure pack, unpack and verify against the disk and the zstd binary instead
    /// (wall clock, outputs fsynced): GB/s, ratios, pack stages, peak RSS, encode
    /// scaling over threads.
    #[arg(long, conflicts_with_all = ["synthetic", "json"])]
    io: bool,
    /// With --io: where the stores and outputs are written (and removed) [default: the
    /// system's temporary directory].
    #[arg(long, value_name = "DIR", requires = "io")]
    work_dir: Option<PathBuf>,
    /// With --io: the zstd binary [default: `zstd` on PATH].
    #[arg(long, value_name = "PATH", requires = "io")]
    zstd: Option<PathBuf>,
    #[command(flatten)]
    derive: DeriveArgs,
}

fn parse_scale(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|f| f.is_finite() && *f > 0.0 && *f <= 64.0)
        .ok_or_else(|| format!("`{s}` is not a number in (0, 64]"))
}

/// Runs `bitsnap bench`.
pub fn run(args: BenchArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let policy = args.policy.policy()?;
    if args.scale.is_some() && !args.synthetic {
        return Err(CliError::Usage(
            "--scale applies only with --synthetic".into(),
        ));
    }
    if args.io {
        let indexes = read_indexes(&args.files)?;
        let roles = roles::resolve(&args.policy.roles, &indexes);
        let work = args.work_dir.unwrap_or_else(std::env::temp_dir);
        let report =
            crate::bench::io::run(&args.files, &roles, policy, &work, args.zstd.as_deref())?;
        report.write_markdown(out)?;
        return Ok(());
    }
    let mut bench = Bench::new(policy);
    if args.synthetic {
        let spec = Synthetic::default().with_scale(args.scale.unwrap_or(1.0));
        let bar = progress::items(spec.len() as u64, "synthetic");
        for (name, tensors) in spec.steps() {
            bar.set_message(format!("bench {name}"));
            bench.push(&name, tensors)?;
            bar.inc(1);
        }
        bar.finish_and_clear();
    } else {
        let indexes = read_indexes(&args.files)?;
        let roles = roles::resolve(&args.policy.roles, &indexes);
        let bar = progress::items(args.files.len() as u64, "bench");
        for (i, f) in args.files.iter().enumerate() {
            let name = file_stem(f);
            bar.set_message(format!("bench {name}"));
            let (tensors, mut metadata) = safetensors::read_file(f, |n| roles.role(n))?;
            args.derive.apply(i, &mut metadata);
            bench.push_with_metadata(&name, tensors, &metadata)?;
            bar.inc(1);
        }
        bar.finish_and_clear();
    }
    let mut report = bench.finish();
    if !args.synthetic {
        report.whole_file_zstd = Some(crate::bench::whole_file_zstd(
            &args.files,
            report.zstd_level,
        )?);
    }
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &report)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", report.to_markdown())?;
    }
    Ok(())
}
