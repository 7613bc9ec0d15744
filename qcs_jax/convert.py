"""PyTorch checkpoints (IR50 ir50.pth, QCS/DCS training files) -> Flax variables.

Maps the authors' key names onto the Flax tree of qcs_jax.models and checks
every shape against the target model config. See CONVERTER.md. The files are
read by qcs_jax.torch_pickle (without executing code from them); its
`load_torch_file`, `read_torch_file_restricted`, `Inert` and `ConversionError`
are re-exported here.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np

# load_torch_file & co. are re-exported: the tools and tests read checkpoints through here.
from qcs_jax.torch_pickle import (  # pylint: disable=unused-import
    ConversionError, Inert, load_torch_file, read_torch_file_restricted)

Path = tuple[str, ...]

NUM_BRANCHES = {'baseline': 1, 'dcs': 2, 'qcs': 4}

# config.model defaults (ARCHITECTURE.md, team brief): the paper's model.
DEFAULT_MODEL_CFG: dict[str, Any] = dict(
    name='qcs', csa='sd', minmax='global', num_classes=7, img_size=224,
    stage_channels=(64, 128, 256), stage_units=(3, 4, 14), embed_dim=768,
    num_heads=8, mlp_ratio=4.0, base_depth=2, cross_depth=1, base_drop=0.0,
    cross_drop=0.0, base_proj_drop=0.0, cross_proj_drop=0.0, dtype='float32')


# ----------------------------------------------------------------------------
# The target tree: expected Flax shapes.


def model_cfg_dict(model_cfg: Any) -> dict[str, Any]:
  """config.model (a ConfigDict or dict) over DEFAULT_MODEL_CFG, as a plain dict."""
  if hasattr(model_cfg, 'to_dict'):
    model_cfg = model_cfg.to_dict()
  cfg = dict(DEFAULT_MODEL_CFG)
  cfg.update(dict(model_cfg))
  for k in ('stage_channels', 'stage_units'):
    cfg[k] = tuple(int(x) for x in cfg[k])
  if cfg['name'] not in NUM_BRANCHES:
    raise ConversionError(f'unknown model name {cfg["name"]!r}')
  return cfg


def _own_expected_shapes(cfg: dict[str, Any]) -> dict[Path, tuple[int, ...]]:
  """The Flax tree of the team brief, computed from the config alone."""
  out: dict[Path, tuple[int, ...]] = {}
  c0, c1, c2 = cfg['stage_channels']
  d, k = cfg['embed_dim'], cfg['num_classes']
  t = 3 * (cfg['img_size'] // 32) ** 2
  hidden = int(d * cfg['mlp_ratio'])

  def bn(path, c):
    out[('params',) + path + ('scale',)] = (c,)
    out[('params',) + path + ('bias',)] = (c,)
    out[('batch_stats',) + path + ('mean',)] = (c,)
    out[('batch_stats',) + path + ('var',)] = (c,)

  def conv(path, kh, cin, cout, bias):
    out[('params',) + path + ('kernel',)] = (kh, kh, cin, cout)
    if bias:
      out[('params',) + path + ('bias',)] = (cout,)

  def dense(path, cin, cout):
    out[('params',) + path + ('kernel',)] = (cin, cout)
    out[('params',) + path + ('bias',)] = (cout,)

  def ln(path, c):
    out[('params',) + path + ('scale',)] = (c,)
    out[('params',) + path + ('bias',)] = (c,)

  ib = ('ir_back',)
  conv(ib + ('input_conv',), 3, 3, c0, False)
  bn(ib + ('input_bn',), c0)
  out[('params',) + ib + ('input_prelu', 'alpha')] = (c0,)
  ins = (c0, c0, c1)
  for s, (cin, depth, units) in enumerate(
      zip(ins, cfg['stage_channels'], cfg['stage_units'])):
    for i in range(units):
      u = ib + (f'body{s + 1}_{i}',)
      ci = cin if i == 0 else depth
      bn(u + ('res_bn1',), ci)
      conv(u + ('res_conv1',), 3, ci, depth, False)
      out[('params',) + u + ('res_prelu', 'alpha')] = (depth,)
      conv(u + ('res_conv2',), 3, depth, depth, False)
      bn(u + ('res_bn2',), depth)
      if ci != depth:
        conv(u + ('shortcut_conv',), 1, ci, depth, False)
        bn(u + ('shortcut_bn',), depth)
  for name, c in (('conv1', c0), ('conv2', c1), ('conv3', c2)):
    conv((name,), 3, c, c, True)
  conv(('embed_q_0',), 3, c0, d, True)
  conv(('embed_q_1',), 3, d, d, True)
  conv(('embed_k',), 3, c1, d, True)
  conv(('embed_v',), 1, c2, d, True)
  vits = [('VIT_base', cfg['base_depth'])]
  if cfg['name'] != 'baseline':
    vits.append(('VIT_cross', cfg['cross_depth']))
  for vit, depth in vits:
    out[('params', vit, 'cls_token')] = (1, 1, d)
    out[('params', vit, 'pos_embed')] = (1, 1 + t, d)
    for i in range(depth):
      b = (vit, f'blocks_{i}')
      ln(b + ('norm1',), d)
      dense(b + ('attn', 'qkv'), d, 3 * d)
      dense(b + ('attn', 'proj'), d, d)
      ln(b + ('norm2',), d)
      dense(b + ('mlp', 'fc1'), d, hidden)
      dense(b + ('mlp', 'fc2'), hidden, d)
    ln((vit, 'norm'), d)
    dense((vit, 'se_block', 'linear1'), d, d)
    dense((vit, 'se_block', 'linear2'), d, d)
    dense((vit, 'head'), d, k)
  if cfg['name'] != 'baseline':
    for level in (1, 2, 3):
      c = (f'cross_attention_{level}',)
      ln(c + ('norm1',), d)
      ln(c + ('norm2',), d)
      dense(c + ('proj',), d, 2 * d)
      dense(c + ('mlp', 'fc1'), d, 4 * d)
      dense(c + ('mlp', 'fc2'), 4 * d, d)
      if cfg['name'] == 'qcs':
        out[('params',) + c + ('theta',)] = ()
  return out


def flatten_tree(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten_tree(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = v
  return out


def unflatten_tree(flat: Mapping[Path, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, v in sorted(flat.items()):
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return out


def model_expected_shapes(model_cfg: Any) -> dict[Path, tuple[int, ...]] | None:
  """Shapes of `build_model(cfg).init` via jax.eval_shape; None without models."""
  try:
    from qcs_jax import models  # pylint: disable=import-outside-toplevel
    build = models.build_model
  except (ImportError, AttributeError):
    return None
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  cfg = model_cfg_dict(model_cfg)
  model = build(cfg)
  size = cfg['img_size']
  x = jax.ShapeDtypeStruct((1, NUM_BRANCHES[cfg['name']], size, size, 3),
                           jnp.float32)
  key = jax.random.key(0)
  shapes = jax.eval_shape(
      lambda imgs: model.init({'params': key, 'dropout': key}, imgs,
                              train=False), x)
  return {p: tuple(v.shape) for p, v in flatten_tree(shapes).items()
          if p[0] in ('params', 'batch_stats')}


def expected_shapes(model_cfg: Any) -> dict[Path, tuple[int, ...]]:
  """The target tree: from the model package, else from the brief's layout."""
  cfg = model_cfg_dict(model_cfg)
  return dict(_expected_shapes_cached(tuple(sorted(cfg.items()))))


@functools.lru_cache(maxsize=16)
def _expected_shapes_cached(cfg_items: tuple) -> dict[Path, tuple[int, ...]]:
  cfg = dict(cfg_items)
  shapes = model_expected_shapes(cfg)
  return shapes if shapes is not None else _own_expected_shapes(cfg)


# ----------------------------------------------------------------------------
# Key mapping.

_MODULE_TO_TORCH = {
    'input_conv': 'input_layer.0', 'input_bn': 'input_layer.1',
    'input_prelu': 'input_layer.2', 'res_bn1': 'res_layer.0',
    'res_conv1': 'res_layer.1', 'res_prelu': 'res_layer.2',
    'res_conv2': 'res_layer.3', 'res_bn2': 'res_layer.4',
    'shortcut_conv': 'shortcut_layer.0', 'shortcut_bn': 'shortcut_layer.1',
    'embed_q_0': 'embed_q.0', 'embed_q_1': 'embed_q.1', 'embed_k': 'embed_k.0',
    'embed_v': 'embed_v.proj', 'head': 'head.linear',
}
_LEAF_TO_TORCH = {'kernel': 'weight', 'scale': 'weight', 'alpha': 'weight',
                  'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}
_NUMBERED = re.compile(r'^(body[123]|blocks)_(\d+)$')


def torch_key(path: Path) -> str:
  """Flax ('params'|'batch_stats', *modules, leaf) -> PyTorch state-dict key."""
  parts = []
  for name in path[1:-1]:
    m = _NUMBERED.match(name)
    parts.append(f'{m.group(1)}.{m.group(2)}' if m else
                 _MODULE_TO_TORCH.get(name, name))
  leaf = path[-1]
  parts.append(_LEAF_TO_TORCH.get(leaf, leaf))
  return '.'.join(parts)


def _transform(path: Path, expected: tuple[int, ...]) -> tuple[str, Any]:
  """(kind, torch-shape function) for a leaf: conv/dense transposes etc."""
  leaf = path[-1]
  if leaf == 'kernel' and len(expected) == 4:
    kh, kw, i, o = expected
    return 'conv', (o, i, kh, kw)
  if leaf == 'kernel' and len(expected) == 2:
    return 'dense', expected[::-1]
  if leaf == 'theta' and expected == ():
    return 'scalar', (1,)
  return 'copy', expected


def _apply(kind: str, a: np.ndarray) -> np.ndarray:
  if kind == 'conv':
    return a.transpose(2, 3, 1, 0)
  if kind == 'dense':
    return a.T
  if kind == 'scalar':
    return a.reshape(())
  return a


# Keys the reference holds but never uses (ARCHITECTURE.md sections 1 and 3).
KNOWN_UNUSED = (
    (r'(^|\.)num_batches_tracked$', 'BatchNorm num_batches_tracked'),
    (r'^ir_back\.output_layer\.', 'IR50 output_layer (never used)'),
    (r'^VIT_(base|cross)\.blocks\.\d+\.conv\.', 'ViT per-block conv (unused)'),
    (r'^VIT_(base|cross)\.CON1\.', 'ViT CON1 (unused)'),
    (r'^VIT_(base|cross)\.IRLinear[12]\.', 'ViT IRLinear1/2 (unused)'),
    (r'^VIT_(base|cross)\.eca_block\.', 'ViT eca_block (unused)'),
    (r'^VIT_(base|cross)\.patch_embed\.', 'ViT patch_embed (unused)'),
)
_STAGE4 = 'IR50 units past the third stage (body.N, 4th stage: never used)'
_NOT_BACKBONE = 'not part of the backbone (convert them with --full)'
_NOT_IN_BASELINE = 'VIT_cross / cross modules (not in a baseline model)'


@dataclasses.dataclass
class ConversionReport:
  """What a conversion took, skipped and did not recognise."""
  layout: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  ignored: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  unknown: list[str] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)
  num_params: int = 0
  how_loaded: str = ''

  def summary(self) -> str:
    n_ign = sum(len(v) for v in self.ignored.values())
    lines = [f'layout: {self.layout}']
    if self.how_loaded:
      lines.append(f'read with: {self.how_loaded}')
    lines += [f'note: {n}' for n in self.notes]
    lines.append(f'keys loaded: {len(self.loaded)} '
                 f'({self.num_params:,} parameter/statistic values)')
    lines.append(f'keys ignored as known-unused: {n_ign}')
    for reason, keys in self.ignored.items():
      lines.append(f'  {len(keys):4d}  {reason}: {_abbrev(keys)}')
    lines.append(f'unknown keys (neither loaded nor known): {len(self.unknown)}')
    if self.unknown:
      lines.append(f'  {_abbrev(self.unknown, 10)}')
    return '\n'.join(lines)


def _abbrev(keys: list[str], n: int = 3) -> str:
  shown = ', '.join(keys[:n])
  return shown + (f', ... (+{len(keys) - n})' if len(keys) > n else '')


def _strip_module(sd: Mapping[str, np.ndarray], report: ConversionReport
                  ) -> dict[str, tuple[str, np.ndarray]]:
  """normalised key -> (original key, array); strips DataParallel `module.`."""
  out = {}
  stripped = 0
  for k, v in sd.items():
    nk = k
    while nk.startswith('module.'):
      nk = nk[len('module.'):]
    stripped += nk != k
    if nk in out:
      raise ConversionError(f'duplicate key {nk!r} after stripping "module."')
    out[nk] = (k, np.asarray(v))
  if stripped:
    report.notes.append(f"stripped the DataParallel 'module.' prefix from "
                        f'{stripped} keys')
  return out


def _alias_embeds(sd: dict[str, tuple[str, np.ndarray]],
                  report: ConversionReport) -> dict[str, tuple[str, np.ndarray]]:
  """embed_1/2/3.* (some releases) -> embed_q/k/v.*."""
  alias = {'embed_1.': 'embed_q.', 'embed_2.': 'embed_k.', 'embed_3.': 'embed_v.'}
  out, renamed = {}, 0
  for k, v in sd.items():
    for old, new in alias.items():
      if k.startswith(old):
        k = new + k[len(old):]
        renamed += 1
        if k in sd:
          raise ConversionError(
              f'both {v[0]!r} and {k!r} present: ambiguous embed naming')
    out[k] = v
  if renamed:
    report.notes.append('embed_1/2/3 read as embed_q/k/v')
  return out


def _ir50_to_split(sd: dict[str, tuple[str, np.ndarray]],
                   stage_units: tuple[int, ...], report: ConversionReport
                   ) -> tuple[dict[str, tuple[str, np.ndarray]], list[str]]:
  """IR50 keys (either layout) -> 'ir_back.'-prefixed split-layout keys."""
  consecutive = any(re.match(r'^body\.\d+\.', k) for k in sd)
  split = any(re.match(r'^body[123]\.\d+\.', k) for k in sd)
  if consecutive and split:
    raise ConversionError('both body.N.* and body1/2/3.* keys: mixed IR50 layouts')
  if not (consecutive or split or any(k.startswith('input_layer.') for k in sd)):
    raise ConversionError(
        'no IR50 backbone keys (input_layer.*, body.N.* or body1/2/3.*, '
        f'optionally under ir_back.) among {_abbrev(list(sd), 5)}')
  report.layout = ('ir50, consecutive units body.0..N' if consecutive else
                   'ir50, split stages body1/2/3')
  offsets = [sum(stage_units[:s]) for s in range(4)]
  out, stage4 = {}, []
  for k, v in sd.items():
    m = re.match(r'^body\.(\d+)\.(.*)$', k)
    if m:
      n = int(m.group(1))
      if n >= offsets[3]:
        stage4.append(v[0])
        continue
      s = max(i for i in range(3) if offsets[i] <= n)
      k = f'body{s + 1}.{n - offsets[s]}.{m.group(2)}'
    out['ir_back.' + k] = v
  if consecutive:
    report.notes.append(
        f'body.N units mapped: 0-{offsets[1] - 1} -> body1, '
        f'{offsets[1]}-{offsets[2] - 1} -> body2, {offsets[2]}-{offsets[3] - 1}'
        ' -> body3')
  return out, stage4


def _prefixer(sd: Mapping[str, Any]) -> Callable[[str], str]:
  """Normalised key -> file key: re-adds 'module.' if the file uses it."""
  if any(k.startswith('module.') for k in sd):
    return lambda k: 'module.' + k
  return lambda k: k


def _ir50_name(key: str, consecutive: bool, units: tuple[int, ...]) -> str:
  """'ir_back.body2.1.x' -> the IR50 file's name ('body.4.x' or 'body2.1.x')."""
  key = key[len('ir_back.'):] if key.startswith('ir_back.') else key
  m = re.match(r'^body([123])\.(\d+)\.(.*)$', key)
  if consecutive and m:
    s = int(m.group(1)) - 1
    return f'body.{sum(units[:s]) + int(m.group(2))}.{m.group(3)}'
  return key


def _convert(sd: dict[str, tuple[str, np.ndarray]],
             expected: dict[Path, tuple[int, ...]], report: ConversionReport,
             dtype: Any, extra_ignored: Iterable[tuple[str, str]] = (),
             file_name: Callable[[str], str] = lambda k: k
             ) -> dict[str, Any]:
  """Maps normalised keys onto `expected`, checking presence and shapes.

  `file_name` turns a normalised key into the name the file would use, for
  error messages about missing keys.
  """
  flat, used, missing, bad = {}, set(), [], []
  for path, shape in expected.items():
    key = torch_key(path)
    kind, torch_shape = _transform(path, shape)
    if key not in sd:
      missing.append(f'{file_name(key)!r} (torch shape {torch_shape}, for Flax '
                     f'{"/".join(path)})')
      continue
    orig, a = sd[key]
    if tuple(a.shape) != tuple(torch_shape):
      bad.append(f'{orig!r}: shape {tuple(a.shape)} in the checkpoint, the '
                 f'model config needs {tuple(torch_shape)} (Flax '
                 f'{"/".join(path)} {shape})')
      continue
    flat[path] = np.array(_apply(kind, a), dtype=dtype, order="C")
    used.add(key)
  if bad:
    raise ConversionError(
        f'shape mismatch for {len(bad)} key(s): ' + '; '.join(bad[:5]) +
        (' ...' if len(bad) > 5 else ''))
  if missing:
    raise ConversionError(
        f'missing {len(missing)} required key(s): ' + '; '.join(missing[:5]) +
        (' ...' if len(missing) > 5 else ''))
  patterns = list(extra_ignored) + list(KNOWN_UNUSED)
  for key, (orig, _) in sd.items():
    if key in used:
      report.loaded.append(orig)
      continue
    for pat, reason in patterns:
      if re.search(pat, key):
        report.ignored.setdefault(reason, []).append(orig)
        break
    else:
      report.unknown.append(orig)
  report.num_params = int(sum(v.size for v in flat.values()))
  return unflatten_tree(flat)


def _check_num_classes(sd: dict[str, tuple[str, np.ndarray]], k: int) -> None:
  for vit in ('VIT_base', 'VIT_cross'):
    key = f'{vit}.head.linear.weight'
    if key in sd and sd[key][1].ndim == 2 and sd[key][1].shape[0] != k:
      raise ConversionError(
          f'class count mismatch: {sd[key][0]!r} has shape '
          f'{tuple(sd[key][1].shape)} = {sd[key][1].shape[0]} classes, the '
          f'model config says num_classes={k}')


def convert_backbone(sd: Mapping[str, np.ndarray], model_cfg: Any,
                     dtype: Any = np.float32
                     ) -> tuple[dict[str, Any], ConversionReport]:
  """IR50 (either layout) or a full QCS/DCS state dict -> ir_back variables.

  Returns ({'params': {'ir_back': ...}, 'batch_stats': {'ir_back': ...}},
  report).
  """
  cfg = model_cfg_dict(model_cfg)
  report = ConversionReport(layout='')
  nsd = _strip_module(sd, report)
  extra = []
  file_name = _prefixer(sd)
  if any(k.startswith('ir_back.') for k in nsd):
    report.layout = 'full model state dict (ir_back part)'
    full = nsd
    extra.append((r'^(?!ir_back\.)', _NOT_BACKBONE))
  else:
    full, stage4 = _ir50_to_split(nsd, cfg['stage_units'], report)
    report.ignored.update({_STAGE4: stage4} if stage4 else {})
    file_name = functools.partial(_ir50_name, consecutive=bool(
        report.layout.startswith('ir50, consecutive')),
                                  units=cfg['stage_units'])
  expected = {p: s for p, s in expected_shapes(cfg).items()
              if p[1] == 'ir_back'}
  variables = _convert(full, expected, report, dtype, extra, file_name)
  return variables, report


def convert_model(sd: Mapping[str, np.ndarray], model_cfg: Any,
                  dtype: Any = np.float32
                  ) -> tuple[dict[str, Any], ConversionReport]:
  """A full QCS / DCS / baseline state dict -> {'params', 'batch_stats'}."""
  cfg = model_cfg_dict(model_cfg)
  report = ConversionReport(layout=f'full {cfg["name"]} model state dict')
  nsd = _alias_embeds(_strip_module(sd, report), report)
  if not any(k.startswith('VIT_base.') for k in nsd):
    raise ConversionError(
        'not a full QCS/DCS model state dict (no VIT_base.* keys); an IR50 '
        'backbone file converts with convert_backbone (no --full)')
  has_theta = any(re.match(r'^cross_attention_\d\.theta$', k) for k in nsd)
  has_cross = any(k.startswith('cross_attention_') for k in nsd)
  if has_theta and cfg['name'] == 'dcs':
    raise ConversionError(
        'the checkpoint has cross_attention_*.theta (a QCS model) but the '
        "config says model 'dcs'")
  if has_cross and not has_theta and cfg['name'] == 'qcs':
    raise ConversionError(
        'the checkpoint has no cross_attention_*.theta (a DCS model) but the '
        "config says model 'qcs'")
  _check_num_classes(nsd, cfg['num_classes'])
  extra = []
  if cfg['name'] == 'baseline':
    extra.append((r'^(VIT_cross|cross_attention_\d)\.', _NOT_IN_BASELINE))
  variables = _convert(nsd, expected_shapes(cfg), report, dtype, extra,
                       _prefixer(sd))
  return variables, report


def infer_model_config(sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Guesses config.model fields from a full model state dict's shapes.

  num_heads, csa, minmax and dropout rates are not in the weights: they keep
  the paper's values (8 heads, every released model uses them).
  """
  report = ConversionReport(layout='')
  nsd = {k: v for k, (_, v) in
         _alias_embeds(_strip_module(sd, report), report).items()}
  cfg = dict(DEFAULT_MODEL_CFG)
  if 'VIT_base.head.linear.weight' not in nsd:
    raise ConversionError(
        'not a full QCS/DCS model state dict (no VIT_base.head.linear.weight);'
        ' an IR50 backbone file converts without --full')
  k, d = nsd['VIT_base.head.linear.weight'].shape
  cfg.update(num_classes=int(k), embed_dim=int(d))
  t = nsd['VIT_base.pos_embed'].shape[1] - 1
  cfg['img_size'] = int(round(32 * math.sqrt(t / 3)))
  cfg['mlp_ratio'] = nsd['VIT_base.blocks.0.mlp.fc1.weight'].shape[0] / d
  depth = lambda vit: len({m.group(1) for m in (
      re.match(rf'^{vit}\.blocks\.(\d+)\.', x) for x in nsd) if m})
  cfg['base_depth'] = depth('VIT_base')
  if any(re.match(r'^cross_attention_\d\.theta$', x) for x in nsd):
    cfg['name'] = 'qcs'
  elif any(x.startswith('cross_attention_') for x in nsd):
    cfg['name'], cfg['csa'] = 'dcs', 's'
  else:
    cfg['name'] = 'baseline'
  if cfg['name'] != 'baseline':
    cfg['cross_depth'] = depth('VIT_cross')
  units, chans = [], []
  for s in (1, 2, 3):
    idx = {int(m.group(1)) for m in (
        re.match(rf'^ir_back\.body{s}\.(\d+)\.', x) for x in nsd) if m}
    units.append(len(idx))
    w = nsd.get(f'ir_back.body{s}.0.res_layer.1.weight')
    chans.append(int(w.shape[0]) if w is not None else 0)
  cfg['stage_units'], cfg['stage_channels'] = tuple(units), tuple(chans)
  return cfg


def reference_state_dict(sd: Mapping[str, np.ndarray],
                         model_cfg: Any) -> dict[str, np.ndarray]:
  """``sd`` under the reference network's names: 'module.' stripped, embedding
  aliases resolved, a monolithic IR50 split into ``ir_back.*`` (qcs_jax.verify)."""
  cfg = model_cfg_dict(model_cfg)
  report = ConversionReport(layout='')
  nsd = _alias_embeds(_strip_module(sd, report), report)
  if not any(k.startswith('ir_back.') for k in nsd):
    nsd, _ = _ir50_to_split(nsd, cfg['stage_units'], report)
  return {k: a for k, (_, a) in nsd.items()}
