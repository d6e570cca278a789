"""The public function `distr_attention` (implementation="xla") against the reference.

* Forward equals `distr_attention_reference` for group sizes 1..8, both representatives,
  grouping blocks shorter and longer than the sequence (masks, dtypes, GQA and the rest
  of the backend cases: tests/test_backend_xla.py).
* Gradients equal `jax.grad` of the reference with the same permutation, follow the
  representative rule, and pass `jax.test_util.check_grads` in float64.
* It works under `jax.vmap` with masks (jit, vmap and remat of every backend:
  backend_cases.py).
* Every invalid argument raises an error that names it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu

from distrattention_jax import attention
from distrattention_jax import config
from distrattention_jax import grouping
from distrattention_jax import reference

from conftest import TOLS
from conftest import bernoulli as _bernoulli
from conftest import normal as _normal
from conftest import qkv as _qkv



_STATIC = ("group_size", "block_q", "representative", "is_causal", "grouping", "num_projs",
           "seed")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _xla_and_reference(q, k, v, grouping="greedy", **kwargs):
  kwargs["grouping"] = grouping   # these cases are about the permutation groupings
  out = attention.distr_attention(q, k, v, implementation="xla", **kwargs)
  return out, reference.distr_attention_reference(q, k, v, **kwargs)


def _assert_close(x, y, dtype):
  x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
  assert np.all(np.isfinite(x))
  np.testing.assert_allclose(x, y, **TOLS[dtype])


# ----------------------------------------------------------------------------------------
# 3b. Forward: the XLA path equals the reference
# ----------------------------------------------------------------------------------------


# Blocks of 8 rows (a short last block of 5), below what the kernels take; the other
# (G, representative, block_q) settings are the shared backend cases (TestXla).
@pytest.mark.parametrize("group_size,representative,block_q", [
    (2, "sample", 8), (8, "sample", 8), (4, "mean", 8)])
def test_xla_matches_reference(group_size, representative, block_q):
  q, k, v = _qkv(group_size * 100 + block_q, 2, 37, 29, 4, 2, 32, dv=24)
  out, ref = _xla_and_reference(q, k, v, group_size=group_size, block_q=block_q,
                                representative=representative, is_causal=True)
  assert out.shape == (2, 37, 4, 24) and out.dtype == jnp.float32
  _assert_close(out, ref, jnp.float32)


def test_random_grouping_matches_reference():
  q, k, v = _qkv(3, 1, 20, 20, 2, 2, 16)
  out, ref = _xla_and_reference(q, k, v, group_size=2, block_q=8, representative="mean",
                                grouping="random", seed=3)
  _assert_close(out, ref, jnp.float32)


# ----------------------------------------------------------------------------------------
# 6. Gradients
# ----------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("group_size", "block_q", "representative"))
def _grads(q, k, v, ct, mask, *, group_size, block_q, representative):
  """(dq, dk, dv) of <out, ct> for the XLA path and for the reference, same `perm`."""
  kwargs = dict(group_size=group_size, block_q=block_q, representative=representative,
                is_causal=True, mask=mask, grouping="greedy")
  perm = grouping.block_permutations(q, block_q=block_q, group_size=group_size)

  def loss_xla(q, k, v):
    return jnp.sum(attention.distr_attention(q, k, v, implementation="xla", **kwargs) * ct)

  def loss_ref(q, k, v):
    return jnp.sum(reference.distr_attention_reference(q, k, v, perm=perm, **kwargs) * ct)

  return (jax.grad(loss_xla, argnums=(0, 1, 2))(q, k, v),
          jax.grad(loss_ref, argnums=(0, 1, 2))(q, k, v), perm)


# The gradient cases of every backend are in backend_cases.py; here the representative
# rule on the dQ of the XLA path.
@pytest.mark.parametrize("group_size,representative", [(2, "sample"), (4, "mean")])
def test_grad_matches_reference(group_size, representative):
  batch, q_len, kv_len, heads, kv_heads, d, block_q = 2, 21, 17, 4, 2, 16, 8
  q, k, v = _qkv(group_size, batch, q_len, kv_len, heads, kv_heads, d, dv=8)
  ct = _normal(np.random.default_rng(9), (batch, q_len, heads, 8))
  mask = _bernoulli(4, 0.8, (batch, 1, q_len, kv_len))
  got, want, perm = _grads(q, k, v, ct, mask, group_size=group_size, block_q=block_q,
                           representative=representative)
  for name, g, w in zip("qkv", got, want):
    assert np.all(np.isfinite(g)), name
    assert np.abs(np.asarray(g)).max() > 1e-3, name  # not trivially zero
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5, err_msg=f"d{name}")

  # The representative rule of docs/DESIGN.md section 1: with "sample", only the first column of each
  # group gets a gradient in its block; with "mean", every member gets the same 1/G share.
  if group_size == 1:
    return
  dq = np.asarray(got[0])
  perm = np.asarray(perm)
  for b in range(batch):
    for h in range(heads):
      for n in range(perm.shape[2]):
        rows = dq[b, n * block_q:(n + 1) * block_q, h]  # [rows, d]
        groups = perm[b, h, n].reshape(-1, group_size)
        if representative == "sample":
          assert np.all(rows[:, groups[:, 1:]] == 0)
          assert np.all(np.abs(rows[:, groups[:, 0]]).max(axis=0) > 0)
        else:
          np.testing.assert_allclose(rows[:, groups],
                                     np.repeat(rows[:, groups[:, :1]], group_size, axis=-1),
                                     atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("representative", ["sample", "mean"])
def test_check_grads_float64(representative):
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((1, 10, 2, 8)), jnp.float64)
    k = jnp.asarray(rng.standard_normal((1, 9, 1, 8)), jnp.float64)
    v = jnp.asarray(rng.standard_normal((1, 9, 1, 4)), jnp.float64)
    mask = jnp.asarray(rng.random((1, 1, 10, 9)) < 0.8)

    @jax.jit
    def f(q, k, v):
      return attention.distr_attention(
          q, k, v, group_size=2, block_q=4, representative=representative, is_causal=True,
          mask=mask, implementation="xla", grouping="greedy")

    out = f(q, k, v)
    assert out.dtype == jnp.float64
    # The float64 path must compute in float64, not round through float32.
    np.testing.assert_allclose(
        out, reference.distr_attention_reference(
            q, k, v, group_size=2, block_q=4, representative=representative,
            is_causal=True, mask=mask, grouping="greedy"), atol=1e-12, rtol=1e-12)
    jtu.check_grads(f, (q, k, v), order=1, modes=("fwd", "rev"))


# ----------------------------------------------------------------------------------------
# 7. jit and vmap
# ----------------------------------------------------------------------------------------


def test_vmap_over_extra_batch_axis():
  extra, batch, q_len, kv_len, heads, kv_heads, d = 3, 2, 21, 17, 4, 2, 16
  rng = np.random.default_rng(13)
  q = _normal(rng, (extra, batch, q_len, heads, d))
  k = _normal(rng, (extra, batch, kv_len, kv_heads, d))
  v = _normal(rng, (extra, batch, kv_len, kv_heads, d))
  mask = _bernoulli(6, 0.7, (extra, batch, 1, q_len, kv_len))
  kv_lengths = jnp.array([[17, 9], [4, 17], [1, 2]])

  def f(q, k, v, m, kl):
    return attention.distr_attention(q, k, v, group_size=4, block_q=8, mask=m,
                                     key_value_seq_lengths=kl, implementation="xla")

  def f_and_ref(q, k, v, m, kl):
    return f(q, k, v, m, kl), reference.distr_attention_reference(
        q, k, v, group_size=4, block_q=8, mask=m, key_value_seq_lengths=kl)

  batched, batched_ref = jax.jit(jax.vmap(f_and_ref))(q, k, v, mask, kv_lengths)
  assert batched.shape == (extra, batch, q_len, heads, d)
  one = jax.jit(f)
  for e in range(extra):
    np.testing.assert_allclose(batched[e], one(q[e], k[e], v[e], mask[e], kv_lengths[e]),
                               atol=2e-6, rtol=2e-6)
  # The oracle batches too, and agrees.
  np.testing.assert_allclose(batched, batched_ref, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------------------
# 8. Validation: every bad argument raises an error that names it
# ----------------------------------------------------------------------------------------

_Q, _K, _V = _qkv(0, 2, 8, 6, 4, 2, 16)


@pytest.mark.parametrize("kwargs,match", [
    (dict(group_size=3), r"group_size must be a power of two"),
    (dict(group_size=0), r"group_size must be a power of two"),
    (dict(group_size=-2), r"group_size must be a power of two"),
    (dict(group_size=2.0), r"group_size must be a power of two"),
    (dict(group_size=True), r"group_size must be a power of two"),
    (dict(group_size=32), r"group_size=32 must divide the head dimension d=16"),
    (dict(block_q=48), r"block_q must be a power of two"),
    (dict(block_q=0), r"block_q must be a power of two"),
    (dict(num_projs=0), r"num_projs must be an int in \[1, 30\]"),
    (dict(num_projs=31), r"num_projs must be an int in \[1, 30\]"),
    (dict(num_projs=8.0), r"num_projs must be an int in \[1, 30\]"),
    (dict(representative="median"), r"representative must be one of \('mean', 'sample'\)"),
    (dict(grouping="kmeans"), r"grouping must be one of \('lsh', 'greedy', 'random', 'lowrank'\)"),
    (dict(seed=1.5), r"seed must be a Python int"),
    (dict(implementation="cuda"), r"implementation must be None or one of"),
    (dict(scale=jnp.ones(())), r"scale must be a Python number or None"),
    (dict(is_causal=1), r"is_causal must be a bool"),
    (dict(mask=jnp.ones((8, 6), jnp.float32)), r"mask must be boolean"),
    (dict(mask=jnp.ones((1, 2, 4, 8, 6), bool)), r"mask must have rank <= 4"),
    (dict(mask=jnp.ones((2, 3, 8, 6), bool)), r"mask shape .* is not broadcastable"),
    (dict(mask=jnp.ones((8, 5), bool)), r"mask shape .* is not broadcastable"),
    (dict(segment_ids=(jnp.zeros((2, 8), int),) * 3), r"segment_ids must be an array"),
    (dict(segment_ids=jnp.zeros((2, 8), int)),
     r"a single segment_ids array needs q_len == kv_len"),
    (dict(segment_ids=(jnp.zeros((2, 7), int), jnp.zeros((2, 6), int))),
     r"segment_ids: q_segment_ids must have shape \(2, 8\)"),
    (dict(segment_ids=(jnp.zeros((2, 8), int), jnp.zeros((1, 6), int))),
     r"segment_ids: kv_segment_ids must have shape \(2, 6\)"),
    (dict(segment_ids=(jnp.zeros((2, 8)), jnp.zeros((2, 6), int))),
     r"segment_ids: q_segment_ids must be integer"),
    (dict(query_seq_lengths=jnp.array([8, 8, 8])),
     r"query_seq_lengths must be an integer array of shape \(2,\)"),
    (dict(query_seq_lengths=jnp.array([8.0, 8.0])),
     r"query_seq_lengths must be an integer array of shape \(2,\)"),
    (dict(key_value_seq_lengths=jnp.array([[6, 6]])),
     r"key_value_seq_lengths must be an integer array of shape \(2,\)"),
])
def test_invalid_options_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    attention.distr_attention(_Q, _K, _V, **{"implementation": "xla", **kwargs})
  if "implementation" not in kwargs:  # the reference validates the same way
    with pytest.raises(ValueError, match=match):
      reference.distr_attention_reference(_Q, _K, _V, **kwargs)


@pytest.mark.parametrize("qkv,match", [
    (dict(query=np.zeros((8, 4, 16)).tolist()), r"query must be an array"),
    (dict(query=_Q[0]), r"query must have rank 4"),
    (dict(key=_K[None]), r"key must have rank 4"),
    (dict(value=_V[..., 0]), r"value must have rank 4"),
    (dict(query=_Q.astype(jnp.int32)), r"query must have a floating dtype"),
    (dict(value=_V.astype(jnp.bool_)), r"value must have a floating dtype"),
    (dict(key=_K.astype(jnp.bfloat16)), r"query, key and value must share one dtype"),
    (dict(key=_K[:1], value=_V[:1]), r"must share the batch size"),
    (dict(key=_K[..., :8]), r"key's head_dim must equal query's"),
    (dict(value=_V[:, :5]), r"value must have key's \[batch, kv_len, kv_heads\]"),
    (dict(key=_K[:, :0], value=_V[:, :0]), r"sequence lengths and head dims must be >= 1"),
    (dict(query=_Q[:, :, :3]), r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
])
def test_invalid_arrays_raise(qkv, match):
  args = {"query": _Q, "key": _K, "value": _V, **qkv}
  for fn in (functools.partial(attention.distr_attention, implementation="xla"),
             reference.distr_attention_reference, reference.exact_attention):
    with pytest.raises(ValueError, match=match):
      fn(args["query"], args["key"], args["value"])


@pytest.mark.parametrize("field,value,match", [
    ("group_size", 6, r"group_size must be a power of two"),
    ("block_q", 3, r"block_q must be a power of two"),
    ("num_projs", 0, r"num_projs must be an int in \[1, 30\]"),
    ("representative", "first", r"representative must be one of"),
    ("grouping", "kmeans", r"grouping must be one of"),
    ("seed", "0", r"seed must be a Python int"),
])
def test_config_validate_raises(field, value, match):
  with pytest.raises(ValueError, match=match):
    config.DistrConfig(**{field: value}).validate()


def test_config_validate_accepts_defaults_and_checks_head_dim():
  cfg = config.DistrConfig()
  assert cfg.validate(64) is cfg
  assert config.DistrConfig(group_size=8).validate(8).group_size == 8
  with pytest.raises(ValueError, match=r"group_size=4 must divide .* d=6"):
    config.DistrConfig(group_size=4).validate(6)
  with pytest.raises(ValueError, match=r"grouping must be one of"):
    grouping.block_permutations(_Q, block_q=8, group_size=2, grouping="kmeans")
  with pytest.raises(ValueError, match=r"representative must be"):
    grouping.rep_weights(jnp.arange(4)[None], 2, "first")


def test_default_is_lowrank_one_factorisation_per_sequence():
  """The defaults (grouping "lowrank", block_q None = one block per sequence) equal the
  explicit call, in distr_attention, the reference and the config; block_q=None resolves
  to a power of two >= q_len (and >= 256, so every backend takes its one-block layout)."""
  cfg = config.DistrConfig()
  assert (cfg.grouping, cfg.block_q) == ("lowrank", None)
  assert [config.sequence_block(n) for n in (1, 256, 257, 1000, 5000)] == [
      256, 256, 512, 1024, 8192]
  assert cfg.for_length(300).block_q == 512 and config.DistrConfig(block_q=64).for_length(
      300).block_q == 64
  q, k, v = _qkv(41, 2, 300, 280, 4, 2, 32)
  kw = dict(group_size=4, is_causal=True, implementation="xla")
  default = attention.distr_attention(q, k, v, **kw)
  explicit = attention.distr_attention(q, k, v, grouping="lowrank", block_q=4096, **kw)
  np.testing.assert_allclose(default, explicit, atol=1e-6)
  del kw["implementation"]
  np.testing.assert_allclose(default, reference.distr_attention_reference(q, k, v, **kw),
                             atol=2e-5)
  # A permutation passed with the (default) lowrank grouping is an error, not ignored.
  perm = grouping.block_permutations(q, block_q=512, group_size=4)
  with pytest.raises(ValueError, match="perm .* permutation groupings"):
    reference.distr_attention_reference(q, k, v, perm=perm, **kw)
  with pytest.raises(ValueError, match="block_q must be a power of two"):
    config.DistrConfig(block_q=0).validate()


def test_config_is_keyword_only_and_names_backends():
  with pytest.raises(TypeError):
    config.DistrConfig(2, 64)  # pylint: disable=too-many-function-args
  assert config.DistrConfig(implementation="pallas").validate().implementation == "pallas"
  with pytest.raises(ValueError, match=r"implementation must be None or one of .*'triton'"):
    config.DistrConfig(implementation="cuda").validate()


def test_masks_is_a_pytree():
  masks = config.Masks(is_causal=True, q_lengths=jnp.array([3]), kv_lengths=jnp.array([2]))
  leaves, tree = jax.tree.flatten(masks)
  assert len(leaves) == 2
  again = jax.tree.unflatten(tree, leaves)
  assert again.is_causal and again.mask is None
  out = jax.jit(lambda m: m.dense(4, 3))(masks)
  assert out.shape == (1, 1, 4, 3)


def test_greedy_kernel_only_for_gpu_kernel_backends(monkeypatch):
  """implementation="xla" (and the interpreter) never ask for the Pallas grouping kernel;
  the GPU kernel backends do."""
  from distrattention_jax import backends  # pylint: disable=import-outside-toplevel
  seen = []
  original = grouping.block_permutations

  def recording(*args, **kwargs):
    seen.append(kwargs.get("use_kernel"))
    return original(*args, **kwargs)

  monkeypatch.setattr(grouping, "block_permutations", recording)
  q, k, v = _qkv(0, 1, 32, 32, 2, 2, 16)
  attention.distr_attention(q, k, v, group_size=2, block_q=16, implementation="xla",
                            grouping="greedy")
  assert seen == [False]
  assert not backends.get("triton_interpret").uses_grouping_kernel
  assert backends.get("cudnn").uses_grouping_kernel
  assert backends.get("triton").uses_grouping_kernel
  assert not backends.get("xla").uses_grouping_kernel
