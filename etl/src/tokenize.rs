//! Byte-level BPE over a dataset's codec bytes: training a vocabulary (HF `tokenizers`'
//! `BpeTrainer`) and writing token shards for every sample. Reads codec shards only, never
//! media, so a new vocabulary is minutes of work, not a re-encode.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use codeclm_formats::tokens::{self, TokenLayout, TokenRow, TokenShardWriter};
use codeclm_formats::vocab::{self, PreTokenize, Vocab};
use codeclm_formats::{Dataset, Modality, SampleRow, Split};
use rayon::prelude::*;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error(transparent)]
    Format(#[from] codeclm_formats::Error),
    #[error("vocabulary training failed: {0}")]
    Train(String),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Clone, Debug)]
pub struct VocabTrainOptions {
    pub dataset: PathBuf,
    pub modality: Modality,
    /// The whole vocabulary: 256 bytes + merges + 3 special tokens (`<s>`, `</s>`, `<pad>`).
    pub size: usize,
    /// Training samples, drawn deterministically (lowest hash of the id) from the train split.
    pub samples: usize,
    pub pretokenize: PreTokenize,
}

#[derive(Clone, Debug, Serialize)]
pub struct VocabTrainSummary {
    pub samples: usize,
    pub codec_bytes: u64,
    pub vocab_size: u32,
    pub merges: usize,
    pub seconds: f64,
    pub hash: String,
}

/// The samples a vocabulary is trained on: ok rows of the modality in the train split, ordered
/// by a hash of their id (a fixed pseudo-random sample), the first `n`.
pub fn training_sample(ds: &Dataset, modality: Modality, n: usize) -> Vec<&SampleRow> {
    let mut rows: Vec<&SampleRow> = ds
        .rows()
        .iter()
        .filter(|r| r.is_ok() && r.modality == modality && r.split == Split::Train)
        .collect();
    // Cached keys: one hash and one id copy per row, not per comparison.
    rows.sort_by_cached_key(|r| {
        (
            xxhash_rust::xxh3::xxh3_64_with_seed(r.sample_id.as_bytes(), 0x70C3),
            r.sample_id.clone(),
        )
    });
    rows.truncate(n);
    rows
}

/// Trains a vocabulary and returns the tokenizer.json bytes.
pub fn train_vocab(
    opts: &VocabTrainOptions,
) -> Result<(Vec<u8>, VocabTrainSummary), TokenizeError> {
    let started = Instant::now();
    if opts.size < 256 + 3 {
        return Err(TokenizeError::Invalid(format!(
            "--size {} is below 259 (256 bytes + 3 special tokens): the size counts the whole vocabulary",
            opts.size
        )));
    }
    if opts.size > tokens::MAX_VOCAB as usize {
        return Err(TokenizeError::Invalid(format!(
            "--size {} does not fit u16 token shards (at most {})",
            opts.size,
            tokens::MAX_VOCAB
        )));
    }
    let ds = Dataset::open(&opts.dataset)?;
    let rows = training_sample(&ds, opts.modality, opts.samples);
    if rows.is_empty() {
        return Err(TokenizeError::Invalid(format!(
            "{} has no successful {} samples in its train split to learn from",
            opts.dataset.display(),
            opts.modality
        )));
    }
    let streams: Vec<Vec<u8>> = rows
        .iter()
        .map(|r| ds.codec_bytes(r))
        .collect::<Result<_, _>>()?;
    let codec_bytes = streams.iter().map(|s| s.len() as u64).sum();
    let json = train_on_streams(&streams, opts.size, opts.pretokenize)?;
    let vocab = Vocab::from_json(&json, Path::new("trained vocabulary"))?;
    let summary = VocabTrainSummary {
        samples: streams.len(),
        codec_bytes,
        vocab_size: vocab.size,
        merges: vocab.merges(),
        seconds: started.elapsed().as_secs_f64(),
        hash: vocab.hash.clone(),
    };
    Ok((json, summary))
}

/// BPE training on raw byte streams; the result is a standard tokenizer.json.
pub fn train_on_streams(
    streams: &[Vec<u8>],
    size: usize,
    pretokenize: PreTokenize,
) -> Result<Vec<u8>, TokenizeError> {
    use tokenizers::models::bpe::BpeTrainerBuilder;
    use tokenizers::models::TrainerWrapper;
    use tokenizers::{AddedToken, Tokenizer};

    let template = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": pretokenize.to_json(),
        "post_processor": null,
        "decoder": null,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": {}, "merges": []
        }
    });
    let mut tokenizer = Tokenizer::from_str(&template.to_string())
        .map_err(|e| TokenizeError::Train(e.to_string()))?;
    let alphabet: HashSet<char> = (0..=255u8).map(vocab::byte_char).collect();
    let specials = [vocab::BOS, vocab::EOS, vocab::PAD]
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect();
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(size)
        .min_frequency(0)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(alphabet)
        .build();
    let mut trainer: TrainerWrapper = trainer.into();
    let texts: Vec<String> = streams.iter().map(|s| vocab::bytes_to_chars(s)).collect();
    tokenizer
        .train(&mut trainer, texts.iter())
        .map_err(|e| TokenizeError::Train(e.to_string()))?;
    let json = tokenizer
        .to_string(false)
        .map_err(|e| TokenizeError::Train(e.to_string()))?;
    Ok(json.into_bytes())
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TokenizeSummary {
    pub hash: String,
    pub samples: u64,
    pub tokens: u64,
    pub codec_bytes: u64,
    pub parts_built: u32,
    pub parts_skipped: u32,
    /// Of `parts_built`: token parts redone because their codec part changed since (or they
    /// record no codec part hash: tokenized by an older codeclm).
    pub parts_stale: u32,
    /// Token parts deleted because their codec part no longer has samples to tokenize.
    pub parts_removed: u32,
    pub seconds: f64,
}

impl TokenizeSummary {
    pub fn mb_per_second(&self) -> f64 {
        self.codec_bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }
}

/// Writes the token set of `vocab_path` for every successful sample of the dataset (resumable
/// per part: a part whose token manifest exists, whose shard is of the current version and
/// which records the current [`codeclm_formats::samples::part_hash`] of its codec part is
/// skipped; an older shard or a stale part is rewritten, and a token part whose codec part has
/// nothing left to tokenize is deleted), then `tokens-<hash>.parquet`. `modality`
/// (`image`/`video`) limits the token set to those samples: a JPEG vocabulary is for the images
/// of a mixed dataset, an H.264 one for its videos. `frame_tokens` is the shards' frame size
/// ([`tokens::FRAME_TOKENS`] unless a test wants documents across frames).
pub fn tokenize_dataset(
    dataset: &Path,
    vocab_path: &Path,
    workers: usize,
    modality: Option<Modality>,
    frame_tokens: u32,
) -> Result<TokenizeSummary, TokenizeError> {
    let started = Instant::now();
    let vocab = Vocab::load(vocab_path)?;
    if vocab.size > tokens::MAX_VOCAB {
        return Err(TokenizeError::Invalid(format!(
            "{} has {} entries: u16 token shards hold at most {}",
            vocab_path.display(),
            vocab.size,
            tokens::MAX_VOCAB
        )));
    }
    let ds = Dataset::open(dataset)?;
    let layout = TokenLayout::new(dataset, &vocab.hash);
    layout.create_dirs()?;
    if !layout.vocab_path().exists() {
        let bytes = std::fs::read(vocab_path).map_err(|source| codeclm_formats::Error::Io {
            path: vocab_path.to_path_buf(),
            source,
        })?;
        codeclm_formats::write_atomic(&layout.vocab_path(), &bytes)?;
    }
    let mut all_by_part: BTreeMap<u32, Vec<&SampleRow>> = BTreeMap::new();
    for r in ds.rows() {
        all_by_part.entry(r.part).or_default().push(r);
    }
    let part_hashes: BTreeMap<u32, u64> = all_by_part
        .iter()
        .map(|(&p, rows)| (p, codeclm_formats::samples::part_hash(rows.iter().copied())))
        .collect();
    let mut by_part: BTreeMap<u32, Vec<&SampleRow>> = BTreeMap::new();
    for r in ds
        .rows()
        .iter()
        .filter(|r| r.is_ok() && modality.is_none_or(|m| r.modality == m))
    {
        by_part.entry(r.part).or_default().push(r);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers.max(1))
        .build()
        .map_err(|e| TokenizeError::Invalid(e.to_string()))?;
    let total: usize = by_part.values().map(Vec::len).sum();
    let progress = indicatif::ProgressBar::new(total as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} samples  {per_sec}  {elapsed}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut summary = TokenizeSummary {
        hash: vocab.hash.clone(),
        ..TokenizeSummary::default()
    };
    summary.parts_removed = remove_orphan_parts(dataset, &layout, &by_part)?;
    for (&part, rows) in &by_part {
        let shard_path = dataset.join(layout.shard_rel(part));
        let part_hash = part_hashes[&part];
        let manifest = layout.part_manifest(part);
        if manifest.exists() {
            let current = tokens::shard_version(&shard_path) == Some(tokens::TOKEN_SHARD_VERSION);
            let recorded = tokens::recorded_part_hash(&manifest).unwrap_or_else(|e| {
                tracing::warn!("{e}; re-tokenizing part {part}");
                None
            });
            if current && recorded == Some(part_hash) {
                summary.parts_skipped += 1;
                progress.inc(rows.len() as u64);
                continue;
            }
            if recorded != Some(part_hash) {
                tracing::info!(
                    "token part {part} is stale: tokenized from codec part hash {}, the part now hashes {part_hash:016x}; re-tokenizing it",
                    recorded.map_or("(none recorded)".into(), |h| format!("{h:016x}"))
                );
                summary.parts_stale += 1;
            }
        }
        // Encode the part's documents in parallel, then write them in manifest order.
        let docs: Vec<Result<(Vec<u32>, u64), codeclm_formats::Error>> = pool.install(|| {
            rows.par_iter()
                .map(|r| {
                    let bytes = ds.codec_bytes(r)?;
                    let mut ids = Vec::with_capacity(bytes.len() + 2);
                    ids.push(vocab.bos);
                    vocab.encode(&bytes, &mut ids);
                    ids.push(vocab.eos);
                    Ok((ids, bytes.len() as u64))
                })
                .collect()
        });
        let mut writer = TokenShardWriter::with_frame_tokens(
            &shard_path,
            vocab.size,
            &vocab.hash,
            frame_tokens,
        )?;
        let mut token_rows = Vec::with_capacity(rows.len());
        for (row, doc) in rows.iter().zip(docs) {
            let (ids, codec_bytes) = doc?;
            let offset = writer.push_doc(&ids)?;
            summary.samples += 1;
            summary.tokens += ids.len() as u64;
            summary.codec_bytes += codec_bytes;
            token_rows.push(TokenRow {
                sample_id: row.sample_id.clone(),
                modality: row.modality,
                split: row.split,
                part,
                shard: layout.shard_rel(part),
                offset,
                n_tokens: ids.len() as u64,
                codec_bytes,
                codec_part_hash: Some(part_hash),
            });
        }
        writer.finish()?;
        tokens::write_token_rows(&token_rows, &layout.part_manifest(part))?;
        summary.parts_built += 1;
        progress.inc(rows.len() as u64);
    }
    progress.finish_and_clear();
    tokens::consolidate(&layout)?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Deletes the token parts (manifest, then shard) of parts with nothing to tokenize any more (a
/// rebuild failed every sample, or the part is gone), so that `tokens-<hash>.parquet` lists
/// none of their old documents. Returns how many.
fn remove_orphan_parts(
    dataset: &Path,
    layout: &TokenLayout,
    by_part: &BTreeMap<u32, Vec<&SampleRow>>,
) -> Result<u32, TokenizeError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| codeclm_formats::Error::Io { path, source }
    };
    let dir = layout.parts_dir();
    let mut removed = 0;
    for e in std::fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let part = name
            .strip_prefix("part-")
            .and_then(|n| n.strip_suffix(".parquet"))
            .and_then(|n| n.parse::<u32>().ok());
        let Some(part) = part.filter(|p| !by_part.contains_key(p)) else {
            continue;
        };
        tracing::info!(
            "codec part {part} has no samples to tokenize any more: deleting its token part"
        );
        std::fs::remove_file(e.path()).map_err(io(&e.path()))?;
        let shard = dataset.join(layout.shard_rel(part));
        if shard.exists() {
            std::fs::remove_file(&shard).map_err(io(&shard))?;
        }
        removed += 1;
    }
    Ok(removed)
}
