"""qcs_jax.models.conv: the tap-GEMM weight gradient equals lax's convolution gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from qcs_jax.models import conv as C

CASES = [(9, 3, 5, 3, 1, 1), (8, 4, 6, 3, 2, 1), (7, 2, 3, 1, 1, 0), (10, 3, 4, 3, 1, 0),
         (9, 3, 4, 3, 2, 1), (10, 2, 3, 3, 2, 0)]  # stride 2: odd and even sizes, routed


def _grads(fn, x, w, s, p):
  dn = lax.conv_dimension_numbers(x.shape, w.shape, C.NHWC)
  loss = lambda x, w: jnp.sum(jnp.sin(fn(x, w, (s, s), ((p, p), (p, p)),  # noqa: E731
                                         dimension_numbers=dn)))
  return jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)


@pytest.mark.parametrize('h,ci,co,k,s,p', CASES)
def test_gradients_equal_lax_in_float64(x64, monkeypatch, h, ci, co, k, s, p):
  monkeypatch.setattr(C, '_device_count', lambda: 1)  # stride 2 is routed on one device
  assert C.uses_shifted_grad((2, h, h, ci), (k, k, ci, co), (s, s)) == (k > 1)
  rng = np.random.default_rng(h)
  x = jnp.asarray(rng.normal(size=(2, h, h, ci)))
  w = jnp.asarray(rng.normal(size=(k, k, ci, co)))
  ref_v, ref_g = _grads(lax.conv_general_dilated, x, w, s, p)
  val, g = _grads(C.conv_general_dilated, x, w, s, p)
  assert abs(float(val - ref_v)) <= 1e-12 * abs(float(ref_v))
  for ours, ref in zip(g, ref_g):
    assert float(jnp.max(jnp.abs(ours - ref))) <= 1e-12 * float(jnp.max(jnp.abs(ref)))


def test_shifted_weight_grad_any_stride(x64):
  """The tap GEMMs alone, stride 2 and asymmetric padding included (not only what is routed)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 8, 3)))
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)))
  for strides, pads in (((2, 2), ((1, 1), (1, 1))), ((1, 2), ((0, 1), (1, 0))),
                        ((3, 3), ((1, 1), (1, 1))), ((3, 2), ((0, 2), (2, 0)))):
    conv = lambda w: lax.conv_general_dilated(x, w, strides, pads,  # noqa: E731
                                              dimension_numbers=C.NHWC)
    y, vjp = jax.vjp(conv, w)
    g = jnp.asarray(rng.normal(size=y.shape))
    ours = C.shifted_weight_grad(x, g, (3, 3), strides, pads)
    np.testing.assert_allclose(ours, vjp(g)[0], rtol=1e-12, atol=1e-12)


def test_routing():
  assert C.uses_shifted_grad((8, 112, 112, 64), (3, 3, 64, 64), (1, 1))
  assert C.uses_shifted_grad((8, 112, 112, 64), (3, 3, 64, 64), (2, 2), devices=1)
  assert not C.uses_shifted_grad((8, 112, 112, 64), (3, 3, 64, 64), (2, 2), devices=8)
  assert not C.uses_shifted_grad((8, 112, 112, 64), (3, 3, 64, 64), (3, 3), devices=1)
  assert not C.uses_shifted_grad((8, 56, 56, 64), (1, 1, 64, 128), (1, 1))
  # Anything the tap GEMMs do not cover goes to lax unchanged (here: grouped, 'SAME').
  x = jnp.ones((1, 6, 6, 4))
  w = jnp.ones((3, 3, 2, 4))
  y = C.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=C.NHWC,
                             feature_group_count=2)
  assert y.shape == (1, 6, 6, 4) and float(y[0, 2, 2, 0]) == 18.0


def test_accelerator_branch_is_xlas_weight_gradient(x64):
  """What a CUDA/TPU lowering runs (test_lowering.py checks it is chosen there) equals
  the tap GEMMs the CPU runs, at strides 1 and 2."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 9, 9, 3)))
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)))
  for s in (1, 2):
    pads = ((1, 1), (1, 1))
    g = jnp.asarray(rng.normal(size=lax.conv_general_dilated(
        x, w, (s, s), pads, dimension_numbers=C.NHWC).shape))
    ours = C.xla_weight_grad(x, g, w, (s, s), pads)
    taps = C.shifted_weight_grad(x, g, (3, 3), (s, s), pads)
    assert ours.shape == w.shape
    assert float(jnp.max(jnp.abs(ours - taps))) <= 1e-12 * float(jnp.max(jnp.abs(taps)))
