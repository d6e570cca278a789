"""The grouping step: which head-dim columns share a score term, per query block.

`reduce_heads` is the one grouping step of `distr_attention`. It returns a
`HeadReduction` (or None for `group_size == 1`), the one object every backend consumes.
A reduction holds, per (batch, head, query block), two `[d, r]` maps (`r = d / G`):

* `q_map`: `Q_rep = Q_block @ q_map` (the group representatives),
* `k_map`: `K_fused = K @ k_map` (for a permutation grouping, the sum of each group's key
  columns),

so the scores `Q_rep K_fused^T = Q (q_map k_map^T) K^T`, and `Q_exp = Q q_map k_map^T`
gives exact attention at `Q_exp` the same scores (docs/DESIGN.md section 1).

Two kinds of grouping fill it:

* permutation groupings ("greedy", "lsh", "random"): `perm [B, H, nb, d]`, consecutive
  runs of G entries form the groups; the maps are built from it on demand
  (`membership`, `rep_weights`), and kernels that gather K's columns in place read
  `member_indices()`.
* dense groupings (`DENSE_GROUPINGS`, e.g. a low-rank factorisation): `q_map` and
  `k_map` given as arrays, `perm` None. Backends that only use `q_rep`/`k_fused`/`q_exp`
  take them unchanged; a backend that needs the permutation refuses them in `supports`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from distrattention_jax import lowrank
from distrattention_jax import lsh
from distrattention_jax import prep

# ----------------------------------------------------------------------------------------
# Permutation groupings
# ----------------------------------------------------------------------------------------


def _random_permutations(query, *, block_q, seed):
  batch, q_len, heads, d = query.shape
  num_blocks = -(-q_len // block_q)
  keys = jax.random.split(jax.random.key(seed), batch * heads * num_blocks)
  perm = jax.vmap(lambda k: jax.random.permutation(k, d))(keys)
  return perm.reshape(batch, heads, num_blocks, d).astype(jnp.int32)


# Every permutation grouping (`block_permutations` runs them).
PERMUTATION_GROUPINGS = ("lsh", "greedy", "random")

# Dense groupings: name -> fn(query, key, *, config, query_valid, key_valid, use_kernel,
#   parts_scale) -> (q_map [B, H, nb, d, r], k_map [B, Hk, nb, d, r], parts), maps float32,
# Hk = H or kv_heads, computed under stop_gradient (`use_kernel`: it may run a Pallas
# kernel, as for greedy); parts: None or the maps as the Mosaic kernels hold them
# (`HeadReduction.map_parts`), asked for with the softmax scale `parts_scale`.


def _lowrank_maps(query, key, *, config, query_valid, key_valid, use_kernel,
                  parts_scale=None):
  """grouping="lowrank": the best rank-(d/G) factorisation per block (lowrank.py)."""
  return lowrank.lowrank_maps_and_parts(
      query, key, block_q=config.block_q, group_size=config.group_size,
      query_valid=query_valid, key_valid=key_valid, per_kv_head=config.lowrank_per_kv_head,
      use_kernel=use_kernel, parts_scale=parts_scale)


DENSE_GROUPINGS: dict[str, Callable] = {"lowrank": _lowrank_maps}


def grouping_names() -> tuple[str, ...]:
  """Every grouping `DistrConfig.grouping` accepts."""
  return PERMUTATION_GROUPINGS + tuple(DENSE_GROUPINGS)


def block_permutations(
    query: jax.Array,
    *,
    block_q: int,
    group_size: int,
    grouping: str = "greedy",
    num_projs: int = 16,
    seed: int = 0,
    query_valid: jax.Array | None = None,
    use_kernel: bool | None = None,
) -> jax.Array:
  """Column permutation of every query block: int32 `[batch, heads, num_blocks, d]`.

  Consecutive runs of `group_size` entries are the groups. `grouping`:
    "greedy" (default): exact column distances within the block (`greedy_permutations`).
    "lsh": the paper's angular LSH with Gray-code ordering (`lsh.lsh_permutations`).
    "random": a random permutation per block (a control for accuracy studies).
  `use_kernel` runs greedy's steps in the Pallas kernel (None: when JAX's default
  backend is a GPU; `distr_attention` passes it explicitly, True only for GPU kernel
  backends). The result is a constant for differentiation (`stop_gradient`).
  """
  if grouping == "greedy":
    perm = greedy_permutations(query, block_q=block_q, group_size=group_size,
                               query_valid=query_valid, use_kernel=use_kernel)
  elif grouping == "lsh":
    perm = lsh.lsh_permutations(query, block_q=block_q, num_projs=num_projs, seed=seed,
                                query_valid=query_valid)
  elif grouping == "random":
    perm = _random_permutations(query, block_q=block_q, seed=seed)
  else:
    raise ValueError(f"grouping must be one of {PERMUTATION_GROUPINGS} for a permutation, "
                     f"got {grouping!r}")
  return jax.lax.stop_gradient(perm)


def greedy_permutations(query, *, block_q, group_size, query_valid=None, use_kernel=None):
  """Groups each block's columns by exact Euclidean distance, greedily.

  Per block: take the remaining column of largest norm, add its `group_size - 1` nearest
  remaining columns (distances over the block's rows, from the `d x d` Gram matrix),
  repeat. `O(block_q d^2)` per block for the Gram matrix plus `d/G` cheap steps: small
  next to attention's `O(N d)` per row. `use_kernel` runs the steps in one Pallas
  program per block (`pallas_kernels/triton/greedy.py`; None: on a GPU), where XLA
  would launch every step separately. Both give the same permutation. The Gram matrix
  is formed from the input dtype (bf16/f16 products are exact in float32), so the same
  values given as float32 may break an exact near-tie the other way. Returns int32
  `[batch, heads, nb, d]`.
  """
  batch, q_len, heads, d = query.shape
  if group_size == 1:
    num_blocks = -(-q_len // block_q)
    return jnp.broadcast_to(jnp.arange(d, dtype=jnp.int32), (batch, heads, num_blocks, d))
  if use_kernel is None:
    use_kernel = jax.default_backend() == "gpu"
  gram = prep.head_grams(query, block_q, query_valid,        # [B, H, nb, d, d]
                         per_batch_row=bool(use_kernel))
  num_blocks = gram.shape[2]
  if use_kernel:
    from pallas_kernels.triton import greedy as greedy_kernel  # pylint: disable=import-outside-toplevel
    flat = greedy_kernel.greedy_groups(gram.reshape(-1, d, d), group_size,
                                       interpret=jax.default_backend() != "gpu")
    return flat.reshape(batch, heads, num_blocks, d)
  norms = jnp.diagonal(gram, axis1=-2, axis2=-1)              # squared column norms
  dist = norms[..., :, None] + norms[..., None, :] - 2 * gram  # squared distances

  cols = jnp.arange(d)

  def one_block(norms, dist):
    # Only elementwise ops, argmax/argmin reductions and a row read per step, vmapped
    # over the (batch, heads, blocks) axes as they are: GSPMD partitions it along a
    # sharded batch/heads axis. (`lax.top_k` and a reshape merging those axes made it
    # all-gather the Gram matrices.) The G-1 nearest are picked one argmin at a time:
    # the ties go to the lower index, as with top_k and the Pallas kernel.
    def step(g, carry):
      remaining, perm = carry
      seed = jnp.argmax(jnp.where(remaining, norms, -jnp.inf))
      remaining = remaining & (cols != seed)
      row = dist[seed]
      members = [seed]
      for _ in range(group_size - 1):
        nearest = jnp.argmin(jnp.where(remaining, row, jnp.inf))
        remaining = remaining & (cols != nearest)
        members.append(nearest)
      members = jnp.stack(members).astype(jnp.int32)
      perm = jax.lax.dynamic_update_slice(perm, members, (g * group_size,))
      return remaining, perm

    init = (jnp.ones((d,), bool), jnp.zeros((d,), jnp.int32))
    return jax.lax.fori_loop(0, d // group_size, step, init)[1]

  return jax.vmap(jax.vmap(jax.vmap(one_block)))(norms, dist)


# ----------------------------------------------------------------------------------------
# Maps of a permutation (the only implementations of membership and representatives)
# ----------------------------------------------------------------------------------------


def group_of_column(perm: jax.Array, group_size: int) -> jax.Array:
  """int32 `[..., d]`: the group index of every column (inverse permutation // G)."""
  return (jnp.argsort(perm, axis=-1) // group_size).astype(jnp.int32)


def membership(perm: jax.Array, group_size: int, dtype=jnp.float32) -> jax.Array:
  """One-hot `[..., d, d/G]`: entry (c, g) is 1 iff column c belongs to group g."""
  d = perm.shape[-1]
  return jax.nn.one_hot(group_of_column(perm, group_size), d // group_size, dtype=dtype)


def rep_weights(perm: jax.Array, group_size: int, representative: str,
                dtype=jnp.float32) -> jax.Array:
  """`[..., d, d/G]` weights W with `Q_rep = Q @ W` for the chosen representative."""
  d = perm.shape[-1]
  if representative == "mean":
    return membership(perm, group_size, dtype) / group_size
  if representative == "sample":
    first = perm[..., ::group_size]  # first column of each group: [..., d/G]
    return jnp.swapaxes(jax.nn.one_hot(first, d, dtype=dtype), -1, -2)
  raise ValueError(f"representative must be 'mean' or 'sample', got {representative!r}")


def member_indices(perm: jax.Array, group_size: int) -> jax.Array:
  """int32 `[..., G, d/G]`: row j lists the j-th member column of every group."""
  d = perm.shape[-1]
  return jnp.swapaxes(perm.reshape(perm.shape[:-1] + (d // group_size, group_size)), -1, -2)


# ----------------------------------------------------------------------------------------
# Per-block products (the only implementation of blockwise Q @ map)
# ----------------------------------------------------------------------------------------


def _acc_dtype(dtype):
  """Accumulation dtype: float32, or float64 for float64 inputs (never round them)."""
  return jnp.promote_types(dtype, jnp.float32)


HALF_DTYPES = (jnp.bfloat16, jnp.float16)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def exact_einsum(spec, x, w):
  """`einsum(spec, x, w)` in `x.dtype` with float32 accumulation (float64 for float64), no
  TF32 rounding; `w` is cast to `x.dtype` first (the maps are exact in bf16 for groupings).

  The custom JVP keeps the backward fast for bf16/f16: plain autodiff contracts the
  float32 cotangent of the final cast with `w` at HIGHEST precision, an emulated float32
  GEMM (0.25 ms for the two projections' backward at B=1, H=16, N=16384, d=128, G=4 on
  an H100, 2026-12-06, 4x their forward). For half-precision inputs the tangent's
  product runs at the default precision instead: its operands (the cotangent, which
  arrives in `x.dtype`, and `w` in `x.dtype`) have 8- or 11-bit significands, exact in
  TF32, so a GPU's TF32 tensor cores lose nothing (and a CPU computes float32).
  """
  return _exact_einsum(spec, x, w)


def _exact_einsum(spec, x, w):
  return jnp.einsum(spec, x, w.astype(x.dtype), precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=_acc_dtype(x.dtype)).astype(x.dtype)


def _exact_einsum_jvp(spec, primals, tangents):
  x, w = primals
  dx, dw = tangents
  out = _exact_einsum(spec, x, w)
  precision = None if x.dtype in HALF_DTYPES else jax.lax.Precision.HIGHEST
  acc = _acc_dtype(x.dtype)
  # Operands rounded as the primal's are, then taken in the accumulation dtype (XLA's CPU
  # has no bf16 x bf16 -> f32 dot at the default precision).
  low = lambda a: a.astype(x.dtype).astype(acc)  # noqa: E731
  dout = jnp.zeros(out.shape, acc)
  if not isinstance(dx, jax.custom_derivatives.SymbolicZero):
    dout = dout + jnp.einsum(spec, low(dx), low(w), precision=precision)
  if not isinstance(dw, jax.custom_derivatives.SymbolicZero):
    dout = dout + jnp.einsum(spec, low(x), low(dw), precision=precision)
  return out, dout.astype(x.dtype)


exact_einsum.defjvp(_exact_einsum_jvp, symbolic_zeros=True)


def blockwise_matmul(x, w, block_q, *, per_batch_row=False):
  """`x [B, T, H, c]` times each row's block matrix `w [B, H, nb, c, e]` -> `[B, T, H, e]`.

  Row t uses block `t // block_q`. Works on the BTNH layout directly (rows reshaped into
  blocks, no transposes), with exact accumulation for one-hot/averaging weights: float32
  (float64 for float64), no TF32 rounding. `w` may have more blocks than `x` needs.
  `per_batch_row`: one product per batch row (`prep.einsum_per_batch_row`; GPU kernel
  path only).
  """
  batch, length, heads, _ = x.shape
  xb = lsh.query_blocks(x, block_q)                        # [B, nb, rows, H, c]
  num_blocks, rows = xb.shape[1], xb.shape[2]
  y = prep.einsum_per_batch_row("bnrhd,bhndg->bnrhg", xb, w[:, :, :num_blocks],
                                einsum=exact_einsum, per_batch_row=per_batch_row)
  return y.reshape(batch, num_blocks * rows, heads, y.shape[-1])[:, :length]


# ----------------------------------------------------------------------------------------
# The grouping result
# ----------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HeadReduction:
  """How one call reduces the head dimension: the grouping's result, for every backend.

  Build it with `from_permutation` or `from_maps`. Arrays (pytree children):
    perm: int32 `[B, H, nb, d]` for permutation groupings, else None.
    dense_q_map, dense_k_map: float32 `[B, H, nb, d, r]` and `[B, Hk, nb, d, r]`
      (Hk = H or kv_heads) for dense groupings, else None.
  Static (pytree aux data): group_size G, block_q, representative.

  Optional (dense maps, one block per sequence, from the GPU factorisation program):
    map_parts: `(q_parts [B, H, 2, r, d], k_parts [B, Hk, 2, r, d])` bfloat16, the maps
      as the Mosaic kernels hold them (`pallas_kernels.mosaic_gpu.project.split_map`),
      q_parts with the softmax scale `parts_scale` (static) folded in; None elsewhere.

  Derived: `num_blocks` nb, `head_dim` d, `width` r = d / G, `q_map`, `k_map`,
  `is_permutation`. Builders: `q_rep(query, scale)`, `k_fused(key)`,
  `k_fused_blocks(key)`, `q_exp(query)`, and `member_indices()` (permutations only).
  """

  perm: jax.Array | None
  dense_q_map: jax.Array | None
  dense_k_map: jax.Array | None
  group_size: int = dataclasses.field(metadata=dict(static=True))
  block_q: int = dataclasses.field(metadata=dict(static=True))
  representative: str = dataclasses.field(metadata=dict(static=True))
  map_parts: tuple[jax.Array, jax.Array] | None = None
  parts_scale: float | None = dataclasses.field(default=None, metadata=dict(static=True))

  @classmethod
  def from_permutation(cls, perm, *, group_size, block_q, representative="mean"):
    return cls(perm=perm, dense_q_map=None, dense_k_map=None, group_size=group_size,
               block_q=block_q, representative=representative)

  @classmethod
  def from_maps(cls, q_map, k_map, *, block_q, map_parts=None, parts_scale=None):
    """Dense maps `q_map [B, H, nb, d, r]`, `k_map [B, Hk, nb, d, r]` (Hk divides H);
    optionally their `map_parts` with `parts_scale` (see the class docstring)."""
    d, r = q_map.shape[-2:]
    if k_map.shape[-2:] != (d, r) or k_map.shape[2] != q_map.shape[2]:
      raise ValueError(f"q_map {q_map.shape} and k_map {k_map.shape} must share nb, d, r")
    if q_map.shape[1] % k_map.shape[1]:
      raise ValueError(f"k_map heads ({k_map.shape[1]}) must divide q_map heads "
                       f"({q_map.shape[1]})")
    if map_parts is not None:
      want = tuple(m.shape[:2] + (2, r, d) for m in (q_map, k_map))
      if (q_map.shape[2] != 1 or parts_scale is None
          or tuple(p.shape for p in map_parts) != want):
        raise ValueError(f"map_parts must be {want} with one block and a parts_scale, got "
                         f"{[p.shape for p in map_parts]}, nb={q_map.shape[2]}, "
                         f"parts_scale={parts_scale}")
    return cls(perm=None, dense_q_map=q_map, dense_k_map=k_map, group_size=d // r,
               block_q=block_q, representative="map", map_parts=map_parts,
               parts_scale=None if map_parts is None else parts_scale)

  # -- shapes --
  @property
  def is_permutation(self) -> bool:
    return self.perm is not None

  @property
  def num_blocks(self) -> int:
    return (self.perm if self.is_permutation else self.dense_q_map).shape[2]

  @property
  def head_dim(self) -> int:
    return self.perm.shape[-1] if self.is_permutation else self.dense_q_map.shape[-2]

  @property
  def width(self) -> int:
    return self.head_dim // self.group_size

  # -- maps --
  @property
  def q_map(self) -> jax.Array:
    """float32 `[B, H, nb, d, r]` with `Q_rep = Q_block @ q_map`."""
    if not self.is_permutation:
      return self.dense_q_map
    return rep_weights(self.perm, self.group_size, self.representative)

  @property
  def k_map(self) -> jax.Array:
    """float32 `[B, Hk, nb, d, r]` with `K_fused = K @ k_map` (permutations: Hk = H)."""
    if not self.is_permutation:
      return self.dense_k_map
    return membership(self.perm, self.group_size)

  def member_indices(self) -> jax.Array:
    """int32 `[B, H, nb, G, r]` member columns of every group (permutations only)."""
    if not self.is_permutation:
      raise ValueError("member_indices needs a permutation grouping, not dense maps")
    return member_indices(self.perm, self.group_size)

  # -- builders --
  def q_rep(self, query: jax.Array, scale: float = 1.0, *,
            per_batch_row: bool = False) -> jax.Array:
    """`Q_rep [B, Tq, H, r]` (times `scale`, folded into the map, when it is not 1).
    `per_batch_row`: one product per batch row (GPU kernel backends; see
    `prep.einsum_per_batch_row`), also for `k_fused` and `k_fused_blocks`."""
    q_map = self.q_map if scale == 1.0 else self.q_map * scale
    return blockwise_matmul(query, q_map, self.block_q, per_batch_row=per_batch_row)

  def _k_map_per_kv_head(self, kv_heads: int) -> jax.Array:
    """k_map as `[B, Hkv, Hk / Hkv, nb, d, r]`."""
    k_map = self.k_map
    batch, hk = k_map.shape[:2]
    return k_map.reshape(batch, kv_heads, hk // kv_heads, *k_map.shape[2:])

  def k_fused_blocks(self, key: jax.Array, *, per_batch_row: bool = False) -> jax.Array:
    """`K_fused [B, Hk, nb, Tk, r]` per grouping block, from `key [B, Tk, Hkv, d]`.

    With GQA and a permutation grouping each query head gets its own fused keys, since
    its grouping is its own (Hk = H).
    """
    batch, kv_len, kv_heads, _ = key.shape
    m = self._k_map_per_kv_head(kv_heads)
    k_fused = prep.einsum_per_batch_row("bskd,bkrndg->bkrnsg", key, m, einsum=exact_einsum,
                                        per_batch_row=per_batch_row)
    return k_fused.reshape(batch, -1, self.num_blocks, kv_len, self.width)

  def k_fused(self, key: jax.Array, *, per_batch_row: bool = False) -> jax.Array:
    """`K_fused`: with one grouping block (nb == 1) a BTNH array `[B, Tk, Hk, r]` (what
    attention kernels take), else per block `[B, Hk, nb, Tk, r]` (`k_fused_blocks`)."""
    if self.num_blocks != 1:
      return self.k_fused_blocks(key, per_batch_row=per_batch_row)
    batch, kv_len, kv_heads, _ = key.shape
    m = self._k_map_per_kv_head(kv_heads)[:, :, :, 0]        # [B, Hkv, Hk/Hkv, d, r]
    k_fused = prep.einsum_per_batch_row("bskd,bkrdg->bskrg", key, m, einsum=exact_einsum,
                                        per_batch_row=per_batch_row)
    return k_fused.reshape(batch, kv_len, -1, self.width)

  def q_exp(self, query: jax.Array) -> jax.Array:
    """`Q_exp = Q q_map k_map^T` `[B, Tq, H, d]`: exact attention at `Q_exp` has the
    reduced scores (for a permutation: each representative in every column of its
    group)."""
    heads = query.shape[2]
    k_map = self.k_map
    if k_map.shape[1] != heads:
      k_map = jnp.repeat(k_map, heads // k_map.shape[1], axis=1)
    expand = jnp.einsum("bhndg,bhncg->bhndc", self.q_map, k_map)  # [.., d, d]
    return blockwise_matmul(query, expand, self.block_q)


def reduce_heads(query, key, config, *, query_valid=None, key_valid=None,
                 use_kernel=False, parts_scale=None) -> HeadReduction | None:
  """The grouping step of `distr_attention`: None for `group_size == 1` (exact).

  `config` is a validated `DistrConfig`; `query_valid`/`key_valid` bool `[B, T]` mark
  real (not padding) rows; `use_kernel` lets "greedy" and "lowrank" run their Pallas
  kernels (only for GPU kernel backends, so implementation="xla" runs no Pallas code);
  `parts_scale` (the softmax scale) asks a dense grouping for `HeadReduction.map_parts`
  (the Mosaic backend's), which it gives where its GPU program computes them.
  """
  if config.group_size == 1:
    return None
  if config.grouping in DENSE_GROUPINGS:
    q_map, k_map, parts = DENSE_GROUPINGS[config.grouping](
        query, key, config=config, query_valid=query_valid, key_valid=key_valid,
        use_kernel=use_kernel, parts_scale=parts_scale)
    return HeadReduction.from_maps(jax.lax.stop_gradient(q_map),
                                   jax.lax.stop_gradient(k_map), block_q=config.block_q,
                                   map_parts=parts, parts_scale=parts_scale)
  perm = block_permutations(
      query, block_q=config.block_q, group_size=config.group_size,
      grouping=config.grouping, num_projs=config.num_projs, seed=config.seed,
      query_valid=query_valid, use_kernel=use_kernel)
  return HeadReduction.from_permutation(perm, group_size=config.group_size,
                                        block_q=config.block_q,
                                        representative=config.representative)
