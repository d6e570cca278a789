"""The cuDNN backend: argument checks on any platform, the shared cases on a GPU, and the
two cuDNN routes ("narrow": one grouping per sequence, a `d/G`-wide score product;
"expand": exact cuDNN attention at `Q_exp`) at real sizes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distrattention_jax as dj
from distrattention_jax.backends import cudnn as cudnn_backend

from backend_cases import BackendTestBase
from conftest import qkv, rel_error, requires_gpu


@pytest.mark.gpu
class TestCudnnGpu(BackendTestBase):
  implementation = "cudnn"
  needs_gpu = True
  dtype = jnp.bfloat16
  fwd_tol = 2e-2
  grad_tol = 3e-2
  low_precision_tol = {jnp.bfloat16: 3e-2, jnp.float16: 1e-2}
  supports_segment_ids = False
  supports_float32 = False
  supports_small_block_q = True


def test_cudnn_implementation_validates_before_running():
  q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 32, 2, 16)), jnp.bfloat16)
  seg = jnp.zeros((1, 32), jnp.int32)
  cases = [  # (kwargs, error, message)
      (dict(q=q.astype(jnp.float32)), NotImplementedError, "float32 inputs"),
      (dict(segment_ids=seg), NotImplementedError, "segment_ids"),
      (dict(mask=jnp.ones((32, 32), bool)), NotImplementedError, "dense boolean `mask`"),
      (dict(q=q[..., :12]), NotImplementedError, "head_dim=12"),
  ]
  if jax.default_backend() != "gpu":
    cases.append((dict(), ValueError, "needs a GPU backend"))  # valid options, no GPU
  for kwargs, error, message in cases:
    x = kwargs.pop("q", q)
    with pytest.raises(error, match=message):
      dj.distr_attention(x, x, x, implementation="cudnn", **kwargs)
  if jax.default_backend() != "gpu":
    # None never picks cuDNN off a GPU: same result as "xla".
    np.testing.assert_array_equal(dj.distr_attention(q, q, q),
                                  dj.distr_attention(q, q, q, implementation="xla"))


# --- on a GPU -----------------------------------------------------------------------------

LONG = (16384, 16384, 128, 8, 16384, False, 2, 2)
CASES = [  # (q_len, kv_len, d, group_size, block_q, causal, heads, kv_heads)
    (1000, 1000, 64, 2, 1024, True, 4, 2),     # narrow, GQA
    (1000, 777, 128, 4, 64, True, 4, 2),       # expand, cross lengths
    (999, 999, 128, 4, 1024, False, 2, 2),     # narrow, odd length
    (4096, 4096, 128, 4, 4096, True, 4, 1),    # narrow, MQA
    LONG,                                      # the long sequence: forward only
]


def _call(impl, q, k, v, **kw):
  return dj.distr_attention(q, k, v, implementation=impl, **kw)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("q_len,kv_len,d,group_size,block_q,causal,heads,kv_heads", CASES)
def test_gpu_routes_forward_and_gradient(q_len, kv_len, d, group_size, block_q, causal,
                                         heads, kv_heads):
  q, k, v = qkv(q_len + d + group_size, 1, q_len, kv_len, heads, kv_heads, d,
                dtype=jnp.bfloat16)
  # LSH hashes a float32 copy of Q, so bf16 inputs and the float32 oracle group alike.
  kw = dict(group_size=group_size, block_q=block_q, is_causal=causal, grouping="lsh")
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  if q_len > 4096:  # the float32 XLA gradient would materialise [H, N, N] several times
    out = jax.jit(functools.partial(_call, "cudnn", **kw))(q, k, v)
    assert rel_error(out, jax.jit(functools.partial(_call, "xla", **kw))(*f32)) < 2e-2
    return
  w = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape[:3] + (d,)), jnp.float32)

  def loss(impl, q, k, v):
    out = _call(impl, q, k, v, **kw)
    return jnp.sum(out.astype(jnp.float32) * w), out

  grads, out = jax.jit(jax.grad(functools.partial(loss, "cudnn"), argnums=(0, 1, 2),
                                has_aux=True))(q, k, v)
  ref_grads, ref = jax.jit(jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2),
                                    has_aux=True))(*f32)
  assert out.dtype == q.dtype and rel_error(out, ref) < 2e-2
  for g, r in zip(grads, ref_grads):
    assert g.dtype == q.dtype and rel_error(g, r) < 3e-2


@pytest.mark.gpu
@requires_gpu
def test_gpu_narrow_route_is_taken():
  # One grouping per sequence with d/G a multiple of 8 must use the d/G-wide cuDNN call.
  assert cudnn_backend.narrow_applies(1, 128, 4)
  assert not cudnn_backend.narrow_applies(2, 128, 4)   # several grouping blocks: expand
  assert not cudnn_backend.narrow_applies(1, 32, 8)    # d/G = 4 < 8: expand


@pytest.mark.gpu
@requires_gpu
def test_gpu_default_is_cudnn_and_falls_back_for_segments():
  q, k, v = qkv(5, 1, 256, 256, 2, 2, 64, dtype=jnp.bfloat16)
  seg = (jnp.arange(256)[None] >= 100).astype(jnp.int32)
  # None picks cuDNN here and Triton with segment_ids; both equal the XLA result.
  for kw in (dict(), dict(segment_ids=seg)):
    out = dj.distr_attention(q, k, v, group_size=2, block_q=256, grouping="lsh", **kw)
    ref = _call("xla", *(x.astype(jnp.float32) for x in (q, k, v)), group_size=2,
                block_q=256, grouping="lsh", **kw)
    assert rel_error(out, ref) < 2e-2


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("block_q", [
    pytest.param(512, marks=pytest.mark.xfail(
        raises=TypeError, strict=True,
        reason="JAX's batching rule for its cuDNN binding reshapes V with K's head dim "
               "(jax 0.11.2), so vmap of the narrow route fails; README says so"))])
def test_gpu_vmap_narrow_route(block_q):
  # (vmap of the expand route: BackendTestBase.test_jit_vmap_and_remat)
  q, k, v = qkv(21, 2, 512, 512, 4, 2, 64, dtype=jnp.bfloat16)
  fn = functools.partial(_call, "cudnn", group_size=4, block_q=block_q, is_causal=True,
                         grouping="greedy")
  stacked = [jnp.stack([x, x[:, ::-1]]) for x in (q, k, v)]   # an extra leading axis
  out = jax.jit(jax.vmap(fn))(*stacked)
  for i in range(2):
    assert rel_error(out[i], fn(*(x[i] for x in stacked))) < 1e-2


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("block_q", [64, 4096])   # expand and narrow routes
def test_gpu_greedy_grouping(block_q):
  # The greedy grouping, same bf16 inputs on both sides (so the same permutations):
  # cuDNN against the reference given those permutations.
  q, k, v = qkv(31, 1, 1000, 1000, 4, 2, 128, dtype=jnp.bfloat16)
  kw = dict(group_size=4, block_q=block_q, is_causal=True, grouping="greedy")
  out = _call("cudnn", q, k, v, **kw)
  perm = dj.block_permutations(q, block_q=block_q, group_size=4)
  ref = dj.distr_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), perm=perm,
                                     **kw)
  assert rel_error(out, ref) < 2e-2
