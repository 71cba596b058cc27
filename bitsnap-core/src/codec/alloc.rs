//! Fallible buffers for the decoders. Every buffer whose size comes from a payload or
//! from a declared tensor size is allocated here, so that a size this machine cannot
//! provide is a [`CodecError`] naming the bytes and the buffer, never an abort.
//!
//! Decoders check a payload's structure before they allocate (see `precheck` in the
//! parent module); what is left, a valid payload that declares more than fits in memory,
//! fails here. Budgets (how much a caller is willing to decode) are the caller's.

use super::CodecError;

/// A zeroed buffer of `len` bytes for `what`. Large buffers come zeroed from the
/// allocator (`calloc`): pages are committed as decoding writes them, so a payload that
/// fails half-way has not made the whole tensor resident.
pub(crate) fn zeroed(len: usize, what: &str) -> Result<Vec<u8>, CodecError> {
    bytemuck::allocation::try_zeroed_vec(len).map_err(|()| CodecError::alloc(len as u64, what))
}

/// An empty vector with room for `cap` elements of `T`, for `what`.
pub(crate) fn with_capacity<T>(cap: usize, what: &str) -> Result<Vec<T>, CodecError> {
    let mut v = Vec::new();
    v.try_reserve_exact(cap).map_err(|_| {
        CodecError::alloc(
            (cap as u64).saturating_mul(std::mem::size_of::<T>() as u64),
            what,
        )
    })?;
    Ok(v)
}

/// Appends `n` copies of `value` to `v`, for `what`.
pub(crate) fn extend_filled(
    v: &mut Vec<u8>,
    n: usize,
    value: u8,
    what: &str,
) -> Result<(), CodecError> {
    v.try_reserve(n)
        .map_err(|_| CodecError::alloc((v.len() as u64).saturating_add(n as u64), what))?;
    v.resize(v.len() + n, value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_past_the_address_space_are_errors() {
        let too_big = isize::MAX as usize + 1;
        let err = zeroed(too_big, "a test buffer").unwrap_err();
        assert_eq!(err.alloc, Some(too_big as u64));
        assert!(err.reason.contains("a test buffer"), "{err}");
        let err = with_capacity::<u32>(too_big / 4, "positions").unwrap_err();
        assert_eq!(err.alloc, Some(too_big as u64));
        let mut v = vec![1u8; 3];
        let err = extend_filled(&mut v, usize::MAX - 1, 0, "scratch").unwrap_err();
        assert!(err.alloc.is_some(), "{err}");
        assert_eq!(v, [1, 1, 1]);
    }

    #[test]
    fn small_buffers_are_what_was_asked() {
        assert_eq!(zeroed(5, "x").unwrap(), vec![0; 5]);
        assert!(with_capacity::<u64>(7, "x").unwrap().capacity() >= 7);
        let mut v = vec![1u8];
        extend_filled(&mut v, 2, 9, "x").unwrap();
        assert_eq!(v, [1, 9, 9]);
    }
}
