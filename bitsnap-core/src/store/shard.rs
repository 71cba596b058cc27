//! Sharded snapshots: N writer processes (ranks) each save their part of the state into
//! one snapshot; one commit makes it visible once every part is there.
//!
//! Each rank writes its part as an ordinary snapshot file, `snap-<id>-s<rank>.bsnap`,
//! with its own delta chain: its base is the same rank's shard of the latest committed
//! snapshot of the series, so deltas and the adaptive [`Policy`](crate::Policy) work per
//! shard. Shard writers take no lock and never touch the manifest. The commit
//! ([`Store::commit_sharded`], run by one process, usually rank 0) waits until all N
//! shard files exist, reads their headers, and appends one manifest entry listing them
//! all: the manifest write is the commit and comes last. A rank killed mid-upload leaves
//! the snapshot uncommitted and the store listing only complete snapshots.
//!
//! The ranks agree on the snapshot's id (usually the training step): it must be at
//! least the store's next id when the commit runs, and ids only grow.
//!
//! ```
//! use bitsnap_core::{Policy, Role, Store, Tensor};
//! use std::time::Duration;
//! let dir = tempfile::tempdir().unwrap();
//! Store::open_or_create(dir.path(), Policy::default()).unwrap();
//! // Two ranks, each with its own handle (in practice: its own process).
//! for rank in 0..2u32 {
//!     let mut store = Store::open(dir.path()).unwrap();
//!     let t = Tensor::from_f32(&format!("layer{rank}.w"), &[2], Role::Weight, &[1.0, rank as f32]).unwrap();
//!     store.save_shard("model", 10, "step-10", rank, 2, vec![t], Vec::new()).unwrap();
//! }
//! let mut store = Store::open(dir.path()).unwrap();
//! let info = store.commit_sharded("model", 10, "step-10", 2, Duration::from_secs(5)).unwrap();
//! assert_eq!(info.shards.len(), 2);
//! assert_eq!(store.load(10).unwrap().tensors.len(), 2); // every shard
//! assert_eq!(store.load_shard(10, 1).unwrap().tensors[0].name, "layer1.w"); // rank 1's
//! ```

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::xxh3_64;

use super::manifest::combined_hash;
pub use super::manifest::{MAX_SHARDS, ShardInfo};
use super::save::{BaseState, FullReason, Plan, unique_token, validate, validate_metadata};
use super::{Cached, Snapshot, SnapshotInfo};
use crate::backend::Backend;
use crate::format::{Header, TRAILER_BYTES, Trailer};
use crate::{Error, Store, Tensor};

/// How often [`Store::commit_sharded`] looks for missing shards while it waits.
const POLL: Duration = Duration::from_millis(20);

/// What [`Store::save_shard`] did.
#[derive(Debug, Clone)]
pub struct ShardReport {
    /// The shard, as the commit will list it.
    pub info: ShardInfo,
    /// Its header: per-tensor codec, sizes and decisions.
    pub header: Header,
    /// Why it is a full shard, if it is one.
    pub full_reason: Option<FullReason>,
}

/// The commit attempt nonce [`Store::save_shard`] and [`Store::commit_sharded`] use when
/// not given one: derived from the series, id, name and world size, so it is the same
/// for every rank, but also the same for a retry of the same step. Pass a fresh nonce
/// per attempt ([`new_attempt`], shared by the ranks) to
/// [`Store::save_shard_attempt`] and [`Store::commit_sharded_attempt`] to bind the
/// shards to one attempt.
pub fn default_attempt(series: &str, id: u64, name: &str, world: u32) -> u64 {
    let mut bytes = Vec::with_capacity(series.len() + name.len() + 28);
    for part in [series.as_bytes(), name.as_bytes()] {
        bytes.extend_from_slice(&(part.len() as u64).to_le_bytes());
        bytes.extend_from_slice(part);
    }
    bytes.extend_from_slice(&id.to_le_bytes());
    bytes.extend_from_slice(&world.to_le_bytes());
    xxh3_64(&bytes).max(1)
}

/// A fresh, non-zero commit attempt nonce (random): one process draws it and shares it
/// with every rank of the attempt.
pub fn new_attempt() -> u64 {
    unique_token().max(1)
}

/// File name of rank `rank`'s shard of snapshot `id`.
pub fn shard_file_name(id: u64, rank: u32) -> String {
    format!("snap-{id:020}-s{rank:05}.bsnap")
}

/// Reads and checks just the header of snapshot file `name` (preamble, trailer, then
/// the header region: three ranged reads), with [`Trailer::parse`] as for whole files.
pub(crate) fn read_header(backend: &dyn Backend, name: &str) -> Result<(Header, u64), Error> {
    let path = backend.path_of(name);
    let size = backend.size(name)?.ok_or_else(|| {
        Error::io(
            &path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "shard file is missing"),
        )
    })?;
    let pre_len = (crate::format::PREAMBLE_BYTES as u64).min(size);
    let version = crate::format::check_preamble(&backend.read_range(name, 0..pre_len)?, &path)?;
    let t_at = size.saturating_sub(TRAILER_BYTES as u64);
    let trailer = Trailer::parse(&backend.read_range(name, t_at..size)?, size, &path)?;
    let region = backend.read_range(name, trailer.header_offset..trailer.offset())?;
    let header = crate::format::parse_region(&region, &trailer, version, &path)?;
    Ok((header, size))
}

impl Store {
    /// Saves `tensors` as rank `rank`'s shard (of `world`) of snapshot `id` in `series`.
    /// It becomes visible only when [`Store::commit_sharded`] commits all `world` shards.
    /// The shard is a delta on this rank's shard of the latest committed snapshot of the
    /// series when that snapshot has the same number of shards and the policy allows.
    ///
    /// Takes no lock and does not write the manifest: every rank may call it at once.
    /// One process per rank: two writers of the same rank and id overwrite each other.
    /// The shard carries [`default_attempt`]; [`Store::save_shard_attempt`] takes a
    /// nonce of the caller's.
    #[allow(clippy::too_many_arguments)]
    pub fn save_shard(
        &mut self,
        series: &str,
        id: u64,
        name: &str,
        rank: u32,
        world: u32,
        tensors: Vec<Tensor>,
        metadata: Vec<(String, String)>,
    ) -> Result<ShardReport, Error> {
        let attempt = default_attempt(series, id, name, world);
        self.save_shard_attempt(series, id, name, rank, world, attempt, tensors, metadata)
    }

    /// [`Store::save_shard`] for commit attempt `attempt` (a non-zero nonce every rank of
    /// the attempt shares, for example from [`new_attempt`] on one rank, broadcast):
    /// [`Store::commit_sharded_attempt`] with the same nonce commits only shards of
    /// this attempt, never a stale shard an earlier, interrupted attempt left.
    #[allow(clippy::too_many_arguments)]
    pub fn save_shard_attempt(
        &mut self,
        series: &str,
        id: u64,
        name: &str,
        rank: u32,
        world: u32,
        attempt: u64,
        tensors: Vec<Tensor>,
        metadata: Vec<(String, String)>,
    ) -> Result<ShardReport, Error> {
        check_rank(rank, world)?;
        validate(&tensors, name)?;
        validate_metadata(&metadata)?;
        self.refresh()?;
        let file = shard_file_name(id, rank);
        if id < self.manifest.next_id {
            return Err(Error::Conflict {
                file: self.backend.path_of(&file),
                reason: format!(
                    "snapshot id {id} is already used (the store's next id is {})",
                    self.manifest.next_id
                ),
            });
        }
        let base = match self.latest_in(series).cloned() {
            None => Err(FullReason::First),
            Some(l) if l.shards.len() != world as usize => Err(FullReason::ShardLayoutChanged),
            Some(l)
                if self
                    .chain_files(l.id, Some(rank))
                    .map_or(u32::MAX, |c| c.len() as u32)
                    >= self.policy.full_every =>
            {
                Err(FullReason::Interval)
            }
            Some(l) => self.shard_state(l.id, rank).map_err(|e| {
                tracing::warn!(error = %e, rank, "latest shard unreadable; saving a full shard");
                FullReason::LatestUnreadable
            }),
        };
        // A shard of an uncommitted id left by an earlier attempt of this rank (a crash
        // after its upload): replaced, as object stores refuse to create it again.
        if self.backend.size(&file)?.is_some() {
            tracing::info!(file = %self.backend.path_of(&file).display(), "replacing an uncommitted shard");
            self.backend.remove(&file)?;
        }
        let plan = Plan {
            file: file.clone(),
            id,
            name,
            attempt,
            base,
        };
        let w = self.write_save(plan, tensors, metadata)?;
        let info = ShardInfo {
            rank,
            file,
            base: w.base.map(|b| b.id),
            state_hash: w.header.state_hash(),
            tensors: w.header.entries.len() as u64,
            raw_bytes: w.header.raw_bytes(),
            stored_bytes: w.stored_bytes,
            attempt,
        };
        self.shard_last.insert((series.to_string(), rank), w.cached);
        Ok(ShardReport {
            info,
            header: w.header,
            full_reason: w.full_reason,
        })
    }

    /// Commits snapshot `id` of `series`, named `name`, once all `world` shards are in the
    /// store: waits up to `wait` for missing ones, checks every shard's header (its id
    /// and name, and that no tensor name is in two shards), then appends one manifest
    /// entry listing them. Fails, committing nothing, if a shard is still missing after
    /// `wait` (an I/O error of kind `TimedOut` naming the first missing file). Commits
    /// shards of [`default_attempt`]; see [`Store::commit_sharded_attempt`].
    pub fn commit_sharded(
        &mut self,
        series: &str,
        id: u64,
        name: &str,
        world: u32,
        wait: Duration,
    ) -> Result<SnapshotInfo, Error> {
        let attempt = default_attempt(series, id, name, world);
        self.commit_sharded_attempt(series, id, name, world, attempt, wait)
    }

    /// [`Store::commit_sharded`] of commit attempt `attempt`: a shard file whose header
    /// carries another attempt is stale (left by an earlier attempt) and counts as
    /// missing while the commit waits; if it is still there at the deadline the commit
    /// fails with [`Error::StaleShard`], committing nothing.
    pub fn commit_sharded_attempt(
        &mut self,
        series: &str,
        id: u64,
        name: &str,
        world: u32,
        attempt: u64,
        wait: Duration,
    ) -> Result<SnapshotInfo, Error> {
        check_rank(0, world)?;
        self.become_writer()?;
        let files: Vec<String> = (0..world).map(|r| shard_file_name(id, r)).collect();
        let deadline = Instant::now() + wait;
        // Headers of the shards of this attempt found so far, by rank.
        let mut found: HashMap<u32, (Header, u64)> = HashMap::new();
        loop {
            let present: HashSet<String> = self.backend.list()?.into_iter().collect();
            let mut waiting: Option<Error> = None;
            for (rank, file) in (0..world).zip(&files) {
                if found.contains_key(&rank) {
                    continue;
                }
                if !present.contains(file) {
                    waiting.get_or_insert_with(|| {
                        Error::io(
                            self.backend.path_of(file),
                            std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!(
                                    "shard missing after {:.1} s: snapshot {id} not committed",
                                    wait.as_secs_f64()
                                ),
                            ),
                        )
                    });
                    continue;
                }
                let (header, size) = read_header(self.backend.as_ref(), file)?;
                if header.attempt != attempt {
                    waiting.get_or_insert(Error::StaleShard {
                        file: self.backend.path_of(file),
                        expected: attempt,
                        actual: header.attempt,
                    });
                    continue;
                }
                found.insert(rank, (header, size));
            }
            let Some(err) = waiting else {
                break;
            };
            if Instant::now() >= deadline {
                return Err(err);
            }
            std::thread::sleep(POLL);
        }
        let mut shards = Vec::with_capacity(files.len());
        let mut owner: HashMap<String, u32> = HashMap::new();
        for (rank, file) in (0..world).zip(&files) {
            let Some((header, size)) = found.remove(&rank) else {
                continue;
            };
            if header.id != id || header.name != name {
                return Err(Error::Malformed {
                    file: self.backend.path_of(file),
                    tensor: None,
                    what: "header",
                    offset: 0,
                    reason: format!(
                        "holds snapshot {} `{}` where the commit expects {id} `{name}`",
                        header.id, header.name
                    ),
                });
            }
            for e in &header.entries {
                if let Some(other) = owner.insert(e.name.clone(), rank) {
                    return Err(Error::InvalidTensor {
                        tensor: e.name.clone(),
                        reason: format!("is in the shards of both rank {other} and rank {rank}"),
                    });
                }
            }
            shards.push(ShardInfo {
                rank,
                file: file.clone(),
                base: header.base.map(|b| b.id),
                state_hash: header.state_hash(),
                tensors: header.entries.len() as u64,
                raw_bytes: header.raw_bytes(),
                stored_bytes: size,
                attempt,
            });
        }
        let info = SnapshotInfo {
            id,
            name: name.to_string(),
            series: series.to_string(),
            file: String::new(),
            base: None,
            state_hash: combined_hash(&shards),
            tensors: shards.iter().map(|s| s.tensors).sum(),
            raw_bytes: shards.iter().map(|s| s.raw_bytes).sum(),
            stored_bytes: shards.iter().map(|s| s.stored_bytes).sum(),
            shards,
        };
        // Shard ids are the caller's, not reserved: they must be at or above `next_id`.
        self.commit_new(info.clone(), &[], false)?;
        Ok(info)
    }

    /// Decodes rank `rank`'s shard of sharded snapshot `id`, walking that rank's chain.
    pub fn load_shard(&self, id: u64, rank: u32) -> Result<Snapshot, Error> {
        let info = self.info(id)?.clone();
        if let Some(c) = self.cached_shard(id, rank) {
            return Ok(Snapshot {
                info,
                metadata: c.metadata.clone(),
                tensors: c.state.as_ref().clone(),
                from_memory: true,
            });
        }
        self.restore_chain(id, Some(rank))?.into_snapshot(info)
    }

    /// Every shard of `id`, tensors in rank order, rank 0's metadata.
    pub(crate) fn load_sharded(&self, id: u64) -> Result<Snapshot, Error> {
        let world = self.info(id)?.shards.len() as u32;
        let mut all = self.load_shard(id, 0)?;
        for rank in 1..world {
            let part = self.load_shard(id, rank)?;
            all.from_memory &= part.from_memory;
            all.tensors.extend(part.tensors);
        }
        Ok(all)
    }

    /// Every shard's header entries, in rank order.
    pub(crate) fn sharded_header(&self, id: u64) -> Result<Header, Error> {
        let info = self.info(id)?.clone();
        let mut merged = Header {
            id,
            name: info.name.clone(),
            ..Header::default()
        };
        for s in &info.shards {
            let (h, _) = read_header(self.backend.as_ref(), &s.file)?;
            if s.rank == 0 {
                merged.metadata = h.metadata;
            }
            merged.entries.extend(h.entries);
        }
        Ok(merged)
    }

    /// Decodes every shard of `s` and checks it against the manifest.
    pub(crate) fn verify_sharded(&self, s: &SnapshotInfo) -> Result<(), Error> {
        for h in &s.shards {
            let chain = self.restore_chain(s.id, Some(h.rank))?;
            chain.decode()?;
            let actual = chain.target().header.state_hash();
            if actual != h.state_hash {
                return Err(Error::Checksum {
                    file: self.backend.path_of(&h.file),
                    tensor: None,
                    what: "manifest state hash",
                    offset: 0,
                    expected: h.state_hash,
                    actual,
                });
            }
        }
        Ok(())
    }

    /// Deletes sharded snapshot `id`, which no shard may use as its base (checked
    /// against the manifest as it is at the commit).
    pub(crate) fn delete_sharded(&mut self, id: u64) -> Result<(), Error> {
        let victim = self.commit_with(|store| {
            if let Some(d) = store
                .manifest
                .snapshots
                .iter()
                .find(|s| s.shards.iter().any(|h| h.base == Some(id)))
            {
                return Err(Error::InUse {
                    store: store.dir.clone(),
                    snapshot: id,
                    user: d.id,
                });
            }
            store.refuse_pinned(id)?;
            let victim = store.info(id)?.clone();
            let mut next = store.manifest.clone();
            next.snapshots.retain(|s| s.id != id);
            Ok((Some(next), victim))
        })?;
        self.shard_last.retain(|_, c| c.id != id);
        self.remove_files(std::slice::from_ref(&victim))
    }

    fn cached_shard(&self, id: u64, rank: u32) -> Option<&Cached> {
        self.shard_last
            .iter()
            .find(|((_, r), c)| *r == rank && c.id == id)
            .map(|(_, c)| c)
    }

    /// The decoded state of rank `rank`'s shard of `id`, as a base.
    fn shard_state(&self, id: u64, rank: u32) -> Result<BaseState, Error> {
        let hash = self
            .info(id)?
            .shards
            .get(rank as usize)
            .map(|h| h.state_hash)
            .unwrap_or_default();
        if let Some(c) = self.cached_shard(id, rank) {
            return Ok(BaseState {
                id,
                state: c.state.clone(),
                hash,
            });
        }
        let chain = self.restore_chain(id, Some(rank))?;
        let state = chain.decode()?;
        Ok(BaseState {
            id,
            state: std::sync::Arc::new(state),
            hash: chain.target().header.state_hash(),
        })
    }
}

fn check_rank(rank: u32, world: u32) -> Result<(), Error> {
    if world == 0 || world > MAX_SHARDS || rank >= world {
        return Err(Error::InvalidRank {
            rank,
            world,
            max: MAX_SHARDS,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::manifest::pending_shard;

    #[test]
    fn pending_names() {
        assert!(pending_shard(&shard_file_name(5, 3), 5));
        assert!(pending_shard(&format!("{}.tmp", shard_file_name(9, 0)), 5));
        assert!(!pending_shard(&shard_file_name(4, 3), 5));
        assert!(!pending_shard("snap-00000000000000000007.bsnap", 5));
        assert!(!pending_shard("MANIFEST", 5));
    }
}
