"""XLA thunk times of traced JAX steps, by model part, direction and op kind."""
# Imports wait inside the functions that need them: a benchmark worker process imports
# only its own framework's side, whose memory and start-up it measures.
from __future__ import annotations

import collections
import gzip
import json
import os
import re
import statistics
import tempfile

from qcs_jax.bench.workload import load_state_dict, model_config, weights_file
from qcs_jax.bench.jax_side import JaxBench


PARTS = (("cross_attention", "cross/CSA"), ("VIT_cross", "VIT_cross"), ("VIT_base", "VIT_base"),
         ("ir_back", "backbone"), ("qcs.embed", "embed"), ("loss", "loss"))


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name -> op_name metadata; a fusion without one takes its body's first."""
  current = None
  first_in_comp: dict[str, str] = {}
  inst: dict[str, tuple[str, str, str]] = {}
  for line in hlo_text.splitlines():
    m = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$", line)
    if m and not line.startswith(" "):
      current = m.group(1)
      continue
    m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?(?:calls=%?([\w.\-]+))?.*$", line)
    if not m:
      continue
    name = m.group(1)
    op = re.search(r'op_name="([^"]*)"', line)
    calls = re.search(r"calls=%?([\w.\-]+)", line)
    opn = op.group(1) if op else ""
    inst[name] = (opn, calls.group(1) if calls else "", current or "")
    if opn and current and current not in first_in_comp:
      first_in_comp[current] = opn
  out = {}
  for name, (opn, calls, _) in inst.items():
    out[name] = opn or first_in_comp.get(calls, "")
  return out


def classify(op_name: str, inst: str) -> tuple[str, str, str]:
  """(model part, fwd/bwd, op kind) of one HLO instruction."""
  part = "optimizer/other" if op_name else "unattributed (no metadata)"
  for pat, label in PARTS:
    if pat in op_name:
      part = label
      break
  if part == "optimizer/other" and ("conv" in op_name.split("/")[-1] or "embed" in op_name):
    part = "embed"
  direction = "bwd" if "transpose(" in op_name else ("fwd" if "jvp(" in op_name else "-")
  if inst.startswith(("ynn_fusion", "xnn_fusion")):
    kind = "ynn/xnn (conv/dot)"
  elif inst.startswith("convolution") or inst.startswith("conv"):
    kind = "conv (eigen)"
  elif inst.startswith("dot"):
    kind = "dot (eigen)"
  elif "transpose" in inst or inst.startswith("copy"):
    kind = "transpose/copy"
  elif "reduce" in inst:
    kind = "reduce"
  else:
    kind = "elementwise/other"
  return part, direction, kind


def profile_main(args) -> None:
  """Traces JAX steps and adds up the thunk times by model part, direction and op kind."""
  import jax  # pylint: disable=import-outside-toplevel
  cfg = model_config(args)
  sd = load_state_dict(weights_file(cfg, args.seed))
  bench = JaxBench(args, cfg, sd)
  key = "train" if args.mode in ("train", "all") else f"infer:{args.infer_batch[0]}"
  prep = bench.prepare(key)
  print(f"{key}: compile {prep['lower_s'] + prep['compile_s']:.1f} s, "
        f"{prep.get('flops', 0) / 1e9:.1f} GFLOP", flush=True)
  names = hlo_op_names(bench.prepared[key]["compiled"].as_text())
  for _ in range(args.warmup):
    bench.step(key)
  logdir = tempfile.mkdtemp(prefix="qcs_bench_trace_")
  walls = []
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    for _ in range(args.steps):
      walls.append(bench.step(key)["wall_s"])
  path = [os.path.join(d, f) for d, _, fs in os.walk(logdir) for f in fs
          if f.endswith("perfetto_trace.json.gz")][0]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  by = collections.Counter()
  per_op = collections.Counter()
  total = 0.0
  for e in events:
    if e.get("ph") != "X" or e["name"] not in names:
      continue
    d = e.get("dur", 0) / 1e3 / args.steps
    part, direction, kind = classify(names[e["name"]], e["name"])
    by[(part, direction, kind)] += d
    per_op[(e["name"], names[e["name"]])] += d
    total += d
  wall = 1e3 * statistics.median(walls)
  print(f"\nwall {wall:.0f} ms/step (median of {args.steps}); traced thunk time {total:.0f} ms/step"
        f" (thunks may overlap); trace at {path}")
  print("Note: Eigen convolutions (the non-YNN path) run asynchronously on the intra-op pool and "
        "appear only as their dispatch here; --parts times every part whatever runs it.")
  parts = collections.Counter()
  kinds = collections.Counter()
  for (part, direction, kind), d in by.items():
    parts[(part, direction)] += d
    kinds[kind] += d
  print("\nby model part (ms/step, % of traced):")
  for (part, direction), d in sorted(parts.items(), key=lambda kv: -kv[1]):
    print(f"  {part:<16} {direction:<4} {d:9.1f}  {100 * d / total:5.1f}%")
  print("\nby op kind:")
  for kind, d in kinds.most_common():
    print(f"  {kind:<22} {d:9.1f}  {100 * d / total:5.1f}%")
  print(f"\ntop {args.top} ops:")
  for (name, opn), d in per_op.most_common(args.top):
    print(f"  {d:8.1f} ms  {name:<32} {opn[-110:]}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(wall_ms=wall, traced_ms=total,
                     parts={f"{p}|{d}": v for (p, d), v in parts.items()},
                     kinds=dict(kinds), by={"|".join(k): v for k, v in by.items()},
                     top=[(n, o, d) for (n, o), d in per_op.most_common(args.top)]), f, indent=1)
