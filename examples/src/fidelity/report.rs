//! What the benchmark measured: sizes per budget, gaps per resume point, the noise, what
//! the adaptive rule chose, and the compact table the binary prints.

use std::collections::BTreeMap;

use bitsnap_core::codec::{ClusterLayout, CodecId};
use bitsnap_core::{Role, Store, stage_keys};
use serde::{Deserialize, Serialize};

use super::{Budget, FidelityConfig};
use crate::Error;

/// What the policy chose for the moments of one snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Choices {
    /// The budget applied to the save (`bitsnap.max_error`), if any.
    pub budget: Option<f64>,
    /// Why (`bitsnap.budget_rule`).
    pub rule: Option<String>,
    /// Per moment (`m1`, `m2`): encoding → tensor count, e.g. `3b log` → 4, `base` → 2.
    pub per_role: BTreeMap<String, BTreeMap<String, u64>>,
    /// Per moment: stored bits per element.
    pub bits_per_element: BTreeMap<String, f64>,
}

impl Choices {
    /// `m1: 4b linear x6, base x2; m2: 2b ratio x8`.
    pub fn summary(&self) -> String {
        self.per_role
            .iter()
            .map(|(role, m)| {
                let list: Vec<String> = m.iter().map(|(k, n)| format!("{k} x{n}")).collect();
                let bpe = self.bits_per_element.get(role).copied().unwrap_or(f64::NAN);
                format!("{role} ({bpe:.2} b/el): {}", list.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The moments' choices in the snapshot `name` of `store`.
pub(super) fn choices(store: &Store, name: &str) -> Result<Choices, Error> {
    let info = store
        .find("", name)
        .ok_or_else(|| Error::Resume(format!("no snapshot {name}")))?;
    let file = store.open_file(info.id)?;
    let header = &file.header;
    let meta = |k: &str| {
        header
            .metadata
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let mut c = Choices {
        budget: meta(stage_keys::MAX_ERROR).and_then(|v| v.parse().ok()),
        rule: meta(stage_keys::BUDGET_RULE),
        ..Choices::default()
    };
    let mut sizes: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for e in &header.entries {
        let Role::OptimizerMoment(k) = e.role else {
            continue;
        };
        let role = format!("m{k}");
        let label = match e.codec {
            CodecId::Cluster | CodecId::ClusterResidual => {
                match ClusterLayout::parse(file.payload(e)?, e.dtype) {
                    Ok(l) => format!(
                        "{}b {}{}",
                        l.bits.bits(),
                        l.domain(),
                        if l.context { " ctx" } else { "" }
                    ),
                    Err(_) => e.codec.name().to_string(),
                }
            }
            CodecId::Unchanged if e.decision.error.is_some() => "base".into(),
            other => format!("lossless {}", other.name()),
        };
        *c.per_role
            .entry(role.clone())
            .or_default()
            .entry(label)
            .or_default() += 1;
        let s = sizes.entry(role).or_default();
        s.0 += e.numel();
        s.1 += e.len;
    }
    c.bits_per_element = sizes
        .into_iter()
        .map(|(r, (n, b))| (r, 8.0 * b as f64 / n.max(1) as f64))
        .collect();
    Ok(c)
}

/// One resumed run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResumeRow {
    /// The step restored.
    pub step: u64,
    /// Its final validation loss.
    pub final_loss: f64,
    /// `final_loss` minus the uninterrupted run's.
    pub gap: f64,
    /// What the policy chose for the snapshot restored.
    pub choices: Choices,
}

/// One budget: sizes over the whole chain of saves and the resumed runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BudgetReport {
    /// The budget.
    pub budget: Budget,
    /// Its label.
    pub label: String,
    /// Raw bytes of the moment tensors, summed over every save.
    pub moment_raw: u64,
    /// Their stored payload bytes.
    pub moment_stored: u64,
    /// Raw bytes of the whole state, summed over every save.
    pub whole_raw: u64,
    /// Stored file bytes, summed over every save.
    pub whole_stored: u64,
    /// The resumed runs.
    pub rows: Vec<ResumeRow>,
}

impl BudgetReport {
    /// Moment bytes raw / stored.
    pub fn moment_ratio(&self) -> f64 {
        self.moment_raw as f64 / self.moment_stored.max(1) as f64
    }

    /// Whole state raw / stored.
    pub fn whole_ratio(&self) -> f64 {
        self.whole_raw as f64 / self.whole_stored.max(1) as f64
    }
}

pub(super) fn budget_report(
    budget: Budget,
    store: &Store,
    rows: Vec<ResumeRow>,
) -> Result<BudgetReport, Error> {
    let (mut moment_raw, mut moment_stored, mut whole_raw, mut whole_stored) = (0, 0, 0, 0);
    for info in store.snapshots() {
        whole_raw += info.raw_bytes;
        whole_stored += info.stored_bytes;
        for e in store.header(info.id)?.entries {
            if e.role.is_moment() {
                moment_raw += e.raw_len();
                moment_stored += e.len;
            }
        }
    }
    Ok(BudgetReport {
        budget,
        label: budget.label(),
        moment_raw,
        moment_stored,
        whole_raw,
        whole_stored,
        rows,
    })
}

/// Everything the benchmark measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FidelityReport {
    /// The settings.
    pub config: FidelityConfig,
    /// Final validation loss of the uninterrupted reference run (data order 0).
    pub reference_loss: f64,
    /// Final losses of the uninterrupted runs, data orders 0, 1, …
    pub noise_losses: Vec<f64>,
    /// Run-to-run noise: the largest |loss − reference| over the other data orders.
    pub noise: f64,
    /// Standard deviation of `noise_losses` (n − 1).
    pub noise_std: f64,
    /// Per budget.
    pub budgets: Vec<BudgetReport>,
    /// Wall time of the benchmark.
    pub seconds: f64,
}

impl FidelityReport {
    pub(super) fn new(
        config: FidelityConfig,
        reference_loss: f64,
        noise_losses: Vec<f64>,
        budgets: Vec<BudgetReport>,
        seconds: f64,
    ) -> FidelityReport {
        let noise = noise_losses
            .iter()
            .map(|l| (l - reference_loss).abs())
            .fold(0.0, f64::max);
        let n = noise_losses.len() as f64;
        let mean = noise_losses.iter().sum::<f64>() / n;
        let var = noise_losses.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        FidelityReport {
            config,
            reference_loss,
            noise_losses,
            noise,
            noise_std: var.sqrt(),
            budgets,
            seconds,
        }
    }

    /// The largest |gap| of a budget's resumed runs.
    pub fn worst_gap(&self, label: &str) -> Option<f64> {
        self.budgets
            .iter()
            .find(|b| b.label == label)
            .map(|b| b.rows.iter().map(|r| r.gap.abs()).fold(0.0, f64::max))
    }

    /// The compact Markdown table: one row per budget and resume point.
    pub fn table(&self) -> String {
        let mut s = format!(
            "reference final loss {:.5}; noise over {} data orders: max |diff| {:.2e}, std {:.2e}\n\n",
            self.reference_loss,
            self.noise_losses.len(),
            self.noise,
            self.noise_std
        );
        s.push_str("| budget | moments | whole | resume at | budget applied | final-loss gap | gap/noise | chosen (moments) |\n");
        s.push_str("|---|---|---|---|---|---|---|---|\n");
        for b in &self.budgets {
            for r in &b.rows {
                s.push_str(&format!(
                    "| {} | {:.2}x | {:.2}x | {} | {} | {:+.2e} | {:.2} | {} |\n",
                    b.label,
                    b.moment_ratio(),
                    b.whole_ratio(),
                    r.step,
                    r.choices.budget.map_or("-".into(), |v| format!("{v:.3}")),
                    r.gap,
                    r.gap.abs() / self.noise.max(f64::MIN_POSITIVE),
                    r.choices.summary()
                ));
            }
        }
        s
    }
}
