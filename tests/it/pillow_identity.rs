//! Byte identity with the paper's reference: Pillow's JPEG encoder (and, with `--preprocess paper`,
//! Pillow's decode + centre crop + resize), run on the same files in the same test.

use std::path::{Path, PathBuf};

use codeclm_formats::Dataset;

use crate::common::*;

fn files(dir: &Path, pred: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| pred(&p.file_name().unwrap().to_string_lossy()))
        .collect();
    v.sort();
    v
}

/// Builds `inputs` (copied into one folder) with `flags`, runs the reference with `ref_args`, and
/// returns the names whose full file or abbreviated stream differ.
fn compare(inputs: &[PathBuf], flags: &[&str], ref_args: &[&str]) -> Vec<String> {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    // Copies named `<stem>_<ext>.<ext>` so photo.bmp and photo.tif get distinct output stems.
    let copies: Vec<PathBuf> = inputs
        .iter()
        .map(|f| {
            let (stem, ext) = (
                f.file_stem().unwrap().to_string_lossy(),
                f.extension().unwrap().to_string_lossy(),
            );
            let dst = src.join(format!("{stem}_{ext}.{ext}"));
            std::fs::copy(f, &dst).unwrap();
            dst
        })
        .collect();
    let ds_dir = tmp.path().join("ds");
    build(&src, &ds_dir, flags);
    let reference = tmp.path().join("ref");
    pillow_ref(&reference, ref_args, &copies);

    let ds = Dataset::open(&ds_dir).unwrap();
    assert_eq!(
        ds.jpeg_tables().unwrap(),
        std::fs::read(reference.join("tables.jpg")).unwrap(),
        "the dataset's tables-only stream must equal Pillow's streamtype=1 output"
    );
    let mut mismatches = Vec::new();
    for row in &ds.rows() {
        assert!(
            row.is_ok(),
            "{}: {:?} {:?}",
            row.source,
            row.status,
            row.error
        );
        let stem = Path::new(&row.source)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let abbr = ds.codec_bytes(row).unwrap();
        let full = crate::common::jpeg_file(&ds, row);
        let want_abbr = std::fs::read(reference.join(format!("{stem}.abbr.jpg"))).unwrap();
        let want_full = std::fs::read(reference.join(format!("{stem}.jpg"))).unwrap();
        if abbr != want_abbr || full != want_full {
            mismatches.push(format!(
                "{} (abbr {} vs {} B, full {} vs {} B)",
                row.source,
                abbr.len(),
                want_abbr.len(),
                full.len(),
                want_full.len()
            ));
        }
    }
    assert_eq!(ds.rows().len(), inputs.len());
    mismatches
}

#[test]
fn square_rgb_inputs_encode_exactly_like_pillow() {
    let inputs = files(&fixtures("odd"), |n| n.starts_with("sq256_"));
    assert_eq!(inputs.len(), 6);
    let bad = compare(&inputs, &[], &["--preprocess", "none"]);
    assert!(bad.is_empty(), "differ from Pillow: {bad:?}");
}

#[test]
fn export_writes_pillows_interchange_file() {
    let tmp = tempfile::tempdir().unwrap();
    let ds_dir = tmp.path().join("ds");
    let input = fixtures("odd").join("sq256_chelsea.png");
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::copy(&input, src.join("sq256_chelsea.png")).unwrap();
    build(&src, &ds_dir, &[]);
    let ds = Dataset::open(&ds_dir).unwrap();
    let id = ds.rows()[0].sample_id.clone();
    let out = tmp.path().join("export");
    run_ok(
        codeclm()
            .args(["dataset", "export", "--dataset"])
            .arg(&ds_dir)
            .arg("--out")
            .arg(&out)
            .args(["--ids", &id, "--abbreviated"]),
    );
    let reference = tmp.path().join("ref");
    pillow_ref(&reference, &["--preprocess", "none"], &[input]);
    assert_eq!(
        std::fs::read(out.join(format!("{id}.jpg"))).unwrap(),
        std::fs::read(reference.join("sq256_chelsea.jpg")).unwrap()
    );
    assert_eq!(
        std::fs::read(out.join(format!("{id}.abbr.jpg"))).unwrap(),
        std::fs::read(reference.join("sq256_chelsea.abbr.jpg")).unwrap()
    );
}

/// Real photos of other sizes and modes through the paper's whole preprocessing.
fn paper_inputs() -> Vec<PathBuf> {
    let mut inputs = files(&fixtures("images"), |n| !n.ends_with(".md"));
    // Modes whose decoding is exact in both libraries (lossless formats, libjpeg JPEGs).
    for name in [
        "palette_trns.png",
        "rgba.png",
        "la.png",
        "rgb16.png",
        "gray.jpg",
        "progressive.jpg",
        "yuv444.jpg",
        "exif_orient6.jpg",
        "wide.jpg",
        "one_pixel.png",
        "photo.bmp",
        "photo.tif",
        "lossless.webp",
        "animated.gif",
        "cmyk.jpg",
        "large.jpg",
    ] {
        inputs.push(fixtures("odd").join(name));
    }
    inputs
}

#[test]
fn paper_preset_matches_pillow_bilinear_pipeline() {
    let bad = compare(
        &paper_inputs(),
        &["--preprocess", "paper"],
        &["--preprocess", "paper", "--resample", "bilinear"],
    );
    assert!(
        bad.is_empty(),
        "differ from the paper's Pillow pipeline: {bad:?}"
    );
    // Negative control: the comparison is sensitive. The default preset (Lanczos3, DCT scaling,
    // EXIF orientation) is not the paper's pipeline and must not match it.
    let photos: Vec<PathBuf> = paper_inputs().into_iter().take(4).collect();
    let differ = compare(
        &photos,
        &[],
        &["--preprocess", "paper", "--resample", "bilinear"],
    );
    assert_eq!(
        differ.len(),
        4,
        "the default preset should differ from Pillow BILINEAR on every photo"
    );
}

#[test]
fn paper_preset_with_pillow_lanczos_matches_pillow() {
    let bad = compare(
        &paper_inputs(),
        &["--preprocess", "paper", "--resampler", "pillow-lanczos"],
        &["--preprocess", "paper", "--resample", "lanczos"],
    );
    assert!(bad.is_empty(), "differ from Pillow LANCZOS: {bad:?}");
}

#[test]
fn quality_and_restart_options_still_match_pillow() {
    let inputs = files(&fixtures("odd"), |n| {
        n == "sq256_coffee.png" || n == "sq256_rocket.png"
    });
    let bad = compare(
        &inputs,
        &[
            "--quality",
            "60",
            "--restart-interval",
            "4",
            "--subsampling",
            "4:4:4",
        ],
        &[
            "--preprocess",
            "none",
            "--quality",
            "60",
            "--restart-interval",
            "4",
            "--subsampling",
            "4:4:4",
        ],
    );
    assert!(bad.is_empty(), "{bad:?}");
}
