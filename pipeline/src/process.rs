//! One image, start to finish: bytes -> decode -> square -> JPEG (abbreviated stream).
//! Returns everything the manifest row needs, success or not.

use codeclm_manifests::Status;

use crate::config::ImageConfig;
use crate::decode;
use crate::jpeg;
use crate::resize;

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
    /// The abbreviated JPEG stream (no tables), when `status` is ok.
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
