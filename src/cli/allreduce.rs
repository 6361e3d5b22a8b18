//! `codeclm bench allreduce`: the data-parallel gradient average on its own, under the same
//! launchers as `codeclm train` (mpirun, srun, torchrun's variables). Every rank averages a
//! buffer whose values depend on its rank, the result is checked against the exact average,
//! then `--iters` averages of the whole buffer are timed: the cost one optimizer step pays for
//! a model of that many parameters. Rank 0 prints one JSON line (seconds per all-reduce, and
//! the algorithm and bus bandwidths as nccl-tests define them).

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use codeclm_model::dist::{Dist, BUCKET};
use codeclm_model::engine::{Backend, Cuda, Device, Span, View};
use codeclm_model::LlamaConfig;

use super::flags::{set_threads, DeviceArg};
use super::model::{launch, on_ranks};

#[derive(Args)]
pub struct AllReduceArgs {
    /// cpu (MPI through host memory) or cuda[:N] (NCCL on the device, or MPI through host
    /// memory with --dist mpi; compiled, not yet run on a GPU).
    #[arg(long, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// As `codeclm train --dist`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "none", "mpi", "nccl"])]
    dist: String,
    /// Floats to average: a preset's parameter count (its gradient buffer).
    #[arg(long, default_value = "small", conflicts_with = "floats")]
    preset: String,
    /// Vocabulary size of the preset (the paper's 10K BPE).
    #[arg(long, default_value_t = 10_000)]
    vocab_size: usize,
    /// Floats to average (instead of --preset).
    #[arg(long)]
    floats: Option<usize>,
    /// Timed all-reduces (after one checked, untimed).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// CPU threads per rank.
    #[arg(long)]
    threads: Option<usize>,
}

/// Rank `rank`'s value at `i`: the exact average over `world` ranks is
/// `(world + 1) / 2 * pattern(i)`, exactly representable.
fn value(rank: usize, i: usize) -> f32 {
    (rank + 1) as f32 * ((i % 7) + 1) as f32
}

pub fn allreduce(a: AllReduceArgs) -> Result<()> {
    let dist = Dist::init(launch(&a.dist))?;
    set_threads(a.threads);
    on_ranks(&dist, || run(&a, &dist))
}

fn run(a: &AllReduceArgs, dist: &Dist) -> Result<()> {
    let n = match a.floats {
        Some(n) => n,
        None => LlamaConfig::preset(&a.preset, a.vocab_size)?.num_parameters() as usize,
    };
    if n == 0 || a.iters == 0 {
        bail!("--floats and --iters must be positive");
    }
    let host: Vec<f32> = (0..n).map(|i| value(dist.rank, i)).collect();
    let (device, seconds, err) = match a.device.device() {
        Device::Cpu => {
            if dist.needs_cuda() {
                return Err(dist.cpu_error().into());
            }
            let mut x = host;
            let average = |x: &mut [f32]| {
                dist.with_scratch(|_, send| {
                    x.chunks_mut(BUCKET)
                        .try_for_each(|c| dist.average_in(c, send))
                })
            };
            average(&mut x)?;
            let err = max_error(&x, dist.world);
            dist.barrier()?;
            let t = Instant::now();
            for _ in 0..a.iters {
                average(&mut x)?;
            }
            ("cpu".to_string(), t.elapsed().as_secs_f64(), err)
        }
        Device::Cuda(asked) => {
            let id = if dist.wants_nccl() {
                let id = dist.nccl_id()?;
                // What shows every rank holds the one id (the CLI test reads it).
                eprintln!(
                    "rank {} of {}: NCCL id {:016x} (NCCL {})",
                    dist.rank,
                    dist.world,
                    id.digest(),
                    codeclm_model::engine::cuda::nccl::version()?
                );
                if !dist.needs_cuda() {
                    // Every rank has printed before any can fail on the device.
                    dist.barrier()?;
                }
                Some(id)
            } else {
                None
            };
            let cuda = Cuda::new(dist.cuda_ordinal(asked)?)?;
            if let Some(id) = id {
                dist.bind_cuda(&cuda, &id)?;
            }
            let buf = cuda.alloc(n)?;
            let view = View::<Cuda>::new(&buf, Span { off: 0, len: n });
            cuda.upload(view, &host);
            let mut staged = vec![0f32; n];
            let average = |staged: &mut [f32]| -> Result<()> {
                if !cuda.all_average(view) {
                    // No NCCL (--dist mpi): through host memory as the trainer does.
                    cuda.download(view, staged);
                    dist.with_scratch(|_, send| {
                        staged
                            .chunks_mut(BUCKET)
                            .try_for_each(|c| dist.average_in(c, send))
                    })?;
                    cuda.upload(view, staged);
                }
                cuda.status()?;
                Ok(())
            };
            average(&mut staged)?;
            cuda.download(view, &mut staged);
            let err = max_error(&staged, dist.world);
            dist.barrier()?;
            // Back to the rank's values: the timed averages must not over- or underflow.
            cuda.upload(view, &host);
            let t = Instant::now();
            for _ in 0..a.iters {
                average(&mut staged)?;
            }
            (cuda.name(), t.elapsed().as_secs_f64(), err)
        }
    };
    // The ranks' mean time (they start together after the barrier).
    let mut mean = [seconds / dist.world as f64];
    dist.all_reduce_f64(&mut mean)?;
    // Sums of small integers are exact; the division by the world size rounds (NCCL may
    // multiply by 1/world): f32's rounding of the result, no more.
    if err > 1e-6 {
        bail!(
            "rank {}: the average over {} ranks is off by {err:.2e} of its largest value",
            dist.rank,
            dist.world
        );
    }
    if dist.is_root() {
        let per = mean[0] / a.iters as f64;
        let bytes = (n * 4) as f64;
        let algbw = bytes / per / 1e9;
        let w = dist.world as f64;
        println!(
            "{}",
            serde_json::json!({
                "bench": "allreduce",
                "device": device,
                "comm": dist.describe(),
                "world": dist.world,
                "floats": n,
                "bytes": n * 4,
                "iters": a.iters,
                "seconds_per_allreduce": per,
                "algbw_gb_s": algbw,
                "busbw_gb_s": algbw * 2.0 * (w - 1.0) / w,
                "max_error": err,
            })
        );
    }
    Ok(())
}

/// Largest difference from the exact average of [`value`] over `world` ranks, relative to the
/// average's largest value.
fn max_error(x: &[f32], world: usize) -> f64 {
    let mean = (world + 1) as f64 / 2.0;
    let worst = x
        .iter()
        .enumerate()
        .map(|(i, &v)| (v as f64 - mean * ((i % 7) + 1) as f64).abs())
        .fold(0.0, f64::max);
    worst / (mean * 7.0)
}
