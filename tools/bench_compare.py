#!/usr/bin/env python3
"""codeclm vs Pillow: images/s per core and peak RSS, same files, same run.

    python3 tools/bench_compare.py [--repeat N] [--rounds R] [--out bench-out] [--bin PATH]

1. Prepares the inputs once (kept in OUT/inputs/, rebuilt only if missing), all from the real
   photos in tests/fixtures/images/, saved by Pillow as JPEG quality 90, 4:2:0, no metadata:
     small/  500x375 and 375x500 (the paper's ImageNet-class size): each colour photo
             centre-cropped to 4:3 (or 3:4) and downscaled, plus unscaled 500x375 crops of the
             two large photos (real sensor detail, no resampling).
     large/  1024x768-class crops (never upscaled) of the only photos that large:
             retina.jpg 1411x1411 and hubble_deep_field.jpg 1000x872.
2. Runs, each as its own single-threaded process over the same files (every thread-count knob
   set to 1, one process at a time): tools/bench_pillow.py and `codeclm bench images`.
   Pillow: LANCZOS, LANCZOS + draft, BILINEAR (the paper's resize), encode only.
   codeclm: default preset (DCT scaling + Lanczos3), default with --no-dct-scaling, default
   with the exact Pillow-LANCZOS port, paper preset (exact Pillow BILINEAR), encode only.
   With --rounds R > 1 every row runs R times interleaved and the best run is kept (the
   machine is shared; the best run is the least disturbed one).
3. Prints a Markdown table (config, images/s per core, peak RSS MB, ratio vs the matching
   Pillow row) and writes it, with the raw JSON lines, to OUT/compare.md.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "tests" / "fixtures" / "images"
COLOUR_PHOTOS = ["astronaut.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
                 "retina.jpg", "chelsea.png"]
SINGLE_THREAD_ENV = {k: "1" for k in (
    "RAYON_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "POLARS_MAX_THREADS")}


def save_q90(im: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    # A fresh image: no ICC/EXIF/COM copied from the source photo.
    Image.frombytes("RGB", im.size, im.convert("RGB").tobytes()).save(
        buf, format="JPEG", quality=90, subsampling="4:2:0")
    path.write_bytes(buf.getvalue())


def crop_aspect(im: Image.Image, aw: int, ah: int) -> Image.Image:
    """The largest centred crop of aspect aw:ah."""
    w, h = im.size
    if w * ah >= h * aw:
        cw, ch = h * aw // ah, h
    else:
        cw, ch = w, w * ah // aw
    left, top = (w - cw) // 2, (h - ch) // 2
    return im.crop((left, top, left + cw, top + ch))


def crop_at(im: Image.Image, w: int, h: int, fx: float, fy: float) -> Image.Image:
    """An unscaled w x h crop whose top-left is at fraction (fx, fy) of the free margin."""
    W, H = im.size
    assert W >= w and H >= h, (im.size, w, h)
    left, top = round((W - w) * fx), round((H - h) * fy)
    return im.crop((left, top, left + w, top + h))


def prepare_inputs(out: Path) -> tuple[list[Path], list[Path]]:
    small_dir, large_dir = out / "inputs" / "small", out / "inputs" / "large"
    small_dir.mkdir(parents=True, exist_ok=True)
    large_dir.mkdir(parents=True, exist_ok=True)
    small: list[Path] = []
    photos = {n: Image.open(PHOTOS / n).convert("RGB") for n in COLOUR_PHOTOS}
    for name, im in photos.items():
        stem = name.rsplit(".", 1)[0]
        for (w, h) in ((500, 375), (375, 500)):
            c = crop_aspect(im, w, h)
            if c.width < w or c.height < h:
                continue  # would need upscaling: not a real photo of that size
            p = small_dir / f"{stem}_{w}x{h}.jpg"
            if not p.exists():
                save_q90(c.resize((w, h), Image.LANCZOS), p)
            small.append(p)
    for name, spots in (("retina.jpg", [(0.5, 0.5), (0.2, 0.8)]),
                        ("hubble_deep_field.jpg", [(0.0, 0.0), (1.0, 1.0)])):
        for i, (fx, fy) in enumerate(spots):
            p = small_dir / f"{name.rsplit('.', 1)[0]}_crop{i}_500x375.jpg"
            if not p.exists():
                save_q90(crop_at(photos[name], 500, 375, fx, fy), p)
            small.append(p)
    large: list[Path] = []
    for name, sizes in (("retina.jpg", [(1024, 768, 0.5, 0.5), (768, 1024, 0.5, 0.5),
                                        (1024, 768, 0.0, 1.0), (1411, 1058, 0.5, 0.5)]),
                        ("hubble_deep_field.jpg", [(1000, 750, 0.5, 0.5), (654, 872, 0.5, 0.5),
                                                   (1000, 872, 0.0, 0.0)])):
        for (w, h, fx, fy) in sizes:
            p = large_dir / f"{name.rsplit('.', 1)[0]}_{w}x{h}_{fx}_{fy}.jpg"
            if not p.exists():
                save_q90(crop_at(photos[name], w, h, fx, fy), p)
            large.append(p)
    return small, large


def run_json(cmd: list[str]) -> dict:
    env = dict(os.environ, **SINGLE_THREAD_ENV)
    # Through a small shell that forks (not execs) the command: Linux carries ru_maxrss across
    # execve, so a benchmark started straight from this (larger) Python process would report
    # this process's peak RSS as its own floor.
    r = subprocess.run(["sh", "-c", '"$@"; exit $?', "sh", *cmd], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=20, help="timed passes per process")
    ap.add_argument("--rounds", type=int, default=3, help="runs per row; the best is kept")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "codeclm")
    a = ap.parse_args()

    if not a.bin.exists():
        subprocess.run(["cargo", "build", "--release"], cwd=ROOT, check=True)
    small, large = prepare_inputs(a.out)
    py, pil = sys.executable, str(ROOT / "tools" / "bench_pillow.py")
    rs = [str(a.bin), "bench", "images"]
    rep = ["--repeat", str(a.repeat)]

    # (set, label, command, label of the Pillow row it is compared with)
    rows: list[tuple[str, str, list[str], str | None]] = []
    for set_name, files in (("500x375", small), ("1024x768", large)):
        f = [str(p) for p in files]
        P = lambda s: f"{set_name}: {s}"  # noqa: E731
        rows += [
            (set_name, P("Pillow LANCZOS"), [py, pil, *rep, *f], None),
            (set_name, P("Pillow LANCZOS + draft"), [py, pil, *rep, "--draft", *f], None),
            (set_name, P("Pillow BILINEAR (paper)"), [py, pil, *rep, "--resample", "bilinear", *f], None),
            (set_name, P("codeclm default (DCT scaling, Lanczos3)"), [*rs, *rep, *f],
             P("Pillow LANCZOS + draft")),
            (set_name, P("codeclm default --no-dct-scaling"), [*rs, *rep, "--no-dct-scaling", *f],
             P("Pillow LANCZOS")),
            (set_name, P("codeclm default, pillow-lanczos, no DCT scaling"),
             [*rs, *rep, "--resampler", "pillow-lanczos", "--no-dct-scaling", *f], P("Pillow LANCZOS")),
            (set_name, P("codeclm paper preset (exact Pillow BILINEAR)"),
             [*rs, *rep, "--preprocess", "paper", *f], P("Pillow BILINEAR (paper)")),
        ]
        if set_name == "500x375":
            rows += [
                (set_name, P("Pillow encode only"), [py, pil, *rep, "--encode-only", *f], None),
                (set_name, P("codeclm encode only (floor)"), [*rs, *rep, "--encode-only", *f],
                 P("Pillow encode only")),
            ]

    load_before = os.getloadavg()
    best: dict[str, dict] = {}
    t0 = time.time()
    for rnd in range(a.rounds):
        for _, label, cmd, _ in rows:
            r = run_json(cmd)
            print(f"[round {rnd + 1}] {label}: {r['images_per_s']} images/s, "
                  f"{r['peak_rss_mb']} MB", file=sys.stderr)
            if label not in best or r["images_per_s"] > best[label]["images_per_s"]:
                best[label] = r
    load_after = os.getloadavg()

    lines = [
        f"Single-threaded (1 process, 1 thread each), best of {a.rounds} run(s), "
        f"{a.repeat} timed passes after 1 warm-up; {len(small)} files 500x375-class, "
        f"{len(large)} files 1024x768-class (q90 4:2:0 from tests/fixtures/images). "
        f"Output: 256x256 q25 4:2:0 restart 1, abbreviated. "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"loadavg before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
        f"{time.time() - t0:.0f} s. Pillow {Image.__version__}.",
        "",
        "| config | images/s per core | peak RSS MB | ratio vs Pillow |",
        "|---|---:|---:|---|",
    ]
    for _, label, _, ref in rows:
        r = best[label]
        ratio = ""
        if ref:
            ratio = f"{r['images_per_s'] / best[ref]['images_per_s']:.2f}x vs {ref.split(': ', 1)[1]}"
        lines.append(f"| {label} | {r['images_per_s']:.1f} | {r['peak_rss_mb']:.1f} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    raw = "\n".join(json.dumps(best[label]) for _, label, _, _ in rows)
    (a.out / "compare.md").write_text(table + "\n\nRaw JSON (best run per row):\n\n```\n" + raw + "\n```\n")
    print(f"\nwritten to {a.out / 'compare.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
