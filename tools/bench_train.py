#!/usr/bin/env python3
"""Training speed, codeclm's engine vs PyTorch, same model, same batch, same machine, same run.

    python3 tools/bench_train.py [--presets tiny small] [--threads 1 2] [--bin target/release/codeclm]
    make bench-train                     # in the `make compat-env` venv

For each preset and thread count:
  1. `codeclm bench train --preset P --threads T --json` (forward + backward + AdamW steps on
     random tokens); its JSON summary gives the model config (HF names), batch, context and
     training tokens/s;
  2. this script's --torch-worker in its own process with torch.set_num_threads(T): the same
     config as transformers' LlamaForCausalLM (SDPA attention, f32), the same batch x context of
     random tokens, cross-entropy on next tokens, gradient clipping at 1.0, torch.optim.AdamW;
     after --warmup untimed steps it times --steps steps (stopping early after --seconds).
Both run under /usr/bin/time -v for the peak RSS. Prints a Markdown table with tokens/s per core,
the ratio codeclm / PyTorch, and codeclm's achieved FLOP/s (6 N + 12 L T D per token, PaLM's
count) against the machine's f32 peak, taken as cores x the nominal clock of /proc/cpuinfo x 64
FLOP per cycle (two AVX-512 FMA units: 2 x 16 lanes x 2); writes it with the raw JSON to
OUT/bench-train.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import find_key, hf_config_of, last_json, run_with_rss, table, torch_llama  # noqa: E402


def torch_worker(spec: dict) -> None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(spec["threads"])
    torch.set_num_interop_threads(1)
    cfg, b, t = spec["config"], spec["batch"], spec["context"]
    model = torch_llama(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    v = cfg["vocab_size"]

    def step():
        batch = torch.randint(0, v, (b, t + 1), generator=g)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, v), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(spec["warmup"]):
        step()
    t0, steps = time.perf_counter(), 0
    while steps < spec["steps"] and (steps == 0 or time.perf_counter() - t0 < spec["seconds"]):
        loss = step()
        steps += 1
    secs = time.perf_counter() - t0
    print(json.dumps({"tokens_per_s": b * t * steps / secs, "steps": steps, "seconds": secs, "loss": loss,
                      "torch": torch.__version__, "parameters": sum(p.numel() for p in model.parameters())}))


def peak_flops(threads: int) -> float | None:
    """f32 peak of `threads` cores: nominal clock x 64 FLOP/cycle (AVX-512, two FMA units)."""
    try:
        with open("/proc/cpuinfo") as f:
            mhz = next(float(l.split(":")[1]) for l in f if l.startswith("cpu MHz"))
    except (OSError, StopIteration, ValueError):
        return None
    return threads * mhz * 1e6 * 64


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--bin", default="target/release/codeclm")
    ap.add_argument("--rust-args", default="", help="extra arguments for `codeclm bench train`")
    ap.add_argument("--warmup", type=int, default=1, help="untimed PyTorch steps (codeclm: 1)")
    ap.add_argument("--steps", type=int, default=0, help="timed PyTorch steps (default: codeclm's)")
    ap.add_argument("--seconds", type=float, default=30.0, help="stop timing PyTorch after this long")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--torch-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.torch_worker:
        torch_worker(json.loads(a.torch_worker))
        return 0

    rows, raw = [], []
    for preset in a.presets:
        for threads in a.threads:
            cmd = [a.bin, "bench", "train", "--preset", preset, "--threads", str(threads), "--json"]
            cmd += a.rust_args.split()
            out, err, rss_rs, _ = run_with_rss(cmd, threads)
            rs = last_json(out)
            if rs is None:
                sys.exit(f"bench_train: `{' '.join(cmd)}` printed no JSON summary:\n{out[-2000:]}")
            cfg = hf_config_of(rs)
            batch, context = find_key(rs, "batch", "batch_size"), find_key(rs, "context", "seq_len")
            rs_tps = find_key(rs, "tokens_per_s", "tokens_per_sec")
            if not cfg or batch is None or context is None or rs_tps is None:
                sys.exit(f"bench_train: codeclm's summary lacks config/batch/context/tokens_per_s: {rs}")
            steps = a.steps or find_key(rs, "steps") or 5  # default: as many timed steps as codeclm's
            spec = {"config": cfg, "batch": batch, "context": context, "threads": threads,
                    "warmup": a.warmup, "steps": steps, "seconds": a.seconds}
            pout, _, rss_pt, _ = run_with_rss([sys.executable, __file__, "--torch-worker", json.dumps(spec)], threads)
            pt = last_json(pout)
            ratio = rs_tps / pt["tokens_per_s"]
            flops = rs.get("flops_per_second")
            peak = peak_flops(threads)
            share = f"{flops / 1e9:,.0f} ({100 * flops / peak:.0f}%)" if flops and peak else "?"
            rows.append([preset, threads, f"{batch}x{context}", f"{pt['parameters']:,}",
                         f"{rs_tps / threads:,.0f}", f"{pt['tokens_per_s'] / threads:,.0f}", f"{ratio:.2f}",
                         share, f"{rss_rs:,.0f}", f"{rss_pt:,.0f}"])
            raw.append({"preset": preset, "threads": threads, "codeclm": rs, "pytorch": pt,
                        "rss_mib": {"codeclm": rss_rs, "pytorch": rss_pt}, "ratio": ratio})
            print(f"bench_train: {preset} x{threads}: codeclm {rs_tps:,.0f} tok/s, PyTorch "
                  f"{pt['tokens_per_s']:,.0f} tok/s, ratio {ratio:.2f}", file=sys.stderr)

    md = table(rows, ["preset", "threads", "batch x ctx", "params", "codeclm tok/s/core",
                      "PyTorch tok/s/core", "codeclm/PyTorch", "codeclm GFLOP/s (of peak)",
                      "codeclm RSS MiB", "PyTorch RSS MiB"])
    head = (f"Training tokens/s (forward + backward + AdamW, f32), {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, PyTorch {raw[0]['pytorch']['torch'] if raw else '?'}; "
            f"peak RSS per process (/usr/bin/time -v)")
    print(head)
    print(md)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench-train.md"), "w") as f:
        f.write(head + "\n\n" + md + "\n\n```json\n" + json.dumps(raw, indent=1) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
