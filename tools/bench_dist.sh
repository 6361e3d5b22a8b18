#!/usr/bin/env bash
# Data-parallel scaling on one machine: the same global batch trained by 1 rank (all cores) and
# by N ranks under mpirun (cores divided among them), same run otherwise; prints one JSON line:
# tokens/s of each, the scaling efficiency (N-rank tokens/s over 1-rank tokens/s, same cores)
# and the all-reduce's share of an N-rank step (comm_seconds / step_seconds in metrics.jsonl).
#
#   tools/bench_dist.sh [PRESET=small] [RANKS=2] [BATCH=2 per rank] [CONTEXT=512] [STEPS=6]
set -euo pipefail
PRESET=${PRESET:-small} RANKS=${RANKS:-2} BATCH=${BATCH:-2} CONTEXT=${CONTEXT:-512} STEPS=${STEPS:-6}
BIN=${BIN:-target/release/codeclm}
DIR=${DIR:-/tmp/codeclm-bench-dist}
CORES=$(nproc)
mkdir -p "$DIR"
if [ ! -f "$DIR/ds/tokens-"*.parquet ] 2>/dev/null; then
  rm -rf "$DIR/ds"
  CODECLM_LOG=warn "$BIN" dataset build --no-progress --images tests/fixtures/images --out "$DIR/ds" --val-fraction 0.2 >/dev/null
  CODECLM_LOG=warn "$BIN" vocab train --dataset "$DIR/ds" --size 320 --out "$DIR/vocab.json" >/dev/null
  CODECLM_LOG=warn "$BIN" dataset tokenize --dataset "$DIR/ds" --vocab "$DIR/vocab.json" >/dev/null
fi
common=(train --dataset "$DIR/ds" --preset "$PRESET" --context "$CONTEXT" --steps "$STEPS" --eval-every "$STEPS" --save-every "$STEPS" --val-docs 1)
rm -rf "$DIR/one" "$DIR/many"
CODECLM_LOG=warn "$BIN" "${common[@]}" --batch $((BATCH * RANKS)) --threads "$CORES" --out "$DIR/one" >/dev/null
CODECLM_LOG=warn mpirun --allow-run-as-root --oversubscribe -np "$RANKS" "$BIN" "${common[@]}" --batch "$BATCH" --out "$DIR/many" >/dev/null
python3 - "$DIR" "$RANKS" "$CORES" "$PRESET" <<'PY'
import json, sys
d, ranks, cores, preset = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def steps(run):
    rows = [json.loads(l) for l in open(f"{d}/{run}/metrics.jsonl") if '"loss"' in l]
    return rows[1:]  # the first step warms up
one, many = steps("one"), steps("many")
tps = lambda rows: sum(r["tokens_per_second"] for r in rows) / len(rows)
comm = sum(r["comm_seconds"] for r in many) / sum(r["step_seconds"] for r in many)
print(json.dumps({"preset": preset, "cores": cores, "ranks": ranks, "steps_timed": len(many),
                  "one_rank_tokens_per_second": tps(one), "ranks_tokens_per_second": tps(many),
                  "scaling_efficiency": tps(many) / tps(one), "allreduce_share_of_step": comm}))
PY
