#!/usr/bin/env python3
"""codeclm vs the ffmpeg CLI: videos/s per core and peak RSS, same clips, same run.

    python3 tools/bench_video.py [--repeat N] [--rounds R] [--bin PATH] [CLIP ...]

Clips default to the real ones in tests/fixtures/videos/ (bikes, carphone and the derived
edge cases). Both sides run pinned to one core (taskset), one process at a time:
  - ffmpeg: the paper's command (Jpeg-LM, Appendix D), one process per clip, as a data pipeline
    that shells out would run it; the whole loop is timed, peak RSS is the largest of the runs.
  - codeclm: `codeclm bench videos` (one thread, clips read into memory first, one warm-up
    pass, then --repeat timed passes).
With --rounds R every side runs R times interleaved and its best run is kept (shared machine).
Prints clips/s per core, peak RSS and the ratio. (Both write the same bytes: tests/it/video.rs.)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIPS = ROOT / "tests" / "fixtures" / "videos"
VF = "fps=3,scale=256:144:force_original_aspect_ratio=decrease,pad=256:144:(ow-iw)/2:(oh-ih)/2"
X264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-profile:v", "baseline", "-qp", "37",
        "-bf", "0", "-an", "-sn", "-x264opts", "slice-max-mbs=1", "-trellis", "0",
        "-me_method", "dia", "-threads", "1", "-subq", "0", "-psy", "0", "-mixed-refs", "0",
        "-fast-pskip", "0", "-partitions", "none", "-refs", "3", "-bsf:v", "h264_mp4toannexb"]


def pin() -> list[str]:
    return ["taskset", "-c", "0"] if shutil.which("taskset") else []


def ffmpeg_cmd(clip: Path, out: Path) -> list[str]:
    # -threads 1 before -i: a single-threaded decoder too (the x264 side already has it).
    return pin() + ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-threads", "1",
                    "-filter_threads", "1", "-i", str(clip), "-vf", VF, "-t", "5", *X264, str(out)]


def run_ffmpeg(clips: list[Path], repeat: int, tmp: Path) -> dict:
    peak_kb = 0
    start = time.perf_counter()
    for _ in range(repeat):
        for i, clip in enumerate(clips):
            cmd = ffmpeg_cmd(clip, tmp / f"{i}.h264")
            p = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], check=True,
                               capture_output=True, text=True)
            peak_kb = max(peak_kb, int(p.stderr.strip().splitlines()[-1]))
    seconds = time.perf_counter() - start
    n = len(clips) * repeat
    return {"tool": "ffmpeg CLI (one process per clip)", "clips_per_second": n / seconds,
            "seconds": seconds, "peak_rss_mb": peak_kb / 1024}


def run_codeclm(binary: Path, clips: list[Path], repeat: int) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    cmd = pin() + ["/usr/bin/time", "-v", str(binary), "bench", "videos", "--repeat", str(repeat),
                   *map(str, clips)]
    p = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    line = json.loads(p.stdout.strip().splitlines()[-1])
    for l in p.stderr.splitlines():
        if "Maximum resident set size" in l:
            line["peak_rss_mb"] = int(l.split(":")[1]) / 1024
    line["tool"] = "codeclm in-process (rsmpeg)"
    return line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "codeclm")
    ap.add_argument("clips", nargs="*", type=Path)
    a = ap.parse_args()
    clips = a.clips or sorted(p for p in CLIPS.iterdir() if p.suffix != ".md")
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        best_ff, best_us = None, None
        for _ in range(a.rounds):
            ff = run_ffmpeg(clips, a.repeat, tmp)
            us = run_codeclm(a.bin, clips, a.repeat)
            if best_ff is None or ff["clips_per_second"] > best_ff["clips_per_second"]:
                best_ff = ff
            if best_us is None or us["clips_per_second"] > best_us["clips_per_second"]:
                best_us = us
    ratio = best_us["clips_per_second"] / best_ff["clips_per_second"]
    print(f"{len(clips)} clips x {a.repeat} passes, one core each (best of {a.rounds} rounds)")
    print("| pipeline | clips/s per core | peak RSS MB |")
    print("|---|---|---|")
    for r in (best_ff, best_us):
        print(f"| {r['tool']} | {r['clips_per_second']:.2f} | {r['peak_rss_mb']:.1f} |")
    print(f"ratio codeclm / ffmpeg CLI: {ratio:.2f}x")
    json.dump({"ffmpeg": best_ff, "codeclm": best_us, "ratio": ratio}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
