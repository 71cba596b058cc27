//! Byte planes: all first bytes of every element, then all second bytes, ... each plane
//! entropy-coded on its own with zstd.
//!
//! Float tensors compress poorly as a whole because sign/exponent bytes (which repeat a
//! lot) are interleaved with mantissa bytes (which look random). Split into planes, the
//! high-byte plane compresses several times over while the noisy planes are stored raw.
//!
//! One planes section, for `n` elements of `w` bytes, is `w` plane records in order
//! (plane 0 = byte 0 of each little-endian element):
//!
//! | bytes | field |
//! |---|---|
//! | 1 | mode: 0 raw, 1 zstd, 2 constant |
//! | 4 | `len`: stored length, u32 LE |
//! | len | raw plane (`len = n`), zstd frame, or the constant byte (`len = 1`) |

use super::{Codec, CodecError, CodecId, Cursor, EncodeInput, Encoded, chunks};

/// The full (non-delta) lossless codec: the tensor in chunks, each chunk split into byte
/// planes, each plane zstd-coded. The baseline every other codec must beat.
///
/// ```
/// use bitsnap_core::codec::{self, Codec, CodecId, EncodeInput, Planes};
/// use bitsnap_core::{DType, Role};
/// let data: Vec<u8> = (0..1000u16).flat_map(|i| half::bf16::from_f32(i as f32 * 0.01).to_le_bytes()).collect();
/// let input = EncodeInput { dtype: DType::BF16, role: Role::Weight, data: &data, base: None };
/// let enc = Planes::default().encode(&input).unwrap().unwrap();
/// assert!(enc.payload.len() < data.len());
/// assert_eq!(codec::decode(CodecId::Planes, &enc.payload, DType::BF16, 1000, None).unwrap(), data);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Planes {
    /// zstd level; default [`super::DEFAULT_ZSTD_LEVEL`].
    pub level: i32,
}

impl Default for Planes {
    fn default() -> Self {
        Planes {
            level: super::DEFAULT_ZSTD_LEVEL,
        }
    }
}

impl Codec for Planes {
    fn id(&self) -> CodecId {
        CodecId::Planes
    }

    fn encode(&self, input: &EncodeInput<'_>) -> Result<Option<Encoded>, CodecError> {
        let w = input.dtype.size();
        let mut payload = Vec::new();
        encode_chunked(input.data, w, self.level, &mut payload, |range| {
            std::borrow::Cow::Borrowed(&input.data[range])
        })?;
        Ok(Some(Encoded {
            codec: CodecId::Planes,
            payload,
            lossy: None,
        }))
    }
}

/// Encodes `data` as a chunk stream whose chunk bodies are planes sections of
/// `prepare(byte range of the chunk)`.
pub(crate) fn encode_chunked<'a, F>(
    data: &'a [u8],
    width: usize,
    level: i32,
    out: &mut Vec<u8>,
    prepare: F,
) -> Result<(), CodecError>
where
    F: Fn(std::ops::Range<usize>) -> std::borrow::Cow<'a, [u8]> + Sync,
{
    let numel = data.len() / width;
    chunks::encode(numel, chunks::chunk_elems(width), out, |elems| {
        let bytes = prepare(elems.start * width..elems.end * width);
        let mut body = Vec::with_capacity(bytes.len() / 2 + 64);
        super::with_compressor(level, |c| encode(&bytes, width, c, &mut body))?;
        Ok(body)
    })
}

/// Decodes a [`Planes`] payload into `out`.
pub(crate) fn decode_into(payload: &[u8], width: usize, out: &mut [u8]) -> Result<(), CodecError> {
    let mut cur = Cursor::new(payload);
    let chunks = chunks::parse(&mut cur, out.len() / width)?;
    chunks::decode(&chunks, width, out, |chunk, part| {
        super::with_decompressor(|d| {
            let mut cur = Cursor::new(chunk.body);
            decode(&mut cur, width, d, part).map_err(|e| e.shifted(chunk.offset))?;
            cur.finish("planes").map_err(|e| e.shifted(chunk.offset))
        })
    })
}

/// Plane stored as is.
pub(crate) const PLANE_RAW: u8 = 0;
/// Plane stored as one zstd frame.
pub(crate) const PLANE_ZSTD: u8 = 1;
/// Every byte of the plane is the same; one byte stored.
pub(crate) const PLANE_CONST: u8 = 2;
/// Bytes of a plane record's fixed part.
#[cfg(test)]
pub(crate) const PLANE_RECORD_BYTES: usize = 5;

/// Splits `data` (elements of `width` bytes) into planes, written one after another into
/// `out` (same length as `data`).
pub(crate) fn split(data: &[u8], width: usize, out: &mut [u8]) {
    debug_assert_eq!(data.len(), out.len());
    let n = data.len() / width;
    if width == 1 {
        out.copy_from_slice(data);
        return;
    }
    match width {
        2 => split_fixed::<2>(data, n, out),
        4 => split_fixed::<4>(data, n, out),
        8 => split_fixed::<8>(data, n, out),
        _ => {
            for (i, elem) in data.chunks_exact(width).enumerate() {
                for (p, &b) in elem.iter().enumerate() {
                    out[p * n + i] = b;
                }
            }
        }
    }
}

fn split_fixed<const W: usize>(data: &[u8], n: usize, out: &mut [u8]) {
    let planes: [&mut [u8]; W] = split_mut_n::<W>(out, n);
    for (i, elem) in data.chunks_exact(W).enumerate() {
        for p in 0..W {
            planes[p][i] = elem[p];
        }
    }
}

/// Joins planes (as written by [`split`]) back into elements.
pub(crate) fn join(planes: &[u8], width: usize, out: &mut [u8]) {
    debug_assert_eq!(planes.len(), out.len());
    let n = planes.len() / width;
    if width == 1 {
        out.copy_from_slice(planes);
        return;
    }
    match width {
        2 => join_fixed::<2>(planes, n, out),
        4 => join_fixed::<4>(planes, n, out),
        8 => join_fixed::<8>(planes, n, out),
        _ => {
            for (i, elem) in out.chunks_exact_mut(width).enumerate() {
                for (p, b) in elem.iter_mut().enumerate() {
                    *b = planes[p * n + i];
                }
            }
        }
    }
}

fn join_fixed<const W: usize>(planes: &[u8], n: usize, out: &mut [u8]) {
    let src: [&[u8]; W] = std::array::from_fn(|p| &planes[p * n..(p + 1) * n]);
    for (i, elem) in out.chunks_exact_mut(W).enumerate() {
        for p in 0..W {
            elem[p] = src[p][i];
        }
    }
}

fn split_mut_n<const W: usize>(mut buf: &mut [u8], n: usize) -> [&mut [u8]; W] {
    std::array::from_fn(|_| {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(n);
        buf = tail;
        head
    })
}

/// Encodes `data` (elements of `width` bytes) as a planes section appended to `out`.
/// Each plane takes the smallest of constant, zstd at `level` and raw, so the section is
/// never more than `data.len() + 5 * width` bytes.
pub(crate) fn encode(
    data: &[u8],
    width: usize,
    compressor: &mut zstd::bulk::Compressor<'static>,
    out: &mut Vec<u8>,
) {
    let n = data.len() / width;
    let mut split_buf = vec![0u8; data.len()];
    split(data, width, &mut split_buf);
    for plane in split_buf.chunks(n.max(1)).take(width) {
        encode_plane(plane, compressor, out);
    }
    if n == 0 {
        // Empty input: `chunks` yields nothing, write `width` empty raw planes.
        for _ in 0..width {
            out.push(PLANE_RAW);
            out.extend_from_slice(&0u32.to_le_bytes());
        }
    }
}

/// Encodes one plane as a record appended to `out`.
pub(crate) fn encode_plane(
    plane: &[u8],
    compressor: &mut zstd::bulk::Compressor<'static>,
    out: &mut Vec<u8>,
) {
    if let Some(&first) = plane.first()
        && plane.len() > 1
        && plane.iter().all(|&b| b == first)
    {
        out.push(PLANE_CONST);
        out.extend_from_slice(&1u32.to_le_bytes());
        out.push(first);
        return;
    }
    let start = out.len();
    out.push(PLANE_ZSTD);
    out.extend_from_slice(&0u32.to_le_bytes());
    let body = out.len();
    // Room for the worst case, so a frame larger than the plane is detected, not an error.
    out.resize(body + zstd::zstd_safe::compress_bound(plane.len()), 0);
    match compressor.compress_to_buffer(plane, &mut out[body..]) {
        Ok(len) if len < plane.len() => {
            out.truncate(body + len);
            out[start + 1..body].copy_from_slice(&(len as u32).to_le_bytes());
        }
        _ => {
            out.truncate(start);
            out.push(PLANE_RAW);
            out.extend_from_slice(&(plane.len() as u32).to_le_bytes());
            out.extend_from_slice(plane);
        }
    }
}

/// Decodes one plane record from `cur` into `out` (whose length is the plane's).
pub(crate) fn decode_plane(
    cur: &mut Cursor<'_>,
    decompressor: &mut zstd::bulk::Decompressor<'static>,
    out: &mut [u8],
) -> Result<(), CodecError> {
    let at = cur.offset();
    let mode = cur.u8("plane mode")?;
    let len = cur.u32("plane length")? as usize;
    let body = cur.bytes(len, "plane bytes")?;
    match mode {
        PLANE_RAW => {
            if len != out.len() {
                return Err(CodecError::new(
                    at,
                    format!("raw plane of {len} bytes, {} expected", out.len()),
                ));
            }
            out.copy_from_slice(body);
        }
        PLANE_CONST => {
            let &[b] = body else {
                return Err(CodecError::new(at, "constant plane must hold one byte"));
            };
            out.fill(b);
        }
        PLANE_ZSTD => {
            let written = decompressor
                .decompress_to_buffer(body, out)
                .map_err(|e| CodecError::new(at, format!("zstd: {e}")))?;
            if written != out.len() {
                return Err(CodecError::new(
                    at,
                    format!(
                        "zstd plane decoded to {written} bytes, {} expected",
                        out.len()
                    ),
                ));
            }
        }
        other => return Err(CodecError::new(at, format!("unknown plane mode {other}"))),
    }
    Ok(())
}

/// Decodes a planes section from `cur` into `out` (elements of `width` bytes).
pub(crate) fn decode(
    cur: &mut Cursor<'_>,
    width: usize,
    decompressor: &mut zstd::bulk::Decompressor<'static>,
    out: &mut [u8],
) -> Result<(), CodecError> {
    let n = out.len() / width;
    let mut planes = vec![0u8; out.len()];
    if n == 0 {
        for _ in 0..width {
            decode_plane(cur, decompressor, &mut [])?;
        }
        return Ok(());
    }
    for plane in planes.chunks_mut(n) {
        decode_plane(cur, decompressor, plane)?;
    }
    join(&planes, width, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn split_join_round_trip(width in prop::sample::select(vec![1usize, 2, 3, 4, 8]), n in 0usize..300, seed in any::<u64>()) {
            let data: Vec<u8> = (0..n * width).map(|i| (seed.wrapping_mul(i as u64 + 1) >> 13) as u8).collect();
            let mut planes = vec![0; data.len()];
            split(&data, width, &mut planes);
            let mut back = vec![0; data.len()];
            join(&planes, width, &mut back);
            prop_assert_eq!(back, data);
        }

        #[test]
        fn section_round_trip(width in prop::sample::select(vec![1usize, 2, 4, 8]), n in 0usize..2000, kind in 0u8..3, seed in any::<u64>()) {
            let data: Vec<u8> = (0..n * width).map(|i| match kind {
                0 => 0,
                1 => (i % 7) as u8,
                _ => (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_mul(i as u64 + 1) >> 29) as u8,
            }).collect();
            let mut c = zstd::bulk::Compressor::new(1).unwrap();
            let mut d = zstd::bulk::Decompressor::new().unwrap();
            let mut enc = Vec::new();
            encode(&data, width, &mut c, &mut enc);
            prop_assert!(enc.len() <= data.len() + PLANE_RECORD_BYTES * width);
            let mut back = vec![0; data.len()];
            let mut cur = Cursor::new(&enc);
            decode(&mut cur, width, &mut d, &mut back).unwrap();
            prop_assert_eq!(cur.remaining(), 0);
            prop_assert_eq!(back, data);
        }
    }
}
