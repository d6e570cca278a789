"""Attention on Hopper through our Mosaic GPU kernels: padding, GQA sums, custom VJP.

Shapes: q [B, Tq, H, r] (softmax scale already folded in), k [B, Tk, Hk, r],
v [B, Tk, Hv, dv]; H % Hk == 0 and H % Hv == 0. bf16 or f16. Causal is top-left
aligned (query i sees keys j <= i, as jax.nn). Returns [B, Tq, H, dv] in the input dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.mosaic_gpu import common
from pallas_kernels.mosaic_gpu.backward import dkv_call, dq_call
from pallas_kernels.mosaic_gpu.forward import forward_call
from pallas_kernels.mosaic_gpu.project import parts_for, split_product
from pallas_kernels.mosaic_gpu.tiles import SMEM_BYTES, Tiles, pick_tiles


def _pad_axis(x, axis: int, multiple: int):
  pad = (-x.shape[axis]) % multiple
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _tiles_for(q, v, tiles: Tiles | None) -> Tiles:
  return tiles if tiles is not None else pick_tiles(q.shape[-1], v.shape[-1], q.dtype)


def _key_count(k, kv_len: int | None) -> int:
  total = k.shape[1]
  if kv_len is None:
    return total
  if not 0 <= kv_len <= total:
    raise ValueError(f"kv_len={kv_len} must be in [0, {total}]")
  return int(kv_len)


@functools.partial(jax.jit, static_argnames=("causal", "kv_len", "tiles", "q_offset"))
def forward(q, k, v, *, causal: bool, kv_len: int | None = None, tiles: Tiles | None = None,
            q_offset: int = 0):
  """(out [B, Tq, H, dv], lse [B, H, Tq] float32, natural log).

  `q_offset` (causal only): q holds the query rows from position q_offset on (query i
  sees keys j <= i + q_offset)."""
  common.check_supported(q, k, v)
  tiles = _tiles_for(q, v, tiles)
  batch, q_len, heads, _ = q.shape
  dv = v.shape[-1]
  keys = _key_count(k, kv_len)
  if keys == 0 or q_len == 0:  # rows with no key: output 0
    return (jnp.zeros((batch, q_len, heads, dv), q.dtype),
            jnp.full((batch, heads, q_len), -jnp.inf, jnp.float32))
  qp = _pad_axis(q, 1, tiles.q_multiple)
  kp = _pad_axis(k[:, :keys], 1, tiles.kv_multiple)
  vp = _pad_axis(v[:, :keys], 1, tiles.kv_multiple)
  out, lse = forward_call(qp, kp, vp, causal=causal, kv_len=keys, tiles=tiles,
                          q_offset=q_offset)
  return out[:, :q_len], lse[:, :, :q_len]


@functools.partial(jax.jit, static_argnames=("causal", "kv_len", "tiles", "q_offset"))
def backward(q, k, v, out, lse, d_out, *, causal: bool, kv_len: int | None = None,
             tiles: Tiles | None = None, q_offset: int = 0):
  """(dq, dk, dv), dk / dv summed over the query heads sharing a k / v head."""
  common.check_supported(q, k, v)
  tiles = _tiles_for(q, v, tiles)
  batch, q_len, heads, r = q.shape
  total_keys, k_heads = k.shape[1], k.shape[2]
  v_heads, dv = v.shape[2], v.shape[3]
  keys = _key_count(k, kv_len)
  if keys == 0 or q_len == 0:
    return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)
  # Pre-pass (FlashAttention-2): delta_i = sum_c O_ic dO_ic, in float32.
  delta = jnp.einsum("bqhc,bqhc->bhq", out.astype(jnp.float32), d_out.astype(jnp.float32))
  qp = _pad_axis(q, 1, tiles.q_multiple)
  dop = _pad_axis(d_out.astype(q.dtype), 1, tiles.q_multiple)
  lsep = _pad_axis(lse.astype(jnp.float32), 2, tiles.q_multiple)
  deltap = _pad_axis(delta, 2, tiles.q_multiple)
  kp = _pad_axis(k[:, :keys], 1, tiles.kv_multiple)
  vp = _pad_axis(v[:, :keys], 1, tiles.kv_multiple)
  if tiles.fused_bwd:
    dq_acc = jax.new_ref(jnp.zeros((batch, qp.shape[1], heads, r), jnp.float32))
    dk, dvv = dkv_call(qp, kp, vp, dop, lsep, deltap, causal=causal, kv_len=keys,
                       tiles=tiles, dq_acc=dq_acc, q_offset=q_offset)
    dq = dq_acc[...][:, :q_len].astype(q.dtype)
  else:
    dq = dq_call(qp, kp, vp, dop, lsep, deltap, causal=causal, kv_len=keys, tiles=tiles,
                 q_offset=q_offset)
    dk, dvv = dkv_call(qp, kp, vp, dop, lsep, deltap, causal=causal, kv_len=keys,
                       tiles=tiles, q_offset=q_offset)
    dq = dq[:, :q_len]
  dk, dvv = dk[:, :keys], dvv[:, :keys]
  if heads != k_heads:  # GQA: sum over the query heads of each k head (float32)
    dk = dk.reshape(batch, keys, k_heads, heads // k_heads, r)
    dk = dk.astype(jnp.float32).sum(axis=3).astype(q.dtype)
  if heads != v_heads:
    dvv = dvv.reshape(batch, keys, v_heads, heads // v_heads, dv)
    dvv = dvv.astype(jnp.float32).sum(axis=3).astype(q.dtype)
  if keys < total_keys:  # keys past kv_len are not keys: zero gradient
    dk = jnp.pad(dk, ((0, 0), (0, total_keys - keys), (0, 0), (0, 0)))
    dvv = jnp.pad(dvv, ((0, 0), (0, total_keys - keys), (0, 0), (0, 0)))
  return dq, dk, dvv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _attention(q, k, v, causal, kv_len, tiles, q_offset):
  return forward(q, k, v, causal=causal, kv_len=kv_len, tiles=tiles, q_offset=q_offset)[0]


def _attention_fwd(q, k, v, causal, kv_len, tiles, q_offset):
  out, lse = forward(q, k, v, causal=causal, kv_len=kv_len, tiles=tiles, q_offset=q_offset)
  return out, (q, k, v, out, lse)


def _attention_bwd(causal, kv_len, tiles, q_offset, residuals, d_out):
  q, k, v, out, lse = residuals
  return backward(q, k, v, out, lse, d_out, causal=causal, kv_len=kv_len, tiles=tiles,
                  q_offset=q_offset)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, *, causal: bool = False, kv_len: int | None = None,
              tiles: Tiles | None = None):
  """softmax(q k^T [+ causal mask]) v with our Hopper kernels; differentiable.

  q [B, Tq, H, r] with the softmax scale folded in; k [B, Tk, Hk, r]; v [B, Tk, Hv, dv].
  `kv_len` (static): keys at positions >= kv_len are ignored (their gradients are 0).
  """
  return _attention(q, k, v, causal, kv_len, tiles, 0)


def projection_supported(q_shape, q_map_shape, v_shape, dtype,
                         tiles: Tiles | None = None) -> str | None:
  """None if `attention_projected` takes these shapes, else the reason."""
  if len(q_shape) != 4 or len(q_map_shape) != 4:
    return f"q [B, T, H, d] and q_map [B, H, d, r] expected, got {q_shape}, {q_map_shape}"
  batch, _, heads, d = q_shape
  if tuple(q_map_shape[:3]) != (batch, heads, d):
    return f"q_map {tuple(q_map_shape)} does not match q {tuple(q_shape)}"
  r, dv = q_map_shape[3], v_shape[-1]
  if r % 16 or not 16 <= r <= d:
    return f"map width r={r} (a multiple of 16 in [16, d])"
  if d != dv:
    return f"q's width d={d} differs from v's dv={dv} (the Q tile lands in O's buffer)"
  if d % 64 or not 64 <= d <= 256:
    return f"head dim d={d} (a multiple of 64 in [64, 256])"
  tiles = tiles if tiles is not None else pick_tiles(r, dv, dtype)
  if not tiles.stage_out:
    return f"tiles without an O staging buffer (r={r}, dv={dv})"
  itemsize = jnp.dtype(dtype).itemsize
  need = tiles.forward_smem_bytes(r, dv, itemsize) + 2 * r * d * itemsize
  if need > SMEM_BYTES:
    return f"shared memory: {need} bytes with the map's {2 * r * d * itemsize} (> {SMEM_BYTES})"
  return None


@functools.partial(jax.jit, static_argnames=("causal", "tiles"))
def forward_projected(q, q_map, k, v, *, causal: bool, tiles: Tiles | None = None,
                      q_map_parts=None):
  """`forward` of `(q q_map, k, v)` with the projection inside the kernel:
  (out [B, Tq, H, dv], lse [B, H, Tq]). q [B, Tq, H, d]; q_map float32 [B, H, d, r];
  q_map_parts: optional `split_map(q_map, q.dtype)` computed elsewhere, used as given."""
  # The usual checks on Q_rep's shape (q with k's width), then the projection's own.
  common.check_supported(jax.ShapeDtypeStruct(q.shape[:-1] + k.shape[-1:], q.dtype), k, v)
  reason = projection_supported(q.shape, q_map.shape, v.shape, q.dtype, tiles)
  if reason:
    raise ValueError(f"forward_projected: {reason}")
  q_map_parts = parts_for(q_map, q.dtype, q_map_parts, "q_map_parts")
  tiles = _tiles_for(k, v, tiles)
  batch, q_len, heads, _ = q.shape
  dv = v.shape[-1]
  if q_len == 0 or k.shape[1] == 0:
    return (jnp.zeros((batch, q_len, heads, dv), q.dtype),
            jnp.full((batch, heads, q_len), -jnp.inf, jnp.float32))
  qp = _pad_axis(q, 1, tiles.q_multiple)
  kp = _pad_axis(k, 1, tiles.kv_multiple)
  vp = _pad_axis(v, 1, tiles.kv_multiple)
  out, lse = forward_call(qp, kp, vp, causal=causal, kv_len=k.shape[1], tiles=tiles,
                          q_map_t=q_map_parts)
  return out[:, :q_len], lse[:, :, :q_len]


def project_queries(q, q_map, q_map_parts=None):
  """`Q_rep = q q_map` `[B, T, H, r]` in q's dtype as the projected forward computes it:
  the map as two parts of q's dtype (`split_map`, or `q_map_parts` if already split),
  float32 products, one rounding."""
  return split_product("bthd,bhrd->bthr", q, parts_for(q_map, q.dtype, q_map_parts,
                                                        "q_map_parts")).astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention_projected(q, q_map, q_map_parts, k, v, causal, tiles):
  return forward_projected(q, q_map, k, v, causal=causal, tiles=tiles,
                           q_map_parts=q_map_parts)[0]


def _attention_projected_fwd(q, q_map, q_map_parts, k, v, causal, tiles):
  out, lse = forward_projected(q, q_map, k, v, causal=causal, tiles=tiles,
                               q_map_parts=q_map_parts)
  return out, (q, q_map, q_map_parts, k, v, out, lse)


def _attention_projected_bwd(causal, tiles, residuals, d_out):
  q, q_map, parts, k, v, out, lse = residuals
  # The backward kernels take Q_rep: recomputed here (one read of Q), not kept from the
  # forward, whose kernel never writes it.
  q_rep = project_queries(q, q_map, parts)
  d_q_rep, dk, dvv = backward(q_rep, k, v, out, lse, d_out, causal=causal, tiles=tiles)
  # dq with the map the forward used; the map's own gradient is dead code (removed by
  # XLA) where it is held constant. Default precision: exact products (split_product).
  dq = split_product("bthr,bhrd->bthd", d_q_rep, parts).astype(q.dtype)
  d_map = jnp.einsum("bthd,bthr->bhdr", q.astype(jnp.float32),
                     d_q_rep.astype(jnp.float32),
                     preferred_element_type=jnp.float32).astype(q_map.dtype)
  return dq, d_map, jnp.zeros_like(parts), dk, dvv


_attention_projected.defvjp(_attention_projected_fwd, _attention_projected_bwd)


def attention_projected(q, q_map, k, v, *, causal: bool = False, tiles: Tiles | None = None,
                        q_map_parts=None):
  """`attention(q q_map, k, v)` with the query projection inside the forward kernel.

  q [B, Tq, H, d] (full width); q_map float32 [B, H, d, r] with the softmax scale folded
  in (differentiable; the lowrank and grouping maps come under stop_gradient);
  k [B, Tk, Hk, r]; v [B, Tk, Hv, dv] with dv == d. Saves writing and
  re-reading `Q_rep`; the forward's Q_rep is `q q_map` rounded to q's dtype, computed
  with the map split into two parts of q's dtype (~16 bits). Gradients: dq = dQ_rep
  q_map^T, d q_map = q^T dQ_rep (Q_rep recomputed in the backward).
  `projection_supported` says which shapes it takes. q_map_parts: optional
  `split_map(q_map, q.dtype)` `[B, H, 2, r, d]` computed elsewhere (the lowrank program
  writes it beside the map), used as given; it gets no gradient (q_map does).
  """
  q_map_parts = parts_for(q_map, q.dtype, q_map_parts, "q_map_parts")
  return _attention_projected(q, q_map, jax.lax.stop_gradient(q_map_parts), k, v, causal,
                              tiles)


def attention_blocked(q, k, v, *, group_block_q: int, causal: bool = False,
                      tiles: Tiles | None = None):
  """Attention where each grouping block of `group_block_q` query rows has its own K_fused.

  q [B, Tq, H, r] (scale folded in); k [B, nb, Tk, Hk, r] with nb = ceil(Tq /
  group_block_q), block j's K_fused at k[:, j]; v [B, Tk, Hv, dv] shared by all blocks.
  One kernel launch per block (its queries, its K_fused, and under causal only the keys
  up to its last row); gradients flow to every block's K_fused and to the shared V.
  group_block_q must be a multiple of 128 (the kernels' query tile of two warpgroups):
  smaller grouping blocks belong to the gather kernels.
  """
  if k.ndim != 5:
    raise ValueError(f"k must be [B, nb, Tk, Hk, r], got {k.shape}")
  q_len, kv_total = q.shape[1], k.shape[2]
  if group_block_q <= 0 or group_block_q % 128:
    raise ValueError(f"group_block_q={group_block_q} must be a positive multiple of 128")
  num_blocks = -(-q_len // group_block_q)
  if k.shape[1] != num_blocks:
    raise ValueError(f"k has {k.shape[1]} grouping blocks, {q_len} query rows in blocks of "
                     f"{group_block_q} need {num_blocks}")
  outs = []
  for j in range(num_blocks):
    start, stop = j * group_block_q, min(q_len, (j + 1) * group_block_q)
    kv_end = min(kv_total, stop) if causal else kv_total  # later keys are all masked
    outs.append(_attention(q[:, start:stop], k[:, j, :kv_end], v[:, :kv_end], causal, None,
                           tiles, start if causal else 0))
  return outs[0] if num_blocks == 1 else jnp.concatenate(outs, axis=1)
