//! What checkpointing costs the training loop: the same steps trained with no
//! checkpoints, with bitsnap snapshots every 1, 10 and 100 steps, and with Burn's own
//! checkpointing (the `AsyncCheckpointer<FileCheckpointer>` pair that Burn's learner uses,
//! one burnpack file per record) at the same intervals, one after another in one process.
//!
//! Each configuration starts from the same initial model and trains the same batches.
//! Steps/s is measured over `steps` steps after `warmup` steps that are not counted
//! (kernel compilation, allocator growth); the time to drain the saves still queued at the
//! end is reported apart. The run without checkpoints goes first and last: its two
//! figures show the noise of the machine, and their mean is the baseline.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bitsnap_burn::StepSaver;
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::store::ModuleRecord;
use burn::tensor::Device;
use burn::train::checkpoint::{AsyncCheckpointer, Checkpointer, FileCheckpointer};
use serde::{Deserialize, Serialize};

use super::{RunConfig, Texts, optimizer, scalar};
use crate::Error;
use crate::gpt::Gpt;
use crate::loader::DropoutSeeds;

/// How a configuration checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Saving {
    /// No checkpoints.
    None,
    /// A bitsnap snapshot every `every` steps through [`StepSaver`] (the run's policy),
    /// persisted every `max(every, persist_every)` steps: the run's `persist_every` is read
    /// as a step interval, the snapshots between are held in memory.
    Bitsnap {
        /// Steps between snapshots.
        every: u64,
    },
    /// Burn's checkpointing every `every` steps: model and optimizer records through one
    /// `AsyncCheckpointer<FileCheckpointer>` each, the two newest kept.
    Burn {
        /// Steps between checkpoints.
        every: u64,
    },
}

impl Saving {
    /// Its name in the table.
    pub fn label(&self) -> String {
        match self {
            Saving::None => "no checkpoints".into(),
            Saving::Bitsnap { every } => format!("bitsnap every {every}"),
            Saving::Burn { every } => format!("Burn burnpack every {every}"),
        }
    }
}

/// One configuration, measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeedRow {
    /// The configuration.
    pub saving: Saving,
    /// Steps measured (after the warm-up).
    pub steps: u64,
    /// Their wall time, seconds.
    pub seconds: f64,
    /// Training-thread time inside snapshot/save calls during them, seconds.
    pub stall_seconds: f64,
    /// Draining the saves still queued after the last step, seconds (not in `seconds`).
    pub drain_seconds: f64,
    /// Checkpoints taken during the measured steps.
    pub checkpoints: u64,
    /// Of bitsnap's snapshots, how many were persisted (the others were held in memory).
    pub persisted: u64,
    /// bitsnap's background work during the measured steps (zero for the others).
    #[serde(default)]
    pub background: Background,
}

/// What bitsnap's background threads did for the snapshots of the measured steps.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Background {
    /// Raw bytes read back (model and optimizer state), all snapshots.
    pub read_bytes: u64,
    /// Of them, the optimizer's state.
    pub optimizer_bytes: u64,
    /// Whole read-backs (record, transaction, conversion), seconds, all snapshots.
    pub readback_seconds: f64,
    /// The transactions alone (the device's reads), seconds.
    pub device_seconds: f64,
    /// Raw bytes of the persisted snapshots.
    pub persisted_bytes: u64,
    /// Encoding and writing them, seconds.
    pub encode_write_seconds: f64,
    /// Snapshots due for the disk that a newer one replaced (`latest_wins`).
    pub replaced: u64,
    /// Of the stall, the training thread's waits for room in the queue or the memory
    /// budget, seconds.
    pub wait_seconds: f64,
}

impl Background {
    fn of(stats: &[bitsnap_burn::SaveStats]) -> Background {
        let mut b = Background::default();
        for s in stats {
            b.read_bytes += s.read.model_bytes + s.read.optimizer_bytes;
            b.optimizer_bytes += s.read.optimizer_bytes;
            b.readback_seconds += s.readback.as_secs_f64();
            b.device_seconds += s.read.device.as_secs_f64();
            if s.persisted {
                b.persisted_bytes += s.raw_bytes;
                b.encode_write_seconds += s.encode_write.as_secs_f64();
            }
            b.replaced += s.replaced;
            b.wait_seconds += s.wait.as_secs_f64();
        }
        b
    }

    /// Read-back seconds per GB of state.
    pub fn readback_s_per_gb(&self) -> f64 {
        self.readback_seconds / (self.read_bytes as f64 / 1e9).max(1e-12)
    }

    /// Encode and write seconds per GB of persisted state.
    pub fn write_s_per_gb(&self) -> f64 {
        self.encode_write_seconds / (self.persisted_bytes as f64 / 1e9).max(1e-12)
    }

    /// Background seconds per GB of one persisted save: its read-back and its write.
    pub fn save_s_per_gb(&self) -> f64 {
        self.readback_s_per_gb() + self.write_s_per_gb()
    }
}

impl SpeedRow {
    /// Training steps per second.
    pub fn steps_per_s(&self) -> f64 {
        self.steps as f64 / self.seconds.max(1e-9)
    }
}

/// The comparison: every configuration, in the order run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeedReport {
    /// The device, in words.
    pub device: String,
    /// Model parameters.
    pub params: usize,
    /// Steps not counted at the start of each configuration.
    pub warmup: u64,
    /// The rows, the baseline first and last.
    pub rows: Vec<SpeedRow>,
}

impl SpeedReport {
    /// Baseline steps/s: the mean of the runs without checkpoints.
    pub fn baseline(&self) -> f64 {
        let v: Vec<f64> = self
            .rows
            .iter()
            .filter(|r| r.saving == Saving::None)
            .map(SpeedRow::steps_per_s)
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    }

    /// Slowdown of `row` against the baseline, in percent (positive: slower).
    pub fn slowdown_pct(&self, row: &SpeedRow) -> f64 {
        (self.baseline() / row.steps_per_s() - 1.0) * 100.0
    }

    /// Writes `speed.json` and `speed.md` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        let json = dir.join("speed.json");
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Io {
            path: json.clone(),
            source: e.into(),
        })?;
        std::fs::write(&json, text).map_err(Error::io(&json))?;
        let md = dir.join("speed.md");
        std::fs::write(&md, self.table()).map_err(Error::io(&md))
    }

    /// The table (Markdown).
    pub fn table(&self) -> String {
        let mut t = format!(
            "{}, {:.2}M parameters; {} warm-up steps not counted\n\n\
             | checkpointing | steps | steps/s | slowdown | stall in save calls (waiting for the queue) | drain after | checkpoints (persisted) | read-back s/GB (device) | write s/GB | background s/GB per persisted save |\n\
             |---|---|---|---|---|---|---|---|---|---|\n",
            self.device,
            self.params as f64 / 1e6,
            self.warmup
        );
        for r in &self.rows {
            let persisted = match r.saving {
                Saving::Bitsnap { .. } => format!("{} ({})", r.checkpoints, r.persisted),
                _ => r.checkpoints.to_string(),
            };
            let b = &r.background;
            let background = match r.saving {
                Saving::Bitsnap { .. } if b.read_bytes > 0 => format!(
                    "{:.3} ({:.3}) | {} | {}",
                    b.readback_s_per_gb(),
                    b.device_seconds / (b.read_bytes as f64 / 1e9),
                    if b.persisted_bytes > 0 {
                        format!("{:.3}", b.write_s_per_gb())
                    } else {
                        "-".into()
                    },
                    if b.persisted_bytes > 0 {
                        format!("{:.3}", b.save_s_per_gb())
                    } else {
                        "-".into()
                    },
                ),
                _ => "- | - | -".into(),
            };
            t.push_str(&format!(
                "| {} | {} | {:.2} | {:+.1}% | {:.2} s ({:.2} s) | {:.2} s | {} | {} |\n",
                r.saving.label(),
                r.steps,
                r.steps_per_s(),
                self.slowdown_pct(r),
                r.stall_seconds,
                b.wait_seconds,
                r.drain_seconds,
                persisted,
                background
            ));
        }
        t
    }
}

/// Where a configuration saves.
enum Saver {
    None,
    Bitsnap(Box<StepSaver>),
    Burn {
        model: AsyncCheckpointer<ModuleRecord>,
        optim: AsyncCheckpointer<burn::optim::OptimizerRecord>,
    },
}

/// Trains `warmup + steps` pretraining steps of `cfg`'s model under `saving`, in a fresh
/// directory under `scratch` (removed afterwards).
pub fn measure(
    cfg: &RunConfig,
    device: &Device,
    saving: Saving,
    warmup: u64,
    steps: u64,
    scratch: &Path,
) -> Result<SpeedRow, Error> {
    let preset = &cfg.preset;
    let dir: PathBuf = scratch.join(match saving {
        Saving::None => "none".to_string(),
        Saving::Bitsnap { every } => format!("bitsnap-{every}"),
        Saving::Burn { every } => format!("burn-{every}"),
    });
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(Error::io(&dir))?;
    }
    let saver = match saving {
        Saving::None => Saver::None,
        // `persist_every` counts steps here: a snapshot every step persisted every 10th
        // writes as often as one every 10 steps persisted each time.
        Saving::Bitsnap { every } => {
            let persist = (preset.persist_every / every.max(1)).max(1);
            let config = cfg.saver_config().with_persist_every(persist);
            Saver::Bitsnap(Box::new(StepSaver::open(&dir, config)?))
        }
        Saving::Burn { .. } => Saver::Burn {
            model: AsyncCheckpointer::new(FileCheckpointer::new(&dir, "model")),
            optim: AsyncCheckpointer::new(FileCheckpointer::new(&dir, "optim")),
        },
    };
    let every = match saving {
        Saving::None => u64::MAX,
        Saving::Bitsnap { every } | Saving::Burn { every } => every.max(1),
    };
    device.seed(cfg.seed);
    let texts = Texts::new();
    let corpus = texts.corpus(preset, 1);
    let mut loader = texts.loader(preset, cfg.seed, 1);
    let mut seeds = DropoutSeeds::new(cfg.seed);
    let mut model: Gpt = preset.gpt.init(device);
    let mut optim = optimizer(device);
    let (mut started, mut stall, mut checkpoints) = (Instant::now(), Duration::ZERO, 0);
    for step in 1..=warmup + steps {
        if step == warmup + 1 {
            started = Instant::now();
            stall = Duration::ZERO;
            checkpoints = 0;
        }
        let (x, y) = loader.next_batch(corpus, device);
        seeds.seed_next(device);
        let lr = preset.lr(step);
        let loss = model.loss(x, y);
        // Reading the loss waits for the step's work, as a loop that logs it does.
        let _ = scalar(loss.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(lr, model, grads);
        if step % every == 0 {
            let t = Instant::now();
            match &saver {
                Saver::None => {}
                Saver::Bitsnap(s) => s.snapshot(step, &model, &optim).lr(lr).submit()?,
                Saver::Burn { model: m, optim: o } => {
                    let e = step as usize;
                    let failed = |e: burn::train::checkpoint::CheckpointerError| {
                        Error::Resume(format!("Burn checkpoint of step {step}: {e}"))
                    };
                    m.save(e, model.clone().into_record()).map_err(failed)?;
                    o.save(e, optim.to_record()).map_err(failed)?;
                    // The learner's default strategy keeps the two newest.
                    if let Some(old) = e.checked_sub(2 * every as usize) {
                        m.delete(old).map_err(failed)?;
                        o.delete(old).map_err(failed)?;
                    }
                }
            }
            stall += t.elapsed();
            checkpoints += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let drain = Instant::now();
    let mut background = Background::default();
    let persisted = match saver {
        Saver::None => 0,
        Saver::Bitsnap(s) => {
            s.flush()?;
            let measured: Vec<_> = s.stats().into_iter().filter(|x| x.step > warmup).collect();
            background = Background::of(&measured);
            s.close()?;
            measured.iter().filter(|x| x.persisted).count() as u64
        }
        // Dropping an AsyncCheckpointer waits for its thread to finish the queued save.
        Saver::Burn { model, optim } => {
            drop(model);
            drop(optim);
            checkpoints
        }
    };
    let drain_seconds = drain.elapsed().as_secs_f64();
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(Error::io(&dir))?;
    }
    Ok(SpeedRow {
        saving,
        steps,
        seconds,
        stall_seconds: stall.as_secs_f64(),
        drain_seconds,
        checkpoints,
        persisted,
        background,
    })
}

/// Measures every configuration of `savings`, preceded and followed by one without
/// checkpoints; calls `each` after each row (for progress output).
pub fn compare(
    cfg: &RunConfig,
    device: &Device,
    device_name: &str,
    savings: &[Saving],
    warmup: u64,
    steps: u64,
    mut each: impl FnMut(&SpeedRow),
) -> Result<SpeedReport, Error> {
    let scratch = cfg.out.join("speed");
    std::fs::create_dir_all(&scratch).map_err(Error::io(&scratch))?;
    let order = std::iter::once(Saving::None)
        .chain(savings.iter().copied().filter(|s| *s != Saving::None))
        .chain(std::iter::once(Saving::None));
    let mut report = SpeedReport {
        device: device_name.to_string(),
        params: cfg.preset.gpt.num_params(),
        warmup,
        rows: Vec::new(),
    };
    for saving in order {
        let row = measure(cfg, device, saving, warmup, steps, &scratch)?;
        each(&row);
        report.rows.push(row);
        // Written after every row: a run cut short still leaves what it measured.
        report.write(&cfg.out)?;
    }
    Ok(report)
}
