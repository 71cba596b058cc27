//! The error-budget path of the lossy policy: per moment tensor and per save, the
//! cheapest encoding whose relative L2 error stays within a budget, the budget scaled by
//! the training stage.
//!
//! # The choice
//!
//! 1. **Reuse the base.** When the tensor is compared with a base (the same tensor as the
//!    base snapshot decodes it) and `‖x − base‖₂ / ‖x‖₂` is within the budget, it is stored
//!    as [`CodecId::Unchanged`]: zero bytes, restoring the base's values. This is the
//!    residual against the dequantized base at zero bits; since every save measures
//!    against what the base restores, the error never accumulates past the budget.
//! 2. **Cluster codebooks**, narrowest first: 2, 3, 4, 6, 8 and 16 bits, each clustered
//!    linearly and in the log domain (log only for tensors without negative values), and,
//!    against a base, as **residuals** of the dequantized base ([`ResidualQuantizer`]):
//!    the ratio `x / base` clustered by its logarithm (non-negative tensors: second
//!    moments) and, for tensors holding negative values (first moments), the difference
//!    `x − base` clustered linearly (never for non-negative ones: base + delta can fall
//!    below zero, a second moment below zero makes `√v` NaN). The first width at which
//!    some candidate meets the budget wins, the smallest payload of its candidates
//!    (every payload stores its codes planes + zstd or context-coded, whichever is
//!    smaller, see `codec/cluster/context.rs`). Going on to wider widths while they
//!    shrink was tried (session 7): with context coding a 4-bit linear codebook of a
//!    second moment often beats a 3-bit ratio residual (JAX series delta: second
//!    moments 1.95 → 1.31 bits per element), but a linear codebook leaves small
//!    elements of `v` far off in ratio, and the fidelity smoke test's gap from its later
//!    resume point went from 0.47 to 1.16 of the noise with one such tensor: dropped.
//!    That candidate is then tried with fewer codebook entries than its width holds (a
//!    binary search between the narrower width's `2^b + 1` and `2^bits − 1`): the codes
//!    keep their width, but a skewed code distribution is what entropy coding shrinks,
//!    so the fewest entries that still meet the budget usually give the smallest
//!    payload (kept only if smaller; a width "between" 3 and 4 bits, say).
//!    Tensors over [`super::EXACT_TRIAL_BYTES`] are tried on the policy's sample windows
//!    (of the tensor and its base; whole rows, so that the contexts see rows and
//!    columns) and the winner is then encoded whole and checked again (a failure moves
//!    on to the next width).
//! 3. **Uniform codebooks, entropy-coded** ([`UniformQuantizer`], ECSQ), for signed
//!    tensors (first moments): the widest uniform cells whose means keep the tensor
//!    within the budget, at 2, 4 and 8 bits per code (byte-aligned: zstd's Huffman coding
//!    sees whole codes when they are not context-coded), replace the k-means winner
//!    where their payload is smaller. A k-means codebook uses its entries about equally,
//!    so its codes entropy-code little; uniform cells leave most elements in the few
//!    cells near zero. A tensor tried on sample windows in step 2 tries the three widths
//!    on them too, and encodes them whole in that order (within the budget there first,
//!    then by bytes) until one meets the budget on the whole tensor. Not for second
//!    moments: there the cell next to zero holds most elements at its mean, and every
//!    element below that mean drives a larger step (`m / √v`) than its own `v` would
//!    (measured: the fidelity smoke test's resumed gaps went from 0.57x to 1.31x the
//!    noise with them). Nor over the difference to the base (a delta residual, tried):
//!    most elements then keep the base's stale value, and the smoke test's gaps grew
//!    (budget 0.03: 1.8e-4 to 1.8e-3) for 3% more moment bytes saved on the Megatron
//!    pair.
//! 4. The result is kept only if it is smaller than the best lossless candidate;
//!    otherwise the tensor is stored losslessly.
//!
//! # The stage rule ([`Stage::rule`])
//!
//! A moment's error perturbs each parameter update in proportion to the learning rate
//! (Adam's step is `lr · m / √v`), so the budget is scaled to keep that perturbation at
//! most what the base budget allows at the peak learning rate:
//!
//! - during warm-up (`step ≤ warmup_steps`) the budget is halved ([`WARMUP_FACTOR`]):
//!   the moments are young (few steps averaged) and the run is most sensitive;
//! - right after it (`step ≤ SETTLE_FACTOR × warmup_steps`), when the learning rate has
//!   just reached its peak, the budget stays halved: the lr change is the largest of the
//!   run and the moments still carry the warm-up's large early gradients;
//! - right after any other learning-rate change: when the lr of the save and the lr of
//!   its base snapshot ([`stage_keys::BASE_LR`], which the store copies from the base's
//!   [`stage_keys::LR`]) differ by [`LR_CHANGE_RATIO`] or more either way, the budget is
//!   halved ([`LR_CHANGE_FACTOR`]) and the late relaxation below does not apply: a new
//!   phase (a fine-tune that freezes layers and starts a fresh optimizer at a tenth of
//!   the pretraining lr) has young moments, and `peak / lr` would otherwise loosen the
//!   budget fourfold exactly there;
//! - after it, the budget is multiplied by `peak_lr / lr`, at most [`MAX_LATE_FACTOR`]:
//!   late in a decayed schedule an error moves the weights less;
//! - without signals the base budget applies. The result is capped at [`MAX_BUDGET`].
//!
//! That is the budget of a second moment (and of any moment that is not a first one).
//! A **first moment** gets [`ErrorBudget::first_moment_factor`] times it (default
//! [`FIRST_MOMENT_FACTOR`], at most 1), because Adam forgets an error in it much
//! sooner: after a resume, the error in `m` shrinks by `β₁` per step (Burn's and
//! PyTorch's default 0.9: to 12% in 20 steps), while one in `v` shrinks by `β₂` (0.999:
//! it lasts ~1000 steps, entering the step as `√v`). Measured on the CPU fidelity
//! benchmark (README "Fidelity", base budget 0.12, resumed at steps 100, 300 and 500,
//! ≥ 500 steps each): factors 1, 2, 3 and 4 kept every resumed run within 0.21, 0.18,
//! 0.16 and 0.12 of the run-to-run noise (moments 15.1x, 19.5x, 22.9x, 27.7x), and 6
//! (measured with uniform codebooks on second moments too) within 0.15; but the
//! fidelity smoke test, 20 steps after a resume, ended at 0.61 of its noise with 2 and
//! 1.17 with 3: the default is 2. The cap [`MAX_BUDGET`] applies to the second
//! moments' budget, so a first moment's is at most `factor × MAX_BUDGET`.
//!
//! The signals are snapshot metadata keys ([`stage_keys`]) a saver sets; the applied
//! budgets (second and first moments) and the reason are written back as metadata,
//! shown by `bitsnap inspect`.

use std::fmt;

use super::{EXACT_TRIAL_BYTES, sample};
use crate::codec::cluster::Samples;
use crate::codec::{
    ClusterMode, ClusterQuantizer, CodecError, CodecId, EncodeInput, Encoded, QuantBits,
    ResidualKind, ResidualQuantizer, UniformQuantizer, cluster,
};
use crate::format::Decision;

/// A relative-L2 error allowed per moment tensor: the base budget `rel_l2`, finite, in
/// `(0, 1]`, which second moments get (scaled by the [`Stage`] rule), and a factor on it
/// for first moments ([`ErrorBudget::first_moment_factor`], default
/// [`FIRST_MOMENT_FACTOR`]; see the module documentation for why first moments may take
/// a looser budget).
///
/// ```
/// use bitsnap_core::ErrorBudget;
/// assert_eq!(ErrorBudget::new(0.03).unwrap().rel_l2(), 0.03);
/// assert_eq!(ErrorBudget::DEFAULT.rel_l2(), 0.12);
/// assert!(ErrorBudget::new(0.0).is_none() && ErrorBudget::new(f64::NAN).is_none());
/// // First moments: a factor on the base budget (the result is at most 1).
/// let b = ErrorBudget::new(0.1).unwrap().with_first_moment_factor(4.0).unwrap();
/// assert_eq!((b.rel_l2(), b.first_moment_factor()), (0.1, 4.0));
/// assert!(ErrorBudget::DEFAULT.with_first_moment_factor(0.0).is_none());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ErrorBudget {
    rel_l2: f64,
    first_moment_factor: f64,
}

// NaN is refused by the constructors, so equality is reflexive.
impl Eq for ErrorBudget {}

impl ErrorBudget {
    /// The default budget: 12% relative L2 for second moments, picked from the fidelity
    /// benchmark (`examples/src/fidelity`, README "Fidelity"): a GPT trained 1000 steps
    /// on the CPU and resumed at steps 100, 300 and 500 from moments saved within 0.03,
    /// 0.06, 0.12 and 0.24 ended within 0.25x of the run-to-run noise at every budget (at
    /// 0.12 the worst gap 2.2e-3, noise 8.8e-3), moments stored 7.2x (0.03), 12.9x (0.12)
    /// and 15.4x (0.24) smaller: the default is half the largest budget measured safe.
    /// First moments get [`FIRST_MOMENT_FACTOR`] times it (then moments 19.5x, worst
    /// gap 1.6e-3, 0.18 of the noise).
    pub const DEFAULT: ErrorBudget = ErrorBudget {
        rel_l2: 0.12,
        first_moment_factor: FIRST_MOMENT_FACTOR,
    };

    /// A budget of `rel_l2` (first moments [`FIRST_MOMENT_FACTOR`] times it), if it is
    /// finite and in `(0, 1]`.
    pub fn new(rel_l2: f64) -> Option<ErrorBudget> {
        (rel_l2.is_finite() && rel_l2 > 0.0 && rel_l2 <= 1.0).then_some(ErrorBudget {
            rel_l2,
            first_moment_factor: FIRST_MOMENT_FACTOR,
        })
    }

    /// This budget with first moments allowed `factor` times the base budget (after the
    /// stage rule, the result capped at 1), if `factor` is finite and in `(0, 100]`.
    /// 1 treats both moments alike.
    pub fn with_first_moment_factor(self, factor: f64) -> Option<ErrorBudget> {
        (factor.is_finite() && factor > 0.0 && factor <= 100.0).then_some(ErrorBudget {
            first_moment_factor: factor,
            ..self
        })
    }

    /// The allowed `‖x − x̂‖₂ / ‖x‖₂` of a second moment (and of any moment tensor that
    /// is not a first moment), before the stage rule.
    pub fn rel_l2(self) -> f64 {
        self.rel_l2
    }

    /// First moments are allowed this many times [`ErrorBudget::rel_l2`] (default
    /// [`FIRST_MOMENT_FACTOR`]).
    pub fn first_moment_factor(self) -> f64 {
        self.first_moment_factor
    }
}

impl Default for ErrorBudget {
    fn default() -> Self {
        ErrorBudget::DEFAULT
    }
}

/// `0.12`, or `0.12 (first moments x3)` when the factor is not 1.
impl fmt::Display for ErrorBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.rel_l2)?;
        if self.first_moment_factor != 1.0 {
            write!(f, " (first moments x{})", self.first_moment_factor)?;
        }
        Ok(())
    }
}

/// Snapshot metadata keys of the stage signals (set by a saver) and of the applied
/// budget (written by [`super::Policy::staged`]). Values are decimal numbers.
pub mod stage_keys {
    /// Input: the optimizer step of the save (`u64`).
    pub const STEP: &str = "bitsnap.step";
    /// Input: the learning rate at that step (`f64`).
    pub const LR: &str = "bitsnap.lr";
    /// Input: the schedule's peak learning rate (`f64`).
    pub const PEAK_LR: &str = "bitsnap.peak_lr";
    /// Input: the number of warm-up steps (`u64`).
    pub const WARMUP_STEPS: &str = "bitsnap.warmup_steps";
    /// Input: the learning rate of the base snapshot's save (`f64`), copied by the
    /// store from the base's [`LR`] under an error budget.
    pub const BASE_LR: &str = "bitsnap.base_lr";
    /// Output: the relative-L2 budget applied to each second moment (and any moment that
    /// is not a first moment) of the save.
    pub const MAX_ERROR: &str = "bitsnap.max_error";
    /// Output: the relative-L2 budget applied to each first moment of the save.
    pub const MAX_ERROR_M1: &str = "bitsnap.max_error_m1";
    /// Output: why that budget (the stage rule's reason).
    pub const BUDGET_RULE: &str = "bitsnap.budget_rule";
}

/// Budget factor during warm-up and right after it.
pub const WARMUP_FACTOR: f64 = 0.5;
/// "Right after warm-up" lasts until `SETTLE_FACTOR × warmup_steps`.
pub const SETTLE_FACTOR: u64 = 2;
/// The learning rate changed "much" since the base snapshot when the larger of the two
/// lrs is at least this many times the smaller.
pub const LR_CHANGE_RATIO: f64 = 2.0;
/// Budget factor right after such a change.
pub const LR_CHANGE_FACTOR: f64 = 0.5;
/// Largest budget factor late in training (`peak_lr / lr` is capped at this).
pub const MAX_LATE_FACTOR: f64 = 4.0;
/// Largest budget the stage rule produces (for second moments; a first moment's is
/// [`ErrorBudget::first_moment_factor`] times it, at most 1).
pub const MAX_BUDGET: f64 = 0.25;
/// The default [`ErrorBudget::first_moment_factor`]: first moments are allowed this many
/// times the second moments' budget (see the module documentation for the measurements
/// behind 2).
pub const FIRST_MOMENT_FACTOR: f64 = 2.0;

/// The training stage of one save, as far as the saver told it (every field optional).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Stage {
    /// Optimizer step.
    pub step: Option<u64>,
    /// Learning rate at that step.
    pub lr: Option<f64>,
    /// Peak learning rate of the schedule.
    pub peak_lr: Option<f64>,
    /// Warm-up steps.
    pub warmup_steps: Option<u64>,
    /// Learning rate of the base snapshot's save.
    pub base_lr: Option<f64>,
}

/// The budget a [`Stage`] gives a save, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct StageRule {
    /// Relative L2 allowed per second moment (and any moment that is not a first one).
    pub budget: f64,
    /// Relative L2 allowed per first moment: `budget` times the
    /// [`ErrorBudget::first_moment_factor`], at most 1.
    pub first_moment_budget: f64,
    /// One line for people: the base budget, the factor and the signal behind it.
    pub reason: String,
}

impl Stage {
    /// The stage read from [`stage_keys`] in `metadata`; missing, unparsable or
    /// non-finite values are left unknown.
    pub fn from_metadata(metadata: &[(String, String)]) -> Stage {
        let get = |key: &str| {
            metadata
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.trim())
        };
        let float = |key: &str| {
            get(key)
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v >= 0.0)
        };
        let int = |key: &str| get(key).and_then(|v| v.parse::<u64>().ok());
        Stage {
            step: int(stage_keys::STEP),
            lr: float(stage_keys::LR),
            peak_lr: float(stage_keys::PEAK_LR),
            warmup_steps: int(stage_keys::WARMUP_STEPS),
            base_lr: float(stage_keys::BASE_LR),
        }
    }

    /// How many times larger the larger of this save's lr and its base's is than the
    /// smaller, if both are known (infinite when exactly one is 0, 1 when both are).
    pub fn lr_change(&self) -> Option<f64> {
        let (lr, base) = (self.lr?, self.base_lr?);
        let (lo, hi) = (lr.min(base), lr.max(base));
        Some(match (lo, hi) {
            (_, 0.0) => 1.0,
            (0.0, _) => f64::INFINITY,
            _ => hi / lo,
        })
    }

    /// The documented rule (see the module documentation): the budget for this stage
    /// from the base budget `base`.
    ///
    /// ```
    /// use bitsnap_core::{ErrorBudget, Stage};
    /// let base = ErrorBudget::new(0.04).unwrap();
    /// let warm = Stage { step: Some(5), warmup_steps: Some(100), ..Stage::default() };
    /// assert_eq!(warm.rule(base).budget, 0.02);
    /// let late = Stage { step: Some(900), warmup_steps: Some(100), lr: Some(1e-4), peak_lr: Some(2e-4), base_lr: None };
    /// assert_eq!(late.rule(base).budget, 0.08);
    /// // A new phase at a tenth of the lr: halved, not relaxed.
    /// let phase = Stage { base_lr: Some(1e-3), ..late };
    /// assert_eq!(phase.rule(base).budget, 0.02);
    /// assert_eq!(Stage::default().rule(base).budget, 0.04);
    /// ```
    pub fn rule(&self, base: ErrorBudget) -> StageRule {
        let b = base.rel_l2();
        let (factor, why) = match (self.step, self.warmup_steps, self.lr, self.peak_lr) {
            (Some(s), Some(w), _, _) if s <= w => (
                WARMUP_FACTOR,
                format!("warm-up (step {s} <= {w}): x{WARMUP_FACTOR}"),
            ),
            (Some(s), Some(w), _, _) if s <= w.saturating_mul(SETTLE_FACTOR) => (
                WARMUP_FACTOR,
                format!("just after warm-up (step {s} <= {SETTLE_FACTOR}x{w}): x{WARMUP_FACTOR}"),
            ),
            _ if self.lr_change().is_some_and(|c| c >= LR_CHANGE_RATIO) => {
                let (lr, base_lr) = (self.lr.unwrap_or(0.0), self.base_lr.unwrap_or(0.0));
                (
                    LR_CHANGE_FACTOR,
                    format!(
                        "lr changed since the base ({base_lr:e} -> {lr:e}, >= x{LR_CHANGE_RATIO}): x{LR_CHANGE_FACTOR}"
                    ),
                )
            }
            (_, _, Some(lr), Some(peak)) if lr > 0.0 && lr < peak => {
                let f = (peak / lr).min(MAX_LATE_FACTOR);
                (f, format!("lr {lr:e} below peak {peak:e}: x{f:.3}"))
            }
            (_, _, Some(0.0), Some(_)) => (MAX_LATE_FACTOR, format!("lr 0: x{MAX_LATE_FACTOR}")),
            (_, _, Some(_), Some(_)) => (1.0, "lr at or above its peak: x1".to_string()),
            _ => (1.0, "no stage signal: x1".to_string()),
        };
        let budget = (b * factor).min(MAX_BUDGET);
        let capped = if budget < b * factor {
            format!(", capped at {MAX_BUDGET}")
        } else {
            String::new()
        };
        let f = base.first_moment_factor();
        // Six significant digits: `0.06 × 3` is stored and shown as 0.18.
        let first_moment_budget = round_significant((budget * f).min(1.0));
        StageRule {
            budget,
            first_moment_budget,
            reason: format!("base {b} {why}{capped}; first moments x{f}: {first_moment_budget}"),
        }
    }
}

/// `x` to six significant digits.
fn round_significant(x: f64) -> f64 {
    format!("{x:.5e}").parse().unwrap_or(x)
}

impl super::Policy {
    /// Whether [`Policy::with_base_lr`](super::Policy::with_base_lr) reads anything: only
    /// an error budget has a stage rule.
    pub fn wants_base_lr(&self) -> bool {
        matches!(
            self.lossiness,
            super::Lossiness::LossyOptimizerBudget { .. }
        )
    }

    /// A save's `metadata` with [`stage_keys::BASE_LR`] set to the [`stage_keys::LR`] of
    /// its base snapshot's metadata `base` (any earlier value replaced), under an error
    /// budget; other policies, or a base without an lr, leave it as it is.
    ///
    /// ```
    /// use bitsnap_core::{ErrorBudget, Lossiness, Policy, stage_keys};
    /// let p = Policy::default().with_lossiness(Lossiness::LossyOptimizerBudget {
    ///     max_error: ErrorBudget::DEFAULT,
    /// });
    /// let base = vec![(stage_keys::LR.to_string(), "0.002".to_string())];
    /// let meta = p.with_base_lr(vec![(stage_keys::LR.into(), "0.0002".into())], &base);
    /// assert!(meta.contains(&(stage_keys::BASE_LR.to_string(), "0.002".to_string())));
    /// let (p, _) = p.staged(meta);
    /// assert_eq!(p.stage.lr_change(), Some(10.0));
    /// ```
    pub fn with_base_lr(
        &self,
        mut metadata: Vec<(String, String)>,
        base: &[(String, String)],
    ) -> Vec<(String, String)> {
        let lr = base.iter().rev().find(|(k, _)| k == stage_keys::LR);
        if let (true, Some((_, lr))) = (self.wants_base_lr(), lr) {
            metadata.retain(|(k, _)| k != stage_keys::BASE_LR);
            metadata.push((stage_keys::BASE_LR.to_string(), lr.clone()));
        }
        metadata
    }
}

/// The widths tried, narrowest first (16 bits last: it is nearly lossless).
const WIDTHS: [QuantBits; 6] = QuantBits::ALL;

/// The encodings tried at one width: linear and log codebooks, and with a base the ratio
/// residual for a non-negative tensor, the delta residual for a signed one (a delta could
/// take a second moment below zero, and `√v` to NaN: measured in the fidelity benchmark).
/// `entries` caps the codebook below `2^bits` (see [`fewer_entries`]).
fn candidates(
    bits: QuantBits,
    level: i32,
    with_base: bool,
    signed: bool,
    entries: Option<usize>,
) -> Vec<Candidate> {
    let mut v: Vec<Candidate> = [ClusterMode::Linear, ClusterMode::Log]
        .into_iter()
        .map(|mode| {
            Candidate::Cluster(ClusterQuantizer {
                level,
                entries,
                ..ClusterQuantizer::new(bits).with_mode(mode)
            })
        })
        .collect();
    if with_base {
        let kind = match signed {
            true => ResidualKind::Delta,
            false => ResidualKind::Ratio,
        };
        v.push(Candidate::Residual(ResidualQuantizer {
            level,
            entries,
            ..ResidualQuantizer::new(bits, kind)
        }));
    }
    v
}

/// A quantizer [`candidates`] tries.
enum Candidate {
    Cluster(ClusterQuantizer),
    Residual(ResidualQuantizer),
}

impl Candidate {
    fn encode(&self, on: On<'_>) -> Result<Option<Encoded>, CodecError> {
        match self {
            Candidate::Cluster(q) => q.encode_with(on.input, on.samples),
            Candidate::Residual(q) => q.encode_with(on.input, on.samples),
        }
    }
}

/// A large tensor's sample windows (and its base's, at the same places), on which the
/// search tries its candidates before it encodes the winner whole.
struct Windows {
    data: Vec<u8>,
    base: Option<Vec<u8>>,
}

impl Windows {
    /// The windows of `input`, or `None` for a tensor of at most [`EXACT_TRIAL_BYTES`]
    /// (tried whole).
    fn of(input: &EncodeInput<'_>) -> Option<Windows> {
        (input.data.len() > EXACT_TRIAL_BYTES).then(|| {
            let (data, base) = sample(input.data, input.base, input.dtype.size(), input.shape);
            Windows { data, base }
        })
    }

    /// The windows as an input like `of` (their base is the same windows of `of`'s).
    fn input<'a>(&'a self, of: &EncodeInput<'a>) -> EncodeInput<'a> {
        EncodeInput {
            data: &self.data,
            base: self.base.as_deref(),
            ..*of
        }
    }
}

/// Runs `search` on `input` and, for a tensor over [`EXACT_TRIAL_BYTES`], its sample
/// windows, each with its own memo of sorted samples.
fn searched<T>(input: &EncodeInput<'_>, search: impl FnOnce(On<'_>, Option<On<'_>>) -> T) -> T {
    let (samples, window_samples) = (Samples::default(), Samples::default());
    let windows = Windows::of(input);
    let windows_input = windows.as_ref().map(|w| w.input(input));
    let whole = On {
        input,
        samples: &samples,
    };
    let trial = windows_input.as_ref().map(|input| On {
        input,
        samples: &window_samples,
    });
    search(whole, trial)
}

/// An input of the search (the tensor, or its trial sample) and the memo of the sorted
/// samples its quantizers draw.
#[derive(Clone, Copy)]
struct On<'a> {
    input: &'a EncodeInput<'a>,
    samples: &'a Samples,
}

/// The trial that won a width: which candidate, with how many entries, its payload.
struct Pick {
    index: usize,
    entries: Option<usize>,
    enc: Encoded,
}

impl Pick {
    fn len(&self) -> usize {
        self.enc.payload.len()
    }
}

/// Between the narrower width that missed the budget and the width that met it, the
/// fewest codebook entries (a binary search over `2^narrower + 1 .. 2^bits − 1`) with
/// which the winning candidate still meets `limit` on `input`, if its payload is
/// smaller: its codes, skewed, cost fewer bits after zstd than `bits` each.
#[allow(clippy::too_many_arguments)]
fn fewer_entries(
    pick: Pick,
    narrower: Option<QuantBits>,
    bits: QuantBits,
    limit: f64,
    on: On<'_>,
    level: i32,
    with_base: bool,
    signed: bool,
) -> Result<Pick, CodecError> {
    let Some(narrower) = narrower else {
        return Ok(pick);
    };
    let (mut lo, mut hi) = ((1usize << narrower.bits()) + 1, (1usize << bits.bits()) - 1);
    let mut best = pick;
    while lo <= hi {
        let mid = lo + (hi - lo) / 2;
        let q = candidates(bits, level, with_base, signed, Some(mid)).swap_remove(best.index);
        match q.encode(on)? {
            Some(enc) if enc.lossy.as_ref().is_some_and(|l| l.1.rel_l2 <= limit) => {
                if enc.payload.len() < best.len() {
                    best = Pick {
                        index: best.index,
                        entries: Some(mid),
                        enc,
                    };
                }
                hi = mid - 1;
            }
            _ => lo = mid + 1,
        }
    }
    Ok(best)
}

/// The widths tried for entropy-coded uniform codebooks: byte-aligned, so zstd's
/// Huffman coding sees whole codes where they are not context-coded (3- and 6-bit codes
/// straddle bytes).
const UNIFORM_WIDTHS: [QuantBits; 3] = [QuantBits::B2, QuantBits::B4, QuantBits::B8];

/// `best`, or the smallest [`UniformQuantizer`] encoding of `whole` within `limit` (at
/// the [`UNIFORM_WIDTHS`], linear cells) if one is smaller; each one encoded whole is
/// recorded in `decision`. With sample `windows` (a large tensor) the widths are tried
/// on them first and encoded whole in that order, those within the budget there first,
/// each by the bytes it stored them in, until one meets the budget on the whole tensor
/// (the windows may sit closer to the budget than the tensor, either way).
fn uniform_if_smaller(
    best: Encoded,
    whole: On<'_>,
    windows: Option<On<'_>>,
    limit: f64,
    level: i32,
    decision: &mut Decision,
) -> Result<Encoded, CodecError> {
    let quantizer = |bits| UniformQuantizer {
        level,
        ..UniformQuantizer::new(bits, limit)
    };
    let passes = |enc: &Encoded| enc.lossy.as_ref().is_some_and(|l| l.1.rel_l2 <= limit);
    let widths: Vec<QuantBits> = match windows {
        None => UNIFORM_WIDTHS.to_vec(),
        Some(on) => {
            let mut tried = Vec::new();
            for bits in UNIFORM_WIDTHS {
                let rank = match quantizer(bits).encode_with(on.input, on.samples)? {
                    Some(enc) => (!passes(&enc), enc.payload.len()),
                    None => (true, usize::MAX),
                };
                tried.push((rank, bits.bits(), bits));
            }
            tried.sort_by_key(|&(rank, bits, _)| (rank, bits));
            tried.into_iter().map(|(_, _, bits)| bits).collect()
        }
    };
    let mut best = best;
    for bits in widths {
        let Some(enc) = quantizer(bits).encode_with(whole.input, whole.samples)? else {
            continue;
        };
        if !passes(&enc) {
            continue;
        }
        decision
            .candidates
            .push((enc.codec, enc.payload.len() as u64));
        if enc.payload.len() < best.payload.len() {
            best = enc;
        }
        if windows.is_some() {
            break;
        }
    }
    Ok(best)
}

/// Encodes a moment tensor within `limit` (relative L2) as cheaply as the module
/// documentation describes, or `None` when nothing lossy beats `lossless` bytes. Records
/// the candidate and the achieved error in `decision`.
pub(super) fn encode_within(
    input: &EncodeInput<'_>,
    base: Option<&[u8]>,
    limit: f64,
    lossless: u64,
    level: i32,
    decision: &mut Decision,
) -> Result<Option<Encoded>, CodecError> {
    if let Some(b) = base {
        let d = cluster::distortion(input.dtype, input.data, b);
        if d.rel_l2 <= limit {
            decision.candidates.push((CodecId::Unchanged, 0));
            decision.error = Some(d);
            return Ok(Some(Encoded {
                codec: CodecId::Unchanged,
                payload: Vec::new(),
                lossy: Some((b.to_vec(), d)),
            }));
        }
    }
    let found = searched(&EncodeInput { base, ..*input }, |whole, trial| {
        let Some(enc) = kmeans_within(whole, trial, limit, level, decision)? else {
            return Ok(None);
        };
        // Uniform cells only for signed tensors (first moments): for a second moment the
        // cell next to zero holds most elements at its mean, and each element below it
        // drives a larger step (`m / √v`) than its own `v` would; the fidelity smoke test
        // measured resumed gaps of 1.3x the noise with them (0.56x without).
        match cluster::has_negative(input.dtype, input.data) {
            true => uniform_if_smaller(enc, whole, trial, limit, level, decision).map(Some),
            false => Ok(Some(enc)),
        }
    })?;
    let Some(enc) = found else {
        return Ok(None);
    };
    if enc.payload.len() as u64 >= lossless {
        return Ok(None);
    }
    decision.error = enc.lossy.as_ref().map(|l| l.1);
    Ok(Some(enc))
}

/// Step 2 of the module documentation: the k-means codebook (plain or residual) of the
/// narrowest width within `limit`, with the fewest entries; its size is recorded in
/// `decision`.
fn kmeans_within(
    whole: On<'_>,
    windows: Option<On<'_>>,
    limit: f64,
    level: i32,
    decision: &mut Decision,
) -> Result<Option<Encoded>, CodecError> {
    let input = whole.input;
    let trial = windows.unwrap_or(whole);
    let with_base = input.base.is_some();
    let signed = cluster::has_negative(input.dtype, input.data);
    let mut narrower = None;
    for bits in WIDTHS {
        let Some(pick) = pick_at(bits, narrower, limit, trial, level, with_base, signed)? else {
            narrower = Some(bits);
            continue;
        };
        let enc = match windows {
            None => Some(pick.enc),
            // The samples may sit closer to the budget than the tensor: then on with the
            // next width.
            Some(_) => whole_within(&pick, bits, whole, limit, level, with_base, signed)?,
        };
        let Some(enc) = enc else {
            narrower = Some(bits);
            continue;
        };
        decision
            .candidates
            .push((enc.codec, enc.payload.len() as u64));
        return Ok(Some(enc));
    }
    Ok(None)
}

/// The smallest passing candidate at `bits` on `trial` (with the fewest entries that
/// still pass), or `None` when none meets `limit`.
fn pick_at(
    bits: QuantBits,
    narrower: Option<QuantBits>,
    limit: f64,
    trial: On<'_>,
    level: i32,
    with_base: bool,
    signed: bool,
) -> Result<Option<Pick>, CodecError> {
    let mut pick: Option<Pick> = None;
    for (index, q) in candidates(bits, level, with_base, signed, None)
        .into_iter()
        .enumerate()
    {
        let Some(enc) = q.encode(trial)? else {
            continue;
        };
        let passes = enc.lossy.as_ref().is_some_and(|l| l.1.rel_l2 <= limit);
        if passes && pick.as_ref().is_none_or(|p| enc.payload.len() < p.len()) {
            pick = Some(Pick {
                index,
                entries: None,
                enc,
            });
        }
    }
    let Some(pick) = pick else {
        return Ok(None);
    };
    fewer_entries(pick, narrower, bits, limit, trial, level, with_base, signed).map(Some)
}

/// `pick` (chosen on samples) encoded whole: with the entries chosen on the samples,
/// else with the whole width; `None` when neither meets `limit`.
fn whole_within(
    pick: &Pick,
    bits: QuantBits,
    whole: On<'_>,
    limit: f64,
    level: i32,
    with_base: bool,
    signed: bool,
) -> Result<Option<Encoded>, CodecError> {
    for entries in [pick.entries, None]
        .into_iter()
        .take(1 + usize::from(pick.entries.is_some()))
    {
        let q = candidates(bits, level, with_base, signed, entries).swap_remove(pick.index);
        match q.encode(whole)? {
            Some(full) if full.lossy.as_ref().is_some_and(|l| l.1.rel_l2 <= limit) => {
                return Ok(Some(full));
            }
            _ => continue,
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::testing::moments;
    use crate::codec::{self, ClusterLayout, Codec, Distortion};
    use crate::{DType, Lossiness, Policy, Role, Tensor};

    fn tensor(data: Vec<u8>, role: Role) -> Tensor {
        let n = (data.len() / 4) as u64;
        Tensor::new("m", DType::F32, vec![n], role, data).unwrap()
    }

    /// A budget of `e` for both moments (first-moment factor 1).
    fn budget_policy(e: f64) -> Policy {
        Policy::default().with_lossiness(Lossiness::LossyOptimizerBudget {
            max_error: ErrorBudget::new(e)
                .unwrap()
                .with_first_moment_factor(1.0)
                .unwrap(),
        })
    }

    /// The k-means search alone (step 2 before the uniform codebooks), within `e`.
    fn kmeans(t: &Tensor, base: Option<&Tensor>, e: f64) -> Encoded {
        let input = EncodeInput {
            shape: &t.shape,
            dtype: t.dtype,
            role: t.role,
            data: &t.data,
            base: base.map(|b| b.data.as_slice()),
        };
        let level = codec::DEFAULT_ZSTD_LEVEL;
        searched(&input, |whole, trial| {
            kmeans_within(whole, trial, e, level, &mut Decision::default())
        })
        .unwrap()
        .unwrap()
    }

    fn measured(t: &Tensor, enc: &codec::Encoded, base: Option<&[u8]>) -> Distortion {
        let n = t.data.len() / 4;
        let back = codec::decode(enc.codec, &enc.payload, DType::F32, n, base).unwrap();
        cluster::distortion(DType::F32, &t.data, &back)
    }

    #[test]
    fn picks_the_narrowest_width_within_the_budget() {
        for (second, e) in [(true, 0.01), (true, 0.05), (false, 0.01), (false, 0.1)] {
            let role = Role::OptimizerMoment(if second { 2 } else { 1 });
            let t = tensor(moments(60_000, second, 7), role);
            let enc = kmeans(&t, None, e);
            assert_eq!(enc.codec, CodecId::Cluster, "{second} {e}");
            let achieved = measured(&t, &enc, None);
            assert!(achieved.rel_l2 <= e, "{second} {e}: {achieved:?}");
            assert_eq!(enc.lossy.unwrap().1.rel_l2, achieved.rel_l2);
            // Every narrower width misses the budget in both domains.
            let layout = ClusterLayout::parse(&enc.payload, DType::F32).unwrap();
            let input = EncodeInput {
                shape: &[],
                dtype: DType::F32,
                role,
                data: &t.data,
                base: None,
            };
            for bits in QuantBits::ALL.into_iter().filter(|b| *b < layout.bits) {
                for mode in [ClusterMode::Linear, ClusterMode::Log] {
                    let q = ClusterQuantizer::new(bits).with_mode(mode);
                    if let Some(enc) = q.encode(&input).unwrap() {
                        assert!(
                            enc.lossy.unwrap().1.rel_l2 > e,
                            "{bits:?} {mode:?} meets {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn fewer_entries_at_the_winning_width_shrink_the_payload() {
        for (second, e) in [(false, 0.1), (true, 0.05), (false, 0.03)] {
            let role = Role::OptimizerMoment(if second { 2 } else { 1 });
            let t = tensor(moments(60_000, second, 9), role);
            let enc = kmeans(&t, None, e);
            let d = enc.lossy.as_ref().unwrap().1;
            let layout = ClusterLayout::parse(&enc.payload, DType::F32).unwrap();
            let full = 1u32 << layout.bits.bits();
            assert!(layout.entries < full, "{second} {e}: {layout:?}");
            assert!(measured(&t, &enc, None).rel_l2 <= e);
            assert_eq!(d.rel_l2, measured(&t, &enc, None).rel_l2);
            // The whole codebook of that width and domain: more bytes.
            let mode = match layout.log {
                true => ClusterMode::Log,
                false => ClusterMode::Linear,
            };
            let input = EncodeInput {
                shape: &[],
                dtype: DType::F32,
                role,
                data: &t.data,
                base: None,
            };
            let whole = ClusterQuantizer::new(layout.bits)
                .with_mode(mode)
                .encode(&input)
                .unwrap()
                .unwrap();
            assert!(
                enc.payload.len() < whole.payload.len(),
                "{second} {e}: {} vs {}",
                enc.payload.len(),
                whole.payload.len()
            );
        }
    }

    #[test]
    fn uniform_codebooks_win_where_they_store_less() {
        // A first moment at budgets up to the stage rule's cap: the policy's pick is
        // within the budget and never larger than the k-means search's; uniform cells
        // win at the looser budgets.
        let t = tensor(moments(60_000, false, 13), Role::OptimizerMoment(1));
        let mut won = 0;
        for e in [0.12, 0.18, MAX_BUDGET] {
            let (enc, d) = budget_policy(e).encode_tensor(&t, None).unwrap();
            let achieved = measured(&t, &enc, None);
            assert!(achieved.rel_l2 <= e, "{e}: {achieved:?}");
            assert_eq!(d.error.unwrap().rel_l2, achieved.rel_l2);
            let km = kmeans(&t, None, e);
            assert!(enc.payload.len() <= km.payload.len(), "{e}");
            won += usize::from(enc.payload.len() < km.payload.len());
        }
        assert!(won >= 2, "{won}");
    }

    #[test]
    fn first_moments_take_the_factor_on_the_budget() {
        let m1 = tensor(moments(60_000, false, 17), Role::OptimizerMoment(1));
        let m2 = tensor(moments(60_000, true, 17), Role::OptimizerMoment(2));
        let e = 0.05;
        let p = |f: f64| {
            Policy::default().with_lossiness(Lossiness::LossyOptimizerBudget {
                max_error: ErrorBudget::new(e)
                    .unwrap()
                    .with_first_moment_factor(f)
                    .unwrap(),
            })
        };
        let err = |p: &Policy, t: &Tensor| {
            let (enc, d) = p.encode_tensor(t, None).unwrap();
            (d.error.unwrap().rel_l2, enc.payload.len())
        };
        let (tight, tight_len) = err(&p(1.0), &m1);
        let (loose, loose_len) = err(&p(4.0), &m1);
        assert!(tight <= e && loose <= 4.0 * e, "{tight} {loose}");
        // Measured 0.19 and 16965 vs 31312 bytes.
        assert!(
            loose > e && loose_len * 3 < tight_len * 2,
            "{loose} {loose_len} {tight_len}"
        );
        // Second moments keep the base budget.
        assert_eq!(err(&p(1.0), &m2), err(&p(4.0), &m2));
        // The rule: factor x the stage's budget, at most 1, six digits; in the reason.
        let b = ErrorBudget::new(0.12).unwrap();
        let warm = Stage {
            step: Some(10),
            warmup_steps: Some(100),
            ..Stage::default()
        };
        let r = warm.rule(b.with_first_moment_factor(3.0).unwrap());
        assert_eq!((r.budget, r.first_moment_budget), (0.06, 0.18));
        assert!(r.reason.ends_with("first moments x3: 0.18"), "{r:?}");
        let late = Stage {
            lr: Some(0.0),
            peak_lr: Some(1e-3),
            ..Stage::default()
        };
        let r = late.rule(b.with_first_moment_factor(5.0).unwrap());
        assert_eq!((r.budget, r.first_moment_budget), (MAX_BUDGET, 1.0));
        // Written beside bitsnap.max_error for inspect.
        let (_, meta) = budget_policy(0.1).staged(Vec::new());
        assert!(meta.contains(&(stage_keys::MAX_ERROR_M1.to_string(), "0.1".to_string())));
        let (_, meta) = Policy::default()
            .with_lossiness(Lossiness::LossyOptimizerBudget {
                max_error: ErrorBudget::DEFAULT,
            })
            .staged(Vec::new());
        assert!(meta.contains(&(stage_keys::MAX_ERROR_M1.to_string(), "0.24".to_string())));
    }

    #[test]
    fn a_moment_that_barely_moved_reuses_the_base() {
        let base = moments(20_000, true, 3);
        let nudged: Vec<u8> = base
            .chunks(4)
            .enumerate()
            .flat_map(|(i, b)| {
                let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                (v * if i % 2 == 0 { 1.004 } else { 0.997 }).to_le_bytes()
            })
            .collect();
        let b = tensor(base.clone(), Role::OptimizerMoment(2));
        let t = tensor(nudged, Role::OptimizerMoment(2));
        let (enc, d) = budget_policy(0.01).encode_tensor(&t, Some(&b)).unwrap();
        assert_eq!(enc.codec, CodecId::Unchanged);
        let err = d.error.unwrap();
        // Measured 0.0036 (the nudges are ±0.4% and ±0.3%).
        assert!(err.rel_l2 > 0.003 && err.rel_l2 < 0.004, "{err:?}");
        assert_eq!(measured(&t, &enc, Some(&base)).rel_l2, err.rel_l2);
        // A tighter budget than the move: not reused (here the XOR delta, lossless,
        // beats the 8-bit codebook the budget would need).
        let (enc, d) = budget_policy(0.002).encode_tensor(&t, Some(&b)).unwrap();
        assert_ne!(enc.codec, CodecId::Unchanged);
        assert!(d.error.is_none_or(|e| e.rel_l2 <= 0.002), "{d:?}");
    }

    /// `base` with every element moved by a factor in `1 ± spread` (deterministic).
    fn moved(base: &[u8], spread: f32, seed: u64) -> Vec<u8> {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::Xoshiro256PlusPlus::seed_from_u64(seed);
        base.chunks(4)
            .flat_map(|b| {
                let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                (v * (1.0 + spread * (rng.random::<f32>() * 2.0 - 1.0))).to_le_bytes()
            })
            .collect()
    }

    #[test]
    fn a_moment_that_moved_a_little_is_coded_as_a_residual_of_the_base() {
        for (second, big) in [(true, false), (false, false), (true, true)] {
            let n = if big { 1 << 20 } else { 60_000 };
            let role = Role::OptimizerMoment(if second { 2 } else { 1 });
            let base = moments(n, second, 21);
            let next = moved(&base, 0.15, 22);
            let (b, t) = (tensor(base.clone(), role), tensor(next, role));
            let enc = kmeans(&t, Some(&b), 0.03);
            assert_eq!(enc.codec, CodecId::ClusterResidual, "{second} {big}");
            let layout = ClusterLayout::parse(&enc.payload, DType::F32).unwrap();
            assert_eq!(layout.domain(), if second { "ratio" } else { "delta" });
            let back = codec::decode(enc.codec, &enc.payload, DType::F32, n, Some(&base)).unwrap();
            let negative = back
                .chunks(4)
                .any(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) < 0.0);
            assert!(!second || !negative, "a second moment decoded below zero");
            let achieved = measured(&t, &enc, Some(&base));
            assert!(achieved.rel_l2 <= 0.03, "{achieved:?}");
            assert_eq!(enc.lossy.as_ref().unwrap().1.rel_l2, achieved.rel_l2);
            // Narrower and smaller than the best codebook of values without the base.
            let plain = kmeans(&t, None, 0.03);
            let plain_bits = ClusterLayout::parse(&plain.payload, DType::F32)
                .unwrap()
                .bits;
            assert!(
                layout.bits < plain_bits,
                "{:?} vs {plain_bits:?}",
                layout.bits
            );
            assert!(enc.payload.len() < plain.payload.len());
        }
    }

    #[test]
    fn large_tensors_are_chosen_on_samples_and_checked_whole() {
        // 4 MiB: over EXACT_TRIAL_BYTES.
        let t = tensor(moments(1 << 20, true, 11), Role::OptimizerMoment(2));
        assert!(t.data.len() > EXACT_TRIAL_BYTES);
        let (enc, d) = budget_policy(0.02).encode_tensor(&t, None).unwrap();
        assert_eq!(enc.codec, CodecId::Cluster);
        let achieved = measured(&t, &enc, None);
        assert!(achieved.rel_l2 <= 0.02, "{achieved:?}");
        assert_eq!(d.error.unwrap().rel_l2, achieved.rel_l2);
    }

    #[test]
    fn weights_and_non_finite_moments_stay_lossless() {
        let p = budget_policy(0.2);
        let w = tensor(moments(10_000, false, 1), Role::Weight);
        let (enc, d) = p.encode_tensor(&w, None).unwrap();
        assert!(d.error.is_none() && enc.lossy.is_none(), "{:?}", enc.codec);
        let mut bad = moments(10_000, false, 1);
        bad[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
        let m = tensor(bad, Role::OptimizerMoment(1));
        let (enc, d) = p.encode_tensor(&m, None).unwrap();
        assert!(d.error.is_none() && enc.lossy.is_none(), "{:?}", enc.codec);
        // A NaN against a finite base is never "within budget" of it.
        let base = tensor(moments(10_000, false, 1), Role::OptimizerMoment(1));
        let (enc, _) = p.encode_tensor(&m, Some(&base)).unwrap();
        assert_ne!(enc.codec, CodecId::Unchanged);
    }

    #[test]
    fn stage_metadata_is_parsed_and_hostile_values_ignored() {
        let meta = |kv: &[(&str, &str)]| -> Vec<(String, String)> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let s = Stage::from_metadata(&meta(&[
            (stage_keys::STEP, " 1200"),
            (stage_keys::LR, "1.5e-4"),
            (stage_keys::PEAK_LR, "6e-4"),
            (stage_keys::WARMUP_STEPS, "100"),
        ]));
        assert_eq!(
            s,
            Stage {
                step: Some(1200),
                lr: Some(1.5e-4),
                peak_lr: Some(6e-4),
                warmup_steps: Some(100),
                base_lr: None,
            }
        );
        let r = s.rule(ErrorBudget::new(0.03).unwrap());
        assert!((r.budget - 0.12).abs() < 1e-12, "{r:?}");
        assert!(r.reason.contains("below peak"), "{r:?}");
        for bad in ["NaN", "inf", "-1e-3", "abc", "", "1e400"] {
            let s = Stage::from_metadata(&meta(&[(stage_keys::LR, bad), (stage_keys::STEP, bad)]));
            assert_eq!(s, Stage::default(), "{bad}");
        }
        // Just after warm-up (up to twice its steps) the budget stays halved, even at
        // a decayed lr; past that, peak / lr applies.
        let base = ErrorBudget::new(0.04).unwrap();
        let at = |step| {
            Stage {
                step: Some(step),
                warmup_steps: Some(100),
                lr: Some(5e-4),
                peak_lr: Some(1e-3),
                base_lr: None,
            }
            .rule(base)
        };
        let r = at(150);
        assert_eq!(r.budget, 0.02);
        assert!(
            r.reason.contains("just after warm-up (step 150 <= 2x100)"),
            "{r:?}"
        );
        assert_eq!(at(200).budget, 0.02);
        assert_eq!(at(201).budget, 0.08);
        // The cap and a zero lr.
        let s = Stage {
            lr: Some(0.0),
            peak_lr: Some(1e-3),
            ..Stage::default()
        };
        let r = s.rule(ErrorBudget::new(0.1).unwrap());
        assert_eq!(r.budget, MAX_BUDGET);
        assert!(r.reason.contains("capped"), "{r:?}");
    }

    #[test]
    fn an_lr_change_since_the_base_halves_the_budget() {
        let base = ErrorBudget::new(0.12).unwrap();
        let at = |lr: f64, base_lr: Option<f64>| {
            Stage {
                step: Some(500),
                warmup_steps: Some(20),
                lr: Some(lr),
                peak_lr: Some(2e-3),
                base_lr,
            }
            .rule(base)
        };
        // finetune-gpt's phase change: 2e-3 -> 2e-4. Without the base's lr the late
        // relaxation would give 0.48, capped at 0.25.
        assert_eq!(at(2e-4, None).budget, MAX_BUDGET);
        let r = at(2e-4, Some(2e-3));
        assert_eq!(r.budget, 0.06);
        assert!(r.reason.contains("lr changed since the base"), "{r:?}");
        // Upwards too, and from 0; a schedule's small steps are no change.
        assert_eq!(at(2e-3, Some(5e-4)).budget, 0.06);
        assert_eq!(at(1e-3, Some(0.0)).budget, 0.06);
        assert_eq!(at(1e-3, Some(1.2e-3)).budget, 0.24);
        assert_eq!(at(0.0, Some(0.0)).budget, MAX_BUDGET);
        // Warm-up takes precedence (same factor, its own reason).
        let warm = Stage {
            step: Some(10),
            ..Stage::default()
        };
        let r = Stage {
            lr: Some(1e-4),
            base_lr: Some(1e-3),
            warmup_steps: Some(20),
            ..warm
        }
        .rule(base);
        assert!(r.reason.contains("warm-up"), "{r:?}");
    }

    #[test]
    fn the_store_passes_the_base_lr_and_inspect_sees_the_rule() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = crate::Store::open_or_create(dir.path(), budget_policy(0.12)).unwrap();
        let meta = |lr: &str| {
            vec![
                (stage_keys::STEP.to_string(), "400".to_string()),
                (stage_keys::LR.to_string(), lr.to_string()),
                (stage_keys::PEAK_LR.to_string(), "0.002".to_string()),
                (stage_keys::WARMUP_STEPS.to_string(), "20".to_string()),
            ]
        };
        let v = tensor(moments(4096, true, 5), Role::OptimizerMoment(2));
        store
            .save_with_metadata("a", vec![v.clone()], meta("0.002"))
            .unwrap();
        let r = store
            .save_with_metadata("b", vec![v], meta("0.0002"))
            .unwrap();
        let get = |k: &str| {
            r.header
                .metadata
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get(stage_keys::BASE_LR).as_deref(), Some("0.002"));
        assert_eq!(get(stage_keys::MAX_ERROR).as_deref(), Some("0.06"));
        assert!(get(stage_keys::BUDGET_RULE).unwrap().contains("lr changed"));
        // A lossless store reads no base metadata.
        let dir = tempfile::tempdir().unwrap();
        let mut store = crate::Store::open_or_create(dir.path(), Policy::default()).unwrap();
        let w = tensor(moments(64, false, 1), Role::Weight);
        store
            .save_with_metadata("a", vec![w.clone()], meta("0.002"))
            .unwrap();
        let r = store
            .save_with_metadata("b", vec![w], meta("0.0002"))
            .unwrap();
        assert!(
            r.header
                .metadata
                .iter()
                .all(|(k, _)| k != stage_keys::BASE_LR)
        );
    }

    #[test]
    fn staged_writes_the_applied_budget_once() {
        let p = budget_policy(0.04);
        let meta = vec![
            (stage_keys::STEP.to_string(), "3".to_string()),
            (stage_keys::WARMUP_STEPS.to_string(), "10".to_string()),
            ("user".to_string(), "kept".to_string()),
        ];
        let (staged, meta) = p.staged(meta);
        assert_eq!(staged.stage.step, Some(3));
        let (_, again) = staged.staged(meta.clone());
        assert_eq!(again, meta);
        let get = |k: &str| {
            meta.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get(stage_keys::MAX_ERROR), Some("0.02"));
        assert!(get(stage_keys::BUDGET_RULE).unwrap().contains("warm-up"));
        assert_eq!(get("user"), Some("kept"));
        // A fixed width or lossless policy leaves the metadata alone.
        let (_, plain) = Policy::default().staged(vec![("a".into(), "b".into())]);
        assert_eq!(plain, vec![("a".to_string(), "b".to_string())]);
    }
}
