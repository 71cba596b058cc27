//! Deleting snapshots without re-encoding (FORMAT.md 5): a deleted snapshot that a
//! listed delta still reads is *retired* — dropped from every query, its file kept —
//! and removed, with any retired ancestors, once nothing listed depends on it. The
//! explicit, off-save-path rewrite of such deltas ([`Store::compact`]) is `rewrite`.

use std::collections::{HashMap, HashSet};

use super::load::{LinkBase, check_link, decode_file};
use super::manifest::ManifestBody;
use super::save::{BaseState, EncodedTensor};
use super::{SnapshotInfo, Store};
use crate::codec::{CodecId, Encoded};
use crate::format::Reference;
use crate::{Error, Policy, Tensor};

impl Store {
    /// Deletes snapshot `id`: it leaves every listing and query at once (one manifest
    /// commit) and nothing is decoded or re-encoded. If a listed delta still reads it,
    /// its file stays, *retired* ([`Store::retired`]), until the deletion that leaves
    /// nothing listed depending on it removes it with its retired ancestors; with
    /// [`Policy::full_every`](crate::Policy) `F` that bounds the files kept by
    /// keep-last-`N` to `F + N` (FORMAT.md 5). [`Store::compact`] rewrites the deltas to
    /// free that space now.
    ///
    /// Fails with [`Error::WrongKind`] for a pinned snapshot ([`Store::pin`]) and with
    /// [`Error::InUse`] for the base of shard deltas.
    ///
    /// ```
    /// use bitsnap_core::{Policy, Role, Store, Tensor};
    /// let dir = tempfile::tempdir()?;
    /// let mut store = Store::open_or_create(dir.path(), Policy::default())?;
    /// let mut w: Vec<f32> = (0..10_000).map(|i| i as f32 * 1e-3).collect();
    /// for step in 0..3 {
    ///     w[step] += 1.0;
    ///     store.save(&format!("step-{step}"), vec![Tensor::from_f32("w", &[10_000], Role::Weight, &w)?])?;
    /// }
    /// assert_eq!(store.get(2).unwrap().base, Some(1)); // a delta on 1
    /// store.delete(1)?; // the chain root: retired, since 2 is a delta on it
    /// assert_eq!(store.snapshots().iter().map(|s| s.id).collect::<Vec<_>>(), vec![2, 3]);
    /// assert_eq!(store.retired().iter().map(|s| s.id).collect::<Vec<_>>(), vec![1]);
    /// store.delete(2)?; // 3 still reads 2 and 1
    /// store.delete(3)?; // nothing listed needs 1 or 2 now: all three files go
    /// assert!(store.retired().is_empty());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn delete(&mut self, id: u64) -> Result<(), Error> {
        self.become_writer()?;
        let victim = self.info(id)?;
        if !victim.shards.is_empty() {
            self.refuse_pinned(id)?;
            return self.delete_sharded(id);
        }
        self.retire(&[id]).map(|_| ())
    }

    pub(crate) fn refuse_pinned(&self, id: u64) -> Result<(), Error> {
        if self.is_pinned(id) {
            return Err(Error::WrongKind {
                store: self.dir.clone(),
                snapshot: id,
                reason: "is pinned: unpin it before deleting it".into(),
            });
        }
        Ok(())
    }

    /// Retires the unsharded snapshots `ids` in one manifest commit (checked against the
    /// manifest as it is at the commit), then removes the files nothing listed needs.
    /// Returns the ids whose files were removed.
    pub(crate) fn retire(&mut self, ids: &[u64]) -> Result<Vec<u64>, Error> {
        self.become_writer()?;
        let removed = self.commit_with(|store| {
            let mut next = store.manifest.clone();
            for &id in ids {
                store.refuse_pinned(id)?;
                let pos = next
                    .snapshots
                    .iter()
                    .position(|s| s.id == id)
                    .ok_or_else(|| Error::UnknownSnapshot {
                        store: store.dir.clone(),
                        snapshot: id.to_string(),
                    })?;
                let victim = next.snapshots.remove(pos);
                if !victim.shards.is_empty() {
                    return Err(Error::WrongKind {
                        store: store.dir.clone(),
                        snapshot: id,
                        reason: "is sharded: delete it on its own with Store::delete".into(),
                    });
                }
                next.retired.push(victim);
            }
            next.retired.sort_by_key(|s| s.id);
            let removed = collect(&mut next);
            Ok((Some(next), removed))
        })?;
        for id in ids {
            self.last.retain(|_, c| c.id != *id);
        }
        self.remove_files(&removed)?;
        Ok(removed.iter().map(|s| s.id).collect())
    }

    /// Rewrites listed snapshot `dep` as a delta on `new_base` (or as a full snapshot):
    /// decodes it, re-encodes the payloads that depend on a base losslessly, copies the
    /// others. Writes file `snap-<id>-r<generation>.bsnap`; returns the updated listing.
    pub(crate) fn rewrite(
        &self,
        dep: &SnapshotInfo,
        new_base: Option<&BaseState>,
        generation: u64,
    ) -> Result<SnapshotInfo, Error> {
        let file = self.open_file(dep.id)?;
        let old_base = dep.base.map(|b| self.base_state(b)).transpose()?;
        let old_view = old_base
            .as_ref()
            .map(|v| LinkBase::of_state(v.id, v.hash, &v.state));
        check_link(&file, old_view.as_ref(), self.decode_budget)?;
        let dep_state = decode_file(&file, old_base.as_ref().map(|v| v.state.as_slice()))?;
        let base_map: HashMap<&str, &Tensor> = new_base
            .map(|b| b.state.iter().map(|t| (t.name.as_str(), t)).collect())
            .unwrap_or_default();
        // Payloads that do not depend on the base are copied as they are (a quantized
        // tensor must not be quantized twice); the others are re-encoded losslessly.
        let lossless = Policy {
            lossiness: crate::Lossiness::Lossless,
            ..self.policy
        };
        let mut items: Vec<(Tensor, EncodedTensor, Vec<Reference>)> =
            Vec::with_capacity(file.header.entries.len());
        for (entry, t) in file.header.entries.iter().zip(dep_state.iter()) {
            if entry.codec.needs_base() {
                let encoded = lossless.encode_tensor(t, base_map.get(t.name.as_str()).copied())?;
                items.push((t.clone(), encoded, Vec::new()));
            } else {
                let payload = file.payload(entry)?.to_vec();
                let lossy = (entry.codec == CodecId::Cluster)
                    .then(|| (t.data.clone(), entry.decision.error.unwrap_or_default()));
                items.push((
                    t.clone(),
                    (
                        Encoded {
                            codec: entry.codec,
                            payload,
                            lossy,
                        },
                        entry.decision.clone(),
                    ),
                    // Reference payloads keep their references.
                    entry.references.clone(),
                ));
            }
        }
        let uses_base = items.iter().any(|(_, (e, _), _)| e.codec.needs_base());
        let base = new_base.filter(|_| uses_base).map(|b| b.base_ref());
        let name = format!("snap-{:020}-r{generation}.bsnap", dep.id);
        let (header, stored) = self.write_snapshot(
            &name,
            dep.id,
            &dep.name,
            base,
            0,
            file.header.metadata.clone(),
            items.iter().map(|(t, (e, d), r)| (t, e, d, r.as_slice())),
            &mut super::SaveTimings::default(),
        )?;
        if header.state_hash() != dep.state_hash {
            return Err(Error::Checksum {
                file: self.backend.path_of(&name),
                tensor: None,
                what: "rebased state",
                offset: 0,
                expected: dep.state_hash,
                actual: header.state_hash(),
            });
        }
        Ok(SnapshotInfo {
            file: name,
            base: base.map(|b| b.id),
            stored_bytes: stored,
            ..dep.clone()
        })
    }
}

/// Drops from `next.retired` every snapshot that no listed snapshot (or shard) needs,
/// directly or through other retired ones, and returns them.
pub(crate) fn collect(next: &mut ManifestBody) -> Vec<SnapshotInfo> {
    let bases: HashMap<u64, Option<u64>> = next.retired.iter().map(|s| (s.id, s.base)).collect();
    let mut needed = HashSet::new();
    let roots = next.snapshots.iter().flat_map(|s| {
        std::iter::once(s.base)
            .chain(s.shards.iter().map(|h| h.base))
            .flatten()
    });
    for root in roots {
        let mut cur = Some(root);
        // Each retired id is entered once, so this ends even on a cyclic listing.
        while let Some(b) = cur {
            if !bases.contains_key(&b) || !needed.insert(b) {
                break;
            }
            cur = bases.get(&b).copied().flatten();
        }
    }
    let (kept, removed) = std::mem::take(&mut next.retired)
        .into_iter()
        .partition(|s| needed.contains(&s.id));
    next.retired = kept;
    removed
}

#[cfg(test)]
mod tests {
    use crate::{Policy, Role, Store, Tensor};

    #[test]
    fn deleting_a_base_retires_it_until_its_dependant_goes() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
        let mut w: Vec<f32> = (0..2000).map(|i| i as f32).collect();
        let mut saved = Vec::new();
        for step in 0..3 {
            w[step * 7] = 0.5;
            let t = Tensor::from_f32("w", &[2000], Role::Weight, &w).unwrap();
            saved.push(t.clone());
            store.save(&format!("s{step}"), vec![t]).unwrap();
        }
        store.delete(2).unwrap();
        let reopened = Store::open(dir.path()).unwrap();
        assert!(reopened.get(2).is_none());
        assert_eq!(reopened.get(3).unwrap().base, Some(2));
        assert_eq!(reopened.retired()[0].id, 2);
        assert_eq!(reopened.load(3).unwrap().tensors, vec![saved[2].clone()]);
        let report = reopened.verify().unwrap();
        assert!(report.failed.is_empty() && report.orphans.is_empty());
        assert_eq!(report.retired, vec![2]);
        store.delete(3).unwrap();
        assert!(store.retired().is_empty());
        assert!(!dir.path().join("snap-00000000000000000002.bsnap").exists());
    }
}
