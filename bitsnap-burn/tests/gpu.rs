//! The GPU loader, for real: on wgpu (Mesa's lavapipe in CI) every restored tensor must be
//! bit for bit what the CPU decoder gives, through every kernel. With `CI` set, a missing
//! wgpu adapter fails these tests; elsewhere they say so and return.

use std::sync::OnceLock;

use bitsnap_burn::gpu::{DeviceLoader, DeviceSnapshot, Expansion};
use bitsnap_burn::{StepSaver, StepSaverConfig};
use bitsnap_core::codec::QuantBits;
use bitsnap_core::{DType, Lossiness, Policy, Role, Store, Tensor};
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::Device;

/// The wgpu device, initialised once for the whole test binary (a second `init` fails).
fn wgpu() -> Option<Device> {
    static DEVICE: OnceLock<Option<Device>> = OnceLock::new();
    DEVICE
        .get_or_init(|| match Device::wgpu_options().init() {
            Ok(d) => Some(d),
            Err(e) => {
                assert!(
                    !bitsnap_core::ci::required(),
                    "CI is set but no wgpu adapter was found (is mesa-vulkan-drivers installed?): {e}"
                );
                eprintln!("no wgpu adapter ({e}): GPU-path tests not run");
                None
            }
        })
        .clone()
}

/// Deterministic pseudo-random bytes.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

/// Floats that look like weights (no NaN, so they can be quantized).
fn floats(dtype: DType, n: usize, seed: u64) -> Vec<u8> {
    let raw = bytes(n * 4, seed);
    let vals = raw.chunks_exact(4).map(|c| {
        (u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32 / u32::MAX as f32 - 0.5) * 0.1
    });
    match dtype {
        DType::F32 => vals.flat_map(f32::to_le_bytes).collect(),
        DType::F16 => vals
            .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        DType::BF16 => vals
            .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        other => panic!("{other}"),
    }
}

/// Finite f32 with random mantissas over a wide exponent range: lossless coding barely
/// shrinks them, so even 16-bit cluster codes win.
fn wild_f32(n: usize, seed: u64) -> Vec<u8> {
    let mut b = bytes(n * 4, seed);
    b.chunks_exact_mut(4).for_each(|c| c[3] &= 0xbf);
    b
}

/// Changes every `every`-th element (by flipping its low byte).
fn touch(data: &[u8], width: usize, every: usize, seed: usize) -> Vec<u8> {
    let mut out = data.to_vec();
    for i in (seed % every.max(1)..data.len() / width).step_by(every.max(1)) {
        out[i * width] ^= 0x5a;
    }
    out
}

fn tensor(name: &str, dtype: DType, role: Role, data: Vec<u8>) -> Tensor {
    let numel = (data.len() / dtype.size()) as u64;
    Tensor::new(name.to_string(), dtype, vec![numel], role, data).unwrap()
}

/// A three-snapshot chain whose deltas exercise every device path: odd lengths, empty,
/// unchanged, all-changed, sparse, 1/2/4/8-byte elements, cluster codes at 4/8/16 bits.
fn chain(dir: &std::path::Path, bits: QuantBits) -> (Store, Vec<u64>) {
    let policy = Policy::default()
        .with_lossiness(Lossiness::LossyOptimizer { bits })
        .with_min_delta_gain(0.0)
        .with_device_forms_only(true);
    let mut store = Store::open_or_create(dir, policy).unwrap();
    let w = Role::Weight;
    let m = Role::OptimizerMoment(1);
    let mut state = vec![
        tensor("w.f32", DType::F32, w, floats(DType::F32, 1000, 1)),
        tensor("w.f16", DType::F16, w, floats(DType::F16, 999, 2)),
        tensor("w.bf16", DType::BF16, w, floats(DType::BF16, 77, 3)),
        tensor("w.big", DType::F32, w, floats(DType::F32, 300_000, 4)),
        tensor("empty", DType::F32, w, Vec::new()),
        tensor("frozen", DType::F32, w, floats(DType::F32, 5000, 5)),
        tensor("all", DType::F32, w, floats(DType::F32, 4099, 6)),
        tensor("mask.u8", DType::U8, Role::Other, bytes(333, 7)),
        tensor("steps.i64", DType::I64, Role::Other, bytes(50 * 8, 8)),
        tensor("adam.v.f32", DType::F32, m, wild_f32(200_003, 9)),
        tensor("adam.v.f16", DType::F16, m, floats(DType::F16, 1001, 10)),
    ];
    let mut ids = vec![store.save("s0", state.clone()).unwrap().info.id];
    for step in 1..3usize {
        for t in &mut state {
            let wd = t.dtype.size();
            t.data = match t.name.as_str() {
                "frozen" | "empty" => t.data.clone(),
                "all" => t.data.iter().map(|b| b ^ 1).collect(),
                "w.big" => touch(&t.data, wd, 97, step),
                "adam.v.f32" | "adam.v.f16" => {
                    floats(t.dtype, t.data.len() / wd, 100 + step as u64)
                }
                _ => touch(&t.data, wd, 7 + step, step),
            };
        }
        ids.push(
            store
                .save(&format!("s{step}"), state.clone())
                .unwrap()
                .info
                .id,
        );
    }
    (store, ids)
}

/// Every tensor of `snap` equals the CPU decoder's, byte for byte.
fn assert_same_as_cpu(store: &Store, id: u64, snap: &DeviceSnapshot) {
    let cpu = store.load(id).unwrap();
    assert_eq!(snap.tensors().len(), cpu.tensors.len());
    for t in &cpu.tensors {
        let d = snap
            .get(&t.name)
            .unwrap_or_else(|| panic!("{} missing", t.name));
        assert_eq!(d.dtype(), t.dtype, "{}", t.name);
        assert_eq!(d.shape().len(), t.shape.len(), "{}", t.name);
        assert!(
            d.to_bytes().unwrap() == t.data,
            "{}: differs from the CPU decoder",
            t.name
        );
    }
}

#[test]
fn every_path_matches_the_cpu_decoder_on_wgpu() {
    let Some(device) = wgpu() else { return };
    for bits in [QuantBits::B4, QuantBits::B8, QuantBits::B16] {
        let dir = tempfile::tempdir().unwrap();
        let (store, ids) = chain(dir.path(), bits);
        let (mut sparse, mut unchanged, mut codes, mut host, mut skipped) = (0, 0, 0, 0, 0);
        for &id in &ids {
            let snap = DeviceLoader::new(&device)
                .with_verify(true)
                .load(&store, id)
                .unwrap();
            assert_same_as_cpu(&store, id, &snap);
            let f = snap.stats.forms;
            (sparse, unchanged, codes, host, skipped) = (
                sparse + f.sparse,
                unchanged + f.unchanged,
                codes + f.codes,
                host + f.host,
                skipped + f.skipped,
            );
            assert!(
                snap.stats.upload_bytes < snap.stats.dense_bytes * 3,
                "{:?}",
                snap.stats
            );
        }
        // The kernels really ran: each device path was taken. Cluster payloads need no
        // base, so codes of earlier snapshots were not even read.
        assert!(sparse > 0 && unchanged > 0 && codes > 0 && host > 0 && skipped > 0);
        let host = DeviceLoader::new(&device)
            .with_expansion(Expansion::Host)
            .load(&store, ids[2])
            .unwrap();
        assert_same_as_cpu(&store, ids[2], &host);
    }
}

#[test]
fn xor_path_matches_on_wgpu() {
    let Some(device) = wgpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let policy = Policy::default()
        .with_min_delta_gain(0.0)
        .with_device_forms_only(true);
    let mut store = Store::open_or_create(dir.path(), policy).unwrap();
    // Every element changes in its lowest bits only: XOR planes win over the mask.
    let base = floats(DType::F32, 70_001, 1);
    let next: Vec<u8> = base
        .chunks_exact(4)
        .enumerate()
        .flat_map(|(i, c)| {
            let mut c = [c[0], c[1], c[2], c[3]];
            c[0] ^= (i % 3 + 1) as u8;
            c
        })
        .collect();
    store
        .save("a", vec![tensor("x", DType::F32, Role::Weight, base)])
        .unwrap();
    let id = store
        .save("b", vec![tensor("x", DType::F32, Role::Weight, next)])
        .unwrap()
        .info
        .id;
    let snap = DeviceLoader::new(&device)
        .with_verify(true)
        .load(&store, id)
        .unwrap();
    assert_eq!(snap.stats.forms.xor, 1, "{:?}", snap.stats);
    assert_same_as_cpu(&store, id, &snap);
}

#[test]
fn flex_gives_the_same_result_through_the_same_call() {
    let dir = tempfile::tempdir().unwrap();
    let (store, ids) = chain(dir.path(), QuantBits::B8);
    let snap = DeviceLoader::new(&Device::flex())
        .with_verify(true)
        .load(&store, ids[2])
        .unwrap();
    assert_same_as_cpu(&store, ids[2], &snap);
    assert_eq!(snap.stats.forms.dense, snap.tensors().len());
}

#[derive(Module, Debug)]
struct Net {
    a: Linear,
    b: Linear,
}

impl Net {
    fn new(device: &Device) -> Net {
        Net {
            a: LinearConfig::new(33, 64).init(device),
            b: LinearConfig::new(64, 3).init(device),
        }
    }

    fn forward(&self, x: burn::tensor::Tensor<2>) -> burn::tensor::Tensor<2> {
        self.b
            .forward(burn::tensor::activation::relu(self.a.forward(x)))
    }
}

#[test]
fn a_trained_model_restores_onto_wgpu_without_a_host_copy() {
    let Some(device) = wgpu() else { return };
    let train = device.clone().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let saver = StepSaver::open(dir.path(), StepSaverConfig::default()).unwrap();
    let mut model = Net::new(&train);
    let mut optim = AdamWConfig::new().init();
    let x =
        burn::tensor::Tensor::<2>::random([16, 33], burn::tensor::Distribution::Default, &train);
    for step in 1..=4u64 {
        let loss = model.forward(x.clone()).powf_scalar(2.0).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-3, model, grads);
        saver.snapshot(step, &model, &optim).submit().unwrap();
    }
    saver.flush().unwrap();
    let (snap, id) = saver
        .with_store(|store| {
            let id = store.snapshots().last().unwrap().id;
            (
                DeviceLoader::new(&device)
                    .with_verify(true)
                    .load(store, id)
                    .unwrap(),
                id,
            )
        })
        .unwrap();
    assert!(
        snap.stats.snapshots > 1,
        "a chain was restored: {:?}",
        snap.stats
    );
    saver
        .with_store(|store| assert_same_as_cpu(store, id, &snap))
        .unwrap();
    let restored = snap.apply_to_module(Net::new(&train), "model/").unwrap();
    let want = model.a.weight.val().into_data();
    let got = restored.a.weight.val().into_data();
    assert_eq!(want.as_bytes(), got.as_bytes());
    assert_eq!(restored.a.weight.id, model.a.weight.id);
    assert_eq!(
        model.forward(x.clone()).into_data().as_bytes(),
        restored.forward(x).into_data().as_bytes()
    );
    saver.close().unwrap();
}

/// Rewrites delta snapshot `id` of the store in `dir` so that its tensor `x` claims
/// `dtype` and `shape` (same byte size, same payload, same base reference): a base whose
/// tensor has the same word count but not the dtype or shape the delta was encoded
/// against. Returns the snapshot's file.
fn retype_delta(dir: &std::path::Path, id: u64, dtype: DType, shape: &[u64]) -> std::path::PathBuf {
    use bitsnap_core::format::{SnapshotFile, SnapshotWriter};
    let store = Store::open(dir).unwrap();
    let path = dir.join(&store.get(id).unwrap().file);
    let file = SnapshotFile::open(&path).unwrap();
    let h = &file.header;
    assert!(h.base.is_some() && h.entries.iter().all(|e| e.codec.needs_base()));
    let mut w = SnapshotWriter::new(Vec::new(), &path, h.id, &h.name, h.base).unwrap();
    w.set_metadata(h.metadata.clone());
    for e in &h.entries {
        let mut entry = e.clone();
        if entry.name == "x" {
            entry.dtype = dtype;
            entry.shape = shape.to_vec();
        }
        w.push(entry, file.payload(e).unwrap()).unwrap();
    }
    let (_, bytes) = w.finish().unwrap();
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Issue #14.4: the GPU path matched a delta's base by word count only. A chain whose base
/// holds `x` as f32 [64] under a delta that claims i32 [64] or f32 [8, 8] (the same 64
/// words) is refused on every path, with an error naming the delta's file and `x`.
#[test]
fn a_base_of_another_dtype_or_shape_is_refused_naming_file_and_tensor() {
    let wgpu = wgpu();
    for (dtype, shape) in [(DType::I32, vec![64]), (DType::F32, vec![8, 8])] {
        let dir = tempfile::tempdir().unwrap();
        let mut store =
            Store::open_or_create(dir.path(), Policy::default().with_min_delta_gain(0.0)).unwrap();
        let base = floats(DType::F32, 64, 1);
        store
            .save(
                "a",
                vec![tensor("x", DType::F32, Role::Weight, base.clone())],
            )
            .unwrap();
        let id = store
            .save(
                "b",
                vec![tensor("x", DType::F32, Role::Weight, touch(&base, 4, 7, 1))],
            )
            .unwrap()
            .info
            .id;
        drop(store);
        let path = retype_delta(dir.path(), id, dtype, &shape);
        let store = Store::open(dir.path()).unwrap();
        let named = |what: &str, e: &bitsnap_burn::Error| {
            let msg = e.to_string();
            assert!(
                msg.contains(&path.display().to_string()) && msg.contains("`x`"),
                "{what} {dtype} {shape:?}: {msg}"
            );
        };
        let cpu = store.load(id).unwrap_err();
        named("CPU decoder", &cpu.into());
        let mut devices = vec![("flex", Device::flex())];
        devices.extend(wgpu.clone().map(|d| ("wgpu", d)));
        for (name, device) in devices {
            for verify in [false, true] {
                let err = DeviceLoader::new(&device)
                    .with_verify(verify)
                    .load(&store, id)
                    .unwrap_err();
                assert!(
                    matches!(
                        err,
                        bitsnap_burn::Error::Store(bitsnap_core::Error::MissingBase { .. })
                    ),
                    "{name}: {err:?}"
                );
                named(name, &err);
            }
        }
    }
}

/// A sharded snapshot (two ranks) restores through the same call, equal to the CPU
/// decoder: on flex through the host path, on wgpu on the device, one chain per rank.
#[test]
fn a_sharded_snapshot_restores_onto_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_or_create(dir.path(), Policy::default()).unwrap();
    let id = store.snapshots().len() as u64 + 1;
    for rank in 0..2u32 {
        let t = tensor(
            &format!("w{rank}"),
            DType::F32,
            Role::Weight,
            floats(DType::F32, 1000, u64::from(rank)),
        );
        Store::open(dir.path())
            .unwrap()
            .save_shard("s", id, "sharded", rank, 2, vec![t], Vec::new())
            .unwrap();
    }
    store
        .commit_sharded("s", id, "sharded", 2, std::time::Duration::from_secs(5))
        .unwrap();
    assert_eq!(store.load(id).unwrap().tensors.len(), 2);
    // The host path (flex) counts a sharded snapshot once; the device path applies each
    // rank's chain (one file each here).
    let mut devices = vec![("flex", Device::flex(), 1)];
    devices.extend(wgpu().map(|d| ("wgpu", d, 2)));
    for (name, device, files) in devices {
        let snap = DeviceLoader::new(&device)
            .with_verify(true)
            .load(&store, id)
            .unwrap();
        assert_eq!(snap.tensors().len(), 2);
        assert_same_as_cpu(&store, id, &snap);
        assert_eq!(snap.stats.snapshots, files, "{name}");
    }
}

/// Payloads without a device form (an integer delta; a bf16 tensor stored as the cast of
/// its f32 master; a copy of another tensor) restore through the CPU decoder on every
/// device, equal to it, and `Policy::device_forms_only` keeps them out of a store.
#[test]
fn host_only_payloads_restore_through_the_cpu_decoder() {
    let master = floats(DType::F32, 4096, 11);
    let half: Vec<u8> = master
        .chunks_exact(4)
        .flat_map(|c| {
            let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            half::bf16::from_f32(x).to_le_bytes()
        })
        .collect();
    // Every element one ulp up: the integer difference is all ones.
    let moved: Vec<u8> = master
        .chunks_exact(4)
        .flat_map(|c| (u32::from_le_bytes([c[0], c[1], c[2], c[3]]) + 1).to_le_bytes())
        .collect();
    let state = |m: &[u8]| {
        vec![
            tensor("optimizer.master.w", DType::F32, Role::Weight, m.to_vec()),
            tensor("model.w", DType::BF16, Role::Weight, half.clone()),
            tensor("copy.w", DType::F32, Role::Other, master.clone()),
        ]
    };
    let mut devices = vec![("flex", Device::flex())];
    devices.extend(wgpu().map(|d| ("wgpu", d)));
    for device_only in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let policy = Policy::default()
            .with_min_delta_gain(0.0)
            .with_device_forms_only(device_only);
        let mut store = Store::open_or_create(dir.path(), policy).unwrap();
        store.save("a", state(&master)).unwrap();
        let id = store.save("b", state(&moved)).unwrap().info.id;
        let codecs: Vec<_> = [store.header(id - 1).unwrap(), store.header(id).unwrap()]
            .iter()
            .flat_map(|h| h.entries.iter().map(|e| e.codec).collect::<Vec<_>>())
            .collect();
        let host_only = codecs.iter().filter(|c| !c.has_device_form()).count();
        if device_only {
            assert_eq!(host_only, 0, "{codecs:?}");
        } else {
            // The cast and the copy in both snapshots, the integer delta in the second.
            assert!(host_only >= 3, "{codecs:?}");
        }
        for (name, device) in &devices {
            let snap = DeviceLoader::new(device)
                .with_verify(true)
                .load(&store, id)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_same_as_cpu(&store, id, &snap);
        }
    }
}
