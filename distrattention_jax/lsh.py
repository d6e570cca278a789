"""Angular LSH grouping of the head dimension (docs/DESIGN.md section 1, steps 2-3).

For each block of `block_q` query rows, every one of the `d` columns of the block is a
vector of length `block_q`. It is projected on `num_projs` fixed Gaussian directions, the
sign bits form an integer code, the code is mapped to its rank in binary-reflected
Gray-code order (codes one bit apart become neighbours), and a stable argsort of the ranks
orders the columns so that consecutive runs of `group_size` columns form the groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_NUM_PROJS = 30  # sign codes are packed into an int32


def projection_matrix(seed: int, block_q: int, num_projs: int) -> jax.Array:
  """The fixed Gaussian directions `R: float32 [block_q, num_projs]` for a seed."""
  return jax.random.normal(jax.random.key(seed), (block_q, num_projs), jnp.float32)


def sign_codes(projections: jax.Array) -> jax.Array:
  """Packs the signs of `[..., num_projs]` projections into int32 codes (bit i = proj i > 0)."""
  num_projs = projections.shape[-1]
  bits = (projections > 0).astype(jnp.int32)
  weights = jnp.left_shift(jnp.int32(1), jnp.arange(num_projs, dtype=jnp.int32))
  return jnp.sum(bits * weights, axis=-1, dtype=jnp.int32)


def gray_rank(codes: jax.Array, num_bits: int) -> jax.Array:
  """Rank of each code in binary-reflected Gray-code order (the inverse Gray code).

  The Gray code of rank r is `r ^ (r >> 1)`; its inverse is the prefix XOR of the code's
  bits from the top, `c ^ (c >> 1) ^ (c >> 2) ^ ...`.
  """
  rank = codes
  shift = 1
  while shift < num_bits:
    rank = rank ^ jnp.right_shift(rank, shift)
    shift *= 2
  return rank


def query_blocks(query: jax.Array, block_q: int, query_valid: jax.Array | None = None):
  """Splits `query [B, T, H, d]` into zero-padded row blocks `[B, nb, rows, H, d]`.

  `rows = min(block_q, T)`: when one block covers the sequence, the rows past its end
  count as zero and need not exist. Rows where `query_valid [B, T]` is False (padding)
  are zeroed too. The BTNH layout is kept (a reshape, no transpose).
  """
  batch, q_len, heads, d = query.shape
  rows = min(block_q, q_len)
  num_blocks = -(-q_len // block_q)
  if query_valid is not None:
    query = jnp.where(query_valid[:, :, None, None], query, 0)
  query = jnp.pad(query, ((0, 0), (0, num_blocks * rows - q_len), (0, 0), (0, 0)))
  return query.reshape(batch, num_blocks, rows, heads, d)


def lsh_permutations(
    query: jax.Array,
    *,
    block_q: int,
    num_projs: int = 16,
    seed: int = 0,
    query_valid: jax.Array | None = None,
) -> jax.Array:
  """Per-block column permutations by angular LSH.

  Args:
    query: `[batch, q_len, heads, d]`.
    block_q: rows per grouping block; the last block may be short.
    num_projs: number of random projections (bits of the code), 1..30.
    seed: seed of the projection matrix.
    query_valid: optional bool `[batch, q_len]`; False rows (padding) are zeroed first.

  Returns:
    int32 `[batch, heads, num_blocks, d]`: for each block a permutation of `0..d-1`;
    consecutive runs of `group_size` entries are the groups. Computed in float32 under
    `stop_gradient` (the grouping is discrete and carries no gradient).
  """
  query = jax.lax.stop_gradient(query).astype(jnp.float32)
  blocks = query_blocks(query, block_q, query_valid)  # [B, nb, rows, H, d]
  rows = blocks.shape[2]
  directions = projection_matrix(seed, block_q, num_projs)[:rows]  # rows past the end are 0
  projections = jnp.einsum("bnrhd,rp->bhndp", blocks, directions,
                           precision=jax.lax.Precision.HIGHEST)
  ranks = gray_rank(sign_codes(projections), num_projs)  # [B, H, nb, d]
  return jnp.argsort(ranks, axis=-1, stable=True).astype(jnp.int32)
