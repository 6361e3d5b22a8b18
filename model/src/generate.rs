//! Batched, seeded sampling with a KV cache.
//!
//! Prompts of different lengths are **left-padded** to the longest one (pad positions are
//! masked out of attention; RoPE depends only on position differences, so a padded row's logits
//! equal the unpadded row's). Each prompt has its own generator seeded from `(seed, index)`,
//! so a prompt's completion does not depend on which other prompts share its batch (up to
//! float rounding in batched matmuls). The logits processor follows Hugging Face's order and
//! rules: temperature, then top-k (ties with the k-th value kept), then top-p (the smallest set
//! of most likely tokens whose probability reaches p; at least one kept).

use std::path::Path;

use crate::engine::{Backend, Capacity, Cpu, Cuda, Device, Model};
use crate::llama::LlamaConfig;
use crate::rng::Rng;
use crate::{Error, Result};

/// A trained model ready to generate on the engine's CPU backend: its weights, and an inference
/// model (with a KV cache) built for the largest batch x window asked for so far.
pub struct Lm {
    pub config: LlamaConfig,
    params: Vec<f32>,
    model: Option<Net>,
    device: Device,
}

/// An inference model on one of the engine's backends.
pub enum Net {
    Cpu(Box<Model<Cpu>>),
    Cuda(Box<Model<Cuda>>),
}

macro_rules! on_net {
    ($net:expr, $m:ident => $e:expr) => {
        match $net {
            Net::Cpu($m) => $e,
            Net::Cuda($m) => $e,
        }
    };
}

impl Net {
    pub fn cap(&self) -> Capacity {
        on_net!(self, m => m.cap)
    }

    pub fn forward(
        &mut self,
        ids: &[u32],
        targets: Option<&[u32]>,
        b: usize,
        t: usize,
        grad_scale: Option<f32>,
    ) -> Result<Option<f64>> {
        on_net!(self, m => m.forward(ids, targets, b, t, grad_scale))
    }

    pub fn forward_cached(
        &mut self,
        ids: &[u32],
        b: usize,
        t: usize,
        pos0: usize,
        pads: &[usize],
    ) -> Result<()> {
        on_net!(self, m => m.forward_cached(ids, b, t, pos0, pads))?;
        on_net!(self, m => m.backend.status())?;
        Ok(())
    }

    pub fn read_logits(&self, out: &mut [f32]) {
        on_net!(self, m => m.read_logits(out))
    }

    pub fn read_last_logits(&self, out: &mut [f32]) {
        on_net!(self, m => m.read_last_logits(out))
    }

    fn build<B: Backend>(
        backend: B,
        config: &LlamaConfig,
        cap: Capacity,
        params: &[f32],
    ) -> Result<Model<B>> {
        let mut m = Model::new(backend, config.clone(), cap, false, false)?;
        m.write_params(params);
        m.enable_cache()?;
        Ok(m)
    }
}

impl Lm {
    /// `dir/config.json` + `dir/model.safetensors` (a run directory or an HF Llama export).
    pub fn load(dir: &Path) -> Result<Lm> {
        let config = crate::checkpoint::read_config(dir)?;
        config.validate()?;
        let params = crate::checkpoint::load_params(dir, &config)?;
        Ok(Lm {
            config,
            params,
            model: None,
            device: Device::Cpu,
        })
    }

    /// From flat parameters in `LlamaConfig::parameter_shapes` order.
    pub fn new(config: LlamaConfig, params: Vec<f32>) -> Result<Lm> {
        config.validate()?;
        if params.len() as u64 != config.num_parameters() {
            return Err(Error::Config(format!(
                "{} parameters for a config of {}",
                params.len(),
                config.num_parameters()
            )));
        }
        Ok(Lm {
            config,
            params,
            model: None,
            device: Device::Cpu,
        })
    }

    /// Untrained weights, initialised as training starts from `seed` (for tests and for
    /// checks that must hold whatever the model, such as constrained sampling).
    pub fn random(config: LlamaConfig, seed: u64) -> Result<Lm> {
        let cap = Capacity {
            batch: 1,
            context: 1,
        };
        let mut m = Model::new(Cpu::new(), config.clone(), cap, false, false)?;
        m.init(seed);
        let mut params = vec![0f32; m.num_parameters()];
        m.read_params(&mut params);
        Lm::new(config, params)
    }

    /// The inference model, rebuilt when a larger batch or window is needed.
    /// Runs on `device` from the next model built (the CPU by default).
    pub fn on(mut self, device: Device) -> Lm {
        if self.device != device {
            self.model = None;
        }
        self.device = device;
        self
    }

    pub fn model(&mut self, batch: usize, context: usize) -> Result<&mut Net> {
        let fits = self.model.as_ref().is_some_and(|m| {
            let cap = m.cap();
            cap.batch >= batch && cap.context >= context
        });
        if !fits {
            self.model = None;
            let cap = Capacity {
                batch: batch.max(1),
                context: context.max(1),
            };
            let (cfg, p) = (&self.config, &self.params);
            self.model = Some(match self.device {
                Device::Cpu => Net::Cpu(Box::new(Net::build(Cpu::new(), cfg, cap, p)?)),
                Device::Cuda(n) => Net::Cuda(Box::new(Net::build(Cuda::new(n)?, cfg, cap, p)?)),
            });
        }
        Ok(self.model.as_mut().expect("built above"))
    }

    /// Logits [T, V] of one sequence from position 0 (no cache).
    pub fn logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let v = self.config.vocab_size;
        let m = self.model(1, ids.len())?;
        m.forward(ids, None, 1, ids.len(), None)?;
        let mut out = vec![0f32; ids.len() * v];
        m.read_logits(&mut out);
        Ok(out)
    }
}

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

/// Restricts which tokens each row of a generation may draw next: grammar-constrained
/// decoding. The generation loop calls [`begin`](Constraint::begin) once with the prompts,
/// then, at every step and for every row still running, [`mask`](Constraint::mask) on the
/// row's logits before drawing and [`advance`](Constraint::advance) with the token drawn.
pub trait Constraint {
    /// A new batch: `prompts[row]` is each row's prompt (BOS included). An error when a prompt
    /// already breaks the constraint.
    fn begin(&mut self, prompts: &[Vec<u32>]) -> std::result::Result<(), String>;

    /// Sets to `-inf` the logits of every token `row` may not draw next. An error when no
    /// token may be drawn at all.
    fn mask(&mut self, row: usize, logits: &mut [f32]) -> std::result::Result<(), String>;

    /// `row` drew `token` (one of those [`mask`](Constraint::mask) left).
    fn advance(&mut self, row: usize, token: u32);
}

/// Completes every prompt; returns the new tokens of each (EOS included when produced).
pub fn generate(lm: &mut Lm, prompts: &[Vec<u32>], cfg: &GenerateConfig) -> Result<Vec<Vec<u32>>> {
    generate_with(lm, prompts, cfg, None)
}

/// [`generate`], drawing every token under `constraint` when one is given. With a `window`,
/// generation slides: when the cache is full, the last window/2 tokens of every row are
/// re-encoded from position 0 and generation continues, so a stream can be longer than the
/// positions the model learned.
pub fn generate_with<'c>(
    lm: &mut Lm,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    mut constraint: Option<&mut (dyn Constraint + 'c)>,
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
    let vocab = lm.config.vocab_size as u32;
    if let Some(bad) = prompts.iter().flatten().find(|&&t| t >= vocab) {
        return Err(Error::Config(format!(
            "prompt token {bad} is outside the model's vocabulary of {vocab}; use the vocabulary the model was trained with"
        )));
    }
    let limit = lm.config.max_position_embeddings;
    let span = cfg.window.map_or(limit, |w| w.clamp(2, limit));
    let keep = span / 2;
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
    // The last `n` tokens of every row, left-padded to the longest: (ids [B, width], pads).
    let window_input = |hist: &[Vec<u32>], n: usize| -> (Vec<u32>, Vec<usize>) {
        let width = hist.iter().map(|h| h.len().min(n)).max().unwrap_or(1);
        let mut ids = Vec::with_capacity(b * width);
        let mut pads = Vec::with_capacity(b);
        for h in hist {
            let tail = &h[h.len() - h.len().min(n)..];
            pads.push(width - tail.len());
            ids.extend(std::iter::repeat_n(cfg.pad_token_id, width - tail.len()));
            ids.extend_from_slice(tail);
        }
        (ids, pads)
    };
    let mut procs: Vec<LogitsProcessor> = (0..b)
        .map(|i| {
            let seed = cfg.seed ^ (i as u64).wrapping_mul(0xA076_1D64_78BD_642F);
            LogitsProcessor::new(seed, cfg.temperature, cfg.top_k, cfg.top_p)
        })
        .collect();
    if let Some(c) = constraint.as_deref_mut() {
        c.begin(prompts).map_err(Error::Config)?;
    }
    let first = if longest >= span { keep } else { longest };
    let (mut input, mut pads) = window_input(&hist, first);
    let v = vocab as usize;
    let model = lm.model(b, span.min(longest + steps).max(first))?;
    let mut last = vec![0f32; b * v];
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done = vec![false; b];
    let mut pos = 0;
    for _ in 0..steps {
        let mut t = input.len() / b;
        if pos + t > model.cap().context.min(span) {
            (input, pads) = window_input(&hist, keep);
            pos = 0;
            t = input.len() / b;
        }
        model.forward_cached(&input, b, t, pos, &pads)?;
        model.read_last_logits(&mut last);
        pos += t;
        input.clear();
        for row in 0..b {
            if done[row] {
                input.push(cfg.pad_token_id);
                hist[row].push(cfg.pad_token_id);
                continue;
            }
            let logits = &mut last[row * v..(row + 1) * v];
            if let Some(c) = constraint.as_deref_mut() {
                c.mask(row, logits).map_err(Error::Config)?;
            }
            let tok = procs[row].sample(logits);
            if let Some(c) = constraint.as_deref_mut() {
                c.advance(row, tok);
            }
            out[row].push(tok);
            hist[row].push(tok);
            if cfg.eos_token_id == Some(tok) {
                done[row] = true;
            }
            input.push(tok);
        }
        if done.iter().all(|d| *d) {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seeded model with grouped-query attention and 64 positions.
    fn tiny() -> Lm {
        let mut cfg = crate::engine::tests::tiny_config();
        cfg.max_position_embeddings = 64;
        let cap = Capacity {
            batch: 1,
            context: 1,
        };
        let mut m = Model::new(Cpu::new(), cfg.clone(), cap, false, false).unwrap();
        m.init(3);
        let mut p = vec![0f32; m.num_parameters()];
        m.read_params(&mut p);
        // Larger weights than HF's init, so that attention is far from uniform.
        for v in &mut p {
            *v *= 4.0;
        }
        Lm::new(cfg, p).unwrap()
    }

    fn max_abs(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn argmax_of_uncached(lm: &mut Lm, seq: &[u32]) -> u32 {
        let v = lm.config.vocab_size;
        let l = lm.logits(seq).unwrap();
        argmax(&l[(seq.len() - 1) * v..])
    }

    #[test]
    fn cached_decoding_and_left_padding_match_the_full_forward() {
        let mut lm = tiny();
        let v = lm.config.vocab_size;
        let ids: Vec<u32> = vec![0, 5, 9, 33, 2, 17, 8, 8, 30, 1];
        let n = ids.len();
        let full = lm.logits(&ids).unwrap(); // [n, V]
                                             // A prompt of 4, then one token at a time through the cache.
        let m = lm.model(2, 32).unwrap();
        let mut last = vec![0f32; 2 * v];
        m.forward_cached(&ids[..4], 1, 4, 0, &[0]).unwrap();
        m.read_last_logits(&mut last);
        let d = max_abs(&last[..v], &full[3 * v..4 * v]);
        assert!(d < 1e-4, "prefill logits differ by {d}");
        for p in 4..n {
            m.forward_cached(&ids[p..p + 1], 1, 1, p, &[0]).unwrap();
            m.read_last_logits(&mut last);
            let d = max_abs(&last[..v], &full[p * v..(p + 1) * v]);
            assert!(d < 1e-4, "cached logits at {p} differ by {d}");
        }
        // The same sequence left-padded by 3 in a batch with a longer one, then decoded on.
        let other: Vec<u32> = (0..(n as u32 + 3)).map(|i| (i * 5) % 40).collect();
        let mut batch = vec![2u32; 3];
        batch.extend(&ids[..n - 2]);
        batch.extend(&other[..n + 1]);
        let m = lm.model(2, 32).unwrap();
        m.forward_cached(&batch, 2, n + 1, 0, &[3, 0]).unwrap();
        m.read_last_logits(&mut last);
        let padded_row = last[..v].to_vec();
        let want_other = lm.logits(&other[..n + 1]).unwrap();
        let d = max_abs(&padded_row, &full[(n - 3) * v..(n - 2) * v]);
        assert!(d < 1e-4, "left-padded row differs by {d}");
        let d = max_abs(&last[v..], &want_other[n * v..]);
        assert!(d < 1e-4, "unpadded row in a padded batch differs by {d}");
        let m = lm.model(2, 32).unwrap();
        m.forward_cached(&batch, 2, n + 1, 0, &[3, 0]).unwrap();
        m.forward_cached(&[ids[n - 2], other[n + 1]], 2, 1, n + 1, &[3, 0])
            .unwrap();
        m.read_last_logits(&mut last);
        let want_other = lm.logits(&other[..n + 2]).unwrap();
        assert!(max_abs(&last[..v], &full[(n - 2) * v..(n - 1) * v]) < 1e-4);
        assert!(max_abs(&last[v..], &want_other[(n + 1) * v..]) < 1e-4);
    }

    #[test]
    fn batched_generation_is_seeded_and_batch_independent() {
        let mut lm = tiny();
        let prompts = vec![vec![0u32, 4, 9], vec![0u32, 7, 7, 7, 12, 3], vec![0u32]];
        let cfg = GenerateConfig {
            max_new_tokens: 12,
            temperature: 0.9,
            top_k: Some(20),
            top_p: Some(0.95),
            seed: 5,
            eos_token_id: Some(1),
            pad_token_id: 2,
            window: None,
        };
        let a = generate(&mut lm, &prompts, &cfg).unwrap();
        let b = generate(&mut lm, &prompts, &cfg).unwrap();
        assert_eq!(a, b, "same seed, same output");
        for (p, o) in prompts.iter().zip(&a) {
            assert!(!o.is_empty() && o.len() <= 12);
            assert!(
                o.len() == 12 || o.last() == Some(&1),
                "stops at EOS or the limit: {o:?} after {p:?}"
            );
        }
        // A prompt alone gives the same completion as inside the batch.
        let alone_cfg = GenerateConfig {
            seed: 5 ^ 0xA076_1D64_78BD_642F,
            ..cfg.clone()
        };
        let alone = generate(&mut lm, &prompts[1..2], &alone_cfg).unwrap();
        assert_eq!(alone[0], a[1]);
        // Greedy decoding equals argmax of the uncached forward, step by step.
        let greedy = GenerateConfig {
            temperature: 0.0,
            eos_token_id: None,
            max_new_tokens: 5,
            ..cfg
        };
        let g = generate(&mut lm, &prompts[..1], &greedy).unwrap();
        let mut seq = prompts[0].clone();
        for &tok in &g[0] {
            assert_eq!(tok, argmax_of_uncached(&mut lm, &seq));
            seq.push(tok);
        }
    }

    /// Counts up from the last prompt token: each row may only draw `last + 1` (mod 5), and EOS
    /// once it has drawn 4 tokens.
    struct CountUp {
        last: Vec<u32>,
        drawn: Vec<usize>,
        eos: u32,
    }

    impl Constraint for CountUp {
        fn begin(&mut self, prompts: &[Vec<u32>]) -> std::result::Result<(), String> {
            self.last = prompts.iter().map(|p| *p.last().unwrap()).collect();
            self.drawn = vec![0; prompts.len()];
            if self.last.iter().any(|&t| t >= 5) {
                return Err("prompts must end in a token below 5".into());
            }
            Ok(())
        }
        fn mask(&mut self, row: usize, logits: &mut [f32]) -> std::result::Result<(), String> {
            let ok = if self.drawn[row] == 4 {
                self.eos
            } else {
                (self.last[row] + 1) % 5
            };
            for (t, l) in logits.iter_mut().enumerate() {
                if t as u32 != ok {
                    *l = f32::NEG_INFINITY;
                }
            }
            Ok(())
        }
        fn advance(&mut self, row: usize, token: u32) {
            self.last[row] = token;
            self.drawn[row] += 1;
        }
    }

    #[test]
    fn a_constraint_decides_every_token_drawn() {
        let mut lm = tiny();
        let prompts = vec![vec![0u32, 4], vec![0u32, 7, 2], vec![0u32]];
        let mut c = CountUp {
            last: Vec::new(),
            drawn: Vec::new(),
            eos: 9,
        };
        for (temperature, top_k) in [(1.0, None), (0.0, None), (0.7, Some(3))] {
            let cfg = GenerateConfig {
                max_new_tokens: 10,
                temperature,
                top_k,
                seed: 1,
                eos_token_id: Some(9),
                ..GenerateConfig::default()
            };
            let out = generate_with(&mut lm, &prompts, &cfg, Some(&mut c)).unwrap();
            assert_eq!(
                out,
                vec![
                    vec![0, 1, 2, 3, 9],
                    vec![3, 4, 0, 1, 9],
                    vec![1, 2, 3, 4, 9]
                ]
            );
        }
        // A prompt the constraint refuses is an error naming why.
        let err = generate_with(
            &mut lm,
            &[vec![0u32, 6]],
            &GenerateConfig::default(),
            Some(&mut c),
        )
        .unwrap_err();
        assert!(err.to_string().contains("below 5"), "{err}");
    }

    #[test]
    fn sliding_window_generation_stays_within_learned_positions() {
        let mut lm = tiny(); // max_position_embeddings 64
        let prompts = vec![vec![0u32, 4, 9], vec![0u32, 7, 7, 7, 12, 3]];
        let base = GenerateConfig {
            max_new_tokens: 20,
            temperature: 0.0,
            eos_token_id: None,
            pad_token_id: 2,
            ..Default::default()
        };
        // A window the sequence never fills changes nothing.
        let plain = generate(&mut lm, &prompts, &base).unwrap();
        let wide = GenerateConfig {
            window: Some(64),
            ..base.clone()
        };
        assert_eq!(generate(&mut lm, &prompts, &wide).unwrap(), plain);
        // Without a window generation stops at the context; with one it runs past it.
        let long = GenerateConfig {
            max_new_tokens: 150,
            ..base.clone()
        };
        let capped = generate(&mut lm, &prompts, &long).unwrap();
        assert_eq!(capped[1].len(), 64 - 6, "stops at the model's context");
        let slid_cfg = GenerateConfig {
            window: Some(16),
            ..long.clone()
        };
        let slid = generate(&mut lm, &prompts, &slid_cfg).unwrap();
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
            let w = seq[seq.len() - held..].to_vec();
            assert_eq!(tok, argmax_of_uncached(&mut lm, &w));
            seq.push(tok);
            held += 1;
        }
        // A prompt longer than the window starts from its last window/2 tokens.
        let long_prompt = vec![(0..40).map(|i| (i * 7 % 40) as u32).collect::<Vec<u32>>()];
        let short = GenerateConfig {
            window: Some(16),
            max_new_tokens: 3,
            ..base
        };
        assert_eq!(generate(&mut lm, &long_prompt, &short).unwrap()[0].len(), 3);
    }

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
