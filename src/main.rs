//! `codeclm`: the command line. Glue only: parse arguments once into validated configs, call the
//! libraries, print the whole error chain on failure.

mod bench;
mod eval_cli;
mod eval_run;
mod model_cli;
mod run_dir;
mod sample_cli;
mod tokens_cli;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use codeclm_manifests::Dataset;
use codeclm_pipeline::decode::ColorConvert;
use codeclm_pipeline::jpeg::Subsampling;
use codeclm_pipeline::resize::{Resampler, ResizeMode};
use codeclm_pipeline::{
    BuildOptions, BuildSettings, ImageConfig, Preprocess, SourceKind, SourceSpec, VideoConfig,
};

#[derive(Parser)]
#[command(
    name = "codeclm",
    version,
    about = "Images and videos to canonical codec bytes, tokens and compact language models (Jpeg-LM)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build, inspect, export and merge datasets of codec bytes.
    #[command(subcommand)]
    Dataset(DatasetCommand),
    /// Byte-level BPE vocabularies over codec bytes.
    #[command(subcommand)]
    Vocab(tokens_cli::VocabCommand),
    /// Benchmarks: single-threaded images/s and peak memory (see tools/bench_compare.py).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Evaluation: FID the paper's way (needs `make fid-weights`).
    #[command(subcommand)]
    Eval(eval_cli::EvalCommand),
    /// Train a Llama model on a dataset's token shards (or --resume a run).
    Train(model_cli::TrainArgs),
    /// Draw images (or videos) from a trained run, unconditionally or from partial prompts;
    /// writes the samples, a contact sheet and a decodability report.
    Sample(sample_cli::SampleArgs),
    /// Trained models: logits for a token sequence, preset sizes and memory.
    #[command(subcommand)]
    Model(model_cli::ModelCommand),
}

#[derive(Subcommand)]
enum DatasetCommand {
    /// Turn images into JPEG and videos into H.264 codec bytes in shards indexed by Parquet
    /// manifests (resumable).
    Build(BuildArgs),
    /// Write samples as standalone files: `<sample_id>.jpg` (tables spliced back) for images,
    /// `<sample_id>.h264` and a playable `<sample_id>.mp4` for videos.
    Export(ExportArgs),
    /// Print a summary: counts by status and split, bytes, codec length, build throughput.
    Inspect { dir: PathBuf },
    /// Merge datasets built by separate workers (--shard-index/--num-shards) into one.
    Merge {
        /// The merged dataset (may be one of the inputs; with no inputs, consolidates it in place).
        #[arg(long)]
        out: PathBuf,
        inputs: Vec<PathBuf>,
    },
    /// Read every record of every shard and check it against the manifest.
    Verify { dir: PathBuf },
    /// Write the token shards of a vocabulary for every sample (reads codec shards, never media).
    Tokenize(tokens_cli::TokenizeArgs),
    /// Turn token sequences back into files (JPEG with the tables spliced back).
    Decode(tokens_cli::DecodeArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum SourceKindArg {
    Auto,
    Dir,
    List,
    Tar,
    Parquet,
}

#[derive(Clone, Copy, ValueEnum)]
enum PreprocessArg {
    Default,
    Paper,
}

#[derive(Clone, Copy, ValueEnum)]
enum ResizeArg {
    CenterCrop,
    Pad,
    Stretch,
}

#[derive(Clone, Copy, ValueEnum)]
enum ResamplerArg {
    Lanczos3,
    PillowBilinear,
    PillowLanczos,
}

impl From<PreprocessArg> for Preprocess {
    fn from(p: PreprocessArg) -> Preprocess {
        match p {
            PreprocessArg::Default => Preprocess::Default,
            PreprocessArg::Paper => Preprocess::Paper,
        }
    }
}

impl From<ResamplerArg> for Resampler {
    fn from(r: ResamplerArg) -> Resampler {
        match r {
            ResamplerArg::Lanczos3 => Resampler::Lanczos3,
            ResamplerArg::PillowBilinear => Resampler::PillowBilinear,
            ResamplerArg::PillowLanczos => Resampler::PillowLanczos,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum AlphaArg {
    /// Composite on white.
    White,
    /// Drop alpha like Pillow's convert("RGB").
    Drop,
}

#[derive(Args)]
struct BuildArgs {
    /// Images: a directory tree, a file list (one path a line), a webdataset .tar (or a
    /// directory of them), or a Parquet file (or directory) with an image-bytes column.
    #[arg(long, required_unless_present = "videos")]
    images: Option<PathBuf>,
    /// Videos, from the same kinds of source as --images; encoded to H.264 with the paper's
    /// x264 settings (byte-identical to its ffmpeg command). Images and videos may share one
    /// dataset.
    #[arg(long)]
    videos: Option<PathBuf>,
    /// The dataset directory (created; rerunning with the same arguments resumes it).
    #[arg(long)]
    out: PathBuf,
    /// Worker threads (default: every core).
    #[arg(long)]
    workers: Option<usize>,
    /// This machine's index among --num-shards workers; each takes parts i, i+n, i+2n, ...
    #[arg(long, default_value_t = 0)]
    shard_index: u32,
    #[arg(long, default_value_t = 1)]
    num_shards: u32,
    /// What --images is (auto-detected by default).
    #[arg(long, value_enum, default_value_t = SourceKindArg::Auto)]
    source_kind: SourceKindArg,
    /// Parquet sources: the image column (default: the first {bytes, path} struct or binary column).
    #[arg(long)]
    image_column: Option<String>,
    /// Preset: `default` (DCT-scaled decode, Lanczos3, EXIF orientation, alpha on white) or
    /// `paper` (the paper's Python pipeline byte for byte: Pillow convert("RGB"), centre crop,
    /// Pillow BILINEAR). Options below override the preset.
    #[arg(long, value_enum, default_value_t = PreprocessArg::Default)]
    preprocess: PreprocessArg,
    /// Output side in pixels.
    #[arg(long)]
    size: Option<u32>,
    #[arg(long, value_enum)]
    resize: Option<ResizeArg>,
    #[arg(long, value_enum)]
    resampler: Option<ResamplerArg>,
    /// Decode large JPEGs at 1/2, 1/4 or 1/8 size in the DCT domain (never below --size).
    #[arg(long)]
    dct_scaling: Option<bool>,
    /// Apply the EXIF orientation tag.
    #[arg(long)]
    exif_orientation: Option<bool>,
    #[arg(long, value_enum)]
    alpha: Option<AlphaArg>,
    /// Refuse images with more pixels than this (decompression bombs).
    #[arg(long)]
    max_pixels: Option<u64>,
    /// JPEG quality (paper: 25).
    #[arg(long)]
    quality: Option<u8>,
    /// Chroma subsampling: 4:2:0 (paper), 4:2:2 or 4:4:4.
    #[arg(long)]
    subsampling: Option<String>,
    /// Restart marker every N MCUs (paper: 1).
    #[arg(long)]
    restart_interval: Option<u16>,
    /// Video frame rate (paper: 3).
    #[arg(long, default_value_t = 3)]
    fps: u32,
    /// Video frame size WxH; the source is fitted inside and padded (paper: 256x144).
    #[arg(long, default_value = "256x144")]
    video_size: String,
    /// Seconds of video kept from the start (paper: 5).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// H.264 constant quantiser (paper: 37).
    #[arg(long, default_value_t = 37)]
    qp: u32,
    /// Keep x264's SEI (version and options string, 557 bytes, the same in every video): the
    /// exact bytes of the paper's ffmpeg command. Dropped by default (no picture information).
    #[arg(long)]
    keep_x264_sei: bool,
    /// Refuse videos with more pixels per frame than this.
    #[arg(long)]
    max_video_pixels: Option<u64>,
    /// Fraction of samples in the validation split.
    #[arg(long, default_value_t = 0.01)]
    val_fraction: f64,
    /// Inputs per part (the unit of resume and sharding).
    #[arg(long, default_value_t = 10_000)]
    part_size: usize,
    /// Roll a part's shard over to a new file past this many MiB of codec bytes.
    #[arg(long, default_value_t = 256)]
    shard_max_mib: u64,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

#[derive(Args)]
struct ExportArgs {
    #[arg(long)]
    dataset: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Sample ids to export (comma-separated).
    #[arg(long, value_delimiter = ',', conflicts_with = "all")]
    ids: Vec<String>,
    /// Export every successful sample.
    #[arg(long)]
    all: bool,
    /// Also write the abbreviated stream as `<sample_id>.abbr.jpg`.
    #[arg(long)]
    abbreviated: bool,
}

fn main() -> ExitCode {
    tune_allocator();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CODECLM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every image allocates a few decode and resize buffers of 0.2-3 MB. glibc serves blocks that
/// large with a fresh mmap and returns them with munmap, so each image paid for page faults on
/// all of its memory again (22% of the paper preset's time in a profile). Keeping them on the
/// heap up to 64 MB makes the buffers reused: +15-40% images/s measured, peak RSS unchanged.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Dataset(DatasetCommand::Build(args)) => build(args),
        Command::Dataset(DatasetCommand::Export(args)) => export(args),
        Command::Dataset(DatasetCommand::Inspect { dir }) => {
            let ds = Dataset::open(&dir)
                .with_context(|| format!("opening dataset {}", dir.display()))?;
            print!("{}", ds.summary()?);
            Ok(())
        }
        Command::Dataset(DatasetCommand::Merge { out, inputs }) => {
            let s = codeclm_manifests::dataset::merge(&inputs, &out)
                .with_context(|| format!("merging into {}", out.display()))?;
            let total = s
                .parts_total
                .map(|t| t.to_string())
                .unwrap_or_else(|| "?".into());
            println!(
                "merged: {} parts copied, {} already present; {} of {} parts, {} samples in {}",
                s.parts_copied,
                s.parts_skipped,
                s.parts_present,
                total,
                s.rows,
                out.join("samples.parquet").display()
            );
            if s.parts_total.is_some_and(|t| t != s.parts_present) {
                tracing::warn!(
                    "the dataset is incomplete: some workers have not finished their parts yet"
                );
            }
            Ok(())
        }
        Command::Dataset(DatasetCommand::Verify { dir }) => verify(&dir),
        Command::Dataset(DatasetCommand::Tokenize(args)) => tokens_cli::tokenize(args),
        Command::Dataset(DatasetCommand::Decode(args)) => tokens_cli::decode(args),
        Command::Vocab(tokens_cli::VocabCommand::Train(args)) => tokens_cli::train(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Eval(cmd) => eval_cli::run(cmd),
        Command::Train(args) => model_cli::train_cmd(args),
        Command::Sample(args) => sample_cli::sample(args),
        Command::Model(cmd) => model_cli::model_cmd(cmd),
    }
}

fn image_config(args: &BuildArgs) -> Result<ImageConfig> {
    let mut c = ImageConfig::preset(args.preprocess.into());
    if let Some(s) = args.size {
        c.size = s;
    }
    if let Some(r) = args.resize {
        c.resize = match r {
            ResizeArg::CenterCrop => ResizeMode::CenterCrop,
            ResizeArg::Pad => ResizeMode::Pad,
            ResizeArg::Stretch => ResizeMode::Stretch,
        };
    }
    if let Some(r) = args.resampler {
        c.resampler = r.into();
    }
    if let Some(v) = args.dct_scaling {
        c.dct_scaling = v;
    }
    if let Some(v) = args.exif_orientation {
        c.decode.apply_exif_orientation = v;
    }
    if let Some(a) = args.alpha {
        c.decode.color = match a {
            AlphaArg::White => ColorConvert::CompositeWhite,
            AlphaArg::Drop => ColorConvert::Pillow,
        };
    }
    if let Some(v) = args.max_pixels {
        c.decode.max_pixels = v;
    }
    if let Some(q) = args.quality {
        c.jpeg.quality = q;
    }
    if let Some(s) = &args.subsampling {
        c.jpeg.subsampling = Subsampling::parse(s)
            .with_context(|| format!("--subsampling {s}: use 4:2:0, 4:2:2 or 4:4:4"))?;
    }
    if let Some(r) = args.restart_interval {
        c.jpeg.restart_interval = r;
    }
    c.validate().map_err(anyhow::Error::msg)?;
    Ok(c)
}

fn video_config(args: &BuildArgs) -> Result<VideoConfig> {
    let mut c = VideoConfig {
        fps: args.fps,
        qp: args.qp,
        keep_x264_sei: args.keep_x264_sei,
        duration_ms: (args.seconds * 1000.0).round().clamp(0.0, u32::MAX as f64) as u32,
        ..VideoConfig::default()
    };
    let (w, h) = args
        .video_size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
        .with_context(|| format!("--video-size {}: use WxH, e.g. 256x144", args.video_size))?;
    (c.width, c.height) = (w, h);
    if let Some(v) = args.max_video_pixels {
        c.max_pixels = v;
    }
    c.validate().map_err(anyhow::Error::msg)?;
    Ok(c)
}

fn source_spec(path: &std::path::Path, args: &BuildArgs) -> Result<SourceSpec> {
    let mut spec = match args.source_kind {
        SourceKindArg::Auto => SourceSpec::detect(path)?,
        kind => SourceSpec {
            kind: match kind {
                SourceKindArg::Dir => SourceKind::Dir,
                SourceKindArg::List => SourceKind::List,
                SourceKindArg::Tar => SourceKind::Tar,
                _ => SourceKind::Parquet,
            },
            path: path.to_path_buf(),
            column: None,
        },
    };
    spec.column = args.image_column.clone();
    Ok(spec)
}

fn build(args: BuildArgs) -> Result<()> {
    let image = image_config(&args)?;
    let video = video_config(&args)?;
    let images = args
        .images
        .as_deref()
        .map(|p| source_spec(p, &args))
        .transpose()?;
    let videos = args
        .videos
        .as_deref()
        .map(|p| source_spec(p, &args))
        .transpose()?;
    let mut settings = BuildSettings::with_sources(images, image, videos, video);
    settings.val_fraction = args.val_fraction;
    settings.part_size = args.part_size;
    settings.shard_max_bytes = args.shard_max_mib.max(1) << 20;
    let workers = args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let opts = BuildOptions {
        out: args.out.clone(),
        settings,
        workers,
        shard_index: args.shard_index,
        num_shards: args.num_shards,
        progress: !args.no_progress,
    };
    tracing::info!(
        "building {} from{}{} with {workers} workers{}",
        args.out.display(),
        opts.settings
            .source
            .as_ref()
            .map(|s| format!(" images {} ({:?})", s.path.display(), s.kind))
            .unwrap_or_default(),
        opts.settings
            .videos
            .as_ref()
            .map(|s| format!(" videos {} ({:?})", s.path.display(), s.kind))
            .unwrap_or_default(),
        if args.num_shards > 1 {
            format!(", shard {} of {}", args.shard_index, args.num_shards)
        } else {
            String::new()
        }
    );
    let s = codeclm_pipeline::build(&opts)
        .with_context(|| format!("building dataset {}", args.out.display()))?;
    let failures = s
        .by_status
        .iter()
        .filter(|(k, _)| k.as_str() != "ok")
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>();
    println!(
        "built {} inputs ({} ok, {} failed{}) in {:.1} s: {:.1} inputs/s, {:.1}/s per worker; parts {} built, {} already done, {} in source; {:.2} MB of codec bytes",
        s.processed,
        s.ok,
        s.failed,
        if failures.is_empty() { String::new() } else { format!(": {}", failures.join(", ")) },
        s.seconds,
        s.images_per_second(),
        s.images_per_second() / s.workers.max(1) as f64,
        s.parts_built,
        s.parts_skipped,
        s.parts_total,
        s.codec_bytes as f64 / 1e6,
    );
    if s.complete {
        println!(
            "dataset complete: {}",
            args.out.join("samples.parquet").display()
        );
    } else {
        println!(
            "this worker's parts are done; when every worker has finished run `codeclm dataset merge --out DIR <each worker's --out>` (or `--out {}` alone if they share it)",
            args.out.display()
        );
    }
    Ok(())
}

fn export(args: ExportArgs) -> Result<()> {
    let ds = Dataset::open(&args.dataset)
        .with_context(|| format!("opening dataset {}", args.dataset.display()))?;
    if !args.all && args.ids.is_empty() {
        bail!("say which samples to export: --ids ID,ID,... or --all");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let rows: Vec<_> = if args.all {
        ds.rows().iter().filter(|r| r.is_ok()).collect()
    } else {
        args.ids
            .iter()
            .map(|id| ds.find(id).with_context(|| format!("no sample {id} in {}; `codeclm dataset inspect` lists counts, the manifest lists ids", args.dataset.display())))
            .collect::<Result<_>>()?
    };
    let fps = ds
        .config
        .build
        .pointer("/video/fps")
        .and_then(|v| v.as_u64())
        .unwrap_or(3) as u32;
    for row in &rows {
        if row.codec.as_deref() == Some("h264") {
            let h264 = ds
                .codec_bytes(row)
                .with_context(|| format!("exporting sample {} ({})", row.sample_id, row.source))?;
            codeclm_manifests::write_atomic(
                &args.out.join(format!("{}.h264", row.sample_id)),
                &h264,
            )?;
            let mp4 = args.out.join(format!("{}.mp4", row.sample_id));
            codeclm_pipeline::annexb_to_mp4(&h264, fps, &mp4).with_context(|| {
                format!("remuxing sample {} ({}) to MP4", row.sample_id, row.source)
            })?;
            continue;
        }
        let full = ds
            .jpeg_file(row)
            .with_context(|| format!("exporting sample {} ({})", row.sample_id, row.source))?;
        let path = args.out.join(format!("{}.jpg", row.sample_id));
        codeclm_manifests::write_atomic(&path, &full)?;
        if args.abbreviated {
            let abbr = ds.codec_bytes(row)?;
            codeclm_manifests::write_atomic(
                &args.out.join(format!("{}.abbr.jpg", row.sample_id)),
                &abbr,
            )?;
        }
    }
    println!("exported {} samples to {}", rows.len(), args.out.display());
    Ok(())
}

fn verify(dir: &std::path::Path) -> Result<()> {
    let ds = Dataset::open(dir).with_context(|| format!("opening dataset {}", dir.display()))?;
    let mut checked = 0u64;
    let mut bytes = 0u64;
    for row in ds.rows().iter().filter(|r| r.is_ok()) {
        let b = ds
            .codec_bytes(row)
            .with_context(|| format!("sample {} ({})", row.sample_id, row.source))?;
        if Some(b.len() as u64) != row.codec_bytes {
            bail!(
                "sample {}: {} codec bytes in the shard, {:?} in the manifest; rebuild its part",
                row.sample_id,
                b.len(),
                row.codec_bytes
            );
        }
        checked += 1;
        bytes += b.len() as u64;
    }
    println!("verified {checked} samples, {:.2} MB of codec bytes: every record matches its manifest row", bytes as f64 / 1e6);
    Ok(())
}
