"""The public function: validate, group the head dimension, dispatch to a backend."""

from __future__ import annotations

import functools
import math

import jax

from distrattention_jax import config as config_lib
from distrattention_jax import cudnn as cudnn_lib
from distrattention_jax import grouping as grouping_lib
from distrattention_jax import sharding as sharding_lib
from distrattention_jax import xla as xla_lib


def _resolve_implementation(implementation, masks: config_lib.Masks, query, value) -> str:
  """The backend to run: the user's choice checked, or the fastest that fits (None).

  None on a GPU picks cuDNN when it takes the options (measured fastest on an H100,
  README "Results"), else our Pallas kernels, else XLA; off a GPU, XLA.
  """
  if implementation is not None and implementation not in config_lib.IMPLEMENTATIONS:
    raise ValueError(
        f"implementation must be None or one of {config_lib.IMPLEMENTATIONS}, got "
        f"{implementation!r}")
  dtype, head_dim, value_dim = query.dtype, query.shape[-1], value.shape[-1]
  gpu = jax.default_backend() == "gpu"
  if implementation is None:
    if gpu and cudnn_lib.supports(masks, dtype, head_dim, value_dim) is None:
      return "cudnn"
    from pallas_kernels import ops as pallas_ops  # pylint: disable=import-outside-toplevel
    if gpu and pallas_ops.supports(masks, dtype) is None:
      return "pallas"
    return "xla"
  if implementation == "cudnn":
    reason = cudnn_lib.supports(masks, dtype, head_dim, value_dim)
    if reason is not None:
      raise NotImplementedError(
          f"implementation='cudnn' does not support {reason}; use implementation="
          "'pallas' or 'xla' (or None to choose automatically)")
    if not gpu:
      raise ValueError(
          "implementation='cudnn' needs a GPU backend (jax.default_backend() is "
          f"{jax.default_backend()!r}); use 'xla' or 'pallas_interpret' on a CPU")
  if implementation in ("pallas", "pallas_interpret"):
    from pallas_kernels import ops as pallas_ops  # pylint: disable=import-outside-toplevel
    reason = pallas_ops.supports(masks, dtype)
    if reason is not None:
      raise NotImplementedError(
          f"implementation={implementation!r} does not support {reason}; use "
          "implementation='xla' (or None to choose automatically)")
    if implementation == "pallas" and not gpu:
      raise ValueError(
          "implementation='pallas' needs a GPU backend (jax.default_backend() is "
          f"{jax.default_backend()!r}); use 'pallas_interpret' to run the kernels on a "
          "CPU, or 'xla'")
  return implementation


def distr_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    group_size: int = 2,
    block_q: int = 64,
    num_projs: int = 16,
    representative: str = "mean",
    grouping: str = "greedy",
    seed: int = 0,
    scale: float | None = None,
    is_causal: bool = False,
    mask: jax.Array | None = None,
    segment_ids=None,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    implementation: str | None = None,
    sharding: jax.sharding.NamedSharding | None = None,
) -> jax.Array:
  """DistrAttention: softmax attention with `Q K^T` contracted over `d / group_size`.

  Per block of `block_q` query rows, the `d` head-dim columns are grouped (by LSH by
  default); each group keeps one representative column of Q and the sum of its K
  columns, so scores cost `d / group_size` instead of `d` per key while every key is
  still attended and V is used in full. `group_size=1` is exact attention.

  Args:
    query: `[batch, q_len, heads, d]`.
    key: `[batch, kv_len, kv_heads, d]`; `heads % kv_heads == 0` (GQA/MQA).
    value: `[batch, kv_len, kv_heads, dv]`.
    group_size: columns per group G, a power of two dividing d (1 = exact).
    block_q: query rows sharing one grouping, a power of two; smaller is more accurate.
      The last block may be short; a block_q >= q_len gives one grouping per sequence.
    num_projs: LSH projections (bits of the hash), 1..30.
    representative: "mean" (mean of the group's Q columns) or "sample" (its first
      column, as in the paper).
    grouping: "greedy" (default: exact column distances within the block; lower output
      error than LSH in every setting measured, and on a GPU at LSH's cost for blocks of
      1024+ rows, README "Accuracy"), "lsh" (the paper's angular LSH) or "random" (a
      control).
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
    implementation: None (fastest available: on a GPU "cudnn" when it supports the
      options, else "pallas"; "xla" elsewhere), "xla", "cudnn" (the grouping in XLA,
      attention in cuDNN's fused kernels; with one grouping per sequence the score
      product is d/G wide), "pallas" (our Triton kernels, GPU) or "pallas_interpret"
      (the same kernels in the Pallas interpreter, any backend).
    sharding: how `query` is sharded, a `NamedSharding` over its BTNH axes. Batch and
      head axes may be sharded (key/value alike, over their kv heads): the computation
      then runs per shard under `jax.shard_map`, with no all-gather of q/k/v. Sharding
      the sequence or head_dim axis raises NotImplementedError. Without it, a query
      whose type carries a sharding (Explicit mesh axes) is run per shard the same way;
      under Auto axes the "xla" path partitions along batch and heads by itself, but
      sharded inputs to a Pallas kernel would be gathered onto every device by XLA.

  Returns:
    `[batch, q_len, heads, dv]` in the input dtype. Rows with no key to attend are 0.
  """
  masks = config_lib.validate_inputs(
      query, key, value, scale=scale, is_causal=is_causal, mask=mask,
      segment_ids=segment_ids, query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths)
  cfg = config_lib.DistrConfig(group_size, block_q, num_projs, representative, grouping,
                               seed).validate(query.shape[-1])
  implementation = _resolve_implementation(implementation, masks, query, value)
  scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
  run = functools.partial(_distr_attention, cfg=cfg, implementation=implementation,
                          scale=scale, is_causal=masks.is_causal)
  arrays = (query, key, value, masks.mask, masks.q_segment_ids, masks.kv_segment_ids,
            masks.q_lengths, masks.kv_lengths)
  if sharding is None:
    sharding = sharding_lib.explicit_sharding(query)  # explicit sharding in the type
  if sharding is None:
    return run(*arrays)
  return sharding_lib.shard_over_batch_and_heads(run, sharding, arrays)


def _distr_attention(query, key, value, mask, q_segment_ids, kv_segment_ids, q_lengths,
                     kv_lengths, *, cfg, implementation, scale, is_causal):
  """Everything after validation, on whole arrays or on one shard of them."""
  masks = config_lib.Masks(is_causal=is_causal, mask=mask, q_segment_ids=q_segment_ids,
                           kv_segment_ids=kv_segment_ids, q_lengths=q_lengths,
                           kv_lengths=kv_lengths)
  q_len, kv_len = query.shape[1], key.shape[1]
  perm = None
  if cfg.group_size > 1:
    perm = grouping_lib.block_permutations(
        query, block_q=cfg.block_q, group_size=cfg.group_size, grouping=cfg.grouping,
        num_projs=cfg.num_projs, seed=cfg.seed, query_valid=masks.query_valid(q_len))

  if implementation == "xla":
    return xla_lib.distr_attention_xla(
        query, key, value, perm, group_size=cfg.group_size, block_q=cfg.block_q,
        representative=cfg.representative, scale=scale,
        allowed=masks.dense(q_len, kv_len))
  if implementation == "cudnn":
    return cudnn_lib.distr_attention_cudnn(
        query, key, value, perm, masks, group_size=cfg.group_size, block_q=cfg.block_q,
        representative=cfg.representative, scale=scale)
  from pallas_kernels import ops as pallas_ops  # pylint: disable=import-outside-toplevel
  return pallas_ops.distr_attention_pallas(
      query, key, value, perm, masks, group_size=cfg.group_size, block_q=cfg.block_q,
      representative=cfg.representative, scale=scale,
      interpret=implementation == "pallas_interpret")
