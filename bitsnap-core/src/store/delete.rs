//! Deleting a snapshot: its dependants are first rewritten against its own base.

use std::collections::HashMap;

use super::load::{LinkBase, check_link, decode_file};
use super::save::EncodedTensor;
use super::{SnapshotInfo, Store};
use crate::codec::{CodecId, Encoded};
use crate::format::Reference;
use crate::{Error, Policy, Tensor};

impl Store {
    /// Deletes snapshot `id`. Snapshots that are deltas on it are first rewritten against
    /// its own base (or as full snapshots), so every other snapshot stays readable and
    /// decodes to exactly what it did before.
    pub fn delete(&mut self, id: u64) -> Result<(), Error> {
        self.take_lock()?;
        let victim = self.info(id)?.clone();
        if !victim.shards.is_empty() {
            return self.delete_sharded(id);
        }
        let dependants: Vec<SnapshotInfo> = self
            .manifest
            .snapshots
            .iter()
            .filter(|s| s.base == Some(id))
            .cloned()
            .collect();
        let new_base = victim.base.map(|b| self.base_state(b)).transpose()?;
        let mut next = self.manifest.clone();
        let mut replaced = Vec::new();
        // What the victim decodes to: every dependant was encoded against it.
        let victim_state = if dependants.is_empty() {
            None
        } else {
            Some(self.base_state(id)?)
        };
        let base_map: HashMap<&str, &Tensor> = new_base
            .as_ref()
            .map(|b| b.state.iter().map(|t| (t.name.as_str(), t)).collect())
            .unwrap_or_default();
        for (gen_i, dep) in dependants.iter().enumerate() {
            let file = self.open_file(dep.id)?;
            let victim_view = victim_state
                .as_ref()
                .map(|v| LinkBase::of_state(v.id, v.hash, &v.state));
            check_link(&file, victim_view.as_ref(), self.decode_budget)?;
            let dep_state = decode_file(&file, victim_state.as_ref().map(|v| v.state.as_slice()))?;
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
                    let encoded =
                        lossless.encode_tensor(t, base_map.get(t.name.as_str()).copied())?;
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
            let base = new_base
                .as_ref()
                .filter(|_| uses_base)
                .map(|b| b.base_ref());
            let name = format!("snap-{:020}-r{}.bsnap", dep.id, next.next_id + gen_i as u64);
            let (header, stored) = self.write_snapshot(
                &name,
                dep.id,
                &dep.name,
                base,
                0,
                file.header.metadata.clone(),
                items.iter().map(|(t, (e, d), r)| (t, e, d, r.as_slice())),
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
            if let Some(s) = next.snapshots.iter_mut().find(|s| s.id == dep.id) {
                replaced.push(s.file.clone());
                s.file = name;
                s.base = base.map(|b| b.id);
                s.stored_bytes = stored;
            }
        }
        next.snapshots.retain(|s| s.id != id);
        next.next_id += dependants.len() as u64;
        self.write_manifest(next)?;
        replaced.push(victim.file.clone());
        for f in replaced {
            self.backend.remove(&f)?;
        }
        self.backend.sync()?;
        self.last.retain(|_, c| c.id != id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::{Policy, Role, Store, Tensor};

    #[test]
    fn deleting_a_base_rebases_its_dependant() {
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
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.get(3).unwrap().base, Some(1));
        assert!(store.get(3).unwrap().file.contains("-r"));
        assert_eq!(store.load(3).unwrap().tensors, vec![saved[2].clone()]);
        assert!(store.verify().unwrap().failed.is_empty());
    }
}
