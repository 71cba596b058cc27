//! `bitsnap keep`: run a keeper of a store on a Unix-domain socket until SIGTERM/SIGINT.

use std::io::Write;
use std::path::PathBuf;
use std::task::Poll;

use bitsnap_core::Store;
use bitsnap_core::fmt::bytes;
use bitsnap_core::keeper::{Keeper, KeeperOptions};
use clap::Args;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::args::PolicyArgs;
use crate::error::CliError;
use crate::store::store_url;

/// The long help of `bitsnap keep`.
pub fn long_about() -> String {
    "\
Run a keeper: a process that holds the latest snapshots of a training run in memory, \
so that a trainer killed at any moment loses nothing it handed over, and restarts from \
memory without touching disk. Trainers connect to --socket (bitsnap_core::keeper::\
KeeperClient: put, latest, flush); a put returns once the keeper holds the snapshot. \
The keeper persists to STORE_DIR in the background, every --persist-every N-th snapshot \
of each series (0: only on flush and shutdown), and always the latest of each series \
on a client's flush and on SIGTERM or SIGINT, then exits 0. Other writers (prune, rm, \
pack) may change the store while it runs: each holds the store's lock only to commit; \
readers (ls, unpack, verify) never wait. A keeper restarted \
after a crash starts empty and answers `latest` from the store. Prints one line when \
ready (`keeping STORE on SOCKET ...`) and one when stopped. The wire protocol is in \
FORMAT.md, \"Keeper protocol\"."
        .to_string()
}

/// Arguments of `bitsnap keep`.
#[derive(Debug, Args)]
pub struct KeepArgs {
    /// Store directory (created if missing), or an `s3://bucket/prefix` URL.
    #[arg(value_name = "STORE_DIR")]
    store: PathBuf,
    /// The Unix-domain socket to listen on (a stale one left by a dead keeper is
    /// replaced; a live keeper there is an error).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Persist every N-th snapshot of each series (0: only on flush and shutdown).
    #[arg(long, value_name = "N", default_value_t = 1)]
    persist_every: u64,
    /// Snapshots of each series held in memory.
    #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    keep_in_memory: u64,
    /// Largest snapshot accepted, in bytes of tensor data [default: half the memory].
    #[arg(long, value_name = "BYTES")]
    max_snapshot_bytes: Option<u64>,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// Runs `bitsnap keep`.
pub fn run(args: KeepArgs, out: &mut dyn Write) -> Result<(), CliError> {
    if !args.policy.roles.is_empty() {
        return Err(CliError::Usage(
            "--role does not apply to keep: every put carries its tensors' roles".into(),
        ));
    }
    let policy = args.policy.policy()?;
    // Signals are caught from before the keeper is ready: a SIGTERM sent as soon as the
    // ready line appears still persists and exits cleanly.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| CliError::Failed(format!("cannot wait for signals: {e}")))?;
    let (mut term, mut int) = {
        let _in = runtime.enter();
        let sig =
            |kind| signal(kind).map_err(|e| CliError::Failed(format!("cannot catch signals: {e}")));
        (sig(SignalKind::terminate())?, sig(SignalKind::interrupt())?)
    };
    let store = match store_url(&args.store) {
        Some(url) => Store::open_or_create_url(url, policy)?,
        None => Store::open_or_create(&args.store, policy)?,
    };
    let mut options = KeeperOptions::default()
        .with_persist_every(args.persist_every)
        .with_keep_in_memory(usize::try_from(args.keep_in_memory).unwrap_or(usize::MAX));
    if let Some(b) = args.max_snapshot_bytes {
        options = options.with_max_snapshot_bytes(b);
    }
    let keeper = Keeper::spawn(store, &args.socket, options)?;
    writeln!(
        out,
        "keeping {} on {} (pid {}): persisting every {} snapshot(s) of a series, holding {} in memory, puts up to {}",
        args.store.display(),
        args.socket.display(),
        std::process::id(),
        args.persist_every,
        args.keep_in_memory,
        bytes(keeper.options().max_snapshot_bytes()),
    )?;
    out.flush()?;
    let name = runtime.block_on(first_signal(&mut term, &mut int));
    let stats = keeper.shutdown()?;
    writeln!(
        out,
        "stopped on {name} after {} puts: {} snapshots saved, {} skipped for newer ones",
        stats.puts, stats.persist.saved, stats.persist.skipped
    )?;
    Ok(())
}

/// Waits for SIGTERM or SIGINT and names it.
async fn first_signal(term: &mut Signal, int: &mut Signal) -> &'static str {
    std::future::poll_fn(|cx| {
        if term.poll_recv(cx).is_ready() {
            Poll::Ready("SIGTERM")
        } else if int.poll_recv(cx).is_ready() {
            Poll::Ready("SIGINT")
        } else {
            Poll::Pending
        }
    })
    .await
}
