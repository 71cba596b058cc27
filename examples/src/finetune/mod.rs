//! The `finetune-gpt` run: pretrain a small GPT on one text, fine-tune it on another with
//! the lower half frozen, checkpoint every N steps through [`StepSaver`], crash, restore
//! from disk, and check that the restored run continues as the lost one did.

mod breakdown;
mod log;
mod speed;
mod summary;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bitsnap_burn::{OptimizerSpec, Restored, RestoredFrom, StepSaver, StepSaverConfig};
use bitsnap_core::codec::QuantBits;
use bitsnap_core::{ErrorBudget, Lossiness, Policy, Store};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

pub use breakdown::{Breakdown, BreakdownRow};
pub use log::LossLog;
pub use speed::{Saving, SpeedReport, SpeedRow, compare, measure};
pub use summary::{CrashReport, Summary};

use crate::corpus::{Corpus, SONNETS, TRAGEDIES, VOCAB};
use crate::device::Chosen;
use crate::gpt::{Gpt, GptConfig};
use crate::loader::{DropoutSeeds, Loader, LoaderState};
use crate::report::StoreReport;
use crate::{Error, plot};

/// Steps of a process not counted in [`Summary::steps_per_s`] (startup, kernel
/// compilation).
pub const WARMUP_STEPS: u64 = 5;

/// Dropout probability of every preset: on, so that the resume check covers the device's
/// random generator.
pub const DROPOUT: f64 = 0.1;

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
    /// Persist every this many-th snapshot; the others are held in memory
    /// ([`StepSaverConfig::persist_every`]).
    #[serde(default = "one")]
    pub persist_every: u64,
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
            dropout: DROPOUT,
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
            persist_every: 1,
            pretrain_lr: lr,
            finetune_lr: lr / 10.0,
            freeze_blocks: gpt.n_layers / 2,
        }
    }
}

fn one() -> u64 {
    1
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

    fn warmup(&self) -> u64 {
        (self.pretrain_steps / 20).max(1)
    }

    fn lr(&self, step: u64) -> f64 {
        if step > self.pretrain_steps {
            return self.finetune_lr;
        }
        let warmup = self.warmup();
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
    /// Under [`PolicyChoice::LossyOptimizer`]: a fixed width for every quantized moment,
    /// or `None` for the error budget [`RunConfig::max_error`] (per tensor and save, the
    /// cheapest encoding that meets it).
    pub bits: Option<QuantBits>,
    /// Relative-L2 budget per moment tensor when [`RunConfig::bits`] is `None`.
    pub max_error: ErrorBudget,
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
    /// Hand every snapshot to the keeper on this socket ([`StepSaverConfig::with_keeper`]);
    /// the keeper owns the store (a run with a keeper never clears `checkpoints/`).
    pub keeper: Option<PathBuf>,
}

impl RunConfig {
    /// The bitsnap encoding policy of [`RunConfig::policy`] and [`RunConfig::bits`].
    pub fn bitsnap_policy(&self) -> Policy {
        match self.policy {
            PolicyChoice::Lossless => Policy::default(),
            PolicyChoice::LossyOptimizer => Policy::default().with_lossiness(match self.bits {
                Some(bits) => Lossiness::LossyOptimizer { bits },
                None => Lossiness::LossyOptimizerBudget {
                    max_error: self.max_error,
                },
            }),
        }
    }

    fn saver_config(&self) -> StepSaverConfig {
        let config = StepSaverConfig::default()
            .with_policy(self.bitsnap_policy())
            .with_optimizer(&AdamWConfig::new())
            .with_schedule(self.preset.pretrain_lr, self.preset.warmup())
            .with_persist_every(self.preset.persist_every);
        match &self.keeper {
            Some(socket) => config.with_keeper(socket),
            None => config,
        }
    }
}

/// The state a step needs: model, optimizer, where the data loader is and the stream of
/// dropout seeds. All of it goes into each snapshot.
struct State {
    step: u64,
    model: Gpt,
    optim: ModuleOptimizer,
    loader: Loader,
    seeds: DropoutSeeds,
}

/// AdamW whose restored state stays on `device` (no `BURN_DEVICE` needed).
pub(crate) fn optimizer(device: &Device) -> ModuleOptimizer {
    AdamWConfig::new().init_on(device)
}

/// The two texts and their loaders' seeds: phase 1 reads the tragedies, phase 2 the sonnets.
pub(crate) struct Texts {
    tragedies: Corpus,
    sonnets: Corpus,
}

impl Texts {
    pub(crate) fn new() -> Texts {
        Texts {
            tragedies: Corpus::new(TRAGEDIES, 0.1),
            sonnets: Corpus::new(SONNETS, 0.1),
        }
    }

    /// The text step `step` trains on.
    fn corpus(&self, preset: &Preset, step: u64) -> &Corpus {
        if step <= preset.pretrain_steps {
            &self.tragedies
        } else {
            &self.sonnets
        }
    }

    /// A fresh loader for the phase of `step`.
    pub(crate) fn loader(&self, preset: &Preset, seed: u64, step: u64) -> Loader {
        let phase_seed = if step <= preset.pretrain_steps {
            seed
        } else {
            seed ^ 0x50_4E4E_4554 // "SONNET"
        };
        Loader::new(
            self.corpus(preset, step),
            preset.gpt.context,
            preset.batch,
            phase_seed,
        )
    }
}

fn scalar(t: Tensor<1>) -> f32 {
    t.try_into_scalar::<f32>().unwrap_or(f32::NAN)
}

/// One optimizer step on the loader's next batch (dropout seeded from the state's
/// stream); returns the loss before the update.
fn train_step(mut state: State, lr: f64, corpus: &Corpus, device: &Device) -> (State, f32) {
    let batch = state.loader.next_batch(corpus, device);
    state.seeds.seed_next(device);
    let loss = state.model.loss(batch.0, batch.1);
    let value = scalar(loss.clone());
    let grads = GradientsParams::from_grads(loss.backward(), &state.model);
    state.model = state.optim.step(lr, state.model, grads);
    (state, value)
}

/// Hands the whole training state of `state` over to `saver`.
fn snapshot(saver: &StepSaver, state: &State, lr: f64) -> Result<(), Error> {
    saver
        .snapshot(state.step, &state.model, &state.optim)
        .lr(lr)
        .data_position(&state.loader.state())
        .rng("dropout", &state.seeds.state())
        .submit()?;
    Ok(())
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

/// Rebuilds the training state from a restored snapshot, for its phase.
fn into_state(
    r: Restored,
    cfg: &RunConfig,
    texts: &Texts,
    device: &Device,
) -> Result<State, Error> {
    let preset = &cfg.preset;
    let step = r.step;
    let missing = |what: &str| Error::Resume(format!("snapshot of step {step} has no {what}"));
    let position: LoaderState = r.data_position()?.ok_or_else(|| missing("data position"))?;
    let seeds: Vec<u8> = r
        .rng("dropout")?
        .ok_or_else(|| missing("dropout seed stream"))?;
    let mut model = preset
        .gpt
        .init(device)
        .try_load_record(r.model)
        .map_err(|e| Error::Resume(format!("model record of step {step}: {e}")))?;
    if step > preset.pretrain_steps {
        model = model.freeze_lower(preset.freeze_blocks);
    }
    Ok(State {
        step,
        model,
        optim: optimizer(device).load_record(r.optimizer),
        loader: Loader::restore(
            texts.corpus(preset, step),
            preset.gpt.context,
            preset.batch,
            &position,
        )?,
        seeds: DropoutSeeds::restore(&seeds)?,
    })
}

/// Restores the latest snapshot of `saver` into a training state for its phase; returns
/// where it came from and how long it took too.
fn restore(
    saver: &StepSaver,
    cfg: &RunConfig,
    texts: &Texts,
    device: &Device,
) -> Result<Option<(State, RestoredFrom, Duration)>, Error> {
    let started = Instant::now();
    let Some(r) = saver.latest()? else {
        return Ok(None);
    };
    let from = r.from;
    let state = into_state(r, cfg, texts, device)?;
    Ok(Some((state, from, started.elapsed())))
}

/// Where a restore came from, in words.
fn from_name(from: RestoredFrom) -> &'static str {
    match from {
        RestoredFrom::Memory => "memory (this process)",
        RestoredFrom::Keeper => "memory (keeper)",
        _ => "disk",
    }
}

/// Phase 2 starts from phase 1's last checkpoint (read from the store), with the lower
/// blocks frozen, a fresh optimizer and a loader over the sonnets; the dropout stream
/// continues.
fn begin_finetune(
    saver: &StepSaver,
    cfg: &RunConfig,
    texts: &Texts,
    seeds: DropoutSeeds,
    device: &Device,
) -> Result<State, Error> {
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
        optim: optimizer(device),
        loader: texts.loader(&cfg.preset, cfg.seed, p + 1),
        seeds,
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
    if !cfg.resume && cfg.keeper.is_none() && ckpt_dir.exists() {
        // A fresh run: the previous run's checkpoints in this example's own directory go.
        std::fs::remove_dir_all(&ckpt_dir).map_err(Error::io(&ckpt_dir))?;
    }
    let mut log = LossLog::open(&cfg.out.join("losses.tsv"), cfg.resume)?;
    let texts = Texts::new();
    device.seed(cfg.seed);

    let mut saver = StepSaver::open(&ckpt_dir, cfg.saver_config())?;
    let mut replay = Replay::default();
    let mut crash: Option<CrashReport> = None;
    let mut earlier_saves = Vec::new();
    let resumed = match cfg.resume {
        true => {
            let restored = restore(&saver, cfg, &texts, device)?;
            if let Some((s, from, took)) = &restored {
                replay.lost = log.truncate_after(s.step)?;
                println!(
                    "resumed step {} from {} in {:.0} ms",
                    s.step,
                    from_name(*from),
                    ms(*took)
                );
                crash = Some(CrashReport {
                    crashed_after: replay.lost.keys().last().copied().unwrap_or(s.step),
                    restored_step: s.step,
                    restore_ms: ms(*took),
                    from_memory: *from != RestoredFrom::Disk,
                    restored_from: from_name(*from).into(),
                    simulated: false,
                    replayed: 0,
                    identical: 0,
                    max_rel_diff: 0.0,
                });
            }
            restored.map(|(s, _, _)| s)
        }
        false => None,
    };
    let mut state = match resumed {
        Some(s) => s,
        None => State {
            step: 0,
            model: preset.gpt.init(device),
            optim: optimizer(device),
            loader: texts.loader(&preset, cfg.seed, 1),
            seeds: DropoutSeeds::new(cfg.seed),
        },
    };
    let mut stalls: BTreeMap<u64, f64> = BTreeMap::new();
    let mut phase2_start_ms = None;
    // Training time of the steps after the first few of this process (startup, kernel
    // compilation): steps and snapshot calls, not the phase switch, the crash or restores.
    let (first_timed, mut timed_steps, mut timed) =
        (state.step + WARMUP_STEPS, 0u64, Duration::ZERO);
    let bar = progress(cfg, total, state.step);
    while state.step < total {
        let step = state.step + 1;
        let step_started = Instant::now();
        if step == p + 1 {
            let t = Instant::now();
            state = begin_finetune(&saver, cfg, &texts, state.seeds, device)?;
            phase2_start_ms = Some(ms(t.elapsed()));
        }
        let step_started = if step == p + 1 {
            Instant::now()
        } else {
            step_started
        };
        let lr = preset.lr(step);
        let (next, loss) = train_step(state, lr, texts.corpus(&preset, step), device);
        state = next;
        state.step = step;
        log.push(step, loss)?;
        replay.check(step, loss);
        if step % every == 0 || step == p || step == total {
            let t = Instant::now();
            snapshot(&saver, &state, lr)?;
            if step == p {
                // Phase 2 starts from this snapshot and the evaluation reads it: make it
                // durable (a snapshot held in memory, by this saver or a keeper, may be
                // replaced by the next one before it is persisted).
                saver.flush()?;
            }
            stalls.insert(step, ms(t.elapsed()));
        }
        if step > first_timed {
            timed_steps += 1;
            timed += step_started.elapsed();
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
            // The statistics of the saves completed before the crash (one still being
            // written is not counted): the summary's means are over the whole run.
            earlier_saves = saver.stats();
            drop(saver);
            bar.println(format!(
                "simulated crash after step {step}; restoring from {}",
                ckpt_dir.display()
            ));
            let t = Instant::now();
            saver = StepSaver::open(&ckpt_dir, cfg.saver_config())?;
            let (restored, from, _) = restore(&saver, cfg, &texts, device)?
                .ok_or_else(|| Error::Resume("no snapshot to restore after the crash".into()))?;
            let restore_ms = ms(t.elapsed());
            replay.lost = log.truncate_after(restored.step)?;
            bar.println(format!(
                "restored step {} from {} in {restore_ms:.0} ms; replaying {} steps",
                restored.step,
                from_name(from),
                replay.lost.len()
            ));
            bar.set_position(restored.step);
            crash = Some(CrashReport {
                crashed_after: step,
                restored_step: restored.step,
                restore_ms,
                from_memory: from != RestoredFrom::Disk,
                restored_from: from_name(from).into(),
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
    let mut saves = earlier_saves;
    saves.extend(saver.stats());
    saver.close()?;
    if let Some(c) = crash.as_mut() {
        c.replayed = replay.compared;
        c.identical = replay.identical;
        c.max_rel_diff = replay.max_rel_diff;
    }

    // Evaluations: phase 1's checkpoint and the final model, on held-out text of both.
    let plain = device.clone().without_autodiff();
    let valid_sonnets = texts
        .sonnets
        .valid_batches(4, preset.batch, preset.gpt.context, &plain);
    let valid_tragedies =
        texts
            .tragedies
            .valid_batches(4, preset.batch, preset.gpt.context, &plain);
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
    let breakdown = Breakdown::read(&ckpt_dir, &preset)?;
    let summary = Summary {
        device: chosen.name.clone(),
        device_reason: chosen.reason.clone(),
        preset,
        params: preset.gpt.num_params(),
        frozen_params: frozen_params(&state.model, preset.freeze_blocks),
        policy: cfg.policy,
        bits: match cfg.policy {
            PolicyChoice::Lossless => None,
            PolicyChoice::LossyOptimizer => cfg.bits.map(|b| b.bits()),
        },
        max_error: match (cfg.policy, cfg.bits) {
            (PolicyChoice::LossyOptimizer, None) => Some(cfg.max_error.rel_l2()),
            _ => None,
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
        breakdown,
        wall_seconds: started.elapsed().as_secs_f64(),
        steps_per_s: timed_steps as f64 / timed.as_secs_f64().max(1e-9),
        timed_steps,
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
        let step: u64 = bitsnap_burn::snapshot_step(&info.name).unwrap_or(0);
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
