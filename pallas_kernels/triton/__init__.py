"""Pallas Triton kernels for DistrAttention.

  forward.py   flash forward with a `d/G`-wide score product (layouts btnh, blocks, gather)
  backward.py  its dQ and dK/dV kernels (layouts btnh, blocks)
  greedy.py    greedy grouping of head-dim columns, one program per query block
  tiles.py     `Tiles` (frozen, validated) and `choose_tiles`, the one tile policy
"""
