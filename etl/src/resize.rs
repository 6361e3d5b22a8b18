//! Geometry (centre crop, pad, stretch) and resampling to the square target. The default
//! resampler is Lanczos3 from `fast_image_resize` (SIMD); the `pillow-*` resamplers are an exact
//! port of Pillow's, so `--preprocess paper` reproduces the paper's Python preprocessing byte
//! for byte (torchvision's RandomResizedCrop with scale=ratio=1 is Pillow crop + resize).

use std::cell::RefCell;

use fast_image_resize::{
    self as fr, images::Image, images::ImageRef, PixelType, ResizeAlg, ResizeOptions, Resizer,
};
use serde::{Deserialize, Serialize};

use crate::pillow_resample::{self, PillowFilter};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeMode {
    /// The centred square of side min(W, H), resized to the target (the paper's crop).
    #[default]
    CenterCrop,
    /// The whole image, aspect kept, centred on a black square.
    Pad,
    /// The whole image squeezed to the square, aspect not kept.
    Stretch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Resampler {
    /// Lanczos3 convolution from fast_image_resize: fast and sharp.
    #[default]
    Lanczos3,
    /// Pillow's antialiased BILINEAR, exactly (torchvision's default for PIL images).
    PillowBilinear,
    /// Pillow's antialiased LANCZOS, exactly.
    PillowLanczos,
}

impl ResizeMode {
    /// The source rectangle (x, y, w, h) that ends up in the output.
    pub fn source_rect(self, width: u32, height: u32) -> (u32, u32, u32, u32) {
        match self {
            ResizeMode::CenterCrop => {
                // torchvision's fallback crop: top = (H - side) // 2, left = (W - side) // 2.
                let side = width.min(height);
                ((width - side) / 2, (height - side) / 2, side, side)
            }
            ResizeMode::Pad | ResizeMode::Stretch => (0, 0, width, height),
        }
    }

    /// The smallest side of the source, after cropping, that the output needs at full quality:
    /// DCT-domain scaling may shrink the image down to this and no further.
    pub fn min_source_side(self, width: u32, height: u32) -> u32 {
        match self {
            ResizeMode::CenterCrop | ResizeMode::Stretch => width.min(height),
            ResizeMode::Pad => width.max(height),
        }
    }
}

/// The largest DCT scale denominator (8, 4, 2, else 1) that keeps the source at least `size`
/// pixels on the side that matters, like Pillow's `draft`.
pub fn dct_scale_for(mode: ResizeMode, width: u32, height: u32, size: u32) -> u32 {
    let side = mode.min_source_side(width, height);
    [8, 4, 2]
        .into_iter()
        .find(|&d| side / d >= size)
        .unwrap_or(1)
}

thread_local! {
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// Resizes an RGB8 image to `size` x `size` under `mode` with `resampler`.
pub fn to_square(
    rgb: &[u8],
    width: u32,
    height: u32,
    size: u32,
    mode: ResizeMode,
    resampler: Resampler,
) -> Result<Vec<u8>, String> {
    if rgb.len() != width as usize * height as usize * 3 {
        return Err(format!(
            "{} bytes is not a {width}x{height} RGB image",
            rgb.len()
        ));
    }
    match mode {
        ResizeMode::CenterCrop | ResizeMode::Stretch => {
            let rect = mode.source_rect(width, height);
            resample(rgb, width, height, rect, size, size, resampler)
        }
        ResizeMode::Pad => {
            let scale = size as f64 / width.max(height) as f64;
            let w = ((width as f64 * scale).round() as u32).clamp(1, size);
            let h = ((height as f64 * scale).round() as u32).clamp(1, size);
            let inner = resample(rgb, width, height, (0, 0, width, height), w, h, resampler)?;
            let mut out = vec![0u8; size as usize * size as usize * 3];
            let (x0, y0) = ((size - w) / 2, (size - h) / 2);
            for y in 0..h as usize {
                let dst = ((y0 as usize + y) * size as usize + x0 as usize) * 3;
                out[dst..dst + w as usize * 3]
                    .copy_from_slice(&inner[y * w as usize * 3..(y + 1) * w as usize * 3]);
            }
            Ok(out)
        }
    }
}

/// Resamples the `rect` of an image to `dst_w` x `dst_h`. An unscaled full-image rect is a copy.
pub fn resample(
    rgb: &[u8],
    width: u32,
    height: u32,
    rect: (u32, u32, u32, u32),
    dst_w: u32,
    dst_h: u32,
    resampler: Resampler,
) -> Result<Vec<u8>, String> {
    let (x, y, w, h) = rect;
    if w == dst_w && h == dst_h && x == 0 && y == 0 && w == width && h == height {
        return Ok(rgb.to_vec());
    }
    match resampler {
        Resampler::PillowBilinear => Ok(pillow_resample::resize_rgb8(
            rgb,
            width,
            height,
            rect,
            dst_w,
            dst_h,
            PillowFilter::Bilinear,
        )),
        Resampler::PillowLanczos => Ok(pillow_resample::resize_rgb8(
            rgb,
            width,
            height,
            rect,
            dst_w,
            dst_h,
            PillowFilter::Lanczos,
        )),
        Resampler::Lanczos3 => {
            let src =
                ImageRef::new(width, height, rgb, PixelType::U8x3).map_err(|e| e.to_string())?;
            let mut dst = Image::new(dst_w, dst_h, PixelType::U8x3);
            let options = ResizeOptions::new()
                .resize_alg(ResizeAlg::Convolution(fr::FilterType::Lanczos3))
                .crop(x as f64, y as f64, w as f64, h as f64);
            RESIZER
                .with(|r| r.borrow_mut().resize(&src, &mut dst, &options))
                .map_err(|e| e.to_string())?;
            Ok(dst.into_vec())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn center_crop_rect_matches_torchvision_fallback() {
        assert_eq!(
            ResizeMode::CenterCrop.source_rect(500, 375),
            (62, 0, 375, 375)
        );
        assert_eq!(
            ResizeMode::CenterCrop.source_rect(375, 501),
            (0, 63, 375, 375)
        );
        assert_eq!(ResizeMode::Stretch.source_rect(500, 375), (0, 0, 500, 375));
    }

    #[test]
    fn dct_scale_never_goes_below_target() {
        assert_eq!(dct_scale_for(ResizeMode::CenterCrop, 500, 375, 256), 1);
        assert_eq!(dct_scale_for(ResizeMode::CenterCrop, 1024, 768, 256), 2);
        assert_eq!(dct_scale_for(ResizeMode::CenterCrop, 4000, 3000, 256), 8);
        assert_eq!(dct_scale_for(ResizeMode::Pad, 1000, 300, 256), 2);
    }

    #[test]
    fn every_mode_and_resampler_gives_a_square() {
        let (w, h) = (120u32, 70u32);
        let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i % 251) as u8).collect();
        for mode in [ResizeMode::CenterCrop, ResizeMode::Pad, ResizeMode::Stretch] {
            for r in [
                Resampler::Lanczos3,
                Resampler::PillowBilinear,
                Resampler::PillowLanczos,
            ] {
                let out = to_square(&rgb, w, h, 32, mode, r).unwrap();
                assert_eq!(out.len(), 32 * 32 * 3, "{mode:?} {r:?}");
            }
        }
        // Pad leaves black borders above and below a wide image.
        let out = to_square(
            &vec![200u8; (w * h * 3) as usize],
            w,
            h,
            32,
            ResizeMode::Pad,
            Resampler::Lanczos3,
        )
        .unwrap();
        assert_eq!(&out[..3], &[0, 0, 0]);
        assert_eq!(
            &out[(16 * 32 + 16) * 3..(16 * 32 + 16) * 3 + 3],
            &[200, 200, 200]
        );
    }
}
