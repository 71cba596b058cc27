//! What keep-last-N retention costs per save: save + delete of the oldest snapshot (the
//! chain root), as Burn's `KeepLastN` and `StepSaver`'s `keep_last` do, in two modes on
//! the same data in one run:
//!
//! - `retire` (today's `Store::delete`): the deleted root is retired, nothing re-encoded;
//! - `rebase` (`Store::delete` + `Store::compact`, what `delete` did before retention):
//!   the root's dependant is rewritten as a full snapshot on every save.
//!
//! ```sh
//! cargo run -p bitsnap-core --example retention_cost -- [MIB] [SAVES] [KEEP]
//! ```
//!
//! MIB (default 100) is the raw size of the state: f32 weights with random mantissas,
//! 1% of the elements changed per save; SAVES (default 16) saves with full_every 8; KEEP
//! (default 2). Prints the median and mean per save (save + delete [+ compact]) and the
//! most snapshot files on disk. Wall-clock, so machine-dependent: not a test.

use std::time::{Duration, Instant};

use bitsnap_core::{Policy, Role, Store, Tensor};

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// `mib` MiB of f32 weights in 4 MiB tensors.
fn state(mib: usize) -> Vec<Vec<f32>> {
    let per = 1 << 20;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    (0..mib.div_ceil(4))
        .map(|_| {
            (0..per)
                .map(|_| ((xorshift(&mut seed) >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04)
                .collect()
        })
        .collect()
}

fn tensors(ws: &[Vec<f32>]) -> Vec<Tensor> {
    ws.iter()
        .enumerate()
        .map(|(i, w)| {
            Tensor::from_f32(
                format!("layer{i}.weight"),
                &[w.len() as u64],
                Role::Weight,
                w,
            )
            .expect("tensor")
        })
        .collect()
}

/// 1% of the elements nudged.
fn step(ws: &mut [Vec<f32>], seed: &mut u64) {
    for w in ws {
        for _ in 0..w.len() / 100 {
            let i = (xorshift(seed) % w.len() as u64) as usize;
            w[i] += 1e-3;
        }
    }
}

fn run(mode: &str, mib: usize, saves: usize, keep: usize) -> (Vec<Duration>, usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store =
        Store::open_or_create(dir.path(), Policy::default().with_full_every(8)).expect("store");
    let mut ws = state(mib);
    let mut seed = 7u64;
    let mut times = Vec::new();
    let mut most_files = 0;
    for s in 0..saves {
        step(&mut ws, &mut seed);
        let ts = tensors(&ws);
        let t0 = Instant::now();
        store.save(&format!("step-{s}"), ts).expect("save");
        while store.snapshots().len() > keep {
            store.delete(store.snapshots()[0].id).expect("delete");
            if mode == "rebase" {
                store.compact().expect("compact");
            }
        }
        times.push(t0.elapsed());
        let files = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".bsnap"))
            })
            .count();
        most_files = most_files.max(files);
    }
    (times, most_files)
}

fn main() {
    let arg = |i: usize, d: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(d)
    };
    let (mib, saves, keep) = (arg(1, 100), arg(2, 16), arg(3, 2));
    println!(
        "{mib} MiB state, {saves} saves, keep_last({keep}), full_every 8, {} threads",
        rayon::current_num_threads()
    );
    for mode in ["rebase", "retire"] {
        let (mut times, files) = run(mode, mib, saves, keep);
        // The first `keep` saves delete nothing.
        let steady: Vec<Duration> = times.split_off(keep.min(times.len()));
        let mut sorted = steady.clone();
        sorted.sort();
        let median = sorted.get(sorted.len() / 2).copied().unwrap_or_default();
        let mean = steady.iter().sum::<Duration>() / steady.len().max(1) as u32;
        println!(
            "{mode:>7}: per save + keep_last: median {median:.2?}, mean {mean:.2?}; at most {files} snapshot files"
        );
    }
}
