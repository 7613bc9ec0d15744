"""The cross module (`cross_attention_1/2/3`): one pyramid level, all branches."""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from qcs_jax.models import csa
from qcs_jax.models.backbone import stats_dtype
from qcs_jax.models.vit import LayerNorm, Mlp, dense

Dtype = Any
KINDS = {'dcs': 2, 'sdpa': 2, 'qcs': 4}  # attention kind -> branches


class CrossAttention(nn.Module):
  """Refines the tokens of one level of every branch with CSA.

  x_b = LN1(x_b); (QK_b, V_b) = proj(x_b); x_b = x_b + m_b[..., None] * V_b
  (SDPA: x_b = x_b + attn_b @ V_other); x_b = LN2(x_b); x_b = x_b + mlp(x_b).
  The attention (B, nb, N) -- (B, 2, N, N) for SDPA -- is sown as
  ('intermediates', 'attention').

  Attributes:
    kind: 'dcs' (2 branches), 'sdpa' (2 branches) or 'qcs' (4 branches).
    variant: QCS variant 'sd' | 's' | 'd' (ignored otherwise).
    minmax: 'global' | 'sample' (see csa.py).
    mlp_ratio: MLP hidden width / D.
    dtype: compute dtype of the Dense layers (None: follow inputs/params);
      norms and CSA run in >= float32.
  """
  kind: str = 'qcs'
  variant: str = 'sd'
  minmax: str = 'global'
  mlp_ratio: float = 4.0
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, nb, N, D) tokens of one level -> refined (B, nb, N, D)."""
    if self.kind not in KINDS:
      raise ValueError(f'CrossAttention kind must be one of {tuple(KINDS)}, got {self.kind!r}')
    nb, d = KINDS[self.kind], x.shape[-1]
    if x.ndim != 4 or x.shape[1] != nb:
      raise ValueError(f'CrossAttention({self.kind}) expects (B, {nb}, N, D), got {x.shape}')
    h = LayerNorm(1e-5, self.dtype, name='norm1')(x)
    qkv = dense(2 * d, d, True, self.dtype, 'proj')(h)
    qk = qkv[..., :d].astype(stats_dtype(qkv.dtype))
    v = qkv[..., d:]
    branches = [qk[:, i] for i in range(nb)]
    if self.kind == 'qcs':
      theta = self.param('theta', nn.initializers.zeros, (), jnp.float32)
      m = jnp.stack(csa.qcs_attention(*branches, theta, self.variant, self.minmax), 1)
      h = h + m[..., None] * v
    elif self.kind == 'dcs':
      m = jnp.stack(csa.dcs_attention(*branches, minmax=self.minmax), 1)
      h = h + m[..., None] * v
    else:
      attn_a, attn_p = csa.sdpa_attention(*branches)
      m = jnp.stack([attn_a, attn_p], 1)  # (B, 2, N, N)
      other = v[:, ::-1]  # each branch attends to the OTHER branch's values
      h = h + jnp.einsum('bgij,bgjc->bgic', m, other.astype(m.dtype))
    self.sow('intermediates', 'attention', m)
    h = LayerNorm(1e-5, self.dtype, name='norm2')(h)
    return h + Mlp(int(d * self.mlp_ratio), 0.0, True, self.dtype, name='mlp')(h)
