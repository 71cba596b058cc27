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

    /// Guesses the role of a tensor in a foreign file from its name.
    ///
    /// Optimizer state names used by PyTorch (`exp_avg`, `exp_avg_sq`, `momentum_buffer`),
    /// Burn (`moment_1`, `moment_2`), Optax (`mu`, `nu`) and others are recognised as
    /// moments; step counters as [`Role::Other`]; everything else as [`Role::Weight`].
    /// Callers that know better pass roles explicitly.
    pub fn guess(name: &str) -> Role {
        let lower = name.to_ascii_lowercase();
        let segments: Vec<&str> = lower.split(['.', '/', ':']).collect();
        let has = |s: &str| segments.contains(&s);
        let contains = |s: &str| lower.contains(s);
        if contains("exp_avg_sq")
            || contains("moment_2")
            || contains("moment2")
            || contains("second_moment")
            || contains("sum_sq")
            || has("nu")
            || has("v")
        {
            Role::OptimizerMoment(2)
        } else if contains("exp_avg")
            || contains("moment_1")
            || contains("moment1")
            || contains("first_moment")
            || contains("momentum")
            || has("mu")
            || has("m")
        {
            Role::OptimizerMoment(1)
        } else if has("step") || has("time") || has("count") || has("lr") || has("epoch") {
            Role::Other
        } else {
            Role::Weight
        }
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

    #[test]
    fn guesses_common_names() {
        assert_eq!(Role::guess("state.0.exp_avg"), Role::OptimizerMoment(1));
        assert_eq!(Role::guess("state.0.exp_avg_sq"), Role::OptimizerMoment(2));
        assert_eq!(
            Role::guess("state.0.momentum_buffer"),
            Role::OptimizerMoment(1)
        );
        assert_eq!(
            Role::guess("opt_state/0/mu/dense/kernel"),
            Role::OptimizerMoment(1)
        );
        assert_eq!(
            Role::guess("opt_state/0/nu/dense/kernel"),
            Role::OptimizerMoment(2)
        );
        assert_eq!(Role::guess("state.0.step"), Role::Other);
        assert_eq!(Role::guess("model.embed.weight"), Role::Weight);
        assert_eq!(Role::guess("mlp.bias"), Role::Weight);
    }
}
