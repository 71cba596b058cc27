//! A small model and a training step the scenarios share: an MLP (with dropout when
//! asked) on a synthetic regression task, batches either a pure function of the step or
//! drawn by a shuffled loader whose state a snapshot carries.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData, activation::relu};
use burn::train::checkpoint::Checkpoint;
use chacha20::ChaCha12Rng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Inputs per sample.
pub const INPUTS: usize = 16;
/// Samples per batch.
pub const BATCH: usize = 32;

/// Two linear layers with a ReLU and dropout between them.
#[derive(Module, Debug)]
pub struct Mlp {
    a: Linear,
    dropout: Dropout,
    b: Linear,
}

impl Mlp {
    /// A fresh model on `device` (initialised from the device's generator) with dropout
    /// probability `dropout` after the hidden layer.
    pub fn new(device: &Device, dropout: f64) -> Mlp {
        Mlp {
            a: LinearConfig::new(INPUTS, 32).init(device),
            dropout: DropoutConfig::new(dropout).init(),
            b: LinearConfig::new(32, 1).init(device),
        }
    }

    /// Predictions `[n, 1]` for inputs `[n, INPUTS]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.b
            .forward(self.dropout.forward(relu(self.a.forward(x))))
    }

    /// The parameter values (weights and biases, in order) as bytes: equal for two
    /// models trained alike in different processes, whose parameter ids differ.
    pub fn weights(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for layer in [&self.a, &self.b] {
            out.push(layer.weight.val().into_data().as_bytes().to_vec());
            if let Some(b) = &layer.bias {
                out.push(b.val().into_data().as_bytes().to_vec());
            }
        }
        out
    }

    /// The model's record as burnpack bytes, parameter ids included (what "the same
    /// parameters" compares within one process).
    pub fn params(&self) -> Vec<u8> {
        self.clone()
            .into_record()
            .checkpoint_into_bytes()
            .expect("a model record serializes")
            .to_vec()
    }
}

/// Sample `i` of the synthetic task: inputs and a smooth target.
fn sample(i: u64) -> (Vec<f32>, f32) {
    let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ (i + 1);
    let x: Vec<f32> = (0..INPUTS)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let y = x
        .iter()
        .enumerate()
        .map(|(j, v)| v * (j as f32 - 7.5) * 0.1)
        .sum::<f32>()
        .sin();
    (x, y)
}

fn tensors(samples: impl Iterator<Item = u64>, device: &Device) -> (Tensor<2>, Tensor<2>) {
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for i in samples {
        let (x, y) = sample(i);
        xs.extend(x);
        ys.push(y);
    }
    let n = ys.len();
    (
        Tensor::from_data(TensorData::new(xs, [n, INPUTS]), device),
        Tensor::from_data(TensorData::new(ys, [n, 1]), device),
    )
}

/// Batch `i` (samples `i * BATCH ..`): a pure function of the step.
pub fn batch(i: u64, device: &Device) -> (Tensor<2>, Tensor<2>) {
    tensors(i * BATCH as u64..(i + 1) * BATCH as u64, device)
}

/// Where a [`Shuffled`] loader is: epoch, position in it, and the shuffling generator's
/// state (ChaCha12, 49 bytes) from before the epoch's order was drawn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Epochs completed.
    pub epoch: u64,
    /// Samples served in the current epoch.
    pub index: usize,
    /// `ChaCha12Rng::serialize_state` at the epoch's start.
    pub rng: Vec<u8>,
}

/// Batches of a fixed set of samples in a new random order every epoch.
#[derive(Debug)]
pub struct Shuffled {
    samples: u32,
    order: Vec<u32>,
    epoch: u64,
    index: usize,
    epoch_rng: [u8; 49],
    rng: ChaCha12Rng,
}

impl Shuffled {
    /// A loader over `samples` samples, its order seeded by `seed`.
    pub fn new(samples: u32, seed: u64) -> Shuffled {
        Shuffled::at(samples, 0, ChaCha12Rng::seed_from_u64(seed))
    }

    /// The loader `position` describes.
    pub fn restore(samples: u32, position: &Position) -> Shuffled {
        let state: [u8; 49] = position.rng.as_slice().try_into().expect("49 bytes");
        let mut s = Shuffled::at(
            samples,
            position.epoch,
            ChaCha12Rng::deserialize_state(&state),
        );
        s.index = position.index;
        s
    }

    fn at(samples: u32, epoch: u64, rng: ChaCha12Rng) -> Shuffled {
        let mut s = Shuffled {
            samples,
            order: Vec::new(),
            epoch,
            index: 0,
            epoch_rng: rng.serialize_state(),
            rng,
        };
        s.shuffle();
        s
    }

    fn shuffle(&mut self) {
        self.epoch_rng = self.rng.serialize_state();
        self.order = (0..self.samples).collect();
        self.order.shuffle(&mut self.rng);
    }

    /// Its position now.
    pub fn position(&self) -> Position {
        Position {
            epoch: self.epoch,
            index: self.index,
            rng: self.epoch_rng.to_vec(),
        }
    }

    /// The next `BATCH` samples (a new, reshuffled epoch when this one runs out).
    pub fn next_batch(&mut self, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let mut picked = Vec::with_capacity(BATCH);
        while picked.len() < BATCH {
            if self.index >= self.order.len() {
                self.epoch += 1;
                self.index = 0;
                self.shuffle();
            }
            picked.push(u64::from(self.order[self.index]));
            self.index += 1;
        }
        tensors(picked.into_iter(), device)
    }
}

/// The stream of per-step seeds of the device's generator (dropout masks): Burn cannot
/// read a device generator's state back, so a run reseeds it each step from this host
/// generator, whose state a snapshot carries.
#[derive(Debug)]
pub struct Seeds(ChaCha12Rng);

impl Seeds {
    /// A stream seeded with `seed`.
    pub fn new(seed: u64) -> Seeds {
        Seeds(ChaCha12Rng::seed_from_u64(seed))
    }

    /// The stream where `state` ([`Seeds::state`]) left it.
    pub fn restore(state: &[u8]) -> Seeds {
        let state: [u8; 49] = state.try_into().expect("49 bytes");
        Seeds(ChaCha12Rng::deserialize_state(&state))
    }

    /// Its state.
    pub fn state(&self) -> Vec<u8> {
        self.0.serialize_state().to_vec()
    }

    /// Seeds `device`'s generator for the next step.
    pub fn seed_next(&mut self, device: &Device) {
        device.seed(self.0.next_u64());
    }
}

/// One optimizer step of mean squared error on `(x, y)` with learning rate `lr`; returns
/// the new model and the loss (before the update) as bits.
pub fn step(
    model: Mlp,
    optim: &mut ModuleOptimizer,
    (x, y): (Tensor<2>, Tensor<2>),
    lr: f64,
) -> (Mlp, u32) {
    let loss = (model.forward(x) - y).powf_scalar(2.0).mean();
    let value = loss
        .clone()
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32 loss")[0];
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    (optim.step(lr, model, grads), value.to_bits())
}
