"""PyTorch file reading, key mapping, refusals, checkpoints and the CLI."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import pickle
import re
import types
import zipfile

import jax
import numpy as np
import pytest
import torch

from qcs_jax.interop import reference as R
from qcs_jax.interop import reference_files as RF
from qcs_jax import models
from qcs_jax.model_files import model_dir as checkpoint
from qcs_jax.interop import converter as convert

TOL32 = 1e-5
REPO = pathlib.Path(__file__).resolve().parents[1]


def _load_cli():
  from qcs_jax.cli import convert as cli  # pylint: disable=import-outside-toplevel
  return cli


@functools.lru_cache(maxsize=None)
def _jitted(cfg_items: tuple, method: str):
  model = models.build_model(dict(cfg_items))
  if method == 'features':
    return jax.jit(lambda v, x: model.apply(v, x, method='features'),
                   compiler_options=R.FAST_COMPILE)
  return jax.jit(lambda v, x: model.apply(v, x, train=False),
                 compiler_options=R.FAST_COMPILE)


def flax_features(cfg, variables, images):
  return _jitted(tuple(sorted(cfg.items())), 'features')(variables, images)


def flax_train_graph(cfg, variables, images):
  return _jitted(tuple(sorted(cfg.items())), 'call')(variables, images)


def numpy_sd(module: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in module.state_dict().items()}


def trees_equal(a, b) -> bool:
  fa, fb = convert.flatten_tree(a), convert.flatten_tree(b)
  return set(fa) == set(fb) and all(
      fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]) for k in fa)


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """Tiny QCS (7 classes) and DCS (8 classes) references and their files."""
  d = tmp_path_factory.mktemp('pth')
  cfg = R.make_cfg()
  qcs = R.build_reference(cfg, seed=0)
  units = cfg['stage_units']
  RF.save_ir50(d / 'ir50_consecutive.pth', qcs.ir_back, 'consecutive', units)
  RF.save_ir50(d / 'ir50_split.pth', qcs.ir_back, 'split', units)
  RF.save_ir50(d / 'ir50_legacy.pth', qcs.ir_back, 'consecutive', units,
              legacy=True)
  RF.save_full_checkpoint(d / 'qcs_full.pth', qcs)
  torch.save(qcs.state_dict(), d / 'qcs_plain.pth')  # a plain state dict
  dcs_cfg = R.make_cfg(name='dcs', csa='s', num_classes=8)
  dcs = R.build_reference(dcs_cfg, seed=1)
  RF.save_full_checkpoint(d / 'dcs_full.pth', dcs, embed_names='123')
  return types.SimpleNamespace(dir=d, cfg=cfg, qcs=qcs, dcs_cfg=dcs_cfg,
                               dcs=dcs)


@pytest.fixture(scope='module')
def qcs_converted(env):
  sd, _ = convert.load_torch_file(env.dir / 'qcs_full.pth')
  return convert.convert_model(sd, env.cfg)


# ----------------------------------------------------------------------------
# Reading files.


@pytest.mark.parametrize('name', ['ir50_consecutive', 'ir50_split',
                                  'ir50_legacy'])
@pytest.mark.parametrize('prefer_torch', [True, False])
def test_reads_state_dict_files(env, name, prefer_torch):
  sd, how = convert.load_torch_file(env.dir / f'{name}.pth', prefer_torch)
  layout = 'split' if name == 'ir50_split' else 'consecutive'
  want = RF.ir50_state_dict(env.qcs.ir_back, layout, env.cfg['stage_units'])
  assert list(sd) == list(want)
  for k, v in want.items():
    assert sd[k].dtype == v.numpy().dtype, k
    np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)
  assert ('torch.load(weights_only=True)' in how) == prefer_torch
  assert ('restricted' in how) != prefer_torch


def test_full_checkpoint_falls_back_to_restricted_reader(env):
  path = env.dir / 'qcs_full.pth'
  with pytest.raises(pickle.UnpicklingError):  # what the authors' loader hits
    torch.load(path, map_location='cpu', weights_only=True)
  sd, how = convert.load_torch_file(path)
  assert 'restricted unpickler' in how and 'training-script classes' in how
  assert '__main__.RecorderMeter_loss' in how and 'epoch 7' in how
  want = numpy_sd(env.qcs)
  assert set(sd) == {'module.' + k for k in want}
  for k, v in want.items():
    np.testing.assert_array_equal(sd['module.' + k], v, err_msg=k)


def test_restricted_reader_refuses_foreign_callables(tmp_path):
  marker = tmp_path / 'payload_ran'

  class Payload:
    def __reduce__(self):
      return (os.mkdir, (str(marker),))

  path = tmp_path / 'evil.pth'
  torch.save({'state_dict': {'w': torch.ones(2)}, 'payload': Payload()}, path)
  for prefer_torch in (True, False):
    with pytest.raises(convert.ConversionError, match=r'posix\.mkdir \(os\.mkdir\)'):
      convert.load_torch_file(path, prefer_torch)
  with pytest.raises(convert.ConversionError, match='nothing was run'):
    convert.read_torch_file_restricted(str(path))
  assert not marker.exists()


def test_reader_dtypes_views_and_numpy(tmp_path):
  base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
  obj = {'bf16': torch.linspace(-2, 2, 5).to(torch.bfloat16),
         'f16': torch.linspace(-2, 2, 5).half(), 'i64': torch.arange(3),
         'view': base[1:, ::2].t(), 'scalar': torch.tensor(2.5),
         'np': np.arange(4.0), 'np_scalar': np.float64(3.5)}
  for legacy in (False, True):
    path = tmp_path / f'dtypes_{legacy}.pth'
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    got, _ = convert.read_torch_file_restricted(str(path))
    for k in ('f16', 'i64', 'view', 'scalar'):
      assert got[k].dtype == obj[k].numpy().dtype, k
      np.testing.assert_array_equal(got[k], obj[k].numpy(), err_msg=k)
    np.testing.assert_array_equal(got['bf16'].astype(np.float32),
                                  obj['bf16'].float().numpy())
    np.testing.assert_array_equal(got['np'], obj['np'])
    assert got['np_scalar'] == 3.5


# ----------------------------------------------------------------------------
# Mapping.


def test_both_ir50_layouts_give_the_same_backbone(env, qcs_converted):
  trees = {}
  for name in ('ir50_consecutive', 'ir50_split', 'ir50_legacy', 'qcs_full'):
    sd, _ = convert.load_torch_file(env.dir / f'{name}.pth')
    trees[name], report = convert.convert_backbone(sd, env.cfg)
    assert not report.unknown
  full_vars, _ = qcs_converted
  want = {c: {'ir_back': full_vars[c]['ir_back']} for c in full_vars
          if 'ir_back' in full_vars[c]}
  for name, tree in trees.items():
    assert trees_equal(tree, want), name
    assert set(tree) == {'params', 'batch_stats'}
    assert set(tree['params']) == {'ir_back'}


def test_plain_state_dict_equals_training_checkpoint(env, qcs_converted):
  sd, how = convert.load_torch_file(env.dir / 'qcs_plain.pth')
  assert how.startswith('torch.load(weights_only=True); state dict')
  variables, report = convert.convert_model(sd, env.cfg)
  assert trees_equal(variables, qcs_converted[0])
  assert not report.notes  # no 'module.' prefix to strip


def test_report_lists_ignored_and_unknown(env):
  sd, _ = convert.load_torch_file(env.dir / 'ir50_consecutive.pth')
  sd['bogus.weight'] = np.zeros(3, np.float32)
  _, report = convert.convert_backbone(sd, env.cfg)
  stage4 = report.ignored[convert._STAGE4]
  first = sum(env.cfg['stage_units'])
  assert {k.split('.')[1] for k in stage4} == {str(first + i) for i in range(3)}
  assert all(k.startswith('output_layer.') for k in
             report.ignored['IR50 output_layer (never used)'])
  assert report.unknown == ['bogus.weight']
  n_expected = len([p for p in convert.expected_shapes(env.cfg)
                    if p[1] == 'ir_back'])
  assert len(report.loaded) == n_expected
  text = report.summary()
  assert 'unknown keys (neither loaded nor known): 1' in text
  assert '4th stage' in text


def test_full_model_report(env, qcs_converted):
  _, report = qcs_converted
  unused = [k for k in numpy_sd(env.qcs)
            if any(re.search(p, k) for p in R.UNUSED_PATTERNS)]
  ignored = [k for keys in report.ignored.values() for k in keys]
  assert {'module.' + k for k in unused} <= set(ignored)
  assert not report.unknown
  assert len(report.loaded) == len(convert.expected_shapes(env.cfg))
  assert any('ViT per-block conv' in r for r in report.ignored)


def test_model_parity_tiny(env, qcs_converted):
  variables, _ = qcs_converted
  imgs = R.random_images(env.cfg, 2, seed=3, branches=4)
  with torch.no_grad():
    ref = env.qcs.features(R.to_nchw(imgs[:, 0]))
    train = env.qcs.forward_train(*[R.to_nchw(imgs[:, i]) for i in range(4)])
  ours = flax_features(env.cfg, variables, imgs[:, 0])
  for k in ('x1', 'x2', 'x3'):
    assert R.rel_err(ours[k], R.to_nhwc(ref[k])) <= TOL32, k
  for k in ('tokens', 'logits'):
    assert R.rel_err(ours[k], ref[k].numpy()) <= TOL32, k
  out = flax_train_graph(env.cfg, variables, imgs)
  for k in ('base', 'cross'):
    assert R.rel_err(out[k], torch.stack(train[k], 1).numpy()) <= TOL32, k


def test_dcs_embed_aliases_and_8_classes(env):
  sd, _ = convert.load_torch_file(env.dir / 'dcs_full.pth')
  assert any(k.startswith('module.embed_1.') for k in sd)
  variables, report = convert.convert_model(sd, env.dcs_cfg)
  assert any('embed_1/2/3' in n for n in report.notes)
  assert not report.unknown
  assert variables['params']['VIT_base']['head']['kernel'].shape == (32, 8)
  np.testing.assert_array_equal(
      variables['params']['embed_q_1']['kernel'],
      sd['module.embed_1.1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables['params']['embed_v']['bias'],
                                sd['module.embed_3.proj.bias'])
  # Numerical parity of this file: test_cli_full (--verify).


def test_dtypes_and_theta(env):
  sd, _ = convert.load_torch_file(env.dir / 'qcs_full.pth')
  v32, _ = convert.convert_model(sd, env.cfg)
  v64, _ = convert.convert_model(sd, env.cfg, dtype=np.float64)
  assert {x.dtype for x in jax.tree.leaves(v32)} == {np.dtype(np.float32)}
  assert {x.dtype for x in jax.tree.leaves(v64)} == {np.dtype(np.float64)}
  theta = v32['params']['cross_attention_2']['theta']
  assert theta.shape == ()
  assert theta == env.qcs.cross_attention_2.theta.item()
  k = sd['module.VIT_base.blocks.0.attn.qkv.weight']
  np.testing.assert_array_equal(
      v32['params']['VIT_base']['blocks_0']['attn']['qkv']['kernel'], k.T)


def test_baseline_target_drops_cross_modules(env):
  sd, _ = convert.load_torch_file(env.dir / 'qcs_full.pth')
  cfg = dict(env.cfg, name='baseline')
  variables, report = convert.convert_model(sd, cfg)
  assert 'VIT_cross' not in variables['params']
  assert report.ignored[convert._NOT_IN_BASELINE]
  assert not report.unknown


def test_infer_model_config(env):
  for name, want in (('qcs_full', env.cfg), ('dcs_full', env.dcs_cfg)):
    sd, _ = convert.load_torch_file(env.dir / f'{name}.pth')
    got = convert.infer_model_config(sd)
    for k in ('name', 'num_classes', 'img_size', 'stage_channels',
              'stage_units', 'embed_dim', 'mlp_ratio', 'base_depth',
              'cross_depth'):
      assert got[k] == want[k], (name, k)


def test_full_size_ir50_layouts(tmp_path):
  """Paper-size ir50.pth in both layouts: 24 units, 21-23 ignored."""
  cfg = R.FULL_CFG
  torch.manual_seed(0)
  backbone = R.Backbone(cfg['stage_channels'], cfg['stage_units'])
  R.randomize_(backbone, seed=0, calib_batch=2)
  trees = []
  for layout in ('consecutive', 'split'):
    sd = {k: v.numpy() for k, v in RF.ir50_state_dict(
        backbone, layout, cfg['stage_units']).items()}
    if layout == 'consecutive':
      assert max(int(k.split('.')[1]) for k in sd if k.startswith('body.')) == 23
    tree, report = convert.convert_backbone(sd, cfg)
    trees.append(tree)
    assert not report.unknown
    assert len(report.loaded) == len(
        [p for p in convert.expected_shapes(cfg) if p[1] == 'ir_back'])
    if layout == 'consecutive':
      assert {k.split('.')[1] for k in report.ignored[convert._STAGE4]} == {
          '21', '22', '23'}
  assert trees_equal(*trees)
  np.testing.assert_array_equal(
      trees[0]['params']['ir_back']['body3_13']['res_conv2']['kernel'],
      backbone.body3[13].res_layer[3].weight.detach().numpy().transpose(
          2, 3, 1, 0))


# ----------------------------------------------------------------------------
# Refusals.


def test_refuses_missing_key(env):
  sd, _ = convert.load_torch_file(env.dir / 'qcs_full.pth')
  del sd['module.VIT_base.blocks.1.attn.qkv.weight']
  with pytest.raises(convert.ConversionError,
                     match=r"missing 1 required.*'module.VIT_base.blocks.1.attn.qkv.weight'"):
    convert.convert_model(sd, env.cfg)
  ir, _ = convert.load_torch_file(env.dir / 'ir50_consecutive.pth')
  del ir['body.3.res_layer.1.weight']  # unit 0 of body3 in this tiny model
  with pytest.raises(convert.ConversionError,
                     match=r"'body.3.res_layer.1.weight'.*body3_0/res_conv1"):
    convert.convert_backbone(ir, env.cfg)


def test_refuses_shape_mismatch(env):
  sd, _ = convert.load_torch_file(env.dir / 'qcs_full.pth')
  sd['module.conv2.weight'] = np.zeros((16, 16, 1, 1), np.float32)
  with pytest.raises(convert.ConversionError,
                     match=r"'module.conv2.weight': shape \(16, 16, 1, 1\).*"
                     r"needs \(16, 16, 3, 3\)"):
    convert.convert_model(sd, env.cfg)
  ir, _ = convert.load_torch_file(env.dir / 'ir50_split.pth')
  with pytest.raises(convert.ConversionError, match='shape mismatch'):
    convert.convert_backbone(ir, R.make_cfg(stage_channels=(8, 16, 48)))


def test_refuses_class_count_mismatch(env):
  sd, _ = convert.load_torch_file(env.dir / 'qcs_full.pth')
  with pytest.raises(convert.ConversionError,
                     match=r'class count mismatch.*7 classes.*num_classes=8'):
    convert.convert_model(sd, dict(env.cfg, num_classes=8))


def test_refuses_model_kind_mismatch(env):
  sd, _ = convert.load_torch_file(env.dir / 'qcs_full.pth')
  with pytest.raises(convert.ConversionError, match="theta.*'dcs'"):
    convert.convert_model(sd, dict(env.cfg, name='dcs', csa='s'))
  dsd, _ = convert.load_torch_file(env.dir / 'dcs_full.pth')
  with pytest.raises(convert.ConversionError, match="no cross_attention.*'qcs'"):
    convert.convert_model(dsd, dict(env.dcs_cfg, name='qcs', csa='sd'))
  ir, _ = convert.load_torch_file(env.dir / 'ir50_split.pth')
  with pytest.raises(convert.ConversionError, match='not a full'):
    convert.convert_model(ir, env.cfg)


def test_refuses_non_checkpoints(tmp_path):
  cases = {}
  cases['text.pth'] = b'just some text\n'
  cases['empty.pth'] = b''
  png = tmp_path / 'x.png'
  png.write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(100))
  for name, data in cases.items():
    (tmp_path / name).write_bytes(data)
  torch.save([1, 2, 3], tmp_path / 'list.pth')
  torch.save({'a': 1, 'b': 'x'}, tmp_path / 'no_tensors.pth')
  with zipfile.ZipFile(tmp_path / 'other.zip', 'w') as zf:
    zf.writestr('hello.txt', 'hi')
  expect = {'text.pth': 'not a PyTorch checkpoint',
            'empty.pth': 'empty file', 'x.png': 'not a PyTorch checkpoint',
            'list.pth': 'not a checkpoint', 'no_tensors.pth': 'no tensors',
            'other.zip': 'no data.pkl', 'missing.pth': 'no such file'}
  for name, msg in expect.items():
    for prefer_torch in (True, False):
      with pytest.raises(convert.ConversionError, match=msg) as e:
        convert.load_torch_file(tmp_path / name, prefer_torch)
      assert name in str(e.value)


@pytest.mark.parametrize('name', ['qcs_full', 'ir50_legacy'])
@pytest.mark.parametrize('keep', [0.5, 0.999])
def test_refuses_truncated_files(env, tmp_path, name, keep):
  data = (env.dir / f'{name}.pth').read_bytes()
  path = tmp_path / 'cut.pth'
  path.write_bytes(data[:int(len(data) * keep)])
  for prefer_torch in (True, False):
    with pytest.raises(convert.ConversionError, match='truncated'):
      convert.load_torch_file(path, prefer_torch)


# ----------------------------------------------------------------------------
# Checkpoints and the CLI.


def test_save_and_load_variables(env, qcs_converted, tmp_path):
  variables, _ = qcs_converted
  out = tmp_path / 'ckpt'
  names = ['c%d' % i for i in range(7)]
  checkpoint.save_variables(out, variables, env.cfg,
                            extra={'class_names': names, 'source': 'x'})
  got, cfg = checkpoint.load_variables(out)
  assert trees_equal(got, variables)
  assert cfg == convert.model_cfg_dict(env.cfg)
  with pytest.raises(checkpoint.CheckpointError, match='already exists'):
    checkpoint.save_variables(out, variables, env.cfg)
  loaded = checkpoint.load_model(out)
  assert loaded.class_names == names
  imgs = R.random_images(env.cfg, 3, seed=5)
  with torch.no_grad():
    ref = env.qcs.infer(R.to_nchw(imgs)).numpy()
  assert R.rel_err(loaded.logits(imgs), ref) <= TOL32
  with pytest.raises(ValueError, match='expected images'):
    loaded.logits(imgs[:, :32])


def test_save_is_atomic(env, qcs_converted, tmp_path, monkeypatch):
  variables, _ = qcs_converted
  out = tmp_path / 'ckpt'
  import orbax.checkpoint as ocp

  def boom(*args, **kwargs):
    raise RuntimeError('disk full')

  monkeypatch.setattr(ocp.StandardCheckpointer, 'save', boom)
  with pytest.raises(RuntimeError, match='disk full'):
    checkpoint.save_variables(out, variables, env.cfg)
  assert list(tmp_path.iterdir()) == []
  monkeypatch.undo()
  checkpoint.save_variables(out, variables, env.cfg)
  before = sorted(p.name for p in out.rglob('*'))
  monkeypatch.setattr(ocp.StandardCheckpointer, 'save', boom)
  with pytest.raises(RuntimeError):
    checkpoint.save_variables(out, variables, env.cfg, force=True)
  assert [p.name for p in tmp_path.iterdir()] == ['ckpt']
  assert sorted(p.name for p in out.rglob('*')) == before
  checkpoint.load_variables(out)


def test_load_refusals(env, qcs_converted, tmp_path):
  variables, _ = qcs_converted
  with pytest.raises(checkpoint.CheckpointError, match='no such checkpoint'):
    checkpoint.load_variables(tmp_path / 'nope')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(checkpoint.CheckpointError, match='no model.json'):
    checkpoint.load_variables(tmp_path / 'empty')
  out = checkpoint.save_variables(tmp_path / 'ckpt', variables, env.cfg)
  meta = json.loads((out / 'model.json').read_text())
  meta['model']['num_classes'] = 8
  (out / 'model.json').write_text(json.dumps(meta))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'do not match.*VIT_(base|cross)/head'):
    checkpoint.load_variables(out)
  meta['format'] = 'something/else'
  (out / 'model.json').write_text(json.dumps(meta))
  with pytest.raises(checkpoint.CheckpointError, match='format'):
    checkpoint.load_variables(out)
  backbone = {c: {'ir_back': variables[c]['ir_back']} for c in variables}
  bdir = checkpoint.save_variables(tmp_path / 'bb', backbone, env.cfg)
  got, _ = checkpoint.load_variables(bdir)
  assert trees_equal(got, backbone)
  with pytest.raises(checkpoint.CheckpointError, match='only an IR50 backbone'):
    checkpoint.load_model(bdir)


def _tiny_flags(cfg):
  return ['--img_size', str(cfg['img_size']), '--embed_dim',
          str(cfg['embed_dim']), '--num_heads', str(cfg['num_heads']),
          '--stage_channels', ','.join(map(str, cfg['stage_channels'])),
          '--stage_units', ','.join(map(str, cfg['stage_units']))]


def test_cli_backbone(env, qcs_converted, tmp_path, capsys):
  cli = _load_cli()
  out = tmp_path / 'ir50'
  argv = ['--input', str(env.dir / 'ir50_consecutive.pth'), '--output',
          str(out)] + _tiny_flags(env.cfg)
  assert cli.main(argv + ['--verify']) == 0
  text = capsys.readouterr().out
  assert 'ir50, consecutive units' in text and 'verify: ok' in text
  errs = [float(l.rsplit(':', 1)[1]) for l in text.splitlines()
          if l.startswith('verify: max relative error')]
  assert len(errs) == 3 and max(errs) <= TOL32
  got, cfg = checkpoint.load_variables(out)
  full, _ = qcs_converted
  assert trees_equal(got, {c: {'ir_back': full[c]['ir_back']} for c in full})
  assert cfg['stage_units'] == env.cfg['stage_units']
  # An existing output is refused without --force, and kept.
  assert cli.main(argv) == 2
  assert 'already exists' in capsys.readouterr().err
  assert checkpoint.load_variables(out)[0]['params']['ir_back']
  # --force overwrites; float64 arrays verify in float64.
  assert cli.main(argv + ['--force', '--float64', '--verify']) == 0
  text = capsys.readouterr().out
  errs = [float(l.rsplit(':', 1)[1]) for l in text.splitlines()
          if l.startswith('verify: max relative error')]
  assert len(errs) == 3 and max(errs) <= 1e-10
  got, _ = checkpoint.load_variables(out)
  assert {x.dtype for x in jax.tree.leaves(got)} == {np.dtype(np.float64)}


def test_cli_reads_config_files():
  cli = _load_cli()
  args = cli.parse_args(['--input', 'x.pth', '--output', 'y',
                         '--config', str(REPO / 'configs' / 'ferplus_dcs.py'),
                         '--num_heads', '4'])
  cfg, origin = cli.model_config(args, {})
  assert cfg['name'] == 'dcs' and cfg['num_classes'] == 8  # FERPlus
  assert cfg['num_heads'] == 4 and 'ferplus_dcs.py' in origin


def test_cli_full(env, tmp_path, capsys):
  cli = _load_cli()
  out = tmp_path / 'dcs'
  argv = ['--full', '--input', str(env.dir / 'dcs_full.pth'), '--output',
          str(out), '--num_heads', str(env.dcs_cfg['num_heads'])]
  assert cli.main(argv + ['--verify']) == 0
  text = capsys.readouterr().out
  assert 'read off the checkpoint' in text and 'verify: ok' in text
  assert 'RecorderMeter_loss' in text
  errs = {l.split()[4][:-1]: float(l.rsplit(':', 1)[1]) for l in
          text.splitlines() if l.startswith('verify: max relative error')}
  assert set(errs) == {'x1', 'x2', 'x3', 'tokens', 'logits', 'train_base',
                       'train_cross'}
  assert max(errs.values()) <= TOL32, errs
  got, cfg = checkpoint.load_variables(out)
  assert cfg == convert.model_cfg_dict(env.dcs_cfg)
  sd, _ = convert.load_torch_file(env.dir / 'dcs_full.pth')
  assert trees_equal(got, convert.convert_model(sd, env.dcs_cfg)[0])
  # Refusals end with exit status 2 and write nothing.
  bad = tmp_path / 'bad'
  assert cli.main(['--full', '--input', str(env.dir / 'dcs_full.pth'),
                   '--output', str(bad), '--num_classes', '7']) == 2
  assert 'class count mismatch' in capsys.readouterr().err
  assert not bad.exists()
  assert cli.main(['--full', '--input', str(env.dir / 'ir50_split.pth'),
                   '--output', str(bad)] + _tiny_flags(env.cfg)) == 2
  assert 'not a full' in capsys.readouterr().err
  assert not bad.exists()
