//! `SupervisedTraining` with `BitSnapCheckpointer` in its three checkpointer slots: Burn's
//! learner saves, deletes (KeepLastN) and restores (`.checkpoint(epoch)`) through bitsnap,
//! and the resumed run ends with exactly the uninterrupted run's weights.
//! The toy model, batcher and data mirror burn-train's own checkpoint tests.

use std::sync::Arc;

use bitsnap_burn::BitSnapCheckpointer;
use bitsnap_core::Policy;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder, batcher::Batcher};
use burn::data::dataset::InMemDataset;
use burn::module::{Module, Param};
use burn::optim::lr_scheduler::constant::ConstantLr;
use burn::optim::{AdamWConfig, ModuleOptimizer};
use burn::tensor::{Device, Distribution, Tensor};
use burn::train::checkpoint::KeepLastNCheckpoints;
use burn::train::logger::InMemoryMetricLogger;
use burn::train::metric::LossMetric;
use burn::train::{
    InferenceStep, Learner, RegressionOutput, SupervisedTraining, TrainOutput, TrainStep,
};

#[derive(Module, Debug)]
struct Toy {
    weight: Param<Tensor<2>>,
}

#[derive(Clone, Debug)]
struct Batch {
    target: Tensor<2>,
}

struct Targets;

impl Batcher<u32, Batch> for Targets {
    fn batch(&self, items: Vec<u32>, device: &Device) -> Batch {
        let v: Vec<f32> = items
            .iter()
            .flat_map(|&i| [i as f32 * 0.1, 1.0 - i as f32 * 0.05, 0.3, -0.2])
            .collect();
        Batch {
            target: Tensor::from_data(burn::tensor::TensorData::new(v, [items.len(), 4]), device),
        }
    }
}

impl Toy {
    fn loss(&self, target: &Tensor<2>) -> (Tensor<1>, Tensor<2>) {
        let [n, _] = target.dims();
        let output = self.weight.val().repeat_dim(0, n);
        (
            (output.clone() - target.clone()).powi_scalar(2).mean(),
            output,
        )
    }
}

impl TrainStep for Toy {
    type Input = Batch;
    type Output = RegressionOutput;

    fn step(&self, item: Batch) -> TrainOutput<RegressionOutput> {
        let (loss, output) = self.loss(&item.target);
        let regression = RegressionOutput::new(loss.clone(), output, item.target);
        TrainOutput::new(self, loss.backward(), regression)
    }
}

impl InferenceStep for Toy {
    type Input = Batch;
    type Output = RegressionOutput;

    fn step(&self, item: Batch) -> RegressionOutput {
        let (loss, output) = self.loss(&item.target);
        RegressionOutput::new(loss, output, item.target)
    }
}

type Loaders = (Arc<dyn DataLoader<Batch>>, Arc<dyn DataLoader<Batch>>);

fn loaders() -> Loaders {
    let train = DataLoaderBuilder::new(Targets)
        .batch_size(2)
        .build(InMemDataset::new((0..8u32).collect()));
    let valid = DataLoaderBuilder::new(Targets)
        .batch_size(2)
        .build(InMemDataset::new((0..4u32).collect()));
    (train, valid)
}

fn learner(device: &Device) -> Learner<Toy> {
    let model = Toy {
        weight: Param::from_tensor(Tensor::random([1, 4], Distribution::Default, device)),
    };
    let optim: ModuleOptimizer = AdamWConfig::new().init();
    Learner::new(model, optim, ConstantLr::new(5e-2))
}

fn train(
    dir: &std::path::Path,
    ckpt: &BitSnapCheckpointer,
    epochs: usize,
    resume: Option<usize>,
    device: &Device,
) -> Vec<f32> {
    let (train, valid) = loaders();
    let mut training = SupervisedTraining::new(dir, train, valid)
        .num_epochs(epochs)
        .with_custom_checkpointers(ckpt.clone(), ckpt.clone(), ckpt.clone())
        .with_checkpointing_strategy(KeepLastNCheckpoints::new(2))
        .with_metric_logger(InMemoryMetricLogger::new())
        .metric_train_numeric(LossMetric::new())
        .metric_valid_numeric(LossMetric::new())
        .with_application_logger(None);
    if let Some(epoch) = resume {
        training = training.checkpoint(epoch);
    }
    let result = training.launch(learner(device));
    result
        .model
        .weight
        .val()
        .into_data()
        .try_into_vec::<f32>()
        .expect("f32 weights")
}

#[test]
fn supervised_training_saves_deletes_and_resumes_through_bitsnap() {
    let device = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("bitsnap");
    let ckpt = BitSnapCheckpointer::open(&store, Policy::default()).unwrap();
    let uninterrupted = train(dir.path(), &ckpt, 4, None, &device);
    {
        // KeepLastN(2): epochs 3 and 4 of each record kind remain.
        let s = ckpt.store();
        let mut names: Vec<(String, String)> = s
            .snapshots()
            .iter()
            .map(|i| (i.series.clone(), i.name.clone()))
            .collect();
        names.sort();
        let want: Vec<(String, String)> = ["model", "optim", "scheduler"]
            .iter()
            .flat_map(|k| [3, 4].map(|e| (k.to_string(), format!("epoch-{e}"))))
            .collect();
        assert_eq!(names, want);
    }
    let first_epoch4 = ckpt.store().find("model", "epoch-4").map(|i| i.id);
    drop(ckpt); // the first process is gone; its lock with it
    // A second run resumes from epoch 3 (restored by the learner from bitsnap; a fresh
    // random init is overwritten) and trains epoch 4 again.
    let dir2 = tempfile::tempdir().unwrap();
    let ckpt2 = BitSnapCheckpointer::open(&store, Policy::default()).unwrap();
    let resumed = train(dir2.path(), &ckpt2, 4, Some(3), &device);
    assert_eq!(
        resumed, uninterrupted,
        "resumed run must end with the uninterrupted run's weights"
    );
    // The resumed run saved epoch 4 again, replacing the first run's.
    let second_epoch4 = ckpt2.store().find("model", "epoch-4").map(|i| i.id);
    assert!(
        second_epoch4 > first_epoch4,
        "{second_epoch4:?} vs {first_epoch4:?}"
    );
}
