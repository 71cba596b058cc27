//! The loss of every step, kept in memory and appended to `losses.tsv` so a restarted
//! process can compare the steps it replays with what the crashed one logged.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use crate::Error;

/// Step → training loss, backed by a tab-separated file (`step`, `loss`, `f32 bits`).
#[derive(Debug)]
pub struct LossLog {
    path: PathBuf,
    file: File,
    losses: BTreeMap<u64, f32>,
}

impl LossLog {
    /// Creates an empty log at `path`, or with `keep`, reads the one there (missing: empty).
    pub fn open(path: &Path, keep: bool) -> Result<LossLog, Error> {
        let mut losses = BTreeMap::new();
        if keep && path.exists() {
            let f = File::open(path).map_err(Error::io(path))?;
            for line in BufReader::new(f).lines() {
                let line = line.map_err(Error::io(path))?;
                let mut cols = line.split('\t');
                let step = cols.next().and_then(|s| s.parse::<u64>().ok());
                let bits = cols.nth(1).and_then(|s| u32::from_str_radix(s, 16).ok());
                // A line cut short by a crash is skipped: its step is replayed anyway.
                if let (Some(step), Some(bits)) = (step, bits) {
                    losses.insert(step, f32::from_bits(bits));
                }
            }
        }
        let mut log = LossLog {
            path: path.to_path_buf(),
            file: File::create(path).map_err(Error::io(path))?,
            losses: BTreeMap::new(),
        };
        for (step, loss) in losses {
            log.push(step, loss)?;
        }
        Ok(log)
    }

    /// Records the loss of `step`.
    pub fn push(&mut self, step: u64, loss: f32) -> Result<(), Error> {
        self.losses.insert(step, loss);
        writeln!(self.file, "{step}\t{loss}\t{:08x}", loss.to_bits()).map_err(Error::io(&self.path))
    }

    /// Forgets the steps after `step` (they will be trained again) and returns them.
    pub fn truncate_after(&mut self, step: u64) -> Result<BTreeMap<u64, f32>, Error> {
        let lost = self.losses.split_off(&(step + 1));
        self.file = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&self.path)
            .map_err(Error::io(&self.path))?;
        let kept = std::mem::take(&mut self.losses);
        for (s, l) in kept {
            self.push(s, l)?;
        }
        Ok(lost)
    }

    /// Every logged step and its loss, in step order.
    pub fn losses(&self) -> &BTreeMap<u64, f32> {
        &self.losses
    }
}
