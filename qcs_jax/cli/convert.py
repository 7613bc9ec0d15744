"""Converts PyTorch IR50 / QCS / DCS checkpoints into qcs_jax checkpoints.

  # IR50 backbone (ir50.pth, either key layout, or the ir_back part of a
  # full QCS/DCS checkpoint) -> a training init (config.init.backbone):
  qcs-convert --input ir50.pth --output runs/ir50
  # a whole authors' QCS / DCS training checkpoint -> a full model:
  qcs-convert --full --input rafdb_qcs.pth --output runs/rafdb_qcs
  qcs-convert --full --input ferplus.pth --config configs/ferplus.py \
      --output runs/ferplus_qcs --verify

Without --config the model config is the paper's (backbone) or read off the
checkpoint's shapes (--full); flags override single fields. --verify runs the
PyTorch reference of qcs_jax/interop/reference.py (needs torch) on one random batch and prints max|ours - ref| / max|ref|.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any, Sequence

import numpy as np

from qcs_jax import recipes, zoo
from qcs_jax.interop import converter as convert, verify
from qcs_jax.model_files import model_dir as checkpoint

_INT_FIELDS = ('num_classes', 'img_size', 'embed_dim', 'num_heads',
               'base_depth', 'cross_depth')


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(','))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='qcs-convert', description=__doc__.split('\n')[0])
  p.add_argument('--input', help='PyTorch .pth file')
  p.add_argument('--output', help='checkpoint directory to write')
  p.add_argument('--full', action='store_true',
                 help='convert a whole QCS/DCS/baseline model (default: backbone)')
  p.add_argument('--zoo', choices=list(zoo.RELEASES),
                 help='which released file --input is: picks the recipe config and the '
                 'class names (implies --full, except for ir50); see --list_zoo')
  p.add_argument('--list_zoo', action='store_true',
                 help='print the catalogue of released files and exit')
  p.add_argument('--config', help='a configs/*.py file; its config.model is used, and '
                 'the class names of its data set')
  p.add_argument('--dataset', choices=sorted(zoo.DATASET_CLASSES),
                 help='the data set the model was trained on (stores its class names)')
  p.add_argument('--class_names', help='comma-separated class names in index order '
                 '(other data sets)')
  p.add_argument('--model', choices=sorted(convert.NUM_BRANCHES),
                 help='override config.model.name')
  p.add_argument('--csa', help='override config.model.csa')
  for f in _INT_FIELDS:
    p.add_argument(f'--{f}', type=int, help=f'override config.model.{f}')
  p.add_argument('--mlp_ratio', type=float)
  p.add_argument('--stage_channels', type=_ints, help='e.g. 64,128,256')
  p.add_argument('--stage_units', type=_ints, help='e.g. 3,4,14')
  p.add_argument('--float64', action='store_true',
                 help='write float64 arrays (default float32)')
  p.add_argument('--force', action='store_true', help='overwrite --output')
  p.add_argument('--verify', action='store_true',
                 help='compare with the PyTorch reference on a random batch')
  return p.parse_args(argv)


def load_config_file(path: str) -> Any:
  """The config of a configs/*.py file with get_config()."""
  if not pathlib.Path(path).is_file():
    raise convert.ConversionError(f'--config {path}: no such file')
  try:
    return recipes.load_config_file(path)
  except (ValueError, OSError, ImportError, SyntaxError, AttributeError) as e:
    raise convert.ConversionError(f'--config {path}: {e}') from e


def _plain(model_cfg: Any) -> dict[str, Any]:
  return model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else dict(model_cfg)


def model_config(args: argparse.Namespace, sd) -> tuple[dict[str, Any], str]:
  if args.config:
    cfg, origin = _plain(load_config_file(args.config).model), f'from {args.config}'
  elif args.zoo and args.zoo != 'ir50':
    release = zoo.get(args.zoo)
    cfg = _plain(zoo.model_config(release))
    origin = f'--zoo {args.zoo}: the recipe of {release.config_file}'
  elif args.full:
    cfg = convert.infer_model_config(sd)
    origin = ('read off the checkpoint; num_heads, csa, minmax and dropout '
              'are not stored in weights: paper defaults unless given')
  else:
    cfg, origin = dict(convert.DEFAULT_MODEL_CFG), 'the paper defaults'
  overrides = {f: getattr(args, f) for f in
               _INT_FIELDS + ('csa', 'mlp_ratio', 'stage_channels', 'stage_units')
               if getattr(args, f) is not None}
  if args.model:
    overrides['name'] = args.model
  cfg.update(overrides)
  if overrides:
    origin += f', overridden: {sorted(overrides)}'
  return convert.model_cfg_dict(cfg), origin


NO_CLASS_NAMES = (
    'class names: none stored. A .pth file does not hold them, and neither --dataset, '
    '--zoo, --config nor --class_names said which data set the model was trained on, '
    'so predictions will read class_0, class_1, ... Rerun with --dataset '
    '{{{datasets}}}, --zoo NAME (see --list_zoo) or --class_names A,B,... to store them.')


def class_names(args: argparse.Namespace, num_classes: int) -> tuple[tuple[str, ...], str]:
  """(class names to store, where they come from); () with a message when unknown."""
  if args.class_names:
    names = tuple(c.strip() for c in args.class_names.split(',') if c.strip())
    origin = '--class_names'
  elif args.dataset:
    names, origin = zoo.DATASET_CLASSES[args.dataset], f'--dataset {args.dataset}'
  elif args.zoo:
    names, origin = zoo.get(args.zoo).class_names, f'--zoo {args.zoo}'
  elif args.config:
    names = zoo.data_class_names(load_config_file(args.config).data)
    origin = f'the data set of {args.config}'
  else:
    return (), NO_CLASS_NAMES.format(datasets='|'.join(sorted(zoo.DATASET_CLASSES)))
  if not names:
    return (), f'class names: {origin} names none; ' + NO_CLASS_NAMES.split('. ', 2)[-1]
  if len(names) != num_classes:
    raise convert.ConversionError(
        f'{origin} gives {len(names)} class names {list(names)} but the model has '
        f'{num_classes} classes')
  return tuple(names), f'class names ({origin}): {", ".join(names)}'


def _one_line(e: BaseException) -> str:
  """The message on one line (a hostile file's repr could hold newlines), at most 300 chars."""
  text = ' '.join(str(e).split())
  return text if len(text) <= 300 else text[:297] + '...'


def import_reference():
  """The PyTorch reference network (qcs_jax.interop.reference), or None without torch."""
  try:
    from qcs_jax.interop import reference  # pylint: disable=import-outside-toplevel
  except ImportError:
    print('--verify: torch is not installed (pip install torch); skipped')
    return None
  return reference


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if args.list_zoo:
    print(zoo.table())
    return 0
  missing = [f'--{f}' for f in ('input', 'output') if not getattr(args, f)]
  if missing:
    print(f'error: {" and ".join(missing)} required (or --list_zoo)', file=sys.stderr)
    return 2
  if args.zoo:
    args.full = args.zoo != 'ir50'
  out = pathlib.Path(args.output)
  try:
    if out.exists() and not args.force:
      raise checkpoint.CheckpointError(
          f'{out} already exists; pass --force to overwrite')
    sd, how = convert.load_torch_file(args.input)
    cfg, origin = model_config(args, sd)
    print(f'model config ({origin}): {cfg}')
    dtype = np.float64 if args.float64 else np.float32
    fn = convert.convert_model if args.full else convert.convert_backbone
    variables, report = fn(sd, cfg, dtype=dtype)
    report.how_loaded = how
    print(report.summary())
    names = ()
    if args.full:
      names, message = class_names(args, cfg['num_classes'])
      print(message)
    extra = {'class_names': list(names) or None,
             'release': args.zoo or None,'source': str(pathlib.Path(args.input).resolve()),
             'converted_with': 'qcs-convert',
             'read_with': how, 'layout': report.layout,
             'keys_loaded': len(report.loaded),
             'keys_ignored': sum(len(v) for v in report.ignored.values()),
             'keys_unknown': report.unknown}
    path = checkpoint.save_variables(out, variables, cfg, extra=extra,
                                     force=args.force)
    print(f'wrote {path} ({"full model" if args.full else "backbone"})')
  except (convert.ConversionError, checkpoint.CheckpointError) as e:
    print(f'error: {_one_line(e)}', file=sys.stderr)
    return 2
  except Exception as e:  # pylint: disable=broad-except  # a reader bug: still one line
    print(f'error: {args.input}: {type(e).__name__}: {_one_line(e)}', file=sys.stderr)
    return 2
  if args.verify:
    reference = import_reference()
    if reference is not None:
      errors = verify.verify_against_torch(sd, variables, cfg, reference,
                                            full=args.full)
      tol = 1e-10 if args.float64 else 1e-4
      for k, e in errors.items():
        print(f'verify: max relative error {k}: {e:.3g}')
      if max(errors.values()) > tol:
        print(f'verify: FAILED (tolerance {tol:g})', file=sys.stderr)
        return 1
      print(f'verify: ok (all <= {tol:g})')
  return 0


def run() -> None:
  """Console script."""
  sys.exit(main())


if __name__ == '__main__':
  run()
