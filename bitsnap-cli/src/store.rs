//! Store, snapshot and file arguments: opening a directory or `s3://` URL, resolving
//! `SNAPSHOT`, checking input files.

use std::path::{Path, PathBuf};

use bitsnap_core::safetensors::{self, Index};
use bitsnap_core::{SnapshotInfo, Store};

use crate::error::CliError;

/// A snapshot chosen by a `SNAPSHOT` argument, with its position in the store.
pub struct Chosen<'a> {
    /// Its position in the store's snapshots, from 0.
    pub index: usize,
    /// The snapshot.
    pub info: &'a SnapshotInfo,
}

/// Resolves a `SNAPSHOT` argument: a decimal index into the store's snapshots (from 0,
/// oldest first), else the name of a snapshot (the latest of that name).
pub fn choose_snapshot<'a>(store: &'a Store, arg: &str) -> Result<Chosen<'a>, CliError> {
    let snaps = store.snapshots();
    let unknown = |what: String| {
        CliError::Core(bitsnap_core::Error::UnknownSnapshot {
            store: store.dir().to_path_buf(),
            snapshot: what,
        })
    };
    if !arg.is_empty() && arg.bytes().all(|b| b.is_ascii_digit()) {
        let index = arg.parse::<usize>().unwrap_or(usize::MAX);
        return match snaps.get(index) {
            Some(info) => Ok(Chosen { index, info }),
            None if snaps.is_empty() => Err(unknown(format!(
                "at index {arg} (the store has no snapshots)"
            ))),
            None => Err(unknown(format!(
                "at index {arg} (the store has {} snapshots: indices 0 to {})",
                snaps.len(),
                snaps.len() - 1
            ))),
        };
    }
    let info = store
        .find_by_name(arg)
        .ok_or_else(|| unknown(format!("named `{arg}`")))?;
    let index = snaps
        .iter()
        .position(|s| s.id == info.id)
        .unwrap_or_default();
    Ok(Chosen { index, info })
}

/// Position of the snapshot with id `id` in the store, if it is there.
pub fn index_of(store: &Store, id: u64) -> Option<usize> {
    store.snapshots().iter().position(|s| s.id == id)
}

/// Opens an existing store: a directory, or an `s3://bucket/prefix` URL.
pub fn open_store(dir: &Path) -> Result<Store, CliError> {
    match store_url(dir) {
        Some(url) => Ok(Store::open_url(url)?),
        None => Ok(Store::open(dir)?),
    }
}

/// The URL a store argument names, if it is one (`s3://bucket/prefix`) rather than a
/// directory.
pub fn store_url(arg: &Path) -> Option<&str> {
    arg.to_str().filter(|s| bitsnap_core::backend::is_url(s))
}

/// The snapshot name of a file: its stem.
pub fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The checked headers of `files`, in order: a bad file stops the command before
/// anything is read or written.
pub fn read_indexes(files: &[PathBuf]) -> Result<Vec<Index>, CliError> {
    Ok(files
        .iter()
        .map(|f| safetensors::read_index(f))
        .collect::<Result<_, _>>()?)
}
