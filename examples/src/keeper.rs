//! `finetune-gpt --keeper`: the crash demo with a keeper, in real processes.
//!
//! Three processes, all this example's binary: a keeper ([`serve`]: a
//! [`Keeper`] of the run's store, which holds every snapshot in memory and persists it in
//! the background), a trainer that hands every snapshot to it and is killed with SIGKILL
//! mid-run, and a second trainer started with `--resume`, which restores from the
//! keeper's memory (no disk read) and says so. [`supervise`] runs them.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use bitsnap_core::keeper::{Keeper, KeeperClient, KeeperOptions, KeeperStats};
use bitsnap_core::{Policy, Store};

use crate::Error;

/// The files of a keeper in a run's output directory.
#[derive(Debug, Clone)]
pub struct KeeperFiles {
    /// The store it owns: `<out>/checkpoints`.
    pub store: PathBuf,
    /// Its socket: `<out>/keeper.sock`.
    pub socket: PathBuf,
    /// Created to ask it to persist what it holds and exit: `<out>/keeper.stop`.
    pub stop: PathBuf,
}

impl KeeperFiles {
    /// The keeper files of the run in `out`.
    pub fn of(out: &Path) -> KeeperFiles {
        KeeperFiles {
            store: out.join("checkpoints"),
            socket: out.join("keeper.sock"),
            stop: out.join("keeper.stop"),
        }
    }
}

/// Runs a keeper of `files.store` on `files.socket`, persisting every `persist_every`-th
/// snapshot, until `files.stop` appears; then persists the latest and returns its stats.
pub fn serve(
    files: &KeeperFiles,
    policy: Policy,
    persist_every: u64,
) -> Result<KeeperStats, Error> {
    let store = Store::open_or_create(&files.store, policy)?;
    let options = KeeperOptions::default().with_persist_every(persist_every);
    let keeper = Keeper::spawn(store, &files.socket, options)?;
    println!(
        "keeper: holding the snapshots of {} in memory, on {}",
        files.store.display(),
        files.socket.display()
    );
    while !files.stop.exists() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let stats = keeper.shutdown()?;
    let _ = std::fs::remove_file(&files.stop);
    let p = stats.persist;
    println!(
        "keeper: stopped after {} snapshots handed over ({} persisted, {} replaced by a \
         newer one before persisting, {} failed; {} bad frames)",
        stats.puts, p.saved, p.skipped, p.failed, stats.bad_frames
    );
    Ok(stats)
}

fn spawn(exe: &Path, args: &[OsString]) -> Result<Child, Error> {
    Command::new(exe).args(args).spawn().map_err(Error::io(exe))
}

/// Steps in the trainer's loss log (`losses.tsv`, one complete line a step).
fn logged_steps(out: &Path) -> u64 {
    std::fs::read_to_string(out.join("losses.tsv"))
        .map(|t| t.matches('\n').count() as u64)
        .unwrap_or(0)
}

/// The demo: starts the keeper (`keeper_args`), a trainer (`trainer_args`), kills the
/// trainer with SIGKILL once it logged `kill_after` steps, restarts it with `--resume`,
/// and stops the keeper. Returns the last step the killed trainer logged.
pub fn supervise(
    exe: &Path,
    out: &Path,
    keeper_args: &[OsString],
    trainer_args: &[OsString],
    kill_after: u64,
) -> Result<u64, Error> {
    let files = KeeperFiles::of(out);
    for stale in [&files.stop, &out.join("losses.tsv")] {
        if stale.exists() {
            std::fs::remove_file(stale).map_err(Error::io(stale))?;
        }
    }
    if files.store.exists() {
        std::fs::remove_dir_all(&files.store).map_err(Error::io(&files.store))?;
    }
    let mut keeper = spawn(exe, keeper_args)?;
    let started = Instant::now();
    while KeeperClient::connect(&files.socket).is_err() {
        if let Some(status) = keeper.try_wait().map_err(Error::io(exe))? {
            return Err(Error::Resume(format!("the keeper exited: {status}")));
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(Error::Resume("the keeper did not start in 60 s".into()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut trainer = spawn(exe, trainer_args)?;
    while logged_steps(out) < kill_after {
        if let Some(status) = trainer.try_wait().map_err(Error::io(exe))? {
            return Err(Error::Resume(format!(
                "the trainer exited before step {kill_after}: {status}"
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    trainer.kill().map_err(Error::io(exe))?; // SIGKILL: no destructor, no flush
    let status = trainer.wait().map_err(Error::io(exe))?;
    let killed_after = logged_steps(out);
    println!(
        "\nkilled the trainer (SIGKILL, {status}) after step {killed_after}; restarting it with --resume\n"
    );

    let mut resume: Vec<OsString> = trainer_args.to_vec();
    resume.push("--resume".into());
    let status = spawn(exe, &resume)?.wait().map_err(Error::io(exe))?;
    std::fs::write(&files.stop, b"").map_err(Error::io(&files.stop))?;
    let keeper_status = keeper.wait().map_err(Error::io(exe))?;
    if !status.success() {
        return Err(Error::Resume(format!(
            "the restarted trainer failed: {status}"
        )));
    }
    if !keeper_status.success() {
        return Err(Error::Resume(format!("the keeper failed: {keeper_status}")));
    }
    Ok(killed_after)
}
