//! The codecs: each turns a tensor's bytes (and, for deltas, its base's bytes) into a
//! payload and back.
//!
//! | codec | lossless | needs base | best for |
//! |---|---|---|---|
//! | [`Raw`] | yes | no | incompressible data, tiny tensors |
//! | [`Planes`] | yes | no | first snapshots, tensors without a usable base |
//! | [`XorDelta`] | yes | yes | tensors where most elements changed |
//! | [`IntDelta`] | yes | yes | tensors where most elements moved by a few ulps (integer difference) |
//! | [`GroupedDelta`] (`grouped`) | yes | yes | float tensors whose steps in ulps depend on the magnitude (integer difference grouped by the base's exponent) |
//! | [`BitmaskDelta`] | yes | yes | tensors where few elements changed |
//! | `Unchanged` | yes | yes | tensors identical to their base (empty payload) |
//! | [`ClusterQuantizer`] | no | no | optimizer moments under a lossy policy |
//! | [`UniformQuantizer`] (writes `cluster` payloads) | no | no | optimizer moments within an error budget (uniform cells, entropy-coded) |
//! | [`ResidualQuantizer`] (`residual`) | no | yes | moments that moved little since the base (lossy) |
//! | [`CastOf`] (`cast`) | yes | a referenced f32 tensor | bf16/f16 copies of f32 master weights |
//! | `Identical` | yes | a referenced tensor | tensors bit-identical to another one (empty payload) |
//! | [`Replay`] (`replay`) | yes | yes, and two referenced tensors | f32 weights and second moments one optimizer step after their base |
//!
//! The last three read other tensors (named by the entry's references, FORMAT.md 2.7):
//! decode them with [`decode_with_references`].
//!
//! Every codec codes its input in chunks of about [`CHUNK_BYTES`] on all cores, and every
//! decoder checks each length it reads against the bytes it has and the size it must
//! produce: no allocation is sized from payload bytes alone.
//!
//! ```
//! use bitsnap_core::codec::{self, Codec, CodecId, EncodeInput, Planes, XorDelta};
//! use bitsnap_core::{DType, Role};
//!
//! let base: Vec<u8> = (0..4096u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
//! let mut next = base.clone();
//! next[400] ^= 1; // one changed element
//! let input = EncodeInput { shape: &[], dtype: DType::F32, role: Role::Weight, data: &next, base: Some(&base) };
//! let enc = XorDelta::default().encode(&input).unwrap().unwrap();
//! assert!(enc.payload.len() < next.len() / 100); // measured 59 bytes of 16 KiB
//! let back = codec::decode(CodecId::XorDelta, &enc.payload, DType::F32, 4096, Some(&base)).unwrap();
//! assert_eq!(back, next);
//! let full = Planes::default().encode(&input).unwrap().unwrap();
//! assert_eq!(codec::decode(CodecId::Planes, &full.payload, DType::F32, 4096, None).unwrap(), next);
//! ```

mod alloc;
pub mod bitmask;
pub mod cast;
mod chunks;
pub mod cluster;
mod cursor;
pub mod device;
pub mod grouped;
mod intdelta;
pub mod planes;
pub mod replay;
mod xor;

use std::cell::RefCell;
use std::fmt;

pub use bitmask::BitmaskDelta;
pub use cast::CastOf;
pub use chunks::{CHUNK_BYTES, MAX_CHUNK_BYTES};
#[allow(deprecated)]
pub use cluster::QuantError;
pub use cluster::{
    ClusterLayout, ClusterMode, ClusterQuantizer, Distortion, QuantBits, ResidualKind,
    ResidualQuantizer, UniformQuantizer,
};
pub(crate) use cursor::Cursor;
pub use device::{
    CastPatch, DeviceForm, QuantCodes, RANK_BLOCK, SparseDelta, apply_device_form,
    decode_for_device,
};
pub use grouped::GroupedDelta;
pub use intdelta::IntDelta;
pub use planes::Planes;
pub use replay::{Predictor, Replay};
pub use xor::XorDelta;

use crate::{DType, Role};

/// Default zstd level: level 1, the speed/ratio point the ground-truth measurements used.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// Identifies a codec on disk (the `codec` byte of a tensor entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum CodecId {
    /// The bytes as they are.
    Raw = 0,
    /// Byte planes, each zstd-coded.
    Planes = 1,
    /// XOR against the base, then byte planes.
    XorDelta = 2,
    /// Bitmask of changed elements plus their XOR against the base, in byte planes.
    BitmaskDelta = 3,
    /// Identical to the base tensor; no payload.
    Unchanged = 4,
    /// Cluster (k-means) quantization: codebook plus packed codes. Lossy.
    Cluster = 5,
    /// Integer difference against the base (wrapping, zigzag), then byte planes.
    IntDelta = 6,
    /// Round-to-nearest-even of a referenced f32 tensor, plus exceptions.
    Cast = 7,
    /// Bit-identical to a referenced tensor of the same dtype and shape; no payload.
    Identical = 8,
    /// An f32 tensor predicted by replaying an optimizer step from its base and two
    /// referenced tensors, plus the integer residual.
    Replay = 9,
    /// A cluster codebook of residuals against the base tensor (`base + delta` or
    /// `base × ratio`) plus packed codes. Lossy.
    ClusterResidual = 10,
    /// Integer difference against the base, each chunk's elements grouped by the base
    /// element's exponent, each group in byte planes. Float dtypes only.
    GroupedDelta = 11,
}

impl CodecId {
    /// Every codec id.
    pub const ALL: [CodecId; 12] = [
        CodecId::Raw,
        CodecId::Planes,
        CodecId::XorDelta,
        CodecId::BitmaskDelta,
        CodecId::Unchanged,
        CodecId::Cluster,
        CodecId::IntDelta,
        CodecId::Cast,
        CodecId::Identical,
        CodecId::Replay,
        CodecId::ClusterResidual,
        CodecId::GroupedDelta,
    ];

    /// The on-disk tag.
    pub const fn tag(self) -> u8 {
        self as u8
    }

    /// The codec with this tag, if any.
    pub fn from_tag(tag: u8) -> Option<CodecId> {
        CodecId::ALL.into_iter().find(|c| c.tag() == tag)
    }

    /// Whether decoding needs the base tensor.
    pub const fn needs_base(self) -> bool {
        matches!(
            self,
            CodecId::XorDelta
                | CodecId::BitmaskDelta
                | CodecId::Unchanged
                | CodecId::IntDelta
                | CodecId::Replay
                | CodecId::ClusterResidual
                | CodecId::GroupedDelta
        )
    }

    /// Whether decoding reads referenced tensors (the entry's references) instead of, or
    /// besides, the base: decode with [`decode_with_references`].
    pub const fn needs_reference(self) -> bool {
        self.reference_count() > 0
    }

    /// How many references an entry of this codec has: 1 for `cast` and `identical`, 2
    /// for `replay` (module [`replay`]), 0 for the others.
    pub const fn reference_count(self) -> usize {
        match self {
            CodecId::Cast | CodecId::Identical => 1,
            CodecId::Replay => 2,
            _ => 0,
        }
    }

    /// Whether [`decode_for_device`](device::decode_for_device) has a device form for
    /// this codec's payloads (every codec of this list does); the others decode on the
    /// host.
    pub const fn has_device_form(self) -> bool {
        matches!(
            self,
            CodecId::Raw
                | CodecId::Planes
                | CodecId::XorDelta
                | CodecId::BitmaskDelta
                | CodecId::Unchanged
                | CodecId::Cluster
                | CodecId::IntDelta
                | CodecId::Cast
                | CodecId::Identical
        )
    }

    /// Whether decoding reproduces the input bit for bit.
    pub const fn is_lossless(self) -> bool {
        !matches!(self, CodecId::Cluster | CodecId::ClusterResidual)
    }

    /// Short name (`raw`, `planes`, `xor`, `bitmask`, `unchanged`, `cluster`, `intdelta`,
    /// `cast`, `identical`, `replay`, `residual`, `grouped`).
    pub const fn name(self) -> &'static str {
        match self {
            CodecId::Raw => "raw",
            CodecId::Planes => "planes",
            CodecId::XorDelta => "xor",
            CodecId::BitmaskDelta => "bitmask",
            CodecId::Unchanged => "unchanged",
            CodecId::Cluster => "cluster",
            CodecId::IntDelta => "intdelta",
            CodecId::Cast => "cast",
            CodecId::Identical => "identical",
            CodecId::Replay => "replay",
            CodecId::ClusterResidual => "residual",
            CodecId::GroupedDelta => "grouped",
        }
    }
}

impl fmt::Display for CodecId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A decoding failure inside a payload: where (offset from the payload's start) and why.
/// The container turns it into [`crate::Error::Malformed`] naming the file and tensor,
/// or, when [`CodecError::alloc`] is set, into [`crate::Error::Alloc`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError {
    /// Byte offset from the start of the payload.
    pub offset: usize,
    /// What is wrong.
    pub reason: String,
    /// Set when decoding failed because a buffer of this many bytes could not be
    /// allocated: the payload passed every structural check, the tensor it declares does
    /// not fit in this machine's memory.
    pub alloc: Option<u64>,
}

impl CodecError {
    pub(crate) fn new(offset: usize, reason: impl Into<String>) -> CodecError {
        CodecError {
            offset,
            reason: reason.into(),
            alloc: None,
        }
    }

    /// A buffer of `bytes` for `what` could not be allocated.
    pub(crate) fn alloc(bytes: u64, what: &str) -> CodecError {
        CodecError {
            offset: 0,
            reason: format!("cannot allocate {bytes} bytes for {what}"),
            alloc: Some(bytes),
        }
    }
}

impl CodecError {
    /// The same error with its offset moved by `by` (from a chunk to its payload).
    pub(crate) fn shifted(mut self, by: usize) -> CodecError {
        self.offset += by;
        self
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at payload offset {}: {}", self.offset, self.reason)
    }
}

impl std::error::Error for CodecError {}

/// What a codec encodes: a tensor's bytes, its dtype and role, and its base if any.
#[derive(Debug, Clone, Copy)]
pub struct EncodeInput<'a> {
    /// Element type.
    pub dtype: DType,
    /// Role (quantizers use it to pick a transform).
    pub role: Role,
    /// The tensor's little-endian bytes.
    pub data: &'a [u8],
    /// The tensor's dimensions, outermost first, when known (empty: unknown, or a sample
    /// of a tensor). Quantizers use the last one to model codes by row and column
    /// ([`cluster`]'s context coding); the product need not match `data`'s length.
    pub shape: &'a [u64],
    /// The base tensor's bytes (same dtype and length), for delta codecs.
    pub base: Option<&'a [u8]>,
}

/// An encoded tensor.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Which codec produced it.
    pub codec: CodecId,
    /// The payload.
    pub payload: Vec<u8>,
    /// For lossy codecs: the bytes decoding will produce (the next delta's base), and the
    /// error against the input.
    pub lossy: Option<(Vec<u8>, Distortion)>,
}

/// An encoder: one per codec. Decoding needs no settings, see [`decode`].
pub trait Codec: Sync {
    /// The codec's id.
    fn id(&self) -> CodecId;
    /// Encodes `input`, or returns `Ok(None)` when the codec does not apply to it (no
    /// base for a delta codec, a dtype a quantizer does not handle, non-finite values).
    fn encode(&self, input: &EncodeInput<'_>) -> Result<Option<Encoded>, CodecError>;
}

/// The identity codec: the payload is the tensor's bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Codec for Raw {
    fn id(&self) -> CodecId {
        CodecId::Raw
    }
    fn encode(&self, input: &EncodeInput<'_>) -> Result<Option<Encoded>, CodecError> {
        Ok(Some(Encoded {
            codec: CodecId::Raw,
            payload: input.data.to_vec(),
            lossy: None,
        }))
    }
}

/// Decodes a payload of codec `codec` for `numel` elements of `dtype` into a new buffer.
pub fn decode(
    codec: CodecId,
    payload: &[u8],
    dtype: DType,
    numel: usize,
    base: Option<&[u8]>,
) -> Result<Vec<u8>, CodecError> {
    let len = numel
        .checked_mul(dtype.size())
        .ok_or_else(|| CodecError::new(0, "tensor size overflows"))?;
    check(codec, payload, dtype, numel)?;
    check_base(codec, base, len)?;
    let mut out = alloc::zeroed(len, "the decoded tensor")?;
    decode_into(codec, payload, dtype, base, &mut out)?;
    Ok(out)
}

/// Checks a payload of codec `codec` for `numel` elements of `dtype` as far as it can be
/// checked without decoding it, and without allocating anything sized by `numel`: what
/// [`decode`] and [`decode_for_device`] check before they allocate the output.
///
/// Passing does not mean the payload decodes (zstd frames are not decompressed, codes are
/// not checked against the codebook); failing means it cannot. The output a payload may
/// declare is bounded by its structure (a chunk of at most
/// [`MAX_CHUNK_BYTES`] elements needs a table entry and a plane record per byte of
/// an element), but only loosely: a few KiB of constant planes can validly declare tens of
/// GiB, so callers that decode untrusted snapshots need a budget of their own.
///
/// ```
/// use bitsnap_core::codec::{self, CodecId};
/// use bitsnap_core::DType;
/// // An empty planes payload cannot hold 2^40 elements: refused before anything is allocated.
/// let err = codec::check(CodecId::Planes, &[], DType::U8, 1 << 40).unwrap_err();
/// assert!(err.reason.contains("chunk"), "{err}");
/// assert!(codec::check(CodecId::Unchanged, &[], DType::U8, 1 << 40).is_ok());
/// ```
pub fn check(codec: CodecId, payload: &[u8], dtype: DType, numel: usize) -> Result<(), CodecError> {
    let len = numel
        .checked_mul(dtype.size())
        .ok_or_else(|| CodecError::new(0, "tensor size overflows"))?;
    precheck(codec, payload, dtype, numel, len)
}

/// Checks that a delta codec has a base of the tensor's `len` bytes.
fn check_base(codec: CodecId, base: Option<&[u8]>, len: usize) -> Result<(), CodecError> {
    if !codec.needs_base() {
        return Ok(());
    }
    match base {
        None => Err(CodecError::new(0, "delta payload without a base")),
        Some(b) if b.len() != len => Err(CodecError::new(
            0,
            format!("base has {} bytes, tensor {len}", b.len()),
        )),
        Some(_) => Ok(()),
    }
}

/// Checks what can be checked of a payload's structure before the output is allocated:
/// raw and unchanged lengths, a cluster codebook, every chunk table (chunks are at most
/// [`MAX_CHUNK_BYTES`] and every chunk needs bytes of its own, so a small payload
/// cannot demand an unbounded output), and inside every chunk the plane records and mask
/// headers (lengths, modes, the sizes zstd frames declare).
fn precheck(
    codec: CodecId,
    payload: &[u8],
    dtype: DType,
    numel: usize,
    len: usize,
) -> Result<(), CodecError> {
    match codec {
        CodecId::Raw if payload.len() != len => Err(CodecError::new(
            0,
            format!("raw payload of {} bytes, {len} expected", payload.len()),
        )),
        CodecId::Unchanged if !payload.is_empty() => {
            Err(CodecError::new(0, "unchanged tensor with a payload"))
        }
        CodecId::Identical if !payload.is_empty() => {
            Err(CodecError::new(0, "identical tensor with a payload"))
        }
        CodecId::Cast if !cast::applies(dtype, DType::F32) => Err(CodecError::new(
            0,
            format!("a {dtype} tensor cannot be a cast of an f32 tensor"),
        )),
        CodecId::Cast => cast::check(payload, numel),
        CodecId::Replay if dtype != DType::F32 => Err(CodecError::new(
            0,
            format!("a {dtype} tensor cannot be replayed (f32 only)"),
        )),
        CodecId::Replay => replay::check(payload, numel),
        CodecId::GroupedDelta => grouped::check(payload, dtype, numel),
        CodecId::Planes | CodecId::XorDelta | CodecId::IntDelta => {
            let w = dtype.size();
            chunks::parse(&mut Cursor::new(payload), numel)?
                .iter()
                .try_for_each(|c| planes::check_body(c.body, c.elems.len(), w, c.offset))
        }
        CodecId::BitmaskDelta => {
            let w = dtype.size();
            chunks::parse(&mut Cursor::new(payload), numel)?
                .iter()
                .try_for_each(|c| {
                    bitmask::check_chunk(c.body, c.elems.len(), w).map_err(|e| e.shifted(c.offset))
                })
        }
        CodecId::Cluster => cluster::precheck(payload, dtype, numel, cluster::Family::Plain),
        CodecId::ClusterResidual => {
            cluster::precheck(payload, dtype, numel, cluster::Family::Residual)
        }
        _ => Ok(()),
    }
}

/// Decodes a payload of codec `codec` into `out`, whose length fixes the element count.
pub fn decode_into(
    codec: CodecId,
    payload: &[u8],
    dtype: DType,
    base: Option<&[u8]>,
    out: &mut [u8],
) -> Result<(), CodecError> {
    if !out.len().is_multiple_of(dtype.size()) {
        return Err(CodecError::new(
            0,
            format!(
                "output of {} bytes is not a whole number of {dtype} elements",
                out.len()
            ),
        ));
    }
    check_base(codec, base, out.len())?;
    let base = base.filter(|_| codec.needs_base());
    match (codec, base) {
        (CodecId::Raw, _) => {
            if payload.len() != out.len() {
                return Err(CodecError::new(
                    0,
                    format!(
                        "raw payload of {} bytes, {} expected",
                        payload.len(),
                        out.len()
                    ),
                ));
            }
            out.copy_from_slice(payload);
            Ok(())
        }
        (CodecId::Planes, _) => planes::decode_into(payload, dtype.size(), out),
        (CodecId::XorDelta, Some(base)) => xor::decode_into(payload, dtype.size(), base, out),
        (CodecId::IntDelta, Some(base)) => intdelta::decode_into(payload, dtype.size(), base, out),
        (CodecId::GroupedDelta, Some(base)) => grouped::decode_into(payload, dtype, base, out),
        (CodecId::BitmaskDelta, Some(base)) => {
            bitmask::decode_into(payload, dtype.size(), base, out)
        }
        (CodecId::Unchanged, Some(base)) => {
            if !payload.is_empty() {
                return Err(CodecError::new(0, "unchanged tensor with a payload"));
            }
            out.copy_from_slice(base);
            Ok(())
        }
        (CodecId::Cluster, _) => cluster::decode_into(payload, dtype, out),
        (CodecId::ClusterResidual, Some(base)) => {
            cluster::decode_residual_into(payload, dtype, base, out)
        }
        (CodecId::Cast | CodecId::Identical | CodecId::Replay, _) => Err(CodecError::new(
            0,
            format!("a {codec} payload needs its referenced tensors: decode_with_references"),
        )),
        (_, None) => Err(CodecError::new(0, "delta payload without a base")),
    }
}

/// Decodes a payload of a reference codec ([`CodecId::needs_reference`]) that reads one
/// referenced tensor (`cast`, `identical`) for `numel` elements of `dtype`, given the
/// referenced tensor's decoded bytes (`reference`, of `reference_dtype`, the same element
/// count): [`decode_with_references`] with one reference and no base.
///
/// ```
/// use bitsnap_core::codec::{self, CodecId};
/// use bitsnap_core::DType;
/// let x = vec![7u8; 64];
/// assert_eq!(codec::decode_with_reference(CodecId::Identical, &[], DType::F32, 16, DType::F32, &x).unwrap(), x);
/// let err = codec::decode_with_reference(CodecId::Identical, &[], DType::F32, 16, DType::I32, &x).unwrap_err();
/// assert!(err.reason.contains("is i32, an identical one must be f32"), "{err}");
/// ```
pub fn decode_with_reference(
    codec: CodecId,
    payload: &[u8],
    dtype: DType,
    numel: usize,
    reference_dtype: DType,
    reference: &[u8],
) -> Result<Vec<u8>, CodecError> {
    decode_with_references(
        codec,
        payload,
        dtype,
        numel,
        None,
        &[(reference_dtype, reference)],
    )
}

/// Decodes a payload of a reference codec ([`CodecId::needs_reference`]) for `numel`
/// elements of `dtype`, given the decoded bytes of its references in the entry's order
/// (each with its dtype; every one of the tensor's element count) and, for codecs that
/// also need it ([`CodecId::needs_base`]: `replay`), the same tensor's decoded bytes in
/// the base snapshot. A reference of the wrong dtype or size, a missing one, or
/// exceptions that do not fit, are errors.
///
/// ```
/// use bitsnap_core::codec::{self, replay, CodecId, Predictor, Replay};
/// use bitsnap_core::DType;
/// let f = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
/// let (w, m, v) = (f(&[1.0, -2.0, 0.5]), f(&[1e-3, -2e-3, 0.0]), f(&[1e-6, 4e-6, 1e-8]));
/// // The new weight after one generic step w − 1e-3·m/(√v + 1e-8).
/// let step = Replay::new(Predictor::Generic, &[1e-3, 1e-8]);
/// let mut next = vec![0u8; 12];
/// step.predict_into(&w, &m, &v, &mut next);
/// let payload = replay::encode(&step, &next, &w, &m, &v, 1).unwrap().unwrap();
/// let refs = [(DType::F32, m.as_slice()), (DType::F32, v.as_slice())];
/// let back = codec::decode_with_references(CodecId::Replay, &payload, DType::F32, 3, Some(&w), &refs).unwrap();
/// assert_eq!(back, next);
/// let err = codec::decode_with_references(CodecId::Replay, &payload, DType::F32, 3, None, &refs).unwrap_err();
/// assert!(err.reason.contains("without a base"), "{err}");
/// ```
pub fn decode_with_references(
    codec: CodecId,
    payload: &[u8],
    dtype: DType,
    numel: usize,
    base: Option<&[u8]>,
    references: &[(DType, &[u8])],
) -> Result<Vec<u8>, CodecError> {
    let len = numel
        .checked_mul(dtype.size())
        .ok_or_else(|| CodecError::new(0, "tensor size overflows"))?;
    check(codec, payload, dtype, numel)?;
    if !codec.needs_reference() {
        return Err(CodecError::new(
            0,
            format!("{codec} does not read a referenced tensor"),
        ));
    }
    if references.len() != codec.reference_count() {
        return Err(CodecError::new(
            0,
            format!(
                "a {codec} payload reads {} referenced tensors, {} given",
                codec.reference_count(),
                references.len()
            ),
        ));
    }
    check_base(codec, base, len)?;
    // Every reference: the tensor's element count, of the tensor's dtype (a cast's
    // source dtype is checked by the cast decoder).
    for (i, &(ref_dtype, reference)) in references.iter().enumerate() {
        let which = match references.len() {
            1 => String::new(),
            _ => format!(" {}", i + 1),
        };
        if numel.checked_mul(ref_dtype.size()) != Some(reference.len()) {
            return Err(CodecError::new(
                0,
                format!(
                    "referenced tensor{which} has {} bytes, {numel} elements of {ref_dtype} expected",
                    reference.len(),
                ),
            ));
        }
        if codec != CodecId::Cast && ref_dtype != dtype {
            let what = match codec {
                CodecId::Identical => "an identical one",
                _ => "a replayed one",
            };
            return Err(CodecError::new(
                0,
                format!("the referenced tensor{which} is {ref_dtype}, {what} must be {dtype}"),
            ));
        }
    }
    match (codec, references, base) {
        (CodecId::Identical, [(_, r)], _) => {
            let mut out = alloc::with_capacity(len, "the decoded tensor")?;
            out.extend_from_slice(r);
            Ok(out)
        }
        (CodecId::Cast, [(rd, r)], _) => {
            let mut out = alloc::zeroed(len, "the decoded tensor")?;
            cast::decode_into(payload, dtype, *rd, r, &mut out)?;
            Ok(out)
        }
        (CodecId::Replay, [(_, a), (_, b)], Some(base)) => {
            let mut out = alloc::zeroed(len, "the decoded tensor")?;
            replay::decode_into(payload, base, a, b, &mut out)?;
            Ok(out)
        }
        _ => Err(CodecError::new(
            0,
            format!("{codec} does not read a referenced tensor"),
        )),
    }
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's zstd compressor at `level` (contexts are reused: creating
/// one per chunk would cost more than compressing small chunks).
pub(crate) fn with_compressor<R>(
    level: i32,
    f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> R,
) -> Result<R, CodecError> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            let c = zstd::bulk::Compressor::new(level)
                .map_err(|e| CodecError::new(0, format!("zstd compressor: {e}")))?;
            *slot = Some((level, c));
        }
        match slot.as_mut() {
            Some((_, c)) => Ok(f(c)),
            None => Err(CodecError::new(0, "zstd compressor unavailable")),
        }
    })
}

/// Runs `f` with this thread's zstd decompressor.
pub(crate) fn with_decompressor<R>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> Result<R, CodecError>,
) -> Result<R, CodecError> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let d = zstd::bulk::Decompressor::new()
                .map_err(|e| CodecError::new(0, format!("zstd decompressor: {e}")))?;
            *slot = Some(d);
        }
        match slot.as_mut() {
            Some(d) => f(d),
            None => Err(CodecError::new(0, "zstd decompressor unavailable")),
        }
    })
}

/// Property-test strategies and test data shared by the codec and policy tests.
#[cfg(test)]
pub(crate) mod testing {
    use proptest::prelude::*;

    use crate::DType;

    /// AdamW-like f32 moments of `n` elements, little-endian: first moments symmetric and
    /// heavy-tailed around 0, second moments (`second`) log-normal over about four
    /// decades.
    pub fn moments(n: usize, second: bool, seed: u64) -> Vec<u8> {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::Xoshiro256PlusPlus::seed_from_u64(seed);
        (0..n)
            .flat_map(|_| {
                let g: f64 = (0..4).map(|_| rng.random::<f64>() - 0.5).sum::<f64>() * 1.7;
                let v = if second {
                    1e-8 * (2.3 * g).exp()
                } else {
                    1e-4 * g * g.abs()
                };
                (v as f32).to_le_bytes()
            })
            .collect()
    }

    /// Bit patterns of the special values of a float `dtype`: ±0, ±Inf, quiet and
    /// signalling NaNs (with payloads, either sign), the smallest and largest subnormals
    /// (either sign), the smallest normal and the largest finite value. Empty for
    /// non-float dtypes.
    pub fn specials(dtype: DType) -> Vec<u64> {
        // (sign bit, exponent mask, quiet bit, mantissa mask)
        let (sign, exp, quiet, mant): (u64, u64, u64, u64) = match dtype {
            DType::F16 => (1 << 15, 0x7c00, 0x0200, 0x03ff),
            DType::BF16 => (1 << 15, 0x7f80, 0x0040, 0x007f),
            DType::F32 => (1 << 31, 0x7f80_0000, 0x0040_0000, 0x007f_ffff),
            DType::F64 => (
                1 << 63,
                0x7ff0_0000_0000_0000,
                0x0008_0000_0000_0000,
                0x000f_ffff_ffff_ffff,
            ),
            _ => return Vec::new(),
        };
        let min_normal = mant + 1;
        let max_finite = exp - min_normal + mant;
        let positive = [
            0,               // +0
            exp,             // +Inf
            exp | quiet,     // quiet NaN
            exp | quiet | 5, // quiet NaN with a payload
            exp | 1,         // signalling NaN
            1,               // smallest subnormal
            mant,            // largest subnormal
            min_normal,      // smallest normal
            max_finite,      // largest finite
        ];
        positive.iter().flat_map(|&v| [v, v | sign]).collect()
    }

    /// Bytes of `n` elements of `dtype`, from a mix of patterns: random, every special
    /// value of the dtype ([`specials`]: ±0, ±Inf, NaNs, subnormals), small values,
    /// repeats.
    pub fn tensor_bytes(dtype: DType, n: usize, seed: u64) -> Vec<u8> {
        let w = dtype.size();
        let special = specials(dtype);
        let mut state = seed | 1;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut out = Vec::with_capacity(n * w);
        for i in 0..n {
            let r = next();
            let v: u64 = match (r >> 60, dtype) {
                (0..=2, _) if !special.is_empty() => special[(r as usize >> 8) % special.len()],
                (3..=8, DType::F32) => ((i as f32) * 1e-3).to_bits() as u64,
                _ => r,
            };
            out.extend_from_slice(&v.to_le_bytes()[..w]);
        }
        out
    }

    /// [`tensor_bytes`] of a float `dtype` with every NaN and infinity replaced by a zero
    /// of the same sign: what the quantizer accepts, ±0 and subnormals included.
    pub fn finite_bytes(dtype: DType, n: usize, seed: u64) -> Vec<u8> {
        let mut out = tensor_bytes(dtype, n, seed);
        let w = dtype.size();
        let (exp, sign): (u64, u64) = match dtype {
            DType::F16 => (0x7c00, 1 << 15),
            DType::BF16 => (0x7f80, 1 << 15),
            DType::F32 => (0x7f80_0000, 1 << 31),
            DType::F64 => (0x7ff0_0000_0000_0000, 1 << 63),
            _ => return out,
        };
        for e in out.chunks_exact_mut(w) {
            let mut b = [0u8; 8];
            b[..w].copy_from_slice(e);
            let v = u64::from_le_bytes(b);
            if v & exp == exp {
                e.copy_from_slice(&(v & sign).to_le_bytes()[..w]);
            }
        }
        out
    }

    /// A copy of `base` with about `permille`/1000 of its elements changed.
    pub fn mutate(base: &[u8], width: usize, permille: u32, seed: u64) -> Vec<u8> {
        let mut out = base.to_vec();
        let mut state = seed | 1;
        for (i, elem) in out.chunks_exact_mut(width).enumerate() {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if ((state >> 33) % 1000) < permille as u64 {
                let b = ((state >> 17) as usize + i) % width;
                elem[b] ^= ((state >> 41) as u8) | 1;
            }
        }
        out
    }

    /// Any dtype.
    pub fn any_dtype() -> impl Strategy<Value = DType> {
        prop::sample::select(DType::ALL.to_vec())
    }

    /// Changed fractions in permille: 0%, 0.1%, 1%, 10%, 50%, 100%.
    pub fn any_permille() -> impl Strategy<Value = u32> {
        prop::sample::select(vec![0u32, 1, 10, 100, 500, 1000])
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn raw_and_unchanged_round_trip(dtype in any_dtype(), n in 0usize..3000, seed in any::<u64>()) {
            let data = tensor_bytes(dtype, n, seed);
            let input = EncodeInput { shape: &[], dtype, role: Role::Weight, data: &data, base: Some(&data) };
            let enc = Raw.encode(&input).unwrap().unwrap();
            prop_assert_eq!(&decode(CodecId::Raw, &enc.payload, dtype, n, None).unwrap(), &data);
            prop_assert_eq!(&decode(CodecId::Unchanged, &[], dtype, n, Some(&data)).unwrap(), &data);
        }
    }

    #[test]
    fn test_tensors_hold_every_special_value() {
        for dtype in [DType::F16, DType::BF16, DType::F32, DType::F64] {
            let w = dtype.size();
            let data = tensor_bytes(dtype, 4000, 1);
            let mut seen: Vec<u64> = data
                .chunks_exact(w)
                .map(|e| {
                    let mut b = [0u8; 8];
                    b[..w].copy_from_slice(e);
                    u64::from_le_bytes(b)
                })
                .collect();
            seen.sort_unstable();
            let special = specials(dtype);
            assert_eq!(special.len(), 18);
            for v in special {
                assert!(seen.binary_search(&v).is_ok(), "{dtype}: {v:#x} missing");
            }
        }
        assert!(specials(DType::I32).is_empty());
    }

    #[test]
    fn every_decoder_refuses_a_tiny_payload_declaring_a_huge_tensor_before_allocating() {
        // 2^40 elements: no chunk table of a few bytes can cover them, so the structure
        // check refuses before the 1 TiB output would be allocated.
        let n = 1usize << 40;
        for dtype in [DType::U8, DType::F32] {
            // Finite values, so that the quantizer applies to the f32 tensor.
            let data: Vec<u8> = (0..1000u16)
                .flat_map(|i| match dtype {
                    DType::F32 => (f32::from(i) * 0.5).to_le_bytes().to_vec(),
                    _ => vec![i as u8],
                })
                .collect();
            let input = EncodeInput {
                shape: &[],
                dtype,
                role: Role::OptimizerMoment(1),
                data: &data,
                base: Some(&data),
            };
            let encoders: [&dyn Codec; 6] = [
                &Raw,
                &Planes::default(),
                &XorDelta::default(),
                &IntDelta::default(),
                &BitmaskDelta::default(),
                &ClusterQuantizer::default(),
            ];
            for e in encoders {
                let Some(enc) = e.encode(&input).unwrap() else {
                    assert!(dtype == DType::U8 && e.id() == CodecId::Cluster);
                    continue;
                };
                let err = check(enc.codec, &enc.payload, dtype, n).unwrap_err();
                assert!(err.alloc.is_none(), "{}: {err}", enc.codec);
                let again = decode(enc.codec, &enc.payload, dtype, n, Some(&data)).unwrap_err();
                assert_eq!(again, err, "{}", enc.codec);
                let device = decode_for_device(enc.codec, &enc.payload, dtype, n).unwrap_err();
                assert!(device.alloc.is_none(), "{}: {device}", enc.codec);
            }
        }
        // Delta payloads need a base of the tensor's size before anything is allocated.
        let err = decode(CodecId::Unchanged, &[], DType::F64, n, Some(&[])).unwrap_err();
        assert!(err.reason.contains("base has 0 bytes"), "{err}");
        let err = decode(CodecId::Unchanged, &[], DType::F64, n, None).unwrap_err();
        assert!(err.reason.contains("without a base"), "{err}");
    }

    #[test]
    fn decode_into_refuses_an_output_of_partial_elements() {
        let data = tensor_bytes(DType::F32, 10, 1);
        let mut out = vec![0u8; 39];
        let err = decode_into(CodecId::Raw, &data, DType::F32, None, &mut out).unwrap_err();
        assert!(err.reason.contains("whole number"), "{err}");
    }
}
