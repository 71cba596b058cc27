//! Sorted samples of a tensor's values, the quantizers' input to k-means and to the
//! choice of uniform cells, and a memo of them for one tensor: a budget search tries
//! dozens of quantizers on the same tensor (widths, domains, codebook sizes), and each
//! would otherwise draw and sort the same sample again (measured: 29% of a lossy `pack`
//! of the JAX series went to drawing and sorting samples).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use rayon::prelude::*;

use super::ResidualKind;
use crate::DType;
use crate::codec::EncodeInput;

/// The values a sample holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Transform {
    /// The values as they are.
    Linear,
    /// The logarithm of the positive values.
    Log,
    /// The residual of each value against its base.
    Residual(ResidualKind),
    /// The values times a scale (its `f64` bits).
    Scaled(u64),
}

/// Values a sample for `k` clusters holds: 64 per cluster, at least 2^16, at most 2^21
/// (fewer when the tensor has fewer).
fn target(k: usize) -> usize {
    (k * 64).clamp(1 << 16, 1 << 21)
}

/// A sorted, evenly strided sample of the values `f(i)` (`i < n`) that are `Some`, large
/// enough for `k` clusters (see [`target`]).
pub(super) fn sample_sorted(
    n: usize,
    k: usize,
    f: impl Fn(usize) -> Option<f64> + Sync,
) -> Vec<f64> {
    let stride = (n / target(k)).max(1);
    let mut s: Vec<f64> = (0..n.div_ceil(stride))
        .into_par_iter()
        .filter_map(|j| f(j * stride))
        .collect();
    s.par_sort_unstable_by(f64::total_cmp);
    s
}

/// Sorted samples by transform and size.
type Drawn = HashMap<(Transform, usize), Arc<Vec<f64>>>;

/// The sorted samples drawn from one [`EncodeInput`], by transform and size. Used with
/// another input it draws afresh and keeps nothing. The input is recognised by its
/// buffers' addresses and lengths and its dtype, so a memo must not outlive the inputs
/// it serves (a freed buffer's address can come back for another tensor): crate-private,
/// and made per tensor by the budget search. Encodings are the same with or without it.
#[derive(Debug, Default)]
pub(crate) struct Samples {
    /// The input served: its data's and base's addresses and lengths, and its dtype
    /// (compared, never dereferenced).
    of: OnceLock<([usize; 4], DType)>,
    drawn: Mutex<Drawn>,
}

impl Samples {
    /// The sorted sample of `input`'s values under `transform` (`f(i)`, as for
    /// [`sample_sorted`]) for `k` clusters: drawn on first use, then shared.
    pub(crate) fn sorted(
        &self,
        input: &EncodeInput<'_>,
        transform: Transform,
        k: usize,
        f: impl Fn(usize) -> Option<f64> + Sync,
    ) -> Arc<Vec<f64>> {
        let n = input.data.len() / input.dtype.size();
        let id = identity(input);
        if *self.of.get_or_init(|| id) != id {
            return Arc::new(sample_sorted(n, k, f));
        }
        let key = (transform, target(k));
        if let Some(s) = self.lock().get(&key) {
            return s.clone();
        }
        // Drawn outside the lock (it runs on all cores); two racing draws give equal
        // samples, and the first kept wins.
        let drawn = Arc::new(sample_sorted(n, k, f));
        self.lock().entry(key).or_insert(drawn).clone()
    }

    fn lock(&self) -> MutexGuard<'_, Drawn> {
        // Every change is one insert: a poisoned map is still consistent.
        self.drawn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn identity(input: &EncodeInput<'_>) -> ([usize; 4], DType) {
    let (base_at, base_len) = input
        .base
        .map_or((0, 0), |b| (b.as_ptr() as usize, b.len()));
    let buffers = [
        input.data.as_ptr() as usize,
        input.data.len(),
        base_at,
        base_len,
    ];
    (buffers, input.dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Role;

    #[test]
    fn sample_is_sorted_and_skips_none() {
        let s = sample_sorted(10, 4, |i| (i % 3 != 0).then_some(10.0 - i as f64));
        assert_eq!(s, vec![2.0, 3.0, 5.0, 6.0, 8.0, 9.0]);
    }

    #[test]
    fn a_memo_shares_one_inputs_samples_and_never_another_inputs() {
        let a = vec![1u8; 4 * 1000];
        let b = vec![2u8; 4 * 1000];
        let input = |data| EncodeInput {
            dtype: DType::F32,
            role: Role::OptimizerMoment(1),
            data,
            shape: &[],
            base: None,
        };
        let memo = Samples::default();
        let first = memo.sorted(&input(&a), Transform::Linear, 16, |i| Some(i as f64));
        // Same input, transform and size (16 and 256 clusters both draw 2^16 values):
        // the same sample, whatever `f` says now.
        let again = memo.sorted(&input(&a), Transform::Linear, 256, |_| Some(-1.0));
        assert!(Arc::ptr_eq(&first, &again));
        // Another size (2048 clusters draw 2^17 values): drawn.
        let larger = memo.sorted(&input(&a), Transform::Linear, 2048, |i| Some(i as f64));
        assert!(!Arc::ptr_eq(&first, &larger));
        // Another transform: drawn.
        let log = memo.sorted(&input(&a), Transform::Log, 16, |_| Some(-1.0));
        assert_eq!(*log, vec![-1.0; 1000]);
        // Another input: drawn, and not kept.
        let other = memo.sorted(&input(&b), Transform::Linear, 16, |_| Some(7.0));
        assert_eq!(*other, vec![7.0; 1000]);
        let still = memo.sorted(&input(&a), Transform::Linear, 16, |_| Some(0.0));
        assert!(Arc::ptr_eq(&first, &still));
    }
}
