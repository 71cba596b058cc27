//! `bitsnap prune`, `rm`, `pin`, `unpin` and `compact`: retention on the store's one
//! deletion machinery (`Store::delete`): nothing is re-encoded except by `compact`.

use std::io::Write;
use std::path::PathBuf;

use bitsnap_core::fmt::bytes;
use bitsnap_core::{Retention, Store};
use clap::Args;
use serde::Serialize;

use crate::error::CliError;
use crate::store::{choose_snapshot, open_store};
use crate::table::{Align, Table};

/// The long help of `bitsnap prune`.
pub fn prune_long_about() -> String {
    "\
Delete the snapshots a retention policy does not keep, in one manifest commit and without \
re-encoding anything. Per series, a snapshot is kept if it is one of the latest N \
(--keep-last), if its id is a multiple of K (--keep-every), or if it is pinned \
(`bitsnap pin`); the latest snapshot of each series and sharded snapshots are always \
kept. A deleted snapshot that a kept delta still reads is retired: gone from `ls`, its \
file kept until nothing kept needs it (`bitsnap compact` frees it now). Every kept \
snapshot stays readable, bit for bit. Prints one row per snapshot (kept, deleted, \
retired, removed) and a summary; --dry-run prints the same and changes nothing. With \
--json, one object: kept, deleted, removed, retired (snapshot ids), freed_bytes, \
retired_bytes, dry_run."
        .to_string()
}

/// The long help of `bitsnap rm`.
pub fn rm_long_about() -> String {
    "\
Delete one snapshot (SNAPSHOT: an index from `bitsnap ls`, or a name, the latest of that \
name). Nothing is re-encoded: if a delta still reads it, it is retired (gone from `ls`, \
file kept) and removed once nothing listed needs it. A pinned snapshot is refused. \
With --json: the same object as `bitsnap prune --json`."
        .to_string()
}

/// Arguments of `bitsnap prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Store directory, or an `s3://bucket/prefix` URL.
    #[arg(value_name = "STORE_DIR")]
    store: PathBuf,
    /// Keep the latest N snapshots of each series.
    #[arg(long, value_name = "N")]
    keep_last: Option<usize>,
    /// Also keep every snapshot whose id is a multiple of K.
    #[arg(long, value_name = "K")]
    keep_every: Option<u64>,
    /// Prune only this series (default: every series, each on its own).
    #[arg(long, value_name = "S")]
    series: Option<String>,
    /// Print what would be deleted; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Arguments of `bitsnap rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// Store directory, or an `s3://bucket/prefix` URL.
    #[arg(value_name = "STORE_DIR")]
    store: PathBuf,
    /// Index (from `bitsnap ls`) or name of the snapshot.
    #[arg(value_name = "SNAPSHOT")]
    snapshot: String,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Arguments of `bitsnap pin` and `bitsnap unpin`.
#[derive(Debug, Args)]
pub struct PinArgs {
    /// Store directory, or an `s3://bucket/prefix` URL.
    #[arg(value_name = "STORE_DIR")]
    store: PathBuf,
    /// Index (from `bitsnap ls`) or name of the snapshot.
    #[arg(value_name = "SNAPSHOT")]
    snapshot: String,
}

/// Arguments of `bitsnap compact`.
#[derive(Debug, Args)]
pub struct CompactArgs {
    /// Store directory, or an `s3://bucket/prefix` URL.
    #[arg(value_name = "STORE_DIR")]
    store: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct PruneJson {
    kept: Vec<u64>,
    deleted: Vec<u64>,
    removed: Vec<u64>,
    retired: Vec<u64>,
    freed_bytes: u64,
    retired_bytes: u64,
    dry_run: bool,
}

/// Runs `bitsnap prune`.
pub fn prune(args: PruneArgs, out: &mut dyn Write) -> Result<(), CliError> {
    if args.keep_last.is_none() && args.keep_every.is_none() {
        return Err(CliError::Usage(
            "prune needs --keep-last N and/or --keep-every K".into(),
        ));
    }
    let mut store = open_store(&args.store)?;
    let retention = Retention {
        keep_last: args.keep_last,
        keep_every: args.keep_every,
        pinned: Vec::new(),
    };
    let before = store.clone_listing();
    let report = if args.dry_run {
        store.plan_prune(args.series.as_deref(), &retention)
    } else {
        store.prune(args.series.as_deref(), &retention)?
    };
    let doc = PruneJson {
        kept: report.kept,
        deleted: report.deleted,
        removed: report.removed,
        retired: report.retired,
        freed_bytes: report.freed_bytes,
        retired_bytes: report.retired_bytes,
        dry_run: args.dry_run,
    };
    write_outcome(&doc, &before, args.json, out)
}

/// Runs `bitsnap rm`.
pub fn rm(args: RmArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let mut store = open_store(&args.store)?;
    let id = choose_snapshot(&store, &args.snapshot)?.info.id;
    let before = store.clone_listing();
    let retired_before: Vec<(u64, u64)> = store
        .retired()
        .iter()
        .map(|s| (s.id, s.stored_bytes))
        .collect();
    store.delete(id)?;
    let retired: Vec<u64> = store.retired().iter().map(|s| s.id).collect();
    let removed: Vec<(u64, u64)> = before
        .iter()
        .map(|r| (r.id, r.stored))
        .chain(retired_before)
        .filter(|(i, _)| store.get(*i).is_none() && !retired.contains(i))
        .collect();
    let doc = PruneJson {
        kept: store.snapshots().iter().map(|s| s.id).collect(),
        deleted: vec![id],
        freed_bytes: removed.iter().map(|(_, b)| b).sum(),
        removed: removed.iter().map(|(i, _)| *i).collect(),
        retired_bytes: store.retired().iter().map(|s| s.stored_bytes).sum(),
        retired,
        dry_run: false,
    };
    write_outcome(&doc, &before, args.json, out)
}

/// Runs `bitsnap pin` (`pin = true`) or `bitsnap unpin`.
pub fn pin(args: PinArgs, pin: bool, out: &mut dyn Write) -> Result<(), CliError> {
    let mut store = open_store(&args.store)?;
    let chosen = choose_snapshot(&store, &args.snapshot)?;
    let (index, id, name) = (chosen.index, chosen.info.id, chosen.info.name.clone());
    if pin {
        store.pin(id)?;
    } else {
        store.unpin(id)?;
    }
    let what = if pin { "pinned" } else { "unpinned" };
    writeln!(out, "{what} snapshot {index} `{name}` (id {id})")?;
    Ok(())
}

/// Runs `bitsnap compact`.
pub fn compact(args: CompactArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let mut store = open_store(&args.store)?;
    let report = store.compact()?;
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &report)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "rewrote {} snapshots, removed {} retired files, freed {}",
        report.rewritten.len(),
        report.removed.len(),
        if report.freed_bytes >= 0 {
            bytes(report.freed_bytes as u64)
        } else {
            format!("-{}", bytes(report.freed_bytes.unsigned_abs()))
        }
    )?;
    Ok(())
}

/// A listed snapshot as it was before the operation.
struct Row {
    id: u64,
    name: String,
    stored: u64,
}

trait Listing {
    fn clone_listing(&self) -> Vec<Row>;
}

impl Listing for Store {
    fn clone_listing(&self) -> Vec<Row> {
        self.snapshots()
            .iter()
            .map(|s| Row {
                id: s.id,
                name: s.name.clone(),
                stored: s.stored_bytes,
            })
            .collect()
    }
}

fn write_outcome(
    doc: &PruneJson,
    before: &[Row],
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    if json {
        serde_json::to_writer_pretty(&mut *out, doc)?;
        writeln!(out)?;
        return Ok(());
    }
    let mut t = Table::new(&[
        ("index", Align::Right),
        ("name", Align::Left),
        ("stored", Align::Right),
        ("outcome", Align::Left),
    ]);
    for (index, r) in before.iter().enumerate() {
        let outcome = if doc.kept.contains(&r.id) {
            "kept"
        } else if doc.retired.contains(&r.id) {
            "retired (a kept delta reads it)"
        } else {
            "deleted"
        };
        t.row(vec![
            index.to_string(),
            r.name.clone(),
            bytes(r.stored),
            outcome.to_string(),
        ]);
    }
    t.write(out)?;
    let verb = if doc.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    writeln!(
        out,
        "{verb} {} snapshots, keeping {}; {} files removed ({}), {} retired ({})",
        doc.deleted.len(),
        doc.kept.len(),
        doc.removed.len(),
        bytes(doc.freed_bytes),
        doc.retired.len(),
        bytes(doc.retired_bytes)
    )?;
    Ok(())
}
