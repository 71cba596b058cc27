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

use super::{Codec, CodecError, CodecId, Cursor, EncodeInput, Encoded, alloc, chunks};

/// The full (non-delta) lossless codec: the tensor in chunks, each chunk split into byte
/// planes, each plane zstd-coded. The baseline every other codec must beat.
///
/// ```
/// use bitsnap_core::codec::{self, Codec, CodecId, EncodeInput, Planes};
/// use bitsnap_core::{DType, Role};
/// let data: Vec<u8> = (0..1000u16).flat_map(|i| half::bf16::from_f32(i as f32 * 0.01).to_le_bytes()).collect();
/// let input = EncodeInput { shape: &[], dtype: DType::BF16, role: Role::Weight, data: &data, base: None };
/// let enc = Planes::default().encode(&input).unwrap().unwrap();
/// assert!(enc.payload.len() * 2 < data.len()); // measured 960 bytes of 2000
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
        encode_chunked(input.data, None, w, self.level, &mut payload)?;
        Ok(Some(Encoded {
            codec: CodecId::Planes,
            payload,
            lossy: None,
        }))
    }
}

/// Encodes `data` (or `data XOR base`, when a base is given) as a chunk stream whose
/// chunk bodies are planes sections.
pub(crate) fn encode_chunked(
    data: &[u8],
    base: Option<&[u8]>,
    width: usize,
    level: i32,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let numel = data.len() / width;
    chunks::encode(numel, chunks::chunk_elems(width), out, |elems| {
        let range = elems.start * width..elems.end * width;
        // Room for the worst case up front: the body never reallocates.
        let mut body = Vec::with_capacity(range.len() + PLANE_OVERHEAD * width);
        match base {
            Some(base) => XOR_SCRATCH.with(|x| {
                let mut x = x.borrow_mut();
                x.clear();
                x.extend(
                    data[range.clone()]
                        .iter()
                        .zip(&base[range])
                        .map(|(a, b)| a ^ b),
                );
                super::with_compressor(level, |c| encode(&x, width, c, &mut body))
            })?,
            None => super::with_compressor(level, |c| encode(&data[range], width, c, &mut body))?,
        }
        Ok(body)
    })
}

thread_local! {
    static XOR_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    static ZSTD_OUT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
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
/// Bytes of a plane record's fixed part: mode (1) and length (4).
pub(crate) const PLANE_OVERHEAD: usize = 5;

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
    let mut planes: [&mut [u8]; W] = split_mut_n::<W>(out, n);
    if let [p0, p1, p2, p3] = planes.as_mut_slice() {
        let it = data.chunks_exact(4).zip(p0.iter_mut()).zip(p1.iter_mut());
        for (((e, a), b), (c, d)) in it.zip(p2.iter_mut().zip(p3.iter_mut())) {
            (*a, *b, *c, *d) = (e[0], e[1], e[2], e[3]);
        }
    } else if let [p0, p1] = planes.as_mut_slice() {
        for ((e, a), b) in data.chunks_exact(2).zip(p0.iter_mut()).zip(p1.iter_mut()) {
            (*a, *b) = (e[0], e[1]);
        }
    } else {
        for (i, elem) in data.chunks_exact(W).enumerate() {
            for (plane, &b) in planes.iter_mut().zip(elem) {
                plane[i] = b;
            }
        }
    }
}

/// Joins planes (as written by [`split`]) back into elements.
#[cfg(test)]
pub(crate) fn join(planes: &[u8], width: usize, out: &mut [u8]) {
    let n = planes.len() / width;
    let slices: Vec<&[u8]> = (0..width).map(|p| &planes[p * n..(p + 1) * n]).collect();
    join_slices(&slices, out);
}

/// Interleaves `planes` (one slice per byte of the element, each as long as the element
/// count) into `out`.
pub(crate) fn join_slices(planes: &[&[u8]], out: &mut [u8]) {
    let w = planes.len();
    let n = out.len() / w.max(1);
    debug_assert!(planes.iter().all(|p| p.len() == n));
    match planes {
        [p0] => out.copy_from_slice(&p0[..n]),
        [p0, p1] => {
            let (p0, p1) = (&p0[..n], &p1[..n]);
            for (i, o) in out.chunks_exact_mut(2).enumerate() {
                o.copy_from_slice(&[p0[i], p1[i]]);
            }
        }
        [p0, p1, p2, p3] => {
            let (p0, p1, p2, p3) = (&p0[..n], &p1[..n], &p2[..n], &p3[..n]);
            for (i, o) in out.chunks_exact_mut(4).enumerate() {
                o.copy_from_slice(&[p0[i], p1[i], p2[i], p3[i]]);
            }
        }
        [p0, p1, p2, p3, p4, p5, p6, p7] => {
            let (p0, p1, p2, p3) = (&p0[..n], &p1[..n], &p2[..n], &p3[..n]);
            let (p4, p5, p6, p7) = (&p4[..n], &p5[..n], &p6[..n], &p7[..n]);
            for (i, o) in out.chunks_exact_mut(8).enumerate() {
                o.copy_from_slice(&[p0[i], p1[i], p2[i], p3[i], p4[i], p5[i], p6[i], p7[i]]);
            }
        }
        _ => {
            for (i, elem) in out.chunks_exact_mut(w).enumerate() {
                for (b, plane) in elem.iter_mut().zip(planes) {
                    *b = plane[i];
                }
            }
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
    if n == 0 {
        for _ in 0..width {
            out.push(PLANE_RAW);
            out.extend_from_slice(&0u32.to_le_bytes());
        }
        return;
    }
    let mut split_buf = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    split_buf.clear();
    split_buf.resize(data.len(), 0);
    split(data, width, &mut split_buf);
    for plane in split_buf.chunks(n) {
        encode_plane(plane, compressor, out);
    }
    SCRATCH.with(|s| *s.borrow_mut() = split_buf);
}

/// Order-0 entropy (bits per byte) above which a plane is stored raw without trying
/// zstd: at 7.9 bits zstd could save at most ~1%, and trying costs as much as the rest of
/// the encoder. Mantissa planes of float tensors are typically above it.
pub(crate) const INCOMPRESSIBLE_BITS_PER_BYTE: f64 = 7.9;

/// Estimated order-0 entropy of `plane` in bits per byte, from a sample of up to 64 KiB
/// taken in 256-byte runs spread over the plane.
fn entropy_estimate(plane: &[u8]) -> f64 {
    const RUN: usize = 256;
    const RUNS: usize = 256;
    let mut hist = [0u32; 256];
    let mut total = 0u32;
    let stride = (plane.len() / RUNS).max(RUN);
    for start in (0..plane.len()).step_by(stride) {
        for &b in &plane[start..(start + RUN).min(plane.len())] {
            hist[b as usize] += 1;
            total += 1;
        }
    }
    let t = f64::from(total.max(1));
    hist.iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / t;
            -p * p.log2()
        })
        .sum()
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
    // Only a plane large enough for the sample to speak for it is judged by its sample.
    let skip = plane.len() >= 4096 && entropy_estimate(plane) > INCOMPRESSIBLE_BITS_PER_BYTE;
    if !skip {
        // Compress into a reused buffer (no zero-filling, no page faults per plane).
        let packed = ZSTD_OUT.with(|z| {
            let mut z = z.borrow_mut();
            z.clear();
            z.reserve(zstd::zstd_safe::compress_bound(plane.len()));
            match compressor.compress_to_buffer(plane, &mut *z) {
                Ok(len) if len < plane.len() => {
                    out.push(PLANE_ZSTD);
                    out.extend_from_slice(&(len as u32).to_le_bytes());
                    out.extend_from_slice(&z[..len]);
                    true
                }
                _ => false,
            }
        });
        if packed {
            return;
        }
    }
    out.push(PLANE_RAW);
    out.extend_from_slice(&(plane.len() as u32).to_le_bytes());
    out.extend_from_slice(plane);
}

/// Checks a plane record of `n` bytes at `cur` without decoding it: its mode, its
/// length, and the size its zstd frame declares.
fn check_plane(cur: &mut Cursor<'_>, n: usize) -> Result<(), CodecError> {
    let at = cur.offset();
    let mode = cur.u8("plane mode")?;
    let len = cur.u32("plane length")? as usize;
    let body = cur.bytes(len, "plane bytes")?;
    match mode {
        PLANE_RAW if len != n => Err(CodecError::new(
            at,
            format!("raw plane of {len} bytes, {n} expected"),
        )),
        PLANE_CONST if len != 1 => Err(CodecError::new(at, "constant plane must hold one byte")),
        PLANE_ZSTD => check_frame(body, n, n, at).map(drop),
        PLANE_RAW | PLANE_CONST => Ok(()),
        other => Err(CodecError::new(at, format!("unknown plane mode {other}"))),
    }
}

/// Checks that the zstd frame `frame` declares a content size of `min..=max` bytes, if it
/// declares one (bitsnap's writers always do). Returns the declared size.
pub(crate) fn check_frame(
    frame: &[u8],
    min: usize,
    max: usize,
    at: usize,
) -> Result<Option<usize>, CodecError> {
    match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(None) => Ok(None),
        Ok(Some(size)) if size >= min as u64 && size <= max as u64 => Ok(Some(size as usize)),
        Ok(Some(size)) => Err(CodecError::new(
            at,
            format!("zstd frame declares {size} bytes, {min} to {max} expected"),
        )),
        Err(_) => Err(CodecError::new(at, "zstd: invalid frame header")),
    }
}

/// Checks a planes section of `n` elements of `width` bytes at `cur` without decoding
/// it: [`check_plane`] for each of its `width` plane records.
pub(crate) fn check_section(
    cur: &mut Cursor<'_>,
    n: usize,
    width: usize,
) -> Result<(), CodecError> {
    (0..width).try_for_each(|_| check_plane(cur, n))
}

/// Checks a chunk body that is one planes section of `n` elements (offsets in errors are
/// shifted by `offset`, the body's place in the payload).
pub(crate) fn check_body(
    body: &[u8],
    n: usize,
    width: usize,
    offset: usize,
) -> Result<(), CodecError> {
    let mut cur = Cursor::new(body);
    check_section(&mut cur, n, width)
        .and_then(|()| cur.finish("planes"))
        .map_err(|e| e.shifted(offset))
}

/// A decoded plane: borrowed from the payload when stored raw, else held in `scratch`.
enum Plane<'a> {
    Borrowed(&'a [u8]),
    /// Range of the scratch buffer.
    Scratch(std::ops::Range<usize>),
}

/// Decodes one plane record of `n` bytes from `cur`; non-raw planes are written to the
/// end of `scratch`.
fn decode_plane<'a>(
    cur: &mut Cursor<'a>,
    n: usize,
    decompressor: &mut zstd::bulk::Decompressor<'static>,
    scratch: &mut Vec<u8>,
) -> Result<Plane<'a>, CodecError> {
    let at = cur.offset();
    let mode = cur.u8("plane mode")?;
    let len = cur.u32("plane length")? as usize;
    let body = cur.bytes(len, "plane bytes")?;
    match mode {
        PLANE_RAW if len == n => Ok(Plane::Borrowed(body)),
        PLANE_RAW => Err(CodecError::new(
            at,
            format!("raw plane of {len} bytes, {n} expected"),
        )),
        PLANE_CONST => {
            let &[b] = body else {
                return Err(CodecError::new(at, "constant plane must hold one byte"));
            };
            let start = scratch.len();
            alloc::extend_filled(scratch, n, b, "a byte plane")?;
            Ok(Plane::Scratch(start..start + n))
        }
        PLANE_ZSTD => {
            check_frame(body, n, n, at)?;
            let start = scratch.len();
            alloc::extend_filled(scratch, n, 0, "a byte plane")?;
            let written = decompressor
                .decompress_to_buffer(body, &mut scratch[start..])
                .map_err(|e| CodecError::new(at, format!("zstd: {e}")))?;
            if written != n {
                return Err(CodecError::new(
                    at,
                    format!("zstd plane decoded to {written} bytes, {n} expected"),
                ));
            }
            Ok(Plane::Scratch(start..start + n))
        }
        other => Err(CodecError::new(at, format!("unknown plane mode {other}"))),
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Decodes a planes section from `cur` into `out` (elements of `width` bytes).
pub(crate) fn decode(
    cur: &mut Cursor<'_>,
    width: usize,
    decompressor: &mut zstd::bulk::Decompressor<'static>,
    out: &mut [u8],
) -> Result<(), CodecError> {
    let n = out.len() / width;
    // A per-thread scratch buffer: reused across chunks, so no page faults per chunk.
    let mut scratch = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    scratch.clear();
    let result = (|| {
        let mut planes = Vec::with_capacity(width);
        for _ in 0..width {
            planes.push(decode_plane(cur, n, decompressor, &mut scratch)?);
        }
        let slices: Vec<&[u8]> = planes
            .iter()
            .map(|p| match p {
                Plane::Borrowed(b) => *b,
                Plane::Scratch(r) => &scratch[r.clone()],
            })
            .collect();
        join_slices(&slices, out);
        Ok(())
    })();
    SCRATCH.with(|s| *s.borrow_mut() = scratch);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{check, testing::*};
    use crate::{DType, Role};
    use proptest::prelude::*;

    /// A planes payload for `numel` elements of `width` bytes in chunks of the largest
    /// size, every plane the record `record`.
    fn chunked(numel: usize, width: usize, record: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        chunks::encode(numel, chunks::MAX_CHUNK_BYTES, &mut out, |_| {
            Ok(record.repeat(width))
        })
        .unwrap();
        out
    }

    #[test]
    fn huge_declared_tensors_are_checked_before_allocating() {
        // 2^34 f32 elements (64 GiB) of a constant: valid, 7 KiB. Only a budget of the
        // caller's refuses it.
        let n = 1usize << 34;
        let constant = chunked(n, 4, &[PLANE_CONST, 1, 0, 0, 0, 7]);
        assert!(constant.len() < 8 << 10, "{} bytes", constant.len());
        check(CodecId::Planes, &constant, DType::F32, n).unwrap();
        check(CodecId::XorDelta, &constant, DType::F32, n).unwrap();
        // The same size of garbage is refused by the check, and by the decoder before it
        // allocates the output (it checks first: same error).
        let frame = zstd::bulk::compress(&[0u8; 100], 1).unwrap();
        let mut lying = vec![PLANE_ZSTD];
        lying.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        lying.extend_from_slice(&frame);
        for (record, why) in [
            (vec![9, 1, 0, 0, 0, 7], "unknown plane mode 9"),
            (vec![PLANE_RAW, 1, 0, 0, 0, 7], "raw plane of 1 bytes"),
            (
                vec![PLANE_CONST, 2, 0, 0, 0, 7, 7],
                "constant plane must hold one byte",
            ),
            (lying, "declares 100 bytes"),
            (vec![PLANE_ZSTD, 1, 0, 0, 0, 7], "invalid frame header"),
        ] {
            let payload = chunked(n, 4, &record);
            for codec in [CodecId::Planes, CodecId::XorDelta] {
                let err = check(codec, &payload, DType::F32, n).unwrap_err();
                assert!(err.reason.contains(why), "{err}");
                let again =
                    crate::codec::decode(codec, &payload, DType::F32, n, Some(&[])).unwrap_err();
                assert_eq!(again, err);
            }
        }
    }

    proptest! {
        #[test]
        fn round_trip(dtype in any_dtype(), n in 0usize..3000, seed in any::<u64>()) {
            let data = tensor_bytes(dtype, n, seed);
            let input = EncodeInput { shape: &[], dtype, role: Role::Weight, data: &data, base: None };
            let enc = Planes::default().encode(&input).unwrap().unwrap();
            let back = crate::codec::decode(CodecId::Planes, &enc.payload, dtype, n, None).unwrap();
            prop_assert_eq!(back, data);
        }

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
            prop_assert!(enc.len() <= data.len() + PLANE_OVERHEAD * width);
            let mut back = vec![0; data.len()];
            let mut cur = Cursor::new(&enc);
            decode(&mut cur, width, &mut d, &mut back).unwrap();
            prop_assert_eq!(cur.remaining(), 0);
            prop_assert_eq!(back, data);
        }
    }
}
