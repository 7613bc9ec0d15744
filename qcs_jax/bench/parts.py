"""Forward+backward time of each model part alone, both frameworks, same shapes."""
# Imports wait inside the functions that need them: a benchmark worker process imports
# only its own framework's side, whose memory and start-up it measures.
from __future__ import annotations

import collections
import functools
import json
import os
import statistics
import time
from typing import Any, Callable

import numpy as np

from qcs_jax.bench.workload import (load_average, load_state_dict, make_batch, model_config,
                                  num_branches,
                                  timed, weights_file)
from qcs_jax.bench.jax_side import JaxBench
from qcs_jax.bench.torch_side import TorchBench


def jax_parts(args, cfg: dict, sd: dict) -> dict[str, tuple[Callable[[], Any], float]]:
  """Forward+backward of each part of one SAM pass, jitted alone, on the step's shapes.

  Every part takes the gradient of its parameters AND of its inputs (what backprop
  through the whole network needs), with random cotangents. The optimizer part is
  SAM's normalise/perturb plus Adam (tx.update with both gradients given).
  Returns part -> (run once, compile seconds).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  bench = JaxBench(args, cfg, sd)
  m, v = bench.model, bench.variables
  params, stats = v["params"], v["batch_stats"]
  images, _ = make_batch(bench.cfg, args.batch, args.seed)
  b, nb = images.shape[:2]
  x = jnp.asarray(images.reshape((b * nb,) + images.shape[2:]))
  rng = np.random.default_rng(0)

  def cot(tree):
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), tree)

  def part(fn, p, *inputs, mutable=False):
    """jit(grad of <cotangent, fn(p, *inputs)>) w.r.t. p and the float inputs."""
    out = jax.eval_shape(fn, p, *inputs)
    c = cot(out)
    diff = tuple(range(1 + len(inputs)))

    def loss(p, *xs):
      y = fn(p, *xs)
      return sum(jnp.vdot(a.astype(jnp.float32), b.astype(jnp.float32))
                 for a, b in zip(jax.tree.leaves(y), jax.tree.leaves(c)))
    return jax.jit(jax.grad(loss, argnums=diff)), (p,) + inputs

  def sub(name):
    return {"params": params[name]}

  def apply_method(method, mutable=()):
    def fn(p, *xs):
      out = m.apply({"params": p, "batch_stats": stats}, *xs, method=method,
                    mutable=list(mutable))
      return out[0] if mutable else out
    return fn

  fwd_base = jax.jit(lambda v, x: m.apply(v, x, method=lambda mm, x: mm.base_forward(
      x, train=True, groups=nb), mutable=["batch_stats"])[0])
  _, tokens, (x1, x2, x3) = fwd_base(v, x)
  tokens4 = tokens.reshape((b, nb) + tokens.shape[1:])
  jobs = {
      "backbone (ir_back)": part(apply_method(
          lambda mm, x: mm.ir_back(x, train=True, groups=nb), ["batch_stats"]), params, x),
      "embed (conv1-3, embed_q/k/v)": part(apply_method(
          lambda mm, a, b_, c: mm.embed(a, b_, c)), params, x1, x2, x3),
      "VIT_base": part(apply_method(lambda mm, t: mm.VIT_base(t, train=True)), params, tokens),
  }
  if cfg["name"] != "baseline":
    def cross_only(mm, t4):
      levels = jnp.split(t4, 3, axis=2)
      mods = (mm.cross_attention_1, mm.cross_attention_2, mm.cross_attention_3)
      return t4 + jnp.concatenate([mod(lv) for mod, lv in zip(mods, levels)], axis=2)
    jobs["cross modules + CSA"] = part(apply_method(cross_only), params, tokens4)
    jobs["VIT_cross"] = part(apply_method(lambda mm, u: mm.VIT_cross(u, train=True)), params,
                             tokens)
  grads = cot(params)
  opt_state = bench.tx.init(params)

  def opt_step(p, g, s):
    updates, s = bench.tx.update(g, s, p, grad_fn=lambda q, i: g)
    return optax.apply_updates(p, updates), s
  jobs["optimizer (SAM perturb + Adam)"] = (jax.jit(opt_step), (params, grads, opt_state))
  out = {}
  for name, (fn, fargs) in jobs.items():
    t0 = time.perf_counter()
    compiled = fn.lower(*fargs).compile()
    out[name] = (functools.partial(_run_blocking, jax, compiled, fargs),
                 time.perf_counter() - t0)
  return out


def _run_blocking(jax, compiled, fargs):
  return jax.block_until_ready(compiled(*fargs))


def torch_parts(args, cfg: dict, sd: dict) -> dict[str, tuple[Callable[[], Any], float]]:
  """The same parts on the PyTorch reference (ir_back called once per branch, as it does)."""
  import torch  # pylint: disable=import-outside-toplevel
  tb = TorchBench(args, cfg, sd)
  R, net = tb.R, tb.net
  net.load_state_dict(tb.state_dict)
  net.train()
  images, _ = make_batch(cfg, args.batch, args.seed)
  b, nb = images.shape[:2]
  branches = [R.to_nchw(images[:, i]) for i in range(nb)]
  gen = torch.Generator().manual_seed(0)

  def backward(outs, inputs):
    outs = [o for o in outs if o.requires_grad]
    torch.autograd.backward(outs, [torch.randn(o.shape, generator=gen) for o in outs])
    for t in inputs:
      t.grad = None
    net.zero_grad(set_to_none=True)

  def leaf(t):
    return t.detach().requires_grad_(True)

  with torch.no_grad():
    feats = [net.ir_back(x) for x in branches]
    toks = []
    for x1, x2, x3 in feats:
      t1 = net.embed_q(net.conv1(x1)).flatten(2).transpose(1, 2)
      t2 = net.embed_k(net.conv2(x2)).flatten(2).transpose(1, 2)
      t3 = net.embed_v(net.conv3(x3))
      toks.append(torch.cat([t1, t2, t3], 1))
    vit_out = [net.VIT_base(t)[1] for t in toks]
  feats = [[leaf(t) for t in f] for f in feats]
  toks = [leaf(t) for t in toks]
  vit_out = [leaf(t) for t in vit_out]

  def backbone():
    backward([y for x in branches for y in net.ir_back(x)], [])

  def embed():
    outs = []
    for x1, x2, x3 in feats:
      outs += [net.embed_q(net.conv1(x1)), net.embed_k(net.conv2(x2)), net.embed_v(net.conv3(x3))]
    backward(outs, [t for f in feats for t in f])

  def vit_base():
    backward([y for t in toks for y in net.VIT_base(t)], toks)

  n = vit_out[0].shape[1] // 3

  def cross():
    outs = []
    for level in range(3):
      mod = getattr(net, f"cross_attention_{level + 1}")
      outs += mod(*[t[:, level * n:(level + 1) * n] for t in vit_out])
    backward(outs, vit_out)

  def vit_cross():
    backward([net.VIT_cross(t)[0] for t in vit_out], vit_out)

  params = [p for p in net.parameters()]
  opt = torch.optim.Adam(params, lr=4e-6)
  grads = [torch.randn(p.shape, generator=gen) for p in params]

  def optimizer():
    with torch.no_grad():
      for p, g in zip(params, grads):
        p.grad = g
      norm = torch.sqrt(sum(torch.sum(g * g) for g in grads))
      es = []
      for p, g in zip(params, grads):
        e = 0.05 * g / (norm + 1e-12)
        p.add_(e)
        es.append(e)
      for p, e in zip(params, es):
        p.sub_(e)
    opt.step()

  return {"backbone (ir_back)": (backbone, 0.0), "embed (conv1-3, embed_q/k/v)": (embed, 0.0),
          "VIT_base": (vit_base, 0.0), "cross modules + CSA": (cross, 0.0),
          "VIT_cross": (vit_cross, 0.0), "optimizer (SAM perturb + Adam)": (optimizer, 0.0)}


def parts_main(args) -> None:
  """Times each part of a training pass alone in this process (no worker processes)."""
  cfg = model_config(args)
  sd = load_state_dict(weights_file(cfg, args.seed))
  nb = num_branches(cfg["name"])
  print(f"parts of one SAM pass: {args.model} {args.width}, {args.batch} anchors x {nb} "
        f"branches; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  jobs = {}
  if args.framework in ("jax", "both"):
    jobs["jax"] = jax_parts(args, cfg, sd)
  if args.framework in ("torch", "both"):
    jobs["torch"] = torch_parts(args, cfg, sd)
  results: dict[str, dict[str, dict]] = {k: {} for k in jobs}
  names = list(next(iter(jobs.values())))
  for name in names:
    # The frameworks take turns, so a fluctuating machine load hits both alike.
    samples = collections.defaultdict(list)
    for i in range(args.warmup + args.steps):
      for fw, parts in jobs.items():
        r = timed(parts[name][0])
        if i >= args.warmup:
          samples[fw].append(r)
    for fw in jobs:
      walls = [r["wall_s"] for r in samples[fw]]
      results[fw][name] = dict(ms=1e3 * statistics.median(walls), ms_min=1e3 * min(walls),
                               cpu_s=statistics.median(r["cpu_s"] for r in samples[fw]),
                               compile_s=jobs[fw][name][1])
      print(f"  {fw:<6}{name:<32} {results[fw][name]['ms']:9.0f} ms (min "
            f"{results[fw][name]['ms_min']:.0f})  cpu {results[fw][name]['cpu_s']:6.2f} s  "
            f"compile {jobs[fw][name][1]:5.1f} s  load {load_average():.1f}", flush=True)
  print(f"\n{'part (fwd+bwd, one pass), median ms':<38}" + "".join(f"{k:>10}" for k in jobs))
  for name in names:
    print(f"{name:<38}" + "".join(f"{results[k][name]['ms']:>10.0f}" for k in jobs))
  def step_sum(res):  # a step: every model part twice (two SAM passes), the optimizer once
    return sum(v["ms"] * (1 if n.startswith("optimizer") else 2) for n, v in res.items())
  print(f"{'sum: 2 x model parts + optimizer':<38}" + "".join(
      f"{step_sum(results[k]):>10.0f}" for k in jobs))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(results=results, xla_flags=os.environ.get("XLA_FLAGS", ""),
                     load=load_average()), f, indent=1)
