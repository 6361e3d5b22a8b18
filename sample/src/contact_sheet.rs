//! Contact sheets: many samples in one PNG, to look at a sampling run at a glance. Prompted runs
//! get one row per prompt (original | prompt region | completions), unconditional ones a grid,
//! videos a strip of frames. Tiles that did not decode are drawn in [`MISSING`].

use image::{imageops, ImageEncoder, Rgb, RgbImage};

/// Gap between tiles and around the sheet, in pixels.
pub const GAP: u32 = 4;
/// Background (the gaps).
pub const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
/// Fill of a tile whose sample did not decode at all.
pub const MISSING: Rgb<u8> = Rgb([96, 0, 0]);
/// Fill of the part of a prompt tile the prompt does not cover.
pub const NOT_IN_PROMPT: Rgb<u8> = Rgb([128, 128, 128]);

/// An RGB image from interleaved pixels; `None` when the buffer does not match the size.
pub fn rgb_image(width: u32, height: u32, rgb: Vec<u8>) -> Option<RgbImage> {
    RgbImage::from_raw(width, height, rgb)
}

/// The prompt tile: the decoded prompt with every row from `covered_height` down painted grey,
/// so only what the model was given shows.
pub fn prompt_region(decoded: &RgbImage, covered_height: u32) -> RgbImage {
    let mut out = decoded.clone();
    for y in covered_height.min(out.height())..out.height() {
        for x in 0..out.width() {
            out.put_pixel(x, y, NOT_IN_PROMPT);
        }
    }
    out
}

fn place(sheet: &mut RgbImage, tile: Option<&RgbImage>, x: u32, y: u32, w: u32, h: u32) {
    match tile {
        Some(t) if t.width() == w && t.height() == h => {
            imageops::replace(sheet, t, x as i64, y as i64)
        }
        Some(t) if t.width() > 0 && t.height() > 0 => {
            let scaled = imageops::resize(t, w, h, imageops::FilterType::Triangle);
            imageops::replace(sheet, &scaled, x as i64, y as i64);
        }
        _ => {
            for yy in y..y + h {
                for xx in x..x + w {
                    sheet.put_pixel(xx, yy, MISSING);
                }
            }
        }
    }
}

/// Lays tiles out row by row, each scaled to `tile` (w, h), with [`GAP`] between them.
pub fn rows_sheet(rows: &[Vec<Option<&RgbImage>>], tile: (u32, u32)) -> RgbImage {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let n = rows.len() as u32;
    let (w, h) = tile;
    let mut sheet = RgbImage::from_pixel(GAP + cols * (w + GAP), GAP + n * (h + GAP), BACKGROUND);
    for (r, row) in rows.iter().enumerate() {
        for (c, t) in row.iter().enumerate() {
            let (x, y) = (GAP + c as u32 * (w + GAP), GAP + r as u32 * (h + GAP));
            place(&mut sheet, *t, x, y, w, h);
        }
    }
    sheet
}

/// One row of a prompted sheet.
pub struct PromptRow<'a> {
    pub original: Option<&'a RgbImage>,
    pub prompt: Option<&'a RgbImage>,
    pub completions: Vec<Option<&'a RgbImage>>,
}

/// Prompted runs: one row per prompt, `original | prompt region | completion 1 | ...`.
pub fn prompted_sheet(rows: &[PromptRow], tile: (u32, u32)) -> RgbImage {
    let grid: Vec<Vec<Option<&RgbImage>>> = rows
        .iter()
        .map(|r| {
            let mut v = vec![r.original, r.prompt];
            v.extend(r.completions.iter().copied());
            v
        })
        .collect();
    rows_sheet(&grid, tile)
}

/// Unconditional runs: a grid of `cols` columns.
pub fn grid_sheet(tiles: &[Option<&RgbImage>], cols: usize, tile: (u32, u32)) -> RgbImage {
    let grid: Vec<Vec<Option<&RgbImage>>> = tiles.chunks(cols.max(1)).map(|c| c.to_vec()).collect();
    rows_sheet(&grid, tile)
}

/// Videos: the frames of one video side by side.
pub fn frame_strip(frames: &[Option<&RgbImage>], tile: (u32, u32)) -> RgbImage {
    rows_sheet(&[frames.to_vec()], tile)
}

/// PNG bytes of interleaved RGB pixels.
pub fn encode_png(width: u32, height: u32, rgb: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(rgb, width, height, image::ExtendedColorType::Rgb8)
        .map_err(|e| format!("cannot encode a {width}x{height} PNG: {e}"))?;
    Ok(out)
}

/// Writes a sheet as PNG (atomically).
pub fn save_png(img: &RgbImage, path: &std::path::Path) -> Result<(), codeclm_formats::Error> {
    let png = encode_png(img.width(), img.height(), img.as_raw())
        .map_err(codeclm_formats::Error::Invalid)?;
    codeclm_formats::write_atomic(path, &png)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_geometry_and_missing_tiles() {
        let red = RgbImage::from_pixel(8, 8, Rgb([255, 0, 0]));
        let big = RgbImage::from_pixel(16, 16, Rgb([0, 0, 255]));
        let sheet = grid_sheet(&[Some(&red), None, Some(&big)], 2, (8, 8));
        assert_eq!(
            (sheet.width(), sheet.height()),
            (GAP + 2 * 12, GAP + 2 * 12)
        );
        assert_eq!(*sheet.get_pixel(GAP, GAP), Rgb([255, 0, 0]));
        assert_eq!(*sheet.get_pixel(GAP + 12, GAP), MISSING);
        assert_eq!(
            *sheet.get_pixel(GAP + 3, GAP + 12 + 3),
            Rgb([0, 0, 255]),
            "scaled down"
        );
        assert_eq!(
            *sheet.get_pixel(GAP + 12 + 3, GAP + 12 + 3),
            BACKGROUND,
            "no 4th tile"
        );
        assert_eq!(*sheet.get_pixel(0, 0), BACKGROUND);
    }

    #[test]
    fn prompt_region_greys_the_rest() {
        let img = RgbImage::from_pixel(4, 10, Rgb([1, 2, 3]));
        let p = prompt_region(&img, 6);
        assert_eq!(*p.get_pixel(3, 5), Rgb([1, 2, 3]));
        assert_eq!(*p.get_pixel(0, 6), NOT_IN_PROMPT);
        let png = encode_png(4, 10, p.as_raw()).unwrap();
        let back = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(back, p);
    }
}
