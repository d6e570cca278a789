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


def _nnx_lowrank_layer(**kw):
  return dj.DistrMultiHeadAttention(4, 32, num_kv_heads=2, group_size=4, grouping="lowrank",
                                    block_q=16, implementation="xla", causal=True,
                                    rngs=nnx.Rngs(0), decode=False, **kw)


def test_nnx_calibrated_lowrank_maps_are_state_used_and_strictly_causal():
  layer = _nnx_lowrank_layer()
  fitted = _nnx_lowrank_layer()            # same parameters, maps fitted per call
  calib = _x((3, 40, 32), 5)
  out, (q_map, k_map) = layer.calibrate_lowrank(calib)
  # The calibration pass is exact attention.
  ref = nnx.MultiHeadAttention(4, 32, num_kv_heads=2, rngs=nnx.Rngs(0), decode=False)
  np.testing.assert_allclose(out, ref(calib, is_causal=True), atol=2e-5)
  assert q_map.shape == (4, 8, 2) and k_map.shape == (2, 8, 2)  # one per kv head
  assert len(jax.tree.leaves(nnx.state(layer, dj.LowrankMaps))) == 2
  assert jax.tree.structure(nnx.state(layer, nnx.Param)) == jax.tree.structure(
      nnx.state(ref, nnx.Param))
  # Later calls run DistrAttention with exactly these maps.
  x = _x((2, 24, 32), 6)
  y = layer(x)
  with_maps = nnx.MultiHeadAttention(
      4, 32, num_kv_heads=2, rngs=nnx.Rngs(0), decode=False,
      attention_fn=dj.make_attention_fn(group_size=4, grouping="lowrank", block_q=16,
                                        implementation="xla", is_causal=True,
                                        lowrank_maps=(q_map, k_map)))
  np.testing.assert_allclose(y, with_maps(x), atol=2e-5)
  assert float(jnp.max(jnp.abs(y - fitted(x)))) > 1e-4      # not the per-call fit
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, x), y, atol=2e-5)
  # Strictly causal: changing tokens 12.. leaves outputs 0..11 as they were; the
  # per-call fit sees the later tokens.
  x2 = x.at[:, 12:].add(3.0 * _x((2, 12, 32), 7))
  assert float(jnp.max(jnp.abs(layer(x2)[:, :12] - y[:, :12]))) < 1e-5
  assert float(jnp.max(jnp.abs(fitted(x2)[:, :12] - fitted(x)[:, :12]))) > 1e-4
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert not jax.tree.leaves(nnx.state(grads, dj.LowrankMaps))  # maps are not trained


def test_calibrate_lowrank_needs_the_lowrank_grouping():
  layer = dj.DistrMultiHeadAttention(4, 32, group_size=2, grouping="greedy",
                                     rngs=nnx.Rngs(0), decode=False)
  with pytest.raises(ValueError, match="grouping='lowrank'"):
    layer.calibrate_lowrank(_x((1, 8, 32)))


def test_linen_takes_fixed_lowrank_maps():
  x = _x((2, 24, 32), 8)
  q_map, k_map = (jnp.asarray(np.random.default_rng(9).standard_normal((2, 16, 4)),
                              jnp.float32) for _ in range(2))
  layer = dj.DistrMultiHeadDotProductAttention(
      num_heads=2, group_size=4, grouping="lowrank", block_q=8, implementation="xla",
      causal=True, lowrank_maps=(q_map, k_map))
  params = layer.init(jax.random.key(0), x)
  y = jax.jit(layer.apply)(params, x)
  p = params["params"]
  proj = lambda name: jnp.einsum("btc,chd->bthd", x, p[name]["kernel"]) + p[name]["bias"]  # noqa: E731
  attn = dj.distr_attention(proj("query"), proj("key"), proj("value"), group_size=4,
                            block_q=8, grouping="lowrank", is_causal=True,
                            lowrank_maps=(q_map, k_map), implementation="xla")
  np.testing.assert_allclose(y, jnp.einsum("bthd,hdc->btc", attn, p["out"]["kernel"])
                             + p["out"]["bias"], atol=2e-5)
