//! `dataset build --crops N` (issue #15): N random-resized crops per photo, each its own sample
//! with its box in the manifest, the split decided per source photo, rebuilds and resumes
//! byte-identical, and the flags' errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use codeclm_codec::jpeg::{self, DecodeOptions};
use codeclm_etl::builder::{sample_id, split_of};
use codeclm_etl::{decode, resize, BuildSettings};
use codeclm_formats::{Dataset, Modality, SampleRow, Split, Status};

use crate::common::*;

/// A directory `root/name` holding the fixtures `(subdirectory, file)`.
fn dir_of(root: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for (sub, file) in files {
        std::fs::copy(fixtures(sub).join(file), dir.join(file)).unwrap();
    }
    dir
}

/// The bundled photos, an EXIF-rotated one (stored 107x160, upright 160x107), a 1x1 image, a
/// very wide strip, and two undecodable files.
fn crop_source(root: &Path) -> PathBuf {
    let photos: Vec<String> = std::fs::read_dir(fixtures("images"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    let mut files: Vec<(&str, &str)> = photos.iter().map(|p| ("images", p.as_str())).collect();
    files.extend([
        ("odd", "exif_orient6.jpg"),
        ("odd", "one_pixel.png"),
        ("odd", "wide.jpg"),
        ("bad", "truncated.png"),
        ("bad", "not_an_image.jpg"),
    ]);
    dir_of(root, "src", &files)
}

const CROP_FLAGS: &[&str] = &[
    "--crops",
    "3",
    "--size",
    "64",
    "--val-fraction",
    "0.4",
    "--part-size",
    "4",
    "--workers",
    "2",
];

/// Rows by source, in manifest order.
fn by_source(rows: &[SampleRow]) -> BTreeMap<String, Vec<&SampleRow>> {
    let mut m: BTreeMap<String, Vec<&SampleRow>> = BTreeMap::new();
    for r in rows {
        m.entry(r.source.clone()).or_default().push(r);
    }
    m
}

#[test]
fn crops_are_rows_with_their_boxes_split_by_photo_and_rebuild_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let src = crop_source(tmp.path());
    let a = tmp.path().join("a");
    let out = build(&src, &a, CROP_FLAGS);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("built 15 inputs (41 samples: 39 ok, 2 failed"),
        "{stdout}"
    );

    let ds = Dataset::open(&a).unwrap();
    let settings = BuildSettings::of(&ds).unwrap();
    let crops = settings.crops.expect("crops are in the build record");
    assert_eq!(
        (crops.count, crops.scale, crops.ratio),
        (3, (0.08, 1.0), (0.75, 4.0 / 3.0))
    );
    assert!(!settings.image.dct_scaling);
    let cfg = settings.image;

    let rows = ds.rows();
    let sources = by_source(&rows);
    assert_eq!(sources.len(), 15);
    let mut splits = BTreeMap::new();
    for (source, rows) in &sources {
        let source_id = sample_id(source);
        let split = split_of(&source_id, 0.4);
        *splits.entry(split).or_insert(0) += 1;
        if source.starts_with("truncated") || source.starts_with("not_an_image") {
            // An input that does not decode is one error row, under the source's own id.
            assert_eq!(rows.len(), 1, "{source}");
            let r = rows[0];
            assert!(r.status != Status::Ok && r.error.is_some(), "{source}");
            assert_eq!((r.sample_id.as_str(), r.crop), (source_id.as_str(), None));
            assert_eq!(r.split, split);
            continue;
        }
        assert_eq!(rows.len(), 3, "{source}");
        let bytes = std::fs::read(src.join(source)).unwrap();
        let ext = Path::new(source).extension().and_then(|e| e.to_str());
        let full = decode::decode(&bytes, &cfg.decode, &|_, _| 1, ext, false).unwrap();
        let mut boxes = Vec::new();
        for (k, r) in rows.iter().enumerate() {
            assert_eq!(r.status, Status::Ok, "{source}: {:?}", r.error);
            assert_eq!(r.modality, Modality::Image);
            assert_eq!(r.sample_id, format!("{source_id}-crop{k}"));
            // Every crop of a photo is where the photo is.
            assert_eq!(r.split, split, "{}", r.sample_id);
            assert_eq!(
                (r.width, r.height, r.decode_scale),
                (Some(64), Some(64), Some(1))
            );
            let c = r.crop.expect("a crop row records its box");
            assert_eq!(c.index, k as u32);
            // The box is in the upright source at full resolution.
            let (w, h) = match r.exif_orientation {
                Some(5..=8) => (r.src_height.unwrap(), r.src_width.unwrap()),
                _ => (r.src_width.unwrap(), r.src_height.unwrap()),
            };
            assert_eq!((w, h), (full.width, full.height), "{source}");
            assert!(
                c.w >= 1 && c.h >= 1 && c.x + c.w <= w && c.y + c.h <= h,
                "{source}: {c:?} outside {w}x{h}"
            );
            if w * h >= 10_000 && w.max(h) < 4 * w.min(h) {
                // Accepted draws (not the fallback): 8% to 100% of the area, ratio in 3/4..4/3.
                let frac = (c.w * c.h) as f64 / (w * h) as f64;
                assert!((0.07..=1.0).contains(&frac), "{source}: {c:?} is {frac}");
                let ratio = c.w as f64 / c.h as f64;
                assert!(
                    (0.7..=1.4).contains(&ratio),
                    "{source}: {c:?} ratio {ratio}"
                );
            }
            // The stored bytes are exactly that box of the upright photo, stretched to 64x64.
            let square = resize::resample(
                &full.rgb,
                full.width,
                full.height,
                (c.x, c.y, c.w, c.h),
                64,
                64,
                cfg.resampler,
            )
            .unwrap();
            let stored = ds.codec_bytes(r).unwrap();
            assert!(
                jpeg::encode(&square, 64, 64, &cfg.jpeg, true).unwrap() == stored,
                "{}: the stored crop is not its recorded box",
                r.sample_id
            );
            let decoded = jpeg::decode(
                &jpeg_file(&ds, r),
                &DecodeOptions {
                    max_pixels: 1 << 20,
                    choose_scale: &|_, _| 1,
                    read_exif: false,
                    center_square: false,
                    deadline: None,
                },
            )
            .unwrap();
            assert_eq!((decoded.width, decoded.height), (64, 64));
            boxes.push((c.x, c.y, c.w, c.h));
        }
        if full.width * full.height >= 10_000 && full.width < 4 * full.height {
            boxes.dedup();
            assert_eq!(boxes.len(), 3, "{source}: the crops should differ");
        }
    }
    // The rotated photo is stored 107x160: its boxes are in the upright 160x107.
    for r in &sources["exif_orient6.jpg"] {
        let c = r.crop.unwrap();
        assert_eq!(
            (r.src_width, r.src_height, r.exif_orientation),
            (Some(107), Some(160), Some(6))
        );
        assert!(c.y + c.h <= 107 && c.x + c.w <= 160, "{c:?}");
    }
    assert!(
        splits.get(&Split::Val).copied().unwrap_or(0) >= 2
            && splits.get(&Split::Train).copied().unwrap_or(0) >= 2,
        "both splits should hold photos: {splits:?}"
    );

    // A rebuild from scratch gives the same crops, bytes and manifests.
    let b = tmp.path().join("b");
    build(&src, &b, CROP_FLAGS);
    assert_same_tree(&a, &b);

    // An interrupted build (a part's manifest missing, its shards left over) redoes that part:
    // same bytes, no duplicate rows.
    std::fs::remove_file(b.join("parts/part-000001.parquet")).unwrap();
    std::fs::remove_file(b.join("samples.parquet")).unwrap();
    let out = build(&src, &b, CROP_FLAGS);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("built 4 inputs (12 samples"), "{stdout}");
    assert_same_tree(&a, &b);

    // Resuming with other crop settings is refused, naming the setting.
    let err = run_err(
        codeclm()
            .args(["dataset", "build", "--no-progress", "--images"])
            .arg(&src)
            .arg("--out")
            .arg(&b)
            .args([CROP_FLAGS, &["--crop-scale", "0.5,1"]].concat()),
    );
    assert!(err.contains("crops.scale"), "{err}");
}

/// Without `--crops` nothing changes: no `crops` in the record (datasets built before it resume
/// and merge), no crop columns set, one row per input under its own id and split.
#[test]
fn without_crops_the_build_is_as_before() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("plain");
    build(
        &fixtures("images"),
        &out,
        &["--size", "64", "--val-fraction", "0.4"],
    );
    let text = std::fs::read_to_string(out.join("dataset.json")).unwrap();
    assert!(!text.contains("crops"), "{text}");
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.rows().len(), 10);
    for r in ds.rows() {
        assert_eq!(r.crop, None);
        assert_eq!(r.sample_id, sample_id(&r.source));
        assert_eq!(r.split, split_of(&r.sample_id, 0.4));
    }
}

/// Videos in a dataset with `--crops` are encoded as always: one row each, no crop.
#[test]
fn videos_are_not_cropped() {
    let tmp = tempfile::tempdir().unwrap();
    let videos = dir_of(tmp.path(), "videos", &[("videos", "vfr.mkv")]);
    let images = dir_of(tmp.path(), "images", &[("images", "rocket.jpg")]);
    let out = tmp.path().join("mixed");
    build(
        &images,
        &out,
        &[
            "--crops",
            "2",
            "--size",
            "64",
            "--videos",
            videos.to_str().unwrap(),
        ],
    );
    let ds = Dataset::open(&out).unwrap();
    let rows = ds.rows();
    let (v, i): (Vec<&SampleRow>, Vec<&SampleRow>) =
        rows.iter().partition(|r| r.modality == Modality::Video);
    assert_eq!((v.len(), i.len()), (1, 2));
    assert!(v[0].is_ok() && v[0].crop.is_none(), "{:?}", v[0]);
    assert_eq!(v[0].sample_id, sample_id(&v[0].source));
    assert!(i.iter().all(|r| r.is_ok() && r.crop.is_some()));
}

#[test]
fn crop_flags_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let try_build = |extra: &[&str]| {
        run_err(
            codeclm()
                .args(["dataset", "build", "--no-progress", "--images"])
                .arg(fixtures("images"))
                .arg("--out")
                .arg(tmp.path().join("never"))
                .args(extra),
        )
    };
    for (extra, wanted) in [
        (
            &["--crops", "3", "--preprocess", "paper"][..],
            "--preprocess paper",
        ),
        (
            &["--crops", "3", "--crop-scale", "0.5,2"],
            "--crop-scale 0.5,2",
        ),
        (&["--crops", "3", "--crop-scale", "0,1"], "--crop-scale"),
        (
            &["--crops", "3", "--crop-scale", "0.5"],
            "--crop-scale 0.5: use two numbers",
        ),
        (&["--crops", "3", "--crop-ratio", "2,1"], "--crop-ratio 2,1"),
        (&["--crop-ratio", "1,2"], "give --crops too"),
        (&["--crops", "3", "--resize", "pad"], "--resize"),
        (&["--crops", "3", "--dct-scaling", "true"], "--dct-scaling"),
    ] {
        let err = try_build(extra);
        assert!(err.contains(wanted), "{extra:?}: {err}");
    }
    assert!(!tmp.path().join("never").exists());
}
