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


ROW_CHUNK = None  # rows per partial Gram (None: one product per block); see head_grams


def head_grams(x: jax.Array, block_q: int, valid: jax.Array | None = None, *,
               row_chunk: int | None = ROW_CHUNK) -> jax.Array:
  """float32 `[B, H, nb, d, d]`: `X_b^T X_b` per head over each block of `block_q` rows.

  x: `[B, T, H, d]`, taken under stop_gradient; rows where `valid [B, T]` is False
  (padding) are left out; the last block may be short. bf16/f16 products are exact in
  float32 (tensor cores); other dtypes are taken in float32. `row_chunk`: sum partial
  Grams over chunks of this many rows (more, shorter products: one long sequence's few
  `d x d` outputs otherwise leave most of a GPU idle); None: one product per block.
  """
  x = jax.lax.stop_gradient(x)
  if x.dtype not in (jnp.bfloat16, jnp.float16):
    x = x.astype(jnp.float32)
  blocks = lsh.query_blocks(x, block_q, valid)                  # [B, nb, rows, H, d]
  rows = blocks.shape[2]
  hi = jax.lax.Precision.HIGHEST
  if row_chunk is None or rows <= row_chunk:
    return jnp.einsum("bnrhc,bnrhe->bhnce", blocks, blocks, precision=hi,
                      preferred_element_type=jnp.float32)
  chunks = -(-rows // row_chunk)
  blocks = jnp.pad(blocks, ((0, 0), (0, 0), (0, chunks * row_chunk - rows), (0, 0), (0, 0)))
  blocks = blocks.reshape(blocks.shape[:2] + (chunks, row_chunk) + blocks.shape[3:])
  partial = jnp.einsum("bnkrhc,bnkrhe->bhnkce", blocks, blocks, precision=hi,
                       preferred_element_type=jnp.float32)
  return partial.sum(3)
