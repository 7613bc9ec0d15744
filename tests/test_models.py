"""QCSModel: parameter tree, branch batching, grouped BatchNorm, cross module, dtypes."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import jit, rel_err, tiny_model_cfg
from qcs_jax.models import build_model, csa, num_branches, tokens_per_level
from qcs_jax.models.backbone import (BottleneckIR, GroupedBatchNorm, nearest_indices,
                                    resize_nearest)
from qcs_jax.models.cross import CrossAttention
from qcs_jax.models.vit import VisionTransformer

# Units (1, 1, 2) and two VIT_base blocks: the tree test sees every repeated name.
TINY = dict(stage_units=(1, 1, 2), base_depth=2, num_classes=5)
K = TINY['num_classes']


def tiny_model(name='qcs', **kw):
  return build_model(tiny_model_cfg(name, **{**TINY, **kw}))


def images(b, nb, seed=0, size=64):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, nb, size, size, 3)),
                     jnp.float32)


def fake_variables(model, x, seed=0):
  """Random variables of the right tree without compiling an init (numpy RNG).

  Kernels ~ N(0, 1/fan_in) keep activations O(1); BN statistics are non-trivial;
  theta != 0 so that k' = tanh(theta) + 1 is exercised.
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    key = jax.tree_util.keystr(path)
    if key.endswith("['var']") or key.endswith("['scale']"):
      val = rng.uniform(0.5, 1.5, s.shape)
    elif key.endswith("['theta']"):
      val = np.float64(0.3)
    elif key.endswith("['kernel']"):
      val = rng.normal(size=s.shape) / math.sqrt(np.prod(s.shape[:-1]))
    elif key.endswith("['alpha']"):
      val = rng.uniform(0.1, 0.4, s.shape)
    else:
      val = rng.normal(0.0, 0.1, s.shape)
    return jnp.asarray(val, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def tree_keys(tree):
  return set(tree.keys())


# --- structure -------------------------------------------------------------------


@pytest.mark.parametrize('name,csa_', [('baseline', 'sd'), ('dcs', 's'), ('dcs', 'sdpa'),
                                       ('qcs', 'sd')])
def test_parameter_tree_and_output_shapes(name, csa_):
  """The exact variable tree (models/shapes.py; naming in docs/CONVERTER.md section 3) and output shapes (shape inference only)."""
  nb = num_branches(name)
  model = tiny_model(name, csa=csa_)
  x = images(3, nb)
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  out, upd = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats', 'intermediates']),
      v, x)
  assert out['base'].shape == (3, nb, K)
  if name == 'baseline':
    assert set(out) == {'base'}
  else:
    assert out['cross'].shape == (3, nb, K)
    att = upd['intermediates']['cross_attention_1']['attention'][0]
    n = tokens_per_level(64)
    assert att.shape == ((3, 2, n, n) if csa_ == 'sdpa' else (3, nb, n))
  assert jax.tree.structure(upd['batch_stats']) == jax.tree.structure(v['batch_stats'])
  p = v['params']
  top = {'ir_back', 'conv1', 'conv2', 'conv3', 'embed_q_0', 'embed_q_1', 'embed_k',
         'embed_v', 'VIT_base'}
  if name != 'baseline':
    top |= {'VIT_cross', 'cross_attention_1', 'cross_attention_2', 'cross_attention_3'}
  assert tree_keys(p) == top
  ir = p['ir_back']
  units = ['body1_0', 'body2_0', 'body3_0', 'body3_1']
  assert tree_keys(ir) == {'input_conv', 'input_bn', 'input_prelu', *units}
  assert ir['input_conv']['kernel'].shape == (3, 3, 3, 8)
  assert tree_keys(ir['input_conv']) == {'kernel'}
  assert ir['input_prelu']['alpha'].shape == (8,)
  res = {'res_bn1', 'res_conv1', 'res_prelu', 'res_conv2', 'res_bn2'}
  assert tree_keys(ir['body1_0']) == res  # 8 -> 8: MaxPool shortcut, no params
  assert tree_keys(ir['body3_1']) == res
  assert tree_keys(ir['body2_0']) == res | {'shortcut_conv', 'shortcut_bn'}
  assert ir['body2_0']['shortcut_conv']['kernel'].shape == (1, 1, 8, 16)
  assert ir['body2_0']['res_conv2']['kernel'].shape == (3, 3, 16, 16)
  assert tree_keys(ir['body2_0']['res_bn1']) == {'scale', 'bias'}
  bs = v['batch_stats']['ir_back']
  assert tree_keys(bs['body2_0']) == {'res_bn1', 'res_bn2', 'shortcut_bn'}
  assert tree_keys(bs['input_bn']) == {'mean', 'var'}
  assert p['embed_q_0']['kernel'].shape == (3, 3, 8, 32)
  assert p['embed_q_1']['kernel'].shape == (3, 3, 32, 32)
  assert p['embed_k']['kernel'].shape == (3, 3, 16, 32)
  assert p['embed_v']['kernel'].shape == (1, 1, 32, 32)
  assert p['conv3']['bias'].shape == (32,)
  vit = p['VIT_base']
  assert tree_keys(vit) == {'cls_token', 'pos_embed', 'blocks_0', 'blocks_1', 'norm',
                            'se_block', 'head'}
  assert vit['pos_embed'].shape == (1, 1 + 3 * tokens_per_level(64), 32)
  assert vit['cls_token'].shape == (1, 1, 32)
  blk = vit['blocks_0']
  assert tree_keys(blk) == {'norm1', 'attn', 'norm2', 'mlp'}
  assert tree_keys(blk['attn']) == {'qkv', 'proj'}
  assert blk['attn']['qkv']['kernel'].shape == (32, 96)
  assert blk['mlp']['fc1']['kernel'].shape == (32, 128)
  assert tree_keys(vit['se_block']) == {'linear1', 'linear2'}
  assert vit['head']['kernel'].shape == (32, K)
  if name != 'baseline':
    assert tree_keys(p['VIT_cross']) == tree_keys(vit) - {'blocks_1'}
    ca = p['cross_attention_2']
    expect = {'norm1', 'norm2', 'proj', 'mlp'} | ({'theta'} if name == 'qcs' else set())
    assert tree_keys(ca) == expect
    assert ca['proj']['kernel'].shape == (32, 64)
    assert tree_keys(ca['mlp']) == {'fc1', 'fc2'}
    if name == 'qcs':
      assert ca['theta'].shape == ()


# Parameters of the released model files that their forward uses: the sum over the
# state_dict keys of official_state_dict_shapes.json (QCS_7cls_raf_db, DCS_8cls_affectnet)
# that the converter maps, i.e. all but output_layer, blocks.*.conv, CON1, IRLinear1/2,
# eca_block, patch_embed and the BatchNorm buffers.
RELEASED_USED_PARAMS = {('qcs', 7): 66_810_513, ('dcs', 8): 66_812_048}


@pytest.mark.parametrize('name,classes', sorted(RELEASED_USED_PARAMS))
def test_full_size_parameter_count_equals_released_model(name, classes):
  model = build_model(dict(name=name, csa='s' if name == 'dcs' else 'sd', num_classes=classes))
  x = jax.ShapeDtypeStruct((1, num_branches(name), 224, 224, 3), jnp.float32)
  v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v['params']))
  assert n == RELEASED_USED_PARAMS[(name, classes)]


def test_full_size_shapes():
  """The 224 model: 147 tokens of 768, stage maps 56/28/14 (shape inference only)."""
  model = build_model(ml_collections.ConfigDict(dict(name='qcs', csa='sd')))
  x = jax.ShapeDtypeStruct((1, 4, 224, 224, 3), jnp.float32)
  v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  assert v['params']['VIT_base']['pos_embed'].shape == (1, 148, 768)
  assert len([k for k in v['params']['ir_back'] if k.startswith('body3_')]) == 14
  feats = jax.eval_shape(lambda v, x: model.apply(v, x[:, 0], method='features'), v, x)
  assert feats['x1'].shape == (1, 56, 56, 64)
  assert feats['x2'].shape == (1, 28, 28, 128)
  assert feats['x3'].shape == (1, 14, 14, 256)
  assert feats['tokens'].shape == (1, 147, 768)
  assert feats['logits'].shape == (1, 7)


def test_invalid_configs_raise():
  bad = [dict(name='dcs', csa='sd'), dict(name='qcs', csa='sdpa'), dict(name='qcs', csa='x'),
         dict(name='triplet'), dict(minmax='batch'), dict(dtype='float16'),
         dict(stage_units=(1, 1)), dict(embed_dim=30, num_heads=4)]
  for kw in bad:
    with pytest.raises(ValueError, match=next(iter(kw))):
      tiny_model(**kw)
  with pytest.raises(ValueError, match='unknown keys'):
    build_model(dict(tiny_model_cfg('qcs'), depth=3))
  model = tiny_model('dcs')
  with pytest.raises(ValueError, match=r'\(B, 2, H, W, 3\)'):
    jax.eval_shape(lambda: model.init(jax.random.key(0), images(1, 4)))
  # Every valid combination builds; the baseline ignores csa.
  for name, choices in (('dcs', ('s', 'sdpa')), ('qcs', ('sd', 's', 'd')),
                        ('baseline', ('sd', 'sdpa'))):
    for c in choices:
      assert tiny_model(name, csa=c).num_branches == num_branches(name)


# --- backbone pieces ----------------------------------------------------------------


@pytest.mark.parametrize('size_in,size_out', [(224, 112), (64, 32), (100, 32), (37, 18)])
def test_resize_matches_torch_nearest(size_in, size_out):
  x = np.random.default_rng(0).normal(size=(1, 3, size_in, size_in)).astype(np.float32)
  ref = F.interpolate(torch.tensor(x), size=size_out).numpy().transpose(0, 2, 3, 1)
  ours = resize_nearest(jnp.asarray(x.transpose(0, 2, 3, 1)), size_out)
  np.testing.assert_array_equal(np.asarray(ours), ref)
  if size_in == 2 * size_out:
    np.testing.assert_array_equal(nearest_indices(size_in, size_out), np.arange(size_out) * 2)


def test_grouped_batchnorm_equals_sequential_torch_calls(x64):
  """Per-branch normalisation and composed running statistics (unbiased variance)."""
  g, b, h, w, c = 4, 3, 5, 6, 7
  rng = np.random.default_rng(1)
  x = rng.normal(size=(b, g, h, w, c)) * rng.uniform(0.5, 3, size=(1, g, 1, 1, c)) + \
      rng.normal(size=(1, g, 1, 1, c))
  scale, bias = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
  mean0, var0 = rng.normal(size=c), rng.uniform(0.5, 2, c)
  variables = {'params': {'scale': jnp.asarray(scale), 'bias': jnp.asarray(bias)},
               'batch_stats': {'mean': jnp.asarray(mean0), 'var': jnp.asarray(var0)}}
  bn = GroupedBatchNorm()
  stacked = jnp.asarray(x.reshape(b * g, h, w, c))  # item b*G + g = sample b of branch g
  y, upd = bn.apply(variables, stacked, train=True, groups=g, mutable=['batch_stats'])

  tbn = torch.nn.BatchNorm2d(c, eps=1e-5, momentum=0.1).double()
  with torch.no_grad():
    tbn.weight.copy_(torch.tensor(scale))
    tbn.bias.copy_(torch.tensor(bias))
    tbn.running_mean.copy_(torch.tensor(mean0))
    tbn.running_var.copy_(torch.tensor(var0))
  tbn.train()
  for gi in range(g):  # the reference: one call per branch, in branch order
    ref = tbn(torch.tensor(x[:, gi].transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
    assert np.max(np.abs(np.asarray(y).reshape(b, g, h, w, c)[:, gi] - ref)) < 1e-12
  np.testing.assert_allclose(upd['batch_stats']['mean'], tbn.running_mean.numpy(), rtol=1e-12)
  np.testing.assert_allclose(upd['batch_stats']['var'], tbn.running_var.numpy(), rtol=1e-12)
  # ... which is the closed form (1-m)^G r + sum_i m (1-m)^(G-1-i) s_i.
  n = b * h * w
  s_var = x.var(axis=(0, 2, 3)) * n / (n - 1)
  closed = 0.9 ** g * var0 + sum(0.1 * 0.9 ** (g - 1 - i) * s_var[i] for i in range(g))
  np.testing.assert_allclose(upd['batch_stats']['var'], closed, rtol=1e-12)
  # Eval mode: running statistics, no update.
  tbn.eval()
  y_eval, upd_eval = bn.apply(variables, stacked, train=False, mutable=['batch_stats'])
  ref = tbn.__class__(c).double()
  ref.load_state_dict({'weight': torch.tensor(scale), 'bias': torch.tensor(bias),
                       'running_mean': torch.tensor(mean0), 'running_var': torch.tensor(var0),
                       'num_batches_tracked': torch.tensor(0)})
  ref.eval()
  want = ref(torch.tensor(np.asarray(stacked).transpose(0, 3, 1, 2))).detach().numpy()
  assert np.max(np.abs(np.asarray(y_eval) - want.transpose(0, 2, 3, 1))) < 1e-12
  np.testing.assert_array_equal(upd_eval['batch_stats']['mean'], mean0)


# --- the cross module ------------------------------------------------------------------


def _ln(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p['scale'] + p['bias']


def _gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


@pytest.mark.parametrize('kind,variant', [('qcs', 'sd'), ('qcs', 'd'), ('dcs', 'sd'),
                                          ('sdpa', 'sd')])
def test_cross_module_formula(x64, kind, variant):
  nb, n, d = (4 if kind == 'qcs' else 2), 6, 16
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, nb, n, d)))
  mod = CrossAttention(kind, variant)
  v = fake_variables(mod, x, seed=3)
  v = jax.tree.map(lambda a: a.astype(jnp.float64), v)
  out, inter = jit(lambda v, x: mod.apply(v, x, mutable=['intermediates']))(v, x)
  p = jax.tree.map(np.asarray, v['params'])
  xn = np.asarray(x)
  h = _ln(xn, p['norm1'], 1e-5)
  qkv = h @ p['proj']['kernel'] + p['proj']['bias']
  qk, val = qkv[..., :d], qkv[..., d:]
  br = [jnp.asarray(qk[:, i]) for i in range(nb)]
  if kind == 'qcs':
    m = np.stack(jit(csa.qcs_attention, static_argnums=5)(*br, p['theta'], variant), 1)
    h = h + m[..., None] * val
  elif kind == 'dcs':
    m = np.stack(jit(csa.dcs_attention)(*br), 1)
    h = h + m[..., None] * val
  else:
    a_a, a_p = map(np.asarray, jit(csa.sdpa_attention)(*br))
    m = np.stack([a_a, a_p], 1)
    h = h + np.stack([a_a @ val[:, 1], a_p @ val[:, 0]], 1)
  h = _ln(h, p['norm2'], 1e-5)
  mlp = p['mlp']
  want = h + _gelu(h @ mlp['fc1']['kernel'] + mlp['fc1']['bias']) @ mlp['fc2']['kernel'] + \
      mlp['fc2']['bias']
  assert rel_err(out, want) < 1e-12
  np.testing.assert_allclose(inter['intermediates']['attention'][0], m, rtol=1e-12)


# --- the whole model ---------------------------------------------------------------------


def _per_branch(model, v, imgs):
  """The reference's way: one train-mode call per branch IN ORDER, each updating the
  running statistics left by the previous one; then the shared cross path and one
  VIT_cross call per branch. (lax.scan/map: one compiled copy of each piece.)"""
  def one_branch(stats, xg):
    (logits, tokens, _), upd = model.apply(
        {'params': v['params'], 'batch_stats': stats}, xg, train=True,
        method='base_forward', mutable=['batch_stats'])
    return upd['batch_stats'], (logits, tokens)

  stats, (base, tokens) = jax.lax.scan(one_branch, v['batch_stats'], jnp.swapaxes(imgs, 0, 1))
  cross = _cross_per_branch(model, v, jnp.swapaxes(tokens, 0, 1))
  return {'base': jnp.swapaxes(base, 0, 1), 'cross': cross}, stats


def _cross_per_branch(model, v, tokens):
  """tokens (B, nb, T, D) -> cross logits (B, nb, K): each level's cross module on its
  own, the residual, then one VIT_cross call per branch (eval mode)."""
  def refine(m, tokens):
    levels = jnp.split(tokens, 3, axis=2)
    mods = (m.cross_attention_1, m.cross_attention_2, m.cross_attention_3)
    return tokens + jnp.concatenate([c(lv) for c, lv in zip(mods, levels)], axis=2)

  u = model.apply(v, tokens, method=refine)
  cross = jax.lax.map(lambda ug: model.apply(v, ug, method=lambda m, t: m.VIT_cross(t)[0]),
                      jnp.swapaxes(u, 0, 1))
  return jnp.swapaxes(cross, 0, 1)


def test_stacked_train_forward_equals_per_branch_calls():
  model = tiny_model('qcs', stage_units=(1, 1, 1), base_depth=1)
  x = images(2, 4, seed=5)
  v = fake_variables(model, x, seed=6)

  @jit
  def both(v, x):
    stacked = model.apply(v, x, train=True, mutable=['batch_stats', 'intermediates'])
    return stacked, _per_branch(model, v, x)

  (out, upd), (ref, ref_stats) = both(v, x)
  for key in ('base', 'cross'):
    assert out[key].shape == (2, 4, K)
    assert rel_err(out[key], ref[key]) < 2e-5, key
  errs = jax.tree.map(rel_err, upd['batch_stats'], ref_stats)
  assert max(jax.tree.leaves(errs)) < 2e-5
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), upd['batch_stats'],
                       v['batch_stats'])
  assert min(jax.tree.leaves(moved)) > 1e-3  # every BN was updated
  for lvl in (1, 2, 3):
    att = upd['intermediates'][f'cross_attention_{lvl}']['attention'][0]
    np.testing.assert_allclose(np.sum(att, -1), 1.0, atol=1e-5)
  # Branches really are separated: swapping two branches swaps their base outputs.
  (out_sw, _), _ = both(v, x[:, ::-1])
  assert rel_err(out_sw['base'][:, ::-1], out['base']) < 2e-5


def test_eval_stacked_equals_infer_and_features():
  model = tiny_model('dcs', csa='sdpa', stage_units=(1, 1, 1), base_depth=1)
  x = images(3, 2, seed=7)
  v = fake_variables(model, x, seed=8)

  @jit
  def run(v, x):
    out = model.apply(v, x, train=False)
    feats = jax.lax.map(lambda xg: model.apply(v, xg, method='features'), jnp.swapaxes(x, 0, 1))
    infer = jax.lax.map(lambda xg: model.apply(v, xg, method='infer'), jnp.swapaxes(x, 0, 1))
    cross = _cross_per_branch(model, v, jnp.swapaxes(feats['tokens'], 0, 1))
    return out, jnp.swapaxes(infer, 0, 1), cross

  out, infer, cross = run(v, x)
  assert infer.shape == (3, 2, K) and cross.shape == (3, 2, K)
  assert rel_err(out['base'], infer) < 1e-5
  # Eval cross logits: the branches' eval tokens through the cross path piece by piece.
  assert rel_err(out['cross'], cross) < 1e-5
  assert rel_err(out['cross'], out['base']) > 1e-2  # a different head, not a copy
  feats = jax.eval_shape(lambda v, x: model.apply(v, x, method='features'), v, x[:, 0])
  assert feats['x1'].shape == (3, 16, 16, 8) and feats['x3'].shape == (3, 4, 4, 32)
  assert feats['tokens'].shape == (3, 12, 32) and feats['logits'].shape == (3, K)


def test_default_init_rules():
  """Section 3: PyTorch defaults outside the ViTs, trunc-normal inside, theta 0.

  Initialises the pieces (embedding convs, one IR unit, a cross module, a ViT)
  rather than the whole model: each random draw costs compile time on CPU.
  """
  model = tiny_model('qcs', embed_dim=64)
  feats = [jnp.zeros((1, 8, 8, c)) for c in (8, 16, 32)]

  def some_convs(m, x1, x2, x3):
    return m.embed_q_0(x1), m.conv2(x2), m.embed_v(x3)

  unit = BottleneckIR(8, 16, 2)
  cross = CrossAttention('qcs', 'sd')
  vit = VisionTransformer(num_classes=K, embed_dim=64, depth=1, num_heads=2)

  @jit
  def init(key):
    k = jax.random.split(key, 4)
    return (model.init(k[0], *feats, method=some_convs),
            unit.init(k[1], feats[0], train=False),
            cross.init(k[2], jnp.zeros((1, 4, 4, 64))),
            vit.init(k[3], jnp.zeros((1, 12, 64))))

  v_embed, v_unit, v_cross, v_vit = jax.tree.map(np.asarray, init(jax.random.key(0, impl='rbg')))
  p, pu, pc, pv = v_embed['params'], v_unit['params'], v_cross['params'], v_vit['params']
  np.testing.assert_array_equal(pu['res_bn1']['scale'], 1)
  np.testing.assert_array_equal(pu['shortcut_bn']['bias'], 0)
  np.testing.assert_array_equal(pu['res_prelu']['alpha'], 0.25)
  np.testing.assert_array_equal(v_unit['batch_stats']['res_bn2']['var'], 1)
  np.testing.assert_array_equal(v_unit['batch_stats']['res_bn2']['mean'], 0)
  assert float(pc['theta']) == 0.0
  np.testing.assert_array_equal(pc['norm1']['scale'], 1)
  # U(+-1/sqrt(fan_in)) for weights and biases: bound respected, std ~ bound/sqrt(3).
  for arr, fan_in in ((p['embed_q_0']['kernel'], 9 * 8), (p['embed_q_0']['bias'], 9 * 8),
                      (p['embed_v']['bias'], 32), (p['conv2']['bias'], 9 * 16),
                      (pc['proj']['kernel'], 64), (pc['mlp']['fc2']['bias'], 256),
                      (pc['mlp']['fc1']['kernel'], 64), (pu['res_conv2']['kernel'], 9 * 16),
                      (pu['shortcut_conv']['kernel'], 8)):
    bound = 1 / math.sqrt(fan_in)
    assert np.max(np.abs(arr)) <= bound
    assert np.max(np.abs(arr)) > 0.5 * bound
    if arr.size > 1000:
      assert abs(arr.std() / (bound / math.sqrt(3)) - 1) < 0.1
  for arr in (pv['blocks_0']['mlp']['fc1']['kernel'], pv['blocks_0']['attn']['qkv']['kernel']):
    assert abs(arr.std() / 0.01 - 1) < 0.1
  for arr in (pv['blocks_0']['attn']['qkv']['bias'], pv['head']['bias'],
              pv['se_block']['linear1']['bias']):
    np.testing.assert_array_equal(arr, 0)
  np.testing.assert_array_equal(pv['norm']['scale'], 1)
  assert abs(pv['pos_embed'].std() / 0.02 - 1) < 0.15
  assert pv['pos_embed'].shape == (1, 13, 64)


def test_bfloat16_path():
  """bf16 compute, float32 params/statistics/logits, close to the float32 model."""
  small = dict(stage_units=(1, 1, 1), base_depth=1)
  model16 = tiny_model('qcs', dtype='bfloat16', **small)
  model32 = tiny_model('qcs', **small)
  x = images(2, 4, seed=9)
  v = fake_variables(model32, x, seed=10)

  @jit
  def run(v, x):
    o16, s16 = model16.apply(v, x, train=True, mutable=['batch_stats'])
    o32, s32 = model32.apply(v, x, train=True, mutable=['batch_stats'])
    return o16, s16, o32, s32

  o16, s16, o32, s32 = run(v, x)
  # bf16 keeps 8 significant bits (eps 2^-7). Measured (3 seeds): logits 0.009-0.018
  # of max|logit|, running statistics <= 0.0064; float32 compute would give ~1e-6.
  eps = float(jnp.finfo(jnp.bfloat16).eps)
  for key in ('base', 'cross'):
    assert o16[key].dtype == jnp.float32
    assert eps / 32 < rel_err(o16[key], o32[key]) < 4 * eps, key
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(s16))
  stats_err = max(jax.tree.leaves(jax.tree.map(rel_err, s16, s32)))
  assert eps / 32 < stats_err < 2 * eps


def test_float64_follows_params_and_inputs(x64):
  model = tiny_model('qcs', stage_units=(1, 1, 1), base_depth=1)
  x = jax.ShapeDtypeStruct((2, 4, 64, 64, 3), jnp.float64)
  v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  v = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float64), v)
  out, upd = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']), v, x)
  assert out['base'].dtype == jnp.float64 and out['cross'].dtype == jnp.float64
  assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(upd))


def test_vit_dropout_only_in_train():
  vit = VisionTransformer(num_classes=3, embed_dim=16, depth=1, num_heads=2, drop_ratio=0.3,
                          proj_drop=0.3)
  t = jnp.asarray(np.random.default_rng(13).normal(size=(2, 5, 16)), jnp.float32)
  v = fake_variables(vit, t)

  @jit
  def run(v, t, key):
    ev1 = vit.apply(v, t, train=False)
    ev2 = vit.apply(v, t, train=False, rngs={'dropout': key})
    tr = vit.apply(v, t, train=True, rngs={'dropout': key})
    nodrop = vit.clone(drop_ratio=0.0, proj_drop=0.0)
    return ev1, ev2, tr, nodrop.apply(v, t, train=True), nodrop.apply(v, t, train=False)

  ev1, ev2, tr, nd_tr, nd_ev = run(v, t, jax.random.key(0, impl='rbg'))
  np.testing.assert_array_equal(ev1[0], ev2[0])
  assert ev1[1].shape == (2, 5, 16)
  assert float(jnp.max(jnp.abs(tr[0] - ev1[0]))) > 1e-4
  np.testing.assert_array_equal(nd_tr[0], nd_ev[0])
