#!/usr/bin/env bash
# One short, prepared check of codeclm on a GPU machine that has the NVIDIA driver and the CUDA 13
# libraries (e.g. in PyTorch's wheels) but no Rust toolchain and no network.
#
# On the build machine (CPU only):
#   make build dataset FEATURES=           # target/release/codeclm (no MPI: the GPU machine has none), data/
#   tools/gpu_check.sh --bundle            # .gpu-bundle/: stripped binary + data/ (< 64 MiB)
# On the GPU machine, from the repository root, with .gpu-bundle/ carried over:
#   OUT=/some/dir tools/gpu_check.sh       # everything lands in $OUT (default gpu-check-out/)
# Dry run on a CPU machine: GPU_CHECK_CPU=1 GPU_CHECK_BIN=target/release/codeclm runs every step
# on the CPU with the tiny preset.
#
# The engine's CUDA backend (engine/src/cuda/) is compiled but had never run on a GPU when this
# was written: this script is its first check. Steps (~4 min on an H200; at most ~7 with every
# time limit hit):
#   0. `codeclm bench kernels --device cuda`: every kernel against the CPU backend on the same
#      random inputs (f32, tolerance 1e-4 of each output's largest magnitude);
#   1. `codeclm bench train --device cuda`: synthetic batches, no data loading: tokens/s and MFU
#      (bf16 matmuls through cuBLASLt, then f32 cuBLAS), and PyTorch on the same GPU, model and batch when
#      transformers is installed (LlamaForCausalLM, bf16 autocast, SDPA);
#   2. 200 steps of `codeclm train` (tiny, f32) on the bundled dataset on the GPU and on the CPU
#      from the same seed: the loss curves compared (tolerance 2e-2 per step);
#   2b. NCCL with one rank: 20 tiny steps with --dist nccl give the losses and weights of
#      --dist none, and `bench allreduce` times the average of PRESET's gradient buffer;
#   3. `codeclm train --device cuda` with PRESET for as many steps as step 1's speed fits in
#      GPU_CHECK_SECONDS (real loader, validation, checkpoint), then `codeclm bench sample
#      --device cuda` from it against transformers' `generate` on the same checkpoint.
# The FID network also runs on the CUDA backend (`eval fid`, `bench fid`); its weights (81 MB) are not bundled.
# Knobs: GPU_CHECK_PRESET (base), GPU_CHECK_BATCH (16), GPU_CHECK_CONTEXT (1024),
# GPU_CHECK_SECONDS (75), GPU_PEAK_TFLOPS (989: H100/H200 bf16 dense).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUNDLE=${GPU_BUNDLE:-$ROOT/.gpu-bundle}

if [ "${1:-}" = "--bundle" ]; then
  # xz-compressed (the carry limit is 64 MiB): the stripped binary and the dataset.
  set -e
  BIN=${2:-$ROOT/target/release/codeclm}
  DATA=${DATA:-$ROOT/data}
  [ -x "$BIN" ] || { echo "gpu_check: no binary at $BIN; run 'make build FEATURES=' first" >&2; exit 1; }
  # The GPU machine has no Open MPI: carry a binary that does not link it.
  if ldd "$BIN" 2>/dev/null | grep -q libmpi; then
    echo "gpu_check: $BIN links libmpi (the mpi feature), which the GPU machine lacks; build one without: CARGO_TARGET_DIR=target/gpu make build FEATURES= && tools/gpu_check.sh --bundle target/gpu/release/codeclm" >&2
    exit 1
  fi
  [ -f "$DATA/dataset.json" ] || { echo "gpu_check: no dataset at $DATA; run 'make dataset' first" >&2; exit 1; }
  rm -rf "$BUNDLE.tmp"
  mkdir -p "$BUNDLE.tmp"
  strip -o "$BUNDLE.tmp/codeclm" "$BIN"
  xz -9 -T2 "$BUNDLE.tmp/codeclm"
  cp -r "$DATA" "$BUNDLE.tmp/data"
  rm -rf "$BUNDLE.tmp/data/runs" "$BUNDLE"
  mv "$BUNDLE.tmp" "$BUNDLE"
  ls -l "$BUNDLE"
  size=$(du -sm "$BUNDLE" | cut -f1)
  echo "gpu_check: bundle $BUNDLE: ${size} MiB (carry limit 64 MiB)"
  [ "$size" -le 63 ] || { echo "gpu_check: bundle too large to carry" >&2; exit 1; }
  exit 0
fi

OUT=${OUT:-$ROOT/gpu-check-out}
mkdir -p "$OUT"
LOG=$OUT/gpu-check.log
exec > >(tee -a "$LOG") 2>&1
echo "gpu_check: $(date -u +%FT%TZ) on $(hostname); log $LOG"

# Unpack the bundle's xz files (Python's lzma: no xz tool needed).
unxz_to() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$1" "$2"; }
UNPACK=$(mktemp -d "${TMPDIR:-/tmp}/codeclm-gpu-check.XXXXXX")  # not under $OUT: that comes back
mkdir -p "$UNPACK/bin" "$UNPACK/lib"
trap 'rm -rf "$UNPACK"' EXIT
if [ -z "${GPU_CHECK_BIN:-}" ] && [ -f "$BUNDLE/codeclm.xz" ]; then
  unxz_to "$BUNDLE/codeclm.xz" "$UNPACK/bin/codeclm" && chmod +x "$UNPACK/bin/codeclm"
fi
BIN=${GPU_CHECK_BIN:-$UNPACK/bin/codeclm}
DATA=${GPU_CHECK_DATA:-$BUNDLE/data}
PRESET=${GPU_CHECK_PRESET:-base}
BATCH=${GPU_CHECK_BATCH:-16}
CONTEXT=${GPU_CHECK_CONTEXT:-1024}
SECS=${GPU_CHECK_SECONDS:-75}
PEAK=${GPU_PEAK_TFLOPS:-989}
DEV="--device cuda"
[ -x "$BIN" ] || { echo "gpu_check: no binary at $BIN (run 'tools/gpu_check.sh --bundle' on the build machine)"; exit 1; }
[ -f "$DATA/dataset.json" ] || { echo "gpu_check: no dataset at $DATA"; exit 1; }

# --- the CUDA libraries: find each one the binary misses among this machine's CUDA installs ---
lib_dirs() {
  if command -v python3 >/dev/null 2>&1; then
    python3 - <<'EOF' 2>/dev/null
import glob, os, site
roots = set(site.getsitepackages() + [site.getusersitepackages()])
try:
    import torch
    roots.add(os.path.dirname(os.path.dirname(torch.__file__)))
    print(os.path.join(os.path.dirname(torch.__file__), "lib"))
except Exception:
    pass
for r in sorted(roots):
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib")) + glob.glob(os.path.join(r, "nvidia", "*", "lib64"))):
        print(d)
EOF
  fi
  ls -d /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64 \
    /usr/local/cuda-13*/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu 2>/dev/null
}
missing() { ldd "$BIN" 2>/dev/null | awk '/not found/ {print $1}' | sort -u; }

# The CUDA backend opens NVRTC and cuBLAS at run time (no ldd entry): their directories too.
for so in libnvrtc.so.13 libcublas.so.13; do
  for d in $(lib_dirs); do
    if [ -e "$d/$so" ]; then
      case ":${LD_LIBRARY_PATH:-}:" in *":$d:"*) ;; *) export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ;; esac
      break
    fi
  done
done
# libnccl (the NCCL steps): PyTorch's nvidia-nccl wheel ships libnccl.so.2 only, and cudarc opens
# libnccl.so: link it under that name.
for d in $(lib_dirs); do
  if [ -e "$d/libnccl.so" ]; then
    case ":${LD_LIBRARY_PATH:-}:" in *":$d:"*) ;; *) export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ;; esac
    break
  elif [ -e "$d/libnccl.so.2" ]; then
    ln -sf "$d/libnccl.so.2" "$UNPACK/lib/libnccl.so"
    export LD_LIBRARY_PATH=$UNPACK/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    break
  fi
done
NEED=$(missing)
if [ -n "$NEED" ]; then
  DIRS=$(lib_dirs)
  extra=""
  for so in $NEED; do
    [ "$so" = libcuda.so.1 ] && continue  # the driver's own library; never from a toolkit dir
    found=""
    for d in $DIRS; do
      if [ -e "$d/$so" ]; then
        found=$d
        break
      fi
    done
    if [ -z "$found" ] && [ -f "$BUNDLE/$so.xz" ]; then
      echo "gpu_check: $so not on this machine; using the bundle's copy"
      unxz_to "$BUNDLE/$so.xz" "$UNPACK/lib/$so" && found=$UNPACK/lib
    fi
    [ -n "$found" ] && case ":$extra:" in *":$found:"*) ;; *) extra=${extra:+$extra:}$found ;; esac
  done
  export LD_LIBRARY_PATH=${extra}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
echo "gpu_check: LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && [ "${GPU_CHECK_CPU:-0}" != 1 ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader
elif [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
  echo "gpu_check: no CUDA device; GPU_CHECK_CPU=1: running every step on the CPU (tiny preset)"
  DEV="" PRESET=${GPU_CHECK_PRESET:-tiny} BATCH=${GPU_CHECK_BATCH:-4} CONTEXT=${GPU_CHECK_CONTEXT:-256} SECS=${GPU_CHECK_SECONDS:-20}
else
  echo "gpu_check: no CUDA device (nvidia-smi missing or it sees no GPU); nothing to check here"
  exit 0
fi
STILL=$(missing)
if [ -n "$STILL" ]; then
  echo "gpu_check: $BIN still misses: $STILL"
  echo "gpu_check: fix: put the CUDA 13 libcudart/libcublas/libcublasLt/libcurand (and the driver's libcuda.so.1) on LD_LIBRARY_PATH"
  exit 1
fi
VOCAB=$(ls "$DATA"/tokens-*.parquet 2>/dev/null | head -1 | sed 's/.*tokens-\(.*\)\.parquet/\1/')
echo "gpu_check: binary $BIN ($(du -m "$BIN" | cut -f1) MiB), preset $PRESET, batch $BATCH x context $CONTEXT, dataset $DATA (token set $VOCAB)"
fail=0

# compare_runs LABEL RUN_A RUN_B TOLERANCE WEIGHTS: the two runs' loss curves under $OUT, step by
# step within TOLERANCE (0: identical), and with WEIGHTS=1 their final weights byte for byte.
compare_runs() {
python3 - "$OUT" "$@" <<'EOF'
import json, struct, sys
out, label, ra, rb, tol, check_w = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]), sys.argv[6] == "1"
def losses(run):
    try:
        return [json.loads(l)["loss"] for l in open(f"{out}/{run}/metrics.jsonl") if '"loss"' in l]
    except OSError:
        return []
def weights(run):
    # The header parsed (its metadata's key order varies between writes) and the tensor bytes.
    try:
        b = open(f"{out}/{run}/model.safetensors", "rb").read()
    except OSError:
        return b""
    n = struct.unpack("<Q", b[:8])[0]
    return (json.loads(b[8:8 + n]), b[8 + n:])
a, b = losses(ra), losses(rb)
if not a or len(a) != len(b):
    print(f"{label}: missing curves ({len(a)} steps in {ra}, {len(b)} in {rb})")
    sys.exit(1)
d = [abs(x - y) for x, y in zip(a, b)]
worst = max(range(len(d)), key=d.__getitem__)
ok = max(d) <= tol
msg = (f"{label}: {len(d)} steps, loss {b[0]:.4f} -> {b[-1]:.4f} ({rb}) / {a[0]:.4f} -> {a[-1]:.4f} ({ra}); "
       f"max difference {max(d):.2e} at step {worst + 1}, first 10 steps max {max(d[:10]):.2e}")
if check_w:
    same = weights(ra) == weights(rb) and weights(ra) != b""
    ok = ok and same
    msg += f"; final weights {'identical' if same else 'DIFFER'}"
print(msg + f": {'ok' if ok else 'OFF'} (tolerance {tol:g})")
sys.exit(0 if ok else 1)
EOF
}

# --- 0. every kernel against the CPU backend --------------------------------------------------------
echo "gpu_check: [0/3] bench kernels"
# (The CPU dry run checks the CUDA kernels on the emulated device: kernels.cu built for the CPU.)
emu=CODECLM_CUDA_EMULATE=$([ -n "$DEV" ] && echo 0 || echo 1)
env "$emu" timeout 120 "$BIN" bench kernels --device cuda | tee "$OUT/kernels.jsonl"
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] || { echo "gpu_check: bench kernels: some kernel is off (exit $rc)"; fail=1; }

# --- 1. model speed on synthetic batches --------------------------------------------------------
echo "gpu_check: [1/3] bench train"
timeout 120 "$BIN" bench train --preset "$PRESET" --batch "$BATCH" --context "$CONTEXT" --steps 10 $DEV --json \
  | tee "$OUT/bench-train.json"
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] || { echo "gpu_check: bench train failed (exit $rc)"; fail=1; }
# The same in f32 (cuBLAS, no TF32): what the bf16 matmuls buy.
timeout 120 "$BIN" bench train --preset "$PRESET" --batch "$BATCH" --context "$CONTEXT" --steps 5 $DEV --precision f32 --json \
  | tee "$OUT/bench-train-f32.json"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu_check: bench train --precision f32 failed"; fail=1; }
if [ -n "$DEV" ] && python3 -c "import torch, transformers" 2>/dev/null; then
  timeout 150 python3 - "$OUT/bench-train.json" "$ROOT/tools" <<'EOF' | tee "$OUT/torch-train.json"
import json, sys, time
sys.path.insert(0, sys.argv[2])
import torch
import torch.nn.functional as F
from benchlib import torch_llama
b = json.loads([l for l in open(sys.argv[1]) if l.startswith("{")][-1])
cfg, bs, t = b["config"], b["batch"], b["context"]
model = torch_llama(cfg).cuda().train()
opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
v = cfg["vocab_size"]
def step():
    x = torch.randint(0, v, (bs, t + 1), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(input_ids=x[:, :-1]).logits
    F.cross_entropy(logits.float().reshape(-1, v), x[:, 1:].reshape(-1)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
for _ in range(3):
    step()
torch.cuda.synchronize()
t0, n = time.perf_counter(), 0
while n < 10 and time.perf_counter() - t0 < 60:
    step(); n += 1
torch.cuda.synchronize()
dt = time.perf_counter() - t0
print(json.dumps({"torch": torch.__version__, "steps": n, "tokens_per_s": n * bs * t / dt, "batch": bs, "context": t}))
EOF
else
  echo "gpu_check: PyTorch comparison skipped (CPU dry run, or no torch + transformers here)"
fi

# --- 2. 200 steps on the GPU and on the CPU from the same seed -----------------------------------
echo "gpu_check: [2/3] 200 tiny steps, f32, GPU and CPU, same seed"
rm -rf "$OUT/parity-gpu" "$OUT/parity-cpu"
common=(train --dataset "$DATA" --vocab "$VOCAB" --preset tiny --batch 4 --context 256 --steps 200 --eval-every 200 --save-every 200 --val-docs 8)
timeout 180 "$BIN" "${common[@]}" --out "$OUT/parity-gpu" $DEV --precision f32 > "$OUT/parity-gpu.log" 2>&1 || { echo "gpu_check: GPU parity run failed"; fail=1; }
timeout 180 "$BIN" "${common[@]}" --out "$OUT/parity-cpu" > "$OUT/parity-cpu.log" 2>&1 || { echo "gpu_check: CPU parity run failed"; fail=1; }
compare_runs parity parity-gpu parity-cpu 2e-2 0 | tee "$OUT/parity.txt"
[ "${PIPESTATUS[0]}" = 0 ] || fail=1

# --- NCCL with one rank: the same steps as without it, and the all-reduce cost of a step -------
echo "gpu_check: NCCL, world size 1: 20 tiny steps with --dist nccl and --dist none; bench allreduce ($PRESET)"
rm -rf "$OUT/nccl-on" "$OUT/nccl-off"
one=(train --dataset "$DATA" --vocab "$VOCAB" --preset tiny --batch 4 --context 256 --steps 20 --eval-every 20 --save-every 20 --val-docs 8)
timeout 90 "$BIN" "${one[@]}" --out "$OUT/nccl-on" --dist nccl $DEV > "$OUT/nccl-on.log" 2>&1 || { echo "gpu_check: --dist nccl run failed (tail of its log:)"; tail -5 "$OUT/nccl-on.log"; fail=1; }
timeout 90 "$BIN" "${one[@]}" --out "$OUT/nccl-off" --dist none $DEV > "$OUT/nccl-off.log" 2>&1 || { echo "gpu_check: --dist none run failed"; fail=1; }
compare_runs "nccl world 1" nccl-on nccl-off 0 1 | tee "$OUT/nccl-parity.txt"
[ "${PIPESTATUS[0]}" = 0 ] || fail=1
timeout 60 "$BIN" bench allreduce --preset "$PRESET" --dist nccl --iters 20 $DEV 2>&1 | tee "$OUT/allreduce.json"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "gpu_check: bench allreduce failed"; fail=1; }

# --- 2. a short real training run -----------------------------------------------------------------
# As many steps as fit in GPU_CHECK_SECONDS at step 1's speed, so the run ends normally
# (validation, checkpoint, loss curve); the timeout is only a safety net.
STEPS=$(python3 -c "import json,sys; b=json.loads([l for l in open(sys.argv[1]) if l.startswith('{')][-1]); print(max(20, min(5000, int(0.8*$SECS*b['tokens_per_s']/($BATCH*$CONTEXT)))))" \
  "$OUT/bench-train.json" 2>/dev/null || echo 50)
echo "gpu_check: [3/3] train $PRESET $STEPS steps (~${SECS}s)"
rm -rf "$OUT/run"
timeout --signal=INT --kill-after=20 $((SECS + 90)) "$BIN" train --dataset "$DATA" --vocab "$VOCAB" \
  --preset "$PRESET" --batch "$BATCH" --context "$CONTEXT" --steps "$STEPS" --eval-every "$STEPS" \
  --out "$OUT/run" $DEV 2>&1 | tee "$OUT/train.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] || { echo "gpu_check: train failed (exit $rc)"; fail=1; }

# --- sampling with the KV cache, and transformers' generate on the same run ---------------------
if [ -f "$OUT/run/model.safetensors" ]; then
  echo "gpu_check: bench sample from $OUT/run"
  timeout 60 "$BIN" bench sample --run "$OUT/run" --batch 16 --max-tokens 256 $DEV --json | tee "$OUT/bench-sample.json"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "gpu_check: bench sample failed (exit $rc)"; fail=1; }
  if [ -n "$DEV" ] && python3 -c "import torch, transformers" 2>/dev/null; then
    timeout 120 python3 - "$OUT/run" <<'EOF' | tee "$OUT/torch-generate.json"
import json, sys, time
import torch
from transformers import LlamaForCausalLM
m = LlamaForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).cuda().eval()
bos = m.config.bos_token_id or 0
x = torch.full((16, 1), bos, device="cuda")
kw = dict(do_sample=True, top_k=50, top_p=0.9, max_new_tokens=256, min_new_tokens=256, pad_token_id=m.config.pad_token_id)
m.generate(x, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})
torch.cuda.synchronize()
t0 = time.perf_counter()
out = m.generate(x, **kw)
torch.cuda.synchronize()
n = (out.shape[1] - 1) * out.shape[0]
print(json.dumps({"torch": torch.__version__, "batch": 16, "max_tokens": 256, "tokens_per_s": n / (time.perf_counter() - t0)}))
EOF
  fi
else
  echo "gpu_check: bench sample skipped (no checkpoint in $OUT/run)"
fi

# --- summary --------------------------------------------------------------------------------------
python3 - "$OUT" "$PEAK" <<'EOF' | tee "$OUT/summary.txt"
import json, re, sys, os
out, peak = sys.argv[1], float(sys.argv[2])
def last_json(path):
    try:
        lines = [l for l in open(path) if l.strip().startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except OSError:
        return None
b = last_json(os.path.join(out, "bench-train.json"))
if b:
    c, t = b["config"], b["context"]
    n = b.get("parameters")
    flops = 6 * n + 12 * c["num_hidden_layers"] * t * c["hidden_size"]
    tps = b["tokens_per_s"]
    print(f"bench train ({b['backend']}): {b['preset']} ({n/1e6:.1f}M params), batch {b['batch']} x {t}: {tps:,.0f} tokens/s, "
          f"MFU {flops * tps / (peak * 1e12) * 100:.1f}% of {peak:g} TFLOP/s")
    f = last_json(os.path.join(out, "bench-train-f32.json"))
    if f:
        print(f"bench train ({f['backend']}): {f['tokens_per_s']:,.0f} tokens/s; bf16 / f32 = {tps / f['tokens_per_s']:.2f}x")
steps = []
try:
    for l in open(os.path.join(out, "train.log")):
        m = re.search(r"step\s+(\d+)/\d+ loss ([\d.]+).*tokens/s (\d+)(?: mfu ([\d.]+)%)?", l)
        if m:
            steps.append((int(m[1]), float(m[2]), int(m[3]), m[4]))
except OSError:
    pass
if steps:
    tail = steps[len(steps) // 2:]  # the second half: past warm-up and PTX loading
    tps = sum(s[2] for s in tail) / len(tail)
    mfu = [float(s[3]) for s in tail if s[3]]
    print(f"train: {len(steps)} steps, loss {steps[0][1]:.3f} -> {steps[-1][1]:.3f}, {tps:,.0f} tokens/s"
          + (f", MFU {sum(mfu)/len(mfu):.1f}%" if mfu else "") + " (mean of the second half of the steps)")
else:
    print("train: no step lines found in train.log")
p = last_json(os.path.join(out, "torch-train.json"))
if b and p:
    print(f"PyTorch {p['torch']} (bf16 autocast, SDPA), same model and batch: {p['tokens_per_s']:,.0f} tokens/s; "
          f"codeclm / PyTorch = {b['tokens_per_s'] / p['tokens_per_s']:.2f}x")
kp = os.path.join(out, "kernels.jsonl")
k = [json.loads(l) for l in open(kp) if l.startswith("{")] if os.path.exists(kp) else []
if k:
    rows = [x for x in k if "kernel" in x]
    bad = [x for x in rows if not x["ok"]]
    print(f"kernels: {len(rows) - len(bad)} of {len(rows)} outputs within tolerance"
          + (": off: " + ", ".join(f"{x['kernel']} ({x['max_rel']:.1e})" for x in bad) if bad else ""))
try:
    print(open(os.path.join(out, "parity.txt")).read().strip())
except OSError:
    pass
try:
    print(open(os.path.join(out, "nccl-parity.txt")).read().strip())
except OSError:
    pass
a = last_json(os.path.join(out, "allreduce.json"))
if a:
    print(f"all-reduce ({a['comm']}, world {a['world']}): {a['floats']/1e6:.1f}M floats in {a['seconds_per_allreduce']*1e3:.2f} ms")
s = last_json(os.path.join(out, "bench-sample.json"))
if s:
    print(f"bench sample: batch {s['batch']}, {s['max_tokens']} new tokens: {s['tokens_per_s']:,.0f} tokens/s")
g = last_json(os.path.join(out, "torch-generate.json"))
if s and g:
    print(f"transformers generate (f32, same run, batch 16, 256 new tokens): {g['tokens_per_s']:,.0f} tokens/s; "
          f"codeclm / generate = {s['tokens_per_s'] / g['tokens_per_s']:.2f}x")
EOF
echo "gpu_check: done ($([ $fail = 0 ] && echo ok || echo FAILED)); everything is under $OUT"
exit $fail
