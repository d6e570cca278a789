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
from pallas_kernels.mosaic_gpu.tiles import Tiles, pick_tiles


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


@functools.partial(jax.jit, static_argnames=("causal", "kv_len", "tiles"))
def forward(q, k, v, *, causal: bool, kv_len: int | None = None, tiles: Tiles | None = None):
  """(out [B, Tq, H, dv], lse [B, H, Tq] float32, natural log)."""
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
  out, lse = forward_call(qp, kp, vp, causal=causal, kv_len=keys, tiles=tiles)
  return out[:, :q_len], lse[:, :, :q_len]


@functools.partial(jax.jit, static_argnames=("causal", "kv_len", "tiles"))
def backward(q, k, v, out, lse, d_out, *, causal: bool, kv_len: int | None = None,
             tiles: Tiles | None = None):
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
                       tiles=tiles, dq_acc=dq_acc)
    dq = dq_acc[...][:, :q_len].astype(q.dtype)
  else:
    dq = dq_call(qp, kp, vp, dop, lsep, deltap, causal=causal, kv_len=keys, tiles=tiles)
    dk, dvv = dkv_call(qp, kp, vp, dop, lsep, deltap, causal=causal, kv_len=keys,
                       tiles=tiles)
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q, k, v, causal, kv_len, tiles):
  return forward(q, k, v, causal=causal, kv_len=kv_len, tiles=tiles)[0]


def _attention_fwd(q, k, v, causal, kv_len, tiles):
  out, lse = forward(q, k, v, causal=causal, kv_len=kv_len, tiles=tiles)
  return out, (q, k, v, out, lse)


def _attention_bwd(causal, kv_len, tiles, residuals, d_out):
  q, k, v, out, lse = residuals
  return backward(q, k, v, out, lse, d_out, causal=causal, kv_len=kv_len, tiles=tiles)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, *, causal: bool = False, kv_len: int | None = None,
              tiles: Tiles | None = None):
  """softmax(q k^T [+ causal mask]) v with our Hopper kernels; differentiable.

  q [B, Tq, H, r] with the softmax scale folded in; k [B, Tk, Hk, r]; v [B, Tk, Hv, dv].
  `kv_len` (static): keys at positions >= kv_len are ignored (their gradients are 0).
  """
  return _attention(q, k, v, causal, kv_len, tiles)
