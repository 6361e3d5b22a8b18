//! Training data from a dataset's token shards (`tokens-<hash>.parquet` + `tokens/<hash>/*.tok`),
//! read on demand: frames are decompressed as the stream reaches them, so memory does not grow
//! with the dataset's tokens (a few decoded frames, a few open shards, 24 bytes per document).
//!
//! Training stream: documents (each already `BOS + tokens + EOS` in the shards) of the `train`
//! split, concatenated and cut into windows of `context + 1` tokens that overlap by one (inputs
//! are the first `context`, targets the last `context`). The next document is drawn as follows:
//! pick a modality (`image`, `video`) with probability proportional to its weight, then take
//! that modality's next document in an order shuffled per epoch from `(seed, modality, epoch)`:
//! position `i` of the epoch is document [`Permutation::apply`]`(i)`, a seeded bijection computed
//! on the fly, so no order is ever stored. Everything that decides the stream is in
//! [`LoaderState`], which checkpoints save: a resumed run sees exactly the batches an
//! uninterrupted run would. Windows are prepared on a read-ahead thread; the state the loader
//! shows is that of the last window handed out, never one prepared ahead.
//!
//! Validation: a fixed subset of the `val` documents, the first N by a hash of their sample id
//! (stable as the dataset grows), each document whole ([`TrainingSet::val_subset`]).

use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use codeclm_formats::tokens::{
    for_each_token_row, FrameBuffers, ManifestHash, TokenLayout, TokenRow, TokenSet, TokenShard,
    TokenShardWriter,
};
use codeclm_formats::vocab::Vocab;
use codeclm_formats::{Modality, Split};
use serde::{Deserialize, Serialize};

use crate::rng::Rng;
use crate::{Error, Result};

/// Held-out documents scored by default (`--val-docs`).
pub const DEFAULT_VAL_DOCS: usize = 256;
/// The byte-unigram baseline is fitted on at most this many training documents...
pub const UNIGRAM_FIT_DOCS: usize = 2_000;
/// ...and at most this many of their tokens (64 MB of u16).
pub const UNIGRAM_FIT_TOKENS: u64 = 32 << 20;
/// Open shard files (each holds its frame index: 32 bytes a frame) kept per reader.
const MAX_OPEN_SHARDS: usize = 32;
/// Decoded frames kept per reader: a document across a frame boundary, or a long one read
/// window by window, decodes each frame once.
const MAX_CACHED_FRAMES: usize = 8;
/// Tokens of prepared windows the read-ahead thread may hold (4 MB of u32).
const READ_AHEAD_TOKENS: usize = 1 << 20;
/// Seed of the sample-id hash that orders the validation subset and the unigram sample.
const SUBSET_HASH_SEED: u64 = 0x5A11_D0C5;

/// Where one document is, compactly (24 bytes; one per manifest row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DocRef {
    /// Offset of the document's BOS in its shard, in tokens.
    pub offset: u64,
    /// Tokens, BOS and EOS included.
    pub n_tokens: u32,
    /// The codec bytes the document encodes (for bits per byte).
    pub codec_bytes: u32,
    /// Index into the set's shard list.
    pub shard: u32,
    pub modality: Modality,
    pub split: Split,
}

/// What the read-ahead thread shares with the set: the documents and where their shards are.
struct SetData {
    root: PathBuf,
    hash: String,
    bos: u32,
    eos: u32,
    /// Shard paths relative to `root`, as the manifest names them.
    shards: Vec<String>,
    docs: Vec<DocRef>,
}

impl SetData {
    fn bad_doc(&self, row: usize, problem: &str) -> Error {
        let d = &self.docs[row];
        Error::Data(format!(
            "{}: document {row} of tokens-{}.parquet (offset {}, {} tokens) {problem}. Fix: delete tokens/{}/ and tokens-{}.parquet, then rerun `codeclm dataset tokenize`",
            self.root.join(&self.shards[d.shard as usize]).display(),
            self.hash,
            d.offset,
            d.n_tokens,
            self.hash,
            self.hash
        ))
    }
}

/// A token set of a dataset, resolved and checked, with its documents' places; tokens are read
/// from the shards when asked for.
pub struct TrainingSet {
    pub root: PathBuf,
    pub hash: String,
    /// [`ManifestHash`] of `tokens-<hash>.parquet`: which documents, where (a resumed run
    /// checks it against the one it started on).
    pub manifest_hash: String,
    pub vocab: Vocab,
    data: Arc<SetData>,
    /// `val` rows, ordered by (hash of sample id, row).
    val_order: Vec<u32>,
    /// The `train` rows with the lowest sample-id hashes, in that order (the unigram sample).
    fit_rows: Vec<u32>,
    reader: Mutex<FrameReader>,
}

/// A held-out document of [`TrainingSet::val_subset`].
#[derive(Clone, Debug, PartialEq)]
pub struct ValDoc {
    /// Its row in the token manifest.
    pub row: usize,
    pub codec_bytes: u64,
    /// BOS ... EOS.
    pub tokens: Vec<u16>,
}

/// The order fixed subsets of a split are drawn in (validation, FID's held-out images): by this
/// hash of the sample id, so a subset spreads over the split (all of a photo's crops are not
/// next to each other) and is the same on every machine.
pub fn subset_hash(sample_id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(sample_id.as_bytes(), SUBSET_HASH_SEED)
}

impl TrainingSet {
    /// Opens the token set named by `vocab` (see `codeclm_formats::tokens::TokenSet::resolve`)
    /// and reads its manifest into a compact document table (no shard is read).
    pub fn open(root: &Path, vocab: Option<&str>) -> Result<TrainingSet> {
        let set = TokenSet::resolve(root, vocab)?;
        set.require_tokens()?;
        let TokenSet {
            hash,
            layout,
            vocab,
        } = set;
        let manifest = layout.manifest_path();
        let mut shards: Vec<String> = Vec::new();
        let mut shard_ids: HashMap<String, u32> = HashMap::new();
        // Sized once from the manifest's footer: growing by doubling would hold the old and the
        // new table at once (at 25M documents, 0.4 + 0.8 GB instead of 0.6).
        let mut docs = Vec::with_capacity(codeclm_formats::tokens::token_row_count(&manifest)?);
        let mut val: Vec<(u64, u32)> = Vec::new();
        let mut fit: BinaryHeap<(u64, u32)> = BinaryHeap::new();
        let mut manifest_hash = ManifestHash::default();
        for_each_token_row(&manifest, |r| {
            manifest_hash.add(&r);
            let row = docs.len() as u32;
            let shard = match shard_ids.get(r.shard) {
                Some(&id) => id,
                None => {
                    let id = shards.len() as u32;
                    shards.push(r.shard.to_string());
                    shard_ids.insert(r.shard.to_string(), id);
                    id
                }
            };
            let (Ok(n_tokens), Ok(codec_bytes)) =
                (u32::try_from(r.n_tokens), u32::try_from(r.codec_bytes))
            else {
                return Err(codeclm_formats::Error::Invalid(format!(
                    "{}: sample {} has {} tokens and {} codec bytes; the loader takes documents under 4 Gi of each",
                    manifest.display(),
                    r.sample_id,
                    r.n_tokens,
                    r.codec_bytes
                )));
            };
            if n_tokens < 2 {
                return Err(codeclm_formats::Error::Invalid(format!(
                    "{}: sample {} has {n_tokens} tokens, not a BOS..EOS document. Fix: rerun `codeclm dataset tokenize`",
                    manifest.display(),
                    r.sample_id
                )));
            }
            let h = subset_hash(r.sample_id);
            match r.split {
                Split::Val => val.push((h, row)),
                Split::Train => {
                    fit.push((h, row));
                    if fit.len() > UNIGRAM_FIT_DOCS {
                        fit.pop();
                    }
                }
            }
            docs.push(DocRef {
                offset: r.offset,
                n_tokens,
                codec_bytes,
                shard,
                modality: r.modality,
                split: r.split,
            });
            Ok(())
        })?;
        val.sort_unstable();
        let fit_rows = fit.into_sorted_vec().into_iter().map(|(_, r)| r).collect();
        Ok(TrainingSet {
            root: root.to_path_buf(),
            hash: hash.clone(),
            manifest_hash: manifest_hash.finish(),
            data: Arc::new(SetData {
                root: root.to_path_buf(),
                hash,
                bos: vocab.bos,
                eos: vocab.eos,
                shards,
                docs,
            }),
            vocab,
            val_order: val.into_iter().map(|(_, r)| r).collect(),
            fit_rows,
            reader: Mutex::new(FrameReader::new()?),
        })
    }

    /// Opens every shard once (header, footer, frame index; no frame is decoded) and checks
    /// that every document lies inside its shard. Returns the number of shards.
    pub fn check_shards(&self) -> Result<usize> {
        let d = &self.data;
        let mut end = vec![(0u64, 0usize); d.shards.len()];
        for (row, doc) in d.docs.iter().enumerate() {
            let e = doc.offset + doc.n_tokens as u64;
            if e > end[doc.shard as usize].0 {
                end[doc.shard as usize] = (e, row);
            }
        }
        for (i, rel) in d.shards.iter().enumerate() {
            let shard = TokenShard::open(&d.root.join(rel), Some(&d.hash))?;
            let (e, row) = end[i];
            if e > shard.token_count {
                return Err(d.bad_doc(
                    row,
                    &format!("ends past the shard's {} tokens", shard.token_count),
                ));
            }
        }
        Ok(d.shards.len())
    }

    /// Rows in the token manifest.
    pub fn len(&self) -> usize {
        self.data.docs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.docs.is_empty()
    }

    /// Where document `row` is.
    pub fn row(&self, row: usize) -> DocRef {
        self.data.docs[row]
    }

    /// The tokens of document `row` (BOS and EOS included), read from its shard.
    pub fn doc(&self, row: usize) -> Result<Vec<u16>> {
        let d = &self.data;
        let doc = *d.docs.get(row).ok_or_else(|| {
            Error::Data(format!(
                "token set {} has {} documents, not {row}",
                d.hash,
                d.docs.len()
            ))
        })?;
        let mut out = Vec::with_capacity(doc.n_tokens as usize);
        let mut reader = self
            .reader
            .lock()
            .map_err(|_| Error::Data("a reader of the token set panicked".into()))?;
        reader.read(d, row, 0, doc.n_tokens as usize, |t| {
            out.extend_from_slice(t)
        })?;
        Ok(out)
    }

    /// The first `max_docs` documents of split `val` in the order of a hash of their sample
    /// id, each whole: a fixed held-out subset that stays the same as documents are added
    /// (a new document enters it only if it hashes below the subset's last one).
    pub fn val_subset(&self, max_docs: usize) -> Result<Vec<ValDoc>> {
        self.val_order
            .iter()
            .take(max_docs)
            .map(|&row| {
                let row = row as usize;
                Ok(ValDoc {
                    row,
                    codec_bytes: self.data.docs[row].codec_bytes as u64,
                    tokens: self.doc(row)?,
                })
            })
            .collect()
    }

    /// [`TrainingSet::split`] as u32 rows, sized exactly (a count first): at 25M documents,
    /// 100 MB rather than a growing `Vec<usize>` and its copy.
    fn split_rows(&self, split: Split, modality: Option<&str>) -> Vec<u32> {
        let keep =
            |d: &DocRef| d.split == split && modality.is_none_or(|m| d.modality.as_str() == m);
        let docs = &self.data.docs;
        let mut rows = Vec::with_capacity(docs.iter().filter(|d| keep(d)).count());
        rows.extend((0..docs.len() as u32).filter(|&i| keep(&docs[i as usize])));
        rows
    }

    /// Indices of the rows of a split, optionally one modality (by name, as mixes name them).
    pub fn split(&self, split: Split, modality: Option<&str>) -> Vec<usize> {
        let docs = &self.data.docs;
        (0..docs.len())
            .filter(|&i| {
                docs[i].split == split && modality.is_none_or(|m| docs[i].modality.as_str() == m)
            })
            .collect()
    }

    /// Documents in a split.
    pub fn count(&self, split: Split) -> usize {
        self.data.docs.iter().filter(|d| d.split == split).count()
    }

    pub fn modalities(&self, split: Split) -> Vec<String> {
        Modality::ALL
            .iter()
            .filter(|m| {
                self.data
                    .docs
                    .iter()
                    .any(|d| d.split == split && d.modality == **m)
            })
            .map(|m| m.to_string())
            .collect()
    }
}

/// A tiny least-recently-used map for a handful of entries (linear scans beat hashing here).
struct Lru<K, V> {
    cap: usize,
    tick: u64,
    items: Vec<(K, V, u64)>,
}

impl<K: PartialEq + Copy, V> Lru<K, V> {
    fn new(cap: usize) -> Self {
        Lru {
            cap,
            tick: 0,
            items: Vec::with_capacity(cap),
        }
    }

    fn position(&mut self, k: &K) -> Option<usize> {
        self.tick += 1;
        let i = self.items.iter().position(|e| e.0 == *k)?;
        self.items[i].2 = self.tick;
        Some(i)
    }

    /// When full, removes the least recently used entry and returns its value (whose buffers
    /// the caller may reuse).
    fn make_room(&mut self) -> Option<V> {
        if self.items.len() < self.cap {
            return None;
        }
        let (i, _) = self.items.iter().enumerate().min_by_key(|(_, e)| e.2)?;
        Some(self.items.swap_remove(i).1)
    }

    fn insert(&mut self, k: K, v: V) -> usize {
        self.make_room();
        self.tick += 1;
        self.items.push((k, v, self.tick));
        self.items.len() - 1
    }
}

/// Reads token ranges of a set's shards: a bounded LRU of open shards and one of decoded frames.
struct FrameReader {
    shards: Lru<u32, Arc<TokenShard>>,
    frames: Lru<(u32, u32), Vec<u16>>,
    buffers: FrameBuffers,
}

impl FrameReader {
    fn new() -> Result<FrameReader> {
        Ok(FrameReader {
            shards: Lru::new(MAX_OPEN_SHARDS),
            frames: Lru::new(MAX_CACHED_FRAMES),
            buffers: FrameBuffers::new()?,
        })
    }

    fn shard(&mut self, d: &SetData, id: u32) -> Result<Arc<TokenShard>> {
        if let Some(i) = self.shards.position(&id) {
            return Ok(self.shards.items[i].1.clone());
        }
        let s = Arc::new(TokenShard::open(
            &d.root.join(&d.shards[id as usize]),
            Some(&d.hash),
        )?);
        let i = self.shards.insert(id, s);
        Ok(self.shards.items[i].1.clone())
    }

    /// Hands tokens `start..start + len` of document `row` to `sink`, frame piece by frame
    /// piece, decoding only frames not in the cache; checks the document's BOS and EOS.
    fn read(
        &mut self,
        d: &SetData,
        row: usize,
        start: usize,
        len: usize,
        mut sink: impl FnMut(&[u16]),
    ) -> Result<()> {
        let doc = d.docs[row];
        if len == 0 {
            return Ok(());
        }
        let (from, to) = (doc.offset + start as u64, doc.offset + (start + len) as u64);
        let shard = self.shard(d, doc.shard)?;
        if doc.offset + doc.n_tokens as u64 > shard.token_count {
            return Err(d.bad_doc(
                row,
                &format!("ends past the shard's {} tokens", shard.token_count),
            ));
        }
        for f in shard.frame_of(from)..=shard.frame_of(to - 1) {
            let key = (doc.shard, f as u32);
            let i = match self.frames.position(&key) {
                Some(i) => i,
                None => {
                    let mut buf = self.frames.make_room().unwrap_or_default();
                    shard.read_frame_into(f, &mut self.buffers, &mut buf)?;
                    self.frames.insert(key, buf)
                }
            };
            let frame = &self.frames.items[i].1;
            let first = shard.frames()[f].first_token;
            let piece = &frame[(from.max(first) - first) as usize
                ..(to.min(first + frame.len() as u64) - first) as usize];
            let at = |pos: u64| {
                (first..first + frame.len() as u64)
                    .contains(&pos)
                    .then(|| frame[(pos - first) as usize] as u32)
            };
            if start == 0 && at(from).is_some_and(|t| t != d.bos) {
                return Err(d.bad_doc(row, "does not start with BOS"));
            }
            let last = doc.offset + doc.n_tokens as u64 - 1;
            if to == last + 1 && at(last).is_some_and(|t| t != d.eos) {
                return Err(d.bad_doc(row, "does not end with EOS"));
            }
            sink(piece);
        }
        Ok(())
    }
}

/// A seeded bijection of `0..n`: a balanced Feistel network on the smallest even number of bits
/// that covers `n`, walked until it lands back in range (cycle-walking). Any round function
/// gives a bijection; SplitMix64's finaliser makes the order look random. Costs a few hashes per
/// call and stores nothing, where a materialised shuffle of 25M documents would hold 200 MB.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Permutation {
    n: u64,
    half_bits: u32,
    keys: [u64; Permutation::ROUNDS],
}

impl Permutation {
    const ROUNDS: usize = 6;

    pub fn new(n: u64, seed: u64) -> Permutation {
        let bits = 64 - n.saturating_sub(1).leading_zeros();
        let half_bits = bits.div_ceil(2).max(1);
        let mut rng = Rng::new(seed);
        Permutation {
            n,
            half_bits,
            keys: std::array::from_fn(|_| rng.next_u64()),
        }
    }

    fn round(x: u64, key: u64) -> u64 {
        let mut z = x ^ key;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn encrypt(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (x >> self.half_bits, x & mask);
        for &k in &self.keys {
            (l, r) = (r, l ^ (Self::round(r, k) & mask));
        }
        (l << self.half_bits) | r
    }

    /// The image of `i` (which must be below `n`).
    pub fn apply(&self, i: u64) -> u64 {
        debug_assert!(i < self.n);
        let mut x = self.encrypt(i);
        while x >= self.n {
            x = self.encrypt(x);
        }
        x
    }
}

/// The key of the shuffle of `modality`'s documents in `epoch`.
fn epoch_seed(seed: u64, modality: &str, epoch: u64) -> u64 {
    let mut h = seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in modality.bytes() {
        h = h.rotate_left(8) ^ b as u64;
    }
    h
}

/// Everything that decides the rest of the training stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoaderState {
    pub rng: Rng,
    /// Per modality: (epoch, next position in that epoch's order).
    pub cursors: BTreeMap<String, (u64, usize)>,
    /// The document being read (row index) and the next token in it.
    pub current: Option<(usize, usize)>,
    /// The last token of the previous window (windows overlap by one).
    pub carry: Option<u32>,
    pub windows: u64,
}

/// A modality of the mix: its weight and its training rows.
struct Slot {
    name: String,
    weight: f64,
    rows: Vec<u32>,
}

/// What is fixed for a loader's whole life.
struct StreamSpec {
    seed: u64,
    context: usize,
    slots: Vec<Slot>,
}

const SLOTS: usize = Modality::ALL.len();

/// [`LoaderState`] without allocation: what the read-ahead thread hands over with each window.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Position {
    rng: Rng,
    cursors: [(u64, u64); SLOTS],
    current: Option<(usize, usize)>,
    carry: Option<u32>,
    windows: u64,
}

impl Position {
    fn cursor(state: &LoaderState, name: &str) -> (u64, u64) {
        let (e, i) = state.cursors.get(name).copied().unwrap_or((0, 0));
        (e, i as u64)
    }

    fn from_state(state: &LoaderState, spec: &StreamSpec, d: &SetData) -> Result<Position> {
        if let Some((row, pos)) = state.current {
            let fits = d
                .docs
                .get(row)
                .is_some_and(|doc| doc.split == Split::Train && pos < doc.n_tokens as usize);
            if !fits {
                return Err(Error::Data(format!(
                    "the saved loader position (document {row}, token {pos}) is not a training document of token set {}: the run was trained on another dataset",
                    d.hash
                )));
            }
        }
        let mut cursors = [(0, 0); SLOTS];
        for (c, slot) in cursors.iter_mut().zip(&spec.slots) {
            *c = Self::cursor(state, &slot.name);
        }
        Ok(Position {
            rng: state.rng,
            cursors,
            current: state.current,
            carry: state.carry,
            windows: state.windows,
        })
    }

    fn matches(&self, state: &LoaderState, spec: &StreamSpec) -> bool {
        self.rng == state.rng
            && self.current == state.current
            && self.carry == state.carry
            && self.windows == state.windows
            && spec
                .slots
                .iter()
                .zip(&self.cursors)
                .all(|(s, c)| Self::cursor(state, &s.name) == *c)
    }

    /// Writes this position into `state` (in place: no allocation once every cursor exists).
    fn store(&self, state: &mut LoaderState, spec: &StreamSpec) {
        state.rng = self.rng;
        state.current = self.current;
        state.carry = self.carry;
        state.windows = self.windows;
        for (s, &(e, i)) in spec.slots.iter().zip(&self.cursors) {
            match state.cursors.get_mut(&s.name) {
                Some(c) => *c = (e, i as usize),
                None => {
                    state.cursors.insert(s.name.clone(), (e, i as usize));
                }
            }
        }
    }
}

/// The stream itself: a position, and a reader to fill windows from it.
struct Stream {
    data: Arc<SetData>,
    spec: Arc<StreamSpec>,
    pos: Position,
    reader: FrameReader,
    perms: [Option<(u64, Permutation)>; SLOTS],
}

impl Stream {
    fn new(data: Arc<SetData>, spec: Arc<StreamSpec>, pos: Position) -> Result<Stream> {
        Ok(Stream {
            data,
            spec,
            pos,
            reader: FrameReader::new()?,
            perms: [None; SLOTS],
        })
    }

    fn next_doc(&mut self) -> usize {
        let slots = &self.spec.slots;
        let total: f64 = slots.iter().map(|s| s.weight).sum();
        let mut u = self.pos.rng.uniform() * total;
        let mut pick = slots.len() - 1;
        for (i, s) in slots.iter().enumerate() {
            if u < s.weight {
                pick = i;
                break;
            }
            u -= s.weight;
        }
        let slot = &slots[pick];
        let n = slot.rows.len() as u64;
        let cursor = &mut self.pos.cursors[pick];
        if cursor.1 >= n {
            *cursor = (cursor.0 + 1, 0);
        }
        let (epoch, idx) = *cursor;
        cursor.1 += 1;
        let perm = match self.perms[pick] {
            Some((e, p)) if e == epoch => p,
            _ => {
                let p = Permutation::new(n, epoch_seed(self.spec.seed, &slot.name, epoch));
                self.perms[pick] = Some((epoch, p));
                p
            }
        };
        slot.rows[perm.apply(idx) as usize] as usize
    }

    /// The next window (`context + 1` tokens) into `out`.
    fn next_window(&mut self, out: &mut Vec<u32>) -> Result<()> {
        let want = self.spec.context + 1;
        out.clear();
        if let Some(c) = self.pos.carry {
            out.push(c);
        }
        while out.len() < want {
            let (row, at) = match self.pos.current {
                Some(c) => c,
                None => (self.next_doc(), 0),
            };
            let n = self.data.docs[row].n_tokens as usize;
            let take = (want - out.len()).min(n - at);
            self.reader.read(&self.data, row, at, take, |t| {
                out.extend(t.iter().map(|&t| t as u32))
            })?;
            self.pos.current = (at + take < n).then_some((row, at + take));
        }
        self.pos.carry = out.last().copied();
        self.pos.windows += 1;
        Ok(())
    }
}

/// A prepared window and the stream's position after it.
struct Window {
    tokens: Vec<u32>,
    after: Position,
}

/// The read-ahead thread: windows come through a bounded channel, spent buffers go back.
struct Producer {
    windows: Option<crossbeam_channel::Receiver<Result<Window>>>,
    spent: crossbeam_channel::Sender<Vec<u32>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Producer {
    fn start(mut stream: Stream, depth: usize) -> Result<Producer> {
        let (tx, rx) = crossbeam_channel::bounded(depth);
        let (spent_tx, spent_rx) = crossbeam_channel::unbounded::<Vec<u32>>();
        let want = stream.spec.context + 1;
        let thread = std::thread::Builder::new()
            .name("codeclm-loader".into())
            .spawn(move || loop {
                let mut buf = spent_rx
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(want));
                let window = stream.next_window(&mut buf).map(|()| Window {
                    tokens: buf,
                    after: stream.pos,
                });
                let failed = window.is_err();
                if tx.send(window).is_err() || failed {
                    return;
                }
            })
            .map_err(|e| Error::Data(format!("cannot start the read-ahead thread: {e}")))?;
        Ok(Producer {
            windows: Some(rx),
            spent: spent_tx,
            thread: Some(thread),
        })
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        // The thread stops at its next send once nobody receives.
        drop(self.windows.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum Engine {
    /// Windows made on the caller's thread (read-ahead 0).
    Inline(Box<Stream>, Vec<u32>),
    Ahead(Producer),
}

/// The training stream over a token set's `train` documents.
pub struct Loader {
    /// The position after the last window handed out. Assigning a saved state resumes from it.
    pub state: LoaderState,
    data: Arc<SetData>,
    spec: Arc<StreamSpec>,
    read_ahead: usize,
    engine: Option<Engine>,
    /// The position the engine continues from (compared with `state` to notice assignments).
    consumed: Position,
}

impl Loader {
    /// `mix`: modality -> weight; empty means every modality with training documents, each
    /// weighted by its share of training tokens (the natural mix).
    pub fn new(
        set: &TrainingSet,
        context: usize,
        seed: u64,
        mix: &BTreeMap<String, f64>,
    ) -> Result<Loader> {
        let available = set.modalities(Split::Train);
        if available.is_empty() {
            return Err(Error::Data(format!(
                "the token set {} of {} has no training documents (split \"train\"). Fix: build the dataset with a --val-fraction below 1",
                set.hash,
                set.root.display()
            )));
        }
        if context == 0 {
            return Err(Error::Config("the context must be at least 1 token".into()));
        }
        let chosen: Vec<(String, Option<f64>)> = if mix.is_empty() {
            available.iter().map(|m| (m.clone(), None)).collect()
        } else {
            mix.iter().map(|(m, w)| (m.clone(), Some(*w))).collect()
        };
        let mut slots = Vec::new();
        for (m, w) in chosen {
            let rows: Vec<u32> = set.split_rows(Split::Train, Some(&m));
            if rows.is_empty() {
                return Err(Error::Data(format!(
                    "the mix asks for modality {m:?}, which has no training documents in token set {} (it has: {}); fix the mix",
                    set.hash,
                    available.join(", ")
                )));
            }
            let weight = match w {
                Some(w) if w.is_finite() && w >= 0.0 => w,
                Some(w) => {
                    return Err(Error::Config(format!(
                        "mix weight {w} for {m} must be a non-negative number"
                    )))
                }
                None => rows
                    .iter()
                    .map(|&r| set.data.docs[r as usize].n_tokens as f64)
                    .sum(),
            };
            if weight > 0.0 {
                slots.push(Slot {
                    name: m,
                    weight,
                    rows,
                });
            }
        }
        if slots.is_empty() {
            return Err(Error::Config("every mix weight is zero".into()));
        }
        let state = LoaderState {
            rng: Rng::new(seed ^ 0x5EED_DA7A),
            cursors: slots.iter().map(|s| (s.name.clone(), (0, 0))).collect(),
            current: None,
            carry: None,
            windows: 0,
        };
        let spec = Arc::new(StreamSpec {
            seed,
            context,
            slots,
        });
        let consumed = Position::from_state(&state, &spec, &set.data)?;
        Ok(Loader {
            state,
            data: set.data.clone(),
            spec,
            read_ahead: (READ_AHEAD_TOKENS / (context + 1)).clamp(4, 256),
            engine: None,
            consumed,
        })
    }

    /// Windows prepared ahead on a thread (0: on the caller's thread). The stream is the same
    /// either way.
    pub fn set_read_ahead(&mut self, windows: usize) {
        self.read_ahead = windows;
        self.engine = None;
    }

    pub fn context(&self) -> usize {
        self.spec.context
    }

    /// Fills `x` and `y` (each `batch * context` tokens, row-major [batch, context]) with the
    /// next `batch` windows: inputs and targets shifted by one. No allocation in steady state.
    pub fn next_batch_into(
        &mut self,
        set: &TrainingSet,
        x: &mut [u32],
        y: &mut [u32],
    ) -> Result<()> {
        let ctx = self.spec.context;
        if x.len() != y.len() || x.is_empty() || x.len() % ctx != 0 {
            return Err(Error::Config(format!(
                "a batch needs inputs and targets of batch x context ({ctx}) tokens each, not {} and {}",
                x.len(),
                y.len()
            )));
        }
        if !Arc::ptr_eq(&set.data, &self.data) {
            self.data = set.data.clone();
            self.engine = None;
        }
        if self.engine.is_none() || !self.consumed.matches(&self.state, &self.spec) {
            self.engine = None; // stops a thread running from an older position
            let pos = Position::from_state(&self.state, &self.spec, &self.data)?;
            let stream = Stream::new(self.data.clone(), self.spec.clone(), pos)?;
            self.engine = Some(match self.read_ahead {
                0 => Engine::Inline(Box::new(stream), Vec::with_capacity(ctx + 1)),
                depth => Engine::Ahead(Producer::start(stream, depth)?),
            });
            self.consumed = pos;
        }
        for (xr, yr) in x.chunks_exact_mut(ctx).zip(y.chunks_exact_mut(ctx)) {
            let after = match self.engine.as_mut() {
                Some(Engine::Inline(stream, buf)) => match stream.next_window(buf) {
                    Ok(()) => {
                        xr.copy_from_slice(&buf[..ctx]);
                        yr.copy_from_slice(&buf[1..]);
                        stream.pos
                    }
                    Err(e) => {
                        self.engine = None;
                        return Err(e);
                    }
                },
                Some(Engine::Ahead(p)) => {
                    let got = p.windows.as_ref().and_then(|rx| rx.recv().ok());
                    match got {
                        Some(Ok(w)) => {
                            xr.copy_from_slice(&w.tokens[..ctx]);
                            yr.copy_from_slice(&w.tokens[1..]);
                            let _ = p.spent.send(w.tokens);
                            w.after
                        }
                        Some(Err(e)) => {
                            self.engine = None;
                            return Err(e);
                        }
                        None => {
                            self.engine = None;
                            return Err(Error::Data("the read-ahead thread stopped".into()));
                        }
                    }
                }
                None => unreachable!("the engine was started above"),
            };
            self.consumed = after;
            after.store(&mut self.state, &self.spec);
        }
        Ok(())
    }

    /// A batch: inputs and targets, each `batch * context` tokens (row-major [batch, context]).
    pub fn next_batch(&mut self, set: &TrainingSet, batch: usize) -> Result<(Vec<u32>, Vec<u32>)> {
        let n = batch * self.spec.context;
        let (mut x, mut y) = (vec![0; n], vec![0; n]);
        self.next_batch_into(set, &mut x, &mut y)?;
        Ok((x, y))
    }

    /// The next window: `context + 1` tokens.
    pub fn next_window(&mut self, set: &TrainingSet) -> Result<Vec<u32>> {
        let (mut x, y) = self.next_batch(set, 1)?;
        x.extend(y.last());
        Ok(x)
    }
}

/// A byte-unigram model fitted with add-one smoothing on the codec bytes of a fixed sample of
/// training documents (the [`UNIGRAM_FIT_DOCS`] lowest sample-id hashes, at most
/// [`UNIGRAM_FIT_TOKENS`] tokens), evaluated on the codec bytes of
/// [`TrainingSet::val_subset`]`(max_docs)`: bits per byte.
pub fn unigram_baseline_bits_per_byte(set: &TrainingSet, max_docs: usize) -> Result<f64> {
    let mut counts = [1u64; 256];
    let mut tokens = 0u64;
    for &row in &set.fit_rows {
        if tokens >= UNIGRAM_FIT_TOKENS {
            break;
        }
        let doc = set.doc(row as usize)?;
        tokens += doc.len() as u64;
        for &t in &doc {
            for &b in set.vocab.token_bytes(t as u32) {
                counts[b as usize] += 1;
            }
        }
    }
    let total: u64 = counts.iter().sum();
    let bits_of: Vec<f64> = counts
        .iter()
        .map(|&c| -(c as f64 / total as f64).log2())
        .collect();
    let (mut bits, mut n) = (0.0f64, 0u64);
    for d in set.val_subset(max_docs)? {
        for &t in &d.tokens {
            for &b in set.vocab.token_bytes(t as u32) {
                bits += bits_of[b as usize];
                n += 1;
            }
        }
    }
    if n == 0 {
        return Err(Error::Data(
            "no validation bytes (split \"val\" is empty); build the dataset with --val-fraction > 0"
                .into(),
        ));
    }
    Ok(bits / n as f64)
}

/// The shape of a synthetic token set ([`write_synthetic_token_set`]).
#[derive(Clone, Debug)]
pub struct SyntheticSpec {
    pub docs: usize,
    /// Document lengths are uniform in `mean_tokens / 2 ..= 3 * mean_tokens / 2` (at least 6).
    pub mean_tokens: usize,
    /// Every `val_every`-th document is held out (0: none).
    pub val_every: usize,
    /// Every `video_every`-th document is a video (0: none).
    pub video_every: usize,
    pub docs_per_shard: usize,
    pub frame_tokens: u32,
    pub seed: u64,
}

/// The number a synthetic document carries in its first four tokens after BOS.
pub fn synthetic_doc_id(doc: &[u32]) -> Option<usize> {
    let d = doc.get(1..5)?;
    d.iter().rev().try_fold(0usize, |acc, &t| {
        (3..259).contains(&t).then(|| acc * 256 + (t - 3) as usize)
    })
}

/// Writes a token set of pseudo-random documents under `root` (a byte-only vocabulary, its
/// shards and `tokens-<hash>.parquet`), as `codeclm dataset tokenize` lays one out, for tests
/// and `codeclm bench loader`. Document `k` is `BOS`, `k` in four byte tokens (little end
/// first, see [`synthetic_doc_id`]), random byte tokens, `EOS`. Returns the set's hash.
pub fn write_synthetic_token_set(root: &Path, spec: &SyntheticSpec) -> Result<String> {
    let json = Vocab::bytes_only_json();
    let vocab = Vocab::from_json(&json, Path::new("synthetic vocab.json"))?;
    let layout = TokenLayout::new(root, &vocab.hash);
    layout.create_dirs()?;
    codeclm_formats::write_atomic(&layout.vocab_path(), &json)?;
    let mut rng = Rng::new(spec.seed);
    let mut x = spec.seed | 1;
    let mut rows = Vec::with_capacity(spec.docs);
    let mut ids = Vec::new();
    let per_shard = spec.docs_per_shard.max(1);
    for part in 0..spec.docs.div_ceil(per_shard) {
        let rel = layout.shard_rel(part as u32);
        let mut w = TokenShardWriter::with_frame_tokens(
            &root.join(&rel),
            vocab.size,
            &vocab.hash,
            spec.frame_tokens,
        )?;
        for k in part * per_shard..((part + 1) * per_shard).min(spec.docs) {
            let m = spec.mean_tokens.max(6);
            let len = (m / 2 + rng.below(m + 1)).max(6);
            ids.clear();
            ids.push(vocab.bos);
            ids.extend((0..4).map(|i| 3 + ((k >> (8 * i)) & 0xFF) as u32));
            while ids.len() + 1 < len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ids.push(3 + (x % 256) as u32);
            }
            ids.push(vocab.eos);
            let offset = w.push_doc(&ids)?;
            let every = |n: usize| n > 0 && k % n == n - 1;
            rows.push(TokenRow {
                sample_id: format!("syn-{k:09}"),
                modality: if every(spec.video_every) {
                    Modality::Video
                } else {
                    Modality::Image
                },
                split: if every(spec.val_every) {
                    Split::Val
                } else {
                    Split::Train
                },
                part: part as u32,
                shard: rel.clone(),
                offset,
                n_tokens: len as u64,
                codec_bytes: len as u64 - 2,
                // No codec part: nothing to go stale.
                codec_part_hash: None,
            });
        }
        w.finish()?;
    }
    codeclm_formats::tokens::write_token_rows(&rows, &layout.manifest_path())?;
    Ok(vocab.hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(docs: usize) -> SyntheticSpec {
        SyntheticSpec {
            docs,
            mean_tokens: 40,
            val_every: 5,
            video_every: 0,
            docs_per_shard: 23,
            frame_tokens: 64,
            seed: 7,
        }
    }

    fn set(dir: &Path, spec: &SyntheticSpec) -> TrainingSet {
        write_synthetic_token_set(dir, spec).unwrap();
        let set = TrainingSet::open(dir, None).unwrap();
        set.check_shards().unwrap();
        set
    }

    fn windows(loader: &mut Loader, set: &TrainingSet, n: usize) -> Vec<Vec<u32>> {
        (0..n).map(|_| loader.next_window(set).unwrap()).collect()
    }

    #[test]
    fn permutation_is_a_bijection() {
        for n in [1u64, 2, 3, 7, 1000, (1 << 20) + 3] {
            for seed in [0u64, 99] {
                let p = Permutation::new(n, seed);
                let mut seen = vec![false; n as usize];
                for i in 0..n {
                    let j = p.apply(i);
                    assert!(
                        j < n && !seen[j as usize],
                        "n {n}: {i} -> {j} twice or out of range"
                    );
                    seen[j as usize] = true;
                }
            }
        }
        let (a, b) = (Permutation::new(1000, 1), Permutation::new(1000, 2));
        let fixed = (0..1000).filter(|&i| a.apply(i) == i).count();
        assert!(fixed < 20, "{fixed} fixed points: not shuffled");
        assert!((0..1000).any(|i| a.apply(i) != b.apply(i)), "seeds differ");
    }

    /// Documents come back whole and exact from random access, across frames and shards.
    #[test]
    fn documents_read_back_across_frames() {
        let dir = tempfile::tempdir().unwrap();
        let set = set(dir.path(), &spec(60));
        assert_eq!(set.len(), 60);
        let mut spans = 0;
        for row in 0..set.len() {
            let d = set.doc(row).unwrap();
            let r = set.row(row);
            assert_eq!(d.len(), r.n_tokens as usize);
            let ids: Vec<u32> = d.iter().map(|&t| t as u32).collect();
            assert_eq!(synthetic_doc_id(&ids), Some(row));
            assert_eq!(
                (ids[0], *ids.last().unwrap()),
                (set.vocab.bos, set.vocab.eos)
            );
            spans += (r.offset / 64 != (r.offset + r.n_tokens as u64 - 1) / 64) as usize;
        }
        assert!(spans > 10, "only {spans} documents cross a frame boundary");
        assert!(set.doc(60).is_err());
    }

    /// Windows after a save + restore (through JSON, mid-epoch and mid-document) are the
    /// windows of an uninterrupted loader; read-ahead changes nothing.
    #[test]
    fn resume_is_exact_with_read_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(80);
        s.video_every = 3;
        let set = set(dir.path(), &s);
        let mix = BTreeMap::new();
        let mut inline = Loader::new(&set, 24, 5, &mix).unwrap();
        inline.set_read_ahead(0);
        let all = windows(&mut inline, &set, 120);
        let mut ahead = Loader::new(&set, 24, 5, &mix).unwrap();
        ahead.set_read_ahead(3);
        assert_eq!(
            windows(&mut ahead, &set, 120),
            all,
            "read-ahead is the same stream"
        );

        let mut first = Loader::new(&set, 24, 5, &mix).unwrap();
        let mut got = windows(&mut first, &set, 37);
        // Move on until the saved point is inside a document and inside an epoch.
        while first.state.current.is_none() {
            got.extend(windows(&mut first, &set, 1));
        }
        assert!(first.state.cursors.values().all(|&(e, i)| e == 0 && i > 0));
        assert_eq!(first.state.windows as usize, got.len());
        let saved = serde_json::to_string(&first.state).unwrap();
        // The read-ahead thread ran past the saved point; the rest still follows from it.
        got.extend(windows(&mut first, &set, 3));
        assert_eq!(got[..], all[..got.len()]);
        let n = got.len() - 3;
        let mut resumed = Loader::new(&set, 24, 5, &mix).unwrap();
        resumed.state = serde_json::from_str(&saved).unwrap();
        let rest = windows(&mut resumed, &set, 120 - n);
        assert_eq!(rest[..], all[n..]);
        // Assigning a state to a running loader rewinds it too.
        first.state = serde_json::from_str(&saved).unwrap();
        assert_eq!(windows(&mut first, &set, 5)[..], all[n..n + 5]);
        // Batches are the windows, row by row, inputs and targets shifted by one.
        let mut b = Loader::new(&set, 24, 5, &mix).unwrap();
        let (mut x, mut y) = (vec![0; 4 * 24], vec![0; 4 * 24]);
        b.next_batch_into(&set, &mut x, &mut y).unwrap();
        for r in 0..4 {
            assert_eq!(x[r * 24..(r + 1) * 24], all[r][..24]);
            assert_eq!(y[r * 24..(r + 1) * 24], all[r][1..]);
        }
        assert!(b.next_batch_into(&set, &mut x[..5], &mut y[..5]).is_err());
    }

    /// Splits the stream back into documents: each training document once per epoch, no
    /// validation document ever.
    #[test]
    fn every_training_document_once_per_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let set = set(dir.path(), &spec(101));
        let train: Vec<usize> = set.split(Split::Train, None);
        let epoch_tokens: usize = train.iter().map(|&r| set.row(r).n_tokens as usize).sum();
        let mut loader = Loader::new(&set, 16, 3, &BTreeMap::new()).unwrap();
        let mut stream: Vec<u32> = Vec::new();
        while stream.len() < 2 * epoch_tokens {
            let w = loader.next_window(&set).unwrap();
            let skip = if stream.is_empty() { 0 } else { 1 };
            stream.extend_from_slice(&w[skip..]);
        }
        let docs: Vec<usize> = stream
            .split_inclusive(|&t| t == set.vocab.eos)
            .filter(|d| d.len() > 5)
            .map(|d| synthetic_doc_id(d).unwrap())
            .collect();
        for epoch in docs.chunks(train.len()).take(2) {
            let mut e = epoch.to_vec();
            e.sort_unstable();
            assert_eq!(e, train, "each training document exactly once");
        }
        assert_ne!(
            docs[..train.len()],
            docs[train.len()..2 * train.len()],
            "reshuffled"
        );
        assert_ne!(docs[..train.len()], train[..], "shuffled");
    }

    /// The validation subset is the first documents by sample-id hash, the same whatever
    /// the manifest's row order; the unigram baseline is finite on it.
    #[test]
    fn val_subset_is_stable_and_whole() {
        let dir = tempfile::tempdir().unwrap();
        let set = set(dir.path(), &spec(100));
        let all = set.val_subset(usize::MAX).unwrap();
        assert_eq!(all.len(), 20);
        let three = set.val_subset(3).unwrap();
        assert_eq!(three[..], all[..3]);
        for v in &all {
            assert_eq!(set.row(v.row).split, Split::Val);
            assert_eq!(v.tokens, set.doc(v.row).unwrap());
            assert_eq!(v.codec_bytes, v.tokens.len() as u64 - 2);
        }
        // The same documents with the manifest in reverse order: the same subset.
        let manifest = TokenLayout::new(dir.path(), &set.hash).manifest_path();
        let mut rows = codeclm_formats::tokens::read_token_rows(&manifest).unwrap();
        rows.reverse();
        codeclm_formats::tokens::write_token_rows(&rows, &manifest).unwrap();
        let rev = TrainingSet::open(dir.path(), None).unwrap();
        let again: Vec<Vec<u16>> = rev
            .val_subset(5)
            .unwrap()
            .into_iter()
            .map(|v| v.tokens)
            .collect();
        let before: Vec<Vec<u16>> = all[..5].iter().map(|v| v.tokens.clone()).collect();
        assert_eq!(again, before);
        let bits = unigram_baseline_bits_per_byte(&set, 4).unwrap();
        assert!(bits > 7.0 && bits < 8.5, "{bits}");
    }

    /// A damaged frame stops the loader with an error naming the shard and the frame, through
    /// the read-ahead thread.
    #[test]
    fn a_corrupt_frame_stops_the_loader() {
        let dir = tempfile::tempdir().unwrap();
        let set = set(dir.path(), &spec(40));
        let shard = TokenShard::open(&dir.path().join(&set.data.shards[0]), None).unwrap();
        let f = shard.frames()[0];
        let mut bytes = std::fs::read(&shard.path).unwrap();
        bytes[(f.offset + f.compressed_len as u64 - 3) as usize] ^= 0x40;
        std::fs::write(&shard.path, &bytes).unwrap();
        let mut loader = Loader::new(&set, 32, 0, &BTreeMap::new()).unwrap();
        let err = (0..200)
            .find_map(|_| loader.next_window(&set).err())
            .expect("the damaged frame is read within an epoch");
        let msg = err.to_string();
        assert!(
            msg.contains("part-000000.tok") && msg.contains("frame 0 "),
            "{msg}"
        );
    }
}
