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
