//! The chunk stream: how every codec splits a tensor into independently coded chunks so
//! that encoding and decoding use all cores.
//!
//! | bytes | field |
//! |---|---|
//! | 4 | `chunk_elems`: elements per chunk (the last may hold fewer), u32 LE, 1 ..= [`MAX_CHUNK_BYTES`] |
//! | 4 | `count`: number of chunks, u32 LE, = ceil(numel / chunk_elems) |
//! | 4 × count | byte length of each chunk body, u32 LE |
//! | … | chunk bodies, back to back, tiling the rest of the section exactly |

use std::ops::Range;

use rayon::prelude::*;

use super::{CodecError, Cursor};

/// Target raw bytes per chunk (1 MiB).
pub const CHUNK_BYTES: usize = 1 << 20;
/// Largest chunk a reader accepts, in elements (2^26; writers use 1 MiB of raw bytes).
/// With a few bytes needed per chunk body, this bounds how much output a payload of a
/// given size can demand.
pub const MAX_CHUNK_BYTES: usize = 64 << 20;

/// Elements per chunk for elements of `width` bytes.
pub(crate) fn chunk_elems(width: usize) -> usize {
    (CHUNK_BYTES / width.max(1)).max(1)
}

/// Encodes `numel` elements in chunks of `chunk_elems`, calling `body` (in parallel) for
/// each chunk's element range, and appends the chunk stream to `out`.
pub(crate) fn encode<F>(
    numel: usize,
    chunk_elems: usize,
    out: &mut Vec<u8>,
    body: F,
) -> Result<(), CodecError>
where
    F: Fn(Range<usize>) -> Result<Vec<u8>, CodecError> + Sync,
{
    let count = numel.div_ceil(chunk_elems);
    let bodies: Vec<Vec<u8>> = (0..count)
        .into_par_iter()
        .map(|c| body(c * chunk_elems..((c + 1) * chunk_elems).min(numel)))
        .collect::<Result<_, _>>()?;
    out.reserve(8 + 4 * count + bodies.iter().map(Vec::len).sum::<usize>());
    out.extend_from_slice(&(chunk_elems as u32).to_le_bytes());
    out.extend_from_slice(&(count as u32).to_le_bytes());
    for b in &bodies {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    }
    for b in &bodies {
        out.extend_from_slice(b);
    }
    Ok(())
}

/// One chunk to decode: its body, where the body starts in the section, its element range.
pub(crate) struct Chunk<'a> {
    /// The chunk body.
    pub body: &'a [u8],
    /// Offset of the body from the start of the payload (for error messages).
    pub offset: usize,
    /// Elements of the tensor this chunk covers.
    pub elems: Range<usize>,
}

/// Parses a chunk stream from `cur` (consuming it to its end) for `numel` elements.
pub(crate) fn parse<'a>(cur: &mut Cursor<'a>, numel: usize) -> Result<Vec<Chunk<'a>>, CodecError> {
    let at = cur.offset();
    let chunk_elems = cur.u32("chunk size")? as usize;
    let count = cur.u32("chunk count")? as usize;
    if chunk_elems == 0 {
        return Err(CodecError::new(at, "chunk size is 0"));
    }
    if chunk_elems > MAX_CHUNK_BYTES {
        return Err(CodecError::new(
            at,
            format!("chunks of {chunk_elems} elements, above the limit of {MAX_CHUNK_BYTES}"),
        ));
    }
    if count != numel.div_ceil(chunk_elems) {
        return Err(CodecError::new(
            at,
            format!("{count} chunks of {chunk_elems} elements cannot hold {numel} elements"),
        ));
    }
    // `count` is now bounded by `numel`, itself bounded by the tensor size limit; the
    // length table must also fit in what is left.
    if count.checked_mul(4).is_none_or(|b| b > cur.remaining()) {
        return Err(CodecError::new(at, "chunk table runs past the payload"));
    }
    let mut lens = Vec::with_capacity(count);
    for _ in 0..count {
        lens.push(cur.u32("chunk length")? as usize);
    }
    let total: usize = lens.iter().sum();
    if total != cur.remaining() {
        return Err(CodecError::new(
            cur.offset(),
            format!(
                "chunk lengths add up to {total} bytes but {} remain",
                cur.remaining()
            ),
        ));
    }
    let mut chunks = Vec::with_capacity(count);
    for (c, len) in lens.into_iter().enumerate() {
        let offset = cur.offset();
        let body = cur.bytes(len, "chunk body")?;
        chunks.push(Chunk {
            body,
            offset,
            elems: c * chunk_elems..((c + 1) * chunk_elems).min(numel),
        });
    }
    Ok(chunks)
}

/// Decodes `chunks` in parallel into `out` (`width` bytes per element), calling `body`
/// with each chunk and the part of `out` it covers.
pub(crate) fn decode<F>(
    chunks: &[Chunk<'_>],
    width: usize,
    out: &mut [u8],
    body: F,
) -> Result<(), CodecError>
where
    F: Fn(&Chunk<'_>, &mut [u8]) -> Result<(), CodecError> + Sync,
{
    let mut parts = Vec::with_capacity(chunks.len());
    let mut rest = out;
    for chunk in chunks {
        let (head, tail) = rest.split_at_mut(chunk.elems.len() * width);
        parts.push((chunk, head));
        rest = tail;
    }
    parts
        .into_par_iter()
        .try_for_each(|(chunk, part)| body(chunk, part))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_inconsistent_tables() {
        let mut out = Vec::new();
        encode(10, 4, &mut out, |r| Ok(vec![r.len() as u8])).unwrap();
        let mut cur = Cursor::new(&out);
        let chunks = parse(&mut cur, 10).unwrap();
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[2].elems, 8..10);
        // Wrong element count.
        assert!(parse(&mut Cursor::new(&out), 13).is_err());
        // Truncated.
        assert!(parse(&mut Cursor::new(&out[..out.len() - 1]), 10).is_err());
        // Trailing garbage.
        let mut longer = out.clone();
        longer.push(0);
        assert!(parse(&mut Cursor::new(&longer), 10).is_err());
        // Zero chunk size.
        let mut zero = out.clone();
        zero[..4].copy_from_slice(&0u32.to_le_bytes());
        assert!(parse(&mut Cursor::new(&zero), 10).is_err());
    }
}
