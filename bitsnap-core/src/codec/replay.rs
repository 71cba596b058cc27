//! Optimizer replay (issue #12, finding 2): an f32 tensor one optimizer step after its
//! base, predicted with the optimizer's own update rule from tensors the decoder already
//! has, stored as the residual `bits(actual) − bits(predicted)`.
//!
//! Two targets, each read from the entry's own base tensor (same name, base snapshot) and
//! two referenced tensors (FORMAT.md 2.7, in this order):
//!
//! | target | base tensor | reference 1 | reference 2 |
//! |---|---|---|---|
//! | weight (master weights, Burn's f32 weights) | old weight `w` | new first moment `m'` | new second moment `v'` |
//! | second moment | old second moment `v` | old first moment `m` (base scope) | new first moment `m'` |
//!
//! The new weight needs only `w`, `m'`, `v'` and the step's scalars: replayed with the
//! same operation order, rounding and fused multiply-adds as the trainer's kernel it is
//! exact, and the residual is all zeros. The new second moment needs the gradient, which
//! is only recovered approximately from the moments (`g = (m' − β1·m)/(1 − β1)`): the
//! prediction is within a few ulps and the residual absorbs the rest.
//!
//! The decoder computes nothing from hyperparameters: the payload carries the scalar
//! constants of the [`Predictor`] exactly as the encoder computed them (bias corrections,
//! step size, decay factor), so decoding is the same on every machine. A wrong guess of
//! the rule or of a hyperparameter costs bytes, never bits.
//!
//! A replay payload:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | predictor tag ([`Predictor::tag`]) |
//! | 1 | `n`: constants, equal to [`Predictor::constants`] |
//! | 8·n | the constants, f64 LE (f32 constants stored exactly as f64) |
//! | rest | an integer-delta payload of the f32 tensor against the prediction (chunk stream of zigzag differences in byte planes, one zstd frame per plane per chunk) |

use rayon::prelude::*;

use super::{CodecError, Cursor, alloc, chunks, intdelta, planes};

/// Most constants a predictor carries.
pub const MAX_CONSTANTS: usize = 6;
/// Elements per parallel work item when predicting.
const PREDICT_BLOCK: usize = 1 << 16;
/// Elements of a tensor the encoder's trials predict (evenly spaced windows).
pub const TRIAL_ELEMS: usize = 1 << 15;

/// What a replay payload predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// Second moment (Adam `v`, `exp_avg_sq`).
    SecondMoment,
    /// Weight (master weight, f32 parameter).
    Weight,
}

/// An update rule, with the operation order and rounding of one optimizer kernel. `x` is
/// the base tensor's element, `a` and `b` the two references' (see the module table),
/// `k` the payload's constants (`kf`: the same rounded to f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Predictor {
    /// PyTorch AdamW, for-loop and foreach (CUDA, no contraction): `w·k0 + k3·(m'/(√v'/k1 + k2))`,
    /// f32; `k0 = 1 − lr·wd`, `k1 = √(1 − β2^t)`, `k2 = ε`, `k3 = −lr/(1 − β1^t)`.
    TorchAdamW = 0,
    /// As [`Predictor::TorchAdamW`] with the last multiply-add fused:
    /// `fma(k3, m'/(√v'/k1 + k2), w·k0)`.
    TorchAdamWFma = 1,
    /// As [`Predictor::TorchAdamW`] in the CPU `addcdiv` order: `w·k0 + (k3·m')/(√v'/k1 + k2)`.
    TorchAdamWCpu = 2,
    /// PyTorch fused AdamW (CUDA): `w₁ = f32(w − k0·w)` in f64 (`k0 = lr·wd`),
    /// `d = f32(f64(√v'/k1) + k2)` (`k2 = ε` in f64), `w₁ − (k3·m')/d` (`k3 = lr/(1 − β1^t)`).
    TorchAdamWFused = 3,
    /// As [`Predictor::TorchAdamWFused`] with every operation in f32.
    TorchAdamWFusedF32 = 4,
    /// Burn 0.22 AdamW: `w·k0 − ((m'/k1)/(√(v'/k2) + k3))·k4`; `k0 = 1 − lr·wd`,
    /// `k1 = 1 − β1^t`, `k2 = 1 − β2^t`, `k3 = ε`, `k4 = lr`.
    BurnAdamW = 5,
    /// Burn 0.22 Adam: `w − ((m'·k0)/(√v' + k1))·k2`; `k0 = √(1 − β2^t)/(1 − β1^t)`,
    /// `k1 = ε·√(1 − β2^t)`, `k2 = lr`.
    BurnAdam = 6,
    /// Any Adam-like step at any interval: `w − k0·(m'/(√v' + k1))`, `k0` fitted per
    /// tensor (least squares), `k1 = ε`.
    Generic = 7,
    /// Second moment in f64: `g = (m' − k0·m)/k1`, `f32(k2·v + k3·g²)`; `k0 = β1`,
    /// `k1 = 1 − β1`, `k2 = β2`, `k3 = 1 − β2`.
    MomentF64 = 16,
    /// Second moment in f32 (PyTorch `mul_` then `addcmul_`): `g = f32((m' − k0·m)/k1)`,
    /// `v·k2 + (k3·g)·g`.
    MomentF32 = 17,
    /// Second moment as Burn computes it: `g` as in [`Predictor::MomentF32`],
    /// `v·k2 + (g·g)·k3`.
    MomentBurn = 18,
}

impl Predictor {
    /// Every predictor.
    pub const ALL: [Predictor; 11] = [
        Predictor::TorchAdamW,
        Predictor::TorchAdamWFma,
        Predictor::TorchAdamWCpu,
        Predictor::TorchAdamWFused,
        Predictor::TorchAdamWFusedF32,
        Predictor::BurnAdamW,
        Predictor::BurnAdam,
        Predictor::Generic,
        Predictor::MomentF64,
        Predictor::MomentF32,
        Predictor::MomentBurn,
    ];

    /// The on-disk tag.
    pub const fn tag(self) -> u8 {
        self as u8
    }

    /// The predictor with this tag, if any.
    pub fn from_tag(tag: u8) -> Option<Predictor> {
        Predictor::ALL.into_iter().find(|p| p.tag() == tag)
    }

    /// What it predicts.
    pub const fn target(self) -> Target {
        match self {
            Predictor::MomentF64 | Predictor::MomentF32 | Predictor::MomentBurn => {
                Target::SecondMoment
            }
            _ => Target::Weight,
        }
    }

    /// How many constants its payload carries.
    pub const fn constants(self) -> usize {
        match self {
            Predictor::BurnAdamW => 5,
            Predictor::BurnAdam => 3,
            Predictor::Generic => 2,
            _ => 4,
        }
    }

    /// Short name, as `bitsnap inspect` shows it.
    pub const fn name(self) -> &'static str {
        match self {
            Predictor::TorchAdamW => "adamw-torch",
            Predictor::TorchAdamWFma => "adamw-torch-fma",
            Predictor::TorchAdamWCpu => "adamw-torch-cpu",
            Predictor::TorchAdamWFused => "adamw-torch-fused",
            Predictor::TorchAdamWFusedF32 => "adamw-torch-fused-f32",
            Predictor::BurnAdamW => "adamw-burn",
            Predictor::BurnAdam => "adam-burn",
            Predictor::Generic => "generic",
            Predictor::MomentF64 => "moment2-f64",
            Predictor::MomentF32 => "moment2-f32",
            Predictor::MomentBurn => "moment2-burn",
        }
    }
}

/// A predictor with its constants: what a replay payload's header holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Replay {
    /// The update rule.
    pub predictor: Predictor,
    /// Its constants ([`Predictor::constants`] of them used, the rest 0).
    pub k: [f64; MAX_CONSTANTS],
}

impl Replay {
    /// A replay of `predictor` with constants `k` (missing ones 0, extra ones ignored).
    pub fn new(predictor: Predictor, k: &[f64]) -> Replay {
        let mut all = [0.0; MAX_CONSTANTS];
        for (slot, v) in all.iter_mut().zip(k.iter().take(predictor.constants())) {
            *slot = *v;
        }
        Replay { predictor, k: all }
    }

    /// `name(k0, k1, …)`, for `bitsnap inspect`.
    pub fn describe(&self) -> String {
        let k: Vec<String> = self.k[..self.predictor.constants()]
            .iter()
            .map(|v| format!("{v:e}"))
            .collect();
        format!("{}({})", self.predictor.name(), k.join(", "))
    }

    fn header(&self) -> Vec<u8> {
        let n = self.predictor.constants();
        let mut out = Vec::with_capacity(2 + 8 * n);
        out.push(self.predictor.tag());
        out.push(n as u8);
        for v in &self.k[..n] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Writes the prediction of each element into `out` (f32 LE, the length of `base`);
    /// `base`, `a` and `b` are the base tensor and the two references, all f32 LE of
    /// `out`'s length.
    pub fn predict_into(&self, base: &[u8], a: &[u8], b: &[u8], out: &mut [u8]) {
        let k = self.k;
        let kf = k.map(|v| v as f32);
        let p = self.predictor;
        let block = PREDICT_BLOCK * 4;
        out.par_chunks_mut(block)
            .zip(base.par_chunks(block))
            .zip(a.par_chunks(block).zip(b.par_chunks(block)))
            .for_each(|((o, x), (a, b))| predict_block(p, &k, &kf, x, a, b, o));
    }
}

/// Predicts one block: the predictor is matched once, outside the element loop, so that
/// each predictor's loop is compiled on its own (and vectorized where the operations
/// allow: the same IEEE operations on every lane, so the same bits as one at a time).
fn predict_block(
    p: Predictor,
    k: &[f64; MAX_CONSTANTS],
    kf: &[f32; MAX_CONSTANTS],
    x: &[u8],
    a: &[u8],
    b: &[u8],
    out: &mut [u8],
) {
    #[inline(always)]
    fn run(x: &[u8], a: &[u8], b: &[u8], out: &mut [u8], f: impl Fn(f32, f32, f32) -> f32) {
        let get = |s: &[u8]| f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        for (((o, x), a), b) in out
            .chunks_exact_mut(4)
            .zip(x.chunks_exact(4))
            .zip(a.chunks_exact(4))
            .zip(b.chunks_exact(4))
        {
            o.copy_from_slice(&f(get(x), get(a), get(b)).to_le_bytes());
        }
    }
    macro_rules! each {
        ($($pred:ident),*) => {
            match p {
                $(Predictor::$pred => run(x, a, b, out, |x, a, b| {
                    predict_one(Predictor::$pred, k, kf, x, a, b)
                }),)*
            }
        };
    }
    each!(
        TorchAdamW,
        TorchAdamWFma,
        TorchAdamWCpu,
        TorchAdamWFused,
        TorchAdamWFusedF32,
        BurnAdamW,
        BurnAdam,
        Generic,
        MomentF64,
        MomentF32,
        MomentBurn
    );
}

/// `x·d`, skipped when `d` is 1 (the trainers skip the decay when it is 0).
#[inline]
fn decay(x: f32, d: f32) -> f32 {
    if d == 1.0 { x } else { x * d }
}

#[inline(always)]
fn predict_one(
    p: Predictor,
    k: &[f64; MAX_CONSTANTS],
    kf: &[f32; MAX_CONSTANTS],
    x: f32,
    a: f32,
    b: f32,
) -> f32 {
    match p {
        Predictor::TorchAdamW => decay(x, kf[0]) + kf[3] * (a / (b.sqrt() / kf[1] + kf[2])),
        Predictor::TorchAdamWFma => kf[3].mul_add(a / (b.sqrt() / kf[1] + kf[2]), decay(x, kf[0])),
        Predictor::TorchAdamWCpu => decay(x, kf[0]) + (kf[3] * a) / (b.sqrt() / kf[1] + kf[2]),
        Predictor::TorchAdamWFused => {
            let w = if k[0] == 0.0 {
                x
            } else {
                (f64::from(x) - k[0] * f64::from(x)) as f32
            };
            let d = (f64::from(b.sqrt() / kf[1]) + k[2]) as f32;
            w - (kf[3] * a) / d
        }
        Predictor::TorchAdamWFusedF32 => {
            let w = if kf[0] == 0.0 { x } else { x - kf[0] * x };
            w - (kf[3] * a) / (b.sqrt() / kf[1] + kf[2])
        }
        Predictor::BurnAdamW => {
            let delta = (a / kf[1]) / ((b / kf[2]).sqrt() + kf[3]);
            decay(x, kf[0]) - delta * kf[4]
        }
        Predictor::BurnAdam => x - ((a * kf[0]) / (b.sqrt() + kf[1])) * kf[2],
        Predictor::Generic => x - kf[0] * (a / (b.sqrt() + kf[1])),
        Predictor::MomentF64 => {
            let g = (f64::from(b) - k[0] * f64::from(a)) / k[1];
            (k[2] * f64::from(x) + k[3] * g * g) as f32
        }
        Predictor::MomentF32 => {
            let g = ((f64::from(b) - k[0] * f64::from(a)) / k[1]) as f32;
            x * kf[2] + (kf[3] * g) * g
        }
        Predictor::MomentBurn => {
            let g = ((f64::from(b) - k[0] * f64::from(a)) / k[1]) as f32;
            x * kf[2] + (g * g) * kf[3]
        }
    }
}

/// Approximate coded size of the residual of `actual` against `predicted` (f32 LE):
/// the significant bits of each zigzag difference, summed. The encoder's trials rank
/// predictors by it.
pub fn residual_bits(actual: &[u8], predicted: &[u8]) -> u64 {
    actual
        .chunks_exact(4)
        .zip(predicted.chunks_exact(4))
        .map(|(x, p)| {
            let x = u32::from_le_bytes([x[0], x[1], x[2], x[3]]);
            let p = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
            let d = x.wrapping_sub(p) as i32;
            let z = ((d << 1) ^ (d >> 31)) as u32;
            u64::from(32 - z.leading_zeros())
        })
        .sum()
}

/// Encodes `actual` (f32 LE) as a replay payload of `replay` against `base`, `a`, `b`
/// (see the module table; each of `actual`'s length). `None` when a length differs.
pub fn encode(
    replay: &Replay,
    actual: &[u8],
    base: &[u8],
    a: &[u8],
    b: &[u8],
    level: i32,
) -> Result<Option<Vec<u8>>, CodecError> {
    let n = actual.len();
    if !n.is_multiple_of(4) || base.len() != n || a.len() != n || b.len() != n {
        return Ok(None);
    }
    // The integer-delta payload of `actual` against the prediction, chunk by chunk: each
    // chunk is predicted into a scratch buffer and turned into zigzag differences there,
    // so no tensor-sized prediction is ever held (the same bytes as `IntDelta` over a
    // whole prediction; the round-trip tests decode them with its decoder).
    let mut payload = replay.header();
    let k = replay.k;
    let kf = k.map(|v| v as f32);
    chunks::encode(n / 4, chunks::chunk_elems(4), &mut payload, |elems| {
        let range = elems.start * 4..elems.end * 4;
        let mut body = Vec::with_capacity(range.len() + planes::PLANE_OVERHEAD * 4);
        RESIDUAL.with(|r| {
            let mut r = r.borrow_mut();
            r.clear();
            r.resize(range.len(), 0);
            let (x, ra, rb) = (&base[range.clone()], &a[range.clone()], &b[range.clone()]);
            predict_block(replay.predictor, &k, &kf, x, ra, rb, &mut r);
            for (p, v) in r.chunks_exact_mut(4).zip(actual[range].chunks_exact(4)) {
                let want = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
                let got = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
                let d = want.wrapping_sub(got) as i32;
                p.copy_from_slice(&(((d << 1) ^ (d >> 31)) as u32).to_le_bytes());
            }
            super::with_compressor(level, |c| planes::encode(&r, 4, c, &mut body))
        })?;
        Ok(body)
    })?;
    Ok(Some(payload))
}

thread_local! {
    /// Per thread: one chunk's prediction, then its zigzag residual.
    static RESIDUAL: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Reads a replay payload's header: the predictor and constants, and where the residual
/// starts.
pub fn parse_header(payload: &[u8]) -> Result<(Replay, usize), CodecError> {
    let mut cur = Cursor::new(payload);
    let tag = cur.u8("replay predictor")?;
    let predictor = Predictor::from_tag(tag)
        .ok_or_else(|| CodecError::new(0, format!("unknown replay predictor {tag}")))?;
    let n = cur.u8("replay constant count")? as usize;
    if n != predictor.constants() {
        return Err(CodecError::new(
            1,
            format!(
                "{} constants for replay predictor {}, {} expected",
                n,
                predictor.name(),
                predictor.constants()
            ),
        ));
    }
    let mut k = [0.0; MAX_CONSTANTS];
    for slot in k.iter_mut().take(n) {
        *slot = cur.f64("replay constant")?;
    }
    Ok((Replay { predictor, k }, cur.offset()))
}

/// Checks a replay payload's header and residual structure for `numel` f32 elements
/// without decoding it.
pub(crate) fn check(payload: &[u8], numel: usize) -> Result<(), CodecError> {
    let (_, at) = parse_header(payload)?;
    let rest = payload.get(at..).unwrap_or_default();
    super::chunks::parse(&mut Cursor::new(rest), numel)
        .map_err(|e| e.shifted(at))?
        .iter()
        .try_for_each(|c| super::planes::check_body(c.body, c.elems.len(), 4, c.offset + at))
}

/// Decodes a replay payload into `out` (f32 LE) from the base tensor and the two
/// referenced tensors (each of `out`'s length).
pub(crate) fn decode_into(
    payload: &[u8],
    base: &[u8],
    a: &[u8],
    b: &[u8],
    out: &mut [u8],
) -> Result<(), CodecError> {
    let (replay, at) = parse_header(payload)?;
    let n = out.len();
    for (what, len) in [
        ("base tensor", base.len()),
        ("first reference", a.len()),
        ("second reference", b.len()),
    ] {
        if len != n {
            return Err(CodecError::new(
                0,
                format!("replay {what} has {len} bytes, the tensor {n}"),
            ));
        }
    }
    let mut predicted = alloc::zeroed(n, "the replay prediction")?;
    replay.predict_into(base, a, b, &mut predicted);
    let rest = payload.get(at..).unwrap_or_default();
    intdelta::decode_into(rest, 4, &predicted, out).map_err(|e| e.shifted(at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;
    use crate::codec::testing::{finite_bytes, mutate, tensor_bytes};
    use crate::codec::{CodecId, decode_with_references};
    use proptest::prelude::*;

    fn any_predictor() -> impl Strategy<Value = Replay> {
        (0..Predictor::ALL.len(), prop::array::uniform6(-2.0f64..2.0)).prop_map(|(i, k)| {
            let p = Predictor::ALL[i];
            // f32 constants as the encoder stores them (exact f64 of an f32).
            Replay::new(p, &k.map(|v| f64::from(v as f32)))
        })
    }

    fn round_trip(r: &Replay, actual: &[u8], base: &[u8], a: &[u8], b: &[u8]) -> Vec<u8> {
        let payload = encode(r, actual, base, a, b, 1).unwrap().unwrap();
        let n = actual.len() / 4;
        decode_with_references(
            CodecId::Replay,
            &payload,
            DType::F32,
            n,
            Some(base),
            &[(DType::F32, a), (DType::F32, b)],
        )
        .unwrap()
    }

    proptest! {
        // Inputs and targets hold every special value (NaNs with payloads, ±0, ±Inf,
        // subnormals: `tensor_bytes`); the target changed from none to all elements of
        // the base; every predictor, arbitrary constants.
        #[test]
        fn round_trip_any_input(r in any_predictor(), n in 0usize..3000, permille in prop::sample::select(vec![0u32, 10, 500, 1000]), seed in any::<u64>()) {
            let base = tensor_bytes(DType::F32, n, seed);
            let a = tensor_bytes(DType::F32, n, seed ^ 1);
            let b = tensor_bytes(DType::F32, n, seed ^ 2);
            let actual = mutate(&base, 4, permille, seed ^ 3);
            prop_assert_eq!(round_trip(&r, &actual, &base, &a, &b), actual);
        }

        // A target that is exactly the prediction: the residual is all zeros.
        #[test]
        fn exact_predictions_cost_almost_nothing(r in any_predictor(), seed in any::<u64>()) {
            let n = 20_000;
            let base = finite_bytes(DType::F32, n, seed);
            let a = finite_bytes(DType::F32, n, seed ^ 1);
            let b = finite_bytes(DType::F32, n, seed ^ 2);
            let mut actual = vec![0u8; 4 * n];
            r.predict_into(&base, &a, &b, &mut actual);
            let payload = encode(&r, &actual, &base, &a, &b, 1).unwrap().unwrap();
            // Measured: 100-odd bytes for 80 KB (one chunk of constant planes).
            prop_assert!(payload.len() < 400, "{}", payload.len());
            prop_assert_eq!(round_trip(&r, &actual, &base, &a, &b), actual);
        }
    }

    #[test]
    fn the_residual_is_the_integer_delta_against_the_whole_prediction() {
        use crate::codec::{Codec, EncodeInput, IntDelta};
        // Over several chunks, the last one short: the chunked encode must give exactly
        // the bytes `IntDelta` gives against a prediction held whole.
        let n = 3 * crate::codec::chunks::chunk_elems(4) + 1234;
        let base = finite_bytes(DType::F32, n, 7);
        let a = finite_bytes(DType::F32, n, 8);
        let b = finite_bytes(DType::F32, n, 9);
        let actual = finite_bytes(DType::F32, n, 10);
        for r in [
            Replay::new(Predictor::TorchAdamW, &[0.9999, 0.3, 1e-8, -1e-3]),
            Replay::new(Predictor::MomentF64, &[0.9, 0.1, 0.95, 0.05]),
        ] {
            let payload = encode(&r, &actual, &base, &a, &b, 1).unwrap().unwrap();
            let mut predicted = vec![0u8; actual.len()];
            r.predict_into(&base, &a, &b, &mut predicted);
            let input = EncodeInput {
                shape: &[],
                dtype: DType::F32,
                role: crate::Role::Weight,
                data: &actual,
                base: Some(&predicted),
            };
            let whole = IntDelta { level: 1 }.encode(&input).unwrap().unwrap();
            let (_, at) = parse_header(&payload).unwrap();
            assert_eq!(&payload[at..], whole.payload.as_slice());
        }
    }

    #[test]
    fn torch_adamw_replays_a_step_exactly_and_generic_does_not() {
        // One PyTorch AdamW step computed here the way the kernel does it.
        let n = 50_000usize;
        let (lr, wd, b1, b2, eps, t) = (6e-4f64, 0.1f64, 0.9f64, 0.95f64, 1e-8f64, 101);
        let w: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 0.02).collect();
        let m: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.11).cos() * 1e-3).collect();
        let v: Vec<f32> = (0..n)
            .map(|i| 1e-7 + ((i as f32) * 0.07).sin().powi(2) * 1e-6)
            .collect();
        let bc1 = 1.0 - b1.powi(t);
        let bc2s = (1.0 - b2.powi(t)).sqrt();
        let k = [1.0 - lr * wd, bc2s, eps, -lr / bc1].map(|x| x as f32);
        let next: Vec<f32> = (0..n)
            .map(|i| (w[i] * k[0]) + k[3] * (m[i] / (v[i].sqrt() / k[1] + k[2])))
            .collect();
        let bytes = |x: &[f32]| -> Vec<u8> { x.iter().flat_map(|v| v.to_le_bytes()).collect() };
        let (w, m, v, next) = (bytes(&w), bytes(&m), bytes(&v), bytes(&next));
        let exact = Replay::new(Predictor::TorchAdamW, &k.map(f64::from));
        let p = encode(&exact, &next, &w, &m, &v, 1).unwrap().unwrap();
        let fma = Replay::new(Predictor::TorchAdamWFma, &k.map(f64::from));
        let q = encode(&fma, &next, &w, &m, &v, 1).unwrap().unwrap();
        // Measured: 134 bytes exact, 10_9xx bytes with the fused multiply-add (200 KB).
        assert!(p.len() < 300, "{}", p.len());
        assert!(q.len() > 10 * p.len(), "{} vs {}", q.len(), p.len());
        assert_eq!(round_trip(&exact, &next, &w, &m, &v), next);
        assert_eq!(round_trip(&fma, &next, &w, &m, &v), next);
    }

    #[test]
    fn hostile_payloads_and_inputs_are_refused() {
        let n = 5000;
        let base = tensor_bytes(DType::F32, n, 1);
        let a = tensor_bytes(DType::F32, n, 2);
        let b = tensor_bytes(DType::F32, n, 3);
        let actual = mutate(&base, 4, 300, 4);
        let r = Replay::new(Predictor::MomentF64, &[0.9, 0.1, 0.95, 0.05]);
        let payload = encode(&r, &actual, &base, &a, &b, 1).unwrap().unwrap();
        let dec = |p: &[u8], n: usize, base: Option<&[u8]>, refs: &[(DType, &[u8])]| {
            decode_with_references(CodecId::Replay, p, DType::F32, n, base, refs)
        };
        let refs = [(DType::F32, a.as_slice()), (DType::F32, b.as_slice())];
        assert_eq!(dec(&payload, n, Some(&base), &refs).unwrap(), actual);
        // Residual length mismatch: truncated, extended, another element count.
        assert!(dec(&payload[..payload.len() - 1], n, Some(&base), &refs).is_err());
        let mut long = payload.clone();
        long.push(0);
        assert!(dec(&long, n, Some(&base), &refs).is_err());
        let e = dec(&payload, n - 1, Some(&base[..4 * (n - 1)]), &refs).unwrap_err();
        assert!(e.reason.contains("declares 5000 bytes"), "{e}");
        // Missing base, missing or extra reference, wrong reference dtype or size.
        let e = dec(&payload, n, None, &refs).unwrap_err();
        assert!(e.reason.contains("without a base"), "{e}");
        let e = dec(&payload, n, Some(&base), &refs[..1]).unwrap_err();
        assert!(
            e.reason.contains("reads 2 referenced tensors, 1 given"),
            "{e}"
        );
        let e = dec(&payload, n, Some(&base), &[refs[0], (DType::I32, &b)]).unwrap_err();
        assert!(
            e.reason
                .contains("tensor 2 is i32, a replayed one must be f32"),
            "{e}"
        );
        let e = dec(&payload, n, Some(&base), &[refs[0], (DType::F32, &b[..8])]).unwrap_err();
        assert!(e.reason.contains("referenced tensor 2 has 8 bytes"), "{e}");
        // Not f32; unknown predictor; wrong constant count.
        let e = decode_with_references(
            CodecId::Replay,
            &payload,
            DType::BF16,
            n,
            Some(&base[..2 * n]),
            &refs,
        )
        .unwrap_err();
        assert!(e.reason.contains("cannot be replayed"), "{e}");
        let mut bad = payload.clone();
        bad[0] = 99;
        assert!(
            dec(&bad, n, Some(&base), &refs)
                .unwrap_err()
                .reason
                .contains("unknown replay predictor 99")
        );
        let mut bad = payload.clone();
        bad[1] = 3;
        assert!(
            dec(&bad, n, Some(&base), &refs)
                .unwrap_err()
                .reason
                .contains("3 constants")
        );
        // Every single-byte corruption of the first bytes decodes or errors, never panics.
        for i in 0..payload.len().min(96) {
            let mut bad = payload.clone();
            bad[i] ^= 0xa5;
            let _ = dec(&bad, n, Some(&base), &refs);
        }
        // The encoder declines inputs of different lengths.
        assert!(
            encode(&r, &actual, &base[..40], &a, &b, 1)
                .unwrap()
                .is_none()
        );
    }
}
