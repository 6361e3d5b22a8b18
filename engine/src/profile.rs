//! A backend wrapper that times every kernel call (`codeclm bench train --profile`): where a
//! step's time goes, by kernel. On an asynchronous device the inner backend's calls must be
//! synchronous for the times to mean anything.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use super::backend::{AdamW, Attention, Backend, Matmul, Span, View, Window};
use crate::Result;

pub struct Profiled<B: Backend> {
    pub inner: B,
    times: Mutex<BTreeMap<&'static str, (u64, f64)>>,
}

impl<B: Backend> Profiled<B> {
    pub fn new(inner: B) -> Self {
        Profiled {
            inner,
            times: Mutex::new(BTreeMap::new()),
        }
    }

    fn time<R>(&self, name: &'static str, f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = f();
        let dt = t.elapsed().as_secs_f64();
        let mut m = self.times.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(name).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += dt;
        r
    }

    /// (kernel, calls, seconds) since the last reset, most expensive first.
    pub fn report(&self) -> Vec<(&'static str, u64, f64)> {
        let m = self.times.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = m.iter().map(|(k, (c, s))| (*k, *c, *s)).collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        v
    }

    pub fn reset(&self) {
        self.times.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

fn inner<'a, B: Backend>(v: View<'a, Profiled<B>>) -> View<'a, B> {
    View::new(v.buf, v.span)
}

impl<B: Backend> Backend for Profiled<B> {
    type Buf = B::Buf;
    type Ids = B::Ids;

    fn name(&self) -> String {
        self.inner.name()
    }

    fn status(&self) -> Result<()> {
        self.inner.status()
    }
    fn alloc(&self, len: usize) -> Result<Self::Buf> {
        self.inner.alloc(len)
    }
    fn alloc_ids(&self, len: usize) -> Result<Self::Ids> {
        self.inner.alloc_ids(len)
    }
    fn upload(&self, dst: View<Self>, src: &[f32]) {
        self.time("upload", || self.inner.upload(inner(dst), src))
    }
    fn download(&self, src: View<Self>, dst: &mut [f32]) {
        self.time("download", || self.inner.download(inner(src), dst))
    }
    fn upload_ids(&self, dst: &Self::Ids, src: &[u32]) {
        self.time("upload_ids", || self.inner.upload_ids(dst, src))
    }
    fn fill(&self, x: View<Self>, value: f32) {
        self.time("fill", || self.inner.fill(inner(x), value))
    }
    fn add_assign(&self, dst: View<Self>, src: View<Self>) {
        self.time("add_assign", || {
            self.inner.add_assign(inner(dst), inner(src))
        })
    }
    fn matmul(&self, c: View<Self>, a: View<Self>, b: View<Self>, mm: Matmul) {
        self.time("matmul", || {
            self.inner.matmul(inner(c), inner(a), inner(b), mm)
        })
    }
    fn embedding_forward(
        &self,
        out: View<Self>,
        table: View<Self>,
        ids: &Self::Ids,
        rows: usize,
        dim: usize,
    ) {
        self.time("embedding_forward", || {
            self.inner
                .embedding_forward(inner(out), inner(table), ids, rows, dim)
        })
    }
    fn embedding_backward(
        &self,
        dtable: View<Self>,
        dout: View<Self>,
        ids: &Self::Ids,
        rows: usize,
        dim: usize,
    ) {
        self.time("embedding_backward", || {
            self.inner
                .embedding_backward(inner(dtable), inner(dout), ids, rows, dim)
        })
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
        self.time("rmsnorm_forward", || {
            self.inner
                .rmsnorm_forward(inner(out), inner(rstd), inner(x), inner(w), rows, dim, eps)
        })
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
        self.time("rmsnorm_backward", || {
            self.inner.rmsnorm_backward(
                inner(dx),
                inner(dw),
                inner(dout),
                inner(x),
                inner(w),
                inner(rstd),
                rows,
                dim,
                accumulate,
            )
        })
    }
    fn rope_forward(
        &self,
        qkv: View<Self>,
        cos: View<Self>,
        sin: View<Self>,
        shape: Attention,
        pos0: usize,
    ) {
        self.time("rope_forward", || {
            self.inner
                .rope_forward(inner(qkv), inner(cos), inner(sin), shape, pos0)
        })
    }
    fn rope_backward(
        &self,
        dqkv: View<Self>,
        cos: View<Self>,
        sin: View<Self>,
        shape: Attention,
        pos0: usize,
    ) {
        self.time("rope_backward", || {
            self.inner
                .rope_backward(inner(dqkv), inner(cos), inner(sin), shape, pos0)
        })
    }
    fn attention_forward(
        &self,
        out: View<Self>,
        lse: View<Self>,
        qkv: View<Self>,
        shape: Attention,
    ) {
        self.time("attention_forward", || {
            self.inner
                .attention_forward(inner(out), inner(lse), inner(qkv), shape)
        })
    }
    fn attention_backward(
        &self,
        dqkv: View<Self>,
        dout: View<Self>,
        out: View<Self>,
        lse: View<Self>,
        qkv: View<Self>,
        shape: Attention,
    ) {
        self.time("attention_backward", || {
            self.inner.attention_backward(
                inner(dqkv),
                inner(dout),
                inner(out),
                inner(lse),
                inner(qkv),
                shape,
            )
        })
    }
    fn kv_store(
        &self,
        k: View<Self>,
        v: View<Self>,
        qkv: View<Self>,
        shape: Attention,
        cache_len: usize,
        pos0: usize,
    ) {
        self.time("kv_store", || {
            self.inner
                .kv_store(inner(k), inner(v), inner(qkv), shape, cache_len, pos0)
        })
    }
    fn attention_cached(
        &self,
        out: View<Self>,
        qkv: View<Self>,
        k: View<Self>,
        v: View<Self>,
        shape: Attention,
        cache_len: usize,
        pos0: usize,
        pads: &[usize],
    ) {
        self.time("attention_cached", || {
            self.inner.attention_cached(
                inner(out),
                inner(qkv),
                inner(k),
                inner(v),
                shape,
                cache_len,
                pos0,
                pads,
            )
        })
    }
    fn swiglu_forward(&self, out: View<Self>, gate_up: View<Self>, rows: usize, ffn: usize) {
        self.time("swiglu_forward", || {
            self.inner
                .swiglu_forward(inner(out), inner(gate_up), rows, ffn)
        })
    }
    fn swiglu_backward(
        &self,
        dgate_up: View<Self>,
        dout: View<Self>,
        gate_up: View<Self>,
        rows: usize,
        ffn: usize,
    ) {
        self.time("swiglu_backward", || {
            self.inner
                .swiglu_backward(inner(dgate_up), inner(dout), inner(gate_up), rows, ffn)
        })
    }
    fn cross_entropy(
        &self,
        losses: View<Self>,
        logits: View<Self>,
        targets: &Self::Ids,
        rows: usize,
        vocab: usize,
        grad_scale: Option<f32>,
    ) {
        self.time("cross_entropy", || {
            self.inner.cross_entropy(
                inner(losses),
                inner(logits),
                targets,
                rows,
                vocab,
                grad_scale,
            )
        })
    }
    fn sum_squares(&self, x: View<Self>) -> f64 {
        self.time("sum_squares", || self.inner.sum_squares(inner(x)))
    }
    fn im2col(&self, col: View<Self>, x: View<Self>, g: Window) {
        self.time("im2col", || self.inner.im2col(inner(col), inner(x), g))
    }
    fn bias_relu(&self, x: View<Self>, bias: View<Self>, rows: usize, channels: usize) {
        self.time("bias_relu", || {
            self.inner.bias_relu(inner(x), inner(bias), rows, channels)
        })
    }
    fn max_pool(&self, out: View<Self>, x: View<Self>, g: Window) {
        self.time("max_pool", || self.inner.max_pool(inner(out), inner(x), g))
    }
    fn avg_pool(&self, out: View<Self>, x: View<Self>, g: Window) {
        self.time("avg_pool", || self.inner.avg_pool(inner(out), inner(x), g))
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
        self.time("copy_columns", || {
            self.inner
                .copy_columns(inner(dst), inner(src), rows, c, dst_c, c0)
        })
    }
    fn global_avg_pool(
        &self,
        out: View<Self>,
        x: View<Self>,
        batch: usize,
        pixels: usize,
        c: usize,
    ) {
        self.time("global_avg_pool", || {
            self.inner
                .global_avg_pool(inner(out), inner(x), batch, pixels, c)
        })
    }
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        params: &Self::Buf,
        grads: &Self::Buf,
        m: &Self::Buf,
        v: &Self::Buf,
        spans: &[(Span, bool)],
        moments_base: usize,
        hp: AdamW,
    ) {
        self.time("adamw", || {
            self.inner
                .adamw(params, grads, m, v, spans, moments_base, hp)
        })
    }
}
