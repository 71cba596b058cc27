//! `bitsnap inspect`: per tensor, how a snapshot is stored.

use std::io::Write;
use std::path::PathBuf;

use bitsnap_core::codec::{ClusterLayout, CodecId};
use bitsnap_core::fmt::{Ratio, bytes, ratio};
use bitsnap_core::stage_keys;
use clap::Args;
use serde::Serialize;

use crate::error::CliError;
use crate::store::{choose_snapshot, index_of, open_store};
use crate::table::{Align, Table};

/// The `--json` output of `bitsnap inspect`, documented in the command's long help.
pub const JSON_DOC: &str = "\
With --json, prints one JSON object (fields in this order; sizes in bytes):
  index          position of the snapshot in `bitsnap ls`, from 0
  id             the store's id of the snapshot
  name           the name it was packed as
  file           its file in the store directory
  base_index     index of the snapshot it is a delta on, or null for a full snapshot
  base_id        id of that snapshot, or null
  raw_bytes      decoded size of its tensors
  stored_bytes   size of its file (payloads, header and framing)
  payload_bytes  size of its tensor payloads
  ratio          raw_bytes / stored_bytes
  metadata       object of the string metadata it was packed with (safetensors
                 `__metadata__`)
  tensors        array, in stored order, one object per tensor:
    name         tensor name
    dtype        bool, u8, i8, u16, i16, u32, i32, u64, i64, f16, bf16, f32, f64,
                 f8_e5m2 or f8_e4m3
    shape        array of dimensions ([] for a scalar)
    role         weight, other, moment1 or moment2
    codec        raw, planes, xor, bitmask, unchanged, intdelta, cast, identical,
                 cluster (lossy) or residual (lossy, against the base)
    raw_bytes    decoded size
    stored_bytes payload size
    ratio        raw_bytes / stored_bytes
    changed      elements that differ from the base snapshot's tensor, or null when
                 it was not compared with one (full snapshot, new tensor, new shape)
    changed_fraction  changed / number of elements, or null
    error        null when the tensor restores bit for bit; for a lossy codec an
                 object {rel_l2: ||x - x'||2 / ||x||2, max_abs: max |x - x'|}
    lossy        null when the tensor restores bit for bit; else an object:
                   bits    bits per code (2, 3, 4, 6, 8 or 16), or 0 when the base
                           snapshot's tensor was reused (codec unchanged, within budget)
                   domain  \"log\", \"linear\", \"ratio\" (codec residual: x = base x
                           ratio[code]), \"delta\" (residual: x = base + delta[code])
                           or \"base\" (reused)
                   codes   how the codes are stored: \"planes\" (packed, byte
                           planes + zstd) or \"context\" (rANS, a frequency table
                           per row and column scale class); null when reused
                   budget  the relative L2 allowed (metadata bitsnap.max_error;
                           for first moments bitsnap.max_error_m1), or null under a
                           fixed --bits
                   why     one line: what was chosen and the stage rule behind the
                           budget (metadata bitsnap.budget_rule)
    predictor    for codec replay: the update rule that predicted the tensor and its
                 constants (FORMAT.md 3.9), e.g. adamw-torch(9.99e-1, ...); else null
    candidates   array of {codec, bytes}: the codecs the policy tried and their
                 payload sizes (estimated from samples for tensors over 2 MiB)";

/// The long help of the command.
pub fn long_about() -> String {
    format!(
        "\
Show, for each tensor of a snapshot: dtype, shape, role, the codec that stores it, the \
fraction of its elements that changed since the base snapshot, its ratio and, for lossy \
codecs, the quantization error, the code width and domain, the error budget and why. \
Reads the snapshot's header (and the head of each quantized payload) only (no decoding; \
`bitsnap verify` checks the data).

SNAPSHOT is a decimal index into the store's snapshots (0 is the oldest), otherwise a \
snapshot name (the latest snapshot of that name).\n\n{JSON_DOC}"
    )
}

/// Arguments of `bitsnap inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Store directory, or an `s3://bucket/prefix` URL.
    #[arg(value_name = "STORE_DIR")]
    store: PathBuf,
    /// Index (from 0) or name of the snapshot.
    #[arg(value_name = "SNAPSHOT")]
    snapshot: String,
    /// Print JSON (see the long help for the fields).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct InspectJson {
    index: usize,
    id: u64,
    name: String,
    file: String,
    base_index: Option<usize>,
    base_id: Option<u64>,
    raw_bytes: u64,
    stored_bytes: u64,
    payload_bytes: u64,
    ratio: f64,
    metadata: serde_json::Map<String, serde_json::Value>,
    tensors: Vec<TensorJson>,
}

#[derive(Debug, Serialize)]
struct TensorJson {
    name: String,
    dtype: &'static str,
    shape: Vec<u64>,
    role: String,
    codec: &'static str,
    /// Tensors the payload references (reference codecs): `name` in this snapshot,
    /// `base:name` in the base.
    references: Vec<String>,
    /// For `replay` payloads: the predictor and its constants (`adamw-torch(k0, …)`).
    predictor: Option<String>,
    raw_bytes: u64,
    stored_bytes: u64,
    ratio: f64,
    changed: Option<u64>,
    changed_fraction: Option<f64>,
    error: Option<ErrorJson>,
    lossy: Option<LossyJson>,
    candidates: Vec<CandidateJson>,
}

#[derive(Debug, Serialize)]
struct LossyJson {
    bits: u32,
    domain: &'static str,
    codes: Option<&'static str>,
    budget: Option<f64>,
    why: String,
}

#[derive(Debug, Serialize)]
struct ErrorJson {
    rel_l2: f64,
    max_abs: f64,
}

#[derive(Debug, Serialize)]
struct CandidateJson {
    codec: &'static str,
    bytes: u64,
}

/// Runs `bitsnap inspect`.
pub fn run(args: InspectArgs, out: &mut dyn Write) -> Result<(), CliError> {
    let store = open_store(&args.store)?;
    let chosen = choose_snapshot(&store, &args.snapshot)?;
    let info = chosen.info;
    let header = store.header(info.id)?;
    let meta = |key: &str| {
        header
            .metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let budget = meta(stage_keys::MAX_ERROR).and_then(|v| v.parse::<f64>().ok());
    // First moments have a budget of their own (a factor on the second moments').
    let budget_m1 = meta(stage_keys::MAX_ERROR_M1)
        .and_then(|v| v.parse::<f64>().ok())
        .or(budget);
    let rule = meta(stage_keys::BUDGET_RULE);
    // The width and domain of quantized tensors are in their payloads' own headers.
    let file = match header
        .entries
        .iter()
        .any(|e| !e.codec.is_lossless() || e.codec == CodecId::Replay)
    {
        true => Some(store.open_file(info.id)?),
        false => None,
    };
    let tensors: Vec<TensorJson> = header
        .entries
        .iter()
        .map(|e| {
            let numel = e.numel();
            let budget = match e.role {
                bitsnap_core::Role::OptimizerMoment(1) => budget_m1,
                _ => budget,
            };
            let lossy = match (e.codec, &e.decision.error, &file) {
                (CodecId::Cluster | CodecId::ClusterResidual, _, Some(f)) => {
                    let layout = ClusterLayout::parse(f.payload(e)?, e.dtype).map_err(|c| {
                        bitsnap_core::Error::Malformed {
                            file: f.path.clone(),
                            tensor: Some(e.name.clone()),
                            what: "payload",
                            offset: e.offset.saturating_add(c.offset as u64),
                            reason: c.reason.clone(),
                        }
                    })?;
                    let domain = layout.domain();
                    let what = match e.codec {
                        CodecId::ClusterResidual => format!("{domain} to the base"),
                        _ => domain.to_string(),
                    };
                    Some(LossyJson {
                        bits: layout.bits.bits(),
                        domain,
                        codes: Some(layout.coding()),
                        budget,
                        why: match budget {
                            Some(b) => format!(
                                "narrowest width within {b} ({what}, {} entries, {} codes); {}",
                                layout.entries,
                                layout.coding(),
                                rule.as_deref().unwrap_or("-")
                            ),
                            None => format!("fixed {}-bit codes", layout.bits.bits()),
                        },
                    })
                }
                (CodecId::Unchanged, Some(d), _) => Some(LossyJson {
                    bits: 0,
                    domain: "base",
                    codes: None,
                    budget,
                    why: format!(
                        "moved {:.2e} since the base, within {}: base reused; {}",
                        d.rel_l2,
                        budget.map_or("-".into(), |b| b.to_string()),
                        rule.as_deref().unwrap_or("-")
                    ),
                }),
                _ => None,
            };
            let predictor = match (e.codec, &file) {
                (CodecId::Replay, Some(f)) => {
                    let (replay, _) = bitsnap_core::codec::replay::parse_header(f.payload(e)?)
                        .map_err(|c| bitsnap_core::Error::Malformed {
                            file: f.path.clone(),
                            tensor: Some(e.name.clone()),
                            what: "payload",
                            offset: e.offset.saturating_add(c.offset as u64),
                            reason: c.reason.clone(),
                        })?;
                    Some(replay.describe())
                }
                _ => None,
            };
            Ok(TensorJson {
                predictor,
                name: e.name.clone(),
                dtype: e.dtype.name(),
                shape: e.shape.clone(),
                role: e.role.to_string(),
                codec: e.codec.name(),
                references: e
                    .references
                    .iter()
                    .map(|r| match r.scope {
                        bitsnap_core::format::RefScope::Base => format!("base:{}", r.name),
                        bitsnap_core::format::RefScope::Snapshot => r.name.clone(),
                    })
                    .collect(),
                raw_bytes: e.raw_len(),
                stored_bytes: e.len,
                ratio: ratio(e.raw_len(), e.len),
                changed: e.decision.changed,
                changed_fraction: e
                    .decision
                    .changed
                    .filter(|_| numel > 0)
                    .map(|c| c as f64 / numel as f64),
                error: e.decision.error.map(|q| ErrorJson {
                    rel_l2: q.rel_l2,
                    max_abs: q.max_abs,
                }),
                lossy,
                candidates: e
                    .decision
                    .candidates
                    .iter()
                    .map(|(c, b)| CandidateJson {
                        codec: c.name(),
                        bytes: *b,
                    })
                    .collect(),
            })
        })
        .collect::<Result<_, bitsnap_core::Error>>()?;
    let doc = InspectJson {
        index: chosen.index,
        id: info.id,
        name: info.name.clone(),
        file: info.file.clone(),
        base_index: info.base.and_then(|b| index_of(&store, b)),
        base_id: info.base,
        raw_bytes: header.raw_bytes(),
        stored_bytes: info.stored_bytes,
        payload_bytes: header.payload_bytes(),
        ratio: ratio(header.raw_bytes(), info.stored_bytes),
        metadata: header
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
        tensors,
    };
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &doc)?;
        writeln!(out)?;
        return Ok(());
    }
    let base = match (doc.base_index, doc.base_id) {
        (Some(i), _) => format!("delta on snapshot {i}"),
        (None, Some(id)) => format!("delta on id {id} (missing)"),
        (None, None) => "full snapshot".into(),
    };
    writeln!(
        out,
        "snapshot {} `{}` (id {}, {}): {base}, {} tensors, {} raw, {} stored ({})",
        doc.index,
        doc.name,
        doc.id,
        doc.file,
        doc.tensors.len(),
        bytes(doc.raw_bytes),
        bytes(doc.stored_bytes),
        Ratio(doc.ratio)
    )?;
    if !header.metadata.is_empty() {
        let kv: Vec<String> = header
            .metadata
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        writeln!(out, "metadata: {}", kv.join(", "))?;
    }
    let mut t = Table::new(&[
        ("name", Align::Left),
        ("dtype", Align::Left),
        ("shape", Align::Left),
        ("role", Align::Left),
        ("codec", Align::Left),
        ("changed", Align::Right),
        ("raw", Align::Right),
        ("stored", Align::Right),
        ("ratio", Align::Right),
        ("error (rel. L2 / max abs.)", Align::Left),
        ("lossy (bits domain / budget)", Align::Left),
    ]);
    for e in &doc.tensors {
        let shape: Vec<String> = e.shape.iter().map(u64::to_string).collect();
        t.row(vec![
            e.name.clone(),
            e.dtype.to_string(),
            format!("[{}]", shape.join(", ")),
            e.role.clone(),
            match (&e.predictor, e.references.is_empty()) {
                (Some(p), _) => format!("{} {p} of {}", e.codec, e.references.join(", ")),
                (None, true) => e.codec.to_string(),
                (None, false) => format!("{} of {}", e.codec, e.references.join(", ")),
            },
            e.changed_fraction
                .map_or("-".into(), |f| format!("{:.3}%", f * 100.0)),
            bytes(e.raw_bytes),
            bytes(e.stored_bytes),
            Ratio(e.ratio).to_string(),
            e.error.as_ref().map_or("-".into(), |q| {
                format!("{:.2e} / {:.2e}", q.rel_l2, q.max_abs)
            }),
            e.lossy.as_ref().map_or("-".into(), |l| {
                format!(
                    "{} {}{} / {}",
                    l.bits,
                    l.domain,
                    if l.codes == Some("context") {
                        " ctx"
                    } else {
                        ""
                    },
                    l.budget.map_or("fixed".into(), |b| b.to_string())
                )
            }),
        ]);
    }
    t.write(out)?;
    if let Some(r) = &rule {
        writeln!(
            out,
            "lossy budget {} (first moments {}): {r}; per tensor the narrowest width (or the base) within it; ctx: codes context-coded",
            budget.map_or("-".into(), |b| b.to_string()),
            budget_m1.map_or("-".into(), |b| b.to_string())
        )?;
    }
    Ok(())
}
