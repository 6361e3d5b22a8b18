//! Matmuls in bf16 with f32 accumulation through cuBLASLt (the paper trained in bf16): both
//! inputs are rounded to bf16 on the device (`f32_to_bf16` of kernels.cu), the product is
//! accumulated and written in f32, so the weights, gradients and AdamW state stay f32. The
//! geometry is [`GemmPlan`]'s, the same one the f32 cuBLAS call and the emulated device use, so
//! the emulator checks it; what only a GPU can check is the descriptor plumbing below.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublaslt::{result as lr, sys as ls};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::backend::Matmul;

/// Row-major `C = op(A) op(B)` as the column-major product cuBLAS computes:
/// `C^T = op(B)^T op(A)^T`, i.e. cuBLAS's A is our B and its B our A.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmPlan {
    /// Transpose cuBLAS's A (our B) / its B (our A).
    pub trans_a: bool,
    pub trans_b: bool,
    /// cuBLAS's m, n, k (our n, m, k) and leading dimensions.
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    /// beta = 1 (accumulate into C) or 0.
    pub accumulate: bool,
}

impl GemmPlan {
    pub fn of(mm: Matmul) -> GemmPlan {
        GemmPlan {
            trans_a: mm.trans_b,
            trans_b: mm.trans_a,
            m: mm.n,
            n: mm.m,
            k: mm.k,
            lda: if mm.trans_b { mm.k } else { mm.n },
            ldb: if mm.trans_a { mm.m } else { mm.k },
            ldc: mm.n,
            accumulate: mm.accumulate,
        }
    }

    /// (rows, cols) of cuBLAS's stored A and B (column-major, before their op).
    fn stored(&self) -> ((usize, usize), (usize, usize)) {
        let a = if self.trans_a {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        let b = if self.trans_b {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        (a, b)
    }
}

/// Workspace cuBLASLt may use (32 MiB, as PyTorch gives it on Hopper).
const WORKSPACE: usize = 32 << 20;

struct Handle(ls::cublasLtHandle_t);
// Safety: used behind the backend's mutex, one thread at a time.
unsafe impl Send for Handle {}

/// A cuBLASLt handle, its workspace and the algorithm chosen per shape.
pub struct Lt {
    handle: Handle,
    workspace: CudaSlice<u8>,
    algos: HashMap<GemmPlan, ls::cublasLtMatmulAlgo_t>,
}

// Safety: as Handle; the algorithms are plain data.
unsafe impl Send for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        // Safety: made by create_handle, destroyed once.
        unsafe {
            let _ = lr::destroy_handle(self.handle.0);
        }
    }
}

fn err(what: &str, e: impl std::fmt::Debug) -> String {
    format!("cuBLASLt {what}: {e:?}")
}

impl Lt {
    pub fn new(stream: &std::sync::Arc<CudaStream>) -> Result<Lt, String> {
        let handle = lr::create_handle().map_err(|e| err("handle", e))?;
        let workspace = stream
            .alloc_zeros::<u8>(WORKSPACE)
            .map_err(|e| err("workspace", e))?;
        Ok(Lt {
            handle: Handle(handle),
            workspace,
            algos: HashMap::new(),
        })
    }

    /// `C = A_bf16 B_bf16 (+ C)` per `plan`, A and B at device addresses of bf16 values, C of
    /// f32, on `stream`.
    pub fn matmul(
        &mut self,
        stream: &std::sync::Arc<CudaStream>,
        plan: GemmPlan,
        a: u64,
        b: u64,
        c: u64,
    ) -> Result<(), String> {
        let ((ar, ac), (br, bc)) = plan.stored();
        let bf16 = ls::cudaDataType::CUDA_R_16BF;
        let f32t = ls::cudaDataType::CUDA_R_32F;
        // Safety: every descriptor made here is destroyed before returning; the pointers are
        // device addresses of the sizes the plan describes (the backend asserts them).
        unsafe {
            let desc = lr::create_matmul_desc(ls::cublasComputeType_t::CUBLAS_COMPUTE_32F, f32t)
                .map_err(|e| err("matmul descriptor", e))?;
            let mut made: Vec<ls::cublasLtMatrixLayout_t> = Vec::new();
            let out = (|| -> Result<(), String> {
                let mut layout = |t, rows: usize, cols: usize, ld: usize| {
                    let l = lr::create_matrix_layout(t, rows as u64, cols as u64, ld as i64)
                        .map_err(|e| err("layout", e))?;
                    made.push(l);
                    Ok::<_, String>(l)
                };
                let la = layout(bf16, ar, ac, plan.lda)?;
                let lb = layout(bf16, br, bc, plan.ldb)?;
                let lc = layout(f32t, plan.m, plan.n, plan.ldc)?;
                for (attr, t) in [
                    (
                        ls::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                        plan.trans_a,
                    ),
                    (
                        ls::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                        plan.trans_b,
                    ),
                ] {
                    // cublasOperation_t: 0 = N, 1 = T.
                    let op: i32 = t as i32;
                    lr::set_matmul_desc_attribute(
                        desc,
                        attr,
                        &op as *const i32 as *const c_void,
                        std::mem::size_of::<i32>(),
                    )
                    .map_err(|e| err("transpose attribute", e))?;
                }
                let algo = match self.algos.get(&plan) {
                    Some(a) => *a,
                    None => {
                        let pref = lr::create_matmul_pref().map_err(|e| err("preference", e))?;
                        let ws = WORKSPACE as u64;
                        let set = lr::set_matmul_pref_attribute(
                            pref,
                            ls::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                            &ws as *const u64 as *const c_void,
                            std::mem::size_of::<u64>(),
                        );
                        let h = set.and_then(|_| {
                            lr::get_matmul_algo_heuristic(self.handle.0, desc, la, lb, lc, lc, pref)
                        });
                        let _ = lr::destroy_matmul_pref(pref);
                        let h = h.map_err(|e| err(&format!("no algorithm for {plan:?}"), e))?;
                        self.algos.insert(plan, h.algo);
                        h.algo
                    }
                };
                let (alpha, beta) = (1.0f32, if plan.accumulate { 1.0f32 } else { 0.0 });
                let (ws, _record) = self.workspace.device_ptr(stream);
                lr::matmul(
                    self.handle.0,
                    desc,
                    &alpha as *const f32 as *const c_void,
                    &beta as *const f32 as *const c_void,
                    a as *const c_void,
                    la,
                    b as *const c_void,
                    lb,
                    c as *const c_void,
                    lc,
                    c as *mut c_void,
                    lc,
                    &algo,
                    ws as *mut c_void,
                    WORKSPACE,
                    stream.cu_stream() as _,
                )
                .map_err(|e| err(&format!("matmul {plan:?}"), e))
            })();
            for l in made {
                let _ = lr::destroy_matrix_layout(l);
            }
            let _ = lr::destroy_matmul_desc(desc);
            out
        }
    }
}

/// The lock the backend keeps its cuBLASLt state behind.
pub type LtCell = Mutex<Option<Lt>>;
