//! The local-directory backend: temporary file, fsync, rename, directory fsync; an
//! advisory `flock` on `LOCK` keeps one writer per store.

use std::any::Any;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Backend, ObjectVersion, ObjectWriter};
use crate::Error;

/// File name of the writer lock, which this backend owns (FORMAT.md 1).
pub const LOCK_FILE: &str = "LOCK";

/// A store in a directory of the local filesystem.
#[derive(Debug, Clone)]
pub struct LocalDir {
    dir: PathBuf,
}

impl LocalDir {
    /// The backend for directory `dir` (not created until a store is).
    pub fn new(dir: impl AsRef<Path>) -> LocalDir {
        LocalDir {
            dir: dir.as_ref().to_path_buf(),
        }
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
        f.try_lock().map_err(|e| match e {
            fs::TryLockError::WouldBlock => Error::io(
                &path,
                std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "another process is writing to this store",
                ),
            ),
            fs::TryLockError::Error(e) => Error::io(&path, e),
        })?;
        Ok(Some(Box::new(f)))
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
        let Some(len) = self.size(name)? else {
            return Ok(None);
        };
        if len > limit {
            return Err(Error::Limit {
                file: path,
                what: "object size",
                value: len,
                limit,
            });
        }
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    fn read_range(&self, name: &str, range: Range<u64>) -> Result<Vec<u8>, Error> {
        let path = self.dir.join(name);
        let len = range.end.saturating_sub(range.start);
        let mut buf = Vec::new();
        buf.try_reserve_exact(len as usize)
            .map_err(|_| Error::Alloc {
                what: format!("{}: bytes {range:?}", path.display()),
                bytes: len,
            })?;
        let mut f = File::open(&path).map_err(|e| Error::io(&path, e))?;
        f.seek(SeekFrom::Start(range.start))
            .map_err(|e| Error::io(&path, e))?;
        f.take(len)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io(&path, e))?;
        if buf.len() as u64 != len {
            return Err(Error::Truncated {
                file: path,
                offset: range.start + buf.len() as u64,
                what: format!("bytes {range:?}"),
            });
        }
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

    /// The writer lock is what makes the replace conditional here: `expected` is not
    /// checked. The rename commits; call [`Backend::sync`] after it.
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
}

impl Write for LocalWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| std::io::Error::other("writer already finished"))?;
        let n = out.write(buf)?;
        self.written += n as u64;
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
