//! Cluster (k-means) quantization, the BitSnap paper's method for optimizer state: a
//! per-tensor codebook of at most 2^bits values and one code per element. Lossy.
//!
//! 1-D k-means: k-means++ initialisation (quantiles for 16-bit codebooks, where
//! k-means++ would cost `O(n k)`), Lloyd iterations on a sorted sample (each iteration is
//! `O(k log n)` with prefix sums), then every element is assigned to its nearest codebook
//! entry on all cores. Second moments (non-negative, spanning decades) are clustered in
//! log space, which bounds the *relative* error of each element; exact zeros keep a code
//! of their own. Tensors holding NaN or infinity are not quantized.
//!
//! Payload:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | bits per code: 4, 8 or 16 |
//! | 1 | transform used to cluster: 0 linear, 1 log (informational) |
//! | 2 | reserved, 0 |
//! | 4 | `k`: codebook entries, u32 LE, 1 ≤ k ≤ 2^bits |
//! | k × dtype size | codebook: the decoded values, in the tensor's dtype |
//! | … | chunk stream of planes sections over the packed codes (element width 1 for 4 and 8 bits, 2 for 16) |
//!
//! Codes are packed little-endian: at 4 bits, element `2i` is the low nibble of byte `i`.
//! Decoding is a pure table lookup, so the GPU loader and the CPU decoder agree bit for bit.

use rayon::prelude::*;

use super::{Codec, CodecError, CodecId, Cursor, EncodeInput, Encoded, chunks, planes};
use crate::{DType, Role};

/// Transform tag: values clustered as they are.
pub const TRANSFORM_LINEAR: u8 = 0;
/// Transform tag: values clustered by their logarithm.
pub const TRANSFORM_LOG: u8 = 1;

/// Bits per code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum QuantBits {
    /// 16 codebook entries.
    B4,
    /// 256 codebook entries.
    #[default]
    B8,
    /// 65 536 codebook entries.
    B16,
}

impl QuantBits {
    /// Bits per code.
    pub const fn bits(self) -> u32 {
        match self {
            QuantBits::B4 => 4,
            QuantBits::B8 => 8,
            QuantBits::B16 => 16,
        }
    }

    /// From a bit count (4, 8 or 16).
    pub fn from_bits(bits: u32) -> Option<QuantBits> {
        match bits {
            4 => Some(QuantBits::B4),
            8 => Some(QuantBits::B8),
            16 => Some(QuantBits::B16),
            _ => None,
        }
    }
}

/// Quantization error of one tensor, against the values it was given.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct QuantError {
    /// `‖x − x̂‖₂ / ‖x‖₂` (0 when `x` is all zeros).
    pub rel_l2: f64,
    /// `max |x − x̂|`.
    pub max_abs: f64,
}

/// The cluster quantizer.
///
/// ```
/// use bitsnap_core::codec::{self, ClusterQuantizer, Codec, CodecId, EncodeInput, QuantBits};
/// use bitsnap_core::{DType, Role};
/// let v: Vec<f32> = (0..10_000).map(|i| 1e-8 * (1.0 + (i % 977) as f32).powi(2)).collect();
/// let data: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
/// let input = EncodeInput { dtype: DType::F32, role: Role::OptimizerMoment(2), data: &data, base: None };
/// let enc = ClusterQuantizer::new(QuantBits::B8).encode(&input).unwrap().unwrap();
/// let (decoded, err) = enc.lossy.unwrap();
/// assert!(err.rel_l2 < 0.05, "{err:?}");
/// assert!(enc.payload.len() * 3 < data.len());
/// assert_eq!(codec::decode(CodecId::Cluster, &enc.payload, DType::F32, 10_000, None).unwrap(), decoded);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ClusterQuantizer {
    /// Bits per code; default 8.
    pub bits: QuantBits,
    /// zstd level for the codes; default [`super::DEFAULT_ZSTD_LEVEL`].
    pub level: i32,
    /// Lloyd iterations at most; default 12.
    pub iterations: usize,
}

impl ClusterQuantizer {
    /// A quantizer with `bits` per code and default settings.
    pub fn new(bits: QuantBits) -> ClusterQuantizer {
        ClusterQuantizer {
            bits,
            level: super::DEFAULT_ZSTD_LEVEL,
            iterations: 12,
        }
    }
}

impl Default for ClusterQuantizer {
    fn default() -> Self {
        ClusterQuantizer::new(QuantBits::default())
    }
}

/// Reads element `i` of float `bytes` as f64.
fn value_at(dtype: DType, bytes: &[u8], i: usize) -> f64 {
    let w = dtype.size();
    let b = &bytes[i * w..(i + 1) * w];
    match dtype {
        DType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
        DType::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f64(),
        DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
        DType::F64 => f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        _ => f64::NAN,
    }
}

/// Converts `v` to `dtype` (round to nearest), as little-endian bytes appended to `out`.
fn push_value(dtype: DType, v: f64, out: &mut Vec<u8>) {
    match dtype {
        DType::F16 => out.extend_from_slice(&half::f16::from_f64(v).to_le_bytes()),
        DType::BF16 => out.extend_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
        DType::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
        _ => out.extend_from_slice(&v.to_le_bytes()),
    }
}

/// `v` rounded to `dtype` and back.
fn round_to(dtype: DType, v: f64) -> f64 {
    let mut b = Vec::with_capacity(8);
    push_value(dtype, v, &mut b);
    value_at(dtype, &b, 0)
}

thread_local! {
    static VALUES: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on the values of a chunk of float bytes, converted to f64 in a reused buffer.
fn with_values<R>(dtype: DType, bytes: &[u8], f: impl FnOnce(&[f64]) -> R) -> R {
    VALUES.with(|cell| {
        let mut vals = cell.borrow_mut();
        vals.clear();
        match dtype {
            DType::F16 => vals.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f64()),
            ),
            DType::BF16 => vals.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64()),
            ),
            DType::F32 => vals.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64),
            ),
            DType::F64 => vals.extend(
                bytes
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])),
            ),
            _ => vals.extend(std::iter::repeat_n(
                f64::NAN,
                bytes.len() / dtype.size().max(1),
            )),
        }
        f(&vals)
    })
}

/// All values of a float tensor as f64, or `None` for non-float dtypes.
pub(crate) fn floats_to_f64(dtype: DType, bytes: &[u8]) -> Option<Vec<f64>> {
    if !dtype.is_quantizable_float() {
        return None;
    }
    Some(
        (0..bytes.len() / dtype.size())
            .map(|i| value_at(dtype, bytes, i))
            .collect(),
    )
}

impl Codec for ClusterQuantizer {
    fn id(&self) -> CodecId {
        CodecId::Cluster
    }

    fn encode(&self, input: &EncodeInput<'_>) -> Result<Option<Encoded>, CodecError> {
        let dtype = input.dtype;
        if !dtype.is_quantizable_float() {
            return Ok(None);
        }
        let data = input.data;
        let n = data.len() / dtype.size();
        let step = chunks::chunk_elems(dtype.size());
        // One parallel scan: finite?, minimum.
        let (finite, min) = data
            .par_chunks(step * dtype.size())
            .map(|chunk| {
                with_values(dtype, chunk, |vals| {
                    vals.iter().fold((true, f64::INFINITY), |(f, m), &v| {
                        (f && v.is_finite(), m.min(v))
                    })
                })
            })
            .reduce(|| (true, f64::INFINITY), |a, b| (a.0 && b.0, a.1.min(b.1)));
        if !finite {
            return Ok(None);
        }
        let log = input.role == Role::OptimizerMoment(2) && min >= 0.0;

        let k_max = 1usize << self.bits.bits();
        let sample = sample_sorted(n, k_max, |i| {
            let v = value_at(dtype, data, i);
            match log {
                false => Some(v),
                true if v > 0.0 => Some(v.ln()),
                true => None,
            }
        });
        let centroids = kmeans_1d(&sample, k_max - usize::from(log), self.iterations);

        // Codebook in the tensor's dtype: centroids back to values, rounded, deduplicated;
        // in log space exact zeros keep an entry of their own.
        let mut book: Vec<f64> = centroids
            .iter()
            .map(|&c| if log { c.exp() } else { c })
            .map(|v| round_to(dtype, v))
            .filter(|v| v.is_finite() && (!log || *v > 0.0))
            .collect();
        if log || book.is_empty() {
            book.push(0.0);
        }
        book.sort_by(f64::total_cmp);
        book.dedup();
        let k = book.len();
        // Decision boundaries in value space: the midpoint between neighbours, in log
        // space their geometric mean (so no logarithm per element). A value goes to the
        // first entry whose boundary it does not exceed.
        let mids: Vec<f64> = book
            .windows(2)
            .map(|p| {
                if log {
                    (p[0] * p[1]).sqrt()
                } else {
                    0.5 * (p[0] + p[1])
                }
            })
            .collect();
        let book_bytes: Vec<Vec<u8>> = book
            .iter()
            .map(|&v| {
                let mut b = Vec::with_capacity(8);
                push_value(dtype, v, &mut b);
                b
            })
            .collect();
        let w = dtype.size();
        let mut decoded = vec![0u8; data.len()];
        let mut codes = vec![0u16; n];
        let (sq_err, sq_norm, max_abs) = decoded
            .par_chunks_mut(step * w)
            .zip(codes.par_chunks_mut(step))
            .zip(data.par_chunks(step * w))
            .map(|((dec, codes), src)| {
                with_values(dtype, src, |vals| {
                    let mut acc = (0.0f64, 0.0f64, 0.0f64);
                    for ((code, out), &v) in codes.iter_mut().zip(dec.chunks_exact_mut(w)).zip(vals)
                    {
                        let q = mids.partition_point(|&m| m < v);
                        *code = q as u16;
                        out.copy_from_slice(&book_bytes[q]);
                        let e = v - book[q];
                        acc = (acc.0 + e * e, acc.1 + v * v, acc.2.max(e.abs()));
                    }
                    acc
                })
            })
            .reduce(
                || (0.0, 0.0, 0.0),
                |a, b| (a.0 + b.0, a.1 + b.1, a.2.max(b.2)),
            );
        let error = QuantError {
            rel_l2: if sq_norm > 0.0 {
                (sq_err / sq_norm).sqrt()
            } else {
                sq_err.sqrt()
            },
            max_abs,
        };

        let packed = pack_codes(&codes, self.bits);
        let mut payload = Vec::with_capacity(8 + k * w + packed.len() / 2);
        payload.push(self.bits.bits() as u8);
        payload.push(if log { TRANSFORM_LOG } else { TRANSFORM_LINEAR });
        payload.extend_from_slice(&0u16.to_le_bytes());
        payload.extend_from_slice(&(k as u32).to_le_bytes());
        book_bytes.iter().for_each(|b| payload.extend_from_slice(b));
        let cw = code_width(self.bits);
        planes::encode_chunked(&packed, None, cw, self.level, &mut payload)?;
        Ok(Some(Encoded {
            codec: CodecId::Cluster,
            payload,
            lossy: Some((decoded, error)),
        }))
    }
}

fn code_width(bits: QuantBits) -> usize {
    if bits == QuantBits::B16 { 2 } else { 1 }
}

fn packed_len(n: usize, bits: QuantBits) -> usize {
    match bits {
        QuantBits::B4 => n.div_ceil(2),
        QuantBits::B8 => n,
        QuantBits::B16 => n * 2,
    }
}

fn pack_codes(codes: &[u16], bits: QuantBits) -> Vec<u8> {
    match bits {
        QuantBits::B4 => codes
            .chunks(2)
            .map(|p| (p[0] as u8 & 0x0f) | ((p.get(1).copied().unwrap_or(0) as u8 & 0x0f) << 4))
            .collect(),
        QuantBits::B8 => codes.iter().map(|&c| c as u8).collect(),
        QuantBits::B16 => codes.iter().flat_map(|c| c.to_le_bytes()).collect(),
    }
}

/// A sorted, evenly strided sample of the values `f(i)` that are `Some`, large enough for
/// `k` clusters (64 values per cluster, at least 2^16, at most 2^21 values).
fn sample_sorted(n: usize, k: usize, f: impl Fn(usize) -> Option<f64> + Sync) -> Vec<f64> {
    let target = (k * 64).clamp(1 << 16, 1 << 21);
    let stride = (n / target).max(1);
    let mut s: Vec<f64> = (0..n.div_ceil(stride))
        .into_par_iter()
        .filter_map(|j| f(j * stride))
        .collect();
    s.par_sort_unstable_by(f64::total_cmp);
    s
}

/// 1-D k-means on a sorted sample: at most `k` sorted centroids.
fn kmeans_1d(sorted: &[f64], k: usize, iterations: usize) -> Vec<f64> {
    if sorted.is_empty() || k == 0 {
        return Vec::new();
    }
    let mut distinct = sorted.to_vec();
    distinct.dedup();
    if distinct.len() <= k {
        return distinct;
    }
    let mut c = if k <= 256 {
        kmeans_pp(sorted, k)
    } else {
        (0..k)
            .map(|j| sorted[(j * (sorted.len() - 1)) / (k - 1).max(1)])
            .collect()
    };
    c.sort_by(f64::total_cmp);
    c.dedup();
    let mut prefix = Vec::with_capacity(sorted.len() + 1);
    prefix.push(0.0f64);
    let mut acc = 0.0;
    for &v in sorted {
        acc += v;
        prefix.push(acc);
    }
    for _ in 0..iterations {
        let mut next = Vec::with_capacity(c.len());
        let mut lo = 0usize;
        for j in 0..c.len() {
            let hi = if j + 1 < c.len() {
                let mid = 0.5 * (c[j] + c[j + 1]);
                sorted.partition_point(|&v| v <= mid)
            } else {
                sorted.len()
            };
            if hi > lo {
                next.push((prefix[hi] - prefix[lo]) / (hi - lo) as f64);
            } else {
                next.push(c[j]);
            }
            lo = hi.max(lo);
        }
        next.sort_by(f64::total_cmp);
        next.dedup();
        if next == c {
            break;
        }
        c = next;
    }
    c
}

/// k-means++ seeding (D² sampling) with a fixed seed, so snapshots are reproducible.
fn kmeans_pp(sorted: &[f64], k: usize) -> Vec<f64> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ sorted.len() as u64;
    let mut uniform = move || {
        // SplitMix64: deterministic and enough for seeding.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut centers = vec![sorted[sorted.len() / 2]];
    let mut d2: Vec<f64> = sorted.iter().map(|&v| (v - centers[0]).powi(2)).collect();
    while centers.len() < k {
        let total: f64 = d2.iter().sum();
        if total <= 0.0 {
            break;
        }
        let mut target = uniform() * total;
        let mut pick = sorted.len() - 1;
        for (i, &d) in d2.iter().enumerate() {
            target -= d;
            if target <= 0.0 {
                pick = i;
                break;
            }
        }
        let c = sorted[pick];
        centers.push(c);
        d2.iter_mut()
            .zip(sorted)
            .for_each(|(d, &v)| *d = d.min((v - c).powi(2)));
    }
    centers
}

/// Checks a cluster payload for `n` elements before anything is allocated for them: the
/// codebook, and a chunk table of codes that can fill `n` elements (every chunk body
/// holding at least a plane record per code byte).
pub(crate) fn precheck(payload: &[u8], dtype: DType, n: usize) -> Result<(), CodecError> {
    let mut cur = Cursor::new(payload);
    let bits = parse_codebook(&mut cur, dtype)?.bits;
    let width = code_width(bits);
    let chunks = chunks::parse(&mut cur, packed_len(n, bits) / width)?;
    match chunks
        .iter()
        .find(|c| c.body.len() < planes::PLANE_OVERHEAD * width)
    {
        Some(c) => Err(CodecError::new(
            c.offset,
            format!("code chunk body of {} bytes is too short", c.body.len()),
        )),
        None => Ok(()),
    }
}

/// A cluster payload entropy-decoded but not looked up: what a device needs to
/// dequantize. Every code is checked to index the codebook.
pub(crate) struct Codes {
    pub bits: QuantBits,
    /// `k` entries of the tensor's dtype, back to back.
    pub codebook: Vec<u8>,
    /// The codes, packed little-endian (4-bit: element `2i` in the low nibble of byte `i`;
    /// 16-bit: two bytes per code).
    pub packed: Vec<u8>,
}

impl Codes {
    fn code(&self, i: usize) -> usize {
        match self.bits {
            QuantBits::B4 => ((self.packed[i / 2] >> ((i % 2) * 4)) & 0x0f) as usize,
            QuantBits::B8 => self.packed[i] as usize,
            QuantBits::B16 => {
                u16::from_le_bytes([self.packed[2 * i], self.packed[2 * i + 1]]) as usize
            }
        }
    }
}

/// Decodes the codebook and the codes of a [`ClusterQuantizer`] payload for `n` elements.
pub(crate) fn decode_codes(payload: &[u8], dtype: DType, n: usize) -> Result<Codes, CodecError> {
    let w = dtype.size();
    let mut cur = Cursor::new(payload);
    let book = parse_codebook(&mut cur, dtype)?;
    let bits = book.bits;
    let plen = packed_len(n, bits);
    let mut packed = Vec::new();
    packed
        .try_reserve_exact(plen)
        .map_err(|_| CodecError::new(cur.offset(), "cannot allocate the codes"))?;
    packed.resize(plen, 0);
    let codes_at = cur.offset();
    let rest = cur.bytes(cur.remaining(), "codes")?;
    planes::decode_into(rest, code_width(bits), &mut packed).map_err(|e| e.shifted(codes_at))?;
    if bits == QuantBits::B4 && n % 2 == 1 && packed.last().is_some_and(|b| b >> 4 != 0) {
        return Err(CodecError::new(
            codes_at,
            "unused high nibble of the last 4-bit code is not 0",
        ));
    }
    let codes = Codes {
        bits,
        codebook: book.entries.to_vec(),
        packed,
    };
    let k = codes.codebook.len() / w;
    if k < 1 << bits.bits() {
        let step = chunks::chunk_elems(w);
        let bad = (0..n.div_ceil(step))
            .into_par_iter()
            .find_map_any(|c| (c * step..((c + 1) * step).min(n)).find(|&i| codes.code(i) >= k));
        if let Some(i) = bad {
            return Err(CodecError::new(
                codes_at,
                format!(
                    "code {} at element {i} is past the codebook of {k}",
                    codes.code(i)
                ),
            ));
        }
    }
    Ok(codes)
}

/// Decodes a [`ClusterQuantizer`] payload into `out`.
pub(crate) fn decode_into(payload: &[u8], dtype: DType, out: &mut [u8]) -> Result<(), CodecError> {
    let w = dtype.size();
    let n = out.len() / w;
    let codes = decode_codes(payload, dtype, n)?;
    let step = chunks::chunk_elems(w);
    out.par_chunks_mut(step * w)
        .enumerate()
        .for_each(|(c, part)| {
            for (j, o) in part.chunks_exact_mut(w).enumerate() {
                let code = codes.code(c * step + j);
                o.copy_from_slice(&codes.codebook[code * w..(code + 1) * w]);
            }
        });
    Ok(())
}

/// The parsed head of a cluster payload.
#[allow(dead_code)] // `transform` is read by inspection tools.
pub(crate) struct Codebook<'a> {
    pub bits: QuantBits,
    /// [`TRANSFORM_LINEAR`] or [`TRANSFORM_LOG`].
    pub transform: u8,
    /// `k` entries of the tensor's dtype, back to back.
    pub entries: &'a [u8],
}

/// Parses the bits, transform and codebook of a cluster payload.
pub(crate) fn parse_codebook<'a>(
    cur: &mut Cursor<'a>,
    dtype: DType,
) -> Result<Codebook<'a>, CodecError> {
    if !dtype.is_quantizable_float() {
        return Err(CodecError::new(
            0,
            format!("cluster payload for non-float dtype {dtype}"),
        ));
    }
    let bits = cur.u8("bits")?;
    let bits = QuantBits::from_bits(bits as u32)
        .ok_or_else(|| CodecError::new(0, format!("{bits} bits per code (4, 8 or 16)")))?;
    let transform = cur.u8("transform")?;
    if transform > TRANSFORM_LOG {
        return Err(CodecError::new(1, format!("unknown transform {transform}")));
    }
    let reserved = cur.u16("reserved")?;
    if reserved != 0 {
        return Err(CodecError::new(2, "reserved bytes are not zero"));
    }
    let k = cur.u32("codebook size")? as usize;
    if k == 0 || k > 1 << bits.bits() {
        return Err(CodecError::new(
            4,
            format!("codebook of {k} entries for {} bits", bits.bits()),
        ));
    }
    let entries = cur.bytes(k * dtype.size(), "codebook")?;
    Ok(Codebook {
        bits,
        transform,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::decode;
    use proptest::prelude::*;

    fn moments(n: usize, second: bool, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 11) as f64 / (1u64 << 53) as f64;
                let g = (u - 0.5) * 6.0;
                if second {
                    (1e-10 * (g * 2.0).exp()) as f32
                } else {
                    (1e-4 * g * g * g) as f32
                }
            })
            .collect()
    }

    fn bytes(dtype: DType, v: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        v.iter()
            .for_each(|&x| push_value(dtype, x as f64, &mut out));
        out
    }

    proptest! {
        #[test]
        fn decode_matches_encoder_and_error_is_bounded(
            dtype in prop::sample::select(vec![DType::F32, DType::BF16, DType::F16, DType::F64]),
            bits in prop::sample::select(vec![QuantBits::B4, QuantBits::B8, QuantBits::B16]),
            n in 0usize..5000, second in any::<bool>(), seed in any::<u64>()) {
            let data = bytes(dtype, &moments(n, second, seed));
            let role = if second { Role::OptimizerMoment(2) } else { Role::OptimizerMoment(1) };
            let input = EncodeInput { dtype, role, data: &data, base: None };
            let enc = ClusterQuantizer::new(bits).encode(&input).unwrap().unwrap();
            let (decoded, err) = enc.lossy.clone().unwrap();
            let back = decode(CodecId::Cluster, &enc.payload, dtype, n, None).unwrap();
            prop_assert_eq!(&back, &decoded);
            // Recompute the reported error from the decoded values.
            let (mut se, mut sn, mut mx) = (0.0f64, 0.0f64, 0.0f64);
            for i in 0..n {
                let (x, y) = (value_at(dtype, &data, i), value_at(dtype, &back, i));
                se += (x - y).powi(2); sn += x * x; mx = mx.max((x - y).abs());
            }
            let rel = if sn > 0.0 { (se / sn).sqrt() } else { se.sqrt() };
            prop_assert!((rel - err.rel_l2).abs() <= 1e-9 + 1e-6 * rel);
            prop_assert_eq!(mx, err.max_abs);
            if n > 100 {
                let bound = match (bits, second) { (QuantBits::B4, true) => 0.5, (QuantBits::B4, false) => 0.3, (QuantBits::B8, _) => 0.1, (QuantBits::B16, _) => 0.02 };
                prop_assert!(err.rel_l2 < bound, "{:?}", err);
            }
        }

        #[test]
        fn corrupt_payload_never_panics(pos in any::<usize>(), byte in any::<u8>()) {
            let data = bytes(DType::F32, &moments(3000, true, 5));
            let input = EncodeInput { dtype: DType::F32, role: Role::OptimizerMoment(2), data: &data, base: None };
            let mut payload = ClusterQuantizer::new(QuantBits::B4).encode(&input).unwrap().unwrap().payload;
            let p = pos % payload.len();
            payload[p] ^= byte | 1;
            let _ = decode(CodecId::Cluster, &payload, DType::F32, 3000, None);
            let _ = decode(CodecId::Cluster, &payload[..p], DType::F32, 3000, None);
        }
    }

    #[test]
    fn few_distinct_values_are_exact() {
        let v: Vec<f32> = (0..1000).map(|i| (i % 5) as f32 * 0.25).collect();
        let data = bytes(DType::F32, &v);
        let input = EncodeInput {
            dtype: DType::F32,
            role: Role::OptimizerMoment(1),
            data: &data,
            base: None,
        };
        let enc = ClusterQuantizer::new(QuantBits::B4)
            .encode(&input)
            .unwrap()
            .unwrap();
        let (decoded, err) = enc.lossy.unwrap();
        assert_eq!(decoded, data);
        assert_eq!(err.rel_l2, 0.0);
    }

    #[test]
    fn skips_non_finite_and_integer_tensors() {
        let data = bytes(DType::F32, &[1.0, f32::NAN, 2.0]);
        let input = EncodeInput {
            dtype: DType::F32,
            role: Role::OptimizerMoment(1),
            data: &data,
            base: None,
        };
        assert!(
            ClusterQuantizer::default()
                .encode(&input)
                .unwrap()
                .is_none()
        );
        let ints = vec![0u8; 12];
        let input = EncodeInput {
            dtype: DType::I32,
            role: Role::OptimizerMoment(1),
            data: &ints,
            base: None,
        };
        assert!(
            ClusterQuantizer::default()
                .encode(&input)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn second_moment_zeros_stay_zero() {
        let mut v = moments(4000, true, 3);
        v[17] = 0.0;
        let data = bytes(DType::F32, &v);
        let input = EncodeInput {
            dtype: DType::F32,
            role: Role::OptimizerMoment(2),
            data: &data,
            base: None,
        };
        let (decoded, _) = ClusterQuantizer::new(QuantBits::B8)
            .encode(&input)
            .unwrap()
            .unwrap()
            .lossy
            .unwrap();
        assert_eq!(value_at(DType::F32, &decoded, 17), 0.0);
        assert!(value_at(DType::F32, &decoded, 18) > 0.0);
    }
}
