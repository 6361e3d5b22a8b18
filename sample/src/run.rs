//! One sampling run, for images and videos alike: prompts (or BOS alone) go to a [`Generator`]
//! in batches, every generation is rendered and written under `generations/`, and the run ends
//! with a contact sheet and a decodability report. What differs between JPEG images and H.264
//! videos (how ids become files and figures, what the sheet shows) is a [`Medium`].

use std::path::{Path, PathBuf};

use codeclm_formats::vocab::Vocab;
use codeclm_model::{Constraint, GenerateConfig, Lm};
use image::RgbImage;
use serde::Serialize;

use crate::constrain::Constrain;
use crate::SampleError;

/// Completes batches of prompts (each BOS + tokens), returning only the new tokens of each,
/// EOS included when the model produced it.
pub trait Generator {
    fn generate(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<Vec<u32>>, SampleError>;
}

impl<F> Generator for F
where
    F: FnMut(&[Vec<u32>]) -> Result<Vec<Vec<u32>>, SampleError>,
{
    fn generate(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<Vec<u32>>, SampleError> {
        self(prompts)
    }
}

/// A trained model as a [`Generator`]: every batch gets its own seed derived from the run's
/// ([`batch_seed`]), so a seeded run is reproducible and no two batches repeat each other.
pub struct ModelGenerator<'a> {
    model: &'a mut Lm,
    cfg: GenerateConfig,
    batch_index: u64,
    /// Prompts at least this long get no new tokens (their generation is the prompt alone);
    /// `None` when generation slides a window, so that every prompt fits.
    context: Option<usize>,
    /// New tokens generated so far.
    pub tokens: usize,
    /// Prompts that filled the model's context and so got nothing.
    pub context_full: usize,
    /// Ticked once per sequence completed.
    pub progress: Option<indicatif::ProgressBar>,
    /// Every token drawn under this constraint, when set.
    pub constraint: Option<Box<dyn Constraint>>,
    /// Seconds spent generating (model and constraint).
    pub seconds: f64,
}

impl<'a> ModelGenerator<'a> {
    pub fn new(model: &'a mut Lm, cfg: GenerateConfig) -> Self {
        let context = cfg
            .window
            .is_none()
            .then_some(model.config.max_position_embeddings);
        ModelGenerator {
            model,
            cfg,
            batch_index: 0,
            context,
            tokens: 0,
            context_full: 0,
            progress: None,
            constraint: None,
            seconds: 0.0,
        }
    }

    /// Draws every token under `constraint`.
    pub fn constrained(mut self, constraint: Option<Box<dyn Constraint>>) -> Self {
        self.constraint = constraint;
        self
    }

    /// The longest prompt that still gets new tokens (`usize::MAX` with a sliding window).
    pub fn context(&self) -> usize {
        self.context.unwrap_or(usize::MAX)
    }
}

impl Generator for ModelGenerator<'_> {
    fn generate(&mut self, batch: &[Vec<u32>]) -> Result<Vec<Vec<u32>>, SampleError> {
        let cfg = GenerateConfig {
            seed: batch_seed(self.cfg.seed, self.batch_index),
            ..self.cfg.clone()
        };
        self.batch_index += 1;
        let limit = self.context();
        let fits: Vec<usize> = (0..batch.len())
            .filter(|&i| batch[i].len() < limit)
            .collect();
        self.context_full += batch.len() - fits.len();
        let started = std::time::Instant::now();
        let constraint = self.constraint.as_deref_mut();
        let out = if fits.len() == batch.len() {
            codeclm_model::generate_with(self.model, batch, &cfg, constraint)?
        } else {
            let mut out = vec![Vec::new(); batch.len()];
            if !fits.is_empty() {
                let prompts: Vec<Vec<u32>> = fits.iter().map(|&i| batch[i].clone()).collect();
                let new = codeclm_model::generate_with(self.model, &prompts, &cfg, constraint)?;
                for (&i, ids) in fits.iter().zip(new) {
                    out[i] = ids;
                }
            }
            out
        };
        self.seconds += started.elapsed().as_secs_f64();
        self.tokens += out.iter().map(Vec::len).sum::<usize>();
        if let Some(bar) = &self.progress {
            bar.inc(batch.len() as u64);
        }
        Ok(out)
    }
}

/// The seed of the `index`-th generation batch of a run seeded with `seed`: reproducible, and
/// different for every batch.
pub fn batch_seed(seed: u64, index: u64) -> u64 {
    seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// What the figures of one generation have in common across media.
pub trait Figures {
    fn n_tokens(&self) -> usize;
    fn n_bytes(&self) -> usize;
    fn ended_with_eos(&self) -> bool;
    fn decodes(&self) -> bool;
    fn decodes_clean(&self) -> bool;
}

/// Implements [`Figures`] for a struct with the fields of the same names.
macro_rules! figures_from_fields {
    ($t:ty) => {
        impl $crate::run::Figures for $t {
            fn n_tokens(&self) -> usize {
                self.n_tokens
            }
            fn n_bytes(&self) -> usize {
                self.n_bytes
            }
            fn ended_with_eos(&self) -> bool {
                self.ended_with_eos
            }
            fn decodes(&self) -> bool {
                self.decodes
            }
            fn decodes_clean(&self) -> bool {
                self.decodes_clean
            }
        }
    };
}
pub(crate) use figures_from_fields;

/// The figures every decodability report leads with, over the generations of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Summary {
    pub generations: usize,
    /// Fraction of generations the decoder reads with no error and no warning.
    pub clean_fraction: f64,
    /// Fraction of generations the decoder produces pixels for at all.
    pub decodes_fraction: f64,
    /// Fraction of generations that ended with EOS before the token limit.
    pub eos_fraction: f64,
    /// Mean generated tokens and mean codec bytes per generation.
    pub mean_tokens: f64,
    pub mean_bytes: f64,
    /// The dataset's mean codec bytes per sample of the medium (ok rows), and
    /// `mean_bytes / dataset_mean_bytes`.
    pub dataset_mean_bytes: Option<f64>,
    pub length_ratio: Option<f64>,
}

impl Summary {
    pub fn of<F: Figures>(per: &[F], dataset_mean_bytes: Option<f64>) -> Summary {
        let b = |x: bool| x as u8 as f64;
        let mean_bytes = mean(per, |f| f.n_bytes() as f64);
        Summary {
            generations: per.len(),
            clean_fraction: mean(per, |f| b(f.decodes_clean())),
            decodes_fraction: mean(per, |f| b(f.decodes())),
            eos_fraction: mean(per, |f| b(f.ended_with_eos())),
            mean_tokens: mean(per, |f| f.n_tokens() as f64),
            mean_bytes,
            dataset_mean_bytes,
            length_ratio: dataset_mean_bytes
                .filter(|m| *m > 0.0)
                .map(|m| mean_bytes / m),
        }
    }

    /// `{what}` is the medium's plural ("images"); `structure` the medium's own figures, each
    /// already formatted (`MCUs 93.0%`).
    pub fn line(&self, what: &str, structure: &[String]) -> String {
        let mut s = format!(
            "decodability: {} {what} | clean {:.1}% | decodes {:.1}%",
            self.generations,
            100.0 * self.clean_fraction,
            100.0 * self.decodes_fraction,
        );
        for part in structure {
            s.push_str(" | ");
            s.push_str(part);
        }
        s.push_str(&format!(
            " | EOS {:.1}% | {:.0} tokens, {:.0} B per generation",
            100.0 * self.eos_fraction,
            self.mean_tokens,
            self.mean_bytes
        ));
        if let (Some(m), Some(r)) = (self.dataset_mean_bytes, self.length_ratio) {
            s.push_str(&format!(" ({r:.2}x the dataset's {m:.0} B)"));
        }
        s
    }
}

/// Mean of `f` over `items` (0 when there are none).
pub fn mean<T>(items: &[T], f: impl Fn(&T) -> f64) -> f64 {
    if items.is_empty() {
        0.0
    } else {
        items.iter().map(f).sum::<f64>() / items.len() as f64
    }
}

/// Writes a report as pretty JSON (atomically).
pub fn write_json<T: Serialize>(value: &T, path: &Path) -> Result<(), SampleError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| codeclm_formats::Error::Invalid(e.to_string()))?;
    codeclm_formats::write_atomic(path, format!("{text}\n").as_bytes())?;
    Ok(())
}

/// One generation and where it came from.
pub struct Generated<G> {
    /// Index into the prompts (`None` when unconditional).
    pub prompt: Option<usize>,
    /// File stem under `generations/`.
    pub name: String,
    /// Prompt + new tokens, as rendered.
    pub ids: Vec<u32>,
    pub generation: G,
}

/// What one medium brings to a sampling run.
pub trait Medium {
    type Prompt;
    /// A rendered generation: its bytes, pixels and figures.
    type Generation;
    type Figures: Figures + Clone;
    type Report: Serialize + std::fmt::Display;

    /// BOS + the prompt's tokens.
    fn prompt_ids(prompt: &Self::Prompt) -> &[u32];
    /// File stem of the `i`-th unconditional generation.
    fn unconditional_name(&self, i: usize) -> String;
    /// File stem of the `i`-th completion of prompt `p`.
    fn prompted_name(&self, p: usize, prompt: &Self::Prompt, i: usize) -> String;
    /// Turns one sequence (prompt included) into a generation; `n_new` ids were generated.
    fn render(&self, name: &str, vocab: &Vocab, ids: &[u32], n_new: usize) -> Self::Generation;
    fn figures(g: &Self::Generation) -> &Self::Figures;
    /// Writes a generation's files under `dir`.
    fn write(&self, dir: &Path, name: &str, g: &Self::Generation) -> Result<(), SampleError>;
    /// Writes what the prompts were made of under `dir` and lays out the contact sheet.
    fn sheet(
        &self,
        dir: &Path,
        prompts: &[Self::Prompt],
        generated: &[Generated<Self::Generation>],
    ) -> Result<RgbImage, SampleError>;
    fn report(per: Vec<Self::Figures>, dataset_mean_bytes: Option<f64>) -> Self::Report;
}

/// What to sample and where to put it.
pub struct Sampling<'a, M: Medium> {
    pub medium: &'a M,
    pub vocab: &'a Vocab,
    /// Prompts; none means unconditional sampling from BOS.
    pub prompts: &'a [M::Prompt],
    /// Completions per prompt, or generations in all when unconditional.
    pub n: usize,
    /// Sequences per generator call.
    pub batch: usize,
    /// Output directory: `generations/`, `contact_sheet.png`, `decodability.json`.
    pub out: &'a Path,
    /// The dataset's mean codec bytes per sample of this medium, for the length ratio.
    pub dataset_mean_bytes: Option<f64>,
    pub progress: bool,
    /// The grammar the generator draws under (recorded in the report).
    pub constrain: Constrain,
}

/// A report as `decodability.json` holds it: the grammar sampling followed, then the figures.
#[derive(Serialize)]
struct Written<'a, R: Serialize> {
    constrain: Constrain,
    #[serde(flatten)]
    report: &'a R,
}

/// What a run produced.
pub struct Sampled<M: Medium> {
    pub generated: Vec<Generated<M::Generation>>,
    pub report: M::Report,
    pub sheet: PathBuf,
    pub report_path: PathBuf,
}

/// Runs the sampling. Generations are named by the medium, in generation order, so a seeded
/// run writes the same files every time.
pub fn sample<M: Medium>(
    job: &Sampling<M>,
    generator: &mut dyn Generator,
) -> Result<Sampled<M>, SampleError> {
    let dir = job.out.join("generations");
    std::fs::create_dir_all(&dir).map_err(|source| SampleError::Io {
        path: dir.clone(),
        source,
    })?;
    // (prompt index, name, prompt ids) of every sequence to generate.
    let mut todo: Vec<(Option<usize>, String, Vec<u32>)> = Vec::new();
    if job.prompts.is_empty() {
        for i in 0..job.n {
            todo.push((None, job.medium.unconditional_name(i), vec![job.vocab.bos]));
        }
    } else {
        for (p, prompt) in job.prompts.iter().enumerate() {
            for i in 0..job.n {
                let ids = M::prompt_ids(prompt).to_vec();
                todo.push((Some(p), job.medium.prompted_name(p, prompt, i), ids));
            }
        }
    }
    let bar = if job.progress {
        indicatif::ProgressBar::new(todo.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("sampling {bar:30} {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut generated = Vec::with_capacity(todo.len());
    for chunk in todo.chunks(job.batch.max(1)) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|t| t.2.clone()).collect();
        let new = generator.generate(&prompts)?;
        if new.len() != prompts.len() {
            return Err(SampleError::Generation(format!(
                "{} completions for {} prompts",
                new.len(),
                prompts.len()
            )));
        }
        for ((p, name, prompt_ids), new) in chunk.iter().zip(new) {
            let mut ids = prompt_ids.clone();
            ids.extend_from_slice(&new);
            let g = job.medium.render(name, job.vocab, &ids, new.len());
            job.medium.write(&dir, name, &g)?;
            generated.push(Generated {
                prompt: *p,
                name: name.clone(),
                ids,
                generation: g,
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let sheet_img = job.medium.sheet(&dir, job.prompts, &generated)?;
    let sheet = job.out.join("contact_sheet.png");
    crate::contact_sheet::save_png(&sheet_img, &sheet)?;
    let per = generated
        .iter()
        .map(|g| M::figures(&g.generation).clone())
        .collect();
    let report = M::report(per, job.dataset_mean_bytes);
    // Every generation's ids (prompt included), so they can be cleaned and scored again by
    // other tools (`codeclm.jpeg.report` from Python gives the same figures).
    let mut lines = String::new();
    for g in &generated {
        let n_prompt = g.ids.len() - M::figures(&g.generation).n_tokens();
        let line = serde_json::json!({
            "name": g.name, "prompt": g.prompt, "n_prompt": n_prompt, "ids": g.ids,
        });
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    codeclm_formats::write_atomic(&job.out.join("generations.jsonl"), lines.as_bytes())?;
    let report_path = job.out.join("decodability.json");
    write_json(
        &Written {
            constrain: job.constrain,
            report: &report,
        },
        &report_path,
    )?;
    Ok(Sampled {
        generated,
        report,
        sheet,
        report_path,
    })
}

/// A file-name-safe stem of a prompt's source (at most 40 characters).
pub fn safe_stem(s: &str) -> String {
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
