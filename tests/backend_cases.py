"""The case list every backend runs: subclass `BackendTestBase` once per backend.

In the style of JAX's tests/pallas/gpu_ops_test.py (an interpret subclass) and tokamax's
AttentionTestBase: the cases live here; a backend's test class sets `implementation`,
the dtype and tolerances it is checked at, and flags for what it does not support
(those cases then check that the call is refused with the backend's reason).

Every output is compared with `distr_attention_reference` in float32 given the same
permutations (computed from the inputs in the test dtype, as `distr_attention` does),
every gradient with `jax.grad` of that reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distrattention_jax as dj
from distrattention_jax import grouping

from conftest import ON_GPU, assert_close, bernoulli, normal, qkv, segments

# (name, q_len, kv_len, heads, kv_heads, d, dv, group_size, block_q, representative,
#  options). Triton layouts: G=1 "btnh", block_q >= 256 "blocks", else "gather".
CASES = [
    ("exact", 100, 90, 2, 2, 64, 64, 1, 64, "mean", {}),
    ("exact-gqa-causal-short-q", 37, 200, 4, 2, 32, 16, 1, 64, "mean", {"is_causal": True}),
    ("gather-causal-mqa", 130, 130, 2, 1, 64, 64, 2, 32, "mean", {"is_causal": True}),
    ("gather-sample-dv48", 100, 77, 2, 2, 64, 48, 4, 16, "sample", {}),
    ("gather-g8-d128", 64, 64, 2, 2, 128, 128, 8, 64, "mean", {}),
    ("gather-segments-d256", 96, 80, 4, 2, 256, 64, 4, 32, "mean", {"segments": True}),
    ("blocks-causal", 300, 120, 2, 2, 32, 32, 2, 256, "mean", {"is_causal": True}),
    ("one-block-segments", 200, 200, 2, 1, 64, 64, 4, 1024, "sample", {"segments": True}),
    ("blocks-lengths-d96", 513, 40, 2, 2, 96, 96, 2, 256, "mean", {"lengths": True}),
    ("single-query", 1, 37, 2, 2, 64, 64, 2, 16, "mean", {}),
    ("single-key-lengths", 50, 1, 2, 2, 32, 32, 1, 16, "mean", {"lengths": True}),
]
GRAD_CASES = ("exact-gqa-causal-short-q", "gather-causal-mqa", "gather-sample-dv48",
              "gather-segments-d256", "one-block-segments", "blocks-lengths-d96")


def _ids(cases):
  return [c[0] for c in cases]


class BackendTestBase:
  """Shared cases. Subclasses set the class attributes below."""

  implementation: str = ""
  dtype = jnp.float32          # the dtype of the main cases
  fwd_tol: dict | float = dict(atol=2e-5, rtol=2e-5)   # allclose dict or rel-L2 bound
  grad_tol: dict | float = dict(atol=5e-5, rtol=5e-5)
  low_precision_tol = {jnp.bfloat16: 3e-2, jnp.float16: 5e-3}  # rel-L2 vs float32
  batch = 2
  needs_gpu = False
  supports_mask = False        # a dense boolean mask
  supports_segment_ids = True
  supports_float32 = True
  supports_small_block_q = False  # block_q < 16 with group_size > 1
  not_supported_match = {"mask": "dense boolean `mask`", "segments": "segment_ids",
                         "small_block_q": "block_q >= 16", "float32": "float32 inputs"}

  @pytest.fixture(autouse=True)
  def _platform(self):
    if self.needs_gpu and not ON_GPU:
      pytest.skip("needs a CUDA GPU")

  # -- helpers --
  def call(self, q, k, v, **kw):
    # The cases are about the permutation groupings (greedy, as `perm` computes); lowrank
    # has its own backend cases in tests/test_lowrank.py.
    kw.setdefault("grouping", "greedy")
    return dj.distr_attention(q, k, v, implementation=self.implementation, **kw)

  def jit_call(self, **kw):
    """The backend's call with options `kw` (arrays included), jitted: one compile, not
    one per primitive."""
    return jax.jit(lambda q, k, v: self.call(q, k, v, **kw))

  def kwargs(self, options, q_len, kv_len):
    kw = {"is_causal": options.get("is_causal", False)}
    if options.get("segments"):
      kw["segment_ids"] = segments(self.batch, q_len, kv_len)
    if options.get("lengths"):
      kw["query_seq_lengths"] = jnp.array([q_len, max(1, q_len // 2)][:self.batch])
      kw["key_value_seq_lengths"] = jnp.array([kv_len, max(1, kv_len // 3)][:self.batch])
    return kw

  def perm(self, q, kw):
    """The permutations `distr_attention` computes (greedy, with its padding rows)."""
    lengths = kw.get("query_seq_lengths")
    valid = None if lengths is None else jnp.arange(q.shape[1])[None] < lengths[:, None]
    return jax.jit(functools.partial(grouping.block_permutations, block_q=kw["block_q"],
                                     group_size=kw["group_size"]))(q, query_valid=valid)

  def reference(self, q, k, v, perm, **kw):
    f32 = (x.astype(jnp.float32) for x in (q, k, v))
    return jax.jit(lambda q, k, v, perm: dj.distr_attention_reference(
        q, k, v, perm=perm, **kw))(*f32, perm)

  def skip_or_refuse(self, options, kw, q, k, v):
    """For options the backend lacks: check the refusal and return True."""
    for option, flag in (("segments", self.supports_segment_ids),
                         ("mask", self.supports_mask)):
      if options.get(option) and not flag:
        with pytest.raises(NotImplementedError, match=self.not_supported_match[option]):
          self.call(q, k, v, **kw)
        return True
    return False

  # -- forward --
  @pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
  def test_forward_matches_reference(self, case):
    _, q_len, kv_len, heads, kv_heads, d, dv, g, bq, rep, options = case
    q, k, v = qkv(q_len * 7 + d, self.batch, q_len, kv_len, heads, kv_heads, d, dv,
                  self.dtype)
    kw = dict(grouping="greedy", group_size=g, block_q=bq, representative=rep,
              **self.kwargs(options, q_len, kv_len))
    if self.skip_or_refuse(options, kw, q, k, v):
      return
    out = self.jit_call(**kw)(q, k, v)
    ref = self.reference(q, k, v, self.perm(q, kw), **kw)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert_close(out, ref, self.fwd_tol)

  # -- gradients --
  @pytest.mark.parametrize("case", [c for c in CASES if c[0] in GRAD_CASES],
                           ids=list(GRAD_CASES))
  def test_gradients_match_reference(self, case):
    _, q_len, kv_len, heads, kv_heads, d, dv, g, bq, rep, options = case
    q, k, v = qkv(q_len + 3 * d, self.batch, q_len, kv_len, heads, kv_heads, d, dv,
                  self.dtype)
    w = normal(np.random.default_rng(1), (self.batch, q_len, heads, dv))
    kw = dict(grouping="greedy", group_size=g, block_q=bq, representative=rep,
              **self.kwargs(options, q_len, kv_len))
    if self.skip_or_refuse(options, kw, q, k, v):
      return
    perm = self.perm(q, kw)

    def loss(fn, q, k, v):
      return jnp.sum(fn(q, k, v).astype(jnp.float32) * w)

    ours = jax.grad(functools.partial(loss, functools.partial(self.call, **kw)),
                    argnums=(0, 1, 2))
    ref = jax.grad(functools.partial(loss, functools.partial(
        dj.distr_attention_reference, perm=perm, **kw)), argnums=(0, 1, 2))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    for a, b in zip(jax.jit(ours)(q, k, v), jax.jit(ref)(*f32)):
      assert a.dtype == q.dtype
      assert_close(a, b, self.grad_tol)

  # -- dtypes --
  @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32],
                           ids=["bf16", "f16", "f32"])
  @pytest.mark.parametrize("g,bq", [(1, 64), (4, 32), (2, 256)])
  def test_dtypes(self, dtype, g, bq):
    q, k, v = qkv(5, self.batch, 80, 70, 2, 2, 64, 64, dtype)
    kw = dict(grouping="greedy", group_size=g, block_q=bq, is_causal=True)
    if dtype == jnp.float32 and not self.supports_float32:
      with pytest.raises(NotImplementedError, match=self.not_supported_match["float32"]):
        self.call(q, k, v, **kw)
      return
    if dtype == jnp.float32 and self.dtype == jnp.float32:
      pytest.skip("float32 is the main cases' dtype")
    out = self.jit_call(**kw)(q, k, v)
    assert out.dtype == dtype
    ref = self.reference(q, k, v, self.perm(q, kw), **kw)
    tol = self.low_precision_tol.get(dtype, self.fwd_tol)
    assert_close(out, ref, tol)

  # -- masks --
  def test_dense_mask(self):
    q, k, v = qkv(1, self.batch, 48, 40, 2, 2, 32, 32, self.dtype)
    mask = bernoulli(4, 0.7, (self.batch, 1, 48, 40)).at[0, 0, 3].set(False)
    kw = dict(grouping="greedy", group_size=2, block_q=16, mask=mask, is_causal=True)
    if self.skip_or_refuse({"mask": True}, kw, q, k, v):
      return
    out = self.jit_call(**kw)(q, k, v)
    assert_close(out, self.reference(q, k, v, self.perm(q, kw), **kw), self.fwd_tol)
    assert np.all(np.asarray(out[0, 3]) == 0)

  def test_rows_with_no_key_are_zero_with_zero_gradient(self):
    q, k, v = qkv(9, self.batch, 40, 30, 2, 2, 32, 32, self.dtype)
    # Rows 30.. are padding (lengths) or in a segment without keys; batch 1 has no key.
    # (masks, [(group_size, block_q), ...]): every Triton layout once.
    variants = [(dict(query_seq_lengths=jnp.array([30, 30][:self.batch]),
                      key_value_seq_lengths=jnp.array([30, 0][:self.batch])), [(2, 16)])]
    if self.supports_segment_ids:
      q_seg = jnp.zeros((self.batch, 40), jnp.int32).at[:, 30:].set(7)  # 7: no keys
      variants.append((dict(segment_ids=(q_seg, jnp.zeros((self.batch, 30), jnp.int32))),
                       [(1, 16), (2, 256)]))
    else:
      variants[0][1].extend([(1, 16), (2, 256)])
    for masks, settings in variants:
      for g, bq in settings:
        f = functools.partial(self.call, group_size=g, block_q=bq, **masks)

        def loss(q, k, v, f=f):
          out = f(q, k, v)
          return jnp.sum(out.astype(jnp.float32) ** 2), out

        grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        assert np.all(np.asarray(out[:, 30:]) == 0)
        if "key_value_seq_lengths" in masks and self.batch > 1:
          assert np.all(np.asarray(out[1]) == 0)
        assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in grads)
        assert np.all(np.asarray(grads[0][:, 30:]) == 0)

  def test_extreme_segment_ids_with_lengths(self):
    """User segment ids equal to int32 min / min + 1 (values a backend might reserve for
    padding) with sequence lengths: padding rows stay 0 and no query sees padding keys."""
    if not self.supports_segment_ids:
      pytest.skip("no segment_ids")
    lo = np.iinfo(np.int32).min
    q, k, v = qkv(17, self.batch, 48, 40, 2, 2, 32, 32, self.dtype)
    lengths = dict(query_seq_lengths=jnp.array([48, 20][:self.batch]),
                   key_value_seq_lengths=jnp.array([40, 25][:self.batch]))
    kw = dict(grouping="greedy", group_size=2, block_q=16, **lengths)
    ours = jax.jit(lambda q, k, v, seg: self.call(q, k, v, segment_ids=seg, **kw))
    ref = jax.jit(lambda q, k, v, seg, perm: dj.distr_attention_reference(
        q, k, v, segment_ids=seg, perm=perm, **kw))
    perm = self.perm(q, kw)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    # int32 min (a padding row's id in the Triton folding) and min + 1 (a padding key's).
    for ids in ((lo, lo), (lo + 1, lo + 1)):
      q_seg = jnp.full((self.batch, 48), ids[0], jnp.int32).at[:, 40:].set(ids[1])
      kv_seg = jnp.full((self.batch, 40), ids[1], jnp.int32).at[:, :10].set(ids[0])
      out = ours(q, k, v, (q_seg, kv_seg))
      assert_close(out, ref(*f32, (q_seg, kv_seg), perm), self.fwd_tol)
      if self.batch > 1:
        assert np.all(np.asarray(out[1, 20:]) == 0)

  # -- transformations --
  def test_jit_vmap_and_remat(self):
    q, k, v = qkv(11, 2 * self.batch, 48, 48, 2, 2, 32, 32, self.dtype)
    fn = functools.partial(self.call, group_size=2, block_q=16, is_causal=True)
    stacked = [x.reshape(2, self.batch, *x.shape[1:]) for x in (q, k, v)]
    out = jax.jit(jax.vmap(fn))(*stacked).reshape(q.shape[0], 48, 2, 32)
    assert_close(out, jax.jit(fn)(q, k, v), self.fwd_tol)
    loss = lambda f: (lambda q: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2))  # noqa: E731
    g1 = jax.jit(jax.grad(loss(jax.checkpoint(fn))))(q)
    value, g2 = jax.jit(jax.value_and_grad(loss(fn)))(q)
    assert np.isfinite(float(value))
    assert_close(g1, g2, self.grad_tol)

  # -- options --
  def test_small_block_q(self):
    q, k, v = qkv(1, 1, 16, 16, 2, 2, 32, 32, self.dtype)
    kw = dict(grouping="greedy", group_size=2, block_q=8)
    if not self.supports_small_block_q:
      with pytest.raises(NotImplementedError, match=self.not_supported_match["small_block_q"]):
        self.call(q, k, v, **kw)
      return
    out = self.jit_call(**kw)(q, k, v)
    assert_close(out, self.reference(q, k, v, self.perm(q, kw), **kw), self.fwd_tol)
