//! NCCL between the CUDA ranks of a data-parallel run, through cudarc's bindings with libnccl
//! opened at run time (nothing links it; a missing library is an error naming the fix). A
//! [`Nccl`] is one rank's communicator on one [`Cuda`] device, on that backend's stream, so its
//! collectives are ordered with the kernels around them; it is attached to the backend
//! ([`Cuda::attach`]) for the device collectives of [`Backend::all_average`] and
//! [`Backend::broadcast`], and offers host-side collectives (losses, flags, the ZeRO-1
//! gather) for runs that have no MPI.
//!
//! Status: the library probe, the version and the unique id run in CI against PyPI's libnccl
//! (they need no GPU); communicators and collectives have not run yet (no GPU was available to
//! this work).
//!
//! [`Backend::all_average`]: crate::Backend::all_average
//! [`Backend::broadcast`]: crate::Backend::broadcast

use std::ffi::CStr;
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::{result as nr, sys, NcclType};

use super::Cuda;
use crate::{Error, Result};

/// Bytes of an NCCL unique id (`ncclUniqueId`).
pub const ID_BYTES: usize = 128;

/// The id every rank of one communicator is made from: rank 0 makes it, the launcher's channel
/// (MPI, or the TCP rendezvous of a torchrun-style launch) carries it to the others.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId(pub [u8; ID_BYTES]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclId({:016x})", self.digest())
    }
}

impl NcclId {
    /// A fresh id (libnccl only: no GPU is needed).
    pub fn new() -> Result<NcclId> {
        check_library()?;
        let id = nr::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", &e))?;
        let mut out = [0u8; ID_BYTES];
        for (o, c) in out.iter_mut().zip(id.internal.iter()) {
            *o = *c as u8;
        }
        Ok(NcclId(out))
    }

    /// FNV-1a of the bytes: what ranks print to show they hold the same id.
    pub fn digest(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in &self.0 {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
        }
        h
    }

    fn raw(&self) -> sys::ncclUniqueId {
        let mut internal = [0 as std::ffi::c_char; ID_BYTES];
        for (o, b) in internal.iter_mut().zip(self.0) {
            *o = b as std::ffi::c_char;
        }
        sys::ncclUniqueId { internal }
    }
}

/// NCCL's text for an error code (the library is loaded when this is asked).
fn nccl_error(call: &str, e: &nr::NcclError) -> Error {
    // Safety: ncclGetErrorString returns a static string for any code.
    let text = unsafe {
        let p = sys::ncclGetErrorString(e.0);
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    Error::Device(format!(
        "{call} failed: {:?} ({text}); NCCL_DEBUG=INFO shows why",
        e.0
    ))
}

/// Directories where a `libnccl.so.2` usually is: `LD_LIBRARY_PATH`, the system's, the CUDA
/// toolkit's, conda's and the `nvidia-nccl-cu*` wheels' of Python environments.
fn nccl_candidates() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect();
    for d in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/local/lib",
        "/usr/local/cuda/lib64",
    ] {
        dirs.push(d.into());
    }
    let mut prefixes: Vec<PathBuf> = ["/usr/lib", "/usr/local/lib"]
        .iter()
        .map(PathBuf::from)
        .collect();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(p) = std::env::var_os(var) {
            dirs.push(PathBuf::from(&p).join("lib"));
            prefixes.push(PathBuf::from(p).join("lib"));
        }
    }
    // Python installations on PATH (bin/..), and pyenv's.
    for d in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        if d.ends_with("bin") {
            if let Some(p) = d.parent() {
                prefixes.push(p.join("lib"));
            }
        }
    }
    if let Some(h) = std::env::var_os("HOME") {
        let h = PathBuf::from(h);
        prefixes.push(h.join(".local/lib"));
        if let Ok(rd) = std::fs::read_dir(h.join(".pyenv/versions")) {
            prefixes.extend(rd.flatten().map(|e| e.path().join("lib")));
        }
    }
    for pre in prefixes {
        let Ok(rd) = std::fs::read_dir(&pre) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("python3") {
                for site in ["site-packages", "dist-packages"] {
                    dirs.push(e.path().join(site).join("nvidia/nccl/lib"));
                }
            }
        }
    }
    dirs
}

/// Checks that libnccl can be opened under a name cudarc looks for (`libnccl.so`, ...); if not,
/// names a `libnccl.so.2` found on this machine and the link that makes it loadable.
pub fn check_library() -> Result<()> {
    // Safety: only tries to dlopen candidate names.
    if unsafe { sys::is_culib_present() } {
        return Ok(());
    }
    let found = nccl_candidates()
        .into_iter()
        .map(|d| d.join("libnccl.so.2"))
        .find(|p| p.is_file());
    Err(Error::Device(match found {
        Some(p) => format!(
            "NCCL: cannot load libnccl.so, but {} is here (the pip wheels and PyTorch ship only the .so.2 name). Fix: mkdir -p ~/.cache/codeclm/lib && ln -sf {} ~/.cache/codeclm/lib/libnccl.so && export LD_LIBRARY_PATH=~/.cache/codeclm/lib:$LD_LIBRARY_PATH",
            p.display(),
            p.display()
        ),
        None => "NCCL: cannot load libnccl.so. Fix: pip install nvidia-nccl-cu13 (then link its nvidia/nccl/lib/libnccl.so.2 as libnccl.so on LD_LIBRARY_PATH), or install NVIDIA's libnccl-dev; or run the ranks with --dist mpi (gradients through host memory)".into(),
    }))
}

/// The loaded libnccl's version ("2.23.4").
pub fn version() -> Result<String> {
    check_library()?;
    let v = nr::get_nccl_version().map_err(|e| nccl_error("ncclGetVersion", &e))?;
    // NCCL >= 2.9 encodes major * 10000 + minor * 100 + patch.
    Ok(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
}

/// One rank's NCCL communicator on a CUDA device.
pub struct Nccl {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    pub rank: usize,
    pub world: usize,
}

// Safety: the communicator is used by one thread at a time (the trainer's), and NCCL allows a
// communicator to move between threads; the raw pointer is what keeps the compiler from
// knowing that.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl Drop for Nccl {
    fn drop(&mut self) {
        // Safety: the communicator was made by ncclCommInitRank and is destroyed once.
        unsafe {
            let _ = self.stream.synchronize();
            let _ = nr::comm_destroy(self.comm);
        }
    }
}

impl Nccl {
    /// Rank `rank` of `world` on `cuda`'s device, from the id every rank was given (blocks until
    /// every rank has joined).
    pub fn new(cuda: &Cuda, rank: usize, world: usize, id: &NcclId) -> Result<Arc<Nccl>> {
        check_library()?;
        let stream = cuda.stream().cloned().ok_or_else(|| {
            Error::Device("the emulated CUDA device (CODECLM_CUDA_EMULATE) has no NCCL; use --dist mpi or none".into())
        })?;
        cuda.bind();
        let mut comm = std::mem::MaybeUninit::uninit();
        // Safety: comm is written by NCCL on success; world and rank fit an i32 (checked).
        let comm = unsafe {
            nr::comm_init_rank(
                comm.as_mut_ptr(),
                i32::try_from(world).map_err(|_| Error::Device(format!("NCCL: {world} ranks")))?,
                id.raw(),
                rank as i32,
            )
            .map_err(|e| nccl_error("ncclCommInitRank", &e))?;
            comm.assume_init()
        };
        Ok(Arc::new(Nccl {
            comm,
            stream,
            rank,
            world,
        }))
    }

    fn check(
        &self,
        call: &str,
        r: std::result::Result<nr::NcclStatus, nr::NcclError>,
    ) -> Result<()> {
        r.map(|_| ()).map_err(|e| {
            // Safety: the communicator is live; the string is NCCL's.
            let last = unsafe {
                let p = sys::ncclGetLastError(self.comm);
                if p.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(p).to_string_lossy().into_owned()
                }
            };
            let base = nccl_error(call, &e);
            Error::Device(format!("{base}: {last}"))
        })
    }

    /// Averages `n` f32 at device address `ptr` across the ranks, in place, on the stream.
    pub(super) fn average_raw(&self, ptr: u64, n: usize) -> Result<()> {
        // Safety: the caller passes n floats of its own device buffer.
        let r = unsafe {
            nr::all_reduce(
                ptr as *const _,
                ptr as *mut _,
                n,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclAvg,
                self.comm,
                self.stream.cu_stream() as _,
            )
        };
        self.check("ncclAllReduce", r)
    }

    /// Rank `root`'s `n` f32 at `ptr` into `ptr` on every rank, on the stream.
    pub(super) fn broadcast_raw(&self, root: usize, ptr: u64, n: usize) -> Result<()> {
        // Safety: as average_raw.
        let r = unsafe {
            nr::broadcast(
                ptr as *const _,
                ptr as *mut _,
                n,
                sys::ncclDataType_t::ncclFloat32,
                root as i32,
                self.comm,
                self.stream.cu_stream() as _,
            )
        };
        self.check("ncclBroadcast", r)
    }

    /// Sums host `x` across the ranks (losses, counts): through a device copy.
    pub fn all_reduce_sum_host<T: NcclType + DeviceRepr + ValidAsZeroBits>(
        &self,
        x: &mut [T],
    ) -> Result<()> {
        self.host_collective("ncclAllReduce", x, |p, n| unsafe {
            // Safety: p holds n values of T on this device.
            nr::all_reduce(
                p as *const _,
                p as *mut _,
                n,
                T::as_nccl_type(),
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                self.stream.cu_stream() as _,
            )
        })
    }

    /// Rank `root`'s host `x` into `x` on every rank (flags, the ZeRO-1 gather).
    pub fn broadcast_host<T: NcclType + DeviceRepr + ValidAsZeroBits>(
        &self,
        root: usize,
        x: &mut [T],
    ) -> Result<()> {
        self.host_collective("ncclBroadcast", x, |p, n| unsafe {
            // Safety: as all_reduce_sum_host.
            nr::broadcast(
                p as *const _,
                p as *mut _,
                n,
                T::as_nccl_type(),
                root as i32,
                self.comm,
                self.stream.cu_stream() as _,
            )
        })
    }

    /// Copies `x` to the device, runs `op(ptr, len)` on it, copies it back and waits.
    fn host_collective<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        call: &str,
        x: &mut [T],
        op: impl FnOnce(u64, usize) -> std::result::Result<nr::NcclStatus, nr::NcclError>,
    ) -> Result<()> {
        if x.is_empty() {
            return Ok(());
        }
        let dev = |e| Error::Device(format!("{call} of host values: {e:?}"));
        let buf = self.stream.clone_htod(x).map_err(dev)?;
        {
            let (p, _record) = buf.device_ptr(&self.stream);
            self.check(call, op(p, x.len()))?;
        }
        self.stream.memcpy_dtoh(&buf, x).map_err(dev)?;
        self.stream.synchronize().map_err(dev)
    }

    /// Waits for every rank (an all-reduce of one value).
    pub fn barrier(&self) -> Result<()> {
        self.all_reduce_sum_host(&mut [0u8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With libnccl loadable (CI installs PyPI's nvidia-nccl-cu13 and links it as libnccl.so),
    /// the version reads and rank 0's unique id is made (neither needs a GPU); two ids differ.
    /// Without it the error names the library and the fix.
    #[test]
    fn nccl_version_and_unique_id_need_no_gpu() {
        // Safety: only probes for the library.
        if !unsafe { sys::is_culib_present() } {
            let e = NcclId::new().unwrap_err().to_string();
            assert!(e.contains("libnccl.so") && e.contains("Fix:"), "{e}");
            if std::env::var_os("CODECLM_REQUIRE_NCCL").is_some() {
                panic!("CODECLM_REQUIRE_NCCL is set but libnccl cannot be loaded: {e}");
            }
            eprintln!("libnccl not found: NCCL not checked ({e})");
            return;
        }
        let v = version().unwrap();
        let major: u32 = v.split('.').next().unwrap().parse().unwrap();
        assert_eq!(major, 2, "{v}");
        let (a, b) = (NcclId::new().unwrap(), NcclId::new().unwrap());
        assert!(a.0.iter().any(|&x| x != 0), "an id of zeros");
        assert_ne!(a, b, "two unique ids are equal");
    }
}
