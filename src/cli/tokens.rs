//! `codeclm vocab train`, `codeclm dataset tokenize` and `codeclm dataset decode`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use codeclm_codec::jpeg;
use codeclm_etl::tokenize::{self, VocabTrainOptions};
use codeclm_etl::BuildSettings;
use codeclm_formats::tokens::{self, TokenSet, TokenShard};
use codeclm_formats::vocab::PreTokenize;

use super::flags::{self, ModalityArg};

#[derive(Subcommand)]
pub enum VocabCommand {
    /// Learn a byte-level BPE vocabulary from a deterministic sample of a dataset's codec bytes.
    Train(TrainArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PreTokenizeArg {
    /// No cuts: merges may span the whole stream.
    None,
    /// Cut before every FF byte.
    BeforeFf,
    /// Cut before every JPEG restart marker (FF D0-D7): one piece per MCU.
    RestartMarkers,
    /// Cut before every H.264 start code (00 00 01): one piece per NAL unit.
    StartCodes,
}

#[derive(Args)]
pub struct TrainArgs {
    #[arg(long)]
    dataset: PathBuf,
    #[arg(long, value_enum, default_value_t = ModalityArg::Image)]
    modality: ModalityArg,
    /// The WHOLE vocabulary size: 256 byte tokens + merges + 3 special tokens (<s>, </s>, <pad>).
    /// The paper: 320 for JPEG, 1024 for H.264.
    #[arg(long, default_value_t = 320)]
    size: usize,
    /// Training samples, drawn deterministically from the train split (the paper: 10,000).
    #[arg(long, default_value_t = 10_000)]
    samples: usize,
    /// Where merges may not cross. Default from measurements (docs/tokens.md): cutting at restart
    /// markers gives the same tokens per image as the alternatives and encodes fastest.
    #[arg(long, value_enum, default_value_t = PreTokenizeArg::RestartMarkers)]
    pretokenize: PreTokenizeArg,
    /// The tokenizer.json to write.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct TokenizeArgs {
    #[arg(long)]
    dataset: PathBuf,
    /// A tokenizer.json from `codeclm vocab train`.
    #[arg(long)]
    vocab: PathBuf,
    #[arg(long)]
    workers: Option<usize>,
    /// Only the samples of this modality (default: every sample). A dataset holding both gets
    /// one token set per vocabulary: JPEG for images, H.264 for videos.
    #[arg(long, value_enum)]
    modality: Option<ModalityArg>,
    /// Tokens per zstd frame of the shards (tests use small frames to put documents across
    /// frame boundaries).
    #[arg(long, hide = true, default_value_t = tokens::FRAME_TOKENS)]
    frame_tokens: u32,
    /// This machine's index among --num-shards workers; each tokenizes parts i, i+n, i+2n, ...
    /// When absent, read from a job array: SLURM_ARRAY_TASK_ID (of SLURM_ARRAY_TASK_COUNT) or
    /// Kubernetes' JOB_COMPLETION_INDEX (with --num-shards); else 0. The worker that finds
    /// every part done writes tokens-<hash>.parquet.
    #[arg(long)]
    shard_index: Option<u32>,
    /// Workers in all (default 1, or SLURM_ARRAY_TASK_COUNT under a Slurm array).
    #[arg(long)]
    num_shards: Option<u32>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ExportFormatArg {
    /// nanoGPT: `train.bin`/`val.bin`, uint16 tokens back to back (np.memmap), and `meta.pkl`.
    Nanogpt,
    /// Megatron-LM: indexed datasets `train.bin`/`.idx`, `val.bin`/`.idx` (--data-path DIR/train).
    Megatron,
}

#[derive(Args)]
pub struct ExportTokensArgs {
    #[arg(long)]
    dataset: PathBuf,
    /// The token set: its hash (or a unique prefix) or vocabulary json; may be left out when
    /// the dataset has one.
    #[arg(long)]
    vocab: Option<String>,
    #[arg(long, value_enum)]
    format: ExportFormatArg,
    /// Only this modality's documents (default: all, in manifest order).
    #[arg(long, value_enum)]
    modality: Option<ModalityArg>,
    /// The directory the files go in (created).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct WindowsArgs {
    #[arg(long)]
    dataset: PathBuf,
    /// The token set (default: the only one).
    #[arg(long)]
    vocab: Option<String>,
    #[arg(long, default_value_t = 2048)]
    context: usize,
    /// The training seed (`codeclm train --seed`).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Windows to write.
    #[arg(long, default_value_t = 16)]
    count: usize,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct DecodeArgs {
    #[arg(long)]
    dataset: PathBuf,
    /// The vocabulary: a tokenizer.json, or the hash (or a unique prefix) of a token set in the
    /// dataset.
    #[arg(long)]
    vocab: String,
    /// Decode these samples' stored token documents.
    #[arg(long, value_delimiter = ',', conflicts_with = "tokens")]
    ids: Vec<String>,
    /// A text file of token sequences, one per line (ids separated by spaces or commas).
    #[arg(long)]
    tokens: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
}

pub fn train(args: TrainArgs) -> Result<()> {
    let pretokenize = match args.pretokenize {
        PreTokenizeArg::None => PreTokenize::None,
        PreTokenizeArg::BeforeFf => PreTokenize::BeforeFf,
        PreTokenizeArg::RestartMarkers => PreTokenize::RestartMarkers,
        PreTokenizeArg::StartCodes => PreTokenize::StartCodes,
    };
    let opts = VocabTrainOptions {
        dataset: args.dataset.clone(),
        modality: args.modality.into(),
        size: args.size,
        samples: args.samples,
        pretokenize,
    };
    let (json, s) = tokenize::train_vocab(&opts)
        .with_context(|| format!("training a vocabulary on {}", args.dataset.display()))?;
    codeclm_formats::write_atomic(&args.out, &json)?;
    println!(
        "trained vocabulary {} ({} entries, {} merges) on {} samples ({:.2} MB) in {:.1} s -> {}",
        s.hash,
        s.vocab_size,
        s.merges,
        s.samples,
        s.codec_bytes as f64 / 1e6,
        s.seconds,
        args.out.display()
    );
    Ok(())
}

pub fn tokenize(args: TokenizeArgs) -> Result<()> {
    let workers = flags::workers(args.workers);
    let shard = flags::shard_choice(args.shard_index, args.num_shards, &|k| {
        std::env::var(k).ok()
    })?;
    let s = tokenize::tokenize_dataset(
        &args.dataset,
        &args.vocab,
        workers,
        args.modality.map(Into::into),
        args.frame_tokens,
        tokenize::TokenizeShard {
            index: shard.index,
            count: shard.count,
        },
    )
    .with_context(|| {
        format!(
            "tokenizing {} with {}",
            args.dataset.display(),
            args.vocab.display()
        )
    })?;
    println!(
        "tokenized {} samples: {} tokens from {:.2} MB of codec bytes ({:.3} bytes/token) in {:.2} s = {:.1} MB/s ({:.1} MB/s per worker); parts {} built ({} stale), {} already done, {} removed -> {}",
        s.samples,
        s.tokens,
        s.codec_bytes as f64 / 1e6,
        s.codec_bytes as f64 / s.tokens.max(1) as f64,
        s.seconds,
        s.mb_per_second(),
        s.mb_per_second() / workers as f64,
        s.parts_built,
        s.parts_stale,
        s.parts_skipped,
        s.parts_removed,
        if s.consolidated {
            args.dataset.join(format!("tokens-{}.parquet", s.hash)).display().to_string()
        } else {
            format!(
                "{} parts not done yet, tokens-{}.parquet is written by the worker that finds every part done",
                s.parts_pending, s.hash
            )
        }
    );
    if shard.count > 1 {
        println!(
            "worker {} of {} ({}): {} parts left to the other workers",
            shard.index, shard.count, shard.from, s.parts_elsewhere
        );
    }
    Ok(())
}

pub fn windows(args: WindowsArgs) -> Result<()> {
    use codeclm_model::data::{Loader, TrainingSet};
    let set = TrainingSet::open(&args.dataset, args.vocab.as_deref())?;
    let mut loader = Loader::new(&set, args.context, args.seed, &Default::default())?;
    let mut bytes = Vec::with_capacity(args.count * (args.context + 1) * 2);
    for _ in 0..args.count {
        for t in loader.next_window(&set)? {
            bytes.extend_from_slice(&(t as u16).to_le_bytes());
        }
    }
    codeclm_formats::write_atomic(&args.out, &bytes)?;
    println!(
        "wrote {} windows of {} tokens (token set {}, seed {}) to {}: uint16, shape ({}, {})",
        args.count,
        args.context + 1,
        set.hash,
        args.seed,
        args.out.display(),
        args.count,
        args.context + 1
    );
    Ok(())
}

/// nanoGPT's `meta.pkl`, which its `train.py` reads for the model's vocabulary size: the
/// pickle (protocol 2) of `{'vocab_size': n}`.
fn nanogpt_meta(vocab_size: u32) -> Vec<u8> {
    let mut p = vec![0x80, 2, b'}', b'q', 0, b'X'];
    p.extend_from_slice(&10u32.to_le_bytes());
    p.extend_from_slice(b"vocab_size");
    p.extend_from_slice(&[b'q', 1, b'J']);
    p.extend_from_slice(&(vocab_size as i32).to_le_bytes());
    p.extend_from_slice(b"s.");
    p
}

pub fn export_tokens(args: ExportTokensArgs) -> Result<()> {
    use codeclm_formats::export::{ExportFormat, TokenExport};
    use codeclm_formats::Split;
    let started = std::time::Instant::now();
    let set = TokenSet::resolve(&args.dataset, args.vocab.as_deref())?;
    set.require_tokens()?;
    let format = match args.format {
        ExportFormatArg::Nanogpt => ExportFormat::NanoGpt,
        ExportFormatArg::Megatron => ExportFormat::Megatron,
    };
    let modality = args.modality.map(codeclm_formats::Modality::from);
    let create = |name| {
        TokenExport::create(&args.out, name, format)
            .with_context(|| format!("creating the {name} files in {}", args.out.display()))
    };
    let (mut train, mut val) = (create("train")?, create("val")?);
    // Rows come shard by shard: one open shard at a time.
    let mut shard: Option<(String, TokenShard)> = None;
    tokens::for_each_token_row(&set.layout.manifest_path(), |r| {
        if modality.is_some_and(|m| m != r.modality) {
            return Ok(());
        }
        if shard.as_ref().is_none_or(|(name, _)| name != r.shard) {
            let opened = TokenShard::open(&args.dataset.join(r.shard), Some(&set.hash))?;
            shard = Some((r.shard.to_string(), opened));
        }
        let (_, s) = shard.as_ref().expect("opened above");
        let doc = s.read_range(r.offset, r.n_tokens)?;
        match r.split {
            Split::Train => train.push(&doc),
            Split::Val => val.push(&doc),
        }
    })
    .with_context(|| {
        format!(
            "reading token set {} of {}",
            set.hash,
            args.dataset.display()
        )
    })?;
    let (train, val) = (train.finish()?, val.finish()?);
    if format == ExportFormat::NanoGpt {
        codeclm_formats::write_atomic(&args.out.join("meta.pkl"), &nanogpt_meta(set.vocab.size))?;
    }
    println!(
        "exported token set {} ({} ids, BOS {}, EOS {}) for {}: train {} documents, {} tokens; val {} documents, {} tokens; in {} ({:.1} s)",
        set.hash,
        set.vocab.size,
        set.vocab.bos,
        set.vocab.eos,
        match format {
            ExportFormat::NanoGpt => "nanoGPT",
            ExportFormat::Megatron => "Megatron-LM",
        },
        train.docs,
        train.tokens,
        val.docs,
        val.tokens,
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn decode(args: DecodeArgs) -> Result<()> {
    let ds = super::dataset::open(&args.dataset)?;
    let set = TokenSet::resolve(&args.dataset, Some(&args.vocab))?;
    let vocab = &set.vocab;
    let settings = BuildSettings::of(&ds)?;
    let tables = ds.jpeg_tables().map(<[u8]>::to_vec);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut sequences: Vec<(String, Vec<u32>)> = Vec::new();
    if let Some(file) = &args.tokens {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
            let ids = line
                .split(|c: char| c.is_whitespace() || c == ',')
                .filter(|t| !t.is_empty())
                .map(|t| {
                    t.parse::<u32>().with_context(|| {
                        format!(
                            "{}: line {}: {t:?} is not a token id",
                            file.display(),
                            i + 1
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            sequences.push((format!("seq-{i:04}"), ids));
        }
    } else if !args.ids.is_empty() {
        // One streamed pass over the token manifest keeps the rows asked for (none held else).
        let wanted: std::collections::HashSet<&str> = args.ids.iter().map(String::as_str).collect();
        let mut rows: HashMap<String, tokens::TokenRow> = HashMap::new();
        tokens::for_each_token_row(&set.layout.manifest_path(), |r| {
            if wanted.contains(r.sample_id) {
                rows.insert(r.sample_id.to_string(), r.to_owned());
            }
            Ok(())
        })
        .with_context(|| {
            format!(
                "no token set {} in the dataset: run `codeclm dataset tokenize` first",
                vocab.hash
            )
        })?;
        let mut shards: HashMap<String, TokenShard> = HashMap::new();
        for id in &args.ids {
            let row = rows.get(id).with_context(|| {
                format!("sample {id} has no tokens under vocabulary {}", vocab.hash)
            })?;
            if !shards.contains_key(&row.shard) {
                shards.insert(
                    row.shard.clone(),
                    TokenShard::open(&args.dataset.join(&row.shard), Some(&vocab.hash))?,
                );
            }
            let doc = shards[&row.shard].read_range(row.offset, row.n_tokens)?;
            sequences.push((id.clone(), doc.iter().map(|&t| t as u32).collect()));
        }
    } else {
        bail!("say what to decode: --ids ID,ID,... or --tokens FILE");
    }
    let mut ok = 0;
    for (name, ids) in &sequences {
        let bytes = vocab.decode(ids)?;
        if bytes.starts_with(&[0, 0, 0, 1]) || bytes.starts_with(&[0, 0, 1]) {
            // H.264 (Annex B): the stream as is, plus a playable MP4 when it remuxes.
            codeclm_formats::write_atomic(&args.out.join(format!("{name}.h264")), &bytes)?;
            let fps = settings.video.fps;
            let mp4 = args.out.join(format!("{name}.mp4"));
            let remux = |tmp: &Path| codeclm_codec::h264::annexb_to_mp4(&bytes, fps, tmp);
            match codeclm_formats::write_atomic_with(&mp4, remux) {
                Ok(()) => ok += 1,
                Err(e) => tracing::warn!("{name}: H.264 stream not remuxable to MP4 ({e})"),
            }
            continue;
        }
        let stream = jpeg::tidy_generated(&bytes);
        let Some(tables) = &tables else {
            bail!(
                "{}: the dataset has no JPEG tables file (jpeg_tables.jpg) to complete {name}",
                args.dataset.display()
            );
        };
        match jpeg::splice_tables(&stream, tables) {
            Ok(full) => {
                codeclm_formats::write_atomic(&args.out.join(format!("{name}.jpg")), &full)?;
                ok += 1;
            }
            Err(e) => {
                tracing::warn!(
                    "{name}: not a JPEG stream ({e}); writing the raw bytes as {name}.bin"
                );
                codeclm_formats::write_atomic(&args.out.join(format!("{name}.bin")), &bytes)?;
            }
        }
    }
    println!(
        "decoded {} sequences: {ok} JPEG/MP4 files, {} raw, in {}",
        sequences.len(),
        sequences.len() - ok,
        args.out.display()
    );
    Ok(())
}
