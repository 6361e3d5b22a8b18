//! `codeclm dataset ...`: build, inspect, verify, export and merge datasets (tokenize and decode
//! are in [`super::tokens`]).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use codeclm_etl::{BuildOptions, BuildSettings, Isolation};
use codeclm_formats::tokens::TokenLayout;
use codeclm_formats::{Dataset, Modality};

use super::flags::{self, AlphaArg, PreprocessArg, ResamplerArg, ResizeArg, SourceKindArg};
use super::tokens;

#[derive(Subcommand)]
pub enum DatasetCommand {
    /// Turn images into JPEG and videos into H.264 codec bytes in shards indexed by Parquet
    /// manifests (resumable).
    Build(Box<BuildArgs>),
    /// List the parts of a source and their inputs once (`plan.parquet` + `plan.json` in
    /// --out), in bounded memory: then every `dataset build --out DIR` worker reads only its
    /// parts, and a source changed since planning is an error. Takes the build's source flags
    /// (--images, --videos, --source-kind, --image-column, --part-size).
    Plan(Box<BuildArgs>),
    /// Write samples as standalone files: `<sample_id>.jpg` (tables spliced back) for images,
    /// `<sample_id>.h264` and a playable `<sample_id>.mp4` for videos.
    Export(ExportArgs),
    /// Print a summary: counts by status and split, bytes, codec length, build throughput.
    Inspect {
        #[arg(long)]
        dataset: PathBuf,
    },
    /// Merge datasets built by separate workers (--shard-index/--num-shards) into one.
    Merge {
        /// The merged dataset (may be one of the inputs; with no inputs, consolidates it in place).
        #[arg(long)]
        out: PathBuf,
        inputs: Vec<PathBuf>,
    },
    /// Read every record of every codec shard and check it against the manifest; read every
    /// frame of every token shard (checksums) and check each document's BOS..EOS span; report
    /// token parts tokenized from codec parts that changed since (stale).
    Verify {
        #[arg(long)]
        dataset: PathBuf,
    },
    /// Write the token shards of a vocabulary for every sample (reads codec shards, never media).
    Tokenize(tokens::TokenizeArgs),
    /// Turn token sequences back into files (JPEG with the tables spliced back).
    Decode(tokens::DecodeArgs),
    /// Write a token set's documents in other trainers' files: nanoGPT's uint16 `train.bin` /
    /// `val.bin` (+ `meta.pkl` with the vocabulary size) or Megatron-LM's indexed datasets
    /// (`train.bin` + `train.idx`, `val.bin` + `val.idx`).
    ExportTokens(tokens::ExportTokensArgs),
    /// Write the first training windows the trainer's loader gives for a seed and context
    /// (`context + 1` uint16 tokens each, row-major, raw little-endian): to inspect the data
    /// order, or to check another loader (the Python package's) against it.
    Windows(tokens::WindowsArgs),
    /// Copy a dataset from object storage (`s3://bucket/ds`, as `build --out` wrote it) into a
    /// local directory, for the commands that read one; a second pull fetches only what is new.
    Pull { url: String, dir: PathBuf },
}

#[derive(Args)]
pub struct BuildArgs {
    /// Images: a directory tree, a file list (one path a line), a webdataset .tar (or a
    /// directory of them), or a Parquet file (or directory) with an image-bytes column.
    #[arg(long)]
    pub(crate) images: Option<PathBuf>,
    /// Videos, from the same kinds of source as --images; encoded to H.264 with the paper's
    /// x264 settings (byte-identical to its ffmpeg command). Images and videos may share one
    /// dataset.
    #[arg(long)]
    pub(crate) videos: Option<PathBuf>,
    /// The dataset directory (created; rerunning with the same arguments resumes it), or an
    /// `s3://bucket/prefix` (built through a local stage, each part uploaded when it is done).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// The local stage of an `s3://` --out (default: $TMPDIR/codeclm-stage/<hash of the URL>):
    /// holds the manifests and about one part's shards per writer.
    #[arg(long)]
    pub(crate) stage: Option<PathBuf>,
    /// Worker threads (default: every core).
    #[arg(long)]
    pub(crate) workers: Option<usize>,
    /// This machine's index among --num-shards workers; each takes parts i, i+n, i+2n, ...
    /// When absent, read from a job array: SLURM_ARRAY_TASK_ID (of SLURM_ARRAY_TASK_COUNT) or
    /// Kubernetes' JOB_COMPLETION_INDEX (with --num-shards); else 0.
    #[arg(long)]
    pub(crate) shard_index: Option<u32>,
    /// Workers in all (default 1, or SLURM_ARRAY_TASK_COUNT under a Slurm array).
    #[arg(long)]
    pub(crate) num_shards: Option<u32>,
    /// What --images is (auto-detected by default).
    #[arg(long, value_enum, default_value_t = SourceKindArg::Auto)]
    pub(crate) source_kind: SourceKindArg,
    /// Parquet sources: the image column (default: the first {bytes, path} struct or binary column).
    #[arg(long)]
    pub(crate) image_column: Option<String>,
    /// Preset: `default` (DCT-scaled decode, Lanczos3, EXIF orientation, alpha on white) or
    /// `paper` (the paper's Python pipeline byte for byte: Pillow convert("RGB"), centre crop,
    /// Pillow BILINEAR). Options below override the preset.
    #[arg(long, value_enum, default_value_t = PreprocessArg::Default)]
    pub(crate) preprocess: PreprocessArg,
    /// Output side in pixels.
    #[arg(long)]
    pub(crate) size: Option<u32>,
    /// Random-resized crops per image (torchvision's RandomResizedCrop), each its own sample
    /// `<source id>-crop<k>` with its box in the manifest; 0 = one image per input under
    /// --resize. Not with --preprocess paper (the paper's crop is the centred one).
    #[arg(long, default_value_t = 0)]
    pub(crate) crops: u32,
    /// With --crops: the range of a crop's area as a fraction of the image's, `a,b`
    /// (default 0.08,1).
    #[arg(long)]
    pub(crate) crop_scale: Option<String>,
    /// With --crops: the range of a crop's aspect ratio width/height, `a,b`, drawn log-uniformly
    /// (default 0.75,1.3333).
    #[arg(long)]
    pub(crate) crop_ratio: Option<String>,
    #[arg(long, value_enum)]
    pub(crate) resize: Option<ResizeArg>,
    #[arg(long, value_enum)]
    pub(crate) resampler: Option<ResamplerArg>,
    /// Decode large JPEGs at 1/2, 1/4 or 1/8 size in the DCT domain (never below --size).
    #[arg(long)]
    pub(crate) dct_scaling: Option<bool>,
    /// Apply the EXIF orientation tag.
    #[arg(long)]
    pub(crate) exif_orientation: Option<bool>,
    #[arg(long, value_enum)]
    pub(crate) alpha: Option<AlphaArg>,
    /// Refuse images with more pixels than this (decompression bombs).
    #[arg(long)]
    pub(crate) max_pixels: Option<u64>,
    /// JPEG quality (paper: 25).
    #[arg(long)]
    pub(crate) quality: Option<u8>,
    /// Chroma subsampling: 4:2:0 (paper), 4:2:2 or 4:4:4.
    #[arg(long)]
    pub(crate) subsampling: Option<String>,
    /// Restart marker every N MCUs (paper: 1).
    #[arg(long)]
    pub(crate) restart_interval: Option<u16>,
    /// Video frame rate (paper: 3).
    #[arg(long, default_value_t = 3)]
    pub(crate) fps: u32,
    /// Video frame size WxH; the source is fitted inside and padded (paper: 256x144).
    #[arg(long, default_value = "256x144")]
    pub(crate) video_size: String,
    /// Seconds of video kept from the start (paper: 5).
    #[arg(long, default_value_t = 5.0)]
    pub(crate) seconds: f64,
    /// H.264 constant quantiser (paper: 37).
    #[arg(long, default_value_t = 37)]
    pub(crate) qp: u32,
    /// Keep x264's SEI (version and options string, 557 bytes, the same in every video): the
    /// exact bytes of the paper's ffmpeg command. Dropped by default (no picture information).
    #[arg(long)]
    pub(crate) keep_x264_sei: bool,
    /// Refuse videos with more pixels per frame than this.
    #[arg(long)]
    pub(crate) max_video_pixels: Option<u64>,
    /// Fraction of inputs in the validation split (all crops of an image share its split).
    #[arg(long, default_value_t = 0.01)]
    pub(crate) val_fraction: f64,
    /// Inputs per part (the unit of resume and sharding) [default: 10000, or the plan's].
    #[arg(long)]
    pub(crate) part_size: Option<usize>,
    /// Roll a part's shard over to a new file past this many MiB of codec bytes.
    #[arg(long, default_value_t = 256)]
    pub(crate) shard_max_mib: u64,
    /// Writer threads, each writing its own parts (one open part each) [default: one per 8
    /// workers]. The dataset's bytes do not depend on it.
    #[arg(long)]
    pub(crate) writers: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub(crate) no_progress: bool,
    /// Where inputs are decoded: `processes` (worker processes of this binary; a native crash
    /// in libjpeg or FFmpeg costs one `crashed` row) or `threads` (slightly less overhead; a
    /// crash ends the build).
    #[arg(long, value_enum, default_value_t = IsolationArg::Processes)]
    pub(crate) isolation: IsolationArg,
    /// Seconds one input may take (decode, resize, encode); past it, a `timeout` row. 0 = no
    /// limit.
    #[arg(long, default_value_t = 60.0)]
    pub(crate) item_timeout: f64,
    /// Inputs larger than this many bytes are `too_large` rows, never read.
    #[arg(long, default_value_t = 1 << 30)]
    pub(crate) max_input_bytes: u64,
    /// MiB of source bytes read and not yet encoded, at most (the reader waits past it).
    #[arg(long, default_value_t = 2048)]
    pub(crate) max_inflight_mib: u64,
    /// Redo the failed rows of finished parts (after an upgrade, or a transient read error) and
    /// keep the rest: the result is the dataset a fresh build would write now.
    #[arg(long)]
    pub(crate) retry_failed: bool,
    /// Seconds a part's lease lives without a heartbeat: another worker takes over a part whose
    /// builder stopped renewing it this long ago (a dead process on the same host at once).
    #[arg(long, default_value_t = 120)]
    pub(crate) lease_seconds: u64,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum IsolationArg {
    Processes,
    Threads,
}

#[derive(Args)]
pub struct ExportArgs {
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

pub fn run(cmd: DatasetCommand) -> Result<()> {
    match cmd {
        DatasetCommand::Build(args) => build(*args),
        DatasetCommand::Plan(args) => plan(*args),
        DatasetCommand::Export(args) => export(args),
        DatasetCommand::Inspect { dataset } => {
            let ds = open(&dataset)?;
            print!("{}", ds.summary()?);
            Ok(())
        }
        DatasetCommand::Merge { out, inputs } => merge(&out, &inputs),
        DatasetCommand::Verify { dataset } => verify(&dataset),
        DatasetCommand::Tokenize(args) => tokens::tokenize(args),
        DatasetCommand::Decode(args) => tokens::decode(args),
        DatasetCommand::ExportTokens(args) => tokens::export_tokens(args),
        DatasetCommand::Windows(args) => tokens::windows(args),
        DatasetCommand::Pull { url, dir } => pull(&url, &dir),
    }
}

/// The local stage of an object-storage --out, with its top-level files pulled.
fn mirror(args: &BuildArgs) -> Result<Option<std::sync::Arc<codeclm_etl::mirror::Mirror>>> {
    let Some(url) = codeclm_etl::source::url_of(&args.out) else {
        return Ok(None);
    };
    let m = codeclm_etl::mirror::Mirror::open(url, args.stage.clone())
        .with_context(|| format!("opening {url} and its local stage"))?;
    tracing::info!("{url}: staged in {}", m.stage().display());
    Ok(Some(std::sync::Arc::new(m)))
}

fn pull(url: &str, dir: &std::path::Path) -> Result<()> {
    let started = std::time::Instant::now();
    let (files, bytes) = codeclm_etl::mirror::pull(url, dir)
        .with_context(|| format!("pulling {url} into {}", dir.display()))?;
    println!(
        "pulled {files} files ({:.2} MB) from {url} into {} in {:.1} s",
        bytes as f64 / 1e6,
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Opens a dataset with the error every command gives for it.
pub fn open(dir: &std::path::Path) -> Result<Dataset> {
    Dataset::open(dir).with_context(|| format!("opening dataset {}", dir.display()))
}

fn merge(out: &std::path::Path, inputs: &[PathBuf]) -> Result<()> {
    let s = codeclm_formats::dataset::merge(inputs, out)
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
        tracing::warn!("the dataset is incomplete: some workers have not finished their parts yet");
    }
    Ok(())
}

fn plan(args: BuildArgs) -> Result<()> {
    let settings: BuildSettings = flags::build_settings(&args)?;
    let started = std::time::Instant::now();
    let bar = indicatif::ProgressBar::new_spinner();
    if args.no_progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mirror = mirror(&args)?;
    let out = mirror
        .as_ref()
        .map_or(args.out.clone(), |m| m.stage().to_path_buf());
    let header = codeclm_etl::builder::write_plan(&settings, &out, &|parts, inputs| {
        bar.set_message(format!("{parts} parts, {inputs} inputs"));
        bar.tick();
    })
    .with_context(|| format!("planning into {}", args.out.display()))?;
    if let Some(m) = &mirror {
        // The rows first: plan.json is what says a plan exists.
        m.push("plan.parquet")
            .and_then(|()| m.push("plan.json"))
            .with_context(|| format!("uploading the plan to {}", m.url()))?;
    }
    bar.finish_and_clear();
    println!(
        "planned {} parts, {} inputs in {:.1} s: {} (hash {}); now run `codeclm dataset build --out {}` on each worker",
        header.parts,
        header.inputs,
        started.elapsed().as_secs_f64(),
        codeclm_formats::plan::rows_path(&args.out).display(),
        header.hash,
        args.out.display()
    );
    Ok(())
}

fn build(args: BuildArgs) -> Result<()> {
    let mut settings: BuildSettings = flags::build_settings(&args)?;
    let mirror = mirror(&args)?;
    let out = mirror
        .as_ref()
        .map_or(args.out.clone(), |m| m.stage().to_path_buf());
    if let Some(plan) = codeclm_formats::plan::Plan::open(&out)
        .with_context(|| format!("reading the plan in {}", args.out.display()))?
    {
        // A planned output: its sources and part size come from the plan unless given (and
        // then they must agree with it; `build` checks).
        if args.images.is_none() && args.videos.is_none() {
            settings.use_plan_sources(&plan.header)?;
        }
        if args.part_size.is_none() {
            settings.part_size = plan.header.part_size;
        }
    }
    let workers = flags::workers(args.workers);
    let mut opts = BuildOptions::new(out, settings);
    opts.mirror = mirror;
    opts.workers = workers;
    let shard = flags::shard_choice(args.shard_index, args.num_shards, &|k| {
        std::env::var(k).ok()
    })?;
    opts.shard_index = shard.index;
    opts.num_shards = shard.count;
    opts.shard_from = shard.from.clone();
    opts.progress = !args.no_progress;
    opts.isolation = match args.isolation {
        IsolationArg::Threads => Isolation::Threads,
        IsolationArg::Processes => Isolation::Processes {
            exe: std::env::current_exe().context(
                "finding this binary to start the decode workers (or use --isolation threads)",
            )?,
            args: vec!["decode-worker".into()],
        },
    };
    if !(args.item_timeout >= 0.0 && args.item_timeout.is_finite()) {
        anyhow::bail!(
            "--item-timeout {} must be a number of seconds (0 = no limit)",
            args.item_timeout
        );
    }
    opts.item_timeout =
        (args.item_timeout > 0.0).then(|| std::time::Duration::from_secs_f64(args.item_timeout));
    opts.max_input_bytes = args.max_input_bytes;
    opts.max_inflight_bytes = args.max_inflight_mib.saturating_mul(1 << 20);
    opts.retry_failed = args.retry_failed;
    opts.lease_ttl = std::time::Duration::from_secs(args.lease_seconds);
    opts.writers = args.writers;
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
        if shard.count > 1 || shard.from != "flags" {
            format!(
                ", shard {} of {} (from {})",
                shard.index, shard.count, shard.from
            )
        } else {
            String::new()
        }
    );
    let s = codeclm_etl::build(&opts)
        .with_context(|| format!("building dataset {}", args.out.display()))?;
    let failures = s
        .by_status
        .iter()
        .filter(|(k, _)| k.as_str() != "ok")
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>();
    println!(
        "built {} inputs ({}{} ok, {} failed{}) in {:.1} s: {:.1} inputs/s, {:.1}/s per worker; parts {} built, {} already done, {} in source; {:.2} MB of codec bytes",
        s.processed,
        if s.samples == s.processed { String::new() } else { format!("{} samples: ", s.samples) },
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
    if let Some(n) = s.workers_per_writer() {
        println!(
            "{} writer(s): {:.1} CPU s; at these inputs one writer keeps up with about {n:.0} workers (--writers)",
            s.writers, s.writer_seconds
        );
    }
    if s.shard_from != "flags" {
        println!(
            "this worker is shard {} of {}, from the job array: {}",
            s.shard_index, s.num_shards, s.shard_from
        );
    }
    if s.parts_retried > 0 {
        println!(
            "--retry-failed: {} parts redone, {} inputs kept from the earlier build, {} decoded again",
            s.parts_retried,
            s.kept,
            s.processed - s.kept
        );
    }
    if let Some(slow) = s.slowest.first() {
        println!(
            "slowest input: {} ({:.2} s, {}); the run summary in {} lists the {}",
            slow.source,
            slow.seconds,
            slow.status,
            args.out.join("runs").display(),
            s.slowest.len()
        );
    }
    if s.parts_leased_elsewhere > 0 {
        println!(
            "{} parts are being built by other live workers (their leases are in {}): skipped; a rerun takes over any whose worker dies",
            s.parts_leased_elsewhere,
            args.out.join("parts").display()
        );
    }
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
    let ds = open(&args.dataset)?;
    if !args.all && args.ids.is_empty() {
        bail!("say which samples to export: --ids ID,ID,... or --all");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let settings = BuildSettings::of(&ds)?;
    let tables = ds.jpeg_tables();
    let mut exported = 0u64;
    let mut export_one = |row: &codeclm_formats::SampleRow| -> Result<()> {
        exported += 1;
        if row.modality == Modality::Video {
            let h264 = ds
                .codec_bytes(row)
                .with_context(|| format!("exporting sample {} ({})", row.sample_id, row.source))?;
            codeclm_formats::write_atomic(
                &args.out.join(format!("{}.h264", row.sample_id)),
                &h264,
            )?;
            let mp4 = args.out.join(format!("{}.mp4", row.sample_id));
            let fps = settings.video.fps;
            codeclm_formats::write_atomic_with(&mp4, |tmp| {
                codeclm_codec::h264::annexb_to_mp4(&h264, fps, tmp)
            })
            .with_context(|| {
                format!("remuxing sample {} ({}) to MP4", row.sample_id, row.source)
            })?;
            return Ok(());
        }
        let tables =
            tables.context("the dataset has no JPEG tables file (jpeg_tables.jpg): rebuild it")?;
        let exporting = || format!("exporting sample {} ({})", row.sample_id, row.source);
        let abbr = ds.codec_bytes(row).with_context(exporting)?;
        let full = codeclm_codec::jpeg::splice_tables(&abbr, tables).with_context(exporting)?;
        let path = args.out.join(format!("{}.jpg", row.sample_id));
        codeclm_formats::write_atomic(&path, &full)?;
        if args.abbreviated {
            codeclm_formats::write_atomic(
                &args.out.join(format!("{}.abbr.jpg", row.sample_id)),
                &abbr,
            )?;
        }
        Ok(())
    };
    if args.all {
        // Streamed: one slice of rows in memory at a time.
        ds.for_each_row(codeclm_formats::RowFilter::OK, |row| {
            export_one(&row)?;
            Ok::<_, anyhow::Error>(std::ops::ControlFlow::Continue(()))
        })?;
    } else {
        // Each id through the sample-id index (built on the first lookup), not a scan.
        for id in &args.ids {
            let row = ds
                .find(id)
                .with_context(|| format!("looking up sample {id}"))?
                .with_context(|| format!("no sample {id} in {}; `codeclm dataset inspect` lists counts, the manifest lists ids", args.dataset.display()))?;
            if !row.is_ok() {
                bail!(
                    "sample {id} has no codec bytes to export: its status is {} ({})",
                    row.status.as_str(),
                    row.error.as_deref().unwrap_or("")
                );
            }
            export_one(&row)?;
        }
    }
    println!("exported {exported} samples to {}", args.out.display());
    Ok(())
}

fn verify(dir: &std::path::Path) -> Result<()> {
    let ds = open(dir)?;
    let mut checked = 0u64;
    let mut bytes = 0u64;
    ds.for_each_row(codeclm_formats::RowFilter::OK, |row| {
        let b = ds
            .codec_bytes(&row)
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
        Ok(std::ops::ControlFlow::Continue(()))
    })?;
    println!("verified {checked} samples, {:.2} MB of codec bytes: every record matches its manifest row", bytes as f64 / 1e6);
    let mut stale = Vec::new();
    for hash in TokenLayout::list(dir) {
        let layout = TokenLayout::new(dir, &hash);
        if !layout.manifest_path().exists() {
            println!(
                "token set {hash}: not finished (no {}), skipped",
                layout.manifest_path().display()
            );
            continue;
        }
        let r = ds
            .verify_token_set(&hash)
            .with_context(|| format!("verifying token set {hash}"))?;
        println!(
            "verified token set {hash}: {} shards, {} frames, {} tokens, {} documents: every frame matches its checksum, every document is a BOS..EOS span{}",
            r.shards,
            r.frames,
            r.tokens,
            r.docs,
            if r.stale.is_empty() { "; every part is tokenized from its codec part as it is now".to_string() } else { format!("; {} parts are stale", r.stale.len()) }
        );
        stale.extend(
            r.stale
                .iter()
                .map(|p| (hash.clone(), layout.vocab_path(), p.to_string())),
        );
    }
    if !stale.is_empty() {
        let list: Vec<String> = stale
            .iter()
            .map(|(hash, _, p)| format!("token set {hash}: {p}"))
            .collect();
        let fixes: std::collections::BTreeSet<String> = stale
            .iter()
            .map(|(_, vocab, _)| {
                format!(
                    "`codeclm dataset tokenize --dataset {} --vocab {}`",
                    dir.display(),
                    vocab.display()
                )
            })
            .collect();
        bail!(
            "{} stale token parts (their codec parts changed since they were tokenized):\n  {}\nFix: rerun {}, which re-tokenizes stale parts",
            stale.len(),
            list.join("\n  "),
            fixes.into_iter().collect::<Vec<_>>().join(" and ")
        );
    }
    Ok(())
}
