//! A store: a directory of snapshot files and a manifest listing the complete ones.
//!
//! ```text
//! store/
//!   MANIFEST                       the committed list of snapshots (JSON, checksummed)
//!   LOCK                           the commit lock, held around each manifest replace
//!   writer-3f9c…e1.lease           one per live writer
//!   snap-00000000000000000001-3f9c…e1.bsnap
//!   snap-00000000000000000002-3f9c…e1.bsnap   (a delta on 1)
//! ```
//!
//! Every change is atomic: a snapshot file is written under a temporary name, fsynced,
//! renamed into place and the directory fsynced; only then is the manifest rewritten the
//! same way. A crash at any point leaves the previous manifest, and every snapshot it
//! lists, intact; files it does not list are removed by a later writer once their
//! writer's lease is gone. Several writers may work on one store at once: the lock
//! covers each commit only, and readers take no lock (`commit`).
//!
//! The same rules hold on object storage ([`backend`](crate::backend)): snapshot objects
//! are immutable once written, and the manifest is replaced last, with a conditional PUT,
//! so a writer killed mid-upload leaves nothing visible. Sharded snapshots (one file per
//! writer rank, committed together) are in [`shard`].
//!
//! One job per module: this one holds [`Store`], its constructors and queries;
//! `manifest` reads and writes the manifest and the file names it may list; `commit` is
//! the one commit path (commit lock, id reservation, leases, debris); `save` is
//! the one save routine (full, delta and shard saves); `load` the one checked chain
//! reader ([`RestoreChain`]) used by load, verify, delete and the GPU loader; `delete`
//! and `verify` their operations; `retention` pins, [`Retention`] policies
//! ([`Store::prune`]) and [`Store::compact`]; [`shard`] the sharded snapshots.
//!
//! Deleting never re-encodes: a deleted snapshot that a listed delta still reads is
//! *retired* (gone from every query, its file kept) and removed, with any retired
//! ancestors, by the deletion that leaves nothing listed depending on it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, LocalDir, ObjectVersion};
use crate::format::{Header, SnapshotFile};
use crate::{Error, Policy, Tensor};

mod budget;
mod commit;
mod delete;
mod load;
mod manifest;
mod needed;
mod retention;
mod save;
pub mod shard;
mod stream;
mod verify;

pub use crate::backend::LOCK_FILE;
pub use budget::{FALLBACK_DECODE_BUDGET, check_decode_budget, default_decode_budget};
pub(crate) use commit::Writer;
pub use load::{ChainLink, RestoreChain};
pub(crate) use manifest::ManifestBody;
use manifest::ShardInfo;
pub use manifest::{MANIFEST_FILE, MANIFEST_VERSION, MANIFEST_VERSION_RETAIN, MAX_MANIFEST_BYTES};
pub(crate) use needed::needed_payloads;
pub use retention::{CompactReport, PruneReport, Retention};
pub use save::{BaseState, FullReason, SaveTimings};

/// Largest snapshot file read back, in bytes (1 TiB): a sanity bound, not a budget.
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 40;

/// One committed snapshot, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Id, increasing with every save.
    pub id: u64,
    /// The name it was saved as.
    pub name: String,
    /// The series it belongs to: a delta's base is the latest snapshot of its own series,
    /// so independent state (a model and its optimizer, saved separately) share a store.
    /// The default series is `""`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub series: String,
    /// Its file, relative to the store directory.
    pub file: String,
    /// The snapshot it is a delta of, if any.
    pub base: Option<u64>,
    /// [`Header::state_hash`] of the snapshot.
    pub state_hash: u64,
    /// Number of tensors.
    pub tensors: u64,
    /// Decoded size of all its tensors.
    pub raw_bytes: u64,
    /// Size of its file.
    pub stored_bytes: u64,
    /// For a sharded snapshot, its shards in rank order (then `file` is empty, `base` is
    /// `None`, and the other fields are totals); empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardInfo>,
}

impl SnapshotInfo {
    /// `raw_bytes / stored_bytes`.
    pub fn ratio(&self) -> f64 {
        self.raw_bytes as f64 / self.stored_bytes.max(1) as f64
    }
}

/// A decoded snapshot.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// What the manifest says of it.
    pub info: SnapshotInfo,
    /// String metadata saved with it.
    pub metadata: Vec<(String, String)>,
    /// Its tensors, decoded (bit-exact for lossless codecs, dequantized for lossy ones).
    pub tensors: Vec<Tensor>,
    /// Whether it came from the in-memory copy of the latest save rather than from disk.
    pub from_memory: bool,
}

/// What a save did: the snapshot and, per tensor, the codec chosen and why.
#[derive(Debug, Clone)]
pub struct SaveReport {
    /// The new snapshot.
    pub info: SnapshotInfo,
    /// Its header: per-tensor codec, sizes and [`Decision`](crate::format::Decision).
    pub header: Header,
    /// Why it is a full snapshot, if it is one (its `Display` is the reason as text).
    pub full_reason: Option<FullReason>,
    /// Time spent in each stage of the save.
    pub timings: SaveTimings,
}

/// The outcome of [`Store::verify`].
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Snapshots that decoded and matched every checksum.
    pub ok: Vec<u64>,
    /// Snapshots that did not, with the first error found in each.
    pub failed: Vec<(u64, Error)>,
    /// Files in the directory that the manifest does not list (left by a crash).
    pub orphans: Vec<PathBuf>,
    /// Retired snapshots ([`Store::delete`]): deleted, but kept on disk because a listed
    /// delta still reads them; they are checked as part of those deltas' chains.
    pub retired: Vec<u64>,
}

pub(crate) type State = Arc<Vec<Tensor>>;

/// The decoded state a store keeps of the latest save of a series (or of a rank).
#[derive(Debug, Clone)]
pub(crate) struct Cached {
    /// The snapshot id.
    pub(crate) id: u64,
    /// What it decodes to.
    pub(crate) state: State,
    /// Its metadata.
    pub(crate) metadata: Vec<(String, String)>,
}

/// A checkpoint store: a directory of snapshots and their manifest.
///
/// # Several writers
///
/// Any number of `Store`s, in any processes, may read and write one store at once.
/// Readers take no lock and never wait. A writer encodes and writes its snapshot files
/// without any lock and holds the store's commit lock only to commit: re-read the
/// manifest, check the change against it, replace it. So:
///
/// - two saves at once both commit, with distinct ids (local stores reserve an id per
///   save; on object storage the second to commit the same id gets [`Error::Conflict`]);
///   the manifest lists snapshots in commit order, and a save's base is the latest
///   snapshot of its series when the save began;
/// - a save whose base another writer deleted meanwhile still commits while that base is
///   kept retired ([`Store::delete`]), and keeps it so; if the base left the store
///   altogether, the save fails with [`Error::Conflict`] naming the base, removing what
///   it wrote (the next save starts from the store's latest snapshot);
/// - deletes, prunes and pins re-plan against the manifest as it is at their commit;
///   [`Store::compact`] holds the commit lock while it rewrites;
/// - a `Store`'s view of the manifest is refreshed by each of its own changes, or by
///   [`Store::refresh`];
/// - a writer that dies leaves its files in progress; the next writer to start removes
///   them (each writer holds a lease; a live writer's files are never removed).
///
/// ```
/// use bitsnap_core::{Policy, Role, Store, Tensor};
/// let dir = tempfile::tempdir().unwrap();
/// let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
/// let w: Vec<f32> = (0..10_000).map(|i| i as f32 * 1e-3).collect();
/// let t0 = Tensor::from_f32("w", &[100, 100], Role::Weight, &w).unwrap();
/// let first = store.save("step-0", vec![t0.clone()]).unwrap();
/// let mut w1 = w.clone();
/// w1[42] += 1.0;
/// let t1 = Tensor::from_f32("w", &[100, 100], Role::Weight, &w1).unwrap();
/// let second = store.save("step-1", vec![t1.clone()]).unwrap();
/// assert_eq!(second.info.base, Some(first.info.id));
/// assert!(second.info.stored_bytes < 1000);
/// // Restore from disk, walking the chain.
/// let reopened = Store::open(dir.path()).unwrap();
/// assert_eq!(reopened.load(second.info.id).unwrap().tensors, vec![t1]);
/// ```
pub struct Store {
    pub(crate) dir: PathBuf,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) policy: Policy,
    pub(crate) manifest: ManifestBody,
    /// Version of the manifest object `manifest` was read from (`None`: there was none).
    pub(crate) version: Option<ObjectVersion>,
    /// Per series, the latest save's id, decoded tensors and metadata.
    pub(crate) last: HashMap<String, Cached>,
    /// Per series and rank, the latest shard this `Store` saved.
    pub(crate) shard_last: HashMap<(String, u32), Cached>,
    /// Most bytes one restore may decode ([`Store::with_decode_budget`]).
    pub(crate) decode_budget: u64,
    /// Its nonce and lease once it writes (`commit`).
    pub(crate) writer: Writer,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("snapshots", &self.manifest.snapshots.len())
            .finish()
    }
}

impl Store {
    /// Opens an existing store for reading and writing (readers take no lock; writers
    /// take the commit lock around each commit only). Fails if `dir` holds no manifest.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store, Error> {
        Store::open_backend(Arc::new(LocalDir::new(dir)))
    }

    /// Opens the store in `dir`, creating the directory and an empty manifest if needed.
    pub fn open_or_create(dir: impl AsRef<Path>, policy: Policy) -> Result<Store, Error> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Store::open_or_create_backend(Arc::new(LocalDir::new(dir)), policy)
    }

    /// [`Store::open`] of a location: a directory, or a URL such as `s3://bucket/prefix`
    /// (with the `remote` feature; see [`backend::from_location`](crate::backend::from_location)).
    pub fn open_url(location: &str) -> Result<Store, Error> {
        Store::open_backend(crate::backend::from_location(location)?)
    }

    /// [`Store::open_or_create`] of a location: a directory or a URL.
    pub fn open_or_create_url(location: &str, policy: Policy) -> Result<Store, Error> {
        if crate::backend::is_url(location) {
            Store::open_or_create_backend(crate::backend::from_location(location)?, policy)
        } else {
            Store::open_or_create(location, policy)
        }
    }

    /// Opens an existing store kept by `backend`.
    pub fn open_backend(backend: Arc<dyn Backend>) -> Result<Store, Error> {
        let (manifest, version) = manifest::read_manifest(backend.as_ref())?.ok_or_else(|| {
            Error::io(
                backend.path_of(MANIFEST_FILE),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no bitsnap store here (MANIFEST is missing)",
                ),
            )
        })?;
        Ok(Store {
            dir: backend.location().to_path_buf(),
            backend,
            policy: Policy::default(),
            manifest,
            version: Some(version),
            last: HashMap::new(),
            shard_last: HashMap::new(),
            decode_budget: default_decode_budget(),
            writer: Writer::default(),
        })
    }

    /// Opens the store kept by `backend`, creating an empty manifest if there is none.
    pub fn open_or_create_backend(
        backend: Arc<dyn Backend>,
        policy: Policy,
    ) -> Result<Store, Error> {
        let mut store = match manifest::read_manifest(backend.as_ref())? {
            Some((manifest, version)) => Store {
                dir: backend.location().to_path_buf(),
                backend,
                policy,
                manifest,
                version: Some(version),
                last: HashMap::new(),
                shard_last: HashMap::new(),
                decode_budget: default_decode_budget(),
                writer: Writer::default(),
            },
            None => {
                let mut s = Store {
                    dir: backend.location().to_path_buf(),
                    backend,
                    policy,
                    manifest: ManifestBody {
                        version: MANIFEST_VERSION,
                        next_id: 1,
                        snapshots: Vec::new(),
                        retired: Vec::new(),
                        pinned: Vec::new(),
                    },
                    version: None,
                    last: HashMap::new(),
                    shard_last: HashMap::new(),
                    decode_budget: default_decode_budget(),
                    writer: Writer::default(),
                };
                // A directory holding snapshots but no manifest is not an empty store:
                // taking the lock would remove them as debris.
                if let Some(f) = manifest::snapshot_files(s.backend.as_ref())?.first() {
                    return Err(Error::NotAStore {
                        store: s.dir.clone(),
                        file: s.backend.path_of(f),
                    });
                }
                s.become_writer()?;
                // Written unless another process created it first (then: theirs).
                s.commit_with(|now| Ok((now.version.is_none().then(|| now.manifest.clone()), ())))?;
                s
            }
        };
        store.policy = policy;
        Ok(store)
    }

    /// The backend keeping this store's objects.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Sets the decode budget: the most bytes one restore (load, verify, the base of a
    /// save or delete, a GPU restore) may hold decoded at once, checked against the
    /// headers before anything is decoded ([`Error::Budget`] otherwise). Default:
    /// [`default_decode_budget`] (half the machine's RAM).
    pub fn with_decode_budget(mut self, bytes: u64) -> Store {
        self.decode_budget = bytes;
        self
    }

    /// [`Store::with_decode_budget`] on a borrowed store.
    pub fn set_decode_budget(&mut self, bytes: u64) {
        self.decode_budget = bytes;
    }

    /// The decode budget in bytes.
    pub fn decode_budget(&self) -> u64 {
        self.decode_budget
    }

    /// Replaces the encoding policy for later saves.
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// The encoding policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Committed snapshots, oldest first.
    pub fn snapshots(&self) -> &[SnapshotInfo] {
        &self.manifest.snapshots
    }

    /// The snapshot with this id.
    pub fn get(&self, id: u64) -> Option<&SnapshotInfo> {
        self.manifest.snapshots.iter().find(|s| s.id == id)
    }

    /// The latest snapshot named `name`.
    pub fn find_by_name(&self, name: &str) -> Option<&SnapshotInfo> {
        self.manifest
            .snapshots
            .iter()
            .rev()
            .find(|s| s.name == name)
    }

    /// The latest snapshot.
    pub fn latest(&self) -> Option<&SnapshotInfo> {
        self.manifest.snapshots.last()
    }

    /// The latest snapshot of `series`.
    pub fn latest_in(&self, series: &str) -> Option<&SnapshotInfo> {
        self.manifest
            .snapshots
            .iter()
            .rev()
            .find(|s| s.series == series)
    }

    /// The latest snapshot of `series` named `name`.
    pub fn find(&self, series: &str, name: &str) -> Option<&SnapshotInfo> {
        self.manifest
            .snapshots
            .iter()
            .rev()
            .find(|s| s.series == series && s.name == name)
    }

    /// The cached decoded state of snapshot `id`, if it is the latest save of its series
    /// made by this `Store`.
    fn cached(&self, id: u64) -> Option<&Cached> {
        self.last.values().find(|c| c.id == id)
    }

    /// A listed or retired snapshot: what chain walks may read.
    pub(crate) fn chain_info(&self, id: u64) -> Option<&SnapshotInfo> {
        self.get(id)
            .or_else(|| self.manifest.retired.iter().find(|s| s.id == id))
    }

    pub(crate) fn info(&self, id: u64) -> Result<&SnapshotInfo, Error> {
        self.get(id).ok_or_else(|| Error::UnknownSnapshot {
            store: self.dir.clone(),
            snapshot: id.to_string(),
        })
    }

    /// Reads and checks the header of snapshot `id` (no payload is decoded). For a
    /// sharded snapshot: every shard's entries, in rank order (their offsets are within
    /// each shard's file), with rank 0's metadata and no base.
    pub fn header(&self, id: u64) -> Result<Header, Error> {
        if self.info(id)?.shards.is_empty() {
            Ok(self.open_file(id)?.header)
        } else {
            self.sharded_header(id)
        }
    }

    /// Opens the file of snapshot `id` and checks that it holds that snapshot (header and
    /// trailer checked; payloads are checked as they are read).
    pub fn open_file(&self, id: u64) -> Result<SnapshotFile, Error> {
        let info = self.info(id)?;
        if !info.shards.is_empty() {
            return Err(Error::WrongKind {
                store: self.dir.clone(),
                snapshot: id,
                reason: "is sharded: read it with Store::load or Store::load_shard".into(),
            });
        }
        self.open_object(&info.file, id)
    }

    /// Reads and checks snapshot file `name`, which must hold snapshot `id`.
    pub(crate) fn open_object(&self, name: &str, id: u64) -> Result<SnapshotFile, Error> {
        let path = self.backend.path_of(name);
        let bytes = self
            .backend
            .read(name, MAX_SNAPSHOT_BYTES)?
            .ok_or_else(|| {
                Error::io(
                    &path,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "snapshot file is missing"),
                )
            })?;
        let file = SnapshotFile::from_bytes(bytes, &path)?;
        if file.header.id != id {
            return Err(Error::Malformed {
                file: path,
                tensor: None,
                what: "header",
                offset: 0,
                reason: format!(
                    "holds snapshot {} where the manifest expects {id}",
                    file.header.id
                ),
            });
        }
        Ok(file)
    }

    /// Re-reads the committed manifest: picks up what other writers committed since
    /// this `Store` last read it (every change re-reads it anyway, under the commit
    /// lock). The decoded state kept of this `Store`'s latest saves stays.
    ///
    /// ```
    /// use bitsnap_core::{Policy, Role, Store, Tensor};
    /// let dir = tempfile::tempdir()?;
    /// let mut a = Store::open_or_create(dir.path(), Policy::default())?;
    /// let mut b = Store::open(dir.path())?;
    /// let t = Tensor::from_f32("w", &[2], Role::Weight, &[1.0, 2.0])?;
    /// a.save("from-a", vec![t.clone()])?;
    /// assert!(b.snapshots().is_empty()); // the manifest as b opened it
    /// b.refresh()?;
    /// assert_eq!(b.snapshots().len(), 1);
    /// b.save("from-b", vec![t])?; // both write: the lock covers each commit only
    /// a.refresh()?;
    /// assert_eq!(a.snapshots().len(), 2);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn refresh(&mut self) -> Result<(), Error> {
        if let Some((m, v)) = manifest::read_manifest(self.backend.as_ref())? {
            self.manifest = m;
            self.version = Some(v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Role, Tensor};

    #[test]
    fn queries_follow_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
        assert!(store.latest().is_none());
        let t = Tensor::from_f32("w", &[2], Role::Weight, &[1.0, 2.0]).unwrap();
        store
            .save_in("a", "x", vec![t.clone()], Vec::new())
            .unwrap();
        store
            .save_in("b", "x", vec![t.clone()], Vec::new())
            .unwrap();
        assert_eq!(store.latest().map(|s| s.id), Some(2));
        assert_eq!(store.latest_in("a").map(|s| s.id), Some(1));
        assert_eq!(store.find("a", "x").map(|s| s.id), Some(1));
        assert_eq!(store.find_by_name("x").map(|s| s.id), Some(2));
        assert!(matches!(
            store.header(9),
            Err(Error::UnknownSnapshot { .. })
        ));
        assert!(store.load(2).unwrap().from_memory);
        let reopened = Store::open(dir.path()).unwrap();
        assert!(!reopened.load(2).unwrap().from_memory);
        assert_eq!(reopened.snapshots().len(), 2);
    }
}
