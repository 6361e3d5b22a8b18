//! Shared helpers: paths, running the CLI, reading datasets, the Python reference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use codeclm_formats::{Dataset, RowFilter, SampleRow};

/// Every row of a dataset in memory: the tests' datasets are small (commands stream rows).
pub trait AllRows {
    fn rows(&self) -> Vec<SampleRow>;
}

impl AllRows for Dataset {
    fn rows(&self) -> Vec<SampleRow> {
        self.load_rows(RowFilter::ALL)
            .expect("reading the manifest")
    }
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixtures(sub: &str) -> PathBuf {
    repo().join("tests/fixtures").join(sub)
}

pub fn codeclm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_codeclm"));
    c.env("CODECLM_LOG", "warn");
    c
}

/// Runs the CLI and insists that it succeeded.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn codeclm");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs the CLI, insists that it failed cleanly (an error, not a panic), and returns its stderr.
pub fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn codeclm");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{cmd:?} should have failed:\n{err}");
    assert!(!err.contains("panicked"), "{cmd:?} panicked:\n{err}");
    err
}

pub fn build(images: &Path, out: &Path, extra: &[&str]) -> Output {
    run_ok(
        codeclm()
            .args(["dataset", "build", "--no-progress", "--images"])
            .arg(images)
            .arg("--out")
            .arg(out)
            .args(extra),
    )
}

/// `codeclm vocab train --dataset DS ARGS --out OUT`.
pub fn vocab_train(ds: &Path, out: &Path, args: &[&str]) -> Output {
    run_ok(
        codeclm()
            .args(["vocab", "train", "--dataset"])
            .arg(ds)
            .args(args)
            .arg("--out")
            .arg(out),
    )
}

/// `codeclm dataset tokenize --dataset DS --vocab VOCAB ARGS`; its stdout.
pub fn tokenize(ds: &Path, vocab: &Path, args: &[&str]) -> String {
    let out = run_ok(
        codeclm()
            .args(["dataset", "tokenize", "--dataset"])
            .arg(ds)
            .arg("--vocab")
            .arg(vocab)
            .args(args),
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Copies the files of the directory `from` (not its subdirectories) into `to`, created.
pub fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Writes webdataset shards `00000.tar`, ... of `per_shard` photos each into `dir` (created),
/// as img2dataset writes them: `key.ext` + `key.json`. Returns the shards' paths.
pub fn write_wds_shards(dir: &Path, photos: &[PathBuf], per_shard: usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let mut shards = Vec::new();
    for (i, chunk) in photos.chunks(per_shard).enumerate() {
        let at = dir.join(format!("{i:05}.tar"));
        let mut tar = tar::Builder::new(std::fs::File::create(&at).unwrap());
        for p in chunk {
            let stem = p.file_stem().unwrap().to_string_lossy();
            let ext = p.extension().unwrap().to_string_lossy();
            tar.append_path_with_name(p, format!("{stem}.{ext}"))
                .unwrap();
            let json = format!("{{\"key\": \"{stem}\", \"status\": \"success\"}}");
            let mut header = tar::Header::new_gnu();
            header.set_size(json.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, format!("{stem}.json"), json.as_bytes())
                .unwrap();
        }
        tar.finish().unwrap();
        shards.push(at);
    }
    shards
}

/// Writes `photos` as a Hugging Face datasets Parquet file with Python polars: a `label`
/// column and `image` = struct {bytes, path}, `row_group` rows a row group.
pub fn write_hf_parquet(photos: &[PathBuf], out: &Path, row_group: usize) {
    let script = format!(
        "import polars as pl, pathlib\nfiles = [{}]\npl.DataFrame({{'label': list(range(len(files))), 'image': [{{'bytes': pathlib.Path(f).read_bytes(), 'path': pathlib.Path(f).name}} for f in files]}}).write_parquet({:?}, row_group_size={row_group})",
        photos.iter().map(|p| format!("{:?}", p.display().to_string())).collect::<Vec<_>>().join(", "),
        out.display().to_string()
    );
    let status = Command::new("python3")
        .args(["-c", &script])
        .status()
        .unwrap();
    assert!(
        status.success(),
        "writing the Parquet source needs Python polars (`pip install -r tools/requirements.txt`)"
    );
}

/// Source identity -> stored codec bytes, for every successful sample.
pub fn codec_by_source(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let ds = Dataset::open(dir).unwrap();
    ds.rows()
        .iter()
        .filter(|r| r.is_ok())
        .map(|r| (r.source.clone(), ds.codec_bytes(r).unwrap()))
        .collect()
}

/// Runs `tools/pillow_ref.py`; fails with an install hint when Pillow is missing.
pub fn pillow_ref(out: &Path, args: &[&str], files: &[PathBuf]) {
    let status = Command::new("python3")
        .arg(repo().join("tools/pillow_ref.py"))
        .arg("--out")
        .arg(out)
        .args(args)
        .args(files)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("python3 is required for the reference tests");
    assert!(
        status.success(),
        "tools/pillow_ref.py failed: the reference tests need Pillow 13 (`pip install -r tools/requirements.txt`)"
    );
}

/// Every file under `dir` (relative path -> bytes), except run logs, which hold timings.
pub fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in walk(dir) {
        let rel = entry
            .strip_prefix(dir)
            .unwrap()
            .to_string_lossy()
            .to_string();
        if rel.starts_with("runs/") {
            continue;
        }
        out.insert(rel, std::fs::read(&entry).unwrap());
    }
    out
}

/// Every file under `dir`, recursively, sorted.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            files.extend(walk(&p));
        } else {
            files.push(p);
        }
    }
    files.sort();
    files
}

pub fn assert_same_tree(a: &Path, b: &Path) {
    let (ta, tb) = (tree(a), tree(b));
    let names = |t: &BTreeMap<String, Vec<u8>>| t.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&ta),
        names(&tb),
        "{} and {} hold different files",
        a.display(),
        b.display()
    );
    for (name, bytes) in &ta {
        assert!(
            bytes == &tb[name],
            "{name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// A standalone JPEG of an image sample: its abbreviated stream with the dataset's tables.
pub fn jpeg_file(ds: &codeclm_formats::Dataset, row: &codeclm_formats::SampleRow) -> Vec<u8> {
    let abbr = ds.codec_bytes(row).unwrap();
    codeclm_codec::jpeg::splice_tables(&abbr, ds.jpeg_tables().unwrap()).unwrap()
}
