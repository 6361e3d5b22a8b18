//! `codeclm sample`: draw images from a trained run, unconditionally or from partial prompts,
//! and write them with a contact sheet and a decodability report. Glue between the model
//! crate (generation) and the pipeline (prompts, files, figures).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use codeclm_manifests::vocab::Vocab;
use codeclm_manifests::Dataset;
use codeclm_model::GenerateConfig;
use codeclm_pipeline::prompt::{self, CutAt, ImagePrompt, VideoPrompt};
use codeclm_pipeline::sample_run::{self, ImageSampling};
use codeclm_pipeline::video_sample::{self, VideoSampling};

use crate::run_dir;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModalityArg {
    Image,
    Video,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum CutArg {
    /// Right before the restart marker: the prompt is a prefix of the image's tokens.
    BeforeMarker,
    /// After the marker, as the paper's code cuts.
    AfterMarker,
}

#[derive(Args)]
pub struct SampleArgs {
    /// A run directory written by `codeclm train` (config.json, model.safetensors, trainer_state.json).
    #[arg(long)]
    run: PathBuf,
    /// Samples in all (unconditional), or completions per prompt.
    #[arg(long, default_value_t = 16)]
    n: usize,
    /// An image file or a sample id of the run's dataset; repeat for several prompts. Files go
    /// through the dataset's own preprocessing and encoder.
    #[arg(long)]
    prompt: Vec<String>,
    /// What to sample: JPEG images, or H.264 videos (a dataset built with --videos).
    #[arg(long, value_enum, default_value_t = ModalityArg::Image)]
    modality: ModalityArg,
    /// Fraction of the image's MCU rows given as the prompt (rounded to whole rows).
    #[arg(long, default_value_t = 0.5)]
    ratio: f64,
    /// Video prompts: frames given (Avc-LM: 10 of 15).
    #[arg(long, default_value_t = 10)]
    frames: usize,
    #[arg(long, value_enum, default_value_t = CutArg::BeforeMarker)]
    cut: CutArg,
    /// 0 = greedy. The paper's code: 1.0.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// 0 = off. The paper: 40 or 80; its code's example 50.
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// 1.0 = off. The paper: 0.9 or 1.0.
    #[arg(long, default_value_t = 0.9)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// New tokens per sample at most (default: the paper's sequence lengths, 12,288 for images
    /// and 32,768 for videos). Generation slides a window of the run's training context, so
    /// streams longer than what the model was trained on are sampled within learned positions.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Sequences generated together.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// The dataset (default: the one the run was trained on).
    #[arg(long)]
    dataset: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    /// Run on CUDA device 0 (needs a `--features cuda` build).
    #[arg(long)]
    cuda: bool,
    #[arg(long)]
    no_progress: bool,
}

pub fn sample(args: SampleArgs) -> Result<()> {
    if args.n == 0 {
        bail!("--n must be at least 1");
    }
    let run_dir::OpenRun {
        state,
        root,
        ds,
        vocab,
        model,
    } = run_dir::open_run(&args.run, args.dataset.as_deref(), args.cuda)?;
    let cfg = run_dir::generate_config(
        &vocab,
        state.config.context,
        args.max_tokens
            .or((args.modality == ModalityArg::Video).then_some(32_768)),
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
    )?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let settings = serde_json::json!({
        "run": args.run, "dataset": root, "vocab_hash": state.vocab_hash, "n": args.n,
        "modality": if args.modality == ModalityArg::Image { "image" } else { "video" },
        "prompts": args.prompt, "ratio": args.ratio, "frames": args.frames,
        "cut": match args.cut { CutArg::BeforeMarker => "before-marker", CutArg::AfterMarker => "after-marker" },
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
        "seed": args.seed, "max_tokens": args.max_tokens, "batch": args.batch,
    });
    codeclm_manifests::write_atomic(
        &args.out.join("sample.json"),
        format!("{}\n", serde_json::to_string_pretty(&settings)?).as_bytes(),
    )?;
    let started = std::time::Instant::now();
    let mut generated_tokens = 0usize;
    let mut batch_index = 0u64;
    let mut generate = |batch: &[Vec<u32>]| -> Result<Vec<Vec<u32>>, String> {
        // A different seed per batch, derived from the run's seed: reproducible, not repeated.
        let cfg = GenerateConfig {
            seed: run_dir::batch_seed(cfg.seed, batch_index),
            ..cfg.clone()
        };
        batch_index += 1;
        let out = codeclm_model::generate(&model, batch, &cfg).map_err(|e| e.to_string())?;
        generated_tokens += out.iter().map(Vec::len).sum::<usize>();
        Ok(out)
    };
    let (count, sheet, report_path) = if args.modality == ModalityArg::Video {
        let vcfg = video_sample::dataset_video_config(&ds)?;
        let mut prompts: Vec<VideoPrompt> = Vec::new();
        for p in &args.prompt {
            let (name, stream) = video_sample::video_prompt_stream(&ds, p, &vcfg)?;
            prompts.push(
                prompt::video_prompt(&name, stream, &vocab, args.frames)
                    .with_context(|| format!("cutting the video prompt {p}"))?,
            );
        }
        let job = VideoSampling {
            vocab: &vocab,
            cfg: &vcfg,
            prompts: &prompts,
            n: args.n,
            batch: args.batch,
            out: &args.out,
            dataset_mean_bytes: sample_run::dataset_mean_bytes_of(&ds, "video"),
            progress: !args.no_progress,
        };
        let r = video_sample::sample_videos(&job, &mut generate)?;
        println!("{}", r.report);
        (r.videos.len(), r.sheet, r.report_path)
    } else {
        let tables = ds
            .jpeg_tables()
            .context("the dataset has no JPEG tables file: sampling writes JPEG images")?
            .to_vec();
        let r = sample_images(&args, &ds, &vocab, &tables, &mut generate)?;
        println!("{}", r.report);
        (r.images.len(), r.sheet, r.report_path)
    };
    let secs = started.elapsed().as_secs_f64();
    println!(
        "sampled {count} in {secs:.1} s: {generated_tokens} new tokens, {:.1} tokens/s -> {} (contact sheet {}, report {})",
        generated_tokens as f64 / secs.max(1e-9),
        args.out.display(),
        sheet.display(),
        report_path.display()
    );
    Ok(())
}

fn sample_images(
    args: &SampleArgs,
    ds: &Dataset,
    vocab: &Vocab,
    tables: &[u8],
    generate: &mut sample_run::Generate,
) -> Result<sample_run::ImageSamplingResult> {
    let cut_at = match args.cut {
        CutArg::BeforeMarker => CutAt::BeforeMarker,
        CutArg::AfterMarker => CutAt::AfterMarker,
    };
    let mut prompts: Vec<ImagePrompt> = Vec::new();
    for p in &args.prompt {
        let (name, stream) = prompt::prompt_stream(ds, p)?;
        prompts.push(
            prompt::image_prompt(&name, stream, vocab, args.ratio, cut_at)
                .with_context(|| format!("cutting the prompt {p}"))?,
        );
    }
    let job = ImageSampling {
        vocab,
        tables,
        prompts: &prompts,
        n: args.n,
        batch: args.batch,
        out: &args.out,
        dataset_mean_bytes: sample_run::dataset_mean_bytes(ds),
        progress: !args.no_progress,
    };
    Ok(sample_run::sample_images(&job, generate)?)
}
