//! A trained run opened for generation: its `trainer_state.json`, dataset, vocabulary and model,
//! and the generation settings every command that samples from it shares (`sample`, `eval fid`).

use std::path::{Path, PathBuf};

use codeclm_formats::tokens::TokenSet;
use codeclm_formats::vocab::Vocab;
use codeclm_formats::Dataset;
use codeclm_model::train::TrainerState;
use codeclm_model::{GenerateConfig, Lm};

use crate::SampleError;

/// Everything generation needs from a run directory.
pub struct TrainedRun {
    pub dir: PathBuf,
    pub state: TrainerState,
    /// The dataset's root (the one given, or the one the run was trained on).
    pub root: PathBuf,
    pub ds: Dataset,
    pub vocab: Vocab,
}

impl TrainedRun {
    /// Opens `run` with its dataset (`dataset` overrides the one in its state), vocabulary and
    /// model (returned beside it: generation borrows it mutably while the rest is read);
    /// checks that the model covers the vocabulary.
    pub fn open(run: &Path, dataset: Option<&Path>) -> Result<(TrainedRun, Lm), SampleError> {
        let state = TrainerState::read(run)?;
        let root = dataset.map_or_else(|| state.dataset.clone(), Path::to_path_buf);
        let ds = Dataset::open(&root).map_err(|e| {
            SampleError::Run(format!(
                "opening the run's dataset {} (pass --dataset if it moved): {e}",
                root.display()
            ))
        })?;
        let vocab = TokenSet::resolve(&root, Some(&state.vocab_hash))
            .map_err(|e| {
                SampleError::Run(format!(
                    "loading the run's vocabulary {} from {}: {e}",
                    state.vocab_hash,
                    root.display()
                ))
            })?
            .vocab;
        let model = Lm::load(run)?;
        if (model.config.vocab_size as u32) < vocab.size {
            return Err(SampleError::Run(format!(
                "{}: the model's vocabulary ({}) is smaller than the tokenizer's ({}): wrong run or dataset",
                run.display(),
                model.config.vocab_size,
                vocab.size
            )));
        }
        let open = TrainedRun {
            dir: run.to_path_buf(),
            state,
            root,
            ds,
            vocab,
        };
        Ok((open, model))
    }

    /// The positions the model has learned: generation slides a window of this size, so that
    /// longer streams (whole images) stay within them.
    pub fn context(&self) -> usize {
        self.state.config.context
    }
}

/// Longest image stream sampling writes when no limit is given: the paper's maximum sequence
/// length (12,288 tokens: a 256x256 JPEG at q25 is ~5K on average).
pub const DEFAULT_MAX_TOKENS: usize = 12_288;
/// The same for H.264 videos (Avc-LM: 32K).
pub const DEFAULT_MAX_VIDEO_TOKENS: usize = 32_768;

/// How to draw tokens, as a user gives it: 0 top-k and 1.0 top-p mean off.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Drawing {
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub seed: u64,
    /// New tokens per generation at most.
    pub max_tokens: usize,
}

impl Drawing {
    /// The generation config for a run's vocabulary, with a sliding window of the run's
    /// training context.
    pub fn config(&self, vocab: &Vocab, window: usize) -> Result<GenerateConfig, SampleError> {
        if !(0.0..=1.0).contains(&self.top_p) || self.top_p == 0.0 {
            return Err(SampleError::Invalid(format!(
                "--top-p {} is outside (0, 1]",
                self.top_p
            )));
        }
        Ok(GenerateConfig {
            max_new_tokens: self.max_tokens,
            temperature: self.temperature,
            top_k: (self.top_k > 0).then_some(self.top_k),
            top_p: (self.top_p < 1.0).then_some(self.top_p),
            seed: self.seed,
            eos_token_id: Some(vocab.eos),
            pad_token_id: vocab.bos,
            window: Some(window),
        })
    }
}
