//! Generated token sequences -> JPEG files and decodability figures, the image [`Medium`]. A
//! model's output is any sequence of ids; this turns it into the bytes it stands for, cleans it
//! up as the paper's code does (keep `FF D8 .. FF D9`, add what is missing), splices the
//! dataset's tables back, and measures how much of it a decoder can use. Nothing here panics on
//! garbage.

use std::path::Path;

use codeclm_codec::jpeg;
pub use codeclm_codec::jpeg::report::{measure_jpeg, ImageDecodability, MAX_SAMPLE_PIXELS};
use codeclm_formats::vocab::Vocab;
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::contact_sheet::{self, PromptRow};
use crate::prompt::{prompt_jpeg, ImagePrompt};
use crate::run::{self, Generated, Medium, Summary};
use crate::SampleError;

crate::run::figures_from_fields!(ImageDecodability);

/// One generated image: the interchange file, its pixels when it decodes, and its figures.
#[derive(Clone, Debug)]
pub struct ImageGeneration {
    /// The decoded token bytes, as generated (for `.bin` when they are not a JPEG at all).
    pub raw: Vec<u8>,
    /// The cleaned stream with the tables spliced back, when its header could be read.
    pub jpeg: Option<Vec<u8>>,
    /// RGB pixels (`width x height x 3`) when libjpeg produced any.
    pub rgb: Option<Vec<u8>>,
    pub report: ImageDecodability,
}

/// Token ids -> bytes, dropping special tokens; ids outside the vocabulary are dropped too
/// (a model can only emit ids below its own vocabulary size, which may exceed the tokenizer's).
pub fn ids_to_bytes(vocab: &Vocab, ids: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ids.len() * 2);
    for &id in ids {
        out.extend_from_slice(vocab.token_bytes(id));
    }
    out
}

/// The paper's cleanup plus the tables: `FF D8 .. FF D9` kept, SOI/EOI added where missing, the
/// dataset's DQT/DHT spliced around the frame header. Fails when the header cannot be parsed.
pub fn generated_to_jpeg(bytes: &[u8], tables: &[u8]) -> Result<Vec<u8>, String> {
    let tidy = jpeg::tidy_generated(bytes);
    jpeg::splice_tables(&tidy, tables).map_err(|e| e.to_string())
}

/// Turns one generated sequence (`ids`: the whole sequence, prompt included, as the model sees
/// it) into an [`ImageGeneration`]. `n_generated` is how many of the ids the model produced;
/// `header` is the dataset's fixed stream header, when known.
pub fn render_image(
    name: &str,
    vocab: &Vocab,
    ids: &[u32],
    n_generated: usize,
    tables: &[u8],
    header: Option<&[u8]>,
) -> ImageGeneration {
    let raw = ids_to_bytes(vocab, ids);
    let mut report = ImageDecodability {
        name: name.to_string(),
        n_tokens: n_generated,
        n_bytes: raw.len(),
        ended_with_eos: ids.last() == Some(&vocab.eos),
        header_ok: header.is_some_and(|h| raw.starts_with(h)),
        ..ImageDecodability::default()
    };
    let jpeg = match generated_to_jpeg(&raw, tables) {
        Ok(j) => j,
        Err(e) => {
            report.decoder_message = Some(e);
            return ImageGeneration {
                raw,
                jpeg: None,
                rgb: None,
                report,
            };
        }
    };
    let (rgb, r) = measure_jpeg(&jpeg, name);
    report = ImageDecodability {
        n_tokens: report.n_tokens,
        n_bytes: report.n_bytes,
        ended_with_eos: report.ended_with_eos,
        header_ok: report.header_ok,
        ..r
    };
    ImageGeneration {
        raw,
        jpeg: Some(jpeg),
        rgb,
        report,
    }
}

/// Writes a generation as `<name>.jpg` + `<name>.png` (decoded pixels), or `<name>.bin` (the
/// raw bytes) when no JPEG header could be made of it. Atomic writes.
pub fn write_image(dir: &Path, name: &str, g: &ImageGeneration) -> Result<(), SampleError> {
    match &g.jpeg {
        Some(j) => codeclm_formats::write_atomic(&dir.join(format!("{name}.jpg")), j)?,
        None => codeclm_formats::write_atomic(&dir.join(format!("{name}.bin")), &g.raw)?,
    }
    if let Some(rgb) = &g.rgb {
        let png = contact_sheet::encode_png(g.report.width, g.report.height, rgb)
            .map_err(codeclm_formats::Error::Invalid)?;
        codeclm_formats::write_atomic(&dir.join(format!("{name}.png")), &png)?;
    }
    Ok(())
}

/// The decodability report of an image sampling run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageReport {
    #[serde(flatten)]
    pub summary: Summary,
    /// Mean over generations of the fraction of MCUs in well-formed restart intervals.
    pub mcu_fraction: f64,
    /// Fraction of generations that start with the dataset's header.
    #[serde(default)]
    pub header_fraction: f64,
    pub per_generation: Vec<ImageDecodability>,
}

impl ImageReport {
    /// Aggregates per-generation figures; `dataset_mean_bytes` from the dataset's manifest.
    pub fn new(per_generation: Vec<ImageDecodability>, dataset_mean_bytes: Option<f64>) -> Self {
        ImageReport {
            summary: Summary::of(&per_generation, dataset_mean_bytes),
            mcu_fraction: run::mean(&per_generation, |s| s.mcu_fraction),
            header_fraction: run::mean(&per_generation, |s| s.header_ok as u8 as f64),
            per_generation,
        }
    }
}

impl std::fmt::Display for ImageReport {
    /// The one printed line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let header = format!("header {:.1}%", 100.0 * self.header_fraction);
        let mcus = format!("MCUs {:.1}%", 100.0 * self.mcu_fraction);
        f.write_str(&self.summary.line("images", &[header, mcus]))
    }
}

/// JPEG images: generations are cleaned and completed with the dataset's tables; the contact
/// sheet shows one row per prompt (original | prompt region | completions) or a grid.
pub struct Images<'a> {
    /// The dataset's tables-only JPEG stream (spliced into every generation).
    pub tables: &'a [u8],
    /// The dataset's fixed stream header ([`JpegGrammar::header`](codeclm_codec::jpeg::JpegGrammar::header)),
    /// for the header figure.
    pub header: Option<&'a [u8]>,
}

fn tile_of(g: &ImageGeneration) -> Option<RgbImage> {
    contact_sheet::rgb_image(g.report.width, g.report.height, g.rgb.clone()?)
}

impl Medium for Images<'_> {
    type Prompt = ImagePrompt;
    type Generation = ImageGeneration;
    type Figures = ImageDecodability;
    type Report = ImageReport;

    fn prompt_ids(prompt: &ImagePrompt) -> &[u32] {
        &prompt.ids
    }

    fn unconditional_name(&self, i: usize) -> String {
        format!("image-{i:03}")
    }

    fn prompted_name(&self, p: usize, prompt: &ImagePrompt, i: usize) -> String {
        format!("p{p:02}-{}-s{i:02}", run::safe_stem(&prompt.name))
    }

    fn render(&self, name: &str, vocab: &Vocab, ids: &[u32], n_new: usize) -> ImageGeneration {
        render_image(name, vocab, ids, n_new, self.tables, self.header)
    }

    fn figures(g: &ImageGeneration) -> &ImageDecodability {
        &g.report
    }

    fn write(&self, dir: &Path, name: &str, g: &ImageGeneration) -> Result<(), SampleError> {
        write_image(dir, name, g)
    }

    /// Also writes each prompt's original (`pPP-<source>-original.jpg`) and its prompt region
    /// (`pPP-<source>-prompt.jpg`).
    fn sheet(
        &self,
        dir: &Path,
        prompts: &[ImagePrompt],
        generated: &[Generated<ImageGeneration>],
    ) -> Result<RgbImage, SampleError> {
        let tile = (256, 256);
        let tiles: Vec<Option<RgbImage>> =
            generated.iter().map(|g| tile_of(&g.generation)).collect();
        if prompts.is_empty() {
            let refs: Vec<Option<&RgbImage>> = tiles.iter().map(Option::as_ref).collect();
            let cols = (generated.len() as f64).sqrt().ceil() as usize;
            return Ok(contact_sheet::grid_sheet(&refs, cols, tile));
        }
        let mut originals = Vec::new();
        let mut regions = Vec::new();
        for (p, prompt) in prompts.iter().enumerate() {
            let stem = format!("p{p:02}-{}", run::safe_stem(&prompt.name));
            let full = jpeg::splice_tables(&prompt.stream, self.tables)?;
            let (orig_rgb, orig) = measure_jpeg(&full, &stem);
            codeclm_formats::write_atomic(&dir.join(format!("{stem}-original.jpg")), &full)?;
            let orig_img =
                orig_rgb.and_then(|rgb| contact_sheet::rgb_image(orig.width, orig.height, rgb));
            let pj = prompt_jpeg(prompt, self.tables).ok();
            let region = pj.as_ref().and_then(|pj| {
                let (rgb, r) = measure_jpeg(pj, &stem);
                let img = contact_sheet::rgb_image(r.width, r.height, rgb?)?;
                Some(contact_sheet::prompt_region(&img, prompt.prompt_height()))
            });
            if let Some(pj) = &pj {
                codeclm_formats::write_atomic(&dir.join(format!("{stem}-prompt.jpg")), pj)?;
            }
            originals.push(orig_img);
            regions.push(region);
        }
        let rows: Vec<PromptRow> = (0..prompts.len())
            .map(|p| PromptRow {
                original: originals[p].as_ref(),
                prompt: regions[p].as_ref(),
                completions: generated
                    .iter()
                    .zip(&tiles)
                    .filter(|(g, _)| g.prompt == Some(p))
                    .map(|(_, t)| t.as_ref())
                    .collect(),
            })
            .collect();
        Ok(contact_sheet::prompted_sheet(&rows, tile))
    }

    fn report(per: Vec<ImageDecodability>, dataset_mean_bytes: Option<f64>) -> ImageReport {
        ImageReport::new(per, dataset_mean_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use codeclm_codec::jpeg::scan::FrameLayout;
    use codeclm_formats::vocab::PreTokenize;
    use proptest::prelude::*;

    /// A vocabulary learned from the photos (once per test binary).
    fn vocab(_: &[Vec<u8>]) -> Vocab {
        static V: std::sync::OnceLock<Vocab> = std::sync::OnceLock::new();
        V.get_or_init(|| {
            let (streams, _) = codeclm_etl::test_media::photo_streams(10);
            let json =
                codeclm_etl::tokenize::train_on_streams(&streams, 320, PreTokenize::RestartMarkers)
                    .unwrap();
            Vocab::from_json(&json, Path::new("test.json")).unwrap()
        })
        .clone()
    }

    fn framed(v: &Vocab, bytes: &[u8]) -> Vec<u32> {
        let mut ids = vec![v.bos];
        v.encode(bytes, &mut ids);
        ids.push(v.eos);
        ids
    }

    #[test]
    fn a_real_stream_renders_clean_and_identical() {
        let (streams, tables) = codeclm_etl::test_media::photo_streams(3);
        let v = vocab(&streams);
        for s in &streams {
            let ids = framed(&v, s);
            let out = render_image("x", &v, &ids, ids.len(), &tables, None);
            let full = jpeg::splice_tables(s, &tables).unwrap();
            assert_eq!(out.jpeg.as_deref(), Some(&full[..]));
            let r = &out.report;
            assert!(r.decodes_clean && r.decodes && r.ended_with_eos, "{r:?}");
            assert_eq!(r.mcu_fraction, 1.0);
            assert_eq!((r.width, r.height, r.n_bytes), (256, 256, s.len()));
            let (d, _) = jpeg::decode_lenient(&full, 1 << 20).unwrap();
            assert_eq!(out.rgb.as_deref(), Some(&d.rgb[..]));
        }
    }

    #[test]
    fn truncated_and_damaged_streams_score_what_survives() {
        let (streams, tables) = codeclm_etl::test_media::photo_streams(3);
        let v = vocab(&streams);
        for s in &streams {
            let start = FrameLayout::parse(s).unwrap().scan_start;
            // Half the scan: about half the MCUs (MCU sizes vary along the image).
            let half = &s[..start + (s.len() - start) / 2];
            let r = render_image("x", &v, &framed(&v, half), 0, &tables, None).report;
            assert!(r.decodes && !r.decodes_clean, "{r:?}");
            assert!((0.3..0.7).contains(&r.mcu_fraction), "{r:?}");
            // Header only: nothing decodes, yet libjpeg returns a grey image.
            let r = render_image("x", &v, &framed(&v, &s[..start]), 0, &tables, None).report;
            assert_eq!(r.mcu_fraction, 0.0);
            assert!(!r.decodes_clean);
        }
        // Not a JPEG header at all: no file, no panic, the reason recorded.
        let r = render_image("x", &v, &framed(&v, b"\x01\x02\x03"), 3, &tables, None).report;
        assert!(!r.decodes && r.decoder_message.is_some());
    }

    #[test]
    fn report_aggregates_and_prints_one_line() {
        let a = ImageDecodability {
            n_bytes: 100,
            n_tokens: 90,
            decodes: true,
            decodes_clean: true,
            mcu_fraction: 1.0,
            ..Default::default()
        };
        let b = ImageDecodability {
            n_bytes: 300,
            n_tokens: 250,
            mcu_fraction: 0.5,
            ended_with_eos: true,
            decodes: true,
            ..Default::default()
        };
        let r = ImageReport::new(vec![a, b], Some(400.0));
        assert_eq!(
            (r.summary.clean_fraction, r.summary.decodes_fraction),
            (0.5, 1.0)
        );
        assert_eq!(
            (r.mcu_fraction, r.summary.mean_bytes, r.summary.length_ratio),
            (0.75, 200.0, Some(0.5))
        );
        let line = r.to_string();
        assert!(
            !line.contains('\n') && line.contains("clean 50.0%"),
            "{line}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        /// Random bytes, with and without a real header in front: never a panic.
        #[test]
        fn garbage_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..3000),
            with_header in any::<bool>(),
        ) {
            let (streams, tables) = codeclm_etl::test_media::photo_streams(1);
            let mut data = Vec::new();
            if with_header {
                data.extend_from_slice(&streams[0][..FrameLayout::parse(&streams[0]).unwrap().scan_start]);
            }
            data.extend_from_slice(&bytes);
            if let Ok(j) = generated_to_jpeg(&data, &tables) {
                let (_, r) = measure_jpeg(&j, "fuzz");
                prop_assert!((0.0..=1.0).contains(&r.mcu_fraction));
            }
        }

        /// Random token ids (some outside the vocabulary) through the whole render path.
        #[test]
        fn random_token_ids_never_panic(ids in proptest::collection::vec(0u32..400, 0..2000)) {
            let (streams, tables) = codeclm_etl::test_media::photo_streams(1);
            let v = vocab(&streams);
            let out = render_image("fuzz", &v, &ids, ids.len(), &tables, None);
            prop_assert!((0.0..=1.0).contains(&out.report.mcu_fraction));
            if let Some(rgb) = &out.rgb {
                prop_assert_eq!(rgb.len() as u64, out.report.width as u64 * out.report.height as u64 * 3);
            }
        }

        /// Real streams truncated, with bytes overwritten, inserted or deleted.
        #[test]
        fn mutated_real_streams_never_panic(
            which in 0usize..3,
            cut in 0.0f64..1.0,
            edits in proptest::collection::vec((0.0f64..1.0, any::<u8>(), 0u8..3), 0..12),
        ) {
            let (streams, tables) = codeclm_etl::test_media::photo_streams(3);
            let mut s = streams[which].clone();
            for (at, byte, op) in edits {
                let i = ((s.len() as f64 * at) as usize).min(s.len().saturating_sub(1));
                match op {
                    0 => s[i] = byte,
                    1 => s.insert(i, byte),
                    _ => { s.remove(i); }
                }
            }
            s.truncate(((s.len() as f64) * cut) as usize + 1);
            if let Ok(j) = generated_to_jpeg(&s, &tables) {
                let (rgb, r) = measure_jpeg(&j, "fuzz");
                prop_assert!((0.0..=1.0).contains(&r.mcu_fraction));
                prop_assert_eq!(rgb.is_some(), r.decodes);
            }
        }
    }

    fn run_vocab(streams: &[Vec<u8>]) -> Vocab {
        let json =
            codeclm_etl::tokenize::train_on_streams(streams, 320, PreTokenize::RestartMarkers)
                .unwrap();
        Vocab::from_json(&json, Path::new("test.json")).unwrap()
    }

    /// A prompted run whose "model" continues each prompt with the true rest of its image:
    /// every completion must be the original, pixel for pixel, on the sheet too.
    #[test]
    fn prompted_run_with_the_true_continuation() {
        use crate::prompt::{image_prompt, CutAt};
        use contact_sheet::GAP;
        let (streams, tables) = codeclm_etl::test_media::photo_streams(2);
        let v = run_vocab(&streams);
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
        let medium = Images {
            tables: &tables,
            header: None,
        };
        let job = run::Sampling {
            medium: &medium,
            vocab: &v,
            prompts: &prompts,
            n: 2,
            batch: 3,
            out: tmp.path(),
            dataset_mean_bytes: Some(streams[0].len() as f64),
            progress: false,
            constrain: crate::constrain::Constrain::None,
        };
        let mut calls = 0;
        let mut truth = |batch: &[Vec<u32>]| -> Result<Vec<Vec<u32>>, SampleError> {
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
        let r = run::sample(&job, &mut truth).unwrap();
        assert_eq!(calls, 2, "4 sequences in batches of 3");
        assert_eq!(r.report.summary.generations, 4);
        assert_eq!(
            (r.report.summary.clean_fraction, r.report.mcu_fraction),
            (1.0, 1.0)
        );
        assert_eq!(r.report.summary.eos_fraction, 1.0);
        assert!(tmp.path().join("generations/p01-img1-s01.jpg").is_file());
        assert!(tmp.path().join("generations/p01-img1-s01.png").is_file());
        assert!(tmp.path().join("generations/p00-img0-prompt.jpg").is_file());
        let json: ImageReport =
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
        use contact_sheet::GAP;
        let (streams, tables) = codeclm_etl::test_media::photo_streams(1);
        let v = run_vocab(&streams);
        let tmp = tempfile::tempdir().unwrap();
        let medium = Images {
            tables: &tables,
            header: None,
        };
        let job = run::Sampling {
            medium: &medium,
            vocab: &v,
            prompts: &[],
            n: 5,
            batch: 2,
            out: tmp.path(),
            dataset_mean_bytes: None,
            progress: false,
            constrain: crate::constrain::Constrain::None,
        };
        let mut state = 7u64;
        let mut noise = |batch: &[Vec<u32>]| -> Result<Vec<Vec<u32>>, SampleError> {
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
        let r = run::sample(&job, &mut noise).unwrap();
        assert_eq!(r.report.summary.generations, 5);
        assert!(r.report.mcu_fraction < 0.01);
        let sheet = image::open(&r.sheet).unwrap().to_rgb8();
        assert_eq!(
            (sheet.width(), sheet.height()),
            (GAP + 3 * 260, GAP + 2 * 260)
        );
        for i in 0..5 {
            let stem = tmp.path().join(format!("generations/image-{i:03}"));
            assert!(stem.with_extension("jpg").is_file() || stem.with_extension("bin").is_file());
        }
    }
}
