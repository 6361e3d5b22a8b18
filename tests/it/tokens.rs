//! Byte-level BPE: lossless round trips over the whole bundled dataset and random bytes, our
//! encoder against HF `tokenizers` (Rust, in process; Python, in CI), token shards read from
//! Python, and a second vocabulary written without touching any media.

use std::path::{Path, PathBuf};

use codeclm_etl::tokenize::train_on_streams;
use codeclm_formats::tokens::{read_token_rows, TokenLayout, TokenShard};
use codeclm_formats::vocab::{bytes_to_chars, PreTokenize, Vocab};
use codeclm_formats::Dataset;

use crate::common::*;

/// The bundled photos and the odd corpus, built into one dataset (~36 JPEG streams).
fn dataset(root: &Path) -> PathBuf {
    let src = root.join("media");
    for (sub, dir) in [("images", "a"), ("odd", "b")] {
        copy_files(&fixtures(sub), &src.join(dir));
    }
    let ds = root.join("ds");
    build(&src, &ds, &["--part-size", "7"]);
    ds
}

fn streams(ds: &Path) -> Vec<Vec<u8>> {
    let d = Dataset::open(ds).unwrap();
    d.rows()
        .iter()
        .filter(|r| r.is_ok())
        .map(|r| d.codec_bytes(r).unwrap())
        .collect()
}

/// Seeded pseudo-random byte strings, some JPEG-like (many FF, restart markers), some uniform.
fn random_inputs(n: usize) -> Vec<Vec<u8>> {
    let mut s = 0x243F6A8885A308D3u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    (0..n)
        .map(|i| {
            let len = (next() % 700) as usize + (i % 3);
            (0..len)
                .map(|_| {
                    let r = next();
                    match (i % 4, r % 6) {
                        (0, _) => r as u8,
                        (_, 0) => 0xFF,
                        (_, 1) => 0xD0 + (r >> 8) as u8 % 8,
                        (_, 2) => 0x00,
                        _ => (r >> 16) as u8,
                    }
                })
                .collect()
        })
        .collect()
}

fn hf_ids(tok: &tokenizers::Tokenizer, bytes: &[u8]) -> Vec<u32> {
    tok.encode(bytes_to_chars(bytes), false)
        .unwrap()
        .get_ids()
        .to_vec()
}

#[test]
fn encoder_matches_hf_tokenizers_and_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = dataset(tmp.path());
    let data = streams(&ds);
    assert!(data.len() >= 30);
    let random = random_inputs(2000);
    for (pre, size) in [
        (PreTokenize::None, 320),
        (PreTokenize::BeforeFf, 320),
        (PreTokenize::RestartMarkers, 320),
        (PreTokenize::BeforeFf, 1024),
    ] {
        let json = train_on_streams(&data, size, pre).unwrap();
        let path = tmp.path().join(format!("v-{size}-{pre:?}.json"));
        std::fs::write(&path, &json).unwrap();
        let ours = Vocab::load(&path).unwrap();
        assert_eq!(
            ours.size as usize, size,
            "the size counts bytes, merges and the 3 special tokens"
        );
        let hf = tokenizers::Tokenizer::from_file(&path).unwrap();
        let mut ids = Vec::new();
        for bytes in data.iter().chain(&random) {
            ids.clear();
            ours.encode(bytes, &mut ids);
            assert_eq!(
                ids,
                hf_ids(&hf, bytes),
                "{pre:?}/{size}: our encoder differs from tokenizers on {} bytes",
                bytes.len()
            );
            assert_eq!(
                &ours.decode(&ids).unwrap(),
                bytes,
                "{pre:?}/{size}: round trip"
            );
        }
        // Merges must actually compress real JPEG data, or the test proves nothing.
        let tokens: usize = data
            .iter()
            .map(|b| {
                ids.clear();
                ours.encode(b, &mut ids);
                ids.len()
            })
            .sum();
        let bytes: usize = data.iter().map(Vec::len).sum();
        assert!(
            tokens < bytes,
            "{pre:?}/{size}: {tokens} tokens for {bytes} bytes"
        );
    }
}

#[test]
fn token_sets_round_trip_coexist_and_need_no_media() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = dataset(tmp.path());
    // The media are gone: retokenizing must read codec shards only.
    std::fs::remove_dir_all(tmp.path().join("media")).unwrap();
    let (v1, v2) = (tmp.path().join("v1.json"), tmp.path().join("v2.json"));
    vocab_train(&ds, &v1, &["--size", "320"]);
    vocab_train(
        &ds,
        &v2,
        &["--size", "400", "--pretokenize", "restart-markers"],
    );
    for v in [&v1, &v2] {
        tokenize(&ds, v, &[]);
    }
    let d = Dataset::open(&ds).unwrap();
    let ok: Vec<_> = d.rows().into_iter().filter(|r| r.is_ok()).collect();
    for v in [&v1, &v2] {
        let vocab = Vocab::load(v).unwrap();
        let layout = TokenLayout::new(&ds, &vocab.hash);
        let rows = read_token_rows(&layout.manifest_path()).unwrap();
        assert_eq!(rows.len(), ok.len(), "every ok sample has a token document");
        for row in &rows {
            let shard = TokenShard::open(&ds.join(&row.shard), Some(&vocab.hash)).unwrap();
            let doc = shard.read_range(row.offset, row.n_tokens).unwrap();
            assert_eq!(doc[0] as u32, vocab.bos);
            assert_eq!(*doc.last().unwrap() as u32, vocab.eos);
            let ids: Vec<u32> = doc.iter().map(|&t| t as u32).collect();
            let sample = ok.iter().find(|r| r.sample_id == row.sample_id).unwrap();
            assert_eq!(
                vocab.decode(&ids).unwrap(),
                d.codec_bytes(sample).unwrap(),
                "sample {}",
                row.sample_id
            );
            assert_eq!(row.codec_bytes, sample.codec_bytes.unwrap());
        }
    }
    assert_eq!(TokenLayout::list(&ds).len(), 2, "two vocabularies coexist");
    // Rerunning skips finished parts.
    assert!(tokenize(&ds, &v1, &[]).contains("tokenized 0 samples"));

    // `dataset decode` turns stored token documents back into the exported JPEG files.
    let ids: Vec<String> = ok.iter().take(3).map(|r| r.sample_id.clone()).collect();
    let hash = Vocab::load(&v2).unwrap().hash;
    run_ok(
        codeclm()
            .args(["dataset", "decode", "--dataset"])
            .arg(&ds)
            .args(["--vocab", &hash, "--ids", &ids.join(",")])
            .arg("--out")
            .arg(tmp.path().join("dec")),
    );
    run_ok(
        codeclm()
            .args(["dataset", "export", "--dataset"])
            .arg(&ds)
            .args(["--ids", &ids.join(",")])
            .arg("--out")
            .arg(tmp.path().join("exp")),
    );
    for id in &ids {
        let a = std::fs::read(tmp.path().join(format!("dec/{id}.jpg"))).unwrap();
        assert_eq!(
            a,
            std::fs::read(tmp.path().join(format!("exp/{id}.jpg"))).unwrap()
        );
    }
}

#[test]
fn python_tokenizers_and_the_reader_snippet_agree_with_rust() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = dataset(tmp.path());
    let vocab_path = tmp.path().join("v.json");
    vocab_train(&ds, &vocab_path, &["--size", "320"]);
    // Frames of 1,000 tokens: most documents (~4,000 tokens) span several.
    tokenize(&ds, &vocab_path, &["--frame-tokens", "1000"]);
    let vocab = Vocab::load(&vocab_path).unwrap();
    // Python: read the manifests and shards with tools/read_tokens.py (numpy + zstandard +
    // polars), re-encode each sample's codec bytes with Python `tokenizers` from the same file,
    // and check both against the shard. It prints one line per sample: id and token count.
    let out = std::process::Command::new("python3")
        .arg(repo().join("tools/read_tokens.py"))
        .arg(&ds)
        .args(["--vocab", &vocab.hash, "--check-with-tokenizers"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tools/read_tokens.py failed (needs `pip install -r tools/requirements.txt`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let rows = read_token_rows(&TokenLayout::new(&ds, &vocab.hash).manifest_path()).unwrap();
    for row in &rows {
        assert!(
            text.contains(&format!("{} {}", row.sample_id, row.n_tokens)),
            "Python disagrees on {}:\n{text}",
            row.sample_id
        );
    }
    assert!(
        text.contains(&format!("checked {} samples", rows.len())),
        "{text}"
    );
    assert!(
        !text.contains("frame checksums: none"),
        "Python checked no frame checksum (install the `xxhash` package or libxxhash):\n{text}"
    );
}

/// `dataset verify` reads every frame of every token shard: a damaged frame is named, a
/// version-1 shard asks for `dataset tokenize`, and tokenize rewrites it.
#[test]
fn verify_finds_damaged_and_old_token_shards_and_tokenize_rewrites_them() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    build(&fixtures("images"), &ds, &["--part-size", "5"]);
    let vocab_path = tmp.path().join("v.json");
    vocab_train(&ds, &vocab_path, &["--size", "300"]);
    let tokenize = || tokenize(&ds, &vocab_path, &["--frame-tokens", "2000"]);
    tokenize();
    let out = verify_ok(&ds);
    assert!(out.contains("every frame matches its checksum"), "{out}");
    let hash = Vocab::load(&vocab_path).unwrap().hash;
    let layout = TokenLayout::new(&ds, &hash);
    let shard = ds.join(layout.shard_rel(0));
    let clean = std::fs::read(&shard).unwrap();
    let s = TokenShard::open(&shard, None).unwrap();
    assert!(s.frames().len() > 2);
    let f = s.frames()[2];
    let mut bytes = clean.clone();
    bytes[(f.offset + 40) as usize] ^= 0x08;
    std::fs::write(&shard, &bytes).unwrap();
    let err = verify_err(&ds);
    assert!(
        err.contains("part-000000.tok")
            && err.contains("frame 2 ")
            && err.contains("dataset tokenize"),
        "{err}"
    );
    // A version-1 shard in its place: refused with the command that rewrites it.
    let mut v1 = clean[..64].to_vec();
    v1[8..12].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(&shard, &v1).unwrap();
    let err = verify_err(&ds);
    assert!(
        err.contains("part-000000.tok")
            && err.contains("version-1 token shard")
            && err.contains("codeclm dataset tokenize"),
        "{err}"
    );
    let out = tokenize();
    assert!(
        out.contains("parts 1 built"),
        "only the old part is rewritten: {out}"
    );
    assert_eq!(std::fs::read(&shard).unwrap(), clean, "rewritten as before");
    verify_ok(&ds);
}

/// Issue 17: a token part records the hash of the codec part it was tokenized from. After that
/// codec part is rebuilt from a changed source, `dataset verify` reports the stale token part,
/// a retokenize redoes it (and only it), and the result equals a fresh tokenize.
#[test]
fn a_rebuilt_codec_part_makes_its_token_part_stale_and_retokenize_redoes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("media");
    copy_files(&fixtures("images"), &src);
    let ds = tmp.path().join("ds");
    let args = ["--part-size", "5"];
    build(&src, &ds, &args);
    let vocab_path = tmp.path().join("v.json");
    vocab_train(&ds, &vocab_path, &["--size", "300"]);
    let tokenize = |ds: &Path| tokenize(ds, &vocab_path, &["--frame-tokens", "2000"]);
    tokenize(&ds);
    let out = verify_ok(&ds);
    assert!(
        out.contains("every part is tokenized from its codec part as it is now"),
        "{out}"
    );

    // Part 0 rebuilt after one of its inputs changed (same name, other pixels).
    let before = Dataset::open(&ds).unwrap();
    let row = before
        .rows()
        .iter()
        .find(|r| r.part == 0 && r.is_ok())
        .unwrap()
        .clone();
    let old_bytes = before.codec_bytes(&row).unwrap();
    let parts: std::collections::BTreeSet<u32> = before.rows().iter().map(|r| r.part).collect();
    assert!(parts.len() >= 2, "{parts:?}");
    std::fs::copy(
        fixtures("odd").join("sq256_coffee.png"),
        src.join(&row.source),
    )
    .unwrap();
    std::fs::remove_file(ds.join("parts/part-000000.parquet")).unwrap();
    for e in std::fs::read_dir(ds.join("shards")).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("part-000000-") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    build(&src, &ds, &args);
    let after = Dataset::open(&ds).unwrap();
    let new_row = after.find(&row.sample_id).unwrap().unwrap();
    assert_ne!(
        after.codec_bytes(&new_row).unwrap(),
        old_bytes,
        "the rebuilt part holds other bytes for {}",
        row.sample_id
    );

    let err = verify_err(&ds);
    assert!(
        err.contains("1 stale token parts")
            && err.contains("part 0 was tokenized from codec part hash")
            && err.contains(&format!(
                "codeclm dataset tokenize --dataset {}",
                ds.display()
            )),
        "{err}"
    );
    let out = tokenize(&ds);
    assert!(
        out.contains(&format!(
            "parts 1 built (1 stale), {} already done",
            parts.len() - 1
        )),
        "only the stale part is redone: {out}"
    );
    verify_ok(&ds);

    // A fresh tokenize of the same dataset gives the same manifest and shards.
    let fresh = tmp.path().join("fresh");
    for e in walk(&ds) {
        let rel = e.strip_prefix(&ds).unwrap();
        if !rel.to_string_lossy().starts_with("tokens") {
            std::fs::create_dir_all(fresh.join(rel).parent().unwrap()).unwrap();
            std::fs::copy(&e, fresh.join(rel)).unwrap();
        }
    }
    let out = tokenize(&fresh);
    assert!(
        out.contains(&format!(
            "parts {} built (0 stale), 0 already done",
            parts.len()
        )),
        "{out}"
    );
    let hash = Vocab::load(&vocab_path).unwrap().hash;
    let (a, b) = (
        TokenLayout::new(&ds, &hash),
        TokenLayout::new(&fresh, &hash),
    );
    assert_eq!(
        read_token_rows(&a.manifest_path()).unwrap(),
        read_token_rows(&b.manifest_path()).unwrap()
    );
    for &part in &parts {
        assert_eq!(
            std::fs::read(ds.join(a.shard_rel(part))).unwrap(),
            std::fs::read(fresh.join(b.shard_rel(part))).unwrap(),
            "part {part}"
        );
    }
}

/// `codeclm dataset verify --dataset DS`, which must succeed; its stdout.
fn verify_ok(ds: &Path) -> String {
    let out = run_ok(codeclm().args(["dataset", "verify", "--dataset"]).arg(ds));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `codeclm dataset verify --dataset DS`, which must fail cleanly; its stderr.
fn verify_err(ds: &Path) -> String {
    run_err(codeclm().args(["dataset", "verify", "--dataset"]).arg(ds))
}

/// Issue 16: three tokenize workers, their indices from flags, a Slurm array and a Kubernetes
/// indexed job, each tokenize their parts; the worker that finds every part done writes the
/// token manifest, and the token set equals one worker's, byte for byte.
#[test]
fn tokenize_split_across_three_workers_equals_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("media");
    copy_files(&fixtures("images"), &src);
    let one = tmp.path().join("one");
    build(&src, &one, &["--part-size", "3"]);
    let vocab_path = tmp.path().join("v.json");
    vocab_train(&one, &vocab_path, &["--size", "300"]);
    let three = tmp.path().join("three");
    for e in walk(&one) {
        let rel = e.strip_prefix(&one).unwrap();
        std::fs::create_dir_all(three.join(rel).parent().unwrap()).unwrap();
        std::fs::copy(&e, three.join(rel)).unwrap();
    }
    let out = tokenize(&one, &vocab_path, &["--frame-tokens", "2000"]);
    assert!(out.contains("parts 4 built (0 stale)"), "{out}");
    let hash = Vocab::load(&vocab_path).unwrap().hash;
    let (a, b) = (
        TokenLayout::new(&one, &hash),
        TokenLayout::new(&three, &hash),
    );

    let worker = |env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = codeclm();
        cmd.args(["dataset", "tokenize", "--dataset"])
            .arg(&three)
            .arg("--vocab")
            .arg(&vocab_path)
            .args(["--frame-tokens", "2000"])
            .args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        String::from_utf8_lossy(&run_ok(&mut cmd).stdout).to_string()
    };
    // Parts 0..4: worker 1 has part 1, worker 2 part 2, worker 0 parts 0 and 3.
    let w1 = worker(
        &[
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ],
        &[],
    );
    assert!(
        w1.contains("parts 1 built") && w1.contains("3 parts not done yet"),
        "{w1}"
    );
    assert!(w1.contains("worker 1 of 3 (SLURM_ARRAY_TASK_ID=1"), "{w1}");
    assert!(
        !b.manifest_path().exists(),
        "no manifest before every part is done"
    );
    let w2 = worker(&[("JOB_COMPLETION_INDEX", "2")], &["--num-shards", "3"]);
    assert!(
        w2.contains("parts 1 built") && w2.contains("2 parts not done yet"),
        "{w2}"
    );
    assert!(w2.contains("worker 2 of 3 (JOB_COMPLETION_INDEX=2"), "{w2}");
    let w0 = worker(&[], &["--shard-index", "0", "--num-shards", "3"]);
    assert!(w0.contains("parts 2 built"), "{w0}");
    assert!(
        w0.contains(&b.manifest_path().display().to_string()),
        "the last worker writes the manifest: {w0}"
    );

    assert_eq!(
        read_token_rows(&a.manifest_path()).unwrap(),
        read_token_rows(&b.manifest_path()).unwrap()
    );
    assert_eq!(
        std::fs::read(a.manifest_path()).unwrap(),
        std::fs::read(b.manifest_path()).unwrap()
    );
    for part in 0..4 {
        assert_eq!(
            std::fs::read(one.join(a.shard_rel(part))).unwrap(),
            std::fs::read(three.join(b.shard_rel(part))).unwrap(),
            "part {part}"
        );
    }
    verify_ok(&three);
    // A worker index past the count is refused.
    let bad = codeclm()
        .args(["dataset", "tokenize", "--dataset"])
        .arg(&three)
        .arg("--vocab")
        .arg(&vocab_path)
        .args(["--shard-index", "3", "--num-shards", "3"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("--shard-index 3 is not below --num-shards 3"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// Reads `export-tokens` output the way the trainers do: nanoGPT's `train.py` memory-maps
/// `{split}.bin` as uint16 and takes `vocab_size` from `meta.pkl`; Megatron core's
/// `_IndexReader` checks the `.idx` header and takes lengths, pointers and document indices
/// with `numpy.frombuffer`, and `_MMapBinReader` reads each sequence at its pointer.
const READ_EXPORTS: &str = r#"
import json, os, pickle, struct, sys
import numpy as np
out = sys.argv[1]
res = {}
with open(os.path.join(out, "nanogpt", "meta.pkl"), "rb") as f:
    res["vocab_size"] = pickle.load(f)["vocab_size"]
for split in ("train", "val"):
    data = np.memmap(os.path.join(out, "nanogpt", f"{split}.bin"), dtype=np.uint16, mode="r")
    res[f"nanogpt_{split}"] = data.tolist()
    idx = os.path.join(out, "megatron", f"{split}.idx")
    with open(idx, "rb") as s:
        assert s.read(9) == b"MMIDIDX\x00\x00", "bad header"
        assert struct.unpack("<Q", s.read(8))[0] == 1, "bad version"
        code = struct.unpack("<B", s.read(1))[0]
        assert code == 8, code  # numpy.uint16 in Megatron's DType
        seqs = struct.unpack("<Q", s.read(8))[0]
        docs = struct.unpack("<Q", s.read(8))[0]
        offset = s.tell()
    buf = memoryview(np.memmap(idx, mode="r", order="C"))
    lengths = np.frombuffer(buf, dtype=np.int32, count=seqs, offset=offset)
    pointers = np.frombuffer(buf, dtype=np.int64, count=seqs, offset=offset + lengths.nbytes)
    doc_idx = np.frombuffer(buf, dtype=np.int64, count=docs, offset=offset + lengths.nbytes + pointers.nbytes)
    assert offset + lengths.nbytes + pointers.nbytes + doc_idx.nbytes == os.path.getsize(idx)
    binbuf = memoryview(np.memmap(os.path.join(out, "megatron", f"{split}.bin"), mode="r", order="C").data)
    res[f"megatron_{split}"] = [np.frombuffer(binbuf, dtype=np.uint16, count=int(n), offset=int(p)).tolist() for n, p in zip(lengths, pointers)]
    res[f"megatron_{split}_documents"] = doc_idx.tolist()
print(json.dumps(res))
"#;

/// `dataset export-tokens`: nanoGPT's and Megatron-LM's files hold exactly the token set's
/// documents, per split, in manifest order, read back the way those projects read them.
#[test]
fn exported_tokens_read_back_as_nanogpt_and_megatron_read_them() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    build(
        &fixtures("images"),
        &ds,
        &["--val-fraction", "0.3", "--part-size", "4"],
    );
    let vocab_path = tmp.path().join("v.json");
    vocab_train(&ds, &vocab_path, &["--size", "300"]);
    tokenize(&ds, &vocab_path, &["--frame-tokens", "1000"]);
    let vocab = Vocab::load(&vocab_path).unwrap();
    let out = tmp.path().join("export");
    for format in ["nanogpt", "megatron"] {
        let stdout = run_ok(
            codeclm()
                .args(["dataset", "export-tokens", "--dataset"])
                .arg(&ds)
                .args(["--format", format, "--out"])
                .arg(out.join(format)),
        );
        let stdout = String::from_utf8_lossy(&stdout.stdout);
        assert!(stdout.contains("exported token set"), "{stdout}");
    }
    // The documents, from the manifest and shards.
    let rows = read_token_rows(&TokenLayout::new(&ds, &vocab.hash).manifest_path()).unwrap();
    let docs = |split: codeclm_formats::Split| -> Vec<Vec<u16>> {
        rows.iter()
            .filter(|r| r.split == split)
            .map(|r| {
                TokenShard::open(&ds.join(&r.shard), Some(&vocab.hash))
                    .unwrap()
                    .read_range(r.offset, r.n_tokens)
                    .unwrap()
            })
            .collect()
    };
    let (train, val) = (
        docs(codeclm_formats::Split::Train),
        docs(codeclm_formats::Split::Val),
    );
    assert!(
        train.len() >= 5 && !val.is_empty(),
        "{} {}",
        train.len(),
        val.len()
    );
    let py = std::process::Command::new("python3")
        .args(["-c", READ_EXPORTS])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "reading the exports with numpy failed:\n{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    assert_eq!(got["vocab_size"], vocab.size);
    for (name, split) in [("train", &train), ("val", &val)] {
        let flat: Vec<u16> = split.iter().flatten().copied().collect();
        let nanogpt: Vec<u16> =
            serde_json::from_value(got[format!("nanogpt_{name}")].clone()).unwrap();
        assert_eq!(nanogpt, flat, "nanoGPT {name}.bin");
        let megatron: Vec<Vec<u16>> =
            serde_json::from_value(got[format!("megatron_{name}")].clone()).unwrap();
        assert_eq!(&megatron, split, "Megatron {name} sequences");
        let documents: Vec<u64> =
            serde_json::from_value(got[format!("megatron_{name}_documents")].clone()).unwrap();
        assert_eq!(documents, (0..=split.len() as u64).collect::<Vec<_>>());
        assert!(split
            .iter()
            .all(|d| d[0] == vocab.bos as u16 && *d.last().unwrap() == vocab.eos as u16));
    }
}
