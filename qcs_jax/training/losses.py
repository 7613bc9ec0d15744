"""The training loss of docs/ARCHITECTURE.md section 7: mean of the per-branch cross-entropies."""
from __future__ import annotations

import jax.numpy as jnp
import optax


def branch_cross_entropy(outputs: dict, labels: jnp.ndarray) -> jnp.ndarray:
  """Mean of the 1 (baseline), 4 (DCS) or 8 (QCS) cross-entropies.

  outputs: dict(base=(B, nb, K)[, cross=(B, nb, K)]); labels: int (B, nb).
  Every term is a mean over the same B anchors, so the mean of the terms is the
  mean over all (B, nb, heads) elements.
  """
  logits = jnp.stack([outputs[k] for k in ("base", "cross") if k in outputs], axis=-2)
  labels = jnp.broadcast_to(labels[..., None], logits.shape[:-1])
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 -> f32
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return ce.mean()
