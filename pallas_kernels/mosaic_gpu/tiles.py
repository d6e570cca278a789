"""Tile sizes of the Mosaic GPU attention kernels, and the table that picks them.

Widths: `r` is the score width (Q_rep / K_fused head dim), `dv` the value width.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

# Hopper: 227 KiB of shared memory per block (232448 bytes).
SMEM_BYTES = 232448


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

  @property
  def q_multiple(self) -> int:
    """Query-length multiple every kernel needs (the wrapper pads to it)."""
    return max(self.compute_wgs * self.block_q, self.compute_wgs_bwd * self.block_q_dq,
               self.block_q_dkv)

  @property
  def kv_multiple(self) -> int:
    """Key-length multiple every kernel needs (the wrapper pads to it)."""
    return max(self.block_kv, self.block_kv_dq, self.compute_wgs_bwd * self.block_kv_dkv)

  def forward_smem_bytes(self, r: int, dv: int, itemsize: int) -> int:
    q_o = self.compute_wgs * self.block_q * (r + dv) * itemsize
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
  """Tiles per (r, dv, dtype).

  Measured on an NVIDIA H100 80GB HBM3 (jax 0.11.2), 2026-11-25 (MOSAIC_NOTES.md with the
  upstream-derived kernel; docs/KERNEL_NOTES.md 2026-11-25 for this package's kernels):
  forward block_kv=128 for dv <= 128 (64 was 15-20% slower), block_kv=64 for dv=256
  (shared memory); more stages gained nothing. Backward (64, 64, 64, 64) best for r >= 32,
  block_kv_dq=128 / block_q_dkv=128 for r=16.
  """
  del dtype  # bf16 and f16 have one size; the table is the same for both.
  if dv > 128:
    tiles = Tiles(block_kv=64)
  else:
    tiles = Tiles(block_kv=128)
  if r <= 16:
    tiles = dataclasses.replace(tiles, block_kv_dq=128, block_q_dkv=128)
  itemsize = jnp.dtype(jnp.bfloat16).itemsize
  if tiles.forward_smem_bytes(r, dv, itemsize) > SMEM_BYTES - 8192:
    tiles = dataclasses.replace(tiles, block_kv=64)
  fused = dataclasses.replace(tiles, fused_bwd=True)
  if r < dv and fused.dkv_smem_bytes(r, dv, itemsize) <= SMEM_BYTES - 8192:
    tiles = fused
  return tiles
