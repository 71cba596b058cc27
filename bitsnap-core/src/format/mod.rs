//! The snapshot file: preamble, payloads, header, trailer. `FORMAT.md` is the spec; every
//! field here is a named constant or a documented read.
//!
//! ```text
//! [preamble 16 B][payload 0][payload 1]...[header][trailer 32 B]
//! ```
//!
//! The header (tensor index) is written after the payloads so that a writer can stream
//! payloads to disk as they are encoded; the fixed-size trailer locates it.
//!
//! One job per module: [`header`](Header::parse) (the tensor index, versions 1 and 2),
//! [`Trailer`] (the fixed 32 bytes that locate it), [`SnapshotFile`] (a checked reader
//! over borrowed or owned bytes) and [`SnapshotWriter`] (the streaming writer).

use xxhash_rust::xxh3::Xxh3;

use crate::codec::{CodecId, Distortion};
use crate::{DType, Role};

mod header;
mod reader;
mod trailer;
mod writer;

pub use header::{
    HEADER_RAW, HEADER_ZSTD, HEADER_ZSTD_LEVEL, decode_header_region, encode_header_region,
};
pub use reader::SnapshotFile;
pub(crate) use reader::{check_preamble, parse_region};
pub use trailer::Trailer;
pub use writer::SnapshotWriter;

/// First 8 bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"BITSNAP\0";
/// Last 8 bytes of every complete snapshot file.
pub const END_MAGIC: [u8; 8] = *b"BSNPEND\0";
/// The format version this build writes and the highest it reads.
pub const VERSION: u16 = 2;
/// The first format version: no attempt nonce, no extension areas (FORMAT.md 2.4).
pub const VERSION_1: u16 = 1;
/// Bytes of the preamble: magic (8), version (2), flags (2), reserved (4).
pub const PREAMBLE_BYTES: usize = 8 + 2 + 2 + 4;
/// Bytes of the trailer: header offset (8), header length (8), header xxh3 (8), end magic (8).
pub const TRAILER_BYTES: usize = 8 + 8 + 8 + 8;
const _: () = assert!(PREAMBLE_BYTES == 16 && TRAILER_BYTES == 32);
/// Largest header accepted, in bytes (256 MiB).
pub const MAX_HEADER_BYTES: u64 = 256 << 20;
/// Most tensors in one snapshot.
pub const MAX_TENSORS: u64 = 1 << 20;
/// Most metadata entries in one snapshot.
pub const MAX_METADATA: u64 = 1 << 16;
/// Longest metadata value, in bytes (16 MiB).
pub const MAX_METADATA_VALUE_BYTES: usize = 16 << 20;
/// Most candidate sizes recorded per tensor.
pub const MAX_CANDIDATES: usize = 8;
/// `changed` value meaning "not compared with a base".
pub const CHANGED_UNKNOWN: u64 = u64::MAX;
/// Largest extension area (of the header or of one entry), in bytes (v2; 1 MiB).
pub const MAX_EXTENSION_BYTES: u64 = 1 << 20;
/// Most references one tensor entry may carry (v2).
pub const MAX_REFERENCES: usize = 64;
/// Bytes of an extension record's head: kind (2), flags (1), length (4).
pub const EXTENSION_HEAD_BYTES: usize = 2 + 1 + 4;
/// Extension flag: a reader that does not know this kind MUST refuse the file.
pub const EXTENSION_REQUIRED: u8 = 1;
/// Entry extension kind: the tensors this payload references (FORMAT.md 2.7).
pub const EXT_REFERENCES: u16 = 1;
const _: () = assert!(EXTENSION_HEAD_BYTES == 7);

/// Where a referenced tensor lives (v2 references, FORMAT.md 2.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefScope {
    /// Another tensor of the same snapshot (decoded first).
    Snapshot,
    /// A tensor of the base snapshot (decoded before this snapshot).
    Base,
}

impl RefScope {
    /// The scope's tag byte.
    pub fn tag(self) -> u8 {
        match self {
            RefScope::Snapshot => 0,
            RefScope::Base => 1,
        }
    }

    /// The scope of a tag byte.
    pub fn from_tag(tag: u8) -> Option<RefScope> {
        match tag {
            0 => Some(RefScope::Snapshot),
            1 => Some(RefScope::Base),
            _ => None,
        }
    }
}

/// A tensor a payload references (v2). No codec of this build emits references yet;
/// readers parse and validate them so that codecs that do need no format bump.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Where the tensor is.
    pub scope: RefScope,
    /// Its name.
    pub name: String,
}

/// The snapshot a delta snapshot was encoded against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseRef {
    /// The base snapshot's id.
    pub id: u64,
    /// The base snapshot's [`Header::state_hash`]: what its tensors decode to.
    pub state_hash: u64,
}

/// How a tensor's codec was chosen, recorded so it can be inspected.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision {
    /// Elements that differ from the base tensor, if it was compared with one.
    pub changed: Option<u64>,
    /// Quantization error, for lossy codecs.
    pub error: Option<Distortion>,
    /// The codecs tried and their (estimated, for large tensors) payload sizes in bytes.
    pub candidates: Vec<(CodecId, u64)>,
}

/// One tensor's entry in a snapshot header.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Role.
    pub role: Role,
    /// Codec of the payload.
    pub codec: CodecId,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// Absolute file offset of the payload.
    pub offset: u64,
    /// Payload length in bytes.
    pub len: u64,
    /// xxh3-64 of the payload bytes.
    pub payload_hash: u64,
    /// xxh3-64 of the decoded tensor bytes.
    pub raw_hash: u64,
    /// How the codec was chosen.
    pub decision: Decision,
    /// Tensors the payload references (v2; empty in version-1 files).
    pub references: Vec<Reference>,
}

impl Entry {
    /// The header entry of tensor `t`, its payload coded with `codec` (chosen as
    /// `decision`), its decoded bytes hashing to `raw_hash` (xxh3-64), referencing
    /// `references`. The payload's place (offset, length, hash) is set by the
    /// [`SnapshotWriter`] that takes it.
    ///
    /// ```
    /// use bitsnap_core::format::{Decision, Entry};
    /// use bitsnap_core::{codec::CodecId, DType, Role, Tensor};
    /// let t = Tensor::new("w", DType::F32, vec![2], Role::Weight, vec![0; 8]).unwrap();
    /// let e = Entry::of(&t, CodecId::Planes, &Decision::default(), 7, &[]);
    /// assert_eq!((e.name.as_str(), e.raw_len(), e.raw_hash), ("w", 8, 7));
    /// ```
    pub fn of(
        t: &crate::Tensor,
        codec: CodecId,
        decision: &Decision,
        raw_hash: u64,
        references: &[Reference],
    ) -> Entry {
        Entry {
            name: t.name.clone(),
            dtype: t.dtype,
            role: t.role,
            codec,
            shape: t.shape.clone(),
            offset: 0,
            len: 0,
            payload_hash: 0,
            raw_hash,
            decision: decision.clone(),
            references: references.to_vec(),
        }
    }

    /// Decoded size in bytes (saturating: parsed headers are checked against
    /// [`crate::MAX_TENSOR_BYTES`], so this only saturates on hand-built entries).
    pub fn raw_len(&self) -> u64 {
        self.numel().saturating_mul(self.dtype.size() as u64)
    }

    /// Number of elements (saturating).
    pub fn numel(&self) -> u64 {
        self.shape.iter().fold(1u64, |n, &d| n.saturating_mul(d))
    }
}

/// A parsed snapshot header.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Header {
    /// Snapshot id, unique within its store.
    pub id: u64,
    /// Snapshot name (for example `step-1000`).
    pub name: String,
    /// The base, for delta snapshots.
    pub base: Option<BaseRef>,
    /// The writer attempt this file belongs to (v2): shards of a sharded snapshot carry
    /// their commit attempt's nonce; 0 for unsharded snapshots and version-1 files.
    pub attempt: u64,
    /// Free-form string metadata (for example safetensors `__metadata__`).
    pub metadata: Vec<(String, String)>,
    /// Tensor index, in payload order.
    pub entries: Vec<Entry>,
}

impl Header {
    /// A hash of what the snapshot decodes to: every tensor's name, dtype, shape and
    /// decoded-bytes hash. It does not change when a snapshot is re-encoded (rebased), so
    /// deltas name their base by it.
    pub fn state_hash(&self) -> u64 {
        let mut h = Xxh3::new();
        for e in &self.entries {
            h.update(&(e.name.len() as u64).to_le_bytes());
            h.update(e.name.as_bytes());
            h.update(&[e.dtype.tag()]);
            h.update(&(e.shape.len() as u64).to_le_bytes());
            e.shape.iter().for_each(|d| h.update(&d.to_le_bytes()));
            h.update(&e.raw_hash.to_le_bytes());
        }
        h.digest()
    }

    /// Total decoded bytes (saturating).
    pub fn raw_bytes(&self) -> u64 {
        self.entries
            .iter()
            .fold(0u64, |n, e| n.saturating_add(e.raw_len()))
    }

    /// Total payload bytes.
    pub fn payload_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.len).sum()
    }
}
