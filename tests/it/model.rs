//! The trainer end to end on the bundled photos: exact resume (N steps == N/2 + resume N/2),
//! checkpoints Hugging Face can read (names, config), and clean errors for bad input.

use std::path::{Path, PathBuf};

use crate::common::*;

/// The bundled photos as a dataset with 2 held-out images and a 320-entry vocabulary's tokens.
pub(crate) fn token_dataset(root: &Path) -> PathBuf {
    let ds = root.join("ds");
    build(&fixtures("images"), &ds, &["--val-fraction", "0.2"]);
    let vocab = root.join("vocab.json");
    vocab_train(&ds, &vocab, &["--modality", "image", "--size", "320"]);
    tokenize(&ds, &vocab, &[]);
    ds
}

fn train(ds: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    run_ok(
        codeclm()
            .args([
                "train",
                "--preset",
                "tiny",
                "--context",
                "48",
                "--batch",
                "2",
                "--steps",
                "6",
                "--eval-every",
                "3",
                "--threads",
                "1",
                "--dataset",
            ])
            .arg(ds)
            .arg("--out")
            .arg(out)
            .args(extra),
    )
}

fn weights(run: &Path) -> Vec<(String, Vec<f32>)> {
    let t = codeclm_model::checkpoint::read_f32(&run.join("model.safetensors")).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = t.into_iter().map(|(n, (_, v))| (n, v)).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn resumed_training_equals_uninterrupted_and_errors_are_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = token_dataset(tmp.path());
    let (full, half) = (tmp.path().join("full"), tmp.path().join("half"));
    let out = train(&ds, &full, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("bits per codec byte") && text.contains("byte-unigram"),
        "{text}"
    );
    train(&ds, &half, &["--stop-at", "3"]);
    let stopped = weights(&half);
    run_ok(
        codeclm()
            .args(["train", "--threads", "1", "--resume"])
            .arg(&half),
    );
    let (a, b) = (weights(&full), weights(&half));
    assert_eq!(a.len(), b.len());
    let mut moved = false;
    for ((na, va), ((nb, vb), (_, vs))) in a.iter().zip(b.iter().zip(&stopped)) {
        assert_eq!(na, nb);
        let diff = va
            .iter()
            .zip(vb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            va == vb,
            "{na}: resumed differs from uninterrupted by {diff} (must be bit for bit)"
        );
        moved |= va.iter().zip(vs).any(|(x, y)| x != y);
    }
    assert!(moved, "the resumed half must have changed the weights");
    // The metrics of the resumed run have every step once.
    let metrics = std::fs::read_to_string(half.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>());
    assert!(half.join("loss.png").exists());

    // The checkpoint is an HF Llama directory: names, config fields, and it loads back.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(full.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["vocab_size"], 320);
    assert!(cfg["bos_token_id"].is_u64() && cfg["eos_token_id"].is_u64());
    assert!(a
        .iter()
        .any(|(n, _)| n == "model.layers.3.self_attn.q_proj.weight"));
    assert!(a.iter().any(|(n, _)| n == "lm_head.weight"));
    codeclm_model::Lm::load(&full).unwrap();

    // model logits writes [T, V].
    let toks = tmp.path().join("toks.txt");
    std::fs::write(&toks, "0 5 9 300\n17").unwrap();
    let lo = tmp.path().join("logits.safetensors");
    run_ok(
        codeclm()
            .args(["model", "logits", "--run"])
            .arg(&full)
            .arg("--tokens-file")
            .arg(&toks)
            .arg("--out")
            .arg(&lo),
    );
    let l = codeclm_model::checkpoint::read_f32(&lo).unwrap();
    assert_eq!(l["logits"].0, vec![5, 320]);

    // Bad input: each stops with the cause and the fix, no panic.
    let base_ctx = |out: &str, context: &str| {
        let mut c = codeclm();
        c.args([
            "train",
            "--preset",
            "tiny",
            "--context",
            context,
            "--batch",
            "2",
            "--steps",
            "2",
            "--dataset",
        ])
        .arg(&ds)
        .arg("--out")
        .arg(tmp.path().join(out));
        c
    };
    let base = |out: &str| base_ctx(out, "48");
    let e = run_err(base("e1").args(["--vocab", "ffff"]));
    assert!(e.contains("no token set") && e.contains("--vocab"), "{e}");
    let e = run_err(&mut base_ctx("e2", "5000"));
    assert!(
        e.contains("context 5000") && e.contains("--context 1024"),
        "{e}"
    );
    let e = run_err(base("e3").args(["--lr", "1e30"]));
    assert!(e.contains("diverged") && e.contains("--lr"), "{e}");
    let e = run_err(
        base("e4")
            .arg("--vocab")
            .arg(tmp.path().join("missing.json")),
    );
    assert!(e.contains("missing.json"), "{e}");
    let e = run_err(
        codeclm()
            .args(["train", "--resume"])
            .arg(tmp.path().join("nothing")),
    );
    assert!(e.contains("trainer_state.json") && e.contains("Fix"), "{e}");
    // A resume keeps the run's settings: changing one is refused, not silently ignored.
    for flag in [
        &["--val-docs", "5"][..],
        &["--recompute"][..],
        &["--lr", "1e-3"][..],
    ] {
        let e = run_err(codeclm().args(["train", "--resume"]).arg(&half).args(flag));
        assert!(e.contains("saved settings"), "{flag:?}: {e}");
    }
    let shard = std::fs::read_dir(ds.join("tokens"))
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "tok"))
        .unwrap();
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 10]).unwrap();
    let e = run_err(&mut base("e5"));
    assert!(
        e.contains(".tok") && e.contains("codeclm dataset tokenize"),
        "{e}"
    );
}

/// `--device` is one flag on every command that runs a model: `cpu`, `cuda` or `cuda:N`; other
/// values are refused by the parser. Training, generation and the FID network run on the
/// engine's CUDA backend (libraries loaded at run time): without a driver, a clean error.
#[test]
fn device_flag_is_parsed_and_cuda_says_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let err = run_err(
        codeclm()
            .args(["train", "--dataset"])
            .arg(tmp.path())
            .args(["--device", "gpu"]),
    );
    assert!(err.contains("use cpu, cuda or cuda:N"), "{err}");
    // On the engine's CUDA backend, loaded at run time: without the NVIDIA driver (CI) the
    // binary still starts and says what is missing.
    let driver = std::path::Path::new("/usr/lib/x86_64-linux-gnu/libcuda.so.1").exists();
    for cmd in [
        &["train", "--dataset", "."][..],
        &["bench", "train", "--steps", "1"][..],
    ] {
        if driver {
            break;
        }
        let err = run_err(codeclm().args(cmd).args(["--device", "cuda:1"]));
        assert!(
            err.contains("cannot load libcuda.so.1") && err.contains("NVIDIA driver"),
            "{cmd:?}: {err}"
        );
    }
    // The FID network too (the weights load first, then the device).
    if !driver && codeclm_fid_weights_present() {
        for cmd in [
            &["eval", "fid", "--real", ".", "--fake", "."][..],
            &["bench", "fid", "x.png"][..],
        ] {
            let err = run_err(codeclm().args(cmd).args(["--device", "cuda:1"]));
            assert!(err.contains("cannot load libcuda.so.1"), "{cmd:?}: {err}");
        }
    }
}

/// Issue 17: `trainer_state.json` records the token manifest's hash; a resume on a changed
/// token set (here: its manifest rewritten without its first document, so every saved row
/// index points one document further) stops naming both hashes and the fix, instead of
/// silently reading other documents. A state from before the hash was recorded resumes with a
/// warning.
#[test]
fn resuming_on_a_changed_token_set_stops_with_both_hashes() {
    use codeclm_formats::tokens::{read_token_rows, write_token_rows, ManifestHash, TokenLayout};
    let tmp = tempfile::tempdir().unwrap();
    let ds = token_dataset(tmp.path());
    let run = tmp.path().join("run");
    train(&ds, &run, &["--stop-at", "3"]);
    let state_path = run.join("trainer_state.json");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    let hash = state["vocab_hash"].as_str().unwrap().to_string();
    let manifest = TokenLayout::new(&ds, &hash).manifest_path();
    let recorded = state["token_manifest_hash"]
        .as_str()
        .expect("the state records the token manifest's hash")
        .to_string();
    assert_eq!(recorded, ManifestHash::of(&manifest).unwrap());

    // An older state (no hash) on the unchanged set: resumes, with a warning.
    let old = tmp.path().join("old");
    std::fs::create_dir_all(&old).unwrap();
    for e in std::fs::read_dir(&run).unwrap().flatten() {
        std::fs::copy(e.path(), old.join(e.file_name())).unwrap();
    }
    let mut stripped = state.clone();
    stripped
        .as_object_mut()
        .unwrap()
        .remove("token_manifest_hash");
    std::fs::write(old.join("trainer_state.json"), stripped.to_string()).unwrap();
    let out = run_ok(
        codeclm()
            .args(["train", "--threads", "1", "--resume"])
            .arg(&old),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("records no token manifest hash") && err.contains(&recorded),
        "{err}"
    );

    // The token set changes under the run.
    let mut rows = read_token_rows(&manifest).unwrap();
    rows.remove(0);
    write_token_rows(&rows, &manifest).unwrap();
    let now = ManifestHash::of(&manifest).unwrap();
    assert_ne!(now, recorded);
    let err = run_err(
        codeclm()
            .args(["train", "--threads", "1", "--resume"])
            .arg(&run),
    );
    assert!(
        err.contains(&format!("token set {hash} changed"))
            && err.contains(&recorded)
            && err.contains(&now)
            && err.contains("codeclm train --out"),
        "{err}"
    );
    let after: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    assert_eq!(after["step"], 3, "the refused resume trained nothing");
}

/// The FID network `make fid-weights` converts (CI fetches it).
fn codeclm_fid_weights_present() -> bool {
    fid::default_weights_path().is_file()
}
