//! Pretrain a small GPT, fine-tune it with half of it frozen, checkpoint with bitsnap,
//! crash, restore and check; print the summary table and write the plot.
//!
//! `cargo run --release -p bitsnap-examples --bin finetune-gpt -- --help`

use std::path::PathBuf;
use std::process::ExitCode;

use bitsnap_core::codec::QuantBits;
use bitsnap_examples::device::{self, DeviceChoice};
use bitsnap_examples::finetune::{self, PolicyChoice, PresetName, RunConfig, Saving};
use bitsnap_examples::keeper::KeeperFiles;
use clap::{Parser, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    about = "GPT pretrain → fine-tune with bitsnap checkpoints, a crash and an exact restore"
)]
struct Args {
    /// Model and schedule size.
    #[arg(long, value_enum, default_value = "cpu")]
    preset: PresetName,
    /// Tiny sizes for CI (same as `--preset smoke`).
    #[arg(long)]
    smoke: bool,
    /// Training device: a GPU through wgpu when present (a CPU rasteriser does not count), else the CPU.
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// Checkpoint encoding.
    #[arg(long, value_enum, default_value = "lossless")]
    policy: PolicyChoice,
    /// With `--policy lossy-optimizer`: a fixed width for every quantized moment (4, 8 or
    /// 16 bits) instead of the error budget.
    #[arg(long)]
    bits: Option<u32>,
    /// With `--policy lossy-optimizer`: relative-L2 error budget per moment tensor (the
    /// policy picks, per tensor and save, the cheapest encoding that meets it).
    #[arg(long, default_value_t = bitsnap_core::ErrorBudget::DEFAULT.rel_l2())]
    max_error: f64,
    /// With `--policy lossy-optimizer`: first moments are allowed this many times
    /// `--max-error` (Adam forgets their error within tens of steps).
    #[arg(long, default_value_t = bitsnap_core::FIRST_MOMENT_FACTOR)]
    first_moment_factor: f64,
    /// Snapshot every N steps (default: the preset's); 1 snapshots every step.
    #[arg(long, alias = "checkpoint-every")]
    snapshot_every: Option<u64>,
    /// Persist every M-th snapshot; the ones between are held in memory (default 1). With
    /// `--compare`, a step interval: bitsnap persists every max(N, M) steps.
    #[arg(long, default_value_t = 1)]
    persist_every: u64,
    /// Measure what checkpointing costs instead of the run: steps/s with no checkpoints,
    /// bitsnap every 1, 10 and 100 steps and Burn's checkpointing every 1, 10 and 100
    /// steps, with slowdown ratios (written to `speed.md` and `speed.json` in `--out`).
    #[arg(long)]
    compare: bool,
    /// Steps measured per configuration with `--compare`.
    #[arg(long, default_value_t = 100)]
    compare_steps: u64,
    /// Steps not counted at the start of each configuration with `--compare`.
    #[arg(long, default_value_t = 5)]
    compare_warmup: u64,
    /// Intervals compared with `--compare`, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1u64, 10, 100])]
    compare_every: Vec<u64>,
    /// Phase 1 steps (default: the preset's).
    #[arg(long)]
    pretrain_steps: Option<u64>,
    /// Phase 2 steps (default: the preset's).
    #[arg(long)]
    finetune_steps: Option<u64>,
    /// Simulate a crash after this step (default: two thirds into the fine-tune).
    #[arg(long, conflicts_with = "no_crash")]
    crash_at: Option<u64>,
    /// Run through without a crash.
    #[arg(long)]
    no_crash: bool,
    /// Continue the run in `--out` from its latest snapshot (after a real crash or Ctrl-C).
    #[arg(long)]
    resume: bool,
    /// Exit abruptly after this step (queued saves abandoned), to try `--resume`.
    #[arg(long)]
    stop_after: Option<u64>,
    /// Output directory (checkpoints, loss log, summary, plot).
    #[arg(long, default_value = "runs/finetune-gpt")]
    out: PathBuf,
    /// Seed of the initialisation and the batch order.
    #[arg(long, default_value_t = 17)]
    seed: u64,
    /// The crash demo in real processes: a keeper process holds every snapshot in memory,
    /// the trainer (a child process) is killed with SIGKILL after --crash-at and restarted
    /// with --resume; the restore comes from the keeper's memory.
    #[arg(long, conflicts_with_all = ["resume", "stop_after", "no_crash", "compare"])]
    keeper: bool,
    /// (Internal to --keeper) run as the keeper of `--out`'s store.
    #[arg(long, hide = true)]
    serve_keeper: bool,
    /// (Internal to --keeper) hand snapshots to the keeper on this socket.
    #[arg(long, hide = true)]
    keeper_socket: Option<PathBuf>,
}

impl Args {
    /// The options a child process of `--keeper` inherits (everything that shapes the run).
    fn child_args(&self) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = Vec::new();
        let mut opt = |k: &str, v: String| {
            a.push(k.into());
            a.push(v.into());
        };
        let name = |v: Option<clap::builder::PossibleValue>| {
            v.map(|v| v.get_name().to_string()).unwrap_or_default()
        };
        opt("--preset", name(self.preset.to_possible_value()));
        opt("--device", name(self.device.to_possible_value()));
        opt("--policy", name(self.policy.to_possible_value()));
        if let Some(b) = self.bits {
            opt("--bits", b.to_string());
        }
        opt("--max-error", self.max_error.to_string());
        opt(
            "--first-moment-factor",
            self.first_moment_factor.to_string(),
        );
        opt("--persist-every", self.persist_every.to_string());
        opt("--seed", self.seed.to_string());
        opt("--out", self.out.display().to_string());
        if let Some(n) = self.snapshot_every {
            opt("--snapshot-every", n.to_string());
        }
        if let Some(n) = self.pretrain_steps {
            opt("--pretrain-steps", n.to_string());
        }
        if let Some(n) = self.finetune_steps {
            opt("--finetune-steps", n.to_string());
        }
        if self.smoke {
            a.push("--smoke".into());
        }
        a
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ bitsnap_examples::Error::Stopped(_)) => {
            eprintln!("finetune-gpt: {e}");
            // Exit at once: the saver thread is left mid-save, like a killed process.
            std::process::exit(75)
        }
        Err(e) => {
            eprintln!("finetune-gpt: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--keeper`: the keeper and two trainers, each this binary.
fn keeper_demo(args: &Args, crash_at: u64) -> Result<(), bitsnap_examples::Error> {
    let exe = std::env::current_exe().map_err(|source| bitsnap_examples::Error::Io {
        path: "current executable".into(),
        source,
    })?;
    let files = KeeperFiles::of(&args.out);
    let mut keeper = args.child_args();
    keeper.push("--serve-keeper".into());
    let mut trainer = args.child_args();
    trainer.extend([
        "--no-crash".into(),
        "--keeper-socket".into(),
        files.socket.into(),
    ]);
    std::fs::create_dir_all(&args.out).map_err(|source| bitsnap_examples::Error::Io {
        path: args.out.clone(),
        source,
    })?;
    bitsnap_examples::keeper::supervise(&exe, &args.out, &keeper, &trainer, crash_at)?;
    Ok(())
}

fn run(args: Args) -> Result<(), bitsnap_examples::Error> {
    let name = if args.smoke {
        PresetName::Smoke
    } else {
        args.preset
    };
    let mut preset = name.preset();
    if let Some(n) = args.snapshot_every {
        preset.checkpoint_every = n.max(1);
    }
    preset.persist_every = args.persist_every.max(1);
    if let Some(n) = args.pretrain_steps {
        preset.pretrain_steps = n.max(1);
    }
    if let Some(n) = args.finetune_steps {
        preset.finetune_steps = n.max(1);
    }
    let bits = match args.bits {
        None => None,
        Some(4) => Some(QuantBits::B4),
        Some(8) => Some(QuantBits::B8),
        Some(16) => Some(QuantBits::B16),
        Some(b) => {
            return Err(bitsnap_examples::Error::Usage(format!(
                "--bits {b}: use 4, 8 or 16"
            )));
        }
    };
    let max_error = bitsnap_core::ErrorBudget::new(args.max_error)
        .and_then(|b| b.with_first_moment_factor(args.first_moment_factor))
        .ok_or_else(|| {
            bitsnap_examples::Error::Usage(format!(
                "--max-error {} --first-moment-factor {}: a relative L2 error in (0, 1] and \
                 a factor in (0, 100]",
                args.max_error, args.first_moment_factor
            ))
        })?;
    if args.serve_keeper {
        let cfg_policy = RunConfig {
            preset,
            policy: args.policy,
            bits,
            max_error,
            crash_at: None,
            resume: false,
            out: args.out.clone(),
            seed: args.seed,
            stop_after: None,
            progress: false,
            keeper: None,
        }
        .bitsnap_policy();
        bitsnap_examples::keeper::serve(
            &KeeperFiles::of(&args.out),
            cfg_policy,
            preset.persist_every,
        )?;
        return Ok(());
    }
    if args.keeper {
        let crash_at = args.crash_at.unwrap_or_else(|| preset.default_crash());
        return keeper_demo(&args, crash_at);
    }
    let chosen = device::choose(args.device)?;
    println!("device: {} ({})", chosen.name, chosen.reason);
    let crash_at = match (
        args.no_crash,
        args.resume || args.stop_after.is_some(),
        args.crash_at,
    ) {
        (true, _, _) | (_, true, None) => None,
        (_, _, Some(c)) => Some(c),
        _ => Some(preset.default_crash()),
    };
    let cfg = RunConfig {
        preset,
        policy: args.policy,
        bits,
        max_error,
        crash_at,
        resume: args.resume,
        out: args.out.clone(),
        seed: args.seed,
        stop_after: args.stop_after,
        progress: args.keeper_socket.is_none(),
        keeper: args.keeper_socket.clone(),
    };
    println!(
        "{:?}: {:.2}M parameters, {} + {} steps, snapshots every {} (persisted every {}) in {}",
        name,
        preset.gpt.num_params() as f64 / 1e6,
        preset.pretrain_steps,
        preset.finetune_steps,
        preset.checkpoint_every,
        preset.persist_every,
        cfg.out.join("checkpoints").display()
    );
    if args.compare {
        let savings: Vec<Saving> = args
            .compare_every
            .iter()
            .flat_map(|&every| [Saving::Bitsnap { every }, Saving::Burn { every }])
            .collect();
        println!(
            "comparing checkpointing costs: {} + {} steps per configuration (persist every {})",
            args.compare_warmup, args.compare_steps, preset.persist_every
        );
        let report = finetune::compare(
            &cfg,
            &chosen.device,
            &chosen.name,
            &savings,
            args.compare_warmup,
            args.compare_steps,
            |row| {
                println!(
                    "  {}: {:.2} steps/s (stall {:.2} s, drain {:.2} s)",
                    row.saving.label(),
                    row.steps_per_s(),
                    row.stall_seconds,
                    row.drain_seconds
                )
            },
        )?;
        println!("\n{}", report.table());
        return Ok(());
    }
    let summary = finetune::run(&cfg, &chosen)?;
    println!("\n{}", summary.table());
    println!("plot: {}", summary.plot.display());
    if let Some(c) = &summary.crash
        && cfg.policy == PolicyChoice::Lossless
        && c.identical != c.replayed
    {
        return Err(bitsnap_examples::Error::Resume(format!(
            "lossless restore replayed {} steps but only {} losses were bit-identical",
            c.replayed, c.identical
        )));
    }
    Ok(())
}
