"""The "xla" backend: plain jnp, any platform, differentiable by autodiff.

It uses the identity of docs/DESIGN.md section 1: DistrAttention(Q, K, V) is exact
attention on `(Q_exp, K, V)`, where `Q_exp = Q q_map k_map^T` (for a permutation, each
group's representative in every column of the group). Scores are materialised
(`[B, H, Tq, Tk]`), so this path is for CPUs, short sequences and options the kernels
do not cover. It supports every option and runs no Pallas code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distrattention_jax.backends import base


def attention(query, key, value, allowed, scale):
  """Exact attention, GQA without copying K/V; rows with no allowed key give 0.

  query `[B, Tq, H, d]`, key `[B, Tk, Hkv, d]`, value `[B, Tk, Hkv, dv]`,
  allowed: bool broadcastable to `[B, H, Tq, Tk]` or None.
  """
  batch, q_len, heads, d = query.shape
  kv_heads = key.shape[2]
  precision = jax.lax.Precision.HIGHEST if query.dtype in (jnp.float32, jnp.float64) else None
  acc = jnp.float64 if query.dtype == jnp.float64 else jnp.float32
  q = query.reshape(batch, q_len, kv_heads, heads // kv_heads, d)
  scores = jnp.einsum("bqkrd,bskd->bkrqs", q, key, precision=precision,
                      preferred_element_type=acc) * scale
  scores = scores.reshape(batch, heads, q_len, key.shape[1])
  if allowed is not None:
    scores = jnp.where(allowed, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  weights = jnp.exp(scores - row_max)
  if allowed is not None:
    weights = jnp.where(allowed, weights, 0.0)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(denom == 0, 1.0, denom)
  probs = probs.reshape(batch, kv_heads, heads // kv_heads, q_len, key.shape[1])
  out = jnp.einsum("bkrqs,bskd->bqkrd", probs.astype(value.dtype), value,
                   precision=precision, preferred_element_type=acc)
  return out.reshape(batch, q_len, heads, value.shape[-1]).astype(query.dtype)


class XlaBackend(base.Backend):
  """DistrAttention through `Q_exp` (exact attention for group_size 1)."""

  name = "xla"

  def __call__(self, query, key, value, reduction, masks, problem):
    if reduction is not None:
      query = reduction.q_exp(query)
    return attention(query, key, value, masks.dense(query.shape[1], key.shape[1]),
                     problem.scale)
