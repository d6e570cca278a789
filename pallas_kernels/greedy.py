"""Greedy grouping of head-dim columns by exact distance: one Pallas program per block.

The same algorithm as `distrattention_jax.grouping.greedy_permutations` (which runs it in
XLA): take the remaining column of largest norm, add its `G - 1` nearest remaining
columns, repeat `d / G` times. In XLA every one of those sequential steps is a handful
of tiny launches over all blocks, which cost 14-24% of the attention forward on an H100
(README, "Accuracy"). Here each program reads its block's rows once, forms the block's
`d x d` Gram matrix on the tensor cores (float32 accumulation; bf16 products are exact),
keeps the distance matrix in registers and runs the whole loop itself: no launch per
step and no `[blocks, d, d]` Gram matrices written to memory.

Ties are broken towards the lower column index, exactly as `jnp.argmax` and
`lax.top_k` do in the XLA version, so both give the same permutation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _greedy_kernel(x_ref, perm_ref, *, group_size: int, num_cols: int, chunk: int,
                   precision):
  """One block: its rows `x_ref [rows, w]` (zero-padded) -> its permutation `perm [w]`."""
  rows, width = x_ref.shape

  def accumulate(i, gram):  # Gram matrix x^T x over the block's rows, chunk by chunk
    x = x_ref[pl.ds(i * chunk, chunk), :]
    return gram + jnp.dot(x.T, x, precision=precision, preferred_element_type=jnp.float32)

  gram = jax.lax.fori_loop(0, rows // chunk, accumulate,
                           jnp.zeros((width, width), jnp.float32))
  rows2 = jax.lax.broadcasted_iota(jnp.int32, (width, width), 0)
  cols2 = jax.lax.broadcasted_iota(jnp.int32, (width, width), 1)
  cols = jax.lax.broadcasted_iota(jnp.int32, (width,), 0)
  norms = jnp.sum(jnp.where(rows2 == cols2, gram, 0.0), axis=0)   # squared column norms
  dist = norms[:, None] + norms[None, :] - 2.0 * gram             # squared distances

  def first_index(hit):
    """Lowest column index where `hit` is True (the tie-break of argmax/top_k)."""
    return jnp.min(jnp.where(hit, cols, width))

  def step(g, carry):
    remaining, perm = carry
    # Seed: the remaining column of largest norm.
    score = jnp.where(remaining, norms, -jnp.inf)
    seed = first_index(remaining & (score == jnp.max(score)))
    remaining = remaining & (cols != seed)
    perm = jnp.where(cols == g * group_size, seed, perm)
    # dist[seed, :] without a dynamic register index: mask the row and reduce.
    row = jnp.sum(jnp.where(rows2 == seed, dist, 0.0), axis=0)
    for j in range(1, group_size):  # the G-1 nearest remaining columns, nearest first
      cand = jnp.where(remaining, row, jnp.inf)
      pick = first_index(remaining & (cand == jnp.min(cand)))
      remaining = remaining & (cols != pick)
      perm = jnp.where(cols == g * group_size + j, pick, perm)
    return remaining, perm

  init = (cols < num_cols, jnp.zeros((width,), jnp.int32))  # padded columns never chosen
  _, perm = jax.lax.fori_loop(0, num_cols // group_size, step, init)
  perm_ref[...] = perm


@functools.partial(jax.jit, static_argnames=("group_size", "interpret"))
def greedy_groups(blocks: jax.Array, group_size: int, *, interpret: bool = False) -> jax.Array:
  """Greedy groups of every block's columns.

  Args:
    blocks: `[batch, num_blocks, rows, heads, d]` query rows per grouping block, padding
      rows zero (`distrattention_jax.lsh.query_blocks`), bf16/f16/f32.
    group_size: G, dividing d.
    interpret: run in the Pallas interpreter (CPU tests).

  Returns:
    int32 `[batch, heads, num_blocks, d]`: a permutation per block; consecutive runs of
    `group_size` entries are the groups, each seed first, then its members nearest first.
  """
  batch, num_blocks, rows, heads, d = blocks.shape
  if blocks.dtype not in (jnp.bfloat16, jnp.float16):
    blocks = blocks.astype(jnp.float32)
  width = max(16, 1 << (d - 1).bit_length())          # Triton blocks are powers of two
  chunk = min(128, max(16, 1 << (rows - 1).bit_length()))
  rows_padded = -(-rows // chunk) * chunk              # zero rows add nothing to a Gram
  blocks = jnp.pad(blocks, ((0, 0), (0, 0), (0, rows_padded - rows), (0, 0), (0, width - d)))
  x = blocks.reshape(batch, num_blocks * rows_padded, heads, width)
  precision = (jax.lax.Precision.HIGHEST if blocks.dtype == jnp.float32
               else jax.lax.Precision.DEFAULT)
  perm = pl.pallas_call(
      functools.partial(_greedy_kernel, group_size=group_size, num_cols=d, chunk=chunk,
                        precision=precision),
      grid=(batch, heads, num_blocks),
      in_specs=[pl.BlockSpec((None, rows_padded, None, width), lambda b, h, n: (b, n, h, 0))],
      out_specs=pl.BlockSpec((None, None, None, width), lambda b, h, n: (b, h, n, 0)),
      out_shape=jax.ShapeDtypeStruct((batch, heads, num_blocks, width), jnp.int32),
      # A 128x128 float32 tile is 128 registers a thread at 4 warps; 256 wide needs 16.
      compiler_params=plgpu.CompilerParams(num_warps=4 if width <= 128 else 16,
                                           num_stages=2),
      interpret=interpret,
      name="distr_greedy_grouping",
  )(x)
  return perm[..., :d]
