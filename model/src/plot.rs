//! The loss curve as a PNG, drawn pixel by pixel (no plotting crate): training loss per step in
//! blue, validation loss in red (dots joined), on a light grid with 10 divisions per axis. The
//! axes' ranges are printed in the run's log and kept in `metrics.jsonl`.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::{Error, Result};

const W: u32 = 800;
const H: u32 = 500;
const M: u32 = 40;

/// Draws `train` and `val` (step, loss) series; returns the (x, y) ranges used.
pub fn loss_curve(
    path: &Path,
    train: &[(u64, f64)],
    val: &[(u64, f64)],
) -> Result<((f64, f64), (f64, f64))> {
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let all = train.iter().chain(val).filter(|p| p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(s, l) in all {
        x0 = x0.min(s as f64);
        x1 = x1.max(s as f64);
        y0 = y0.min(l);
        y1 = y1.max(l);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-9 {
        y1 = y0 + 1.0;
    }
    let (pw, ph) = ((W - 2 * M) as f64, (H - 2 * M) as f64);
    let px = |s: f64| M as f64 + (s - x0) / (x1 - x0) * pw;
    let py = |l: f64| (H - M) as f64 - (l - y0) / (y1 - y0) * ph;
    for i in 0..=10 {
        let gx = (M as f64 + pw * i as f64 / 10.0) as u32;
        let gy = (M as f64 + ph * i as f64 / 10.0) as u32;
        let c = if i == 0 || i == 10 {
            Rgb([90, 90, 90])
        } else {
            Rgb([225, 225, 225])
        };
        for y in M..=H - M {
            img.put_pixel(gx.min(W - 1), y, c);
        }
        for x in M..=W - M {
            img.put_pixel(x, gy.min(H - 1), c);
        }
    }
    let mut draw = |pts: &[(u64, f64)], color: Rgb<u8>, dots: bool| {
        let pts: Vec<(f64, f64)> = pts
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(s, l)| (px(s as f64), py(l)))
            .collect();
        for w in pts.windows(2) {
            line(&mut img, w[0], w[1], color);
        }
        if dots {
            for &(x, y) in &pts {
                for dx in -2i32..=2 {
                    for dy in -2i32..=2 {
                        put(&mut img, x + dx as f64, y + dy as f64, color);
                    }
                }
            }
        }
    };
    draw(train, Rgb([30, 90, 200]), false);
    draw(val, Rgb([210, 40, 40]), true);
    let tmp = codeclm_formats::tmp_path(path);
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| Error::Config(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(Error::io(path))?;
    Ok(((x0, x1), (y0, y1)))
}

fn put(img: &mut RgbImage, x: f64, y: f64, c: Rgb<u8>) {
    if x >= 0.0 && y >= 0.0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn line(img: &mut RgbImage, a: (f64, f64), b: (f64, f64), c: Rgb<u8>) {
    let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        put(img, a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t, c);
    }
}
