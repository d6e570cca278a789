"""grouping="lowrank": the best rank-r factorisation of each block's scores (r = d / G).

DistrAttention's grouping computes `Q (M M^T / G) K^T`, a rank-r factorisation of the
scores with 0/1-structured maps. The narrow kernels only need `Q' = Q A` and
`K' = K B` for some `A, B: [d, r]`; this module chooses the best ones. For a block of
query rows `Q_b` and the head's keys `K`, with Gram square roots `Q_b^T Q_b = Rq^T Rq`,
`K^T K = Rk^T Rk` and the SVD `Rq Rk^T = X Sig Y^T`,

    A = Rk^T Y_r Sig_r^(-1/2),   B = Rq^T X_r Sig_r^(-1/2)

give `(Q_b A)(K B)^T = X' Sig_r Y'^T`, the best rank-r approximation of `Q_b K^T` in the
Frobenius norm (Eckart-Young), from `d x d` matrices only and without inverting a Gram.
Singular values below `1e-4` of the largest are dropped (their columns are zero).

Two methods compute it:
  "exact": eigh square roots and an SVD, as written above (fine on a CPU; on a GPU a
    batched SVD of many small matrices costs ~10x the attention: LOWRANK_NOTES.md).
  "iter": matmuls only (pallas_kernels.triton.lowrank_factor): subspace iteration on `Gq Gk`
    for the top-r right singular subspace, then `A = Gk Z`, `B = Z` with `Z^T Gk Z = I`,
    which projects every score row on that subspace (the optimum once it is the top-r
    subspace; tests/test_lowrank.py measures how close 4 steps get). On a GPU one fused
    Pallas program per (batch, head, block) runs it; elsewhere the same code runs vmapped.

Which rows and keys enter the Grams: the block's real query rows (rows where
`query_valid` is False, i.e. padding, are zeroed) and the real keys of the batch row
(`key_valid`: keys past `key_value_seq_lengths`). Causal masking and segment ids do NOT
restrict the key Gram: every block is fitted to its scores against all real keys of its
sequence, masked entries included (the softmax masks them afterwards). So, like the
paper's per-block grouping, a factorisation computed from the data looks at every row of
its block and at later keys: under causal masking a query's output can depend on later
tokens through A and B. Two causal-safe choices for autoregressive models:
  * fixed maps: `calibrate_lowrank_maps` on a calibration batch (or a prefix), passed
    back in and held for every row: they depend on no token of the sequence processed;
  * `causal_prefix_maps`: block n fitted on the tokens before it (running Gram sums),
    block 0 on fixed maps: adapts to the sequence and stays causal.

GQA: `per_kv_head=False` fits one factorisation per query head (`Hk = H`: K' has one
head per query head); `per_kv_head=True` fits one per kv head to the stacked scores of
its query heads (their query Grams summed), so `K'` stays at the kv-head count. (For a
shared B the best A is the same for every query head of the group, so nothing is lost by
sharing A too.)

All maps are float32 and carry no gradient (`stop_gradient`): the factorisation is
treated as a constant, like a grouping's permutation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distrattention_jax import prep

METHODS = ("auto", "exact", "iter")
DROP_RATIO = 1e-4   # singular values below this fraction of the largest are dropped
DEFAULT_STEPS = 2   # subspace iterations of method="iter" (docs/KERNEL_NOTES.md, "lowrank")


def query_grams(query, block_q, query_valid=None, *, kv_heads=None, per_batch_row=False):
  """`Q_b^T Q_b` per block: float32 `[B, H, nb, d, d]` (`[B, Hkv, nb, d, d]`, the query
  heads of each kv head summed, when `kv_heads` is given). Padding rows are left out.
  `per_batch_row`: see `prep.einsum_per_batch_row` (the GPU kernel path)."""
  gram = prep.head_grams(query, block_q, query_valid, per_batch_row=per_batch_row)
  return gram if kv_heads is None else _pool_kv_heads(gram, kv_heads)


def _pool_kv_heads(gram, kv_heads):
  """`[B, H, nb, d, d]` -> `[B, Hkv, nb, d, d]`: the query Grams of each kv head summed."""
  batch, heads, nb, d, _ = gram.shape
  return gram.reshape(batch, kv_heads, heads // kv_heads, nb, d, d).sum(2)


def key_grams(key, key_valid=None, *, per_batch_row=False):
  """`K^T K` over the real keys: float32 `[B, Hkv, d, d]`."""
  return prep.head_grams(key, max(key.shape[1], 1), key_valid,
                         per_batch_row=per_batch_row)[:, :, 0]


def _psd_root(gram):
  """`R` with `R^T R = gram` (eigh; negative rounding eigenvalues clamped to 0)."""
  lam, u = jnp.linalg.eigh(gram)
  return jnp.sqrt(jnp.maximum(lam, 0.0))[..., :, None] * jnp.swapaxes(u, -1, -2)


def factor_exact(gq, gk, rank):
  """`(A, B)` `[..., d, r]` from Grams by square roots and an SVD (the formula above)."""
  hi = jax.lax.Precision.HIGHEST
  rq, rk = _psd_root(gq), _psd_root(gk)
  x, sig, yt = jnp.linalg.svd(jnp.matmul(rq, jnp.swapaxes(rk, -1, -2), precision=hi))
  x, sig, y = x[..., :rank], sig[..., :rank], jnp.swapaxes(yt, -1, -2)[..., :rank]
  keep = sig > DROP_RATIO * sig[..., :1]
  inv_root = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, sig, 1.0)), 0.0)[..., None, :]
  a = jnp.matmul(jnp.swapaxes(rk, -1, -2), y, precision=hi) * inv_root
  b = jnp.matmul(jnp.swapaxes(rq, -1, -2), x, precision=hi) * inv_root
  return a, b


KERNEL_MAX_HEAD_DIM = 128  # widest head dim the fused factorisation program serves
KERNEL_MAX_RANK = 32       # and highest rank r = d / G


def _program_serves(d, rank) -> bool:
  """Whether the fused factorisation program takes head dim d and rank r. At d=256
  (r=64) it asked for 262144 bytes of shared memory with 128-row Gram blocks (232448 on
  an H100) and compiled for over 125 s with 64-row blocks; at d=128, r=64 (G=2) it
  compiled for 64-107 s, once per shape (2026-12-06,
  benchmarks/lowrank_kernel_variants.py). So wider heads and ranks above 32 run the same
  iteration as XLA ops (same result, more launches)."""
  return d <= KERNEL_MAX_HEAD_DIM and rank <= KERNEL_MAX_RANK


def _check_method(method):
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def factor_iter(gq, gk, rank, *, steps=DEFAULT_STEPS, use_kernel=None):
  """`(A, B)` `[..., d, r]` by subspace iteration (matmuls only).

  `gk` has the batch shape of `gq` or is broadcastable to it from the left (e.g. one key
  Gram shared by every block). `use_kernel`: the fused Pallas program (None: on a GPU).
  Both paths run `lowrank_factor.factor_pair`, which normalises the Grams to unit trace
  (float32 overflow) and rescales the maps exactly.
  """
  from pallas_kernels.triton import lowrank_factor  # pylint: disable=import-outside-toplevel
  d = gq.shape[-1]
  batch_shape = gq.shape[:-2]
  gk = jnp.broadcast_to(gk, batch_shape + (d, d))
  if use_kernel is None:
    use_kernel = jax.default_backend() == "gpu"
  use_kernel = use_kernel and _program_serves(d, rank)
  if use_kernel:
    a, b = lowrank_factor.factor_grams_kernel(
        gq.reshape(-1, d, d), gk.reshape(-1, d, d), rank=rank, steps=steps,
        interpret=jax.default_backend() != "gpu")
    return a.reshape(batch_shape + (d, rank)), b.reshape(batch_shape + (d, rank))
  z0 = jnp.asarray(lowrank_factor.start_subspace(d, rank))
  hi = jax.lax.Precision.HIGHEST
  plan = lowrank_factor.plan_for_steps(steps)

  def one(gq1, gk1):
    (a,), (b,) = lowrank_factor.factor_pair(
        lambda x: (jnp.matmul(gq1, x[0], precision=hi),),
        lambda x: (jnp.matmul(gk1, x[0], precision=hi),), (z0,), plan=plan,
        trace_q=jnp.trace(gq1), trace_k=jnp.trace(gk1))
    return a, b

  a, b = jax.vmap(one)(gq.reshape(-1, d, d), gk.reshape(-1, d, d))
  return a.reshape(batch_shape + (d, rank)), b.reshape(batch_shape + (d, rank))


def factor_grams(gq, gk, rank, *, method="auto", steps=DEFAULT_STEPS, use_kernel=None):
  """`(A, B)` `[..., d, r]` for query Grams `gq [..., d, d]` and key Grams `gk`."""
  _check_method(method)
  if method == "auto":
    method = "iter" if jax.default_backend() == "gpu" else "exact"
  if method == "exact":
    return factor_exact(gq, jnp.broadcast_to(gk, gq.shape), rank)
  return factor_iter(gq, gk, rank, steps=steps, use_kernel=use_kernel)


def _check(query, key, group_size):
  d = query.shape[-1]
  if key.shape[-1] != d or query.ndim != 4 or key.ndim != 4:
    raise ValueError(f"query [B, Tq, H, d] and key [B, Tk, Hkv, d] expected, got "
                     f"{query.shape}, {key.shape}")
  if not isinstance(group_size, int) or group_size < 1 or d % group_size:
    raise ValueError(f"group_size must be a positive int dividing d={d}, got {group_size!r}")
  if query.shape[2] % key.shape[2]:
    raise ValueError(f"query heads ({query.shape[2]}) must be a multiple of key heads "
                     f"({key.shape[2]})")
  return d // group_size


def lowrank_maps(query, key, *, block_q, group_size, query_valid=None, key_valid=None,
                 per_kv_head=False, method="auto", steps=DEFAULT_STEPS, use_kernel=None):
  """The best rank-(d/G) maps per (batch, head, query block).

  Args:
    query: `[B, Tq, H, d]`; key: `[B, Tk, Hkv, d]` (any float dtype).
    block_q: rows per block (one factorisation per sequence when `block_q >= Tq`).
    group_size: G; the rank is `r = d // G`.
    query_valid: optional bool `[B, Tq]`, False for padding rows (left out of the Grams).
    key_valid: optional bool `[B, Tk]`, False for padding keys (left out of the Grams).
    per_kv_head: one factorisation per kv head (its query heads' Grams pooled) instead
      of one per query head.
    method: "exact" (eigh + SVD), "iter" (matmul-only subspace iteration), "auto"
      (iter on a GPU, exact elsewhere).
    steps: subspace iterations of "iter".
    use_kernel: the GPU kernel path (None: on a GPU): the fused factorisation program,
      and the Grams by the Mosaic GPU Gram kernel (`prep.head_grams`; where it does not
      apply, one product per batch row, `prep.einsum_per_batch_row`).

  Returns:
    `(q_map [B, H, nb, d, r], k_map [B, Hk, nb, d, r])` float32 under `stop_gradient`,
    Hk = Hkv if per_kv_head else H: `Q' = Q_b q_map` and `K' = K k_map` with `Q' K'^T`
    the best rank-r approximation of `Q_b K^T` (the softmax scale is not included).
  """
  return lowrank_maps_and_parts(
      query, key, block_q=block_q, group_size=group_size, query_valid=query_valid,
      key_valid=key_valid, per_kv_head=per_kv_head, method=method, steps=steps,
      use_kernel=use_kernel)[:2]


def lowrank_maps_and_parts(query, key, *, block_q, group_size, query_valid=None,
                           key_valid=None, per_kv_head=False, method="auto",
                           steps=DEFAULT_STEPS, use_kernel=None, parts_scale=None):
  """`lowrank_maps` and, where the GPU program computed them, the maps as the Mosaic GPU
  kernels hold them: `(q_map, k_map, parts)` with parts None or (one block per sequence,
  bfloat16 inputs, `parts_scale` given) `(q_parts [B, H, 2, r, d], k_parts [B, Hk, 2, r,
  d])` bfloat16, `q_parts = split_map(parts_scale * q_map)` and `k_parts =
  split_map(k_map)` (`pallas_kernels.mosaic_gpu.project.split_map`), written by the
  factorisation program itself so no XLA op runs between it and the Mosaic kernels."""
  rank = _check(query, key, group_size)
  heads, kv_heads = query.shape[2], key.shape[2]
  group = heads // kv_heads
  if use_kernel is None:
    use_kernel = jax.default_backend() == "gpu"
  if use_kernel:
    maps = _stacked_kernel_maps(query, key, block_q=block_q, rank=rank,
                                query_valid=query_valid, key_valid=key_valid,
                                per_kv_head=per_kv_head, method=method, steps=steps,
                                parts_scale=parts_scale)
    if maps is not None:
      return maps
  # The GPU kernel path: the Mosaic Gram kernel (one launch for Q and K), else one
  # einsum per batch row (prep).
  rows = bool(use_kernel)
  gq, gk = prep.head_grams_multi(
      [(query, block_q, query_valid), (key, max(key.shape[1], 1), key_valid)],
      per_batch_row=rows, kernel=rows)                              # [B, H, nb, d, d]
  gk = gk[:, :, 0]                                                  # [B, Hkv, d, d]
  if per_kv_head:
    gq = _pool_kv_heads(gq, kv_heads)                               # [B, Hkv, nb, d, d]
    a, b = factor_grams(gq, gk[:, :, None], rank, method=method, steps=steps,
                        use_kernel=use_kernel)
    q_map = jnp.repeat(a, group, axis=1)
  else:
    gk_h = jnp.repeat(gk, group, axis=1)[:, :, None]               # [B, H, 1, d, d]
    q_map, b = factor_grams(gq, gk_h, rank, method=method, steps=steps,
                            use_kernel=use_kernel)
  return jax.lax.stop_gradient(q_map), jax.lax.stop_gradient(b), None


def _stacked_kernel_maps(query, key, *, block_q, rank, query_valid, key_valid, per_kv_head,
                         method, steps, parts_scale=None):
  """`lowrank_maps` on the GPU kernel path with the Grams in one array: the Mosaic Gram
  kernel writes the query Grams (per kv head: the group's summed by its reduce-add) and
  then the key Grams (`prep.stacked_head_grams`), and the fused program reads both by
  index (`factor_stacked_grams_kernel`), so nothing is concatenated, summed or broadcast
  between the two kernels. Program `(b, h, block)` takes key Gram `(b, h // group)`:
  index `i // (group * nb)` (per kv head: `i // nb`). None where this path does not
  apply (the caller goes on with `head_grams_multi` and `factor_grams`)."""
  from pallas_kernels.triton import lowrank_factor  # pylint: disable=import-outside-toplevel
  _check_method(method)
  d = query.shape[-1]
  if method == "exact" or not _program_serves(d, rank):
    return None
  batch, heads, kv_heads = query.shape[0], query.shape[2], key.shape[2]
  group = heads // kv_heads
  pooled = group if per_kv_head else 1
  grams = prep.stacked_head_grams(
      [(query, block_q, query_valid), (key, max(key.shape[1], 1), key_valid)],
      pool=(pooled, 1))
  if grams is None:
    return None
  map_heads = heads // pooled
  nb = (grams.shape[0] - batch * kv_heads) // (batch * map_heads)
  # The Mosaic kernels' map parts: one block per sequence (what they take), bf16 inputs.
  with_parts = (parts_scale is not None and nb == 1 and rank % 16 == 0
                and query.dtype == jnp.bfloat16 and key.dtype == jnp.bfloat16)
  a, b, *parts = lowrank_factor.factor_stacked_grams_kernel(
      grams, num_query=batch * map_heads * nb, kv_group=group // pooled * nb, rank=rank,
      steps=steps, parts_scale=float(parts_scale) if with_parts else None)
  a, b = (m.reshape(batch, map_heads, nb, d, rank) for m in (a, b))
  parts = tuple(p.reshape(batch, map_heads, 2, rank, d) for p in parts) or None
  if per_kv_head:
    a = jnp.repeat(a, group, axis=1)
    if parts:
      parts = (jnp.repeat(parts[0], group, axis=1), parts[1])
  return (jax.lax.stop_gradient(a), jax.lax.stop_gradient(b),
          None if parts is None else jax.lax.stop_gradient(parts))


def causal_prefix_maps(query, key, *, block_q, group_size, first_maps, query_valid=None,
                       key_valid=None, per_kv_head=False, method="auto",
                       steps=DEFAULT_STEPS, use_kernel=None):
  """Causal-safe maps that adapt to the sequence: block n is fitted on tokens before it.

  For self-attention with aligned positions (`Tq == Tk`, causal top-left): block n's
  maps come from the Grams of query rows and keys `0 .. n * block_q - 1` only (running
  sums of the per-block Grams), so they depend on no token at or after the block's first
  row, and a query's output depends on no later token. Block 0 has no past and uses the
  fixed `first_maps` (`([H, d, r], [Hk, d, r])`, e.g. from `calibrate_lowrank_maps`).
  Returns `(q_map [B, H, nb, d, r], k_map [B, Hk, nb, d, r])` like `lowrank_maps`.
  """
  rank = _check(query, key, group_size)
  batch, q_len, heads, d = query.shape
  kv_heads = key.shape[2]
  if key.shape[1] != q_len:
    raise ValueError(f"causal_prefix_maps needs q_len == kv_len, got {q_len} and "
                     f"{key.shape[1]}")
  group = heads // kv_heads
  if key_valid is not None:
    key = jnp.where(key_valid[:, :, None, None], key, 0)
  gq = query_grams(query, block_q, query_valid, kv_heads=kv_heads if per_kv_head else None)
  gk = query_grams(key, block_q)                                  # [B, Hkv, nb, d, d]
  # Blocks < n only: a shifted running sum (not `cumsum - own`, whose rounding would
  # carry the block's own rows into its maps).
  gq, gk = (jnp.cumsum(jnp.pad(g[:, :, :-1], ((0, 0), (0, 0), (1, 0), (0, 0), (0, 0))),
                       axis=2) for g in (gq, gk))
  if not per_kv_head:
    gk = jnp.repeat(gk, group, axis=1)
  a, b = factor_grams(gq, gk, rank, method=method, steps=steps, use_kernel=use_kernel)
  if per_kv_head:
    a = jnp.repeat(a, group, axis=1)
  first_q, first_k = broadcast_maps(first_maps, batch, 1)
  for first, m in ((first_q, a), (first_k, b)):
    if first.shape[:2] + first.shape[3:] != m.shape[:2] + m.shape[3:]:
      raise ValueError(f"first_maps {first_q.shape}, {first_k.shape} do not match the maps "
                       f"{a.shape}, {b.shape} (per_kv_head={per_kv_head})")
  a = jnp.concatenate([first_q, a[:, :, 1:]], axis=2)
  b = jnp.concatenate([first_k, b[:, :, 1:]], axis=2)
  return jax.lax.stop_gradient(a), jax.lax.stop_gradient(b)


def calibrate_lowrank_maps(query, key, *, group_size, query_valid=None, key_valid=None,
                           per_kv_head=False, method="auto", steps=DEFAULT_STEPS):
  """Maps fitted once to a calibration batch (or a prefix), to be held fixed.

  One factorisation per head over every real row and key of the whole batch (the Grams
  summed over batch rows, i.e. the best rank-r approximation of the scores of all
  sequences stacked). The result depends on no token of the sequences it is later
  applied to, so causal masking stays exact: use this for autoregressive models.

  Returns:
    `(q_map [H, d, r], k_map [Hk, d, r])` float32; `broadcast_maps` expands them to the
    `[B, H, nb, d, r]` form.
  """
  rank = _check(query, key, group_size)
  heads, kv_heads = query.shape[2], key.shape[2]
  group = heads // kv_heads
  q_len = query.shape[1]
  gk = key_grams(key, key_valid).sum(0)                                   # [Hkv, d, d]
  if per_kv_head:
    gq = query_grams(query, q_len, query_valid, kv_heads=kv_heads).sum((0, 2))  # [Hkv, d, d]
    a, b = factor_grams(gq, gk, rank, method=method, steps=steps)
    q_map = jnp.repeat(a, group, axis=0)
  else:
    gq = query_grams(query, q_len, query_valid).sum((0, 2))                 # [H, d, d]
    q_map, b = factor_grams(gq, jnp.repeat(gk, group, axis=0), rank, method=method,
                            steps=steps)
  return jax.lax.stop_gradient(q_map), jax.lax.stop_gradient(b)


def broadcast_maps(maps, batch, num_blocks):
  """Fixed maps `([H, d, r], [Hk, d, r])` (or already `[B, H, nb, d, r]`) -> 5-D form."""
  out = []
  for m in maps:
    m = jnp.asarray(m, jnp.float32)
    if m.ndim == 3:
      m = jnp.broadcast_to(m[None, :, None], (batch, m.shape[0], num_blocks) + m.shape[1:])
    elif m.ndim != 5:
      raise ValueError(f"lowrank maps must be [H, d, r] or [B, H, nb, d, r], got {m.shape}")
    out.append(m)
  return tuple(out)
