//! End-to-end scenarios of bitsnap that cross crates, each a `[[test]]` target of this
//! package (`cargo test -p bitsnap-e2e`):
//!
//! - `train_save_restore`: a small model trained in Burn (flex), saved by a
//!   [`bitsnap_burn::StepSaver`] as a delta chain, verified and decoded by a
//!   [`bitsnap_core::Store`] bit for bit, restored onto wgpu by
//!   [`bitsnap_burn::gpu::DeviceLoader`] equal to the CPU decode, and resumed bit for bit.
//!
//! - `keeper_kill`: a trainer child process (dropout, a shuffled loader, every-step
//!   snapshots handed to a keeper) is SIGKILLed mid-run; the restarted trainer restores
//!   from the keeper's memory (nothing on disk yet), continues bit for bit; with the
//!   keeper gone it restores from disk; `bitsnap prune`/`rm` on the resulting delta chain.
//!
//! This library holds what the scenarios share: [`wgpu`] and the small training setup of
//! [`train`].
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod train;

use std::sync::OnceLock;

use burn::tensor::Device;

/// The wgpu device (Mesa's lavapipe in CI), initialised once per test binary: wgpu can
/// be initialised only once per process.
///
/// `None`, with a note on stderr, on a machine without a wgpu adapter; where every test
/// must run ([`bitsnap_core::ci::required`]) a missing adapter panics instead.
pub fn wgpu() -> Option<Device> {
    static DEVICE: OnceLock<Option<Device>> = OnceLock::new();
    DEVICE
        .get_or_init(|| match Device::wgpu_options().init() {
            Ok(d) => Some(d),
            Err(e) => {
                assert!(
                    !bitsnap_core::ci::required(),
                    "CI is set but no wgpu adapter was found (is mesa-vulkan-drivers installed?): {e}"
                );
                eprintln!("no wgpu adapter ({e}): the GPU restore step is not run");
                None
            }
        })
        .clone()
}
