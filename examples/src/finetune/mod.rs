//! The `finetune-gpt` run: pretrain a small GPT on one text, fine-tune it on another with
//! the lower half frozen, checkpoint every N steps through [`StepSaver`], crash, restore
//! from disk, and check that the restored run continues as the lost one did.

mod log;
mod summary;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bitsnap_burn::{StepSaver, StepSaverConfig};
use bitsnap_core::codec::QuantBits;
use bitsnap_core::{Lossiness, Policy, Store};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

pub use log::LossLog;
pub use summary::{CrashReport, Summary};

use crate::corpus::{Corpus, SONNETS, TRAGEDIES, VOCAB};
use crate::device::Chosen;
use crate::gpt::{Gpt, GptConfig};
use crate::report::StoreReport;
use crate::{Error, plot};

/// Model and schedule sizes, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum PresetName {
    /// Seconds, for tests and CI: 2 blocks of width 32.
    Smoke,
    /// The default: a few minutes on a 2-core CPU.
    Cpu,
    /// About 26M parameters (8 blocks of width 512, context 256): for a real GPU.
    #[value(name = "gpu-26m")]
    #[serde(rename = "gpu-26m")]
    Gpu26m,
    /// About 85M parameters (12 blocks of width 768, context 256): for a large GPU.
    #[value(name = "gpu-85m")]
    #[serde(rename = "gpu-85m")]
    Gpu85m,
}

/// Everything a preset fixes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Preset {
    /// Its name.
    pub name: PresetName,
    /// The model.
    pub gpt: GptConfig,
    /// Sequences per batch.
    pub batch: usize,
    /// Phase 1 steps (tragedies).
    pub pretrain_steps: u64,
    /// Phase 2 steps (sonnets).
    pub finetune_steps: u64,
    /// A snapshot every this many steps (and at the end of each phase).
    pub checkpoint_every: u64,
    /// Phase 1 learning rate (after a linear warm-up over the first 5% of its steps).
    pub pretrain_lr: f64,
    /// Phase 2 learning rate.
    pub finetune_lr: f64,
    /// Transformer blocks frozen in phase 2 (from the bottom), besides the embeddings.
    pub freeze_blocks: usize,
}

impl PresetName {
    /// The preset's settings.
    pub fn preset(self) -> Preset {
        let gpt = |d_model, n_heads, n_layers, context| GptConfig {
            vocab: VOCAB,
            d_model,
            n_heads,
            n_layers,
            context,
        };
        let (gpt, batch, p, f, every, lr) = match self {
            PresetName::Smoke => (gpt(32, 2, 2, 32), 4, 16, 12, 4, 3e-3),
            PresetName::Cpu => (gpt(128, 4, 4, 64), 16, 400, 200, 40, 2e-3),
            PresetName::Gpu26m => (gpt(512, 8, 8, 256), 32, 2000, 600, 200, 6e-4),
            PresetName::Gpu85m => (gpt(768, 12, 12, 256), 32, 2000, 600, 200, 3e-4),
        };
        Preset {
            name: self,
            gpt,
            batch,
            pretrain_steps: p,
            finetune_steps: f,
            checkpoint_every: every,
            pretrain_lr: lr,
            finetune_lr: lr / 10.0,
            freeze_blocks: gpt.n_layers / 2,
        }
    }
}

impl Preset {
    /// Last step of the run.
    pub fn total_steps(&self) -> u64 {
        self.pretrain_steps + self.finetune_steps
    }

    /// Default crash: two thirds into the fine-tune, a little past a checkpoint, so the
    /// restored run must replay the steps since.
    pub fn default_crash(&self) -> u64 {
        let every = self.checkpoint_every.max(1);
        let at = self.pretrain_steps + self.finetune_steps * 2 / 3;
        ((at / every) * every + (every * 3 / 5).max(1)).min(self.total_steps().saturating_sub(1))
    }

    fn lr(&self, step: u64) -> f64 {
        if step > self.pretrain_steps {
            return self.finetune_lr;
        }
        let warmup = (self.pretrain_steps / 20).max(1);
        self.pretrain_lr * (step.min(warmup) as f64 / warmup as f64)
    }
}

/// Checkpoint encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum PolicyChoice {
    /// Bit-exact.
    Lossless,
    /// Optimizer moments quantized (cluster codebooks); weights bit-exact.
    LossyOptimizer,
}

/// One run's settings.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Sizes and schedule.
    pub preset: Preset,
    /// Checkpoint encoding.
    pub policy: PolicyChoice,
    /// Bits per quantized moment under [`PolicyChoice::LossyOptimizer`].
    pub bits: QuantBits,
    /// Simulate a crash after this step (`None`: run through).
    pub crash_at: Option<u64>,
    /// Continue the run in `out` from its latest snapshot instead of starting over.
    pub resume: bool,
    /// Output directory: `checkpoints/`, `losses.tsv`, `summary.json`, `summary.md`, `finetune-gpt.png`.
    pub out: PathBuf,
    /// Seed of the initialisation and of the batch order.
    pub seed: u64,
    /// Stop abruptly after this step, as a killed process would: queued saves are
    /// abandoned mid-way and [`run`] returns [`Error::Stopped`] (`--resume` continues).
    pub stop_after: Option<u64>,
    /// Draw progress bars.
    pub progress: bool,
}

impl RunConfig {
    fn bitsnap_policy(&self) -> Policy {
        match self.policy {
            PolicyChoice::Lossless => Policy::default(),
            PolicyChoice::LossyOptimizer => {
                Policy::default().with_lossiness(Lossiness::LossyOptimizer { bits: self.bits })
            }
        }
    }

    fn saver_config(&self) -> StepSaverConfig {
        StepSaverConfig::default().with_policy(self.bitsnap_policy())
    }
}

/// The state a step needs.
struct State {
    step: u64,
    model: Gpt,
    optim: ModuleOptimizer,
}

fn optimizer() -> ModuleOptimizer {
    AdamWConfig::new().init()
}

fn scalar(t: Tensor<1>) -> f32 {
    t.try_into_scalar::<f32>().unwrap_or(f32::NAN)
}

/// One optimizer step on `batch`; returns the loss before the update.
fn train_step(state: State, lr: f64, batch: (Tensor<2, Int>, Tensor<2, Int>)) -> (State, f32) {
    let State {
        step,
        model,
        mut optim,
    } = state;
    let loss = model.loss(batch.0, batch.1);
    let value = scalar(loss.clone());
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let model = optim.step(lr, model, grads);
    (State { step, model, optim }, value)
}

/// Mean loss over the validation batches (made on the device without autodiff).
fn evaluate(model: &Gpt, batches: &[(Tensor<2, Int>, Tensor<2, Int>)]) -> f32 {
    let model = model.valid();
    let total: f32 = batches
        .iter()
        .map(|(x, y)| scalar(model.loss(x.clone(), y.clone())))
        .sum();
    total / batches.len().max(1) as f32
}

/// Restores the latest snapshot of `saver` into a model and optimizer for its phase.
fn restore(saver: &StepSaver, cfg: &RunConfig, device: &Device) -> Result<Option<State>, Error> {
    let Some(r) = saver.latest()? else {
        return Ok(None);
    };
    let preset = &cfg.preset;
    let mut model = preset
        .gpt
        .init(device)
        .try_load_record(r.model)
        .map_err(|e| Error::Resume(format!("model record of step {}: {e}", r.step)))?;
    if r.step > preset.pretrain_steps {
        model = model.freeze_lower(preset.freeze_blocks);
    }
    Ok(Some(State {
        step: r.step,
        model,
        optim: optimizer().load_record(r.optimizer),
    }))
}

/// Phase 2 starts from phase 1's last checkpoint (read from the store), with the lower
/// blocks frozen and a fresh optimizer.
fn begin_finetune(saver: &StepSaver, cfg: &RunConfig, device: &Device) -> Result<State, Error> {
    let p = cfg.preset.pretrain_steps;
    let r = saver.restore(p)?;
    let model = cfg
        .preset
        .gpt
        .init(device)
        .try_load_record(r.model)
        .map_err(|e| Error::Resume(format!("model record of step {p}: {e}")))?
        .freeze_lower(cfg.preset.freeze_blocks);
    Ok(State {
        step: p,
        model,
        optim: optimizer(),
    })
}

/// How the replayed steps compare with the ones the crash lost.
#[derive(Debug, Default)]
struct Replay {
    lost: BTreeMap<u64, f32>,
    compared: u64,
    identical: u64,
    max_rel_diff: f64,
}

impl Replay {
    fn check(&mut self, step: u64, loss: f32) {
        if let Some(before) = self.lost.remove(&step) {
            self.compared += 1;
            if before.to_bits() == loss.to_bits() {
                self.identical += 1;
            }
            let rel = ((loss - before) / before).abs() as f64;
            self.max_rel_diff =
                self.max_rel_diff
                    .max(if rel.is_nan() { f64::INFINITY } else { rel });
        }
    }
}

fn progress(cfg: &RunConfig, total: u64, from: u64) -> ProgressBar {
    if !cfg.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(from);
    bar
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs the whole example and returns its measured summary (also written to
/// `summary.json` and `summary.md` in `cfg.out`, with the plot `finetune-gpt.png`).
pub fn run(cfg: &RunConfig, chosen: &Chosen) -> Result<Summary, Error> {
    let started = Instant::now();
    let device = &chosen.device;
    let preset = cfg.preset;
    let (p, total, every) = (
        preset.pretrain_steps,
        preset.total_steps(),
        preset.checkpoint_every.max(1),
    );
    if let Some(c) = cfg.crash_at
        && (c == 0 || c >= total)
    {
        return Err(Error::Usage(format!("--crash-at must be in 1..{total}")));
    }
    let ckpt_dir = cfg.out.join("checkpoints");
    std::fs::create_dir_all(&cfg.out).map_err(Error::io(&cfg.out))?;
    if !cfg.resume && ckpt_dir.exists() {
        // A fresh run: the previous run's checkpoints in this example's own directory go.
        std::fs::remove_dir_all(&ckpt_dir).map_err(Error::io(&ckpt_dir))?;
    }
    let mut log = LossLog::open(&cfg.out.join("losses.tsv"), cfg.resume)?;
    let tragedies = Corpus::new(TRAGEDIES, 0.1);
    let sonnets = Corpus::new(SONNETS, 0.1);
    let corpus = |step: u64| if step <= p { &tragedies } else { &sonnets };
    device.seed(cfg.seed);

    let mut saver = StepSaver::open(&ckpt_dir, cfg.saver_config())?;
    let mut replay = Replay::default();
    let mut crash: Option<CrashReport> = None;
    let resumed = match cfg.resume {
        true => {
            let t = Instant::now();
            let restored = restore(&saver, cfg, device)?;
            if let Some(s) = &restored {
                replay.lost = log.truncate_after(s.step)?;
                crash = Some(CrashReport {
                    crashed_after: replay.lost.keys().last().copied().unwrap_or(s.step),
                    restored_step: s.step,
                    restore_ms: ms(t.elapsed()),
                    from_memory: false,
                    simulated: false,
                    replayed: 0,
                    identical: 0,
                    max_rel_diff: 0.0,
                });
            }
            restored
        }
        false => None,
    };
    let mut state = match resumed {
        Some(s) => s,
        None => State {
            step: 0,
            model: preset.gpt.init(device),
            optim: optimizer(),
        },
    };
    let mut stalls: BTreeMap<u64, f64> = BTreeMap::new();
    let mut phase2_start_ms = None;
    let bar = progress(cfg, total, state.step);
    while state.step < total {
        let step = state.step + 1;
        if step == p + 1 {
            let t = Instant::now();
            state = begin_finetune(&saver, cfg, device)?;
            phase2_start_ms = Some(ms(t.elapsed()));
        }
        let batch = corpus(step).batch(cfg.seed, step, preset.batch, preset.gpt.context, device);
        let (next, loss) = train_step(state, preset.lr(step), batch);
        state = next;
        state.step = step;
        log.push(step, loss)?;
        replay.check(step, loss);
        if step % every == 0 || step == p || step == total {
            let t = Instant::now();
            saver.snapshot(step, &state.model, &state.optim).submit()?;
            stalls.insert(step, ms(t.elapsed()));
        }
        bar.set_position(step);
        bar.set_message(format!(
            "{} loss {loss:.3}",
            if step <= p { "pretrain" } else { "fine-tune" }
        ));
        if cfg.stop_after == Some(step) {
            bar.abandon();
            // No close, no flush: the background thread is left mid-save, as in a crash.
            std::mem::forget(saver);
            return Err(Error::Stopped(step));
        }
        if cfg.crash_at == Some(step) && crash.is_none() {
            // The crash: model, optimizer and saver are gone (dropping the saver lets its
            // queued save finish, as a process that died just after it would have). A new
            // saver reopens the store from disk and restores its latest snapshot.
            drop(state);
            drop(saver);
            bar.println(format!(
                "simulated crash after step {step}; restoring from {}",
                ckpt_dir.display()
            ));
            let t = Instant::now();
            saver = StepSaver::open(&ckpt_dir, cfg.saver_config())?;
            let restored = restore(&saver, cfg, device)?
                .ok_or_else(|| Error::Resume("no snapshot to restore after the crash".into()))?;
            let restore_ms = ms(t.elapsed());
            replay.lost = log.truncate_after(restored.step)?;
            bar.println(format!(
                "restored step {} in {restore_ms:.0} ms; replaying {} steps",
                restored.step,
                replay.lost.len()
            ));
            bar.set_position(restored.step);
            crash = Some(CrashReport {
                crashed_after: step,
                restored_step: restored.step,
                restore_ms,
                from_memory: false,
                simulated: true,
                replayed: 0,
                identical: 0,
                max_rel_diff: 0.0,
            });
            state = restored;
        }
    }
    bar.finish_and_clear();
    saver.flush()?;
    let saves = saver.stats();
    saver.close()?;
    if let Some(c) = crash.as_mut() {
        c.replayed = replay.compared;
        c.identical = replay.identical;
        c.max_rel_diff = replay.max_rel_diff;
    }

    // Evaluations: phase 1's checkpoint and the final model, on held-out text of both.
    let plain = device.clone().without_autodiff();
    let valid_sonnets = sonnets.valid_batches(4, preset.batch, preset.gpt.context, &plain);
    let valid_tragedies = tragedies.valid_batches(4, preset.batch, preset.gpt.context, &plain);
    let pretrained = {
        let saver = StepSaver::open(&ckpt_dir, cfg.saver_config())?;
        let r = saver.restore(p)?;
        preset
            .gpt
            .init(device)
            .try_load_record(r.model)
            .map_err(|e| Error::Resume(format!("model record of step {p}: {e}")))?
    };
    let report = StoreReport::read(&ckpt_dir)?;
    let frozen = frozen_unchanged(&ckpt_dir, &preset)?;
    let summary = Summary {
        device: chosen.name.clone(),
        device_reason: chosen.reason.clone(),
        preset,
        params: preset.gpt.num_params(),
        frozen_params: frozen_params(&state.model, preset.freeze_blocks),
        policy: cfg.policy,
        bits: match cfg.policy {
            PolicyChoice::Lossless => None,
            PolicyChoice::LossyOptimizer => Some(cfg.bits.bits()),
        },
        losses: log.losses().iter().map(|(s, l)| (*s, *l)).collect(),
        eval_sonnets_before: evaluate(&pretrained, &valid_sonnets),
        eval_sonnets_after: evaluate(&state.model, &valid_sonnets),
        eval_tragedies_before: evaluate(&pretrained, &valid_tragedies),
        eval_tragedies_after: evaluate(&state.model, &valid_tragedies),
        stalls_ms: stalls,
        readback_ms: saves.iter().map(|s| ms(s.readback)).collect(),
        encode_write_ms: saves.iter().map(|s| ms(s.encode_write)).collect(),
        phase2_start_ms,
        crash,
        frozen_unchanged: frozen,
        store: report,
        wall_seconds: started.elapsed().as_secs_f64(),
        plot: cfg.out.join("finetune-gpt.png"),
    };
    plot::draw(&summary, &summary.plot)?;
    summary.write(&cfg.out)?;
    Ok(summary)
}

/// Parameters frozen by [`Gpt::freeze_lower`].
fn frozen_params(model: &Gpt, blocks: usize) -> usize {
    use burn::train::checkpoint::Checkpoint;
    let Ok(bytes) = model.clone().into_record().checkpoint_into_bytes() else {
        return 0;
    };
    let Ok(reader) = burn::store::burn_pack::Reader::from_bytes(bytes) else {
        return 0;
    };
    let Ok(tensors) = reader.into_tensors() else {
        return 0;
    };
    tensors
        .iter()
        .filter(|t| Gpt::is_frozen(&t.name, blocks))
        .map(|t| t.shape.iter().product::<usize>())
        .sum()
}

/// In phase 2's delta snapshots, how many frozen weight tensors were stored `unchanged`,
/// out of how many frozen weight tensors they hold.
fn frozen_unchanged(dir: &Path, preset: &Preset) -> Result<(u64, u64), Error> {
    let store = Store::open(dir)?;
    let (mut unchanged, mut frozen) = (0, 0);
    for info in store.snapshots() {
        let step: u64 = info
            .name
            .strip_prefix("step-")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if step <= preset.pretrain_steps || info.base.is_none() {
            continue;
        }
        for e in store.header(info.id)?.entries {
            if let Some(name) = e.name.strip_prefix("model/")
                && Gpt::is_frozen(name, preset.freeze_blocks)
            {
                frozen += 1;
                if e.codec == bitsnap_core::codec::CodecId::Unchanged {
                    unchanged += 1;
                }
            }
        }
    }
    Ok((unchanged, frozen))
}
