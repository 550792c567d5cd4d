//! whale-rl: the training methodology — procedurally generated reasoning tasks with verifiers
//! ([`tasks`]), evaluation (pass@1, pass@k, cons@k: [`eval`]); rewards, GRPO, PPO, SFT, rejection
//! sampling, distillation and the R1 pipelines arrive with their issues.

pub mod data;
pub mod eval;
pub mod tasks;

pub use whale_parallel as parallel;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("task: {0}")]
    Task(String),
    #[error(transparent)]
    Model(#[from] whale_parallel::model::Error),
    #[error(transparent)]
    Tensor(#[from] whale_parallel::model::tensor::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
