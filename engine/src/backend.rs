//! What a device must provide to run the engine: buffers of f32 and of token ids, and the
//! kernels of the paper's Llama, each forward beside its backward. The model ([`super::llama`])
//! is written once against this trait; the CPU backend is [`super::cpu`], the CUDA one will
//! implement the same calls over device pointers (cuBLASLt matmuls, NVRTC kernels).
//!
//! Tensors are [`View`]s: a buffer and a span in it. Kernels read their inputs and write their
//! outputs through views of shared buffers (as llm.c passes pointers into one arena); an output
//! never overlaps an input of the same call unless the kernel says it works in place.

use crate::Result;

/// A span of a buffer, in elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub off: usize,
    pub len: usize,
}

impl Span {
    pub fn end(&self) -> usize {
        self.off + self.len
    }
    /// The first `len` elements of this span.
    pub fn prefix(&self, len: usize) -> Span {
        debug_assert!(len <= self.len, "prefix {len} of a span of {}", self.len);
        Span { off: self.off, len }
    }
    /// `len` elements from `at` (relative to the span).
    pub fn sub(&self, at: usize, len: usize) -> Span {
        debug_assert!(
            at + len <= self.len,
            "{at}+{len} outside a span of {}",
            self.len
        );
        Span {
            off: self.off + at,
            len,
        }
    }
}

/// A tensor: `span` of `buf`.
pub struct View<'a, B: Backend + ?Sized> {
    pub buf: &'a B::Buf,
    pub span: Span,
}

impl<B: Backend + ?Sized> Clone for View<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend + ?Sized> Copy for View<'_, B> {}

impl<'a, B: Backend + ?Sized> View<'a, B> {
    pub fn new(buf: &'a B::Buf, span: Span) -> Self {
        View { buf, span }
    }
    pub fn len(&self) -> usize {
        self.span.len
    }
    pub fn is_empty(&self) -> bool {
        self.span.len == 0
    }
    pub fn prefix(&self, len: usize) -> Self {
        View::new(self.buf, self.span.prefix(len))
    }
    pub fn sub(&self, at: usize, len: usize) -> Self {
        View::new(self.buf, self.span.sub(at, len))
    }
}

/// C[m, n] = op(A)[m, k] . op(B)[k, n] (+ C when `accumulate`), all row-major and contiguous;
/// `trans_a`: A is stored [k, m]; `trans_b`: B is stored [n, k] (a Linear's weight).
#[derive(Clone, Copy, Debug)]
pub struct Matmul {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub accumulate: bool,
}

/// The shape of one causal self-attention call over a packed `qkv` buffer: rows are
/// `[B, T]`, each row `[q: H * Dh | k: K * Dh | v: K * Dh]`, q and k already rotated.
#[derive(Clone, Copy, Debug)]
pub struct Attention {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    pub fn row(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
}

/// AdamW's settings for one update (PyTorch's `torch.optim.AdamW` arithmetic).
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step, for the bias corrections.
    pub step: u64,
    /// Every gradient is multiplied by this first (global-norm clipping).
    pub grad_scale: f32,
}

/// The geometry of one convolution or pooling window over an NHWC tensor
/// [batch, h, w, c] (channels contiguous): a `kh x kw` window moved by `stride` over the input
/// padded by `pad_h` rows and `pad_w` columns each side (the 1x7 / 7x1 convs pad one axis only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub batch: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad_h: usize,
    pub pad_w: usize,
}

impl Window {
    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.pad_h - self.kh) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.pad_w - self.kw) / self.stride + 1
    }
    /// Output pixels: the rows of im2col's matrix and of the conv's output.
    pub fn out_rows(&self) -> usize {
        self.batch * self.out_h() * self.out_w()
    }
    /// Columns of im2col's matrix: `kh * kw * c`, in (kh, kw, c) order.
    pub fn col_width(&self) -> usize {
        self.kh * self.kw * self.c
    }
    pub fn in_len(&self) -> usize {
        self.batch * self.h * self.w * self.c
    }
}

/// A device: memory and the kernels. Every call may be asynchronous on a GPU; `download` and
/// the reductions that return a host value synchronise.
pub trait Backend: Send + Sync {
    /// Device memory of f32.
    type Buf: Send + Sync;
    /// Device memory of u32 token ids.
    type Ids: Send + Sync;

    /// A human-readable name ("cpu (avx512f, 2 threads)").
    fn name(&self) -> String;

    /// The first error of an asynchronous device since it was made (waits for its work);
    /// a CPU never has one.
    fn status(&self) -> Result<()> {
        Ok(())
    }

    /// Matmuls in bf16 with f32 accumulation (f32 weights, gradients and optimizer state) where
    /// the backend has them: `Ok(true)` when applied, `Ok(false)` where matmuls are f32 only
    /// (the CPU).
    fn set_bf16(&self, on: bool) -> Result<bool> {
        let _ = on;
        Ok(false)
    }

    // -- collectives of a data-parallel run, on the device ------------------------------------
    /// Averages `x` over the ranks in place through the communicator attached to this backend
    /// (NCCL on CUDA), ordered with the kernels; `false` when none is attached (the caller
    /// goes through host memory and MPI instead). Errors surface in [`Backend::status`].
    fn all_average(&self, x: View<Self>) -> bool {
        let _ = x;
        false
    }

    /// Rank `root`'s `x` into `x` on every rank, as [`Backend::all_average`].
    fn broadcast(&self, root: usize, x: View<Self>) -> bool {
        let _ = (root, x);
        false
    }

    // -- memory ------------------------------------------------------------------------------
    /// `len` zeroed elements.
    fn alloc(&self, len: usize) -> Result<Self::Buf>;
    fn alloc_ids(&self, len: usize) -> Result<Self::Ids>;
    fn upload(&self, dst: View<Self>, src: &[f32]);
    fn download(&self, src: View<Self>, dst: &mut [f32]);
    /// Writes `src` at the start of `dst` (interior mutability: ids are rewritten every step).
    fn upload_ids(&self, dst: &Self::Ids, src: &[u32]);
    fn fill(&self, x: View<Self>, value: f32);
    /// dst += src (the residual connections; same length).
    fn add_assign(&self, dst: View<Self>, src: View<Self>);

    // -- the kernels, each forward beside its backward ---------------------------------------
    fn matmul(&self, c: View<Self>, a: View<Self>, b: View<Self>, mm: Matmul);

    /// out[r] = table[ids[r]] for `rows` rows of `dim`.
    fn embedding_forward(
        &self,
        out: View<Self>,
        table: View<Self>,
        ids: &Self::Ids,
        rows: usize,
        dim: usize,
    );
    /// dtable[ids[r]] += dout[r].
    fn embedding_backward(
        &self,
        dtable: View<Self>,
        dout: View<Self>,
        ids: &Self::Ids,
        rows: usize,
        dim: usize,
    );

    /// out = x * rstd * w per row, rstd = 1 / sqrt(mean(x^2) + eps) (kept for the backward).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_forward(
        &self,
        out: View<Self>,
        rstd: View<Self>,
        x: View<Self>,
        w: View<Self>,
        rows: usize,
        dim: usize,
        eps: f32,
    );
    /// dx (+)= the input gradient (added when `accumulate`); dw += the weight gradient.
    #[allow(clippy::too_many_arguments)]
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
    );

    /// Rotates the q and k heads of `qkv` in place (HF `rotate_half`), row t of each sequence at
    /// position `pos0 + t`; `cos`/`sin` are [positions, Dh / 2].
    fn rope_forward(
        &self,
        qkv: View<Self>,
        cos: View<Self>,
        sin: View<Self>,
        shape: Attention,
        pos0: usize,
    );
    /// The transpose rotation, in place on the q and k parts of `dqkv`.
    fn rope_backward(
        &self,
        dqkv: View<Self>,
        cos: View<Self>,
        sin: View<Self>,
        shape: Attention,
        pos0: usize,
    );

    /// Causal attention: out [B, T, H * Dh], lse [B, H, T] (log-sum-exp of each score row, for
    /// the backward). Tiled with an online softmax: no T x T matrix.
    fn attention_forward(
        &self,
        out: View<Self>,
        lse: View<Self>,
        qkv: View<Self>,
        shape: Attention,
    );
    /// Copies the k and v heads of `qkv`'s rows into the caches `k`, `v` ([B, cache_len, K * Dh]
    /// each) at positions pos0..pos0 + T.
    fn kv_store(
        &self,
        k: View<Self>,
        v: View<Self>,
        qkv: View<Self>,
        shape: Attention,
        cache_len: usize,
        pos0: usize,
    );
    /// Causal attention of `qkv`'s query rows (positions pos0..pos0 + T) over the cached keys
    /// and values 0..pos0 + T, the first `pads[b]` positions of batch row b being left padding
    /// that no real query sees (generation; no backward).
    #[allow(clippy::too_many_arguments)]
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
    );
    /// Writes every element of dqkv (the gradient of q, k and v) from dout.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dqkv: View<Self>,
        dout: View<Self>,
        out: View<Self>,
        lse: View<Self>,
        qkv: View<Self>,
        shape: Attention,
    );

    /// out[r] = silu(gate[r]) * up[r], `gate_up` rows `[gate: F | up: F]`.
    fn swiglu_forward(&self, out: View<Self>, gate_up: View<Self>, rows: usize, ffn: usize);
    fn swiglu_backward(
        &self,
        dgate_up: View<Self>,
        dout: View<Self>,
        gate_up: View<Self>,
        rows: usize,
        ffn: usize,
    );

    /// losses[r] = logsumexp(logits[r]) - logits[r, targets[r]] (0 where the target is
    /// [`IGNORE`]); with `grad_scale`, logits[r] is overwritten in place by
    /// grad_scale * (softmax(logits[r]) - onehot(targets[r])).
    fn cross_entropy(
        &self,
        losses: View<Self>,
        logits: View<Self>,
        targets: &Self::Ids,
        rows: usize,
        vocab: usize,
        grad_scale: Option<f32>,
    );

    /// sum(x^2) in f64, the same value for any thread count.
    fn sum_squares(&self, x: View<Self>) -> f64;
    // -- convolutional inference (NHWC, forward only: the FID network) ----------------------
    /// The patches of `x` [batch, h, w, c] under each window position, as rows
    /// `col` [out_rows, kh * kw * c] in (kh, kw, c) order, zero where the window is over the
    /// padding; a conv is then `matmul(out, col, weight[c_out, kh * kw * c], trans_b)`.
    fn im2col(&self, col: View<Self>, x: View<Self>, g: Window);
    /// x[r, c] = max(x[r, c] + bias[c], 0) in place for `rows` rows of `channels`.
    fn bias_relu(&self, x: View<Self>, bias: View<Self>, rows: usize, channels: usize);
    /// Max over the window's real pixels (padding never wins, as torch's -inf padding).
    fn max_pool(&self, out: View<Self>, x: View<Self>, g: Window);
    /// Mean over the window's real pixels (torch's `count_include_pad=False`).
    fn avg_pool(&self, out: View<Self>, x: View<Self>, g: Window);
    /// Copies `src` [rows, c] into columns c0..c0 + c of `dst` [rows, dst_c] (a channel concat).
    fn copy_columns(
        &self,
        dst: View<Self>,
        src: View<Self>,
        rows: usize,
        c: usize,
        dst_c: usize,
        c0: usize,
    );
    /// out[b, c] = mean over the `pixels` rows of image b of x [batch, pixels, c].
    fn global_avg_pool(
        &self,
        out: View<Self>,
        x: View<Self>,
        batch: usize,
        pixels: usize,
        c: usize,
    );

    /// One AdamW update over `spans` of the flat parameter and gradient buffers, weight decay
    /// where the flag is set. The moments hold only the spans' part of the buffers: a span at
    /// `off` is at `off - moments_base` in `m` and `v` (ZeRO-1: a rank's slice).
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
    );
}

/// A target that is not scored (padding).
pub const IGNORE: u32 = u32::MAX;
