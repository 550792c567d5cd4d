//! whale-kernels: raw compute on slices with explicit shapes.
//!
//! Every function here takes plain `&[f32]` buffers in row-major contiguous layout plus the sizes
//! that give them meaning, and knows nothing of tensors, autograd or devices. `whale-tensor` calls
//! these; the CUDA launchers ([`cuda`], over the PTX of `kernels/*.cu`) sit beside them with the
//! same shapes, so each GPU kernel has a CPU twin to be checked against.
//!
//! Parallel work uses rayon with a partition that depends only on the sizes, never on timing, so a
//! run with the same thread count is bit-identical.

pub mod cpu;
pub mod cuda;
