//! Criterion benchmarks of the image pipeline, one image per iteration (images/s):
//!
//! * `encode_only`: 256x256 RGB -> abbreviated q25 4:2:0 restart-1 JPEG (the floor).
//! * `decode_resize_encode`: 500x375 JPEG bytes -> `process_image`, default preset.
//! * `paper_preset`: the same inputs through the paper preset (exact Pillow BILINEAR).
//!
//! Inputs are made in-process from the real photos in tests/fixtures/images/ (decoded with the
//! `image` crate, centre-cropped to 4:3, downscaled to 500x375, saved as q90 4:2:0 full JPEGs),
//! so no Python is needed. Run with `cargo bench --bench image_pipeline`; for the comparison
//! against Pillow use `tools/bench_compare.py`.

use std::path::Path;
use std::time::Duration;

use codeclm_codec::jpeg::{self, JpegSettings, Subsampling};
use codeclm_etl::process::process_image;
use codeclm_etl::resize::{self, Resampler, ResizeMode};
use codeclm_etl::{ImageConfig, Preprocess};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

/// Colour photos at least 500x375 after a centred 4:3 crop (so nothing is upscaled).
const PHOTOS: &[&str] = &["astronaut.png", "coffee.png", "hubble_deep_field.jpg"];

/// The photo's centred 4:3 crop, downscaled to 500x375, as RGB8.
fn photo_500x375(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/images")
        .join(name);
    let (rgb, w, h) = if name.ends_with(".png") {
        let img = image::open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .to_rgb8();
        let (w, h) = img.dimensions();
        (img.into_raw(), w, h)
    } else {
        // The `image` crate is built without JPEG here: decode through the pipeline's mozjpeg.
        let bytes = std::fs::read(&path).unwrap();
        let opts = jpeg::DecodeOptions {
            max_pixels: u64::MAX,
            choose_scale: &|_, _| 1,
            read_exif: false,
            center_square: false,
            deadline: None,
        };
        let d = jpeg::decode(&bytes, &opts).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        (d.rgb, d.width, d.height)
    };
    let (cw, ch) = if w * 3 >= h * 4 {
        (h * 4 / 3, h)
    } else {
        (w, w * 3 / 4)
    };
    assert!(cw >= 500 && ch >= 375, "{name} is too small for 500x375");
    let rect = ((w - cw) / 2, (h - ch) / 2, cw, ch);
    resize::resample(&rgb, w, h, rect, 500, 375, Resampler::Lanczos3).unwrap()
}

fn jpeg_inputs() -> Vec<Vec<u8>> {
    let q90 = JpegSettings {
        quality: 90,
        subsampling: Subsampling::S420,
        restart_interval: 0,
    };
    PHOTOS
        .iter()
        .map(|n| jpeg::encode(&photo_500x375(n), 500, 375, &q90, false).unwrap())
        .collect()
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

fn encode_only(c: &mut Criterion) {
    let settings = JpegSettings::default();
    let squares: Vec<Vec<u8>> = PHOTOS
        .iter()
        .map(|n| {
            let rgb = photo_500x375(n);
            resize::to_square(
                &rgb,
                500,
                375,
                256,
                ResizeMode::CenterCrop,
                Resampler::Lanczos3,
            )
            .unwrap()
        })
        .collect();
    let mut g = c.benchmark_group("encode_only");
    g.throughput(Throughput::Elements(1));
    for (name, sq) in PHOTOS.iter().zip(&squares) {
        g.bench_function(*name, |b| {
            b.iter(|| jpeg::encode(black_box(sq), 256, 256, &settings, true).unwrap())
        });
    }
    g.finish();
}

fn pipeline_group(c: &mut Criterion, group: &str, cfg: ImageConfig) {
    let inputs = jpeg_inputs();
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(1));
    for (name, bytes) in PHOTOS.iter().zip(&inputs) {
        g.bench_function(*name, |b| {
            b.iter(|| {
                let out = process_image(black_box(bytes), Some("jpg"), &cfg);
                assert!(out.codec.is_some(), "{name}: {:?}", out.error);
                out
            })
        });
    }
    g.finish();
}

fn decode_resize_encode(c: &mut Criterion) {
    pipeline_group(
        c,
        "decode_resize_encode",
        ImageConfig::preset(Preprocess::Default),
    );
}

fn paper_preset(c: &mut Criterion) {
    pipeline_group(c, "paper_preset", ImageConfig::preset(Preprocess::Paper));
}

criterion_group! {
    name = benches;
    config = config();
    targets = encode_only, decode_resize_encode, paper_preset
}
criterion_main!(benches);
