//! The bad-input corpus (tests/fixtures/bad): every file becomes a manifest row with the right
//! status and a message that says what is wrong; the run goes on and good files still land.

use codeclm_formats::{Dataset, Status};

use crate::common::*;

#[test]
fn every_bad_file_is_a_row_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    copy_files(&fixtures("bad"), &src);
    // Good photos mixed in: they must come through untouched by their neighbours' failures.
    for good in ["chelsea.png", "rocket.jpg"] {
        std::fs::copy(fixtures("images").join(good), src.join(good)).unwrap();
    }
    let out = build(&src, &tmp.path().join("ds"), &["--part-size", "4"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("2 ok, 12 failed"), "{stdout}");

    let ds = Dataset::open(&tmp.path().join("ds")).unwrap();
    let expect: &[(&str, Status, &str)] = &[
        ("empty.jpg", Status::Empty, "empty"),
        ("truncated.jpg", Status::Truncated, "Premature end"),
        ("truncated.png", Status::Truncated, "end of file"),
        ("corrupt_header.jpg", Status::Corrupt, "JPEG"),
        ("corrupt_scan.jpg", Status::Corrupt, "Corrupt JPEG data"),
        ("not_an_image.jpg", Status::Unrecognized, "not an image"),
        ("random.bin", Status::Unrecognized, "not an image"),
        ("bomb.png", Status::TooLarge, "--max-pixels"),
        ("huge_dims.jpg", Status::TooLarge, "65000x65000"),
        ("unsupported.ppm", Status::Unsupported, "PNM"),
        ("unsupported.tga", Status::Unsupported, "TGA"),
        ("zero_dims.png", Status::Corrupt, "dimensions"),
        ("chelsea.png", Status::Ok, ""),
        ("rocket.jpg", Status::Ok, ""),
    ];
    assert_eq!(
        ds.rows().len(),
        expect.len(),
        "one row per input, README.md skipped as a sidecar"
    );
    for (name, status, needle) in expect {
        let row = ds
            .rows()
            .into_iter()
            .find(|r| r.source == *name)
            .unwrap_or_else(|| panic!("no row for {name}"));
        assert_eq!(row.status, *status, "{name}: {:?}", row.error);
        if *status == Status::Ok {
            assert!(row.error.is_none() && row.codec_bytes.unwrap() > 1000);
            crate::common::jpeg_file(&ds, &row);
        } else {
            let err = row.error.as_deref().unwrap_or_default();
            assert!(
                err.contains(needle),
                "{name}: error {err:?} should mention {needle:?}"
            );
            assert!(row.shard.is_none() && row.codec_bytes.is_none());
        }
    }
}

#[test]
fn pixel_limit_is_configurable() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::copy(
        fixtures("images").join("chelsea.png"),
        src.join("chelsea.png"),
    )
    .unwrap();
    build(&src, &tmp.path().join("ds"), &["--max-pixels", "10000"]);
    let ds = Dataset::open(&tmp.path().join("ds")).unwrap();
    assert_eq!(ds.rows()[0].status, Status::TooLarge);
}

#[test]
fn damaged_shard_is_reported_with_file_and_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let ds_dir = tmp.path().join("ds");
    build(&fixtures("images"), &ds_dir, &[]);
    run_ok(
        codeclm()
            .args(["dataset", "verify", "--dataset"])
            .arg(&ds_dir),
    );
    let shard = ds_dir.join("shards/part-000000-jpeg-000.shard");
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let err = run_err(
        codeclm()
            .args(["dataset", "verify", "--dataset"])
            .arg(&ds_dir),
    );
    assert!(
        err.contains("part-000000-jpeg-000.shard") && err.contains("rerun `codeclm dataset build`"),
        "{err}"
    );
}

#[test]
fn resuming_with_other_settings_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ds_dir = tmp.path().join("ds");
    build(&fixtures("images"), &ds_dir, &[]);
    let err = run_err(
        codeclm()
            .args([
                "dataset",
                "build",
                "--no-progress",
                "--quality",
                "30",
                "--images",
            ])
            .arg(fixtures("images"))
            .arg("--out")
            .arg(&ds_dir),
    );
    assert!(
        err.contains("image.jpeg.quality: 25 vs 30") && err.contains("choose a new --out"),
        "{err}"
    );
}

#[test]
fn broken_links_and_loops_in_a_source_tree_become_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::copy(
        fixtures("images").join("rocket.jpg"),
        src.join("rocket.jpg"),
    )
    .unwrap();
    std::os::unix::fs::symlink(&src, src.join("sub/loop")).unwrap();
    std::os::unix::fs::symlink(src.join("missing.jpg"), src.join("dangling.jpg")).unwrap();
    let out = build(&src, &tmp.path().join("ds"), &[]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 ok, 2 failed"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let ds = Dataset::open(&tmp.path().join("ds")).unwrap();
    for row in ds.rows().iter().filter(|r| !r.is_ok()) {
        assert_eq!(row.status, Status::ReadError, "{row:?}");
        assert!(
            row.error.as_deref().unwrap().contains("cannot read"),
            "{row:?}"
        );
    }
}
