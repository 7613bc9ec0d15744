"""Cross Similarity Attention (CSA) as pure functions of jax/jnp.

Shapes: B batch, N (N1..N4) tokens of a branch, C channels. Every attention
vector returned for branch b is indexed by branch b's own tokens and sums to 1
over them. For a (B, R, K) matrix, "cols" normalises over K (axis 2) and
"rows" over R (axis 1).

min/max (`minmax`):
  'global': over the WHOLE distance tensor, batch included (the authors' code;
    couples the samples of a batch; under jit on a sharded batch it is a
    cross-device reduction).
  'sample': per sample, over its (R, K) matrix (decouples the samples).

All functions are jit-, vmap- and grad-friendly; distances have a finite
(zero) gradient at zero distance.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NORM_EPS = 1e-12
MINMAX = ('global', 'sample')
QCS_VARIANTS = ('sd', 's', 'd')


@jax.custom_jvp
def safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt whose derivative is 0 (not inf/nan) at x == 0."""
  return jnp.sqrt(x)


@safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  y = jnp.sqrt(x)
  positive = x > 0
  dy = jnp.where(positive, 0.5 / jnp.where(positive, y, 1.0), 0.0)
  return y, dy * dx


def cdist(a: jax.Array, b: jax.Array) -> jax.Array:
  """Euclidean distances (B, Na, C), (B, Nb, C) -> (B, Na, Nb), matmul form.

  sqrt(max(|a|^2 + |b|^2 - 2 a.b, 0)) like torch.cdist's matrix-product path;
  the gradient is finite (0) where the distance is 0.
  """
  if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
    raise ValueError(f'cdist expects (B, Na, C) and (B, Nb, C), got {a.shape} and {b.shape}')
  aa = jnp.sum(a * a, axis=-1)[:, :, None]
  bb = jnp.sum(b * b, axis=-1)[:, None, :]
  ab = jnp.einsum('bic,bjc->bij', a, b, precision=jax.lax.Precision.HIGHEST)
  return safe_sqrt(jnp.maximum(aa + bb - 2.0 * ab, 0.0))


def normalize(m: jax.Array, axis: int) -> jax.Array:
  """m / max(||m||_2 over `axis`, 1e-12) (torch.nn.functional.normalize)."""
  norm = safe_sqrt(jnp.sum(m * m, axis=axis, keepdims=True))
  return m / jnp.maximum(norm, NORM_EPS)


def _reduce_axes(d: jax.Array, minmax: str):
  if minmax == 'global':
    return None
  if minmax == 'sample':
    return tuple(range(1, d.ndim))
  raise ValueError(f"minmax must be one of {MINMAX}, got {minmax!r}")


def shifted_distance(d: jax.Array, minmax: str = 'global') -> jax.Array:
  """D - min(D): distances shifted so that the smallest is 0."""
  axes = _reduce_axes(d, minmax)
  return d - jnp.min(d, axis=axes, keepdims=axes is not None)


def similarity(d: jax.Array, minmax: str = 'global') -> jax.Array:
  """S = max(D') - D' with D' = D - min(D): large where tokens are close."""
  d = shifted_distance(d, minmax)
  axes = _reduce_axes(d, minmax)
  return jnp.max(d, axis=axes, keepdims=axes is not None) - d


def _cols_sumrows(m: jax.Array) -> jax.Array:
  """(B, R, K) -> (B, K): normalise over K, sum over R."""
  return jnp.sum(normalize(m, axis=2), axis=1)


def _rows_sumcols(m: jax.Array) -> jax.Array:
  """(B, R, K) -> (B, R): normalise over R, sum over K."""
  return jnp.sum(normalize(m, axis=1), axis=2)


def dcs_attention(qk_a: jax.Array, qk_p: jax.Array, minmax: str = 'global'
                  ) -> tuple[jax.Array, jax.Array]:
  """DCS attention of anchor and positive.

  Args:
    qk_a: (B, Na, C) anchor QK.
    qk_p: (B, Np, C) positive QK.
    minmax: 'global' or 'sample'.

  Returns:
    m_a (B, Na), m_p (B, Np), softmax over tokens. With S = similarity of
    cdist(qk_p, qk_a) (B, Np, Na): m_a = softmax(sumrows(normalize(S, cols))),
    m_p = softmax(sumcols(normalize(S, rows))).
  """
  s = similarity(cdist(qk_p, qk_a), minmax)
  return (jax.nn.softmax(_cols_sumrows(s), axis=-1),
          jax.nn.softmax(_rows_sumcols(s), axis=-1))


def qcs_attention(qk1: jax.Array, qk2: jax.Array, qk3: jax.Array, qk4: jax.Array,
                  theta: jax.Array, variant: str = 'sd', minmax: str = 'global'
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """QCS attention of anchor (1), positive (2), negative (3), negative2 (4).

  Args:
    qk1..qk4: (B, N_b, C) QK of each branch; 1, 2 share a class, 3, 4 share
      another one.
    theta: scalar; the distance terms are weighted by k' = tanh(theta) + 1.
    variant: 'sd' (similarity + k' * distance), 's' (similarity only) or 'd'
      (distance only, without k'; theta unused).
    minmax: 'global' or 'sample'.

  Returns:
    m1..m4, each (B, N_b) softmax over branch b's tokens. With S21 (B, N2, N1),
    S43 (B, N4, N3) similarities and D31 (B, N3, N1), D42 (B, N4, N2) shifted
    distances:
      m1 = softmax(sumrows(cols(S21))  + k' sumrows(cols(D31)))
      m2 = softmax(sumcols(rows(S21))  + k' sumrows(cols(D42)))
      m3 = softmax(sumrows(cols(S43))  + k' sumcols(rows(D31)))
      m4 = softmax(sumcols(rows(S43))  + k' sumcols(rows(D42)))
    (sumcols(rows(X)) == sumrows(cols(X^T)), so these are the paper's terms.)
  """
  if variant not in QCS_VARIANTS:
    raise ValueError(f'QCS variant must be one of {QCS_VARIANTS}, got {variant!r}')
  terms = []
  if variant in ('sd', 's'):
    s21 = similarity(cdist(qk2, qk1), minmax)
    s43 = similarity(cdist(qk4, qk3), minmax)
    s_terms = (_cols_sumrows(s21), _rows_sumcols(s21),
               _cols_sumrows(s43), _rows_sumcols(s43))
    terms.append(s_terms)
  if variant in ('sd', 'd'):
    d31 = shifted_distance(cdist(qk3, qk1), minmax)
    d42 = shifted_distance(cdist(qk4, qk2), minmax)
    d_terms = (_cols_sumrows(d31), _cols_sumrows(d42),
               _rows_sumcols(d31), _rows_sumcols(d42))
    if variant == 'sd':
      k = jnp.tanh(theta) + 1.0
      d_terms = tuple(k * t for t in d_terms)
    terms.append(d_terms)
  logits = [sum(ts) for ts in zip(*terms)]
  return tuple(jax.nn.softmax(x, axis=-1) for x in logits)


def sdpa_attention(qk_a: jax.Array, qk_p: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Scaled dot-product cross attention maps (the DCS ablation of Table 1).

  Args:
    qk_a: (B, Na, C) anchor QK.
    qk_p: (B, Np, C) positive QK.

  Returns:
    attn_a (B, Na, Np): rows sum to 1; applied to the positive's values.
    attn_p (B, Np, Na): rows sum to 1; applied to the anchor's values.
    With I = qk_p qk_a^T / sqrt(C) (B, Np, Na): attn_p = softmax(I, axis 2),
    attn_a = softmax(I, axis 1) transposed.
  """
  scale = qk_a.shape[-1] ** -0.5
  i = jnp.einsum('bjc,bic->bji', qk_p, qk_a, precision=jax.lax.Precision.HIGHEST) * scale
  attn_p = jax.nn.softmax(i, axis=2)
  attn_a = jnp.swapaxes(jax.nn.softmax(i, axis=1), 1, 2)
  return attn_a, attn_p
