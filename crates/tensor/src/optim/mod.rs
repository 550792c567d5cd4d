//! Optimizers and what goes with them: AdamW, gradient-norm clipping, learning-rate schedules,
//! and the parameters' exponential moving average.

mod adamw;
mod clip;
mod ema;
mod schedule;

pub use adamw::{read_step, step_tensor, AdamW, AdamWConfig};
pub use clip::{clip_grad_norm, grad_norm};
pub use ema::Ema;
pub use schedule::{Constant, DeepSeekV3Schedule, LrSchedule, WarmupCosine};
