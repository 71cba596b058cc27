//! The cluster payload's layout (see the module documentation): packing codes, parsing
//! the codebook, checking a payload before allocating, and decoding it.

use rayon::prelude::*;

use super::context::{self, CODING_CONTEXT, CODING_PLANES};
use super::{QuantBits, TRANSFORM_BASE_DELTA, TRANSFORM_BASE_RATIO, TRANSFORM_LOG};
use crate::DType;
use crate::codec::{CodecError, Cursor, alloc, chunks, planes};

pub(super) fn code_width(bits: QuantBits) -> usize {
    if bits == QuantBits::B16 { 2 } else { 1 }
}

/// Bytes holding `n` codes of `bits` bits, packed as one little-endian bit stream.
pub(crate) fn packed_len(n: usize, bits: QuantBits) -> usize {
    n.saturating_mul(bits.bits() as usize).div_ceil(8)
}

/// Packs `codes` as one little-endian bit stream: code `i` fills bits `i·b .. (i+1)·b`,
/// where stream bit `j` is bit `j % 8` of byte `j / 8`. Bits past the last code are 0.
/// At 4, 8 and 16 bits this is the nibble, byte and u16 LE layout of earlier versions.
pub(crate) fn pack_codes(codes: &[u16], bits: QuantBits) -> Vec<u8> {
    let b = bits.bits();
    match bits {
        QuantBits::B8 => return codes.iter().map(|&c| c as u8).collect(),
        QuantBits::B16 => return codes.iter().flat_map(|c| c.to_le_bytes()).collect(),
        _ => {}
    }
    let mask = (1u32 << b) - 1;
    let mut out = Vec::with_capacity(packed_len(codes.len(), bits));
    let (mut acc, mut filled) = (0u32, 0u32);
    for &c in codes {
        acc |= (u32::from(c) & mask) << filled;
        filled += b;
        while filled >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            filled -= 8;
        }
    }
    if filled > 0 {
        out.push(acc as u8);
    }
    out
}

/// Code `i` of a packed stream of `bits`-bit codes (see [`pack_codes`]); bytes past the
/// end of `packed` read as 0.
pub(crate) fn code_at(packed: &[u8], bits: QuantBits, i: usize) -> usize {
    let b = bits.bits() as usize;
    let bit = i * b;
    let at = bit / 8;
    let byte = |j: usize| u32::from(packed.get(at + j).copied().unwrap_or(0));
    let window = byte(0) | (byte(1) << 8) | (byte(2) << 16);
    ((window >> (bit % 8)) & ((1u32 << b) - 1)) as usize
}

/// Checks a cluster payload for `n` elements before anything is allocated for them: the
/// codebook, a chunk table of codes that can fill `n` elements, and the plane records
/// of every code chunk.
pub(crate) fn precheck(
    payload: &[u8],
    dtype: DType,
    n: usize,
    family: Family,
) -> Result<(), CodecError> {
    let mut cur = Cursor::new(payload);
    let book = parse_codebook(&mut cur, dtype, family)?;
    let bits = book.bits;
    if book.coding == CODING_CONTEXT {
        let k = book.entries.len() / dtype.size();
        let at = cur.offset();
        return context::check(cur.bytes(cur.remaining(), "codes")?, at, n, k);
    }
    let width = code_width(bits);
    chunks::parse(&mut cur, packed_len(n, bits) / width)?
        .iter()
        .try_for_each(|c| planes::check_body(c.body, c.elems.len(), width, c.offset))
}

/// Appends the codes of a cluster payload whose head (bits, transform, coding byte,
/// reserved byte, codebook) is already in `payload`: as a chunk stream of planes
/// sections over the packed codes, or context-coded (see [`context`]), whichever is
/// smaller; sets the coding byte (offset 2) to say which. `mags[j]` is the magnitude of
/// codebook entry `j`, `shape` the tensor's (for the contexts).
pub(super) fn push_codes(
    payload: &mut Vec<u8>,
    codes: &[u16],
    bits: QuantBits,
    mags: &[f64],
    shape: &[u64],
    level: i32,
) -> Result<(), CodecError> {
    let head = payload.len();
    let packed = pack_codes(codes, bits);
    planes::encode_chunked(&packed, None, code_width(bits), level, payload)?;
    if let Some(section) = context::encode(codes, mags, shape, level, payload.len() - head)?
        && section.len() < payload.len() - head
    {
        payload.truncate(head);
        payload.extend_from_slice(&section);
        payload[2] = CODING_CONTEXT;
    }
    Ok(())
}

/// A cluster payload entropy-decoded but not looked up: what a device needs to
/// dequantize. Every code is checked to index the codebook.
pub(crate) struct Codes {
    pub bits: QuantBits,
    /// `k` entries of the tensor's dtype, back to back.
    pub codebook: Vec<u8>,
    codes: Stored,
}

/// The codes as their coding left them: packed (planes + zstd) or one per element
/// (context-coded; packed only for a device, not to be unpacked again on the host).
enum Stored {
    /// One little-endian bit stream (see [`pack_codes`]).
    Packed(Vec<u8>),
    Each(Vec<u16>),
}

impl Codes {
    pub(super) fn code(&self, i: usize) -> usize {
        match &self.codes {
            Stored::Packed(packed) => code_at(packed, self.bits, i),
            Stored::Each(codes) => usize::from(codes[i]),
        }
    }

    /// The codes packed as one little-endian bit stream (see [`pack_codes`]): the form
    /// the GPU loader expands.
    pub(crate) fn into_packed(self) -> (QuantBits, Vec<u8>, Vec<u8>) {
        let packed = match self.codes {
            Stored::Packed(packed) => packed,
            Stored::Each(codes) => pack_codes(&codes, self.bits),
        };
        (self.bits, self.codebook, packed)
    }
}

/// Decodes the codebook and the codes of a [`super::ClusterQuantizer`] payload for `n` elements.
pub(crate) fn decode_codes(
    payload: &[u8],
    dtype: DType,
    n: usize,
    family: Family,
) -> Result<Codes, CodecError> {
    let w = dtype.size();
    let mut cur = Cursor::new(payload);
    let book = parse_codebook(&mut cur, dtype, family)?;
    let bits = book.bits;
    let plen = packed_len(n, bits);
    let codes_at = cur.offset();
    let rest = cur.bytes(cur.remaining(), "codes")?;
    if book.coding == CODING_CONTEXT {
        // Every code is checked against the codebook as it is decoded.
        let k = book.entries.len() / w;
        let codes = context::decode(rest, codes_at, n, k)?;
        return Ok(Codes {
            bits,
            codebook: book.entries.to_vec(),
            codes: Stored::Each(codes),
        });
    }
    let mut packed = alloc::zeroed(plen, "the codes")?;
    planes::decode_into(rest, code_width(bits), &mut packed).map_err(|e| e.shifted(codes_at))?;
    let used = (n * bits.bits() as usize) % 8;
    if used != 0 && packed.last().is_some_and(|b| b >> used != 0) {
        return Err(CodecError::new(
            codes_at,
            format!(
                "unused high {} bits of the last code byte are not 0",
                8 - used
            ),
        ));
    }
    let codes = Codes {
        bits,
        codebook: book.entries.to_vec(),
        codes: Stored::Packed(packed),
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
    let codes = decode_codes(payload, dtype, n, Family::Plain)?;
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

/// Which transforms a payload may declare: the cluster codec's own (linear, log) or the
/// residual codec's (against the base), or any (inspection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    /// [`super::TRANSFORM_LINEAR`] or [`TRANSFORM_LOG`]: codec `cluster`.
    Plain,
    /// [`TRANSFORM_BASE_DELTA`] or [`TRANSFORM_BASE_RATIO`]: codec `residual`.
    Residual,
    /// Any of the four.
    Any,
}

/// The parsed head of a cluster payload.
#[allow(dead_code)] // `transform` is read by inspection tools.
pub(crate) struct Codebook<'a> {
    pub bits: QuantBits,
    /// [`super::TRANSFORM_LINEAR`], [`TRANSFORM_LOG`], [`TRANSFORM_BASE_DELTA`] or
    /// [`TRANSFORM_BASE_RATIO`], as `family` allows.
    pub transform: u8,
    /// How the codes are stored: [`CODING_PLANES`] or [`CODING_CONTEXT`].
    pub coding: u8,
    /// `k` entries of the tensor's dtype, back to back.
    pub entries: &'a [u8],
}

/// Parses the bits, transform and codebook of a cluster payload whose transform must be
/// one of `family`'s.
pub(crate) fn parse_codebook<'a>(
    cur: &mut Cursor<'a>,
    dtype: DType,
    family: Family,
) -> Result<Codebook<'a>, CodecError> {
    if !dtype.is_quantizable_float() {
        return Err(CodecError::new(
            0,
            format!("cluster payload for non-float dtype {dtype}"),
        ));
    }
    let bits = cur.u8("bits")?;
    let bits = QuantBits::from_bits(bits as u32)
        .ok_or_else(|| CodecError::new(0, format!("{bits} bits per code (2, 3, 4, 6, 8 or 16)")))?;
    let transform = cur.u8("transform")?;
    let allowed = match family {
        Family::Plain => transform <= TRANSFORM_LOG,
        Family::Residual => matches!(transform, TRANSFORM_BASE_DELTA | TRANSFORM_BASE_RATIO),
        Family::Any => transform <= TRANSFORM_BASE_RATIO,
    };
    if !allowed {
        let what = match family {
            Family::Plain => "a cluster payload (0 linear, 1 log)",
            Family::Residual => "a residual payload (2 base + delta, 3 base x ratio)",
            Family::Any => "known (0 to 3)",
        };
        return Err(CodecError::new(
            1,
            format!("transform {transform} is not {what}"),
        ));
    }
    let coding = cur.u8("coding")?;
    if coding != CODING_PLANES && coding != CODING_CONTEXT {
        return Err(CodecError::new(
            2,
            format!("code coding {coding} is not known (0 planes, 1 context)"),
        ));
    }
    if cur.u8("reserved")? != 0 {
        return Err(CodecError::new(3, "reserved byte is not zero"));
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
        coding,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::{QuantBits, code_at, pack_codes, packed_len};
    use crate::DType;
    use crate::Role;
    use crate::codec::{
        ClusterQuantizer, Codec, CodecId, EncodeInput, check, chunks, decode, planes,
    };
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn packed_codes_round_trip_at_every_width(
            bits in prop::sample::select(QuantBits::ALL.to_vec()),
            raw in prop::collection::vec(any::<u16>(), 0..600)) {
            let mask = ((1u32 << bits.bits()) - 1) as u16;
            let codes: Vec<u16> = raw.iter().map(|c| c & mask).collect();
            let packed = pack_codes(&codes, bits);
            prop_assert_eq!(packed.len(), packed_len(codes.len(), bits));
            for (i, &c) in codes.iter().enumerate() {
                prop_assert_eq!(code_at(&packed, bits, i), c as usize);
            }
            // Bits past the last code are 0.
            let used = codes.len() * bits.bits() as usize % 8;
            if used != 0 {
                prop_assert_eq!(packed.last().copied().unwrap_or(0) >> used, 0);
            }
        }
    }

    /// The layout is a bit stream: 3-bit codes 0..8 fill exactly three bytes, and code 10
    /// of a 3-bit stream straddles bytes 3 and 4 (bits 30..33, and 32-bit words 0 and 1).
    #[test]
    fn three_bit_codes_straddle_bytes_and_words() {
        let codes: Vec<u16> = (0..8).collect();
        assert_eq!(pack_codes(&codes, QuantBits::B3), [0x88, 0xc6, 0xfa]);
        let mut c = vec![0u16; 11];
        c[10] = 0b101;
        let p = pack_codes(&c, QuantBits::B3);
        assert_eq!((p[3], p[4]), (0b0100_0000, 0b0000_0001));
        assert_eq!(code_at(&p, QuantBits::B3, 10), 0b101);
        // 6-bit code 5 is bits 30..36: words 0 and 1 as well.
        let mut c = vec![0u16; 6];
        c[5] = 0b11_1111;
        assert_eq!(
            code_at(&pack_codes(&c, QuantBits::B6), QuantBits::B6, 5),
            63
        );
    }

    #[test]
    fn hostile_widths_and_padding_are_refused() {
        let v: Vec<u8> = (0..1001u32)
            .flat_map(|i| (1e-6 * (1.0 + (i % 37) as f32)).to_le_bytes())
            .collect();
        let input = EncodeInput {
            shape: &[],
            dtype: DType::F32,
            role: Role::OptimizerMoment(2),
            data: &v,
            base: None,
        };
        for bits in [QuantBits::B2, QuantBits::B3, QuantBits::B6] {
            let enc = ClusterQuantizer::new(bits).encode(&input).unwrap().unwrap();
            assert_eq!(enc.payload[0] as u32, bits.bits());
            decode(CodecId::Cluster, &enc.payload, DType::F32, 1001, None).unwrap();
            // Widths that do not exist are refused by the check and the decoder.
            for bad in [0u8, 1, 5, 7, 9, 32] {
                let mut p = enc.payload.clone();
                p[0] = bad;
                let e = check(CodecId::Cluster, &p, DType::F32, 1001).unwrap_err();
                assert!(e.reason.contains("bits per code"), "{e}");
                assert!(decode(CodecId::Cluster, &p, DType::F32, 1001, None).is_err());
            }
        }
        // Hand-made 3-bit payloads of 3 elements (9 bits: 2 bytes).
        let make = |packed: [u8; 2], k: u32| {
            let mut out = vec![3, 0, 0, 0];
            out.extend_from_slice(&k.to_le_bytes());
            (0..k).for_each(|i| out.extend_from_slice(&(i as f32).to_le_bytes()));
            planes::encode_chunked(&packed, None, 1, 1, &mut out).unwrap();
            out
        };
        let ok = make([0b1000_1000, 0b0000_0001], 8);
        let back = decode(CodecId::Cluster, &ok, DType::F32, 3, None).unwrap();
        let vals: Vec<f32> = back
            .chunks(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(vals, [0.0, 1.0, 6.0]);
        // Unused top bits of the last byte set.
        let e = decode(
            CodecId::Cluster,
            &make([0x88, 0x03], 8),
            DType::F32,
            3,
            None,
        )
        .unwrap_err();
        assert!(e.reason.contains("unused high 7 bits"), "{e}");
        // Code 6 past a codebook of 2.
        let e = decode(
            CodecId::Cluster,
            &make([0x88, 0x01], 2),
            DType::F32,
            3,
            None,
        )
        .unwrap_err();
        assert!(e.reason.contains("code 6 at element 2"), "{e}");
    }

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
