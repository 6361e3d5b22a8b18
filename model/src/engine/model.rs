//! The paper's Llama over a [`Backend`]: forward, backward and the AdamW step as a handful of
//! named kernel calls per layer, readable top to bottom like llm.c's `train_gpt2.c`.
//!
//! Parameters live in one flat buffer in [`LlamaConfig::parameter_shapes`] order (HF names);
//! q/k/v and gate/up are adjacent there, so each pair is one matmul. Shapes: B batch, T
//! positions, N = B T rows, D hidden, F intermediate, V vocabulary, H query heads, K key/value
//! heads, Dh head dim, QKV = (H + 2K) Dh.

use super::backend::{self, Attention, Backend, Matmul, Span, View, IGNORE};
use crate::llama::LlamaConfig;
use crate::{Error, Result};

/// Where each parameter lives in the flat buffer.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    /// (HF name, shape, span), in `parameter_shapes` order.
    pub tensors: Vec<(String, Vec<usize>, Span)>,
    pub total: usize,
    embed: Span,
    layers: Vec<LayerParams>,
    norm: Span,
    lm_head: Span,
}

#[derive(Clone, Copy, Debug)]
struct LayerParams {
    ln1: Span,
    qkv: Span,
    o: Span,
    ln2: Span,
    gate_up: Span,
    down: Span,
}

impl ParamLayout {
    pub fn new(cfg: &LlamaConfig) -> ParamLayout {
        let mut tensors = Vec::new();
        let mut off = 0;
        for (name, shape) in cfg.parameter_shapes() {
            let len = shape.iter().product();
            tensors.push((name, shape, Span { off, len }));
            off += len;
        }
        let span = |name: &str| {
            tensors
                .iter()
                .find(|(n, _, _)| n == name)
                .map(|t| t.2)
                .unwrap_or(Span { off: 0, len: 0 })
        };
        let join = |a: Span, b: Span| {
            debug_assert_eq!(a.end(), b.off, "adjacent parameters");
            Span {
                off: a.off,
                len: a.len + b.len,
            }
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = |s: &str| span(&format!("model.layers.{i}.{s}.weight"));
                LayerParams {
                    ln1: p("input_layernorm"),
                    qkv: join(
                        join(p("self_attn.q_proj"), p("self_attn.k_proj")),
                        p("self_attn.v_proj"),
                    ),
                    o: p("self_attn.o_proj"),
                    ln2: p("post_attention_layernorm"),
                    gate_up: join(p("mlp.gate_proj"), p("mlp.up_proj")),
                    down: p("mlp.down_proj"),
                }
            })
            .collect();
        ParamLayout {
            embed: span("model.embed_tokens.weight"),
            norm: span("model.norm.weight"),
            lm_head: span("lm_head.weight"),
            layers,
            tensors,
            total: off,
        }
    }

    pub fn get(&self, name: &str) -> Option<(&[usize], Span)> {
        self.tensors
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, s, sp)| (s.as_slice(), *sp))
    }
}

/// The largest batch the arena is sized for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub batch: usize,
    pub context: usize,
}

/// Activations of one layer (spans in the arena). With recomputation (or without training) every
/// layer shares one set, except its input residual `x`.
#[derive(Clone, Copy, Debug)]
struct LayerActs {
    x: Span,     // [N, D] the layer's input residual
    ln1: Span,   // [N, D]
    rstd1: Span, // [N]
    qkv: Span,   // [N, QKV] after RoPE
    att: Span,   // [N, D] attention output (heads concatenated)
    lse: Span,   // [B, H, T]
    mid: Span,   // [N, D] x + attention
    ln2: Span,   // [N, D]
    rstd2: Span, // [N]
    gu: Span,    // [N, 2F] gate | up
    act: Span,   // [N, F] silu(gate) * up
}

#[derive(Clone, Debug)]
struct Acts {
    layers: Vec<LayerActs>,
    xf: Span,     // [N, D] the last residual
    lnf: Span,    // [N, D]
    rstdf: Span,  // [N]
    logits: Span, // [N, V] (the logits' gradient in place after the loss)
    losses: Span, // [N]
    // Gradients of activations, reused by every layer.
    dres: Span, // [N, D]
    dln: Span,  // [N, D]
    dqkv: Span, // [N, QKV]
    datt: Span, // [N, D]
    dgu: Span,  // [N, 2F]
    dact: Span, // [N, F]
    total: usize,
}

impl Acts {
    fn new(cfg: &LlamaConfig, cap: Capacity, train: bool, recompute: bool) -> Acts {
        let (d, f, v, h) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.vocab_size,
            cfg.num_attention_heads,
        );
        let qkv = (h + 2 * cfg.kv_heads()) * cfg.head_dim();
        let n = cap.batch * cap.context;
        let mut off = 0;
        let mut take = |len: usize| {
            let s = Span { off, len };
            off += len;
            s
        };
        let layer = |take: &mut dyn FnMut(usize) -> Span, x: Span| LayerActs {
            x,
            ln1: take(n * d),
            rstd1: take(n),
            qkv: take(n * qkv),
            att: take(n * d),
            lse: take(n * h),
            mid: take(n * d),
            ln2: take(n * d),
            rstd2: take(n),
            gu: take(n * 2 * f),
            act: take(n * f),
        };
        let xs: Vec<Span> = (0..=cfg.num_hidden_layers).map(|_| take(n * d)).collect();
        let shared = !train || recompute;
        let first = layer(&mut take, xs[0]);
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                if l == 0 {
                    first
                } else if shared {
                    LayerActs { x: xs[l], ..first }
                } else {
                    layer(&mut take, xs[l])
                }
            })
            .collect();
        let g = |take: &mut dyn FnMut(usize) -> Span, len: usize| {
            if train {
                take(len)
            } else {
                Span { off: 0, len: 0 }
            }
        };
        let xf = xs[cfg.num_hidden_layers];
        let (lnf, rstdf, logits, losses) = (take(n * d), take(n), take(n * v), take(n));
        let (dres, dln, dqkv_, datt, dgu, dact) = (
            g(&mut take, n * d),
            g(&mut take, n * d),
            g(&mut take, n * qkv),
            g(&mut take, n * d),
            g(&mut take, n * 2 * f),
            g(&mut take, n * f),
        );
        Acts {
            layers,
            xf,
            lnf,
            rstdf,
            logits,
            losses,
            dres,
            dln,
            dqkv: dqkv_,
            datt,
            dgu,
            dact,
            total: off,
        }
    }
}

/// Keys and values of every layer for generation: [L, B, S, K * Dh] each, S = the context.
struct Cache<B: Backend> {
    k: B::Buf,
    v: B::Buf,
}

struct Training<B: Backend> {
    grads: B::Buf,
    /// AdamW's moments of the parameters in `opt` (all of them unless ZeRO-1 shards them).
    m: B::Buf,
    v: B::Buf,
    opt: std::ops::Range<usize>,
    /// `decay` cut to `opt`.
    opt_decay: Vec<(Span, bool)>,
}

/// A Llama on a backend: parameters, (when training) gradients and AdamW moments, activations.
pub struct Model<B: Backend> {
    pub config: LlamaConfig,
    pub backend: B,
    pub layout: ParamLayout,
    pub cap: Capacity,
    params: B::Buf,
    training: Option<Training<B>>,
    cache: Option<Cache<B>>,
    acts: Acts,
    arena: B::Buf,
    ids: B::Ids,
    targets: B::Ids,
    cos: B::Buf,
    sin: B::Buf,
    recompute: bool,
    /// (span, decayed?) per parameter: matrices are decayed, norm weights are not.
    decay: Vec<(Span, bool)>,
    losses_host: Vec<f32>,
    /// The (B, T) of the last forward.
    last: (usize, usize),
}

impl<B: Backend> Model<B> {
    /// Allocates everything a run needs, once. `train`: gradients, moments and the activations
    /// a backward needs; `recompute`: keep only each layer's input and recompute the rest in
    /// the backward (less memory for long contexts, one more forward per step).
    pub fn new(
        backend: B,
        config: LlamaConfig,
        cap: Capacity,
        train: bool,
        recompute: bool,
    ) -> Result<Model<B>> {
        config.validate()?;
        if cap.context > config.max_position_embeddings || cap.batch == 0 || cap.context == 0 {
            return Err(Error::Config(format!(
                "a batch of {} x {} positions does not fit the model (max_position_embeddings {})",
                cap.batch, cap.context, config.max_position_embeddings
            )));
        }
        let layout = ParamLayout::new(&config);
        let acts = Acts::new(&config, cap, train, recompute);
        let params = backend.alloc(layout.total)?;
        let training = if train {
            Some(Training {
                grads: backend.alloc(layout.total)?,
                m: backend.alloc(layout.total)?,
                v: backend.alloc(layout.total)?,
                opt: 0..layout.total,
                opt_decay: Vec::new(),
            })
        } else {
            None
        };
        let arena = backend.alloc(acts.total)?;
        let n = cap.batch * cap.context;
        let (ids, targets) = (backend.alloc_ids(n)?, backend.alloc_ids(n)?);
        // RoPE tables [P, Dh/2], HF's arithmetic (f32 inverse frequencies times f32 positions).
        let (dh, p) = (config.head_dim(), config.max_position_embeddings);
        let inv: Vec<f32> = (0..dh / 2)
            .map(|i| 1.0 / (config.rope_theta as f32).powf((2 * i) as f32 / dh as f32))
            .collect();
        let mut c = Vec::with_capacity(p * dh / 2);
        let mut s = Vec::with_capacity(p * dh / 2);
        for pos in 0..p {
            for f in &inv {
                let a = pos as f32 * f;
                c.push(a.cos());
                s.push(a.sin());
            }
        }
        let (cos, sin) = (backend.alloc(c.len())?, backend.alloc(s.len())?);
        backend.upload(
            View::new(
                &cos,
                Span {
                    off: 0,
                    len: c.len(),
                },
            ),
            &c,
        );
        backend.upload(
            View::new(
                &sin,
                Span {
                    off: 0,
                    len: s.len(),
                },
            ),
            &s,
        );
        let decay: Vec<(Span, bool)> = layout
            .tensors
            .iter()
            .map(|(_, shape, span)| (*span, shape.len() >= 2))
            .collect();
        let mut training = training;
        if let Some(t) = training.as_mut() {
            t.opt_decay = decay.clone();
        }
        Ok(Model {
            config,
            backend,
            layout,
            cap,
            params,
            training,
            cache: None,
            acts,
            arena,
            ids,
            targets,
            cos,
            sin,
            recompute,
            decay,
            losses_host: vec![0.0; n],
            last: (0, 0),
        })
    }

    /// HF's initialisation from a seed: normal(0, 0.02) for matrices, ones for norm weights,
    /// drawn in `parameter_shapes` order (the same values as `llama::init_params`).
    pub fn init(&mut self, seed: u64) {
        let mut rng = crate::rng::Rng::new(seed);
        let mut host = vec![0f32; self.layout.total];
        for (_, shape, span) in &self.layout.tensors {
            let dst = &mut host[span.off..span.end()];
            if shape.len() == 1 {
                dst.fill(1.0);
            } else {
                for v in dst {
                    *v = rng.normal() as f32 * 0.02;
                }
            }
        }
        self.write_params(&host);
    }

    pub fn num_parameters(&self) -> usize {
        self.layout.total
    }

    fn all(&self) -> Span {
        Span {
            off: 0,
            len: self.layout.total,
        }
    }

    /// The flat parameters to the host (`parameter_shapes` order).
    pub fn read_params(&self, out: &mut [f32]) {
        self.backend
            .download(View::new(&self.params, self.all()), out);
    }

    pub fn write_params(&mut self, src: &[f32]) {
        self.backend
            .upload(View::new(&self.params, self.all()), src);
    }

    fn training(&self) -> Result<&Training<B>> {
        self.training
            .as_ref()
            .ok_or_else(|| Error::Config("this model was built for inference only".into()))
    }

    /// (gradients, first moments, second moments) to the host; the moments of the optimizer's
    /// range only ([`Model::optimizer_range`]: everything unless sharded).
    pub fn read_state(&self, grads: &mut [f32], m: &mut [f32], v: &mut [f32]) -> Result<()> {
        let t = self.training()?;
        let all = self.all();
        self.backend.download(View::new(&t.grads, all), grads);
        let own = Span {
            off: 0,
            len: t.opt.len(),
        };
        self.backend.download(View::new(&t.m, own), m);
        self.backend.download(View::new(&t.v, own), v);
        Ok(())
    }

    /// Keeps AdamW's moments for the parameters in `range` only (ZeRO-1: this rank's slice of
    /// the flat buffer); [`Model::adamw`] then updates those parameters alone. The moments
    /// start at zero.
    pub fn set_optimizer_range(&mut self, range: std::ops::Range<usize>) -> Result<()> {
        let total = self.layout.total;
        if range.start > range.end || range.end > total {
            return Err(Error::Config(format!(
                "optimizer range {range:?} is outside the {total} parameters"
            )));
        }
        let decay: Vec<(Span, bool)> = self
            .decay
            .iter()
            .filter_map(|&(sp, d)| {
                let (lo, hi) = (sp.off.max(range.start), sp.end().min(range.end));
                (lo < hi).then_some((
                    Span {
                        off: lo,
                        len: hi - lo,
                    },
                    d,
                ))
            })
            .collect();
        let n = range.len().max(1);
        let (m, v) = (self.backend.alloc(n)?, self.backend.alloc(n)?);
        let t = self
            .training
            .as_mut()
            .ok_or_else(|| Error::Config("this model was built for inference only".into()))?;
        (t.m, t.v, t.opt, t.opt_decay) = (m, v, range, decay);
        Ok(())
    }

    /// The parameters AdamW updates here (all of them unless [`Model::set_optimizer_range`]).
    pub fn optimizer_range(&self) -> std::ops::Range<usize> {
        self.training
            .as_ref()
            .map_or(0..self.layout.total, |t| t.opt.clone())
    }

    /// Runs `f` over the gradient buffer on the host, bucket by bucket through `host` (as many
    /// floats as it holds each: download, `f(offset, values)`, upload): how ranks sum their
    /// gradients.
    pub fn map_grads(
        &mut self,
        host: &mut [f32],
        mut f: impl FnMut(usize, &mut [f32]),
    ) -> Result<()> {
        let total = self.layout.total;
        let t = self.training()?;
        if host.is_empty() {
            return Err(Error::Config("map_grads needs a host buffer".into()));
        }
        let mut off = 0;
        while off < total {
            let len = host.len().min(total - off);
            let span = Span { off, len };
            let h = &mut host[..len];
            self.backend.download(View::new(&t.grads, span), h);
            f(off, h);
            self.backend.upload(View::new(&t.grads, span), h);
            off += len;
        }
        Ok(())
    }

    /// Host values into parameters `range` of the flat buffer.
    pub fn write_params_range(&mut self, range: std::ops::Range<usize>, src: &[f32]) {
        let span = Span {
            off: range.start,
            len: range.len(),
        };
        self.backend.upload(View::new(&self.params, span), src);
    }

    /// Parameters `range` of the flat buffer to the host.
    pub fn read_params_range(&self, range: std::ops::Range<usize>, out: &mut [f32]) {
        let span = Span {
            off: range.start,
            len: range.len(),
        };
        self.backend.download(View::new(&self.params, span), out);
    }

    /// Averages the gradient buffer over the ranks on the device, through the communicator
    /// attached to the backend (NCCL); `false` when it has none (the caller goes through host
    /// memory). Device errors surface in the backend's `status`.
    pub fn all_average_grads(&mut self) -> Result<bool> {
        let all = self.all();
        let t = self.training()?;
        Ok(self.backend.all_average(View::new(&t.grads, all)))
    }

    /// Rank `root`'s parameters `range` to every rank on the device (ZeRO-1's exchange);
    /// `false` when the backend has no communicator.
    pub fn broadcast_params(&mut self, root: usize, range: std::ops::Range<usize>) -> bool {
        let span = Span {
            off: range.start,
            len: range.len(),
        };
        self.backend.broadcast(root, View::new(&self.params, span))
    }

    /// Replaces the gradient buffer (gradients computed elsewhere: a reference, another rank).
    pub fn write_grads(&mut self, g: &[f32]) -> Result<()> {
        let all = self.all();
        let t = self.training()?;
        self.backend.upload(View::new(&t.grads, all), g);
        Ok(())
    }

    /// AdamW's moments from a checkpoint (every parameter's; a sharded optimizer keeps its
    /// range).
    pub fn write_moments(&mut self, m: &[f32], v: &[f32]) -> Result<()> {
        let t = self.training()?;
        let own = Span {
            off: 0,
            len: t.opt.len(),
        };
        self.backend.upload(View::new(&t.m, own), &m[t.opt.clone()]);
        self.backend.upload(View::new(&t.v, own), &v[t.opt.clone()]);
        Ok(())
    }

    fn check(&self, inputs: &[u32], b: usize, t: usize) -> Result<()> {
        if b == 0 || t == 0 || b > self.cap.batch || t > self.cap.context {
            return Err(Error::Config(format!(
                "a batch of {b} x {t} does not fit the {} x {} the model was built for",
                self.cap.batch, self.cap.context
            )));
        }
        if inputs.len() != b * t {
            return Err(Error::Config(format!(
                "{} input ids for a batch of {b} x {t}",
                inputs.len()
            )));
        }
        let v = self.config.vocab_size as u32;
        if let Some(bad) = inputs.iter().find(|&&i| i >= v) {
            return Err(Error::Data(format!(
                "token id {bad} is outside the vocabulary of {v} entries"
            )));
        }
        Ok(())
    }

    fn shape(&self, b: usize, t: usize) -> Attention {
        Attention {
            batch: b,
            seq: t,
            heads: self.config.num_attention_heads,
            kv_heads: self.config.kv_heads(),
            head_dim: self.config.head_dim(),
        }
    }

    /// The forward pass over `inputs` [B, T]; with `targets` [B, T] (`IGNORE` where a position
    /// is not scored) also the per-position losses, returned as their sum, and with
    /// `grad_scale` the logits' gradient (for [`Self::backward`]). The logits of the last call
    /// stay readable through [`Self::read_logits`] when no gradient was asked for.
    pub fn forward(
        &mut self,
        inputs: &[u32],
        targets: Option<&[u32]>,
        b: usize,
        t: usize,
        grad_scale: Option<f32>,
    ) -> Result<Option<f64>> {
        self.check(inputs, b, t)?;
        if grad_scale.is_some() {
            self.training()?;
        }
        let (n, v) = (b * t, self.config.vocab_size);
        if let Some(y) = targets {
            if y.len() != n || y.iter().any(|&y| y != IGNORE && y >= v as u32) {
                return Err(Error::Data(format!(
                    "{} targets for {n} positions, or a target outside the vocabulary of {v}",
                    y.len()
                )));
            }
        }
        self.last = (b, t);
        self.logits_forward(inputs, b, t, None);
        let (be, a) = (&self.backend, &self.acts);
        let act = |sp| self.act(sp);
        let Some(targets) = targets else {
            return Ok(None);
        };
        be.upload_ids(&self.targets, targets);
        be.cross_entropy(
            act(a.losses),
            act(a.logits),
            &self.targets,
            n,
            v,
            grad_scale,
        );
        let host = &mut self.losses_host[..n];
        self.backend
            .download(View::new(&self.arena, self.acts.losses.prefix(n)), host);
        Ok(Some(host.iter().map(|&l| l as f64).sum()))
    }

    /// Allocates the KV cache generation needs ([`Self::forward_cached`]): keys and values of
    /// every layer for the capacity's batch x context positions.
    pub fn enable_cache(&mut self) -> Result<()> {
        if self.cache.is_none() {
            let c = &self.config;
            let len = c.num_hidden_layers
                * self.cap.batch
                * self.cap.context
                * c.kv_heads()
                * c.head_dim();
            self.cache = Some(Cache {
                k: self.backend.alloc(len)?,
                v: self.backend.alloc(len)?,
            });
        }
        Ok(())
    }

    /// The forward of `inputs` [B, T] at positions pos0..pos0 + T, attending to the cached
    /// keys and values of the positions before (which it extends); `pads[b]` leading positions
    /// of row b (counted from position 0) are left padding that no real token attends to. RoPE
    /// scores depend only on position differences, so a left-padded row gives the logits of
    /// the unpadded one. Read the logits with [`Self::read_last_logits`].
    pub fn forward_cached(
        &mut self,
        inputs: &[u32],
        b: usize,
        t: usize,
        pos0: usize,
        pads: &[usize],
    ) -> Result<()> {
        self.check(inputs, b, t)?;
        if self.cache.is_none() {
            return Err(Error::Config(
                "forward_cached needs enable_cache first".into(),
            ));
        }
        if pos0 + t > self.cap.context || pads.len() != b {
            return Err(Error::Config(format!(
                "positions {pos0}..{} with {} pads do not fit the cache of {} positions x {b} rows",
                pos0 + t,
                pads.len(),
                self.cap.context
            )));
        }
        self.last = (b, t);
        self.logits_forward(inputs, b, t, Some((pos0, pads)));
        Ok(())
    }

    /// ids -> embedding -> layers -> rmsnorm -> lm_head: the logits [B, T, V] in the arena.
    fn logits_forward(
        &self,
        inputs: &[u32],
        b: usize,
        t: usize,
        cached: Option<(usize, &[usize])>,
    ) {
        let (n, d, v) = (b * t, self.config.hidden_size, self.config.vocab_size);
        let (be, a, lay) = (&self.backend, &self.acts, &self.layout);
        let (act, par) = (|sp| self.act(sp), |sp| self.param(sp));
        be.upload_ids(&self.ids, inputs);
        be.embedding_forward(act(a.layers[0].x), par(lay.embed), &self.ids, n, d);
        for l in 0..self.config.num_hidden_layers {
            self.layer_forward(l, b, t, true, cached);
        }
        let eps = self.config.rms_norm_eps as f32;
        be.rmsnorm_forward(
            act(a.lnf),
            act(a.rstdf),
            act(a.xf),
            par(lay.norm),
            n,
            d,
            eps,
        );
        self.linear(a.logits, a.lnf, lay.lm_head, n, d, v);
    }

    /// The logits of the last position of every row of the last forward: [B, V].
    pub fn read_last_logits(&self, out: &mut [f32]) {
        let (b, t) = self.last;
        let v = self.config.vocab_size;
        for r in 0..b {
            let span = self.acts.logits.sub((r * t + t - 1) * v, v);
            self.backend
                .download(View::new(&self.arena, span), &mut out[r * v..(r + 1) * v]);
        }
    }

    /// The losses of the last forward with targets, per position.
    pub fn losses(&self) -> &[f32] {
        &self.losses_host[..self.last.0 * self.last.1]
    }

    /// The logits [B, T, V] of the last forward (call before anything that overwrites them:
    /// a forward with a gradient replaces them by their gradient).
    pub fn read_logits(&self, out: &mut [f32]) {
        let n = self.last.0 * self.last.1 * self.config.vocab_size;
        self.backend.download(
            View::new(&self.arena, self.acts.logits.prefix(n)),
            &mut out[..n],
        );
    }

    /// One layer: x -> rmsnorm -> qkv -> rope -> attention -> o + x = mid -> rmsnorm -> gate|up
    /// -> swiglu -> down + mid = the next layer's x (skipped when recomputing for a backward).
    fn layer_forward(
        &self,
        l: usize,
        b: usize,
        t: usize,
        write_out: bool,
        cached: Option<(usize, &[usize])>,
    ) {
        let cfg = &self.config;
        let (n, d, f) = (b * t, cfg.hidden_size, cfg.intermediate_size);
        let s = self.shape(b, t);
        let qkv = s.row();
        let eps = cfg.rms_norm_eps as f32;
        let (be, a, p) = (&self.backend, &self.acts.layers[l], &self.layout.layers[l]);
        let (act, par) = (|sp| self.act(sp), |sp| self.param(sp));
        be.rmsnorm_forward(act(a.ln1), act(a.rstd1), act(a.x), par(p.ln1), n, d, eps);
        self.linear(a.qkv, a.ln1, p.qkv, n, d, qkv);
        let pos0 = cached.map_or(0, |c| c.0);
        be.rope_forward(
            act(a.qkv),
            self.rope(&self.cos),
            self.rope(&self.sin),
            s,
            pos0,
        );
        match (cached, &self.cache) {
            (Some((pos0, pads)), Some(c)) => {
                let len = self.cap.context;
                let per = self.cap.batch * len * self.config.kv_heads() * self.config.head_dim();
                let span = Span {
                    off: l * per,
                    len: per,
                };
                let (k, v) = (View::new(&c.k, span), View::new(&c.v, span));
                be.kv_store(k, v, act(a.qkv), s, len, pos0);
                be.attention_cached(act(a.att), act(a.qkv), k, v, s, len, pos0, pads);
            }
            _ => be.attention_forward(act(a.att), act(a.lse), act(a.qkv), s),
        }
        self.linear(a.mid, a.att, p.o, n, d, d);
        be.add_assign(act(a.mid.prefix(n * d)), act(a.x.prefix(n * d)));
        be.rmsnorm_forward(act(a.ln2), act(a.rstd2), act(a.mid), par(p.ln2), n, d, eps);
        self.linear(a.gu, a.ln2, p.gate_up, n, d, 2 * f);
        be.swiglu_forward(act(a.act), act(a.gu), n, f);
        if write_out {
            let next = self.next_x(l);
            self.linear(next, a.act, p.down, n, f, d);
            be.add_assign(act(next.prefix(n * d)), act(a.mid.prefix(n * d)));
        }
    }

    fn act(&self, s: Span) -> View<'_, B> {
        View::new(&self.arena, s)
    }

    fn param(&self, s: Span) -> View<'_, B> {
        View::new(&self.params, s)
    }

    /// y [N, out] = x [N, in] . w [out, in]^T (a Linear without bias; x, y in the arena).
    fn linear(&self, y: Span, x: Span, w: Span, n: usize, inp: usize, out: usize) {
        let op = mm(n, out, inp, false, true, false);
        self.backend
            .matmul(self.act(y), self.act(x), self.param(w), op);
    }

    /// The backward of [`Self::linear`]: dw += dy^T x, dx = dy w.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        grads: &B::Buf,
        dx: Span,
        dw: Span,
        dy: Span,
        x: Span,
        w: Span,
        n: usize,
        inp: usize,
        out: usize,
    ) {
        let be = &self.backend;
        be.matmul(
            View::new(grads, dw),
            self.act(dy),
            self.act(x),
            mm(out, inp, n, true, false, true),
        );
        be.matmul(
            self.act(dx),
            self.act(dy),
            self.param(w),
            mm(n, inp, out, false, false, false),
        );
    }

    fn next_x(&self, l: usize) -> Span {
        match self.acts.layers.get(l + 1) {
            Some(next) => next.x,
            None => self.acts.xf,
        }
    }

    fn rope<'a>(&'a self, table: &'a B::Buf) -> View<'a, B> {
        let len = self.config.max_position_embeddings * self.config.head_dim() / 2;
        View::new(table, Span { off: 0, len })
    }

    /// Adds the gradient of the last forward's (scaled) loss to the gradient buffer; the
    /// forward must have been called with a `grad_scale`.
    pub fn backward(&mut self) -> Result<()> {
        let tr = self.training()?;
        let (b, t) = self.last;
        let cfg = &self.config;
        let (n, d, f, v) = (
            b * t,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.vocab_size,
        );
        let s = self.shape(b, t);
        let qkv = s.row();
        let (be, a, lay, g) = (&self.backend, &self.acts, &self.layout, &tr.grads);
        let (act, par) = (|sp| self.act(sp), |sp| self.param(sp));
        let grad = |sp: Span| View::<B>::new(g, sp);
        // The head: logits = lnf W_lm^T (the logits' gradient is in place), lnf = rmsnorm(xf).
        self.linear_backward(g, a.dln, lay.lm_head, a.logits, a.lnf, lay.lm_head, n, d, v);
        be.rmsnorm_backward(
            act(a.dres),
            grad(lay.norm),
            act(a.dln),
            act(a.xf),
            par(lay.norm),
            act(a.rstdf),
            n,
            d,
            false,
        );
        for l in (0..cfg.num_hidden_layers).rev() {
            if self.recompute {
                self.layer_forward(l, b, t, false, None);
            }
            let (la, p) = (&a.layers[l], &lay.layers[l]);
            // MLP: x' = mid + down(swiglu(gate_up(rmsnorm(mid)))); dres holds dL/dx'.
            self.linear_backward(g, a.dact, p.down, a.dres, la.act, p.down, n, f, d);
            be.swiglu_backward(act(a.dgu), act(a.dact), act(la.gu), n, f);
            self.linear_backward(g, a.dln, p.gate_up, a.dgu, la.ln2, p.gate_up, n, d, 2 * f);
            be.rmsnorm_backward(
                act(a.dres),
                grad(p.ln2),
                act(a.dln),
                act(la.mid),
                par(p.ln2),
                act(la.rstd2),
                n,
                d,
                true,
            );
            // Attention: mid = x + o(attention(rope(qkv(rmsnorm(x))))); dres holds dL/dmid.
            self.linear_backward(g, a.datt, p.o, a.dres, la.att, p.o, n, d, d);
            be.attention_backward(
                act(a.dqkv),
                act(a.datt),
                act(la.att),
                act(la.lse),
                act(la.qkv),
                s,
            );
            be.rope_backward(
                act(a.dqkv),
                self.rope(&self.cos),
                self.rope(&self.sin),
                s,
                0,
            );
            self.linear_backward(g, a.dln, p.qkv, a.dqkv, la.ln1, p.qkv, n, d, qkv);
            be.rmsnorm_backward(
                act(a.dres),
                grad(p.ln1),
                act(a.dln),
                act(la.x),
                par(p.ln1),
                act(la.rstd1),
                n,
                d,
                true,
            );
        }
        be.embedding_backward(grad(lay.embed), act(a.dres), &self.ids, n, d);
        Ok(())
    }

    pub fn zero_grad(&mut self) -> Result<()> {
        let all = self.all();
        let t = self.training()?;
        self.backend.fill(View::new(&t.grads, all), 0.0);
        Ok(())
    }

    /// The global L2 norm of the gradient buffer.
    pub fn grad_norm(&self) -> Result<f64> {
        let t = self.training()?;
        Ok(self
            .backend
            .sum_squares(View::new(&t.grads, self.all()))
            .sqrt())
    }

    /// One AdamW update of every parameter in the optimizer's range (decay on matrices only).
    pub fn adamw(&mut self, hp: backend::AdamW) -> Result<()> {
        let t = self.training()?;
        self.backend.adamw(
            &self.params,
            &t.grads,
            &t.m,
            &t.v,
            &t.opt_decay,
            t.opt.start,
            hp,
        );
        Ok(())
    }
}

fn mm(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool, accumulate: bool) -> Matmul {
    Matmul {
        m,
        n,
        k,
        trans_a,
        trans_b,
        accumulate,
    }
}
