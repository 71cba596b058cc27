//! Committing (FORMAT.md 5): the one path by which every change reaches the manifest,
//! for local and remote stores alike, and what makes several writers safe on one store.
//!
//! - **The commit lock covers the commit only.** [`Store::commit_with`] takes the
//!   backend's commit lock (local: `flock` on `LOCK`; remote: none), re-reads the
//!   manifest, lets the change check itself against it and build the next one, replaces
//!   the manifest and releases the lock. Encoding and writing snapshot files happen
//!   outside it, so two writers save at once and readers never wait. On a remote store
//!   a replace that loses the race to another writer (conditional PUT) re-reads and
//!   checks again, up to [`COMMIT_ATTEMPTS`] times.
//! - **Ids are reserved.** A local save takes its id under the lock, above the
//!   manifest's `next_id` and every id a file in the directory carries, and claims its
//!   file name (an empty temporary file) before releasing it: two writers get two ids
//!   and both commit, in either order (the manifest lists snapshots in commit order).
//!   Remote stores have no lock: a save takes `next_id`, and of two writers that took
//!   the same, the second to commit gets [`Error::Conflict`].
//! - **A delta commits only onto a base that still exists.** A save encodes against a
//!   base chosen before its commit. If another writer deleted that base meanwhile, the
//!   commit still succeeds while the base is listed *or retired* (its file is kept, and
//!   the new delta keeps it so); if the base left the manifest altogether (its file is
//!   gone or about to be), the commit fails with [`Error::Conflict`] naming the base,
//!   removes what the save wrote and commits nothing: the next save starts from the
//!   store's latest snapshot.
//! - **Writers hold leases.** A local writer holds a lease (`writer-<nonce>.lease`,
//!   locked) from its first change until it is dropped or dies, and names every file it
//!   writes `snap-<id>-<nonce>.bsnap`. When a writer first changes a store it removes,
//!   under the commit lock, the debris of dead writers: unlisted files of a nonce whose
//!   lease nobody holds, unlisted files without a nonce (only ever written under the
//!   lock), temporary manifests and dead leases. A live writer's files in progress are
//!   never touched.

use std::any::Any;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use super::manifest::{
    MANIFEST_FILE, ManifestBody, SnapshotName, pending_shard, rebased_generation, snapshot_name_id,
};
use super::save::unique_token;
use super::{SnapshotInfo, Store};
use crate::Error;
use crate::backend::{Backend, LEASE_PREFIX, LEASE_SUFFIX};

/// Attempts at committing a change while other writers keep replacing a remote manifest.
pub(crate) const COMMIT_ATTEMPTS: u32 = 8;

/// What a `Store` holds as a writer.
#[derive(Default)]
pub(crate) struct Writer {
    /// The nonce its files carry (0 until it first writes).
    pub(crate) nonce: u64,
    /// Its lease, while it is a writer of a store with leases.
    lease: Option<Box<dyn Any + Send + Sync>>,
    /// Whether it removed dead writers' debris yet.
    cleaned: bool,
}

/// A snapshot id and file name claimed by one save ([`Store::reserve_snapshot`]). Dropped,
/// it releases the claim on the name if the save did not write it.
pub(crate) struct Reservation {
    backend: Arc<dyn Backend>,
    /// The snapshot id.
    pub(crate) id: u64,
    /// The file name.
    pub(crate) file: String,
    /// Whether the id was reserved under the commit lock (local stores): then it may
    /// commit below `next_id`, which other writers' commits raised meanwhile.
    pub(crate) reserved: bool,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Err(e) = self.backend.unreserve(&self.file) {
            tracing::warn!(error = %e, "could not release a claimed file name");
        }
    }
}

impl Store {
    /// Becomes a writer: re-reads the manifest and, the first time, takes a lease (stores
    /// with leases) and removes dead writers' debris under the commit lock.
    pub(crate) fn become_writer(&mut self) -> Result<(), Error> {
        if self.backend.exclusive() && !self.writer.cleaned {
            if self.writer.nonce == 0 {
                self.writer.nonce = unique_token().max(1);
            }
            if self.writer.lease.is_none() {
                self.writer.lease = self.backend.lease(self.writer.nonce)?;
            }
            let backend = self.backend.clone();
            let _lock = backend.lock()?;
            self.refresh()?;
            for name in self.debris_names()? {
                tracing::info!(file = %self.backend.path_of(&name).display(),
                    "removing a file left by an interrupted writer");
                remove_if_there(self.backend.as_ref(), &name)?;
            }
            self.backend.sync()?;
            self.writer.cleaned = true;
            return Ok(());
        }
        self.refresh()
    }

    /// The one commit path: under the commit lock, re-reads the manifest and calls
    /// `change` with the store as it is now; `change` checks itself against it (an
    /// error commits nothing) and returns the next manifest (`None`: nothing to write)
    /// and its result. On a remote store whose manifest another writer replaced in
    /// between, re-reads and calls `change` again.
    pub(crate) fn commit_with<T>(
        &mut self,
        mut change: impl FnMut(&Store) -> Result<(Option<ManifestBody>, T), Error>,
    ) -> Result<T, Error> {
        let backend = self.backend.clone();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let lock = backend.lock()?;
            self.refresh()?;
            let (next, out) = change(self)?;
            let Some(next) = next else {
                return Ok(out);
            };
            match self.write_manifest(next) {
                Ok(()) => {
                    drop(lock);
                    return Ok(out);
                }
                Err(Error::Conflict { .. })
                    if !backend.exclusive() && attempt < COMMIT_ATTEMPTS =>
                {
                    tracing::info!(attempt, "manifest changed underneath; retrying the commit");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reserves the id and file name of a new snapshot: local stores, under the commit
    /// lock, the lowest id above `next_id` and above every id a file in the directory
    /// carries, named with this writer's nonce and claimed; remote stores `next_id`,
    /// with a random suffix.
    pub(crate) fn reserve_snapshot(&mut self) -> Result<Reservation, Error> {
        let backend = self.backend.clone();
        if !backend.exclusive() {
            let id = self.manifest.next_id;
            return Ok(Reservation {
                file: format!("snap-{id:020}-{:016x}.bsnap", unique_token()),
                backend,
                id,
                reserved: false,
            });
        }
        self.become_writer()?;
        let _lock = backend.lock()?;
        self.refresh()?;
        let id = self.next_free_id()?;
        let file = format!("snap-{id:020}-{:016x}.bsnap", self.writer.nonce);
        backend.reserve(&file)?;
        Ok(Reservation {
            backend,
            id,
            file,
            reserved: true,
        })
    }

    /// The lowest id at or above `next_id` above every id and rebased generation a file
    /// in the store carries (local stores; call under the commit lock). Remote stores:
    /// `next_id`. Shard files are not counted: their ids are the ranks' choice, and a
    /// reservation above them would raise `next_id` past a sharded snapshot still being
    /// written (a save that takes the same id as one is refused at the later commit).
    pub(crate) fn next_free_id(&self) -> Result<u64, Error> {
        let mut id = self.manifest.next_id;
        if self.backend.exclusive() {
            for name in self.backend.list()? {
                if pending_shard(&name, 0) {
                    continue;
                }
                for n in [snapshot_name_id(&name), rebased_generation(&name)]
                    .into_iter()
                    .flatten()
                {
                    id = id.max(n.saturating_add(1));
                }
            }
        }
        Ok(id)
    }

    /// Commits `info` as a new snapshot: appends it to the manifest as it is at the
    /// commit. Fails with [`Error::Conflict`], removing `files` (what the save wrote) and
    /// committing nothing, when its id was taken by another writer (remote stores, or an
    /// id not `reserved`) or one of its bases left the manifest (deleted by another
    /// writer and not kept retired).
    pub(crate) fn commit_new(
        &mut self,
        info: SnapshotInfo,
        files: &[String],
        reserved: bool,
    ) -> Result<(), Error> {
        let manifest = self.backend.path_of(MANIFEST_FILE);
        let result = self.commit_with(|store| {
            let m = &store.manifest;
            let taken = store.chain_info(info.id).is_some();
            if taken || (!reserved && info.id < m.next_id) {
                return Err(Error::Conflict {
                    file: manifest.clone(),
                    reason: format!(
                        "snapshot id {} was taken by another writer (the store's next id is {})",
                        info.id, m.next_id
                    ),
                });
            }
            let bases = info
                .base
                .into_iter()
                .chain(info.shards.iter().filter_map(|s| s.base));
            for b in bases {
                if store.chain_info(b).is_none() {
                    return Err(Error::Conflict {
                        file: manifest.clone(),
                        reason: format!(
                            "base snapshot {b} was deleted by another writer while snapshot {} \
                             was saved as a delta on it; nothing was committed (the next save \
                             starts from the store's latest snapshot)",
                            info.id
                        ),
                    });
                }
            }
            let mut next = m.clone();
            next.next_id = next.next_id.max(info.id.saturating_add(1));
            next.snapshots.push(info.clone());
            Ok((Some(next), ()))
        });
        if let Err(Error::Conflict { .. }) = &result {
            for f in files {
                let _ = self.backend.remove(f);
            }
        }
        result
    }

    /// Removes the files of snapshots a commit dropped (a crash before leaves them as
    /// debris for the next writer; one already gone is not an error).
    pub(crate) fn remove_files(&self, dropped: &[SnapshotInfo]) -> Result<(), Error> {
        for s in dropped {
            let files = std::iter::once(s.file.as_str())
                .filter(|f| !f.is_empty())
                .chain(s.shards.iter().map(|h| h.file.as_str()));
            for f in files {
                tracing::debug!(snapshot = s.id, file = %f, "removing a deleted snapshot");
                remove_if_there(self.backend.as_ref(), f)?;
            }
        }
        if !dropped.is_empty() {
            self.backend.sync()?;
        }
        Ok(())
    }

    /// Files in the store left by interrupted writers, as paths.
    pub(crate) fn orphans(&self) -> Result<Vec<PathBuf>, Error> {
        Ok(self
            .debris_names()?
            .iter()
            .map(|n| self.backend.path_of(n))
            .collect())
    }

    /// Names of the objects left by interrupted writers: snapshot files and temporaries
    /// the manifest does not list, except shard files of ids not committed yet (their
    /// ranks may still be at work, [`crate::shard`]) and, on stores with leases, files of
    /// live writers (their nonce's lease is held); temporary manifests; dead leases.
    fn debris_names(&self) -> Result<Vec<String>, Error> {
        let listed: HashSet<&str> = self
            .manifest
            .snapshots
            .iter()
            .chain(&self.manifest.retired)
            .flat_map(|s| {
                std::iter::once(s.file.as_str()).chain(s.shards.iter().map(|h| h.file.as_str()))
            })
            .collect();
        let leases = self.backend.exclusive();
        let mut alive = std::collections::HashMap::new();
        let mut is_alive = |nonce: u64| -> Result<bool, Error> {
            if nonce == self.writer.nonce {
                return Ok(true);
            }
            if let Some(a) = alive.get(&nonce) {
                return Ok(*a);
            }
            let a = self.backend.lease_alive(nonce)?;
            alive.insert(nonce, a);
            Ok(a)
        };
        let mut out = Vec::new();
        for name in self.backend.list()? {
            if name.starts_with("MANIFEST.") && name.ends_with(".tmp") {
                out.push(name);
                continue;
            }
            if leases && let Some(nonce) = lease_nonce(&name) {
                if !is_alive(nonce)? {
                    out.push(name);
                }
                continue;
            }
            let ours =
                name.starts_with("snap-") && (name.ends_with(".bsnap") || name.ends_with(".tmp"));
            if !ours
                || listed.contains(name.as_str())
                || pending_shard(&name, self.manifest.next_id)
            {
                continue;
            }
            let stem = name.strip_suffix(".tmp").unwrap_or(&name);
            if leases
                && let Some(SnapshotName::Unique { nonce, .. }) = SnapshotName::parse(stem)
                && is_alive(nonce)?
            {
                continue;
            }
            out.push(name);
        }
        out.sort();
        Ok(out)
    }
}

/// The nonce of lease file `writer-<16 hex>.lease`.
fn lease_nonce(name: &str) -> Option<u64> {
    let hex = name
        .strip_prefix(LEASE_PREFIX)?
        .strip_suffix(LEASE_SUFFIX)?;
    (hex.len() == 16 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

/// Removes object `name`; one that is not there any more is not an error.
fn remove_if_there(backend: &dyn Backend, name: &str) -> Result<(), Error> {
    match backend.remove(name) {
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names() {
        assert_eq!(lease_nonce("writer-00000000000000ff.lease"), Some(255));
        assert_eq!(lease_nonce("writer-00000000000000ff.lease.tmp"), None);
        assert_eq!(lease_nonce("writer-00000000000000FF.lease"), None);
        assert_eq!(lease_nonce("writer-ff.lease"), None);
        assert_eq!(lease_nonce(crate::LOCK_FILE), None);
    }
}
