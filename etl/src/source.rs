//! Where inputs come from: a directory tree, a file list, webdataset `.tar` shards, or Parquet
//! files with an image-bytes column (Hugging Face layout). A source is planned into *parts* —
//! the unit of work, resume and multi-machine sharding — in a deterministic order, lazily, so
//! memory stays bounded however many inputs there are. Opening a part yields its items.
//!
//! Every kind can also live in object storage (`s3://`, `gs://`, `az://`, `http(s)://`, see
//! [`crate::objects`]): a prefix is a tree (listed in key order), an object a list, a tar or a
//! Parquet file, and a list (local or remote) may name objects by URL.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use codeclm_formats::plan::PlanRow;

use crate::objects::{self, Remote};
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
        if let Some(url) = url_of(path) {
            return Ok(SourceSpec {
                kind: detect_remote(path, url)?,
                path: path.to_path_buf(),
                column: None,
            });
        }
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

/// The URL a source path names, when it is one (`s3://...`) rather than a local path.
pub fn url_of(path: &Path) -> Option<&str> {
    path.to_str().filter(|s| objects::is_url(s))
}

fn remote_of(path: &Path, url: &str) -> Result<Remote, SourceError> {
    objects::locate(url).map_err(|e| bad(path, e.to_string()))
}

/// A name a tree walk skips: hidden, or a sidecar (captions, metadata).
fn skipped_name(name: &str) -> bool {
    name.starts_with('.')
        || matches!(lower_ext(Path::new(name)).as_deref(), Some(x) if SIDECARS.contains(&x))
}

/// [`SourceSpec::detect`] for a URL: an object is a tar, a Parquet file or a list by its name;
/// a prefix is listed up to its first media object (then it is a tree), else it is webdataset
/// or Parquet by what it holds.
fn detect_remote(path: &Path, url: &str) -> Result<SourceKind, SourceError> {
    let remote = remote_of(path, url)?;
    let ext = lower_ext(path);
    let err = |e: objects::ObjectError| {
        bad(path, format!("{e}. Fix: check the URL (bucket and prefix), the endpoint and the credentials (AWS_*, GOOGLE_*, AZURE_*)"))
    };
    let is_object =
        !remote.is_root() && !url.ends_with('/') && remote.head("").map_err(err)?.is_some();
    if is_object {
        return Ok(match ext.as_deref() {
            Some("tar") => SourceKind::Tar,
            Some("parquet") => SourceKind::Parquet,
            _ => SourceKind::List,
        });
    }
    let (mut tars, mut parquets, mut any, mut media) = (0usize, 0usize, false, false);
    for listed in remote.list() {
        let listed = listed.map_err(err)?;
        any = true;
        let name = listed.rel.rsplit('/').next().unwrap_or_default();
        match lower_ext(Path::new(name)).as_deref() {
            Some("tar") => tars += 1,
            Some("parquet") => parquets += 1,
            _ if skipped_name(name) => {}
            _ => {
                media = true;
                break;
            }
        }
    }
    if !any {
        return Err(bad(
            path,
            "no object has this name or prefix. Fix: check the URL, and that the credentials (AWS_*, GOOGLE_*, AZURE_*) may list the bucket",
        ));
    }
    Ok(if tars > 0 && !media {
        SourceKind::Tar
    } else if parquets > 0 && !media && tars == 0 {
        SourceKind::Parquet
    } else {
        SourceKind::Dir
    })
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
    /// An object in object storage, fetched by the worker (parallel GETs).
    Object(Remote),
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
    /// Objects of a remote tree (keys under `base`) or of a list (entries as written: keys
    /// relative to the list's folder, or URLs), with their listing's (size, mtime) when known.
    Objects {
        base: Remote,
        items: Vec<Entry>,
        kind: SourceKind,
    },
    /// One remote webdataset shard, streamed.
    TarObject {
        base: Remote,
        rel: String,
        stamp: Option<(u64, i64)>,
    },
    /// One remote Parquet file, a part of its own (spooled to a temporary file when built).
    ParquetObject {
        base: Remote,
        rel: String,
        column: Option<String>,
        stamp: Option<(u64, i64)>,
    },
}

/// Where a list entry is: a URL as written, else a key under the list's folder.
fn resolve(base: &Remote, entry: &str) -> Result<Remote, objects::ObjectError> {
    if objects::is_url(entry) {
        objects::locate(entry)
    } else {
        Ok(base.join(entry))
    }
}

/// (size, mtime) of objects now, in order; missing or unreadable: (0, MISSING).
fn remote_stamps(base: &Remote, entries: &[String]) -> Vec<(u64, i64)> {
    let now = |r: Result<Option<objects::Listed>, objects::ObjectError>| match r {
        Ok(Some(l)) => (l.size, l.mtime_ns),
        _ => (0, MISSING),
    };
    if entries.iter().any(|e| objects::is_url(e)) {
        return entries
            .iter()
            .map(|e| now(resolve(base, e).and_then(|r| r.head(""))))
            .collect();
    }
    base.head_many(entries).into_iter().map(now).collect()
}

/// The remote location a remote source's parts are relative to (as [`base_of`]).
fn remote_base(spec: &SourceSpec, url: &str) -> Result<Remote, SourceError> {
    let remote = remote_of(&spec.path, url)?;
    let single = match spec.kind {
        SourceKind::Dir => false,
        SourceKind::List => true,
        SourceKind::Tar => lower_ext(&spec.path).as_deref() == Some("tar"),
        SourceKind::Parquet => lower_ext(&spec.path).as_deref() == Some("parquet"),
    };
    Ok(if single { remote.parent() } else { remote })
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
            PartPlan::Objects { base, items, .. } => {
                let unknown: Vec<String> = items
                    .iter()
                    .filter(|(_, s)| s.is_none())
                    .map(|(e, _)| e.clone())
                    .collect();
                let mut heads = remote_stamps(base, &unknown).into_iter();
                items
                    .iter()
                    .map(|(entry, known)| {
                        let (bytes, mtime_ns) =
                            known.or_else(|| heads.next()).unwrap_or((0, MISSING));
                        PlanRow {
                            part,
                            video,
                            path: PathBuf::from(entry),
                            start: None,
                            len: None,
                            bytes,
                            mtime_ns,
                        }
                    })
                    .collect()
            }
            PartPlan::TarObject { base, rel, stamp }
            | PartPlan::ParquetObject {
                base, rel, stamp, ..
            } => {
                let (bytes, mtime_ns) =
                    stamp.unwrap_or_else(|| remote_stamps(base, std::slice::from_ref(rel))[0]);
                vec![PlanRow {
                    part,
                    video,
                    path: PathBuf::from(rel),
                    start: None,
                    len: None,
                    bytes,
                    mtime_ns,
                }]
            }
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
        if let Some(url) = url_of(&spec.path) {
            return from_remote_plan_rows(spec, url, rows);
        }
        let root = base_of(spec);
        for r in &rows {
            let at = root.join(&r.path);
            let now = stamp(&at);
            if now != (r.bytes, r.mtime_ns) {
                return Err(bad(&at, changed((r.bytes, r.mtime_ns), now)));
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

/// The text of a changed-input error (planned as `was`, found as `now`).
fn changed(was: (u64, i64), now: (u64, i64)) -> String {
    let was_s = if was.1 == MISSING {
        "missing at planning".to_string()
    } else {
        format!("{} bytes at planning", was.0)
    };
    let is = if now.1 == MISSING {
        "gone now".to_string()
    } else if now.0 != was.0 || was.1 == MISSING {
        format!("{} bytes now", now.0)
    } else {
        "modified since".to_string()
    };
    format!(
        "changed since the dataset was planned ({was_s}, {is}). Fix: restore it, or plan the source again into a new directory (`codeclm dataset plan ... --out NEW_DIR`): a plan is frozen so that every worker builds the same parts"
    )
}

fn from_remote_plan_rows(
    spec: &SourceSpec,
    url: &str,
    rows: Vec<PlanRow>,
) -> Result<PartPlan, SourceError> {
    let base = remote_base(spec, url)?;
    let entries: Vec<String> = rows
        .iter()
        .map(|r| r.path.to_string_lossy().to_string())
        .collect();
    for ((r, entry), now) in rows
        .iter()
        .zip(&entries)
        .zip(remote_stamps(&base, &entries))
    {
        if now != (r.bytes, r.mtime_ns) {
            let at = resolve(&base, entry)
                .map(|r| r.url().to_string())
                .unwrap_or_else(|_| entry.clone());
            return Err(bad(Path::new(&at), changed((r.bytes, r.mtime_ns), now)));
        }
    }
    let stamps: Vec<_> = rows.iter().map(|r| Some((r.bytes, r.mtime_ns))).collect();
    let one = |entries: Vec<String>| match <[String; 1]>::try_from(entries) {
        Ok([rel]) => Ok(rel),
        Err(_) => Err(bad(
            &spec.path,
            "the plan lists a part this source kind cannot have; plan it again",
        )),
    };
    Ok(match spec.kind {
        SourceKind::Dir | SourceKind::List => PartPlan::Objects {
            base,
            items: entries.into_iter().zip(stamps).collect(),
            kind: spec.kind,
        },
        SourceKind::Tar => PartPlan::TarObject {
            base,
            rel: one(entries)?,
            stamp: stamps[0],
        },
        SourceKind::Parquet => PartPlan::ParquetObject {
            base,
            rel: one(entries)?,
            column: spec.column.clone(),
            stamp: stamps[0],
        },
    })
}

/// An object of a remote part: its key or list entry, and its (size, mtime) when listed.
type Entry = (String, Option<(u64, i64)>);

/// A remote source's parts: a tree listed in key order, a list read as it streams, and one
/// part per tar or Parquet object.
fn plan_remote(
    spec: &SourceSpec,
    url: &str,
    part_size: usize,
) -> Result<Box<dyn Iterator<Item = Result<PartPlan, SourceError>>>, SourceError> {
    let base = remote_base(spec, url)?;
    let path = spec.path.clone();
    let err = move |e: objects::ObjectError| bad(&path, e.to_string());
    let chunked = |entries: Box<dyn Iterator<Item = Result<Entry, SourceError>>>,
                   base: Remote,
                   kind: SourceKind| {
        let mut entries = entries;
        std::iter::from_fn(move || {
            let mut chunk = Vec::with_capacity(part_size.min(4096));
            for e in entries.by_ref() {
                match e {
                    Ok(e) => chunk.push(e),
                    Err(e) => return Some(Err(e)),
                }
                if chunk.len() == part_size {
                    break;
                }
            }
            (!chunk.is_empty()).then(|| {
                Ok(PartPlan::Objects {
                    base: base.clone(),
                    items: std::mem::take(&mut chunk),
                    kind,
                })
            })
        })
    };
    match spec.kind {
        SourceKind::Dir => {
            let listed = base.list().filter_map(move |l| match l {
                Ok(l) if skipped_name(l.rel.rsplit('/').next().unwrap_or_default()) => None,
                Ok(l) => Some(Ok((l.rel, Some((l.size, l.mtime_ns))))),
                Err(e) => Some(Err(err(e))),
            });
            Ok(Box::new(chunked(Box::new(listed), base, SourceKind::Dir)))
        }
        SourceKind::List => {
            let list = remote_of(&spec.path, url)?;
            let reader = list.reader("").map_err(&err)?;
            let at = spec.path.clone();
            let lines = BufReader::with_capacity(1 << 20, reader)
                .lines()
                .filter_map(move |line| match line {
                    Ok(l) if l.trim().is_empty() || l.trim_start().starts_with('#') => None,
                    Ok(l) => Some(Ok((l.trim().to_string(), None))),
                    Err(e) => Some(Err(bad(&at, format!("cannot read the list: {e}")))),
                });
            Ok(Box::new(chunked(Box::new(lines), base, SourceKind::List)))
        }
        SourceKind::Tar | SourceKind::Parquet => {
            let ext = if spec.kind == SourceKind::Tar {
                "tar"
            } else {
                "parquet"
            };
            let objects: Vec<Entry> = if lower_ext(&spec.path).as_deref() == Some(ext) {
                let object = remote_of(&spec.path, url)?;
                vec![(object.name(), None)]
            } else {
                let mut found = Vec::new();
                for l in base.list() {
                    let l = l.map_err(&err)?;
                    if lower_ext(Path::new(&l.rel)).as_deref() == Some(ext) {
                        found.push((l.rel, Some((l.size, l.mtime_ns))));
                    }
                }
                if found.is_empty() {
                    return Err(bad(&spec.path, format!("no .{ext} objects found")));
                }
                found
            };
            let column = spec.column.clone();
            let tar = spec.kind == SourceKind::Tar;
            Ok(Box::new(objects.into_iter().map(move |(rel, stamp)| {
                Ok(if tar {
                    PartPlan::TarObject {
                        base: base.clone(),
                        rel,
                        stamp,
                    }
                } else {
                    PartPlan::ParquetObject {
                        base: base.clone(),
                        rel,
                        column: column.clone(),
                        stamp,
                    }
                })
            })))
        }
    }
}

/// Plans the source into parts, lazily and deterministically.
pub fn plan(
    spec: &SourceSpec,
    part_size: usize,
) -> Result<Box<dyn Iterator<Item = Result<PartPlan, SourceError>>>, SourceError> {
    let part_size = part_size.max(1);
    if let Some(url) = url_of(&spec.path) {
        return plan_remote(spec, url, part_size);
    }
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
            if let Some(url) = url_of(&p).filter(|_| kind == SourceKind::List) {
                return object_item(url.to_string(), objects::locate(url));
            }
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
        PartPlan::Objects { base, items, .. } => {
            Box::new(items.into_iter().map(move |(entry, _)| {
                let at = resolve(&base, &entry);
                object_item(entry, at)
            }))
        }
        PartPlan::TarObject { base, rel, .. } => {
            let (tx, rx) = crossbeam_channel::bounded(16);
            std::thread::spawn(move || {
                let at = base.url_of(&rel);
                match base.reader(&rel) {
                    Ok(r) => read_archive(&rel, &at, r, max_bytes, &tx),
                    Err(e) => {
                        let _ = tx.send(Item {
                            identity: format!("{rel}#"),
                            kind: "tar",
                            ext: None,
                            payload: Payload::Failed(format!("cannot open {at}: {e}")),
                        });
                    }
                }
            });
            Box::new(TarItems { rx })
        }
        PartPlan::ParquetObject {
            base, rel, column, ..
        } => {
            let mut items = ParquetItems::new(Path::new(""), Path::new(&rel), column, 0, 0);
            items.fetch = Some(base.join(&rel));
            Box::new(items)
        }
    }
}

/// An object as an input: fetched by the worker; identity as the listing or the list names it.
fn object_item(identity: String, at: Result<Remote, objects::ObjectError>) -> Item {
    Item {
        ext: lower_ext(Path::new(&identity)),
        payload: match at {
            Ok(remote) => Payload::Object(remote),
            Err(e) => Payload::Failed(e.to_string()),
        },
        identity,
        kind: "file",
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
    read_archive(name, &file.display().to_string(), f, max_bytes, tx);
}

/// The samples of one tar archive read front to back from `r` (`at` names it in messages).
fn read_archive(
    name: &str,
    at: &str,
    r: impl Read,
    max_bytes: u64,
    tx: &crossbeam_channel::Sender<Item>,
) {
    let failed = |key: &str, message: String| Item {
        identity: format!("{name}#{key}"),
        kind: "tar",
        ext: None,
        payload: Payload::Failed(message),
    };
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, r));
    let entries = match archive.entries() {
        Ok(e) => e,
        Err(e) => {
            let _ = tx.send(failed(
                "",
                format!("{at} is not a readable tar archive: {e}"),
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
                    format!("tar archive {at} is damaged after member {last_key:?}: {e}"),
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
    /// The file as messages name it (its path, or its URL when it is remote).
    shown: String,
    /// A remote file not fetched yet: spooled whole to a temporary file on the first read
    /// (polars reads a non-file source whole into memory; a spool keeps memory at a batch).
    fetch: Option<Remote>,
    spool: Option<tempfile::NamedTempFile>,
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
            shown: file.display().to_string(),
            fetch: None,
            spool: None,
        }
    }

    /// Downloads the remote file and takes all its rows as this part.
    fn spool(&mut self, remote: Remote) -> Result<(), String> {
        self.shown = remote.url().to_string();
        let mut spool = tempfile::NamedTempFile::new().map_err(|e| {
            format!(
                "cannot create a temporary file for {} ({e}); set TMPDIR to a writable disk",
                self.shown
            )
        })?;
        let mut reader = remote.reader("").map_err(|e| e.to_string())?;
        std::io::copy(&mut reader, spool.as_file_mut()).map_err(|e| {
            format!(
                "cannot download {} to {} ({e}); check TMPDIR's free space",
                self.shown,
                spool.path().display()
            )
        })?;
        let rows = File::open(spool.path())
            .map_err(|e| e.to_string())
            .and_then(|f| ParquetReader::new(f).num_rows().map_err(|e| e.to_string()))
            .map_err(|e| format!("cannot read the Parquet metadata of {}: {e}", self.shown))?;
        self.file = spool.path().to_path_buf();
        self.spool = Some(spool);
        self.end = self.next_row + rows;
        Ok(())
    }

    fn read_batch(&mut self) -> Result<Vec<Item>, String> {
        let f = File::open(&self.file).map_err(|e| format!("cannot open {}: {e}", self.shown))?;
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
                        format!("{}: no image column found (a struct with a `bytes` field, or a binary column); name it with --image-column", self.shown)
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
                    self.shown
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
        if let Some(remote) = self.fetch.take() {
            if let Err(message) = self.spool(remote) {
                self.failed = true;
                return Some(Item {
                    identity: format!("{}#", self.name),
                    kind: "parquet",
                    ext: None,
                    payload: Payload::Failed(message),
                });
            }
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
