//! Retention: pins, [`Retention`] policies applied by [`Store::prune`], and
//! [`Store::compact`], the explicit rewrite that frees retired snapshots' space.
//! Every deletion goes through [`Store::delete`]'s machinery: one manifest commit, no
//! re-encoding; only `compact` re-encodes, and only when asked.

use std::collections::HashSet;

use serde::Serialize;

use super::delete::collect;
use super::manifest::ManifestBody;
use super::{SnapshotInfo, Store};
use crate::Error;

/// Which snapshots [`Store::prune`] keeps, per series. A snapshot is kept if any rule
/// keeps it; the latest snapshot of each series, pinned snapshots ([`Store::pin`]) and
/// sharded snapshots are always kept.
///
/// ```
/// use bitsnap_core::Retention;
/// let r = Retention::default().with_keep_last(2).with_keep_every(100);
/// assert_eq!(r.keep_last, Some(2));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Retention {
    /// Keep the latest `n` snapshots of each series. Default: `None` (no such rule).
    pub keep_last: Option<usize>,
    /// Keep every snapshot whose id is a multiple of `k` (ids only grow, so the rule
    /// keeps the same snapshots however often it runs). Default: `None`; `Some(0)` keeps
    /// none by this rule.
    pub keep_every: Option<u64>,
    /// Further snapshot ids to keep, besides the store's pins. Default: empty.
    pub pinned: Vec<u64>,
}

impl Retention {
    /// Sets [`Retention::keep_last`].
    pub fn with_keep_last(mut self, n: usize) -> Retention {
        self.keep_last = Some(n);
        self
    }

    /// Sets [`Retention::keep_every`].
    pub fn with_keep_every(mut self, k: u64) -> Retention {
        self.keep_every = Some(k);
        self
    }

    /// Adds `id` to [`Retention::pinned`].
    pub fn with_pinned(mut self, id: u64) -> Retention {
        self.pinned.push(id);
        self
    }
}

/// What [`Store::prune`] did (or, from [`Store::plan_prune`], would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Listed snapshots kept, ascending.
    pub kept: Vec<u64>,
    /// Snapshots deleted (no longer listed), ascending.
    pub deleted: Vec<u64>,
    /// Snapshots whose files were removed (deleted now or retired before), ascending.
    pub removed: Vec<u64>,
    /// Bytes of the removed files.
    pub freed_bytes: u64,
    /// Snapshots retired afterwards (deleted, file kept for a listed delta), ascending.
    pub retired: Vec<u64>,
    /// Bytes of the retired files.
    pub retired_bytes: u64,
}

/// What [`Store::compact`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CompactReport {
    /// Listed snapshots rewritten against their nearest listed ancestor (or as full
    /// snapshots), ascending.
    pub rewritten: Vec<u64>,
    /// Retired snapshots whose files were removed, ascending.
    pub removed: Vec<u64>,
    /// Bytes freed: removed files and replaced files, less the rewritten files.
    pub freed_bytes: i64,
}

impl Store {
    /// Retired snapshots: deleted, not listed by any query, their files kept because a
    /// listed delta still reads them ([`Store::delete`]). Oldest first.
    pub fn retired(&self) -> &[SnapshotInfo] {
        &self.manifest.retired
    }

    /// Pinned snapshot ids, ascending.
    pub fn pinned(&self) -> &[u64] {
        &self.manifest.pinned
    }

    /// Whether snapshot `id` is pinned.
    pub fn is_pinned(&self, id: u64) -> bool {
        self.manifest.pinned.binary_search(&id).is_ok()
    }

    /// Pins snapshot `id`: [`Store::prune`] keeps it and [`Store::delete`] refuses it
    /// until [`Store::unpin`]. One manifest commit; pinning a pinned snapshot is a no-op.
    pub fn pin(&mut self, id: u64) -> Result<(), Error> {
        self.become_writer()?;
        self.commit_with(|store| {
            store.info(id)?;
            let mut next = store.manifest.clone();
            Ok(match next.pinned.binary_search(&id) {
                Ok(_) => (None, ()),
                Err(at) => {
                    next.pinned.insert(at, id);
                    (Some(next), ())
                }
            })
        })
    }

    /// Unpins snapshot `id` (a no-op if it is not pinned).
    pub fn unpin(&mut self, id: u64) -> Result<(), Error> {
        self.become_writer()?;
        self.commit_with(|store| {
            store.info(id)?;
            let mut next = store.manifest.clone();
            Ok(match next.pinned.binary_search(&id) {
                Err(_) => (None, ()),
                Ok(at) => {
                    next.pinned.remove(at);
                    (Some(next), ())
                }
            })
        })
    }

    /// What [`Store::prune`] would do, changing nothing.
    pub fn plan_prune(&self, series: Option<&str>, retention: &Retention) -> PruneReport {
        self.prune_plan(series, retention).0
    }

    /// Deletes, in one manifest commit and without re-encoding anything, every snapshot
    /// of `series` (`None`: of every series, each on its own) that `retention` does not
    /// keep; as [`Store::delete`], those a kept delta reads are retired.
    ///
    /// ```
    /// use bitsnap_core::{Policy, Retention, Role, Store, Tensor};
    /// let dir = tempfile::tempdir()?;
    /// let mut store = Store::open_or_create(dir.path(), Policy::default())?;
    /// let mut w = vec![0.5f32; 1000];
    /// for step in 0..6 {
    ///     w[step] = 1.0;
    ///     store.save(&format!("step-{step}"), vec![Tensor::from_f32("w", &[1000], Role::Weight, &w)?])?;
    /// }
    /// let report = store.prune(None, &Retention::default().with_keep_last(2).with_keep_every(3))?;
    /// assert_eq!(report.kept, vec![3, 5, 6]);
    /// assert_eq!(report.deleted, vec![1, 2, 4]);
    /// assert_eq!(store.load(6)?.tensors[0].to_f32()?, w);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn prune(
        &mut self,
        series: Option<&str>,
        retention: &Retention,
    ) -> Result<PruneReport, Error> {
        self.become_writer()?;
        // Planned against the manifest as it is at the commit.
        let (report, removed) = self.commit_with(|store| {
            let (report, next, removed) = store.prune_plan(series, retention);
            let changed = !report.deleted.is_empty() || !removed.is_empty();
            Ok((changed.then_some(next), (report, removed)))
        })?;
        for id in &report.deleted {
            self.last.retain(|_, c| c.id != *id);
        }
        self.remove_files(&removed)?;
        Ok(report)
    }

    fn prune_plan(
        &self,
        series: Option<&str>,
        retention: &Retention,
    ) -> (PruneReport, ManifestBody, Vec<SnapshotInfo>) {
        let live = &self.manifest.snapshots;
        let mut keep: HashSet<u64> = HashSet::new();
        let mut all_series: Vec<&str> = live.iter().map(|s| s.series.as_str()).collect();
        all_series.sort_unstable();
        all_series.dedup();
        for name in all_series {
            let of: Vec<&SnapshotInfo> = live.iter().filter(|s| s.series == name).collect();
            let in_scope = series.is_none_or(|s| s == name);
            let n = retention
                .keep_last
                .filter(|_| in_scope)
                .unwrap_or(usize::MAX)
                .max(1);
            for (i, s) in of.iter().enumerate() {
                let keep_it = !in_scope
                    || i + n >= of.len()
                    || retention.keep_every.is_some_and(|k| k > 0 && s.id % k == 0)
                    || retention.pinned.contains(&s.id)
                    || self.is_pinned(s.id)
                    || !s.shards.is_empty();
                if keep_it {
                    keep.insert(s.id);
                }
            }
        }
        let mut next = self.manifest.clone();
        let (kept, deleted): (Vec<SnapshotInfo>, Vec<SnapshotInfo>) =
            std::mem::take(&mut next.snapshots)
                .into_iter()
                .partition(|s| keep.contains(&s.id));
        next.snapshots = kept;
        next.retired.extend(deleted.iter().cloned());
        next.retired.sort_by_key(|s| s.id);
        let removed = collect(&mut next);
        let report = PruneReport {
            kept: next.snapshots.iter().map(|s| s.id).collect(),
            deleted: deleted.iter().map(|s| s.id).collect(),
            removed: removed.iter().map(|s| s.id).collect(),
            freed_bytes: removed.iter().map(|s| s.stored_bytes).sum(),
            retired: next.retired.iter().map(|s| s.id).collect(),
            retired_bytes: next.retired.iter().map(|s| s.stored_bytes).sum(),
        };
        (report, next, removed)
    }

    /// Frees the space of retired snapshots now: rewrites every listed snapshot whose
    /// base is retired against its nearest listed ancestor (or as a full snapshot), then
    /// removes the retired files nothing needs. Decodes and re-encodes (losslessly; lossy
    /// payloads are copied), so it belongs off the save path; every snapshot decodes to
    /// exactly what it did before (checked against its state hash).
    pub fn compact(&mut self) -> Result<CompactReport, Error> {
        self.become_writer()?;
        // Rewritten and committed under the commit lock: other writers' commits wait.
        let (report, replaced) = self.commit_with(|store| store.compact_plan())?;
        self.remove_files(&replaced)?;
        Ok(report)
    }

    /// [`Store::compact`]'s rewrites (files written, nothing committed): the next
    /// manifest (`None`: nothing to do), the report and the snapshots whose files the
    /// commit frees.
    #[allow(clippy::type_complexity)]
    fn compact_plan(
        &self,
    ) -> Result<(Option<ManifestBody>, (CompactReport, Vec<SnapshotInfo>)), Error> {
        let mut next = self.manifest.clone();
        let mut replaced = Vec::new();
        let mut rewritten = Vec::new();
        // Above every id and generation a file carries, so no rewrite's name is
        // another's; `next_id` stays (a pending shard's id must stay pending).
        let mut generation = self.next_free_id()?;
        let retired: HashSet<u64> = next.retired.iter().map(|s| s.id).collect();
        for i in 0..next.snapshots.len() {
            let dep = next.snapshots[i].clone();
            if !dep.shards.is_empty() || !dep.base.is_some_and(|b| retired.contains(&b)) {
                continue;
            }
            // The nearest listed ancestor.
            let mut ancestor = dep.base;
            let mut steps = 0;
            while let Some(a) = ancestor.filter(|a| retired.contains(a)) {
                steps += 1;
                if steps > retired.len() {
                    break;
                }
                ancestor = self.chain_info(a).and_then(|s| s.base);
            }
            let new_base = ancestor
                .filter(|a| self.get(*a).is_some())
                .map(|a| self.base_state(a))
                .transpose()?;
            let info = self.rewrite(&dep, new_base.as_ref(), generation)?;
            generation += 1;
            replaced.push(dep);
            rewritten.push(info.id);
            next.snapshots[i] = info;
        }
        let removed = collect(&mut next);
        let written: u64 = next
            .snapshots
            .iter()
            .filter(|s| rewritten.contains(&s.id))
            .map(|s| s.stored_bytes)
            .sum();
        let freed = removed
            .iter()
            .chain(&replaced)
            .map(|s| s.stored_bytes)
            .sum::<u64>() as i64
            - written as i64;
        let report = CompactReport {
            rewritten,
            removed: removed.iter().map(|s| s.id).collect(),
            freed_bytes: freed,
        };
        if report.rewritten.is_empty() && removed.is_empty() {
            return Ok((None, (report, Vec::new())));
        }
        replaced.extend(removed);
        Ok((Some(next), (report, replaced)))
    }
}
