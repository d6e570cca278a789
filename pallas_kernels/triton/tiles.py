"""Tile sizes of the Pallas Triton kernels: one frozen config and one policy function.

`choose_tiles` owns every tile decision for a launch: the measured table (keyed by
layout, padded score width and padded value width), the float32 limits, the clamps to
short sequences and to the grouping block, and the 8-warp rule of the gather layout.
The kernels take the `Tiles` it returns and nothing else about tiles.
"""

from __future__ import annotations

import dataclasses

LAYOUTS = ("btnh", "blocks", "gather")


def _is_pow2(n) -> bool:
  return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and not n & (n - 1)


def pow2_at_least(n: int, floor: int = 16) -> int:
  """The smallest power of two >= max(n, floor) (Triton blocks are powers of two)."""
  return max(floor, 1 << (int(n) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Static tile sizes of one forward/backward pair (hashable: a jit static argument).

  block_m, block_k: query rows per program and key rows per loop step of the forward.
  num_warps, num_stages: the forward's Triton launch parameters.
  block_m_bwd, block_k_bwd: the same for BOTH backward kernels (dQ and dK/dV).
  num_warps_bwd, num_stages_bwd: their launch parameters.
  Block sizes are powers of two >= 16; checked on construction.
  """

  block_m: int = 128
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2
  block_m_bwd: int = 64
  block_k_bwd: int = 64
  num_warps_bwd: int = 4
  num_stages_bwd: int = 2

  def __post_init__(self):
    for name in ("block_m", "block_k", "block_m_bwd", "block_k_bwd"):
      value = getattr(self, name)
      if not _is_pow2(value) or value < 16:
        raise ValueError(f"Tiles.{name} must be a power of two >= 16, got {value!r}")
    for name in ("num_warps", "num_warps_bwd"):
      value = getattr(self, name)
      if not _is_pow2(value) or value > 16:
        raise ValueError(f"Tiles.{name} must be 1, 2, 4, 8 or 16, got {value!r}")
    for name in ("num_stages", "num_stages_bwd"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Tiles.{name} must be an int >= 1, got {value!r}")


# (layout, score width, value width) -> Tiles. Filled from forward sweeps of
# `python -m benchmarks.tune` on an NVIDIA H100 80GB HBM3 (jax 0.11.2, bf16, B=1, H=16,
# N=16384, non-causal), 2026-11-23. Keys missing here use `default_tiles`.
TABLE: dict[tuple[str, int, int], Tiles] = {
    ("btnh", 128, 128): Tiles(block_m=128, block_k=128, num_warps=8, num_stages=3),
    ("btnh", 64, 64): Tiles(block_m=64, block_k=64, num_warps=4, num_stages=3),
    ("blocks", 64, 128): Tiles(block_m=128, block_k=128, num_warps=8, num_stages=3),
    ("blocks", 32, 128): Tiles(block_m=128, block_k=128, num_warps=8, num_stages=3),
    ("blocks", 32, 64): Tiles(block_m=64, block_k=128, num_warps=4, num_stages=2),
    ("blocks", 16, 64): Tiles(block_m=128, block_k=128, num_warps=4, num_stages=3),
    # "gather": block_m becomes the grouping block; 8 warps when it is 128 rows
    # (`choose_tiles`).
    ("gather", 128, 128): Tiles(block_m=64, block_k=128, num_warps=4, num_stages=2),
    ("gather", 64, 64): Tiles(block_m=64, block_k=64, num_warps=4, num_stages=3),
}


def default_tiles(score_width: int, value_width: int) -> Tiles:
  """A shared-memory-safe fallback for widths the table does not list."""
  del score_width
  if value_width >= 256:
    return Tiles(block_m=64, block_k=64, num_warps=4, num_stages=2,
                 block_m_bwd=32, block_k_bwd=64, num_warps_bwd=4, num_stages_bwd=1)
  if value_width >= 128:
    return Tiles(block_m=128, block_k=64, num_warps=8, num_stages=2,
                 block_m_bwd=64, block_k_bwd=64, num_warps_bwd=4, num_stages_bwd=2)
  return Tiles(block_m=128, block_k=64, num_warps=4, num_stages=2,
               block_m_bwd=64, block_k_bwd=64, num_warps_bwd=4, num_stages_bwd=2)


def table_tiles(layout: str, score_width: int, value_width: int, itemsize: int = 2) -> Tiles:
  """The table's entry (or the fallback) for padded widths and bytes per element.

  The table was measured with 2-byte inputs; 4-byte (float32) inputs double the shared
  memory of every staged tile (measured on the H100: 128x128 tiles with 3 stages asked
  for 290-390 KB of the 227 KB), so they get 64-row tiles and 2 stages at most.
  """
  t = TABLE.get((layout, score_width, value_width)) or default_tiles(score_width, value_width)
  if itemsize >= 4:
    t = dataclasses.replace(t, block_m=min(t.block_m, 64), block_k=min(t.block_k, 64),
                            num_warps=4, num_stages=min(t.num_stages, 2),
                            num_stages_bwd=1 if value_width >= 256 else t.num_stages_bwd)
  return t


def choose_tiles(layout: str, *, score_width: int, value_width: int, q_len: int,
                 kv_len: int, block_q: int, itemsize: int = 2,
                 base: Tiles | None = None) -> Tiles:
  """Every tile decision of one launch.

  Args:
    layout: "btnh" (plain flash attention), "blocks" (K fused per grouping block
      outside the kernel) or "gather" (K fused per tile inside the kernel).
    score_width: width of the score contraction as the kernel sees it, padded to a
      power of two >= 16 (the head dim for "btnh" and "gather", d/G for "blocks").
    value_width: V's head dim, padded likewise.
    q_len, kv_len: real sequence lengths (tiles shrink for short ones).
    block_q: the grouping block ("blocks": tiles divide it; "gather": it IS the query
      tile, so it must be a power of two >= 16).
    itemsize: bytes per input element.
    base: tiles to start from instead of the table (benchmarks.tune); the clamps still
      apply.

  Returns:
    `Tiles` whose block sizes divide the padded lengths the caller derives from them
    (`padded_lengths`).
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  t = base or table_tiles(layout, score_width, value_width, itemsize)
  short_q, short_k = pow2_at_least(q_len), pow2_at_least(kv_len)
  if layout == "gather":
    block_m = block_q
  elif layout == "blocks":
    block_m = min(t.block_m, short_q, block_q)
  else:
    block_m = min(t.block_m, short_q)
  num_warps = t.num_warps
  if layout == "gather" and block_m >= 128 and value_width >= 128:
    num_warps = 8  # measured: 128-row tiles with a 128-wide accumulator want 8 warps
  return dataclasses.replace(
      t, block_m=block_m, block_k=min(t.block_k, short_k),
      block_m_bwd=min(t.block_m_bwd, short_q), block_k_bwd=min(t.block_k_bwd, short_k),
      num_warps=num_warps)


def padded_lengths(tiles: Tiles, q_len: int, kv_len: int) -> tuple[int, int]:
  """Query and key lengths rounded up so every forward and backward tile divides them
  (tiles are powers of two, so the largest one suffices)."""
  def round_up(n, m):
    return -(-n // m) * m
  return (round_up(q_len, max(tiles.block_m, tiles.block_m_bwd)),
          round_up(kv_len, max(tiles.block_k, tiles.block_k_bwd)))
