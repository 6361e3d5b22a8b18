//! NCCL's part of data parallelism that runs without a GPU: libnccl (PyPI's wheel in CI) is
//! loaded at run time, rank 0 makes the unique id, and the other ranks get it over MPI or,
//! in a torchrun-style launch, over the TCP rendezvous; every rank then opens its device,
//! which on a machine without the driver is the clean libcuda error. What follows on a GPU
//! (the communicator, the all-reduce) has not run here.

use std::process::Output;

use crate::common::*;

/// Whether libnccl loads here; CI insists (`CODECLM_REQUIRE_NCCL`).
fn nccl_here() -> bool {
    match codeclm_model::engine::cuda::nccl::check_library() {
        Ok(()) => true,
        Err(e) => {
            assert!(
                std::env::var_os("CODECLM_REQUIRE_NCCL").is_none(),
                "CODECLM_REQUIRE_NCCL is set but: {e}"
            );
            eprintln!("libnccl not found, NCCL rendezvous not checked: {e}");
            false
        }
    }
}

fn driver_here() -> bool {
    std::path::Path::new("/usr/lib/x86_64-linux-gnu/libcuda.so.1").exists()
}

/// The `NCCL id` every rank printed, by rank.
fn ids(outs: &[&Output]) -> Vec<(usize, String)> {
    let mut v: Vec<(usize, String)> = outs
        .iter()
        .flat_map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter_map(|l| {
            let rest = l.strip_prefix("rank ")?;
            let (rank, rest) = rest.split_once(' ')?;
            let id = rest.split("NCCL id ").nth(1)?.split(' ').next()?;
            Some((rank.parse().ok()?, id.to_string()))
        })
        .collect();
    v.sort();
    v
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn torchrun_style_ranks_get_rank_zeros_nccl_id_over_tcp() {
    if !nccl_here() {
        return;
    }
    // The id is handed out on MASTER_PORT + 1 (torchrun's agent holds MASTER_PORT).
    let port = free_port();
    let spawn = |rank: usize| {
        codeclm()
            .args(["bench", "allreduce", "--device", "cuda", "--floats", "1000"])
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", "2")
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", (port - 1).to_string())
            .env("TORCHELASTIC_RUN_ID", "codeclm-test")
            .env("CODECLM_RENDEZVOUS_TIMEOUT", "60")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Rank 1 first: it waits for rank 0 to listen.
    let one = spawn(1);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let zero = spawn(0);
    let (zero, one) = (
        zero.wait_with_output().unwrap(),
        one.wait_with_output().unwrap(),
    );
    let got = ids(&[&zero, &one]);
    assert_eq!(
        got.len(),
        2,
        "{got:?}\n{}",
        String::from_utf8_lossy(&one.stderr)
    );
    assert_eq!((got[0].0, got[1].0), (0, 1));
    assert_eq!(got[0].1, got[1].1, "the ranks hold different NCCL ids");
    if !driver_here() {
        for o in [&zero, &one] {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success() && !err.contains("panicked"), "{err}");
            // Two local ranks count the devices first: the driver is what is missing.
            assert!(err.contains("cannot load libcuda.so.1"), "{err}");
        }
    }
}

#[cfg(feature = "mpi")]
#[test]
fn mpi_ranks_get_rank_zeros_nccl_id_over_mpi() {
    if !nccl_here() {
        return;
    }
    let out = std::process::Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
        .arg(env!("CARGO_BIN_EXE_codeclm"))
        .args([
            "bench",
            "allreduce",
            "--device",
            "cuda",
            "--dist",
            "nccl",
            "--floats",
            "1000",
        ])
        .env("CODECLM_LOG", "warn")
        .output()
        .unwrap();
    let got = ids(&[&out]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(got.len(), 2, "{got:?}\n{err}");
    assert_eq!(
        got[0].1, got[1].1,
        "the ranks hold different NCCL ids:\n{err}"
    );
    if !driver_here() {
        assert!(
            !out.status.success() && err.contains("cannot load libcuda.so.1"),
            "{err}"
        );
    }
}

#[test]
fn without_libnccl_the_error_names_the_fix() {
    let out = codeclm()
        .args(["bench", "allreduce", "--device", "cuda", "--dist", "nccl"])
        .env("LD_LIBRARY_PATH", "")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("NCCL id") {
        return; // libnccl.so is on the system's own path here
    }
    assert!(!out.status.success() && !err.contains("panicked"), "{err}");
    assert!(
        err.contains("cannot load libnccl.so") && err.contains("Fix:"),
        "{err}"
    );
}

#[test]
fn a_torchrun_launch_on_cpu_names_mpirun() {
    let err = run_err(
        codeclm()
            .args(["bench", "allreduce", "--floats", "10"])
            .env("WORLD_SIZE", "2")
            .env("RANK", "0"),
    );
    assert!(
        err.contains("mpirun") && err.contains("--device cuda"),
        "{err}"
    );
    // Variables that do not make a rank are named.
    let err = run_err(
        codeclm()
            .args(["bench", "allreduce", "--floats", "10"])
            .env("WORLD_SIZE", "2")
            .env("RANK", "2"),
    );
    assert!(
        err.contains("RANK=2 is not a rank of WORLD_SIZE=2"),
        "{err}"
    );
}
