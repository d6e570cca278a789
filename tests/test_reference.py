"""The oracles: `exact_attention` and `distr_attention_reference`.

* `exact_attention` and `distr_attention(group_size=1, implementation="xla")` equal
  `jax.nn.dot_product_attention(implementation="xla")` over ragged lengths, causal,
  boolean masks, segment ids, sequence lengths, GQA and head dims 32..256.
* `distr_attention_reference` equals an independent NumPy transcription of docs/DESIGN.md
  section 1 with explicit loops over batch, head, block and group.
* The identity `Q_rep K_fused^T == Q_exp K^T` that the XLA path and the backward rely on.

Inputs are fresh Gaussian arrays (never zeros) from fixed keys, so every run is the same.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distrattention_jax import attention
from distrattention_jax import grouping
from distrattention_jax import reference

from conftest import bernoulli as _bernoulli
from conftest import normal as _normal
from conftest import qkv as _qkv

F32_TOL = dict(atol=2e-5, rtol=2e-5)


def _allowed_np(batch, heads, q_len, kv_len, *, is_causal=False, mask=None, q_seg=None,
                kv_seg=None, q_lengths=None, kv_lengths=None):
  """bool [B, H, Tq, Tk] from the raw arguments, in NumPy (independent of config.Masks)."""
  allowed = np.ones((batch, heads, q_len, kv_len), bool)
  if is_causal:
    allowed &= np.arange(kv_len)[None, :] <= np.arange(q_len)[:, None]
  if mask is not None:
    mask = np.asarray(mask)
    allowed &= mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  if q_seg is not None:
    allowed &= np.asarray(q_seg)[:, None, :, None] == np.asarray(kv_seg)[:, None, None, :]
  if q_lengths is not None:
    allowed &= (np.arange(q_len)[None, :] < np.asarray(q_lengths)[:, None])[:, None, :, None]
  if kv_lengths is not None:
    allowed &= (np.arange(kv_len)[None, :] < np.asarray(kv_lengths)[:, None])[:, None, None, :]
  return allowed


def _rows_with_keys(allowed):
  """bool [B, Tq, H, 1]: rows that attend at least one key (output layout)."""
  return np.transpose(allowed.any(-1), (0, 2, 1))[..., None]


@functools.partial(jax.jit, static_argnames=("is_causal",))
def _ours(q, k, v, mask=None, segment_ids=None, is_causal=False, q_lengths=None,
          kv_lengths=None):
  """(exact_attention, distr_attention(group_size=1, "xla")), one compilation."""
  kwargs = dict(is_causal=is_causal, mask=mask, segment_ids=segment_ids,
                query_seq_lengths=q_lengths, key_value_seq_lengths=kv_lengths)
  exact = reference.exact_attention(q, k, v, **kwargs)
  g1 = attention.distr_attention(q, k, v, group_size=1, implementation="xla", **kwargs)
  return exact, g1


@functools.partial(jax.jit, static_argnames=("is_causal",))
def _ours_and_jax_nn(q, k, v, mask=None, segment_ids=None, is_causal=False,
                     q_lengths=None, kv_lengths=None, nn_mask=None):
  """`_ours` and jax.nn.dot_product_attention(implementation="xla"), one compilation."""
  ours = _ours(q, k, v, mask, segment_ids, is_causal, q_lengths, kv_lengths)
  nn = jax.nn.dot_product_attention(
      q, k, v, mask=nn_mask, is_causal=is_causal, query_seq_lengths=q_lengths,
      key_value_seq_lengths=kv_lengths, implementation="xla")
  return ours, nn


def _check_against_jax_nn(allowed, q, k, v, **kwargs):
  """Rows with a key equal jax.nn; rows without any key are exactly 0 (not NaN)."""
  ours, expected = _ours_and_jax_nn(q, k, v, **kwargs)
  rows = _rows_with_keys(allowed)
  for out in ours:
    out = np.asarray(out)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(np.where(rows, out, 0), np.where(rows, expected, 0),
                               **F32_TOL)
    assert np.all(np.where(rows, 0, out) == 0)


# ----------------------------------------------------------------------------------------
# 1. group_size=1 and exact_attention vs jax.nn.dot_product_attention
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (1, 37), (37, 200), (200, 37), (513, 200)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_exact_matches_jax_nn_ragged(q_len, kv_len, is_causal):
  q, k, v = _qkv(q_len * 1000 + kv_len, 2, q_len, kv_len, 2, 2, 32)
  allowed = _allowed_np(2, 2, q_len, kv_len, is_causal=is_causal)
  _check_against_jax_nn(allowed, q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("d", [32, 64, 128, 256])
def test_exact_matches_jax_nn_head_dims(d):
  q, k, v = _qkv(d, 1, 37, 45, 2, 2, d)
  allowed = _allowed_np(1, 2, 37, 45)
  _check_against_jax_nn(allowed, q, k, v)


@pytest.mark.parametrize("mask_shape,is_causal", [
    ((37, 45), False),          # rank 2: [q_len, kv_len]
    ((2, 37, 45), True),        # rank 3: [heads, q_len, kv_len]
    ((2, 1, 37, 45), False),    # per batch, shared by heads
    ((1, 2, 1, 45), True),      # per head, shared by rows
    ((2, 2, 37, 45), True),     # full
])
def test_exact_matches_jax_nn_masks(mask_shape, is_causal):
  batch, heads, q_len, kv_len = 2, 2, 37, 45
  q, k, v = _qkv(len(mask_shape), batch, q_len, kv_len, heads, heads, 32)
  mask = _bernoulli(7, 0.5, mask_shape)
  mask = mask.at[(0,) * (len(mask_shape) - 1)].set(False)  # some rows attend no key
  allowed = _allowed_np(batch, heads, q_len, kv_len, is_causal=is_causal, mask=mask)
  assert not allowed.any(-1).all(), "the test should include rows with no key"
  nn_mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  _check_against_jax_nn(allowed, q, k, v, mask=mask, nn_mask=nn_mask, is_causal=is_causal)


@pytest.mark.parametrize("pair", [False, True])
def test_exact_matches_jax_nn_segment_ids(pair):
  batch, heads, q_len = 2, 2, 37
  kv_len = 45 if pair else q_len
  q, k, v = _qkv(11 + pair, batch, q_len, kv_len, heads, heads, 32)
  q_seg = np.sort(np.random.default_rng(0).integers(0, 4, (batch, q_len)), axis=1)
  kv_seg = (np.sort(np.random.default_rng(1).integers(1, 5, (batch, kv_len)), axis=1)
            if pair else q_seg)
  segment_ids = (jnp.asarray(q_seg), jnp.asarray(kv_seg)) if pair else jnp.asarray(q_seg)
  allowed = _allowed_np(batch, heads, q_len, kv_len, q_seg=q_seg, kv_seg=kv_seg)
  if pair:
    assert not allowed.any(-1).all(), "segment 0 of the queries has no keys"
  nn_mask = jnp.asarray(q_seg[:, None, :, None] == kv_seg[:, None, None, :])
  _check_against_jax_nn(allowed, q, k, v, segment_ids=segment_ids, nn_mask=nn_mask)


@pytest.mark.parametrize("q_lengths,kv_lengths,is_causal", [
    ([37, 20], None, False),
    (None, [45, 3], True),
    ([30, 1], [0, 45], False),   # batch 0 attends no key at all: output exactly 0
])
def test_exact_matches_jax_nn_seq_lengths(q_lengths, kv_lengths, is_causal):
  batch, heads, q_len, kv_len = 2, 2, 37, 45
  q, k, v = _qkv(23, batch, q_len, kv_len, heads, heads, 32)
  ql = None if q_lengths is None else jnp.asarray(q_lengths, jnp.int32)
  kl = None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
  allowed = _allowed_np(batch, heads, q_len, kv_len, is_causal=is_causal,
                        q_lengths=q_lengths, kv_lengths=kv_lengths)
  _check_against_jax_nn(allowed, q, k, v, is_causal=is_causal, q_lengths=ql, kv_lengths=kl)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (6, 3)])
def test_exact_matches_jax_nn_gqa(heads, kv_heads):
  q, k, v = _qkv(heads * 10 + kv_heads, 2, 37, 45, heads, kv_heads, 32)
  allowed = _allowed_np(2, heads, 37, 45, is_causal=True)
  _check_against_jax_nn(allowed, q, k, v, is_causal=True)


def _exact_np(q, k, v, allowed, scale):
  """Exact attention with explicit loops over batch and head, float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, q_len, heads, _ = q.shape
  rep = heads // k.shape[2]
  out = np.zeros((batch, q_len, heads, v.shape[-1]))
  for b in range(batch):
    for h in range(heads):
      s = scale * q[b, :, h] @ k[b, :, h // rep].T
      s = np.where(allowed[b, h], s, -np.inf)
      for i in range(q_len):
        if allowed[b, h, i].any():
          w = np.exp(s[i] - s[i].max())
          out[b, i, h] = (w / w.sum()) @ v[b, :, h // rep]
  return out


@pytest.mark.parametrize("dv", [16, 48])
def test_exact_value_dim_differs(dv):
  """dv != d (jax.nn cannot): exact_attention vs NumPy loops, G=1 vs exact_attention."""
  q, k, v = _qkv(dv, 2, 19, 23, 4, 2, 32, dv=dv)
  mask = _bernoulli(3, 0.7, (2, 1, 19, 23))
  allowed = _allowed_np(2, 4, 19, 23, is_causal=True, mask=mask)
  exact, g1 = _ours(q, k, v, mask=mask, is_causal=True)
  assert exact.shape == (2, 19, 4, dv)
  np.testing.assert_allclose(exact, _exact_np(q, k, v, allowed, 1 / math.sqrt(32)),
                             **F32_TOL)
  np.testing.assert_allclose(g1, exact, **F32_TOL)


# ----------------------------------------------------------------------------------------
# 2. distr_attention_reference vs an independent NumPy loop implementation
# ----------------------------------------------------------------------------------------


def _distr_np(q, k, v, perm, *, group_size, block_q, representative, allowed, scale=None):
  """docs/DESIGN.md section 1, steps 1-5, with explicit loops (float64)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  perm = np.asarray(perm)
  batch, q_len, heads, d = q.shape
  kv_len = k.shape[1]
  rep = heads // k.shape[2]
  scale = 1 / math.sqrt(d) if scale is None else scale
  out = np.zeros((batch, q_len, heads, v.shape[-1]))
  num_blocks = -(-q_len // block_q)
  for b in range(batch):
    for h in range(heads):
      kh = h // rep
      for n in range(num_blocks):
        rows = np.arange(n * block_q, min((n + 1) * block_q, q_len))
        scores = np.zeros((len(rows), kv_len))
        for g in range(d // group_size):
          cols = perm[b, h, n, g * group_size:(g + 1) * group_size]
          if representative == "sample":
            q_rep = q[b, rows, h, cols[0]]
          else:
            q_rep = sum(q[b, rows, h, c] for c in cols) / group_size
          k_fused = sum(k[b, :, kh, c] for c in cols)
          scores += np.outer(q_rep, k_fused)
        scores *= scale
        for i, row in enumerate(rows):
          ok = allowed[b, h, row]
          if not ok.any():
            continue
          s = np.where(ok, scores[i], -np.inf)
          w = np.exp(s - s.max())
          out[b, row, h] = (w / w.sum()) @ v[b, :, kh]
  return out


def _random_perms(seed, batch, heads, num_blocks, d):
  rng = np.random.default_rng(seed)
  return np.stack([rng.permutation(d) for _ in range(batch * heads * num_blocks)]).reshape(
      batch, heads, num_blocks, d).astype(np.int32)


@pytest.mark.parametrize("representative", ["sample", "mean"])
@pytest.mark.parametrize("group_size", [2, 4])
@pytest.mark.parametrize("is_causal", [False, True])
def test_reference_matches_numpy_loops(representative, group_size, is_causal):
  # q_len 21 with block_q 8: blocks of 8, 8 and a short 5; GQA 4 heads on 2 kv heads.
  batch, q_len, kv_len, heads, kv_heads, d, dv, block_q = 2, 21, 13, 4, 2, 16, 8, 8
  q, k, v = _qkv(group_size + 10 * is_causal, batch, q_len, kv_len, heads, kv_heads, d,
                 dv=dv)
  perm = _random_perms(group_size, batch, heads, 3, d)
  allowed = _allowed_np(batch, heads, q_len, kv_len, is_causal=is_causal)
  got = reference.distr_attention_reference(
      q, k, v, group_size=group_size, block_q=block_q, representative=representative,
      is_causal=is_causal, perm=perm, grouping="greedy")
  want = _distr_np(q, k, v, perm, group_size=group_size, block_q=block_q,
                   representative=representative, allowed=allowed)
  np.testing.assert_allclose(got, want, **F32_TOL)


@pytest.mark.parametrize("representative", ["sample", "mean"])
def test_reference_lsh_perm_masks_matches_numpy_loops(representative):
  """The reference's own (greedy) grouping, one block longer than q_len, masks, lengths."""
  batch, q_len, kv_len, heads, kv_heads, d, block_q, group_size = 2, 11, 9, 2, 1, 16, 16, 4
  q, k, v = _qkv(5, batch, q_len, kv_len, heads, kv_heads, d)
  mask = _bernoulli(8, 0.8, (batch, 1, q_len, kv_len))
  q_lengths, kv_lengths = np.array([11, 6], np.int32), np.array([9, 7], np.int32)
  kwargs = dict(mask=mask, query_seq_lengths=q_lengths, key_value_seq_lengths=kv_lengths,
                scale=0.3)
  got = reference.distr_attention_reference(
      q, k, v, group_size=group_size, block_q=block_q, representative=representative,
      grouping="greedy", **kwargs)
  query_valid = np.arange(q_len)[None, :] < q_lengths[:, None]
  perm = grouping.block_permutations(q, block_q=block_q, group_size=group_size,
                                     query_valid=jnp.asarray(query_valid))
  allowed = _allowed_np(batch, heads, q_len, kv_len, mask=mask, q_lengths=q_lengths,
                        kv_lengths=kv_lengths)
  want = _distr_np(q, k, v, perm, group_size=group_size, block_q=block_q,
                   representative=representative, allowed=allowed, scale=0.3)
  np.testing.assert_allclose(got, want, **F32_TOL)
  assert np.all(np.asarray(got)[1, 6:] == 0)  # padding query rows


def test_reference_group_size_one_is_exact():
  q, k, v = _qkv(31, 2, 21, 13, 4, 2, 16)
  perm = _random_perms(0, 2, 4, 3, 16)
  got = reference.distr_attention_reference(q, k, v, group_size=1, block_q=8, perm=perm,
                                            is_causal=True, grouping="greedy")
  np.testing.assert_allclose(got, reference.exact_attention(q, k, v, is_causal=True),
                             **F32_TOL)


# ----------------------------------------------------------------------------------------
# 3a. The identity Q_rep K_fused^T == Q_exp K^T
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("representative", ["sample", "mean"])
@pytest.mark.parametrize("group_size,block_q", [(2, 8), (4, 16), (8, 64)])
def test_rep_fused_identity(representative, group_size, block_q):
  batch, q_len, kv_len, heads, kv_heads, d = 2, 37, 29, 4, 2, 32
  q, k, _ = _qkv(group_size, batch, q_len, kv_len, heads, kv_heads, d)
  perm = grouping.block_permutations(q, block_q=block_q, group_size=group_size)
  num_blocks = -(-q_len // block_q)
  assert perm.shape == (batch, heads, num_blocks, d)
  reduction = grouping.HeadReduction.from_permutation(
      perm, group_size=group_size, block_q=block_q, representative=representative)
  q_rep, q_exp = reduction.q_rep(q), reduction.q_exp(q)
  k_fused = reduction.k_fused_blocks(k)
  if num_blocks == 1:  # k_fused: one grouping per sequence comes in BTNH
    np.testing.assert_allclose(reduction.k_fused(k), jnp.transpose(k_fused[:, :, 0],
                                                                   (0, 2, 1, 3)))
  assert q_rep.shape == (batch, q_len, heads, d // group_size)
  assert k_fused.shape == (batch, heads, num_blocks, kv_len, d // group_size)
  assert q_exp.shape == q.shape

  hi = jax.lax.Precision.HIGHEST
  block_of_row = np.arange(q_len) // block_q
  lhs = jnp.einsum("bthg,bhtsg->bhts", q_rep, k_fused[:, :, block_of_row], precision=hi)
  k_full = jnp.repeat(k, heads // kv_heads, axis=2)
  rhs = jnp.einsum("bthd,bshd->bhts", q_exp, k_full, precision=hi)
  np.testing.assert_allclose(lhs, rhs, atol=1e-5, rtol=1e-5)

  # And each is what the design says, computed independently.
  q_np, k_np, perm_np = np.asarray(q), np.asarray(k), np.asarray(perm)
  for b, h, t in [(0, 0, 0), (1, 3, q_len - 1), (0, 2, 17)]:
    groups = perm_np[b, h, t // block_q].reshape(-1, group_size)
    members = q_np[b, t, h, groups]  # [d/G, G]
    want = members[:, 0] if representative == "sample" else members.mean(-1)
    np.testing.assert_allclose(q_rep[b, t, h], want, atol=1e-6, rtol=1e-6)
    for g, cols in enumerate(groups):
      np.testing.assert_array_equal(q_exp[b, t, h, cols], np.full(group_size, q_rep[b, t, h, g]))
    kh = h // (heads // kv_heads)
    np.testing.assert_allclose(k_fused[b, h, t // block_q],
                               k_np[b][:, kh][:, groups].sum(-1), atol=1e-5, rtol=1e-5)
