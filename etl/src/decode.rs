//! Source bytes to 8-bit RGB pixels: format sniffing, JPEG through mozjpeg (pixel-identical to
//! Pillow, with DCT-domain downscaling), everything else through the `image` crate, EXIF
//! orientation, and the two colour-conversion semantics users need (composite or Pillow's).
//! Every failure becomes a [`DecodeError`] with a manifest [`Status`]; nothing panics.

use std::io::Cursor;

use codeclm_formats::Status;
use image::{DynamicImage, ImageDecoder, ImageFormat};
use serde::{Deserialize, Serialize};

use codeclm_codec::jpeg::{self, JpegError};
use codeclm_codec::Limits;

/// How images with alpha, grayscale and 16-bit samples become 8-bit RGB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ColorConvert {
    /// Alpha composited on a white background; 16-bit samples rounded to 8 bits.
    CompositeWhite,
    /// Pillow's `convert("RGB")`: alpha dropped (transparent pixels keep their stored colour),
    /// 16-bit samples truncated to their high byte. What the paper's code did.
    Pillow,
}

/// Decoder settings that change output bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DecodeSettings {
    /// Refuse images with more pixels than this (decompression bombs), before allocating.
    pub max_pixels: u64,
    pub color: ColorConvert,
    /// Rotate/flip by the EXIF orientation tag, as a viewer shows the photo.
    pub apply_exif_orientation: bool,
}

impl Default for DecodeSettings {
    fn default() -> Self {
        // 178,956,970 is Pillow's own decompression-bomb error threshold (2 x MAX_IMAGE_PIXELS).
        DecodeSettings {
            max_pixels: 178_956_970,
            color: ColorConvert::CompositeWhite,
            apply_exif_orientation: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    pub status: Status,
    pub message: String,
    /// The source format, when it was recognised before the failure.
    pub format: Option<&'static str>,
}

impl DecodeError {
    fn new(status: Status, message: impl Into<String>) -> Self {
        DecodeError {
            status,
            message: message.into(),
            format: None,
        }
    }

    fn in_format(mut self, format: &'static str) -> Self {
        self.format = Some(format);
        self
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status.as_str(), self.message)
    }
}

impl std::error::Error for DecodeError {}

/// A decoded image, upright, as interleaved RGB8.
#[derive(Clone, Debug)]
pub struct Decoded {
    pub rgb: Vec<u8>,
    pub width: u32,
    pub height: u32,
    /// `jpeg`, `png`, `gif`, `webp`, `bmp` or `tiff`.
    pub format: &'static str,
    /// Stored dimensions of the source (before DCT scaling and orientation).
    pub src_width: u32,
    pub src_height: u32,
    pub exif_orientation: Option<u32>,
    /// DCT scale denominator used (JPEG only; 1 otherwise).
    pub scale_denom: u32,
    /// When the decoder cropped to the centred square (see [`decode`]'s `center_square`): the
    /// square's (x, y, side) in `rgb`, which then holds only the part around it.
    pub square: Option<(u32, u32, u32)>,
}

/// Formats we recognise by signature but do not decode, so they are reported as such.
fn unsupported_signature(bytes: &[u8], ext: Option<&str>) -> Option<&'static str> {
    let b = bytes;
    if b.starts_with(b"8BPS") {
        return Some("PSD");
    }
    if b.len() >= 12 && &b[4..8] == b"ftyp" {
        return Some(match &b[8..12] {
            b"avif" | b"avis" => "AVIF",
            b"heic" | b"heix" | b"mif1" | b"msf1" => "HEIF",
            _ => "ISO media (not an image)",
        });
    }
    if b.starts_with(&[0x00, 0x00, 0x00, 0x0C, b'j', b'P', b' ', b' '])
        || b.starts_with(&[0xFF, 0x4F, 0xFF, 0x51])
    {
        return Some("JPEG 2000");
    }
    if b.starts_with(&[0xFF, 0x0A]) || b.starts_with(&[0, 0, 0, 0x0C, b'J', b'X', b'L', b' ']) {
        return Some("JPEG XL");
    }
    // TGA has no signature: trust the file name for it.
    match ext.map(|e| e.to_ascii_lowercase()).as_deref() {
        Some("tga") => Some("TGA"),
        Some("svg") => Some("SVG"),
        Some("heic") | Some("heif") => Some("HEIF"),
        _ => None,
    }
}

/// Decodes `bytes` (the whole file). `choose_scale` gets the stored JPEG dimensions and returns
/// the DCT-domain scale denominator (1, 2, 4, 8) to decode at; other formats decode at full size.
/// `ext` is the source's file extension, used only to name formats without a signature.
/// `center_square` lets the JPEG decoder skip what lies outside the centred square (the result's
/// `square` then says where it is); other formats ignore it.
pub fn decode(
    bytes: &[u8],
    settings: &DecodeSettings,
    choose_scale: &dyn Fn(u32, u32) -> u32,
    ext: Option<&str>,
    center_square: bool,
) -> Result<Decoded, DecodeError> {
    decode_within(
        bytes,
        settings,
        choose_scale,
        ext,
        center_square,
        &Limits::default(),
    )
}

/// [`decode`] within `limits`: `limits.deadline` stops a JPEG decode midway
/// (`Status::Timeout`); the `image` crate's decoders are checked before they start.
pub fn decode_within(
    bytes: &[u8],
    settings: &DecodeSettings,
    choose_scale: &dyn Fn(u32, u32) -> u32,
    ext: Option<&str>,
    center_square: bool,
    limits: &Limits,
) -> Result<Decoded, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::new(
            Status::Empty,
            "the file is empty (0 bytes)",
        ));
    }
    let format = match image::guess_format(bytes) {
        Ok(f) => f,
        // A JPEG whose first segment is damaged still starts with SOI: report it as a JPEG.
        Err(_) if bytes.starts_with(&[0xFF, 0xD8]) => ImageFormat::Jpeg,
        Err(_) => {
            return Err(match unsupported_signature(bytes, ext) {
                Some(name) => DecodeError::new(
                    Status::Unsupported,
                    format!("{name} images are not supported; convert them to PNG or JPEG"),
                ),
                None => DecodeError::new(
                    Status::Unrecognized,
                    "not an image: no known image format signature",
                ),
            })
        }
    };
    match format {
        ImageFormat::Jpeg => decode_jpeg(bytes, settings, choose_scale, center_square, limits)
            .map_err(|e| e.in_format("jpeg")),
        ImageFormat::Png
        | ImageFormat::Gif
        | ImageFormat::WebP
        | ImageFormat::Bmp
        | ImageFormat::Tiff => {
            let name = format_name(format);
            if limits.expired() {
                return Err(
                    DecodeError::new(Status::Timeout, "stopped at the deadline").in_format(name)
                );
            }
            decode_with_image(bytes, format, name, settings).map_err(|e| e.in_format(name))
        }
        other => Err(DecodeError::new(
            Status::Unsupported,
            format!(
                "{} images are not supported; convert them to PNG or JPEG",
                format!("{other:?}").to_uppercase()
            ),
        )),
    }
}

fn decode_jpeg(
    bytes: &[u8],
    settings: &DecodeSettings,
    choose_scale: &dyn Fn(u32, u32) -> u32,
    center_square: bool,
    limits: &Limits,
) -> Result<Decoded, DecodeError> {
    let opts = jpeg::DecodeOptions {
        center_square,
        max_pixels: settings.max_pixels,
        choose_scale,
        read_exif: settings.apply_exif_orientation,
        deadline: limits.deadline,
    };
    let d = jpeg::decode(bytes, &opts).map_err(|e| match e {
        JpegError::Truncated(m) => {
            DecodeError::new(Status::Truncated, format!("truncated JPEG: {m}"))
        }
        JpegError::Corrupt(m) => DecodeError::new(Status::Corrupt, format!("corrupt JPEG: {m}")),
        JpegError::Unsupported(m) => {
            DecodeError::new(Status::Unsupported, format!("unsupported JPEG: {m}"))
        }
        e @ JpegError::TooLarge { .. } => DecodeError::new(
            Status::TooLarge,
            format!("{e}; raise --max-pixels to accept it"),
        ),
        JpegError::Encode(m) => DecodeError::new(Status::Corrupt, m),
        e @ JpegError::Timeout(_) => DecodeError::new(Status::Timeout, e.to_string()),
    })?;
    let orientation = d
        .exif
        .as_deref()
        .and_then(image::metadata::Orientation::from_exif_chunk);
    let mut out = Decoded {
        rgb: d.rgb,
        width: d.width,
        height: d.height,
        format: "jpeg",
        src_width: d.src_width,
        src_height: d.src_height,
        exif_orientation: orientation.map(|o| o.to_exif() as u32),
        scale_denom: d.scale_denom,
        square: d.square,
    };
    if let Some(o) = orientation.filter(|_| settings.apply_exif_orientation) {
        if o != image::metadata::Orientation::NoTransforms {
            let buf =
                image::RgbImage::from_raw(out.width, out.height, std::mem::take(&mut out.rgb))
                    .ok_or_else(|| {
                        DecodeError::new(Status::Corrupt, "decoder returned a short buffer")
                    })?;
            let mut img = DynamicImage::ImageRgb8(buf);
            img.apply_orientation(o);
            out.width = img.width();
            out.height = img.height();
            out.rgb = img.into_rgb8().into_raw();
        }
    }
    Ok(out)
}

fn image_error(e: image::ImageError) -> DecodeError {
    use image::ImageError as E;
    let text = e.to_string();
    let looks_truncated = |t: &str| {
        let t = t.to_ascii_lowercase();
        t.contains("end of file")
            || t.contains("eof")
            || t.contains("unexpected end")
            || t.contains("truncat")
            || t.contains("not enough data")
    };
    match e {
        E::Limits(_) => DecodeError::new(
            Status::TooLarge,
            format!("{text}; raise --max-pixels to accept it"),
        ),
        E::Unsupported(_) => DecodeError::new(Status::Unsupported, text),
        E::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            DecodeError::new(Status::Truncated, format!("truncated: {io}"))
        }
        _ if looks_truncated(&text) => {
            DecodeError::new(Status::Truncated, format!("truncated: {text}"))
        }
        _ => DecodeError::new(Status::Corrupt, text),
    }
}

fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Png => "png",
        ImageFormat::Gif => "gif",
        ImageFormat::WebP => "webp",
        ImageFormat::Bmp => "bmp",
        _ => "tiff",
    }
}

fn decode_with_image(
    bytes: &[u8],
    format: ImageFormat,
    name: &'static str,
    settings: &DecodeSettings,
) -> Result<Decoded, DecodeError> {
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    // RGBA 32-bit float is the widest buffer a decoder may allocate: 16 bytes a pixel.
    limits.max_alloc = Some(settings.max_pixels.saturating_mul(16).max(1 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(image_error)?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(DecodeError::new(
            Status::Corrupt,
            format!("image declares {w}x{h} pixels"),
        ));
    }
    if w as u64 * h as u64 > settings.max_pixels {
        return Err(DecodeError::new(
            Status::TooLarge,
            format!("{w}x{h} = {} pixels exceeds the limit of {} pixels (decompression bomb?); raise --max-pixels to accept it", w as u64 * h as u64, settings.max_pixels),
        ));
    }
    let orientation = decoder.orientation().ok();
    let mut img = DynamicImage::from_decoder(decoder).map_err(image_error)?;
    let exif_orientation = orientation
        .filter(|o| *o != image::metadata::Orientation::NoTransforms)
        .map(|o| o.to_exif() as u32);
    if let Some(o) = orientation.filter(|_| settings.apply_exif_orientation) {
        img.apply_orientation(o);
    }
    let (width, height) = (img.width(), img.height());
    let rgb = to_rgb8(img, settings.color);
    Ok(Decoded {
        rgb,
        width,
        height,
        format: name,
        src_width: w,
        src_height: h,
        exif_orientation,
        scale_denom: 1,
        square: None,
    })
}

/// Converts any decoded image to interleaved RGB8 under the chosen semantics.
pub fn to_rgb8(img: DynamicImage, color: ColorConvert) -> Vec<u8> {
    match (img, color) {
        (DynamicImage::ImageRgb8(b), _) => b.into_raw(),
        (DynamicImage::ImageLuma8(b), _) => {
            b.into_raw().into_iter().flat_map(|v| [v, v, v]).collect()
        }
        (DynamicImage::ImageLumaA8(b), ColorConvert::Pillow) => b
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        (DynamicImage::ImageRgba8(b), ColorConvert::Pillow) => b
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        (DynamicImage::ImageLuma16(b), ColorConvert::Pillow) => b
            .into_raw()
            .into_iter()
            .flat_map(|v| [(v >> 8) as u8; 3])
            .collect(),
        (DynamicImage::ImageLumaA16(b), ColorConvert::Pillow) => b
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| [(p[0] >> 8) as u8; 3])
            .collect(),
        (DynamicImage::ImageRgb16(b), ColorConvert::Pillow) => {
            b.into_raw().into_iter().map(|v| (v >> 8) as u8).collect()
        }
        (DynamicImage::ImageRgba16(b), ColorConvert::Pillow) => b
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            .collect(),
        (img, ColorConvert::Pillow) => img.into_rgb8().into_raw(),
        (img, ColorConvert::CompositeWhite) => {
            if !img.color().has_alpha() {
                return img.into_rgb8().into_raw();
            }
            // Composite in 8 bits: out = c * a + 255 * (1 - a), rounded.
            img.into_rgba8()
                .into_raw()
                .chunks_exact(4)
                .flat_map(|p| {
                    let a = p[3] as u32;
                    let mix = |c: u8| ((c as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
                    [mix(p[0]), mix(p[1]), mix(p[2])]
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_scale(_: u32, _: u32) -> u32 {
        1
    }

    #[test]
    fn empty_and_garbage_are_classified() {
        let s = DecodeSettings::default();
        assert_eq!(
            decode(b"", &s, &no_scale, None, false).unwrap_err().status,
            Status::Empty
        );
        assert_eq!(
            decode(b"<html>hi</html>", &s, &no_scale, Some("jpg"), false)
                .unwrap_err()
                .status,
            Status::Unrecognized
        );
        assert_eq!(
            decode(b"\x00\x00\x02\x00\x00", &s, &no_scale, Some("tga"), false)
                .unwrap_err()
                .status,
            Status::Unsupported
        );
        assert_eq!(
            decode(b"P6\n2 2\n255\n012345678901", &s, &no_scale, None, false)
                .unwrap_err()
                .status,
            Status::Unsupported
        );
    }

    #[test]
    fn alpha_semantics_differ_as_documented() {
        let px = image::RgbaImage::from_raw(1, 1, vec![200, 100, 0, 0]).unwrap();
        let white = to_rgb8(
            DynamicImage::ImageRgba8(px.clone()),
            ColorConvert::CompositeWhite,
        );
        let pillow = to_rgb8(DynamicImage::ImageRgba8(px), ColorConvert::Pillow);
        assert_eq!(white, vec![255, 255, 255]);
        assert_eq!(pillow, vec![200, 100, 0]);
    }
}
