//! `bitsnap verify`: decode every snapshot and check every checksum.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use crate::error::CliError;
use crate::progress;
use crate::store::open_store;

/// The long help of the command.
pub fn long_about() -> String {
    "\
Decode every snapshot of a store and check every checksum: the manifest, each file's \
header, every payload, every decoded tensor and the links between deltas and their \
bases. Prints one line per snapshot, `ok` or `FAILED` with the error (naming the file, \
tensor and offset), then a line per orphan file (left by an interrupted save; removed by \
the next `pack`). Exits 1 if any snapshot failed."
        .to_string()
}

/// Arguments of `bitsnap verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Store directory, or an `s3://bucket/prefix` URL.
    #[arg(value_name = "STORE_DIR")]
    store: PathBuf,
}

/// Runs `bitsnap verify`.
pub fn run(args: VerifyArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let store = open_store(&args.store)?;
    let bar = progress::spinner(&format!("verifying {} snapshots", store.snapshots().len()));
    let report = store.verify()?;
    bar.finish_and_clear();
    let mut first_failure = None;
    for (index, s) in store.snapshots().iter().enumerate() {
        if let Some((_, e)) = report.failed.iter().find(|(id, _)| *id == s.id) {
            let msg = e.to_string();
            writeln!(out, "FAILED  {index}  {}  {msg}", s.name)?;
            first_failure.get_or_insert_with(|| format!("snapshot {index} `{}`: {msg}", s.name));
        } else if report.ok.contains(&s.id) {
            writeln!(out, "ok      {index}  {}  {}", s.name, s.file)?;
        }
    }
    for o in &report.orphans {
        writeln!(out, "orphan  {}", o.display())?;
    }
    let n = store.snapshots().len();
    writeln!(
        out,
        "{n} snapshots: {} ok, {} failed, {} orphan files",
        report.ok.len(),
        report.failed.len(),
        report.orphans.len()
    )?;
    match first_failure {
        None => Ok(()),
        Some(first) => Err(CliError::Failed(format!(
            "verify failed for {} of {n} snapshots; first: {first}",
            report.failed.len()
        ))),
    }
}
