//! Atomic writes and resume (kill the build at random points, rerun, get the uninterrupted
//! bytes), and multi-machine sharding (3 workers + merge = one run).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;

/// Bundled photos plus the odd corpus: ~36 inputs of mixed formats and sizes.
fn mixed_source(root: &Path) -> PathBuf {
    let src = root.join("src");
    for (sub, dir) in [("images", "a"), ("odd", "b"), ("bad", "c")] {
        let d = src.join(dir);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(fixtures(sub)).unwrap().flatten() {
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
    }
    src
}

const FLAGS: &[&str] = &["--part-size", "3", "--workers", "1", "--shard-max-mib", "1"];

#[test]
fn killed_builds_resume_to_the_uninterrupted_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let src = mixed_source(tmp.path());
    let reference = tmp.path().join("reference");
    build(&src, &reference, FLAGS);

    let resumed = tmp.path().join("resumed");
    // Kill at increasing points (a fixed pseudo-random schedule), then let a final run finish.
    let mut killed_mid_run = 0;
    let mut seed = 0x2545F4914F6CDD1Du64;
    for _ in 0..8 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_millis(5 + seed % 120);
        let mut child = codeclm()
            .args(["dataset", "build", "--no-progress", "--images"])
            .arg(&src)
            .arg("--out")
            .arg(&resumed)
            .args(FLAGS)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL: no cleanup, no flush
            killed_mid_run += 1;
        }
        child.wait().unwrap();
    }
    assert!(
        killed_mid_run >= 3,
        "only {killed_mid_run} runs were interrupted: the test did not test resume"
    );
    let out = build(&src, &resumed, FLAGS);
    assert!(String::from_utf8_lossy(&out.stdout).contains("dataset complete"));
    assert_same_tree(&reference, &resumed);

    // A rerun of a finished dataset does nothing and changes nothing.
    let out = build(&src, &resumed, FLAGS);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("built 0 inputs"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_same_tree(&reference, &resumed);
}

#[test]
fn three_workers_and_a_merge_equal_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let src = mixed_source(tmp.path());
    let single = tmp.path().join("single");
    build(&src, &single, FLAGS);

    // Separate machines: each writes its own directory, then merge.
    let mut dirs = Vec::new();
    for i in 0..3 {
        let dir = tmp.path().join(format!("worker{i}"));
        let out = build(
            &src,
            &dir,
            &[
                FLAGS,
                &["--shard-index", &i.to_string(), "--num-shards", "3"],
            ]
            .concat(),
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("dataset merge"));
        assert!(!dir.join("samples.parquet").exists());
        dirs.push(dir);
    }
    let merged = tmp.path().join("merged");
    run_ok(
        codeclm()
            .args(["dataset", "merge", "--out"])
            .arg(&merged)
            .args(&dirs),
    );
    assert_same_tree(&single, &merged);

    // Shared storage: all workers write one directory; the last one to finish consolidates.
    let shared = tmp.path().join("shared");
    for i in 0..3 {
        build(
            &src,
            &shared,
            &[
                FLAGS,
                &["--shard-index", &i.to_string(), "--num-shards", "3"],
            ]
            .concat(),
        );
    }
    assert_same_tree(&single, &shared);

    // Shared storage, workers running at the same time (a job array): none may sweep away or
    // overwrite another's files in progress; the last to finish consolidates.
    let concurrent = tmp.path().join("concurrent");
    let children: Vec<_> = (0..3)
        .map(|i| {
            codeclm()
                .args(["dataset", "build", "--no-progress", "--images"])
                .arg(&src)
                .arg("--out")
                .arg(&concurrent)
                .args(FLAGS)
                .args(["--shard-index", &i.to_string(), "--num-shards", "3"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_same_tree(&single, &concurrent);

    // Merging datasets built with different settings is refused.
    let other = tmp.path().join("other");
    build(&src, &other, &[FLAGS, &["--quality", "50"]].concat());
    let err = run_err(
        codeclm()
            .args(["dataset", "merge", "--out"])
            .arg(tmp.path().join("bad"))
            .arg(&single)
            .arg(&other),
    );
    assert!(err.contains("different settings"), "{err}");
}

#[test]
fn job_array_variables_split_the_parts_without_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let src = mixed_source(tmp.path());
    let single = tmp.path().join("single");
    build(&src, &single, FLAGS);

    // A Slurm array 10-12 (ids need not start at 0): each task takes its slice from the
    // environment, into one shared directory; the last consolidates.
    let slurm = tmp.path().join("slurm");
    for id in 10..13 {
        let out = run_ok(
            codeclm()
                .env("SLURM_ARRAY_TASK_ID", id.to_string())
                .env("SLURM_ARRAY_TASK_MIN", "10")
                .env("SLURM_ARRAY_TASK_COUNT", "3")
                .args(["dataset", "build", "--no-progress", "--images"])
                .arg(&src)
                .arg("--out")
                .arg(&slurm)
                .args(FLAGS),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!(
                "shard {} of 3, from the job array: SLURM_ARRAY_TASK_ID={id}",
                id - 10
            )),
            "{stdout}"
        );
    }
    assert_same_tree(&single, &slurm);
    let runs = codeclm_formats::DatasetLayout::new(&slurm)
        .read_runs()
        .unwrap();
    assert!(runs
        .iter()
        .all(|r| r["shard_from"].as_str().unwrap().starts_with("SLURM")));

    // A Kubernetes Indexed Job gives the index; the count must come from --num-shards.
    let k8s = tmp.path().join("k8s");
    let err = run_err(
        codeclm()
            .env("JOB_COMPLETION_INDEX", "0")
            .args(["dataset", "build", "--no-progress", "--images"])
            .arg(&src)
            .arg("--out")
            .arg(&k8s)
            .args(FLAGS),
    );
    assert!(err.contains("--num-shards"), "{err}");
    for i in 0..2 {
        run_ok(
            codeclm()
                .env("JOB_COMPLETION_INDEX", i.to_string())
                .args([
                    "dataset",
                    "build",
                    "--no-progress",
                    "--num-shards",
                    "2",
                    "--images",
                ])
                .arg(&src)
                .arg("--out")
                .arg(&k8s)
                .args(FLAGS),
        );
    }
    assert_same_tree(&single, &k8s);
}

#[test]
fn a_reader_keeps_a_bounded_number_of_shards_open() {
    let tmp = tempfile::tempdir().unwrap();
    let src = mixed_source(tmp.path());
    let ds_dir = tmp.path().join("ds");
    // One input per part: a shard per successful input.
    build(
        &src,
        &ds_dir,
        &["--part-size", "1", "--workers", "2", "--size", "64"],
    );
    let ds = codeclm_formats::Dataset::open(&ds_dir).unwrap();
    let ok: Vec<_> = ds.rows().into_iter().filter(|r| r.is_ok()).collect();
    assert!(ok.len() >= 10, "{} shards only", ok.len());
    ds.set_max_open_shards(3);
    let first: Vec<Vec<u8>> = ok.iter().map(|r| ds.codec_bytes(r).unwrap()).collect();
    assert_eq!(ds.open_shards(), 3);
    // Reads after evictions reopen and still check out against the manifest.
    for (row, bytes) in ok.iter().rev().zip(first.iter().rev()) {
        assert_eq!(&ds.codec_bytes(row).unwrap(), bytes);
        assert!(ds.open_shards() <= 3);
    }
}

/// Every file of a dataset but the plan's and the `plan` entry of dataset.json: what a planned
/// build must share with an unplanned one.
fn tree_without_plan(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut t = tree(dir);
    t.remove("plan.json");
    t.remove("plan.parquet");
    t.remove("samples.ids");
    let mut config: serde_json::Value =
        serde_json::from_slice(&t["dataset.json"]).expect("dataset.json");
    assert!(config["build"]["plan"].is_string() || config["build"]["plan"].is_null());
    config["build"].as_object_mut().unwrap().remove("plan");
    t.insert("dataset.json".into(), serde_json::to_vec(&config).unwrap());
    t
}

/// `dataset plan` once, then 3 workers that take their slice from a Slurm array and give no
/// source: the same dataset as one unplanned run, and dataset.json records the plan's hash.
#[test]
fn a_frozen_plan_built_by_three_workers_equals_one_unplanned_run() {
    let tmp = tempfile::tempdir().unwrap();
    let src = mixed_source(tmp.path());
    let single = tmp.path().join("single");
    build(&src, &single, FLAGS);

    let planned = tmp.path().join("planned");
    let out = run_ok(
        codeclm()
            .args([
                "dataset",
                "plan",
                "--no-progress",
                "--part-size",
                "3",
                "--images",
            ])
            .arg(&src)
            .arg("--out")
            .arg(&planned),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let parts = codeclm_formats::DatasetLayout::new(&single)
        .read_config()
        .unwrap()
        .parts_total
        .unwrap();
    assert!(
        stdout.contains(&format!("planned {parts} parts")),
        "{stdout}"
    );
    for id in 0..3 {
        run_ok(
            codeclm()
                .env("SLURM_ARRAY_TASK_ID", id.to_string())
                .env("SLURM_ARRAY_TASK_COUNT", "3")
                .args(["dataset", "build", "--no-progress", "--workers", "1"])
                .args(["--shard-max-mib", "1", "--out"])
                .arg(&planned),
        );
    }
    let plan: serde_json::Value =
        serde_json::from_slice(&std::fs::read(planned.join("plan.json")).unwrap()).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(planned.join("dataset.json")).unwrap()).unwrap();
    assert_eq!(config["build"]["plan"], plan["hash"]);
    let (a, b) = (tree_without_plan(&single), tree_without_plan(&planned));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, bytes) in &a {
        if name != "dataset.json" {
            assert!(bytes == &b[name], "{name} differs");
        }
    }

    // A planned output refuses other sources, and a second plan into it.
    let err = run_err(
        codeclm()
            .args(["dataset", "build", "--no-progress", "--images"])
            .arg(fixtures("images"))
            .arg("--out")
            .arg(&planned),
    );
    assert!(err.contains("planned for other sources"), "{err}");
    let err = run_err(
        codeclm()
            .args(["dataset", "plan", "--images"])
            .arg(&src)
            .arg("--out")
            .arg(&planned),
    );
    assert!(err.contains("already has a plan"), "{err}");
}

/// An input that changed (or vanished) after planning stops the build with an error naming the
/// file and the fix; parts already built stay.
#[test]
fn a_source_changed_since_planning_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    copy_files(&fixtures("images"), &src);
    let out = tmp.path().join("ds");
    run_ok(
        codeclm()
            .args(["dataset", "plan", "--part-size", "4", "--images"])
            .arg(&src)
            .arg("--out")
            .arg(&out),
    );
    // The last file (in the last part) grows by a byte.
    let mut files: Vec<_> = std::fs::read_dir(&src)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    let last = files
        .iter()
        .rfind(|p| p.extension().is_some_and(|e| e != "md"))
        .unwrap()
        .clone();
    let mut bytes = std::fs::read(&last).unwrap();
    bytes.push(0);
    std::fs::write(&last, bytes).unwrap();
    let err = run_err(
        codeclm()
            .args([
                "dataset",
                "build",
                "--no-progress",
                "--workers",
                "1",
                "--out",
            ])
            .arg(&out),
    );
    assert!(
        err.contains(&last.display().to_string())
            && err.contains("changed since the dataset was planned")
            && err.contains("codeclm dataset plan"),
        "{err}"
    );
    let done = codeclm_formats::DatasetLayout::new(&out)
        .finished_parts()
        .unwrap();
    assert_eq!(
        done,
        vec![0, 1],
        "the parts before the changed one are built and kept"
    );
    std::fs::remove_file(&last).unwrap();
    let err = run_err(
        codeclm()
            .args(["dataset", "build", "--no-progress", "--out"])
            .arg(&out),
    );
    assert!(err.contains("gone now"), "{err}");
}

/// Several writer threads (each writing its own parts, fed in turn) write the same dataset as
/// one, and so does a rerun that resumes it.
#[test]
fn several_writers_write_the_same_dataset_as_one() {
    let tmp = tempfile::tempdir().unwrap();
    let src = mixed_source(tmp.path());
    let single = tmp.path().join("single");
    build(&src, &single, FLAGS);
    let many = tmp.path().join("many");
    let flags = [
        "--part-size",
        "3",
        "--workers",
        "2",
        "--shard-max-mib",
        "1",
        "--writers",
        "3",
    ];
    let out = build(&src, &many, &flags);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("3 writer(s)"), "{stdout}");
    assert_same_tree(&single, &many);
    // Half the parts removed, then resumed with 3 writers.
    for part in (0..20).step_by(2) {
        let _ = std::fs::remove_file(many.join(format!("parts/part-{part:06}.parquet")));
    }
    let _ = std::fs::remove_file(many.join("samples.parquet"));
    build(&src, &many, &flags);
    assert_same_tree(&single, &many);
}
