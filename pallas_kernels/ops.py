"""From `distr_attention`'s arrays to kernel launches, and the custom VJPs.

Three paths, chosen from the options (DESIGN.md section 4):

* `group_size == 1`: exact FlashAttention-2 (layout "btnh"), no grouping cost at all.
* grouping block >= `FUSED_MIN_BLOCK_Q` rows: `K_fused` is formed once per grouping block
  by XLA (`[B, H, nb, Tk, d/G]`) and the kernel is a flash kernel with a `d/G`-wide score
  product (layout "blocks"). Its backward is the flash backward on `(Q_rep, K_fused, V)`;
  XLA's autodiff of the `Q_rep = Q W` and `K_fused = K M` products then sends the
  gradients to Q's and K's columns.
* smaller grouping blocks (16..128 rows, the most accurate setting): the query tile is the
  grouping block and each key tile of `K_fused` is summed in the kernel from rows of
  `K^T` (layout "gather"). Its backward is exact attention's at `(Q_exp, K, V)` (the
  identity of DESIGN.md), with `dQ_rep = dQ_exp M`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from distrattention_jax import grouping as grouping_lib
from pallas_kernels import backward as backward_lib
from pallas_kernels import forward as forward_lib
from pallas_kernels import tiles as tiles_lib

FUSED_MIN_BLOCK_Q = 256  # grouping blocks at least this long use precomputed K_fused
MIN_BLOCK_Q = 16         # smallest grouping block the in-kernel gather supports
Q_PAD_SEGMENT = np.iinfo(np.int32).min       # reserved segment ids for padding rows
KV_PAD_SEGMENT = np.iinfo(np.int32).min + 1  # and padding keys (never equal)


def supports(masks, dtype) -> str | None:
  """None if the kernels handle these options, else what they do not handle."""
  if masks.mask is not None:
    return ("a dense boolean `mask` (express it with is_causal, segment_ids, "
            "query_seq_lengths or key_value_seq_lengths)")
  if dtype == jnp.float64:
    return "float64 inputs (use bfloat16, float16 or float32)"
  return None


def _pow2_at_least(n: int, floor: int = 16) -> int:
  return max(floor, 1 << (int(n) - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pad_axis(x, axis, size, value=0):
  if x.shape[axis] == size:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pads, constant_values=value)


def _segments(masks, q_len_padded, kv_len_padded):
  """int32 segment ids with padding folded in, or (None, None) if nothing to mask."""
  if masks.q_segment_ids is None and masks.q_lengths is None and masks.kv_lengths is None:
    return None, None
  batch = next(x.shape[0] for x in (masks.q_segment_ids, masks.q_lengths, masks.kv_lengths)
               if x is not None)
  q_seg, kv_seg = masks.q_segment_ids, masks.kv_segment_ids
  if q_seg is None:
    q_seg = jnp.zeros((batch, q_len_padded), jnp.int32)
    kv_seg = jnp.zeros((batch, kv_len_padded), jnp.int32)
  q_seg = _pad_axis(q_seg, 1, q_len_padded, Q_PAD_SEGMENT)
  kv_seg = _pad_axis(kv_seg, 1, kv_len_padded, KV_PAD_SEGMENT)
  if masks.q_lengths is not None:
    valid = jnp.arange(q_len_padded)[None] < masks.q_lengths[:, None]
    q_seg = jnp.where(valid, q_seg, Q_PAD_SEGMENT)
  if masks.kv_lengths is not None:
    valid = jnp.arange(kv_len_padded)[None] < masks.kv_lengths[:, None]
    kv_seg = jnp.where(valid, kv_seg, KV_PAD_SEGMENT)
  return q_seg, kv_seg


@dataclasses.dataclass(frozen=True)
class _Launch:
  """Static parameters of one forward/backward pair."""

  layout: str
  scale: float
  causal: bool
  kv_len: int
  block_q: int
  tiles: tiles_lib.Tiles
  interpret: bool
  num_groups: int = 0  # "gather": real (unpadded) groups, d / G

  def forward(self, q_like, k_like, value, member_idx, q_seg, kv_seg):
    t = self.tiles
    return forward_lib.forward(
        q_like, k_like, value, member_idx, q_seg, kv_seg, layout=self.layout,
        scale=self.scale, causal=self.causal, kv_len=self.kv_len, block_q=self.block_q,
        block_m=t.block_m, block_k=t.block_k, num_warps=t.num_warps,
        num_stages=t.num_stages, interpret=self.interpret)

  def backward(self, layout, q_like, k_like, value, out, lse, d_out, q_seg, kv_seg):
    t = self.tiles
    return backward_lib.backward(
        q_like, k_like, value, out, lse, d_out, q_seg, kv_seg, layout=layout,
        scale=self.scale, causal=self.causal, kv_len=self.kv_len, block_q=self.block_q,
        block_m=t.block_m_bwd, block_k=t.block_k_bwd, block_m_dkv=t.block_m_bwd,
        block_k_dkv=t.block_k_bwd, num_warps=t.num_warps_bwd,
        num_stages=t.num_stages_bwd, num_warps_dkv=t.num_warps_bwd,
        num_stages_dkv=t.num_stages_bwd, interpret=self.interpret)


def _reduce_kv_grad(grad, kv_heads):
  """`[B, H, Tk, w]` per query head -> `[B, Tk, Hkv, w]` (GQA: sum a kv head's heads)."""
  batch, heads, kv_len, width = grad.shape
  grad = grad.reshape(batch, kv_heads, heads // kv_heads, kv_len, width)
  return jnp.transpose(grad.sum(axis=2), (0, 2, 1, 3))


# --- layouts "btnh" and "blocks": flash attention on (q_like, k_like, V) ---------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q_like, k_like, value, q_seg, kv_seg, launch: _Launch):
  return launch.forward(q_like, k_like, value, None, q_seg, kv_seg)[0]


def _flash_fwd(q_like, k_like, value, q_seg, kv_seg, launch):
  out, lse = launch.forward(q_like, k_like, value, None, q_seg, kv_seg)
  return out, (q_like, k_like, value, q_seg, kv_seg, out, lse)


def _flash_bwd(launch, residuals, d_out):
  q_like, k_like, value, q_seg, kv_seg, out, lse = residuals
  dq, dk, dv = launch.backward(launch.layout, q_like, k_like, value, out, lse, d_out,
                               q_seg, kv_seg)
  if launch.layout == "btnh":
    dk = _reduce_kv_grad(dk[:, :, 0], k_like.shape[2])
  dv = _reduce_kv_grad(dv, value.shape[2])
  return dq, dk.astype(k_like.dtype), dv.astype(value.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --- layout "gather": K_fused summed in the kernel; backward at (Q_exp, K, V) ----------

def _gather_membership(member_idx, head_dim, num_groups):
  """`[B, H, nb, d, w]`: 1 where column c is a member of group g (padded groups: 0)."""
  one_hot = jax.nn.one_hot(member_idx, head_dim, dtype=jnp.float32, axis=-2)  # [..,G,d,w]
  real = (jnp.arange(member_idx.shape[-1]) < num_groups).astype(jnp.float32)
  return one_hot.sum(axis=-3) * real


def _per_block(x, block_q, m, equation):
  """Applies `[B, H, nb, ., .]` matrices to `x [B, T, H, c]` blockwise (T = nb * block_q)."""
  batch, length, heads, c = x.shape
  xb = jnp.transpose(x.reshape(batch, length // block_q, block_q, heads, c), (0, 3, 1, 2, 4))
  yb = jnp.einsum(equation, xb, m.astype(x.dtype), precision=jax.lax.Precision.HIGHEST,
                  preferred_element_type=jnp.float32).astype(x.dtype)
  return jnp.transpose(yb, (0, 2, 3, 1, 4)).reshape(batch, length, heads, yb.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash_gather(q_rep, key, value, member_idx, q_seg, kv_seg, launch: _Launch):
  return _flash_gather_fwd(q_rep, key, value, member_idx, q_seg, kv_seg, launch)[0]


def _flash_gather_fwd(q_rep, key, value, member_idx, q_seg, kv_seg, launch):
  key_t = jnp.transpose(key, (0, 2, 3, 1))  # [B, Hkv, d, Tk]: rows contiguous along keys
  out, lse = launch.forward(q_rep, key_t, value, member_idx, q_seg, kv_seg)
  return out, (q_rep, key, value, member_idx, q_seg, kv_seg, out, lse)


def _flash_gather_bwd(launch, residuals, d_out):
  q_rep, key, value, member_idx, q_seg, kv_seg, out, lse = residuals
  head_dim = key.shape[-1]
  m = _gather_membership(member_idx, head_dim, launch.num_groups)  # [B, H, nb, d, w]
  q_exp = _per_block(q_rep, launch.block_q, m, "bhnrg,bhndg->bhnrd")
  width = _pow2_at_least(head_dim)
  dq_exp, dk, dv = launch.backward(
      "btnh", _pad_axis(q_exp, 3, width), _pad_axis(key, 3, width), value, out, lse,
      d_out, q_seg, kv_seg)
  dq_rep = _per_block(dq_exp[..., :head_dim], launch.block_q, m, "bhnrd,bhndg->bhnrg")
  dk = _reduce_kv_grad(dk[:, :, 0], key.shape[2])[..., :head_dim]
  dv = _reduce_kv_grad(dv, value.shape[2])
  return dq_rep, dk.astype(key.dtype), dv.astype(value.dtype), None, None, None


_flash_gather.defvjp(_flash_gather_fwd, _flash_gather_bwd)


def distr_attention_pallas(query, key, value, perm, masks, *, group_size, block_q,
                           representative, scale, interpret=False, tiles=None):
  """DistrAttention with the Pallas kernels; arguments as `distr_attention`.

  `perm` is `[B, H, nb, d]` (None for group_size 1); `masks` a `config.Masks` without a
  dense mask. `tiles` overrides the tile table (benchmarks). Returns `[B, Tq, H, dv]`.
  """
  batch, q_len, heads, head_dim = query.shape
  kv_len, kv_heads, dv = key.shape[1], key.shape[2], value.shape[3]
  num_groups = head_dim // group_size
  if group_size == 1:
    layout = "btnh"
  elif block_q >= FUSED_MIN_BLOCK_Q:
    layout = "blocks"
  elif block_q >= MIN_BLOCK_Q:
    layout = "gather"
  else:
    raise NotImplementedError(
        f"implementation='pallas' needs block_q >= {MIN_BLOCK_Q} when group_size > 1 "
        f"(got block_q={block_q}); use implementation='xla' for smaller blocks")
  width = _pow2_at_least(num_groups)
  dv_width = _pow2_at_least(dv)
  t = tiles or tiles_lib.tiles_for(
      layout, _pow2_at_least(head_dim) if layout == "gather" else width, dv_width,
      jnp.dtype(query.dtype).itemsize)
  short_q = _pow2_at_least(q_len)
  short_k = _pow2_at_least(kv_len)
  if layout == "gather":
    block_m = block_q
  else:
    block_m = min(t.block_m, short_q, block_q if layout == "blocks" else t.block_m)
  block_m_bwd = min(t.block_m_bwd, short_q)
  block_k = min(t.block_k, short_k)
  block_k_bwd = min(t.block_k_bwd, short_k)
  num_warps = t.num_warps
  if layout == "gather" and block_m >= 128 and dv_width >= 128:
    num_warps = 8  # measured: 128-row tiles with a 128-wide accumulator want 8 warps
  t = dataclasses.replace(t, block_m=block_m, block_k=block_k, block_m_bwd=block_m_bwd,
                          block_k_bwd=block_k_bwd, num_warps=num_warps)
  # Tiles are powers of two, so padding to the largest makes every tile divide.
  q_len_padded = _round_up(q_len, max(block_m, block_m_bwd))
  kv_len_padded = _round_up(kv_len, max(block_k, block_k_bwd))
  q_seg, kv_seg = _segments(masks, q_len_padded, kv_len_padded)
  launch = _Launch(layout=layout, scale=scale, causal=masks.is_causal, kv_len=kv_len,
                   block_q=block_q, tiles=t, interpret=interpret, num_groups=num_groups)

  value_p = _pad_axis(_pad_axis(value, 1, kv_len_padded), 3, dv_width)
  key_p = _pad_axis(key, 1, kv_len_padded)
  if layout == "btnh":
    q_like = _pad_axis(query, 3, width)
    out = _flash(_pad_axis(q_like, 1, q_len_padded), _pad_axis(key_p, 3, width), value_p,
                 q_seg, kv_seg, launch)
  else:
    q_rep = grouping_lib.query_representatives(query, perm, group_size, block_q,
                                               representative)
    q_rep = _pad_axis(_pad_axis(q_rep, 1, q_len_padded), 3, width)
    if layout == "blocks":
      k_fused = _pad_axis(grouping_lib.fuse_keys(key_p, perm, group_size), 4, width)
      out = _flash(q_rep, k_fused, value_p, q_seg, kv_seg, launch)
    else:
      member_idx = _pad_axis(grouping_lib.member_indices(perm, group_size), 4, width)
      member_idx = _pad_axis(member_idx, 2, q_len_padded // block_q)
      out = _flash_gather(q_rep, key_p, value_p, member_idx, q_seg, kv_seg, launch)
  return out[:, :q_len, :, :dv]
