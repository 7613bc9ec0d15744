#!/usr/bin/env bash
# GPU rows of docs/BENCHMARKS.md in one command (about 5-10 minutes on an H100/H200):
#
#   bash tools/benchmark_gpu.sh [OUTDIR]      # default OUTDIR: $OUT or ./bench_gpu
#
# Records, for the paper's QCS (224 px) with JAX on the first GPU: the SAM train
# step in bfloat16 and float32 at the paper's batch (24 anchors = 96 images), the
# largest bfloat16 batch that fits (doubling from 48 until a step fails), and
# inference at batch 1 / 64 / 256. Each run prints images/s, compile time, XLA's
# FLOPs, achieved FLOP/s, MFU against the chip's dense peak (qcs_jax/bench/common.py)
# and device peak memory; JSON and markdown rows go to OUTDIR. Random weights
# (--random_weights): no torch and no weight files needed on the GPU machine.
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

bench train_bf16_b24 120 --mode train --batch 24 --dtype bfloat16 --steps 10 --warmup 2
bench train_fp32_b24 120 --mode train --batch 24 --dtype float32 --steps 10 --warmup 2
bench infer_bf16 90 --mode infer --infer_batch 1,64,256 --dtype bfloat16 --steps 10 --warmup 2
largest=24
for b in 48 96 192 384; do  # a failed step (out of memory) or the time limit ends the search
  bench "train_bf16_b$b" 90 --mode train --batch "$b" --dtype bfloat16 --steps 5 --warmup 1 \
    || break
  largest=$b
done
echo "largest bfloat16 train batch that ran: $largest anchors ($((4 * largest)) images)" | tee -a "$LOG"
for f in "$OUTDIR"/*.json; do
  $PY tools/benchmark.py --report "$f" --markdown | grep "^| 20" >> "$OUTDIR/rows.md"
done
echo "rows: $OUTDIR/rows.md; log: $LOG"
