//! whale-parallel: the training engine ([`trainer`]: steps, gradient accumulation, precision,
//! AdamW with its schedule, clipping, MoE balancing, NaN detection, metrics, atomic checkpoints and
//! bit-identical resume), communicators ([`comm`]: the `Comm` trait and `LocalComm`, ranks as
//! threads with an optional link model), [`data_parallel`] training (bucketed gradient all-reduce
//! overlapped with the backward, ZeRO-1), [`expert_parallel`] dispatch and combine, and pipeline
//! [`schedule`]s as data (1F1B, ZB1P, DualPipe, DualPipeV in the reference's exact order, with a
//! timing simulator and an SVG timeline) run on real model stages by [`pipeline`], and all three
//! together in [`parallel_trainer`] (a dp x ep x pp mesh that takes one rank's steps).

pub mod comm;
pub mod data_parallel;
pub mod expert_parallel;
pub mod launch;
pub mod parallel_trainer;
pub mod pipeline;
pub mod schedule;
pub mod threads;
pub mod trainer;

pub use whale_model as model;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] whale_model::Error),
    #[error(transparent)]
    Tensor(#[from] whale_model::tensor::Error),
    #[error("{path}: {msg}")]
    File { path: std::path::PathBuf, msg: String },
    /// A non-finite loss or gradient, with where it was first seen.
    #[error("step {step}: non-finite {what} first appears in {location}")]
    NonFinite { step: u64, what: String, location: String },
    #[error("{0}")]
    Train(String),
    #[error(transparent)]
    Comm(#[from] comm::CommError),
}

impl Error {
    pub(crate) fn file(path: impl Into<std::path::PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::File { path: path.into(), msg: msg.to_string() }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
