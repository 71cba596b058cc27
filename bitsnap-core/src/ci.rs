//! Whether the process runs under continuous integration, where no test may skip.
//!
//! Tests that need something of the machine (a tmpfs mount, an S3 test server, a wgpu
//! adapter) skip with a note on a developer's machine that lacks it, and fail under CI.
//! CI systems spell the variable differently (`CI=true`, `CI=1`), so the rule is: `CI` set
//! to anything but empty, `0` or `false` (any case) means every test must run.
//!
//! ```
//! // The decision is a pure function of the variable's value:
//! assert!(bitsnap_core::ci::required_by("true"));
//! assert!(bitsnap_core::ci::required_by("1"));
//! assert!(!bitsnap_core::ci::required_by("false"));
//! assert!(!bitsnap_core::ci::required_by(""));
//! ```

/// `true` when the `CI` environment variable says every test must run (see the module doc).
pub fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| required_by(&v))
}

/// The rule applied to one value of `CI`.
pub fn required_by(value: &str) -> bool {
    let v = value.trim();
    !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false"))
}

#[cfg(test)]
mod tests {
    use super::required_by;

    #[test]
    fn ci_values() {
        for yes in ["1", "true", "TRUE", "yes", "github"] {
            assert!(required_by(yes), "{yes}");
        }
        for no in ["", " ", "0", "false", "False"] {
            assert!(!required_by(no), "{no:?}");
        }
    }
}
