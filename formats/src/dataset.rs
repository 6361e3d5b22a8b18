//! A dataset directory: where every file lives, the config that produced it, and how parts
//! written by many workers (or machines) become one manifest.
//!
//! ```text
//! DIR/dataset.json                    resolved build config + format versions (written first)
//! DIR/jpeg_tables.jpg                 tables-only JPEG stream (DQT + DHT) shared by every image
//! DIR/shards/part-NNNNNN-CODEC-KKK.shard   codec shards of part NNNNNN
//! DIR/parts/part-NNNNNN.parquet       manifest of part NNNNNN; written last = the part is done
//! DIR/runs/run-*.json                 one summary per build invocation (counts, throughput)
//! DIR/samples.parquet                 all parts concatenated, once every part is done
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::samples;
use crate::shard::Codec;

/// Version of the directory layout and dataset.json.
pub const DATASET_FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug)]
pub struct DatasetLayout {
    pub root: PathBuf,
}

impl DatasetLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DatasetLayout { root: root.into() }
    }

    pub fn config_path(&self) -> PathBuf {
        self.root.join("dataset.json")
    }

    pub fn jpeg_tables_path(&self) -> PathBuf {
        self.root.join("jpeg_tables.jpg")
    }

    pub fn samples_path(&self) -> PathBuf {
        self.root.join("samples.parquet")
    }

    /// The sample-id index (`ids.rs`): a cache of the manifests' ids, sorted, for lookups.
    pub fn id_index_path(&self) -> PathBuf {
        self.root.join("samples.ids")
    }

    pub fn parts_dir(&self) -> PathBuf {
        self.root.join("parts")
    }

    pub fn shards_dir(&self) -> PathBuf {
        self.root.join("shards")
    }

    pub fn runs_dir(&self) -> PathBuf {
        self.root.join("runs")
    }

    pub fn part_manifest(&self, part: u32) -> PathBuf {
        self.parts_dir().join(format!("part-{part:06}.parquet"))
    }

    /// Shard path relative to the root (what the manifest stores).
    pub fn shard_rel(part: u32, codec: Codec, seq: u32) -> String {
        format!("shards/part-{part:06}-{}-{seq:03}.shard", codec.name())
    }

    pub fn create_dirs(&self) -> Result<()> {
        for d in [
            self.root.clone(),
            self.parts_dir(),
            self.shards_dir(),
            self.runs_dir(),
        ] {
            std::fs::create_dir_all(&d).map_err(Error::io(&d))?;
        }
        Ok(())
    }

    /// Part ids whose manifest exists (finished parts), sorted.
    pub fn finished_parts(&self) -> Result<Vec<u32>> {
        let dir = self.parts_dir();
        let mut parts = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(parts),
            Err(e) => {
                return Err(Error::Io {
                    path: dir,
                    source: e,
                })
            }
        };
        for entry in entries {
            let entry = entry.map_err(Error::io(&dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name
                .strip_prefix("part-")
                .and_then(|s| s.strip_suffix(".parquet"))
            {
                if let Ok(id) = id.parse::<u32>() {
                    parts.push(id);
                }
            }
        }
        parts.sort_unstable();
        Ok(parts)
    }

    /// Removes temp files left by killed runs without touching those of live writers: a temp
    /// file of a part is removed only if `owns(part)` (one worker owns each part, whatever
    /// machine it runs on); any other temp file only if it was written on this machine by a
    /// process that no longer exists.
    pub fn sweep_temp_files(&self, owns: &dyn Fn(u32) -> bool) -> Result<usize> {
        let mut removed = 0;
        let host_prefix = {
            let tag = crate::writer_tag();
            tag[..tag.rfind('-').unwrap_or(0) + 1].to_string()
        };
        for dir in [
            self.root.clone(),
            self.parts_dir(),
            self.shards_dir(),
            self.runs_dir(),
        ] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                let Some(stem) = name.strip_suffix(".tmp") else {
                    continue;
                };
                let part = name
                    .strip_prefix("part-")
                    .and_then(|r| r.get(..6))
                    .and_then(|d| d.parse::<u32>().ok());
                let stale = match part {
                    Some(p) => owns(p),
                    None => {
                        // `<file>.<host>-<pid>`: ours if the host matches and the pid is gone.
                        let tag = stem.rsplit('.').next().unwrap_or("");
                        let pid = tag.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
                        tag.starts_with(&host_prefix)
                            && pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists())
                    }
                };
                if stale {
                    std::fs::remove_file(entry.path()).map_err(Error::io(entry.path()))?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Where `--retry-failed` keeps a part's earlier rows while it redoes the part (the
    /// manifest moves here first, so the part counts as unfinished until its new manifest).
    pub fn retry_journal(&self, part: u32) -> PathBuf {
        self.parts_dir()
            .join(format!("part-{part:06}.retry.parquet"))
    }

    /// Removes what an unfinished `part` left: its shards and the temp files of its shards and
    /// manifest (whoever wrote them). Only for the holder of the part's lease. Returns how many.
    pub fn clear_unfinished_part(&self, part: u32) -> Result<usize> {
        let mut doomed = self.shards_of_part(part)?;
        let prefix = format!("part-{part:06}");
        for dir in [self.shards_dir(), self.parts_dir()] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                let ours = name.strip_prefix(&prefix).is_some_and(|rest| {
                    (rest.starts_with('-') || rest.starts_with('.')) && name.ends_with(".tmp")
                });
                if ours {
                    doomed.push(entry.path());
                }
            }
        }
        for path in &doomed {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(path)(e)),
            }
        }
        Ok(doomed.len())
    }

    /// Shard files that belong to `part` (finished or not).
    pub fn shards_of_part(&self, part: u32) -> Result<Vec<PathBuf>> {
        let prefix = format!("part-{part:06}-");
        let dir = self.shards_dir();
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(out);
        };
        for entry in entries {
            let entry = entry.map_err(Error::io(&dir))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with(&prefix) && name.ends_with(".shard") {
                out.push(entry.path());
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn read_config(&self) -> Result<DatasetConfig> {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => Error::Invalid(format!(
                "{} has no dataset.json: it is not a codeclm dataset. Build one with `codeclm dataset build --images SRC --out {}`",
                self.root.display(),
                self.root.display()
            )),
            _ => Error::Io { path: path.clone(), source },
        })?;
        let config: DatasetConfig = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
            path: path.clone(),
            what: "dataset config",
            problem: e.to_string(),
            fix: "restore it from another worker's copy or rebuild the dataset".into(),
        })?;
        if config.dataset_format != DATASET_FORMAT_VERSION {
            return Err(Error::Corrupt {
                path,
                what: "dataset config",
                problem: format!(
                    "dataset format {}, this build reads {DATASET_FORMAT_VERSION}",
                    config.dataset_format
                ),
                fix: "use the codeclm version that wrote it, or rebuild the dataset".into(),
            });
        }
        Ok(config)
    }

    pub fn write_config(&self, config: &DatasetConfig) -> Result<()> {
        let text =
            serde_json::to_string_pretty(config).map_err(|e| Error::Invalid(e.to_string()))?;
        crate::write_atomic(&self.config_path(), format!("{text}\n").as_bytes())
    }

    /// Every run summary written by builds into this dataset, oldest first.
    pub fn read_runs(&self) -> Result<Vec<serde_json::Value>> {
        let dir = self.runs_dir();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(Vec::new());
        };
        let mut paths: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        paths
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p).map_err(Error::io(p))?;
                serde_json::from_str(&text).map_err(|e| Error::Corrupt {
                    path: p.clone(),
                    what: "run summary",
                    problem: e.to_string(),
                    fix: "delete it; it only feeds `dataset inspect`".into(),
                })
            })
            .collect()
    }

    /// Concatenates every finished part into `samples.parquet`. Returns the row count.
    pub fn consolidate(&self) -> Result<u64> {
        let parts: Vec<PathBuf> = self
            .finished_parts()?
            .into_iter()
            .map(|p| self.part_manifest(p))
            .collect();
        samples::concat_parquet(&parts, &self.samples_path())
    }
}

/// `dataset.json`: everything needed to reproduce, resume, merge and read the dataset.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DatasetConfig {
    pub dataset_format: u32,
    pub codec_shard_version: u32,
    pub samples_schema_version: u32,
    /// `codeclm <version>` that created the dataset.
    pub created_by: String,
    /// Parts the source splits into (known once the source has been enumerated).
    pub parts_total: Option<u32>,
    /// The pipeline's resolved settings: everything that changes the output bytes.
    pub build: serde_json::Value,
    /// The tables-only JPEG stream shared by every abbreviated JPEG record.
    pub jpeg_tables: Option<TablesRef>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TablesRef {
    pub file: String,
    pub bytes: u64,
    pub checksum: String,
}

impl DatasetConfig {
    pub fn new(build: serde_json::Value, created_by: String) -> Self {
        DatasetConfig {
            dataset_format: DATASET_FORMAT_VERSION,
            codec_shard_version: crate::shard::CODEC_SHARD_VERSION,
            samples_schema_version: samples::SAMPLES_SCHEMA_VERSION,
            created_by,
            parts_total: None,
            build,
            jpeg_tables: None,
        }
    }

    /// Explains how two configs differ in what determines the output, or `None` if they agree.
    pub fn difference(&self, other: &DatasetConfig) -> Option<String> {
        if self.build != other.build {
            let (a, b) = (flatten(&self.build), flatten(&other.build));
            let absent = "(absent)".to_string();
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            let diffs: Vec<String> = keys
                .into_iter()
                .filter(|k| a.get(*k) != b.get(*k))
                .map(|k| {
                    format!(
                        "{k}: {} vs {}",
                        a.get(k).unwrap_or(&absent),
                        b.get(k).unwrap_or(&absent)
                    )
                })
                .collect();
            return Some(diffs.join(", "));
        }
        if self.jpeg_tables.as_ref().map(|t| &t.checksum)
            != other.jpeg_tables.as_ref().map(|t| &t.checksum)
            && self.jpeg_tables.is_some()
            && other.jpeg_tables.is_some()
        {
            return Some("the JPEG tables differ".into());
        }
        None
    }
}

fn flatten(v: &serde_json::Value) -> std::collections::BTreeMap<String, String> {
    fn go(
        prefix: &str,
        v: &serde_json::Value,
        out: &mut std::collections::BTreeMap<String, String>,
    ) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    go(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    go("", v, &mut out);
    out
}

/// Merges datasets built by separate workers (`--shard-index i --num-shards n`) into `out`:
/// checks that they were built with the same settings, copies (hard-links where possible) their
/// finished parts, then writes `samples.parquet`. Passing `out` itself as an input, or no inputs,
/// just consolidates the parts already there. Parts present in several inputs must be identical.
pub fn merge(inputs: &[PathBuf], out: &Path) -> Result<MergeSummary> {
    let out_layout = DatasetLayout::new(out);
    let mut config: Option<DatasetConfig> = out_layout
        .config_path()
        .exists()
        .then(|| out_layout.read_config())
        .transpose()?;
    let mut summary = MergeSummary::default();
    out_layout.create_dirs()?;
    for input in inputs {
        let same = input.canonicalize().ok() == out.canonicalize().ok();
        let layout = DatasetLayout::new(input);
        let theirs = layout.read_config()?;
        match &mut config {
            None => config = Some(theirs.clone()),
            Some(mine) => {
                if let Some(diff) = mine.difference(&theirs) {
                    return Err(Error::Invalid(format!(
                        "cannot merge {}: it was built with different settings ({diff}). Rebuild it with the same arguments as the others",
                        input.display()
                    )));
                }
                if mine.parts_total.is_none() {
                    mine.parts_total = theirs.parts_total;
                }
            }
        }
        if same {
            continue;
        }
        if theirs.jpeg_tables.is_some() && !out_layout.jpeg_tables_path().exists() {
            copy_file(&layout.jpeg_tables_path(), &out_layout.jpeg_tables_path())?;
        }
        for part in layout.finished_parts()? {
            let dst_manifest = out_layout.part_manifest(part);
            let src_manifest = layout.part_manifest(part);
            if dst_manifest.exists() {
                let a = std::fs::read(&src_manifest).map_err(Error::io(&src_manifest))?;
                let b = std::fs::read(&dst_manifest).map_err(Error::io(&dst_manifest))?;
                if a != b {
                    return Err(Error::Invalid(format!(
                        "part {part} exists in {} and in {} with different contents; the workers did not build from the same source. Remove one and merge again",
                        input.display(),
                        out.display()
                    )));
                }
                summary.parts_skipped += 1;
                continue;
            }
            for shard in layout.shards_of_part(part)? {
                let name = shard.file_name().unwrap_or_default();
                copy_file(&shard, &out_layout.shards_dir().join(name))?;
            }
            // The manifest goes last: it marks the part as present.
            copy_file(&src_manifest, &dst_manifest)?;
            summary.parts_copied += 1;
        }
    }
    let config = config.ok_or_else(|| {
        Error::Invalid("nothing to merge: give at least one dataset directory".into())
    })?;
    out_layout.write_config(&config)?;
    summary.parts_present = out_layout.finished_parts()?.len() as u32;
    summary.parts_total = config.parts_total;
    summary.rows = out_layout.consolidate()?;
    Ok(summary)
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergeSummary {
    pub parts_copied: u32,
    pub parts_skipped: u32,
    pub parts_present: u32,
    pub parts_total: Option<u32>,
    pub rows: u64,
}

/// Hard-links when source and destination share a file system, copies otherwise; atomic either way.
fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    let tmp = crate::tmp_path(dst);
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(src, &tmp).is_err() {
        std::fs::copy(src, &tmp).map_err(Error::io(src))?;
    }
    std::fs::rename(&tmp, dst).map_err(Error::io(dst))
}
