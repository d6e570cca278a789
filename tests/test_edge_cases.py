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
