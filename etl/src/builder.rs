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
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use codeclm_formats::dataset::{DatasetConfig, DatasetLayout, TablesRef};
use codeclm_formats::samples::{self, Modality, SampleRow, Split, Status};
use codeclm_formats::shard::{self, Codec, CodecShardWriter};
use crossbeam_channel::{bounded, Receiver};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::iter::{ParallelBridge, ParallelIterator};
use serde::{Deserialize, Serialize};

use crate::config::ImageConfig;
use crate::crop::RandomCrops;
use crate::process::{process_image, process_image_crops, process_video, Outcome};
use crate::source::{self, Item, SourceSpec};
use codeclm_codec::h264::VideoConfig;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Format(#[from] codeclm_formats::Error),
    #[error(transparent)]
    Source(#[from] source::SourceError),
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
        }
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
}

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
    /// True when every part of the source is present and `samples.parquet` was written.
    pub complete: bool,
}

impl BuildSummary {
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
    item: Item,
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
    },
    PartEnd {
        part: u32,
        items: u32,
    },
}

/// Builds (or resumes) the dataset in `opts.out`.
pub fn build(opts: &BuildOptions) -> Result<BuildSummary, BuildError> {
    let started = Instant::now();
    let settings = &opts.settings;
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
    let (shard_index, num_shards) = (opts.shard_index, opts.num_shards);
    let swept = layout.sweep_temp_files(&|part| part % num_shards == shard_index)?;
    if swept > 0 {
        tracing::info!("removed {swept} temp files left by an interrupted run");
    }
    let mut config = prepare_config(&layout, settings)?;

    let finished: HashSet<u32> = layout.finished_parts()?.into_iter().collect();
    let workers = opts.workers.max(1);
    let cancel = Arc::new(AtomicBool::new(false));
    let (work_tx, work_rx) = bounded::<Job>(workers * 4);
    let (res_tx, res_rx) = bounded::<Msg>(workers * 8);

    let reader = {
        let sources: Vec<(SourceSpec, bool)> = [
            settings.source.clone().map(|s| (s, false)),
            settings.videos.clone().map(|s| (s, true)),
        ]
        .into_iter()
        .flatten()
        .collect();
        let part_size = settings.part_size;
        let (shard_index, num_shards) = (opts.shard_index, opts.num_shards);
        let res_tx = res_tx.clone();
        let cancel = cancel.clone();
        let finished = finished.clone();
        std::thread::Builder::new()
            .name("codeclm-reader".into())
            .spawn(move || -> Result<(u32, u32), source::SourceError> {
                let mut total = 0u32;
                let mut skipped = 0u32;
                let plans = sources
                    .iter()
                    .map(|(spec, video)| {
                        Ok(source::plan(spec, part_size)?.map(move |p| (p, *video)))
                    })
                    .collect::<Result<Vec<_>, source::SourceError>>()?;
                for (part, (plan, video)) in plans.into_iter().flatten().enumerate() {
                    let plan = plan?;
                    let part = part as u32;
                    total += 1;
                    if part % num_shards != shard_index {
                        continue;
                    }
                    if finished.contains(&part) {
                        skipped += 1;
                        continue;
                    }
                    if cancel.load(Ordering::Relaxed) {
                        break;
                    }
                    let mut items = 0u32;
                    for item in source::open(plan) {
                        if work_tx
                            .send(Job {
                                part,
                                index: items,
                                video,
                                item,
                            })
                            .is_err()
                        {
                            return Ok((total, skipped));
                        }
                        items += 1;
                    }
                    if res_tx.send(Msg::PartEnd { part, items }).is_err() {
                        break;
                    }
                }
                Ok((total, skipped))
            })
            .map_err(|e| BuildError::Config(format!("cannot start the reader thread: {e}")))?
    };

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .thread_name(|i| format!("codeclm-worker-{i}"))
        .build()
        .map_err(|e| BuildError::Config(format!("cannot start {workers} workers: {e}")))?;
    let image_cfg = settings.image;
    let crops = settings.crops;
    let video_cfg = settings.video;
    let worker = std::thread::spawn(move || {
        pool.install(|| {
            work_rx
                .into_iter()
                .par_bridge()
                .for_each_with(res_tx, |tx, job| {
                    let _ = tx.send(run_job(job, &image_cfg, crops.as_ref(), &video_cfg));
                })
        })
    });

    let progress = progress_bar(opts.progress);
    let mut writer = Writer::new(layout.clone(), settings, progress.clone());
    let write_result = writer.run(&res_rx);
    if write_result.is_err() {
        cancel.store(true, Ordering::Relaxed);
        drop(res_rx); // unblocks the workers and the reader
    }
    let _ = worker.join();
    let reader_result = reader
        .join()
        .map_err(|_| BuildError::Config("the reader thread panicked".into()))?;
    write_result?;
    let (parts_total, parts_skipped) = reader_result?;
    progress.finish_and_clear();

    if config.parts_total != Some(parts_total) {
        if let Some(before) = config.parts_total {
            tracing::warn!("the source now splits into {parts_total} parts, it split into {before} before: did it change?");
        }
        config.parts_total = Some(parts_total);
        layout.write_config(&config)?;
    }

    let mut summary = writer.summary;
    summary.parts_skipped = parts_skipped;
    summary.parts_total = parts_total;
    summary.workers = workers;
    summary.shard_index = opts.shard_index;
    summary.num_shards = opts.num_shards;
    let present = layout.finished_parts()?;
    summary.complete = present.len() as u32 == parts_total
        && present.iter().enumerate().all(|(i, &p)| p == i as u32);
    if summary.complete {
        layout.consolidate()?;
    }
    summary.seconds = started.elapsed().as_secs_f64();
    write_run_summary(&layout, &summary)?;
    Ok(summary)
}

fn run_job(
    mut job: Job,
    cfg: &ImageConfig,
    crops: Option<&RandomCrops>,
    video_cfg: &VideoConfig,
) -> Msg {
    let identity = std::mem::take(&mut job.item.identity);
    let kind = job.item.kind;
    let ext = job.item.ext.take();
    let internal = "internal error while processing (a bug: please report it with this file)";
    if job.video {
        // Files are demuxed from their path (a long video is not read whole); other sources
        // hand the bytes.
        let outcome = match &job.item.payload {
            source::Payload::File(p) if p.is_file() => {
                let len = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
                std::panic::catch_unwind(|| {
                    process_video(
                        codeclm_codec::h264::encode::Source::Path(p),
                        len,
                        video_cfg,
                        &Default::default(),
                    )
                })
                .unwrap_or_else(|_| Outcome::failed(Status::EncodeError, internal, len))
            }
            _ => match job.item.bytes() {
                Ok(bytes) => std::panic::catch_unwind(|| {
                    process_video(
                        codeclm_codec::h264::encode::Source::Bytes(&bytes),
                        bytes.len() as u64,
                        video_cfg,
                        &Default::default(),
                    )
                })
                .unwrap_or_else(|_| {
                    Outcome::failed(Status::EncodeError, internal, bytes.len() as u64)
                }),
                Err(message) => Outcome::failed(Status::ReadError, message, 0),
            },
        };
        return Msg::Done {
            part: job.part,
            index: job.index,
            identity,
            kind,
            video: true,
            outcomes: vec![outcome],
        };
    }
    let outcomes = match job.item.bytes() {
        Ok(bytes) => std::panic::catch_unwind(|| match crops {
            Some(crops) => process_image_crops(
                &bytes,
                ext.as_deref(),
                cfg,
                crops,
                &sample_id(&identity),
                &Default::default(),
            ),
            None => vec![process_image(&bytes, ext.as_deref(), cfg)],
        })
        .unwrap_or_else(|_| {
            vec![Outcome::failed(
                Status::EncodeError,
                internal,
                bytes.len() as u64,
            )]
        }),
        Err(message) => vec![Outcome::failed(Status::ReadError, message, 0)],
    };
    Msg::Done {
        part: job.part,
        index: job.index,
        identity,
        kind,
        video: false,
        outcomes,
    }
}

/// Checks a resumed dataset's settings against ours, or writes a new dataset.json and tables.
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

fn write_run_summary(layout: &DatasetLayout, summary: &BuildSummary) -> Result<(), BuildError> {
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
    }
    let path = layout.runs_dir().join(format!(
        "run-{}-{:04}.json",
        now.as_millis(),
        summary.shard_index
    ));
    let text =
        serde_json::to_string_pretty(&value).map_err(|e| BuildError::Config(e.to_string()))?;
    codeclm_formats::write_atomic(&path, text.as_bytes())?;
    Ok(())
}

/// One part being written: results arrive in any order and are written in input order.
struct PartState {
    rows: Vec<SampleRow>,
    /// Items written so far (the next item index to write).
    written: u32,
    pending: BTreeMap<u32, (String, &'static str, bool, Vec<Outcome>)>,
    expected: Option<u32>,
    shard: Option<CodecShardWriter>,
    shard_seq: u32,
}

struct Writer<'a> {
    layout: DatasetLayout,
    settings: &'a BuildSettings,
    parts: BTreeMap<u32, PartState>,
    progress: ProgressBar,
    summary: BuildSummary,
}

impl<'a> Writer<'a> {
    fn new(layout: DatasetLayout, settings: &'a BuildSettings, progress: ProgressBar) -> Self {
        Writer {
            layout,
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
                } => {
                    self.state(part)?
                        .pending
                        .insert(index, (identity, kind, video, outcomes));
                    part
                }
                Msg::PartEnd { part, items } => {
                    self.state(part)?.expected = Some(items);
                    part
                }
            };
            self.drain(part)?;
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

    fn state(&mut self, part: u32) -> Result<&mut PartState, BuildError> {
        if !self.parts.contains_key(&part) {
            // Shards of an unfinished part from an interrupted run are rewritten from scratch.
            for stale in self.layout.shards_of_part(part)? {
                std::fs::remove_file(&stale).map_err(|source| codeclm_formats::Error::Io {
                    path: stale.clone(),
                    source,
                })?;
            }
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
        while let Some((identity, kind, video, outcomes)) = state.pending.remove(&state.written) {
            let source_id = sample_id(&identity);
            for outcome in outcomes {
                let row = write_one(
                    &layout, settings, part, state, &source_id, &identity, kind, video, outcome,
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
            samples::write_parquet(&state.rows, &layout.part_manifest(part))?;
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
    if let (Status::Ok, Some(bytes)) = (row.status, outcome.codec.as_deref()) {
        let roll = state.shard.as_ref().is_some_and(|s| {
            !s.is_empty() && s.raw_bytes() + bytes.len() as u64 > settings.shard_max_bytes
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
        let loc = shard.append(bytes)?;
        row.codec = Some(codec.name().into());
        row.codec_bytes = Some(bytes.len() as u64);
        row.shard = Some(DatasetLayout::shard_rel(part, codec, state.shard_seq));
        row.record = Some(loc.record);
        row.offset = Some(loc.offset);
        row.checksum = Some(shard::checksum(bytes));
    }
    Ok(row)
}
