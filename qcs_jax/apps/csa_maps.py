"""Pictures of Cross Similarity Attention (the paper's Figures 6, 8 and 9, in spirit).

For 2 (DCS) or 4 (QCS: anchor, positive, negative, negative2) face images the
training-time forward runs in eval mode with mutable=['intermediates'], which
exposes each cross module's CSA attention vector per branch. Each vector (one
weight per token of its pyramid level) is reshaped to the level's token grid
(7x7 at 224 px), upsampled and laid over its face. The token x token matrices
behind it are recomputed from the cross modules' own parameters: VIT_base
tokens -> norm1 -> proj (QK half) -> csa.similarity / csa.shifted_distance of
csa.cdist, i.e. S21, S43 (similarities within a class pair) and D31, D42
(distances across the class pairs). Recomputing the attention from the same
QK and comparing it with the sown one checks that the matrices are the ones
the model used (`max_attention_error`).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import cv2
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from qcs_jax.apps.recognizer import Recognizer, class_names_of
from qcs_jax.data import transforms
from qcs_jax.models import csa
from qcs_jax.models.vit import LayerNorm

matplotlib.use("Agg")  # before pyplot: figures are written to files, never shown
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position

BRANCH_NAMES = {2: ("anchor", "positive"), 4: ("anchor", "positive", "negative", "negative2")}
CELL_INCHES = 2.2
DPI = 100
COLUMNS = 4  # face | level 1 | level 2 | level 3
# Matrices shown per model kind: (name, rows branch, columns branch, kind).
MATRICES = {
    2: (("S21", 1, 0, "similarity"),),
    4: (("S21", 1, 0, "similarity"), ("S43", 3, 2, "similarity"),
        ("D31", 2, 0, "distance"), ("D42", 3, 1, "distance")),
}


def figure_size_px(num_branches: int, dpi: int = DPI) -> tuple[int, int]:
  """(width, height) of the PNG: 4 columns; one row per image and per matrix."""
  rows = num_branches + len(MATRICES[num_branches])
  return (int(round(COLUMNS * CELL_INCHES * dpi)), int(round(rows * CELL_INCHES * dpi)))


def prepare_faces(images: Sequence[np.ndarray], img_size: int,
                  recognizer: Recognizer | None = None,
                  names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """uint8 pictures -> (normalised (n, S, S, 3) float32, displayed uint8 (n, S, S, 3)).

  With a `recognizer`, each picture is replaced by the crop of its largest face, found
  and aligned as the Recognizer (qcs-predict, the web demo) does.
  """
  tf = transforms.build_transform(None, img_size, train=False)
  x = np.zeros((len(images), img_size, img_size, 3), np.float32)
  for i, im in enumerate(images):
    im = np.asarray(im)
    if recognizer is not None:
      rgb, dets = recognizer.detect(im)
      if not dets:
        what = names[i] if names else f"image {i}"
        raise ValueError(f"{what}: no face found (drop --detect for cropped faces)")
      im = recognizer.crop(rgb, dets[0])
    tf(im, None, out=x[i])
  shown = x * transforms.IMAGENET_STD + transforms.IMAGENET_MEAN
  return x, np.clip(np.round(shown * 255.0), 0, 255).astype(np.uint8)


def _qk(params: dict, tokens: Any) -> Any:
  """The cross module's QK projection of (n, T, D) tokens: proj(norm1(x))[..., :D]."""
  d = tokens.shape[-1]
  h = LayerNorm(1e-5).apply({"params": params["norm1"]}, tokens)
  kernel = jnp.asarray(params["proj"]["kernel"])[:, :d]
  bias = jnp.asarray(params["proj"]["bias"])[:d]
  return jnp.einsum("ntd,de->nte", h, kernel.astype(h.dtype)) + bias


def _attention_vectors(att: np.ndarray) -> np.ndarray:
  """Sown attention -> (nb, T) per-token weights; SDPA's (2, T, T) maps -> attention received.

  SDPA branch a attends to the positive's tokens: the column sums of attn_a
  (normalised) weight the positive's tokens, and vice versa.
  """
  if att.ndim == 2:
    return att
  received = att.sum(1)                       # (2, T): indexed by the other branch
  received = received[::-1]                   # -> indexed by each branch's own tokens
  return received / received.sum(-1, keepdims=True)


def _forward(model: Any, variables: Any, x: Any) -> dict:
  """Sown attention, QK-based matrices and recomputed attention of one sample (jittable)."""

  nb = x.shape[0]
  # One forward: the cross modules sow their attention; capture_intermediates
  # also records VIT_base's output (logits, tokens (nb, 3T, D): B = 1 sample).
  out, state = model.apply(
      variables, x[None], train=False, mutable=["intermediates"],
      capture_intermediates=lambda mdl, method: mdl.name == "VIT_base" and method == "__call__")
  tokens = state["intermediates"]["VIT_base"]["__call__"][0][1].astype(jnp.float32)
  t = tokens.shape[1] // 3
  params = variables["params"]
  minmax = model.minmax
  res = {"probs": jax.nn.softmax(out["base"][0].astype(jnp.float32), -1)}
  for level in (1, 2, 3):
    name = f"cross_attention_{level}"
    qk = _qk(params[name], tokens[:, (level - 1) * t:level * t])
    qk = [qk[i:i + 1] for i in range(nb)]
    if model.model_name == "qcs":
      again = csa.qcs_attention(*qk, params[name]["theta"], model.csa, minmax)
    elif model.csa == "sdpa":
      again = csa.sdpa_attention(*qk)
    else:
      again = csa.dcs_attention(*qk, minmax=minmax)
    res[f"sown{level}"] = state["intermediates"][name]["attention"][0][0]
    res[f"again{level}"] = jnp.concatenate(again, 0)
    for mname, r, c, what in MATRICES[nb]:
      d = csa.cdist(qk[r], qk[c])
      m = csa.similarity(d, minmax) if what == "similarity" else csa.shifted_distance(d, minmax)
      res[f"{mname}_{level}"] = m[0]
  return res


def csa_maps(loaded: Any, images: np.ndarray) -> dict:
  """CSA attention vectors and similarity matrices of one (anchor, positive[, n, n2]) sample.

  Args:
    loaded: checkpoint.LoadedModel (.model, .variables, .model_cfg).
    images: normalised float32 (nb, S, S, 3), branch order a, p[, n, n2].

  Returns:
    dict(attention {level: (nb, T) np}, matrices {level: {name: (T, T) np}},
    grid (g, g) of each level, probs (nb, K) of the inference path,
    max_attention_error: max |recomputed - sown| attention over levels).
  """

  model = loaded.model
  nb = model.num_branches
  if nb == 1:
    raise ValueError("a baseline model has no cross modules (no CSA) to visualise: use a "
                     "DCS or QCS checkpoint")
  if images.shape[0] != nb:
    need = ", ".join(BRANCH_NAMES[nb])
    raise ValueError(f"a {model.model_name.upper()} model needs {nb} images ({need}), got "
                     f"{images.shape[0]}")
  res = jax.jit(lambda v, x: _forward(model, v, x))(loaded.variables,
                                                      jnp.asarray(images, jnp.float32))
  res = {k: np.asarray(v, np.float64) for k, v in res.items()}
  t = res["sown1"].shape[-1]
  g = int(math.isqrt(t))
  if g * g != t:
    raise ValueError(f"{t} tokens per level are not a square grid")
  err = max(float(np.max(np.abs(res[f"again{l}"] - res[f"sown{l}"]))) for l in (1, 2, 3))
  return {"attention": {l: _attention_vectors(res[f"sown{l}"]) for l in (1, 2, 3)},
          "matrices": {l: {m[0]: res[f"{m[0]}_{l}"] for m in MATRICES[nb]} for l in (1, 2, 3)},
          "grid": g, "probs": res["probs"], "max_attention_error": err}


def upsample(vec: np.ndarray, grid: int, size: int) -> np.ndarray:
  """(g*g,) token weights -> (size, size) heatmap in [0, 1] (bilinear, min-max scaled)."""
  m = np.asarray(vec, np.float32).reshape(grid, grid)
  m = cv2.resize(m, (size, size), interpolation=cv2.INTER_LINEAR)
  lo, hi = float(m.min()), float(m.max())
  return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def render(maps: dict, shown: np.ndarray, path: str, class_names: Sequence[str],
           names: Sequence[str] | None = None, dpi: int = DPI, title: str = "") -> str:
  """Writes the figure: a row per image (face + 3 overlaid levels), a row per matrix."""

  nb = shown.shape[0]
  branch = BRANCH_NAMES[nb]
  mats = MATRICES[nb]
  rows = nb + len(mats)
  w_px, h_px = figure_size_px(nb, dpi)
  fig = plt.figure(figsize=(w_px / dpi, h_px / dpi), dpi=dpi)
  gs = fig.add_gridspec(rows, COLUMNS, left=0.02, right=0.98, bottom=0.02, top=0.95,
                        wspace=0.25, hspace=0.45)
  size, g, t = shown.shape[1], maps["grid"], maps["grid"] ** 2
  for i in range(nb):
    k = int(np.argmax(maps["probs"][i]))
    ax = fig.add_subplot(gs[i, 0])
    ax.imshow(shown[i])
    label = f"{branch[i]}" + (f" ({names[i]})" if names else "")
    ax.set_title(f"{label}\npred {class_names[k]} {maps['probs'][i][k]:.2f}", fontsize=8)
    ax.axis("off")
    for level in (1, 2, 3):
      vec = maps["attention"][level][i]
      ax = fig.add_subplot(gs[i, level])
      ax.imshow(shown[i])
      ax.imshow(upsample(vec, g, size), cmap="jet", alpha=0.45, vmin=0, vmax=1)
      ax.set_title(f"level {level} CSA ({g}x{g})\nmax {t * vec.max():.2f}x uniform",
                   fontsize=8)
      ax.axis("off")
  for j, (mname, r, c, what) in enumerate(mats):
    ax = fig.add_subplot(gs[nb + j, 0])
    ax.axis("off")
    ax.text(0.0, 0.5, f"{mname}: {what}\nrows: {branch[r]} tokens\ncols: {branch[c]} "
            f"tokens\n({'max(D)-D, ' if what == 'similarity' else ''}D = cdist - min)",
            fontsize=8, va="center", ha="left", transform=ax.transAxes)
    for level in (1, 2, 3):
      ax = fig.add_subplot(gs[nb + j, level])
      m = maps["matrices"][level][mname]
      ax.imshow(m, cmap="viridis", interpolation="nearest")
      ax.set_title(f"{mname} level {level} ({t}x{t})\n{m.min():.3g} .. {m.max():.3g}",
                   fontsize=8)
      ax.set_xticks([])
      ax.set_yticks([])
  fig.suptitle(title or "Cross Similarity Attention", fontsize=10)
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


def visualize_csa(loaded: Any, images: Sequence[np.ndarray], output: str,
                  names: Sequence[str] | None = None, detect: bool = False,
                  margin: float = 0.25, min_face: int = 40, dpi: int = DPI) -> dict:
  """Pictures (uint8 RGB, order a, p[, n, n2]) -> PNG at `output`; returns csa_maps(...)."""
  size = int(loaded.model_cfg.get("img_size", 224))
  rec = Recognizer(loaded, margin=margin, min_face=min_face) if detect else None
  x, shown = prepare_faces(images, size, rec, names)
  maps = csa_maps(loaded, x)
  class_names = class_names_of(loaded)
  cfg = loaded.model_cfg
  title = (f"{str(cfg.get('name', 'qcs')).upper()} (csa={cfg.get('csa', 'sd')}) "
           f"cross similarity attention, {size} px")
  render(maps, shown, output, class_names, names, dpi, title)
  maps["path"] = output
  return maps
