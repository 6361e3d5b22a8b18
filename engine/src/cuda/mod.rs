//! The CUDA backend: device buffers through cudarc with dynamic loading (the binary links no
//! CUDA library and starts anywhere; libcuda, NVRTC and cuBLAS are opened when a `Cuda` is
//! made, and a missing one is an error naming the library and where it comes from), the
//! kernels of `kernels.cu` compiled at first use by NVRTC for the device's architecture (PTX
//! cached on disk), and matmuls in bf16 with f32 accumulation through cuBLASLt ([`lt`],
//! [`Cuda::enable_bf16`]) or in f32 through cuBLAS (no TF32: the parity mode, the default of a
//! bare `Cuda`; the trainer asks for bf16 unless `--precision f32`).
//!
//! Status: compiled and its kernels compiled by NVRTC for sm_80 and sm_90 in CI, and the kernels
//! with this module's glue run in CI on the emulated device of [`emu`] (`CODECLM_CUDA_EMULATE=1`:
//! the same CUDA C on the CPU) against the CPU backend; it has not run on a GPU yet (none was
//! available to this work). The kernels are the CPU backend's, one thread per element or one
//! block per row; attention is tiled through shared memory (flash style, heads up to 128) for
//! training and for the KV cache's prefill (the backward in two kernels without atomics), and one
//! warp per query row for decode steps and larger heads.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::driver::{
    result as dr, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr,
    DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};

pub mod emu;
pub mod lt;
pub mod nccl;
pub use nccl::{Nccl, NcclId};

use crate::backend::{AdamW, Attention, Backend, Matmul, Span, View, Window};
use crate::{Error, Result};

/// The kernels' CUDA C source.
pub const KERNELS: &str = include_str!("kernels.cu");

/// Every kernel `kernels.cu` defines (the CI check compiles the source and finds each).
pub const KERNEL_NAMES: &[&str] = &[
    "fill_f32",
    "add_assign_f32",
    "embedding_forward",
    "embedding_backward",
    "rmsnorm_forward",
    "rmsnorm_backward_dx",
    "rmsnorm_backward_dw",
    "rope",
    "attention_forward",
    "attention_backward",
    "flash_attend",
    "flash_backward_dq",
    "flash_backward_dkv",
    "flash_attend_bf16",
    "flash_backward_dq_bf16",
    "flash_backward_dkv_bf16",
    "kv_store",
    "swiglu_forward",
    "swiglu_backward",
    "cross_entropy",
    "sum_squares",
    "adamw",
    "f32_to_bf16",
    "im2col",
    "bias_relu",
    "pool",
    "copy_columns",
    "global_avg_pool",
];

/// Largest head dimension the attention kernels take (8 values per lane of a warp).
pub const MAX_HEAD_DIM: usize = 256;

/// The tiled (flash) attention kernels: query rows per block, largest head dimension (`FQ`,
/// `FD` of kernels.cu); larger heads go through the warp kernels.
const FLASH_ROWS: usize = 64;
const FLASH_MAX_HEAD_DIM: usize = 128;

/// Where each library comes from, for the error that names a missing one.
fn missing(lib: &str, fix: &str) -> Error {
    Error::Device(format!(
        "--device cuda: cannot load {lib}. Fix: {fix} (and put its directory on LD_LIBRARY_PATH)"
    ))
}

/// Checks that the driver, NVRTC and cuBLAS can be loaded, without touching them (cudarc
/// panics on a missing library at first use; this is asked first).
pub fn check_libraries() -> Result<()> {
    // Safety: these only try to dlopen candidate names.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            return Err(missing(
                "libcuda.so.1 (the NVIDIA driver)",
                "run on a machine with an NVIDIA GPU and its driver (a container needs the GPU passed through, e.g. --gpus all)",
            ));
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            return Err(missing(
                "libnvrtc.so.13 (NVRTC, CUDA 13)",
                "pip install nvidia-cuda-nvrtc==13.0.* (its nvidia/cu13/lib) or install the CUDA 13 toolkit",
            ));
        }
        if !cudarc::cublas::sys::is_culib_present() {
            return Err(missing(
                "libcublas.so.13 (cuBLAS, CUDA 13)",
                "pip install nvidia-cublas==13.0.* (its nvidia/cu13/lib) or install the CUDA 13 toolkit",
            ));
        }
    }
    Ok(())
}

/// CUDA devices this process sees (after `CUDA_VISIBLE_DEVICES`); the libraries are checked
/// first.
pub fn device_count() -> Result<usize> {
    if emu::enabled() {
        return Ok(1);
    }
    check_libraries()?;
    CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .map_err(|e| Error::Device(format!("counting CUDA devices: {e:?}")))
}

/// PTX of the kernels for `arch` (e.g. "sm_90"), through NVRTC; cached under
/// `~/.cache/codeclm/cuda/` by a hash of the source and the architecture.
pub fn kernels_ptx(arch: &str) -> Result<String> {
    // FNV-1a: a stable key (the cache outlives builds).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in KERNELS.bytes().chain(arch.bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
    }
    let dir = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("codeclm").join("cuda"));
    let path = dir
        .as_ref()
        .map(|d| d.join(format!("kernels-{arch}-{h:016x}.ptx")));
    if let Some(p) = &path {
        if let Ok(ptx) = std::fs::read_to_string(p) {
            return Ok(ptx);
        }
    }
    let ptx = compile(arch)?;
    if let (Some(d), Some(p)) = (&dir, &path) {
        // A cache: failing to write it costs a recompile next time, nothing else.
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::create_dir_all(d).is_ok() && std::fs::write(&tmp, &ptx).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
    Ok(ptx)
}

/// Compiles the kernels with NVRTC (no GPU needed) for `arch`.
pub fn compile(arch: &str) -> Result<String> {
    // Safety: only probes for the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(missing(
            "libnvrtc.so.13 (NVRTC, CUDA 13)",
            "pip install nvidia-cuda-nvrtc==13.0.* (its nvidia/cu13/lib) or install the CUDA 13 toolkit",
        ));
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(Box::leak(arch.to_string().into_boxed_str())),
        fmad: Some(true),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNELS, opts).map_err(|e| {
        Error::Device(format!(
            "NVRTC could not compile the kernels for {arch}: {e:?}"
        ))
    })?;
    let src = ptx.to_src();
    for name in KERNEL_NAMES {
        if !src.contains(&format!(".entry {name}(")) {
            return Err(Error::Device(format!(
                "the kernels compiled for {arch} lack `{name}`"
            )));
        }
    }
    Ok(src)
}

/// Device memory of T: on the GPU, or host memory on the emulated device.
enum Mem<T> {
    Gpu(CudaSlice<T>),
    Host(emu::HostMem<T>),
}

/// f32 device memory.
pub struct CudaBuf {
    mem: Mem<f32>,
}

/// u32 token ids in device memory.
pub struct CudaIds {
    mem: Mem<u32>,
    len: usize,
}

/// The window geometry as the kernels take it (`struct Window` of kernels.cu).
#[repr(C)]
#[derive(Clone, Copy)]
struct KWindow {
    batch: i32,
    h: i32,
    w: i32,
    c: i32,
    kh: i32,
    kw: i32,
    stride: i32,
    pad_h: i32,
    pad_w: i32,
}

// Safety: plain old data of i32s, the layout of the kernels' struct.
unsafe impl DeviceRepr for KWindow {}

impl From<Window> for KWindow {
    fn from(g: Window) -> Self {
        KWindow {
            batch: g.batch as i32,
            h: g.h as i32,
            w: g.w as i32,
            c: g.c as i32,
            kh: g.kh as i32,
            kw: g.kw as i32,
            stride: g.stride as i32,
            pad_h: g.pad_h as i32,
            pad_w: g.pad_w as i32,
        }
    }
}

struct Blas(cudarc::cublas::CudaBlas);
// Safety: the handle is used from one thread at a time (behind the backend's mutex).
unsafe impl Send for Blas {}

/// A bf16 buffer and its capacity in elements.
type Scratch16 = (Mem<u16>, usize);

/// The device behind a [`Cuda`] backend.
enum Dev {
    /// A GPU through the driver: the kernels' module and cuBLAS on one stream.
    Gpu {
        stream: Arc<CudaStream>,
        _module: Arc<CudaModule>,
        funcs: std::collections::HashMap<&'static str, CudaFunction>,
        blas: Mutex<Blas>,
        /// cuBLASLt for the bf16 matmuls, made at the first one.
        lt: lt::LtCell,
    },
    /// The emulated device (`CODECLM_CUDA_EMULATE=1`): the same kernels on the CPU.
    Emu(emu::Emu),
}

/// A CUDA device and its kernels.
pub struct Cuda {
    ordinal: usize,
    arch: String,
    dev: Dev,
    /// The first device error, reported by [`Cuda::status`]; later calls are skipped.
    failed: Mutex<Option<String>>,
    /// The ranks' communicator of a data-parallel run (NCCL), once attached.
    comm: OnceLock<Arc<Nccl>>,
    /// Matmuls in bf16 with f32 accumulation ([`Cuda::enable_bf16`]); f32 otherwise.
    bf16: AtomicBool,
    /// The bf16 copies of a matmul's inputs (grown as needed, kept).
    scratch16: Mutex<[Option<Scratch16>; 3]>,
}

fn blocks(n: usize, per: u32) -> u32 {
    (n.div_ceil(per as usize)).clamp(1, 65_535 * 16) as u32
}

impl Cuda {
    /// Device `ordinal`: the libraries loaded, the context made, the kernels compiled (or read
    /// from the cache) for its architecture. With `CODECLM_CUDA_EMULATE=1`, the emulated device
    /// instead ([`emu`]: the same kernels and glue on the CPU, for machines without a GPU).
    pub fn new(ordinal: usize) -> Result<Cuda> {
        if emu::enabled() {
            return Cuda::emulated();
        }
        check_libraries()?;
        let dev = |e: dr::DriverError| Error::Device(format!("CUDA device {ordinal}: {e:?}"));
        let n = CudaContext::device_count().map_err(dev)?;
        if ordinal as i32 >= n {
            return Err(Error::Device(format!(
                "--device cuda:{ordinal}: this machine has {n} CUDA device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(dev)?;
        // One stream: no cross-stream events needed.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability().map_err(dev)?;
        let arch = format!("sm_{major}{minor}");
        let ptx = kernels_ptx(&arch)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(dev)?;
        let mut funcs = std::collections::HashMap::new();
        for &name in KERNEL_NAMES {
            funcs.insert(name, module.load_function(name).map_err(dev)?);
        }
        let stream = ctx.default_stream();
        let blas = cudarc::cublas::CudaBlas::new(stream.clone())
            .map_err(|e| Error::Device(format!("cuBLAS on CUDA device {ordinal}: {e:?}")))?;
        Ok(Cuda {
            ordinal,
            arch,
            dev: Dev::Gpu {
                stream,
                _module: module,
                funcs,
                blas: Mutex::new(Blas(blas)),
                lt: Mutex::new(None),
            },
            failed: Mutex::new(None),
            comm: OnceLock::new(),
            bf16: AtomicBool::new(false),
            scratch16: Mutex::new([None, None, None]),
        })
    }

    /// The emulated device: kernels.cu compiled by the host C++ compiler, run on the CPU.
    pub fn emulated() -> Result<Cuda> {
        Ok(Cuda {
            ordinal: 0,
            arch: "emulated".into(),
            dev: Dev::Emu(emu::Emu::load()?),
            failed: Mutex::new(None),
            comm: OnceLock::new(),
            bf16: AtomicBool::new(false),
            scratch16: Mutex::new([None, None, None]),
        })
    }

    /// Matmuls in bf16 (inputs rounded to bf16 on the device, f32 accumulation and output,
    /// through cuBLASLt) or in f32 (cuBLAS, no TF32: the parity mode, the default).
    pub fn enable_bf16(&self, on: bool) -> Result<()> {
        // Safety: only probes for the library.
        if on && !self.is_emulated() && !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            return Err(missing(
                "libcublasLt.so.13 (cuBLASLt, CUDA 13; the bf16 matmuls)",
                "pip install nvidia-cublas==13.0.* (its nvidia/cu13/lib), install the CUDA 13 toolkit, or train with --precision f32",
            ));
        }
        self.bf16.store(on, Ordering::Relaxed);
        Ok(())
    }

    /// Whether matmuls run in bf16.
    pub fn is_bf16(&self) -> bool {
        self.bf16.load(Ordering::Relaxed)
    }

    /// `n` floats at `src` rounded to bf16 into scratch buffer `which` (grown when too small);
    /// its device address.
    fn to_bf16(&self, which: usize, src: u64, n: usize) -> std::result::Result<u64, String> {
        let mut s = self.scratch16.lock().unwrap_or_else(|e| e.into_inner());
        if s[which].as_ref().is_none_or(|(_, cap)| *cap < n) {
            // Room for growth: the next larger shape does not reallocate at once.
            let cap = n.next_power_of_two();
            s[which] = Some((self.alloc_mem::<u16>(cap)?, cap));
        }
        let dst = self.mem_ptr(&s[which].as_ref().expect("allocated above").0);
        drop(s);
        self.elementwise(
            "f32_to_bf16",
            n,
            &[Arg::P(dst), Arg::P(src), Arg::P(n as u64)],
        );
        Ok(dst)
    }

    /// Whether this is the emulated device.
    pub fn is_emulated(&self) -> bool {
        matches!(self.dev, Dev::Emu(_))
    }

    /// The GPU's stream (none on the emulated device).
    fn stream(&self) -> Option<&Arc<CudaStream>> {
        match &self.dev {
            Dev::Gpu { stream, .. } => Some(stream),
            Dev::Emu(_) => None,
        }
    }

    /// Waits for the device's queued work.
    fn sync(&self) -> std::result::Result<(), String> {
        match self.stream() {
            Some(s) => s.synchronize().map_err(|e| format!("{e:?}")),
            None => Ok(()),
        }
    }

    /// `len` zeroed elements of device memory.
    fn alloc_mem<T: DeviceRepr + ValidAsZeroBits + Copy + Default>(
        &self,
        len: usize,
    ) -> std::result::Result<Mem<T>, String> {
        match self.stream() {
            Some(s) => s
                .alloc_zeros::<T>(len.max(1))
                .map(Mem::Gpu)
                .map_err(|e| format!("{e:?}")),
            None => Ok(Mem::Host(emu::HostMem::zeroed(len.max(1)))),
        }
    }

    fn mem_ptr<T>(&self, m: &Mem<T>) -> u64 {
        match (m, self.stream()) {
            (Mem::Gpu(s), Some(st)) => s.device_ptr(st).0,
            (Mem::Host(h), _) => h.addr(),
            (Mem::Gpu(_), None) => unreachable!("GPU memory on the emulated device"),
        }
    }

    /// Host `src` to device address `dst`, complete on return.
    fn htod<T: DeviceRepr + Copy>(&self, dst: u64, src: &[T]) -> std::result::Result<(), String> {
        match self.stream() {
            Some(_) => {
                self.bind();
                // Safety: the caller passes an address with room for src.
                unsafe { dr::memcpy_htod_sync(dst, src) }.map_err(|e| format!("{e:?}"))
            }
            None => {
                // Safety: as above, a host address of the emulated device.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut T, src.len()) };
                Ok(())
            }
        }
    }

    /// Device address `src` to host `dst` after the queued work, complete on return.
    fn dtoh<T: DeviceRepr + Copy>(
        &self,
        dst: &mut [T],
        src: u64,
    ) -> std::result::Result<(), String> {
        self.sync()?;
        match self.stream() {
            Some(_) => {
                self.bind();
                // Safety: the caller passes an address holding dst.len() values.
                unsafe { dr::memcpy_dtoh_sync(dst, src) }.map_err(|e| format!("{e:?}"))
            }
            None => {
                // Safety: as above.
                unsafe {
                    std::ptr::copy_nonoverlapping(src as *const T, dst.as_mut_ptr(), dst.len())
                };
                Ok(())
            }
        }
    }

    /// Attaches the communicator of a data-parallel run: from then on
    /// [`Backend::all_average`] and [`Backend::broadcast`] run through it on the device. Once
    /// per backend.
    pub fn attach(&self, comm: Arc<Nccl>) -> Result<()> {
        self.comm.set(comm).map_err(|_| {
            Error::Device(format!(
                "CUDA device {}: a communicator is attached already",
                self.ordinal
            ))
        })
    }

    /// The device's ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The first device error since this backend was made (kernels launch asynchronously).
    fn first_error(&self) -> Result<()> {
        if let Err(e) = self.sync() {
            self.fail(e);
        }
        match self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            Some(e) => Err(Error::Device(format!("CUDA device {}: {e}", self.ordinal))),
            None => Ok(()),
        }
    }

    fn fail(&self, e: String) {
        let mut f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(e);
        }
    }

    fn ok(&self) -> bool {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }

    /// Makes the context current on this thread (raw driver calls need it; launches do it).
    fn bind(&self) {
        if let Some(s) = self.stream() {
            if let Err(e) = s.context().bind_to_thread() {
                self.fail(format!("binding the context: {e:?}"));
            }
        }
    }

    fn ptr(&self, v: View<Self>) -> u64 {
        self.mem_ptr(&v.buf.mem) + (v.span.off * 4) as u64
    }

    fn ids_ptr(&self, ids: &CudaIds) -> u64 {
        self.mem_ptr(&ids.mem)
    }

    /// Launches `name` with `grid` x `block` threads and `args` in its signature's order.
    fn launch(&self, name: &'static str, grid: u32, block: u32, args: &[Arg]) {
        if !self.ok() {
            return;
        }
        let (stream, funcs) = match &self.dev {
            Dev::Gpu { stream, funcs, .. } => (stream, funcs),
            Dev::Emu(e) => {
                let mut vals: Vec<Arg> = args.to_vec();
                let mut ptrs: Vec<*mut std::ffi::c_void> = vals
                    .iter_mut()
                    .map(|a| match a {
                        Arg::P(x) => x as *mut u64 as *mut _,
                        Arg::I(x) => x as *mut i32 as *mut _,
                        Arg::F(x) => x as *mut f32 as *mut _,
                        Arg::W(x) => x as *mut KWindow as *mut _,
                    })
                    .collect();
                if let Err(msg) = e.launch(name, grid, block, &mut ptrs) {
                    self.fail(format!("{name} (emulated): {msg}"));
                }
                return;
            }
        };
        let f = &funcs[name];
        let mut b = stream.launch_builder(f);
        for a in args {
            match a {
                Arg::P(x) => b.arg(x),
                Arg::I(x) => b.arg(x),
                Arg::F(x) => b.arg(x),
                Arg::W(x) => b.arg(x),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // Safety: every kernel's arguments are pushed in its signature's order, pointers
        // into live buffers of the sizes the views say.
        if let Err(e) = unsafe { b.launch(cfg) } {
            self.fail(format!("{name}: {e:?}"));
        }
    }

    fn elementwise(&self, name: &'static str, n: usize, args: &[Arg]) {
        self.launch(name, blocks(n, 256).min(65_535), 256, args);
    }

    fn warps(&self, name: &'static str, warps: usize, args: &[Arg]) {
        self.launch(name, blocks(warps * 32, 128), 128, args);
    }
}

/// A kernel argument: a device pointer (or a u64 count), an int, a float, a window.
#[derive(Clone, Copy)]
enum Arg {
    P(u64),
    I(i32),
    F(f32),
    W(KWindow),
}

impl Backend for Cuda {
    type Buf = CudaBuf;
    type Ids = CudaIds;

    fn name(&self) -> String {
        let mm = if self.is_bf16() {
            "bf16 matmuls, cuBLASLt"
        } else {
            "f32, cuBLAS"
        };
        format!("cuda:{} ({}, {mm})", self.ordinal, self.arch)
    }

    fn status(&self) -> Result<()> {
        self.first_error()
    }

    fn set_bf16(&self, on: bool) -> Result<bool> {
        self.enable_bf16(on)?;
        Ok(on)
    }

    fn all_average(&self, x: View<Self>) -> bool {
        let Some(comm) = self.comm.get() else {
            return false;
        };
        if self.ok() && !x.is_empty() {
            self.bind();
            if let Err(e) = comm.average_raw(self.ptr(x), x.len()) {
                self.fail(e.to_string());
            }
        }
        true
    }

    fn broadcast(&self, root: usize, x: View<Self>) -> bool {
        let Some(comm) = self.comm.get() else {
            return false;
        };
        if self.ok() && !x.is_empty() {
            self.bind();
            if let Err(e) = comm.broadcast_raw(root, self.ptr(x), x.len()) {
                self.fail(e.to_string());
            }
        }
        true
    }

    fn alloc(&self, len: usize) -> Result<CudaBuf> {
        let mem = self.alloc_mem::<f32>(len).map_err(|e| {
            Error::OutOfMemory(format!(
                "cannot allocate {len} floats ({:.2} GiB) on CUDA device {}: {e}; use a smaller --batch or --context",
                len as f64 * 4.0 / (1u64 << 30) as f64,
                self.ordinal
            ))
        })?;
        Ok(CudaBuf { mem })
    }

    fn alloc_ids(&self, len: usize) -> Result<CudaIds> {
        let mem = self.alloc_mem::<u32>(len).map_err(|e| {
            Error::OutOfMemory(format!(
                "cannot allocate {len} ids on CUDA device {}: {e}",
                self.ordinal
            ))
        })?;
        Ok(CudaIds { mem, len })
    }

    fn upload(&self, dst: View<Self>, src: &[f32]) {
        assert!(
            src.len() <= dst.len(),
            "upload of {} into {}",
            src.len(),
            dst.len()
        );
        if !self.ok() || src.is_empty() {
            return;
        }
        // The view lies in its buffer (asserted); the copy completes before the call returns.
        if let Err(e) = self.htod(self.ptr(dst), src) {
            self.fail(format!("upload: {e}"));
        }
    }

    fn download(&self, src: View<Self>, dst: &mut [f32]) {
        assert!(
            dst.len() <= src.len(),
            "download of {} from {}",
            dst.len(),
            src.len()
        );
        if !self.ok() || dst.is_empty() {
            dst.fill(f32::NAN);
            return;
        }
        if let Err(e) = self.dtoh(dst, self.ptr(src)) {
            self.fail(format!("download: {e}"));
            dst.fill(f32::NAN);
        }
    }

    fn upload_ids(&self, dst: &CudaIds, src: &[u32]) {
        assert!(src.len() <= dst.len, "{} ids into {}", src.len(), dst.len);
        if !self.ok() || src.is_empty() {
            return;
        }
        if let Err(e) = self.htod(self.ids_ptr(dst), src) {
            self.fail(format!("upload_ids: {e}"));
        }
    }

    fn fill(&self, x: View<Self>, value: f32) {
        let (p, n) = (self.ptr(x), x.len() as u64);
        self.elementwise("fill_f32", x.len(), &[Arg::P(p), Arg::P(n), Arg::F(value)]);
    }

    fn add_assign(&self, dst: View<Self>, src: View<Self>) {
        assert_eq!(dst.len(), src.len());
        let (d, s, n) = (self.ptr(dst), self.ptr(src), dst.len() as u64);
        self.elementwise(
            "add_assign_f32",
            dst.len(),
            &[Arg::P(d), Arg::P(s), Arg::P(n)],
        );
    }

    fn matmul(&self, c: View<Self>, a: View<Self>, b: View<Self>, mm: Matmul) {
        let Matmul {
            m,
            n,
            k,
            accumulate,
            ..
        } = mm;
        assert!(
            c.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
            "matmul {mm:?}"
        );
        if !self.ok() || m == 0 || n == 0 {
            return;
        }
        // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T (GemmPlan).
        let plan = lt::GemmPlan::of(mm);
        let (pa, pb, pc) = (self.ptr(a), self.ptr(b), self.ptr(c));
        if self.is_bf16() {
            let r = self
                .to_bf16(0, pa, m * k)
                .and_then(|a16| Ok((a16, self.to_bf16(1, pb, k * n)?)))
                .and_then(|(a16, b16)| match &self.dev {
                    Dev::Gpu { stream, lt, .. } => {
                        let mut g = lt.lock().unwrap_or_else(|e| e.into_inner());
                        if g.is_none() {
                            *g = Some(lt::Lt::new(stream)?);
                        }
                        let lt = g.as_mut().expect("made above");
                        lt.matmul(stream, plan, b16, a16, pc)
                    }
                    Dev::Emu(_) => {
                        // Safety: the scratch buffers hold the converted inputs (the
                        // conversions ran to completion), pc covers C (asserted above).
                        unsafe {
                            emu::gemm(
                                plan,
                                b16 as *const u16,
                                a16 as *const u16,
                                pc as *mut f32,
                                emu::bf16_to_f32,
                            )
                        };
                        Ok(())
                    }
                });
            if let Err(e) = r {
                self.fail(format!("bf16 matmul {mm:?}: {e}"));
            }
            return;
        }
        let blas = match &self.dev {
            Dev::Gpu { blas, .. } => blas,
            Dev::Emu(_) => {
                // Safety: the pointers cover the matrices (asserted above); the plan is the
                // cuBLAS call's below.
                unsafe {
                    emu::gemm(
                        plan,
                        pb as *const f32,
                        pa as *const f32,
                        pc as *mut f32,
                        |x| x,
                    )
                };
                return;
            }
        };
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        let blas = blas.lock().unwrap_or_else(|e| e.into_inner());
        // Safety: the pointers cover m x k, k x n and m x n floats (asserted above).
        let r = unsafe {
            cudarc::cublas::result::sgemm(
                *blas.0.handle(),
                op(plan.trans_a),
                op(plan.trans_b),
                plan.m as i32,
                plan.n as i32,
                plan.k as i32,
                &alpha,
                pb as *const f32,
                plan.lda as i32,
                pa as *const f32,
                plan.ldb as i32,
                &beta,
                pc as *mut f32,
                plan.ldc as i32,
            )
        };
        if let Err(e) = r {
            self.fail(format!("sgemm {mm:?}: {e:?}"));
        }
    }

    fn embedding_forward(
        &self,
        out: View<Self>,
        table: View<Self>,
        ids: &CudaIds,
        rows: usize,
        dim: usize,
    ) {
        let (o, t, i) = (self.ptr(out), self.ptr(table), self.ids_ptr(ids));
        let (r, d) = (rows as i32, dim as i32);
        self.elementwise(
            "embedding_forward",
            rows * dim,
            &[Arg::P(o), Arg::P(t), Arg::P(i), Arg::I(r), Arg::I(d)],
        );
    }

    fn embedding_backward(
        &self,
        dtable: View<Self>,
        dout: View<Self>,
        ids: &CudaIds,
        rows: usize,
        dim: usize,
    ) {
        let (t, g, i) = (self.ptr(dtable), self.ptr(dout), self.ids_ptr(ids));
        let (r, d) = (rows as i32, dim as i32);
        self.elementwise(
            "embedding_backward",
            rows * dim,
            &[Arg::P(t), Arg::P(g), Arg::P(i), Arg::I(r), Arg::I(d)],
        );
    }

    fn rmsnorm_forward(
        &self,
        out: View<Self>,
        rstd: View<Self>,
        x: View<Self>,
        w: View<Self>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) {
        let (o, s, xp, wp) = (self.ptr(out), self.ptr(rstd), self.ptr(x), self.ptr(w));
        let (r, d) = (rows as i32, dim as i32);
        self.launch(
            "rmsnorm_forward",
            rows as u32,
            256,
            &[
                Arg::P(o),
                Arg::P(s),
                Arg::P(xp),
                Arg::P(wp),
                Arg::I(r),
                Arg::I(d),
                Arg::F(eps),
            ],
        );
    }

    fn rmsnorm_backward(
        &self,
        dx: View<Self>,
        dw: View<Self>,
        dout: View<Self>,
        x: View<Self>,
        w: View<Self>,
        rstd: View<Self>,
        rows: usize,
        dim: usize,
        accumulate: bool,
    ) {
        let (dxp, dwp, g, xp, wp, s) = (
            self.ptr(dx),
            self.ptr(dw),
            self.ptr(dout),
            self.ptr(x),
            self.ptr(w),
            self.ptr(rstd),
        );
        let (r, d, acc) = (rows as i32, dim as i32, accumulate as i32);
        self.launch(
            "rmsnorm_backward_dx",
            rows as u32,
            256,
            &[
                Arg::P(dxp),
                Arg::P(g),
                Arg::P(xp),
                Arg::P(wp),
                Arg::P(s),
                Arg::I(r),
                Arg::I(d),
                Arg::I(acc),
            ],
        );
        self.launch(
            "rmsnorm_backward_dw",
            blocks(dim, 128),
            128,
            &[
                Arg::P(dwp),
                Arg::P(g),
                Arg::P(xp),
                Arg::P(s),
                Arg::I(r),
                Arg::I(d),
            ],
        );
    }

    fn rope_forward(
        &self,
        qkv: View<Self>,
        cos: View<Self>,
        sin: View<Self>,
        s: Attention,
        pos0: usize,
    ) {
        self.rope(qkv, cos, sin, s, pos0, 1.0);
    }

    fn rope_backward(
        &self,
        dqkv: View<Self>,
        cos: View<Self>,
        sin: View<Self>,
        s: Attention,
        pos0: usize,
    ) {
        self.rope(dqkv, cos, sin, s, pos0, -1.0);
    }

    fn attention_forward(&self, out: View<Self>, lse: View<Self>, qkv: View<Self>, s: Attention) {
        assert!(
            s.head_dim <= MAX_HEAD_DIM,
            "head_dim {} > {MAX_HEAD_DIM}",
            s.head_dim
        );
        let (rs, t) = (s.row() as i32, s.seq as i32);
        let flash = s.head_dim <= FLASH_MAX_HEAD_DIM;
        let (q, kernel, elem) = if flash {
            let Some((q, name)) = self.flash_qkv(qkv, s, ["flash_attend", "flash_attend_bf16"])
            else {
                return;
            };
            // bf16 elements are 2 bytes.
            (q, name, if name.ends_with("bf16") { 2 } else { 4 })
        } else {
            (self.ptr(qkv), "attention_forward", 4)
        };
        let k = q + (s.heads * s.head_dim * elem) as u64;
        let v = k + (s.kv_heads * s.head_dim * elem) as u64;
        self.attend(
            kernel,
            out,
            Some(lse),
            (q, rs),
            (k, v, rs, t, t, 0),
            None,
            s,
        );
    }

    fn kv_store(
        &self,
        k: View<Self>,
        v: View<Self>,
        qkv: View<Self>,
        s: Attention,
        cache_len: usize,
        pos0: usize,
    ) {
        let (kp, vp, q) = (self.ptr(k), self.ptr(v), self.ptr(qkv));
        let a = [
            s.batch, s.seq, s.heads, s.kv_heads, s.head_dim, cache_len, pos0,
        ]
        .map(|x| x as i32);
        let mut args = vec![Arg::P(kp), Arg::P(vp), Arg::P(q)];
        args.extend(a.map(Arg::I));
        self.elementwise("kv_store", s.batch * s.seq * s.kv_heads * s.head_dim, &args);
    }

    fn attention_cached(
        &self,
        out: View<Self>,
        qkv: View<Self>,
        k: View<Self>,
        v: View<Self>,
        s: Attention,
        cache_len: usize,
        pos0: usize,
        pads: &[usize],
    ) {
        assert!(pads.len() >= s.batch && pos0 + s.seq <= cache_len && s.head_dim <= MAX_HEAD_DIM);
        let pads: Vec<u64> = pads[..s.batch].iter().map(|&p| p as u64).collect();
        let dev_pads = match self.alloc_mem::<u64>(pads.len()) {
            Ok(p) => p,
            Err(e) => return self.fail(format!("pads: {e}")),
        };
        let pp = self.mem_ptr(&dev_pads);
        if let Err(e) = self.htod(pp, &pads) {
            return self.fail(format!("pads: {e}"));
        }
        let kv_rs = (s.kv_heads * s.head_dim) as i32;
        let src = (
            self.ptr(k),
            self.ptr(v),
            kv_rs,
            cache_len as i32,
            (pos0 + s.seq) as i32,
            pos0 as i32,
        );
        // A prefill (several new positions) takes the tiled kernel; a decode step, one query per
        // row, the warp kernel.
        let kernel = if s.seq > 1 && s.head_dim <= FLASH_MAX_HEAD_DIM {
            "flash_attend"
        } else {
            "attention_forward"
        };
        self.attend(
            kernel,
            out,
            None,
            (self.ptr(qkv), s.row() as i32),
            src,
            Some(pp),
            s,
        );
        // The pads buffer must outlive the kernel.
        if let Err(e) = self.sync() {
            self.fail(e);
        }
        drop(dev_pads);
    }

    fn attention_backward(
        &self,
        dqkv: View<Self>,
        dout: View<Self>,
        out: View<Self>,
        lse: View<Self>,
        qkv: View<Self>,
        s: Attention,
    ) {
        assert!(s.head_dim <= MAX_HEAD_DIM);
        if s.head_dim <= FLASH_MAX_HEAD_DIM {
            // Every element of dqkv is written once: no zeroing, no atomics.
            let names = [
                ["flash_backward_dq", "flash_backward_dq_bf16"],
                ["flash_backward_dkv", "flash_backward_dkv_bf16"],
            ];
            let Some((q, dq)) = self.flash_qkv(qkv, s, names[0]) else {
                return;
            };
            let dkv = names[1][self.is_bf16() as usize];
            let args = self.flash_args(dqkv, dout, out, lse, q, s);
            let tiles = s.seq.div_ceil(FLASH_ROWS) as u32;
            let rows = FLASH_ROWS as u32;
            let (bh, bg) = ((s.batch * s.heads) as u32, (s.batch * s.kv_heads) as u32);
            self.launch(dq, tiles * bh, rows, &args);
            self.launch(dkv, tiles * bg, rows, &args);
            return;
        }
        self.fill(dqkv.prefix(s.batch * s.seq * s.row()), 0.0);
        let (d, g, o, l, q) = (
            self.ptr(dqkv),
            self.ptr(dout),
            self.ptr(out),
            self.ptr(lse),
            self.ptr(qkv),
        );
        let a = [s.batch, s.seq, s.heads, s.kv_heads, s.head_dim].map(|x| x as i32);
        let mut args = vec![Arg::P(d), Arg::P(g), Arg::P(o), Arg::P(l), Arg::P(q)];
        args.extend(a.map(Arg::I));
        self.warps("attention_backward", s.batch * s.heads * s.seq, &args);
    }

    fn swiglu_forward(&self, out: View<Self>, gate_up: View<Self>, rows: usize, ffn: usize) {
        let (o, g, r, f) = (self.ptr(out), self.ptr(gate_up), rows as i32, ffn as i32);
        self.elementwise(
            "swiglu_forward",
            rows * ffn,
            &[Arg::P(o), Arg::P(g), Arg::I(r), Arg::I(f)],
        );
    }

    fn swiglu_backward(
        &self,
        dgate_up: View<Self>,
        dout: View<Self>,
        gate_up: View<Self>,
        rows: usize,
        ffn: usize,
    ) {
        let (d, g, gu) = (self.ptr(dgate_up), self.ptr(dout), self.ptr(gate_up));
        let (r, f) = (rows as i32, ffn as i32);
        self.elementwise(
            "swiglu_backward",
            rows * ffn,
            &[Arg::P(d), Arg::P(g), Arg::P(gu), Arg::I(r), Arg::I(f)],
        );
    }

    fn cross_entropy(
        &self,
        losses: View<Self>,
        logits: View<Self>,
        targets: &CudaIds,
        rows: usize,
        vocab: usize,
        grad_scale: Option<f32>,
    ) {
        let (l, x, t) = (self.ptr(losses), self.ptr(logits), self.ids_ptr(targets));
        let (r, v, has, scale) = (
            rows as i32,
            vocab as i32,
            grad_scale.is_some() as i32,
            grad_scale.unwrap_or(0.0),
        );
        self.launch(
            "cross_entropy",
            rows as u32,
            256,
            &[
                Arg::P(l),
                Arg::P(x),
                Arg::P(t),
                Arg::I(r),
                Arg::I(v),
                Arg::I(has),
                Arg::F(scale),
            ],
        );
    }

    fn sum_squares(&self, x: View<Self>) -> f64 {
        const BLOCKS: usize = 256;
        let partials = match self.alloc_mem::<f64>(BLOCKS) {
            Ok(p) => p,
            Err(e) => {
                self.fail(e);
                return f64::NAN;
            }
        };
        let (pp, xp, n) = (self.mem_ptr(&partials), self.ptr(x), x.len() as u64);
        self.launch(
            "sum_squares",
            BLOCKS as u32,
            256,
            &[Arg::P(pp), Arg::P(xp), Arg::P(n)],
        );
        let mut host = vec![0f64; BLOCKS];
        match self.dtoh(&mut host, pp) {
            Ok(()) if self.ok() => host.iter().sum(),
            Ok(()) => f64::NAN,
            Err(e) => {
                self.fail(e);
                f64::NAN
            }
        }
    }

    fn im2col(&self, col: View<Self>, x: View<Self>, g: Window) {
        let (c, xp, w) = (self.ptr(col), self.ptr(x), KWindow::from(g));
        self.elementwise(
            "im2col",
            g.out_rows() * g.col_width(),
            &[Arg::P(c), Arg::P(xp), Arg::W(w)],
        );
    }

    fn bias_relu(&self, x: View<Self>, bias: View<Self>, rows: usize, channels: usize) {
        let (xp, bp, r, c) = (self.ptr(x), self.ptr(bias), rows as i32, channels as i32);
        self.elementwise(
            "bias_relu",
            rows * channels,
            &[Arg::P(xp), Arg::P(bp), Arg::I(r), Arg::I(c)],
        );
    }

    fn max_pool(&self, out: View<Self>, x: View<Self>, g: Window) {
        self.pool(out, x, g, 1);
    }

    fn avg_pool(&self, out: View<Self>, x: View<Self>, g: Window) {
        self.pool(out, x, g, 0);
    }

    fn copy_columns(
        &self,
        dst: View<Self>,
        src: View<Self>,
        rows: usize,
        c: usize,
        dst_c: usize,
        c0: usize,
    ) {
        let (d, s) = (self.ptr(dst), self.ptr(src));
        let a = [rows, c, dst_c, c0].map(|x| x as i32);
        let mut args = vec![Arg::P(d), Arg::P(s)];
        args.extend(a.map(Arg::I));
        self.elementwise("copy_columns", rows * c, &args);
    }

    fn global_avg_pool(
        &self,
        out: View<Self>,
        x: View<Self>,
        batch: usize,
        pixels: usize,
        c: usize,
    ) {
        let (o, xp) = (self.ptr(out), self.ptr(x));
        let a = [batch, pixels, c].map(|x| x as i32);
        let mut args = vec![Arg::P(o), Arg::P(xp)];
        args.extend(a.map(Arg::I));
        self.elementwise("global_avg_pool", batch * c, &args);
    }

    fn adamw(
        &self,
        params: &CudaBuf,
        grads: &CudaBuf,
        m: &CudaBuf,
        v: &CudaBuf,
        spans: &[(Span, bool)],
        moments_base: usize,
        hp: AdamW,
    ) {
        let (b1, b2) = (hp.beta1 as f64, hp.beta2 as f64);
        let bc1 = 1.0 - b1.powi(hp.step as i32);
        let bc2 = ((1.0 - b2.powi(hp.step as i32)).sqrt()) as f32;
        let step = (hp.lr as f64 / bc1) as f32;
        let w1 = 1.0 - hp.beta1;
        for &(span, decay) in spans {
            let local = Span {
                off: span.off - moments_base,
                len: span.len,
            };
            let keep = if decay {
                1.0 - hp.lr * hp.weight_decay
            } else {
                1.0
            };
            let (p, g) = (
                self.ptr(View::new(params, span)),
                self.ptr(View::new(grads, span)),
            );
            let (mp, vp) = (self.ptr(View::new(m, local)), self.ptr(View::new(v, local)));
            let n = span.len as u64;
            let args = [
                Arg::P(p),
                Arg::P(g),
                Arg::P(mp),
                Arg::P(vp),
                Arg::P(n),
                Arg::F(hp.grad_scale),
                Arg::F(keep),
                Arg::F(w1),
                Arg::F(hp.beta2),
                Arg::F(bc2),
                Arg::F(hp.eps),
                Arg::F(step),
            ];
            self.elementwise("adamw", span.len, &args);
        }
    }
}

impl Cuda {
    fn rope(
        &self,
        qkv: View<Self>,
        cos: View<Self>,
        sin: View<Self>,
        s: Attention,
        pos0: usize,
        sign: f32,
    ) {
        let (x, c, sn) = (self.ptr(qkv), self.ptr(cos), self.ptr(sin));
        let rows = s.batch * s.seq;
        let a = [rows, s.seq, s.heads, s.kv_heads, s.head_dim, pos0].map(|x| x as i32);
        let mut args = vec![Arg::P(x), Arg::P(c), Arg::P(sn)];
        args.extend(a.map(Arg::I));
        args.push(Arg::F(sign));
        self.elementwise(
            "rope",
            rows * (s.heads + s.kv_heads) * s.head_dim / 2,
            &args,
        );
    }

    /// The attention kernel: queries (pointer, row stride), keys and values (k, v, row stride,
    /// rows per batch row, keys per batch row, pos0), optional pads.
    /// The qkv the flash kernels read and the kernel of `names` ([f32, bf16]) to launch: in the
    /// bf16 mode a bf16 copy of qkv (rounded on the device), else qkv itself. None after a
    /// device error (recorded).
    fn flash_qkv(
        &self,
        qkv: View<Self>,
        s: Attention,
        names: [&'static str; 2],
    ) -> Option<(u64, &'static str)> {
        if !self.is_bf16() {
            return Some((self.ptr(qkv), names[0]));
        }
        match self.to_bf16(2, self.ptr(qkv), s.batch * s.seq * s.row()) {
            Ok(p) => Some((p, names[1])),
            Err(e) => {
                self.fail(format!("attention in bf16: {e}"));
                None
            }
        }
    }

    /// The flash backward kernels' arguments: (dqkv, dout, out, lse, qkv, dims).
    fn flash_args(
        &self,
        dqkv: View<Self>,
        dout: View<Self>,
        out: View<Self>,
        lse: View<Self>,
        qkv: u64,
        s: Attention,
    ) -> Vec<Arg> {
        let mut args: Vec<Arg> = [dqkv, dout, out, lse].map(|v| Arg::P(self.ptr(v))).to_vec();
        args.push(Arg::P(qkv));
        args.extend([s.batch, s.seq, s.heads, s.kv_heads, s.head_dim].map(|x| Arg::I(x as i32)));
        args
    }

    /// Launches `kernel` (`attention_forward`, one warp per query row, or `flash_attend[_bf16]`,
    /// tiles of FLASH_ROWS query rows) with their common arguments.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        kernel: &'static str,
        out: View<Self>,
        lse: Option<View<Self>>,
        q: (u64, i32),
        kv: (u64, u64, i32, i32, i32, i32),
        pads: Option<u64>,
        s: Attention,
    ) {
        let o = self.ptr(out);
        let l = lse.map_or(0, |l| self.ptr(l));
        let (qp, q_rs) = q;
        let (kp, vp, kv_rs, kv_rows, n_keys, pos0) = kv;
        let pp = pads.unwrap_or(0);
        let a = [s.batch, s.seq, s.heads, s.kv_heads, s.head_dim].map(|x| x as i32);
        let mut args = vec![
            Arg::P(o),
            Arg::P(l),
            Arg::P(qp),
            Arg::I(q_rs),
            Arg::P(kp),
            Arg::P(vp),
            Arg::I(kv_rs),
            Arg::I(kv_rows),
            Arg::I(n_keys),
            Arg::I(pos0),
            Arg::P(pp),
        ];
        args.extend(a.map(Arg::I));
        if kernel == "attention_forward" {
            self.warps(kernel, s.batch * s.heads * s.seq, &args);
        } else {
            let tiles = s.seq.div_ceil(FLASH_ROWS);
            let grid = (tiles * s.batch * s.heads) as u32;
            self.launch(kernel, grid, FLASH_ROWS as u32, &args);
        }
    }

    fn pool(&self, out: View<Self>, x: View<Self>, g: Window, is_max: i32) {
        let (o, xp, w) = (self.ptr(out), self.ptr(x), KWindow::from(g));
        self.elementwise(
            "pool",
            g.out_rows() * g.c,
            &[Arg::P(o), Arg::P(xp), Arg::W(w), Arg::I(is_max)],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With NVRTC present (CI installs PyPI's nvidia-cuda-nvrtc 13.0), every kernel compiles for
    /// Ampere and Hopper; no GPU needed. Without it the test says so and checks the error.
    #[test]
    fn every_kernel_compiles_with_nvrtc_for_sm80_and_sm90() {
        // Safety: only probes for the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            let e = compile("sm_90").unwrap_err().to_string();
            assert!(e.contains("libnvrtc") && e.contains("pip install"), "{e}");
            if std::env::var_os("CODECLM_REQUIRE_NVRTC").is_some() {
                panic!("CODECLM_REQUIRE_NVRTC is set but NVRTC cannot be loaded: {e}");
            }
            eprintln!("NVRTC not found: kernels not compiled ({e})");
            return;
        }
        for arch in ["sm_80", "sm_90"] {
            let ptx = compile(arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(ptx.contains(&format!(".target {arch}")), "{arch}");
        }
    }

    /// On a machine without the NVIDIA driver, making a device is an error naming the driver,
    /// not a panic.
    #[test]
    fn no_driver_is_a_clean_error() {
        // Safety: only probes for the library.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            return; // a machine with a driver: nothing to check here
        }
        let e = Cuda::new(0)
            .err()
            .expect("no driver, no device")
            .to_string();
        assert!(
            e.contains("libcuda.so.1") && e.contains("NVIDIA driver"),
            "{e}"
        );
    }
}
