#!/usr/bin/env python3
"""Peak RSS and throughput of the training loader on the bundled dataset and on a synthetic token
set of a few GB (`codeclm bench loader`): with the tokens read frame by frame on demand, the peak
should not grow with the data, only with its document count (the 24-byte document table).

    python3 tools/bench_loader.py [--bin target/release/codeclm] [--bundled data]
                                  [--synthetic /tmp/codeclm-synthetic] [--tokens 2e9]

The synthetic set is written once (reused when its directory exists). Each measurement is a fresh
process under /usr/bin/time -v, with the trainer's startup (open, shard check, validation subset,
unigram baseline) and 200 batches of 16 x 2048 tokens.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import last_json, run_with_rss, table  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default="target/release/codeclm")
    ap.add_argument("--bundled", default="data", help="the bundled dataset (`make dataset`)")
    ap.add_argument("--vocab", help="token set of the bundled dataset (default: its only one)")
    ap.add_argument("--synthetic", default="/tmp/codeclm-synthetic")
    ap.add_argument("--tokens", type=float, default=2e9)
    ap.add_argument("--batches", type=int, default=200)
    a = ap.parse_args()
    if not os.path.exists(os.path.join(a.synthetic, "tokens")):
        out, _, rss, wall = run_with_rss(
            [a.bin, "bench", "loader", "--write-synthetic", a.synthetic, "--tokens", str(int(a.tokens))], 1, 7200)
        print(f"wrote {a.synthetic} in {wall:.0f} s (writer peak RSS {rss:.0f} MiB): {last_json(out)}")
    rows = []
    for name, ds, extra in [("bundled", a.bundled, ["--vocab", a.vocab] if a.vocab else []),
                            ("synthetic", a.synthetic, [])]:
        out, _, rss, _ = run_with_rss(
            [a.bin, "bench", "loader", "--dataset", ds, "--batches", str(a.batches)] + extra, 2, 3600)
        r = last_json(out)
        print(name, r)
        rows.append([name, r["docs"], f"{r['set_token_gb']:.3f}", r["shards"], f"{r['startup_seconds']:.2f}",
                     f"{r['tokens_per_second'] / 1e6:.1f}", f"{r['peak_rss_mb_after_startup']:.0f}", f"{rss:.0f}"])
    print(table(rows, ["set", "docs", "token GB", "shards", "startup s", "M tokens/s", "RSS after startup MiB",
                       "peak RSS MiB"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
