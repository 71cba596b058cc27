//! Reading and writing [safetensors] files as bitsnap [`Tensor`]s.
//!
//! A safetensors file is an 8-byte little-endian header length `n`, `n` bytes of JSON
//! (tensor name → dtype, shape and data offsets, plus an optional `__metadata__` map of
//! strings), then the tensors' bytes. The header is parsed and checked by the
//! `safetensors` crate (offsets must tile the data section exactly); this module adds a
//! size cap before allocating, a check that the file is exactly as long as its header
//! says, and the mapping between safetensors dtypes and [`DType`].
//!
//! - [`read_index`] reads and checks the header only: a cheap check of a whole list of
//!   files before any of them is packed.
//! - [`read_file`] reads every tensor, in file (data offset) order, as [`Tensor`]s with a
//!   [`Role`] from a caller's override or [`Role::guess`], plus the `__metadata__`
//!   entries sorted by key.
//! - [`write_file`] writes tensors and metadata to a temporary file in the destination's
//!   directory, fsyncs it and renames it into place: on error no partial file is left.
//!
//! Every dtype that both formats know is supported: `BOOL`, `U8`, `I8`, `U16`, `I16`,
//! `U32`, `I32`, `U64`, `I64`, `F16`, `BF16`, `F32`, `F64`, `F8_E5M2`, `F8_E4M3`. Others
//! (`F4`, `F6_E2M3`, `F6_E3M2`, `F8_E8M0`) are refused with an error naming the file and
//! the tensor.
//!
//! Tensor order on writing is the `safetensors` crate's: by decreasing dtype alignment,
//! then by name. That is also the order in files the crate (or Python's `safetensors`)
//! wrote, so such files come back in their original order. A `__metadata__` map that is
//! present but empty is written back as absent.
//!
//! ```
//! use bitsnap_core::{DType, Role, Tensor, safetensors};
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("step-1.safetensors");
//! let t = Tensor::from_f32("layer.weight", &[2, 2], Role::Weight, &[1.0, 2.0, 3.0, 4.0]).unwrap();
//! let meta = vec![("format".to_string(), "pt".to_string())];
//! safetensors::write_file(&path, &[t.clone()], &meta).unwrap();
//! let (tensors, metadata) = safetensors::read_file(&path, |_| None).unwrap();
//! assert_eq!((tensors, metadata), (vec![t], meta));
//! ```
//!
//! [safetensors]: https://github.com/huggingface/safetensors

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use ::safetensors::tensor::{Metadata as Header, TensorInfo};
use ::safetensors::{Dtype, SafeTensorError, View};

use crate::{DType, Error, Role, Tensor};

/// Bytes of the length prefix that starts every safetensors file.
pub const LENGTH_PREFIX_BYTES: u64 = 8;
/// Largest JSON header accepted, in bytes (100 MB, the `safetensors` crate's own limit).
/// Checked before the header is allocated.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The `__metadata__` entries of a file: `(key, value)` pairs, sorted by key.
pub type Metadata = Vec<(String, String)>;

/// One tensor as a safetensors header lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// Absolute offset of the tensor's bytes in the file.
    pub offset: u64,
    /// Length of the tensor's bytes.
    pub len: u64,
}

/// A checked safetensors header: the tensors in file order and the `__metadata__` map.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Index {
    /// Tensors, in the order of their data in the file.
    pub tensors: Vec<IndexEntry>,
    /// `__metadata__` entries, sorted by key (empty when the file has none).
    pub metadata: Metadata,
}

impl Index {
    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.len).sum()
    }
}

/// The bitsnap dtype of a safetensors dtype, if bitsnap has it.
pub fn dtype_from_safetensors(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::BOOL => DType::Bool,
        Dtype::U8 => DType::U8,
        Dtype::I8 => DType::I8,
        Dtype::U16 => DType::U16,
        Dtype::I16 => DType::I16,
        Dtype::U32 => DType::U32,
        Dtype::I32 => DType::I32,
        Dtype::U64 => DType::U64,
        Dtype::I64 => DType::I64,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::F8_E5M2 => DType::F8E5M2,
        Dtype::F8_E4M3 => DType::F8E4M3,
        _ => return None,
    })
}

/// The safetensors dtype of a bitsnap dtype (every bitsnap dtype has one).
pub fn dtype_to_safetensors(dtype: DType) -> Dtype {
    match dtype {
        DType::Bool => Dtype::BOOL,
        DType::U8 => Dtype::U8,
        DType::I8 => Dtype::I8,
        DType::U16 => Dtype::U16,
        DType::I16 => Dtype::I16,
        DType::U32 => Dtype::U32,
        DType::I32 => Dtype::I32,
        DType::U64 => Dtype::U64,
        DType::I64 => Dtype::I64,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        DType::F8E5M2 => Dtype::F8_E5M2,
        DType::F8E4M3 => Dtype::F8_E4M3,
    }
}

fn malformed(path: &Path, tensor: Option<&str>, offset: u64, reason: String) -> Error {
    Error::Malformed {
        file: path.to_path_buf(),
        tensor: tensor.map(str::to_string),
        what: "safetensors header",
        offset,
        reason,
    }
}

/// Reads and checks the header of the safetensors file at `path` without reading the
/// tensor data: the length prefix, the size cap, the JSON, that every dtype is one
/// bitsnap stores, that the offsets tile the data section and that the file ends where
/// the data does.
pub fn read_index(path: &Path) -> Result<Index, Error> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    read_index_from(&mut file, path)
}

fn read_index_from(file: &mut File, path: &Path) -> Result<Index, Error> {
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let not_safetensors = |offset: u64, reason: String| {
        malformed(
            path,
            None,
            offset,
            format!("not a safetensors file: {reason}"),
        )
    };
    if file_len < LENGTH_PREFIX_BYTES {
        return Err(not_safetensors(
            0,
            format!("{file_len} bytes, shorter than the 8-byte length prefix"),
        ));
    }
    let mut prefix = [0u8; LENGTH_PREFIX_BYTES as usize];
    file.read_exact(&mut prefix)
        .map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER_BYTES {
        return Err(not_safetensors(
            0,
            format!("header length {n} is above the limit of {MAX_HEADER_BYTES} bytes"),
        ));
    }
    let data_start = LENGTH_PREFIX_BYTES + n;
    if data_start > file_len {
        return Err(not_safetensors(
            0,
            format!("header length {n} runs past the end of the {file_len}-byte file"),
        ));
    }
    let mut header = Vec::new();
    header
        .try_reserve_exact(n as usize)
        .map_err(|_| Error::Alloc {
            what: format!("safetensors header of {}", path.display()),
            bytes: n,
        })?;
    file.by_ref()
        .take(n)
        .read_to_end(&mut header)
        .map_err(|e| Error::io(path, e))?;
    if !header.starts_with(b"{") {
        return Err(not_safetensors(
            LENGTH_PREFIX_BYTES,
            "the header does not start with `{`".into(),
        ));
    }
    let metadata: Header = serde_json::from_slice(&header).map_err(|e| {
        not_safetensors(
            LENGTH_PREFIX_BYTES,
            format!("line {} column {}: {e}", e.line(), e.column()),
        )
    })?;
    let data_len = metadata.data_len() as u64;
    if data_start.checked_add(data_len) != Some(file_len) {
        return Err(malformed(
            path,
            None,
            data_start,
            format!(
                "the header describes {data_len} bytes of tensor data but the file holds {}",
                file_len - data_start
            ),
        ));
    }
    let infos = metadata.tensors();
    let mut tensors = Vec::with_capacity(infos.len());
    for name in metadata.offset_keys() {
        let Some(info) = infos.get(&name) else {
            continue;
        };
        tensors.push(index_entry(path, &name, info, data_start)?);
    }
    let mut meta: Metadata = metadata
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    meta.sort();
    Ok(Index {
        tensors,
        metadata: meta,
    })
}

fn index_entry(
    path: &Path,
    name: &str,
    info: &TensorInfo,
    data_start: u64,
) -> Result<IndexEntry, Error> {
    let offset = data_start + info.data_offsets.0 as u64;
    let dtype = dtype_from_safetensors(info.dtype).ok_or_else(|| {
        malformed(
            path,
            Some(name),
            LENGTH_PREFIX_BYTES,
            format!(
                "dtype {} is not supported (bitsnap stores {})",
                info.dtype,
                supported_dtypes()
            ),
        )
    })?;
    let shape: Vec<u64> = info.shape.iter().map(|&d| d as u64).collect();
    let len = (info.data_offsets.1 - info.data_offsets.0) as u64;
    // Name, rank and size limits of the bitsnap format.
    let expected = crate::tensor::byte_len(name, dtype, &shape)
        .map_err(|e| malformed(path, Some(name), offset, e.to_string()))?;
    if expected != len {
        return Err(malformed(
            path,
            Some(name),
            offset,
            format!("{len} bytes of data for shape {shape:?} of {dtype} ({expected} expected)"),
        ));
    }
    Ok(IndexEntry {
        name: name.to_string(),
        dtype,
        shape,
        offset,
        len,
    })
}

fn supported_dtypes() -> String {
    DType::ALL
        .iter()
        .map(|d| dtype_to_safetensors(*d).to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads every tensor of the safetensors file at `path`, in file order, with its
/// `__metadata__` entries sorted by key.
///
/// The role of each tensor is `role_override(name)` where that returns `Some`, else
/// [`Role::guess`]. Tensors are read one at a time straight into their buffers: peak
/// memory is the size of the tensors, not twice it.
pub fn read_file(
    path: &Path,
    role_override: impl Fn(&str) -> Option<Role>,
) -> Result<(Vec<Tensor>, Metadata), Error> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let index = read_index_from(&mut file, path)?;
    let mut tensors = Vec::with_capacity(index.tensors.len());
    for entry in &index.tensors {
        let mut data = Vec::new();
        data.try_reserve_exact(entry.len as usize)
            .map_err(|_| Error::Alloc {
                what: format!("tensor `{}` of {}", entry.name, path.display()),
                bytes: entry.len,
            })?;
        file.seek(SeekFrom::Start(entry.offset))
            .map_err(|e| Error::io(path, e))?;
        file.by_ref()
            .take(entry.len)
            .read_to_end(&mut data)
            .map_err(|e| Error::io(path, e))?;
        if data.len() as u64 != entry.len {
            return Err(Error::Truncated {
                file: path.to_path_buf(),
                offset: entry.offset + data.len() as u64,
                what: format!("data of tensor `{}`", entry.name),
            });
        }
        let role = role_override(&entry.name).unwrap_or_else(|| Role::guess(&entry.name));
        let tensor = Tensor::new(
            entry.name.clone(),
            entry.dtype,
            entry.shape.clone(),
            role,
            data,
        )
        .map_err(|e| malformed(path, Some(&entry.name), entry.offset, e.to_string()))?;
        tensors.push(tensor);
    }
    Ok((tensors, index.metadata))
}

/// A tensor as the `safetensors` crate's writer sees it.
struct TensorRef<'a> {
    tensor: &'a Tensor,
    shape: Vec<usize>,
}

impl View for &TensorRef<'_> {
    fn dtype(&self) -> Dtype {
        dtype_to_safetensors(self.tensor.dtype)
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.tensor.data)
    }
    fn data_len(&self) -> usize {
        self.tensor.data.len()
    }
}

/// Writes `tensors` and `metadata` (as `__metadata__`, omitted when empty) to a
/// safetensors file at `path`, replacing it if it exists.
///
/// The file is written under a temporary name in the same directory, fsynced, renamed
/// into place and the directory fsynced: a crash or an error leaves either the old file
/// or the complete new one, never a partial file (a crash may leave the temporary file,
/// named `.NAME.*.tmp`).
pub fn write_file(
    path: &Path,
    tensors: &[Tensor],
    metadata: &[(String, String)],
) -> Result<(), Error> {
    let mut seen = std::collections::HashSet::new();
    let mut views = Vec::with_capacity(tensors.len());
    for t in tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(Error::InvalidTensor {
                tensor: t.name.clone(),
                reason: format!("appears twice in what is written to {}", path.display()),
            });
        }
        let shape = t
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<usize>, _>>()
            .map_err(|_| Error::InvalidTensor {
                tensor: t.name.clone(),
                reason: format!("shape {:?} does not fit this machine's usize", t.shape),
            })?;
        views.push(TensorRef { tensor: t, shape });
    }
    let info: Option<HashMap<String, String>> =
        (!metadata.is_empty()).then(|| metadata.iter().cloned().collect());

    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::InvalidLocation {
            location: path.display().to_string(),
            reason: "not a file path".into(),
        })?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{file_name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    ::safetensors::serialize_to_file(
        views.iter().map(|v| (v.tensor.name.as_str(), v)),
        info,
        tmp.path(),
    )
    .map_err(|e| match e {
        SafeTensorError::IoError(source) => Error::io(tmp.path(), source),
        other => Error::Safetensors {
            file: path.to_path_buf(),
            source: other,
        },
    })?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Tensor> {
        let mut out = Vec::new();
        for (i, d) in DType::ALL.into_iter().enumerate() {
            let n = 3 + i;
            let data: Vec<u8> = (0..n * d.size())
                .map(|b| {
                    if d == DType::Bool {
                        (b % 2) as u8
                    } else {
                        (b * 7 + i) as u8
                    }
                })
                .collect();
            out.push(
                Tensor::new(
                    format!("t.{}", d.name()),
                    d,
                    vec![n as u64],
                    Role::Weight,
                    data,
                )
                .unwrap(),
            );
        }
        out.push(Tensor::new("scalar", DType::I64, vec![], Role::Other, vec![1; 8]).unwrap());
        out.push(Tensor::new("empty", DType::F32, vec![0, 4], Role::Weight, vec![]).unwrap());
        out
    }

    #[test]
    fn every_dtype_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        let tensors = sample();
        let meta = vec![("a".to_string(), "1".to_string()), ("b".into(), "x".into())];
        write_file(&path, &tensors, &meta).unwrap();
        let (back, m) = read_file(&path, |_| None).unwrap();
        assert_eq!(m, meta);
        let mut want = tensors.clone();
        want.sort_by(|a, b| a.name.cmp(&b.name));
        let mut got = back;
        got.sort_by(|a, b| a.name.cmp(&b.name));
        for (a, b) in got.iter().zip(&want) {
            assert_eq!(
                (&a.name, a.dtype, &a.shape, &a.data),
                (&b.name, b.dtype, &b.shape, &b.data)
            );
        }
        assert_eq!(got.len(), want.len());
        // Only the final file is left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn roles_come_from_override_then_guess() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.safetensors");
        let t = |n: &str| Tensor::from_f32(n, &[1], Role::Weight, &[1.0]).unwrap();
        write_file(&path, &[t("s.0.exp_avg"), t("w"), t("x")], &[]).unwrap();
        let (back, meta) =
            read_file(&path, |n| (n == "x").then_some(Role::OptimizerMoment(2))).unwrap();
        let roles: HashMap<_, _> = back.iter().map(|t| (t.name.as_str(), t.role)).collect();
        assert_eq!(roles["s.0.exp_avg"], Role::OptimizerMoment(1));
        assert_eq!(roles["w"], Role::Weight);
        assert_eq!(roles["x"], Role::OptimizerMoment(2));
        assert!(meta.is_empty());
    }

    #[test]
    fn rejects_garbage_short_and_truncated_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        for bytes in [
            b"hello world, not a tensor file".to_vec(),
            b"abc".to_vec(),
            {
                let mut v = 4u64.to_le_bytes().to_vec();
                v.extend_from_slice(b"[1,]");
                v
            },
        ] {
            std::fs::write(&p, &bytes).unwrap();
            let e = read_file(&p, |_| None).unwrap_err().to_string();
            assert!(
                e.contains("x.safetensors") && e.contains("not a safetensors file"),
                "{e}"
            );
        }
        write_file(&p, &sample(), &[]).unwrap();
        let full = std::fs::read(&p).unwrap();
        std::fs::write(&p, &full[..full.len() - 1]).unwrap();
        let e = read_file(&p, |_| None).unwrap_err().to_string();
        assert!(e.contains("bytes of tensor data"), "{e}");
    }

    #[test]
    fn names_unsupported_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e8.safetensors");
        let data = [1u8, 2, 3];
        let view = ::safetensors::tensor::TensorView::new(Dtype::F8_E8M0, vec![3], &data).unwrap();
        ::safetensors::serialize_to_file([("scales", view)], None, &p).unwrap();
        let e = read_index(&p).unwrap_err().to_string();
        assert!(
            e.contains("e8.safetensors") && e.contains("`scales`") && e.contains("F8_E8M0"),
            "{e}"
        );
    }

    #[test]
    fn failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.safetensors");
        let t = Tensor::from_f32("w", &[1], Role::Weight, &[1.0]).unwrap();
        assert!(write_file(&p, &[t.clone(), t], &[]).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
