"""Tile sizes of the Mosaic GPU attention kernels, and the table that picks them.

Widths: `r` is the score width (Q_rep / K_fused head dim), `dv` the value width.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

# Hopper: 227 KiB of shared memory per block (232448 bytes).
SMEM_BYTES = 232448
SM_COUNT = 132  # H100 SXM: CTAs in one wave (one per SM) for the Gram and projection grids
# Largest Tiles.rescale_threshold (log2): P <= 2^15 stays finite in float16 (max 65504).
MAX_RESCALE_THRESHOLD = 15.0


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes. Forward: each consumer warpgroup owns `block_q` query rows and the
  TMA warpgroup streams `block_kv`-key tiles of K and V through `stages` buffers.
  Backward: dQ kernel (`block_q_dq` rows per warpgroup, `block_kv_dq`-key stream) and
  dK/dV kernel (`block_kv_dkv` keys per warpgroup, `block_q_dkv`-row stream of Q, dO)."""
  block_q: int = 64
  block_kv: int = 128
  stages: int = 2
  compute_wgs: int = 2
  block_q_dq: int = 64
  block_kv_dq: int = 64
  block_q_dkv: int = 64
  block_kv_dkv: int = 64
  compute_wgs_bwd: int = 2
  stages_bwd: int = 2
  # Backward as one kernel (dK/dV + dQ by float32 TMA reduce-add) instead of two.
  fused_bwd: bool = False
  # Forward: keep a stale row max and skip the O rescale of a key tile unless some row's
  # max grew by more than this (log2 units; FlashAttention-4's conditional rescaling).
  # P may then reach 2^rescale_threshold. 0 = rescale every tile (no stale max).
  # A gain only for wide scores (r = dv = 128); slower for narrow ones (pick_tiles).
  rescale_threshold: float = 0.0
  # Forward epilogue: stage O in shared memory and copy it out by TMA (True), or store it
  # from registers (False), which frees compute_wgs * block_q * dv of shared memory for
  # wider key tiles.
  stage_out: bool = True

  def __post_init__(self):
    # wgmma works on 64-row warpgroup tiles; the key tiles are wgmma N/K dims.
    for name in ("block_q", "block_q_dq", "block_kv_dkv"):
      if getattr(self, name) != 64:
        raise ValueError(f"{name}={getattr(self, name)} must be 64 (one wgmma row tile)")
    for name in ("block_kv", "block_kv_dq", "block_q_dkv"):
      value = getattr(self, name)
      if value not in (64, 128, 192, 256):
        raise ValueError(f"{name}={value} must be one of 64, 128, 192, 256")
    if self.stages < 2 or self.stages_bwd < 2:
      raise ValueError("stages and stages_bwd must be at least 2")
    if self.compute_wgs not in (1, 2, 3) or self.compute_wgs_bwd not in (1, 2, 3):
      raise ValueError("compute_wgs and compute_wgs_bwd must be 1, 2 or 3")
    # P <= 2^threshold is cast to the input dtype: float16's largest value is 65504 < 2^16.
    if not 0.0 <= self.rescale_threshold <= MAX_RESCALE_THRESHOLD:
      raise ValueError(f"rescale_threshold={self.rescale_threshold} must be in "
                       f"[0, {MAX_RESCALE_THRESHOLD}]")

  @property
  def q_multiple(self) -> int:
    """Query-length multiple every kernel needs (the wrapper pads to it)."""
    return math.lcm(self.compute_wgs * self.block_q, self.compute_wgs_bwd * self.block_q_dq,
                    self.block_q_dkv)

  @property
  def kv_multiple(self) -> int:
    """Key-length multiple every kernel needs (the wrapper pads to it)."""
    return math.lcm(self.block_kv, self.block_kv_dq, self.compute_wgs_bwd * self.block_kv_dkv)

  def forward_smem_bytes(self, r: int, dv: int, itemsize: int) -> int:
    q_o = self.compute_wgs * self.block_q * (r + (dv if self.stage_out else 0)) * itemsize
    kv = self.stages * self.block_kv * (r + dv) * itemsize
    return q_o + kv + self.compute_wgs * self.block_q * 4

  def dkv_smem_bytes(self, r: int, dv: int, itemsize: int) -> int:
    own = self.compute_wgs_bwd * self.block_kv_dkv * (r + dv) * itemsize
    streamed = self.stages_bwd * self.block_q_dkv * ((r + dv) * itemsize + 8)
    fused = 0
    if self.fused_bwd:  # dS^T tile and float32 partial dQ per warpgroup
      fused = self.compute_wgs_bwd * self.block_q_dkv * (self.block_kv_dkv * itemsize + r * 4)
    return own + streamed + fused


def pick_tiles(r: int, dv: int, dtype) -> Tiles:
  """Tiles per (r, dv, dtype); bf16 and f16 share the table.

  Measured on an NVIDIA H100 80GB HBM3, jax 0.11.2, 2026-11-25, B=1 H=16 N=16384 bf16
  (docs/KERNEL_NOTES.md, 2026-11-25 section; benchmarks/mosaic_kernel_speed.py):
  - forward block_kv=128 for dv <= 128 (block_kv=64: 3.22 vs 2.72 ms at r=32, dv=128);
    block_kv=64 for dv=256 (128 does not fit shared memory); stages=3 gained nothing
    (2.73 vs 2.68 ms at r=32/dv=128, 4.92 vs 4.77 ms at r=64/dv=256).
  - backward fused (dQ by float32 reduce-add) for r < dv <= 128: fwd+bwd 9.22 vs 10.59 ms
    at r=32/dv=128, 10.66 vs 11.90 ms at r=64/dv=128, 8.38 ms at r=16/dv=128 with
    block_q_dkv=64 (9.78 with 128). Split (dQ kernel + dK/dV kernel) for dv=256
    (20.43 vs 21.39 ms at r=64) and for r = dv (15.02 vs 16.60 ms at r=dv=128).
  - backward tiles 64/64/64/64 (block_q_dkv=128: 13.27 vs 9.22 ms fused at r=32);
    one consumer warpgroup in the backward was slower (13.32 vs 10.67 ms split at r=32);
    stages_bwd=3 within noise (9.05 vs 9.22 non-causal, 4.61 vs 4.54 causal).

  Later (H100, 2026-12-06, `mosaic_kernel_speed.py --groups cudnn,fwd_block_kv`): forward
  block_kv=256 for narrow scores, r <= 32 with dv <= 128: 2.432 vs 2.687 ms at r=32 (causal
  1.207 vs 1.352), 2.400 vs 2.577 ms at r=16 (block_kv=192 at r=32: 2.571); fewer, longer
  key steps halve the per-tile barrier and ping-pong overhead that narrow scores expose.

  Later still (H100, 2026-12-06 fifth session, `--groups cudnn,fwd_direct_out,fwd_rescale`):
  - O stored from registers (`stage_out=False`) where its staging buffer is what keeps
    wider key tiles out of shared memory: dv=256 block_kv 64 -> 128 at r=64, 4.867 ->
    4.418 ms (causal 2.513 -> 2.205); r=64, dv=128 block_kv 128 -> 256, 2.853 -> 2.689
    (1.491 -> 1.440). Where the staged buffer fits it is kept: direct stores alone were
    2% slower (4.968 vs 4.867 at r=64/dv=256 with 64 keys, 2.603 vs 2.517 at r=32/dv=128),
    and at r=32/dv=256 128-key tiles fit staged: 4.057 ms staged vs 4.094 direct (causal
    1.883 vs 2.086), against 4.498 (2.324) with 64-key tiles.
  - the conditional O rescale (`rescale_threshold=8`) at r = dv = 128 (G=1): 3.705 -> 3.530
    (causal 1.829 -> 1.777; an earlier run 3.671 -> 3.610); at r=32 and 16 it was 6-8%
    slower (2.513 -> 2.669 at r=32), and at d=64 14% (2.046 -> 2.339): narrow scores keep
    rescaling every tile.
  """
  del dtype
  itemsize = jnp.dtype(jnp.bfloat16).itemsize
  budget = SMEM_BYTES - 8192
  block_kv = 128 if dv > 128 else 256 if r < dv else 128
  tiles = Tiles(block_kv=block_kv, rescale_threshold=8.0 if r == dv >= 128 else 0.0)
  if tiles.forward_smem_bytes(r, dv, itemsize) > budget:
    # O stored from registers: its staging buffer is what keeps these key tiles out.
    tiles = dataclasses.replace(tiles, stage_out=False)
  if tiles.forward_smem_bytes(r, dv, itemsize) > budget:
    tiles = dataclasses.replace(tiles, stage_out=True)
    while tiles.block_kv > 64 and tiles.forward_smem_bytes(r, dv, itemsize) > budget:
      tiles = dataclasses.replace(tiles, block_kv=tiles.block_kv // 2)
  fused = dataclasses.replace(tiles, fused_bwd=True)
  if r < dv <= 128 and fused.dkv_smem_bytes(r, dv, itemsize) <= SMEM_BYTES - 8192:
    return fused
  if r <= 16:  # split backward at r=16: (64, 128, 128, 64) (MOSAIC_NOTES.md)
    tiles = dataclasses.replace(tiles, block_kv_dq=128, block_q_dkv=128)
  return tiles
