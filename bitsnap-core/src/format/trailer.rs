//! The trailer: the last [`TRAILER_BYTES`] of a snapshot file, which locate the header.

use std::path::Path;

use super::{END_MAGIC, MAX_HEADER_BYTES, PREAMBLE_BYTES, TRAILER_BYTES};
use crate::Error;

/// A parsed, checked trailer (FORMAT.md 2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// Absolute offset of the header region.
    pub header_offset: u64,
    /// Length of the stored header region.
    pub header_len: u64,
    /// xxh3 of the stored header region.
    pub header_hash: u64,
}

impl Trailer {
    /// Parses the trailer `bytes` (the last [`TRAILER_BYTES`] of `file`, whose size is
    /// `file_len`) and checks it: end magic, header length limit, and that the header
    /// region starts after the preamble and ends exactly where the trailer starts.
    ///
    /// ```
    /// use bitsnap_core::format::{Trailer, TRAILER_BYTES};
    /// let t = Trailer { header_offset: 16, header_len: 10, header_hash: 7 };
    /// let bytes = t.encode();
    /// assert_eq!(bytes.len(), TRAILER_BYTES);
    /// let len = 16 + 10 + TRAILER_BYTES as u64;
    /// assert_eq!(Trailer::parse(&bytes, len, "x.bsnap".as_ref()).unwrap(), t);
    /// ```
    pub fn parse(bytes: &[u8], file_len: u64, file: &Path) -> Result<Trailer, Error> {
        let t_at = file_len
            .checked_sub(TRAILER_BYTES as u64)
            .filter(|&t| t >= PREAMBLE_BYTES as u64)
            .ok_or_else(|| Error::Truncated {
                file: file.to_path_buf(),
                offset: file_len,
                what: "trailer".into(),
            })?;
        let word = |i: usize| {
            bytes
                .get(i * 8..i * 8 + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
        };
        let (Some(h_at), Some(h_len), Some(h_hash)) = (word(0), word(1), word(2)) else {
            return Err(Error::Truncated {
                file: file.to_path_buf(),
                offset: file_len,
                what: "trailer".into(),
            });
        };
        if bytes.len() != TRAILER_BYTES || bytes.get(24..32) != Some(&END_MAGIC[..]) {
            return Err(Error::Truncated {
                file: file.to_path_buf(),
                offset: file_len,
                what: "trailer (no end marker: the file is incomplete or cut short)".into(),
            });
        }
        if h_len > MAX_HEADER_BYTES {
            return Err(Error::Limit {
                file: file.to_path_buf(),
                what: "header length",
                value: h_len,
                limit: MAX_HEADER_BYTES,
            });
        }
        if h_at.checked_add(h_len) != Some(t_at) || h_at < PREAMBLE_BYTES as u64 {
            return Err(Error::Malformed {
                file: file.to_path_buf(),
                tensor: None,
                what: "trailer",
                offset: t_at,
                reason: format!(
                    "header at {h_at} of {h_len} bytes does not end where the trailer starts"
                ),
            });
        }
        Ok(Trailer {
            header_offset: h_at,
            header_len: h_len,
            header_hash: h_hash,
        })
    }

    /// The trailer's bytes.
    pub fn encode(&self) -> [u8; TRAILER_BYTES] {
        let mut out = [0u8; TRAILER_BYTES];
        out[..8].copy_from_slice(&self.header_offset.to_le_bytes());
        out[8..16].copy_from_slice(&self.header_len.to_le_bytes());
        out[16..24].copy_from_slice(&self.header_hash.to_le_bytes());
        out[24..].copy_from_slice(&END_MAGIC);
        out
    }

    /// Offset of the trailer itself (where the header region ends).
    pub fn offset(&self) -> u64 {
        self.header_offset + self.header_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let p = Path::new("t.bsnap");
        let t = Trailer {
            header_offset: 20,
            header_len: 5,
            header_hash: 0xabc,
        };
        let len = t.offset() + TRAILER_BYTES as u64;
        assert_eq!(Trailer::parse(&t.encode(), len, p).unwrap(), t);
        // Oversize header: a limit, not a malformed trailer (the shard reader's old copy
        // of this code said `Malformed`).
        let big = Trailer {
            header_len: MAX_HEADER_BYTES + 1,
            ..t
        };
        assert!(matches!(
            Trailer::parse(&big.encode(), len, p),
            Err(Error::Limit { .. })
        ));
        let mut cut = t.encode();
        cut[31] ^= 1;
        assert!(matches!(
            Trailer::parse(&cut, len, p),
            Err(Error::Truncated { .. })
        ));
        assert!(matches!(
            Trailer::parse(&t.encode(), len + 1, p),
            Err(Error::Malformed { .. })
        ));
        assert!(matches!(
            Trailer::parse(&t.encode(), 40, p),
            Err(Error::Truncated { .. })
        ));
    }
}
