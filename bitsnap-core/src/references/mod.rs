//! Finding tensors that are functions of other tensors of the same snapshot (issue #12,
//! finding 1), for the reference codecs ([`CodecId::Cast`], [`CodecId::Identical`]).
//!
//! * **identical**: a tensor bit-identical to an earlier tensor of the snapshot (same
//!   dtype and shape), found by content hash (xxh3), not by name (a tied embedding, a
//!   copy under another name). The earliest copy is coded as usual, the others reference
//!   it.
//! * **cast**: a bf16/f16 tensor paired with the f32 tensor of the same shape it is the
//!   round-to-nearest-even of, mostly (mixed-precision master weights). Pairs come from
//!   name conventions first ([`cast_sources`]), else from the f32 tensors of the same
//!   shape whose cast matches a sample of the half tensor.
//!
//! * **replay** ([`replay`]): an f32 weight or second moment one optimizer step after
//!   its base, predicted from the base and the new moments.
//!
//! A reference encoding replaces a tensor's encoding only when its payload is smaller,
//! and only references tensors that decode to exactly what was given (lossless codecs),
//! except that replay predicts from moments as they decode (dequantized if lossy).

pub mod replay;

use std::collections::HashMap;

use rayon::prelude::*;
use xxhash_rust::xxh3::xxh3_64;

use crate::codec::{CastOf, CodecId, Encoded};
use crate::format::{Decision, RefScope, Reference};
use crate::{DType, Tensor};

/// Header bytes a reference adds to an entry besides the referenced name (extension
/// record, count, scope, name length; FORMAT.md 2.7), rounded up.
const REFERENCE_RECORD_BYTES: usize = 16;
/// Elements sampled to pair a half tensor with an f32 tensor by shape alone.
const SAMPLE_ELEMS: usize = 256;
/// Fraction of the sample that must match for a pair found by shape alone.
const SAMPLE_MATCH: f64 = 0.9;

/// Names of the f32 tensors a half-precision tensor `name` is, by convention, the cast
/// of: `model.X` ↔ `optimizer.master.X`, `X` ↔ `X.master`, `X` ↔ `master.X`,
/// `X` ↔ `optimizer.master.X`, `model.X` ↔ `master.X`.
///
/// ```
/// use bitsnap_core::references::cast_sources;
/// assert_eq!(cast_sources("model.wte")[0], "optimizer.master.wte");
/// assert!(cast_sources("wte").contains(&"wte.master".to_string()));
/// ```
pub fn cast_sources(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(rest) = name.strip_prefix("model.") {
        out.push(format!("optimizer.master.{rest}"));
        out.push(format!("master.{rest}"));
    }
    out.push(format!("optimizer.master.{name}"));
    out.push(format!("{name}.master"));
    out.push(format!("master.{name}"));
    out
}

/// A rule from `bitsnap pack --derive`: tensor `half` is the cast of tensor `source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeriveRule {
    /// The half-precision tensor.
    pub half: String,
    /// The f32 tensor it is the cast of.
    pub source: String,
}

/// The `cast:` rules of a snapshot's [`replay::keys::DERIVE`] metadata.
pub fn cast_rules(metadata: &[(String, String)]) -> Vec<DeriveRule> {
    replay::derive_entries(metadata)
        .filter(|(kind, _, _)| *kind == "cast")
        .map(|(_, half, source)| DeriveRule {
            half: half.to_string(),
            source: source.to_string(),
        })
        .collect()
}

/// For each tensor, the reference encoding that beats its current one, if any: replaces
/// `encoded[i]` and returns the references of each tensor (empty where none). Casts and
/// copies first (`cast:` rules of the metadata's [`replay::keys::DERIVE`] pair tensors
/// before the name conventions and the shape search are tried), then optimizer replay
/// against `base` (the base snapshot's decoded tensors by name; empty for a full
/// snapshot) with the hyperparameters of `metadata` ([`replay::Hyper::from_metadata`]).
pub fn apply(
    tensors: &[Tensor],
    encoded: &mut [(Encoded, Decision)],
    base: &HashMap<&str, &Tensor>,
    metadata: &[(String, String)],
    level: i32,
) -> Vec<Vec<Reference>> {
    let rules = cast_rules(metadata);
    let mut refs = apply_casts(tensors, encoded, level, &rules);
    apply_replay(tensors, encoded, &mut refs, base, metadata, level);
    refs
}

/// Replaces the encodings that optimizer replay beats ([`replay`]).
fn apply_replay(
    tensors: &[Tensor],
    encoded: &mut [(Encoded, Decision)],
    refs: &mut [Vec<Reference>],
    base: &HashMap<&str, &Tensor>,
    metadata: &[(String, String)],
    level: i32,
) {
    if base.is_empty() {
        return;
    }
    let found = {
        let enc: &[(Encoded, Decision)] = encoded;
        let refs: &[Vec<Reference>] = refs;
        let decoded = |i: usize| -> &[u8] {
            enc[i]
                .0
                .lossy
                .as_ref()
                .map_or(tensors[i].data.as_slice(), |l| l.0.as_slice())
        };
        let current = |i: usize| enc[i].0.payload.len() as u64;
        let lossless = |i: usize| enc[i].0.lossy.is_none();
        let free = |i: usize| refs[i].is_empty();
        replay::find(
            tensors,
            base,
            metadata,
            &decoded,
            &current,
            &lossless,
            &free,
            REFERENCE_RECORD_BYTES as u64,
            level,
        )
    };
    for (i, enc, r, predictor) in found.replaced {
        tracing::debug!(tensor = %tensors[i].name, %predictor, bytes = enc.payload.len(), "optimizer replay");
        if let (Some((e, d)), Some(slot)) = (encoded.get_mut(i), refs.get_mut(i)) {
            d.candidates
                .insert(0, (CodecId::Replay, enc.payload.len() as u64));
            *e = enc;
            *slot = r;
        }
    }
}

/// Casts and copies ([`CodecId::Cast`], [`CodecId::Identical`]) that beat the current
/// encodings.
fn apply_casts(
    tensors: &[Tensor],
    encoded: &mut [(Encoded, Decision)],
    level: i32,
    rules: &[DeriveRule],
) -> Vec<Vec<Reference>> {
    let n = tensors.len();
    let mut refs: Vec<Vec<Reference>> = vec![Vec::new(); n];
    let lossless = |i: usize| encoded.get(i).is_some_and(|(e, _)| e.lossy.is_none());
    // Identical: the first lossless copy of each content.
    let hashes: Vec<u64> = tensors.par_iter().map(|t| xxh3_64(&t.data)).collect();
    let mut first: HashMap<(DType, &[u64], u64), usize> = HashMap::new();
    let mut target: Vec<Option<usize>> = vec![None; n];
    for (i, t) in tensors.iter().enumerate() {
        if t.data.is_empty() {
            continue;
        }
        let key = (t.dtype, t.shape.as_slice(), hashes[i]);
        match first.get(&key) {
            Some(&j) if tensors[j].data == t.data => target[i] = Some(j),
            Some(_) => {}
            None if lossless(i) => {
                first.insert(key, i);
            }
            None => {}
        }
    }
    let by_name: HashMap<&str, usize> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let f32_by_shape = |shape: &[u64]| -> Vec<usize> {
        tensors
            .iter()
            .enumerate()
            .filter(|(j, s)| s.dtype == DType::F32 && s.shape == shape && lossless(*j))
            .map(|(j, _)| j)
            .collect()
    };
    // Cast candidates (only where no identical copy was found).
    let cast_of: Vec<Option<usize>> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if target[i].is_some() || !crate::codec::cast::applies(t.dtype, DType::F32) {
                return None;
            }
            let fits = |j: usize| {
                tensors[j].dtype == DType::F32 && tensors[j].shape == t.shape && lossless(j)
            };
            let ruled = rules
                .iter()
                .filter(|r| r.half == t.name)
                .filter_map(|r| by_name.get(r.source.as_str()).copied());
            let named = cast_sources(&t.name)
                .into_iter()
                .filter_map(|s| by_name.get(s.as_str()).copied());
            if let Some(j) = ruled.chain(named).find(|&j| fits(j)) {
                return Some(j);
            }
            f32_by_shape(&t.shape)
                .into_iter()
                .map(|j| (j, sample_match(t, &tensors[j])))
                .filter(|&(_, m)| m >= SAMPLE_MATCH)
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(j, _)| j)
        })
        .collect();
    let cast = CastOf { level };
    let trials: Vec<Option<Encoded>> = (0..n)
        .into_par_iter()
        .map(|i| {
            if target[i].is_some() {
                return Some(Encoded {
                    codec: CodecId::Identical,
                    payload: Vec::new(),
                    lossy: None,
                });
            }
            let j = cast_of[i]?;
            let t = &tensors[i];
            cast.encode(t.dtype, &t.data, DType::F32, &tensors[j].data)
                .ok()
                .flatten()
        })
        .collect();
    for (i, trial) in trials.into_iter().enumerate() {
        let (Some(trial), Some((enc, decision))) = (trial, encoded.get_mut(i)) else {
            continue;
        };
        let Some(j) = target[i].or(cast_of[i]) else {
            continue;
        };
        let size = trial.payload.len() as u64;
        decision.candidates.insert(0, (trial.codec, size));
        // Lossy encodings stay: a reference is lossless and only replaces lossless ones.
        // The reference record costs header bytes: tiny tensors keep their payload.
        let record = (REFERENCE_RECORD_BYTES + tensors[j].name.len()) as u64;
        if enc.lossy.is_none() && size + record < enc.payload.len() as u64 {
            *enc = trial;
            refs[i].push(Reference {
                scope: RefScope::Snapshot,
                name: tensors[j].name.clone(),
            });
        }
    }
    refs
}

/// Fraction of up to [`SAMPLE_ELEMS`] evenly spaced elements of `half` that equal the
/// cast of `source`'s.
fn sample_match(half: &Tensor, source: &Tensor) -> f64 {
    let numel = half.data.len() / 2;
    if numel == 0 || source.data.len() != numel * 4 {
        return 0.0;
    }
    let step = (numel / SAMPLE_ELEMS).max(1);
    let idx: Vec<usize> = (0..numel).step_by(step).take(SAMPLE_ELEMS).collect();
    let hits = idx
        .iter()
        .filter(|&&i| {
            let s = &source.data[4 * i..4 * i + 4];
            let v = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            let want = match half.dtype {
                DType::F16 => half::f16::from_f32(v).to_bits(),
                _ => half::bf16::from_f32(v).to_bits(),
            };
            want == u16::from_le_bytes([half.data[2 * i], half.data[2 * i + 1]])
        })
        .count();
    hits as f64 / idx.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Policy, Role};

    fn f32_tensor(name: &str, vals: &[f32]) -> Tensor {
        Tensor::new(
            name,
            DType::F32,
            vec![vals.len() as u64],
            Role::Weight,
            vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
        .unwrap()
    }

    fn bf16_of(name: &str, vals: &[f32]) -> Tensor {
        Tensor::new(
            name,
            DType::BF16,
            vec![vals.len() as u64],
            Role::Weight,
            vals.iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        )
        .unwrap()
    }

    fn run(tensors: &[Tensor]) -> (Vec<(Encoded, Decision)>, Vec<Vec<Reference>>) {
        let p = Policy::default();
        let mut enc: Vec<_> = tensors
            .iter()
            .map(|t| p.encode_tensor(t, None).unwrap())
            .collect();
        let refs = apply(tensors, &mut enc, &HashMap::new(), &[], 1);
        (enc, refs)
    }

    #[test]
    fn finds_casts_by_name_and_by_shape_and_copies_by_hash() {
        let a: Vec<f32> = (0..5000).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..5000).map(|i| (i as f32 * 0.11).cos()).collect();
        let tensors = vec![
            f32_tensor("optimizer.master.w", &a),
            bf16_of("model.w", &a),
            f32_tensor("other_source", &b),
            bf16_of("unconventional", &b),
            bf16_of("tied_copy", &a),
        ];
        let (enc, refs) = run(&tensors);
        let codecs: Vec<CodecId> = enc.iter().map(|(e, _)| e.codec).collect();
        assert_eq!(
            codecs[1..],
            [
                CodecId::Cast,
                CodecId::Planes,
                CodecId::Cast,
                CodecId::Identical
            ]
        );
        let names: Vec<Option<&str>> = refs
            .iter()
            .map(|r| r.first().map(|r| r.name.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                None,
                Some("optimizer.master.w"),
                None,
                Some("other_source"),
                Some("model.w")
            ]
        );
        // An exact cast costs the 17-byte header.
        assert_eq!(enc[1].0.payload.len(), 17);
        assert_eq!(enc[1].1.candidates[0], (CodecId::Cast, 17));
    }

    #[test]
    fn tiny_copies_keep_their_payload() {
        // Two equal scalars: 4 bytes of payload are less than the reference record.
        let (enc, refs) = run(&[f32_tensor("lr.a", &[1e-3]), f32_tensor("lr.b", &[1e-3])]);
        assert!(refs.iter().all(Vec::is_empty));
        assert_eq!(enc[1].1.candidates[0], (CodecId::Identical, 0));
    }

    #[test]
    fn unrelated_tensors_of_the_same_shape_are_not_paired() {
        let a: Vec<f32> = (0..5000).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..5000).map(|i| (i as f32 * 0.11).cos()).collect();
        let (enc, refs) = run(&[f32_tensor("x", &a), bf16_of("y", &b)]);
        assert!(refs.iter().all(Vec::is_empty));
        assert_eq!(enc[1].0.codec, CodecId::Planes);
    }
}
