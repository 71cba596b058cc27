//! The fidelity benchmark: does a run resumed from lossy optimizer moments end where the
//! uninterrupted run ends?
//!
//! One deterministic training run (the examples' [`Gpt`] on the tragedies, AdamW, linear
//! warm-up then cosine decay) saves its whole state every `save_every` steps into one
//! store per [`Budget`] (the bitsnap stage keys `bitsnap.step`, `bitsnap.lr`,
//! `bitsnap.peak_lr` and `bitsnap.warmup_steps` set on every save). Then, per budget and
//! per resume point (early, mid, late), the snapshot of that step is restored and
//! trained to the end with the same data order; the gap of its final validation loss to
//! the uninterrupted run's is set beside the run-to-run noise: the spread of the final
//! loss over uninterrupted runs that differ only in their data order.
//!
//! Without dropout, training is a pure function of the state and the step, so a
//! lossless resume ends bit for bit where the uninterrupted run ends: every gap is the
//! lossy encoding's doing.

mod report;

use std::path::{Path, PathBuf};

use bitsnap_burn::OptimizerSpec;
use bitsnap_burn::bridge::{self, Metadata, RecordKind};
use bitsnap_core::codec::QuantBits;
use bitsnap_core::{ErrorBudget, Lossiness, Policy, Store, Tensor, stage_keys};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer, OptimizerRecord};
use burn::store::ModuleRecord;
use burn::tensor::{Device, Int, Tensor as BurnTensor};
use burn::train::checkpoint::Checkpoint;
use serde::{Deserialize, Serialize};

pub use report::{BudgetReport, Choices, FidelityReport, ResumeRow};

use crate::Error;
use crate::corpus::{Corpus, TRAGEDIES};
use crate::finetune::PresetName;
use crate::gpt::{Gpt, GptConfig};

const MODEL_PREFIX: &str = "model/";
const OPTIM_PREFIX: &str = "optim/";

/// How a store encodes the optimizer moments.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Budget {
    /// Bit for bit (the control: its gap must be exactly 0).
    Lossless,
    /// An error budget (relative L2 per moment tensor, before the stage rule; first
    /// moments at the default factor on it).
    Error(f64),
    /// An error budget with first moments allowed `first_moment_factor` times it.
    Split {
        /// The base budget (second moments).
        max_error: f64,
        /// First moments: this many times the second moments' budget.
        first_moment_factor: f64,
    },
    /// A fixed codebook width for every moment tensor.
    Bits(u32),
}

impl Budget {
    /// Parses `lossless`, `default` (the shipped budget), `2x`/`4x`/`0.5x` (multiples of
    /// it), a plain number (a budget), either followed by `/m` and a first-moment factor
    /// (`0.12/m3`: first moments within 3 × 0.12 before the stage rule), or
    /// `bits4`/`bits8` (fixed widths).
    pub fn parse(s: &str) -> Result<Budget, Error> {
        let bad = || {
            Error::Usage(format!(
                "budget `{s}`: use lossless, default, 2x, 0.05, 0.12/m3 or bits4"
            ))
        };
        if let Some((e, f)) = s.trim().split_once("/m") {
            let factor: f64 = f.parse().map_err(|_| bad())?;
            let max_error = match Budget::parse(e)? {
                Budget::Error(e) => e,
                _ => return Err(bad()),
            };
            ErrorBudget::new(max_error)
                .and_then(|b| b.with_first_moment_factor(factor))
                .ok_or_else(bad)?;
            return Ok(Budget::Split {
                max_error,
                first_moment_factor: factor,
            });
        }
        let d = ErrorBudget::DEFAULT.rel_l2();
        match s.trim() {
            "lossless" => Ok(Budget::Lossless),
            "default" => Ok(Budget::Error(d)),
            t if t.starts_with("bits") => {
                let b: u32 = t[4..].parse().map_err(|_| bad())?;
                QuantBits::from_bits(b).ok_or_else(bad)?;
                Ok(Budget::Bits(b))
            }
            t if t.ends_with('x') => {
                let f: f64 = t[..t.len() - 1].parse().map_err(|_| bad())?;
                ErrorBudget::new(f * d).ok_or_else(bad)?;
                Ok(Budget::Error(f * d))
            }
            t => {
                let e: f64 = t.parse().map_err(|_| bad())?;
                ErrorBudget::new(e).ok_or_else(bad)?;
                Ok(Budget::Error(e))
            }
        }
    }

    /// A short label: `lossless`, `e=0.03`, `e=0.12,m1x3`, `4-bit`.
    pub fn label(&self) -> String {
        match self {
            Budget::Lossless => "lossless".into(),
            Budget::Error(e) => format!("e={e}"),
            Budget::Split {
                max_error,
                first_moment_factor,
            } => format!("e={max_error},m1x{first_moment_factor}"),
            Budget::Bits(b) => format!("{b}-bit"),
        }
    }

    /// The store policy.
    pub fn policy(&self) -> Policy {
        let lossiness = match *self {
            Budget::Lossless => Lossiness::Lossless,
            Budget::Error(e) => Lossiness::LossyOptimizerBudget {
                max_error: ErrorBudget::new(e).unwrap_or_default(),
            },
            Budget::Split {
                max_error,
                first_moment_factor,
            } => Lossiness::LossyOptimizerBudget {
                max_error: ErrorBudget::new(max_error)
                    .and_then(|b| b.with_first_moment_factor(first_moment_factor))
                    .unwrap_or_default(),
            },
            Budget::Bits(b) => Lossiness::LossyOptimizer {
                bits: QuantBits::from_bits(b).unwrap_or_default(),
            },
        };
        Policy::default().with_lossiness(lossiness)
    }
}

/// Sizes and schedule of a benchmark run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FidelityConfig {
    /// The model.
    pub gpt: GptConfig,
    /// Sequences per batch.
    pub batch: usize,
    /// Peak learning rate.
    pub peak_lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// Last step of every run.
    pub total_steps: u64,
    /// A snapshot every this many steps (the resume points must be multiples of it).
    pub save_every: u64,
    /// Steps restored and trained from there to `total_steps` (early, mid, late).
    pub resume_at: Vec<u64>,
    /// Uninterrupted runs measuring the noise (data seeds 0..noise_runs; run 0 is the
    /// reference every resume is compared with).
    pub noise_runs: u64,
    /// Validation batches of the final loss.
    pub valid_batches: usize,
    /// Seed of the initialisation (the same in every run).
    pub init_seed: u64,
    /// The budgets compared.
    pub budgets: Vec<Budget>,
}

/// Benchmark sizes, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FidelityPreset {
    /// Seconds, for the regression test: 2 blocks of width 32, 20 steps after each resume.
    Smoke,
    /// The CPU benchmark: 2 blocks of width 64, 1000 steps, resumes at 100, 300 and 500
    /// (each followed by at least 500 steps).
    Cpu,
    /// For a GPU: 8 blocks of width 512 (`gpu-26m`'s model), batch 8, 600 steps, one
    /// resume point at 100 (just after the warm-up, 500 steps to go). Sized to a
    /// session's device time: 3 uninterrupted runs and 2 resumes are ~2,800 steps (at
    /// batch 32, ~0.32 s a step on an H200 through wgpu, the benchmark did not fit).
    Gpu,
}

impl FidelityPreset {
    /// The preset's settings (budgets: lossless, 0.03, 0.06, 0.12, 4 and 8 bits).
    pub fn config(self) -> FidelityConfig {
        let budgets = ["lossless", "0.03", "0.06", "0.12", "bits4", "bits8"]
            .iter()
            .filter_map(|s| Budget::parse(s).ok())
            .collect();
        let base = |name: PresetName| name.preset().gpt;
        let (gpt, batch, peak_lr, warmup, total, every, resume_at, noise) = match self {
            FidelityPreset::Smoke => (
                GptConfig {
                    d_model: 32,
                    n_heads: 2,
                    n_layers: 2,
                    context: 32,
                    dropout: 0.0,
                    ..base(PresetName::Smoke)
                },
                4,
                3e-3,
                6,
                40,
                4,
                vec![8, 20],
                3,
            ),
            FidelityPreset::Cpu => (
                GptConfig {
                    d_model: 64,
                    n_heads: 4,
                    n_layers: 2,
                    context: 64,
                    dropout: 0.0,
                    ..base(PresetName::Smoke)
                },
                8,
                3e-3,
                50,
                1000,
                50,
                vec![100, 300, 500],
                3,
            ),
            FidelityPreset::Gpu => (
                GptConfig {
                    dropout: 0.0,
                    ..base(PresetName::Gpu26m)
                },
                8,
                6e-4,
                50,
                600,
                100,
                vec![100],
                3,
            ),
        };
        FidelityConfig {
            gpt,
            batch,
            peak_lr,
            warmup_steps: warmup,
            total_steps: total,
            save_every: every,
            resume_at,
            noise_runs: noise,
            valid_batches: 8,
            init_seed: 5,
            budgets,
        }
    }
}

impl FidelityConfig {
    /// The learning rate of the update that makes step `step` (1-based): linear warm-up,
    /// then cosine decay to a tenth of the peak at the last step.
    pub fn lr(&self, step: u64) -> f64 {
        let w = self.warmup_steps.max(1);
        if step <= w {
            return self.peak_lr * step as f64 / w as f64;
        }
        let span = self.total_steps.saturating_sub(w).max(1) as f64;
        let t = ((step - w) as f64 / span).min(1.0);
        let floor = 0.1 * self.peak_lr;
        floor + (self.peak_lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }

    /// Checks that the resume points are saved and leave steps to train.
    pub fn check(&self) -> Result<(), Error> {
        let every = self.save_every.max(1);
        for &r in &self.resume_at {
            if r == 0 || r % every != 0 || r >= self.total_steps {
                return Err(Error::Usage(format!(
                    "resume point {r}: must be a multiple of {every} below {}",
                    self.total_steps
                )));
            }
        }
        if self.noise_runs < 2 || self.budgets.is_empty() {
            return Err(Error::Usage(
                "at least 2 noise runs and one budget are needed".into(),
            ));
        }
        let mut labels: Vec<String> = self.budgets.iter().map(Budget::label).collect();
        labels.sort();
        if let Some(w) = labels.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::Usage(format!("budget {} given twice", w[0])));
        }
        Ok(())
    }
}

/// The state a step needs.
struct State {
    step: u64,
    model: Gpt,
    optim: ModuleOptimizer,
}

/// AdamW whose restored state lives on `device` (Burn's `load_record` alone would put it
/// on the default device: the GPU of a wgpu build).
fn optimizer(device: &Device) -> ModuleOptimizer {
    AdamWConfig::new().init_on(device)
}

fn scalar(t: BurnTensor<1>) -> f32 {
    t.try_into_scalar::<f32>().unwrap_or(f32::NAN)
}

/// The training side: corpus, device, schedule.
struct Trainer<'a> {
    cfg: &'a FidelityConfig,
    device: &'a Device,
    corpus: Corpus,
    valid: Vec<(BurnTensor<2, Int>, BurnTensor<2, Int>)>,
}

impl Trainer<'_> {
    fn fresh(&self) -> State {
        self.device.seed(self.cfg.init_seed);
        State {
            step: 0,
            model: self.cfg.gpt.init(self.device),
            optim: optimizer(self.device),
        }
    }

    /// Trains `state` to the last step on the batches of `data_seed`, calling `saved`
    /// after every `save_every`-th step.
    fn train(
        &self,
        mut state: State,
        data_seed: u64,
        mut saved: impl FnMut(&State) -> Result<(), Error>,
    ) -> Result<State, Error> {
        let (cfg, every) = (self.cfg, self.cfg.save_every.max(1));
        while state.step < cfg.total_steps {
            let step = state.step + 1;
            let (x, y) =
                self.corpus
                    .batch(data_seed, step, cfg.batch, cfg.gpt.context, self.device);
            let loss = state.model.loss(x, y);
            let grads = GradientsParams::from_grads(loss.backward(), &state.model);
            state.model = state.optim.step(cfg.lr(step), state.model, grads);
            state.step = step;
            if step.is_multiple_of(every) {
                saved(&state)?;
            }
        }
        Ok(state)
    }

    /// Mean validation loss.
    fn evaluate(&self, model: &Gpt) -> f64 {
        let model = model.valid();
        let total: f64 = self
            .valid
            .iter()
            .map(|(x, y)| scalar(model.loss(x.clone(), y.clone())) as f64)
            .sum();
        total / self.valid.len().max(1) as f64
    }

    /// The whole training state as bitsnap tensors, with the stage keys.
    fn tensors(&self, s: &State) -> Result<(Vec<Tensor>, Metadata), Error> {
        let rec = |what: &'static str, r: Result<burn::tensor::Bytes, burn::store::RecordError>| {
            r.map_err(|source| Error::Burn(bitsnap_burn::Error::Record { what, source }))
        };
        let model = rec(
            "model",
            s.model.clone().into_record().checkpoint_into_bytes(),
        )?;
        let optim = rec("optimizer", s.optim.to_record().checkpoint_into_bytes())?;
        let (mut tensors, mut meta) =
            bridge::from_burnpack(model, RecordKind::Module, MODEL_PREFIX)?;
        let (t, m) = bridge::from_burnpack(optim, RecordKind::Optimizer, OPTIM_PREFIX)?;
        tensors.extend(t);
        meta.extend(m);
        let cfg = self.cfg;
        meta.extend([
            (stage_keys::STEP.to_string(), s.step.to_string()),
            (stage_keys::LR.to_string(), format!("{}", cfg.lr(s.step))),
            (stage_keys::PEAK_LR.to_string(), format!("{}", cfg.peak_lr)),
            (
                stage_keys::WARMUP_STEPS.to_string(),
                cfg.warmup_steps.to_string(),
            ),
        ]);
        Ok((tensors, meta))
    }

    /// Restores the snapshot named `step-<step>` of `store`.
    fn restore(&self, store: &Store, step: u64) -> Result<State, Error> {
        let info = store
            .find("", &step_name(step))
            .ok_or_else(|| Error::Resume(format!("no snapshot of step {step}")))?;
        let snap = store.load(info.id)?;
        let rec = |what: &'static str, e: burn::store::RecordError| {
            Error::Burn(bitsnap_burn::Error::Record { what, source: e })
        };
        let model_bytes = bridge::to_burnpack(
            &snap.tensors,
            &snap.metadata,
            RecordKind::Module,
            MODEL_PREFIX,
        )?;
        let optim_bytes = bridge::to_burnpack(
            &snap.tensors,
            &snap.metadata,
            RecordKind::Optimizer,
            OPTIM_PREFIX,
        )?;
        let model =
            ModuleRecord::checkpoint_from_bytes(model_bytes).map_err(|e| rec("model", e))?;
        let optim =
            OptimizerRecord::checkpoint_from_bytes(optim_bytes).map_err(|e| rec("optimizer", e))?;
        let model = self
            .cfg
            .gpt
            .init(self.device)
            .try_load_record(model)
            .map_err(|e| Error::Resume(format!("model record of step {step}: {e}")))?;
        Ok(State {
            step,
            model,
            optim: optimizer(self.device).load_record(optim),
        })
    }
}

fn step_name(step: u64) -> String {
    format!("step-{step}")
}

/// The final loss of one uninterrupted run (`run-<data_seed>.json` in the output
/// directory).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// Its data order (0: the reference run, which saves the snapshots).
    pub data_seed: u64,
    /// Mean validation loss after the last step.
    pub final_loss: f64,
    /// Wall time of the run.
    pub seconds: f64,
    /// The settings it ran with (its budgets matter only to data order 0).
    pub config: FidelityConfig,
}

/// A part of the benchmark, run as its own process where a machine's calls are
/// time-limited: every part reads and writes the same output directory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Phase {
    /// Everything below in order, in this process.
    All,
    /// One uninterrupted run; data order 0 also saves the snapshots into one store per
    /// budget and writes the settings (`config.json`). Writes `run-<seed>.json`. The
    /// runs are independent: they may run side by side.
    Train {
        /// The run's data order.
        data_seed: u64,
    },
    /// Restores every resume point of every budget (or of one, for a process per
    /// budget) and trains it to the end. Needs the reference run; writes
    /// `resume-<budget>.json` per budget.
    Resume {
        /// Only this budget (one of the configuration's).
        only: Option<Budget>,
    },
    /// Collects the runs and resumes present into the report.
    Report,
}

/// A budget's label as a file name: `e0.12,m1x2`.
fn file_label(budget: &Budget) -> String {
    budget.label().replace('=', "")
}

/// The directory of a budget's store under `out`.
fn store_dir(out: &Path, budget: &Budget) -> PathBuf {
    out.join(file_label(budget))
}

/// The file of a budget's resumes under `out`.
fn resume_file(out: &Path, budget: &Budget) -> PathBuf {
    out.join(format!("resume-{}.json", file_label(budget)))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Usage(format!("{}: {e}", path.display())))?;
    std::fs::write(path, text).map_err(Error::io(path))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
    serde_json::from_str(&text).map_err(|e| Error::Usage(format!("{}: {e}", path.display())))
}

/// Refuses a part run with other settings than the reference run's (`config.json`).
fn same_config(cfg: &FidelityConfig, out: &Path) -> Result<(), Error> {
    let path = out.join("config.json");
    let saved: FidelityConfig = read_json(&path)?;
    same_settings(cfg, &saved, true, &path)
}

/// Whether `a` and `b` describe the same runs (and, if `budgets`, the same stores).
fn same_settings(
    a: &FidelityConfig,
    b: &FidelityConfig,
    budgets: bool,
    path: &Path,
) -> Result<(), Error> {
    let value = |c: &FidelityConfig| -> Result<serde_json::Value, Error> {
        let mut v = serde_json::to_value(c).map_err(|e| Error::Usage(e.to_string()))?;
        if !budgets && let Some(o) = v.as_object_mut() {
            o.remove("budgets");
        }
        Ok(v)
    };
    if value(a)? != value(b)? {
        return Err(Error::Usage(format!(
            "the settings differ from those of {}: give every phase the same preset, \
             budgets, resume points, steps and noise runs",
            path.display()
        )));
    }
    Ok(())
}

impl Trainer<'_> {
    /// Phase [`Phase::Train`].
    fn uninterrupted(&self, out: &Path, data_seed: u64) -> Result<RunResult, Error> {
        let cfg = self.cfg;
        let t = std::time::Instant::now();
        let end = if data_seed == 0 {
            write_json(&out.join("config.json"), cfg)?;
            let dirs: Vec<PathBuf> = cfg.budgets.iter().map(|b| store_dir(out, b)).collect();
            for d in &dirs {
                if d.exists() {
                    std::fs::remove_dir_all(d).map_err(Error::io(d))?;
                }
            }
            let mut stores: Vec<Store> = cfg
                .budgets
                .iter()
                .zip(&dirs)
                .map(|(b, d)| Store::open_or_create(d, b.policy()))
                .collect::<Result<_, _>>()?;
            // The same state goes to every store.
            self.train(self.fresh(), 0, |s| {
                let (tensors, meta) = self.tensors(s)?;
                for store in stores.iter_mut() {
                    store.save_with_metadata(&step_name(s.step), tensors.clone(), meta.clone())?;
                }
                Ok(())
            })?
        } else {
            // Independent of the reference run: the two may run side by side.
            self.train(self.fresh(), data_seed, |_| Ok(()))?
        };
        let result = RunResult {
            data_seed,
            final_loss: self.evaluate(&end.model),
            seconds: t.elapsed().as_secs_f64(),
            config: cfg.clone(),
        };
        write_json(&out.join(format!("run-{data_seed}.json")), &result)?;
        Ok(result)
    }

    /// Phase [`Phase::Resume`]: one budget.
    fn resumes(&self, out: &Path, budget: Budget, reference: f64) -> Result<BudgetReport, Error> {
        let store = Store::open(store_dir(out, &budget))?;
        let mut rows = Vec::new();
        for &at in &self.cfg.resume_at {
            let state = self.restore(&store, at)?;
            let end = self.train(state, 0, |_| Ok(()))?;
            let loss = self.evaluate(&end.model);
            rows.push(ResumeRow {
                step: at,
                final_loss: loss,
                gap: loss - reference,
                choices: report::choices(&store, &step_name(at))?,
            });
        }
        let report = report::budget_report(budget, &store, rows)?;
        write_json(&resume_file(out, &budget), &report)?;
        Ok(report)
    }
}

/// Phase [`Phase::Report`]: the runs of data orders `0..noise_runs` and the resumes of
/// every budget, read from `out`. `seconds` is the benchmark's wall time, or `None` when
/// it ran in parts (then: the uninterrupted runs' time, summed).
pub fn report(
    cfg: &FidelityConfig,
    out: &Path,
    seconds: Option<f64>,
) -> Result<FidelityReport, Error> {
    same_config(cfg, out)?;
    let runs: Vec<RunResult> = (0..cfg.noise_runs)
        .map(|seed| {
            let path = out.join(format!("run-{seed}.json"));
            let run: RunResult = read_json(&path)?;
            same_settings(cfg, &run.config, false, &path).map(|()| run)
        })
        .collect::<Result<_, _>>()?;
    let budgets = cfg
        .budgets
        .iter()
        .map(|b| read_json(&resume_file(out, b)))
        .collect::<Result<Vec<BudgetReport>, _>>()?;
    Ok(FidelityReport::new(
        cfg.clone(),
        runs[0].final_loss,
        runs.iter().map(|r| r.final_loss).collect(),
        budgets,
        seconds.unwrap_or_else(|| runs.iter().map(|r| r.seconds).sum()),
    ))
}

/// Runs `phase` of the benchmark on `device` in `out` (one store per budget, a JSON file
/// per run and per budget's resumes) and returns the report once every part is there
/// (`None` after [`Phase::Train`] and [`Phase::Resume`]). `progress` is called with a
/// line after each run.
///
/// [`Phase::All`] is the whole benchmark in one process; on a machine whose calls are
/// time-limited, `Train { data_seed: 0 }` first, then the other data orders and `Resume`
/// (in parallel processes if the device has room), then `Report`.
pub fn run(
    cfg: &FidelityConfig,
    device: &Device,
    out: &Path,
    phase: Phase,
    mut progress: impl FnMut(&str),
) -> Result<Option<FidelityReport>, Error> {
    cfg.check()?;
    let started = std::time::Instant::now();
    if phase == Phase::Report {
        return report(cfg, out, None).map(Some);
    }
    let corpus = Corpus::new(TRAGEDIES, 0.1);
    let plain = device.clone().without_autodiff();
    let valid = corpus.valid_batches(cfg.valid_batches, cfg.batch, cfg.gpt.context, &plain);
    let trainer = Trainer {
        cfg,
        device,
        corpus,
        valid,
    };
    let seeds = match phase {
        Phase::All => (0..cfg.noise_runs).collect(),
        Phase::Train { data_seed } => vec![data_seed],
        _ => vec![],
    };
    for seed in seeds {
        let r = trainer.uninterrupted(out, seed)?;
        progress(&match seed {
            0 => format!(
                "reference run: final loss {:.5} ({:.1} s)",
                r.final_loss, r.seconds
            ),
            _ => format!("data order {seed}: final loss {:.5}", r.final_loss),
        });
    }
    if matches!(phase, Phase::Train { .. }) {
        return Ok(None);
    }
    same_config(cfg, out)?;
    let reference: RunResult = read_json(&out.join("run-0.json"))?;
    let only = match phase {
        Phase::Resume { only } => only,
        _ => None,
    };
    if let Some(b) = only
        && !cfg.budgets.contains(&b)
    {
        return Err(Error::Usage(format!(
            "budget {} is not one of the run's",
            b.label()
        )));
    }
    for budget in cfg.budgets.iter().filter(|b| only.is_none_or(|o| o == **b)) {
        let b = trainer.resumes(out, *budget, reference.final_loss)?;
        for r in &b.rows {
            progress(&format!(
                "{}: resumed at {}, final loss {:.5} (gap {:+.2e})",
                b.label, r.step, r.final_loss, r.gap
            ));
        }
    }
    if matches!(phase, Phase::Resume { .. }) {
        return Ok(None);
    }
    report(cfg, out, Some(started.elapsed().as_secs_f64())).map(Some)
}
