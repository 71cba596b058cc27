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

use std::collections::{HashMap, HashSet};

use rayon::prelude::*;
use xxhash_rust::xxh3::xxh3_64;

use crate::codec::{CastOf, CodecId, Encoded};
use crate::format::{Decision, RefScope, Reference};
use crate::policy::{Alternative, TrialSample};
use crate::{DType, Error, Policy, Tensor};

/// Header bytes a reference adds to an entry besides the referenced name (extension
/// record, count, scope, name length; FORMAT.md 2.7), rounded up.
pub(crate) const REFERENCE_RECORD_BYTES: usize = 16;
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

/// One tensor as a save encodes it: its encoding, how it was chosen, and the tensors its
/// payload references (FORMAT.md 2.7).
pub type EncodedTensor = (Encoded, Decision, Vec<Reference>);

/// What a save knows before it encodes: which tensors are bit-identical copies of an
/// earlier tensor ([`CodecId::Identical`] is tried on them once every tensor is
/// encoded, by [`apply`]), and which f32 tensor each half-precision tensor may be the
/// cast of ([`CodecId::Cast`], weighed beside the codecs as the tensor is encoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferencePlan {
    /// Per tensor: it has an earlier tensor of the same dtype, shape and bytes.
    pub twin: Vec<bool>,
    /// Per tensor: the f32 tensor it may be the cast of.
    pub cast_of: Vec<Option<usize>>,
}

impl ReferencePlan {
    /// Plans the references of `tensors` whose xxh3 are `hashes`: `cast:` rules of the
    /// metadata's [`replay::keys::DERIVE`] pair tensors first, then the name conventions
    /// ([`cast_sources`]), then the f32 tensors of the same shape whose cast matches a
    /// sample. Under a lossy `policy` an optimizer moment is no cast source (it may not
    /// decode to its input).
    pub fn new(
        policy: &Policy,
        tensors: &[Tensor],
        hashes: &[u64],
        metadata: &[(String, String)],
    ) -> ReferencePlan {
        let n = tensors.len();
        let mut first: HashMap<(DType, &[u64], u64), usize> = HashMap::new();
        let mut twin = vec![false; n];
        for (i, t) in tensors.iter().enumerate() {
            let Some(&h) = hashes.get(i) else { continue };
            if t.data.is_empty() {
                continue;
            }
            match first.get(&(t.dtype, t.shape.as_slice(), h)) {
                Some(&j) => twin[i] = tensors[j].data == t.data,
                None => {
                    first.insert((t.dtype, t.shape.as_slice(), h), i);
                }
            }
        }
        let lossy = policy.lossiness != crate::Lossiness::Lossless;
        let source_ok = |j: usize| {
            let s = &tensors[j];
            s.dtype == DType::F32 && !(lossy && s.role.is_moment())
        };
        let rules = cast_rules(metadata);
        let by_name: HashMap<&str, usize> = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        let cast_of = tensors
            .par_iter()
            .enumerate()
            .map(|(i, t)| {
                if twin[i] || !crate::codec::cast::applies(t.dtype, DType::F32) {
                    return None;
                }
                let fits = |j: usize| tensors[j].shape == t.shape && source_ok(j);
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
                (0..n)
                    .filter(|&j| fits(j))
                    .map(|j| (j, sample_match(t, &tensors[j])))
                    .filter(|&(_, m)| m >= SAMPLE_MATCH)
                    .max_by(|a, b| a.1.total_cmp(&b.1))
                    .map(|(j, _)| j)
            })
            .collect();
        ReferencePlan { twin, cast_of }
    }

    /// [`ReferencePlan::new`] with the hashes computed here, in parallel.
    pub fn of(policy: &Policy, tensors: &[Tensor], metadata: &[(String, String)]) -> ReferencePlan {
        let hashes: Vec<u64> = tensors.par_iter().map(|t| xxh3_64(&t.data)).collect();
        ReferencePlan::new(policy, tensors, &hashes, metadata)
    }

    /// A plan with no references (the references pass is not allowed).
    pub fn none(n: usize) -> ReferencePlan {
        ReferencePlan {
            twin: vec![false; n],
            cast_of: vec![None; n],
        }
    }
}

/// A cast of an f32 tensor of the snapshot as an [`Alternative`] to the policy's codecs.
struct CastAlternative<'a> {
    dtype: DType,
    half: &'a [u8],
    source: &'a [u8],
    level: i32,
    overhead: u64,
}

impl Alternative for CastAlternative<'_> {
    fn codec(&self) -> CodecId {
        CodecId::Cast
    }

    fn overhead(&self) -> u64 {
        self.overhead
    }

    fn trial(&self, sample: &TrialSample) -> Result<Option<Encoded>, crate::codec::CodecError> {
        let half = sample.gather(self.half);
        let source = sample.gather_scaled(self.source, 2);
        CastOf { level: self.level }.encode(self.dtype, &half, DType::F32, &source)
    }

    fn encode(&self) -> Result<Option<Encoded>, crate::codec::CodecError> {
        CastOf { level: self.level }.encode(self.dtype, self.half, DType::F32, self.source)
    }
}

/// Encodes one lone tensor `i` with `policy` against `base`, weighing the cast `plan`
/// names for it beside the codecs.
pub(crate) fn encode_one(
    policy: &Policy,
    plan: &ReferencePlan,
    tensors: &[Tensor],
    i: usize,
    base: Option<&Tensor>,
) -> Result<EncodedTensor, Error> {
    let t = &tensors[i];
    let source = plan.cast_of.get(i).copied().flatten();
    let alt = source.map(|j| CastAlternative {
        dtype: t.dtype,
        half: &t.data,
        source: &tensors[j].data,
        level: policy.zstd_level,
        overhead: (REFERENCE_RECORD_BYTES + tensors[j].name.len()) as u64,
    });
    let alts: Vec<&dyn Alternative> = alt.iter().map(|a| a as &dyn Alternative).collect();
    let (e, d, won) = policy.encode_tensor_with(t, base, &alts)?;
    let refs = match (won, source) {
        (Some(_), Some(j)) => vec![Reference {
            scope: RefScope::Snapshot,
            name: tensors[j].name.clone(),
        }],
        _ => Vec::new(),
    };
    Ok((e, d, refs))
}

/// Encodes the tensors of `tensors` at `indices` as a save does, on all rayon threads:
/// each weight whose moments are also in `indices`, with them, as one unit in which
/// optimizer replay against `base` (the base snapshot's decoded tensors by name; empty
/// for a full snapshot) is weighed beside the codecs ([`replay`], hyperparameters from
/// `metadata`); every other tensor alone, with the cast the [`ReferencePlan`] names for
/// it weighed beside the codecs. Returns each index with its encoding, in no particular
/// order. Copies of earlier tensors come after, from [`apply`].
pub fn encode_units(
    policy: &Policy,
    plan: &ReferencePlan,
    tensors: &[Tensor],
    indices: &[usize],
    base: &HashMap<&str, &Tensor>,
    metadata: &[(String, String)],
) -> Result<Vec<(usize, EncodedTensor)>, Error> {
    let ctx = replay::Context::new(metadata, policy.zstd_level);
    let units = units_of(policy, tensors, indices, base, metadata);
    let base_of = |i: usize| base.get(tensors[i].name.as_str()).copied();
    let done: Vec<Vec<(usize, EncodedTensor)>> = units
        .par_iter()
        .map(|&u| {
            let b = match u {
                replay::Unit::One(i) => [base_of(i), None, None],
                replay::Unit::Group { w, m, v } => [base_of(w), base_of(m), base_of(v)],
            };
            encode_unit(policy, &ctx, plan, tensors, u, b)
        })
        .collect::<Result<_, _>>()?;
    Ok(done.into_iter().flatten().collect())
}

/// The encode units of the tensors at `indices` (groups only where all three members
/// are among them, and only where `policy` admits replay).
pub(crate) fn units_of(
    policy: &Policy,
    tensors: &[Tensor],
    indices: &[usize],
    base: &HashMap<&str, &Tensor>,
    metadata: &[(String, String)],
) -> Vec<replay::Unit> {
    let replay_allowed = !policy.device_forms_only || CodecId::Replay.has_device_form();
    let wanted: HashSet<usize> = indices.iter().copied().collect();
    let no_base = HashMap::new();
    let groups_base = if replay_allowed { base } else { &no_base };
    replay::units(tensors, groups_base, metadata)
        .into_iter()
        .flat_map(|u| {
            let members = u.members();
            match members.iter().all(|i| wanted.contains(i)) {
                true => vec![u],
                false => members
                    .into_iter()
                    .filter(|i| wanted.contains(i))
                    .map(replay::Unit::One)
                    .collect(),
            }
        })
        .collect()
}

/// Encodes one unit: a lone tensor with [`encode_one`], a weight with its moments with
/// [`replay::encode_unit`]. `base`: the unit's base tensors (weight, first moment,
/// second moment; a lone tensor's first).
pub(crate) fn encode_unit(
    policy: &Policy,
    ctx: &replay::Context,
    plan: &ReferencePlan,
    tensors: &[Tensor],
    unit: replay::Unit,
    base: [Option<&Tensor>; 3],
) -> Result<Vec<(usize, EncodedTensor)>, Error> {
    match unit {
        replay::Unit::One(i) => Ok(vec![(i, encode_one(policy, plan, tensors, i, base[0])?)]),
        replay::Unit::Group { .. } => Ok(replay::encode_unit(
            policy,
            ctx,
            tensors,
            unit,
            base,
            REFERENCE_RECORD_BYTES as u64,
        )?
        .into_iter()
        .map(|(i, e, d, r)| (i, (e, d, r)))
        .collect()),
    }
}

/// Encodes a whole snapshot as an unstreamed save does: plans the references
/// ([`ReferencePlan`], none when `references` is false), encodes every unit
/// ([`encode_units`]), then replaces copies of earlier tensors ([`apply`]). Returns each
/// tensor's encoding and references, in order.
///
/// ```
/// use std::collections::HashMap;
/// use bitsnap_core::{DType, Policy, Role, Tensor, codec::CodecId, references};
/// let w: Vec<f32> = (0..5000).map(|i| (i as f32 * 0.37).sin()).collect();
/// let master = Tensor::from_f32("optimizer.master.w", &[5000], Role::Weight, &w).unwrap();
/// let half: Vec<u8> = w.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
/// let model = Tensor::new("model.w", DType::BF16, vec![5000], Role::Weight, half).unwrap();
/// let (enc, refs) = references::encode_snapshot(
///     &Policy::default(), &[master, model], &HashMap::new(), &[], true).unwrap();
/// assert_eq!(enc[1].0.codec, CodecId::Cast);
/// assert_eq!(refs[1][0].name, "optimizer.master.w");
/// ```
#[allow(clippy::type_complexity)]
pub fn encode_snapshot(
    policy: &Policy,
    tensors: &[Tensor],
    base: &HashMap<&str, &Tensor>,
    metadata: &[(String, String)],
    references: bool,
) -> Result<(Vec<(Encoded, Decision)>, Vec<Vec<Reference>>), Error> {
    let plan = match references {
        true => ReferencePlan::of(policy, tensors, metadata),
        false => ReferencePlan::none(tensors.len()),
    };
    let all: Vec<usize> = (0..tensors.len()).collect();
    let units = encode_units(policy, &plan, tensors, &all, base, metadata)?;
    let (mut encoded, mut refs) = in_order(tensors, units)?;
    if references {
        apply(tensors, &mut encoded, &mut refs, &|_| true);
    }
    Ok((encoded, refs))
}

/// `units` (index, encoding) in tensor order; every tensor must be there.
#[allow(clippy::type_complexity)]
pub fn in_order(
    tensors: &[Tensor],
    units: Vec<(usize, EncodedTensor)>,
) -> Result<(Vec<(Encoded, Decision)>, Vec<Vec<Reference>>), Error> {
    let mut slots: Vec<Option<EncodedTensor>> = (0..tensors.len()).map(|_| None).collect();
    for (i, e) in units {
        if let Some(s) = slots.get_mut(i) {
            *s = Some(e);
        }
    }
    let mut encoded = Vec::with_capacity(tensors.len());
    let mut refs = Vec::with_capacity(tensors.len());
    for (s, t) in slots.into_iter().zip(tensors) {
        let (e, d, r) = s.ok_or_else(|| Error::InvalidTensor {
            tensor: t.name.clone(),
            reason: "was not encoded".into(),
        })?;
        encoded.push((e, d));
        refs.push(r);
    }
    Ok((encoded, refs))
}

/// Replaces the encodings of the tensors that are bit-identical copies of an earlier
/// lossless tensor with [`CodecId::Identical`] references to it, where that is smaller
/// (header record included). `references` holds each tensor's references so far (casts,
/// optimizer replay): a tensor that references others or is referenced keeps its
/// encoding, and so does one `may_change` refuses (already written). Adds the new
/// references to `references`; returns which tensors changed.
pub fn apply(
    tensors: &[Tensor],
    encoded: &mut [(Encoded, Decision)],
    references: &mut [Vec<Reference>],
    may_change: &dyn Fn(usize) -> bool,
) -> Vec<bool> {
    let n = tensors.len();
    let by_name: HashMap<&str, usize> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let mut locked: Vec<bool> = (0..n)
        .map(|i| references.get(i).is_none_or(|r| !r.is_empty()) || !may_change(i))
        .collect();
    for r in references.iter().flatten() {
        if r.scope == RefScope::Snapshot
            && let Some(&j) = by_name.get(r.name.as_str())
        {
            locked[j] = true;
        }
    }
    let lossless: Vec<bool> = encoded.iter().map(|(e, _)| e.lossy.is_none()).collect();
    // The first lossless copy of each content.
    let hashes: Vec<u64> = tensors.par_iter().map(|t| xxh3_64(&t.data)).collect();
    let mut first: HashMap<(DType, &[u64], u64), usize> = HashMap::new();
    let mut changed = vec![false; n];
    for (i, t) in tensors.iter().enumerate() {
        if t.data.is_empty() {
            continue;
        }
        let key = (t.dtype, t.shape.as_slice(), hashes[i]);
        let target = match first.get(&key) {
            Some(&j) if tensors[j].data == t.data => j,
            Some(_) => continue,
            None => {
                if lossless.get(i).copied().unwrap_or(false) {
                    first.insert(key, i);
                }
                continue;
            }
        };
        let Some((enc, decision)) = encoded.get_mut(i) else {
            continue;
        };
        decision.candidates.insert(0, (CodecId::Identical, 0));
        // Lossy encodings stay: a reference is lossless and only replaces lossless ones.
        // The reference record costs header bytes: tiny tensors keep their payload.
        let record = (REFERENCE_RECORD_BYTES + tensors[target].name.len()) as u64;
        if !locked[i] && enc.lossy.is_none() && record < enc.payload.len() as u64 {
            *enc = Encoded {
                codec: CodecId::Identical,
                payload: Vec::new(),
                lossy: None,
            };
            references[i] = vec![Reference {
                scope: RefScope::Snapshot,
                name: tensors[target].name.clone(),
            }];
            changed[i] = true;
        }
    }
    changed
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
        encode_snapshot(&Policy::default(), tensors, &HashMap::new(), &[], true).unwrap()
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
