#!/usr/bin/env python3
"""What crash isolation costs: `dataset build` with the decoders in worker processes (the
default) against the decoders on threads, same inputs, same run.

    python3 tools/bench_isolation.py [--copies N] [--workers W] [--rounds R] [--bin PATH]

The inputs are N copies of the bundled photos (tests/fixtures/images; distinct names, so N x 10
inputs) and, with --videos, the bundled clips. Each round builds the set once per mode into a
fresh directory, modes interleaved (a shared machine drifts); the best round of each mode is
kept. Prints inputs/s, inputs/s per worker, the peak RSS (the largest of the builder and its
worker processes), and the ratio processes/threads. Both modes write the same bytes (checked here:
the two datasets' samples.parquet and shards are compared).
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(binary: str, src: Path, videos: Path | None, out: Path, mode: str, workers: int) -> dict:
    cmd = [binary, "dataset", "build", "--no-progress", "--images", str(src), "--out", str(out),
           "--workers", str(workers), "--isolation", mode, "--size", "256"]
    if videos:
        cmd += ["--videos", str(videos)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                            env={**os.environ, "CODECLM_LOG": "warn"})
    # wait4's rusage: this build's process and the descendants it waited for (its workers);
    # ru_maxrss is the largest of them, in KiB.
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({status})")
    peak = usage.ru_maxrss
    run = json.loads(next((out / "runs").glob("run-*.json")).read_text())
    return {"seconds": seconds, "inputs": run["processed"], "peak_kib": peak}


def same_dataset(a: Path, b: Path) -> bool:
    files = ["samples.parquet"] + [f"shards/{p.name}" for p in sorted((a / "shards").iterdir())]
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=20)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--videos", action="store_true", help="also the bundled clips")
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "codeclm"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        src.mkdir()
        photos = [p for p in (ROOT / "tests/fixtures/images").iterdir() if p.suffix != ".md"]
        for k in range(args.copies):
            for p in photos:
                shutil.copy(p, src / f"{k:04d}-{p.name}")
        videos = ROOT / "tests/fixtures/videos" if args.videos else None
        best: dict[str, dict] = {}
        for r in range(args.rounds):
            for mode in ("threads", "processes"):
                out = tmp / f"{mode}-{r}"
                res = build(args.bin, src, videos, out, mode, args.workers)
                if mode not in best or res["seconds"] < best[mode]["seconds"]:
                    best[mode] = res
        if not same_dataset(tmp / "threads-0", tmp / "processes-0"):
            print("the two modes wrote different datasets", file=sys.stderr)
            return 1
    for mode, res in best.items():
        rate = res["inputs"] / res["seconds"]
        print(json.dumps({"mode": mode, "inputs": res["inputs"], "seconds": round(res["seconds"], 3),
                          "inputs_per_s": round(rate, 1),
                          "inputs_per_s_per_worker": round(rate / args.workers, 1),
                          "peak_rss_mib": round(res["peak_kib"] / 1024, 1)}))
    ratio = best["threads"]["seconds"] / best["processes"]["seconds"]
    print(f"processes / threads throughput: {ratio:.3f} ({args.workers} workers, "
          f"{best['threads']['inputs']} inputs, best of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
