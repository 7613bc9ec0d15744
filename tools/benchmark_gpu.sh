#!/usr/bin/env bash
# GPU rows of docs/BENCHMARKS.md in one command (at most 8 minutes on an H100/H200):
#
#   bash tools/benchmark_gpu.sh [OUTDIR]      # default OUTDIR: $OUT or ./bench_gpu
#
# Records, for the paper's QCS (224 px) with JAX on the first GPU:
# - end to end (tools/benchmark_e2e.py): the RAF-DB recipe fed by the real input
#   pipeline from a generated JPEG data set on local disk, batch 24 anchors (96
#   images): bfloat16 with host and device augmentation interleaved, float32 with
#   device augmentation; images/s, the share of time the step waited for input,
#   compile time, MFU;
# - the largest bfloat16 train batch that fits (96, 192 anchors) and inference at
#   batch 1 / 64 / 256 (tools/benchmark.py: images/s, compile time, XLA's FLOPs,
#   MFU against the chip's dense peak, device peak memory).
# JSON and markdown rows go to OUTDIR. Random weights: no torch, no weight files.
set -u
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-bench_gpu}}
PY=${PYTHON:-python}
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUTDIR/benchmark_gpu.log"
: > "$LOG"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import jax; print(jax.__version__, jax.devices())"; } >> "$LOG" 2>&1
if ! $PY -c "import jax, sys; sys.exit(jax.devices()[0].platform != 'gpu')" 2>/dev/null; then
  echo "error: JAX sees no GPU (install jax[cuda12]); see $LOG" >&2
  exit 1
fi

bench() {  # NAME TIMEOUT_S ARGS...
  local name=$1 limit=$2; shift 2
  echo "== $name: tools/benchmark.py $*" | tee -a "$LOG"
  timeout "$limit" $PY tools/benchmark.py --framework jax --random_weights --model qcs \
      --markdown --json "$OUTDIR/$name.json" "$@" >> "$LOG" 2>&1
  local rc=$?
  grep -E "^jax |MFU|XLA buffers" "$LOG" | tail -3
  return $rc
}

e2e() {  # NAME TIMEOUT_S ARGS...
  local name=$1 limit=$2; shift 2
  echo "== $name: tools/benchmark_e2e.py $*" | tee -a "$LOG"
  timeout "$limit" $PY tools/benchmark_e2e.py --recipe rafdb --batch 24 --json \
      "$OUTDIR/$name.e2e.json" "$@" > "$OUTDIR/$name.log" 2>&1
  local rc=$?
  cat "$OUTDIR/$name.log" >> "$LOG"
  grep -E "^20|^augment on" "$OUTDIR/$name.log" | tee -a "$OUTDIR/e2e_rows.txt"
  return $rc
}

e2e e2e_bf16_b24 180 --dtype bfloat16 --augment_on host,device --steps 10 --rounds 2
e2e e2e_fp32_b24 120 --dtype float32 --augment_on device --steps 8 --rounds 1
bench infer_bf16 60 --mode infer --infer_batch 1,64,256 --dtype bfloat16 --steps 10 --warmup 2
largest=24
for b in 96 192; do  # a failed step (out of memory) or the time limit ends the search
  bench "train_bf16_b$b" 60 --mode train --batch "$b" --dtype bfloat16 --steps 5 --warmup 1 \
    || break
  largest=$b
done
echo "largest bfloat16 train batch that ran: $largest anchors ($((4 * largest)) images)" | tee -a "$LOG"
for f in "$OUTDIR"/train_*.json "$OUTDIR"/infer_*.json; do
  [ -e "$f" ] || continue
  $PY tools/benchmark.py --report "$f" --markdown | grep "^| 20" >> "$OUTDIR/rows.md"
done
echo "rows: $OUTDIR/rows.md, $OUTDIR/e2e_rows.txt; log: $LOG"
