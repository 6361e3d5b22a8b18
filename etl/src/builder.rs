//! The dataset builder: reader -> workers -> writer over bounded channels.
//!
//! - The reader plans the image source, then the video source, into parts (video parts are
//!   numbered after the image parts; a part holds one modality) and feeds the items of every part this worker owns
//!   (`part % num_shards == shard_index`) and has not finished yet.
//! - A rayon pool decodes, resizes and encodes items in parallel, in any order. An item gives
//!   one row, or with `crops` one row per crop (one row when it does not decode).
//! - The writer puts results back in input order per part (an item's rows together, in crop
//!   order), appends codec bytes to the part's shards, and when a part is complete writes its
//!   manifest last. A part whose manifest exists is done, so a killed build rerun with the same
//!   arguments skips it, redoes the rest (every crop of its inputs), and ends with exactly the
//!   bytes an uninterrupted run writes.
//!
//! Memory is bounded by the channel capacities and the reorder window, not by the source size.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use codeclm_formats::dataset::{DatasetConfig, DatasetLayout, TablesRef};
use codeclm_formats::lease::{Acquired, Leases};
use codeclm_formats::samples::{self, Modality, SampleRow, Split, Status};
use codeclm_formats::shard::{self, Codec, CodecShard, CodecShardWriter, CompressedRecord};
use crossbeam_channel::{bounded, Receiver};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::iter::{ParallelBridge, ParallelIterator};
use serde::{Deserialize, Serialize};

use crate::config::ImageConfig;
use crate::crop::RandomCrops;
use crate::isolate::{Isolation, JobHeader, Pool};
use crate::process::{process_image_crops, process_image_within, process_video, Outcome};
use crate::source::{self, Item, SourceSpec};
use codeclm_codec::h264::VideoConfig;
use codeclm_codec::Limits;
use codeclm_formats::plan::{Plan, PlanHeader, PlanWriter};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Format(#[from] codeclm_formats::Error),
    #[error(transparent)]
    Source(#[from] source::SourceError),
    #[error(transparent)]
    Remote(#[from] crate::objects::ObjectError),
    #[error("{0}")]
    Config(String),
}

/// Everything that determines the dataset's bytes; saved as `build` in `dataset.json` and
/// compared on resume and merge.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BuildSettings {
    /// The images (`--images`), if any.
    pub source: Option<SourceSpec>,
    pub image: ImageConfig,
    /// Random-resized crops of every image (`--crops N`): N rows per image in place of the one
    /// `image.resize` would give. Absent from the record when off, so datasets built before it
    /// existed resume and merge as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crops: Option<RandomCrops>,
    /// The videos (`--videos`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub videos: Option<SourceSpec>,
    #[serde(default)]
    pub video: VideoConfig,
    /// Inputs per part (the unit of work, resume and sharding).
    pub part_size: usize,
    /// A part's shard rolls over to a new file past this many codec bytes.
    pub shard_max_bytes: u64,
    /// Fraction of sources in the `val` split, chosen by hashing the source's id (every crop of
    /// a photo goes where the photo goes).
    pub val_fraction: f64,
    pub zstd_level: i32,
    /// The hash of the frozen plan (`dataset plan`) the parts come from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
}

impl BuildSettings {
    pub fn new(source: SourceSpec, image: ImageConfig) -> BuildSettings {
        BuildSettings::with_sources(Some(source), image, None, VideoConfig::default())
    }

    /// Images, videos, or both in one dataset.
    pub fn with_sources(
        images: Option<SourceSpec>,
        image: ImageConfig,
        videos: Option<SourceSpec>,
        video: VideoConfig,
    ) -> BuildSettings {
        BuildSettings {
            source: images,
            image,
            crops: None,
            videos,
            video,
            part_size: 10_000,
            shard_max_bytes: 256 << 20,
            val_fraction: 0.01,
            zstd_level: shard::DEFAULT_ZSTD_LEVEL,
            plan: None,
        }
    }

    /// The sources in build order (images, then videos) with their video flag.
    pub fn sources(&self) -> Vec<(SourceSpec, bool)> {
        [
            self.source.clone().map(|s| (s, false)),
            self.videos.clone().map(|s| (s, true)),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// The sources as a plan header records them.
    fn plan_sources(&self) -> Vec<serde_json::Value> {
        self.sources()
            .into_iter()
            .map(|(spec, video)| serde_json::json!({"video": video, "spec": spec}))
            .collect()
    }

    /// Takes the sources from a frozen plan (what `dataset build --out DIR` does when DIR was
    /// planned and no source is given).
    pub fn use_plan_sources(&mut self, plan: &PlanHeader) -> Result<(), BuildError> {
        self.source = None;
        self.videos = None;
        for s in &plan.sources {
            let spec: SourceSpec = serde_json::from_value(s["spec"].clone())
                .map_err(|e| BuildError::Config(format!("the plan's source {s}: {e}")))?;
            if s["video"].as_bool().unwrap_or(false) {
                self.videos = Some(spec);
            } else {
                self.source = Some(spec);
            }
        }
        Ok(())
    }

    /// The settings a dataset was built with (`build` in its `dataset.json`): the one reader
    /// of them, so every command sees the same typed record.
    pub fn of(ds: &codeclm_formats::Dataset) -> Result<BuildSettings, BuildError> {
        serde_json::from_value(ds.config.build.clone()).map_err(|e| {
            BuildError::Config(format!(
                "{}: `build` is not a build record this version reads ({e}); rebuild the dataset with this codeclm",
                ds.layout.config_path().display()
            ))
        })
    }

    /// The video settings, or an error naming the fix when the dataset has no videos.
    pub fn video_settings(
        &self,
        ds: &codeclm_formats::Dataset,
    ) -> Result<&VideoConfig, BuildError> {
        if self.videos.is_none() {
            return Err(BuildError::Config(format!(
                "{} holds no videos: build the dataset with --videos",
                ds.layout.root.display()
            )));
        }
        Ok(&self.video)
    }
}

/// How this invocation runs (none of it changes the output bytes).
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub out: PathBuf,
    pub settings: BuildSettings,
    pub workers: usize,
    pub shard_index: u32,
    pub num_shards: u32,
    pub progress: bool,
    /// Where `shard_index`/`num_shards` came from (`flags`, or the job array's variables), for
    /// the run summary.
    pub shard_from: String,
    /// Where the decoders run: worker processes (a native crash costs one row) or threads.
    pub isolation: Isolation,
    /// Per-input deadline (`--item-timeout`): past it an input is a `timeout` row.
    pub item_timeout: Option<Duration>,
    /// Inputs larger than this are `too_large` rows, never read (`--max-input-bytes`).
    pub max_input_bytes: u64,
    /// Source bytes read and not yet encoded, at most (`--max-inflight-mib`).
    pub max_inflight_bytes: u64,
    /// Redo the failed rows of finished parts, keeping the rest (`--retry-failed`).
    pub retry_failed: bool,
    /// How long a part's lease lives without a heartbeat (`--lease-seconds`).
    pub lease_ttl: Duration,
    /// Writer threads, each writing its own parts (`None`: one per 8 workers). The output does
    /// not depend on it.
    pub writers: Option<usize>,
    /// The dataset lives in object storage and `out` is its local stage: finished parts are
    /// uploaded (shards, then the manifest) and the bucket says which parts are done.
    pub mirror: Option<Arc<crate::mirror::Mirror>>,
}

impl BuildOptions {
    /// Defaults for library use: one worker thread, the whole source, no progress bar, the
    /// decoders on threads, a 60 s item timeout, 1 GiB inputs, 2 GiB in flight.
    pub fn new(out: impl Into<PathBuf>, settings: BuildSettings) -> BuildOptions {
        BuildOptions {
            out: out.into(),
            settings,
            workers: 1,
            shard_index: 0,
            num_shards: 1,
            progress: false,
            shard_from: "flags".into(),
            isolation: Isolation::Threads,
            item_timeout: Some(Duration::from_secs(60)),
            max_input_bytes: 1 << 30,
            max_inflight_bytes: 2 << 30,
            retry_failed: false,
            lease_ttl: Duration::from_secs(120),
            writers: None,
            mirror: None,
        }
    }
}

/// One of the slowest inputs of a run (`BuildSummary::slowest`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SlowInput {
    pub source: String,
    pub seconds: f64,
    pub status: String,
}

/// How many of the slowest inputs a run summary lists.
const SLOWEST: usize = 10;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BuildSummary {
    /// Inputs processed.
    pub processed: u64,
    /// Rows written for them (`processed` x N with `--crops N`, less the undecodable inputs'
    /// N - 1); `ok` and `failed` count these.
    #[serde(default)]
    pub samples: u64,
    pub ok: u64,
    pub failed: u64,
    pub by_status: BTreeMap<String, u64>,
    pub codec_bytes: u64,
    pub parts_built: u32,
    pub parts_skipped: u32,
    pub parts_total: u32,
    pub seconds: f64,
    pub workers: usize,
    pub shard_index: u32,
    pub num_shards: u32,
    /// Where the shard index and count came from: `flags` or the job array's variables.
    #[serde(default)]
    pub shard_from: String,
    /// True when every part of the source is present and `samples.parquet` was written.
    pub complete: bool,
    /// The slowest inputs of this run, slowest first.
    #[serde(default)]
    pub slowest: Vec<SlowInput>,
    /// Parts skipped because another live worker holds their lease.
    #[serde(default)]
    pub parts_leased_elsewhere: u32,
    /// Finished parts redone by `--retry-failed` (their successful rows kept).
    #[serde(default)]
    pub parts_retried: u32,
    /// Inputs whose earlier successful rows were kept by `--retry-failed`, not decoded again.
    #[serde(default)]
    pub kept: u64,
    /// CPU seconds of the writer thread writing (records appended, rows made, shards and
    /// manifests finished): one thread writes for all workers. CPU time, not wall time: on a
    /// machine with more busy threads than cores the writer's wall time counts its waits.
    #[serde(default)]
    pub writer_seconds: f64,
    /// Wall seconds the workers spent on the inputs (decode, resize, encode, compression),
    /// summed.
    #[serde(default)]
    pub worker_seconds: f64,
    /// Writer threads of the run.
    #[serde(default)]
    pub writers: usize,
}

impl BuildSummary {
    /// Adds another writer's counts (its parts), keeping the slowest inputs of both.
    fn absorb(&mut self, o: BuildSummary) {
        self.processed += o.processed;
        self.samples += o.samples;
        self.ok += o.ok;
        self.failed += o.failed;
        for (k, n) in o.by_status {
            *self.by_status.entry(k).or_default() += n;
        }
        self.codec_bytes += o.codec_bytes;
        self.parts_built += o.parts_built;
        self.writer_seconds += o.writer_seconds;
        self.worker_seconds += o.worker_seconds;
        self.slowest.extend(o.slowest);
        self.slowest.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        self.slowest.truncate(SLOWEST);
    }

    /// How many workers one writer keeps up with at this run's inputs: the workers' seconds per
    /// input over the writer's (`None` before anything was written).
    pub fn workers_per_writer(&self) -> Option<f64> {
        (self.writer_seconds > 0.0).then(|| self.worker_seconds / self.writer_seconds)
    }

    pub fn images_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.processed as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// The stable id of a source identity: xxh3-64, 16 hex digits. The sample id of a source
/// without crops (and of the one error row of a source that does not decode).
pub fn sample_id(identity: &str) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(identity.as_bytes()))
}

/// The sample id of crop `index` of the source whose id is `source_id`: `<source id>-crop<k>`.
pub fn crop_sample_id(source_id: &str, index: u32) -> String {
    format!("{source_id}-crop{index}")
}

/// `val` for a fixed fraction of source ids (by a salted hash, so it is independent of the id's
/// bits). Crops take their source's split, so held-out crops come from held-out photos.
pub fn split_of(source_id: &str, val_fraction: f64) -> Split {
    let h = xxhash_rust::xxh3::xxh3_64_with_seed(source_id.as_bytes(), 0x5EED_5B11);
    if (h as f64) < val_fraction * (u64::MAX as f64) {
        Split::Val
    } else {
        Split::Train
    }
}

struct Job {
    part: u32,
    index: u32,
    video: bool,
    /// The writer its results go to (the one writing its part).
    writer: usize,
    item: Item,
    /// Bytes of the in-flight budget this job holds (acquired by the reader for sources that
    /// hand bytes; file inputs acquire theirs when the worker reads them).
    held: u64,
}

enum Msg {
    Done {
        part: u32,
        index: u32,
        identity: String,
        kind: &'static str,
        video: bool,
        /// One per row: one, or one per crop.
        outcomes: Vec<Outcome>,
        /// The codec bytes of each ok outcome compressed and checksummed by the worker (the
        /// writer only appends them); `None` where the writer compresses (kept rows).
        records: Vec<Option<CompressedRecord>>,
        /// Wall time the input took, reading included.
        seconds: f64,
    },
    PartEnd {
        part: u32,
        items: u32,
    },
}

/// Builds (or resumes) the dataset in `opts.out`.
pub fn build(opts: &BuildOptions) -> Result<BuildSummary, BuildError> {
    let started = Instant::now();
    let frozen = Plan::open(&opts.out)?;
    let planned;
    let settings = match &frozen {
        None => &opts.settings,
        Some(plan) => {
            let h = &plan.header;
            if h.sources != opts.settings.plan_sources() || h.part_size != opts.settings.part_size {
                return Err(BuildError::Config(format!(
                    "{} was planned for other sources or parts ({} part(s) of {} inputs from {}); build it without --images/--videos/--part-size to use its plan, or choose a new --out",
                    opts.out.display(),
                    h.parts,
                    h.part_size,
                    serde_json::Value::Array(h.sources.clone())
                )));
            }
            let mut s = opts.settings.clone();
            s.plan = Some(h.hash.clone());
            planned = s;
            &planned
        }
    };
    settings.image.validate().map_err(BuildError::Config)?;
    settings.video.validate().map_err(BuildError::Config)?;
    if settings.source.is_none() && settings.videos.is_none() {
        return Err(BuildError::Config(
            "nothing to build: give --images SRC, --videos SRC or both".into(),
        ));
    }
    if opts.num_shards == 0 || opts.shard_index >= opts.num_shards {
        return Err(BuildError::Config(format!(
            "--shard-index {} must be below --num-shards {} (workers are numbered 0..n-1)",
            opts.shard_index, opts.num_shards
        )));
    }
    if let Some(crops) = &settings.crops {
        crops.validate().map_err(BuildError::Config)?;
        if settings.image.dct_scaling {
            return Err(BuildError::Config(
                "crops are cut from the full-resolution decode: turn DCT scaling off (--dct-scaling false; `dataset build --crops` does so itself)".into(),
            ));
        }
    }
    if !(0.0..=1.0).contains(&settings.val_fraction) {
        return Err(BuildError::Config(format!(
            "--val-fraction {} is outside 0..1",
            settings.val_fraction
        )));
    }
    let layout = DatasetLayout::new(&opts.out);
    layout.create_dirs()?;
    // Temp files of parts are removed by whoever takes the part's lease (a live worker's are
    // its own); here only this host's leftovers of dead processes.
    let swept = layout.sweep_temp_files(&|_| false)?;
    if swept > 0 {
        tracing::info!("removed {swept} temp files left by an interrupted run");
    }
    let mut config = prepare_config(&layout, settings)?;
    let mirror = opts.mirror.clone();
    let finished: HashSet<u32> = match &mirror {
        Some(m) => {
            if opts.retry_failed {
                return Err(BuildError::Config(format!(
                    "--retry-failed rewrites finished parts in place, which {} (object storage) cannot do. Fix: `codeclm dataset pull {} DIR`, retry into DIR",
                    m.url(),
                    m.url()
                )));
            }
            m.push_if_absent("jpeg_tables.jpg")?;
            m.push_if_absent("dataset.json")?;
            m.sync_parts()?.into_iter().collect()
        }
        None => layout.finished_parts()?.into_iter().collect(),
    };
    let workers = opts.workers.max(1);
    let cancel = Arc::new(AtomicBool::new(false));
    let (work_tx, work_rx) = bounded::<Job>(workers * 4);
    let budget = Arc::new(Budget::new(opts.max_inflight_bytes));
    // One writer per 8 workers by default: one keeps up with 11 to 65 workers depending on the
    // inputs (docs/performance.md); each writes its own parts, so outputs do not change.
    let writers = opts.writers.unwrap_or(workers.div_ceil(8)).clamp(1, 64);
    let (res_txs, res_rxs): (Vec<_>, Vec<_>) =
        (0..writers).map(|_| bounded::<Msg>(workers * 8)).unzip();

    let leases = Arc::new(Leases::new(layout.clone(), opts.lease_ttl));
    let reader = {
        let reader = Reader {
            sources: settings.sources(),
            plan: frozen,
            part_size: settings.part_size,
            shard_index: opts.shard_index,
            num_shards: opts.num_shards,
            retry_failed: opts.retry_failed,
            max_input_bytes: opts.max_input_bytes,
            finished: finished.clone(),
            layout: layout.clone(),
            leases: leases.clone(),
            budget: budget.clone(),
            cancel: cancel.clone(),
            work_tx,
            res_txs: res_txs.clone(),
        };
        std::thread::Builder::new()
            .name("codeclm-reader".into())
            .spawn(move || reader.run())
            .map_err(|e| BuildError::Config(format!("cannot start the reader thread: {e}")))?
    };
    let heartbeat = {
        let leases = leases.clone();
        let cancel = cancel.clone();
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let d = done.clone();
        let thread = std::thread::Builder::new()
            .name("codeclm-leases".into())
            .spawn(move || {
                let (lock, cv) = &*d;
                let mut stop = lock.lock().unwrap_or_else(|e| e.into_inner());
                while !*stop && !cancel.load(Ordering::Relaxed) {
                    stop = cv
                        .wait_timeout(stop, leases.heartbeat_interval())
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    if !*stop {
                        leases.renew_all();
                    }
                }
            })
            .map_err(|e| BuildError::Config(format!("cannot start the lease thread: {e}")))?;
        (thread, done)
    };

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .thread_name(|i| format!("codeclm-worker-{i}"))
        .build()
        .map_err(|e| BuildError::Config(format!("cannot start {workers} workers: {e}")))?;
    let ctx = JobContext {
        image: settings.image,
        crops: settings.crops,
        video: settings.video,
        item_timeout: opts.item_timeout,
        max_input_bytes: opts.max_input_bytes,
        zstd_level: settings.zstd_level,
        budget: budget.clone(),
        pool: match &opts.isolation {
            Isolation::Threads => None,
            Isolation::Processes { exe, args } => Some(
                Pool::new(
                    exe.clone(),
                    args.clone(),
                    &settings.image,
                    settings.crops.as_ref(),
                    &settings.video,
                    opts.item_timeout,
                )
                .map_err(BuildError::Config)?,
            ),
        },
    };
    let worker = std::thread::spawn(move || {
        pool.install(|| {
            work_rx
                .into_iter()
                .par_bridge()
                .for_each_with(res_txs, |txs, job| {
                    let writer = job.writer;
                    let _ = txs[writer].send(run_job(job, &ctx));
                })
        })
    });

    let progress = progress_bar(opts.progress);
    // The writers, each on its own parts; the first error stops the build (its channel is
    // dropped, which unblocks the workers and the reader).
    let written: Vec<Result<BuildSummary, BuildError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = res_rxs
            .into_iter()
            .enumerate()
            .map(|(i, rx)| {
                let (layout, leases, progress, cancel, mirror) = (
                    layout.clone(),
                    leases.clone(),
                    progress.clone(),
                    cancel.clone(),
                    mirror.clone(),
                );
                std::thread::Builder::new()
                    .name(format!("codeclm-writer-{i}"))
                    .spawn_scoped(scope, move || {
                        let mut writer = Writer::new(layout, settings, leases, progress);
                        writer.mirror = mirror;
                        let result = writer.run(&rx);
                        if result.is_err() {
                            cancel.store(true, Ordering::Relaxed);
                        }
                        drop(rx);
                        result.map(|()| writer.summary)
                    })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(BuildError::Config("a writer thread panicked".into()))),
                Err(e) => {
                    cancel.store(true, Ordering::Relaxed);
                    Err(BuildError::Config(format!(
                        "cannot start a writer thread: {e}"
                    )))
                }
            })
            .collect()
    });
    let mut write_result = Ok(BuildSummary::default());
    for w in written {
        match (&mut write_result, w) {
            (Ok(total), Ok(s)) => total.absorb(s),
            (Ok(_), Err(e)) => write_result = Err(e),
            (Err(_), _) => {}
        }
    }
    let _ = worker.join();
    let reader_result = reader
        .join()
        .map_err(|_| BuildError::Config("the reader thread panicked".into()));
    {
        let (thread, done) = heartbeat;
        *done.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        done.1.notify_all();
        let _ = thread.join();
    }
    // Parts left unfinished (an error) are free for the next worker at once.
    leases.release_all();
    let mut summary = write_result?;
    let totals = reader_result??;
    let (parts_total, parts_skipped) = (totals.total, totals.skipped);
    progress.finish_and_clear();

    if config.parts_total != Some(parts_total) {
        if let Some(before) = config.parts_total {
            tracing::warn!("the source now splits into {parts_total} parts, it split into {before} before: did it change?");
        }
        config.parts_total = Some(parts_total);
        layout.write_config(&config)?;
        if let Some(m) = &mirror {
            m.push("dataset.json")?;
        }
    }

    summary.parts_skipped = parts_skipped;
    summary.parts_leased_elsewhere = totals.leased_elsewhere;
    summary.parts_retried = totals.retried;
    summary.kept = totals.kept;
    summary.parts_total = parts_total;
    summary.workers = workers;
    summary.writers = writers;
    summary.shard_index = opts.shard_index;
    summary.num_shards = opts.num_shards;
    summary.shard_from = opts.shard_from.clone();
    summary.complete = match &mirror {
        Some(m) => m.complete(parts_total)?,
        None => {
            let present = layout.finished_parts()?;
            let complete = present.len() as u32 == parts_total
                && present.iter().enumerate().all(|(i, &p)| p == i as u32);
            if complete {
                layout.consolidate()?;
            }
            complete
        }
    };
    summary.seconds = started.elapsed().as_secs_f64();
    let run = write_run_summary(&layout, &summary)?;
    if let Some(m) = &mirror {
        m.push(&format!("runs/{run}"))?;
    }
    Ok(summary)
}

/// What the reader found: parts in the source, parts skipped as done, parts another live
/// worker holds, parts redone by `--retry-failed`.
struct ReaderTotals {
    total: u32,
    skipped: u32,
    leased_elsewhere: u32,
    retried: u32,
    kept: u64,
}

/// A part this worker owns, before it is opened: how to plan its inputs.
struct Candidate {
    part: u32,
    video: bool,
    plan: Box<dyn FnOnce() -> Result<source::PartPlan, BuildError>>,
}

/// A part whose inputs are being fed.
struct OpenPart {
    part: u32,
    video: bool,
    items: Box<dyn Iterator<Item = Item> + Send>,
    earlier: Option<Earlier>,
    /// Inputs fed so far (the next input's index).
    count: u32,
}

enum Opened {
    Part(OpenPart),
    Skipped,
    Stop,
}

/// The reader thread: plans the sources into parts and feeds the items of the parts this worker
/// owns, holds the lease of and has not finished (or, with `--retry-failed`, finished with
/// failed rows).
struct Reader {
    sources: Vec<(SourceSpec, bool)>,
    /// The frozen plan of `dataset plan`, when the output has one.
    plan: Option<codeclm_formats::plan::Plan>,
    part_size: usize,
    shard_index: u32,
    num_shards: u32,
    retry_failed: bool,
    max_input_bytes: u64,
    finished: HashSet<u32>,
    layout: DatasetLayout,
    leases: Arc<Leases>,
    budget: Arc<Budget>,
    cancel: Arc<AtomicBool>,
    work_tx: crossbeam_channel::Sender<Job>,
    /// One channel per writer.
    res_txs: Vec<crossbeam_channel::Sender<Msg>>,
}

/// An earlier build's rows of a part being retried, grouped by input, in input order, with its
/// shards open (reads stay valid while the part's new shards replace the files).
struct Earlier {
    inputs: std::collections::VecDeque<(String, Vec<SampleRow>)>,
    shards: std::collections::HashMap<String, CodecShard>,
}

impl Reader {
    fn run(self) -> Result<ReaderTotals, BuildError> {
        let mut t = ReaderTotals {
            total: 0,
            skipped: 0,
            leased_elsewhere: 0,
            retried: 0,
            kept: 0,
        };
        let owns = |part: u32| part % self.num_shards == self.shard_index;
        // Parts of the source counted so far (unplanned: the lazy plan is walked to its end).
        let counted = std::cell::Cell::new(0u32);
        let candidates: Box<dyn Iterator<Item = Result<Candidate, BuildError>> + '_> =
            if let Some(frozen) = &self.plan {
                // A frozen plan: only this worker's parts are read from it; each part's
                // inputs are checked against the source before it is built.
                counted.set(frozen.header.parts);
                let parts = frozen.parts(&owns)?;
                Box::new(parts.map(|next| {
                    let (part, rows) = next?;
                    let video = rows.first().is_some_and(|r| r.video);
                    let spec = self.spec_of(video)?.clone();
                    Ok(Candidate {
                        part,
                        video,
                        plan: Box::new(move || Ok(source::PartPlan::from_plan_rows(&spec, rows)?)),
                    })
                }))
            } else {
                let plans = self
                    .sources
                    .iter()
                    .map(|(spec, video)| {
                        Ok(source::plan(spec, self.part_size)?.map(move |p| (p, *video)))
                    })
                    .collect::<Result<Vec<_>, source::SourceError>>()?;
                let counted = &counted;
                Box::new(plans.into_iter().flatten().enumerate().filter_map(
                    move |(part, (plan, video))| {
                        let part = part as u32;
                        counted.set(part + 1);
                        match plan {
                            Err(e) => Some(Err(e.into())),
                            Ok(plan) if owns(part) => Some(Ok(Candidate {
                                part,
                                video,
                                plan: Box::new(move || Ok(plan)),
                            })),
                            Ok(_) => None,
                        }
                    },
                ))
            };
        let fed = self.feed_parts(candidates, &mut t);
        t.total = counted.get();
        fed.map(|()| t)
    }

    /// The source of the parts with this video flag (a frozen plan names them by it).
    fn spec_of(&self, video: bool) -> Result<&SourceSpec, BuildError> {
        self.sources
            .iter()
            .find(|(_, v)| *v == video)
            .map(|(s, _)| s)
            .ok_or_else(|| {
                BuildError::Config(format!(
                    "the plan in {} lists {} parts but the build has no such source; plan again",
                    self.layout.root.display(),
                    if video { "video" } else { "image" }
                ))
            })
    }

    /// Feeds the items of the parts to build, one part open per writer: items are taken from
    /// the open parts in turn, so each writer gets its part's results while the others get
    /// theirs. With one writer, parts go one after another.
    fn feed_parts(
        &self,
        mut candidates: Box<dyn Iterator<Item = Result<Candidate, BuildError>> + '_>,
        t: &mut ReaderTotals,
    ) -> Result<(), BuildError> {
        let mut slots: Vec<Option<OpenPart>> = (0..self.res_txs.len()).map(|_| None).collect();
        let mut exhausted = false;
        loop {
            for slot in slots.iter_mut().filter(|s| s.is_none()) {
                while !exhausted {
                    let Some(candidate) = candidates.next() else {
                        exhausted = true;
                        break;
                    };
                    match self.open_part(candidate?, t)? {
                        Opened::Part(open) => {
                            *slot = Some(open);
                            break;
                        }
                        Opened::Skipped => {}
                        Opened::Stop => return Ok(()),
                    }
                }
            }
            if slots.iter().all(Option::is_none) {
                return Ok(());
            }
            for (writer, slot) in slots.iter_mut().enumerate() {
                let Some(open) = slot else { continue };
                match open.items.next() {
                    Some(item) => {
                        if self.feed_item(writer, open, item, t).is_break() {
                            return Ok(());
                        }
                    }
                    None => {
                        let end = Msg::PartEnd {
                            part: open.part,
                            items: open.count,
                        };
                        if self.res_txs[writer].send(end).is_err() {
                            return Ok(());
                        }
                        *slot = None;
                    }
                }
                if self.cancel.load(Ordering::Relaxed) {
                    return Ok(());
                }
            }
        }
    }

    /// Opens a part this worker owns: skipped when finished (or leased elsewhere), else leased,
    /// un-finished for `--retry-failed`, and its inputs opened (`plan` is made only here).
    fn open_part(&self, c: Candidate, t: &mut ReaderTotals) -> Result<Opened, BuildError> {
        let part = c.part;
        let journal = self.layout.retry_journal(part);
        let done = self.finished.contains(&part);
        if done && !self.retry_failed {
            t.skipped += 1;
            return Ok(Opened::Skipped);
        }
        if done
            && !samples::read_parquet(&self.layout.part_manifest(part))?
                .iter()
                .any(|r| !r.is_ok())
        {
            t.skipped += 1;
            return Ok(Opened::Skipped);
        }
        if self.cancel.load(Ordering::Relaxed) {
            return Ok(Opened::Stop);
        }
        match self.leases.try_acquire(part)? {
            Acquired::Ours => {}
            Acquired::HeldBy(lease) => {
                tracing::info!(
                    "part {part} is being built by {}: skipped",
                    lease.describe()
                );
                t.leased_elsewhere += 1;
                return Ok(Opened::Skipped);
            }
        }
        let earlier = if done {
            // Un-finish the part first: from here until its new manifest is written the
            // dataset is incomplete, and the rows wait in the journal.
            if self.layout.finished_parts()?.contains(&part) {
                std::fs::rename(self.layout.part_manifest(part), &journal).map_err(|source| {
                    codeclm_formats::Error::Io {
                        path: journal.clone(),
                        source,
                    }
                })?;
                codeclm_formats::sync_dir(&self.layout.parts_dir())?;
            }
            let samples = self.layout.samples_path();
            if samples.exists() {
                std::fs::remove_file(&samples).map_err(|source| codeclm_formats::Error::Io {
                    path: samples.clone(),
                    source,
                })?;
            }
            t.retried += 1;
            Some(self.earlier(&journal)?)
        } else if journal.exists() {
            // A retry that was interrupted: its journal still holds the rows to keep.
            t.retried += 1;
            Some(self.earlier(&journal)?)
        } else {
            None
        };
        let plan = (c.plan)()?;
        Ok(Opened::Part(OpenPart {
            part,
            video: c.video,
            items: source::open(plan, self.max_input_bytes),
            earlier,
            count: 0,
        }))
    }

    /// Sends one input of an open part on its way: its kept rows straight to its writer
    /// (`--retry-failed`), else to the workers. Breaks when the build is stopping.
    fn feed_item(
        &self,
        writer: usize,
        open: &mut OpenPart,
        item: Item,
        t: &mut ReaderTotals,
    ) -> std::ops::ControlFlow<()> {
        use std::ops::ControlFlow::{Break, Continue};
        let (part, video, index) = (open.part, open.video, open.count);
        open.count += 1;
        if let Some(kept) = open.earlier.as_mut().and_then(|e| e.keep(&item.identity)) {
            t.kept += 1;
            let msg = Msg::Done {
                part,
                index,
                identity: item.identity,
                kind: item.kind,
                video,
                records: vec![None; kept.len()],
                outcomes: kept,
                seconds: 0.0,
            };
            return if self.res_txs[writer].send(msg).is_err() {
                Break(())
            } else {
                Continue(())
            };
        }
        let held = match &item.payload {
            source::Payload::Bytes(b) => self.budget.acquire(b.len() as u64),
            _ => 0,
        };
        let job = Job {
            part,
            index,
            video,
            writer,
            item,
            held,
        };
        if self.work_tx.send(job).is_err() {
            Break(())
        } else {
            Continue(())
        }
    }

    fn earlier(&self, journal: &std::path::Path) -> Result<Earlier, BuildError> {
        let rows = samples::read_parquet(journal)?;
        let mut shards = std::collections::HashMap::new();
        let mut inputs: std::collections::VecDeque<(String, Vec<SampleRow>)> = Default::default();
        for row in rows {
            if let Some(rel) = row.shard.as_ref().filter(|_| row.is_ok()) {
                if !shards.contains_key(rel) {
                    // A shard that cannot be opened (replaced half-way by an interrupted
                    // retry): its inputs are decoded again.
                    if let Ok(s) = CodecShard::open(&self.layout.root.join(rel)) {
                        shards.insert(rel.clone(), s);
                    }
                }
            }
            match inputs.back_mut() {
                Some((source, group)) if *source == row.source => group.push(row),
                _ => inputs.push_back((row.source.clone(), vec![row])),
            }
        }
        Ok(Earlier { inputs, shards })
    }
}

impl Earlier {
    /// The outcomes to keep for this input: its earlier rows, if they all succeeded and their
    /// codec bytes still read back with their checksums. `None`: decode it again.
    fn keep(&mut self, identity: &str) -> Option<Vec<Outcome>> {
        while self.inputs.front().is_some_and(|(s, _)| s != identity) {
            // Inputs the source no longer lists at this position are not reused.
            if !self.inputs.iter().any(|(s, _)| s == identity) {
                return None;
            }
            self.inputs.pop_front();
        }
        let (_, rows) = self.inputs.pop_front()?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            if !row.is_ok() {
                return None;
            }
            let shard = self.shards.get(row.shard.as_ref()?)?;
            let bytes = shard.read(row.record? as usize).ok()?;
            if Some(codeclm_formats::shard::checksum(&bytes)) != row.checksum {
                return None;
            }
            out.push(Outcome::kept(&row, bytes));
        }
        Some(out)
    }
}

/// What every job shares: the settings, the limits and, with process isolation, the pool.
struct JobContext {
    image: ImageConfig,
    crops: Option<RandomCrops>,
    video: VideoConfig,
    item_timeout: Option<Duration>,
    max_input_bytes: u64,
    budget: Arc<Budget>,
    pool: Option<Pool>,
    zstd_level: i32,
}

fn run_job(mut job: Job, ctx: &JobContext) -> Msg {
    let started = Instant::now();
    let identity = std::mem::take(&mut job.item.identity);
    let (kind, video, part, index) = (job.item.kind, job.video, job.part, job.index);
    let outcomes = match prepare(job, &identity, ctx) {
        Err(outcome) => vec![outcome],
        Ok((header, bytes, held)) => {
            let outcomes = match &ctx.pool {
                Some(pool) => pool.run(&header, &bytes),
                None => {
                    let deadline = ctx.item_timeout.map(|t| started + t);
                    let src_bytes = header.src_bytes;
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        process_item(
                            &header,
                            bytes,
                            deadline,
                            &ctx.image,
                            ctx.crops.as_ref(),
                            &ctx.video,
                        )
                    }))
                    .unwrap_or_else(|_| {
                        vec![Outcome::failed(
                            Status::EncodeError,
                            "internal error while processing (a bug: please report it with this file)",
                            src_bytes,
                        )]
                    })
                }
            };
            ctx.budget.release(held);
            outcomes
        }
    };
    // Compression and checksums here, on the worker threads: the one writer only appends
    // (one writer then keeps up with many more workers; docs/performance.md).
    let mut outcomes = outcomes;
    let records = outcomes
        .iter_mut()
        .map(|o| {
            let bytes = o.codec.as_deref().filter(|_| o.status() == Status::Ok)?;
            let record = CompressedRecord::new(bytes, ctx.zstd_level).ok()?;
            o.codec = None;
            Some(record)
        })
        .collect();
    Msg::Done {
        part,
        index,
        identity,
        kind,
        video,
        outcomes,
        records,
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// The input's bytes (or, for a video file, its path) under the size cap and the in-flight
/// budget, or the row saying why there are none. The `u64` is what to release from the budget.
// The error is the input's row itself, moved once per failed input: boxing it buys nothing.
#[allow(clippy::result_large_err)]
fn prepare(
    job: Job,
    identity: &str,
    ctx: &JobContext,
) -> Result<(JobHeader, Vec<u8>, u64), Outcome> {
    let mut item = job.item;
    let cap = ctx.max_input_bytes;
    let too_large = |len: u64| {
        Outcome::failed(
            Status::TooLarge,
            format!("the input is {len} bytes, over --max-input-bytes {cap}: skipped unread (raise the limit to include it)"),
            len,
        )
    };
    let mut header = JobHeader {
        identity: identity.to_string(),
        ext: item.ext.take(),
        video: job.video,
        path: None,
        src_bytes: 0,
        max_bytes: cap,
    };
    let (bytes, held) =
        match std::mem::replace(&mut item.payload, source::Payload::Bytes(Vec::new())) {
            source::Payload::File(p) => {
                let len = match std::fs::metadata(&p) {
                    Ok(m) if m.is_file() => m.len(),
                    Ok(_) => {
                        return Err(Outcome::failed(
                            Status::ReadError,
                            format!(
                                "cannot read {}: not a regular file (a directory, a symlink loop?)",
                                p.display()
                            ),
                            0,
                        ))
                    }
                    Err(e) => {
                        return Err(Outcome::failed(
                            Status::ReadError,
                            format!("cannot read {}: {e}", p.display()),
                            0,
                        ))
                    }
                };
                if len > cap {
                    return Err(too_large(len));
                }
                header.src_bytes = len;
                header.path = Some(p);
                // Read where it is decoded (a worker process reads its own files: no copy
                // through the pipe). Videos are demuxed from their path, never read whole.
                (
                    Vec::new(),
                    if job.video {
                        0
                    } else {
                        ctx.budget.acquire(len)
                    },
                )
            }
            source::Payload::Bytes(b) => {
                // The reader acquired these bytes' share of the budget before sending them.
                let len = b.len() as u64;
                if len > cap {
                    ctx.budget.release(job.held);
                    return Err(too_large(len));
                }
                header.src_bytes = len;
                (b, job.held)
            }
            source::Payload::Object(remote) => match remote.get_capped("", cap) {
                // Fetched on the worker, so GETs run as many at once as there are workers.
                Ok(Ok(b)) => {
                    header.src_bytes = b.len() as u64;
                    let held = ctx.budget.acquire(b.len() as u64);
                    (b, held)
                }
                Ok(Err(len)) => return Err(too_large(len)),
                Err(e) => {
                    return Err(Outcome::failed(
                        Status::ReadError,
                        format!("cannot read {e}"),
                        0,
                    ))
                }
            },
            source::Payload::Failed(m) => return Err(Outcome::failed(Status::ReadError, m, 0)),
            source::Payload::Oversized(len) => return Err(too_large(len)),
        };
    Ok((header, bytes, held))
}

/// One input end to end, on a worker thread or in a worker process: decode, resize, encode
/// (one row, or one per crop). `deadline` stops the decoders.
pub(crate) fn process_item(
    header: &JobHeader,
    bytes: Vec<u8>,
    deadline: Option<Instant>,
    image: &ImageConfig,
    crops: Option<&RandomCrops>,
    video: &VideoConfig,
) -> Vec<Outcome> {
    // Test failpoints (inert unless FAILPOINTS arms them): die or hang on a named input.
    if let Some(Some(name)) = fail::eval("etl::abort-on", |arg| arg) {
        if header.identity.ends_with(&name) {
            std::process::abort();
        }
    }
    if let Some(Some(name)) = fail::eval("etl::hang-on", |arg| arg) {
        if header.identity.ends_with(&name) {
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
    let limits = Limits {
        deadline,
        max_frames: Some(max_source_frames(video)),
    };
    let bytes = match (&header.path, header.video) {
        (Some(p), false) => match read_capped(p, header.max_bytes) {
            Ok(b) => b,
            Err(failed) => return vec![failed],
        },
        _ => bytes,
    };
    if header.video {
        let src = match &header.path {
            Some(p) => codeclm_codec::h264::encode::Source::Path(p),
            None => codeclm_codec::h264::encode::Source::Bytes(&bytes),
        };
        return vec![process_video(src, header.src_bytes, video, &limits)];
    }
    match crops {
        Some(crops) => process_image_crops(
            &bytes,
            header.ext.as_deref(),
            image,
            crops,
            &sample_id(&header.identity),
            &limits,
        ),
        None => vec![process_image_within(
            &bytes,
            header.ext.as_deref(),
            image,
            &limits,
        )],
    }
}

/// A file's bytes, at most `cap` of them (a file that grew past the cap since it was listed is
/// `too_large`, not read whole).
#[allow(clippy::result_large_err)] // the error is the input's row, as in `prepare`
fn read_capped(path: &std::path::Path, cap: u64) -> Result<Vec<u8>, Outcome> {
    use std::io::Read;
    let cannot = |e: std::io::Error| {
        Outcome::failed(
            Status::ReadError,
            format!("cannot read {}: {e}", path.display()),
            0,
        )
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(cap.saturating_add(1)).read_to_end(&mut bytes))
        .map_err(cannot)?;
    if bytes.len() as u64 > cap {
        return Err(Outcome::failed(
            Status::TooLarge,
            format!(
                "{} grew past --max-input-bytes {cap} while the build ran",
                path.display()
            ),
            bytes.len() as u64,
        ));
    }
    Ok(bytes)
}

/// Source frames a video may decode: its kept seconds at up to 1,000 frames per second, plus
/// 1,000 (leading frames before the first timestamp kept). More is a broken or hostile stream.
fn max_source_frames(video: &VideoConfig) -> u64 {
    u64::from(video.duration_ms) + 1000
}

/// Source bytes in flight (read, not yet encoded), bounded: readers wait while the budget is
/// spent. One input larger than the whole budget still runs, alone.
struct Budget {
    limit: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    fn new(limit: u64) -> Budget {
        Budget {
            limit: limit.max(1),
            used: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// Blocks until `bytes` (at most the whole budget) fit; returns what to release.
    fn acquire(&self, bytes: u64) -> u64 {
        let want = bytes.min(self.limit);
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used > 0 && *used + want > self.limit {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += want;
        want
    }

    fn release(&self, held: u64) {
        if held == 0 {
            return;
        }
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(held);
        self.freed.notify_all();
    }
}

/// Checks a resumed dataset's settings against ours, or writes a new dataset.json and tables.
/// `codeclm dataset plan`: lists the parts of `settings`' sources and their inputs once into
/// `out`'s `plan.parquet` and `plan.json` (one part's inputs in memory at a time; a directory is
/// walked in sorted runs, see `walk.rs`), numbered as a build numbers them. `progress` is told
/// each part planned.
pub fn write_plan(
    settings: &BuildSettings,
    out: &Path,
    progress: &dyn Fn(u32, u64),
) -> Result<PlanHeader, BuildError> {
    if settings.source.is_none() && settings.videos.is_none() {
        return Err(BuildError::Config(
            "nothing to plan: give --images SRC, --videos SRC or both".into(),
        ));
    }
    if Plan::open(out)?.is_some() {
        return Err(BuildError::Config(format!(
            "{} already has a plan (plan.json): a plan is frozen; plan into a new directory",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|source| codeclm_formats::Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let mut writer = PlanWriter::create(out)?;
    let mut part = 0u32;
    let mut inputs = 0u64;
    for (spec, video) in settings.sources() {
        for p in source::plan(&spec, settings.part_size)? {
            let rows = p?.to_plan_rows(part, video);
            inputs += rows.len() as u64;
            for r in rows {
                writer.push(r)?;
            }
            part += 1;
            progress(part, inputs);
        }
    }
    Ok(writer.finish(PlanHeader {
        plan_version: codeclm_formats::plan::PLAN_VERSION,
        sources: settings.plan_sources(),
        part_size: settings.part_size,
        parts: part,
        rows: 0,
        inputs,
        hash: String::new(),
        created_by: format!("codeclm {}", env!("CARGO_PKG_VERSION")),
    })?)
}

fn prepare_config(
    layout: &DatasetLayout,
    settings: &BuildSettings,
) -> Result<DatasetConfig, BuildError> {
    let build_json =
        serde_json::to_value(settings).map_err(|e| BuildError::Config(e.to_string()))?;
    let tables = codeclm_codec::jpeg::tables_only(&settings.image.jpeg)
        .map_err(|e| BuildError::Config(e.to_string()))?;
    let mut fresh =
        DatasetConfig::new(build_json, format!("codeclm {}", env!("CARGO_PKG_VERSION")));
    fresh.jpeg_tables = Some(TablesRef {
        file: "jpeg_tables.jpg".into(),
        bytes: tables.len() as u64,
        checksum: format!("{:016x}", shard::checksum(&tables)),
    });
    if layout.config_path().exists() {
        let existing = layout.read_config()?;
        if let Some(diff) = existing.difference(&fresh) {
            return Err(BuildError::Config(format!(
                "{} already holds a dataset built with other settings ({diff}). Rerun with the same arguments to resume it, or choose a new --out",
                layout.root.display()
            )));
        }
        if !layout.jpeg_tables_path().exists() {
            codeclm_formats::write_atomic(&layout.jpeg_tables_path(), &tables)?;
        }
        return Ok(existing);
    }
    codeclm_formats::write_atomic(&layout.jpeg_tables_path(), &tables)?;
    layout.write_config(&fresh)?;
    Ok(fresh)
}

fn progress_bar(enabled: bool) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {pos} inputs  {per_sec}  {elapsed}  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    pb
}

/// Writes `runs/run-<ms>-<shard>.json`; returns its file name.
fn write_run_summary(layout: &DatasetLayout, summary: &BuildSummary) -> Result<String, BuildError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut value = serde_json::to_value(summary).map_err(|e| BuildError::Config(e.to_string()))?;
    if let Some(map) = value.as_object_mut() {
        map.insert("finished_unix".into(), now.as_secs().into());
        map.insert(
            "images_per_second".into(),
            summary.images_per_second().into(),
        );
        map.insert(
            "images_per_second_per_worker".into(),
            (summary.images_per_second() / summary.workers.max(1) as f64).into(),
        );
        map.insert(
            "workers_per_writer".into(),
            summary.workers_per_writer().into(),
        );
    }
    let name = format!("run-{}-{:04}.json", now.as_millis(), summary.shard_index);
    let text =
        serde_json::to_string_pretty(&value).map_err(|e| BuildError::Config(e.to_string()))?;
    codeclm_formats::write_atomic(&layout.runs_dir().join(&name), text.as_bytes())?;
    Ok(name)
}

/// CPU seconds of the calling thread.
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// An input's results waiting for their turn: identity, kind, video, outcomes, their records.
type Pending = (
    String,
    &'static str,
    bool,
    Vec<Outcome>,
    Vec<Option<CompressedRecord>>,
);

/// One part being written: results arrive in any order and are written in input order.
struct PartState {
    rows: Vec<SampleRow>,
    /// Items written so far (the next item index to write).
    written: u32,
    pending: BTreeMap<u32, Pending>,
    expected: Option<u32>,
    shard: Option<CodecShardWriter>,
    shard_seq: u32,
}

struct Writer<'a> {
    layout: DatasetLayout,
    mirror: Option<Arc<crate::mirror::Mirror>>,
    leases: Arc<Leases>,
    settings: &'a BuildSettings,
    parts: BTreeMap<u32, PartState>,
    progress: ProgressBar,
    summary: BuildSummary,
}

impl<'a> Writer<'a> {
    fn new(
        layout: DatasetLayout,
        settings: &'a BuildSettings,
        leases: Arc<Leases>,
        progress: ProgressBar,
    ) -> Self {
        Writer {
            layout,
            mirror: None,
            leases,
            settings,
            parts: BTreeMap::new(),
            progress,
            summary: BuildSummary::default(),
        }
    }

    fn run(&mut self, rx: &Receiver<Msg>) -> Result<(), BuildError> {
        for msg in rx.iter() {
            let part = match msg {
                Msg::Done {
                    part,
                    index,
                    identity,
                    kind,
                    video,
                    outcomes,
                    records,
                    seconds,
                } => {
                    let status = outcomes.first().map(|o| o.status()).unwrap_or(Status::Ok);
                    self.note_time(&identity, seconds, status);
                    self.summary.worker_seconds += seconds;
                    self.state(part)?
                        .pending
                        .insert(index, (identity, kind, video, outcomes, records));
                    part
                }
                Msg::PartEnd { part, items } => {
                    self.state(part)?.expected = Some(items);
                    part
                }
            };
            let t = thread_cpu_seconds();
            self.drain(part)?;
            self.summary.writer_seconds += thread_cpu_seconds() - t;
        }
        if let Some((&part, state)) = self.parts.iter().next() {
            return Err(BuildError::Config(format!(
                "part {part} ended with {} of {:?} items written: results were lost (a worker died?)",
                state.written,
                state.expected
            )));
        }
        Ok(())
    }

    /// Keeps the slowest inputs seen, slowest first.
    fn note_time(&mut self, source: &str, seconds: f64, status: Status) {
        let slowest = &mut self.summary.slowest;
        if slowest.len() == SLOWEST && slowest.last().is_some_and(|s| s.seconds >= seconds) {
            return;
        }
        let at = slowest.partition_point(|s| s.seconds >= seconds);
        slowest.insert(
            at,
            SlowInput {
                source: source.to_string(),
                seconds,
                status: status.as_str().to_string(),
            },
        );
        slowest.truncate(SLOWEST);
    }

    fn state(&mut self, part: u32) -> Result<&mut PartState, BuildError> {
        if !self.parts.contains_key(&part) {
            // Shards and temp files of an unfinished part from an interrupted run (or, with
            // --retry-failed, the part's earlier shards, which the reader holds open) are
            // rewritten from scratch. This worker holds the part's lease.
            self.layout.clear_unfinished_part(part)?;
            self.parts.insert(
                part,
                PartState {
                    rows: Vec::new(),
                    written: 0,
                    pending: BTreeMap::new(),
                    expected: None,
                    shard: None,
                    shard_seq: 0,
                },
            );
        }
        Ok(self.parts.get_mut(&part).expect("inserted above"))
    }

    /// Writes every result that is next in input order, and closes the part when it is complete.
    fn drain(&mut self, part: u32) -> Result<(), BuildError> {
        let layout = self.layout.clone();
        let settings = self.settings;
        let state = self.parts.get_mut(&part).expect("state exists");
        while let Some((identity, kind, video, outcomes, records)) =
            state.pending.remove(&state.written)
        {
            let source_id = sample_id(&identity);
            for (outcome, record) in outcomes.into_iter().zip(records) {
                let row = write_one(
                    &layout, settings, part, state, &source_id, &identity, kind, video, outcome,
                    record,
                )?;
                self.summary.samples += 1;
                *self
                    .summary
                    .by_status
                    .entry(row.status.as_str().to_string())
                    .or_default() += 1;
                if row.is_ok() {
                    self.summary.ok += 1;
                    self.summary.codec_bytes += row.codec_bytes.unwrap_or(0);
                } else {
                    self.summary.failed += 1;
                    tracing::debug!(
                        "{}: {} ({})",
                        row.source,
                        row.status.as_str(),
                        row.error.as_deref().unwrap_or("")
                    );
                }
                state.rows.push(row);
            }
            state.written += 1;
            self.summary.processed += 1;
            self.progress.inc(1);
        }
        if state.expected == Some(state.written) {
            let mut state = self.parts.remove(&part).expect("state exists");
            if let Some(shard) = state.shard.take() {
                shard.finish()?;
            }
            // Still ours? Then the manifest, last: the part is done.
            self.leases.confirm(part)?;
            fail::fail_point!("etl::before-manifest", |_| Err(BuildError::Config(
                "failpoint etl::before-manifest: stopped between the shards and the manifest"
                    .into()
            )));
            samples::write_parquet(&state.rows, &layout.part_manifest(part))?;
            let journal = layout.retry_journal(part);
            if journal.exists() {
                std::fs::remove_file(&journal).map_err(|source| codeclm_formats::Error::Io {
                    path: journal.clone(),
                    source,
                })?;
            }
            self.leases.release(part)?;
            if let Some(m) = &self.mirror {
                m.push_part(part)?;
            }
            self.summary.parts_built += 1;
            self.progress.set_message(format!(
                "{} ok, {} failed, {} parts",
                self.summary.ok, self.summary.failed, self.summary.parts_built
            ));
        }
        Ok(())
    }
}

// One row: the writer state plus what the worker sent; a struct would only rename these.
#[allow(clippy::too_many_arguments)]
fn write_one(
    layout: &DatasetLayout,
    settings: &BuildSettings,
    part: u32,
    state: &mut PartState,
    source_id: &str,
    identity: &str,
    kind: &'static str,
    video: bool,
    outcome: Outcome,
    record: Option<CompressedRecord>,
) -> Result<SampleRow, BuildError> {
    let codec = if video { Codec::H264 } else { Codec::Jpeg };
    let id = match outcome.crop {
        Some(c) => crop_sample_id(source_id, c.index),
        None => source_id.to_string(),
    };
    let mut row = SampleRow {
        sample_id: id,
        source: identity.to_string(),
        source_kind: kind.to_string(),
        modality: if video {
            Modality::Video
        } else {
            Modality::Image
        },
        split: split_of(source_id, settings.val_fraction),
        part,
        src_format: outcome.src_format.map(str::to_string),
        src_width: outcome.src_width,
        src_height: outcome.src_height,
        src_bytes: outcome.src_bytes,
        exif_orientation: outcome.exif_orientation,
        decode_scale: outcome.decode_scale,
        width: outcome.width,
        height: outcome.height,
        crop: outcome.crop,
        src_codec: outcome.src_codec.clone(),
        src_duration: outcome.src_duration,
        src_fps: outcome.src_fps,
        frames: outcome.frames,
        nal_units: outcome.nal_units,
        codec: None,
        codec_bytes: None,
        shard: None,
        record: None,
        offset: None,
        checksum: None,
        status: outcome.status(),
        error: outcome.error.clone(),
    };
    let record = match (row.status, record, outcome.codec.as_deref()) {
        (Status::Ok, Some(r), _) => Some(r),
        (Status::Ok, None, Some(bytes)) => Some(CompressedRecord::new(bytes, settings.zstd_level)?),
        _ => None,
    };
    if let Some(record) = record {
        let roll = state.shard.as_ref().is_some_and(|s| {
            !s.is_empty() && s.raw_bytes() + record.raw_len() > settings.shard_max_bytes
        });
        if roll {
            if let Some(full) = state.shard.take() {
                full.finish()?;
            }
            state.shard_seq += 1;
        }
        if state.shard.is_none() {
            let rel = DatasetLayout::shard_rel(part, codec, state.shard_seq);
            state.shard = Some(CodecShardWriter::create(
                &layout.root.join(rel),
                codec,
                settings.zstd_level,
            )?);
        }
        let shard = state.shard.as_mut().expect("opened above");
        let loc = shard.append_compressed(&record)?;
        row.codec = Some(codec.name().into());
        row.codec_bytes = Some(record.raw_len());
        row.shard = Some(DatasetLayout::shard_rel(part, codec, state.shard_seq));
        row.record = Some(loc.record);
        row.offset = Some(loc.offset);
        row.checksum = Some(record.checksum());
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-flight budget: a reader waits while the bytes held would pass it, and one input
    /// larger than the whole budget still goes through, alone.
    #[test]
    fn the_inflight_budget_blocks_until_bytes_are_released() {
        let budget = Arc::new(Budget::new(100));
        let a = budget.acquire(60);
        let b = budget.acquire(40);
        assert_eq!((a, b), (60, 40));
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let budget = budget.clone();
            std::thread::spawn(move || tx.send(budget.acquire(30)).unwrap())
        };
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "acquired past the budget"
        );
        budget.release(a);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 30);
        waiter.join().unwrap();
        budget.release(b);
        budget.release(30);
        // Larger than the whole budget: capped to it, granted once nothing else is held.
        assert_eq!(budget.acquire(1_000), 100);
    }

    /// A manifest must never survive a crash that lost its shard: every part's shard is
    /// renamed and its directory synced before the part's manifest is renamed and the parts
    /// directory synced (the failpoints sit right after each directory sync).
    #[test]
    fn every_shard_is_durable_before_the_manifest_that_points_at_it() {
        let scenario = fail::FailScenario::setup();
        let events = Arc::new(Mutex::new(Vec::new()));
        for (point, tag) in [
            ("formats::shard-committed", "shard"),
            ("formats::manifest-committed", "manifest"),
        ] {
            let e = events.clone();
            fail::cfg_callback(point, move || e.lock().unwrap().push(tag)).unwrap();
        }
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let photos =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/images");
        for name in ["horse.png", "clock_motion.png", "rocket.jpg", "camera.png"] {
            std::fs::copy(photos.join(name), src.join(name)).unwrap();
        }
        let image = ImageConfig {
            size: 32,
            ..ImageConfig::default()
        };
        let mut settings = BuildSettings::new(SourceSpec::detect(&src).unwrap(), image);
        settings.part_size = 2;
        let summary = build(&BuildOptions::new(tmp.path().join("ds"), settings)).unwrap();
        assert!(summary.complete);
        // Two parts, each a shard then its manifest; then samples.parquet.
        assert_eq!(
            *events.lock().unwrap(),
            ["shard", "manifest", "shard", "manifest", "manifest"]
        );
        scenario.teardown();
    }
}
