"""Row projections `X W` of a BTNH array on Hopper (Pallas Mosaic GPU): `K_fused = K k_map`.

The narrow attention kernels read `K_fused [B, T, Hk, r]`; XLA computes it as one
batched GEMM per batch row on the BTNH layout, then stacks the rows (a copy of the
output at B > 1: 0.055 ms for K at B=4, H=16, N=16384, d=128 on an H100, 2026-12-06).
This kernel writes the BTNH output in place:

* one CTA per (output head, run of `tiles_per_cta` row tiles, batch row), one wave;
* a TMA producer warpgroup streams `[tile_rows, d]` tiles of the head's rows (GQA: output
  head h reads input head `h // (Hk / H)`) through `stages` shared-memory slots;
* one consumer warpgroup (`ProjectTiles.consumers`: or two, taking alternate tiles)
  multiplies each tile by the map held in shared memory, as a
  high and a low part in the input dtype (`W ~ hi + lo`, ~16 bits of the float32 map,
  two wgmmas into one float32 accumulator), rounds to the input dtype (as XLA's float32
  product then cast) and stores the `[tile_rows, r]` tile by TMA from one of two
  staging buffers.

Rows must come in whole tiles (`supports`); imports nothing from distrattention_jax.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels.mosaic_gpu import common
from pallas_kernels.mosaic_gpu.common import i32
from pallas_kernels.mosaic_gpu.tiles import SM_COUNT, SMEM_BYTES

TILE_ROWS = 128
STAGES = 4
SMEM_SLACK = 1024  # barriers and alignment


def _max_stages(d: int, r: int, itemsize: int, consumers: int = 1) -> int:
  """Row-tile slots (up to STAGES) that fit in shared memory beside the map's two parts
  and two output staging buffers per consumer (d=256, r=64: 2; four asked for 360520
  bytes)."""
  fixed = 2 * r * d * itemsize + 2 * consumers * TILE_ROWS * r * itemsize + SMEM_SLACK
  return max(0, min(STAGES, (SMEM_BYTES - fixed) // (TILE_ROWS * d * itemsize)))


def split_map(w, dtype):
  """float32 `[..., d, r]` -> `[..., 2, r, d]` in `dtype`: the transposed map as a high
  part and the rest (`hi + lo` keeps ~16 bits of each entry for bf16; ~21 for f16,
  fewer where the rest falls below f16's normal range).

  The high part is cut in float32 (bf16: the low 16 bits masked off; f16: rounded with
  `reduce_precision`), not as `m - m.astype(dtype).astype(float32)`: XLA's GPU pipeline
  may drop that float32 -> bf16 -> float32 round trip (excess precision allowed), which
  made `lo` zero on an H100 (2026-12-06) and the map bf16-only."""
  m = jnp.swapaxes(w.astype(jnp.float32), -1, -2)
  if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16):
    bits = jax.lax.bitcast_convert_type(m, jnp.uint32) & jnp.uint32(0xFFFF0000)
    hi32 = jax.lax.bitcast_convert_type(bits, jnp.float32)
  else:
    info = jnp.finfo(dtype)
    hi32 = jax.lax.reduce_precision(m, exponent_bits=info.nexp, mantissa_bits=info.nmant)
  return jnp.stack([hi32.astype(dtype), (m - hi32).astype(dtype)], axis=-3)


def split_product(spec: str, x, parts):
  """`einsum(spec, x, hi + lo)` in float32 for `parts = split_map(...)` ([..., 2, r, d];
  the spec names one part): what the kernels compute, as two products of half-precision
  values. Taken in float32 at the default precision: the operands have 8- or 11-bit
  significands, exact in a GPU's TF32 tensor cores, so this is the kernels' product up
  to the summation order without an emulated float32 GEMM (grouping.exact_einsum)."""
  x = x.astype(jnp.float32)
  parts = parts.astype(jnp.float32)
  return sum(jnp.einsum(spec, x, jnp.take(parts, i, axis=-3),
                        preferred_element_type=jnp.float32) for i in range(2))


def supports(x_shape, w_shape, dtype) -> str | None:
  """None if `project_rows` takes `x [B, T, H, d]` and `w [B, Hout, d, r]`, else why."""
  if len(x_shape) != 4 or len(w_shape) != 4:
    return f"x [B, T, H, d] and w [B, Hout, d, r] expected, got {x_shape}, {w_shape}"
  batch, t, heads, d = x_shape
  if w_shape[0] != batch or w_shape[2] != d or w_shape[1] % heads:
    return f"w {tuple(w_shape)} does not match x {tuple(x_shape)} (Hout a multiple of H)"
  r = w_shape[3]
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"dtype {jnp.dtype(dtype).name} is not bfloat16 or float16"
  if d % 64 or not 64 <= d <= 256:
    return f"head dim d={d} (a multiple of 64 in [64, 256])"
  if r % 16 or not 16 <= r <= 128:
    return f"map width r={r} (a multiple of 16 in [16, 128])"
  if t == 0 or t % TILE_ROWS:
    return f"T={t} rows, not a positive multiple of {TILE_ROWS}"
  if _max_stages(d, r, jnp.dtype(dtype).itemsize) < 2:
    return f"shared memory: d={d} with r={r} leaves room for fewer than 2 row tiles"
  return None


def _tiles_per_cta(ctas_base: int, num_tiles: int) -> int:
  """Row tiles per CTA: the fewest (a divisor of num_tiles) that keep the grid within one
  wave. At B=1, H=16, N=16384, d=128 (H100, 2026-12-06, run s11r1): 16 tiles a CTA (128
  CTAs) took 0.0299 ms alone against 0.0314 for 8 (256 CTAs, two waves); inside the
  lowrank call, after the Gram kernel read its rows backwards (`GramTiles.reverse`, so
  each CTA starts on rows still in the L2), 0.0260 against 0.0294."""
  per = 1
  while num_tiles % (2 * per) == 0 and ctas_base * num_tiles // per > SM_COUNT:
    per *= 2
  return per


@dataclasses.dataclass(frozen=True)
class ProjectTiles:
  """Pipeline shape of `project_rows` (None: the kernel's choice).

  stages: row-tile slots in flight (at most what fits in shared memory, `_max_stages`);
  tiles_per_cta: row tiles per CTA (a power of two; default `_tiles_per_cta`);
  consumers: consumer warpgroups, taking alternate tiles (1 or 2)."""
  stages: int | None = None
  tiles_per_cta: int | None = None
  consumers: int = 1

  def __post_init__(self):
    if self.stages is not None and not 1 <= self.stages <= 8:
      raise ValueError(f"stages must be in [1, 8], got {self.stages}")
    if self.tiles_per_cta is not None and (
        self.tiles_per_cta < 1 or self.tiles_per_cta & (self.tiles_per_cta - 1)):
      raise ValueError(f"tiles_per_cta must be a power of two, got {self.tiles_per_cta}")
    if self.consumers not in (1, 2):
      raise ValueError(f"consumers must be 1 or 2, got {self.consumers}")


# The pipeline callers get (tiles=None); a module attribute so a benchmark can swap it.
TILES = ProjectTiles()


def parts_for(w, dtype, parts=None, name: str = "parts"):
  """The float32 map `w [..., d, r]` as the kernels hold it: `parts` if given (computed
  elsewhere, e.g. by the lowrank program; ValueError unless it has `split_map(w,
  dtype)`'s shape `[..., 2, r, d]` and dtype), else `split_map(w, dtype)`."""
  if parts is None:
    return split_map(w, dtype)
  want = tuple(w.shape[:-2]) + (2, w.shape[-1], w.shape[-2])
  if parts.shape != want or parts.dtype != jnp.dtype(dtype):
    raise ValueError(f"{name} must be split_map(map, {jnp.dtype(dtype).name}): {want} "
                     f"{jnp.dtype(dtype).name}, got {parts.shape} {parts.dtype}")
  return parts


@functools.partial(jax.jit, static_argnames=("tiles",))
def project_rows(x, w, *, tiles: ProjectTiles | None = None, w_parts=None):
  """`[B, T, Hout, r]` in x's dtype: `x[b, :, h // (Hout / H)] @ w[b, h]` per output head.

  x: `[B, T, H, d]` bf16/f16; w: float32 `[B, Hout, d, r]` (`supports`); w_parts:
  optional `split_map(w, x.dtype)` computed elsewhere (the lowrank program writes it),
  which the kernel then reads as given."""
  reason = supports(x.shape, w.shape, x.dtype)
  if reason:
    raise ValueError(f"project_rows: {reason}")
  w_parts = parts_for(w, x.dtype, w_parts, "w_parts")
  batch, t, heads, d = x.shape
  out_heads, r = w.shape[1], w.shape[3]
  fan = out_heads // heads
  dtype = x.dtype
  num_tiles = t // TILE_ROWS
  tiles = TILES if tiles is None else tiles
  consumers = tiles.consumers
  per_cta = tiles.tiles_per_cta or _tiles_per_cta(batch * out_heads, num_tiles)
  if num_tiles % per_cta:
    raise ValueError(f"tiles_per_cta={per_cta} must divide the {num_tiles} row tiles")
  most = _max_stages(d, r, jnp.dtype(dtype).itemsize, consumers)
  stages = min(tiles.stages or most, most, per_cta)
  if consumers > 1 and per_cta > stages:
    # Each slot must always serve the same consumer: a warpgroup tracks the phases of the
    # barriers it waits on itself (3 slots for 2 consumers crashed an H100, run s11r1).
    stages -= stages % consumers
  if stages < max(1, min(consumers, per_cta)):
    raise ValueError(f"project_rows: {tiles} leaves too few row-tile slots at d={d}, r={r}")

  def kernel(x_ref, w_ref, out_ref, x_smems, w_smem, out_smems, loaded, free, w_loaded):
    ho, ci, bi = (lax.axis_index(n) for n in ("heads", "chunks", "batch"))
    first = ci * per_cta
    wg = lax.axis_index("wg")

    def consume(c):  # consumer warpgroup c takes tiles c, c + consumers, ...
      plgpu.barrier_wait(w_loaded)

      @pl.loop(0, (per_cta - c + consumers - 1) // consumers)
      def _(k):
        j = k * consumers + c
        slot = lax.rem(j, i32(stages))
        buf = 2 * c + lax.rem(k, i32(2))
        plgpu.barrier_wait(loaded.at[slot])
        y = common.split_map_product(x_smems.at[slot], w_smem, TILE_ROWS, r)  # X_t (hi + lo)
        plgpu.barrier_arrive(free.at[slot])
        # The store two tiles ago used this staging buffer: wait until it was read.
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
        out_smems.at[buf][...] = y.astype(dtype)
        plgpu.commit_smem()
        rows = pl.ds((first + j) * TILE_ROWS, TILE_ROWS)
        plgpu.copy_smem_to_gmem(out_smems.at[buf], out_ref.at[bi, rows, ho])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    for c in range(consumers):
      pl.when(wg == c)(functools.partial(consume, c))

    @pl.when(wg == consumers)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      for part in range(2):
        plgpu.copy_gmem_to_smem(w_ref.at[bi, ho, part], w_smem.at[part], w_loaded)
      head = lax.div(ho, i32(fan))
      common.stream_tiles(lambda i: (x_ref.at[bi, pl.ds(i * TILE_ROWS, TILE_ROWS), head],),
                          (x_smems,), (loaded,), (free,), num_tiles=per_cta,
                          stages=stages, first=first)

  def distr_project(x_ref, w_ref, out_ref):  # (the name the profiler shows)
    scoped = (
        plgpu.SMEM((stages, TILE_ROWS, d), dtype, transforms=common.smem_transforms(d, dtype)),
        plgpu.SMEM((2, r, d), dtype, transforms=common.smem_transforms(d, dtype)),
        plgpu.SMEM((2 * consumers, TILE_ROWS, r), dtype,
                   transforms=common.smem_transforms(r, dtype)),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2),
    )
    pl.run_scoped(lambda *refs: kernel(x_ref, w_ref, out_ref, *refs), *scoped,
                  collective_axes="wg")

  return plgpu.kernel(
      distr_project,
      out_type=jax.ShapeDtypeStruct((batch, t, out_heads, r), dtype),
      grid=(out_heads, num_tiles // per_cta, batch),
      grid_names=("heads", "chunks", "batch"),
      num_threads=consumers + 1,
      thread_name="wg",
  )(x, w_parts)


def _project_reference(x, w):
  """`project_rows` in XLA (float32 products, rounded to x's dtype)."""
  batch, t, heads, d = x.shape
  fan = w.shape[1] // heads
  wg = w.astype(jnp.float32).reshape(batch, heads, fan, d, w.shape[3])
  y = jnp.einsum("bthd,bhfdr->bthfr", x, wg, precision=jax.lax.Precision.HIGHEST,
                 preferred_element_type=jnp.float32)
  return y.reshape(batch, t, heads * fan, w.shape[3]).astype(x.dtype)


def projected(x, w, w_parts=None):
  """`project_rows(x, w)`, differentiable: dx = dy w^T summed over each input head's
  output heads (w as the kernel holds it, `split_map`), dw = x^T dy (float32).
  w_parts: optional `split_map(w, x.dtype)` computed elsewhere (the lowrank program
  writes it beside the map), used as given; gradients go to x and w, none to w_parts."""
  return _projected(x, w, jax.lax.stop_gradient(parts_for(w, x.dtype, w_parts, "w_parts")))


@jax.custom_vjp
def _projected(x, w, w_parts):
  return project_rows(x, w, w_parts=w_parts)


def _projected_fwd(x, w, w_parts):
  return project_rows(x, w, w_parts=w_parts), (x, w, w_parts)


def _projected_bwd(residuals, dy):
  x, w, w_parts = residuals
  batch, t, heads, d = x.shape
  fan, r = w.shape[1] // heads, w.shape[3]
  dyg = dy.reshape(batch, t, heads, fan, r)
  parts = w_parts.reshape(batch, heads, fan, 2, r, d)
  # dx with the map the forward used (hi + lo); dw from the half-precision operands, both
  # at the default precision (exact products, see split_product).
  dx = split_product("bthfr,bhfrd->bthd", dyg, parts).astype(x.dtype)
  dw = jnp.einsum("bthd,bthfr->bhfdr", x.astype(jnp.float32), dyg.astype(jnp.float32),
                  preferred_element_type=jnp.float32)
  return dx, dw.reshape(w.shape).astype(w.dtype), jnp.zeros_like(w_parts)


_projected.defvjp(_projected_fwd, _projected_bwd)
