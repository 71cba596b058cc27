//! Float tensors as f64 and back: what the quantizer clusters and how codebook entries
//! are rounded to the tensor's dtype.

use crate::DType;

/// Reads element `i` of float `bytes` as f64.
pub(super) fn value_at(dtype: DType, bytes: &[u8], i: usize) -> f64 {
    let w = dtype.size();
    let b = &bytes[i * w..(i + 1) * w];
    match dtype {
        DType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
        DType::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f64(),
        DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
        DType::F64 => f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        _ => f64::NAN,
    }
}

/// Converts `v` to `dtype` (round to nearest), as little-endian bytes appended to `out`.
pub(super) fn push_value(dtype: DType, v: f64, out: &mut Vec<u8>) {
    match dtype {
        DType::F16 => out.extend_from_slice(&half::f16::from_f64(v).to_le_bytes()),
        DType::BF16 => out.extend_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
        DType::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
        _ => out.extend_from_slice(&v.to_le_bytes()),
    }
}

/// `v` rounded to `dtype` and back.
pub(super) fn round_to(dtype: DType, v: f64) -> f64 {
    let mut b = Vec::with_capacity(8);
    push_value(dtype, v, &mut b);
    value_at(dtype, &b, 0)
}

thread_local! {
    static VALUES: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on the values of a chunk of float bytes, converted to f64 in a reused buffer.
pub(super) fn with_values<R>(dtype: DType, bytes: &[u8], f: impl FnOnce(&[f64]) -> R) -> R {
    VALUES.with(|cell| {
        let mut vals = cell.borrow_mut();
        vals.clear();
        match dtype {
            DType::F16 => vals.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f64()),
            ),
            DType::BF16 => vals.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64()),
            ),
            DType::F32 => vals.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64),
            ),
            DType::F64 => vals.extend(
                bytes
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])),
            ),
            _ => vals.extend(std::iter::repeat_n(
                f64::NAN,
                bytes.len() / dtype.size().max(1),
            )),
        }
        f(&vals)
    })
}

/// All values of a float tensor as f64, or `None` for non-float dtypes.
pub(crate) fn floats_to_f64(dtype: DType, bytes: &[u8]) -> Option<Vec<f64>> {
    if !dtype.is_quantizable_float() {
        return None;
    }
    Some(
        (0..bytes.len() / dtype.size())
            .map(|i| value_at(dtype, bytes, i))
            .collect(),
    )
}

/// Converts `v` to `dtype` (round to nearest) into `out`, which holds one element.
pub(super) fn write_value(dtype: DType, v: f64, out: &mut [u8]) {
    match dtype {
        DType::F16 => out.copy_from_slice(&half::f16::from_f64(v).to_le_bytes()),
        DType::BF16 => out.copy_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
        DType::F32 => out.copy_from_slice(&(v as f32).to_le_bytes()),
        _ => out.copy_from_slice(&v.to_le_bytes()),
    }
}
