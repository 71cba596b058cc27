//! Byte sizes and compression ratios formatted for people: one set of rules for the
//! `bitsnap` command line, its benchmark tables and the examples' reports.
//!
//! Sizes are in decimal units (1 MB = 10^6 bytes), as [`indicatif::DecimalBytes`] writes
//! them; ratios are `raw / stored` with two decimals below 100 and none above, `∞` when
//! something was stored in nothing. Behind the `fmt` feature, so the library itself pulls
//! in no terminal crate.
//!
//! ```
//! use bitsnap_core::fmt::{Ratio, bytes, ratio};
//!
//! assert_eq!(bytes(100_620_000), "100.62 MB");
//! assert_eq!(bytes(512), "512 B");
//! assert_eq!(Ratio(ratio(300, 100)).to_string(), "3.00x");
//! assert_eq!(Ratio(ratio(884_000, 1_000)).to_string(), "884x");
//! assert_eq!(Ratio(ratio(10, 0)).to_string(), "∞");
//! ```

use std::fmt;

/// `n` bytes in decimal units: `512 B`, `1.50 kB`, `100.62 MB`, `1.20 GB`.
pub fn bytes(n: u64) -> String {
    indicatif::DecimalBytes(n).to_string()
}

/// The compression ratio `raw / stored`: `1` when both are 0, infinite when only
/// `stored` is.
pub fn ratio(raw: u64, stored: u64) -> f64 {
    match (raw, stored) {
        (0, 0) => 1.0,
        (_, 0) => f64::INFINITY,
        _ => raw as f64 / stored as f64,
    }
}

/// A compression ratio for display: `3.21x`, `150x`, `∞` (`NaN` shows as `-`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratio(pub f64);

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        if r.is_nan() {
            f.write_str("-")
        } else if r.is_infinite() {
            f.write_str("∞")
        } else if r >= 100.0 {
            write!(f, "{r:.0}x")
        } else {
            write!(f, "{r:.2}x")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_decimal_with_two_decimals() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(1_000), "1.00 kB");
        assert_eq!(bytes(1_500), "1.50 kB");
        assert_eq!(bytes(146_760_000), "146.76 MB");
        assert_eq!(bytes(1_200_000_000), "1.20 GB");
        // Not binary: 1 MiB is 1.05 MB.
        assert_eq!(bytes(1 << 20), "1.05 MB");
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(0, 0), 1.0);
        assert_eq!(ratio(7, 0), f64::INFINITY);
        assert_eq!(ratio(6, 4), 1.5);
        assert_eq!(Ratio(1.5).to_string(), "1.50x");
        assert_eq!(Ratio(99.994).to_string(), "99.99x");
        assert_eq!(Ratio(100.0).to_string(), "100x");
        assert_eq!(Ratio(883.6).to_string(), "884x");
        assert_eq!(Ratio(f64::INFINITY).to_string(), "∞");
        assert_eq!(Ratio(f64::NAN).to_string(), "-");
    }
}
