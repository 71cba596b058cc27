//! The cluster payload's layout (see the module documentation): packing codes, parsing
//! the codebook, checking a payload before allocating, and decoding it.

use rayon::prelude::*;

use super::{QuantBits, TRANSFORM_LOG};
use crate::DType;
use crate::codec::{CodecError, Cursor, alloc, chunks, planes};

pub(super) fn code_width(bits: QuantBits) -> usize {
    if bits == QuantBits::B16 { 2 } else { 1 }
}

pub(super) fn packed_len(n: usize, bits: QuantBits) -> usize {
    match bits {
        QuantBits::B4 => n.div_ceil(2),
        QuantBits::B8 => n,
        QuantBits::B16 => n.saturating_mul(2),
    }
}

pub(super) fn pack_codes(codes: &[u16], bits: QuantBits) -> Vec<u8> {
    match bits {
        QuantBits::B4 => codes
            .chunks(2)
            .map(|p| (p[0] as u8 & 0x0f) | ((p.get(1).copied().unwrap_or(0) as u8 & 0x0f) << 4))
            .collect(),
        QuantBits::B8 => codes.iter().map(|&c| c as u8).collect(),
        QuantBits::B16 => codes.iter().flat_map(|c| c.to_le_bytes()).collect(),
    }
}

/// Checks a cluster payload for `n` elements before anything is allocated for them: the
/// codebook, a chunk table of codes that can fill `n` elements, and the plane records
/// of every code chunk.
pub(crate) fn precheck(payload: &[u8], dtype: DType, n: usize) -> Result<(), CodecError> {
    let mut cur = Cursor::new(payload);
    let bits = parse_codebook(&mut cur, dtype)?.bits;
    let width = code_width(bits);
    chunks::parse(&mut cur, packed_len(n, bits) / width)?
        .iter()
        .try_for_each(|c| planes::check_body(c.body, c.elems.len(), width, c.offset))
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

/// Decodes the codebook and the codes of a [`super::ClusterQuantizer`] payload for `n` elements.
pub(crate) fn decode_codes(payload: &[u8], dtype: DType, n: usize) -> Result<Codes, CodecError> {
    let w = dtype.size();
    let mut cur = Cursor::new(payload);
    let book = parse_codebook(&mut cur, dtype)?;
    let bits = book.bits;
    let plen = packed_len(n, bits);
    let mut packed = alloc::zeroed(plen, "the codes")?;
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

/// Decodes a [`super::ClusterQuantizer`] payload into `out`.
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
    /// [`super::TRANSFORM_LINEAR`] or [`TRANSFORM_LOG`].
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
    use crate::DType;
    use crate::codec::{CodecId, check, chunks, decode};

    /// A cluster payload for `n` f32 elements with 8-bit codes, one codebook entry and
    /// every code plane the record `record`, in chunks of the largest size.
    fn payload(n: usize, record: &[u8]) -> Vec<u8> {
        let mut out = vec![8, 0, 0, 0];
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&0.5f32.to_le_bytes());
        chunks::encode(
            n,
            chunks::MAX_CHUNK_BYTES,
            &mut out,
            |_| Ok(record.to_vec()),
        )
        .unwrap();
        out
    }

    #[test]
    fn huge_declared_tensors_are_checked_before_allocating() {
        // 2^34 f32 elements (64 GiB), every code 0: valid, 2.5 KiB.
        let n = 1usize << 34;
        let constant = payload(n, &[2, 1, 0, 0, 0, 0]);
        assert!(constant.len() < 3 << 10, "{} bytes", constant.len());
        check(CodecId::Cluster, &constant, DType::F32, n).unwrap();
        // A raw code plane of one byte cannot hold a chunk: refused by the check, and by
        // the decoder (same error) before it allocates the output or the codes.
        let raw = payload(n, &[0, 1, 0, 0, 0, 0]);
        let err = check(CodecId::Cluster, &raw, DType::F32, n).unwrap_err();
        assert!(err.reason.contains("raw plane of 1 bytes"), "{err}");
        assert_eq!(
            decode(CodecId::Cluster, &raw, DType::F32, n, None).unwrap_err(),
            err
        );
    }
}
