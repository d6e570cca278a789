"""Flax integration: an `attention_fn` and drop-in multi-head attention modules.

    attn = DistrMultiHeadDotProductAttention(num_heads=8, group_size=2)     # linen
    attn = DistrMultiHeadAttention(8, 512, group_size=2, rngs=nnx.Rngs(0))  # NNX

Both subclass Flax's own modules and only replace `attention_fn`, so their parameter
trees are identical to Flax's and checkpoints load unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from distrattention_jax import attention as attention_lib
from distrattention_jax import config as config_lib

# Keyword arguments Flax passes that change nothing here when left at their defaults.
_IGNORED_IF_NONE = ("qk_attn_weights_einsum", "attn_weights_value_einsum",
                    "einsum_dot_general")


def make_attention_fn(*, group_size: int = 2, block_q: int = 64, num_projs: int = 16,
                      representative: str = "mean", grouping: str = "greedy", seed: int = 0,
                      implementation: str | None = None, is_causal: bool = False,
                      sharding: jax.sharding.NamedSharding | None = None):
  """An `attention_fn` for `nn.MultiHeadDotProductAttention` / `nnx.MultiHeadAttention`.

  The returned function takes Flax's arguments (`query [batch..., q_len, heads, d]`,
  key, value, `mask [batch..., heads|1, q_len, kv_len]`, dropout and dtype options) and
  runs `distr_attention` with the options given here. `is_causal=True` applies a causal
  mask without materialising it (so the Pallas kernels can run); Flax masks are dense
  and go through the XLA path when `implementation=None`. Attention dropout in training
  mode, an additive `bias` and sowing attention weights raise NotImplementedError
  (DistrAttention never forms the weights).
  """
  config_lib.DistrConfig(group_size, block_q, num_projs, representative, grouping,
                         seed).validate()
  options = dict(group_size=group_size, block_q=block_q, num_projs=num_projs,
                 representative=representative, grouping=grouping, seed=seed,
                 implementation=implementation, sharding=sharding)

  def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                   dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                   precision=None, module=None, force_fp32_for_softmax=False, **kwargs):
    # Softmax is always float32 and the kernels fix their own matmul precision, so
    # `precision` and `force_fp32_for_softmax` are honoured as they are; dropout is
    # checked below.
    del broadcast_dropout, dropout_rng, precision, force_fp32_for_softmax
    # NNX always passes is_causal: pop it first (an `or` would skip the pop).
    causal = bool(kwargs.pop("is_causal", False)) or is_causal
    for name in _IGNORED_IF_NONE:
      if kwargs.pop(name, None) is not None:
        raise NotImplementedError(f"DistrAttention's attention_fn does not take {name}")
    if kwargs:
      raise NotImplementedError(f"DistrAttention's attention_fn got unsupported "
                                f"arguments {sorted(kwargs)}")
    if bias is not None:
      raise NotImplementedError("DistrAttention does not support an additive attention "
                                "bias; use a boolean mask")
    if dropout_rate > 0.0 and not deterministic:
      raise NotImplementedError(
          f"DistrAttention does not implement attention dropout (dropout_rate="
          f"{dropout_rate} in training mode); set dropout_rate=0 or deterministic=True")
    if module is not None:
      raise NotImplementedError("DistrAttention never forms attention weights, so they "
                                "cannot be sown (sow_weights=True)")
    if dtype is not None:
      query, key, value = (x.astype(dtype) for x in (query, key, value))
    # Flax allows any number of leading batch dims: fold them into one.
    batch_dims = query.shape[:-3]
    q = query.reshape((-1,) + query.shape[-3:])
    k = key.reshape((-1,) + key.shape[-3:])
    v = value.reshape((-1,) + value.shape[-3:])
    if mask is not None:
      mask = jnp.asarray(mask, bool)
      mask = mask.reshape((1,) * (len(batch_dims) + 3 - mask.ndim) + mask.shape)
      mask = jnp.broadcast_to(mask, batch_dims + mask.shape[-3:])
      mask = mask.reshape((-1,) + mask.shape[-3:])
    out = attention_lib.distr_attention(q, k, v, mask=mask, is_causal=causal, **options)
    return out.reshape(batch_dims + out.shape[1:])

  return attention_fn


class DistrMultiHeadDotProductAttention(nn.MultiHeadDotProductAttention):
  """`nn.MultiHeadDotProductAttention` with DistrAttention inside (same parameters)."""

  group_size: int = 2
  block_q: int = 64
  num_projs: int = 16
  representative: str = "mean"
  grouping: str = "greedy"
  seed: int = 0
  implementation: str | None = None
  causal: bool = False
  sharding: Any = None  # NamedSharding of the [batch, len, heads, d] query, if sharded

  def __post_init__(self):
    object.__setattr__(self, "attention_fn", make_attention_fn(
        group_size=self.group_size, block_q=self.block_q, num_projs=self.num_projs,
        representative=self.representative, grouping=self.grouping, seed=self.seed,
        implementation=self.implementation, is_causal=self.causal,
        sharding=self.sharding))
    super().__post_init__()


class DistrMultiHeadAttention(nnx.MultiHeadAttention):
  """`nnx.MultiHeadAttention` with DistrAttention inside (same state)."""

  def __init__(self, *args, group_size: int = 2, block_q: int = 64, num_projs: int = 16,
               representative: str = "mean", grouping: str = "greedy", seed: int = 0,
               implementation: str | None = None, causal: bool = False,
               sharding: jax.sharding.NamedSharding | None = None, **kwargs):
    if "attention_fn" in kwargs:
      raise ValueError("DistrMultiHeadAttention sets attention_fn itself")
    super().__init__(*args, attention_fn=make_attention_fn(
        group_size=group_size, block_q=block_q, num_projs=num_projs,
        representative=representative, grouping=grouping, seed=seed,
        implementation=implementation, is_causal=causal, sharding=sharding), **kwargs)
