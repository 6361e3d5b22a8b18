//! `codeclm eval fid --run RUN`: FID the paper's way (Jpeg-LM Tables 1-4). The first `--n`
//! held-out images of the run's dataset are cut after `ratio` of their MCU rows, the model
//! completes each prompt once per seed, and the completions are scored against the original
//! images; unconditional samples from BOS alone (as many as there are originals) are scored
//! against the same originals. Every completion is scored as the lenient decoder renders it (grey
//! or garbled regions included); the ones that do not decode cleanly are counted as failures,
//! and those that give no pixels at all are left out of the statistics and counted apart.
//!
//! Writes the completions under `RUN/eval-fid/{r<ratio>,uncond}-s<seed>/` (as `codeclm sample`
//! lays them out), and the table as `RUN/eval-fid.json` and `RUN/eval-fid.md`.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use codeclm_manifests::jpeg_stream::splice_tables;
use codeclm_model::GenerateConfig;
use codeclm_pipeline::prompt::{self, CutAt, ImagePrompt};
use codeclm_pipeline::sample::measure_jpeg;
use codeclm_pipeline::sample_run::{self, ImageSampling};
use fid::{FidInception, RgbImage, Stats, FEATURE_DIM};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::eval_cli::{load_net, DeviceArg, FidArgs};
use crate::run_dir;

/// One seed's completions of one prompt setting.
#[derive(Serialize)]
struct SeedResult {
    seed: u64,
    /// `None` when fewer than 2 completions gave pixels.
    fid: Option<f64>,
    /// Completions scored (they gave pixels, cleanly or not).
    scored: usize,
    /// Completions that did not decode cleanly (undecodable ones included).
    failures: usize,
    /// Completions with no pixels at all (left out of the FID).
    undecodable: usize,
    /// Prompts as long as the model's context, "completed" with nothing: the prompt alone is
    /// scored (a partial image, so also a failure).
    context_full: usize,
    completions: usize,
    dir: String,
}

/// One row of the table: a prompt ratio, or unconditional (`ratio: None`).
#[derive(Serialize)]
struct Row {
    prompt: String,
    ratio: Option<f64>,
    fid_mean: Option<f64>,
    /// Sample standard deviation over the seeds (`None` with fewer than 2 finite FIDs).
    fid_std: Option<f64>,
    failures: usize,
    undecodable: usize,
    context_full: usize,
    completions: usize,
    /// Original (held-out) images the completions are scored against.
    n: usize,
    seeds: Vec<SeedResult>,
}

impl Row {
    fn fid_cell(&self) -> String {
        match (self.fid_mean, self.fid_std) {
            (Some(m), Some(s)) => format!("{m:.2} ± {s:.2}"),
            (Some(m), None) => format!("{m:.2}"),
            _ => "n/a".into(),
        }
    }

    fn failures_cell(&self) -> String {
        let mut s = format!("{}/{}", self.failures, self.completions);
        if self.undecodable > 0 {
            s.push_str(&format!(", {} undecodable", self.undecodable));
        }
        if self.context_full > 0 {
            s.push_str(&format!(
                ", {} prompts filled the context",
                self.context_full
            ));
        }
        s
    }
}

fn mean_std(values: &[f64]) -> (Option<f64>, Option<f64>) {
    if values.is_empty() {
        return (None, None);
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (Some(mean), None);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (Some(mean), Some(var.sqrt()))
}

/// Inception features of in-memory images, `batch` per forward pass.
fn features(net: &FidInception, images: &[RgbImage], batch: usize) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(images.len() * FEATURE_DIM);
    for chunk in images.chunks(batch.max(1)) {
        out.extend(net.features(chunk)?);
    }
    Ok(out)
}

fn prompt_label(ratio: Option<f64>) -> String {
    match ratio {
        Some(r) => format!("{r}"),
        None => "unconditional".into(),
    }
}

/// The Markdown table (printed and written as `eval-fid.md`).
fn markdown(rows: &[Row], seeds: u64) -> String {
    let mut s = format!(
        "| prompt | FID (mean ± std over {seeds} seed{}) | failures | n |\n|---|---|---|---|\n",
        if seeds == 1 { "" } else { "s" }
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            r.prompt,
            r.fid_cell(),
            r.failures_cell(),
            r.n
        ));
    }
    s
}

pub fn fid_run(args: &FidArgs, run: &Path) -> Result<()> {
    let start = Instant::now();
    if args.n < 2 {
        bail!("--n {}: FID needs at least 2 images a side", args.n);
    }
    if args.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    if let Some(r) = args.ratios.iter().find(|r| !(0.0..=1.0).contains(*r)) {
        bail!("--ratios: {r} is outside 0..1");
    }
    let cuda = matches!(args.device, DeviceArg::Cuda);
    // The FID network first: a missing one fails before any sampling.
    let net = load_net(args.weights.as_deref(), args.device)?;
    let open = run_dir::open_run(run, args.dataset.as_deref(), cuda)?;
    let base = run_dir::generate_config(
        &open.vocab,
        open.state.config.context,
        args.max_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        0,
    )?;
    let tables = open
        .ds
        .jpeg_tables()
        .context("the dataset has no JPEG tables file: FID scores JPEG images")?
        .to_vec();

    // The held-out originals: their stored streams (prompts) and pixels (the reference set).
    let held_out: Vec<_> = open
        .ds
        .rows()
        .iter()
        .filter(|r| r.is_ok() && r.modality == "image" && r.split == args.split)
        .take(args.n)
        .collect();
    if held_out.len() < 2 {
        bail!(
            "{}: the `{}` split has {} ok images; FID needs at least 2 (pick another --split, or rebuild the dataset with a larger --val-fraction)",
            open.root.display(),
            args.split,
            held_out.len()
        );
    }
    let mut streams = Vec::with_capacity(held_out.len());
    let mut originals = Vec::with_capacity(held_out.len());
    for row in &held_out {
        let stream = open
            .ds
            .codec_bytes(row)
            .with_context(|| format!("reading sample {}", row.sample_id))?;
        let full = splice_tables(&stream, &tables)
            .with_context(|| format!("sample {}: splicing the tables", row.sample_id))?;
        let (rgb, rep) = measure_jpeg(&full, &row.sample_id);
        let Some(rgb) = rgb else {
            bail!(
                "sample {} of {} does not decode ({}): run `codeclm dataset verify`",
                row.sample_id,
                open.root.display(),
                rep.decoder_message.unwrap_or_default()
            );
        };
        originals.push(RgbImage::new(rep.width as usize, rep.height as usize, rgb));
        streams.push((row.sample_id.clone(), stream));
    }
    let n = originals.len();
    let real = Stats::from_features(&features(&net, &originals, args.batch)?, FEATURE_DIM)
        .context("features of the original images")?;
    drop(originals);

    let conditions: Vec<Option<f64>> = args
        .ratios
        .iter()
        .copied()
        .map(Some)
        .chain([None])
        .collect();
    let bar = if args.no_progress {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(conditions.len() as u64 * args.seeds * n as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "eval fid {msg} {bar:30} {pos}/{len} completions {elapsed} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let out_root = run.join("eval-fid");
    let mean_bytes = sample_run::dataset_mean_bytes(&open.ds);
    // With a sliding window every prompt fits; without one, a prompt must leave room.
    let context = if base.window.is_some() {
        usize::MAX
    } else {
        open.model.config.max_position_embeddings
    };
    let mut generated_tokens = 0usize;
    let mut gen_secs = 0.0;
    let mut rows = Vec::with_capacity(conditions.len());
    for &ratio in &conditions {
        let prompts: Vec<ImagePrompt> = match ratio {
            Some(r) => streams
                .iter()
                .map(|(name, s)| {
                    prompt::image_prompt(name, s.clone(), &open.vocab, r, CutAt::BeforeMarker)
                        .with_context(|| format!("cutting sample {name} at ratio {r}"))
                })
                .collect::<Result<_>>()?,
            None => Vec::new(),
        };
        let mut seeds = Vec::with_capacity(args.seeds as usize);
        for seed in 0..args.seeds {
            let name = match ratio {
                Some(r) => format!("r{r}-s{seed}"),
                None => format!("uncond-s{seed}"),
            };
            bar.set_message(name.clone());
            let dir = out_root.join(&name);
            let t = Instant::now();
            let mut batch_index = 0u64;
            let mut context_full = 0usize;
            let mut generate = |batch: &[Vec<u32>]| -> Result<Vec<Vec<u32>>, String> {
                let cfg = GenerateConfig {
                    seed: run_dir::batch_seed(seed, batch_index),
                    ..base.clone()
                };
                batch_index += 1;
                // A prompt that fills the model's context gets no new tokens: its completion
                // is the prompt alone (scored as decoded, a failure).
                let fits: Vec<usize> = (0..batch.len())
                    .filter(|&i| batch[i].len() < context)
                    .collect();
                context_full += batch.len() - fits.len();
                let mut out = vec![Vec::new(); batch.len()];
                if !fits.is_empty() {
                    let prompts: Vec<Vec<u32>> = fits.iter().map(|&i| batch[i].clone()).collect();
                    let new = codeclm_model::generate(&open.model, &prompts, &cfg)
                        .map_err(|e| e.to_string())?;
                    for (&i, ids) in fits.iter().zip(new) {
                        out[i] = ids;
                    }
                }
                generated_tokens += out.iter().map(Vec::len).sum::<usize>();
                bar.inc(batch.len() as u64);
                Ok(out)
            };
            let job = ImageSampling {
                vocab: &open.vocab,
                tables: &tables,
                prompts: &prompts,
                n: if prompts.is_empty() { n } else { 1 },
                batch: args.batch,
                out: &dir,
                dataset_mean_bytes: mean_bytes,
                progress: false,
            };
            let done = sample_run::sample_images(&job, &mut generate)
                .with_context(|| format!("sampling into {}", dir.display()))?;
            gen_secs += t.elapsed().as_secs_f64();
            let mut fakes = Vec::with_capacity(done.images.len());
            let (mut failures, mut undecodable) = (0, 0);
            for g in done.images {
                let s = g.sample;
                if !s.report.decodes_clean {
                    failures += 1;
                }
                match s.rgb {
                    Some(rgb) => fakes.push(RgbImage::new(
                        s.report.width as usize,
                        s.report.height as usize,
                        rgb,
                    )),
                    None => undecodable += 1,
                }
            }
            let fid = if fakes.len() >= 2 {
                let fake = Stats::from_features(&features(&net, &fakes, args.batch)?, FEATURE_DIM)
                    .with_context(|| format!("features of {}", dir.display()))?;
                Some(fid::frechet_distance(&real, &fake)?).filter(|f| f.is_finite())
            } else {
                tracing::warn!(
                    "{}: {} of {} completions gave pixels; FID needs 2",
                    dir.display(),
                    fakes.len(),
                    n
                );
                None
            };
            if context_full > 0 {
                tracing::warn!(
                    "{}: {context_full} of {n} prompts fill the model's context of {context} tokens; their completions are the prompt alone",
                    dir.display()
                );
            }
            seeds.push(SeedResult {
                seed,
                fid,
                context_full,
                scored: fakes.len(),
                failures,
                undecodable,
                completions: n,
                dir: dir.display().to_string(),
            });
        }
        let fids: Vec<f64> = seeds.iter().filter_map(|s| s.fid).collect();
        let (fid_mean, fid_std) = mean_std(&fids);
        rows.push(Row {
            prompt: prompt_label(ratio),
            ratio,
            fid_mean,
            fid_std,
            failures: seeds.iter().map(|s| s.failures).sum(),
            undecodable: seeds.iter().map(|s| s.undecodable).sum(),
            context_full: seeds.iter().map(|s| s.context_full).sum(),
            completions: seeds.iter().map(|s| s.completions).sum(),
            n,
            seeds,
        });
    }
    bar.finish_and_clear();

    let secs = start.elapsed().as_secs_f64();
    let table = markdown(&rows, args.seeds);
    let json = serde_json::json!({
        "run": run.display().to_string(),
        "dataset": open.root.display().to_string(),
        "vocab_hash": open.state.vocab_hash,
        "split": args.split,
        "n": n,
        "seeds": args.seeds,
        "cut": "before-marker",
        "context": context,
        "sampling": {
            "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "max_tokens": args.max_tokens, "batch": args.batch,
        },
        "network": crate::eval_cli::NETWORK,
        "rows": rows,
        "generated_tokens": generated_tokens,
        "seconds": secs,
        "generation_seconds": gen_secs,
    });
    let json_path = run.join("eval-fid.json");
    let md_path = run.join("eval-fid.md");
    codeclm_manifests::write_atomic(
        &json_path,
        format!("{}\n", serde_json::to_string_pretty(&json)?).as_bytes(),
    )
    .with_context(|| format!("writing {}", json_path.display()))?;
    let md = format!(
        "FID of completions of the first {n} `{}` images of {} (prompt = fraction of MCU rows given), run {}.\n\n{table}",
        args.split,
        open.root.display(),
        run.display()
    );
    codeclm_manifests::write_atomic(&md_path, md.as_bytes())
        .with_context(|| format!("writing {}", md_path.display()))?;
    print!("{table}");
    println!(
        "eval fid: {} settings x {} seeds x {n} images, {generated_tokens} new tokens in {secs:.1} s ({gen_secs:.1} s sampling, {:.1} s loading and scoring) -> {}, {}",
        rows.len(),
        args.seeds,
        secs - gen_secs,
        json_path.display(),
        md_path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert_eq!(m, Some(2.0));
        assert_eq!(s, Some(1.0));
        assert_eq!(mean_std(&[4.0]), (Some(4.0), None));
        assert_eq!(mean_std(&[]), (None, None));
    }
}
