"""Helpers shared by the Mosaic GPU attention kernels."""

from __future__ import annotations

import math

import jax
import jax.experimental.mosaic.gpu as mgpu
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, vector

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Masked scores: finite, so a tile whose every entry is masked never produces NaN
# (exp2 of (MASKED - row max) underflows to 0 once a real key has been seen).
MASKED = -1e30

WGMMA = plgpu.Layout.WGMMA
WGMMA_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a wgmma tile
WGMMA_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column of a wgmma tile


def smem_transforms(width: int, dtype) -> tuple:
  """Tiling + swizzle for a [rows, width] shared-memory tile used as a wgmma operand.

  The swizzle is the widest of 128/64/32 bytes that divides a row: 128 B for r >= 64
  (bf16/f16), 64 B for r = 32, 32 B for r = 16 (MOSAIC_NOTES.md)."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(width * itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def iota(shape, dim):
  return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=WGMMA)


def row_bcast(x, shape):
  """[rows] -> [rows, cols]."""
  return lax.broadcast_in_dim(x, shape, [0])


def col_bcast(x, shape):
  """[cols] -> [rows, cols]."""
  return lax.broadcast_in_dim(x, shape, [1])


def i32(x):
  return jnp.asarray(x, jnp.int32)


def cdiv(a, b):
  return lax.div(a + (b - 1), i32(b))


def zeros_acc(shape):
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), WGMMA)


def split_map_product(x_smem, map_parts, rows: int, width: int):
  """`X (hi + lo)`, float32 `[rows, width]` in registers: a shared-memory tile `X`
  `[rows, d]` times a map held as its transposed high and low parts in the input dtype
  (`map_parts [2, width, d]`, `project.split_map`), two wgmmas into one accumulator
  (reading it waits for them)."""
  def product(acc_ref):
    plgpu.wgmma(acc_ref, x_smem, map_parts.at[0].T)
    plgpu.wgmma(acc_ref, x_smem, map_parts.at[1].T)
  return pl.run_state(product)(plgpu.ACC.init(zeros_acc((rows, width))))


# OR of one predicate over the 128 threads of the calling warpgroup, on its own named
# barrier (Mosaic GPU's warpgroup barrier id: warpgroup index + 1, 128 threads).
_WARPGROUP_OR_PTX = ("{ .reg .pred p_in, p_out; setp.ne.u32 p_in, $1, 0; "
                     "bar.red.or.pred p_out, $2, 128, p_in; selp.u32 $0, 1, 0, p_out; }")


def any_row_greater(new, old):
  """Warpgroup-uniform bool scalar: new > old in some row ([rows] float32, WGMMA_ROW).

  Each thread ORs its own rows, then one `bar.red.or.pred` ORs the warpgroup's threads.
  Not `jnp.any(new > old)`: that lowers to a cross-warp reduction through the kernel's
  one reduction scratch in shared memory, at the same address for every warpgroup, so
  two consumer warpgroups reducing at once would race."""
  @plgpu.inline_mgpu(arg_types=(WGMMA_ROW, WGMMA_ROW),  # a scalar result has no layout
                     return_type=plgpu.ShapeDtypeStruct((), jnp.bool_, None))
  def warpgroup_any(_, new, old):
    i32 = ir.IntegerType.get_signless(32)
    mine = None  # OR of this thread's rows
    for reg in (new > old).registers.flat:
      for i in range(ir.VectorType(reg.type).shape[0]):
        bit = vector.extract(reg, dynamic_position=[],
                             static_position=ir.DenseI64ArrayAttr.get([i]))
        mine = bit if mine is None else arith.ori(mine, bit)
    barrier = mgpu.utils.warpgroup_barrier_idx(sync=False)
    anyone = mgpu.utils.inline_ptx(_WARPGROUP_OR_PTX, arith.extui(i32, mine), barrier,
                                   result_types=i32, has_side_effects=True,
                                   convergent=True)
    flag = arith.cmpi(arith.CmpIPredicate.ne, anyone, mgpu.c(0, i32))
    return mgpu.FragmentedArray.splat(flag, (), is_signed=False)
  return warpgroup_any(new, old)


def store_to_gmem(ref, value):
  """`ref[...] = value` for a GMEM ref, from registers (no shared memory, no TMA).

  A WGMMA-layout tile writes 4-byte pieces of rows: not whole 32-byte sectors, which
  jax >= 0.12 accepts only as an explicitly unoptimized store (`plgpu.store`); jax 0.11
  has no `plgpu.store` and emits the same element stores for `ref[...] = value`."""
  store = getattr(plgpu, "store", None)
  if store is None:
    ref[...] = value
  else:
    store(ref, value, optimized=False)


def streamed_key_tiles(kv_len: int, kv_len_padded: int, block_kv: int) -> tuple[int, bool]:
  """(key tiles streamed, whether the last one holds padding keys to mask).

  Only tiles holding a real key are streamed: the wrapper pads keys to a multiple of
  every kernel's tile, which can exceed this one's, and the rest is never read."""
  assert 0 < kv_len <= kv_len_padded and kv_len_padded % block_kv == 0
  return -(-kv_len // block_kv), kv_len % block_kv != 0


def query_tile_cta(*, q_len: int, cta_rows: int, block_kv: int, num_kv_tiles: int,
                   causal: bool, q_offset: int):
  """Grid indices of a CTA over query tiles (forward, dQ) and the key tiles it streams.

  Returns (batch, head, query tile, warpgroup, key tiles). Causal grids launch the longest
  rows (the last query tiles) first, which leaves less tail at the end, and stop at the
  diagonal of the CTA's last query row."""
  bi = lax.axis_index("batch")
  hi = lax.axis_index("heads")
  qi = lax.axis_index("q_tiles")
  if causal:
    qi = (q_len // cta_rows - 1) - qi
  wg = lax.axis_index("wg")
  if causal:
    cta_end = (qi + 1) * cta_rows
    if q_offset:
      cta_end = cta_end + q_offset
    cta_tiles = jnp.minimum(cdiv(cta_end, block_kv), num_kv_tiles)
  else:
    cta_tiles = num_kv_tiles
  return bi, hi, qi, wg, cta_tiles


def query_rows_key_tiles(q_pos, block_q: int, block_kv: int, num_kv_tiles: int, *,
                         causal: bool, kv_tail: bool):
  """Key tiles of a warpgroup whose rows start at position q_pos: (all, plain), where
  tiles [0, all) are streamed and [0, plain) need no mask (causal diagonal and the tile
  holding padding keys are masked)."""
  if causal:
    wg_tiles = jnp.minimum(cdiv(q_pos + block_q, block_kv), num_kv_tiles)
    plain_tiles = jnp.minimum(lax.div(q_pos, i32(block_kv)),
                              num_kv_tiles - 1 if kv_tail else num_kv_tiles)
  else:
    wg_tiles = num_kv_tiles
    plain_tiles = num_kv_tiles - 1 if kv_tail else num_kv_tiles
  return wg_tiles, plain_tiles


def key_mask(shape, q_pos, tile, block_kv: int, *, causal: bool, kv_len: int | None):
  """Which entries of key tile `tile`'s [rows, block_kv] scores are real, for rows from
  position q_pos: key <= row (causal) and key < kv_len (None: the tile holds no padding)."""
  rows = q_pos + iota(shape, 0)
  cols = tile * block_kv + iota(shape, 1)
  valid = None
  if causal:
    valid = cols <= rows
  if kv_len is not None:
    in_len = cols < kv_len
    valid = in_len if valid is None else jnp.logical_and(valid, in_len)
  return valid


def kv_loop(step, carry, plain_tiles, num_tiles, *, masked_tail: bool):
  """A consumer's loop over its streamed tiles: `step(t, carry, masked=False)` for tiles
  [0, plain_tiles), then, when `masked_tail` (causal diagonal or padding keys),
  `step(t, carry, masked=True)` for [plain_tiles, num_tiles) (possibly none)."""
  carry = lax.fori_loop(0, plain_tiles, lambda t, c: step(t, c, masked=False), carry)
  if masked_tail:
    carry = lax.cond(
        plain_tiles < num_tiles,
        lambda: lax.fori_loop(plain_tiles, num_tiles, lambda t, c: step(t, c, masked=True),
                              carry),
        lambda: carry)
  return carry


def stream_tiles(sources, smems, loaded, free, *, num_tiles, stages: int, first=0,
                 load=None):
  """Body of a TMA producer warpgroup: streams tiles first .. first + num_tiles - 1 of
  some operands through `stages` shared-memory slots (tile first + j in slot j % stages).

  sources(i): tile i's gmem views, one per operand (e.g. K [block_kv, r], V [block_kv, dv]).
  smems: per operand, its slots [stages, ...] in shared memory.
  loaded, free: mbarriers [stages], one per operand (a tuple: the consumers free each
    operand on its own, so each reload waits for its own operand's slot) or one for all
    (a single wait per reload; `loaded` then takes one arrival per operand).
  load(i, slot): instead of `sources`, issues tile i's copies itself (e.g. from one of
    several arrays, chosen at run time); one barrier for all (`free` not a tuple).
  The consumers wait on `loaded` and arrive on `free` when done with a slot.
  """
  shared = not isinstance(free, (tuple, list))
  loaded = (loaded,) * len(smems) if shared else tuple(loaded)
  if load is not None and not shared:
    raise ValueError("stream_tiles: load= takes one barrier for all operands")

  def load_sources(i, slot):
    for src, smem, barrier in zip(sources(i), smems, loaded, strict=True):
      plgpu.copy_gmem_to_smem(src, smem.at[slot], barrier.at[slot])

  load = load_sources if load is None else load

  for s in range(stages):  # fill every slot
    pl.when(s < num_tiles)(lambda s=s: load(first + s, s))

  @pl.loop(0, num_tiles - stages)
  def _(j):  # refill each slot once the consumers have freed it
    slot = lax.rem(j, i32(stages))
    # The tile's index math comes after the wait with one barrier and before the first
    # wait with one per operand: the order each kernel had, so it emits the same code.
    if shared:
      plgpu.barrier_wait(free.at[slot])
      load(first + j + stages, slot)
    else:
      for src, smem, barrier, done in zip(sources(first + j + stages), smems, loaded, free,
                                          strict=True):
        plgpu.barrier_wait(done.at[slot])
        plgpu.copy_gmem_to_smem(src, smem.at[slot], barrier.at[slot])


def check_supported(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
  """Raises ValueError for inputs the kernels do not take."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, T, heads, width], got {q.shape}, {k.shape}, {v.shape}")
  batch, _, heads, r = q.shape
  if k.shape[0] != batch or v.shape[0] != batch:
    raise ValueError("q, k, v must share the batch size")
  if k.shape[3] != r:
    raise ValueError(f"k's width {k.shape[3]} must equal q's width {r}")
  if k.shape[1] != v.shape[1]:
    raise ValueError(f"k and v must have one length, got {k.shape[1]} and {v.shape[1]}")
  if heads % k.shape[2] or heads % v.shape[2]:
    raise ValueError(f"query heads {heads} must be a multiple of k heads {k.shape[2]} "
                     f"and v heads {v.shape[2]}")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"only bfloat16 and float16 are supported, got {q.dtype}")
  if r % 16 or not 16 <= r <= 256:
    raise ValueError(f"score width r={r} must be a multiple of 16 in [16, 256]")
  dv = v.shape[3]
  if dv % 64 or not 64 <= dv <= 256:
    raise ValueError(f"value width dv={dv} must be 64, 128, 192 or 256")
