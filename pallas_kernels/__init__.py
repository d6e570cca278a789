"""DistrAttention's Pallas kernels: arrays and static tile configs in, arrays out.

Kernels only: nothing here imports `distrattention_jax` (tests/test_layering.py checks it).
  triton/      Pallas Triton kernels (forward, backward, greedy grouping, tile policy);
               JAX has deprecated the Triton backend, so they stay while JAX ships it.
  mosaic_gpu/  Pallas Mosaic GPU kernels for Hopper (warp-specialised).
"""
