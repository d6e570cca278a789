"""Running DistrAttention per shard when q/k/v are sharded over batch and heads.

Attention is independent across batch rows and heads, and so is the grouping (one
permutation per batch row, head and query block), so a batch/head-sharded call is the
unsharded computation done shard by shard: `jax.shard_map` runs it there without any
collective, and the Pallas kernels (which XLA cannot partition) see local arrays.
"""

from __future__ import annotations

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


def shard_over_batch_and_heads(fn, sharding, arrays):
  """`fn(query, key, value, mask, q_seg, kv_seg, q_len, kv_len)` per shard of `sharding`.

  `sharding` is the NamedSharding of the BTNH query; key/value are sharded alike (their
  kv heads over the query's head axes). Masks follow their batch (and head) axes.
  """
  if not isinstance(sharding, jax.sharding.NamedSharding):
    raise ValueError(
        f"sharding must be a jax.sharding.NamedSharding of the query, got "
        f"{type(sharding).__name__}")
  query, key, value, mask, q_seg, kv_seg, q_lengths, kv_lengths = arrays
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
  mask_spec = None
  if mask is not None:
    mask_spec = P(batch_axes if mask.shape[0] > 1 else None,
                  head_axes if mask.shape[1] > 1 else None, None, None)
  seg_spec = P(batch_axes, None)
  len_spec = P(batch_axes)
  in_specs = (qkv_spec, qkv_spec, qkv_spec, mask_spec,
              None if q_seg is None else seg_spec, None if kv_seg is None else seg_spec,
              None if q_lengths is None else len_spec,
              None if kv_lengths is None else len_spec)
  # None arrays take no spec: pass only the present ones through shard_map.
  present = [i for i, a in enumerate(arrays) if a is not None]

  def local(*xs):
    full = [None] * len(arrays)
    for i, x in zip(present, xs):
      full[i] = x
    return fn(*full)

  specs = tuple(in_specs[i] for i in present)
  # Place every input as its spec says (a no-op for q/k/v already sharded so; masks
  # built outside, e.g. constants, get split over the batch axis here).
  explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
  place = jax.sharding.reshard if explicit else jax.lax.with_sharding_constraint
  inputs = [place(arrays[i], jax.sharding.NamedSharding(mesh, spec))
            for i, spec in zip(present, specs)]
  mapped = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=qkv_spec,
                         check_vma=False)
  return mapped(*inputs)
