//! The snapshot file: preamble, payloads, header, trailer. `FORMAT.md` is the spec; every
//! field here is a named constant or a documented read.
//!
//! ```text
//! [preamble 16 B][payload 0][payload 1]...[header][trailer 32 B]
//! ```
//!
//! The header (tensor index) is written after the payloads so that a writer can stream
//! payloads to disk as they are encoded; the fixed-size trailer locates it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::{Xxh3, xxh3_64};

use crate::codec::{CodecError, CodecId, Cursor, DeviceForm, Distortion};
use crate::tensor::byte_len;
use crate::{DType, Error, Role};

/// First 8 bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"BITSNAP\0";
/// Last 8 bytes of every complete snapshot file.
pub const END_MAGIC: [u8; 8] = *b"BSNPEND\0";
/// The format version this build writes and the highest it reads.
pub const VERSION: u16 = 1;
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
}

impl Entry {
    /// Decoded size in bytes.
    pub fn raw_len(&self) -> u64 {
        self.shape.iter().product::<u64>() * self.dtype.size() as u64
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
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

    /// Total decoded bytes.
    pub fn raw_bytes(&self) -> u64 {
        self.entries.iter().map(Entry::raw_len).sum()
    }

    /// Total payload bytes.
    pub fn payload_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.len).sum()
    }

    /// Serialises the header body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.id.to_le_bytes());
        put_str16(&mut out, &self.name);
        match self.base {
            Some(b) => {
                out.push(1);
                out.extend_from_slice(&b.id.to_le_bytes());
                out.extend_from_slice(&b.state_hash.to_le_bytes());
            }
            None => {
                out.push(0);
                out.extend_from_slice(&[0; 16]);
            }
        }
        out.extend_from_slice(&(self.metadata.len() as u32).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str16(&mut out, k);
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v.as_bytes());
        }
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            put_str16(&mut out, &e.name);
            out.extend_from_slice(&[
                e.dtype.tag(),
                e.role.tag(),
                e.codec.tag(),
                e.shape.len() as u8,
            ]);
            e.shape
                .iter()
                .for_each(|d| out.extend_from_slice(&d.to_le_bytes()));
            for v in [e.offset, e.len, e.payload_hash, e.raw_hash] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            let d = &e.decision;
            out.extend_from_slice(&d.changed.unwrap_or(CHANGED_UNKNOWN).to_le_bytes());
            let (rel, max) = d
                .error
                .map_or((f64::NAN, f64::NAN), |q| (q.rel_l2, q.max_abs));
            out.extend_from_slice(&rel.to_le_bytes());
            out.extend_from_slice(&max.to_le_bytes());
            let cands = &d.candidates[..d.candidates.len().min(MAX_CANDIDATES)];
            out.push(cands.len() as u8);
            for (c, size) in cands {
                out.push(c.tag());
                out.extend_from_slice(&size.to_le_bytes());
            }
        }
        out
    }

    /// Parses a header body read from `file` at `offset`, checking every field.
    pub fn parse(body: &[u8], file: &Path, offset: u64) -> Result<Header, Error> {
        let mut cur = Cursor::new(body);
        let malformed = |e: CodecError, tensor: Option<&str>| Error::Malformed {
            file: file.to_path_buf(),
            tensor: tensor.map(str::to_string),
            what: "header",
            offset: offset + e.offset as u64,
            reason: e.reason,
        };
        let limit = |what: &'static str, value: u64, limit: u64| Error::Limit {
            file: file.to_path_buf(),
            what,
            value,
            limit,
        };
        let mut h = Header {
            id: cur.u64("snapshot id").map_err(|e| malformed(e, None))?,
            name: get_str16(&mut cur).map_err(|e| malformed(e, None))?,
            ..Header::default()
        };
        let (has_base, base_id, base_hash) = (|| {
            Ok::<_, CodecError>((
                cur.u8("base flag")?,
                cur.u64("base id")?,
                cur.u64("base hash")?,
            ))
        })()
        .map_err(|e| malformed(e, None))?;
        h.base = match has_base {
            0 => None,
            1 => Some(BaseRef {
                id: base_id,
                state_hash: base_hash,
            }),
            f => {
                return Err(malformed(
                    CodecError::new(cur.offset() - 17, format!("base flag {f}")),
                    None,
                ));
            }
        };
        let meta = cur.u32("metadata count").map_err(|e| malformed(e, None))? as u64;
        if meta > MAX_METADATA {
            return Err(limit("metadata entry count", meta, MAX_METADATA));
        }
        for _ in 0..meta {
            let kv = (|| {
                let k = get_str16(&mut cur)?;
                let at = cur.offset();
                let vlen = cur.u32("metadata value length")? as usize;
                let v = cur.bytes(vlen, "metadata value")?;
                let v = std::str::from_utf8(v)
                    .map_err(|_| CodecError::new(at, "metadata value is not UTF-8"))?;
                Ok::<_, CodecError>((k, v.to_string()))
            })()
            .map_err(|e| malformed(e, None))?;
            h.metadata.push(kv);
        }
        let count = cur.u32("tensor count").map_err(|e| malformed(e, None))? as u64;
        if count > MAX_TENSORS {
            return Err(limit("tensor count", count, MAX_TENSORS));
        }
        // Each entry takes at least 75 bytes: bounds the allocation by the header's size.
        let mut entries = Vec::with_capacity((count as usize).min(cur.remaining() / 75 + 1));
        let mut names = std::collections::HashSet::new();
        for _ in 0..count {
            let start = cur.offset();
            let name = get_str16(&mut cur).map_err(|e| malformed(e, None))?;
            let e = parse_entry(&mut cur, name.clone()).map_err(|e| malformed(e, Some(&name)))?;
            byte_len(&e.name, e.dtype, &e.shape)
                .map_err(|err| malformed(CodecError::new(start, err.to_string()), Some(&name)))?;
            if !names.insert(e.name.clone()) {
                return Err(malformed(
                    CodecError::new(start, "duplicate tensor name"),
                    Some(&name),
                ));
            }
            entries.push(e);
        }
        cur.finish("the tensor index")
            .map_err(|e| malformed(e, None))?;
        h.entries = entries;
        Ok(h)
    }
}

fn parse_entry(cur: &mut Cursor<'_>, name: String) -> Result<Entry, CodecError> {
    let at = cur.offset();
    let dtype_tag = cur.u8("dtype")?;
    let dtype = DType::from_tag(dtype_tag)
        .ok_or_else(|| CodecError::new(at, format!("unknown dtype tag {dtype_tag}")))?;
    let role_tag = cur.u8("role")?;
    let role = Role::from_tag(role_tag)
        .ok_or_else(|| CodecError::new(at + 1, format!("unknown role tag {role_tag}")))?;
    let codec_tag = cur.u8("codec")?;
    let codec = CodecId::from_tag(codec_tag)
        .ok_or_else(|| CodecError::new(at + 2, format!("unknown codec tag {codec_tag}")))?;
    let rank = cur.u8("rank")? as usize;
    if rank > crate::MAX_RANK {
        return Err(CodecError::new(
            at + 3,
            format!("rank {rank} above the limit of {}", crate::MAX_RANK),
        ));
    }
    let shape = (0..rank)
        .map(|_| cur.u64("dimension"))
        .collect::<Result<Vec<_>, _>>()?;
    let offset = cur.u64("payload offset")?;
    let len = cur.u64("payload length")?;
    let payload_hash = cur.u64("payload hash")?;
    let raw_hash = cur.u64("raw hash")?;
    let changed = cur.u64("changed count")?;
    let rel = cur.f64("relative error")?;
    let max = cur.f64("max error")?;
    let n = cur.u8("candidate count")? as usize;
    if n > MAX_CANDIDATES {
        return Err(CodecError::new(
            cur.offset() - 1,
            format!("{n} candidates, at most {MAX_CANDIDATES}"),
        ));
    }
    let mut candidates = Vec::with_capacity(n);
    for _ in 0..n {
        let at = cur.offset();
        let tag = cur.u8("candidate codec")?;
        let c = CodecId::from_tag(tag)
            .ok_or_else(|| CodecError::new(at, format!("unknown codec tag {tag}")))?;
        candidates.push((c, cur.u64("candidate size")?));
    }
    Ok(Entry {
        name,
        dtype,
        role,
        codec,
        shape,
        offset,
        len,
        payload_hash,
        raw_hash,
        decision: Decision {
            changed: (changed != CHANGED_UNKNOWN).then_some(changed),
            error: (!rel.is_nan()).then_some(Distortion {
                rel_l2: rel,
                max_abs: max,
            }),
            candidates,
        },
    })
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    // Names are checked against MAX_NAME_BYTES (< 2^16) before they get here.
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

fn get_str16(cur: &mut Cursor<'_>) -> Result<String, CodecError> {
    let at = cur.offset();
    let len = cur.u16("string length")? as usize;
    let b = cur.bytes(len, "string")?;
    String::from_utf8(b.to_vec()).map_err(|_| CodecError::new(at, "string is not UTF-8"))
}

/// Header region encoding: the header bytes as they are.
pub const HEADER_RAW: u8 = 0;
/// Header region encoding: `u32` decoded length, then one zstd frame.
pub const HEADER_ZSTD: u8 = 1;
/// zstd level of compressed headers (names and fields repeat: they compress 3–5x).
pub const HEADER_ZSTD_LEVEL: i32 = 3;

/// The header region: an encoding byte, then the header raw or zstd-compressed,
/// whichever is smaller.
pub fn encode_header_region(body: &[u8]) -> Vec<u8> {
    if let Ok(z) = zstd::bulk::compress(body, HEADER_ZSTD_LEVEL)
        && z.len() + 4 < body.len()
        && u32::try_from(body.len()).is_ok()
    {
        let mut out = Vec::with_capacity(5 + z.len());
        out.push(HEADER_ZSTD);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&z);
        return out;
    }
    let mut out = Vec::with_capacity(1 + body.len());
    out.push(HEADER_RAW);
    out.extend_from_slice(body);
    out
}

/// Decodes a header region read from `file` at `offset`; the decoded header is at most
/// [`MAX_HEADER_BYTES`].
pub fn decode_header_region(region: &[u8], file: &Path, offset: u64) -> Result<Vec<u8>, Error> {
    let malformed = |reason: String| Error::Malformed {
        file: file.to_path_buf(),
        tensor: None,
        what: "header",
        offset,
        reason,
    };
    match region.split_first() {
        Some((&HEADER_RAW, body)) => Ok(body.to_vec()),
        Some((&HEADER_ZSTD, rest)) => {
            let (len, frame) = rest
                .split_first_chunk::<4>()
                .ok_or_else(|| malformed("compressed header without its length".into()))?;
            let len = u32::from_le_bytes(*len) as u64;
            if len > MAX_HEADER_BYTES {
                return Err(Error::Limit {
                    file: file.to_path_buf(),
                    what: "decoded header length",
                    value: len,
                    limit: MAX_HEADER_BYTES,
                });
            }
            // Streamed: the buffer grows with what the frame really decodes to, never to
            // the declared length of a frame that cannot fill it (a 30-byte file must not
            // make the reader allocate MAX_HEADER_BYTES).
            let mut body = Vec::new();
            zstd::stream::read::Decoder::with_buffer(frame)
                .and_then(|d| d.take(len + 1).read_to_end(&mut body))
                .map_err(|e| malformed(format!("compressed header: {e}")))?;
            if body.len() as u64 != len {
                return Err(malformed(format!(
                    "compressed header decoded to {} bytes, {len} declared",
                    body.len()
                )));
            }
            Ok(body)
        }
        Some((&other, _)) => Err(malformed(format!("unknown header encoding {other}"))),
        None => Err(malformed("empty header region".into())),
    }
}

/// Streams a snapshot file: payloads first, as they are produced, then the header.
///
/// The caller writes to a temporary path and renames it into place (see
/// [`crate::Store`]); `finish` flushes and fsyncs.
pub struct SnapshotWriter<W: Write> {
    out: W,
    path: PathBuf,
    pos: u64,
    header: Header,
}

impl<W: Write> SnapshotWriter<W> {
    /// Starts a snapshot in `out` (reported as `path` in errors).
    pub fn new(
        mut out: W,
        path: &Path,
        id: u64,
        name: &str,
        base: Option<BaseRef>,
    ) -> Result<Self, Error> {
        let mut pre = Vec::with_capacity(PREAMBLE_BYTES);
        pre.extend_from_slice(&MAGIC);
        pre.extend_from_slice(&VERSION.to_le_bytes());
        pre.extend_from_slice(&0u16.to_le_bytes());
        pre.extend_from_slice(&0u32.to_le_bytes());
        out.write_all(&pre).map_err(|e| Error::io(path, e))?;
        Ok(SnapshotWriter {
            out,
            path: path.to_path_buf(),
            pos: PREAMBLE_BYTES as u64,
            header: Header {
                id,
                name: name.to_string(),
                base,
                ..Header::default()
            },
        })
    }

    /// Sets the string metadata.
    pub fn set_metadata(&mut self, metadata: Vec<(String, String)>) {
        self.header.metadata = metadata;
    }

    /// Appends one tensor's payload. `entry`'s offset, length and payload hash are filled in.
    pub fn push(&mut self, mut entry: Entry, payload: &[u8]) -> Result<(), Error> {
        self.out
            .write_all(payload)
            .map_err(|e| Error::io(&self.path, e))?;
        entry.offset = self.pos;
        entry.len = payload.len() as u64;
        entry.payload_hash = xxh3_64(payload);
        self.pos += payload.len() as u64;
        self.header.entries.push(entry);
        Ok(())
    }

    /// Writes header and trailer; returns the header and the writer.
    pub fn finish(mut self) -> Result<(Header, W), Error> {
        let raw = self.header.encode();
        // What the reader would refuse must not be written.
        if raw.len() as u64 > MAX_HEADER_BYTES
            || self.header.metadata.len() as u64 > MAX_METADATA
            || self.header.entries.len() as u64 > MAX_TENSORS
            || self
                .header
                .metadata
                .iter()
                .any(|(k, v)| k.len() > u16::MAX as usize || v.len() > MAX_METADATA_VALUE_BYTES)
            || self
                .header
                .entries
                .iter()
                .any(|e| e.name.len() > crate::MAX_NAME_BYTES)
            || self.header.name.len() > crate::MAX_NAME_BYTES
        {
            return Err(Error::Config(format!(
                "{}: header of {} bytes, {} metadata entries or a name/key/value over the format's limits",
                self.path.display(),
                raw.len(),
                self.header.metadata.len()
            )));
        }
        let body = encode_header_region(&raw);
        let mut trailer = Vec::with_capacity(TRAILER_BYTES);
        trailer.extend_from_slice(&self.pos.to_le_bytes());
        trailer.extend_from_slice(&(body.len() as u64).to_le_bytes());
        trailer.extend_from_slice(&xxh3_64(&body).to_le_bytes());
        trailer.extend_from_slice(&END_MAGIC);
        self.out
            .write_all(&body)
            .map_err(|e| Error::io(&self.path, e))?;
        self.out
            .write_all(&trailer)
            .map_err(|e| Error::io(&self.path, e))?;
        self.out.flush().map_err(|e| Error::io(&self.path, e))?;
        Ok((self.header, self.out))
    }
}

/// A snapshot file read into memory and checked: magic, version, trailer, header checksum,
/// header fields, and that the payloads tile the data section exactly. Payload checksums
/// are checked when a tensor is read.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// The parsed header.
    pub header: Header,
    bytes: Vec<u8>,
}

impl SnapshotFile {
    /// Reads and checks the snapshot at `path`.
    pub fn open(path: &Path) -> Result<SnapshotFile, Error> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        SnapshotFile::from_bytes(bytes, path)
    }

    /// Checks a snapshot held in memory (`path` names it in errors).
    pub fn from_bytes(bytes: Vec<u8>, path: &Path) -> Result<SnapshotFile, Error> {
        let file = path.to_path_buf();
        let len = bytes.len() as u64;
        let truncated = |offset: u64, what: &str| Error::Truncated {
            file: file.clone(),
            offset,
            what: what.to_string(),
        };
        let pre = bytes.get(..PREAMBLE_BYTES).ok_or_else(|| {
            if bytes.len() >= 8 && bytes[..8] != MAGIC {
                Error::BadMagic { file: file.clone() }
            } else {
                truncated(len, "preamble")
            }
        })?;
        if pre[..8] != MAGIC {
            return Err(Error::BadMagic { file });
        }
        let version = u16::from_le_bytes([pre[8], pre[9]]);
        if version == 0 || version > VERSION {
            return Err(Error::UnsupportedVersion {
                file,
                version,
                supported: VERSION,
            });
        }
        if pre[10..16] != [0; 6] {
            return Err(Error::Malformed {
                file,
                tensor: None,
                what: "preamble",
                offset: 10,
                reason: "flags or reserved bytes are not zero".into(),
            });
        }
        let t_at = len
            .checked_sub(TRAILER_BYTES as u64)
            .filter(|&t| t >= PREAMBLE_BYTES as u64)
            .ok_or_else(|| truncated(len, "trailer"))?;
        let trailer = &bytes[t_at as usize..];
        let word =
            |i: usize| u64::from_le_bytes(trailer[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        if trailer[24..32] != END_MAGIC {
            return Err(truncated(
                len,
                "trailer (no end marker: the file is incomplete or cut short)",
            ));
        }
        let (h_at, h_len, h_hash) = (word(0), word(1), word(2));
        if h_len > MAX_HEADER_BYTES {
            return Err(Error::Limit {
                file,
                what: "header length",
                value: h_len,
                limit: MAX_HEADER_BYTES,
            });
        }
        if h_at.checked_add(h_len) != Some(t_at) || h_at < PREAMBLE_BYTES as u64 {
            return Err(Error::Malformed {
                file,
                tensor: None,
                what: "trailer",
                offset: t_at,
                reason: format!(
                    "header at {h_at} of {h_len} bytes does not end where the trailer starts"
                ),
            });
        }
        let region = &bytes[h_at as usize..t_at as usize];
        let actual = xxh3_64(region);
        if actual != h_hash {
            return Err(Error::Checksum {
                file,
                tensor: None,
                what: "header",
                offset: h_at,
                expected: h_hash,
                actual,
            });
        }
        let body = decode_header_region(region, &file, h_at)?;
        let header = Header::parse(&body, &file, h_at)?;
        let mut at = PREAMBLE_BYTES as u64;
        for e in &header.entries {
            if e.offset != at {
                return Err(Error::Malformed {
                    file,
                    tensor: Some(e.name.clone()),
                    what: "header",
                    offset: h_at,
                    reason: format!("payload at {} but the previous one ends at {at}", e.offset),
                });
            }
            at = at
                .checked_add(e.len)
                .filter(|&end| end <= h_at)
                .ok_or_else(|| Error::Malformed {
                    file: file.clone(),
                    tensor: Some(e.name.clone()),
                    what: "header",
                    offset: h_at,
                    reason: format!(
                        "payload of {} bytes at {} runs past the data section",
                        e.len, e.offset
                    ),
                })?;
        }
        if at != h_at {
            return Err(Error::Malformed {
                file,
                tensor: None,
                what: "header",
                offset: at,
                reason: format!(
                    "{} bytes between the last payload and the header",
                    h_at - at
                ),
            });
        }
        Ok(SnapshotFile {
            path: file,
            header,
            bytes,
        })
    }

    /// The checksum-verified payload of `entry`.
    pub fn payload(&self, entry: &Entry) -> Result<&[u8], Error> {
        // Offsets and lengths were checked to tile the data section in `from_bytes`.
        let p = self
            .bytes
            .get(entry.offset as usize..(entry.offset + entry.len) as usize)
            .ok_or_else(|| Error::Truncated {
                file: self.path.clone(),
                offset: entry.offset,
                what: format!("payload of `{}`", entry.name),
            })?;
        self.check_hash(entry, "payload", entry.payload_hash, p)?;
        Ok(p)
    }

    /// Fails with [`Error::Checksum`] naming `entry` unless `bytes` hash to `expected`.
    fn check_hash(
        &self,
        entry: &Entry,
        what: &'static str,
        expected: u64,
        bytes: &[u8],
    ) -> Result<(), Error> {
        let actual = xxh3_64(bytes);
        if actual != expected {
            return Err(Error::Checksum {
                file: self.path.clone(),
                tensor: Some(entry.name.clone()),
                what,
                offset: entry.offset,
                expected,
                actual,
            });
        }
        Ok(())
    }

    /// Decodes `entry` (against `base`, the decoded bytes of the same tensor in the base
    /// snapshot, for delta codecs) and checks the result against its recorded hash.
    pub fn decode(&self, entry: &Entry, base: Option<&[u8]>) -> Result<Vec<u8>, Error> {
        let payload = self.payload(entry)?;
        let numel = self.numel(entry)?;
        if entry.codec.needs_base() && base.is_none() {
            return Err(Error::MissingBase {
                file: self.path.clone(),
                base_id: self.header.base.map_or(0, |b| b.id),
                reason: format!(
                    "has no tensor `{}` of dtype {} and shape {:?} to decode against",
                    entry.name, entry.dtype, entry.shape
                ),
            });
        }
        let out = crate::codec::decode(entry.codec, payload, entry.dtype, numel, base)
            .map_err(|e| self.malformed(entry, e))?;
        self.check_hash(entry, "decoded data", entry.raw_hash, &out)?;
        Ok(out)
    }

    /// Entropy-decodes `entry` into the form a device finishes next to its base (see
    /// [`crate::codec::device`]). The payload checksum is verified; the decoded-data
    /// checksum can only be checked on the finished tensor
    /// ([`SnapshotFile::check_decoded`]).
    pub fn decode_for_device(&self, entry: &Entry) -> Result<DeviceForm, Error> {
        let payload = self.payload(entry)?;
        let numel = self.numel(entry)?;
        crate::codec::decode_for_device(entry.codec, payload, entry.dtype, numel)
            .map_err(|e| self.malformed(entry, e))
    }

    /// Fails with [`Error::Checksum`] naming `entry` unless `decoded` is what the snapshot
    /// recorded for it.
    pub fn check_decoded(&self, entry: &Entry, decoded: &[u8]) -> Result<(), Error> {
        self.check_hash(entry, "decoded data", entry.raw_hash, decoded)
    }

    fn numel(&self, entry: &Entry) -> Result<usize, Error> {
        usize::try_from(entry.numel()).map_err(|_| Error::Limit {
            file: self.path.clone(),
            what: "tensor elements",
            value: entry.numel(),
            limit: usize::MAX as u64,
        })
    }

    fn malformed(&self, entry: &Entry, e: CodecError) -> Error {
        if let Some(bytes) = e.alloc {
            return Error::Alloc {
                what: format!("tensor `{}` of {}", entry.name, self.path.display()),
                bytes,
            };
        }
        Error::Malformed {
            file: self.path.clone(),
            tensor: Some(entry.name.clone()),
            what: "payload",
            offset: entry.offset + e.offset as u64,
            reason: e.reason,
        }
    }

    /// Total file size in bytes.
    pub fn file_len(&self) -> u64 {
        self.bytes.len() as u64
    }
}
