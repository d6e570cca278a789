"""Column grouping per query block, and the linear maps it induces.

`block_permutations` decides, per block of `block_q` query rows, which head-dim columns
form a group (DESIGN.md steps 2-3). The other functions turn a permutation into the
matrices that implement step 4 as small matmuls:

* `membership`   M  `[..., d, d/G]`: `M[c, g] = 1` iff column c is in group g, so
  `K_fused = K @ M` (the sum of each group's key columns).
* `rep_weights`  W  `[..., d, d/G]`: `Q_rep = Q @ W` ("mean": `M / G`; "sample": the
  one-hot of each group's first column).
* `Q_exp = Q_rep @ M^T` puts each representative back into every column of its group, so
  `Q_rep K_fused^T == Q_exp K^T` (the identity the backward and the XLA path rely on).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distrattention_jax import lsh


def block_permutations(
    query: jax.Array,
    *,
    block_q: int,
    group_size: int,
    grouping: str = "greedy",
    num_projs: int = 16,
    seed: int = 0,
    query_valid: jax.Array | None = None,
) -> jax.Array:
  """Column permutation of every query block: int32 `[batch, heads, num_blocks, d]`.

  Consecutive runs of `group_size` entries are the groups. `grouping`:
    "greedy" (default): exact column distances within the block (`greedy_permutations`).
    "lsh": the paper's angular LSH with Gray-code ordering (`lsh.lsh_permutations`).
    "random": a random permutation per block (a control for accuracy studies).
  The result is a constant for differentiation (`stop_gradient`).
  """
  if grouping == "greedy":
    perm = greedy_permutations(query, block_q=block_q, group_size=group_size,
                               query_valid=query_valid)
  elif grouping == "lsh":
    perm = lsh.lsh_permutations(query, block_q=block_q, num_projs=num_projs, seed=seed,
                                query_valid=query_valid)
  elif grouping == "random":
    batch, q_len, heads, d = query.shape
    num_blocks = -(-q_len // block_q)
    keys = jax.random.split(jax.random.key(seed), batch * heads * num_blocks)
    perm = jax.vmap(lambda k: jax.random.permutation(k, d))(keys)
    perm = perm.reshape(batch, heads, num_blocks, d).astype(jnp.int32)
  else:
    raise ValueError(
        f"grouping must be one of ('lsh', 'greedy', 'random'), got {grouping!r}")
  return jax.lax.stop_gradient(perm)


def greedy_permutations(query, *, block_q, group_size, query_valid=None, use_kernel=None):
  """Groups each block's columns by exact Euclidean distance, greedily.

  Per block: take the remaining column of largest norm, add its `group_size - 1` nearest
  remaining columns (distances over the block's rows, from the `d x d` Gram matrix),
  repeat. `O(block_q d^2)` per block for the Gram matrix plus `d/G` cheap steps: small
  next to attention's `O(N d)` per row. `use_kernel` runs the steps in one Pallas
  program per block (`pallas_kernels.greedy`; None: on a GPU), where XLA would launch
  every step separately. Both give the same permutation. The Gram matrix is formed
  from the input dtype (bf16/f16 products are exact in float32), so the same values
  given as float32 may break an exact near-tie the other way. Returns int32
  `[batch, heads, nb, d]`.
  """
  query = jax.lax.stop_gradient(query)
  if query.dtype not in (jnp.bfloat16, jnp.float16):
    query = query.astype(jnp.float32)  # half-precision products are exact in float32
  batch, _, heads, d = query.shape
  blocks = lsh.query_blocks(query, block_q, query_valid)   # [B, nb, rows, H, d]
  num_blocks = blocks.shape[1]
  if group_size == 1:
    return jnp.broadcast_to(jnp.arange(d, dtype=jnp.int32), (batch, heads, num_blocks, d))
  gram = jnp.einsum("bnrhc,bnrhe->bhnce", blocks, blocks,
                    precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)     # [B, H, nb, d, d]
  if use_kernel is None:
    use_kernel = jax.default_backend() == "gpu"
  if use_kernel:
    from pallas_kernels import greedy as greedy_kernel  # pylint: disable=import-outside-toplevel
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


def _acc_dtype(dtype):
  """Accumulation dtype: float32, or float64 for float64 inputs (never round them)."""
  return jnp.promote_types(dtype, jnp.float32)


def _blockwise_matmul(query, w, block_q):
  """`query [B, T, H, d]` times each row's block matrix `w [B, H, nb, d, c]` -> `[B, T, H, c]`.

  Works on the BTNH layout directly (rows reshaped into blocks, no transposes), with
  exact accumulation for one-hot/averaging weights: float32 (float64 for float64), no
  TF32 rounding.
  """
  batch, length, heads, _ = query.shape
  x = lsh.query_blocks(query, block_q)                     # [B, nb, rows, H, d]
  num_blocks, rows = x.shape[1], x.shape[2]
  y = jnp.einsum("bnrhd,bhndg->bnrhg", x, w.astype(x.dtype),
                 precision=jax.lax.Precision.HIGHEST,
                 preferred_element_type=_acc_dtype(x.dtype)).astype(x.dtype)
  return y.reshape(batch, num_blocks * rows, heads, y.shape[-1])[:, :length]


def query_representatives(query, perm, group_size, block_q, representative):
  """`Q_rep`: `[B, T, H, d/G]`, each row using its block's grouping."""
  return _blockwise_matmul(query, rep_weights(perm, group_size, representative), block_q)


def expand_query(query, perm, group_size, block_q, representative):
  """`Q_exp`: `[B, T, H, d]`, each group's representative in every column of the group."""
  w = rep_weights(perm, group_size, representative)
  m = membership(perm, group_size)
  expand = jnp.einsum("bhndg,bhncg->bhndc", w, m)  # [.., d, d]: Q_exp = Q @ (W M^T)
  return _blockwise_matmul(query, expand, block_q)


def fuse_keys(key, perm, group_size):
  """`K_fused`: `[B, H, nb, Tk, d/G]`, the sum of each group's key columns per block.

  `key` is `[B, Tk, Hkv, d]`; with GQA each query head gets its own fused keys, since
  its grouping is its own.
  """
  batch, kv_len, kv_heads, d = key.shape
  heads = perm.shape[1]
  m = membership(perm, group_size).reshape(batch, kv_heads, heads // kv_heads,
                                           perm.shape[2], d, d // group_size)
  k_fused = jnp.einsum("bskd,bkrndg->bkrnsg", key, m.astype(key.dtype),
                       precision=jax.lax.Precision.HIGHEST,
                       preferred_element_type=_acc_dtype(key.dtype))
  return k_fused.reshape(batch, heads, perm.shape[2], kv_len, d // group_size).astype(key.dtype)
