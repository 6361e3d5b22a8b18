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
    let size = cfg.size;
    let mode = cfg.resize;
    let choose_scale = |w: u32, h: u32| {
        if cfg.dct_scaling {
            resize::dct_scale_for(mode, w, h, size)
        } else {
            1
        }
    };
    let src_bytes = bytes.len() as u64;
    let d = match decode::decode(bytes, &cfg.decode, &choose_scale, ext) {
        Ok(d) => d,
        Err(e) => {
            return Outcome {
                src_format: e.format,
                ..Outcome::failed(e.status, e.message, src_bytes)
            }
        }
    };
    let mut out = Outcome {
        src_format: Some(d.format),
        src_width: Some(d.src_width),
        src_height: Some(d.src_height),
        src_bytes,
        exif_orientation: d.exif_orientation,
        decode_scale: Some(d.scale_denom),
        ..Outcome::default()
    };
    let square = match resize::to_square(&d.rgb, d.width, d.height, size, mode, cfg.resampler) {
        Ok(s) => s,
        Err(e) => {
            out.status = Some(Status::EncodeError);
            out.error = Some(format!("resize failed: {e}"));
            return out;
        }
    };
    match jpeg::encode(&square, size, size, &cfg.jpeg, true) {
        Ok(stream) => {
            out.width = Some(size);
            out.height = Some(size);
            out.codec = Some(stream);
        }
        Err(e) => {
            out.status = Some(Status::EncodeError);
            out.error = Some(e.to_string());
        }
    }
    out
}
