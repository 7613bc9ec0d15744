"""CSA maths (qcs_jax.models.csa) against torch autograd versions of docs/ARCHITECTURE.md section 6."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import jit, rel_err
from qcs_jax.models import csa

# Distinct token counts per branch: a map indexed by the wrong branch fails on shape.
NS = (5, 6, 7, 8)
C = 16
B = 3


def _qks(seed, dtype=np.float64, ns=NS, b=B):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(b, n, C)).astype(dtype) for n in ns]


# --- torch references, written literally from the notation of section 6 ----------


def t_shift(d, minmax):
  if minmax == 'global':
    return d - d.min()
  return d - d.amin(dim=(1, 2), keepdim=True)


def t_sim(d, minmax):
  d = t_shift(d, minmax)
  mx = d.max() if minmax == 'global' else d.amax(dim=(1, 2), keepdim=True)
  return mx - d


def t_cols(m):
  return F.normalize(m, dim=2)


def t_rows(m):
  return F.normalize(m, dim=1)


def t_sumrows(m):
  return m.sum(1)


def t_sumcols(m):
  return m.sum(2)


def t_dcs(qk_a, qk_p, minmax='global'):
  s = t_sim(torch.cdist(qk_p, qk_a), minmax)  # rows index p, columns a
  m_a = torch.softmax(t_sumrows(t_cols(s)), -1)
  m_p = torch.softmax(t_sumcols(t_rows(s)), -1)
  return m_a, m_p


def t_qcs(qk1, qk2, qk3, qk4, theta, variant='sd', minmax='global'):
  s21 = t_sim(torch.cdist(qk2, qk1), minmax)
  s43 = t_sim(torch.cdist(qk4, qk3), minmax)
  d31 = t_shift(torch.cdist(qk3, qk1), minmax)
  d42 = t_shift(torch.cdist(qk4, qk2), minmax)
  s_terms = (t_sumrows(t_cols(s21)), t_sumrows(t_cols(s21.transpose(1, 2))),
             t_sumcols(t_rows(s43.transpose(1, 2))), t_sumcols(t_rows(s43)))
  d_terms = (t_sumrows(t_cols(d31)), t_sumrows(t_cols(d42)),
             t_sumcols(t_rows(d31)), t_sumcols(t_rows(d42)))
  k = torch.tanh(theta) + 1
  if variant == 'sd':
    logits = [s + k * d for s, d in zip(s_terms, d_terms)]
  elif variant == 's':
    logits = list(s_terms)
  else:
    logits = list(d_terms)
  return [torch.softmax(x, -1) for x in logits]


def t_sdpa(qk_a, qk_p):
  i = qk_p @ qk_a.transpose(1, 2) * qk_a.shape[-1] ** -0.5
  return torch.softmax(i, 1).transpose(1, 2), torch.softmax(i, 2)


# --- helpers to compare maps and gradients ----------------------------------------


def _weights(shapes, seed=99):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=s) for s in shapes]


def _jax_maps_and_grads(fn, qks, theta, weights):
  """Maps of fn and gradients of sum_b <w_b, m_b> w.r.t. every QK (and theta)."""
  def loss(qks, theta):
    maps = fn(*qks, theta)
    return sum(jnp.sum(jnp.asarray(w, m.dtype) * m) for w, m in zip(weights, maps))
  return jit(lambda q, t: (fn(*q, t), jax.grad(loss, argnums=(0, 1))(q, t)))(qks, theta)


def _torch_maps_and_grads(fn, qks, theta, weights):
  tq = [torch.tensor(np.asarray(q, np.float64), requires_grad=True) for q in qks]
  tt = torch.tensor(float(theta), dtype=torch.float64, requires_grad=True)
  maps = fn(*tq, tt)
  loss = sum((torch.tensor(w) * m).sum() for w, m in zip(weights, maps))
  loss.backward()
  tgrad = tt.grad if tt.grad is not None else torch.zeros(())
  return ([m.detach().numpy() for m in maps],
          ([q.grad.numpy() for q in tq], tgrad.numpy()))


def _check(fn_jax, fn_torch, qks, theta, shapes, tol):
  w = _weights(shapes)
  maps, (gq, gt) = _jax_maps_and_grads(fn_jax, qks, theta, w)
  rmaps, (rgq, rgt) = _torch_maps_and_grads(fn_torch, qks, theta, w)
  assert len(maps) == len(rmaps)
  for m, r in zip(maps, rmaps):
    assert m.shape == r.shape
    assert rel_err(m, r) <= tol
  for g, r in zip(gq, rgq):
    assert rel_err(g, r) <= tol
  if np.any(np.asarray(rgt) != 0):
    assert abs(float(gt) - float(rgt)) <= tol * abs(float(rgt))
  else:
    assert float(gt) == 0.0
  return maps


# --- tests ----------------------------------------------------------------------


def test_shapes_and_normalisation():
  qks = [jnp.asarray(q, jnp.float32) for q in _qks(0, np.float32)]

  @jit
  def run(qks):
    return dict(d=csa.cdist(qks[0], qks[1]), dcs=csa.dcs_attention(qks[0], qks[1]),
                qcs={v: csa.qcs_attention(*qks, jnp.float32(0.3), variant=v)
                     for v in ('sd', 's', 'd')},
                sdpa=csa.sdpa_attention(qks[0], qks[1]), n=csa.normalize(qks[0], axis=1))

  out = run(qks)
  assert out['d'].shape == (B, NS[0], NS[1])
  m_a, m_p = out['dcs']
  assert m_a.shape == (B, NS[0]) and m_p.shape == (B, NS[1])
  for variant in ('sd', 's', 'd'):
    maps = out['qcs'][variant]
    assert [m.shape for m in maps] == [(B, n) for n in NS]
    for m in maps:
      np.testing.assert_allclose(np.sum(m, -1), 1.0, atol=1e-5)
  a_a, a_p = out['sdpa']
  assert a_a.shape == (B, NS[0], NS[1]) and a_p.shape == (B, NS[1], NS[0])
  np.testing.assert_allclose(np.sum(a_a, -1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.sum(a_p, -1), 1.0, atol=1e-5)
  n = out['n']
  np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, atol=1e-5)


def test_cdist_matches_direct_formula(x64):
  a, b = _qks(1, ns=(9, 11))
  d = np.asarray(jit(csa.cdist)(jnp.asarray(a), jnp.asarray(b)))
  assert d.dtype == np.float64
  direct = np.sqrt(np.sum((a[:, :, None, :] - b[:, None, :, :]) ** 2, -1))
  assert np.max(np.abs(d - direct)) <= 1e-12 * np.max(direct)


def test_cdist_gradient_finite_at_zero_distance():
  a = jnp.asarray(_qks(2, np.float32, ns=(6,))[0])
  z = jnp.zeros((2, 6, C))

  @jit
  def grads(a, z):
    return (jax.grad(lambda x: jnp.sum(csa.cdist(x, x)))(a),
            jax.grad(lambda x, y: jnp.sum(csa.cdist(x, y)), argnums=(0, 1))(z, z),
            jax.grad(lambda x: jnp.sum(csa.normalize(x, 1)))(z))

  g, gz, gn = grads(a, z)
  assert np.all(np.isfinite(g))
  # Exact zeros everywhere: the gradient is exactly 0 (the reference's subgradient).
  assert all(np.all(np.asarray(g) == 0) for g in gz)
  assert np.all(np.isfinite(gn))


def test_attention_gradients_finite_when_anchor_equals_positive():
  variant = 'sd'
  q1, _, q3, q4 = [jnp.asarray(q) for q in _qks(3, np.float32, ns=(6, 6, 6, 6))]
  theta = jnp.float32(0.1)

  def loss(q1, q3, q4, theta):
    maps = csa.qcs_attention(q1, q1, q3, q4, theta, variant)
    maps += csa.dcs_attention(q1, q1)
    return sum(jnp.sum(m * jnp.arange(m.shape[-1])) for m in maps)

  def degenerate(x, t):
    return sum(jnp.sum(m * jnp.arange(6)) for m in csa.qcs_attention(x, x, x, x, t, variant))

  @jit
  def grads(q1, q3, q4, theta, z):
    return (jax.grad(loss, argnums=(0, 1, 2, 3))(q1, q3, q4, theta),
            jax.grad(degenerate, argnums=(0, 1))(z, theta))

  # Degenerate z (all tokens equal): zero distances AND zero-norm rows.
  g, gz = grads(q1, q3, q4, theta, jnp.ones((2, 6, C)))
  assert all(np.all(np.isfinite(x)) for x in g)
  assert all(np.all(np.isfinite(x)) for x in gz)


@pytest.mark.parametrize('minmax', ['global', 'sample'])
def test_dcs_matches_torch_float64(x64, minmax):
  qks = [jnp.asarray(q) for q in _qks(4)[:2]]
  _check(lambda a, p, t: csa.dcs_attention(a, p, minmax),
         lambda a, p, t: t_dcs(a, p, minmax), qks, 0.0,
         [(B, NS[0]), (B, NS[1])], 1e-10)


@pytest.mark.parametrize('variant,minmax', [('sd', 'global'), ('s', 'global'),
                                            ('d', 'global'), ('sd', 'sample')])
def test_qcs_matches_torch_float64(x64, variant, minmax):
  qks = [jnp.asarray(q) for q in _qks(5)]
  theta = jnp.float64(0.37)
  _check(lambda *a: csa.qcs_attention(*a, variant=variant, minmax=minmax),
         lambda *a: t_qcs(*a, variant=variant, minmax=minmax), qks, theta,
         [(B, n) for n in NS], 1e-10)


def test_theta_gets_no_gradient_without_distance_factor(x64):
  qks = [jnp.asarray(q) for q in _qks(6)]

  @jit
  def theta_grads(qks, t):
    return {v: jax.grad(lambda t: sum(jnp.sum(m * m) for m in csa.qcs_attention(*qks, t, v)))(t)
            for v in ('sd', 's', 'd')}

  g = theta_grads(qks, jnp.float64(0.2))
  assert float(g['s']) == 0.0 and float(g['d']) == 0.0
  assert float(g['sd']) != 0.0


def test_sdpa_matches_torch_float64(x64):
  qks = [jnp.asarray(q) for q in _qks(7)[:2]]
  _check(lambda a, p, t: csa.sdpa_attention(a, p), lambda a, p, t: t_sdpa(a, p), qks, 0.0,
         [(B, NS[0], NS[1]), (B, NS[1], NS[0])], 1e-10)


def test_float32_maps_match_torch_float64():
  """float32 maps and gradients against the float64 torch reference, at 5e-5."""
  qks64 = _qks(8, ns=(49, 49, 49, 49), b=4)
  qks = [jnp.asarray(q, jnp.float32) for q in qks64]
  theta = jnp.float32(-0.4)
  w = _weights([(4, 49)] * 4)
  maps, (gq, gt) = _jax_maps_and_grads(lambda *a: csa.qcs_attention(*a), qks, theta, w)
  rmaps, (rgq, rgt) = _torch_maps_and_grads(t_qcs, qks64, float(theta), w)
  for m, r in zip(maps, rmaps):
    assert m.dtype == jnp.float32
    assert rel_err(m, r) <= 5e-5
  for g, r in zip(gq, rgq):
    assert rel_err(g, r) <= 5e-4  # gradients of softmax(sum of 49 normalised terms)
  assert abs(float(gt) - float(rgt)) <= 5e-4 * abs(float(rgt))
  dmaps = jit(csa.dcs_attention)(qks[0], qks[1])
  rd = t_dcs(*[torch.tensor(q) for q in qks64[:2]])
  for m, r in zip(dmaps, rd):
    assert rel_err(m, r.numpy()) <= 5e-5


def test_per_sample_minmax_decouples_samples(x64):
  qks = [jnp.asarray(q) for q in _qks(9)]
  theta = jnp.float64(0.5)

  @jit
  def run(qks, theta):
    return (csa.qcs_attention(*qks, theta, minmax='sample'),
            csa.qcs_attention(*qks, theta, minmax='global'),
            csa.dcs_attention(qks[0], qks[1], minmax='sample'),
            [csa.qcs_attention(*[q[i:i + 1] for q in qks], theta) for i in range(B)],
            [csa.dcs_attention(qks[0][i:i + 1], qks[1][i:i + 1]) for i in range(B)])

  per_sample, global_, dcs_s, qcs_alone, dcs_alone = run(qks, theta)
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(per_sample, global_)) > 1e-6
  for i in range(B):
    for m, a in zip(per_sample, qcs_alone[i]):
      np.testing.assert_allclose(np.asarray(m[i:i + 1]), np.asarray(a), rtol=0, atol=1e-12)
  for i in range(B):
    for m, a in zip(dcs_s, dcs_alone[i]):
      np.testing.assert_allclose(np.asarray(m[i:i + 1]), np.asarray(a), rtol=0, atol=1e-12)


def test_invalid_options_raise():
  q = jnp.zeros((1, 3, C))
  with pytest.raises(ValueError, match='minmax'):
    csa.dcs_attention(q, q, minmax='batch')
  with pytest.raises(ValueError, match='variant'):
    csa.qcs_attention(q, q, q, q, 0.0, variant='x')
  with pytest.raises(ValueError, match='cdist'):
    csa.cdist(q, jnp.zeros((1, 3, C + 1)))
