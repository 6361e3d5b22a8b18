//! The engine against references: logits against the numpy float64 model, gradients and AdamW
//! against transformers + torch dumps, finite differences, and the properties training relies on.

use std::path::PathBuf;

use super::backend::AdamW;
use super::*;
use crate::llama::LlamaConfig;

fn fixture() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama_ref")
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A small config with grouped-query attention (4 query heads over 2 key/value heads).
pub(crate) fn tiny_config() -> LlamaConfig {
    let mut cfg = LlamaConfig::preset("tiny", 40).unwrap();
    cfg.hidden_size = 32;
    cfg.intermediate_size = 48;
    cfg.num_hidden_layers = 2;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = Some(2);
    cfg.max_position_embeddings = 160;
    cfg
}

/// Seeded weights, norm weights off 1 so their gradient is exercised in full.
fn tiny_model(cap: Capacity, recompute: bool) -> Model<Cpu> {
    let cfg = tiny_config();
    let mut m = Model::new(Cpu::new(), cfg, cap, true, recompute).unwrap();
    m.init(3);
    let mut p = vec![0f32; m.num_parameters()];
    m.read_params(&mut p);
    for (_, shape, span) in &m.layout.tensors {
        if shape.len() == 1 {
            for (i, v) in p[span.off..span.end()].iter_mut().enumerate() {
                *v = 1.5 + 0.01 * (i % 7) as f32;
            }
        }
    }
    m.write_params(&p);
    m
}

fn batch(b: usize, t: usize, v: u32, salt: u32) -> (Vec<u32>, Vec<u32>) {
    let x = (0..(b * t) as u32).map(|i| (i * 7 + salt) % v).collect();
    let y = (0..(b * t) as u32)
        .map(|i| (i * 11 + 3 + salt) % v)
        .collect();
    (x, y)
}

fn gradients(m: &mut Model<Cpu>, x: &[u32], y: &[u32], b: usize, t: usize) -> (f64, Vec<f32>) {
    m.zero_grad().unwrap();
    let scale = 1.0 / (b * t) as f32;
    let loss = m.forward(x, Some(y), b, t, Some(scale)).unwrap().unwrap();
    m.backward().unwrap();
    let n = m.num_parameters();
    let (mut g, mut m1, mut v1) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    m.read_state(&mut g, &mut m1, &mut v1).unwrap();
    (loss / (b * t) as f64, g)
}

#[test]
fn logits_match_the_numpy_reference() {
    let cfg = crate::checkpoint::read_config(&fixture()).unwrap();
    let flat = crate::checkpoint::load_params(&fixture(), &cfg).unwrap();
    let ids: Vec<u32> =
        serde_json::from_slice(&std::fs::read(fixture().join("tokens.json")).unwrap()).unwrap();
    let want = crate::checkpoint::read_f32(&fixture().join("logits.safetensors")).unwrap();
    let n = ids.len();
    let cap = Capacity {
        batch: 1,
        context: n,
    };
    let mut m = Model::new(Cpu::new(), cfg.clone(), cap, false, false).unwrap();
    m.write_params(&flat);
    m.forward(&ids, None, 1, n, None).unwrap();
    let mut got = vec![0f32; n * cfg.vocab_size];
    m.read_logits(&mut got);
    let d = max_abs(&got, &want["logits"].1);
    eprintln!("logits vs the numpy float64 reference: max abs difference {d:.2e}");
    assert!(d < 1e-4, "max abs logit difference {d}");
}

/// The AdamW settings of the reference dump (tools/engine_ref.py).
fn hp(step: u64, grad_scale: f32) -> AdamW {
    AdamW {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step,
        grad_scale,
    }
}

fn engine_ref() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/engine_ref")
}

struct Ref {
    model: Model<Cpu>,
    x: Vec<u32>,
    y: Vec<u32>,
    b: usize,
    t: usize,
}

fn reference_model(cpu: Cpu) -> Ref {
    let dir = engine_ref();
    let cfg = crate::checkpoint::read_config(&dir).unwrap();
    let flat = crate::checkpoint::load_params(&dir, &cfg).unwrap();
    let batch: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("batch.json")).unwrap()).unwrap();
    let (b, t) = (
        batch["batch"].as_u64().unwrap() as usize,
        batch["seq"].as_u64().unwrap() as usize,
    );
    let ids = |k: &str| -> Vec<u32> { serde_json::from_value(batch[k].clone()).unwrap() };
    let mut model = Model::new(
        cpu,
        cfg,
        Capacity {
            batch: b,
            context: t,
        },
        true,
        false,
    )
    .unwrap();
    model.write_params(&flat);
    Ref {
        model,
        x: ids("inputs"),
        y: ids("targets"),
        b,
        t,
    }
}

/// Every parameter's gradient against transformers + torch (`loss.backward()` in float64,
/// tools/engine_ref.py), for the default attention blocks and for small ones that split the
/// keys into several blocks (the online softmax's rescaling).
#[test]
fn gradients_match_torch() {
    let want = crate::checkpoint::read_f32(&engine_ref().join("grads.safetensors")).unwrap();
    for cpu in [Cpu::new(), Cpu::with_blocks(16, 32)] {
        let mut r = reference_model(cpu);
        let (loss, g) = gradients(&mut r.model, &r.x, &r.y, r.b, r.t);
        let want_loss = want["loss"].1[0] as f64;
        assert!(
            (loss - want_loss).abs() < 1e-5,
            "loss {loss} vs torch {want_loss}"
        );
        let mut worst = 0f32;
        for (name, _, span) in &r.model.layout.tensors {
            let w = &want[name].1;
            let got = &g[span.off..span.end()];
            let scale = w.iter().fold(0f32, |a, v| a.max(v.abs()));
            let rel = max_abs(got, w) / scale;
            worst = worst.max(rel);
            assert!(
                rel < 1e-4,
                "{name}: max abs difference {rel} of the largest gradient {scale}"
            );
        }
        eprintln!("gradients vs torch (float64): worst max-abs difference {worst:.2e} of each tensor's largest");
    }
}

/// Two AdamW steps (after global-norm clipping) equal torch.optim.AdamW's on the same gradients.
#[test]
fn adamw_matches_torch() {
    let grads = crate::checkpoint::read_f32(&engine_ref().join("grads.safetensors")).unwrap();
    let want = crate::checkpoint::read_f32(&engine_ref().join("adamw.safetensors")).unwrap();
    let mut r = reference_model(Cpu::new());
    let m = &mut r.model;
    let flat: Vec<f32> = m
        .layout
        .tensors
        .iter()
        .flat_map(|(n, _, _)| grads[n].1.clone())
        .collect();
    for step in 1..=2 {
        m.write_grads(&flat).unwrap();
        let norm = m.grad_norm().unwrap();
        let clip = 0.5;
        let grad_scale = if norm > clip {
            (clip / (norm + 1e-6)) as f32
        } else {
            1.0
        };
        m.adamw(hp(step, grad_scale)).unwrap();
    }
    let n = m.num_parameters();
    let (mut p, mut g, mut m1, mut v1) =
        (vec![0f32; n], vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    m.read_params(&mut p);
    m.read_state(&mut g, &mut m1, &mut v1).unwrap();
    for (name, _, span) in &m.layout.tensors {
        for (kind, got) in [("param", &p), ("exp_avg", &m1), ("exp_avg_sq", &v1)] {
            let w = &want[&format!("{kind}.{name}")].1;
            let got = &got[span.off..span.end()];
            let scale = w.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = max_abs(got, w);
            assert!(
                d <= 2e-6 * scale.max(1e-6),
                "{kind}.{name}: differs by {d} (largest {scale})"
            );
        }
    }
}

/// Central differences in f64 of the f32 loss on a few coordinates of every tensor.
#[test]
fn finite_differences_agree_with_the_backward() {
    let (b, t) = (2, 20);
    let mut m = tiny_model(
        Capacity {
            batch: b,
            context: t,
        },
        false,
    );
    let (x, y) = batch(b, t, 40, 5);
    let (_, g) = gradients(&mut m, &x, &y, b, t);
    let mut p = vec![0f32; m.num_parameters()];
    m.read_params(&mut p);
    let tensors = m.layout.tensors.clone();
    let mut checked = 0;
    for (name, _, span) in &tensors {
        for k in [0, span.len / 3, span.len - 1] {
            let i = span.off + k;
            let eps = 1e-2f32;
            let mut at = |delta: f32| {
                let mut q = p.clone();
                q[i] += delta;
                m.write_params(&q);
                m.forward(&x, Some(&y), b, t, None).unwrap().unwrap() / (b * t) as f64
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            let an = g[i] as f64;
            assert!(
                (fd - an).abs() < 2e-4 + 0.02 * an.abs(),
                "{name}[{k}]: finite difference {fd:.6e}, backward {an:.6e}"
            );
            checked += 1;
        }
    }
    m.write_params(&p);
    assert_eq!(checked, 3 * tensors.len());
}

fn train_steps(threads: usize, recompute: bool, steps: usize) -> Vec<f32> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let (b, t) = (3, 90);
        let mut m = tiny_model(
            Capacity {
                batch: b,
                context: t,
            },
            recompute,
        );
        for step in 1..=steps as u64 {
            let (x, y) = batch(b, t, 40, step as u32);
            gradients(&mut m, &x, &y, b, t);
            let norm = m.grad_norm().unwrap();
            m.adamw(hp(step, (1.0 / (norm + 1e-6)).min(1.0) as f32))
                .unwrap();
        }
        let mut p = vec![0f32; m.num_parameters()];
        m.read_params(&mut p);
        p
    })
}

/// The same at the `tiny` preset's real sizes, where gemm splits its work across threads.
#[test]
fn preset_sized_steps_do_not_depend_on_threads() {
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let cfg = LlamaConfig::preset("tiny", 320).unwrap();
            let (b, t) = (4, 256);
            let cap = Capacity {
                batch: b,
                context: t,
            };
            let mut m = Model::new(Cpu::new(), cfg, cap, true, false).unwrap();
            m.init(7);
            for step in 1..=2 {
                let (x, y) = batch(b, t, 320, step as u32);
                gradients(&mut m, &x, &y, b, t);
                m.adamw(hp(step, 1.0)).unwrap();
            }
            let mut p = vec![0f32; m.num_parameters()];
            m.read_params(&mut p);
            p
        })
    };
    let one = run(1);
    assert!(
        one == run(2),
        "1 thread vs 2 threads at the tiny preset's sizes"
    );
    assert!(
        one == run(4),
        "1 thread vs 4 threads at the tiny preset's sizes"
    );
}

#[test]
fn results_do_not_depend_on_threads_or_recomputation() {
    let one = train_steps(1, false, 3);
    assert_eq!(one, train_steps(2, false, 3), "1 thread vs 2 threads");
    assert_eq!(one, train_steps(3, false, 3), "1 thread vs 3 threads");
    assert_eq!(one, train_steps(2, true, 3), "activation recomputation");
}

/// Right padding changes nothing before it: a shorter row inside a batch scores as alone.
#[test]
fn ignored_targets_and_shorter_batches() {
    let (b, t) = (2, 30);
    let mut m = tiny_model(
        Capacity {
            batch: b,
            context: t,
        },
        false,
    );
    let (x, mut y) = batch(b, t, 40, 2);
    let full = m.forward(&x, Some(&y), b, t, None).unwrap().unwrap();
    let per: Vec<f32> = m.losses().to_vec();
    for v in &mut y[10..t] {
        *v = IGNORE;
    }
    let part = m.forward(&x, Some(&y), b, t, None).unwrap().unwrap();
    let want: f64 = per[..10].iter().chain(&per[t..]).map(|&l| l as f64).sum();
    assert!((part - want).abs() < 1e-9 * full.abs(), "{part} vs {want}");
    // One row of 12 positions alone equals the first 12 positions of the batch.
    let alone = m
        .forward(&x[..12], Some(&y[..12]), 1, 12, None)
        .unwrap()
        .unwrap();
    let want: f64 = per[..10].iter().map(|&l| l as f64).sum();
    assert!((alone - want).abs() < 1e-5, "{alone} vs {want}");
}
