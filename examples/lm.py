"""A byte-level decoder-only transformer (linen) whose causal attention is either exact
(`jax.nn.dot_product_attention`) or DistrAttention (`distrattention_jax.distr_attention`).

Pre-norm blocks (RMSNorm), rotary position embeddings (RoPE) on Q and K, a GELU MLP, the
layers stacked with `nn.scan` (one compiled layer, fast compiles). The attention setting
is a static, hashable tuple of `distr_attention` keyword arguments (or None = exact);
settings share one parameter tree, so a checkpoint trained with one runs with any other
("swapped in post hoc").

    cfg = LMConfig(num_layers=6, num_heads=4, head_dim=128)
    model = LM(cfg, attention=attention_options(group_size=2, block_q=64, grouping="greedy"))
    logits = model.apply(params, tokens)            # tokens int [batch, len] -> [batch, len, 256]

Fixed lowrank maps (grouping "lowrank" with maps calibrated once: strictly causal) live in
a variable collection "lowrank" beside "params" (`calibrate_lowrank_maps` below):

    maps = calibrate_lowrank_maps(LM(cfg), params, calibration_tokens, group_size=4)
    fixed = LM(cfg, attention=attention_options(group_size=4, block_q=4096, grouping="lowrank"))
    logits = fixed.apply({**params, "lowrank": maps}, tokens)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import distrattention_jax
from distrattention_jax import lowrank

VOCAB_SIZE = 256  # bytes


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Model shape. The model width is `num_heads * head_dim`."""

  num_layers: int = 6
  num_heads: int = 4
  head_dim: int = 128
  mlp_ratio: int = 4
  rope_base: float = 10000.0
  dtype: str = "bfloat16"  # compute dtype of the matmuls and attention; parameters are float32
  exact_implementation: str = "auto"  # jax.nn's for exact attention: auto, cudnn or xla

  @property
  def width(self) -> int:
    return self.num_heads * self.head_dim


# The tiny CPU configuration of the smoke test.
TINY = LMConfig(num_layers=2, num_heads=2, head_dim=16, mlp_ratio=2, dtype="float32")


def attention_options(*, group_size: int, block_q: int, grouping: str,
                      implementation: str | None = None, **extra) -> tuple:
  """The `distr_attention` keyword arguments of one setting, as a sorted, hashable tuple.

  This is the only place that names the library's options (its option list is being
  gathered into `DistrConfig`); everything else passes the tuple along unopened.
  `implementation=None` lets the library pick the backend.
  """
  options = dict(group_size=group_size, block_q=block_q, grouping=grouping,
                 implementation=implementation, **extra)
  return tuple(sorted(options.items()))


def causal_attention(query, key, value, attention: tuple | None,
                     exact_implementation: str = "auto", lowrank_maps=None):
  """Causal self-attention, BTNH in and out. `attention` None is exact attention
  (`jax.nn.dot_product_attention`; "auto": cuDNN on a GPU for bf16/f16, else XLA).
  `lowrank_maps`: fixed `(q_map [H, d, r], k_map [H, d, r])` for grouping "lowrank"."""
  if attention is None:
    implementation = exact_implementation
    if implementation == "auto":
      gpu_dtype = query.dtype in (jnp.bfloat16, jnp.float16)
      implementation = "cudnn" if jax.default_backend() == "gpu" and gpu_dtype else "xla"
    return jax.nn.dot_product_attention(query, key, value, is_causal=True,
                                        implementation=implementation)
  extra = {} if lowrank_maps is None else {"lowrank_maps": lowrank_maps}
  return distrattention_jax.distr_attention(query, key, value, is_causal=True,
                                            **dict(attention), **extra)


def rope_tables(length: int, head_dim: int, base: float):
  """(sin, cos), float32 `[length, head_dim // 2]`."""
  inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x, sin, cos):
  """Rotates the two halves of each head `[B, T, H, d]` by position (rotate-half RoPE)."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  sin, cos = sin[None, :, None, :], cos[None, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Block(nn.Module):
  """x + Attention(RMSNorm(x)), then x + MLP(RMSNorm(x)). Returns (x, None) for nn.scan."""

  config: LMConfig
  attention: Any = None
  capture: bool = False  # sow the attention's q and k (post-RoPE) as "intermediates"

  @nn.compact
  def __call__(self, x, rope):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    sin, cos = rope
    y = nn.RMSNorm(dtype=dtype, name="attention_norm")(x)
    qkv = nn.DenseGeneral((3, cfg.num_heads, cfg.head_dim), use_bias=False, dtype=dtype,
                          name="qkv")(y)                       # [B, T, 3, H, d]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
    if self.capture:
      self.sow("intermediates", "query", q)
      self.sow("intermediates", "key", k)
    maps = None
    if self.has_variable("lowrank", "q_map"):
      maps = (self.get_variable("lowrank", "q_map"), self.get_variable("lowrank", "k_map"))
    o = causal_attention(q, k, v, self.attention, cfg.exact_implementation, maps)
    x = x + nn.DenseGeneral(cfg.width, axis=(-2, -1), use_bias=False, dtype=dtype,
                            kernel_init=nn.initializers.normal(0.02 / cfg.num_layers ** 0.5),
                            name="out")(o)
    y = nn.RMSNorm(dtype=dtype, name="mlp_norm")(x)
    y = nn.gelu(nn.Dense(cfg.mlp_ratio * cfg.width, use_bias=False, dtype=dtype,
                         name="mlp_in")(y))
    x = x + nn.Dense(cfg.width, use_bias=False, dtype=dtype,
                     kernel_init=nn.initializers.normal(0.02 / cfg.num_layers ** 0.5),
                     name="mlp_out")(y)
    return x, None


class LM(nn.Module):
  """Bytes `[batch, len]` -> next-byte logits `[batch, len, 256]` (float32)."""

  config: LMConfig
  attention: Any = None  # None (exact) or a tuple from `attention_options`
  capture: bool = False  # sow every layer's q and k (for calibrate_lowrank_maps)

  @nn.compact
  def __call__(self, tokens):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    x = nn.Embed(VOCAB_SIZE, cfg.width, embedding_init=nn.initializers.normal(0.02),
                 name="embed")(tokens).astype(jnp.float32)  # residual stream in float32
    rope = rope_tables(tokens.shape[1], cfg.head_dim, cfg.rope_base)
    layers = nn.scan(Block, variable_axes={"params": 0, "lowrank": 0, "intermediates": 0},
                     split_rngs={"params": True}, in_axes=nn.broadcast,
                     length=cfg.num_layers)
    x, _ = layers(cfg, self.attention, self.capture, name="layers")(x, rope)
    x = nn.RMSNorm(dtype=dtype, name="final_norm")(x)
    return nn.Dense(VOCAB_SIZE, use_bias=False, dtype=dtype, name="head")(x).astype(
        jnp.float32)


def calibrate_lowrank_maps(model: LM, variables, tokens, *, group_size: int,
                           per_kv_head: bool = True):
  """The "lowrank" collection of fixed maps, one factorisation per layer and head, fitted
  to the queries and keys (after RoPE) that exact attention sees on `tokens [B, T]`
  (`distrattention_jax.lowrank.calibrate_lowrank_maps`). Pass it beside the parameters:
  `model.apply({**variables, "lowrank": maps}, tokens)` with grouping "lowrank"."""
  capture = model.clone(attention=None, capture=True)
  _, state = capture.apply(variables, tokens, mutable=["intermediates"])
  seen = state["intermediates"]["layers"]
  (queries,), (keys,) = seen["query"], seen["key"]        # [layers, B, T, H, d] each
  maps = [lowrank.calibrate_lowrank_maps(queries[i], keys[i], group_size=group_size,
                                         per_kv_head=per_kv_head)
          for i in range(queries.shape[0])]
  return {"layers": {"q_map": jnp.stack([m[0] for m in maps]),
                     "k_map": jnp.stack([m[1] for m in maps])}}
