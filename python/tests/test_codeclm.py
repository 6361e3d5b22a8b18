"""`import codeclm` against the CLI and the references: a dataset of the bundled photos built by
`codeclm` (CODECLM_BIN, default target/release/codeclm), ids against Hugging Face `tokenizers`,
documents against the pure-Python reader of tools/read_tokens.py, codec bytes against
`codeclm dataset export`."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
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
    stream = toks.windows(context=context, batch=4, seed=seed, as_torch=False)
    got = []
    for _ in range(n // 4):
        x, y = next(stream)
        assert x.shape == (4, context) and np.array_equal(x[:, 1:], y[:, :-1])
        got.extend(np.concatenate([x, y[:, -1:]], axis=1))
    assert np.array_equal(np.array(got), rust)
    # A stream resumed from a state continues exactly as the uninterrupted one.
    a = toks.windows(context=context, batch=4, seed=seed, as_torch=False)
    for _ in range(3):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))
    expected = [next(a) for _ in range(3)]
    b = toks.windows(context=context, batch=4, seed=seed, as_torch=False)
    b.load_state_dict(state)
    for (ex, ey), (gx, gy) in zip(expected, (next(b) for _ in range(3))):
        assert np.array_equal(ex, gx) and np.array_equal(ey, gy)
    assert not np.array_equal(next(toks.windows(context=context, batch=4, seed=seed + 1, as_torch=False))[0], rust[:4, :-1])


def windows_of(batches):
    """(inputs, targets) batches as the windows they are: rows of context + 1 tokens."""
    return [w for x, y in batches for w in np.concatenate([np.asarray(x), np.asarray(y)[:, -1:]], axis=1)]


def test_ranks_and_workers_split_the_stream(built, tmp_path):
    """Ranks take their slices of each global batch; workers take a rank's batches in turn;
    each training document is read once per epoch across the ranks; a 2-rank state resumes on
    one rank."""
    ds_path, _ = built
    toks = codeclm.Tokens(ds_path)
    context, seed, world, batch, steps = 300, 3, 2, 3, 40
    n = world * batch * steps
    run("dataset", "windows", "--dataset", str(ds_path), "--context", str(context), "--seed", str(seed),
        "--count", str(n), "--out", str(tmp_path / "w.bin"))
    rust = np.fromfile(tmp_path / "w.bin", dtype="<u2").reshape(n, context + 1)
    ranks = [toks.windows(context, batch, seed, rank=r, world_size=world, as_torch=False) for r in range(world)]
    got = [windows_of([next(ranks[r])]) for _ in range(steps) for r in range(world)]
    assert np.array_equal(np.array([w for b in got for w in b]), rust)
    assert ranks[0].state_dict() == ranks[1].state_dict(), "every rank holds the global position"

    # Each training document once in the first epoch, across both ranks (BOS starts one).
    bos = toks.vocab.bos
    stream = np.concatenate([rust[0]] + [w[1:] for w in rust[1:]])
    starts = np.flatnonzero(stream == bos)
    train = sorted(d.tobytes() for _, d in toks.documents(split="train"))
    assert len(starts) > len(train), "the windows cover more than an epoch"
    first_epoch = sorted(stream[a:b].tobytes() for a, b in zip(starts[: len(train)], starts[1 : len(train) + 1]))
    assert first_epoch == train
    # Documents each rank starts (a window's first token is the previous window's last).
    per_rank = [sum(int((w[1:] == bos).sum()) for b in got[r::world] for w in b) for r in range(world)]
    per_rank[0] += int(rust[0][0] == bos)
    assert sum(per_rank) == len(starts) and min(per_rank) > 0

    # Workers (as a DataLoader gives them: pickled copies) take rank 1's batches in turn.
    r1 = toks.windows(context, batch, seed, rank=1, world_size=world, as_torch=False)
    copies = [pickle.loads(pickle.dumps(r1)) for _ in range(2)]
    for k, c in enumerate(copies):
        c._as_worker(k, 2)
    mine = [windows_of([next(copies[j % 2])]) for j in range(8)]
    assert np.array_equal(np.array(mine), np.array(got[1 : 16 : world]))

    # A 2-rank state after 5 steps resumes on 1 rank with the same global batch.
    a = toks.windows(context, batch, seed, rank=0, world_size=world, as_torch=False)
    for _ in range(5):
        next(a)
    one = toks.windows(context, world * batch, seed, as_torch=False)
    one.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert np.array_equal(np.array(windows_of([next(one)])), rust[5 * world * batch : 6 * world * batch])
    # state_after(n) (a DataLoader loop's n batches) is the state after n batches here.
    fresh = toks.windows(context, batch, seed, rank=1, world_size=world, as_torch=False)
    assert fresh.state_after(5) == a.state_dict() and fresh.state_after(2) != a.state_dict()
    with pytest.raises(ValueError, match="global batch"):
        toks.windows(context, batch, seed, as_torch=False).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="rank"):
        toks.windows(context, batch, seed, rank=2, world_size=2)


def test_torch_dataloader_workers_yield_each_batch_once(built):
    """A torch DataLoader with 2 workers yields the stream's batches in order, each once."""
    torch = pytest.importorskip("torch")
    ds_path, _ = built
    toks = codeclm.Tokens(ds_path)
    direct = toks.windows(300, 2, 5, rank=1, world_size=2)
    expected = [next(direct) for _ in range(10)]
    assert expected[0][0].dtype == torch.int64
    loader = torch.utils.data.DataLoader(toks.windows(300, 2, 5, rank=1, world_size=2), batch_size=None, num_workers=2)
    got = [b for _, b in zip(range(10), loader)]
    for (ex, ey), (gx, gy) in zip(expected, got):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)


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


@pytest.fixture(scope="module")
def sampled(built, tmp_path_factory):
    """A `tiny` model trained 3 steps on the bundled photos, sampled unconstrained and
    unconditionally, and constrained from a prompt cut at half the image."""
    ds_path, vocab = built
    t = tmp_path_factory.mktemp("sampled")
    run("train", "--dataset", str(ds_path), "--preset", "tiny", "--steps", "3", "--context", "256",
        "--batch", "2", "--threads", "2", "--out", str(t / "run"))
    sample_id = codeclm.Tokens(ds_path).manifest().filter(pl.col("split") == "train").collect()["sample_id"][0]
    common = ["sample", "--no-progress", "--run", str(t / "run"), "--n", "2", "--batch", "2",
              "--max-tokens", "64", "--seed", "5"]
    run(*common, "--constrain", "none", "--out", str(t / "free"))
    run(*common, "--prompt", sample_id, "--ratio", "0.5", "--out", str(t / "prompted"))
    return t, sample_id


def generations(out: Path):
    report = json.loads((out / "decodability.json").read_text())
    lines = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    return lines, report["per_generation"]


def test_samples_clean_and_score_as_codeclm_sample(built, sampled):
    """Ids `codeclm sample` generated give its files and its decodability figures from
    Python; its prompts are `codeclm.jpeg.prompt`'s; its constrained tokens are the ones the
    Python grammar allows."""
    ds_path, _ = built
    out, sample_id = sampled
    ds = codeclm.Dataset(ds_path)
    toks = ds.tokens()
    grammar = ds.jpeg_grammar(toks.vocab)
    assert ds.codec_bytes(sample_id).startswith(grammar.header)
    tables = ds.jpeg_tables()
    for name in ("free", "prompted"):
        lines, per = generations(out / name)
        assert len(lines) == len(per) == 2
        for g, fig in zip(lines, per):
            ids = np.array(g["ids"])
            jpg = out / name / "generations" / f"{g['name']}.jpg"
            if jpg.exists():
                assert codeclm.jpeg.clean(ids, toks.vocab, tables) == jpg.read_bytes()
            ours, rgb = codeclm.jpeg.report(ids, toks.vocab, tables, n_generated=len(ids) - g["n_prompt"],
                                            header=grammar.header, name=g["name"])
            assert ours == fig
            assert (rgb is not None) == fig["decodes"]
    prompt = codeclm.jpeg.prompt(ds.codec_bytes(sample_id), toks.vocab, 0.5)
    assert prompt.rows_kept * 2 == prompt.mcu_rows
    assert toks.vocab.decode(prompt.ids) == ds.codec_bytes(sample_id)[: prompt.cut]
    lines, per = generations(out / "prompted")
    for g, fig in zip(lines, per):
        assert g["ids"][: g["n_prompt"]] == prompt.ids.tolist()
        st = grammar.state(prompt.ids)
        for t in g["ids"][g["n_prompt"]:]:
            mask = st.mask()
            assert mask.shape == (toks.vocab.size,) and mask[t], t
            assert st.advance(t)
        assert fig["header_ok"]
    # Bytes outside the grammar are refused, naming where.
    with pytest.raises(ValueError, match="at byte 0"):
        grammar.state(toks.vocab.encode(b"\x00\x01"))
    empty, _ = codeclm.jpeg.report([], toks.vocab, tables)
    assert not empty["decodes"] and empty["n_bytes"] == 0


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """The bundled videos built with the paper's settings, a 300-entry vocabulary, tokenized."""
    t = tmp_path_factory.mktemp("videos")
    ds = t / "ds"
    run("dataset", "build", "--no-progress", "--videos", str(REPO / "tests/fixtures/videos"), "--out", str(ds))
    vocab = t / "v.json"
    run("vocab", "train", "--dataset", str(ds), "--modality", "video", "--size", "300", "--out", str(vocab))
    run("dataset", "tokenize", "--dataset", str(ds), "--vocab", str(vocab))
    return ds


def test_h264_prompts_checks_and_grammar(videos):
    """Video prompts are the first frames as a token prefix ending at a frame's start code;
    the slice check passes the dataset's own streams; their documents walk the grammar to
    an EOS it allows."""
    ds = codeclm.Dataset(videos)
    toks = ds.tokens()
    settings = ds.video_settings()
    grammar = ds.h264_grammar(toks.vocab)
    assert grammar.header is None
    n = 0
    for sample_id, doc in toks.documents(modality="video"):
        stream = ds.codec_bytes(sample_id)
        assert codeclm.h264.clean(doc, toks.vocab) == stream
        whole = codeclm.h264.check_slices(stream, settings)
        # Every slice in place (a short source has fewer than fps x seconds frames).
        per_frame = whole["mbs_expected"] // (settings["fps"] * settings["duration_ms"] // 1000)
        assert whole["mbs_ok"] == whole["frames"] * per_frame > 0, sample_id
        fig = codeclm.h264.report(doc, toks.vocab, settings, name=sample_id)
        assert fig["slices"] == whole and fig["ended_with_eos"] and fig["n_bytes"] == len(stream)
        frames = min(10, whole["frames"] - 1)
        p = codeclm.h264.prompt(stream, toks.vocab, frames=frames)
        assert p.frames_total == whole["frames"] and np.array_equal(p.ids, doc[: len(p.ids)])
        assert stream[p.cut :].startswith((b"\x00\x00\x01", b"\x00\x00\x00\x01"))
        assert codeclm.h264.check_slices(stream[: p.cut], settings)["frames"] == frames
        st = grammar.state(doc[:-1])
        assert st.mask()[toks.vocab.eos], "a whole stream may end"
        n += 1
    assert n >= 5
    with pytest.raises(ValueError, match="frame"):
        codeclm.h264.prompt(stream, toks.vocab, frames=10_000)
