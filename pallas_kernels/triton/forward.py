"""FlashAttention-2 style forward kernel with a `d/G`-wide score product.

One program per (query tile, batch, head); a loop over key tiles keeps the online
softmax (base 2: `log2(e)` is folded into the scale). The score product is
`Q_like K_like^T`, where, by the caller's choice of layout:

* "btnh":   `K_like` is K itself (`[B, Tk, Hkv, w]`), e.g. `G = 1` (exact attention) or
            `Q_exp` against K (the identity of docs/DESIGN.md section 1);
* "blocks": `K_like` is `K_fused` precomputed per grouping block (`[B, H, nb, Tk, w]`),
            the grouping block a multiple of the query tile;
* "gather": the grouping block equals the query tile, and each key tile of `K_fused` is
            formed in the kernel from `K^T` (`[B, Hkv, d, Tk]`) by gathering the rows of
            each group's members (`member_idx: [B, H, nb, G, w]`) and adding them.

`Q_like` (`Q`, `Q_exp` or `Q_rep`) is `[B, Tq, H, w]` and V is used in full. Sequence
lengths and widths must already be padded (lengths to the tiles, widths to powers of
two >= 16); `kv_len` masks the padded keys. Tile sizes come from one `tiles.Tiles`
(chosen by `tiles.choose_tiles`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.triton.tiles import Tiles

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)


def key_spec(layout: str, kv_len_padded: int, width: int, heads_per_kv: int,
             block_m: int, block_q: int, head_dim: int = 0):
  """BlockSpec of `K_like` for a grid whose first three ids are (q tile, batch, head)."""
  if layout == "btnh":
    return pl.BlockSpec((None, kv_len_padded, None, width),
                        lambda i, b, h: (b, 0, h // heads_per_kv, 0))
  if layout == "blocks":
    tiles_per_block = block_q // block_m
    return pl.BlockSpec((None, None, None, kv_len_padded, width),
                        lambda i, b, h: (b, h, i // tiles_per_block, 0, 0))
  if layout == "gather":
    return pl.BlockSpec((None, None, head_dim, kv_len_padded),
                        lambda i, b, h: (b, h // heads_per_kv, 0, 0))
  raise ValueError(f"unknown key layout {layout!r}")


def build_mask(q_pos, k_pos, *, causal, kv_len, kv_len_padded, q_seg, kv_seg):
  """bool [bm, bk] of allowed (query, key) pairs, or None when everything is allowed."""
  mask = None

  def conj(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if causal:
    mask = conj(mask, q_pos[:, None] >= k_pos[None, :])
  if kv_len != kv_len_padded:
    mask = conj(mask, (k_pos < kv_len)[None, :])
  if q_seg is not None:
    mask = conj(mask, q_seg[:, None] == kv_seg[None, :])
  return mask


def _forward_kernel(q_ref, k_ref, v_ref, idx_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, *,
                    scale, causal, kv_len, block_m, block_k, layout, group_size):
  i = pl.program_id(0)
  kv_len_padded = v_ref.shape[0]
  q = q_ref[...]                                              # [bm, w]
  q_pos = i * block_m + jnp.arange(block_m)
  q_seg = None if q_seg_ref is None else q_seg_ref[...]
  if layout == "gather":
    members = [idx_ref[j, :] for j in range(group_size)]     # G x [w] column indices
  # Scores stay unscaled (the sign of `scale` applied exactly): the scale multiplies
  # `s - m` after the subtraction, so no fused multiply-add can round `s * scale`
  # differently for the row max and for the exponent (with huge logits, |s| ~ 1e9, that
  # made the exponent of the max key +-hundreds: NaN or a wrong row). exp2: log2(e) is
  # folded into the scale.
  qk_scale = abs(scale) * LOG2E

  def body(j, carry, needs_mask=True):
    acc, m_prev, l_prev = carry
    start = j * block_k
    keys = pl.ds(start, block_k)
    if layout == "gather":
      # Step 4 inside the kernel: K_fused^T tile = sum of the members' rows of K^T.
      k_t = k_ref[members[0], keys].astype(jnp.float32)      # [w, bk]
      for member in members[1:]:
        k_t += k_ref[member, keys].astype(jnp.float32)
      if q.dtype == jnp.float32:
        s = jnp.dot(q, k_t, preferred_element_type=jnp.float32)
      else:
        # The float32 sum as two terms of q's dtype (hi + lo: ~16 mantissa bits), so the
        # products stay half-precision MMAs; rounding the sum to q's dtype gave 1.5-2x
        # the XLA path's error in bf16 with sharp attention.
        k_hi = k_t.astype(q.dtype)
        k_lo = (k_t - k_hi.astype(jnp.float32)).astype(q.dtype)
        s = (jnp.dot(q, k_hi, preferred_element_type=jnp.float32)
             + jnp.dot(q, k_lo, preferred_element_type=jnp.float32))
    else:
      s = jnp.dot(q, k_ref[keys, :].T, preferred_element_type=jnp.float32)
    if scale < 0:
      s = -s                                                  # [bm, bk]
    mask = None
    if needs_mask:
      kv_seg = None if kv_seg_ref is None else kv_seg_ref[keys]
      mask = build_mask(q_pos, start + jnp.arange(block_k), causal=causal, kv_len=kv_len,
                        kv_len_padded=kv_len_padded, q_seg=q_seg, kv_seg=kv_seg)
    if mask is not None:
      s = jnp.where(mask, s, MASK_VALUE)
    # Step 5: online softmax.
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1))
    correction = jnp.exp2((m_prev - m_next) * qk_scale)
    p = jnp.exp2((s - m_next[:, None]) * qk_scale)
    if mask is not None:  # a row may have no allowed key so far: keep its sum at 0
      p = jnp.where(mask, p, 0.0)
    l_next = correction * l_prev + jnp.sum(p, axis=-1)
    v = v_ref[keys, :]
    acc = correction[:, None] * acc + jnp.dot(p.astype(v.dtype), v,
                                              preferred_element_type=jnp.float32)
    return acc, m_next, l_next

  num_k_tiles = kv_len_padded // block_k
  if causal:  # key tiles right of the diagonal are fully masked: skip them
    num_k_tiles = jnp.minimum(num_k_tiles,
                              jax.lax.div((i + 1) * block_m + block_k - 1, block_k))
  acc = jnp.zeros((block_m, v_ref.shape[-1]), jnp.float32)
  m = jnp.full((block_m,), MASK_VALUE, jnp.float32)
  l = jnp.zeros((block_m,), jnp.float32)
  carry = (acc, m, l)
  if causal and q_seg is None:
    # Key tiles left of the diagonal (and before any padded key) are fully allowed:
    # run them without building a mask, then the diagonal tiles with it.
    num_open = jnp.minimum(jax.lax.div(i * block_m, block_k), kv_len // block_k)
    carry = jax.lax.fori_loop(0, num_open, functools.partial(body, needs_mask=False), carry)
    acc, m, l = jax.lax.fori_loop(num_open, num_k_tiles, body, carry)
  else:
    acc, m, l = jax.lax.fori_loop(0, num_k_tiles, body, carry)
  has_keys = l > 0
  o_ref[...] = (acc / jnp.where(has_keys, l, 1.0)[:, None]).astype(o_ref.dtype)
  # Log-sum-exp in unscaled score units (p = exp2((s - lse) * qk_scale); for scale 0,
  # log2 of the sum, p = exp2(-lse)); +inf for rows with no key so the backward's
  # probabilities are 0.
  log2_l = jnp.log2(jnp.where(has_keys, l, 1.0))
  lse = m + log2_l / qk_scale if qk_scale else log2_l
  lse_ref[...] = jnp.where(has_keys, lse, jnp.inf)


@functools.partial(
    jax.jit,
    static_argnames=("layout", "scale", "causal", "kv_len", "block_q", "tiles", "interpret"))
def forward(q_like, k_like, value, member_idx, q_seg, kv_seg, *, layout, scale, causal,
            kv_len, block_q, tiles: Tiles, interpret=False):
  """Runs the forward kernel.

  Args:
    q_like: `[B, Tq, H, w]`, Tq a multiple of block_m.
    k_like: per `layout` (module docstring); key length a multiple of block_k.
    value: `[B, Tk, Hkv, dv]`.
    member_idx: int32 `[B, H, nb, G, w]` for layout "gather", else None.
    q_seg, kv_seg: int32 `[B, Tq]`, `[B, Tk]` segment ids (padding included), or None.
    kv_len: number of real keys (keys at or past it are masked).
    block_q: rows per grouping block (layouts "blocks" and "gather").
    tiles: the launch's tiles (`block_m`, `block_k`, `num_warps`, `num_stages` used).

  Returns:
    `(out [B, Tq, H, dv] in q_like's dtype, lse [B, H, Tq] float32)`: the log-sum-exp
    in unscaled score units, base 2 (see the kernel's end; only `backward` reads it).
  """
  block_m, block_k = tiles.block_m, tiles.block_k
  batch, q_len, heads, width = q_like.shape
  kv_len_padded, kv_heads, dv = value.shape[1], value.shape[2], value.shape[3]
  heads_per_kv = heads // kv_heads
  group_size = member_idx.shape[3] if layout == "gather" else 1
  if layout == "gather":
    assert block_q == block_m, (block_q, block_m)
  head_dim = k_like.shape[2] if layout == "gather" else 0
  grid = (q_len // block_m, batch, heads)
  in_specs = [
      pl.BlockSpec((None, block_m, None, width), lambda i, b, h: (b, i, h, 0)),
      key_spec(layout, kv_len_padded, width, heads_per_kv, block_m, block_q, head_dim),
      pl.BlockSpec((None, kv_len_padded, None, dv),
                   lambda i, b, h: (b, 0, h // heads_per_kv, 0)),
      None if member_idx is None else pl.BlockSpec(
          (None, None, None, group_size, width), lambda i, b, h: (b, h, i, 0, 0)),
      None if q_seg is None else pl.BlockSpec((None, block_m), lambda i, b, h: (b, i)),
      None if kv_seg is None else pl.BlockSpec((None, kv_len_padded),
                                               lambda i, b, h: (b, 0)),
  ]
  kernel = functools.partial(
      _forward_kernel, scale=scale, causal=causal, kv_len=kv_len, block_m=block_m,
      block_k=block_k, layout=layout, group_size=group_size)
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=[
          pl.BlockSpec((None, block_m, None, dv), lambda i, b, h: (b, i, h, 0)),
          pl.BlockSpec((None, None, block_m), lambda i, b, h: (b, h, i)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((batch, q_len, heads, dv), q_like.dtype),
          jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32),
      ],
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      interpret=interpret,
      name=f"distr_attention_fwd_{layout}",
  )(q_like, k_like, value, member_idx, q_seg, kv_seg)
