//! Loading: the one checked chain reader ([`RestoreChain`]) behind [`Store::load`],
//! [`Store::verify`], the bases of saves and deletions, and the GPU loader of
//! `bitsnap-burn`.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use rayon::prelude::*;

use super::{Snapshot, SnapshotInfo, Store, budget};
use crate::format::{Entry, Header, RefScope, SnapshotFile};
use crate::{DType, Error, Tensor};

/// The files to decode, in order, to restore one snapshot (or one rank's part of a
/// sharded snapshot): from the full snapshot at the root of its chain to the snapshot
/// itself, each read into memory and checked before anything is decoded:
///
/// - every file holds the snapshot the manifest lists (id; for shards, the commit
///   attempt);
/// - every file's base is the file before it (id and state hash), the root has none;
/// - every delta-coded tensor has a tensor of the same name, dtype and shape in the file
///   before it, and every base reference (format v2) names one;
/// - decoding each file, while the state before it is held, fits the store's decode
///   budget ([`Store::with_decode_budget`]).
///
/// Payloads are borrowed from the files and checksum-verified as they are taken
/// ([`ChainLink::payload`]); errors name the real file path and the tensor.
///
/// ```
/// use bitsnap_core::{Policy, Role, Store, Tensor};
/// let dir = tempfile::tempdir().unwrap();
/// let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
/// let mut w: Vec<f32> = (0..4096).map(|i| i as f32).collect();
/// store.save("a", vec![Tensor::from_f32("w", &[4096], Role::Weight, &w).unwrap()]).unwrap();
/// w[3] = -1.0;
/// let b = store.save("b", vec![Tensor::from_f32("w", &[4096], Role::Weight, &w).unwrap()]).unwrap();
///
/// // One chain per part: one for an unsharded snapshot, one per rank of a sharded one.
/// let chains = store.restore_chains(b.info.id).unwrap();
/// assert_eq!(chains.len(), 1);
/// let chain = &chains[0];
/// assert_eq!(chain.files().len(), 2); // full root, then the delta
/// for link in chain.links() {
///     for &i in &link.decode_order() {
///         let entry = &link.file.header.entries[i];
///         let payload: &[u8] = link.payload(entry).unwrap(); // verified, borrowed
///         // A delta's base tensor is in the file before it, dtype and shape checked.
///         if entry.codec.needs_base() {
///             let base = link.base_entry(entry).unwrap();
///             assert_eq!((base.dtype, &base.shape), (entry.dtype, &entry.shape));
///         }
///         println!("{}: {} {} bytes", link.path().display(), entry.name, payload.len());
///     }
/// }
/// // Or decode it all on the host.
/// assert_eq!(chain.decode().unwrap()[0].to_f32().unwrap(), w);
/// ```
#[derive(Debug)]
pub struct RestoreChain {
    snapshot: u64,
    rank: Option<u32>,
    files: Vec<SnapshotFile>,
    /// For a chain read by [`Store::restore_chain_needed`]: per file, the tensors whose
    /// payloads were read (the others were not).
    pub(super) read_only: Option<Vec<HashSet<String>>>,
}

/// One file of a [`RestoreChain`] and the file before it (its base), if any.
#[derive(Debug, Clone, Copy)]
pub struct ChainLink<'a> {
    /// Position in the chain (0: the root, a full snapshot).
    pub step: usize,
    /// The file.
    pub file: &'a SnapshotFile,
    /// The file before it, which its delta payloads are decoded against.
    pub base: Option<&'a SnapshotFile>,
}

impl<'a> ChainLink<'a> {
    /// The real path of the file, for error messages.
    pub fn path(&self) -> &'a Path {
        &self.file.path
    }

    /// The checksum-verified payload of `entry` (one of this file's), borrowed.
    pub fn payload(&self, entry: &Entry) -> Result<&'a [u8], Error> {
        self.file.payload(entry)
    }

    /// The entry of the same tensor in the base file, if there is a base file and it has
    /// one. For delta-coded entries the chain checked that it exists with the same dtype
    /// and shape.
    pub fn base_entry(&self, entry: &Entry) -> Option<&'a Entry> {
        self.base?
            .header
            .entries
            .iter()
            .find(|b| b.name == entry.name)
    }

    /// The order in which to decode this file's entries: referenced tensors first
    /// ([`Header::decode_order`]).
    pub fn decode_order(&self) -> Vec<usize> {
        self.file.header.decode_order()
    }
}

impl RestoreChain {
    /// The snapshot this chain restores.
    pub fn snapshot(&self) -> u64 {
        self.snapshot
    }

    /// For a sharded snapshot, the rank whose part this chain restores.
    pub fn rank(&self) -> Option<u32> {
        self.rank
    }

    /// The files in decoding order: the root (full) first, the snapshot itself last.
    pub fn files(&self) -> &[SnapshotFile] {
        &self.files
    }

    /// The snapshot's own file (the last of the chain).
    pub fn target(&self) -> &SnapshotFile {
        // A chain is never empty: `Store::restore_chain` builds it from at least one file.
        &self.files[self.files.len() - 1]
    }

    /// Each file with its base, in decoding order.
    pub fn links(&self) -> impl Iterator<Item = ChainLink<'_>> {
        self.files.iter().enumerate().map(|(step, file)| ChainLink {
            step,
            file,
            base: step.checked_sub(1).and_then(|b| self.files.get(b)),
        })
    }

    /// Decodes the chain on the host: the snapshot's tensors, in header order. (A chain
    /// read by [`Store::restore_chain_needed`] decodes the payloads it read, which are
    /// all a restore needs.)
    pub fn decode(&self) -> Result<Vec<Tensor>, Error> {
        let mut state: Option<Vec<Tensor>> = None;
        for (k, file) in self.files.iter().enumerate() {
            let keep = self.read_only.as_ref().and_then(|r| r.get(k));
            state = Some(decode_file_only(file, state.as_deref(), keep)?);
        }
        Ok(state.unwrap_or_default())
    }

    /// Per file of the chain, the tensors whose payloads restoring the snapshot reads:
    /// every tensor of the last file; in each earlier one, what the next one's needed
    /// payloads decode against (bases of deltas, base-scope references), closed over
    /// same-snapshot references. A chain read by
    /// [`Store::restore_chain_needed`] holds no others.
    pub fn needed(&self) -> Vec<HashSet<String>> {
        match &self.read_only {
            Some(r) => r.clone(),
            None => {
                super::needed_payloads(&self.files.iter().map(|f| &f.header).collect::<Vec<_>>())
            }
        }
    }

    /// [`RestoreChain::decode`], handing each tensor of the snapshot (the chain's last
    /// file) to `sink` with its header index as soon as it is decoded and checked, on
    /// the rayon thread that decoded it, in no particular order: a restore can write
    /// tensors out while others are still decoding. The first error of `sink` stops the
    /// decode and is returned.
    ///
    /// ```
    /// use bitsnap_core::{Policy, Role, Store, Tensor};
    /// use std::sync::Mutex;
    /// let dir = tempfile::tempdir().unwrap();
    /// let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    /// let t = Tensor::from_f32("w", &[3], Role::Weight, &[1.0, 2.0, 3.0]).unwrap();
    /// let id = store.save("a", vec![t.clone()]).unwrap().info.id;
    /// let seen = Mutex::new(Vec::new());
    /// let chain = Store::open(dir.path()).unwrap().restore_chain(id, None).unwrap();
    /// let all = chain
    ///     .decode_with(|i, t| Ok(seen.lock().unwrap().push((i, t.name.clone()))))
    ///     .unwrap();
    /// assert_eq!(all, vec![t]);
    /// assert_eq!(seen.into_inner().unwrap(), vec![(0, "w".to_string())]);
    /// ```
    pub fn decode_with<F>(&self, sink: F) -> Result<Vec<Tensor>, Error>
    where
        F: Fn(usize, &Tensor) -> Result<(), Error> + Sync,
    {
        let mut state: Option<Vec<Tensor>> = None;
        let last = self.files.len().saturating_sub(1);
        for (step, file) in self.files.iter().enumerate() {
            let sink: Option<&Sink<'_>> = if step == last { Some(&sink) } else { None };
            let keep = self.read_only.as_ref().and_then(|r| r.get(step));
            state = Some(decode_file_inner(file, state.as_deref(), keep, sink)?);
        }
        Ok(state.unwrap_or_default())
    }

    /// Decodes the chain into the snapshot `info` describes, with the target's metadata.
    pub(crate) fn into_snapshot(self, info: SnapshotInfo) -> Result<Snapshot, Error> {
        Ok(Snapshot {
            tensors: self.decode()?,
            metadata: self.target().header.metadata.clone(),
            info,
            from_memory: false,
        })
    }

    /// The files, taken out.
    pub fn into_files(self) -> Vec<SnapshotFile> {
        self.files
    }
}

/// What a file is decoded against: the id, state hash and tensor shapes of the
/// snapshot before it in its chain.
pub(crate) struct LinkBase<'a> {
    pub(crate) id: u64,
    pub(crate) hash: u64,
    pub(crate) raw_bytes: u64,
    pub(crate) shapes: HashMap<&'a str, (DType, &'a [u64])>,
}

impl<'a> LinkBase<'a> {
    pub(crate) fn of_header(h: &'a Header) -> LinkBase<'a> {
        LinkBase {
            id: h.id,
            hash: h.state_hash(),
            raw_bytes: h.raw_bytes(),
            shapes: h
                .entries
                .iter()
                .map(|e| (e.name.as_str(), (e.dtype, e.shape.as_slice())))
                .collect(),
        }
    }

    pub(crate) fn of_state(id: u64, hash: u64, state: &'a [Tensor]) -> LinkBase<'a> {
        LinkBase {
            id,
            hash,
            raw_bytes: state.iter().map(|t| t.data.len() as u64).sum(),
            shapes: state
                .iter()
                .map(|t| (t.name.as_str(), (t.dtype, t.shape.as_slice())))
                .collect(),
        }
    }
}

/// Checks that `file` may be decoded against `base` (`None`: it is the root of its
/// chain): its recorded base, the base tensors of its delta entries and base
/// references, and that decoding it next to the base fits `budget`.
pub(crate) fn check_link(
    file: &SnapshotFile,
    base: Option<&LinkBase<'_>>,
    budget: u64,
) -> Result<(), Error> {
    let header = &file.header;
    let missing = |base_id: u64, reason: String| Error::MissingBase {
        file: file.path.clone(),
        base_id,
        reason,
    };
    match (header.base, base) {
        (None, _) => {}
        (Some(want), None) => return Err(missing(want.id, "was not provided".into())),
        (Some(want), Some(b)) => {
            if want.id != b.id || want.state_hash != b.hash {
                return Err(missing(
                    want.id,
                    format!(
                        "does not match: found snapshot {} with state hash {:016x}, expected {:016x}",
                        b.id, b.hash, want.state_hash
                    ),
                ));
            }
            for e in &header.entries {
                let fits = |name: &str| {
                    b.shapes
                        .get(name)
                        .is_some_and(|(d, s)| *d == e.dtype && *s == e.shape.as_slice())
                };
                if e.codec.needs_base() && !fits(&e.name) {
                    return Err(missing(
                        want.id,
                        format!(
                            "has no tensor `{}` of dtype {} and shape {:?} to decode against",
                            e.name, e.dtype, e.shape
                        ),
                    ));
                }
                if let Some(r) = e
                    .references
                    .iter()
                    .find(|r| r.scope == RefScope::Base && !fits(&r.name))
                {
                    return Err(missing(
                        want.id,
                        format!(
                            "has no tensor `{}` of dtype {} and shape {:?} that tensor `{}` references",
                            r.name, e.dtype, e.shape, e.name
                        ),
                    ));
                }
            }
        }
    }
    let held = if header.base.is_some() {
        base.map_or(0, |b| b.raw_bytes)
    } else {
        0
    };
    budget::check_decode_budget(header, held, budget, &file.path)
}

/// Decodes every tensor of `file` against `base`, the decoded state of the file before
/// it (checked by [`check_link`]), in decoding order; returns them in header order.
pub(crate) fn decode_file(
    file: &SnapshotFile,
    base: Option<&[Tensor]>,
) -> Result<Vec<Tensor>, Error> {
    decode_file_inner(file, base, None, None)
}

/// [`decode_file`] of the tensors named in `keep` only (all with `None`).
fn decode_file_only(
    file: &SnapshotFile,
    base: Option<&[Tensor]>,
    keep: Option<&HashSet<String>>,
) -> Result<Vec<Tensor>, Error> {
    decode_file_inner(file, base, keep, None)
}

/// What [`RestoreChain::decode_with`] hands each decoded tensor to.
type Sink<'a> = dyn Fn(usize, &Tensor) -> Result<(), Error> + Sync + 'a;

/// [`decode_file`] of the tensors in `keep` (all with `None`), each handed to `sink`.
fn decode_file_inner(
    file: &SnapshotFile,
    base: Option<&[Tensor]>,
    keep: Option<&HashSet<String>>,
    sink: Option<&Sink<'_>>,
) -> Result<Vec<Tensor>, Error> {
    let header = &file.header;
    let base_map: HashMap<&str, &Tensor> = match (header.base, base) {
        (Some(_), Some(state)) => state.iter().map(|t| (t.name.as_str(), t)).collect(),
        _ => HashMap::new(),
    };
    let index: HashMap<&str, usize> = header
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.name.as_str(), i))
        .collect();
    let mut out: Vec<Option<Tensor>> = (0..header.entries.len()).map(|_| None).collect();
    // In waves, in decoding order (FORMAT.md 2.7): each wave decodes, in parallel, the
    // entries whose same-snapshot references are decoded.
    let mut pending: Vec<usize> = header
        .decode_order()
        .into_iter()
        .filter(|&i| {
            keep.is_none_or(|k| header.entries.get(i).is_some_and(|e| k.contains(&e.name)))
        })
        .collect();
    while !pending.is_empty() {
        let ready_now = |i: &usize| {
            header.entries[*i].references.iter().all(|r| {
                r.scope == RefScope::Base
                    || index
                        .get(r.name.as_str())
                        .is_some_and(|&j| out.get(j).is_some_and(Option::is_some))
            })
        };
        let (ready, rest): (Vec<usize>, Vec<usize>) = pending.iter().partition(|i| ready_now(i));
        if ready.is_empty() {
            // Parsed headers have no cycles and no dangling references; decode what is
            // left one by one, so that the error names the tensor.
            let e = &header.entries[rest[0]];
            file.decode_referenced(e, None, &[])?;
            return Err(Error::Malformed {
                file: file.path.clone(),
                tensor: Some(e.name.clone()),
                what: "header",
                offset: 0,
                reason: "references that cannot be resolved".into(),
            });
        }
        let decoded: Vec<(usize, Tensor)> = ready
            .par_iter()
            .map(|&i| {
                let e = &header.entries[i];
                let base = base_map
                    .get(e.name.as_str())
                    .filter(|b| b.dtype == e.dtype && b.shape == e.shape)
                    .map(|b| b.data.as_slice());
                let data = if e.codec.needs_reference() {
                    let references: Vec<_> = e
                        .references
                        .iter()
                        .map(|r| match r.scope {
                            RefScope::Base => base_map
                                .get(r.name.as_str())
                                .map(|t| (t.dtype, t.data.as_slice())),
                            RefScope::Snapshot => index
                                .get(r.name.as_str())
                                .and_then(|&j| out.get(j))
                                .and_then(Option::as_ref)
                                .map(|t| (t.dtype, t.data.as_slice())),
                        })
                        .collect();
                    file.decode_referenced(e, base, &references)?
                } else {
                    file.decode(e, base)?
                };
                let t = Tensor {
                    name: e.name.clone(),
                    dtype: e.dtype,
                    shape: e.shape.clone(),
                    role: e.role,
                    data,
                };
                if let Some(sink) = sink {
                    sink(i, &t)?;
                }
                Ok((i, t))
            })
            .collect::<Result<_, Error>>()?;
        for (i, t) in decoded {
            if let Some(slot) = out.get_mut(i) {
                *slot = Some(t);
            }
        }
        pending = rest;
    }
    Ok(out.into_iter().flatten().collect())
}

impl Store {
    /// Snapshots from the full one at the root of `id`'s chain to `id`: the order in which
    /// a restore applies them.
    pub fn chain(&self, id: u64) -> Result<Vec<u64>, Error> {
        Ok(self
            .chain_files(id, None)?
            .into_iter()
            .map(|(sid, _, _)| sid)
            .collect())
    }

    /// The chain of `id` (`rank`: of that rank's shards) as (snapshot id, file, commit
    /// attempt), root first, from the manifest.
    pub(crate) fn chain_files(
        &self,
        id: u64,
        rank: Option<u32>,
    ) -> Result<Vec<(u64, String, u64)>, Error> {
        // Retired snapshots too: a listed delta's chain may run through them.
        let info = match self.chain_info(id) {
            Some(info) => info,
            None => self.info(id)?,
        };
        if info.shards.is_empty() != rank.is_none() {
            return Err(Error::WrongKind {
                store: self.dir.clone(),
                snapshot: id,
                reason: if rank.is_some() {
                    "is not sharded".into()
                } else {
                    "is sharded: read it with Store::load or Store::load_shard".into()
                },
            });
        }
        // (base, file, attempt) of snapshot `sid`'s part; `from` names the file that
        // needs it.
        let part = |sid: u64, from: &str| -> Result<(Option<u64>, String, u64), Error> {
            let missing = |reason: String| Error::MissingBase {
                file: self.backend.path_of(from),
                base_id: sid,
                reason,
            };
            let s = self
                .chain_info(sid)
                .ok_or_else(|| missing("is not in the store".into()))?;
            match rank {
                None if s.shards.is_empty() => Ok((s.base, s.file.clone(), 0)),
                None => Err(missing("is sharded".into())),
                Some(r) => s
                    .shards
                    .get(r as usize)
                    .map(|h| (h.base, h.file.clone(), h.attempt))
                    .ok_or_else(|| missing(format!("has no shard of rank {r}"))),
            }
        };
        let (mut base, file, attempt) = part(id, "")?;
        let mut chain = vec![(id, file, attempt)];
        while let Some(b) = base {
            let from = chain.last().map(|c| c.1.clone()).unwrap_or_default();
            if chain.len() > self.manifest.snapshots.len() + self.manifest.retired.len() {
                return Err(Error::MissingBase {
                    file: self.backend.path_of(&from),
                    base_id: b,
                    reason: "forms a cycle in the manifest".into(),
                });
            }
            let (next, file, attempt) = part(b, &from)?;
            chain.push((b, file, attempt));
            base = next;
        }
        chain.reverse();
        Ok(chain)
    }

    /// The chain of `files` (checked) restoring `id` (`rank`'s part).
    pub(super) fn chain_of(
        &self,
        id: u64,
        rank: Option<u32>,
        files: Vec<SnapshotFile>,
    ) -> RestoreChain {
        RestoreChain {
            snapshot: id,
            rank,
            files,
            read_only: None,
        }
    }

    /// Checks the links of `files` (a chain, root first) as [`Store::restore_chain`]
    /// does.
    pub(super) fn check_chain(&self, id: u64, files: &[SnapshotFile]) -> Result<(), Error> {
        let mut prev: Option<&Header> = None;
        for f in files {
            check_link(
                f,
                prev.map(LinkBase::of_header).as_ref(),
                self.decode_budget,
            )?;
            prev = Some(&f.header);
        }
        if files.is_empty() {
            return Err(Error::UnknownSnapshot {
                store: self.dir.clone(),
                snapshot: id.to_string(),
            });
        }
        Ok(())
    }

    /// The checked chain of files that restores snapshot `id` (`rank`: rank `rank`'s
    /// part of sharded snapshot `id`; `None` for an unsharded snapshot). See
    /// [`RestoreChain`] for what is checked.
    pub fn restore_chain(&self, id: u64, rank: Option<u32>) -> Result<RestoreChain, Error> {
        let names = self.chain_files(id, rank)?;
        let files = names
            .par_iter()
            .map(|(sid, name, attempt)| {
                let f = self.open_object(name, *sid)?;
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
        Ok(self.chain_of(id, rank, files))
    }

    /// The checked chains that restore snapshot `id`, full, delta or sharded: one for an
    /// unsharded snapshot, one per rank (in rank order) for a sharded one.
    pub fn restore_chains(&self, id: u64) -> Result<Vec<RestoreChain>, Error> {
        let world = self.info(id)?.shards.len() as u32;
        if world == 0 {
            return Ok(vec![self.restore_chain(id, None)?]);
        }
        (0..world)
            .map(|rank| self.restore_chain(id, Some(rank)))
            .collect()
    }

    /// Decodes snapshot `id`, walking its chain of bases. The latest save is served from
    /// memory when this `Store` made it (`from_memory` says so).
    pub fn load(&self, id: u64) -> Result<Snapshot, Error> {
        let info = self.info(id)?.clone();
        if !info.shards.is_empty() {
            return self.load_sharded(id);
        }
        if let Some(c) = self.cached(id) {
            return Ok(Snapshot {
                info,
                metadata: c.metadata.clone(),
                tensors: c.state.as_ref().clone(),
                from_memory: true,
            });
        }
        self.restore_chain(id, None)?.into_snapshot(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::CodecId;
    use crate::format::{BaseRef, Decision, SnapshotWriter};
    use crate::{Policy, Role};

    /// A one-tensor file (`codec`, shape `[n]` of f32) with `base`.
    fn file(id: u64, base: Option<BaseRef>, codec: CodecId, n: u64) -> SnapshotFile {
        let p = Path::new("l.bsnap");
        let mut w = SnapshotWriter::new(Vec::new(), p, id, "l", base).unwrap();
        let e = Entry {
            name: "t".into(),
            dtype: DType::F32,
            role: Role::Weight,
            codec,
            shape: vec![n],
            offset: 0,
            len: 0,
            payload_hash: 0,
            raw_hash: 0,
            decision: Decision::default(),
            references: Vec::new(),
        };
        w.push(e, &[]).unwrap();
        SnapshotFile::from_bytes(w.finish().unwrap().1, p).unwrap()
    }

    #[test]
    fn links_are_checked_before_decoding() {
        let root = file(1, None, CodecId::Unchanged, 4);
        let base = LinkBase::of_header(&root.header);
        let good = BaseRef {
            id: 1,
            state_hash: root.header.state_hash(),
        };
        check_link(&root, None, u64::MAX).unwrap();
        check_link(
            &file(2, Some(good), CodecId::XorDelta, 4),
            Some(&base),
            u64::MAX,
        )
        .unwrap();
        let missing = |r: Result<(), Error>| match r {
            Err(Error::MissingBase { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        let stale = BaseRef {
            state_hash: 5,
            ..good
        };
        let delta = file(2, Some(stale), CodecId::XorDelta, 4);
        assert!(missing(check_link(&delta, Some(&base), u64::MAX)).contains("does not match"));
        let resized = file(2, Some(good), CodecId::XorDelta, 8);
        assert!(missing(check_link(&resized, Some(&base), u64::MAX)).contains("shape [8]"));
        assert!(missing(check_link(&resized, None, u64::MAX)).contains("not provided"));
        // Budget: 16 bytes held + 16 decoded.
        let small = file(2, Some(good), CodecId::XorDelta, 4);
        assert!(check_link(&small, Some(&base), 32).is_ok());
        assert!(matches!(
            check_link(&small, Some(&base), 31),
            Err(Error::Budget { needed: 32, .. })
        ));
    }

    #[test]
    fn a_store_chain_is_root_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
        let mut w: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        for step in 0..3 {
            w[step] = -1.0;
            let t = Tensor::from_f32("w", &[1000], Role::Weight, &w).unwrap();
            store.save(&format!("s{step}"), vec![t]).unwrap();
        }
        let chain = store.restore_chain(3, None).unwrap();
        let ids: Vec<u64> = chain.files().iter().map(|f| f.header.id).collect();
        assert_eq!(ids, store.chain(3).unwrap());
        assert_eq!(ids, vec![1, 2, 3]);
        let links: Vec<_> = chain.links().collect();
        assert!(links[0].base.is_none());
        assert_eq!(links[2].base.map(|b| b.header.id), Some(2));
        assert_eq!(chain.decode().unwrap()[0].to_f32().unwrap(), w);
        assert!(matches!(
            store.restore_chain(3, Some(0)),
            Err(Error::WrongKind { .. })
        ));
    }
}
