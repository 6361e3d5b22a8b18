//! The CUDA backend on an emulated device, for machines without a GPU
//! (`CODECLM_CUDA_EMULATE=1`): `kernels.cu` compiled as C++ by the host compiler with the
//! `emu.h` prelude (blocks one after another, each block's threads as fibers with real
//! `__syncthreads` and warp-shuffle barriers), host memory for device memory, and cuBLAS's
//! column-major arguments (the `GemmPlan`) turned into strides for the `gemm` crate. Every `--device cuda` path (the
//! backend's launch geometry, pointer arithmetic, the row-major to column-major matmul mapping,
//! the trainer, generation, the FID network) then runs the CUDA code on the CPU, slowly. It is a
//! test of the CUDA source and its glue, not of a GPU: no timing, no concurrent memory model,
//! no device rounding.

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::path::PathBuf;
use std::sync::Mutex;

use super::{KERNELS, KERNEL_NAMES};
use crate::{Error, Result};

/// The emulator's prelude.
pub const PRELUDE: &str = include_str!("emu.h");

/// Whether `CODECLM_CUDA_EMULATE` asks for the emulated device.
pub fn enabled() -> bool {
    std::env::var("CODECLM_CUDA_EMULATE").is_ok_and(|v| !v.is_empty() && v != "0")
}

type Launch = unsafe extern "C" fn(u32, u32, *mut *mut c_void) -> i32;

/// The kernels compiled for the host, loaded.
pub struct Emu {
    fns: HashMap<&'static str, Launch>,
    last_error: unsafe extern "C" fn() -> *const c_char,
    _lib: libloading::Library,
}

/// The emulator's state is one global of the loaded library (every `Emu` of the process shares
/// it): launches one at a time.
static LAUNCH: Mutex<()> = Mutex::new(());

/// The C++ translation unit: the prelude, the kernels, one exported launcher per kernel.
fn source() -> String {
    let mut s = String::from("#include \"emu.h\"\n#line 1 \"kernels.cu\"\n");
    s.push_str(KERNELS);
    s.push('\n');
    for name in KERNEL_NAMES {
        s.push_str(&format!("EMU_KERNEL({name})\n"));
    }
    s
}

fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("codeclm")
        .join("cuda")
}

/// The host C++ compiler: `CXX`, else the first of c++, clang++, g++ on PATH.
fn compiler() -> Result<String> {
    if let Ok(c) = std::env::var("CXX") {
        return Ok(c);
    }
    for c in ["c++", "clang++", "g++"] {
        if std::process::Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Ok(c.into());
        }
    }
    Err(Error::Device(
        "CODECLM_CUDA_EMULATE: no C++ compiler to build the emulated kernels. Fix: apt-get install g++ (or clang), or set CXX".into(),
    ))
}

impl Emu {
    /// Compiles (or finds in the cache) and loads the emulated kernels.
    pub fn load() -> Result<Emu> {
        let cxx = compiler()?;
        let src = source();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in src.bytes().chain(PRELUDE.bytes()).chain(cxx.bytes()) {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
        }
        let dir = cache_dir();
        let so = dir.join(format!("emu-{h:016x}.so"));
        if !so.is_file() {
            let work = dir.join(format!("emu-{h:016x}.{}", std::process::id()));
            let io = |e: std::io::Error| Error::Device(format!("{}: {e}", work.display()));
            std::fs::create_dir_all(&work).map_err(io)?;
            std::fs::write(work.join("emu.h"), PRELUDE).map_err(io)?;
            std::fs::write(work.join("kernels.cpp"), &src).map_err(io)?;
            let out = std::process::Command::new(&cxx)
                .args([
                    "-std=c++17",
                    "-O2",
                    "-g0",
                    "-shared",
                    "-fPIC",
                    "-fno-fast-math",
                ])
                .arg("-ffp-contract=off")
                .arg("-o")
                .arg(work.join("emu.so"))
                .arg(work.join("kernels.cpp"))
                .output()
                .map_err(|e| Error::Device(format!("running {cxx}: {e}")))?;
            if !out.status.success() {
                let _ = std::fs::remove_dir_all(&work);
                return Err(Error::Device(format!(
                    "{cxx} could not compile the emulated kernels:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            std::fs::rename(work.join("emu.so"), &so).map_err(io)?;
            let _ = std::fs::remove_dir_all(&work);
        }
        // Safety: the library is ours, built just now or earlier from the same source; its
        // initializers are the emulator's statics.
        let lib = unsafe { libloading::Library::new(&so) }
            .map_err(|e| Error::Device(format!("loading {}: {e}", so.display())))?;
        let mut fns = HashMap::new();
        for &name in KERNEL_NAMES {
            // Safety: every emu_<name> has the Launch signature (EMU_KERNEL in emu.h).
            let f: Launch = unsafe {
                *lib.get::<Launch>(format!("emu_{name}\0").as_bytes())
                    .map_err(|e| Error::Device(format!("emu_{name}: {e}")))?
            };
            fns.insert(name, f);
        }
        // Safety: as above, `const char* emu_last_error()`.
        let last_error = unsafe {
            *lib.get::<unsafe extern "C" fn() -> *const c_char>(b"emu_last_error\0")
                .map_err(|e| Error::Device(format!("emu_last_error: {e}")))?
        };
        Ok(Emu {
            fns,
            last_error,
            _lib: lib,
        })
    }

    /// Runs `name` on `grid` x `block` threads with `args` (pointers to each argument's value,
    /// in the kernel's order), to completion.
    pub fn launch(
        &self,
        name: &str,
        grid: u32,
        block: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), String> {
        let f = self
            .fns
            .get(name)
            .ok_or_else(|| format!("no kernel {name}"))?;
        let _one = LAUNCH.lock().unwrap_or_else(|e| e.into_inner());
        // Safety: args point at values of the kernel's parameter types (the backend pushes
        // them in its signature's order), and device pointers are host addresses of live
        // buffers.
        let rc = unsafe { f(grid, block, args.as_mut_ptr()) };
        if rc == 0 {
            return Ok(());
        }
        // Safety: a NUL-terminated string owned by the emulator.
        Err(unsafe { CStr::from_ptr((self.last_error)()) }
            .to_string_lossy()
            .into_owned())
    }
}

/// Host memory standing for device memory: zeroed, at a fixed address.
pub struct HostMem<T> {
    ptr: *mut T,
    len: usize,
}

// Safety: plain memory; the backend orders every access (one launch at a time, copies between).
unsafe impl<T: Send> Send for HostMem<T> {}
unsafe impl<T: Sync> Sync for HostMem<T> {}

impl<T: Copy + Default> HostMem<T> {
    pub fn zeroed(len: usize) -> HostMem<T> {
        let b: Box<[T]> = vec![T::default(); len].into_boxed_slice();
        HostMem {
            len: b.len(),
            ptr: Box::into_raw(b) as *mut T,
        }
    }
}

impl<T> HostMem<T> {
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }
}

impl<T> Drop for HostMem<T> {
    fn drop(&mut self) {
        // Safety: made by Box::into_raw of a boxed slice of len elements.
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.ptr, self.len,
            )))
        };
    }
}

/// bf16 bits to f32 (exact).
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// cuBLAS's column-major `C = op(A) op(B) (+ C)` of `plan` (the call the backend makes) on host
/// addresses, elements read through `to_f32` (f32, or bf16 bits): the plan's strides handed to
/// the `gemm` crate (the CPU backend's), single-threaded.
///
/// # Safety
/// The addresses must hold the matrices the plan describes.
pub unsafe fn gemm<T: Copy>(
    plan: super::lt::GemmPlan,
    a: *const T,
    b: *const T,
    c: *mut f32,
    to_f32: impl Fn(T) -> f32,
) {
    let super::lt::GemmPlan {
        trans_a,
        trans_b,
        m,
        n,
        k,
        lda,
        ldb,
        ldc,
        accumulate,
    } = plan;
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for j in 0..n {
                std::ptr::write_bytes(c.add(j * ldc), 0, m);
            }
        }
        return;
    }
    // Column-major storage of an (rows x cols) matrix with leading dimension ld.
    let widen = |p: *const T, rows: usize, cols: usize, ld: usize| -> Vec<f32> {
        let len = (cols - 1) * ld + rows;
        (0..len).map(|i| to_f32(*p.add(i))).collect()
    };
    let (a_rows, a_cols) = if trans_a { (k, m) } else { (m, k) };
    let (b_rows, b_cols) = if trans_b { (n, k) } else { (k, n) };
    let (a32, b32) = (widen(a, a_rows, a_cols, lda), widen(b, b_rows, b_cols, ldb));
    // Element (i, p) of op(A): at i + p * lda, or p + i * lda when transposed.
    let (a_rs, a_cs) = if trans_a { (lda, 1) } else { (1, lda) };
    let (b_rs, b_cs) = if trans_b { (ldb, 1) } else { (1, ldb) };
    gemm::gemm(
        m,
        n,
        k,
        c,
        ldc as isize,
        1,
        accumulate,
        a32.as_ptr(),
        a_cs as isize,
        a_rs as isize,
        b32.as_ptr(),
        b_cs as isize,
        b_rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}
