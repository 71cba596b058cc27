//! What the store's ratio is made of: payload bytes per phase (pretrain, fine-tune), per
//! save kind (full, delta) and per part of the state (trained and frozen weights, first
//! and second moments, the rest), with the codecs that stored them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use bitsnap_core::fmt::Ratio;
use bitsnap_core::{Role, Store};
use serde::{Deserialize, Serialize};

use super::Preset;
use crate::Error;
use crate::gpt::Gpt;
use crate::report::{Bytes, human};

/// One part of the training state in one phase and kind of save.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BreakdownRow {
    /// `pretrain` or `fine-tune` (by the snapshot's step).
    pub phase: String,
    /// `full` (no base) or `delta`.
    pub kind: String,
    /// `weights (trained)`, `weights (frozen)`, `first moments`, `second moments` or
    /// `other`.
    pub part: String,
    /// Tensors, decoded and payload bytes.
    pub bytes: Bytes,
    /// Tensors per codec.
    pub codecs: BTreeMap<String, u64>,
}

impl BreakdownRow {
    /// Payload bits per stored element (f32 tensors: 32 is raw).
    pub fn bits_per_element(&self) -> f64 {
        self.bytes.stored as f64 * 32.0 / self.bytes.raw.max(1) as f64
    }
}

/// Every part, phase and kind of save of a store, sorted by phase, kind and part.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Breakdown {
    /// The rows.
    pub rows: Vec<BreakdownRow>,
    /// Snapshot files per phase and kind: (phase, kind) → (files, decoded bytes, file
    /// bytes).
    pub files: Vec<(String, String, Bytes)>,
}

/// The part of the state a header entry holds.
fn part(name: &str, role: Role, fine_tune: bool, preset: &Preset) -> &'static str {
    match role {
        Role::Weight => match name.strip_prefix("model/") {
            Some(n) if fine_tune && Gpt::is_frozen(n, preset.freeze_blocks) => "weights (frozen)",
            _ => "weights (trained)",
        },
        Role::OptimizerMoment(1) => "first moments",
        Role::OptimizerMoment(_) => "second moments",
        _ => "other",
    }
}

impl Breakdown {
    /// Reads every snapshot header of the store in `dir` (no saver may hold its lock).
    pub fn read(dir: &Path, preset: &Preset) -> Result<Breakdown, Error> {
        let store = Store::open(dir)?;
        let mut rows: BTreeMap<(String, String, &'static str), BreakdownRow> = BTreeMap::new();
        let mut files: BTreeMap<(String, String), Bytes> = BTreeMap::new();
        for info in store.snapshots() {
            let step: u64 = bitsnap_burn::snapshot_step(&info.name).unwrap_or(0);
            let fine_tune = step > preset.pretrain_steps;
            let phase = if fine_tune { "fine-tune" } else { "pretrain" }.to_string();
            let kind = if info.base.is_some() { "delta" } else { "full" }.to_string();
            let path = dir.join(&info.file);
            let file_bytes = std::fs::metadata(&path).map_err(Error::io(&path))?.len();
            let f = files.entry((phase.clone(), kind.clone())).or_default();
            f.tensors += 1;
            f.raw += info.raw_bytes;
            f.stored += file_bytes;
            for e in store.header(info.id)?.entries {
                let p = part(&e.name, e.role, fine_tune, preset);
                let row = rows
                    .entry((phase.clone(), kind.clone(), p))
                    .or_insert_with(|| BreakdownRow {
                        phase: phase.clone(),
                        kind: kind.clone(),
                        part: p.to_string(),
                        bytes: Bytes::default(),
                        codecs: BTreeMap::new(),
                    });
                row.bytes.tensors += 1;
                row.bytes.raw += e.numel() * e.dtype.size() as u64;
                row.bytes.stored += e.len;
                *row.codecs.entry(e.codec.to_string()).or_insert(0) += 1;
            }
        }
        // Pretrain before fine-tune (the alphabet puts "fine-tune" first).
        let order = |phase: &str| u8::from(phase == "fine-tune");
        let mut rows: Vec<BreakdownRow> = rows.into_values().collect();
        rows.sort_by_key(|r| (order(&r.phase), r.kind.clone(), r.part.clone()));
        let mut files: Vec<(String, String, Bytes)> =
            files.into_iter().map(|((p, k), b)| (p, k, b)).collect();
        files.sort_by_key(|(p, k, _)| (order(p), k.clone()));
        Ok(Breakdown { rows, files })
    }

    /// The breakdown as a Markdown table: per phase and kind the files' ratio, then per
    /// part its share of the decoded bytes, its stored bytes, ratio, bits per element
    /// and codecs.
    pub fn table(&self) -> String {
        let raw_total: u64 = self.files.iter().map(|f| f.2.raw).sum();
        let mut t = String::from(
            "| phase, saves | part | share of raw | raw → stored | ratio | bits/element | codecs |\n|---|---|---|---|---|---|---|\n",
        );
        for (phase, kind, files) in &self.files {
            let _ = writeln!(
                t,
                "| **{phase}, {} {kind}** | whole files | {:.1}% | {} → {} | **{}** | | |",
                files.tensors,
                100.0 * files.raw as f64 / raw_total.max(1) as f64,
                human(files.raw),
                human(files.stored),
                Ratio(files.ratio()),
            );
            for r in self
                .rows
                .iter()
                .filter(|r| &r.phase == phase && &r.kind == kind)
            {
                let codecs: Vec<String> =
                    r.codecs.iter().map(|(c, n)| format!("{c} {n}")).collect();
                let _ = writeln!(
                    t,
                    "| | {} | {:.1}% | {} → {} | {} | {:.2} | {} |",
                    r.part,
                    100.0 * r.bytes.raw as f64 / raw_total.max(1) as f64,
                    human(r.bytes.raw),
                    human(r.bytes.stored),
                    Ratio(r.bytes.ratio()),
                    r.bits_per_element(),
                    codecs.join(", ")
                );
            }
        }
        t
    }
}
