//! Where flags become library configs: the value types shared by several commands (`--device`,
//! `--modality`, `--split`, the preprocessing choices) and the conversions from a command's
//! parsed arguments to the configs the libraries take. Commands parse with clap, then call these;
//! no library sees a flag.

use std::path::Path;

use anyhow::{Context, Result};
use clap::ValueEnum;
use codeclm_codec::h264::VideoConfig;
use codeclm_codec::jpeg::Subsampling;
use codeclm_etl::decode::ColorConvert;
use codeclm_etl::resize::{Resampler, ResizeMode};
use codeclm_etl::{BuildSettings, ImageConfig, Preprocess, RandomCrops, SourceKind, SourceSpec};
use codeclm_formats::{Modality, Split};

use super::dataset::BuildArgs;

/// `--device cpu|cuda|cuda:N`, the one device flag of every command that runs a network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceArg {
    #[default]
    Cpu,
    /// CUDA device N (`cuda` is device 0).
    Cuda(usize),
}

impl std::str::FromStr for DeviceArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" => Ok(DeviceArg::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceArg::Cuda)
                .ok_or_else(|| format!("{s:?}: use cpu, cuda or cuda:N")),
        }
    }
}

impl std::fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceArg::Cpu => f.write_str("cpu"),
            DeviceArg::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceArg {
    /// The CUDA ordinal, `None` for the CPU (what `fid::device` takes).
    pub fn cuda(self) -> Option<usize> {
        match self {
            DeviceArg::Cpu => None,
            DeviceArg::Cuda(n) => Some(n),
        }
    }

    /// The engine device of a command that runs on either backend (training and generation).
    pub fn device(self) -> codeclm_model::engine::Device {
        use codeclm_model::engine::Device;
        match self {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda(n) => Device::Cuda(n),
        }
    }
}

/// `--modality image|video`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModalityArg {
    /// JPEG images.
    Image,
    /// H.264 videos.
    Video,
}

impl From<ModalityArg> for Modality {
    fn from(m: ModalityArg) -> Modality {
        match m {
            ModalityArg::Image => Modality::Image,
            ModalityArg::Video => Modality::Video,
        }
    }
}

/// `--split train|val`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SplitArg {
    Train,
    Val,
}

impl From<SplitArg> for Split {
    fn from(s: SplitArg) -> Split {
        match s {
            SplitArg::Train => Split::Train,
            SplitArg::Val => Split::Val,
        }
    }
}

/// `--workers N`, default every core.
pub fn workers(n: Option<usize>) -> usize {
    n.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}

/// `--threads N` for the model's CPU kernels: set before rayon's global pool exists.
pub fn set_threads(n: Option<usize>) {
    if let Some(n) = n.filter(|&n| n > 0) {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Everything `dataset build` decides about the output bytes.
pub fn build_settings(args: &BuildArgs) -> Result<BuildSettings> {
    let image = image_config(args)?;
    let video = video_config(args)?;
    let images = args
        .images
        .as_deref()
        .map(|p| source_spec(p, args))
        .transpose()?;
    let videos = args
        .videos
        .as_deref()
        .map(|p| source_spec(p, args))
        .transpose()?;
    let crops = random_crops(args)?;
    let mut settings = BuildSettings::with_sources(images, image, videos, video);
    if crops.is_some() {
        // The boxes are in full-resolution pixels (see `codeclm_etl::process::process_image_crops`).
        settings.image.dct_scaling = false;
    }
    settings.crops = crops;
    settings.val_fraction = args.val_fraction;
    settings.part_size = args.part_size.unwrap_or(10_000);
    settings.shard_max_bytes = args.shard_max_mib.max(1) << 20;
    Ok(settings)
}

/// `--crops N --crop-scale a,b --crop-ratio a,b`, checked against the options they exclude.
fn random_crops(args: &BuildArgs) -> Result<Option<RandomCrops>> {
    if args.crops == 0 {
        if args.crop_scale.is_some() || args.crop_ratio.is_some() {
            anyhow::bail!(
                "--crop-scale and --crop-ratio shape the crops of --crops N: give --crops too"
            );
        }
        return Ok(None);
    }
    if matches!(args.preprocess, PreprocessArg::Paper) {
        anyhow::bail!(
            "--crops with --preprocess paper: the paper's preprocessing is the centred crop; drop --crops, or use the default preset"
        );
    }
    if args.resize.is_some() {
        anyhow::bail!("--crops with --resize: each crop is stretched to the square, so --resize does not apply; drop it");
    }
    if args.dct_scaling == Some(true) {
        anyhow::bail!("--crops with --dct-scaling true: crops are cut from the full-resolution decode; drop --dct-scaling");
    }
    let mut crops = RandomCrops::new(args.crops);
    if let Some(s) = &args.crop_scale {
        crops.scale = pair("--crop-scale", s)?;
    }
    if let Some(s) = &args.crop_ratio {
        crops.ratio = pair("--crop-ratio", s)?;
    }
    crops.validate().map_err(anyhow::Error::msg)?;
    Ok(Some(crops))
}

/// `a,b` as two numbers.
fn pair(flag: &str, s: &str) -> Result<(f64, f64)> {
    s.split_once(',')
        .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
        .with_context(|| format!("{flag} {s}: use two numbers a,b, e.g. {flag} 0.08,1"))
}

#[derive(Clone, Copy, ValueEnum)]
pub enum SourceKindArg {
    Auto,
    Dir,
    List,
    Tar,
    Parquet,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PreprocessArg {
    Default,
    Paper,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ResizeArg {
    CenterCrop,
    Pad,
    Stretch,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ResamplerArg {
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
pub enum AlphaArg {
    /// Composite on white.
    White,
    /// Drop alpha like Pillow's convert("RGB").
    Drop,
}

pub fn image_config(args: &BuildArgs) -> Result<ImageConfig> {
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

pub fn video_config(args: &BuildArgs) -> Result<VideoConfig> {
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

pub fn source_spec(path: &Path, args: &BuildArgs) -> Result<SourceSpec> {
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

/// Which slice of the parts this worker takes, and where that came from.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardChoice {
    pub index: u32,
    pub count: u32,
    /// For the run summary: `flags`, or the environment variables read.
    pub from: String,
}

/// `--shard-index/--num-shards`, or, when `--shard-index` is absent, the job array's
/// environment: Slurm's `SLURM_ARRAY_TASK_ID` (less `SLURM_ARRAY_TASK_MIN`, as arrays may start
/// anywhere) of `SLURM_ARRAY_TASK_COUNT`, or a Kubernetes Indexed Job's `JOB_COMPLETION_INDEX`
/// (with `--num-shards`, which Kubernetes does not expose). `env` looks a variable up.
pub fn shard_choice(
    index: Option<u32>,
    count: Option<u32>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ShardChoice> {
    let var = |name: &str| -> Result<Option<u32>> {
        match env(name) {
            None => Ok(None),
            Some(v) => v.trim().parse::<u32>().map(Some).with_context(|| {
                format!("{name}={v:?} is not a whole number (unset it, or pass --shard-index and --num-shards)")
            }),
        }
    };
    if let Some(index) = index {
        return Ok(ShardChoice {
            index,
            count: count.unwrap_or(1),
            from: "flags".into(),
        });
    }
    if let Some(id) = var("SLURM_ARRAY_TASK_ID")? {
        let min = var("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let n = match (count, var("SLURM_ARRAY_TASK_COUNT")?) {
            (Some(n), _) | (None, Some(n)) => n,
            (None, None) => anyhow::bail!(
                "SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not: pass --num-shards"
            ),
        };
        let index = id.checked_sub(min).with_context(|| {
            format!("SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}")
        })?;
        return Ok(ShardChoice {
            index,
            count: n,
            from: format!(
                "SLURM_ARRAY_TASK_ID={id} (min {min}) of SLURM_ARRAY_TASK_COUNT={n}{}",
                if count.is_some() {
                    " (--num-shards)"
                } else {
                    ""
                }
            ),
        });
    }
    if let Some(index) = var("JOB_COMPLETION_INDEX")? {
        let Some(n) = count else {
            anyhow::bail!(
                "JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job) but --num-shards is not: pass the Job's completions as --num-shards"
            );
        };
        return Ok(ShardChoice {
            index,
            count: n,
            from: format!("JOB_COMPLETION_INDEX={index} of --num-shards {n}"),
        });
    }
    Ok(ShardChoice {
        index: 0,
        count: count.unwrap_or(1),
        from: "flags".into(),
    })
}

#[cfg(test)]
mod shard_tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn job_arrays_pick_the_shard_and_flags_win() {
        let slurm = [
            ("SLURM_ARRAY_TASK_ID", "7"),
            ("SLURM_ARRAY_TASK_MIN", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ];
        let c = shard_choice(None, None, &env(&slurm)).unwrap();
        assert_eq!((c.index, c.count), (2, 4));
        assert!(c.from.contains("SLURM_ARRAY_TASK_ID=7"), "{}", c.from);
        // Explicit flags are never overridden.
        let c = shard_choice(Some(1), Some(3), &env(&slurm)).unwrap();
        assert_eq!((c.index, c.count, c.from.as_str()), (1, 3, "flags"));

        let k8s = [("JOB_COMPLETION_INDEX", "9")];
        let c = shard_choice(None, Some(16), &env(&k8s)).unwrap();
        assert_eq!((c.index, c.count), (9, 16));
        let err = shard_choice(None, None, &env(&k8s))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--num-shards"), "{err}");

        let bad = [("SLURM_ARRAY_TASK_ID", "x")];
        assert!(shard_choice(None, None, &env(&bad)).is_err());
        let none = shard_choice(None, None, &env(&[])).unwrap();
        assert_eq!((none.index, none.count), (0, 1));
    }
}
