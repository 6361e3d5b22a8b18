#!/usr/bin/env python3
"""The Python package's training stream against the trainer's loader, same token set, same
settings, same run: tokens/s of each and the ratio.

    python3 tools/bench_python_stream.py [--dir /tmp/stream-bench] [--tokens 200000000]
        [--context 2048] [--batch 16] [--batches 400] [--bin target/release/codeclm]

Writes a synthetic token set (`codeclm bench loader --write-synthetic`, real token shards of
~4,200-token documents) once, then times `codeclm bench loader` and `codeclm.Tokens.windows`
over it (pip install ./python first), and the Python stream of one rank of two (its windows
read, the other rank's skipped unread).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import codeclm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/stream-bench")
    ap.add_argument("--tokens", type=int, default=200_000_000)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--bin", default="target/release/codeclm")
    a = ap.parse_args()
    root = Path(a.dir)
    if not (root / "dataset.json").exists():
        subprocess.run([a.bin, "bench", "loader", "--write-synthetic", str(root), "--tokens", str(a.tokens)],
                       check=True, stdout=subprocess.DEVNULL)
        # A token set alone: the Python Dataset wants a dataset.json to open the directory.
        (root / "dataset.json").write_text("{}")
    out = subprocess.run([a.bin, "bench", "loader", "--dataset", str(root), "--context", str(a.context),
                          "--batch", str(a.batch), "--batches", str(a.batches)],
                         check=True, capture_output=True, text=True).stdout
    rust = json.loads(out.strip().splitlines()[-1])
    toks = codeclm.Dataset(root).tokens()

    def tokens_per_second(**share) -> float:
        stream = toks.windows(context=a.context, batch=a.batch, seed=0, as_torch=False, **share)
        next(stream)  # startup (manifest read, table built) is not timed, as in `bench loader`
        t = time.perf_counter()
        for _ in range(a.batches):
            next(stream)
        return a.batches * a.batch * a.context / (time.perf_counter() - t)

    py_tps = tokens_per_second()
    # One rank of two: its own windows read, the other rank's skipped unread.
    rank_tps = tokens_per_second(rank=1, world_size=2)
    rust_tps = rust["tokens_per_second"]
    print(json.dumps({"context": a.context, "batch": a.batch, "batches": a.batches,
                      "rust_tokens_per_second": rust_tps, "python_tokens_per_second": py_tps,
                      "python_over_rust": py_tps / rust_tps, "python_rank_1_of_2_tokens_per_second": rank_tps}))


if __name__ == "__main__":
    main()
