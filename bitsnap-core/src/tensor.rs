//! Named, typed byte tensors: the unit bitsnap stores.

use crate::{DType, Error, Role};

/// Largest tensor, in bytes, that bitsnap stores or decodes (64 GiB). Checked before any
/// allocation sized from a file.
pub const MAX_TENSOR_BYTES: u64 = 64 << 30;
/// Largest rank (number of dimensions) of a tensor.
pub const MAX_RANK: usize = 16;
/// Longest tensor name, in bytes of UTF-8.
pub const MAX_NAME_BYTES: usize = 4096;

/// A named tensor: dtype, shape, role and its little-endian bytes.
///
/// ```
/// use bitsnap_core::{DType, Role, Tensor};
/// let t = Tensor::from_f32("w", &[2, 2], Role::Weight, &[1.0, 2.0, 3.0, 4.0]).unwrap();
/// assert_eq!(t.numel(), 4);
/// assert_eq!(t.data.len(), 16);
/// assert_eq!(t.to_f32().unwrap()[3], 4.0);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    /// Unique name within a snapshot.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions; empty for a scalar.
    pub shape: Vec<u64>,
    /// What the tensor is for; decides which codecs may be used.
    pub role: Role,
    /// Little-endian element bytes, `numel * dtype.size()` of them.
    pub data: Vec<u8>,
}

impl Tensor {
    /// Builds a tensor, checking that `data` has exactly `numel * dtype.size()` bytes and
    /// that name, rank and size are within the format's limits.
    pub fn new(
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<u64>,
        role: Role,
        data: Vec<u8>,
    ) -> Result<Tensor, Error> {
        let name = name.into();
        let expected = byte_len(&name, dtype, &shape)?;
        if data.len() as u64 != expected {
            return Err(Error::InvalidTensor {
                tensor: name,
                reason: format!(
                    "{} bytes of data for shape {:?} of {} ({} bytes expected)",
                    data.len(),
                    shape,
                    dtype,
                    expected
                ),
            });
        }
        Ok(Tensor {
            name,
            dtype,
            shape,
            role,
            data,
        })
    }

    /// Builds an f32 tensor from values.
    pub fn from_f32(
        name: impl Into<String>,
        shape: &[u64],
        role: Role,
        values: &[f32],
    ) -> Result<Tensor, Error> {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::new(name, DType::F32, shape.to_vec(), role, data)
    }

    /// Number of elements (product of the shape; 1 for a scalar).
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// The values as f32, for float dtypes (f16, bf16, f32, f64).
    pub fn to_f32(&self) -> Result<Vec<f32>, Error> {
        crate::codec::cluster::floats_to_f64(self.dtype, &self.data)
            .map(|v| v.into_iter().map(|x| x as f32).collect())
            .ok_or_else(|| Error::InvalidTensor {
                tensor: self.name.clone(),
                reason: format!("{} is not a float dtype", self.dtype),
            })
    }
}

/// Byte length of a tensor of this dtype and shape, checked against the format's limits.
pub(crate) fn byte_len(name: &str, dtype: DType, shape: &[u64]) -> Result<u64, Error> {
    let invalid = |reason: String| Error::InvalidTensor {
        tensor: name.to_string(),
        reason,
    };
    if name.len() > MAX_NAME_BYTES {
        return Err(invalid(format!(
            "name is {} bytes, more than the limit of {MAX_NAME_BYTES}",
            name.len()
        )));
    }
    if shape.len() > MAX_RANK {
        return Err(invalid(format!(
            "rank {} is more than the limit of {MAX_RANK}",
            shape.len()
        )));
    }
    let bytes = shape
        .iter()
        .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d))
        .filter(|&b| b <= MAX_TENSOR_BYTES)
        .ok_or_else(|| {
            invalid(format!(
                "shape {shape:?} of {dtype} exceeds the limit of {MAX_TENSOR_BYTES} bytes"
            ))
        })?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_wrong_length_and_absurd_shapes() {
        assert!(Tensor::new("a", DType::F32, vec![3], Role::Weight, vec![0; 11]).is_err());
        assert!(Tensor::new("a", DType::F32, vec![u64::MAX, 2], Role::Weight, vec![]).is_err());
        assert!(Tensor::new("a", DType::U8, vec![1; 17], Role::Weight, vec![0]).is_err());
        let t = Tensor::new("s", DType::I64, vec![], Role::Other, vec![0; 8]).unwrap();
        assert_eq!(t.numel(), 1);
        let e = Tensor::new("e", DType::BF16, vec![0, 5], Role::Weight, vec![]).unwrap();
        assert_eq!(e.numel(), 0);
    }
}
