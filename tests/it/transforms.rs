//! Behaviour of the default preprocessing on real photos: EXIF orientation, DCT-domain scaled
//! decoding, resize modes, and what comes out decodes as a 256x256 JPEG.

use codeclm_codec::jpeg::{self, DecodeOptions};
use codeclm_etl::config::ImageConfig;
use codeclm_etl::process::process_image;
use codeclm_etl::resize::ResizeMode;

use crate::common::fixtures;

fn decode_output(abbreviated: &[u8], cfg: &ImageConfig) -> Vec<u8> {
    let tables = jpeg::tables_only(&cfg.jpeg).unwrap();
    let full = codeclm_codec::jpeg::splice_tables(abbreviated, &tables).unwrap();
    let d = jpeg::decode(
        &full,
        &DecodeOptions {
            max_pixels: 1 << 30,
            choose_scale: &|_, _| 1,
            read_exif: false,
            center_square: false,
            deadline: None,
        },
    )
    .unwrap();
    assert_eq!((d.width, d.height), (cfg.size, cfg.size));
    d.rgb
}

fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y) as f64)
        .sum::<f64>()
        / a.len() as f64
}

fn process(name: &str, sub: &str, cfg: &ImageConfig) -> Vec<u8> {
    let bytes = std::fs::read(fixtures(sub).join(name)).unwrap();
    let out = process_image(&bytes, None, cfg);
    assert!(out.codec.is_some(), "{name}: {:?}", out.error);
    decode_output(out.codec.as_deref().unwrap(), cfg)
}

#[test]
fn exif_orientation_is_applied_by_default_and_not_in_the_paper_preset() {
    let cfg = ImageConfig::default();
    let upright = process("exif_upright.png", "odd", &cfg);
    let rotated = process("exif_orient6.jpg", "odd", &cfg);
    let d = mean_abs_diff(&upright, &rotated);
    assert!(
        d < 4.0,
        "oriented photo differs from the upright one by {d}"
    );
    let no_exif = ImageConfig {
        decode: codeclm_etl::decode::DecodeSettings {
            apply_exif_orientation: false,
            ..cfg.decode
        },
        ..cfg
    };
    let sideways = process("exif_orient6.jpg", "odd", &no_exif);
    assert!(
        mean_abs_diff(&upright, &sideways) > 10.0,
        "without orientation the photo must stay sideways"
    );
}

#[test]
fn dct_scaled_decode_is_used_and_close_to_full_decode() {
    let bytes = std::fs::read(fixtures("odd").join("large.jpg")).unwrap();
    let scaled_cfg = ImageConfig::default();
    let full_cfg = ImageConfig {
        dct_scaling: false,
        ..scaled_cfg
    };
    let scaled = process_image(&bytes, None, &scaled_cfg);
    let full = process_image(&bytes, None, &full_cfg);
    assert_eq!(scaled.decode_scale, Some(4), "1411 px / 4 = 352 >= 256");
    assert_eq!(full.decode_scale, Some(1));
    let (a, b) = (
        decode_output(scaled.codec.as_deref().unwrap(), &scaled_cfg),
        decode_output(full.codec.as_deref().unwrap(), &full_cfg),
    );
    let d = mean_abs_diff(&a, &b);
    assert!(
        d < 3.0,
        "scaled decode drifts {d} levels from the full decode"
    );
}

#[test]
fn alpha_is_composited_on_white_by_default() {
    // rgba.png: alpha ramps 0..255 left to right, so the left edge must come out white.
    let cfg = ImageConfig {
        resize: ResizeMode::Stretch,
        ..ImageConfig::default()
    };
    let px = process("rgba.png", "odd", &cfg);
    let left: f64 = (0..256).map(|y| px[y * 256 * 3] as f64).sum::<f64>() / 256.0;
    assert!(left > 235.0, "left column mean {left}, expected white");
}

#[test]
fn every_resize_mode_gives_a_square_jpeg_from_a_wide_strip() {
    for mode in [ResizeMode::CenterCrop, ResizeMode::Pad, ResizeMode::Stretch] {
        let cfg = ImageConfig {
            resize: mode,
            ..ImageConfig::default()
        };
        let px = process("wide.jpg", "odd", &cfg);
        if mode == ResizeMode::Pad {
            // 1000x40 padded into 256x256: a 10 px band in the middle, black above.
            assert!(
                px[..256 * 3 * 100].iter().all(|&v| v < 20),
                "pad border must be black"
            );
        }
    }
}

#[test]
fn comments_and_metadata_do_not_leak_into_the_stream() {
    let bytes = std::fs::read(fixtures("odd").join("comment.jpg")).unwrap();
    let out = process_image(&bytes, None, &ImageConfig::default());
    let codec = out.codec.unwrap();
    assert!(
        !codec.windows(2).any(|w| w == [0xFF, 0xFE]),
        "COM marker leaked"
    );
    assert!(!codec.windows(2).any(|w| w == [0xFF, 0xE1]), "EXIF leaked");
}

#[test]
fn decoding_only_the_centre_square_gives_the_same_square() {
    // rocket.jpg is landscape (columns are cropped); a portrait copy exercises the row skip.
    let landscape = std::fs::read(fixtures("images").join("rocket.jpg")).unwrap();
    let full_opts = |center_square| DecodeOptions {
        max_pixels: 1 << 30,
        choose_scale: &|_, _| 1,
        read_exif: false,
        center_square,
        deadline: None,
    };
    let d = jpeg::decode(&landscape, &full_opts(false)).unwrap();
    let mut portrait_rgb = vec![0u8; d.rgb.len()];
    for y in 0..d.height as usize {
        for x in 0..d.width as usize {
            let (src, dst) = (
                (y * d.width as usize + x) * 3,
                (x * d.height as usize + y) * 3,
            );
            portrait_rgb[dst..dst + 3].copy_from_slice(&d.rgb[src..src + 3]);
        }
    }
    let settings = jpeg::JpegSettings {
        quality: 90,
        ..Default::default()
    };
    let portrait = jpeg::encode(&portrait_rgb, d.height, d.width, &settings, false).unwrap();
    for bytes in [&landscape, &portrait] {
        let full = jpeg::decode(bytes, &full_opts(false)).unwrap();
        let part = jpeg::decode(bytes, &full_opts(true)).unwrap();
        let (x, y, side) = part
            .square
            .expect("a non-square image is cropped in the decoder");
        assert!(
            part.rgb.len() < full.rgb.len(),
            "the cropped decode must hold less"
        );
        let side = side as usize;
        assert_eq!(side, full.width.min(full.height) as usize);
        let (fx, fy) = (
            (full.width as usize - side) / 2,
            (full.height as usize - side) / 2,
        );
        let mut diff = 0u64;
        for row in 0..side {
            let a = ((fy + row) * full.width as usize + fx) * 3;
            let b = ((y as usize + row) * part.width as usize + x as usize) * 3;
            diff += full.rgb[a..a + side * 3]
                .iter()
                .zip(&part.rgb[b..b + side * 3])
                .map(|(p, q)| p.abs_diff(*q) as u64)
                .sum::<u64>();
        }
        let mean = diff as f64 / (side * side * 3) as f64;
        assert!(
            mean < 0.05,
            "cropped decode differs from the full decode by {mean} on average"
        );
    }
}
