//! The snapshot chain a device restore applies: the one place where the GPU loader reads
//! snapshot files and checks that they fit together.
//!
//! [`Chain::open`] opens every snapshot from the full one at the root to the target and
//! checks each link (a delta names its predecessor by id and state hash); while the
//! payloads are applied, [`fits`] checks that each delta's base tensor has
//! the dtype and shape the delta was encoded against, as the CPU decoder does. Errors
//! name the real snapshot file. Everything else of the loader only uploads and runs
//! kernels, so switching to a chain reader of bitsnap-core is a change of this file.

use std::collections::HashMap;

use bitsnap_core::format::{Entry, Header, SnapshotFile};
use bitsnap_core::{DType, Store};
use rayon::prelude::*;

use crate::Error;

/// The snapshots of one chain, root first, opened and checked link by link.
pub(super) struct Chain {
    files: Vec<SnapshotFile>,
}

impl Chain {
    /// Opens the chain of snapshot `id`. `None` when a snapshot of the chain is sharded:
    /// this reader only knows single-file snapshots, and the loader then restores through
    /// the CPU decoder ([`Store::load`]), which reads shards.
    pub(super) fn open(store: &Store, id: u64) -> Result<Option<Chain>, Error> {
        if is_sharded(store, id) {
            return Ok(None);
        }
        let ids = store.chain(id)?;
        if ids.iter().any(|&sid| is_sharded(store, sid)) {
            return Ok(None);
        }
        let files = ids
            .par_iter()
            .map(|&sid| store.open_file(sid))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(root) = files.first()
            && let Some(b) = root.header.base
        {
            return Err(bitsnap_core::Error::MissingBase {
                file: root.path.clone(),
                base_id: b.id,
                reason: "was not provided".into(),
            }
            .into());
        }
        for pair in files.windows(2) {
            if let [prev, next] = pair {
                check_link(prev, next)?;
            }
        }
        Ok(Some(Chain { files }))
    }

    /// The snapshots, root first.
    pub(super) fn files(&self) -> &[SnapshotFile] {
        &self.files
    }

    /// The snapshot restored (the chain's last), or `None` for an empty chain.
    pub(super) fn target(&self) -> Option<&SnapshotFile> {
        self.files.last()
    }

    /// For each tensor, the index of the snapshot holding its last base-free payload
    /// (dense or codes): what comes before is overwritten, so it need not be read.
    pub(super) fn starts(&self) -> HashMap<&str, usize> {
        let mut start = HashMap::new();
        for (k, f) in self.files.iter().enumerate() {
            for e in &f.header.entries {
                if !e.codec.needs_base() {
                    start.insert(e.name.as_str(), k);
                }
            }
        }
        start
    }
}

/// Whether snapshot `id` of `store` is sharded (its chains are per rank).
pub(super) fn is_sharded(store: &Store, id: u64) -> bool {
    store.get(id).is_some_and(|s| !s.shards.is_empty())
}

/// The delta snapshot `next` must have been encoded against `prev` (same id and state
/// hash). A snapshot without a base needs nothing from `prev`.
fn check_link(prev: &SnapshotFile, next: &SnapshotFile) -> Result<(), Error> {
    let (p, n) = (&prev.header, &next.header);
    match n.base {
        Some(b) if b.id == p.id && b.state_hash == p.state_hash() => Ok(()),
        Some(b) => Err(bitsnap_core::Error::MissingBase {
            file: next.path.clone(),
            base_id: b.id,
            reason: format!(
                "does not match: found snapshot {} with state hash {:016x}, expected {:016x}",
                p.id,
                p.state_hash(),
                b.state_hash
            ),
        }
        .into()),
        None => Ok(()),
    }
}

/// Whether a base tensor of `dtype` and `shape` is what `entry`'s delta payload was
/// encoded against (the same word count is not enough).
pub(super) fn fits(entry: &Entry, dtype: DType, shape: &[u64]) -> bool {
    dtype == entry.dtype && shape == entry.shape.as_slice()
}

/// The error for a delta `entry` of `file` whose base tensor is missing, or is `found`
/// (dtype and shape) where [`fits`] says it does not fit.
pub(super) fn missing_base(
    file: &SnapshotFile,
    entry: &Entry,
    found: Option<(DType, &[u64])>,
) -> Error {
    let found = found
        .map(|(dtype, shape)| format!(" (the base has it as {dtype} {shape:?})"))
        .unwrap_or_default();
    bitsnap_core::Error::MissingBase {
        file: file.path.clone(),
        base_id: base_id(&file.header),
        reason: format!(
            "has no tensor `{}` of dtype {} and shape {:?} to decode against{found}",
            entry.name, entry.dtype, entry.shape
        ),
    }
    .into()
}

fn base_id(header: &Header) -> u64 {
    header.base.map_or(0, |b| b.id)
}
