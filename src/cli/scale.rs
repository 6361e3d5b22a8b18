//! `codeclm bench scale`: the dataset tools at the paper's scale. Synthesises a dataset of
//! `--rows` samples (25M by default: the paper's 23M images and more) whose manifest is
//! realistic (ids, sources, statuses, splits, shards, 10,000 rows per part) and whose codec
//! records are small (one real 16x16 JPEG stream, encoded by `dataset build`, repeated), so the
//! manifest is full size and the shards are not. Then runs each command a user runs on it as a
//! child process of `--codeclm` (this binary by default, or an older build on the same data)
//! and reports its wall time and peak RSS (the child's `ru_maxrss`): `dataset inspect`,
//! `dataset export --ids`, `vocab train` (its sample selection), `dataset decode --ids` (token-set
//! resolution and lookups) and `bench loader` (the training loader's start). Prints a table
//! and one JSON line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use codeclm_formats::samples::{self, SampleRow};
use codeclm_formats::{Codec, CodecShardWriter, Dataset, DatasetLayout, Modality, Split, Status};

#[derive(Args)]
pub struct ScaleArgs {
    /// Where the synthetic dataset is written; reused when it already holds `--rows` rows.
    #[arg(long)]
    dir: PathBuf,
    /// Rows of the synthetic manifest.
    #[arg(long, default_value_t = 25_000_000)]
    rows: u64,
    /// Rows per part (`dataset build`'s default part size).
    #[arg(long, default_value_t = 10_000)]
    part_rows: u64,
    /// The image whose 16x16 JPEG stream every record holds.
    #[arg(long, default_value = "tests/fixtures/images/camera.png")]
    image: PathBuf,
    /// The codeclm binary measured (default: this one), to measure an older build on the same
    /// dataset.
    #[arg(long)]
    codeclm: Option<PathBuf>,
    /// Workers of `dataset tokenize`.
    #[arg(long, default_value_t = 2)]
    workers: usize,
}

/// One measured command.
#[derive(serde::Serialize)]
struct Measured {
    name: &'static str,
    seconds: f64,
    peak_rss_mb: f64,
    ok: bool,
}

/// Runs `cmd` through `codeclm bench peak-rss` (see [`peak_rss`]): wall seconds, the command's
/// peak RSS in MB, and whether it succeeded.
fn measure(me: &Path, name: &'static str, cmd: &Command) -> Result<Measured> {
    let out = Command::new(me)
        .args(["bench", "peak-rss", "--"])
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .envs(cmd.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .output()
        .with_context(|| format!("starting {name}"))?;
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim()).with_context(|| {
        format!(
            "{name}: no measurement (stderr: {})",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let ok = v["ok"].as_bool().unwrap_or(false);
    if !ok {
        eprintln!(
            "{name} failed:\n{}",
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(Measured {
        name,
        seconds: v["seconds"].as_f64().unwrap_or(f64::NAN),
        peak_rss_mb: v["peak_rss_mb"].as_f64().unwrap_or(f64::NAN),
        ok,
    })
}

/// `codeclm bench peak-rss -- COMMAND...`: runs COMMAND (stdout discarded, stderr passed on),
/// then prints `{"seconds", "peak_rss_mb", "ok"}`. The peak is the child's `ru_maxrss` from
/// `wait4`; Linux carries a process's peak across `exec` from the memory it was spawned from, so
/// the command is spawned from this small process (a few MB), not from a large parent.
pub fn peak_rss(command: &[std::ffi::OsString]) -> Result<()> {
    let (program, args) = command.split_first().context("no command to run")?;
    let started = Instant::now();
    let child = Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", program.to_string_lossy()))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: wait4 on our own child into a zeroed, writable rusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if waited != pid {
        bail!(
            "waiting for {}: {}",
            program.to_string_lossy(),
            std::io::Error::last_os_error()
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "seconds": started.elapsed().as_secs_f64(),
            "peak_rss_mb": usage.ru_maxrss as f64 / 1024.0,
            "ok": libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        })
    );
    Ok(())
}

/// The template: one image built the way `dataset build` builds (16x16), for its
/// `dataset.json`, tables file and one real codec stream.
fn template(args: &ScaleArgs, exe: &Path, dir: &Path) -> Result<(Vec<u8>, SampleRow)> {
    let src = dir.join("template-src");
    let out = dir.join("template");
    std::fs::create_dir_all(&src)?;
    let name = args.image.file_name().context("--image has no file name")?;
    std::fs::copy(&args.image, src.join(name)).with_context(|| {
        format!(
            "copying {} (run from the repository root, or pass --image)",
            args.image.display()
        )
    })?;
    let status = Command::new(exe)
        .args([
            "dataset",
            "build",
            "--no-progress",
            "--size",
            "16",
            "--images",
        ])
        .arg(&src)
        .arg("--out")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()?;
    if !status.success() {
        bail!("building the template dataset in {} failed", out.display());
    }
    let ds = Dataset::open(&out)?;
    let row = ds
        .first_rows(codeclm_formats::RowFilter::OK, 1)?
        .pop()
        .context("the template image gave no ok row")?;
    Ok((ds.codec_bytes(&row)?, row))
}

/// Writes the synthetic dataset: `parts` part manifests and shards, then `samples.parquet`.
fn synthesise(args: &ScaleArgs, exe: &Path) -> Result<()> {
    let dir = &args.dir;
    let work = dir.with_extension("template");
    let _ = std::fs::remove_dir_all(&work);
    let (stream, template_row) = template(args, exe, &work)?;
    let layout = DatasetLayout::new(dir);
    layout.create_dirs()?;
    let template_layout = DatasetLayout::new(work.join("template"));
    let mut config = template_layout.read_config()?;
    let parts = args.rows.div_ceil(args.part_rows);
    config.parts_total = Some(parts as u32);
    if let Some(t) = &config.jpeg_tables {
        std::fs::copy(
            template_layout.root.join(&t.file),
            layout.root.join(&t.file),
        )?;
    }
    layout.write_config(&config)?;
    let checksum = codeclm_formats::shard::checksum(&stream);
    let progress = indicatif::ProgressBar::new(parts);
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "synthesising {bar:30} {pos}/{len} parts {elapsed}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let all: Vec<u64> = (0..parts).collect();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let done = codeclm_etl::on_threads(threads, &all, |&part| -> Result<()> {
        let part32 = part as u32;
        let manifest = layout.part_manifest(part32);
        if manifest.exists() {
            progress.inc(1);
            return Ok(());
        }
        let first = part * args.part_rows;
        let n = args.part_rows.min(args.rows - first);
        let rel = DatasetLayout::shard_rel(part32, Codec::Jpeg, 0);
        let mut shard = CodecShardWriter::create(&layout.root.join(&rel), Codec::Jpeg, 1)?;
        let mut rows = Vec::with_capacity(n as usize);
        for i in first..first + n {
            let source = format!("laion/{:05}/{:09}.jpg", i / 10_000, i);
            let id = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(source.as_bytes()));
            // About 0.5% of inputs fail (as LAION downloads do), 1% are held out.
            let h = xxhash_rust::xxh3::xxh3_64_with_seed(source.as_bytes(), 1);
            let ok = h % 200 != 0;
            let mut row = SampleRow {
                sample_id: id,
                source,
                split: if h % 100 == 7 {
                    Split::Val
                } else {
                    Split::Train
                },
                part: part32,
                src_bytes: 40_000 + h % 200_000,
                src_width: Some(500 + (h % 700) as u32),
                src_height: Some(375 + (h % 500) as u32),
                ..template_row.clone()
            };
            row.modality = Modality::Image;
            if ok {
                let loc = shard.append(&stream)?;
                row.shard = Some(rel.clone());
                row.record = Some(loc.record);
                row.offset = Some(loc.offset);
                row.checksum = Some(checksum);
                row.codec_bytes = Some(stream.len() as u64);
            } else {
                row = SampleRow {
                    status: Status::Corrupt,
                    error: Some("jpeg: premature end of data segment".into()),
                    src_format: Some("jpeg".into()),
                    width: None,
                    height: None,
                    decode_scale: None,
                    codec: None,
                    codec_bytes: None,
                    shard: None,
                    record: None,
                    offset: None,
                    checksum: None,
                    ..row
                };
            }
            rows.push(row);
        }
        shard.finish()?;
        samples::write_parquet(&rows, &manifest)?;
        progress.inc(1);
        Ok(())
    });
    done.into_iter().collect::<Result<Vec<()>>>()?;
    progress.finish_and_clear();
    let t = Instant::now();
    let total = layout.consolidate()?;
    eprintln!(
        "synthesised {total} rows in {parts} parts; samples.parquet in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

pub fn scale(args: ScaleArgs) -> Result<()> {
    let me = std::env::current_exe()?;
    let exe = args.codeclm.clone().unwrap_or_else(|| me.clone());
    let reuse = Dataset::open(&args.dir)
        .map(|ds| ds.len() == args.rows && DatasetLayout::new(&args.dir).samples_path().exists())
        .unwrap_or(false);
    let t = Instant::now();
    if !reuse {
        synthesise(&args, &me)?;
    }
    let synth_seconds = t.elapsed().as_secs_f64();
    let dir = args.dir.as_os_str();
    let vocab = args.dir.with_extension("vocab.json");
    let scratch = args.dir.with_extension("out");
    let _ = std::fs::remove_dir_all(&scratch);
    // Ids at the start, middle and end of the manifest (the synthesis names them).
    let id_of = |i: u64| {
        let source = format!("laion/{:05}/{:09}.jpg", i / 10_000, i);
        format!("{:016x}", xxhash_rust::xxh3::xxh3_64(source.as_bytes()))
    };
    let ds = Dataset::open(&args.dir)?;
    let mut ids = Vec::new();
    for i in [1, args.rows / 2 + 1, args.rows - 2] {
        if let Some(r) = ds.find(&id_of(i))?.filter(|r| r.is_ok()) {
            ids.push(r.sample_id);
        }
    }
    drop(ds);
    let _ = std::fs::remove_file(DatasetLayout::new(&args.dir).id_index_path());
    let ids = ids.join(",");
    let codeclm = || {
        let mut c = Command::new(&exe);
        c.env("CODECLM_LOG", "warn");
        c
    };
    let mut results = vec![
        measure(
            &me,
            "dataset inspect",
            codeclm().args(["dataset", "inspect", "--dataset"]).arg(dir),
        )?,
        measure(
            &me,
            "dataset export --ids (index built)",
            codeclm()
                .args(["dataset", "export", "--dataset"])
                .arg(dir)
                .args(["--ids", &ids, "--out"])
                .arg(scratch.join("export1")),
        )?,
        measure(
            &me,
            "dataset export --ids (index reused)",
            codeclm()
                .args(["dataset", "export", "--dataset"])
                .arg(dir)
                .args(["--ids", &ids, "--out"])
                .arg(scratch.join("export2")),
        )?,
        measure(
            &me,
            "vocab train --samples 1000",
            codeclm()
                .args(["vocab", "train", "--dataset"])
                .arg(dir)
                .args(["--samples", "1000", "--size", "300", "--out"])
                .arg(&vocab),
        )?,
    ];
    let tokenized = codeclm_formats::tokens::TokenLayout::list(&args.dir)
        .into_iter()
        .any(|h| {
            codeclm_formats::tokens::TokenLayout::new(&args.dir, &h)
                .manifest_path()
                .exists()
        });
    if !tokenized && vocab.exists() {
        results.push(measure(
            &me,
            "dataset tokenize",
            codeclm()
                .args(["dataset", "tokenize", "--dataset"])
                .arg(dir)
                .arg("--vocab")
                .arg(&vocab)
                .args(["--workers", &args.workers.to_string()]),
        )?);
    }
    results.push(measure(
        &me,
        "dataset decode --ids (token set resolved)",
        codeclm()
            .args(["dataset", "decode", "--dataset"])
            .arg(dir)
            .arg("--vocab")
            .arg(&vocab)
            .args(["--ids", &ids, "--out"])
            .arg(scratch.join("decode")),
    )?);
    results.push(measure(
        &me,
        "bench loader (start + 1 batch)",
        codeclm()
            .args(["bench", "loader", "--dataset"])
            .arg(dir)
            .args(["--batches", "1", "--batch", "1", "--context", "256"]),
    )?);
    println!(
        "{} rows ({} parts), synthesis {:.0} s{}, measured with {}:",
        args.rows,
        args.rows.div_ceil(args.part_rows),
        synth_seconds,
        if reuse { " (reused)" } else { "" },
        exe.display()
    );
    for r in &results {
        println!(
            "  {:<44} {:>8.1} s  {:>8.0} MB peak RSS{}",
            r.name,
            r.seconds,
            r.peak_rss_mb,
            if r.ok { "" } else { "  FAILED" }
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "scale", "rows": args.rows, "part_rows": args.part_rows,
            "codeclm": exe.display().to_string(), "results": results,
        })
    );
    Ok(())
}
