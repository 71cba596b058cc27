//! A hand-written training loop with bitsnap's step API: snapshots every N steps without
//! stalling the loop, then a crash, a restore from disk and the rest of the run, checked
//! against an uninterrupted run of the same loop.
//!
//! `cargo run --release -p bitsnap-examples --bin custom-loop -- [--smoke] [--out DIR]`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use bitsnap_burn::{StepSaver, StepSaverConfig};
use bitsnap_core::fmt::Ratio;
use bitsnap_examples::report::{StoreReport, human};
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData, activation::gelu};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    about = "A hand-written Burn loop with bitsnap step snapshots, a crash and an exact restore"
)]
struct Args {
    /// Fewer steps, for CI.
    #[arg(long)]
    smoke: bool,
    /// Output directory.
    #[arg(long, default_value = "runs/custom-loop")]
    out: PathBuf,
}

#[derive(Module, Debug)]
struct Mlp {
    a: Linear,
    b: Linear,
}

impl Mlp {
    fn new(device: &Device) -> Mlp {
        device.seed(7); // the same initial weights in every run
        Mlp {
            a: LinearConfig::new(32, 256).init(device),
            b: LinearConfig::new(256, 1).init(device),
        }
    }
}

/// Batch `step`: a pure function of the step, so a restored run sees the same data.
fn batch(step: u64, device: &Device) -> (Tensor<2>, Tensor<2>) {
    let x: Vec<f32> = (0..64 * 32)
        .map(|i| ((i as u64 * 31 + step * 17) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let y: Vec<f32> = x
        .chunks(32)
        .map(|r| r.iter().step_by(3).sum::<f32>().sin())
        .collect();
    (
        Tensor::from_data(TensorData::new(x, [64, 32]), device),
        Tensor::from_data(TensorData::new(y, [64, 1]), device),
    )
}

fn step(model: Mlp, optim: &mut ModuleOptimizer, n: u64, device: &Device) -> (Mlp, f32) {
    let (x, y) = batch(n, device);
    let loss = (model.b.forward(gelu(model.a.forward(x))) - y)
        .powi_scalar(2)
        .mean();
    let value = loss.clone().try_into_scalar::<f32>().unwrap_or(f32::NAN);
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    (optim.step(1e-3, model, grads), value)
}

fn main() -> ExitCode {
    // SAFETY: first thing in `main`: no other thread exists yet.
    unsafe { bitsnap_examples::device::default_device_cpu() };
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("custom-loop: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::flex().autodiff();
    let (steps, every, crash) = if args.smoke {
        (24, 5, 17)
    } else {
        (300, 25, 190)
    };
    let dir = args.out.join("checkpoints");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }

    // The reference: the same loop, never interrupted, never saved.
    let mut model = Mlp::new(&device);
    let mut optim: ModuleOptimizer = AdamWConfig::new().init();
    let mut reference = Vec::new();
    for n in 1..=steps {
        let (m, loss) = step(model, &mut optim, n, &device);
        model = m;
        reference.push(loss);
    }

    // The run with snapshots, which crashes after step `crash`.
    let saver = StepSaver::open(&dir, StepSaverConfig::default())?;
    let mut model = Mlp::new(&device);
    let mut optim: ModuleOptimizer = AdamWConfig::new().init();
    let mut losses = Vec::new();
    let mut stall = 0f64;
    for n in 1..=crash {
        let (m, loss) = step(model, &mut optim, n, &device);
        model = m;
        losses.push(loss);
        if n % every == 0 {
            let t = Instant::now();
            saver.snapshot(n, &model, &optim).submit()?; // hands over tensor handles and returns
            stall = stall.max(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    drop((model, optim, saver)); // the crash (the saver finishes its queued save first)

    // A new process: reopen the store, restore its latest snapshot, continue.
    let t = Instant::now();
    let saver = StepSaver::open(&dir, StepSaverConfig::default())?;
    let restored = saver.latest()?.ok_or("no snapshot to restore")?;
    let mut model = Mlp::new(&device).load_record(restored.model);
    let mut optim = AdamWConfig::new().init().load_record(restored.optimizer);
    let restore_ms = t.elapsed().as_secs_f64() * 1e3;
    losses.truncate(restored.step as usize);
    for n in restored.step + 1..=steps {
        let (m, loss) = step(model, &mut optim, n, &device);
        model = m;
        losses.push(loss);
        if n % every == 0 {
            saver.snapshot(n, &model, &optim).submit()?;
        }
    }
    saver.close()?;

    let same = losses
        .iter()
        .map(|l| l.to_bits())
        .eq(reference.iter().map(|l| l.to_bits()));
    println!(
        "crashed after step {crash}, restored step {} from disk in {restore_ms:.0} ms, trained to {steps}",
        restored.step
    );
    println!(
        "loss {:.4} -> {:.4}; every loss of the restored run {} the uninterrupted run's",
        reference[0],
        reference[reference.len() - 1],
        if same {
            "is bit-identical to"
        } else {
            "is NOT identical to"
        }
    );
    println!("largest training-thread stall of a snapshot: {stall:.3} ms");
    let report = StoreReport::read(&dir)?;
    println!(
        "{} snapshots: {} raw -> {} on disk ({})",
        report.snapshots.len(),
        human(report.raw_bytes),
        human(report.disk_bytes),
        Ratio(report.ratio())
    );
    if !same {
        return Err("the restored run's losses differ from the uninterrupted run's".into());
    }
    Ok(())
}
