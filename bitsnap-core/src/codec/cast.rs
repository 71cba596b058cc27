//! Reference codecs: a tensor stored as a function of another tensor (issue #12, finding 1).
//!
//! * [`CastOf`] (`cast`): a bf16/f16 tensor that equals round-to-nearest-even of an f32
//!   tensor of the same shape, element for element (mixed-precision trainers keep such a
//!   half copy of their fp32 master weights): the payload holds only the elements where
//!   it does not (the exceptions: positions and values), so an exact copy costs a few
//!   bytes.
//! * `Identical` (`identical`): bit-identical to another tensor of the same dtype and
//!   shape; no payload.
//!
//! The referenced tensor is named by the entry's reference (FORMAT.md 2.7); decoders get
//! its decoded bytes through [`decode_with_reference`](super::decode_with_reference).
//!
//! A cast payload:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | rounding rule: 0 = IEEE round-to-nearest-even (NaNs keep sign and high payload bits, quiet bit set) |
//! | 8 | `count`: exceptions, u64 LE, ≤ the element count |
//! | 4 | `gaps_len`, u32 LE; 0 when `count` is 0 |
//! | gaps_len | one zstd frame: `count` LEB128 gaps (position − previous position − 1; the first is the position) |
//! | 4 | `values_len`, u32 LE; 0 when `count` is 0 |
//! | values_len | one zstd frame: the `count` exception values, element bytes back to back |

use rayon::prelude::*;

use super::{CodecError, CodecId, Cursor, Encoded, alloc};
use crate::DType;

/// Rounding rule 0: IEEE round-to-nearest-even (the `half` crate's `from_f32`).
pub const CAST_RULE_RNE: u8 = 0;
/// Most bytes one LEB128 gap takes (a u64).
const MAX_GAP_BYTES: usize = 10;
/// Elements per parallel work item when casting.
const CAST_BLOCK: usize = 1 << 16;

/// Encoder of "cast of tensor X": a half-precision tensor against the f32 tensor it was
/// (mostly) rounded from.
///
/// ```
/// use bitsnap_core::codec::{self, CastOf, CodecId};
/// use bitsnap_core::DType;
/// let master: Vec<f32> = (0..1000).map(|i| i as f32 * 1.37e-3).collect();
/// let src: Vec<u8> = master.iter().flat_map(|v| v.to_le_bytes()).collect();
/// let mut half: Vec<u8> = master.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
/// half[10] ^= 1; // one element that is not the cast
/// let enc = CastOf::default().encode(DType::BF16, &half, DType::F32, &src).unwrap().unwrap();
/// assert!(enc.payload.len() < 40, "{}", enc.payload.len());
/// let back = codec::decode_with_reference(CodecId::Cast, &enc.payload, DType::BF16, 1000, DType::F32, &src).unwrap();
/// assert_eq!(back, half);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct CastOf {
    /// zstd level for the exception lists; default [`super::DEFAULT_ZSTD_LEVEL`].
    pub level: i32,
}

impl Default for CastOf {
    fn default() -> Self {
        CastOf {
            level: super::DEFAULT_ZSTD_LEVEL,
        }
    }
}

impl CastOf {
    /// Encodes `data` (`dtype`: bf16 or f16) as the cast of `source` (`source_dtype`: f32,
    /// same element count) plus exceptions. `Ok(None)` when the pair does not apply
    /// (other dtypes, element counts that differ).
    pub fn encode(
        &self,
        dtype: DType,
        data: &[u8],
        source_dtype: DType,
        source: &[u8],
    ) -> Result<Option<Encoded>, CodecError> {
        if !applies(dtype, source_dtype) || source.len() != data.len() * 2 {
            return Ok(None);
        }
        let numel = data.len() / 2;
        // Exceptions per block, in parallel, then joined in order.
        let blocks: Vec<Vec<(u64, u16)>> = (0..numel.div_ceil(CAST_BLOCK))
            .into_par_iter()
            .map(|b| {
                let range = b * CAST_BLOCK..((b + 1) * CAST_BLOCK).min(numel);
                range
                    .filter_map(|i| {
                        let s = f32_at(source, i);
                        let want = cast(dtype, s);
                        let have = u16::from_le_bytes([data[2 * i], data[2 * i + 1]]);
                        (have != want).then_some((i as u64, have))
                    })
                    .collect()
            })
            .collect();
        let count: usize = blocks.iter().map(Vec::len).sum();
        let mut payload = vec![CAST_RULE_RNE];
        payload.extend_from_slice(&(count as u64).to_le_bytes());
        if count == 0 {
            payload.extend_from_slice(&0u32.to_le_bytes());
            payload.extend_from_slice(&0u32.to_le_bytes());
        } else {
            let mut gaps = Vec::with_capacity(count * 2);
            let mut values = Vec::with_capacity(count * 2);
            let mut next = 0u64;
            for &(pos, v) in blocks.iter().flatten() {
                leb128(pos - next, &mut gaps);
                next = pos + 1;
                values.extend_from_slice(&v.to_le_bytes());
            }
            for part in [gaps, values] {
                let frame = super::with_compressor(self.level, |c| c.compress(&part))?
                    .map_err(|e| CodecError::new(0, format!("zstd: {e}")))?;
                let len = u32::try_from(frame.len())
                    .map_err(|_| CodecError::new(0, "exception list above 4 GiB"))?;
                payload.extend_from_slice(&len.to_le_bytes());
                payload.extend_from_slice(&frame);
            }
        }
        Ok(Some(Encoded {
            codec: CodecId::Cast,
            payload,
            lossy: None,
        }))
    }
}

/// Whether a `dtype` tensor can be stored as a cast of a `source_dtype` tensor.
pub fn applies(dtype: DType, source_dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && source_dtype == DType::F32
}

fn f32_at(source: &[u8], i: usize) -> f32 {
    let b = &source[4 * i..4 * i + 4];
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Round-to-nearest-even of `v` in `dtype` (bf16 or f16), as bits.
pub(crate) fn cast(dtype: DType, v: f32) -> u16 {
    match dtype {
        DType::F16 => half::f16::from_f32(v).to_bits(),
        _ => half::bf16::from_f32(v).to_bits(),
    }
}

fn leb128(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The parsed structure of a cast payload.
struct Parsed<'a> {
    count: usize,
    gaps: &'a [u8],
    gaps_at: usize,
    values: &'a [u8],
    values_at: usize,
}

fn parse(payload: &[u8], numel: usize) -> Result<Parsed<'_>, CodecError> {
    let mut cur = Cursor::new(payload);
    let rule = cur.u8("rounding rule")?;
    if rule != CAST_RULE_RNE {
        return Err(CodecError::new(0, format!("unknown rounding rule {rule}")));
    }
    let count = cur.u64("exception count")?;
    if count > numel as u64 {
        return Err(CodecError::new(
            1,
            format!("{count} exceptions for {numel} elements"),
        ));
    }
    let count = count as usize;
    let mut frame = |what: &'static str| -> Result<(&[u8], usize), CodecError> {
        let len = cur.u32(what)? as usize;
        let at = cur.offset();
        Ok((cur.bytes(len, what)?, at))
    };
    let (gaps, gaps_at) = frame("exception positions")?;
    let (values, values_at) = frame("exception values")?;
    cur.finish("cast payload")?;
    if count == 0 && !(gaps.is_empty() && values.is_empty()) {
        return Err(CodecError::new(9, "exception lists without exceptions"));
    }
    // Declared frame sizes, before anything is allocated.
    if count > 0 {
        for (frame, at, most, exact) in [
            (gaps, gaps_at, count * MAX_GAP_BYTES, false),
            (values, values_at, count * 2, true),
        ] {
            let size = zstd::zstd_safe::get_frame_content_size(frame)
                .ok()
                .flatten()
                .ok_or_else(|| CodecError::new(at, "zstd frame without a content size"))?;
            if (exact && size != most as u64) || size > most as u64 || size < count as u64 {
                return Err(CodecError::new(
                    at,
                    format!("zstd frame of {size} bytes for {count} exceptions"),
                ));
            }
        }
    }
    Ok(Parsed {
        count,
        gaps,
        gaps_at,
        values,
        values_at,
    })
}

/// Checks a cast payload's structure for `numel` elements without allocating.
pub(crate) fn check(payload: &[u8], numel: usize) -> Result<(), CodecError> {
    parse(payload, numel).map(|_| ())
}

/// Decodes a cast payload into `out` (`dtype` elements) from `source` (f32, same count).
pub(crate) fn decode_into(
    payload: &[u8],
    dtype: DType,
    source_dtype: DType,
    source: &[u8],
    out: &mut [u8],
) -> Result<(), CodecError> {
    if !applies(dtype, source_dtype) {
        return Err(CodecError::new(
            0,
            format!("a {dtype} tensor cannot be a cast of a {source_dtype} tensor"),
        ));
    }
    let numel = out.len() / 2;
    if source.len() != numel * 4 {
        return Err(CodecError::new(
            0,
            format!(
                "referenced tensor has {} bytes, {} expected",
                source.len(),
                numel * 4
            ),
        ));
    }
    parse(payload, numel)?;
    out.par_chunks_mut(2 * CAST_BLOCK)
        .zip(source.par_chunks(4 * CAST_BLOCK))
        .for_each(|(o, s)| {
            for (o, s) in o.chunks_exact_mut(2).zip(s.chunks_exact(4)) {
                let v = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                o.copy_from_slice(&cast(dtype, v).to_le_bytes());
            }
        });
    for_each_exception(payload, numel, |pos, v| {
        out[2 * pos..2 * pos + 2].copy_from_slice(&v);
    })
}

/// Calls `f` with the position (below `numel`, ascending) and value of each exception of
/// a cast payload for `numel` elements: what a decoder writes over the cast. A device
/// ([`super::device`]) casts on its side and patches these in.
pub(crate) fn for_each_exception(
    payload: &[u8],
    numel: usize,
    mut f: impl FnMut(usize, [u8; 2]),
) -> Result<(), CodecError> {
    let p = parse(payload, numel)?;
    if p.count == 0 {
        return Ok(());
    }
    let frame = |f: &[u8], at: usize, cap: usize, what: &str| -> Result<Vec<u8>, CodecError> {
        let mut buf: Vec<u8> = alloc::with_capacity(cap, what)?;
        super::with_decompressor(|d| {
            d.decompress_to_buffer(f, &mut buf)
                .map_err(|e| CodecError::new(at, format!("{what}: zstd: {e}")))
        })?;
        Ok(buf)
    };
    let gaps = frame(
        p.gaps,
        p.gaps_at,
        p.count * MAX_GAP_BYTES,
        "exception positions",
    )?;
    let values = frame(p.values, p.values_at, p.count * 2, "exception values")?;
    if values.len() != p.count * 2 {
        return Err(CodecError::new(
            p.values_at,
            format!("{} value bytes for {} exceptions", values.len(), p.count),
        ));
    }
    let mut g = gaps.iter();
    let mut next = 0u64;
    for v in values.chunks_exact(2) {
        let mut gap = 0u64;
        let mut shift = 0u32;
        loop {
            let &b = g
                .next()
                .ok_or_else(|| CodecError::new(p.gaps_at, "exception positions end early"))?;
            if shift >= 64 || (shift == 63 && b > 1) {
                return Err(CodecError::new(p.gaps_at, "exception gap overflows"));
            }
            gap |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b < 0x80 {
                break;
            }
        }
        let pos = next
            .checked_add(gap)
            .filter(|&pos| pos < numel as u64)
            .ok_or_else(|| {
                CodecError::new(
                    p.gaps_at,
                    format!("exception position past {numel} elements"),
                )
            })? as usize;
        f(pos, [v[0], v[1]]);
        next = pos as u64 + 1;
    }
    if g.next().is_some() {
        return Err(CodecError::new(
            p.gaps_at,
            "exception positions run past the values",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_with_reference, testing::*};
    use proptest::prelude::*;

    fn source(n: usize, seed: u64) -> Vec<u8> {
        tensor_bytes(DType::F32, n, seed)
    }

    fn cast_all(dtype: DType, src: &[u8]) -> Vec<u8> {
        src.chunks_exact(4)
            .flat_map(|s| cast(dtype, f32::from_le_bytes(s.try_into().unwrap())).to_le_bytes())
            .collect()
    }

    fn half_dtype() -> impl Strategy<Value = DType> {
        prop::sample::select(vec![DType::BF16, DType::F16])
    }

    proptest! {
        // Sources hold every f32 special (NaNs, ±0, ±Inf, subnormals); halves are the
        // exact cast with 0% to 100% of the elements changed.
        #[test]
        fn round_trip(dtype in half_dtype(), n in 0usize..3000, permille in any_permille(), seed in any::<u64>()) {
            let src = source(n, seed);
            let exact = cast_all(dtype, &src);
            let data = mutate(&exact, 2, permille, seed ^ 3);
            let enc = CastOf::default().encode(dtype, &data, DType::F32, &src).unwrap().unwrap();
            let back = decode_with_reference(CodecId::Cast, &enc.payload, dtype, n, DType::F32, &src).unwrap();
            prop_assert_eq!(back, data);
        }

        // A half tensor unrelated to its source: every element an exception.
        #[test]
        fn unrelated_round_trip(dtype in half_dtype(), n in 0usize..2000, seed in any::<u64>()) {
            let src = source(n, seed);
            let data = tensor_bytes(dtype, n, seed ^ 9);
            let enc = CastOf::default().encode(dtype, &data, DType::F32, &src).unwrap().unwrap();
            prop_assert_eq!(decode_with_reference(CodecId::Cast, &enc.payload, dtype, n, DType::F32, &src).unwrap(), data);
        }
    }

    #[test]
    fn exact_cast_costs_a_constant() {
        let src = source(300_000, 4);
        let data = cast_all(DType::BF16, &src);
        let enc = CastOf::default()
            .encode(DType::BF16, &data, DType::F32, &src)
            .unwrap()
            .unwrap();
        assert_eq!(enc.payload.len(), 17);
    }

    #[test]
    fn does_not_apply_to_other_dtypes_or_sizes() {
        let src = source(10, 1);
        let c = CastOf::default();
        assert!(
            c.encode(DType::F32, &src, DType::F32, &src)
                .unwrap()
                .is_none()
        );
        assert!(
            c.encode(DType::BF16, &src[..20], DType::F16, &src)
                .unwrap()
                .is_none()
        );
        assert!(
            c.encode(DType::BF16, &src[..18], DType::F32, &src)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn hostile_payloads_are_refused() {
        let src = source(5000, 2);
        let exact = cast_all(DType::BF16, &src);
        let data = mutate(&exact, 2, 100, 7);
        let enc = CastOf::default()
            .encode(DType::BF16, &data, DType::F32, &src)
            .unwrap()
            .unwrap();
        let p = &enc.payload;
        let dec = |payload: &[u8], n: usize, sd: DType, s: &[u8]| {
            decode_with_reference(CodecId::Cast, payload, DType::BF16, n, sd, s)
        };
        // Wrong source dtype, wrong source length.
        let err = dec(p, 5000, DType::I32, &src).unwrap_err();
        assert!(err.reason.contains("cannot be a cast"), "{err}");
        let err = dec(p, 5000, DType::F64, &src).unwrap_err();
        assert!(
            err.reason.contains("5000 elements of f64 expected"),
            "{err}"
        );
        let err = dec(p, 5000, DType::F32, &src[..400]).unwrap_err();
        assert!(
            err.reason.contains("referenced tensor has 400 bytes"),
            "{err}"
        );
        // Not a cast payload for an f32 tensor.
        let err = decode_with_reference(CodecId::Cast, p, DType::F32, 5000, DType::F32, &src)
            .unwrap_err();
        assert!(err.reason.contains("cannot be a cast"), "{err}");
        // Unknown rule, too many exceptions, truncated, extended.
        let mut bad = p.clone();
        bad[0] = 9;
        assert!(
            dec(&bad, 5000, DType::F32, &src)
                .unwrap_err()
                .reason
                .contains("rule")
        );
        let mut bad = p.clone();
        bad[1..9].copy_from_slice(&5001u64.to_le_bytes());
        assert!(
            dec(&bad, 5000, DType::F32, &src)
                .unwrap_err()
                .reason
                .contains("exceptions for")
        );
        assert!(dec(&p[..p.len() - 1], 5000, DType::F32, &src).is_err());
        let mut long = p.clone();
        long.push(0);
        assert!(dec(&long, 5000, DType::F32, &src).is_err());
        // Exception positions past the end: the same payload for fewer elements.
        let small = &src[..4 * 100];
        assert!(dec(p, 100, DType::F32, small).is_err());
        // Every byte flipped: an error or a tensor, never a panic.
        for i in 0..p.len() {
            let mut bad = p.clone();
            bad[i] ^= 0x5a;
            let _ = dec(&bad, 5000, DType::F32, &src);
        }
    }
}
