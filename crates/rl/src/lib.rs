//! whale-rl: the training methodology — procedurally generated reasoning tasks with verifiers
//! ([`tasks`]), evaluation (pass@1, pass@k, cons@k: [`eval`]), rollouts and their log-probs
//! ([`rollout`]), rule-based rewards ([`rewards`]), GRPO ([`grpo`]) and the PPO baseline
//! ([`ppo`]), supervised fine-tuning and rejection sampling ([`sft`]), and a Bradley-Terry reward
//! model ([`reward_model`]): the pieces the CLI's R1-Zero, R1 and distillation jobs are made of.
//!
//! Everything runs where the policy lives (`CausalLm::device`): on a GPU the models sample,
//! score and train there, while rewards, advantages and packing are host work whose per-token
//! tensors are made on the policy's device.

pub mod data;
pub mod eval;
pub mod grpo;
pub mod ppo;
pub mod reward_model;
pub mod rewards;
pub mod rollout;
pub mod sft;
pub mod tasks;

pub use whale_parallel as parallel;

use whale_parallel::model::tensor::optim::clip_grad_norm;
use whale_parallel::model::tensor::ParamStore;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("task: {0}")]
    Task(String),
    #[error("rl: {0}")]
    Rl(String),
    #[error(transparent)]
    Parallel(#[from] whale_parallel::Error),
    #[error(transparent)]
    Model(#[from] whale_parallel::model::Error),
    #[error(transparent)]
    Tensor(#[from] whale_parallel::model::tensor::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Clips `params`' gradients to `max_norm` and returns their norm before clipping. A non-finite
/// norm drops the gradients and is an error naming `at` (the update would write NaN into every
/// weight).
pub fn clip_finite(params: &ParamStore, max_norm: f64, at: impl FnOnce() -> String) -> Result<f64> {
    let norm = clip_grad_norm(params, max_norm)?;
    if !norm.is_finite() {
        params.zero_grad();
        return Err(Error::Rl(format!("{}: non-finite gradient norm ({norm})", at())));
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use whale_parallel::model::tensor::{Device, Tensor};

    #[test]
    fn a_non_finite_gradient_norm_is_an_error_that_drops_the_gradients() {
        let mut params = ParamStore::new();
        let v = |x: Vec<f32>| Tensor::from_vec(x, &[2], &Device::Cpu).unwrap();
        let w = params.insert("w", &v(vec![1.0, 2.0])).unwrap();
        w.set_grad(Some(v(vec![3.0, 4.0]))).unwrap();
        assert_eq!(clip_finite(&params, 1.0, || unreachable!()).unwrap(), 5.0);
        let g = w.grad().unwrap().to_vec_f32().unwrap();
        assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6, "{g:?}");
        w.set_grad(Some(v(vec![f32::INFINITY, 1.0]))).unwrap();
        let err = clip_finite(&params, 1.0, || "SFT step 3".into()).unwrap_err().to_string();
        assert!(err.contains("SFT step 3") && err.contains("non-finite"), "{err}");
        assert!(w.grad().is_none(), "no update can use them");
    }
}
