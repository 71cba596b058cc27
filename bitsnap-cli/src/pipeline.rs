//! The I/O side of `pack`: reading a safetensors file on all threads, and the
//! per-stage time breakdown `pack --stages` prints.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use bitsnap_core::backend::read_exact_at_parallel;
use bitsnap_core::safetensors::{self, Metadata};
use bitsnap_core::{Error, Role, SaveTimings, Tensor};
use rayon::prelude::*;

use crate::table::{Align, Table};

/// An I/O error on `path`, as the core reports them.
pub(crate) fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads every tensor of the safetensors file at `path` (its header re-read and
/// checked), tensors in parallel and large tensors in parallel pieces
/// ([`read_exact_at_parallel`]); roles from `role` else guessed from the name. What
/// [`safetensors::read_file`] returns, at the speed of the page cache rather than of one
/// thread's copy.
pub fn read_tensors(
    path: &Path,
    role: impl Fn(&str) -> Option<Role> + Sync,
) -> Result<(Vec<Tensor>, Metadata), Error> {
    let index = safetensors::read_index(path)?;
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    let tensors = index
        .tensors
        .par_iter()
        .map(|entry| {
            let alloc = || Error::Alloc {
                what: format!("tensor `{}` of {}", entry.name, path.display()),
                bytes: entry.len,
            };
            let len = usize::try_from(entry.len).map_err(|_| alloc())?;
            // Checked fallibly, then allocated zeroed: the pages are first touched by
            // the parallel read, not by a serial zero fill.
            let mut probe: Vec<u8> = Vec::new();
            probe.try_reserve_exact(len).map_err(|_| alloc())?;
            drop(probe);
            let mut data = vec![0u8; len];
            read_exact_at_parallel(&file, path, entry.offset, &mut data)?;
            let role = role(&entry.name).unwrap_or_else(|| Role::guess(&entry.name));
            Tensor::new(
                entry.name.clone(),
                entry.dtype,
                entry.shape.clone(),
                role,
                data,
            )
            .map_err(|e| Error::Malformed {
                file: path.to_path_buf(),
                tensor: Some(entry.name.clone()),
                what: "tensor",
                offset: entry.offset,
                reason: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok((tensors, index.metadata))
}

/// Time per stage of a series of saves: reading the input, then the save's own stages
/// ([`SaveTimings`]).
#[derive(Debug, Clone, Default)]
pub struct StageTotals {
    /// Reading the input files.
    pub read: Duration,
    /// The saves' stages, summed.
    pub save: SaveTimings,
    /// Raw bytes saved.
    pub raw_bytes: u64,
}

impl StageTotals {
    /// Adds one save: its read time, its stages and its raw bytes.
    pub fn add(&mut self, read: Duration, save: &SaveTimings, raw_bytes: u64) {
        self.read += read;
        self.save.add(save);
        self.raw_bytes += raw_bytes;
    }

    /// Every stage, read first, as (name, time).
    pub fn stages(&self) -> Vec<(&'static str, Duration)> {
        std::iter::once(("read", self.read))
            .chain(self.save.stages())
            .collect()
    }

    /// The sum of every stage.
    pub fn total(&self) -> Duration {
        self.read + self.save.total()
    }

    /// One line: `read 0.31 s, base 0.00 s, …`.
    pub fn line(&self) -> String {
        self.stages()
            .iter()
            .map(|(name, t)| format!("{name} {:.3} s", t.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A table: per stage its seconds, share of the total and GB/s of raw bytes.
    pub fn write_table(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let mut table = Table::new(&[
            ("stage", Align::Left),
            ("seconds", Align::Right),
            ("share", Align::Right),
            ("raw GB/s", Align::Right),
        ]);
        let total = self.total().as_secs_f64();
        let rows = self
            .stages()
            .into_iter()
            .chain(std::iter::once(("total", self.total())));
        for (name, t) in rows {
            let s = t.as_secs_f64();
            table.row(vec![
                name.to_string(),
                format!("{s:.3}"),
                format!("{:.1}%", 100.0 * s / total.max(f64::MIN_POSITIVE)),
                gbps(self.raw_bytes, t),
            ]);
        }
        table.write(out)
    }
}

/// `bytes` over `t` in GB/s (1 GB = 1e9 bytes), or `-` under a millisecond (a stage
/// that did not run: a base taken from memory).
pub fn gbps(bytes: u64, t: Duration) -> String {
    let s = t.as_secs_f64();
    if s < 1e-3 {
        "-".into()
    } else {
        format!("{:.2}", bytes as f64 / s / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_read_matches_the_safetensors_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        // One tensor over the parallel threshold (split in pieces), a few small ones.
        let big: Vec<f32> = (0..(9 << 20)).map(|i| i as f32 * 0.5).collect();
        let tensors = vec![
            Tensor::from_f32("big", &[9 << 20], Role::Weight, &big).unwrap(),
            Tensor::from_f32("small", &[3], Role::Weight, &[1.0, 2.0, 3.0]).unwrap(),
            Tensor::from_f32("exp_avg", &[2], Role::Weight, &[4.0, 5.0]).unwrap(),
        ];
        let md = vec![("k".to_string(), "v".to_string())];
        safetensors::write_file(&path, &tensors, &md).unwrap();
        let want = safetensors::read_file(&path, |_| None).unwrap();
        let got = read_tensors(&path, |_| None).unwrap();
        assert_eq!(got, want);
        let ruled = read_tensors(&path, |n| (n == "small").then_some(Role::Other)).unwrap();
        assert_eq!(
            ruled.0.iter().find(|t| t.name == "small").unwrap().role,
            Role::Other
        );
    }

    #[test]
    fn a_truncated_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let t = Tensor::from_f32("w", &[1000], Role::Weight, &[0.0; 1000]).unwrap();
        safetensors::write_file(&path, &[t], &[]).unwrap();
        let f = File::options().write(true).open(&path).unwrap();
        f.set_len(f.metadata().unwrap().len() - 10).unwrap();
        // The header check refuses it before any tensor is read.
        let e = read_tensors(&path, |_| None).unwrap_err();
        assert!(e.to_string().contains("t.safetensors"), "{e}");
    }

    #[test]
    fn totals_add_up() {
        let mut totals = StageTotals::default();
        let save = SaveTimings::default();
        totals.add(Duration::from_millis(500), &save, 1_000_000_000);
        totals.add(Duration::from_millis(500), &save, 1_000_000_000);
        assert_eq!(totals.total(), Duration::from_secs(1));
        assert_eq!(gbps(totals.raw_bytes, totals.total()), "2.00");
        let mut out = Vec::new();
        totals.write_table(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("read") && text.contains("100.0%"), "{text}");
    }
}
