//! Element types of checkpoint tensors and their on-disk tags.

use std::fmt;

/// Element type of a tensor. Values are little-endian in memory and on disk.
///
/// The discriminant is the on-disk tag (see `FORMAT.md`, "dtype tags"); it never changes
/// once assigned.
///
/// ```
/// use bitsnap_core::DType;
/// assert_eq!(DType::BF16.size(), 2);
/// assert_eq!(DType::from_tag(DType::F32.tag()), Some(DType::F32));
/// assert_eq!("bf16".parse::<DType>().ok(), Some(DType::BF16));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// Boolean stored as one byte, 0 or 1.
    Bool = 1,
    /// Unsigned 8-bit integer.
    U8 = 2,
    /// Signed 8-bit integer.
    I8 = 3,
    /// Unsigned 16-bit integer.
    U16 = 4,
    /// Signed 16-bit integer.
    I16 = 5,
    /// Unsigned 32-bit integer.
    U32 = 6,
    /// Signed 32-bit integer.
    I32 = 7,
    /// Unsigned 64-bit integer.
    U64 = 8,
    /// Signed 64-bit integer.
    I64 = 9,
    /// IEEE 754 half precision.
    F16 = 10,
    /// bfloat16 (the high half of an f32).
    BF16 = 11,
    /// IEEE 754 single precision.
    F32 = 12,
    /// IEEE 754 double precision.
    F64 = 13,
    /// 8-bit float, 5 exponent bits and 2 mantissa bits.
    F8E5M2 = 14,
    /// 8-bit float, 4 exponent bits and 3 mantissa bits.
    F8E4M3 = 15,
}

impl DType {
    /// Every dtype, in tag order.
    pub const ALL: [DType; 15] = [
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::U16,
        DType::I16,
        DType::U32,
        DType::I32,
        DType::U64,
        DType::I64,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::F8E5M2,
        DType::F8E4M3,
    ];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 | DType::F8E5M2 | DType::F8E4M3 => 1,
            DType::U16 | DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::U32 | DType::I32 | DType::F32 => 4,
            DType::U64 | DType::I64 | DType::F64 => 8,
        }
    }

    /// The on-disk tag.
    pub const fn tag(self) -> u8 {
        self as u8
    }

    /// The dtype with this on-disk tag, if any.
    pub fn from_tag(tag: u8) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.tag() == tag)
    }

    /// Whether this is one of the float types that [`crate::codec::cluster`] can quantize
    /// (f16, bf16, f32, f64).
    pub const fn is_quantizable_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }

    /// Whether this is a floating-point type.
    pub const fn is_float(self) -> bool {
        matches!(
            self,
            DType::F16 | DType::BF16 | DType::F32 | DType::F64 | DType::F8E5M2 | DType::F8E4M3
        )
    }

    /// Lower-case name, as used by the CLI and `--json` output (`"f32"`, `"bf16"`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::U8 => "u8",
            DType::I8 => "i8",
            DType::U16 => "u16",
            DType::I16 => "i16",
            DType::U32 => "u32",
            DType::I32 => "i32",
            DType::U64 => "u64",
            DType::I64 => "i64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F8E5M2 => "f8_e5m2",
            DType::F8E4M3 => "f8_e4m3",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        DType::ALL
            .into_iter()
            .find(|d| d.name() == lower)
            .ok_or_else(|| format!("unknown dtype `{s}`"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_unique_and_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_tag(d.tag()), Some(d));
            assert_eq!(d.name().parse::<DType>(), Ok(d));
        }
        assert_eq!(DType::from_tag(0), None);
        assert_eq!(DType::from_tag(200), None);
    }
}
