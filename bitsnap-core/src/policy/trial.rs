//! The lossless trial: where the policy's candidates are tried on a tensor before one of
//! them encodes it whole.
//!
//! Every candidate (each lossless codec, and any [`Alternative`] such as optimizer
//! replay) encodes the same [`TrialSample`]: the whole tensor when it is small (up to
//! [`TRIAL_EXACT_BYTES`]; the trial encodings are then final and the winner's is kept),
//! else [`TRIAL_WINDOWS`] evenly spaced windows of [`TRIAL_WINDOW_BYTES`]. Only the
//! winner encodes the whole tensor, so a tensor costs one full encode plus the trials
//! on at most [`TRIAL_WINDOWS`] × [`TRIAL_WINDOW_BYTES`] per candidate.

use std::borrow::Cow;
use std::ops::Range;

use crate::codec::{CodecError, CodecId, Encoded};

/// Tensors up to this size are trial-encoded whole (the trial encodings are final).
///
/// Measured on the small Megatron series (2-core box, `bitsnap bench`): with windows of
/// 16 KiB and exact trials up to 128 KiB the trials cost more than the encode itself
/// (tensors of at most 590 KB) and the series came out 0.6% larger than with 4 KiB
/// windows (estimates of the integer delta vs replay); 4 KiB windows keep every series
/// within 0.03% of the sizes whole-tensor trials gave.
pub const TRIAL_EXACT_BYTES: usize = 32 << 10;
/// Windows sampled from a larger tensor to estimate each candidate's size.
pub const TRIAL_WINDOWS: usize = 8;
/// Bytes per trial window.
pub const TRIAL_WINDOW_BYTES: usize = 4 << 10;

/// The part of a tensor every candidate is tried on: byte ranges of whole elements, in
/// order, the same for the tensor, its base and any tensor a candidate predicts from.
///
/// ```
/// use bitsnap_core::TrialSample;
/// let small = TrialSample::of(4000, 4);
/// assert!(small.is_exact());
/// let big = TrialSample::of(64 << 20, 4);
/// assert!(!big.is_exact() && big.len() < (1 << 20));
/// let data = vec![7u8; 64 << 20];
/// assert_eq!(big.gather(&data).len(), big.len());
/// assert_eq!(big.estimate(big.len() / 2), 32 << 20);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrialSample {
    ranges: Vec<Range<usize>>,
    total: usize,
    exact: bool,
}

impl TrialSample {
    /// The sample of a tensor of `len` bytes with elements of `width` bytes.
    pub fn of(len: usize, width: usize) -> TrialSample {
        let width = width.max(1);
        if len <= TRIAL_EXACT_BYTES {
            return TrialSample {
                ranges: std::iter::once(0..len).collect(),
                total: len,
                exact: true,
            };
        }
        let win = (TRIAL_WINDOW_BYTES / width).max(1) * width;
        let n = TRIAL_WINDOWS.min(len / win).max(1);
        let elems = len / width;
        let win_elems = win / width;
        let stride = if n > 1 {
            (elems - win_elems) / (n - 1)
        } else {
            0
        };
        let ranges = (0..n)
            .map(|i| {
                let start = i * stride * width;
                start..(start + win).min(len)
            })
            .collect();
        TrialSample {
            ranges,
            total: len,
            exact: false,
        }
    }

    /// Whether the sample is the whole tensor (trial encodings are final).
    pub fn is_exact(&self) -> bool {
        self.exact
    }

    /// Bytes in the sample.
    pub fn len(&self) -> usize {
        self.ranges.iter().map(|r| r.len()).sum()
    }

    /// Whether the sample is empty (an empty tensor).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sampled bytes of `src` (a tensor of the length this sample was made for),
    /// concatenated; borrowed when the sample is exact.
    pub fn gather<'a>(&self, src: &'a [u8]) -> Cow<'a, [u8]> {
        if self.exact {
            return Cow::Borrowed(src);
        }
        let mut out = Vec::with_capacity(self.len());
        for r in &self.ranges {
            if let Some(s) = src.get(r.clone()) {
                out.extend_from_slice(s);
            }
        }
        Cow::Owned(out)
    }

    /// The bytes of `src` at this sample's ranges scaled by `factor` (the same elements
    /// of a tensor whose elements are `factor` times as wide: a half tensor's f32
    /// source).
    pub fn gather_scaled<'a>(&self, src: &'a [u8], factor: usize) -> Cow<'a, [u8]> {
        if self.exact {
            return Cow::Borrowed(src);
        }
        let mut out = Vec::with_capacity(self.len() * factor);
        for r in &self.ranges {
            if let Some(s) = src.get(r.start * factor..r.end * factor) {
                out.extend_from_slice(s);
            }
        }
        Cow::Owned(out)
    }

    /// The whole tensor's payload size estimated from a payload of `sample_bytes` for
    /// the sample.
    pub fn estimate(&self, sample_bytes: usize) -> u64 {
        if self.exact || self.is_empty() {
            return sample_bytes as u64;
        }
        (sample_bytes as f64 / self.len() as f64 * self.total as f64).ceil() as u64
    }
}

/// A way to store one tensor that the policy weighs beside its codecs (optimizer
/// replay: [`crate::references::replay`]): tried on the policy's [`TrialSample`], and
/// encoded whole only when it wins.
pub trait Alternative: Sync {
    /// The codec of its payload.
    fn codec(&self) -> CodecId;
    /// Header bytes it adds to the tensor's entry beyond the payload (references).
    fn overhead(&self) -> u64;
    /// The payload for `sample` of every input (`None`: it does not apply).
    fn trial(&self, sample: &TrialSample) -> Result<Option<Encoded>, CodecError>;
    /// The payload for the whole tensor, after a [`Alternative::trial`] (`None`: it does
    /// not apply).
    fn encode(&self) -> Result<Option<Encoded>, CodecError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_whole_elements_inside_the_tensor_and_spread_over_it() {
        for (len, w) in [
            (TRIAL_EXACT_BYTES + 4, 4),
            (1 << 20, 2),
            (10 << 20, 4),
            (3 << 20, 8),
        ] {
            let s = TrialSample::of(len, w);
            assert!(!s.is_exact());
            assert!(
                s.ranges
                    .iter()
                    .all(|r| r.start % w == 0 && r.len() % w == 0)
            );
            assert!(s.ranges.iter().all(|r| r.end <= len));
            assert!(s.ranges.windows(2).all(|p| p[0].end <= p[1].start));
            assert!(
                s.ranges
                    .last()
                    .is_some_and(|r| r.end + s.ranges[0].len() * 2 > len)
            );
            assert!(s.len() <= TRIAL_WINDOWS * TRIAL_WINDOW_BYTES);
        }
        let exact = TrialSample::of(100, 4);
        assert!(exact.is_exact());
        assert_eq!(exact.estimate(17), 17);
        assert!(matches!(exact.gather(&[0u8; 100]), Cow::Borrowed(_)));
        assert!(TrialSample::of(0, 4).is_empty());
    }
}
