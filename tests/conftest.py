"""Shared test helpers (imported by the test modules: `from conftest import qkv`).

Inputs are fresh Gaussian arrays (never zeros) from fixed NumPy seeds, so every run is
the same and no shape costs a compile to draw.
"""

from __future__ import annotations

import os
import warnings

# pytest runs one worker per core (addopts "-n auto", 14 on an H100 host): on a GPU each
# would otherwise preallocate 75% of its memory, and keep what it once used in its own pool
# (the platform allocator hands freed memory back: without it, 14 workers ran an H100 out
# of memory, 2026-12-06). XLA's GEMM autotuning compiles and profiles many configurations
# of every matmul of the references: compile time the tests do not need (any
# configuration gives a correct product), and its profiling buffers were what ran out of
# memory. Set before JAX starts; a user's own settings win.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")
if "xla_gpu_autotune_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_gpu_autotune_level=0").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

ON_GPU = jax.default_backend() == "gpu"
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")

def pytest_xdist_auto_num_workers(config):  # pylint: disable=unused-argument
  """Workers for `-n auto` (pyproject's addopts): the tests are compile-bound and each
  compile uses about one core, so one worker per core, keeping two for the controller and
  XLA's own threads on larger hosts, at most 14 and one per 3 GiB of memory: 2 on CI's 2
  cores, 14 on an H100 host's 16 (the whole GPU suite in 94 s, 2026-12-06)."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  cores = cores or 1
  workers = cores if cores <= 4 else min(cores - 2, 14)
  try:
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    workers = min(workers, max(1, int(memory_gib // 3)))
  except (ValueError, OSError, AttributeError):
    pass
  return workers


H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                   platform="cuda")


def lower_for_h100(fn, *args) -> str:
  """StableHLO text of `jax.jit(fn)` lowered for CUDA on an abstract H100, on any machine.

  Catches unimplemented primitives, bad block shapes and (with `verify_triton_modules`)
  invalid Triton ops; not Mosaic/Triton compile errors or wrong results (the GPU tests).
  """
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=H100)
  with warnings.catch_warnings(), jax.sharding.use_abstract_mesh(mesh):
    warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


# Triton modules run through MLIR's verifier as they are lowered (count in [0]).
TRITON_MODULES_VERIFIED = [0]


@pytest.fixture(autouse=True, scope="session")
def verify_triton_modules():
  """Runs MLIR's verifier on every Triton module a Pallas kernel lowers to.

  JAX's Pallas Triton lowering serialises the module without verifying it; the GPU's
  compiler verifies it first thing. So the CUDA lowering tests on an abstract H100 (no
  GPU) accepted a lowrank kernel whose `arith.select` mixed i1 and f32 operands, and
  every GPU call of it failed (2026-11-25). Verifying here catches that class of bug on
  a CPU. Wraps a JAX-internal function; where it moves, nothing is wrapped and the
  lowering tests say so (test_triton_lowering.py).
  """
  try:
    from jax._src.pallas.triton import pallas_call_registration as registration  # pylint: disable=import-outside-toplevel
    original = registration.lowering.lower_jaxpr_to_triton_module
  except (ImportError, AttributeError):
    yield
    return

  def verified(*args, **kwargs):
    result = original(*args, **kwargs)
    result.module.operation.verify()  # raises MLIRError naming the offending op
    TRITON_MODULES_VERIFIED[0] += 1
    return result

  registration.lowering.lower_jaxpr_to_triton_module = verified
  yield
  registration.lowering.lower_jaxpr_to_triton_module = original

# allclose tolerances of a backend's output against the float32 reference, per dtype.
TOLS = {
    jnp.float32: dict(atol=2e-5, rtol=2e-5),
    jnp.float16: dict(atol=5e-3, rtol=5e-3),
    jnp.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def normal(rng, shape, dtype=jnp.float32):
  """Standard normal draws of `rng` (a NumPy Generator) as a jnp array of `dtype`."""
  return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


def qkv(seed, batch, q_len, kv_len, heads, kv_heads, d, dv=None, dtype=jnp.float32):
  """Fresh Gaussian query `[B, Tq, H, d]`, key `[B, Tk, Hkv, d]`, value `[.., dv]`."""
  rng = np.random.default_rng(seed)
  dv = d if dv is None else dv
  return (normal(rng, (batch, q_len, heads, d), dtype),
          normal(rng, (batch, kv_len, kv_heads, d), dtype),
          normal(rng, (batch, kv_len, kv_heads, dv), dtype))


def bernoulli(seed, p, shape):
  """bool array, True with probability p."""
  return jnp.asarray(np.random.default_rng(seed).random(shape) < p)


def segments(batch, q_len, kv_len):
  """Two segments per row: queries from q_len // 3 on and keys from kv_len // 2 on are
  segment 1 (so the first queries see only the first keys)."""
  q_seg = jnp.asarray((np.arange(q_len)[None] >= q_len // 3).repeat(batch, 0), jnp.int32)
  kv_seg = jnp.asarray((np.arange(kv_len)[None] >= kv_len // 2).repeat(batch, 0), jnp.int32)
  return q_seg, kv_seg


def rel_error(a, b):
  """Relative L2 error of `a` against `b`; fails on any non-finite value of `a`."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert np.all(np.isfinite(a)), "non-finite values (unwritten or NaN outputs)"
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_close(x, y, tol):
  """`tol`: a dict of allclose tolerances, or a float bound on the relative L2 error."""
  x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
  assert np.all(np.isfinite(x)), "non-finite values"
  if isinstance(tol, dict):
    np.testing.assert_allclose(x, y, **tol)
  else:
    assert rel_error(x, y) < tol, rel_error(x, y)


def random_inputs(seed, batch, q_len, kv_len, heads, kv_heads, d, dtype=jnp.bfloat16):
  """Random normal (q, k, v) drawn on the device (jax.random: no host transfer of large
  arrays) and a spare PRNG key."""
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (batch, q_len, heads, d), dtype)
  k = jax.random.normal(ks[1], (batch, kv_len, kv_heads, d), dtype)
  v = jax.random.normal(ks[2], (batch, kv_len, kv_heads, d), dtype)
  return q, k, v, ks[3]
