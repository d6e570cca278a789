"""The "triton" backend: our Pallas Triton kernels (`pallas_kernels/triton/`), and the glue
from `distr_attention`'s arrays to kernel launches: layout choice, padding, masks folded
into segment ids, and the custom VJPs.

Aliases: "pallas" = "triton"; "pallas_interpret" = "triton_interpret" (the same kernels
in the Pallas interpreter, any platform: CPU tests).

Three layouts, chosen from the options (docs/DESIGN.md section 4):

* `group_size == 1`: exact FlashAttention-2 (layout "btnh"), no grouping cost at all.
* grouping block >= `FUSED_MIN_BLOCK_Q` rows: `K_fused` is formed once per grouping block
  by XLA (`[B, H, nb, Tk, d/G]`) and the kernel is a flash kernel with a `d/G`-wide score
  product (layout "blocks"). Its backward is the flash backward on `(Q_rep, K_fused, V)`;
  XLA's autodiff of the `Q_rep` and `K_fused` products then sends the gradients to Q's
  and K's columns. Dense grouping maps work here as permutations do.
* smaller grouping blocks (16..128 rows, the most accurate setting): the query tile is the
  grouping block and each key tile of `K_fused` is summed in the kernel from rows of
  `K^T` (layout "gather"). Its backward is exact attention's at `(Q_exp, K, V)` (the
  identity of docs/DESIGN.md section 1), with `dQ_rep = dQ_exp M`. It gathers the
  members of a permutation, so it refuses dense maps.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from distrattention_jax import grouping as grouping_lib
from distrattention_jax.backends import base
from pallas_kernels.triton import backward as backward_lib
from pallas_kernels.triton import forward as forward_lib
from pallas_kernels.triton import tiles as tiles_lib

FUSED_MIN_BLOCK_Q = 256  # grouping blocks at least this long use precomputed K_fused
MIN_BLOCK_Q = 16         # smallest grouping block the in-kernel gather supports
Q_PAD_SEGMENT = np.iinfo(np.int32).min       # reserved segment ids for padding rows
KV_PAD_SEGMENT = np.iinfo(np.int32).min + 1  # and padding keys (never equal)


def choose_layout(group_size: int, block_q: int) -> str | None:
  """"btnh", "blocks" or "gather" for these options; None when no layout fits."""
  if group_size == 1:
    return "btnh"
  if block_q >= FUSED_MIN_BLOCK_Q:
    return "blocks"
  if block_q >= MIN_BLOCK_Q:
    return "gather"
  return None


def _supports(problem: base.Problem) -> str | None:
  """None if the kernels handle these options, else what they do not handle."""
  if problem.has_mask:
    return ("a dense boolean `mask` (express it with is_causal, segment_ids, "
            "query_seq_lengths or key_value_seq_lengths)")
  if problem.dtype == jnp.float64:
    return "float64 inputs (use bfloat16, float16 or float32)"
  layout = choose_layout(problem.group_size, problem.block_q)
  if layout is None:
    return (f"block_q={problem.block_q} with group_size > 1 (the kernels need "
            f"block_q >= {MIN_BLOCK_Q}; use implementation='xla' for smaller blocks)")
  if layout == "gather" and problem.dense_maps:
    return (f"grouping={problem.config.grouping!r} with block_q={problem.block_q} (the "
            f"in-kernel gather of block_q < {FUSED_MIN_BLOCK_Q} needs a permutation "
            "grouping; use a larger block_q)")
  return None


def _pad_axis(x, axis, size, value=0, mode="constant"):
  if x.shape[axis] == size:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  if mode == "edge":
    return jnp.pad(x, pads, mode="edge")
  return jnp.pad(x, pads, constant_values=value)


def _dense_ids(q_seg, kv_seg):
  """Segment ids renumbered per batch row to ranks in `[0, Tq + Tk)`, equality kept.

  Makes the padding sentinels (negative) impossible to collide with a user's id, whatever
  int32 values the user chose.
  """
  both = jnp.sort(jnp.concatenate([q_seg, kv_seg], axis=1), axis=1)
  rank = jax.vmap(functools.partial(jnp.searchsorted, side="left"))
  return rank(both, q_seg).astype(jnp.int32), rank(both, kv_seg).astype(jnp.int32)


def _segments(masks, q_len_padded, kv_len_padded):
  """int32 segment ids with padding folded in, or (None, None) if nothing to mask.

  Padding rows get `Q_PAD_SEGMENT` and padding keys `KV_PAD_SEGMENT`; user ids are first
  renumbered to non-negative ranks (`_dense_ids`) so they never equal a sentinel.
  """
  if masks.q_segment_ids is None and masks.q_lengths is None and masks.kv_lengths is None:
    return None, None
  batch = next(x.shape[0] for x in (masks.q_segment_ids, masks.q_lengths, masks.kv_lengths)
               if x is not None)
  q_seg, kv_seg = masks.q_segment_ids, masks.kv_segment_ids
  if q_seg is None:
    q_seg = jnp.zeros((batch, q_len_padded), jnp.int32)
    kv_seg = jnp.zeros((batch, kv_len_padded), jnp.int32)
  elif (masks.q_lengths is not None or masks.kv_lengths is not None
        or q_seg.shape[1] != q_len_padded or kv_seg.shape[1] != kv_len_padded):
    q_seg, kv_seg = _dense_ids(q_seg, kv_seg)  # sentinels will be used: keep them unique
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
  group_size: int = 1
  width: int = 0  # "gather": padded number of groups

  def forward(self, q_like, k_like, value, member_idx, q_seg, kv_seg):
    return forward_lib.forward(
        q_like, k_like, value, member_idx, q_seg, kv_seg, layout=self.layout,
        scale=self.scale, causal=self.causal, kv_len=self.kv_len, block_q=self.block_q,
        tiles=self.tiles, interpret=self.interpret)

  def backward(self, layout, q_like, k_like, value, out, lse, d_out, q_seg, kv_seg):
    return backward_lib.backward(
        q_like, k_like, value, out, lse, d_out, q_seg, kv_seg, layout=layout,
        scale=self.scale, causal=self.causal, kv_len=self.kv_len, block_q=self.block_q,
        tiles=self.tiles, interpret=self.interpret)


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

def _gather_maps(perm, launch):
  """Member indices `[B, H, nb, G, w]` and membership `[B, H, nb, d, w]` of `perm`,
  padded to `w` groups (padded groups: no members)."""
  member_idx = _pad_axis(grouping_lib.member_indices(perm, launch.group_size), 4,
                         launch.width)
  m = _pad_axis(grouping_lib.membership(perm, launch.group_size), 4, launch.width)
  return member_idx, m


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash_gather(q_rep, key, value, perm, q_seg, kv_seg, launch: _Launch):
  return _flash_gather_fwd(q_rep, key, value, perm, q_seg, kv_seg, launch)[0]


def _flash_gather_fwd(q_rep, key, value, perm, q_seg, kv_seg, launch):
  key_t = jnp.transpose(key, (0, 2, 3, 1))  # [B, Hkv, d, Tk]: rows contiguous along keys
  member_idx, _ = _gather_maps(perm, launch)
  out, lse = launch.forward(q_rep, key_t, value, member_idx, q_seg, kv_seg)
  return out, (q_rep, key, value, perm, q_seg, kv_seg, out, lse)


def _flash_gather_bwd(launch, residuals, d_out):
  q_rep, key, value, perm, q_seg, kv_seg, out, lse = residuals
  head_dim = key.shape[-1]
  _, m = _gather_maps(perm, launch)                                  # [B, H, nb, d, w]
  q_exp = grouping_lib.blockwise_matmul(q_rep, jnp.swapaxes(m, -1, -2), launch.block_q)
  width = tiles_lib.pow2_at_least(head_dim)
  dq_exp, dk, dv = launch.backward(
      "btnh", _pad_axis(q_exp, 3, width), _pad_axis(key, 3, width), value, out, lse,
      d_out, q_seg, kv_seg)
  dq_rep = grouping_lib.blockwise_matmul(dq_exp[..., :head_dim], m, launch.block_q)
  dk = _reduce_kv_grad(dk[:, :, 0], key.shape[2])[..., :head_dim]
  dv = _reduce_kv_grad(dv, value.shape[2])
  return dq_rep, dk.astype(key.dtype), dv.astype(value.dtype), None, None, None


_flash_gather.defvjp(_flash_gather_fwd, _flash_gather_bwd)


def distr_attention_triton(query, key, value, reduction, masks, *, scale, interpret=False,
                           tiles=None):
  """DistrAttention with the Triton kernels.

  `reduction` is a `grouping.HeadReduction` (None for group_size 1); `masks` a
  `config.Masks` without a dense mask. `tiles` replaces the tile table as the starting
  point of `tiles.choose_tiles` (benchmarks.tune). Returns `[B, Tq, H, dv]`.
  """
  _, q_len, heads, head_dim = query.shape
  kv_len, dv = key.shape[1], value.shape[3]
  group_size = 1 if reduction is None else reduction.group_size
  block_q = query.shape[1] if reduction is None else reduction.block_q
  layout = choose_layout(group_size, block_q)
  if layout is None or (layout == "gather" and not reduction.is_permutation):
    raise NotImplementedError(f"the triton backend does not support group_size="
                              f"{group_size} with block_q={block_q} here")
  width = tiles_lib.pow2_at_least(head_dim // group_size)
  dv_width = tiles_lib.pow2_at_least(dv)
  t = tiles_lib.choose_tiles(
      layout, score_width=tiles_lib.pow2_at_least(head_dim) if layout == "gather" else width,
      value_width=dv_width, q_len=q_len, kv_len=kv_len, block_q=block_q,
      itemsize=jnp.dtype(query.dtype).itemsize, base=tiles)
  q_len_padded, kv_len_padded = tiles_lib.padded_lengths(t, q_len, kv_len)
  q_seg, kv_seg = _segments(masks, q_len_padded, kv_len_padded)
  launch = _Launch(layout=layout, scale=scale, causal=masks.is_causal, kv_len=kv_len,
                   block_q=block_q, tiles=t, interpret=interpret, group_size=group_size,
                   width=width)

  value_p = _pad_axis(_pad_axis(value, 1, kv_len_padded), 3, dv_width)
  key_p = _pad_axis(key, 1, kv_len_padded)
  if layout == "btnh":
    q_like = _pad_axis(query, 3, width)
    out = _flash(_pad_axis(q_like, 1, q_len_padded), _pad_axis(key_p, 3, width), value_p,
                 q_seg, kv_seg, launch)
  else:
    q_rep = _pad_axis(_pad_axis(reduction.q_rep(query), 1, q_len_padded), 3, width)
    if layout == "blocks":
      k_fused = reduction.k_fused_blocks(key_p)           # [B, Hk, nb, Tk, r]
      if k_fused.shape[1] != heads:                       # dense maps shared by kv heads
        k_fused = jnp.repeat(k_fused, heads // k_fused.shape[1], axis=1)
      out = _flash(q_rep, _pad_axis(k_fused, 4, width), value_p, q_seg, kv_seg, launch)
    else:
      perm = _pad_axis(reduction.perm, 2, q_len_padded // block_q, mode="edge")
      out = _flash_gather(q_rep, key_p, value_p, perm, q_seg, kv_seg, launch)
  return out[:, :q_len, :, :dv]


class TritonBackend(base.Backend):
  """The Pallas Triton kernels; `interpret=True` runs them in the Pallas interpreter."""

  def __init__(self, interpret: bool = False):
    self.interpret = interpret
    self.name = "triton_interpret" if interpret else "triton"
    self.needs_gpu = not interpret
    self.selectable = not interpret  # the interpreter is for tests: never chosen by None
    self.off_gpu_hint = ("use 'triton_interpret' (alias 'pallas_interpret') to run the "
                         "kernels on a CPU, or 'xla'")

  def supports(self, problem):
    return _supports(problem)

  def __call__(self, query, key, value, reduction, masks, problem):
    return distr_attention_triton(query, key, value, reduction, masks, scale=problem.scale,
                                  interpret=self.interpret)
