//! How fast a trainer hands a snapshot to its keeper (`KeeperClient::put`) and gets it
//! back (`KeeperClient::latest`), against baselines measured in the same run on the same
//! bytes: one `memcpy` (a `Vec` clone: the least any hand-over that copies costs) and one
//! xxh3-64 pass (the checksum each side computes).
//!
//! ```sh
//! cargo run -p bitsnap-core --example keeper_bench -- [MIB] [ROUNDS]
//! ```
//!
//! MIB (default 300): raw size of the state, in tensors of 1 to 16 MiB plus 200 small
//! ones (biases, norms) of 4 KiB; ROUNDS (default 5). The keeper runs in this process on
//! its own threads, reached through its Unix socket like any client; it persists nothing
//! during the run (persist-every 0). Prints medians in GB/s (1e9 bytes/s) and ratios.
//! Wall-clock, so machine-dependent: not a test.

use std::time::{Duration, Instant};

use bitsnap_core::keeper::{Keeper, KeeperClient, KeeperOptions};
use bitsnap_core::{DType, Policy, Role, Store, Tensor};

fn state(mib: usize) -> Vec<Tensor> {
    let mut out = Vec::new();
    let mut left = mib << 20;
    let mut i = 0u64;
    let mut seed = 0x9e3779b97f4a7c15u64;
    while left > 0 {
        let len = ((1usize << 20) << (i % 5)).min(left);
        let data: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        out.push(
            Tensor::new(
                format!("big.{i}"),
                DType::U8,
                vec![len as u64],
                Role::Weight,
                data,
            )
            .unwrap(),
        );
        left -= len;
        i += 1;
    }
    for j in 0..200 {
        out.push(
            Tensor::new(
                format!("small.{j}"),
                DType::F32,
                vec![1024],
                Role::Weight,
                vec![j as u8; 4096],
            )
            .unwrap(),
        );
    }
    out
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mib: usize = args.first().map_or(Ok(300), |a| a.parse())?;
    let rounds: usize = args.get(1).map_or(Ok(5), |a| a.parse())?;
    let tensors = state(mib);
    let bytes: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();

    let dir = tempfile::tempdir()?;
    let store = Store::open_or_create(dir.path().join("store"), Policy::default())?;
    let socket = dir.path().join("keeper.sock");
    let keeper = Keeper::spawn(
        store,
        &socket,
        KeeperOptions::default().with_persist_every(0),
    )?;
    let mut client = KeeperClient::connect(&socket)?;

    let (mut copy, mut hash, mut put, mut latest) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let t = Instant::now();
        let c = tensors.clone();
        copy.push(t.elapsed());
        drop(c);
        let t = Instant::now();
        let h = tensors
            .iter()
            .fold(0u64, |a, t| a ^ xxhash_rust::xxh3::xxh3_64(&t.data));
        hash.push(t.elapsed());
        std::hint::black_box(h);
        let r = client.put("bench", "s", &[], &tensors)?;
        put.push(r.elapsed);
        let t = Instant::now();
        let got = client.latest("bench")?.ok_or("no snapshot")?;
        latest.push(t.elapsed());
        assert_eq!(got.tensors.len(), tensors.len());
    }
    let (copy, hash, put, latest) = (median(copy), median(hash), median(put), median(latest));
    println!(
        "state: {:.3} GB in {} tensors, {rounds} rounds, medians",
        bytes as f64 / 1e9,
        tensors.len()
    );
    println!(
        "memcpy (Vec clone)    {:>8.3} s {:>6.2} GB/s",
        copy.as_secs_f64(),
        gbps(bytes, copy)
    );
    println!(
        "xxh3-64, one thread   {:>8.3} s {:>6.2} GB/s",
        hash.as_secs_f64(),
        gbps(bytes, hash)
    );
    println!(
        "put (until held)      {:>8.3} s {:>6.2} GB/s  {:.2}x memcpy time",
        put.as_secs_f64(),
        gbps(bytes, put),
        put.as_secs_f64() / copy.as_secs_f64()
    );
    println!(
        "latest (from memory)  {:>8.3} s {:>6.2} GB/s  {:.2}x memcpy time",
        latest.as_secs_f64(),
        gbps(bytes, latest),
        latest.as_secs_f64() / copy.as_secs_f64()
    );
    keeper.shutdown()?;
    Ok(())
}
