//! The sample manifest: one row per input (image or video; per crop of an image with `--crops`),
//! whether it succeeded or not.
//! Failures are data (img2dataset's rule): a bad file is a row with a `status` and an `error`,
//! never a crashed run. Parts are written per unit of work (`parts/part-NNNNNN.parquet`) and
//! concatenated into `samples.parquet`; Python reads either with `pl.read_parquet`.

use std::fs::File;
use std::path::{Path, PathBuf};

use polars::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Version of the manifest schema below; bumped when a column changes meaning or type (not for
/// an added nullable column that older manifests read as null, see `LATER_COLUMNS`).
pub const SAMPLES_SCHEMA_VERSION: u32 = 2;

/// What happened to one input. Everything but `Ok` carries an `error` message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    /// Zero-byte input.
    Empty,
    /// The data ends before the image does.
    Truncated,
    /// Recognised format, damaged content.
    Corrupt,
    /// Not a format we know at all (text, HTML, random bytes).
    Unrecognized,
    /// A real image format this build does not decode (PNM, TGA, ...).
    Unsupported,
    /// Over the configured pixel limit (decompression bombs, enormous dimensions).
    TooLarge,
    /// The source could not be read (permissions, vanished file, broken archive member).
    ReadError,
    /// Decoded fine but the encoder refused it (should not happen; recorded rather than lost).
    EncodeError,
    /// Past the per-item deadline (`dataset build --item-timeout`): the decoder was stopped.
    Timeout,
    /// The decoder died on this input (a native crash: the signal is in `error`); the build
    /// went on without it.
    Crashed,
}

impl Status {
    pub const ALL: [Status; 11] = [
        Status::Ok,
        Status::Empty,
        Status::Truncated,
        Status::Corrupt,
        Status::Unrecognized,
        Status::Unsupported,
        Status::TooLarge,
        Status::ReadError,
        Status::EncodeError,
        Status::Timeout,
        Status::Crashed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Empty => "empty",
            Status::Truncated => "truncated",
            Status::Corrupt => "corrupt",
            Status::Unrecognized => "unrecognized",
            Status::Unsupported => "unsupported",
            Status::TooLarge => "too_large",
            Status::ReadError => "read_error",
            Status::EncodeError => "encode_error",
            Status::Timeout => "timeout",
            Status::Crashed => "crashed",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

pub use crate::kinds::{Modality, Split};

/// Reads a manifest's enum column value, naming the row and the fix when it is unknown.
pub(crate) fn parse_column<T>(
    path: &Path,
    what: &'static str,
    row: usize,
    column: &str,
    value: &str,
    parse: fn(&str) -> Option<T>,
) -> Result<T> {
    parse(value).ok_or_else(|| Error::Corrupt {
        path: path.to_path_buf(),
        what,
        problem: format!("row {row} has unknown {column} {value:?}"),
        fix: "rebuild the manifest with this codeclm version".into(),
    })
}

/// Where a random-resized crop was cut from its source (`--crops N`): crop `index` of N, the box
/// in the pixels of the upright (EXIF-oriented) source at full resolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Crop {
    pub index: u32,
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

/// Columns added after the manifest schema was released: a manifest written before them reads
/// as if they were null (a build without `--crops`), so old datasets open and old parts of a
/// resumed build concatenate with new ones ([`read_dataframe`]).
const LATER_COLUMNS: [&str; 5] = ["crop_index", "crop_x", "crop_y", "crop_w", "crop_h"];

/// Whether `name` is one of the [`LATER_COLUMNS`] (read as nulls from a manifest without it).
pub(crate) fn is_later_column(name: &str) -> bool {
    LATER_COLUMNS.contains(&name)
}

/// One manifest row. Optional fields are null when the stage that fills them did not run.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleRow {
    /// Stable id: xxh3-64 of the source identity, 16 hex digits (the source id); a crop's is
    /// `<source id>-crop<k>`.
    pub sample_id: String,
    /// The source identity: a path relative to the source root, `tar_path#member` or `file.parquet#row`.
    pub source: String,
    /// `file`, `tar` or `parquet`.
    pub source_kind: String,
    pub modality: Modality,
    /// A pure function of the source id and the validation fraction (every crop of a photo
    /// shares its split).
    pub split: Split,
    /// The unit of work this row was written in.
    pub part: u32,
    pub src_format: Option<String>,
    pub src_width: Option<u32>,
    pub src_height: Option<u32>,
    pub src_bytes: u64,
    /// EXIF orientation found in the source (1-8), if any.
    pub exif_orientation: Option<u32>,
    /// DCT-domain decode scale denominator used for JPEG sources (1, 2, 4 or 8).
    pub decode_scale: Option<u32>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Random-resized crops only (`--crops N`): which crop and its box. Null otherwise, and on
    /// the one error row of a source that could not be decoded.
    pub crop: Option<Crop>,
    /// Videos only (null for images): the source's video codec (`h264`, `mjpeg`, ...).
    pub src_codec: Option<String>,
    /// Videos only: source duration in seconds (container, else stream), when known.
    pub src_duration: Option<f64>,
    /// Videos only: the source stream's average frame rate, when known.
    pub src_fps: Option<f64>,
    /// Videos only: frames encoded (paper: 15 = 5 s at 3 fps; fewer for shorter clips).
    pub frames: Option<u32>,
    /// Videos only: NAL units in the stored H.264 stream.
    pub nal_units: Option<u32>,
    /// `jpeg` or `h264`.
    pub codec: Option<String>,
    pub codec_bytes: Option<u64>,
    /// Shard file, relative to the dataset root.
    pub shard: Option<String>,
    /// Record index inside the shard.
    pub record: Option<u32>,
    /// Byte offset of the record's zstd frame inside the shard.
    pub offset: Option<u64>,
    /// xxh3-64 of the stored codec bytes.
    pub checksum: Option<u64>,
    pub status: Status,
    pub error: Option<String>,
}

impl SampleRow {
    pub fn is_ok(&self) -> bool {
        self.status == Status::Ok
    }
}

/// The identity of a codec part's content, as token parts record it: xxh3-64 over its rows in
/// order (sample id, status, modality, split, codec length, shard, record and the codec bytes'
/// checksum), every status included. A rebuild that changes any sample's bytes, status or split
/// (`--retry-failed`, new settings, a changed source file) changes it.
pub fn part_hash<'a>(rows: impl IntoIterator<Item = &'a SampleRow>) -> u64 {
    let mut h = crate::FieldHash::default();
    for r in rows {
        hash_part_row(
            &mut h,
            [
                r.sample_id.as_str(),
                r.status.as_str(),
                r.modality.as_str(),
                r.split.as_str(),
                r.shard.as_deref().unwrap_or(""),
            ],
            [r.codec_bytes, r.record.map(u64::from), r.checksum],
        );
    }
    h.digest()
}

/// The columns [`part_hash`] covers, in the order [`hash_part_row`] takes them.
pub(crate) const PART_HASH_COLUMNS: [&str; 8] = [
    "sample_id",
    "status",
    "modality",
    "split",
    "shard",
    "codec_bytes",
    "record",
    "checksum",
];

/// Adds one row to a part hash: (sample id, status, modality, split, shard) and (codec length,
/// record, checksum). The one definition [`part_hash`] and the column scans share.
pub(crate) fn hash_part_row(h: &mut crate::FieldHash, text: [&str; 5], numbers: [Option<u64>; 3]) {
    for s in text {
        h.text(s);
    }
    for n in numbers {
        h.optional(n);
    }
}

/// Builds the manifest DataFrame. Column order and types are the contract with Python readers.
pub fn to_dataframe(rows: &[SampleRow]) -> Result<DataFrame> {
    macro_rules! col {
        ($name:literal, $f:expr) => {
            Column::new($name.into(), rows.iter().map($f).collect::<Vec<_>>())
        };
    }
    let columns = vec![
        col!("sample_id", |r| r.sample_id.as_str()),
        col!("source", |r| r.source.as_str()),
        col!("source_kind", |r| r.source_kind.as_str()),
        col!("modality", |r| r.modality.as_str()),
        col!("split", |r| r.split.as_str()),
        col!("part", |r| r.part),
        col!("src_format", |r| r.src_format.as_deref()),
        col!("src_width", |r| r.src_width),
        col!("src_height", |r| r.src_height),
        col!("src_bytes", |r| r.src_bytes),
        col!("exif_orientation", |r| r.exif_orientation),
        col!("decode_scale", |r| r.decode_scale),
        col!("width", |r| r.width),
        col!("height", |r| r.height),
        col!("crop_index", |r| r.crop.map(|c| c.index)),
        col!("crop_x", |r| r.crop.map(|c| c.x)),
        col!("crop_y", |r| r.crop.map(|c| c.y)),
        col!("crop_w", |r| r.crop.map(|c| c.w)),
        col!("crop_h", |r| r.crop.map(|c| c.h)),
        col!("src_codec", |r| r.src_codec.as_deref()),
        col!("src_duration", |r| r.src_duration),
        col!("src_fps", |r| r.src_fps),
        col!("frames", |r| r.frames),
        col!("nal_units", |r| r.nal_units),
        col!("codec", |r| r.codec.as_deref()),
        col!("codec_bytes", |r| r.codec_bytes),
        col!("shard", |r| r.shard.as_deref()),
        col!("record", |r| r.record),
        col!("offset", |r| r.offset),
        col!("checksum", |r| r.checksum),
        col!("status", |r| r.status.as_str()),
        col!("error", |r| r.error.as_deref()),
    ];
    DataFrame::new(rows.len(), columns)
        .map_err(|e| Error::Invalid(format!("building the samples table: {e}")))
}

/// A manifest written before the [`LATER_COLUMNS`] existed, with them added as nulls in this
/// version's column order; any other table is returned as it is.
pub(crate) fn with_later_columns(mut df: DataFrame) -> DataFrame {
    let Ok(schema) = to_dataframe(&[]).map(|empty| empty.schema().clone()) else {
        return df;
    };
    let mut added = false;
    for name in LATER_COLUMNS {
        if df.column(name).is_err() {
            let nulls = Column::full_null(name.into(), df.height(), &DataType::UInt32);
            if df.with_column(nulls).is_err() {
                return df;
            }
            added = true;
        }
    }
    if !added {
        return df;
    }
    match df.select(schema.iter_names().cloned()) {
        Ok(ordered) => ordered,
        Err(_) => df,
    }
}

/// Reads rows back from a manifest DataFrame (the inverse of [`to_dataframe`]).
pub fn from_dataframe(df: &DataFrame, path: &Path) -> Result<Vec<SampleRow>> {
    let bad = |e: PolarsError| {
        Error::Corrupt {
        path: path.to_path_buf(),
        what: "samples manifest",
        problem: e.to_string(),
        fix: "it was not written by this codeclm version; rebuild it with `codeclm dataset merge` or `codeclm dataset build`".into(),
    }
    };
    let s = |name: &str| -> Result<StringChunked> {
        Ok(df.column(name).map_err(bad)?.str().map_err(bad)?.clone())
    };
    let u32c = |name: &str| -> Result<UInt32Chunked> {
        Ok(df.column(name).map_err(bad)?.u32().map_err(bad)?.clone())
    };
    let f64c = |name: &str| -> Result<Float64Chunked> {
        Ok(df.column(name).map_err(bad)?.f64().map_err(bad)?.clone())
    };
    let (src_codec, src_duration, src_fps, frames, nal_units) = (
        s("src_codec")?,
        f64c("src_duration")?,
        f64c("src_fps")?,
        u32c("frames")?,
        u32c("nal_units")?,
    );
    let u64c = |name: &str| -> Result<UInt64Chunked> {
        Ok(df.column(name).map_err(bad)?.u64().map_err(bad)?.clone())
    };
    let (sample_id, source, source_kind, modality, split) = (
        s("sample_id")?,
        s("source")?,
        s("source_kind")?,
        s("modality")?,
        s("split")?,
    );
    let (part, src_format, src_width, src_height, src_bytes) = (
        u32c("part")?,
        s("src_format")?,
        u32c("src_width")?,
        u32c("src_height")?,
        u64c("src_bytes")?,
    );
    let (exif, scale, width, height, codec) = (
        u32c("exif_orientation")?,
        u32c("decode_scale")?,
        u32c("width")?,
        u32c("height")?,
        s("codec")?,
    );
    let (codec_bytes, shard, record, offset, checksum) = (
        u64c("codec_bytes")?,
        s("shard")?,
        u32c("record")?,
        u64c("offset")?,
        u64c("checksum")?,
    );
    let (status, error) = (s("status")?, s("error")?);
    let (crop_index, crop_x, crop_y, crop_w, crop_h) = (
        u32c("crop_index")?,
        u32c("crop_x")?,
        u32c("crop_y")?,
        u32c("crop_w")?,
        u32c("crop_h")?,
    );
    let crop_of = |i: usize| -> Option<Crop> {
        Some(Crop {
            index: crop_index.get(i)?,
            x: crop_x.get(i)?,
            y: crop_y.get(i)?,
            w: crop_w.get(i)?,
            h: crop_h.get(i)?,
        })
    };
    let mut rows = Vec::with_capacity(df.height());
    for i in 0..df.height() {
        let what = "samples manifest";
        let status = parse_column(
            path,
            what,
            i,
            "status",
            status.get(i).unwrap_or_default(),
            Status::parse,
        )?;
        let row_modality = parse_column(
            path,
            what,
            i,
            "modality",
            modality.get(i).unwrap_or_default(),
            Modality::parse,
        )?;
        let row_split = parse_column(
            path,
            what,
            i,
            "split",
            split.get(i).unwrap_or_default(),
            Split::parse,
        )?;
        rows.push(SampleRow {
            sample_id: sample_id.get(i).unwrap_or_default().to_string(),
            source: source.get(i).unwrap_or_default().to_string(),
            source_kind: source_kind.get(i).unwrap_or_default().to_string(),
            modality: row_modality,
            split: row_split,
            part: part.get(i).unwrap_or_default(),
            src_format: src_format.get(i).map(str::to_string),
            src_width: src_width.get(i),
            src_height: src_height.get(i),
            src_bytes: src_bytes.get(i).unwrap_or_default(),
            exif_orientation: exif.get(i),
            decode_scale: scale.get(i),
            width: width.get(i),
            height: height.get(i),
            crop: crop_of(i),
            src_codec: src_codec.get(i).map(str::to_string),
            src_duration: src_duration.get(i),
            src_fps: src_fps.get(i),
            frames: frames.get(i),
            nal_units: nal_units.get(i),
            codec: codec.get(i).map(str::to_string),
            codec_bytes: codec_bytes.get(i),
            shard: shard.get(i).map(str::to_string),
            record: record.get(i),
            offset: offset.get(i),
            checksum: checksum.get(i),
            status,
            error: error.get(i).map(str::to_string),
        });
    }
    Ok(rows)
}

pub(crate) fn parquet_writer(file: File) -> ParquetWriter<File> {
    ParquetWriter::new(file).with_compression(ParquetCompression::Zstd(None))
}

/// Writes `rows` as a Parquet manifest, atomically.
pub fn write_parquet(rows: &[SampleRow], path: &Path) -> Result<()> {
    write_dataframe(&mut to_dataframe(rows)?, path)
}

/// Writes any manifest table as zstd Parquet, atomically (temp file, fsync, rename).
pub fn write_dataframe(df: &mut DataFrame, path: &Path) -> Result<()> {
    let tmp = crate::tmp_path(path);
    let file = File::create(&tmp).map_err(Error::io(&tmp))?;
    parquet_writer(file)
        .finish(df)
        .map_err(Error::parquet(&tmp))?;
    sync_and_rename(&tmp, path)
}

pub(crate) fn sync_and_rename(tmp: &Path, path: &Path) -> Result<()> {
    File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(Error::io(tmp))?;
    std::fs::rename(tmp, path).map_err(Error::io(path))?;
    crate::sync_parent(path)?;
    fail::fail_point!("formats::manifest-committed");
    Ok(())
}

/// Reads a manifest table; one written before the later columns existed gets them as nulls.
pub fn read_dataframe(path: &Path) -> Result<DataFrame> {
    let file = File::open(path).map_err(Error::io(path))?;
    let df = ParquetReader::new(file).finish().map_err(|e| Error::Corrupt {
        path: path.to_path_buf(),
        what: "Parquet manifest",
        problem: e.to_string(),
        fix: "if it is a part manifest, delete it and rerun the build to redo that part; if it is samples.parquet, rerun `codeclm dataset merge`".into(),
    })?;
    Ok(with_later_columns(df))
}

pub fn read_parquet(path: &Path) -> Result<Vec<SampleRow>> {
    from_dataframe(&read_dataframe(path)?, path)
}

/// Concatenates part manifests, in the order given, into one Parquet file (atomically),
/// holding one part in memory at a time.
pub fn concat_parquet(parts: &[PathBuf], out: &Path) -> Result<u64> {
    let tmp = crate::tmp_path(out);
    let file = File::create(&tmp).map_err(Error::io(&tmp))?;
    let schema = to_dataframe(&[])?.schema().as_ref().clone();
    let mut writer = parquet_writer(file)
        .batched(&schema)
        .map_err(Error::parquet(&tmp))?;
    let mut total = 0u64;
    for part in parts {
        let df = read_dataframe(part)?;
        if df.schema().as_ref() != &schema {
            return Err(Error::Corrupt {
                path: part.clone(),
                what: "part manifest",
                problem: "its columns differ from this version's samples schema".into(),
                fix: "rebuild the dataset (or that part) with this codeclm version".into(),
            });
        }
        total += df.height() as u64;
        writer.write_batch(&df).map_err(Error::parquet(&tmp))?;
    }
    writer.finish().map_err(Error::parquet(&tmp))?;
    drop(writer);
    sync_and_rename(&tmp, out)?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(i: u32, status: Status) -> SampleRow {
        let ok = status == Status::Ok;
        SampleRow {
            sample_id: format!("{i:016x}"),
            source: format!("dir/img{i}.jpg"),
            source_kind: "file".into(),
            modality: Modality::Image,
            split: if i % 3 == 0 { Split::Val } else { Split::Train },
            part: i / 2,
            src_format: ok.then(|| "jpeg".into()),
            src_width: ok.then_some(500),
            src_height: ok.then_some(375),
            src_bytes: 1000 + i as u64,
            exif_orientation: None,
            decode_scale: ok.then_some(1),
            width: ok.then_some(256),
            height: ok.then_some(256),
            crop: (ok && i % 2 == 1).then_some(Crop {
                index: i % 3,
                x: i,
                y: 2 * i,
                w: 300,
                h: 200 + i,
            }),
            src_codec: (i == 4).then(|| "h264".into()),
            src_duration: (i == 4).then_some(10.0),
            src_fps: (i == 4).then_some(25.0),
            frames: (i == 4).then_some(15),
            nal_units: (i == 4).then_some(2161),
            codec: ok.then(|| "jpeg".into()),
            codec_bytes: ok.then_some(5000),
            shard: ok.then(|| "shards/part-000000-jpeg-000.shard".into()),
            record: ok.then_some(i),
            offset: ok.then_some(64 + 10 * i as u64),
            checksum: ok.then_some(u64::MAX - i as u64),
            status,
            error: (!ok).then(|| "bad".into()),
        }
    }

    #[test]
    fn parquet_round_trip_and_concat() {
        let dir = tempfile::tempdir().unwrap();
        let a: Vec<_> = (0..3).map(|i| row(i, Status::Ok)).collect();
        let b = vec![row(3, Status::Truncated), row(4, Status::Ok)];
        let (pa, pb) = (dir.path().join("a.parquet"), dir.path().join("b.parquet"));
        write_parquet(&a, &pa).unwrap();
        write_parquet(&b, &pb).unwrap();
        assert_eq!(read_parquet(&pa).unwrap(), a);
        let all = dir.path().join("all.parquet");
        assert_eq!(concat_parquet(&[pa, pb], &all).unwrap(), 5);
        let back = read_parquet(&all).unwrap();
        assert_eq!(back, a.into_iter().chain(b).collect::<Vec<_>>());
    }

    /// A manifest written before the crop columns existed still reads (crops null) and
    /// concatenates with one written now.
    #[test]
    fn manifests_without_the_crop_columns_read_and_concatenate() {
        let dir = tempfile::tempdir().unwrap();
        let mut old: Vec<_> = (0..3).map(|i| row(i, Status::Ok)).collect();
        let mut df = to_dataframe(&old).unwrap();
        for name in LATER_COLUMNS {
            df = df.drop(name).unwrap();
        }
        let old_path = dir.path().join("old.parquet");
        write_dataframe(&mut df, &old_path).unwrap();
        for r in &mut old {
            r.crop = None;
        }
        assert_eq!(read_parquet(&old_path).unwrap(), old);

        let new: Vec<_> = (3..6).map(|i| row(i, Status::Ok)).collect();
        assert!(new.iter().any(|r| r.crop.is_some()));
        let new_path = dir.path().join("new.parquet");
        write_parquet(&new, &new_path).unwrap();
        let all = dir.path().join("all.parquet");
        assert_eq!(concat_parquet(&[old_path, new_path], &all).unwrap(), 6);
        let back = read_parquet(&all).unwrap();
        assert_eq!(back, old.into_iter().chain(new).collect::<Vec<_>>());
    }

    #[test]
    fn status_strings_round_trip() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        for m in Modality::ALL {
            assert_eq!(Modality::parse(m.as_str()), Some(m));
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{m}\""));
        }
        for sp in Split::ALL {
            assert_eq!(Split::parse(sp.as_str()), Some(sp));
            assert_eq!(serde_json::to_string(&sp).unwrap(), format!("\"{sp}\""));
        }
    }

    /// A manifest whose modality or split this version does not know is refused, naming the row.
    #[test]
    fn unknown_modality_or_split_is_a_corrupt_manifest() {
        let rows: Vec<_> = (0..3).map(|i| row(i, Status::Ok)).collect();
        for (column, bad) in [("modality", "audio"), ("split", "test")] {
            let mut df = to_dataframe(&rows).unwrap();
            let good = if column == "split" { "train" } else { "image" };
            let values = vec![good, good, bad];
            df.replace(column, Column::new(column.into(), values))
                .unwrap();
            let err = from_dataframe(&df, Path::new("m.parquet")).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("row 2 has unknown {column} \"{bad}\""))
                    && msg.contains("m.parquet"),
                "{msg}"
            );
        }
    }
}
