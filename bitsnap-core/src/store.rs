//! A store: a directory of snapshot files and a manifest listing the complete ones.
//!
//! ```text
//! store/
//!   MANIFEST                       the committed list of snapshots (JSON, checksummed)
//!   LOCK                           held by the one writer
//!   snap-00000000000000000001.bsnap
//!   snap-00000000000000000002.bsnap   (a delta on 1)
//! ```
//!
//! Every change is atomic: a snapshot file is written under a temporary name, fsynced,
//! renamed into place and the directory fsynced; only then is the manifest rewritten the
//! same way. A crash at any point leaves the previous manifest, and every snapshot it
//! lists, intact; files it does not list are removed by the next writer.
//!
//! The same rules hold on object storage ([`backend`](crate::backend)): snapshot objects
//! are immutable once written, and the manifest is replaced last, with a conditional PUT,
//! so a writer killed mid-upload leaves nothing visible. Sharded snapshots (one file per
//! writer rank, committed together) are in [`crate::shard`].

use std::any::Any;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::backend::{Backend, LocalDir, ObjectVersion};
use crate::codec::{CodecId, Encoded};
use crate::format::{BaseRef, Entry, Header, SnapshotFile, SnapshotWriter};
use crate::shard::ShardInfo;
use crate::{Error, Policy, Tensor};

/// File name of the manifest.
pub const MANIFEST_FILE: &str = "MANIFEST";
/// File name of the writer lock.
pub const LOCK_FILE: &str = "LOCK";
/// Largest manifest accepted, in bytes (64 MiB).
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// Manifest format version (written when no snapshot is sharded).
pub const MANIFEST_VERSION: u32 = 1;
/// Manifest format version written when a snapshot is sharded (FORMAT.md 4.1).
pub const MANIFEST_VERSION_SHARDED: u32 = 2;
/// Largest snapshot file read back, in bytes (1 TiB): a sanity bound, not a budget.
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 40;
/// Attempts at committing a snapshot while other writers keep changing a remote manifest.
const COMMIT_ATTEMPTS: u32 = 8;

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

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ManifestBody {
    pub(crate) version: u32,
    pub(crate) next_id: u64,
    pub(crate) snapshots: Vec<SnapshotInfo>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ManifestFile {
    #[serde(flatten)]
    body: ManifestBody,
    /// xxh3-64 of the JSON serialisation of `body`, in hex.
    checksum: String,
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
    /// Why it is a full snapshot, if it is one.
    pub full_reason: Option<&'static str>,
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
}

pub(crate) type State = Arc<Vec<Tensor>>;
/// The decoded state a store keeps of the latest save of a series: id, tensors, metadata.
pub(crate) type Cached = (u64, State, Vec<(String, String)>);

/// A checkpoint store: a directory of snapshots and their manifest.
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
    lock: Option<Box<dyn Any + Send + Sync>>,
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
    /// Opens an existing store for reading (and writing, once a save takes the lock).
    /// Fails if `dir` holds no manifest.
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
        let (manifest, version) = read_manifest(backend.as_ref())?.ok_or_else(|| {
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
            lock: None,
        })
    }

    /// Opens the store kept by `backend`, creating an empty manifest if there is none.
    pub fn open_or_create_backend(
        backend: Arc<dyn Backend>,
        policy: Policy,
    ) -> Result<Store, Error> {
        let mut store = match read_manifest(backend.as_ref())? {
            Some((manifest, version)) => Store {
                dir: backend.location().to_path_buf(),
                backend,
                policy,
                manifest,
                version: Some(version),
                last: HashMap::new(),
                shard_last: HashMap::new(),
                lock: None,
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
                    },
                    version: None,
                    last: HashMap::new(),
                    shard_last: HashMap::new(),
                    lock: None,
                };
                // A directory holding snapshots but no manifest is not an empty store:
                // taking the lock would remove them as debris.
                if let Some(f) = snapshot_files(s.backend.as_ref())?.first() {
                    return Err(Error::Config(format!(
                        "{}: holds snapshot files ({}) but no {MANIFEST_FILE}; refusing to create a store over them",
                        s.dir.display(),
                        s.backend.path_of(f).display()
                    )));
                }
                s.take_lock()?;
                if s.version.is_none() {
                    let body = s.manifest.clone();
                    match s.write_manifest(body) {
                        // Another process created it first: use theirs.
                        Err(Error::Conflict { .. }) => s.refresh()?,
                        r => r?,
                    }
                }
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
        self.last.values().find(|(l, _, _)| *l == id)
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
            return Err(Error::Config(format!(
                "{}: snapshot {id} is sharded: read it with Store::load or Store::load_shard",
                self.dir.display()
            )));
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

    /// Snapshots from the full one at the root of `id`'s chain to `id`: the order in which
    /// a restore applies them.
    pub fn chain(&self, id: u64) -> Result<Vec<u64>, Error> {
        let mut chain = vec![id];
        let mut cur = self.info(id)?;
        while let Some(b) = cur.base {
            if chain.len() > self.manifest.snapshots.len() {
                return Err(Error::MissingBase {
                    file: self.dir.join(&cur.file),
                    base_id: b,
                    reason: "forms a cycle in the manifest".into(),
                });
            }
            cur = self.get(b).ok_or_else(|| Error::MissingBase {
                file: self.dir.join(&cur.file),
                base_id: b,
                reason: "is not in the store".into(),
            })?;
            chain.push(b);
        }
        chain.reverse();
        Ok(chain)
    }

    /// Decodes snapshot `id`, walking its chain of bases. The latest save is served from
    /// memory when this `Store` made it (`from_memory` says so).
    pub fn load(&self, id: u64) -> Result<Snapshot, Error> {
        let info = self.info(id)?.clone();
        if !info.shards.is_empty() {
            return self.load_sharded(id);
        }
        if let Some((_, state, metadata)) = self.cached(id) {
            return Ok(Snapshot {
                info,
                metadata: metadata.clone(),
                tensors: state.as_ref().clone(),
                from_memory: true,
            });
        }
        let (state, header) = self.decode_chain(id)?;
        Ok(Snapshot {
            info,
            metadata: header.metadata,
            tensors: Arc::try_unwrap(state).unwrap_or_else(|s| s.as_ref().clone()),
            from_memory: false,
        })
    }

    fn decode_chain(&self, id: u64) -> Result<(State, Header), Error> {
        let chain = self.chain(id)?;
        let mut state: Option<(State, Header)> = None;
        for sid in chain {
            let file = self.open_file(sid)?;
            let prev = state
                .as_ref()
                .map(|(s, h)| (s.clone(), h.id, h.state_hash()));
            let decoded = decode_file(
                &file,
                prev.as_ref()
                    .map(|(s, id, hash)| (s.as_slice(), *id, *hash)),
            )?;
            state = Some((Arc::new(decoded), file.header));
        }
        state.ok_or_else(|| Error::UnknownSnapshot {
            store: self.dir.clone(),
            snapshot: id.to_string(),
        })
    }

    /// Becomes a writer. Local stores: takes the writer lock (once); the manifest on
    /// disk is then the truth and files it does not list were left by a crash. Remote
    /// stores have no lock: the manifest is re-read before every change and committed
    /// conditionally.
    pub(crate) fn take_lock(&mut self) -> Result<(), Error> {
        if self.lock.is_some() {
            return Ok(());
        }
        self.lock = self.backend.lock()?;
        self.refresh()?;
        if self.backend.exclusive() {
            for orphan in self.orphan_names()? {
                tracing::info!(file = %self.backend.path_of(&orphan).display(),
                    "removing a file left by an interrupted save");
                self.backend.remove(&orphan)?;
            }
        }
        Ok(())
    }

    /// Re-reads the committed manifest.
    pub(crate) fn refresh(&mut self) -> Result<(), Error> {
        if let Some((m, v)) = read_manifest(self.backend.as_ref())? {
            self.manifest = m;
            self.version = Some(v);
        }
        Ok(())
    }

    /// Files in the directory that look like snapshots or temporaries but are not listed.
    fn orphans(&self) -> Result<Vec<PathBuf>, Error> {
        Ok(self
            .orphan_names()?
            .iter()
            .map(|n| self.backend.path_of(n))
            .collect())
    }

    /// Names of the objects that look like snapshots or temporaries but are not listed.
    /// Shard files of snapshot ids not committed yet are not orphans: their writer may
    /// still be at work ([`crate::shard`]).
    fn orphan_names(&self) -> Result<Vec<String>, Error> {
        let listed: std::collections::HashSet<&str> = self
            .manifest
            .snapshots
            .iter()
            .flat_map(|s| {
                std::iter::once(s.file.as_str()).chain(s.shards.iter().map(|h| h.file.as_str()))
            })
            .collect();
        let mut out = Vec::new();
        for name in self.backend.list()? {
            let ours = name.starts_with("snap-")
                && (name.ends_with(".bsnap") || name.ends_with(".tmp"))
                || name.starts_with("MANIFEST.") && name.ends_with(".tmp");
            let pending = crate::shard::pending_shard(&name, self.manifest.next_id);
            if ours && !pending && !listed.contains(name.as_str()) {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    pub(crate) fn depth(&self, id: u64) -> u32 {
        self.chain(id).map_or(u32::MAX, |c| c.len() as u32 - 1)
    }

    /// Saves `tensors` as the next snapshot, named `name`.
    pub fn save(&mut self, name: &str, tensors: Vec<Tensor>) -> Result<SaveReport, Error> {
        self.save_with_metadata(name, tensors, Vec::new())
    }

    /// Saves `tensors` with string metadata as the next snapshot of the default series.
    pub fn save_with_metadata(
        &mut self,
        name: &str,
        tensors: Vec<Tensor>,
        metadata: Vec<(String, String)>,
    ) -> Result<SaveReport, Error> {
        self.save_in("", name, tensors, metadata)
    }

    /// Saves `tensors` with string metadata as the next snapshot of `series`. It is a
    /// delta on the latest snapshot of that series unless the policy calls for a full one.
    pub fn save_in(
        &mut self,
        series: &str,
        name: &str,
        tensors: Vec<Tensor>,
        metadata: Vec<(String, String)>,
    ) -> Result<SaveReport, Error> {
        self.take_lock()?;
        validate(&tensors, name)?;
        validate_metadata(&metadata)?;
        let policy = self.policy;
        // Choose the base.
        let mut full_reason = None;
        let base: Option<(u64, State, u64)> = match self.latest_in(series).map(|s| s.id) {
            None => {
                full_reason = Some("first snapshot");
                None
            }
            Some(latest) if !self.info(latest)?.shards.is_empty() => {
                full_reason = Some("latest snapshot is sharded");
                None
            }
            Some(latest) if self.depth(latest).saturating_add(1) >= policy.full_every => {
                full_reason = Some("full snapshot interval reached");
                None
            }
            Some(latest) => match self.base_state(latest) {
                Ok((state, hash)) => Some((latest, state, hash)),
                Err(e) => {
                    tracing::warn!(error = %e, "latest snapshot unreadable; saving a full snapshot");
                    full_reason = Some("latest snapshot unreadable");
                    None
                }
            },
        };
        let (encoded, base) = encode_against(&policy, &tensors, base, &mut full_reason)?;
        let id = self.manifest.next_id;
        let file = self.snapshot_file_name(id);
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
        let info = SnapshotInfo {
            id,
            name: name.to_string(),
            series: series.to_string(),
            file: file.clone(),
            base: base.map(|b| b.id),
            state_hash: header.state_hash(),
            tensors: header.entries.len() as u64,
            raw_bytes: header.raw_bytes(),
            stored_bytes,
            shards: Vec::new(),
        };
        self.commit_new(info.clone(), &[file])?;
        // Keep what this snapshot decodes to: the base of the next delta, and the answer
        // to a restore in this process.
        let mut state = tensors;
        for (t, (e, _)) in state.iter_mut().zip(encoded) {
            if let Some((decoded, _)) = e.lossy {
                t.data = decoded;
            }
        }
        self.last
            .insert(series.to_string(), (id, Arc::new(state), metadata));
        Ok(SaveReport {
            info,
            header,
            full_reason,
        })
    }

    /// The file name of a new snapshot `id`: `snap-<id>.bsnap` under the writer lock;
    /// with a random suffix on remote stores, where writers are not excluded and must
    /// not overwrite each other's objects.
    fn snapshot_file_name(&self, id: u64) -> String {
        if self.backend.exclusive() {
            format!("snap-{id:020}.bsnap")
        } else {
            format!("snap-{id:020}-{:016x}.bsnap", unique_token())
        }
    }

    /// Commits `info` as a new snapshot: appends it to the manifest and replaces the
    /// manifest. When another writer changed a remote manifest first, re-reads it and
    /// tries again, as long as `info`'s id is still free and its bases still listed;
    /// otherwise removes `files` (what this save wrote) and fails with
    /// [`Error::Conflict`].
    pub(crate) fn commit_new(&mut self, info: SnapshotInfo, files: &[String]) -> Result<(), Error> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let bases: Vec<u64> = info
                .base
                .into_iter()
                .chain(info.shards.iter().filter_map(|s| s.base))
                .collect();
            let stale = if info.id < self.manifest.next_id {
                Some(format!(
                    "snapshot id {} was taken (the store's next id is {})",
                    info.id, self.manifest.next_id
                ))
            } else {
                bases
                    .iter()
                    .find(|b| self.get(**b).is_none())
                    .map(|b| format!("base snapshot {b} was deleted"))
            };
            let result = match stale {
                Some(reason) => Err(Error::Conflict {
                    file: self.backend.path_of(MANIFEST_FILE),
                    reason,
                }),
                None => {
                    let mut next = self.manifest.clone();
                    next.next_id = info.id + 1;
                    next.snapshots.push(info.clone());
                    self.write_manifest(next)
                }
            };
            match result {
                Err(Error::Conflict { .. })
                    if !self.backend.exclusive() && attempt < COMMIT_ATTEMPTS =>
                {
                    tracing::info!(
                        id = info.id,
                        attempt,
                        "manifest changed underneath; retrying the commit"
                    );
                    self.refresh()?;
                    if info.id < self.manifest.next_id
                        || bases.iter().any(|b| self.get(*b).is_none())
                    {
                        attempt = COMMIT_ATTEMPTS - 1;
                    }
                }
                Err(e) => {
                    if matches!(e, Error::Conflict { .. }) {
                        for f in files {
                            let _ = self.backend.remove(f);
                        }
                    }
                    return Err(e);
                }
                Ok(()) => return Ok(()),
            }
        }
    }

    /// The decoded state of snapshot `id` and its state hash, from memory if possible.
    fn base_state(&self, id: u64) -> Result<(State, u64), Error> {
        let hash = self.info(id)?.state_hash;
        if let Some((_, state, _)) = self.cached(id) {
            return Ok((state.clone(), hash));
        }
        let (state, header) = self.decode_chain(id)?;
        Ok((state, header.state_hash()))
    }

    /// Writes snapshot file `file` through the backend; returns its header and size.
    pub(crate) fn write_snapshot<'a>(
        &self,
        file: &str,
        id: u64,
        name: &str,
        base: Option<BaseRef>,
        metadata: Vec<(String, String)>,
        items: impl Iterator<Item = (&'a Tensor, &'a Encoded, &'a crate::format::Decision)>,
    ) -> Result<(Header, u64), Error> {
        let path = self.backend.path_of(file);
        let out = self.backend.create(file)?;
        let mut w = SnapshotWriter::new(out, &path, id, name, base)?;
        w.set_metadata(metadata);
        for (t, e, d) in items {
            let raw_hash = xxh3_64(e.lossy.as_ref().map_or(&t.data, |l| &l.0));
            let entry = Entry {
                name: t.name.clone(),
                dtype: t.dtype,
                role: t.role,
                codec: e.codec,
                shape: t.shape.clone(),
                offset: 0,
                len: 0,
                payload_hash: 0,
                raw_hash,
                decision: d.clone(),
            };
            w.push(entry, &e.payload)?;
        }
        let (header, out) = w.finish()?;
        let size = out.finish()?;
        Ok((header, size))
    }

    /// Commits `body` as the manifest. Once the rename (local) or conditional PUT
    /// (remote) succeeded the change is committed: `self.manifest` follows the store even
    /// if the directory fsync then fails.
    pub(crate) fn write_manifest(&mut self, mut body: ManifestBody) -> Result<(), Error> {
        body.version = if body.snapshots.iter().any(|s| !s.shards.is_empty()) {
            MANIFEST_VERSION_SHARDED
        } else {
            MANIFEST_VERSION
        };
        let body_json = serde_json::to_vec(&body)
            .map_err(|e| Error::Config(format!("manifest serialisation: {e}")))?;
        let file = ManifestFile {
            body: body.clone(),
            checksum: format!("{:016x}", xxh3_64(&body_json)),
        };
        let text = serde_json::to_vec_pretty(&file)
            .map_err(|e| Error::Config(format!("manifest serialisation: {e}")))?;
        let version = self
            .backend
            .commit_manifest(MANIFEST_FILE, &text, self.version.as_ref())?;
        self.manifest = body;
        self.version = Some(version);
        self.backend.sync()
    }

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
        let new_base: Option<(u64, State, u64)> = match victim.base {
            Some(b) => {
                let (s, h) = self.base_state(b)?;
                Some((b, s, h))
            }
            None => None,
        };
        let mut next = self.manifest.clone();
        let mut replaced = Vec::new();
        // What the victim decodes to: every dependant was encoded against it.
        let victim_state = if dependants.is_empty() {
            None
        } else {
            Some(self.base_state(id)?.0)
        };
        let base_map: HashMap<&str, &Tensor> = new_base
            .as_ref()
            .map(|(_, s, _)| s.iter().map(|t| (t.name.as_str(), t)).collect())
            .unwrap_or_default();
        for (gen_i, dep) in dependants.iter().enumerate() {
            let file = self.open_file(dep.id)?;
            let victim_state = victim_state
                .as_deref()
                .map(Vec::as_slice)
                .unwrap_or_default();
            let dep_state = decode_file(&file, Some((victim_state, id, victim.state_hash)))?;
            // Payloads that do not depend on the base are copied as they are (a quantized
            // tensor must not be quantized twice); the others are re-encoded losslessly.
            let lossless = Policy {
                lossiness: crate::Lossiness::Lossless,
                ..self.policy
            };
            let mut items = Vec::with_capacity(file.header.entries.len());
            for (entry, t) in file.header.entries.iter().zip(dep_state.iter()) {
                if entry.codec.needs_base() {
                    let (e, d) =
                        lossless.encode_tensor(t, base_map.get(t.name.as_str()).copied())?;
                    items.push((t.clone(), e, d));
                } else {
                    let payload = file.payload(entry)?.to_vec();
                    let lossy = (entry.codec == CodecId::Cluster)
                        .then(|| (t.data.clone(), entry.decision.error.unwrap_or_default()));
                    items.push((
                        t.clone(),
                        Encoded {
                            codec: entry.codec,
                            payload,
                            lossy,
                        },
                        entry.decision.clone(),
                    ));
                }
            }
            let uses_base = items.iter().any(|(_, e, _)| e.codec.needs_base());
            let base = new_base
                .as_ref()
                .filter(|_| uses_base)
                .map(|(bid, _, hash)| BaseRef {
                    id: *bid,
                    state_hash: *hash,
                });
            let name = format!("snap-{:020}-r{}.bsnap", dep.id, next.next_id + gen_i as u64);
            let (header, stored) = self.write_snapshot(
                &name,
                dep.id,
                &dep.name,
                base,
                file.header.metadata.clone(),
                items.iter().map(|(t, e, d)| (t, e, d)),
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
        self.last.retain(|_, (l, _, _)| *l != id);
        Ok(())
    }

    /// Decodes every snapshot and checks every checksum, header, payload and decoded
    /// tensor, and the chain links between snapshots.
    pub fn verify(&self) -> Result<VerifyReport, Error> {
        let mut report = VerifyReport {
            orphans: self.orphans()?,
            ..VerifyReport::default()
        };
        // Decode in id order, keeping states only while a later snapshot needs them.
        let mut needed: HashMap<u64, usize> = HashMap::new();
        for s in &self.manifest.snapshots {
            if let Some(b) = s.base {
                *needed.entry(b).or_default() += 1;
            }
        }
        let mut states: HashMap<u64, (State, u64)> = HashMap::new();
        for s in &self.manifest.snapshots {
            if !s.shards.is_empty() {
                match self.verify_sharded(s) {
                    Ok(()) => report.ok.push(s.id),
                    Err(e) => report.failed.push((s.id, e)),
                }
                continue;
            }
            let result = (|| {
                let file = self.open_file(s.id)?;
                let prev = match s.base {
                    Some(b) => Some(
                        states
                            .get(&b)
                            .cloned()
                            .map_or_else(|| self.base_state(b), Ok)?,
                    ),
                    None => None,
                };
                let decoded = decode_file(
                    &file,
                    prev.as_ref()
                        .map(|(st, h)| (st.as_slice(), s.base.unwrap_or(0), *h)),
                )?;
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
                Ok::<_, Error>((Arc::new(decoded), hash))
            })();
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

/// Decodes every tensor of `file`; `prev` is the base snapshot's state, id and state hash.
pub(crate) fn decode_file(
    file: &SnapshotFile,
    prev: Option<(&[Tensor], u64, u64)>,
) -> Result<Vec<Tensor>, Error> {
    let header = &file.header;
    let base_map: HashMap<&str, &Tensor> = match (header.base, prev) {
        (None, _) => HashMap::new(),
        (Some(want), Some((state, id, hash))) => {
            if want.id != id || want.state_hash != hash {
                return Err(Error::MissingBase {
                    file: file.path.clone(),
                    base_id: want.id,
                    reason: format!(
                        "does not match: found snapshot {id} with state hash {hash:016x}, expected {:016x}",
                        want.state_hash
                    ),
                });
            }
            state.iter().map(|t| (t.name.as_str(), t)).collect()
        }
        (Some(want), None) => {
            return Err(Error::MissingBase {
                file: file.path.clone(),
                base_id: want.id,
                reason: "was not provided".into(),
            });
        }
    };
    header
        .entries
        .par_iter()
        .map(|e| {
            let base = base_map
                .get(e.name.as_str())
                .filter(|b| b.dtype == e.dtype && b.shape == e.shape)
                .map(|b| b.data.as_slice());
            let data = file.decode(e, base)?;
            Ok(Tensor {
                name: e.name.clone(),
                dtype: e.dtype,
                shape: e.shape.clone(),
                role: e.role,
                data,
            })
        })
        .collect()
}

/// An encoded tensor and how its codec was chosen.
pub(crate) type EncodedTensor = (Encoded, crate::format::Decision);

/// Encodes `tensors` against `base` (its id, decoded state and state hash) if there is
/// one and the delta pays, else full; sets `full_reason` when it ends up full. Returns the
/// encoded tensors and the base they were encoded against.
pub(crate) fn encode_against(
    policy: &Policy,
    tensors: &[Tensor],
    base: Option<(u64, State, u64)>,
    full_reason: &mut Option<&'static str>,
) -> Result<(Vec<EncodedTensor>, Option<BaseRef>), Error> {
    let base_map: HashMap<&str, &Tensor> = base
        .as_ref()
        .map(|(_, s, _)| s.iter().map(|t| (t.name.as_str(), t)).collect())
        .unwrap_or_default();
    let mut encoded = encode_all(policy, tensors, &base_map)?;
    if base.is_some() {
        let verdict = policy.judge_delta(&encoded);
        *full_reason = verdict.full_reason();
        if verdict == crate::policy::DeltaVerdict::WouldNotPay {
            encoded = encode_all(policy, tensors, &HashMap::new())?;
        }
    }
    let base = if full_reason.is_some() {
        None
    } else {
        base.map(|(id, _, hash)| BaseRef {
            id,
            state_hash: hash,
        })
    };
    Ok((encoded, base))
}

pub(crate) fn encode_all(
    policy: &Policy,
    tensors: &[Tensor],
    base: &HashMap<&str, &Tensor>,
) -> Result<Vec<(Encoded, crate::format::Decision)>, Error> {
    tensors
        .par_iter()
        .map(|t| policy.encode_tensor(t, base.get(t.name.as_str()).copied()))
        .collect()
}

pub(crate) fn validate_metadata(metadata: &[(String, String)]) -> Result<(), Error> {
    if metadata.len() as u64 > crate::format::MAX_METADATA {
        return Err(Error::Config(format!(
            "{} metadata entries, more than {}",
            metadata.len(),
            crate::format::MAX_METADATA
        )));
    }
    for (k, v) in metadata {
        if k.len() > crate::MAX_NAME_BYTES || v.len() > crate::format::MAX_METADATA_VALUE_BYTES {
            return Err(Error::Config(format!(
                "metadata `{}`: key of {} bytes or value of {} bytes is over the limit ({} / {})",
                k.chars().take(64).collect::<String>(),
                k.len(),
                v.len(),
                crate::MAX_NAME_BYTES,
                crate::format::MAX_METADATA_VALUE_BYTES
            )));
        }
    }
    Ok(())
}

pub(crate) fn validate(tensors: &[Tensor], snapshot: &str) -> Result<(), Error> {
    if snapshot.len() > crate::MAX_NAME_BYTES {
        return Err(Error::Config(format!(
            "snapshot name is {} bytes, more than {}",
            snapshot.len(),
            crate::MAX_NAME_BYTES
        )));
    }
    if tensors.len() as u64 > crate::format::MAX_TENSORS {
        return Err(Error::Config(format!(
            "{} tensors, more than {}",
            tensors.len(),
            crate::format::MAX_TENSORS
        )));
    }
    let mut names = std::collections::HashSet::new();
    for t in tensors {
        let expected = crate::tensor::byte_len(&t.name, t.dtype, &t.shape)?;
        if t.data.len() as u64 != expected {
            return Err(Error::InvalidTensor {
                tensor: t.name.clone(),
                reason: format!(
                    "{} bytes of data, {expected} expected for shape {:?} of {}",
                    t.data.len(),
                    t.shape,
                    t.dtype
                ),
            });
        }
        if !names.insert(t.name.as_str()) {
            return Err(Error::InvalidTensor {
                tensor: t.name.clone(),
                reason: "appears twice in one snapshot".into(),
            });
        }
    }
    Ok(())
}

fn read_manifest(backend: &dyn Backend) -> Result<Option<(ManifestBody, ObjectVersion)>, Error> {
    let path = backend.path_of(MANIFEST_FILE);
    let (text, version) = match backend.read_versioned(MANIFEST_FILE, MAX_MANIFEST_BYTES) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(None),
        Err(Error::Limit { value, .. }) => {
            return Err(Error::Limit {
                file: path,
                what: "manifest size",
                value,
                limit: MAX_MANIFEST_BYTES,
            });
        }
        Err(e) => return Err(e),
    };
    let malformed = |offset: u64, reason: String| Error::Malformed {
        file: path.clone(),
        tensor: None,
        what: "manifest",
        offset,
        reason,
    };
    let file: ManifestFile = serde_json::from_slice(&text)
        .map_err(|e| malformed(0, format!("line {} column {}: {e}", e.line(), e.column())))?;
    let body_json = serde_json::to_vec(&file.body).map_err(|e| malformed(0, e.to_string()))?;
    let actual = xxh3_64(&body_json);
    let expected = u64::from_str_radix(&file.checksum, 16)
        .map_err(|_| malformed(0, format!("checksum `{}` is not hex", file.checksum)))?;
    if actual != expected {
        return Err(Error::Checksum {
            file: path,
            tensor: None,
            what: "manifest",
            offset: 0,
            expected,
            actual,
        });
    }
    if file.body.version != MANIFEST_VERSION && file.body.version != MANIFEST_VERSION_SHARDED {
        return Err(malformed(
            0,
            format!(
                "manifest version {} (this build reads {MANIFEST_VERSION} and {MANIFEST_VERSION_SHARDED})",
                file.body.version
            ),
        ));
    }
    let bad_name = |f: &str| f.contains(['/', '\\']) || f.starts_with('.');
    for s in &file.body.snapshots {
        if bad_name(&s.file) || s.id >= file.body.next_id {
            return Err(malformed(
                0,
                format!(
                    "snapshot {} has an invalid file name `{}` or id",
                    s.id, s.file
                ),
            ));
        }
        if let Err(reason) = crate::shard::check_listing(s, file.body.version) {
            return Err(malformed(0, format!("snapshot {}: {reason}", s.id)));
        }
        if s.shards.iter().any(|h| bad_name(&h.file)) {
            return Err(malformed(
                0,
                format!("snapshot {} has a shard with an invalid file name", s.id),
            ));
        }
    }
    Ok(Some((file.body, version)))
}

/// Snapshot files (`snap-*.bsnap`) in the store.
fn snapshot_files(backend: &dyn Backend) -> Result<Vec<String>, Error> {
    Ok(backend
        .list()?
        .into_iter()
        .filter(|n| n.starts_with("snap-") && n.ends_with(".bsnap"))
        .collect())
}

/// 64 random bits, for object names no other writer picks.
fn unique_token() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}
