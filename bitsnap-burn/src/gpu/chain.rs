//! The snapshot chains a device restore applies, as bitsnap-core's checked chain reader
//! ([`Store::restore_chains_needed`]: headers and the payloads a restore needs) gives them.
//!
//! Core opens every snapshot from the full one at the root to the target and checks each
//! link before anything is decoded: the base id and state hash of every delta, that every
//! delta-coded tensor has a base tensor of the same name, dtype and shape, the attempt
//! nonce of shards and the decode budget; its errors name the real snapshot file. A
//! sharded snapshot is one chain per rank. While the payloads are applied, [`fits`] checks
//! the tensors resident on the device once more against what each delta was encoded
//! against. Everything else of the loader only uploads and runs kernels.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bitsnap_core::codec::DeviceForm;
use bitsnap_core::format::{Entry, Header, SnapshotFile};
use bitsnap_core::{DType, RestoreChain, Store};

use crate::Error;

/// The snapshots of one chain (one rank's, for a sharded snapshot), root first, opened
/// and checked by core.
pub(super) struct Chain {
    inner: RestoreChain,
}

impl Chain {
    /// Opens the chains of snapshot `id`: one for an unsharded snapshot, one per rank
    /// (in rank order) for a sharded one; of each file only the header and the payloads
    /// the restore needs are read.
    pub(super) fn open(store: &Store, id: u64) -> Result<Vec<Chain>, Error> {
        Ok(store
            .restore_chains_needed(id)?
            .into_iter()
            .map(|inner| Chain { inner })
            .collect())
    }

    /// The snapshots, root first.
    pub(super) fn files(&self) -> &[SnapshotFile] {
        self.inner.files()
    }

    /// Decodes the chain on the CPU (payloads without a device form).
    pub(super) fn decode(&self) -> Result<Vec<bitsnap_core::Tensor>, Error> {
        Ok(self.inner.decode()?)
    }

    /// The snapshot restored (the chain's last).
    pub(super) fn target(&self) -> &SnapshotFile {
        self.inner.target()
    }

    /// Whether a payload of the chain has no device form (it then decodes on the host).
    pub(super) fn has_host_only_payloads(&self) -> bool {
        self.files()
            .iter()
            .flat_map(|f| &f.header.entries)
            .any(|e| !e.codec.has_device_form())
    }

    /// For each snapshot of the chain, the tensors whose payloads the restore needs
    /// (the only ones read: [`RestoreChain::needed`]).
    pub(super) fn needed(&self) -> Vec<HashSet<String>> {
        self.inner.needed()
    }

    /// Bytes read from the files: headers, trailers and the needed payloads.
    pub(super) fn read_bytes(&self, needed: &[HashSet<String>]) -> u64 {
        self.files()
            .iter()
            .zip(needed)
            .map(|(f, keep)| {
                let (all, kept) = f.header.entries.iter().fold((0, 0), |(a, k), e| {
                    (
                        a + e.len,
                        k + if keep.contains(&e.name) { e.len } else { 0 },
                    )
                });
                f.file_len() - all + kept
            })
            .sum()
    }
}

/// Verifies `entry`'s payload checksum and entropy-decodes it into its device form;
/// returns the form and the time each of the two took.
pub(super) fn decode_form(
    file: &SnapshotFile,
    entry: &Entry,
) -> Result<(DeviceForm, Duration, Duration), Error> {
    let t0 = Instant::now();
    let payload = file.payload(entry)?;
    let checksum = t0.elapsed();
    let numel = usize::try_from(entry.numel()).map_err(|_| bitsnap_core::Error::Limit {
        file: file.path.clone(),
        what: "tensor elements",
        value: entry.numel(),
        limit: usize::MAX as u64,
    })?;
    let t1 = Instant::now();
    let form = bitsnap_core::codec::decode_for_device(entry.codec, payload, entry.dtype, numel)
        .map_err(|e| match e.alloc {
            Some(bytes) => bitsnap_core::Error::Alloc {
                what: format!("tensor `{}` of {}", entry.name, file.path.display()),
                bytes,
            },
            None => bitsnap_core::Error::Malformed {
                file: file.path.clone(),
                tensor: Some(entry.name.clone()),
                what: "payload",
                offset: entry.offset + e.offset as u64,
                reason: e.reason,
            },
        })?;
    Ok((form, checksum, t1.elapsed()))
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
