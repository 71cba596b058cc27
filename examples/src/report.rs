//! What a bitsnap store holds, measured: file sizes from the file system, per-tensor
//! decisions from the snapshot headers.

use std::collections::BTreeMap;
use std::path::Path;

use bitsnap_core::{Role, Store};
use serde::{Deserialize, Serialize};

use crate::Error;

/// One snapshot file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRow {
    /// Snapshot name (`step-120`).
    pub name: String,
    /// Its series (`steps`; `model`, `optim`, `scheduler` for `BitSnapCheckpointer`).
    pub series: String,
    /// Training step, parsed from the name.
    pub step: u64,
    /// Decoded size of its tensors.
    pub raw_bytes: u64,
    /// Size of its file on disk (`stat`).
    pub file_bytes: u64,
    /// Whether it is a full snapshot (no base).
    pub full: bool,
    /// Tensors per codec.
    pub codecs: BTreeMap<String, u64>,
}

impl SnapshotRow {
    /// `raw_bytes / file_bytes`.
    pub fn ratio(&self) -> f64 {
        bitsnap_core::fmt::ratio(self.raw_bytes, self.file_bytes)
    }
}

/// Raw and stored bytes of one group of tensors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Bytes {
    /// Tensors counted.
    pub tensors: u64,
    /// Decoded bytes.
    pub raw: u64,
    /// Payload bytes in the files.
    pub stored: u64,
}

impl Bytes {
    /// `raw / stored` ([`bitsnap_core::fmt::ratio`]: infinite when nothing was stored).
    pub fn ratio(&self) -> f64 {
        bitsnap_core::fmt::ratio(self.raw, self.stored)
    }

    fn add(&mut self, raw: u64, stored: u64) {
        self.tensors += 1;
        self.raw += raw;
        self.stored += stored;
    }
}

/// A whole store, measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreReport {
    /// Every snapshot, oldest first.
    pub snapshots: Vec<SnapshotRow>,
    /// Sum of the snapshots' decoded sizes.
    pub raw_bytes: u64,
    /// Sum of the snapshot files' sizes on disk.
    pub disk_bytes: u64,
    /// Model weights (payload bytes).
    pub weights: Bytes,
    /// Optimizer moments (payload bytes).
    pub optimizer: Bytes,
    /// Everything else (payload bytes).
    pub other: Bytes,
    /// Per codec: tensors and payload bytes.
    pub codecs: BTreeMap<String, Bytes>,
}

impl StoreReport {
    /// `raw_bytes / disk_bytes`.
    pub fn ratio(&self) -> f64 {
        bitsnap_core::fmt::ratio(self.raw_bytes, self.disk_bytes)
    }

    /// Reads every snapshot header of the store in `dir` and stats its files. Takes the
    /// store's lock: no saver may hold it.
    pub fn read(dir: &Path) -> Result<StoreReport, Error> {
        let store = Store::open(dir)?;
        let mut report = StoreReport::default();
        for info in store.snapshots() {
            let path = dir.join(&info.file);
            let file_bytes = std::fs::metadata(&path).map_err(Error::io(&path))?.len();
            let header = store.header(info.id)?;
            let mut codecs = BTreeMap::new();
            for e in &header.entries {
                let raw = e.numel() * e.dtype.size() as u64;
                let codec = e.codec.to_string();
                *codecs.entry(codec.clone()).or_insert(0) += 1;
                report.codecs.entry(codec).or_default().add(raw, e.len);
                match e.role {
                    Role::Weight => report.weights.add(raw, e.len),
                    Role::OptimizerMoment(_) => report.optimizer.add(raw, e.len),
                    _ => report.other.add(raw, e.len),
                }
            }
            report.raw_bytes += info.raw_bytes;
            report.disk_bytes += file_bytes;
            report.snapshots.push(SnapshotRow {
                step: bitsnap_burn::snapshot_step(&info.name).unwrap_or(0),
                name: info.name.clone(),
                series: info.series.clone(),
                raw_bytes: info.raw_bytes,
                file_bytes,
                full: info.base.is_none(),
                codecs,
            });
        }
        Ok(report)
    }
}

/// Bytes in decimal units (`100.62 MB`), as the `bitsnap` command line writes them.
pub fn human(bytes: u64) -> String {
    bitsnap_core::fmt::bytes(bytes)
}
