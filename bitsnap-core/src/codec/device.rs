//! Payloads decoded only as far as the CPU must go, for a device (a GPU) that finishes
//! them next to the base it already holds.
//!
//! The CPU does the entropy decoding (zstd, byte planes, mask gaps); what crosses the bus
//! is the compact form: a bitmask delta is its mask and its changed values only, a
//! cluster-quantized tensor its codes and codebook, an unchanged tensor nothing. The
//! device then expands them ([`DeviceForm`] says how), and the result is bit for bit what
//! [`super::decode`] returns on the CPU.

use super::{CodecError, CodecId, QuantBits, alloc, bitmask, cluster, xor};
use crate::DType;

/// Elements per rank block of a [`SparseDelta`]: its `block_ranks` hold one running count
/// per block, so a device finds the rank of a changed element from its block's count and
/// the popcounts of at most 31 mask words.
pub const RANK_BLOCK: usize = 1024;

/// One tensor's payload, entropy-decoded, in the form a device finishes.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceForm {
    /// The tensor's element bytes (raw and byte-plane payloads): uploaded as they are.
    Dense(Vec<u8>),
    /// The tensor equals its base: nothing to move.
    Unchanged,
    /// `tensor XOR base` for every element (XOR-delta payloads): one XOR on the device.
    Xor(Vec<u8>),
    /// A bitmask delta: the device scatters the changed values into the base.
    Sparse(SparseDelta),
    /// Cluster codes: the device looks each code up in the codebook.
    Codes(QuantCodes),
}

impl DeviceForm {
    /// Bytes this form moves to the device.
    pub fn upload_bytes(&self) -> u64 {
        match self {
            DeviceForm::Dense(b) | DeviceForm::Xor(b) => b.len() as u64,
            DeviceForm::Unchanged => 0,
            DeviceForm::Sparse(s) => {
                (s.mask.len() * 4 + s.block_ranks.len() * 4 + s.values.len()) as u64
            }
            DeviceForm::Codes(c) => (c.codebook.len() + c.codes.len()) as u64,
        }
    }
}

/// A bitmask delta ready for a device: element `i` changed iff bit `i % 32` of
/// `mask[i / 32]` is set, and then its new value is `base[i] XOR` the `r`-th element of
/// `values`, where `r` counts the set bits before `i`.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseDelta {
    /// The mask, LSB first, in 32-bit words (bits past the last element are 0).
    pub mask: Vec<u32>,
    /// For each block of [`RANK_BLOCK`] elements, the set bits before it.
    pub block_ranks: Vec<u32>,
    /// The changed elements' `value XOR base`, in element order, back to back.
    pub values: Vec<u8>,
    /// Number of changed elements.
    pub changed: u64,
}

/// Cluster codes ready for a device: element `i` is codebook entry `codes[i]`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantCodes {
    /// Bits per code: 2, 4, 8 or 16 from [`decode_for_device`], which widens 3- and
    /// 6-bit payloads to 4 and 8 bits so that no code straddles a 32-bit word (code `i`
    /// is then field `i % (32 / bits)` of word `i / (32 / bits)`). In general (and for
    /// [`apply_device_form`], which takes 3 and 6 as well) codes are one little-endian
    /// bit stream: code `i` is bits `i·bits .. (i+1)·bits`, stream bit `j` being bit
    /// `j % 32` of little-endian word `j / 32` (bit `j % 8` of byte `j / 8`); a 3- or
    /// 6-bit code with `j % 32 + bits > 32` continues in the low bits of the next word.
    pub bits: u32,
    /// The codebook: entries in the tensor's dtype, back to back.
    pub codebook: Vec<u8>,
    /// The packed codes; every code indexes the codebook (checked while decoding).
    pub codes: Vec<u8>,
}

/// Decodes a payload of codec `codec` for `numel` elements of `dtype` into the form a
/// device finishes. Needs no base: deltas come back as deltas.
///
/// Tensors of more than `u32::MAX` elements are refused (device kernels index with 32
/// bits).
///
/// ```
/// use bitsnap_core::codec::{self, BitmaskDelta, Codec, CodecId, DeviceForm, EncodeInput};
/// use bitsnap_core::{DType, Role};
/// let base: Vec<u8> = (0..400u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
/// let mut next = base.clone();
/// next[4 * 7..4 * 8].copy_from_slice(&1.5f32.to_le_bytes());
/// let input = EncodeInput { dtype: DType::F32, role: Role::Weight, data: &next, base: Some(&base) };
/// let enc = BitmaskDelta::default().encode(&input).unwrap().unwrap();
/// let form = codec::decode_for_device(CodecId::BitmaskDelta, &enc.payload, DType::F32, 400).unwrap();
/// let DeviceForm::Sparse(s) = form else { panic!() };
/// assert_eq!((s.changed, s.mask[0]), (1, 1 << 7));
/// ```
pub fn decode_for_device(
    codec: CodecId,
    payload: &[u8],
    dtype: DType,
    numel: usize,
) -> Result<DeviceForm, CodecError> {
    if numel > u32::MAX as usize {
        return Err(CodecError::new(
            0,
            format!("{numel} elements: device loading is limited to 2^32 - 1"),
        ));
    }
    let len = numel
        .checked_mul(dtype.size())
        .ok_or_else(|| CodecError::new(0, "tensor size overflows"))?;
    super::precheck(codec, payload, dtype, numel, len)?;
    let w = dtype.size();
    Ok(match codec {
        CodecId::Raw | CodecId::Planes => {
            DeviceForm::Dense(super::decode(codec, payload, dtype, numel, None)?)
        }
        CodecId::Unchanged => DeviceForm::Unchanged,
        CodecId::XorDelta => {
            let mut out = alloc::zeroed(len, "the decoded delta")?;
            xor::decode_delta_into(payload, w, &mut out)?;
            DeviceForm::Xor(out)
        }
        CodecId::BitmaskDelta => {
            let s = bitmask::decode_sparse(payload, w, numel)?;
            DeviceForm::Sparse(sparse(s.mask, s.values, s.changed, numel)?)
        }
        CodecId::IntDelta | CodecId::Cast | CodecId::Identical | CodecId::Replay => {
            return Err(CodecError::new(
                0,
                format!(
                    "{codec} payloads decode on the host (codec::decode or decode_with_references): no device form"
                ),
            ));
        }
        CodecId::Cluster => {
            let c = cluster::decode_codes(payload, dtype, numel)?;
            // Device kernels read codes that never straddle a 32-bit word: 3- and 6-bit
            // codes are widened to 4 and 8 bits here (see `QuantCodes::bits`).
            let (bits, codes) = match c.bits {
                QuantBits::B3 => (
                    QuantBits::B4,
                    widen(&c.packed, c.bits, QuantBits::B4, numel)?,
                ),
                QuantBits::B6 => (
                    QuantBits::B8,
                    widen(&c.packed, c.bits, QuantBits::B8, numel)?,
                ),
                b => (b, c.packed),
            };
            DeviceForm::Codes(QuantCodes {
                bits: bits.bits(),
                codebook: c.codebook,
                codes,
            })
        }
    })
}

/// `numel` codes packed at `from` bits, repacked at `to` bits (`to` ≥ `from`).
fn widen(
    packed: &[u8],
    from: QuantBits,
    to: QuantBits,
    numel: usize,
) -> Result<Vec<u8>, CodecError> {
    let mut codes = alloc::with_capacity(numel, "the widened codes")?;
    codes.extend((0..numel).map(|i| cluster::code_at(packed, from, i) as u16));
    Ok(cluster::pack_codes(&codes, to))
}

/// Packs a byte mask into words and counts the set bits before each rank block.
fn sparse(
    mask: Vec<u8>,
    values: Vec<u8>,
    changed: usize,
    numel: usize,
) -> Result<SparseDelta, CodecError> {
    let mut words = alloc::with_capacity(mask.len().div_ceil(4), "the mask words")?;
    words.extend(mask.chunks(4).map(|c| {
        let mut b = [0u8; 4];
        b[..c.len()].copy_from_slice(c);
        u32::from_le_bytes(b)
    }));
    let per_block = RANK_BLOCK / 32;
    let mut block_ranks = alloc::with_capacity(numel.div_ceil(RANK_BLOCK), "the rank blocks")?;
    let mut running = 0u32;
    for block in words.chunks(per_block) {
        block_ranks.push(running);
        running += block.iter().map(|w| w.count_ones()).sum::<u32>();
    }
    Ok(SparseDelta {
        mask: words,
        block_ranks,
        values,
        changed: changed as u64,
    })
}

/// Finishes a [`DeviceForm`] on the CPU, the reference every device must match.
///
/// `base` is the previous tensor (needed by `Unchanged`, `Xor` and `Sparse`); `numel`
/// the tensor's element count.
pub fn apply_device_form(
    form: &DeviceForm,
    dtype: DType,
    numel: usize,
    base: Option<&[u8]>,
) -> Result<Vec<u8>, CodecError> {
    let w = dtype.size();
    let need_base = || base.ok_or_else(|| CodecError::new(0, "delta payload without a base"));
    let copy_base = || -> Result<Vec<u8>, CodecError> {
        let b = need_base()?;
        let mut out = alloc::with_capacity(b.len(), "the decoded tensor")?;
        out.extend_from_slice(b);
        Ok(out)
    };
    Ok(match form {
        DeviceForm::Dense(d) => d.clone(),
        DeviceForm::Unchanged => copy_base()?,
        DeviceForm::Xor(x) => {
            let b = need_base()?;
            let mut out = alloc::with_capacity(x.len(), "the decoded tensor")?;
            out.extend(x.iter().zip(b).map(|(x, b)| x ^ b));
            out
        }
        DeviceForm::Sparse(s) => {
            let mut out = copy_base()?;
            let mut r = 0usize;
            for (wi, &word) in s.mask.iter().enumerate() {
                let mut v = word;
                while v != 0 {
                    let i = (wi * 32 + v.trailing_zeros() as usize) * w;
                    let value = s
                        .values
                        .get(r * w..(r + 1) * w)
                        .ok_or_else(|| CodecError::new(0, "more mask bits than changed values"))?;
                    let o = out
                        .get_mut(i..i + w)
                        .ok_or_else(|| CodecError::new(0, "mask bit past the last element"))?;
                    o.iter_mut().zip(value).for_each(|(o, x)| *o ^= x);
                    r += 1;
                    v &= v - 1;
                }
            }
            out
        }
        DeviceForm::Codes(c) => {
            let len = numel
                .checked_mul(w)
                .ok_or_else(|| CodecError::new(0, "tensor size overflows"))?;
            let bits = QuantBits::from_bits(c.bits)
                .ok_or_else(|| CodecError::new(0, format!("{} bits per code", c.bits)))?;
            if c.codes.len() < cluster::packed_len(numel, bits) {
                return Err(CodecError::new(
                    0,
                    format!("{} code bytes for {numel} elements", c.codes.len()),
                ));
            }
            let mut out = alloc::with_capacity(len, "the decoded tensor")?;
            for i in 0..numel {
                let code = cluster::code_at(&c.codes, bits, i);
                let entry = c.codebook.get(code * w..(code + 1) * w).ok_or_else(|| {
                    CodecError::new(0, format!("code {code} is past the codebook"))
                })?;
                out.extend_from_slice(entry);
            }
            out
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::testing::*;
    use crate::codec::{
        BitmaskDelta, ClusterQuantizer, Codec, EncodeInput, Planes, QuantBits, XorDelta, decode,
    };
    use crate::{Role, codec};
    use proptest::prelude::*;

    fn check(codec: &dyn Codec, dtype: DType, role: Role, base: &[u8], next: &[u8]) {
        let n = next.len() / dtype.size();
        let input = EncodeInput {
            dtype,
            role,
            data: next,
            base: Some(base),
        };
        // Every codec given here applies (finite values for the quantizer): no early
        // return that would pass without checking anything.
        let enc = codec.encode(&input).unwrap().expect("the codec applies");
        let form = decode_for_device(enc.codec, &enc.payload, dtype, n).unwrap();
        let cpu = decode(enc.codec, &enc.payload, dtype, n, Some(base)).unwrap();
        assert_eq!(apply_device_form(&form, dtype, n, Some(base)).unwrap(), cpu);
        if let DeviceForm::Sparse(s) = &form {
            assert_eq!(s.mask.len(), n.div_ceil(32));
            assert_eq!(s.block_ranks.len(), n.div_ceil(RANK_BLOCK));
            let ones: u32 = s.mask.iter().map(|w| w.count_ones()).sum();
            assert_eq!(u64::from(ones), s.changed);
        }
        let w = dtype.size();
        match &form {
            DeviceForm::Dense(d) | DeviceForm::Xor(d) => assert_eq!(d.len(), next.len()),
            DeviceForm::Unchanged => assert_eq!(form.upload_bytes(), 0),
            DeviceForm::Sparse(s) => assert_eq!(s.values.len() as u64, s.changed * w as u64),
            DeviceForm::Codes(c) => {
                // No code straddles a 32-bit word: 3 and 6 bits are widened.
                let packed = match c.bits {
                    2 => n.div_ceil(4),
                    4 => n.div_ceil(2),
                    8 => n,
                    16 => 2 * n,
                    b => panic!("{b}-bit codes for a device"),
                };
                assert_eq!(c.codes.len(), packed);
                assert!(c.codebook.len() % w == 0 && c.codebook.len() <= (w << c.bits));
            }
        }
    }

    proptest! {
        #[test]
        fn device_form_then_apply_equals_cpu_decode(
            dtype in any_dtype(),
            n in 0usize..5000,
            permille in any_permille(),
            seed in any::<u64>(),
        ) {
            let base = tensor_bytes(dtype, n, seed);
            let next = mutate(&base, dtype.size(), permille, seed ^ 3);
            for c in [&BitmaskDelta::default() as &dyn Codec, &XorDelta::default(), &Planes::default()] {
                check(c, dtype, Role::Weight, &base, &next);
            }
            if dtype.is_quantizable_float() {
                let finite = finite_bytes(dtype, n, seed);
                for bits in QuantBits::ALL {
                    check(&ClusterQuantizer::new(bits), dtype, Role::OptimizerMoment(1), &base, &finite);
                }
            }
        }
    }

    #[test]
    fn unchanged_and_all_changed_masks() {
        let base = tensor_bytes(DType::F32, 3000, 1);
        check(
            &BitmaskDelta::default(),
            DType::F32,
            Role::Weight,
            &base,
            &base,
        );
        let all: Vec<u8> = base.iter().map(|b| !b).collect();
        check(
            &BitmaskDelta::default(),
            DType::F32,
            Role::Weight,
            &base,
            &all,
        );
        let form = codec::decode_for_device(CodecId::Unchanged, &[], DType::F32, 3000).unwrap();
        assert_eq!(form, DeviceForm::Unchanged);
    }

    #[test]
    fn spans_several_chunks() {
        // 600k bf16 elements: two 1 MiB chunks; every 7th element changed.
        let base = tensor_bytes(DType::BF16, 600_000, 5);
        let next = mutate(&base, 2, 143, 6);
        check(
            &BitmaskDelta::default(),
            DType::BF16,
            Role::Weight,
            &base,
            &next,
        );
    }
}
