//! What the keeper holds: the latest snapshots of each series, decoded, in memory.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use xxhash_rust::xxh3::Xxh3;

use super::wire::{SnapshotHead, TensorDesc};
use crate::{SnapshotInfo, Tensor};

/// One snapshot handed to the keeper.
#[derive(Debug)]
pub(crate) struct Held {
    /// Keeper-wide order of the put (1 for the first put this keeper received).
    pub(crate) seq: u64,
    pub(crate) series: String,
    pub(crate) name: String,
    pub(crate) metadata: Vec<(String, String)>,
    pub(crate) tensors: Vec<Tensor>,
    /// [`Header::state_hash`](crate::Header::state_hash) of what it holds (from the
    /// per-tensor hashes the put carried and the keeper checked).
    pub(crate) state_hash: u64,
    /// xxh3-64 of each tensor's bytes, in order (checked when the put arrived).
    pub(crate) hashes: Vec<u64>,
    /// The store's id for it once persisted; 0 until then.
    pub(crate) store_id: AtomicU64,
}

impl Held {
    pub(crate) fn new(
        seq: u64,
        series: String,
        name: String,
        metadata: Vec<(String, String)>,
        tensors: Vec<Tensor>,
        hashes: Vec<u64>,
    ) -> Held {
        // The same hash the store records for the snapshot (`Header::state_hash`).
        let mut h = Xxh3::new();
        for (t, raw) in tensors.iter().zip(&hashes) {
            h.update(&(t.name.len() as u64).to_le_bytes());
            h.update(t.name.as_bytes());
            h.update(&[t.dtype.tag()]);
            h.update(&(t.shape.len() as u64).to_le_bytes());
            t.shape.iter().for_each(|d| h.update(&d.to_le_bytes()));
            h.update(&raw.to_le_bytes());
        }
        Held {
            seq,
            series,
            name,
            metadata,
            tensors,
            state_hash: h.digest(),
            hashes,
            store_id: AtomicU64::new(0),
        }
    }

    /// How a `snapshot` answer describes it (no hashing: the put's hashes are kept).
    pub(crate) fn head(&self) -> SnapshotHead {
        SnapshotHead {
            series: self.series.clone(),
            name: self.name.clone(),
            metadata: self.metadata.clone(),
            tensors: self
                .tensors
                .iter()
                .zip(&self.hashes)
                .map(|(t, &hash)| TensorDesc {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    role: t.role,
                    shape: t.shape.clone(),
                    len: t.data.len() as u64,
                    hash,
                })
                .collect(),
        }
    }

    /// Decoded bytes of its tensors.
    pub(crate) fn bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.data.len() as u64).sum()
    }

    /// What a `latest` answer says of it: the store's id and file once persisted (0 and
    /// empty before), no base, and no stored size.
    pub(crate) fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            id: self.store_id.load(Ordering::Acquire),
            name: self.name.clone(),
            series: self.series.clone(),
            file: String::new(),
            base: None,
            state_hash: self.state_hash,
            tensors: self.tensors.len() as u64,
            raw_bytes: self.bytes(),
            stored_bytes: 0,
            shards: Vec::new(),
        }
    }
}

/// The latest `keep` snapshots of every series.
#[derive(Debug)]
pub(crate) struct Memory {
    keep: usize,
    series: HashMap<String, VecDeque<Arc<Held>>>,
    /// Puts per series (decides which are persisted: every N-th).
    puts: HashMap<String, u64>,
    next_seq: u64,
}

impl Memory {
    pub(crate) fn new(keep: usize) -> Memory {
        Memory {
            keep: keep.max(1),
            series: HashMap::new(),
            puts: HashMap::new(),
            next_seq: 1,
        }
    }

    /// The next put's sequence number (taken).
    pub(crate) fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Holds `held` as the latest of its series, dropping the oldest beyond `keep`;
    /// returns how many puts its series has had (this one included).
    pub(crate) fn hold(&mut self, held: Arc<Held>) -> u64 {
        let count = self.puts.entry(held.series.clone()).or_insert(0);
        *count += 1;
        let count = *count;
        let q = self.series.entry(held.series.clone()).or_default();
        q.push_back(held);
        while q.len() > self.keep {
            q.pop_front();
        }
        count
    }

    /// The latest snapshot of `series`.
    pub(crate) fn latest(&self, series: &str) -> Option<Arc<Held>> {
        self.series.get(series).and_then(|q| q.back().cloned())
    }

    /// The latest snapshot of every series.
    pub(crate) fn latest_of_all(&self) -> Vec<Arc<Held>> {
        self.series
            .values()
            .filter_map(|q| q.back().cloned())
            .collect()
    }

    /// Snapshots and decoded bytes held.
    pub(crate) fn usage(&self) -> (usize, u64) {
        self.series
            .values()
            .flatten()
            .fold((0, 0), |(n, b), h| (n + 1, b + h.bytes()))
    }
}
