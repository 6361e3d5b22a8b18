//! Sources in object storage, through a real S3-compatible server (moto's, started by the test
//! on 127.0.0.1; tools/requirements.txt installs it): a prefix, webdataset tars, file lists of
//! URLs and Parquet give the same bytes as the same inputs on local disk, and a frozen plan
//! notices an object that changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use codeclm_etl::objects::S3TestServer;

use crate::common::*;

fn server() -> &'static S3TestServer {
    S3TestServer::shared()
}

/// `codeclm` with the variables that reach the test server.
fn remote_codeclm() -> Command {
    let mut c = codeclm();
    c.envs(server().env());
    c
}

fn remote_build(src: &str, out: &Path, extra: &[&str]) {
    run_ok(
        remote_codeclm()
            .args([
                "dataset",
                "build",
                "--no-progress",
                "--images",
                src,
                "--out",
            ])
            .arg(out)
            .args(extra),
    );
}

/// `codeclm dataset pull URL DIR`.
fn pull(url: &str, dir: &Path) {
    run_ok(remote_codeclm().args(["dataset", "pull", url]).arg(dir));
}

/// The bundled photos (and their LICENSES.md sidecar), sorted by name.
fn bundled() -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(fixtures("images"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().to_string()
}

/// Uploads the bundled files to `bucket/prefix/NAME`.
fn upload_bundled(bucket: &str, prefix: &str) {
    server().bucket(bucket);
    for p in bundled() {
        server().put(
            bucket,
            &format!("{prefix}/{}", name(&p)),
            &std::fs::read(&p).unwrap(),
        );
    }
}

/// Every file of a dataset but dataset.json (which names the source).
fn tree_but_config(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut t = tree(dir);
    assert!(t.remove("dataset.json").is_some());
    t
}

fn assert_same_files(a: &Path, b: &Path) {
    let (a, b) = (tree_but_config(a), tree_but_config(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, bytes) in &a {
        assert!(bytes == &b[name], "{name} differs");
    }
}

/// A prefix is a tree: one run, and three workers that take their slice from a Slurm array,
/// build the same files (manifests, shards) as the same photos in a local directory.
#[test]
fn a_prefix_builds_the_same_dataset_as_a_local_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    upload_bundled("prefix", "photos/2024");
    let flags = ["--part-size", "3", "--workers", "2"];
    build(&fixtures("images"), &t.join("local"), &flags);
    remote_build("s3://prefix/photos/2024", &t.join("remote"), &flags);
    assert_same_files(&t.join("local"), &t.join("remote"));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.join("remote/dataset.json")).unwrap()).unwrap();
    assert!(
        config.to_string().contains("s3://prefix/photos/2024"),
        "{config}"
    );

    // Three workers (and a trailing slash) build the same dataset as one run.
    for id in 0..3 {
        run_ok(
            remote_codeclm()
                .env("SLURM_ARRAY_TASK_ID", id.to_string())
                .env("SLURM_ARRAY_TASK_COUNT", "3")
                .args(["dataset", "build", "--no-progress", "--images"])
                .arg("s3://prefix/photos/2024/")
                .arg("--out")
                .arg(t.join("workers"))
                .args(flags),
        );
    }
    assert_same_files(&t.join("local"), &t.join("workers"));
}

/// The bundled photos as webdataset shards of 4 under `dir`.
fn write_shards(dir: &Path) -> Vec<PathBuf> {
    let photos: Vec<_> = bundled()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e != "md"))
        .collect();
    write_wds_shards(dir, &photos, 4)
}

/// Tars under a prefix, and one tar by its plain `http://` URL, stream into the same bytes as
/// the local shards.
#[test]
fn remote_webdataset_shards_match_local_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let shards = write_shards(&t.join("wds"));
    assert_eq!(shards.len(), 3);
    server().bucket("shards");
    for s in &shards {
        server().put(
            "shards",
            &format!("wds/{}", name(s)),
            &std::fs::read(s).unwrap(),
        );
    }
    build(&t.join("wds"), &t.join("local"), &[]);
    remote_build("s3://shards/wds", &t.join("remote"), &[]);
    assert_same_files(&t.join("local"), &t.join("remote"));

    // One shard over plain HTTP (moto serves public GETs): the same rows as that local tar.
    build(&shards[1], &t.join("local1"), &[]);
    let url = format!("{}/shards/wds/00001.tar", server().endpoint);
    remote_build(&url, &t.join("http1"), &[]);
    assert_same_files(&t.join("local1"), &t.join("http1"));
    assert_eq!(codec_by_source(&t.join("http1")).len(), 4);
}

/// A list may name objects by URL (s3:// and http://), mixed with local paths; an entry that
/// does not exist is a row with an error naming it, and the run goes on. A list stored in the
/// bucket names its objects relative to its folder.
#[test]
fn lists_of_urls_and_remote_lists() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    upload_bundled("listed", "in");
    let photos: Vec<_> = bundled()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e != "md"))
        .collect();
    let mut text = String::from("# mixed\n");
    for (i, p) in photos.iter().enumerate() {
        match i % 3 {
            0 => text.push_str(&format!("s3://listed/in/{}\n", name(p))),
            1 => text.push_str(&format!("{}/listed/in/{}\n", server().endpoint, name(p))),
            _ => text.push_str(&format!("{}\n", p.display())),
        }
    }
    text.push_str("s3://listed/in/missing.jpg\n");
    std::fs::write(t.join("list.txt"), &text).unwrap();
    run_ok(
        remote_codeclm()
            .args(["dataset", "build", "--no-progress", "--images"])
            .arg(t.join("list.txt"))
            .arg("--out")
            .arg(t.join("mixed")),
    );
    let ds = codeclm_formats::Dataset::open(&t.join("mixed")).unwrap();
    let rows = ds.rows();
    assert_eq!(rows.len(), photos.len() + 1);
    let failed: Vec<_> = rows.iter().filter(|r| !r.is_ok()).collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].source, "s3://listed/in/missing.jpg");
    let error = failed[0].error.as_deref().unwrap_or_default();
    assert!(
        error.contains("s3://listed/in/missing.jpg") && error.contains("no such object"),
        "{error}"
    );

    // The same photos from local paths: the same codec bytes, whatever the entry's form.
    let by_name = |m: BTreeMap<String, Vec<u8>>| -> BTreeMap<String, Vec<u8>> {
        m.into_iter()
            .map(|(k, v)| (k.rsplit('/').next().unwrap().to_string(), v))
            .collect()
    };
    build(&fixtures("images"), &t.join("local"), &[]);
    let local = by_name(codec_by_source(&t.join("local")));
    assert_eq!(by_name(codec_by_source(&t.join("mixed"))), local);

    // A list object in the bucket, with keys relative to its folder.
    let rel: String = photos.iter().map(|p| format!("{}\n", name(p))).collect();
    server().put("listed", "in/list.txt", rel.as_bytes());
    remote_build("s3://listed/in/list.txt", &t.join("remote-list"), &[]);
    assert_eq!(by_name(codec_by_source(&t.join("remote-list"))), local);
}

/// A Parquet file in the bucket (Hugging Face layout, written by Python polars) gives the same
/// rows and bytes as the same file on disk.
#[test]
fn a_remote_parquet_file_matches_the_local_one() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let parquet = t.join("hf.parquet");
    let photos: Vec<_> = bundled()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e != "md"))
        .collect();
    write_hf_parquet(&photos, &parquet, 3);
    server().bucket("parquet");
    server().put(
        "parquet",
        "hf/train.parquet",
        &std::fs::read(&parquet).unwrap(),
    );
    std::fs::rename(&parquet, t.join("train.parquet")).unwrap();
    build(&t.join("train.parquet"), &t.join("local"), &[]);
    remote_build("s3://parquet/hf/train.parquet", &t.join("remote"), &[]);
    assert_same_files(&t.join("local"), &t.join("remote"));
    assert_eq!(codec_by_source(&t.join("remote")).len(), photos.len());
    // The prefix holding it is a Parquet source too.
    remote_build("s3://parquet/hf", &t.join("prefix"), &[]);
    assert_same_files(&t.join("local"), &t.join("prefix"));
}

/// `dataset plan` on a prefix records each object's size and time; an object replaced or
/// removed after planning stops the build with an error naming its URL and the fix.
#[test]
fn a_frozen_plan_of_a_prefix_notices_a_changed_object() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ds");
    upload_bundled("planned", "src");
    let out_plan = run_ok(
        remote_codeclm()
            .args(["dataset", "plan", "--no-progress", "--part-size", "4"])
            .args(["--images", "s3://planned/src", "--out"])
            .arg(&out),
    );
    let stdout = String::from_utf8_lossy(&out_plan.stdout);
    assert!(stdout.contains("planned 3 parts"), "{stdout}");
    // The last photo (in the last part) is replaced by a longer object.
    let last = name(
        bundled()
            .iter()
            .rfind(|p| p.extension().is_some_and(|e| e != "md"))
            .unwrap(),
    );
    let mut bytes = std::fs::read(fixtures("images").join(&last)).unwrap();
    bytes.push(0);
    server().put("planned", &format!("src/{last}"), &bytes);
    let err = run_err(
        remote_codeclm()
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
        err.contains(&format!("s3://planned/src/{last}"))
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
        "the parts before the changed one are kept"
    );
    server().delete("planned", &format!("src/{last}"));
    let err = run_err(
        remote_codeclm()
            .args(["dataset", "build", "--no-progress", "--out"])
            .arg(&out),
    );
    assert!(err.contains("gone now"), "{err}");
}

/// Without credentials or with a bucket that does not exist, the error names the URL and what
/// to set.
#[test]
fn a_missing_bucket_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let err = run_err(
        remote_codeclm()
            .args(["dataset", "build", "--no-progress", "--images"])
            .arg("s3://no-such-bucket/photos")
            .arg("--out")
            .arg(tmp.path().join("ds")),
    );
    assert!(err.contains("s3://no-such-bucket/photos"), "{err}");
}

/// `--out s3://...`: three workers, each with its own stage as on separate machines and its
/// slice from a Slurm array, build the same dataset as one local run; pulled back, every file
/// is the same, and the pulled dataset reads.
#[test]
fn three_workers_build_into_a_bucket_as_one_local_run() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    server().bucket("built");
    let flags = ["--part-size", "3", "--workers", "2"];
    build(&fixtures("images"), &t.join("local"), &flags);
    for id in 0..3 {
        let out = run_ok(
            remote_codeclm()
                .env("SLURM_ARRAY_TASK_ID", id.to_string())
                .env("SLURM_ARRAY_TASK_COUNT", "3")
                .args(["dataset", "build", "--no-progress", "--images"])
                .arg(fixtures("images"))
                .args(["--out", "s3://built/ds", "--stage"])
                .arg(t.join(format!("stage{id}")))
                .args(flags),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout.contains("dataset complete: s3://built/ds/samples.parquet"),
            id == 2,
            "{stdout}"
        );
    }
    // A stage keeps manifests, not the shards it uploaded.
    assert!(std::fs::read_dir(t.join("stage0/shards"))
        .unwrap()
        .next()
        .is_none());
    pull("s3://built/ds", &t.join("pulled"));
    assert_same_tree(&t.join("local"), &t.join("pulled"));
    let runs = std::fs::read_dir(t.join("pulled/runs")).unwrap().count();
    assert_eq!(runs, 3, "each worker's run summary is uploaded");
    run_ok(
        codeclm()
            .args(["dataset", "verify", "--dataset"])
            .arg(t.join("pulled")),
    );
}

/// A worker killed after uploading a part's shards and before its manifest (the commit) leaves
/// that part unfinished in the bucket; rerun, it ends with exactly the bytes of one clean run.
/// So does a plan written to the bucket and built from there.
#[test]
fn a_worker_killed_mid_part_on_object_storage_resumes_to_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    server().bucket("killed");
    let flags = ["--part-size", "3", "--workers", "2"];
    build(&fixtures("images"), &t.join("local"), &flags);
    let run = |failpoints: Option<&str>| {
        let mut c = remote_codeclm();
        // The default stage, under this test's TMPDIR.
        c.env("TMPDIR", t)
            .args(["dataset", "build", "--no-progress", "--images"])
            .arg(fixtures("images"))
            .args(["--out", "s3://killed/ds"])
            .args(flags);
        if let Some(f) = failpoints {
            c.env("FAILPOINTS", f);
        }
        c.output().unwrap()
    };
    let killed = run(Some("etl::kill-before-remote-manifest=1*off->return"));
    assert!(!killed.status.success(), "the failpoint kills the worker");
    pull("s3://killed/ds", &t.join("partial"));
    let names = |dir: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(t.join(dir))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    };
    // One part committed (the writer may finish parts out of order), one part's shards in
    // the bucket without its manifest.
    let committed = names("partial/parts");
    assert_eq!(committed.len(), 1, "{committed:?}");
    let orphans: Vec<_> = names("partial/shards")
        .into_iter()
        .filter(|s| {
            !committed
                .iter()
                .any(|c| s.starts_with(c.trim_end_matches(".parquet")))
        })
        .collect();
    assert!(
        !orphans.is_empty(),
        "a part's shards were uploaded before the kill"
    );
    assert!(!t.join("partial/samples.parquet").exists());
    let resumed = run(None);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let stdout = String::from_utf8_lossy(&resumed.stdout);
    assert!(stdout.contains("1 already done"), "{stdout}");
    pull("s3://killed/ds", &t.join("partial"));
    assert_same_tree(&t.join("local"), &t.join("partial"));

    // A frozen plan in the bucket: workers given only --out build it.
    run_ok(
        remote_codeclm()
            .args([
                "dataset",
                "plan",
                "--no-progress",
                "--part-size",
                "3",
                "--images",
            ])
            .arg(fixtures("images"))
            .args(["--out", "s3://killed/planned", "--stage"])
            .arg(t.join("plan-stage")),
    );
    run_ok(
        remote_codeclm()
            .args(["dataset", "build", "--no-progress", "--workers", "2"])
            .args(["--out", "s3://killed/planned", "--stage"])
            .arg(t.join("build-stage")),
    );
    pull("s3://killed/planned", &t.join("planned"));
    let planned = codec_by_source(&t.join("planned"));
    assert_eq!(planned, codec_by_source(&t.join("local")));
    assert!(t.join("planned/plan.json").exists());
}
