"""A compact Vision Transformer (in the style of big_vision's vit.py) with a choice of
attention: Flax's exact `MultiHeadDotProductAttention` or DistrAttention's drop-in.

Both attentions have the same parameter tree, so a checkpoint of one loads in the other.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from distrattention_jax import DistrConfig, DistrMultiHeadDotProductAttention


@dataclasses.dataclass(frozen=True, init=False)
class AttentionConfig:
  """`kind="exact"` (Flax's attention) or `"distr"` with DistrAttention's options.

  `config` is a `DistrConfig`; DistrConfig's fields may also be given by keyword
  (`AttentionConfig(group_size=4)`), replacing the config's.
  """

  kind: str
  config: DistrConfig
  sharding: Any  # NamedSharding of the attention's query when data-parallel

  def __init__(self, kind: str = "distr", config: DistrConfig | None = None,
               sharding: Any = None, **options):
    object.__setattr__(self, "kind", kind)
    object.__setattr__(self, "config", dataclasses.replace(config or DistrConfig(),
                                                           **options))
    object.__setattr__(self, "sharding", sharding)

  def make(self, num_heads: int, name: str):
    if self.kind == "exact":
      return nn.MultiHeadDotProductAttention(num_heads=num_heads, name=name)
    if self.kind == "distr":
      return DistrMultiHeadDotProductAttention(
          num_heads=num_heads, config=self.config, sharding=self.sharding, name=name)
    raise ValueError(f"attention kind must be 'exact' or 'distr', got {self.kind!r}")


class MlpBlock(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.gelu(nn.Dense(self.mlp_dim)(x))
    return nn.Dense(width)(x)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm block: x + MHA(LN(x)), then x + MLP(LN(x))."""

  num_heads: int
  mlp_dim: int
  attention: AttentionConfig

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    x = x + self.attention.make(self.num_heads, name="attention")(y, y)
    y = nn.LayerNorm()(x)
    return x + MlpBlock(self.mlp_dim)(y)


class ViT(nn.Module):
  """Patches -> [cls] + tokens + learned positions -> encoder -> cls head."""

  num_classes: int
  patch_size: int = 2
  width: int = 64
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 128
  attention: Any = AttentionConfig()

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(self.width, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID",
                name="embedding")(images)
    batch, h, w, c = x.shape
    x = x.reshape(batch, h * w, c)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, c)), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1,) + x.shape[1:])
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.attention,
                       name=f"encoderblock_{i}")(x)
    x = nn.LayerNorm(name="encoder_norm")(x)
    return nn.Dense(self.num_classes, name="head")(x[:, 0])
