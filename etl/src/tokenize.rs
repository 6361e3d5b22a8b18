//! Byte-level BPE over a dataset's codec bytes: training a vocabulary (HF `tokenizers`'
//! `BpeTrainer`) and writing token shards for every sample. Reads codec shards only, never
//! media, so a new vocabulary is minutes of work, not a re-encode.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use codeclm_formats::tokens::{self, TokenLayout, TokenRow, TokenShardWriter};
use codeclm_formats::vocab::{self, PreTokenize, Vocab};
use codeclm_formats::{Dataset, Modality, RowFilter, SampleRow, Split};
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
pub fn training_sample(
    ds: &Dataset,
    modality: Modality,
    n: usize,
) -> Result<Vec<SampleRow>, codeclm_formats::Error> {
    // Only the ids and filter columns are scanned; n candidates kept, the n rows read at the end.
    ds.lowest_by_key(RowFilter::ok(modality, Some(Split::Train)), n, |id| {
        xxhash_rust::xxh3::xxh3_64_with_seed(id.as_bytes(), 0x70C3)
    })
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
    let rows = training_sample(&ds, opts.modality, opts.samples)?;
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
    /// Parts left to the other workers (`--shard-index/--num-shards`).
    pub parts_elsewhere: u32,
    /// Parts, of any worker, not yet tokenized from their current codec part when this worker
    /// finished (0: `tokens-<hash>.parquet` was written).
    pub parts_pending: u32,
    /// Whether this run wrote `tokens-<hash>.parquet` (every part done).
    pub consolidated: bool,
    pub seconds: f64,
}

impl TokenizeSummary {
    pub fn mb_per_second(&self) -> f64 {
        self.codec_bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }

    fn add(&mut self, o: &TokenizeSummary) {
        self.samples += o.samples;
        self.tokens += o.tokens;
        self.codec_bytes += o.codec_bytes;
        self.parts_built += o.parts_built;
        self.parts_skipped += o.parts_skipped;
        self.parts_stale += o.parts_stale;
    }
}

/// Which share of the parts one tokenize worker does: part `p` is worker `p % count`'s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenizeShard {
    pub index: u32,
    pub count: u32,
}

impl TokenizeShard {
    pub const ALL: TokenizeShard = TokenizeShard { index: 0, count: 1 };

    pub fn owns(self, part: u32) -> bool {
        part % self.count.max(1) == self.index
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
///
/// Parts are tokenized in parallel (each part encoded and written by one thread; a dataset of
/// fewer parts than workers encodes each part's documents in parallel instead). With `shard`
/// other than [`TokenizeShard::ALL`] this worker does only its parts; whichever worker finds
/// every part done at its end writes `tokens-<hash>.parquet` (the same file one worker writes),
/// and rerunning any worker after the others finished writes it too.
pub fn tokenize_dataset(
    dataset: &Path,
    vocab_path: &Path,
    workers: usize,
    modality: Option<Modality>,
    frame_tokens: u32,
    shard: TokenizeShard,
) -> Result<TokenizeSummary, TokenizeError> {
    let started = Instant::now();
    if shard.count == 0 || shard.index >= shard.count {
        return Err(TokenizeError::Invalid(format!(
            "--shard-index {} is not below --num-shards {}",
            shard.index, shard.count
        )));
    }
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
    // One scan of the hashed columns: each part's hash, and its rows to tokenize; a part's rows
    // are read when it is tokenized (one part per thread in memory).
    let filter = RowFilter {
        ok_only: true,
        modality,
        split: None,
    };
    let summaries = ds.part_summaries(filter)?;
    let part_hashes: BTreeMap<u32, u64> = summaries.iter().map(|(&p, s)| (p, s.hash)).collect();
    let by_part: BTreeMap<u32, u64> = summaries
        .iter()
        .filter(|(_, s)| s.kept > 0)
        .map(|(&p, s)| (p, s.kept))
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers.max(1))
        .build()
        .map_err(|e| TokenizeError::Invalid(e.to_string()))?;
    let mine: Vec<(u32, u64)> = by_part
        .iter()
        .filter(|(&p, _)| shard.owns(p))
        .map(|(&p, &n)| (p, n))
        .collect();
    let total: u64 = mine.iter().map(|&(_, n)| n).sum();
    let progress = indicatif::ProgressBar::new(total);
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} samples  {per_sec}  {elapsed}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut summary = TokenizeSummary {
        hash: vocab.hash.clone(),
        parts_elsewhere: (by_part.len() - mine.len()) as u32,
        ..TokenizeSummary::default()
    };
    summary.parts_removed = remove_orphan_parts(dataset, &layout, &by_part, shard)?;
    let job = PartJob {
        ds: &ds,
        filter,
        dataset,
        layout: &layout,
        vocab: &vocab,
        frame_tokens,
        progress: &progress,
    };
    // Parts in parallel when there are enough of them (one part's documents in memory per
    // thread); otherwise one part at a time, its documents encoded in parallel.
    // Parts run on plain threads (see `on_threads`); documents on the rayon pool.
    let outcomes: Vec<Result<TokenizeSummary, TokenizeError>> = pool.install(|| {
        if mine.len() >= workers.max(1) {
            crate::on_threads(workers, &mine, |&(part, n)| {
                job.run(part, n, part_hashes[&part], false)
            })
        } else {
            mine.iter()
                .map(|&(part, n)| job.run(part, n, part_hashes[&part], true))
                .collect()
        }
    });
    for o in outcomes {
        summary.add(&o?);
    }
    progress.finish_and_clear();
    // Every part of every worker current, and no token part left over: the token set is whole.
    // This worker's own parts are current now (built or skipped); only the others' are read.
    summary.parts_pending = by_part
        .keys()
        .filter(|&&p| !shard.owns(p) && !job.is_current(p, part_hashes[&p]))
        .count() as u32;
    let leftovers = token_parts(&layout)?
        .into_iter()
        .filter(|p| !by_part.contains_key(p))
        .count() as u32;
    summary.parts_pending += leftovers;
    if summary.parts_pending == 0 {
        tokens::consolidate(&layout)?;
        summary.consolidated = true;
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// What tokenizing one part needs.
struct PartJob<'a> {
    ds: &'a Dataset,
    filter: RowFilter,
    dataset: &'a Path,
    layout: &'a TokenLayout,
    vocab: &'a Vocab,
    frame_tokens: u32,
    progress: &'a indicatif::ProgressBar,
}

impl PartJob<'_> {
    /// Whether part `part`'s token part exists, is of the current shard version and records
    /// the codec part's current hash.
    fn is_current(&self, part: u32, part_hash: u64) -> bool {
        self.recorded(part)
            .is_some_and(|(current, recorded)| current && recorded == Some(part_hash))
    }

    /// (shard of the current version, recorded codec part hash) of an existing token part.
    fn recorded(&self, part: u32) -> Option<(bool, Option<u64>)> {
        let manifest = self.layout.part_manifest(part);
        if !manifest.exists() {
            return None;
        }
        let shard_path = self.dataset.join(self.layout.shard_rel(part));
        let current = tokens::shard_version(&shard_path) == Some(tokens::TOKEN_SHARD_VERSION);
        let recorded = tokens::recorded_part_hash(&manifest).unwrap_or_else(|e| {
            tracing::warn!("{e}; re-tokenizing part {part}");
            None
        });
        Some((current, recorded))
    }

    /// Tokenizes one part (unless it is current) into its token shard, then its manifest.
    fn run(
        &self,
        part: u32,
        n_rows: u64,
        part_hash: u64,
        parallel_docs: bool,
    ) -> Result<TokenizeSummary, TokenizeError> {
        let mut summary = TokenizeSummary::default();
        if let Some((current, recorded)) = self.recorded(part) {
            if current && recorded == Some(part_hash) {
                summary.parts_skipped += 1;
                self.progress.inc(n_rows);
                return Ok(summary);
            }
            if recorded != Some(part_hash) {
                tracing::info!(
                    "token part {part} is stale: tokenized from codec part hash {}, the part now hashes {part_hash:016x}; re-tokenizing it",
                    recorded.map_or("(none recorded)".into(), |h| format!("{h:016x}"))
                );
                summary.parts_stale += 1;
            }
        }
        let mut rows = self.ds.part_rows(part)?;
        rows.retain(|r| self.filter.matches(r));
        let encode = |r: &SampleRow| -> Result<(Vec<u32>, u64), codeclm_formats::Error> {
            let bytes = self.ds.codec_bytes(r)?;
            let mut ids = Vec::with_capacity(bytes.len() + 2);
            ids.push(self.vocab.bos);
            self.vocab.encode(&bytes, &mut ids);
            ids.push(self.vocab.eos);
            Ok((ids, bytes.len() as u64))
        };
        // Encoded in parallel or not, written in manifest order.
        let docs: Vec<Result<(Vec<u32>, u64), codeclm_formats::Error>> = if parallel_docs {
            rows.par_iter().map(encode).collect()
        } else {
            rows.iter().map(encode).collect()
        };
        let shard_path = self.dataset.join(self.layout.shard_rel(part));
        let mut writer = TokenShardWriter::with_frame_tokens(
            &shard_path,
            self.vocab.size,
            &self.vocab.hash,
            self.frame_tokens,
        )?;
        let mut token_rows = Vec::with_capacity(rows.len());
        let shard_rel = self.layout.shard_rel(part);
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
                shard: shard_rel.clone(),
                offset,
                n_tokens: ids.len() as u64,
                codec_bytes,
                codec_part_hash: Some(part_hash),
            });
        }
        writer.finish()?;
        tokens::write_token_rows(&token_rows, &self.layout.part_manifest(part))?;
        summary.parts_built += 1;
        self.progress.inc(rows.len() as u64);
        Ok(summary)
    }
}

/// The parts that have a token manifest in the token set's `parts/`.
fn token_parts(layout: &TokenLayout) -> Result<Vec<u32>, TokenizeError> {
    let dir = layout.parts_dir();
    let entries = std::fs::read_dir(&dir).map_err(|source| codeclm_formats::Error::Io {
        path: dir.clone(),
        source,
    })?;
    Ok(entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_prefix("part-")
                .and_then(|n| n.strip_suffix(".parquet"))
                .and_then(|n| n.parse::<u32>().ok())
        })
        .collect())
}

/// Deletes the token parts (manifest, then shard) of parts with nothing to tokenize any more (a
/// rebuild failed every sample, or the part is gone), so that `tokens-<hash>.parquet` lists
/// none of their old documents. Returns how many.
fn remove_orphan_parts(
    dataset: &Path,
    layout: &TokenLayout,
    by_part: &BTreeMap<u32, u64>,
    shard: TokenizeShard,
) -> Result<u32, TokenizeError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| codeclm_formats::Error::Io { path, source }
    };
    let mut removed = 0;
    for part in token_parts(layout)? {
        if by_part.contains_key(&part) || !shard.owns(part) {
            continue;
        }
        tracing::info!(
            "codec part {part} has no samples to tokenize any more: deleting its token part"
        );
        let manifest = layout.part_manifest(part);
        std::fs::remove_file(&manifest).map_err(io(&manifest))?;
        let shard_path = dataset.join(layout.shard_rel(part));
        if shard_path.exists() {
            std::fs::remove_file(&shard_path).map_err(io(&shard_path))?;
        }
        removed += 1;
    }
    Ok(removed)
}
