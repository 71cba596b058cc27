//! Verifying a store: every snapshot decoded, every checksum and chain link checked.

use std::collections::HashMap;
use std::sync::Arc;

use super::load::{LinkBase, check_link, decode_file};
use super::save::BaseState;
use super::{Store, VerifyReport};
use crate::Error;
use crate::format::SnapshotFile;

impl Store {
    /// Decodes every snapshot and checks every checksum, header, payload and decoded
    /// tensor, and the chain links between snapshots.
    pub fn verify(&self) -> Result<VerifyReport, Error> {
        let mut report = VerifyReport {
            orphans: self.orphans()?,
            retired: self.manifest.retired.iter().map(|s| s.id).collect(),
            ..VerifyReport::default()
        };
        // Decode in id order, keeping states only while a later snapshot needs them.
        let mut needed: HashMap<u64, usize> = HashMap::new();
        for s in &self.manifest.snapshots {
            if let Some(b) = s.base {
                *needed.entry(b).or_default() += 1;
            }
        }
        let mut states: HashMap<u64, BaseState> = HashMap::new();
        // The next snapshot's file is read while this one decodes.
        let mut prefetched: Option<(u64, Result<SnapshotFile, Error>)> = None;
        let snapshots = &self.manifest.snapshots;
        for (k, s) in snapshots.iter().enumerate() {
            if !s.shards.is_empty() {
                match self.verify_sharded(s) {
                    Ok(()) => report.ok.push(s.id),
                    Err(e) => report.failed.push((s.id, e)),
                }
                continue;
            }
            let file = match prefetched.take() {
                Some((id, f)) if id == s.id => f,
                _ => self.open_file(s.id),
            };
            let next = snapshots.get(k + 1).filter(|n| n.shards.is_empty());
            let decode = || {
                let file = file?;
                let prev = match s.base {
                    Some(b) => Some(
                        states
                            .get(&b)
                            .cloned()
                            .map_or_else(|| self.base_state(b), Ok)?,
                    ),
                    None => None,
                };
                let view = prev
                    .as_ref()
                    .map(|p| LinkBase::of_state(p.id, p.hash, &p.state));
                check_link(&file, view.as_ref(), self.decode_budget)?;
                let decoded = decode_file(&file, prev.as_ref().map(|p| p.state.as_slice()))?;
                let hash = file.header.state_hash();
                if hash != s.state_hash {
                    return Err(Error::Checksum {
                        file: file.path.clone(),
                        tensor: None,
                        what: "manifest state hash",
                        offset: 0,
                        expected: s.state_hash,
                        actual: hash,
                    });
                }
                Ok::<_, Error>(BaseState {
                    id: s.id,
                    state: Arc::new(decoded),
                    hash,
                })
            };
            let (result, next_file) =
                rayon::join(decode, || next.map(|n| (n.id, self.open_file(n.id))));
            prefetched = next_file;
            match result {
                Ok(state) => {
                    report.ok.push(s.id);
                    if needed.contains_key(&s.id) {
                        states.insert(s.id, state);
                    }
                }
                Err(e) => report.failed.push((s.id, e)),
            }
            if let Some(b) = s.base
                && let Some(n) = needed.get_mut(&b)
            {
                *n -= 1;
                if *n == 0 {
                    states.remove(&b);
                }
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use crate::{Error, Policy, Role, Store, Tensor};

    #[test]
    fn verify_reports_the_broken_snapshot_and_its_dependants() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
        let mut w: Vec<f32> = (0..2000).map(|i| i as f32).collect();
        let mut files = Vec::new();
        for step in 0..2 {
            w[step] = 0.25;
            let t = Tensor::from_f32("w", &[2000], Role::Weight, &w).unwrap();
            files.push(store.save(&format!("s{step}"), vec![t]).unwrap().info.file);
        }
        assert_eq!(store.verify().unwrap().ok, vec![1, 2]);
        let path = dir.path().join(&files[0]);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 1; // in the first payload
        std::fs::write(&path, bytes).unwrap();
        let report = Store::open(dir.path()).unwrap().verify().unwrap();
        let failed: Vec<u64> = report.failed.iter().map(|(id, _)| *id).collect();
        assert_eq!(failed, vec![1, 2]);
        assert!(matches!(report.failed[0].1, Error::Checksum { .. }));
    }
}
