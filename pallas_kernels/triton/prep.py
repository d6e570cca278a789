"""The grouping's passes over Q and K in the BTNH layout: per-head Grams and projections.

Every DistrAttention call reads Q and K twice before attention: once for the `d x d`
Gram matrices of each head (the greedy grouping's column distances, the lowrank
factorisation's Grams) and once to project them (`Q_rep = Q q_map`, `K_fused = K k_map`
with `[d, r]` maps per head). As XLA einsums on `[B, T, H, d]` arrays both become
batched matmuls over (B, H), which XLA runs after transposing the operands to
head-major and the result back: several full passes over Q and K. These two kernels
read the BTNH rows where they lie (one head's `[rows, d]` slice is a strided 2-D tile)
and write the result in the layout the attention kernels take.

  head_grams(x)             float32 `[B, H, nb, d, d]`: `X_b^T X_b` per head and row block
  project_heads(x, w)       `[B, T, Ho, e]`: each row's head slice times its head's map,
                            differentiable in x (w is a constant: callers stop its gradient)

Inputs bf16 or f16 (products exact in float32, accumulated in float32); widths powers
of two >= 16. `prep_supported` says why a call does not fit, so callers can use XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

GRAM_BLOCK_D = 128      # Gram output tile: d=256 runs 2 x 2 tiles (registers)
GRAM_ROWS = 64          # rows per loaded tile of the Gram loop
GRAM_MIN_PROGRAMS = 264  # enough programs for two per SM of an H100 (132 SMs)
PROJECT_ROWS = 128      # rows per program of the projection


def _is_pow2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def prep_supported(x_shape, dtype, *, out_width: int | None = None) -> str | None:
  """None if `head_grams` / `project_heads` take an `[B, T, H, c]` input, else why not."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(dtype).name} (the prep kernels take bfloat16 or float16)"
  if len(x_shape) != 4:
    return f"shape {tuple(x_shape)} (expected [B, T, H, c])"
  for name, width in (("head width", x_shape[-1]), ("output width", out_width)):
    if width is not None and not (_is_pow2(width) and width >= 16):
      return f"{name} {width} (a power of two >= 16)"
  return None


# ----------------------------------------------------------------------------------------
# Grams
# ----------------------------------------------------------------------------------------


def _gram_kernel(x_ref, o_ref, *, rows: int, chunk: int, splits: int, block_rows: int,
                 q_len: int, block_d: int, tiles_d: int):
  part = pl.program_id(1)
  tile = pl.program_id(2)
  blk, split = part // splits, part % splits
  first = split * chunk                       # this program's first row within the block
  block_start = blk * rows                    # the block's first row in the sequence
  # Rows of this program: [first, first + chunk) of the block, clipped to the block's rows
  # and the sequence (the last block may be short: the rest must read as zeros).
  end = jnp.minimum(first + chunk, jnp.minimum(rows, q_len - block_start))
  ci, cj = tile // tiles_d, tile % tiles_d

  def body(step, acc):
    start = step * block_rows                 # within this program's chunk (x_ref)
    local = first + start + jnp.arange(block_rows, dtype=jnp.int32)  # within the block
    valid = jnp.broadcast_to((local < end)[:, None], (block_rows, block_d))
    xi = plgpu.load(x_ref.at[pl.ds(start, block_rows), pl.ds(ci * block_d, block_d)],
                    mask=valid, other=0.0)
    xj = plgpu.load(x_ref.at[pl.ds(start, block_rows), pl.ds(cj * block_d, block_d)],
                    mask=valid, other=0.0)
    # X_i^T X_j over these rows (contract the row axis; exact products in float32).
    return acc + jax.lax.dot_general(xi, xj, (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)

  acc = jnp.zeros((block_d, block_d), jnp.float32)
  acc = jax.lax.fori_loop(0, chunk // block_rows, body, acc)
  o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("block_q", "num_warps", "interpret"))
def head_grams(x, *, block_q: int | None = None, num_warps: int = 8,
               interpret: bool = False):
  """float32 `[B, H, nb, d, d]`: `X_b^T X_b` per head over each block of `block_q` rows.

  x: `[B, T, H, d]` bf16/f16 (rows to leave out must already be zero). `block_q`: rows
  per block (None or >= T: one block, nb = 1); a multiple of 16 when smaller than T. The
  last block may be short. Each block is split over several programs (partial Grams
  summed after) so that a few heads still fill the GPU.
  """
  batch, q_len, heads, d = x.shape
  reason = prep_supported(x.shape, x.dtype)
  if reason is not None:
    raise ValueError(f"head_grams does not take {reason}")
  rows = q_len if block_q is None or block_q >= q_len else block_q
  if rows < q_len and rows % 16:
    raise ValueError(f"block_q={block_q} must be a multiple of 16 (or >= T={q_len})")
  num_blocks = -(-q_len // rows)
  block_rows = min(GRAM_ROWS, 1 << (max(rows, 16) - 1).bit_length())
  block_d = min(d, GRAM_BLOCK_D)
  tiles_d = d // block_d
  row_tiles = -(-rows // block_rows)
  programs = batch * heads * num_blocks * tiles_d * tiles_d
  if num_blocks > 1 and rows % block_rows:
    raise ValueError(f"block_q={block_q} must be a multiple of {block_rows}")
  # Split each block over a power of two of programs (so chunks tile a block exactly).
  want = -(-GRAM_MIN_PROGRAMS // programs)
  splits = min(row_tiles, 1 << (want - 1).bit_length())
  chunk = -(-row_tiles // splits) * block_rows
  splits = -(-rows // chunk)
  kwargs = {}
  if not interpret:
    kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=2)
  chunks_per_block = rows // chunk if num_blocks > 1 else 1

  def x_map(bh, part, tile):
    # Block index in units of `chunk` rows (a chunk never straddles two blocks).
    return (bh // heads, (part // splits) * chunks_per_block + part % splits, bh % heads, 0)

  partial = pl.pallas_call(
      functools.partial(_gram_kernel, rows=rows, chunk=chunk, splits=splits,
                        block_rows=block_rows, q_len=q_len, block_d=block_d,
                        tiles_d=tiles_d),
      grid=(batch * heads, num_blocks * splits, tiles_d * tiles_d),
      in_specs=[pl.BlockSpec((None, chunk, None, d), x_map)],
      out_specs=pl.BlockSpec((None, None, block_d, block_d),
                             lambda bh, part, tile: (bh, part, tile // tiles_d,
                                                     tile % tiles_d)),
      out_shape=jax.ShapeDtypeStruct((batch * heads, num_blocks * splits, d, d),
                                     jnp.float32),
      interpret=interpret,
      name="distr_head_grams",
      **kwargs,
  )(_pad_rows(x, num_blocks, rows, chunk, splits))
  partial = partial.reshape(batch, heads, num_blocks, splits, d, d)
  return partial.sum(axis=3)


def _pad_rows(x, num_blocks, rows, chunk, splits):
  """x with rows up to the last program's chunk end, so no block reads past the array
  (jax 0.11.2's Triton lowering does not bound partial blocks). A no-op when T fits."""
  need = (num_blocks - 1) * rows + splits * chunk if num_blocks > 1 else splits * chunk
  pad = need - x.shape[1]
  if pad <= 0:
    return x
  return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))


# ----------------------------------------------------------------------------------------
# Projections
# ----------------------------------------------------------------------------------------


def _project_kernel(*refs, fan_in: int, block_rows: int, q_len: int):
  x_refs, w_refs, o_ref = refs[:fan_in], refs[fan_in:2 * fan_in], refs[-1]
  t = pl.program_id(1)
  rows = t * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
  in_seq = rows < q_len                         # the last row tile may be short
  width_in, width_out = x_refs[0].shape[-1], w_refs[0].shape[-1]
  acc = jnp.zeros((block_rows, width_out), jnp.float32)
  for x_ref, w_ref in zip(x_refs, w_refs):  # output head: sum of its fan_in input heads
    x = plgpu.load(x_ref, mask=jnp.broadcast_to(in_seq[:, None], (block_rows, width_in)),
                   other=0.0)
    acc += jnp.dot(x, w_ref[...].astype(x.dtype), preferred_element_type=jnp.float32)
  plgpu.store(o_ref, acc.astype(o_ref.dtype),
              mask=jnp.broadcast_to(in_seq[:, None], (block_rows, width_out)))


def _project_call(x, w, *, out_heads, block_q, num_warps, interpret):
  """The kernel call: see `project_heads` (w `[B, Hw, nb, c, e]`)."""
  batch, q_len, heads_in, width_in = x.shape
  num_blocks, width_out = w.shape[2], w.shape[-1]
  fan_in = max(1, heads_in // out_heads)    # input heads summed into one output head
  fan_out = max(1, out_heads // heads_in)   # output heads reading one input head
  block_rows = PROJECT_ROWS if block_q is None else min(PROJECT_ROWS, block_q)
  rows_per_block = q_len if block_q is None else block_q

  def x_spec(i):
    return pl.BlockSpec((None, block_rows, None, width_in),
                        lambda b, t, j: (b, t, j * fan_in // fan_out + i, 0))

  def w_spec(i):
    def index(b, t, j):
      block = jnp.minimum((t * block_rows) // rows_per_block, num_blocks - 1)
      return (b, j * fan_in + i, block, 0, 0)
    return pl.BlockSpec((None, None, None, width_in, width_out), index)

  kwargs = {}
  if not interpret:
    kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=2)
  return pl.pallas_call(
      functools.partial(_project_kernel, fan_in=fan_in, block_rows=block_rows, q_len=q_len),
      grid=(batch, -(-q_len // block_rows), out_heads),
      in_specs=[x_spec(i) for i in range(fan_in)] + [w_spec(i) for i in range(fan_in)],
      out_specs=pl.BlockSpec((None, block_rows, None, width_out), lambda b, t, j: (b, t, j, 0)),
      out_shape=jax.ShapeDtypeStruct((batch, q_len, out_heads, width_out), x.dtype),
      interpret=interpret,
      name="distr_project_heads",
      **kwargs,
  )(*([x] * fan_in), *([w] * fan_in))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _project(x, w, out_heads, block_q, num_warps, interpret):
  return _project_call(x, w, out_heads=out_heads, block_q=block_q, num_warps=num_warps,
                       interpret=interpret)


def _project_fwd(x, w, out_heads, block_q, num_warps, interpret):
  # x's head count travels as the shape of an empty residual (residuals are arrays).
  heads_tag = jnp.zeros((x.shape[2], 0), x.dtype)
  return _project(x, w, out_heads, block_q, num_warps, interpret), (w, heads_tag)


def _project_bwd(out_heads, block_q, num_warps, interpret, residuals, d_out):
  # out[j] = x[j // fan_out] w[j] (or sum_i x[i] w[i]): dx is the same product of d_out
  # with w^T and the head fan reversed. w is a constant (the grouping's maps, under
  # stop_gradient): its cotangent is zero.
  del out_heads
  w, heads_tag = residuals
  dx = _project(d_out, jnp.swapaxes(w, -1, -2), heads_tag.shape[0], block_q, num_warps,
                interpret)
  return dx.astype(heads_tag.dtype), jnp.zeros_like(w)


_project.defvjp(_project_fwd, _project_bwd)


def project_heads(x, w, *, out_heads: int | None = None, block_q: int | None = None,
                  num_warps: int = 4, interpret: bool = False):
  """`[B, T, Ho, e]`: row t of output head j is `x[b, t, h(j)] @ w[b, j, t // block_q]`.

  Args:
    x: `[B, T, Hx, c]` bf16/f16.
    w: `[B, Hw, nb, c, e]` (or `[B, Hw, c, e]`, one map for all rows), Hw = max(Hx, Ho);
      cast to x's dtype (float32 accumulation). A constant: its cotangent is zero
      (callers hold it under stop_gradient).
    out_heads: Ho (default Hx). Ho a multiple of Hx: output head j reads input head
      `j // (Ho / Hx)` with map j (K_fused for the query heads of a kv head). Ho dividing
      Hx: output head j sums input heads `j * f .. (j + 1) * f - 1`, each times its own
      map (the gradient of the former).
    block_q: rows per map block (None: one map); a multiple of 16 when nb > 1.
  Differentiable in x (custom VJP: the same kernel with `w^T`).
  """
  if w.ndim == 4:
    w = w[:, :, None]
  batch, q_len, heads_in, width_in = x.shape
  out_heads = heads_in if out_heads is None else out_heads
  reason = prep_supported(x.shape, x.dtype, out_width=w.shape[-1])
  if reason is not None:
    raise ValueError(f"project_heads does not take {reason}")
  hi, lo = max(heads_in, out_heads), min(heads_in, out_heads)
  if hi % lo or not _is_pow2(hi // lo):
    raise ValueError(f"heads {heads_in} -> {out_heads}: one must be a power-of-two "
                     f"multiple of the other")
  if w.shape[:2] != (batch, hi) or w.shape[3] != width_in:
    raise ValueError(f"w {w.shape} must be [B={batch}, {hi}, nb, {width_in}, e]")
  num_blocks = w.shape[2]
  if num_blocks > 1:
    if block_q is None or block_q % 16 or num_blocks < -(-q_len // block_q):
      raise ValueError(f"w has {num_blocks} blocks: block_q={block_q} must be a multiple "
                       f"of 16 with ceil(T / block_q) <= {num_blocks}")
  else:
    block_q = None
  return _project(x, w, out_heads, block_q, num_warps, interpret)
