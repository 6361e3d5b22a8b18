//! The CUDA backend's code on the emulated device (`engine/src/cuda/emu.rs`: kernels.cu built
//! for the CPU, blocks run with their threads as fibers, real barriers and warp shuffles): every
//! kernel against the CPU backend, training steps (accumulation, clipping, AdamW, recomputation)
//! and KV-cache generation against the same on the CPU. What this does not show: a GPU's speed,
//! its concurrent memory model and rounding; those wait for `tools/gpu_check.sh`. Needs a C++
//! compiler; CI insists (`CODECLM_REQUIRE_EMU`).

use codeclm_model::engine::{Backend, Capacity, Cpu, Cuda, Device, Model};
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
