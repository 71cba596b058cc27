//! `bitsnap unpack`: restore one snapshot as a safetensors file.

use std::io::Write;
use std::path::PathBuf;

use bitsnap_core::fmt::bytes;
use bitsnap_core::safetensors;
use clap::Args;

use crate::error::CliError;
use crate::progress;
use crate::store::{choose_snapshot, open_store};

/// The long help of the command.
pub fn long_about() -> String {
    "\
Restore one snapshot as a safetensors file, with the `__metadata__` it was packed with. \
Under the lossless policy every tensor is restored bit for bit; tensors that were \
cluster-quantized (--policy lossy-optimizer) are restored dequantized, and a note on \
stderr says how many.

SNAPSHOT is a decimal index into the store's snapshots (0 is the oldest, as `bitsnap ls` \
numbers them), otherwise a snapshot name (the latest snapshot of that name).

Tensors are written in the order the safetensors crate writes them (by dtype alignment, \
then name), which is the original order for files written by safetensors. The output is \
written to a temporary file beside OUT and renamed into place, so an error leaves no \
partial file."
        .to_string()
}

/// Arguments of `bitsnap unpack`.
#[derive(Debug, Args)]
pub struct UnpackArgs {
    /// Store directory, or an `s3://bucket/prefix` URL.
    #[arg(value_name = "STORE_DIR")]
    store: PathBuf,
    /// Index (from 0) or name of the snapshot.
    #[arg(value_name = "SNAPSHOT")]
    snapshot: String,
    /// Output safetensors file (replaced if it exists).
    #[arg(short, long, value_name = "OUT.safetensors")]
    output: PathBuf,
}

/// Runs `bitsnap unpack`.
pub fn run(args: UnpackArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let store = open_store(&args.store)?;
    let chosen = choose_snapshot(&store, &args.snapshot)?;
    let bar = progress::spinner(&format!("decoding snapshot {}", chosen.index));
    let header = store.header(chosen.info.id)?;
    let snap = store.load(chosen.info.id)?;
    bar.set_message(format!("writing {}", args.output.display()));
    safetensors::write_file(&args.output, &snap.tensors, &snap.metadata)?;
    bar.finish_and_clear();
    let lossy = header
        .entries
        .iter()
        .filter(|e| !e.codec.is_lossless())
        .count();
    if lossy > 0 {
        eprintln!(
            "bitsnap: note: {lossy} of {} tensors of snapshot {} were stored lossy (cluster-quantized) and are restored dequantized",
            header.entries.len(),
            chosen.index
        );
    }
    let raw: u64 = snap.tensors.iter().map(|t| t.data.len() as u64).sum();
    writeln!(
        out,
        "wrote {}: snapshot {} `{}`, {} tensors, {}",
        args.output.display(),
        chosen.index,
        snap.info.name,
        snap.tensors.len(),
        bytes(raw)
    )?;
    Ok(())
}
