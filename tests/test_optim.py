"""SAM-around-Adam against a hand-written two-pass reference; the loss; the LR decay."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from qcs_jax.training import losses, optim


def _toy_loss(params, x, y):
  pred = jnp.tanh(x @ params["w"] + params["b"])
  return jnp.mean((pred - y) ** 2)


def _reference_sam_adam(params, data, lr, rho, steps, b1=0.9, b2=0.999, eps=1e-8):
  """SAM as the reference writes it, with Adam written out (torch.optim.Adam's formula)."""
  m = jax.tree.map(jnp.zeros_like, params)
  v = jax.tree.map(jnp.zeros_like, params)
  for t in range(1, steps + 1):
    x, y = data[t - 1]
    g = jax.grad(_toy_loss)(params, x, y)
    norm = jnp.sqrt(sum(jnp.sum(l ** 2) for l in jax.tree.leaves(g)))
    w_adv = jax.tree.map(lambda p, gi: p + rho * gi / (norm + 1e-12), params, g)
    g2 = jax.grad(_toy_loss)(w_adv, x, y)
    m = jax.tree.map(lambda mi, gi: b1 * mi + (1 - b1) * gi, m, g2)
    v = jax.tree.map(lambda vi, gi: b2 * vi + (1 - b2) * gi ** 2, v, g2)
    params = jax.tree.map(
        lambda p, mi, vi: p - lr * (mi / (1 - b1 ** t)) / (jnp.sqrt(vi / (1 - b2 ** t)) + eps),
        params, m, v)
  return params


def test_sam_matches_two_pass_reference(x64):
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(5, 3))), "b": jnp.asarray(rng.normal(size=3))}
  data = [(jnp.asarray(rng.normal(size=(16, 5))), jnp.asarray(rng.normal(size=(16, 3))))
          for _ in range(4)]
  lr, rho = 0.05, 0.05
  tx = optim.sam(optax.adam(lr), rho)
  state = tx.init(params)
  ours = params
  for x, y in data:
    grad_fn = lambda p, _, x=x, y=y: jax.grad(_toy_loss)(p, x, y)  # noqa: E731
    updates, state = tx.update(grad_fn(ours, 0), state, ours, grad_fn=grad_fn)
    ours = optax.apply_updates(ours, updates)
  ref = _reference_sam_adam(params, data, lr, rho, len(data))
  for k in params:
    err = float(jnp.max(jnp.abs(ours[k] - ref[k])) / jnp.max(jnp.abs(ref[k])))
    assert err <= 1e-12, (k, err)
  # SAM must differ from plain Adam on the same data, or the test proves nothing.
  plain, st = params, optax.adam(lr).init(params)
  for x, y in data:
    u, st = optax.adam(lr).update(jax.grad(_toy_loss)(plain, x, y), st, plain)
    plain = optax.apply_updates(plain, u)
  assert float(jnp.max(jnp.abs(plain["w"] - ref["w"]))) > 1e-6


def test_epoch_decay_is_per_epoch():
  sched = optim.epoch_decay(1.0, 0.98, steps_per_epoch=10)
  assert float(sched(0)) == 1.0 and float(sched(9)) == 1.0
  np.testing.assert_allclose(float(sched(10)), 0.98, rtol=1e-6)
  np.testing.assert_allclose(float(sched(25)), 0.98 ** 2, rtol=1e-6)


def test_warmup_ramps_then_decays_per_epoch():
  cfg = ml_collections.ConfigDict(dict(lr=2.0, gamma=0.5, warmup_steps=4))
  sched = optim.schedule(cfg, steps_per_epoch=10)
  got = [float(sched(i)) for i in (0, 1, 3, 9, 10, 20)]
  np.testing.assert_allclose(got, [0.5, 1.0, 2.0, 2.0, 1.0, 0.5], rtol=1e-6)
  cfg.warmup_steps = 0  # the recipes' schedule, untouched
  assert float(optim.schedule(cfg, 10)(0)) == 2.0
  assert float(optim.current_lr(cfg, 10, 10)) == 1.0


def test_make_optimizer_passes():
  cfg = ml_collections.ConfigDict(dict(lr=1e-3, gamma=0.98, b1=0.9, b2=0.999, eps=1e-8,
                                       rho=0.05, sam=True))
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.asarray([1.0, -2.0, 0.5])}
  calls = []

  def grad_fn(p, i):
    calls.append(i)
    return grads

  for sam, n_calls in ((True, 1), (False, 0)):
    cfg.sam = sam
    tx = optim.make_optimizer(cfg, 5)
    calls.clear()
    updates, _ = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
    assert len(calls) == n_calls
    np.testing.assert_allclose(updates["w"], -1e-3 * np.sign(grads["w"]), rtol=1e-4)


def test_branch_cross_entropy_is_mean_of_terms():
  rng = np.random.default_rng(1)
  base = jnp.asarray(rng.normal(size=(3, 4, 7)), jnp.float32)
  cross = jnp.asarray(rng.normal(size=(3, 4, 7)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 7, size=(3, 4)))
  terms = [optax.softmax_cross_entropy_with_integer_labels(o[:, b], labels[:, b]).mean()
           for o in (base, cross) for b in range(4)]
  got = losses.branch_cross_entropy({"base": base, "cross": cross}, labels)
  np.testing.assert_allclose(float(got), float(np.mean(terms)), rtol=1e-6)
  one = losses.branch_cross_entropy({"base": base[:, :1]}, labels[:, :1])
  np.testing.assert_allclose(float(one), float(terms[0]), rtol=1e-6)
