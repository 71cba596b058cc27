//! `bitsnap bench --io`: pack, unpack and verify against the disk and zstd, on the same
//! files, in one run.
//!
//! Every figure is wall clock, and every output is on disk and fsynced before its clock
//! stops; GB/s are of raw (safetensors tensor) bytes, 1 GB = 1e9 bytes:
//!
//! | row | what is timed |
//! |---|---|
//! | `disk write+fsync` | 64 MiB blocks written to a file, then fsync (`dd … conv=fdatasync`) |
//! | `pack` | `bitsnap pack` of every file into a new store (read, encode, write, fsync, commit) |
//! | `zstd -1 -T<n>` | the `zstd` binary compressing every file, outputs fsynced |
//! | `verify` | `bitsnap verify` of the store (every file read, decoded and checked) |
//! | `unpack` (full, last) | `bitsnap unpack` of the first snapshot and of the last one (a delta) |
//! | `zstd -d` | the `zstd` binary decompressing the last file's `.zst`, output fsynced |
//!
//! plus the per-stage breakdown of the pack, its peak RSS against the largest input file
//! (Linux: `VmHWM`, reset before the pack), and how the adaptive encoder (every tensor
//! of the last file against the one before it, as `pack` encodes it) scales from 1 to
//! all threads.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bitsnap_core::{Policy, Store, Tensor};

use crate::error::CliError;
use crate::pipeline::{self, StageTotals, gbps};
use crate::roles::Resolved as Roles;
use crate::table::{Align, Table};

/// Bytes written by the disk baseline: the raw size of the series, at least 256 MiB and
/// at most 4 GiB.
fn disk_probe_bytes(raw: u64) -> u64 {
    raw.clamp(256 << 20, 4 << 30)
}

/// What `bitsnap bench --io` measured.
#[derive(Debug)]
pub struct IoReport {
    /// Rayon threads of the run.
    pub threads: usize,
    /// Raw tensor bytes of all files.
    pub raw_bytes: u64,
    /// Size of the largest input file.
    pub largest_file: u64,
    /// (row, seconds, raw bytes it moved, baseline row it is compared with).
    pub rows: Vec<(String, Duration, u64, Option<&'static str>)>,
    /// Stage totals of the pack.
    pub stages: StageTotals,
    /// Peak resident memory during the pack, if the OS says.
    pub pack_peak_rss: Option<u64>,
    /// Encode seconds of the last file per thread count.
    pub scaling: Vec<(usize, Duration)>,
    /// Bytes the scaling run encoded.
    pub scaling_bytes: u64,
    /// Why there is no zstd row, if there is none.
    pub zstd_missing: Option<String>,
}

/// Runs the I/O benchmark on `files` (oldest first), writing stores and outputs under
/// `work` (a directory created if missing; what the run writes there is removed), with
/// the `zstd` binary `zstd` (`None`: found on `PATH`).
pub fn run(
    files: &[PathBuf],
    roles: &Roles,
    policy: Policy,
    work: &Path,
    zstd: Option<&Path>,
) -> Result<IoReport, CliError> {
    let io = |p: &Path, e| CliError::Core(crate::pipeline::io_error(p, e));
    let work = WorkDir(work.join(format!("bitsnap-bench-io.{}", std::process::id())));
    let dir = work.0.as_path();
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut sizes = Vec::new();
    for f in files {
        sizes.push(std::fs::metadata(f).map_err(|e| io(f, e))?.len());
    }
    let largest_file = sizes.iter().copied().max().unwrap_or(0);
    let mut raw_bytes = 0;
    let mut rows = Vec::new();

    // The disk.
    let probe = dir.join("disk-probe");
    let n = disk_probe_bytes(sizes.iter().sum());
    let t = disk_write(&probe, n).map_err(|e| io(&probe, e))?;
    std::fs::remove_file(&probe).map_err(|e| io(&probe, e))?;
    rows.push(("disk write+fsync".to_string(), t, n, None));

    // pack.
    let store_dir = dir.join("store");
    reset_peak_rss();
    let mut stages = StageTotals::default();
    let start = Instant::now();
    {
        let mut store = Store::open_or_create(&store_dir, policy)?;
        for f in files {
            let read = Instant::now();
            let (tensors, metadata) = pipeline::read_tensors(f, |n| roles.role(n))?;
            let read = read.elapsed();
            let raw: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
            raw_bytes += raw;
            let name = crate::store::file_stem(f);
            let report = store.save_with_metadata(&name, tensors, metadata)?;
            stages.add(read, &report.timings, raw);
        }
    }
    let pack = start.elapsed();
    let pack_peak_rss = peak_rss();
    rows.push(("pack".into(), pack, raw_bytes, Some("zstd -1")));

    // zstd -1 -T<threads> on the same files.
    let threads = rayon::current_num_threads();
    let zstd_bin = zstd.map(Path::to_path_buf).or_else(|| find_on_path("zstd"));
    let mut zstd_missing = None;
    let mut last_zst = None;
    match &zstd_bin {
        Some(bin) => {
            let start = Instant::now();
            for (i, f) in files.iter().enumerate() {
                let out = dir.join(format!("{i}.zst"));
                run_tool(
                    Command::new(bin)
                        .args(["-1", &format!("-T{threads}"), "-q", "-f"])
                        .arg(f)
                        .arg("-o")
                        .arg(&out),
                )?;
                sync_file(&out).map_err(|e| io(&out, e))?;
                last_zst = Some(out);
            }
            rows.push((
                format!("zstd -1 -T{threads}"),
                start.elapsed(),
                raw_bytes,
                None,
            ));
        }
        None => zstd_missing = Some("no `zstd` binary on PATH (see --zstd)".into()),
    }

    // verify.
    let store = Store::open(&store_dir)?;
    let start = Instant::now();
    let report = store.verify()?;
    let verify = start.elapsed();
    if let Some((id, e)) = report.failed.first() {
        return Err(CliError::Failed(format!(
            "bench --io: snapshot {id} of the store it packed does not verify: {e}"
        )));
    }
    rows.push(("verify".into(), verify, raw_bytes, None));

    // unpack: the first snapshot (full) and the last one.
    let snaps: Vec<_> = store.snapshots().to_vec();
    let mut picks = vec![("unpack (first, full)", snaps.first())];
    if snaps.len() > 1 {
        picks.push(("unpack (last)", snaps.last()));
    }
    for (label, info) in picks {
        let Some(info) = info else { continue };
        let out = dir.join("unpacked.safetensors");
        let start = Instant::now();
        crate::unpack::restore(&store, info.id, &out)?;
        rows.push((
            label.into(),
            start.elapsed(),
            info.raw_bytes,
            Some("zstd -d"),
        ));
        std::fs::remove_file(&out).map_err(|e| io(&out, e))?;
    }
    drop(store);

    // zstd -d of the last file.
    if let (Some(bin), Some(zst)) = (&zstd_bin, &last_zst) {
        let out = dir.join("zstd-d.safetensors");
        let start = Instant::now();
        run_tool(
            Command::new(bin)
                .args(["-d", "-q", "-f"])
                .arg(zst)
                .arg("-o")
                .arg(&out),
        )?;
        sync_file(&out).map_err(|e| io(&out, e))?;
        let raw = snaps.last().map_or(0, |s| s.raw_bytes);
        rows.push(("zstd -d".into(), start.elapsed(), raw, None));
    }

    // Adaptive encode of the last file against the one before it, 1 to N threads.
    let (scaling, scaling_bytes) = encode_scaling(files, roles, policy, threads)?;
    Ok(IoReport {
        threads,
        raw_bytes,
        largest_file,
        rows,
        stages,
        pack_peak_rss,
        scaling,
        scaling_bytes,
        zstd_missing,
    })
}

/// A directory the run owns: removed, with what it holds, when dropped.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Seconds to encode the last file (against the one before it, if any) with the policy,
/// as `pack` does (casts, copies and optimizer replay weighed beside the codecs), on 1,
/// 2, 4, … and `threads` threads.
fn encode_scaling(
    files: &[PathBuf],
    roles: &Roles,
    policy: Policy,
    threads: usize,
) -> Result<(Vec<(usize, Duration)>, u64), CliError> {
    let Some(last) = files.last() else {
        return Ok((Vec::new(), 0));
    };
    let (tensors, metadata) = pipeline::read_tensors(last, |n| roles.role(n))?;
    let base: Vec<Tensor> = match files.len() {
        0 | 1 => Vec::new(),
        n => pipeline::read_tensors(&files[n - 2], |n| roles.role(n))?.0,
    };
    let by_name: std::collections::HashMap<&str, &Tensor> =
        base.iter().map(|t| (t.name.as_str(), t)).collect();
    let bytes: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
    let mut counts: Vec<usize> = std::iter::successors(Some(1usize), |n| Some(n * 2))
        .take_while(|&n| n < threads)
        .collect();
    counts.push(threads);
    let mut out = Vec::new();
    for n in counts {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map_err(|e| CliError::Failed(format!("cannot start {n} threads: {e}")))?;
        let t = pool.install(|| {
            let start = Instant::now();
            bitsnap_core::references::encode_snapshot(&policy, &tensors, &by_name, &metadata, true)
                .map(|_| start.elapsed())
        })?;
        out.push((n, t));
    }
    Ok((out, bytes))
}

impl IoReport {
    /// The report as markdown tables.
    pub fn write_markdown(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(
            out,
            "I/O benchmark: {} threads, {} raw bytes, largest file {}\n",
            self.threads,
            bitsnap_core::fmt::bytes(self.raw_bytes),
            bitsnap_core::fmt::bytes(self.largest_file),
        )?;
        let mut t = Table::new(&[
            ("operation", Align::Left),
            ("seconds", Align::Right),
            ("raw GB/s", Align::Right),
            ("vs baseline", Align::Left),
        ]);
        let find = |prefix: &str| {
            self.rows
                .iter()
                .find(|r| r.0.starts_with(prefix))
                .map(|r| r.1)
        };
        let disk = find("disk");
        for (name, secs, bytes, baseline) in &self.rows {
            let mut vs = Vec::new();
            if let Some(b) = baseline.and_then(find) {
                vs.push(format!(
                    "{:.2}x {}",
                    b.as_secs_f64() / secs.as_secs_f64(),
                    baseline.unwrap_or_default()
                ));
            }
            if name == "pack"
                && let Some(d) = disk
            {
                let disk_gbps = self.rows[0].2 as f64 / d.as_secs_f64();
                let pack_gbps = *bytes as f64 / secs.as_secs_f64();
                vs.push(format!("{:.2}x disk GB/s", pack_gbps / disk_gbps));
            }
            t.row(vec![
                name.clone(),
                format!("{:.3}", secs.as_secs_f64()),
                gbps(*bytes, *secs),
                vs.join(", "),
            ]);
        }
        t.write(out)?;
        if let Some(why) = &self.zstd_missing {
            writeln!(out, "\nzstd rows missing: {why}")?;
        }
        match self.pack_peak_rss {
            Some(rss) => writeln!(
                out,
                "\npack peak RSS {} = {:.2}x the largest file",
                bitsnap_core::fmt::bytes(rss),
                rss as f64 / self.largest_file.max(1) as f64
            )?,
            None => writeln!(out, "\npack peak RSS: not available on this OS")?,
        }
        writeln!(out, "\npack stages (summed over the files):")?;
        self.stages.write_table(out)?;
        writeln!(out, "\nadaptive encode of the last file, by threads:")?;
        let mut s = Table::new(&[
            ("threads", Align::Right),
            ("seconds", Align::Right),
            ("raw GB/s", Align::Right),
            ("speedup", Align::Right),
        ]);
        let one = self.scaling.first().map(|s| s.1.as_secs_f64());
        for (n, d) in &self.scaling {
            s.row(vec![
                n.to_string(),
                format!("{:.3}", d.as_secs_f64()),
                gbps(self.scaling_bytes, *d),
                one.map_or("-".into(), |o| format!("{:.2}x", o / d.as_secs_f64())),
            ]);
        }
        s.write(out)
    }
}

/// Writes `n` bytes in 64 MiB blocks to `path`, then fsyncs: the time both took.
fn disk_write(path: &Path, n: u64) -> std::io::Result<Duration> {
    const BLOCK: usize = 64 << 20;
    // Bytes that are not all zero, so no layer below can skip them.
    let block: Vec<u8> = (0..BLOCK)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8)
        .collect();
    let start = Instant::now();
    let mut f = File::create(path)?;
    let mut left = n;
    while left > 0 {
        let k = left.min(BLOCK as u64) as usize;
        f.write_all(&block[..k])?;
        left -= k as u64;
    }
    f.sync_all()?;
    Ok(start.elapsed())
}

fn sync_file(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

fn run_tool(cmd: &mut Command) -> Result<(), CliError> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| CliError::Failed(format!("cannot run {shown}: {e}")))?;
    if !status.success() {
        return Err(CliError::Failed(format!("{shown} failed: {status}")));
    }
    Ok(())
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// Resets the peak RSS the kernel reports (`VmHWM`), where it can.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's peak resident memory since the last reset, if the OS says.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitsnap_core::{Role, safetensors};

    #[test]
    fn a_small_series_runs_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = Vec::new();
        let mut w: Vec<f32> = (0..200_000).map(|i| (i as f32).sin()).collect();
        for step in 0..2 {
            w[step * 7] += 1.0;
            let t = Tensor::from_f32("w", &[200_000], Role::Weight, &w).unwrap();
            let p = dir.path().join(format!("s{step}.safetensors"));
            safetensors::write_file(&p, &[t], &[]).unwrap();
            files.push(p);
        }
        let roles = crate::roles::resolve(&[], &crate::store::read_indexes(&files).unwrap());
        // A zstd path that does not exist: the run fails naming it, or, with no zstd
        // at all, says the rows are missing.
        let report = run(
            &files,
            &roles,
            Policy::default(),
            &dir.path().join("work"),
            None,
        )
        .unwrap();
        let names: Vec<&str> = report.rows.iter().map(|r| r.0.as_str()).collect();
        for want in ["disk write+fsync", "pack", "verify", "unpack (last)"] {
            assert!(names.contains(&want), "{names:?}");
        }
        assert_eq!(report.raw_bytes, 1_600_000);
        assert_eq!(
            report.zstd_missing.is_none(),
            names.iter().any(|n| n.starts_with("zstd -1"))
        );
        let threads: Vec<usize> = report.scaling.iter().map(|s| s.0).collect();
        assert_eq!(threads.last(), Some(&rayon::current_num_threads()));
        let mut text = Vec::new();
        report.write_markdown(&mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("pack stages") && text.contains("encode"),
            "{text}"
        );
        // The work directory is cleaned up.
        assert_eq!(
            std::fs::read_dir(dir.path().join("work")).unwrap().count(),
            0
        );
    }
}
