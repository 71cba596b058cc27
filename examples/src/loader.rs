//! A shuffled data loader and the dropout seed stream, whose whole state travels with
//! each snapshot so that a restored run draws exactly the batches and dropout masks the
//! lost run drew.
//!
//! Both generators are ChaCha12 (`rand`'s `StdRng` algorithm); their state is the 49
//! bytes `chacha20` serializes (seed, stream, word position): restoring them continues
//! the streams where they were, which no pure function of the step has to imitate.
//!
//! - [`Loader`]: the training text cut into windows of `context + 1` bytes, visited in a
//!   new random order each epoch, `batch` windows per step. Its [`LoaderState`] (epoch,
//!   index in the epoch, the generator as it was when the epoch was shuffled) rebuilds the
//!   same order and position.
//! - [`DropoutSeeds`]: one draw per step seeds the device's generator
//!   (`Device::seed`) before the forward pass. Burn cannot read a device generator's
//!   state back, so the run reseeds it from a host generator whose state it can save.

use chacha20::ChaCha12Rng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::corpus::Corpus;
use burn::tensor::{Device, Int, Tensor};

/// Serialized ChaCha12 state: `ChaCha12Rng::serialize_state`.
type RngBytes = Vec<u8>;

fn save_rng(rng: &ChaCha12Rng) -> RngBytes {
    rng.serialize_state().to_vec()
}

fn load_rng(bytes: &[u8], what: &str) -> Result<ChaCha12Rng, crate::Error> {
    let state: [u8; 49] = bytes.try_into().map_err(|_| {
        crate::Error::Resume(format!(
            "{what}: a generator state is 49 bytes, the snapshot holds {}",
            bytes.len()
        ))
    })?;
    Ok(ChaCha12Rng::deserialize_state(&state))
}

/// Where a [`Loader`] is: enough to rebuild it exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// Epochs completed.
    pub epoch: u64,
    /// Windows already served in the current epoch.
    pub index: u64,
    /// The shuffling generator as it was before the current epoch's order was drawn.
    pub rng: RngBytes,
}

/// Batches of windows of one text, in a shuffled order that changes every epoch.
#[derive(Debug)]
pub struct Loader {
    windows: usize,
    context: usize,
    batch: usize,
    order: Vec<u32>,
    epoch: u64,
    index: usize,
    /// The generator's state before `order` was drawn (saved in [`LoaderState`]).
    epoch_rng: [u8; 49],
    rng: ChaCha12Rng,
}

impl Loader {
    /// A loader over `corpus`'s training bytes seeded with `seed`, at its first batch.
    pub fn new(corpus: &Corpus, context: usize, batch: usize, seed: u64) -> Loader {
        let rng = ChaCha12Rng::seed_from_u64(seed);
        Loader::at(corpus, context, batch, 0, 0, rng)
    }

    /// The loader `state` describes.
    pub fn restore(
        corpus: &Corpus,
        context: usize,
        batch: usize,
        state: &LoaderState,
    ) -> Result<Loader, crate::Error> {
        let rng = load_rng(&state.rng, "data loader")?;
        let mut loader = Loader::at(corpus, context, batch, state.epoch, 0, rng);
        let index = usize::try_from(state.index).unwrap_or(usize::MAX);
        if index > loader.order.len() {
            return Err(crate::Error::Resume(format!(
                "data loader position {index} is past the epoch's {} windows",
                loader.order.len()
            )));
        }
        loader.index = index;
        Ok(loader)
    }

    fn at(
        corpus: &Corpus,
        context: usize,
        batch: usize,
        epoch: u64,
        index: usize,
        rng: ChaCha12Rng,
    ) -> Loader {
        let windows = (corpus.train_len().saturating_sub(1) / context.max(1)).max(1);
        let mut loader = Loader {
            windows,
            context,
            batch,
            order: Vec::new(),
            epoch,
            index,
            epoch_rng: rng.serialize_state(),
            rng,
        };
        loader.shuffle();
        loader
    }

    fn shuffle(&mut self) {
        self.epoch_rng = self.rng.serialize_state();
        self.order = (0..self.windows as u32).collect();
        self.order.shuffle(&mut self.rng);
    }

    /// Its state now, to save with a snapshot.
    pub fn state(&self) -> LoaderState {
        LoaderState {
            epoch: self.epoch,
            index: self.index as u64,
            rng: self.epoch_rng.to_vec(),
        }
    }

    /// The next batch (inputs, targets), `[batch, context]` each; a new epoch starts,
    /// reshuffled, when the current one runs out.
    pub fn next_batch(
        &mut self,
        corpus: &Corpus,
        device: &Device,
    ) -> (Tensor<2, Int>, Tensor<2, Int>) {
        let mut offsets = Vec::with_capacity(self.batch);
        while offsets.len() < self.batch {
            if self.index >= self.order.len() {
                self.epoch += 1;
                self.index = 0;
                self.shuffle();
            }
            let w = self.order.get(self.index).copied().unwrap_or(0) as usize;
            offsets.push(w * self.context);
            self.index += 1;
        }
        corpus.windows_at(&offsets, self.context, device)
    }
}

/// The stream of per-step seeds for the device's generator (dropout masks).
#[derive(Debug)]
pub struct DropoutSeeds {
    rng: ChaCha12Rng,
}

impl DropoutSeeds {
    /// A stream seeded with `seed`.
    pub fn new(seed: u64) -> DropoutSeeds {
        DropoutSeeds {
            rng: ChaCha12Rng::seed_from_u64(seed ^ 0xD509_0A7E_5EED_0001),
        }
    }

    /// The stream where `state` ([`DropoutSeeds::state`]) left it.
    pub fn restore(state: &[u8]) -> Result<DropoutSeeds, crate::Error> {
        Ok(DropoutSeeds {
            rng: load_rng(state, "dropout seeds")?,
        })
    }

    /// Its state, to save with a snapshot.
    pub fn state(&self) -> Vec<u8> {
        save_rng(&self.rng)
    }

    /// Seeds `device`'s generator for the next step.
    pub fn seed_next(&mut self, device: &Device) {
        device.seed(self.rng.next_u64());
    }
}
