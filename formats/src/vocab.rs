//! Byte-level BPE vocabularies as standard Hugging Face `tokenizer.json` files, and a fast,
//! exact encoder/decoder for them.
//!
//! Bytes become characters with the paper's mapping `chr(b + 0x2800)` (the Braille block, as in
//! the authors' code: `chr(b + 10240)`), so an ordinary BPE runs over them and special tokens
//! (`<s>`, `</s>`, ASCII) can never collide with data. Python reads the same file:
//! `Tokenizer.from_file(p).encode(''.join(chr(b + 0x2800) for b in data), add_special_tokens=False).ids`
//! gives the ids [`Vocab::encode`] gives.
//!
//! The encoder here is the HF `BPE` model's merge loop (lowest merge rank first, leftmost on
//! ties; `models/bpe/word.rs`), specialised to a byte alphabet: no strings, no cache, no regex.
//! Pre-tokenization is one of three splits, written into the JSON as `Split` pre-tokenizers with
//! `merged_with_next` so that `tokenizers` splits identically.

use std::collections::{BinaryHeap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tokens::MAX_VOCAB;

/// First code point of the byte alphabet: byte `b` is `char::from_u32(0x2800 + b)`.
pub const BYTE_CHAR_BASE: u32 = 0x2800;
pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";
pub const PAD: &str = "<pad>";
/// Largest tokenizer.json read: 65,536 tokens and their merges take a few MB; this leaves room
/// for long tokens and refuses a stray multi-GB file before it is read.
pub const MAX_VOCAB_FILE_BYTES: u64 = 256 << 20;

pub fn byte_char(b: u8) -> char {
    char::from_u32(BYTE_CHAR_BASE + b as u32).expect("the Braille block is valid")
}

pub fn bytes_to_chars(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| byte_char(b)).collect()
}

/// Where a byte stream is cut before BPE runs on each piece (merges never cross a cut).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PreTokenize {
    /// One piece per stream.
    None,
    /// Before every `FF` byte (JPEG markers and stuffed `FF 00`).
    BeforeFf,
    /// Before every JPEG restart marker `FF D0`..`FF D7`: one piece per restart interval (MCU).
    RestartMarkers,
    /// Before every H.264 Annex B start code `00 00 01`: one piece per NAL unit.
    StartCodes,
}

impl PreTokenize {
    /// The literal byte patterns that start a new piece.
    fn delimiters(self) -> Vec<Vec<u8>> {
        match self {
            PreTokenize::None => vec![],
            PreTokenize::BeforeFf => vec![vec![0xFF]],
            PreTokenize::RestartMarkers => (0xD0..=0xD7).map(|m| vec![0xFF, m]).collect(),
            PreTokenize::StartCodes => vec![vec![0, 0, 1]],
        }
    }

    /// The `pre_tokenizer` entry of tokenizer.json that splits the same way.
    pub fn to_json(self) -> serde_json::Value {
        let splits: Vec<serde_json::Value> = self
            .delimiters()
            .into_iter()
            .map(|d| {
                serde_json::json!({
                    "type": "Split",
                    "pattern": {"String": bytes_to_chars(&d)},
                    "behavior": "MergedWithNext",
                    "invert": false
                })
            })
            .collect();
        match splits.len() {
            0 => serde_json::Value::Null,
            1 => splits.into_iter().next().unwrap_or_default(),
            _ => serde_json::json!({"type": "Sequence", "pretokenizers": splits}),
        }
    }

    fn from_json(v: &serde_json::Value) -> Option<PreTokenize> {
        [
            PreTokenize::None,
            PreTokenize::BeforeFf,
            PreTokenize::RestartMarkers,
            PreTokenize::StartCodes,
        ]
        .into_iter()
        .find(|p| p.to_json() == *v)
    }

    /// Piece boundaries of `bytes` (start offsets, first is 0), as `Split` + `MergedWithNext`
    /// produces them. With several delimiters (a `Sequence`), each split runs on the pieces of
    /// the previous one; for these non-overlapping literal patterns that is the same as cutting
    /// before every occurrence of any of them.
    pub fn piece_starts(self, bytes: &[u8], out: &mut Vec<usize>) {
        out.clear();
        out.push(0);
        match self {
            PreTokenize::None => {}
            PreTokenize::BeforeFf => out.extend(
                bytes
                    .iter()
                    .enumerate()
                    .skip(1)
                    .filter(|(_, &b)| b == 0xFF)
                    .map(|(i, _)| i),
            ),
            PreTokenize::RestartMarkers => out.extend(
                bytes
                    .windows(2)
                    .enumerate()
                    .skip(1)
                    .filter(|(_, w)| w[0] == 0xFF && (0xD0..=0xD7).contains(&w[1]))
                    .map(|(i, _)| i),
            ),
            PreTokenize::StartCodes => {
                let mut i = 1;
                while i + 3 <= bytes.len() {
                    if bytes[i..i + 3] == [0, 0, 1] {
                        out.push(i);
                        i += 3; // literal matches do not overlap
                    } else {
                        i += 1;
                    }
                }
            }
        }
    }
}

/// The merge table's hasher: Fx-style multiply-rotate over the two u32 ids (SipHash, the
/// default, was a quarter of `dataset tokenize`'s time; the keys are token ids, not input an
/// attacker picks, and the table is built once from the vocabulary).
type PairHash = std::hash::BuildHasherDefault<PairHasher>;

#[derive(Default)]
struct PairHasher(u64);

impl std::hash::Hasher for PairHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u32(b as u32);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0.rotate_left(5) ^ n as u64).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A loaded vocabulary: what encoding, decoding and the token shards need.
#[derive(Clone, Debug)]
pub struct Vocab {
    /// xxh3-64 of the tokenizer.json bytes, 16 hex digits: names token sets and checks shards.
    pub hash: String,
    pub size: u32,
    pub bos: u32,
    pub eos: u32,
    pub pretokenize: PreTokenize,
    byte_ids: [u32; 256],
    /// (left, right) -> (rank, merged id)
    merges: HashMap<(u32, u32), (u32, u32), PairHash>,
    /// id -> bytes it stands for (empty for special tokens)
    id_bytes: Vec<Vec<u8>>,
    special: Vec<bool>,
}

fn invalid(path: &Path, problem: impl Into<String>) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        what: "byte-level BPE vocabulary (tokenizer.json)",
        problem: problem.into(),
        fix: "train one with `codeclm vocab train`".into(),
    }
}

/// Refuses a list longer than a u16 vocabulary can use, before anything is sized by it.
fn at_most_max_vocab(path: &Path, n: usize, what: &str) -> Result<()> {
    if n > MAX_VOCAB as usize {
        return Err(invalid(
            path,
            format!("{n} {what}; u16 token shards hold at most {MAX_VOCAB} tokens"),
        ));
    }
    Ok(())
}

impl Vocab {
    pub fn load(path: &Path) -> Result<Vocab> {
        // A vocabulary of u16 ids is a few MB; refuse a huge file before reading it.
        let len = std::fs::metadata(path).map_err(Error::io(path))?.len();
        if len > MAX_VOCAB_FILE_BYTES {
            return Err(invalid(
                path,
                format!("it is {len} bytes; a vocabulary of at most {MAX_VOCAB} tokens fits in {MAX_VOCAB_FILE_BYTES}"),
            ));
        }
        let bytes = std::fs::read(path).map_err(Error::io(path))?;
        Vocab::from_json(&bytes, path)
    }

    /// Parses a tokenizer.json (`path` is only used in errors). Every id is checked before
    /// anything is sized by it: ids are `0..size` with no gap and no duplicate, and `size` is
    /// at most [`MAX_VOCAB`] (token shards are u16).
    pub fn from_json(bytes: &[u8], path: &Path) -> Result<Vocab> {
        let json: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| invalid(path, e.to_string()))?;
        let model = &json["model"];
        if model["type"] != "BPE" {
            return Err(invalid(
                path,
                format!("model type {} is not BPE", model["type"]),
            ));
        }
        let vocab = model["vocab"]
            .as_object()
            .ok_or_else(|| invalid(path, "no model.vocab"))?;
        let added = json["added_tokens"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        at_most_max_vocab(path, vocab.len(), "entries in model.vocab")?;
        let checked_id = |what: &dyn std::fmt::Display, id: &serde_json::Value| {
            let id = id
                .as_u64()
                .ok_or_else(|| invalid(path, format!("{what} has no integer id ({id})")))?;
            if id >= MAX_VOCAB as u64 {
                return Err(invalid(
                    path,
                    format!("{what} has id {id}; u16 token shards hold ids below {MAX_VOCAB}"),
                ));
            }
            Ok(id as u32)
        };
        // id -> its string in model.vocab: a second string with the same id is refused.
        let mut names: HashMap<u32, &str> = HashMap::with_capacity(vocab.len());
        for (s, id) in vocab {
            let id = checked_id(&format_args!("token {s:?}"), id)?;
            if let Some(other) = names.insert(id, s) {
                return Err(invalid(
                    path,
                    format!("tokens {other:?} and {s:?} share id {id}"),
                ));
            }
        }
        let mut added_ids = Vec::with_capacity(added.len());
        for t in added {
            let content = t["content"].as_str().unwrap_or("");
            let id = checked_id(&format_args!("added token {content:?}"), &t["id"])?;
            if let Some(other) = names.get(&id).filter(|&&o| o != content) {
                return Err(invalid(
                    path,
                    format!(
                        "added token {content:?} has id {id}, which model.vocab gives to {other:?}"
                    ),
                ));
            }
            added_ids.push(id);
        }
        let size = names.keys().chain(&added_ids).max().map_or(0, |&m| m + 1);
        let mut used = vec![false; size as usize];
        for &id in names.keys().chain(&added_ids) {
            used[id as usize] = true;
        }
        if let Some(gap) = used.iter().position(|&u| !u) {
            return Err(invalid(
                path,
                format!(
                    "no token has id {gap}, below the largest id {}: ids must run 0..{size} without gaps",
                    size - 1
                ),
            ));
        }
        let mut id_bytes = vec![Vec::new(); size as usize];
        let mut special = vec![false; size as usize];
        let mut byte_ids = [u32::MAX; 256];
        let mut by_string: HashMap<&str, u32> = HashMap::new();
        for (s, id) in vocab {
            let id = id.as_u64().unwrap_or_default() as u32; // checked above
            let decoded: Option<Vec<u8>> = s
                .chars()
                .map(|c| {
                    (c as u32)
                        .checked_sub(BYTE_CHAR_BASE)
                        .filter(|b| *b < 256)
                        .map(|b| b as u8)
                })
                .collect();
            match decoded {
                Some(b) => {
                    if b.len() == 1 {
                        byte_ids[b[0] as usize] = id;
                    }
                    id_bytes[id as usize] = b;
                }
                None => special[id as usize] = true,
            }
            by_string.insert(s.as_str(), id);
        }
        for (t, &id) in added.iter().zip(&added_ids) {
            special[id as usize] = true;
            id_bytes[id as usize].clear();
            if let Some(c) = t["content"].as_str() {
                by_string.insert(c, id);
            }
        }
        if let Some(b) = byte_ids.iter().position(|&id| id == u32::MAX) {
            return Err(invalid(
                path,
                format!("byte {b:#04x} has no token: not a full byte-level vocabulary"),
            ));
        }
        let merge_list = model["merges"].as_array().map_or(&[][..], Vec::as_slice);
        // Each merge makes a token.
        at_most_max_vocab(path, merge_list.len(), "merges")?;
        let mut merges = HashMap::with_capacity_and_hasher(merge_list.len(), PairHash::default());
        for (rank, m) in merge_list.iter().enumerate() {
            let (a, b) = match m {
                serde_json::Value::String(s) => s
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string())),
                serde_json::Value::Array(p) if p.len() == 2 => Some((
                    p[0].as_str().unwrap_or("").to_string(),
                    p[1].as_str().unwrap_or("").to_string(),
                )),
                _ => None,
            }
            .ok_or_else(|| invalid(path, format!("merge {rank} is malformed")))?;
            let ab = format!("{a}{b}");
            let lookup = |s: &str| {
                by_string
                    .get(s)
                    .copied()
                    .ok_or_else(|| invalid(path, format!("merge {rank} uses unknown token {s:?}")))
            };
            merges.insert((lookup(&a)?, lookup(&b)?), (rank as u32, lookup(&ab)?));
        }
        let id_of = |s: &str| {
            by_string
                .get(s)
                .copied()
                .ok_or_else(|| invalid(path, format!("no special token {s}")))
        };
        let pretokenize = PreTokenize::from_json(&json["pre_tokenizer"]).ok_or_else(|| {
            invalid(
                path,
                format!("unsupported pre_tokenizer {}", json["pre_tokenizer"]),
            )
        })?;
        Ok(Vocab {
            hash: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes)),
            size,
            bos: id_of(BOS)?,
            eos: id_of(EOS)?,
            pretokenize,
            byte_ids,
            merges,
            id_bytes,
            special,
        })
    }

    /// The tokenizer.json of the smallest vocabulary: `<s>` `</s>` `<pad>` (ids 0, 1, 2) and
    /// the 256 bytes (ids 3..259), no merges. For synthetic token sets (tests, benchmarks).
    pub fn bytes_only_json() -> Vec<u8> {
        let mut vocab = serde_json::Map::new();
        for (i, s) in [BOS, EOS, PAD].iter().enumerate() {
            vocab.insert(s.to_string(), i.into());
        }
        for b in 0..=255u8 {
            vocab.insert(bytes_to_chars(&[b]), (3 + b as u32).into());
        }
        let special = |id: u32, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        };
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [special(0, BOS), special(1, EOS), special(2, PAD)],
            "normalizer": null,
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": []}
        });
        json.to_string().into_bytes()
    }

    pub fn merges(&self) -> usize {
        self.merges.len()
    }

    /// Appends the token ids of `bytes` (no BOS/EOS) to `out`.
    pub fn encode(&self, bytes: &[u8], out: &mut Vec<u32>) {
        let mut starts = Vec::new();
        self.pretokenize.piece_starts(bytes, &mut starts);
        let mut work = Work::default();
        for (i, &start) in starts.iter().enumerate() {
            let end = starts.get(i + 1).copied().unwrap_or(bytes.len());
            if start < end {
                self.encode_piece(&bytes[start..end], &mut work, out);
            }
        }
    }

    /// HF `Word::merge_all` on one piece: a heap of candidate merges ordered by (rank, position).
    fn encode_piece(&self, piece: &[u8], w: &mut Work, out: &mut Vec<u32>) {
        if piece.len() == 1 {
            out.push(self.byte_ids[piece[0] as usize]);
            return;
        }
        let n = piece.len();
        w.ids.clear();
        w.ids
            .extend(piece.iter().map(|&b| self.byte_ids[b as usize]));
        w.prev.clear();
        w.prev.extend((0..n).map(|i| i as isize - 1));
        w.next.clear();
        w.next
            .extend((0..n).map(|i| if i + 1 < n { i as isize + 1 } else { -1 }));
        w.alive.clear();
        w.alive.resize(n, true);
        w.heap.clear();
        for i in 0..n - 1 {
            if let Some(&(rank, new)) = self.merges.get(&(w.ids[i], w.ids[i + 1])) {
                w.heap.push(Candidate { rank, pos: i, new });
            }
        }
        while let Some(top) = w.heap.pop() {
            if !w.alive[top.pos] || w.next[top.pos] < 0 {
                continue;
            }
            let right = w.next[top.pos] as usize;
            // Skip stale candidates: the pair at this position is no longer the one queued.
            match self.merges.get(&(w.ids[top.pos], w.ids[right])) {
                Some(&(_, new)) if new == top.new => {}
                _ => continue,
            }
            w.ids[top.pos] = top.new;
            w.alive[right] = false;
            let after = w.next[right];
            w.next[top.pos] = after;
            if after >= 0 {
                w.prev[after as usize] = top.pos as isize;
            }
            let prev = w.prev[top.pos];
            if prev >= 0 {
                if let Some(&(rank, new)) = self.merges.get(&(w.ids[prev as usize], w.ids[top.pos]))
                {
                    w.heap.push(Candidate {
                        rank,
                        pos: prev as usize,
                        new,
                    });
                }
            }
            if after >= 0 {
                if let Some(&(rank, new)) =
                    self.merges.get(&(w.ids[top.pos], w.ids[after as usize]))
                {
                    w.heap.push(Candidate {
                        rank,
                        pos: top.pos,
                        new,
                    });
                }
            }
        }
        out.extend((0..n).filter(|&i| w.alive[i]).map(|i| w.ids[i]));
    }

    /// The bytes a token sequence stands for; special tokens (BOS, EOS, PAD) are skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 2);
        for &id in ids {
            match self.id_bytes.get(id as usize) {
                Some(b) if !self.special[id as usize] => out.extend_from_slice(b),
                Some(_) => {}
                None => {
                    return Err(Error::Invalid(format!(
                        "token id {id} is outside the vocabulary of {} entries",
                        self.size
                    )))
                }
            }
        }
        Ok(out)
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The bytes of one token (empty for special tokens).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.id_bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Appends to `ids` the longest prefix of `tokens` whose bytes fit in the first `cut`
    /// bytes; returns where those bytes end (`<= cut`). A prompt cut this way is a context the
    /// model saw in training, whatever the merges.
    pub fn token_prefix(&self, tokens: &[u32], cut: usize, ids: &mut Vec<u32>) -> usize {
        let mut end = 0;
        for &t in tokens {
            let len = self.token_bytes(t).len();
            if end + len > cut {
                break;
            }
            end += len;
            ids.push(t);
        }
        end
    }
}

#[derive(Default)]
struct Work {
    ids: Vec<u32>,
    prev: Vec<isize>,
    next: Vec<isize>,
    alive: Vec<bool>,
    heap: BinaryHeap<Candidate>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Candidate {
    rank: u32,
    pos: usize,
    new: u32,
}

impl Ord for Candidate {
    /// Max-heap order that pops the lowest rank first, then the leftmost position (HF's `Merge`).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .rank
            .cmp(&self.rank)
            .then_with(|| other.pos.cmp(&self.pos))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny hand-written vocabulary: 3 specials, 256 bytes, merges FF+D0, (FFD0)+00, 00+00.
    pub(crate) fn tiny(pre: PreTokenize) -> Vocab {
        let json = tiny_json(pre);
        Vocab::from_json(json.to_string().as_bytes(), Path::new("tiny.json")).unwrap()
    }

    fn tiny_json(pre: PreTokenize) -> serde_json::Value {
        let mut vocab = serde_json::Map::new();
        for (i, s) in [BOS, EOS, PAD].iter().enumerate() {
            vocab.insert(s.to_string(), i.into());
        }
        for b in 0..=255u8 {
            vocab.insert(bytes_to_chars(&[b]), (3 + b as u32).into());
        }
        let merges = [vec![0xFF, 0xD0], vec![0xFF, 0xD0, 0x00], vec![0x00, 0x00]];
        for (i, m) in merges.iter().enumerate() {
            vocab.insert(bytes_to_chars(m), (259 + i as u32).into());
        }
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": [
                {"id": 0, "content": BOS, "special": true, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false},
                {"id": 1, "content": EOS, "special": true, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false},
                {"id": 2, "content": PAD, "special": true, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false}
            ],
            "pre_tokenizer": pre.to_json(),
            "model": {"type": "BPE", "vocab": vocab, "merges": [
                format!("{} {}", bytes_to_chars(&[0xFF]), bytes_to_chars(&[0xD0])),
                format!("{} {}", bytes_to_chars(&[0xFF, 0xD0]), bytes_to_chars(&[0x00])),
                format!("{} {}", bytes_to_chars(&[0x00]), bytes_to_chars(&[0x00])),
            ]}
        });
        json
    }

    #[test]
    fn merges_apply_by_rank_then_leftmost() {
        let v = tiny(PreTokenize::None);
        let mut ids = Vec::new();
        v.encode(&[0xFF, 0xD0, 0x00, 0x00, 0x00], &mut ids);
        // FF D0 -> 259, then (FFD0)00 -> 260 (rank 1) before 00 00 (rank 2), then 00 00 -> 261.
        assert_eq!(ids, vec![260, 261]);
        ids.clear();
        v.encode(&[0x00, 0x00, 0x00], &mut ids);
        assert_eq!(ids, vec![261, 3], "leftmost pair merges first");
        assert_eq!(
            v.decode(&[0, 260, 261, 1]).unwrap(),
            vec![0xFF, 0xD0, 0, 0, 0]
        );
    }

    #[test]
    fn pretokenization_stops_merges_at_cuts() {
        let v = tiny(PreTokenize::BeforeFf);
        let mut ids = Vec::new();
        v.encode(&[0x00, 0xFF, 0xD0, 0x00], &mut ids);
        assert_eq!(ids, vec![3, 260]);
        let v = tiny(PreTokenize::StartCodes);
        let mut starts = Vec::new();
        v.pretokenize
            .piece_starts(&[0, 0, 1, 5, 0, 0, 1, 0, 0, 1], &mut starts);
        assert_eq!(starts, vec![0, 4, 7]);
    }

    #[test]
    fn round_trip_random_bytes() {
        let v = tiny(PreTokenize::RestartMarkers);
        let mut state = 0x9E3779B97F4A7C15u64;
        for len in [0usize, 1, 2, 17, 500, 4096] {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 7;
                    state ^= state >> 9;
                    [0xFF, 0xD0, 0x00, (state >> 32) as u8][(state % 4) as usize]
                })
                .collect();
            let mut ids = Vec::new();
            v.encode(&bytes, &mut ids);
            assert_eq!(v.decode(&ids).unwrap(), bytes);
        }
    }

    #[test]
    fn malformed_vocabularies_are_refused_with_the_file() {
        let err = Vocab::from_json(
            b"{\"model\": {\"type\": \"WordPiece\"}}",
            Path::new("v.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("v.json") && err.contains("codeclm vocab train"),
            "{err}"
        );
    }

    /// Issue 17: a vocabulary with an absurd size or id is a typed error naming the file and
    /// the fix, not an allocation abort (an id of 10^9 sized a table of 10^9 entries) or a
    /// panic (an id of 2^32 - 1 wrapped the size to 0; ids past u16 loaded and failed later).
    #[test]
    fn absurd_ids_and_sizes_are_typed_errors() {
        type Edit = Box<dyn Fn(&mut serde_json::Value)>;
        let tok = |s: &[u8]| bytes_to_chars(s);
        let cases: Vec<(&str, Edit, &str)> = vec![
            (
                "a vocab of 10^9 entries claimed",
                Box::new(move |j| {
                    j["model"]["vocab"][tok(&[0xFF, 0xD0])] = 1_000_000_000u64.into()
                }),
                "has id 1000000000",
            ),
            (
                "an id of 4e9",
                Box::new(move |j| {
                    j["model"]["vocab"][tok(&[0x00, 0x00])] = 4_294_967_295u64.into()
                }),
                "has id 4294967295",
            ),
            (
                "an id past u16",
                Box::new(move |j| j["model"]["vocab"][tok(&[0x00, 0x00])] = 70_000.into()),
                "below 65536",
            ),
            (
                "an id as a float",
                Box::new(move |j| j["model"]["vocab"][tok(&[0x00, 0x00])] = 4e9.into()),
                "no integer id",
            ),
            (
                "an added token past u16",
                Box::new(|j| j["added_tokens"][2]["id"] = 65_536.into()),
                "added token \"<pad>\" has id 65536",
            ),
            (
                "an added token on another's id",
                Box::new(|j| j["added_tokens"][2]["id"] = 100.into()),
                "which model.vocab gives to",
            ),
            (
                "duplicate ids",
                Box::new(move |j| j["model"]["vocab"][tok(&[0x00, 0x00])] = 259.into()),
                "share id 259",
            ),
            (
                "a gap in the ids",
                Box::new(move |j| {
                    j["model"]["vocab"]
                        .as_object_mut()
                        .unwrap()
                        .remove(&tok(&[0xFF, 0xD0]));
                    j["model"]["merges"] = serde_json::json!([]);
                }),
                "no token has id 259",
            ),
            (
                "a merge of an unknown token",
                Box::new(|j| j["model"]["merges"][1] = "\u{2800}x \u{2801}".into()),
                "merge 1 uses unknown token",
            ),
            (
                "more merges than u16 tokens",
                Box::new(|j| {
                    j["model"]["merges"] = serde_json::Value::Array(vec!["a b".into(); 70_000])
                }),
                "70000 merges",
            ),
        ];
        for (what, edit, want) in cases {
            let mut json = tiny_json(PreTokenize::None);
            edit(&mut json);
            let err = Vocab::from_json(json.to_string().as_bytes(), Path::new("dir/v.json"))
                .err()
                .unwrap_or_else(|| panic!("{what}: loaded"));
            assert!(matches!(err, Error::Corrupt { .. }), "{what}: {err:?}");
            let msg = err.to_string();
            assert!(
                msg.contains("dir/v.json")
                    && msg.contains(want)
                    && msg.contains("codeclm vocab train"),
                "{what}: {msg}"
            );
        }
    }

    /// A file far larger than any u16 vocabulary is refused before it is read.
    #[test]
    fn a_huge_vocabulary_file_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.json");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(MAX_VOCAB_FILE_BYTES + 1).unwrap(); // sparse: no disk, no reading
        let msg = Vocab::load(&path).unwrap_err().to_string();
        assert!(
            msg.contains("huge.json")
                && msg.contains("bytes")
                && msg.contains("codeclm vocab train"),
            "{msg}"
        );
    }
}
