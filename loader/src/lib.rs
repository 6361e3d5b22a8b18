//! The training stream over a token set: documents (each `BOS + tokens + EOS` in the token
//! shards) of the `train` split, concatenated and cut into windows of `context + 1` tokens that
//! overlap by one (inputs are the first `context`, targets the last `context`). The next
//! document is drawn as follows: pick a modality (`image`, `video`) with probability
//! proportional to its weight, then take that modality's next document in an order shuffled per
//! epoch from `(seed, modality, epoch)`: position `i` of the epoch is document
//! [`Permutation::apply`]`(i)`, a seeded bijection computed on the fly, so no order is ever
//! stored. Everything that decides the stream is in [`LoaderState`], which checkpoints save: a
//! resumed run sees exactly the batches an uninterrupted run would. Windows are prepared on a
//! read-ahead thread; the state the loader shows is that of the last window handed out.
//!
//! Frames are decompressed as the stream reaches them, so memory does not grow with the
//! dataset's tokens (a few decoded frames, a few open shards, the [`DocTable`]). The table comes
//! from whoever reads the manifest (`codeclm-model` with Rust polars, the Python package with
//! Python polars): this crate links no polars, so both feed the same stream.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use codeclm_formats::tokens::{FrameBuffers, TokenShard};
use codeclm_formats::{Modality, Split};
use serde::{Deserialize, Serialize};

pub mod rng;

use crate::rng::Rng;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Format(#[from] codeclm_formats::Error),
    /// A bad stream setting (names the setting and the fix).
    #[error("{0}")]
    Config(String),
    /// The data cannot feed the stream (names the file and the fix).
    #[error("{0}")]
    Data(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Open shard files (each holds its frame index: 32 bytes a frame) kept per reader.
const MAX_OPEN_SHARDS: usize = 32;
/// Decoded frames kept per reader: a document across a frame boundary, or a long one read
/// window by window, decodes each frame once.
const MAX_CACHED_FRAMES: usize = 8;
/// Tokens of prepared windows the read-ahead thread may hold (4 MB of u32).
const READ_AHEAD_TOKENS: usize = 1 << 20;

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

/// A token set's documents and where their shards are: what the loader reads (one row per
/// manifest row, 24 bytes each), built by whoever reads the manifest.
#[derive(Debug)]
pub struct DocTable {
    pub root: PathBuf,
    pub hash: String,
    pub bos: u32,
    pub eos: u32,
    /// Shard paths relative to `root`, as the manifest names them.
    pub shards: Vec<String>,
    pub docs: Vec<DocRef>,
}

impl DocTable {
    pub fn bad_doc(&self, row: usize, problem: &str) -> Error {
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

    /// The rows of `split`, optionally of one modality (by name, as mixes name them), as u32,
    /// sized exactly (a count first): at 25M documents, 100 MB rather than a growing
    /// `Vec<usize>` and its copy.
    pub fn split_rows(&self, split: Split, modality: Option<&str>) -> Vec<u32> {
        let keep =
            |d: &DocRef| d.split == split && modality.is_none_or(|m| d.modality.as_str() == m);
        let mut rows = Vec::with_capacity(self.docs.iter().filter(|d| keep(d)).count());
        rows.extend((0..self.docs.len() as u32).filter(|&i| keep(&self.docs[i as usize])));
        rows
    }

    /// The modalities with documents in `split`.
    pub fn modalities(&self, split: Split) -> Vec<String> {
        Modality::ALL
            .iter()
            .filter(|m| {
                self.docs
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
pub struct FrameReader {
    shards: Lru<u32, Arc<TokenShard>>,
    frames: Lru<(u32, u32), Vec<u16>>,
    buffers: FrameBuffers,
}

impl FrameReader {
    pub fn new() -> Result<FrameReader> {
        Ok(FrameReader {
            shards: Lru::new(MAX_OPEN_SHARDS),
            frames: Lru::new(MAX_CACHED_FRAMES),
            buffers: FrameBuffers::new()?,
        })
    }

    fn shard(&mut self, d: &DocTable, id: u32) -> Result<Arc<TokenShard>> {
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
    pub fn read(
        &mut self,
        d: &DocTable,
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

/// Which windows of the global stream a loader hands out: of every `period` windows (counted
/// from where its stream starts), those at `start..start + count`. Every rank and worker walks
/// the same global stream and skips the windows of the others without reading them (a skipped
/// window costs its document draws and nothing else), so the ranks together hand out each
/// window once, and after each batch every rank is at the same global position: a checkpoint
/// of any rank resumes the run on any number of ranks with the same global batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    pub period: u64,
    pub start: u64,
    pub count: u64,
}

impl Share {
    /// The whole stream (one process).
    pub const WHOLE: Share = Share {
        period: 1,
        start: 0,
        count: 1,
    };

    /// Rank `rank` of `world` ranks, each taking `batch` windows of every global batch of
    /// `world * batch`: rank 0 the first `batch`, rank 1 the next, and so on.
    pub fn rank(rank: usize, world: usize, batch: usize) -> Result<Share> {
        if world == 0 || rank >= world || batch == 0 {
            return Err(Error::Config(format!(
                "rank {rank} of world size {world} with batch {batch}: the rank must be below the world size and the batch at least 1"
            )));
        }
        Ok(Share {
            period: (world * batch) as u64,
            start: (rank * batch) as u64,
            count: batch as u64,
        })
    }

    /// This share split among `workers` data-loading workers taking whole batches in turn:
    /// worker `k` takes batches `k, k + workers, ...` of this share, so reading the workers'
    /// batches round-robin (as torch's `DataLoader` does) gives this share's stream.
    pub fn worker(self, worker: usize, workers: usize) -> Result<Share> {
        if workers == 0 || worker >= workers {
            return Err(Error::Config(format!(
                "worker {worker} of {workers}: the worker must be below the number of workers"
            )));
        }
        Ok(Share {
            period: self.period * workers as u64,
            start: self.start + worker as u64 * self.period,
            count: self.count,
        })
    }

    fn check(&self) -> Result<()> {
        if self.count == 0 || self.start + self.count > self.period {
            return Err(Error::Config(format!(
                "a share of windows {}..{} of every {} is empty or does not fit its period",
                self.start,
                self.start + self.count,
                self.period
            )));
        }
        Ok(())
    }
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

    fn from_state(state: &LoaderState, spec: &StreamSpec, d: &DocTable) -> Result<Position> {
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
    data: Arc<DocTable>,
    spec: Arc<StreamSpec>,
    pos: Position,
    reader: FrameReader,
    perms: [Option<(u64, Permutation)>; SLOTS],
    share: Share,
    /// The global window the share's periods are counted from (where this stream started).
    origin: u64,
}

impl Stream {
    fn new(
        data: Arc<DocTable>,
        spec: Arc<StreamSpec>,
        pos: Position,
        share: Share,
    ) -> Result<Stream> {
        Ok(Stream {
            data,
            spec,
            origin: pos.windows,
            pos,
            reader: FrameReader::new()?,
            perms: [None; SLOTS],
            share,
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

    /// Moves past `n` windows without reading them: the same document draws as reading them,
    /// then one token read, the last of the last window (the next window's first).
    fn skip_windows(&mut self, n: u64) -> Result<()> {
        let mut last = None;
        let mut carry = self.pos.carry.is_some();
        for _ in 0..n {
            let mut need = self.spec.context + 1 - carry as usize;
            while need > 0 {
                let (row, at) = match self.pos.current {
                    Some(c) => c,
                    None => (self.next_doc(), 0),
                };
                let len = self.data.docs[row].n_tokens as usize;
                let take = need.min(len - at);
                last = Some((row, at + take - 1));
                self.pos.current = (at + take < len).then_some((row, at + take));
                need -= take;
            }
            carry = true;
        }
        if let Some((row, at)) = last {
            let mut token = None;
            self.reader.read(&self.data, row, at, 1, |t| {
                token = t.first().map(|&t| t as u32)
            })?;
            self.pos.carry = token;
        }
        self.pos.windows += n;
        Ok(())
    }

    /// The next window of this stream's share into `out`: the windows of other shares before
    /// it skipped, and, when it ends the share's part of a period, those after it up to the
    /// period's end (so the position after a share's batch is the global batch's end).
    fn next_taken(&mut self, out: &mut Vec<u32>) -> Result<()> {
        let Share {
            period,
            start,
            count,
        } = self.share;
        let phase = (self.pos.windows - self.origin) % period;
        let before = if phase < start {
            start - phase
        } else if phase >= start + count {
            period - phase + start
        } else {
            0
        };
        self.skip_windows(before)?;
        self.next_window(out)?;
        if (self.pos.windows - self.origin) % period == (start + count) % period {
            self.skip_windows(period - start - count)?;
        }
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
                let window = stream.next_taken(&mut buf).map(|()| Window {
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
    data: Arc<DocTable>,
    spec: Arc<StreamSpec>,
    read_ahead: usize,
    share: Share,
    engine: Option<Engine>,
    /// The position the engine continues from (compared with `state` to notice assignments).
    consumed: Position,
}

impl Loader {
    /// `mix`: modality -> weight; empty means every modality with training documents, each
    /// weighted by its share of training tokens (the natural mix).
    pub fn new(
        set: &Arc<DocTable>,
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
                    .map(|&r| set.docs[r as usize].n_tokens as f64)
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
        let consumed = Position::from_state(&state, &spec, set)?;
        Ok(Loader {
            state,
            data: set.clone(),
            spec,
            read_ahead: (READ_AHEAD_TOKENS / (context + 1)).clamp(4, 256),
            share: Share::WHOLE,
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

    /// Hands out only `share`'s windows of the global stream from the current position on
    /// (its periods counted from here). Batches must then be whole multiples of `share.count`.
    pub fn set_share(&mut self, share: Share) -> Result<()> {
        share.check()?;
        self.share = share;
        self.engine = None;
        Ok(())
    }

    pub fn share(&self) -> Share {
        self.share
    }

    /// Moves past the next `n` windows of the global stream (whatever the share) without
    /// reading them but for one token: what `n` windows of every rank would have advanced.
    pub fn skip_windows(&mut self, n: u64) -> Result<()> {
        self.engine = None;
        let pos = Position::from_state(&self.state, &self.spec, &self.data)?;
        let mut stream = Stream::new(self.data.clone(), self.spec.clone(), pos, Share::WHOLE)?;
        stream.skip_windows(n)?;
        stream.pos.store(&mut self.state, &self.spec);
        self.consumed = stream.pos;
        Ok(())
    }

    /// Fills `x` and `y` (each `batch * context` tokens, row-major [batch, context]) with the
    /// next `batch` windows: inputs and targets shifted by one. No allocation in steady state.
    pub fn next_batch_into(
        &mut self,
        set: &Arc<DocTable>,
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
        if (x.len() / ctx) as u64 % self.share.count != 0 {
            return Err(Error::Config(format!(
                "a batch of {} windows from a loader whose share takes {} windows a step: the batch must be a multiple of it",
                x.len() / ctx,
                self.share.count
            )));
        }
        if !Arc::ptr_eq(set, &self.data) {
            self.data = set.clone();
            self.engine = None;
        }
        if self.engine.is_none() || !self.consumed.matches(&self.state, &self.spec) {
            self.engine = None; // stops a thread running from an older position
            let pos = Position::from_state(&self.state, &self.spec, &self.data)?;
            let stream = Stream::new(self.data.clone(), self.spec.clone(), pos, self.share)?;
            self.engine = Some(match self.read_ahead {
                0 => Engine::Inline(Box::new(stream), Vec::with_capacity(ctx + 1)),
                depth => Engine::Ahead(Producer::start(stream, depth)?),
            });
            self.consumed = pos;
        }
        for (xr, yr) in x.chunks_exact_mut(ctx).zip(y.chunks_exact_mut(ctx)) {
            let after = match self.engine.as_mut() {
                Some(Engine::Inline(stream, buf)) => match stream.next_taken(buf) {
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
    pub fn next_batch(
        &mut self,
        set: &Arc<DocTable>,
        batch: usize,
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        let n = batch * self.spec.context;
        let (mut x, mut y) = (vec![0; n], vec![0; n]);
        self.next_batch_into(set, &mut x, &mut y)?;
        Ok((x, y))
    }

    /// The next window: `context + 1` tokens.
    pub fn next_window(&mut self, set: &Arc<DocTable>) -> Result<Vec<u32>> {
        let (mut x, y) = self.next_batch(set, 1)?;
        x.extend(y.last());
        Ok(x)
    }
}
