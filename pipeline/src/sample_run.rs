//! One sampling run over images, model-agnostic: prompts (or BOS alone) go to a `generate`
//! callback in batches, every completion becomes files ([`crate::sample`]), and the run ends
//! with a contact sheet and a decodability report. The model crate supplies the callback, so
//! this crate never depends on it (data flows `pipeline -> manifests <- model`).

use std::path::{Path, PathBuf};

use codeclm_manifests::vocab::Vocab;
use image::RgbImage;

use crate::contact_sheet::{self, PromptRow};
use crate::prompt::{prompt_jpeg, ImagePrompt};
use crate::sample::{self, DecodabilityReport, ImageSample};

#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("{0}")]
    Files(#[from] codeclm_manifests::Error),
    #[error("generation failed: {0}")]
    Generate(String),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Completes a batch of prompts (each BOS + tokens); returns only the new tokens of each, EOS
/// included when the model produced it.
pub type Generate<'a> = dyn FnMut(&[Vec<u32>]) -> Result<Vec<Vec<u32>>, String> + 'a;

/// What to sample and where to put it.
pub struct ImageSampling<'a> {
    pub vocab: &'a Vocab,
    /// The dataset's tables-only JPEG stream (spliced into every sample).
    pub tables: &'a [u8],
    /// Prompts; none means unconditional sampling from BOS.
    pub prompts: &'a [ImagePrompt],
    /// Completions per prompt, or samples in all when unconditional.
    pub n: usize,
    /// Sequences per `generate` call.
    pub batch: usize,
    /// Output directory: `samples/`, `contact_sheet.png`, `decodability.json`.
    pub out: &'a Path,
    /// The dataset's mean codec bytes per image, for the length ratio.
    pub dataset_mean_bytes: Option<f64>,
    pub progress: bool,
}

/// One completion and where it came from.
pub struct GeneratedImage {
    /// Index into the prompts (`None` when unconditional).
    pub prompt: Option<usize>,
    /// File stem under `samples/`.
    pub name: String,
    /// Prompt + new tokens, as decoded.
    pub ids: Vec<u32>,
    pub sample: ImageSample,
}

/// What a run produced.
pub struct ImageSamplingResult {
    pub images: Vec<GeneratedImage>,
    pub report: DecodabilityReport,
    pub sheet: PathBuf,
    pub report_path: PathBuf,
}

fn safe_stem(s: &str) -> String {
    let stem = Path::new(s)
        .file_stem()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_else(|| s.to_string());
    stem.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect()
}

fn tile_of(s: &ImageSample) -> Option<RgbImage> {
    let rgb = s.rgb.clone()?;
    contact_sheet::rgb_image(s.report.width, s.report.height, rgb)
}

/// Runs the sampling: generates, writes every sample (`.jpg` + `.png`, or `.bin`), the prompt
/// originals and prompt regions, `contact_sheet.png` and `decodability.json`. Samples are named
/// `sample-NNN` (unconditional) or `pPP-<source>-sNN` (prompted), in generation order, so a
/// seeded run writes the same files every time.
pub fn sample_images(
    job: &ImageSampling,
    generate: &mut Generate,
) -> Result<ImageSamplingResult, SampleError> {
    let dir = job.out.join("samples");
    std::fs::create_dir_all(&dir).map_err(|source| SampleError::Io {
        path: dir.clone(),
        source,
    })?;
    // (prompt index, name, prompt ids) of every sequence to generate.
    let mut todo: Vec<(Option<usize>, String, Vec<u32>)> = Vec::new();
    if job.prompts.is_empty() {
        for i in 0..job.n {
            todo.push((None, format!("sample-{i:03}"), vec![job.vocab.bos]));
        }
    } else {
        for (p, prompt) in job.prompts.iter().enumerate() {
            for i in 0..job.n {
                let name = format!("p{p:02}-{}-s{i:02}", safe_stem(&prompt.name));
                todo.push((Some(p), name, prompt.ids.clone()));
            }
        }
    }
    let bar = if job.progress {
        indicatif::ProgressBar::new(todo.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("sampling {bar:30} {pos}/{len} samples {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut images = Vec::with_capacity(todo.len());
    for chunk in todo.chunks(job.batch.max(1)) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|t| t.2.clone()).collect();
        let new = generate(&prompts).map_err(SampleError::Generate)?;
        if new.len() != prompts.len() {
            return Err(SampleError::Generate(format!(
                "{} completions for {} prompts",
                new.len(),
                prompts.len()
            )));
        }
        for ((p, name, prompt_ids), new) in chunk.iter().zip(new) {
            let mut ids = prompt_ids.clone();
            ids.extend_from_slice(&new);
            let s = sample::render_image(name, job.vocab, &ids, new.len(), job.tables);
            sample::write_image_sample(&dir, name, &s)?;
            images.push(GeneratedImage {
                prompt: *p,
                name: name.clone(),
                ids,
                sample: s,
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let tile = (256, 256);
    let sheet_img = if job.prompts.is_empty() {
        let tiles: Vec<Option<RgbImage>> = images.iter().map(|g| tile_of(&g.sample)).collect();
        let refs: Vec<Option<&RgbImage>> = tiles.iter().map(Option::as_ref).collect();
        let cols = (images.len() as f64).sqrt().ceil() as usize;
        contact_sheet::grid_sheet(&refs, cols, tile)
    } else {
        let mut originals = Vec::new();
        let mut regions = Vec::new();
        for (p, prompt) in job.prompts.iter().enumerate() {
            let stem = format!("p{p:02}-{}", safe_stem(&prompt.name));
            let full = codeclm_manifests::jpeg_stream::splice_tables(&prompt.stream, job.tables)?;
            let (orig_rgb, orig) = sample::measure_jpeg(&full, &stem);
            codeclm_manifests::write_atomic(&dir.join(format!("{stem}-original.jpg")), &full)?;
            let orig_img =
                orig_rgb.and_then(|rgb| contact_sheet::rgb_image(orig.width, orig.height, rgb));
            let pj = prompt_jpeg(prompt, job.tables).ok();
            let region = pj.as_ref().and_then(|pj| {
                let (rgb, r) = sample::measure_jpeg(pj, &stem);
                let img = contact_sheet::rgb_image(r.width, r.height, rgb?)?;
                Some(contact_sheet::prompt_region(&img, prompt.prompt_height()))
            });
            if let Some(pj) = &pj {
                codeclm_manifests::write_atomic(&dir.join(format!("{stem}-prompt.jpg")), pj)?;
            }
            originals.push(orig_img);
            regions.push(region);
        }
        let tiles: Vec<Option<RgbImage>> = images.iter().map(|g| tile_of(&g.sample)).collect();
        let rows: Vec<PromptRow> = (0..job.prompts.len())
            .map(|p| PromptRow {
                original: originals[p].as_ref(),
                prompt: regions[p].as_ref(),
                completions: images
                    .iter()
                    .zip(&tiles)
                    .filter(|(g, _)| g.prompt == Some(p))
                    .map(|(_, t)| t.as_ref())
                    .collect(),
            })
            .collect();
        contact_sheet::prompted_sheet(&rows, tile)
    };
    let sheet = job.out.join("contact_sheet.png");
    contact_sheet::save_png(&sheet_img, &sheet)?;
    let report = DecodabilityReport::new(
        images.iter().map(|g| g.sample.report.clone()).collect(),
        job.dataset_mean_bytes,
    );
    let report_path = job.out.join("decodability.json");
    report.write_json(&report_path)?;
    Ok(ImageSamplingResult {
        images,
        report,
        sheet,
        report_path,
    })
}

/// Mean codec bytes per image over a dataset's `ok` rows (for the length ratio).
pub fn dataset_mean_bytes(ds: &codeclm_manifests::Dataset) -> Option<f64> {
    dataset_mean_bytes_of(ds, "image")
}

/// Mean codec bytes per sample of one modality (`image`, `video`) over a dataset's `ok` rows.
pub fn dataset_mean_bytes_of(ds: &codeclm_manifests::Dataset, modality: &str) -> Option<f64> {
    let lens: Vec<u64> = ds
        .rows()
        .iter()
        .filter(|r| r.is_ok() && r.modality == modality)
        .filter_map(|r| r.codec_bytes)
        .collect();
    (!lens.is_empty()).then(|| lens.iter().sum::<u64>() as f64 / lens.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::{image_prompt, CutAt};
    use codeclm_manifests::vocab::PreTokenize;
    use contact_sheet::GAP;

    fn vocab(streams: &[Vec<u8>]) -> Vocab {
        let json =
            crate::tokenize::train_on_streams(streams, 320, PreTokenize::RestartMarkers).unwrap();
        Vocab::from_json(&json, Path::new("test.json")).unwrap()
    }

    /// A prompted run whose "model" continues each prompt with the true rest of its image:
    /// every completion must be the original, pixel for pixel, on the sheet too.
    #[test]
    fn prompted_run_with_the_true_continuation() {
        let (streams, tables) = crate::test_media::photo_streams(2);
        let v = vocab(&streams);
        let prompts: Vec<ImagePrompt> = streams
            .iter()
            .enumerate()
            .map(|(i, s)| {
                image_prompt(
                    &format!("img{i}.png"),
                    s.clone(),
                    &v,
                    0.25,
                    CutAt::BeforeMarker,
                )
                .unwrap()
            })
            .collect();
        let tmp = tempfile::tempdir().unwrap();
        let job = ImageSampling {
            vocab: &v,
            tables: &tables,
            prompts: &prompts,
            n: 2,
            batch: 3,
            out: tmp.path(),
            dataset_mean_bytes: Some(streams[0].len() as f64),
            progress: false,
        };
        let mut calls = 0;
        let mut truth = |batch: &[Vec<u32>]| -> Result<Vec<Vec<u32>>, String> {
            calls += 1;
            Ok(batch
                .iter()
                .map(|p| {
                    let full = prompts.iter().find(|q| &q.ids == p).unwrap();
                    let mut rest = full.tokens[p.len() - 1..].to_vec();
                    rest.push(v.eos);
                    rest
                })
                .collect())
        };
        let r = sample_images(&job, &mut truth).unwrap();
        assert_eq!(calls, 2, "4 sequences in batches of 3");
        assert_eq!(r.report.samples, 4);
        assert_eq!((r.report.clean_fraction, r.report.mcu_fraction), (1.0, 1.0));
        assert_eq!(r.report.eos_fraction, 1.0);
        assert!(tmp.path().join("samples/p01-img1-s01.jpg").is_file());
        assert!(tmp.path().join("samples/p01-img1-s01.png").is_file());
        assert!(tmp.path().join("samples/p00-img0-prompt.jpg").is_file());
        let json: DecodabilityReport =
            serde_json::from_slice(&std::fs::read(&r.report_path).unwrap()).unwrap();
        assert_eq!(json, r.report);
        let sheet = image::open(&r.sheet).unwrap().to_rgb8();
        assert_eq!(
            (sheet.width(), sheet.height()),
            (GAP + 4 * (256 + GAP), GAP + 2 * (256 + GAP))
        );
        // Row 1: original | prompt | completion | completion; the completions equal the original.
        let tile = |c: u32, r: u32| {
            image::imageops::crop_imm(&sheet, GAP + c * 260, GAP + r * 260, 256, 256).to_image()
        };
        assert_eq!(tile(2, 1), tile(0, 1));
        assert_eq!(tile(3, 1), tile(0, 1));
        // The prompt tile: top quarter as the original, the rest grey.
        let (p, o) = (tile(1, 1), tile(0, 1));
        assert_eq!(p.get_pixel(100, 10), o.get_pixel(100, 10));
        assert_eq!(*p.get_pixel(100, 200), contact_sheet::NOT_IN_PROMPT);
    }

    /// Unconditional sampling from a "model" that emits noise: files and figures, no panic.
    #[test]
    fn unconditional_run_of_noise() {
        let (streams, tables) = crate::test_media::photo_streams(1);
        let v = vocab(&streams);
        let tmp = tempfile::tempdir().unwrap();
        let job = ImageSampling {
            vocab: &v,
            tables: &tables,
            prompts: &[],
            n: 5,
            batch: 2,
            out: tmp.path(),
            dataset_mean_bytes: None,
            progress: false,
        };
        let mut state = 7u64;
        let mut noise = |batch: &[Vec<u32>]| -> Result<Vec<Vec<u32>>, String> {
            Ok(batch
                .iter()
                .map(|_| {
                    (0..300)
                        .map(|_| {
                            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                            ((state >> 33) % v.size as u64) as u32
                        })
                        .collect()
                })
                .collect())
        };
        let r = sample_images(&job, &mut noise).unwrap();
        assert_eq!(r.report.samples, 5);
        assert!(r.report.mcu_fraction < 0.01);
        let sheet = image::open(&r.sheet).unwrap().to_rgb8();
        assert_eq!(
            (sheet.width(), sheet.height()),
            (GAP + 3 * 260, GAP + 2 * 260)
        );
        for i in 0..5 {
            let stem = tmp.path().join(format!("samples/sample-{i:03}"));
            assert!(stem.with_extension("jpg").is_file() || stem.with_extension("bin").is_file());
        }
    }
}
