//! Model in, files and figures out: prompts cut from dataset samples or any file
//! ([`prompt`]), one sampling run for images and videos ([`run`], with the JPEG and H.264
//! [`image`] and [`video`] media), decodability reports, contact sheets ([`contact_sheet`]),
//! a trained run opened for generation ([`trained`]), grammar-constrained sampling
//! ([`constrain`]) and the FID evaluation of a run the paper's way ([`eval`]).

pub mod constrain;
pub mod contact_sheet;
pub mod eval;
pub mod image;
pub mod prompt;
pub mod run;
pub mod trained;
pub mod video;

pub use run::{sample, Generator, ModelGenerator, Sampled, Sampling};
pub use trained::{Drawing, TrainedRun};

use std::path::PathBuf;

/// Why sampling or evaluation stopped; each names the file or setting and the fix.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error(transparent)]
    Files(#[from] codeclm_formats::Error),
    #[error(transparent)]
    Model(#[from] codeclm_model::Error),
    #[error(transparent)]
    Prompt(#[from] prompt::PromptError),
    #[error(transparent)]
    Jpeg(#[from] codeclm_codec::jpeg::MarkerError),
    #[error(transparent)]
    Fid(#[from] fid::FidError),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A generator broke its contract (wrong number of completions).
    #[error("generation failed: {0}")]
    Generation(String),
    /// A run directory that cannot be sampled from.
    #[error("{0}")]
    Run(String),
    /// A setting outside its range.
    #[error("{0}")]
    Invalid(String),
}
