//! Reading a dataset back: its manifest rows, any sample's codec bytes (checked against the
//! manifest's checksum), standalone JPEG files with the tables spliced back, a summary, and
//! the check of a token set against the dataset (`dataset verify`).

use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::ops::{ControlFlow, Range};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::dataset::{DatasetConfig, DatasetLayout};
use crate::error::{Error, Result};
use crate::ids::IdIndex;
use crate::rows::{Manifests, RowFilter};
use crate::samples::{self, SampleRow, Status};
use crate::shard::{self, CodecShard};
use crate::tokens::{TokenLayout, TokenShard};

/// Each part's rows, as global row ranges of the manifests.
pub type PartRanges = BTreeMap<u32, Vec<Range<u64>>>;

pub struct Dataset {
    pub layout: DatasetLayout,
    pub config: DatasetConfig,
    manifests: Manifests,
    jpeg_tables: Option<Vec<u8>>,
    shards: Mutex<OpenShards>,
    /// Built on first use: each part's global row ranges, the sample-id index.
    parts: Mutex<Option<Arc<PartRanges>>>,
    ids: Mutex<Option<Arc<IdIndex>>>,
}

/// Open codec shards, at most `cap` of them (least recently used closed first): a dataset of
/// thousands of shards never runs into the open-file limit.
struct OpenShards {
    cap: usize,
    tick: u64,
    open: HashMap<String, (Arc<CodecShard>, u64)>,
}

/// Codec shards a [`Dataset`] keeps open by default (the common file limit is 1,024).
pub const MAX_OPEN_SHARDS: usize = 256;

impl OpenShards {
    fn evict(&mut self) {
        while self.open.len() > self.cap {
            let oldest = self
                .open
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.open.remove(&k),
                None => break,
            };
        }
    }
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Dataset {
    /// Opens a dataset: `samples.parquet` when present, otherwise the finished part manifests
    /// (a build still running, or one worker's share before `dataset merge`). Only the
    /// manifests' footers are read: rows are streamed by the methods below, never all held.
    pub fn open(root: &Path) -> Result<Dataset> {
        let layout = DatasetLayout::new(root);
        let config = layout.read_config()?;
        let manifests = Manifests::open(&layout)?;
        let jpeg_tables = match &config.jpeg_tables {
            Some(t) => {
                let path = layout.root.join(&t.file);
                let bytes = std::fs::read(&path).map_err(Error::io(&path))?;
                if format!("{:016x}", shard::checksum(&bytes)) != t.checksum {
                    return Err(Error::Corrupt {
                        path,
                        what: "JPEG tables stream",
                        problem: "its checksum differs from the one in dataset.json".into(),
                        fix: "rerun `codeclm dataset build` with the dataset's arguments: it rewrites a missing tables file; restore a damaged one from another copy".into(),
                    });
                }
                Some(bytes)
            }
            None => None,
        };
        Ok(Dataset {
            layout,
            config,
            manifests,
            jpeg_tables,
            shards: Mutex::new(OpenShards {
                cap: MAX_OPEN_SHARDS,
                tick: 0,
                open: HashMap::new(),
            }),
            parts: Mutex::new(None),
            ids: Mutex::new(None),
        })
    }

    /// Keeps at most `n` (at least 1) codec shards open.
    pub fn set_max_open_shards(&self, n: usize) {
        let mut cache = locked(&self.shards);
        cache.cap = n.max(1);
        cache.evict();
    }

    /// Codec shards open now.
    pub fn open_shards(&self) -> usize {
        locked(&self.shards).open.len()
    }

    /// Rows in the manifests (every status).
    pub fn len(&self) -> u64 {
        self.manifests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` on every row `filter` keeps, in manifest order, until it breaks; one slice of
    /// rows is in memory at a time.
    pub fn for_each_row<E: From<Error>>(
        &self,
        filter: RowFilter,
        mut f: impl FnMut(SampleRow) -> std::result::Result<ControlFlow<()>, E>,
    ) -> std::result::Result<(), E> {
        self.manifests.for_each_row(filter, |row, _| f(row))
    }

    /// The first `n` rows `filter` keeps, in manifest order.
    pub fn first_rows(&self, filter: RowFilter, n: usize) -> Result<Vec<SampleRow>> {
        let mut rows = Vec::new();
        if n == 0 {
            return Ok(rows);
        }
        self.for_each_row(filter, |r| {
            rows.push(r);
            Ok::<_, Error>(if rows.len() >= n {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            })
        })?;
        Ok(rows)
    }

    /// Every row `filter` keeps, in memory: for small datasets and tests (commands stream).
    pub fn load_rows(&self, filter: RowFilter) -> Result<Vec<SampleRow>> {
        let mut rows = Vec::new();
        self.for_each_row(filter, |r| {
            rows.push(r);
            Ok::<_, Error>(ControlFlow::Continue(()))
        })?;
        Ok(rows)
    }

    /// The `n` rows `filter` keeps with the lowest `(key(sample_id), sample_id)`, in that order:
    /// the seeded subsets (vocabulary training, held-out images). Only the id and filter
    /// columns are scanned, `n` candidates kept; the `n` rows are read at the end.
    pub fn lowest_by_key(
        &self,
        filter: RowFilter,
        n: usize,
        key: impl Fn(&str) -> u64,
    ) -> Result<Vec<SampleRow>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut heap: BinaryHeap<(u64, String, u64)> = BinaryHeap::new();
        let mut columns = vec!["sample_id"];
        columns.extend(RowFilter::COLUMNS);
        self.manifests.scan(Some(&columns), |df, first, path| {
            let bad = crate::rows::corrupt(path);
            let mask = filter.mask(df).map_err(&bad)?;
            let ids = df
                .column("sample_id")
                .and_then(|c| c.str().cloned())
                .map_err(&bad)?;
            for (i, (id, keep)) in ids.iter().zip(mask.iter()).enumerate() {
                let (Some(id), Some(true)) = (id, keep) else {
                    continue;
                };
                let k = key(id);
                if heap.len() < n {
                    heap.push((k, id.to_string(), first + i as u64));
                } else if heap
                    .peek()
                    .is_some_and(|(tk, tid, _)| (k, id) < (*tk, tid.as_str()))
                {
                    heap.pop();
                    heap.push((k, id.to_string(), first + i as u64));
                }
            }
            Ok::<_, Error>(ControlFlow::Continue(()))
        })?;
        let chosen: Vec<u64> = heap
            .into_sorted_vec()
            .into_iter()
            .map(|(_, _, g)| g)
            .collect();
        self.manifests.rows_at(&chosen)
    }

    /// Each part's rows, as global row ranges (one range per part in a dataset written by
    /// this version); built from the `part` column on first use.
    pub fn parts(&self) -> Result<Arc<PartRanges>> {
        if let Some(p) = locked(&self.parts).as_ref() {
            return Ok(p.clone());
        }
        let mut parts = PartRanges::new();
        self.manifests.scan(Some(&["part"]), |df, first, path| {
            let col = df
                .column("part")
                .and_then(|c| c.u32().cloned())
                .map_err(crate::rows::corrupt(path))?;
            for (i, p) in col.iter().enumerate() {
                let g = first + i as u64;
                let ranges = parts.entry(p.unwrap_or_default()).or_default();
                match ranges.last_mut() {
                    Some(r) if r.end == g => r.end = g + 1,
                    _ => ranges.push(g..g + 1),
                }
            }
            Ok::<_, Error>(ControlFlow::Continue(()))
        })?;
        let parts = Arc::new(parts);
        *locked(&self.parts) = Some(parts.clone());
        Ok(parts)
    }

    /// Per part: its [`samples::part_hash`] (every row), and how many rows `filter` keeps; one
    /// scan of the columns the hash covers (no rows built).
    pub fn part_summaries(&self, filter: RowFilter) -> Result<BTreeMap<u32, PartSummary>> {
        let mut hashes: BTreeMap<u32, (crate::FieldHash, u64, u64)> = BTreeMap::new();
        let mut columns: Vec<&str> = samples::PART_HASH_COLUMNS.to_vec();
        columns.push("part");
        self.manifests.scan(Some(&columns), |df, _, path| {
            let bad = crate::rows::corrupt(path);
            let mask = filter.mask(df).map_err(&bad)?;
            let text = |n: &str| df.column(n).and_then(|c| c.str().cloned()).map_err(&bad);
            let number = |n: &str| df.column(n).and_then(|c| c.u64().cloned()).map_err(&bad);
            let (id, status, modality, split, shard) = (
                text("sample_id")?,
                text("status")?,
                text("modality")?,
                text("split")?,
                text("shard")?,
            );
            let (len, checksum) = (number("codec_bytes")?, number("checksum")?);
            let record = df
                .column("record")
                .and_then(|c| c.u32().cloned())
                .map_err(&bad)?;
            let part = df
                .column("part")
                .and_then(|c| c.u32().cloned())
                .map_err(&bad)?;
            for i in 0..df.height() {
                let entry = hashes
                    .entry(part.get(i).unwrap_or_default())
                    .or_insert_with(|| (crate::FieldHash::default(), 0, 0));
                samples::hash_part_row(
                    &mut entry.0,
                    [
                        id.get(i).unwrap_or_default(),
                        status.get(i).unwrap_or_default(),
                        modality.get(i).unwrap_or_default(),
                        split.get(i).unwrap_or_default(),
                        shard.get(i).unwrap_or(""),
                    ],
                    [len.get(i), record.get(i).map(u64::from), checksum.get(i)],
                );
                entry.1 += 1;
                entry.2 += u64::from(mask.get(i) == Some(true));
            }
            Ok::<_, Error>(ControlFlow::Continue(()))
        })?;
        Ok(hashes
            .into_iter()
            .map(|(p, (h, rows, kept))| {
                (
                    p,
                    PartSummary {
                        hash: h.digest(),
                        rows,
                        kept,
                    },
                )
            })
            .collect())
    }

    /// Every row of `part` (every status), in order.
    pub fn part_rows(&self, part: u32) -> Result<Vec<SampleRow>> {
        let parts = self.parts()?;
        let mut rows = Vec::new();
        for r in parts.get(&part).into_iter().flatten() {
            rows.extend(self.manifests.read_range(r.clone())?);
        }
        Ok(rows)
    }

    /// The row of sample `sample_id`, through the sample-id index (built on the first lookup
    /// after the manifests change, see `ids.rs`).
    pub fn find(&self, sample_id: &str) -> Result<Option<SampleRow>> {
        let index = {
            let mut ids = locked(&self.ids);
            match ids.as_ref() {
                Some(ix) => ix.clone(),
                None => {
                    let ix = Arc::new(IdIndex::open_or_build(
                        &self.layout.id_index_path(),
                        &self.manifests,
                    )?);
                    *ids = Some(ix.clone());
                    ix
                }
            }
        };
        let candidates = index.candidates(sample_id)?;
        if candidates.is_empty() {
            return Ok(None);
        }
        Ok(self
            .manifests
            .rows_at(&candidates)?
            .into_iter()
            .find(|r| r.sample_id == sample_id))
    }

    pub fn jpeg_tables(&self) -> Option<&[u8]> {
        self.jpeg_tables.as_deref()
    }

    fn shard(&self, rel: &str) -> Result<Arc<CodecShard>> {
        let mut cache = locked(&self.shards);
        cache.tick += 1;
        let tick = cache.tick;
        if let Some((s, used)) = cache.open.get_mut(rel) {
            *used = tick;
            return Ok(s.clone());
        }
        let s = Arc::new(CodecShard::open(&self.layout.root.join(rel))?);
        cache.open.insert(rel.to_string(), (s.clone(), tick));
        cache.evict();
        Ok(s)
    }

    /// The stored codec bytes of a sample (for JPEG: the abbreviated stream).
    pub fn codec_bytes(&self, row: &SampleRow) -> Result<Vec<u8>> {
        let (Some(rel), Some(record)) = (row.shard.as_deref(), row.record) else {
            return Err(Error::Invalid(format!(
                "sample {} has no codec bytes: its status is {} ({})",
                row.sample_id,
                row.status.as_str(),
                row.error.as_deref().unwrap_or("")
            )));
        };
        let shard = self.shard(rel)?;
        let bytes = shard.read(record as usize)?;
        if row.checksum.is_some_and(|c| c != shard::checksum(&bytes)) {
            return Err(Error::Corrupt {
                path: shard.path().to_path_buf(),
                what: "codec shard",
                problem: format!(
                    "record {record} does not match the checksum in the manifest for sample {}",
                    row.sample_id
                ),
                fix: "the shard and the manifest come from different builds; rebuild the part"
                    .into(),
            });
        }
        Ok(bytes)
    }

    /// Mean codec bytes per sample of `modality` over the `ok` rows (`None` when there are none).
    pub fn mean_codec_bytes(&self, modality: crate::Modality) -> Result<Option<f64>> {
        let (mut n, mut sum) = (0u64, 0u64);
        let filter = RowFilter::ok(modality, None);
        let mut columns = vec!["codec_bytes"];
        columns.extend(RowFilter::COLUMNS);
        self.manifests.scan(Some(&columns), |df, _, path| {
            let mask = filter.mask(df).map_err(crate::rows::corrupt(path))?;
            let lens = df
                .column("codec_bytes")
                .and_then(|c| c.u64().cloned())
                .map_err(crate::rows::corrupt(path))?;
            for (len, keep) in lens.iter().zip(mask.iter()) {
                if let (Some(len), Some(true)) = (len, keep) {
                    n += 1;
                    sum += len;
                }
            }
            Ok::<_, Error>(ControlFlow::Continue(()))
        })?;
        Ok((n > 0).then(|| sum as f64 / n as f64))
    }

    /// The `inspect` summary, from a scan of six columns (and each token set's manifest): the
    /// codec lengths of the `ok` rows (4 bytes each) are the only per-row state.
    pub fn summary(&self) -> Result<Summary> {
        let mut s = Summary::default();
        let mut lengths: Vec<u32> = Vec::new();
        let mut long: Vec<u64> = Vec::new();
        let columns = [
            "status",
            "split",
            "modality",
            "crop_index",
            "src_bytes",
            "codec_bytes",
        ];
        self.manifests.scan(Some(&columns), |df, _, path| {
            let bad = crate::rows::corrupt(path);
            let text = |n: &str| df.column(n).and_then(|c| c.str().cloned());
            let (status, split, modality) = (
                text("status").map_err(&bad)?,
                text("split").map_err(&bad)?,
                text("modality").map_err(&bad)?,
            );
            let crop = df
                .column("crop_index")
                .and_then(|c| c.u32().cloned())
                .map_err(&bad)?;
            let number = |n: &str| df.column(n).and_then(|c| c.u64().cloned());
            let (src_bytes, codec_bytes) = (
                number("src_bytes").map_err(&bad)?,
                number("codec_bytes").map_err(&bad)?,
            );
            // Counted per distinct value of the slice (a handful), not per row.
            for (column, counts) in [
                (&status, &mut s.by_status),
                (&split, &mut s.by_split),
                (&modality, &mut s.by_modality),
            ] {
                let mut local: HashMap<&str, u64> = HashMap::new();
                for v in column.iter() {
                    *local.entry(v.unwrap_or_default()).or_default() += 1;
                }
                for (k, n) in local {
                    *counts.entry(k.to_string()).or_default() += n;
                }
            }
            for (((st, c), src), len) in status
                .iter()
                .zip(crop.iter())
                .zip(src_bytes.iter())
                .zip(codec_bytes.iter())
            {
                // The crops of one photo share its source: count the source once.
                if c.is_none_or(|c| c == 0) {
                    s.sources += 1;
                    s.src_bytes += src.unwrap_or(0);
                }
                if st == Some(Status::Ok.as_str()) {
                    let len = len.unwrap_or(0);
                    match u32::try_from(len) {
                        Ok(l) => lengths.push(l),
                        Err(_) => long.push(len),
                    }
                }
            }
            s.samples += df.height() as u64;
            Ok::<_, Error>(ControlFlow::Continue(()))
        })?;
        lengths.sort_unstable();
        long.sort_unstable();
        let count = lengths.len() + long.len();
        let at = |i: usize| -> u64 {
            if i < lengths.len() {
                lengths[i] as u64
            } else {
                long[i - lengths.len()]
            }
        };
        s.codec_bytes = lengths.iter().map(|&l| l as u64).sum::<u64>() + long.iter().sum::<u64>();
        if count > 0 {
            s.codec_mean = s.codec_bytes as f64 / count as f64;
            let pct = |p: f64| at((((count - 1) as f64) * p).round() as usize);
            s.codec_percentiles = vec![
                (0.0, pct(0.0)),
                (0.05, pct(0.05)),
                (0.5, pct(0.5)),
                (0.95, pct(0.95)),
                (1.0, pct(1.0)),
            ];
        }
        s.parts_present = self.layout.finished_parts()?.len() as u32;
        s.parts_total = self.config.parts_total;
        s.runs = self.layout.read_runs()?;
        for hash in crate::tokens::TokenLayout::list(&self.layout.root) {
            let path = crate::tokens::TokenLayout::new(&self.layout.root, &hash).manifest_path();
            let (mut t, mut b) = (0u64, 0u64);
            let counted = crate::tokens::for_each_token_row(&path, |r| {
                t += r.n_tokens;
                b += r.codec_bytes;
                Ok(())
            });
            if let Ok(docs) = counted {
                s.token_sets.push((hash, docs as u64, t, b));
            }
        }
        let shard_dir = self.layout.shards_dir();
        if let Ok(entries) = std::fs::read_dir(&shard_dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(".shard") {
                    s.shard_files += 1;
                    s.shard_bytes_on_disk += e.metadata().map(|m| m.len()).unwrap_or(0);
                }
            }
        }
        Ok(s)
    }
}

/// One part of a dataset, from [`Dataset::part_summaries`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartSummary {
    /// [`samples::part_hash`] of all its rows.
    pub hash: u64,
    pub rows: u64,
    /// Rows the filter kept.
    pub kept: u64,
}

/// What [`Dataset::verify_token_set`] checked, and the token parts it found stale.
#[derive(Debug, Default)]
pub struct TokenSetReport {
    pub shards: u64,
    pub frames: u64,
    pub tokens: u64,
    pub docs: u64,
    pub stale: Vec<StalePart>,
}

/// A token part tokenized from a codec part that has changed since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StalePart {
    pub part: u32,
    /// The codec part hash the token part records (`None`: tokenized by an older codeclm).
    pub recorded: Option<u64>,
    /// The codec part's hash now (`None`: the part is gone from the dataset).
    pub current: Option<u64>,
}

impl std::fmt::Display for StalePart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hex = |h: Option<u64>, none: &str| h.map_or(none.to_string(), |h| format!("{h:016x}"));
        write!(
            f,
            "part {} was tokenized from codec part hash {}, the part now hashes {}",
            self.part,
            hex(self.recorded, "(none recorded)"),
            hex(self.current, "(part gone)")
        )
    }
}

impl Dataset {
    /// Checks the finished token set `hash` against its shards and this dataset: every frame of
    /// every shard decoded and checked (checksum, length, ids in the vocabulary), each shard's
    /// document count, every manifest row's span (inside its shard, BOS first, EOS last), and
    /// each token part's recorded codec part hash against the part's hash now. A broken shard
    /// or manifest is an error naming the file and the fix; stale parts are reported.
    pub fn verify_token_set(&self, hash: &str) -> Result<TokenSetReport> {
        let root = &self.layout.root;
        let layout = TokenLayout::new(root, hash);
        let vocab = crate::vocab::Vocab::load(&layout.vocab_path())?;
        let manifest = layout.manifest_path();
        let fix = format!(
            "rerun `codeclm dataset tokenize --dataset {} --vocab {}`",
            root.display(),
            layout.vocab_path().display()
        );
        let mut report = TokenSetReport::default();
        // The manifest lists parts one after another: each part's shards are checked when its
        // rows end, so one part's marks are in memory at a time.
        let mut part: Option<(u32, Option<u64>)> = None;
        let mut seen: HashSet<u32> = HashSet::new();
        // Per shard: (token position, expected id, sample), checked in position order.
        let mut marks: BTreeMap<String, Vec<(u64, u32, String)>> = BTreeMap::new();
        let check = VerifyShards {
            root,
            hash,
            bos: vocab.bos,
            manifest: &manifest,
            fix: &fix,
        };
        let finish_part = |part: Option<(u32, Option<u64>)>,
                           marks: &mut BTreeMap<String, Vec<(u64, u32, String)>>,
                           report: &mut TokenSetReport|
         -> Result<()> {
            let Some((p, recorded)) = part else {
                return Ok(());
            };
            let rows = self.part_rows(p)?;
            let current = (!rows.is_empty()).then(|| samples::part_hash(&rows));
            if current.is_none() || recorded != current {
                report.stale.push(StalePart {
                    part: p,
                    recorded,
                    current,
                });
            }
            for (rel, marks) in std::mem::take(marks) {
                check.shard(&rel, marks, report)?;
            }
            Ok(())
        };
        crate::tokens::for_each_token_row(&manifest, |r| {
            report.docs += 1;
            if r.n_tokens < 2 {
                return Err(Error::Corrupt {
                    path: manifest.clone(),
                    what: "token manifest",
                    problem: format!(
                        "sample {} has {} tokens, not a BOS..EOS document",
                        r.sample_id, r.n_tokens
                    ),
                    fix: fix.clone(),
                });
            }
            if part.map(|(p, _)| p) != Some(r.part) {
                finish_part(part.take(), &mut marks, &mut report)?;
                if !seen.insert(r.part) {
                    return Err(Error::Corrupt {
                        path: manifest.clone(),
                        what: "token manifest",
                        problem: format!("the rows of part {} are not together", r.part),
                        fix: fix.clone(),
                    });
                }
                part = Some((r.part, r.codec_part_hash));
            }
            let m = marks.entry(r.shard.to_string()).or_default();
            m.push((r.offset, vocab.bos, r.sample_id.to_string()));
            m.push((
                r.offset + r.n_tokens - 1,
                vocab.eos,
                r.sample_id.to_string(),
            ));
            Ok(())
        })?;
        finish_part(part.take(), &mut marks, &mut report)?;
        Ok(report)
    }
}

/// The shard half of [`Dataset::verify_token_set`].
struct VerifyShards<'a> {
    root: &'a Path,
    hash: &'a str,
    bos: u32,
    manifest: &'a Path,
    fix: &'a str,
}

impl VerifyShards<'_> {
    /// Checks shard `rel` against the marks of its documents: its document count, every span
    /// inside it, BOS and EOS where the manifest says; every frame decoded (checksums).
    fn shard(
        &self,
        rel: &str,
        mut marks: Vec<(u64, u32, String)>,
        report: &mut TokenSetReport,
    ) -> Result<()> {
        marks.sort_unstable();
        let path = self.root.join(rel);
        let bad = |problem: String| Error::Corrupt {
            path: path.clone(),
            what: "token shard",
            problem,
            fix: self.fix.to_string(),
        };
        let s = TokenShard::open(&path, Some(self.hash))?;
        if let Some((pos, _, id)) = marks.last().filter(|m| m.0 >= s.token_count) {
            return Err(bad(format!(
                "sample {id} ends at token {pos}, past the shard's {} tokens",
                s.token_count
            )));
        }
        if s.docs != marks.len() as u64 / 2 {
            return Err(bad(format!(
                "it holds {} documents, {} lists {}",
                s.docs,
                self.manifest.display(),
                marks.len() / 2
            )));
        }
        let mut next = marks.iter().peekable();
        s.for_each_frame(|first, t| {
            while let Some(&(pos, want, id)) = next.peek() {
                if *pos >= first + t.len() as u64 {
                    break;
                }
                let got = t[(pos - first) as usize] as u32;
                if got != *want {
                    let name = if *want == self.bos { "BOS" } else { "EOS" };
                    return Err(bad(format!(
                        "sample {id} has token {got} at {pos}, not {want} ({name})"
                    )));
                }
                next.next();
            }
            Ok(())
        })?;
        report.shards += 1;
        report.frames += s.frames().len() as u64;
        report.tokens += s.token_count;
        Ok(())
    }
}

#[derive(Debug, Default)]
pub struct Summary {
    pub samples: u64,
    /// Inputs the samples came from (fewer than `samples` with `--crops`).
    pub sources: u64,
    pub by_status: BTreeMap<String, u64>,
    pub by_split: BTreeMap<String, u64>,
    pub by_modality: BTreeMap<String, u64>,
    pub src_bytes: u64,
    pub codec_bytes: u64,
    pub codec_mean: f64,
    pub codec_percentiles: Vec<(f64, u64)>,
    pub shard_files: u64,
    pub shard_bytes_on_disk: u64,
    pub parts_present: u32,
    pub parts_total: Option<u32>,
    pub runs: Vec<serde_json::Value>,
    /// (vocabulary hash, documents, tokens, codec bytes) of each token set.
    pub token_sets: Vec<(String, u64, u64, u64)>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let join = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        write!(
            f,
            "samples      {} ({})",
            self.samples,
            join(&self.by_modality)
        )?;
        if self.sources != self.samples {
            write!(f, " from {} sources", self.sources)?;
        }
        writeln!(f)?;
        writeln!(f, "status       {}", join(&self.by_status))?;
        writeln!(f, "split        {}", join(&self.by_split))?;
        let total = self
            .parts_total
            .map(|t| t.to_string())
            .unwrap_or_else(|| "?".into());
        writeln!(f, "parts        {} of {} done", self.parts_present, total)?;
        writeln!(f, "source bytes {:.2} MB", self.src_bytes as f64 / 1e6)?;
        writeln!(
            f,
            "codec bytes  {:.2} MB in {} shards ({:.2} MB on disk, zstd)",
            self.codec_bytes as f64 / 1e6,
            self.shard_files,
            self.shard_bytes_on_disk as f64 / 1e6
        )?;
        if !self.codec_percentiles.is_empty() {
            let p = self
                .codec_percentiles
                .iter()
                .map(|(q, v)| format!("p{:.0} {v}", q * 100.0))
                .collect::<Vec<_>>()
                .join(", ");
            writeln!(f, "codec length mean {:.0} B; {p}", self.codec_mean)?;
        }
        for (hash, docs, tokens, bytes) in &self.token_sets {
            writeln!(
                f,
                "tokens       {hash}: {docs} documents, {tokens} tokens ({:.0} per document, {:.3} codec bytes per token)",
                *tokens as f64 / (*docs).max(1) as f64,
                *bytes as f64 / (*tokens).max(1) as f64
            )?;
        }
        for run in &self.runs {
            let g = |k: &str| run.get(k).cloned().unwrap_or_default();
            writeln!(
                f,
                "build run    {} images in {:.1} s = {:.1} images/s ({:.1}/s per worker, {} workers, shard {} of {})",
                g("processed"),
                g("seconds").as_f64().unwrap_or(0.0),
                g("images_per_second").as_f64().unwrap_or(0.0),
                g("images_per_second_per_worker").as_f64().unwrap_or(0.0),
                g("workers"),
                g("shard_index"),
                g("num_shards"),
            )?;
        }
        Ok(())
    }
}
