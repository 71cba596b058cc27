//! [`SnapshotWriter`]: streams payloads, then the header and trailer.

use std::io::Write;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

use super::{
    BaseRef, Entry, Header, MAGIC, MAX_HEADER_BYTES, MAX_METADATA, MAX_METADATA_VALUE_BYTES,
    MAX_REFERENCES, MAX_TENSORS, PREAMBLE_BYTES, Trailer, VERSION, encode_header_region,
};
use crate::Error;

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

    /// Sets the commit attempt nonce recorded in the header (shards of a sharded
    /// snapshot; default 0).
    pub fn set_attempt(&mut self, attempt: u64) {
        self.header.attempt = attempt;
    }

    /// Sets the base recorded in the header (written by [`SnapshotWriter::finish`], so
    /// it may be decided after the payloads are written).
    pub fn set_base(&mut self, base: Option<BaseRef>) {
        self.header.base = base;
    }

    /// Sets the string metadata.
    pub fn set_metadata(&mut self, metadata: Vec<(String, String)>) {
        self.header.metadata = metadata;
    }

    /// Appends one tensor's payload. `entry`'s offset, length and payload hash are filled in.
    pub fn push(&mut self, entry: Entry, payload: &[u8]) -> Result<(), Error> {
        self.push_hashed(entry, payload, xxh3_64(payload))
    }

    /// [`SnapshotWriter::push`] of a payload whose xxh3 the caller computed (in
    /// parallel with others): `payload_hash` must be `xxh3_64(payload)`, as readers
    /// check it.
    pub fn push_hashed(
        &mut self,
        mut entry: Entry,
        payload: &[u8],
        payload_hash: u64,
    ) -> Result<(), Error> {
        debug_assert_eq!(payload_hash, xxh3_64(payload));
        self.out
            .write_all(payload)
            .map_err(|e| Error::io(&self.path, e))?;
        entry.offset = self.pos;
        entry.len = payload.len() as u64;
        entry.payload_hash = payload_hash;
        self.pos += payload.len() as u64;
        self.header.entries.push(entry);
        Ok(())
    }

    /// Writes header and trailer; returns the header and the writer.
    pub fn finish(mut self) -> Result<(Header, W), Error> {
        let h = &self.header;
        let over = |what: String, value: usize, limit: u64| -> Result<(), Error> {
            if value as u64 > limit {
                return Err(Error::InputLimit {
                    what: format!("{}: {what}", self.path.display()),
                    value: value as u64,
                    limit,
                });
            }
            Ok(())
        };
        // What the reader would refuse must not be written.
        over(
            "metadata entry count".into(),
            h.metadata.len(),
            MAX_METADATA,
        )?;
        over("tensor count".into(), h.entries.len(), MAX_TENSORS)?;
        over(
            "snapshot name length".into(),
            h.name.len(),
            crate::MAX_NAME_BYTES as u64,
        )?;
        for (k, v) in &h.metadata {
            over(
                format!("metadata key `{k}` length"),
                k.len(),
                crate::MAX_NAME_BYTES as u64,
            )?;
            over(
                format!("metadata `{k}` value length"),
                v.len(),
                MAX_METADATA_VALUE_BYTES as u64,
            )?;
        }
        for e in &h.entries {
            over(
                format!("name length of tensor `{}`", e.name),
                e.name.len(),
                crate::MAX_NAME_BYTES as u64,
            )?;
            over(
                format!("references of tensor `{}`", e.name),
                e.references.len(),
                MAX_REFERENCES as u64,
            )?;
        }
        let raw = h.encode();
        over("header length".into(), raw.len(), MAX_HEADER_BYTES)?;
        let body = encode_header_region(&raw);
        let trailer = Trailer {
            header_offset: self.pos,
            header_len: body.len() as u64,
            header_hash: xxh3_64(&body),
        }
        .encode();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_reader_refuses_is_not_written() {
        let p = Path::new("w.bsnap");
        let long = "n".repeat(crate::MAX_NAME_BYTES + 1);
        let w = SnapshotWriter::new(Vec::new(), p, 1, &long, None).unwrap();
        assert!(matches!(
            w.finish(),
            Err(Error::InputLimit { value, .. }) if value == long.len() as u64
        ));
        let mut w = SnapshotWriter::new(Vec::new(), p, 1, "ok", None).unwrap();
        w.set_attempt(5);
        let (h, bytes) = w.finish().unwrap();
        let back = crate::format::SnapshotFile::from_bytes(bytes, p).unwrap();
        assert_eq!((back.version(), &back.header), (VERSION, &h));
    }
}
