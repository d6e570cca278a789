"""Groupings by exact column similarity ("greedy") against LSH and random grouping."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distrattention_jax as dj
from distrattention_jax import grouping
from distrattention_jax import prep

from conftest import normal as _normal


def _copies(rng, batch, length, heads, d, group_size):
  """Q whose columns are d/G distinct columns, each copied G times (shuffled)."""
  owner = rng.permutation(np.repeat(np.arange(d // group_size), group_size))
  base = rng.standard_normal((batch, length, heads, d // group_size))
  return jnp.asarray(base[..., owner], jnp.float32), owner


def _prototypes(rng, batch, length, heads, d, prototypes=6, noise=0.15):
  """Columns are noisy copies of a few prototype columns (structure like real Q)."""
  protos = rng.standard_normal((batch, length, heads, prototypes))
  owner = rng.integers(0, prototypes, size=d)
  q = protos[..., owner] + noise * rng.standard_normal((batch, length, heads, d))
  return jnp.asarray(q, jnp.float32)


@pytest.mark.parametrize("group_size", [2, 4])
def test_greedy_is_exact_on_copied_columns(group_size):
  rng = np.random.default_rng(group_size)
  q, owner = _copies(rng, 2, 40, 2, 32, group_size)
  k, v = _normal(rng, (2, 30, 2, 32)), _normal(rng, (2, 30, 2, 32))
  perm = grouping.block_permutations(q, block_q=16, group_size=group_size, grouping="greedy")
  groups = owner[np.asarray(perm)].reshape(-1, 32 // group_size, group_size)
  assert np.all(groups == groups[..., :1])
  for rep in ("mean", "sample"):
    out = dj.distr_attention(q, k, v, group_size=group_size, block_q=16, grouping="greedy",
                             representative=rep, implementation="xla")
    np.testing.assert_allclose(out, dj.exact_attention(q, k, v), atol=2e-5, rtol=2e-5)


def test_error_greedy_below_lsh_below_random_on_structured_q():
  errors = {"greedy": [], "lsh": [], "random": []}
  for trial in range(3):
    rng = np.random.default_rng(10 + trial)
    q = _prototypes(rng, 2, 128, 2, 64)
    k, v = _normal(rng, (2, 128, 2, 64)), _normal(rng, (2, 128, 2, 64))
    exact = dj.exact_attention(q, k, v)
    for name in errors:
      out = dj.distr_attention(q, k, v, group_size=2, block_q=32, grouping=name,
                               seed=trial, implementation="xla")
      errors[name].append(float(jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact)))
  mean = {name: np.mean(e) for name, e in errors.items()}
  assert mean["greedy"] < 0.85 * mean["lsh"], mean
  assert mean["lsh"] < 0.75 * mean["random"], mean


def test_greedy_permutations_valid_deterministic_and_padding_free():
  rng = np.random.default_rng(3)
  q = _normal(rng, (2, 50, 3, 32))
  perm = grouping.block_permutations(q, block_q=16, group_size=4, grouping="greedy")
  assert perm.shape == (2, 3, 4, 32) and perm.dtype == jnp.int32
  assert np.all(np.sort(np.asarray(perm), -1) == np.arange(32))
  again = jax.jit(functools.partial(grouping.block_permutations, block_q=16, group_size=4,
                                    grouping="greedy"))(q)
  np.testing.assert_array_equal(perm, again)
  # Padding rows (past query_seq_lengths) do not change the grouping of the real rows.
  valid = jnp.arange(50)[None] < jnp.array([[50], [20]])
  padded = q.at[1, 20:].set(100.0)
  p1 = grouping.block_permutations(padded, block_q=16, group_size=4, grouping="greedy",
                                   query_valid=valid)
  p2 = grouping.block_permutations(q, block_q=16, group_size=4, grouping="greedy",
                                   query_valid=valid)
  np.testing.assert_array_equal(p1, p2)


def test_greedy_under_vmap_and_grad():
  rng = np.random.default_rng(4)
  q, k, v = (_normal(rng, (2, 24, 2, 16)) for _ in range(3))
  fn = functools.partial(dj.distr_attention, group_size=2, block_q=16, grouping="greedy",
                         implementation="xla")
  stacked = [jnp.stack([x, x[::-1]]) for x in (q, k, v)]
  out = jax.vmap(fn)(*stacked)
  np.testing.assert_allclose(out[0], fn(q, k, v), atol=1e-6)
  perm = grouping.block_permutations(q, block_q=16, group_size=2, grouping="greedy")
  ours = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v))), argnums=(0, 1, 2))(q, k, v)
  ref = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(dj.distr_attention_reference(
      q, k, v, group_size=2, block_q=16, grouping="greedy", perm=perm))),
      argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.parametrize("d,group_size,block_q,dtype", [
    (32, 2, 16, jnp.float32), (64, 4, 64, jnp.bfloat16), (96, 4, 32, jnp.float32),
    (128, 8, 128, jnp.float16), (64, 2, 1024, jnp.bfloat16)])
def test_greedy_kernel_equals_xla_loop(d, group_size, block_q, dtype):
  # The Pallas kernel (interpret mode here; tests/test_pallas_gpu.py runs it on a GPU)
  # runs the XLA loop's algorithm with the same tie-break. Its Gram matrix sums rows in
  # another order, so a near-tie may rarely go the other way: nearly every block must
  # agree exactly, ragged last block and padding rows included.
  rng = np.random.default_rng(d + group_size)
  q = (_prototypes(rng, 2, 200, 3, d) if d % 32 == 0 else _normal(rng, (2, 200, 3, d)))
  q = q.astype(dtype)
  valid = jnp.arange(200)[None] < jnp.array([[200], [150]])
  kw = dict(block_q=block_q, group_size=group_size, query_valid=valid)
  xla = np.asarray(grouping.greedy_permutations(q, use_kernel=False, **kw))
  kernel = np.asarray(grouping.greedy_permutations(q, use_kernel=True, **kw))
  assert kernel.shape == xla.shape
  assert np.all(np.sort(kernel, -1) == np.arange(d))
  assert np.mean(np.all(kernel == xla, axis=-1)) >= 0.9



@pytest.mark.parametrize("batch", [3, prep.MAX_UNROLLED_BATCH + 1])
def test_einsum_per_batch_row_equals_one_einsum(batch):
  """The projections and Grams split into one einsum per batch row (one batch dimension
  each, which XLA's GPU GEMM fusion takes without transposing Q and K first): same values
  and gradients as the single einsum, a map shared by every row (batch 1) broadcast, and
  above MAX_UNROLLED_BATCH the single einsum (so compile time stays bounded)."""
  rng = np.random.default_rng(batch)
  x = jnp.asarray(rng.standard_normal((batch, 48, 3, 16)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((batch, 3, 16, 4)), jnp.float32)
  spec = "bthd,bhdr->bthr"
  ct = jnp.asarray(rng.standard_normal((batch, 48, 3, 4)), jnp.float32)
  for w_used in (w, w[:1]):
    split = lambda x, w_used=w_used: prep.einsum_per_batch_row(  # noqa: E731
        spec, x, w_used, einsum=grouping.exact_einsum, per_batch_row=True)
    whole = lambda x, w_used=w_used: grouping.exact_einsum(  # noqa: E731
        spec, x, jnp.broadcast_to(w_used, w.shape))
    both = jax.jit(lambda x, ct, f: (f(x), jax.vjp(f, x)[1](ct)[0]), static_argnums=2)
    out, dx = both(x, ct, split)
    want, want_dx = both(x, ct, whole)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-6, atol=1e-5)
  def products(per_batch_row):
    jaxpr = jax.make_jaxpr(lambda x: prep.einsum_per_batch_row(
        spec, x, w, einsum=grouping.exact_einsum, per_batch_row=per_batch_row))(x)
    return sum(e.primitive.name in ("dot_general", "custom_jvp_call") for e in jaxpr.eqns)
  assert products(True) == (batch if batch <= prep.MAX_UNROLLED_BATCH else 1)
  assert products(False) == 1  # off the GPU kernel path: one einsum (GSPMD-friendly)
  grams = prep.head_grams(x, 48, per_batch_row=True)
  np.testing.assert_allclose(grams, jnp.einsum("bthc,bthe->bhce", x.astype(jnp.float32),
                                               x.astype(jnp.float32))[:, :, None],
                             rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match="batch label"):
    prep.einsum_per_batch_row("thd,bhdr->bthr", x[0], w)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_exact_einsum_derivatives(dtype):
  """The projections' custom JVP: forward and reverse derivatives equal those of the
  float32 product (to the input dtype's rounding), and for bf16 the backward's product
  runs at the default precision (TF32 tensor cores on a GPU, exact for bf16 values), not
  as an emulated float32 GEMM at HIGHEST precision."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 40, 3, 16)), dtype)
  w = jnp.asarray(rng.standard_normal((2, 3, 16, 4)), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((2, 40, 3, 4)), dtype)
  spec = "bthd,bhdr->bthr"

  def plain(x, w):  # float32 maths, no custom rule
    return jnp.einsum(spec, x.astype(jnp.float32), w.astype(x.dtype).astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)

  out, pullback = jax.vjp(lambda x, w: grouping.exact_einsum(spec, x, w), x, w)
  assert out.dtype == dtype
  dx, dw = pullback(ct)
  _, ref_pullback = jax.vjp(plain, x, w)
  ref_dx, ref_dw = ref_pullback(ct.astype(jnp.float32))
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
  np.testing.assert_allclose(np.asarray(dx, np.float32), ref_dx, rtol=tol, atol=tol)
  np.testing.assert_allclose(dw, ref_dw, rtol=tol, atol=tol * 10)
  # Forward mode too (a custom_vjp would refuse it).
  _, tangent = jax.jvp(lambda x: grouping.exact_einsum(spec, x, w), (x,), (x,))
  np.testing.assert_allclose(np.asarray(tangent, np.float32), plain(x, w), rtol=tol, atol=tol)
  if dtype == jnp.bfloat16:
    jaxpr = jax.make_jaxpr(jax.grad(
        lambda x: grouping.exact_einsum(spec, x, w).astype(jnp.float32).sum()))(x)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 2, dots  # the forward's product and dx's (no dw: w is constant)
    assert dots[0].params["precision"] == (jax.lax.Precision.HIGHEST,) * 2
    assert dots[1].params["precision"] is None, dots[1].params
