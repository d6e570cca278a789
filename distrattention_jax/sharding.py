"""Running DistrAttention per shard when q/k/v are sharded over batch and heads.

Attention is independent across batch rows and heads, and so is the grouping (one
permutation per batch row, head and query block), so a batch/head-sharded call is the
unsharded computation done shard by shard: `jax.shard_map` runs it there without any
collective, and the Pallas kernels (which XLA cannot partition) see local arrays.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import PartitionSpec as P


def _axes(spec, ndim):
  entries = tuple(spec) + (None,) * (ndim - len(spec))
  return entries


def explicit_sharding(query) -> jax.sharding.NamedSharding | None:
  """The query's sharding when its type carries one (Explicit mesh axes), else None.

  Lets batch/head-sharded inputs under explicit sharding run per shard without a
  `sharding=` argument (the XLA ops would otherwise meet sharding-in-types errors and
  the Pallas kernels a gather). Auto-mode shardings are invisible here; GSPMD
  partitions the XLA path along batch and heads.
  """
  sharding = getattr(jax.typeof(query), "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return None
  if not any(t == jax.sharding.AxisType.Explicit for t in sharding.mesh.axis_types):
    return None
  if all(entry is None for entry in sharding.spec):
    return None
  return sharding


def shard_over_batch_and_heads(fn, sharding, query, key, value, masks):
  """`fn(query, key, value, masks)` per shard of `sharding`.

  `sharding` is the NamedSharding of the BTNH query; key/value are sharded alike (their
  kv heads over the query's head axes). The arrays of `masks` (a `config.Masks` pytree)
  follow their batch (and head) axes.
  """
  if not isinstance(sharding, jax.sharding.NamedSharding):
    raise ValueError(
        f"sharding must be a jax.sharding.NamedSharding of the query, got "
        f"{type(sharding).__name__}")
  batch_axes, seq_axes, head_axes, dim_axes = _axes(sharding.spec, 4)
  if seq_axes is not None or dim_axes is not None:
    raise NotImplementedError(
        f"sharding: only the batch and heads axes of [batch, seq, heads, head_dim] may be "
        f"sharded, got spec {sharding.spec}; gather the sequence / head_dim axis first")
  mesh = sharding.mesh
  head_shards = 1
  for name in (head_axes if isinstance(head_axes, tuple) else (head_axes,)):
    if name is not None:
      head_shards *= mesh.shape[name]
  batch_shards = 1
  for name in (batch_axes if isinstance(batch_axes, tuple) else (batch_axes,)):
    if name is not None:
      batch_shards *= mesh.shape[name]
  if key.shape[2] % head_shards:
    raise ValueError(
        f"sharding: kv_heads={key.shape[2]} must be divisible by the {head_shards} shards "
        f"of the heads axis (each shard keeps whole GQA groups)")
  if query.shape[0] % batch_shards:
    raise ValueError(f"sharding: batch={query.shape[0]} must be divisible by its "
                     f"{batch_shards} shards")
  qkv_spec = P(batch_axes, None, head_axes, None)
  mask = masks.mask
  seg_spec, len_spec = P(batch_axes, None), P(batch_axes)
  # A Masks of specs: absent arrays are empty subtrees, so their specs are never read.
  mask_specs = dataclasses.replace(
      masks,
      mask=None if mask is None else P(batch_axes if mask.shape[0] > 1 else None,
                                       head_axes if mask.shape[1] > 1 else None, None, None),
      q_segment_ids=None if masks.q_segment_ids is None else seg_spec,
      kv_segment_ids=None if masks.kv_segment_ids is None else seg_spec,
      q_lengths=None if masks.q_lengths is None else len_spec,
      kv_lengths=None if masks.kv_lengths is None else len_spec)
  specs = (qkv_spec, qkv_spec, qkv_spec, mask_specs)
  # Place every input as its spec says (a no-op for q/k/v already sharded so; masks
  # built outside, e.g. constants, get split over the batch axis here).
  explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
  place = jax.sharding.reshard if explicit else jax.lax.with_sharding_constraint
  inputs = jax.tree.map(lambda x, spec: place(x, jax.sharding.NamedSharding(mesh, spec)),
                        (query, key, value, masks), specs,
                        is_leaf=lambda x: isinstance(x, P))
  mapped = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=qkv_spec,
                         check_vma=False)
  return mapped(*inputs)
