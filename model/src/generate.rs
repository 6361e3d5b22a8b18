//! Batched, seeded sampling with a KV cache.
//!
//! Prompts of different lengths are **left-padded** to the longest one (pad positions are
//! masked out of attention; RoPE depends only on position differences, so a padded row's logits
//! equal the unpadded row's). Each prompt has its own generator seeded from `(seed, index)`,
//! so a prompt's completion does not depend on which other prompts share its batch (up to
//! float rounding in batched matmuls). The logits processor follows Hugging Face's order and
//! rules: temperature, then top-k (ties with the k-th value kept), then top-p (the smallest set
//! of most likely tokens whose probability reaches p; at least one kept).

use candle_core::{IndexOp, Tensor};

use crate::kv_cache::KvCache;
use crate::llama::Llama;
use crate::rng::Rng;
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct GenerateConfig {
    /// New tokens per prompt at most (generation also stops at the model's context limit).
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax).
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
    /// A row stops after producing this token (it is included in the output).
    pub eos_token_id: Option<u32>,
    /// Token used for left padding (never attended to).
    pub pad_token_id: u32,
    /// Sliding window: when set, generation may run past the model's context. Whenever the
    /// cache would hold more than `window` positions, the last `window / 2` tokens of every row
    /// are encoded again from position 0 and generation goes on from there, so the model only
    /// ever sees positions it was trained on (set it to the training context). `None`: stop at
    /// the model's `max_position_embeddings`.
    pub window: Option<usize>,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        GenerateConfig {
            max_new_tokens: 256,
            temperature: 1.0,
            top_k: None,
            top_p: None,
            seed: 0,
            eos_token_id: None,
            pad_token_id: 0,
            window: None,
        }
    }
}

/// Turns one row of logits into a token id, reproducibly for a seed.
pub struct LogitsProcessor {
    rng: Rng,
    temperature: f64,
    top_k: Option<usize>,
    top_p: Option<f64>,
}

impl LogitsProcessor {
    pub fn new(seed: u64, temperature: f64, top_k: Option<usize>, top_p: Option<f64>) -> Self {
        LogitsProcessor {
            rng: Rng::new(seed),
            temperature,
            top_k,
            top_p,
        }
    }

    /// The probabilities sampling draws from (after temperature, top-k, top-p), for tests.
    pub fn probabilities(&self, logits: &[f32]) -> Vec<f64> {
        let n = logits.len();
        let mut scores: Vec<f64> = logits
            .iter()
            .map(|&l| l as f64 / self.temperature)
            .collect();
        if let Some(k) = self.top_k.filter(|&k| k > 0 && k < n) {
            let mut sorted = scores.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let kth = sorted[k - 1];
            for s in scores.iter_mut() {
                if *s < kth {
                    *s = f64::NEG_INFINITY;
                }
            }
        }
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let mut probs: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(p) = self.top_p.filter(|&p| p < 1.0) {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
            let mut before = 0.0;
            let mut keep = vec![false; n];
            for (rank, &i) in order.iter().enumerate() {
                if rank == 0 || before < p {
                    keep[i] = true;
                }
                before += probs[i];
            }
            let kept: f64 = (0..n).filter(|&i| keep[i]).map(|i| probs[i]).sum();
            for i in 0..n {
                probs[i] = if keep[i] { probs[i] / kept } else { 0.0 };
            }
        }
        probs
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let probs = self.probabilities(logits);
        let u = self.rng.uniform();
        let mut acc = 0.0;
        let mut last = 0;
        for (i, p) in probs.iter().enumerate() {
            if *p > 0.0 {
                last = i;
                acc += p;
                if u < acc {
                    return i as u32;
                }
            }
        }
        last as u32
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Completes every prompt; returns the new tokens of each (EOS included when produced).
pub fn generate(
    model: &Llama,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
) -> Result<Vec<Vec<u32>>> {
    generate_with(model, prompts, cfg, &mut |_, _| {})
}

/// [`generate`] calling `on_token(row, token)` for every sampled token (progress, streaming).
pub fn generate_with(
    model: &Llama,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(Error::Config(format!(
            "prompt {i} is empty; start every prompt with at least the BOS token"
        )));
    }
    let vocab = model.config.vocab_size as u32;
    if let Some(bad) = prompts.iter().flatten().find(|&&t| t >= vocab) {
        return Err(Error::Config(format!(
            "prompt token {bad} is outside the model's vocabulary of {vocab}; use the vocabulary the model was trained with"
        )));
    }
    let limit = model.config.max_position_embeddings;
    // The positions the cache may hold: the window (at most the model's context), or the context.
    let span = cfg.window.map_or(limit, |w| w.clamp(2, limit));
    let keep = span / 2;
    // Every row's tokens so far (prompt + generated): what a window re-encodes.
    let mut hist: Vec<Vec<u32>> = prompts.to_vec();
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let steps = if cfg.window.is_some() {
        cfg.max_new_tokens
    } else {
        if longest >= limit {
            return Err(Error::Config(format!(
                "a prompt of {longest} tokens leaves no room in the model's context of {limit}; shorten the prompts or sample with a window"
            )));
        }
        cfg.max_new_tokens.min(limit - longest)
    };
    let dev = model.device().clone();
    // Left-pads the last `n` tokens of each row into one [B, n'] input; returns it with the pads.
    let window_input = |hist: &[Vec<u32>], n: usize| -> Result<(Tensor, Vec<usize>)> {
        let width = hist.iter().map(|h| h.len().min(n)).max().unwrap_or(1);
        let mut ids = Vec::with_capacity(b * width);
        let mut pads = Vec::with_capacity(b);
        for h in hist {
            let tail = &h[h.len() - h.len().min(n)..];
            pads.push(width - tail.len());
            ids.extend(std::iter::repeat_n(cfg.pad_token_id, width - tail.len()));
            ids.extend_from_slice(tail);
        }
        Ok((Tensor::from_vec(ids, (b, width), &dev)?, pads))
    };
    let mut procs: Vec<LogitsProcessor> = (0..b)
        .map(|i| {
            let seed = cfg.seed ^ (i as u64).wrapping_mul(0xA076_1D64_78BD_642F);
            LogitsProcessor::new(seed, cfg.temperature, cfg.top_k, cfg.top_p)
        })
        .collect();
    // A prompt longer than the window starts from its last `keep` tokens.
    let first = if longest >= span { keep } else { longest };
    let (mut input, mut pads) = window_input(&hist, first)?;
    let mut cache = KvCache::new(model.config.num_hidden_layers, span.min(longest + steps));
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done = vec![false; b];
    let mut pos = 0;
    for _ in 0..steps {
        let mut t = input.dim(1)?;
        if pos + t > span {
            // The window is full: re-encode the last `keep` tokens from position 0.
            (input, pads) = window_input(&hist, keep)?;
            cache.reset();
            pos = 0;
            t = input.dim(1)?;
        }
        let logits = model.forward_padded(&input, pos, Some(&mut cache), Some(&pads))?;
        pos += t;
        let last = logits.i((.., t - 1, ..))?.to_vec2::<f32>()?; // [B, V]
        let mut next = Vec::with_capacity(b);
        for (row, l) in last.iter().enumerate() {
            if done[row] {
                next.push(cfg.pad_token_id);
                hist[row].push(cfg.pad_token_id);
                continue;
            }
            let tok = procs[row].sample(l);
            out[row].push(tok);
            hist[row].push(tok);
            on_token(row, tok);
            if cfg.eos_token_id == Some(tok) {
                done[row] = true;
            }
            next.push(tok);
        }
        if done.iter().all(|d| *d) {
            break;
        }
        input = Tensor::from_vec(next, (b, 1), &dev)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_and_top_p_follow_hugging_face() {
        let logits = [2.0f32, 1.0, 0.5, 0.0, -1.0];
        let lp = LogitsProcessor::new(0, 1.0, Some(3), None);
        let p = lp.probabilities(&logits);
        assert!(p[3] == 0.0 && p[4] == 0.0 && p[0] > p[1] && p[1] > p[2]);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // softmax of [2, 1, 0.5, 0, -1]: 0.5478, 0.2015, 0.1222, 0.0741, 0.0273.
        // top-p 0.7: the first token (0.548) is below 0.7, so the second joins; 0.749 >= 0.7 stops.
        let lp = LogitsProcessor::new(0, 1.0, None, Some(0.7));
        let p = lp.probabilities(&logits);
        assert!(p[0] > 0.0 && p[1] > 0.0 && p[2] == 0.0, "{p:?}");
        assert!((p[0] - 0.5478 / 0.7493).abs() < 1e-3, "{p:?}");
        // top-p smaller than the top token keeps exactly one.
        let lp = LogitsProcessor::new(0, 1.0, None, Some(0.1));
        assert_eq!(
            lp.probabilities(&logits)
                .iter()
                .filter(|p| **p > 0.0)
                .count(),
            1
        );
        // Temperature sharpens.
        let cold = LogitsProcessor::new(0, 0.5, None, None).probabilities(&logits);
        let warm = LogitsProcessor::new(0, 1.0, None, None).probabilities(&logits);
        assert!(cold[0] > warm[0]);
    }

    #[test]
    fn sampling_is_seeded_and_matches_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let mut a = LogitsProcessor::new(7, 1.0, None, None);
        let mut b = LogitsProcessor::new(7, 1.0, None, None);
        let xs: Vec<u32> = (0..4000).map(|_| a.sample(&logits)).collect();
        let ys: Vec<u32> = (0..4000).map(|_| b.sample(&logits)).collect();
        assert_eq!(xs, ys, "same seed, same tokens");
        let ones = xs.iter().filter(|&&x| x == 1).count() as f64 / 4000.0;
        assert!((ones - 0.75).abs() < 0.03, "P(1) = 0.75, got {ones}");
        assert!(!xs.contains(&2));
        assert_eq!(
            LogitsProcessor::new(0, 0.0, None, None).sample(&[0.1, 3.0, 2.0]),
            1
        );
    }
}
