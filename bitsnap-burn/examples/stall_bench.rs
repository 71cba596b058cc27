//! Training-thread stall per checkpoint, side by side in one run:
//!
//! (a) Burn's default: `FileCheckpointer` wrapped in `AsyncCheckpointer` (what
//!     `SupervisedTraining` does), fed the way the learner feeds it: `into_record()` and
//!     `to_record()` on the training thread, then `save`;
//! (b) a synchronous bitsnap save (`BitSnapCheckpointer`, same records, on the thread);
//! (c) the bitsnap asynchronous path (`StepSaver::snapshot`: clone handles, queue);
//!
//! plus the cost of cloning the model and optimizer handles alone, the training step time
//! while each method runs (background work competes with training for the same cores),
//! and the bytes each leaves on disk.
//!
//! `cargo run --release -p bitsnap-burn --example stall_bench -- [cpu|wgpu] [params_millions] [saves] [steps_between]`

use std::path::Path;
use std::time::{Duration, Instant};

use bitsnap_burn::{BitSnapCheckpointer, OptimizerSpec, StepSaver, StepSaverConfig};
use bitsnap_core::Policy;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer, OptimizerRecord};
use burn::store::ModuleRecord;
use burn::tensor::{Device, Tensor, TensorData, activation::gelu};
use burn::train::checkpoint::{AsyncCheckpointer, Checkpointer, FileCheckpointer};

#[derive(Module, Debug)]
struct Stack {
    layers: Vec<Linear>,
}

impl Stack {
    fn forward(&self, mut x: Tensor<2>) -> Tensor<2> {
        for l in &self.layers {
            x = gelu(l.forward(x));
        }
        x
    }
}

const WIDTH: usize = 2048;

fn train_step(model: Stack, optim: &mut ModuleOptimizer, device: &Device, step: usize) -> Stack {
    let xs: Vec<f32> = (0..8 * WIDTH)
        .map(|i| (((i + step * 31) % 97) as f32 - 48.0) / 97.0)
        .collect();
    let x = Tensor::<2>::from_data(TensorData::new(xs, [8, WIDTH]), device);
    let loss = model.forward(x).powf_scalar(2.0).mean();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let model = optim.step(1e-4, model, grads);
    device.sync().ok();
    model
}

/// `n` training steps, timing each into `times`.
fn train_for(
    n: usize,
    mut model: Stack,
    optim: &mut ModuleOptimizer,
    device: &Device,
    step: &mut usize,
    times: &mut Vec<Duration>,
) -> Stack {
    for _ in 0..n {
        let t = Instant::now();
        model = train_step(model, optim, device, *step);
        times.push(t.elapsed());
        *step += 1;
    }
    model
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

struct Row {
    method: &'static str,
    stalls: Vec<Duration>,
    steps: Vec<Duration>,
    bytes: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let kind = args.get(1).map(String::as_str).unwrap_or("cpu");
    let millions: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(50);
    let saves: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    // Training steps between checkpoints: real runs checkpoint every few hundred steps, so
    // a background save normally ends before the next one is asked for.
    let between: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(8);
    let device = match kind {
        "wgpu" => Device::wgpu_options().init()?.autodiff(),
        _ => Device::flex().autodiff(),
    };
    let n_layers = (millions * 1_000_000)
        .div_ceil(WIDTH * WIDTH + WIDTH)
        .max(1);
    let mut model = Stack {
        layers: (0..n_layers)
            .map(|_| LinearConfig::new(WIDTH, WIDTH).init(&device))
            .collect(),
    };
    let params = n_layers * (WIDTH * WIDTH + WIDTH);
    // `init_on`: the saver reads the AdamW state in the model's read-back transaction
    // (Burn's checkpointers see the same records either way).
    let mut optim: ModuleOptimizer = AdamWConfig::new().init_on(&device);
    model = train_step(model, &mut optim, &device, 0);
    let raw = (params * 4 * 3) as u64;
    println!(
        "device {kind}, {params} parameters ({n_layers} x Linear {WIDTH}x{WIDTH}), AdamW, {saves} checkpoints per method every {between} steps, {:.0} MB raw per checkpoint",
        raw as f64 / 1e6
    );

    let root = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into()))?;
    let mut rows = Vec::new();
    let mut step = 1;

    // Baseline: cloning handles only.
    let mut stalls = Vec::new();
    let mut steps = Vec::new();
    for _ in 0..saves {
        model = train_for(between, model, &mut optim, &device, &mut step, &mut steps);
        let t = Instant::now();
        let held = (model.clone(), optim.clone());
        stalls.push(t.elapsed());
        drop(held);
    }
    rows.push(Row {
        method: "clone model + optimizer handles (no save)",
        stalls,
        steps,
        bytes: 0,
    });

    // (a) Burn's default.
    {
        let dir = root.path().join("burn");
        let cm = AsyncCheckpointer::<ModuleRecord>::new(FileCheckpointer::new(&dir, "model"));
        let co = AsyncCheckpointer::<OptimizerRecord>::new(FileCheckpointer::new(&dir, "optim"));
        let (mut stalls, mut steps) = (Vec::new(), Vec::new());
        for epoch in 1..=saves {
            model = train_for(between, model, &mut optim, &device, &mut step, &mut steps);
            let t = Instant::now();
            cm.save(epoch, model.clone().into_record())?;
            co.save(epoch, optim.to_record())?;
            stalls.push(t.elapsed());
        }
        drop((cm, co)); // joins the writer threads
        rows.push(Row {
            method: "(a) Burn FileCheckpointer in AsyncCheckpointer",
            stalls,
            steps,
            bytes: dir_bytes(&dir),
        });
    }

    // (b) bitsnap, synchronous.
    {
        let dir = root.path().join("sync");
        let ckpt = BitSnapCheckpointer::open(&dir, Policy::default())?;
        let (mut stalls, mut steps) = (Vec::new(), Vec::new());
        for epoch in 1..=saves {
            model = train_for(between, model, &mut optim, &device, &mut step, &mut steps);
            let t = Instant::now();
            ckpt.save_record(epoch, model.clone().into_record())?;
            ckpt.save_record(epoch, optim.to_record())?;
            stalls.push(t.elapsed());
        }
        rows.push(Row {
            method: "(b) bitsnap, synchronous save",
            stalls,
            steps,
            bytes: dir_bytes(&dir),
        });
    }

    // (c) bitsnap, asynchronous.
    {
        let dir = root.path().join("async");
        let saver = StepSaver::open(&dir, StepSaverConfig::default())?;
        let (mut stalls, mut steps) = (Vec::new(), Vec::new());
        for _ in 1..=saves {
            model = train_for(between, model, &mut optim, &device, &mut step, &mut steps);
            let t = Instant::now();
            saver.snapshot(step as u64, &model, &optim).submit()?;
            stalls.push(t.elapsed());
        }
        // Training steps while the last save runs in the background.
        let _trained = train_for(between, model, &mut optim, &device, &mut step, &mut steps);
        saver.flush()?;
        for s in saver.stats() {
            let gb = s.raw_bytes as f64 / 1e9;
            println!(
                "  async save of step {}: read-back {:.0} ms (transaction {:.0} ms for {:.1} MB model + {:.1} MB optimizer, {} optimizer tensors in it), encode+write {:.0} ms in the background: {:.3} s/GB, {:.1} MB -> {:.1} MB{}",
                s.step,
                ms(s.readback),
                ms(s.read.device),
                s.read.model_bytes as f64 / 1e6,
                s.read.optimizer_bytes as f64 / 1e6,
                s.read.optimizer_in_transaction,
                ms(s.encode_write),
                (s.readback + s.encode_write).as_secs_f64() / gb.max(1e-12),
                s.raw_bytes as f64 / 1e6,
                s.stored_bytes as f64 / 1e6,
                if s.full { " (full)" } else { "" }
            );
        }
        drop(saver);
        rows.push(Row {
            method: "(c) bitsnap, asynchronous (StepSaver)",
            stalls,
            steps,
            bytes: dir_bytes(&dir),
        });
    }

    let a_stall = rows[1].stalls.iter().map(|d| ms(*d)).sum::<f64>() / saves as f64;
    println!(
        "\n| method | stall per checkpoint, mean (max) [each] ms | vs (a) | train step, mean ms | bytes on disk | ratio vs raw |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        let mean = r.stalls.iter().map(|d| ms(*d)).sum::<f64>() / r.stalls.len().max(1) as f64;
        let max = r.stalls.iter().map(|d| ms(*d)).fold(0.0, f64::max);
        let step_ms = r.steps.iter().map(|d| ms(*d)).sum::<f64>() / r.steps.len().max(1) as f64;
        let each: Vec<String> = r.stalls.iter().map(|d| format!("{:.2}", ms(*d))).collect();
        let disk = if r.bytes > 0 {
            format!("{:.1} MB", r.bytes as f64 / 1e6)
        } else {
            "-".into()
        };
        let ratio = if r.bytes > 0 {
            format!("{:.2}x", (raw * saves as u64) as f64 / r.bytes as f64)
        } else {
            "-".into()
        };
        println!(
            "| {} | {mean:.2} ({max:.2}) [{}] | {:.1}% | {step_ms:.0} | {disk} | {ratio} |",
            r.method,
            each.join(", "),
            100.0 * mean / a_stall
        );
    }
    Ok(())
}
