//! whale-rl: the training methodology — procedurally generated reasoning tasks, rule-based rewards,
//! rollouts, GRPO, PPO, SFT, rejection sampling, distillation and the R1-Zero / R1 pipelines.
//!
//! Filled by the tasks, GRPO and R1 issues; today it only re-exports the parallel crate.

pub use whale_parallel as parallel;
