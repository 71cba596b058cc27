//! Save and restore throughput of one checkpoint series to a local S3-compatible server
//! (`s3s-fs`, started here on 127.0.0.1 over a temporary directory) and to a local
//! directory: same data, same run.
//!
//! ```sh
//! cargo run --release -p bitsnap-core --features remote --example store_bench -- [MIB] [REPEATS]
//! ```
//!
//! MIB (default 256) is the raw size of one checkpoint: f32 weights with random
//! mantissas; the second save changes 1% of the elements (a delta). Each store gets the
//! same saves; restores come from a fresh handle (nothing from memory). Throughput is raw
//! bytes per wall-clock second (1 GB = 1e9 B), the median of REPEATS (default 3) runs.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitsnap_core::backend::{Backend, LocalDir, ObjectBackend};
use bitsnap_core::{Policy, Role, Store, Tensor};

const KEY: &str = "bench";
const SECRET: &str = "bench-secret";

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// `mib` MiB of f32 weights in 16 MiB tensors.
fn checkpoint(mib: usize) -> Vec<Tensor> {
    let per = 4 << 20; // elements per tensor
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    (0..mib.div_ceil(16))
        .map(|i| {
            let w: Vec<f32> = (0..per)
                .map(|_| ((xorshift(&mut seed) >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04)
                .collect();
            Tensor::from_f32(format!("layer{i}.weight"), &[per as u64], Role::Weight, &w)
                .expect("tensor")
        })
        .collect()
}

/// `ts` with 1% of elements nudged.
fn step(ts: &[Tensor]) -> Vec<Tensor> {
    let mut seed = 12345u64;
    ts.iter()
        .map(|t| {
            let mut w = t.to_f32().expect("f32");
            for x in w.iter_mut() {
                if xorshift(&mut seed).is_multiple_of(100) {
                    *x += 1e-4;
                }
            }
            Tensor::from_f32(&t.name, &t.shape, t.role, &w).expect("tensor")
        })
        .collect()
}

fn start_server(root: &std::path::Path) -> Result<(Server, String), Box<dyn std::error::Error>> {
    let bin = std::env::var_os("BITSNAP_S3S_FS")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|d| d.join("s3s-fs"))
                .find(|p| p.is_file())
        })
        .ok_or("s3s-fs not found on PATH (cargo install s3s-fs --locked)")?;
    std::fs::create_dir_all(root.join("bench"))?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = Command::new(bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", KEY, "--secret-key", SECRET])
        .arg(root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err("s3s-fs did not start".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((server, format!("http://127.0.0.1:{port}")))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map_or(Ok(256), |a| a.parse())?;
    let repeats: usize = args.next().map_or(Ok(3), |a| a.parse())?;
    let tmp = tempfile::tempdir()?;
    let (_server, endpoint) = start_server(&tmp.path().join("s3"))?;
    let full = checkpoint(mib);
    let delta = step(&full);
    let raw: u64 = full.iter().map(|t| t.data.len() as u64).sum();
    println!(
        "checkpoint: {:.1} MB raw f32, {} tensors; {} threads; median of {repeats}",
        raw as f64 / 1e6,
        full.len(),
        rayon::current_num_threads()
    );
    println!(
        "{:<22} {:>10} {:>10} {:>13} {:>13} {:>12}",
        "store", "save full", "save delta", "restore full", "restore delta", "stored MB"
    );
    let opts = [
        ("aws_endpoint", endpoint.as_str()),
        ("aws_access_key_id", KEY),
        ("aws_secret_access_key", SECRET),
        ("aws_region", "us-east-1"),
        ("aws_allow_http", "true"),
    ];
    for kind in ["local directory", "S3 (s3s-fs, 127.0.0.1)"] {
        let mut times = [vec![], vec![], vec![], vec![]];
        let mut stored = 0;
        for r in 0..repeats {
            let backend: Arc<dyn Backend> = if kind.starts_with("local") {
                let d = tmp.path().join(format!("local-{r}"));
                std::fs::create_dir_all(&d)?;
                Arc::new(LocalDir::new(d))
            } else {
                Arc::new(ObjectBackend::from_url(
                    &format!("s3://bench/run-{r}"),
                    &opts,
                )?)
            };
            let mut store = Store::open_or_create_backend(backend.clone(), Policy::default())?;
            let t = Instant::now();
            let a = store.save("step-0", full.clone())?;
            times[0].push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let b = store.save("step-1", delta.clone())?;
            times[1].push(t.elapsed().as_secs_f64());
            assert_eq!(b.info.base, Some(a.info.id), "second save is a delta");
            stored = a.info.stored_bytes + b.info.stored_bytes;
            drop(store);
            let fresh = Store::open_backend(backend)?;
            let t = Instant::now();
            let got = fresh.load(a.info.id)?;
            times[2].push(t.elapsed().as_secs_f64());
            assert!(got.tensors == full && !got.from_memory);
            let t = Instant::now();
            let got = fresh.load(b.info.id)?;
            times[3].push(t.elapsed().as_secs_f64());
            assert!(got.tensors == delta && !got.from_memory);
        }
        let gbps = |i: usize| raw as f64 / median(times[i].clone()) / 1e9;
        println!(
            "{kind:<22} {:>7.2} GB/s {:>7.2} GB/s {:>10.2} GB/s {:>10.2} GB/s {:>12.1}",
            gbps(0),
            gbps(1),
            gbps(2),
            gbps(3),
            stored as f64 / 1e6
        );
    }
    Ok(())
}
