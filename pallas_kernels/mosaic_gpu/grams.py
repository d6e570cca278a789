"""Per-head Gram matrices `X_b^T X_b` of a BTNH array on Hopper (Pallas Mosaic GPU).

The lowrank factorisation reads every query and key row once, for `Q_b^T Q_b` and
`K^T K`; at B=1, H=16, N=16384, d=128 those two reads are 128 MiB, and XLA's batched
GEMM on the BTNH layout ran them at ~2.1 TB/s plus a split-K reduction kernel (H100,
2026-12-06: 0.064 + 0.010 ms, docs/KERNEL_NOTES.md). This kernel streams the rows at
HBM speed instead:

* one CTA per (batch row, head, row block, split): `splits` CTAs share a row block so
  that even B * H = 16 Grams fill the GPU's SMs (one wave);
* a TMA producer warpgroup streams `[tile_rows, d]` tiles of the head's rows (strided
  BTNH rows, no transpose in HBM) through `stages` shared-memory slots, last tile first
  (`GramTiles.reverse`: the rows left in the L2 are where the K_fused projection starts);
* one consumer warpgroup (or two, each half the Gram's rows) accumulates `X_t^T X_t`
  with wgmma (the tile read transposed as the left operand: bf16/f16 products, exact in
  the float32 accumulator);
* the CTA's partial `[d, d]` is added into the zero-initialised output by a TMA
  reduce-add, so the splits need no reduction kernel.

Rows must come in whole tiles (`tile_rows`); the caller adds the tail rows (and zeroes
padding rows) itself (distrattention_jax/prep.py). Imports nothing from distrattention_jax.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels.mosaic_gpu import common
from pallas_kernels.mosaic_gpu.common import i32
from pallas_kernels.mosaic_gpu.tiles import SM_COUNT, SMEM_BYTES

HEAD_DIMS = (64, 128)  # wgmma M = d must be a multiple of 64; d=256's [d, d] float32
                       # accumulator would be 512 registers a thread


@dataclasses.dataclass(frozen=True)
class GramTiles:
  """tile_rows: rows per streamed tile (the wgmma contraction); stages: slots in flight;
  consumers: warpgroups sharing each tile's product, each `d / consumers` rows of the
  Gram (1, or 2 at d=128); reverse: each CTA streams its rows last tile first, so the
  rows left in the L2 at the end are the start of each CTA's range, where the K_fused
  projection's CTAs begin reading (the sum is the same up to rounding order). Inside
  the lowrank call at B=1, H=16, N=16384, d=128 (H100, 2026-12-06, run s11r1) that and
  a one-wave projection grid took `K_fused` from 0.0294 to 0.0260 ms."""
  tile_rows: int = 128
  stages: int = 4
  consumers: int = 1
  reverse: bool = True
  # Two arrays in one launch, each CTA taking a row range of the first array and then
  # one of the second (`gram_blocks_multi`; where both arrays have as many row blocks of
  # as many tiles, one consumer): the last rows read, which the L2 keeps, are then all
  # the second array's (the keys, which the K_fused projection reads next) without a
  # second launch's ramp-up and tail (`launch_per_array`). The shipped tiling (`TILES`):
  # inside the lowrank call at B=1, H=16, N=16384, d=128 (H100, 2026-12-07, run s13r1)
  # K_fused 0.0273 -> 0.0242 ms, the Grams 0.0536 -> 0.0551 (twice the reduce-adds), the
  # pre-pass 0.1612 -> 0.1602.
  keys_last: bool = False
  # One launch per array (`gram_blocks_multi`), each with its own one-wave split count,
  # instead of the arrays sharing one launch: the last array's rows (the keys, which the
  # K_fused projection reads next) are then all that is left in the L2. Measured inside
  # the lowrank call (H100, 2026-12-07, run s12r2): K_fused 0.0274 -> 0.0237 ms, but the
  # Grams 0.0535 -> 0.0590 (each launch's ramp-up and tail): 0.0023 ms slower in all.
  launch_per_array: bool = False
  # Each CTA's partial Gram reduce-added as this many row slices, the CTA of split s
  # starting at slice s (mod the count), so that the splits of a Gram, which finish
  # together, add into different rows at a time rather than all into the same lines.
  # One consumer only. GPU-tested; in the lowrank call at issue 14's shape (H100,
  # 2026-12-07, run s13r2) the pre-pass took 0.1591 ms with 4 slices, 0.1599 with 8 or 1:
  # within the runs' noise, so not the default.
  reduce_slices: int = 1

  def __post_init__(self):
    if self.consumers not in (1, 2):
      raise ValueError(f"consumers must be 1 or 2, got {self.consumers}")
    if self.tile_rows % 64 or not 64 <= self.tile_rows <= 256:
      raise ValueError(f"tile_rows must be 64, 128, 192 or 256, got {self.tile_rows}")
    if not 1 <= self.stages <= 8:
      raise ValueError(f"stages must be in [1, 8], got {self.stages}")
    if self.keys_last and (self.launch_per_array or self.consumers != 1):
      raise ValueError("keys_last takes one launch (launch_per_array=False) and one "
                       "consumer")
    if self.reduce_slices not in (1, 2, 4, 8) or (self.reduce_slices > 1
                                                   and self.consumers != 1):
      raise ValueError(f"reduce_slices must be 1, 2, 4 or 8 (with one consumer), got "
                       f"{self.reduce_slices} with consumers={self.consumers}")

  def smem_bytes(self, d: int, itemsize: int) -> int:
    return self.stages * self.tile_rows * d * itemsize + d * d * 4


# The tiling callers get (tiles=None); a module attribute so a benchmark can swap it.
# keys_last where the two arrays allow it (the lowrank Grams of Q and K at equal lengths),
# else the usual one launch. Four slots: three measured no faster in the lowrank call at
# issue 14's shape (pre-pass 4.995% of cuDNN's forward against 4.985%, medians of 32 and
# 50 rounds; H100, 2026-12-07, runs s15r1-s15r4).
TILES = GramTiles(keys_last=True)


def supports(x_shape, dtype, block_rows: int, num_blocks: int | None = None,
             tiles: GramTiles | None = None) -> str | None:
  """None if `gram_blocks` takes `x [B, T, H, d]` with `num_blocks` blocks of
  `block_rows` rows, else the reason."""
  tiles = TILES if tiles is None else tiles
  if len(x_shape) != 4:
    return f"x must be [B, T, H, d], got shape {tuple(x_shape)}"
  _, t, _, d = x_shape
  num_blocks = t // max(block_rows, 1) if num_blocks is None else num_blocks
  if d not in HEAD_DIMS:
    return f"head dim d={d} not in {HEAD_DIMS}"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(dtype).name} is not bfloat16 or float16"
  if t % 8:
    return f"T={t} rows, not a multiple of 8 (the row tiles' TMA tiling)"
  if block_rows < tiles.tile_rows or block_rows % tiles.tile_rows:
    return f"block_rows={block_rows} must be a positive multiple of tile_rows={tiles.tile_rows}"
  if num_blocks < 1 or num_blocks * block_rows > t:
    return f"{num_blocks} blocks of {block_rows} rows do not fit in T={t} rows"
  if tiles.consumers > 1 and d // tiles.consumers < 64:
    return f"{tiles.consumers} consumers at d={d}: each needs 64 or more Gram rows"
  if tiles.smem_bytes(d, jnp.dtype(dtype).itemsize) > SMEM_BYTES:
    return f"{tiles} needs more than {SMEM_BYTES} bytes of shared memory at d={d}"
  return None


class _ArrayPlan(NamedTuple):
  """One array's share of `gram_blocks_multi`'s grid and output."""
  batch: int
  heads: int
  per_head: int          # CTAs per (batch row, head): blocks x splits
  tiles_per_cta: int
  first_cta: int
  first_gram: int        # its first Gram in the stacked output
  heads_per_gram: int    # `pool`: consecutive heads summed into one Gram
  splits: int            # CTAs per row block


def pick_splits(ctas: int, tiles_per_block: int, sm_count: int = SM_COUNT) -> int:
  """CTAs per row block: the largest power of two dividing `tiles_per_block` with
  `ctas * splits <= sm_count` (one wave; at least 1)."""
  splits = 1
  while (tiles_per_block % (2 * splits) == 0 and ctas * 2 * splits <= sm_count):
    splits *= 2
  return splits


@functools.partial(jax.jit, static_argnames=("block_rows", "num_blocks", "splits", "tiles"))
def gram_blocks(x, *, block_rows: int, num_blocks: int | None = None,
                splits: int | None = None, tiles: GramTiles | None = None):
  """float32 `[B, H, nb, d, d]`: `X_b^T X_b` per head and block of rows.

  x: `[B, T, H, d]` bf16/f16 (`supports`); block b is rows `[b * block_rows, (b + 1) *
  block_rows)`, for b < nb = num_blocks (default T // block_rows); rows past the last
  block are not read. splits: CTAs per block (default `pick_splits`), a divisor of the
  block's tile count.
  """
  num_blocks = x.shape[1] // block_rows if num_blocks is None else num_blocks
  return gram_blocks_multi((x,), block_rows=(block_rows,), num_blocks=(num_blocks,),
                           splits=splits, tiles=tiles)[0]


@functools.partial(jax.jit,
                   static_argnames=("block_rows", "num_blocks", "splits", "tiles", "stacked",
                                    "pool"))
def gram_blocks_multi(xs, *, block_rows: tuple[int, ...], num_blocks: tuple[int, ...],
                      splits: int | None = None, tiles: GramTiles | None = None,
                      stacked: bool = False, pool: tuple[int, ...] | None = None):
  """`gram_blocks` of several arrays (e.g. Q and K) in one launch: a tuple of float32
  `[B_i, H_i, nb_i, d, d]`. Every x_i shares d and the dtype; CTAs [0, n_0) take x_0,
  the next n_1 x_1, and so on, so the arrays share one wave of the GPU instead of each
  paying its own ramp-up and tail. splits: CTAs per block, for every array (default:
  the largest power of two dividing every block's tile count with one wave).
  stacked: one float32 array `[sum_i B_i H_i nb_i, d, d]` instead, the Grams of x_0
  first (each array's in `[B_i, H_i, nb_i]` order): the lowrank program reads its two
  Grams from one array by index (`lowrank_factor.factor_stacked_grams_kernel`).
  pool: per array, how many consecutive heads share one Gram (their Grams summed, by the
  same reduce-add: the query heads of a kv head for one factorisation per kv head);
  array i then has `H_i / pool_i` heads of Grams. Default 1 each.
  """
  xs = tuple(xs)
  tiles = TILES if tiles is None else tiles
  pool = (1,) * len(xs) if pool is None else tuple(pool)
  if not (len(xs) == len(block_rows) == len(num_blocks) == len(pool)) or not xs:
    raise ValueError("xs, block_rows, num_blocks and pool must have one entry per array")
  for x, p in zip(xs, pool):
    if not isinstance(p, int) or p < 1 or x.shape[2] % p:
      raise ValueError(f"pool must divide the heads of its array, got {p} for {x.shape}")
  for x, rows, nb in zip(xs, block_rows, num_blocks):
    reason = supports(x.shape, x.dtype, rows, nb, tiles)
    if reason:
      raise ValueError(f"gram_blocks: {reason}")
  d, dtype = xs[0].shape[3], xs[0].dtype
  if any(x.shape[3] != d or x.dtype != dtype for x in xs):
    raise ValueError(f"the arrays must share d and dtype, got {[(x.shape, x.dtype) for x in xs]}")
  tile_rows = tiles.tile_rows
  tiles_per_block = [rows // tile_rows for rows in block_rows]
  row_blocks = [x.shape[0] * x.shape[2] * nb for x, nb in zip(xs, num_blocks)]
  # keys_last: two arrays of as many row blocks of as many tiles share every CTA, the
  # first array's range then the second's (elsewhere the usual single launch).
  chained = (tiles.keys_last and len(xs) == 2 and row_blocks[0] == row_blocks[1]
             and tiles_per_block[0] == tiles_per_block[1])
  # Launch groups: every array in one launch, or (launch_per_array) one launch each.
  groups = ([[i] for i in range(len(xs))] if tiles.launch_per_array
            else [list(range(len(xs)))])
  group_splits = []
  for group in groups:
    group_split = splits
    if group_split is None:
      base = row_blocks[0] if chained else sum(row_blocks[i] for i in group)
      group_split = pick_splits(base, math.gcd(*(tiles_per_block[i] for i in group)))
    if group_split < 1 or any(tiles_per_block[i] % group_split for i in group):
      raise ValueError(f"splits must divide the tiles of a block ({tiles_per_block}), "
                       f"got {group_split}")
    group_splits.append(group_split)
  plans, first_gram = [None] * len(xs), 0
  for group, group_split in zip(groups, group_splits):
    first_cta = 0
    for i in group:
      x, nb, n, p = xs[i], num_blocks[i], tiles_per_block[i], pool[i]
      plans[i] = _ArrayPlan(batch=x.shape[0], heads=x.shape[2], per_head=nb * group_split,
                            tiles_per_cta=n // group_split, first_cta=first_cta,
                            first_gram=first_gram, heads_per_gram=p, splits=group_split)
      if not chained:  # chained: both arrays on CTAs [0, n)
        first_cta += x.shape[0] * x.shape[2] * nb * group_split
      first_gram += x.shape[0] * x.shape[2] // p * nb
  consumers = tiles.consumers
  dm = d // consumers

  def cta_coords(plan, local):
    """(chunk, batch row, head, flat (batch row, Gram head), Gram head, row block) of
    CTA `local` of an array."""
    chunk = lax.rem(local, i32(plan.per_head))
    bh = lax.div(local, i32(plan.per_head))
    bi, hi = lax.div(bh, i32(plan.heads)), lax.rem(bh, i32(plan.heads))
    bg = lax.div(bh, i32(plan.heads_per_gram))  # (batch row, Gram head), flat
    gi = lax.div(hi, i32(plan.heads_per_gram))  # the Gram head
    return chunk, bi, hi, bg, gi, lax.div(chunk, i32(plan.splits))

  def gram_target(out_ref, plan, bi, gi, bg, block):
    """The output Gram a CTA's partial is reduce-added into."""
    return (out_ref.at[plan.first_gram + bg * (plan.per_head // plan.splits) + block]
            if stacked else out_ref.at[bi, gi, block])

  def reduce_add(source, target, split):
    """TMA reduce-add of a CTA's partial `[d, d]` into its output Gram, as
    `reduce_slices` row slices starting at slice `split` (mod the count)."""
    count = tiles.reduce_slices
    if count == 1:
      plgpu.copy_smem_to_gmem(source, target, reduction_op="add")
      return
    rows = d // count
    for i in range(count):
      at = pl.ds(lax.rem(split + i, i32(count)) * rows, rows)
      plgpu.copy_smem_to_gmem(source.at[at], target.at[at], reduction_op="add")

  def gram_step(stages, x_smems, loaded, free, rows=None):
    """fori_loop body of a consumer: acc += X_t^T X_t for tile j (in slot j % stages),
    `rows` of the Gram (None: all), then the slot is freed."""
    def step(j, acc):
      slot = lax.rem(j, i32(stages))
      plgpu.barrier_wait(loaded.at[slot])

      def gram(acc_ref):  # acc += X_t^T X_t  ([dm, d], contracted over the tile's rows)
        lhs = x_smems.at[slot].T if rows is None else x_smems.at[slot, :, rows].T
        plgpu.wgmma(acc_ref, lhs, x_smems.at[slot])
      acc = pl.run_state(gram)(plgpu.ACC.init(acc))  # reading it waits for the wgmma
      plgpu.barrier_arrive(free.at[slot])
      return acc
    return step

  def one_array(x_ref, out_ref, plan, stages, local, x_smems, gram_smem, loaded, free):
    tiles_per_cta = plan.tiles_per_cta
    chunk, bi, hi, bg, gi, block = cta_coords(plan, local)
    first = chunk * tiles_per_cta  # this CTA's first tile (chunks are consecutive)
    wg = lax.axis_index("wg")

    def consume(c):  # rows [c * dm, (c + 1) * dm) of the Gram
      rows = pl.ds(c * dm, dm)
      step = gram_step(stages, x_smems, loaded, free, None if consumers == 1 else rows)
      acc = lax.fori_loop(0, tiles_per_cta, step, common.zeros_acc((dm, d)))
      source = gram_smem if consumers == 1 else gram_smem.at[rows]
      source[...] = acc
      plgpu.commit_smem()
      # The splits of a block meet in HBM: TMA reduce-add into the zeroed output.
      target = gram_target(out_ref, plan, bi, gi, bg, block)
      if consumers == 1:
        reduce_add(source, target, lax.rem(chunk, i32(plan.splits)))
      else:
        plgpu.copy_smem_to_gmem(source, target.at[rows], reduction_op="add")
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    for c in range(consumers):
      pl.when(wg == c)(functools.partial(consume, c))

    @pl.when(wg == consumers)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      if tiles.reverse:  # tile i of first .. first + n - 1 reads tile 2 first + n - 1 - i
        row_tile = lambda i: 2 * first + tiles_per_cta - 1 - i  # noqa: E731
      else:
        row_tile = lambda i: i  # noqa: E731
      common.stream_tiles(lambda i: (x_ref.at[bi, pl.ds(row_tile(i) * tile_rows, tile_rows),
                                               hi],),
                          (x_smems,), (loaded,), (free,), num_tiles=tiles_per_cta,
                          stages=min(stages, tiles_per_cta), first=first)

  def chained_arrays(x_refs, out_refs, stages, x_smems, gram_smem, loaded, free):
    """keys_last: this CTA's row range of x_0, then its range of x_1, as one stream of
    2n tiles through the slots (tile j in slot j % stages); each Gram reduce-added as
    soon as its n tiles are in."""
    cta = lax.axis_index("cta")
    n = plans[0].tiles_per_cta
    views = []  # per array: (batch row, head, first tile, target Gram)
    for x_ref, out_ref, plan in zip(x_refs, out_refs, plans):
      chunk, bi, hi, bg, gi, block = cta_coords(plan, cta)
      views.append((x_ref, bi, hi, chunk * n, gram_target(out_ref, plan, bi, gi, bg, block)))
    split = lax.rem(chunk, i32(plans[0].splits))  # per_head % splits == 0: both arrays agree
    wg = lax.axis_index("wg")

    @pl.when(wg == 0)
    def _consumer():
      step = gram_step(stages, x_smems, loaded, free)
      for a, (_, _, _, _, target) in enumerate(views):
        acc = lax.fori_loop(a * n, (a + 1) * n, step, common.zeros_acc((d, d)))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous Gram's store read
        gram_smem[...] = acc
        plgpu.commit_smem()
        reduce_add(gram_smem, target, split)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    @pl.when(wg == 1)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def load(i, slot):  # tile i of the 2n: array i // n, its tile i % n of the range
        i = i32(i) if isinstance(i, int) else i
        for a, (x_ref, bi, hi, first, _) in enumerate(views):
          t = i - a * n
          row_tile = first + n - 1 - t if tiles.reverse else first + t

          @pl.when((i >= a * n) & (i < (a + 1) * n))
          def _(x_ref=x_ref, bi=bi, hi=hi, row_tile=row_tile):
            plgpu.copy_gmem_to_smem(x_ref.at[bi, pl.ds(row_tile * tile_rows, tile_rows), hi],
                                    x_smems.at[slot], loaded.at[slot])

      common.stream_tiles(None, (x_smems,), loaded, free, num_tiles=2 * n,
                          stages=min(stages, 2 * n), load=load)

  def kernel(refs, scoped, group, stages):
    x_refs, out_refs = refs[:len(group)], refs[len(group):]
    cta = lax.axis_index("cta")
    if stacked:
      out_refs = out_refs * len(group)
    if chained:
      chained_arrays(x_refs, out_refs, stages, *scoped)
      return
    for x_ref, out_ref, i in zip(x_refs, out_refs, group):
      plan = plans[i]
      first = plan.first_cta
      mine = (cta >= first) & (cta < first + plan.batch * plan.heads * plan.per_head)
      pl.when(mine)(functools.partial(one_array, x_ref, out_ref, plan, stages, cta - first,
                                      *scoped))

  if stacked:
    outs = [jax.new_ref(jnp.zeros((first_gram, d, d), jnp.float32))]
  else:
    outs = [jax.new_ref(jnp.zeros((x.shape[0], x.shape[2] // p, nb, d, d), jnp.float32))
            for x, nb, p in zip(xs, num_blocks, pool)]
  for group in groups:
    stages = min(tiles.stages, max(plans[i].tiles_per_cta for i in group) * (1 + chained))

    def distr_gram(*refs, group=group, stages=stages):  # (the name the profiler shows)
      smem = (plgpu.SMEM((stages, tile_rows, d), dtype,
                         transforms=common.smem_transforms(d, dtype)),
              plgpu.SMEM((d, d), jnp.float32))
      pl.run_scoped(lambda *scoped: kernel(refs, scoped, group, stages), *smem,
                    plgpu.Barrier(num_barriers=stages),
                    plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),
                    collective_axes="wg")

    last = plans[group[-1]]
    plgpu.kernel(
        distr_gram,
        out_type=(),
        grid=(last.first_cta + last.batch * last.heads * last.per_head,),
        grid_names=("cta",),
        num_threads=consumers + 1,
        thread_name="wg",
    )(*(xs[i] for i in group), *(outs if stacked else [outs[i] for i in group]))
  if stacked:
    return outs[0][...]
  return tuple(out[...] for out in outs)
