//! The adaptive policy: per tensor and per save, which codec stores it smallest.

use crate::codec::{
    self, BitmaskDelta, ClusterQuantizer, Codec, CodecId, EncodeInput, Encoded, IntDelta, Planes,
    QuantBits, Raw, XorDelta,
};
use crate::format::Decision;
use crate::{Error, Tensor};

mod budget;
mod trial;
pub use budget::{ErrorBudget, FIRST_MOMENT_FACTOR, Stage, StageRule, stage_keys};
pub use trial::{Alternative, TRIAL_EXACT_BYTES, TRIAL_WINDOW_BYTES, TRIAL_WINDOWS, TrialSample};

/// Under an error budget, tensors up to this size are trial-quantized whole; larger ones
/// on a sample of [`SAMPLE_WINDOWS`] windows of [`SAMPLE_WINDOW_BYTES`]. (Lossless
/// trials use [`TrialSample`].)
pub const EXACT_TRIAL_BYTES: usize = 2 << 20;
/// Windows sampled from a large tensor to estimate each candidate's size.
pub const SAMPLE_WINDOWS: usize = 8;
/// Bytes per sample window.
pub const SAMPLE_WINDOW_BYTES: usize = 128 << 10;

/// The bitmask delta is tried only on tensors where at most this fraction of the
/// elements changed: above it, it stores most elements behind a mask that barely
/// compresses, and the XOR and integer deltas win. Measured on the small Megatron
/// series (pair, 100-step series, fine-tune): skipping it above one half changed no
/// stored byte and made the adaptive encode 1.1–1.2x faster (it is the slowest trial).
pub const BITMASK_MAX_CHANGED: f64 = 0.5;

/// What may be lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lossiness {
    /// Every tensor restores bit for bit (the default).
    #[default]
    Lossless,
    /// Optimizer moments may be cluster-quantized at `bits` per element; everything else
    /// is lossless.
    LossyOptimizer {
        /// Bits per code.
        bits: QuantBits,
    },
    /// Optimizer moments may be stored lossily within a relative-L2 error budget per
    /// tensor: the policy picks the smallest of 2, 3, 4, 6, 8 and 16-bit codebooks, log
    /// domain or linear, and reuse of the base's (decoded) tensor when the moment moved
    /// less than the budget since then; everything else is lossless. The budget is
    /// scaled per save by the [`Stage`] rule, and first moments get a multiple of it
    /// ([`ErrorBudget::first_moment_factor`]).
    LossyOptimizerBudget {
        /// `‖x − x̂‖₂ / ‖x‖₂` allowed per moment tensor (before the stage rule), and the
        /// first moments' factor on it.
        max_error: ErrorBudget,
    },
}

/// The encoding policy of a [`Store`](crate::Store).
///
/// ```
/// use bitsnap_core::{Lossiness, Policy, codec::QuantBits};
/// let p = Policy::default().with_full_every(4).with_lossiness(Lossiness::LossyOptimizer { bits: QuantBits::B8 });
/// assert_eq!(p.full_every, 4);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Lossless (default) or lossy optimizer moments.
    pub lossiness: Lossiness,
    /// A full snapshot (no base) at least every this many saves, bounding restore chains
    /// to this many files. Default 8; 1 makes every snapshot full.
    pub full_every: u32,
    /// A delta snapshot is kept only if it is at least this fraction smaller than the same
    /// snapshot stored full (default 0.05); otherwise it is stored full, ending the chain.
    pub min_delta_gain: f64,
    /// zstd level for every codec (default 1).
    pub zstd_level: i32,
    /// Only codecs that bitsnap-burn's GPU loader expands on the device
    /// ([`CodecId::has_device_form`](crate::codec::CodecId::has_device_form)): a chain
    /// holding any other payload restores through the CPU decoder. Integer deltas, casts
    /// and copies of other tensors have device forms, so they stay admitted. Default
    /// false.
    pub device_forms_only: bool,
    /// The training stage of the save being encoded (default: unknown), which scales an
    /// error budget; see [`Policy::staged`].
    pub stage: Stage,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            lossiness: Lossiness::Lossless,
            full_every: 8,
            min_delta_gain: 0.05,
            zstd_level: codec::DEFAULT_ZSTD_LEVEL,
            device_forms_only: false,
            stage: Stage::default(),
        }
    }
}

impl Policy {
    /// Sets [`Policy::lossiness`].
    pub fn with_lossiness(mut self, lossiness: Lossiness) -> Self {
        self.lossiness = lossiness;
        self
    }

    /// Sets [`Policy::full_every`] (at least 1).
    pub fn with_full_every(mut self, n: u32) -> Self {
        self.full_every = n.max(1);
        self
    }

    /// Sets [`Policy::zstd_level`].
    pub fn with_zstd_level(mut self, level: i32) -> Self {
        self.zstd_level = level;
        self
    }

    /// Sets [`Policy::stage`].
    pub fn with_stage(mut self, stage: Stage) -> Self {
        self.stage = stage;
        self
    }

    /// This policy for one save: [`Policy::stage`] read from the save's metadata (the
    /// [`stage_keys`]), and, under an error budget, the metadata with the applied budgets
    /// and their reason appended ([`stage_keys::MAX_ERROR`], [`stage_keys::MAX_ERROR_M1`],
    /// [`stage_keys::BUDGET_RULE`]),
    /// so that `bitsnap inspect` can explain every choice. Other policies return the
    /// metadata as it is.
    ///
    /// ```
    /// use bitsnap_core::{ErrorBudget, Lossiness, Policy};
    /// let p = Policy::default().with_lossiness(Lossiness::LossyOptimizerBudget {
    ///     max_error: ErrorBudget::DEFAULT,
    /// });
    /// let meta = vec![("bitsnap.step".to_string(), "10".to_string()),
    ///                 ("bitsnap.warmup_steps".to_string(), "100".to_string())];
    /// let (p, meta) = p.staged(meta);
    /// assert_eq!(p.stage.step, Some(10));
    /// assert!(meta.iter().any(|(k, v)| k == "bitsnap.budget_rule" && v.contains("warm-up")));
    /// ```
    pub fn staged(&self, mut metadata: Vec<(String, String)>) -> (Policy, Vec<(String, String)>) {
        let stage = Stage::from_metadata(&metadata);
        let policy = self.with_stage(stage);
        if let Lossiness::LossyOptimizerBudget { max_error } = self.lossiness {
            let rule = stage.rule(max_error);
            metadata.retain(|(k, _)| {
                k != stage_keys::MAX_ERROR
                    && k != stage_keys::MAX_ERROR_M1
                    && k != stage_keys::BUDGET_RULE
            });
            metadata.push((stage_keys::MAX_ERROR.into(), format!("{}", rule.budget)));
            metadata.push((
                stage_keys::MAX_ERROR_M1.into(),
                format!("{}", rule.first_moment_budget),
            ));
            metadata.push((stage_keys::BUDGET_RULE.into(), rule.reason));
        }
        (policy, metadata)
    }

    /// Sets [`Policy::min_delta_gain`].
    pub fn with_min_delta_gain(mut self, gain: f64) -> Self {
        self.min_delta_gain = gain;
        self
    }

    /// Sets [`Policy::device_forms_only`].
    pub fn with_device_forms_only(mut self, only: bool) -> Self {
        self.device_forms_only = only;
        self
    }

    /// The lossless codecs tried on a tensor of `numel` elements, with or without a
    /// base (`changed` of its elements differ from the base's). The list is the one
    /// place a new lossless codec joins the trials.
    fn lossless(&self, with_base: bool, numel: usize, changed: Option<u64>) -> Vec<Box<dyn Codec>> {
        let l = self.zstd_level;
        let mut v: Vec<Box<dyn Codec>> = vec![Box::new(Planes { level: l })];
        if with_base {
            v.push(Box::new(XorDelta { level: l }));
            if !self.device_forms_only || CodecId::IntDelta.has_device_form() {
                v.push(Box::new(IntDelta { level: l }));
            }
            let sparse = changed.is_none_or(|c| (c as f64) <= BITMASK_MAX_CHANGED * numel as f64);
            if sparse {
                v.push(Box::new(BitmaskDelta { level: l }));
            }
            // The exponent-grouped integer delta (#12): host-decoded only.
            if !self.device_forms_only {
                v.push(Box::new(codec::GroupedDelta { level: l }));
            }
        }
        v
    }

    /// Encodes one tensor: compares it with `base` (the same tensor's decoded bytes in the
    /// base snapshot, if it has the same dtype and shape), estimates every allowed codec,
    /// encodes with the smallest, and records why. Never returns a payload larger than
    /// the raw bytes.
    pub fn encode_tensor(
        &self,
        t: &Tensor,
        base: Option<&Tensor>,
    ) -> Result<(Encoded, Decision), Error> {
        self.encode_tensor_with(t, base, &[])
            .map(|(enc, decision, _)| (enc, decision))
    }

    /// [`Policy::encode_tensor`] with `alternatives` weighed beside the codecs: each is
    /// tried on the same [`TrialSample`] (its [`Alternative::overhead`] counted), and only
    /// the winner encodes the whole tensor. Returns which alternative won, if one did.
    pub fn encode_tensor_with(
        &self,
        t: &Tensor,
        base: Option<&Tensor>,
        alternatives: &[&dyn Alternative],
    ) -> Result<(Encoded, Decision, Option<usize>), Error> {
        let base = base
            .filter(|b| b.dtype == t.dtype && b.shape == t.shape && b.data.len() == t.data.len());
        let w = t.dtype.size();
        let wrap = |e: codec::CodecError| Error::InvalidTensor {
            tensor: t.name.clone(),
            reason: format!("encoding failed: {e}"),
        };
        let input = EncodeInput {
            shape: &t.shape,
            dtype: t.dtype,
            role: t.role,
            data: &t.data,
            base: base.map(|b| b.data.as_slice()),
        };
        let mut decision = Decision::default();
        if let Some(b) = base {
            let changed = codec::bitmask::changed_count(&t.data, &b.data, w);
            decision.changed = Some(changed);
            if changed == 0 {
                decision.candidates.push((CodecId::Unchanged, 0));
                let enc = Encoded {
                    codec: CodecId::Unchanged,
                    payload: Vec::new(),
                    lossy: None,
                };
                return Ok((enc, decision, None));
            }
        }
        let raw_len = t.data.len() as u64;
        let candidates = self.lossless(base.is_some(), t.data.len() / w.max(1), decision.changed);
        let sample = TrialSample::of(t.data.len(), w);
        let data = sample.gather(&t.data);
        let base_sample = base.map(|b| sample.gather(&b.data));
        let sample_input = EncodeInput {
            data: &data,
            base: base_sample.as_deref(),
            ..input
        };
        // (estimated size, which candidate, its encoding when the trial was exact).
        let mut best: Option<(u64, Pick, Option<Encoded>)> = None;
        let mut consider = |est: u64, pick: Pick, enc: Encoded| {
            if best.as_ref().is_none_or(|b| est < b.0) {
                best = Some((est, pick, sample.is_exact().then_some(enc)));
            }
        };
        for (i, c) in candidates.iter().enumerate() {
            if let Some(enc) = c.encode(&sample_input).map_err(wrap)? {
                let est = sample.estimate(enc.payload.len());
                decision.candidates.push((c.id(), est));
                consider(est, Pick::Codec(i), enc);
            }
        }
        for (i, a) in alternatives.iter().enumerate() {
            if let Some(enc) = a.trial(&sample).map_err(wrap)? {
                let est = sample.estimate(enc.payload.len());
                // Listed first: the references they name are the first thing to explain.
                decision
                    .candidates
                    .insert(i.min(decision.candidates.len()), (a.codec(), est));
                consider(est.saturating_add(a.overhead()), Pick::Alternative(i), enc);
            }
        }
        decision.candidates.push((CodecId::Raw, raw_len));
        // Lossy: cluster-quantize optimizer moments when it beats the best lossless estimate.
        let lossy_moment = t.role.is_moment() && t.dtype.is_quantizable_float();
        if let Lossiness::LossyOptimizer { bits } = self.lossiness
            && lossy_moment
        {
            let numel = (t.data.len() / w) as u64;
            let est = (numel * bits.bits() as u64).div_ceil(8)
                + (1u64 << bits.bits()).min(numel) * w as u64;
            if best.as_ref().is_none_or(|b| est < b.0) {
                let q = ClusterQuantizer {
                    level: self.zstd_level,
                    ..ClusterQuantizer::new(bits)
                };
                if let Some(enc) = q.encode(&input).map_err(wrap)? {
                    decision
                        .candidates
                        .push((CodecId::Cluster, enc.payload.len() as u64));
                    if enc.payload.len() as u64 <= raw_len {
                        decision.error = enc.lossy.as_ref().map(|l| l.1);
                        return Ok((enc, decision, None));
                    }
                }
            }
        }
        if let Lossiness::LossyOptimizerBudget { max_error } = self.lossiness
            && lossy_moment
        {
            let rule = self.stage.rule(max_error);
            let limit = match t.role {
                crate::Role::OptimizerMoment(1) => rule.first_moment_budget,
                _ => rule.budget,
            };
            let lossless = best.as_ref().map_or(raw_len, |b| b.0.min(raw_len));
            if let Some(enc) = budget::encode_within(
                &input,
                base.map(|b| b.data.as_slice()),
                limit,
                lossless,
                self.zstd_level,
                &mut decision,
            )
            .map_err(wrap)?
            {
                return Ok((enc, decision, None));
            }
        }
        let refused = || wrap(codec::CodecError::new(0, "codec refused its own input"));
        let (enc, won) = match best {
            Some((_, Pick::Codec(_), Some(enc))) => (enc, None),
            Some((_, Pick::Alternative(i), Some(enc))) => (enc, Some(i)),
            Some((_, Pick::Codec(i), None)) => (
                candidates[i]
                    .encode(&input)
                    .map_err(wrap)?
                    .ok_or_else(refused)?,
                None,
            ),
            Some((_, Pick::Alternative(i), None)) => (
                alternatives[i]
                    .encode()
                    .map_err(wrap)?
                    .ok_or_else(refused)?,
                Some(i),
            ),
            None => (
                Raw.encode(&input)
                    .map_err(wrap)?
                    .ok_or_else(|| wrap(codec::CodecError::new(0, "raw codec failed")))?,
                None,
            ),
        };
        if enc.payload.len() as u64 >= raw_len && enc.codec != CodecId::Raw {
            return Ok((
                Encoded {
                    codec: CodecId::Raw,
                    payload: t.data.clone(),
                    lossy: None,
                },
                decision,
                None,
            ));
        }
        Ok((enc, decision, won))
    }
}

/// The candidate a trial picked.
#[derive(Debug, Clone, Copy)]
enum Pick {
    /// The policy's codec at this index.
    Codec(usize),
    /// The caller's alternative at this index.
    Alternative(usize),
}

/// What [`Policy::judge_delta`] decided about a snapshot encoded against a base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaVerdict {
    /// Keep it as a delta.
    Keep,
    /// No tensor used a delta codec: the snapshot is already full (store it without base).
    NoGain,
    /// The delta is less than [`Policy::min_delta_gain`] smaller than the same tensors
    /// stored full: re-encode them without a base, ending the chain.
    WouldNotPay,
}

impl DeltaVerdict {
    /// Why the snapshot is full, if it is.
    pub fn full_reason(self) -> Option<&'static str> {
        match self {
            DeltaVerdict::Keep => None,
            DeltaVerdict::NoGain => Some("no tensor gained from a delta"),
            DeltaVerdict::WouldNotPay => Some("delta would not pay"),
        }
    }
}

impl Policy {
    /// Judges a snapshot whose tensors were encoded against a base: compares the bytes
    /// of its delta-coded tensors with their best full (base-free) candidates.
    pub fn judge_delta(&self, encoded: &[(Encoded, Decision)]) -> DeltaVerdict {
        let deltas = || encoded.iter().filter(|(e, _)| e.codec.needs_base());
        if deltas().next().is_none() {
            return DeltaVerdict::NoGain;
        }
        let delta: u64 = deltas().map(|(e, _)| e.payload.len() as u64).sum();
        let as_full: u64 = deltas()
            .map(|(_, d)| {
                d.candidates
                    .iter()
                    .filter(|(c, _)| !c.needs_base())
                    .map(|c| c.1)
                    .min()
                    .unwrap_or(u64::MAX)
            })
            .fold(0u64, u64::saturating_add);
        if (delta as f64) >= (1.0 - self.min_delta_gain) * as_full as f64 {
            DeltaVerdict::WouldNotPay
        } else {
            DeltaVerdict::Keep
        }
    }
}

/// [`SAMPLE_WINDOWS`] evenly spaced windows of `data` (and the same windows of `base`),
/// concatenated, aligned to whole elements of `w` bytes, and to whole rows when `shape`'s
/// last dimension divides the tensor (so a sample keeps the rows and columns that
/// context-coded codes model; a window is then at least one row).
fn sample(data: &[u8], base: Option<&[u8]>, w: usize, shape: &[u64]) -> (Vec<u8>, Option<Vec<u8>>) {
    let row = match shape {
        [_, .., last] => usize::try_from(*last).unwrap_or(0).saturating_mul(w),
        _ => 0,
    };
    let unit = if row > 0 && data.len().is_multiple_of(row) {
        row
    } else {
        w
    };
    let win = (SAMPLE_WINDOW_BYTES / unit).max(1) * unit;
    let n_windows = SAMPLE_WINDOWS.min(data.len() / win).max(1);
    let stride = ((data.len() - win.min(data.len())) / n_windows.max(1) / unit) * unit;
    let ranges: Vec<_> = (0..n_windows)
        .map(|i| i * stride..(i * stride + win).min(data.len()))
        .collect();
    let cat = |src: &[u8]| {
        ranges
            .iter()
            .flat_map(|r| src[r.clone()].iter().copied())
            .collect::<Vec<u8>>()
    };
    (cat(data), base.map(cat))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::testing::{mutate, tensor_bytes};
    use crate::{DType, Role};

    fn tensor(name: &str, dtype: DType, data: Vec<u8>, role: Role) -> Tensor {
        let n = (data.len() / dtype.size()) as u64;
        Tensor::new(name, dtype, vec![n], role, data).unwrap()
    }

    #[test]
    fn picks_unchanged_bitmask_xor_and_planes_where_each_wins() {
        let p = Policy::default();
        let base_bytes: Vec<u8> = (0..1_000_000u32)
            .flat_map(|i| ((i as f32).sin() * 0.02).to_le_bytes())
            .collect();
        let base = tensor("w", DType::F32, base_bytes.clone(), Role::Weight);
        let (enc, d) = p.encode_tensor(&base, Some(&base)).unwrap();
        assert_eq!((enc.codec, d.changed), (CodecId::Unchanged, Some(0)));
        let sparse = tensor("w", DType::F32, mutate(&base_bytes, 4, 1, 1), Role::Weight);
        assert_eq!(
            p.encode_tensor(&sparse, Some(&base)).unwrap().0.codec,
            CodecId::BitmaskDelta
        );
        let dense_bytes: Vec<u8> = (0..1_000_000u32)
            .flat_map(|i| ((i as f32).sin() * 0.02 + 1e-6).to_le_bytes())
            .collect();
        let dense = tensor("w", DType::F32, dense_bytes, Role::Weight);
        // Every element moved by a few ulps: the integer difference beats XOR.
        let (enc, d) = p.encode_tensor(&dense, Some(&base)).unwrap();
        assert_eq!(enc.codec, CodecId::IntDelta);
        let size = |c| d.candidates.iter().find(|x| x.0 == c).map(|x| x.1).unwrap();
        assert!(size(CodecId::IntDelta) < size(CodecId::XorDelta));
        assert_eq!(
            p.encode_tensor(&dense, None).unwrap().0.codec,
            CodecId::Planes
        );
        // For the GPU loader: the integer difference has a device form, so it stays.
        let device = p.with_device_forms_only(true);
        let (enc, d) = device.encode_tensor(&dense, Some(&base)).unwrap();
        assert_eq!(enc.codec, CodecId::IntDelta);
        assert!(d.candidates.iter().all(|c| c.0.has_device_form()));
    }

    /// An alternative that stores the tensor as a constant when it is one, counting its
    /// calls.
    struct Constant<'a> {
        data: &'a [u8],
        trials: std::sync::atomic::AtomicUsize,
        encodes: std::sync::atomic::AtomicUsize,
    }

    impl Alternative for Constant<'_> {
        fn codec(&self) -> CodecId {
            CodecId::Raw
        }
        fn overhead(&self) -> u64 {
            3
        }
        fn trial(&self, sample: &TrialSample) -> Result<Option<Encoded>, codec::CodecError> {
            use std::sync::atomic::Ordering::Relaxed;
            self.trials.fetch_add(1, Relaxed);
            let s = sample.gather(self.data);
            Ok(s.iter().all(|&b| b == s[0]).then(|| Encoded {
                codec: CodecId::Raw,
                payload: vec![s[0]],
                lossy: None,
            }))
        }
        fn encode(&self) -> Result<Option<Encoded>, codec::CodecError> {
            use std::sync::atomic::Ordering::Relaxed;
            self.encodes.fetch_add(1, Relaxed);
            Ok(Some(Encoded {
                codec: CodecId::Raw,
                payload: vec![self.data[0]],
                lossy: None,
            }))
        }
    }

    #[test]
    fn an_alternative_is_tried_on_the_sample_and_encodes_whole_only_when_it_wins() {
        use std::sync::atomic::Ordering::Relaxed;
        let p = Policy::default();
        for (n, exact) in [(1000usize, true), (1 << 20, false)] {
            let t = tensor("c", DType::F32, vec![9u8; 4 * n], Role::Weight);
            let alt = Constant {
                data: &t.data,
                trials: 0.into(),
                encodes: 0.into(),
            };
            let (enc, d, won) = p.encode_tensor_with(&t, None, &[&alt]).unwrap();
            assert_eq!((won, enc.payload.as_slice()), (Some(0), &[9u8][..]));
            assert_eq!(d.candidates[0].0, CodecId::Raw, "alternatives listed first");
            // An exact trial is the payload: no second encode.
            assert_eq!(alt.trials.load(Relaxed), 1);
            assert_eq!(alt.encodes.load(Relaxed), usize::from(!exact));
        }
        // A losing alternative never encodes the whole tensor.
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i as f32).to_le_bytes())
            .collect();
        let t = tensor("x", DType::F32, data, Role::Weight);
        let alt = Constant {
            data: &t.data,
            trials: 0.into(),
            encodes: 0.into(),
        };
        let (enc, _, won) = p.encode_tensor_with(&t, None, &[&alt]).unwrap();
        assert_eq!((won, enc.codec), (None, CodecId::Planes));
        assert_eq!(alt.encodes.load(Relaxed), 0);
    }

    #[test]
    fn never_larger_than_raw() {
        let p = Policy::default();
        for n in [0usize, 1, 7, 5000] {
            let t = tensor(
                "r",
                DType::U8,
                tensor_bytes(DType::U64, n, 3)[..n].to_vec(),
                Role::Other,
            );
            let (enc, _) = p.encode_tensor(&t, None).unwrap();
            assert!(
                enc.payload.len() <= t.data.len(),
                "{} > {}",
                enc.payload.len(),
                t.data.len()
            );
        }
    }

    #[test]
    fn quantizes_only_moments_and_only_when_lossy() {
        let v: Vec<u8> = (0..50_000u64)
            .flat_map(|i| {
                (1e-8 * (((i * 2_654_435_761) % 1_000_003) as f32 * 1e-5).exp()).to_le_bytes()
            })
            .collect();
        let lossy = Policy::default().with_lossiness(Lossiness::LossyOptimizer {
            bits: QuantBits::B8,
        });
        let m2 = tensor("m", DType::F32, v.clone(), Role::OptimizerMoment(2));
        let (enc, d) = lossy.encode_tensor(&m2, None).unwrap();
        assert_eq!(enc.codec, CodecId::Cluster);
        assert!(d.error.is_some());
        let w = tensor("w", DType::F32, v.clone(), Role::Weight);
        assert_ne!(
            lossy.encode_tensor(&w, None).unwrap().0.codec,
            CodecId::Cluster
        );
        assert_ne!(
            Policy::default().encode_tensor(&m2, None).unwrap().0.codec,
            CodecId::Cluster
        );
    }
}
