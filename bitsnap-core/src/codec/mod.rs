//! The codecs: each turns a tensor's bytes (and, for deltas, its base's bytes) into a
//! payload and back.
//!
//! | codec | lossless | needs base | best for |
//! |---|---|---|---|
//! | [`Raw`] | yes | no | incompressible data, tiny tensors |
//! | [`Planes`] | yes | no | first snapshots, tensors without a usable base |
//! | [`XorDelta`] | yes | yes | tensors where most elements changed |
//! | [`BitmaskDelta`] | yes | yes | tensors where few elements changed |
//! | `Unchanged` | yes | yes | tensors identical to their base (empty payload) |
//! | [`ClusterQuantizer`] | no | no | optimizer moments under a lossy policy |
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
//! let input = EncodeInput { dtype: DType::F32, role: Role::Weight, data: &next, base: Some(&base) };
//! let enc = XorDelta::default().encode(&input).unwrap().unwrap();
//! assert!(enc.payload.len() < next.len() / 20);
//! let back = codec::decode(CodecId::XorDelta, &enc.payload, DType::F32, 4096, Some(&base)).unwrap();
//! assert_eq!(back, next);
//! let full = Planes::default().encode(&input).unwrap().unwrap();
//! assert_eq!(codec::decode(CodecId::Planes, &full.payload, DType::F32, 4096, None).unwrap(), next);
//! ```

pub mod bitmask;
mod chunks;
pub mod cluster;
mod cursor;
pub mod device;
pub mod planes;
mod xor;

use std::cell::RefCell;
use std::fmt;

pub use bitmask::BitmaskDelta;
pub use chunks::CHUNK_BYTES;
pub use cluster::{ClusterQuantizer, QuantBits, QuantError};
pub(crate) use cursor::Cursor;
pub use device::{
    DeviceForm, QuantCodes, RANK_BLOCK, SparseDelta, apply_device_form, decode_for_device,
};
pub use planes::Planes;
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
}

impl CodecId {
    /// Every codec id.
    pub const ALL: [CodecId; 6] = [
        CodecId::Raw,
        CodecId::Planes,
        CodecId::XorDelta,
        CodecId::BitmaskDelta,
        CodecId::Unchanged,
        CodecId::Cluster,
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
            CodecId::XorDelta | CodecId::BitmaskDelta | CodecId::Unchanged
        )
    }

    /// Whether decoding reproduces the input bit for bit.
    pub const fn is_lossless(self) -> bool {
        !matches!(self, CodecId::Cluster)
    }

    /// Short name (`raw`, `planes`, `xor`, `bitmask`, `unchanged`, `cluster`).
    pub const fn name(self) -> &'static str {
        match self {
            CodecId::Raw => "raw",
            CodecId::Planes => "planes",
            CodecId::XorDelta => "xor",
            CodecId::BitmaskDelta => "bitmask",
            CodecId::Unchanged => "unchanged",
            CodecId::Cluster => "cluster",
        }
    }
}

impl fmt::Display for CodecId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A decoding failure inside a payload: where (offset from the payload's start) and why.
/// The container turns it into [`crate::Error::Malformed`] naming the file and tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError {
    /// Byte offset from the start of the payload.
    pub offset: usize,
    /// What is wrong.
    pub reason: String,
}

impl CodecError {
    pub(crate) fn new(offset: usize, reason: impl Into<String>) -> CodecError {
        CodecError {
            offset,
            reason: reason.into(),
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
    pub lossy: Option<(Vec<u8>, QuantError)>,
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
    precheck(codec, payload, dtype, numel, len)?;
    // Zeroed lazily by the allocator: pages are committed as decoding writes them, so a
    // payload that fails half-way has not made the whole tensor resident.
    let mut out = vec![0u8; len];
    decode_into(codec, payload, dtype, base, &mut out)?;
    Ok(out)
}

/// Checks what can be checked of a payload's structure before the output is allocated:
/// raw and unchanged lengths, a cluster codebook, and every chunk table (chunks are at most
/// [`chunks::MAX_CHUNK_BYTES`] and every chunk needs bytes of its own, so a small payload
/// cannot demand a huge output).
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
        CodecId::Planes | CodecId::XorDelta | CodecId::BitmaskDelta => {
            let chunks = chunks::parse(&mut Cursor::new(payload), numel)?;
            // Every chunk body holds at least one record per byte plane.
            let min = if codec == CodecId::BitmaskDelta {
                9
            } else {
                planes::PLANE_OVERHEAD * dtype.size()
            };
            match chunks.iter().find(|c| c.body.len() < min) {
                Some(c) => Err(CodecError::new(
                    c.offset,
                    format!("chunk body of {} bytes is too short", c.body.len()),
                )),
                None => Ok(()),
            }
        }
        CodecId::Cluster => cluster::precheck(payload, dtype, numel),
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
    let base = if codec.needs_base() {
        let base = base.ok_or_else(|| CodecError::new(0, "delta payload without a base"))?;
        if base.len() != out.len() {
            return Err(CodecError::new(
                0,
                format!("base has {} bytes, tensor {}", base.len(), out.len()),
            ));
        }
        Some(base)
    } else {
        None
    };
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
        (_, None) => Err(CodecError::new(0, "delta payload without a base")),
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

/// Property-test strategies shared by the codec tests.
#[cfg(test)]
pub(crate) mod testing {
    use proptest::prelude::*;

    use crate::DType;

    /// Bytes of `n` elements of `dtype`, from a mix of patterns: random, NaN/Inf/-0.0,
    /// small values, repeats.
    pub fn tensor_bytes(dtype: DType, n: usize, seed: u64) -> Vec<u8> {
        let w = dtype.size();
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
                (0, DType::F32) => f32::NAN.to_bits() as u64,
                (1, DType::F32) => f32::INFINITY.to_bits() as u64,
                (2, DType::F32) => (-0.0f32).to_bits() as u64,
                (0, DType::F64) => f64::NEG_INFINITY.to_bits(),
                (1, DType::F64) => f64::NAN.to_bits(),
                (0, DType::BF16) | (0, DType::F16) => 0x7fc0,
                (1, DType::BF16) | (1, DType::F16) => 0x8000,
                (3..=8, DType::F32) => ((i as f32) * 1e-3).to_bits() as u64,
                _ => r,
            };
            out.extend_from_slice(&v.to_le_bytes()[..w]);
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
