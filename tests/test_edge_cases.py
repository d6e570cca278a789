"""Regression tests for issue 16: bad input and edge cases (one test per item)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import distrattention_jax as dj


def _x(shape, seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


# --- item 1: NNX passes is_causal to attention_fn ---------------------------------------

def test_nnx_causal_routes_run_and_match_xla_is_causal():
  x = _x((2, 20, 32), 1)
  ref = nnx.MultiHeadAttention(2, 32, rngs=nnx.Rngs(0), decode=False)
  params = nnx.state(ref, nnx.Param)

  def projected(module):
    proj = lambda layer: layer(x)  # noqa: E731  [B, T, H, d]
    return proj(module.query), proj(module.key), proj(module.value)

  def expected(is_causal):
    q, k, v = projected(ref)
    attn = dj.distr_attention(q, k, v, group_size=2, block_q=16, is_causal=is_causal,
                              implementation="xla")
    return ref.out(attn)

  # DistrMultiHeadAttention(causal=True): NNX calls attention_fn with is_causal=False.
  layer = dj.DistrMultiHeadAttention(2, 32, group_size=2, block_q=16, causal=True,
                                     rngs=nnx.Rngs(0), decode=False)
  nnx.update(layer, params)
  np.testing.assert_allclose(layer(x), expected(True), atol=2e-5)
  # make_attention_fn(is_causal=True) inside Flax's own module.
  fn = dj.make_attention_fn(group_size=2, block_q=16, is_causal=True)
  flax_layer = nnx.MultiHeadAttention(2, 32, attention_fn=fn, rngs=nnx.Rngs(0),
                                      decode=False)
  np.testing.assert_allclose(flax_layer(x), expected(True), atol=2e-5)
  # A non-causal attention_fn made causal per call (NNX's is_causal=True).
  fn = dj.make_attention_fn(group_size=2, block_q=16)
  flax_layer = nnx.MultiHeadAttention(2, 32, attention_fn=fn, rngs=nnx.Rngs(0),
                                      decode=False)
  np.testing.assert_allclose(flax_layer(x, is_causal=True), expected(True), atol=2e-5)
  np.testing.assert_allclose(flax_layer(x), expected(False), atol=2e-5)


# --- item 3: arguments silently changed or accepted -------------------------------------

def _qkv(batch=2, length=16, heads=2, d=16, seed=0):
  return tuple(_x((batch, length, heads, d), seed + i) for i in range(3))


@pytest.mark.parametrize("implementation", ["xla", "pallas_interpret"])
def test_int64_segment_ids_are_not_truncated(implementation):
  q, k, v = _qkv()
  kw = dict(group_size=2, block_q=16, implementation=implementation, grouping="greedy")
  two = jnp.asarray(np.repeat([[0, 1]], 8, axis=1).repeat(2, 0), jnp.int32)
  expected = dj.distr_attention(q, k, v, segment_ids=two, **kw)
  with jax.enable_x64(True):
    wide = jnp.asarray(np.repeat([[0, 2**32]], 8, axis=1).repeat(2, 0), jnp.int64)
    assert wide.dtype == jnp.int64
    eager = dj.distr_attention(q, k, v, segment_ids=wide, **kw)
    traced = jax.jit(lambda s: dj.distr_attention(q, k, v, segment_ids=s, **kw))(wide)
    pair = dj.distr_attention(q, k, v, segment_ids=(wide, wide), **kw)
    ref = dj.exact_attention(q, k, v, segment_ids=wide)
  np.testing.assert_allclose(eager, expected, atol=1e-6)
  np.testing.assert_allclose(traced, expected, atol=1e-6)
  np.testing.assert_allclose(pair, expected, atol=1e-6)
  np.testing.assert_allclose(ref, dj.exact_attention(q, k, v, segment_ids=two), atol=1e-6)


def test_int64_lengths_are_not_truncated():
  q, k, v = _qkv()
  expected = dj.distr_attention(q, k, v, key_value_seq_lengths=jnp.array([16, 16]),
                                implementation="xla")
  with jax.enable_x64(True):
    wide = jnp.array([2**32 + 3, 16], jnp.int64)
    with pytest.raises(ValueError, match="key_value_seq_lengths"):
      dj.distr_attention(q, k, v, key_value_seq_lengths=wide, implementation="xla")
    # Traced lengths cannot be checked: they are clipped to [0, T] (not wrapped to 3).
    traced = jax.jit(lambda n: dj.distr_attention(
        q, k, v, key_value_seq_lengths=n, implementation="xla"))(wide)
  np.testing.assert_allclose(traced, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["query_seq_lengths", "key_value_seq_lengths"])
@pytest.mark.parametrize("bad", [[-1, 4], [17, 4]])
def test_lengths_outside_zero_to_t_are_rejected(name, bad):
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=name):
    dj.distr_attention(q, k, v, implementation="xla", **{name: jnp.array(bad)})
  with pytest.raises(ValueError, match=name):
    dj.exact_attention(q, k, v, **{name: np.array(bad)})
  # The bounds themselves are fine.
  dj.distr_attention(q, k, v, implementation="xla", **{name: jnp.array([0, 16])})


def test_traced_out_of_range_lengths_are_clipped():
  q, k, v = _qkv()
  run = jax.jit(lambda n: dj.distr_attention(q, k, v, query_seq_lengths=n,
                                             implementation="xla"))
  np.testing.assert_array_equal(run(jnp.array([-5, 99])),
                                run(jnp.array([0, 16])))


def test_num_projs_bool_and_non_finite_scale_are_rejected():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="num_projs"):
    dj.distr_attention(q, k, v, grouping="lsh", num_projs=True)
  with pytest.raises(ValueError, match="num_projs"):
    dj.make_attention_fn(num_projs=True)
  for bad in (float("nan"), float("inf"), -float("inf"), np.float32("nan")):
    with pytest.raises(ValueError, match="scale"):
      dj.distr_attention(q, k, v, scale=bad)
    with pytest.raises(ValueError, match="scale"):
      dj.distr_attention_reference(q, k, v, scale=bad)


# --- item 4: huge logits in the Pallas kernels --------------------------------------------

@pytest.mark.parametrize("group_size,block_q", [(1, 64), (2, 16), (2, 256)])  # btnh, gather, blocks
@pytest.mark.parametrize("length,is_causal", [(40, False), (100, True)])
def test_pallas_huge_logits_stay_finite_and_match_reference(group_size, block_q, length,
                                                             is_causal):
  q = _x((1, length, 2, 16), 0) * 1e9  # float32 logits ~1e9: one-hot attention
  k, v = _x((1, length, 2, 16), 1), _x((1, length, 2, 16), 2)
  kw = dict(group_size=group_size, block_q=block_q, is_causal=is_causal, grouping="greedy")
  out = dj.distr_attention(q, k, v, implementation="pallas_interpret", **kw)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, dj.distr_attention_reference(q, k, v, **kw), atol=1e-5)

  def grads(impl):
    loss = lambda q, k, v: jnp.sum(jnp.sin(dj.distr_attention(  # noqa: E731
        q, k, v, implementation=impl, **kw)))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  got, want = grads("pallas_interpret"), grads("xla")
  for g in got:
    assert np.all(np.isfinite(g))
  np.testing.assert_allclose(got[0], want[0], atol=1e-4)
  # dK = dS^T Q: float32 rounding of dS (~1e-7) times |Q| ~ 1e9.
  np.testing.assert_allclose(got[1], want[1], atol=1e-5 * float(jnp.max(jnp.abs(q))))
  if not (group_size > 1 and block_q < 256):
    # ("gather" differentiates at Q_exp K^T, other arithmetic than its forward's
    # Q_rep K_fused^T: at these magnitudes the recomputed probabilities differ.)
    np.testing.assert_allclose(got[2], want[2], atol=1e-4)


@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_pallas_negative_and_zero_scale(scale):
  q, k, v = _x((1, 24, 2, 16), 3), _x((1, 24, 2, 16), 4), _x((1, 24, 2, 16), 5)
  kw = dict(group_size=2, block_q=16, grouping="greedy", scale=scale,
            key_value_seq_lengths=jnp.array([20]),
            is_causal=True)

  def run(impl):
    f = lambda q, k, v: dj.distr_attention(q, k, v, implementation=impl, **kw)  # noqa: E731
    return f(q, k, v), jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v)

  (out, grads), (ref, ref_grads) = run("pallas_interpret"), run("xla")
  np.testing.assert_allclose(out, ref, atol=2e-5)
  for a, b in zip(grads, ref_grads):
    np.testing.assert_allclose(a, b, atol=2e-5)


# --- item 5: the "gather" kernel's K_fused precision ------------------------------------

@pytest.mark.parametrize("group_size", [2, 4])
def test_pallas_gather_bf16_error_matches_xla(group_size):
  from distrattention_jax import grouping  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  shape = (4, 64, 2, 64)
  q = jnp.asarray(rng.standard_normal(shape) * 10, jnp.bfloat16)  # sharp attention
  k = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  kw = dict(group_size=group_size, block_q=16, grouping="greedy")  # "gather" layout
  perm = grouping.block_permutations(q, block_q=16, group_size=group_size)
  ref = dj.distr_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)),
                                     perm=perm, **kw)

  def errors(impl):
    err = dj.distr_attention(q, k, v, implementation=impl, **kw).astype(jnp.float32) - ref
    return float(jnp.max(jnp.abs(err))), float(jnp.sqrt(jnp.mean(jnp.square(err))))

  (xla_max, xla_rms), (pallas_max, pallas_rms) = errors("xla"), errors("pallas_interpret")
  # Rounding K_fused to bf16 gave ~1.45x XLA's RMS error here (the max error is noisier).
  assert pallas_rms <= 1.15 * xla_rms, (pallas_rms, xla_rms)
  assert pallas_max <= 1.5 * xla_max, (pallas_max, xla_max)


# --- item 7: cuDNN refusals give their advice once ----------------------------------------

@pytest.mark.parametrize("case", ["float32", "segment_ids", "mask", "head_dim"])
def test_cudnn_refusals_say_their_advice_once(case):
  q = _x((1, 32, 2, 16), 0, jnp.bfloat16)
  kwargs = {"float32": dict(q=q.astype(jnp.float32)),
            "segment_ids": dict(segment_ids=jnp.zeros((1, 32), jnp.int32)),
            "mask": dict(mask=jnp.ones((32, 32), bool)),
            "head_dim": dict(q=q[..., :12])}[case]
  x = kwargs.pop("q", q)
  with pytest.raises(NotImplementedError) as info:
    dj.distr_attention(x, x, x, implementation="cudnn", **kwargs)
  message = str(info.value)
  assert message.count("use implementation=") == 1, message
  assert message.count("or None to choose automatically") == 1, message
