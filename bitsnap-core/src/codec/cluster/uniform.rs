//! Entropy-coded uniform codebooks (ECSQ): cells of one width `Δ` in the value domain,
//! each entry the mean of the values in its cell, as many entries as the tensor's range
//! needs (up to the width's); entropy coding (zstd's, or rANS where the codes are
//! context-coded) then stores each code in about the entropy of the code distribution. At a given distortion that is closer to the
//! rate-distortion bound than a k-means (Lloyd-Max) codebook, whose codes are used
//! about equally often and so do not entropy-code. The payload is an ordinary cluster
//! payload (its codebook is arbitrary values): decoders, the GPU loader included, see no
//! difference.
//!
//! Only linear cells: cells uniform in the logarithm (tried for second moments) stored
//! 2.3–4.5x more than linear ones at the same relative L2 on synthetic log-normal
//! moments, since that error is made by the largest values.

use rayon::prelude::*;

use super::samples::{Samples, Transform};
use super::values::{value_at, with_values};
use super::{
    CodecError, CodecId, EncodeInput, Encoded, QuantBits, chunks, encode_with_codebook, error_scale,
};
use crate::codec::Codec;

/// Values sampled (sorted) to choose `Δ`: up to 2^16 (the tensor itself below that).
const SAMPLE_CLUSTERS: usize = 1024;
/// The cell width is chosen for this fraction of the budget on the sample, leaving
/// room for the sample's error estimate and the rounding of entries to the dtype.
const TARGET_FRACTION: f64 = 0.97;
/// When the whole tensor misses the budget, `Δ` shrinks by this factor and is tried
/// again, at most [`RETRIES`] times.
const SHRINK: f64 = 0.92;
/// Retries after a miss (see [`SHRINK`]).
const RETRIES: usize = 4;
/// Bisection steps over `log2 Δ`, between two grid points.
const BISECTIONS: usize = 12;
/// The grid of cell widths: this many octaves below the largest magnitude, up to 4
/// times it ...
const GRID_OCTAVES: i32 = 14;
/// ... with this many widths per octave.
const GRID_PER_OCTAVE: usize = 8;

/// The ECSQ quantizer: the widest uniform cells whose codebook (the cells' means) keeps
/// the tensor within `max_error` (relative L2), codes `bits` wide: at most `2^bits`
/// cells, the values beyond them joining the outermost ones. Refuses (`None`) non-finite
/// or empty tensors and budgets no cell width meets at that many entries.
///
/// ```
/// use bitsnap_core::codec::{self, ClusterLayout, Codec, CodecId, EncodeInput, QuantBits, UniformQuantizer};
/// use bitsnap_core::{DType, Role};
/// // A first moment: symmetric, peaked at 0.
/// let v: Vec<f32> = (0..20_000).map(|i| 1e-4 * (((i * 7919) % 2001) as f32 - 1000.0).powi(3) / 1e9).collect();
/// let data: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
/// let input = EncodeInput { shape: &[], dtype: DType::F32, role: Role::OptimizerMoment(1), data: &data, base: None };
/// let enc = UniformQuantizer::new(QuantBits::B8, 0.1).encode(&input).unwrap().unwrap();
/// let (decoded, err) = enc.lossy.unwrap();
/// assert!(err.rel_l2 <= 0.1, "{err:?}");
/// assert_eq!(enc.codec, CodecId::Cluster);
/// assert_eq!(codec::decode(CodecId::Cluster, &enc.payload, DType::F32, 20_000, None).unwrap(), decoded);
/// assert!(ClusterLayout::parse(&enc.payload, DType::F32).unwrap().entries < 256);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct UniformQuantizer {
    /// Bits per code: the codebook holds at most `2^bits` entries. Byte-aligned widths
    /// (2, 4, 8) let zstd's Huffman coding see whole codes.
    pub bits: QuantBits,
    /// Relative L2 error allowed (the widest cells within it are chosen).
    pub max_error: f64,
    /// zstd level for the codes; default [`super::super::DEFAULT_ZSTD_LEVEL`].
    pub level: i32,
}

impl UniformQuantizer {
    /// A quantizer of `bits` per code within `max_error`.
    pub fn new(bits: QuantBits, max_error: f64) -> UniformQuantizer {
        UniformQuantizer {
            bits,
            max_error,
            level: super::super::DEFAULT_ZSTD_LEVEL,
        }
    }
}

/// The cells of a sorted sample at width `delta` (cell `round(x / Δ)`), at most `cap`
/// of them: per non-empty cell, the range of the sample it holds. When more than `cap`
/// cells are non-empty, a run of them around the median's cell is kept and the values
/// outside it join the run's end cells (whose entries, the means, then sit inside the
/// tails).
fn cells(sorted: &[f64], delta: f64, cap: usize) -> Vec<(usize, usize)> {
    let raw = |x: f64| (x / delta).round() as i64;
    let mut groups = Vec::new();
    let mut start = 0usize;
    while start < sorted.len() {
        let c = raw(sorted[start]);
        let end = start + sorted[start..].partition_point(|&x| raw(x) == c);
        groups.push((start, end));
        start = end;
    }
    let window = cap.max(1);
    if groups.len() > window {
        let median = sorted.len() / 2;
        let m = groups.partition_point(|g| g.1 <= median);
        let first = m.saturating_sub(window / 2).min(groups.len() - window);
        let last = first + window - 1;
        let (lo, hi) = (groups[first].1, groups[last].0);
        let mut kept = vec![(0, lo)];
        kept.extend_from_slice(&groups[first + 1..last]);
        kept.push((hi, sorted.len()));
        groups = kept;
    }
    groups
}

/// The means of `sorted[a..b]` for each cell.
fn means(sorted: &[f64], cells: &[(usize, usize)]) -> Vec<f64> {
    cells
        .iter()
        .map(|&(a, b)| sorted[a..b].iter().sum::<f64>() / (b - a) as f64)
        .collect()
}

/// Prefix sums of a sorted sample and of its squares, so that a cell's squared error
/// around its mean costs two subtractions instead of a pass over its values (the cell
/// width search evaluates ~50 widths per encode: measured 11% of a lossy `pack` of the
/// JAX series when each evaluation passed over the sample).
struct Sums {
    s1: Vec<f64>,
    s2: Vec<f64>,
}

impl Sums {
    fn of(sorted: &[f64]) -> Sums {
        let (mut s1, mut s2) = (vec![0.0], vec![0.0]);
        let (mut a, mut b) = (0.0f64, 0.0f64);
        for &x in sorted {
            a += x;
            b += x * x;
            s1.push(a);
            s2.push(b);
        }
        Sums { s1, s2 }
    }

    /// The relative L2 error of quantizing the sample (scaled values, `norm` the sum of
    /// their squares) to its cells' means: per cell `Σx² − (Σx)²/len`, never below 0
    /// (rounding). The values are scaled to at most ~1, so the rounding is ~1e-16 of
    /// `norm` per cell, far below any budget.
    fn estimate(&self, cells: &[(usize, usize)], norm: f64) -> f64 {
        let err: f64 = cells
            .iter()
            .map(|&(a, b)| {
                let sum = self.s1[b] - self.s1[a];
                let squares = self.s2[b] - self.s2[a];
                (squares - sum * sum / (b - a) as f64).max(0.0)
            })
            .sum();
        match norm > 0.0 {
            true => (err / norm).sqrt(),
            false => 0.0,
        }
    }
}

impl Codec for UniformQuantizer {
    fn id(&self) -> CodecId {
        CodecId::Cluster
    }

    fn encode(&self, input: &EncodeInput<'_>) -> Result<Option<Encoded>, CodecError> {
        self.encode_with(input, &Samples::default())
    }
}

impl UniformQuantizer {
    /// [`Codec::encode`], drawing its sample through `samples` (shared by the quantizers
    /// a search tries on one input).
    pub(crate) fn encode_with(
        &self,
        input: &EncodeInput<'_>,
        samples: &Samples,
    ) -> Result<Option<Encoded>, CodecError> {
        let dtype = input.dtype;
        if !dtype.is_quantizable_float() || self.max_error.is_nan() || self.max_error <= 0.0 {
            return Ok(None);
        }
        let data = input.data;
        let n = data.len() / dtype.size();
        let step = chunks::chunk_elems(dtype.size());
        let (finite, peak) = data
            .par_chunks(step * dtype.size())
            .map(|chunk| {
                with_values(dtype, chunk, |vals| {
                    vals.iter().fold((true, 0.0f64), |(f, p), &v| {
                        (f && v.is_finite(), p.max(v.abs()))
                    })
                })
            })
            .reduce(|| (true, 0.0), |a, b| (a.0 && b.0, a.1.max(b.1)));
        if !finite || n == 0 {
            return Ok(None);
        }
        let scale = error_scale(peak);
        // Scaled (exactly, by a power of two) so that squares neither overflow nor
        // underflow; the cells are chosen on scaled values and the entries unscaled.
        let sorted = samples.sorted(
            input,
            Transform::Scaled(scale.to_bits()),
            SAMPLE_CLUSTERS,
            |i| Some(value_at(dtype, data, i) * scale),
        );
        let norm: f64 = sorted.iter().map(|x| x * x).sum();
        let cap = 1usize << self.bits.bits();
        if norm == 0.0 {
            // All zeros: one entry.
            return encode_with_codebook(input, self.bits, self.level, false, vec![0.0], scale)
                .map(Some);
        }
        // The error is U-shaped in Δ once the cells are capped (narrow cells clip the
        // tails, wide ones are coarse): a geometric grid finds the widest cells within
        // the target on the sample, then bisection refines towards the next grid point.
        let (lo_x, hi_x) = (peak * scale * 2f64.powi(-GRID_OCTAVES), 4.0 * peak * scale);
        let target = self.max_error * TARGET_FRACTION;
        let sums = Sums::of(&sorted);
        let error = |delta: f64| sums.estimate(&cells(&sorted, delta, cap), norm);
        let meets = |delta: f64| error(delta) <= target;
        let (lo2, hi2) = (lo_x.log2(), hi_x.log2());
        let steps = ((hi2 - lo2) * GRID_PER_OCTAVE as f64).ceil() as usize;
        let at = |i: usize| lo2 + (hi2 - lo2) * i as f64 / steps.max(1) as f64;
        // From the widest cells down; past the bottom of the U (three octaves without a
        // new least error while the cells clip the range), narrower cells only clip
        // more: give up. (One octave lost wins on the Megatron pair, whose error curves
        // at 2 bits are not one U; the whole grid cost 1.45x the time of three octaves
        // there, for the same bytes.) Before the cells clip, a heavy tail makes the
        // error fall in steps (a few large values get cells of their own, then nothing
        // changes for octaves): no reason to stop there.
        let range = sorted.last().copied().unwrap_or(0.0) - sorted.first().copied().unwrap_or(0.0);
        let clips = |delta: f64| range / delta + 1.0 > cap as f64;
        let mut best = None;
        let mut least = (f64::INFINITY, steps);
        for i in (0..=steps).rev() {
            let e = error(at(i).exp2());
            if e <= target {
                best = Some(i);
                break;
            }
            if e < least.0 {
                least = (e, i);
            } else if least.1 >= i + 3 * GRID_PER_OCTAVE && clips(at(i).exp2()) {
                break;
            }
        }
        let Some(best) = best else {
            return Ok(None);
        };
        let (mut lo, mut hi) = (at(best), at((best + 1).min(steps)));
        for _ in 0..BISECTIONS {
            let mid = 0.5 * (lo + hi);
            match meets(mid.exp2()) {
                true => lo = mid,
                false => hi = mid,
            }
        }
        let mut delta = lo.exp2();
        for _ in 0..=RETRIES {
            let c = cells(&sorted, delta, cap);
            let book: Vec<f64> = means(&sorted, &c).into_iter().map(|m| m / scale).collect();
            let enc = encode_with_codebook(input, self.bits, self.level, false, book, scale)?;
            if enc
                .lossy
                .as_ref()
                .is_some_and(|l| l.1.rel_l2 <= self.max_error)
            {
                return Ok(Some(enc));
            }
            delta *= SHRINK;
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;
    use crate::Role;
    use crate::codec::testing::moments;
    use crate::codec::{ClusterLayout, ClusterMode, ClusterQuantizer, decode};
    use proptest::prelude::*;

    fn input(data: &[u8], second: bool) -> EncodeInput<'_> {
        EncodeInput {
            shape: &[],
            dtype: DType::F32,
            role: Role::OptimizerMoment(if second { 2 } else { 1 }),
            data,
            base: None,
        }
    }

    #[test]
    fn beats_kmeans_at_the_same_error() {
        // A first moment at the error of a 3-bit k-means codebook (8 entries used about
        // equally: 53 866 bytes, 2.15 bits/element, its codes rANS-coded; 2.65 when
        // planes + zstd was the only coding): 15 uniform cells at 4 bits store 50 284
        // (2.01; code entropy 1.99), 0.93 of it; measured.
        let data = moments(200_000, false, 7);
        let km = ClusterQuantizer::new(QuantBits::B3)
            .with_mode(ClusterMode::Linear)
            .encode(&input(&data, false))
            .unwrap()
            .unwrap();
        let e = km.lossy.as_ref().unwrap().1.rel_l2;
        let u = UniformQuantizer::new(QuantBits::B4, e)
            .encode(&input(&data, false))
            .unwrap()
            .unwrap();
        assert!(u.lossy.as_ref().unwrap().1.rel_l2 <= e);
        assert!(
            u.payload.len() * 100 < km.payload.len() * 96,
            "{} vs {} at {e}",
            u.payload.len(),
            km.payload.len()
        );
    }

    #[test]
    fn special_tensors() {
        let q = UniformQuantizer::new(QuantBits::B8, 0.1);
        // Non-finite: refused.
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut v = moments(1000, false, 1);
            v[8..12].copy_from_slice(&bad.to_le_bytes());
            assert!(q.encode(&input(&v, false)).unwrap().is_none(), "{bad}");
        }
        // All zeros: exact, one entry.
        let zeros = vec![0u8; 4000];
        let enc = q.encode(&input(&zeros, false)).unwrap().unwrap();
        assert_eq!(enc.lossy.as_ref().unwrap().1.rel_l2, 0.0);
        assert_eq!(
            ClusterLayout::parse(&enc.payload, DType::F32)
                .unwrap()
                .entries,
            1
        );
        assert_eq!(
            decode(CodecId::Cluster, &enc.payload, DType::F32, 1000, None).unwrap(),
            zeros
        );
        // Empty.
        assert!(q.encode(&input(&[], false)).unwrap().is_none());
        let signed = moments(1000, false, 2);
        // A range that needs more cells than the width holds: refused.
        let tight = UniformQuantizer::new(QuantBits::B2, 1e-3);
        assert!(tight.encode(&input(&signed, false)).unwrap().is_none());
    }

    proptest! {
        #[test]
        fn within_budget_and_decodes_to_what_the_encoder_reports(
            bits in prop::sample::select(vec![QuantBits::B2, QuantBits::B4, QuantBits::B8]),
            n in 1usize..3000, second in any::<bool>(),
            seed in any::<u64>(), e in 0.01f64..0.6) {
            let data = moments(n, second, seed);
            let q = UniformQuantizer::new(bits, e);
            let input = input(&data, second);
            if let Some(enc) = q.encode(&input).unwrap() {
                let (decoded, d) = enc.lossy.unwrap();
                prop_assert!(d.rel_l2 <= e, "{d:?} > {e}");
                let layout = ClusterLayout::parse(&enc.payload, DType::F32).unwrap();
                prop_assert_eq!(layout.bits, bits);
                prop_assert_eq!(decode(CodecId::Cluster, &enc.payload, DType::F32, n, None).unwrap(), decoded);
            } else {
                // Refused only for too few entries.
                prop_assert!(bits < QuantBits::B8 || e < 0.05, "{bits:?} {e}");
            }
        }
    }
}
