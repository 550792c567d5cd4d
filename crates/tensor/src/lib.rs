//! whale-tensor: the `Tensor` (a cheap handle over shared storage and a strided layout), its ops,
//! reverse-mode autograd with a split (input-first, weights-later) backward, named parameters,
//! AdamW with gradient clipping and learning-rate schedules, and a seedable RNG.
//!
//! Modules:
//! - [`tensor`]: the handle, constructors, reading and writing values, variables and gradients.
//! - `ops/`: elementwise, reductions, matmul, views and shape ops, indexing, fused NN ops.
//! - [`fp8`]: fine-grained FP8 quantization and the FP8 linear layer (Fprop/Dgrad/Wgrad in FP8).
//! - [`backprop`]: the backward pass and ZeroBubble's B/W split. [`mod@checkpoint`]: activation
//!   recomputation.
//! - [`params`]: the named parameter store. [`optim`]: AdamW, clipping, schedules.
//! - [`layout`], [`storage`], [`dtype`], [`device`], [`rng`], [`error`].
//!
//! Every op computes in f32 on the CPU kernels of `whale-kernels`; bf16/f16/FP8 are storage formats.
//! Tensors on `Device::Cuda` keep f32 or bf16 values (or FP8 codes) on the GPU, where the ops run
//! on the CUDA kernels (`cuda/`); what the GPU does not hold is an error that names the op.

pub mod backprop;
pub mod checkpoint;
mod cuda;
pub mod device;
pub mod dtype;
pub mod error;
pub mod fp8;
pub mod layout;
mod ops;
pub mod optim;
pub mod params;
pub mod rng;
pub mod storage;
pub mod tensor;
pub mod testing;

pub use backprop::{is_grad_enabled, no_grad, BackwardOp, NoGradGuard, WeightGradWork};
pub use checkpoint::checkpoint;
pub use device::Device;
pub use dtype::DType;
pub use error::{Error, Result};
pub use ops::dispatch::{DispatchPlan, TokenDispatch};
pub use ops::nn::{rope_inv_freq, rope_tables, AttnShape, RopeLayout};
pub use params::ParamStore;
pub use rng::Rng;
pub use tensor::{Tensor, TensorId, WithDType};
