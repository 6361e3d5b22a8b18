//! Reading a dataset back: its manifest rows, any sample's codec bytes (checked against the
//! manifest's checksum), standalone JPEG files with the tables spliced back, a summary, and
//! the check of a token set against the dataset (`dataset verify`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::dataset::{DatasetConfig, DatasetLayout};
use crate::error::{Error, Result};
use crate::samples::{self, SampleRow, Status};
use crate::shard::{self, CodecShard};
use crate::tokens::{read_token_rows, TokenLayout, TokenShard};

pub struct Dataset {
    pub layout: DatasetLayout,
    pub config: DatasetConfig,
    rows: Vec<SampleRow>,
    jpeg_tables: Option<Vec<u8>>,
    shards: Mutex<OpenShards>,
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

impl Dataset {
    /// Opens a dataset: `samples.parquet` when present, otherwise the finished part manifests
    /// (a build still running, or one worker's share before `dataset merge`).
    pub fn open(root: &Path) -> Result<Dataset> {
        let layout = DatasetLayout::new(root);
        let config = layout.read_config()?;
        let rows = if layout.samples_path().exists() {
            samples::read_parquet(&layout.samples_path())?
        } else {
            let mut rows = Vec::new();
            for part in layout.finished_parts()? {
                rows.extend(samples::read_parquet(&layout.part_manifest(part))?);
            }
            rows
        };
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
            rows,
            jpeg_tables,
            shards: Mutex::new(OpenShards {
                cap: MAX_OPEN_SHARDS,
                tick: 0,
                open: HashMap::new(),
            }),
        })
    }

    /// Keeps at most `n` (at least 1) codec shards open.
    pub fn set_max_open_shards(&self, n: usize) {
        let mut cache = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        cache.cap = n.max(1);
        cache.evict();
    }

    /// Codec shards open now.
    pub fn open_shards(&self) -> usize {
        self.shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .open
            .len()
    }

    pub fn rows(&self) -> &[SampleRow] {
        &self.rows
    }

    pub fn find(&self, sample_id: &str) -> Option<&SampleRow> {
        self.rows.iter().find(|r| r.sample_id == sample_id)
    }

    pub fn jpeg_tables(&self) -> Option<&[u8]> {
        self.jpeg_tables.as_deref()
    }

    fn shard(&self, rel: &str) -> Result<Arc<CodecShard>> {
        let mut cache = self.shards.lock().unwrap_or_else(|e| e.into_inner());
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
    pub fn mean_codec_bytes(&self, modality: crate::Modality) -> Option<f64> {
        let lens: Vec<u64> = self
            .rows()
            .iter()
            .filter(|r| r.is_ok() && r.modality == modality)
            .filter_map(|r| r.codec_bytes)
            .collect();
        (!lens.is_empty()).then(|| lens.iter().sum::<u64>() as f64 / lens.len() as f64)
    }

    pub fn summary(&self) -> Result<Summary> {
        let mut s = Summary::default();
        let mut lengths: Vec<u64> = Vec::new();
        for r in &self.rows {
            *s.by_status
                .entry(r.status.as_str().to_string())
                .or_default() += 1;
            *s.by_split.entry(r.split.to_string()).or_default() += 1;
            *s.by_modality.entry(r.modality.to_string()).or_default() += 1;
            // The crops of one photo share its source: count the source once.
            if r.crop.is_none_or(|c| c.index == 0) {
                s.sources += 1;
                s.src_bytes += r.src_bytes;
            }
            if r.status == Status::Ok {
                lengths.push(r.codec_bytes.unwrap_or(0));
            }
        }
        s.samples = self.rows.len() as u64;
        lengths.sort_unstable();
        s.codec_bytes = lengths.iter().sum();
        if !lengths.is_empty() {
            s.codec_mean = s.codec_bytes as f64 / lengths.len() as f64;
            let pct = |p: f64| lengths[(((lengths.len() - 1) as f64) * p).round() as usize];
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
            if let Ok(rows) = crate::tokens::read_token_rows(&path) {
                let (t, b) = rows
                    .iter()
                    .fold((0, 0), |(t, b), r| (t + r.n_tokens, b + r.codec_bytes));
                s.token_sets.push((hash, rows.len() as u64, t, b));
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
        let rows = read_token_rows(&manifest)?;
        let fix = format!(
            "rerun `codeclm dataset tokenize --dataset {} --vocab {}`",
            root.display(),
            layout.vocab_path().display()
        );
        let mut report = TokenSetReport {
            docs: rows.len() as u64,
            ..TokenSetReport::default()
        };
        // Per shard: (token position, expected id, sample), in position order.
        let mut marks: BTreeMap<&str, Vec<(u64, u32, &str)>> = BTreeMap::new();
        let mut recorded: BTreeMap<u32, Option<u64>> = BTreeMap::new();
        for r in &rows {
            if r.n_tokens < 2 {
                return Err(Error::Corrupt {
                    path: manifest.clone(),
                    what: "token manifest",
                    problem: format!(
                        "sample {} has {} tokens, not a BOS..EOS document",
                        r.sample_id, r.n_tokens
                    ),
                    fix,
                });
            }
            let m = marks.entry(r.shard.as_str()).or_default();
            m.push((r.offset, vocab.bos, &r.sample_id));
            m.push((r.offset + r.n_tokens - 1, vocab.eos, &r.sample_id));
            recorded.entry(r.part).or_insert(r.codec_part_hash);
        }
        let mut by_part: BTreeMap<u32, Vec<&SampleRow>> = BTreeMap::new();
        for r in &self.rows {
            by_part.entry(r.part).or_default().push(r);
        }
        for (&part, &recorded) in &recorded {
            let current = by_part
                .get(&part)
                .map(|rows| samples::part_hash(rows.iter().copied()));
            if current.is_none() || recorded != current {
                report.stale.push(StalePart {
                    part,
                    recorded,
                    current,
                });
            }
        }
        for (rel, marks) in &mut marks {
            marks.sort_unstable();
            let path = root.join(rel);
            let bad = |problem: String| Error::Corrupt {
                path: path.clone(),
                what: "token shard",
                problem,
                fix: fix.clone(),
            };
            let s = TokenShard::open(&path, Some(hash))?;
            if let Some(&(pos, _, id)) = marks.last().filter(|m| m.0 >= s.token_count) {
                return Err(bad(format!(
                    "sample {id} ends at token {pos}, past the shard's {} tokens",
                    s.token_count
                )));
            }
            if s.docs != marks.len() as u64 / 2 {
                return Err(bad(format!(
                    "it holds {} documents, {} lists {}",
                    s.docs,
                    manifest.display(),
                    marks.len() / 2
                )));
            }
            let mut next = marks.iter().peekable();
            s.for_each_frame(|first, t| {
                while let Some(&&(pos, want, id)) = next.peek() {
                    if pos >= first + t.len() as u64 {
                        break;
                    }
                    let got = t[(pos - first) as usize] as u32;
                    if got != want {
                        let name = if want == vocab.bos { "BOS" } else { "EOS" };
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
        }
        Ok(report)
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
