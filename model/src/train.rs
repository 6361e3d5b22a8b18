//! The trainer over the engine ([`crate::engine`]): AdamW (decoupled weight decay on matrices,
//! PyTorch's arithmetic), linear warmup then cosine decay, global-norm gradient clipping,
//! gradient accumulation; one log line per step, validation in nats/token and bits per codec
//! byte, `metrics.jsonl`, `loss.png`, and exact resume (weights, optimizer, loader position):
//! N steps equal N/2 steps, a resume and N/2 steps, bit for bit.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tracing::info;

use crate::checkpoint::{self, CheckpointFiles};
use crate::data::{Loader, LoaderState, TrainingSet};
use crate::dist::Dist;
use crate::engine::{self, Backend, Capacity, Cpu, Device, Model, IGNORE};
use crate::llama::LlamaConfig;
use crate::{Error, Result};
use codeclm_formats::Split;

/// Every setting of a run (saved in `trainer_state.json`; a resume reuses it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub preset: String,
    /// Tokens per training window (at most the preset's max_position_embeddings).
    pub context: usize,
    /// Windows per micro-batch and rank (the global batch is world x batch x grad_accum).
    pub batch: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// The cosine decays to lr * min_lr_ratio.
    pub min_lr_ratio: f64,
    pub warmup_steps: u64,
    pub steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip (0 disables).
    pub grad_clip: f64,
    pub seed: u64,
    /// Validate every this many steps (and at the end); 0: only at the end.
    pub eval_every: u64,
    /// Save a checkpoint every this many steps (and at the end); 0: only at the end.
    pub save_every: u64,
    /// Modality -> weight (`image`, `video`); empty: the natural mix of the training tokens.
    pub mix: BTreeMap<String, f64>,
    /// bf16 matmuls (CUDA only; f32 master weights and optimizer state).
    pub bf16: bool,
    /// Peak accelerator TFLOP/s for the MFU estimate (H100/H200 bf16 dense: 989).
    pub peak_tflops: f64,
    /// Stop (with a checkpoint) after this step without finishing the schedule; resume later.
    #[serde(default)]
    pub stop_at: Option<u64>,
    /// Keep only each layer's input for the backward and recompute the rest (less memory for
    /// long contexts, about one more forward per step).
    #[serde(default)]
    pub recompute: bool,
    /// Validation scores at most this many held-out documents, each in full (a fixed subset,
    /// chosen by sample id); the byte-unigram baseline is evaluated on the same documents.
    #[serde(default = "default_val_docs")]
    pub val_docs: usize,
    /// ZeRO-1: with several ranks, each keeps the AdamW moments of its slice of the parameters
    /// only, updates that slice, and the slices are all-gathered (the same weights).
    #[serde(default)]
    pub zero1: bool,
}

fn default_val_docs() -> usize {
    crate::data::DEFAULT_VAL_DOCS
}

impl TrainConfig {
    /// Defaults per preset, sized for this project's machines.
    pub fn preset(preset: &str) -> Result<TrainConfig> {
        let (context, batch, lr, steps) = match preset {
            "tiny" => (256, 8, 2e-3, 160),
            "small" => (512, 8, 1e-3, 2000),
            "base" => (2048, 16, 6e-4, 20_000),
            "paper-7b" => (12_288, 1, 3e-4, 100_000),
            other => {
                return Err(Error::Config(format!(
                    "unknown preset {other:?}; pick one of {}",
                    crate::PRESETS.join(", ")
                )))
            }
        };
        Ok(TrainConfig {
            preset: preset.into(),
            context,
            batch,
            grad_accum: 1,
            lr,
            min_lr_ratio: 0.1,
            warmup_steps: (steps / 20).max(1),
            steps,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            seed: 0,
            eval_every: (steps / 5).max(1),
            save_every: (steps / 5).max(1),
            mix: BTreeMap::new(),
            bf16: true,
            peak_tflops: 989.0,
            stop_at: None,
            recompute: false,
            val_docs: default_val_docs(),
            zero1: false,
        })
    }

    /// Overlays the keys of a TOML file (same names as the fields) on `self`.
    pub fn merge_toml(&self, path: &Path) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
        let table: toml::Table = text
            .parse()
            .map_err(|e| Error::Config(format!("{} is not valid TOML: {e}", path.display())))?;
        let mut v = serde_json::to_value(self).map_err(|e| Error::Config(e.to_string()))?;
        let overlay = serde_json::to_value(&table).map_err(|e| Error::Config(e.to_string()))?;
        if let (Some(o), Some(n)) = (v.as_object_mut(), overlay.as_object()) {
            for (k, val) in n {
                o.insert(k.clone(), val.clone());
            }
        }
        serde_json::from_value(v).map_err(|e| {
            Error::Config(format!(
                "{}: {e} (keys are the fields of `codeclm train`'s config: context, batch, grad_accum, lr, steps, ...)",
                path.display()
            ))
        })
    }

    /// The learning rate at `step` (0-based): linear warmup, then cosine to lr * min_lr_ratio.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let min = self.lr * self.min_lr_ratio;
        min + 0.5 * (self.lr - min) * (1.0 + (std::f64::consts::PI * t).cos())
    }

    pub fn validate(&self, model: &LlamaConfig) -> Result<()> {
        if self.context > model.max_position_embeddings {
            return Err(Error::Config(format!(
                "context {} is longer than the {} preset allows ({} positions); use --context {} or less, or a larger preset",
                self.context, self.preset, model.max_position_embeddings, model.max_position_embeddings
            )));
        }
        if self.context < 2 || self.batch == 0 || self.grad_accum == 0 || self.steps == 0 {
            return Err(Error::Config(
                "context must be at least 2 and batch, grad_accum and steps at least 1".into(),
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::Config(format!(
                "--lr {} must be a positive number",
                self.lr
            )));
        }
        Ok(())
    }
}

/// What `trainer_state.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub config: TrainConfig,
    pub model: LlamaConfig,
    pub loader: LoaderState,
    /// The token set's identity (its vocabulary's hash)...
    pub vocab_hash: String,
    /// ...and the content hash of its manifest (`codeclm_formats::tokens::ManifestHash`): the
    /// loader's saved position indexes these documents, so a resume on a changed token set
    /// stops. `None` in states written before it was recorded (resumed with a warning).
    #[serde(default)]
    pub token_manifest_hash: Option<String>,
    pub dataset: PathBuf,
    pub tokens_seen: u64,
    /// Ranks the run had when this state was saved (`config.batch` is per rank): a resume on
    /// another number keeps the global batch.
    #[serde(default = "one")]
    pub world: usize,
}

fn one() -> usize {
    1
}

impl TrainerState {
    /// Reads `run/trainer_state.json`: the one reader of it (resume, sampling, evaluation).
    pub fn read(run: &Path) -> Result<TrainerState> {
        let sp = run.join(checkpoint::STATE);
        let bytes = std::fs::read(&sp).map_err(|e| Error::Checkpoint {
            path: sp.clone(),
            problem: format!("no training state ({e})"),
            fix: format!(
                "name a run directory written by `codeclm train --out` ({} is not one)",
                run.display()
            ),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Checkpoint {
            path: sp.clone(),
            problem: format!("unreadable training state: {e}"),
            fix: "the file was written by another version; start a new run".into(),
        })
    }
}

/// The outcome of a run.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    pub steps: u64,
    pub final_train_loss: f64,
    pub val_nats_per_token: f64,
    pub val_bits_per_byte: f64,
    pub unigram_bits_per_byte: f64,
    pub tokens_per_second: f64,
    pub seconds: f64,
}

/// Where a run starts from.
pub enum Start {
    New {
        dataset: PathBuf,
        vocab: Option<String>,
        config: TrainConfig,
    },
    Resume {
        steps: Option<u64>,
        stop_at: Option<u64>,
        dataset: Option<PathBuf>,
    },
}

/// Validation result over the held-out documents.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Eval {
    pub nats_per_token: f64,
    pub bits_per_byte: f64,
    pub tokens: u64,
    pub codec_bytes: u64,
}

/// Scores whole documents (each `BOS .. EOS`): the total nats of every token after BOS, in
/// windows of at most context + 1 tokens that overlap by one, packed into batches of the
/// model's capacity with unscored padding; per token and per codec byte (bits).
pub fn evaluate<B: Backend>(
    model: &mut Model<B>,
    docs: &[Vec<u16>],
    codec_bytes: u64,
) -> Result<Eval> {
    let Capacity { batch, context } = model.cap;
    let mut windows: Vec<&[u16]> = Vec::new();
    for doc in docs {
        let mut start = 0;
        while start + 1 < doc.len() {
            let end = (start + context + 1).min(doc.len());
            windows.push(&doc[start..end]);
            start = end - 1;
        }
    }
    if windows.is_empty() || codec_bytes == 0 {
        return Err(Error::Data(
            "there are no validation documents (split \"val\"). Fix: build the dataset with --val-fraction > 0".into(),
        ));
    }
    // Longest first, so a batch's positions are mostly real tokens.
    windows.sort_by_key(|w| std::cmp::Reverse(w.len()));
    let (mut x, mut y) = (vec![0u32; batch * context], vec![IGNORE; batch * context]);
    let (mut nats, mut tokens) = (0f64, 0u64);
    for chunk in windows.chunks(batch) {
        let t = chunk[0].len() - 1;
        let (x, y) = (&mut x[..chunk.len() * t], &mut y[..chunk.len() * t]);
        x.fill(0);
        y.fill(IGNORE);
        for (r, w) in chunk.iter().enumerate() {
            for (i, pair) in w.windows(2).enumerate() {
                x[r * t + i] = pair[0] as u32;
                y[r * t + i] = pair[1] as u32;
            }
            tokens += (w.len() - 1) as u64;
        }
        nats += model
            .forward(x, Some(y), chunk.len(), t, None)?
            .unwrap_or(0.0);
    }
    Ok(Eval {
        nats_per_token: nats / tokens as f64,
        bits_per_byte: nats / std::f64::consts::LN_2 / codec_bytes as f64,
        tokens,
        codec_bytes,
    })
}

/// The fixed validation subset (`TrainingSet::val_subset`: at most `max_docs` held-out
/// documents, chosen by sample id so that the subset is stable) and its codec bytes.
fn validation_docs(set: &TrainingSet, max_docs: usize) -> Result<(Vec<Vec<u16>>, u64)> {
    let subset = set.val_subset(max_docs)?;
    let bytes = subset.iter().map(|d| d.codec_bytes).sum();
    Ok((subset.into_iter().map(|d| d.tokens).collect(), bytes))
}

/// One optimizer step: gradient accumulation over `micro` batches of [B, T] inputs and
/// targets, the gradients averaged over the ranks, global-norm clipping, AdamW (on this rank's
/// slice and all-gathered under ZeRO-1). Returns (mean loss over the ranks, gradient norm
/// before clipping).
pub fn train_step<B: Backend>(
    model: &mut Model<B>,
    micro: &[(&[u32], &[u32])],
    cfg: &TrainConfig,
    step: u64,
    lr: f64,
    dist: &Dist,
) -> Result<(f64, f64)> {
    let Capacity { batch, context } = model.cap;
    let k = micro.len();
    let per = (batch * context) as f64;
    model.zero_grad()?;
    let mut loss = 0.0;
    for (x, y) in micro {
        let scale = (1.0 / (per * k as f64)) as f32;
        let sum = model.forward(x, Some(y), batch, context, Some(scale))?;
        loss += sum.unwrap_or(0.0) / per;
        model.backward()?;
    }
    let mut loss = loss / k as f64;
    if dist.world > 1 || dist.has_nccl() {
        // On the device when the backend has a communicator (NCCL), else through host buckets
        // and MPI.
        if !model.all_average_grads()? {
            dist.with_scratch(|host, send| {
                let mut r = Ok(());
                model.map_grads(host, |_, g| {
                    if r.is_ok() {
                        r = dist.average_in(g, send);
                    }
                })?;
                r
            })?;
        }
        let mut l = [loss];
        dist.all_reduce_f64(&mut l)?;
        loss = l[0] / dist.world as f64;
    }
    let norm = model.grad_norm()?;
    if !loss.is_finite() || !norm.is_finite() {
        return Err(Error::NonFinite {
            step,
            loss: loss as f32,
        });
    }
    let clip = cfg.grad_clip;
    let grad_scale = if clip > 0.0 && norm > clip {
        (clip / (norm + 1e-6)) as f32
    } else {
        1.0
    };
    model.adamw(engine::backend::AdamW {
        lr: lr as f32,
        beta1: cfg.beta1 as f32,
        beta2: cfg.beta2 as f32,
        eps: cfg.eps as f32,
        weight_decay: cfg.weight_decay as f32,
        step,
        grad_scale,
    })?;
    model.backend.status()?;
    let n = model.num_parameters();
    if model.optimizer_range().len() < n {
        // ZeRO-1: every rank's updated slice to every rank: on the device through the
        // backend's communicator, else a bucket at a time through the host.
        for r in 0..dist.world {
            let shard = dist.shard(n, r);
            if model.broadcast_params(r, shard.clone()) {
                continue;
            }
            dist.with_scratch(|host, _| {
                let mut off = shard.start;
                while off < shard.end {
                    let len = host.len().min(shard.end - off);
                    let buf = &mut host[..len];
                    if r == dist.rank {
                        model.read_params_range(off..off + len, buf);
                    }
                    dist.broadcast_from(r, buf)?;
                    if r != dist.rank {
                        model.write_params_range(off..off + len, buf);
                    }
                    off += len;
                }
                Ok::<_, Error>(())
            })?;
        }
        model.backend.status()?;
    }
    Ok((loss, norm))
}

/// Named views of a flat buffer, for safetensors.
fn named<'a, B: Backend>(
    model: &'a Model<B>,
    flat: &'a [f32],
) -> Vec<(&'a str, &'a [usize], &'a [f32])> {
    model
        .layout
        .tensors
        .iter()
        .map(|(n, s, sp)| (n.as_str(), s.as_slice(), &flat[sp.off..sp.end()]))
        .collect()
}

/// Writes a checkpoint from rank 0 (every rank calls it: ZeRO-1 gathers the moments there).
fn save<B: Backend>(out: &Path, model: &Model<B>, state: &TrainerState, dist: &Dist) -> Result<()> {
    let n = model.num_parameters();
    let own = model.optimizer_range().len();
    let (mut p, mut g) = (vec![0f32; n], vec![0f32; n]);
    let (mut m, mut v) = (vec![0f32; own], vec![0f32; own]);
    model.read_params(&mut p);
    model.read_state(&mut g, &mut m, &mut v)?;
    if own < n {
        let (mut m_all, mut v_all) = (vec![0f32; n], vec![0f32; n]);
        dist.gather_shards(&m, &mut m_all)?;
        dist.gather_shards(&v, &mut v_all)?;
        (m, v) = (m_all, v_all);
    }
    if !dist.is_root() {
        return Ok(());
    }
    let step = state.step.to_string();
    let moments: Vec<(String, &[usize], &[f32])> = model
        .layout
        .tensors
        .iter()
        .flat_map(|(name, shape, sp)| {
            [
                (
                    format!("exp_avg.{name}"),
                    shape.as_slice(),
                    &m[sp.off..sp.end()],
                ),
                (
                    format!("exp_avg_sq.{name}"),
                    shape.as_slice(),
                    &v[sp.off..sp.end()],
                ),
            ]
        })
        .collect();
    let moments: Vec<(&str, &[usize], &[f32])> = moments
        .iter()
        .map(|(n, s, d)| (n.as_str(), *s, *d))
        .collect();
    let files = CheckpointFiles {
        files: vec![
            (
                checkpoint::CONFIG,
                checkpoint::config_json(&model.config, "float32")?,
            ),
            (
                checkpoint::WEIGHTS,
                checkpoint::serialize_f32(&named(model, &p), &[("step", step.clone())])?,
            ),
            (
                checkpoint::OPTIMIZER,
                checkpoint::serialize_f32(&moments, &[("step", step)])?,
            ),
            (
                checkpoint::STATE,
                serde_json::to_vec_pretty(state).map_err(|e| Error::Config(e.to_string()))?,
            ),
        ],
    };
    checkpoint::commit(out, &files)
}

/// Loads a run's weights and AdamW moments into `model`.
fn restore<B: Backend>(out: &Path, model: &mut Model<B>) -> Result<()> {
    let flat = checkpoint::load_params(out, &model.config)?;
    model.write_params(&flat);
    let path = out.join(checkpoint::OPTIMIZER);
    let t = checkpoint::read_f32(&path)?;
    let m = checkpoint::flat_from(&t, &model.config, &path, "exp_avg.")?;
    let v = checkpoint::flat_from(&t, &model.config, &path, "exp_avg_sq.")?;
    model.write_moments(&m, &v)
}

/// Trains (or resumes) a run in `out` on `device`; prints one line per step and returns the
/// summary.
pub fn train(start: Start, out: &Path, dist: &Dist, device: Device) -> Result<TrainSummary> {
    match device {
        Device::Cpu if dist.needs_cuda() => Err(dist.cpu_error()),
        Device::Cpu => train_on(Cpu::new(), start, out, dist),
        Device::Cuda(n) => train_on(cuda_for(dist, n)?, start, out, dist),
    }
}

/// The CUDA backend of this rank (its local device), with the run's NCCL communicator attached
/// when the gradients go through NCCL: the id is exchanged first (it needs libnccl, not the
/// device), then the device is opened and the communicator made.
pub fn cuda_for(dist: &Dist, asked: usize) -> Result<engine::Cuda> {
    let id = if dist.wants_nccl() {
        Some(dist.nccl_id()?)
    } else {
        None
    };
    let cuda = engine::Cuda::new(dist.cuda_ordinal(asked)?)?;
    if let Some(id) = id {
        dist.bind_cuda(&cuda, &id)?;
    }
    Ok(cuda)
}

fn train_on<B: Backend>(backend: B, start: Start, out: &Path, dist: &Dist) -> Result<TrainSummary> {
    if dist.is_root() {
        checkpoint::recover(out)?;
    }
    dist.barrier()?;
    let (set, cfg, model_cfg, resume) = match start {
        Start::New {
            dataset,
            vocab,
            config,
        } => {
            if out.join(checkpoint::STATE).exists() {
                return Err(Error::Checkpoint {
                    path: out.to_path_buf(),
                    problem: "already holds a training run".into(),
                    fix: format!(
                        "continue it with `codeclm train --resume {}`, or pick another --out",
                        out.display()
                    ),
                });
            }
            let set = TrainingSet::open(&dataset, vocab.as_deref())?;
            let mut model_cfg = LlamaConfig::preset(&config.preset, set.vocab.size as usize)?;
            model_cfg.bos_token_id = Some(set.vocab.bos);
            model_cfg.eos_token_id = Some(set.vocab.eos);
            model_cfg.pad_token_id = pad_id(&set);
            config.validate(&model_cfg)?;
            (set, config, model_cfg, None)
        }
        Start::Resume {
            steps,
            stop_at,
            dataset,
        } => {
            let st = TrainerState::read(out)?;
            let root = dataset.unwrap_or(st.dataset.clone());
            let set = TrainingSet::open(&root, Some(&st.vocab_hash)).map_err(|e| {
                Error::Data(format!(
                    "resuming {}: {e} (the run was trained on token set {} of {})",
                    out.display(),
                    st.vocab_hash,
                    st.dataset.display()
                ))
            })?;
            if set.hash != st.vocab_hash {
                return Err(Error::Data(format!(
                    "resuming {}: the run was trained on vocabulary {}, the dataset offers {}; pass --dataset with the original token set",
                    out.display(), st.vocab_hash, set.hash
                )));
            }
            check_token_manifest(out, &st, &set)?;
            let mut cfg = st.config.clone();
            if let Some(s) = steps {
                cfg.steps = s;
            }
            // The same global batch on any number of ranks: the loader's saved position is
            // global, so the run sees the batches it would have seen.
            let global = cfg.batch * st.world;
            if global % dist.world != 0 {
                return Err(Error::Config(format!(
                    "resuming {}: its global batch is {global} windows ({} ranks x batch {}), which {} ranks cannot share evenly; resume on a number of ranks that divides {global}",
                    out.display(), st.world, cfg.batch, dist.world
                )));
            }
            cfg.batch = global / dist.world;
            cfg.stop_at = stop_at;
            (set, cfg, st.model.clone(), Some(st))
        }
    };
    set.check_shards()?;
    if dist.is_root() {
        std::fs::create_dir_all(out).map_err(Error::io(out))?;
    }
    let cap = Capacity {
        batch: cfg.batch,
        context: cfg.context,
    };
    backend.set_bf16(cfg.bf16)?;
    let mut model = Model::new(backend, model_cfg.clone(), cap, true, cfg.recompute)?;
    if cfg.zero1 && dist.world > 1 {
        model.set_optimizer_range(dist.shard(model.num_parameters(), dist.rank))?;
    }
    let (start_step, mut tokens_seen) = match &resume {
        None => {
            model.init(cfg.seed);
            (0, 0)
        }
        Some(st) => {
            restore(out, &mut model)?;
            (st.step, st.tokens_seen)
        }
    };
    let mut loader = Loader::new(&set, cfg.context, cfg.seed, &cfg.mix)?;
    if let Some(st) = resume {
        loader.state = st.loader;
    }
    loader.set_share(codeclm_loader::Share::rank(
        dist.rank, dist.world, cfg.batch,
    )?)?;
    let unigram = crate::data::unigram_baseline_bits_per_byte(&set, cfg.val_docs)?;
    let (val_docs, val_bytes) = validation_docs(&set, cfg.val_docs)?;
    // Rank 0 keeps the metrics, validates, plots and checkpoints; every rank trains.
    let root = dist.is_root();
    let metrics_path = out.join("metrics.jsonl");
    let mut history = if root {
        truncate_metrics(&metrics_path, start_step)?
    } else {
        History::default()
    };
    let mut metrics = match root {
        true => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .map_err(Error::io(&metrics_path))?,
        ),
        false => None,
    };
    let end = cfg.stop_at.map(|s| s.min(cfg.steps)).unwrap_or(cfg.steps);
    let world = dist.world;
    if root {
        info!(
        "training {} ({} parameters, vocabulary {} = {}) on {} docs of {} with {}; {}; steps {start_step}..{end} of {}, {world} x {} x {} x {} tokens per step, byte-unigram baseline {unigram:.4} bits/byte (fitted on train bytes, add-one smoothing, on held-out bytes)",
        cfg.preset,
        model_cfg.num_parameters(),
        set.vocab.size,
        set.hash,
        set.split(Split::Train, None).len(),
        set.root.display(),
        model.backend.name(),
        dist.describe(),
        cfg.steps,
        cfg.grad_accum,
        cfg.batch,
        cfg.context
    );
    }
    let t0 = Instant::now();
    let (mut last_loss, mut last_eval) = (f64::NAN, None::<Eval>);
    let tokens_per_step = (world * cfg.batch * cfg.context * cfg.grad_accum) as u64;
    let mut run_tokens = 0u64;
    let write_line = |f: &mut Option<std::fs::File>, v: serde_json::Value| -> Result<()> {
        match f {
            Some(f) => writeln!(f, "{v}").map_err(Error::io(&metrics_path)),
            None => Ok(()),
        }
    };
    // The micro-batches' inputs and targets, filled in place every step.
    let n = cfg.batch * cfg.context;
    let (mut xs, mut ys) = (
        vec![0u32; n * cfg.grad_accum],
        vec![0u32; n * cfg.grad_accum],
    );
    for step in start_step..end {
        let ts = Instant::now();
        for (x, y) in xs.chunks_mut(n).zip(ys.chunks_mut(n)) {
            loader.next_batch_into(&set, x, y)?;
        }
        let views: Vec<(&[u32], &[u32])> = xs.chunks(n).zip(ys.chunks(n)).collect();
        let lr = cfg.lr_at(step);
        let (loss, norm) = train_step(&mut model, &views, &cfg, step + 1, lr, dist)?;
        let dt = ts.elapsed().as_secs_f64();
        let comm = dist.take_comm_seconds();
        tokens_seen += tokens_per_step;
        run_tokens += tokens_per_step;
        last_loss = loss;
        let tps = tokens_per_step as f64 / dt;
        if root {
            info!("step {:>6}/{} loss {loss:.4} lr {lr:.3e} grad_norm {norm:.3} {:.0} ms (all-reduce {:.0} ms) tokens/s {tps:.0}", step + 1, cfg.steps, dt * 1e3, comm * 1e3);
        }
        let mut line = serde_json::json!({"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_second": tps, "tokens": tokens_seen});
        if world > 1 {
            line["world"] = world.into();
            line["comm_seconds"] = comm.into();
            line["step_seconds"] = dt.into();
        }
        write_line(&mut metrics, line)?;
        history.0.push((step + 1, loss));
        let done = step + 1 == end;
        if root && (done || (cfg.eval_every > 0 && (step + 1) % cfg.eval_every == 0)) {
            let e = evaluate(&mut model, &val_docs, val_bytes)?;
            info!(
                "eval step {}: val {:.4} nats/token, {:.4} bits per codec byte (byte-unigram {unigram:.4}) over {} documents",
                step + 1,
                e.nats_per_token,
                e.bits_per_byte,
                val_docs.len()
            );
            write_line(
                &mut metrics,
                serde_json::json!({"step": step + 1, "val_nats_per_token": e.nats_per_token, "val_bits_per_byte": e.bits_per_byte, "unigram_bits_per_byte": unigram}),
            )?;
            history.1.push((step + 1, e.nats_per_token));
            last_eval = Some(e);
        }
        if done || (cfg.save_every > 0 && (step + 1) % cfg.save_every == 0) {
            let state = TrainerState {
                step: step + 1,
                config: cfg.clone(),
                model: model_cfg.clone(),
                loader: loader.state.clone(),
                vocab_hash: set.hash.clone(),
                token_manifest_hash: Some(set.manifest_hash.clone()),
                dataset: std::fs::canonicalize(&set.root).unwrap_or(set.root.clone()),
                tokens_seen,
                world,
            };
            save(out, &model, &state, dist)?;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    if !root {
        let nan = f64::NAN;
        return Ok(TrainSummary {
            steps: end.max(start_step),
            final_train_loss: last_loss,
            val_nats_per_token: nan,
            val_bits_per_byte: nan,
            unigram_bits_per_byte: unigram,
            tokens_per_second: run_tokens as f64 / secs.max(1e-9),
            seconds: secs,
        });
    }
    let eval = match last_eval {
        Some(e) => e,
        None => evaluate(&mut model, &val_docs, val_bytes)?,
    };
    let png = out.join("loss.png");
    let ((x0, x1), (y0, y1)) = crate::plot::loss_curve(&png, &history.0, &history.1)?;
    info!(
        "wrote {} (steps {x0}..{x1}, loss {y0:.3}..{y1:.3}; blue train, red validation nats/token)",
        png.display()
    );
    Ok(TrainSummary {
        steps: end.max(start_step),
        final_train_loss: last_loss,
        val_nats_per_token: eval.nats_per_token,
        val_bits_per_byte: eval.bits_per_byte,
        unigram_bits_per_byte: unigram,
        tokens_per_second: run_tokens as f64 / secs.max(1e-9),
        seconds: secs,
    })
}

/// A resumed run must read the documents it started on: its loader position (document row,
/// token, per-epoch orders over the row count) means nothing in another manifest.
fn check_token_manifest(out: &Path, st: &TrainerState, set: &TrainingSet) -> Result<()> {
    let manifest = set.root.join(format!("tokens-{}.parquet", set.hash));
    match &st.token_manifest_hash {
        None => {
            tracing::warn!(
                "resuming {}: its trainer_state.json records no token manifest hash (written by an older codeclm), so a changed token set cannot be detected; {} now hashes {}",
                out.display(),
                manifest.display(),
                set.manifest_hash
            );
            Ok(())
        }
        Some(h) if *h == set.manifest_hash => Ok(()),
        Some(h) => Err(Error::Data(format!(
            "resuming {}: token set {} changed since the run started: its manifest {} hashed {h} then and hashes {} now (retokenized, or its dataset rebuilt), and the saved loader position indexes the old documents. Fix: resume with --dataset DIR naming a copy of the original token set, or start a new run with `codeclm train --out NEW_DIR`",
            out.display(),
            set.hash,
            manifest.display(),
            set.manifest_hash
        ))),
    }
}

fn pad_id(set: &TrainingSet) -> Option<u32> {
    (0..set.vocab.size)
        .find(|&i| set.vocab.is_special(i) && i != set.vocab.bos && i != set.vocab.eos)
}

type History = (Vec<(u64, f64)>, Vec<(u64, f64)>);

/// Drops metric lines past `step` (a resumed run rewrites them) and returns the loss history.
fn truncate_metrics(path: &Path, step: u64) -> Result<History> {
    let mut hist: History = (Vec::new(), Vec::new());
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(hist);
    };
    let mut kept = String::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let s = v["step"].as_u64().unwrap_or(u64::MAX);
        if s > step {
            continue;
        }
        if let Some(l) = v["loss"].as_f64() {
            hist.0.push((s, l));
        }
        if let Some(l) = v["val_nats_per_token"].as_f64() {
            hist.1.push((s, l));
        }
        kept.push_str(line);
        kept.push('\n');
    }
    codeclm_formats::write_atomic(path, kept.as_bytes())?;
    Ok(hist)
}

/// CPU seconds (user + system) this process has used so far (Linux; 0 elsewhere): lets a
/// benchmark on a loaded machine report tokens per CPU-second next to tokens per wall-second.
pub fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the ")" that ends the command name: state is field 3; utime, stime are 14, 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Training throughput of `preset` on fixed pseudo-random batches (forward + backward + clip +
/// AdamW), after one untimed step; what `codeclm bench train` prints.
#[derive(Clone, Debug, Serialize)]
pub struct BenchTrain {
    pub tokens_per_second: f64,
    pub tokens_per_cpu_second: f64,
    pub seconds_per_step: f64,
    /// Training FLOPs per token (6 N + 12 L T D), times tokens/s.
    pub flops_per_second: f64,
    /// The backend (SIMD level, threads).
    pub backend: String,
    /// With `profile`: per kernel, (name, calls per step, seconds per step), most expensive
    /// first, from the timed steps.
    pub profile: Vec<(String, f64, f64)>,
}

#[allow(clippy::too_many_arguments)]
pub fn bench_train(
    preset: &str,
    vocab_size: usize,
    batch: usize,
    context: usize,
    steps: usize,
    recompute: bool,
    profile: bool,
    device: Device,
    bf16: bool,
) -> Result<BenchTrain> {
    let model_cfg = LlamaConfig::preset(preset, vocab_size)?;
    let mut cfg = TrainConfig::preset(preset)?;
    cfg.bf16 = bf16;
    cfg.context = context;
    cfg.batch = batch;
    cfg.validate(&model_cfg)?;
    let cap = Capacity { batch, context };
    if let Device::Cuda(n) = device {
        let be = engine::Cuda::new(n)?;
        be.enable_bf16(cfg.bf16)?;
        if profile {
            return Err(Error::Config(
                "--profile times CPU kernels; on CUDA, time the steps (kernels run asynchronously)"
                    .into(),
            ));
        }
        let mut model = Model::new(be, model_cfg, cap, true, recompute)?;
        return timed_steps(&mut model, &cfg, steps, |b| {
            let _ = b.status();
        });
    }
    if profile {
        let be = engine::profile::Profiled::new(Cpu::new());
        let mut model = Model::new(be, model_cfg, cap, true, recompute)?;
        let mut r = timed_steps(&mut model, &cfg, steps, |b| b.reset())?;
        let per = steps.max(1) as f64;
        r.profile = model
            .backend
            .report()
            .into_iter()
            .map(|(k, calls, secs)| (k.to_string(), calls as f64 / per, secs / per))
            .collect();
        return Ok(r);
    }
    let mut model = Model::new(Cpu::new(), model_cfg, cap, true, recompute)?;
    timed_steps(&mut model, &cfg, steps, |_| {})
}

fn timed_steps<B: Backend>(
    model: &mut Model<B>,
    cfg: &TrainConfig,
    steps: usize,
    after_warmup: impl FnOnce(&B),
) -> Result<BenchTrain> {
    model.init(0);
    let Capacity { batch, context } = model.cap;
    let vocab_size = model.config.vocab_size;
    let mut rng = crate::rng::Rng::new(1);
    let data: Vec<u32> = (0..batch * (context + 1))
        .map(|_| rng.below(vocab_size) as u32)
        .collect();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for r in 0..batch {
        let w = &data[r * (context + 1)..(r + 1) * (context + 1)];
        x.extend_from_slice(&w[..context]);
        y.extend_from_slice(&w[1..]);
    }
    let micro = [(x.as_slice(), y.as_slice())];
    let one = Dist::single();
    train_step(model, &micro, cfg, 1, 1e-4, &one)?;
    after_warmup(&model.backend);
    let (t, cpu) = (Instant::now(), process_cpu_seconds());
    for s in 0..steps {
        train_step(model, &micro, cfg, 2 + s as u64, 1e-4, &one)?;
    }
    let secs = t.elapsed().as_secs_f64();
    let tokens = (steps * batch * context) as f64;
    let cpu = process_cpu_seconds() - cpu;
    let tps = tokens / secs;
    Ok(BenchTrain {
        tokens_per_second: tps,
        tokens_per_cpu_second: if cpu > 0.0 { tokens / cpu } else { f64::NAN },
        seconds_per_step: secs / steps.max(1) as f64,
        flops_per_second: tps * model.config.train_flops_per_token(context),
        backend: model.backend.name(),
        profile: Vec::new(),
    })
}
