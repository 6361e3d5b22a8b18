//! Every kernel of a backend on fixed pseudo-random inputs, compared with another backend on
//! the same inputs: how a new backend (CUDA) is checked against the CPU one
//! (`codeclm bench kernels --device cuda`). Shapes are small and deliberately ragged (a
//! sequence of 37, grouped-query attention, a conv window with padding and stride 2).

use codeclm_engine::backend::{AdamW, Attention, Backend, Matmul, Span, View, Window};

use crate::rng::Rng;
use crate::Result;

/// One output of one kernel on two backends.
#[derive(Clone, Debug)]
pub struct KernelDiff {
    pub kernel: String,
    pub values: usize,
    /// Largest |a - b|, and that over the largest |a| (0 when both are zero).
    pub max_abs: f64,
    pub max_rel: f64,
}

/// `n` floats uniform in [-scale, scale), from the project's SplitMix64.
fn uniform(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.uniform() * 2.0 - 1.0) as f32 * scale)
        .collect()
}

fn whole(n: usize) -> Span {
    Span { off: 0, len: n }
}

/// The first `n` elements of `b`.
fn v<K: Backend>(b: &K::Buf, n: usize) -> View<'_, K> {
    View::new(b, whole(n))
}

/// Attention forward and backward on `qkv` (random output gradients): pushes the output, the
/// log-sum-exp and dqkv as "attention_forward{suffix}" ..., returns the output and lse buffers.
fn attention<K: Backend>(
    be: &K,
    rng: &mut Rng,
    out: &mut Vec<(String, Vec<f32>)>,
    qkv: &K::Buf,
    s: Attention,
    suffix: &str,
) -> Result<(K::Buf, K::Buf)> {
    let down = |b: &K::Buf, n: usize| -> Vec<f32> {
        let mut h = vec![0f32; n];
        be.download(v::<K>(b, n), &mut h);
        h
    };
    let (bt, row, d_out) = (s.batch * s.seq, s.row(), s.heads * s.head_dim);
    let nl = s.batch * s.heads * s.seq;
    let (att, lse) = (be.alloc(bt * d_out)?, be.alloc(nl)?);
    be.attention_forward(v(&att, bt * d_out), v(&lse, nl), v(qkv, bt * row), s);
    out.push((format!("attention_forward{suffix}"), down(&att, bt * d_out)));
    out.push((format!("attention_forward lse{suffix}"), down(&lse, nl)));
    let datt = be.alloc(bt * d_out)?;
    be.upload(v(&datt, bt * d_out), &uniform(rng, bt * d_out, 1.0));
    let dqkv = be.alloc(bt * row)?;
    be.attention_backward(
        v(&dqkv, bt * row),
        v(&datt, bt * d_out),
        v(&att, bt * d_out),
        v(&lse, nl),
        v(qkv, bt * row),
        s,
    );
    out.push((format!("attention_backward{suffix}"), down(&dqkv, bt * row)));
    Ok((att, lse))
}

/// Runs every kernel on `be`, returning each output by name (host copies).
pub fn run_all<K: Backend>(be: &K, seed: u64) -> Result<Vec<(String, Vec<f32>)>> {
    let mut rng = Rng::new(seed);
    let mut out: Vec<(String, Vec<f32>)> = Vec::new();
    let up = |v: &[f32]| -> Result<K::Buf> {
        let b = be.alloc(v.len())?;
        be.upload(View::new(&b, whole(v.len())), v);
        Ok(b)
    };
    let down = |b: &K::Buf, n: usize| -> Vec<f32> {
        let mut h = vec![0f32; n];
        be.download(View::new(b, whole(n)), &mut h);
        h
    };

    // Memory and elementwise.
    let x = uniform(&mut rng, 1000, 1.0);
    let (xb, yb) = (up(&x)?, up(&uniform(&mut rng, 1000, 1.0))?);
    be.add_assign(v(&xb, 1000), v(&yb, 1000));
    out.push(("add_assign".into(), down(&xb, 1000)));
    be.fill(View::new(&xb, Span { off: 100, len: 300 }), 0.5);
    out.push(("fill".into(), down(&xb, 1000)));
    out.push((
        "sum_squares".into(),
        vec![be.sum_squares(v(&yb, 1000)) as f32],
    ));

    // Matmuls, every layout, with and without accumulation.
    let (m, n, k) = (37, 29, 23);
    let (a, b) = (
        up(&uniform(&mut rng, m * k, 1.0))?,
        up(&uniform(&mut rng, k * n, 1.0))?,
    );
    for (ta, tb, acc) in [
        (false, false, false),
        (true, false, false),
        (false, true, false),
        (true, true, true),
    ] {
        let c = up(&uniform(&mut rng, m * n, 1.0))?;
        let mm = Matmul {
            m,
            n,
            k,
            trans_a: ta,
            trans_b: tb,
            accumulate: acc,
        };
        be.matmul(v(&c, m * n), v(&a, m * k), v(&b, k * n), mm);
        out.push((format!("matmul ta={ta} tb={tb} acc={acc}"), down(&c, m * n)));
    }

    // Embedding.
    let (rows, dim, vocab) = (74, 64, 131);
    let ids: Vec<u32> = (0..rows).map(|i| ((i * 7919) % 40) as u32).collect();
    let idb = be.alloc_ids(rows)?;
    be.upload_ids(&idb, &ids);
    let table = up(&uniform(&mut rng, vocab * dim, 1.0))?;
    let e = be.alloc(rows * dim)?;
    be.embedding_forward(v(&e, rows * dim), v(&table, vocab * dim), &idb, rows, dim);
    out.push(("embedding_forward".into(), down(&e, rows * dim)));
    let dtable = be.alloc(vocab * dim)?;
    let de = up(&uniform(&mut rng, rows * dim, 1.0))?;
    be.embedding_backward(v(&dtable, vocab * dim), v(&de, rows * dim), &idb, rows, dim);
    out.push(("embedding_backward".into(), down(&dtable, vocab * dim)));

    // RMSNorm.
    let (xn, wn) = (
        up(&uniform(&mut rng, rows * dim, 2.0))?,
        up(&uniform(&mut rng, dim, 1.0))?,
    );
    let (yn, rstd) = (be.alloc(rows * dim)?, be.alloc(rows)?);
    be.rmsnorm_forward(
        v(&yn, rows * dim),
        v(&rstd, rows),
        v(&xn, rows * dim),
        v(&wn, dim),
        rows,
        dim,
        1e-5,
    );
    out.push(("rmsnorm_forward".into(), down(&yn, rows * dim)));
    out.push(("rmsnorm_forward rstd".into(), down(&rstd, rows)));
    let g = up(&uniform(&mut rng, rows * dim, 1.0))?;
    let (dx, dw) = (
        up(&uniform(&mut rng, rows * dim, 1.0))?,
        up(&uniform(&mut rng, dim, 1.0))?,
    );
    be.rmsnorm_backward(
        v(&dx, rows * dim),
        v(&dw, dim),
        v(&g, rows * dim),
        v(&xn, rows * dim),
        v(&wn, dim),
        v(&rstd, rows),
        rows,
        dim,
        true,
    );
    out.push(("rmsnorm_backward dx".into(), down(&dx, rows * dim)));
    out.push(("rmsnorm_backward dw".into(), down(&dw, dim)));

    // RoPE and attention: batch 2 x 37 positions, 4 query heads over 2 key/value heads of 32.
    let s = Attention {
        batch: 2,
        seq: 37,
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
    };
    let (bt, row, half, positions) = (s.batch * s.seq, s.row(), s.head_dim / 2, 64);
    let angles: Vec<f32> = (0..positions * half)
        .map(|i| (i / half) as f32 * 0.1 / (1 + i % half) as f32)
        .collect();
    let cos = up(&angles.iter().map(|a| a.cos()).collect::<Vec<_>>())?;
    let sin = up(&angles.iter().map(|a| a.sin()).collect::<Vec<_>>())?;
    let qkv = up(&uniform(&mut rng, bt * row, 1.0))?;
    let table_len = positions * half;
    be.rope_forward(
        v(&qkv, bt * row),
        v(&cos, table_len),
        v(&sin, table_len),
        s,
        3,
    );
    out.push(("rope_forward".into(), down(&qkv, bt * row)));
    let dq = up(&uniform(&mut rng, bt * row, 1.0))?;
    be.rope_backward(
        v(&dq, bt * row),
        v(&cos, table_len),
        v(&sin, table_len),
        s,
        3,
    );
    out.push(("rope_backward".into(), down(&dq, bt * row)));
    let d_out = s.heads * s.head_dim;
    attention(be, &mut rng, &mut out, &qkv, s, "")?;
    // Several query and key tiles of the flash kernels (150 positions, groups of 3 heads, a head
    // of 48), and a head too large for them (160: the warp kernels).
    for (name, t) in [
        (
            " (tiles)",
            Attention {
                batch: 1,
                seq: 150,
                heads: 6,
                kv_heads: 2,
                head_dim: 48,
            },
        ),
        (
            " (large head)",
            Attention {
                batch: 1,
                seq: 20,
                heads: 2,
                kv_heads: 1,
                head_dim: 160,
            },
        ),
    ] {
        let x = up(&uniform(&mut rng, t.batch * t.seq * t.row(), 1.0))?;
        attention(be, &mut rng, &mut out, &x, t, name)?;
    }
    // The KV cache: all 37 positions stored at 5.., queries over them with left padding.
    let (cache_len, pos0) = (48, 5);
    let kvd = s.kv_heads * s.head_dim;
    let (kc, vc) = (
        up(&uniform(&mut rng, s.batch * cache_len * kvd, 1.0))?,
        up(&uniform(&mut rng, s.batch * cache_len * kvd, 1.0))?,
    );
    be.kv_store(
        v(&kc, s.batch * cache_len * kvd),
        v(&vc, s.batch * cache_len * kvd),
        v(&qkv, bt * row),
        s,
        cache_len,
        pos0,
    );
    out.push(("kv_store k".into(), down(&kc, s.batch * cache_len * kvd)));
    out.push(("kv_store v".into(), down(&vc, s.batch * cache_len * kvd)));
    let cached = be.alloc(bt * d_out)?;
    be.attention_cached(
        v(&cached, bt * d_out),
        v(&qkv, bt * row),
        v(&kc, s.batch * cache_len * kvd),
        v(&vc, s.batch * cache_len * kvd),
        s,
        cache_len,
        pos0,
        &[0, 9],
    );
    out.push(("attention_cached".into(), down(&cached, bt * d_out)));

    // SwiGLU and cross-entropy.
    let ffn = 96;
    let gu = up(&uniform(&mut rng, rows * 2 * ffn, 3.0))?;
    let sw = be.alloc(rows * ffn)?;
    be.swiglu_forward(v(&sw, rows * ffn), v(&gu, rows * 2 * ffn), rows, ffn);
    out.push(("swiglu_forward".into(), down(&sw, rows * ffn)));
    let (dsw, dgu) = (
        up(&uniform(&mut rng, rows * ffn, 1.0))?,
        be.alloc(rows * 2 * ffn)?,
    );
    be.swiglu_backward(
        v(&dgu, rows * 2 * ffn),
        v(&dsw, rows * ffn),
        v(&gu, rows * 2 * ffn),
        rows,
        ffn,
    );
    out.push(("swiglu_backward".into(), down(&dgu, rows * 2 * ffn)));
    let mut targets: Vec<u32> = (0..rows).map(|i| ((i * 31) % vocab) as u32).collect();
    targets[5] = codeclm_engine::IGNORE;
    let tb = be.alloc_ids(rows)?;
    be.upload_ids(&tb, &targets);
    let logits = up(&uniform(&mut rng, rows * vocab, 4.0))?;
    let losses = be.alloc(rows)?;
    be.cross_entropy(
        v(&losses, rows),
        v(&logits, rows * vocab),
        &tb,
        rows,
        vocab,
        Some(0.25),
    );
    out.push(("cross_entropy loss".into(), down(&losses, rows)));
    out.push(("cross_entropy grad".into(), down(&logits, rows * vocab)));

    // AdamW over two spans (one decayed), moments of the second half only (ZeRO-1's layout).
    let np = 600;
    let (p, gr) = (
        up(&uniform(&mut rng, np, 1.0))?,
        up(&uniform(&mut rng, np, 0.1))?,
    );
    let (mm, vv) = (
        up(&uniform(&mut rng, np / 2, 0.01))?,
        up(&uniform(&mut rng, np / 2, 0.01)
            .iter()
            .map(|x| x.abs())
            .collect::<Vec<_>>())?,
    );
    let spans = [
        (Span { off: 300, len: 120 }, true),
        (Span { off: 420, len: 180 }, false),
    ];
    let hp = AdamW {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 3,
        grad_scale: 0.7,
    };
    be.adamw(&p, &gr, &mm, &vv, &spans, 300, hp);
    out.push(("adamw params".into(), down(&p, np)));
    out.push(("adamw m".into(), down(&mm, np / 2)));
    out.push(("adamw v".into(), down(&vv, np / 2)));

    // Convolutional inference.
    let w = Window {
        batch: 2,
        h: 9,
        w: 7,
        c: 5,
        kh: 3,
        kw: 3,
        stride: 2,
        pad_h: 1,
        pad_w: 1,
    };
    let img = up(&uniform(&mut rng, w.in_len(), 1.0))?;
    let col = be.alloc(w.out_rows() * w.col_width())?;
    be.im2col(
        v(&col, w.out_rows() * w.col_width()),
        v(&img, w.in_len()),
        w,
    );
    out.push(("im2col".into(), down(&col, w.out_rows() * w.col_width())));
    let pooled = be.alloc(w.out_rows() * w.c)?;
    be.max_pool(v(&pooled, w.out_rows() * w.c), v(&img, w.in_len()), w);
    out.push(("max_pool".into(), down(&pooled, w.out_rows() * w.c)));
    be.avg_pool(v(&pooled, w.out_rows() * w.c), v(&img, w.in_len()), w);
    out.push(("avg_pool".into(), down(&pooled, w.out_rows() * w.c)));
    let bias = up(&uniform(&mut rng, w.c, 1.0))?;
    be.bias_relu(v(&img, w.in_len()), v(&bias, w.c), w.in_len() / w.c, w.c);
    out.push(("bias_relu".into(), down(&img, w.in_len())));
    let px = w.batch * w.h * w.w;
    let wide = up(&uniform(&mut rng, px * 12, 1.0))?;
    be.copy_columns(v(&wide, px * 12), v(&img, w.in_len()), px, w.c, 12, 4);
    out.push(("copy_columns".into(), down(&wide, px * 12)));
    let gap = be.alloc(w.batch * 12)?;
    be.global_avg_pool(
        v(&gap, w.batch * 12),
        v(&wide, px * 12),
        w.batch,
        w.h * w.w,
        12,
    );
    out.push(("global_avg_pool".into(), down(&gap, w.batch * 12)));
    be.status()?;
    Ok(out)
}

/// Every kernel output of `b` against `a` on the same inputs.
pub fn compare<A: Backend, B: Backend>(a: &A, b: &B, seed: u64) -> Result<Vec<KernelDiff>> {
    let (ra, rb) = (run_all(a, seed)?, run_all(b, seed)?);
    Ok(ra
        .into_iter()
        .zip(rb)
        .map(|((name, x), (_, y))| {
            let max_abs = x
                .iter()
                .zip(&y)
                .map(|(p, q)| (p - q).abs() as f64)
                .fold(0.0, f64::max);
            let scale = x.iter().map(|p| p.abs() as f64).fold(0.0, f64::max);
            KernelDiff {
                kernel: name,
                values: x.len(),
                max_abs,
                max_rel: if scale > 0.0 {
                    max_abs / scale
                } else {
                    max_abs
                },
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The harness itself: deterministic on the CPU (the same outputs twice, the CPU backend
    /// being thread-count independent), every output finite, the IGNORE row zero.
    #[test]
    fn cpu_against_cpu_is_exact() {
        let cpu = codeclm_engine::Cpu::new();
        let d = compare(&cpu, &codeclm_engine::Cpu::new(), 7).unwrap();
        assert!(d.len() >= 30, "{} outputs", d.len());
        for k in &d {
            assert_eq!(k.max_abs, 0.0, "{}", k.kernel);
        }
        let out = run_all(&cpu, 7).unwrap();
        for (name, v) in &out {
            assert!(v.iter().all(|x| x.is_finite()), "{name}");
        }
        let grad = &out
            .iter()
            .find(|(n, _)| n == "cross_entropy grad")
            .unwrap()
            .1;
        assert!(grad[5 * 131..6 * 131].iter().all(|&x| x == 0.0));
    }
}
