//! whale-model: the DeepSeek-V3 architecture (Multi-head Latent Attention, DeepSeekMoE with
//! auxiliary-loss-free balancing, Multi-Token Prediction), dense Llama/Qwen2 students, HF configs
//! and checkpoints, tokenizers and generation.
//!
//! Built on `whale-tensor`. The model issue fills it; today it only re-exports the tensor crate so
//! the layers above compile against one path.

pub use whale_tensor as tensor;
