//! bitsnap-core: small, fast, crash-safe checkpoints for LLM training.
//!
//! A checkpoint is a set of named, typed byte [`Tensor`]s. A [`Store`] keeps a series of
//! them as snapshot files in a directory; each save is encoded by the adaptive
//! [`Policy`], tensor by tensor, against the previous snapshot:
//!
//! - [`codec::BitmaskDelta`]: a 1-bit mask of changed elements plus the changed values
//!   (XOR'd against the base, in zstd-coded byte planes): the BitSnap paper's method,
//!   for tensors where few elements changed (frozen or slowly trained parameters);
//! - [`codec::XorDelta`]: XOR with the base in zstd-coded byte planes, for tensors where
//!   most elements changed by a little;
//! - [`codec::Planes`]: byte planes + zstd without a base (first and periodic full
//!   snapshots);
//! - [`codec::ClusterQuantizer`]: k-means quantization of optimizer moments at 4, 8 or 16
//!   bits, only under [`Lossiness::LossyOptimizer`];
//! - unchanged tensors cost nothing, and no tensor is ever stored larger than raw.
//!
//! Every file is checksummed end to end and written atomically; `FORMAT.md` at the
//! repository root specifies it byte by byte. The crate has no Burn dependency:
//! `bitsnap-burn` bridges Burn's records and modules to it.
//!
//! ```
//! use bitsnap_core::{Lossiness, Policy, Role, Store, Tensor, codec::QuantBits};
//!
//! let dir = tempfile::tempdir()?;
//! let policy = Policy::default()
//!     .with_full_every(8)
//!     .with_lossiness(Lossiness::LossyOptimizer { bits: QuantBits::B8 });
//! let mut store = Store::open_or_create(dir.path(), policy)?;
//!
//! let weights: Vec<f32> = (0..4096).map(|i| (i as f32).sin()).collect();
//! let moments: Vec<f32> = (0..4096).map(|i| 1e-8 * (1 + i % 97) as f32).collect();
//! let step = |w: &[f32]| -> Result<Vec<Tensor>, bitsnap_core::Error> {
//!     Ok(vec![
//!         Tensor::from_f32("layer.weight", &[64, 64], Role::Weight, w)?,
//!         Tensor::from_f32("layer.weight.moment_2", &[64, 64], Role::OptimizerMoment(2), &moments)?,
//!     ])
//! };
//! let first = store.save("step-100", step(&weights)?)?;
//! let mut next = weights.clone();
//! next[7] += 0.5; // one element changed
//! let second = store.save("step-200", step(&next)?)?;
//! assert_eq!(second.info.base, Some(first.info.id));
//! for entry in &second.header.entries {
//!     println!("{}: {} ({} bytes)", entry.name, entry.codec, entry.len);
//! }
//!
//! let restored = Store::open(dir.path())?.load(second.info.id)?;
//! assert_eq!(restored.tensors[0].to_f32()?, next); // weights: bit-exact
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod backend;
pub mod ci;
pub mod codec;
mod dtype;
mod error;
#[cfg(feature = "fmt")]
pub mod fmt;
pub mod format;
#[cfg(unix)]
pub mod keeper;
mod policy;
pub mod references;
mod role;
pub mod safetensors;
mod store;
mod tensor;

/// Sharded snapshots (one file per writer rank, committed together); see
/// [`Store::save_shard`] and [`Store::commit_sharded`].
pub use store::shard;

pub use dtype::DType;
pub use error::Error;
pub use format::{Decision, Header};
pub use policy::{
    Alternative, BITMASK_MAX_CHANGED, DeltaVerdict, EXACT_TRIAL_BYTES, ErrorBudget,
    FIRST_MOMENT_FACTOR, Lossiness, Policy, SAMPLE_WINDOW_BYTES, SAMPLE_WINDOWS, Stage, StageRule,
    TRIAL_EXACT_BYTES, TRIAL_WINDOW_BYTES, TRIAL_WINDOWS, TrialSample, stage_keys,
};
pub use role::{Role, RoleGuess};
pub use shard::{ShardInfo, ShardReport};
pub use store::{
    BaseState, ChainLink, CompactReport, FALLBACK_DECODE_BUDGET, FullReason, LOCK_FILE,
    MANIFEST_FILE, MANIFEST_VERSION_RETAIN, MAX_MANIFEST_BYTES, PruneReport, RestoreChain,
    Retention, SaveReport, SaveTimings, Snapshot, SnapshotInfo, Store, VerifyReport,
    check_decode_budget, default_decode_budget,
};
pub use tensor::{MAX_NAME_BYTES, MAX_RANK, MAX_TENSOR_BYTES, Tensor};
