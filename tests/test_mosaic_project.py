"""The Mosaic GPU row projection kernel (`pallas_kernels/mosaic_gpu/project.py`, K_fused of
the "mosaic" backend): GPU parity and gradients against XLA, CUDA lowering on a CPU.

GPU part:  PYTHONPATH=. python -m pytest -q -m gpu tests/test_mosaic_project.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mosaic_gpu import project
from conftest import lower_for_h100, rel_error, requires_gpu


def _inputs(seed, x_shape, out_heads, r, dtype):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(x_shape), dtype)
  w = jnp.asarray(rng.standard_normal((x_shape[0], out_heads, x_shape[3], r)) / 8,
                  jnp.float32)
  return x, w


def test_supports_names_what_is_wrong():
  assert project.supports((1, 256, 2, 128), (1, 4, 128, 32), jnp.bfloat16) is None
  assert "multiple of 128" in project.supports((1, 200, 2, 128), (1, 2, 128, 32),
                                               jnp.bfloat16)
  assert "does not match" in project.supports((1, 256, 2, 128), (1, 3, 128, 32),
                                              jnp.bfloat16)
  assert "map width" in project.supports((1, 256, 2, 128), (1, 2, 128, 8), jnp.bfloat16)
  assert "float32" in project.supports((1, 256, 2, 128), (1, 2, 128, 32), jnp.float32)
  # d=256 takes r <= 64 (two row-tile slots); r=128 leaves room for one.
  assert project.supports((1, 256, 2, 256), (1, 2, 256, 64), jnp.bfloat16) is None
  assert "shared memory" in project.supports((1, 256, 2, 256), (1, 2, 256, 128),
                                             jnp.bfloat16)
  with pytest.raises(ValueError, match="project_rows: head dim"):
    project.project_rows(jnp.zeros((1, 128, 2, 32), jnp.bfloat16), jnp.zeros((1, 2, 32, 16)))


def _check_split(dtype, bits):
  w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 64, 16)), jnp.float32)
  parts = jax.jit(project.split_map, static_argnums=1)(w, dtype)   # [3, 2, 16, 64]
  assert parts.dtype == dtype and parts.shape == (3, 2, 16, 64)
  parts = parts.astype(jnp.float32)
  back = jnp.swapaxes(parts[:, 0] + parts[:, 1], -1, -2)
  assert float(jnp.max(jnp.abs(back - w) / jnp.abs(w))) < 2.0 ** -bits


@pytest.mark.parametrize("dtype,bits", [(jnp.bfloat16, 15), (jnp.float16, 14)])
def test_split_map_keeps_sixteen_bits(dtype, bits):
  _check_split(dtype, bits)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype,bits", [(jnp.bfloat16, 15), (jnp.float16, 14)])
def test_split_map_keeps_sixteen_bits_on_the_gpu(dtype, bits):
  """Jitted on the GPU, where XLA may drop float32 -> bf16 -> float32 round trips."""
  _check_split(dtype, bits)


@pytest.mark.parametrize("x_shape,out_heads,r", [((1, 16384, 16, 128), 16, 32),
                                                 ((2, 1024, 2, 64), 8, 16),
                                                 ((1, 16384, 16, 256), 16, 64),
                                                 ((1, 1024, 2, 256), 2, 32)])
def test_lowers_for_cuda_on_cpu(x_shape, out_heads, r):
  """Lowered for an H100 on a CPU; Mosaic checks shared memory here (d=256 with four
  row-tile slots asked for 360520 bytes, which only failed on the GPU before)."""
  args = (jax.ShapeDtypeStruct(x_shape, jnp.bfloat16),
          jax.ShapeDtypeStruct((x_shape[0], out_heads, x_shape[3], r), jnp.float32))
  loss = lambda x, w: jnp.sum(project.projected(x, w).astype(jnp.float32))  # noqa: E731
  # value_and_grad: the forward kernel's output is used (grad alone would drop it).
  text = lower_for_h100(jax.value_and_grad(loss), *args)
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


def test_gradients_match_the_xla_projection_off_the_gpu():
  """The custom VJP's backward is plain XLA: check it against autodiff of the reference
  (the forward there would need a GPU, so the VJP is called on the residuals)."""
  x, w = _inputs(1, (2, 256, 2, 64), 4, 16, jnp.float32)
  dy = jnp.asarray(np.random.default_rng(2).standard_normal((2, 256, 4, 16)), jnp.float32)
  _, vjp = jax.vjp(project._project_reference, x, w)
  parts = project.split_map(w, x.dtype)
  *grads, d_parts = project._projected_bwd((x, w, parts), dy)
  for got, want in zip(grads, vjp(dy)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert d_parts.shape == parts.shape and not np.any(d_parts)  # the parts get none


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("x_shape,out_heads,r,dtype", [
    ((1, 16384, 16, 128), 16, 32, jnp.bfloat16),
    ((3, 1024, 2, 128), 8, 32, jnp.float16),    # GQA fan-out: 4 output heads per input
    ((2, 384, 4, 64), 4, 16, jnp.bfloat16),     # 3 row tiles
    ((1, 2048, 4, 256), 4, 64, jnp.bfloat16),   # d=256: two row-tile slots
])
def test_kernel_matches_xla(x_shape, out_heads, r, dtype):
  x, w = _inputs(3, x_shape, out_heads, r, dtype)
  got = project.project_rows(x, w)
  want = project._project_reference(x, w)
  assert got.shape == want.shape and got.dtype == dtype
  assert rel_error(got, want) < 2e-3   # rounding flips of the ~16-bit map only
  y, vjp = jax.vjp(project.projected, x, w)
  dy = jnp.asarray(np.random.default_rng(4).standard_normal(y.shape), dtype)
  _, vjp_ref = jax.vjp(project._project_reference, x, w)
  for g, g_ref in zip(vjp(dy), vjp_ref(dy)):
    assert rel_error(g, g_ref) < 1e-2


# Tilings measured by benchmarks/project_tiles.py: fewer slots (two CTAs an SM), one
# wave, two consumer warpgroups taking alternate tiles (odd tile counts per consumer).
TILINGS = [project.ProjectTiles(stages=2), project.ProjectTiles(tiles_per_cta=16),
           project.ProjectTiles(consumers=2), project.ProjectTiles(stages=3, consumers=2),
           project.ProjectTiles(stages=2, tiles_per_cta=4, consumers=2)]


def test_tiles_are_validated():
  with pytest.raises(ValueError, match="consumers"):
    project.ProjectTiles(consumers=3)
  with pytest.raises(ValueError, match="power of two"):
    project.ProjectTiles(tiles_per_cta=3)
  x = jnp.zeros((1, 512, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="must divide"):
    project.project_rows(x, jnp.zeros((1, 2, 64, 16)), tiles=project.ProjectTiles(
        tiles_per_cta=8))


@pytest.mark.parametrize("tiles", TILINGS)
def test_tilings_lower_for_cuda_on_cpu(tiles):
  args = (jax.ShapeDtypeStruct((1, 16384, 16, 128), jnp.bfloat16),
          jax.ShapeDtypeStruct((1, 16, 128, 32), jnp.float32))
  text = lower_for_h100(lambda x, w: project.project_rows(x, w, tiles=tiles), *args)
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("tiles", TILINGS)
@pytest.mark.parametrize("x_shape,out_heads", [((1, 16384, 16, 128), 16),
                                               ((2, 640, 2, 128), 4)])   # 5 tiles a row
def test_tilings_match_xla(tiles, x_shape, out_heads):
  x, w = _inputs(4, x_shape, out_heads, 32, jnp.bfloat16)
  if x_shape[1] // project.TILE_ROWS % (tiles.tiles_per_cta or 1):
    pytest.skip("tiles_per_cta does not divide the row tiles")
  got = project.project_rows(x, w, tiles=tiles)
  assert rel_error(got, project._project_reference(x, w)) < 2e-3
