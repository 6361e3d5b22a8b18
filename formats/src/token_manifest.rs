//! `DIR/tokens-<hash>.parquet`, the per-vocabulary token manifest (see [`crate::tokens`] for
//! the shards it points into): rows written, read in slices, hashed and consolidated from the
//! token parts. Re-exported from [`crate::tokens`].

use std::fs::File;
use std::path::{Path, PathBuf};

use polars::prelude::*;

use crate::error::{Error, Result};
use crate::tokens::TokenLayout;

/// One row of `tokens-<hash>.parquet`.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenRow {
    pub sample_id: String,
    pub modality: crate::samples::Modality,
    pub split: crate::samples::Split,
    pub part: u32,
    pub shard: String,
    /// Offset of the document's BOS, in tokens.
    pub offset: u64,
    /// Tokens in the document, BOS and EOS included.
    pub n_tokens: u64,
    /// The codec bytes the document encodes (for bits per byte).
    pub codec_bytes: u64,
    /// [`crate::samples::part_hash`] of the codec part the document was tokenized from, the
    /// same in every row of a part: a retokenize redoes a token part whose codec part has
    /// changed since. `None` in manifests written before it was recorded.
    pub codec_part_hash: Option<u64>,
}

pub fn write_token_rows(rows: &[TokenRow], path: &Path) -> Result<()> {
    crate::samples::write_dataframe(&mut token_dataframe(rows, path)?, path)
}

/// Token rows as the columns of a token manifest (`path` names the file in an error).
fn token_dataframe(rows: &[TokenRow], path: &Path) -> Result<DataFrame> {
    macro_rules! col {
        ($name:literal, $f:expr) => {
            Column::new($name.into(), rows.iter().map($f).collect::<Vec<_>>())
        };
    }
    DataFrame::new(
        rows.len(),
        vec![
            col!("sample_id", |r| r.sample_id.as_str()),
            col!("modality", |r| r.modality.as_str()),
            col!("split", |r| r.split.as_str()),
            col!("part", |r| r.part),
            col!("shard", |r| r.shard.as_str()),
            col!("offset", |r| r.offset),
            col!("n_tokens", |r| r.n_tokens),
            col!("codec_bytes", |r| r.codec_bytes),
            col!("codec_part_hash", |r| r.codec_part_hash),
        ],
    )
    .map_err(Error::parquet(path))
}

/// One row of `tokens-<hash>.parquet` borrowed from its columns: a reader of millions of rows
/// keeps what it needs without allocating a [`TokenRow`] for each.
#[derive(Clone, Copy, Debug)]
pub struct TokenRowRef<'a> {
    pub sample_id: &'a str,
    pub modality: crate::samples::Modality,
    pub split: crate::samples::Split,
    pub part: u32,
    pub shard: &'a str,
    pub offset: u64,
    pub n_tokens: u64,
    pub codec_bytes: u64,
    pub codec_part_hash: Option<u64>,
}

impl TokenRowRef<'_> {
    pub fn to_owned(&self) -> TokenRow {
        TokenRow {
            sample_id: self.sample_id.into(),
            modality: self.modality,
            split: self.split,
            part: self.part,
            shard: self.shard.into(),
            offset: self.offset,
            n_tokens: self.n_tokens,
            codec_bytes: self.codec_bytes,
            codec_part_hash: self.codec_part_hash,
        }
    }

    /// Feeds every field of the row to `h`: what [`ManifestHash`] is made of.
    pub fn hash_into(&self, h: &mut crate::FieldHash) {
        for s in [
            self.sample_id,
            self.modality.as_str(),
            self.split.as_str(),
            self.shard,
        ] {
            h.text(s);
        }
        for n in [
            self.part as u64,
            self.offset,
            self.n_tokens,
            self.codec_bytes,
        ] {
            h.number(n);
        }
        h.optional(self.codec_part_hash);
    }
}

/// A content hash of a token manifest: xxh3-64 over every row's fields in order (not over the
/// file's bytes, which another Parquet writer may lay out differently). Two manifests with the
/// same hash list the same documents at the same places, tokenized from the same codec parts.
#[derive(Default)]
pub struct ManifestHash(crate::FieldHash);

impl ManifestHash {
    pub fn add(&mut self, row: &TokenRowRef<'_>) {
        row.hash_into(&mut self.0);
    }

    /// 16 hex digits.
    pub fn finish(&self) -> String {
        format!("{:016x}", self.0.digest())
    }

    /// The hash of the manifest at `path`, read in slices.
    pub fn of(path: &Path) -> Result<String> {
        let mut h = ManifestHash::default();
        for_each_token_row(path, |r| {
            h.add(&r);
            Ok(())
        })?;
        Ok(h.finish())
    }
}

pub fn read_token_rows(path: &Path) -> Result<Vec<TokenRow>> {
    let mut rows = Vec::new();
    for_each_token_row(path, |r| {
        rows.push(r.to_owned());
        Ok(())
    })?;
    Ok(rows)
}

/// Rows of a token manifest, from its footer.
pub fn token_row_count(path: &Path) -> Result<usize> {
    let file = File::open(path).map_err(Error::io(path))?;
    ParquetReader::new(file)
        .num_rows()
        .map_err(|e| Error::Corrupt {
            path: path.to_path_buf(),
            what: "token manifest",
            problem: e.to_string(),
            fix: "rerun `codeclm dataset tokenize`".into(),
        })
}

/// Rows read from a token manifest at a time by [`for_each_token_row`] (Parquet row groups are
/// skipped, not decoded, outside each slice).
const MANIFEST_ROWS_PER_READ: usize = 1 << 15;

/// Calls `f` on every row of a token manifest, in order, reading [`MANIFEST_ROWS_PER_READ`] rows
/// at a time (a manifest of millions of rows is never in memory whole); returns the row count.
pub fn for_each_token_row(
    path: &Path,
    mut f: impl FnMut(TokenRowRef<'_>) -> Result<()>,
) -> Result<usize> {
    let bad = |e: PolarsError| Error::Corrupt {
        path: path.to_path_buf(),
        what: "token manifest",
        problem: e.to_string(),
        fix: "rerun `codeclm dataset tokenize`".into(),
    };
    let open = || File::open(path).map_err(Error::io(path));
    // The footer once (a manifest of thousands of parts has a large one), not per slice.
    let metadata = ParquetReader::new(open()?)
        .get_metadata()
        .map_err(bad)?
        .clone();
    let total = metadata.num_rows;
    let mut start = 0;
    while start < total {
        let df =
            crate::rows::read_slice(path, &metadata, None, (start, MANIFEST_ROWS_PER_READ), &bad)?;
        if df.height() == 0 {
            break;
        }
        visit_token_rows(&df, path, start, &mut f)?;
        start += df.height();
    }
    Ok(start)
}

fn visit_token_rows(
    df: &DataFrame,
    path: &Path,
    first_row: usize,
    f: &mut impl FnMut(TokenRowRef<'_>) -> Result<()>,
) -> Result<()> {
    let bad = |e: PolarsError| Error::Corrupt {
        path: path.to_path_buf(),
        what: "token manifest",
        problem: e.to_string(),
        fix: "rerun `codeclm dataset tokenize`".into(),
    };
    let s = |n: &str| -> Result<StringChunked> {
        Ok(df.column(n).map_err(bad)?.str().map_err(bad)?.clone())
    };
    let u = |n: &str| -> Result<UInt64Chunked> {
        Ok(df.column(n).map_err(bad)?.u64().map_err(bad)?.clone())
    };
    let part = df.column("part").map_err(bad)?.u32().map_err(bad)?.clone();
    let (id, modality, split, shard) = (s("sample_id")?, s("modality")?, s("split")?, s("shard")?);
    let (offset, n, codec) = (u("offset")?, u("n_tokens")?, u("codec_bytes")?);
    // Written since codec parts are hashed; absent (all None) in older manifests.
    let part_hash = match df.column("codec_part_hash") {
        Ok(c) => c.u64().map_err(bad)?.clone(),
        Err(_) => UInt64Chunked::full_null("codec_part_hash".into(), df.height()),
    };
    use crate::samples::{parse_column, Modality, Split};
    for (i, ((((((((id, m), sp), part), shard), offset), n), codec), part_hash)) in id
        .iter()
        .zip(modality.iter())
        .zip(split.iter())
        .zip(part.iter())
        .zip(shard.iter())
        .zip(offset.iter())
        .zip(n.iter())
        .zip(codec.iter())
        .zip(part_hash.iter())
        .enumerate()
    {
        let (m, sp, row) = (m.unwrap_or_default(), sp.unwrap_or_default(), first_row + i);
        f(TokenRowRef {
            sample_id: id.unwrap_or_default(),
            modality: parse_column(path, "token manifest", row, "modality", m, Modality::parse)?,
            split: parse_column(path, "token manifest", row, "split", sp, Split::parse)?,
            part: part.unwrap_or_default(),
            shard: shard.unwrap_or_default(),
            offset: offset.unwrap_or_default(),
            n_tokens: n.unwrap_or_default(),
            codec_bytes: codec.unwrap_or_default(),
            codec_part_hash: part_hash,
        })?;
    }
    Ok(())
}

/// The codec part hash a token part manifest records (its first row's; every row of a part
/// has the same). `None` for a manifest written before it was recorded, or with no rows.
pub fn recorded_part_hash(path: &Path) -> Result<Option<u64>> {
    let df = ParquetReader::new(File::open(path).map_err(Error::io(path))?)
        .with_slice(Some((0, 1)))
        .finish()
        .map_err(|e| Error::Corrupt {
            path: path.to_path_buf(),
            what: "token manifest",
            problem: e.to_string(),
            fix: "delete it and rerun `codeclm dataset tokenize`".into(),
        })?;
    let mut found = None;
    visit_token_rows(&df, path, 0, &mut |r| {
        found = r.codec_part_hash;
        Ok(())
    })?;
    Ok(found)
}

/// Concatenates per-part token manifests into `tokens-<hash>.parquet`.
pub fn consolidate(layout: &TokenLayout) -> Result<u64> {
    let mut parts: Vec<PathBuf> = std::fs::read_dir(layout.parts_dir())
        .map_err(Error::io(layout.parts_dir()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    parts.sort();
    // One part in memory at a time: a row group per part.
    let out = layout.manifest_path();
    let tmp = crate::tmp_path(&out);
    let file = std::fs::File::create(&tmp).map_err(Error::io(&tmp))?;
    let schema = token_dataframe(&[], &out)?.schema().as_ref().clone();
    let mut writer = crate::samples::parquet_writer(file)
        .batched(&schema)
        .map_err(Error::parquet(&tmp))?;
    let mut total = 0u64;
    for p in &parts {
        let df = token_dataframe(&read_token_rows(p)?, p)?;
        total += df.height() as u64;
        writer.write_batch(&df).map_err(Error::parquet(&tmp))?;
    }
    writer.finish().map_err(Error::parquet(&tmp))?;
    drop(writer);
    crate::samples::sync_and_rename(&tmp, &out)?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest longer than one read slice comes back whole and in order.
    #[test]
    fn manifests_are_read_in_slices() {
        use crate::samples::{Modality, Split};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens-00.parquet");
        let n = MANIFEST_ROWS_PER_READ + 1234;
        let rows: Vec<TokenRow> = (0..n)
            .map(|i| TokenRow {
                sample_id: format!("s{i}"),
                modality: if i % 3 == 0 {
                    Modality::Video
                } else {
                    Modality::Image
                },
                split: if i % 7 == 0 { Split::Val } else { Split::Train },
                part: (i / 1000) as u32,
                shard: format!("tokens/00/part-{:06}.tok", i / 1000),
                offset: i as u64 * 10,
                n_tokens: 10,
                codec_bytes: i as u64,
                codec_part_hash: (i % 2 == 0).then_some(i as u64 / 1000),
            })
            .collect();
        write_token_rows(&rows, &path).unwrap();
        let mut i = 0;
        let count = for_each_token_row(&path, |r| {
            assert_eq!(r.to_owned(), rows[i]);
            i += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!((count, i), (n, n));
    }
}
