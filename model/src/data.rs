//! Training data from a dataset's token shards (`tokens-<hash>.parquet` + `tokens/<hash>/*.tok`).
//!
//! Training stream: documents (each already `BOS + tokens + EOS` in the shards) of the `train`
//! split, concatenated and cut into windows of `context + 1` tokens that overlap by one (inputs
//! are the first `context`, targets the last `context`). The next document is drawn as follows:
//! pick a modality (`image`, `video`) with probability proportional to its weight, then take
//! that modality's next document in an order shuffled per epoch from `(seed, modality, epoch)`.
//! Everything that decides the stream is in [`LoaderState`], which checkpoints save: a resumed
//! run sees exactly the batches an uninterrupted run would.
//!
//! Validation: every `val` document on its own, in windows of at most `context + 1` tokens.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use codeclm_formats::tokens::{read_token_rows, TokenRow, TokenSet, TokenShard};
use codeclm_formats::vocab::Vocab;
use codeclm_formats::Split;
use serde::{Deserialize, Serialize};

use crate::rng::Rng;
use crate::{Error, Result};

/// A token set of a dataset, resolved and checked, with its rows and (once loaded) shards.
pub struct TrainingSet {
    pub root: PathBuf,
    pub hash: String,
    pub vocab: Vocab,
    pub rows: Vec<TokenRow>,
    shards: HashMap<String, Arc<TokenShard>>,
}

impl TrainingSet {
    /// Opens the token set named by `vocab` (see `codeclm_formats::tokens::TokenSet::resolve`)
    /// and reads its manifest.
    pub fn open(root: &Path, vocab: Option<&str>) -> Result<TrainingSet> {
        let set = TokenSet::resolve(root, vocab)?;
        set.require_tokens()?;
        let TokenSet {
            hash,
            layout,
            vocab,
        } = set;
        let manifest = layout.manifest_path();
        let rows = read_token_rows(&manifest)?;
        Ok(TrainingSet {
            root: root.to_path_buf(),
            hash,
            vocab,
            rows,
            shards: HashMap::new(),
        })
    }

    /// Loads (once) and checks every shard the rows refer to, and every row's bounds.
    pub fn load_shards(&mut self) -> Result<()> {
        for row in &self.rows {
            if !self.shards.contains_key(&row.shard) {
                let s = TokenShard::open(&self.root.join(&row.shard), Some(&self.hash))?;
                self.shards.insert(row.shard.clone(), Arc::new(s));
            }
            let s = &self.shards[&row.shard];
            let end = row.offset + row.n_tokens;
            let ok = end <= s.tokens.len() as u64
                && row.n_tokens >= 2
                && s.tokens[row.offset as usize] as u32 == self.vocab.bos
                && s.tokens[end as usize - 1] as u32 == self.vocab.eos;
            if !ok {
                return Err(Error::Data(format!(
                    "{}: document {} (offset {}, {} tokens) is not a BOS..EOS span of the shard. Fix: delete tokens/{}/ and tokens-{}.parquet, then rerun `codeclm dataset tokenize`",
                    self.root.join(&row.shard).display(),
                    row.sample_id,
                    row.offset,
                    row.n_tokens,
                    self.hash,
                    self.hash
                )));
            }
        }
        Ok(())
    }

    /// The tokens of a document (BOS and EOS included); shards must be loaded.
    pub fn doc(&self, row: &TokenRow) -> &[u16] {
        let s = &self.shards[&row.shard];
        &s.tokens[row.offset as usize..(row.offset + row.n_tokens) as usize]
    }

    /// Indices of the rows of a split, optionally one modality (by name, as mixes name them).
    pub fn split(&self, split: Split, modality: Option<&str>) -> Vec<usize> {
        (0..self.rows.len())
            .filter(|&i| {
                self.rows[i].split == split
                    && modality.is_none_or(|m| self.rows[i].modality.as_str() == m)
            })
            .collect()
    }

    pub fn modalities(&self, split: Split) -> Vec<String> {
        let mut m: Vec<String> = self
            .split(split, None)
            .into_iter()
            .map(|i| self.rows[i].modality.to_string())
            .collect();
        m.sort();
        m.dedup();
        m
    }
}

/// Everything that decides the rest of the training stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoaderState {
    pub rng: Rng,
    /// Per modality: (epoch, next index into that epoch's order).
    pub cursors: BTreeMap<String, (u64, usize)>,
    /// The document being read (row index) and the next token in it.
    pub current: Option<(usize, usize)>,
    /// The last token of the previous window (windows overlap by one).
    pub carry: Option<u32>,
    pub windows: u64,
}

/// The training stream over a token set's `train` documents.
pub struct Loader {
    seed: u64,
    context: usize,
    modalities: Vec<(String, f64, Vec<usize>)>,
    orders: HashMap<(String, u64), Vec<usize>>,
    pub state: LoaderState,
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
        let mut modalities = Vec::new();
        let chosen: Vec<(String, Option<f64>)> = if mix.is_empty() {
            available.iter().map(|m| (m.clone(), None)).collect()
        } else {
            mix.iter().map(|(m, w)| (m.clone(), Some(*w))).collect()
        };
        for (m, w) in chosen {
            let docs = set.split(Split::Train, Some(&m));
            if docs.is_empty() {
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
                None => docs.iter().map(|&i| set.rows[i].n_tokens as f64).sum(),
            };
            if weight > 0.0 {
                modalities.push((m, weight, docs));
            }
        }
        if modalities.is_empty() {
            return Err(Error::Config("every mix weight is zero".into()));
        }
        let cursors = modalities
            .iter()
            .map(|(m, _, _)| (m.clone(), (0, 0)))
            .collect();
        Ok(Loader {
            seed,
            context,
            modalities,
            orders: HashMap::new(),
            state: LoaderState {
                rng: Rng::new(seed ^ 0x5EED_DA7A),
                cursors,
                current: None,
                carry: None,
                windows: 0,
            },
        })
    }

    fn next_doc(&mut self) -> usize {
        let total: f64 = self.modalities.iter().map(|m| m.1).sum();
        let mut u = self.state.rng.uniform() * total;
        let mut pick = self.modalities.len() - 1;
        for (i, m) in self.modalities.iter().enumerate() {
            if u < m.1 {
                pick = i;
                break;
            }
            u -= m.1;
        }
        let (name, _, docs) = &self.modalities[pick];
        let cursor = self.state.cursors.entry(name.clone()).or_insert((0, 0));
        if cursor.1 >= docs.len() {
            *cursor = (cursor.0 + 1, 0);
        }
        let (epoch, idx) = *cursor;
        cursor.1 += 1;
        let seed = self.seed;
        let order = self.orders.entry((name.clone(), epoch)).or_insert_with(|| {
            let mut o = docs.clone();
            let mut h = seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            for b in name.bytes() {
                h = h.rotate_left(8) ^ b as u64;
            }
            Rng::new(h).shuffle(&mut o);
            o
        });
        let row = order[idx];
        if self.orders.len() > 4 * self.modalities.len() {
            let keep_epoch = epoch;
            self.orders.retain(|(_, e), _| *e + 1 >= keep_epoch);
        }
        row
    }

    /// The next window: `context + 1` tokens.
    pub fn next_window(&mut self, set: &TrainingSet) -> Vec<u32> {
        let want = self.context + 1;
        let mut out = Vec::with_capacity(want);
        if let Some(c) = self.state.carry {
            out.push(c);
        }
        while out.len() < want {
            let (row, pos) = match self.state.current {
                Some(c) => c,
                None => (self.next_doc(), 0),
            };
            let doc = set.doc(&set.rows[row]);
            let take = (want - out.len()).min(doc.len() - pos);
            out.extend(doc[pos..pos + take].iter().map(|&t| t as u32));
            self.state.current = if pos + take < doc.len() {
                Some((row, pos + take))
            } else {
                None
            };
        }
        self.state.carry = out.last().copied();
        self.state.windows += 1;
        out
    }

    /// A batch: inputs and targets, each `batch * context` tokens (row-major [batch, context]).
    pub fn next_batch(&mut self, set: &TrainingSet, batch: usize) -> (Vec<u32>, Vec<u32>) {
        let mut x = Vec::with_capacity(batch * self.context);
        let mut y = Vec::with_capacity(batch * self.context);
        for _ in 0..batch {
            let w = self.next_window(set);
            x.extend_from_slice(&w[..self.context]);
            y.extend_from_slice(&w[1..]);
        }
        (x, y)
    }
}

/// A byte-unigram model fitted on the training documents' codec bytes with add-one smoothing,
/// evaluated on the validation documents' codec bytes: bits per byte.
pub fn unigram_baseline_bits_per_byte(set: &TrainingSet) -> Result<f64> {
    let mut counts = [1u64; 256];
    for i in set.split(Split::Train, None) {
        let doc: Vec<u32> = set.doc(&set.rows[i]).iter().map(|&t| t as u32).collect();
        for b in set.vocab.decode(&doc)? {
            counts[b as usize] += 1;
        }
    }
    let total: u64 = counts.iter().sum();
    let (mut bits, mut n) = (0.0f64, 0u64);
    for i in set.split(Split::Val, None) {
        let doc: Vec<u32> = set.doc(&set.rows[i]).iter().map(|&t| t as u32).collect();
        for b in set.vocab.decode(&doc)? {
            bits -= (counts[b as usize] as f64 / total as f64).log2();
            n += 1;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_shuffle_is_a_permutation() {
        let mut v: Vec<usize> = (0..50).collect();
        Rng::new(3).shuffle(&mut v);
        let mut s = v.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert_ne!(v, s);
    }
}
