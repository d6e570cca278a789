"""The "mosaic" backend: DistrAttention through our warp-specialised Hopper kernels.

Grouping in XLA (Q_rep with the softmax scale folded in, K_fused), attention in
`pallas_kernels.mosaic_gpu`: an `r = d/G`-wide score product and a full-width V, forward
and backward, causal, GQA (K_fused may have one head per query head while V keeps its
kv heads). One grouping block per sequence runs one kernel call; grouping blocks of a
multiple of 128 rows run one call per block with that block's K_fused.
Measured on an H100 (docs/KERNEL_NOTES.md, latest 2026-12-06, kernel time): 1.39x cuDNN
forward and ~1.49x forward+backward at d=128, G=4, N=16384; 1.51x forward at d=256, G=4;
G=1 (exact) 0.99x forward, 0.90-0.92x forward+backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distrattention_jax import devices
from distrattention_jax.backends import base

PREFERRED_MIN_KV_LEN = 16384  # None picks mosaic from here (measured, see preferred_for)
MIN_BLOCK = 128  # grouping blocks: a multiple of the kernels' 128-row query tile


def _supports(problem: base.Problem) -> str | None:
  if problem.dtype not in (jnp.bfloat16, jnp.float16):
    return f"{jnp.dtype(problem.dtype).name} inputs (the Mosaic kernels take bfloat16 or float16)"
  if problem.has_mask:
    return "a dense boolean `mask` (use implementation='xla' or 'triton')"
  if problem.has_segment_ids:
    return "segment_ids (use implementation='triton' or 'xla')"
  if problem.has_q_lengths or problem.has_kv_lengths:
    return "per-sequence lengths (query_seq_lengths / key_value_seq_lengths)"
  if problem.group_size > 1 and problem.num_blocks > 1 and problem.block_q % MIN_BLOCK:
    return (f"grouping blocks of {problem.block_q} rows (the Mosaic kernels take one "
            f"grouping per sequence or blocks of a multiple of {MIN_BLOCK} rows)")
  width, value_dim = problem.width, problem.value_dim
  if width % 16 or not 16 <= width <= 256:
    return f"a score width d/G={width} (the Mosaic kernels need a multiple of 16 in [16, 256])"
  if value_dim % 64 or not 64 <= value_dim <= 256:
    return f"value head_dim {value_dim} (the Mosaic kernels need 64, 128, 192 or 256)"
  if width + value_dim > 384:
    return f"score width {width} with value width {value_dim} (shared memory)"
  if problem.platform == "gpu" and not devices.is_hopper():
    return "this GPU (the Mosaic kernels need Hopper, compute capability 9.x: wgmma)"
  return None


def _map_parts(reduction, problem):
  """`(q_parts, k_parts)` that the factorisation program wrote (`HeadReduction.map_parts`)
  where they fit this call (the query part with this call's scale), else None: the
  kernels' callers then split the float32 maps in XLA (two small fusions, ~0.003 ms at
  B=1, H=16, d=128 on an H100, eleventh session)."""
  if reduction.map_parts is None or reduction.parts_scale != problem.scale:
    return None
  return reduction.map_parts


def _k_fused(reduction, key, kernel_path: bool, k_parts=None):
  """`K_fused [B, Tk, Hk, r]` of one grouping block: on the GPU kernel path by the Mosaic
  projection kernel where it applies (BTNH output written in place: no per-row products
  stacked), else `reduction.k_fused`. k_parts: the map's parts, if already split."""
  from pallas_kernels.mosaic_gpu import project  # pylint: disable=import-outside-toplevel
  k_map = reduction.k_map[:, :, 0]                              # [B, Hk, d, r]
  k_map = jnp.broadcast_to(k_map, (key.shape[0],) + k_map.shape[1:])
  if kernel_path and project.supports(key.shape, k_map.shape, key.dtype) is None:
    return project.projected(key, k_map, k_parts)
  return reduction.k_fused(key, per_batch_row=kernel_path)


class MosaicBackend(base.Backend):
  """DistrAttention through pallas_kernels.mosaic_gpu (see the module docstring)."""

  name = "mosaic"
  needs_gpu = True
  takes_map_parts = True
  off_gpu_hint = "use 'xla' or 'triton_interpret' on a CPU"

  def supports(self, problem):
    return _supports(problem)

  def preferred_for(self, problem):
    # Measured end to end on an H100 (README "Results", 2026-11-25, B=1, H=16, bf16;
    # benchmarks/results/speed-mosaic-e2e-*): with one grouping per sequence and 16384
    # keys, G=2..8 beat cuDNN (d=128 G=4: 1.21x forward, 1.34x forward+backward); G=1
    # (0.88x forward+backward), per-1024-row grouping blocks (0.78-0.99x) and 4096 keys
    # (0.75x forward) did not. Lengths between 4096 and 16384 are unmeasured. Elsewhere
    # None goes on to cuDNN; implementation="mosaic" still runs all of these.
    return (problem.group_size > 1 and problem.num_blocks == 1
            and problem.kv_len >= PREFERRED_MIN_KV_LEN)

  def __call__(self, query, key, value, reduction, masks, problem):
    """`[B, Tq, H, dv]`; rows with no key to attend are 0 (the kernels return 0 there)."""
    from pallas_kernels.mosaic_gpu import attention as mosaic  # pylint: disable=import-outside-toplevel
    causal = masks.is_causal
    if reduction is None:
      q = (query.astype(jnp.float32) * problem.scale).astype(query.dtype)
      return mosaic.attention(q, key, value, causal=causal)
    # One projection per batch row on the GPU kernel path (prep.einsum_per_batch_row).
    rows = self.uses_grouping_kernel
    if reduction.num_blocks == 1:
      q_parts, k_parts = _map_parts(reduction, problem) or (None, None)
      k_fused = _k_fused(reduction, key, rows, k_parts)         # [B, Tk, Hk, r]
      q_map = reduction.q_map[:, :, 0] * problem.scale          # [B, H, d, r], scale in
      q_map = jnp.broadcast_to(q_map, (query.shape[0],) + q_map.shape[1:])
      if mosaic.projection_supported(query.shape, q_map.shape, value.shape,
                                     query.dtype) is None:
        # Q_rep inside the forward kernel: Q is read once there instead of projected,
        # written and read again (docs/KERNEL_NOTES.md, seventh session).
        return mosaic.attention_projected(query, jax.lax.stop_gradient(q_map), k_fused,
                                          value, causal=causal, q_map_parts=q_parts)
      q_rep = reduction.q_rep(query, problem.scale, per_batch_row=rows).astype(query.dtype)
      return mosaic.attention(q_rep, k_fused, value, causal=causal)
    q_rep = reduction.q_rep(query, problem.scale, per_batch_row=rows).astype(query.dtype)
    k_blocks = reduction.k_fused_blocks(key, per_batch_row=rows)  # [B, Hk, nb, Tk, r]
    k_blocks = jnp.transpose(k_blocks, (0, 2, 3, 1, 4))       # [B, nb, Tk, Hk, r]
    return mosaic.attention_blocked(q_rep, k_blocks, value, group_block_q=reduction.block_q,
                                    causal=causal)
