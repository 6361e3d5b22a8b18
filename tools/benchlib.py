"""Shared by bench_train.py and bench_sample.py: run a process with a thread budget and measure its
peak RSS, find the JSON a codeclm command prints, build the PyTorch twin of a codeclm model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("RAYON_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
              "NUMEXPR_NUM_THREADS", "POLARS_MAX_THREADS"):
        env[k] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def run_measured(cmd: list[str], threads: int, timeout: float = 1800) -> tuple[str, str, float]:
    """Run cmd with `threads` threads; return stdout, stderr, wall seconds; exit on failure."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=thread_env(threads))
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        sys.exit(f"bench: `{' '.join(cmd)}` ran past {timeout:.0f}s\n{err[-2000:]}")
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"bench: `{' '.join(cmd)}` failed (exit {p.returncode})\n{out[-2000:]}\n{err[-4000:]}")
    return out, err, wall


def run_with_rss(cmd: list[str], threads: int, timeout: float = 1800) -> tuple[str, str, float, float]:
    """Like run_measured, under /usr/bin/time -v: also the process's peak RSS in MiB."""
    timed = ["/usr/bin/time", "-v"] + cmd if os.path.exists("/usr/bin/time") else cmd
    out, err, wall = run_measured(timed, threads, timeout)
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    rss = int(m.group(1)) / 1024 if m else float("nan")
    return out, err, rss, wall


def last_json(text: str) -> dict | None:
    """The last line of text that parses as a JSON object (codeclm's --json summaries)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    try:
        return json.loads(text)
    except ValueError:
        return None


def find_key(d, *names):
    """First value under any of `names`, searching nested dicts depth-first."""
    if isinstance(d, dict):
        for n in names:
            if n in d:
                return d[n]
        for v in d.values():
            r = find_key(v, *names)
            if r is not None:
                return r
    return None


HF_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "rms_norm_eps", "rope_theta", "vocab_size", "max_position_embeddings")


def hf_config_of(d: dict) -> dict:
    """The HF Llama config inside a codeclm JSON summary (at top level or under any key)."""
    if all(k in d for k in ("hidden_size", "num_hidden_layers", "vocab_size")):
        return {k: d[k] for k in HF_KEYS if k in d}
    for v in d.values():
        if isinstance(v, dict):
            c = hf_config_of(v)
            if c:
                return c
    return {}


def torch_llama(cfg: dict, dtype=None):
    """transformers' LlamaForCausalLM for a codeclm config (untied, no biases, SDPA attention)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    c = LlamaConfig(
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=cfg.get("rope_theta", 10000.0),
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg["max_position_embeddings"],
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(c).to(dtype or torch.float32)


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda r: "| " + " | ".join(str(x).rjust(w) for x, w in zip(r, widths)) + " |"
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows])
