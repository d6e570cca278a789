"""The Triton backend: the shared cases in interpret mode (CPU) and on a GPU, plus what is
specific to it (layouts, tiles, segment folding, the greedy kernel, aliases).

Interpret mode cannot see GPU-only bugs; tests/test_triton_lowering.py lowers every
shipped configuration for CUDA on a CPU, and `TestTritonGpu` runs the cases on a GPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distrattention_jax as dj
from distrattention_jax import backends
from distrattention_jax import config
from distrattention_jax import grouping
from distrattention_jax.backends import triton as triton_backend
from pallas_kernels.triton import tiles as tiles_lib

from backend_cases import BackendTestBase
from conftest import ON_GPU, qkv, rel_error, requires_gpu


class TestTritonInterpret(BackendTestBase):
  implementation = "pallas_interpret"  # the documented alias of "triton_interpret"


@pytest.mark.gpu
class TestTritonGpu(BackendTestBase):
  implementation = "triton"
  needs_gpu = True
  dtype = jnp.bfloat16
  fwd_tol = 2e-2
  grad_tol = 3e-2
  low_precision_tol = {jnp.bfloat16: 3e-2, jnp.float16: 1e-2, jnp.float32: 5e-3}


# --- on any platform ----------------------------------------------------------------------


def test_names_and_aliases():
  assert backends.get("pallas") is backends.get("triton")
  assert backends.get("pallas_interpret") is backends.get("triton_interpret")
  assert backends.get("triton").needs_gpu and not backends.get("triton_interpret").needs_gpu
  assert not backends.get("xla").uses_grouping_kernel
  assert {"xla", "cudnn", "triton", "triton_interpret", "pallas",
          "pallas_interpret"} <= set(backends.names())


def test_triton_needs_gpu_backend():
  if ON_GPU:
    pytest.skip("has a GPU")
  q, k, v = qkv(1, 1, 16, 16, 2, 2, 32, 32)
  for name in ("pallas", "triton"):
    with pytest.raises(ValueError, match="needs a GPU"):
      dj.distr_attention(q, k, v, implementation=name)
  out = dj.distr_attention(q, k, v)  # None resolves to "xla" on a CPU
  np.testing.assert_allclose(out, dj.distr_attention(q, k, v, implementation="xla"))


def _problem(**overrides):
  q, k, v = qkv(0, 1, 64, 64, 2, 2, 32)
  cfg = config.DistrConfig(**overrides)
  return backends.Problem.from_call(q, k, v, config.Masks(), cfg, None)


def test_supports_reasons():
  backend = backends.get("triton")
  assert backend.supports(_problem()) is None
  assert "block_q >= 16" in backend.supports(_problem(block_q=8))
  assert backend.supports(_problem(group_size=1, block_q=8)) is None   # no grouping


def test_dense_maps_refused_by_the_gather_layout(monkeypatch):
  monkeypatch.setitem(grouping.DENSE_GROUPINGS, "dense-test", None)
  backend = backends.get("triton")
  assert "permutation" in backend.supports(_problem(grouping="dense-test", block_q=64))
  assert backend.supports(_problem(grouping="dense-test", block_q=256)) is None
  assert backends.get("xla").supports(_problem(grouping="dense-test")) is None


def test_dense_maps_run_on_xla_and_blocks_layout():
  """Dense maps go through the backends that use q_rep / k_fused / q_exp unchanged: maps
  equal to a permutation's give the permutation's output, and maps shared by the query
  heads of a kv head (Hk = kv_heads) agree between XLA and the Triton blocks layout."""
  q, k, v = qkv(3, 1, 272, 48, 4, 2, 32)
  perm = grouping.block_permutations(q, block_q=256, group_size=4)
  red = grouping.HeadReduction.from_permutation(perm, group_size=4, block_q=256)
  dense = grouping.HeadReduction.from_maps(red.q_map, red.k_map, block_q=256)
  shared = grouping.HeadReduction.from_maps(red.q_map, red.k_map[:, ::2], block_q=256)
  assert not dense.is_permutation and dense.num_blocks == 2 and dense.width == 8
  masks, problem = config.Masks(is_causal=True), _problem()
  xla, triton = backends.get("xla"), backends.get("triton_interpret")
  for backend in (xla, triton):
    np.testing.assert_allclose(backend(q, k, v, dense, masks, problem),
                               backend(q, k, v, red, masks, problem), atol=1e-5)
  np.testing.assert_allclose(triton(q, k, v, shared, masks, problem),
                             xla(q, k, v, shared, masks, problem), atol=2e-5)


def test_tiles_are_validated_and_frozen():
  with pytest.raises(ValueError, match="block_m must be a power of two"):
    tiles_lib.Tiles(block_m=48)
  with pytest.raises(ValueError, match="num_warps"):
    tiles_lib.Tiles(num_warps=3)
  t = tiles_lib.Tiles()
  with pytest.raises(Exception):
    t.block_m = 64  # frozen


def test_choose_tiles_policy():
  # gather: the query tile is the grouping block; 128 rows with a 128-wide V: 8 warps.
  t = tiles_lib.choose_tiles("gather", score_width=128, value_width=128, q_len=4096,
                             kv_len=4096, block_q=128)
  assert t.block_m == 128 and t.num_warps == 8
  # blocks: tiles never exceed the grouping block or a short sequence.
  t = tiles_lib.choose_tiles("blocks", score_width=32, value_width=128, q_len=100,
                             kv_len=40, block_q=256)
  assert t.block_m == 128 and t.block_k == 64 and t.block_k_bwd == 64
  # float32 halves the staged tiles.
  t = tiles_lib.choose_tiles("btnh", score_width=128, value_width=128, q_len=4096,
                             kv_len=4096, block_q=64, itemsize=4)
  assert t.block_m == 64 and t.block_k == 64 and t.num_stages == 2
  assert tiles_lib.padded_lengths(t, 100, 130) == (128, 192)
  for key, t in tiles_lib.TABLE.items():
    assert t == tiles_lib.Tiles(**vars(t)), key  # every entry passes validation


def test_segment_folding_never_collides_with_user_ids():
  lo = np.iinfo(np.int32).min
  masks = config.Masks(
      q_segment_ids=jnp.array([[lo, lo + 1, 5, 5]], jnp.int32),
      kv_segment_ids=jnp.array([[lo + 1, lo, 5]], jnp.int32),
      q_lengths=jnp.array([3]), kv_lengths=jnp.array([2]))
  q_seg, kv_seg = triton_backend._segments(masks, 8, 4)  # pylint: disable=protected-access
  q_seg, kv_seg = np.asarray(q_seg[0]), np.asarray(kv_seg[0])
  allowed = q_seg[:, None] == kv_seg[None, :]
  want = np.zeros((8, 4), bool)
  want[0, 1] = want[1, 0] = True  # lo meets lo, lo + 1 meets lo + 1; nothing else
  np.testing.assert_array_equal(allowed, want)


# --- on a GPU -----------------------------------------------------------------------------

# Shipped configurations at sizes where the table's tiles apply (d, G, block_q, causal),
# one compile each for forward and backward; and one long sequence.
GPU_CASES = [(128, 1, 64, False), (64, 2, 64, True), (128, 4, 64, False),
             (128, 4, 16, True), (128, 2, 512, True), (128, 4, 1024, False),
             (64, 2, 1024, True)]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("d,group_size,block_q,causal", GPU_CASES)
def test_gpu_table_configs_forward_and_gradient(d, group_size, block_q, causal):
  q, k, v = qkv(d + group_size + block_q, 1, 1000, 1000, 4, 2, d, dtype=jnp.bfloat16)
  w = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape[:3] + (d,)), jnp.float32)
  # LSH hashes a float32 copy of Q, so bf16 inputs and the float32 oracle group alike.
  kw = dict(group_size=group_size, block_q=block_q, is_causal=causal, grouping="lsh")

  def loss(impl, q, k, v):
    out = dj.distr_attention(q, k, v, implementation=impl, **kw)
    return jnp.sum(out.astype(jnp.float32) * w), out

  grad = jax.jit(jax.grad(functools.partial(loss, "triton"), argnums=(0, 1, 2),
                          has_aux=True))
  (dq, dk, dv), out = grad(q, k, v)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  ref_grad = jax.jit(jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2),
                              has_aux=True))
  ref_grads, ref = ref_grad(*f32)
  assert rel_error(out, ref) < 2e-2
  for g, r in zip((dq, dk, dv), ref_grads):
    assert rel_error(g, r) < 3e-2


@pytest.mark.gpu
@requires_gpu
def test_gpu_long_sequence():
  q, k, v = qkv(16384, 1, 16384, 16384, 2, 1, 128, dtype=jnp.bfloat16)
  kw = dict(group_size=4, block_q=64, is_causal=True, grouping="lsh")
  out = jax.jit(functools.partial(dj.distr_attention, implementation="triton", **kw))(q, k, v)
  ref = jax.jit(functools.partial(dj.distr_attention, implementation="xla", **kw))(
      *(x.astype(jnp.float32) for x in (q, k, v)))
  assert rel_error(out, ref) < 2e-2


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("d,group_size,block_q", [(64, 4, 64), (128, 4, 16),
                                                  (128, 2, 16384), (96, 8, 128)])
def test_gpu_greedy_kernel_equals_xla_loop(d, group_size, block_q):
  # Same algorithm, tie-break and Gram matrix; the kernel forms |c|^2 + |s|^2 - 2<c, s>
  # in its own float order, so only near-ties may differ: (almost) every block agrees.
  q, _, _ = qkv(d + block_q, 2, 16384 if block_q == 16384 else 3000, 16, 8, 8, d,
                dtype=jnp.bfloat16)
  kw = dict(block_q=block_q, group_size=group_size)
  kernel = grouping.greedy_permutations(q, use_kernel=True, **kw)
  xla = grouping.greedy_permutations(q, use_kernel=False, **kw)
  assert np.all(np.sort(np.asarray(kernel), -1) == np.arange(d))
  same = np.mean(np.all(np.asarray(kernel) == np.asarray(xla), axis=-1))
  assert same > 0.99, same
