//! Residual quantization against the base (codec `residual`, tag 10): for moments that
//! moved little since the last save, a codebook of *changes* is far narrower than a
//! codebook of values. A second moment `v` decays by `β₂` per step and grows by
//! `(1 − β₂)·g²`: over tens of steps its ratio to the base stays within a few percent to
//! a few tens of percent of 1, while `v` itself spans decades.
//!
//! Two kinds, named by the payload's transform byte:
//! - [`ResidualKind::Ratio`] (`x̂ = base × ratio[code]`): the ratio `x / base`, clustered
//!   by its logarithm. For non-negative tensors (second moments) whose base is non-zero
//!   wherever the tensor is.
//! - [`ResidualKind::Delta`] (`x̂ = base + delta[code]`): the difference, clustered
//!   linearly (first moments between close saves).
//!
//! The base is what the decoder has: the base snapshot's *decoded* tensor, itself lossy
//! perhaps. The error is measured against the exact input, so it never accumulates
//! along a chain beyond the budget of the save.
//!
//! Decoding computes `base ∘ entry` as the correctly rounded operation of the tensor's
//! dtype (in f64, then rounded once: exact for f16, bf16 and f32, since f64 holds more
//! than twice their precision plus two bits), so any device doing the same f32 `+` or
//! `×` reproduces it bit for bit. The payload layout is the cluster payload's (FORMAT.md
//! 3.7) with transform 2 (delta) or 3 (ratio).

use rayon::prelude::*;

use super::context::CODING_PLANES;
use super::kmeans::kmeans_1d;
use super::payload::{self, Family};
use super::samples::{Samples, Transform};
use super::values::{push_value, round_to, value_at, with_values, write_value};
use super::{QuantBits, TRANSFORM_BASE_DELTA, TRANSFORM_BASE_RATIO};
use crate::DType;
use crate::codec::{Codec, CodecError, CodecId, EncodeInput, Encoded, chunks};

/// What a residual codebook holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResidualKind {
    /// `x̂ = base + delta[code]`.
    Delta,
    /// `x̂ = base × ratio[code]` (non-negative tensors).
    Ratio,
}

impl ResidualKind {
    fn transform(self) -> u8 {
        match self {
            ResidualKind::Delta => TRANSFORM_BASE_DELTA,
            ResidualKind::Ratio => TRANSFORM_BASE_RATIO,
        }
    }

    /// `base ∘ entry` in f64 (rounded to the dtype by the caller).
    fn apply(self, base: f64, entry: f64) -> f64 {
        match self {
            ResidualKind::Delta => base + entry,
            ResidualKind::Ratio => base * entry,
        }
    }
}

/// The residual quantizer: a codebook of at most `2^bits` residuals against the base.
///
/// ```
/// use bitsnap_core::codec::{self, Codec, CodecId, EncodeInput, QuantBits, ResidualKind, ResidualQuantizer};
/// use bitsnap_core::{DType, Role};
/// let base: Vec<f32> = (0..10_000).map(|i| 1e-8 * (1.0 + (i % 977) as f32).powi(2)).collect();
/// let next: Vec<f32> = base.iter().enumerate().map(|(i, v)| v * (1.0 + 0.02 * ((i % 7) as f32 - 3.0) / 3.0)).collect();
/// let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
/// let (base, next) = (bytes(&base), bytes(&next));
/// let input = EncodeInput { shape: &[], dtype: DType::F32, role: Role::OptimizerMoment(2), data: &next, base: Some(&base) };
/// let enc = ResidualQuantizer::new(QuantBits::B3, ResidualKind::Ratio).encode(&input).unwrap().unwrap();
/// let (decoded, err) = enc.lossy.unwrap();
/// assert!(err.rel_l2 < 1e-6, "{err:?}"); // seven distinct ratios fit eight entries
/// assert!(enc.payload.len() * 8 < next.len());
/// assert_eq!(codec::decode(CodecId::ClusterResidual, &enc.payload, DType::F32, 10_000, Some(&base)).unwrap(), decoded);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ResidualQuantizer {
    /// Bits per code.
    pub bits: QuantBits,
    /// Delta or ratio.
    pub kind: ResidualKind,
    /// zstd level for the codes; default [`crate::codec::DEFAULT_ZSTD_LEVEL`].
    pub level: i32,
    /// Lloyd iterations at most; default 12.
    pub iterations: usize,
    /// Codebook entries at most, below `2^bits` (default `None`: `2^bits`): fewer
    /// entries at the same width leave the codes' distribution skewed, which zstd's
    /// entropy coding turns into fewer bytes (a width between two of [`QuantBits`]).
    pub entries: Option<usize>,
}

impl ResidualQuantizer {
    /// A quantizer of `kind` with `bits` per code and default settings.
    pub fn new(bits: QuantBits, kind: ResidualKind) -> ResidualQuantizer {
        ResidualQuantizer {
            bits,
            kind,
            level: crate::codec::DEFAULT_ZSTD_LEVEL,
            iterations: 12,
            entries: None,
        }
    }
}

/// Per element: the value clustered (`None`: any code decodes it exactly), or why the
/// kind does not apply.
fn residual(kind: ResidualKind, x: f64, b: f64) -> Result<Option<f64>, ()> {
    match kind {
        ResidualKind::Delta => Ok(Some(x - b)),
        ResidualKind::Ratio if x < 0.0 || b < 0.0 => Err(()),
        ResidualKind::Ratio if b == 0.0 => match x == 0.0 {
            true => Ok(None),
            false => Err(()),
        },
        // Zero ratios are kept out of the log-domain sample: the codebook gets 0.
        ResidualKind::Ratio if x == 0.0 => Ok(None),
        ResidualKind::Ratio => Ok(Some((x / b).ln())),
    }
}

impl Codec for ResidualQuantizer {
    fn id(&self) -> CodecId {
        CodecId::ClusterResidual
    }

    fn encode(&self, input: &EncodeInput<'_>) -> Result<Option<Encoded>, CodecError> {
        self.encode_with(input, &Samples::default())
    }
}

impl ResidualQuantizer {
    /// [`Codec::encode`], drawing its sample through `samples` (shared by the quantizers
    /// a search tries on one input).
    pub(crate) fn encode_with(
        &self,
        input: &EncodeInput<'_>,
        samples: &Samples,
    ) -> Result<Option<Encoded>, CodecError> {
        let dtype = input.dtype;
        let Some(base) = input.base else {
            return Ok(None);
        };
        if !dtype.is_quantizable_float() || base.len() != input.data.len() {
            return Ok(None);
        }
        let (data, w, kind) = (input.data, dtype.size(), self.kind);
        let n = data.len() / w;
        let step = chunks::chunk_elems(w);
        // One scan: every value and base finite, and the kind applicable everywhere;
        // whether some element needs an exact zero ratio.
        let scan = data
            .par_chunks(step * w)
            .zip(base.par_chunks(step * w))
            .map(|(xs, bs)| {
                let bs = with_values(dtype, bs, |v| v.to_vec());
                with_values(dtype, xs, |xs| {
                    let mut zero = false;
                    for (&x, &b) in xs.iter().zip(&bs) {
                        if !x.is_finite() || !b.is_finite() || residual(kind, x, b).is_err() {
                            return None;
                        }
                        zero |= kind == ResidualKind::Ratio && x == 0.0 && b != 0.0;
                    }
                    Some(zero)
                })
            })
            .try_reduce(|| false, |a, b| Some(a || b));
        let Some(needs_zero) = scan else {
            return Ok(None);
        };
        let k_max = self.entries.map_or(1usize << self.bits.bits(), |e| {
            e.clamp(2, 1usize << self.bits.bits())
        });
        let sample = samples.sorted(input, Transform::Residual(kind), k_max, |i| {
            residual(kind, value_at(dtype, data, i), value_at(dtype, base, i))
                .ok()
                .flatten()
        });
        let reserved = usize::from(needs_zero);
        let centroids = kmeans_1d(&sample, k_max - reserved, self.iterations);
        let mut book: Vec<f64> = centroids
            .iter()
            .map(|&c| match kind {
                ResidualKind::Delta => c,
                ResidualKind::Ratio => c.exp(),
            })
            .map(|v| round_to(dtype, v))
            .filter(|v| v.is_finite())
            .collect();
        if needs_zero || book.is_empty() {
            book.push(match (kind, needs_zero) {
                (ResidualKind::Ratio, false) => 1.0,
                _ => 0.0,
            });
        }
        book.sort_by(f64::total_cmp);
        book.dedup();
        let mids: Vec<f64> = book.windows(2).map(|p| 0.5 * (p[0] + p[1])).collect();
        // Codes: the entry nearest to each element's residual (delta) or ratio; a zero
        // base takes code 0 (it decodes to 0 with any entry).
        let mut codes = vec![0u16; n];
        codes
            .par_chunks_mut(step)
            .zip(data.par_chunks(step * w))
            .zip(base.par_chunks(step * w))
            .for_each(|((codes, xs), bs)| {
                let bs = with_values(dtype, bs, |v| v.to_vec());
                with_values(dtype, xs, |xs| {
                    for ((c, &x), &b) in codes.iter_mut().zip(xs).zip(&bs) {
                        let r = match kind {
                            ResidualKind::Delta => x - b,
                            ResidualKind::Ratio if b == 0.0 => continue,
                            ResidualKind::Ratio => x / b,
                        };
                        *c = mids.partition_point(|&m| m < r) as u16;
                    }
                })
            });
        let mut payload =
            Vec::with_capacity(8 + book.len() * w + n * self.bits.bits() as usize / 16);
        payload.push(self.bits.bits() as u8);
        payload.push(kind.transform());
        payload.extend_from_slice(&[CODING_PLANES, 0]);
        payload.extend_from_slice(&(book.len() as u32).to_le_bytes());
        book.iter()
            .for_each(|&v| push_value(dtype, v, &mut payload));
        // How far each entry moves an element from its base: ranks rows and columns.
        let mags: Vec<f64> = book
            .iter()
            .map(|&r| match kind {
                ResidualKind::Delta => r.abs(),
                ResidualKind::Ratio => r.max(f64::MIN_POSITIVE).ln().abs(),
            })
            .collect();
        payload::push_codes(
            &mut payload,
            &codes,
            self.bits,
            &mags,
            input.shape,
            self.level,
        )?;
        // What the decoder will produce, computed by the decoder itself.
        let mut decoded = vec![0u8; data.len()];
        decode_residual_into(&payload, dtype, base, &mut decoded)?;
        let error = super::distortion(dtype, data, &decoded);
        Ok(Some(Encoded {
            codec: CodecId::ClusterResidual,
            payload,
            lossy: Some((decoded, error)),
        }))
    }
}

/// Decodes a residual payload against `base` (the base tensor's decoded bytes, as long as
/// `out`) into `out`.
pub(crate) fn decode_residual_into(
    payload: &[u8],
    dtype: DType,
    base: &[u8],
    out: &mut [u8],
) -> Result<(), CodecError> {
    let w = dtype.size();
    if base.len() != out.len() {
        return Err(CodecError::new(
            0,
            format!("base has {} bytes, tensor {}", base.len(), out.len()),
        ));
    }
    let n = out.len() / w;
    let codes = payload::decode_codes(payload, dtype, n, Family::Residual)?;
    let kind = match payload.get(1).copied() {
        Some(TRANSFORM_BASE_RATIO) => ResidualKind::Ratio,
        _ => ResidualKind::Delta,
    };
    let book: Vec<f64> = (0..codes.codebook.len() / w)
        .map(|i| value_at(dtype, &codes.codebook, i))
        .collect();
    let step = chunks::chunk_elems(w);
    out.par_chunks_mut(step * w)
        .zip(base.par_chunks(step * w))
        .enumerate()
        .for_each(|(c, (part, bs))| {
            with_values(dtype, bs, |bs| {
                for (j, (o, &b)) in part.chunks_exact_mut(w).zip(bs).enumerate() {
                    // `decode_codes` checked every code against the codebook.
                    let e = book.get(codes.code(c * step + j)).copied().unwrap_or(0.0);
                    write_value(dtype, kind.apply(b, e), o);
                }
            })
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Role;
    use crate::codec::{ClusterLayout, check, decode};
    use proptest::prelude::*;

    fn bytes(dtype: DType, v: &[f64]) -> Vec<u8> {
        let mut out = Vec::new();
        v.iter().for_each(|&x| push_value(dtype, x, &mut out));
        out
    }

    /// A base of second (or first) moments and a next save that moved by `spread`
    /// (relative), with exact zeros where `zeros`.
    fn pair(n: usize, second: bool, spread: f64, seed: u64) -> (Vec<f64>, Vec<f64>) {
        pair_at(1e-9, n, second, spread, seed)
    }

    /// [`pair`] with second moments around `scale` (f16 needs a larger one).
    fn pair_at(scale: f64, n: usize, second: bool, spread: f64, seed: u64) -> (Vec<f64>, Vec<f64>) {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::Xoshiro256PlusPlus::seed_from_u64(seed);
        let base: Vec<f64> = (0..n)
            .map(|_| {
                let g: f64 = rng.random::<f64>() * 8.0 - 4.0;
                if second {
                    scale * (2.0 * g).exp()
                } else {
                    1e-4 * g
                }
            })
            .collect();
        let next = base
            .iter()
            .map(|&b| b * (1.0 + spread * (rng.random::<f64>() * 2.0 - 1.0)))
            .collect();
        (base, next)
    }

    proptest! {
        #[test]
        fn decode_matches_encoder_at_every_width_and_dtype(
            dtype in prop::sample::select(vec![DType::F32, DType::BF16, DType::F16, DType::F64]),
            bits in prop::sample::select(QuantBits::ALL.to_vec()),
            kind in prop::sample::select(vec![ResidualKind::Delta, ResidualKind::Ratio]),
            n in 0usize..4000, second in any::<bool>(), seed in any::<u64>(),
            zeros in 0usize..4, cap in prop::option::of(2usize..70)) {
            let scale = if dtype == DType::F16 { 1e-3 } else { 1e-9 };
            let (mut base, mut next) = pair_at(scale, n, second, 0.1, seed);
            // Exact zeros: in the tensor, and in both (a zero base and a zero value).
            for z in 0..zeros.min(n) {
                next[(z * 977) % n] = 0.0;
                if z % 2 == 1 { base[(z * 977) % n] = 0.0; }
            }
            let (b, x) = (bytes(dtype, &base), bytes(dtype, &next));
            let role = Role::OptimizerMoment(if second { 2 } else { 1 });
            let input = EncodeInput { shape: &[], dtype, role, data: &x, base: Some(&b) };
            let q = ResidualQuantizer { entries: cap, ..ResidualQuantizer::new(bits, kind) };
            let Some(enc) = q.encode(&input).unwrap() else {
                // Only a ratio of a first moment (negative values) is refused here.
                prop_assert!(kind == ResidualKind::Ratio && !second && n > 0);
                return Ok(());
            };
            let (decoded, err) = enc.lossy.clone().unwrap();
            check(CodecId::ClusterResidual, &enc.payload, dtype, n).unwrap();
            // A capped codebook holds at most `cap` entries (and 2^bits whatever the cap).
            let entries = ClusterLayout::parse(&enc.payload, dtype).unwrap().entries as usize;
            prop_assert!(entries <= cap.unwrap_or(usize::MAX).max(2).min(1 << bits.bits()), "{entries}");
            let back = decode(CodecId::ClusterResidual, &enc.payload, dtype, n, Some(&b)).unwrap();
            prop_assert_eq!(&back, &decoded);
            prop_assert_eq!(err, super::super::distortion(dtype, &x, &back));
            // A zero stays a zero (as a ratio).
            for z in (0..zeros.min(n)).filter(|_| kind == ResidualKind::Ratio) {
                prop_assert_eq!(value_at(dtype, &back, (z * 977) % n), 0.0);
            }
            if n > 200 && cap.is_none() {
                // The moves are uniform within ±10%. Worst rel-L2 measured over 100 seeds
                // x 4 dtypes, n in 201..4000 (ratio / delta): 2 bits 0.0197 / 0.0418,
                // 3 bits 0.0111 / 0.0161, 4 bits 0.0055 / 0.0076, 6 bits 0.0028 / 0.0016
                // (wider codes: the dtype's rounding, bf16's 2^-9, dominates).
                let bound = match bits {
                    QuantBits::B2 => 0.08,
                    QuantBits::B3 => 0.03,
                    QuantBits::B4 => 0.015,
                    _ => 0.006,
                };
                prop_assert!(err.rel_l2 < bound, "{:?} {:?} {:?}", bits, kind, err);
            }
        }

        #[test]
        fn corrupt_payload_never_panics(pos in any::<usize>(), byte in any::<u8>(),
            kind in prop::sample::select(vec![ResidualKind::Delta, ResidualKind::Ratio])) {
            let (base, next) = pair(3000, true, 0.2, 9);
            let (b, x) = (bytes(DType::F32, &base), bytes(DType::F32, &next));
            let input = EncodeInput { shape: &[], dtype: DType::F32, role: Role::OptimizerMoment(2), data: &x, base: Some(&b) };
            let mut payload = ResidualQuantizer::new(QuantBits::B3, kind).encode(&input).unwrap().unwrap().payload;
            let p = pos % payload.len();
            payload[p] ^= byte | 1;
            let _ = decode(CodecId::ClusterResidual, &payload, DType::F32, 3000, Some(&b));
            let _ = decode(CodecId::ClusterResidual, &payload[..p], DType::F32, 3000, Some(&b));
        }
    }

    #[test]
    fn refuses_what_it_cannot_represent() {
        let q = |kind| ResidualQuantizer::new(QuantBits::B4, kind);
        let f = |v: &[f64]| bytes(DType::F32, v);
        let enc = |kind, x: &[f64], b: Option<&[f64]>| {
            let (x, b) = (f(x), b.map(f));
            let input = EncodeInput {
                shape: &[],
                dtype: DType::F32,
                role: Role::OptimizerMoment(2),
                data: &x,
                base: b.as_deref(),
            };
            q(kind).encode(&input).unwrap()
        };
        // No base, a non-finite value or base, a value where the base is 0 (ratio), a
        // negative value (ratio), integer tensors.
        assert!(enc(ResidualKind::Delta, &[1.0, 2.0], None).is_none());
        assert!(enc(ResidualKind::Delta, &[1.0, f64::NAN], Some(&[1.0, 1.0])).is_none());
        assert!(
            enc(
                ResidualKind::Delta,
                &[1.0, 1.0],
                Some(&[1.0, f64::INFINITY])
            )
            .is_none()
        );
        assert!(enc(ResidualKind::Ratio, &[1.0, 1.0], Some(&[1.0, 0.0])).is_none());
        assert!(enc(ResidualKind::Ratio, &[1.0, -1.0], Some(&[1.0, 1.0])).is_none());
        assert!(enc(ResidualKind::Delta, &[1.0, -1.0], Some(&[1.0, 1.0])).is_some());
        let ints = vec![0u8; 8];
        let input = EncodeInput {
            shape: &[],
            dtype: DType::I32,
            role: Role::OptimizerMoment(2),
            data: &ints,
            base: Some(&ints),
        };
        assert!(q(ResidualKind::Delta).encode(&input).unwrap().is_none());
    }

    #[test]
    fn hostile_payloads_are_refused() {
        let (base, next) = pair(1000, true, 0.1, 3);
        let (b, x) = (bytes(DType::F32, &base), bytes(DType::F32, &next));
        let input = EncodeInput {
            shape: &[],
            dtype: DType::F32,
            role: Role::OptimizerMoment(2),
            data: &x,
            base: Some(&b),
        };
        let enc = ResidualQuantizer::new(QuantBits::B2, ResidualKind::Ratio)
            .encode(&input)
            .unwrap()
            .unwrap();
        // Without a base, or with a base of the wrong length.
        let e = decode(
            CodecId::ClusterResidual,
            &enc.payload,
            DType::F32,
            1000,
            None,
        )
        .unwrap_err();
        assert!(e.reason.contains("without a base"), "{e}");
        assert!(
            decode(
                CodecId::ClusterResidual,
                &enc.payload,
                DType::F32,
                1000,
                Some(&b[4..])
            )
            .is_err()
        );
        // A residual payload under the cluster tag, and a cluster transform under the
        // residual tag: refused, never misread.
        let e = decode(CodecId::Cluster, &enc.payload, DType::F32, 1000, None).unwrap_err();
        assert!(
            e.reason.contains("transform 3 is not a cluster payload"),
            "{e}"
        );
        for t in [0u8, 1, 4, 255] {
            let mut p = enc.payload.clone();
            p[1] = t;
            let e = check(CodecId::ClusterResidual, &p, DType::F32, 1000).unwrap_err();
            assert!(e.reason.contains("not a residual payload"), "{t}: {e}");
        }
        // The device path has no form for it: the host decodes it.
        assert!(!CodecId::ClusterResidual.has_device_form());
        assert!(
            crate::codec::decode_for_device(
                CodecId::ClusterResidual,
                &enc.payload,
                DType::F32,
                1000
            )
            .is_err()
        );
    }
}
