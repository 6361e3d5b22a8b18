//! The Llama-2 architecture of the paper (RMSNorm, rotary position embeddings, SwiGLU MLP, no
//! biases, causal attention) as Hugging Face's `LlamaConfig` describes it: presets, validation,
//! parameter names and shapes (so a checkpoint saved here loads in `transformers` and vice
//! versa), FLOPs and memory. The model itself runs on the engine ([`crate::engine`]).

use serde::{Deserialize, Serialize};

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
    /// Host buffers of the gradient all-reduce (a send and a receive bucket) with several ranks.
    #[serde(default)]
    pub comm_bytes: u64,
    pub total_bytes: u64,
    /// Data-parallel ranks the estimate is per rank of, and whether ZeRO-1 shards AdamW.
    pub world: usize,
    pub zero1: bool,
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
            comm_bytes: 0,
            total_bytes: w + g + a + activations,
            world: 1,
            zero1: false,
        }
    }

    /// Per rank of `world` data-parallel ranks (the estimate's batch is per rank): the same
    /// weights, gradients and activations; AdamW's moments split `world` ways under ZeRO-1;
    /// the all-reduce's two host buckets.
    pub fn per_rank(mut self, world: usize, zero1: bool) -> Self {
        let world = world.max(1);
        if zero1 {
            self.adam_bytes = self.adam_bytes.div_ceil(world as u64);
        }
        if world > 1 {
            self.comm_bytes = 2 * 4 * crate::dist::BUCKET as u64;
        }
        self.total_bytes = self.weights_bytes
            + self.grads_bytes
            + self.adam_bytes
            + self.activations_bytes
            + self.comm_bytes;
        (self.world, self.zero1) = (world, zero1);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero1_splits_adamw_per_rank() {
        let c = LlamaConfig::preset("base", 320).unwrap();
        let one = MemoryEstimate::new(&c, 4, 2048, 2);
        let four = one.clone().per_rank(4, true);
        assert_eq!(four.adam_bytes, one.adam_bytes.div_ceil(4));
        assert_eq!(
            (four.weights_bytes, four.grads_bytes),
            (one.weights_bytes, one.grads_bytes)
        );
        assert_eq!(
            four.total_bytes,
            one.total_bytes - one.adam_bytes + four.adam_bytes + four.comm_bytes
        );
        let plain = one.clone().per_rank(4, false);
        assert_eq!(plain.adam_bytes, one.adam_bytes);
        assert_eq!(one.clone().per_rank(1, true).total_bytes, one.total_bytes);
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
