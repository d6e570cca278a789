"""Per-head Gram matrices of BTNH arrays: the one pass over Q (and K) every grouping makes.

The greedy grouping reads its column distances from `Q_b^T Q_b`, the lowrank
factorisation needs `Q_b^T Q_b` and `K^T K`: one implementation for both. (Pallas
kernels that read the BTNH rows in place, for these Grams and for the `Q_rep`/`K_fused`
projections, were measured on an H100 and were not faster than these XLA einsums:
docs/KERNEL_NOTES.md, "Preparation kernels".)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distrattention_jax import lsh


def head_grams(x: jax.Array, block_q: int, valid: jax.Array | None = None) -> jax.Array:
  """float32 `[B, H, nb, d, d]`: `X_b^T X_b` per head over each block of `block_q` rows.

  x: `[B, T, H, d]`, taken under stop_gradient; rows where `valid [B, T]` is False
  (padding) are left out; the last block may be short. bf16/f16 products are exact in
  float32 (tensor cores); other dtypes are taken in float32.
  """
  x = jax.lax.stop_gradient(x)
  if x.dtype not in (jnp.bfloat16, jnp.float16):
    x = x.astype(jnp.float32)
  blocks = lsh.query_blocks(x, block_q, valid)                  # [B, nb, rows, H, d]
  return jnp.einsum("bnrhc,bnrhe->bhnce", blocks, blocks, precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)
