//! One input, start to finish: an image (bytes -> decode -> square -> JPEG, abbreviated stream)
//! or a video (-> H.264 with the paper's settings). Returns everything the manifest row needs,
//! success or not.

use codeclm_formats::Status;

use crate::config::ImageConfig;
use crate::decode;
use crate::resize;
use codeclm_codec::h264::encode::{self as video, VideoConfig};
use codeclm_codec::jpeg;
use codeclm_codec::Failure;

/// The result of processing one input, before it gets an id, a part and a shard position.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub status: Option<Status>,
    pub error: Option<String>,
    pub src_format: Option<&'static str>,
    pub src_width: Option<u32>,
    pub src_height: Option<u32>,
    pub src_bytes: u64,
    pub exif_orientation: Option<u32>,
    pub decode_scale: Option<u32>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Videos only: source codec, duration (s), frame rate; frames and NAL units encoded.
    pub src_codec: Option<String>,
    pub src_duration: Option<f64>,
    pub src_fps: Option<f64>,
    pub frames: Option<u32>,
    pub nal_units: Option<u32>,
    /// The abbreviated JPEG stream (no tables) or the Annex B H.264 stream, when `status` is ok.
    pub codec: Option<Vec<u8>>,
}

impl Outcome {
    pub fn failed(status: Status, error: impl Into<String>, src_bytes: u64) -> Outcome {
        Outcome {
            status: Some(status),
            error: Some(error.into()),
            src_bytes,
            ..Outcome::default()
        }
    }

    pub fn status(&self) -> Status {
        self.status.unwrap_or(Status::Ok)
    }
}

/// Encodes one video under `cfg` (see `codeclm_codec::h264::encode`). Never panics on bad input.
pub fn process_video(src: video::Source<'_>, src_bytes: u64, cfg: &VideoConfig) -> Outcome {
    if src_bytes == 0 {
        return Outcome::failed(Status::Empty, "zero-byte file", 0);
    }
    match video::encode(src, cfg) {
        Ok(v) => Outcome {
            src_format: Some(video_format_name(&v.src_format)),
            src_width: Some(v.src_width),
            src_height: Some(v.src_height),
            src_bytes,
            width: Some(cfg.width),
            height: Some(cfg.height),
            src_codec: Some(v.src_codec),
            src_duration: v.src_duration,
            src_fps: v.src_fps,
            frames: Some(v.frames),
            nal_units: Some(v.nal_units),
            codec: Some(v.h264),
            ..Outcome::default()
        },
        Err(e) => Outcome::failed(status_of(e.failure), e.message, src_bytes),
    }
}

/// `Outcome::src_format` is a `&'static str`: map FFmpeg's demuxer names onto fixed names.
fn video_format_name(demuxer: &str) -> &'static str {
    match demuxer {
        "mov" => "mov",
        "matroska" => "matroska",
        "avi" => "avi",
        "mpeg" => "mpeg",
        "mpegts" => "mpegts",
        "flv" => "flv",
        "asf" => "asf",
        "ogg" => "ogg",
        "h264" => "h264",
        "gif" => "gif",
        _ => "other",
    }
}

/// Decodes, resizes and encodes one image under `cfg`. Never panics on bad input.
pub fn process_image(bytes: &[u8], ext: Option<&str>, cfg: &ImageConfig) -> Outcome {
    let (square, mut out) = match prepare(bytes, ext, cfg) {
        Ok(prepared) => prepared,
        Err(failed) => return failed,
    };
    match jpeg::encode(&square, cfg.size, cfg.size, &cfg.jpeg, true) {
        Ok(stream) => {
            out.width = Some(cfg.size);
            out.height = Some(cfg.size);
            out.codec = Some(stream);
        }
        Err(e) => {
            out.status = Some(Status::EncodeError);
            out.error = Some(e.to_string());
        }
    }
    out
}

/// The decode and resize half of [`process_image`]: the `size` x `size` RGB pixels to encode and
/// the outcome facts so far, or the finished outcome of a failure.
// The failure is the finished Outcome (a manifest row's facts), not an error to propagate.
#[allow(clippy::result_large_err)]
pub fn prepare(
    bytes: &[u8],
    ext: Option<&str>,
    cfg: &ImageConfig,
) -> Result<(Vec<u8>, Outcome), Outcome> {
    let (size, mode) = (cfg.size, cfg.resize);
    let choose_scale = |w: u32, h: u32| {
        if cfg.dct_scaling {
            resize::dct_scale_for(mode, w, h, size)
        } else {
            1
        }
    };
    let src_bytes = bytes.len() as u64;
    // The Lanczos3 path may let the JPEG decoder skip what the centre crop discards; the Pillow
    // resamplers must see exactly Pillow's pixels, so they get a full decode.
    let crop_in_decoder =
        mode == resize::ResizeMode::CenterCrop && cfg.resampler == resize::Resampler::Lanczos3;
    let d =
        decode::decode(bytes, &cfg.decode, &choose_scale, ext, crop_in_decoder).map_err(|e| {
            Outcome {
                src_format: e.format,
                ..Outcome::failed(e.status, e.message, src_bytes)
            }
        })?;
    let out = Outcome {
        src_format: Some(d.format),
        src_width: Some(d.src_width),
        src_height: Some(d.src_height),
        src_bytes,
        exif_orientation: d.exif_orientation,
        decode_scale: Some(d.scale_denom),
        ..Outcome::default()
    };
    let resized = match d.square {
        Some((x, y, side)) => resize::resample(
            &d.rgb,
            d.width,
            d.height,
            (x, y, side, side),
            size,
            size,
            cfg.resampler,
        ),
        None => resize::to_square(&d.rgb, d.width, d.height, size, mode, cfg.resampler),
    };
    match resized {
        Ok(square) => Ok((square, out)),
        Err(e) => Err(Outcome {
            status: Some(Status::EncodeError),
            error: Some(format!("resize failed: {e}")),
            ..out
        }),
    }
}

/// The manifest status of a codec failure.
pub fn status_of(failure: Failure) -> Status {
    match failure {
        Failure::Empty => Status::Empty,
        Failure::Truncated => Status::Truncated,
        Failure::Corrupt => Status::Corrupt,
        Failure::Unrecognized => Status::Unrecognized,
        Failure::Unsupported => Status::Unsupported,
        Failure::TooLarge => Status::TooLarge,
        Failure::ReadError => Status::ReadError,
        Failure::EncodeError => Status::EncodeError,
    }
}
