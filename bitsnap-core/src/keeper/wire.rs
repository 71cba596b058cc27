//! The keeper's wire protocol: frames, the messages they carry and their limits.
//!
//! `FORMAT.md` ("Keeper protocol") is the byte-exact specification; every field here is a
//! named constant or a documented layout. Frames from the other end are hostile: every
//! length is checked against a limit before anything is allocated, every read is checked
//! against the bytes that arrived, and a checksum covers every byte.

use std::io::{ErrorKind, Read, Write};
use std::path::Path;

use rayon::prelude::*;
use xxhash_rust::xxh3::xxh3_64;

use crate::format::{MAX_METADATA, MAX_METADATA_VALUE_BYTES, MAX_TENSORS};
use crate::{DType, Error, MAX_NAME_BYTES, Role, Tensor};

/// The first four bytes of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"BSKP";
/// The protocol version this build speaks (sent in `hello` and `welcome`).
pub const PROTOCOL_VERSION: u16 = 1;
/// Bytes of a frame header: magic (4), kind (1), reserved (3), head length (8), data
/// length (8), head xxh3 (8).
pub const FRAME_HEADER_BYTES: usize = 4 + 1 + 3 + 8 + 8 + 8;
const _: () = assert!(FRAME_HEADER_BYTES == 32);
/// Largest head (the structured part of a message) a receiver accepts: 256 MiB.
pub const MAX_HEAD_BYTES: u64 = 256 << 20;
/// Writes of tensor data smaller than this are coalesced into one buffer before they reach
/// the socket, so a snapshot of many small tensors costs few system calls.
const WRITE_BUFFER_BYTES: usize = 1 << 20;
/// What checksum errors and malformed messages call the structure.
const WHAT: &str = "keeper message";

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    /// Client → keeper: protocol version.
    Hello = 1,
    /// Keeper → client: protocol version and the keeper's settings.
    Welcome = 2,
    /// Client → keeper: a snapshot to hold (head: [`SnapshotHead`], data: its tensors).
    Put = 3,
    /// Keeper → client: the put is held in memory.
    Held = 4,
    /// Client → keeper: the latest snapshot of a series, please.
    Latest = 5,
    /// Keeper → client: the answer to `latest` (found or not, memory or disk).
    Snapshot = 6,
    /// Client → keeper: persist everything handed over.
    Flush = 7,
    /// Keeper → client: everything handed over before the flush is in the store.
    Flushed = 8,
    /// Keeper → client: the request failed (head: a message).
    Failed = 9,
}

impl Kind {
    fn from_tag(tag: u8) -> Option<Kind> {
        Some(match tag {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Put,
            4 => Kind::Held,
            5 => Kind::Latest,
            6 => Kind::Snapshot,
            7 => Kind::Flush,
            8 => Kind::Flushed,
            9 => Kind::Failed,
            _ => return None,
        })
    }

    /// Whether frames of this kind may carry tensor data after their head.
    fn has_data(self) -> bool {
        matches!(self, Kind::Put | Kind::Snapshot)
    }
}

/// A received frame: its kind, its checked head, and how many data bytes follow.
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) kind: Kind,
    pub(crate) head: Vec<u8>,
    pub(crate) data_len: u64,
}

/// Writes one frame: header, head, then `data` (tensor bytes, in order). Large slices go
/// to the socket as they are; small ones are coalesced.
pub(crate) fn write_frame(
    w: &mut impl Write,
    kind: Kind,
    head: &[u8],
    data: &[&[u8]],
) -> std::io::Result<()> {
    let data_len: u64 = data.iter().map(|d| d.len() as u64).sum();
    let mut first = Vec::with_capacity(FRAME_HEADER_BYTES + head.len());
    first.extend_from_slice(&FRAME_MAGIC);
    first.push(kind as u8);
    first.extend_from_slice(&[0; 3]);
    first.extend_from_slice(&(head.len() as u64).to_le_bytes());
    first.extend_from_slice(&data_len.to_le_bytes());
    first.extend_from_slice(&xxh3_64(head).to_le_bytes());
    first.extend_from_slice(head);
    let mut out = std::io::BufWriter::with_capacity(WRITE_BUFFER_BYTES, w);
    out.write_all(&first)?;
    for d in data {
        out.write_all(d)?;
    }
    out.flush()
}

/// Reads one frame header and its head. `Ok(None)`: the peer closed the connection
/// cleanly, before a frame began. `max_data` bounds the data that may follow.
pub(crate) fn read_frame(
    r: &mut impl Read,
    peer: &Path,
    max_data: u64,
) -> Result<Option<Frame>, Error> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    let got = read_full(r, &mut header, peer)?;
    if got == 0 {
        return Ok(None);
    }
    if got < FRAME_HEADER_BYTES {
        return Err(truncated(peer, got as u64, "frame header"));
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[at..at + 8]);
        u64::from_le_bytes(b)
    };
    if header[..4] != FRAME_MAGIC {
        return Err(malformed(
            peer,
            0,
            "not a keeper frame (bad magic bytes)".into(),
        ));
    }
    let kind = Kind::from_tag(header[4])
        .ok_or_else(|| malformed(peer, 4, format!("unknown frame kind {}", header[4])))?;
    if header[5..8] != [0; 3] {
        return Err(malformed(peer, 5, "reserved bytes are not zero".into()));
    }
    let (head_len, data_len, head_hash) = (u64_at(8), u64_at(16), u64_at(24));
    if head_len > MAX_HEAD_BYTES {
        return Err(limit(
            peer,
            "keeper frame head length",
            head_len,
            MAX_HEAD_BYTES,
        ));
    }
    if data_len > 0 && !kind.has_data() {
        return Err(malformed(
            peer,
            16,
            format!("a {kind:?} frame carries no data, but declares {data_len} bytes"),
        ));
    }
    if data_len > max_data {
        return Err(limit(peer, "keeper frame data length", data_len, max_data));
    }
    // Grows as bytes arrive: a frame that declares much and sends little costs little.
    let mut head = Vec::new();
    r.take(head_len)
        .read_to_end(&mut head)
        .map_err(|e| Error::io(peer, e))?;
    if (head.len() as u64) < head_len {
        return Err(truncated(
            peer,
            (FRAME_HEADER_BYTES + head.len()) as u64,
            "frame head",
        ));
    }
    let actual = xxh3_64(&head);
    if actual != head_hash {
        return Err(Error::Checksum {
            file: peer.to_path_buf(),
            tensor: None,
            what: "header",
            offset: FRAME_HEADER_BYTES as u64,
            expected: head_hash,
            actual,
        });
    }
    Ok(Some(Frame {
        kind,
        head,
        data_len,
    }))
}

/// Reads into `buf` until it is full or the stream ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8], peer: &Path) -> Result<usize, Error> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(peer, e)),
        }
    }
    Ok(got)
}

/// One tensor as a `put` or `snapshot` head describes it; its bytes follow the head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorDesc {
    pub(crate) name: String,
    pub(crate) dtype: DType,
    pub(crate) role: Role,
    pub(crate) shape: Vec<u64>,
    /// Bytes of data (checked against dtype and shape when decoded).
    pub(crate) len: u64,
    /// xxh3-64 of its bytes: the store's per-tensor `raw_hash`.
    pub(crate) hash: u64,
}

/// The head of a `put` (and the tail of a `snapshot` head): series, name, metadata and
/// the tensors whose bytes follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapshotHead {
    pub(crate) series: String,
    pub(crate) name: String,
    pub(crate) metadata: Vec<(String, String)>,
    pub(crate) tensors: Vec<TensorDesc>,
}

impl SnapshotHead {
    /// Describes `tensors` (hashing their bytes on the rayon pool). Checks the same
    /// limits the receiver checks, so a bad put fails before anything is sent.
    pub(crate) fn describe(
        series: &str,
        name: &str,
        metadata: &[(String, String)],
        tensors: &[Tensor],
    ) -> Result<SnapshotHead, Error> {
        check_names(series, name, metadata, tensors.len() as u64)?;
        let mut seen = std::collections::HashSet::new();
        for t in tensors {
            let expected = crate::tensor::byte_len(&t.name, t.dtype, &t.shape)?;
            if t.data.len() as u64 != expected {
                return Err(Error::InvalidTensor {
                    tensor: t.name.clone(),
                    reason: format!(
                        "{} bytes of data, {expected} expected for shape {:?} of {}",
                        t.data.len(),
                        t.shape,
                        t.dtype
                    ),
                });
            }
            if !seen.insert(t.name.as_str()) {
                return Err(duplicate(&t.name));
            }
        }
        let hashes: Vec<u64> = tensors.par_iter().map(|t| xxh3_64(&t.data)).collect();
        Ok(SnapshotHead {
            series: series.to_string(),
            name: name.to_string(),
            metadata: metadata.to_vec(),
            tensors: tensors
                .iter()
                .zip(hashes)
                .map(|(t, hash)| TensorDesc {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    role: t.role,
                    shape: t.shape.clone(),
                    len: t.data.len() as u64,
                    hash,
                })
                .collect(),
        })
    }

    /// Total data bytes (saturating; the decoder checks the exact sum).
    pub(crate) fn data_len(&self) -> u64 {
        self.tensors
            .iter()
            .fold(0u64, |n, t| n.saturating_add(t.len))
    }

    pub(crate) fn encode(&self, out: &mut HeadWriter) {
        out.str(&self.series);
        out.str(&self.name);
        out.u32(self.metadata.len() as u32);
        for (k, v) in &self.metadata {
            out.str(k);
            out.str(v);
        }
        out.u32(self.tensors.len() as u32);
        for t in &self.tensors {
            out.str(&t.name);
            out.u8(t.dtype.tag());
            out.u8(t.role.tag());
            out.u8(t.shape.len() as u8);
            for d in &t.shape {
                out.u64(*d);
            }
            out.u64(t.len);
            out.u64(t.hash);
        }
    }

    /// Decodes and checks a head: limits, tags, each tensor's length against its dtype
    /// and shape, unique names, and that the tensors' lengths add up to `data_len`.
    pub(crate) fn decode(r: &mut HeadReader<'_>, data_len: u64) -> Result<SnapshotHead, Error> {
        let series = r.str(MAX_NAME_BYTES, "series")?;
        let name = r.str(MAX_NAME_BYTES, "snapshot name")?;
        let n_meta = r.count(MAX_METADATA, "metadata entry count")?;
        let mut metadata = Vec::new();
        for _ in 0..n_meta {
            let k = r.str(MAX_NAME_BYTES, "metadata key")?;
            let v = r.str(MAX_METADATA_VALUE_BYTES, "metadata value")?;
            metadata.push((k, v));
        }
        let n = r.count(MAX_TENSORS, "tensor count")?;
        let mut tensors = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut total = 0u64;
        for _ in 0..n {
            let at = r.offset();
            let tname = r.str(MAX_NAME_BYTES, "tensor name")?;
            let dtag = r.u8()?;
            let dtype = DType::from_tag(dtag)
                .ok_or_else(|| r.bad(at, format!("tensor `{tname}`: unknown dtype tag {dtag}")))?;
            let rtag = r.u8()?;
            let role = Role::from_tag(rtag)
                .ok_or_else(|| r.bad(at, format!("tensor `{tname}`: unknown role tag {rtag}")))?;
            let rank = r.u8()? as usize;
            if rank > crate::MAX_RANK {
                return Err(r.bad(
                    at,
                    format!("tensor `{tname}`: rank {rank} is over the limit"),
                ));
            }
            let mut shape = Vec::with_capacity(rank);
            for _ in 0..rank {
                shape.push(r.u64()?);
            }
            let len = r.u64()?;
            let hash = r.u64()?;
            let expected = crate::tensor::byte_len(&tname, dtype, &shape)?;
            if len != expected {
                return Err(r.bad(
                    at,
                    format!("tensor `{tname}`: {len} bytes declared, {expected} for its shape"),
                ));
            }
            if !seen.insert(tname.clone()) {
                return Err(duplicate(&tname));
            }
            total = total
                .checked_add(len)
                .ok_or_else(|| r.bad(at, "tensor lengths overflow".into()))?;
            tensors.push(TensorDesc {
                name: tname,
                dtype,
                role,
                shape,
                len,
                hash,
            });
        }
        if total != data_len {
            return Err(r.bad(
                r.offset(),
                format!("tensors declare {total} data bytes, the frame {data_len}"),
            ));
        }
        Ok(SnapshotHead {
            series,
            name,
            metadata,
            tensors,
        })
    }
}

fn check_names(
    series: &str,
    name: &str,
    metadata: &[(String, String)],
    tensors: u64,
) -> Result<(), Error> {
    let over = |what: String, value: u64, limit: u64| {
        if value > limit {
            Err(Error::InputLimit { what, value, limit })
        } else {
            Ok(())
        }
    };
    over(
        "series name length".into(),
        series.len() as u64,
        MAX_NAME_BYTES as u64,
    )?;
    over(
        "snapshot name length".into(),
        name.len() as u64,
        MAX_NAME_BYTES as u64,
    )?;
    over(
        "metadata entry count".into(),
        metadata.len() as u64,
        MAX_METADATA,
    )?;
    over("tensor count".into(), tensors, MAX_TENSORS)?;
    for (k, v) in metadata {
        let key: String = k.chars().take(64).collect();
        over(
            format!("metadata key `{key}` length"),
            k.len() as u64,
            MAX_NAME_BYTES as u64,
        )?;
        over(
            format!("metadata `{key}` value length"),
            v.len() as u64,
            MAX_METADATA_VALUE_BYTES as u64,
        )?;
    }
    Ok(())
}

fn duplicate(name: &str) -> Error {
    Error::InvalidTensor {
        tensor: name.to_string(),
        reason: "the name appears twice in one snapshot".into(),
    }
}

/// Reads the tensors a checked head describes from the data that follows it: one exact
/// allocation per tensor, made only once the previous tensor arrived, each checked
/// against its hash.
pub(crate) fn read_tensors(
    r: &mut impl Read,
    descs: &[TensorDesc],
    peer: &Path,
) -> Result<Vec<Tensor>, Error> {
    let mut out = Vec::with_capacity(descs.len());
    let mut offset = 0u64;
    for d in descs {
        let len = usize::try_from(d.len).map_err(|_| Error::Alloc {
            what: format!("tensor `{}` from the keeper connection", d.name),
            bytes: d.len,
        })?;
        let mut data = Vec::new();
        data.try_reserve_exact(len).map_err(|_| Error::Alloc {
            what: format!("tensor `{}` from the keeper connection", d.name),
            bytes: d.len,
        })?;
        data.resize(len, 0);
        let got = read_full(r, &mut data, peer)?;
        if got < len {
            return Err(truncated(
                peer,
                offset + got as u64,
                &format!("data of tensor `{}`", d.name),
            ));
        }
        let actual = xxh3_64(&data);
        if actual != d.hash {
            return Err(Error::Checksum {
                file: peer.to_path_buf(),
                tensor: Some(d.name.clone()),
                what: "payload",
                offset,
                expected: d.hash,
                actual,
            });
        }
        offset += d.len;
        out.push(Tensor {
            name: d.name.clone(),
            dtype: d.dtype,
            shape: d.shape.clone(),
            role: d.role,
            data,
        });
    }
    Ok(out)
}

/// Builds a head: little-endian integers and length-prefixed UTF-8 strings.
#[derive(Debug, Default)]
pub(crate) struct HeadWriter(pub(crate) Vec<u8>);

impl HeadWriter {
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A string: its length (u32) and its UTF-8 bytes.
    pub(crate) fn str(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s.as_bytes());
    }
}

/// Reads a received head; every read is checked and names the offset it failed at.
#[derive(Debug)]
pub(crate) struct HeadReader<'a> {
    buf: &'a [u8],
    pos: usize,
    peer: &'a Path,
}

impl<'a> HeadReader<'a> {
    pub(crate) fn new(buf: &'a [u8], peer: &'a Path) -> HeadReader<'a> {
        HeadReader { buf, pos: 0, peer }
    }

    /// Offset of the next byte within the frame.
    pub(crate) fn offset(&self) -> u64 {
        (FRAME_HEADER_BYTES + self.pos) as u64
    }

    /// A malformed-message error at frame offset `at`.
    pub(crate) fn bad(&self, at: u64, reason: String) -> Error {
        malformed(self.peer, at, reason)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| truncated(self.peer, self.offset(), "frame head"))?;
        let s = self.buf.get(self.pos..end).unwrap_or_default();
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count (u32) no larger than `limit`.
    pub(crate) fn count(&mut self, limit: u64, what: &'static str) -> Result<u64, Error> {
        let n = u64::from(self.u32()?);
        if n > limit {
            return Err(self.limit(what, n, limit));
        }
        Ok(n)
    }

    /// A string of at most `limit` bytes of UTF-8.
    pub(crate) fn str(&mut self, limit: usize, what: &'static str) -> Result<String, Error> {
        let at = self.offset();
        let n = u64::from(self.u32()?);
        if n > limit as u64 {
            return Err(self.limit(what, n, limit as u64));
        }
        let bytes = self.take(n as usize)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.bad(at, format!("{what} is not UTF-8")))
    }

    fn limit(&self, what: &'static str, value: u64, limit: u64) -> Error {
        Error::Limit {
            file: self.peer.to_path_buf(),
            what,
            value,
            limit,
        }
    }

    /// Checks that the whole head was read.
    pub(crate) fn finish(&self) -> Result<(), Error> {
        if self.pos != self.buf.len() {
            return Err(self.bad(
                self.offset(),
                format!(
                    "{} unread bytes at the end of the head",
                    self.buf.len() - self.pos
                ),
            ));
        }
        Ok(())
    }
}

pub(crate) fn malformed(peer: &Path, offset: u64, reason: String) -> Error {
    Error::Malformed {
        file: peer.to_path_buf(),
        tensor: None,
        what: WHAT,
        offset,
        reason,
    }
}

fn truncated(peer: &Path, offset: u64, what: &str) -> Error {
    Error::Truncated {
        file: peer.to_path_buf(),
        offset,
        what: format!("keeper {what} (the connection closed mid-frame)"),
    }
}

fn limit(peer: &Path, what: &'static str, value: u64, limit: u64) -> Error {
    Error::Limit {
        file: peer.to_path_buf(),
        what,
        value,
        limit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn peer() -> &'static Path {
        Path::new("test.sock")
    }

    fn tensors(seed: u8, n: usize) -> Vec<Tensor> {
        (0..n)
            .map(|i| {
                let data: Vec<u8> = (0..4 * (i + 1)).map(|j| seed ^ j as u8).collect();
                Tensor::new(
                    format!("t{i}"),
                    DType::F32,
                    vec![i as u64 + 1],
                    Role::Weight,
                    data,
                )
                .unwrap()
            })
            .collect()
    }

    fn put_bytes(head: &SnapshotHead, ts: &[Tensor]) -> Vec<u8> {
        let mut h = HeadWriter::default();
        head.encode(&mut h);
        let data: Vec<&[u8]> = ts.iter().map(|t| t.data.as_slice()).collect();
        let mut out = Vec::new();
        write_frame(&mut out, Kind::Put, &h.0, &data).unwrap();
        out
    }

    fn read_put(bytes: &[u8]) -> Result<(SnapshotHead, Vec<Tensor>), Error> {
        let mut r = bytes;
        let f = read_frame(&mut r, peer(), u64::MAX)?.expect("a frame");
        let mut hr = HeadReader::new(&f.head, peer());
        let head = SnapshotHead::decode(&mut hr, f.data_len)?;
        hr.finish()?;
        let ts = read_tensors(&mut r, &head.tensors, peer())?;
        Ok((head, ts))
    }

    proptest! {
        #[test]
        fn put_round_trips(seed in any::<u8>(), n in 0usize..6, meta in proptest::collection::vec(("[a-z.]{0,12}", ".{0,20}"), 0..4)) {
            let ts = tensors(seed, n);
            let head = SnapshotHead::describe("s", "step-1", &meta, &ts).unwrap();
            let bytes = put_bytes(&head, &ts);
            let (back, got) = read_put(&bytes).unwrap();
            prop_assert_eq!(back, head);
            prop_assert_eq!(got, ts);
        }

        #[test]
        fn every_truncation_is_an_error(cut in 1usize..200) {
            let ts = tensors(7, 4);
            let head = SnapshotHead::describe("s", "n", &[], &ts).unwrap();
            let bytes = put_bytes(&head, &ts);
            let cut = cut.min(bytes.len() - 1);
            prop_assert!(read_put(&bytes[..cut]).is_err());
        }

        #[test]
        fn every_flipped_byte_is_an_error(at in 0usize..10_000, bit in 0u8..8) {
            let ts = tensors(9, 3);
            let head = SnapshotHead::describe("s", "n", &[], &ts).unwrap();
            let mut bytes = put_bytes(&head, &ts);
            let at = at % bytes.len();
            bytes[at] ^= 1 << bit;
            prop_assert!(read_put(&bytes).is_err());
        }
    }

    #[test]
    fn clean_close_is_none_and_limits_come_before_allocation() {
        assert!(read_frame(&mut &[][..], peer(), 0).unwrap().is_none());
        let mut frame = Vec::new();
        write_frame(&mut frame, Kind::Put, b"", &[]).unwrap();
        // Declare a 1 TiB data section: refused by the limit, nothing allocated.
        frame[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let e = read_frame(&mut frame.as_slice(), peer(), 1 << 30).unwrap_err();
        assert!(
            matches!(e, Error::Limit { value, .. } if value == 1 << 40),
            "{e}"
        );
        // And a head over MAX_HEAD_BYTES.
        frame[8..16].copy_from_slice(&(MAX_HEAD_BYTES + 1).to_le_bytes());
        let e = read_frame(&mut frame.as_slice(), peer(), u64::MAX).unwrap_err();
        assert!(matches!(e, Error::Limit { .. }), "{e}");
        // Data on a kind that carries none.
        let mut flush = Vec::new();
        write_frame(&mut flush, Kind::Flush, b"", &[]).unwrap();
        flush[16..24].copy_from_slice(&8u64.to_le_bytes());
        let e = read_frame(&mut flush.as_slice(), peer(), u64::MAX).unwrap_err();
        assert!(matches!(e, Error::Malformed { .. }), "{e}");
    }

    #[test]
    fn describe_refuses_what_the_keeper_would() {
        let mut ts = tensors(1, 2);
        ts[1].name = "t0".into();
        assert!(matches!(
            SnapshotHead::describe("s", "n", &[], &ts),
            Err(Error::InvalidTensor { .. })
        ));
        let mut ts = tensors(1, 1);
        ts[0].data.push(0);
        assert!(SnapshotHead::describe("s", "n", &[], &ts).is_err());
    }
}
