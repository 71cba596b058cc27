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

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::codec::{CodecId, Encoded};
use crate::format::{BaseRef, Entry, Header, SnapshotFile, SnapshotWriter};
use crate::{Error, Policy, Tensor};

/// File name of the manifest.
pub const MANIFEST_FILE: &str = "MANIFEST";
/// File name of the writer lock.
pub const LOCK_FILE: &str = "LOCK";
/// Largest manifest accepted, in bytes (64 MiB).
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// Manifest format version.
pub const MANIFEST_VERSION: u32 = 1;

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
}

impl SnapshotInfo {
    /// `raw_bytes / stored_bytes`.
    pub fn ratio(&self) -> f64 {
        self.raw_bytes as f64 / self.stored_bytes.max(1) as f64
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ManifestBody {
    version: u32,
    next_id: u64,
    snapshots: Vec<SnapshotInfo>,
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

type State = Arc<Vec<Tensor>>;
/// The decoded state a store keeps of the latest save of a series: id, tensors, metadata.
type Cached = (u64, State, Vec<(String, String)>);

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
    dir: PathBuf,
    policy: Policy,
    manifest: ManifestBody,
    /// Per series, the latest save's id, decoded tensors and metadata.
    last: HashMap<String, Cached>,
    lock: Option<File>,
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
        let dir = dir.as_ref().to_path_buf();
        let manifest = read_manifest(&dir)?.ok_or_else(|| {
            Error::io(
                dir.join(MANIFEST_FILE),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no bitsnap store here (MANIFEST is missing)",
                ),
            )
        })?;
        Ok(Store {
            dir,
            policy: Policy::default(),
            manifest,
            last: HashMap::new(),
            lock: None,
        })
    }

    /// Opens the store in `dir`, creating the directory and an empty manifest if needed.
    pub fn open_or_create(dir: impl AsRef<Path>, policy: Policy) -> Result<Store, Error> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut store = match read_manifest(&dir)? {
            Some(manifest) => Store {
                dir,
                policy,
                manifest,
                last: HashMap::new(),
                lock: None,
            },
            None => {
                let mut s = Store {
                    dir,
                    policy,
                    manifest: ManifestBody {
                        version: MANIFEST_VERSION,
                        next_id: 1,
                        snapshots: Vec::new(),
                    },
                    last: HashMap::new(),
                    lock: None,
                };
                // A directory holding snapshots but no manifest is not an empty store:
                // taking the lock would remove them as debris.
                if let Some(f) = snapshot_files(&s.dir)?.first() {
                    return Err(Error::Config(format!(
                        "{}: holds snapshot files ({}) but no {MANIFEST_FILE}; refusing to create a store over them",
                        s.dir.display(),
                        f.display()
                    )));
                }
                s.take_lock()?;
                let body = s.manifest.clone();
                s.write_manifest(body)?;
                s
            }
        };
        store.policy = policy;
        Ok(store)
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

    fn info(&self, id: u64) -> Result<&SnapshotInfo, Error> {
        self.get(id).ok_or_else(|| Error::UnknownSnapshot {
            store: self.dir.clone(),
            snapshot: id.to_string(),
        })
    }

    /// Reads and checks the header of snapshot `id` (no payload is decoded).
    pub fn header(&self, id: u64) -> Result<Header, Error> {
        Ok(self.open_file(id)?.header)
    }

    /// Opens the file of snapshot `id` and checks that it holds that snapshot (header and
    /// trailer checked; payloads are checked as they are read).
    pub fn open_file(&self, id: u64) -> Result<SnapshotFile, Error> {
        let info = self.info(id)?;
        let path = self.dir.join(&info.file);
        let file = SnapshotFile::open(&path)?;
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

    fn take_lock(&mut self) -> Result<(), Error> {
        if self.lock.is_some() {
            return Ok(());
        }
        let path = self.dir.join(LOCK_FILE);
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        f.try_lock().map_err(|e| match e {
            fs::TryLockError::WouldBlock => Error::io(
                &path,
                std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "another process is writing to this store",
                ),
            ),
            fs::TryLockError::Error(e) => Error::io(&path, e),
        })?;
        self.lock = Some(f);
        // We are the only writer: the manifest on disk is the truth, and files it does not
        // list were left by a crash.
        if let Some(m) = read_manifest(&self.dir)? {
            self.manifest = m;
        }
        for orphan in self.orphans()? {
            tracing::info!(file = %orphan.display(), "removing a file left by an interrupted save");
            fs::remove_file(&orphan).map_err(|e| Error::io(&orphan, e))?;
        }
        Ok(())
    }

    /// Files in the directory that look like snapshots or temporaries but are not listed.
    fn orphans(&self) -> Result<Vec<PathBuf>, Error> {
        let listed: std::collections::HashSet<&str> = self
            .manifest
            .snapshots
            .iter()
            .map(|s| s.file.as_str())
            .collect();
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))? {
            let entry = entry.map_err(|e| Error::io(&self.dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let ours = name.starts_with("snap-")
                && (name.ends_with(".bsnap") || name.ends_with(".tmp"))
                || name.starts_with("MANIFEST.") && name.ends_with(".tmp");
            if ours && !listed.contains(name) {
                out.push(entry.path());
            }
        }
        out.sort();
        Ok(out)
    }

    fn depth(&self, id: u64) -> u32 {
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
        let base_map: HashMap<&str, &Tensor> = base
            .as_ref()
            .map(|(_, s, _)| s.iter().map(|t| (t.name.as_str(), t)).collect())
            .unwrap_or_default();
        let mut encoded = encode_all(&policy, &tensors, &base_map)?;
        if base.is_some() {
            let verdict = policy.judge_delta(&encoded);
            full_reason = verdict.full_reason();
            if verdict == crate::policy::DeltaVerdict::WouldNotPay {
                encoded = encode_all(&policy, &tensors, &HashMap::new())?;
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
        let id = self.manifest.next_id;
        let file = format!("snap-{id:020}.bsnap");
        let header = self.write_snapshot(
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
            stored_bytes: file_size(&self.dir.join(&file))?,
        };
        let mut next = self.manifest.clone();
        next.next_id = id + 1;
        next.snapshots.push(info.clone());
        self.write_manifest(next)?;
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

    /// The decoded state of snapshot `id` and its state hash, from memory if possible.
    fn base_state(&self, id: u64) -> Result<(State, u64), Error> {
        let hash = self.info(id)?.state_hash;
        if let Some((_, state, _)) = self.cached(id) {
            return Ok((state.clone(), hash));
        }
        let (state, header) = self.decode_chain(id)?;
        Ok((state, header.state_hash()))
    }

    fn write_snapshot<'a>(
        &self,
        file: &str,
        id: u64,
        name: &str,
        base: Option<BaseRef>,
        metadata: Vec<(String, String)>,
        items: impl Iterator<Item = (&'a Tensor, &'a Encoded, &'a crate::format::Decision)>,
    ) -> Result<Header, Error> {
        let path = self.dir.join(file);
        let tmp = self.dir.join(format!("{file}.tmp"));
        let out = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w =
            SnapshotWriter::new(BufWriter::with_capacity(1 << 20, out), &tmp, id, name, base)?;
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
        let out = out
            .into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?;
        out.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(out);
        fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        sync_dir(&self.dir)?;
        Ok(header)
    }

    /// Commits `body` as the manifest. Once the rename succeeded the change is committed:
    /// `self.manifest` follows the disk even if the directory fsync then fails.
    fn write_manifest(&mut self, body: ManifestBody) -> Result<(), Error> {
        let path = self.dir.join(MANIFEST_FILE);
        let tmp = self
            .dir
            .join(format!("{MANIFEST_FILE}.{}.tmp", body.next_id));
        let body_json = serde_json::to_vec(&body)
            .map_err(|e| Error::Config(format!("manifest serialisation: {e}")))?;
        let file = ManifestFile {
            body: body.clone(),
            checksum: format!("{:016x}", xxh3_64(&body_json)),
        };
        let text = serde_json::to_vec_pretty(&file)
            .map_err(|e| Error::Config(format!("manifest serialisation: {e}")))?;
        {
            let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            std::io::Write::write_all(&mut f, &text).map_err(|e| Error::io(&tmp, e))?;
            f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        }
        fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        self.manifest = body;
        sync_dir(&self.dir)
    }

    /// Deletes snapshot `id`. Snapshots that are deltas on it are first rewritten against
    /// its own base (or as full snapshots), so every other snapshot stays readable and
    /// decodes to exactly what it did before.
    pub fn delete(&mut self, id: u64) -> Result<(), Error> {
        self.take_lock()?;
        let victim = self.info(id)?.clone();
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
            let header = self.write_snapshot(
                &name,
                dep.id,
                &dep.name,
                base,
                file.header.metadata.clone(),
                items.iter().map(|(t, e, d)| (t, e, d)),
            )?;
            if header.state_hash() != dep.state_hash {
                return Err(Error::Checksum {
                    file: self.dir.join(&name),
                    tensor: None,
                    what: "rebased state",
                    offset: 0,
                    expected: dep.state_hash,
                    actual: header.state_hash(),
                });
            }
            let stored = file_size(&self.dir.join(&name))?;
            if let Some(s) = next.snapshots.iter_mut().find(|s| s.id == dep.id) {
                replaced.push(self.dir.join(&s.file));
                s.file = name;
                s.base = base.map(|b| b.id);
                s.stored_bytes = stored;
            }
        }
        next.snapshots.retain(|s| s.id != id);
        next.next_id += dependants.len() as u64;
        self.write_manifest(next)?;
        replaced.push(self.dir.join(&victim.file));
        for f in replaced {
            fs::remove_file(&f).map_err(|e| Error::io(&f, e))?;
        }
        sync_dir(&self.dir)?;
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
fn decode_file(
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

fn encode_all(
    policy: &Policy,
    tensors: &[Tensor],
    base: &HashMap<&str, &Tensor>,
) -> Result<Vec<(Encoded, crate::format::Decision)>, Error> {
    tensors
        .par_iter()
        .map(|t| policy.encode_tensor(t, base.get(t.name.as_str()).copied()))
        .collect()
}

fn validate_metadata(metadata: &[(String, String)]) -> Result<(), Error> {
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

fn validate(tensors: &[Tensor], snapshot: &str) -> Result<(), Error> {
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

fn read_manifest(dir: &Path) -> Result<Option<ManifestBody>, Error> {
    let path = dir.join(MANIFEST_FILE);
    let meta = match fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    if meta.len() > MAX_MANIFEST_BYTES {
        return Err(Error::Limit {
            file: path,
            what: "manifest size",
            value: meta.len(),
            limit: MAX_MANIFEST_BYTES,
        });
    }
    let text = fs::read(&path).map_err(|e| Error::io(&path, e))?;
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
    if file.body.version != MANIFEST_VERSION {
        return Err(malformed(
            0,
            format!(
                "manifest version {} (this build reads {MANIFEST_VERSION})",
                file.body.version
            ),
        ));
    }
    for s in &file.body.snapshots {
        if s.file.contains(['/', '\\']) || s.file.starts_with('.') || s.id >= file.body.next_id {
            return Err(malformed(
                0,
                format!(
                    "snapshot {} has an invalid file name `{}` or id",
                    s.id, s.file
                ),
            ));
        }
    }
    Ok(Some(file.body))
}

/// Snapshot files (`snap-*.bsnap`) in `dir`.
fn snapshot_files(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        if name
            .to_str()
            .is_some_and(|n| n.starts_with("snap-") && n.ends_with(".bsnap"))
        {
            out.push(entry.path());
        }
    }
    Ok(out)
}

fn file_size(path: &Path) -> Result<u64, Error> {
    fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| Error::io(path, e))
}

/// fsyncs a directory so that renames in it are durable.
fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}
