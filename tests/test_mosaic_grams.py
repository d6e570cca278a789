"""The Mosaic GPU Gram kernel (`pallas_kernels/mosaic_gpu/grams.py`) and its use by
`prep.head_grams(kernel=True)`: GPU parity against the float32 einsum, CUDA lowering on a
CPU, and the checks that need neither.

GPU part:  PYTHONPATH=. python -m pytest -q -m gpu tests/test_mosaic_grams.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distrattention_jax import devices, prep
from pallas_kernels.mosaic_gpu import grams
from conftest import lower_for_h100, requires_gpu


def _x(seed, shape, dtype):
  # A shared mean per column (as real activations have) plus noise: the Grams are far
  # from diagonal and a dropped or doubled tile shows.
  rng = np.random.default_rng(seed)
  mean = rng.standard_normal(shape[-1])
  return jnp.asarray(mean + rng.standard_normal(shape), dtype)


def _einsum_grams(x, block_q, valid=None):
  """The oracle: float32 einsum per block (numpy-free, exact float32 products)."""
  x = x.astype(jnp.float32)
  if valid is not None:
    x = jnp.where(valid[:, :, None, None], x, 0)
  t = x.shape[1]
  starts = range(0, t, block_q) if block_q < t else [0]
  return jnp.stack([jnp.einsum("brhc,brhe->bhce", x[:, s:s + block_q], x[:, s:s + block_q],
                               precision="highest") for s in starts], axis=2)


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_supports_names_what_is_wrong():
  assert grams.supports((1, 1024, 4, 128), jnp.bfloat16, 1024) is None
  assert grams.supports((2, 1000, 4, 64), jnp.float16, 896, 1) is None
  assert "head dim" in grams.supports((1, 1024, 4, 32), jnp.bfloat16, 1024)
  assert "float32" in grams.supports((1, 1024, 4, 128), jnp.float32, 1024)
  assert "multiple of tile_rows" in grams.supports((1, 1024, 4, 128), jnp.bfloat16, 100)
  assert "do not fit" in grams.supports((1, 1000, 4, 128), jnp.bfloat16, 512, 2)
  assert "multiple of 8" in grams.supports((1, 1001, 4, 128), jnp.bfloat16, 512, 1)
  with pytest.raises(ValueError, match="gram_blocks: head dim"):
    grams.gram_blocks(jnp.zeros((1, 256, 2, 32), jnp.bfloat16), block_rows=256)
  with pytest.raises(ValueError, match="splits must divide"):
    grams.gram_blocks(jnp.zeros((1, 384, 2, 64), jnp.bfloat16), block_rows=384, splits=2)
  with pytest.raises(ValueError, match="stages"):
    grams.GramTiles(stages=0)


def test_pick_splits_fills_one_wave():
  assert grams.pick_splits(16, 128) == 8      # B=1, H=16, N=16384: 128 CTAs
  assert grams.pick_splits(64, 128) == 2      # B=4
  assert grams.pick_splits(16, 7) == 1        # an odd tile count cannot be split
  assert grams.pick_splits(200, 128) == 1


@pytest.mark.parametrize("shape,block_rows,num_blocks", [
    ((1, 16384, 16, 128), 16384, None), ((2, 1000, 4, 64), 256, 3)])
def test_lowers_for_cuda_on_cpu(shape, block_rows, num_blocks):
  text = lower_for_h100(
      lambda x: grams.gram_blocks(x, block_rows=block_rows, num_blocks=num_blocks),
      jax.ShapeDtypeStruct(shape, jnp.bfloat16))
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


def test_head_grams_kernel_flag_is_the_einsum_off_the_gpu():
  x = _x(0, (2, 200, 3, 64), jnp.bfloat16)
  np.testing.assert_array_equal(prep.head_grams(x, 128, kernel=True),
                                prep.head_grams(x, 128))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("shape,block_rows,dtype", [
    ((1, 16384, 16, 128), 16384, jnp.bfloat16),   # the benchmark shape: 8 splits
    ((2, 1024, 4, 64), 256, jnp.float16),
    ((3, 768, 2, 128), 384, jnp.bfloat16),        # 3 tiles a block: no split
])
def test_kernel_matches_einsum(shape, block_rows, dtype):
  x = _x(1, shape, dtype)
  got = grams.gram_blocks(x, block_rows=block_rows)
  want = _einsum_grams(x, block_rows)
  assert got.shape == want.shape
  assert _rel(got, want) < 1e-5


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("t,block_q,padded", [
    (1000, 4096, False),   # one block: 896 rows by the kernel, 104 by the einsum
    (1000, 256, True),     # 3 whole blocks by the kernel, a short one by the einsum
    (2048, 512, False),
    (100, 4096, False),    # fewer rows than a tile: einsum only
    (1001, 4096, False),   # not a multiple of 8 rows: einsum only
])
def test_head_grams_kernel_path_matches_einsum(t, block_q, padded):
  x = _x(2, (2, t, 4, 128), jnp.bfloat16)
  valid = None
  if padded:
    valid = jnp.arange(t)[None, :] < jnp.asarray([[t - 37], [t // 2]])
  got = prep.head_grams(x, block_q, valid, kernel=True)
  want = _einsum_grams(x, block_q, valid)
  assert got.shape == want.shape
  assert _rel(got, want) < 1e-5


def test_multi_checks_its_arrays():
  q = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="share d and dtype"):
    grams.gram_blocks_multi((q, jnp.zeros((1, 256, 2, 64), jnp.bfloat16)),
                            block_rows=(256, 256), num_blocks=(1, 1))
  with pytest.raises(ValueError, match="one entry per array"):
    grams.gram_blocks_multi((q,), block_rows=(256, 256), num_blocks=(1,))


def test_multi_lowers_for_cuda_on_cpu():
  text = lower_for_h100(
      lambda q, k: grams.gram_blocks_multi((q, k), block_rows=(512, 1024), num_blocks=(2, 1)),
      jax.ShapeDtypeStruct((2, 1024, 8, 128), jnp.bfloat16),
      jax.ShapeDtypeStruct((2, 1096, 2, 128), jnp.bfloat16))
  launches = 2 if grams.TILES.launch_per_array else 1   # one per array, or one for both
  assert text.count("stablehlo.custom_call @mosaic_gpu") == launches
  stacked = lower_for_h100(
      lambda q, k: grams.gram_blocks_multi((q, k), block_rows=(512, 1024), num_blocks=(2, 1),
                                           stacked=True),
      jax.ShapeDtypeStruct((2, 1024, 8, 128), jnp.bfloat16),
      jax.ShapeDtypeStruct((2, 1096, 2, 128), jnp.bfloat16))
  assert stacked.count("stablehlo.custom_call @mosaic_gpu") == launches
  assert "tensor<36x128x128xf32>" in stacked   # 2*8*2 query Grams, then 2*2 key Grams


@pytest.mark.gpu
@requires_gpu
def test_multi_matches_einsum():
  # Q and K of a GQA layer, different lengths and block sizes, in one launch.
  q = _x(3, (2, 1024, 8, 128), jnp.bfloat16)
  k = _x(4, (2, 1096, 2, 128), jnp.bfloat16)
  gq, gk = grams.gram_blocks_multi((q, k), block_rows=(512, 1024), num_blocks=(2, 1))
  assert _rel(gq, _einsum_grams(q, 512)) < 1e-5
  assert _rel(gk, _einsum_grams(k[:, :1024], 4096)) < 1e-5
  # stacked: one array, the query Grams in [B, H, nb] order, then the key Grams.
  both = grams.gram_blocks_multi((q, k), block_rows=(512, 1024), num_blocks=(2, 1),
                                 stacked=True)
  assert both.shape == (2 * 8 * 2 + 2 * 2, 128, 128)
  assert _rel(both[:32], _einsum_grams(q, 512).reshape(32, 128, 128)) < 1e-5
  assert _rel(both[32:], _einsum_grams(k[:, :1024], 4096).reshape(4, 128, 128)) < 1e-5


@pytest.mark.gpu
@requires_gpu
def test_head_grams_multi_kernel_path_matches_einsum():
  q = _x(5, (2, 1000, 8, 64), jnp.float16)
  k = _x(6, (2, 900, 4, 64), jnp.float16)
  valid = jnp.arange(900)[None, :] < jnp.asarray([[900], [611]])
  gq, gk = prep.head_grams_multi([(q, 256, None), (k, 900, valid)], kernel=True)
  assert _rel(gq, _einsum_grams(q, 256)) < 1e-5
  assert _rel(gk, _einsum_grams(k, 900, valid)) < 1e-5


def test_kernel_path_only_on_hopper(monkeypatch):
  """Other GPUs (no wgmma) and CPUs take the einsum with kernel=True."""
  if jax.default_backend() != "gpu":
    assert not devices.is_hopper()
  monkeypatch.setattr(devices, "is_hopper", lambda: False)
  x = _x(7, (1, 256, 2, 64), jnp.bfloat16)
  (got,) = prep.head_grams_multi([(x, 256, None)], kernel=True)
  np.testing.assert_allclose(got, _einsum_grams(x, 256), rtol=1e-5, atol=1e-3)


TWO_CONSUMERS = grams.GramTiles(consumers=2)   # each warpgroup 64 rows of a d=128 Gram


def test_two_consumers_need_64_gram_rows_each():
  with pytest.raises(ValueError, match="consumers"):
    grams.GramTiles(consumers=3)
  assert "64 or more Gram rows" in grams.supports((1, 1024, 4, 64), jnp.bfloat16, 1024,
                                                  tiles=TWO_CONSUMERS)
  assert grams.supports((1, 1024, 4, 128), jnp.bfloat16, 1024, tiles=TWO_CONSUMERS) is None


PER_ARRAY = grams.GramTiles(launch_per_array=True)  # Q's Grams, then K's: two launches
ONE_LAUNCH = grams.GramTiles(launch_per_array=False)  # the default, pinned
KEYS_LAST = grams.GramTiles(keys_last=True)  # each CTA: its Q rows, then its K rows


@pytest.mark.parametrize("tiles", [TWO_CONSUMERS, grams.GramTiles(consumers=2, reverse=True),
                                   PER_ARRAY, ONE_LAUNCH, KEYS_LAST,
                                   grams.GramTiles(keys_last=True, tile_rows=64, stages=8),
                                   grams.GramTiles(keys_last=True, tile_rows=256, stages=2),
                                   grams.GramTiles(keys_last=True, reduce_slices=8),
                                   grams.GramTiles(reduce_slices=4)])
def test_other_tilings_lower_for_cuda_on_cpu(tiles):
  text = lower_for_h100(
      lambda q, k: grams.gram_blocks_multi((q, k), block_rows=(16384, 16384),
                                           num_blocks=(1, 1), stacked=True, tiles=tiles),
      jax.ShapeDtypeStruct((1, 16384, 16, 128), jnp.bfloat16),
      jax.ShapeDtypeStruct((1, 16384, 16, 128), jnp.bfloat16))
  launches = 2 if tiles.launch_per_array else 1
  assert text.count("stablehlo.custom_call @mosaic_gpu") == launches
  # One zeroed output for every launch (the second adds into the first's array).
  assert text.count("stablehlo.broadcast_in_dim") == 1


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("tiles", [TWO_CONSUMERS, grams.GramTiles(reverse=False),
                                   grams.GramTiles(consumers=2, reverse=True), PER_ARRAY,
                                   ONE_LAUNCH])
def test_other_tilings_match_einsum(tiles):
  q = _x(7, (1, 16384, 16, 128), jnp.bfloat16)
  k = _x(8, (2, 1096, 2, 128), jnp.bfloat16)
  gq, gk = grams.gram_blocks_multi((q, k), block_rows=(16384, 1024), num_blocks=(1, 1),
                                   tiles=tiles)
  assert _rel(gq, _einsum_grams(q, 16384)) < 1e-5
  assert _rel(gk, _einsum_grams(k[:, :1024], 4096)) < 1e-5


@pytest.mark.gpu
@requires_gpu
def test_launch_per_array_stacked_and_pooled():
  """One launch per array into one stacked output, query heads pooled per kv head (the
  lowrank path's call), against one launch for both arrays."""
  q = _x(9, (2, 2048, 4, 128), jnp.bfloat16)
  k = _x(10, (2, 2048, 2, 128), jnp.bfloat16)
  kw = dict(block_rows=(1024, 2048), num_blocks=(2, 1), stacked=True, pool=(2, 1))
  got = grams.gram_blocks_multi((q, k), tiles=PER_ARRAY, **kw)
  want = grams.gram_blocks_multi((q, k), tiles=ONE_LAUNCH, **kw)
  assert got.shape == want.shape == (2 * 2 * 2 + 2 * 2, 128, 128)
  assert _rel(got, want) < 1e-5


KEYS_LAST_PIPELINES = [grams.GramTiles(keys_last=True, stages=3),
                       grams.GramTiles(keys_last=True, stages=5),
                       grams.GramTiles(keys_last=True, tile_rows=64, stages=8),
                       grams.GramTiles(keys_last=True, tile_rows=256, stages=2),
                       grams.GramTiles(keys_last=True, reduce_slices=8),
                       grams.GramTiles(keys_last=True, reduce_slices=4)]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("tiles", KEYS_LAST_PIPELINES,
                         ids=lambda t: f"t{t.tile_rows}-s{t.stages}-r{t.reduce_slices}")
def test_keys_last_pipelines_match_einsum(tiles):
  """keys_last with other slot counts and tile heights (benchmark variants), at issue
  14's shape with every Gram in one array."""
  q = _x(13, (1, 16384, 16, 128), jnp.bfloat16)
  k = _x(14, (1, 16384, 16, 128), jnp.bfloat16)
  got = grams.gram_blocks_multi((q, k), block_rows=(16384, 16384), num_blocks=(1, 1),
                                stacked=True, tiles=tiles)
  assert _rel(got[:16], _einsum_grams(q, 16384).reshape(16, 128, 128)) < 1e-5
  assert _rel(got[16:], _einsum_grams(k, 16384).reshape(16, 128, 128)) < 1e-5


def test_keys_last_options_are_checked():
  with pytest.raises(ValueError, match="reduce_slices must be"):
    grams.GramTiles(reduce_slices=3)
  with pytest.raises(ValueError, match="reduce_slices must be"):
    grams.GramTiles(reduce_slices=2, consumers=2)
  with pytest.raises(ValueError, match="keys_last takes one launch"):
    grams.GramTiles(keys_last=True, launch_per_array=True)
  with pytest.raises(ValueError, match="one consumer"):
    grams.GramTiles(keys_last=True, consumers=2)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("shapes,kw", [
    (((1, 16384, 16, 128), (1, 16384, 16, 128)),          # issue 14's shape, stacked
     dict(block_rows=(16384, 16384), num_blocks=(1, 1), stacked=True)),
    (((2, 1024, 4, 64), (2, 1024, 4, 64)),                # d=64, two blocks, two outputs
     dict(block_rows=(512, 512), num_blocks=(2, 2))),
    (((2, 2048, 4, 128), (2, 2048, 2, 128)),              # GQA pooled: not chained
     dict(block_rows=(1024, 2048), num_blocks=(2, 1), stacked=True, pool=(2, 1))),
])
def test_keys_last_matches_one_launch_and_einsum(shapes, kw):
  """keys_last (each CTA streams its query rows, then its key rows) against the usual
  one launch and against einsum."""
  q = _x(11, shapes[0], jnp.bfloat16)
  k = _x(12, shapes[1], jnp.bfloat16)
  got = grams.gram_blocks_multi((q, k), tiles=KEYS_LAST, **kw)
  want = grams.gram_blocks_multi((q, k), tiles=ONE_LAUNCH, **kw)
  got, want = (jnp.concatenate([g.reshape(-1, *g.shape[-2:]) for g in x])
               if isinstance(x, tuple) else x for x in (got, want))
  assert got.shape == want.shape
  assert _rel(got, want) < 1e-5
  if not kw.get("pool"):
    nq = shapes[0][0] * shapes[0][2] * kw["num_blocks"][0]
    assert _rel(got[:nq].reshape(shapes[0][0], shapes[0][2], -1, *got.shape[-2:]),
                _einsum_grams(q, kw["block_rows"][0])) < 1e-5
