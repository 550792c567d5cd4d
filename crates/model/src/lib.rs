//! whale-model: the DeepSeek-V3 architecture — Multi-head Latent Attention, DeepSeekMoE with
//! auxiliary-loss-free balancing, Multi-Token Prediction — trained with whale-tensor's autograd,
//! loaded from and saved to HF checkpoints.
//!
//! Modules: [`config`] (HF `config.json`, presets, parameter counts), [`nn`] (linear, RMSNorm,
//! SwiGLU, RoPE/YaRN, the parameter builder), [`mla`], [`moe`] (router, experts, balancing),
//! [`mtp`], [`block`] (decoder layer), [`deepseek_v3`] (the model), [`checkpoint`] (safetensors).

pub mod block;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod deepseek_v3;
pub mod dense;
pub mod error;
pub mod generate;
pub mod lm;
pub mod mla;
pub mod moe;
pub mod mtp;
pub mod nn;
pub mod speculative;
pub mod testing;
pub mod tokenizer;

pub use config::{DeepSeekV3Config, ParamCounts, RopeScaling};
pub use deepseek_v3::{DeepSeekV3, ForwardOutput, StageOutput, IGNORE_INDEX};
pub use dense::{DenseConfig, DenseModel};
pub use error::{Error, Result};
pub use generate::CausalLm;
pub use lm::{load_pretrained, moved_to};
pub use whale_tensor as tensor;
