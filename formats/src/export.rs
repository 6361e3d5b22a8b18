//! Token documents in the files other trainers read:
//!
//! - nanoGPT: `NAME.bin`, every document's uint16 tokens back to back, little-endian, no header
//!   (what nanoGPT's `train.py` opens with `np.memmap(path, dtype=np.uint16, mode='r')`); each
//!   document keeps its BOS and EOS, so documents stay delimited.
//! - Megatron-LM: an indexed dataset, `NAME.bin` (the same tokens) and `NAME.idx` (Megatron
//!   core's `_IndexWriter` layout, version 1): `MMIDIDX\0\0`, u64 version 1, u8 dtype code
//!   (8 = uint16), u64 sequence count, u64 document count (sequences + 1), then int32 length
//!   and int64 byte offset of every sequence, then int64 document indices `0..=n` (one sequence
//!   per document), all little-endian.
//!
//! Both are written in bounded memory (the Megatron lengths go through a temp file) and
//! atomically: temp names, synced, renamed, `.bin` before `.idx`.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Megatron core's index magic.
pub const MEGATRON_MAGIC: &[u8; 9] = b"MMIDIDX\0\0";
/// Megatron core's dtype code of `numpy.uint16`.
pub const MEGATRON_UINT16: u8 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    NanoGpt,
    Megatron,
}

/// What an export wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exported {
    pub docs: u64,
    pub tokens: u64,
    /// The files written, `.bin` first.
    pub files: Vec<PathBuf>,
}

/// Writes one split's documents in `format` as `dir/NAME.bin` (and `dir/NAME.idx`).
pub struct TokenExport {
    format: ExportFormat,
    bin_path: PathBuf,
    bin: BufWriter<File>,
    /// Megatron: every document's length, as int32, until the index is written.
    lengths: Option<BufWriter<File>>,
    docs: u64,
    tokens: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl TokenExport {
    pub fn create(dir: &Path, name: &str, format: ExportFormat) -> Result<TokenExport> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let bin_path = dir.join(format!("{name}.bin"));
        let tmp = crate::tmp_path(&bin_path);
        let bin = BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(io(&tmp))?);
        let lengths = match format {
            ExportFormat::NanoGpt => None,
            ExportFormat::Megatron => {
                Some(BufWriter::new(tempfile::tempfile_in(dir).map_err(io(dir))?))
            }
        };
        Ok(TokenExport {
            format,
            bin_path,
            bin,
            lengths,
            docs: 0,
            tokens: 0,
        })
    }

    /// Appends one document (BOS ... EOS as stored).
    pub fn push(&mut self, doc: &[u16]) -> Result<()> {
        let tmp = crate::tmp_path(&self.bin_path);
        for t in doc {
            self.bin.write_all(&t.to_le_bytes()).map_err(io(&tmp))?;
        }
        if let Some(lengths) = &mut self.lengths {
            let n = i32::try_from(doc.len()).map_err(|_| {
                Error::Invalid(format!(
                    "a document of {} tokens is longer than Megatron's int32 lengths allow",
                    doc.len()
                ))
            })?;
            lengths.write_all(&n.to_le_bytes()).map_err(io(&tmp))?;
        }
        self.docs += 1;
        self.tokens += doc.len() as u64;
        Ok(())
    }

    /// Finishes the files (`.bin`, then `.idx`) and renames them into place.
    pub fn finish(self) -> Result<Exported> {
        let TokenExport {
            format,
            bin_path,
            bin,
            lengths,
            docs,
            tokens,
        } = self;
        let tmp = crate::tmp_path(&bin_path);
        let f = bin.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, &bin_path).map_err(io(&bin_path))?;
        let mut files = vec![bin_path.clone()];
        if format == ExportFormat::Megatron {
            let idx_path = bin_path.with_extension("idx");
            let lengths = lengths.expect("a Megatron export keeps its lengths");
            write_megatron_index(&idx_path, lengths, docs)?;
            files.push(idx_path);
        }
        crate::sync_parent(&bin_path)?;
        Ok(Exported {
            docs,
            tokens,
            files,
        })
    }
}

fn write_megatron_index(path: &Path, lengths: BufWriter<File>, docs: u64) -> Result<()> {
    let tmp = crate::tmp_path(path);
    let mut lengths = lengths.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
    lengths.seek(SeekFrom::Start(0)).map_err(io(&tmp))?;
    let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(io(&tmp))?);
    let mut w = |bytes: &[u8]| out.write_all(bytes).map_err(io(&tmp));
    w(MEGATRON_MAGIC)?;
    w(&1u64.to_le_bytes())?;
    w(&[MEGATRON_UINT16])?;
    w(&docs.to_le_bytes())?;
    w(&(docs + 1).to_le_bytes())?;
    // Lengths as they were pushed, then each sequence's byte offset from the same lengths.
    let mut copy = BufReader::with_capacity(1 << 20, &mut lengths);
    std::io::copy(&mut copy, &mut out).map_err(io(&tmp))?;
    lengths.seek(SeekFrom::Start(0)).map_err(io(&tmp))?;
    let mut reader = BufReader::with_capacity(1 << 20, &mut lengths);
    let mut pointer = 0i64;
    let mut len = [0u8; 4];
    for _ in 0..docs {
        reader.read_exact(&mut len).map_err(io(&tmp))?;
        out.write_all(&pointer.to_le_bytes()).map_err(io(&tmp))?;
        pointer += i64::from(i32::from_le_bytes(len)) * 2;
    }
    for d in 0..=docs as i64 {
        out.write_all(&d.to_le_bytes()).map_err(io(&tmp))?;
    }
    let f = out.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn megatron_index_layout() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = TokenExport::create(dir.path(), "train", ExportFormat::Megatron).unwrap();
        e.push(&[1, 7, 8, 2]).unwrap();
        e.push(&[1, 300, 2]).unwrap();
        let done = e.finish().unwrap();
        assert_eq!((done.docs, done.tokens), (2, 7));
        let bin = std::fs::read(dir.path().join("train.bin")).unwrap();
        assert_eq!(bin, [1, 0, 7, 0, 8, 0, 2, 0, 1, 0, 44, 1, 2, 0]);
        let idx = std::fs::read(dir.path().join("train.idx")).unwrap();
        assert_eq!(&idx[..9], MEGATRON_MAGIC);
        assert_eq!(u64_at(&idx, 9), 1);
        assert_eq!(idx[17], MEGATRON_UINT16);
        assert_eq!((u64_at(&idx, 18), u64_at(&idx, 26)), (2, 3));
        let lengths: Vec<i32> = idx[34..42]
            .chunks(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(lengths, [4, 3]);
        assert_eq!((u64_at(&idx, 42), u64_at(&idx, 50)), (0, 8));
        assert_eq!(
            (u64_at(&idx, 58), u64_at(&idx, 66), u64_at(&idx, 74)),
            (0, 1, 2)
        );
        assert_eq!(idx.len(), 82);
        // No temp file is left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
