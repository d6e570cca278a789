"""GPU parity of the Pallas kernels against the reference (skipped without a GPU).

Inputs are fresh random normals, every row and column of the output is compared with an
oracle, and non-finite values fail; tolerances fit bf16. Not yet done: poisoning the
output buffers (aliasing a NaN-filled buffer into the kernel), so an element the kernel
never writes but whose stale memory happens to hold the right value would pass.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distrattention_jax as dj
from distrattention_jax import grouping

from gpu_parity import random_inputs as _inputs
from gpu_parity import rel_error as _rel
from gpu_parity import requires_gpu

pytestmark = pytest.mark.gpu


CASES = [  # (q_len, d, group_size, block_q, causal)
    (1000, 64, 1, 64, False), (1000, 64, 2, 64, True), (1000, 128, 4, 64, False),
    (1000, 128, 4, 16, True), (1000, 128, 2, 512, True),
    (4096, 64, 1, 64, True), (4096, 128, 4, 64, False), (4096, 128, 4, 1024, True),
    (4096, 128, 2, 128, False), (16384, 128, 1, 64, False), (16384, 128, 4, 64, True),
    (16384, 64, 2, 1024, False), (16384, 128, 4, 16384, False),
]


@requires_gpu
@pytest.mark.parametrize("q_len,d,group_size,block_q,causal", CASES)
def test_forward_parity(q_len, d, group_size, block_q, causal):
  heads = 4
  q, k, v, _ = _inputs(q_len + d + group_size, 1, q_len, q_len, heads, 2, d, jnp.bfloat16)
  # LSH hashes a float32 copy of Q, so bf16 inputs and the float32 oracle group alike;
  # greedy's Gram matrix follows the input dtype and could break a near-tie differently.
  kw = dict(group_size=group_size, block_q=block_q, is_causal=causal, grouping="lsh")
  out = jax.jit(functools.partial(dj.distr_attention, implementation="pallas", **kw))(q, k, v)
  # Same grouping, float32 XLA path as the oracle (itself tested against the reference).
  ref = dj.distr_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                           v.astype(jnp.float32), implementation="xla", **kw)
  assert _rel(out, ref) < 2e-2


@requires_gpu
@pytest.mark.parametrize("q_len,d,group_size,block_q,causal",
                         [c for c in CASES if c[0] <= 4096])
def test_gradient_parity(q_len, d, group_size, block_q, causal):
  q, k, v, kr = _inputs(7 * q_len + d, 1, q_len, q_len, 4, 2, d, jnp.bfloat16)
  w = jax.random.normal(kr, q.shape, jnp.float32)
  perm = grouping.block_permutations(q, block_q=block_q, group_size=group_size,
                                     grouping="lsh")

  def loss(impl, q, k, v):
    o = dj.distr_attention(q, k, v, group_size=group_size, block_q=block_q, grouping="lsh",
                           is_causal=causal, implementation=impl)
    return jnp.sum(o.astype(jnp.float32) * w)

  grads = jax.jit(jax.grad(functools.partial(loss, "pallas"), argnums=(0, 1, 2)))(q, k, v)

  def ref_loss(q, k, v):
    o = dj.distr_attention_reference(q, k, v, group_size=group_size, block_q=block_q,
                                     is_causal=causal, perm=perm)
    return jnp.sum(o.astype(jnp.float32) * w)

  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  ref = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))(*f32) if q_len <= 1000 else \
      jax.jit(jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2)))(*f32)
  for g, r in zip(grads, ref):
    assert _rel(g, r) < 3e-2


@requires_gpu
@pytest.mark.parametrize("group_size,block_q", [(1, 64), (4, 32), (2, 256)])
def test_masks_ragged_gqa_dtypes(group_size, block_q):
  for dtype, tol in ((jnp.float16, 2e-2), (jnp.float32, 5e-3)):
    q, k, v, _ = _inputs(3, 2, 777, 515, 6, 2, 96, dtype)
    seg_q = (jnp.arange(777)[None] >= 300).astype(jnp.int32).repeat(2, 0)
    seg_k = (jnp.arange(515)[None] >= 200).astype(jnp.int32).repeat(2, 0)
    kw = dict(group_size=group_size, block_q=block_q, segment_ids=(seg_q, seg_k), grouping="lsh",
              key_value_seq_lengths=jnp.array([515, 150]), is_causal=True)
    out = dj.distr_attention(q, k, v, implementation="pallas", **kw)
    ref = dj.distr_attention(*(x.astype(jnp.float32) for x in (q, k, v)),
                             implementation="xla", **kw)
    assert _rel(out, ref) < tol


@requires_gpu
@pytest.mark.parametrize("d,group_size,block_q", [(64, 4, 64), (128, 4, 16),
                                                  (128, 2, 16384), (96, 8, 128)])
def test_greedy_kernel_equals_xla_loop(d, group_size, block_q):
  # Same algorithm, tie-break and Gram matrix; the kernel forms |c|^2 + |s|^2 - 2<c, s>
  # in its own float order, so only near-ties may differ: (almost) every block agrees.
  q, _, _, _ = _inputs(d + block_q, 2, 16384 if block_q == 16384 else 3000, 16, 8, 8, d,
                       jnp.bfloat16)
  kw = dict(block_q=block_q, group_size=group_size)
  kernel = grouping.greedy_permutations(q, use_kernel=True, **kw)
  xla = grouping.greedy_permutations(q, use_kernel=False, **kw)
  assert np.all(np.sort(np.asarray(kernel), -1) == np.arange(d))
  same = np.mean(np.all(np.asarray(kernel) == np.asarray(xla), axis=-1))
  assert same > 0.99, same
