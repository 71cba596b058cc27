//! The manifest (FORMAT.md 4): the committed list of snapshots, and the file names it
//! may list (only names the store itself generates).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use super::{SnapshotInfo, Store};
use crate::Error;
use crate::backend::{Backend, ObjectVersion};

/// File name of the manifest.
pub const MANIFEST_FILE: &str = "MANIFEST";
/// Largest manifest accepted, in bytes (64 MiB).
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// Manifest format version (written when no snapshot is sharded).
pub const MANIFEST_VERSION: u32 = 1;
/// Manifest format version written when a snapshot is sharded (FORMAT.md 4.1).
pub const MANIFEST_VERSION_SHARDED: u32 = 2;
/// Manifest format version written when a snapshot is retired or pinned (FORMAT.md 4.2):
/// readers of versions 1 and 2 refuse it, so none shows a retired snapshot as live or
/// removes a retired file that a live delta still reads.
pub const MANIFEST_VERSION_RETAIN: u32 = 3;

/// Most shards (ranks) in one snapshot.
pub const MAX_SHARDS: u32 = 1 << 16;
/// One rank's part of a sharded snapshot, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// The writer's rank, from 0.
    pub rank: u32,
    /// Its file, relative to the store.
    pub file: String,
    /// The snapshot whose shard of the same rank this one is a delta of, if any.
    pub base: Option<u64>,
    /// [`Header::state_hash`](crate::format::Header::state_hash) of the shard.
    pub state_hash: u64,
    /// Number of tensors.
    pub tensors: u64,
    /// Decoded size of its tensors.
    pub raw_bytes: u64,
    /// Size of its file.
    pub stored_bytes: u64,
    /// The commit attempt its header carries (format v2; 0 for shards written before
    /// attempts existed). Omitted from the manifest when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempt: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ManifestBody {
    pub(crate) version: u32,
    pub(crate) next_id: u64,
    pub(crate) snapshots: Vec<SnapshotInfo>,
    /// Deleted snapshots whose files a listed delta still reads (FORMAT.md 4.2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) retired: Vec<SnapshotInfo>,
    /// Pinned snapshot ids, ascending: never pruned or deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) pinned: Vec<u64>,
}

impl ManifestBody {
    /// The version this body is written as: the lowest that can express it.
    pub(crate) fn required_version(&self) -> u32 {
        if !self.retired.is_empty() || !self.pinned.is_empty() {
            MANIFEST_VERSION_RETAIN
        } else if self.snapshots.iter().any(|s| !s.shards.is_empty()) {
            MANIFEST_VERSION_SHARDED
        } else {
            MANIFEST_VERSION
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct ManifestFile {
    #[serde(flatten)]
    body: ManifestBody,
    /// xxh3-64 of the JSON serialisation of `body`, in hex.
    checksum: String,
}

/// The snapshot file names a store generates (FORMAT.md 1, 4.1, 5.1); a manifest may
/// list no other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SnapshotName {
    /// `snap-<id:020>.bsnap`: a snapshot saved by a writer that held the store's lock
    /// for its whole life (bitsnap before commit-only locking).
    Plain { id: u64 },
    /// `snap-<id:020>-<16 hex>.bsnap`: a snapshot saved by the writer whose nonce is the
    /// hex (local stores; its lease tells whether it is alive), or with a random suffix
    /// (object storage).
    Unique { id: u64, nonce: u64 },
    /// `snap-<id:020>-r<n>.bsnap`: a snapshot rewritten by a deletion.
    Rebased { id: u64 },
    /// `snap-<id:020>-s<rank:05>.bsnap`: rank `rank`'s shard.
    Shard { id: u64, rank: u32 },
}

impl SnapshotName {
    /// Parses a file name the store generated; `None` for any other name.
    pub(crate) fn parse(name: &str) -> Option<SnapshotName> {
        let rest = name.strip_prefix("snap-")?.strip_suffix(".bsnap")?;
        let (id, tail) = (rest.get(..20)?, rest.get(20..)?);
        let id = digits(id)?;
        if tail.is_empty() {
            return Some(SnapshotName::Plain { id });
        }
        let tail = tail.strip_prefix('-')?;
        if let Some(n) = tail.strip_prefix('r') {
            digits(n)?;
            return Some(SnapshotName::Rebased { id });
        }
        if let Some(r) = tail.strip_prefix('s') {
            let rank = (r.len() == 5).then(|| digits(r)).flatten()?;
            return Some(SnapshotName::Shard {
                id,
                rank: u32::try_from(rank).ok()?,
            });
        }
        (tail.len() == 16 && tail.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| u64::from_str_radix(tail, 16).ok())
            .flatten()
            .map(|nonce| SnapshotName::Unique { id, nonce })
    }

    /// The snapshot id the name carries.
    pub(crate) fn id(self) -> u64 {
        match self {
            SnapshotName::Plain { id }
            | SnapshotName::Unique { id, .. }
            | SnapshotName::Rebased { id }
            | SnapshotName::Shard { id, .. } => id,
        }
    }
}

/// The id of any name that starts `snap-<20 digits>` (snapshot files, shards, rebased
/// files, their temporaries): what id reservation must stay above.
pub(crate) fn snapshot_name_id(name: &str) -> Option<u64> {
    digits(name.strip_prefix("snap-")?.get(..20)?)
}

/// The generation `n` of a rebased file name `snap-<id>-r<n>.bsnap` (or its temporary).
pub(crate) fn rebased_generation(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("snap-")?.get(20..)?.strip_prefix("-r")?;
    let rest = rest.strip_suffix(".tmp").unwrap_or(rest);
    digits(rest.strip_suffix(".bsnap")?)
}

/// A non-empty run of ASCII digits as a `u64`.
fn digits(s: &str) -> Option<u64> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// Checks that `s` lists only files the store generates for it: an unsharded snapshot
/// a plain, unique or rebased name of its own id; each shard the shard name of its id
/// and rank. `MANIFEST`, `LOCK`, directories and `../x` are refused, so a crafted
/// manifest cannot make `delete` remove them.
fn check_names(s: &SnapshotInfo) -> Result<(), String> {
    let bad = |f: &str| {
        format!(
            "snapshot {} lists `{f}`, which is not a snapshot file name this store generates",
            s.id
        )
    };
    if s.shards.is_empty() {
        match SnapshotName::parse(&s.file) {
            Some(SnapshotName::Shard { .. }) | None => return Err(bad(&s.file)),
            Some(n) if n.id() != s.id => return Err(bad(&s.file)),
            Some(_) => {}
        }
    }
    for h in &s.shards {
        if SnapshotName::parse(&h.file)
            != Some(SnapshotName::Shard {
                id: s.id,
                rank: h.rank,
            })
        {
            return Err(bad(&h.file));
        }
    }
    Ok(())
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
    if version < MANIFEST_VERSION_SHARDED {
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
pub(crate) fn combined_hash(shards: &[ShardInfo]) -> u64 {
    let bytes: Vec<u8> = shards
        .iter()
        .flat_map(|h| h.state_hash.to_le_bytes())
        .collect();
    xxh3_64(&bytes)
}

/// Reads and checks the manifest: JSON, checksum, version, ids, file names and shard
/// listings. `None` if there is none.
pub(crate) fn read_manifest(
    backend: &dyn Backend,
) -> Result<Option<(ManifestBody, ObjectVersion)>, Error> {
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
    let file: ManifestFile = serde_json::from_slice(&text).map_err(|source| Error::Json {
        file: path.clone(),
        what: "manifest",
        source,
    })?;
    let body_json = serde_json::to_vec(&file.body).map_err(|source| Error::Json {
        file: path.clone(),
        what: "manifest serialisation",
        source,
    })?;
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
    if !(MANIFEST_VERSION..=MANIFEST_VERSION_RETAIN).contains(&file.body.version) {
        return Err(malformed(
            0,
            format!(
                "manifest version {} (this build reads {MANIFEST_VERSION} to {MANIFEST_VERSION_RETAIN})",
                file.body.version
            ),
        ));
    }
    if file.body.version < MANIFEST_VERSION_RETAIN
        && (!file.body.retired.is_empty() || !file.body.pinned.is_empty())
    {
        return Err(malformed(
            0,
            format!(
                "lists retired or pinned snapshots in a version {} manifest",
                file.body.version
            ),
        ));
    }
    let mut files = HashSet::new();
    let mut ids = HashSet::new();
    for s in file.body.snapshots.iter().chain(&file.body.retired) {
        if !ids.insert(s.id) {
            return Err(malformed(0, format!("snapshot {} is listed twice", s.id)));
        }
        if s.id >= file.body.next_id {
            return Err(malformed(
                0,
                format!(
                    "snapshot {} has an id at or above next_id {}",
                    s.id, file.body.next_id
                ),
            ));
        }
        if let Err(reason) = check_listing(s, file.body.version) {
            return Err(malformed(0, format!("snapshot {}: {reason}", s.id)));
        }
        check_names(s).map_err(|reason| malformed(0, reason))?;
        let listed = std::iter::once(s.file.as_str())
            .filter(|f| !f.is_empty())
            .chain(s.shards.iter().map(|h| h.file.as_str()));
        for f in listed {
            if !files.insert(f.to_string()) {
                return Err(malformed(0, format!("file `{f}` is listed twice")));
            }
        }
    }
    for p in &file.body.pinned {
        if !file.body.snapshots.iter().any(|s| s.id == *p) {
            return Err(malformed(
                0,
                format!("pins snapshot {p}, which is not listed"),
            ));
        }
    }
    Ok(Some((file.body, version)))
}

/// Snapshot files (`snap-*.bsnap`) in the store.
pub(crate) fn snapshot_files(backend: &dyn Backend) -> Result<Vec<String>, Error> {
    Ok(backend
        .list()?
        .into_iter()
        .filter(|n| n.starts_with("snap-") && n.ends_with(".bsnap"))
        .collect())
}

impl Store {
    /// Commits `body` as the manifest. Once the rename (local) or conditional PUT
    /// (remote) succeeded the change is committed: `self.manifest` follows the store even
    /// if the directory fsync then fails.
    pub(crate) fn write_manifest(&mut self, mut body: ManifestBody) -> Result<(), Error> {
        body.version = body.required_version();
        let json = |source| Error::Json {
            file: self.backend.path_of(MANIFEST_FILE),
            what: "manifest serialisation",
            source,
        };
        let body_json = serde_json::to_vec(&body).map_err(json)?;
        let file = ManifestFile {
            body: body.clone(),
            checksum: format!("{:016x}", xxh3_64(&body_json)),
        };
        let text = serde_json::to_vec_pretty(&file).map_err(json)?;
        let version = self
            .backend
            .commit_manifest(MANIFEST_FILE, &text, self.version.as_ref())?;
        self.manifest = body;
        self.version = Some(version);
        self.backend.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_parse() {
        let id = |n: &str| SnapshotName::parse(n);
        assert_eq!(
            id("snap-00000000000000000007.bsnap"),
            Some(SnapshotName::Plain { id: 7 })
        );
        assert_eq!(
            id("snap-00000000000000000007-0123456789abcdef.bsnap"),
            Some(SnapshotName::Unique {
                id: 7,
                nonce: 0x0123_4567_89ab_cdef
            })
        );
        assert_eq!(
            id("snap-00000000000000000007-r12.bsnap"),
            Some(SnapshotName::Rebased { id: 7 })
        );
        assert_eq!(
            id("snap-00000000000000000007-s00003.bsnap"),
            Some(SnapshotName::Shard { id: 7, rank: 3 })
        );
    }

    #[test]
    fn reservation_sees_every_id_a_file_carries() {
        for (name, id) in [
            ("snap-00000000000000000007.bsnap", Some(7)),
            (
                "snap-00000000000000000008-0123456789abcdef.bsnap.tmp",
                Some(8),
            ),
            ("snap-00000000000000000009-s00001.bsnap", Some(9)),
            ("snap-00000000000000000003-r12.bsnap", Some(3)),
            ("snap-7.bsnap", None),
            (MANIFEST_FILE, None),
        ] {
            assert_eq!(snapshot_name_id(name), id, "{name}");
        }
        assert_eq!(
            rebased_generation("snap-00000000000000000003-r12.bsnap"),
            Some(12)
        );
        assert_eq!(
            rebased_generation("snap-00000000000000000003-r12.bsnap.tmp"),
            Some(12)
        );
        assert_eq!(rebased_generation("snap-00000000000000000003.bsnap"), None);
    }

    #[test]
    fn other_names_are_refused() {
        for name in [
            MANIFEST_FILE,
            crate::LOCK_FILE,
            "",
            ".",
            "..",
            "../snap-00000000000000000007.bsnap",
            "snap-00000000000000000007.bsnap/",
            "snap-7.bsnap",
            "snap-00000000000000000007.bsnap.tmp",
            "snap-00000000000000000007-r.bsnap",
            "snap-00000000000000000007-s1.bsnap",
            "snap-00000000000000000007-0123456789ABCDEF.bsnap",
            "snap-0000000000000000000x.bsnap",
            "snap-99999999999999999999.bsnap",
        ] {
            assert_eq!(SnapshotName::parse(name), None, "{name}");
        }
    }

    #[test]
    fn listings_must_name_their_own_id() {
        let info = |file: &str| SnapshotInfo {
            id: 3,
            name: "x".into(),
            series: String::new(),
            file: file.into(),
            base: None,
            state_hash: 0,
            tensors: 0,
            raw_bytes: 0,
            stored_bytes: 0,
            shards: Vec::new(),
        };
        assert!(check_names(&info("snap-00000000000000000003.bsnap")).is_ok());
        assert!(check_names(&info("snap-00000000000000000004.bsnap")).is_err());
        assert!(check_names(&info("snap-00000000000000000003-s00000.bsnap")).is_err());
        assert!(check_names(&info(MANIFEST_FILE)).is_err());
    }
}
