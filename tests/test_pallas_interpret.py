"""Pallas kernels vs the reference in interpret mode (CPU), forward and gradients.

Interpret mode cannot see GPU-only bugs; tests/test_pallas_lowering.py lowers every
configuration for CUDA and tests/test_pallas_gpu.py checks parity on a GPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distrattention_jax as dj
from distrattention_jax import grouping


def _inputs(seed, batch, q_len, kv_len, heads, kv_heads, d, dv, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, q_len, heads, d))
  k = rng.standard_normal((batch, kv_len, kv_heads, d))
  v = rng.standard_normal((batch, kv_len, kv_heads, dv))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _segments(batch, q_len, kv_len):
  q_seg = jnp.asarray((np.arange(q_len)[None] >= q_len // 3).repeat(batch, 0), jnp.int32)
  kv_seg = jnp.asarray((np.arange(kv_len)[None] >= kv_len // 2).repeat(batch, 0), jnp.int32)
  return q_seg, kv_seg


# (q_len, kv_len, heads, kv_heads, d, dv, group_size, block_q, representative, options)
CASES = [
    (100, 90, 2, 2, 64, 64, 1, 64, "mean", {}),
    (37, 200, 4, 2, 32, 16, 1, 64, "mean", {"is_causal": True}),
    (130, 130, 2, 1, 64, 64, 2, 32, "mean", {"is_causal": True}),
    (100, 77, 2, 2, 64, 48, 4, 16, "sample", {}),
    (64, 64, 2, 2, 128, 128, 8, 64, "mean", {}),
    (96, 80, 4, 2, 256, 64, 4, 32, "mean", {"segments": True}),
    (300, 120, 2, 2, 32, 32, 2, 256, "mean", {"is_causal": True}),
    (200, 200, 2, 1, 64, 64, 4, 1024, "sample", {"segments": True}),
    (513, 40, 2, 2, 96, 96, 2, 256, "mean", {"lengths": True}),
    (1, 37, 2, 2, 64, 64, 2, 16, "mean", {}),
    (50, 1, 2, 2, 32, 32, 1, 16, "mean", {"lengths": True}),
]


def _kwargs(options, batch, q_len, kv_len):
  kw = {"is_causal": options.get("is_causal", False)}
  if options.get("segments"):
    kw["segment_ids"] = _segments(batch, q_len, kv_len)
  if options.get("lengths"):
    kw["query_seq_lengths"] = jnp.array([q_len, max(1, q_len // 2)][:batch])
    kw["key_value_seq_lengths"] = jnp.array([kv_len, max(1, kv_len // 3)][:batch])
  return kw


class PallasTest:
  implementation = "pallas_interpret"
  batch = 2

  @pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:9])))
  def test_forward_matches_reference(self, case):
    q_len, kv_len, heads, kv_heads, d, dv, g, bq, rep, options = case
    q, k, v = _inputs(q_len * 7 + d, self.batch, q_len, kv_len, heads, kv_heads, d, dv)
    kw = dict(group_size=g, block_q=bq, representative=rep,
              **_kwargs(options, self.batch, q_len, kv_len))
    out = dj.distr_attention(q, k, v, implementation=self.implementation, **kw)
    ref = dj.distr_attention_reference(q, k, v, **kw)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)

  @pytest.mark.parametrize("case", [CASES[i] for i in (1, 2, 3, 5, 7, 8)],
                           ids=lambda c: "-".join(map(str, c[:9])))
  def test_gradients_match_reference(self, case):
    q_len, kv_len, heads, kv_heads, d, dv, g, bq, rep, options = case
    q, k, v = _inputs(q_len + 3 * d, self.batch, q_len, kv_len, heads, kv_heads, d, dv)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((self.batch, q_len, heads, dv)),
                    jnp.float32)
    kw = dict(group_size=g, block_q=bq, representative=rep,
              **_kwargs(options, self.batch, q_len, kv_len))
    perm = grouping.block_permutations(q, block_q=bq, group_size=g,
                                       query_valid=None if "query_seq_lengths" not in kw
                                       else jnp.arange(q_len)[None] < kw["query_seq_lengths"][:, None])

    def loss(fn, q, k, v):
      return jnp.sum(fn(q, k, v) * w)

    ours = jax.grad(functools.partial(loss, functools.partial(
        dj.distr_attention, implementation=self.implementation, **kw)), argnums=(0, 1, 2))
    ref = jax.grad(functools.partial(loss, functools.partial(
        dj.distr_attention_reference, perm=perm, **kw)), argnums=(0, 1, 2))
    for a, b in zip(jax.jit(ours)(q, k, v), ref(q, k, v)):
      assert np.all(np.isfinite(np.asarray(a)))
      np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5)

  @pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 3e-2), (jnp.float16, 5e-3)])
  @pytest.mark.parametrize("g,bq", [(1, 64), (4, 32), (2, 256)])
  def test_low_precision(self, dtype, tol, g, bq):
    q, k, v = _inputs(5, self.batch, 80, 70, 2, 2, 64, 64, dtype)
    kw = dict(group_size=g, block_q=bq, is_causal=True)
    out = dj.distr_attention(q, k, v, implementation=self.implementation, **kw)
    ref = dj.distr_attention_reference(q, k, v, **kw)
    assert out.dtype == dtype
    err = np.linalg.norm(np.asarray(out, np.float32) - np.asarray(ref, np.float32))
    assert err / np.linalg.norm(np.asarray(ref, np.float32)) < tol

  def test_fully_masked_rows_are_zero_with_zero_gradient(self):
    q, k, v = _inputs(9, self.batch, 40, 30, 2, 2, 32, 32)
    q_seg = jnp.zeros((self.batch, 40), jnp.int32).at[:, 30:].set(7)  # segment 7: no keys
    kv_seg = jnp.zeros((self.batch, 30), jnp.int32)
    for g, bq in ((1, 16), (2, 16), (2, 256)):
      f = lambda q, k, v: dj.distr_attention(  # noqa: E731
          q, k, v, group_size=g, block_q=bq, segment_ids=(q_seg, kv_seg),
          implementation=self.implementation)
      out = f(q, k, v)
      assert np.all(np.asarray(out[:, 30:]) == 0)
      grads = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2))(q, k, v)
      assert all(np.all(np.isfinite(np.asarray(x))) for x in grads)
      assert np.all(np.asarray(grads[0][:, 30:]) == 0)

  def test_jit_vmap_and_remat(self):
    q, k, v = _inputs(11, 2 * self.batch, 48, 48, 2, 2, 32, 32)
    fn = functools.partial(dj.distr_attention, group_size=2, block_q=16,
                           implementation=self.implementation)
    stacked = [x.reshape(2, self.batch, *x.shape[1:]) for x in (q, k, v)]
    out = jax.jit(jax.vmap(fn))(*stacked).reshape(q.shape[0], 48, 2, 32)
    np.testing.assert_allclose(out, fn(q, k, v), atol=2e-5)
    g1 = jax.grad(lambda q: jnp.sum(jax.checkpoint(fn)(q, k, v) ** 2))(q)
    g2 = jax.grad(lambda q: jnp.sum(fn(q, k, v) ** 2))(q)
    np.testing.assert_allclose(g1, g2, atol=1e-5)

  def test_dense_mask_is_rejected(self):
    q, k, v = _inputs(1, 1, 16, 16, 2, 2, 32, 32)
    with pytest.raises(NotImplementedError, match="dense boolean `mask`"):
      dj.distr_attention(q, k, v, mask=jnp.ones((16, 16), bool),
                         implementation=self.implementation)

  def test_small_block_q_is_rejected(self):
    q, k, v = _inputs(1, 1, 16, 16, 2, 2, 32, 32)
    with pytest.raises(NotImplementedError, match="block_q >= 16"):
      dj.distr_attention(q, k, v, group_size=2, block_q=8,
                         implementation=self.implementation)


class TestPallasInterpret(PallasTest):
  pass


def test_pallas_needs_gpu_backend():
  if jax.default_backend() == "gpu":
    pytest.skip("has a GPU")
  q, k, v = _inputs(1, 1, 16, 16, 2, 2, 32, 32)
  with pytest.raises(ValueError, match="needs a GPU"):
    dj.distr_attention(q, k, v, implementation="pallas")
  out = dj.distr_attention(q, k, v)  # None resolves to "xla" on a CPU
  np.testing.assert_allclose(out, dj.distr_attention(q, k, v, implementation="xla"))
