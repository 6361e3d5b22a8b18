//! One input, start to finish: an image (bytes -> decode -> square -> JPEG, abbreviated stream;
//! or -> N random-resized crops -> N JPEGs) or a video (-> H.264 with the paper's settings).
//! Returns everything the manifest rows need, success or not.

use codeclm_formats::samples::Crop;
use codeclm_formats::Status;

use crate::config::ImageConfig;
use crate::crop::RandomCrops;
use crate::decode::{self, Decoded};
use crate::resize;
use codeclm_codec::h264::encode::{self as video, VideoConfig};
use codeclm_codec::jpeg;
use codeclm_codec::{Failure, Limits};

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
    /// Random-resized crops only: which crop of the image this is, and its box.
    pub crop: Option<Crop>,
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

    /// An earlier build's successful row and its codec bytes, kept as they were
    /// (`--retry-failed`).
    pub fn kept(row: &codeclm_formats::SampleRow, codec: Vec<u8>) -> Outcome {
        Outcome {
            status: None,
            error: None,
            src_format: row.src_format.as_deref().map(crate::isolate::intern),
            src_width: row.src_width,
            src_height: row.src_height,
            src_bytes: row.src_bytes,
            exif_orientation: row.exif_orientation,
            decode_scale: row.decode_scale,
            width: row.width,
            height: row.height,
            crop: row.crop,
            src_codec: row.src_codec.clone(),
            src_duration: row.src_duration,
            src_fps: row.src_fps,
            frames: row.frames,
            nal_units: row.nal_units,
            codec: Some(codec),
        }
    }

    pub fn status(&self) -> Status {
        self.status.unwrap_or(Status::Ok)
    }
}

/// Encodes one video under `cfg` (see `codeclm_codec::h264::encode`) within `limits` (a passed
/// deadline is `Status::Timeout`, too many decoded frames `Status::TooLarge`). Never panics on
/// bad input.
pub fn process_video(
    src: video::Source<'_>,
    src_bytes: u64,
    cfg: &VideoConfig,
    limits: &Limits,
) -> Outcome {
    if src_bytes == 0 {
        return Outcome::failed(Status::Empty, "zero-byte file", 0);
    }
    match video::encode(src, cfg, limits) {
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

/// Decodes, resizes and encodes one image under `cfg`, without limits (see
/// [`process_image_within`]). Never panics on bad input.
pub fn process_image(bytes: &[u8], ext: Option<&str>, cfg: &ImageConfig) -> Outcome {
    process_image_within(bytes, ext, cfg, &Limits::default())
}

/// [`process_image`] within `limits`: a decode still running at the deadline stops with
/// `Status::Timeout`. Never panics on bad input.
pub fn process_image_within(
    bytes: &[u8],
    ext: Option<&str>,
    cfg: &ImageConfig,
    limits: &Limits,
) -> Outcome {
    match prepare_within(bytes, ext, cfg, limits) {
        Ok((square, out)) => encode(&square, cfg, out),
        Err(failed) => failed,
    }
}

/// Decodes one image once and cuts `crops.count` random-resized crops from it (boxes seeded by
/// `source_id`), each stretched to `size` x `size` with the resampler and encoded: one outcome
/// per crop, or one failed outcome when the image does not decode. The boxes are in the pixels
/// of the upright source at full resolution, so the decode is never DCT-scaled (one decode
/// serves every crop, and an 8% crop needs the full resolution anyway). The decode runs within
/// `limits` (see [`process_image_within`]). Never panics on bad input.
pub fn process_image_crops(
    bytes: &[u8],
    ext: Option<&str>,
    cfg: &ImageConfig,
    crops: &RandomCrops,
    source_id: &str,
    limits: &Limits,
) -> Vec<Outcome> {
    let (d, facts) = match decode_image(bytes, ext, cfg, &|_, _| 1, false, limits) {
        Ok(decoded) => decoded,
        Err(failed) => return vec![failed],
    };
    let boxes = crops.boxes(source_id, d.width, d.height);
    (0u32..)
        .zip(boxes)
        .map(|(index, b)| {
            let out = Outcome {
                crop: Some(Crop {
                    index,
                    x: b.x,
                    y: b.y,
                    w: b.w,
                    h: b.h,
                }),
                ..facts.clone()
            };
            match resize::resample(
                &d.rgb,
                d.width,
                d.height,
                b.rect(),
                cfg.size,
                cfg.size,
                cfg.resampler,
            ) {
                Ok(square) => encode(&square, cfg, out),
                Err(e) => resize_failed(e, out),
            }
        })
        .collect()
}

/// Encodes the `size` x `size` pixels into the outcome (the abbreviated stream, or the failure).
fn encode(square: &[u8], cfg: &ImageConfig, mut out: Outcome) -> Outcome {
    match jpeg::encode(square, cfg.size, cfg.size, &cfg.jpeg, true) {
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

fn resize_failed(e: String, out: Outcome) -> Outcome {
    Outcome {
        status: Some(Status::EncodeError),
        error: Some(format!("resize failed: {e}")),
        ..out
    }
}

/// Decodes one image and fills in the outcome's source facts, or returns the failed outcome.
// The failure is the finished Outcome (a manifest row's facts), not an error to propagate.
#[allow(clippy::result_large_err)]
fn decode_image(
    bytes: &[u8],
    ext: Option<&str>,
    cfg: &ImageConfig,
    choose_scale: &dyn Fn(u32, u32) -> u32,
    crop_in_decoder: bool,
    limits: &Limits,
) -> Result<(Decoded, Outcome), Outcome> {
    let src_bytes = bytes.len() as u64;
    let d = decode::decode_within(
        bytes,
        &cfg.decode,
        choose_scale,
        ext,
        crop_in_decoder,
        limits,
    )
    .map_err(|e| Outcome {
        src_format: e.format,
        ..Outcome::failed(e.status, e.message, src_bytes)
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
    Ok((d, out))
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
    prepare_within(bytes, ext, cfg, &Limits::default())
}

/// [`prepare`] within `limits`.
#[allow(clippy::result_large_err)]
fn prepare_within(
    bytes: &[u8],
    ext: Option<&str>,
    cfg: &ImageConfig,
    limits: &Limits,
) -> Result<(Vec<u8>, Outcome), Outcome> {
    let (size, mode) = (cfg.size, cfg.resize);
    let choose_scale = |w: u32, h: u32| {
        if cfg.dct_scaling {
            resize::dct_scale_for(mode, w, h, size)
        } else {
            1
        }
    };
    // The Lanczos3 path may let the JPEG decoder skip what the centre crop discards; the Pillow
    // resamplers must see exactly Pillow's pixels, so they get a full decode.
    let crop_in_decoder =
        mode == resize::ResizeMode::CenterCrop && cfg.resampler == resize::Resampler::Lanczos3;
    let (d, out) = decode_image(bytes, ext, cfg, &choose_scale, crop_in_decoder, limits)?;
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
        Err(e) => Err(resize_failed(e, out)),
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
        Failure::Timeout => Status::Timeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passed_deadline_is_a_timeout_row_and_none_changes_no_byte() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let cfg = ImageConfig::default();
        for name in ["images/rocket.jpg", "images/camera.png"] {
            let bytes = std::fs::read(dir.join(name)).unwrap();
            let free = process_image(&bytes, None, &cfg);
            assert_eq!(free.status(), Status::Ok, "{name}");
            let far =
                Limits::until(std::time::Instant::now() + std::time::Duration::from_secs(3600));
            assert_eq!(
                process_image_within(&bytes, None, &cfg, &far).codec,
                free.codec
            );
            let past = Limits::until(std::time::Instant::now());
            let out = process_image_within(&bytes, None, &cfg, &past);
            assert_eq!(out.status(), Status::Timeout, "{name}: {:?}", out.error);
            let crops = process_image_crops(&bytes, None, &cfg, &RandomCrops::new(2), "id", &past);
            assert_eq!(crops.len(), 1);
            assert_eq!(crops[0].status(), Status::Timeout, "{name}");
        }
    }
}
