//! `codeclm bench images`: single-threaded throughput of the image pipeline, the Rust side of
//! `tools/bench_compare.py` (the Pillow side is `tools/bench_pillow.py`, same JSON shape).
//!
//! The files are read into memory first (no disk I/O in the timing), one untimed warm-up pass
//! runs over all of them, then the list is processed `--repeat` times on this thread and timed.
//! `--encode-only` decodes and resizes everything up front and times only the abbreviated
//! q25 encode (the floor: no pipeline can be faster than its encoder). Prints ONE JSON line.
//!
//! `codeclm bench tokens`: single-threaded BPE encoding throughput (MB of codec bytes per second)
//! of our [`Vocab::encode`] against the Rust `tokenizers` crate with the same tokenizer.json on
//! the same codec streams held in memory, checking both give identical ids on every sample; the
//! Rust side of `tools/bench_tokenize.py` (which adds Python `tokenizers`). Prints ONE JSON line.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use codeclm_codec::jpeg;
use codeclm_etl::process::process_image;
use codeclm_etl::resize::Resampler;
use codeclm_etl::ImageConfig;
use codeclm_formats::vocab::{bytes_to_chars, Vocab};
use codeclm_formats::Dataset;

use super::flags::{DeviceArg, PreprocessArg, ResamplerArg};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Images per second on one thread for decode + resize + encode (or encode only) over
    /// FILEs held in memory, and peak RSS; prints one JSON line like tools/bench_pillow.py.
    Images(ImagesArgs),
    /// MB/s on one thread for BPE-encoding every ok sample's codec bytes (held in memory) with
    /// our encoder and with the Rust `tokenizers` crate (same vocabulary, ids checked equal);
    /// prints one JSON line (see tools/bench_tokenize.py).
    Tokens(TokensArgs),
    /// Videos per second on one thread for the in-process H.264 encode (decode, filter, x264)
    /// of FILEs held in memory, and peak RSS; prints one JSON line (see tools/bench_video.py).
    Videos(VideosArgs),
    /// FID feature throughput: images/s through decode + resize + Inception-v3 (all cores, as
    /// `eval fid` runs it) over FILEs repeated `--repeat` times; prints one JSON line.
    Fid(FidBenchArgs),
    /// Training tokens/s (forward + backward + AdamW) of a preset on a fixed batch; prints one
    /// JSON line (tools/bench_train.py compares it with PyTorch on the same model and batch).
    Train(super::model::BenchTrainArgs),
    /// Generation tokens/s of a trained run (batched, KV cache); prints one JSON line.
    Sample(super::model::BenchSampleArgs),
    /// Every kernel of the engine on `--device` against the CPU backend, on the same
    /// pseudo-random inputs: one JSON line per output (largest absolute and relative
    /// difference, within the f32 tolerance or not); exits 1 when one is not.
    Kernels(KernelsArgs),
    /// The data-parallel gradient average alone, under the launcher (`mpirun -np N codeclm
    /// bench allreduce`, srun, torchrun's variables with --device cuda): checked against the
    /// exact average, then timed over a preset's parameter count; one JSON line from rank 0.
    Allreduce(super::allreduce::AllReduceArgs),
    /// The training loader over a token set: batches/s, tokens/s and peak RSS (which should
    /// not grow with the dataset); or, with --write-synthetic, write a synthetic token set of
    /// any size to measure it on. Prints one JSON line (tools/bench_loader.py runs both).
    Loader(LoaderArgs),
    /// The dataset tools at the paper's scale: synthesise a dataset of 25M rows (small
    /// records), then time `dataset inspect`, `export --ids`, `vocab train`, `dataset tokenize`,
    /// `dataset decode --ids` and the loader's start as child processes, with peak RSS.
    Scale(super::scale::ScaleArgs),
    /// Runs COMMAND and prints its wall time and peak RSS as one JSON line (what `bench scale`
    /// measures each command with: a child spawned by a small process, so its peak is its own).
    #[command(hide = true)]
    PeakRss {
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        command: Vec<std::ffi::OsString>,
    },
}

#[derive(Args)]
pub struct KernelsArgs {
    #[arg(long, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Largest difference allowed, relative to the output's largest magnitude (f32 kernels).
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f64,
}

#[derive(Args)]
pub struct LoaderArgs {
    /// The dataset whose token set is read.
    #[arg(long, required_unless_present = "write_synthetic")]
    dataset: Option<PathBuf>,
    /// Which token set (default: the only one).
    #[arg(long)]
    vocab: Option<String>,
    #[arg(long, default_value_t = 2048)]
    context: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Batches to time (after the trainer's startup: open, shard check, validation subset,
    /// unigram baseline).
    #[arg(long, default_value_t = 200)]
    batches: usize,
    /// Windows prepared ahead on a thread (default: the loader's own choice; 0: none).
    #[arg(long)]
    read_ahead: Option<usize>,
    /// Instead: write a synthetic token set (pseudo-random image-sized documents) into this
    /// directory, then exit.
    #[arg(long, conflicts_with = "dataset")]
    write_synthetic: Option<PathBuf>,
    /// Tokens of the synthetic set.
    #[arg(long, default_value_t = 2_000_000_000)]
    tokens: u64,
    /// Mean document length of the synthetic set (a 256x256 q25 JPEG is ~4,200 tokens).
    #[arg(long, default_value_t = 4200)]
    doc_tokens: usize,
    /// Documents per shard of the synthetic set (`dataset build`'s default part size).
    #[arg(long, default_value_t = 10_000)]
    docs_per_shard: usize,
    /// Tokens per zstd frame of the synthetic set.
    #[arg(long, default_value_t = codeclm_formats::tokens::FRAME_TOKENS)]
    frame_tokens: u32,
}

#[derive(Args)]
pub struct VideosArgs {
    /// Timed passes over the file list (after one untimed warm-up pass).
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Args)]
pub struct FidBenchArgs {
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Passes over the files (after one untimed warm-up batch).
    #[arg(long, default_value_t = 4)]
    repeat: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    #[arg(long)]
    weights: Option<PathBuf>,
}

#[derive(Args)]
pub struct TokensArgs {
    /// The dataset whose codec bytes are encoded (every sample with status ok).
    #[arg(long)]
    dataset: PathBuf,
    /// A tokenizer.json from `codeclm vocab train`.
    #[arg(long)]
    vocab: PathBuf,
    /// Timed passes per encoder (after one untimed pass that also checks the ids); the encoders
    /// alternate pass by pass and the best pass of each is reported.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Write our ids for an outside check: one JSON line {"sample_ids": [...], "n_tokens": [...]}
    /// then every sample's ids (no BOS/EOS) as little-endian u32, in that order.
    #[arg(long)]
    ids_out: Option<PathBuf>,
}

#[derive(Args)]
pub struct ImagesArgs {
    /// Timed passes over the file list (after one untimed warm-up pass).
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    #[arg(long, value_enum, default_value_t = PreprocessArg::Default)]
    preprocess: PreprocessArg,
    /// Override the preset's resampler.
    #[arg(long, value_enum)]
    resampler: Option<ResamplerArg>,
    /// Decode JPEGs at full size even where the preset would scale them in the DCT domain.
    #[arg(long)]
    no_dct_scaling: bool,
    /// Decode and resize up front; time only the abbreviated JPEG encode.
    #[arg(long)]
    encode_only: bool,
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Images(args) => images(args),
        BenchCommand::Tokens(args) => tokens(args),
        BenchCommand::Videos(args) => videos(args),
        BenchCommand::Fid(args) => fid_bench(args),
        BenchCommand::Train(args) => super::model::bench_train(args),
        BenchCommand::Sample(args) => super::model::bench_sample(args),
        BenchCommand::Kernels(args) => kernels(args),
        BenchCommand::Loader(args) => loader(args),
        BenchCommand::Scale(args) => super::scale::scale(args),
        BenchCommand::Allreduce(args) => super::allreduce::allreduce(args),
        BenchCommand::PeakRss { command } => super::scale::peak_rss(&command),
    }
}

fn kernels(args: KernelsArgs) -> Result<()> {
    use codeclm_model::engine::{Cpu, Cuda, Device};
    let cpu = Cpu::new();
    let (diffs, name) = match args.device.device() {
        Device::Cpu => (
            codeclm_model::engine::check::compare(&cpu, &Cpu::new(), args.seed)?,
            "cpu",
        ),
        Device::Cuda(n) => {
            let cuda = Cuda::new(n)?;
            (
                codeclm_model::engine::check::compare(&cpu, &cuda, args.seed)?,
                "cuda",
            )
        }
    };
    let mut bad = 0;
    for d in &diffs {
        let ok = d.max_rel <= args.tolerance && d.max_abs.is_finite();
        bad += !ok as usize;
        println!(
            "{}",
            serde_json::json!({"kernel": d.kernel, "device": name, "values": d.values, "max_abs": d.max_abs, "max_rel": d.max_rel, "tolerance": args.tolerance, "ok": ok})
        );
    }
    println!(
        "{}",
        serde_json::json!({"kernels": diffs.len(), "within_tolerance": diffs.len() - bad, "device": name, "against": "cpu"})
    );
    if bad > 0 {
        bail!(
            "{bad} of {} kernel outputs on {name} differ from the CPU backend by more than {}",
            diffs.len(),
            args.tolerance
        );
    }
    Ok(())
}

fn loader(args: LoaderArgs) -> Result<()> {
    use codeclm_model::data::{self, Loader, SyntheticSpec, TrainingSet};
    use codeclm_model::train::process_cpu_seconds;
    if let Some(dir) = &args.write_synthetic {
        let t0 = Instant::now();
        let spec = SyntheticSpec {
            docs: (args.tokens / args.doc_tokens.max(6) as u64).max(1) as usize,
            mean_tokens: args.doc_tokens,
            val_every: 100,
            video_every: 0,
            docs_per_shard: args.docs_per_shard,
            frame_tokens: args.frame_tokens,
            seed: 1,
        };
        let hash = data::write_synthetic_token_set(dir, &spec)
            .with_context(|| format!("writing a synthetic token set in {}", dir.display()))?;
        println!(
            "{}",
            serde_json::json!({"wrote": dir, "hash": hash, "docs": spec.docs, "seconds": t0.elapsed().as_secs_f64()})
        );
        return Ok(());
    }
    let dataset = args.dataset.context("--dataset is required")?;
    let t0 = Instant::now();
    let set = TrainingSet::open(&dataset, args.vocab.as_deref())?;
    let shards = set.check_shards()?;
    let val = set.val_subset(data::DEFAULT_VAL_DOCS)?;
    let unigram = data::unigram_baseline_bits_per_byte(&set, data::DEFAULT_VAL_DOCS)?;
    let startup = t0.elapsed().as_secs_f64();
    let rss_startup = peak_rss_mb();
    let mut loader = Loader::new(&set, args.context, 0, &Default::default())?;
    if let Some(n) = args.read_ahead {
        loader.set_read_ahead(n);
    }
    let n = args.batch * args.context;
    let (mut x, mut y) = (vec![0u32; n], vec![0u32; n]);
    loader.next_batch_into(&set, &mut x, &mut y)?; // starts the read-ahead thread
    let (t, cpu) = (Instant::now(), process_cpu_seconds());
    let mut check = 0u64;
    for _ in 0..args.batches {
        loader.next_batch_into(&set, &mut x, &mut y)?;
        check = check.wrapping_add(x[n / 2] as u64);
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds() - cpu;
    let tokens = (args.batches * n) as f64;
    let set_tokens: u64 = (0..set.len()).map(|r| set.row(r).n_tokens as u64).sum();
    println!(
        "{}",
        serde_json::json!({
            "dataset": dataset,
            "docs": set.len(),
            "shards": shards,
            "set_tokens": set_tokens,
            "set_token_gb": set_tokens as f64 * 2.0 / 1e9,
            "context": args.context,
            "batch": args.batch,
            "batches": args.batches,
            "startup_seconds": startup,
            "val_docs": val.len(),
            "unigram_bits_per_byte": unigram,
            "tokens_per_second": tokens / secs,
            "tokens_per_cpu_second": tokens / cpu.max(1e-9),
            "windows_read": loader.state.windows,
            "epochs": loader.state.cursors.values().map(|c| c.0).max(),
            "peak_rss_mb_after_startup": (rss_startup * 10.0).round() / 10.0,
            "peak_rss_mb": (peak_rss_mb() * 10.0).round() / 10.0,
            "checksum": check,
        })
    );
    Ok(())
}

fn images(args: ImagesArgs) -> Result<()> {
    let mut cfg = ImageConfig::preset(args.preprocess.into());
    if let Some(r) = args.resampler {
        cfg.resampler = r.into();
    }
    if args.no_dct_scaling {
        cfg.dct_scaling = false;
    }
    cfg.validate().map_err(anyhow::Error::msg)?;
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }

    let blobs = args
        .files
        .iter()
        .map(|p| {
            let ext = p.extension().and_then(|e| e.to_str()).map(str::to_owned);
            std::fs::read(p)
                .map(|b| (b, ext))
                .with_context(|| format!("reading {}", p.display()))
        })
        .collect::<Result<Vec<_>>>()?;

    let (seconds, out_bytes) = if args.encode_only {
        let squares = blobs
            .iter()
            .zip(&args.files)
            .map(|((b, ext), p)| {
                prepare(b, ext.as_deref(), &cfg)
                    .with_context(|| format!("preparing {}", p.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        let one_pass = || -> Result<u64> {
            let mut total = 0u64;
            for sq in &squares {
                total += jpeg::encode(sq, cfg.size, cfg.size, &cfg.jpeg, true)?.len() as u64;
            }
            Ok(total)
        };
        timed(args.repeat, one_pass)?
    } else {
        let one_pass = || -> Result<u64> {
            let mut total = 0u64;
            for ((b, ext), p) in blobs.iter().zip(&args.files) {
                let out = process_image(b, ext.as_deref(), &cfg);
                match out.codec {
                    Some(c) => total += c.len() as u64,
                    None => bail!(
                        "{}: {} ({})",
                        p.display(),
                        out.status().as_str(),
                        out.error.unwrap_or_default()
                    ),
                }
            }
            Ok(total)
        };
        timed(args.repeat, one_pass)?
    };

    let n = blobs.len() as u64 * args.repeat as u64;
    let resampler = match cfg.resampler {
        Resampler::Lanczos3 => "lanczos3",
        Resampler::PillowBilinear => "pillow-bilinear",
        Resampler::PillowLanczos => "pillow-lanczos",
    };
    let preset = match args.preprocess {
        PreprocessArg::Default => "default",
        PreprocessArg::Paper => "paper",
    };
    let mode = if args.encode_only {
        "encode-only"
    } else {
        "end-to-end"
    };
    let line = serde_json::json!({
        "tool": "codeclm",
        "mode": mode,
        "images": n,
        "seconds": (seconds * 1e6).round() / 1e6,
        "images_per_s": if seconds > 0.0 { Some((n as f64 / seconds * 1e3).round() / 1e3) } else { None },
        "peak_rss_mb": (peak_rss_mb() * 10.0).round() / 10.0,
        "config": format!(
            "{preset} preset, {resampler}, dct_scaling={}, {mode}",
            cfg.dct_scaling
        ),
        "preprocess": preset,
        "resampler": resampler,
        "dct_scaling": cfg.dct_scaling,
        "repeat": args.repeat,
        "files": blobs.len(),
        "out_bytes": out_bytes,
    });
    println!("{line}");
    Ok(())
}

fn videos(args: VideosArgs) -> Result<()> {
    let cfg = codeclm_codec::h264::VideoConfig::default();
    let clips: Vec<Vec<u8>> = args
        .files
        .iter()
        .map(|f| std::fs::read(f).with_context(|| format!("reading {}", f.display())))
        .collect::<Result<_>>()?;
    let mut bytes_out = 0usize;
    for (clip, name) in clips.iter().zip(&args.files) {
        let v = codeclm_codec::h264::encode_bytes(clip, &cfg)
            .with_context(|| format!("encoding {}", name.display()))?;
        bytes_out += v.h264.len();
    }
    let started = Instant::now();
    for _ in 0..args.repeat.max(1) {
        for clip in &clips {
            let v = codeclm_codec::h264::encode_bytes(clip, &cfg)?;
            std::hint::black_box(v.h264.len());
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let n = clips.len() as f64 * args.repeat.max(1) as f64;
    let line = serde_json::json!({
        "tool": "codeclm",
        "clips": clips.len(),
        "repeat": args.repeat.max(1),
        "seconds": seconds,
        "clips_per_second": n / seconds.max(1e-9),
        "h264_bytes_per_pass": bytes_out,
        "peak_rss_mb": (peak_rss_mb() * 10.0).round() / 10.0,
    });
    println!("{line}");
    Ok(())
}

fn tokens(args: TokensArgs) -> Result<()> {
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let vocab =
        Vocab::load(&args.vocab).with_context(|| format!("loading {}", args.vocab.display()))?;
    let hf = tokenizers::Tokenizer::from_file(&args.vocab)
        .map_err(|e| anyhow::anyhow!("tokenizers could not load {}: {e}", args.vocab.display()))?;
    let ds = Dataset::open(&args.dataset)
        .with_context(|| format!("opening dataset {}", args.dataset.display()))?;
    // A benchmark of the codec bytes in memory: for a dataset that fits (the bundled one).
    let rows = ds.load_rows(codeclm_formats::RowFilter::OK)?;
    if rows.is_empty() {
        bail!("{} has no successful samples", args.dataset.display());
    }
    let streams = rows
        .iter()
        .map(|r| {
            ds.codec_bytes(r)
                .with_context(|| format!("reading sample {}", r.sample_id))
        })
        .collect::<Result<Vec<_>>>()?;
    // The char strings HF needs are built up front, outside its timing (in its favour).
    let texts: Vec<String> = streams.iter().map(|s| bytes_to_chars(s)).collect();
    let codec_bytes: u64 = streams.iter().map(|s| s.len() as u64).sum();

    let ours_pass = |keep: Option<&mut Vec<Vec<u32>>>| -> u64 {
        let mut ids = Vec::new();
        let mut total = 0u64;
        match keep {
            Some(all) => {
                for s in &streams {
                    let mut v = Vec::with_capacity(s.len());
                    vocab.encode(s, &mut v);
                    total += v.len() as u64;
                    all.push(v);
                }
            }
            None => {
                for s in &streams {
                    ids.clear();
                    vocab.encode(s, &mut ids);
                    total += ids.len() as u64;
                }
            }
        }
        total
    };
    let hf_pass = |ours: Option<&[Vec<u32>]>| -> Result<u64> {
        let mut total = 0u64;
        for (i, t) in texts.iter().enumerate() {
            let enc = hf
                .encode(t.as_str(), false)
                .map_err(|e| anyhow::anyhow!("tokenizers: {e}"))?;
            let got = enc.get_ids();
            if let Some(ours) = ours {
                if got != ours[i].as_slice() {
                    let at = got
                        .iter()
                        .zip(&ours[i])
                        .position(|(a, b)| a != b)
                        .unwrap_or(got.len().min(ours[i].len()));
                    bail!(
                        "sample {}: our ids differ from tokenizers' ({} vs {} tokens, first difference at token {at}): the encoder is not exact for {}",
                        rows[i].sample_id,
                        ours[i].len(),
                        got.len(),
                        args.vocab.display()
                    );
                }
            }
            total += got.len() as u64;
        }
        Ok(total)
    };

    // Untimed pass of each: our ids, checked against HF's on every sample.
    let mut ours_ids = Vec::with_capacity(streams.len());
    let tokens = ours_pass(Some(&mut ours_ids));
    hf_pass(Some(&ours_ids))?;
    if let Some(path) = &args.ids_out {
        write_ids(
            path,
            &rows
                .iter()
                .map(|r| r.sample_id.as_str())
                .collect::<Vec<_>>(),
            &ours_ids,
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }
    drop(ours_ids);

    let (mut ours_s, mut hf_s) = (Vec::new(), Vec::new());
    for _ in 0..args.repeat {
        let t0 = Instant::now();
        let n = ours_pass(None);
        ours_s.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        let m = hf_pass(None)?;
        hf_s.push(t0.elapsed().as_secs_f64());
        if n != tokens || m != tokens {
            bail!("token counts changed between passes ({tokens}, {n}, {m})");
        }
    }
    let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let mb = codec_bytes as f64 / 1e6;
    let r3 = |x: f64| (x * 1e3).round() / 1e3;
    let line = serde_json::json!({
        "tool": "codeclm",
        "mode": "tokens",
        "samples": streams.len(),
        "codec_mb": (mb * 1e6).round() / 1e6,
        "tokens": tokens,
        "mean_tokens_per_sample": r3(tokens as f64 / streams.len() as f64),
        "mean_codec_bytes_per_sample": r3(codec_bytes as f64 / streams.len() as f64),
        "bytes_per_token": (codec_bytes as f64 / tokens.max(1) as f64 * 1e4).round() / 1e4,
        "ours_mb_per_s": r3(mb / best(&ours_s)),
        "hf_rust_mb_per_s": r3(mb / best(&hf_s)),
        "ours_seconds": ours_s.iter().map(|&x| r3(x * 1e3) / 1e3).collect::<Vec<_>>(),
        "hf_rust_seconds": hf_s.iter().map(|&x| r3(x * 1e3) / 1e3).collect::<Vec<_>>(),
        "ids_identical": true,
        "peak_rss_mb": (peak_rss_mb() * 10.0).round() / 10.0,
        "vocab": args.vocab.display().to_string(),
        "vocab_hash": vocab.hash,
        "vocab_size": vocab.size,
        "pretokenize": vocab.pretokenize,
        "repeat": args.repeat,
    });
    println!("{line}");
    Ok(())
}

fn write_ids(path: &std::path::Path, sample_ids: &[&str], ids: &[Vec<u32>]) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let head = serde_json::json!({
        "sample_ids": sample_ids,
        "n_tokens": ids.iter().map(Vec::len).collect::<Vec<_>>(),
    });
    writeln!(f, "{head}")?;
    for doc in ids {
        for &id in doc {
            f.write_all(&id.to_le_bytes())?;
        }
    }
    f.flush()?;
    Ok(())
}

/// Decode + resize one image as `process_image` would, leaving the encode out.
fn prepare(bytes: &[u8], ext: Option<&str>, cfg: &ImageConfig) -> Result<Vec<u8>> {
    codeclm_etl::process::prepare(bytes, ext, cfg)
        .map(|(square, _)| square)
        .map_err(|failed| anyhow::anyhow!("{}", failed.error.unwrap_or_default()))
}

/// One untimed warm-up pass, then `repeat` timed passes: (seconds, output bytes of timed passes).
fn timed(repeat: u32, mut one_pass: impl FnMut() -> Result<u64>) -> Result<(f64, u64)> {
    one_pass()?;
    let mut out_bytes = 0u64;
    let t0 = Instant::now();
    for _ in 0..repeat {
        out_bytes += one_pass()?;
    }
    Ok((t0.elapsed().as_secs_f64(), out_bytes))
}

/// Peak resident set size of this process in MiB (`ru_maxrss` is KiB on Linux).
fn peak_rss_mb() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes into the struct we own.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return f64::NAN;
    }
    let kib = ru.ru_maxrss as f64;
    if cfg!(target_os = "macos") {
        kib / (1024.0 * 1024.0) // bytes there
    } else {
        kib / 1024.0
    }
}

fn fid_bench(args: FidBenchArgs) -> Result<()> {
    let net = super::eval::load_net(args.weights.as_deref(), args.device, "bench fid")?;
    let files: Vec<PathBuf> = (0..args.repeat.max(1))
        .flat_map(|_| args.files.iter().cloned())
        .collect();
    // Warm-up: one batch (allocations, thread pools), untimed.
    codeclm_sample::eval::features_of_files(
        &net,
        &files[..args.batch.min(files.len())],
        args.batch,
        "warm-up",
        true,
    )?;
    let start = Instant::now();
    let set =
        codeclm_sample::eval::features_of_files(&net, &files, args.batch, "fid features", true)?;
    let secs = start.elapsed().as_secs_f64();
    // The Fréchet distance, the first half of the features against the second: at full
    // dimension (2048x2048 eigendecompositions; the time does not depend on the number of
    // images), and by the exact low-rank path taken with fewer images than dimensions.
    let half = set.images / 2 * fid::FEATURE_DIM;
    let a = fid::Stats::from_features(&set.features[..half], fid::FEATURE_DIM)?;
    let b = fid::Stats::from_features(&set.features[half..2 * half], fid::FEATURE_DIM)?;
    let t = Instant::now();
    let fid_halves = fid::frechet_distance(&a, &b)?;
    let low_rank_secs = t.elapsed().as_secs_f64();
    let full = |s: &fid::Stats| fid::Stats {
        factor: None,
        ..s.clone()
    };
    let t = Instant::now();
    let fid_full = fid::frechet_distance(&full(&a), &full(&b))?;
    let frechet_secs = t.elapsed().as_secs_f64();
    let threads = rayon::current_num_threads();
    let line = serde_json::json!({
        "bench": "fid-features",
        "images": set.images,
        "failed": set.failed.len(),
        "batch": args.batch,
        "seconds": secs,
        "images_per_s": set.images as f64 / secs,
        "threads": threads,
        "images_per_s_per_thread": set.images as f64 / secs / threads as f64,
        "frechet_2048_seconds": frechet_secs,
        "frechet_low_rank_seconds": low_rank_secs,
        "fid_first_half_vs_second": fid_halves,
        "fid_first_half_vs_second_full_path": fid_full,
        "peak_rss_mb": (peak_rss_mb() * 10.0).round() / 10.0,
    });
    writeln!(std::io::stdout(), "{line}")?;
    Ok(())
}
