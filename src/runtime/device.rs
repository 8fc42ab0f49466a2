//! Where a stage's tensors live: the one `DeviceChoice` of every config
//! section (`pretrain.run.device`, `embed.device`, `downstream.run.device`), turned
//! into a libtorch device with the reason logged, so a GPU node that trains
//! on the CPU says why instead of doing it silently.
use std::sync::Once;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::Device;

/// A config's `device` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    /// The first CUDA device when libtorch sees one, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl DeviceChoice {
    /// The device this choice stands for; `key` is the config key it was
    /// read from (e.g. "pretrain.device"), for the log line and the error.
    pub fn resolve(self, key: &str) -> Result<Device> {
        let cuda = tch::Cuda::is_available();
        let device = match (self, cuda) {
            (DeviceChoice::Cpu, _) => Device::Cpu,
            (DeviceChoice::Auto | DeviceChoice::Cuda, true) => Device::Cuda(0),
            (DeviceChoice::Auto, false) => Device::Cpu,
            (DeviceChoice::Cuda, false) => bail!(
                "{key} is cuda, but libtorch sees no CUDA device ({}); run `med3d doctor` for the details, or set {key}: cpu",
                no_cuda_reason()
            ),
        };
        let why = match (self, device) {
            (DeviceChoice::Cpu, _) => format!("{key} is cpu"),
            (_, Device::Cuda(_)) => format!(
                "{key} is {}, and libtorch sees {} CUDA device(s)",
                self.name(),
                tch::Cuda::device_count()
            ),
            _ => {
                warn_cpu_fallback_once(key);
                format!("{key} is auto and libtorch sees no CUDA device ({})", no_cuda_reason())
            }
        };
        tracing::info!("device {device:?}: {why}");
        Ok(device)
    }

    fn name(self) -> &'static str {
        match self {
            DeviceChoice::Auto => "auto",
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
        }
    }
}

/// Why libtorch has no CUDA device: its CUDA library is missing from this
/// process, or it is there and finds no GPU (or no driver).
pub fn no_cuda_reason() -> String {
    let facts = super::torch::Facts::read();
    match (facts.cuda_compiled, &facts.cuda_library) {
        (false, None) => "this libtorch is a CPU-only build".to_string(),
        (_, None) => "libtorch_cuda is not loaded in this process (a build that dropped it: see `med3d doctor`)".to_string(),
        (_, Some(_)) => match super::torch::driver() {
            Ok(d) if d.devices.is_empty() => format!("the NVIDIA driver {} reports no GPU", d.version),
            Ok(d) => format!(
                "the driver {} lists {} GPU(s), but the CUDA runtime cannot use them (CUDA_VISIBLE_DEVICES, or a driver too old for CUDA {})",
                d.version,
                d.devices.len(),
                facts.cuda_runtime.as_deref().unwrap_or("?")
            ),
            Err(e) => format!("{e}"),
        },
    }
}

/// `device: auto` on a CUDA-capable libtorch that finds no GPU: said once
/// per process, as a warning, since it is usually a mistake on a GPU node.
fn warn_cpu_fallback_once(key: &str) {
    static ONCE: Once = Once::new();
    let facts = super::torch::Facts::read();
    if facts.cuda_library.is_some() {
        ONCE.call_once(|| {
            tracing::warn!(
                "{key} is auto: this libtorch has CUDA but sees no CUDA device ({}), so this runs on the CPU",
                no_cuda_reason()
            )
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_names_are_the_config_values() {
        for (c, s) in [
            (DeviceChoice::Auto, "auto"),
            (DeviceChoice::Cpu, "cpu"),
            (DeviceChoice::Cuda, "cuda"),
        ] {
            assert_eq!(serde_json::to_string(&c).unwrap(), format!("\"{s}\""));
            assert_eq!(c.name(), s);
        }
    }

    #[test]
    fn cpu_is_cpu_and_cuda_without_a_device_names_the_key() {
        assert_eq!(DeviceChoice::Cpu.resolve("x.device").unwrap(), Device::Cpu);
        if !tch::Cuda::is_available() {
            let e = DeviceChoice::Cuda.resolve("downstream.device").unwrap_err().to_string();
            assert!(e.contains("downstream.device is cuda"), "{e}");
            assert_eq!(DeviceChoice::Auto.resolve("x.device").unwrap(), Device::Cpu);
        }
    }
}
