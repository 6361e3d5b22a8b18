//! Image prompts for sampling: the first rows of an image as BOS + tokens, cut at a restart
//! marker (Jpeg-LM section 4: the model is conditioned on the codec bytes up to a patch
//! position). The image is a dataset sample or any file, which goes through the dataset's own
//! preprocessing and encoder (its `dataset.json` settings), so prompts look like training data.

use std::path::Path;

use codeclm_codec::h264::{self, VideoConfig};
use codeclm_codec::jpeg::scan::{ratio_cut, FrameLayout, ScanError};
use codeclm_codec::jpeg::{self, MarkerError};
use codeclm_etl::process::process_image;
use codeclm_etl::BuildSettings;
use codeclm_formats::vocab::Vocab;
use codeclm_formats::Dataset;

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("{0}")]
    Dataset(#[from] codeclm_formats::Error),
    #[error("{0}")]
    Settings(#[from] codeclm_etl::builder::BuildError),
    #[error("{0}")]
    Scan(#[from] ScanError),
    #[error("{0}")]
    Jpeg(#[from] MarkerError),
    #[error("{path}: {message}")]
    Input { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// Where the prompt ends relative to the restart marker that closes its last MCU row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CutAt {
    /// Right before the marker, and always on a token boundary: the prompt's tokens are the
    /// longest prefix of the whole image's tokenization that fits before the marker, i.e. a
    /// context the model saw in training; it then writes the marker itself. With restart-marker
    /// pre-tokenization (the default vocabulary) every marker starts a piece, so that prefix
    /// ends exactly at the marker. The default.
    #[default]
    BeforeMarker,
    /// After the marker, as the paper's code cuts (`trim_after_n_occurrences`), tokenized on its
    /// own (`tokenizer(prefix)`). When the vocabulary merges `FF Dn` with the bytes after it
    /// (the bundled one does for 4 of the 8 markers), the prompt then ends in a lone marker
    /// token that training sequences never had there.
    AfterMarker,
}

/// An image, its full tokenization, and the prompt made of its first MCU rows.
#[derive(Clone, Debug)]
pub struct ImagePrompt {
    /// Where the image came from: a sample id or a file path.
    pub name: String,
    /// The image's abbreviated stream, as the dataset stores it.
    pub stream: Vec<u8>,
    /// Token ids of the whole stream (no BOS/EOS).
    pub tokens: Vec<u32>,
    pub layout: FrameLayout,
    /// MCU rows in the prompt (`round(ratio * mcu_rows)`) and in the image.
    pub rows_kept: u32,
    /// Byte offset in `stream` where the prompt ends.
    pub cut: usize,
    /// BOS + the prompt's tokens: what generation starts from.
    pub ids: Vec<u32>,
}

impl ImagePrompt {
    /// The prompt's codec bytes (`stream[..cut]`).
    pub fn prompt_bytes(&self) -> &[u8] {
        &self.stream[..self.cut]
    }

    /// Height in pixels of the image region the prompt covers.
    pub fn prompt_height(&self) -> u32 {
        (self.rows_kept * self.layout.mcu_height).min(self.layout.height)
    }
}

/// Builds the prompt of the first `round(ratio * rows)` MCU rows of an abbreviated stream.
/// `ratio` 0 gives the header alone (BOS + the tokens of SOI..SOS), 1 the whole scan without EOI.
pub fn image_prompt(
    name: &str,
    stream: Vec<u8>,
    vocab: &Vocab,
    ratio: f64,
    cut_at: CutAt,
) -> Result<ImagePrompt, PromptError> {
    if !(0.0..=1.0).contains(&ratio) {
        return Err(PromptError::Invalid(format!(
            "--ratio {ratio} is outside 0..1"
        )));
    }
    let after = cut_at == CutAt::AfterMarker;
    let (layout, rows_kept, mut cut) = ratio_cut(&stream, ratio, after)?;
    let mut tokens = Vec::new();
    vocab.encode(&stream, &mut tokens);
    let mut ids = vec![vocab.bos];
    if after {
        vocab.encode(&stream[..cut], &mut ids);
    } else {
        // With restart-marker pre-tokenization this ends exactly at the cut (tested); with
        // other vocabularies a token may straddle it and the prompt ends a few bytes earlier.
        cut = vocab.token_prefix(&tokens, cut, &mut ids);
    }
    Ok(ImagePrompt {
        name: name.to_string(),
        stream,
        tokens,
        layout,
        rows_kept,
        cut,
        ids,
    })
}

/// A video and the prompt made of its first frames.
#[derive(Clone, Debug)]
pub struct VideoPrompt {
    pub name: String,
    /// The Annex B stream as the dataset stores it.
    pub stream: Vec<u8>,
    /// Token ids of the whole stream (no BOS/EOS).
    pub tokens: Vec<u32>,
    /// Frames in the prompt and in the whole video.
    pub frames_kept: usize,
    pub frames_total: usize,
    /// Byte offset in `stream` where the prompt ends (a NAL boundary).
    pub cut: usize,
    /// BOS + the prompt's tokens.
    pub ids: Vec<u32>,
}

/// Builds the prompt of the first `frames` frames of an H.264 Annex B stream (Avc-LM: 10 of
/// 15), cut at the start code of the next frame's first slice, as a token prefix of the whole
/// stream (with start-code pre-tokenization, exactly at the start code).
pub fn video_prompt(
    name: &str,
    stream: Vec<u8>,
    vocab: &Vocab,
    frames: usize,
) -> Result<VideoPrompt, PromptError> {
    let nals = h264::nal::nal_units(&stream);
    let frames_total = h264::nal::frame_starts(&stream, &nals).len();
    let cut = h264::nal::frame_cut(&stream, frames).map_err(PromptError::Invalid)?;
    let mut tokens = Vec::new();
    vocab.encode(&stream, &mut tokens);
    let mut ids = vec![vocab.bos];
    let cut = vocab.token_prefix(&tokens, cut, &mut ids);
    Ok(VideoPrompt {
        name: name.to_string(),
        stream,
        tokens,
        frames_kept: frames,
        frames_total,
        cut,
        ids,
    })
}

/// The abbreviated stream for a prompt source: a sample id of the dataset (its stored codec
/// bytes) or an image file, preprocessed and encoded exactly as the dataset's inputs were.
pub fn prompt_stream(ds: &Dataset, source: &str) -> Result<(String, Vec<u8>), PromptError> {
    if let Some(row) = ds.find(source)? {
        return Ok((row.sample_id.clone(), ds.codec_bytes(&row)?));
    }
    let path = Path::new(source);
    if !path.is_file() {
        return Err(PromptError::Input {
            path: source.to_string(),
            message: format!(
                "neither a sample id of {} nor an image file",
                ds.layout.root.display()
            ),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| PromptError::Input {
        path: source.to_string(),
        message: e.to_string(),
    })?;
    let cfg = BuildSettings::of(ds)?.image;
    let ext = path.extension().and_then(|e| e.to_str());
    let out = process_image(&bytes, ext, &cfg);
    match out.codec {
        Some(stream) => Ok((source.to_string(), stream)),
        None => Err(PromptError::Input {
            path: source.to_string(),
            message: format!(
                "cannot be used as a prompt: {} ({})",
                out.status().as_str(),
                out.error.unwrap_or_default()
            ),
        }),
    }
}

/// The Annex B stream for a video prompt: a sample id of the dataset, or a video file encoded
/// with the dataset's settings.
pub fn video_prompt_stream(
    ds: &Dataset,
    source: &str,
    cfg: &VideoConfig,
) -> Result<(String, Vec<u8>), PromptError> {
    if let Some(row) = ds.find(source)? {
        return Ok((row.sample_id.clone(), ds.codec_bytes(&row)?));
    }
    let encoded = h264::encode_file(Path::new(source), cfg).map_err(|e| PromptError::Input {
        path: source.to_string(),
        message: format!("cannot be used as a video prompt: {}", e.message),
    })?;
    Ok((source.to_string(), encoded.h264))
}

/// The prompt as a viewable JPEG: its rows decoded, the rest left for the decoder to fill
/// (tables spliced back, EOI added as for generated streams).
pub fn prompt_jpeg(prompt: &ImagePrompt, tables: &[u8]) -> Result<Vec<u8>, PromptError> {
    let tidy = jpeg::tidy_generated(prompt.prompt_bytes());
    Ok(jpeg::splice_tables(&tidy, tables)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use codeclm_codec::jpeg::scan::{row_cut, rows_for_ratio};
    use codeclm_formats::vocab::PreTokenize;

    #[test]
    fn ratios_to_rows() {
        assert_eq!(rows_for_ratio(0.5, 16), 8);
        assert_eq!(rows_for_ratio(0.375, 16), 6);
        assert_eq!(rows_for_ratio(0.0, 16), 0);
        assert_eq!(rows_for_ratio(1.0, 16), 16);
        assert_eq!(rows_for_ratio(0.5, 9), 5, "round half away from zero");
        assert_eq!(rows_for_ratio(7.0, 9), 9);
    }

    fn vocab(streams: &[Vec<u8>], pre: PreTokenize) -> Vocab {
        let json = codeclm_etl::tokenize::train_on_streams(streams, 320, pre).unwrap();
        Vocab::from_json(&json, Path::new("test.json")).unwrap()
    }

    /// The paper's `trim_after_n_occurrences(image_str, '\u28ff\u28d7', n)` on bytes.
    fn paper_cut(stream: &[u8], n: usize) -> usize {
        let mut seen = 0;
        for i in 0..stream.len() - 1 {
            if stream[i] == 0xFF && stream[i + 1] == 0xD7 {
                seen += 1;
                if seen == n {
                    return i + 2;
                }
            }
        }
        stream.len()
    }

    #[test]
    fn cuts_equal_the_papers_at_its_ratios() {
        let (streams, _) = codeclm_etl::test_media::photo_streams(4);
        let v = vocab(&streams, PreTokenize::RestartMarkers);
        for s in &streams {
            for ratio in [0.25, 0.375, 0.4375, 0.5, 0.75] {
                let n = (32.0 * ratio) as usize;
                let p = image_prompt("x", s.clone(), &v, ratio, CutAt::AfterMarker).unwrap();
                assert_eq!(p.cut, paper_cut(s, n), "ratio {ratio}");
                assert_eq!(p.rows_kept as usize * 2, n);
                // The paper's prompt ids: BOS + tokenizer(prefix).
                let mut ids = vec![v.bos];
                v.encode(&s[..paper_cut(s, n)], &mut ids);
                assert_eq!(p.ids, ids);
                let b = image_prompt("x", s.clone(), &v, ratio, CutAt::BeforeMarker).unwrap();
                assert_eq!(b.cut, p.cut - 2, "before the marker, same MCUs");
            }
        }
    }

    #[test]
    fn before_marker_prompts_are_token_prefixes() {
        let (streams, _) = codeclm_etl::test_media::photo_streams(4);
        for pre in [PreTokenize::RestartMarkers, PreTokenize::None] {
            let v = vocab(&streams, pre);
            for s in &streams {
                for k in 0..=16u32 {
                    let ratio = k as f64 / 16.0;
                    let p = image_prompt("x", s.clone(), &v, ratio, CutAt::BeforeMarker).unwrap();
                    assert_eq!(p.rows_kept, k);
                    let n = p.ids.len() - 1;
                    assert_eq!(&p.ids[1..], &p.tokens[..n], "{pre:?} row {k}");
                    assert_eq!(v.decode(&p.ids).unwrap(), &s[..p.cut]);
                    let marker = row_cut(s, &p.layout, k, false).unwrap();
                    if pre == PreTokenize::RestartMarkers {
                        // Exactly at the marker, and tokenizing the prefix alone agrees.
                        assert_eq!(p.cut, marker, "row {k}");
                        let mut alone = Vec::new();
                        v.encode(&s[..p.cut], &mut alone);
                        assert_eq!(alone, &p.ids[1..]);
                    } else {
                        assert!(p.cut <= marker && p.cut + 64 > marker, "row {k}");
                    }
                }
            }
        }
    }

    #[test]
    fn prompt_image_shows_the_rows_it_keeps() {
        let (streams, tables) = codeclm_etl::test_media::photo_streams(2);
        let v = vocab(&streams, PreTokenize::RestartMarkers);
        let full = jpeg::splice_tables(&streams[0], &tables).unwrap();
        let (whole, _) = jpeg::decode_lenient(&full, 1 << 20).unwrap();
        let p = image_prompt("x", streams[0].clone(), &v, 0.5, CutAt::BeforeMarker).unwrap();
        assert_eq!(p.prompt_height(), 128);
        let (part, damage) =
            jpeg::decode_lenient(&prompt_jpeg(&p, &tables).unwrap(), 1 << 20).unwrap();
        assert!(damage.warnings > 0, "a prompt is an image cut short");
        assert_eq!((part.width, part.height), (256, 256));
        // Rows well inside the prompt decode exactly as in the whole image (chroma upsampling
        // blends the last couple of rows with what follows).
        let row = 256 * 3;
        assert_eq!(&part.rgb[..120 * row], &whole.rgb[..120 * row]);
        assert_ne!(&part.rgb[200 * row..], &whole.rgb[200 * row..]);
    }

    #[test]
    fn bad_ratios_and_streams_are_errors() {
        let (streams, _) = codeclm_etl::test_media::photo_streams(1);
        let v = vocab(&streams, PreTokenize::RestartMarkers);
        assert!(image_prompt("x", streams[0].clone(), &v, 1.5, CutAt::BeforeMarker).is_err());
        assert!(image_prompt("x", b"garbage".to_vec(), &v, 0.5, CutAt::BeforeMarker).is_err());
        let half = streams[0][..streams[0].len() / 2].to_vec();
        assert!(image_prompt("x", half, &v, 0.75, CutAt::BeforeMarker).is_err());
    }
}
