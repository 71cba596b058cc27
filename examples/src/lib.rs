//! Runnable examples of bitsnap with Burn 0.22, and the pieces they share.
//!
//! - `finetune-gpt` (the README's main command): a byte-level GPT pretrained on four
//!   Shakespeare tragedies, then fine-tuned on the sonnets with its lower half frozen;
//!   checkpoints every N steps through [`bitsnap_burn::StepSaver`], a simulated crash,
//!   a restore from disk and a check that the restored run replays the lost steps
//!   exactly; a summary table ([`finetune::Summary`]) and a plot ([`plot`]). Dropout is
//!   on and the batches come from a shuffled loader ([`loader`]): both generators' states
//!   travel with each snapshot. `--keeper` runs the crash in real processes ([`keeper`]):
//!   the trainer is SIGKILLed and restores from a keeper's memory. `--compare` measures
//!   what checkpointing every 1/10/100 steps costs, bitsnap beside Burn's own.
//! - `learner`: bitsnap in Burn's `SupervisedTraining`, one line, resumed with
//!   `.checkpoint(epoch)`.
//! - `custom-loop`: a hand-written loop with the step API and a restore.
//!
//! ```text
//! cargo run --release -p bitsnap-examples --bin finetune-gpt
//! ```
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod corpus;
pub mod device;
mod error;
pub mod fidelity;
pub mod finetune;
pub mod gpt;
pub mod keeper;
pub mod loader;
pub mod plot;
pub mod report;

pub use error::Error;
