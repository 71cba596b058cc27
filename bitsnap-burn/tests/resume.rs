//! Exact resume: a run restored from a bitsnap snapshot continues bit for bit like the
//! uninterrupted run (lossless policy), or within a small tolerance (quantized moments).

use bitsnap_burn::{RestoredFrom, StepSaver, StepSaverConfig};
use bitsnap_core::{Lossiness, Policy, codec::QuantBits};
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData, activation::relu};

#[derive(Module, Debug)]
struct Mlp {
    a: Linear,
    b: Linear,
}

/// Uniform values in `[-scale, scale)` from a xorshift generator seeded with `seed`.
fn uniform(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = 0x2545_F491_4F6C_DD1Du64 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// A linear layer with deterministic weights: every run starts from the same model,
/// whatever other tests draw from Burn's generator meanwhile, so the loss gaps measured
/// below are reproducible.
fn linear(d_in: usize, d_out: usize, seed: u64, device: &Device) -> Linear {
    let scale = 1.0 / (d_in as f32).sqrt();
    let mut layer = LinearConfig::new(d_in, d_out).init(device);
    layer.weight = Param::from_tensor(Tensor::from_data(
        TensorData::new(uniform(d_in * d_out, seed, scale), [d_in, d_out]),
        device,
    ));
    layer.bias = Some(Param::from_tensor(Tensor::from_data(
        TensorData::new(uniform(d_out, seed + 1, scale), [d_out]),
        device,
    )));
    layer
}

impl Mlp {
    fn new(device: &Device) -> Mlp {
        Mlp {
            a: linear(16, 64, 1, device),
            b: linear(64, 1, 3, device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.b.forward(relu(self.a.forward(x)))
    }
}

/// Deterministic batch `i`: inputs and a smooth target.
fn batch(i: u64, device: &Device) -> (Tensor<2>, Tensor<2>) {
    let n = 32;
    let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ (i + 1);
    let xs: Vec<f32> = (0..n * 16)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let ys: Vec<f32> = xs
        .chunks(16)
        .map(|r| {
            r.iter()
                .enumerate()
                .map(|(j, v)| v * (j as f32 - 7.5) * 0.1)
                .sum::<f32>()
                .sin()
        })
        .collect();
    (
        Tensor::from_data(TensorData::new(xs, [n, 16]), device),
        Tensor::from_data(TensorData::new(ys, [n, 1]), device),
    )
}

fn step(model: Mlp, optim: &mut ModuleOptimizer, i: u64, device: &Device) -> (Mlp, f32) {
    let (x, y) = batch(i, device);
    let loss = (model.forward(x) - y).powf_scalar(2.0).mean();
    let value = loss
        .clone()
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32 loss")[0];
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    (optim.step(1e-2, model, grads), value)
}

fn params(model: &Mlp) -> Vec<u8> {
    let record = model.clone().into_record();
    use burn::train::checkpoint::Checkpoint;
    record
        .checkpoint_into_bytes()
        .expect("record bytes")
        .to_vec()
}

const STEPS: u64 = 24;
const SAVE_EVERY: u64 = 6;
const RESUME_AT: u64 = 12;

/// Trains `STEPS` steps, snapshotting every `SAVE_EVERY`; returns losses and final params.
fn uninterrupted(saver: &StepSaver, device: &Device) -> (Vec<f32>, Vec<u8>) {
    let mut model = Mlp::new(device);
    let mut optim: ModuleOptimizer = AdamWConfig::new().init();
    let mut losses = Vec::new();
    for i in 1..=STEPS {
        let (m, loss) = step(model, &mut optim, i, device);
        model = m;
        losses.push(loss);
        if i % SAVE_EVERY == 0 {
            saver
                .snapshot(i, &model, &optim)
                .submit()
                .expect("snapshot");
        }
    }
    saver.flush().expect("flush");
    (losses, params(&model))
}

/// Restores `RESUME_AT` from `saver` into a fresh model and optimizer, and trains to the end.
fn resumed(saver: &StepSaver, device: &Device) -> (Vec<f32>, Vec<u8>) {
    let restored = saver.restore(RESUME_AT).expect("restore");
    let mut model = Mlp::new(device).load_record(restored.model);
    let mut optim: ModuleOptimizer = AdamWConfig::new().init().load_record(restored.optimizer);
    let mut losses = Vec::new();
    for i in RESUME_AT + 1..=STEPS {
        let (m, loss) = step(model, &mut optim, i, device);
        model = m;
        losses.push(loss);
    }
    (losses, params(&model))
}

#[test]
fn lossless_resume_is_bit_exact_from_disk_and_from_memory() {
    let device = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let saver = StepSaver::open(dir.path(), StepSaverConfig::default()).unwrap();
    let (losses, final_params) = uninterrupted(&saver, &device);
    assert_eq!(saver.steps(), vec![6, 12, 18, 24]);
    // From disk: a new process view of the store.
    drop(saver);
    let saver = StepSaver::open(dir.path(), StepSaverConfig::default()).unwrap();
    let (tail, tail_params) = resumed(&saver, &device);
    assert_eq!(
        tail,
        losses[RESUME_AT as usize..],
        "losses after resume differ"
    );
    assert!(
        tail_params == final_params,
        "final parameters differ after resume"
    );
    // From memory: the latest save of a process is restored without reading disk, and
    // decodes to what the disk holds.
    let mem_dir = tempfile::tempdir().unwrap();
    let mem = StepSaver::open(mem_dir.path(), StepSaverConfig::default()).unwrap();
    let (_, last_params) = uninterrupted(&mem, &device);
    let restored = mem.restore(STEPS).unwrap();
    assert_eq!(restored.from, RestoredFrom::Memory);
    let disk = StepSaver::open(mem_dir.path(), StepSaverConfig::default())
        .unwrap()
        .restore(STEPS)
        .unwrap();
    assert_eq!(disk.from, RestoredFrom::Disk);
    let model_bytes = |m: burn::store::ModuleRecord| Mlp::new(&device).load_record(m);
    assert!(params(&model_bytes(restored.model)) == last_params);
    assert!(params(&model_bytes(disk.model)) == last_params);
}

#[test]
fn lossy_optimizer_resume_stays_close() {
    let device = Device::flex().autodiff();
    // Final-loss gap bounds: 3x the gaps measured (deterministic init, so every run
    // gives the same gaps): B8 0.068%, B4 0.132%.
    for (bits, bound) in [(QuantBits::B8, 0.0020), (QuantBits::B4, 0.0040)] {
        let dir = tempfile::tempdir().unwrap();
        let policy = Policy::default().with_lossiness(Lossiness::LossyOptimizer { bits });
        let saver =
            StepSaver::open(dir.path(), StepSaverConfig::default().with_policy(policy)).unwrap();
        // The run's own uninterrupted losses are the reference.
        let (losses, _) = uninterrupted(&saver, &device);
        let quantized = saver
            .with_store(|s| s.header(s.snapshots()[1].id))
            .unwrap()
            .unwrap();
        let errors: Vec<f64> = quantized
            .entries
            .iter()
            .filter_map(|e| e.decision.error.map(|q| q.rel_l2))
            .collect();
        assert!(!errors.is_empty(), "no tensor was quantized");
        drop(saver);
        let saver = StepSaver::open(dir.path(), StepSaverConfig::default()).unwrap();
        let (tail, _) = resumed(&saver, &device);
        let want = *losses.last().unwrap();
        let got = *tail.last().unwrap();
        let gap = ((got - want) / want).abs();
        println!(
            "{bits:?}: moments rel. L2 error {:.4}..{:.4}; final loss {got} vs {want} uninterrupted, gap {:.3}%",
            errors.iter().cloned().fold(f64::INFINITY, f64::min),
            errors.iter().cloned().fold(0.0, f64::max),
            gap * 100.0
        );
        assert!(
            gap < bound,
            "final loss gap {gap} with {bits:?}, bound {bound}"
        );
    }
}
