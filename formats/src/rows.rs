//! A dataset's sample rows read without holding them: the manifests (`samples.parquet`, or the
//! finished part manifests of a build still running) are read a slice at a time, only the
//! columns asked for, filtered before any row is built. Each file's Parquet footer is read once
//! at open; a slice decodes only the row groups it overlaps.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::{ControlFlow, Range};
use std::path::{Path, PathBuf};

use polars::io::parquet::metadata::FileMetadataRef;
use polars::prelude::*;

use crate::dataset::DatasetLayout;
use crate::error::{Error, Result};
use crate::samples::{self, Modality, SampleRow, Split};

/// Rows decoded at a time by a scan: one slice of every column asked for is in memory (about
/// 20 MB of full rows; far less for a few columns).
pub const ROWS_PER_READ: usize = 1 << 16;

/// Which rows a scan keeps, tested on their columns before rows are built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RowFilter {
    /// Only `ok` rows (the ones with codec bytes).
    pub ok_only: bool,
    pub modality: Option<Modality>,
    pub split: Option<Split>,
}

impl RowFilter {
    /// Every row.
    pub const ALL: RowFilter = RowFilter {
        ok_only: false,
        modality: None,
        split: None,
    };
    /// Every `ok` row.
    pub const OK: RowFilter = RowFilter {
        ok_only: true,
        modality: None,
        split: None,
    };

    /// `ok` rows of one modality (and split, when given).
    pub fn ok(modality: Modality, split: Option<Split>) -> RowFilter {
        RowFilter {
            ok_only: true,
            modality: Some(modality),
            split,
        }
    }

    pub fn matches(&self, r: &SampleRow) -> bool {
        (!self.ok_only || r.is_ok())
            && self.modality.is_none_or(|m| r.modality == m)
            && self.split.is_none_or(|s| r.split == s)
    }

    fn is_all(&self) -> bool {
        *self == RowFilter::ALL
    }

    /// The columns [`RowFilter::mask`] reads.
    pub(crate) const COLUMNS: [&'static str; 3] = ["status", "modality", "split"];

    /// The rows of `df` (which has [`RowFilter::COLUMNS`]) this filter keeps.
    pub(crate) fn mask(&self, df: &DataFrame) -> std::result::Result<BooleanChunked, PolarsError> {
        let mut mask = BooleanChunked::full("keep".into(), true, df.height());
        let mut and = |column: &str, value: &str| -> std::result::Result<(), PolarsError> {
            let eq = df.column(column)?.str()?.equal(value);
            mask = &mask & &eq;
            Ok(())
        };
        if self.ok_only {
            and("status", crate::Status::Ok.as_str())?;
        }
        if let Some(m) = self.modality {
            and("modality", m.as_str())?;
        }
        if let Some(s) = self.split {
            and("split", s.as_str())?;
        }
        // Nulls (never written, but a foreign file may have them) are not kept.
        mask.fill_null_with_values(false)
    }
}

/// One manifest file: where its rows start in the dataset's row order, and its footer.
struct ManifestFile {
    path: PathBuf,
    start: u64,
    rows: u64,
    metadata: FileMetadataRef,
    columns: Vec<String>,
}

/// The manifest files of a dataset, in row order, with their footers.
pub(crate) struct Manifests {
    files: Vec<ManifestFile>,
    total: u64,
    identity: u64,
}

/// The error for a manifest that polars cannot read, or whose column is missing or mistyped.
pub(crate) fn corrupt(path: &Path) -> impl Fn(PolarsError) -> Error + '_ {
    move |e| {
        Error::Corrupt {
        path: path.to_path_buf(),
        what: "Parquet manifest",
        problem: e.to_string(),
        fix: "if it is a part manifest, delete it and rerun the build to redo that part; if it is samples.parquet, rerun `codeclm dataset merge`".into(),
    }
    }
}

/// Rows `start..start + len` of the Parquet file at `path` whose footer was read before
/// (`metadata`), only `columns` when given: the one slice read of the manifest, token manifest
/// and plan readers (a file of thousands of row groups has its footer parsed once, not per slice).
/// `bad` names the file's fix when polars cannot read it.
pub(crate) fn read_slice(
    path: &Path,
    metadata: &FileMetadataRef,
    columns: Option<&[&str]>,
    (start, len): (usize, usize),
    bad: &dyn Fn(PolarsError) -> Error,
) -> Result<DataFrame> {
    let file = File::open(path).map_err(Error::io(path))?;
    let mut reader = ParquetReader::new(file);
    reader.set_metadata(metadata.clone());
    reader
        .with_columns(columns.map(|c| c.iter().map(|s| s.to_string()).collect()))
        .with_slice(Some((start, len)))
        .finish()
        .map_err(bad)
}

/// The bytes of a Parquet file's footer (metadata + its length + `PAR1`).
fn footer_bytes(path: &Path) -> Result<Vec<u8>> {
    let mut f = File::open(path).map_err(Error::io(path))?;
    let len = f.metadata().map_err(Error::io(path))?.len();
    let bad = |problem: String| {
        Error::Corrupt {
        path: path.to_path_buf(),
        what: "Parquet manifest",
        problem,
        fix: "if it is a part manifest, delete it and rerun the build to redo that part; if it is samples.parquet, rerun `codeclm dataset merge`".into(),
    }
    };
    if len < 12 {
        return Err(bad(format!("{len} bytes is too short for a Parquet file")));
    }
    let mut tail = [0u8; 8];
    f.seek(SeekFrom::Start(len - 8))
        .and_then(|_| f.read_exact(&mut tail))
        .map_err(Error::io(path))?;
    if &tail[4..] != b"PAR1" {
        return Err(bad(
            "it does not end in PAR1 (a torn or foreign file)".into()
        ));
    }
    let meta_len = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]) as u64;
    if meta_len + 12 > len {
        return Err(bad(format!(
            "its footer claims {meta_len} bytes, more than the file's {len}"
        )));
    }
    let mut footer = vec![0u8; meta_len as usize + 8];
    f.seek(SeekFrom::Start(len - 8 - meta_len))
        .and_then(|_| f.read_exact(&mut footer))
        .map_err(Error::io(path))?;
    Ok(footer)
}

impl Manifests {
    /// `samples.parquet` when present, otherwise the finished part manifests in part order.
    pub(crate) fn open(layout: &DatasetLayout) -> Result<Manifests> {
        let paths: Vec<PathBuf> = if layout.samples_path().exists() {
            vec![layout.samples_path()]
        } else {
            layout
                .finished_parts()?
                .into_iter()
                .map(|p| layout.part_manifest(p))
                .collect()
        };
        let mut files = Vec::with_capacity(paths.len());
        let mut identity = crate::FieldHash::default();
        let mut start = 0u64;
        for path in paths {
            let footer = footer_bytes(&path)?;
            identity.text(&path.file_name().unwrap_or_default().to_string_lossy());
            identity.number(xxhash_rust::xxh3::xxh3_64(&footer));
            let file = File::open(&path).map_err(Error::io(&path))?;
            let mut reader = ParquetReader::new(file);
            let metadata = reader.get_metadata().map_err(corrupt(&path))?.clone();
            let columns = reader
                .schema()
                .map_err(corrupt(&path))?
                .iter_names()
                .map(|n| n.to_string())
                .collect();
            let rows = metadata.num_rows as u64;
            files.push(ManifestFile {
                path,
                start,
                rows,
                metadata,
                columns,
            });
            start += rows;
        }
        Ok(Manifests {
            files,
            total: start,
            identity: identity.digest(),
        })
    }

    pub(crate) fn len(&self) -> u64 {
        self.total
    }

    /// A hash of the manifest files' names and footers: changes whenever any row does.
    pub(crate) fn identity(&self) -> u64 {
        self.identity
    }

    /// Rows `start..start + len` of file `i`, the `columns` given (all when `None`); a column
    /// added to the schema after the file was written reads as nulls.
    fn read(
        &self,
        i: usize,
        start: u64,
        len: usize,
        columns: Option<&[&str]>,
    ) -> Result<DataFrame> {
        let f = &self.files[i];
        let (present, missing): (Vec<&str>, Vec<&str>) = match columns {
            Some(cols) => cols
                .iter()
                .partition(|c| f.columns.iter().any(|have| have == *c)),
            None => (Vec::new(), Vec::new()),
        };
        let df = read_slice(
            &f.path,
            &f.metadata,
            columns.map(|_| present.as_slice()),
            (start as usize, len),
            &corrupt(&f.path),
        )?;
        let mut df = match columns {
            None => samples::with_later_columns(df),
            Some(_) => df,
        };
        for name in missing {
            if !samples::is_later_column(name) {
                return Err(Error::Corrupt {
                    path: f.path.clone(),
                    what: "Parquet manifest",
                    problem: format!("it has no column {name:?}"),
                    fix: "it was not written by this codeclm version; rebuild it with `codeclm dataset merge` or `codeclm dataset build`".into(),
                });
            }
            let nulls = Column::full_null(name.into(), df.height(), &DataType::UInt32);
            df.with_column(nulls).map_err(corrupt(&f.path))?;
        }
        Ok(df)
    }

    /// Calls `f` on every slice of at most [`ROWS_PER_READ`] rows in order, with the global
    /// index of its first row and its file, until `f` breaks.
    pub(crate) fn scan<E: From<Error>>(
        &self,
        columns: Option<&[&str]>,
        mut f: impl FnMut(&DataFrame, u64, &Path) -> std::result::Result<ControlFlow<()>, E>,
    ) -> std::result::Result<(), E> {
        for (i, file) in self.files.iter().enumerate() {
            let mut at = 0u64;
            while at < file.rows {
                let df = self.read(i, at, ROWS_PER_READ, columns)?;
                if df.height() == 0 {
                    break;
                }
                if f(&df, file.start + at, &file.path)?.is_break() {
                    return Ok(());
                }
                at += df.height() as u64;
            }
        }
        Ok(())
    }

    /// Calls `f` on every row `filter` keeps, in order, with its global index.
    pub(crate) fn for_each_row<E: From<Error>>(
        &self,
        filter: RowFilter,
        mut f: impl FnMut(SampleRow, u64) -> std::result::Result<ControlFlow<()>, E>,
    ) -> std::result::Result<(), E> {
        self.scan(None, |df, first, path| {
            let (rows, index) = filtered_rows(df, first, path, filter)?;
            for (row, i) in rows.into_iter().zip(index) {
                if f(row, i)?.is_break() {
                    return Ok(ControlFlow::Break(()));
                }
            }
            Ok(ControlFlow::Continue(()))
        })
    }

    /// The rows at global indices `wanted` (each below [`Manifests::len`]), in the order given.
    /// Each slice holding any of them is read once.
    pub(crate) fn rows_at(&self, wanted: &[u64]) -> Result<Vec<SampleRow>> {
        let mut order: Vec<usize> = (0..wanted.len()).collect();
        order.sort_unstable_by_key(|&k| wanted[k]);
        let mut out: Vec<Option<SampleRow>> = vec![None; wanted.len()];
        let mut k = 0;
        while k < order.len() {
            let g = wanted[order[k]];
            if g >= self.total {
                return Err(Error::Invalid(format!(
                    "row {g} is past the manifest's {} rows",
                    self.total
                )));
            }
            let i = self.files.partition_point(|f| f.start + f.rows <= g);
            let file = &self.files[i];
            let slice_start = (g - file.start) / ROWS_PER_READ as u64 * ROWS_PER_READ as u64;
            let slice_end = (slice_start + ROWS_PER_READ as u64).min(file.rows);
            let mut group = Vec::new();
            while k < order.len() {
                let local = wanted[order[k]].wrapping_sub(file.start);
                if wanted[order[k]] < file.start || local >= slice_end {
                    break;
                }
                group.push((order[k], local));
                k += 1;
            }
            // A few rows: read each alone (a row group's pages, not the slice's).
            let rows: Vec<SampleRow> = if group.len() <= 8 {
                let mut rows = Vec::with_capacity(group.len());
                for &(_, local) in &group {
                    let df = self.read(i, local, 1, None)?;
                    rows.extend(samples::from_dataframe(&df, &file.path)?);
                }
                rows
            } else {
                let df = self.read(i, slice_start, (slice_end - slice_start) as usize, None)?;
                let idx: Vec<IdxSize> = group
                    .iter()
                    .map(|&(_, local)| (local - slice_start) as IdxSize)
                    .collect();
                let taken = df
                    .take(&IdxCa::from_vec("idx".into(), idx))
                    .map_err(corrupt(&file.path))?;
                samples::from_dataframe(&taken, &file.path)?
            };
            if rows.len() != group.len() {
                return Err(Error::Corrupt {
                    path: file.path.clone(),
                    what: "Parquet manifest",
                    problem: format!(
                        "it has fewer rows than its footer's {} (a torn file)",
                        file.rows
                    ),
                    fix: "rerun `codeclm dataset merge` (or the build of that part)".into(),
                });
            }
            for ((slot, _), row) in group.into_iter().zip(rows) {
                out[slot] = Some(row);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Global row ranges `range` (may span files), every row.
    pub(crate) fn read_range(&self, range: Range<u64>) -> Result<Vec<SampleRow>> {
        let mut rows = Vec::with_capacity((range.end - range.start) as usize);
        for (i, file) in self.files.iter().enumerate() {
            let (lo, hi) = (
                range.start.max(file.start),
                range.end.min(file.start + file.rows),
            );
            let mut at = lo;
            while at < hi {
                let n = ((hi - at) as usize).min(ROWS_PER_READ);
                let df = self.read(i, at - file.start, n, None)?;
                if df.height() == 0 {
                    break;
                }
                rows.extend(samples::from_dataframe(&df, &file.path)?);
                at += df.height() as u64;
            }
        }
        Ok(rows)
    }
}

/// The rows of one slice `filter` keeps, and their global indices.
fn filtered_rows(
    df: &DataFrame,
    first: u64,
    path: &Path,
    filter: RowFilter,
) -> Result<(Vec<SampleRow>, Vec<u64>)> {
    if filter.is_all() {
        let rows = samples::from_dataframe(df, path)?;
        let index = (first..first + rows.len() as u64).collect();
        return Ok((rows, index));
    }
    let mask = filter.mask(df).map_err(corrupt(path))?;
    let index: Vec<u64> = mask
        .iter()
        .enumerate()
        .filter(|&(_, keep)| keep == Some(true))
        .map(|(i, _)| first + i as u64)
        .collect();
    if index.is_empty() {
        return Ok((Vec::new(), index));
    }
    let kept = df.filter(&mask).map_err(corrupt(path))?;
    Ok((samples::from_dataframe(&kept, path)?, index))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{Dataset, DatasetConfig, Status};

    /// A row of part `part`: ids, statuses, modalities and splits varied the way builds vary
    /// them (every 7th failed, every 5th a video, every 3rd held out).
    fn row(part: u32, i: u64) -> SampleRow {
        let ok = i % 7 != 3;
        SampleRow {
            sample_id: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes())),
            source: format!("dir/{part}/img{i}.jpg"),
            source_kind: "file".into(),
            modality: if i % 5 == 0 {
                Modality::Video
            } else {
                Modality::Image
            },
            split: if i % 3 == 0 { Split::Val } else { Split::Train },
            part,
            src_format: ok.then(|| "jpeg".into()),
            src_width: ok.then_some(500),
            src_height: ok.then_some(375),
            src_bytes: 1000 + i,
            exif_orientation: None,
            decode_scale: ok.then_some(1),
            width: ok.then_some(256),
            height: ok.then_some(256),
            crop: None,
            src_codec: None,
            src_duration: None,
            src_fps: None,
            frames: None,
            nal_units: None,
            codec: ok.then(|| "jpeg".into()),
            codec_bytes: ok.then_some(3000 + i % 1000),
            shard: ok.then(|| format!("shards/part-{part:06}-jpeg-000.shard")),
            record: ok.then_some(i as u32),
            offset: ok.then_some(64 + 10 * i),
            checksum: ok.then_some(u64::MAX - i),
            status: if ok { Status::Ok } else { Status::Corrupt },
            error: (!ok).then(|| "bad".into()),
        }
    }

    /// Part manifests of 40,000, 30,000 and 5 rows: scans cross slice and file boundaries.
    fn dataset(dir: &Path) -> Vec<SampleRow> {
        let layout = DatasetLayout::new(dir);
        layout.create_dirs().unwrap();
        layout
            .write_config(&DatasetConfig::new(serde_json::json!({}), "test".into()))
            .unwrap();
        let mut all = Vec::new();
        let mut i = 0u64;
        for (part, n) in [(0u32, 40_000u64), (1, 30_000), (2, 5)] {
            let rows: Vec<SampleRow> = (i..i + n).map(|k| row(part, k)).collect();
            i += n;
            samples::write_parquet(&rows, &layout.part_manifest(part)).unwrap();
            all.extend(rows);
        }
        all
    }

    /// Every read of the streaming dataset agrees with the rows held in memory, over the part
    /// manifests and over `samples.parquet` (after `consolidate`).
    #[test]
    fn streamed_reads_equal_the_rows_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let all = dataset(dir.path());
        for merged in [false, true] {
            if merged {
                DatasetLayout::new(dir.path()).consolidate().unwrap();
            }
            let ds = Dataset::open(dir.path()).unwrap();
            assert_eq!(ds.len(), all.len() as u64);
            assert_eq!(ds.load_rows(RowFilter::ALL).unwrap(), all);
            let filter = RowFilter::ok(Modality::Image, Some(Split::Train));
            let want: Vec<SampleRow> = all.iter().filter(|r| filter.matches(r)).cloned().collect();
            assert_eq!(ds.load_rows(filter).unwrap(), want);
            assert_eq!(ds.first_rows(filter, 10).unwrap(), want[..10].to_vec());

            // The seeded subset: the lowest (key, id), as a full sort gives it.
            let key = |id: &str| xxhash_rust::xxh3::xxh3_64_with_seed(id.as_bytes(), 7);
            let mut sorted = want.clone();
            sorted.sort_by_cached_key(|r| (key(&r.sample_id), r.sample_id.clone()));
            assert_eq!(
                ds.lowest_by_key(filter, 500, key).unwrap(),
                sorted[..500].to_vec()
            );
            assert_eq!(
                ds.lowest_by_key(filter, 3, key).unwrap(),
                sorted[..3].to_vec()
            );

            // Parts: their rows, ranges and hashes.
            let parts = ds.parts().unwrap();
            assert_eq!(parts[&0], vec![0..40_000]);
            assert_eq!(parts[&1], vec![40_000..70_000]);
            assert_eq!(parts[&2], vec![70_000..70_005]);
            let p1: Vec<SampleRow> = all.iter().filter(|r| r.part == 1).cloned().collect();
            assert_eq!(ds.part_rows(1).unwrap(), p1);
            let summaries = ds.part_summaries(RowFilter::OK).unwrap();
            assert_eq!(summaries[&1].hash, samples::part_hash(&p1));
            assert_eq!(summaries[&1].rows, 30_000);
            assert_eq!(
                summaries[&1].kept,
                p1.iter().filter(|r| r.is_ok()).count() as u64
            );

            // Point lookups through the id index, first and last rows included.
            for r in [
                &all[0],
                &all[39_999],
                &all[40_000],
                &all[65_536],
                &all[70_004],
            ] {
                assert_eq!(ds.find(&r.sample_id).unwrap().as_ref(), Some(r));
            }
            assert_eq!(ds.find("0000000000000000-nope").unwrap(), None);
            assert!(DatasetLayout::new(dir.path()).id_index_path().exists());

            // The summary and the mean from column scans equal the same figures from the rows.
            let s = ds.summary().unwrap();
            assert_eq!(s.samples, all.len() as u64);
            let mut lens: Vec<u64> = all
                .iter()
                .filter(|r| r.is_ok())
                .map(|r| r.codec_bytes.unwrap())
                .collect();
            lens.sort_unstable();
            assert_eq!(s.codec_bytes, lens.iter().sum::<u64>());
            assert_eq!(
                s.codec_percentiles[2].1,
                lens[((lens.len() - 1) as f64 * 0.5).round() as usize]
            );
            let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
            for r in &all {
                *by_status.entry(r.status.as_str().into()).or_default() += 1;
            }
            assert_eq!(s.by_status, by_status);
            let videos: Vec<u64> = all
                .iter()
                .filter(|r| r.is_ok() && r.modality == Modality::Video)
                .map(|r| r.codec_bytes.unwrap())
                .collect();
            let mean = videos.iter().sum::<u64>() as f64 / videos.len() as f64;
            assert_eq!(ds.mean_codec_bytes(Modality::Video).unwrap(), Some(mean));
        }
    }

    /// The id index is a cache of the manifests it was built from: a manifest that changes
    /// (a part rebuilt) makes it rebuild, never answer from the old rows.
    #[test]
    fn the_id_index_follows_the_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let all = dataset(dir.path());
        let layout = DatasetLayout::new(dir.path());
        let ds = Dataset::open(dir.path()).unwrap();
        assert_eq!(
            ds.find(&all[70_001].sample_id).unwrap().as_ref(),
            Some(&all[70_001])
        );
        let built = std::fs::read(layout.id_index_path()).unwrap();
        // Reopened unchanged: the same file answers.
        let again = Dataset::open(dir.path()).unwrap();
        assert_eq!(
            again.find(&all[5].sample_id).unwrap().as_ref(),
            Some(&all[5])
        );
        assert_eq!(std::fs::read(layout.id_index_path()).unwrap(), built);
        // Part 2 rebuilt with other samples: the old ids are gone, the new found.
        let new: Vec<SampleRow> = (900_000..900_003).map(|k| row(2, k)).collect();
        samples::write_parquet(&new, &layout.part_manifest(2)).unwrap();
        let after = Dataset::open(dir.path()).unwrap();
        assert_eq!(after.find(&all[70_001].sample_id).unwrap(), None);
        assert_eq!(
            after.find(&new[2].sample_id).unwrap().as_ref(),
            Some(&new[2])
        );
        assert_ne!(std::fs::read(layout.id_index_path()).unwrap(), built);
        // A damaged index is rebuilt, not trusted.
        std::fs::write(layout.id_index_path(), b"CLMIDIDX garbage").unwrap();
        let damaged = Dataset::open(dir.path()).unwrap();
        assert_eq!(
            damaged.find(&new[0].sample_id).unwrap().as_ref(),
            Some(&new[0])
        );
    }

    /// A part manifest written before the crop columns existed is scanned with them as nulls.
    #[test]
    fn old_manifests_scan_with_the_later_columns_as_nulls() {
        let dir = tempfile::tempdir().unwrap();
        let layout = DatasetLayout::new(dir.path());
        layout.create_dirs().unwrap();
        layout
            .write_config(&DatasetConfig::new(serde_json::json!({}), "test".into()))
            .unwrap();
        let rows: Vec<SampleRow> = (0..20).map(|k| row(0, k)).collect();
        let mut df = samples::to_dataframe(&rows).unwrap();
        for name in ["crop_index", "crop_x", "crop_y", "crop_w", "crop_h"] {
            df = df.drop(name).unwrap();
        }
        samples::write_dataframe(&mut df, &layout.part_manifest(0)).unwrap();
        let ds = Dataset::open(dir.path()).unwrap();
        assert_eq!(ds.summary().unwrap().sources, 20);
        assert_eq!(ds.load_rows(RowFilter::ALL).unwrap(), rows);
    }
}
