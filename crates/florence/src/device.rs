//! Where tensors live: `--device cpu|cuda|cuda:N|auto`.

use std::str::FromStr;

use candle_core::Device;

use crate::error::{Error, Result};

/// A device as the user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The first CUDA GPU when this build has CUDA and one is present, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The CUDA GPU of this ordinal.
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| Error::usage(format!("unknown device {s:?}; expected cpu, cuda, cuda:N or auto"))),
        }
    }
}

impl DeviceChoice {
    /// Opens the device, with a one-line description of what was chosen (`CUDA GPU 0`, `CPU`).
    pub fn open(self) -> Result<(Device, String)> {
        match self {
            Self::Cpu => Ok((Device::Cpu, "CPU".into())),
            Self::Auto if !candle_core::utils::cuda_is_available() => {
                Ok((Device::Cpu, "CPU (this build has no CUDA support)".into()))
            }
            Self::Auto => match Device::new_cuda(0) {
                Ok(d) => Ok((d, "CUDA GPU 0".into())),
                Err(e) => Ok((Device::Cpu, format!("CPU (no usable CUDA GPU: {e})"))),
            },
            Self::Cuda(n) if !candle_core::utils::cuda_is_available() => Err(Error::unsupported(format!(
                "--device cuda:{n}: this florence was built without CUDA; build it with tools/cuda/build.sh \
                 (README, \"Install\") or use --device cpu"
            ))),
            Self::Cuda(n) => Device::new_cuda(n)
                .map(|d| (d, format!("CUDA GPU {n}")))
                .map_err(|e| Error::unsupported(format!("--device cuda:{n}: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_cuda_needs_the_feature() {
        assert_eq!("cuda:3".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(3));
        assert_eq!("cuda".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(0));
        assert!("gpu"
            .parse::<DeviceChoice>()
            .unwrap_err()
            .to_string()
            .contains("expected cpu, cuda"));
        assert!(DeviceChoice::Cpu.open().unwrap().0.is_cpu());
        if !cfg!(feature = "cuda") {
            assert!(DeviceChoice::Auto.open().unwrap().0.is_cpu());
            let err = DeviceChoice::Cuda(0).open().unwrap_err().to_string();
            assert!(err.contains("built without CUDA"), "{err}");
        }
    }
}
