//! The whole training state through `StepSaver`: a run with dropout on, a shuffled data
//! loader and an LR schedule resumes bit for bit; the optimizer's state lands on the
//! model's device without `BURN_DEVICE`; every-step snapshots held in memory.

use std::sync::Mutex;

use bitsnap_burn::{
    OptimizerSpec, Restored, RestoredFrom, StepSaver, StepSaverConfig, optimizer_on,
};
use burn::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::lr_scheduler::module_lr_scheduler::ModuleLrScheduler;
use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::optim::{
    AdamW, AdamWConfig, AdamWState, GradientsParams, LearningRate, ModuleOptimizer, Optimizer,
};
use burn::tensor::{Device, Tensor, TensorData, activation::relu};

const BATCH: usize = 16;
const SAMPLES: usize = 64;
const STEPS: u64 = 24;
const SAVE_EVERY: u64 = 6;
const RESUME_AT: u64 = 14;
const RUN_SEED: u64 = 1000;

#[derive(Module, Debug)]
struct Net {
    a: Linear,
    drop: Dropout,
    b: Linear,
}

impl Net {
    fn new(device: &Device) -> Net {
        // Burn's generator draws the initial weights: seed it so both runs start equal.
        device.seed(7);
        Net {
            a: LinearConfig::new(8, 32).init(device),
            drop: DropoutConfig::new(0.3).init(),
            b: LinearConfig::new(32, 1).init(device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.b.forward(self.drop.forward(relu(self.a.forward(x))))
    }
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// A shuffling data loader whose whole state is an RNG state and a position.
struct Loader {
    rng: u64,
    /// The RNG state the current epoch's order was drawn from.
    epoch_rng: u64,
    order: Vec<usize>,
    epoch: u64,
    batch: usize,
}

impl Loader {
    fn new(seed: u64) -> Loader {
        Loader::resume(seed, (0, 0))
    }

    fn resume(epoch_rng: u64, (epoch, batch): (u64, usize)) -> Loader {
        let mut l = Loader {
            rng: epoch_rng,
            epoch_rng,
            order: Vec::new(),
            epoch,
            batch,
        };
        l.shuffle();
        l
    }

    fn shuffle(&mut self) {
        self.epoch_rng = self.rng;
        self.order = (0..SAMPLES).collect();
        for i in (1..SAMPLES).rev() {
            let j = (xorshift(&mut self.rng) % (i as u64 + 1)) as usize;
            self.order.swap(i, j);
        }
    }

    fn next(&mut self, device: &Device) -> (Tensor<2>, Tensor<2>) {
        if self.batch * BATCH == SAMPLES {
            self.epoch += 1;
            self.batch = 0;
            self.shuffle();
        }
        let ids = &self.order[self.batch * BATCH..(self.batch + 1) * BATCH];
        self.batch += 1;
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for &i in ids {
            let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64 + 1);
            let row: Vec<f32> = (0..8)
                .map(|_| (xorshift(&mut s) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                .collect();
            ys.push(
                row.iter()
                    .enumerate()
                    .map(|(j, v)| v * j as f32)
                    .sum::<f32>()
                    .sin(),
            );
            xs.extend(row);
        }
        (
            Tensor::from_data(TensorData::new(xs, [BATCH, 8]), device),
            Tensor::from_data(TensorData::new(ys, [BATCH, 1]), device),
        )
    }
}

struct Run {
    model: Net,
    optim: ModuleOptimizer,
    sched: ModuleLrScheduler,
    loader: Loader,
    step: u64,
}

fn adamw() -> AdamWConfig {
    AdamWConfig::new().with_weight_decay(1e-2)
}

fn scheduler() -> ModuleLrScheduler {
    LinearLrSchedulerConfig::new(1e-2, 1e-3, 40)
        .init()
        .expect("a valid schedule")
}

impl Run {
    fn new(device: &Device) -> Run {
        Run {
            model: Net::new(device),
            optim: adamw().init_on(device),
            sched: scheduler(),
            loader: Loader::new(0xDEAD_BEEF),
            step: 0,
        }
    }

    /// The resume recipe of `bitsnap_burn::saver`'s documentation.
    fn resumed(r: Restored, device: &Device) -> Run {
        let epoch_rng: u64 = r.rng("data").unwrap().expect("data rng");
        let position: (u64, usize) = r.data_position().unwrap().expect("data position");
        Run {
            model: Net::new(device).load_record(r.model),
            optim: adamw().init_on(device).load_record(r.optimizer),
            sched: scheduler().load_record(r.scheduler.expect("scheduler record")),
            loader: Loader::resume(epoch_rng, position),
            step: r.step,
        }
    }

    /// One step; returns the loss and the learning rate it used.
    fn step(&mut self, device: &Device) -> (f32, LearningRate) {
        self.step += 1;
        device.seed(RUN_SEED ^ self.step);
        let (x, y) = self.loader.next(device);
        let loss = (self.model.forward(x) - y).powf_scalar(2.0).mean();
        let value = loss.clone().into_data().try_to_vec::<f32>().unwrap()[0];
        let grads = GradientsParams::from_grads(loss.backward(), &self.model);
        let lr = self.sched.step();
        let base = lr.base();
        let model = self.model.clone();
        self.model = self.optim.step(lr, model, grads);
        (value, base)
    }

    fn snapshot(&self, saver: &StepSaver, lr: LearningRate) {
        saver
            .snapshot(self.step, &self.model, &self.optim)
            .lr(lr)
            .scheduler(self.sched.to_record())
            .rng("data", &self.loader.epoch_rng)
            .data_position(&(self.loader.epoch, self.loader.batch))
            .metadata(&serde_json::json!({ "run": "training_state", "step": self.step }))
            .submit()
            .expect("submit");
    }
}

/// Every test here trains with dropout, seeding the CPU device's one random generator
/// each step (`device.seed`): tests running at the same time on that shared device would
/// draw each other's masks. Each test holds this lock while it trains.
static DEVICE_RNG: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    DEVICE_RNG.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn dropout_shuffled_loader_and_schedule_resume_bit_exactly() {
    let _serial = serial();
    let device = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let config = StepSaverConfig::default()
        .with_optimizer(&adamw())
        .with_schedule(1e-2, 0);
    let saver = StepSaver::open(dir.path(), config.clone()).unwrap();
    let mut run = Run::new(&device);
    let mut losses = Vec::new();
    let mut lrs = Vec::new();
    for _ in 0..STEPS {
        let (loss, lr) = run.step(&device);
        losses.push(loss);
        lrs.push(lr);
        if run.step.is_multiple_of(SAVE_EVERY) || run.step == RESUME_AT {
            run.snapshot(&saver, lr);
        }
    }
    saver.flush().unwrap();
    // `init_on`'s optimizer hands its AdamW moments to the read-back transaction: this
    // resume goes through that path (two moments for each of the four parameters, none
    // read the Burn way).
    for s in saver.stats() {
        assert_eq!(s.read.optimizer_in_transaction, 2 * 4, "step {}", s.step);
        assert_eq!(
            s.read.optimizer_bytes,
            2 * s.read.model_bytes,
            "{:?}",
            s.read
        );
    }
    saver.close().unwrap();

    // Dropout is on: the same step with another seed gives another loss.
    let mut other = Run::new(&device);
    other.step = 1000;
    assert_ne!(other.step(&device).0, losses[0], "dropout draws nothing");

    // From disk, in a new saver: every piece of the state comes back.
    let saver = StepSaver::open(dir.path(), config).unwrap();
    let r = saver.restore(RESUME_AT).unwrap();
    assert_eq!(r.from, RestoredFrom::Disk);
    assert_eq!(r.lr(), Some(lrs[RESUME_AT as usize - 1]));
    let meta = |k: &str| {
        r.metadata
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(meta("bitsnap.step").as_deref(), Some("14"));
    assert_eq!(meta("bitsnap.optimizer"), adamw().replay_rule());
    assert_eq!(meta("bitsnap.peak_lr").as_deref(), Some("0.01"));
    assert_eq!(meta("bitsnap.warmup_steps").as_deref(), Some("0"));
    // The replay codec pairs each parameter with its Adam moments by these rules.
    let derive = meta("bitsnap.derive").expect("replay pairing rules");
    let rules: Vec<&str> = derive.split(';').collect();
    assert!(rules.len() >= 2, "{derive}");
    assert!(
        rules.iter().all(|r| r.starts_with("replay:model/")
            && r.contains("=optim/")
            && r.contains(".moment_1,optim/")
            && r.ends_with(".moment_2")),
        "{derive}"
    );
    let user: serde_json::Value = r.user_metadata().unwrap().unwrap();
    assert_eq!(user["step"], 14);
    let mut resumed = Run::resumed(r, &device);
    let tail: Vec<f32> = (RESUME_AT..STEPS)
        .map(|_| resumed.step(&device).0)
        .collect();
    assert_eq!(
        tail,
        losses[RESUME_AT as usize..],
        "losses after the resume differ from the uninterrupted run's"
    );
}

/// Devices the probe's optimizer state was on when a step moved it.
static STATE_DEVICES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// AdamW that notes where its state is each time a step brings it to the gradient.
#[derive(Clone)]
struct Probe(AdamW);

impl Optimizer for Probe {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        self.0.step(lr, tensor, grad, state)
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        STATE_DEVICES
            .lock()
            .unwrap()
            .push(format!("{:?}", state.momentum.moment_1.device()));
        AdamW::to_device(state, device)
    }
}

/// CPU training in a build with a GPU backend (wgpu, lavapipe in CI): the restored
/// optimizer state is on the CPU device before the first step, with `BURN_DEVICE` unset.
#[test]
fn restored_optimizer_state_is_on_the_models_device_without_burn_device() {
    let _serial = serial();
    assert!(
        std::env::var_os("BURN_DEVICE").is_none(),
        "this test checks placement without BURN_DEVICE: unset it"
    );
    // Burn's own load_record would build the state here: not the CPU device.
    assert_ne!(Device::default(), Device::flex());
    let device = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let saver = StepSaver::open(dir.path(), StepSaverConfig::default()).unwrap();
    let probe = || optimizer_on(Probe(AdamWConfig::new().build()), None, &device);
    let mut run = Run::new(&device);
    run.optim = probe();
    for _ in 0..3 {
        run.step(&device);
    }
    run.snapshot(&saver, 1e-2);
    let r = saver.latest().unwrap().unwrap();
    let mut resumed = Run::resumed(r, &device);
    resumed.optim = probe().load_record(saver.restore(3).unwrap().optimizer);
    STATE_DEVICES.lock().unwrap().clear();
    resumed.step(&device);
    let seen = STATE_DEVICES.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "one state per parameter: {seen:?}");
    let flex = format!("{:?}", Device::flex());
    assert!(
        seen.iter().all(|d| *d == flex),
        "restored state on {seen:?}, the model is on {flex}"
    );
}

/// Every-step snapshots persisted every 4th: the others are held in memory, the latest
/// restores from memory, and `flush` persists it.
#[test]
fn every_step_snapshots_are_held_in_memory_and_persisted_every_nth() {
    let _serial = serial();
    let device = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let saver = StepSaver::open(
        dir.path(),
        StepSaverConfig::default()
            .with_persist_every(4)
            .with_memory_budget(1),
    )
    .unwrap();
    let mut run = Run::new(&device);
    let mut losses = Vec::new();
    for _ in 0..6 {
        let (loss, lr) = run.step(&device);
        losses.push(loss);
        run.snapshot(&saver, lr);
    }
    let latest = saver.latest().unwrap().unwrap();
    assert_eq!((latest.step, latest.from), (6, RestoredFrom::Memory));
    assert_eq!(
        saver.steps(),
        vec![4],
        "only the 4th snapshot is persisted yet"
    );
    let stats = saver.stats();
    assert_eq!(
        stats.iter().map(|s| s.persisted).collect::<Vec<_>>(),
        [false, false, false, true, false, false]
    );
    // A resume from the held snapshot continues as the run does.
    let mut resumed = Run::resumed(latest, &device);
    let mut again = run;
    assert_eq!(resumed.step(&device), again.step(&device));
    saver.flush().unwrap();
    assert_eq!(saver.steps(), vec![4, 6]);
    drop(saver);
    let reopened = StepSaver::open(dir.path(), StepSaverConfig::default()).unwrap();
    let r = reopened.restore(6).unwrap();
    assert_eq!(r.from, RestoredFrom::Disk);
}

/// With a keeper: a trainer that dies after handing snapshots over (nothing persisted
/// yet) restarts from the keeper's memory, continues exactly, and once the keeper is gone
/// the disk answers with what the keeper persisted on shutdown.
#[test]
fn a_restarted_trainer_restores_from_the_keeper_then_from_disk() {
    let _serial = serial();
    use bitsnap_core::keeper::{Keeper, KeeperOptions};
    let device = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("steps");
    let socket = dir.path().join("keeper.sock");
    let store = bitsnap_core::Store::open_or_create(&store_dir, Default::default()).unwrap();
    // Persist only on flush and shutdown: a restore before that cannot come from disk.
    let keeper = Keeper::spawn(
        store,
        &socket,
        KeeperOptions::default().with_persist_every(0),
    )
    .unwrap();
    let config = StepSaverConfig::default()
        .with_keeper(&socket)
        .with_optimizer(&adamw());

    let saver = StepSaver::open(&store_dir, config.clone()).unwrap();
    let mut run = Run::new(&device);
    let mut losses = Vec::new();
    for _ in 0..RESUME_AT {
        let (loss, lr) = run.step(&device);
        losses.push(loss);
        run.snapshot(&saver, lr);
    }
    // Wait until every snapshot is with the keeper, then lose the trainer's memory
    // without any flush (as a killed process would).
    while saver.stats().len() < RESUME_AT as usize {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(saver.stats().iter().all(|s| !s.persisted));
    std::mem::forget(saver);
    assert!(
        bitsnap_core::Store::open(&store_dir)
            .unwrap()
            .snapshots()
            .is_empty(),
        "nothing is on disk yet"
    );
    for _ in RESUME_AT..STEPS {
        losses.push(run.step(&device).0);
    }

    let saver = StepSaver::open(&store_dir, config.clone()).unwrap();
    let r = saver
        .latest()
        .unwrap()
        .expect("the keeper holds the latest");
    assert_eq!((r.step, r.from), (RESUME_AT, RestoredFrom::Keeper));
    println!("restored step {} from the keeper in {:?}", r.step, r.took);
    let mut resumed = Run::resumed(r, &device);
    let tail: Vec<f32> = (RESUME_AT..STEPS)
        .map(|_| resumed.step(&device).0)
        .collect();
    assert_eq!(tail, losses[RESUME_AT as usize..]);
    drop(saver);

    keeper.shutdown().unwrap();
    let saver = StepSaver::open(&store_dir, config).unwrap();
    let r = saver.latest().unwrap().expect("persisted on shutdown");
    assert_eq!((r.step, r.from), (RESUME_AT, RestoredFrom::Disk));
}

/// A memory budget smaller than one snapshot lets one snapshot be in flight at a time,
/// whatever the queue depth: each `submit` returns only once the previous save is done.
#[test]
fn a_memory_budget_applies_back_pressure() {
    let _serial = serial();
    let device = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let saver = StepSaver::open(
        dir.path(),
        StepSaverConfig::default()
            .with_queue_depth(8)
            .with_memory_budget(1),
    )
    .unwrap();
    let mut run = Run::new(&device);
    for k in 1..=5 {
        let (_, lr) = run.step(&device);
        run.snapshot(&saver, lr);
        assert_eq!(saver.stats().len(), k - 1, "snapshot {k} did not wait");
    }
    saver.flush().unwrap();
    assert_eq!(saver.steps(), vec![1, 2, 3, 4, 5]);
}
