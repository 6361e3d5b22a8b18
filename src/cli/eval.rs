//! `codeclm eval fid`: FID between two folders of images (`--real A --fake B`), or of a trained
//! run's completions of held-out images the paper's way (`--run RUN`); the work is in
//! `codeclm_sample::eval`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args, Subcommand};
use codeclm_sample::eval::{self, features_of_files, image_files, FeatureSet, FidRun, NETWORK};
use codeclm_sample::trained::DEFAULT_MAX_TOKENS;
use codeclm_sample::{Drawing, TrainedRun};
use fid::FidInception;

use super::flags::{DeviceArg, SplitArg};

#[derive(Subcommand)]
pub enum EvalCommand {
    /// FID (Fréchet Inception Distance) between the images in two folders.
    Fid(FidArgs),
}

#[derive(Args)]
#[command(group(ArgGroup::new("mode").required(true).args(["real", "run"])))]
pub struct FidArgs {
    /// Folder of reference images (searched recursively); with --fake.
    #[arg(long, requires = "fake", conflicts_with = "run")]
    pub real: Option<PathBuf>,
    /// Folder of generated images (searched recursively); with --real.
    #[arg(long, requires = "real", conflicts_with = "run")]
    pub fake: Option<PathBuf>,
    /// A run written by `codeclm train`: complete held-out images of its dataset and score them
    /// the paper's way (table in RUN/eval-fid.json and RUN/eval-fid.md).
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// Run mode: the dataset (default: the one the run was trained on).
    #[arg(long, requires = "run")]
    pub dataset: Option<PathBuf>,
    /// Run mode: the split whose images are prompted and scored against.
    #[arg(long, value_enum, default_value_t = SplitArg::Val)]
    pub split: SplitArg,
    /// Run mode: fractions of each image's MCU rows given as the prompt (the paper: 0.25,0.5,0.75);
    /// an unconditional row (BOS alone) is always added.
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5,0.75")]
    pub ratios: Vec<f64>,
    /// Run mode: how completions are sampled, each scored in its own rows: `none` (the paper's
    /// unconstrained sampling) and `jpeg` (grammar-constrained, as `codeclm sample` does).
    #[arg(long, value_delimiter = ',', default_value = "none,jpeg")]
    pub constrain: Vec<super::sample::ConstrainArg>,
    /// Run mode: leave out the baseline rows (per ratio, the prompt alone with the rest grey).
    #[arg(long)]
    pub no_grey_baseline: bool,
    /// Run mode: held-out images used (all of the split when fewer; else N drawn by a hash of
    /// the sample id, spread over the split).
    #[arg(long, default_value_t = 1000)]
    pub n: usize,
    /// Run mode: sampling seeds (0..SEEDS); the table gives mean ± std over them.
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Run mode: 0 = greedy. The paper's code: 1.0.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Run mode: 0 = off. The paper: 40 or 80; its code's example 50.
    #[arg(long, default_value_t = 50)]
    pub top_k: usize,
    /// Run mode: 1.0 = off. The paper: 0.9 or 1.0.
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f64,
    /// Run mode: new tokens per completion at most (default: up to the model's context).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Images per forward pass (memory: ~45 MB per image on CPU); run mode: also sequences
    /// generated together.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Where the FID network (and in run mode the model) runs: cpu, cuda or cuda:N.
    #[arg(long, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// The converted network (default: where `make fid-weights` puts it).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Folder mode: also write the result as JSON here.
    #[arg(long, conflicts_with = "run")]
    pub out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Fid(args) => match args.run.clone() {
            Some(run) => fid_run(&args, &run),
            None => fid_dirs(args),
        },
    }
}

/// The FID network from `--weights` (default: where `make fid-weights` puts it) on `device`
/// (the engine's CPU or CUDA backend), for `codeclm {what}`.
pub fn load_net(weights: Option<&Path>, device: DeviceArg, what: &str) -> Result<FidInception> {
    let device = fid::device(device.cuda()).with_context(|| format!("codeclm {what}"))?;
    let path = weights
        .map(Path::to_path_buf)
        .unwrap_or_else(fid::default_weights_path);
    Ok(FidInception::load(&path, &device)?)
}

fn fid_run(args: &FidArgs, run: &Path) -> Result<()> {
    // The FID network first: a missing one fails before any sampling.
    let net = load_net(args.weights.as_deref(), args.device, "eval fid --run")?;
    let (open, lm) = TrainedRun::open(run, args.dataset.as_deref())?;
    let mut lm = lm.on(args.device.device());
    let cfg = FidRun {
        split: args.split.into(),
        ratios: args.ratios.clone(),
        n: args.n,
        seeds: args.seeds,
        drawing: Drawing {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: 0,
            max_tokens: args.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        },
        max_tokens: args.max_tokens,
        batch: args.batch,
        progress: !args.no_progress,
        constrain: args.constrain.iter().map(|c| c.constrain()).collect(),
        grey_baseline: !args.no_grey_baseline,
    };
    let t = eval::fid_of_run(&cfg, &net, &open, &mut lm)
        .with_context(|| format!("evaluating {}", run.display()))?;
    print!("{}", t.markdown);
    println!(
        "eval fid: {} settings x {} seeds x {} images, {} new tokens in {:.1} s ({:.1} s sampling, {:.1} s loading and scoring) -> {}, {}",
        t.settings,
        args.seeds,
        t.n,
        t.generated_tokens,
        t.seconds,
        t.generation_seconds,
        t.seconds - t.generation_seconds,
        t.json_path.display(),
        t.md_path.display()
    );
    Ok(())
}

fn fid_dirs(args: FidArgs) -> Result<()> {
    let start = Instant::now();
    let (Some(real_dir), Some(fake_dir)) = (&args.real, &args.fake) else {
        bail!("give --real DIR and --fake DIR, or --run RUN");
    };
    let net = load_net(args.weights.as_deref(), args.device, "eval fid")?;
    let real_files = image_files(real_dir)?;
    let fake_files = image_files(fake_dir)?;
    let show = !args.no_progress;
    let real = features_of_files(&net, &real_files, args.batch, "real", show)?;
    let fake = features_of_files(&net, &fake_files, args.batch, "fake", show)?;
    let fid = fid::frechet_distance(
        &real.stats().context("real images")?,
        &fake.stats().context("fake images")?,
    )?;
    let secs = start.elapsed().as_secs_f64();
    let n = (real.images + fake.images) as f64;
    println!(
        "FID {fid:.4} | real {} images ({} failed to decode) | fake {} images ({} failed to decode) | {secs:.1} s, {:.1} images/s",
        real.images,
        real.failed.len(),
        fake.images,
        fake.failed.len(),
        n / secs
    );
    if let Some(out) = &args.out {
        let side = |dir: &Path, s: &FeatureSet| {
            serde_json::json!({
                "dir": dir.display().to_string(),
                "images": s.images,
                "failed": s.failed.len(),
                "failures": s.failed.iter().map(|(p, e)| serde_json::json!({"file": p.display().to_string(), "error": e})).collect::<Vec<_>>(),
            })
        };
        let json = serde_json::json!({
            "fid": fid,
            "real": side(real_dir, &real),
            "fake": side(fake_dir, &fake),
            "seconds": secs,
            "network": NETWORK,
        });
        codeclm_formats::write_atomic(out, serde_json::to_string_pretty(&json)?.as_bytes())
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
