//! Where a [`Store`](crate::Store) keeps its objects: a local directory ([`LocalDir`], the
//! default) or, with the `remote` feature, an object store such as S3 ([`ObjectBackend`]).
//!
//! A backend holds flat, named objects (`MANIFEST`, `snap-….bsnap`). Every backend keeps
//! the same commit rules:
//!
//! - a snapshot object becomes readable under its name only once it is complete (local:
//!   temporary file, fsync, rename, directory fsync; remote: one PUT or a completed
//!   multipart upload), and is never modified afterwards;
//! - the manifest is replaced in one step, last, and only if nobody replaced it since it
//!   was read ([`Backend::commit_manifest`]: the local backend's commit lock, held by
//!   the writer from the re-read to the replace, makes that true; remote backends use a
//!   conditional PUT on the manifest's e-tag).
//!
//! ```
//! use bitsnap_core::backend::{Backend, LocalDir};
//! use std::io::Write;
//! let dir = tempfile::tempdir().unwrap();
//! let local = LocalDir::new(dir.path());
//! let mut w = local.create("snap-x.bsnap").unwrap();
//! w.write_all(b"hello").unwrap();
//! assert_eq!(w.finish().unwrap(), 5);
//! assert_eq!(local.read("snap-x.bsnap", 1 << 20).unwrap().unwrap(), b"hello");
//! ```

use std::any::Any;
use std::fmt::Debug;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::Error;

mod local;
#[cfg(feature = "remote")]
mod object;

pub use local::{
    DEFAULT_LOCK_WAIT, LEASE_PREFIX, LEASE_SUFFIX, LOCK_FILE, LocalDir, PARALLEL_READ_BYTES,
    READ_PIECE_BYTES, WRITEBACK_AFTER_BYTES, WRITEBACK_INTERVAL, Writeback, read_exact_at_parallel,
};
#[cfg(feature = "remote")]
pub use object::{MULTIPART_PART_BYTES, ObjectBackend};

/// The version of an object that a conditional replace must find in place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectVersion {
    /// Entity tag, where the backend has them.
    pub e_tag: Option<String>,
    /// Object version id, where the backend has them.
    pub version: Option<String>,
}

/// An object being written; nothing is visible under its name until [`finish`](Self::finish).
/// Dropping it unfinished discards what was written.
pub trait ObjectWriter: Write + Send {
    /// Makes the object durable and visible under its name; returns its size in bytes.
    fn finish(self: Box<Self>) -> Result<u64, Error>;
}

/// A flat namespace of immutable objects and one replaceable manifest.
pub trait Backend: Send + Sync + Debug {
    /// The directory or URL of the store, as errors name it.
    fn location(&self) -> &Path;

    /// How errors name object `name`.
    fn path_of(&self, name: &str) -> PathBuf {
        self.location().join(name)
    }

    /// Whether [`Backend::lock`] excludes every other committer and writers hold
    /// [leases](Backend::lease): then files the manifest does not list, of no live
    /// writer, are debris a writer may remove. Remote backends say `false`: another
    /// process may be uploading them, and nothing tells.
    fn exclusive(&self) -> bool;

    /// Takes the store's commit lock, held until the returned guard is dropped (`None`
    /// where the backend has no lock: see [`Backend::exclusive`]). Writers hold it only
    /// around a commit (re-read the manifest, check, replace it) and an id reservation,
    /// so it waits for another writer's commit rather than failing; it fails (an I/O
    /// error of kind `WouldBlock` naming the lock file) only after a bounded wait.
    fn lock(&self) -> Result<Option<Box<dyn Any + Send + Sync>>, Error>;

    /// Announces a live writer whose objects carry `nonce` in their names, until the
    /// returned guard is dropped (or the process dies). `None` where the backend has no
    /// leases (then [`Backend::lease_alive`] says `true` for every nonce).
    fn lease(&self, _nonce: u64) -> Result<Option<Box<dyn Any + Send + Sync>>, Error> {
        Ok(None)
    }

    /// Whether the writer of `nonce` is alive (its lease is held). A lease that is not
    /// held any more is removed by the caller that found it so.
    fn lease_alive(&self, _nonce: u64) -> Result<bool, Error> {
        Ok(true)
    }

    /// Claims object name `name` for a write that will follow (local: creates its empty
    /// temporary file, so that writers choosing names under the commit lock see it).
    fn reserve(&self, _name: &str) -> Result<(), Error> {
        Ok(())
    }

    /// Removes the claim [`Backend::reserve`] made on `name`, if the write did not
    /// consume it (a no-op where it did, or where nothing was claimed).
    fn unreserve(&self, _name: &str) -> Result<(), Error> {
        Ok(())
    }

    /// Names of the objects in the store.
    fn list(&self) -> Result<Vec<String>, Error>;

    /// Size of object `name`, `None` if it does not exist.
    fn size(&self, name: &str) -> Result<Option<u64>, Error>;

    /// The whole object `name`, `None` if it does not exist; objects over `limit` bytes
    /// fail with [`Error::Limit`] before anything is allocated for them.
    fn read(&self, name: &str, limit: u64) -> Result<Option<Vec<u8>>, Error>;

    /// Bytes `range` of object `name`.
    fn read_range(&self, name: &str, range: Range<u64>) -> Result<Vec<u8>, Error>;

    /// Starts writing object `name` (which should not exist yet).
    fn create(&self, name: &str) -> Result<Box<dyn ObjectWriter>, Error>;

    /// Removes object `name`.
    fn remove(&self, name: &str) -> Result<(), Error>;

    /// Makes earlier removals and renames durable (local: fsync of the directory).
    fn sync(&self) -> Result<(), Error>;

    /// Reads object `name` (the manifest) and its version; `None` if it does not exist.
    fn read_versioned(
        &self,
        name: &str,
        limit: u64,
    ) -> Result<Option<(Vec<u8>, ObjectVersion)>, Error>;

    /// Replaces object `name` (the manifest) with `bytes` in one step, if its version is
    /// still `expected` (`None`: if it still does not exist). Fails with
    /// [`Error::Conflict`] when another writer replaced it first. Once this returns `Ok`
    /// the change is committed; [`Backend::sync`] then makes it durable.
    fn commit_manifest(
        &self,
        name: &str,
        bytes: &[u8],
        expected: Option<&ObjectVersion>,
    ) -> Result<ObjectVersion, Error>;
}

/// Opens the backend a store location names: `s3://bucket/prefix` or `memory://` (with
/// the `remote` feature; credentials and endpoint from the usual `AWS_*` environment
/// variables), otherwise a local directory.
pub fn from_location(location: &str) -> Result<Arc<dyn Backend>, Error> {
    if is_url(location) {
        #[cfg(feature = "remote")]
        {
            return Ok(Arc::new(ObjectBackend::from_url(location, &[])?));
        }
        #[cfg(not(feature = "remote"))]
        {
            return Err(Error::InvalidLocation {
                location: location.to_string(),
                reason: "remote stores need bitsnap-core's `remote` feature".into(),
            });
        }
    }
    Ok(Arc::new(LocalDir::new(location)))
}

/// Whether `location` is a URL (`scheme://…`) rather than a path.
pub fn is_url(location: &str) -> bool {
    location.split_once("://").is_some_and(|(scheme, _)| {
        !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths() {
        assert!(is_url("s3://bucket/prefix"));
        assert!(is_url("memory://"));
        assert!(!is_url("/tmp/store"));
        assert!(!is_url("relative/dir"));
        assert!(!is_url("://x"));
    }
}
