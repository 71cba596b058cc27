//! XOR dense delta: XOR with the base, then byte planes and zstd.
//!
//! Where most elements changed a little, the XOR of old and new bits is zero in the sign,
//! exponent and high mantissa bits, so the high planes compress to almost nothing.

use super::{Codec, CodecError, CodecId, Cursor, EncodeInput, Encoded, chunks, planes};

/// The XOR dense delta codec. Payload: a chunk stream whose chunk bodies are planes
/// sections of `new ^ base`.
///
/// ```
/// use bitsnap_core::codec::{self, Codec, CodecId, EncodeInput, XorDelta};
/// use bitsnap_core::{DType, Role};
/// let base: Vec<u8> = (0..512u32).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect();
/// let next: Vec<u8> = (0..512u32).flat_map(|i| (i as f32 * 0.5 + 1e-4).to_le_bytes()).collect();
/// let input = EncodeInput { shape: &[], dtype: DType::F32, role: Role::Weight, data: &next, base: Some(&base) };
/// let enc = XorDelta::default().encode(&input).unwrap().unwrap();
/// let back = codec::decode(CodecId::XorDelta, &enc.payload, DType::F32, 512, Some(&base)).unwrap();
/// assert_eq!(back, next);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct XorDelta {
    /// zstd level; default [`super::DEFAULT_ZSTD_LEVEL`].
    pub level: i32,
}

impl Default for XorDelta {
    fn default() -> Self {
        XorDelta {
            level: super::DEFAULT_ZSTD_LEVEL,
        }
    }
}

impl Codec for XorDelta {
    fn id(&self) -> CodecId {
        CodecId::XorDelta
    }

    fn encode(&self, input: &EncodeInput<'_>) -> Result<Option<Encoded>, CodecError> {
        let Some(base) = input.base.filter(|b| b.len() == input.data.len()) else {
            return Ok(None);
        };
        let mut payload = Vec::new();
        planes::encode_chunked(
            input.data,
            Some(base),
            input.dtype.size(),
            self.level,
            &mut payload,
        )?;
        Ok(Some(Encoded {
            codec: CodecId::XorDelta,
            payload,
            lossy: None,
        }))
    }
}

/// Decodes an [`XorDelta`] payload into `out` against `base` (same length as `out`).
pub(crate) fn decode_into(
    payload: &[u8],
    width: usize,
    base: &[u8],
    out: &mut [u8],
) -> Result<(), CodecError> {
    decode_with(payload, width, out, |chunk, part| {
        let b = &base[chunk.elems.start * width..chunk.elems.end * width];
        part.iter_mut().zip(b).for_each(|(o, b)| *o ^= b);
    })
}

/// Decodes an [`XorDelta`] payload into `out` without a base: `out` receives
/// `tensor XOR base`, which a device holding the base finishes with one XOR.
pub(crate) fn decode_delta_into(
    payload: &[u8],
    width: usize,
    out: &mut [u8],
) -> Result<(), CodecError> {
    decode_with(payload, width, out, |_, _| {})
}

fn decode_with<F>(payload: &[u8], width: usize, out: &mut [u8], finish: F) -> Result<(), CodecError>
where
    F: Fn(&chunks::Chunk<'_>, &mut [u8]) + Sync,
{
    let mut cur = Cursor::new(payload);
    let chunks = chunks::parse(&mut cur, out.len() / width)?;
    chunks::decode(&chunks, width, out, |chunk, part| {
        super::with_decompressor(|d| {
            let mut cur = Cursor::new(chunk.body);
            planes::decode(&mut cur, width, d, part).map_err(|e| e.shifted(chunk.offset))?;
            cur.finish("xor planes")
                .map_err(|e| e.shifted(chunk.offset))
        })?;
        finish(chunk, part);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, testing::*};
    use crate::{DType, Role};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(dtype in any_dtype(), n in 0usize..3000, permille in any_permille(), seed in any::<u64>()) {
            let base = tensor_bytes(dtype, n, seed);
            let next = mutate(&base, dtype.size(), permille, seed ^ 7);
            let input = EncodeInput { shape: &[], dtype, role: Role::Weight, data: &next, base: Some(&base) };
            let enc = XorDelta::default().encode(&input).unwrap().unwrap();
            let back = decode(CodecId::XorDelta, &enc.payload, dtype, n, Some(&base)).unwrap();
            prop_assert_eq!(back, next);
        }
    }

    #[test]
    fn multi_chunk_tensor_round_trips() {
        let n = 700_000; // 2.7 MiB of f32: three chunks
        let base = tensor_bytes(DType::F32, n, 3);
        let next = mutate(&base, 4, 300, 5);
        let input = EncodeInput {
            shape: &[],
            dtype: DType::F32,
            role: Role::Weight,
            data: &next,
            base: Some(&base),
        };
        let enc = XorDelta::default().encode(&input).unwrap().unwrap();
        let back = decode(CodecId::XorDelta, &enc.payload, DType::F32, n, Some(&base)).unwrap();
        assert_eq!(back, next);
    }

    #[test]
    fn wrong_base_is_not_an_error_but_wrong_lengths_are() {
        let base = vec![1u8; 64];
        let next = vec![2u8; 64];
        let input = EncodeInput {
            shape: &[],
            dtype: DType::F32,
            role: Role::Weight,
            data: &next,
            base: Some(&base),
        };
        let enc = XorDelta::default().encode(&input).unwrap().unwrap();
        assert!(
            decode(
                CodecId::XorDelta,
                &enc.payload,
                DType::F32,
                16,
                Some(&base[..60])
            )
            .is_err()
        );
        assert!(decode(CodecId::XorDelta, &enc.payload, DType::F32, 16, None).is_err());
        assert!(
            decode(
                CodecId::XorDelta,
                &enc.payload[..enc.payload.len() - 1],
                DType::F32,
                16,
                Some(&base)
            )
            .is_err()
        );
    }
}
