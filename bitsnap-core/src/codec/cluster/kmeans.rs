//! 1-D k-means for the cluster quantizer's codebooks, on a sorted sample of the tensor
//! (`samples.rs`): k-means++ seeding (quantiles for codebooks above 256 entries, where
//! k-means++ would cost `O(n k)`), then Lloyd iterations, each `O(k log n)` on the
//! sorted sample with prefix sums.

/// 1-D k-means on a sorted sample: at most `k` sorted centroids.
pub(super) fn kmeans_1d(sorted: &[f64], k: usize, iterations: usize) -> Vec<f64> {
    if sorted.is_empty() || k == 0 {
        return Vec::new();
    }
    let mut distinct = sorted.to_vec();
    distinct.dedup();
    if distinct.len() <= k {
        return distinct;
    }
    let mut c = if k <= 256 {
        kmeans_pp(sorted, k)
    } else {
        (0..k)
            .map(|j| sorted[(j * (sorted.len() - 1)) / (k - 1).max(1)])
            .collect()
    };
    c.sort_by(f64::total_cmp);
    c.dedup();
    let mut prefix = Vec::with_capacity(sorted.len() + 1);
    prefix.push(0.0f64);
    let mut acc = 0.0;
    for &v in sorted {
        acc += v;
        prefix.push(acc);
    }
    for _ in 0..iterations {
        let mut next = Vec::with_capacity(c.len());
        let mut lo = 0usize;
        for j in 0..c.len() {
            let hi = if j + 1 < c.len() {
                let mid = 0.5 * (c[j] + c[j + 1]);
                sorted.partition_point(|&v| v <= mid)
            } else {
                sorted.len()
            };
            if hi > lo {
                next.push((prefix[hi] - prefix[lo]) / (hi - lo) as f64);
            } else {
                next.push(c[j]);
            }
            lo = hi.max(lo);
        }
        next.sort_by(f64::total_cmp);
        next.dedup();
        if next == c {
            break;
        }
        c = next;
    }
    c
}

/// k-means++ seeding (D² sampling) with a fixed seed, so snapshots are reproducible.
fn kmeans_pp(sorted: &[f64], k: usize) -> Vec<f64> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ sorted.len() as u64;
    let mut uniform = move || {
        // SplitMix64: deterministic and enough for seeding.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut centers = vec![sorted[sorted.len() / 2]];
    let mut d2: Vec<f64> = sorted.iter().map(|&v| (v - centers[0]).powi(2)).collect();
    while centers.len() < k {
        let total: f64 = d2.iter().sum();
        if total <= 0.0 {
            break;
        }
        let mut target = uniform() * total;
        let mut pick = sorted.len() - 1;
        for (i, &d) in d2.iter().enumerate() {
            target -= d;
            if target <= 0.0 {
                pick = i;
                break;
            }
        }
        let c = sorted[pick];
        centers.push(c);
        d2.iter_mut()
            .zip(sorted)
            .for_each(|(d, &v)| *d = d.min((v - c).powi(2)));
    }
    centers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn few_distinct_values_are_their_own_centroids() {
        let sorted = [1.0, 1.0, 2.0, 5.0, 5.0, 5.0];
        assert_eq!(kmeans_1d(&sorted, 4, 12), vec![1.0, 2.0, 5.0]);
        assert!(kmeans_1d(&[], 4, 12).is_empty());
        assert!(kmeans_1d(&sorted, 0, 12).is_empty());
    }

    #[test]
    fn two_clusters_are_found_and_sorted() {
        let mut v: Vec<f64> = (0..1000).map(|i| (i % 10) as f64 * 1e-3).collect();
        v.extend((0..1000).map(|i| 100.0 + (i % 10) as f64 * 1e-3));
        v.sort_by(f64::total_cmp);
        let c = kmeans_1d(&v, 2, 12);
        assert_eq!(c.len(), 2);
        // The cluster means are 0.0045 and 100.0045.
        assert!(
            (c[0] - 0.0045).abs() < 1e-12 && (c[1] - 100.0045).abs() < 1e-9,
            "{c:?}"
        );
    }
}
