//! `codeclm sample`: generate images (or videos) from a trained run, unconditionally or
//! completing prompts, and write them with a contact sheet and a decodability report.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use codeclm_etl::BuildSettings;
use codeclm_formats::Modality;
use codeclm_sample::constrain::{self, Constrain, GrammarConstraint};
use codeclm_sample::image::Images;
use codeclm_sample::prompt::{self, CutAt, ImagePrompt, VideoPrompt};
use codeclm_sample::run::Medium;
use codeclm_sample::trained::{DEFAULT_MAX_TOKENS, DEFAULT_MAX_VIDEO_TOKENS};
use codeclm_sample::video::Videos;
use codeclm_sample::{Drawing, ModelGenerator, Sampling, TrainedRun};

use super::flags::{DeviceArg, ModalityArg};

#[derive(Clone, Copy, ValueEnum)]
pub enum CutArg {
    /// Right before the restart marker: the prompt is a prefix of the image's tokens.
    BeforeMarker,
    /// After the marker, as the paper's code cuts.
    AfterMarker,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConstrainArg {
    /// Only tokens that continue a valid JPEG stream of the dataset (images).
    Jpeg,
    /// Only tokens that continue a valid H.264 stream at the NAL level (videos).
    H264,
    /// Every token at every step, as the paper sampled.
    None,
}

impl ConstrainArg {
    pub fn constrain(self) -> Constrain {
        match self {
            ConstrainArg::Jpeg => Constrain::Jpeg,
            ConstrainArg::H264 => Constrain::H264,
            ConstrainArg::None => Constrain::None,
        }
    }

    /// The grammar for `modality`: `arg` when given and right for it, else the modality's own.
    pub fn resolve(arg: Option<ConstrainArg>, modality: Modality) -> Result<Constrain> {
        Ok(match (arg, modality) {
            (Some(ConstrainArg::None), _) => Constrain::None,
            (None | Some(ConstrainArg::Jpeg), Modality::Image) => Constrain::Jpeg,
            (None | Some(ConstrainArg::H264), Modality::Video) => Constrain::H264,
            (Some(ConstrainArg::Jpeg), Modality::Video) => {
                bail!("--constrain jpeg is for images; videos follow --constrain h264 (or none)")
            }
            (Some(ConstrainArg::H264), Modality::Image) => {
                bail!("--constrain h264 is for videos; images follow --constrain jpeg (or none)")
            }
        })
    }
}

#[derive(Args)]
pub struct SampleArgs {
    /// A run directory written by `codeclm train` (config.json, model.safetensors, trainer_state.json).
    #[arg(long)]
    run: PathBuf,
    /// Generations in all (unconditional), or completions per prompt.
    #[arg(long, default_value_t = 16)]
    n: usize,
    /// An image file or a sample id of the run's dataset; repeat for several prompts. Files go
    /// through the dataset's own preprocessing and encoder.
    #[arg(long)]
    prompt: Vec<String>,
    /// What to generate: JPEG images, or H.264 videos (a dataset built with --videos).
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
    /// New tokens per generation at most (default: the paper's sequence lengths, 12,288 for images
    /// and 32,768 for videos). Generation slides a window of the run's training context, so
    /// streams longer than what the model was trained on are sampled within learned positions.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Sequences generated together.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Grammar-constrained decoding: at every step only the tokens that continue a valid
    /// stream of the dataset's format (default: `jpeg` for images, `h264` for videos), or
    /// `none` for the paper's unconstrained sampling.
    #[arg(long, value_enum)]
    constrain: Option<ConstrainArg>,
    /// The dataset (default: the one the run was trained on).
    #[arg(long)]
    dataset: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    /// cpu, cuda or cuda:N (the engine's CUDA backend: compiled, not yet run on a GPU).
    #[arg(long, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    #[arg(long)]
    no_progress: bool,
}

pub fn sample(args: SampleArgs) -> Result<()> {
    if args.n == 0 {
        bail!("--n must be at least 1");
    }
    let (open, lm) = TrainedRun::open(&args.run, args.dataset.as_deref())?;
    let mut lm = lm.on(args.device.device());
    let modality = Modality::from(args.modality);
    let default_max = match modality {
        Modality::Image => DEFAULT_MAX_TOKENS,
        Modality::Video => DEFAULT_MAX_VIDEO_TOKENS,
    };
    let drawing = Drawing {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        max_tokens: args.max_tokens.unwrap_or(default_max),
    };
    let cfg = drawing.config(&open.vocab, open.context())?;
    let constrain = ConstrainArg::resolve(args.constrain, modality)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let settings = serde_json::json!({
        "run": args.run, "dataset": open.root, "vocab_hash": open.state.vocab_hash, "n": args.n,
        "modality": modality.as_str(),
        "prompts": args.prompt, "ratio": args.ratio, "frames": args.frames,
        "cut": match args.cut { CutArg::BeforeMarker => "before-marker", CutArg::AfterMarker => "after-marker" },
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
        "seed": args.seed, "max_tokens": args.max_tokens, "batch": args.batch,
        "constrain": constrain,
    });
    codeclm_formats::write_atomic(
        &args.out.join("sample.json"),
        format!("{}\n", serde_json::to_string_pretty(&settings)?).as_bytes(),
    )?;
    let started = std::time::Instant::now();
    let mut generator = ModelGenerator::new(&mut lm, cfg);
    let mut clock = None;
    let mean_bytes = open.ds.mean_codec_bytes(modality)?;
    let (count, sheet, report_path) = match modality {
        Modality::Video => {
            let build = BuildSettings::of(&open.ds)?;
            let vcfg = build.video_settings(&open.ds)?;
            let mut prompts: Vec<VideoPrompt> = Vec::new();
            for p in &args.prompt {
                let (name, stream) = prompt::video_prompt_stream(&open.ds, p, vcfg)?;
                prompts.push(
                    prompt::video_prompt(&name, stream, &open.vocab, args.frames)
                        .with_context(|| format!("cutting the video prompt {p}"))?,
                );
            }
            if constrain == Constrain::H264 {
                let streams: Vec<&[u8]> = prompts.iter().map(|p| p.stream.as_slice()).collect();
                let frames = codeclm_sample::video::frames_expected(vcfg) as u32;
                let grammar = constrain::h264_grammar(&open.ds, &streams, frames)?;
                let c = GrammarConstraint::new(grammar, &open.vocab);
                clock = Some(c.clock());
                generator = generator.constrained(Some(Box::new(c)));
            }
            let medium = Videos { cfg: vcfg };
            run_medium(
                &args,
                &open,
                &medium,
                &prompts,
                mean_bytes,
                constrain,
                &mut generator,
            )?
        }
        Modality::Image => {
            let tables = open
                .ds
                .jpeg_tables()
                .context("the dataset has no JPEG tables file: sampling writes JPEG images")?
                .to_vec();
            let cut_at = match args.cut {
                CutArg::BeforeMarker => CutAt::BeforeMarker,
                CutArg::AfterMarker => CutAt::AfterMarker,
            };
            let mut prompts: Vec<ImagePrompt> = Vec::new();
            for p in &args.prompt {
                let (name, stream) = prompt::prompt_stream(&open.ds, p)?;
                prompts.push(
                    prompt::image_prompt(&name, stream, &open.vocab, args.ratio, cut_at)
                        .with_context(|| format!("cutting the prompt {p}"))?,
                );
            }
            let grammar = constrain::jpeg_grammar(&open.ds)?;
            let header = grammar.header().to_vec();
            if constrain == Constrain::Jpeg {
                let c = GrammarConstraint::new(grammar, &open.vocab);
                clock = Some(c.clock());
                generator = generator.constrained(Some(Box::new(c)));
            }
            let medium = Images {
                tables: &tables,
                header: Some(&header),
            };
            run_medium(
                &args,
                &open,
                &medium,
                &prompts,
                mean_bytes,
                constrain,
                &mut generator,
            )?
        }
    };
    let secs = started.elapsed().as_secs_f64();
    if let Some(clock) = clock {
        let (mask_secs, masks) = clock.read();
        println!(
            "constraint {}: {:.1} us per token drawn ({masks} masks), {:.1}% of the generation time",
            constrain.as_str(),
            1e6 * mask_secs / masks.max(1) as f64,
            100.0 * mask_secs / generator.seconds.max(1e-9)
        );
    }
    println!(
        "sampled {count} generations in {secs:.1} s: {} new tokens, {:.1} tokens/s -> {} (contact sheet {}, report {})",
        generator.tokens,
        generator.tokens as f64 / secs.max(1e-9),
        args.out.display(),
        sheet.display(),
        report_path.display()
    );
    Ok(())
}

/// One sampling run of `medium`; prints its report line and returns (generations, sheet, report).
fn run_medium<M: Medium>(
    args: &SampleArgs,
    open: &TrainedRun,
    medium: &M,
    prompts: &[M::Prompt],
    dataset_mean_bytes: Option<f64>,
    constrain: Constrain,
    generator: &mut ModelGenerator,
) -> Result<(usize, PathBuf, PathBuf)> {
    let job = Sampling {
        medium,
        vocab: &open.vocab,
        prompts,
        n: args.n,
        batch: args.batch,
        out: &args.out,
        dataset_mean_bytes,
        progress: !args.no_progress,
        constrain,
    };
    let r = codeclm_sample::sample(&job, generator)?;
    println!("{}", r.report);
    Ok((r.generated.len(), r.sheet, r.report_path))
}
