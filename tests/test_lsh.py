"""The grouping: angular LSH permutations (docs/DESIGN.md section 1, steps 2-3).

* Permutations are int32 permutations of 0..d-1 per block, deterministic for a seed.
* `gray_rank` inverts the binary-reflected Gray code; `lsh_permutations` equals an
  independent NumPy transcription (projections, sign bits, Gray rank, stable argsort).
* Padding query rows do not change the grouping (nor the output) of real rows.
* LSH really groups similar columns: on a Q whose columns come in identical copies,
  DistrAttention with LSH is exact, while random grouping is not.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distrattention_jax import attention
from distrattention_jax import grouping
from distrattention_jax import lsh
from distrattention_jax import reference

from conftest import normal as _normal


# ----------------------------------------------------------------------------------------
# 4. Permutations: shape, dtype, validity, determinism
# ----------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("block_q", "num_projs", "seed", "grouping_"))
def _perms(q, *, block_q, num_projs, seed, grouping_):
  return grouping.block_permutations(q, block_q=block_q, group_size=2, grouping=grouping_,
                                     num_projs=num_projs, seed=seed)


@pytest.mark.parametrize("grouping_", ["lsh", "random"])
@pytest.mark.parametrize("q_len,block_q,num_projs", [(37, 8, 16), (37, 64, 30), (32, 16, 1)])
def test_permutations_are_valid_and_deterministic(grouping_, q_len, block_q, num_projs):
  batch, heads, d = 2, 3, 32
  q = _normal(np.random.default_rng(q_len + block_q), (batch, q_len, heads, d))
  kwargs = dict(block_q=block_q, num_projs=num_projs, grouping_=grouping_)
  perm = _perms(q, seed=0, **kwargs)
  num_blocks = -(-q_len // block_q)
  assert perm.dtype == jnp.int32
  assert perm.shape == (batch, heads, num_blocks, d)
  np.testing.assert_array_equal(np.sort(np.asarray(perm), axis=-1),
                                np.broadcast_to(np.arange(d), perm.shape))
  np.testing.assert_array_equal(_perms(q, seed=0, **kwargs), perm)  # deterministic
  other = np.asarray(_perms(q, seed=1, **kwargs))
  assert np.any(other != np.asarray(perm))  # the seed matters
  if grouping_ == "lsh" and num_projs > 1:
    # Different blocks and heads of random data get different orders.
    flat = np.asarray(perm).reshape(-1, d)
    assert len({tuple(p) for p in flat}) > len(flat) // 2


def test_lsh_permutations_public_and_grouping_agree():
  q = _normal(np.random.default_rng(0), (1, 20, 2, 16))
  np.testing.assert_array_equal(
      lsh.lsh_permutations(q, block_q=8, num_projs=12, seed=4),
      grouping.block_permutations(q, block_q=8, group_size=4, grouping="lsh",
                                 num_projs=12, seed=4))


@pytest.mark.parametrize("num_bits", [1, 2, 3, 5, 8, 16])
def test_gray_rank_inverts_gray_code_exhaustively(num_bits):
  r = np.arange(2**num_bits, dtype=np.int32)
  np.testing.assert_array_equal(lsh.gray_rank(jnp.asarray(r ^ (r >> 1)), num_bits), r)


def test_gray_rank_inverts_gray_code_30_bits():
  r = np.random.default_rng(0).integers(0, 2**30, 4096).astype(np.int32)
  r = np.concatenate([r, [0, 1, 2**30 - 1, 2**29, 2**29 - 1]]).astype(np.int32)
  np.testing.assert_array_equal(lsh.gray_rank(jnp.asarray(r ^ (r >> 1)), 30), r)


def test_gray_order_neighbours_differ_by_one_bit():
  """Consecutive ranks are codes one bit apart (what makes the ordering local)."""
  codes = np.arange(2**10)
  ranks = np.asarray(lsh.gray_rank(jnp.asarray(codes, jnp.int32), 10))
  order = codes[np.argsort(ranks)]
  assert sorted(ranks) == list(range(2**10))
  assert all(bin(a ^ b).count("1") == 1 for a, b in zip(order[:-1], order[1:]))


def test_sign_codes_pack_bits():
  proj = np.random.default_rng(1).standard_normal((5, 7, 13)).astype(np.float32)
  want = ((proj > 0) * (1 << np.arange(13))).sum(-1)
  np.testing.assert_array_equal(lsh.sign_codes(jnp.asarray(proj)), want)


def _lsh_np(q, *, block_q, num_projs, seed, query_valid=None):
  """Steps 2-3 of docs/DESIGN.md section 1 in NumPy, block by block and column by column."""
  q = np.asarray(q, np.float64)
  if query_valid is not None:
    q = np.where(np.asarray(query_valid)[:, :, None, None], q, 0.0)
  directions = np.asarray(lsh.projection_matrix(seed, block_q, num_projs), np.float64)
  batch, q_len, heads, d = q.shape
  num_blocks = -(-q_len // block_q)
  perm = np.zeros((batch, heads, num_blocks, d), np.int64)
  for b in range(batch):
    for h in range(heads):
      for n in range(num_blocks):
        block = q[b, n * block_q:(n + 1) * block_q, h]  # a short last block is short
        projections = block.T @ directions[:len(block)]  # [d, num_projs]
        ranks = []
        for c in range(d):
          code = sum(1 << i for i in range(num_projs) if projections[c, i] > 0)
          rank, bit = 0, 0
          for i in reversed(range(num_projs)):  # inverse Gray code: prefix XOR from the top
            bit ^= (code >> i) & 1
            rank |= bit << i
          ranks.append(rank)
        perm[b, h, n] = np.argsort(ranks, kind="stable")
  return perm


@pytest.mark.parametrize("q_len,block_q,num_projs", [(37, 16, 16), (11, 32, 8)])
def test_lsh_permutations_match_numpy(q_len, block_q, num_projs):
  q = _normal(np.random.default_rng(q_len), (2, q_len, 2, 16))
  query_valid = np.arange(q_len)[None, :] < np.array([[q_len], [q_len - 6]])
  for valid in (None, query_valid):
    got = lsh.lsh_permutations(q, block_q=block_q, num_projs=num_projs, seed=3,
                               query_valid=None if valid is None else jnp.asarray(valid))
    np.testing.assert_array_equal(
        got, _lsh_np(q, block_q=block_q, num_projs=num_projs, seed=3, query_valid=valid))


# ----------------------------------------------------------------------------------------
# 4. Padding rows do not change the grouping or the output of real rows
# ----------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("block_q",))
def _grouped(q, k, v, q_lengths, kv_lengths, *, block_q):
  kwargs = dict(group_size=2, block_q=block_q, representative="mean", is_causal=True,
                implementation="xla")
  if q_lengths is None:
    out = attention.distr_attention(q, k, v, **kwargs)
    perm = grouping.block_permutations(q, block_q=block_q, group_size=2)
  else:
    out = attention.distr_attention(q, k, v, query_seq_lengths=q_lengths,
                                    key_value_seq_lengths=kv_lengths, **kwargs)
    perm = grouping.block_permutations(
        q, block_q=block_q, group_size=2,
        query_valid=jnp.arange(q.shape[1])[None, :] < q_lengths[:, None])
  return out, perm


@pytest.mark.parametrize("block_q", [16, 64])  # several blocks; one block (rows < block_q)
def test_padding_rows_do_not_change_real_rows(block_q):
  length, padded_len, heads, d = 37, 50, 2, 32
  rng = np.random.default_rng(block_q)
  # Batch row 0 is a length-37 sequence padded to 50 with large garbage; row 1 is full.
  q = _normal(rng, (2, padded_len, heads, d))
  q = q.at[0, length:].multiply(100.0)
  k, v = _normal(rng, (2, padded_len, heads, d)), _normal(rng, (2, padded_len, heads, d))
  lengths = jnp.array([length, padded_len])
  out, perm = _grouped(q, k, v, lengths, lengths, block_q=block_q)
  alone, alone_perm = _grouped(q[:1, :length], k[:1, :length], v[:1, :length], None, None,
                               block_q=block_q)
  np.testing.assert_allclose(out[0, :length], alone[0], atol=2e-5, rtol=2e-5)
  assert np.all(np.asarray(out[0, length:]) == 0)
  np.testing.assert_array_equal(perm[0, :, :alone_perm.shape[2]], alone_perm[0])
  # The full row is unaffected by its neighbour's padding.
  full, _ = _grouped(q[1:], k[1:], v[1:], None, None, block_q=block_q)
  np.testing.assert_allclose(out[1], full[0], atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------------------
# 5. LSH groups similar columns
# ----------------------------------------------------------------------------------------


def _duplicated_columns(seed, batch, q_len, heads, d, group_size, block_q, num_projs):
  """Q whose d columns are d/G base columns, each copied G times at shuffled positions.

  Returns (q, owner) with `q[..., c] == base[..., owner[c]]`. The base columns are drawn
  (deterministically) until, in every block, distinct base columns hash to distinct codes
  (otherwise a stable sort of tied codes could interleave two groups): that is the
  condition under which any correct LSH grouping must put the copies together.
  """
  rng = np.random.default_rng(seed)
  directions = np.asarray(lsh.projection_matrix(0, block_q, num_projs), np.float64)
  owner = rng.permutation(np.repeat(np.arange(d // group_size), group_size))
  for _ in range(20):
    base = rng.standard_normal((batch, q_len, heads, d // group_size)).astype(np.float32)
    blocks = base.reshape(batch, q_len // block_q, block_q, heads, d // group_size)
    signs = np.einsum("bnrhc,rp->bnhcp", blocks, directions) > 0
    codes = (signs * (1 << np.arange(num_projs))).sum(-1)  # [b, n, h, d/G]
    if all(len(set(c)) == c.size for c in codes.reshape(-1, d // group_size)):
      return jnp.asarray(base[..., owner]), owner
  raise AssertionError("could not draw base columns with distinct LSH codes")


@functools.partial(jax.jit, static_argnames=("group_size", "representative", "block_q"))
def _lsh_vs_random(q, k, v, *, group_size, representative, block_q):
  kwargs = dict(group_size=group_size, block_q=block_q, num_projs=16,
                representative=representative, is_causal=True, implementation="xla")
  return (attention.distr_attention(q, k, v, **kwargs),
          attention.distr_attention(q, k, v, grouping="random", **kwargs),
          reference.exact_attention(q, k, v, is_causal=True),
          lsh.lsh_permutations(q, block_q=block_q, num_projs=16))


@pytest.mark.parametrize("group_size", [2, 4])
@pytest.mark.parametrize("representative", ["sample", "mean"])
def test_lsh_groups_identical_columns(group_size, representative):
  batch, q_len, heads, kv_heads, d, block_q = 2, 64, 2, 1, 32, 16
  q, owner = _duplicated_columns(group_size, batch, q_len, heads, d, group_size, block_q, 16)
  rng = np.random.default_rng(100 + group_size)
  k, v = _normal(rng, (batch, 48, kv_heads, d)), _normal(rng, (batch, 48, kv_heads, d))
  out, out_random, exact, perm = _lsh_vs_random(
      q, k, v, group_size=group_size, representative=representative, block_q=block_q)

  # Every LSH group is G copies of one base column, in every block of every head.
  groups = owner[np.asarray(perm)].reshape(-1, d // group_size, group_size)
  assert np.all(groups == groups[..., :1])
  # Hence the grouped product is exact, for either representative ...
  np.testing.assert_allclose(out, exact, atol=2e-5, rtol=2e-5)
  # ... while a random grouping of the same columns is far off.
  err = np.linalg.norm(np.asarray(out_random - exact)) / np.linalg.norm(np.asarray(exact))
  assert err > 0.2, err


def test_lsh_beats_random_on_near_duplicate_columns():
  """With slightly noisy copies the grouping is approximate, yet far better than random.

  (Sign bits of nearly parallel columns still differ now and then, and a split pair
  misaligns the cut of the sorted order, so this is far from the exact-grouping error of
  ~0.005 here; the thresholds hold with margin over seeds.)
  """
  batch, q_len, heads, d, block_q, group_size = 2, 64, 2, 32, 16, 2
  q, owner = _duplicated_columns(7, batch, q_len, heads, d, group_size, block_q, 16)
  rng = np.random.default_rng(8)
  q = q + 0.01 * _normal(rng, q.shape)
  k, v = _normal(rng, (batch, 48, 1, d)), _normal(rng, (batch, 48, 1, d))
  out, out_random, exact, perm = _lsh_vs_random(q, k, v, group_size=group_size,
                                                representative="mean", block_q=block_q)
  groups = owner[np.asarray(perm)].reshape(-1, d // group_size, group_size)
  assert np.mean(np.all(groups == groups[..., :1], axis=-1)) >= 0.8
  rel = lambda x: np.linalg.norm(np.asarray(x - exact)) / np.linalg.norm(np.asarray(exact))
  assert rel(out) < 0.6 * rel(out_random), (rel(out), rel(out_random))
