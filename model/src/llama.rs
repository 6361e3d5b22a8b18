//! The Llama-2 architecture of the paper (RMSNorm, rotary position embeddings, SwiGLU MLP, no
//! biases, causal attention), in the Hugging Face `LlamaForCausalLM` naming and conventions, so a
//! checkpoint saved here loads in `transformers` and vice versa.
//!
//! Every op on the training path is differentiable: candle's fused `ops::rms_norm` and
//! `rotary_emb::rope` have no backward (their gradient is silently zero), so RMSNorm, RoPE
//! (HF `rotate_half`, non-interleaved) and softmax are composed from primitive ops here.
//!
//! Shapes: B batch, T new positions, S key positions (cache + new), D hidden, H query heads,
//! K key/value heads, Dh head dim (D / H), F intermediate, V vocabulary.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use crate::kv_cache::KvCache;
use crate::{Error, Result};

/// Hugging Face `LlamaConfig` fields (the subset this architecture uses), as in `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10_000.0
}

/// Named model sizes. `tiny` and `small` train on a CPU; `base` and `paper-7b` are for GPUs
/// (here only their parameter count and memory needs are reported, see [`MemoryEstimate`]).
pub const PRESETS: [&str; 4] = ["tiny", "small", "base", "paper-7b"];

impl LlamaConfig {
    /// A preset for a vocabulary of `vocab_size` entries.
    pub fn preset(name: &str, vocab_size: usize) -> Result<LlamaConfig> {
        let (d, f, l, h, ctx) = match name {
            // ~0.5M parameters at vocabulary 320: trains in minutes on 2 CPU cores.
            "tiny" => (96, 256, 4, 4, 1024),
            // The model of the CPU training comparisons against PyTorch (d=256, 4 layers, 4 heads).
            "small" => (256, 688, 4, 4, 2048),
            // ~85M parameters without embeddings (GPT-2 small class).
            "base" => (768, 2048, 12, 12, 4096),
            // Llama-2 7B (the paper), context 12,288 (images; videos use 32K chunks).
            "paper-7b" => (4096, 11008, 32, 32, 12288),
            other => {
                return Err(Error::Config(format!(
                    "unknown preset {other:?}; pick one of {}",
                    PRESETS.join(", ")
                )))
            }
        };
        Ok(LlamaConfig {
            hidden_size: d,
            intermediate_size: f,
            num_hidden_layers: l,
            num_attention_heads: h,
            num_key_value_heads: Some(h),
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            vocab_size,
            max_position_embeddings: ctx,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
        })
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.tie_word_embeddings {
            return bad("tie_word_embeddings = true is not supported; set it to false".into());
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.head_dim() % 2 != 0 {
            return bad(format!(
                "head dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if self.kv_heads() == 0 || self.num_attention_heads % self.kv_heads() != 0 {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if self.vocab_size == 0 || self.max_position_embeddings == 0 {
            return bad("vocab_size and max_position_embeddings must be positive".into());
        }
        Ok(())
    }

    /// Every parameter's HF name and shape, in a fixed order.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let kv = self.kv_heads() * self.head_dim();
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, d])];
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), vec![d]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![d, d]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, d]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, d]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![d, d]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, d]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![f, d]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![d, f]));
        }
        out.push(("model.norm.weight".to_string(), vec![d]));
        out.push(("lm_head.weight".to_string(), vec![v, d]));
        out
    }

    pub fn num_parameters(&self) -> u64 {
        self.parameter_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum()
    }

    /// Training FLOPs per token (forward + backward), for MFU: 6 N + 12 L T D (attention).
    pub fn train_flops_per_token(&self, context: usize) -> f64 {
        6.0 * self.num_parameters() as f64
            + 12.0 * (self.num_hidden_layers * context * self.hidden_size) as f64
    }

    /// The `config.json` Hugging Face reads (`LlamaForCausalLM.from_pretrained(dir)`).
    pub fn to_hf_json(&self, torch_dtype: &str) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "num_key_value_heads".into(),
                serde_json::json!(self.kv_heads()),
            );
            o.insert(
                "architectures".into(),
                serde_json::json!(["LlamaForCausalLM"]),
            );
            o.insert("model_type".into(), serde_json::json!("llama"));
            o.insert("hidden_act".into(), serde_json::json!("silu"));
            o.insert("attention_bias".into(), serde_json::json!(false));
            o.insert("mlp_bias".into(), serde_json::json!(false));
            o.insert("initializer_range".into(), serde_json::json!(0.02));
            o.insert("torch_dtype".into(), serde_json::json!(torch_dtype));
            o.insert("use_cache".into(), serde_json::json!(true));
        }
        v
    }
}

/// Memory needed to train a configuration, computed without allocating anything.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryEstimate {
    pub parameters: u64,
    pub weights_bytes: u64,
    pub grads_bytes: u64,
    pub adam_bytes: u64,
    pub activations_bytes: u64,
    pub total_bytes: u64,
}

impl MemoryEstimate {
    /// f32 master weights, f32 gradients, two f32 Adam moments; activations kept for backward
    /// at `bytes_per_act` (2 for bf16, 4 for f32), no activation checkpointing: per layer about
    /// 34 B T D + 5 B H T^2 values (Korthikanti et al. 2022, without sequence parallelism).
    pub fn new(cfg: &LlamaConfig, batch: usize, context: usize, bytes_per_act: u64) -> Self {
        let n = cfg.num_parameters();
        let (b, t, d, h) = (
            batch as u64,
            context as u64,
            cfg.hidden_size as u64,
            cfg.num_attention_heads as u64,
        );
        let per_layer = (34 * b * t * d + 5 * b * h * t * t) * bytes_per_act / 2;
        let logits = b * t * cfg.vocab_size as u64 * 4 * 2;
        let activations = per_layer * cfg.num_hidden_layers as u64 + logits;
        let (w, g, a) = (n * 4, n * 4, n * 8);
        MemoryEstimate {
            parameters: n,
            weights_bytes: w,
            grads_bytes: g,
            adam_bytes: a,
            activations_bytes: activations,
            total_bytes: w + g + a + activations,
        }
    }
}

/// Precomputed RoPE tables, HF convention: `cos`/`sin` are [P, Dh] with the frequencies repeated
/// twice (`cat(freqs, freqs)`), applied as `x * cos + rotate_half(x) * sin`.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &LlamaConfig, device: &Device) -> Result<Rope> {
        let dh = cfg.head_dim();
        let p = cfg.max_position_embeddings;
        let inv: Vec<f32> = (0..dh / 2)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / dh as f32))
            .collect();
        let mut cos = Vec::with_capacity(p * dh);
        let mut sin = Vec::with_capacity(p * dh);
        for pos in 0..p {
            for _ in 0..2 {
                for f in &inv {
                    let a = pos as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (p, dh), device)?,
            sin: Tensor::from_vec(sin, (p, dh), device)?,
        })
    }

    /// x: [B, heads, T, Dh] at positions pos..pos+T -> same shape.
    fn apply(&self, x: &Tensor, pos: usize, fused: bool) -> Result<Tensor> {
        let (_, _, t, dh) = x.dims4()?;
        let cos = self.cos.narrow(0, pos, t)?.to_dtype(x.dtype())?; // [T, Dh]
        let sin = self.sin.narrow(0, pos, t)?.to_dtype(x.dtype())?;
        if fused && crate::ops::fusable(x) {
            return Ok(crate::ops::rope(x, &cos, &sin)?);
        }
        let x1 = x.narrow(D::Minus1, 0, dh / 2)?;
        let x2 = x.narrow(D::Minus1, dh / 2, dh / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?; // rotate_half(x)
        Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
    }
}

/// RMSNorm from primitive ops (differentiable), in f32 like HF: x / sqrt(mean(x^2) + eps) * w.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, fused: bool) -> Result<Tensor> {
    if fused && crate::ops::fusable(x) {
        return Ok(crate::ops::rms_norm(x, weight, eps)?);
    }
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?; // [.., 1]
    let normed = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    Ok(normed
        .to_dtype(dtype)?
        .broadcast_mul(&weight.to_dtype(dtype)?)?)
}

/// x [.., in] @ w[out, in]^T -> [.., out], as one 2-D GEMM.
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (last, lead) = dims
        .split_last()
        .ok_or_else(|| Error::Config("scalar input".into()))?;
    let rows: usize = lead.iter().product();
    let w = w.to_dtype(x.dtype())?;
    let y = x.reshape((rows, *last))?.matmul(&w.t()?)?; // [rows, out]
    let mut out = lead.to_vec();
    out.push(w.dim(0)?);
    Ok(y.reshape(out)?)
}

/// Softmax over the last dim from primitive ops (differentiable; the max is a constant shift).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

/// log-softmax over the last dim from primitive ops (differentiable).
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

struct Layer {
    input_layernorm: Tensor,
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    o_proj: Tensor,
    post_attention_layernorm: Tensor,
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
}

/// A Llama causal language model. Weights are f32 (master copy); `compute_dtype` is what the
/// matmuls run in (f32 on CPU, bf16 on CUDA for training).
pub struct Llama {
    pub config: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    rope: Rope,
    compute_dtype: DType,
    fused: bool,
    device: Device,
}

impl Llama {
    /// Builds the model from tensors named as in HF `model.safetensors` (extra names refused).
    pub fn from_tensors(
        config: LlamaConfig,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Llama> {
        config.validate()?;
        let shapes = config.parameter_shapes();
        for name in tensors.keys() {
            if !shapes.iter().any(|(n, _)| n == name) {
                return Err(Error::Config(format!(
                    "unexpected tensor {name} in the weights (is this a Llama checkpoint without tied embeddings?)"
                )));
            }
        }
        let get = |name: &str| -> Result<Tensor> {
            let want = &shapes
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| Error::Config(format!("no shape for {name}")))?
                .1;
            let t = tensors
                .get(name)
                .ok_or_else(|| Error::Config(format!("missing tensor {name} in the weights")))?;
            if t.dims() != want.as_slice() {
                return Err(Error::Config(format!(
                    "tensor {name} has shape {:?}, the config implies {want:?}",
                    t.dims()
                )));
            }
            Ok(t.to_device(device)?.to_dtype(DType::F32)?)
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(Layer {
                    input_layernorm: get(&format!("{p}.input_layernorm.weight"))?,
                    q_proj: get(&format!("{p}.self_attn.q_proj.weight"))?,
                    k_proj: get(&format!("{p}.self_attn.k_proj.weight"))?,
                    v_proj: get(&format!("{p}.self_attn.v_proj.weight"))?,
                    o_proj: get(&format!("{p}.self_attn.o_proj.weight"))?,
                    post_attention_layernorm: get(&format!("{p}.post_attention_layernorm.weight"))?,
                    gate_proj: get(&format!("{p}.mlp.gate_proj.weight"))?,
                    up_proj: get(&format!("{p}.mlp.up_proj.weight"))?,
                    down_proj: get(&format!("{p}.mlp.down_proj.weight"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Llama {
            embed_tokens: get("model.embed_tokens.weight")?,
            norm: get("model.norm.weight")?,
            lm_head: get("lm_head.weight")?,
            layers,
            rope: Rope::new(&config, device)?,
            config,
            compute_dtype: DType::F32,
            fused: true,
            device: device.clone(),
        })
    }

    /// Builds the model over trainable variables (see [`init_params`]); updating a `Var` in
    /// place updates the model.
    pub fn from_vars(
        config: LlamaConfig,
        vars: &[(String, Var)],
        device: &Device,
    ) -> Result<Llama> {
        let map: HashMap<String, Tensor> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        Llama::from_tensors(config, &map, device)
    }

    /// Runs the matmuls in `dtype` (bf16 on CUDA); weights stay f32.
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute_dtype = dtype;
    }

    /// Use the fused CPU kernels of [`crate::ops`] where they apply (default), or only
    /// composed candle ops (the reference the fused kernels are tested against).
    pub fn set_fused(&mut self, fused: bool) {
        self.fused = fused;
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Logits [B, T, V] (f32) for `input_ids` [B, T] (u32) at positions index_pos..index_pos+T,
    /// attending to the cache's earlier keys/values; with a cache, the new keys/values are
    /// appended to it.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        index_pos: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.forward_padded(input_ids, index_pos, cache, None)
    }

    /// [`forward`](Self::forward) for a left-padded batch: `left_pad[b]` leading positions of
    /// row b (counted from position 0 of the sequence) are padding no real token attends to.
    /// RoPE scores depend only on position differences, so a left-padded row gives the same
    /// logits as the unpadded one.
    pub fn forward_padded(
        &self,
        input_ids: &Tensor,
        index_pos: usize,
        mut cache: Option<&mut KvCache>,
        left_pad: Option<&[usize]>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let cfg = &self.config;
        if index_pos + t > cfg.max_position_embeddings {
            return Err(Error::Config(format!(
                "positions up to {} exceed max_position_embeddings {}; use a shorter context or a preset with a longer one",
                index_pos + t,
                cfg.max_position_embeddings
            )));
        }
        let s = index_pos + t;
        // The fused causal softmax needs no mask tensor; padding or other devices do.
        let fused_softmax = self.fused
            && left_pad.is_none()
            && self.device.is_cpu()
            && self.compute_dtype == DType::F32;
        let mask = if fused_softmax {
            None
        } else {
            Some(causal_mask(b, t, index_pos, left_pad, &self.device)?) // [B|1, 1, T, S]
        };
        let ids = input_ids.flatten_all()?;
        let mut x = self
            .embed_tokens
            .index_select(&ids, 0)?
            .reshape((b, t, cfg.hidden_size))?
            .to_dtype(self.compute_dtype)?; // [B, T, D]
        for (i, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.input_layernorm, cfg.rms_norm_eps, self.fused)?;
            let kv = cache.as_deref_mut().map(|c| (c, i));
            let a = self.attention(&h, layer, index_pos, s, mask.as_ref(), kv)?;
            x = (x + a)?;
            let h = rms_norm(
                &x,
                &layer.post_attention_layernorm,
                cfg.rms_norm_eps,
                self.fused,
            )?;
            let gate = linear(&h, &layer.gate_proj)?; // [B, T, F]
            let up = linear(&h, &layer.up_proj)?;
            let act = if self.fused && crate::ops::fusable(&gate) {
                crate::ops::swiglu(&gate, &up)?
            } else {
                (silu(&gate)? * up)?
            };
            x = (x + linear(&act, &layer.down_proj)?)?;
        }
        let x = rms_norm(&x, &self.norm, cfg.rms_norm_eps, self.fused)?;
        Ok(linear(&x, &self.lm_head)?.to_dtype(DType::F32)?) // [B, T, V]
    }

    fn attention(
        &self,
        x: &Tensor,
        layer: &Layer,
        index_pos: usize,
        s: usize,
        mask: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, t, _) = x.dims3()?;
        let (h, k, dh) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, dh))?.transpose(1, 2)?.contiguous()?) // [B, n, T, Dh]
        };
        let q = heads(linear(x, &layer.q_proj)?, h)?;
        let key = heads(linear(x, &layer.k_proj)?, k)?;
        let v = heads(linear(x, &layer.v_proj)?, k)?;
        let q = self.rope.apply(&q, index_pos, self.fused)?.contiguous()?;
        let key = self.rope.apply(&key, index_pos, self.fused)?.contiguous()?;
        let (key, v) = match cache {
            Some((c, i)) => c.append(i, &key, &v)?, // [B, K, S, Dh]
            None => (key, v),
        };
        if key.dim(2)? != s {
            return Err(Error::Config(format!(
                "the KV cache holds {} positions, index_pos {index_pos} + {t} new ones expected {s}",
                key.dim(2)?
            )));
        }
        let (key, v) = (repeat_kv(key, h / k)?, repeat_kv(v, h / k)?); // [B, H, S, Dh]
        let scale = 1.0 / (dh as f64).sqrt();
        let scores = q.matmul(&key.t()?)?; // [B, H, T, S]
        let probs = match mask {
            None => crate::ops::causal_softmax(&scores, scale)?,
            Some(mask) => {
                let mask = mask.to_dtype(scores.dtype())?;
                let scores = (scores * scale)?.broadcast_add(&mask)?;
                softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(q.dtype())?
            }
        };
        let y = probs.matmul(&v.contiguous()?)?; // [B, H, T, Dh]
        let y = y.transpose(1, 2)?.reshape((b, t, h * dh))?; // [B, T, D]
        linear(&y, &layer.o_proj)
    }

    /// Mean cross-entropy (nats/token) of predicting `targets` [B, T] from `input_ids` [B, T].
    pub fn loss(&self, input_ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let logits = self.forward(input_ids, 0, None)?; // [B, T, V]
        if self.fused && crate::ops::fusable(&logits) {
            let v = logits.dim(D::Minus1)?;
            let rows =
                crate::ops::cross_entropy_rows(&logits.reshape(((), v))?, &targets.flatten_all()?)?;
            return Ok(rows.mean_all()?);
        }
        cross_entropy(&logits, targets)
    }
}

/// Mean cross-entropy of logits [B, T, V] against targets [B, T] (differentiable).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    let logits = logits.reshape(((), v))?;
    let logp = log_softmax_last_dim(&logits)?; // [N, V]
    let picked = logp.gather(&targets.flatten_all()?.unsqueeze(1)?, 1)?; // [N, 1]
    Ok(picked.mean_all()?.neg()?)
}

fn silu(x: &Tensor) -> Result<Tensor> {
    // x * sigmoid(x), composed so it has a backward in every candle version.
    Ok((x / (x.neg()?.exp()? + 1.0)?)?)
}

/// [B, K, S, Dh] -> [B, K * n, S, Dh] (grouped-query attention; n = 1 is a no-op).
fn repeat_kv(x: Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x);
    }
    let (b, k, s, dh) = x.dims4()?;
    Ok(Tensor::cat(&vec![&x; n], 2)?.reshape((b, k * n, s, dh))?)
}

/// Additive mask [B, 1, T, S]: 0 where query i (absolute position index_pos + i) may attend to
/// key j (j <= index_pos + i, and j not a left-pad position of its row), -inf elsewhere. Pad
/// queries attend causally among pads so their (unused) rows stay finite.
fn causal_mask(
    b: usize,
    t: usize,
    index_pos: usize,
    left_pad: Option<&[usize]>,
    device: &Device,
) -> Result<Tensor> {
    let s = index_pos + t;
    let rows = if left_pad.is_some() { b } else { 1 };
    let mut m = vec![0f32; rows * t * s];
    for r in 0..rows {
        let pad = left_pad.map(|p| p[r]).unwrap_or(0);
        for i in 0..t {
            let qi = index_pos + i;
            for j in 0..s {
                let masked = j > qi || (j < pad && qi >= pad);
                if masked {
                    m[(r * t + i) * s + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Ok(Tensor::from_vec(m, (rows, 1, t, s), device)?)
}

/// A deterministic initialisation (HF's: normal(0, 0.02) for matrices, ones for norms) from a
/// seed, as trainable variables in [`LlamaConfig::parameter_shapes`] order.
pub fn init_params(cfg: &LlamaConfig, seed: u64, device: &Device) -> Result<Vec<(String, Var)>> {
    cfg.validate()?;
    let mut rng = crate::rng::Rng::new(seed);
    cfg.parameter_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if shape.len() == 1 {
                vec![1.0; n]
            } else {
                (0..n).map(|_| rng.normal() as f32 * 0.02).collect()
            };
            let t = Tensor::from_vec(data, shape, device)?;
            Ok((name, Var::from_tensor(&t)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::IndexOp;

    fn fixture() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama_ref")
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Logits against an independent numpy implementation of HF `LlamaForCausalLM`
    /// (tools/llama_ref.py, dumped to tests/fixtures/llama_ref/).
    #[test]
    fn forward_matches_the_numpy_reference() {
        let dev = Device::Cpu;
        let model = crate::checkpoint::load_model(&fixture(), &dev).unwrap();
        let ids: Vec<u32> =
            serde_json::from_slice(&std::fs::read(fixture().join("tokens.json")).unwrap()).unwrap();
        let want = candle_core::safetensors::load(fixture().join("logits.safetensors"), &dev)
            .unwrap()["logits"]
            .clone();
        let n = ids.len();
        let x = Tensor::from_vec(ids, (1, n), &dev).unwrap();
        let got = model.forward(&x, 0, None).unwrap().squeeze(0).unwrap();
        assert_eq!(got.dims(), want.dims());
        let d = max_abs(&got, &want);
        assert!(d < 1e-4, "max abs logit difference {d}");
    }

    fn tiny(dev: &Device) -> (Vec<(String, Var)>, Llama) {
        let mut cfg = LlamaConfig::preset("tiny", 40).unwrap();
        cfg.hidden_size = 32;
        cfg.intermediate_size = 48;
        cfg.num_hidden_layers = 2;
        cfg.num_attention_heads = 4;
        cfg.num_key_value_heads = Some(2); // exercise grouped-query attention too
        cfg.max_position_embeddings = 64;
        let vars = init_params(&cfg, 3, dev).unwrap();
        // Norm weights off 1 so their gradient path is exercised in full.
        for (n, v) in &vars {
            if v.rank() == 1 {
                let t = (v.as_tensor() * 1.5).unwrap();
                v.set(&t).unwrap();
                let _ = n;
            }
        }
        let model = Llama::from_vars(cfg, &vars, dev).unwrap();
        (vars, model)
    }

    #[test]
    fn every_parameter_gets_a_nonzero_gradient() {
        let dev = Device::Cpu;
        let (vars, model) = tiny(&dev);
        let x = Tensor::from_vec(
            (0..20u32).map(|i| (i * 7) % 40).collect::<Vec<_>>(),
            (2, 10),
            &dev,
        )
        .unwrap();
        let y = Tensor::from_vec(
            (0..20u32).map(|i| (i * 11 + 3) % 40).collect::<Vec<_>>(),
            (2, 10),
            &dev,
        )
        .unwrap();
        let grads = model.loss(&x, &y).unwrap().backward().unwrap();
        for (name, var) in &vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} has no gradient"));
            let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{name}: gradient norm {norm}"
            );
        }
        // And the gradient is right: a finite difference on one embedding entry.
        let (name, var) = &vars[0];
        let g: f32 = grads
            .get(var.as_tensor())
            .unwrap()
            .i((7, 3))
            .unwrap()
            .to_scalar()
            .unwrap();
        let eps = 1e-2f32;
        let at = |delta: f32| {
            let mut data: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            data[7 * 32 + 3] += delta;
            let t = Tensor::from_vec(data, var.dims(), &dev).unwrap();
            let mut m: HashMap<String, Tensor> = vars
                .iter()
                .map(|(n, v)| (n.clone(), v.as_detached_tensor()))
                .collect();
            m.insert(name.clone(), t);
            let model = Llama::from_tensors(model.config.clone(), &m, &dev).unwrap();
            model.loss(&x, &y).unwrap().to_scalar::<f32>().unwrap()
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        assert!(
            (fd - g).abs() < 2e-3 + 0.05 * g.abs(),
            "finite difference {fd} vs gradient {g}"
        );
    }

    /// The fused CPU kernels (ops.rs) give the composed ops' loss and gradients.
    #[test]
    fn fused_kernels_match_composed_ops() {
        let dev = Device::Cpu;
        let (vars, fused) = tiny(&dev);
        let mut plain = Llama::from_vars(fused.config.clone(), &vars, &dev).unwrap();
        plain.set_fused(false);
        let x = Tensor::from_vec(
            (0..24u32).map(|i| (i * 7 + 1) % 40).collect::<Vec<_>>(),
            (2, 12),
            &dev,
        )
        .unwrap();
        let y = Tensor::from_vec(
            (0..24u32).map(|i| (i * 13 + 5) % 40).collect::<Vec<_>>(),
            (2, 12),
            &dev,
        )
        .unwrap();
        let lf = fused.loss(&x, &y).unwrap();
        let lp = plain.loss(&x, &y).unwrap();
        let d = (lf.to_scalar::<f32>().unwrap() - lp.to_scalar::<f32>().unwrap()).abs();
        assert!(d < 1e-5, "loss differs by {d}");
        let (gf, gp) = (lf.backward().unwrap(), lp.backward().unwrap());
        for (name, var) in &vars {
            let (a, b) = (
                gf.get(var.as_tensor()).unwrap(),
                gp.get(var.as_tensor()).unwrap(),
            );
            let scale: f32 = b
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            let d = max_abs(a, b);
            assert!(
                d <= 1e-4 * scale.max(1e-3),
                "{name}: gradients differ by {d} (scale {scale})"
            );
        }
        let lf = fused.forward(&x, 0, None).unwrap();
        let lp = plain.forward(&x, 0, None).unwrap();
        assert!(max_abs(&lf, &lp) < 1e-4);
    }

    #[test]
    fn cached_decoding_and_left_padding_match_the_full_forward() {
        let dev = Device::Cpu;
        let (_, model) = tiny(&dev);
        let ids: Vec<u32> = vec![0, 5, 9, 33, 2, 17, 8, 8, 30, 1];
        let n = ids.len();
        let x = Tensor::from_vec(ids.clone(), (1, n), &dev).unwrap();
        let full = model.forward(&x, 0, None).unwrap(); // [1, n, V]
                                                        // Prompt of 4, then one token at a time through the cache.
        let mut cache = KvCache::new(2, 2);
        let first = model
            .forward(&x.narrow(1, 0, 4).unwrap(), 0, Some(&mut cache))
            .unwrap();
        let mut parts = vec![first];
        for p in 4..n {
            parts.push(
                model
                    .forward(&x.narrow(1, p, 1).unwrap(), p, Some(&mut cache))
                    .unwrap(),
            );
        }
        let cached = Tensor::cat(&parts, 1).unwrap();
        let d = max_abs(&full, &cached);
        assert!(d < 1e-4, "cached vs uncached logits differ by {d}");
        // The same sequence left-padded by 3 in a batch with a longer one.
        let other: Vec<u32> = (0..(n as u32 + 3)).map(|i| (i * 5) % 40).collect();
        let mut batch = vec![2u32; 3];
        batch.extend(&ids);
        batch.extend(&other);
        let xb = Tensor::from_vec(batch, (2, n + 3), &dev).unwrap();
        let out = model.forward_padded(&xb, 0, None, Some(&[3, 0])).unwrap();
        let d = max_abs(&out.i((0..1, 3..)).unwrap(), &full);
        assert!(d < 1e-4, "left-padded row differs by {d}");
        let xo = Tensor::from_vec(other, (1, n + 3), &dev).unwrap();
        let d = max_abs(&out.i(1..2).unwrap(), &model.forward(&xo, 0, None).unwrap());
        assert!(d < 1e-4, "unpadded row in a padded batch differs by {d}");
    }

    #[test]
    fn batched_generation_is_seeded_and_batch_independent() {
        let dev = Device::Cpu;
        let (_, model) = tiny(&dev);
        let prompts = vec![vec![0u32, 4, 9], vec![0u32, 7, 7, 7, 12, 3], vec![0u32]];
        let cfg = crate::GenerateConfig {
            max_new_tokens: 12,
            temperature: 0.9,
            top_k: Some(20),
            top_p: Some(0.95),
            seed: 5,
            eos_token_id: Some(1),
            pad_token_id: 2,
            window: None,
        };
        let a = crate::generate(&model, &prompts, &cfg).unwrap();
        let b = crate::generate(&model, &prompts, &cfg).unwrap();
        assert_eq!(a, b, "same seed, same output");
        for (p, o) in prompts.iter().zip(&a) {
            assert!(!o.is_empty() && o.len() <= 12);
            assert!(
                o.len() == 12 || o.last() == Some(&1),
                "stops at EOS or the limit: {o:?} after {p:?}"
            );
        }
        // A prompt alone gives the same completion as inside the batch.
        let alone = crate::generate(
            &model,
            &prompts[1..2],
            &crate::GenerateConfig {
                seed: 5 ^ 0xA076_1D64_78BD_642F,
                ..cfg.clone()
            },
        )
        .unwrap();
        assert_eq!(alone[0], a[1]);
        // Greedy decoding equals argmax of the uncached forward, step by step.
        let g = crate::generate(
            &model,
            &prompts[..1],
            &crate::GenerateConfig {
                temperature: 0.0,
                eos_token_id: None,
                max_new_tokens: 5,
                ..cfg
            },
        )
        .unwrap();
        let mut seq = prompts[0].clone();
        for &tok in &g[0] {
            let n = seq.len();
            let l = model
                .forward(
                    &Tensor::from_vec(seq.clone(), (1, n), &dev).unwrap(),
                    0,
                    None,
                )
                .unwrap();
            let want = l
                .i((0, n - 1))
                .unwrap()
                .argmax(0)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap();
            assert_eq!(tok, want);
            seq.push(tok);
        }
    }

    #[test]
    fn sliding_window_generation_stays_within_learned_positions() {
        let dev = Device::Cpu;
        let (_, model) = tiny(&dev); // max_position_embeddings 64
        let prompts = vec![vec![0u32, 4, 9], vec![0u32, 7, 7, 7, 12, 3]];
        let base = crate::GenerateConfig {
            max_new_tokens: 20,
            temperature: 0.0,
            eos_token_id: None,
            pad_token_id: 2,
            ..Default::default()
        };
        // A window the sequence never fills changes nothing.
        let plain = crate::generate(&model, &prompts, &base).unwrap();
        let wide = crate::GenerateConfig {
            window: Some(64),
            ..base.clone()
        };
        assert_eq!(crate::generate(&model, &prompts, &wide).unwrap(), plain);
        // Without a window generation stops at the context; with one it runs past it.
        let long = crate::GenerateConfig {
            max_new_tokens: 150,
            ..base.clone()
        };
        let capped = crate::generate(&model, &prompts, &long).unwrap();
        assert_eq!(capped[1].len(), 64 - 6, "stops at the model's context");
        let slid = crate::generate(
            &model,
            &prompts,
            &crate::GenerateConfig {
                window: Some(16),
                ..long.clone()
            },
        )
        .unwrap();
        assert!(slid.iter().all(|o| o.len() == 150), "runs past the context");
        // Each greedy token is the argmax of the uncached forward over the window the
        // generator held: the last 8..16 tokens, re-encoded from position 0 when it filled.
        // (Row 1: the longest prompt, so no left padding shifts when its window fills.)
        let mut seq = prompts[1].clone();
        let mut held = seq.len();
        for &tok in &slid[1] {
            if held > 16 {
                held = 8;
            }
            let w = &seq[seq.len() - held..];
            let l = model
                .forward(
                    &Tensor::from_vec(w.to_vec(), (1, w.len()), &dev).unwrap(),
                    0,
                    None,
                )
                .unwrap();
            let want = l.i((0, w.len() - 1)).unwrap().argmax(0).unwrap();
            assert_eq!(tok, want.to_scalar::<u32>().unwrap());
            seq.push(tok);
            held += 1;
        }
        // A prompt longer than the window starts from its last window/2 tokens.
        let long_prompt = vec![(0..40).map(|i| (i * 7 % 40) as u32).collect::<Vec<u32>>()];
        let out = crate::generate(
            &model,
            &long_prompt,
            &crate::GenerateConfig {
                window: Some(16),
                max_new_tokens: 3,
                ..base
            },
        )
        .unwrap();
        assert_eq!(out[0].len(), 3);
    }

    #[test]
    fn presets_and_memory_without_allocating() {
        let c = LlamaConfig::preset("paper-7b", 320).unwrap();
        let n = c.num_parameters();
        assert!((6_400_000_000..6_800_000_000).contains(&n), "{n}");
        let m = MemoryEstimate::new(&c, 1, 12288, 2);
        assert_eq!(m.adam_bytes, 8 * n);
        assert!(m.total_bytes > 16 * n);
        let t = LlamaConfig::preset("tiny", 320).unwrap().num_parameters();
        assert!((200_000..1_000_000).contains(&t), "tiny has {t}");
        assert!(LlamaConfig::preset("huge", 320).is_err());
        let j = c.to_hf_json("bfloat16");
        assert_eq!(j["architectures"][0], "LlamaForCausalLM");
        assert_eq!(j["num_key_value_heads"], 32);
    }
}
