//! Half-precision training resumes bit for bit: f16 on wgpu (Mesa's lavapipe in CI), bf16
//! on the CPU (flex) where it supports it, through `StepSaver` and through the
//! checkpointers. With `CI` set, a missing wgpu adapter or f16 support fails the test;
//! elsewhere it says so and returns.
//!
//! Each test configures its device's default float dtype, which Burn allows once per
//! device and process and only before any tensor exists on it: this file is its own test
//! binary, and each device is used by one test only.

use bitsnap_burn::{BitSnapCheckpointer, OptimizerSpec, RestoredFrom, StepSaver, StepSaverConfig};
use bitsnap_core::Policy;
use burn::lr_scheduler::LrSchedulerRecord;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer, OptimizerRecord};
use burn::store::ModuleRecord;
use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData, activation::relu};

const STEPS: u64 = 10;
const RESUME_AT: u64 = 5;

#[derive(Module, Debug)]
struct Net {
    a: Linear,
    b: Linear,
}

impl Net {
    fn new(device: &Device) -> Net {
        device.seed(11);
        Net {
            a: LinearConfig::new(8, 32).init(device),
            b: LinearConfig::new(32, 1).init(device),
        }
    }
}

/// Deterministic batch `i`, in the model's dtype.
fn batch(i: u64, dtype: FloatDType, device: &Device) -> (Tensor<2>, Tensor<2>) {
    let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ (i + 1);
    let xs: Vec<f32> = (0..16 * 8)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let ys: Vec<f32> = xs.chunks(8).map(|r| r.iter().sum::<f32>().sin()).collect();
    (
        Tensor::<2>::from_data(TensorData::new(xs, [16, 8]), device).cast(dtype),
        Tensor::<2>::from_data(TensorData::new(ys, [16, 1]), device).cast(dtype),
    )
}

/// One step; the loss's bytes (in the training dtype).
fn step(
    model: Net,
    optim: &mut ModuleOptimizer,
    i: u64,
    dtype: FloatDType,
    device: &Device,
) -> (Net, Vec<u8>) {
    let (x, y) = batch(i, dtype, device);
    let out = model.b.forward(relu(model.a.forward(x)));
    let loss = (out - y).powf_scalar(2.0).mean();
    let bytes = loss.clone().into_data().as_bytes().to_vec();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    (optim.step(1e-2, model, grads), bytes)
}

fn resumes_exactly(device: Device, dtype: FloatDType) {
    let adamw = AdamWConfig::new();
    let dir = tempfile::tempdir().unwrap();
    let saver = StepSaver::open(
        dir.path().join("steps"),
        StepSaverConfig::default().with_optimizer(&adamw),
    )
    .unwrap();
    let ckpt = BitSnapCheckpointer::open(dir.path().join("ckpt"), Policy::default()).unwrap();
    let mut model = Net::new(&device);
    assert_eq!(
        model.a.weight.val().dtype(),
        DType::from(dtype),
        "the model does not train in {dtype:?}"
    );
    let mut optim = adamw.init_on(&device);
    let mut losses = Vec::new();
    for i in 1..=STEPS {
        let (m, loss) = step(model, &mut optim, i, dtype, &device);
        model = m;
        losses.push(loss);
        if i == RESUME_AT {
            saver.snapshot(i, &model, &optim).lr(1e-2).submit().unwrap();
            ckpt.save_record(1, model.clone().into_record()).unwrap();
            ckpt.save_record(1, optim.to_record()).unwrap();
            ckpt.save_record(1, LrSchedulerRecord::new()).unwrap();
        }
    }
    saver.close().unwrap();

    let tail = |model: Net, mut optim: ModuleOptimizer| {
        assert_eq!(model.a.weight.val().dtype(), DType::from(dtype));
        let mut model = model;
        let mut out = Vec::new();
        for i in RESUME_AT + 1..=STEPS {
            let (m, loss) = step(model, &mut optim, i, dtype, &device);
            model = m;
            out.push(loss);
        }
        out
    };
    let want = &losses[RESUME_AT as usize..];

    let saver = StepSaver::open(dir.path().join("steps"), StepSaverConfig::default()).unwrap();
    let r = saver.restore(RESUME_AT).unwrap();
    assert_eq!(r.from, RestoredFrom::Disk);
    let got = tail(
        Net::new(&device).load_record(r.model),
        adamw.init_on(&device).load_record(r.optimizer),
    );
    assert!(got == want, "{dtype:?}: StepSaver resume differs");

    let ckpt = BitSnapCheckpointer::open(dir.path().join("ckpt"), Policy::default()).unwrap();
    let got = tail(
        Net::new(&device).load_record(ckpt.restore_record::<ModuleRecord>(1).unwrap()),
        adamw
            .init_on(&device)
            .load_record(ckpt.restore_record::<OptimizerRecord>(1).unwrap()),
    );
    assert!(got == want, "{dtype:?}: checkpointer resume differs");
}

#[test]
fn f16_on_wgpu_resumes_bit_exactly() {
    let mut device = match Device::wgpu_options().init() {
        Ok(d) => d,
        Err(e) => {
            assert!(
                !bitsnap_core::ci::required(),
                "CI is set but no wgpu adapter was found (is mesa-vulkan-drivers installed?): {e}"
            );
            eprintln!("no wgpu adapter ({e}): f16 test not run");
            return;
        }
    };
    assert!(
        device.supports_dtype(FloatDType::F16),
        "the wgpu device cannot compute in f16"
    );
    device.configure(FloatDType::F16).unwrap();
    resumes_exactly(device.autodiff(), FloatDType::F16);
}

#[test]
fn bf16_on_the_cpu_resumes_bit_exactly() {
    let mut device = Device::flex();
    assert!(
        device.supports_dtype(FloatDType::BF16),
        "flex cannot compute in bf16"
    );
    device.configure(FloatDType::BF16).unwrap();
    resumes_exactly(device.autodiff(), FloatDType::BF16);
}
