//! The trainer: AdamW (decoupled weight decay, own implementation so its moments are
//! checkpointed), linear warmup then cosine decay, global-norm gradient clipping, gradient
//! accumulation; one log line per step, validation in nats/token and bits per codec byte,
//! `metrics.jsonl`, `loss.png`, and exact resume (weights, optimizer, loader position).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::checkpoint::{self, CheckpointFiles};
use crate::data::{Loader, LoaderState, TrainingSet};
use crate::llama::{init_params, Llama, LlamaConfig};
use crate::{Error, Result};
use codeclm_formats::Split;

/// Every setting of a run (saved in `trainer_state.json`; a resume reuses it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub preset: String,
    /// Tokens per training window (at most the preset's max_position_embeddings).
    pub context: usize,
    /// Windows per micro-batch.
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

/// AdamW with decoupled weight decay (Loshchilov & Hutter; PyTorch's `AdamW`), applied to
/// matrices only (norm weights are not decayed). Moments are f32 tensors beside each parameter.
pub struct AdamW {
    pub step: u64,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(vars: &[(String, Var)]) -> Result<AdamW> {
        let zeros = |v: &Var| v.zeros_like();
        Ok(AdamW {
            step: 0,
            m: vars
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<candle_core::Result<_>>()?,
            v: vars
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// One update with gradients `grads` (same order as `vars`), already clipped.
    pub fn update(
        &mut self,
        vars: &[(String, Var)],
        grads: &[Tensor],
        cfg: &TrainConfig,
        lr: f64,
    ) -> Result<()> {
        self.step += 1;
        let (b1, b2) = (cfg.beta1, cfg.beta2);
        let c1 = 1.0 - b1.powi(self.step as i32);
        let c2 = 1.0 - b2.powi(self.step as i32);
        for (i, ((_, var), g)) in vars.iter().zip(grads).enumerate() {
            let m = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((&v / c2)?.sqrt()? + cfg.eps)?;
            let upd = ((&m / c1)? / denom)?;
            let p = var.as_detached_tensor();
            let decay = if p.rank() >= 2 {
                1.0 - lr * cfg.weight_decay
            } else {
                1.0
            };
            let next = ((&p * decay)? - (upd * lr)?)?;
            var.set(&next)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    fn tensors(&self, vars: &[(String, Var)]) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, (n, _)) in vars.iter().enumerate() {
            out.push((format!("exp_avg.{n}"), self.m[i].clone()));
            out.push((format!("exp_avg_sq.{n}"), self.v[i].clone()));
        }
        out
    }

    fn load(vars: &[(String, Var)], path: &Path, step: u64, device: &Device) -> Result<AdamW> {
        let data = std::fs::read(path).map_err(Error::io(path))?;
        let t = candle_core::safetensors::load_buffer(&data, device)?;
        let get = |k: String| {
            t.get(&k).cloned().ok_or_else(|| Error::Checkpoint {
                path: path.to_path_buf(),
                problem: format!("no tensor {k}"),
                fix: "the optimizer state belongs to another model; start a new run".into(),
            })
        };
        let mut opt = AdamW {
            step,
            m: Vec::new(),
            v: Vec::new(),
        };
        for (n, _) in vars {
            opt.m.push(get(format!("exp_avg.{n}"))?);
            opt.v.push(get(format!("exp_avg_sq.{n}"))?);
        }
        Ok(opt)
    }
}

/// What `trainer_state.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub config: TrainConfig,
    pub model: LlamaConfig,
    pub loader: LoaderState,
    pub vocab_hash: String,
    pub dataset: PathBuf,
    pub tokens_seen: u64,
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

/// Validation result over every held-out document.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Eval {
    pub nats_per_token: f64,
    pub bits_per_byte: f64,
    pub tokens: u64,
    pub codec_bytes: u64,
}

/// Scores the validation subset (`TrainingSet::val_subset`): total nats over each document's tokens after BOS (windows of
/// at most context + 1 tokens), per token and per codec byte (bits).
pub fn evaluate(model: &Llama, set: &TrainingSet, context: usize, batch: usize) -> Result<Eval> {
    let dev = model.device().clone();
    let mut windows: Vec<Vec<u32>> = Vec::new();
    let mut codec_bytes = 0u64;
    for val in set.val_subset(crate::data::DEFAULT_VAL_DOCS)? {
        codec_bytes += val.codec_bytes;
        let doc: Vec<u32> = val.tokens.iter().map(|&t| t as u32).collect();
        let mut start = 0;
        while start + 1 < doc.len() {
            let end = (start + context + 1).min(doc.len());
            windows.push(doc[start..end].to_vec());
            start = end - 1;
        }
    }
    if windows.is_empty() || codec_bytes == 0 {
        return Err(Error::Data(format!(
            "token set {} has no validation documents (split \"val\"). Fix: build the dataset with --val-fraction > 0",
            set.hash
        )));
    }
    let (mut nats, mut tokens) = (0f64, 0u64);
    windows.sort_by_key(|w| std::cmp::Reverse(w.len()));
    for group in windows.chunk_by(|a, b| a.len() == b.len()) {
        for chunk in group.chunks(batch.max(1)) {
            let t = chunk[0].len() - 1;
            let x: Vec<u32> = chunk.iter().flat_map(|w| w[..t].iter().copied()).collect();
            let y: Vec<u32> = chunk.iter().flat_map(|w| w[1..].iter().copied()).collect();
            let x = Tensor::from_vec(x, (chunk.len(), t), &dev)?;
            let y = Tensor::from_vec(y, (chunk.len(), t), &dev)?;
            let loss = model.loss(&x, &y)?.to_scalar::<f32>()? as f64;
            nats += loss * (chunk.len() * t) as f64;
            tokens += (chunk.len() * t) as u64;
        }
    }
    Ok(Eval {
        nats_per_token: nats / tokens as f64,
        bits_per_byte: nats / std::f64::consts::LN_2 / codec_bytes as f64,
        tokens,
        codec_bytes,
    })
}

/// Forward + backward of one optimizer step (gradient accumulation over `micro`), clipping,
/// AdamW. Returns (mean loss, gradient norm before clipping).
pub fn train_step(
    model: &Llama,
    vars: &[(String, Var)],
    opt: &mut AdamW,
    micro: &[(Tensor, Tensor)],
    cfg: &TrainConfig,
    lr: f64,
) -> Result<(f64, f64)> {
    let k = micro.len() as f64;
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    let mut loss_sum = 0.0;
    for (x, y) in micro {
        let loss = model.loss(x, y)?;
        loss_sum += loss.to_scalar::<f32>()? as f64;
        let scaled = if micro.len() > 1 { (loss / k)? } else { loss };
        let mut store = scaled.backward()?;
        for (i, (_, var)) in vars.iter().enumerate() {
            if let Some(g) = store.remove(var.as_tensor()) {
                grads[i] = Some(match grads[i].take() {
                    Some(acc) => (acc + g)?,
                    None => g,
                });
            }
        }
    }
    let grads: Vec<Tensor> = grads
        .into_iter()
        .zip(vars)
        .map(|(g, (_, v))| g.map(Ok).unwrap_or_else(|| v.zeros_like()))
        .collect::<candle_core::Result<_>>()?;
    let mut sq = 0f64;
    for g in &grads {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    let loss = loss_sum / k;
    if !loss.is_finite() || !norm.is_finite() {
        return Err(Error::NonFinite {
            step: opt.step + 1,
            loss: loss as f32,
        });
    }
    let grads = if cfg.grad_clip > 0.0 && norm > cfg.grad_clip {
        let s = cfg.grad_clip / (norm + 1e-6);
        grads
            .iter()
            .map(|g| g * s)
            .collect::<candle_core::Result<Vec<_>>>()?
    } else {
        grads
    };
    opt.update(vars, &grads, cfg, lr)?;
    Ok((loss, norm))
}

fn batch_tensors(
    x: Vec<u32>,
    y: Vec<u32>,
    b: usize,
    t: usize,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    Ok((
        Tensor::from_vec(x, (b, t), dev)?,
        Tensor::from_vec(y, (b, t), dev)?,
    ))
}

fn save(
    out: &Path,
    model_cfg: &LlamaConfig,
    vars: &[(String, Var)],
    opt: &AdamW,
    state: &TrainerState,
) -> Result<()> {
    let weights: Vec<(String, Tensor)> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_detached_tensor()))
        .collect();
    let step = state.step.to_string();
    let files = CheckpointFiles {
        files: vec![
            (
                checkpoint::CONFIG,
                checkpoint::config_json(model_cfg, "float32")?,
            ),
            (
                checkpoint::WEIGHTS,
                checkpoint::serialize_tensors(&weights, &[("step", step.clone())])?,
            ),
            (
                checkpoint::OPTIMIZER,
                checkpoint::serialize_tensors(&opt.tensors(vars), &[("step", step)])?,
            ),
            (
                checkpoint::STATE,
                serde_json::to_vec_pretty(state).map_err(|e| Error::Config(e.to_string()))?,
            ),
        ],
    };
    checkpoint::commit(out, &files)
}

/// Trains (or resumes) a run in `out`; prints one line per step and returns the summary.
pub fn train(start: Start, out: &Path, device: &Device) -> Result<TrainSummary> {
    checkpoint::recover(out)?;
    let (mut set, cfg, model_cfg, vars, mut opt, loader_state, mut tokens_seen) = match start {
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
            let vars = init_params(&model_cfg, config.seed, device)?;
            let opt = AdamW::new(&vars)?;
            (set, config, model_cfg, vars, opt, None, 0)
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
            let (wcfg, tensors) = checkpoint::read_weights(out, device)?;
            let shapes = wcfg.parameter_shapes();
            let vars = shapes
                .iter()
                .map(|(n, _)| {
                    let t = tensors.get(n).ok_or_else(|| Error::Checkpoint {
                        path: out.join(checkpoint::WEIGHTS),
                        problem: format!("missing tensor {n}"),
                        fix: "the checkpoint is damaged; start a new run".into(),
                    })?;
                    Ok((n.clone(), Var::from_tensor(&t.to_dtype(DType::F32)?)?))
                })
                .collect::<Result<Vec<_>>>()?;
            let opt = AdamW::load(&vars, &out.join(checkpoint::OPTIMIZER), st.step, device)?;
            let mut cfg = st.config.clone();
            if let Some(s) = steps {
                cfg.steps = s;
            }
            cfg.stop_at = stop_at;
            (
                set,
                cfg,
                st.model.clone(),
                vars,
                opt,
                Some(st.loader),
                st.tokens_seen,
            )
        }
    };
    set.load_shards()?;
    std::fs::create_dir_all(out).map_err(Error::io(out))?;
    let mut model = Llama::from_vars(model_cfg.clone(), &vars, device)?;
    let on_cuda = device.is_cuda();
    if on_cuda && cfg.bf16 {
        model.set_compute_dtype(DType::BF16);
    }
    // Evaluation through detached views of the same storage: no autograd graph is built.
    let detached: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_detached_tensor()))
        .collect();
    let mut eval_model = Llama::from_tensors(model_cfg.clone(), &detached, device)?;
    if on_cuda && cfg.bf16 {
        eval_model.set_compute_dtype(DType::BF16);
    }
    let mut loader = Loader::new(&set, cfg.context, cfg.seed, &cfg.mix)?;
    if let Some(s) = loader_state {
        loader.state = s;
    }
    let unigram = crate::data::unigram_baseline_bits_per_byte(&set, crate::data::DEFAULT_VAL_DOCS)?;
    let metrics_path = out.join("metrics.jsonl");
    let mut history = truncate_metrics(&metrics_path, opt.step)?;
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(Error::io(&metrics_path))?;
    let start_step = opt.step;
    let end = cfg.stop_at.map(|s| s.min(cfg.steps)).unwrap_or(cfg.steps);
    info!(
        "training {} ({} parameters, vocabulary {} = {}) on {} docs of {}; steps {start_step}..{end} of {}, {} x {} x {} tokens per step, byte-unigram baseline {unigram:.4} bits/byte (fitted on train bytes, add-one smoothing, on held-out bytes)",
        cfg.preset,
        model_cfg.num_parameters(),
        set.vocab.size,
        set.hash,
        set.split(Split::Train, None).len(),
        set.root.display(),
        cfg.steps,
        cfg.grad_accum,
        cfg.batch,
        cfg.context
    );
    let flops_per_token = model_cfg.train_flops_per_token(cfg.context);
    let t0 = Instant::now();
    let (mut last_loss, mut last_eval) = (f64::NAN, None::<Eval>);
    let tokens_per_step = (cfg.batch * cfg.context * cfg.grad_accum) as u64;
    let mut run_tokens = 0u64;
    let write_line = |f: &mut std::fs::File, v: serde_json::Value| -> Result<()> {
        writeln!(f, "{v}").map_err(Error::io(&metrics_path))
    };
    for step in start_step..end {
        let ts = Instant::now();
        let micro: Vec<(Tensor, Tensor)> = (0..cfg.grad_accum)
            .map(|_| {
                let (x, y) = loader.next_batch(&set, cfg.batch)?;
                batch_tensors(x, y, cfg.batch, cfg.context, device)
            })
            .collect::<Result<_>>()?;
        let lr = cfg.lr_at(step);
        let (loss, norm) = train_step(&model, &vars, &mut opt, &micro, &cfg, lr)?;
        let dt = ts.elapsed().as_secs_f64();
        tokens_seen += tokens_per_step;
        run_tokens += tokens_per_step;
        last_loss = loss;
        let tps = tokens_per_step as f64 / dt;
        let mfu = on_cuda.then(|| flops_per_token * tps / (cfg.peak_tflops * 1e12));
        let mfu_text = mfu
            .map(|m| format!(" mfu {:.1}%", m * 100.0))
            .unwrap_or_default();
        info!("step {:>6}/{} loss {loss:.4} lr {lr:.3e} grad_norm {norm:.3} tokens/s {tps:.0}{mfu_text}", step + 1, cfg.steps);
        write_line(
            &mut metrics,
            serde_json::json!({"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_second": tps, "tokens": tokens_seen, "mfu": mfu}),
        )?;
        history.0.push((step + 1, loss));
        let done = step + 1 == end;
        if done || (cfg.eval_every > 0 && (step + 1) % cfg.eval_every == 0) {
            let e = evaluate(&eval_model, &set, cfg.context, cfg.batch)?;
            info!(
                "eval step {}: val {:.4} nats/token, {:.4} bits per codec byte (byte-unigram {unigram:.4})",
                step + 1,
                e.nats_per_token,
                e.bits_per_byte
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
                dataset: std::fs::canonicalize(&set.root).unwrap_or(set.root.clone()),
                tokens_seen,
            };
            save(out, &model_cfg, &vars, &opt, &state)?;
        }
    }
    let eval = match last_eval {
        Some(e) => e,
        None => evaluate(&eval_model, &set, cfg.context, cfg.batch)?,
    };
    let png = out.join("loss.png");
    let ((x0, x1), (y0, y1)) = crate::plot::loss_curve(&png, &history.0, &history.1)?;
    let secs = t0.elapsed().as_secs_f64();
    info!(
        "wrote {} (steps {x0}..{x1}, loss {y0:.3}..{y1:.3}; blue train, red validation nats/token)",
        png.display()
    );
    Ok(TrainSummary {
        steps: opt.step,
        final_train_loss: last_loss,
        val_nats_per_token: eval.nats_per_token,
        val_bits_per_byte: eval.bits_per_byte,
        unigram_bits_per_byte: unigram,
        tokens_per_second: run_tokens as f64 / secs.max(1e-9),
        seconds: secs,
    })
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

/// Training throughput of `preset` on a fixed pseudo-random batch (forward + backward +
/// AdamW), after one untimed step: (tokens per wall second, tokens per CPU second). What
/// `codeclm bench train` prints.
pub fn bench_train(
    preset: &str,
    vocab_size: usize,
    batch: usize,
    context: usize,
    steps: usize,
    fused: bool,
    device: &Device,
) -> Result<(f64, f64)> {
    let model_cfg = LlamaConfig::preset(preset, vocab_size)?;
    let mut cfg = TrainConfig::preset(preset)?;
    cfg.context = context;
    cfg.batch = batch;
    cfg.validate(&model_cfg)?;
    let vars = init_params(&model_cfg, 0, device)?;
    let mut model = Llama::from_vars(model_cfg, &vars, device)?;
    model.set_fused(fused);
    let mut opt = AdamW::new(&vars)?;
    let mut rng = crate::rng::Rng::new(1);
    let data: Vec<u32> = (0..batch * (context + 1))
        .map(|_| rng.below(vocab_size) as u32)
        .collect();
    let mut x = Vec::new();
    let mut y = Vec::new();
    for r in 0..batch {
        let w = &data[r * (context + 1)..(r + 1) * (context + 1)];
        x.extend_from_slice(&w[..context]);
        y.extend_from_slice(&w[1..]);
    }
    let micro = vec![batch_tensors(x, y, batch, context, device)?];
    train_step(&model, &vars, &mut opt, &micro, &cfg, 1e-4)?;
    let (t, cpu) = (Instant::now(), process_cpu_seconds());
    for _ in 0..steps {
        train_step(&model, &vars, &mut opt, &micro, &cfg, 1e-4)?;
    }
    let tokens = (steps * batch * context) as f64;
    let cpu = process_cpu_seconds() - cpu;
    Ok((
        tokens / t.elapsed().as_secs_f64(),
        if cpu > 0.0 { tokens / cpu } else { f64::NAN },
    ))
}
