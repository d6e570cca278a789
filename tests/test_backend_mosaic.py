"""The "mosaic" backend (our Hopper kernels, pallas_kernels/mosaic_gpu): what it refuses
and that its calls lower for CUDA (on any machine, abstract H100); the shared cases and
real-size forward/gradient checks on a GPU. The kernels' own parity tests are in
tests/test_mosaic_gpu.py.
"""

import dataclasses
import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distrattention_jax as dj
from distrattention_jax import config, devices, grouping
from distrattention_jax import backends
from distrattention_jax.backends import base
from distrattention_jax.backends import mosaic as mosaic_backend

from backend_cases import BackendTestBase
from conftest import lower_for_h100, qkv, rel_error, requires_gpu

def _problem(d=128, dv=128, group_size=4, block_q=1024, dtype=jnp.bfloat16, **masks):
  q = jax.ShapeDtypeStruct((1, 1000, 4, d), dtype)
  v = jax.ShapeDtypeStruct((1, 1000, 2, dv), dtype)
  cfg = config.DistrConfig(group_size=group_size, block_q=block_q)
  return base.Problem.from_call(q, q, v, config.Masks(**masks), cfg, None)


@pytest.mark.parametrize("kwargs,message", [
    (dict(dtype=jnp.float32), "float32 inputs"),
    (dict(q_segment_ids=jnp.zeros((1, 1000), jnp.int32),
          kv_segment_ids=jnp.zeros((1, 1000), jnp.int32)), "segment_ids"),
    (dict(q_lengths=jnp.array([10])), "per-sequence lengths"),
    (dict(d=64, group_size=8), "score width d/G=8"),
    (dict(dv=96), "value head_dim 96"),
    (dict(d=256, dv=256, group_size=1), "shared memory"),
    (dict(group_size=4, block_q=64), "grouping blocks of 64 rows"),
])
def test_refuses_what_the_kernels_lack(kwargs, message):
  assert message in mosaic_backend.MosaicBackend().supports(_problem(**kwargs))


@pytest.mark.parametrize("d,group_size,block_q", [(128, 4, 1024), (128, 1, 64), (64, 4, 1024),
                                                 (256, 4, 1024), (128, 2, 256)])
def test_supports(d, group_size, block_q):
  assert mosaic_backend.MosaicBackend().supports(
      _problem(d=d, dv=d, group_size=group_size, block_q=block_q)) is None


@pytest.mark.parametrize("group_size,block_q,kv_len,picked", [
    (1, 16384, 16384, False), (2, 16384, 16384, True), (4, 16384, 16384, True),
    (4, 1024, 16384, False), (4, 4096, 4096, False)])
def test_none_picks_mosaic_only_where_it_was_faster(group_size, block_q, kv_len, picked):
  # On a (pretended) Hopper GPU: mosaic for G > 1 with one grouping per sequence and
  # 16384+ keys (measured faster than cuDNN there); otherwise a later backend (cuDNN on
  # a real GPU).
  problem = dataclasses.replace(_problem(group_size=group_size, block_q=block_q),
                                platform="gpu", q_len=kv_len, kv_len=kv_len)
  with mock.patch.object(devices, "is_hopper", return_value=True):
    assert mosaic_backend.MosaicBackend().supports(problem) is None
    assert (backends.select(None, problem).name == "mosaic") == picked
    assert backends.select("mosaic", problem).name == "mosaic"


@pytest.mark.parametrize("group_size,block_q,causal", [(1, 64, False), (4, 1024, True),
                                                       (2, 256, True)])
def test_lowers_for_cuda_on_cpu(group_size, block_q, causal):
  """Exact (G=1), one grouping per sequence, and per-block K_fused (3 blocks)."""
  q_len, d = 600, 128
  masks = config.Masks(is_causal=causal)
  cfg = config.DistrConfig(group_size=group_size, block_q=block_q)
  backend = mosaic_backend.MosaicBackend()
  num_blocks = -(-q_len // block_q)

  def loss(q, k, v, perm):
    problem = base.Problem.from_call(q, k, v, masks, cfg, None)
    assert backend.supports(problem) is None
    reduction = None if group_size == 1 else grouping.HeadReduction.from_permutation(
        perm, group_size=group_size, block_q=block_q)
    return jnp.sum(backend(q, k, v, reduction, masks, problem).astype(jnp.float32))

  args = [jax.ShapeDtypeStruct((1, q_len, 4, d), jnp.bfloat16),
          jax.ShapeDtypeStruct((1, q_len, 2, d), jnp.bfloat16),
          jax.ShapeDtypeStruct((1, q_len, 2, d), jnp.bfloat16),
          jax.ShapeDtypeStruct((1, 4, num_blocks, d), jnp.int32)]
  text = lower_for_h100(jax.grad(loss, argnums=(0, 1, 2)), *args)
  assert "@mosaic_gpu" in text


@pytest.mark.parametrize("q_len,d,group_size,projected,k_kernel", [
    (640, 128, 4, True, True),     # Q_rep in the forward kernel, K_fused by the kernel
    (600, 128, 4, True, False),    # 600 keys: not whole 128-row tiles, XLA's K_fused
    (640, 128, 2, False, True),    # r=64 stores O from registers: XLA's Q_rep
    (65536, 256, 4, False, True),  # d=256, many row tiles a CTA: K_fused in two slots
])
def test_one_block_routes_projections_to_the_kernels(q_len, d, group_size, projected,
                                                     k_kernel):
  """With one grouping block the backend computes Q_rep inside the forward kernel and
  K_fused by the projection kernel where they apply (lowered for CUDA on a CPU)."""
  from pallas_kernels.mosaic_gpu import attention as mosaic_attention  # pylint: disable=import-outside-toplevel
  from pallas_kernels.mosaic_gpu import project  # pylint: disable=import-outside-toplevel
  masks = config.Masks(is_causal=False)
  cfg = config.DistrConfig(group_size=group_size, block_q=1024)
  backend = mosaic_backend.MosaicBackend()

  def loss(q, k, v, perm):
    problem = base.Problem.from_call(q, k, v, masks, cfg, None)
    reduction = grouping.HeadReduction.from_permutation(perm, group_size=group_size,
                                                        block_q=1024)
    return jnp.sum(backend(q, k, v, reduction, masks, problem).astype(jnp.float32))

  args = [jax.ShapeDtypeStruct((2, q_len, 4, d), jnp.bfloat16),
          jax.ShapeDtypeStruct((2, q_len, 2, d), jnp.bfloat16),
          jax.ShapeDtypeStruct((2, q_len, 2, d), jnp.bfloat16),
          jax.ShapeDtypeStruct((2, 4, 1, d), jnp.int32)]
  with mock.patch.object(mosaic_attention, "attention_projected",
                         wraps=mosaic_attention.attention_projected) as fused_q, \
       mock.patch.object(project, "projected", wraps=project.projected) as fused_k:
    text = lower_for_h100(jax.value_and_grad(loss, argnums=(0, 1, 2)), *args)
  assert fused_q.called == projected and fused_k.called == k_kernel
  assert text.count("stablehlo.custom_call @mosaic_gpu") >= 2 + k_kernel


# --- on a GPU -----------------------------------------------------------------------------


@pytest.mark.gpu
class TestMosaicGpu(BackendTestBase):
  """The shared cases; those with options or widths the kernels lack (dv < 64, grouping
  blocks under 128 rows, sequence lengths, segment ids, masks, float32) must be refused
  with NotImplementedError naming the reason."""
  implementation = "mosaic"
  needs_gpu = True
  dtype = jnp.bfloat16
  fwd_tol = 2e-2
  grad_tol = 3e-2
  low_precision_tol = {jnp.bfloat16: 3e-2, jnp.float16: 1e-2}
  supports_segment_ids = False
  supports_float32 = False
  supports_small_block_q = False
  not_supported_match = {**BackendTestBase.not_supported_match,
                         "small_block_q": "grouping blocks of"}

  def refused(self, kw, q, k, v):
    """True (after checking the error) if the backend refuses this call."""
    try:
      jax.eval_shape(lambda q, k, v: self.call(q, k, v, **kw), q, k, v)
    except NotImplementedError as e:
      assert "'mosaic' does not support" in str(e), e
      return True
    return False

  def skip_or_refuse(self, options, kw, q, k, v):
    return super().skip_or_refuse(options, kw, q, k, v) or self.refused(kw, q, k, v)

  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32],
                           ids=["bf16", "f16", "f32"])
  @pytest.mark.parametrize("g,bq", [(1, 64), (4, 32), (2, 256)])
  def test_dtypes(self, dtype, g, bq):
    q, k, v = qkv(5, self.batch, 80, 70, 2, 2, 64, 64, dtype)
    if dtype != jnp.float32 and self.refused(dict(group_size=g, block_q=bq), q, k, v):
      return
    super().test_dtypes(dtype, g, bq)

  def test_rows_with_no_key_are_zero_with_zero_gradient(self):
    q, k, v = qkv(9, self.batch, 40, 30, 2, 2, 64, 64, self.dtype)
    kw = dict(group_size=2, block_q=256, query_seq_lengths=jnp.array([30, 30][:self.batch]))
    with pytest.raises(NotImplementedError, match="per-sequence lengths"):
      self.call(q, k, v, **kw)

  def test_jit_vmap_and_remat(self):
    q, k, v = qkv(11, 2 * self.batch, 200, 200, 2, 2, 64, 64, self.dtype)
    fn = functools.partial(self.call, group_size=2, block_q=256, is_causal=True)
    stacked = [x.reshape(2, self.batch, *x.shape[1:]) for x in (q, k, v)]
    out = jax.jit(jax.vmap(fn))(*stacked).reshape(q.shape)
    assert rel_error(out, jax.jit(fn)(q, k, v)) < 1e-2
    loss = lambda f: (lambda q: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2))  # noqa: E731
    g1 = jax.jit(jax.grad(loss(jax.checkpoint(fn))))(q)
    value, g2 = jax.jit(jax.value_and_grad(loss(fn)))(q)
    assert np.isfinite(float(value))
    assert rel_error(g1, g2) < 1e-2


CASES_REAL = [  # (q_len, kv_len, d, group_size, block_q, causal, heads, kv_heads)
    (1000, 1000, 128, 1, 64, True, 4, 2),       # exact attention on our kernels, GQA
    (1000, 777, 128, 4, 1024, False, 4, 2),     # one grouping per sequence, cross lengths
    (999, 999, 64, 2, 256, True, 4, 4),         # K_fused per grouping block (4 blocks)
    (4096, 4096, 256, 4, 4096, True, 2, 1),     # dv=256, MQA
]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("q_len,kv_len,d,group_size,block_q,causal,heads,kv_heads",
                         CASES_REAL)
def test_gpu_forward_and_gradient(q_len, kv_len, d, group_size, block_q, causal, heads,
                                  kv_heads):
  q, k, v = qkv(q_len + d + group_size, 1, q_len, kv_len, heads, kv_heads, d,
                dtype=jnp.bfloat16)
  # LSH hashes a float32 copy of Q, so bf16 inputs and the float32 oracle group alike.
  kw = dict(group_size=group_size, block_q=block_q, is_causal=causal, grouping="lsh")
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  w = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape[:3] + (d,)), jnp.float32)

  def loss(impl, q, k, v):
    out = dj.distr_attention(q, k, v, implementation=impl, **kw)
    return jnp.sum(out.astype(jnp.float32) * w), out

  grads, out = jax.jit(jax.grad(functools.partial(loss, "mosaic"), argnums=(0, 1, 2),
                                has_aux=True))(q, k, v)
  ref_grads, ref = jax.jit(jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2),
                                    has_aux=True))(*f32)
  assert out.dtype == q.dtype and rel_error(out, ref) < 2e-2
  for g, r in zip(grads, ref_grads):
    assert g.dtype == q.dtype and rel_error(g, r) < 3e-2
