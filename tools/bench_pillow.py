#!/usr/bin/env python3
"""Pillow side of the image-pipeline throughput benchmark (single process, single thread).

    python3 tools/bench_pillow.py [--repeat N] [--resample lanczos|bilinear] [--draft]
                                  [--encode-only] FILE...

Per image: decode the JPEG, convert to RGB, centre-crop to the largest square, resize to
256x256 (LANCZOS by default), encode JPEG quality 25, 4:2:0, restart_marker_blocks=1,
streamtype=2 (abbreviated, the paper's format) into a BytesIO.

The files are read into memory first (the timing excludes disk I/O, as the Rust side should).
One untimed warm-up pass over the whole list, then the list is run --repeat times (default 3)
and timed with time.perf_counter(). Prints ONE JSON line:
  {"tool":"pillow","mode":...,"images":N*repeat,"seconds":S,"images_per_s":...,
   "peak_rss_mb":..., "resample":..., "draft":..., "repeat":..., "files":N, "out_bytes":...}
peak_rss_mb is resource.getrusage(RUSAGE_SELF).ru_maxrss (KiB on Linux) / 1024.

--draft        call im.draft("RGB", (256, 256)) before decoding: libjpeg's DCT-domain downscale
               by 1/2, 1/4 or 1/8, the largest reduction that keeps both sides >= 256.
--encode-only  decode, crop and resize everything up front, then time only the encode (the floor).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import time

from PIL import Image

RESAMPLE = {"lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR}
SIZE = 256


def prepare(data: bytes, resample: int, draft: bool) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    if draft:
        im.draft("RGB", (SIZE, SIZE))
    im = im.convert("RGB")
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side))
    return im.resize((SIZE, SIZE), resample)


def encode(im: Image.Image) -> int:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=25, subsampling="4:2:0", restart_marker_blocks=1,
            streamtype=2)
    return buf.tell()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--resample", choices=list(RESAMPLE), default="lanczos")
    ap.add_argument("--draft", action="store_true")
    ap.add_argument("--encode-only", action="store_true")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    resample = RESAMPLE[a.resample]

    blobs = []
    for f in a.files:
        with open(f, "rb") as fh:
            blobs.append(fh.read())

    if a.encode_only:
        # Fresh images (no info), so nothing extra is written and only libjpeg's encode is timed.
        work = [prepare(b, resample, a.draft) for b in blobs]
        work = [Image.frombytes("RGB", im.size, im.tobytes()) for im in work]

        def one_pass() -> int:
            return sum(encode(im) for im in work)
    else:
        def one_pass() -> int:
            total = 0
            for b in blobs:
                im = prepare(b, resample, a.draft)
                im.info.clear()  # no COM marker copied from the source
                total += encode(im)
            return total

    one_pass()  # warm-up, untimed
    out_bytes = 0
    t0 = time.perf_counter()
    for _ in range(a.repeat):
        out_bytes += one_pass()
    seconds = time.perf_counter() - t0

    n = len(blobs) * a.repeat
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({
        "tool": "pillow",
        "mode": "encode-only" if a.encode_only else "end-to-end",
        "images": n,
        "seconds": round(seconds, 6),
        "images_per_s": round(n / seconds, 3) if seconds > 0 else None,
        "peak_rss_mb": round(rss_mb, 1),
        "resample": a.resample,
        "draft": a.draft,
        "repeat": a.repeat,
        "files": len(blobs),
        "out_bytes": out_bytes,
        "pillow": Image.__version__,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
