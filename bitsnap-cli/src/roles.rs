//! Tensor roles of foreign files: `--role REGEX=ROLE` rules (the first rule whose regex
//! matches a tensor name sets its role), else a guess from the names
//! ([`RoleGuess::for_checkpoint`]), and what a lossy policy does with them.

use std::collections::HashMap;

use bitsnap_core::safetensors::Index;
use bitsnap_core::{Role, RoleGuess};
use regex::Regex;

use crate::error::CliError;

/// One `--role` rule.
#[derive(Debug, Clone)]
pub struct RoleRule {
    /// Matched anywhere in the tensor name (anchor with `^…$` for a whole-name match).
    pub regex: Regex,
    /// The role given to matching tensors.
    pub role: Role,
}

/// Parses `REGEX=ROLE`; the split is at the last `=`, so the regex may contain `=`.
pub fn parse_rule(spec: &str) -> Result<RoleRule, String> {
    let (re, role) = spec
        .rsplit_once('=')
        .ok_or_else(|| format!("`{spec}` is not REGEX=ROLE"))?;
    let role: Role = role.parse()?;
    let regex = Regex::new(re).map_err(|e| {
        let msg = e.to_string();
        let last = msg.lines().last().unwrap_or("invalid regex").trim();
        let last = last.strip_prefix("error: ").unwrap_or(last);
        format!("invalid regex `{re}`: {last}")
    })?;
    Ok(RoleRule { regex, role })
}

/// The role the first matching rule gives `name`, if any.
pub fn role_for(rules: &[RoleRule], name: &str) -> Option<Role> {
    rules
        .iter()
        .find(|r| r.regex.is_match(name))
        .map(|r| r.role)
}

/// The role of every tensor of a series of files.
#[derive(Debug, Default)]
pub struct Resolved {
    roles: HashMap<String, Role>,
    /// Tensors no rule matched, with their guess, in first-seen order.
    guessed: Vec<(String, RoleGuess)>,
}

/// Resolves the roles of the tensors of `files` (checked headers, oldest first): the
/// first matching rule, else the guess over the tensors of the file where the name is
/// first seen.
pub fn resolve(rules: &[RoleRule], files: &[Index]) -> Resolved {
    let mut out = Resolved::default();
    for index in files {
        let names: Vec<(&str, &[u64])> = index
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect();
        let guesses = RoleGuess::for_checkpoint(&names);
        for ((name, _), guess) in names.into_iter().zip(guesses) {
            if out.roles.contains_key(name) {
                continue;
            }
            let role = match role_for(rules, name) {
                Some(role) => role,
                None => {
                    out.guessed.push((name.to_string(), guess));
                    guess.role
                }
            };
            out.roles.insert(name.to_string(), role);
        }
    }
    out
}

impl Resolved {
    /// The role of tensor `name`, if it is in the files.
    pub fn role(&self, name: &str) -> Option<Role> {
        self.roles.get(name).copied()
    }

    /// Before a lossy pack: refuses (a usage error) when a tensor was guessed a moment
    /// only ambiguously, else lists on stderr the tensors guessed moments (they will be
    /// quantized) and counts those with moment-like names kept as weights.
    pub fn check_lossy(&self) -> Result<(), CliError> {
        let ambiguous: Vec<String> = self
            .guessed
            .iter()
            .filter(|(_, g)| g.ambiguous && g.role.is_moment())
            .map(|(n, g)| format!("`{n}` (guessed {}: {})", g.role, g.reason))
            .collect();
        if !ambiguous.is_empty() {
            return Err(CliError::Usage(format!(
                "refusing to quantize under --policy lossy-optimizer: the role of {} tensors is \
                 ambiguous: {}; say what they are with --role REGEX=ROLE (moment1, moment2 or \
                 weight)",
                ambiguous.len(),
                ambiguous.join(", ")
            )));
        }
        let moments: Vec<&(String, RoleGuess)> = self
            .guessed
            .iter()
            .filter(|(_, g)| g.role.is_moment())
            .collect();
        if !moments.is_empty() {
            eprintln!(
                "bitsnap: lossy-optimizer: {} tensors guessed optimizer moments will be quantized (--role REGEX=ROLE overrides):",
                moments.len()
            );
            for (name, g) in moments {
                eprintln!("bitsnap:   {}  {name}  ({})", g.role, g.reason);
            }
        }
        let kept: Vec<&str> = self
            .guessed
            .iter()
            .filter(|(_, g)| g.ambiguous && !g.role.is_moment())
            .map(|(n, _)| n.as_str())
            .collect();
        if let Some(first) = kept.first() {
            eprintln!(
                "bitsnap: note: {} tensors with moment-like names outside optimizer state (first: `{first}`) are kept lossless as weights",
                kept.len()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_match_wins() {
        let rules = vec![
            parse_rule(r"^opt\..*\.a=moment1").unwrap(),
            parse_rule(r"\.a$=moment2").unwrap(),
            parse_rule("x=y=other").unwrap(),
        ];
        assert_eq!(role_for(&rules, "opt.0.a"), Some(Role::OptimizerMoment(1)));
        assert_eq!(role_for(&rules, "w.a"), Some(Role::OptimizerMoment(2)));
        assert_eq!(role_for(&rules, "ax=y"), Some(Role::Other));
        assert_eq!(role_for(&rules, "w"), None);
        assert!(parse_rule("w=bogus").is_err());
        assert!(parse_rule("(=weight").is_err());
        assert!(parse_rule("weight").is_err());
    }

    fn index(names: &[(&str, &[u64])]) -> Index {
        Index {
            tensors: names
                .iter()
                .map(|(n, shape)| bitsnap_core::safetensors::IndexEntry {
                    name: n.to_string(),
                    dtype: bitsnap_core::DType::F32,
                    shape: shape.to_vec(),
                    offset: 0,
                    len: 0,
                })
                .collect(),
            metadata: Default::default(),
        }
    }

    #[test]
    fn rules_then_guesses_and_ambiguous_moments_refuse() {
        let s = [4u64, 4];
        let files = [index(&[
            ("dense.kernel", &s),
            ("dense.kernel.m", &s),
            ("state.0.exp_avg", &s),
            ("encoder.block.0.layer.0.SelfAttention.v.weight", &s),
        ])];
        let r = resolve(&[], &files);
        assert_eq!(r.role("dense.kernel.m"), Some(Role::OptimizerMoment(1)));
        assert_eq!(r.role("state.0.exp_avg"), Some(Role::OptimizerMoment(1)));
        assert_eq!(
            r.role("encoder.block.0.layer.0.SelfAttention.v.weight"),
            Some(Role::Weight)
        );
        assert_eq!(r.role("missing"), None);
        let e = r.check_lossy().unwrap_err();
        assert_eq!(e.exit_code(), crate::EXIT_USAGE);
        assert!(
            e.to_string().contains("`dense.kernel.m` (guessed moment1"),
            "{e}"
        );
        // A rule settles it either way.
        for rule in [r"\.m$=moment1", r"\.m$=weight"] {
            let r = resolve(&[parse_rule(rule).unwrap()], &files);
            r.check_lossy().unwrap();
        }
    }
}
