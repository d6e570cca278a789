"""Pure-jnp oracles: exact attention and a direct transcription of DistrAttention.

These are written for clarity, not speed, and compute in float32 (float64 stays
float64) whatever the input dtype; the result has the input dtype. Every other
implementation is tested against them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from distrattention_jax import config as config_lib
from distrattention_jax import grouping as grouping_lib


def _compute_dtype(dtype):
  return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _softmax_times_values(scores, value, allowed):
  """softmax(scores) @ value over keys where `allowed`; rows with no key give 0.

  scores: [B, H, Tq, Tk]; value: [B, Tk, H, dv]; allowed: bool broadcastable or None.
  """
  if allowed is not None:
    scores = jnp.where(allowed, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # fully masked row
  weights = jnp.exp(scores - row_max)
  if allowed is not None:
    weights = jnp.where(allowed, weights, 0.0)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(denom == 0, 1.0, denom)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, value, precision=jax.lax.Precision.HIGHEST)


def _repeat_kv(x, heads):
  """GQA: [B, T, kv_heads, d] -> [B, T, heads, d], each kv head serving heads/kv_heads."""
  return jnp.repeat(x, heads // x.shape[2], axis=2)


def exact_attention(query, key, value, *, scale=None, is_causal=False, mask=None,
                    segment_ids=None, query_seq_lengths=None, key_value_seq_lengths=None):
  """Exact softmax attention, `[B, Tq, H, d] x [B, Tk, Hkv, d] x [B, Tk, Hkv, dv] -> [B, Tq, H, dv]`.

  Same layout and mask conventions as `distr_attention`; rows with no allowed key give 0.
  """
  masks = config_lib.validate_inputs(
      query, key, value, scale=scale, is_causal=is_causal, mask=mask,
      segment_ids=segment_ids, query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths)
  ct = _compute_dtype(query.dtype)
  batch, q_len, heads, d = query.shape
  kv_len = key.shape[1]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  q = query.astype(ct)
  k = _repeat_kv(key.astype(ct), heads)
  v = _repeat_kv(value.astype(ct), heads)
  scores = scale * jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=jax.lax.Precision.HIGHEST)
  out = _softmax_times_values(scores, v, masks.dense(q_len, kv_len))
  return out.astype(query.dtype)


def lowrank_maps_reference(query, key, *, block_q, group_size, query_valid=None,
                           key_valid=None, per_kv_head=False):
  """The best rank-(d/G) maps, transcribed from the formula (DESIGN.md "Beyond grouping").

  Per (batch, head, block): Grams of the block's real rows and the real keys, their
  square roots `G = R^T R` (eigh), the SVD `Rq Rk^T = X Sig Y^T`, then
  `A = Rk^T Y_r Sig_r^(-1/2)`, `B = Rq^T X_r Sig_r^(-1/2)` with singular values below
  1e-4 of the largest dropped. With `per_kv_head`, one factorisation per kv head from
  the summed query Grams of its heads (K' keeps the kv-head count). Independent of
  `distrattention_jax.lowrank` (which the tests compare against this). Returns
  `(q_map [B, H, nb, d, r], k_map [B, Hk, nb, d, r])` in the compute dtype, constant
  for differentiation.
  """
  ct = _compute_dtype(query.dtype)
  hi = jax.lax.Precision.HIGHEST
  batch, q_len, heads, d = query.shape
  kv_heads = key.shape[2]
  rank = d // group_size
  rows = min(block_q, q_len)
  num_blocks = -(-q_len // block_q)
  q = jax.lax.stop_gradient(query).astype(ct)
  k = jax.lax.stop_gradient(key).astype(ct)
  if query_valid is not None:
    q = jnp.where(query_valid[:, :, None, None], q, 0)
  if key_valid is not None:
    k = jnp.where(key_valid[:, :, None, None], k, 0)
  q = jnp.pad(q, ((0, 0), (0, num_blocks * rows - q_len), (0, 0), (0, 0)))
  q = q.reshape(batch, num_blocks, rows, heads, d)
  gq = jnp.einsum("bnihc,bnihe->bhnce", q, q, precision=hi)          # [B, H, nb, d, d]
  gk = jnp.einsum("bshc,bshe->bhce", k, k, precision=hi)             # [B, Hkv, d, d]
  if per_kv_head:
    gq = gq.reshape(batch, kv_heads, heads // kv_heads, num_blocks, d, d).sum(2)
  else:
    gk = jnp.repeat(gk, heads // kv_heads, axis=1)
  gk = jnp.broadcast_to(gk[:, :, None], gq.shape)

  def root(g):  # R with R^T R = g
    lam, u = jnp.linalg.eigh(g)
    return jnp.sqrt(jnp.clip(lam, 0))[..., :, None] * jnp.swapaxes(u, -1, -2)

  rq, rk = root(gq), root(gk)
  x, sig, yt = jnp.linalg.svd(jnp.matmul(rq, jnp.swapaxes(rk, -1, -2), precision=hi))
  x, sig, y = x[..., :rank], sig[..., :rank], jnp.swapaxes(yt, -1, -2)[..., :rank]
  kept = sig > 1e-4 * sig[..., :1]
  w = jnp.where(kept, 1.0 / jnp.sqrt(jnp.where(kept, sig, 1.0)), 0.0)[..., None, :]
  a = jnp.matmul(jnp.swapaxes(rk, -1, -2), y, precision=hi) * w   # A = Rk^T Y_r Sig^-1/2
  b = jnp.matmul(jnp.swapaxes(rq, -1, -2), x, precision=hi) * w   # B = Rq^T X_r Sig^-1/2
  if per_kv_head:
    a = jnp.repeat(a, heads // kv_heads, axis=1)
  return jax.lax.stop_gradient(a), jax.lax.stop_gradient(b)


def _lowrank_reference(query, key, value, masks, *, group_size, block_q, scale,
                       lowrank_maps, per_kv_head):
  """grouping="lowrank": scores = scale (Q_b A)(K B)^T per block, masked softmax, V."""
  ct = _compute_dtype(query.dtype)
  hi = jax.lax.Precision.HIGHEST
  batch, q_len, heads, d = query.shape
  kv_len = key.shape[1]
  rows = min(block_q, q_len)
  num_blocks = -(-q_len // block_q)
  if lowrank_maps is None:
    kv_valid = (None if masks.kv_lengths is None else
                jnp.arange(kv_len)[None, :] < masks.kv_lengths[:, None])
    lowrank_maps = lowrank_maps_reference(
        query, key, block_q=block_q, group_size=group_size,
        query_valid=masks.query_valid(q_len), key_valid=kv_valid, per_kv_head=per_kv_head)
  a, b = (jax.lax.stop_gradient(jnp.asarray(m)).astype(ct) for m in lowrank_maps)
  if a.ndim == 3:  # fixed maps [H, d, r], [Hk, d, r]: the same for every row and block
    a = jnp.broadcast_to(a[None, :, None], (batch, heads, num_blocks) + a.shape[1:])
    b = jnp.broadcast_to(b[None, :, None], (batch, b.shape[0], num_blocks) + b.shape[1:])
  assert a.shape[:3] == (batch, heads, num_blocks) and b.shape[0] == batch, (a.shape, b.shape)
  b = jnp.repeat(b, heads // b.shape[1], axis=1)       # K' of a kv head serves its group
  q = jnp.transpose(query.astype(ct), (0, 2, 1, 3))     # [B, H, Tq, d]
  q = jnp.pad(q, ((0, 0), (0, 0), (0, num_blocks * rows - q_len), (0, 0)))
  q_blocks = q.reshape(batch, heads, num_blocks, rows, d)
  k = jnp.transpose(_repeat_kv(key.astype(ct), heads), (0, 2, 1, 3))  # [B, H, Tk, d]
  q_narrow = jnp.einsum("bhnid,bhndr->bhnir", q_blocks, a, precision=hi)   # Q' = Q_b A
  k_narrow = jnp.einsum("bhkd,bhndr->bhnkr", k, b, precision=hi)           # K' = K B
  scores = scale * jnp.einsum("bhnir,bhnkr->bhnik", q_narrow, k_narrow, precision=hi)
  scores = scores.reshape(batch, heads, num_blocks * rows, kv_len)[:, :, :q_len]
  v = _repeat_kv(value.astype(ct), heads)
  out = _softmax_times_values(scores, v, masks.dense(q_len, kv_len))
  return out.astype(query.dtype)


def distr_attention_reference(
    query, key, value, *, group_size=2, block_q=None, num_projs=16, representative="mean",
    grouping="lowrank", seed=0, scale=None, is_causal=False, mask=None, segment_ids=None,
    query_seq_lengths=None, key_value_seq_lengths=None, perm=None, lowrank_maps=None,
    lowrank_per_kv_head=True):
  """DistrAttention, transcribed step by step from docs/DESIGN.md section 1.

  Args:
    query, key, value: `[B, Tq, H, d]`, `[B, Tk, Hkv, d]`, `[B, Tk, Hkv, dv]`.
    perm: optional int `[B, H, ceil(Tq / block_q), d]` column permutations; by default
      they are computed by `grouping.block_permutations` (the greedy grouping's Pallas
      kernel when JAX's default backend is a GPU, as GPU backends of `distr_attention`
      do).
    grouping: as `distr_attention`, or "lowrank": the best rank-(d/G) factorisation of
      each block's scores (`lowrank_maps_reference`), then `scale (Q_b A)(K B)^T`,
      masked softmax, V.
    lowrank_maps: optional fixed maps for "lowrank": `(q_map [H, d, r], k_map [Hk, d, r])`
      (held for every row, e.g. from `lowrank.calibrate_lowrank_maps`) or per block
      `([B, H, nb, d, r], [B, Hk, nb, d, r])`; constants for differentiation.
    lowrank_per_kv_head: "lowrank" with GQA: one factorisation per kv head (default, as
      `distr_attention`) or per query head.
    Other arguments as `distr_attention`.

  Returns:
    `[B, Tq, H, dv]` in the input dtype.
  """
  masks = config_lib.validate_inputs(
      query, key, value, scale=scale, is_causal=is_causal, mask=mask,
      segment_ids=segment_ids, query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths)
  lowrank = grouping == "lowrank"
  if lowrank and perm is not None:
    raise ValueError("perm (column permutations) belongs to the permutation groupings "
                     "(greedy, lsh, random); grouping='lowrank' takes lowrank_maps")
  block_q = config_lib.DistrConfig(
      group_size=group_size, block_q=block_q, num_projs=num_projs,
      representative=representative, grouping=grouping,
      seed=seed).validate(query.shape[-1]).for_length(query.shape[1]).block_q
  ct = _compute_dtype(query.dtype)
  batch, q_len, heads, d = query.shape
  kv_len = key.shape[1]
  num_groups = d // group_size
  scale = 1.0 / math.sqrt(d) if scale is None else scale  # full d: Qrep Kf^T estimates Q K^T
  if lowrank:
    return _lowrank_reference(query, key, value, masks, group_size=group_size,
                              block_q=block_q, scale=scale, lowrank_maps=lowrank_maps,
                              per_kv_head=lowrank_per_kv_head)
  if perm is None:
    perm = grouping_lib.block_permutations(
        query, block_q=block_q, group_size=group_size, grouping=grouping,
        num_projs=num_projs, seed=seed, query_valid=masks.query_valid(q_len))

  # Step 1: row blocks of block_q query rows (the last may be short; pad it with zeros).
  rows = min(block_q, q_len)
  num_blocks = -(-q_len // block_q)
  assert perm.shape == (batch, heads, num_blocks, d), perm.shape
  q = jnp.transpose(query.astype(ct), (0, 2, 1, 3))  # [B, H, Tq, d]
  q = jnp.pad(q, ((0, 0), (0, 0), (0, num_blocks * rows - q_len), (0, 0)))
  q_blocks = q.reshape(batch, heads, num_blocks, rows, d)
  k = jnp.transpose(_repeat_kv(key.astype(ct), heads), (0, 2, 1, 3))  # [B, H, Tk, d]

  # Steps 2-3 gave `perm`; consecutive runs of G entries are the groups.
  # Step 4: gather each block's columns in group order, then sample or average Q's
  # members and sum K's members.
  q_sorted = jnp.take_along_axis(q_blocks, perm[:, :, :, None, :], axis=-1)
  q_sorted = q_sorted.reshape(batch, heads, num_blocks, rows, num_groups, group_size)
  if representative == "sample":
    q_rep = q_sorted[..., 0]
  else:
    q_rep = jnp.mean(q_sorted, axis=-1)
  k_sorted = jnp.take_along_axis(k[:, :, None], perm[:, :, :, None, :], axis=-1)
  k_fused = k_sorted.reshape(batch, heads, num_blocks, kv_len, num_groups, group_size).sum(-1)
  scores = scale * jnp.einsum("bhnrg,bhnkg->bhnrk", q_rep, k_fused,
                              precision=jax.lax.Precision.HIGHEST)
  scores = scores.reshape(batch, heads, num_blocks * rows, kv_len)[:, :, :q_len]

  # Step 5: ordinary masked softmax times the full V.
  v = _repeat_kv(value.astype(ct), heads)
  out = _softmax_times_values(scores, v, masks.dense(q_len, kv_len))
  return out.astype(query.dtype)
