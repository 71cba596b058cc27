//! The fidelity benchmark: train, save with lossy optimizer moments under several
//! budgets, resume from early, mid and late snapshots, and compare the final losses with
//! the uninterrupted run and the run-to-run noise.
//!
//! `cargo run --release -p bitsnap-examples --bin fidelity -- --preset cpu`
//!
//! Where one process may not run the whole benchmark (a time-limited GPU machine), run it
//! in parts over the same `--out`, every part with the same settings:
//! `--phase train` (data order 0: the reference run, which saves the snapshots) and
//! `--phase train --data-seed 1`, `2`, … (side by side if the device has room), then
//! `--phase resume [--only-budget B]`, then `--phase report`.

use std::path::PathBuf;
use std::process::ExitCode;

use bitsnap_examples::device::{self, DeviceChoice};
use bitsnap_examples::fidelity::{self, Budget, FidelityPreset, Phase};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Final-loss gap of runs resumed from lossy optimizer state, beside the noise")]
struct Args {
    /// Model and schedule size.
    #[arg(long, value_enum, default_value = "cpu")]
    preset: FidelityPreset,
    /// Training device (`wgpu` for the GPU machine).
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceChoice,
    /// Budgets, comma-separated: lossless, default, 2x, 4x, 0.05, bits4, bits8 (default:
    /// the preset's).
    #[arg(long, value_delimiter = ',')]
    budgets: Vec<String>,
    /// Resume points (multiples of the save interval; default: the preset's).
    #[arg(long, value_delimiter = ',')]
    resume_at: Vec<u64>,
    /// Last step (default: the preset's).
    #[arg(long)]
    total_steps: Option<u64>,
    /// Uninterrupted runs with different data orders (at least 2).
    #[arg(long)]
    noise_runs: Option<u64>,
    /// Output directory: one store per budget, a JSON file per run and per budget's
    /// resumes, and `fidelity.json`.
    #[arg(long, default_value = "runs/fidelity")]
    out: PathBuf,
    /// The part to run: all, train (one uninterrupted run, `--data-seed`), resume, report.
    #[arg(long, value_enum, default_value = "all")]
    phase: PhaseArg,
    /// With `--phase train`: the run's data order (0: the reference run).
    #[arg(long, default_value_t = 0)]
    data_seed: u64,
    /// With `--phase resume`: only this budget's resumes (one of `--budgets`).
    #[arg(long)]
    only_budget: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PhaseArg {
    All,
    Train,
    Resume,
    Report,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fidelity: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), bitsnap_examples::Error> {
    let mut cfg = args.preset.config();
    if !args.budgets.is_empty() {
        cfg.budgets = args
            .budgets
            .iter()
            .map(|s| Budget::parse(s))
            .collect::<Result<_, _>>()?;
    }
    if !args.resume_at.is_empty() {
        cfg.resume_at = args.resume_at;
    }
    if let Some(t) = args.total_steps {
        cfg.total_steps = t;
    }
    if let Some(n) = args.noise_runs {
        cfg.noise_runs = n;
    }
    let chosen = device::choose(args.device)?;
    println!(
        "device: {} ({}); {:?}: {:.2}M parameters, {} steps, saves every {}, resumes at {:?}",
        chosen.name,
        chosen.reason,
        args.preset,
        cfg.gpt.num_params() as f64 / 1e6,
        cfg.total_steps,
        cfg.save_every,
        cfg.resume_at
    );
    std::fs::create_dir_all(&args.out).map_err(|source| bitsnap_examples::Error::Io {
        path: args.out.clone(),
        source,
    })?;
    let phase = match args.phase {
        PhaseArg::All => Phase::All,
        PhaseArg::Train => Phase::Train {
            data_seed: args.data_seed,
        },
        PhaseArg::Resume => Phase::Resume {
            only: args.only_budget.as_deref().map(Budget::parse).transpose()?,
        },
        PhaseArg::Report => Phase::Report,
    };
    let report = fidelity::run(&cfg, &chosen.device, &args.out, phase, |line| {
        eprintln!("{line}")
    })?;
    let Some(report) = report else {
        println!("{:?} done; results in {}", args.phase, args.out.display());
        return Ok(());
    };
    println!("\n{}", report.table());
    println!("({:.0} s)", report.seconds);
    let json = args.out.join("fidelity.json");
    let text = serde_json::to_string_pretty(&report)
        .map_err(|e| bitsnap_examples::Error::Usage(format!("fidelity.json: {e}")))?;
    std::fs::write(&json, text).map_err(|source| bitsnap_examples::Error::Io {
        path: json.clone(),
        source,
    })?;
    println!("wrote {}", json.display());
    Ok(())
}
