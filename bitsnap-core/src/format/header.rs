//! The header (tensor index): encoding of versions 1 and 2 and the checked parser.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;

use super::*;
use crate::Error;
use crate::codec::{CodecError, Cursor};
use crate::tensor::byte_len;

/// A parsed extension record: kind, flags, data.
type Extension<'a> = (u16, u8, &'a [u8]);

impl Header {
    /// Serialises the header body in the current format ([`VERSION`]).
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
        out.extend_from_slice(&self.attempt.to_le_bytes());
        // Header extension area: empty in this version of the writer.
        out.extend_from_slice(&0u32.to_le_bytes());
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
            let mut ext = Vec::new();
            if !e.references.is_empty() {
                let mut data = Vec::new();
                let refs = &e.references[..e.references.len().min(MAX_REFERENCES)];
                data.extend_from_slice(&(refs.len() as u16).to_le_bytes());
                for r in refs {
                    data.push(r.scope.tag());
                    put_str16(&mut data, &r.name);
                }
                put_extension(&mut ext, EXT_REFERENCES, EXTENSION_REQUIRED, &data);
            }
            out.extend_from_slice(&(ext.len() as u32).to_le_bytes());
            out.extend_from_slice(&ext);
        }
        out
    }

    /// Parses a header body of the current format ([`VERSION`]) read from `file` at
    /// `offset`, checking every field.
    pub fn parse(body: &[u8], file: &Path, offset: u64) -> Result<Header, Error> {
        Header::parse_version(body, VERSION, file, offset)
    }

    /// Parses a header body of format `version` (1 or 2: the preamble's) read from
    /// `file` at `offset`, checking every field: limits, tags, shapes, unique names, and
    /// in version 2 the extension areas (unknown required extensions are refused) and the
    /// references (to existing tensors of the same dtype and shape, without cycles).
    pub fn parse_version(
        body: &[u8],
        version: u16,
        file: &Path,
        offset: u64,
    ) -> Result<Header, Error> {
        if version == 0 || version > VERSION {
            return Err(Error::UnsupportedVersion {
                file: file.to_path_buf(),
                version,
                supported: VERSION,
            });
        }
        let v2 = version >= 2;
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
        if v2 {
            h.attempt = cur.u64("attempt").map_err(|e| malformed(e, None))?;
            let area = extension_area(&mut cur, "header").map_err(|e| malformed(e, None))?;
            // No header-level extension is defined yet: optional ones are skipped,
            // required ones refused.
            check_known(&area, &[]).map_err(|e| malformed(e, None))?;
        }
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
        let mut names = HashSet::new();
        let mut ref_at = Vec::with_capacity(entries.capacity());
        for _ in 0..count {
            let start = cur.offset();
            let name = get_str16(&mut cur).map_err(|e| malformed(e, None))?;
            let mut e =
                parse_entry(&mut cur, name.clone()).map_err(|e| malformed(e, Some(&name)))?;
            byte_len(&e.name, e.dtype, &e.shape)
                .map_err(|err| malformed(CodecError::new(start, err.to_string()), Some(&name)))?;
            if !names.insert(e.name.clone()) {
                return Err(malformed(
                    CodecError::new(start, "duplicate tensor name"),
                    Some(&name),
                ));
            }
            ref_at.push(cur.offset());
            if v2 {
                e.references = entry_extensions(&mut cur).map_err(|e| malformed(e, Some(&name)))?;
            }
            entries.push(e);
        }
        cur.finish("the tensor index")
            .map_err(|e| malformed(e, None))?;
        h.entries = entries;
        h.check_references().map_err(|(i, reason)| {
            let name = h.entries.get(i).map(|e| e.name.as_str());
            malformed(
                CodecError::new(ref_at.get(i).copied().unwrap_or(0), reason),
                name,
            )
        })?;
        Ok(h)
    }

    /// Order in which a reader decodes the entries: every entry after the entries of
    /// this snapshot it references, otherwise in header order (FORMAT.md 2.7). Parsed
    /// headers have no reference cycles; entries of a hand-built header caught in one
    /// come last, in header order.
    pub fn decode_order(&self) -> Vec<usize> {
        self.topological().0
    }

    /// The first entry (in header order) caught in or behind a reference cycle.
    fn stuck_entry(&self) -> Option<usize> {
        let (order, placed) = self.topological_placed();
        order.get(placed).copied()
    }

    /// Kahn's algorithm over same-snapshot references, smallest index first; returns the
    /// order and whether every entry was placed (no cycle).
    fn topological(&self) -> (Vec<usize>, bool) {
        let (order, placed) = self.topological_placed();
        let complete = placed == order.len();
        (order, complete)
    }

    /// The order and how many entries of it were placed before a cycle stopped the
    /// sort (the rest follow in header order).
    fn topological_placed(&self) -> (Vec<usize>, usize) {
        let index: HashMap<&str, usize> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.as_str(), i))
            .collect();
        let n = self.entries.len();
        let mut waiting = vec![0usize; n];
        let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, e) in self.entries.iter().enumerate() {
            for r in e
                .references
                .iter()
                .filter(|r| r.scope == RefScope::Snapshot)
            {
                if let Some(&j) = index.get(r.name.as_str()) {
                    waiting[i] += 1;
                    users[j].push(i);
                }
            }
        }
        let mut ready: std::collections::BTreeSet<usize> =
            (0..n).filter(|&i| waiting[i] == 0).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for &u in &users[i] {
                waiting[u] -= 1;
                if waiting[u] == 0 {
                    ready.insert(u);
                }
            }
        }
        let placed = order.len();
        if placed < n {
            let done: HashSet<usize> = order.iter().copied().collect();
            order.extend((0..n).filter(|i| !done.contains(i)));
        }
        (order, placed)
    }

    /// Same-snapshot references name another entry of the same dtype and shape, and
    /// form no cycle. Fails with the index of the offending entry.
    fn check_references(&self) -> Result<(), (usize, String)> {
        let index: HashMap<&str, &Entry> =
            self.entries.iter().map(|e| (e.name.as_str(), e)).collect();
        for (i, e) in self.entries.iter().enumerate() {
            // Reference codecs read their number of tensors (a cast and a copy one, a
            // replay two); a cast reads an f32 one.
            let want = e.codec.reference_count();
            if e.codec.needs_reference() && e.references.len() != want {
                let count = match want {
                    1 => "exactly one reference".to_string(),
                    n => format!("exactly {n} references"),
                };
                return Err((
                    i,
                    format!(
                        "a {} payload needs {count}, it has {}",
                        e.codec,
                        e.references.len()
                    ),
                ));
            }
            let want_dtype = if e.codec == CodecId::Cast {
                DType::F32
            } else {
                e.dtype
            };
            for r in &e.references {
                if r.scope == RefScope::Base {
                    if self.base.is_none() {
                        return Err((
                            i,
                            format!(
                                "references base tensor `{}` but the snapshot has no base",
                                r.name
                            ),
                        ));
                    }
                    continue;
                }
                let Some(t) = index.get(r.name.as_str()) else {
                    return Err((
                        i,
                        format!(
                            "references tensor `{}`, which the snapshot does not have",
                            r.name
                        ),
                    ));
                };
                if t.name == e.name {
                    return Err((i, "references itself".into()));
                }
                if t.dtype != want_dtype || t.shape != e.shape {
                    return Err((
                        i,
                        format!(
                            "references tensor `{}` of dtype {} and shape {:?}; {} {:?} expected",
                            r.name, t.dtype, t.shape, want_dtype, e.shape
                        ),
                    ));
                }
            }
        }
        if !self.topological().1 {
            let first_stuck = self.stuck_entry().unwrap_or(0);
            return Err((first_stuck, "references form a cycle".into()));
        }
        Ok(())
    }
}

/// Reads a v2 extension area: `u32` length, then records of kind (u16), flags (u8),
/// length (u32) and data, tiling the area exactly.
fn extension_area<'a>(
    cur: &mut Cursor<'a>,
    what: &'static str,
) -> Result<Vec<Extension<'a>>, CodecError> {
    let at = cur.offset();
    let len = cur.u32("extension area length")? as u64;
    if len > MAX_EXTENSION_BYTES {
        return Err(CodecError::new(
            at,
            format!(
                "{what} extension area of {len} bytes, above the limit of {MAX_EXTENSION_BYTES}"
            ),
        ));
    }
    let area = cur.bytes(len as usize, "extension area")?;
    let mut inner = Cursor::new(area);
    let mut out = Vec::new();
    let mut kinds = HashSet::new();
    while inner.remaining() > 0 {
        let rec = at + 4 + inner.offset();
        let kind = inner.u16("extension kind").map_err(|e| shift(e, at + 4))?;
        let flags = inner.u8("extension flags").map_err(|e| shift(e, at + 4))?;
        let n = inner
            .u32("extension length")
            .map_err(|e| shift(e, at + 4))? as usize;
        let data = inner
            .bytes(n, "extension data")
            .map_err(|e| shift(e, at + 4))?;
        if flags & !EXTENSION_REQUIRED != 0 {
            return Err(CodecError::new(
                rec,
                format!("extension {kind} has unknown flags {flags:#04x}"),
            ));
        }
        if !kinds.insert(kind) {
            return Err(CodecError::new(
                rec,
                format!("extension {kind} appears twice"),
            ));
        }
        out.push((kind, flags, data));
    }
    Ok(out)
}

fn shift(e: CodecError, by: usize) -> CodecError {
    CodecError::new(e.offset + by, e.reason)
}

/// Refuses required extensions whose kind is not in `known`.
fn check_known(area: &[Extension<'_>], known: &[u16]) -> Result<(), CodecError> {
    match area
        .iter()
        .find(|(kind, flags, _)| flags & EXTENSION_REQUIRED != 0 && !known.contains(kind))
    {
        Some((kind, _, _)) => Err(CodecError::new(
            0,
            format!(
                "requires extension {kind}, which this build does not know (a newer writer made it)"
            ),
        )),
        None => Ok(()),
    }
}

/// Reads an entry's v2 extension area; returns its references.
fn entry_extensions(cur: &mut Cursor<'_>) -> Result<Vec<Reference>, CodecError> {
    let at = cur.offset();
    let area = extension_area(cur, "entry")?;
    check_known(&area, &[EXT_REFERENCES]).map_err(|e| shift(e, at))?;
    let Some((_, _, data)) = area.iter().find(|(k, _, _)| *k == EXT_REFERENCES) else {
        return Ok(Vec::new());
    };
    let mut c = Cursor::new(data);
    let n = c.u16("reference count").map_err(|e| shift(e, at))? as usize;
    if n == 0 || n > MAX_REFERENCES {
        return Err(CodecError::new(
            at,
            format!("{n} references (1 to {MAX_REFERENCES})"),
        ));
    }
    let mut refs = Vec::with_capacity(n);
    let mut seen = HashSet::new();
    for _ in 0..n {
        let tag = c.u8("reference scope").map_err(|e| shift(e, at))?;
        let scope = RefScope::from_tag(tag)
            .ok_or_else(|| CodecError::new(at, format!("unknown reference scope {tag}")))?;
        let name = get_str16(&mut c).map_err(|e| shift(e, at))?;
        let r = Reference { scope, name };
        if !seen.insert(r.clone()) {
            return Err(CodecError::new(
                at,
                format!("references `{}` twice", r.name),
            ));
        }
        refs.push(r);
    }
    c.finish("the references").map_err(|e| shift(e, at))?;
    Ok(refs)
}

fn put_extension(out: &mut Vec<u8>, kind: u16, flags: u8, data: &[u8]) {
    out.extend_from_slice(&kind.to_le_bytes());
    out.push(flags);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
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
        references: Vec::new(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::CodecId;

    fn entry(name: &str, refs: &[(RefScope, &str)]) -> Entry {
        Entry {
            name: name.into(),
            dtype: DType::F32,
            role: Role::Weight,
            codec: CodecId::Planes,
            shape: vec![4],
            offset: 0,
            len: 0,
            payload_hash: 0,
            raw_hash: 0,
            decision: Decision::default(),
            references: refs
                .iter()
                .map(|&(scope, n)| Reference {
                    scope,
                    name: n.into(),
                })
                .collect(),
        }
    }

    fn parse(h: &Header) -> Result<Header, Error> {
        Header::parse(&h.encode(), Path::new("h.bsnap"), 0)
    }

    fn reason(r: Result<Header, Error>) -> (Option<String>, String) {
        match r {
            Err(Error::Malformed { tensor, reason, .. }) => (tensor, reason),
            other => panic!("expected a malformed header, got {other:?}"),
        }
    }

    #[test]
    fn references_round_trip_and_order_decoding() {
        let h = Header {
            id: 3,
            attempt: 42,
            base: Some(BaseRef {
                id: 2,
                state_hash: 9,
            }),
            entries: vec![
                entry("c", &[(RefScope::Snapshot, "b"), (RefScope::Base, "c")]),
                entry("b", &[(RefScope::Snapshot, "a")]),
                entry("a", &[]),
            ],
            ..Header::default()
        };
        let back = parse(&h).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.decode_order(), vec![2, 1, 0]);
    }

    #[test]
    fn bad_references_are_refused_naming_the_tensor() {
        let one = |entries: Vec<Entry>| Header {
            entries,
            ..Header::default()
        };
        let cycle = one(vec![
            entry("a", &[(RefScope::Snapshot, "b")]),
            entry("b", &[(RefScope::Snapshot, "a")]),
        ]);
        assert_eq!(
            reason(parse(&cycle)),
            (Some("a".into()), "references form a cycle".into())
        );
        let own = one(vec![entry("a", &[(RefScope::Snapshot, "a")])]);
        assert_eq!(reason(parse(&own)).1, "references itself");
        let missing = one(vec![entry("a", &[(RefScope::Snapshot, "zz")])]);
        assert!(reason(parse(&missing)).1.contains("`zz`"));
        let no_base = one(vec![entry("a", &[(RefScope::Base, "a")])]);
        assert!(reason(parse(&no_base)).1.contains("no base"));
        let mut other_shape = entry("b", &[]);
        other_shape.shape = vec![5];
        let shape = one(vec![entry("a", &[(RefScope::Snapshot, "b")]), other_shape]);
        assert_eq!(reason(parse(&shape)).0.as_deref(), Some("a"));
    }

    #[test]
    fn reference_codecs_need_one_reference_of_the_right_dtype() {
        let one = |entries: Vec<Entry>| Header {
            entries,
            ..Header::default()
        };
        let with = |name: &str, dtype, codec, refs: &[(RefScope, &str)]| Entry {
            dtype,
            codec,
            ..entry(name, refs)
        };
        let master = entry("master", &[]);
        // A bf16 cast of an f32 tensor, and a bf16 copy of the cast: fine, cast first.
        let good = one(vec![
            with(
                "copy",
                DType::BF16,
                CodecId::Identical,
                &[(RefScope::Snapshot, "half")],
            ),
            with(
                "half",
                DType::BF16,
                CodecId::Cast,
                &[(RefScope::Snapshot, "master")],
            ),
            master.clone(),
        ]);
        assert_eq!(parse(&good).unwrap().decode_order(), vec![2, 1, 0]);
        // A cast of a bf16 tensor, an identical f32 copy of a bf16 tensor: wrong dtype.
        let half = with("half", DType::BF16, CodecId::Planes, &[]);
        let bad_cast = one(vec![
            with(
                "x",
                DType::BF16,
                CodecId::Cast,
                &[(RefScope::Snapshot, "half")],
            ),
            half.clone(),
        ]);
        let (tensor, why) = reason(parse(&bad_cast));
        assert_eq!(tensor.as_deref(), Some("x"));
        assert!(
            why.contains("dtype bf16") && why.contains("f32 [4] expected"),
            "{why}"
        );
        let bad_copy = one(vec![
            with(
                "x",
                DType::F32,
                CodecId::Identical,
                &[(RefScope::Snapshot, "half")],
            ),
            half,
        ]);
        assert!(reason(parse(&bad_copy)).1.contains("f32 [4] expected"));
        // No reference, two references.
        let none = one(vec![
            with("x", DType::BF16, CodecId::Cast, &[]),
            master.clone(),
        ]);
        assert!(
            reason(parse(&none))
                .1
                .contains("exactly one reference, it has 0")
        );
        let two = one(vec![
            with(
                "x",
                DType::F32,
                CodecId::Identical,
                &[(RefScope::Snapshot, "master"), (RefScope::Snapshot, "m2")],
            ),
            master,
            entry("m2", &[]),
        ]);
        assert!(reason(parse(&two)).1.contains("it has 2"));
    }

    #[test]
    fn unknown_extensions_required_are_refused_optional_skipped() {
        let h = Header {
            entries: vec![entry("t", &[])],
            ..Header::default()
        };
        let body = h.encode();
        // The entry's extension area is the last 4 bytes (empty).
        let with = |flags: u8| {
            let mut b = body[..body.len() - 4].to_vec();
            let mut area = Vec::new();
            put_extension(&mut area, 99, flags, b"xyz");
            b.extend_from_slice(&(area.len() as u32).to_le_bytes());
            b.extend_from_slice(&area);
            Header::parse(&b, Path::new("h.bsnap"), 0)
        };
        assert_eq!(with(0).unwrap(), h);
        let (tensor, why) = reason(with(EXTENSION_REQUIRED));
        assert_eq!(tensor.as_deref(), Some("t"));
        assert!(why.contains("requires extension 99"), "{why}");
        assert!(reason(with(0x80)).1.contains("unknown flags"));
    }

    #[test]
    fn unknown_codec_tags_are_refused_naming_the_tensor() {
        let h = Header {
            entries: vec![entry("t", &[])],
            ..Header::default()
        };
        let mut body = h.encode();
        // id, name, base, attempt, header area, metadata and tensor counts, entry name
        // "t", dtype, role: then the codec tag.
        let at = 8 + 2 + 17 + 8 + 4 + 4 + 4 + 3 + 2;
        assert_eq!(body[at], CodecId::Planes.tag());
        body[at] = 0xee;
        let (tensor, why) = reason(Header::parse(&body, Path::new("h.bsnap"), 0));
        assert_eq!(tensor.as_deref(), Some("t"));
        assert!(why.contains("unknown codec tag 238"), "{why}");
    }

    #[test]
    fn version_1_bodies_have_no_attempt_or_extensions() {
        let h = Header {
            id: 1,
            name: "n".into(),
            entries: vec![entry("t", &[])],
            ..Header::default()
        };
        let v2 = h.encode();
        // v1: drop the attempt and header area (after id, name and base), and the
        // entry's area (the last 4 bytes).
        let at = 8 + 2 + 1 + 17;
        let mut v1 = v2[..at].to_vec();
        v1.extend_from_slice(&v2[at + 12..v2.len() - 4]);
        let p = Path::new("h.bsnap");
        assert_eq!(Header::parse_version(&v1, 1, p, 0).unwrap(), h);
        assert!(Header::parse_version(&v1, 2, p, 0).is_err());
        assert!(matches!(
            Header::parse_version(&v2, 3, p, 0),
            Err(Error::UnsupportedVersion { version: 3, .. })
        ));
    }
}
