"""Warp-specialised attention kernels for Hopper GPUs in Pallas Mosaic GPU.

Score width r (Q_rep / K_fused) independent of value width dv. Kernels only: this package
imports nothing from distrattention_jax. Entry points live in
`pallas_kernels.mosaic_gpu.attention` (`attention`, `forward`, `backward`); tile sizes in
`pallas_kernels.mosaic_gpu.tiles` (`Tiles`, `pick_tiles`).
"""
