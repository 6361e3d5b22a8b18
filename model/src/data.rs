//! Training data from a dataset's token shards (`tokens-<hash>.parquet` + `tokens/<hash>/*.tok`):
//! [`TrainingSet`] reads the manifest into the loader's [`DocTable`] (24 bytes a document) and
//! reads documents on demand; [`Loader`] is the training stream of `codeclm-loader` over it
//! (per-epoch shuffles, a mix of modalities, exact resume from [`LoaderState`]; see that crate),
//! the same stream the Python package gives from the same table.
//!
//! Validation: a fixed subset of the `val` documents, the first N by a hash of their sample id
//! (stable as the dataset grows), each document whole ([`TrainingSet::val_subset`]).

use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use codeclm_formats::tokens::{
    for_each_token_row, ManifestHash, TokenLayout, TokenRow, TokenSet, TokenShard, TokenShardWriter,
};
use codeclm_formats::vocab::Vocab;
use codeclm_formats::{Modality, Split};
use codeclm_loader::FrameReader;
pub use codeclm_loader::{DocRef, DocTable, LoaderState, Permutation};

use crate::rng::Rng;
use crate::{Error, Result};

/// Held-out documents scored by default (`--val-docs`).
pub const DEFAULT_VAL_DOCS: usize = 256;
/// The byte-unigram baseline is fitted on at most this many training documents...
pub const UNIGRAM_FIT_DOCS: usize = 2_000;
/// ...and at most this many of their tokens (64 MB of u16).
pub const UNIGRAM_FIT_TOKENS: u64 = 32 << 20;
/// Seed of the sample-id hash that orders the validation subset and the unigram sample.
const SUBSET_HASH_SEED: u64 = 0x5A11_D0C5;

/// A token set of a dataset, resolved and checked, with its documents' places; tokens are read
/// from the shards when asked for.
pub struct TrainingSet {
    pub root: PathBuf,
    pub hash: String,
    /// [`ManifestHash`] of `tokens-<hash>.parquet`: which documents, where (a resumed run
    /// checks it against the one it started on).
    pub manifest_hash: String,
    pub vocab: Vocab,
    /// The documents' table, shared with the loaders.
    pub data: Arc<DocTable>,
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
            data: Arc::new(DocTable {
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
                return Err(d
                    .bad_doc(
                        row,
                        &format!("ends past the shard's {} tokens", shard.token_count),
                    )
                    .into());
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
        self.data.modalities(split)
    }
}

/// The training stream over a token set's `train` documents ([`codeclm_loader::Loader`], fed
/// with this set's table): the stream the Python package's `Tokens.windows` also gives.
pub struct Loader(codeclm_loader::Loader);

impl std::ops::Deref for Loader {
    type Target = codeclm_loader::Loader;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Loader {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
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
        Ok(Loader(codeclm_loader::Loader::new(
            &set.data, context, seed, mix,
        )?))
    }

    /// Fills `x` and `y` (each `batch * context` tokens, row-major [batch, context]) with the
    /// next `batch` windows: inputs and targets shifted by one.
    pub fn next_batch_into(
        &mut self,
        set: &TrainingSet,
        x: &mut [u32],
        y: &mut [u32],
    ) -> Result<()> {
        Ok(self.0.next_batch_into(&set.data, x, y)?)
    }

    /// A batch: inputs and targets, each `batch * context` tokens (row-major [batch, context]).
    pub fn next_batch(&mut self, set: &TrainingSet, batch: usize) -> Result<(Vec<u32>, Vec<u32>)> {
        Ok(self.0.next_batch(&set.data, batch)?)
    }

    /// The next window: `context + 1` tokens.
    pub fn next_window(&mut self, set: &TrainingSet) -> Result<Vec<u32>> {
        Ok(self.0.next_window(&set.data)?)
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

    /// Ranks and workers split the global stream: their batches interleaved are the windows
    /// of one loader, each window once; after each batch every rank holds the global
    /// position, which resumes on another number of ranks; skipping equals reading.
    #[test]
    fn ranks_and_workers_share_the_stream() {
        use codeclm_loader::Share;
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(90);
        s.video_every = 4;
        let set = set(dir.path(), &s);
        let mix = BTreeMap::new();
        let (world, batch, steps) = (3, 2, 12);
        let mut whole = Loader::new(&set, 20, 9, &mix).unwrap();
        whole.set_read_ahead(0);
        let mut all = Vec::new();
        let mut states = Vec::new();
        for _ in 0..steps {
            all.extend(windows(&mut whole, &set, world * batch));
            states.push(whole.state.clone());
        }
        let rows = |x: &[u32], y: &[u32]| -> Vec<Vec<u32>> {
            x.chunks(20)
                .zip(y.chunks(20))
                .map(|(a, b)| a.iter().copied().chain(b.last().copied()).collect())
                .collect()
        };
        for rank in 0..world {
            let mut l = Loader::new(&set, 20, 9, &mix).unwrap();
            l.set_share(Share::rank(rank, world, batch).unwrap())
                .unwrap();
            for (step, state) in states.iter().enumerate() {
                let (x, y) = l.next_batch(&set, batch).unwrap();
                let at = step * world * batch + rank * batch;
                assert_eq!(rows(&x, &y), all[at..at + batch], "rank {rank} step {step}");
                assert_eq!(&l.state, state, "rank {rank} holds the global position");
            }
            assert!(l.next_batch(&set, 3).is_err(), "a batch of another size");
        }
        // Workers of rank 1 take its batches in turn.
        let workers = 2;
        for k in 0..workers {
            let mut l = Loader::new(&set, 20, 9, &mix).unwrap();
            let share = Share::rank(1, world, batch).unwrap();
            l.set_share(share.worker(k, workers).unwrap()).unwrap();
            for j in 0..steps / workers {
                let step = k + j * workers;
                let (x, y) = l.next_batch(&set, batch).unwrap();
                let at = step * world * batch + batch;
                assert_eq!(rows(&x, &y), all[at..at + batch], "worker {k} step {step}");
            }
        }
        // A 3-rank checkpoint after step 4 resumes on one rank with the same global batch.
        let mut one = Loader::new(&set, 20, 9, &mix).unwrap();
        one.state = states[3].clone();
        let (x, y) = one.next_batch(&set, world * batch).unwrap();
        assert_eq!(rows(&x, &y), all[4 * world * batch..5 * world * batch]);
        // Skipping 17 windows lands where reading them does.
        let mut skip = Loader::new(&set, 20, 9, &mix).unwrap();
        skip.skip_windows(17).unwrap();
        let mut read = Loader::new(&set, 20, 9, &mix).unwrap();
        windows(&mut read, &set, 17);
        assert_eq!(skip.state, read.state);
        assert_eq!(skip.next_window(&set).unwrap(), all[17]);
        assert!(Share::rank(3, 3, 2).is_err() && Share::rank(0, 1, 0).is_err());
        assert!(Share::WHOLE.worker(2, 2).is_err());
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
