//! `codeclm bench images`: single-threaded throughput of the image pipeline, the Rust side of
//! `tools/bench_compare.py` (the Pillow side is `tools/bench_pillow.py`, same JSON shape).
//!
//! The files are read into memory first (no disk I/O in the timing), one untimed warm-up pass
//! runs over all of them, then the list is processed `--repeat` times on this thread and timed.
//! `--encode-only` decodes and resizes everything up front and times only the abbreviated
//! q25 encode (the floor: no pipeline can be faster than its encoder). Prints ONE JSON line.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use codeclm_pipeline::process::process_image;
use codeclm_pipeline::resize::Resampler;
use codeclm_pipeline::{jpeg, ImageConfig, Preprocess};

use crate::{PreprocessArg, ResamplerArg};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Images per second on one thread for decode + resize + encode (or encode only) over
    /// FILEs held in memory, and peak RSS; prints one JSON line like tools/bench_pillow.py.
    Images(ImagesArgs),
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
    }
}

fn images(args: ImagesArgs) -> Result<()> {
    let mut cfg = ImageConfig::preset(match args.preprocess {
        PreprocessArg::Default => Preprocess::Default,
        PreprocessArg::Paper => Preprocess::Paper,
    });
    if let Some(r) = args.resampler {
        cfg.resampler = match r {
            ResamplerArg::Lanczos3 => Resampler::Lanczos3,
            ResamplerArg::PillowBilinear => Resampler::PillowBilinear,
            ResamplerArg::PillowLanczos => Resampler::PillowLanczos,
        };
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

/// Decode + resize one image as `process_image` would, leaving the encode out.
fn prepare(bytes: &[u8], ext: Option<&str>, cfg: &ImageConfig) -> Result<Vec<u8>> {
    codeclm_pipeline::process::prepare(bytes, ext, cfg)
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
