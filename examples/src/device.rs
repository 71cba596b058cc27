//! Which device trains: a wgpu GPU when one is present, the CPU (Burn's flex backend)
//! otherwise.

use burn::tensor::Device;
use burn::tensor::wgpu::wgpu;

use crate::Error;

/// What `--device` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// A wgpu GPU if the system has one (a CPU rasteriser such as Mesa's lavapipe does not
    /// count), else the CPU.
    Auto,
    /// The CPU, through Burn's flex backend.
    Cpu,
    /// wgpu's default adapter, whatever it is (fails without one).
    Wgpu,
}

/// The device chosen and why, in words.
#[derive(Debug, Clone)]
pub struct Chosen {
    /// The training device (with autodiff).
    pub device: Device,
    /// What it is, for the reader: `wgpu: NVIDIA H100 (DiscreteGpu, Vulkan)` or `cpu (flex)`.
    pub name: String,
    /// Why it was chosen.
    pub reason: String,
}

fn cpu(reason: String) -> Chosen {
    Chosen {
        device: Device::flex().autodiff(),
        name: "cpu (flex)".into(),
        reason,
    }
}

/// Picks the device. wgpu is initialised at most once, first (a later initialisation
/// would fail once any tensor operation started its runtime).
pub fn choose(choice: DeviceChoice) -> Result<Chosen, Error> {
    if choice == DeviceChoice::Cpu {
        return Ok(cpu("--device cpu".into()));
    }
    match Device::wgpu_options().init_with_setup() {
        Ok((device, setup)) => {
            let info = setup.adapter.get_info();
            let name = format!(
                "wgpu: {} ({:?}, {:?})",
                info.name, info.device_type, setup.backend
            );
            if choice == DeviceChoice::Auto && info.device_type == wgpu::DeviceType::Cpu {
                return Ok(cpu(format!(
                    "the only wgpu adapter, {}, is a CPU rasteriser; --device wgpu forces it",
                    info.name
                )));
            }
            let reason = match choice {
                DeviceChoice::Wgpu => "--device wgpu".into(),
                _ => "a GPU adapter is present".into(),
            };
            Ok(Chosen {
                device: device.autodiff(),
                name,
                reason,
            })
        }
        Err(e) if choice == DeviceChoice::Auto => Ok(cpu(format!("no wgpu adapter ({e})"))),
        Err(e) => Err(Error::Device(e.to_string())),
    }
}
