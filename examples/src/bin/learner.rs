//! bitsnap in Burn's `SupervisedTraining`: the whole integration is the
//! `with_custom_checkpointers` line; resuming is Burn's own `.checkpoint(epoch)`.
//!
//! Trains a small regressor for a few epochs, then starts a second training that resumes
//! from a middle epoch's bitsnap checkpoint, and checks that both end with the same
//! weights, bit for bit.
//!
//! `cargo run --release -p bitsnap-examples --bin learner -- [--smoke] [--out DIR]`

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use bitsnap_burn::{BitSnapCheckpointer, OptimizerSpec};
use bitsnap_core::Policy;
use bitsnap_core::fmt::Ratio;
use bitsnap_examples::report::{StoreReport, human};
use burn::data::dataloader::{DataLoader, DataLoaderBuilder, batcher::Batcher};
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::lr_scheduler::constant::ConstantLr;
use burn::optim::{AdamWConfig, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData, activation::relu};
use burn::train::checkpoint::KeepLastNCheckpoints;
use burn::train::logger::InMemoryMetricLogger;
use burn::train::metric::LossMetric;
use burn::train::{
    InferenceStep, Learner, RegressionOutput, SupervisedTraining, TrainOutput, TrainStep,
};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    about = "bitsnap checkpoints in Burn's SupervisedTraining, resumed with .checkpoint(epoch)"
)]
struct Args {
    /// Fewer samples, for CI.
    #[arg(long)]
    smoke: bool,
    /// Epochs of the uninterrupted run (at least 3); the second run resumes two epochs
    /// before the end.
    #[arg(long, default_value_t = 6)]
    epochs: usize,
    /// Output directory.
    #[arg(long, default_value = "runs/learner")]
    out: PathBuf,
}

#[derive(Module, Debug)]
struct Regressor {
    input: Linear,
    hidden: Linear,
    output: Linear,
}

impl Regressor {
    fn new(device: &Device) -> Regressor {
        Regressor {
            input: LinearConfig::new(8, 256).init(device),
            hidden: LinearConfig::new(256, 256).init(device),
            output: LinearConfig::new(256, 1).init(device),
        }
    }

    fn forward(&self, batch: &Batch) -> RegressionOutput {
        let x = relu(self.input.forward(batch.x.clone()));
        let output = self.output.forward(relu(self.hidden.forward(x)));
        let loss = (output.clone() - batch.y.clone()).powi_scalar(2).mean();
        RegressionOutput::new(loss, output, batch.y.clone())
    }
}

impl TrainStep for Regressor {
    type Input = Batch;
    type Output = RegressionOutput;
    fn step(&self, batch: Batch) -> TrainOutput<RegressionOutput> {
        let out = self.forward(&batch);
        TrainOutput::new(self, out.loss.backward(), out)
    }
}

impl InferenceStep for Regressor {
    type Input = Batch;
    type Output = RegressionOutput;
    fn step(&self, batch: Batch) -> RegressionOutput {
        self.forward(&batch)
    }
}

#[derive(Clone, Debug)]
struct Batch {
    x: Tensor<2>,
    y: Tensor<2>,
}

/// Sample `i`: 8 features and a smooth target, a pure function of `i`.
struct Samples;

impl Batcher<u32, Batch> for Samples {
    fn batch(&self, items: Vec<u32>, device: &Device) -> Batch {
        let x: Vec<f32> = items
            .iter()
            .flat_map(|&i| (0..8).map(move |j| ((i * 8 + j) as f32 * 0.37).sin()))
            .collect();
        let y: Vec<f32> = x.chunks(8).map(|r| r.iter().sum::<f32>().cos()).collect();
        Batch {
            x: Tensor::from_data(TensorData::new(x, [items.len(), 8]), device),
            y: Tensor::from_data(TensorData::new(y, [items.len(), 1]), device),
        }
    }
}

fn train(
    dir: &Path,
    ckpt: &BitSnapCheckpointer,
    samples: u32,
    epochs: usize,
    resume: Option<usize>,
) -> Regressor {
    let loader = |n: u32| -> Arc<dyn DataLoader<Batch>> {
        DataLoaderBuilder::new(Samples)
            .batch_size(16)
            .build(InMemDataset::new((0..n).collect()))
    };
    let mut training = SupervisedTraining::new(dir, loader(samples), loader(samples / 4))
        .num_epochs(epochs)
        // The one line that puts bitsnap in Burn's learner:
        .with_custom_checkpointers(ckpt.clone(), ckpt.clone(), ckpt.clone())
        .with_checkpointing_strategy(KeepLastNCheckpoints::new(3))
        .with_metric_logger(InMemoryMetricLogger::new())
        .metric_train_numeric(LossMetric::new())
        .metric_valid_numeric(LossMetric::new())
        .with_application_logger(None);
    if let Some(epoch) = resume {
        training = training.checkpoint(epoch); // Burn restores model, optimizer, scheduler
    }
    let device = Device::flex().autodiff();
    let optim: ModuleOptimizer = AdamWConfig::new().init_on(&device);
    let learner = Learner::new(Regressor::new(&device), optim, ConstantLr::new(1e-2));
    training.launch(learner).model
}

/// The model's serialised record: what "bit-identical" compares. A serialisation that
/// fails is an error, never an empty record that would equal another failure.
fn weights(model: &Regressor) -> Result<Vec<u8>, burn::store::RecordError> {
    use burn::train::checkpoint::Checkpoint;
    model
        .clone()
        .into_record()
        .checkpoint_into_bytes()
        .map(|b| b.to_vec())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("learner: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let samples = if args.smoke { 64 } else { 4096 };
    let epochs = args.epochs.max(3);
    let resume_at = epochs - 2; // the oldest of the three checkpoints KeepLastN(3) keeps
    let store = args.out.join("checkpoints");
    if store.exists() {
        std::fs::remove_dir_all(&store)?;
    }
    let ckpt = BitSnapCheckpointer::open(&store, Policy::default())?;
    let first = train(&args.out.join("first"), &ckpt, samples, epochs, None);
    println!("trained {epochs} epochs; bitsnap kept the last 3 checkpoints of each record");

    // A second process: reopen the store, resume from `resume_at`, train to the end.
    drop(ckpt);
    let ckpt = BitSnapCheckpointer::open(&store, Policy::default())?;
    let resumed = train(
        &args.out.join("resumed"),
        &ckpt,
        samples,
        epochs,
        Some(resume_at),
    );
    drop(ckpt);
    let same = weights(&first)? == weights(&resumed)?;
    println!(
        "resumed from epoch {resume_at}: final weights {} the uninterrupted run's",
        if same {
            "are bit-identical to"
        } else {
            "DIFFER from"
        }
    );
    let report = StoreReport::read(&store)?;
    for s in &report.snapshots {
        println!(
            "  {:<17} {:>10} raw -> {:>10} file ({}){}",
            format!("{}/{}", s.series, s.name),
            human(s.raw_bytes),
            human(s.file_bytes),
            Ratio(s.ratio()),
            if s.full { ", full" } else { "" }
        );
    }
    println!(
        "store: {} raw -> {} on disk ({})",
        human(report.raw_bytes),
        human(report.disk_bytes),
        Ratio(report.ratio())
    );
    if !same {
        return Err("the resumed run's weights differ from the uninterrupted run's".into());
    }
    Ok(())
}
