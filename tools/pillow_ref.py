#!/usr/bin/env python3
"""Pillow reference for the image pipeline: the bytes the Rust side must reproduce exactly.

    python3 tools/pillow_ref.py --out DIR [--preprocess none|paper] [--resample bilinear|lanczos]
        [--size 256] [--quality 25] [--subsampling 4:2:0] [--restart-interval 1] FILE...

Writes, for each FILE:
    DIR/<stem>.jpg        full interchange JPEG          (Pillow streamtype=0)
    DIR/<stem>.abbr.jpg   abbreviated stream, no tables  (Pillow streamtype=2, the paper's format)
and once:
    DIR/tables.jpg        tables-only stream             (Pillow streamtype=1)
all saved with quality=Q, subsampling=S, restart_marker_blocks=R. Prints one JSON line per file
on stdout: {"file", "width", "height", "bytes", "abbr_bytes", "src_width", "src_height", "src_mode"}
where width/height are the encoded size and bytes is the size of the full .jpg.

--preprocess none   Image.open(f).convert("RGB"), no resize; exits with an error if the image is
                    not size x size.
--preprocess paper  the authors' code (xhan77/jpeg-lm, run.py): Image.open(p).convert('RGB'), then
                    torchvision RandomResizedCrop((S,S), scale=(1.0,1.0), ratio=(1.0,1.0)),
                    emulated here (torchvision is not installed; see paper_crop_box()).

Exit status: 0 if every file was written, 1 if any failed (the others are still written; the
failure is reported on stderr and as {"file":..., "error":...} on stdout).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path

from PIL import Image

RESAMPLE = {"bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}


def paper_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The crop torchvision's RandomResizedCrop.get_params picks with scale=(1,1), ratio=(1,1).

    get_params tries 10 times: target_area = W*H * uniform(1,1) = W*H, aspect = exp(uniform(0,0))
    = 1, w = h = int(round(sqrt(W*H))); it accepts if 0 < w <= W and 0 < h <= H, taking
    top = randint(0, H-h), left = randint(0, W-w). Otherwise it falls back to the "central crop":
    in_ratio = W/H < 1 -> w = W, h = round(w/1); > 1 -> h = H, w = round(h*1); == 1 -> w=W, h=H;
    top = (H-h)//2, left = (W-w)//2. So:
      * W == H: accepted with side W and the only possible offset 0 -> the whole image;
      * |W-H| >= 2: round(sqrt(W*H)) > min(W,H), every try is rejected -> centred square of
        side min(W,H) with top=(H-side)//2, left=(W-side)//2;
      * |W-H| == 1: round(sqrt(m*(m+1))) == m is accepted, and torchvision draws the offset
        along the long side at RANDOM from {0, 1}. We use 0 (== (W-side)//2, the centre
        formula); the paper's code would match this only half the time.
    Then F.resized_crop does img.crop((left, top, left+w, top+h)) and then
    img.resize((S, S), interpolation) with Pillow (antialias is implicit for PIL images);
    torchvision's default interpolation is BILINEAR.
    """
    side = min(width, height)
    if abs(width - height) <= 1:
        # accepted on the first try; offset 0 (see above)
        side_try = int(round(math.sqrt(width * height)))
        assert side_try == side, (width, height, side_try)
        return (0, 0, side, side)
    top = (height - side) // 2
    left = (width - side) // 2
    return (left, top, left + side, top + side)


def preprocess(path: Path, mode: str, size: int, resample: int) -> tuple[Image.Image, Image.Image]:
    src = Image.open(path)
    img = src.convert("RGB")
    if mode == "none":
        if img.size != (size, size):
            raise ValueError(f"{path}: is {img.size[0]}x{img.size[1]}, --preprocess none needs "
                             f"{size}x{size}")
    else:
        img = img.crop(paper_crop_box(*img.size))
        img = img.resize((size, size), resample)
    return src, img


def encode(img: Image.Image, streamtype: int, a: argparse.Namespace) -> bytes:
    # Save from a FRESH image: Pillow copies im.info["comment"] of a source JPEG into the output
    # as a COM marker (and a few other keys could leak); frombytes() carries no info at all.
    clean = Image.frombytes("RGB", img.size, img.tobytes())
    buf = io.BytesIO()
    clean.save(buf, format="JPEG", quality=a.quality, subsampling=a.subsampling,
               restart_marker_blocks=a.restart_interval, streamtype=streamtype)
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--preprocess", choices=["none", "paper"], default="paper")
    ap.add_argument("--resample", choices=list(RESAMPLE), default="bilinear")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--quality", type=int, default=25)
    ap.add_argument("--subsampling", default="4:2:0", choices=["4:4:4", "4:2:2", "4:2:0"])
    ap.add_argument("--restart-interval", type=int, default=1,
                    help="restart marker every N MCUs (Pillow restart_marker_blocks; 0 = none)")
    ap.add_argument("files", nargs="+", type=Path)
    a = ap.parse_args()

    a.out.mkdir(parents=True, exist_ok=True)
    stems: dict[str, Path] = {}
    for f in a.files:
        if f.stem in stems or f.stem == "tables":
            ap.error(f"output name clash: {f} and {stems.get(f.stem, 'tables.jpg')} -> {f.stem}.jpg")
        stems[f.stem] = f

    failed = 0
    tables_written = False
    for f in a.files:
        try:
            src, img = preprocess(f, a.preprocess, a.size, RESAMPLE[a.resample])
            full = encode(img, 0, a)
            abbr = encode(img, 2, a)
            (a.out / f"{f.stem}.jpg").write_bytes(full)
            (a.out / f"{f.stem}.abbr.jpg").write_bytes(abbr)
            if not tables_written:
                # The tables depend only on quality (and component count, always 3 here).
                (a.out / "tables.jpg").write_bytes(encode(img, 1, a))
                tables_written = True
            print(json.dumps({"file": str(f), "width": img.size[0], "height": img.size[1],
                              "bytes": len(full), "abbr_bytes": len(abbr),
                              "src_width": src.size[0], "src_height": src.size[1],
                              "src_mode": src.mode}), flush=True)
        except Exception as e:  # noqa: BLE001 - report and continue with the next file
            failed += 1
            print(f"pillow_ref: {f}: {type(e).__name__}: {e}", file=sys.stderr)
            print(json.dumps({"file": str(f), "error": f"{type(e).__name__}: {e}"}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
