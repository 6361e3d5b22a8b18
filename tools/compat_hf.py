#!/usr/bin/env python3
"""Hugging Face compatibility of a codeclm checkpoint: the same tokens through
`transformers.LlamaForCausalLM.from_pretrained(RUN)` and through `codeclm model logits`.

    python3 tools/compat_hf.py RUN [--dataset DIR] [--vocab HASH] [--tokens 512]
    python3 tools/compat_hf.py RUN --ids-file ids.json        # JSON list or whitespace-separated ids
    make compat RUN=runs/tiny                                 # in the `make compat-env` venv

RUN is a run directory (or any directory with HF `config.json` + `model.safetensors`). Without
--ids-file the tokens are the start of the first held-out (`val`) document of the dataset's token
set: DIR and HASH default to those in the run's trainer_state.json.

It prints the max abs difference of the logits (f32, [T, V]) and exits non-zero above --tol.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def run_metadata(run: str) -> dict:
    """The dataset and vocabulary a codeclm run trained on (its trainer_state.json), if any."""
    path = os.path.join(run, "trainer_state.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        st = json.load(f)
    return {k: v for k, v in (("dataset", st.get("dataset")), ("vocab", st.get("vocab_hash"))) if v}


def held_out_ids(dataset: str, vocab: str | None, n: int) -> tuple[list[int], str]:
    import polars as pl

    from read_tokens import read_token_shard

    if vocab is None:
        sets = sorted(glob.glob(os.path.join(dataset, "tokens-*.parquet")))
        if len(sets) != 1:
            sys.exit(f"compat_hf: {dataset} has {len(sets)} token sets; pass --vocab HASH "
                     f"(one of {[os.path.basename(s)[7:-8] for s in sets]})")
        vocab = os.path.basename(sets[0])[len("tokens-") : -len(".parquet")]
    table = pl.read_parquet(os.path.join(dataset, f"tokens-{vocab}.parquet"))
    val = table.filter(pl.col("split") == "val").sort("sample_id")
    if val.height == 0:
        sys.exit(f"compat_hf: {dataset} has no held-out (val) documents in token set {vocab}; pass --ids-file")
    row = val.row(0, named=True)
    tokens, shard_hash, _ = read_token_shard(os.path.join(dataset, row["shard"]))
    if shard_hash != vocab:
        sys.exit(f"compat_hf: {row['shard']} was written with vocabulary {shard_hash}, not {vocab}")
    doc = tokens[row["offset"] : row["offset"] + row["n_tokens"]]
    return [int(t) for t in doc[:n]], f"held-out sample {row['sample_id']} of {dataset} (vocab {vocab})"


def load_logits(path: str) -> np.ndarray:
    from safetensors.numpy import load_file

    t = load_file(path)
    if "logits" not in t:
        sys.exit(f"compat_hf: {path} has no tensor 'logits' (has {sorted(t)})")
    return t["logits"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--dataset")
    ap.add_argument("--vocab")
    ap.add_argument("--ids-file", help="token ids instead of held-out data: a JSON list or whitespace-separated")
    ap.add_argument("--tokens", type=int, default=512, help="how many tokens (capped by the context)")
    ap.add_argument("--bin", default=os.environ.get("CODECLM", "target/release/codeclm"))
    ap.add_argument("--tol", type=float, default=1e-4, help="max abs logit difference allowed (f32)")
    a = ap.parse_args()

    import torch
    from transformers import LlamaForCausalLM

    cfg = json.load(open(os.path.join(a.run, "config.json")))
    n = min(a.tokens, cfg["max_position_embeddings"])
    if a.ids_file:
        text = open(a.ids_file).read()
        ids = [int(i) for i in (json.loads(text) if text.lstrip().startswith("[") else text.split())][:n]
        what = a.ids_file
    else:
        meta = run_metadata(a.run)
        dataset = a.dataset or meta.get("dataset")
        if dataset is None:
            sys.exit(f"compat_hf: {a.run} does not name its dataset; pass --dataset DIR (or --ids-file)")
        ids, what = held_out_ids(dataset, a.vocab or meta.get("vocab"), n)
    if max(ids) >= cfg["vocab_size"]:
        sys.exit(f"compat_hf: token id {max(ids)} >= vocab_size {cfg['vocab_size']}: wrong --vocab for this run?")

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = LlamaForCausalLM.from_pretrained(a.run, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].float().numpy()
    t_hf = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        ids_path, out_path = os.path.join(tmp, "ids.txt"), os.path.join(tmp, "logits.safetensors")
        with open(ids_path, "w") as f:  # `codeclm model logits --tokens-file`: whitespace-separated ids
            f.write(" ".join(map(str, ids)) + "\n")
        cmd = [a.bin, "model", "logits", "--run", a.run, "--tokens-file", ids_path, "--out", out_path]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        t_rs = time.perf_counter() - t0
        if r.returncode != 0:
            sys.stderr.write(r.stdout + r.stderr)
            sys.exit(f"compat_hf: `{' '.join(cmd)}` failed (exit {r.returncode})")
        ours = load_logits(out_path)

    if ours.shape != hf.shape:
        sys.exit(f"compat_hf: codeclm logits have shape {list(ours.shape)}, transformers {list(hf.shape)}")
    diff = np.abs(ours.astype(np.float64) - hf.astype(np.float64))
    worst = float(diff.max())
    agree = float(np.mean(ours.argmax(-1) == hf.argmax(-1)))
    print(f"compat_hf: {len(ids)} tokens from {what}")
    print(f"compat_hf: transformers {t_hf:.2f}s, codeclm {t_rs:.2f}s (process); logits {list(hf.shape)}, "
          f"std {hf.std():.3f}; argmax agreement {agree:.4f}")
    print(f"compat_hf: max abs diff {worst:.3e} (mean {diff.mean():.3e}), tolerance {a.tol:g}: "
          f"{'OK' if worst <= a.tol else 'FAIL'}")
    return 0 if worst <= a.tol else 1


if __name__ == "__main__":
    sys.exit(main())
