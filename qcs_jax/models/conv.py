"""Convolution with the weight gradient as one GEMM per kernel tap on XLA:CPU only.

XLA's CPU backward-filter convolution for IR50's 3x3 layers runs well below its
forward rate (profile in docs/BENCHMARKS.md: 2-3x the CPU time of the forward at
112x112x64, stride 1; at stride 2 it grows faster than the batch, up to 8x the tap
GEMMs at 32 images). The weight gradient of a stride-s convolution is, for each tap
(i, j), x_shifted(i, j)^T @ g over all N*H*W positions: kh*kw plain GEMMs that
XLA runs at its GEMM rate. Forward and input gradient stay lax's. Same numbers up
to summation order (float64 parity tests <= 1e-10).

The choice is made when the program is lowered, per platform
(``lax.platform_dependent``): a program lowered for CUDA or TPU holds XLA's own
backward-filter convolution (cuDNN's, the TPU's), never the CPU tap loop;
tests/test_lowering.py checks the exported programs.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ('NHWC', 'HWIO', 'NHWC')


def _is_nhwc(dimension_numbers: Any, ndim: int) -> bool:
  if ndim != 4:
    return False
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, tuple) and all(isinstance(d, str) for d in dimension_numbers):
    return tuple(dimension_numbers) == NHWC
  want = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), NHWC)
  return tuple(dimension_numbers) == tuple(want)


def shifted_weight_grad(x: jax.Array, g: jax.Array, kernel: Sequence[int],
                        strides: Sequence[int], padding: Sequence[tuple[int, int]]
                        ) -> jax.Array:
  """d(sum(g * conv(x, w)))/dw for NHWC x, g and HWIO w of spatial size `kernel`."""
  kh, kw = kernel
  sh, sw = strides
  n, _, _, c = x.shape
  ho, wo, k = g.shape[1:]
  g2 = g.reshape(-1, k)
  acc = jnp.promote_types(jnp.float32, x.dtype)  # bf16 inputs accumulate in float32
  dims = (((0,), (0,)), ((), ()))
  if (sh, sw) == (1, 1):
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    window = lambda i, j: lax.dynamic_slice(xp, (0, i, j, 0), (n, ho, wo, c))  # noqa: E731
  else:
    # Pad, then round the padded size up to a multiple of the stride, so that the
    # input splits into sh*sw phases (x[:, p::sh, q::sw]); tap (i, j) reads phase
    # (i % sh, j % sw) from offset (i // sh, j // sw): a contiguous window, which
    # the loop below slices with a traced index.
    hp = x.shape[1] + sum(padding[0])
    wp = x.shape[2] + sum(padding[1])
    eh, ew = -hp % sh, -wp % sw
    xp = jnp.pad(x, ((0, 0), (padding[0][0], padding[0][1] + eh),
                     (padding[1][0], padding[1][1] + ew), (0, 0)))
    phases = xp.reshape(n, (hp + eh) // sh, sh, (wp + ew) // sw, sw, c).transpose(
        2, 4, 0, 1, 3, 5)
    window = lambda i, j: lax.dynamic_slice(  # noqa: E731
        phases, (i % sh, j % sw, 0, i // sh, j // sw, 0), (1, 1, n, ho, wo, c))

  # One tap at a time (a loop): unrolled, XLA keeps all kh*kw shifted copies of x
  # alive at once (3.7x lax's temporaries at 112x112x64; measured in BENCHMARKS.md).
  def tap(_, ij):
    t = window(ij // kw, ij % kw).reshape(-1, c)
    return None, lax.dot_general(t, g2, dims, preferred_element_type=acc)
  _, taps = lax.scan(tap, None, jnp.arange(kh * kw))
  return taps.reshape(kh, kw, c, k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC,
                                  precision=precision)


def _conv_fwd(x, w, strides, padding, precision):
  return _conv(x, w, strides, padding, precision), (x, w)


def xla_weight_grad(x: jax.Array, g: jax.Array, w: jax.Array, strides: Sequence[int],
                    padding: Sequence[tuple[int, int]], precision: Any = None) -> jax.Array:
  """The weight gradient as XLA differentiates it: a backward-filter convolution."""
  _, weight_vjp = jax.vjp(lambda b: lax.conv_general_dilated(
      x, b, strides, padding, dimension_numbers=NHWC, precision=precision), w)
  return weight_vjp(g)[0]


def _conv_bwd(strides, padding, precision, res, g):
  x, w = res
  _, input_vjp = jax.vjp(lambda a: lax.conv_general_dilated(
      a, w, strides, padding, dimension_numbers=NHWC, precision=precision), x)
  (dx,) = input_vjp(g)
  # CPU: the tap GEMMs; every other platform (CUDA, ROCm, TPU): XLA's own gradient.
  # Both branches return w's dtype (the taps accumulate bf16 in float32).
  dw = lax.platform_dependent(
      x, g,
      cpu=lambda x, g: shifted_weight_grad(x, g, w.shape[:2], strides, padding).astype(w.dtype),
      default=lambda x, g: xla_weight_grad(x, g, w, strides, padding, precision))
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def _device_count() -> int:
  return jax.device_count()


def uses_shifted_grad(x_shape: Sequence[int], w_shape: Sequence[int],
                      strides: Sequence[int], devices: Optional[int] = None) -> bool:
  """Where the tap GEMMs beat XLA:CPU's backward-filter conv (measured; BENCHMARKS.md).

  Only the CPU lowering uses them (see ``_conv_bwd``); on other platforms a
  convolution this picks still gets XLA's own weight gradient.

  Kernels larger than 1x1 at stride 1; at stride 2 on one device only. At stride 2,
  XLA's backward-filter conv grows faster than the batch (IR50's 56x56 -> 28x28
  layer: 65 ms at 8 images, 1,456 ms at 32; the taps 34 and 185 ms): the batch-8
  step is 6% faster. On several devices each tap adds an all-reduce inside the
  loop (the tiny 2-device step: 48 -> 66 all-reduces), and XLA:CPU's gloo
  collectives between processes then abort more often ("collective mismatch"),
  so multi-device runs keep XLA's stride-2 gradient. `devices`: jax.device_count().
  """
  if tuple(w_shape[:2]) == (1, 1) or max(strides) > 2:
    return False
  if tuple(strides) == (1, 1):
    return True
  return (_device_count() if devices is None else devices) == 1


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Optional[Sequence[int]] = None,
                         rhs_dilation: Optional[Sequence[int]] = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
  """lax.conv_general_dilated (flax.linen.Conv's `conv_general_dilated` hook).

  Plain NHWC/HWIO convolutions with explicit padding, no dilation and no groups
  whose shape `uses_shifted_grad` picks get the tap-GEMM weight gradient; any
  other call is lax's own.
  """
  plain = (not isinstance(padding, str) and _is_nhwc(dimension_numbers, lhs.ndim)
           and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1)))
           and feature_group_count == 1 and batch_group_count == 1
           and preferred_element_type is None)
  if plain and uses_shifted_grad(lhs.shape, rhs.shape, window_strides):
    pads = tuple((int(a), int(b)) for a, b in padding)
    return _conv(lhs, rhs, tuple(int(s) for s in window_strides), pads, precision)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
