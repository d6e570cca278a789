"""The public function: validate, group the head dimension, select a backend, call it."""

from __future__ import annotations

import functools

import jax

from distrattention_jax import backends
from distrattention_jax import config as config_lib
from distrattention_jax import grouping as grouping_lib
from distrattention_jax import lowrank
from distrattention_jax import sharding as sharding_lib


def distr_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    group_size: int = 2,
    block_q: int | None = None,
    num_projs: int = 16,
    representative: str = "mean",
    grouping: str = "lowrank",
    seed: int = 0,
    scale: float | None = None,
    is_causal: bool = False,
    mask: jax.Array | None = None,
    segment_ids=None,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    implementation: str | None = None,
    sharding: jax.sharding.NamedSharding | None = None,
    lowrank_per_kv_head: bool = True,
    lowrank_maps=None,
) -> jax.Array:
  """DistrAttention: softmax attention with `Q K^T` contracted over `d / group_size`.

  Per block of `block_q` query rows, the `d` head-dim columns are reduced to
  `d / group_size`: by default by the best rank-(d/G) factorisation of the block's scores
  (grouping "lowrank", one block per sequence); with a grouping (the paper's LSH, or
  "greedy" by exact column distance) each group keeps one representative column of Q and
  the sum of its K columns. Scores cost `d / group_size` instead of `d` per key while
  every key is still attended and V is used in full. `group_size=1` is exact attention.

  Args:
    query: `[batch, q_len, heads, d]`.
    key: `[batch, kv_len, kv_heads, d]`; `heads % kv_heads == 0` (GQA/MQA).
    value: `[batch, kv_len, kv_heads, dv]`.
    group_size: columns per group G, a power of two dividing d (1 = exact).
    block_q: query rows sharing one grouping (or factorisation), a power of two, or None
      (the default): one per sequence, the fast layout on our Hopper kernels. The last
      block may be short; any block_q >= q_len is one per sequence. Smaller blocks are
      more accurate and slower (dense per-block maps make "lowrank" with small blocks
      slower than exact attention).
    num_projs: LSH projections (bits of the hash), 1..30.
    representative: "mean" (mean of the group's Q columns) or "sample" (its first
      column, as in the paper).
    grouping: "lowrank" (default): not a grouping but the best rank-(d/G) factorisation
      of each block's scores, `(Q A)(K B)^T` with A, B `[d, d/G]` fitted per (batch,
      head, block) to the block's real rows and the real keys
      (`distrattention_jax.lowrank`; the most accurate setting in every measurement,
      README "Accuracy"); "greedy" (exact column distances within the block; lower
      output error than LSH in every setting measured), "lsh" (the paper's angular LSH)
      or "random" (a control). Like the paper's per-block grouping, fitted maps look at
      every row of the block: with `is_causal` a query's output can depend on later
      tokens through A and B. For autoregressive models pass fixed `lowrank_maps`.
    seed: seed of the LSH projections (or of the random grouping).
    scale: score scale, default `1 / sqrt(d)`.
    is_causal: query i attends keys j <= i (top-left aligned, as jax.nn).
    mask: bool, broadcastable to `[batch, heads, q_len, kv_len]`, True = attend.
    segment_ids: int `[batch, seq_len]` (self-attention) or a pair
      `(q_segment_ids [batch, q_len], kv_segment_ids [batch, kv_len])`; queries attend
      keys of their own segment only.
    query_seq_lengths, key_value_seq_lengths: int `[batch]`; positions at or past the
      length are padding (padding query rows return 0 and do not affect the grouping).
      Known lengths must lie in [0, seq_len]; traced ones (under jit) are clipped to it.
    implementation: None (the first backend of `backends.REGISTRY`, in preference order,
      that supports the options on this platform and is preferred for them: on a Hopper
      GPU "mosaic" for group_size > 1, else "cudnn", else "triton"; "xla" elsewhere),
      "mosaic" (our Pallas Mosaic GPU kernels, Hopper: a d/G-wide score product in a
      warp-specialised kernel), "xla", "cudnn" (the grouping in XLA, attention in
      cuDNN's fused kernels; with one grouping per sequence the score product is d/G
      wide), "triton" (our Pallas Triton kernels, GPU) or "triton_interpret" (the same
      kernels in the Pallas interpreter, any platform). "pallas" and "pallas_interpret"
      are aliases of "triton" and "triton_interpret". "xla" runs no Pallas code (greedy
      grouping included).
    sharding: how `query` is sharded, a `NamedSharding` over its BTNH axes. Batch and
      head axes may be sharded (key/value alike, over their kv heads): the computation
      then runs per shard under `jax.shard_map`, with no all-gather of q/k/v. Sharding
      the sequence or head_dim axis raises NotImplementedError. Without it, a query
      whose type carries a sharding (Explicit mesh axes) is run per shard the same way;
      under Auto axes the "xla" path partitions along batch and heads by itself, but
      sharded inputs to a Pallas kernel would be gathered onto every device by XLA.
    lowrank_per_kv_head: grouping "lowrank" with GQA: one factorisation per kv head (its
      query heads' Grams pooled; K_fused keeps the kv-head count; default) or, False,
      one per query head (a little more accurate, K_fused with one head per query head).
    lowrank_maps: grouping "lowrank" with maps held fixed instead of fitted per call:
      `(q_map [H, d, r], k_map [Hk, d, r])` (Hk = H or kv_heads; e.g. from
      `lowrank.calibrate_lowrank_maps` on a calibration batch: then no output depends on
      a later token, the causal-safe choice), or per block `([B, H, nb, d, r],
      [B, Hk, nb, d, r])` (e.g. `lowrank.causal_prefix_maps`). Constants for gradients.

  Returns:
    `[batch, q_len, heads, dv]` in the input dtype. Rows with no key to attend are 0.
  """
  masks = config_lib.validate_inputs(
      query, key, value, scale=scale, is_causal=is_causal, mask=mask,
      segment_ids=segment_ids, query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths)
  cfg = config_lib.DistrConfig(
      group_size=group_size, block_q=block_q, num_projs=num_projs,
      representative=representative, grouping=grouping, seed=seed,
      implementation=implementation,
      lowrank_per_kv_head=lowrank_per_kv_head).validate(query.shape[-1])
  problem = backends.Problem.from_call(query, key, value, masks, cfg, scale)
  cfg = problem.config  # block_q=None resolved there: one block per sequence
  backend = backends.select(cfg.implementation, problem)
  if lowrank_maps is not None:
    lowrank_maps = _check_lowrank_maps(lowrank_maps, cfg, query, key, sharding)
  run = functools.partial(_distr_attention, backend=backend, problem=problem,
                          lowrank_maps=lowrank_maps)
  if sharding is None:
    sharding = sharding_lib.explicit_sharding(query)  # explicit sharding in the type
  if sharding is None:
    return run(query, key, value, masks)
  return sharding_lib.shard_over_batch_and_heads(run, sharding, query, key, value, masks)


def _check_lowrank_maps(maps, cfg, query, key, sharding):
  """Fixed lowrank maps, checked and expanded to `[B, H, nb, d, r]`, `[B, Hk, nb, d, r]`."""
  if cfg.grouping != "lowrank" or cfg.group_size == 1:
    raise ValueError(f"lowrank_maps needs grouping='lowrank' and group_size > 1, got "
                     f"grouping={cfg.grouping!r}, group_size={cfg.group_size}")
  if sharding is not None:
    raise NotImplementedError("lowrank_maps with sharding (shard the maps' heads with the "
                              "query's yourself, or call without sharding=)")
  if not isinstance(maps, (tuple, list)) or len(maps) != 2:
    raise ValueError("lowrank_maps must be a pair (q_map, k_map)")
  batch, q_len, heads, d = query.shape
  kv_heads, rank = key.shape[2], d // cfg.group_size
  nb = -(-q_len // cfg.block_q)
  q_map, k_map = lowrank.broadcast_maps(maps, batch, nb)
  hk = k_map.shape[1]
  if (q_map.shape != (batch, heads, nb, d, rank) or k_map.shape != (batch, hk, nb, d, rank)
      or heads % hk or hk % kv_heads):
    raise ValueError(
        f"lowrank_maps must be ([H, d, r], [Hk, d, r]) or ([B, H, nb, d, r], "
        f"[B, Hk, nb, d, r]) with H={heads}, Hk in ({heads}, {kv_heads}) (or between), "
        f"d={d}, r=d/group_size={rank}, B={batch}, nb={nb}; got {tuple(maps[0].shape)}, "
        f"{tuple(maps[1].shape)}")
  return jax.lax.stop_gradient(q_map), jax.lax.stop_gradient(k_map)


def _distr_attention(query, key, value, masks, *, backend, problem, lowrank_maps=None):
  """Everything after validation, on whole arrays or on one shard of them."""
  if lowrank_maps is not None:
    reduction = grouping_lib.HeadReduction.from_maps(*lowrank_maps,
                                                     block_q=problem.config.block_q)
  else:
    reduction = grouping_lib.reduce_heads(
        query, key, problem.config, query_valid=masks.query_valid(query.shape[1]),
        key_valid=masks.key_valid(key.shape[1]), use_kernel=backend.uses_grouping_kernel,
        parts_scale=problem.scale if backend.takes_map_parts else None)
  return backend(query, key, value, reduction, masks, problem)
