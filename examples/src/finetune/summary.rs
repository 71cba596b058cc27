//! What a run measured, as JSON (for tests and tools) and as the table the example prints.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Breakdown, PolicyChoice, Preset};
use crate::Error;
use crate::report::{StoreReport, human};
use bitsnap_core::fmt::Ratio;

/// How the run came back from a crash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CrashReport {
    /// The last step trained before the crash.
    pub crashed_after: u64,
    /// The step of the snapshot restored.
    pub restored_step: u64,
    /// Reopening the store, decoding the snapshot and loading model and optimizer.
    pub restore_ms: f64,
    /// Whether the snapshot came from memory (a keeper's, or this process's) rather than
    /// disk.
    pub from_memory: bool,
    /// Where it came from, in words: `disk`, `memory (keeper)`, `memory (this process)`.
    #[serde(default)]
    pub restored_from: String,
    /// Simulated in this process (`true`) or a real restart with `--resume` (`false`).
    pub simulated: bool,
    /// Steps trained twice: before the crash and after the restore.
    pub replayed: u64,
    /// Of those, how many gave a bit-identical loss.
    pub identical: u64,
    /// Largest relative loss difference between the two trainings of a step.
    pub max_rel_diff: f64,
}

/// Everything the run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The device that trained.
    pub device: String,
    /// Why it was chosen.
    pub device_reason: String,
    /// Sizes and schedule.
    pub preset: Preset,
    /// Model parameters.
    pub params: usize,
    /// Parameters frozen in phase 2.
    pub frozen_params: usize,
    /// Checkpoint encoding.
    pub policy: PolicyChoice,
    /// Bits per quantized moment, under the lossy policy.
    pub bits: Option<u32>,
    /// Relative-L2 budget per moment tensor, under the lossy policy without fixed bits.
    #[serde(default)]
    pub max_error: Option<f64>,
    /// Training loss of every step (after a crash, the replayed value).
    pub losses: Vec<(u64, f32)>,
    /// Held-out sonnets loss of phase 1's final checkpoint.
    pub eval_sonnets_before: f32,
    /// Held-out sonnets loss at the end.
    pub eval_sonnets_after: f32,
    /// Held-out tragedies loss of phase 1's final checkpoint.
    pub eval_tragedies_before: f32,
    /// Held-out tragedies loss at the end.
    pub eval_tragedies_after: f32,
    /// Training-thread time of each `StepSaver::snapshot` call, by step.
    pub stalls_ms: BTreeMap<u64, f64>,
    /// Background read-back time of each save (this process's saves after any crash).
    pub readback_ms: Vec<f64>,
    /// Background encode-and-write time of each save.
    pub encode_write_ms: Vec<f64>,
    /// Loading phase 1's checkpoint to start phase 2 (absent when resumed past it).
    pub phase2_start_ms: Option<f64>,
    /// The crash and restore, if any.
    pub crash: Option<CrashReport>,
    /// Frozen weight tensors stored `unchanged` in phase 2's delta snapshots, of all
    /// frozen weight tensors in them.
    pub frozen_unchanged: (u64, u64),
    /// The store, measured.
    pub store: StoreReport,
    /// What the store's ratio is made of, per phase, kind of save and part of the state.
    #[serde(default)]
    pub breakdown: Breakdown,
    /// Wall-clock time of the run (after the build).
    pub wall_seconds: f64,
    /// Training steps per second (with the snapshot calls), over `timed_steps` steps: the
    /// process's first [`super::WARMUP_STEPS`] steps, the phase switch, a crash and its
    /// restore are not counted.
    #[serde(default)]
    pub steps_per_s: f64,
    /// Steps counted in `steps_per_s`.
    #[serde(default)]
    pub timed_steps: u64,
    /// The plot.
    pub plot: PathBuf,
}

fn mean(v: impl IntoIterator<Item = f64>) -> (f64, f64, usize) {
    let v: Vec<f64> = v.into_iter().collect();
    let n = v.len();
    let max = v.iter().cloned().fold(0.0, f64::max);
    (v.iter().sum::<f64>() / n.max(1) as f64, max, n)
}

fn median(v: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = v.into_iter().collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match (v.get(n.saturating_sub(1) / 2), v.get(n / 2)) {
        (Some(a), Some(b)) => (a + b) / 2.0,
        _ => 0.0,
    }
}

impl Summary {
    /// Mean training loss over the last `n` steps up to `until`.
    pub fn mean_loss(&self, until: u64, n: usize) -> f32 {
        let v: Vec<f32> = self
            .losses
            .iter()
            .filter(|(s, _)| *s <= until)
            .rev()
            .take(n)
            .map(|(_, l)| *l)
            .collect();
        v.iter().sum::<f32>() / v.len().max(1) as f32
    }

    /// The summary table (Markdown).
    pub fn table(&self) -> String {
        let p = &self.preset;
        let g = &p.gpt;
        let s = &self.store;
        let mut t = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(t, "| {k} | {v} |");
        };
        row(
            "device",
            format!("{} ({})", self.device, self.device_reason),
        );
        row(
            "model",
            format!(
                "byte-level GPT, {:.2}M parameters: {} blocks, width {}, {} heads, context {}; batch {}",
                self.params as f64 / 1e6,
                g.n_layers,
                g.d_model,
                g.n_heads,
                g.context,
                p.batch
            ),
        );
        row(
            "steps",
            format!(
                "{} pretrain (tragedies, AdamW lr {:.0e}) + {} fine-tune (sonnets, lr {:.0e})",
                p.pretrain_steps, p.pretrain_lr, p.finetune_steps, p.finetune_lr
            ),
        );
        row(
            "frozen in fine-tune",
            format!(
                "embeddings + {} of {} blocks ({:.2}M parameters); stored `unchanged` in {} of {} frozen tensors of phase-2 deltas",
                p.freeze_blocks,
                g.n_layers,
                self.frozen_params as f64 / 1e6,
                self.frozen_unchanged.0,
                self.frozen_unchanged.1
            ),
        );
        let first = self.losses.first().map(|(_, l)| *l).unwrap_or(f32::NAN);
        row(
            "pretrain loss (nats/byte)",
            format!(
                "{first:.3} at step 1 → {:.3} (mean of its last 10 steps)",
                self.mean_loss(p.pretrain_steps, 10)
            ),
        );
        row(
            "held-out sonnets loss",
            format!(
                "{:.3} before fine-tuning → {:.3} after",
                self.eval_sonnets_before, self.eval_sonnets_after
            ),
        );
        row(
            "held-out tragedies loss",
            format!(
                "{:.3} before fine-tuning → {:.3} after",
                self.eval_tragedies_before, self.eval_tragedies_after
            ),
        );
        let full = s.snapshots.iter().filter(|r| r.full).count();
        row(
            "checkpoints",
            format!(
                "{} (every {} steps and at each phase's end; {} full), policy {}",
                s.snapshots.len(),
                p.checkpoint_every,
                full,
                match (self.bits, self.max_error) {
                    (Some(b), _) => format!("lossy-optimizer ({b}-bit moments)"),
                    (None, Some(e)) => format!("lossy-optimizer (moments within rel-L2 {e})"),
                    (None, None) => "lossless".into(),
                }
            ),
        );
        row(
            "raw → on disk (file sizes)",
            format!(
                "{} → {} = **{}**",
                human(s.raw_bytes),
                human(s.disk_bytes),
                Ratio(s.ratio())
            ),
        );
        row(
            "weights (payloads)",
            format!(
                "{} → {} = {}",
                human(s.weights.raw),
                human(s.weights.stored),
                Ratio(s.weights.ratio())
            ),
        );
        row(
            "optimizer moments (payloads)",
            format!(
                "{} → {} = {}",
                human(s.optimizer.raw),
                human(s.optimizer.stored),
                Ratio(s.optimizer.ratio())
            ),
        );
        let mix: Vec<String> = s
            .codecs
            .iter()
            .map(|(c, b)| format!("{c} {} ({})", b.tensors, human(b.stored)))
            .collect();
        row("codec mix (tensors, bytes)", mix.join(", "));
        let (m, max, n) = mean(self.stalls_ms.values().cloned());
        row(
            "training-thread stall per checkpoint",
            format!(
                "median {:.3} ms, mean {m:.3} ms, max {max:.3} ms over {n} snapshots",
                median(self.stalls_ms.values().cloned())
            ),
        );
        let (rb, _, _) = mean(self.readback_ms.iter().cloned());
        let (ew, _, _) = mean(self.encode_write_ms.iter().cloned());
        row(
            "background work per save",
            format!("read-back {rb:.1} ms + encode and write {ew:.1} ms (mean)"),
        );
        match &self.crash {
            Some(c) => row(
                if c.simulated {
                    "crash (simulated)"
                } else {
                    "resume (--resume)"
                },
                format!(
                    "after step {}; restored step {} from {} in **{:.0} ms**; {} replayed steps: {} with a bit-identical loss, max relative difference {:.2e}",
                    c.crashed_after,
                    c.restored_step,
                    c.restored_from,
                    c.restore_ms,
                    c.replayed,
                    c.identical,
                    c.max_rel_diff
                ),
            ),
            None => row("crash", "none (--no-crash)".into()),
        }
        if let Some(ms) = self.phase2_start_ms {
            row(
                "phase 2 start",
                format!("phase 1's checkpoint restored in {ms:.0} ms"),
            );
        }
        row(
            "training speed",
            format!(
                "{:.2} steps/s over {} steps (snapshot calls included; startup excluded)",
                self.steps_per_s, self.timed_steps
            ),
        );
        row("wall time", format!("{:.1} s", self.wall_seconds));
        format!(
            "| | |\n|---|---|\n{t}\nWhat the ratio is made of (payload bytes; file bytes for whole files):\n\n{}",
            self.breakdown.table()
        )
    }

    /// Writes `summary.json` and `summary.md` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        let json = dir.join("summary.json");
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Io {
            path: json.clone(),
            source: e.into(),
        })?;
        std::fs::write(&json, text).map_err(Error::io(&json))?;
        let md = dir.join("summary.md");
        std::fs::write(&md, self.table()).map_err(Error::io(&md))
    }
}
