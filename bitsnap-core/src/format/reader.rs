//! [`SnapshotFile`]: a snapshot read into memory and checked; payloads borrowed from it.

use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

use super::{
    Entry, Header, MAGIC, PREAMBLE_BYTES, TRAILER_BYTES, Trailer, VERSION, decode_header_region,
};
use crate::Error;
use crate::codec::{CodecError, DeviceForm};

/// A snapshot file read into memory and checked: magic, version, trailer, header checksum,
/// header fields, and that the payloads tile the data section exactly. Payload checksums
/// are checked when a tensor is read.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// The parsed header.
    pub header: Header,
    version: u16,
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
        let (version, header) = SnapshotFile::check(&bytes, path)?;
        Ok(SnapshotFile {
            path: path.to_path_buf(),
            header,
            version,
            bytes,
        })
    }

    /// Checks the snapshot `bytes` (borrowed: a memory map works) and returns its format
    /// version and parsed header: magic, version, trailer ([`Trailer::parse`]), header
    /// checksum and fields, and that the payloads tile the data section exactly.
    pub fn check(bytes: &[u8], path: &Path) -> Result<(u16, Header), Error> {
        let file = path.to_path_buf();
        let len = bytes.len() as u64;
        let version = check_preamble(bytes, path)?;
        let t_at = (len as usize).saturating_sub(TRAILER_BYTES);
        let trailer = Trailer::parse(bytes.get(t_at..).unwrap_or_default(), len, path)?;
        let h_at = trailer.header_offset;
        let region = bytes
            .get(h_at as usize..t_at)
            .ok_or_else(|| Error::Truncated {
                file: file.clone(),
                offset: h_at,
                what: "header".into(),
            })?;
        let header = parse_region(region, &trailer, version, path)?;
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
        Ok((version, header))
    }

    /// The file's format version (1 or 2).
    pub fn version(&self) -> u16 {
        self.version
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

    /// Decodes `entry`, whose codec reads referenced tensors
    /// ([`CodecId::needs_reference`](crate::codec::CodecId::needs_reference)), given each
    /// referenced tensor's decoded dtype and bytes in the entry's reference order (`None`:
    /// it could not be found, an error naming the tensor) and, for codecs that also read
    /// the base (`replay`), the same tensor's decoded bytes in the base snapshot. The
    /// decoded data is checksum-verified.
    pub fn decode_referenced(
        &self,
        entry: &Entry,
        base: Option<&[u8]>,
        references: &[Option<(crate::DType, &[u8])>],
    ) -> Result<Vec<u8>, Error> {
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
        let mut found = Vec::with_capacity(references.len());
        for i in 0..entry.references.len().max(references.len()) {
            match references.get(i).copied().flatten() {
                Some(r) => found.push(r),
                None => {
                    let name = entry
                        .references
                        .get(i)
                        .map_or("(none)", |r| r.name.as_str());
                    return Err(self.malformed(
                        entry,
                        CodecError::new(
                            0,
                            format!(
                                "the tensor `{name}` its {} payload references is missing",
                                entry.codec
                            ),
                        ),
                    ));
                }
            }
        }
        let out = crate::codec::decode_with_references(
            entry.codec,
            payload,
            entry.dtype,
            numel,
            base,
            &found,
        )
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

/// Checks the preamble of `bytes`; returns the format version.
pub(crate) fn check_preamble(bytes: &[u8], path: &Path) -> Result<u16, Error> {
    let file = path.to_path_buf();
    let pre = bytes.get(..PREAMBLE_BYTES).ok_or_else(|| {
        if bytes.get(..8).is_some_and(|m| m != MAGIC) {
            Error::BadMagic { file: file.clone() }
        } else {
            Error::Truncated {
                file: file.clone(),
                offset: bytes.len() as u64,
                what: "preamble".into(),
            }
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
    Ok(version)
}

/// Checks the header region located by `trailer` against its checksum and parses it.
pub(crate) fn parse_region(
    region: &[u8],
    trailer: &Trailer,
    version: u16,
    path: &Path,
) -> Result<Header, Error> {
    let h_at = trailer.header_offset;
    let actual = xxh3_64(region);
    if actual != trailer.header_hash {
        return Err(Error::Checksum {
            file: path.to_path_buf(),
            tensor: None,
            what: "header",
            offset: h_at,
            expected: trailer.header_hash,
            actual,
        });
    }
    let body = decode_header_region(region, path, h_at)?;
    Header::parse_version(&body, version, path, h_at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::SnapshotWriter;

    #[test]
    fn borrowed_check_agrees_with_the_owned_reader() {
        let p = Path::new("r.bsnap");
        let w = SnapshotWriter::new(Vec::new(), p, 4, "r", None).unwrap();
        let (h, bytes) = w.finish().unwrap();
        assert_eq!(
            SnapshotFile::check(&bytes, p).unwrap(),
            (VERSION, h.clone())
        );
        assert_eq!(
            SnapshotFile::from_bytes(bytes.clone(), p).unwrap().header,
            h
        );
        assert!(matches!(
            SnapshotFile::check(&bytes[..bytes.len() - 1], p),
            Err(Error::Truncated { .. })
        ));
        let mut foreign = bytes;
        foreign[0] = b'X';
        assert!(matches!(
            check_preamble(&foreign, p),
            Err(Error::BadMagic { .. })
        ));
    }
}
