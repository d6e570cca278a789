"""What every backend implements, and the static description of a call it decides on.

A backend is an object with
  name: str                      the `implementation=` name
  needs_gpu: bool                runs only when JAX's default backend is a GPU
  selectable: bool               considered by `implementation=None`
  uses_grouping_kernel: bool     the grouping may run its Pallas kernel (GPU kernel
                                 backends only: "xla" runs no Pallas code)
  supports(problem) -> None | str
  preferred_for(problem) -> bool
                                 whether `implementation=None` picks it for a call it
                                 supports (False where a later backend is faster)
                                 None if it computes this call, else what it does not
                                 support, phrased to follow "does not support "
  __call__(query, key, value, reduction, masks, problem) -> [B, Tq, H, dv]
                                 `reduction` a `grouping.HeadReduction` (None for
                                 group_size 1), `masks` a `config.Masks`; rows with no
                                 key to attend are 0; differentiable in q, k, v.
`distrattention_jax.backends.REGISTRY` lists them in preference order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from distrattention_jax import config as config_lib
from distrattention_jax import grouping as grouping_lib


@dataclasses.dataclass(frozen=True, kw_only=True)
class Problem:
  """Everything static about one `distr_attention` call (hashable).

  Shapes are the global (unsharded) ones. Build it with `Problem.from_call`.
  """

  batch: int
  q_len: int
  kv_len: int
  heads: int
  kv_heads: int
  head_dim: int
  value_dim: int
  dtype: Any                      # a numpy dtype
  config: config_lib.DistrConfig  # validated
  scale: float
  is_causal: bool
  has_mask: bool                  # a dense boolean mask
  has_segment_ids: bool
  has_q_lengths: bool
  has_kv_lengths: bool
  platform: str                   # jax.default_backend() at the call

  @classmethod
  def from_call(cls, query, key, value, masks: config_lib.Masks,
                config: config_lib.DistrConfig, scale: float | None) -> "Problem":
    batch, q_len, heads, head_dim = query.shape
    return cls(
        batch=batch, q_len=q_len, kv_len=key.shape[1], heads=heads, kv_heads=key.shape[2],
        head_dim=head_dim, value_dim=value.shape[3], dtype=np.dtype(query.dtype),
        config=config.for_length(q_len),  # block_q=None: one block per sequence
        scale=1.0 / math.sqrt(head_dim) if scale is None else float(scale),
        is_causal=masks.is_causal, has_mask=masks.mask is not None,
        has_segment_ids=masks.q_segment_ids is not None,
        has_q_lengths=masks.q_lengths is not None,
        has_kv_lengths=masks.kv_lengths is not None, platform=jax.default_backend())

  @property
  def group_size(self) -> int:
    return self.config.group_size

  @property
  def block_q(self) -> int:
    return self.config.block_q

  @property
  def num_blocks(self) -> int:
    """Grouping blocks per sequence (1: one grouping per sequence)."""
    return -(-self.q_len // self.block_q)

  @property
  def width(self) -> int:
    """r = d / G, the width of the reduced score product."""
    return self.head_dim // self.group_size

  @property
  def dense_maps(self) -> bool:
    """Whether the grouping gives dense maps (no permutation) when group_size > 1."""
    return self.group_size > 1 and self.config.grouping in grouping_lib.DENSE_GROUPINGS


class Backend:
  """Base class of the backends (see the module docstring for the contract)."""

  name: str = ""
  needs_gpu: bool = False
  selectable: bool = True
  off_gpu_hint: str = "use 'xla' on a CPU"

  # Whether this backend takes a dense grouping's maps pre-split as its kernels hold
  # them (`HeadReduction.map_parts`): the grouping step is then asked for them.
  takes_map_parts: bool = False

  @property
  def uses_grouping_kernel(self) -> bool:
    return self.needs_gpu

  def supports(self, problem: Problem) -> str | None:
    del problem
    return None

  def preferred_for(self, problem: Problem) -> bool:
    """Whether `implementation=None` should pick this backend for a call it supports.

    True by default; a backend returns False where a later one in the registry was
    measured faster (an explicit `implementation=` still runs it).
    """
    del problem
    return True

  def __call__(self, query, key, value, reduction, masks, problem):
    raise NotImplementedError

  def __repr__(self):
    return f"<backend {self.name!r}>"
