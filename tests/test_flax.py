"""Flax integration: drop-in modules (linen, NNX) and the attention_fn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import distrattention_jax as dj


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_linen_same_params_and_exact_at_group_size_1():
  x = _x((2, 3, 17, 32))  # two leading batch dims
  ref = nn.MultiHeadDotProductAttention(num_heads=4)
  ours = dj.DistrMultiHeadDotProductAttention(num_heads=4, group_size=1)
  params = ref.init(jax.random.key(1), x)
  assert jax.tree.structure(params) == jax.tree.structure(ours.init(jax.random.key(1), x))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
      jnp.shape, ours.init(jax.random.key(1), x))
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=2e-5)
  mask = nn.make_causal_mask(jnp.ones((2, 3, 17)))
  np.testing.assert_allclose(ours.apply(params, x, mask=mask), ref.apply(params, x, mask=mask),
                             atol=2e-5)


def test_linen_group_size_2_is_distr_attention_on_projections():
  x = _x((2, 20, 32), 1)
  ours = dj.DistrMultiHeadDotProductAttention(num_heads=2, group_size=2, block_q=16)
  params = ours.init(jax.random.key(0), x)
  p = params["params"]
  proj = lambda name: jnp.einsum("btc,chd->bthd", x, p[name]["kernel"]) + p[name]["bias"]  # noqa: E731
  attn = dj.distr_attention(proj("query"), proj("key"), proj("value"), group_size=2,
                            block_q=16, implementation="xla")
  expected = jnp.einsum("bthd,hdc->btc", attn, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(ours.apply(params, x), expected, atol=2e-5)


def test_linen_gradients_flow_under_jit():
  x = _x((2, 20, 32), 2)
  model = dj.DistrMultiHeadDotProductAttention(num_heads=2, group_size=2, block_q=16)
  params = model.init(jax.random.key(0), x)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2)))(params)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)


def test_nnx_same_state_exact_at_group_size_1_and_jit():
  x = _x((2, 17, 32), 3)
  ref = nnx.MultiHeadAttention(4, 32, num_kv_heads=2, rngs=nnx.Rngs(0), decode=False)
  ours = dj.DistrMultiHeadAttention(4, 32, num_kv_heads=2, group_size=1, rngs=nnx.Rngs(0),
                                    decode=False)
  assert jax.tree.structure(nnx.state(ref, nnx.Param)) == jax.tree.structure(
      nnx.state(ours, nnx.Param))
  np.testing.assert_allclose(ours(x), ref(x), atol=2e-5)
  distr = dj.DistrMultiHeadAttention(4, 32, group_size=2, block_q=16, rngs=nnx.Rngs(0),
                                     decode=False)
  out = nnx.jit(lambda m, x: m(x))(distr, x)
  assert out.shape == x.shape and np.all(np.isfinite(out))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(distr)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_attention_fn_refuses_what_it_cannot_do():
  fn = dj.make_attention_fn(group_size=2, block_q=16)
  q = _x((1, 8, 2, 16))
  with pytest.raises(NotImplementedError, match="bias"):
    fn(q, q, q, bias=jnp.zeros((1, 2, 8, 8)))
  with pytest.raises(NotImplementedError, match="dropout"):
    fn(q, q, q, dropout_rate=0.1, deterministic=False)
  fn(q, q, q, dropout_rate=0.1, deterministic=True)  # no dropout at inference: fine
  with pytest.raises(NotImplementedError, match="sown"):
    fn(q, q, q, module=object())
  with pytest.raises(ValueError, match="group_size"):
    dj.make_attention_fn(group_size=3)


def test_causal_option_matches_causal_mask():
  fn_flag = dj.make_attention_fn(group_size=2, block_q=16, is_causal=True)
  fn_mask = dj.make_attention_fn(group_size=2, block_q=16)
  q, k, v = _x((2, 24, 2, 16), 4), _x((2, 24, 2, 16), 5), _x((2, 24, 2, 16), 6)
  mask = nn.make_causal_mask(jnp.ones((2, 24)))
  np.testing.assert_allclose(fn_flag(q, k, v), fn_mask(q, k, v, mask=mask), atol=2e-6)


def test_config_and_keyword_options():
  cfg = dj.DistrConfig(group_size=4, block_q=16, implementation="xla")
  q, k, v = _x((2, 24, 2, 16), 7), _x((2, 24, 2, 16), 8), _x((2, 24, 2, 16), 9)
  want = dj.distr_attention(q, k, v, group_size=2, block_q=16, implementation="xla")
  # Keyword options replace the config's fields.
  np.testing.assert_allclose(dj.make_attention_fn(cfg, group_size=2)(q, k, v), want)
  with pytest.raises(TypeError, match="unexpected DistrAttention options"):
    dj.make_attention_fn(group_sise=2)
  x = _x((2, 20, 32), 10)
  by_config = dj.DistrMultiHeadDotProductAttention(num_heads=2, config=cfg)
  by_keyword = dj.DistrMultiHeadDotProductAttention(num_heads=2, group_size=4, block_q=16,
                                                    implementation="xla")
  params = by_config.init(jax.random.key(0), x)
  np.testing.assert_allclose(by_config.apply(params, x), by_keyword.apply(params, x))
  nnx_config = dj.DistrMultiHeadAttention(2, 32, config=cfg, rngs=nnx.Rngs(0), decode=False)
  nnx_keyword = dj.DistrMultiHeadAttention(2, 32, group_size=4, block_q=16,
                                           implementation="xla", rngs=nnx.Rngs(0),
                                           decode=False)
  np.testing.assert_allclose(nnx_config(x), nnx_keyword(x))
