//! A trained run opened for generation: its `trainer_state.json`, dataset, vocabulary and model,
//! and the generation settings every command that samples from it shares (`sample`, `eval fid`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use codeclm_manifests::tokens::TokenLayout;
use codeclm_manifests::vocab::Vocab;
use codeclm_manifests::Dataset;
use codeclm_model::{GenerateConfig, Llama};

/// The facts sampling needs from `trainer_state.json`.
#[derive(serde::Deserialize)]
pub(crate) struct RunState {
    pub vocab_hash: String,
    pub dataset: PathBuf,
    pub config: RunTrainConfig,
}

/// The part of the run's training settings sampling needs.
#[derive(serde::Deserialize)]
pub(crate) struct RunTrainConfig {
    /// Training context: the positions the model has learned; sampling slides a window of
    /// this size so that longer streams (whole images) stay within them.
    pub context: usize,
}

pub(crate) fn read_state(run: &Path) -> Result<RunState> {
    let path = run.join("trainer_state.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {}: is {} a run directory written by `codeclm train`?",
            path.display(),
            run.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Everything generation needs from a run directory.
pub(crate) struct OpenRun {
    pub state: RunState,
    /// The dataset's root (`--dataset`, or the one the run was trained on).
    pub root: PathBuf,
    pub ds: Dataset,
    pub vocab: Vocab,
    pub model: Llama,
}

/// Opens `run` with its dataset (`dataset` overrides the one in its state), vocabulary and model,
/// on CUDA device 0 when `cuda`; checks the model covers the vocabulary.
pub(crate) fn open_run(run: &Path, dataset: Option<&Path>, cuda: bool) -> Result<OpenRun> {
    let state = read_state(run)?;
    let root = dataset
        .map(Path::to_path_buf)
        .unwrap_or(state.dataset.clone());
    let ds = Dataset::open(&root).with_context(|| {
        format!(
            "opening the run's dataset {} (pass --dataset if it moved)",
            root.display()
        )
    })?;
    let vocab_path = TokenLayout::new(&root, &state.vocab_hash).vocab_path();
    let vocab = Vocab::load(&vocab_path).with_context(|| {
        format!(
            "loading the run's vocabulary {} from {}",
            state.vocab_hash,
            vocab_path.display()
        )
    })?;
    let device = codeclm_model::device(cuda)?;
    let model = Llama::load(run, &device)
        .with_context(|| format!("loading the model in {}", run.display()))?;
    if (model.config.vocab_size as u32) < vocab.size {
        bail!(
            "the model's vocabulary ({}) is smaller than the tokenizer's ({}): wrong run or dataset",
            model.config.vocab_size,
            vocab.size
        );
    }
    Ok(OpenRun {
        state,
        root,
        ds,
        vocab,
        model,
    })
}

/// Longest stream sampling writes when `--max-tokens` is not given: the paper's maximum
/// sequence length (12,288 tokens: a 256x256 JPEG at q25 is ~5K on average).
pub(crate) const DEFAULT_MAX_TOKENS: usize = 12_288;

/// Sampling settings as the command line gives them (0 top-k and 1.0 top-p mean off), with a
/// sliding window of the run's training context (`window`).
pub(crate) fn generate_config(
    vocab: &Vocab,
    window: usize,
    max_tokens: Option<usize>,
    temperature: f64,
    top_k: usize,
    top_p: f64,
    seed: u64,
) -> Result<GenerateConfig> {
    if !(0.0..=1.0).contains(&top_p) || top_p == 0.0 {
        bail!("--top-p {top_p} is outside (0, 1]");
    }
    Ok(GenerateConfig {
        max_new_tokens: max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        temperature,
        top_k: (top_k > 0).then_some(top_k),
        top_p: (top_p < 1.0).then_some(top_p),
        seed,
        eos_token_id: Some(vocab.eos),
        pad_token_id: vocab.bos,
        window: Some(window),
    })
}

/// The seed of the `index`-th generation batch of a run seeded with `seed`: reproducible, and
/// different for every batch.
pub(crate) fn batch_seed(seed: u64, index: u64) -> u64 {
    seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}
