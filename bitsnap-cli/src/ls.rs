//! `bitsnap ls`: one row per snapshot.

use std::io::Write;
use std::path::PathBuf;

use bitsnap_core::fmt::{Ratio, bytes, ratio};
use clap::Args;
use serde::Serialize;

use crate::error::CliError;
use crate::store::{index_of, open_store};
use crate::table::{Align, Table};

/// The `--json` output of `bitsnap ls`, documented in the command's long help.
pub const JSON_DOC: &str = "\
With --json, prints one JSON object (fields in this order; sizes in bytes):
  store          the store directory, as given
  snapshots      array, oldest first, one object per snapshot:
    index        position in this list, from 0 (what SNAPSHOT arguments take)
    id           the store's id of the snapshot (increasing, never reused)
    name         the name it was packed as (the file stem)
    file         its file in the store directory
    base_index   index of the snapshot it is a delta on, or null for a full snapshot
    base_id      id of that snapshot, or null
    tensors      number of tensors
    raw_bytes    decoded size of its tensors
    stored_bytes size of its file
    ratio        raw_bytes / stored_bytes
  raw_bytes      sum over all snapshots
  stored_bytes   sum over all snapshots
  ratio          raw_bytes / stored_bytes of the sums";

/// The long help of the command.
pub fn long_about() -> String {
    format!(
        "\
List the snapshots of a store, oldest first: index, name, base (the index of the snapshot \
it is a delta on, `-` for a full snapshot), number of tensors, raw (decoded) bytes, stored \
bytes and ratio.\n\n{JSON_DOC}"
    )
}

/// Arguments of `bitsnap ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Store directory, or an `s3://bucket/prefix` URL.
    #[arg(value_name = "STORE_DIR")]
    store: PathBuf,
    /// Print JSON (see the long help for the fields).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct LsJson {
    store: String,
    snapshots: Vec<SnapshotJson>,
    raw_bytes: u64,
    stored_bytes: u64,
    ratio: f64,
}

#[derive(Debug, Serialize)]
struct SnapshotJson {
    index: usize,
    id: u64,
    name: String,
    file: String,
    base_index: Option<usize>,
    base_id: Option<u64>,
    tensors: u64,
    raw_bytes: u64,
    stored_bytes: u64,
    ratio: f64,
}

/// Runs `bitsnap ls`.
pub fn run(args: LsArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let store = open_store(&args.store)?;
    let snapshots: Vec<SnapshotJson> = store
        .snapshots()
        .iter()
        .enumerate()
        .map(|(index, s)| SnapshotJson {
            index,
            id: s.id,
            name: s.name.clone(),
            file: s.file.clone(),
            base_index: s.base.and_then(|b| index_of(&store, b)),
            base_id: s.base,
            tensors: s.tensors,
            raw_bytes: s.raw_bytes,
            stored_bytes: s.stored_bytes,
            ratio: ratio(s.raw_bytes, s.stored_bytes),
        })
        .collect();
    let raw: u64 = snapshots.iter().map(|s| s.raw_bytes).sum();
    let stored: u64 = snapshots.iter().map(|s| s.stored_bytes).sum();
    if args.json {
        let doc = LsJson {
            store: args.store.display().to_string(),
            snapshots,
            raw_bytes: raw,
            stored_bytes: stored,
            ratio: ratio(raw, stored),
        };
        serde_json::to_writer_pretty(&mut *out, &doc)?;
        writeln!(out)?;
        return Ok(());
    }
    let mut t = Table::new(&[
        ("index", Align::Right),
        ("name", Align::Left),
        ("base", Align::Right),
        ("tensors", Align::Right),
        ("raw", Align::Right),
        ("stored", Align::Right),
        ("ratio", Align::Right),
    ]);
    for s in &snapshots {
        t.row(vec![
            s.index.to_string(),
            s.name.clone(),
            match (s.base_index, s.base_id) {
                (Some(i), _) => i.to_string(),
                (None, Some(id)) => format!("id {id}?"),
                (None, None) => "-".into(),
            },
            s.tensors.to_string(),
            bytes(s.raw_bytes),
            bytes(s.stored_bytes),
            Ratio(s.ratio).to_string(),
        ]);
    }
    t.write(out)?;
    writeln!(
        out,
        "{} snapshots, {} raw, {} stored ({})",
        snapshots.len(),
        bytes(raw),
        bytes(stored),
        Ratio(ratio(raw, stored))
    )?;
    Ok(())
}
