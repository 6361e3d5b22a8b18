//! Compact Llama language models over codec-byte tokens: the configuration ([`llama`]), the
//! training engine that runs them (explicit forward and backward over flat buffers, a CPU
//! backend; [`engine`]), batched generation with a KV cache ([`generate`]), a loader over a
//! dataset's token shards ([`data`]), the trainer ([`train`]) and checkpoints that
//! `transformers.LlamaForCausalLM.from_pretrained` reads ([`checkpoint`]).
//!
//! Reads datasets through `codeclm-formats` only; knows nothing of codecs or media.

pub mod checkpoint;
pub mod data;
pub mod dist;
pub mod engine;
pub mod generate;
pub mod llama;
pub mod plot;
pub mod rendezvous;
pub use codeclm_loader::rng;
pub mod train;

pub use generate::{generate, generate_with, Constraint, GenerateConfig, Lm, LogitsProcessor};
pub use llama::{LlamaConfig, MemoryEstimate, PRESETS};

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Manifest(#[from] codeclm_formats::Error),
    #[error(transparent)]
    Engine(#[from] codeclm_engine::Error),
    #[error(transparent)]
    Loader(#[from] codeclm_loader::Error),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A bad model or training configuration (names the setting and the fix).
    #[error("{0}")]
    Config(String),
    /// The dataset cannot feed the run (names the file and the fix).
    #[error("{0}")]
    Data(String),
    /// A checkpoint that is missing, torn or from another run.
    #[error("{path}: {problem}. Fix: {fix}")]
    Checkpoint {
        path: PathBuf,
        problem: String,
        fix: String,
    },
    #[error("training diverged at step {step}: the loss is {loss}. Fix: lower the learning rate (--lr), raise warmup, or lower --grad-clip; resume from the last checkpoint with --resume")]
    NonFinite { step: u64, loss: f32 },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}
