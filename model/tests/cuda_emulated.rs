//! The CUDA backend's code on the emulated device (`engine/src/cuda/emu.rs`: kernels.cu built
//! for the CPU, blocks run with their threads as fibers, real barriers and warp shuffles): every
//! kernel against the CPU backend, training steps (accumulation, clipping, AdamW, recomputation)
//! and KV-cache generation against the same on the CPU. What this does not show: a GPU's speed,
//! its concurrent memory model and rounding; those wait for `tools/gpu_check.sh`. Needs a C++
//! compiler; CI insists (`CODECLM_REQUIRE_EMU`).

use codeclm_model::engine::backend::Matmul;
use codeclm_model::engine::{Backend, Capacity, Cpu, Cuda, Device, Model, Span, View};
use codeclm_model::train::{train_step, TrainConfig};
use codeclm_model::{generate, GenerateConfig, LlamaConfig, Lm};

fn emulated() -> Option<Cuda> {
    match Cuda::emulated() {
        Ok(c) => Some(c),
        Err(e) => {
            assert!(
                std::env::var_os("CODECLM_REQUIRE_EMU").is_none(),
                "CODECLM_REQUIRE_EMU is set but: {e}"
            );
            eprintln!("no emulated CUDA device here: {e}");
            None
        }
    }
}

#[test]
fn every_kernel_matches_the_cpu_backend() {
    let Some(cuda) = emulated() else { return };
    let diffs = codeclm_model::engine::check::compare(&Cpu::new(), &cuda, 7).unwrap();
    assert_eq!(diffs.len(), 40, "the check covers every output");
    for d in &diffs {
        assert!(
            d.max_rel <= 1e-4 && d.max_abs.is_finite(),
            "{}: max_rel {} max_abs {}",
            d.kernel,
            d.max_rel,
            d.max_abs
        );
    }
}

fn model<B: Backend>(backend: B, recompute: bool) -> Model<B> {
    let mut cfg = LlamaConfig::preset("tiny", 320).unwrap();
    cfg.max_position_embeddings = 64;
    let cap = Capacity {
        batch: 2,
        context: 24,
    };
    let mut m = Model::new(backend, cfg, cap, true, recompute).unwrap();
    m.init(3);
    m
}

fn params<B: Backend>(m: &Model<B>) -> Vec<f32> {
    let mut p = vec![0f32; m.num_parameters()];
    m.read_params(&mut p);
    p
}

#[test]
fn training_steps_match_the_cpu() {
    let Some(cuda) = emulated() else { return };
    let one = codeclm_model::dist::Dist::single();
    let mut tc = TrainConfig::preset("tiny").unwrap();
    tc.grad_clip = 0.5; // clipping takes part
    let (b, t) = (2usize, 24usize);
    let x: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 7 + 3) % 320).collect();
    let mut y: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 13 + 1) % 320).collect();
    y[5] = codeclm_model::engine::IGNORE; // an ignored target
    let x2: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 31 + 11) % 320).collect();
    let micro = [(x.as_slice(), y.as_slice()), (x2.as_slice(), x.as_slice())];
    for recompute in [false, true] {
        let (mut c, mut g) = (
            model(Cpu::new(), false),
            model(Cuda::emulated().unwrap(), recompute),
        );
        assert_eq!(params(&c), params(&g), "the same initial weights");
        for step in 1..=3 {
            let (lc, nc) = train_step(&mut c, &micro, &tc, step, 1e-3, &one).unwrap();
            let (lg, ng) = train_step(&mut g, &micro, &tc, step, 1e-3, &one).unwrap();
            assert!(
                (lc - lg).abs() <= 1e-5 * lc.abs(),
                "step {step}: loss {lc} (cpu) vs {lg}"
            );
            assert!(
                (nc - ng).abs() <= 1e-4 * nc.abs(),
                "step {step}: grad norm {nc} vs {ng}"
            );
        }
        let (pc, pg) = (params(&c), params(&g));
        let worst = pc
            .iter()
            .zip(&pg)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // AdamW's first steps move each weight by about lr; fp32 summation orders differ.
        assert!(
            worst <= 2e-5,
            "recompute {recompute}: weights differ by {worst}"
        );
    }
    let _ = cuda;
}

#[test]
fn kv_cache_generation_matches_the_cpu() {
    if emulated().is_none() {
        return;
    }
    let mut cfg = LlamaConfig::preset("tiny", 320).unwrap();
    cfg.max_position_embeddings = 48;
    let mut on_cpu = Lm::random(cfg.clone(), 5).unwrap();
    // Two prompts of different lengths: left padding in the cache.
    let prompts = vec![vec![0u32, 17, 40, 99], vec![0u32, 5]];
    let gc = GenerateConfig {
        max_new_tokens: 20,
        temperature: 0.0,
        pad_token_id: 2,
        ..Default::default()
    };
    let a = generate(&mut on_cpu, &prompts, &gc).unwrap();
    std::env::set_var("CODECLM_CUDA_EMULATE", "1");
    let mut on_cuda = Lm::random(cfg, 5).unwrap().on(Device::Cuda(0));
    let b = generate(&mut on_cuda, &prompts, &gc).unwrap();
    assert_eq!(
        a, b,
        "greedy generations differ between the CPU and the emulated device"
    );
    // The logits of a whole sequence (no cache) too.
    let ids: Vec<u32> = a[0].clone();
    let lc = on_cpu.logits(&ids).unwrap();
    let lg = on_cuda.logits(&ids).unwrap();
    let worst = lc
        .iter()
        .zip(&lg)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-4, "logits differ by {worst}");
}

/// f32 to the nearest bf16 (ties to even) and back: what the device rounds matmul inputs to.
fn bf16(x: f32) -> f32 {
    let u = x.to_bits();
    f32::from_bits(((u + 0x7fff + ((u >> 16) & 1)) >> 16) << 16)
}

fn view<B: Backend>(x: &B::Buf, len: usize) -> View<'_, B> {
    View::new(x, Span { off: 0, len })
}

/// `c0 (+)= op(a) op(b)` on `be`.
fn product<B: Backend>(be: &B, a: &[f32], b: &[f32], c0: &[f32], mm: Matmul) -> Vec<f32> {
    let (ba, bb, bc) = (
        be.alloc(a.len()).unwrap(),
        be.alloc(b.len()).unwrap(),
        be.alloc(c0.len()).unwrap(),
    );
    be.upload(view::<B>(&ba, a.len()), a);
    be.upload(view::<B>(&bb, b.len()), b);
    be.upload(view::<B>(&bc, c0.len()), c0);
    be.matmul(
        view::<B>(&bc, c0.len()),
        view::<B>(&ba, a.len()),
        view::<B>(&bb, b.len()),
        mm,
    );
    let mut out = vec![0f32; c0.len()];
    be.download(view::<B>(&bc, c0.len()), &mut out);
    be.status().unwrap();
    out
}

#[test]
fn bf16_matmuls_round_the_inputs_and_accumulate_in_f32() {
    let Some(cuda) = emulated() else { return };
    cuda.enable_bf16(true).unwrap();
    let cpu = Cpu::new();
    let (m, n, k) = (13usize, 9usize, 70usize);
    let mut rng = codeclm_model::rng::Rng::new(11);
    let mut draw = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| (rng.uniform() * 2.0 - 1.0) as f32)
            .collect()
    };
    let (a, b, c0) = (draw(m * k), draw(k * n), draw(m * n));
    let rounded = |v: &[f32]| v.iter().map(|&x| bf16(x)).collect::<Vec<f32>>();
    for (ta, tb, acc) in [
        (false, false, false),
        (true, false, false),
        (false, true, true),
        (true, true, true),
    ] {
        let mm = Matmul {
            m,
            n,
            k,
            trans_a: ta,
            trans_b: tb,
            accumulate: acc,
        };
        let got = product(&cuda, &a, &b, &c0, mm);
        // The CPU's f32 product of the bf16-rounded inputs: the same up to summation order.
        let want = product(&cpu, &rounded(&a), &rounded(&b), &c0, mm);
        let exact = product(&cpu, &a, &b, &c0, mm);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let moved = got
            .iter()
            .zip(&exact)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-5,
            "ta {ta} tb {tb}: {worst} from the rounded product"
        );
        assert!(
            moved > 1e-4,
            "ta {ta} tb {tb}: the inputs were not rounded ({moved})"
        );
    }
}

#[test]
fn bf16_training_steps_follow_the_f32_ones() {
    if emulated().is_none() {
        return;
    }
    let one = codeclm_model::dist::Dist::single();
    let tc = TrainConfig::preset("tiny").unwrap();
    let (b, t) = (2usize, 24usize);
    let x: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 7 + 3) % 320).collect();
    let y: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 13 + 1) % 320).collect();
    let micro = [(x.as_slice(), y.as_slice())];
    let cuda = Cuda::emulated().unwrap();
    cuda.enable_bf16(true).unwrap();
    let (mut c, mut g) = (model(Cpu::new(), false), model(cuda, false));
    for step in 1..=3 {
        let (lc, _) = train_step(&mut c, &micro, &tc, step, 1e-3, &one).unwrap();
        let (lg, _) = train_step(&mut g, &micro, &tc, step, 1e-3, &one).unwrap();
        // bf16 inputs carry 8 bits of mantissa: the loss moves in its third digit at most.
        assert!(
            (lc - lg).abs() <= 5e-3 * lc.abs(),
            "step {step}: loss {lc} (f32 cpu) vs {lg} (bf16)"
        );
        assert!(lc != lg, "step {step}: bf16 changed nothing ({lc})");
    }
}

/// Attention in the bf16 mode reads q, k and v rounded to bf16 (f32 accumulation): its output,
/// log-sum-exp and gradients are the CPU's on the rounded qkv.
#[test]
fn bf16_attention_reads_rounded_inputs() {
    use codeclm_model::engine::backend::Attention;
    let Some(cuda) = emulated() else { return };
    cuda.enable_bf16(true).unwrap();
    let cpu = Cpu::new();
    let s = Attention {
        batch: 1,
        seq: 100,
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
    };
    let (rows, row, d_out) = (s.batch * s.seq, s.row(), s.heads * s.head_dim);
    let mut rng = codeclm_model::rng::Rng::new(21);
    let mut draw = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| (rng.uniform() * 2.0 - 1.0) as f32)
            .collect()
    };
    let (qkv, dout) = (draw(rows * row), draw(rows * d_out));
    fn run<B: Backend>(be: &B, qkv: &[f32], dout: &[f32], s: Attention) -> [Vec<f32>; 3] {
        let (rows, row, d_out) = (s.batch * s.seq, s.row(), s.heads * s.head_dim);
        let nl = s.batch * s.heads * s.seq;
        let buf = |x: &[f32]| {
            let b = be.alloc(x.len()).unwrap();
            be.upload(view::<B>(&b, x.len()), x);
            b
        };
        let (q, g) = (buf(qkv), buf(dout));
        let (o, l, d) = (
            be.alloc(rows * d_out).unwrap(),
            be.alloc(nl).unwrap(),
            be.alloc(rows * row).unwrap(),
        );
        let (vq, vg) = (view::<B>(&q, rows * row), view::<B>(&g, rows * d_out));
        let (vo, vl, vd) = (
            view::<B>(&o, rows * d_out),
            view::<B>(&l, nl),
            view::<B>(&d, rows * row),
        );
        be.attention_forward(vo, vl, vq, s);
        be.attention_backward(vd, vg, vo, vl, vq, s);
        be.status().unwrap();
        let down = |v: View<B>, n: usize| {
            let mut h = vec![0f32; n];
            be.download(v, &mut h);
            h
        };
        [down(vo, rows * d_out), down(vl, nl), down(vd, rows * row)]
    }
    let got = run(&cuda, &qkv, &dout, s);
    let rounded: Vec<f32> = qkv.iter().map(|&x| bf16(x)).collect();
    let want = run(&cpu, &rounded, &dout, s);
    let exact = run(&cpu, &qkv, &dout, s);
    for (k, name) in ["out", "lse", "dqkv"].iter().enumerate() {
        let worst = got[k]
            .iter()
            .zip(&want[k])
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let moved = got[k]
            .iter()
            .zip(&exact[k])
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-5,
            "{name}: {worst} from the CPU on rounded inputs"
        );
        assert!(
            moved > 1e-5,
            "{name}: the inputs were not rounded ({moved})"
        );
    }
}
