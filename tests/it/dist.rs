//! Data parallelism through MPI (`mpirun -np 2`, oversubscribed on small machines): 2 ranks x
//! batch B give the weights of 1 rank x batch 2B (with and without ZeRO-1), a 2-rank run
//! resumes on 1 rank where an uninterrupted run ends, and a failing rank ends the whole job.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use crate::model::token_dataset;

const STEPS: &str = "5";

fn train_args(ds: &Path, out: &Path, batch: usize, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--preset",
        "tiny",
        "--context",
        "64",
        "--steps",
        STEPS,
        "--eval-every",
        "5",
        "--threads",
        "1",
        "--batch",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(batch.to_string());
    a.extend(["--dataset".into(), ds.display().to_string()]);
    a.extend(["--out".into(), out.display().to_string()]);
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// `mpirun -np N codeclm ARGS` (as root in CI containers, more ranks than cores allowed).
fn mpirun(n: usize, args: &[String]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "-np"])
        .arg(n.to_string())
        .arg(env!("CARGO_BIN_EXE_codeclm"))
        .args(args)
        .env("CODECLM_LOG", "warn");
    c
}

fn tensors(run: &Path, file: &str) -> Vec<(String, Vec<f32>)> {
    let t = codeclm_model::checkpoint::read_f32(&run.join(file)).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = t.into_iter().map(|(n, (_, v))| (n, v)).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Every absolute difference between two runs' tensors in `file`.
fn diffs(a: &Path, b: &Path, file: &str) -> Vec<f32> {
    let (ta, tb) = (tensors(a, file), tensors(b, file));
    assert_eq!(ta.len(), tb.len(), "{file}: tensor sets differ");
    let mut out = Vec::new();
    for ((na, va), (nb, vb)) in ta.iter().zip(&tb) {
        assert_eq!((na, va.len()), (nb, vb.len()));
        out.extend(va.iter().zip(vb).map(|(x, y)| (x - y).abs()));
    }
    out
}

fn max_of(d: &[f32]) -> f32 {
    d.iter().copied().fold(0.0, f32::max)
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
        .collect()
}

/// `b` trains as `a` does: the same losses within 1e-6 at every step, and the same weights
/// within 1e-6 but for AdamW's ill-conditioned elements (a gradient near eps, where fp32's
/// summation order alone moves the update: `floor`, the difference one rank's batch 2B and
/// its batch B x 2 accumulated steps show), which stay within 4 x the floor.
fn assert_trains_as(a: &Path, b: &Path, floor: f32, what: &str) {
    let d = diffs(a, b, "model.safetensors");
    let over = d.iter().filter(|&&x| x > 1e-6).count();
    assert!(
        over as f64 <= 1e-4 * d.len() as f64 && max_of(&d) <= (4.0 * floor).max(1e-6),
        "{what}: {over} of {} weights differ by more than 1e-6, at most {} (fp32 floor {floor})",
        d.len(),
        max_of(&d)
    );
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.len(), lb.len(), "{what}: {la:?} vs {lb:?}");
    for (x, y) in la.iter().zip(&lb) {
        assert!(
            (x - y).abs() <= 1e-6 * x.abs().max(1.0),
            "{what}: losses {la:?} vs {lb:?}"
        );
    }
}

#[test]
fn two_ranks_train_as_one_rank_with_twice_the_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = token_dataset(tmp.path());
    let one = tmp.path().join("one");
    run_ok(codeclm().args(train_args(&ds, &one, 2, &[])));
    // fp32's own floor for this comparison: the same batch as 2 accumulated halves.
    let acc = tmp.path().join("acc");
    run_ok(codeclm().args(train_args(&ds, &acc, 1, &["--grad-accum", "2"])));
    let floor = max_of(&diffs(&one, &acc, "model.safetensors"));
    eprintln!("1 rank, batch 2 vs batch 1 x 2 accumulated: weights differ by at most {floor}");
    let runs: Vec<PathBuf> = [false, true]
        .into_iter()
        .map(|zero1| {
            let two = tmp.path().join(format!("two-{zero1}"));
            let extra: &[&str] = if zero1 { &["--zero1"] } else { &[] };
            run_ok(&mut mpirun(2, &train_args(&ds, &two, 1, extra)));
            assert_trains_as(
                &one,
                &two,
                floor,
                &format!("2 ranks x 1 (zero1 {zero1}) vs 1 x 2"),
            );
            let state: serde_json::Value =
                serde_json::from_slice(&std::fs::read(two.join("trainer_state.json")).unwrap())
                    .unwrap();
            assert_eq!(
                (&state["world"], &state["config"]["zero1"]),
                (&2.into(), &zero1.into())
            );
            let line = std::fs::read_to_string(two.join("metrics.jsonl")).unwrap();
            assert!(line.contains("\"comm_seconds\""), "{line}");
            two
        })
        .collect();
    // ZeRO-1 changes where the moments live, not one bit of the result.
    for file in ["model.safetensors", "optimizer.safetensors"] {
        assert_eq!(max_of(&diffs(&runs[0], &runs[1], file)), 0.0, "{file}");
    }

    // Stopped at step 3 on 2 ranks (ZeRO-1), resumed on 1: where the 1-rank run ends.
    let elastic = tmp.path().join("elastic");
    run_ok(&mut mpirun(
        2,
        &train_args(&ds, &elastic, 1, &["--stop-at", "3", "--zero1"]),
    ));
    run_ok(
        codeclm()
            .args(["train", "--threads", "1", "--resume"])
            .arg(&elastic),
    );
    assert_trains_as(&one, &elastic, floor, "2 ranks to step 3, then 1 rank");

    // A global batch the new world cannot share is refused, naming the fix.
    let odd = tmp.path().join("odd");
    run_ok(codeclm().args(train_args(&ds, &odd, 3, &["--stop-at", "2"])));
    let out = mpirun(
        2,
        &["train".into(), "--resume".into(), odd.display().to_string()],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot share evenly"), "{err}");
}

#[test]
fn a_torchrun_launch_on_cpu_says_what_to_use() {
    let tmp = tempfile::tempdir().unwrap();
    let err = run_err(
        codeclm()
            .args(["train", "--dataset"])
            .arg(tmp.path())
            .env("WORLD_SIZE", "2")
            .env("RANK", "0"),
    );
    assert!(err.contains("mpirun") && err.contains("NCCL"), "{err}");
}

/// `mpirun -np 2 codeclm bench allreduce ARGS` (with `env`): rank 0's one JSON line.
fn allreduce_2_ranks(args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let mut a = vec!["bench", "allreduce", "--iters", "2", "--threads", "1"];
    a.extend(args);
    let mut cmd = mpirun(2, &a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "rank 0 alone prints: {stdout}");
    serde_json::from_str(lines[0]).unwrap()
}

/// `bench allreduce` on 2 MPI ranks: the average is exact and timed; one JSON line from rank 0.
#[test]
fn bench_allreduce_averages_over_mpi_ranks() {
    let j = allreduce_2_ranks(&["--floats", "2500000"], &[]);
    assert_eq!(j["world"], 2);
    assert_eq!(j["max_error"], 0.0);
    assert_eq!(j["bytes"], 10_000_000);
    assert!(j["seconds_per_allreduce"].as_f64().unwrap() > 0.0);
}

/// CUDA ranks without NCCL (`--dist mpi`) average through host memory and MPI: on the emulated
/// device (kernels.cu on the CPU) 2 ranks get the exact average.
#[test]
fn cuda_ranks_average_through_mpi_on_the_emulated_device() {
    let j = allreduce_2_ranks(
        &["--device", "cuda", "--dist", "mpi", "--floats", "300000"],
        &[("CODECLM_CUDA_EMULATE", "1")],
    );
    assert_eq!(j["world"], 2);
    assert_eq!(j["max_error"], 0.0);
    assert!(j["device"].as_str().unwrap().contains("emulated"), "{j}");
}

/// The trainer on the CUDA backend across 2 MPI ranks with ZeRO-1 (`--dist mpi`: gradients and
/// parameter slices staged through host memory), on the emulated device: it trains as the same
/// 2 ranks do on the CPU (a synthetic token set of short documents keeps validation cheap).
#[test]
fn cuda_ranks_train_as_cpu_ranks_on_the_emulated_device() {
    let tmp = tempfile::tempdir().unwrap();
    let syn = tmp.path().join("syn");
    run_ok(
        codeclm()
            .args(["bench", "loader", "--write-synthetic"])
            .arg(&syn)
            .args(["--tokens", "30000", "--doc-tokens", "120"]),
    );
    let run = |out: &Path, cuda: bool| {
        let mut a: Vec<String> = train_args(&syn, out, 1, &["--zero1", "--dist", "mpi"]);
        // A shorter run than the other tests': every CUDA thread is a fiber on the CPU.
        for (flag, v) in [("--steps", "3"), ("--eval-every", "3")] {
            let at = a.iter().position(|x| x == flag).unwrap();
            a[at + 1] = v.into();
        }
        a.extend(["--val-docs".into(), "2".into()]);
        if cuda {
            // f32 matmuls (the parity mode; bf16 is the CUDA default).
            a.extend(["--device", "cuda", "--precision", "f32"].map(String::from));
        }
        let o = mpirun(2, &a)
            .env("CODECLM_CUDA_EMULATE", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let (c, g) = (tmp.path().join("cpu"), tmp.path().join("cuda"));
    run(&c, false);
    run(&g, true);
    let (lc, lg) = (losses(&c), losses(&g));
    assert_eq!(lc.len(), lg.len());
    for (s, (x, y)) in lc.iter().zip(&lg).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs(),
            "step {}: {x} (cpu) vs {y}",
            s + 1
        );
    }
    // fp32 AdamW moves a weight whose gradient is near eps by up to lr when the summation order
    // changes (tests/it/dist.rs's floor above): nearly all weights agree to 1e-6, none is off by
    // more than a few steps of lr.
    let d = diffs(&c, &g, "model.safetensors");
    let above = d.iter().filter(|&&x| x > 1e-6).count();
    let w = max_of(&d);
    eprintln!("weights: {above} of {} above 1e-6, max {w:.2e}", d.len());
    assert!(
        above as f64 <= 1e-3 * d.len() as f64 && w <= 1e-3,
        "weights: {above} of {} above 1e-6, max {w}",
        d.len()
    );
    let m = max_of(&diffs(&c, &g, "optimizer.safetensors"));
    assert!(m.is_finite() && m <= 1e-4, "moments differ by {m}");
}
