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

from distrattention_jax import devices
from distrattention_jax import lsh

# Batch rows up to which a per-row einsum is unrolled (`einsum_per_batch_row`).
MAX_UNROLLED_BATCH = 16


def einsum_per_batch_row(spec: str, x: jax.Array, w: jax.Array, einsum=jnp.einsum, *,
                         per_batch_row: bool = True, **kwargs):
  """`einsum(spec, x, w)` for specs whose operands and output all lead with batch `b`,
  computed as one einsum per batch row (stacked) when `per_batch_row` and
  `1 < B <= MAX_UNROLLED_BATCH`.

  Why: on the BTNH layout these contractions carry two batch dimensions (the batch row
  and the head). XLA's GPU GEMM fusion takes one; with two it transposed Q and K in
  HBM first (B=4, H=16, N=16384, d=128 on an H100, 2026-12-06: 0.37 ms per transpose;
  the lowrank pre-pass 1.56 ms, 0.79 ms with one einsum per row). Per row the head is the
  only batch dimension. `w` may have batch size 1 (shared by every row).

  Callers pass `per_batch_row=True` only on the GPU kernel path: split rows of a batch
  dimension that GSPMD shards over devices would move data between them, where the
  single einsum partitions without collectives (tests/sharding_plain_jit_check.py).
  """
  ins, out = spec.split("->")
  x_spec, w_spec = ins.split(",")
  if not x_spec[0] == w_spec[0] == out[0] == "b":
    raise ValueError(f"spec must lead with the batch label b everywhere, got {spec!r}")
  batch = x.shape[0]
  if not (per_batch_row and 1 < batch <= MAX_UNROLLED_BATCH):
    return einsum(spec, x, w, **kwargs)
  row_spec = f"{x_spec[1:]},{w_spec[1:]}->{out[1:]}"
  # jnp.split (not x[i]): its transpose is one concatenate, where B slices would
  # transpose to B full-size pads summed.
  xs = [x_i[0] for x_i in jnp.split(x, batch)]
  ws = [w[0]] * batch if w.shape[0] == 1 else [w_i[0] for w_i in jnp.split(w, batch)]
  return jnp.stack([einsum(row_spec, x_i, w_i, **kwargs) for x_i, w_i in zip(xs, ws)])


def head_grams(x: jax.Array, block_q: int, valid: jax.Array | None = None, *,
               per_batch_row: bool = False, kernel: bool = False) -> jax.Array:
  """float32 `[B, H, nb, d, d]`: `X_b^T X_b` per head over each block of `block_q` rows.

  x: `[B, T, H, d]`, taken under stop_gradient; rows where `valid [B, T]` is False
  (padding) are left out; the last block may be short. bf16/f16 products are exact in
  float32 (tensor cores); other dtypes are taken in float32. `per_batch_row`: see
  `einsum_per_batch_row` (True on the GPU kernel path). `kernel`: on a Hopper GPU, the
  Mosaic GPU Gram kernel (`pallas_kernels.mosaic_gpu.grams`) takes the whole tiles of rows it
  supports (bf16/f16, d in {64, 128}), the einsum the rest: the same sums in another
  order.
  """
  return head_grams_multi([(x, block_q, valid)], per_batch_row=per_batch_row,
                          kernel=kernel)[0]


def head_grams_multi(items, *, per_batch_row: bool = False, kernel: bool = False):
  """`head_grams` of several `(x, block_q, valid)` (e.g. the queries and the keys): a
  list of float32 `[B, H, nb, d, d]`. With `kernel`, the arrays the Mosaic GPU kernel
  takes share one launch (`grams.gram_blocks_multi`)."""
  items = [(_gram_input(x), block_q, valid) for x, block_q, valid in items]
  out = [None] * len(items)
  if kernel and devices.is_hopper():
    from pallas_kernels.mosaic_gpu import grams as mosaic_grams  # pylint: disable=import-outside-toplevel
    plans = {i: _kernel_rows(x, block_q, mosaic_grams) for i, (x, block_q, _) in
             enumerate(items)}
    plans = {i: p for i, p in plans.items() if p is not None}
    if plans:  # one launch, for the arrays of the first one's width and dtype
      first = items[next(iter(plans))][0]
      plans = {i: p for i, p in plans.items() if items[i][0].shape[3] == first.shape[3]
               and items[i][0].dtype == first.dtype}
      xs = [_zero_padding(items[i][0], items[i][2]) for i in plans]
      grams = mosaic_grams.gram_blocks_multi(
          tuple(xs), block_rows=tuple(p[0] for p in plans.values()),
          num_blocks=tuple(p[1] for p in plans.values()))
      for (i, (block_rows, num_blocks)), x, gram in zip(plans.items(), xs, grams):
        out[i] = _add_rows_after(gram, x, items[i][1], block_rows * num_blocks)
  for i, (x, block_q, valid) in enumerate(items):
    if out[i] is None:
      blocks = lsh.query_blocks(x, block_q, valid)              # [B, nb, rows, H, d]
      out[i] = einsum_per_batch_row("bnrhc,bnrhe->bhnce", blocks, blocks,
                                    per_batch_row=per_batch_row,
                                    precision=jax.lax.Precision.HIGHEST,
                                    preferred_element_type=jnp.float32)
  return out


def stacked_head_grams(items, pool=None):
  """`head_grams_multi(items, kernel=True)` as one float32 array `[sum_i B_i H_i nb_i, d, d]`
  (the first item's Grams first, each item's in `[B, H, nb]` order), written so by one
  launch of the Mosaic GPU Gram kernel; None where that kernel does not take every row of
  every item (not a Hopper GPU, a width or dtype it does not take, rows past whole
  blocks): the caller then uses `head_grams_multi`. The lowrank program reads its two
  Grams from this array by index, with no concatenation between the two kernels.
  `pool`: per item, consecutive heads whose Grams are summed into one (the query heads of
  a kv head; `grams.gram_blocks_multi`), default 1 each."""
  if not devices.is_hopper():
    return None
  from pallas_kernels.mosaic_gpu import grams as mosaic_grams  # pylint: disable=import-outside-toplevel
  items = [(_gram_input(x), block_q, valid) for x, block_q, valid in items]
  plans = [_kernel_rows(x, block_q, mosaic_grams) for x, block_q, _ in items]
  first = items[0][0]
  if any(p is None or p[0] * p[1] != x.shape[1] or x.shape[3] != first.shape[3]
         or x.dtype != first.dtype for p, (x, _, _) in zip(plans, items)):
    return None
  return mosaic_grams.gram_blocks_multi(
      tuple(_zero_padding(x, valid) for x, _, valid in items),
      block_rows=tuple(p[0] for p in plans), num_blocks=tuple(p[1] for p in plans),
      stacked=True, pool=None if pool is None else tuple(pool))


def _gram_input(x):
  x = jax.lax.stop_gradient(x)
  return x if x.dtype in (jnp.bfloat16, jnp.float16) else x.astype(jnp.float32)


def _zero_padding(x, valid):
  return x if valid is None else jnp.where(valid[:, :, None, None], x, 0)


def _kernel_rows(x, block_q, mosaic_grams):
  """(block_rows, num_blocks) of the rows the Mosaic kernel takes: whole tiles of the one
  block (block_q >= T), or the whole blocks; None where it takes none."""
  t = x.shape[1]
  tile = mosaic_grams.TILES.tile_rows
  one_block = block_q >= t
  block_rows = (t // tile) * tile if one_block else block_q
  num_blocks = 1 if one_block else t // block_q
  if block_rows == 0 or mosaic_grams.supports(x.shape, x.dtype, block_rows, num_blocks):
    return None
  return block_rows, num_blocks


def _add_rows_after(grams, x, block_q, done):
  """The Grams of rows `done..T` (a short last block, or the one block's tail) by the
  einsum, added to the kernel's."""
  t = x.shape[1]
  if done >= t:
    return grams
  tail = x[:, done:]
  tail_gram = einsum_per_batch_row("brhc,brhe->bhce", tail, tail,
                                   precision=jax.lax.Precision.HIGHEST,
                                   preferred_element_type=jnp.float32)[:, :, None]
  if block_q >= t:
    return grams + tail_gram
  return jnp.concatenate([grams, tail_gram], axis=2)
