//! The decoder's model of one context of context-coded codes (`context.rs`): the same
//! categorical distribution as the encoder's `constriction` model, in 24-bit fixed
//! point, whose quantile function finds the symbol through a table of 2^12 buckets and
//! a short forward scan instead of a binary search over up to 256 entries. Decoding
//! spends most of its time in that function, once per code. The scan is bounded by the
//! symbols sharing one bucket (at most 256, when many symbols have tiny probabilities:
//! slower than a binary search for such a table, never unbounded).

use std::num::NonZeroU32;

use constriction::stream::model::{DecoderModel, EntropyModel};

use super::context::MAX_SYMBOLS;

/// Fixed-point precision of the probabilities, in bits (the format's).
pub(super) const PRECISION: usize = 24;
/// The quantile range is cut into 2^BUCKET_BITS buckets, each knowing its first symbol.
const BUCKET_BITS: usize = 12;
// A bucket's first symbol is stored in a byte.
const _: () = assert!(MAX_SYMBOLS <= 256);

/// A categorical distribution over symbols `0..k` for decoding.
#[derive(Debug, Clone)]
pub(super) struct Lookup {
    /// `k + 1` cumulative probabilities: `cdf[0] = 0`, `cdf[k] = 2^PRECISION`.
    cdf: Vec<u32>,
    /// Each symbol's probability.
    probability: Vec<NonZeroU32>,
    /// Per bucket, the symbol whose range holds the bucket's first quantile.
    start: Vec<u8>,
}

impl Lookup {
    /// The distribution of the fixed-point probabilities `p` (at most [`MAX_SYMBOLS`]
    /// symbols, each at least 1, summing to `2^PRECISION`), or `None` if they are not that.
    pub(super) fn new(p: &[u32]) -> Option<Lookup> {
        if p.is_empty() || p.len() > MAX_SYMBOLS {
            return None;
        }
        let probability: Vec<NonZeroU32> = p
            .iter()
            .map(|&x| NonZeroU32::new(x))
            .collect::<Option<_>>()?;
        let mut cdf = Vec::with_capacity(p.len() + 1);
        let mut acc = 0u64;
        cdf.push(0);
        for &x in p {
            acc += u64::from(x);
            cdf.push(u32::try_from(acc).ok()?);
        }
        if acc != 1 << PRECISION {
            return None;
        }
        let mut start = Vec::with_capacity(1 << BUCKET_BITS);
        let mut s = 0usize;
        for bucket in 0..1u32 << BUCKET_BITS {
            let q = bucket << (PRECISION - BUCKET_BITS);
            while cdf[s + 1] <= q {
                s += 1;
            }
            start.push(s as u8);
        }
        Some(Lookup {
            cdf,
            probability,
            start,
        })
    }
}

impl EntropyModel<PRECISION> for Lookup {
    type Symbol = usize;
    type Probability = u32;
}

impl DecoderModel<PRECISION> for Lookup {
    fn quantile_function(&self, quantile: u32) -> (usize, u32, NonZeroU32) {
        // `quantile < 2^PRECISION` (the coder masks it), so the bucket exists and the
        // scan stops at the last symbol at the latest (`cdf[k] = 2^PRECISION`).
        let mut s = usize::from(self.start[(quantile >> (PRECISION - BUCKET_BITS)) as usize]);
        while self.cdf[s + 1] <= quantile {
            s += 1;
        }
        (s, self.cdf[s], self.probability[s])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use constriction::stream::model::DefaultContiguousCategoricalEntropyModel as Model;
    use proptest::prelude::*;

    /// Random fixed-point probabilities of `k` symbols, skewed, summing to 2^PRECISION.
    fn probabilities(k: usize, seed: u64) -> Vec<u32> {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::Xoshiro256PlusPlus::seed_from_u64(seed);
        let w: Vec<u64> = (0..k)
            .map(|_| 1 + (rng.random::<f64>().powi(4) * 1e6) as u64)
            .collect();
        let total: u64 = w.iter().sum();
        let room = (1u64 << PRECISION) - k as u64;
        let mut p: Vec<u32> = w.iter().map(|&x| (x * room / total) as u32 + 1).collect();
        let sum: u64 = p.iter().map(|&x| u64::from(x)).sum();
        p[0] += ((1u64 << PRECISION) - sum) as u32;
        p
    }

    proptest! {
        #[test]
        fn agrees_with_the_encoders_model_on_every_quantile_tried(
            k in 1usize..=256,
            seed in any::<u64>(),
            qs in prop::collection::vec(0u32..1 << PRECISION, 64),
        ) {
            let p = probabilities(k, seed);
            let lookup = Lookup::new(&p).unwrap();
            let model = Model::from_nonzero_fixed_point_probabilities(&p, false).unwrap();
            // Every symbol's first and last quantile, and random ones.
            let mut edges = Vec::new();
            let mut acc = 0u32;
            for &x in &p {
                edges.extend([acc, acc + x - 1]);
                acc += x;
            }
            for q in edges.into_iter().chain(qs) {
                let (s, left, prob) = lookup.quantile_function(q);
                let (s2, left2, prob2) = model.quantile_function(q);
                prop_assert_eq!((s, left, prob.get()), (s2, left2, prob2.get()), "quantile {}", q);
            }
        }
    }

    /// Every quantile of `p`, against the encoder's model.
    fn agrees_everywhere(p: &[u32]) {
        let lookup = Lookup::new(p).unwrap();
        let model = Model::from_nonzero_fixed_point_probabilities(p, false).unwrap();
        for q in 0..1u32 << PRECISION {
            let (s, left, prob) = lookup.quantile_function(q);
            let (s2, left2, prob2) = model.quantile_function(q);
            assert_eq!((s, left, prob.get()), (s2, left2, prob2.get()), "{q}");
        }
    }

    #[test]
    fn agrees_on_every_quantile_of_extreme_tables() {
        let full = 1u32 << PRECISION;
        // One symbol; 255 symbols of probability 1 in the first bucket; all equal; every
        // symbol ending exactly on a bucket boundary.
        agrees_everywhere(&[full]);
        let mut tiny = vec![1u32; 256];
        tiny[255] = full - 255;
        agrees_everywhere(&tiny);
        tiny.reverse();
        agrees_everywhere(&tiny);
        agrees_everywhere(&[1 << 16; 256]);
        let bucket = 1u32 << (PRECISION - BUCKET_BITS);
        let mut edges = vec![bucket; 255];
        edges.push(full - 255 * bucket);
        agrees_everywhere(&edges);
    }

    #[test]
    fn refuses_what_is_not_a_distribution() {
        let full = 1u32 << PRECISION;
        assert!(Lookup::new(&[full]).is_some());
        assert!(Lookup::new(&[]).is_none());
        assert!(Lookup::new(&[full - 1]).is_none());
        assert!(Lookup::new(&[full, 0]).is_none());
        assert!(Lookup::new(&[u32::MAX, 2]).is_none());
        assert!(Lookup::new(&vec![1 << (PRECISION - 9); 512]).is_none());
    }
}
