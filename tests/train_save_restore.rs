//! Train in Burn (flex) → the StepSaver saves a delta chain → the Store verifies it and
//! decodes it on the CPU bit for bit → the command line (`bitsnap verify`, `bitsnap
//! unpack`) agrees → the DeviceLoader restores it onto wgpu equal to the
//! CPU decode → training resumes from it bit for bit.

use std::ffi::OsString;
use std::process::ExitCode;

use bitsnap_burn::bridge::{self, RecordKind};
use bitsnap_burn::gpu::DeviceLoader;
use bitsnap_burn::{StepSaver, StepSaverConfig};
use bitsnap_core::{Policy, Store};
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData, activation::relu};
use burn::train::checkpoint::Checkpoint;

#[derive(Module, Debug)]
struct Mlp {
    a: Linear,
    b: Linear,
}

impl Mlp {
    fn new(device: &Device) -> Mlp {
        Mlp {
            a: LinearConfig::new(16, 32).init(device),
            b: LinearConfig::new(32, 1).init(device),
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

/// One training step; returns the new model and the loss's bits.
fn step(model: Mlp, optim: &mut ModuleOptimizer, i: u64, device: &Device) -> (Mlp, u32) {
    let (x, y) = batch(i, device);
    let loss = (model.forward(x) - y).powf_scalar(2.0).mean();
    let value = loss
        .clone()
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32 loss")[0];
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    (optim.step(1e-2, model, grads), value.to_bits())
}

/// What the saver stores for `model` and `optim`: the bitsnap tensors of both records,
/// sorted by name, as (name, dtype, shape, bytes).
type State = Vec<(String, String, Vec<u64>, Vec<u8>)>;

fn state(model: &Mlp, optim: &ModuleOptimizer) -> State {
    let (mut tensors, _) = bridge::from_burnpack(
        model.clone().into_record().checkpoint_into_bytes().unwrap(),
        RecordKind::Module,
        "model/",
    )
    .unwrap();
    let (more, _) = bridge::from_burnpack(
        optim.to_record().checkpoint_into_bytes().unwrap(),
        RecordKind::Optimizer,
        "optim/",
    )
    .unwrap();
    tensors.extend(more);
    sorted(tensors)
}

fn sorted(tensors: Vec<bitsnap_core::Tensor>) -> State {
    let mut out: State = tensors
        .into_iter()
        .map(|t| (t.name, t.dtype.to_string(), t.shape, t.data))
        .collect();
    out.sort();
    out
}

fn params(model: &Mlp) -> Vec<u8> {
    model
        .clone()
        .into_record()
        .checkpoint_into_bytes()
        .unwrap()
        .to_vec()
}

const STEPS: u64 = 12;
const SAVE_EVERY: u64 = 3;
const RESUME_AT: u64 = 6;

#[test]
fn trained_saved_verified_restored_on_cpu_and_gpu_and_resumed_bit_exactly() {
    let device = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();

    // 1. Train, snapshotting every SAVE_EVERY steps in the background.
    // Every weight changes at every step of this small model: deltas must be asked for
    // (no minimum gain) for the saves to form a chain.
    // Only codecs with a device form, so that step 3 runs the GPU kernels.
    let policy = Policy::default()
        .with_min_delta_gain(0.0)
        .with_device_forms_only(true);
    let saver =
        StepSaver::open(dir.path(), StepSaverConfig::default().with_policy(policy)).unwrap();
    let mut model = Mlp::new(&device);
    let mut optim: ModuleOptimizer = AdamWConfig::new().init();
    let (mut losses, mut at_resume) = (Vec::new(), None);
    for i in 1..=STEPS {
        let (m, loss) = step(model, &mut optim, i, &device);
        model = m;
        losses.push(loss);
        if i % SAVE_EVERY == 0 {
            saver.snapshot(i, &model, &optim).submit().unwrap();
        }
        if i == RESUME_AT {
            at_resume = Some(state(&model, &optim));
        }
    }
    let final_params = params(&model);
    saver.close().unwrap();
    let at_resume = at_resume.unwrap();

    // 2. A fresh view of the store: every snapshot verifies, the chain is deltas on a full
    //    snapshot, and the resume point decodes on the CPU to exactly the training state.
    let store = Store::open(dir.path()).unwrap();
    let report = store.verify().unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.ok.len(), (STEPS / SAVE_EVERY) as usize);
    let id = store
        .find("steps", &format!("step-{RESUME_AT}"))
        .unwrap()
        .id;
    assert_eq!(
        store.chain(id).unwrap().len(),
        2,
        "a delta on a full snapshot"
    );
    let cpu = store.load(id).unwrap();
    assert!(!cpu.from_memory);
    assert!(
        sorted(cpu.tensors.clone()) == at_resume,
        "CPU decode differs"
    );

    // 2b. The command line agrees: `bitsnap verify` passes, and `bitsnap unpack` writes the
    //     resume point to a safetensors file holding exactly the decoded tensors.
    let bitsnap = |args: &[OsString]| {
        bitsnap_cli::run(std::iter::once(OsString::from("bitsnap")).chain(args.iter().cloned()))
    };
    let store_arg = dir.path().as_os_str().to_owned();
    assert_eq!(
        bitsnap(&["verify".into(), store_arg.clone()]),
        ExitCode::SUCCESS
    );
    let unpacked = tempfile::tempdir().unwrap();
    let out = unpacked.path().join("resume.safetensors");
    let code = bitsnap(&[
        "unpack".into(),
        store_arg,
        format!("step-{RESUME_AT}").into(),
        "-o".into(),
        out.clone().into_os_string(),
    ]);
    assert_eq!(code, ExitCode::SUCCESS);
    let (from_file, _) = bitsnap_core::safetensors::read_file(&out, |_| None).unwrap();
    assert!(sorted(from_file) == at_resume, "unpacked file differs");

    // 3. The same snapshot restored onto wgpu, kernels and all, equals the CPU decode.
    match bitsnap_e2e::wgpu() {
        Some(gpu) => {
            let snap = DeviceLoader::new(&gpu).load(&store, id).unwrap();
            assert_eq!(snap.stats.snapshots, 2, "{:?}", snap.stats);
            assert_eq!(snap.tensors().len(), cpu.tensors.len());
            for t in &cpu.tensors {
                let d = snap.require(&t.name).unwrap();
                assert!(
                    d.to_bytes().unwrap() == t.data,
                    "{} differs on wgpu",
                    t.name
                );
            }
        }
        None => assert!(!bitsnap_core::ci::required()),
    }

    // 4. Resume from the snapshot in a new saver (from disk) and train to the end: the
    //    same losses, bit for bit, and the same final parameters.
    let saver = StepSaver::open(dir.path(), StepSaverConfig::default()).unwrap();
    let restored = saver.restore(RESUME_AT).unwrap();
    assert_eq!(restored.from, bitsnap_burn::RestoredFrom::Disk);
    let mut model = Mlp::new(&device).load_record(restored.model);
    let mut optim: ModuleOptimizer = AdamWConfig::new().init().load_record(restored.optimizer);
    assert!(state(&model, &optim) == at_resume, "restored state differs");
    let mut tail = Vec::new();
    for i in RESUME_AT + 1..=STEPS {
        let (m, loss) = step(model, &mut optim, i, &device);
        model = m;
        tail.push(loss);
    }
    assert_eq!(tail, losses[RESUME_AT as usize..]);
    assert!(params(&model) == final_params, "final parameters differ");
    saver.close().unwrap();
}
