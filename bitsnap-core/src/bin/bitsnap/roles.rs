//! `--role REGEX=ROLE` rules: the first rule whose regex matches a tensor name sets its role.

use bitsnap_core::Role;
use regex::Regex;

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
}
