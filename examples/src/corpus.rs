//! The shipped texts, split into training and validation bytes, as token windows.

use burn::tensor::{Device, Int, Tensor, TensorData};

/// Pretraining text: four Shakespeare tragedies (see `examples/data/README.md`).
pub const TRAGEDIES: &str = include_str!("../data/tragedies.txt");
/// Fine-tuning text: Shakespeare's sonnets.
pub const SONNETS: &str = include_str!("../data/sonnets.txt");
/// Byte vocabulary: ASCII (the texts are plain ASCII; anything else maps to `?`).
pub const VOCAB: usize = 128;

/// A text as training and validation token streams.
#[derive(Debug, Clone)]
pub struct Corpus {
    train: Vec<u8>,
    valid: Vec<u8>,
}

/// SplitMix64's finalizer: a stateless hash of `z` (offsets that depend on the step alone).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Corpus {
    /// Splits `text`: the last `valid_fraction` is held out for evaluation.
    pub fn new(text: &str, valid_fraction: f64) -> Corpus {
        let bytes: Vec<u8> = text
            .bytes()
            .map(|b| if (b as usize) < VOCAB { b } else { b'?' })
            .collect();
        let cut = ((bytes.len() as f64) * (1.0 - valid_fraction)) as usize;
        Corpus {
            valid: bytes[cut..].to_vec(),
            train: bytes[..cut].to_vec(),
        }
    }

    /// Training bytes.
    pub fn train_len(&self) -> usize {
        self.train.len()
    }

    /// Batch of `step`: `batch` windows of `context + 1` bytes at offsets drawn from `seed`
    /// and `step` alone, so a resumed run sees exactly the batches it would have seen
    /// without carrying a loader's state (the fidelity benchmark's data order; the
    /// training examples shuffle with [`crate::loader::Loader`]).
    pub fn batch(
        &self,
        seed: u64,
        step: u64,
        batch: usize,
        context: usize,
        device: &Device,
    ) -> (Tensor<2, Int>, Tensor<2, Int>) {
        let span = self.train.len().saturating_sub(context + 1).max(1) as u64;
        let offsets: Vec<usize> = (0..batch as u64)
            .map(|i| {
                let key = seed ^ mix(step.wrapping_mul(1_000_003).wrapping_add(i));
                (mix(key) % span) as usize
            })
            .collect();
        windows(&self.train, &offsets, context, device)
    }

    /// Inputs and targets `[offsets.len(), context]` of the training windows of
    /// `context + 1` bytes starting at `offsets` (the order is [`crate::loader::Loader`]'s).
    pub fn windows_at(
        &self,
        offsets: &[usize],
        context: usize,
        device: &Device,
    ) -> (Tensor<2, Int>, Tensor<2, Int>) {
        windows(&self.train, offsets, context, device)
    }

    /// `n` validation batches at evenly spaced offsets (the same every call).
    pub fn valid_batches(
        &self,
        n: usize,
        batch: usize,
        context: usize,
        device: &Device,
    ) -> Vec<(Tensor<2, Int>, Tensor<2, Int>)> {
        let span = self.valid.len().saturating_sub(context + 1).max(1);
        let count = (n * batch).max(1);
        let offsets: Vec<usize> = (0..count).map(|i| i * span / count).collect();
        offsets
            .chunks(batch)
            .map(|o| windows(&self.valid, o, context, device))
            .collect()
    }
}

fn windows(
    bytes: &[u8],
    offsets: &[usize],
    context: usize,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let at = |o: usize, j: usize| bytes.get(o + j).copied().unwrap_or(b' ') as i64;
    let input: Vec<i64> = offsets
        .iter()
        .flat_map(|&o| (0..context).map(move |j| at(o, j)))
        .collect();
    let target: Vec<i64> = offsets
        .iter()
        .flat_map(|&o| (1..=context).map(move |j| at(o, j)))
        .collect();
    let shape = [offsets.len(), context];
    (
        Tensor::from_data(TensorData::new(input, shape), device),
        Tensor::from_data(TensorData::new(target, shape), device),
    )
}
