//! Payloads decoded only as far as the CPU must go, for a device (a GPU) that finishes
//! them next to the base it already holds.
//!
//! The CPU does the entropy decoding (zstd, byte planes, mask gaps); what crosses the bus
//! is the compact form: a bitmask delta is its mask and its changed values only, a
//! cluster-quantized tensor its codes (2 to 16 bits, as stored) and codebook, an integer
//! delta its zigzag differences, a cast its exceptions, an unchanged or identical tensor
//! nothing. The device then expands them next to the base or the referenced tensor it
//! already holds ([`DeviceForm`] says how), and the result is bit for bit what
//! [`super::decode`] (or [`super::decode_with_reference`]) returns on the CPU:
//! [`apply_device_form`] is that reference.

use super::{CodecError, CodecId, QuantBits, alloc, bitmask, cast, cluster, intdelta, xor};
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
    /// `zigzag(tensor − base)` of each element, the bit patterns taken as wrapping
    /// integers of the element's width (integer-delta payloads): the device un-zigzags
    /// each lane and adds it to the base, wrapping.
    IntDelta(Vec<u8>),
    /// Round-to-nearest-even of the referenced f32 tensor (the entry's reference), then
    /// the exceptions patched in (cast payloads).
    Cast(CastPatch),
    /// Bit-identical to the referenced tensor: nothing to move.
    Identical,
}

impl DeviceForm {
    /// Bytes this form moves to the device.
    pub fn upload_bytes(&self) -> u64 {
        match self {
            DeviceForm::Dense(b) | DeviceForm::Xor(b) | DeviceForm::IntDelta(b) => b.len() as u64,
            DeviceForm::Unchanged | DeviceForm::Identical => 0,
            DeviceForm::Cast(c) => (c.words.len() * 12) as u64,
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

/// The exceptions of a cast, ready for a device that casts the referenced f32 tensor
/// itself: grouped by 32-bit word of the half-precision output (two elements per word),
/// so that each word is patched by one unit of work. Word `words[k]` becomes
/// `(cast & !lanes[k]) | values[k]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CastPatch {
    /// Indices of the output words holding an exception, ascending, each once.
    pub words: Vec<u32>,
    /// For each such word, the exception elements' bits in their lanes (others 0).
    pub values: Vec<u32>,
    /// For each such word, the lanes that are exceptions: `0x0000_ffff` (the element at
    /// the even index), `0xffff_0000` (the odd one) or both.
    pub lanes: Vec<u32>,
    /// Number of exceptions (elements).
    pub exceptions: u64,
}

/// Cluster codes ready for a device: element `i` is codebook entry `codes[i]`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantCodes {
    /// Bits per code: 2, 3, 4, 6, 8 or 16, as stored. Codes are one little-endian bit
    /// stream: code `i` is bits `i·bits .. (i+1)·bits`, stream bit `j` being bit `j % 32`
    /// of little-endian word `j / 32` (bit `j % 8` of byte `j / 8`); a 3- or 6-bit code
    /// starting at bit `j` with `j % 32 + bits > 32` straddles two words: it continues in
    /// the low bits of the next word (which the stream, padded to whole words, holds).
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
/// let input = EncodeInput { shape: &[], dtype: DType::F32, role: Role::Weight, data: &next, base: Some(&base) };
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
        CodecId::IntDelta => {
            let mut out = alloc::zeroed(len, "the decoded differences")?;
            intdelta::decode_differences_into(payload, w, &mut out)?;
            DeviceForm::IntDelta(out)
        }
        CodecId::ClusterResidual | CodecId::Replay | CodecId::GroupedDelta => {
            return Err(CodecError::new(
                0,
                format!(
                    "{codec} payloads decode on the host (codec::decode_with_references): no device form"
                ),
            ));
        }
        CodecId::Cast => DeviceForm::Cast(cast_patch(payload, numel)?),
        CodecId::Identical => DeviceForm::Identical,
        CodecId::Cluster => {
            let c = cluster::decode_codes(payload, dtype, numel, cluster::Family::Plain)?;
            let (bits, codebook, codes) = c.into_packed();
            DeviceForm::Codes(QuantCodes {
                bits: bits.bits(),
                codebook,
                codes,
            })
        }
    })
}

/// The exceptions of a cast payload for `numel` half-precision elements, by output word.
fn cast_patch(payload: &[u8], numel: usize) -> Result<CastPatch, CodecError> {
    let mut patch = CastPatch::default();
    cast::for_each_exception(payload, numel, |pos, v| {
        // Positions ascend: an exception shares a word only with the one just before.
        let word = (pos / 2) as u32;
        let shift = 16 * (pos % 2) as u32;
        let value = u32::from(u16::from_le_bytes(v)) << shift;
        let lane = 0xffff_u32 << shift;
        match (
            patch.words.last(),
            patch.values.last_mut(),
            patch.lanes.last_mut(),
        ) {
            (Some(&w), Some(values), Some(lanes)) if w == word => {
                *values |= value;
                *lanes |= lane;
            }
            _ => {
                patch.words.push(word);
                patch.values.push(value);
                patch.lanes.push(lane);
            }
        }
        patch.exceptions += 1;
    })?;
    Ok(patch)
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
/// `base` is the previous tensor (needed by `Unchanged`, `Xor`, `IntDelta` and
/// `Sparse`); `reference` the referenced tensor's dtype and bytes (needed by `Cast`: f32
/// of the same element count, and `Identical`: the same dtype and size); `numel` the
/// tensor's element count.
///
/// ```
/// use bitsnap_core::codec::{self, CastOf, CodecId, DeviceForm};
/// use bitsnap_core::DType;
/// let master: Vec<u8> = [1.0f32, f32::NAN, -0.0, 3.3e-39].iter().flat_map(|v| v.to_le_bytes()).collect();
/// let mut half: Vec<u8> = [1.0f32, f32::NAN, -0.0, 3.3e-39].iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
/// half[6] ^= 1; // one exception, in the high lane of word 1
/// let enc = CastOf::default().encode(DType::BF16, &half, DType::F32, &master).unwrap().unwrap();
/// let form = codec::decode_for_device(CodecId::Cast, &enc.payload, DType::BF16, 4).unwrap();
/// let DeviceForm::Cast(patch) = &form else { panic!() };
/// assert_eq!((patch.words.clone(), patch.lanes.clone()), (vec![1], vec![0xffff_0000]));
/// let back = codec::apply_device_form(&form, DType::BF16, 4, None, Some((DType::F32, &master))).unwrap();
/// assert_eq!(back, half);
/// ```
pub fn apply_device_form(
    form: &DeviceForm,
    dtype: DType,
    numel: usize,
    base: Option<&[u8]>,
    reference: Option<(DType, &[u8])>,
) -> Result<Vec<u8>, CodecError> {
    let w = dtype.size();
    let len = numel
        .checked_mul(w)
        .ok_or_else(|| CodecError::new(0, "tensor size overflows"))?;
    let need_reference = |want: DType| {
        let (rd, r) =
            reference.ok_or_else(|| CodecError::new(0, "reference payload without its tensor"))?;
        if rd != want || Some(r.len()) != numel.checked_mul(want.size()) {
            return Err(CodecError::new(
                0,
                format!(
                    "the referenced tensor is {} bytes of {rd}, {numel} elements of {want} expected",
                    r.len()
                ),
            ));
        }
        Ok(r)
    };
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
        DeviceForm::IntDelta(z) => {
            let b = need_base()?;
            if z.len() != len || b.len() != len {
                return Err(CodecError::new(
                    0,
                    format!(
                        "{} difference bytes, {} base bytes for a tensor of {len}",
                        z.len(),
                        b.len()
                    ),
                ));
            }
            let mut out = alloc::with_capacity(len, "the decoded tensor")?;
            out.extend_from_slice(z);
            intdelta::inverse(&mut out, b, w);
            out
        }
        DeviceForm::Identical => {
            let r = need_reference(dtype)?;
            let mut out = alloc::with_capacity(len, "the decoded tensor")?;
            out.extend_from_slice(r);
            out
        }
        DeviceForm::Cast(p) => {
            if !cast::applies(dtype, DType::F32) {
                return Err(CodecError::new(
                    0,
                    format!("a {dtype} tensor cannot be a cast"),
                ));
            }
            let r = need_reference(DType::F32)?;
            let mut out = alloc::with_capacity(len, "the decoded tensor")?;
            out.extend(r.chunks_exact(4).flat_map(|s| {
                cast::cast(dtype, f32::from_le_bytes([s[0], s[1], s[2], s[3]])).to_le_bytes()
            }));
            if p.values.len() != p.words.len() || p.lanes.len() != p.words.len() {
                return Err(CodecError::new(0, "cast patch lists of different lengths"));
            }
            for ((&wi, &v), &lanes) in p.words.iter().zip(&p.values).zip(&p.lanes) {
                let at = wi as usize * 4;
                let mut word = [0u8; 4];
                let have = out.get(at..).unwrap_or_default();
                let n = have.len().min(4);
                word[..n].copy_from_slice(&have[..n]);
                let patched = (u32::from_le_bytes(word) & !lanes) | (v & lanes);
                let o = out
                    .get_mut(at..at + n)
                    .filter(|_| n == 4 || (n == 2 && lanes >> 16 == 0))
                    .ok_or_else(|| CodecError::new(0, "cast exception past the last element"))?;
                o.copy_from_slice(&patched.to_le_bytes()[..n]);
            }
            out
        }
        DeviceForm::Codes(c) => {
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
        BitmaskDelta, CastOf, ClusterQuantizer, Codec, EncodeInput, IntDelta, Planes, QuantBits,
        XorDelta, decode, decode_with_reference,
    };
    use crate::{Role, codec};
    use proptest::prelude::*;

    fn check(codec: &dyn Codec, dtype: DType, role: Role, base: &[u8], next: &[u8]) {
        let n = next.len() / dtype.size();
        let input = EncodeInput {
            shape: &[],
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
        assert_eq!(
            apply_device_form(&form, dtype, n, Some(base), None).unwrap(),
            cpu
        );
        if let DeviceForm::Sparse(s) = &form {
            assert_eq!(s.mask.len(), n.div_ceil(32));
            assert_eq!(s.block_ranks.len(), n.div_ceil(RANK_BLOCK));
            let ones: u32 = s.mask.iter().map(|w| w.count_ones()).sum();
            assert_eq!(u64::from(ones), s.changed);
        }
        let w = dtype.size();
        match &form {
            DeviceForm::Dense(d) | DeviceForm::Xor(d) | DeviceForm::IntDelta(d) => {
                assert_eq!(d.len(), next.len())
            }
            DeviceForm::Unchanged => assert_eq!(form.upload_bytes(), 0),
            DeviceForm::Cast(_) | DeviceForm::Identical => panic!("a reference form"),
            DeviceForm::Sparse(s) => assert_eq!(s.values.len() as u64, s.changed * w as u64),
            DeviceForm::Codes(c) => {
                // Codes as stored: 3 and 6 bits are not widened.
                assert_eq!(c.codes.len(), (n * c.bits as usize).div_ceil(8));
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
            for c in [&BitmaskDelta::default() as &dyn Codec, &XorDelta::default(), &IntDelta::default(), &Planes::default()] {
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

    /// The f32 master (every special value: NaN payloads, ±0, ±Inf, subnormals) and a
    /// half tensor that is its cast with `permille`/1000 of the elements changed.
    fn cast_pair(dtype: DType, n: usize, permille: u32, seed: u64) -> (Vec<u8>, Vec<u8>) {
        let master = tensor_bytes(DType::F32, n, seed);
        let exact: Vec<u8> = master
            .chunks_exact(4)
            .flat_map(|s| {
                cast::cast(dtype, f32::from_le_bytes([s[0], s[1], s[2], s[3]])).to_le_bytes()
            })
            .collect();
        (master, mutate(&exact, 2, permille, seed ^ 5))
    }

    proptest! {
        #[test]
        fn cast_form_then_apply_equals_cpu_decode(
            half in prop::sample::select(vec![DType::BF16, DType::F16]),
            n in 0usize..3000,
            permille in any_permille(),
            seed in any::<u64>(),
        ) {
            let (master, data) = cast_pair(half, n, permille, seed);
            let enc = CastOf::default().encode(half, &data, DType::F32, &master).unwrap().unwrap();
            let form = decode_for_device(CodecId::Cast, &enc.payload, half, n).unwrap();
            let DeviceForm::Cast(p) = &form else { panic!("{form:?}") };
            // One patch record per word, words ascending, lanes within the tensor.
            prop_assert!(p.words.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(p.words.iter().zip(&p.lanes).all(|(&w, &l)| 2 * w as usize + usize::from(l >> 16 != 0) < n));
            let ones: u32 = p.lanes.iter().map(|l| l.count_ones() / 16).sum();
            prop_assert_eq!(u64::from(ones), p.exceptions);
            let cpu = decode_with_reference(CodecId::Cast, &enc.payload, half, n, DType::F32, &master).unwrap();
            prop_assert_eq!(&cpu, &data);
            prop_assert_eq!(apply_device_form(&form, half, n, None, Some((DType::F32, &master))).unwrap(), cpu);
        }
    }

    #[test]
    fn identical_and_reference_mismatches() {
        let x = tensor_bytes(DType::F32, 100, 3);
        let form = decode_for_device(CodecId::Identical, &[], DType::F32, 100).unwrap();
        assert_eq!(form, DeviceForm::Identical);
        assert_eq!(form.upload_bytes(), 0);
        let ok = apply_device_form(&form, DType::F32, 100, None, Some((DType::F32, &x)));
        assert_eq!(ok.unwrap(), x);
        for (dtype, bytes, what) in [
            (DType::I32, &x[..], "of i32"),
            (DType::F32, &x[..396], "396 bytes"),
        ] {
            let err =
                apply_device_form(&form, DType::F32, 100, None, Some((dtype, bytes))).unwrap_err();
            assert!(err.reason.contains(what), "{err}");
        }
        let err = apply_device_form(&form, DType::F32, 100, None, None).unwrap_err();
        assert!(err.reason.contains("without its tensor"), "{err}");
        // A cast of a bf16 tensor needs an f32 source of the same element count.
        let (master, data) = cast_pair(DType::BF16, 100, 100, 4);
        let enc = CastOf::default()
            .encode(DType::BF16, &data, DType::F32, &master)
            .unwrap()
            .unwrap();
        let form = decode_for_device(CodecId::Cast, &enc.payload, DType::BF16, 100).unwrap();
        let half_src = &master[..200];
        let err = apply_device_form(&form, DType::BF16, 100, None, Some((DType::BF16, half_src)))
            .unwrap_err();
        assert!(err.reason.contains("f32 expected"), "{err}");
        let err = decode_for_device(CodecId::Cast, &enc.payload, DType::F32, 50).unwrap_err();
        assert!(err.reason.contains("cannot be a cast"), "{err}");
    }

    #[test]
    fn integer_differences_wrap_per_lane() {
        // u32::MAX + 1 wraps to 0 and 0 - 1 to u32::MAX in their own lane only.
        let base: Vec<u8> = [u32::MAX, 0, 7, 0x7f80_0001]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let next: Vec<u8> = [0u32, u32::MAX, 7, 0x7f80_0000]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        check(&IntDelta::default(), DType::F32, Role::Weight, &base, &next);
        let input = EncodeInput {
            shape: &[],
            dtype: DType::F32,
            role: Role::Weight,
            data: &next,
            base: Some(&base),
        };
        let enc = IntDelta::default().encode(&input).unwrap().unwrap();
        let form = decode_for_device(CodecId::IntDelta, &enc.payload, DType::F32, 4).unwrap();
        // zigzag(+1) = 2, zigzag(-1) = 1, zigzag(0) = 0, zigzag(-1) = 1.
        let DeviceForm::IntDelta(z) = form else {
            panic!("{form:?}")
        };
        let z: Vec<u32> = z
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(z, vec![2, 1, 0, 1]);
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
