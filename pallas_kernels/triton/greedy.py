"""Greedy grouping of head-dim columns by exact distance: one Pallas program per block.

The same algorithm as the XLA loop of the library's greedy grouping (`greedy_permutations`
in `distrattention_jax/grouping.py`): take the remaining column of largest norm, add its
`G - 1` nearest remaining columns, repeat `d / G` times. In XLA every one of those
sequential steps is a handful of tiny launches over all blocks, which cost 17-71% of the
attention forward on an H100 at d=128 (README, "Cost of the grouping"; 17% for one
grouping per sequence, 71% for 16-row blocks). Here one program per block runs the whole loop: a single warp
(every reduction is a warp shuffle, no barrier) holding the block's squared column
norms, reading one row of the Gram matrix per step. The Gram matrices come from one
batched XLA matmul (on tensor cores for bf16/f16 inputs: the products are exact in
float32). Measured on an H100 (README): forming the Gram matrix inside the kernel, one
program per block, was 2-4x slower for blocks of 16-64 rows.

Ties are broken towards the lower column index, exactly as `jnp.argmax` and
`lax.top_k` do in the XLA version, so both give the same permutation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _greedy_kernel(norms_ref, gram_ref, perm_ref, *, group_size: int, num_cols: int):
  """One block: squared norms `[w]` and Gram matrix `[w, w]` (zero-padded) -> `perm [w]`."""
  width = norms_ref.shape[-1]
  cols = jax.lax.broadcasted_iota(jnp.int32, (width,), 0)
  norms = norms_ref[...]

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
    # Squared distances from the seed: |c|^2 + |s|^2 - 2 <c, s>, one Gram row read.
    seed_norm = jnp.sum(jnp.where(cols == seed, norms, 0.0))
    row = norms + seed_norm - 2.0 * gram_ref[pl.ds(seed, 1), :][0]
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
def greedy_groups(gram: jax.Array, group_size: int, *, interpret: bool = False) -> jax.Array:
  """Greedy groups of every block from its Gram matrix.

  Args:
    gram: float32 `[num_blocks, d, d]`, the Gram matrix of each block's `d` columns.
    group_size: G, dividing d.
    interpret: run in the Pallas interpreter (CPU tests).

  Returns:
    int32 `[num_blocks, d]`: a permutation per block; consecutive runs of `group_size`
    entries are the groups, each seed first, then its members nearest first.
  """
  num_blocks, d, _ = gram.shape
  width = max(16, 1 << (d - 1).bit_length())  # Triton blocks are powers of two
  gram = jnp.pad(gram.astype(jnp.float32), ((0, 0), (0, width - d), (0, width - d)))
  norms = jnp.diagonal(gram, axis1=-2, axis2=-1)
  perm = pl.pallas_call(
      functools.partial(_greedy_kernel, group_size=group_size, num_cols=d),
      grid=(num_blocks,),
      in_specs=[pl.BlockSpec((None, width), lambda i: (i, 0)),
                pl.BlockSpec((None, width, width), lambda i: (i, 0, 0))],
      out_specs=pl.BlockSpec((None, width), lambda i: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((num_blocks, width), jnp.int32),
      compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
      interpret=interpret,
      name="distr_greedy_grouping",
  )(norms, gram)
  return perm[:, :d]
