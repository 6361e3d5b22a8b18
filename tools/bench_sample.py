#!/usr/bin/env python3
"""Sampling speed, codeclm (the engine, KV cache) vs transformers `generate`, same weights, same run.

    python3 tools/bench_sample.py [--presets tiny small] [--run tiny=runs/tiny ...]
                                  [--batch 1 16] [--threads 1 2] [--max-tokens 256]
    make bench-sample                    # in the `make compat-env` venv

Weights: a run directory per preset (--run PRESET=DIR: HF config.json + model.safetensors), or,
for presets without one, a seeded random initialisation of `codeclm model info --preset P --json`
saved by transformers to OUT/sample-P/ (speed does not depend on the values; both sides load the
same file either way).

For each preset, batch and thread count:
  1. `codeclm bench sample --run DIR --batch B --max-tokens N --threads T --json`;
  2. this script's --torch-worker in its own process with torch.set_num_threads(T):
     `LlamaForCausalLM.from_pretrained(DIR).generate(BOS x B, do_sample=True, temperature 1.0,
     top_k 50, top_p 0.9, max_new_tokens=N, min_new_tokens=N, use_cache=True)` after one short
     untimed call; tokens/s = B x N / seconds.
Prints a Markdown table with tokens/s and the ratio codeclm / transformers, with peak RSS, and
writes it with the raw JSON to OUT/bench-sample.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import find_key, hf_config_of, last_json, run_measured, run_with_rss, table, torch_llama  # noqa: E402


def torch_worker(spec: dict) -> None:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(spec["threads"])
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(spec["run"], torch_dtype=torch.float32)
    model.eval()
    bos = model.config.bos_token_id if model.config.bos_token_id is not None else 1
    ids = torch.full((spec["batch"], 1), bos, dtype=torch.long)
    kw = dict(do_sample=True, temperature=1.0, top_k=50, top_p=0.9, use_cache=True,
              attention_mask=torch.ones_like(ids), pad_token_id=0)
    n = spec["max_tokens"]
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        secs = time.perf_counter() - t0
    generated = (out.shape[1] - 1) * out.shape[0]
    print(json.dumps({"tokens_per_s": generated / secs, "tokens": generated, "seconds": secs,
                      "torch": torch.__version__}))


def random_run(bin_: str, preset: str, out: str) -> str:
    """A seeded random checkpoint of the preset's config, saved by transformers (HF layout)."""
    d = os.path.join(out, f"sample-{preset}")
    if os.path.exists(os.path.join(d, "model.safetensors")):
        return d
    info_out, _, _ = run_measured([bin_, "model", "info", "--preset", preset, "--json"], 1)
    info = last_json(info_out)
    cfg = hf_config_of(info or {})
    if not cfg:
        sys.exit(f"bench_sample: `codeclm model info --preset {preset} --json` gave no config: {info_out[-1000:]}")
    model = torch_llama(cfg)
    model.config.bos_token_id = find_key(info, "bos_token_id") or 1
    model.config.eos_token_id = find_key(info, "eos_token_id") or 2
    model.save_pretrained(d, safe_serialization=True)
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--run", action="append", default=[], metavar="PRESET=DIR")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--bin", default="target/release/codeclm")
    ap.add_argument("--rust-args", default="", help="extra arguments for `codeclm bench sample`")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--torch-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.torch_worker:
        torch_worker(json.loads(a.torch_worker))
        return 0

    runs = dict(r.split("=", 1) for r in a.run)
    rows, raw = [], []
    for preset in a.presets:
        run = runs.get(preset) or random_run(a.bin, preset, a.out)
        for batch in a.batch:
            for threads in a.threads:
                cmd = [a.bin, "bench", "sample", "--run", run, "--batch", str(batch),
                       "--max-tokens", str(a.max_tokens), "--threads", str(threads), "--json"]
                cmd += a.rust_args.split()
                out, _, rss_rs, _ = run_with_rss(cmd, threads)
                rs = last_json(out)
                rs_tps = find_key(rs or {}, "tokens_per_s", "tokens_per_sec")
                if rs_tps is None:
                    sys.exit(f"bench_sample: `{' '.join(cmd)}` printed no JSON with tokens_per_s:\n{out[-2000:]}")
                spec = {"run": run, "batch": batch, "threads": threads, "max_tokens": a.max_tokens}
                pout, _, rss_pt, _ = run_with_rss([sys.executable, __file__, "--torch-worker", json.dumps(spec)], threads)
                pt = last_json(pout)
                ratio = rs_tps / pt["tokens_per_s"]
                rows.append([preset, batch, threads, f"{rs_tps:,.0f}", f"{pt['tokens_per_s']:,.0f}", f"{ratio:.2f}",
                             f"{rss_rs:,.0f}", f"{rss_pt:,.0f}"])
                raw.append({"preset": preset, "run": run, "batch": batch, "threads": threads, "codeclm": rs,
                            "transformers": pt, "rss_mib": {"codeclm": rss_rs, "transformers": rss_pt},
                            "ratio": ratio})
                print(f"bench_sample: {preset} batch {batch} x{threads}: codeclm {rs_tps:,.0f} tok/s, "
                      f"transformers {pt['tokens_per_s']:,.0f} tok/s, ratio {ratio:.2f}", file=sys.stderr)

    md = table(rows, ["preset", "batch", "threads", "codeclm tok/s", "transformers tok/s",
                      "codeclm/transformers", "codeclm RSS MiB", "transformers RSS MiB"])
    head = (f"Sampling tokens/s ({a.max_tokens} new tokens per sequence from BOS, temperature 1, top-k 50, "
            f"top-p 0.9, KV cache, f32), {platform.machine()}, {os.cpu_count()} cores, "
            f"PyTorch {raw[0]['transformers']['torch'] if raw else '?'}; peak RSS per process")
    print(head)
    print(md)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench-sample.md"), "w") as f:
        f.write(head + "\n\n" + md + "\n\n```json\n" + json.dumps(raw, indent=1) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
