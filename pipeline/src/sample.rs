//! Generated token sequences -> files and decodability figures. A model's output is any
//! sequence of ids; this turns it into the bytes it stands for, cleans it up as the paper's code
//! does (keep `FF D8 .. FF D9`, add what is missing), splices the dataset's tables back, and
//! measures how much of it a decoder can use. Nothing here panics on garbage.

use std::path::Path;

use codeclm_manifests::jpeg_stream;
use codeclm_manifests::vocab::Vocab;
use serde::{Deserialize, Serialize};

use crate::jpeg::{self, DecodeDamage};
use crate::jpeg_scan::{check_scan, FrameLayout, HuffmanTables, ScanCheck};

/// Largest frame a generated header may ask the decoder for (a garbled SOF can claim 65535^2).
pub const MAX_SAMPLE_PIXELS: u64 = 4096 * 4096;

/// Decodability of one generated image.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageDecodability {
    pub name: String,
    /// Generated ids, prompt excluded, BOS/EOS/PAD included as generated.
    pub n_tokens: usize,
    /// Codec bytes of the whole sample (prompt included), before cleanup.
    pub n_bytes: usize,
    /// The model ended the sequence with EOS (rather than hitting the token limit).
    pub ended_with_eos: bool,
    /// libjpeg decoded it with no error and no warning, and every MCU passed the scan check.
    pub decodes_clean: bool,
    /// libjpeg produced pixels at all (possibly with grey or garbled regions).
    pub decodes: bool,
    /// The fatal error or first warning, when not clean.
    pub decoder_message: Option<String>,
    pub decoder_warnings: u32,
    /// Huffman-level check of the restart intervals ([`check_scan`]).
    pub scan: Option<ScanCheck>,
    /// `scan.mcu_fraction()`, 0 when the structure could not be read.
    pub mcu_fraction: f64,
    pub width: u32,
    pub height: u32,
}

/// One generated image: the interchange file, its pixels when it decodes, and its figures.
#[derive(Clone, Debug)]
pub struct ImageSample {
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
    let tidy = jpeg_stream::tidy_generated(bytes);
    jpeg_stream::splice_tables(&tidy, tables).map_err(|e| e.to_string())
}

/// Turns one generated sequence (`ids`: the whole sequence, prompt included, as the model sees
/// it) into an [`ImageSample`]. `n_generated` is how many of the ids the model produced.
pub fn render_image(
    name: &str,
    vocab: &Vocab,
    ids: &[u32],
    n_generated: usize,
    tables: &[u8],
) -> ImageSample {
    let raw = ids_to_bytes(vocab, ids);
    let mut report = ImageDecodability {
        name: name.to_string(),
        n_tokens: n_generated,
        n_bytes: raw.len(),
        ended_with_eos: ids.last() == Some(&vocab.eos),
        ..ImageDecodability::default()
    };
    let jpeg = match generated_to_jpeg(&raw, tables) {
        Ok(j) => j,
        Err(e) => {
            report.decoder_message = Some(e);
            return ImageSample {
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
        ..r
    };
    ImageSample {
        raw,
        jpeg: Some(jpeg),
        rgb,
        report,
    }
}

/// Decodes a complete JPEG leniently and checks its scan: pixels (when libjpeg gives any) and
/// the decodability figures (lengths left at 0).
pub fn measure_jpeg(jpeg: &[u8], name: &str) -> (Option<Vec<u8>>, ImageDecodability) {
    let mut report = ImageDecodability {
        name: name.to_string(),
        ..ImageDecodability::default()
    };
    let scan = FrameLayout::parse(jpeg).and_then(|layout| {
        let tables = HuffmanTables::from_stream(jpeg)?;
        check_scan(jpeg, &layout, &tables)
    });
    match scan {
        Ok(s) => {
            report.mcu_fraction = s.mcu_fraction();
            report.scan = Some(s);
        }
        Err(e) => report.decoder_message = Some(e.to_string()),
    }
    let rgb = match jpeg::decode_lenient(jpeg, MAX_SAMPLE_PIXELS) {
        Ok((d, damage)) => {
            let DecodeDamage {
                warnings,
                first_warning,
                ..
            } = damage;
            report.decodes = true;
            report.decodes_clean = warnings == 0;
            report.decoder_warnings = warnings;
            if warnings > 0 {
                report.decoder_message = first_warning;
            }
            report.width = d.width;
            report.height = d.height;
            Some(d.rgb)
        }
        Err(e) => {
            report.decoder_message = Some(e.to_string());
            None
        }
    };
    // libjpeg does not complain about everything the scan check does (bad padding bits, a
    // short MCU count it fills silently): clean means both are satisfied.
    if report.decodes_clean
        && report
            .scan
            .as_ref()
            .is_some_and(|s| s.mcus_ok < s.mcus_total)
    {
        report.decodes_clean = false;
    }
    (rgb, report)
}

/// Writes a sample as `<name>.jpg` + `<name>.png` (decoded pixels), or `<name>.bin` (the raw
/// bytes) when no JPEG header could be made of it. Atomic writes.
pub fn write_image_sample(
    dir: &Path,
    name: &str,
    sample: &ImageSample,
) -> Result<(), codeclm_manifests::Error> {
    match &sample.jpeg {
        Some(j) => codeclm_manifests::write_atomic(&dir.join(format!("{name}.jpg")), j)?,
        None => codeclm_manifests::write_atomic(&dir.join(format!("{name}.bin")), &sample.raw)?,
    }
    if let Some(rgb) = &sample.rgb {
        let png = crate::contact_sheet::encode_png(sample.report.width, sample.report.height, rgb)
            .map_err(codeclm_manifests::Error::Invalid)?;
        codeclm_manifests::write_atomic(&dir.join(format!("{name}.png")), &png)?;
    }
    Ok(())
}

/// The decodability report of one sampling run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DecodabilityReport {
    pub samples: usize,
    /// Fraction of samples libjpeg decodes with no error and no warning.
    pub clean_fraction: f64,
    /// Fraction of samples libjpeg produces pixels for at all.
    pub decodes_fraction: f64,
    /// Mean over samples of the fraction of MCUs in well-formed restart intervals.
    pub mcu_fraction: f64,
    /// Fraction of samples that ended with EOS before the token limit.
    pub eos_fraction: f64,
    /// Mean generated tokens and mean codec bytes per sample.
    pub mean_tokens: f64,
    pub mean_bytes: f64,
    /// The dataset's mean codec bytes per image (ok rows), and `mean_bytes / dataset_mean_bytes`.
    pub dataset_mean_bytes: Option<f64>,
    pub length_ratio: Option<f64>,
    pub per_sample: Vec<ImageDecodability>,
}

impl DecodabilityReport {
    /// Aggregates per-sample figures; `dataset_mean_bytes` from the dataset's manifest.
    pub fn new(per_sample: Vec<ImageDecodability>, dataset_mean_bytes: Option<f64>) -> Self {
        let n = per_sample.len();
        let mean = |f: &dyn Fn(&ImageDecodability) -> f64| {
            if n == 0 {
                0.0
            } else {
                per_sample.iter().map(f).sum::<f64>() / n as f64
            }
        };
        let b = |x: bool| x as u8 as f64;
        let mean_bytes = mean(&|s| s.n_bytes as f64);
        DecodabilityReport {
            samples: n,
            clean_fraction: mean(&|s| b(s.decodes_clean)),
            decodes_fraction: mean(&|s| b(s.decodes)),
            mcu_fraction: mean(&|s| s.mcu_fraction),
            eos_fraction: mean(&|s| b(s.ended_with_eos)),
            mean_tokens: mean(&|s| s.n_tokens as f64),
            mean_bytes,
            dataset_mean_bytes,
            length_ratio: dataset_mean_bytes
                .filter(|m| *m > 0.0)
                .map(|m| mean_bytes / m),
            per_sample,
        }
    }

    /// Writes the report as pretty JSON (atomically).
    pub fn write_json(&self, path: &Path) -> Result<(), codeclm_manifests::Error> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| codeclm_manifests::Error::Invalid(e.to_string()))?;
        codeclm_manifests::write_atomic(path, format!("{text}\n").as_bytes())
    }
}

impl std::fmt::Display for DecodabilityReport {
    /// The one printed line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "decodability: {} samples | clean {:.1}% | decodes {:.1}% | MCUs {:.1}% | EOS {:.1}% | {:.0} tokens, {:.0} B per sample",
            self.samples,
            100.0 * self.clean_fraction,
            100.0 * self.decodes_fraction,
            100.0 * self.mcu_fraction,
            100.0 * self.eos_fraction,
            self.mean_tokens,
            self.mean_bytes,
        )?;
        if let (Some(m), Some(r)) = (self.dataset_mean_bytes, self.length_ratio) {
            write!(f, " ({r:.2}x the dataset's {m:.0} B)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use codeclm_manifests::vocab::PreTokenize;
    use proptest::prelude::*;

    /// A vocabulary learned from the photos (once per test binary).
    fn vocab(_: &[Vec<u8>]) -> Vocab {
        static V: std::sync::OnceLock<Vocab> = std::sync::OnceLock::new();
        V.get_or_init(|| {
            let (streams, _) = crate::test_media::photo_streams(10);
            let json =
                crate::tokenize::train_on_streams(&streams, 320, PreTokenize::RestartMarkers)
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
        let (streams, tables) = crate::test_media::photo_streams(3);
        let v = vocab(&streams);
        for s in &streams {
            let ids = framed(&v, s);
            let out = render_image("x", &v, &ids, ids.len(), &tables);
            let full = jpeg_stream::splice_tables(s, &tables).unwrap();
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
        let (streams, tables) = crate::test_media::photo_streams(3);
        let v = vocab(&streams);
        for s in &streams {
            let start = FrameLayout::parse(s).unwrap().scan_start;
            // Half the scan: about half the MCUs (MCU sizes vary along the image).
            let half = &s[..start + (s.len() - start) / 2];
            let r = render_image("x", &v, &framed(&v, half), 0, &tables).report;
            assert!(r.decodes && !r.decodes_clean, "{r:?}");
            assert!((0.3..0.7).contains(&r.mcu_fraction), "{r:?}");
            // Header only: nothing decodes, yet libjpeg returns a grey image.
            let r = render_image("x", &v, &framed(&v, &s[..start]), 0, &tables).report;
            assert_eq!(r.mcu_fraction, 0.0);
            assert!(!r.decodes_clean);
        }
        // Not a JPEG header at all: no file, no panic, the reason recorded.
        let r = render_image("x", &v, &framed(&v, b"\x01\x02\x03"), 3, &tables).report;
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
        let r = DecodabilityReport::new(vec![a, b], Some(400.0));
        assert_eq!((r.clean_fraction, r.decodes_fraction), (0.5, 1.0));
        assert_eq!(
            (r.mcu_fraction, r.mean_bytes, r.length_ratio),
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
            let (streams, tables) = crate::test_media::photo_streams(1);
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
            let (streams, tables) = crate::test_media::photo_streams(1);
            let v = vocab(&streams);
            let out = render_image("fuzz", &v, &ids, ids.len(), &tables);
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
            let (streams, tables) = crate::test_media::photo_streams(3);
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
}
