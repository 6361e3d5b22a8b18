//! Generated token sequences -> H.264 files and decodability, the video [`Medium`]: the Annex B
//! bytes as `.h264`, a playable `.mp4`, decoded frames capped at what the dataset's settings
//! allow (fps x seconds; damaged streams can make a decoder emit many more: 22-132 frames from
//! 15 were measured with random bytes inside slices), a slice-level structural check and
//! FFmpeg's verdict.

use std::path::Path;

pub use codeclm_codec::h264::check::{check_slices, SliceCheck};
use codeclm_codec::h264::{self, VideoConfig};
use codeclm_formats::vocab::Vocab;
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::prompt::VideoPrompt;
use crate::run::{self, Generated, Medium, Summary};
use crate::SampleError;

/// Decodability of one generated video.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct VideoDecodability {
    pub name: String,
    pub n_tokens: usize,
    pub n_bytes: usize,
    pub ended_with_eos: bool,
    /// FFmpeg decoded at least one frame.
    pub decodes: bool,
    /// ... with no rejected packet and no concealed frame, and every slice in place.
    pub decodes_clean: bool,
    pub frames: usize,
    pub frames_expected: usize,
    pub decode_errors: u32,
    pub concealed_frames: u32,
    pub decoder_message: Option<String>,
    pub slices: SliceCheck,
    /// `slices.fraction()`.
    pub slice_fraction: f64,
}

crate::run::figures_from_fields!(VideoDecodability);

/// One generated video: its bytes, decoded frames (capped) and figures.
#[derive(Clone, Debug)]
pub struct VideoGeneration {
    pub h264: Vec<u8>,
    pub frames: Vec<RgbImage>,
    pub report: VideoDecodability,
}

/// Frames a video of these settings has (fps x seconds; the paper: 15).
pub fn frames_expected(cfg: &VideoConfig) -> usize {
    (cfg.fps as u64 * cfg.duration_ms as u64 / 1000) as usize
}

/// Macroblocks per frame (16x16 luma each; 144 at 256x144).
pub fn mbs_per_frame(cfg: &VideoConfig) -> u32 {
    cfg.width.div_ceil(16) * cfg.height.div_ceil(16)
}

/// Decodes and measures an Annex B stream (lengths left at 0).
pub fn measure_h264(
    h264: &[u8],
    name: &str,
    cfg: &VideoConfig,
) -> (Vec<RgbImage>, VideoDecodability) {
    let expected = frames_expected(cfg);
    let slices = check_slices(h264, mbs_per_frame(cfg), expected as u32);
    let mut r = VideoDecodability {
        name: name.to_string(),
        frames_expected: expected,
        slice_fraction: slices.fraction(),
        ..VideoDecodability::default()
    };
    let frames = match h264::decode_h264(h264, expected.max(1)) {
        Ok(d) => {
            r.decode_errors = d.decode_errors;
            r.concealed_frames = d.concealed_frames;
            d.frames
        }
        Err(e) => {
            r.decoder_message = Some(e.message);
            Vec::new()
        }
    };
    r.frames = frames.len();
    r.decodes = !frames.is_empty();
    r.decodes_clean = r.decodes
        && r.decode_errors == 0
        && r.concealed_frames == 0
        && slices.mbs_ok as usize
            == slices.frames.min(expected as u64) as usize * mbs_per_frame(cfg) as usize;
    r.slices = slices;
    (frames, r)
}

/// Turns one generated sequence (prompt included) into a [`VideoGeneration`].
pub fn render_video(
    name: &str,
    vocab: &Vocab,
    ids: &[u32],
    n_generated: usize,
    cfg: &VideoConfig,
) -> VideoGeneration {
    let h264 = crate::image::ids_to_bytes(vocab, ids);
    let (frames, r) = measure_h264(&h264, name, cfg);
    let report = VideoDecodability {
        n_tokens: n_generated,
        n_bytes: h264.len(),
        ended_with_eos: ids.last() == Some(&vocab.eos),
        ..r
    };
    VideoGeneration {
        h264,
        frames,
        report,
    }
}

/// Writes `<name>.h264`, `<name>.mp4` (when FFmpeg can remux it; the reason is logged when
/// not) and `<name>-frames.png` (a strip of the decoded frames, when there are any).
pub fn write_video(
    dir: &Path,
    name: &str,
    g: &VideoGeneration,
    fps: u32,
) -> Result<(), SampleError> {
    codeclm_formats::write_atomic(&dir.join(format!("{name}.h264")), &g.h264)?;
    let mp4 = dir.join(format!("{name}.mp4"));
    if let Err(e) =
        codeclm_formats::write_atomic_with(&mp4, |tmp| h264::annexb_to_mp4(&g.h264, fps, tmp))
    {
        tracing::info!("{name}: no .mp4 ({e})");
    }
    if !g.frames.is_empty() {
        let (w, h) = g.frames[0].dimensions();
        let refs: Vec<Option<&RgbImage>> = g.frames.iter().map(Some).collect();
        let strip = crate::contact_sheet::frame_strip(&refs, (w, h));
        crate::contact_sheet::save_png(&strip, &dir.join(format!("{name}-frames.png")))?;
    }
    Ok(())
}

/// The decodability report of a video sampling run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct VideoReport {
    #[serde(flatten)]
    pub summary: Summary,
    /// Mean fraction of expected macroblock slices in place.
    pub slice_fraction: f64,
    pub mean_frames: f64,
    pub per_generation: Vec<VideoDecodability>,
}

impl VideoReport {
    pub fn new(per_generation: Vec<VideoDecodability>, dataset_mean_bytes: Option<f64>) -> Self {
        VideoReport {
            summary: Summary::of(&per_generation, dataset_mean_bytes),
            slice_fraction: run::mean(&per_generation, |s| s.slice_fraction),
            mean_frames: run::mean(&per_generation, |s| s.frames as f64),
            per_generation,
        }
    }
}

impl std::fmt::Display for VideoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts = [
            format!("slices {:.1}%", 100.0 * self.slice_fraction),
            format!("{:.1} frames", self.mean_frames),
        ];
        f.write_str(&self.summary.line("videos", &parts))
    }
}

/// H.264 videos under the dataset's settings (frame cap, size, fps of the `.mp4`); the contact
/// sheet has one frame strip per row: each prompt's original video, then its completions, or
/// one row per unconditional generation.
pub struct Videos<'a> {
    pub cfg: &'a VideoConfig,
}

impl Medium for Videos<'_> {
    type Prompt = VideoPrompt;
    type Generation = VideoGeneration;
    type Figures = VideoDecodability;
    type Report = VideoReport;

    fn prompt_ids(prompt: &VideoPrompt) -> &[u32] {
        &prompt.ids
    }

    fn unconditional_name(&self, i: usize) -> String {
        format!("video-{i:03}")
    }

    fn prompted_name(&self, p: usize, _: &VideoPrompt, i: usize) -> String {
        format!("p{p:02}-s{i:02}")
    }

    fn render(&self, name: &str, vocab: &Vocab, ids: &[u32], n_new: usize) -> VideoGeneration {
        render_video(name, vocab, ids, n_new, self.cfg)
    }

    fn figures(g: &VideoGeneration) -> &VideoDecodability {
        &g.report
    }

    fn write(&self, dir: &Path, name: &str, g: &VideoGeneration) -> Result<(), SampleError> {
        write_video(dir, name, g, self.cfg.fps)
    }

    /// Also writes each prompt's original stream as `pPP-original.h264`.
    fn sheet(
        &self,
        dir: &Path,
        prompts: &[VideoPrompt],
        generated: &[Generated<VideoGeneration>],
    ) -> Result<RgbImage, SampleError> {
        let mut originals: Vec<Vec<RgbImage>> = Vec::new();
        for (p, prompt) in prompts.iter().enumerate() {
            let stem = format!("p{p:02}-original");
            codeclm_formats::write_atomic(&dir.join(format!("{stem}.h264")), &prompt.stream)?;
            let (frames, _) = measure_h264(&prompt.stream, &stem, self.cfg);
            originals.push(frames);
        }
        fn strip(g: &Generated<VideoGeneration>) -> Vec<Option<&RgbImage>> {
            g.generation.frames.iter().map(Some).collect()
        }
        let mut rows: Vec<Vec<Option<&RgbImage>>> = Vec::new();
        if prompts.is_empty() {
            rows.extend(generated.iter().map(strip));
        } else {
            for (p, orig) in originals.iter().enumerate() {
                rows.push(orig.iter().map(Some).collect());
                rows.extend(generated.iter().filter(|g| g.prompt == Some(p)).map(strip));
            }
        }
        Ok(crate::contact_sheet::rows_sheet(
            &rows,
            (self.cfg.width, self.cfg.height),
        ))
    }

    fn report(per: Vec<VideoDecodability>, dataset_mean_bytes: Option<f64>) -> VideoReport {
        VideoReport::new(per, dataset_mean_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use codeclm_codec::h264::nal::nal_units;
    use proptest::prelude::*;

    fn clip() -> Vec<u8> {
        static CLIP: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        CLIP.get_or_init(|| {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/videos/vfr.mkv");
            h264::encode_file(&p, &VideoConfig::default()).unwrap().h264
        })
        .clone()
    }

    #[test]
    fn a_real_clip_is_whole_and_a_truncated_one_is_not() {
        let cfg = VideoConfig::default();
        let h = clip();
        let (frames, r) = measure_h264(&h, "clip", &cfg);
        assert_eq!((frames.len(), r.frames_expected), (15, 15));
        assert!(r.decodes_clean, "{r:?}");
        assert_eq!(r.slices.mbs_ok, 15 * 144);
        assert_eq!(r.slice_fraction, 1.0);
        assert_eq!(frames[0].dimensions(), (256, 144));
        // Cut after 10 frames (the paper's prompt): two thirds of the slices.
        let cut = codeclm_codec::h264::nal::frame_cut(&h, 10).unwrap();
        let (frames, r) = measure_h264(&h[..cut], "ten", &cfg);
        assert_eq!(frames.len(), 10);
        assert!((r.slice_fraction - 10.0 / 15.0).abs() < 1e-9, "{r:?}");
        // Half the bytes: about half the slices, some frames.
        let (_, r) = measure_h264(&h[..h.len() / 2], "half", &cfg);
        assert!((0.2..0.8).contains(&r.slice_fraction), "{r:?}");
        // Without any parameter set (SPS/PPS) nothing decodes.
        let headless: Vec<u8> = nal_units(&h)
            .into_iter()
            .filter(|n| !matches!(n.nal_type, 7 | 8))
            .flat_map(|n| h[n.start..n.end].to_vec())
            .collect();
        let (frames, r) = measure_h264(&headless, "headless", &cfg);
        assert!(
            frames.is_empty() && !r.decodes && r.slice_fraction == 0.0,
            "{r:?}"
        );
    }

    #[test]
    fn files_and_strip() {
        let cfg = VideoConfig::default();
        let tmp = tempfile::tempdir().unwrap();
        let h = clip();
        let (frames, report) = measure_h264(&h, "clip", &cfg);
        let s = VideoGeneration {
            h264: h.clone(),
            frames,
            report,
        };
        write_video(tmp.path(), "v", &s, cfg.fps).unwrap();
        assert_eq!(std::fs::read(tmp.path().join("v.h264")).unwrap(), h);
        assert!(std::fs::metadata(tmp.path().join("v.mp4")).unwrap().len() > 1000);
        let strip = image::open(tmp.path().join("v-frames.png"))
            .unwrap()
            .to_rgb8();
        let g = crate::contact_sheet::GAP;
        assert_eq!(strip.dimensions(), (g + 15 * (256 + g), g + 144 + g));
        let first = image::imageops::crop_imm(&strip, g, g, 256, 144).to_image();
        assert_eq!(first, s.frames[0]);
    }

    #[test]
    fn video_prompts_are_the_first_frames_as_a_token_prefix() {
        use codeclm_formats::vocab::PreTokenize;
        let h = clip();
        let json = codeclm_etl::tokenize::train_on_streams(
            std::slice::from_ref(&h),
            600,
            PreTokenize::StartCodes,
        )
        .unwrap();
        let v = Vocab::from_json(&json, Path::new("v.json")).unwrap();
        let p = crate::prompt::video_prompt("clip", h.clone(), &v, 10).unwrap();
        assert_eq!((p.frames_kept, p.frames_total), (10, 15));
        assert_eq!(p.cut, codeclm_codec::h264::nal::frame_cut(&h, 10).unwrap());
        assert_eq!(&p.ids[1..], &p.tokens[..p.ids.len() - 1]);
        assert_eq!(v.decode(&p.ids).unwrap(), &h[..p.cut]);
        let (frames, _) = measure_h264(&h[..p.cut], "prompt", &VideoConfig::default());
        assert_eq!(frames.len(), 10);
        assert!(crate::prompt::video_prompt("clip", h, &v, 15).is_err());
    }

    /// A prompted run whose "model" continues with the true rest of the clip.
    #[test]
    fn prompted_video_run_with_the_true_continuation() {
        use codeclm_formats::vocab::PreTokenize;
        let h = clip();
        let json = codeclm_etl::tokenize::train_on_streams(
            std::slice::from_ref(&h),
            600,
            PreTokenize::StartCodes,
        )
        .unwrap();
        let v = Vocab::from_json(&json, Path::new("v.json")).unwrap();
        let prompts = vec![crate::prompt::video_prompt("clip", h.clone(), &v, 10).unwrap()];
        let tmp = tempfile::tempdir().unwrap();
        let cfg = VideoConfig::default();
        let medium = Videos { cfg: &cfg };
        let job = run::Sampling {
            medium: &medium,
            vocab: &v,
            prompts: &prompts,
            n: 2,
            batch: 2,
            out: tmp.path(),
            dataset_mean_bytes: Some(h.len() as f64),
            progress: false,
            constrain: crate::constrain::Constrain::None,
        };
        let mut truth = |batch: &[Vec<u32>]| -> Result<Vec<Vec<u32>>, SampleError> {
            Ok(batch
                .iter()
                .map(|p| {
                    let mut rest = prompts[0].tokens[p.len() - 1..].to_vec();
                    rest.push(v.eos);
                    rest
                })
                .collect())
        };
        let r = run::sample(&job, &mut truth).unwrap();
        assert_eq!(r.report.summary.generations, 2);
        assert_eq!(
            (r.report.summary.clean_fraction, r.report.slice_fraction),
            (1.0, 1.0)
        );
        assert_eq!(r.report.mean_frames, 15.0);
        assert_eq!(r.report.summary.length_ratio, Some(1.0));
        assert_eq!(
            std::fs::read(tmp.path().join("generations/p00-s01.h264")).unwrap(),
            h
        );
        let sheet = image::open(&r.sheet).unwrap().to_rgb8();
        let g = crate::contact_sheet::GAP;
        assert_eq!(sheet.dimensions(), (g + 15 * (256 + g), g + 3 * (144 + g)));
        // Completion rows equal the original row.
        let row = |r: u32| {
            image::imageops::crop_imm(&sheet, 0, g + r * (144 + g), sheet.width(), 144).to_image()
        };
        assert_eq!(row(1), row(0));
        assert_eq!(row(2), row(0));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Garbage and damaged real streams: no panic, frames capped at the settings' count.
        #[test]
        fn garbage_h264_never_panics(
            noise in proptest::collection::vec(any::<u8>(), 0..4000),
            cut in 0.0f64..1.0,
            edits in proptest::collection::vec((0.0f64..1.0, any::<u8>()), 0..40),
        ) {
            let cfg = VideoConfig::default();
            let (frames, r) = measure_h264(&noise, "noise", &cfg);
            prop_assert!(frames.len() <= 15 && r.slice_fraction <= 1.0);
            let mut h = clip();
            for (at, b) in edits {
                let i = ((h.len() as f64 * at) as usize).min(h.len() - 1);
                h[i] = b;
            }
            h.truncate((h.len() as f64 * cut) as usize);
            let (frames, r) = measure_h264(&h, "damaged", &cfg);
            prop_assert!(frames.len() <= 15 && (0.0..=1.0).contains(&r.slice_fraction));
        }
    }
}
