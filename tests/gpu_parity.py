"""Helpers shared by the GPU parity tests (tests/test_*_gpu.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

requires_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")


def random_inputs(seed, batch, q_len, kv_len, heads, kv_heads, d, dtype=jnp.bfloat16):
  """Fresh random normal (q, k, v) in BTNH and a spare PRNG key (never zeros)."""
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (batch, q_len, heads, d), dtype)
  k = jax.random.normal(ks[1], (batch, kv_len, kv_heads, d), dtype)
  v = jax.random.normal(ks[2], (batch, kv_len, kv_heads, d), dtype)
  return q, k, v, ks[3]


def rel_error(a, b):
  """Relative L2 error of `a` against `b`; fails on any non-finite value of `a`."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert np.all(np.isfinite(a)), "non-finite values (unwritten or NaN outputs)"
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
