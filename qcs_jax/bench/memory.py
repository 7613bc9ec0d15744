"""XLA's buffer sizes of the compiled JAX train step by batch and remat policy (no step runs).

Temporaries are what rematerialisation trades for recomputation; compiling is enough
to see them, so this is cheap next to timing a step.
"""
from __future__ import annotations

import argparse
import time

from qcs_jax.bench.workload import load_state_dict, model_config, weights_file
from qcs_jax.bench.jax_side import JaxBench

POLICIES = ("none", "convs", "full")


def memory_rows(args, batches: list[int], policies=POLICIES) -> list[dict]:
  """One row per (batch, policy): XLA argument/output/temp/peak MiB, FLOPs, compile s."""
  cfg = model_config(args)
  sd = load_state_dict(weights_file(cfg, args.seed))
  rows = []
  for b in batches:
    for policy in policies:
      run = argparse.Namespace(**dict(vars(args), batch=b, remat=policy))
      t0 = time.perf_counter()
      info = JaxBench(run, cfg, sd).prepare("train")
      mib = {k: v / 2**20 for k, v in info.get("xla_bytes", {}).items()}
      rows.append(dict(batch=b, remat=policy, images=info["images"], mib=mib,
                       gflop=info.get("flops", float("nan")) / 1e9,
                       compile_s=time.perf_counter() - t0))
      r = rows[-1]
      print(f"  batch {b:>3} remat {policy:<6} temp {mib.get('temp', float('nan')):8.0f} MiB  "
            f"peak {mib.get('peak', float('nan')):8.0f} MiB  {r['gflop']:8.1f} GFLOP  "
            f"compile {r['compile_s']:.0f} s", flush=True)
  return rows


def memory_main(args) -> None:
  batches = [int(b) for b in str(args.memory).split(",") if b]
  print(f"XLA buffers of the {args.model} {args.width} {args.dtype} train step "
        f"(compile only)", flush=True)
  rows = memory_rows(args, batches)
  print("\n| batch (anchors) | images | remat | XLA temp MiB | XLA peak MiB | GFLOP/step |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['batch']} | {r['images']} | {r['remat']} | {r['mib'].get('temp', 0):.0f} | "
          f"{r['mib'].get('peak', 0):.0f} | {r['gflop']:.1f} |")
