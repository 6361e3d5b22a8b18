//! Token shards and the per-vocabulary token manifest.
//!
//! A token shard holds the documents of one dataset part under one vocabulary: each document is
//! `BOS + tokens + EOS`, documents back to back, as little-endian u16 in a single zstd frame.
//!
//! ```text
//! 0   magic          8 bytes "CLMTOKEN"
//! 8   version        u32     TOKEN_SHARD_VERSION
//! 12  token_bytes    u32     2 (u16 tokens; vocabularies over 65,536 entries are refused)
//! 16  vocab_size     u32
//! 20  reserved       u32
//! 24  vocab_hash     u64     xxh3-64 of the tokenizer.json bytes (its hex is the set's name)
//! 32  token_count    u64
//! 40  doc_count      u64
//! 48  payload_len    u64     compressed bytes after the header; the file ends there
//! 56  reserved       8 bytes
//! 64  payload        zstd frame (content size recorded) of token_count x u16 LE
//! ```
//! `DIR/tokens-<hash>.parquet` maps every tokenized sample to its shard, offset (in tokens, at
//! its BOS) and length (BOS and EOS included); it joins `samples.parquet` on `sample_id`.

use std::path::{Path, PathBuf};

use polars::prelude::*;

use crate::error::{Error, Result};

pub const TOKEN_SHARD_MAGIC: [u8; 8] = *b"CLMTOKEN";
pub const TOKEN_SHARD_VERSION: u32 = 1;
pub const TOKEN_HEADER_LEN: usize = 64;
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

/// Collects documents in memory and writes them as one shard (atomically) on `finish`.
pub struct TokenShardWriter {
    vocab_size: u32,
    vocab_hash: u64,
    tokens: Vec<u16>,
    docs: u64,
}

impl TokenShardWriter {
    pub fn new(vocab_size: u32, vocab_hash: &str) -> Result<Self> {
        if vocab_size > MAX_VOCAB {
            return Err(Error::Invalid(format!(
                "a vocabulary of {vocab_size} entries does not fit u16 token shards (at most {MAX_VOCAB}); train a smaller one"
            )));
        }
        let vocab_hash = u64::from_str_radix(vocab_hash, 16)
            .map_err(|_| Error::Invalid(format!("bad vocabulary hash {vocab_hash:?}")))?;
        Ok(TokenShardWriter {
            vocab_size,
            vocab_hash,
            tokens: Vec::new(),
            docs: 0,
        })
    }

    /// Appends one document (already framed with BOS/EOS); returns its offset in tokens.
    pub fn push_doc(&mut self, ids: &[u32]) -> Result<u64> {
        let offset = self.tokens.len() as u64;
        for &id in ids {
            if id >= self.vocab_size {
                return Err(Error::Invalid(format!(
                    "token id {id} is outside the vocabulary of {} entries",
                    self.vocab_size
                )));
            }
            self.tokens.push(id as u16);
        }
        self.docs += 1;
        Ok(offset)
    }

    pub fn token_count(&self) -> u64 {
        self.tokens.len() as u64
    }

    pub fn finish(self, path: &Path) -> Result<()> {
        let raw: Vec<u8> = self.tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        let payload = zstd::bulk::compress(&raw, 3).map_err(Error::io(path))?;
        let mut h = [0u8; TOKEN_HEADER_LEN];
        h[0..8].copy_from_slice(&TOKEN_SHARD_MAGIC);
        h[8..12].copy_from_slice(&TOKEN_SHARD_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&2u32.to_le_bytes());
        h[16..20].copy_from_slice(&self.vocab_size.to_le_bytes());
        h[24..32].copy_from_slice(&self.vocab_hash.to_le_bytes());
        h[32..40].copy_from_slice(&(self.tokens.len() as u64).to_le_bytes());
        h[40..48].copy_from_slice(&self.docs.to_le_bytes());
        h[48..56].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        let mut file = h.to_vec();
        file.extend_from_slice(&payload);
        crate::write_atomic(path, &file)
    }
}

/// A validated token shard, decompressed.
#[derive(Debug)]
pub struct TokenShard {
    pub vocab_size: u32,
    pub vocab_hash: String,
    pub docs: u64,
    pub tokens: Vec<u16>,
}

impl TokenShard {
    /// Opens and checks a shard; with `expect_hash`, also that it belongs to that vocabulary.
    pub fn open(path: &Path, expect_hash: Option<&str>) -> Result<TokenShard> {
        let corrupt = |problem: String| Error::Corrupt {
            path: path.to_path_buf(),
            what: "token shard",
            problem,
            fix: FIX_RETOKENIZE.into(),
        };
        let bytes = std::fs::read(path).map_err(Error::io(path))?;
        if bytes.len() < TOKEN_HEADER_LEN {
            return Err(corrupt(format!(
                "{} bytes is shorter than the header",
                bytes.len()
            )));
        }
        if bytes[0..8] != TOKEN_SHARD_MAGIC {
            return Err(corrupt(format!(
                "bad magic {:02x?}, expected \"CLMTOKEN\"",
                &bytes[0..8]
            )));
        }
        let le32 = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        let le64 = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        if le32(8) != TOKEN_SHARD_VERSION || le32(12) != 2 {
            return Err(corrupt(format!("version {} with {}-byte tokens; this build reads version {TOKEN_SHARD_VERSION}, u16", le32(8), le32(12))));
        }
        let (vocab_size, hash, count, docs, payload_len) = (
            le32(16),
            format!("{:016x}", le64(24)),
            le64(32),
            le64(40),
            le64(48),
        );
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
        if TOKEN_HEADER_LEN as u64 + payload_len != bytes.len() as u64 {
            return Err(corrupt(format!(
                "the header says {payload_len} payload bytes, the file has {}",
                bytes.len() - TOKEN_HEADER_LEN
            )));
        }
        let raw = zstd::bulk::decompress(&bytes[TOKEN_HEADER_LEN..], (count * 2) as usize)
            .map_err(|e| corrupt(format!("payload does not decompress: {e}")))?;
        if raw.len() as u64 != count * 2 {
            return Err(corrupt(format!(
                "payload holds {} tokens, the header says {count}",
                raw.len() / 2
            )));
        }
        let tokens: Vec<u16> = raw
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        if let Some(bad) = tokens.iter().find(|&&t| t as u32 >= vocab_size) {
            return Err(corrupt(format!(
                "token {bad} is outside the vocabulary of {vocab_size}"
            )));
        }
        Ok(TokenShard {
            vocab_size,
            vocab_hash: hash,
            docs,
            tokens,
        })
    }
}

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
}

pub fn write_token_rows(rows: &[TokenRow], path: &Path) -> Result<()> {
    macro_rules! col {
        ($name:literal, $f:expr) => {
            Column::new($name.into(), rows.iter().map($f).collect::<Vec<_>>())
        };
    }
    let mut df = DataFrame::new(
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
        ],
    )
    .map_err(Error::parquet(path))?;
    crate::samples::write_dataframe(&mut df, path)
}

pub fn read_token_rows(path: &Path) -> Result<Vec<TokenRow>> {
    let df = crate::samples::read_dataframe(path)?;
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
    use crate::samples::{parse_column, Modality, Split};
    (0..df.height())
        .map(|i| -> Result<TokenRow> {
            let m = modality.get(i).unwrap_or_default();
            let sp = split.get(i).unwrap_or_default();
            Ok(TokenRow {
                sample_id: id.get(i).unwrap_or_default().into(),
                modality: parse_column(path, "token manifest", i, "modality", m, Modality::parse)?,
                split: parse_column(path, "token manifest", i, "split", sp, Split::parse)?,
                part: part.get(i).unwrap_or_default(),
                shard: shard.get(i).unwrap_or_default().into(),
                offset: offset.get(i).unwrap_or_default(),
                n_tokens: n.get(i).unwrap_or_default(),
                codec_bytes: codec.get(i).unwrap_or_default(),
            })
        })
        .collect()
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
    let mut rows = Vec::new();
    for p in &parts {
        rows.extend(read_token_rows(p)?);
    }
    write_token_rows(&rows, &layout.manifest_path())?;
    Ok(rows.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_round_trip_and_validation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tok");
        let mut w = TokenShardWriter::new(320, "00000000000000ab").unwrap();
        assert_eq!(w.push_doc(&[0, 5, 300, 1]).unwrap(), 0);
        assert_eq!(w.push_doc(&[0, 7, 1]).unwrap(), 4);
        assert!(
            w.push_doc(&[320]).is_err(),
            "ids past the vocabulary are refused"
        );
        w.finish(&path).unwrap();
        let s = TokenShard::open(&path, Some("00000000000000ab")).unwrap();
        assert_eq!((s.docs, s.tokens.clone()), (2, vec![0, 5, 300, 1, 0, 7, 1]));
        let err = TokenShard::open(&path, Some("00000000000000cd"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("a.tok") && err.contains("vocabulary"), "{err}");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert!(TokenShard::open(&path, None)
            .unwrap_err()
            .to_string()
            .contains("codeclm dataset tokenize"));
        assert!(
            TokenShardWriter::new(70_000, "00").is_err(),
            "a vocabulary over u16 is refused"
        );
    }
}
