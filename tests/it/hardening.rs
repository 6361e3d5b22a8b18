//! A build that survives its inputs and its faults: native crashes and hangs cost one row (the
//! decoders run in worker processes), inputs over `--max-input-bytes` are never read, a part's
//! lease keeps two live workers off the same part, a stop between a part's shards and its
//! manifest resumes cleanly, and `--retry-failed` redoes only the failed rows into the dataset a
//! fresh build writes. Crashes and hangs come from failpoints (the `fail` crate, armed by the
//! `FAILPOINTS` variable) inside the decode path, on a named input.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use codeclm_formats::{Dataset, Status};

use crate::common::*;

/// The bundled photos, copied (the tests name one of them to fail).
fn photos(root: &Path) -> PathBuf {
    let src = root.join("src");
    std::fs::create_dir_all(&src).unwrap();
    for e in std::fs::read_dir(fixtures("images")).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x != "md") {
            std::fs::copy(e.path(), src.join(e.file_name())).unwrap();
        }
    }
    src
}

const FLAGS: &[&str] = &["--part-size", "3", "--workers", "2", "--size", "64"];

/// `dataset build --images src --out out extra...` with the failpoints armed.
fn build_with(failpoints: &str, src: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = codeclm();
    cmd.env("FAILPOINTS", failpoints)
        .args(["dataset", "build", "--no-progress", "--images"])
        .arg(src)
        .arg("--out")
        .arg(out)
        .args(extra);
    cmd
}

fn row_of(ds: &Dataset, name: &str) -> codeclm_formats::SampleRow {
    ds.rows()
        .into_iter()
        .find(|r| r.source == name)
        .unwrap_or_else(|| panic!("no row for {name}"))
}

#[test]
fn a_native_crash_in_the_decoder_costs_one_row() {
    let tmp = tempfile::tempdir().unwrap();
    let src = photos(tmp.path());
    let clean = tmp.path().join("clean");
    build(&src, &clean, FLAGS);

    let crashed = tmp.path().join("crashed");
    let out = run_ok(&mut build_with(
        "etl::abort-on=return(chelsea.png)",
        &src,
        &crashed,
        FLAGS,
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("crashed 1"), "{stdout}");
    let ds = Dataset::open(&crashed).unwrap();
    let row = row_of(&ds, "chelsea.png");
    assert_eq!(row.status, Status::Crashed);
    let error = row.error.as_deref().unwrap();
    assert!(
        error.contains("SIGABRT") && error.contains("went on"),
        "{error}"
    );
    // Every other input is exactly what a build without the crash wrote.
    let mut expected = codec_by_source(&clean);
    expected.remove("chelsea.png");
    assert_eq!(codec_by_source(&crashed), expected);

    // On threads the same crash takes the whole build down: what the processes are for.
    let out = build_with(
        "etl::abort-on=return(chelsea.png)",
        &src,
        &tmp.path().join("threads"),
        &[FLAGS, &["--isolation", "threads"]].concat(),
    )
    .output()
    .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{:?}", out.status);
}

#[test]
fn an_input_that_hangs_is_a_timeout_row_and_the_build_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let src = photos(tmp.path());
    let ds_dir = tmp.path().join("ds");
    let started = Instant::now();
    let out = run_ok(&mut build_with(
        "etl::hang-on=return(camera.png)",
        &src,
        &ds_dir,
        &[FLAGS, &["--item-timeout", "1"]].concat(),
    ));
    let took = started.elapsed().as_secs_f64();
    // 1 s timeout + the 2 s grace before the kill, plus the other inputs on 2 cores.
    assert!(took < 30.0, "the build took {took:.1} s");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("slowest input: camera.png"), "{stdout}");
    let ds = Dataset::open(&ds_dir).unwrap();
    let row = row_of(&ds, "camera.png");
    assert_eq!(row.status, Status::Timeout);
    assert!(row.error.as_deref().unwrap().contains("--item-timeout"));
    assert_eq!(
        ds.rows().iter().filter(|r| r.is_ok()).count(),
        ds.rows().len() - 1
    );
    // The run summary lists the slowest inputs, the hung one first.
    let runs = codeclm_formats::DatasetLayout::new(&ds_dir)
        .read_runs()
        .unwrap();
    let slowest = &runs[0]["slowest"];
    assert_eq!(slowest[0]["source"], "camera.png");
    assert_eq!(slowest[0]["status"], "timeout");
    assert!(slowest[0]["seconds"].as_f64().unwrap() >= 1.0);
}

#[test]
fn inputs_over_max_input_bytes_are_rows_not_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let src = photos(tmp.path());
    let cap = 200_000u64;
    let ds_dir = tmp.path().join("ds");
    build(
        &src,
        &ds_dir,
        &[FLAGS, &["--max-input-bytes", &cap.to_string()]].concat(),
    );
    let ds = Dataset::open(&ds_dir).unwrap();
    let mut big = 0;
    for row in ds.rows() {
        let len = std::fs::metadata(src.join(&row.source)).unwrap().len();
        if len > cap {
            big += 1;
            assert_eq!(row.status, Status::TooLarge, "{}", row.source);
            assert_eq!(row.src_bytes, len);
            assert!(row.error.as_deref().unwrap().contains("--max-input-bytes"));
        } else {
            assert!(row.is_ok(), "{}: {:?}", row.source, row.error);
        }
    }
    assert!(
        big >= 2,
        "only {big} fixtures are over {cap} bytes: the test tests nothing"
    );

    // Archive members over the cap are skipped unread, by the size in their tar header.
    let shards = tmp.path().join("tars");
    std::fs::create_dir(&shards).unwrap();
    let mut tar = tar::Builder::new(std::fs::File::create(shards.join("00000.tar")).unwrap());
    for name in ["astronaut.png", "horse.png"] {
        tar.append_path_with_name(src.join(name), name).unwrap();
    }
    tar.finish().unwrap();
    drop(tar);
    let tar_ds = tmp.path().join("tar_ds");
    build(
        &shards,
        &tar_ds,
        &[FLAGS, &["--max-input-bytes", &cap.to_string()]].concat(),
    );
    let ds = Dataset::open(&tar_ds).unwrap();
    let astronaut = row_of(&ds, "00000.tar#astronaut");
    assert_eq!(astronaut.status, Status::TooLarge);
    assert_eq!(
        astronaut.src_bytes,
        std::fs::metadata(src.join("astronaut.png")).unwrap().len()
    );
    assert!(row_of(&ds, "00000.tar#horse").is_ok());
}

#[test]
fn retry_failed_redoes_only_the_failed_rows_into_a_fresh_builds_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let src = photos(tmp.path());
    let fresh = tmp.path().join("fresh");
    build(&src, &fresh, FLAGS);

    // A build where two inputs crashed (a decoder bug since fixed, a flaky machine).
    let ds_dir = tmp.path().join("ds");
    run_ok(&mut build_with(
        "etl::abort-on=return(chelsea.png);etl::hang-on=return(rocket.jpg)",
        &src,
        &ds_dir,
        &[FLAGS, &["--item-timeout", "1"]].concat(),
    ));
    let before = Dataset::open(&ds_dir).unwrap();
    assert_eq!(before.rows().iter().filter(|r| !r.is_ok()).count(), 2);
    let failed_parts: std::collections::BTreeSet<u32> = before
        .rows()
        .iter()
        .filter(|r| !r.is_ok())
        .map(|r| r.part)
        .collect();
    let redone_inputs = before
        .rows()
        .iter()
        .filter(|r| failed_parts.contains(&r.part))
        .count();
    // A plain rerun keeps the failures (the parts are done)...
    let out = build(&src, &ds_dir, FLAGS);
    assert!(String::from_utf8_lossy(&out.stdout).contains("built 0 inputs"));
    // ... --retry-failed redoes them and keeps the rest, unread.
    let out = build(&src, &ds_dir, &[FLAGS, &["--retry-failed"]].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("{} parts redone", failed_parts.len())),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("{} inputs kept", redone_inputs - 2)),
        "{stdout}"
    );
    assert!(stdout.contains("2 decoded again"), "{stdout}");
    assert_same_tree(&fresh, &ds_dir);
}

#[test]
fn a_live_lease_keeps_a_second_worker_off_the_part() {
    let tmp = tempfile::tempdir().unwrap();
    let src = photos(tmp.path());
    let reference = tmp.path().join("reference");
    build(&src, &reference, FLAGS);

    // Another machine is building part 1 right now.
    let ds_dir = tmp.path().join("ds");
    std::fs::create_dir_all(ds_dir.join("parts")).unwrap();
    let lease = |expires: u64| {
        serde_json::json!({
            "owner": "elsewhere-42-0", "host": "elsewhere", "pid": 42,
            "acquired_unix": 0, "heartbeat_unix": 0, "expires_unix": expires,
        })
        .to_string()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let lease_file = ds_dir.join("parts/part-000001.lease");
    std::fs::write(&lease_file, lease(now + 600)).unwrap();
    // Its half-written shard must survive this worker.
    let theirs = ds_dir.join("shards/part-000001-jpeg-000.shard.elsewhere-42.tmp");
    std::fs::create_dir_all(theirs.parent().unwrap()).unwrap();
    std::fs::write(&theirs, b"in progress").unwrap();

    let out = build(&src, &ds_dir, FLAGS);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("1 parts are being built by other live workers"),
        "{stdout}"
    );
    assert!(!ds_dir.join("parts/part-000001.parquet").exists());
    assert!(!ds_dir.join("samples.parquet").exists());
    assert!(theirs.exists(), "the other worker's temp file was swept");

    // That machine died: once its lease expires, a rerun takes the part over.
    std::fs::write(&lease_file, lease(now - 1)).unwrap();
    let out = build(&src, &ds_dir, FLAGS);
    assert!(String::from_utf8_lossy(&out.stdout).contains("dataset complete"));
    assert!(!theirs.exists());
    assert_same_tree(&reference, &ds_dir);
}

#[test]
fn a_stop_between_the_shards_and_the_manifest_resumes_to_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let src = photos(tmp.path());
    let reference = tmp.path().join("reference");
    build(&src, &reference, FLAGS);

    let ds_dir = tmp.path().join("ds");
    // One worker: the parts complete in order.
    let flags = ["--part-size", "3", "--workers", "1", "--size", "64"];
    let err = run_err(&mut build_with(
        "etl::before-manifest=1*off->return",
        &src,
        &ds_dir,
        &flags,
    ));
    assert!(err.contains("etl::before-manifest"), "{err}");
    // The first part committed; the second stopped with its shard durable, no manifest.
    assert!(ds_dir.join("parts/part-000000.parquet").exists());
    assert!(!ds_dir.join("parts/part-000001.parquet").exists());
    assert!(ds_dir.join("shards/part-000001-jpeg-000.shard").exists());
    // Its lease was released on the way out: the rerun need not wait for it to expire.
    assert!(!ds_dir.join("parts/part-000001.lease").exists());
    build(&src, &ds_dir, &flags);
    assert_same_tree(&reference, &ds_dir);
}
