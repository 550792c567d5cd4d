//! Where a tensor lives. CPU always; CUDA once the CUDA issue lands — until then asking for a GPU
//! is an error that says why, never a panic.

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// The `ordinal`-th GPU. This build has no CUDA backend, so it always returns an error.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        Err(Error::DeviceUnavailable {
            device: Device::Cuda(ordinal),
            why: "whale was built without a CUDA backend (it arrives with the `cuda` feature)".into(),
        })
    }

    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    /// Errors unless this device can run ops in this build.
    pub(crate) fn check_available(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(i) => Device::cuda(*i).map(|_| ()),
        }
    }
}
