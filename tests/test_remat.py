"""config.model.remat: rematerialised IR units give the same loss, gradients and
BatchNorm statistics as storing every activation, with the same parameter tree."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qcs_jax.models import build_model
from qcs_jax.models.backbone import IR50, REMAT_POLICIES, remat_unit

FAST_COMPILE = {'xla_backend_optimization_level': 0}
TINY = dict(img_size=64, stage_channels=(8, 16, 32), stage_units=(1, 1, 2), embed_dim=32,
            num_heads=2, num_classes=5, base_depth=1, name='qcs', csa='sd')


def backbone_grads(remat: str, variables, x):
  """Loss, parameter gradients and new BatchNorm statistics of a train-mode IR50."""
  net = IR50(32, (4, 8, 8), (1, 2, 1), remat=remat)

  def loss(params):
    outs, upd = net.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                          train=True, groups=2, mutable=['batch_stats'])
    return sum(jnp.sum(jnp.sin(o)) for o in outs), upd

  fn = jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=FAST_COMPILE)
  (value, upd), grads = fn(variables['params'])
  return value, grads, upd


def test_remat_policies_match_no_remat_in_float64(x64):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float64)
  shapes = jax.eval_shape(lambda: IR50(32, (4, 8, 8), (1, 2, 1)).init(
      jax.random.key(0), x, train=False))
  rng = np.random.default_rng(1)
  variables = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape) /
                                                 np.sqrt(max(1, np.prod(s.shape[:-1]))),
                                                 jnp.float64), shapes)
  ref_value, ref_grads, ref_upd = backbone_grads('none', variables, x)
  for policy in ('convs', 'full'):
    value, grads, upd = backbone_grads(policy, variables, x)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    assert abs(float(value - ref_value)) <= 1e-10 * abs(float(ref_value))
    for ours, ref in zip(jax.tree.leaves((grads, upd)), jax.tree.leaves((ref_grads, ref_upd))):
      scale = float(jnp.max(jnp.abs(ref))) or 1.0
      assert float(jnp.max(jnp.abs(ours - ref))) <= 1e-10 * scale, policy


def test_model_parameter_tree_does_not_depend_on_remat():
  """A checkpoint trained with one policy loads into the model with another."""
  x = jax.ShapeDtypeStruct((1, 4, 64, 64, 3), jnp.float32)
  trees = [jax.eval_shape(lambda p=p: build_model(dict(TINY, remat=p)).init(
      jax.random.key(0), jnp.zeros(x.shape))) for p in REMAT_POLICIES]
  assert all(jax.tree.structure(t) == jax.tree.structure(trees[0]) for t in trees)


def test_remat_names_the_key_when_invalid():
  assert REMAT_POLICIES == ('none', 'convs', 'full')
  with pytest.raises(ValueError, match='config.model.remat'):
    build_model(dict(TINY, remat='everything'))
  with pytest.raises(ValueError, match='config.model.remat'):
    remat_unit('dots')
