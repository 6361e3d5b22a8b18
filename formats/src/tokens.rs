//! Token shards and the per-vocabulary token manifest.
//!
//! A token shard holds the documents of one dataset part under one vocabulary: each document is
//! `BOS + tokens + EOS`, documents back to back, as little-endian u16. The tokens are cut into
//! independent zstd frames of [`FRAME_TOKENS`] tokens (the last frame may hold fewer; a document
//! may span frames), and an index at the end says where each frame is, so a reader seeks to any
//! token range and decompresses only the frames it covers. Token `t` is in frame
//! `t / frame_tokens`.
//!
//! ```text
//! header (64 bytes, written first)
//! 0   magic          8 bytes "CLMTOKEN"
//! 8   version        u32     TOKEN_SHARD_VERSION (2)
//! 12  token_bytes    u32     2 (u16 tokens; vocabularies over 65,536 entries are refused)
//! 16  vocab_size     u32
//! 20  frame_tokens   u32     tokens per frame; every frame but the last holds exactly this many
//! 24  vocab_hash     u64     xxh3-64 of the tokenizer.json bytes (its hex is the set's name)
//! 32  reserved       32 bytes, zero
//! 64  frames         zstd frames back to back (content size recorded), u16 LE tokens
//! index_offset       frame_count entries of 32 bytes:
//!     0  offset          u64  byte offset of the frame in the file
//!     8  compressed_len  u32
//!     12 token_count     u32
//!     16 first_token     u64  index of the frame's first token in the shard
//!     24 checksum        u64  xxh3-64 of the frame's decompressed bytes
//! footer (the last 48 bytes)
//! 0   index_offset   u64
//! 8   frame_count    u64
//! 16  token_count    u64
//! 24  doc_count      u64
//! 32  checksum       u64     xxh3-64 of header + index + footer bytes 0..32
//! 40  magic          8 bytes "CLMTKEND"
//! ```
//! The writer streams: it compresses and writes a frame whenever one fills, and writes the
//! index and footer last (a file without its footer is refused). Version 1 (a single zstd
//! stream, read whole) is refused with [`Error::OldVersion`]; `codeclm dataset tokenize`
//! rewrites such shards.
//!
//! `DIR/tokens-<hash>.parquet` maps every tokenized sample to its shard, offset (in tokens, at
//! its BOS) and length (BOS and EOS included); it joins `samples.parquet` on `sample_id`. Each
//! row also records `codec_part_hash`, the [`crate::samples::part_hash`] of the codec part it was
//! tokenized from (null in manifests written before it was), by which a retokenize finds stale
//! parts; [`ManifestHash`] is the manifest's content hash, which a training run records.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::error::{Error, Result};

pub const TOKEN_SHARD_MAGIC: [u8; 8] = *b"CLMTOKEN";
pub const TOKEN_SHARD_VERSION: u32 = 2;
pub const TOKEN_HEADER_LEN: usize = 64;
pub const TOKEN_FOOTER_MAGIC: [u8; 8] = *b"CLMTKEND";
pub const TOKEN_FOOTER_LEN: usize = 48;
/// Bytes per frame-index entry.
pub const FRAME_ENTRY_LEN: usize = 32;
/// Tokens per frame (32 KiB of u16). The training loader reads documents in shuffled order and
/// decodes the frames each one touches, so frames are kept near a document's size (a 256x256
/// JPEG is ~4,200 tokens): 3x the loader throughput of 64 Ki-token frames and 57x that of 1 Mi
/// for 2.6% more bytes than 64 Ki (docs/tokens.md). The index costs 32 bytes a frame.
pub const FRAME_TOKENS: u32 = 1 << 14;
/// Largest frame a reader accepts (32 MiB decoded): a header claiming more is refused at open,
/// so no frame allocates more than this.
pub const MAX_FRAME_TOKENS: u32 = 1 << 24;
/// Largest vocabulary a u16 shard can hold.
pub const MAX_VOCAB: u32 = 1 << 16;

const FIX_RETOKENIZE: &str = "delete it and its part manifest under tokens/<hash>/parts/ and rerun `codeclm dataset tokenize` with the same vocabulary";

/// Where a vocabulary's token set lives inside a dataset.
#[derive(Clone, Debug)]
pub struct TokenLayout {
    pub root: PathBuf,
    pub hash: String,
}

impl TokenLayout {
    pub fn new(root: impl Into<PathBuf>, hash: &str) -> Self {
        TokenLayout {
            root: root.into(),
            hash: hash.to_string(),
        }
    }
    pub fn dir(&self) -> PathBuf {
        self.root.join("tokens").join(&self.hash)
    }
    pub fn vocab_path(&self) -> PathBuf {
        self.dir().join("vocab.json")
    }
    pub fn parts_dir(&self) -> PathBuf {
        self.dir().join("parts")
    }
    pub fn part_manifest(&self, part: u32) -> PathBuf {
        self.parts_dir().join(format!("part-{part:06}.parquet"))
    }
    /// Shard path relative to the dataset root (what the manifest stores).
    pub fn shard_rel(&self, part: u32) -> String {
        format!("tokens/{}/part-{part:06}.tok", self.hash)
    }
    pub fn manifest_path(&self) -> PathBuf {
        self.root.join(format!("tokens-{}.parquet", self.hash))
    }
    pub fn create_dirs(&self) -> Result<()> {
        std::fs::create_dir_all(self.parts_dir()).map_err(Error::io(self.parts_dir()))
    }
    /// Token sets present in a dataset (their hashes), sorted.
    pub fn list(root: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(root.join("tokens"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("vocab.json").exists())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }
}

/// A token set of a dataset, named the one way every command names it (`--vocab`): a hash, a
/// unique hash prefix, a vocabulary json path, or nothing when the dataset has exactly one.
#[derive(Clone, Debug)]
pub struct TokenSet {
    pub hash: String,
    pub layout: TokenLayout,
    pub vocab: crate::vocab::Vocab,
}

impl TokenSet {
    /// Resolves `spec` against the token sets of the dataset at `root` and loads the vocabulary.
    /// A vocabulary json needs no token set in the dataset yet (decoding ids needs only the
    /// vocabulary); [`TokenSet::require_tokens`] checks that its shards exist.
    pub fn resolve(root: &Path, spec: Option<&str>) -> Result<TokenSet> {
        let sets = TokenLayout::list(root);
        let fix = tokenize_fix(root, "VOCAB.json");
        let hash = match spec {
            None => match sets.as_slice() {
                [one] => one.clone(),
                [] => {
                    return Err(Error::Invalid(format!(
                        "dataset {} has no token shards. Fix: {fix}",
                        root.display()
                    )))
                }
                many => {
                    return Err(Error::Invalid(format!(
                        "dataset {} has {} token sets ({}); pick one with --vocab HASH",
                        root.display(),
                        many.len(),
                        many.join(", ")
                    )))
                }
            },
            Some(v) if v.ends_with(".json") || Path::new(v).is_file() => {
                let vocab = crate::vocab::Vocab::load(Path::new(v))?;
                return Ok(TokenSet {
                    hash: vocab.hash.clone(),
                    layout: TokenLayout::new(root, &vocab.hash),
                    vocab,
                });
            }
            Some(prefix) => {
                let hits: Vec<&String> = sets.iter().filter(|s| s.starts_with(prefix)).collect();
                match hits.as_slice() {
                    [one] => (*one).clone(),
                    [] => {
                        return Err(Error::Invalid(format!(
                            "dataset {} has no token set {prefix:?}; it has [{}]. Fix: pass one of those to --vocab, or {fix}",
                            root.display(),
                            sets.join(", "),
                        )))
                    }
                    _ => {
                        return Err(Error::Invalid(format!(
                            "--vocab {prefix:?} matches several token sets ({}); give more digits",
                            hits.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                        )))
                    }
                }
            }
        };
        let layout = TokenLayout::new(root, &hash);
        let vocab = crate::vocab::Vocab::load(&layout.vocab_path())?;
        if vocab.hash != hash {
            return Err(Error::Invalid(format!(
                "{} has hash {}, but its token set is named {hash}: the vocabulary file was replaced. Fix: {}",
                layout.vocab_path().display(),
                vocab.hash,
                tokenize_fix(root, "THE_ORIGINAL_VOCAB.json")
            )));
        }
        Ok(TokenSet {
            hash,
            layout,
            vocab,
        })
    }

    /// Checks that the dataset holds this set's tokens (`tokens-<hash>.parquet`, written when
    /// tokenization finished); the error names the command that writes them.
    pub fn require_tokens(&self) -> Result<()> {
        let manifest = self.layout.manifest_path();
        if manifest.exists() {
            return Ok(());
        }
        let vocab = if self.layout.vocab_path().exists() {
            self.layout.vocab_path().display().to_string()
        } else {
            "VOCAB.json".into()
        };
        Err(Error::Invalid(format!(
            "dataset {} has no finished tokens for vocabulary {} ({} is missing). Fix: {}",
            self.layout.root.display(),
            self.hash,
            manifest.display(),
            tokenize_fix(&self.layout.root, &vocab)
        )))
    }
}

fn tokenize_fix(root: &Path, vocab: &str) -> String {
    format!(
        "run `codeclm dataset tokenize --dataset {} --vocab {vocab}` first",
        root.display()
    )
}

/// One frame of a token shard, as its index records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameEntry {
    /// Byte offset of the zstd frame in the file.
    pub offset: u64,
    pub compressed_len: u32,
    pub token_count: u32,
    /// Index of the frame's first token in the shard.
    pub first_token: u64,
    /// xxh3-64 of the frame's decompressed bytes (u16 LE tokens).
    pub checksum: u64,
}

impl FrameEntry {
    fn to_bytes(self) -> [u8; FRAME_ENTRY_LEN] {
        let mut b = [0u8; FRAME_ENTRY_LEN];
        b[0..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..12].copy_from_slice(&self.compressed_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.token_count.to_le_bytes());
        b[16..24].copy_from_slice(&self.first_token.to_le_bytes());
        b[24..32].copy_from_slice(&self.checksum.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> FrameEntry {
        FrameEntry {
            offset: le64(b, 0),
            compressed_len: le32(b, 8),
            token_count: le32(b, 12),
            first_token: le64(b, 16),
            checksum: le64(b, 24),
        }
    }

    /// One past the frame's last token.
    pub fn end_token(&self) -> u64 {
        self.first_token + self.token_count as u64
    }
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

fn header_bytes(vocab_size: u32, frame_tokens: u32, vocab_hash: u64) -> [u8; TOKEN_HEADER_LEN] {
    let mut h = [0u8; TOKEN_HEADER_LEN];
    h[0..8].copy_from_slice(&TOKEN_SHARD_MAGIC);
    h[8..12].copy_from_slice(&TOKEN_SHARD_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&2u32.to_le_bytes());
    h[16..20].copy_from_slice(&vocab_size.to_le_bytes());
    h[20..24].copy_from_slice(&frame_tokens.to_le_bytes());
    h[24..32].copy_from_slice(&vocab_hash.to_le_bytes());
    h
}

/// The footer's checksum: header, index and the footer's first 32 bytes.
fn footer_checksum(header: &[u8], index: &[u8], footer_head: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(header);
    h.update(index);
    h.update(footer_head);
    h.digest()
}

/// Writes a shard as documents arrive: a frame is compressed and written whenever
/// `frame_tokens` tokens have accumulated, so memory stays at one frame plus the index. The
/// file is written under a temp name and renamed into place by [`TokenShardWriter::finish`]; a
/// writer dropped before that removes its temp file.
pub struct TokenShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<BufWriter<File>>,
    header: [u8; TOKEN_HEADER_LEN],
    vocab_size: u32,
    frame_tokens: u32,
    /// The open frame's tokens as u16 LE bytes.
    raw: Vec<u8>,
    compressor: zstd::bulk::Compressor<'static>,
    frames: Vec<FrameEntry>,
    written: u64,
    tokens: u64,
    docs: u64,
}

impl TokenShardWriter {
    /// A writer for the shard at `path` with frames of [`FRAME_TOKENS`] tokens.
    pub fn create(path: &Path, vocab_size: u32, vocab_hash: &str) -> Result<Self> {
        Self::with_frame_tokens(path, vocab_size, vocab_hash, FRAME_TOKENS)
    }

    /// Like [`TokenShardWriter::create`] with another frame size: tests and benchmarks use small
    /// frames to put documents across frame boundaries; readers take any size from the header.
    pub fn with_frame_tokens(
        path: &Path,
        vocab_size: u32,
        vocab_hash: &str,
        frame_tokens: u32,
    ) -> Result<Self> {
        if vocab_size > MAX_VOCAB {
            return Err(Error::Invalid(format!(
                "a vocabulary of {vocab_size} entries does not fit u16 token shards (at most {MAX_VOCAB}); train a smaller one"
            )));
        }
        if frame_tokens == 0 || frame_tokens > MAX_FRAME_TOKENS {
            return Err(Error::Invalid(format!(
                "frames hold 1 to {MAX_FRAME_TOKENS} tokens, not {frame_tokens}"
            )));
        }
        let hash = u64::from_str_radix(vocab_hash, 16)
            .map_err(|_| Error::Invalid(format!("bad vocabulary hash {vocab_hash:?}")))?;
        let tmp = crate::tmp_path(path);
        let file = File::create(&tmp).map_err(Error::io(&tmp))?;
        let mut file = BufWriter::with_capacity(1 << 20, file);
        let header = header_bytes(vocab_size, frame_tokens, hash);
        file.write_all(&header).map_err(Error::io(&tmp))?;
        Ok(TokenShardWriter {
            path: path.to_path_buf(),
            tmp,
            file: Some(file),
            header,
            vocab_size,
            frame_tokens,
            raw: Vec::with_capacity(frame_tokens as usize * 2),
            compressor: zstd::bulk::Compressor::new(3).map_err(Error::io(path))?,
            frames: Vec::new(),
            written: TOKEN_HEADER_LEN as u64,
            tokens: 0,
            docs: 0,
        })
    }

    /// Appends one document (already framed with BOS/EOS); returns its offset in tokens.
    pub fn push_doc(&mut self, ids: &[u32]) -> Result<u64> {
        if let Some(&id) = ids.iter().find(|&&id| id >= self.vocab_size) {
            return Err(Error::Invalid(format!(
                "token id {id} is outside the vocabulary of {} entries",
                self.vocab_size
            )));
        }
        let offset = self.tokens;
        let frame_bytes = self.frame_tokens as usize * 2;
        for &id in ids {
            self.raw.extend_from_slice(&(id as u16).to_le_bytes());
            if self.raw.len() == frame_bytes {
                self.flush_frame()?;
            }
        }
        self.tokens += ids.len() as u64;
        self.docs += 1;
        Ok(offset)
    }

    pub fn token_count(&self) -> u64 {
        self.tokens
    }

    fn flush_frame(&mut self) -> Result<()> {
        if self.raw.is_empty() {
            return Ok(());
        }
        let tmp = &self.tmp;
        let compressed = self
            .compressor
            .compress(&self.raw)
            .map_err(Error::io(tmp))?;
        let count = (self.raw.len() / 2) as u32;
        let first_token = self.frames.last().map_or(0, FrameEntry::end_token);
        self.frames.push(FrameEntry {
            offset: self.written,
            compressed_len: compressed.len() as u32,
            token_count: count,
            first_token,
            checksum: xxh3_64(&self.raw),
        });
        let file = self
            .file
            .as_mut()
            .expect("an unfinished writer has its file");
        file.write_all(&compressed).map_err(Error::io(tmp))?;
        self.written += compressed.len() as u64;
        self.raw.clear();
        Ok(())
    }

    /// Writes the last frame, the index and the footer, syncs, and renames the file into place.
    pub fn finish(mut self) -> Result<()> {
        self.flush_frame()?;
        let index: Vec<u8> = self.frames.iter().flat_map(|f| f.to_bytes()).collect();
        let mut footer = [0u8; TOKEN_FOOTER_LEN];
        footer[0..8].copy_from_slice(&self.written.to_le_bytes());
        footer[8..16].copy_from_slice(&(self.frames.len() as u64).to_le_bytes());
        footer[16..24].copy_from_slice(&self.tokens.to_le_bytes());
        footer[24..32].copy_from_slice(&self.docs.to_le_bytes());
        let sum = footer_checksum(&self.header, &index, &footer[..32]);
        footer[32..40].copy_from_slice(&sum.to_le_bytes());
        footer[40..48].copy_from_slice(&TOKEN_FOOTER_MAGIC);
        let tmp = self.tmp.clone();
        let mut file = self.file.take().expect("an unfinished writer has its file");
        file.write_all(&index).map_err(Error::io(&tmp))?;
        file.write_all(&footer).map_err(Error::io(&tmp))?;
        let file = file
            .into_inner()
            .map_err(|e| Error::io(&tmp)(e.into_error()))?;
        file.sync_all().map_err(Error::io(&tmp))?;
        drop(file);
        std::fs::rename(&tmp, &self.path).map_err(Error::io(&self.path))?;
        // Durable before the token manifest that points at it is written.
        crate::sync_parent(&self.path)
    }
}

impl Drop for TokenShardWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The version field of a token shard (`None` when the file is missing or is not a token
/// shard): lets `codeclm dataset tokenize` rewrite shards of older versions.
pub fn shard_version(path: &Path) -> Option<u32> {
    let file = File::open(path).ok()?;
    let mut head = [0u8; 12];
    file.read_exact_at(&mut head, 0).ok()?;
    (head[0..8] == TOKEN_SHARD_MAGIC).then(|| le32(&head, 8))
}

/// Reusable buffers for decoding frames (a reader that decodes many frames allocates once).
pub struct FrameBuffers {
    compressed: Vec<u8>,
    raw: Vec<u8>,
    decompressor: zstd::bulk::Decompressor<'static>,
}

impl FrameBuffers {
    pub fn new() -> Result<FrameBuffers> {
        Ok(FrameBuffers {
            compressed: Vec::new(),
            raw: Vec::new(),
            decompressor: zstd::bulk::Decompressor::new()
                .map_err(|e| Error::Invalid(format!("zstd: {e}")))?,
        })
    }
}

/// An open, validated token shard: header, footer and frame index are read and checked at
/// open; frames are read and decompressed (and their checksums checked) only when asked for.
#[derive(Debug)]
pub struct TokenShard {
    pub path: PathBuf,
    pub vocab_size: u32,
    pub vocab_hash: String,
    pub docs: u64,
    pub token_count: u64,
    /// Tokens per frame (all frames but the last).
    pub frame_tokens: u32,
    frames: Vec<FrameEntry>,
    file: File,
}

impl TokenShard {
    /// Opens and checks a shard; with `expect_hash`, also that it belongs to that vocabulary.
    /// Reads the header, the footer and the frame index, not the frames.
    pub fn open(path: &Path, expect_hash: Option<&str>) -> Result<TokenShard> {
        let corrupt = |problem: String| Error::Corrupt {
            path: path.to_path_buf(),
            what: "token shard",
            problem,
            fix: FIX_RETOKENIZE.into(),
        };
        let file = File::open(path).map_err(Error::io(path))?;
        let len = file.metadata().map_err(Error::io(path))?.len();
        let read = |buf: &mut [u8], at: u64| file.read_exact_at(buf, at).map_err(Error::io(path));
        if len < 12 {
            return Err(corrupt(format!("{len} bytes is shorter than the header")));
        }
        let mut header = [0u8; TOKEN_HEADER_LEN];
        read(&mut header[..(len as usize).min(TOKEN_HEADER_LEN)], 0)?;
        if header[0..8] != TOKEN_SHARD_MAGIC {
            return Err(corrupt(format!(
                "bad magic {:02x?}, expected \"CLMTOKEN\"",
                &header[0..8]
            )));
        }
        let version = le32(&header, 8);
        if version < TOKEN_SHARD_VERSION {
            return Err(Error::OldVersion {
                path: path.to_path_buf(),
                what: "token shard",
                found: version,
                want: TOKEN_SHARD_VERSION,
                fix: retokenize_fix(path),
            });
        }
        if version != TOKEN_SHARD_VERSION || le32(&header, 12) != 2 {
            return Err(corrupt(format!(
                "version {version} with {}-byte tokens; this build reads version {TOKEN_SHARD_VERSION}, u16",
                le32(&header, 12)
            )));
        }
        if len < (TOKEN_HEADER_LEN + TOKEN_FOOTER_LEN) as u64 {
            return Err(corrupt(format!(
                "{len} bytes is shorter than the header and footer"
            )));
        }
        let (vocab_size, frame_tokens) = (le32(&header, 16), le32(&header, 20));
        if frame_tokens == 0 || frame_tokens > MAX_FRAME_TOKENS {
            return Err(corrupt(format!(
                "the header says frames of {frame_tokens} tokens (1 to {MAX_FRAME_TOKENS} are valid)"
            )));
        }
        let hash = format!("{:016x}", le64(&header, 24));
        if let Some(want) = expect_hash {
            if want != hash {
                return Err(Error::Corrupt {
                    path: path.to_path_buf(),
                    what: "token shard",
                    problem: format!("it was written with vocabulary {hash}, not {want}"),
                    fix: "pass the vocabulary the token set is named after, or retokenize with `codeclm dataset tokenize`".into(),
                });
            }
        }
        let mut footer = [0u8; TOKEN_FOOTER_LEN];
        read(&mut footer, len - TOKEN_FOOTER_LEN as u64)?;
        if footer[40..48] != TOKEN_FOOTER_MAGIC {
            return Err(corrupt(
                "no footer (\"CLMTKEND\" missing at the end): the file is truncated or was not finished".into(),
            ));
        }
        let (index_offset, frame_count) = (le64(&footer, 0), le64(&footer, 8));
        let (token_count, docs) = (le64(&footer, 16), le64(&footer, 24));
        let index_len = frame_count.checked_mul(FRAME_ENTRY_LEN as u64);
        let expected_len = index_len
            .and_then(|l| l.checked_add(index_offset))
            .and_then(|l| l.checked_add(TOKEN_FOOTER_LEN as u64));
        if expected_len != Some(len) || index_offset < TOKEN_HEADER_LEN as u64 {
            return Err(corrupt(format!(
                "the footer places {frame_count} index entries at byte {index_offset}, which does not end the {len}-byte file"
            )));
        }
        let mut index = vec![0u8; frame_count as usize * FRAME_ENTRY_LEN];
        read(&mut index, index_offset)?;
        let sum = footer_checksum(&header, &index, &footer[..32]);
        if sum != le64(&footer, 32) {
            return Err(corrupt(
                "the header, frame index or footer fails its checksum".into(),
            ));
        }
        let frames: Vec<FrameEntry> = index
            .chunks_exact(FRAME_ENTRY_LEN)
            .map(FrameEntry::from_bytes)
            .collect();
        let (mut at, mut first) = (TOKEN_HEADER_LEN as u64, 0u64);
        for (i, f) in frames.iter().enumerate() {
            let last = i + 1 == frames.len();
            let full = f.token_count == frame_tokens;
            if f.offset != at
                || f.first_token != first
                || f.token_count == 0
                || f.token_count > frame_tokens
                || (!last && !full)
            {
                return Err(corrupt(format!(
                    "frame {i} of the index (offset {}, {} tokens from token {}) does not follow frame {} (frames of {frame_tokens} tokens, back to back from byte {TOKEN_HEADER_LEN})",
                    f.offset, f.token_count, f.first_token, i as i64 - 1
                )));
            }
            at += f.compressed_len as u64;
            first += f.token_count as u64;
        }
        if at != index_offset || first != token_count {
            return Err(corrupt(format!(
                "the frames hold {first} tokens in {} bytes; the footer says {token_count} tokens before byte {index_offset}",
                at - TOKEN_HEADER_LEN as u64
            )));
        }
        Ok(TokenShard {
            path: path.to_path_buf(),
            vocab_size,
            vocab_hash: hash,
            docs,
            token_count,
            frame_tokens,
            frames,
            file,
        })
    }

    pub fn frames(&self) -> &[FrameEntry] {
        &self.frames
    }

    /// The frame holding token `token` (which must be below `token_count`).
    pub fn frame_of(&self, token: u64) -> usize {
        (token / self.frame_tokens as u64) as usize
    }

    fn corrupt_frame(&self, i: usize, problem: String) -> Error {
        let f = &self.frames[i];
        Error::Corrupt {
            path: self.path.clone(),
            what: "token shard",
            problem: format!(
                "frame {i} (tokens {}..{}, bytes {}..{}) {problem}",
                f.first_token,
                f.end_token(),
                f.offset,
                f.offset + f.compressed_len as u64
            ),
            fix: FIX_RETOKENIZE.into(),
        }
    }

    /// Reads, decompresses and checks frame `i` (checksum, length, every id inside the
    /// vocabulary) into `out` (replacing its contents).
    pub fn read_frame_into(
        &self,
        i: usize,
        buf: &mut FrameBuffers,
        out: &mut Vec<u16>,
    ) -> Result<()> {
        let f = self.frames[i];
        buf.compressed.resize(f.compressed_len as usize, 0);
        self.file
            .read_exact_at(&mut buf.compressed, f.offset)
            .map_err(Error::io(&self.path))?;
        let want = f.token_count as usize * 2;
        // The frame's own header says how much it decodes to: checked before anything is sized
        // by it (a frame is at most MAX_FRAME_TOKENS tokens, checked at open).
        match zstd::zstd_safe::get_frame_content_size(&buf.compressed) {
            Ok(Some(n)) if n == want as u64 => {}
            Ok(Some(n)) => {
                return Err(
                    self.corrupt_frame(i, format!("decodes to {n} bytes, the index says {want}"))
                )
            }
            Ok(None) | Err(_) => {
                return Err(
                    self.corrupt_frame(i, "is not a zstd frame with its size recorded".into())
                )
            }
        }
        buf.raw.clear();
        buf.raw.reserve(want + 1);
        let n = buf
            .decompressor
            .decompress_to_buffer(&buf.compressed[..], &mut buf.raw)
            .map_err(|e| self.corrupt_frame(i, format!("does not decompress: {e}")))?;
        if n != want {
            return Err(self.corrupt_frame(i, format!("holds {n} bytes, the index says {want}")));
        }
        if xxh3_64(&buf.raw) != f.checksum {
            return Err(self.corrupt_frame(i, "fails its checksum".into()));
        }
        out.clear();
        out.extend(
            buf.raw
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]])),
        );
        if let Some(bad) = out.iter().find(|&&t| t as u32 >= self.vocab_size) {
            return Err(self.corrupt_frame(
                i,
                format!(
                    "holds token {bad}, outside the vocabulary of {}",
                    self.vocab_size
                ),
            ));
        }
        Ok(())
    }

    /// Tokens `start..start + len`, decompressing only the frames they are in.
    pub fn read_range(&self, start: u64, len: u64) -> Result<Vec<u16>> {
        let end = start.checked_add(len).filter(|&e| e <= self.token_count);
        let Some(end) = end else {
            return Err(Error::Invalid(format!(
                "{}: tokens {start}..{} are past the shard's {} tokens",
                self.path.display(),
                start.saturating_add(len),
                self.token_count
            )));
        };
        // Grown as frames decode (each checked), never sized by the index alone.
        let mut out = Vec::with_capacity(len.min(1 << 20) as usize);
        if len == 0 {
            return Ok(out);
        }
        let (mut buf, mut frame) = (FrameBuffers::new()?, Vec::new());
        for i in self.frame_of(start)..=self.frame_of(end - 1) {
            self.read_frame_into(i, &mut buf, &mut frame)?;
            let first = self.frames[i].first_token;
            let (a, b) = (
                start.max(first) - first,
                end.min(self.frames[i].end_token()) - first,
            );
            out.extend_from_slice(&frame[a as usize..b as usize]);
        }
        Ok(out)
    }

    /// Every token of the shard (small shards, tests and tools; loaders use ranges).
    pub fn read_all(&self) -> Result<Vec<u16>> {
        self.read_range(0, self.token_count)
    }

    /// Decodes and checks every frame in order, handing each one's first token index and
    /// tokens to `f` (which may check more, e.g. document boundaries).
    pub fn for_each_frame(&self, mut f: impl FnMut(u64, &[u16]) -> Result<()>) -> Result<()> {
        let (mut buf, mut frame) = (FrameBuffers::new()?, Vec::new());
        for (i, entry) in self.frames.iter().enumerate() {
            self.read_frame_into(i, &mut buf, &mut frame)?;
            f(entry.first_token, &frame)?;
        }
        Ok(())
    }
}

/// How to replace an old-version shard: the tokenize command, with the dataset and vocabulary
/// read off the shard's path (`DIR/tokens/<hash>/part-N.tok`) when it has that shape.
fn retokenize_fix(path: &Path) -> String {
    let set_dir = path.parent();
    let root = set_dir.and_then(Path::parent).and_then(Path::parent);
    match (set_dir, root) {
        (Some(set), Some(root)) if set.join("vocab.json").exists() => format!(
            "rerun `codeclm dataset tokenize --dataset {} --vocab {}`, which rewrites shards of older versions",
            root.display(),
            set.join("vocab.json").display()
        ),
        _ => "rerun `codeclm dataset tokenize` with the same vocabulary, which rewrites shards of older versions".into(),
    }
}

#[cfg(feature = "manifests")]
pub use crate::token_manifest::*;

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "00000000000000ab";

    /// Documents of `lens` tokens (BOS 0, EOS 1, ids counting up from 3 inside the vocabulary).
    fn docs(lens: &[usize], vocab: u32) -> Vec<Vec<u32>> {
        let mut next = 3u32;
        lens.iter()
            .map(|&n| {
                let mut d = vec![0];
                for _ in 0..n.saturating_sub(2) {
                    d.push(next);
                    next = if next + 1 >= vocab { 3 } else { next + 1 };
                }
                d.push(1);
                d
            })
            .collect()
    }

    fn write(path: &Path, docs: &[Vec<u32>], frame_tokens: u32) -> Vec<u16> {
        let mut w = TokenShardWriter::with_frame_tokens(path, 320, HASH, frame_tokens).unwrap();
        let mut all = Vec::new();
        for d in docs {
            assert_eq!(w.push_doc(d).unwrap(), all.len() as u64);
            all.extend(d.iter().map(|&t| t as u16));
        }
        w.finish().unwrap();
        all
    }

    #[test]
    fn shard_round_trip_across_frames_and_seeks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tok");
        let docs = docs(&[4, 9, 3, 12, 2, 7], 320);
        let all = write(&path, &docs, 5);
        let s = TokenShard::open(&path, Some(HASH)).unwrap();
        assert_eq!((s.docs, s.token_count, s.frame_tokens), (6, 37, 5));
        assert_eq!(s.frames().len(), 8, "37 tokens in frames of 5");
        assert_eq!(s.frames().last().unwrap().token_count, 2);
        assert_eq!(s.read_all().unwrap(), all);
        // The second document (tokens 4..13) spans frames 0, 1 and 2; its middle is in frame 1.
        assert_eq!(s.read_range(4, 9).unwrap(), all[4..13]);
        assert_eq!(s.read_range(8, 3).unwrap(), all[8..11]);
        for start in 0..all.len() {
            for len in 0..=all.len() - start {
                let got = s.read_range(start as u64, len as u64).unwrap();
                assert_eq!(got, all[start..start + len], "tokens {start}+{len}");
            }
        }
        assert!(s.read_range(30, 8).is_err(), "past the end is refused");
        let mut seen = 0;
        s.for_each_frame(|first, t| {
            assert_eq!(t, &all[first as usize..first as usize + t.len()]);
            seen += t.len();
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, all.len());
        // An empty shard is valid: no frames.
        let empty = dir.path().join("e.tok");
        write(&empty, &[], 5);
        let e = TokenShard::open(&empty, None).unwrap();
        assert_eq!((e.token_count, e.frames().len()), (0, 0));
        assert!(e.read_all().unwrap().is_empty());
    }

    #[test]
    fn shard_validation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tok");
        let mut w = TokenShardWriter::create(&path, 320, HASH).unwrap();
        assert_eq!(w.push_doc(&[0, 5, 300, 1]).unwrap(), 0);
        assert!(
            w.push_doc(&[0, 320, 1]).is_err(),
            "ids past the vocabulary are refused"
        );
        assert_eq!(
            w.push_doc(&[0, 7, 1]).unwrap(),
            4,
            "a refused document adds nothing"
        );
        w.finish().unwrap();
        let s = TokenShard::open(&path, Some(HASH)).unwrap();
        assert_eq!(
            (s.docs, s.read_all().unwrap()),
            (2, vec![0, 5, 300, 1, 0, 7, 1])
        );
        let err = TokenShard::open(&path, Some("00000000000000cd"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("a.tok") && err.contains("vocabulary"), "{err}");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = TokenShard::open(&path, None).unwrap_err().to_string();
        assert!(
            err.contains("a.tok") && err.contains("codeclm dataset tokenize"),
            "{err}"
        );
        // A flipped byte in the index fails the footer's checksum.
        let mut b = bytes.clone();
        let at = b.len() - TOKEN_FOOTER_LEN - 20;
        b[at] ^= 1;
        std::fs::write(&path, &b).unwrap();
        let err = TokenShard::open(&path, None).unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
        assert!(
            TokenShardWriter::create(&path, 70_000, "00").is_err(),
            "a vocabulary over u16 is refused"
        );
    }

    /// The writer streams: frames reach the file as they fill, and a writer that is dropped
    /// unfinished leaves nothing behind.
    #[test]
    fn writer_flushes_frames_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tok");
        let mut w = TokenShardWriter::with_frame_tokens(&path, 320, HASH, 64).unwrap();
        for d in docs(&[100; 40], 320) {
            w.push_doc(&d).unwrap();
        }
        let tmp = crate::tmp_path(&path);
        std::fs::File::open(&tmp).unwrap(); // frames go to the temp file...
        assert_eq!(
            w.frames.len(),
            4000 / 64,
            "...one per 64 tokens, as they fill"
        );
        assert!(w.raw.len() < 64 * 2, "at most one open frame is held");
        drop(w);
        assert!(!tmp.exists() && !path.exists());
    }

    /// A damaged frame is found by its checksum (or by zstd) and the error names the file and
    /// the frame; the other frames still read.
    #[test]
    fn a_damaged_frame_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.tok");
        // Pseudo-random ids: zstd stores them nearly as they are.
        let mut x = 0x9E37_79B9u64;
        let doc: Vec<u32> = std::iter::once(0)
            .chain((0..3000).map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                3 + (x % 317) as u32
            }))
            .chain(std::iter::once(1))
            .collect();
        write(&path, &[doc], 1024);
        let clean = std::fs::read(&path).unwrap();
        let s = TokenShard::open(&path, None).unwrap();
        let f1 = s.frames()[1];
        let mut b = clean.clone();
        b[(f1.offset + f1.compressed_len as u64 / 2) as usize] ^= 0x10;
        std::fs::write(&path, &b).unwrap();
        let s = TokenShard::open(&path, None).unwrap();
        let err = s.read_all().unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("b.tok") && msg.contains("frame 1 ") && msg.contains("dataset tokenize"),
            "{msg}"
        );
        assert_eq!(
            s.read_range(0, 1024).unwrap().len(),
            1024,
            "frame 0 is intact"
        );
        // The same frame with a stored checksum that no longer matches (index re-sealed, so
        // only the frame check can catch it).
        let mut b = clean.clone();
        let index_offset = le64(&b[b.len() - TOKEN_FOOTER_LEN..], 0) as usize;
        let entry = index_offset + 2 * FRAME_ENTRY_LEN + 24;
        b[entry] ^= 1;
        let n = b.len();
        let sum = footer_checksum(
            &b[..TOKEN_HEADER_LEN],
            &b[index_offset..n - TOKEN_FOOTER_LEN],
            &b[n - TOKEN_FOOTER_LEN..n - 16],
        );
        b[n - 16..n - 8].copy_from_slice(&sum.to_le_bytes());
        std::fs::write(&path, &b).unwrap();
        let s = TokenShard::open(&path, None).unwrap();
        let msg = s.read_range(2048, 10).unwrap_err().to_string();
        assert!(
            msg.contains("b.tok") && msg.contains("frame 2 ") && msg.contains("checksum"),
            "{msg}"
        );
    }

    /// A version-1 shard (one zstd stream after a 64-byte header) is refused with a typed
    /// error that names the file and the command that rewrites it.
    #[test]
    fn version_one_shards_ask_for_retokenizing() {
        let dir = tempfile::tempdir().unwrap();
        let set = dir.path().join("tokens").join(HASH);
        std::fs::create_dir_all(&set).unwrap();
        std::fs::write(set.join("vocab.json"), b"{}").unwrap();
        let path = set.join("part-000000.tok");
        let raw: Vec<u8> = [0u16, 5, 1].iter().flat_map(|t| t.to_le_bytes()).collect();
        let payload = zstd::bulk::compress(&raw, 3).unwrap();
        let mut h = vec![0u8; TOKEN_HEADER_LEN];
        h[0..8].copy_from_slice(&TOKEN_SHARD_MAGIC);
        h[8..12].copy_from_slice(&1u32.to_le_bytes());
        h[12..16].copy_from_slice(&2u32.to_le_bytes());
        h[16..20].copy_from_slice(&320u32.to_le_bytes());
        h[32..40].copy_from_slice(&3u64.to_le_bytes());
        h[48..56].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        h.extend_from_slice(&payload);
        std::fs::write(&path, &h).unwrap();
        assert_eq!(shard_version(&path), Some(1));
        let err = TokenShard::open(&path, None).unwrap_err();
        assert!(
            matches!(
                err,
                Error::OldVersion {
                    found: 1,
                    want: 2,
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("part-000000.tok")
                && msg.contains("version-1")
                && msg.contains(&format!(
                    "codeclm dataset tokenize --dataset {}",
                    dir.path().display()
                ))
                && msg.contains("vocab.json"),
            "{msg}"
        );
    }
}
