//! The tensor crate's error type: every failure names the op and what was expected vs found.

use crate::{DType, Device};

/// Errors from tensor construction, ops, autograd and optimizers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: shape mismatch: {lhs:?} vs {rhs:?}")]
    ShapeMismatch { op: &'static str, lhs: Vec<usize>, rhs: Vec<usize> },

    #[error("{op}: cannot broadcast {from:?} to {to:?}")]
    Broadcast { op: &'static str, from: Vec<usize>, to: Vec<usize> },

    #[error("{op}: dtype mismatch: {lhs:?} vs {rhs:?}")]
    DTypeMismatch { op: &'static str, lhs: DType, rhs: DType },

    #[error("{op}: unsupported dtype {dtype:?} ({why})")]
    UnsupportedDType { op: &'static str, dtype: DType, why: &'static str },

    #[error("{op}: dimension {dim} out of range for a tensor of rank {rank}")]
    DimOutOfRange { op: &'static str, dim: usize, rank: usize },

    #[error("{op}: index {index} out of range for size {size}")]
    IndexOutOfRange { op: &'static str, index: i64, size: usize },

    #[error("{op}: {msg}")]
    InvalidArgument { op: &'static str, msg: String },

    #[error("device {device:?} is not available: {why}")]
    DeviceUnavailable { device: Device, why: String },

    #[error("{op}: tensors on different devices: {lhs:?} vs {rhs:?}")]
    DeviceMismatch { op: &'static str, lhs: Device, rhs: Device },

    #[error("{op}: no CUDA kernel for this op yet; move the tensor with to_device(&Device::Cpu)")]
    NoCudaKernel { op: &'static str },

    #[error("backward: {0}")]
    Backward(String),

    #[error("data length {len} does not match shape {shape:?} ({expected} elements)")]
    DataLength { len: usize, shape: Vec<usize>, expected: usize },

    #[error("parameter store: {0}")]
    Params(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidArgument { op, msg: msg.into() }
    }
}
