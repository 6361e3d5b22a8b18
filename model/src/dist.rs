//! Data parallelism: the ranks of a run and their collectives. Every rank holds the model,
//! computes gradients on its share of the global batch (the loader's [`codeclm_loader::Share`]),
//! and the flat gradient buffer is averaged across ranks: on CUDA by NCCL on the device (one
//! all-reduce of the whole buffer on the backend's stream), on CPU by MPI's all-reduce in
//! fixed-size host buckets. With ZeRO-1 each rank keeps the AdamW moments of its slice of the
//! parameters only, updates that slice, and each slice is broadcast from its rank.
//!
//! Rank and world come from the launcher: `mpirun`/`srun` (MPI itself says; Open MPI from the
//! system through the `mpi` crate, behind this crate's `mpi` feature), or torchrun's variables
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) for
//! CUDA ranks without MPI. The NCCL id goes over MPI when MPI launched the ranks, otherwise
//! through the TCP rendezvous of [`crate::rendezvous`].
//!
//! Status: the MPI paths run in CI (`mpirun -np 2`); the NCCL id and the rendezvous run in CI
//! too (PyPI's libnccl), but NCCL communicators have not run (no GPU was available to this
//! work).

use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use crate::engine::cuda::{nccl, Nccl, NcclId};
use crate::engine::Cuda;
use crate::{rendezvous, Error, Result};

/// How `codeclm train` finds its ranks (`--dist`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launch {
    /// MPI when a launcher started several processes (`mpirun`, `srun`), else one process.
    Auto,
    /// One process, whatever the environment says.
    Single,
    /// MPI even for one rank (checks the MPI path); CUDA gradients through host memory.
    Mpi,
    /// NCCL for CUDA gradients even for one rank (checks the NCCL path): ranks from MPI,
    /// torchrun's variables, or one process.
    Nccl,
}

/// What the environment says about the launcher: (name, world size) of the first variables
/// found, MPI's own first. `SLURM_NTASKS` counts only when torchrun's `WORLD_SIZE` is absent:
/// torchrun inside a Slurm allocation is a torchrun launch.
fn launcher() -> Option<(&'static str, usize)> {
    let var = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
    };
    let torchrun = std::env::var_os("WORLD_SIZE").is_some();
    [
        ("mpirun (Open MPI)", "OMPI_COMM_WORLD_SIZE"),
        ("an MPI launcher (PMI)", "PMI_SIZE"),
        ("srun (Slurm)", "SLURM_NTASKS"),
    ]
    .into_iter()
    .filter(|(_, k)| !(torchrun && *k == "SLURM_NTASKS"))
    .find_map(|(name, k)| var(k).map(|n| (name, n)))
}

/// A torchrun-style launch: (rank, world, local rank, ranks on this machine) from `RANK`,
/// `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, if `WORLD_SIZE` is set.
fn torchrun_env() -> Result<Option<(usize, usize, usize, usize)>> {
    let var = |k: &str| -> Result<Option<usize>> {
        match std::env::var(k) {
            Err(_) => Ok(None),
            Ok(v) => v.trim().parse().map(Some).map_err(|_| {
                Error::Config(format!(
                    "{k}={v:?} (a torchrun-style launch) is not a number"
                ))
            }),
        }
    };
    let Some(world) = var("WORLD_SIZE")? else {
        return Ok(None);
    };
    let rank = var("RANK")?.ok_or_else(|| {
        Error::Config(format!(
            "WORLD_SIZE={world} but no RANK: a torchrun-style launch sets both on every process"
        ))
    })?;
    if world == 0 || rank >= world {
        return Err(Error::Config(format!(
            "RANK={rank} is not a rank of WORLD_SIZE={world}"
        )));
    }
    let local_rank = var("LOCAL_RANK")?.unwrap_or(0);
    let local_world = var("LOCAL_WORLD_SIZE")?.unwrap_or(1).max(local_rank + 1);
    Ok(Some((rank, world, local_rank, local_world)))
}

enum Comm {
    Single,
    /// Ranks of a torchrun-style launch: their host collectives go through NCCL once bound.
    Env,
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
    /// Whether CUDA ranks average their gradients through NCCL (else through MPI's host
    /// buffers).
    nccl_wanted: bool,
    /// The NCCL communicator, once [`Dist::bind_cuda`] made it.
    nccl: RefCell<Option<Arc<Nccl>>>,
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
            nccl_wanted: false,
            nccl: RefCell::new(None),
        }
    }

    /// The ranks as the launcher started them.
    pub fn init(launch: Launch) -> Result<Dist> {
        let found = launcher();
        let torchrun = torchrun_env()?;
        let mut d = match launch {
            Launch::Single => Dist::single(),
            Launch::Mpi => Self::init_mpi(found)?,
            Launch::Auto if found.is_some_and(|(_, n)| n > 1) => Self::init_mpi(found)?,
            Launch::Nccl if found.is_some() => Self::init_mpi(found)?,
            Launch::Auto | Launch::Nccl => match torchrun {
                Some((rank, world, local_rank, local_world))
                    if world > 1 || launch == Launch::Nccl =>
                {
                    Dist {
                        rank,
                        world,
                        local_rank,
                        local_world,
                        comm: Comm::Env,
                        ..Dist::single()
                    }
                }
                _ => Dist::single(),
            },
        };
        d.nccl_wanted = match launch {
            Launch::Single | Launch::Mpi => false,
            Launch::Nccl => true,
            Launch::Auto => d.world > 1,
        };
        Ok(d)
    }

    /// Whether CUDA gradients go through NCCL ([`Dist::nccl_id`], [`Dist::bind_cuda`]).
    pub fn wants_nccl(&self) -> bool {
        self.nccl_wanted
    }

    /// Whether these ranks can only talk through NCCL (a torchrun-style launch: no MPI), so
    /// must run on CUDA.
    pub fn needs_cuda(&self) -> bool {
        matches!(self.comm, Comm::Env)
    }

    /// The error for a torchrun-style launch on the CPU.
    pub fn cpu_error(&self) -> Error {
        Error::Config(format!(
            "WORLD_SIZE={} (a torchrun-style launch): such ranks talk through NCCL, so they need --device cuda. On CPU, start the ranks with `mpirun -np N codeclm train ...` or `srun codeclm train ...`; or pass --dist none for one process",
            self.world
        ))
    }

    /// The CUDA device of this rank: `asked + LOCAL_RANK` when this machine has several ranks
    /// and shows them several devices; the one device when each rank sees only its own (e.g.
    /// `CUDA_VISIBLE_DEVICES` set per rank by Slurm).
    pub fn cuda_ordinal(&self, asked: usize) -> Result<usize> {
        if self.local_world <= 1 {
            return Ok(asked);
        }
        let n = crate::engine::cuda::device_count()?;
        if n == 1 {
            return Ok(0);
        }
        let ordinal = asked + self.local_rank;
        if ordinal >= n {
            return Err(Error::Config(format!(
                "rank {} is local rank {} of {} on this machine, so it takes cuda:{ordinal}, but the machine shows {n} CUDA device(s). Fix: one rank per GPU (e.g. torchrun --nproc_per_node={n}, mpirun -np {n} per node)",
                self.rank, self.local_rank, self.local_world
            )));
        }
        Ok(ordinal)
    }

    /// The NCCL id of this run on every rank: made by rank 0, carried by MPI or by the TCP
    /// rendezvous (`MASTER_ADDR`, `MASTER_PORT + 1`). Needs libnccl, not a GPU.
    pub fn nccl_id(&self) -> Result<NcclId> {
        let mut id = if self.rank == 0 {
            NcclId::new()?
        } else {
            nccl::check_library()?;
            NcclId([0; nccl::ID_BYTES])
        };
        match &self.comm {
            Comm::Single => {}
            Comm::Env => {
                let tag = rendezvous::job_tag();
                let wait = rendezvous::timeout();
                let at = rendezvous::Endpoint::from_env()?;
                if self.rank == 0 {
                    rendezvous::serve(at.port, self.world, tag, &id.0, wait)?;
                } else {
                    id.0 = rendezvous::fetch(&at, self.rank, self.world, tag, wait)?;
                }
            }
            #[cfg(feature = "mpi")]
            Comm::Mpi { world, .. } => {
                use mpi::traits::*;
                world.process_at_rank(0).broadcast_into(&mut id.0[..]);
            }
        }
        Ok(id)
    }

    /// Makes this rank's NCCL communicator on `cuda` from `id` (every rank calls it; it blocks
    /// until all have) and attaches it to the backend: its gradient average and ZeRO-1
    /// broadcasts then run on the device.
    pub fn bind_cuda(&self, cuda: &Cuda, id: &NcclId) -> Result<()> {
        let comm = Nccl::new(cuda, self.rank, self.world, id)?;
        cuda.attach(comm.clone())?;
        *self.nccl.borrow_mut() = Some(comm);
        Ok(())
    }

    /// Whether an NCCL communicator is bound.
    pub fn has_nccl(&self) -> bool {
        self.nccl.borrow().is_some()
    }

    /// The communicator of a torchrun-style launch's host collectives.
    fn env_nccl(&self) -> Result<Arc<Nccl>> {
        self.nccl.borrow().clone().ok_or_else(|| {
            Error::Config(
                "a torchrun-style launch's ranks talk through NCCL, which is not bound yet (--device cuda makes it)".into(),
            )
        })
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
            nccl_wanted: false,
            nccl: RefCell::new(None),
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

    /// "MPI, rank 1 of 4" or "one process"; "+ NCCL" once a communicator is bound.
    pub fn describe(&self) -> String {
        let nccl = if self.has_nccl() { " + NCCL" } else { "" };
        match self.comm {
            Comm::Single => format!("one process{nccl}"),
            Comm::Env => format!(
                "torchrun-style ranks{nccl}, rank {} of {} ({} on this machine)",
                self.rank, self.world, self.local_world
            ),
            #[cfg(feature = "mpi")]
            Comm::Mpi { .. } => format!(
                "MPI{nccl}, rank {} of {} ({} on this machine)",
                self.rank, self.world, self.local_world
            ),
        }
    }

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
    pub fn all_reduce_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        assert_eq!(
            send.len(),
            recv.len(),
            "all-reduce buffers differ in length"
        );
        match &self.comm {
            Comm::Single => recv.copy_from_slice(send),
            Comm::Env => {
                recv.copy_from_slice(send);
                let c = self.env_nccl()?;
                self.timed(|| c.all_reduce_sum_host(recv))?;
            }
            #[cfg(feature = "mpi")]
            Comm::Mpi { world, .. } => self.timed(|| {
                use mpi::collective::SystemOperation;
                use mpi::traits::*;
                world.all_reduce_into(send, recv, SystemOperation::sum())
            }),
        }
        Ok(())
    }

    /// Averages `x` (at most [`BUCKET`] floats) across ranks in place through host memory,
    /// staging it in `send` (one of [`Dist::with_scratch`]'s buckets).
    pub fn average_in(&self, x: &mut [f32], send: &mut [f32]) -> Result<()> {
        let send = &mut send[..x.len()];
        send.copy_from_slice(x);
        self.all_reduce_sum(send, x)?;
        let inv = 1.0 / self.world as f32;
        x.iter_mut().for_each(|v| *v *= inv);
        Ok(())
    }

    /// Sums `x` across ranks in place (scalars: losses, counts).
    pub fn all_reduce_f64(&self, x: &mut [f64]) -> Result<()> {
        match &self.comm {
            Comm::Single => {}
            Comm::Env => {
                let c = self.env_nccl()?;
                self.timed(|| c.all_reduce_sum_host(x))?;
            }
            #[cfg(feature = "mpi")]
            Comm::Mpi { world, .. } => self.timed(|| {
                use mpi::collective::SystemOperation;
                use mpi::traits::*;
                let send = x.to_vec();
                world.all_reduce_into(&send[..], x, SystemOperation::sum())
            }),
        }
        Ok(())
    }

    /// Rank `r`'s slice of `n` values under ZeRO-1: contiguous, sizes differing by at most one.
    pub fn shard(&self, n: usize, r: usize) -> Range<usize> {
        let (w, r) = (self.world, r.min(self.world));
        (n * r / w)..(n * (r + 1) / w)
    }

    /// Rank `root`'s `buf` into `buf` on every rank.
    pub fn broadcast_from(&self, root: usize, buf: &mut [f32]) -> Result<()> {
        match &self.comm {
            Comm::Single => {}
            Comm::Env => {
                let c = self.env_nccl()?;
                self.timed(|| c.broadcast_host(root, buf))?;
            }
            #[cfg(feature = "mpi")]
            Comm::Mpi { world, .. } => self.timed(|| {
                use mpi::traits::*;
                world.process_at_rank(root as i32).broadcast_into(buf)
            }),
        }
        Ok(())
    }

    /// Every rank's shard into `out` on rank 0 (`out` is ignored elsewhere; it must be as long
    /// as rank 0's).
    pub fn gather_shards(&self, mine: &[f32], out: &mut [f32]) -> Result<()> {
        match &self.comm {
            Comm::Single => out.copy_from_slice(mine),
            Comm::Env => {
                // NCCL has no gather of unequal parts: each shard is broadcast in turn (a
                // checkpoint's cost, not a step's).
                let c = self.env_nccl()?;
                let n = out.len();
                for r in 0..self.world {
                    let part = &mut out[self.shard(n, r)];
                    if r == self.rank {
                        part.copy_from_slice(mine);
                    }
                    self.timed(|| c.broadcast_host(r, part))?;
                }
            }
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
        Ok(())
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
    pub fn barrier(&self) -> Result<()> {
        match &self.comm {
            Comm::Single => {}
            Comm::Env => {
                let c = self.env_nccl()?;
                self.timed(|| c.barrier())?;
            }
            #[cfg(feature = "mpi")]
            Comm::Mpi { world, .. } => self.timed(|| {
                use mpi::traits::*;
                world.barrier()
            }),
        }
        Ok(())
    }

    /// Ends every rank of the job (a failed rank: the others wait in a collective). A
    /// torchrun-style launcher ends the others when one exits with an error.
    pub fn abort(&self, code: i32) -> ! {
        match &self.comm {
            Comm::Single | Comm::Env => std::process::exit(code),
            #[cfg(feature = "mpi")]
            Comm::Mpi { world, .. } => {
                use mpi::traits::*;
                world.abort(code)
            }
        }
    }

    /// Rank 0's `value` on every rank (a decision only rank 0 can make: stop on an error).
    pub fn broadcast_flag(&self, value: bool) -> Result<bool> {
        let mut v = [value as u8];
        match &self.comm {
            Comm::Single => {}
            Comm::Env => self.env_nccl()?.broadcast_host(0, &mut v)?,
            #[cfg(feature = "mpi")]
            Comm::Mpi { world, .. } => {
                use mpi::traits::*;
                world.process_at_rank(0).broadcast_into(&mut v[..]);
            }
        }
        Ok(v[0] != 0)
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
        d.all_reduce_sum(&[1.0, 2.0, 3.0], &mut out).unwrap();
        assert_eq!(out, [1.0, 2.0, 3.0]);
        d.broadcast_from(0, &mut out).unwrap();
        assert_eq!(out, [1.0, 2.0, 3.0]);
        assert!(d.broadcast_flag(true).unwrap());
    }
}
