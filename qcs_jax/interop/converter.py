"""PyTorch checkpoints (IR50 ir50.pth, QCS/DCS training files) -> Flax variables.

Maps the authors' key names onto the Flax tree of qcs_jax.models and checks
every shape against the target model config. See docs/CONVERTER.md. The files are
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
from qcs_jax.interop.torch_pickle import (  # pylint: disable=unused-import
    ConversionError, Inert, load_torch_file, read_torch_file_restricted)

Path = tuple[str, ...]

from qcs_jax.models.qcs import NUM_BRANCHES  # pylint: disable=unused-import
from qcs_jax.models.shapes import (DEFAULT_MODEL_CFG, expected_shapes,  # pylint: disable=unused-import
                                   flatten_tree, unflatten_tree)
from qcs_jax.models.shapes import model_cfg_dict as _model_cfg_dict


def model_cfg_dict(model_cfg: Any) -> dict[str, Any]:
  """config.model over the model defaults; a bad name is a ConversionError."""
  try:
    return _model_cfg_dict(model_cfg)
  except ValueError as e:
    raise ConversionError(str(e)) from e


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
    return 'scalar', ()  # the released files hold a 0-d tensor; (1,) is accepted too
  return 'copy', expected


def _apply(kind: str, a: np.ndarray) -> np.ndarray:
  if kind == 'conv':
    return a.transpose(2, 3, 1, 0)
  if kind == 'dense':
    return a.T
  if kind == 'scalar':
    return a.reshape(())
  return a


# Keys the reference holds but never uses (docs/ARCHITECTURE.md sections 1 and 3).
KNOWN_UNUSED = (
    (r'(^|\.)num_batches_tracked$', 'BatchNorm num_batches_tracked'),
    (r'^ir_back\.output_layer\.', 'IR50 output_layer (never used)'),
    (r'^VIT_(base|cross)\.blocks\.\d+\.conv\.', 'ViT per-block conv (unused)'),
    (r'^VIT_(base|cross)\.CON1\.', 'ViT CON1 (unused)'),
    (r'^VIT_(base|cross)\.IRLinear[12]\.', 'ViT IRLinear1/2 (unused)'),
    (r'^VIT_(base|cross)\.eca_block\.', 'ViT eca_block (unused)'),
    (r'^VIT_(base|cross)\.patch_embed\.', 'ViT patch_embed (unused)'),
    (r'^fusion\.classifier\.', 'fusion.classifier of the DCS AffectNet-8 file '
     '(built, never called by its forward)'),
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
    if kind == 'scalar' and a.size == 1 and a.ndim <= 1:
      pass  # theta: torch.tensor(0.) (released files) or torch.zeros(1)
    elif tuple(a.shape) != tuple(torch_shape):
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
