//! The loss curve as a PNG, drawn pixel by pixel (no plotting crate): training loss per step in
//! blue, validation loss in red (dots joined), on a light grid with 10 divisions per axis, the
//! values of every other grid line written on the axes (a built-in 5x7 pixel font), a legend
//! and the axes' names. The ranges are also printed in the run's log and the points are kept in
//! `metrics.jsonl`.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::{Error, Result};

const W: u32 = 800;
const H: u32 = 500;
const M: u32 = 64;

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
    let (blue, red, ink) = (Rgb([30, 90, 200]), Rgb([210, 40, 40]), Rgb([40, 40, 40]));
    draw(train, blue, false);
    draw(val, red, true);
    for i in (0..=10).step_by(2) {
        let f = i as f64 / 10.0;
        let v = y0 + (y1 - y0) * f;
        let label = format!("{v:.2}");
        let y = (H - M) as f64 - ph * f;
        text(
            &mut img,
            M - 8 - text_width(&label),
            y as u32 - 7,
            &label,
            ink,
        );
        let step = format!("{:.0}", x0 + (x1 - x0) * f);
        let x = M as f64 + pw * f;
        text(
            &mut img,
            x as u32 - text_width(&step) / 2,
            H - M + 8,
            &step,
            ink,
        );
    }
    text(
        &mut img,
        W - M - text_width("step"),
        H - M + 30,
        "step",
        ink,
    );
    text(&mut img, M, M - 24, "loss (nats/token)", ink);
    text(
        &mut img,
        W - M - text_width("train val"),
        M - 24,
        "train",
        blue,
    );
    text(&mut img, W - M - text_width("val"), M - 24, "val", red);
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

/// Glyph scale: each font pixel is a 2x2 block.
const SCALE: u32 = 2;

/// Width in pixels of `s` written with [`text`].
fn text_width(s: &str) -> u32 {
    s.chars().count() as u32 * 6 * SCALE
}

/// Writes `s` with its top-left corner at (x, y); characters without a glyph are blanks.
fn text(img: &mut RgbImage, x: u32, y: u32, s: &str, c: Rgb<u8>) {
    for (i, ch) in s.chars().enumerate() {
        let Some(rows) = glyph(ch) else { continue };
        let gx = x + i as u32 * 6 * SCALE;
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..5u32 {
                if bits >> (4 - col) & 1 == 1 {
                    for dy in 0..SCALE {
                        for dx in 0..SCALE {
                            let (px, py) = (gx + col * SCALE + dx, y + r as u32 * SCALE + dy);
                            put(img, px as f64, py as f64, c);
                        }
                    }
                }
            }
        }
    }
}

/// 5x7 glyphs (one row per byte, the low 5 bits, leftmost pixel first) of the characters the
/// plot writes.
fn glyph(ch: char) -> Option<[u8; 7]> {
    Some(match ch {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '/' => [0x01, 0x01, 0x02, 0x04, 0x08, 0x10, 0x10],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        'a' => [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'e' => [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'i' => [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'n' => [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0x00, 0x00, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'r' => [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'v' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04],
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_character_the_plot_writes_has_a_glyph_and_labels_are_drawn() {
        for ch in "0123456789.-/() loss(nats/token) step train val".chars() {
            assert!(ch == ' ' || glyph(ch).is_some(), "{ch:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let train: Vec<(u64, f64)> = (1..=100).map(|s| (s, 6.0 - s as f64 / 50.0)).collect();
        let val = vec![(50, 5.5), (100, 5.2)];
        let ((x0, x1), (y0, y1)) = loss_curve(&path, &train, &val).unwrap();
        assert_eq!((x0, x1), (1.0, 100.0));
        assert!((y0 - 4.0).abs() < 1e-9 && (y1 - 5.98).abs() < 1e-9);
        let img = image::open(&path).unwrap().to_rgb8();
        let dark = |x0: u32, x1: u32, y0: u32, y1: u32| {
            (x0..x1)
                .flat_map(|x| (y0..y1).map(move |y| (x, y)))
                .filter(|&(x, y)| img.get_pixel(x, y).0 == [40, 40, 40])
                .count()
        };
        // Values on the y axis (left margin), steps under the x axis, the title above.
        assert!(dark(0, M - 4, M, H - M) > 100);
        assert!(dark(M, W - M, H - M + 4, H) > 100);
        assert!(dark(M, W / 2, 0, M - 4) > 100);
    }
}
