//! Data parallelism: the ranks of a run and their collectives. Every rank holds the model,
//! computes gradients on its share of the global batch (the loader's [`codeclm_loader::Share`]),
//! and the flat gradient buffer is summed across ranks by MPI's all-reduce (in fixed-size
//! buckets); with ZeRO-1 each rank keeps the AdamW moments of its slice of the parameters only,
//! updates that slice, and each slice is broadcast from its rank, bucket by bucket. Rank and world come from the launcher
//! (`mpirun`, `srun`: MPI itself says); the CPU backend's ranks talk through MPI (Open MPI from
//! the system, through the `mpi` crate, behind this crate's `mpi` feature). NCCL for GPU ranks
//! is not built yet (the engine's CUDA backend is compiled, not yet run on a GPU; multi-rank CUDA
//! runs sum through MPI's host buffers).

use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::time::Instant;

use crate::{Error, Result};

/// How `codeclm train` finds its ranks (`--dist`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launch {
    /// MPI when a launcher started several processes (`mpirun`, `srun`), else one process.
    Auto,
    /// One process, whatever the environment says.
    Single,
    /// MPI even for one rank (checks the MPI path).
    Mpi,
}

/// What the environment says about the launcher: (name, world size) of the first variables
/// found, MPI launchers first.
fn launcher() -> Option<(&'static str, usize)> {
    let var = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
    };
    [
        ("mpirun (Open MPI)", "OMPI_COMM_WORLD_SIZE"),
        ("an MPI launcher (PMI)", "PMI_SIZE"),
        ("srun (Slurm)", "SLURM_NTASKS"),
    ]
    .into_iter()
    .find_map(|(name, k)| var(k).map(|n| (name, n)))
}

/// The torchrun-style world size (`WORLD_SIZE`), if set.
fn torchrun_world() -> Option<usize> {
    std::env::var("WORLD_SIZE").ok()?.trim().parse().ok()
}

enum Comm {
    Single,
    #[cfg(feature = "mpi")]
    Mpi {
        world: mpi::topology::SimpleCommunicator,
        // Finalizes MPI when dropped: the last field, dropped after the communicator.
        _universe: mpi::environment::Universe,
    },
}

/// This process's place in the run and the collectives between the ranks.
pub struct Dist {
    pub rank: usize,
    pub world: usize,
    /// Rank and number of ranks on this machine (for the CPU threads each may use).
    pub local_rank: usize,
    pub local_world: usize,
    comm: Comm,
    /// Seconds spent in collectives since the last [`Dist::take_comm_seconds`].
    comm_seconds: Cell<f64>,
    /// Two host buckets the trainer stages gradients and parameters through (allocated once).
    scratch: RefCell<Vec<f32>>,
}

/// Floats per all-reduce call: bounds the host copy a bucket needs (4 MiB).
pub const BUCKET: usize = 1 << 20;

impl Dist {
    /// One process.
    pub fn single() -> Dist {
        Dist {
            rank: 0,
            world: 1,
            local_rank: 0,
            local_world: 1,
            comm: Comm::Single,
            comm_seconds: Cell::new(0.0),
            scratch: RefCell::new(Vec::new()),
        }
    }

    /// The ranks as the launcher started them.
    pub fn init(launch: Launch) -> Result<Dist> {
        let found = launcher();
        let use_mpi = match launch {
            Launch::Single => false,
            Launch::Mpi => true,
            Launch::Auto => found.is_some_and(|(_, n)| n > 1),
        };
        if !use_mpi {
            if launch == Launch::Auto && found.is_none() && torchrun_world().is_some_and(|n| n > 1)
            {
                return Err(Error::Config(format!(
                    "WORLD_SIZE={} (a torchrun-style launch): ranks started that way talk through NCCL, which is not built yet (GPU ranks under mpirun sum through MPI meanwhile). On CPU, start the ranks with `mpirun -np N codeclm train ...` or `srun codeclm train ...`; or pass --dist none for one process",
                    torchrun_world().unwrap_or(0)
                )));
            }
            return Ok(Dist::single());
        }
        Self::init_mpi(found)
    }

    #[cfg(feature = "mpi")]
    fn init_mpi(_found: Option<(&'static str, usize)>) -> Result<Dist> {
        use mpi::traits::*;
        let universe = mpi::initialize()
            .ok_or_else(|| Error::Config("MPI was initialized already in this process".into()))?;
        let world = universe.world();
        let local = world.split_shared(0);
        Ok(Dist {
            rank: world.rank() as usize,
            world: world.size() as usize,
            local_rank: local.rank() as usize,
            local_world: local.size() as usize,
            comm: Comm::Mpi {
                world,
                _universe: universe,
            },
            comm_seconds: Cell::new(0.0),
            scratch: RefCell::new(Vec::new()),
        })
    }

    #[cfg(not(feature = "mpi"))]
    fn init_mpi(found: Option<(&'static str, usize)>) -> Result<Dist> {
        let how = match found {
            Some((name, n)) => format!("{name} started {n} processes"),
            None => "--dist mpi asks for MPI".into(),
        };
        Err(Error::Config(format!(
            "{how}, but this codeclm was built without MPI. Fix: install Open MPI (apt-get install libopenmpi-dev openmpi-bin) and build with `cargo build --release --features mpi` (`make build` does)"
        )))
    }

    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// "MPI, rank 1 of 4" or "one process".
    pub fn describe(&self) -> String {
        match self.comm {
            Comm::Single => "one process".into(),
            #[cfg(feature = "mpi")]
            Comm::Mpi { .. } => format!(
                "MPI, rank {} of {} ({} on this machine)",
                self.rank, self.world, self.local_world
            ),
        }
    }

    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    fn timed<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.comm_seconds
            .set(self.comm_seconds.get() + t.elapsed().as_secs_f64());
        out
    }

    /// Seconds spent in collectives since the last call.
    pub fn take_comm_seconds(&self) -> f64 {
        self.comm_seconds.replace(0.0)
    }

    /// Runs `f` on two host buckets of [`BUCKET`] floats each, allocated on first use and kept:
    /// no allocation per step.
    pub fn with_scratch<R>(&self, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
        let mut s = self.scratch.borrow_mut();
        if s.len() < 2 * BUCKET {
            s.resize(2 * BUCKET, 0.0);
        }
        let (a, b) = s.split_at_mut(BUCKET);
        f(a, b)
    }

    /// `recv = sum over ranks of send` (same length on every rank).
    pub fn all_reduce_sum(&self, send: &[f32], recv: &mut [f32]) {
        assert_eq!(
            send.len(),
            recv.len(),
            "all-reduce buffers differ in length"
        );
        match &self.comm {
            Comm::Single => recv.copy_from_slice(send),
            #[cfg(feature = "mpi")]
            Comm::Mpi { world, .. } => self.timed(|| {
                use mpi::collective::SystemOperation;
                use mpi::traits::*;
                world.all_reduce_into(send, recv, SystemOperation::sum())
            }),
        }
    }

    /// Sums `x` across ranks in place (scalars: losses, counts).
    pub fn all_reduce_f64(&self, x: &mut [f64]) {
        match &self.comm {
            Comm::Single => {
                let _ = x;
            }
            #[cfg(feature = "mpi")]
            Comm::Mpi { world, .. } => self.timed(|| {
                use mpi::collective::SystemOperation;
                use mpi::traits::*;
                let send = x.to_vec();
                world.all_reduce_into(&send[..], x, SystemOperation::sum())
            }),
        }
    }

    /// Rank `r`'s slice of `n` values under ZeRO-1: contiguous, sizes differing by at most one.
    pub fn shard(&self, n: usize, r: usize) -> Range<usize> {
        let (w, r) = (self.world, r.min(self.world));
        (n * r / w)..(n * (r + 1) / w)
    }

    /// Rank `root`'s `buf` into `buf` on every rank.
    pub fn broadcast_from(&self, root: usize, buf: &mut [f32]) {
        match &self.comm {
            Comm::Single => {
                let _ = (root, buf);
            }
            #[cfg(feature = "mpi")]
            Comm::Mpi { world, .. } => self.timed(|| {
                use mpi::traits::*;
                world.process_at_rank(root as i32).broadcast_into(buf)
            }),
        }
    }

    /// Every rank's shard into `out` on rank 0 (`out` is ignored elsewhere).
    pub fn gather_shards(&self, mine: &[f32], out: &mut [f32]) {
        match &self.comm {
            Comm::Single => out.copy_from_slice(mine),
            #[cfg(feature = "mpi")]
            Comm::Mpi { world, .. } => self.timed(|| {
                use mpi::datatype::PartitionMut;
                use mpi::traits::*;
                let root = world.process_at_rank(0);
                if self.rank == 0 {
                    let (counts, displs) = self.partition(out.len());
                    let mut part = PartitionMut::new(out, &counts[..], &displs[..]);
                    root.gather_varcount_into_root(mine, &mut part)
                } else {
                    root.gather_varcount_into(mine)
                }
            }),
        }
    }

    #[cfg(feature = "mpi")]
    fn partition(&self, n: usize) -> (Vec<i32>, Vec<i32>) {
        (0..self.world)
            .map(|r| {
                let s = self.shard(n, r);
                (s.len() as i32, s.start as i32)
            })
            .unzip()
    }

    /// Waits for every rank.
    pub fn barrier(&self) {
        match &self.comm {
            Comm::Single => {}
            #[cfg(feature = "mpi")]
            Comm::Mpi { world, .. } => self.timed(|| {
                use mpi::traits::*;
                world.barrier()
            }),
        }
    }

    /// Ends every rank of the job (a failed rank: the others wait in a collective).
    pub fn abort(&self, code: i32) -> ! {
        match &self.comm {
            Comm::Single => std::process::exit(code),
            #[cfg(feature = "mpi")]
            Comm::Mpi { world, .. } => {
                use mpi::traits::*;
                world.abort(code)
            }
        }
    }

    /// Rank 0's `value` on every rank (a decision only rank 0 can make: stop on an error).
    pub fn broadcast_flag(&self, value: bool) -> bool {
        match &self.comm {
            Comm::Single => value,
            #[cfg(feature = "mpi")]
            Comm::Mpi { world, .. } => {
                use mpi::traits::*;
                let mut v = value as u8;
                world.process_at_rank(0).broadcast_into(&mut v);
                v != 0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_buffer_once() {
        for world in 1..6 {
            let d = Dist {
                world,
                ..Dist::single()
            };
            for n in [0usize, 1, 7, 1000, 1 << 20] {
                let mut next = 0;
                for r in 0..world {
                    let s = d.shard(n, r);
                    assert_eq!(s.start, next);
                    assert!(s.len() + 1 >= n / world && s.len() <= n / world + 1);
                    next = s.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn one_process_collectives_are_identities() {
        let d = Dist::init(Launch::Single).unwrap();
        assert_eq!((d.rank, d.world), (0, 1));
        let mut out = vec![0.0; 3];
        d.all_reduce_sum(&[1.0, 2.0, 3.0], &mut out);
        assert_eq!(out, [1.0, 2.0, 3.0]);
        d.broadcast_from(0, &mut out);
        assert_eq!(out, [1.0, 2.0, 3.0]);
        assert!(d.broadcast_flag(true));
    }
}
