"""Speed of qcs_jax against the PyTorch reference: the same network, weights and batch.

  python tools/benchmark.py --framework both --model qcs --batch 2 --mode train
  python tools/benchmark.py --framework both --mode infer --infer_batch 1,16,64
  python tools/benchmark.py --framework both --mode train \
      --variant xla_default=--xla_cpu_use_xnnpack=false
  python tools/benchmark.py --parts --framework both    # fwd+bwd time of each part, both sides
  python tools/benchmark.py --profile --mode train      # XLA thunk times by part and op kind
  python tools/benchmark.py --roofline --steps 5        # the CPU's attainable GEMM rate

What runs:
- train: one SAM step as the reference takes it (forward+backward at w, e = rho g /
  (||g|| + 1e-12), forward+backward at w + e, Adam at w with the second gradient).
  JAX: qcs_jax.training.step.make_train_step (jitted, state donated). PyTorch: that step
  written out with torch.optim.Adam over qcs_jax/interop/reference.py (one ir_back call
  per branch, as the authors' code). `--batch` counts anchors: a QCS step sees
  4 x batch images, DCS 2 x batch.
- infer: the inference path only (ir_back -> embed -> VIT_base), JAX `method='infer'`
  jitted (qcs_jax.training.step.make_eval_step), PyTorch `infer` under torch.inference_mode().

Both frameworks get the weights of one `build_reference(cfg, seed)` (converted for
JAX with qcs_jax.interop.converter.convert_model), the same images and labels; the first
step's loss of each is printed so that a reader can see they compute the same thing.

JAX runs with qcs_jax.runtime's CPU XLA flags, as the entry points do. Each framework
(and each `--variant`, a JAX run with extra XLA_FLAGS) runs in its own
worker process; the parent makes them take their steps in turn (A B C A B C ...), so
a shared, fluctuating machine loads every contender alike. Reported per step, after
warm-up: median wall time, images/s, CPU seconds (all threads; a load-independent
cost), peak resident memory (sampled during the step) and, for JAX, XLA's own
numbers: compile time, FLOPs (`compiled.cost_analysis()`), buffer sizes
(`compiled.memory_analysis()`), device peak memory (`memory_stats()`, GPU) and, on a
GPU, achieved FLOP/s and MFU against the chip's dense peak.
"""
# Imports wait inside the functions that need them: a benchmark worker process imports
# only its own framework's side, whose memory and start-up it measures.
from __future__ import annotations

import argparse
import os


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog="\n".join(__doc__.splitlines()[2:]))
  ap.add_argument("--framework", choices=("jax", "torch", "both"), default="both")
  ap.add_argument("--model", choices=("qcs", "dcs"), default="qcs")
  ap.add_argument("--mode", choices=("train", "infer", "all"), default="all")
  ap.add_argument("--batch", type=int, default=2, help="train step: anchors (x branches images)")
  ap.add_argument("--infer_batch", default="1,16,64", help="comma-separated inference batches")
  ap.add_argument("--img_size", type=int, default=0, help="0: the width preset's (224 / 64)")
  ap.add_argument("--width", choices=("paper", "small"), default="paper")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  ap.add_argument("--remat", choices=("none", "convs", "full"), default="none",
                  help="JAX: config.model.remat (rematerialise IR units in the backward pass)")
  ap.add_argument("--memory", default="",
                  help="compile only: XLA buffer MiB of the JAX train step for each remat policy "
                  "at these comma-separated batches")
  ap.add_argument("--steps", type=int, default=3, help="timed steps per contender")
  ap.add_argument("--infer_steps", type=int, default=0, help="timed inference steps (0: --steps)")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
  ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
  ap.add_argument("--variant", action="append", default=[],
                  help="NAME=XLA_FLAGS: one more JAX contender with these extra XLA flags")
  ap.add_argument("--extra", action="append", default=[],
                  help="one more contender: jax[:DTYPE] or torch[:DTYPE][:channels_last], e.g. "
                  "torch:float32:channels_last (what a tuned PyTorch user runs), jax:bfloat16")
  ap.add_argument("--channels_last", action="store_true",
                  help="torch: NHWC (channels_last) memory format for the network and inputs")
  ap.add_argument("--random_weights", action="store_true",
                  help="JAX only: random weights instead of the reference's (no torch needed)")
  ap.add_argument("--torch_flops", action="store_true",
                  help="count the reference's FLOPs with torch's FlopCounterMode (one more step)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--markdown", action="store_true", help="also print docs/BENCHMARKS.md rows")
  ap.add_argument("--json", default="", help="write the results here")
  ap.add_argument("--profile", action="store_true",
                  help="JAX only, in-process: trace --steps steps, time by part / op kind")
  ap.add_argument("--top", type=int, default=25, help="--profile: ops listed")
  ap.add_argument("--parts", action="store_true",
                  help="in-process: time backbone / embed / ViTs / cross+CSA / optimizer alone")
  ap.add_argument("--roofline", action="store_true",
                  help="best float32 GEMM GFLOP/s of both frameworks: the machine's ceiling")
  ap.add_argument("--roofline_sizes", default="1024,2048,4096", help="--roofline: GEMM sizes n")
  ap.add_argument("--report", default="",
                  help="print the table (and --markdown rows) of a --json file")
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--weights", default="", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  args.infer_batch = [int(b) for b in str(args.infer_batch).split(",") if b]
  args.roofline_sizes = [int(n) for n in str(args.roofline_sizes).split(",") if n]
  # What a worker needs to rebuild the same model and batch.
  args.passthrough = ["--model", args.model, "--batch", str(args.batch), "--img_size",
                      str(args.img_size), "--width", args.width, "--remat", args.remat,
                      "--threads", str(args.threads), "--seed", str(args.seed)] + (
                          ["--torch_flops"] if args.torch_flops else [])
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  if ((args.worker and args.framework == "jax") or args.profile or args.parts or args.roofline
      or args.memory):
    # What the entry points run with (a --variant's own XLA_FLAGS win).
    from qcs_jax import runtime  # pylint: disable=import-outside-toplevel
    runtime.set_cpu_xla_defaults()
  # pylint: disable=import-outside-toplevel  (each tool imports only what it needs)
  if args.worker:
    from qcs_jax.bench.runner import worker_main
    worker_main(args)
  elif args.report:
    from qcs_jax.bench.report import report_main
    report_main(args)
  elif args.memory:
    from qcs_jax.bench.memory import memory_main
    memory_main(args)
  elif args.profile:
    from qcs_jax.bench.profile import profile_main
    profile_main(args)
  elif args.parts:
    from qcs_jax.bench.parts import parts_main
    parts_main(args)
  elif args.roofline:
    from qcs_jax.bench.roofline import roofline_main
    roofline_main(args)
  else:
    from qcs_jax.bench.runner import parent_main
    parent_main(args)


if __name__ == "__main__":
  main()
