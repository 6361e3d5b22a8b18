#!/usr/bin/env python3
"""Run `codeclm dataset build` over a mutation corpus (tools/fuzz_corpus.py) and check it.

    python3 tools/fuzz_corpus_report.py --corpus target/fuzz-corpus [--bin target/release/codeclm]
        [--timeout 1800] [--deadline 10] [-- extra dataset build flags, e.g. --item-timeout 10]

Builds CORPUS/images + CORPUS/videos into CORPUS/dataset (removed first) under an overall
wall-clock timeout, then checks:

- exit: the build exited 0 (a native crash, an abort or an OOM kill fails it; the signal and
  the stderr tail are reported);
- timeout: it finished within --timeout seconds (else it is killed: a hang);
- rows: exactly one manifest row per corpus file (samples.parquet, or the finished parts when
  the build died), none missing, none extra;
- deadline: no item took longer than --deadline seconds (the run summary's `slowest` list;
  skipped, and said so, when the build does not write one);
- crashed / panicked: no row with status `crashed` and no row whose error is the build's
  "internal error" (a Rust panic caught around one input).

Reports counts by status overall and per mutation family, the slowest items, and writes
CORPUS/report.json and CORPUS/report.md. Exits 1 when a check fails, 2 on a usage error.
The binary: --bin, else $CODECLM, else target/release/codeclm.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PANIC = "internal error while processing"


def run_build(cmd: list[str], timeout: float, log_dir: Path) -> dict:
    """Runs cmd in its own process group with stdout/stderr to files; kills the group
    (SIGTERM, then SIGKILL after 10 s) past the timeout."""
    out_path, err_path = log_dir / "build.stdout", log_dir / "build.stderr"
    t0 = time.monotonic()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
    seconds = time.monotonic() - t0
    rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    rc = proc.returncode
    signame = None
    if rc is not None and rc < 0:
        try:
            signame = signal.Signals(-rc).name
        except ValueError:
            signame = f"signal {-rc}"
    return {"cmd": cmd, "returncode": rc, "signal": signame, "timed_out": timed_out,
            "seconds": round(seconds, 2), "max_rss_mib": round(rss_mib, 1),
            "stdout": str(out_path), "stderr": str(err_path),
            "stderr_tail": tail(err_path, 40)}


def tail(path: Path, lines: int) -> str:
    """The last lines of a log, without terminal colour codes."""
    try:
        data = path.read_bytes()[-64_000:]
    except OSError:
        return ""
    text = re.sub(r"\x1b\[[0-9;]*m", "", data.decode("utf-8", "replace"))
    return "\n".join(text.splitlines()[-lines:])


def bisect(files: list[str], corpus: Path, binary: str, build_args: list[str], work: Path,
           max_runs: int, log) -> list[dict]:
    """Finds the inputs that kill or hang the build on their own: builds halves of `files` (a
    list source per tree) until each failing set is one file. Returns one dict per culprit."""
    culprits: list[dict] = []
    runs = 0
    stack = [sorted(files)]
    while stack and runs < max_runs:
        group = stack.pop()
        runs += 1
        d = work / f"bisect-{runs:04d}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        cmd = [binary, "dataset", "build", "--out", str(d / "dataset"), "--no-progress",
               "--workers", "1"]
        budget = 30.0
        for tree, flag in (("images", "--images"), ("videos", "--videos")):
            mine = [f for f in group if f.startswith(tree + "/")]
            if mine:
                lst = d / f"{tree}.list"
                lst.write_text("".join(str((corpus / f).resolve()) + "\n" for f in mine))
                cmd += [flag, str(lst)]
                budget += len(mine) * (0.05 if tree == "images" else 0.5)
        res = run_build(cmd + build_args, budget, d)
        bad = res["returncode"] != 0 or res["timed_out"]
        log(f"bisect run {runs}: {len(group)} files -> "
            f"{'timeout' if res['timed_out'] else 'exit ' + str(res['returncode'])}")
        if not bad:
            shutil.rmtree(d, ignore_errors=True)
            continue
        if len(group) == 1:
            f = group[0]
            tree = f.split("/", 1)[0]
            culprits.append({"file": f, "how": "hang (killed at %.0f s)" % budget if res["timed_out"]
                             else f"exit {res['returncode']}" + (f" ({res['signal']})" if res["signal"] else ""),
                             "stderr_tail": tail(Path(res["stderr"]), 15),
                             "repro": f"rm -rf /tmp/one-out; echo {(corpus / f).resolve()} > /tmp/one.list && {binary} dataset build "
                                      f"--{tree} /tmp/one.list --out /tmp/one-out --workers 1"})
            continue
        shutil.rmtree(d, ignore_errors=True)
        mid = len(group) // 2
        stack += [group[mid:], group[:mid]]
    if stack:
        log(f"bisect stopped after {max_runs} runs with {sum(map(len, stack))} files untested")
    return culprits


def read_manifest(dataset: Path):
    """(frame, where from): samples.parquet, else the finished parts (a build that died)."""
    import polars as pl
    main = dataset / "samples.parquet"
    if main.exists():
        return pl.read_parquet(main), "samples.parquet"
    parts = sorted((dataset / "parts").glob("part-*.parquet")) if (dataset / "parts").exists() else []
    if parts:
        return pl.concat([pl.read_parquet(p) for p in parts], how="diagonal_relaxed"), \
            f"{len(parts)} finished parts (no samples.parquet)"
    return None, "no manifest (no samples.parquet, no finished parts)"


def run_summary(dataset: Path) -> dict | None:
    runs = sorted((dataset / "runs").glob("run-*.json")) if (dataset / "runs").exists() else []
    if not runs:
        return None
    return json.loads(runs[-1].read_text())


def deadline_from(build_args: list[str]) -> float | None:
    for i, a in enumerate(build_args):
        if a == "--item-timeout" and i + 1 < len(build_args):
            return float(build_args[i + 1])
        if a.startswith("--item-timeout="):
            return float(a.split("=", 1)[1])
    return None


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def main() -> int:
    argv = sys.argv[1:]
    build_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, build_args = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, required=True, help="folder tools/fuzz_corpus.py wrote")
    ap.add_argument("--bin", default=os.environ.get("CODECLM", str(ROOT / "target/release/codeclm")))
    ap.add_argument("--timeout", type=float, default=1800, help="overall wall-clock limit, s")
    ap.add_argument("--deadline", type=float, default=None,
                    help="per-item limit, s (default: the --item-timeout passed through, else 10) "
                         "plus --slack")
    ap.add_argument("--slack", type=float, default=3.0,
                    help="seconds an item may run past the deadline (stopping takes time: the "
                         "build kills a worker still busy max(2 s, 10%%) past --item-timeout)")
    ap.add_argument("--part-size", type=int, default=1000,
                    help="dataset build --part-size: finished parts survive a build that dies")
    ap.add_argument("--slowest", type=int, default=20, help="slowest items to list")
    ap.add_argument("--keep", action="store_true", help="resume CORPUS/dataset instead of removing it")
    ap.add_argument("--bisect", type=int, default=0, metavar="RUNS",
                    help="when the build dies or hangs, find the files that do it alone by "
                         "bisecting the files without a row (at most RUNS builds)")
    args = ap.parse_args(argv)

    corpus = args.corpus
    meta_path = corpus / "corpus.json"
    if not meta_path.exists():
        print(f"{meta_path} not found: run tools/fuzz_corpus.py --out {corpus} first", file=sys.stderr)
        return 2
    if not Path(args.bin).exists():
        print(f"{args.bin} not found: build it (cargo build --release) or pass --bin/CODECLM", file=sys.stderr)
        return 2
    meta = json.loads(meta_path.read_text())
    files = meta["files"]
    dataset = corpus / "dataset"
    if dataset.exists() and not args.keep:
        shutil.rmtree(dataset)
    cmd = [args.bin, "dataset", "build", "--out", str(dataset), "--no-progress",
           "--part-size", str(args.part_size)]
    for tree, flag in (("images", "--images"), ("videos", "--videos")):
        if (corpus / tree).is_dir():
            cmd += [flag, str(corpus / tree)]
    cmd += build_args
    print("running:", " ".join(cmd), flush=True)
    build = run_build(cmd, args.timeout, corpus)
    print(f"build: {build['seconds']:.1f} s, exit {build['returncode']}"
          f"{' (' + build['signal'] + ')' if build['signal'] else ''}"
          f"{' (killed at the timeout)' if build['timed_out'] else ''}", flush=True)

    checks: dict[str, dict] = {}
    checks["exit"] = {"ok": build["returncode"] == 0 and not build["timed_out"],
                      "detail": "exit 0" if build["returncode"] == 0 else
                      f"exit {build['returncode']}" + (f" ({build['signal']})" if build["signal"] else "")}
    checks["timeout"] = {"ok": not build["timed_out"],
                         "detail": f"{build['seconds']:.1f} s of at most {args.timeout:.0f} s"}

    df, manifest_from = read_manifest(dataset)
    by_file: dict[str, dict] = {}
    extra: list[str] = []
    duplicated: list[str] = []
    if df is not None:
        mod_tree = {"image": "images", "video": "videos"}
        for row in df.select(["source", "modality", "status", "error"]).iter_rows(named=True):
            key = f"{mod_tree.get(row['modality'], row['modality'])}/{row['source']}"
            if key not in files:
                extra.append(key)
            elif key in by_file:
                duplicated.append(key)
            else:
                by_file[key] = row
    missing = sorted(k for k in files if k not in by_file)
    checks["rows"] = {"ok": df is not None and not missing and not extra and not duplicated,
                      "detail": f"{len(by_file)} of {len(files)} files have a row ({manifest_from}); "
                                f"{len(missing)} missing, {len(extra)} extra, {len(duplicated)} duplicated",
                      "missing_sample": missing[:20], "extra_sample": extra[:20],
                      "duplicated_sample": duplicated[:20]}

    # counts by status, overall and per family (a file without a row counts as "no_row")
    statuses: dict[str, int] = {}
    fam: dict[str, dict[str, int]] = {}
    for key, info in files.items():
        st = by_file[key]["status"] if key in by_file else "no_row"
        f = f"{info['tree']}/{info['family']}"
        statuses[st] = statuses.get(st, 0) + 1
        fam.setdefault(f, {})
        fam[f][st] = fam[f].get(st, 0) + 1

    crashed = sorted(k for k, r in by_file.items() if r["status"] == "crashed")
    panicked = sorted(k for k, r in by_file.items() if PANIC in (r["error"] or ""))
    checks["crashed"] = {"ok": not crashed, "detail": f"{len(crashed)} rows with status crashed",
                         "files": crashed[:50]}
    checks["panicked"] = {"ok": not panicked,
                          "detail": f"{len(panicked)} rows with a caught panic ('{PANIC}')",
                          "files": panicked[:50]}

    summary = run_summary(dataset)
    slowest = summary.get("slowest") if summary else None
    deadline = args.deadline if args.deadline is not None else (deadline_from(build_args) or 10.0)
    if slowest is None:
        checks["deadline"] = {"ok": None, "detail": "skipped: the run summary has no `slowest` list "
                              "(this build does not time items)" if summary else
                              "skipped: no run summary (the build did not finish)"}
    else:
        late = [s for s in slowest if s.get("seconds", 0) > deadline + args.slack]
        checks["deadline"] = {"ok": not late, "detail": f"{len(late)} items past {deadline:g} s "
                              f"(+{args.slack:g} s slack)", "late": late[:20]}

    culprits = None
    if args.bisect and (build["returncode"] != 0 or build["timed_out"]) and missing:
        print(f"bisecting {len(missing)} files without a row", flush=True)
        culprits = bisect(missing, corpus, args.bin, build_args, corpus / "bisect", args.bisect,
                          lambda m: print(m, flush=True))
        checks["culprits"] = {"ok": not culprits, "detail": f"{len(culprits)} files kill or hang "
                              "the build on their own", "files": [c["file"] for c in culprits]}

    failed = [k for k, v in checks.items() if v["ok"] is False]
    report = {"corpus": str(corpus), "files": len(files), "by_tree": meta.get("by_tree"),
              "generation_seconds": meta.get("generation_seconds"), "build": build,
              "manifest": manifest_from, "checks": checks, "failed": failed,
              "by_status": dict(sorted(statuses.items(), key=lambda kv: -kv[1])),
              "by_family": {k: dict(sorted(v.items())) for k, v in sorted(fam.items())},
              "slowest": (slowest or [])[:args.slowest], "culprits": culprits,
              "run_summary": {k: v for k, v in (summary or {}).items() if k != "slowest"}}
    (corpus / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    md = render_md(report, args, deadline)
    (corpus / "report.md").write_text(md)
    print(md)
    print(f"wrote {corpus / 'report.md'} and {corpus / 'report.json'}")
    return 1 if failed else 0


def render_md(r: dict, args, deadline: float) -> str:
    b = r["build"]
    lines = ["# Mutation corpus through `dataset build`", "",
             f"{r['files']} files ({r['by_tree']}), generated in {r['generation_seconds']} s. "
             f"Build: {b['seconds']:.1f} s wall, peak RSS {b['max_rss_mib']:.0f} MiB, exit {b['returncode']}"
             + (f" ({b['signal']})" if b["signal"] else "")
             + (" — killed at the timeout" if b["timed_out"] else "") + ".", "",
             "`" + " ".join(str(c) for c in b["cmd"]) + "`", "", "## Checks", ""]
    lines.append(md_table(["check", "result", "detail"],
                          [[k, {True: "pass", False: "**FAIL**", None: "skipped"}[v["ok"]], v["detail"]]
                           for k, v in r["checks"].items()]))
    for k in ("crashed", "panicked"):
        if r["checks"][k].get("files"):
            lines += ["", f"{k}:", ""] + [f"- `{f}`" for f in r["checks"][k]["files"]]
    if r["checks"]["rows"]["missing_sample"]:
        lines += ["", "Files without a row (first 20):", ""] + \
                 [f"- `{f}`" for f in r["checks"]["rows"]["missing_sample"]]
    if b["returncode"] != 0 or b["timed_out"]:
        lines += ["", "stderr (last lines):", "", "```", b["stderr_tail"], "```"]
    if r.get("culprits"):
        lines += ["", "## Files that kill or hang the build on their own", ""]
        for c in r["culprits"]:
            lines += [f"- `{c['file']}`: {c['how']}; repro: `{c['repro']}`", "",
                      "  ```", *("  " + x for x in c["stderr_tail"].splitlines()), "  ```"]
    lines += ["", "## Counts by status", "",
              md_table(["status", "files"], [[k, v] for k, v in r["by_status"].items()])]
    cols = sorted({s for v in r["by_family"].values() for s in v},
                  key=lambda s: -r["by_status"].get(s, 0))
    rows = [[f, sum(v.values())] + [v.get(c, "") for c in cols] for f, v in r["by_family"].items()]
    lines += ["", "## By mutation family", "", md_table(["family", "files"] + cols, rows)]
    lines += ["", "## Slowest items", ""]
    if r["slowest"]:
        lines.append(md_table(["source", "seconds", "status"],
                              [[f"`{s.get('source')}`", s.get("seconds"), s.get("status")]
                               for s in r["slowest"]]))
    else:
        lines.append("Not available: " + r["checks"]["deadline"]["detail"] + ".")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
