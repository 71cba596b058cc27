//! Restore time onto the GPU for a checkpoint chain, three ways, in one run:
//! (a) Burn's own store loading a burnpack file of the final state, (b) bitsnap decoding
//! the chain on the CPU and uploading dense tensors, (c) bitsnap uploading the compact form
//! and expanding it with kernels. Bytes moved host-to-device for each, and for (b) and (c)
//! the stages of the load (read, checksum, entropy decode, upload, kernels), each as
//! [`LoadStats`] reports it (CPU stages summed over threads).
//!
//! `cargo run --release -p bitsnap-burn --example gpu_restore -- [params_millions] [deltas] [lossless]`
//!
//! The state is a fine-tuning run's: f16 weights of which 13% of elements change per save
//! (the measured fine-tune rate), and Adam's two moments in f32 for every weight, which
//! change everywhere each save (cluster-quantized at 8 bits unless `lossless`).

use std::time::Instant;

use bitsnap_burn::gpu::{DeviceLoader, Expansion, LoadStats};
use bitsnap_core::codec::QuantBits;
use bitsnap_core::{DType, Lossiness, Policy, Role, Store, Tensor};
use burn::module::{Module, Param};
use burn::store::{BurnpackStore, ModuleSnapshot};
use burn::tensor::{DType as BurnDType, Device, Tensor as BurnTensor, TensorData};
use rayon::prelude::*;

#[derive(Module, Debug)]
struct State {
    t: Vec<Param<BurnTensor<2>>>,
}

const ROWS: usize = 1024;
const COLS: usize = 4096;

fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

fn weights(n: usize, seed: u64) -> Vec<u8> {
    let mut r = xorshift(seed);
    (0..n)
        .flat_map(|_| {
            half::f16::from_f32(((r() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.08)
                .to_le_bytes()
        })
        .collect()
}

fn moment(n: usize, seed: u64, second: bool) -> Vec<u8> {
    let mut r = xorshift(seed);
    (0..n)
        .flat_map(|_| {
            let u = (r() >> 40) as f32 / (1u64 << 24) as f32;
            let v = if second {
                1e-8 * (u * 12.0).exp()
            } else {
                (u - 0.5) * 2e-3
            };
            v.to_le_bytes()
        })
        .collect()
}

/// One fine-tuning step: 13% of the f16 weights move by one ulp-ish; every moment changes.
fn step(t: &mut Tensor, k: u64) {
    // Seeded by the tensor's name: every layer's moments differ (equal ones would be
    // stored as copies of each other).
    let mut r = xorshift(
        k.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ xxhash_rust::xxh3::xxh3_64(t.name.as_bytes()),
    );
    match t.dtype {
        DType::F16 => {
            for e in t.data.chunks_exact_mut(2) {
                if r() % 100 < 13 {
                    e[0] ^= 1 + (r() % 3) as u8;
                }
            }
        }
        _ => {
            let second = t.name.ends_with(".v");
            let n = t.data.len() / 4;
            t.data = moment(n, r(), second);
        }
    }
}

fn to_module(tensors: &[Tensor], device: &Device) -> State {
    State {
        t: tensors
            .iter()
            .map(|t| {
                let dtype = match t.dtype {
                    DType::F16 => BurnDType::F16,
                    _ => BurnDType::F32,
                };
                let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
                let data = TensorData::from_bytes_vec(t.data.clone(), shape, dtype);
                Param::from_tensor(BurnTensor::from_data(data, (device, dtype)))
            })
            .collect(),
    }
}

fn blank(dtypes: &[DType], device: &Device) -> State {
    State {
        t: dtypes
            .iter()
            .map(|&d| {
                let dtype = if d == DType::F16 {
                    BurnDType::F16
                } else {
                    BurnDType::F32
                };
                Param::from_tensor(BurnTensor::zeros([ROWS, COLS], (device, dtype)))
            })
            .collect(),
    }
}

fn checksum(m: &State) -> u64 {
    m.t.iter()
        .map(|p| xxhash_rust::xxh3::xxh3_64(p.val().into_data().bytes()))
        .fold(0, |a, b| a.rotate_left(5) ^ b)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let millions: usize = args.first().map_or(Ok(100), |s| s.parse())?;
    let deltas: usize = args.get(1).map_or(Ok(3), |s| s.parse())?;
    let lossless = args.iter().any(|a| a == "lossless");
    let device = Device::wgpu_options().init()?;
    let layers = (millions * 1_000_000).div_ceil(ROWS * COLS);
    let params = layers * ROWS * COLS;
    println!(
        "state: {layers} layers of {ROWS}x{COLS} = {:.1}M params (f16 weights + f32 Adam m, v), chain: 1 full + {deltas} deltas, optimizer {}",
        params as f64 / 1e6,
        if lossless {
            "lossless"
        } else {
            "8-bit cluster"
        }
    );
    let t0 = Instant::now();
    let mut state: Vec<Tensor> = (0..layers)
        .into_par_iter()
        .flat_map_iter(|l| {
            let n = ROWS * COLS;
            let shape = vec![ROWS as u64, COLS as u64];
            [
                Tensor::new(
                    format!("t.{}", 3 * l),
                    DType::F16,
                    shape.clone(),
                    Role::Weight,
                    weights(n, l as u64),
                ),
                Tensor::new(
                    format!("t.{}", 3 * l + 1),
                    DType::F32,
                    shape.clone(),
                    Role::OptimizerMoment(1),
                    moment(n, 7 + l as u64, false),
                ),
                Tensor::new(
                    format!("t.{}", 3 * l + 2),
                    DType::F32,
                    shape,
                    Role::OptimizerMoment(2),
                    moment(n, 9 + l as u64, true),
                ),
            ]
        })
        .collect::<Result<_, _>>()?;
    state.sort_by_key(|t| t.name[2..].parse::<usize>().unwrap_or(0));
    let dir = tempfile::tempdir()?;
    let mut policy = Policy::default()
        .with_full_every(u32::MAX)
        .with_min_delta_gain(0.0);
    if !lossless {
        policy = policy.with_lossiness(Lossiness::LossyOptimizer {
            bits: QuantBits::B8,
        });
    }
    let mut store = Store::open_or_create(dir.path().join("bitsnap"), policy)?;
    let mut id = 0;
    for k in 0..=deltas {
        if k > 0 {
            state.par_iter_mut().for_each(|t| step(t, k as u64));
        }
        let r = store.save(&format!("step-{k}"), state.clone())?;
        id = r.info.id;
        println!(
            "  saved step-{k}: {} -> {} bytes",
            r.header.raw_bytes(),
            r.info.stored_bytes
        );
    }
    let bpk = dir.path().join("final.bpk");
    to_module(&state, &device).save_into(&mut BurnpackStore::from_file(&bpk))?;
    device.sync()?;
    let dense: u64 = state.iter().map(|t| t.data.len() as u64).sum();
    println!(
        "setup {:.1} s; final state {:.1} MB; burnpack file {:.1} MB; bitsnap chain {:.1} MB on disk",
        t0.elapsed().as_secs_f64(),
        dense as f64 / 1e6,
        std::fs::metadata(&bpk)?.len() as f64 / 1e6,
        store
            .snapshots()
            .iter()
            .map(|s| s.stored_bytes)
            .sum::<u64>() as f64
            / 1e6
    );
    drop(state);
    // A fresh reader: the writer keeps its latest save in memory, a restarted run does not.
    drop(store);
    let store = Store::open(dir.path().join("bitsnap"))?;

    let mut rows = Vec::new();
    let mut stages: Vec<Option<LoadStats>> = vec![None, None, None];
    for round in 0..3 {
        // (a) Burn's own store.
        let mut m = blank_like(&store, id, &device)?;
        device.sync()?;
        let t = Instant::now();
        m.load_from(&mut BurnpackStore::from_file(&bpk))?;
        device.sync()?;
        let a = t.elapsed();
        let ca = checksum(&m);
        drop(m);
        // (b) and (c).
        let mut row = vec![("(a) burnpack, Burn's store", a.as_secs_f64(), dense, ca)];
        for (label, exp) in [
            ("(b) bitsnap, CPU decode + dense upload", Expansion::Host),
            ("(c) bitsnap, GPU expansion", Expansion::OnDevice),
        ] {
            let m = blank_like(&store, id, &device)?;
            device.sync()?;
            let t = Instant::now();
            let snap = DeviceLoader::new(&device)
                .with_expansion(exp)
                .load(&store, id)?;
            let m = snap.apply_to_module(m, "")?;
            device.sync()?;
            let secs = t.elapsed().as_secs_f64();
            let stats: LoadStats = snap.stats.clone();
            drop(snap);
            if round == 0 {
                println!("  {label}: {:?}", stats);
            }
            let slot = &mut stages[row.len()];
            if slot.as_ref().is_none_or(|s| s.wall > stats.wall) {
                *slot = Some(stats.clone());
            }
            row.push((label, secs, stats.upload_bytes, checksum(&m)));
        }
        rows.push(row);
    }
    println!(
        "\n| method | restore s (best of 3) | host-to-device MB | tensors equal (a) | equal (b) |"
    );
    println!("|---|---:|---:|---|---|");
    for i in 0..3 {
        let best = rows.iter().map(|r| r[i].1).fold(f64::INFINITY, f64::min);
        let (label, _, bytes, sum) = rows[0][i];
        println!(
            "| {label} | {best:.3} | {:.1} | {} | {} |",
            bytes as f64 / 1e6,
            sum == rows[0][0].3,
            sum == rows[0][1].3
        );
    }
    println!(
        "\n| stages of the fastest load (s) | read (MB read) | checksum | decode | upload | kernels + sync | wall |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (i, st) in stages.iter().enumerate() {
        let Some(st) = st else { continue };
        let label = rows[0][i].0;
        println!(
            "| {label} | {:.3} ({:.0}) | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
            st.read.as_secs_f64(),
            st.read_bytes as f64 / 1e6,
            st.checksum.as_secs_f64(),
            st.cpu_decode.as_secs_f64(),
            st.upload.as_secs_f64(),
            st.kernels.as_secs_f64(),
            st.wall.as_secs_f64()
        );
    }
    Ok(())
}

/// A zero state of the snapshot's dtypes, on the device.
fn blank_like(
    store: &Store,
    id: u64,
    device: &Device,
) -> Result<State, Box<dyn std::error::Error>> {
    let mut dtypes: Vec<(usize, DType)> = store
        .header(id)?
        .entries
        .iter()
        .map(|e| (e.name[2..].parse::<usize>().unwrap_or(0), e.dtype))
        .collect();
    dtypes.sort_by_key(|d| d.0);
    Ok(blank(
        &dtypes.into_iter().map(|d| d.1).collect::<Vec<_>>(),
        device,
    ))
}
