//! Codec shards: the codec bytes of many samples (one JPEG or H.264 stream each) in one file,
//! each record its own zstd frame so any record can be read without the others.
//!
//! Layout (all integers little-endian):
//! ```text
//! 0   magic        8 bytes  "CLMCODEC"
//! 8   version      u32      CODEC_SHARD_VERSION
//! 12  codec        u32      1 = JPEG (abbreviated stream, no tables), 2 = H.264 (Annex B)
//! 16  record_count u64
//! 24  index_offset u64      where the index starts; the file ends right after it
//! 32  raw_bytes    u64      sum of the uncompressed record lengths
//! 40  reserved     24 bytes zero
//! 64  records      record_count zstd frames, back to back
//! index_offset     record_count x { offset u64, compressed_len u32, raw_len u32, xxh3_64 u64 }
//! ```
//! The reader validates all of this at open time (llm.c's rule: check the contract before
//! trusting a byte), so a truncated or foreign file fails with its name and the fix.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const CODEC_SHARD_MAGIC: [u8; 8] = *b"CLMCODEC";
pub const CODEC_SHARD_VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 64;
pub const INDEX_ENTRY_LEN: u64 = 24;
/// zstd level for records: JPEG entropy-coded data barely compresses, so a fast level loses nothing.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

const FIX_REBUILD: &str = "delete this shard and its part manifest (parts/part-NNNNNN.parquet of the same part) and rerun `codeclm dataset build` with the same arguments to rebuild that part";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// Baseline JPEG, abbreviated (tables removed; the dataset keeps one tables-only stream).
    Jpeg,
    /// H.264 Annex B byte stream.
    H264,
}

impl Codec {
    pub fn code(self) -> u32 {
        match self {
            Codec::Jpeg => 1,
            Codec::H264 => 2,
        }
    }

    pub fn from_code(code: u32) -> Option<Codec> {
        match code {
            1 => Some(Codec::Jpeg),
            2 => Some(Codec::H264),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::Jpeg => "jpeg",
            Codec::H264 => "h264",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub offset: u64,
    pub compressed_len: u32,
    pub raw_len: u32,
    pub checksum: u64,
}

/// Where a record landed: its index in the shard and the byte offset of its zstd frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordLocation {
    pub record: u32,
    pub offset: u64,
}

/// The checksum stored in shard indexes and in the manifests' `checksum` column.
pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// Appends records to a new shard under a temp name; `finish` writes the index and header and
/// renames it into place, so a shard file that exists under its final name is always complete.
pub struct CodecShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    codec: Codec,
    compressor: zstd::bulk::Compressor<'static>,
    entries: Vec<IndexEntry>,
    pos: u64,
    raw_bytes: u64,
}

fn record_len(bytes: &[u8]) -> Result<u32> {
    u32::try_from(bytes.len()).map_err(|_| {
        Error::Invalid(format!(
            "record of {} bytes exceeds the 4 GiB record limit",
            bytes.len()
        ))
    })
}

/// A codec record compressed and checksummed for a shard, by any thread (each keeps one zstd
/// context per level), to be appended in order with [`CodecShardWriter::append_compressed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompressedRecord {
    frame: Vec<u8>,
    raw_len: u32,
    checksum: u64,
}

impl CompressedRecord {
    pub fn new(bytes: &[u8], zstd_level: i32) -> Result<CompressedRecord> {
        use std::cell::RefCell;
        use std::collections::HashMap;
        thread_local! {
            static COMPRESSORS: RefCell<HashMap<i32, zstd::bulk::Compressor<'static>>> =
                RefCell::new(HashMap::new());
        }
        let raw_len = record_len(bytes)?;
        let frame = COMPRESSORS.with(|c| -> std::io::Result<Vec<u8>> {
            let mut c = c.borrow_mut();
            let compressor = match c.entry(zstd_level) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(zstd::bulk::Compressor::new(zstd_level)?)
                }
            };
            compressor.compress(bytes)
        });
        Ok(CompressedRecord {
            frame: frame.map_err(|e| Error::Invalid(format!("compressing a codec record: {e}")))?,
            raw_len,
            checksum: checksum(bytes),
        })
    }

    /// Uncompressed length.
    pub fn raw_len(&self) -> u64 {
        self.raw_len as u64
    }

    /// [`checksum`] of the uncompressed bytes.
    pub fn checksum(&self) -> u64 {
        self.checksum
    }
}

impl CodecShardWriter {
    pub fn create(path: &Path, codec: Codec, zstd_level: i32) -> Result<Self> {
        let tmp = crate::tmp_path(path);
        let file = File::create(&tmp).map_err(Error::io(&tmp))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&[0u8; HEADER_LEN as usize])
            .map_err(Error::io(&tmp))?;
        let compressor = zstd::bulk::Compressor::new(zstd_level).map_err(Error::io(&tmp))?;
        Ok(CodecShardWriter {
            path: path.to_path_buf(),
            tmp,
            out,
            codec,
            compressor,
            entries: Vec::new(),
            pos: HEADER_LEN,
            raw_bytes: 0,
        })
    }

    pub fn append(&mut self, bytes: &[u8]) -> Result<RecordLocation> {
        let raw_len = record_len(bytes)?;
        let frame = self
            .compressor
            .compress(bytes)
            .map_err(Error::io(&self.tmp))?;
        self.push_frame(&frame, raw_len, checksum(bytes))
    }

    /// Appends a record compressed elsewhere (a build's worker threads compress and checksum,
    /// the one writer only appends): the same bytes `append` writes at the same level.
    pub fn append_compressed(&mut self, record: &CompressedRecord) -> Result<RecordLocation> {
        self.push_frame(&record.frame, record.raw_len, record.checksum)
    }

    fn push_frame(&mut self, frame: &[u8], raw_len: u32, checksum: u64) -> Result<RecordLocation> {
        self.out.write_all(frame).map_err(Error::io(&self.tmp))?;
        let location = RecordLocation {
            record: self.entries.len() as u32,
            offset: self.pos,
        };
        self.entries.push(IndexEntry {
            offset: self.pos,
            compressed_len: frame.len() as u32,
            raw_len,
            checksum,
        });
        self.pos += frame.len() as u64;
        self.raw_bytes += raw_len as u64;
        Ok(location)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Uncompressed codec bytes written so far (what the shard size limit counts).
    pub fn raw_bytes(&self) -> u64 {
        self.raw_bytes
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn finish(mut self) -> Result<PathBuf> {
        let io = Error::io(&self.tmp);
        let index_offset = self.pos;
        let mut index = Vec::with_capacity(self.entries.len() * INDEX_ENTRY_LEN as usize);
        for e in &self.entries {
            index.extend_from_slice(&e.offset.to_le_bytes());
            index.extend_from_slice(&e.compressed_len.to_le_bytes());
            index.extend_from_slice(&e.raw_len.to_le_bytes());
            index.extend_from_slice(&e.checksum.to_le_bytes());
        }
        let header = encode_header(
            self.codec,
            self.entries.len() as u64,
            index_offset,
            self.raw_bytes,
        );
        let result = (|| {
            self.out.write_all(&index)?;
            self.out.seek(SeekFrom::Start(0))?;
            self.out.write_all(&header)?;
            self.out.flush()?;
            self.out.get_ref().sync_all()
        })();
        result.map_err(io)?;
        drop(self.out);
        std::fs::rename(&self.tmp, &self.path).map_err(Error::io(&self.path))?;
        // The shard's name is durable before any manifest can point at it.
        crate::sync_parent(&self.path)?;
        fail::fail_point!("formats::shard-committed");
        Ok(self.path)
    }
}

fn encode_header(
    codec: Codec,
    record_count: u64,
    index_offset: u64,
    raw_bytes: u64,
) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[0..8].copy_from_slice(&CODEC_SHARD_MAGIC);
    h[8..12].copy_from_slice(&CODEC_SHARD_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&codec.code().to_le_bytes());
    h[16..24].copy_from_slice(&record_count.to_le_bytes());
    h[24..32].copy_from_slice(&index_offset.to_le_bytes());
    h[32..40].copy_from_slice(&raw_bytes.to_le_bytes());
    h
}

/// An open, validated codec shard. Reads are positional (`pread`), so one handle serves many threads.
pub struct CodecShard {
    path: PathBuf,
    file: File,
    codec: Codec,
    entries: Vec<IndexEntry>,
    raw_bytes: u64,
}

impl CodecShard {
    pub fn open(path: &Path) -> Result<Self> {
        let corrupt = |problem: String| Error::Corrupt {
            path: path.to_path_buf(),
            what: "codec shard",
            problem,
            fix: FIX_REBUILD.to_string(),
        };
        let file = File::open(path).map_err(Error::io(path))?;
        let file_len = file.metadata().map_err(Error::io(path))?.len();
        if file_len < HEADER_LEN {
            return Err(corrupt(format!("the file is {file_len} bytes, shorter than the {HEADER_LEN}-byte header (truncated?)")));
        }
        let mut h = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut h, 0).map_err(Error::io(path))?;
        if h[0..8] != CODEC_SHARD_MAGIC {
            return Err(corrupt(format!(
                "bad magic {:02x?}, expected \"CLMCODEC\"",
                &h[0..8]
            )));
        }
        let le32 = |r: std::ops::Range<usize>| u32::from_le_bytes(h[r].try_into().unwrap());
        let le64 = |r: std::ops::Range<usize>| u64::from_le_bytes(h[r].try_into().unwrap());
        let version = le32(8..12);
        if version != CODEC_SHARD_VERSION {
            return Err(Error::Corrupt {
                path: path.to_path_buf(),
                what: "codec shard",
                problem: format!("format version {version}, this build reads version {CODEC_SHARD_VERSION}"),
                fix: "use the codeclm version that wrote the dataset, or rebuild the dataset with this one".into(),
            });
        }
        let codec = Codec::from_code(le32(12..16))
            .ok_or_else(|| corrupt(format!("unknown codec code {}", le32(12..16))))?;
        let count = le64(16..24);
        let index_offset = le64(24..32);
        let raw_bytes = le64(32..40);
        let expected_len = count
            .checked_mul(INDEX_ENTRY_LEN)
            .and_then(|n| n.checked_add(index_offset))
            .ok_or_else(|| {
                corrupt(format!(
                    "header is inconsistent: {count} records at index offset {index_offset}"
                ))
            })?;
        if index_offset < HEADER_LEN || expected_len != file_len {
            return Err(corrupt(format!(
                "the header says {count} records with the index at byte {index_offset} (file size {expected_len}), but the file is {file_len} bytes"
            )));
        }
        let mut index = vec![0u8; (count * INDEX_ENTRY_LEN) as usize];
        file.read_exact_at(&mut index, index_offset)
            .map_err(Error::io(path))?;
        let mut entries = Vec::with_capacity(count as usize);
        let mut expected_offset = HEADER_LEN;
        let mut raw_total = 0u64;
        for (i, e) in index.chunks_exact(INDEX_ENTRY_LEN as usize).enumerate() {
            let entry = IndexEntry {
                offset: u64::from_le_bytes(e[0..8].try_into().unwrap()),
                compressed_len: u32::from_le_bytes(e[8..12].try_into().unwrap()),
                raw_len: u32::from_le_bytes(e[12..16].try_into().unwrap()),
                checksum: u64::from_le_bytes(e[16..24].try_into().unwrap()),
            };
            if entry.offset != expected_offset {
                return Err(corrupt(format!(
                    "record {i} starts at byte {}, expected {expected_offset}",
                    entry.offset
                )));
            }
            expected_offset += entry.compressed_len as u64;
            raw_total += entry.raw_len as u64;
            entries.push(entry);
        }
        if expected_offset != index_offset {
            return Err(corrupt(format!(
                "records end at byte {expected_offset} but the index starts at {index_offset}"
            )));
        }
        if raw_total != raw_bytes {
            return Err(corrupt(format!(
                "records add up to {raw_total} bytes, the header says {raw_bytes}"
            )));
        }
        Ok(CodecShard {
            path: path.to_path_buf(),
            file,
            codec,
            entries,
            raw_bytes,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn raw_bytes(&self) -> u64 {
        self.raw_bytes
    }

    pub fn entry(&self, record: usize) -> Option<IndexEntry> {
        self.entries.get(record).copied()
    }

    /// Reads, decompresses and checksums one record.
    pub fn read(&self, record: usize) -> Result<Vec<u8>> {
        let e = self.entries.get(record).ok_or_else(|| {
            Error::Invalid(format!(
                "{}: record {record} out of range (the shard holds {})",
                self.path.display(),
                self.entries.len()
            ))
        })?;
        let mut frame = vec![0u8; e.compressed_len as usize];
        self.file
            .read_exact_at(&mut frame, e.offset)
            .map_err(Error::io(&self.path))?;
        let corrupt = |problem: String| Error::Corrupt {
            path: self.path.clone(),
            what: "codec shard",
            problem,
            fix: FIX_REBUILD.to_string(),
        };
        // The frame's header says what it decodes to; it must agree with the index before
        // `raw_len` (up to 4 GiB, unchecksummed) sizes anything.
        match zstd::zstd_safe::get_frame_content_size(&frame) {
            Ok(Some(n)) if n == e.raw_len as u64 => {}
            Ok(Some(n)) => {
                return Err(corrupt(format!(
                    "record {record} decodes to {n} bytes, the index says {}",
                    e.raw_len
                )))
            }
            Ok(None) | Err(_) => {
                return Err(corrupt(format!(
                    "record {record} is not a zstd frame with its size recorded"
                )))
            }
        }
        // One decompression context per thread, reused: creating one per record was half of
        // `dataset tokenize`'s time on small records (a profile at 1M records).
        thread_local! {
            static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
                const { std::cell::RefCell::new(None) };
        }
        let raw = DECOMPRESSOR
            .with(|d| -> std::io::Result<Vec<u8>> {
                let mut d = d.borrow_mut();
                if d.is_none() {
                    *d = Some(zstd::bulk::Decompressor::new()?);
                }
                match d.as_mut() {
                    Some(d) => d.decompress(&frame, e.raw_len as usize),
                    None => zstd::bulk::decompress(&frame, e.raw_len as usize),
                }
            })
            .map_err(|err| corrupt(format!("record {record} does not decompress: {err}")))?;
        if raw.len() != e.raw_len as usize || checksum(&raw) != e.checksum {
            return Err(corrupt(format!("record {record} fails its checksum")));
        }
        Ok(raw)
    }

    /// Reads every record in order.
    pub fn iter(&self) -> impl Iterator<Item = Result<Vec<u8>>> + '_ {
        (0..self.entries.len()).map(move |i| self.read(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, records: &[&[u8]]) -> PathBuf {
        let path = dir.join("s.shard");
        let mut w = CodecShardWriter::create(&path, Codec::Jpeg, DEFAULT_ZSTD_LEVEL).unwrap();
        for r in records {
            w.append(r).unwrap();
        }
        w.finish().unwrap()
    }

    /// A record compressed on another thread and appended is the record `append` writes: the
    /// same shard bytes.
    #[test]
    fn records_compressed_elsewhere_write_the_same_shard() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<Vec<u8>> = (0..50u32)
            .map(|i| (0..i * 37).map(|k| (k * 7 + i) as u8).collect())
            .collect();
        let (a, b) = (dir.path().join("a.shard"), dir.path().join("b.shard"));
        let mut wa = CodecShardWriter::create(&a, Codec::Jpeg, 3).unwrap();
        let mut wb = CodecShardWriter::create(&b, Codec::Jpeg, 3).unwrap();
        for r in &records {
            let la = wa.append(r).unwrap();
            let compressed = std::thread::scope(|s| {
                s.spawn(|| CompressedRecord::new(r, 3).unwrap())
                    .join()
                    .unwrap()
            });
            assert_eq!(compressed.raw_len(), r.len() as u64);
            assert_eq!(wb.append_compressed(&compressed).unwrap(), la);
        }
        wa.finish().unwrap();
        wb.finish().unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    }

    #[test]
    fn round_trip_and_random_access() {
        let dir = tempfile::tempdir().unwrap();
        let a = vec![0xFFu8; 5000];
        let b: Vec<u8> = (0..70_000u32)
            .map(|i| ((i * 2654435761u32) >> 24) as u8)
            .collect();
        let path = write(dir.path(), &[&a, b"", &b]);
        assert!(!crate::tmp_path(&path).exists());
        let shard = CodecShard::open(&path).unwrap();
        assert_eq!(shard.len(), 3);
        assert_eq!(shard.codec(), Codec::Jpeg);
        assert_eq!(shard.raw_bytes(), (a.len() + b.len()) as u64);
        assert_eq!(shard.read(2).unwrap(), b);
        assert_eq!(shard.read(1).unwrap(), b"");
        assert_eq!(shard.read(0).unwrap(), a);
        assert!(shard.read(3).is_err());
    }

    #[test]
    fn truncated_shard_names_file_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &[b"hello", b"world"]);
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 5).unwrap();
        let msg = CodecShard::open(&path).err().unwrap().to_string();
        assert!(msg.contains("s.shard"), "{msg}");
        assert!(msg.contains("rerun `codeclm dataset build`"), "{msg}");
    }

    #[test]
    fn foreign_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.shard");
        std::fs::write(&path, vec![7u8; 200]).unwrap();
        let msg = CodecShard::open(&path).err().unwrap().to_string();
        assert!(msg.contains("bad magic"), "{msg}");
    }

    #[test]
    fn flipped_payload_byte_fails_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &[&[1u8; 300]]);
        let mut bytes = std::fs::read(&path).unwrap();
        // Byte 64 is the start of the first zstd frame (its magic): damage the payload after it.
        let last_payload = (bytes.len() - INDEX_ENTRY_LEN as usize) - 1;
        bytes[last_payload] ^= 0x55;
        std::fs::write(&path, &bytes).unwrap();
        let shard = CodecShard::open(&path).unwrap();
        assert!(shard.read(0).is_err());
    }
}
