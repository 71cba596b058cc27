//! `bitsnap unpack`: restore one snapshot as a safetensors file.

use std::io::Write;
use std::path::{Path, PathBuf};

use bitsnap_core::backend::Writeback;
use bitsnap_core::fmt::bytes;
use bitsnap_core::{Store, safetensors};
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

/// What [`restore`] wrote.
pub(crate) struct Restored {
    /// The snapshot's name.
    pub(crate) name: String,
    /// Tensors written.
    pub(crate) tensors: usize,
    /// Bytes of tensor data written.
    pub(crate) raw_bytes: u64,
}

/// Restores snapshot `id` of `store` as the safetensors file `output`: written to a
/// temporary file beside it, fsynced and renamed into place.
///
/// An unsharded snapshot is streamed: the safetensors header is laid out from the
/// snapshot's header first (the `safetensors` crate's order and JSON), then each tensor
/// is written at its offset by the thread that decoded it
/// ([`RestoreChain::decode_with`](bitsnap_core::RestoreChain::decode_with)) while others
/// still decode, and a [`Writeback`] keeps the disk busy meanwhile. A sharded snapshot
/// is decoded whole, then written.
pub(crate) fn restore(store: &Store, id: u64, output: &Path) -> Result<Restored, CliError> {
    let info = store
        .get(id)
        .ok_or_else(|| bitsnap_core::Error::UnknownSnapshot {
            store: store.dir().to_path_buf(),
            snapshot: id.to_string(),
        })?;
    if !info.shards.is_empty() || !cfg!(unix) {
        let snap = store.load(id)?;
        safetensors::write_file(output, &snap.tensors, &snap.metadata)?;
        return Ok(Restored {
            name: snap.info.name.clone(),
            tensors: snap.tensors.len(),
            raw_bytes: snap.tensors.iter().map(|t| t.data.len() as u64).sum(),
        });
    }
    let chain = store.restore_chain(id, None)?;
    let header = &chain.target().header;
    let layout = stream::Layout::of(header, output)?;
    let tmp = stream::TmpFile::beside(output)?;
    layout.write_head(&tmp)?;
    let writeback =
        Writeback::start(&tmp.file).map_err(|e| crate::pipeline::io_error(&tmp.path, e))?;
    chain.decode_with(|i, t| layout.write_tensor(&tmp, i, &t.data))?;
    writeback.stop();
    tmp.persist(output)?;
    Ok(Restored {
        name: info.name.clone(),
        tensors: header.entries.len(),
        raw_bytes: layout.data_bytes,
    })
}

/// The streamed safetensors writer of [`restore`].
mod stream {
    use std::collections::HashMap;
    use std::fs::File;
    use std::path::{Path, PathBuf};

    use ::safetensors::tensor::{Metadata, TensorInfo};
    use bitsnap_core::safetensors::dtype_to_safetensors;
    use bitsnap_core::{Error, Header};

    use crate::pipeline::io_error;

    /// Where each tensor of a snapshot goes in the safetensors file.
    pub(super) struct Layout {
        /// The 8-byte length and the JSON header, padded to 8 bytes with spaces.
        head: Vec<u8>,
        /// Per header entry, its absolute offset in the file.
        offsets: Vec<u64>,
        /// Bytes of tensor data.
        pub(super) data_bytes: u64,
    }

    impl Layout {
        /// Lays out the entries of `header` as the safetensors crate orders them
        /// (descending dtype, then name), with the header's metadata.
        pub(super) fn of(header: &Header, output: &Path) -> Result<Layout, Error> {
            let e = &header.entries;
            let mut order: Vec<usize> = (0..e.len()).collect();
            order.sort_by(|&a, &b| {
                dtype_to_safetensors(e[b].dtype)
                    .cmp(&dtype_to_safetensors(e[a].dtype))
                    .then(e[a].name.cmp(&e[b].name))
            });
            let too_big = |what: &str| Error::InvalidTensor {
                tensor: what.to_string(),
                reason: format!("does not fit this machine's usize in {}", output.display()),
            };
            let mut offsets = vec![0u64; e.len()];
            let mut infos = Vec::with_capacity(e.len());
            let mut at = 0usize;
            for &i in &order {
                let entry = &e[i];
                let len = usize::try_from(entry.raw_len()).map_err(|_| too_big(&entry.name))?;
                let shape = entry
                    .shape
                    .iter()
                    .map(|&d| usize::try_from(d))
                    .collect::<Result<Vec<usize>, _>>()
                    .map_err(|_| too_big(&entry.name))?;
                let end = at.checked_add(len).ok_or_else(|| too_big(&entry.name))?;
                offsets[i] = at as u64;
                infos.push((
                    entry.name.clone(),
                    TensorInfo {
                        dtype: dtype_to_safetensors(entry.dtype),
                        shape,
                        data_offsets: (at, end),
                    },
                ));
                at = end;
            }
            let metadata: Option<HashMap<String, String>> =
                (!header.metadata.is_empty()).then(|| header.metadata.iter().cloned().collect());
            let safetensors_err = |source| Error::Safetensors {
                file: output.to_path_buf(),
                source,
            };
            let md = Metadata::new(metadata, infos).map_err(safetensors_err)?;
            let json = serde_json::to_vec(&md)
                .map_err(|e| safetensors_err(::safetensors::SafeTensorError::JsonError(e)))?;
            let n = json.len().next_multiple_of(8);
            let mut head = Vec::with_capacity(8 + n);
            head.extend_from_slice(&(n as u64).to_le_bytes());
            head.extend_from_slice(&json);
            head.resize(8 + n, b' ');
            let base = head.len() as u64;
            for o in &mut offsets {
                *o += base;
            }
            Ok(Layout {
                head,
                offsets,
                data_bytes: at as u64,
            })
        }

        /// Writes the header and sizes the file.
        pub(super) fn write_head(&self, tmp: &TmpFile) -> Result<(), Error> {
            let io = |e| io_error(&tmp.path, e);
            tmp.file
                .set_len(self.head.len() as u64 + self.data_bytes)
                .map_err(io)?;
            write_all_at(&tmp.file, &self.head, 0).map_err(io)
        }

        /// Writes entry `i`'s decoded bytes at its offset.
        pub(super) fn write_tensor(
            &self,
            tmp: &TmpFile,
            i: usize,
            data: &[u8],
        ) -> Result<(), Error> {
            let at = self.offsets.get(i).copied().unwrap_or(u64::MAX);
            write_all_at(&tmp.file, data, at).map_err(|e| io_error(&tmp.path, e))
        }
    }

    #[cfg(unix)]
    fn write_all_at(file: &File, data: &[u8], at: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(file, data, at)
    }

    #[cfg(not(unix))]
    fn write_all_at(_: &File, _: &[u8], _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("positioned writes need unix"))
    }

    /// A temporary file beside the output, removed unless persisted.
    pub(super) struct TmpFile {
        pub(super) file: File,
        pub(super) path: PathBuf,
        done: bool,
    }

    impl TmpFile {
        pub(super) fn beside(output: &Path) -> Result<TmpFile, Error> {
            let name = output
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| Error::InvalidLocation {
                    location: output.display().to_string(),
                    reason: "not a file path".into(),
                })?;
            let path = output.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
            let file = File::create(&path).map_err(|e| io_error(&path, e))?;
            Ok(TmpFile {
                file,
                path,
                done: false,
            })
        }

        /// fsyncs the file, renames it to `output` and fsyncs the directory.
        pub(super) fn persist(mut self, output: &Path) -> Result<(), Error> {
            self.file.sync_all().map_err(|e| io_error(&self.path, e))?;
            std::fs::rename(&self.path, output).map_err(|e| io_error(output, e))?;
            self.done = true;
            let dir = match output.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_error(dir, e))
        }
    }

    impl Drop for TmpFile {
        fn drop(&mut self) {
            if !self.done {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Runs `bitsnap unpack`.
pub fn run(args: UnpackArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let store = open_store(&args.store)?;
    let chosen = choose_snapshot(&store, &args.snapshot)?;
    let bar = progress::spinner(&format!("restoring snapshot {}", chosen.index));
    let header = store.header(chosen.info.id)?;
    let restored = restore(&store, chosen.info.id, &args.output)?;
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
    writeln!(
        out,
        "wrote {}: snapshot {} `{}`, {} tensors, {}",
        args.output.display(),
        chosen.index,
        restored.name,
        restored.tensors,
        bytes(restored.raw_bytes)
    )?;
    Ok(())
}
