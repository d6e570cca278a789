"""The one option list (`DistrConfig`), the normalised masks (`Masks`), and validation.

Everything a user can get wrong is checked here, before any work, with an error that
names the argument and what is allowed. Nothing is silently ignored or changed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from distrattention_jax import grouping as grouping_lib
from distrattention_jax import lsh

REPRESENTATIVES = ("mean", "sample")
# block_q=None is one block per sequence, resolved per call to the smallest
# power of two >= q_len and >= this (any block_q >= q_len is one block; at least 256 so
# every backend takes its one-block layout: Triton's "blocks" needs 256).
SEQUENCE_BLOCK_MIN = 256
FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistrConfig:
  """Static DistrAttention options, the one list of them (hashable: a jit static argument).

  Built by keyword only. `distr_attention`, the Flax layers and the examples take these
  fields by name; `docs/DESIGN.md` section 3 explains each. `implementation` names a
  backend of `distrattention_jax.backends` (None: the first in the registry's preference
  order that supports the call on this platform). `lowrank_per_kv_head` (grouping
  "lowrank" with GQA): one factorisation per kv head, its query heads' Grams pooled, so
  `K_fused` keeps the kv-head count (True, the default), or one per query head.

  Defaults: `grouping="lowrank"` with `block_q=None` (one factorisation per sequence):
  measured the most accurate setting at every block size and the fast layout on our
  Hopper kernels (README "Which setting to use"; the previous default, greedy with
  64-row blocks, was both less accurate and slower than exact cuDNN on a GPU).
  """

  group_size: int = 2
  block_q: int | None = None
  num_projs: int = 16
  representative: str = "mean"
  grouping: str = "lowrank"
  seed: int = 0
  implementation: str | None = None
  lowrank_per_kv_head: bool = True

  @classmethod
  def field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))

  def validate(self, head_dim: int | None = None) -> "DistrConfig":
    _check_power_of_two("group_size", self.group_size)
    if self.block_q is not None:
      _check_power_of_two("block_q", self.block_q)
    if head_dim is not None and head_dim % self.group_size:
      raise ValueError(
          f"group_size={self.group_size} must divide the head dimension d={head_dim}; "
          f"allowed group sizes for d={head_dim}: "
          f"{[g for g in (1, 2, 4, 8, 16, 32, 64) if head_dim % g == 0]}")
    if (not isinstance(self.num_projs, (int, np.integer)) or isinstance(self.num_projs, bool)
        or not 1 <= self.num_projs <= lsh.MAX_NUM_PROJS):
      raise ValueError(
          f"num_projs must be an int in [1, {lsh.MAX_NUM_PROJS}], got {self.num_projs!r}")
    if self.representative not in REPRESENTATIVES:
      raise ValueError(
          f"representative must be one of {REPRESENTATIVES}, got {self.representative!r}")
    groupings = grouping_lib.grouping_names()
    if self.grouping not in groupings:
      raise ValueError(f"grouping must be one of {groupings}, got {self.grouping!r}")
    if not isinstance(self.seed, (int, np.integer)):
      raise ValueError(f"seed must be a Python int, got {type(self.seed).__name__}")
    if not isinstance(self.lowrank_per_kv_head, (bool, np.bool_)):
      raise ValueError(f"lowrank_per_kv_head must be a bool, got {self.lowrank_per_kv_head!r}")
    from distrattention_jax import backends  # pylint: disable=import-outside-toplevel
    if self.implementation is not None and self.implementation not in backends.names():
      raise ValueError(
          f"implementation must be None or one of {backends.names()}, got "
          f"{self.implementation!r}")
    return self

  def for_length(self, q_len: int) -> "DistrConfig":
    """This config with `block_q=None` (one block per sequence) made concrete for a
    sequence of `q_len` query rows (see SEQUENCE_BLOCK_MIN); other configs unchanged."""
    if self.block_q is not None:
      return self
    return dataclasses.replace(self, block_q=sequence_block(q_len))


def sequence_block(q_len: int) -> int:
  """The `block_q` of one block per sequence: a power of two >= q_len, SEQUENCE_BLOCK_MIN."""
  return max(SEQUENCE_BLOCK_MIN, 1 << max(int(q_len) - 1, 0).bit_length())


def _check_power_of_two(name: str, value) -> None:
  if (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1
      or value & (value - 1)):
    raise ValueError(f"{name} must be a power of two (1, 2, 4, 8, ...), got {value!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Masks:
  """Everything that restricts which keys a query attends, normalised.

  A pytree: the arrays are its children and `is_causal` static data, so it passes
  through `jit`, `shard_map` and `custom_vjp` as one argument.

  Attributes:
    is_causal: query i attends key j only if j <= i (top-left aligned, as
      `jax.nn.dot_product_attention`).
    mask: bool, broadcastable to `[batch, heads, q_len, kv_len]` (True = attend), or None.
    q_segment_ids, kv_segment_ids: int32 `[batch, q_len]`, `[batch, kv_len]`: a query
      attends only keys of its own segment; or None.
    q_lengths, kv_lengths: int32 `[batch]`: rows/keys at or past the length are padding;
      or None. Padding query rows produce zeros. Known lengths outside [0, T] are
      rejected; traced ones (under jit) are clipped to [0, T].
  """

  is_causal: bool = dataclasses.field(default=False, metadata=dict(static=True))
  mask: jax.Array | None = None
  q_segment_ids: jax.Array | None = None
  kv_segment_ids: jax.Array | None = None
  q_lengths: jax.Array | None = None
  kv_lengths: jax.Array | None = None

  def query_valid(self, q_len: int) -> jax.Array | None:
    """bool `[batch, q_len]`: False for padding rows (past `q_lengths`), or None."""
    if self.q_lengths is None:
      return None
    return jnp.arange(q_len)[None, :] < self.q_lengths[:, None]

  def key_valid(self, kv_len: int) -> jax.Array | None:
    """bool `[batch, kv_len]`: False for padding keys (past `kv_lengths`), or None."""
    if self.kv_lengths is None:
      return None
    return jnp.arange(kv_len)[None, :] < self.kv_lengths[:, None]

  def dense(self, q_len: int, kv_len: int) -> jax.Array | None:
    """bool `[B|1, H|1, q_len, kv_len]` combining every restriction, or None if none."""
    parts = []
    if self.is_causal:
      parts.append(jnp.tril(jnp.ones((q_len, kv_len), bool))[None, None])
    if self.mask is not None:
      parts.append(self.mask)
    if self.q_segment_ids is not None:
      parts.append(self.q_segment_ids[:, None, :, None] == self.kv_segment_ids[:, None, None, :])
    if self.q_lengths is not None:
      parts.append((jnp.arange(q_len)[None, :] < self.q_lengths[:, None])[:, None, :, None])
    if self.kv_lengths is not None:
      parts.append((jnp.arange(kv_len)[None, :] < self.kv_lengths[:, None])[:, None, None, :])
    if not parts:
      return None
    out = parts[0]
    for p in parts[1:]:
      out = jnp.logical_and(out, p)
    return out


def _concrete(x) -> np.ndarray | None:
  """The values of `x` if known now (not traced under jit), else None."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def _segment_ids_int32(q_seg, kv_seg):
  """int32 segment ids with exactly the equalities of the given ones.

  Ids that fit in int32 (known values, or a dtype of at most 32 bits) are converted
  as they are; other ids (int64 in x64 mode: traced, or beyond int32) are renumbered
  per batch row by their rank among the row's query and key ids.
  """
  if jnp.iinfo(q_seg.dtype).bits <= 32 and jnp.iinfo(kv_seg.dtype).bits <= 32:
    return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)
  int32 = np.iinfo(np.int32)
  known = [_concrete(s) for s in (q_seg, kv_seg)]
  if all(v is not None and (v.size == 0 or (v.min() >= int32.min and v.max() <= int32.max))
         for v in known):
    return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)
  both = jnp.concatenate([q_seg, kv_seg], axis=1)
  order = jnp.argsort(both, axis=1)
  ordered = jnp.take_along_axis(both, order, axis=1)
  new = jnp.concatenate([jnp.zeros_like(ordered[:, :1], dtype=jnp.int32),
                         jnp.cumsum(ordered[:, 1:] != ordered[:, :-1], axis=1,
                                    dtype=jnp.int32)], axis=1)
  ranks = jnp.zeros_like(new).at[jnp.arange(both.shape[0])[:, None], order].set(new)
  return ranks[:, :q_seg.shape[1]], ranks[:, q_seg.shape[1]:]


def validate_inputs(query, key, value, *, scale, is_causal, mask, segment_ids,
                    query_seq_lengths, key_value_seq_lengths) -> Masks:
  """Checks shapes, dtypes and masks of the inputs; returns the normalised `Masks`."""
  for name, x in (("query", query), ("key", key), ("value", value)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise ValueError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != 4:
      raise ValueError(
          f"{name} must have rank 4 [batch, seq_len, heads, head_dim] (BTNH, as "
          f"jax.nn.dot_product_attention), got shape {x.shape}")
    if not any(x.dtype == d for d in FLOAT_DTYPES):
      raise ValueError(
          f"{name} must have a floating dtype (bfloat16, float16, float32, float64), "
          f"got {x.dtype}")
  if not (query.dtype == key.dtype == value.dtype):
    raise ValueError(
        f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, "
        f"{value.dtype}")
  batch, q_len, heads, d = query.shape
  kb, kv_len, kv_heads, kd = key.shape
  if kb != batch or value.shape[0] != batch:
    raise ValueError(
        f"query, key and value must share the batch size, got shapes {query.shape}, "
        f"{key.shape}, {value.shape}")
  if kd != d:
    raise ValueError(f"key's head_dim must equal query's: key {key.shape} vs query {query.shape}")
  if value.shape[1] != kv_len or value.shape[2] != kv_heads:
    raise ValueError(
        f"value must have key's [batch, kv_len, kv_heads], got value {value.shape} vs "
        f"key {key.shape}")
  if q_len < 1 or kv_len < 1 or d < 1 or value.shape[3] < 1:
    raise ValueError(
        f"sequence lengths and head dims must be >= 1, got query {query.shape}, "
        f"key {key.shape}, value {value.shape}")
  if heads % kv_heads:
    raise ValueError(
        f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads}) (GQA)")
  if scale is not None and not isinstance(scale, (int, float, np.floating, np.integer)):
    raise ValueError(f"scale must be a Python number or None, got {type(scale).__name__}")
  if scale is not None and not np.isfinite(scale):
    raise ValueError(f"scale must be a finite number or None, got {scale!r}")
  if not isinstance(is_causal, (bool, np.bool_)):
    raise ValueError(f"is_causal must be a bool, got {is_causal!r}")

  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
      raise ValueError(
          f"mask must be boolean (True = attend), got dtype {mask.dtype}; for an additive "
          "float bias use jax.nn.dot_product_attention")
    if mask.ndim > 4:
      raise ValueError(f"mask must have rank <= 4, got shape {mask.shape}")
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    target = (batch, heads, q_len, kv_len)
    for size, full in zip(mask.shape, target):
      if size not in (1, full):
        raise ValueError(
            f"mask shape {mask.shape} is not broadcastable to [batch, heads, q_len, kv_len]"
            f" = {target}")

  q_seg = kv_seg = None
  if segment_ids is not None:
    if isinstance(segment_ids, (tuple, list)):
      if len(segment_ids) != 2:
        raise ValueError("segment_ids must be an array [batch, seq_len] or a pair "
                         "(q_segment_ids [batch, q_len], kv_segment_ids [batch, kv_len])")
      q_seg, kv_seg = (jnp.asarray(s) for s in segment_ids)
    else:
      q_seg = kv_seg = jnp.asarray(segment_ids)
      if q_len != kv_len:
        raise ValueError(
            f"a single segment_ids array needs q_len == kv_len (got {q_len} and {kv_len}); "
            "pass a pair (q_segment_ids, kv_segment_ids)")
    for name, s, n in (("q_segment_ids", q_seg, q_len), ("kv_segment_ids", kv_seg, kv_len)):
      if s.shape != (batch, n):
        raise ValueError(f"segment_ids: {name} must have shape {(batch, n)}, got {s.shape}")
      if not jnp.issubdtype(s.dtype, jnp.integer):
        raise ValueError(f"segment_ids: {name} must be integer, got {s.dtype}")
    q_seg, kv_seg = _segment_ids_int32(q_seg, kv_seg)

  lengths = []
  for name, lens, n in (("query_seq_lengths", query_seq_lengths, q_len),
                        ("key_value_seq_lengths", key_value_seq_lengths, kv_len)):
    if lens is not None:
      lens = jnp.asarray(lens)
      if lens.shape != (batch,) or not jnp.issubdtype(lens.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array of shape {(batch,)}, got "
                         f"{lens.dtype}{lens.shape}")
      values = _concrete(lens)
      if values is not None and (values.min() < 0 or values.max() > n):
        raise ValueError(f"{name} must lie in [0, {n}] (the sequence length), got "
                         f"{values.tolist()}")
      # Traced lengths cannot be checked: they are clipped to [0, n] (in their own
      # dtype, so int64 values are never wrapped by the int32 conversion).
      lens = jnp.clip(lens, 0, n).astype(jnp.int32)
    lengths.append(lens)

  return Masks(is_causal=bool(is_causal), mask=mask, q_segment_ids=q_seg,
               kv_segment_ids=kv_seg, q_lengths=lengths[0], kv_lengths=lengths[1])
