//! The frozen plan of a build (`codeclm dataset plan`): every part and its inputs, listed once,
//! so that workers read their slice instead of each re-planning the source.
//!
//! - `plan.parquet`: one row per input of a file part (directory or file list), one row per part
//!   of a webdataset tar (the tar) or Parquet source (the file and its row range); columns `part`
//!   (u32), `video` (bool: which source), `path` (binary: the path as planned, exact bytes),
//!   `start`, `len` (u64, Parquet row ranges, else null), `bytes` and `mtime_ns` (the input's size
//!   and modification time at planning, to refuse a source that changed since). Rows are in part
//!   order.
//! - `plan.json`: the sources, the part size, counts, and `hash` (xxh3-64 of `plan.parquet`'s
//!   bytes), which the build records in `dataset.json`.

use std::fs::File;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use polars::io::parquet::metadata::FileMetadataRef;
use polars::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const PLAN_VERSION: u32 = 1;

/// Rows of `plan.parquet` buffered before a row group is written, and read at a time.
const ROWS_PER_BATCH: usize = 1 << 16;

/// One row of `plan.parquet`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanRow {
    pub part: u32,
    pub video: bool,
    pub path: PathBuf,
    pub start: Option<u64>,
    pub len: Option<u64>,
    pub bytes: u64,
    pub mtime_ns: i64,
}

/// `plan.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanHeader {
    pub plan_version: u32,
    /// The sources as `dataset build` records them (`etl`'s `SourceSpec`), images first.
    pub sources: Vec<serde_json::Value>,
    pub part_size: usize,
    pub parts: u32,
    /// Rows of `plan.parquet`.
    pub rows: u64,
    /// Inputs planned (for tar and Parquet parts: files and row ranges, not their members).
    pub inputs: u64,
    /// xxh3-64 of `plan.parquet`, 16 hex digits.
    pub hash: String,
    pub created_by: String,
}

pub fn header_path(root: &Path) -> PathBuf {
    root.join("plan.json")
}

pub fn rows_path(root: &Path) -> PathBuf {
    root.join("plan.parquet")
}

fn corrupt(path: &Path) -> impl Fn(PolarsError) -> Error + '_ {
    move |e| Error::Corrupt {
        path: path.to_path_buf(),
        what: "plan",
        problem: e.to_string(),
        fix: "plan the source again with `codeclm dataset plan` into a new directory".into(),
    }
}

fn to_dataframe(rows: &[PlanRow]) -> Result<DataFrame> {
    use std::os::unix::ffi::OsStrExt;
    let paths: Vec<&[u8]> = rows.iter().map(|r| r.path.as_os_str().as_bytes()).collect();
    let columns = vec![
        Column::new(
            "part".into(),
            rows.iter().map(|r| r.part).collect::<Vec<_>>(),
        ),
        Column::new(
            "video".into(),
            rows.iter().map(|r| r.video).collect::<Vec<_>>(),
        ),
        Column::new("path".into(), paths),
        Column::new(
            "start".into(),
            rows.iter().map(|r| r.start).collect::<Vec<_>>(),
        ),
        Column::new("len".into(), rows.iter().map(|r| r.len).collect::<Vec<_>>()),
        Column::new(
            "bytes".into(),
            rows.iter().map(|r| r.bytes).collect::<Vec<_>>(),
        ),
        Column::new(
            "mtime_ns".into(),
            rows.iter().map(|r| r.mtime_ns).collect::<Vec<_>>(),
        ),
    ];
    DataFrame::new(rows.len(), columns)
        .map_err(|e| Error::Invalid(format!("building the plan table: {e}")))
}

/// Writes `plan.parquet` a row group at a time, then `plan.json` (last: its presence means the
/// plan is whole). Rows must come in part order.
pub struct PlanWriter {
    root: PathBuf,
    tmp: PathBuf,
    writer: BatchedWriter<File>,
    buffer: Vec<PlanRow>,
    rows: u64,
    last_part: Option<u32>,
}

impl PlanWriter {
    pub fn create(root: &Path) -> Result<PlanWriter> {
        let path = rows_path(root);
        let tmp = crate::tmp_path(&path);
        let file = File::create(&tmp).map_err(Error::io(&tmp))?;
        let schema = to_dataframe(&[])?.schema().as_ref().clone();
        let writer = crate::samples::parquet_writer(file)
            .batched(&schema)
            .map_err(Error::parquet(&tmp))?;
        Ok(PlanWriter {
            root: root.to_path_buf(),
            tmp,
            writer,
            buffer: Vec::with_capacity(ROWS_PER_BATCH),
            rows: 0,
            last_part: None,
        })
    }

    pub fn push(&mut self, row: PlanRow) -> Result<()> {
        if self.last_part.is_some_and(|p| row.part < p) {
            return Err(Error::Invalid(format!(
                "plan rows out of part order: part {} after {:?}",
                row.part, self.last_part
            )));
        }
        self.last_part = Some(row.part);
        self.buffer.push(row);
        self.rows += 1;
        if self.buffer.len() >= ROWS_PER_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let df = to_dataframe(&self.buffer)?;
        self.writer
            .write_batch(&df)
            .map_err(Error::parquet(&self.tmp))?;
        self.buffer.clear();
        Ok(())
    }

    /// Finishes `plan.parquet`, hashes it, writes `plan.json` with `header`'s other fields.
    pub fn finish(mut self, mut header: PlanHeader) -> Result<PlanHeader> {
        self.flush()?;
        self.writer.finish().map_err(Error::parquet(&self.tmp))?;
        let path = rows_path(&self.root);
        crate::samples::sync_and_rename(&self.tmp, &path)?;
        header.rows = self.rows;
        header.parts = self.last_part.map_or(0, |p| p + 1);
        header.hash = format!("{:016x}", hash_file(&path)?);
        header.plan_version = PLAN_VERSION;
        let json = serde_json::to_vec_pretty(&header)
            .map_err(|e| Error::Invalid(format!("serializing plan.json: {e}")))?;
        crate::write_atomic(&header_path(&self.root), &json)?;
        Ok(header)
    }
}

fn hash_file(path: &Path) -> Result<u64> {
    use std::io::Read;
    let mut f = File::open(path).map_err(Error::io(path))?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(Error::io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.digest())
}

/// A frozen plan opened for reading.
pub struct Plan {
    pub header: PlanHeader,
    path: PathBuf,
    metadata: FileMetadataRef,
}

impl Plan {
    /// The plan in `root`, if there is one (`plan.json` present). `plan.parquet` must hash to
    /// what `plan.json` says.
    pub fn open(root: &Path) -> Result<Option<Plan>> {
        let hp = header_path(root);
        let bytes = match std::fs::read(&hp) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&hp)(e)),
        };
        let header: PlanHeader = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
            path: hp.clone(),
            what: "plan header",
            problem: e.to_string(),
            fix: "plan the source again with `codeclm dataset plan` into a new directory".into(),
        })?;
        if header.plan_version != PLAN_VERSION {
            return Err(Error::OldVersion {
                path: hp,
                what: "plan",
                found: header.plan_version,
                want: PLAN_VERSION,
                fix: "plan the source again with this codeclm version (`codeclm dataset plan`)"
                    .into(),
            });
        }
        let path = rows_path(root);
        let hash = format!("{:016x}", hash_file(&path)?);
        if hash != header.hash {
            return Err(Error::Corrupt {
                path,
                what: "plan",
                problem: format!("it hashes {hash}, plan.json says {}", header.hash),
                fix: "the plan was changed or damaged after planning; plan the source again with `codeclm dataset plan` into a new directory".into(),
            });
        }
        let file = File::open(&path).map_err(Error::io(&path))?;
        let metadata = ParquetReader::new(file)
            .get_metadata()
            .map_err(corrupt(&path))?
            .clone();
        Ok(Some(Plan {
            header,
            path,
            metadata,
        }))
    }

    fn read(&self, start: usize, len: usize, columns: Option<&[&str]>) -> Result<DataFrame> {
        let bad = corrupt(&self.path);
        crate::rows::read_slice(&self.path, &self.metadata, columns, (start, len), &bad)
    }

    /// The row range of every part `owns` keeps, from one scan of the `part` column.
    fn ranges(&self, owns: &dyn Fn(u32) -> bool) -> Result<Vec<(u32, usize, usize)>> {
        let total = self.metadata.num_rows;
        let mut out: Vec<(u32, usize, usize)> = Vec::new();
        let mut at = 0;
        while at < total {
            let df = self.read(at, ROWS_PER_BATCH, Some(&["part"]))?;
            if df.height() == 0 {
                break;
            }
            let parts = df
                .column("part")
                .and_then(|c| c.u32().cloned())
                .map_err(corrupt(&self.path))?;
            for (i, p) in parts.iter().enumerate() {
                let (p, row) = (p.unwrap_or_default(), at + i);
                match out.last_mut() {
                    Some((q, _, end)) if *q == p && *end == row => *end = row + 1,
                    _ if owns(p) => out.push((p, row, row + 1)),
                    _ => {}
                }
            }
            at += df.height();
        }
        Ok(out)
    }

    /// The rows of every part `owns` keeps, part by part in order, read as the iterator is
    /// advanced (one part's rows in memory); the `part` column is scanned once here.
    pub fn parts(&self, owns: &dyn Fn(u32) -> bool) -> Result<PlanParts<'_>> {
        Ok(PlanParts {
            plan: self,
            ranges: self.ranges(owns)?.into_iter(),
        })
    }

    /// Calls `f` with the rows of every part `owns` keeps, in order, until it breaks.
    pub fn for_each_part<E: From<Error>>(
        &self,
        owns: &dyn Fn(u32) -> bool,
        mut f: impl FnMut(u32, Vec<PlanRow>) -> std::result::Result<ControlFlow<()>, E>,
    ) -> std::result::Result<(), E> {
        for next in self.parts(owns)? {
            let (part, rows) = next?;
            if f(part, rows)?.is_break() {
                break;
            }
        }
        Ok(())
    }

    fn part_rows(&self, part: u32, start: usize, end: usize) -> Result<Vec<PlanRow>> {
        use std::os::unix::ffi::OsStrExt;
        let mut rows = Vec::with_capacity(end - start);
        let mut at = start;
        while at < end {
            let df = self.read(at, (end - at).min(ROWS_PER_BATCH), None)?;
            if df.height() == 0 {
                break;
            }
            let bad = corrupt(&self.path);
            let c = |n: &str| df.column(n).map_err(&bad);
            let (video, path) = (
                c("video")?.bool().map_err(&bad)?,
                c("path")?.binary().map_err(&bad)?,
            );
            let (start, len) = (
                c("start")?.u64().map_err(&bad)?,
                c("len")?.u64().map_err(&bad)?,
            );
            let (bytes, mtime) = (
                c("bytes")?.u64().map_err(&bad)?,
                c("mtime_ns")?.i64().map_err(&bad)?,
            );
            for i in 0..df.height() {
                rows.push(PlanRow {
                    part,
                    video: video.get(i).unwrap_or(false),
                    path: PathBuf::from(std::ffi::OsStr::from_bytes(
                        path.get(i).unwrap_or_default(),
                    )),
                    start: start.get(i),
                    len: len.get(i),
                    bytes: bytes.get(i).unwrap_or_default(),
                    mtime_ns: mtime.get(i).unwrap_or_default(),
                });
            }
            at += df.height();
        }
        Ok(rows)
    }
}

/// [`Plan::parts`].
pub struct PlanParts<'a> {
    plan: &'a Plan,
    ranges: std::vec::IntoIter<(u32, usize, usize)>,
}

impl Iterator for PlanParts<'_> {
    type Item = Result<(u32, Vec<PlanRow>)>;

    fn next(&mut self) -> Option<Self::Item> {
        let (part, start, end) = self.ranges.next()?;
        Some(
            self.plan
                .part_rows(part, start, end)
                .map(|rows| (part, rows)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PlanHeader {
        PlanHeader {
            plan_version: PLAN_VERSION,
            sources: vec![serde_json::json!({"kind": "dir", "path": "/src"})],
            part_size: 3,
            parts: 0,
            rows: 0,
            inputs: 0,
            hash: String::new(),
            created_by: "test".into(),
        }
    }

    /// Rows written across several row groups read back part by part, only the parts asked
    /// for; a changed plan.parquet is refused.
    #[test]
    fn plan_rows_round_trip_by_part() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let mut w = PlanWriter::create(dir.path()).unwrap();
        let n = 3 * ROWS_PER_BATCH as u32 / 2;
        let odd = std::ffi::OsStr::from_bytes(b"/src/caf\xe9.jpg");
        let row = |i: u32| PlanRow {
            part: i / 1000,
            video: i % 7 == 0,
            path: if i == 5 {
                PathBuf::from(odd)
            } else {
                PathBuf::from(format!("/src/{i}.jpg"))
            },
            start: (i % 3 == 0).then_some(i as u64),
            len: (i % 3 == 0).then_some(10),
            bytes: i as u64 * 11,
            mtime_ns: -(i as i64),
        };
        for i in 0..n {
            w.push(row(i)).unwrap();
        }
        assert!(
            w.push(row(0)).is_err(),
            "rows out of part order are refused"
        );
        let h = w.finish(header()).unwrap();
        assert_eq!((h.rows, h.parts), (n as u64, n.div_ceil(1000)));
        let plan = Plan::open(dir.path()).unwrap().unwrap();
        assert_eq!(plan.header, h);
        let mut seen = Vec::new();
        plan.for_each_part(&|p| p % 3 == 1, |part, rows| {
            assert_eq!(
                rows,
                (part * 1000..(part * 1000 + 1000).min(n))
                    .map(row)
                    .collect::<Vec<_>>()
            );
            seen.push(part);
            Ok::<_, Error>(ControlFlow::Continue(()))
        })
        .unwrap();
        assert_eq!(
            seen,
            (0..h.parts).filter(|p| p % 3 == 1).collect::<Vec<_>>()
        );
        let mut first = Vec::new();
        plan.for_each_part(&|p| p == 0, |_, rows| {
            first = rows;
            Ok::<_, Error>(ControlFlow::Continue(()))
        })
        .unwrap();
        assert_eq!(first[5].path.as_os_str(), odd);

        let mut bytes = std::fs::read(rows_path(dir.path())).unwrap();
        let k = bytes.len() / 2;
        bytes[k] ^= 1;
        std::fs::write(rows_path(dir.path()), bytes).unwrap();
        let err = Plan::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("dataset plan"), "{err}");
        assert!(Plan::open(&dir.path().join("none")).unwrap().is_none());
    }
}
