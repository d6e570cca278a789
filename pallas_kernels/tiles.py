"""Tile sizes for the Pallas Triton kernels, one table keyed by (d, G, dtype).

`d` here is the width of the score contraction the kernel sees (`d / G` padded to >= 16
for the grouped paths), `dv` the padded value width. Entries were chosen from
measurements on the GPU (see the comment on TABLE); everything else falls back to a
heuristic that fits shared memory.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Static tile sizes of one kernel launch.

  block_m: query rows per program (forward, dQ).
  block_k: key rows per loop step (forward, dQ).
  block_m_bwd / block_k_bwd: the same for the dK/dV kernel.
  """

  block_m: int = 128
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2
  block_m_bwd: int = 64
  block_k_bwd: int = 64
  num_warps_bwd: int = 4
  num_stages_bwd: int = 2


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
    # "gather": block_m is the grouping block; 8 warps when it is 128 rows (ops.py).
    ("gather", 128, 128): Tiles(block_m=64, block_k=128, num_warps=4, num_stages=2),
    ("gather", 64, 64): Tiles(block_m=64, block_k=64, num_warps=4, num_stages=3),
}


def default_tiles(score_width: int, value_width: int) -> Tiles:
  if value_width >= 256:
    return Tiles(block_m=64, block_k=64, num_warps=4, num_stages=2,
                 block_m_bwd=32, block_k_bwd=64, num_warps_bwd=4, num_stages_bwd=1)
  if value_width >= 128:
    return Tiles(block_m=128, block_k=64, num_warps=8, num_stages=2,
                 block_m_bwd=64, block_k_bwd=64, num_warps_bwd=4, num_stages_bwd=2)
  return Tiles(block_m=128, block_k=64, num_warps=4, num_stages=2,
               block_m_bwd=64, block_k_bwd=64, num_warps_bwd=4, num_stages_bwd=2)


def tiles_for(layout: str, score_width: int, value_width: int, itemsize: int = 2) -> Tiles:
  """Tiles for a layout ("btnh", "blocks", "gather"; for "gather" the score width is the
  padded head dim), padded score/value widths and the input's bytes per element.

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
