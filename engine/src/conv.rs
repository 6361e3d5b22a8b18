//! The CPU backend's kernels for convolutional inference over NHWC tensors (the FID network):
//! im2col, bias + ReLU, max and average pooling over real pixels only, channel concat and the
//! global average pool. Plain loops over slices on rayon, the per-pixel channel loops compiled
//! for each SIMD level; chunks follow from the shapes only, so results do not depend on the
//! thread count.

use rayon::prelude::*;

use super::backend::Window;
use super::simd::multiversion;

/// Output pixels per task: about 16k floats of work, from the shape only.
fn pixels_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

/// The window's real rows (or columns) at output position `o`: input indices `i0..i1` and the
/// offset of `i0` in the window.
fn span(o: usize, stride: usize, pad: usize, k: usize, n: usize) -> (usize, usize, usize) {
    let start = (o * stride) as isize - pad as isize; // input index of the window's first tap
    let k0 = ((-start).max(0) as usize).min(k);
    let k1 = ((n as isize - start).max(0) as usize).min(k);
    let k1 = k1.max(k0);
    (
        (start + k0 as isize) as usize,
        (start + k1 as isize) as usize,
        k0,
    )
}

pub(crate) fn im2col(col: &mut [f32], x: &[f32], g: Window) {
    let (oh, ow, width) = (g.out_h(), g.out_w(), g.col_width());
    let rows = g.out_rows();
    assert!(
        col.len() >= rows * width && x.len() >= g.in_len(),
        "im2col {g:?}"
    );
    let per = pixels_per_task(width);
    col[..rows * width]
        .par_chunks_mut(per * width)
        .enumerate()
        .for_each(|(t, chunk)| {
            for (i, row) in chunk.chunks_exact_mut(width).enumerate() {
                let r = t * per + i;
                let (b, oy, ox) = (r / (oh * ow), r / ow % oh, r % ow);
                let (x0, x1, kx0) = span(ox, g.stride, g.pad_w, g.kw, g.w);
                let run = (x1 - x0) * g.c; // the real pixels of one window row, contiguous
                for ky in 0..g.kh {
                    let dst = &mut row[ky * g.kw * g.c..(ky + 1) * g.kw * g.c];
                    let iy = (oy * g.stride + ky) as isize - g.pad_h as isize;
                    if iy < 0 || iy as usize >= g.h || run == 0 {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = ((b * g.h + iy as usize) * g.w + x0) * g.c;
                    dst[..kx0 * g.c].fill(0.0);
                    dst[kx0 * g.c..kx0 * g.c + run].copy_from_slice(&x[src..src + run]);
                    dst[kx0 * g.c + run..].fill(0.0);
                }
            }
        });
}

multiversion! {
fn bias_relu_row(x: &mut [f32], bias: &[f32]) {
    for (v, b) in x.iter_mut().zip(bias) {
        *v = (*v + b).max(0.0);
    }
}
}

multiversion! {
fn add_row(acc: &mut [f32], x: &[f32]) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a += v;
    }
}
}

multiversion! {
fn max_row(acc: &mut [f32], x: &[f32]) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a = a.max(*v);
    }
}
}

multiversion! {
fn scale_row(x: &mut [f32], s: f32) {
    for v in x.iter_mut() {
        *v /= s;
    }
}
}

pub(crate) fn bias_relu(x: &mut [f32], bias: &[f32], rows: usize, channels: usize) {
    assert!(x.len() >= rows * channels && bias.len() >= channels);
    let per = pixels_per_task(channels);
    x[..rows * channels]
        .par_chunks_mut(per * channels)
        .for_each(|chunk| {
            for row in chunk.chunks_exact_mut(channels) {
                bias_relu_row(row, &bias[..channels]);
            }
        });
}

/// A pool over the window's real pixels: `max` or the mean (divided by their count).
pub(crate) fn pool(out: &mut [f32], x: &[f32], g: Window, max: bool) {
    let (oh, ow, c) = (g.out_h(), g.out_w(), g.c);
    let rows = g.out_rows();
    assert!(out.len() >= rows * c && x.len() >= g.in_len(), "pool {g:?}");
    let per = pixels_per_task(c * g.kh * g.kw);
    out[..rows * c]
        .par_chunks_mut(per * c)
        .enumerate()
        .for_each(|(t, chunk)| {
            for (i, acc) in chunk.chunks_exact_mut(c).enumerate() {
                let r = t * per + i;
                let (b, oy, ox) = (r / (oh * ow), r / ow % oh, r % ow);
                let (y0, y1, _) = span(oy, g.stride, g.pad_h, g.kh, g.h);
                let (x0, x1, _) = span(ox, g.stride, g.pad_w, g.kw, g.w);
                acc.fill(if max { f32::NEG_INFINITY } else { 0.0 });
                for iy in y0..y1 {
                    for ix in x0..x1 {
                        let at = ((b * g.h + iy) * g.w + ix) * c;
                        if max {
                            max_row(acc, &x[at..at + c]);
                        } else {
                            add_row(acc, &x[at..at + c]);
                        }
                    }
                }
                if !max {
                    scale_row(acc, ((y1 - y0) * (x1 - x0)) as f32);
                }
            }
        });
}

pub(crate) fn copy_columns(
    dst: &mut [f32],
    src: &[f32],
    rows: usize,
    c: usize,
    dst_c: usize,
    c0: usize,
) {
    assert!(c0 + c <= dst_c && dst.len() >= rows * dst_c && src.len() >= rows * c);
    let per = pixels_per_task(dst_c);
    dst[..rows * dst_c]
        .par_chunks_mut(per * dst_c)
        .enumerate()
        .for_each(|(t, chunk)| {
            for (i, row) in chunk.chunks_exact_mut(dst_c).enumerate() {
                let r = t * per + i;
                row[c0..c0 + c].copy_from_slice(&src[r * c..(r + 1) * c]);
            }
        });
}

pub(crate) fn global_avg_pool(out: &mut [f32], x: &[f32], batch: usize, pixels: usize, c: usize) {
    assert!(out.len() >= batch * c && x.len() >= batch * pixels * c);
    out[..batch * c]
        .par_chunks_mut(c)
        .enumerate()
        .for_each(|(b, acc)| {
            acc.fill(0.0);
            for p in 0..pixels {
                let at = (b * pixels + p) * c;
                add_row(acc, &x[at..at + c]);
            }
            scale_row(acc, pixels as f32);
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, Matmul, View};
    use crate::Cpu;

    /// SplitMix64 floats in [-1, 1).
    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// x[b, y, x, c] with y, x in padded coordinates: `None` over the padding.
    fn at(x: &[f32], g: &Window, b: usize, y: isize, xx: isize, c: usize) -> Option<f32> {
        let (y, xx) = (y - g.pad_h as isize, xx - g.pad_w as isize);
        if y < 0 || xx < 0 || y as usize >= g.h || xx as usize >= g.w {
            return None;
        }
        Some(x[((b * g.h + y as usize) * g.w + xx as usize) * g.c + c])
    }

    /// The convolution by the definition: out[b, oy, ox, o] = sum over (ky, kx, c) of the
    /// zero-padded input times w[o, c, ky, kx] (PyTorch's layout), in f64.
    fn naive_conv(x: &[f32], w: &[f32], g: &Window, c_out: usize) -> Vec<f32> {
        let mut out = Vec::new();
        for b in 0..g.batch {
            for oy in 0..g.out_h() {
                for ox in 0..g.out_w() {
                    for o in 0..c_out {
                        let mut s = 0f64;
                        for c in 0..g.c {
                            for ky in 0..g.kh {
                                for kx in 0..g.kw {
                                    let (y, xx) = (oy * g.stride + ky, ox * g.stride + kx);
                                    let v = at(x, g, b, y as isize, xx as isize, c).unwrap_or(0.0);
                                    s += v as f64
                                        * w[((o * g.c + c) * g.kh + ky) * g.kw + kx] as f64;
                                }
                            }
                        }
                        out.push(s as f32);
                    }
                }
            }
        }
        out
    }

    fn naive_pool(x: &[f32], g: &Window, max: bool) -> Vec<f32> {
        let mut out = Vec::new();
        for b in 0..g.batch {
            for oy in 0..g.out_h() {
                for ox in 0..g.out_w() {
                    for c in 0..g.c {
                        let vals: Vec<f32> = (0..g.kh)
                            .flat_map(|ky| (0..g.kw).map(move |kx| (ky, kx)))
                            .filter_map(|(ky, kx)| {
                                let (y, xx) = (oy * g.stride + ky, ox * g.stride + kx);
                                at(x, g, b, y as isize, xx as isize, c)
                            })
                            .collect();
                        out.push(if max {
                            vals.iter().copied().fold(f32::NEG_INFINITY, f32::max)
                        } else {
                            (vals.iter().map(|&v| v as f64).sum::<f64>() / vals.len() as f64) as f32
                        });
                    }
                }
            }
        }
        out
    }

    fn upload(cpu: &Cpu, v: &[f32]) -> crate::cpu::CpuBuf {
        let b = cpu.alloc(v.len()).unwrap();
        cpu.upload(
            View::new(
                &b,
                crate::Span {
                    off: 0,
                    len: v.len(),
                },
            ),
            v,
        );
        b
    }

    fn all(b: &crate::cpu::CpuBuf, len: usize) -> View<'_, Cpu> {
        View::new(b, crate::Span { off: 0, len })
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }

    fn window(batch: usize, h: usize, w: usize, c: usize, k: (usize, usize)) -> Window {
        Window {
            batch,
            h,
            w,
            c,
            kh: k.0,
            kw: k.1,
            stride: 1,
            pad_h: 0,
            pad_w: 0,
        }
    }

    /// im2col + matmul (weights permuted to [c_out, kh, kw, c]) against the definition, for the
    /// network's kinds of conv: square with and without padding, strided, and the 1x7 / 7x1 /
    /// 1x3 / 3x1 ones that pad one axis only; odd sizes so windows fall off the edges.
    #[test]
    fn im2col_conv_matches_direct_convolution() {
        let cpu = Cpu::new();
        let cases = [
            // (h, w, c, (kh, kw), stride, (pad_h, pad_w))
            (9, 7, 3, (3, 3), 2, (0, 0)),
            (7, 6, 4, (3, 3), 1, (1, 1)),
            (8, 9, 5, (5, 5), 1, (2, 2)),
            (9, 8, 3, (1, 7), 1, (0, 3)),
            (8, 9, 3, (7, 1), 1, (3, 0)),
            (5, 6, 6, (1, 3), 1, (0, 1)),
            (6, 5, 6, (3, 1), 1, (1, 0)),
            (10, 11, 2, (3, 3), 2, (1, 1)),
            (3, 3, 2, (3, 3), 1, (2, 2)), // windows wholly over the padding at the corners
        ];
        for (i, &(h, w, c, k, stride, (pad_h, pad_w))) in cases.iter().enumerate() {
            let g = Window {
                stride,
                pad_h,
                pad_w,
                ..window(2, h, w, c, k)
            };
            let c_out = 5;
            let x = random(g.in_len(), i as u64);
            let wt = random(c_out * c * k.0 * k.1, 100 + i as u64); // [o, c, ky, kx]
            let mut wp = vec![0f32; wt.len()]; // [o, ky, kx, c]
            for o in 0..c_out {
                for ci in 0..c {
                    for ky in 0..k.0 {
                        for kx in 0..k.1 {
                            wp[((o * k.0 + ky) * k.1 + kx) * c + ci] =
                                wt[((o * c + ci) * k.0 + ky) * k.1 + kx];
                        }
                    }
                }
            }
            let (rows, width) = (g.out_rows(), g.col_width());
            let (xb, wb) = (upload(&cpu, &x), upload(&cpu, &wp));
            let col = cpu.alloc(rows * width).unwrap();
            let out = cpu.alloc(rows * c_out).unwrap();
            cpu.im2col(all(&col, rows * width), all(&xb, x.len()), g);
            let mm = Matmul {
                m: rows,
                n: c_out,
                k: width,
                trans_a: false,
                trans_b: true,
                accumulate: false,
            };
            cpu.matmul(
                all(&out, rows * c_out),
                all(&col, rows * width),
                all(&wb, wp.len()),
                mm,
            );
            let mut got = vec![0f32; rows * c_out];
            cpu.download(all(&out, got.len()), &mut got);
            let want = naive_conv(&x, &wt, &g, c_out);
            let d = max_diff(&got, &want);
            assert!(d < 1e-5, "case {i} {g:?}: conv differs by {d}");
        }
    }

    /// The network's pools: 3x3 stride 2 without padding, and 3x3 stride 1 padding 1 where the
    /// average counts only the real pixels (4 at a corner, 6 on an edge) and the max ignores
    /// the padding (all-negative inputs would otherwise pick 0 at the borders).
    #[test]
    fn pools_match_direct_loops() {
        let cpu = Cpu::new();
        for (i, &(h, w, stride, pad)) in [(9, 7, 2, 0), (8, 8, 2, 0), (5, 6, 1, 1), (1, 2, 1, 1)]
            .iter()
            .enumerate()
        {
            let g = Window {
                stride,
                pad_h: pad,
                pad_w: pad,
                ..window(2, h, w, 19, (3, 3))
            };
            // Negative inputs: a max that let the padding in would return 0 at the borders.
            let x: Vec<f32> = random(g.in_len(), 7 + i as u64)
                .iter()
                .map(|v| v - 2.0)
                .collect();
            let xb = upload(&cpu, &x);
            let n = g.out_rows() * g.c;
            let out = cpu.alloc(n).unwrap();
            for max in [true, false] {
                if max {
                    cpu.max_pool(all(&out, n), all(&xb, x.len()), g);
                } else {
                    cpu.avg_pool(all(&out, n), all(&xb, x.len()), g);
                }
                let mut got = vec![0f32; n];
                cpu.download(all(&out, n), &mut got);
                let want = naive_pool(&x, &g, max);
                let d = max_diff(&got, &want);
                assert!(d < 1e-6, "case {i} max={max}: pool differs by {d}");
                if !max && pad == 1 {
                    // The corner averages its 2x2 real pixels (count_include_pad=False).
                    let c0 = |yy: usize, xx: usize| x[(yy * w + xx) * g.c];
                    let (y1, x1) = (1.min(h - 1), 1.min(w - 1));
                    let mut real = vec![c0(0, 0)];
                    if x1 > 0 {
                        real.push(c0(0, x1));
                    }
                    if y1 > 0 {
                        real.push(c0(y1, 0));
                    }
                    if x1 > 0 && y1 > 0 {
                        real.push(c0(y1, x1));
                    }
                    let mean = real.iter().sum::<f32>() / real.len() as f32;
                    assert!((got[0] - mean).abs() < 1e-6, "corner {} vs {mean}", got[0]);
                }
            }
        }
    }

    #[test]
    fn bias_relu_concat_and_global_pool() {
        let cpu = Cpu::new();
        let (rows, c, dst_c, c0) = (13, 5, 12, 4);
        let x = random(rows * c, 1);
        let bias = random(c, 2);
        let (xb, bb) = (upload(&cpu, &x), upload(&cpu, &bias));
        cpu.bias_relu(all(&xb, x.len()), all(&bb, c), rows, c);
        let mut y = vec![0f32; x.len()];
        cpu.download(all(&xb, y.len()), &mut y);
        for r in 0..rows {
            for j in 0..c {
                assert_eq!(y[r * c + j], (x[r * c + j] + bias[j]).max(0.0));
            }
        }
        let dst = upload(&cpu, &vec![7.0; rows * dst_c]);
        cpu.copy_columns(
            all(&dst, rows * dst_c),
            all(&xb, rows * c),
            rows,
            c,
            dst_c,
            c0,
        );
        let mut d = vec![0f32; rows * dst_c];
        cpu.download(all(&dst, d.len()), &mut d);
        for r in 0..rows {
            for j in 0..dst_c {
                let want = if (c0..c0 + c).contains(&j) {
                    y[r * c + j - c0]
                } else {
                    7.0
                };
                assert_eq!(d[r * dst_c + j], want);
            }
        }
        let (batch, pixels, ch) = (3, 64, 10);
        let x = random(batch * pixels * ch, 3);
        let xb = upload(&cpu, &x);
        let out = cpu.alloc(batch * ch).unwrap();
        cpu.global_avg_pool(all(&out, batch * ch), all(&xb, x.len()), batch, pixels, ch);
        let mut got = vec![0f32; batch * ch];
        cpu.download(all(&out, got.len()), &mut got);
        for b in 0..batch {
            for j in 0..ch {
                let m = (0..pixels)
                    .map(|p| x[(b * pixels + p) * ch + j] as f64)
                    .sum::<f64>()
                    / pixels as f64;
                assert!((got[b * ch + j] as f64 - m).abs() < 1e-6);
            }
        }
    }
}
