//! The object-storage backend: any [`object_store::ObjectStore`] (S3 and S3-compatible
//! servers, or memory), driven from bitsnap's synchronous API by a private tokio runtime.
//!
//! Snapshot objects are written once: small ones with one PUT (`If-None-Match: *` where
//! the server supports conditional PUT), larger ones as a multipart upload of
//! [`MULTIPART_PART_BYTES`] parts, several in flight, that becomes visible only when it is
//! completed. A writer killed mid-upload leaves an incomplete upload, never an object.
//! The manifest is replaced with a conditional PUT (`If-Match: <e-tag>`, or
//! `If-None-Match: *` for the first one): of two writers committing at once, one gets
//! [`Error::Conflict`].

use std::any::Any;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{
    MultipartUpload, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion,
};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use super::{Backend, ObjectVersion, ObjectWriter};
use crate::Error;

/// Size of the parts of a multipart upload, and of the ranges a large object is read in
/// concurrently (16 MiB; S3 wants parts of at least 5 MiB).
pub const MULTIPART_PART_BYTES: usize = 16 << 20;
/// Parts uploaded, or ranges read, at once per object.
const IN_FLIGHT: usize = 8;

/// A store on object storage: objects under `prefix` in a bucket.
///
/// ```
/// use bitsnap_core::{Policy, Role, Store, Tensor};
/// use bitsnap_core::backend::ObjectBackend;
/// let remote = ObjectBackend::from_url("memory://", &[]).unwrap();
/// let mut store = Store::open_or_create_backend(std::sync::Arc::new(remote), Policy::default()).unwrap();
/// let t = Tensor::from_f32("w", &[4], Role::Weight, &[1.0, 2.0, 3.0, 4.0]).unwrap();
/// let saved = store.save("step-1", vec![t.clone()]).unwrap();
/// assert_eq!(store.load(saved.info.id).unwrap().tensors, vec![t]);
/// ```
#[derive(Clone)]
pub struct ObjectBackend {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    location: PathBuf,
    rt: Arc<Runtime>,
    /// Whether the server takes conditional PUTs; cleared (with a warning) the first time
    /// it says it does not.
    conditional: Arc<AtomicBool>,
}

impl std::fmt::Debug for ObjectBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectBackend")
            .field("location", &self.location)
            .finish()
    }
}

impl ObjectBackend {
    /// Opens `s3://bucket/prefix` or `memory://`. S3 settings come from the `AWS_*`
    /// environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_REGION`, `AWS_ENDPOINT` for S3-compatible servers, `AWS_ALLOW_HTTP=true` for
    /// plain-HTTP endpoints, `AWS_CONDITIONAL_PUT=disabled` for servers without
    /// conditional PUT), then from `options` (the same keys, as `object_store`'s
    /// `AmazonS3ConfigKey` parses them: `aws_endpoint`, `endpoint`, …), which win.
    pub fn from_url(url: &str, options: &[(&str, &str)]) -> Result<ObjectBackend, Error> {
        let config = |reason: String| Error::InvalidLocation {
            location: url.to_string(),
            reason,
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| config("not a URL".into()))?;
        let (store, prefix): (Arc<dyn ObjectStore>, &str) = match scheme {
            "s3" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(config("no bucket named".into()));
                }
                // reqwest's TLS needs a process-wide provider; another one may be set.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
                for (k, v) in options {
                    let key = AmazonS3ConfigKey::from_str(k)
                        .map_err(|e| config(format!("option `{k}`: {e}")))?;
                    b = b.with_config(key, *v);
                }
                let s3 = b.build().map_err(|e| config(e.to_string()))?;
                (Arc::new(s3), prefix)
            }
            "memory" => (Arc::new(InMemory::new()), rest),
            other => {
                return Err(config(format!(
                    "unsupported scheme `{other}` (supported: s3, memory)"
                )));
            }
        };
        let prefix = ObjectPath::parse(prefix.trim_matches('/'))
            .map_err(|e| config(format!("prefix: {e}")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bitsnap-io")
            .enable_all()
            .build()
            .map_err(|e| Error::io(url, e))?;
        Ok(ObjectBackend {
            store,
            prefix,
            location: PathBuf::from(url.trim_end_matches('/')),
            rt: Arc::new(rt),
            conditional: Arc::new(AtomicBool::new(true)),
        })
    }

    fn key(&self, name: &str) -> ObjectPath {
        self.prefix.clone().join(name)
    }

    fn err(&self, name: &str, e: object_store::Error) -> Error {
        Error::io(self.path_of(name), e.into())
    }

    /// Runs a PUT with `mode`, retrying as a plain PUT once the server turns out not to
    /// support conditional ones.
    fn put(&self, name: &str, bytes: PutPayload, mode: PutMode) -> Result<ObjectVersion, Error> {
        let key = self.key(name);
        let mode = if self.conditional.load(Ordering::Relaxed) {
            mode
        } else {
            PutMode::Overwrite
        };
        let conditional = mode != PutMode::Overwrite;
        let r = self.rt.block_on(
            self.store
                .put_opts(&key, bytes.clone(), PutOptions::from(mode)),
        );
        let r = match r {
            Err(object_store::Error::NotImplemented { .. }) if conditional => {
                self.conditional.store(false, Ordering::Relaxed);
                tracing::warn!(store = %self.location.display(),
                    "the object store does not support conditional PUT: manifest updates are \
                     last-writer-wins; keep one committing process per store");
                self.rt
                    .block_on(self.store.put_opts(&key, bytes, PutOptions::default()))
            }
            r => r,
        };
        match r {
            Ok(p) => Ok(ObjectVersion {
                e_tag: p.e_tag,
                version: p.version,
            }),
            Err(
                e @ (object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. }),
            ) => Err(Error::Conflict {
                file: self.path_of(name),
                reason: format!("another writer replaced it first ({e})"),
            }),
            Err(e) => Err(self.err(name, e)),
        }
    }
}

impl Backend for ObjectBackend {
    fn location(&self) -> &Path {
        &self.location
    }

    fn path_of(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("{}/{name}", self.location.display()))
    }

    fn exclusive(&self) -> bool {
        false
    }

    fn lock(&self) -> Result<Option<Box<dyn Any + Send + Sync>>, Error> {
        Ok(None)
    }

    fn list(&self) -> Result<Vec<String>, Error> {
        let metas: Vec<_> = self
            .rt
            .block_on(self.store.list(Some(&self.prefix)).try_collect::<Vec<_>>())
            .map_err(|e| self.err("", e))?;
        let mut out: Vec<String> = metas
            .iter()
            .filter_map(|m| {
                let mut parts = m.location.prefix_match(&self.prefix)?;
                let name = parts.next()?;
                parts.next().is_none().then(|| name.as_ref().to_string())
            })
            .collect();
        out.sort();
        Ok(out)
    }

    fn size(&self, name: &str) -> Result<Option<u64>, Error> {
        match self.rt.block_on(self.store.head(&self.key(name))) {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(name, e)),
        }
    }

    fn read(&self, name: &str, limit: u64) -> Result<Option<Vec<u8>>, Error> {
        let Some(size) = self.size(name)? else {
            return Ok(None);
        };
        if size > limit {
            return Err(Error::Limit {
                file: self.path_of(name),
                what: "object size",
                value: size,
                limit,
            });
        }
        // Large objects: ranges read concurrently, then joined.
        let part = MULTIPART_PART_BYTES as u64;
        let ranges: Vec<Range<u64>> = (0..size.div_ceil(part).max(1))
            .map(|i| i * part..((i + 1) * part).min(size))
            .collect();
        let mut out = Vec::new();
        out.try_reserve_exact(size as usize)
            .map_err(|_| Error::Alloc {
                what: format!("{}", self.path_of(name).display()),
                bytes: size,
            })?;
        for batch in ranges.chunks(IN_FLIGHT) {
            let tasks: Vec<JoinHandle<_>> = batch
                .iter()
                .map(|r| {
                    let (store, key, r) = (self.store.clone(), self.key(name), r.clone());
                    self.rt.spawn(async move { store.get_range(&key, r).await })
                })
                .collect();
            for t in tasks {
                let bytes = self
                    .rt
                    .block_on(t)
                    .map_err(|e| Error::io(self.path_of(name), std::io::Error::other(e)))?
                    .map_err(|e| self.err(name, e))?;
                out.extend_from_slice(&bytes);
            }
        }
        if out.len() as u64 != size {
            return Err(Error::Truncated {
                file: self.path_of(name),
                offset: out.len() as u64,
                what: "object (it changed while being read)".into(),
            });
        }
        Ok(Some(out))
    }

    fn read_range(&self, name: &str, range: Range<u64>) -> Result<Vec<u8>, Error> {
        let bytes = self
            .rt
            .block_on(self.store.get_range(&self.key(name), range))
            .map_err(|e| self.err(name, e))?;
        Ok(bytes.to_vec())
    }

    fn create(&self, name: &str) -> Result<Box<dyn ObjectWriter>, Error> {
        Ok(Box::new(RemoteWriter {
            backend: self.clone(),
            name: name.to_string(),
            buf: Vec::new(),
            upload: None,
            written: 0,
            done: false,
        }))
    }

    fn remove(&self, name: &str) -> Result<(), Error> {
        self.rt
            .block_on(self.store.delete(&self.key(name)))
            .map_err(|e| self.err(name, e))
    }

    fn sync(&self) -> Result<(), Error> {
        Ok(())
    }

    fn read_versioned(
        &self,
        name: &str,
        limit: u64,
    ) -> Result<Option<(Vec<u8>, ObjectVersion)>, Error> {
        let key = self.key(name);
        let got = match self.rt.block_on(self.store.get(&key)) {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err(name, e)),
        };
        if got.meta.size > limit {
            return Err(Error::Limit {
                file: self.path_of(name),
                what: "object size",
                value: got.meta.size,
                limit,
            });
        }
        let version = ObjectVersion {
            e_tag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        let bytes = self
            .rt
            .block_on(got.bytes())
            .map_err(|e| self.err(name, e))?;
        Ok(Some((bytes.to_vec(), version)))
    }

    fn commit_manifest(
        &self,
        name: &str,
        bytes: &[u8],
        expected: Option<&ObjectVersion>,
    ) -> Result<ObjectVersion, Error> {
        let mode = match expected {
            None => PutMode::Create,
            Some(v) => PutMode::Update(UpdateVersion {
                e_tag: v.e_tag.clone(),
                version: v.version.clone(),
            }),
        };
        self.put(name, PutPayload::from(bytes.to_vec()), mode)
    }
}

type Upload = (
    Box<dyn MultipartUpload>,
    Vec<JoinHandle<object_store::Result<()>>>,
);

/// An object being uploaded: buffered until one part is full, then multipart.
struct RemoteWriter {
    backend: ObjectBackend,
    name: String,
    buf: Vec<u8>,
    upload: Option<Upload>,
    written: u64,
    done: bool,
}

impl RemoteWriter {
    fn io(&self, e: object_store::Error) -> std::io::Error {
        std::io::Error::other(format!(
            "{}: {e}",
            self.backend.path_of(&self.name).display()
        ))
    }

    /// Sends the buffer as the next part, waiting while too many are in flight.
    fn send_part(&mut self) -> std::io::Result<()> {
        let rt = self.backend.rt.clone();
        if self.upload.is_none() {
            let key = self.backend.key(&self.name);
            let up = rt
                .block_on(self.backend.store.put_multipart(&key))
                .map_err(|e| self.io(e))?;
            self.upload = Some((up, Vec::new()));
        }
        let part = PutPayload::from(std::mem::take(&mut self.buf));
        let Some((up, tasks)) = self.upload.as_mut() else {
            return Err(std::io::Error::other("multipart upload not started"));
        };
        tasks.push(rt.spawn(up.put_part(part)));
        if tasks.len() >= IN_FLIGHT {
            let oldest = tasks.remove(0);
            rt.block_on(oldest)
                .map_err(std::io::Error::other)?
                .map_err(|e| self.io(e))?;
        }
        Ok(())
    }
}

impl Write for RemoteWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = MULTIPART_PART_BYTES - self.buf.len();
        let n = data.len().min(room);
        if self.buf.capacity() == 0 {
            self.buf
                .reserve_exact(MULTIPART_PART_BYTES.min(n.max(1 << 20)));
        }
        self.buf.extend_from_slice(&data[..n]);
        self.written += n as u64;
        if self.buf.len() == MULTIPART_PART_BYTES {
            self.send_part()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for RemoteWriter {
    fn finish(mut self: Box<Self>) -> Result<u64, Error> {
        let path = self.backend.path_of(&self.name);
        if self.upload.is_none() {
            let bytes = PutPayload::from(std::mem::take(&mut self.buf));
            self.backend.put(&self.name, bytes, PutMode::Create)?;
            self.done = true;
            return Ok(self.written);
        }
        if !self.buf.is_empty() {
            self.send_part().map_err(|e| Error::io(&path, e))?;
        }
        let rt = self.backend.rt.clone();
        let Some((mut up, tasks)) = self.upload.take() else {
            return Err(Error::io(&path, std::io::Error::other("no upload")));
        };
        let result = (|| {
            for t in tasks {
                rt.block_on(t)
                    .map_err(|e| Error::io(&path, std::io::Error::other(e)))?
                    .map_err(|e| Error::io(&path, e.into()))?;
            }
            rt.block_on(up.complete())
                .map_err(|e| Error::io(&path, e.into()))
        })();
        match result {
            Ok(_) => {
                self.done = true;
                Ok(self.written)
            }
            Err(e) => {
                let _ = rt.block_on(up.abort());
                self.done = true;
                Err(e)
            }
        }
    }
}

impl Drop for RemoteWriter {
    fn drop(&mut self) {
        if !self.done
            && let Some((mut up, tasks)) = self.upload.take()
        {
            tasks.iter().for_each(JoinHandle::abort);
            let _ = self.backend.rt.block_on(up.abort());
        }
    }
}
