//! What a tensor is for: model weight, optimizer moment or anything else.

use std::fmt;

/// The role of a tensor in a checkpoint. It decides which codecs the
/// [`Policy`](crate::Policy) may use: only optimizer moments may be quantized.
///
/// ```
/// use bitsnap_core::Role;
/// assert_eq!(Role::guess("layers.0.attn.weight.exp_avg_sq"), Role::OptimizerMoment(2));
/// assert_eq!(Role::guess("state.3.moment_1"), Role::OptimizerMoment(1));
/// assert_eq!(Role::guess("transformer.h.0.mlp.c_fc.weight"), Role::Weight);
/// assert_eq!(Role::guess("optimizer.step"), Role::Other);
/// assert_eq!("moment2".parse::<Role>(), Ok(Role::OptimizerMoment(2)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A trainable parameter, buffer or any model state.
    Weight,
    /// An optimizer moment: `1` for first moments (Adam `exp_avg`, SGD momentum),
    /// `2` for second moments (Adam `exp_avg_sq`: non-negative, spanning decades).
    OptimizerMoment(u8),
    /// Anything else (step counters, scalars, integer state). Always stored losslessly.
    Other,
}

impl Role {
    /// The on-disk tag: 0 other, 1 weight, `0x10 + k` for moment `k` (`k` in 1..=15).
    pub fn tag(self) -> u8 {
        match self {
            Role::Other => 0,
            Role::Weight => 1,
            Role::OptimizerMoment(k) => 0x10 | (k & 0x0f),
        }
    }

    /// The role with this on-disk tag, if any.
    pub fn from_tag(tag: u8) -> Option<Role> {
        match tag {
            0 => Some(Role::Other),
            1 => Some(Role::Weight),
            0x11..=0x1f => Some(Role::OptimizerMoment(tag & 0x0f)),
            _ => None,
        }
    }

    /// Whether this is an optimizer moment.
    pub fn is_moment(self) -> bool {
        matches!(self, Role::OptimizerMoment(_))
    }

    /// Guesses the role of a tensor in a foreign file from its name: what
    /// [`RoleGuess::from_name`] decides, without the reason.
    pub fn guess(name: &str) -> Role {
        RoleGuess::from_name(name).role
    }
}

/// A role guessed from tensor names, with what decided it and whether the name also reads
/// as another role.
///
/// Moments are guessed only from optimizer-state naming conventions: PyTorch and DeepSpeed
/// (`state.0.exp_avg`, `exp_avg_sq`, `momentum_buffer`, `square_avg`), Megatron
/// (`optimizer.state.exp_avg.<param>`), Burn (`moment_1`, `moment_2`,
/// `momentum.velocity`, `momentum.buf`), and a short moment word (`mu`, `nu`, `m`, `v`,
/// `momentum`) right under an optimizer-state path (Optax `opt_state.0.mu.<param>`,
/// `opt.nu.<param>`) or ending one. The same words elsewhere do not make a moment: T5's
/// `SelfAttention.v.weight` and MoCo's `momentum_encoder.*` are weights, marked
/// [`ambiguous`](RoleGuess::ambiguous). PyTorch's `param_groups` entries are
/// [`Role::Other`].
///
/// ```
/// use bitsnap_core::{Role, RoleGuess};
///
/// let g = RoleGuess::from_name("opt_state.0.nu.dense.kernel");
/// assert_eq!((g.role, g.ambiguous), (Role::OptimizerMoment(2), false));
///
/// let g = RoleGuess::from_name("encoder.block.0.layer.0.SelfAttention.v.weight");
/// assert_eq!((g.role, g.ambiguous), (Role::Weight, true));
///
/// // `m` beside a tensor of the same shape reads as that tensor's moment, but only
/// // ambiguously: a caller about to quantize should ask first.
/// let shape = [4u64, 4];
/// let g = RoleGuess::for_checkpoint(&[("dense.kernel", &shape[..]), ("dense.kernel.m", &shape[..])]);
/// assert_eq!(g[1].role, Role::OptimizerMoment(1));
/// assert!(g[1].ambiguous);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleGuess {
    /// The guessed role.
    pub role: Role,
    /// Whether the guess may well be wrong: a moment word (`v`, `m`, `mu`, `nu`,
    /// `momentum`, ...) outside any optimizer-state convention (guessed
    /// [`Role::Weight`]), or a moment guessed only from a sibling tensor of the same
    /// shape. Callers about to lose precision on a moment (quantizing) should not act on
    /// an ambiguous guess without the user's word.
    pub ambiguous: bool,
    /// What decided, for messages (for example `` `exp_avg` (PyTorch Adam) ``).
    pub reason: &'static str,
}

/// Whole-segment names that make a moment wherever they appear (also as the end of a
/// segment after `_`, as in AMSGrad's `max_exp_avg_sq`).
const CONVENTIONS: &[(&str, u8, &str)] = &[
    (
        "exp_avg_sq",
        2,
        "`exp_avg_sq` (PyTorch/DeepSpeed/Megatron Adam)",
    ),
    ("exp_avg", 1, "`exp_avg` (PyTorch/DeepSpeed/Megatron Adam)"),
    ("momentum_buffer", 1, "`momentum_buffer` (PyTorch SGD)"),
    ("square_avg", 2, "`square_avg` (PyTorch RMSprop)"),
    ("moment_1", 1, "`moment_1` (Burn Adam)"),
    ("moment_2", 2, "`moment_2` (Burn Adam)"),
    ("moment1", 1, "`moment1`"),
    ("moment2", 2, "`moment2`"),
    ("first_moment", 1, "`first_moment`"),
    ("second_moment", 2, "`second_moment`"),
];

/// Short moment words: a moment only in an optimizer-state path.
const SHORT: &[(&str, u8)] = &[
    ("mu", 1),
    ("m", 1),
    ("momentum", 1),
    ("velocity", 1),
    ("nu", 2),
    ("v", 2),
];

/// Segments that start an optimizer-state path.
const OPTIMIZER: &[&str] = &[
    "optimizer",
    "optimizers",
    "optim",
    "opt",
    "opt_state",
    "opt_states",
    "optim_state",
    "optimizer_state",
    "optimizer_states",
    "optimizer_state_dict",
];

/// Containers between an optimizer segment and the moment word (numbers are skipped too).
const CONTAINERS: &[&str] = &[
    "state",
    "states",
    "inner_state",
    "inner_states",
    "opt_state",
];

/// Segments under which an optimizer keeps parameter copies (Megatron's `fp32_param`,
/// master weights), not moments.
const PARAM_COPIES: &[&str] = &[
    "fp32_param",
    "fp32_params",
    "fp32_from_fp16_params",
    "master_param",
    "master_params",
    "master_weights",
];

/// Segments of step counters, schedules and other scalars.
const OTHER: &[&str] = &["step", "time", "count", "lr", "epoch"];

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn short_moment(s: &str) -> Option<u8> {
    SHORT.iter().find(|(w, _)| *w == s).map(|(_, k)| *k)
}

/// Whether the segment reads like a moment outside a convention (`v`, `momentum_encoder`).
fn moment_like(s: &str) -> bool {
    short_moment(s).is_some() || s.starts_with("momentum") || s.starts_with("moment")
}

impl RoleGuess {
    fn sure(role: Role, reason: &'static str) -> RoleGuess {
        RoleGuess {
            role,
            ambiguous: false,
            reason,
        }
    }

    /// Guesses the role of one tensor from its name alone (see the type's doc).
    pub fn from_name(name: &str) -> RoleGuess {
        let lower = name.to_ascii_lowercase();
        let seg: Vec<&str> = lower.split(['.', '/', ':']).collect();
        if seg.contains(&"param_groups") {
            // PyTorch's hyperparameters (`lr`, `betas`, SGD's scalar `momentum`).
            return RoleGuess::sure(Role::Other, "optimizer hyperparameter (`param_groups`)");
        }
        for &(word, k, reason) in CONVENTIONS {
            let suffix = format!("_{word}");
            if seg.iter().any(|s| *s == word || s.ends_with(&suffix)) {
                return RoleGuess::sure(Role::OptimizerMoment(k), reason);
            }
        }
        if seg
            .windows(2)
            .any(|w| w == ["momentum", "velocity"] || w == ["momentum", "buf"])
        {
            return RoleGuess::sure(
                Role::OptimizerMoment(1),
                "`momentum.velocity` / `momentum.buf` (Burn SGD, RMSprop)",
            );
        }
        // An optimizer-state path: `optimizer...` anywhere, or PyTorch's `state.<n>` first.
        let root = seg.iter().position(|s| OPTIMIZER.contains(s)).or_else(|| {
            (seg.first() == Some(&"state") && seg.get(1).is_some_and(|s| is_number(s))).then_some(0)
        });
        if let Some(root) = root
            && !seg.iter().any(|s| PARAM_COPIES.contains(s))
        {
            let next = seg[root + 1..]
                .iter()
                .find(|s| !is_number(s) && !CONTAINERS.contains(s));
            if let Some(k) = next.and_then(|s| short_moment(s)) {
                return RoleGuess::sure(
                    Role::OptimizerMoment(k),
                    "moment word under an optimizer state (Optax `mu`/`nu`)",
                );
            }
            if seg.len() > root + 1
                && let Some(k) = seg.last().and_then(|s| short_moment(s))
            {
                return RoleGuess::sure(
                    Role::OptimizerMoment(k),
                    "moment word ending an optimizer-state name",
                );
            }
        }
        if seg.iter().any(|s| OTHER.contains(s)) {
            return RoleGuess::sure(Role::Other, "step counter or schedule");
        }
        if seg.iter().any(|s| moment_like(s)) {
            return RoleGuess {
                role: Role::Weight,
                ambiguous: true,
                reason: "moment-like word outside optimizer state",
            };
        }
        RoleGuess::sure(Role::Weight, "not optimizer state")
    }

    /// Guesses the roles of a checkpoint's tensors, given as `(name, shape)` in any
    /// order; the result is in the same order.
    ///
    /// Beyond [`RoleGuess::from_name`], a tensor whose name ends in a short moment word
    /// (`X.m`, `X/v`, `X.mu`) and that has a sibling `X` of the same shape guessed a
    /// weight is guessed that weight's moment, marked ambiguous.
    pub fn for_checkpoint(tensors: &[(&str, &[u64])]) -> Vec<RoleGuess> {
        let shapes: std::collections::HashMap<&str, &[u64]> = tensors.iter().copied().collect();
        tensors
            .iter()
            .map(|&(name, shape)| {
                let guess = RoleGuess::from_name(name);
                if !guess.ambiguous {
                    return guess;
                }
                let sibling = name.rsplit_once(['.', '/', ':']).and_then(|(base, last)| {
                    let k = short_moment(&last.to_ascii_lowercase())?;
                    let base_shape = shapes.get(base)?;
                    (*base_shape == shape && RoleGuess::from_name(base).role == Role::Weight)
                        .then_some(k)
                });
                match sibling {
                    Some(k) => RoleGuess {
                        role: Role::OptimizerMoment(k),
                        ambiguous: true,
                        reason: "moment word after a weight of the same shape",
                    },
                    None => guess,
                }
            })
            .collect()
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Weight => f.write_str("weight"),
            Role::Other => f.write_str("other"),
            Role::OptimizerMoment(k) => write!(f, "moment{k}"),
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    /// Parses `weight`, `other`, `moment1`, `moment2` (also `moment_1`, `optimizer_moment1`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase().replace(['_', '-'], "");
        match lower.as_str() {
            "weight" | "weights" | "param" => Ok(Role::Weight),
            "other" => Ok(Role::Other),
            _ => {
                let k = lower
                    .strip_prefix("optimizermoment")
                    .or_else(|| lower.strip_prefix("moment"))
                    .and_then(|k| k.parse::<u8>().ok())
                    .filter(|k| (1..=15).contains(k));
                k.map(Role::OptimizerMoment)
                    .ok_or_else(|| format!("unknown role `{s}` (weight, other, moment1, moment2)"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip() {
        for r in [
            Role::Weight,
            Role::Other,
            Role::OptimizerMoment(1),
            Role::OptimizerMoment(2),
        ] {
            assert_eq!(Role::from_tag(r.tag()), Some(r));
            assert_eq!(r.to_string().parse::<Role>(), Ok(r));
        }
        assert_eq!(Role::from_tag(2), None);
        assert_eq!(Role::from_tag(0x10), None);
    }

    fn guess(name: &str) -> (Role, bool) {
        let g = RoleGuess::from_name(name);
        (g.role, g.ambiguous)
    }

    const W: (Role, bool) = (Role::Weight, false);
    const AMBIGUOUS_W: (Role, bool) = (Role::Weight, true);
    const M1: (Role, bool) = (Role::OptimizerMoment(1), false);
    const M2: (Role, bool) = (Role::OptimizerMoment(2), false);

    #[test]
    fn pytorch_and_deepspeed_optimizer_state() {
        assert_eq!(guess("state.0.exp_avg"), M1);
        assert_eq!(guess("state.0.exp_avg_sq"), M2);
        assert_eq!(guess("state.12.max_exp_avg_sq"), M2);
        assert_eq!(guess("state.0.momentum_buffer"), M1);
        assert_eq!(guess("state.3.square_avg"), M2);
        assert_eq!(guess("state.0.step"), (Role::Other, false));
        assert_eq!(guess("optimizer_state_dict.state.7.exp_avg"), M1);
        assert_eq!(guess("optimizer.param_groups.0.lr"), (Role::Other, false));
        assert_eq!(
            guess("optimizer.param_groups.0.momentum"),
            (Role::Other, false)
        );
    }

    #[test]
    fn megatron_layout() {
        let p = "decoder.layers.0.self_attention.linear_qkv.weight";
        assert_eq!(guess(&format!("optimizer.state.exp_avg.{p}")), M1);
        assert_eq!(guess(&format!("optimizer.state.exp_avg_sq.{p}")), M2);
        // The optimizer's fp32 master copy of a parameter is a weight, even one named `v`.
        assert_eq!(guess(&format!("optimizer.state.fp32_param.{p}")), W);
        assert_eq!(
            guess("optimizer.state.fp32_param.encoder.SelfAttention.v.weight"),
            AMBIGUOUS_W
        );
    }

    #[test]
    fn optax_moments_under_opt_state() {
        assert_eq!(guess("opt_state/0/mu/dense/kernel"), M1);
        assert_eq!(guess("opt_state/0/nu/dense/kernel"), M2);
        assert_eq!(
            guess("opt_state.0.mu.params.decoder.layers_0.attn.v.kernel"),
            M1
        );
        assert_eq!(guess("opt_state.1.inner_state.0.nu.params.embed"), M2);
        assert_eq!(guess("opt_state.0.count"), (Role::Other, false));
        // tools/train_series (JAX/optax, flattened as `opt.mu.<param>`).
        assert_eq!(guess("opt.mu.blocks.0.attn.qkv.weight"), M1);
        assert_eq!(guess("opt.nu.blocks.0.attn.v.weight"), M2);
        assert_eq!(guess("opt.count"), (Role::Other, false));
        assert_eq!(guess("params.blocks.0.attn.qkv.weight"), W);
        // `mu` outside optimizer state: a VAE's mean head, a weight.
        assert_eq!(guess("encoder.mu.weight"), AMBIGUOUS_W);
    }

    #[test]
    fn burn_optimizer_records() {
        assert_eq!(guess("7.momentum.moment_1"), M1);
        assert_eq!(guess("7.momentum.moment_2"), M2);
        assert_eq!(guess("optim/3.state.momentum.max_moment_2"), M2);
        assert_eq!(guess("7.momentum.velocity"), M1);
        assert_eq!(guess("7.momentum.buf"), M1);
        assert_eq!(guess("7.square_avg.square_avg"), M2);
        assert_eq!(guess("7.momentum.time"), (Role::Other, false));
    }

    #[test]
    fn model_weights_named_like_moments_are_weights() {
        // Regressions: each of these was guessed a moment (and quantized under
        // `lossy-optimizer`) when any `v`/`m` segment or `momentum` substring made one.
        assert_eq!(
            guess("encoder.block.0.layer.0.SelfAttention.v.weight"),
            AMBIGUOUS_W
        );
        assert_eq!(
            guess("decoder.block.3.layer.1.EncDecAttention.v.weight"),
            AMBIGUOUS_W
        );
        assert_eq!(guess("momentum_encoder.layer1.0.conv1.weight"), AMBIGUOUS_W);
        assert_eq!(guess("momentum_encoder.fc.bias"), AMBIGUOUS_W);
        assert_eq!(guess("blocks.2.attn.m"), AMBIGUOUS_W);
        // Never moment-like: sure weights.
        assert_eq!(guess("model.layers.0.self_attn.v_proj.weight"), W);
        assert_eq!(guess("model.layers.0.mlp.gate_proj.weight"), W);
        assert_eq!(guess("transformer.h.0.mlp.c_fc.weight"), W);
        assert_eq!(guess("model.embed.weight"), W);
        assert_eq!(guess("mlp.bias"), W);
        assert_eq!(
            Role::guess("encoder.block.0.layer.0.SelfAttention.v.weight"),
            Role::Weight
        );
    }

    #[test]
    fn siblings_of_the_same_shape_make_ambiguous_moments() {
        let (a, b) = ([8u64, 4], [4u64, 8]);
        let names = [
            ("dense.kernel", &a[..]),
            ("dense.kernel.m", &a[..]),
            ("dense.kernel.v", &a[..]),
            ("proj.kernel", &a[..]),
            ("proj.kernel.v", &b[..]),
            ("state.0.exp_avg", &a[..]),
        ];
        let g = RoleGuess::for_checkpoint(&names);
        let got: Vec<(Role, bool)> = g.iter().map(|g| (g.role, g.ambiguous)).collect();
        assert_eq!(
            got,
            [
                W,
                (Role::OptimizerMoment(1), true),
                (Role::OptimizerMoment(2), true),
                W,
                // A different shape: no sibling, an ambiguous weight.
                AMBIGUOUS_W,
                M1,
            ]
        );
        // T5's `v.weight` has no sibling named `…SelfAttention` of its shape.
        let t5 = [
            ("encoder.block.0.layer.0.SelfAttention.v.weight", &a[..]),
            ("encoder.block.0.layer.0.SelfAttention.k.weight", &a[..]),
        ];
        assert!(
            RoleGuess::for_checkpoint(&t5)
                .iter()
                .all(|g| g.role == Role::Weight)
        );
    }
}
