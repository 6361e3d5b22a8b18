//! Where inputs come from: a directory tree, a file list, webdataset `.tar` shards, or Parquet
//! files with an image-bytes column (Hugging Face layout). A source is planned into *parts* —
//! the unit of work, resume and multi-machine sharding — in a deterministic order, lazily, so
//! memory stays bounded however many inputs there are. Opening a part yields its items.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use codeclm_formats::plan::PlanRow;
use polars::prelude::*;
use serde::{Deserialize, Serialize};

/// What kind of source a path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A directory tree of media files, walked recursively in sorted order.
    Dir,
    /// A text file with one path per line (relative paths are relative to the list's folder).
    List,
    /// webdataset shards: one `.tar` file, or a directory of them (img2dataset output).
    Tar,
    /// Parquet files with an image column (`{bytes, path}` struct or binary): one file or a directory.
    Parquet,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceSpec {
    pub kind: SourceKind,
    pub path: PathBuf,
    /// Parquet only: the image column (default: the first `{bytes, ...}` struct or binary column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source {path}: {message}")]
    Bad { path: PathBuf, message: String },
}

fn bad(path: &Path, message: impl Into<String>) -> SourceError {
    SourceError::Bad {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// File extensions of sidecar files that a directory walk skips (webdataset/img2dataset keep
/// captions and metadata next to the images).
const SIDECARS: &[&str] = &[
    "json", "txt", "md", "csv", "tsv", "parquet", "yaml", "yml", "xml", "py", "sh", "toml", "html",
    "htm",
];
/// webdataset member extensions that hold an image or a video (video2dataset writes `.mp4`).
const TAR_IMAGE_EXTS: &[&str] = &[
    "jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm", "tga", "avif", "heic",
    "jxl", "mp4", "m4v", "mov", "mkv", "webm", "avi", "mpg", "mpeg", "ts", "flv",
];

impl SourceSpec {
    /// Works out the kind from the path: `.tar` or a directory of them is webdataset, `.parquet`
    /// or a directory of them is Parquet, another regular file is a list, any other directory a tree.
    pub fn detect(path: &Path) -> Result<SourceSpec, SourceError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| bad(path, format!("cannot read it ({e}); check the path")))?;
        let ext = |p: &Path| {
            p.extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
        };
        let kind = if meta.is_file() {
            match ext(path).as_deref() {
                Some("tar") => SourceKind::Tar,
                Some("parquet") => SourceKind::Parquet,
                _ => SourceKind::List,
            }
        } else {
            // One pass over the top level, stopping at the first media file (then it is a
            // tree): a flat directory of millions of files is neither collected nor stat'ed.
            let (mut tars, mut parquets) = (0usize, 0usize);
            let mut media = false;
            let entries =
                std::fs::read_dir(path).map_err(|e| bad(path, format!("cannot list it: {e}")))?;
            for e in entries.flatten() {
                let is_file = match e.file_type() {
                    Ok(t) if t.is_symlink() => e.path().is_file(),
                    Ok(t) => t.is_file(),
                    Err(_) => false,
                };
                if !is_file {
                    continue;
                }
                match ext(&e.path()).as_deref() {
                    Some("tar") => tars += 1,
                    Some("parquet") => parquets += 1,
                    Some(x) if SIDECARS.contains(&x) => {}
                    _ => {
                        media = true;
                        break;
                    }
                }
            }
            if tars > 0 && !media {
                SourceKind::Tar
            } else if parquets > 0 && !media && tars == 0 {
                SourceKind::Parquet
            } else {
                SourceKind::Dir
            }
        };
        Ok(SourceSpec {
            kind,
            path: path.to_path_buf(),
            column: None,
        })
    }
}

/// One input: its identity (stable across runs and machines) and how to get its bytes.
#[derive(Debug)]
pub struct Item {
    /// Path relative to the source root, `shard.tar#key`, or `file.parquet#row`.
    pub identity: String,
    pub kind: &'static str,
    /// File extension, lower case, when there is one (names formats that have no signature).
    pub ext: Option<String>,
    pub payload: Payload,
}

#[derive(Debug)]
pub enum Payload {
    /// Read by the worker (parallel I/O for directory sources).
    File(PathBuf),
    Bytes(Vec<u8>),
    /// The source itself failed for this input (unreadable archive member, bad row).
    Failed(String),
    /// An archive member over the size cap, not read: its size.
    Oversized(u64),
}

/// A planned part: cheap to hold (at most `part_size` paths), opened only if it must be built.
#[derive(Clone, Debug)]
pub enum PartPlan {
    Files {
        root: PathBuf,
        paths: Vec<PathBuf>,
        kind: SourceKind,
    },
    Tar {
        root: PathBuf,
        file: PathBuf,
    },
    ParquetRows {
        root: PathBuf,
        file: PathBuf,
        column: Option<String>,
        start: usize,
        len: usize,
    },
}

fn lower_ext(p: &Path) -> Option<String> {
    p.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
}

fn rel_identity(root: &Path, p: &Path) -> String {
    p.strip_prefix(root)
        .unwrap_or(p)
        .to_string_lossy()
        .replace('\\', "/")
}

/// The directory a source's parts are relative to: the tree itself, or the folder of a list,
/// of a single tar or of a single Parquet file.
fn base_of(spec: &SourceSpec) -> PathBuf {
    let root = &spec.path;
    match spec.kind {
        SourceKind::Dir => root.clone(),
        SourceKind::List => root.parent().map(Path::to_path_buf).unwrap_or_default(),
        SourceKind::Tar | SourceKind::Parquet if root.is_dir() => root.clone(),
        SourceKind::Tar | SourceKind::Parquet => {
            root.parent().map(Path::to_path_buf).unwrap_or_default()
        }
    }
}

/// `mtime_ns` of an input missing at planning (a list entry naming no file).
const MISSING: i64 = i64::MIN;

/// (size, modification time in ns) of `path` now, following symlinks; missing: (0, MISSING).
fn stamp(path: &Path) -> (u64, i64) {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => (
            m.len(),
            m.mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(m.mtime_nsec()),
        ),
        Err(_) => (0, MISSING),
    }
}

impl PartPlan {
    /// This part as rows of a frozen plan, each input's size and modification time as now.
    pub fn to_plan_rows(&self, part: u32, video: bool) -> Vec<PlanRow> {
        let row = |path: &Path, at: &Path, start: Option<u64>, len: Option<u64>| {
            let (bytes, mtime_ns) = stamp(at);
            PlanRow {
                part,
                video,
                path: path.to_path_buf(),
                start,
                len,
                bytes,
                mtime_ns,
            }
        };
        // Stored relative to the source's root (a plan stays valid where the source is mounted
        // elsewhere, as long as its path in plan.json is the same); a list's entries as written.
        let rel = |root: &Path, p: &Path| p.strip_prefix(root).unwrap_or(p).to_path_buf();
        match self {
            PartPlan::Files { root, paths, kind } => paths
                .iter()
                .map(|p| {
                    let stored = if *kind == SourceKind::List {
                        p.clone()
                    } else {
                        rel(root, p)
                    };
                    row(&stored, &root.join(p), None, None)
                })
                .collect(),
            PartPlan::Tar { root, file } => vec![row(&rel(root, file), file, None, None)],
            PartPlan::ParquetRows {
                root,
                file,
                start,
                len,
                ..
            } => vec![row(
                &rel(root, file),
                file,
                Some(*start as u64),
                Some(*len as u64),
            )],
        }
    }

    /// The part a frozen plan lists for `spec`, after checking that every input is as it was
    /// at planning (size and modification time): a changed source is an error naming the fix.
    pub fn from_plan_rows(spec: &SourceSpec, rows: Vec<PlanRow>) -> Result<PartPlan, SourceError> {
        let root = base_of(spec);
        for r in &rows {
            let at = root.join(&r.path);
            let now = stamp(&at);
            if now != (r.bytes, r.mtime_ns) {
                let was = if r.mtime_ns == MISSING {
                    "missing at planning".to_string()
                } else {
                    format!("{} bytes at planning", r.bytes)
                };
                let is = if now.1 == MISSING {
                    "gone now".to_string()
                } else if now.0 != r.bytes || r.mtime_ns == MISSING {
                    format!("{} bytes now", now.0)
                } else {
                    "modified since".to_string()
                };
                return Err(bad(
                    &at,
                    format!(
                        "changed since the dataset was planned ({was}, {is}). Fix: restore it, or plan the source again into a new directory (`codeclm dataset plan ... --out NEW_DIR`): a plan is frozen so that every worker builds the same parts"
                    ),
                ));
            }
        }
        let malformed = || {
            bad(
                &spec.path,
                "the plan lists a part this source kind cannot have; plan it again",
            )
        };
        Ok(match spec.kind {
            SourceKind::List => PartPlan::Files {
                root,
                paths: rows.into_iter().map(|r| r.path).collect(),
                kind: spec.kind,
            },
            SourceKind::Dir => PartPlan::Files {
                paths: rows.into_iter().map(|r| root.join(r.path)).collect(),
                root,
                kind: spec.kind,
            },
            SourceKind::Tar => match <[PlanRow; 1]>::try_from(rows) {
                Ok([r]) => PartPlan::Tar {
                    file: root.join(r.path),
                    root,
                },
                Err(_) => return Err(malformed()),
            },
            SourceKind::Parquet => match <[PlanRow; 1]>::try_from(rows) {
                Ok([r]) => PartPlan::ParquetRows {
                    file: root.join(r.path),
                    root,
                    column: spec.column.clone(),
                    start: r.start.unwrap_or(0) as usize,
                    len: r.len.unwrap_or(0) as usize,
                },
                Err(_) => return Err(malformed()),
            },
        })
    }
}

/// Plans the source into parts, lazily and deterministically.
pub fn plan(
    spec: &SourceSpec,
    part_size: usize,
) -> Result<Box<dyn Iterator<Item = Result<PartPlan, SourceError>>>, SourceError> {
    let part_size = part_size.max(1);
    let root = spec.path.clone();
    match spec.kind {
        SourceKind::Dir => {
            // Sorted in bounded memory (a flat directory of millions of files is merged from
            // sorted runs on disk, not listed into memory).
            let files = crate::walk::SortedWalk::new(&root).filter_map(|w| match w {
                crate::walk::Walked::File(p) => {
                    let name = p.file_name().unwrap_or_default().to_string_lossy();
                    let hidden = name.starts_with('.');
                    let sidecar =
                        matches!(lower_ext(&p).as_deref(), Some(x) if SIDECARS.contains(&x));
                    (!hidden && !sidecar).then_some(Ok(p))
                }
                // An unreadable directory or a symlink loop: the path becomes an input whose
                // read fails, so the manifest records the error and the build goes on.
                crate::walk::Walked::Unwalkable(p, e) => {
                    tracing::warn!("{}: {e}", p.display());
                    Some(Ok(p))
                }
            });
            Ok(Box::new(chunk_paths(
                files,
                part_size,
                root,
                SourceKind::Dir,
            )))
        }
        SourceKind::List => {
            let file =
                File::open(&root).map_err(|e| bad(&root, format!("cannot open the list: {e}")))?;
            let base = base_of(spec);
            let list = root.clone();
            let lines = BufReader::new(file)
                .lines()
                .filter_map(move |line| match line {
                    Ok(l) if l.trim().is_empty() || l.trim_start().starts_with('#') => None,
                    Ok(l) => Some(Ok(PathBuf::from(l.trim()))),
                    Err(e) => Some(Err(bad(&list, format!("cannot read the list: {e}")))),
                });
            Ok(Box::new(chunk_paths(
                lines,
                part_size,
                base,
                SourceKind::List,
            )))
        }
        SourceKind::Tar => {
            let files = files_with_ext(&root, "tar")?;
            let base = base_of(spec);
            Ok(Box::new(files.into_iter().map(move |file| {
                Ok(PartPlan::Tar {
                    root: base.clone(),
                    file,
                })
            })))
        }
        SourceKind::Parquet => {
            let files = files_with_ext(&root, "parquet")?;
            let base = base_of(spec);
            let column = spec.column.clone();
            let mut plans = Vec::new();
            for file in files {
                let rows = File::open(&file)
                    .map_err(|e| e.to_string())
                    .and_then(|f| ParquetReader::new(f).num_rows().map_err(|e| e.to_string()))
                    .map_err(|e| bad(&file, format!("cannot read its Parquet metadata: {e}")))?;
                let mut start = 0;
                while start < rows || (rows == 0 && start == 0) {
                    let len = part_size.min(rows - start);
                    plans.push(Ok(PartPlan::ParquetRows {
                        root: base.clone(),
                        file: file.clone(),
                        column: column.clone(),
                        start,
                        len,
                    }));
                    if rows == 0 {
                        break;
                    }
                    start += len;
                }
            }
            Ok(Box::new(plans.into_iter()))
        }
    }
}

fn files_with_ext(root: &Path, ext: &str) -> Result<Vec<PathBuf>, SourceError> {
    if root.is_file() {
        return Ok(vec![root.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = walkdir::WalkDir::new(root)
        .sort_by_file_name()
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file() && lower_ext(e.path()).as_deref() == Some(ext))
        .map(|e| e.into_path())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(bad(root, format!("no .{ext} files found")));
    }
    Ok(files)
}

fn chunk_paths(
    mut paths: impl Iterator<Item = Result<PathBuf, SourceError>>,
    part_size: usize,
    root: PathBuf,
    kind: SourceKind,
) -> impl Iterator<Item = Result<PartPlan, SourceError>> {
    std::iter::from_fn(move || {
        let mut chunk = Vec::with_capacity(part_size.min(4096));
        for p in paths.by_ref() {
            match p {
                Ok(p) => chunk.push(p),
                Err(e) => return Some(Err(e)),
            }
            if chunk.len() == part_size {
                break;
            }
        }
        (!chunk.is_empty()).then(|| {
            Ok(PartPlan::Files {
                root: root.clone(),
                paths: std::mem::take(&mut chunk),
                kind,
            })
        })
    })
}

/// Opens a planned part and yields its items in order.
/// The inputs of one part. Archive members larger than `max_bytes` are not read: they come as
/// [`Payload::Oversized`] (their size known from the archive's header).
pub fn open(plan: PartPlan, max_bytes: u64) -> Box<dyn Iterator<Item = Item> + Send> {
    match plan {
        PartPlan::Files { root, paths, kind } => Box::new(paths.into_iter().map(move |p| {
            let (identity, path) = match kind {
                SourceKind::List => (
                    p.to_string_lossy().to_string(),
                    if p.is_absolute() {
                        p.clone()
                    } else {
                        root.join(&p)
                    },
                ),
                _ => (rel_identity(&root, &p), p.clone()),
            };
            Item {
                identity,
                kind: "file",
                ext: lower_ext(&path),
                payload: Payload::File(path),
            }
        })),
        PartPlan::Tar { root, file } => Box::new(TarItems::open(&root, &file, max_bytes)),
        PartPlan::ParquetRows {
            root,
            file,
            column,
            start,
            len,
        } => Box::new(ParquetItems::new(&root, &file, column, start, len)),
    }
}

/// Streams the images of one webdataset shard: members grouped by key (the member path up to
/// the first `.` of its file name); the first image member of each key is the sample. A reader
/// thread walks the archive and hands items over a small bounded channel, so memory stays at a
/// few images however large the shard is.
struct TarItems {
    rx: crossbeam_channel::Receiver<Item>,
}

impl TarItems {
    fn open(root: &Path, file: &Path, max_bytes: u64) -> TarItems {
        let name = rel_identity(root, file);
        let file = file.to_path_buf();
        let (tx, rx) = crossbeam_channel::bounded(16);
        std::thread::spawn(move || read_tar(&name, &file, max_bytes, &tx));
        TarItems { rx }
    }
}

fn read_tar(name: &str, file: &Path, max_bytes: u64, tx: &crossbeam_channel::Sender<Item>) {
    let failed = |key: &str, message: String| Item {
        identity: format!("{name}#{key}"),
        kind: "tar",
        ext: None,
        payload: Payload::Failed(message),
    };
    let f = match File::open(file) {
        Ok(f) => f,
        Err(e) => {
            let _ = tx.send(failed("", format!("cannot open {}: {e}", file.display())));
            return;
        }
    };
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, f));
    let entries = match archive.entries() {
        Ok(e) => e,
        Err(e) => {
            let _ = tx.send(failed(
                "",
                format!("{} is not a readable tar archive: {e}", file.display()),
            ));
            return;
        }
    };
    let mut seen = std::collections::HashSet::new();
    let mut last_key = String::new();
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let _ = tx.send(failed(
                    &format!("{last_key}~damaged"),
                    format!(
                        "tar archive {} is damaged after member {last_key:?}: {e}",
                        file.display()
                    ),
                ));
                return;
            }
        };
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let Ok(path) = entry.path().map(|p| p.to_string_lossy().to_string()) else {
            continue;
        };
        let (dir, base) = match path.rsplit_once('/') {
            Some((d, b)) => (format!("{d}/"), b.to_string()),
            None => (String::new(), path.clone()),
        };
        let Some((stem, ext)) = base.split_once('.') else {
            continue;
        };
        let ext = ext.rsplit('.').next().unwrap_or(ext).to_ascii_lowercase();
        if !TAR_IMAGE_EXTS.contains(&ext.as_str()) {
            continue;
        }
        let key = format!("{dir}{stem}");
        last_key = key.clone();
        if !seen.insert(key.clone()) {
            continue;
        }
        let size = entry.size();
        let payload = if size > max_bytes {
            Payload::Oversized(size) // skipped unread when the archive moves on
        } else {
            let mut bytes = Vec::with_capacity(size.min(1 << 30) as usize);
            match entry.read_to_end(&mut bytes) {
                Ok(_) => Payload::Bytes(bytes),
                Err(e) => Payload::Failed(format!("cannot read tar member {path}: {e}")),
            }
        };
        if tx
            .send(Item {
                identity: format!("{name}#{key}"),
                kind: "tar",
                ext: Some(ext),
                payload,
            })
            .is_err()
        {
            return; // the consumer stopped
        }
    }
}

impl Iterator for TarItems {
    type Item = Item;
    fn next(&mut self) -> Option<Item> {
        self.rx.recv().ok()
    }
}

/// Streams rows `[start, start + len)` of a Parquet file's image column, a few hundred at a time.
struct ParquetItems {
    name: String,
    file: PathBuf,
    column: Option<String>,
    next_row: usize,
    end: usize,
    buffer: std::vec::IntoIter<Item>,
    failed: bool,
    /// The file's footer and image column, read with the first batch (not once per batch).
    footer: Option<(polars::io::parquet::metadata::FileMetadataRef, String)>,
}

const PARQUET_BATCH: usize = 256;

impl ParquetItems {
    fn new(
        root: &Path,
        file: &Path,
        column: Option<String>,
        start: usize,
        len: usize,
    ) -> ParquetItems {
        ParquetItems {
            name: rel_identity(root, file),
            file: file.to_path_buf(),
            column,
            next_row: start,
            end: start + len,
            buffer: Vec::new().into_iter(),
            failed: false,
            footer: None,
        }
    }

    fn read_batch(&mut self) -> Result<Vec<Item>, String> {
        let f = File::open(&self.file)
            .map_err(|e| format!("cannot open {}: {e}", self.file.display()))?;
        let mut reader = ParquetReader::new(f);
        let column = match &self.footer {
            Some((metadata, column)) => {
                reader.set_metadata(metadata.clone());
                column.clone()
            }
            None => {
                let schema = reader.schema().map_err(|e| e.to_string())?;
                let column = match &self.column {
                    Some(c) => c.clone(),
                    None => pick_image_column(&schema).ok_or_else(|| {
                        format!("{}: no image column found (a struct with a `bytes` field, or a binary column); name it with --image-column", self.file.display())
                    })?,
                };
                let metadata = reader.get_metadata().map_err(|e| e.to_string())?.clone();
                self.footer = Some((metadata, column.clone()));
                column
            }
        };
        let n = PARQUET_BATCH.min(self.end - self.next_row);
        let df = reader
            .with_columns(Some(vec![column.clone()]))
            .with_slice(Some((self.next_row, n)))
            .finish()
            .map_err(|e| {
                format!(
                    "cannot read rows {}..{} of {}: {e}",
                    self.next_row,
                    self.next_row + n,
                    self.file.display()
                )
            })?;
        let col = df.column(&column).map_err(|e| e.to_string())?;
        let binary = match col.dtype() {
            DataType::Struct(_) => col
                .struct_()
                .and_then(|s| s.field_by_name("bytes"))
                .and_then(|s| s.binary().cloned())
                .map_err(|e| format!("column {column}: {e}"))?,
            DataType::Binary => col.binary().map_err(|e| e.to_string())?.clone(),
            other => return Err(format!("column {column} has type {other}, expected binary or a struct with `bytes`; name another with --image-column")),
        };
        let items = (0..df.height())
            .map(|i| {
                let row = self.next_row + i;
                let payload = match binary.get(i) {
                    Some(b) => Payload::Bytes(b.to_vec()),
                    None => Payload::Failed(format!("row {row} has no image bytes (null)")),
                };
                Item {
                    identity: format!("{}#{row}", self.name),
                    kind: "parquet",
                    ext: None,
                    payload,
                }
            })
            .collect();
        self.next_row += n;
        Ok(items)
    }
}

/// The first column that looks like Hugging Face's image feature (`{bytes, path}`) or raw bytes.
fn pick_image_column(schema: &ArrowSchema) -> Option<String> {
    use polars::prelude::ArrowDataType as A;
    let has_bytes = |dt: &A| match dt {
        A::Struct(fields) => fields.iter().any(|f| {
            f.name.as_str() == "bytes"
                && matches!(f.dtype, A::Binary | A::LargeBinary | A::BinaryView)
        }),
        A::Binary | A::LargeBinary | A::BinaryView => true,
        _ => false,
    };
    schema
        .iter()
        .find(|(_, f)| has_bytes(&f.dtype))
        .map(|(name, _)| name.to_string())
}

impl Iterator for ParquetItems {
    type Item = Item;
    fn next(&mut self) -> Option<Item> {
        if let Some(item) = self.buffer.next() {
            return Some(item);
        }
        if self.failed || self.next_row >= self.end {
            return None;
        }
        match self.read_batch() {
            Ok(items) => {
                self.buffer = items.into_iter();
                self.buffer.next()
            }
            Err(message) => {
                // One row for the rest of the part: the run goes on with the next part.
                self.failed = true;
                Some(Item {
                    identity: format!("{}#{}-{}", self.name, self.next_row, self.end),
                    kind: "parquet",
                    ext: None,
                    payload: Payload::Failed(message),
                })
            }
        }
    }
}
