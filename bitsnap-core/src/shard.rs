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

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::backend::Backend;
use crate::format::{Header, MAX_HEADER_BYTES, TRAILER_BYTES};
use crate::store::{MANIFEST_VERSION_SHARDED, encode_against, validate_metadata};
use crate::store::{Snapshot, SnapshotInfo, State, decode_file, validate};
use crate::{Error, Store, Tensor};

/// Most shards (ranks) in one snapshot.
pub const MAX_SHARDS: u32 = 1 << 16;
/// How often [`Store::commit_sharded`] looks for missing shards while it waits.
const POLL: Duration = Duration::from_millis(20);

/// One rank's part of a sharded snapshot, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// The writer's rank, from 0.
    pub rank: u32,
    /// Its file, relative to the store.
    pub file: String,
    /// The snapshot whose shard of the same rank this one is a delta of, if any.
    pub base: Option<u64>,
    /// [`Header::state_hash`] of the shard.
    pub state_hash: u64,
    /// Number of tensors.
    pub tensors: u64,
    /// Decoded size of its tensors.
    pub raw_bytes: u64,
    /// Size of its file.
    pub stored_bytes: u64,
}

/// What [`Store::save_shard`] did.
#[derive(Debug, Clone)]
pub struct ShardReport {
    /// The shard, as the commit will list it.
    pub info: ShardInfo,
    /// Its header: per-tensor codec, sizes and decisions.
    pub header: Header,
    /// Why it is a full shard, if it is one.
    pub full_reason: Option<&'static str>,
}

/// File name of rank `rank`'s shard of snapshot `id`.
pub fn shard_file_name(id: u64, rank: u32) -> String {
    format!("snap-{id:020}-s{rank:05}.bsnap")
}

/// Whether `name` is a shard file (or its temporary) of a snapshot id not committed yet
/// (`>= next_id`): its writer may still be at work, so it is not debris.
pub(crate) fn pending_shard(name: &str, next_id: u64) -> bool {
    let Some(rest) = name.strip_prefix("snap-") else {
        return false;
    };
    let (Some(id), Some(tail)) = (rest.get(..20), rest.get(20..)) else {
        return false;
    };
    tail.starts_with("-s") && id.parse::<u64>().is_ok_and(|id| id >= next_id)
}

/// Checks the shard fields of a manifest entry (FORMAT.md 4.1).
pub(crate) fn check_listing(s: &SnapshotInfo, version: u32) -> Result<(), String> {
    if s.shards.is_empty() {
        return Ok(());
    }
    if version != MANIFEST_VERSION_SHARDED {
        return Err(format!("lists shards in a version {version} manifest"));
    }
    if !s.file.is_empty() || s.base.is_some() {
        return Err("a sharded snapshot has a file or base of its own".into());
    }
    if s.shards.len() as u64 > MAX_SHARDS as u64 {
        return Err(format!("{} shards, more than {MAX_SHARDS}", s.shards.len()));
    }
    for (i, h) in s.shards.iter().enumerate() {
        if h.rank as usize != i {
            return Err(format!("shard {i} has rank {}", h.rank));
        }
        if h.base.is_some_and(|b| b >= s.id) {
            return Err(format!("shard {i}'s base is not older than it"));
        }
    }
    if combined_hash(&s.shards) != s.state_hash {
        return Err("state hash is not that of its shards".into());
    }
    Ok(())
}

/// A sharded snapshot's state hash: xxh3 of its shards' state hashes, in rank order.
fn combined_hash(shards: &[ShardInfo]) -> u64 {
    let bytes: Vec<u8> = shards
        .iter()
        .flat_map(|h| h.state_hash.to_le_bytes())
        .collect();
    xxh3_64(&bytes)
}

/// Reads and checks just the header of snapshot file `name` (trailer, then the header
/// region: two ranged reads).
pub(crate) fn read_header(backend: &dyn Backend, name: &str) -> Result<(Header, u64), Error> {
    let path = backend.path_of(name);
    let size = backend.size(name)?.ok_or_else(|| {
        Error::io(
            &path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "shard file is missing"),
        )
    })?;
    let t_at = size
        .checked_sub(TRAILER_BYTES as u64)
        .filter(|&t| t >= crate::format::PREAMBLE_BYTES as u64)
        .ok_or_else(|| Error::Truncated {
            file: path.clone(),
            offset: size,
            what: "trailer".into(),
        })?;
    let trailer = backend.read_range(name, t_at..size)?;
    let word = |i: usize| {
        trailer
            .get(i * 8..i * 8 + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    };
    if trailer.get(24..32) != Some(&crate::format::END_MAGIC[..]) {
        return Err(Error::Truncated {
            file: path,
            offset: size,
            what: "trailer (no end marker: the file is incomplete)".into(),
        });
    }
    let (h_at, h_len, h_hash) = (word(0), word(1), word(2));
    if h_len > MAX_HEADER_BYTES || h_at.checked_add(h_len) != Some(t_at) {
        return Err(Error::Malformed {
            file: path,
            tensor: None,
            what: "trailer",
            offset: t_at,
            reason: format!("header at {h_at} of {h_len} bytes does not end at the trailer"),
        });
    }
    let region = backend.read_range(name, h_at..t_at)?;
    let actual = xxh3_64(&region);
    if actual != h_hash {
        return Err(Error::Checksum {
            file: path,
            tensor: None,
            what: "header",
            offset: h_at,
            expected: h_hash,
            actual,
        });
    }
    let body = crate::format::decode_header_region(&region, &path, h_at)?;
    Ok((Header::parse(&body, &path, h_at)?, size))
}

impl Store {
    /// Saves `tensors` as rank `rank`'s shard (of `world`) of snapshot `id` in `series`.
    /// It becomes visible only when [`Store::commit_sharded`] commits all `world` shards.
    /// The shard is a delta on this rank's shard of the latest committed snapshot of the
    /// series when that snapshot has the same number of shards and the policy allows.
    ///
    /// Takes no lock and does not write the manifest: every rank may call it at once.
    /// One process per rank: two writers of the same rank and id overwrite each other.
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
        check_rank(rank, world)?;
        validate(&tensors, name)?;
        validate_metadata(&metadata)?;
        self.refresh()?;
        if id < self.manifest.next_id {
            return Err(Error::Conflict {
                file: self.backend.path_of(&shard_file_name(id, rank)),
                reason: format!(
                    "snapshot id {id} is already used (the store's next id is {})",
                    self.manifest.next_id
                ),
            });
        }
        let policy = self.policy;
        let mut full_reason = None;
        let base: Option<(u64, State, u64)> = match self.latest_in(series).cloned() {
            None => {
                full_reason = Some("first snapshot");
                None
            }
            Some(l) if l.shards.len() != world as usize => {
                full_reason = Some("latest snapshot is not sharded the same way");
                None
            }
            Some(l)
                if self
                    .shard_chain(l.id, rank)
                    .map_or(u32::MAX, |c| c.len() as u32)
                    >= policy.full_every =>
            {
                full_reason = Some("full snapshot interval reached");
                None
            }
            Some(l) => match self.shard_state(l.id, rank) {
                Ok((state, hash)) => Some((l.id, state, hash)),
                Err(e) => {
                    tracing::warn!(error = %e, rank, "latest shard unreadable; saving a full shard");
                    full_reason = Some("latest snapshot unreadable");
                    None
                }
            },
        };
        let (encoded, base) = encode_against(&policy, &tensors, base, &mut full_reason)?;
        let file = shard_file_name(id, rank);
        // A shard of an uncommitted id left by an earlier attempt of this rank (a crash
        // after its upload): replaced, as object stores refuse to create it again.
        if self.backend.size(&file)?.is_some() {
            tracing::info!(file = %self.backend.path_of(&file).display(), "replacing an uncommitted shard");
            self.backend.remove(&file)?;
        }
        let (header, stored_bytes) = self.write_snapshot(
            &file,
            id,
            name,
            base,
            metadata.clone(),
            tensors
                .iter()
                .zip(encoded.iter())
                .map(|(t, (e, d))| (t, e, d)),
        )?;
        let info = ShardInfo {
            rank,
            file,
            base: base.map(|b| b.id),
            state_hash: header.state_hash(),
            tensors: header.entries.len() as u64,
            raw_bytes: header.raw_bytes(),
            stored_bytes,
        };
        let mut state = tensors;
        for (t, (e, _)) in state.iter_mut().zip(encoded) {
            if let Some((decoded, _)) = e.lossy {
                t.data = decoded;
            }
        }
        self.shard_last.insert(
            (series.to_string(), rank),
            (id, State::new(state), metadata),
        );
        Ok(ShardReport {
            info,
            header,
            full_reason,
        })
    }

    /// Commits snapshot `id` of `series`, named `name`, once all `world` shards are in the
    /// store: waits up to `wait` for missing ones, checks every shard's header (its id
    /// and name, and that no tensor name is in two shards), then appends one manifest
    /// entry listing them. Fails, committing nothing, if a shard is still missing after
    /// `wait` (an I/O error of kind `TimedOut` naming the first missing file).
    pub fn commit_sharded(
        &mut self,
        series: &str,
        id: u64,
        name: &str,
        world: u32,
        wait: Duration,
    ) -> Result<SnapshotInfo, Error> {
        check_rank(0, world)?;
        self.take_lock()?;
        let files: Vec<String> = (0..world).map(|r| shard_file_name(id, r)).collect();
        let deadline = Instant::now() + wait;
        loop {
            let present: HashSet<String> = self.backend.list()?.into_iter().collect();
            let Some(missing) = files.iter().find(|f| !present.contains(*f)) else {
                break;
            };
            if Instant::now() >= deadline {
                return Err(Error::io(
                    self.backend.path_of(missing),
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "shard missing after {:.1} s: snapshot {id} not committed",
                            wait.as_secs_f64()
                        ),
                    ),
                ));
            }
            std::thread::sleep(POLL);
        }
        let mut shards = Vec::with_capacity(files.len());
        let mut owner: HashMap<String, u32> = HashMap::new();
        for (rank, file) in (0..world).zip(&files) {
            let (header, size) = read_header(self.backend.as_ref(), file)?;
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
        self.commit_new(info.clone(), &[])?;
        Ok(info)
    }

    /// Decodes rank `rank`'s shard of sharded snapshot `id`, walking that rank's chain.
    pub fn load_shard(&self, id: u64, rank: u32) -> Result<Snapshot, Error> {
        let info = self.info(id)?.clone();
        if let Some((_, state, metadata)) = self.cached_shard(id, rank) {
            return Ok(Snapshot {
                info,
                metadata: metadata.clone(),
                tensors: state.as_ref().clone(),
                from_memory: true,
            });
        }
        let (state, header) = self.decode_shard_chain(id, rank)?;
        Ok(Snapshot {
            info,
            metadata: header.metadata,
            tensors: State::try_unwrap(state).unwrap_or_else(|s| s.as_ref().clone()),
            from_memory: false,
        })
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
            let (_, header) = self.decode_shard_chain(s.id, h.rank)?;
            let actual = header.state_hash();
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

    /// Deletes sharded snapshot `id`, which no shard may use as its base.
    pub(crate) fn delete_sharded(&mut self, id: u64) -> Result<(), Error> {
        if let Some(d) = self
            .manifest
            .snapshots
            .iter()
            .find(|s| s.shards.iter().any(|h| h.base == Some(id)))
        {
            return Err(Error::Config(format!(
                "{}: snapshot {id} is the base of shards of snapshot {}; deleting the base of \
                 shard deltas is not supported (delete the newer snapshots first)",
                self.dir.display(),
                d.id
            )));
        }
        let victim = self.info(id)?.clone();
        let mut next = self.manifest.clone();
        next.snapshots.retain(|s| s.id != id);
        self.write_manifest(next)?;
        for h in &victim.shards {
            self.backend.remove(&h.file)?;
        }
        self.backend.sync()?;
        self.shard_last.retain(|_, (l, _, _)| *l != id);
        Ok(())
    }

    fn cached_shard(&self, id: u64, rank: u32) -> Option<&crate::store::Cached> {
        self.shard_last
            .iter()
            .find(|((_, r), (l, _, _))| *r == rank && *l == id)
            .map(|(_, c)| c)
    }

    /// The decoded state of rank `rank`'s shard of `id` and its state hash.
    fn shard_state(&self, id: u64, rank: u32) -> Result<(State, u64), Error> {
        let hash = self
            .info(id)?
            .shards
            .get(rank as usize)
            .map(|h| h.state_hash)
            .unwrap_or_default();
        if let Some((_, state, _)) = self.cached_shard(id, rank) {
            return Ok((state.clone(), hash));
        }
        let (state, header) = self.decode_shard_chain(id, rank)?;
        Ok((state, header.state_hash()))
    }

    /// Rank `rank`'s shards from the full one at the root of the chain to `id`'s.
    fn shard_chain(&self, id: u64, rank: u32) -> Result<Vec<(u64, String)>, Error> {
        let shard_of = |sid: u64, from: &str| -> Result<&ShardInfo, Error> {
            let info = self.get(sid).ok_or_else(|| Error::MissingBase {
                file: self.backend.path_of(from),
                base_id: sid,
                reason: "is not in the store".into(),
            })?;
            info.shards
                .get(rank as usize)
                .ok_or_else(|| Error::MissingBase {
                    file: self.backend.path_of(from),
                    base_id: sid,
                    reason: format!("has no shard of rank {rank}"),
                })
        };
        if self.info(id)?.shards.is_empty() {
            return Err(Error::Config(format!(
                "{}: snapshot {id} is not sharded",
                self.dir.display()
            )));
        }
        let mut cur = shard_of(id, "")?;
        let mut chain = vec![(id, cur.file.clone())];
        while let Some(b) = cur.base {
            if chain.len() > self.manifest.snapshots.len() {
                return Err(Error::MissingBase {
                    file: self.backend.path_of(&cur.file),
                    base_id: b,
                    reason: "forms a cycle in the manifest".into(),
                });
            }
            cur = shard_of(b, &cur.file)?;
            chain.push((b, cur.file.clone()));
        }
        chain.reverse();
        Ok(chain)
    }

    fn decode_shard_chain(&self, id: u64, rank: u32) -> Result<(State, Header), Error> {
        let mut state: Option<(State, Header)> = None;
        for (sid, file) in self.shard_chain(id, rank)? {
            let f = self.open_object(&file, sid)?;
            let prev = state
                .as_ref()
                .map(|(s, h)| (s.clone(), h.id, h.state_hash()));
            let decoded = decode_file(
                &f,
                prev.as_ref()
                    .map(|(s, id, hash)| (s.as_slice(), *id, *hash)),
            )?;
            state = Some((State::new(decoded), f.header));
        }
        state.ok_or_else(|| Error::UnknownSnapshot {
            store: self.dir.clone(),
            snapshot: format!("{id} (rank {rank})"),
        })
    }
}

fn check_rank(rank: u32, world: u32) -> Result<(), Error> {
    if world == 0 || world > MAX_SHARDS || rank >= world {
        return Err(Error::Config(format!(
            "rank {rank} of {world}: need 0 <= rank < world <= {MAX_SHARDS}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_names() {
        assert!(pending_shard(&shard_file_name(5, 3), 5));
        assert!(pending_shard(&format!("{}.tmp", shard_file_name(9, 0)), 5));
        assert!(!pending_shard(&shard_file_name(4, 3), 5));
        assert!(!pending_shard("snap-00000000000000000007.bsnap", 5));
        assert!(!pending_shard("MANIFEST", 5));
    }
}
