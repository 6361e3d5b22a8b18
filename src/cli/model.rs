//! `codeclm train`, `codeclm model ...` and the model benchmarks: argument parsing and printing
//! around `codeclm_model`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use codeclm_model::train::{self, Start, TrainConfig};
use codeclm_model::{GenerateConfig, LlamaConfig, Lm, MemoryEstimate};

use super::flags::{set_threads, DeviceArg};

#[derive(Args)]
pub struct TrainArgs {
    /// Dataset directory with token shards (`codeclm dataset tokenize`).
    #[arg(long, required_unless_present = "resume")]
    dataset: Option<PathBuf>,
    /// Token set: vocabulary hash, unique hash prefix, or vocabulary json; default: the
    /// dataset's only token set.
    #[arg(long)]
    vocab: Option<String>,
    /// Model size: tiny, small, base, paper-7b.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// TOML file with TrainConfig fields (context, batch, grad_accum, lr, steps, warmup_steps,
    /// weight_decay, grad_clip, seed, eval_every, save_every, mix, ...); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    context: Option<usize>,
    #[arg(long)]
    batch: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    steps: Option<u64>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    eval_every: Option<u64>,
    #[arg(long)]
    save_every: Option<u64>,
    /// Modality weights, e.g. `image=1,video=0.5` (default: the natural mix of training tokens).
    #[arg(long)]
    mix: Option<String>,
    /// Stop with a checkpoint after this step (continue later with --resume).
    #[arg(long)]
    stop_at: Option<u64>,
    /// Recompute each layer's activations in the backward instead of keeping them: less
    /// memory for long contexts, about a third more compute; the same results bit for bit.
    #[arg(long)]
    recompute: bool,
    /// Held-out documents validation scores, each in full (a fixed subset chosen by sample id).
    #[arg(long)]
    val_docs: Option<usize>,
    /// Run directory (checkpoints, metrics.jsonl, loss.png).
    #[arg(long, default_value = "runs/tiny")]
    out: PathBuf,
    /// Continue the run in this directory (its saved config; --steps may extend it).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// cpu, cuda or cuda:N (the engine's CUDA backend: compiled, not yet run on a GPU).
    #[arg(long, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// CPU threads (default: RAYON_NUM_THREADS, or the cores divided among the ranks on
    /// this machine).
    #[arg(long)]
    threads: Option<usize>,
    /// How the ranks are found and talk: `auto` (MPI when mpirun or srun started several
    /// processes, torchrun's RANK/WORLD_SIZE otherwise; CUDA gradients through NCCL), `none`
    /// (one process), `mpi` (MPI even for one rank; CUDA gradients through host memory),
    /// `nccl` (NCCL even for one rank). `--batch` is per rank.
    #[arg(long, default_value = "auto", value_parser = ["auto", "none", "mpi", "nccl"])]
    dist: String,
    /// ZeRO-1: each rank keeps the AdamW moments of its slice of the parameters only.
    #[arg(long)]
    zero1: bool,
    /// Matmuls on CUDA: bf16 inputs with f32 accumulation (cuBLASLt; the preset's default, as
    /// the paper trained) or f32 (cuBLAS, the parity mode); the CPU is f32 either way. Weights,
    /// gradients and AdamW state are f32 in both.
    #[arg(long, value_parser = ["bf16", "f32"])]
    precision: Option<String>,
}

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Logits of a trained model for one token sequence, as safetensors (tensor "logits", f32
    /// [T, V]); used by tools/compat_hf.py to compare with transformers.
    Logits {
        #[arg(long)]
        run: PathBuf,
        #[arg(long, default_value_t = DeviceArg::Cpu)]
        device: DeviceArg,
        /// Whitespace-separated token ids.
        #[arg(long)]
        tokens_file: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Parameter count and training memory of a preset, computed without allocating.
    Info {
        #[arg(long, default_value = "paper-7b")]
        preset: String,
        #[arg(long, default_value_t = 320)]
        vocab_size: usize,
        /// Default: the preset's training context.
        #[arg(long)]
        context: Option<usize>,
        /// Windows per rank.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Data-parallel ranks: memory per rank.
        #[arg(long, default_value_t = 1)]
        world: usize,
        /// ZeRO-1: AdamW's moments split across the ranks.
        #[arg(long)]
        zero1: bool,
        /// Print only the JSON line (config with HF names, memory).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct BenchTrainArgs {
    #[arg(long, default_value = "tiny")]
    preset: String,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 512)]
    context: usize,
    #[arg(long, default_value_t = 512)]
    vocab_size: usize,
    /// Timed steps (after one untimed step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Recompute each layer's activations in the backward (as `train --recompute`).
    #[arg(long)]
    recompute: bool,
    /// Time every kernel call and print where a step's time goes (stderr).
    #[arg(long)]
    profile: bool,
    /// Matmuls on CUDA: bf16 inputs with f32 accumulation (cuBLASLt), or f32 (cuBLAS, the
    /// parity mode); the CPU is f32 either way.
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f32"])]
    precision: String,
    /// Accepted for scripts; the summary is always one JSON line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct BenchSampleArgs {
    #[arg(long)]
    run: PathBuf,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Prompt tokens per row (BOS then pseudo-random ids); 1 = BOS only, like tools/bench_sample.py.
    #[arg(long, default_value_t = 1)]
    prompt_len: usize,
    /// Sampling settings (defaults: those of tools/bench_sample.py's transformers side).
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    #[arg(long, default_value_t = 0.9)]
    top_p: f64,
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Accepted for scripts; the summary is always one JSON line.
    #[arg(long)]
    json: bool,
}

fn parse_mix(s: &str) -> Result<BTreeMap<String, f64>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (k, v) = p
                .split_once('=')
                .with_context(|| format!("--mix entry {p:?} is not modality=weight"))?;
            let w: f64 = v
                .trim()
                .parse()
                .with_context(|| format!("--mix weight {v:?} is not a number"))?;
            Ok((k.trim().to_string(), w))
        })
        .collect()
}

/// `--dist`'s value as a launch.
pub fn launch(dist: &str) -> codeclm_model::dist::Launch {
    use codeclm_model::dist::Launch;
    match dist {
        "none" => Launch::Single,
        "mpi" => Launch::Mpi,
        "nccl" => Launch::Nccl,
        _ => Launch::Auto,
    }
}

/// Runs `f` on this rank; a failing rank of several ends the whole job (the others would wait
/// in a collective).
pub fn on_ranks(dist: &codeclm_model::dist::Dist, f: impl FnOnce() -> Result<()>) -> Result<()> {
    let result = f();
    if let Err(e) = &result {
        if dist.world > 1 {
            eprintln!("error (rank {} of {}): {e:#}", dist.rank, dist.world);
            dist.abort(1);
        }
    }
    result
}

pub fn train_cmd(a: TrainArgs) -> Result<()> {
    use codeclm_model::dist::Dist;
    let dist = Dist::init(launch(&a.dist))?;
    // Ranks on one machine share its cores unless told otherwise.
    let threads = a.threads.or_else(|| {
        (dist.local_world > 1 && std::env::var_os("RAYON_NUM_THREADS").is_none()).then(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / dist.local_world).max(1)
        })
    });
    set_threads(threads);
    on_ranks(&dist, || train_ranks(a, &dist))
}

fn train_ranks(a: TrainArgs, dist: &codeclm_model::dist::Dist) -> Result<()> {
    let device = a.device.device();
    let (start, out) = if let Some(run) = a.resume {
        if a.config.is_some()
            || a.context.is_some()
            || a.batch.is_some()
            || a.grad_accum.is_some()
            || a.lr.is_some()
            || a.seed.is_some()
            || a.mix.is_some()
            || a.val_docs.is_some()
            || a.recompute
            || a.zero1
            || a.precision.is_some()
        {
            bail!("--resume continues the run with its saved settings; only --steps, --stop-at and --dataset may be given with it");
        }
        (
            Start::Resume {
                steps: a.steps,
                stop_at: a.stop_at,
                dataset: a.dataset,
            },
            run,
        )
    } else {
        let mut cfg = TrainConfig::preset(&a.preset)?;
        if let Some(f) = &a.config {
            cfg = cfg.merge_toml(f)?;
            if cfg.preset != a.preset && a.preset != "tiny" {
                cfg.preset = a.preset.clone();
            }
        }
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = a.$f { cfg.$f = v; } )* };
        }
        set!(context, batch, grad_accum, lr, seed, eval_every, save_every, val_docs);
        if let Some(p) = &a.precision {
            cfg.bf16 = p == "bf16";
        }
        if let Some(s) = a.steps {
            cfg.steps = s;
            if a.config.is_none() {
                cfg.warmup_steps = (s / 20).max(1);
                if a.eval_every.is_none() {
                    cfg.eval_every = (s / 5).max(1);
                }
                if a.save_every.is_none() {
                    cfg.save_every = (s / 5).max(1);
                }
            }
        }
        if let Some(m) = &a.mix {
            cfg.mix = parse_mix(m)?;
        }
        cfg.stop_at = a.stop_at;
        cfg.recompute |= a.recompute;
        cfg.zero1 |= a.zero1;
        let dataset = a.dataset.context("--dataset is required")?;
        (
            Start::New {
                dataset,
                vocab: a.vocab,
                config: cfg,
            },
            a.out,
        )
    };
    let s = train::train(start, &out, dist, device)?;
    if !dist.is_root() {
        return Ok(());
    }
    println!(
        "held-out: {:.4} bits per codec byte ({:.4} nats/token) vs byte-unigram baseline {:.4} bits per byte (unigram fitted on the training bytes, add-one smoothing): {:.1}% of the baseline",
        s.val_bits_per_byte,
        s.val_nats_per_token,
        s.unigram_bits_per_byte,
        100.0 * s.val_bits_per_byte / s.unigram_bits_per_byte
    );
    println!(
        "trained {} steps in {:.1} s ({:.0} tokens/s); final train loss {:.4}; run in {}",
        s.steps,
        s.seconds,
        s.tokens_per_second,
        s.final_train_loss,
        out.display()
    );
    Ok(())
}

pub fn model_cmd(cmd: ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::Logits {
            run,
            device,
            tokens_file,
            out,
        } => {
            let mut model = Lm::load(&run)?.on(device.device());
            let text = std::fs::read_to_string(&tokens_file)
                .with_context(|| format!("reading {}", tokens_file.display()))?;
            let ids: Vec<u32> = text
                .split_whitespace()
                .map(|t| {
                    t.parse::<u32>().with_context(|| {
                        format!("{}: {t:?} is not a token id", tokens_file.display())
                    })
                })
                .collect::<Result<_>>()?;
            if ids.is_empty() {
                bail!("{} holds no token ids", tokens_file.display());
            }
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= model.config.vocab_size) {
                bail!(
                    "{}: token {bad} is outside the model's vocabulary of {}",
                    tokens_file.display(),
                    model.config.vocab_size
                );
            }
            let n = ids.len();
            let v = model.config.vocab_size;
            let logits = model.logits(&ids)?; // [T, V]
            let bytes =
                codeclm_model::checkpoint::serialize_f32(&[("logits", &[n, v], &logits)], &[])?;
            codeclm_formats::write_atomic(&out, &bytes)?;
            println!(
                "wrote {} (logits [{n}, {}])",
                out.display(),
                model.config.vocab_size
            );
            Ok(())
        }
        ModelCommand::Info {
            preset,
            vocab_size,
            context,
            batch,
            world,
            zero1,
            json,
        } => {
            let cfg = LlamaConfig::preset(&preset, vocab_size)?;
            let tc = TrainConfig::preset(&preset)?;
            let ctx = context.unwrap_or(tc.context);
            let gb = |b: u64| b as f64 / (1u64 << 30) as f64;
            for (label, bytes_per_act) in [("bf16 activations", 2u64), ("f32 activations", 4)] {
                if json {
                    break;
                }
                let m = MemoryEstimate::new(&cfg, batch, ctx, bytes_per_act).per_rank(world, zero1);
                let ranks = match (world, zero1) {
                    (1, _) => String::new(),
                    (w, z) => format!(" per rank of {w}{}", if z { " with ZeRO-1" } else { "" }),
                };
                println!(
                    "{preset}: {:.3} B parameters ({}); training at batch {batch} x context {ctx}{ranks} with {label} (kept for backward, no activation checkpointing, attention scores materialised): weights {:.2} GiB + grads {:.2} GiB + AdamW {:.2} GiB + activations {:.2} GiB{} = {:.2} GiB",
                    m.parameters as f64 / 1e9,
                    m.parameters,
                    gb(m.weights_bytes),
                    gb(m.grads_bytes),
                    gb(m.adam_bytes),
                    gb(m.activations_bytes),
                    if m.comm_bytes > 0 { format!(" + all-reduce buckets {:.3} GiB", gb(m.comm_bytes)) } else { String::new() },
                    gb(m.total_bytes)
                );
            }
            println!(
                "{}",
                serde_json::json!({"preset": preset, "config": cfg.to_hf_json("float32"), "memory_bf16": MemoryEstimate::new(&cfg, batch, ctx, 2).per_rank(world, zero1)})
            );
            Ok(())
        }
    }
}

pub fn bench_train(a: BenchTrainArgs) -> Result<()> {
    set_threads(Some(a.threads));
    let r = train::bench_train(
        &a.preset,
        a.vocab_size,
        a.batch,
        a.context,
        a.steps,
        a.recompute,
        a.profile,
        a.device.device(),
        a.precision == "bf16",
    )?;
    if a.profile {
        let total: f64 = r.profile.iter().map(|p| p.2).sum();
        eprintln!(
            "{:<20} {:>10} {:>10} {:>7}",
            "kernel", "calls/step", "ms/step", "share"
        );
        for (k, calls, secs) in &r.profile {
            eprintln!(
                "{k:<20} {calls:>10.0} {:>10.2} {:>6.1}%",
                secs * 1e3,
                100.0 * secs / total
            );
        }
        eprintln!(
            "{:<20} {:>10} {:>10.2} (step {:.2} ms)",
            "total",
            "",
            total * 1e3,
            r.seconds_per_step * 1e3
        );
    }
    let cfg = LlamaConfig::preset(&a.preset, a.vocab_size)?;
    let tps = r.tokens_per_second;
    println!(
        "{}",
        serde_json::json!({
            "impl": "codeclm", "backend": r.backend, "preset": a.preset, "threads": a.threads,
            "batch": a.batch, "context": a.context, "vocab_size": a.vocab_size,
            "parameters": cfg.num_parameters(), "steps": a.steps, "tokens_per_second": tps,
            "tokens_per_s": tps, "config": cfg.to_hf_json("float32"),
            "tokens_per_second_per_thread": tps / a.threads as f64,
            "tokens_per_cpu_second": r.tokens_per_cpu_second,
            "seconds_per_step": r.seconds_per_step, "flops_per_second": r.flops_per_second,
            "recompute": a.recompute, "profile": r.profile,
        })
    );
    Ok(())
}

pub fn bench_sample(a: BenchSampleArgs) -> Result<()> {
    set_threads(a.threads);
    let mut model = Lm::load(&a.run)?.on(a.device.device());
    let bos = model.config.bos_token_id.unwrap_or(0);
    let v = model.config.vocab_size;
    let mut rng = codeclm_model::rng::Rng::new(7);
    let prompts: Vec<Vec<u32>> = (0..a.batch)
        .map(|_| {
            std::iter::once(bos)
                .chain(
                    (1..a.prompt_len.max(1))
                        .map(|_| 3 + rng.below(v.saturating_sub(3).max(1)) as u32),
                )
                .collect()
        })
        .collect();
    let cfg = GenerateConfig {
        max_new_tokens: a.max_tokens,
        temperature: 1.0,
        top_k: Some(a.top_k).filter(|&k| k > 0),
        top_p: Some(a.top_p).filter(|&p| p < 1.0),
        seed: 0,
        eos_token_id: None,
        pad_token_id: model.config.pad_token_id.unwrap_or(0),
        window: None,
    };
    let t = Instant::now();
    let out = codeclm_model::generate(&mut model, &prompts, &cfg)?;
    let secs = t.elapsed().as_secs_f64();
    let n: usize = out.iter().map(|o| o.len()).sum();
    println!(
        "{}",
        serde_json::json!({
            "impl": "codeclm", "batch": a.batch, "prompt_len": a.prompt_len, "max_tokens": a.max_tokens,
            "generated_tokens": n, "seconds": secs, "tokens_per_second": n as f64 / secs,
            "tokens_per_s": n as f64 / secs, "threads": a.threads, "config": model.config.to_hf_json("float32"),
        })
    );
    Ok(())
}
