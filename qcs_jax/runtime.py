"""Process-wide XLA settings the command-line entry points apply before JAX starts.

XLA's default CPU convolutions (YNNPACK fusions in jaxlib 0.10) run IR50's
forward+backward ~1.5x slower than XNNPACK's; with XNNPACK a full-size QCS train
step on CPU matches PyTorch's (docs/BENCHMARKS.md). GPU and TPU backends ignore
``xla_cpu_*`` flags.
"""
from __future__ import annotations

import os
from typing import MutableMapping

CPU_XLA_FLAGS = ("--xla_cpu_use_xnnpack=true",)
OPT_OUT = "QCS_JAX_XLA_DEFAULTS"  # set to 0 to leave XLA_FLAGS alone


def with_cpu_xla_defaults(xla_flags: str) -> str:
  """``xla_flags`` plus each of CPU_XLA_FLAGS whose flag it does not already set."""
  out = xla_flags.split()
  for flag in CPU_XLA_FLAGS:
    name = flag.split("=", 1)[0]
    if not any(f == name or f.startswith(name + "=") for f in out):
      out.append(flag)
  return " ".join(out)


def set_cpu_xla_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
  """Adds CPU_XLA_FLAGS to XLA_FLAGS (a user's own setting of a flag wins).

  Must run before the first JAX computation: XLA reads XLA_FLAGS once, when it
  creates its first backend.
  """
  if environ.get(OPT_OUT, "1") == "0":
    return
  environ["XLA_FLAGS"] = with_cpu_xla_defaults(environ.get("XLA_FLAGS", ""))
