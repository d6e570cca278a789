"""What the default device is, for choosing kernels."""

from __future__ import annotations

import functools

import jax


@functools.cache
def is_hopper() -> bool:
  """Whether the default device is a Hopper GPU (compute capability 9.x).

  Our Mosaic GPU kernels (`pallas_kernels.mosaic_gpu`) multiply with wgmma, which only
  Hopper has: Ampere (8.x) predates it and Blackwell (10.x) replaced it, so a check for
  "9.0 or newer" would hand Blackwell kernels it cannot compile.
  """
  if jax.default_backend() != "gpu":
    return False
  try:
    capability = str(jax.devices()[0].compute_capability)
  except (AttributeError, RuntimeError):
    return False
  return capability.split(".")[0] == "9"
