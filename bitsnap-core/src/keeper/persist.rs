//! The keeper's background persistence: one thread that owns the [`Store`] and saves
//! what the connections hand it, through [`Store::save_in`].
//!
//! At most one snapshot per series waits: a newer one of the same series replaces a
//! waiting older one (counted as skipped), so a disk slower than the trainer bounds the
//! keeper's memory instead of stalling the trainer. A flush waits until the latest
//! snapshot of every series is saved.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::memory::Held;
use crate::Store;

/// Counters of the persistence thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PersistCounts {
    /// Snapshots saved to the store.
    pub saved: u64,
    /// Snapshots that were due but replaced by a newer one of their series before the
    /// store got to them.
    pub skipped: u64,
    /// Saves that failed (each logged, and reported to the flush that waited for it).
    pub failed: u64,
}

#[derive(Debug, Default)]
struct Queue {
    pending: VecDeque<Arc<Held>>,
    /// Per series, the highest sequence number saved.
    saved: HashMap<String, u64>,
    /// Per series, the highest sequence number whose save failed, and why.
    failed: HashMap<String, (u64, String)>,
    counts: PersistCounts,
    stop: bool,
}

impl Queue {
    fn done(&self, h: &Held) -> bool {
        self.saved.get(&h.series).is_some_and(|&s| s >= h.seq)
    }

    fn failure(&self, h: &Held) -> Option<&str> {
        self.failed
            .get(&h.series)
            .filter(|(s, _)| *s >= h.seq)
            .map(|(_, e)| e.as_str())
    }

    /// Queues `h` unless it (or a newer one of its series) is saved or waiting.
    fn submit(&mut self, h: Arc<Held>) {
        if self.done(&h) {
            return;
        }
        if let Some(w) = self.pending.iter_mut().find(|w| w.series == h.series) {
            if w.seq < h.seq {
                self.counts.skipped += 1;
                *w = h;
            }
            return;
        }
        self.pending.push_back(h);
    }
}

type Shared = Arc<(Mutex<Queue>, Condvar)>;

/// The persistence thread and its queue.
#[derive(Debug)]
pub(crate) struct Persister {
    shared: Shared,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn lock(shared: &Shared) -> MutexGuard<'_, Queue> {
    // A panic elsewhere while holding the lock leaves a queue that is still consistent
    // (every change is one assignment): keep going.
    shared.0.lock().unwrap_or_else(|p| p.into_inner())
}

impl Persister {
    /// Starts the thread; it owns `store` until [`Persister::stop`].
    pub(crate) fn start(store: Store) -> std::io::Result<Persister> {
        let shared: Shared = Arc::default();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("bitsnap-keeper-persist".into())
            .spawn(move || run(store, s))?;
        Ok(Persister {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Hands `held` over for saving (see the module doc for what replaces what).
    pub(crate) fn submit(&self, held: Arc<Held>) {
        lock(&self.shared).submit(held);
        self.shared.1.notify_all();
    }

    /// Saves every snapshot in `targets` not saved yet and waits until they are.
    pub(crate) fn flush(&self, targets: Vec<Arc<Held>>) -> Result<PersistCounts, String> {
        let mut q = lock(&self.shared);
        for t in &targets {
            q.submit(t.clone());
        }
        self.shared.1.notify_all();
        loop {
            if let Some(e) = targets.iter().find_map(|t| q.failure(t)) {
                return Err(e.to_string());
            }
            if targets.iter().all(|t| q.done(t)) {
                return Ok(q.counts);
            }
            if q.stop && q.pending.is_empty() {
                return Err("the keeper is shutting down".into());
            }
            q = self.shared.1.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub(crate) fn counts(&self) -> PersistCounts {
        lock(&self.shared).counts
    }

    /// Saves what is waiting, then ends the thread.
    pub(crate) fn stop(&self) {
        lock(&self.shared).stop = true;
        self.shared.1.notify_all();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread
            && t.join().is_err()
        {
            tracing::error!("the keeper's persistence thread panicked");
        }
    }
}

impl Drop for Persister {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(mut store: Store, shared: Shared) {
    loop {
        let held = {
            let mut q = lock(&shared);
            loop {
                if let Some(h) = q.pending.pop_front() {
                    break h;
                }
                if q.stop {
                    return;
                }
                q = shared.1.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        let started = std::time::Instant::now();
        let result = store.save_in(
            &held.series,
            &held.name,
            held.tensors.clone(),
            held.metadata.clone(),
        );
        let mut q = lock(&shared);
        match result {
            Ok(report) => {
                held.store_id.store(report.info.id, Ordering::Release);
                let s = q.saved.entry(held.series.clone()).or_insert(0);
                *s = (*s).max(held.seq);
                q.counts.saved += 1;
                tracing::debug!(series = %held.series, name = %held.name, id = report.info.id,
                    stored = report.info.stored_bytes, ms = started.elapsed().as_millis() as u64,
                    "keeper persisted a snapshot");
            }
            Err(e) => {
                tracing::error!(series = %held.series, name = %held.name, error = %e,
                    "keeper could not persist a snapshot");
                q.failed
                    .insert(held.series.clone(), (held.seq, e.to_string()));
                q.counts.failed += 1;
            }
        }
        drop(q);
        shared.1.notify_all();
    }
}
