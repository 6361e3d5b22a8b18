//! Typed errors: each names the file or input and, where there is one, the fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum FidError {
    #[error("FID network weights not found at {path}: run `make fid-weights` (or set CODECLM_FID_WEIGHTS to the converted safetensors file)")]
    WeightsMissing { path: PathBuf },
    #[error(
        "{path}: not the converted FID Inception-v3 weights ({problem}); re-run `make fid-weights`"
    )]
    BadWeights { path: PathBuf, problem: String },
    #[error("image {index}: {problem}")]
    BadImage { index: usize, problem: String },
    #[error("Fréchet distance: {0}")]
    Stats(String),
    #[error("{0}")]
    Device(String),
    #[error(transparent)]
    Engine(#[from] codeclm_engine::Error),
}
