//! whale-parallel: communicators (in-process threads, NCCL), data, expert and pipeline parallelism
//! (1F1B, ZB1P, DualPipe, DualPipeV), the schedule simulator, and the training engine (`Trainer`).
//!
//! Filled by the training-engine and parallel issues; today it only re-exports the model crate.

pub use whale_model as model;
