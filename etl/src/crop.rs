//! Random-resized crops (`--crops N`): torchvision's `RandomResizedCrop.get_params`, drawn from
//! a generator seeded by the source's id and the crop's index, so a rebuild cuts the same boxes
//! on every machine. The box is then stretched to the square target like torchvision does.
//!
//! Reference: `torchvision.transforms.RandomResizedCrop.get_params` (torchvision 0.20). The
//! distribution is torchvision's; the random stream is ours (SplitMix64, not torch's).

use serde::{Deserialize, Serialize};

/// `--crops N --crop-scale a,b --crop-ratio a,b`: N random-resized crops of every image, each
/// its own sample. Saved as `crops` in the build record.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RandomCrops {
    /// Crops per image (at least 1; no crops at all is `None` in the build settings).
    pub count: u32,
    /// Range of the crop's area as a fraction of the image's (torchvision: 0.08 to 1).
    pub scale: (f64, f64),
    /// Range of the crop's aspect ratio w / h, drawn log-uniformly (torchvision: 3/4 to 4/3).
    pub ratio: (f64, f64),
}

impl RandomCrops {
    /// `count` crops with torchvision's default ranges.
    pub fn new(count: u32) -> RandomCrops {
        RandomCrops {
            count,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }

    /// Errors name the flag that set the bad value.
    pub fn validate(&self) -> Result<(), String> {
        if self.count == 0 {
            return Err("--crops must be at least 1 (leave it out for one centred image)".into());
        }
        let (a, b) = self.scale;
        if !(a.is_finite() && b.is_finite() && 0.0 < a && a <= b && b <= 1.0) {
            return Err(format!(
                "--crop-scale {a},{b}: need 0 < a <= b <= 1 (fractions of the image's area)"
            ));
        }
        let (a, b) = self.ratio;
        if !(a.is_finite() && b.is_finite() && 0.0 < a && a <= b) {
            return Err(format!(
                "--crop-ratio {a},{b}: need 0 < a <= b (aspect ratios width / height)"
            ));
        }
        Ok(())
    }

    /// The boxes of crops 0..count of the upright `width` x `height` source whose id is
    /// `source_id` (the sample id it would have without crops).
    pub fn boxes(&self, source_id: &str, width: u32, height: u32) -> Vec<CropBox> {
        (0..self.count)
            .map(|k| {
                self.draw(&mut SplitMix64::for_crop(source_id, k), width, height)
                    .0
            })
            .collect()
    }

    /// One `get_params` draw: the box, and whether it came from the fallback (10 rejected tries).
    fn draw(&self, rng: &mut SplitMix64, width: u32, height: u32) -> (CropBox, bool) {
        let area = width as f64 * height as f64;
        let log_ratio = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target_area = area * rng.uniform(self.scale.0, self.scale.1);
            let aspect = rng.uniform(log_ratio.0, log_ratio.1).exp();
            // Python's round(): half to even.
            let w = (target_area * aspect).sqrt().round_ties_even();
            let h = (target_area / aspect).sqrt().round_ties_even();
            if 0.0 < w && w <= width as f64 && 0.0 < h && h <= height as f64 {
                let (w, h) = (w as u32, h as u32);
                let y = rng.below(height - h + 1);
                let x = rng.below(width - w + 1);
                return (CropBox { x, y, w, h }, false);
            }
        }
        // torchvision's fallback: the centred crop, clamped to the ratio range.
        let in_ratio = width as f64 / height as f64;
        let (w, h) = if in_ratio < self.ratio.0 {
            let h = (width as f64 / self.ratio.0).round_ties_even() as u32;
            (width, h.clamp(1, height))
        } else if in_ratio > self.ratio.1 {
            let w = (height as f64 * self.ratio.1).round_ties_even() as u32;
            (w.clamp(1, width), height)
        } else {
            (width, height)
        };
        let b = CropBox {
            x: (width - w) / 2,
            y: (height - h) / 2,
            w,
            h,
        };
        (b, true)
    }
}

/// A crop's box in source pixels: columns x..x+w, rows y..y+h.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CropBox {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

impl CropBox {
    /// As the (x, y, w, h) rectangle [`crate::resize::resample`] takes.
    pub fn rect(self) -> (u32, u32, u32, u32) {
        (self.x, self.y, self.w, self.h)
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny generator with the same stream everywhere.
struct SplitMix64(u64);

impl SplitMix64 {
    /// The stream of crop `k` of a source: independent of every other crop and source.
    fn for_crop(source_id: &str, k: u32) -> SplitMix64 {
        let key = format!("{source_id}/crop{k}");
        SplitMix64(xxhash_rust::xxh3::xxh3_64_with_seed(
            key.as_bytes(),
            0xC409_5EED,
        ))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi) (torch's `uniform_`).
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        lo + (hi - lo) * u
    }

    /// Uniform in 0..n (torch's `randint(0, n)`), n >= 1; unbiased by widening multiply.
    fn below(&mut self, n: u32) -> u32 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resize::ResizeMode;

    fn draws(c: &RandomCrops, w: u32, h: u32, n: u32) -> Vec<(CropBox, bool)> {
        (0..n)
            .map(|k| c.draw(&mut SplitMix64::for_crop("0123456789abcdef", k), w, h))
            .collect()
    }

    /// The torchvision semantics: every box inside the image, and for accepted draws the area
    /// fraction and log aspect ratio inside their ranges (up to rounding to whole pixels), the
    /// offsets covering 0..=W-w inclusive, and the spread of both draws over their ranges.
    #[test]
    fn accepted_draws_follow_get_params() {
        let c = RandomCrops::new(1);
        for (w, h) in [(4000, 3000), (640, 480), (480, 640), (256, 256), (37, 23)] {
            let all = draws(&c, w, h, 4000);
            let accepted: Vec<CropBox> = all.iter().filter(|d| !d.1).map(|d| d.0).collect();
            assert!(
                accepted.len() > 3600,
                "{w}x{h}: {} accepted",
                accepted.len()
            );
            let (mut fracs, mut logs) = (Vec::new(), Vec::new());
            for b in &accepted {
                assert!(
                    b.w >= 1 && b.h >= 1 && b.x + b.w <= w && b.y + b.h <= h,
                    "{b:?}"
                );
                // Rounding each side moves it by at most half a pixel.
                let slack = 0.5 / b.w as f64 + 0.5 / b.h as f64 + 0.25 / (b.w * b.h) as f64;
                let frac = (b.w * b.h) as f64 / (w * h) as f64;
                assert!(
                    frac >= 0.08 * (1.0 - slack) - 1e-12 && frac <= 1.0,
                    "{w}x{h}: {b:?} covers {frac}"
                );
                let log = (b.w as f64 / b.h as f64).ln();
                assert!(
                    log.abs() <= (4.0f64 / 3.0).ln() + slack + 1e-12,
                    "{w}x{h}: {b:?} has log ratio {log}"
                );
                fracs.push(frac);
                logs.push(log);
            }
            let min = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
            let max = |v: &[f64]| v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            if w >= 256 {
                assert!(
                    min(&fracs) < 0.1 && max(&fracs) > 0.9,
                    "{w}x{h}: area spread"
                );
                assert!(
                    min(&logs) < -0.27 && max(&logs) > 0.27,
                    "{w}x{h}: ratio spread"
                );
            }
        }
        // randint(0, W - w + 1) is inclusive of both ends: on a small image both are hit.
        let small = draws(&c, 20, 20, 4000);
        let ok: Vec<CropBox> = small.iter().filter(|d| !d.1).map(|d| d.0).collect();
        assert!(ok.iter().any(|b| b.x == 0 && b.w < 20));
        assert!(ok.iter().any(|b| b.x + b.w == 20 && b.x > 0));
        assert!(ok.iter().any(|b| b.y + b.h == 20 && b.y > 0));
    }

    #[test]
    fn extreme_shapes_take_the_fallback_centred_crop() {
        let c = RandomCrops::new(1);
        for (d, _) in draws(&c, 1000, 10, 50) {
            // Every try is taller than 10 rows; the fallback clamps to the widest ratio, 4/3.
            assert_eq!(
                d,
                CropBox {
                    x: 493,
                    y: 0,
                    w: 13,
                    h: 10
                }
            );
        }
        for (d, fell_back) in draws(&c, 10, 1000, 50) {
            assert!(fell_back);
            assert_eq!(
                d,
                CropBox {
                    x: 0,
                    y: 493,
                    w: 10,
                    h: 13
                }
            );
        }
        for (w, h) in [(1, 1), (1, 7), (9, 1), (2, 3)] {
            for (b, _) in draws(&c, w, h, 200) {
                assert!(b.w >= 1 && b.h >= 1 && b.x + b.w <= w && b.y + b.h <= h);
            }
        }
        // The paper's RandomResizedCrop(scale=(1,1), ratio=(1,1)) is our centre crop.
        let paper = RandomCrops {
            count: 1,
            scale: (1.0, 1.0),
            ratio: (1.0, 1.0),
        };
        for (w, h) in [(500, 375), (375, 501), (512, 512)] {
            let b = draws(&paper, w, h, 1)[0].0;
            assert_eq!(
                b.rect(),
                ResizeMode::CenterCrop.source_rect(w, h),
                "{w}x{h}"
            );
        }
        // In range but every try too large: the whole image.
        let whole = RandomCrops {
            count: 1,
            scale: (1.0, 1.0),
            ratio: (0.5, 2.0),
        };
        let (b, fell_back) = draws(&whole, 100, 100, 1)[0];
        assert!(fell_back);
        assert_eq!(
            b,
            CropBox {
                x: 0,
                y: 0,
                w: 100,
                h: 100
            }
        );
    }

    #[test]
    fn boxes_are_deterministic_and_differ_by_crop_and_source() {
        let c = RandomCrops::new(8);
        let a = c.boxes("0123456789abcdef", 4000, 3000);
        assert_eq!(a, c.boxes("0123456789abcdef", 4000, 3000));
        assert_eq!(a.len(), 8);
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert_eq!(distinct.len(), 8, "{a:?}");
        assert_ne!(a, c.boxes("fedcba9876543210", 4000, 3000));
        // A box does not depend on how many crops are asked for.
        assert_eq!(
            RandomCrops::new(3).boxes("0123456789abcdef", 4000, 3000),
            a[..3]
        );
    }

    #[test]
    fn validation_names_the_flag() {
        assert!(RandomCrops::new(3).validate().is_ok());
        let bad = |scale, ratio| {
            RandomCrops {
                count: 2,
                scale,
                ratio,
            }
            .validate()
            .unwrap_err()
        };
        assert!(bad((0.0, 1.0), (1.0, 1.0)).starts_with("--crop-scale"));
        assert!(bad((0.5, 0.4), (1.0, 1.0)).starts_with("--crop-scale"));
        assert!(bad((0.5, 1.5), (1.0, 1.0)).starts_with("--crop-scale"));
        assert!(bad((0.5, 1.0), (2.0, 1.0)).starts_with("--crop-ratio"));
        assert!(bad((0.5, 1.0), (-1.0, 1.0)).starts_with("--crop-ratio"));
        assert!(bad((0.5, 1.0), (f64::NAN, 1.0)).starts_with("--crop-ratio"));
        assert!(RandomCrops::new(0)
            .validate()
            .unwrap_err()
            .starts_with("--crops"));
    }
}
