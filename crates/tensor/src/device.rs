//! Where a tensor lives: the CPU, or a GPU through the CUDA backend (`crate::cuda`). Asking for a
//! GPU that this machine does not have is an error that says why, never a panic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use whale_kernels::cuda::Gpu;

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// The `ordinal`-th GPU, opened (context, stream, kernels) at first use; an error when the
    /// machine has no CUDA driver or no such GPU.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        gpu(ordinal)?;
        Ok(Device::Cuda(ordinal))
    }

    /// Whether GPU `ordinal` can be opened (false without a CUDA driver).
    pub fn cuda_is_available(ordinal: usize) -> bool {
        ordinal < whale_kernels::cuda::device_count()
    }

    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// The GPU behind a CUDA device, shared by every tensor on it: its kernel choices
    /// ([`Gpu::set_attention_kernels`], [`Gpu::set_fp8_gemm_kernel`]) apply to all of them. An
    /// error for the CPU.
    pub fn gpu(&self) -> Result<Arc<Gpu>> {
        match self {
            Device::Cpu => Err(Error::DeviceUnavailable { device: *self, why: "the CPU is not a GPU".into() }),
            Device::Cuda(i) => gpu(*i),
        }
    }

    /// Errors unless this device can run ops in this process.
    pub(crate) fn check_available(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(i) => gpu(*i).map(|_| ()),
        }
    }
}

/// The open GPU `ordinal`, shared by every tensor on it.
pub(crate) fn gpu(ordinal: usize) -> Result<Arc<Gpu>> {
    static OPEN: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
    // A panic while a GPU opened (a driver symbol cudarc could not load) leaves the map as it
    // was: the lock is taken back rather than failing every later op.
    let mut open = OPEN.get_or_init(Default::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(g) = open.get(&ordinal) {
        return Ok(g.clone());
    }
    let g = Arc::new(
        Gpu::new(ordinal)
            .map_err(|e| Error::DeviceUnavailable { device: Device::Cuda(ordinal), why: e.to_string() })?,
    );
    open.insert(ordinal, g.clone());
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_has_no_gpu_to_hand_out() {
        let err = Device::Cpu.gpu().unwrap_err().to_string();
        assert!(err.contains("not a GPU"), "{err}");
    }
}
