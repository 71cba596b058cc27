//! Helpers shared by the integration tests: deterministic tensors and change patterns.
#![allow(dead_code)]

use bitsnap_core::{DType, Role, Tensor};

/// A xorshift stream: deterministic, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Random bytes for `n` elements of `dtype`, sprinkled with NaN, infinities and -0.0.
pub fn random_tensor(name: &str, dtype: DType, shape: &[u64], role: Role, seed: u64) -> Tensor {
    let n: u64 = shape.iter().product();
    let w = dtype.size();
    let mut rng = Rng(seed | 1);
    let mut data = Vec::with_capacity(n as usize * w);
    for i in 0..n {
        let r = rng.next();
        let special = match (r % 16, dtype) {
            (0, DType::F32) => Some((f32::NAN.to_bits() as u64).to_le_bytes()),
            (1, DType::F32) => Some(((-0.0f32).to_bits() as u64).to_le_bytes()),
            (2, DType::F32) => Some((f32::NEG_INFINITY.to_bits() as u64).to_le_bytes()),
            (0, DType::BF16) => Some(0x7f80u64.to_le_bytes()),
            (1, DType::F16) => Some(0xfc00u64.to_le_bytes()),
            (0, DType::F64) => Some(f64::NAN.to_bits().to_le_bytes()),
            (3..=9, DType::F32) => Some((((i as f32) * 1e-3).sin().to_bits() as u64).to_le_bytes()),
            _ => None,
        };
        let bytes = special.unwrap_or(r.to_le_bytes());
        data.extend_from_slice(&bytes[..w]);
    }
    Tensor::new(name, dtype, shape.to_vec(), role, data).expect("consistent test tensor")
}

/// `t` with about `permille`/1000 of its elements changed (by a random bit flip).
pub fn mutate(t: &Tensor, permille: u64, seed: u64) -> Tensor {
    let mut out = t.clone();
    let w = t.dtype.size();
    let mut rng = Rng(seed | 1);
    for elem in out.data.chunks_exact_mut(w) {
        let r = rng.next();
        if r % 1000 < permille {
            let bit = (r >> 20) as usize % (w * 8);
            elem[bit / 8] ^= 1 << (bit % 8);
        }
    }
    out
}
