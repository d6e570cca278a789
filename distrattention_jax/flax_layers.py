"""Flax integration: an `attention_fn` and drop-in multi-head attention modules.

    attn = DistrMultiHeadDotProductAttention(num_heads=8, group_size=2)     # linen
    attn = DistrMultiHeadAttention(8, 512, group_size=2, rngs=nnx.Rngs(0))  # NNX
    attn = DistrMultiHeadAttention(8, 512, config=DistrConfig(group_size=4), rngs=...)

Fixed lowrank maps (grouping="lowrank" with maps calibrated once and held: strictly
causal, no factorisation at run time): `DistrMultiHeadAttention.calibrate_lowrank(batch)`
fits and stores them (NNX state of type `LowrankMaps`, not parameters); any module can
take them through `make_attention_fn(lowrank_maps=...)` (linen: the `lowrank_maps` field).

Each takes a `config: DistrConfig` and, as keyword arguments, any of DistrConfig's fields
(which override the config's); the fields are forwarded by name, never restated here.
Both modules subclass Flax's own and only replace `attention_fn`, so their parameter
trees are identical to Flax's and checkpoints load unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from distrattention_jax import attention as attention_lib
from distrattention_jax import config as config_lib
from distrattention_jax import lowrank

# Keyword arguments Flax passes that change nothing here when left at their defaults.
_IGNORED_IF_NONE = ("qk_attn_weights_einsum", "attn_weights_value_einsum",
                    "einsum_dot_general")


def _config(config: config_lib.DistrConfig | None, options: dict[str, Any]):
  """`config` (default DistrConfig()) with `options` (DistrConfig fields) replaced."""
  fields = config_lib.DistrConfig.field_names()
  unknown = sorted(set(options) - set(fields))
  if unknown:
    raise TypeError(f"unexpected DistrAttention options {unknown}; DistrConfig's fields "
                    f"are {fields}")
  if config is not None and not isinstance(config, config_lib.DistrConfig):
    raise TypeError(f"config must be a DistrConfig, got {type(config).__name__}")
  return dataclasses.replace(config or config_lib.DistrConfig(), **options).validate()


def make_attention_fn(config: config_lib.DistrConfig | None = None, *,
                      is_causal: bool = False,
                      sharding: jax.sharding.NamedSharding | None = None,
                      lowrank_maps=None, **options):
  """An `attention_fn` for `nn.MultiHeadDotProductAttention` / `nnx.MultiHeadAttention`.

  `config` holds DistrAttention's options; `options` are DistrConfig fields by keyword
  (`group_size=2`, ...) that replace the config's. `lowrank_maps`: fixed maps
  `(q_map [H, d, r], k_map [Hk, d, r])` for grouping "lowrank" (`distr_attention`'s
  argument; e.g. from `lowrank.calibrate_lowrank_maps`). The returned function takes Flax's
  arguments (`query [batch..., q_len, heads, d]`, key, value,
  `mask [batch..., heads|1, q_len, kv_len]`, dropout and dtype options) and runs
  `distr_attention` with those options. `is_causal=True` applies a causal mask without
  materialising it (so the Pallas kernels can run); Flax masks are dense and go through
  the XLA path when `implementation=None`. Attention dropout in training mode, an
  additive `bias` and sowing attention weights raise NotImplementedError
  (DistrAttention never forms the weights).
  """
  cfg = _config(config, options)
  options = dict(dataclasses.asdict(cfg), sharding=sharding)
  if lowrank_maps is not None:
    options["lowrank_maps"] = lowrank_maps

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


def _linen_post_init(self):
  options = {name: getattr(self, name) for name in config_lib.DistrConfig.field_names()
             if getattr(self, name) is not None}
  object.__setattr__(self, "attention_fn", make_attention_fn(
      _config(self.config, options), is_causal=self.causal, sharding=self.sharding,
      lowrank_maps=self.lowrank_maps))
  nn.MultiHeadDotProductAttention.__post_init__(self)


def _linen_namespace(doc: str) -> dict[str, Any]:
  """Fields `config`, `causal`, `sharding` and every DistrConfig field (default None:
  take the config's), generated from DistrConfig so no option is restated here."""
  annotations = {"config": Any, "causal": bool, "sharding": Any, "lowrank_maps": Any}
  namespace = {"config": None, "causal": False, "sharding": None, "lowrank_maps": None}
  for name in config_lib.DistrConfig.field_names():
    annotations[name] = Any
    namespace[name] = None
  return dict(namespace, __annotations__=annotations, __doc__=doc, __module__=__name__,
              __post_init__=_linen_post_init)


DistrMultiHeadDotProductAttention = type(
    "DistrMultiHeadDotProductAttention", (nn.MultiHeadDotProductAttention,),
    _linen_namespace(
        """`nn.MultiHeadDotProductAttention` with DistrAttention inside (same parameters).

        Extra fields: `config` (a DistrConfig; None: the defaults), every DistrConfig
        field by name (`group_size=2`, ...; None: the config's), `causal`, `sharding`
        (the NamedSharding of the [batch, len, heads, d] query, if sharded) and
        `lowrank_maps` (fixed maps for grouping "lowrank", see make_attention_fn).
        """))


class LowrankMaps(nnx.Variable):
  """Fixed lowrank maps of a `DistrMultiHeadAttention` (`[H, d, r]` or `[Hk, d, r]`):
  layer state saved with it, not a parameter (an optimizer over `nnx.Param` leaves it)."""


class DistrMultiHeadAttention(nnx.MultiHeadAttention):
  """`nnx.MultiHeadAttention` with DistrAttention inside (same parameters).

  Takes `config` (a DistrConfig), any DistrConfig field by keyword, `causal` and
  `sharding`; every other argument goes to `nnx.MultiHeadAttention`. With grouping
  "lowrank", `calibrate_lowrank(...)` fits fixed maps once and later calls use them
  (`lowrank_q_map` / `lowrank_k_map`, `LowrankMaps` state; None until calibrated).
  """

  def __init__(self, *args, config: config_lib.DistrConfig | None = None,
               causal: bool = False, sharding: jax.sharding.NamedSharding | None = None,
               **kwargs):
    if "attention_fn" in kwargs:
      raise ValueError("DistrMultiHeadAttention sets attention_fn itself")
    options = {name: kwargs.pop(name) for name in config_lib.DistrConfig.field_names()
               if name in kwargs}
    cfg = _config(config, options)
    super().__init__(*args, attention_fn=make_attention_fn(
        cfg, is_causal=causal, sharding=sharding), **kwargs)
    self.distr_config = cfg
    self.distr_causal = causal
    self.distr_sharding = sharding
    self.lowrank_q_map = nnx.data(None)
    self.lowrank_k_map = nnx.data(None)

  def _call_with(self, attention_fn, *args, **kwargs):
    """`nnx.MultiHeadAttention.__call__` with another attention_fn for this call only."""
    original = self.attention_fn
    object.__setattr__(self, "attention_fn", attention_fn)
    try:
      return super().__call__(*args, **kwargs)
    finally:
      object.__setattr__(self, "attention_fn", original)

  def __call__(self, *args, **kwargs):
    """As `nnx.MultiHeadAttention.__call__`; uses the calibrated lowrank maps if any."""
    if self.lowrank_q_map is None:
      return super().__call__(*args, **kwargs)
    maps = (self.lowrank_q_map[...], self.lowrank_k_map[...])
    return self._call_with(make_attention_fn(
        self.distr_config, is_causal=self.distr_causal, sharding=self.distr_sharding,
        lowrank_maps=maps), *args, **kwargs)

  def calibrate_lowrank(self, *args, **kwargs):
    """Fits fixed lowrank maps to one calibration batch and stores them.

    Takes `__call__`'s arguments (`inputs_q`, optionally `inputs_k`/`inputs_v`, mask,
    ...). The layer runs once with exact attention on that batch; the queries and keys
    its attention sees (after the projections and anything the module applies before
    attention_fn) give one factorisation per head over every row and key of the batch
    (`lowrank.calibrate_lowrank_maps`, per kv head if `lowrank_per_kv_head`; padding
    rows, if any, enter the Grams too). Later calls use these maps: outputs at position
    i depend on no later token (strictly causal with `causal=True`) and no
    factorisation runs. Call it again to refit. Returns the exact-attention output
    and the maps `(q_map [H, d, r], k_map [Hk, d, r])`.
    """
    cfg = self.distr_config
    if cfg.grouping != "lowrank" or cfg.group_size == 1:
      raise ValueError(f"calibrate_lowrank needs grouping='lowrank' and group_size > 1, "
                       f"got grouping={cfg.grouping!r}, group_size={cfg.group_size}")
    seen = {}
    exact = make_attention_fn(dataclasses.replace(cfg, group_size=1, grouping="greedy"),
                              is_causal=self.distr_causal, sharding=self.distr_sharding)

    def capture(query, key, value, **fn_kwargs):
      seen["query"] = query.reshape((-1,) + query.shape[-3:])
      seen["key"] = key.reshape((-1,) + key.shape[-3:])
      return exact(query, key, value, **fn_kwargs)

    out = self._call_with(capture, *args, **kwargs)
    q_map, k_map = lowrank.calibrate_lowrank_maps(
        seen["query"], seen["key"], group_size=cfg.group_size,
        per_kv_head=cfg.lowrank_per_kv_head)
    self.lowrank_q_map = LowrankMaps(q_map)
    self.lowrank_k_map = LowrankMaps(k_map)
    return out, (q_map, k_map)
