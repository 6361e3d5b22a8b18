"""`import codeclm` against the CLI and the references: a dataset of the bundled photos built by
`codeclm` (CODECLM_BIN, default target/release/codeclm), ids against Hugging Face `tokenizers`,
documents against the pure-Python reader of tools/read_tokens.py, codec bytes against
`codeclm dataset export`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import codeclm

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("CODECLM_BIN", REPO / "target" / "release" / "codeclm"))


def run(*args: str) -> str:
    out = subprocess.run([str(BIN), *args], capture_output=True, text=True)
    assert out.returncode == 0, f"codeclm {' '.join(args)} failed:\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The bundled photos, built with 30% held out, a 300-entry vocabulary, tokenized."""
    if not BIN.exists():
        pytest.fail(f"{BIN} is missing: run `cargo build --release` (or set CODECLM_BIN)")
    t = tmp_path_factory.mktemp("codeclm")
    ds = t / "ds"
    run("dataset", "build", "--no-progress", "--images", str(REPO / "tests/fixtures/images"),
        "--out", str(ds), "--val-fraction", "0.3", "--part-size", "4")
    vocab = t / "v.json"
    run("vocab", "train", "--dataset", str(ds), "--size", "300", "--out", str(vocab))
    run("dataset", "tokenize", "--dataset", str(ds), "--vocab", str(vocab), "--frame-tokens", "1000")
    return ds, vocab


def reference_reader():
    spec = importlib.util.spec_from_file_location("read_tokens", REPO / "tools" / "read_tokens.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_samples_are_the_manifest_as_a_lazy_frame(built):
    ds_path, _ = built
    ds = codeclm.Dataset(ds_path)
    lf = ds.samples()
    assert isinstance(lf, pl.LazyFrame)
    assert lf.collect().equals(pl.read_parquet(ds_path / "samples.parquet"))
    ok = lf.filter(pl.col("status") == "ok").collect()
    assert ok.height == 10
    assert set(ok["split"]) == {"train", "val"}


def test_codec_bytes_equal_the_cli_export(built, tmp_path):
    ds_path, _ = built
    ds = codeclm.Dataset(ds_path)
    ids = ds.samples().select("sample_id").collect()["sample_id"].to_list()
    run("dataset", "export", "--dataset", str(ds_path), "--out", str(tmp_path), "--all", "--abbreviated")
    for sample_id in ids:
        abbreviated = ds.codec_bytes(sample_id)
        assert abbreviated == (tmp_path / f"{sample_id}.abbr.jpg").read_bytes()
        full = ds.jpeg(sample_id)
        assert full == (tmp_path / f"{sample_id}.jpg").read_bytes()
        assert codeclm.jpeg.strip_tables(full) == abbreviated
    tables = ds.jpeg_tables()
    assert tables[:2] == b"\xff\xd8" and tables[-2:] == b"\xff\xd9"
    with pytest.raises(KeyError, match="no sample"):
        ds.codec_bytes("0000000000000000")


def test_vocab_ids_equal_hf_tokenizers_and_round_trip(built):
    tokenizers = pytest.importorskip("tokenizers")
    ds_path, vocab_path = built
    ds = codeclm.Dataset(ds_path)
    vocab = codeclm.Vocab(vocab_path)
    hf = tokenizers.Tokenizer.from_file(str(vocab_path))
    assert vocab.size == hf.get_vocab_size()
    ids = ds.samples().select("sample_id").collect()["sample_id"].to_list()
    for sample_id in ids:
        data = ds.codec_bytes(sample_id)
        ours = vocab.encode(data)
        assert ours.dtype == np.uint16
        text = "".join(chr(0x2800 + b) for b in data)
        assert ours.tolist() == hf.encode(text, add_special_tokens=False).ids
        assert vocab.decode(ours) == data
    assert vocab.decode([vocab.bos, vocab.eos]) == b""


def test_documents_equal_the_reference_reader_and_frame_the_codec_bytes(built):
    ds_path, vocab_path = built
    ds = codeclm.Dataset(ds_path)
    toks = ds.tokens()
    vocab = codeclm.Vocab(vocab_path)
    assert toks.hash == vocab.hash == codeclm.Tokens(ds_path, vocab=vocab.hash[:6]).hash
    ref = reference_reader()
    manifest = toks.manifest().collect()
    docs = dict(toks.documents())
    assert len(docs) == manifest.height == 10
    for row in manifest.iter_rows(named=True):
        expected = ref.TokenShard(str(ds_path / row["shard"])).read(row["offset"], row["n_tokens"])
        doc = docs[row["sample_id"]]
        assert doc.dtype == np.uint16 and np.array_equal(doc, expected)
        assert doc[0] == vocab.bos and doc[-1] == vocab.eos
        assert np.array_equal(doc[1:-1], vocab.encode(ds.codec_bytes(row["sample_id"])))
        assert np.array_equal(toks.document(row["sample_id"]), doc)
    train = [s for s, _ in toks.documents(split="train")]
    val = [s for s, _ in toks.documents(split="val")]
    assert sorted(train + val) == sorted(docs) and val


def test_generated_ids_clean_as_the_cli_decodes_them(built, tmp_path):
    """Ids with junk around a document (as a sampler may emit) decode, tidy and splice to the
    same JPEG as `codeclm dataset decode --tokens`."""
    ds_path, vocab_path = built
    ds = codeclm.Dataset(ds_path)
    toks = ds.tokens()
    vocab = codeclm.Vocab(vocab_path)
    lines, ours = [], []
    for i, (sample_id, doc) in enumerate(toks.documents()):
        ids = doc.tolist()
        junk = vocab.encode(b"\x00\x01garbage")
        ids = junk.tolist() + ids[: len(ids) - 3 * i] + junk.tolist()
        lines.append(" ".join(map(str, ids)))
        ours.append(codeclm.jpeg.splice_tables(codeclm.jpeg.tidy(vocab.decode(ids)), ds.jpeg_tables()))
    (tmp_path / "ids.txt").write_text("\n".join(lines) + "\n")
    run("dataset", "decode", "--dataset", str(ds_path), "--vocab", str(vocab_path),
        "--tokens", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "out"))
    for i, jpeg in enumerate(ours):
        assert jpeg == (tmp_path / "out" / f"seq-{i:04}.jpg").read_bytes(), i
    assert codeclm.jpeg.tidy(b"xx\xff\xd8ab") == b"\xff\xd8ab\xff\xd9"


def test_windows_equal_the_trainers_and_resume_exactly(built, tmp_path):
    ds_path, _ = built
    toks = codeclm.Tokens(ds_path)
    context, n, seed = 300, 40, 7
    run("dataset", "windows", "--dataset", str(ds_path), "--context", str(context), "--seed", str(seed),
        "--count", str(n), "--out", str(tmp_path / "w.bin"))
    rust = np.fromfile(tmp_path / "w.bin", dtype="<u2").reshape(n, context + 1)
    stream = toks.windows(context=context, batch=4, seed=seed)
    got = []
    for _ in range(n // 4):
        x, y = next(stream)
        assert x.shape == (4, context) and np.array_equal(x[:, 1:], y[:, :-1])
        got.extend(np.concatenate([x, y[:, -1:]], axis=1))
    assert np.array_equal(np.array(got), rust)
    # A stream resumed from a state continues exactly as the uninterrupted one.
    a = toks.windows(context=context, batch=4, seed=seed)
    for _ in range(3):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))
    expected = [next(a) for _ in range(3)]
    b = toks.windows(context=context, batch=4, seed=seed)
    b.load_state_dict(state)
    for (ex, ey), (gx, gy) in zip(expected, (next(b) for _ in range(3))):
        assert np.array_equal(ex, gx) and np.array_equal(ey, gy)
    assert not np.array_equal(next(toks.windows(context=context, batch=4, seed=seed + 1))[0], rust[:4, :-1])


def test_errors_name_the_fix(tmp_path, built):
    with pytest.raises(FileNotFoundError, match="codeclm dataset build"):
        codeclm.Dataset(tmp_path)
    ds_path, _ = built
    with pytest.raises(KeyError, match="no token set"):
        codeclm.Tokens(ds_path, vocab="ffff")
    with pytest.raises(ValueError, match="not a token shard|token shard"):
        (tmp_path / "x.tok").write_bytes(b"not a shard at all, far too short")
        codeclm.TokenShard(str(tmp_path / "x.tok"))
    with pytest.raises(OSError):
        codeclm.CodecShard(str(tmp_path / "missing.shard"))
