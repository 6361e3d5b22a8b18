//! Fused CPU kernels **with a backward pass** for the ops that dominate a small Llama's training
//! step on candle's CPU backend, where every composed op is a separate single-threaded pass with
//! its own allocation: RMSNorm, RoPE, causal softmax, SwiGLU and cross-entropy.
//!
//! Each forward is a `CustomOp` whose `bwd` is another fused kernel (so gradients flow, unlike
//! candle's own `ops::rms_norm` / `rotary_emb::rope`, whose gradient is silently zero). Rows are
//! split into fixed chunks run on rayon, and reductions across rows sum per-chunk partials in a
//! fixed order: results do not depend on the thread count or on scheduling (exact resume).
//! On other devices and dtypes the composed, differentiable versions in `llama.rs` are used; the
//! tests check both give the same values and gradients.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

/// Fused kernels apply to contiguous f32 tensors on the CPU.
pub fn fusable(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> CResult<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("fused op: f32 input required")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("fused op: contiguous input required"),
    }
}

fn u32s<'a>(s: &'a CpuStorage, l: &Layout) -> CResult<&'a [u32]> {
    let CpuStorage::U32(v) = s else {
        bail!("fused op: u32 targets required")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("fused op: contiguous targets required"),
    }
}

/// Rows per parallel task: enough work per task, independent of the thread count.
fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

/// out[r] = f(r, row r) over rows of `row_len`, in parallel.
fn map_rows(n_rows: usize, row_len: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; n_rows * row_len];
    let per = rows_per_task(row_len);
    out.par_chunks_mut(per * row_len)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (k, row) in chunk.chunks_mut(row_len).enumerate() {
                f(c * per + k, row);
            }
        });
    out
}

/// Sum over rows of f(row index) (each a vector of `width`), deterministic: per-chunk partials
/// in parallel, then added in chunk order.
fn sum_rows(n_rows: usize, width: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let per = 64;
    let chunks = n_rows.div_ceil(per);
    let partials: Vec<Vec<f32>> = (0..chunks)
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![0f32; width];
            for r in c * per..((c + 1) * per).min(n_rows) {
                f(r, &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![0f32; width];
    for p in partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = x * r * w, r = 1 / sqrt(mean(x^2) + eps)

struct RmsNorm {
    eps: f32,
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, w) = (f32s(s1, l1)?, f32s(s2, l2)?);
        let d = w.len();
        let out = map_rows(x.len() / d, d, |r, y| {
            let xr = &x[r * d..(r + 1) * d];
            let s = inv_rms(xr, self.eps);
            for i in 0..d {
                y[i] = xr[i] * s * w[i];
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = x.apply_op3_no_bwd(
            w,
            &g,
            &RmsNormBwd {
                eps: self.eps,
                want_dw: false,
            },
        )?;
        let dw = x.apply_op3_no_bwd(
            w,
            &g,
            &RmsNormBwd {
                eps: self.eps,
                want_dw: true,
            },
        )?;
        Ok((Some(dx), Some(dw)))
    }
}

struct RmsNormBwd {
    eps: f32,
    want_dw: bool,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, w, g) = (f32s(s1, l1)?, f32s(s2, l2)?, f32s(s3, l3)?);
        let d = w.len();
        let n = x.len() / d;
        if self.want_dw {
            let dw = sum_rows(n, d, |r, acc| {
                let xr = &x[r * d..(r + 1) * d];
                let s = inv_rms(xr, self.eps);
                for i in 0..d {
                    acc[i] += g[r * d + i] * xr[i] * s;
                }
            });
            return Ok((CpuStorage::F32(dw), l2.shape().clone()));
        }
        let out = map_rows(n, d, |r, dx| {
            let xr = &x[r * d..(r + 1) * d];
            let gr = &g[r * d..(r + 1) * d];
            let s = inv_rms(xr, self.eps);
            // dn = g * w; dx = s * (dn - n * mean(dn * n)), n = x * s
            let mut dot = 0f32;
            for i in 0..d {
                dot += gr[i] * w[i] * xr[i] * s;
            }
            let mean = dot / d as f32;
            for i in 0..d {
                dx[i] = s * (gr[i] * w[i] - xr[i] * s * mean);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// RMSNorm over the last dim (x contiguous f32 on CPU; weight [D]).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> CResult<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

// ---------------------------------------------------------------------------------------------
// RoPE (HF rotate_half): y = x * cos + rotate_half(x) * sin, x [B, H, T, Dh], cos/sin [T, Dh]

struct Rope {
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, cos, sin) = (f32s(s1, l1)?, f32s(s2, l2)?, f32s(s3, l3)?);
        let dims = l1.shape().dims();
        let (t, dh) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let h = dh / 2;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let out = map_rows(x.len() / dh, dh, |r, y| {
            let p = r % t;
            let xr = &x[r * dh..(r + 1) * dh];
            let (c, s) = (&cos[p * dh..(p + 1) * dh], &sin[p * dh..(p + 1) * dh]);
            for i in 0..h {
                y[i] = xr[i] * c[i] - sign * xr[i + h] * s[i];
                y[i + h] = xr[i + h] * c[i + h] + sign * xr[i] * s[i + h];
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The rotation's transpose is the rotation by -angle.
        let dx = g.contiguous()?.apply_op3_no_bwd(
            cos,
            sin,
            &Rope {
                inverse: !self.inverse,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

/// RoPE of x [B, H, T, Dh] with tables cos/sin [T, Dh] (already narrowed to the positions).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope { inverse: false },
    )
}

// ---------------------------------------------------------------------------------------------
// Causal softmax: y = softmax(scale * x + mask) over the last dim of [.., T, S], where query i
// (absolute position S - T + i) sees keys j <= S - T + i.

struct CausalSoftmax {
    scale: f32,
    t: usize,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32s(s, l)?;
        let sdim = *l.shape().dims().last().unwrap_or(&1);
        let offset = sdim - self.t;
        let out = map_rows(x.len() / sdim, sdim, |r, y| {
            let visible = offset + r % self.t + 1;
            let xr = &x[r * sdim..r * sdim + visible];
            let max = xr.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * self.scale;
            let mut sum = 0f32;
            for j in 0..visible {
                let e = (xr[j] * self.scale - max).exp();
                y[j] = e;
                sum += e;
            }
            let inv = 1.0 / sum;
            for v in y[..visible].iter_mut() {
                *v *= inv;
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, res: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        let dx = res.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwd { scale: self.scale })?;
        Ok(Some(dx))
    }
}

struct SoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-softmax-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (y, g) = (f32s(s1, l1)?, f32s(s2, l2)?);
        let sdim = *l1.shape().dims().last().unwrap_or(&1);
        let out = map_rows(y.len() / sdim, sdim, |r, dx| {
            let (yr, gr) = (&y[r * sdim..(r + 1) * sdim], &g[r * sdim..(r + 1) * sdim]);
            let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for j in 0..sdim {
                dx[j] = self.scale * yr[j] * (gr[j] - dot);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// softmax(scale * scores) with a causal mask, scores [B, H, T, S] (S = cached + T).
pub fn causal_softmax(scores: &Tensor, scale: f64) -> CResult<Tensor> {
    let t = scores.dim(candle_core::D::Minus2)?;
    scores.contiguous()?.apply_op1(CausalSoftmax {
        scale: scale as f32,
        t,
    })
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: y = silu(gate) * up

struct SwiGlu;

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (a, b) = (f32s(s1, l1)?, f32s(s2, l2)?);
        let w = *l1.shape().dims().last().unwrap_or(&1);
        let out = map_rows(a.len() / w, w, |r, y| {
            for i in 0..w {
                let v = a[r * w + i];
                y[i] = v * sigmoid(v) * b[r * w + i];
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let da = a.apply_op3_no_bwd(b, &g, &SwiGluBwd { wrt_gate: true })?;
        let db = a.apply_op3_no_bwd(b, &g, &SwiGluBwd { wrt_gate: false })?;
        Ok((Some(da), Some(db)))
    }
}

struct SwiGluBwd {
    wrt_gate: bool,
}

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "fused-swiglu-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (a, b, g) = (f32s(s1, l1)?, f32s(s2, l2)?, f32s(s3, l3)?);
        let w = *l1.shape().dims().last().unwrap_or(&1);
        let out = map_rows(a.len() / w, w, |r, d| {
            for i in 0..w {
                let k = r * w + i;
                let s = sigmoid(a[k]);
                d[i] = if self.wrt_gate {
                    g[k] * b[k] * s * (1.0 + a[k] * (1.0 - s))
                } else {
                    g[k] * a[k] * s
                };
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

pub fn swiglu(gate: &Tensor, up: &Tensor) -> CResult<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy per row: loss[n] = logsumexp(logits[n]) - logits[n, target[n]]

struct CrossEntropy;

fn logsumexp(x: &[f32]) -> f32 {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    max + x.iter().map(|v| (v - max).exp()).sum::<f32>().ln()
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, t) = (f32s(s1, l1)?, u32s(s2, l2)?);
        let v = *l1.shape().dims().last().unwrap_or(&1);
        let n = x.len() / v;
        if t.len() != n {
            bail!("cross-entropy: {} targets for {n} rows", t.len());
        }
        if let Some(bad) = t.iter().find(|&&k| k as usize >= v) {
            bail!("cross-entropy: target {bad} outside the vocabulary of {v}");
        }
        let out = map_rows(n, 1, |r, y| {
            let row = &x[r * v..(r + 1) * v];
            y[0] = logsumexp(row) - row[t[r] as usize];
        });
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(t, &g.contiguous()?, &CrossEntropyBwd)?;
        Ok((Some(dx), None))
    }
}

struct CrossEntropyBwd;

impl CustomOp3 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, t, g) = (f32s(s1, l1)?, u32s(s2, l2)?, f32s(s3, l3)?);
        let v = *l1.shape().dims().last().unwrap_or(&1);
        let out = map_rows(x.len() / v, v, |r, d| {
            let row = &x[r * v..(r + 1) * v];
            let lse = logsumexp(row);
            for j in 0..v {
                d[j] = g[r] * (row[j] - lse).exp();
            }
            d[t[r] as usize] -= g[r];
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Per-row cross-entropy of logits [N, V] against targets [N] (u32): [N].
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> CResult<Tensor> {
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, CrossEntropy)
}
