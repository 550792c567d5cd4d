//! The model crate's errors: each names the file, tensor or config key at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tensor(#[from] whale_tensor::Error),

    #[error("config key `{key}`: {msg}")]
    Config { key: String, msg: String },

    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },

    #[error("checkpoint {path}: tensor `{name}`: {msg}")]
    Checkpoint { path: PathBuf, name: String, msg: String },

    #[error("{0}")]
    Model(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn config(key: &str, msg: impl Into<String>) -> Self {
        Error::Config { key: key.to_string(), msg: msg.into() }
    }

    pub(crate) fn file(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::File { path: path.into(), msg: msg.to_string() }
    }
}
