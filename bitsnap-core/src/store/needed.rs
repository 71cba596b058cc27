//! Restoring from the payloads a restore needs, not whole chain files.
//!
//! A chain's earlier snapshots hold many payloads that a later one overwrites with a
//! payload that needs no base (a tensor stored full again, cluster codes): restoring the
//! last snapshot never reads them. [`needed_payloads`] says which payloads are read;
//! [`Store::restore_chain_needed`] reads of each file its preamble, header and trailer,
//! then only those payloads (contiguous ones in one read, large ones split across
//! threads), and checks everything [`Store::restore_chain`] checks.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use rayon::prelude::*;

use super::{MAX_SNAPSHOT_BYTES, RestoreChain, Store};
use crate::Error;
use crate::format::{
    Entry, Header, PREAMBLE_BYTES, RefScope, SnapshotFile, TRAILER_BYTES, Trailer, check_preamble,
    parse_region,
};

/// Largest single read of payload bytes: larger runs are split so that threads share
/// them.
const READ_PIECE_BYTES: u64 = 32 << 20;

/// For each header of a chain (root first), the tensors whose payloads restoring the
/// last snapshot reads: every tensor of the last; in each earlier one, what the next
/// one's needed payloads decode against (the base of a delta, the target of a
/// base-scope reference), closed over same-snapshot references.
///
/// ```
/// use bitsnap_core::{Policy, Role, Store, Tensor};
/// let dir = tempfile::tempdir().unwrap();
/// let mut store = Store::open_or_create(dir.path(), Policy::default().with_min_delta_gain(0.0)).unwrap();
/// let w: Vec<f32> = (0..4096).map(|i| i as f32).collect();
/// let x: Vec<f32> = (0..4096).map(|i| (i as f32).sin()).collect();
/// let state = |w: &[f32], x: &[f32]| vec![
///     Tensor::from_f32("w", &[4096], Role::Weight, w).unwrap(),
///     Tensor::from_f32("x", &[4096], Role::Weight, x).unwrap(),
/// ];
/// store.save("a", state(&w, &x)).unwrap();
/// let mut v = w.clone();
/// v[3] = -1.0;
/// let y: Vec<f32> = (0..4096).map(|i| (i as f32 * 7.1).cos()).collect(); // all new
/// let b = store.save("b", state(&v, &y)).unwrap().info.id;
/// // `w` is a delta in `b`: its payload in `a` is needed; `x` is stored anew, not.
/// let chain = store.restore_chain_needed(b, None).unwrap();
/// let needed = chain.needed();
/// assert!(needed[0].contains("w") && !needed[0].contains("x"));
/// assert_eq!(needed[1].len(), 2);
/// assert_eq!(chain.decode().unwrap(), store.load(b).unwrap().tensors);
/// ```
pub(crate) fn needed_payloads(headers: &[&Header]) -> Vec<HashSet<String>> {
    let mut needed = vec![HashSet::new(); headers.len()];
    let mut want: Vec<&str> = headers
        .last()
        .map(|h| h.entries.iter().map(|e| e.name.as_str()).collect())
        .unwrap_or_default();
    for (k, header) in headers.iter().enumerate().rev() {
        let by_name: HashMap<&str, &Entry> = header
            .entries
            .iter()
            .map(|e| (e.name.as_str(), e))
            .collect();
        let mut set = HashSet::new();
        let mut prev = Vec::new();
        while let Some(name) = want.pop() {
            let Some(e) = by_name.get(name) else { continue };
            if !set.insert(e.name.clone()) {
                continue;
            }
            if e.codec.needs_base() {
                prev.push(e.name.as_str());
            }
            for r in &e.references {
                match r.scope {
                    RefScope::Snapshot => want.push(r.name.as_str()),
                    RefScope::Base => prev.push(r.name.as_str()),
                }
            }
        }
        if let Some(slot) = needed.get_mut(k) {
            *slot = set;
        }
        want = prev;
    }
    needed
}

/// The parts of a snapshot file read before its payloads.
struct Head {
    len: u64,
    preamble: Vec<u8>,
    region: Vec<u8>,
    trailer: Vec<u8>,
    header: Header,
}

impl Store {
    /// [`Store::restore_chains`] reading only the payloads a restore of `id` needs
    /// ([`Store::restore_chain_needed`]).
    pub fn restore_chains_needed(&self, id: u64) -> Result<Vec<RestoreChain>, Error> {
        let world = self.info(id)?.shards.len() as u32;
        if world == 0 {
            return Ok(vec![self.restore_chain_needed(id, None)?]);
        }
        (0..world)
            .map(|rank| self.restore_chain_needed(id, Some(rank)))
            .collect()
    }

    /// [`Store::restore_chain`] reading of each file its preamble, header and trailer,
    /// then only the payloads restoring `id` needs ([`RestoreChain::needed`]); the chain
    /// is checked as [`Store::restore_chain`] checks it. Payloads not read are not there:
    /// [`SnapshotFile::payload`] of one fails its checksum; [`RestoreChain::decode`]
    /// decodes only the ones read.
    pub fn restore_chain_needed(&self, id: u64, rank: Option<u32>) -> Result<RestoreChain, Error> {
        let names = self.chain_files(id, rank)?;
        let heads = names
            .par_iter()
            .map(|(_, name, _)| self.read_head(name))
            .collect::<Result<Vec<_>, Error>>()?;
        let needed = needed_payloads(&heads.iter().map(|h| &h.header).collect::<Vec<_>>());
        let files = names
            .par_iter()
            .zip(heads)
            .zip(&needed)
            .map(|(((sid, name, attempt), head), keep)| {
                let f = self.read_needed(name, head, keep)?;
                if f.header.id != *sid {
                    return Err(Error::Malformed {
                        file: f.path.clone(),
                        tensor: None,
                        what: "header",
                        offset: 0,
                        reason: format!(
                            "holds snapshot {} where the manifest expects {sid}",
                            f.header.id
                        ),
                    });
                }
                if rank.is_some() && f.header.attempt != *attempt {
                    return Err(Error::StaleShard {
                        file: f.path.clone(),
                        expected: *attempt,
                        actual: f.header.attempt,
                    });
                }
                Ok(f)
            })
            .collect::<Result<Vec<_>, Error>>()?;
        self.check_chain(id, &files)?;
        let mut chain = self.chain_of(id, rank, files);
        chain.read_only = Some(needed);
        Ok(chain)
    }

    /// Reads and checks the preamble, trailer and header of snapshot file `name`.
    fn read_head(&self, name: &str) -> Result<Head, Error> {
        let path = self.backend.path_of(name);
        let len = self.backend.size(name)?.ok_or_else(|| {
            Error::io(
                &path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "snapshot file is missing"),
            )
        })?;
        if len > MAX_SNAPSHOT_BYTES {
            return Err(Error::Limit {
                file: path,
                what: "snapshot file bytes",
                value: len,
                limit: MAX_SNAPSHOT_BYTES,
            });
        }
        let pre = PREAMBLE_BYTES as u64;
        let t_at = len
            .checked_sub(TRAILER_BYTES as u64)
            .filter(|&t| t >= pre)
            .ok_or_else(|| Error::Truncated {
                file: path.clone(),
                offset: len,
                what: "trailer".into(),
            })?;
        let preamble = self.backend.read_range(name, 0..pre)?;
        let version = check_preamble(&preamble, &path)?;
        let trailer_bytes = self.backend.read_range(name, t_at..len)?;
        let trailer = Trailer::parse(&trailer_bytes, len, &path)?;
        let h_at = trailer.header_offset;
        if h_at < pre || h_at > t_at {
            return Err(Error::Truncated {
                file: path,
                offset: h_at,
                what: "header".into(),
            });
        }
        let region = self.backend.read_range(name, h_at..t_at)?;
        let header = parse_region(&region, &trailer, version, &path)?;
        Ok(Head {
            len,
            preamble,
            region,
            trailer: trailer_bytes,
            header,
        })
    }

    /// Reads the payloads of the tensors in `keep` into a buffer of the file's size
    /// (the rest stays zero: never read, never touched), and checks it as a snapshot
    /// file.
    fn read_needed(
        &self,
        name: &str,
        head: Head,
        keep: &HashSet<String>,
    ) -> Result<SnapshotFile, Error> {
        let path = self.backend.path_of(name);
        let h_at = head.len - (TRAILER_BYTES + head.region.len()) as u64;
        // Runs of contiguous needed payloads inside the data section, split in pieces.
        let mut runs: Vec<Range<u64>> = Vec::new();
        for e in head
            .header
            .entries
            .iter()
            .filter(|e| keep.contains(&e.name))
        {
            let Some(end) = e.offset.checked_add(e.len).filter(|&end| end <= h_at) else {
                continue; // refused by the tiling check below
            };
            if e.offset < PREAMBLE_BYTES as u64 || e.len == 0 {
                continue;
            }
            match runs.last_mut() {
                Some(r) if r.end == e.offset => r.end = end,
                _ => runs.push(e.offset..end),
            }
        }
        let mut pieces = Vec::new();
        for r in runs {
            let mut at = r.start;
            while at < r.end {
                let end = (at + READ_PIECE_BYTES).min(r.end);
                pieces.push(at..end);
                at = end;
            }
        }
        // Zeroed from the allocator (calloc): pages are mapped lazily, so the bytes never
        // read cost no memory traffic.
        let mut bytes: Vec<u8> =
            bytemuck::allocation::try_zeroed_vec(head.len as usize).map_err(|()| Error::Alloc {
                what: path.display().to_string(),
                bytes: head.len,
            })?;
        let pre = PREAMBLE_BYTES;
        bytes[..pre].copy_from_slice(&head.preamble);
        let t_at = bytes.len() - TRAILER_BYTES;
        bytes[h_at as usize..t_at].copy_from_slice(&head.region);
        bytes[t_at..].copy_from_slice(&head.trailer);
        // Disjoint slices for the pieces (ascending, inside the data section).
        let mut slots = Vec::with_capacity(pieces.len());
        let mut rest: &mut [u8] = &mut bytes[..];
        let mut at = 0u64;
        for p in &pieces {
            let (_, tail) = rest.split_at_mut((p.start - at) as usize);
            let (slot, tail) = tail.split_at_mut((p.end - p.start) as usize);
            slots.push((p.clone(), slot));
            rest = tail;
            at = p.end;
        }
        slots.into_par_iter().try_for_each(|(range, slot)| {
            let got = self.backend.read_range(name, range)?;
            slot.copy_from_slice(&got);
            Ok::<(), Error>(())
        })?;
        SnapshotFile::from_bytes(bytes, &path)
    }
}

#[cfg(test)]
mod tests {
    use crate::format::SnapshotFile;
    use crate::{Error, Policy, Role, Store, Tensor};

    fn floats(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 * 1e-9)
            .collect()
    }

    /// `w` changes in one element per save (a delta on the file before), `x` changes its
    /// shape (so it is stored anew): restoring the last save needs `w` from every file, `x` from the
    /// last only. Returns the store and the ids.
    fn chain(dir: &std::path::Path) -> (Store, Vec<u64>) {
        let policy = Policy::default()
            .with_min_delta_gain(0.0)
            .with_full_every(u32::MAX);
        let mut store = Store::open_or_create(dir, policy).unwrap();
        let mut w = floats(5000, 1);
        let mut ids = Vec::new();
        for k in 0..3u32 {
            w[k as usize * 7] = -1.0 - k as f32;
            let state = vec![
                Tensor::from_f32("w", &[5000], Role::Weight, &w).unwrap(),
                Tensor::from_f32(
                    "x",
                    &[5000 + u64::from(k)],
                    Role::Weight,
                    &floats(5000 + k as usize, 99),
                )
                .unwrap(),
            ];
            ids.push(store.save(&format!("s{k}"), state).unwrap().info.id);
        }
        (store, ids)
    }

    /// Flips a byte in the middle of `tensor`'s payload in snapshot `id`'s file.
    fn corrupt(store: &Store, id: u64, tensor: &str) -> std::path::PathBuf {
        let path = store.dir().join(&store.get(id).unwrap().file);
        let file = SnapshotFile::open(&path).unwrap();
        let e = file
            .header
            .entries
            .iter()
            .find(|e| e.name == tensor)
            .unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[(e.offset + e.len / 2) as usize] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn only_needed_payloads_are_read_and_they_decode_like_the_whole_chain() {
        let dir = tempfile::tempdir().unwrap();
        let (store, ids) = chain(dir.path());
        let last = *ids.last().unwrap();
        let chain = store.restore_chain_needed(last, None).unwrap();
        let needed = chain.needed();
        assert_eq!(needed.len(), 3);
        for (k, n) in needed.iter().enumerate() {
            assert!(n.contains("w"), "{k}");
            assert_eq!(n.contains("x"), k == 2, "{k}");
        }
        assert_eq!(chain.decode().unwrap(), store.load(last).unwrap().tensors);
        // An unneeded payload is not read: corrupting it changes nothing...
        corrupt(&store, ids[0], "x");
        let again = store.restore_chain_needed(last, None).unwrap();
        assert_eq!(again.decode().unwrap(), chain.decode().unwrap());
        // ...while a needed one is checked, and the error names its file and tensor.
        let path = corrupt(&store, ids[1], "w");
        let err = store
            .restore_chain_needed(last, None)
            .unwrap()
            .decode()
            .unwrap_err();
        match err {
            Error::Checksum { file, tensor, .. } => {
                assert_eq!((file, tensor.as_deref()), (path, Some("w")))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_cut_file_is_refused_before_its_payloads_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let (store, ids) = chain(dir.path());
        let path = store.dir().join(&store.get(ids[1]).unwrap().file);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let err = store.restore_chain_needed(ids[2], None).unwrap_err();
        assert!(matches!(err, Error::Truncated { .. }), "{err:?}");
        std::fs::write(&path, &bytes[..10]).unwrap();
        let err = store.restore_chain_needed(ids[2], None).unwrap_err();
        assert!(matches!(err, Error::Truncated { .. }), "{err:?}");
    }
}
