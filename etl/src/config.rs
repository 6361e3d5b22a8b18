//! The image pipeline's settings: one serde struct with the paper's values as defaults and a
//! `paper` preset that reproduces the authors' Python preprocessing. Saved in `dataset.json`.

use serde::{Deserialize, Serialize};

use crate::decode::{ColorConvert, DecodeSettings};
use crate::resize::{Resampler, ResizeMode};
use codeclm_codec::jpeg::JpegSettings;

/// Everything that determines the JPEG bytes produced for one input image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageConfig {
    /// Output side in pixels (paper: 256).
    pub size: u32,
    pub resize: ResizeMode,
    pub resampler: Resampler,
    /// Decode large JPEGs at 1/2, 1/4 or 1/8 size in the DCT domain first (Pillow's `draft`):
    /// never below `size` on the side that matters. Off in the paper preset (its code did not).
    pub dct_scaling: bool,
    pub decode: DecodeSettings,
    pub jpeg: JpegSettings,
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig {
            size: 256,
            resize: ResizeMode::CenterCrop,
            resampler: Resampler::Lanczos3,
            dct_scaling: true,
            decode: DecodeSettings::default(),
            jpeg: JpegSettings::default(),
        }
    }
}

/// Named preprocessing presets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Preprocess {
    /// Fast and high quality: DCT-scaled decode, Lanczos3, EXIF orientation, alpha on white.
    #[default]
    Default,
    /// The paper's code, byte for byte: `Image.open(p).convert('RGB')`, torchvision
    /// `RandomResizedCrop((256,256), scale=(1,1), ratio=(1,1))` (= centred square crop + Pillow
    /// BILINEAR resize), no EXIF orientation, no draft decoding.
    Paper,
}

impl ImageConfig {
    pub fn preset(preprocess: Preprocess) -> ImageConfig {
        match preprocess {
            Preprocess::Default => ImageConfig::default(),
            Preprocess::Paper => ImageConfig {
                resize: ResizeMode::CenterCrop,
                resampler: Resampler::PillowBilinear,
                dct_scaling: false,
                decode: DecodeSettings {
                    color: ColorConvert::Pillow,
                    apply_exif_orientation: false,
                    ..DecodeSettings::default()
                },
                ..ImageConfig::default()
            },
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(8..=16384).contains(&self.size) {
            return Err(format!("--size {} is outside 8..16384", self.size));
        }
        if !(1..=100).contains(&self.jpeg.quality) {
            return Err(format!("--quality {} is outside 1..100", self.jpeg.quality));
        }
        if self.jpeg.restart_interval == 0 {
            return Err("--restart-interval must be at least 1 MCU (the paper uses 1)".into());
        }
        if self.decode.max_pixels == 0 {
            return Err("--max-pixels must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_papers_codec_settings() {
        let c = ImageConfig::default();
        assert_eq!(
            (c.size, c.jpeg.quality, c.jpeg.restart_interval),
            (256, 25, 1)
        );
        assert_eq!(c.jpeg.subsampling, codeclm_codec::jpeg::Subsampling::S420);
        let p = ImageConfig::preset(Preprocess::Paper);
        assert_eq!(p.resampler, Resampler::PillowBilinear);
        assert!(!p.dct_scaling && !p.decode.apply_exif_orientation);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<ImageConfig>(&json).unwrap(), p);
    }
}
