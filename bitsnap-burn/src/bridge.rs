//! The one place where Burn's records meet bitsnap's tensors.
//!
//! Burn 0.22 records (`ModuleRecord`, `OptimizerRecord`, `LrSchedulerRecord`) expose their
//! content only as burnpack bytes. A record becomes bitsnap [`Tensor`]s plus string
//! metadata that keeps everything else burnpack holds (parameter ids, scalars such as
//! Adam's `time`, the id-to-path map), so the record round-trips exactly.
//!
//! Metadata keys written here (all values are strings):
//!
//! | key | value |
//! |---|---|
//! | `burn.meta.<key>` | a burnpack metadata entry (e.g. optimizer param id → module path) |
//! | `burn.scalar.<key>` | a burnpack scalar: `i:<i64>`, `u:<u64>`, `f:<f64 bits, hex>`, `b:<bool>` |
//! | `burn.pid.<tensor>` | the tensor's parameter id (decimal u64) |
//! | `burn.dtype.<tensor>` | the Burn dtype, where it is not bitsnap's own (`flex32`, `bool_u8`, `bool_u32`) |

use bitsnap_core::{DType, Role, Tensor};

/// String metadata of a snapshot.
pub type Metadata = Vec<(String, String)>;
use burn::store::burn_pack::{self, Bytes, DType as PackDType, Reader, Scalar, Writer};
use burn::tensor::BoolStore;

use crate::Error;

const META: &str = "burn.meta.";
const SCALAR: &str = "burn.scalar.";
const PID: &str = "burn.pid.";
const DTYPE: &str = "burn.dtype.";

/// Which of Burn's records a set of tensors came from: decides series names and roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// `ModuleRecord`: model parameters and buffers.
    Module,
    /// `OptimizerRecord`: per-parameter optimizer state.
    Optimizer,
    /// `LrSchedulerRecord`: scalars only.
    LrScheduler,
}

impl RecordKind {
    /// The name used for series and tensor-name prefixes (`model`, `optim`, `scheduler`).
    pub fn name(self) -> &'static str {
        match self {
            RecordKind::Module => "model",
            RecordKind::Optimizer => "optim",
            RecordKind::LrScheduler => "scheduler",
        }
    }

    /// The role of a tensor of this record: float module tensors are weights; optimizer
    /// tensors named like moments (`moment_1`, `moment_2`, `max_moment_2`, `momentum`)
    /// are moments; everything else is stored exactly as `other`.
    pub fn role(self, name: &str, dtype: DType) -> Role {
        match self {
            RecordKind::Module if dtype.is_float() => Role::Weight,
            RecordKind::Optimizer if dtype.is_float() => match Role::guess(name) {
                Role::OptimizerMoment(k) => Role::OptimizerMoment(k),
                _ => Role::Other,
            },
            _ => Role::Other,
        }
    }
}

/// Converts burnpack bytes (from `Checkpoint::checkpoint_into_bytes`) into tensors and
/// metadata. Tensor names are prefixed with `prefix`; metadata keys too.
pub fn from_burnpack(
    bytes: Bytes,
    kind: RecordKind,
    prefix: &str,
) -> Result<(Vec<Tensor>, Metadata), Error> {
    let record_err = record_error(kind);
    let reader = Reader::from_bytes(bytes).map_err(record_err)?;
    let mut metadata: Vec<(String, String)> = reader
        .metadata()
        .iter()
        .map(|(k, v)| (format!("{prefix}{META}{k}"), v.clone()))
        .collect();
    for (k, s) in reader.scalars() {
        metadata.push((format!("{prefix}{SCALAR}{k}"), scalar_to_string(*s)));
    }
    let (tensors, more) =
        from_pack_tensors(reader.into_tensors().map_err(record_err)?, kind, prefix)?;
    metadata.extend(more);
    Ok((tensors, metadata))
}

/// Converts Burn's tensor snapshots (from a burnpack reader or `ModuleSnapshot::collect`,
/// whose deferred tensors are read back here) into bitsnap tensors named `prefix + name`,
/// and the metadata keeping their parameter ids and Burn dtypes.
pub fn from_pack_tensors(
    pack: Vec<burn_pack::Tensor>,
    kind: RecordKind,
    prefix: &str,
) -> Result<(Vec<Tensor>, Metadata), Error> {
    let record_err = record_error(kind);
    let mut metadata = Vec::new();
    let mut tensors = Vec::with_capacity(pack.len());
    for t in pack {
        let (name, dtype, shape, pid, bytes) = t.into_parts().map_err(record_err)?;
        let (ours, note) = dtype_to_bitsnap(dtype).ok_or_else(|| Error::UnsupportedDType {
            tensor: name.clone(),
            dtype: format!("{dtype:?}"),
        })?;
        if let Some(note) = note {
            metadata.push((format!("{prefix}{DTYPE}{name}"), note.to_string()));
        }
        if let Some(pid) = pid {
            metadata.push((format!("{prefix}{PID}{name}"), pid.to_string()));
        }
        let role = kind.role(&name, ours);
        let shape = shape.iter().map(|&d| d as u64).collect();
        // The read-back buffer becomes the tensor's data without a copy where its
        // allocation allows.
        let data = bytes.try_into_vec::<u8>().unwrap_or_else(|b| b.to_vec());
        tensors.push(Tensor::new(
            format!("{prefix}{name}"),
            ours,
            shape,
            role,
            data,
        )?);
    }
    Ok((tensors, metadata))
}

/// The inverse of [`from_pack_tensors`]: Burn tensor snapshots (resident bytes) for the
/// tensors named with `prefix`, with their parameter ids and Burn dtypes restored.
pub fn to_pack_tensors(
    tensors: &[Tensor],
    metadata: &[(String, String)],
    kind: RecordKind,
    prefix: &str,
) -> Result<Vec<burn_pack::Tensor>, Error> {
    let bad = |key: &str, reason: String| Error::RecordMetadata {
        what: kind.name(),
        key: key.to_string(),
        reason,
    };
    let lookup = |key: String| {
        metadata
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    };
    let mut pack = Vec::new();
    for t in tensors {
        let Some(name) = t.name.strip_prefix(prefix) else {
            continue;
        };
        let note = lookup(format!("{prefix}{DTYPE}{name}"));
        let dtype = dtype_to_burn(t.dtype, note).ok_or_else(|| {
            bad(
                &t.name,
                format!("dtype {} with Burn dtype note {note:?}", t.dtype),
            )
        })?;
        let pid = match lookup(format!("{prefix}{PID}{name}")) {
            Some(v) => Some(
                v.parse::<u64>()
                    .map_err(|_| bad(&t.name, format!("parameter id `{v}` is not a u64")))?,
            ),
            None => None,
        };
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        pack.push(burn_pack::Tensor::new(
            name.to_string(),
            dtype,
            shape,
            pid,
            Bytes::from_bytes_vec(t.data.clone()),
        ));
    }
    Ok(pack)
}

/// Rebuilds burnpack bytes (for `Checkpoint::checkpoint_from_bytes`) from the tensors and
/// metadata that [`from_burnpack`] produced under `prefix`. Tensors and keys without the
/// prefix are ignored.
pub fn to_burnpack(
    tensors: &[Tensor],
    metadata: &[(String, String)],
    kind: RecordKind,
    prefix: &str,
) -> Result<Bytes, Error> {
    let pack = to_pack_tensors(tensors, metadata, kind, prefix)?;
    let mut writer = Writer::new(pack);
    for (k, v) in metadata {
        let Some(k) = k.strip_prefix(prefix) else {
            continue;
        };
        if let Some(key) = k.strip_prefix(META) {
            writer = writer.with_metadata(key, v);
        } else if let Some(key) = k.strip_prefix(SCALAR) {
            let s = scalar_from_str(v).ok_or_else(|| Error::RecordMetadata {
                what: kind.name(),
                key: format!("{prefix}{SCALAR}{key}"),
                reason: format!("`{v}` is not a scalar"),
            })?;
            writer = writer.with_scalar(key, s);
        }
    }
    writer.into_bytes().map_err(record_error(kind))
}

/// The metadata key of a per-tensor entry (`burn.pid.`, `burn.dtype.`) for tensor `name`,
/// whose record prefix (`model/`, `optim/`, or none) comes before its last `/`.
fn tensor_key(what: &str, name: &str) -> String {
    match name.rsplit_once('/') {
        Some((prefix, rest)) => format!("{prefix}/{what}{rest}"),
        None => format!("{what}{name}"),
    }
}

fn lookup<'a>(metadata: &'a [(String, String)], key: &str) -> Option<&'a str> {
    metadata
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The Burn dtype of stored tensor `name` (prefix included) of bitsnap dtype `dtype`.
pub(crate) fn burn_dtype_of(
    name: &str,
    dtype: DType,
    metadata: &[(String, String)],
) -> Option<PackDType> {
    dtype_to_burn(dtype, lookup(metadata, &tensor_key(DTYPE, name)))
}

/// The parameter id recorded for stored tensor `name` (prefix included), if any.
pub(crate) fn param_id_of(name: &str, metadata: &[(String, String)]) -> Option<u64> {
    lookup(metadata, &tensor_key(PID, name)).and_then(|v| v.parse().ok())
}

/// Maps a burnpack error to [`Error::Burnpack`] for `kind`.
fn record_error(kind: RecordKind) -> impl Fn(burn_pack::Error) -> Error + Copy {
    move |source| Error::Burnpack {
        what: kind.name(),
        source,
    }
}

fn scalar_to_string(s: Scalar) -> String {
    match s {
        Scalar::Int(v) => format!("i:{v}"),
        Scalar::UInt(v) => format!("u:{v}"),
        Scalar::Float(v) => format!("f:{:016x}", v.to_bits()),
        Scalar::Bool(v) => format!("b:{v}"),
    }
}

fn scalar_from_str(s: &str) -> Option<Scalar> {
    let (tag, v) = s.split_once(':')?;
    match tag {
        "i" => v.parse().ok().map(Scalar::Int),
        "u" => v.parse().ok().map(Scalar::UInt),
        "f" => u64::from_str_radix(v, 16)
            .ok()
            .map(|b| Scalar::Float(f64::from_bits(b))),
        "b" => v.parse().ok().map(Scalar::Bool),
        _ => None,
    }
}

/// Burn dtype → bitsnap dtype, plus a note when the mapping is not one to one.
pub fn dtype_to_bitsnap(d: PackDType) -> Option<(DType, Option<&'static str>)> {
    Some(match d {
        PackDType::F64 => (DType::F64, None),
        PackDType::F32 => (DType::F32, None),
        PackDType::Flex32 => (DType::F32, Some("flex32")),
        PackDType::F16 => (DType::F16, None),
        PackDType::BF16 => (DType::BF16, None),
        PackDType::I64 => (DType::I64, None),
        PackDType::I32 => (DType::I32, None),
        PackDType::I16 => (DType::I16, None),
        PackDType::I8 => (DType::I8, None),
        PackDType::U64 => (DType::U64, None),
        PackDType::U32 => (DType::U32, None),
        PackDType::U16 => (DType::U16, None),
        PackDType::U8 => (DType::U8, None),
        PackDType::Bool(BoolStore::Native) => (DType::Bool, None),
        PackDType::Bool(BoolStore::U8) => (DType::U8, Some("bool_u8")),
        PackDType::Bool(BoolStore::U32) => (DType::U32, Some("bool_u32")),
        PackDType::QFloat(_) => return None,
    })
}

/// bitsnap dtype (and the note [`dtype_to_bitsnap`] left) → Burn dtype.
pub fn dtype_to_burn(d: DType, note: Option<&str>) -> Option<PackDType> {
    Some(match (d, note) {
        (DType::F32, Some("flex32")) => PackDType::Flex32,
        (DType::U8, Some("bool_u8")) => PackDType::Bool(BoolStore::U8),
        (DType::U32, Some("bool_u32")) => PackDType::Bool(BoolStore::U32),
        (_, Some(_)) => return None,
        (DType::F64, None) => PackDType::F64,
        (DType::F32, None) => PackDType::F32,
        (DType::F16, None) => PackDType::F16,
        (DType::BF16, None) => PackDType::BF16,
        (DType::I64, None) => PackDType::I64,
        (DType::I32, None) => PackDType::I32,
        (DType::I16, None) => PackDType::I16,
        (DType::I8, None) => PackDType::I8,
        (DType::U64, None) => PackDType::U64,
        (DType::U32, None) => PackDType::U32,
        (DType::U16, None) => PackDType::U16,
        (DType::U8, None) => PackDType::U8,
        (DType::Bool, None) => PackDType::Bool(BoolStore::Native),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_round_trip_exactly() {
        for s in [
            Scalar::Int(-5),
            Scalar::UInt(u64::MAX),
            Scalar::Float(-0.0),
            Scalar::Float(f64::NAN),
            Scalar::Bool(true),
        ] {
            let back = scalar_from_str(&scalar_to_string(s)).unwrap();
            match (s, back) {
                (Scalar::Float(a), Scalar::Float(b)) => assert_eq!(a.to_bits(), b.to_bits()),
                (a, b) => assert_eq!(a, b),
            }
        }
        assert!(scalar_from_str("x:1").is_none());
        assert!(scalar_from_str("i:abc").is_none());
    }

    #[test]
    fn every_storable_dtype_maps_back() {
        for d in [
            PackDType::F64,
            PackDType::F32,
            PackDType::Flex32,
            PackDType::F16,
            PackDType::BF16,
            PackDType::I64,
            PackDType::I32,
            PackDType::I16,
            PackDType::I8,
            PackDType::U64,
            PackDType::U32,
            PackDType::U16,
            PackDType::U8,
            PackDType::Bool(BoolStore::Native),
            PackDType::Bool(BoolStore::U8),
            PackDType::Bool(BoolStore::U32),
        ] {
            let (ours, note) = dtype_to_bitsnap(d).unwrap();
            assert_eq!(ours.size(), d.size());
            assert_eq!(dtype_to_burn(ours, note), Some(d));
        }
    }

    #[test]
    fn burnpack_round_trips_with_ids_scalars_and_metadata() {
        let t = burn_pack::Tensor::new(
            "7.momentum.moment_2".into(),
            PackDType::F32,
            vec![2, 2],
            Some(7),
            Bytes::from_bytes_vec(vec![1; 16]),
        );
        let b = burn_pack::Tensor::new(
            "mask".into(),
            PackDType::Bool(BoolStore::Native),
            vec![3],
            None,
            Bytes::from_bytes_vec(vec![1, 0, 1]),
        );
        let bytes = Writer::new(vec![t, b])
            .with_metadata("7", "layer.weight")
            .with_scalar("7.momentum.time", Scalar::UInt(12))
            .into_bytes()
            .unwrap();
        let (tensors, meta) = from_burnpack(bytes, RecordKind::Optimizer, "optim/").unwrap();
        let moment = tensors
            .iter()
            .find(|t| t.name == "optim/7.momentum.moment_2")
            .unwrap();
        assert_eq!(moment.role, Role::OptimizerMoment(2));
        let back = to_burnpack(&tensors, &meta, RecordKind::Optimizer, "optim/").unwrap();
        let reader = Reader::from_bytes(back).unwrap();
        assert_eq!(
            reader.metadata().get("7").map(String::as_str),
            Some("layer.weight")
        );
        assert_eq!(
            reader.scalars().get("7.momentum.time"),
            Some(&Scalar::UInt(12))
        );
        let mut got = reader.into_tensors().unwrap();
        got.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(got[0].param_id, Some(7));
        assert_eq!(got[1].name, "mask");
        assert_eq!(got[1].dtype, PackDType::Bool(BoolStore::Native));
    }
}
