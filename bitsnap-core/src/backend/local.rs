//! The local-directory backend: temporary file, fsync, rename, directory fsync; an
//! advisory `flock` on `LOCK` is the commit lock (held around each manifest replace), and
//! one on `writer-<nonce>.lease` per writer tells live writers' files from debris.

use std::any::Any;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
#[cfg(not(unix))]
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::{Backend, ObjectVersion, ObjectWriter};
use crate::Error;

/// File name of the commit lock, which this backend owns (FORMAT.md 1).
pub const LOCK_FILE: &str = "LOCK";
/// A writer's lease file is `writer-<nonce, 16 lowercase hex>.lease` (FORMAT.md 1).
pub const LEASE_PREFIX: &str = "writer-";
/// See [`LEASE_PREFIX`].
pub const LEASE_SUFFIX: &str = ".lease";
/// How long [`Backend::lock`] waits for another writer's commit by default (10 min: a
/// commit takes milliseconds, but [`Store::compact`](crate::Store::compact) holds the
/// lock while it rewrites).
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(600);
/// Longest sleep between two attempts at the commit lock.
const LOCK_POLL_MAX: Duration = Duration::from_millis(20);

/// Reads of at least this many bytes are split into pieces read by all rayon threads at
/// once ([`read_exact_at_parallel`]): one thread copies from the page cache at 2-6 GB/s,
/// well under what the memory and an NVMe drive deliver.
pub const PARALLEL_READ_BYTES: usize = 32 << 20;
/// Bytes per piece of a parallel read.
pub const READ_PIECE_BYTES: usize = 8 << 20;

/// Fills `buf` with the bytes of `file` (named `path` in errors) from `offset` on, in
/// pieces of [`READ_PIECE_BYTES`] read in parallel (positioned reads; the file's cursor
/// is not used) when `buf` holds at least [`PARALLEL_READ_BYTES`]. A file that ends
/// early fails with [`Error::Truncated`].
///
/// ```
/// use bitsnap_core::backend::read_exact_at_parallel;
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("f");
/// std::fs::write(&path, b"0123456789").unwrap();
/// let file = std::fs::File::open(&path).unwrap();
/// let mut buf = [0u8; 4];
/// read_exact_at_parallel(&file, &path, 3, &mut buf).unwrap();
/// assert_eq!(&buf, b"3456");
/// ```
pub fn read_exact_at_parallel(
    file: &File,
    path: &Path,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), Error> {
    use rayon::prelude::*;
    let piece = if buf.len() >= PARALLEL_READ_BYTES {
        READ_PIECE_BYTES
    } else {
        buf.len().max(1)
    };
    buf.par_chunks_mut(piece)
        .enumerate()
        .try_for_each(|(i, chunk)| {
            let at = offset + (i * piece) as u64;
            read_exact_at(file, chunk, at).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    Error::Truncated {
                        file: path.to_path_buf(),
                        offset: at,
                        what: format!("{} bytes at offset {at}", chunk.len()),
                    }
                } else {
                    Error::io(path, e)
                }
            })
        })
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], at: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, at)
}

#[cfg(not(unix))]
fn read_exact_at(file: &File, buf: &mut [u8], at: u64) -> std::io::Result<()> {
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::Start(at))?;
    f.read_exact(buf)
}

/// Bytes written to a file before [`Writeback`] starts flushing it.
pub const WRITEBACK_AFTER_BYTES: u64 = 64 << 20;
/// How often a [`Writeback`] flushes what was written since its last flush.
pub const WRITEBACK_INTERVAL: Duration = Duration::from_millis(50);

/// Flushes a file that is being written to the disk in the background, so that the
/// fsync ending the write finds little left to do and the disk works while the writer
/// still produces bytes (without it, Linux starts writing back only seconds later). A
/// thread calls `fdatasync` on its own handle of the file every [`WRITEBACK_INTERVAL`]
/// until [`Writeback::stop`] (or drop). It adds no durability: the writer still fsyncs
/// at the end.
///
/// ```
/// use bitsnap_core::backend::Writeback;
/// use std::io::Write;
/// let dir = tempfile::tempdir().unwrap();
/// let mut f = std::fs::File::create(dir.path().join("f")).unwrap();
/// let wb = Writeback::start(&f).unwrap();
/// f.write_all(&[7u8; 1 << 20]).unwrap();
/// wb.stop();
/// f.sync_all().unwrap();
/// ```
#[derive(Debug)]
pub struct Writeback {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writeback {
    /// Starts flushing `file` (a second handle to it is opened).
    pub fn start(file: &File) -> std::io::Result<Writeback> {
        let handle = file.try_clone()?;
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bitsnap-writeback".into())
            .spawn(move || {
                let (lock, cv) = &*flag;
                loop {
                    let Ok(stopped) = lock.lock() else { return };
                    let Ok((stopped, _)) = cv.wait_timeout(stopped, WRITEBACK_INTERVAL) else {
                        return;
                    };
                    if *stopped {
                        return;
                    }
                    drop(stopped);
                    // An error here shows again in the writer's own fsync.
                    let _ = handle.sync_data();
                }
            })?;
        Ok(Writeback {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops flushing and waits for the thread (at most one flush in progress).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if let Some(t) = self.thread.take() {
            let (lock, cv) = &*self.stop;
            if let Ok(mut stopped) = lock.lock() {
                *stopped = true;
            }
            cv.notify_all();
            let _ = t.join();
        }
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        self.halt();
    }
}

/// A zeroed buffer of `len` bytes for a read of `what`, or [`Error::Alloc`].
fn buffer(len: u64, what: impl Fn() -> String) -> Result<Vec<u8>, Error> {
    let alloc = || Error::Alloc {
        what: what(),
        bytes: len,
    };
    let n = usize::try_from(len).map_err(|_| alloc())?;
    // Checked fallibly first; then allocated zeroed (calloc: fresh pages the kernel
    // zeroes as the parallel reads first touch them), not zero-filled by one thread,
    // which faulted in every page serially before the reads (measured: the memset was
    // a tenth of `verify`).
    let mut probe: Vec<u8> = Vec::new();
    probe.try_reserve_exact(n).map_err(|_| alloc())?;
    drop(probe);
    Ok(vec![0u8; n])
}

/// A store in a directory of the local filesystem.
#[derive(Debug, Clone)]
pub struct LocalDir {
    dir: PathBuf,
    lock_wait: Duration,
}

impl LocalDir {
    /// The backend for directory `dir` (not created until a store is).
    pub fn new(dir: impl AsRef<Path>) -> LocalDir {
        LocalDir {
            dir: dir.as_ref().to_path_buf(),
            lock_wait: DEFAULT_LOCK_WAIT,
        }
    }

    /// Sets how long [`Backend::lock`] waits for another writer's commit before it fails.
    /// Default: [`DEFAULT_LOCK_WAIT`].
    pub fn with_lock_wait(mut self, wait: Duration) -> LocalDir {
        self.lock_wait = wait;
        self
    }

    fn lease_path(&self, nonce: u64) -> PathBuf {
        self.dir
            .join(format!("{LEASE_PREFIX}{nonce:016x}{LEASE_SUFFIX}"))
    }
}

/// A writer's lease: its file, locked, removed when the writer is done.
struct Lease {
    _file: File,
    path: PathBuf,
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Removed while still locked; the lock goes with the file handle after this.
        let _ = fs::remove_file(&self.path);
    }
}

/// Temporary manifests get distinct names within a process.
static MANIFEST_TMP: AtomicU64 = AtomicU64::new(0);

impl Backend for LocalDir {
    fn location(&self) -> &Path {
        &self.dir
    }

    fn exclusive(&self) -> bool {
        true
    }

    fn lock(&self) -> Result<Option<Box<dyn Any + Send + Sync>>, Error> {
        fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let path = self.dir.join(LOCK_FILE);
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        // Commits take milliseconds: poll, sleeping a little longer each time.
        let deadline = std::time::Instant::now() + self.lock_wait;
        let mut pause = Duration::from_micros(200);
        loop {
            match f.try_lock() {
                Ok(()) => return Ok(Some(Box::new(f))),
                Err(fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
                Err(fs::TryLockError::WouldBlock) => {}
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Err(Error::io(
                    &path,
                    std::io::Error::new(
                        std::io::ErrorKind::WouldBlock,
                        format!(
                            "another writer held the store's commit lock for more than {:.1} s",
                            self.lock_wait.as_secs_f64()
                        ),
                    ),
                ));
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(LOCK_POLL_MAX);
        }
    }

    fn lease(&self, nonce: u64) -> Result<Option<Box<dyn Any + Send + Sync>>, Error> {
        fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let path = self.lease_path(nonce);
        // Locked under a temporary name, then renamed: whoever opens the lease by its
        // name finds it locked.
        let tmp = path.with_extension("lease.tmp");
        let f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.try_lock().map_err(|e| match e {
            fs::TryLockError::WouldBlock => Error::io(
                &tmp,
                std::io::Error::new(std::io::ErrorKind::WouldBlock, "lease already held"),
            ),
            fs::TryLockError::Error(e) => Error::io(&tmp, e),
        })?;
        fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        Ok(Some(Box::new(Lease { _file: f, path })))
    }

    fn lease_alive(&self, nonce: u64) -> Result<bool, Error> {
        let path = self.lease_path(nonce);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io(&path, e)),
        };
        match f.try_lock() {
            Err(fs::TryLockError::WouldBlock) => Ok(true),
            Err(fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
            // Nobody holds it: its writer is gone. Removed while this handle holds it.
            Ok(()) => {
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(Error::io(&path, e));
                    }
                    _ => {}
                }
                Ok(false)
            }
        }
    }

    fn reserve(&self, name: &str) -> Result<(), Error> {
        let tmp = self.dir.join(format!("{name}.tmp"));
        File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(())
    }

    fn unreserve(&self, name: &str) -> Result<(), Error> {
        let tmp = self.dir.join(format!("{name}.tmp"));
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&tmp, e)),
            _ => Ok(()),
        }
    }

    fn list(&self) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))? {
            let entry = entry.map_err(|e| Error::io(&self.dir, e))?;
            if let Some(name) = entry.file_name().to_str() {
                out.push(name.to_string());
            }
        }
        out.sort();
        Ok(out)
    }

    fn size(&self, name: &str) -> Result<Option<u64>, Error> {
        let path = self.dir.join(name);
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    fn read(&self, name: &str, limit: u64) -> Result<Option<Vec<u8>>, Error> {
        let path = self.dir.join(name);
        // The length of the file opened, not of the path: a manifest commit renames a new
        // file over the path, and a length taken before the open would cut the new one.
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len > limit {
            return Err(Error::Limit {
                file: path,
                what: "object size",
                value: len,
                limit,
            });
        }
        let mut buf = buffer(len, || path.display().to_string())?;
        read_exact_at_parallel(&file, &path, 0, &mut buf)?;
        Ok(Some(buf))
    }

    fn read_range(&self, name: &str, range: Range<u64>) -> Result<Vec<u8>, Error> {
        let path = self.dir.join(name);
        let len = range.end.saturating_sub(range.start);
        let mut buf = buffer(len, || format!("{}: bytes {range:?}", path.display()))?;
        let f = File::open(&path).map_err(|e| Error::io(&path, e))?;
        read_exact_at_parallel(&f, &path, range.start, &mut buf)?;
        Ok(buf)
    }

    fn create(&self, name: &str) -> Result<Box<dyn ObjectWriter>, Error> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(Box::new(LocalWriter {
            out: Some(BufWriter::with_capacity(1 << 20, f)),
            tmp,
            path,
            dir: self.dir.clone(),
            written: 0,
            writeback: None,
        }))
    }

    fn remove(&self, name: &str) -> Result<(), Error> {
        let path = self.dir.join(name);
        fs::remove_file(&path).map_err(|e| Error::io(&path, e))
    }

    fn sync(&self) -> Result<(), Error> {
        sync_dir(&self.dir)
    }

    fn read_versioned(
        &self,
        name: &str,
        limit: u64,
    ) -> Result<Option<(Vec<u8>, ObjectVersion)>, Error> {
        Ok(self
            .read(name, limit)?
            .map(|b| (b, ObjectVersion::default())))
    }

    /// The commit lock, held by the caller from reading the manifest to this replace, is
    /// what makes the replace conditional here: `expected` is not checked. The rename
    /// commits; call [`Backend::sync`] after it.
    fn commit_manifest(
        &self,
        name: &str,
        bytes: &[u8],
        _expected: Option<&ObjectVersion>,
    ) -> Result<ObjectVersion, Error> {
        let path = self.dir.join(name);
        let n = MANIFEST_TMP.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!("{name}.{}-{n}.tmp", std::process::id()));
        {
            let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
            f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        }
        fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        Ok(ObjectVersion::default())
    }
}

/// A snapshot file being written under `<name>.tmp`.
struct LocalWriter {
    out: Option<BufWriter<File>>,
    tmp: PathBuf,
    path: PathBuf,
    dir: PathBuf,
    written: u64,
    /// Started once [`WRITEBACK_AFTER_BYTES`] are written.
    writeback: Option<Writeback>,
}

impl Write for LocalWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| std::io::Error::other("writer already finished"))?;
        let n = out.write(buf)?;
        self.written += n as u64;
        if self.writeback.is_none() && self.written >= WRITEBACK_AFTER_BYTES {
            self.writeback = Some(Writeback::start(out.get_ref())?);
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.as_mut().map_or(Ok(()), |o| o.flush())
    }
}

impl ObjectWriter for LocalWriter {
    fn finish(mut self: Box<Self>) -> Result<u64, Error> {
        let out = self.out.take().ok_or_else(|| {
            Error::io(&self.tmp, std::io::Error::other("writer already finished"))
        })?;
        let f = out
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        if let Some(wb) = self.writeback.take() {
            wb.stop();
        }
        f.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        drop(f);
        fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        sync_dir(&self.dir)?;
        Ok(self.written)
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        // Unfinished: the temporary file is debris (a crash leaves it for the next writer).
        if self.out.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// fsyncs a directory so that renames in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}
