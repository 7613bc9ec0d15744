"""The embedded synthetic FER data set: cartoon faces drawn from a seed at run time.

The expression class (RAF-DB order) decides the brows (height, inner-end angle),
the eyes (openness), the mouth (curve, openness, width, one-sided sneer) and nose
wrinkles, with a random intensity and within-class jitter so classes overlap a
little. Everything else is an unlabeled nuisance: skin tone, face position,
scale and rotation, background (colour, gradient, stripes, texture), hair,
glasses, lighting, pixel noise. ``confound`` makes chosen nuisances predictive of
the class in the train split only: the redundant features QCS claims to ignore.

Confound strength p (per nuisance, ``confound=("background:0.95", "glasses")``; a
bare name takes ``confound_strength``): each training face's nuisance follows its
class with probability p and is drawn independently of it otherwise, so p = 0 is
today's independent data set (bit for bit) and p = 1 determines the nuisance by
the class. The draws are coupled across p: the faces, and which of them follow
their class (a fixed uniform per face below p), are the same for every p, so the
images confounded at p = 0.5 are a subset of those at p = 0.8.

This module decides *what* is drawn; synthetic_render.py draws it.
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from qcs_jax.data.base import DataError, InMemorySource
from qcs_jax.data.synthetic_render import NUM_IRIS, confound_code, render_faces

__all__ = ["CLASS_NAMES", "NUM_CLASSES", "NUISANCE_FACTORS", "SPLITS",
           "DEFAULT_CONFOUND_STRENGTH", "confound_code", "parse_confound", "sample_factors",
           "render_faces", "make_synthetic_split", "render_face", "save_sample_grid", "main"]

CLASS_NAMES = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")
NUM_CLASSES = len(CLASS_NAMES)
NUISANCE_FACTORS = ("background", "skin", "hair", "glasses", "position", "scale",
                    "rotation", "lighting", "noise")
SPLITS = {"train": 0, "test": 1}
DEFAULT_CONFOUND_STRENGTH = 0.8
_CONFOUND_STREAM = 5  # the generator of the confound draws: (seed, split, 5)

# Expression parameters per class: brow_h (raise), brow_a (inner end raised + / lowered -),
# eye_o (openness), mouth_c (smile + / frown -), mouth_o (open), mouth_w (width),
# mouth_s (one-sided sneer), wrinkle (nose wrinkles).
_EXPR_KEYS = ("brow_h", "brow_a", "eye_o", "mouth_c", "mouth_o", "mouth_w", "mouth_s", "wrinkle")
_PROTOTYPES = np.array([
    # brow_h brow_a eye_o mouth_c mouth_o mouth_w mouth_s wrinkle
    [1.10, 0.00, 1.30, 0.00, 1.00, 0.30, 0.0, 0.0],   # Surprise: high brows, wide eyes, round O
    [0.70, 0.85, 1.15, -0.35, 0.50, 0.95, 0.0, 0.0],  # Fear: worried brows, stretched mouth
    [-0.40, -0.30, 0.45, -0.45, 0.08, 0.65, 0.9, 1.0],  # Disgust: squint, sneer, wrinkles
    [0.10, 0.00, 0.55, 1.00, 0.35, 1.00, 0.0, 0.0],   # Happiness: smile with teeth, smiling eyes
    [0.00, 0.95, 0.60, -0.90, 0.03, 0.70, 0.0, 0.0],  # Sadness: inner brows up, frown
    [-0.75, -1.00, 0.70, -0.25, 0.10, 0.60, 0.0, 0.4],  # Anger: V brows, tight mouth
    [0.00, 0.00, 0.85, 0.00, 0.00, 0.70, 0.0, 0.0],   # Neutral
], dtype=np.float64)
_JITTER = np.array([0.22, 0.22, 0.13, 0.22, 0.10, 0.10, 0.15, 0.20])
_NEUTRAL = _PROTOTYPES[6]


def _field(cfg: Any, name: str, default: Any = ...) -> Any:
  """Reads cfg[name] from a ConfigDict, dict or object; DataError if required and missing."""
  try:
    return cfg[name]
  except (KeyError, TypeError, AttributeError, IndexError):
    pass
  if hasattr(cfg, name):
    return getattr(cfg, name)
  if default is ...:
    raise DataError(f"data.synthetic: missing key '{name}'")
  return default


def _strength(value: Any, where: str) -> float:
  try:
    p = float(value)
  except (TypeError, ValueError):
    raise DataError(f"data.synthetic: confound strength of {where} must be a number in "
                    f"[0, 1], got {value!r}") from None
  if not 0.0 <= p <= 1.0:
    raise DataError(f"data.synthetic: confound strength of {where} must be in [0, 1], got {p}")
  return p


def _positive(value: Any, key: str) -> float:
  """A float > 0 (the expression knobs); DataError naming the key otherwise."""
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise DataError(f"data.synthetic: {key} must be a number > 0, got {value!r}") from None
  if not x > 0.0 or not np.isfinite(x):
    raise DataError(f"data.synthetic: {key} must be a finite number > 0, got {x}")
  return x


def parse_confound(confound: Any, default_strength: float = DEFAULT_CONFOUND_STRENGTH
                   ) -> dict[str, float]:
  """{nuisance: p} from the config's ``confound`` field.

  Accepts a mapping {name: p}, a sequence of "name" / "name:p" entries, or one
  comma-separated string of them (command-line flags); a bare name takes
  ``default_strength``. Entries with p = 0 are dropped (independent, as if unlisted).
  """
  default = _strength(default_strength, "confound_strength")
  if not confound:
    return {}
  if isinstance(confound, Mapping):
    items = [(str(k), v) for k, v in confound.items()]
  else:
    entries = confound.split(",") if isinstance(confound, str) else list(confound)
    items = []
    for e in entries:
      name, _, p = str(e).strip().partition(":")
      if name.strip():
        items.append((name.strip(), p.strip() if p.strip() else default))
  out: dict[str, float] = {}
  for name, p in items:
    if name not in NUISANCE_FACTORS:
      raise DataError(f"data.synthetic: unknown confound {name!r}; choose from {NUISANCE_FACTORS}")
    if name in out:
      raise DataError(f"data.synthetic: confound {name!r} is listed twice")
    out[name] = _strength(p, repr(name))
  return {k: v for k, v in out.items() if v > 0.0}


def _confound_u(u: np.ndarray, labels: np.ndarray, strength: float,
                crng: np.random.Generator) -> np.ndarray:
  """A nuisance's driving variable: in the label's 7-bin w.p. ``strength``, else ``u``.

  Always draws the same numbers from ``crng`` (whatever the strength), so every p
  confounds a nested set of the same faces.
  """
  n = labels.shape[0]
  hit = crng.random(n) < strength
  inside = crng.uniform(0.1, 0.9, n)
  return np.where(hit, (labels + inside) / NUM_CLASSES, u)


def sample_factors(labels: np.ndarray, rng: np.random.Generator,
                   confound: Any = (), strength: float = DEFAULT_CONFOUND_STRENGTH,
                   confound_rng: np.random.Generator | None = None,
                   expression_strength: float = 1.0,
                   expression_jitter: float = 1.0) -> dict[str, np.ndarray]:
  """All per-image drawing parameters (expression from the class, nuisances free or confounded).

  ``confound``: see ``parse_confound`` (``strength`` is the default p of bare names).
  ``confound_rng`` draws the confounds (default: a child of ``rng``'s seed), so the
  other factors never depend on the confound. ``expression_strength`` scales every
  face's departure from the neutral prototype and ``expression_jitter`` the
  within-class variation; at their default 1.0 the draws are today's bit for bit
  (the same random numbers are drawn whatever their values).
  """
  labels = np.asarray(labels, np.int64)
  n = labels.shape[0]
  strengths = parse_confound(confound, strength)
  out: dict[str, np.ndarray] = {"label": labels}
  intensity = rng.uniform(0.6, 1.15, n) * float(expression_strength)
  expr = (_NEUTRAL + intensity[:, None] * (_PROTOTYPES[labels] - _NEUTRAL)
          + rng.normal(size=(n, len(_EXPR_KEYS))) * (_JITTER * float(expression_jitter)))
  expr[:, 6] *= rng.choice([-1.0, 1.0], n)  # which side sneers
  for j, k in enumerate(_EXPR_KEYS):
    out[k] = expr[:, j]
  out["eye_o"] = np.clip(out["eye_o"], 0.08, 1.6)
  out["mouth_o"] = np.clip(out["mouth_o"], 0.0, 1.3)
  out["mouth_w"] = np.clip(out["mouth_w"], 0.3, 1.2)
  out["wrinkle"] = np.clip(out["wrinkle"], 0.0, 1.0)
  out["intensity"] = intensity
  out["gaze_x"] = rng.uniform(-0.03, 0.03, n)
  out["gaze_y"] = rng.uniform(-0.015, 0.015, n)
  out["brow_arch"] = rng.uniform(0.0, 0.05, n)
  out["brow_th"] = rng.uniform(0.035, 0.055, n)
  out["mouth_y"] = rng.uniform(0.47, 0.55, n)
  out["face_a"] = rng.uniform(0.74, 0.86, n)
  out["iris"] = rng.integers(0, NUM_IRIS, n)

  us = {f: rng.random(n) for f in NUISANCE_FACTORS}
  if strengths:
    crng = confound_rng
    if crng is None:  # a child of rng's seed: rng's own stream does not move
      crng = np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0])
    for f in NUISANCE_FACTORS:  # fixed draw order: each nuisance's draws never move
      us[f] = _confound_u(us[f], labels, strengths.get(f, 0.0), crng)
  for f, u in us.items():
    out[f + "_u"] = u
  # background: hue from u; kind 0 solid, 1 gradient, 2 stripes, 3 texture
  out["bg_sat"] = rng.uniform(0.35, 0.75, n)
  out["bg_val"] = rng.uniform(0.45, 0.95, n)
  out["bg_kind"] = rng.integers(0, 4, n)
  out["bg_angle"] = rng.uniform(0, 2 * np.pi, n)
  out["bg_freq"] = rng.uniform(4.0, 14.0, n)
  out["bg_phase"] = rng.uniform(0, 2 * np.pi, n)
  out["clothes_h"] = rng.random(n)
  out["clothes_v"] = rng.uniform(0.25, 0.85, n)
  out["hair_len"] = rng.uniform(0.55, 1.15, n)
  out["hairline"] = rng.uniform(-0.64, -0.54, n)
  out["glasses"] = confound_code(us["glasses"]) % 2 == 1
  out["frame_v"] = rng.uniform(0.05, 0.45, n)
  out["cx"] = 0.5 + (us["position"] - 0.5) * 0.16
  out["cy"] = rng.uniform(0.43, 0.53, n)
  out["radius"] = 0.27 + 0.08 * us["scale"]
  out["angle"] = np.deg2rad((us["rotation"] - 0.5) * 30.0)
  out["light_dir"] = us["lighting"] * 2 * np.pi
  out["light_amp"] = rng.uniform(0.25, 0.6, n)
  out["gain"] = rng.uniform(0.8, 1.15, n)
  out["noise_sd"] = (2.0 + 10.0 * us["noise"]) / 255.0
  return out



def _split_labels(n: int, rng: np.random.Generator) -> np.ndarray:
  """Balanced classes (counts differ by at most one), shuffled."""
  return rng.permutation(np.arange(n) % NUM_CLASSES)


def _noisy(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
  """Replaces exactly round(fraction * n) labels by a random different class."""
  out = labels.copy()
  m = int(round(fraction * len(labels)))
  idx = rng.choice(len(labels), size=m, replace=False)
  out[idx] = (labels[idx] + rng.integers(1, NUM_CLASSES, m)) % NUM_CLASSES
  return out


def make_synthetic_split(cfg: Any, split: str) -> InMemorySource:
  """The synthetic split ('train' | 'test'), generated deterministically from cfg.seed.

  Confounds (``confound``, ``confound_strength``: see the module docstring) and
  label noise apply to the train split only, so the test split measures
  the expression alone against clean labels. ``source.factors`` holds every drawing
  parameter (``label`` is the drawn, true class; ``source.labels`` the noisy one).
  """
  if split not in SPLITS:
    raise DataError(f"data.synthetic: split must be one of {sorted(SPLITS)}, got {split!r}")
  n = int(_field(cfg, "num_train" if split == "train" else "num_test"))
  size = int(_field(cfg, "image_size"))
  seed = int(_field(cfg, "seed"))
  noise = float(_field(cfg, "label_noise", 0.0) or 0.0)
  expr_strength = _positive(_field(cfg, "expression_strength", 1.0), "expression_strength")
  expr_jitter = _positive(_field(cfg, "expression_jitter", 1.0), "expression_jitter")
  strengths = parse_confound(_field(cfg, "confound", ()) or (),
                             _field(cfg, "confound_strength", DEFAULT_CONFOUND_STRENGTH))
  if n < 1:
    raise DataError(f"data.synthetic: num_{split} must be >= 1, got {n}")
  if size < 16:
    raise DataError(f"data.synthetic: image_size must be >= 16, got {size}")
  if seed < 0:
    raise DataError(f"data.synthetic: seed must be >= 0, got {seed}")
  if not 0.0 <= noise <= 1.0:
    raise DataError(f"data.synthetic: label_noise must be in [0, 1], got {noise}")
  train = split == "train"
  rng = np.random.default_rng([seed, SPLITS[split]])
  true = _split_labels(n, rng)
  strengths = strengths if train else {}
  factors = sample_factors(true, rng, strengths,
                           confound_rng=np.random.default_rng([seed, SPLITS[split],
                                                               _CONFOUND_STREAM]),
                           expression_strength=expr_strength, expression_jitter=expr_jitter)
  labels = _noisy(true, noise, rng) if train and noise > 0 else true
  images = render_faces(factors, size, noise_seed=(seed, SPLITS[split], 7))
  src = InMemorySource(labels=labels, class_names=CLASS_NAMES, name=f"synthetic/{split}",
                       images=images)
  src.factors = factors
  src.confound = strengths  # {nuisance: p} this split was drawn with
  return src


def render_face(expression: int | str, image_size: int = 112, seed: int = 0,
                jitter: bool = True, **overrides: Any) -> np.ndarray:
  """One face of an expression (index or class name) as uint8 (S, S, 3).

  ``seed`` draws the nuisances (and, with ``jitter``, the intensity and within-class
  variation); ``jitter=False`` draws the class prototype exactly. ``overrides`` set any
  drawing parameter of ``sample_factors`` (e.g. glasses=False, angle=0.0, mouth_c=1.0).
  """
  if isinstance(expression, str):
    names = [c.lower() for c in CLASS_NAMES]
    if expression.lower() not in names:
      raise DataError(f"render_face: unknown expression {expression!r}; choose from {CLASS_NAMES}")
    expression = names.index(expression.lower())
  if not 0 <= int(expression) < NUM_CLASSES:
    raise DataError(f"render_face: expression must be in 0..{NUM_CLASSES - 1}, got {expression}")
  rng = np.random.default_rng([int(seed), 99])
  f = sample_factors(np.array([int(expression)]), rng)
  if not jitter:
    for j, key in enumerate(_EXPR_KEYS):
      f[key] = _PROTOTYPES[int(expression), j:j + 1].copy()
    f["intensity"] = np.ones(1)
  for key, val in overrides.items():
    if key not in f:
      raise DataError(f"render_face: unknown parameter {key!r}")
    f[key] = np.asarray([val], dtype=f[key].dtype)
  return render_faces(f, image_size, noise_seed=(int(seed), 98), threads=1)[0]


def save_sample_grid(source: Any, path: str, per_class: int = 8, scale: int = 1) -> None:
  """Writes a PNG: one row per class (first ``per_class`` images labelled so), names at left."""

  labels = np.asarray(source.labels)
  names = tuple(source.class_names)
  first = np.asarray(source[0]["image"])
  h, w = first.shape[0] * scale, first.shape[1] * scale
  margin, pad = 90, 2
  grid = Image.new("RGB", (margin + per_class * (w + pad), len(names) * (h + pad)), "white")
  draw = ImageDraw.Draw(grid)
  for c, name in enumerate(names):
    y = c * (h + pad)
    draw.text((4, y + h // 2 - 6), name, fill=(0, 0, 0))
    for j, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
      im = Image.fromarray(np.asarray(source[int(i)]["image"]))
      if scale != 1:
        im = im.resize((w, h), Image.NEAREST)
      grid.paste(im, (margin + j * (w + pad), y))
  grid.save(path)


def main(argv: Sequence[str] | None = None) -> None:
  """CLI: generate a split, report the time it took, save a grid of samples per class."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="synthetic_grid.png")
  ap.add_argument("--num", type=int, default=700, help="images to generate")
  ap.add_argument("--image_size", type=int, default=112)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--split", default="train", choices=sorted(SPLITS))
  ap.add_argument("--confound", default="",
                  help="comma-separated nuisances, each with an optional p: "
                       "background:0.95,glasses")
  ap.add_argument("--confound_strength", type=float, default=DEFAULT_CONFOUND_STRENGTH,
                  help="p of the nuisances listed without one")
  ap.add_argument("--label_noise", type=float, default=0.0)
  ap.add_argument("--expression_strength", type=float, default=1.0,
                  help="scale of the departure from neutral (1: today's faces)")
  ap.add_argument("--expression_jitter", type=float, default=1.0,
                  help="scale of the within-class variation (1: today's faces)")
  ap.add_argument("--per_class", type=int, default=8)
  ap.add_argument("--scale", type=int, default=1)
  a = ap.parse_args(argv)
  cfg = dict(num_train=a.num, num_test=a.num, image_size=a.image_size, seed=a.seed,
             confound=a.confound, confound_strength=a.confound_strength,
             label_noise=a.label_noise, expression_strength=a.expression_strength,
             expression_jitter=a.expression_jitter)
  t0 = time.perf_counter()
  try:
    src = make_synthetic_split(cfg, a.split)
  except DataError as e:
    ap.exit(2, f"error: {e}\n")
  dt = time.perf_counter() - t0
  print(f"{src.summary()}\ngenerated {a.num} images at {a.image_size}px in {dt:.2f} s "
        f"({a.num / dt:.0f} images/s)")
  save_sample_grid(src, a.out, a.per_class, a.scale)
  print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
