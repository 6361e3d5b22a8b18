//! The CPU backend: matmuls through the `gemm` crate (its AVX-512 kernels where the CPU has
//! them), every other kernel a plain function over slices run on rayon.
//!
//! Results do not depend on the thread count: a matmul is one `gemm` call, parallel inside,
//! whose sums over k run in one order whatever the threads; other work is cut into chunks whose
//! size follows from the shapes only, and every reduction across rows adds per-chunk partials in
//! chunk order.

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use gemm::Parallelism;
use rayon::prelude::*;

use super::backend::{AdamW, Attention, Backend, Matmul, Span, View, Window, IGNORE};
use super::conv;
use super::simd::{self, multiversion};
use crate::{Error, Result};

/// f32 memory that kernels read and write through views (llm.c's pointers into one arena).
pub struct CpuBuf {
    ptr: *mut f32,
    len: usize,
}

// Safety: kernels write only their outputs, which never overlap the inputs of the same call
// (asserted in debug builds), and calls are issued from one thread at a time.
unsafe impl Send for CpuBuf {}
unsafe impl Sync for CpuBuf {}

impl CpuBuf {
    /// Its length in floats.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn zeroed(len: usize) -> CpuBuf {
        let b: Box<[f32]> = vec![0f32; len].into_boxed_slice();
        CpuBuf {
            len,
            ptr: Box::into_raw(b) as *mut f32,
        }
    }
}

impl Drop for CpuBuf {
    fn drop(&mut self) {
        // Safety: ptr and len come from the boxed slice made in `zeroed`.
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.ptr, self.len,
            )))
        };
    }
}

/// Token ids (rewritten in place every step).
pub struct CpuIds(UnsafeCell<Vec<u32>>);
unsafe impl Send for CpuIds {}
unsafe impl Sync for CpuIds {}

fn read<'a>(v: View<'a, Cpu>) -> &'a [f32] {
    assert!(v.span.end() <= v.buf.len, "view outside its buffer");
    // Safety: in bounds; see `CpuBuf`.
    unsafe { std::slice::from_raw_parts(v.buf.ptr.add(v.span.off), v.span.len) }
}

#[allow(clippy::mut_from_ref)]
fn write<'a>(v: View<'a, Cpu>) -> &'a mut [f32] {
    assert!(v.span.end() <= v.buf.len, "view outside its buffer");
    // Safety: in bounds; an output is not aliased by the call's inputs (see `CpuBuf`).
    unsafe { std::slice::from_raw_parts_mut(v.buf.ptr.add(v.span.off), v.span.len) }
}

fn ids(i: &CpuIds, n: usize) -> &[u32] {
    // Safety: ids are written only by `upload_ids`, between kernel calls.
    let v = unsafe { &*i.0.get() };
    &v[..n]
}

fn disjoint(out: View<Cpu>, inputs: &[View<Cpu>]) {
    if cfg!(debug_assertions) {
        for i in inputs {
            let same = std::ptr::eq(out.buf, i.buf);
            let overlap = out.span.off < i.span.end() && i.span.off < out.span.end();
            assert!(!(same && overlap), "kernel output overlaps an input");
        }
    }
}

#[derive(Clone, Copy)]
struct Ptr(*mut f32);
unsafe impl Send for Source {}
unsafe impl Sync for Source {}
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

thread_local! {
    static IN_GEMM: Cell<bool> = const { Cell::new(false) };
}

/// Parallel matmuls in flight (nothing else of the engine runs while one does).
static GEMM_PARALLEL: AtomicUsize = AtomicUsize::new(0);

/// True while this thread is inside a single-threaded `gemm` call or a parallel one is running
/// (gemm allocates its packing buffers per call, on its worker threads too): lets a counting
/// allocator tell the engine's own allocations from gemm's.
pub fn in_gemm() -> bool {
    IN_GEMM.with(|c| c.get()) || GEMM_PARALLEL.load(Ordering::SeqCst) > 0
}

/// A strided matrix: element (i, j) at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *mut f32,
    rs: usize,
    cs: usize,
}

impl Mat {
    fn new(ptr: *const f32, rs: usize, cs: usize) -> Mat {
        Mat {
            ptr: ptr as *mut f32,
            rs,
            cs,
        }
    }
}

/// dst[m, n] (+)= lhs[m, k] . rhs[k, n], single-threaded (dst's columns must be contiguous).
unsafe fn gemm1(m: usize, n: usize, k: usize, dst: Mat, acc: bool, lhs: Mat, rhs: Mat) {
    gemm_par(m, n, k, dst, acc, lhs, rhs, Parallelism::None)
}

#[allow(clippy::too_many_arguments)]
unsafe fn gemm_par(
    m: usize,
    n: usize,
    k: usize,
    dst: Mat,
    acc: bool,
    lhs: Mat,
    rhs: Mat,
    par: Parallelism,
) {
    let (dst, dst_rs) = (dst.ptr, dst.rs);
    let (lhs, lhs_rs, lhs_cs) = (lhs.ptr as *const f32, lhs.rs, lhs.cs);
    let (rhs, rhs_rs, rhs_cs) = (rhs.ptr as *const f32, rhs.rs, rhs.cs);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for r in 0..m {
                std::ptr::write_bytes(dst.add(r * dst_rs), 0, n);
            }
        }
        return;
    }
    IN_GEMM.with(|c| c.set(true));
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        acc,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        par,
    );
    IN_GEMM.with(|c| c.set(false));
}

/// Rows per task for row-wise kernels: enough work per task, from the shape only.
fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

/// Query and key block sizes of the tiled attention: a query block's scores against a key
/// block (64 x 512 f32, 128 KiB) stay in L2.
const BQ: usize = 64;
const BK: usize = 512;

/// The CPU backend. Threads are rayon's (the current pool).
pub struct Cpu {
    scratch: Mutex<Vec<f32>>,
    partials: Mutex<Vec<f64>>,
    /// Attention's query and key block sizes.
    bq: usize,
    bk: usize,
}

impl Default for Cpu {
    fn default() -> Self {
        Cpu::new()
    }
}

impl Cpu {
    pub fn new() -> Cpu {
        Cpu::with_blocks(BQ, BK)
    }

    /// Other attention block sizes (the tests use small ones to exercise the online softmax
    /// across several key blocks).
    pub fn with_blocks(bq: usize, bk: usize) -> Cpu {
        assert!(bq > 0 && bk >= bq, "attention blocks {bq} x {bk}");
        Cpu {
            scratch: Mutex::new(Vec::new()),
            partials: Mutex::new(Vec::new()),
            bq,
            bk,
        }
    }

    /// The attention forward over (batch row, key/value head) tasks.
    fn attention_tasks(&self, s: Attention, src: Source, out: Ptr, lse: Ptr) {
        let tasks = s.batch * s.kv_heads;
        let (bq, bk) = (self.bq, self.bk);
        let per = bq * bk + 2 * bq;
        self.with_scratch(tasks * per, |scratch| {
            scratch
                .par_chunks_mut(per)
                .enumerate()
                .for_each(|(task, scr)| {
                    // Safety: the task writes the out rows (and lse entries) of its own heads.
                    unsafe { attention_forward_task(task, s, (bq, bk), src, out, lse, scr) }
                });
        });
    }

    /// Runs `f` on at least `len` floats of scratch (grown once, then reused: no allocation
    /// per step).
    fn with_scratch<R>(&self, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
        let mut s = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    }
}

impl Backend for Cpu {
    type Buf = CpuBuf;
    type Ids = CpuIds;

    fn name(&self) -> String {
        format!(
            "cpu ({}, {} threads)",
            simd::level_name(),
            rayon::current_num_threads()
        )
    }

    fn alloc(&self, len: usize) -> Result<CpuBuf> {
        let bytes = len.checked_mul(4).filter(|&b| b <= isize::MAX as usize);
        if bytes.is_none() {
            return Err(Error::OutOfMemory(format!(
                "a buffer of {len} floats does not fit in memory; use a smaller batch or context"
            )));
        }
        Ok(CpuBuf::zeroed(len))
    }

    fn alloc_ids(&self, len: usize) -> Result<CpuIds> {
        Ok(CpuIds(UnsafeCell::new(vec![0; len])))
    }

    fn upload(&self, dst: View<Self>, src: &[f32]) {
        write(dst).copy_from_slice(src);
    }

    fn download(&self, src: View<Self>, dst: &mut [f32]) {
        dst.copy_from_slice(read(src));
    }

    fn upload_ids(&self, dst: &CpuIds, src: &[u32]) {
        // Safety: no kernel runs while ids are uploaded (calls are sequential).
        let v = unsafe { &mut *dst.0.get() };
        v[..src.len()].copy_from_slice(src);
    }

    fn fill(&self, x: View<Self>, value: f32) {
        write(x).par_chunks_mut(1 << 16).for_each(|c| c.fill(value));
    }

    fn add_assign(&self, dst: View<Self>, src: View<Self>) {
        disjoint(dst, &[src]);
        let (d, s) = (write(dst), read(src));
        assert_eq!(d.len(), s.len());
        d.par_chunks_mut(1 << 14)
            .zip(s.par_chunks(1 << 14))
            .for_each(|(d, s)| add_rows(d, s));
    }

    fn matmul(&self, c: View<Self>, a: View<Self>, b: View<Self>, mm: Matmul) {
        let Matmul {
            m,
            n,
            k,
            trans_a,
            trans_b,
            accumulate,
        } = mm;
        disjoint(c, &[a, b]);
        assert!(
            c.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
            "matmul {mm:?}: views of {}, {}, {}",
            c.len(),
            a.len(),
            b.len()
        );
        let (cp, ap, bp) = (
            Ptr(write(c).as_mut_ptr()),
            read(a).as_ptr(),
            read(b).as_ptr(),
        );
        let (ap, bp) = (Ptr(ap as *mut f32), Ptr(bp as *mut f32));
        let (a_rs, a_cs) = if trans_a { (1, m) } else { (k, 1) };
        let (b_rs, b_cs) = if trans_b { (1, k) } else { (n, 1) };
        // Split the larger output dimension into chunks sized from the shape alone.
        // One call, parallel inside gemm: it splits the output into blocks per thread but
        // runs every element's sum over k in one order, so the result does not depend on the
        // thread count (tested at the presets' sizes); one call also packs each operand once.
        GEMM_PARALLEL.fetch_add(1, Ordering::SeqCst);
        // Safety: the views hold at least m*k, k*n and m*n elements (asserted above).
        unsafe {
            gemm_par(
                m,
                n,
                k,
                Mat::new(cp.0, n, 1),
                accumulate,
                Mat::new(ap.0, a_rs, a_cs),
                Mat::new(bp.0, b_rs, b_cs),
                Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        GEMM_PARALLEL.fetch_sub(1, Ordering::SeqCst);
    }

    fn embedding_forward(
        &self,
        out: View<Self>,
        table: View<Self>,
        ids_: &CpuIds,
        rows: usize,
        dim: usize,
    ) {
        disjoint(out, &[table]);
        let (o, t, ids) = (write(out), read(table), ids(ids_, rows));
        o[..rows * dim]
            .par_chunks_mut(dim)
            .zip(ids.par_iter())
            .for_each(|(row, &id)| {
                let id = id as usize;
                row.copy_from_slice(&t[id * dim..(id + 1) * dim])
            });
    }

    fn embedding_backward(
        &self,
        dtable: View<Self>,
        dout: View<Self>,
        ids_: &CpuIds,
        rows: usize,
        dim: usize,
    ) {
        disjoint(dtable, &[dout]);
        let (dt, g, ids) = (Ptr(write(dtable).as_mut_ptr()), read(dout), ids(ids_, rows));
        // Each task owns a band of columns and walks every row in order: deterministic.
        const COLS: usize = 16;
        (0..dim.div_ceil(COLS)).into_par_iter().for_each(|band| {
            let dt = &dt; // the whole (Sync) wrapper, not its raw pointer field
            let (c0, c1) = (band * COLS, ((band + 1) * COLS).min(dim));
            for (r, &id) in ids.iter().enumerate() {
                let src = &g[r * dim + c0..r * dim + c1];
                // Safety: this task alone writes columns c0..c1.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(dt.0.add(id as usize * dim + c0), c1 - c0)
                };
                for (a, b) in dst.iter_mut().zip(src) {
                    *a += b;
                }
            }
        });
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
        disjoint(out, &[x, w, rstd]);
        let (o, r, x, w) = (write(out), write(rstd), read(x), read(w));
        let per = rows_per_task(dim);
        o[..rows * dim]
            .par_chunks_mut(per * dim)
            .zip(r[..rows].par_chunks_mut(per))
            .enumerate()
            .for_each(|(c, (o, r))| {
                let x = &x[c * per * dim..c * per * dim + o.len()];
                rmsnorm_rows(o, r, x, w, dim, eps);
            });
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
        disjoint(dx, &[dout, x, w, rstd, dw]);
        let (dxs, dws, g, x, w, rs) = (
            write(dx),
            write(dw),
            read(dout),
            read(x),
            read(w),
            read(rstd),
        );
        const PER: usize = 32;
        let chunks = rows.div_ceil(PER);
        self.with_scratch(chunks * dim, |partial| {
            dxs[..rows * dim]
                .par_chunks_mut(PER * dim)
                .zip(partial.par_chunks_mut(dim))
                .enumerate()
                .for_each(|(c, (dxc, acc))| {
                    let (lo, hi) = (c * PER * dim, c * PER * dim + dxc.len());
                    let rows = dxc.len() / dim;
                    rmsnorm_backward_rows(
                        dxc,
                        acc,
                        &x[lo..hi],
                        &g[lo..hi],
                        &rs[c * PER..c * PER + rows],
                        w,
                        accumulate,
                    );
                });
            for p in partial.chunks(dim) {
                add_rows(dws, p);
            }
        });
    }

    fn rope_forward(
        &self,
        qkv: View<Self>,
        cos: View<Self>,
        sin: View<Self>,
        s: Attention,
        pos0: usize,
    ) {
        rope(write(qkv), read(cos), read(sin), s, pos0, 1.0);
    }

    fn rope_backward(
        &self,
        dqkv: View<Self>,
        cos: View<Self>,
        sin: View<Self>,
        s: Attention,
        pos0: usize,
    ) {
        // The transpose of a rotation is the rotation by the opposite angle.
        rope(write(dqkv), read(cos), read(sin), s, pos0, -1.0);
    }

    fn attention_forward(&self, out: View<Self>, lse: View<Self>, qkv: View<Self>, s: Attention) {
        disjoint(out, &[qkv, lse]);
        disjoint(lse, &[qkv]);
        let (o, l, q) = (
            Ptr(write(out).as_mut_ptr()),
            Ptr(write(lse).as_mut_ptr()),
            read(qkv).as_ptr(),
        );
        let row = s.row();
        let src = Source {
            q: Ptr(q as *mut f32),
            q_rs: row,
            // Safety: the k and v columns of the same rows.
            k: Ptr(unsafe { q.add(s.heads * s.head_dim) } as *mut f32),
            v: Ptr(unsafe { q.add((s.heads + s.kv_heads) * s.head_dim) } as *mut f32),
            kv_rs: row,
            kv_rows: s.seq,
            n_keys: s.seq,
            pos0: 0,
            pads: std::ptr::null(),
        };
        self.attention_tasks(s, src, o, l);
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
        disjoint(k, &[qkv]);
        disjoint(v, &[qkv]);
        let (kc, vc, q) = (write(k), write(v), read(qkv));
        let (row, w) = (s.row(), s.kv_heads * s.head_dim);
        let koff = s.heads * s.head_dim;
        assert!(pos0 + s.seq <= cache_len && kc.len() >= s.batch * cache_len * w);
        for b in 0..s.batch {
            for t in 0..s.seq {
                let src = &q[(b * s.seq + t) * row..];
                let at = (b * cache_len + pos0 + t) * w;
                kc[at..at + w].copy_from_slice(&src[koff..koff + w]);
                vc[at..at + w].copy_from_slice(&src[koff + w..koff + 2 * w]);
            }
        }
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
        disjoint(out, &[qkv, k, v]);
        assert!(pads.len() >= s.batch && pos0 + s.seq <= cache_len);
        let src = Source {
            q: Ptr(read(qkv).as_ptr() as *mut f32),
            q_rs: s.row(),
            k: Ptr(read(k).as_ptr() as *mut f32),
            v: Ptr(read(v).as_ptr() as *mut f32),
            kv_rs: s.kv_heads * s.head_dim,
            kv_rows: cache_len,
            n_keys: pos0 + s.seq,
            pos0,
            pads: pads.as_ptr(),
        };
        self.attention_tasks(
            s,
            src,
            Ptr(write(out).as_mut_ptr()),
            Ptr(std::ptr::null_mut()),
        );
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
        disjoint(dqkv, &[dout, out, lse, qkv]);
        let p = |v: View<Self>| Ptr(read(v).as_ptr() as *mut f32);
        let (dq, g, o, l, q) = (
            Ptr(write(dqkv).as_mut_ptr()),
            p(dout),
            p(out),
            p(lse),
            p(qkv),
        );
        let tasks = s.batch * s.kv_heads;
        let (bq, bk) = (self.bq, self.bk);
        let per = 2 * bq * bk + bq;
        self.with_scratch(tasks * per, |scratch| {
            scratch
                .par_chunks_mut(per)
                .enumerate()
                .for_each(|(task, scr)| {
                    // Safety: the task writes the dq rows of its query heads and the dk, dv rows
                    // of its key/value head.
                    unsafe { attention_backward_task(task, s, (bq, bk), dq, g, o, l, q, scr) }
                });
        });
    }

    fn swiglu_forward(&self, out: View<Self>, gate_up: View<Self>, rows: usize, ffn: usize) {
        disjoint(out, &[gate_up]);
        let (o, gu) = (write(out), read(gate_up));
        o[..rows * ffn]
            .par_chunks_mut(ffn)
            .enumerate()
            .for_each(|(r, orow)| {
                let (g, u) = gu[r * 2 * ffn..(r + 1) * 2 * ffn].split_at(ffn);
                swiglu_row(orow, g, u);
            });
    }

    fn swiglu_backward(
        &self,
        dgate_up: View<Self>,
        dout: View<Self>,
        gate_up: View<Self>,
        rows: usize,
        ffn: usize,
    ) {
        disjoint(dgate_up, &[dout, gate_up]);
        let (d, g, gu) = (write(dgate_up), read(dout), read(gate_up));
        d[..rows * 2 * ffn]
            .par_chunks_mut(2 * ffn)
            .enumerate()
            .for_each(|(r, drow)| {
                let (gate, up) = gu[r * 2 * ffn..(r + 1) * 2 * ffn].split_at(ffn);
                let (dg, du) = drow.split_at_mut(ffn);
                swiglu_backward_row(dg, du, &g[r * ffn..(r + 1) * ffn], gate, up);
            });
    }

    fn cross_entropy(
        &self,
        losses: View<Self>,
        logits: View<Self>,
        targets: &CpuIds,
        rows: usize,
        vocab: usize,
        grad_scale: Option<f32>,
    ) {
        disjoint(losses, &[logits]);
        let (ls, x, t) = (write(losses), write(logits), ids(targets, rows));
        x[..rows * vocab]
            .par_chunks_mut(vocab)
            .zip(ls[..rows].par_iter_mut())
            .zip(t.par_iter())
            .for_each(|((row, loss), &target)| {
                if target == IGNORE {
                    *loss = 0.0;
                    if grad_scale.is_some() {
                        row.fill(0.0);
                    }
                    return;
                }
                *loss = cross_entropy_row(row, target as usize, grad_scale);
            });
    }

    fn sum_squares(&self, x: View<Self>) -> f64 {
        let x = read(x);
        const PER: usize = 1 << 15;
        let chunks = x.len().div_ceil(PER);
        let mut p = self.partials.lock().unwrap_or_else(|e| e.into_inner());
        if p.len() < chunks {
            p.resize(chunks, 0.0);
        }
        p[..chunks]
            .par_iter_mut()
            .zip(x.par_chunks(PER))
            .for_each(|(s, c)| *s = sum_squares_chunk(c));
        p[..chunks].iter().sum()
    }

    fn im2col(&self, col: View<Self>, x: View<Self>, g: Window) {
        disjoint(col, &[x]);
        conv::im2col(write(col), read(x), g);
    }

    fn bias_relu(&self, x: View<Self>, bias: View<Self>, rows: usize, channels: usize) {
        disjoint(x, &[bias]);
        conv::bias_relu(write(x), read(bias), rows, channels);
    }

    fn max_pool(&self, out: View<Self>, x: View<Self>, g: Window) {
        disjoint(out, &[x]);
        conv::pool(write(out), read(x), g, true);
    }

    fn avg_pool(&self, out: View<Self>, x: View<Self>, g: Window) {
        disjoint(out, &[x]);
        conv::pool(write(out), read(x), g, false);
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
        disjoint(dst, &[src]);
        conv::copy_columns(write(dst), read(src), rows, c, dst_c, c0);
    }

    fn global_avg_pool(
        &self,
        out: View<Self>,
        x: View<Self>,
        batch: usize,
        pixels: usize,
        c: usize,
    ) {
        disjoint(out, &[x]);
        conv::global_avg_pool(write(out), read(x), batch, pixels, c);
    }

    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        params: &CpuBuf,
        grads: &CpuBuf,
        m: &CpuBuf,
        v: &CpuBuf,
        spans: &[(Span, bool)],
        moments_base: usize,
        hp: AdamW,
    ) {
        // torch.optim.AdamW (single tensor): p *= 1 - lr * wd; m.lerp_(g, 1 - b1);
        // v = b2 v + (1 - b2) g^2; p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps).
        let (b1, b2) = (hp.beta1 as f64, hp.beta2 as f64);
        let bc1 = 1.0 - b1.powi(hp.step as i32);
        let bc2_sqrt = (1.0 - b2.powi(hp.step as i32)).sqrt();
        let step_size = (hp.lr as f64 / bc1) as f32;
        let (bc2_sqrt, w1) = (bc2_sqrt as f32, 1.0 - hp.beta1);
        for &(span, decay) in spans {
            let local = Span {
                off: span.off - moments_base,
                len: span.len,
            };
            let (p, g, mm, vv) = (
                write(View::new(params, span)),
                read(View::new(grads, span)),
                write(View::new(m, local)),
                write(View::new(v, local)),
            );
            let keep = if decay {
                1.0 - hp.lr * hp.weight_decay
            } else {
                1.0
            };
            const PER: usize = 1 << 14;
            p.par_chunks_mut(PER)
                .zip(g.par_chunks(PER))
                .zip(mm.par_chunks_mut(PER))
                .zip(vv.par_chunks_mut(PER))
                .for_each(|(((p, g), m), v)| {
                    adamw_chunk(
                        p,
                        g,
                        m,
                        v,
                        [
                            hp.grad_scale,
                            keep,
                            w1,
                            hp.beta2,
                            bc2_sqrt,
                            hp.eps,
                            step_size,
                        ],
                    );
                });
        }
    }
}

/// Rotates the q and k heads of every row (sign -1: the inverse rotation).
fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], s: Attention, pos0: usize, sign: f32) {
    let (row, dh) = (s.row(), s.head_dim);
    let half = dh / 2;
    let rotated = s.heads + s.kv_heads; // q heads then k heads, at the start of each row
    let n = s.batch * s.seq;
    x[..n * row]
        .par_chunks_mut(row)
        .enumerate()
        .for_each(|(r, xr)| {
            let pos = pos0 + r % s.seq;
            let (c, sn) = (
                &cos[pos * half..(pos + 1) * half],
                &sin[pos * half..(pos + 1) * half],
            );
            rope_row(&mut xr[..rotated * dh], c, sn, dh, sign);
        });
}

/// Where one attention call reads its queries, keys and values: row r of batch row b at
/// `ptr + (b * batch_rows + r) * rs` (+ the head's offset); training reads all three from the
/// packed qkv rows, cached decoding reads keys and values from the cache.
#[derive(Clone, Copy)]
struct Source {
    q: Ptr,
    q_rs: usize,
    k: Ptr,
    v: Ptr,
    kv_rs: usize,
    /// Rows per batch row in k and v (T in training, the cache's length when decoding).
    kv_rows: usize,
    /// Keys per batch row: pos0 + T.
    n_keys: usize,
    /// The absolute position of query row 0.
    pos0: usize,
    /// Leading padding positions per batch row (null: none); no real query attends to them.
    pads: *const usize,
}

multiversion! {
/// One (batch row, key/value head) of the attention forward: for each of its query heads and
/// each block of BQ queries, the keys up to the block's end in blocks of BK with an online
/// softmax (flash attention 2), accumulating straight into the output rows. `lse` may be null
/// (decoding keeps no log-sum-exp).
unsafe fn attention_forward_task(
    task: usize,
    s: Attention,
    blocks: (usize, usize),
    src: Source,
    out: Ptr,
    lse: Ptr,
    scr: &mut [f32],
) {
    let (bq, bk) = blocks;
    let (b, g) = (task / s.kv_heads, task % s.kv_heads);
    let (t, dh) = (s.seq, s.head_dim);
    let d_out = s.heads * dh;
    let rep = s.heads / s.kv_heads;
    let scale = 1.0 / (dh as f32).sqrt();
    let (sc, rest) = scr.split_at_mut(bq * bk);
    let (mx, sm) = rest.split_at_mut(bq);
    let pad = if src.pads.is_null() { 0 } else { *src.pads.add(b) };
    let k0 = src.k.0.add(b * src.kv_rows * src.kv_rs + g * dh);
    let v0 = src.v.0.add(b * src.kv_rows * src.kv_rs + g * dh);
    for h in g * rep..(g + 1) * rep {
        let q0 = src.q.0.add(b * t * src.q_rs + h * dh);
        let o0 = out.0.add(b * t * d_out + h * dh);
        for i0 in (0..t).step_by(bq) {
            let i1 = (i0 + bq).min(t);
            let qb = i1 - i0;
            mx[..qb].fill(f32::NEG_INFINITY);
            sm[..qb].fill(0.0);
            for r in 0..qb {
                std::ptr::write_bytes(o0.add((i0 + r) * d_out), 0, dh);
            }
            let kend = (src.pos0 + i1).min(src.n_keys);
            // Real queries see no padding: keys before `pad` are skipped whole.
            let kstart = if src.pos0 + i0 >= pad { pad / bk * bk } else { 0 };
            for j0 in (kstart..kend).step_by(bk) {
                let j1 = (j0 + bk).min(kend);
                let kb = j1 - j0;
                // S = Q_i K_j^T
                gemm1(
                    qb,
                    kb,
                    dh,
                    Mat::new(sc.as_mut_ptr(), kb, 1),
                    false,
                    Mat::new(q0.add(i0 * src.q_rs), src.q_rs, 1),
                    Mat::new(k0.add(j0 * src.kv_rs), 1, src.kv_rs),
                );
                for r in 0..qb {
                    let qpos = src.pos0 + i0 + r;
                    let srow = &mut sc[r * kb..(r + 1) * kb];
                    let lo = if qpos >= pad { pad } else { 0 };
                    let (start, end) = (lo.saturating_sub(j0).min(kb), (qpos + 1).saturating_sub(j0).min(kb));
                    if end <= start {
                        srow.fill(0.0);
                        continue;
                    }
                    srow[..start].fill(0.0);
                    srow[end..].fill(0.0);
                    let live = &mut srow[start..end];
                    for v in live.iter_mut() {
                        *v *= scale;
                    }
                    let m_new = mx[r].max(simd::max(live));
                    for v in live.iter_mut() {
                        *v = simd::exp(*v - m_new);
                    }
                    let sum = simd::sum(live);
                    if mx[r] != f32::NEG_INFINITY && m_new != mx[r] {
                        let alpha = simd::exp(mx[r] - m_new);
                        sm[r] *= alpha;
                        let orow = std::slice::from_raw_parts_mut(o0.add((i0 + r) * d_out), dh);
                        for o in orow {
                            *o *= alpha;
                        }
                    }
                    mx[r] = m_new;
                    sm[r] += sum;
                }
                // O_i += P V_j
                gemm1(
                    qb,
                    dh,
                    kb,
                    Mat::new(o0.add(i0 * d_out), d_out, 1),
                    true,
                    Mat::new(sc.as_ptr(), kb, 1),
                    Mat::new(v0.add(j0 * src.kv_rs), src.kv_rs, 1),
                );
            }
            for r in 0..qb {
                let orow = std::slice::from_raw_parts_mut(o0.add((i0 + r) * d_out), dh);
                let inv = if sm[r] > 0.0 { 1.0 / sm[r] } else { 0.0 };
                for o in orow {
                    *o *= inv;
                }
                if !lse.0.is_null() {
                    *lse.0.add((b * s.heads + h) * t + i0 + r) = mx[r] + sm[r].ln();
                }
            }
        }
    }
}
}

multiversion! {
/// One (batch row, key/value head) of the attention backward (flash attention 2): recomputes
/// the probabilities from the saved log-sum-exp, block by block.
#[allow(clippy::too_many_arguments)]
unsafe fn attention_backward_task(
    task: usize,
    s: Attention,
    blocks: (usize, usize),
    dqkv: Ptr,
    dout: Ptr,
    out: Ptr,
    lse: Ptr,
    qkv: Ptr,
    scr: &mut [f32],
) {
    let (bq, bk) = blocks;
    let (b, g) = (task / s.kv_heads, task % s.kv_heads);
    let (t, dh, row) = (s.seq, s.head_dim, s.row());
    let d_out = s.heads * dh;
    let rep = s.heads / s.kv_heads;
    let scale = 1.0 / (dh as f32).sqrt();
    let (p, rest) = scr.split_at_mut(bq * bk);
    let (dp, dvec) = rest.split_at_mut(bq * bk);
    let koff = s.heads * dh + g * dh;
    let voff = (s.heads + s.kv_heads) * dh + g * dh;
    let base = b * t;
    for r in 0..t {
        std::ptr::write_bytes(dqkv.0.add((base + r) * row + koff), 0, dh);
        std::ptr::write_bytes(dqkv.0.add((base + r) * row + voff), 0, dh);
    }
    for h in g * rep..(g + 1) * rep {
        let qoff = h * dh;
        for i0 in (0..t).step_by(bq) {
            let i1 = (i0 + bq).min(t);
            let qb = i1 - i0;
            for (r, dv) in dvec[..qb].iter_mut().enumerate() {
                let at = (base + i0 + r) * d_out + qoff;
                let (go, oo) = (
                    std::slice::from_raw_parts(dout.0.add(at), dh),
                    std::slice::from_raw_parts(out.0.add(at), dh),
                );
                *dv = simd::dot(go, oo);
                std::ptr::write_bytes(dqkv.0.add((base + i0 + r) * row + qoff), 0, dh);
            }
            let lrow = lse.0.add((b * s.heads + h) * t + i0);
            for j0 in (0..i1).step_by(bk) {
                let j1 = (j0 + bk).min(i1);
                let kb = j1 - j0;
                gemm1(
qb,
kb,
dh,
Mat::new(p.as_mut_ptr(), kb, 1),
false,
Mat::new(qkv.0.add((base + i0) * row + qoff), row, 1),
Mat::new(qkv.0.add((base + j0) * row + koff), 1, row),
);
                for r in 0..qb {
                    let qpos = i0 + r;
                    let valid = if qpos >= j0 { (qpos - j0 + 1).min(kb) } else { 0 };
                    let l = *lrow.add(r);
                    let prow = &mut p[r * kb..(r + 1) * kb];
                    for v in &mut prow[..valid] {
                        *v = simd::exp(*v * scale - l);
                    }
                    prow[valid..].fill(0.0);
                }
                // dV_j += P^T dO_i
                gemm1(
kb,
dh,
qb,
Mat::new(dqkv.0.add((base + j0) * row + voff), row, 1),
true,
Mat::new(p.as_ptr(), 1, kb),
Mat::new(dout.0.add((base + i0) * d_out + qoff), d_out, 1),
);
                // dP = dO_i V_j^T
                gemm1(
qb,
kb,
dh,
Mat::new(dp.as_mut_ptr(), kb, 1),
false,
Mat::new(dout.0.add((base + i0) * d_out + qoff), d_out, 1),
Mat::new(qkv.0.add((base + j0) * row + voff), 1, row),
);
                // dS = scale * P * (dP - D)
                for r in 0..qb {
                    let (prow, drow) = (&p[r * kb..(r + 1) * kb], &mut dp[r * kb..(r + 1) * kb]);
                    for c in 0..kb {
                        drow[c] = scale * prow[c] * (drow[c] - dvec[r]);
                    }
                }
                // dQ_i += dS K_j
                gemm1(
qb,
dh,
kb,
Mat::new(dqkv.0.add((base + i0) * row + qoff), row, 1),
true,
Mat::new(dp.as_ptr(), kb, 1),
Mat::new(qkv.0.add((base + j0) * row + koff), row, 1),
);
                // dK_j += dS^T Q_i
                gemm1(
kb,
dh,
qb,
Mat::new(dqkv.0.add((base + j0) * row + koff), row, 1),
true,
Mat::new(dp.as_ptr(), 1, kb),
Mat::new(qkv.0.add((base + i0) * row + qoff), row, 1),
);
            }
        }
    }
}
}

// ---------------------------------------------------------------------------------------------
// Row kernels, compiled per SIMD level.

multiversion! {
fn add_rows(d: &mut [f32], s: &[f32]) {
    for (a, b) in d.iter_mut().zip(s) {
        *a += b;
    }
}
}

multiversion! {
/// RMSNorm of consecutive rows of `dim`: out = x * rstd * w.
fn rmsnorm_rows(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], dim: usize, eps: f32) {
    for ((o, r), xr) in out.chunks_mut(dim).zip(rstd.iter_mut()).zip(x.chunks(dim)) {
        let ms = simd::dot(xr, xr) / dim as f32;
        let s = 1.0 / (ms + eps).sqrt();
        *r = s;
        for i in 0..dim {
            o[i] = xr[i] * s * w[i];
        }
    }
}
}

multiversion! {
/// xhat = x * s; dxhat = g * w; dx = s * (dxhat - xhat * mean(dxhat * xhat)); acc += g * xhat.
fn rmsnorm_backward_rows(
    dx: &mut [f32],
    acc: &mut [f32],
    x: &[f32],
    g: &[f32],
    rstd: &[f32],
    w: &[f32],
    accumulate: bool,
) {
    let dim = w.len();
    acc.fill(0.0);
    let mut gw = [0f32; 4096];
    for (((dxr, xr), gr), &s) in dx.chunks_mut(dim).zip(x.chunks(dim)).zip(g.chunks(dim)).zip(rstd) {
        for i in 0..dim {
            acc[i] += gr[i] * xr[i] * s;
        }
        // mean(dxhat * xhat) = s * mean(g * w * x)
        let mean = if dim <= gw.len() {
            let gw = &mut gw[..dim];
            for i in 0..dim {
                gw[i] = gr[i] * w[i];
            }
            s * simd::dot(gw, xr) / dim as f32
        } else {
            s * (0..dim).map(|i| gr[i] * w[i] * xr[i]).sum::<f32>() / dim as f32
        };
        if accumulate {
            for i in 0..dim {
                dxr[i] += s * (gr[i] * w[i] - xr[i] * s * mean);
            }
        } else {
            for i in 0..dim {
                dxr[i] = s * (gr[i] * w[i] - xr[i] * s * mean);
            }
        }
    }
}
}

multiversion! {
/// Rotates consecutive heads of `dh` (HF `rotate_half`: the halves are the pairs).
fn rope_row(x: &mut [f32], cos: &[f32], sin: &[f32], dh: usize, sign: f32) {
    let half = dh / 2;
    for head in x.chunks_mut(dh) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x1, x2, si) = (a[i], b[i], sign * sin[i]);
            a[i] = x1 * cos[i] - x2 * si;
            b[i] = x2 * cos[i] + x1 * si;
        }
    }
}
}

multiversion! {
fn swiglu_row(out: &mut [f32], g: &[f32], u: &[f32]) {
    for i in 0..out.len() {
        out[i] = g[i] * simd::sigmoid(g[i]) * u[i];
    }
}
}

multiversion! {
fn swiglu_backward_row(dg: &mut [f32], du: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
    for i in 0..dg.len() {
        let sg = simd::sigmoid(gate[i]);
        du[i] = dout[i] * gate[i] * sg;
        dg[i] = dout[i] * up[i] * sg * (1.0 + gate[i] * (1.0 - sg));
    }
}
}

multiversion! {
/// The loss of one row; with a scale, the row becomes scale * (softmax - onehot).
fn cross_entropy_row(row: &mut [f32], target: usize, grad_scale: Option<f32>) -> f32 {
    let max = simd::max(row);
    let mut sum = 0f32;
    for chunk in row.chunks(64) {
        let mut e = [0f32; 64];
        for (d, &v) in e.iter_mut().zip(chunk) {
            *d = simd::exp(v - max);
        }
        sum += simd::sum(&e[..chunk.len()]);
    }
    let lse = max + sum.ln();
    let loss = lse - row[target];
    if let Some(scale) = grad_scale {
        for v in row.iter_mut() {
            *v = scale * simd::exp(*v - lse);
        }
        row[target] -= scale;
    }
    loss
}
}

multiversion! {
fn sum_squares_chunk(x: &[f32]) -> f64 {
    // Eight independent f64 accumulators (vectorisable), added in a fixed order.
    let mut acc = [0f64; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for i in 0..8 {
            acc[i] += c[i] as f64 * c[i] as f64;
        }
    }
    let mut s: f64 = it.remainder().iter().map(|&v| v as f64 * v as f64).sum();
    for a in acc {
        s += a;
    }
    s
}
}

multiversion! {
/// [grad_scale, keep (1 - lr wd), 1 - beta1, beta2, sqrt(bias correction 2), eps, lr / bias
/// correction 1]
fn adamw_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: [f32; 7]) {
    let [gs, keep, w1, b2, bc2, eps, step] = k;
    for i in 0..p.len() {
        let g = g[i] * gs;
        p[i] *= keep;
        m[i] += w1 * (g - m[i]);
        v[i] = b2 * v[i] + (1.0 - b2) * g * g;
        let denom = v[i].sqrt() / bc2 + eps;
        p[i] -= step * (m[i] / denom);
    }
}
}
