"""FlashAttention-2 style backward kernels for the forward in `forward.py`.

With `P = softmax(scale * Q_like K_like^T)` recomputed from the forward's log-sum-exp,
`delta = rowsum(dO * O)` and `dS = P * (dO V^T - delta)`:

* `_dkdv_kernel`, one program per (key tile, batch, head), loops over the grouping
  blocks and their query tiles: `dV += P^T dO`, `dK_like += dS^T Q_like` (one dK_like
  tile per grouping block).
* `_dq_kernel`, one program per (query tile, batch, head), loops over key tiles:
  `dQ_like += dS K_like`.

Score products are `w`-wide (`d/G` for fused keys) and value products `dv`-wide. Only
the layouts "btnh" and "blocks" are differentiated here: the "gather" forward is
differentiated as exact attention at `(Q_exp, K, V)` (by the caller:
`distrattention_jax/backends/triton.py`). dK/dV come out per
query head (and dK per grouping block); the caller sums over the heads of a kv head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.triton.forward import LOG2E, build_mask, key_spec
from pallas_kernels.triton.tiles import Tiles


def _probs(q, k, lse, q_pos, k_pos, q_seg, kv_seg, *, scale, causal, kv_len,
           kv_len_padded):
  # As the forward: unscaled scores, the scale applied after subtracting the (unscaled)
  # lse. Clamped at 1: the "gather" forward's lse comes from other arithmetic.
  s = jnp.dot(q, k.T, preferred_element_type=jnp.float32)
  if scale < 0:
    s = -s
  qk_scale = abs(scale) * LOG2E
  if qk_scale:
    p = jnp.exp2(jnp.minimum((s - lse[:, None]) * qk_scale, 0.0))
  else:
    p = jnp.broadcast_to(jnp.exp2(-lse)[:, None], s.shape)
  mask = build_mask(q_pos, k_pos, causal=causal, kv_len=kv_len,
                    kv_len_padded=kv_len_padded, q_seg=q_seg, kv_seg=kv_seg)
  return p if mask is None else jnp.where(mask, p, 0.0)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
                 dk_ref, dv_ref, *, scale, causal, kv_len, kv_len_padded, block_q,
                 block_m, block_k, num_blocks):
  j = pl.program_id(0)
  keys = pl.ds(j * block_k, block_k)
  v = v_ref[...]                                              # [bk, dv]
  k_pos = j * block_k + jnp.arange(block_k)
  kv_seg = None if kv_seg_ref is None else kv_seg_ref[keys]
  num_q_tiles = q_ref.shape[0] // block_m
  tiles_per_block = block_q // block_m

  def q_tile(i, carry, k):
    dk, dv = carry
    rows = pl.ds(i * block_m, block_m)
    q = q_ref[rows, :]
    do = do_ref[rows, :]
    q_seg = None if q_seg_ref is None else q_seg_ref[rows]
    p = _probs(q, k, lse_ref[rows], i * block_m + jnp.arange(block_m), k_pos, q_seg, kv_seg,
               scale=scale, causal=causal, kv_len=kv_len,
               kv_len_padded=kv_len_padded)                  # [bm, bk]
    dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[rows][:, None])
    dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
    return dk, dv

  def grouping_block(blk, dv):
    # dK_like belongs to one grouping block (its keys were fused with that block's
    # grouping); dV is the same V for every block, so it accumulates across them.
    k = k_ref[blk]                                            # [bk, w]
    first = blk * tiles_per_block
    last = jnp.minimum(first + tiles_per_block, num_q_tiles)
    if causal:  # query tiles above the diagonal see none of these keys
      first = jnp.maximum(first, jax.lax.div(j * block_k, block_m))
    dk = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(first, last, lambda i, c: q_tile(i, c, k), (dk, dv))
    dk_ref[blk] = (dk * scale).astype(dk_ref.dtype)
    return dv

  dv = jax.lax.fori_loop(0, num_blocks, grouping_block, jnp.zeros(v.shape, jnp.float32))
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
               dq_ref, *, scale, causal, kv_len, block_m, block_k):
  i = pl.program_id(0)
  kv_len_padded = v_ref.shape[0]
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  q_pos = i * block_m + jnp.arange(block_m)
  q_seg = None if q_seg_ref is None else q_seg_ref[...]

  def body(j, dq):
    keys = pl.ds(j * block_k, block_k)
    k = k_ref[keys, :]
    v = v_ref[keys, :]
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[keys]
    p = _probs(q, k, lse, q_pos, j * block_k + jnp.arange(block_k), q_seg, kv_seg,
               scale=scale, causal=causal, kv_len=kv_len,
               kv_len_padded=kv_len_padded)
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  num_k_tiles = kv_len_padded // block_k
  if causal:
    num_k_tiles = jnp.minimum(num_k_tiles,
                              jax.lax.div((i + 1) * block_m + block_k - 1, block_k))
  dq = jax.lax.fori_loop(0, num_k_tiles, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("layout", "scale", "causal", "kv_len", "block_q", "tiles",
                     "interpret"))
def backward(q_like, k_like, value, out, lse, d_out, q_seg, kv_seg, *, layout, scale,
             causal, kv_len, block_q, tiles: Tiles, interpret=False):
  """Gradients of `forward` for layouts "btnh" and "blocks".

  Both kernels (dQ and dK/dV) use `tiles.block_m_bwd`, `block_k_bwd`, `num_warps_bwd`
  and `num_stages_bwd`.

  Returns:
    `dq_like [B, Tq, H, w]`, `dk [B, H, nb, Tk, w]` (per query head and grouping block;
    nb = 1 for "btnh") and `dv [B, H, Tk, dv]` (per query head).
  """
  block_m = block_m_dkv = tiles.block_m_bwd
  block_k = block_k_dkv = tiles.block_k_bwd
  batch, q_len, heads, width = q_like.shape
  kv_len_padded, kv_heads, dv_width = value.shape[1], value.shape[2], value.shape[3]
  heads_per_kv = heads // kv_heads
  # delta = rowsum(dO * O), the softmax-normalisation term of dS.
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32),
                     d_out.astype(jnp.float32))
  params = plgpu.CompilerParams(num_warps=tiles.num_warps_bwd,
                                num_stages=tiles.num_stages_bwd)

  # dQ: same grid and key layout as the forward.
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, causal=causal, kv_len=kv_len,
                        block_m=block_m, block_k=block_k),
      grid=(q_len // block_m, batch, heads),
      in_specs=[
          pl.BlockSpec((None, block_m, None, width), lambda i, b, h: (b, i, h, 0)),
          key_spec(layout, kv_len_padded, width, heads_per_kv, block_m, block_q),
          pl.BlockSpec((None, kv_len_padded, None, dv_width),
                       lambda i, b, h: (b, 0, h // heads_per_kv, 0)),
          pl.BlockSpec((None, block_m, None, dv_width), lambda i, b, h: (b, i, h, 0)),
          pl.BlockSpec((None, None, block_m), lambda i, b, h: (b, h, i)),
          pl.BlockSpec((None, None, block_m), lambda i, b, h: (b, h, i)),
          None if q_seg is None else pl.BlockSpec((None, block_m), lambda i, b, h: (b, i)),
          None if kv_seg is None else pl.BlockSpec((None, kv_len_padded),
                                                   lambda i, b, h: (b, 0)),
      ],
      out_specs=pl.BlockSpec((None, block_m, None, width), lambda i, b, h: (b, i, h, 0)),
      out_shape=jax.ShapeDtypeStruct(q_like.shape, q_like.dtype),
      compiler_params=params,
      interpret=interpret,
      name=f"distr_attention_dq_{layout}",
  )(q_like, k_like, value, d_out, lse, delta, q_seg, kv_seg)

  # dK, dV: one program per key tile, looping over grouping blocks and their query tiles.
  num_blocks = k_like.shape[2] if layout == "blocks" else 1
  dkv_block_q = block_q if layout == "blocks" else q_len
  num_k_tiles = kv_len_padded // block_k_dkv
  # K_like tiles for every grouping block of one key tile: ref [nb, bk, w].
  if layout == "btnh":
    k_tiles = k_like[:, None]  # a grouping-block axis of 1: [B, 1, Tk, Hkv, w]
    k_tile_spec = pl.BlockSpec((None, 1, block_k_dkv, None, width),
                               lambda j, b, h: (b, 0, j, h // heads_per_kv, 0))
  else:
    k_tiles = k_like  # [B, H, nb, Tk, w]
    k_tile_spec = pl.BlockSpec((None, None, num_blocks, block_k_dkv, width),
                               lambda j, b, h: (b, h, 0, j, 0))
  # dV of a query head; summed over the query heads of a kv head (GQA) in float32.
  dv_dtype = value.dtype if heads_per_kv == 1 else jnp.float32
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, scale=scale, causal=causal, kv_len=kv_len,
                        kv_len_padded=kv_len_padded, block_q=dkv_block_q,
                        block_m=block_m_dkv, block_k=block_k_dkv, num_blocks=num_blocks),
      grid=(num_k_tiles, batch, heads),
      in_specs=[
          pl.BlockSpec((None, q_len, None, width), lambda j, b, h: (b, 0, h, 0)),
          k_tile_spec,
          pl.BlockSpec((None, block_k_dkv, None, dv_width),
                       lambda j, b, h: (b, j, h // heads_per_kv, 0)),
          pl.BlockSpec((None, q_len, None, dv_width), lambda j, b, h: (b, 0, h, 0)),
          pl.BlockSpec((None, None, q_len), lambda j, b, h: (b, h, 0)),
          pl.BlockSpec((None, None, q_len), lambda j, b, h: (b, h, 0)),
          None if q_seg is None else pl.BlockSpec((None, q_len), lambda j, b, h: (b, 0)),
          None if kv_seg is None else pl.BlockSpec((None, kv_len_padded),
                                                   lambda j, b, h: (b, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, num_blocks, block_k_dkv, width),
                       lambda j, b, h: (b, h, 0, j, 0)),
          pl.BlockSpec((None, None, block_k_dkv, dv_width), lambda j, b, h: (b, h, j, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((batch, heads, num_blocks, kv_len_padded, width),
                               k_like.dtype if layout == "blocks" or heads_per_kv == 1
                               else jnp.float32),
          jax.ShapeDtypeStruct((batch, heads, kv_len_padded, dv_width), dv_dtype),
      ],
      compiler_params=params,
      interpret=interpret,
      name=f"distr_attention_dkdv_{layout}",
  )(q_like, k_tiles, value, d_out, lse, delta, q_seg, kv_seg)
  return dq, dk, dv
