//! Every codec and baseline side by side on one series of checkpoints: size and speed,
//! measured on the same bytes in the same run.
//!
//! A series is a list of files (snapshots), oldest first. File `i`'s tensors are deltas on
//! file `i - 1`'s tensors of the same name, dtype and shape; a tensor without such a base
//! (the first file, a new tensor, a changed shape) is coded without one. Each file is fed
//! to [`Bench::push`] in turn, so only two files are held in memory at a time, and every
//! method is run on it:
//!
//! | method | what it does, per tensor |
//! |---|---|
//! | `zstd-1` | zstd (level 1 by default) over the raw bytes, one frame per tensor |
//! | `planes` | [`Planes`](bitsnap_core::codec::Planes): byte planes + zstd, no base |
//! | `xor` | [`XorDelta`](bitsnap_core::codec::XorDelta) against the previous file (`planes` where there is no base) |
//! | `bitmask` | [`BitmaskDelta`](bitsnap_core::codec::BitmaskDelta) against the previous file (`planes` where there is no base) |
//! | `bitsnap` | [`references::encode_units`](bitsnap_core::references::encode_units) and [`references::apply`](bitsnap_core::references::apply) as the [`Store`](bitsnap_core::Store) calls them (the policy's trials with casts and optimizer replay weighed beside the codecs, then copies): against what the previous snapshot decodes to, with the store's full-snapshot interval and "delta would not pay" rule |
//!
//! plus the bitmask-only size bound: a 1-bit-per-element mask and the changed elements
//! stored raw, `(numel + bits × changed) / 8` bytes per tensor, i.e. a ratio of
//! `bits / (1 + bits × p)` for a changed fraction `p` (computed over tensors that have a
//! base).
//!
//! Within a file, the tensors of each dtype are encoded (then decoded) together, on all
//! rayon threads (tensors in parallel and, inside the codecs, chunks in parallel); the
//! wall-clock time of each is recorded. Encode and decode GB/s are raw (decoded) bytes
//! divided by those seconds, with 1 GB = 10^9 bytes. Every decode is checked against its
//! input (outside the timed region); sizes are payload bytes, without container headers.
//!
//! [`Synthetic`] generates a realistic series in memory (see its docs); [`BenchReport`]
//! is the result, serialisable to JSON and printable as markdown
//! ([`BenchReport::to_markdown`]). Modules: `run` (the runner and its results),
//! `synthetic` (the generated series), `markdown` (the tables), `command` (`bitsnap
//! bench`'s arguments).
//!
//! ```
//! use bitsnap_cli::bench::{Bench, Synthetic};
//! use bitsnap_core::Policy;
//! let mut bench = Bench::new(Policy::default());
//! for (name, tensors) in Synthetic::default().with_scale(0.001).steps() {
//!     bench.push(&name, tensors).unwrap();
//! }
//! let report = bench.finish();
//! assert_eq!(report.files.len(), 5);
//! assert!(report.methods.iter().all(|m| m.stored_bytes > 0));
//! assert!(report.to_markdown().contains("| bitsnap"));
//! ```

pub(crate) mod command;
pub(crate) mod io;
mod markdown;
mod run;
mod synthetic;

pub use run::{
    Bench, BenchReport, BestBaseline, BoundResult, DTypeResult, FileResult, MAX_FILE_OVER_BASELINE,
    Method, MethodResult, MethodSummary, RoleResult, WholeFileResult, policy_label,
    whole_file_zstd,
};
pub use synthetic::{SYNTHETIC_LAYERS, Synthetic, SyntheticSteps};
