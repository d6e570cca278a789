"""The prep kernels (pallas_kernels/triton/prep.py): per-head Grams and projections in the
BTNH layout, against float32 einsums; in the Pallas interpreter here, compiled on a GPU
(marker `gpu`), and lowered for CUDA on an abstract H100 in CI."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ON_GPU, normal, rel_error, requires_gpu
import distrattention_jax as dj
from distrattention_jax import grouping
from distrattention_jax import prep as prep_dispatch
from pallas_kernels.triton import prep

INTERPRET = not ON_GPU
HI = jax.lax.Precision.HIGHEST


def gram_oracle(x, block_q):
  """float32 `[B, H, nb, d, d]` from a float32 copy (blocks zero-padded)."""
  batch, length, heads, d = x.shape
  rows = min(block_q or length, length)
  nb = -(-length // rows)
  xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, nb * rows - length), (0, 0), (0, 0)))
  xp = xp.reshape(batch, nb, rows, heads, d)
  return jnp.einsum("bnrhc,bnrhe->bhnce", xp, xp, precision=HI)


def project_oracle(x, w, out_heads, block_q):
  """float32 `[B, T, Ho, e]`: the definition in `prep.project_heads`, maps in x's dtype."""
  batch, length, heads_in, _ = x.shape
  w = w if w.ndim == 5 else w[:, :, None]
  nb = w.shape[2]
  rows = length if nb == 1 else block_q
  wt = w.astype(x.dtype).astype(jnp.float32)[:, :, jnp.minimum(jnp.arange(length) // rows,
                                                                nb - 1)]  # [B, Hw, T, c, e]
  xf = x.astype(jnp.float32)
  if out_heads >= heads_in:
    return jnp.einsum("bthc,bhtce->bthe", jnp.repeat(xf, out_heads // heads_in, axis=2), wt,
                      precision=HI)
  y = jnp.einsum("bthc,bhtce->bthe", xf, wt, precision=HI)
  return y.reshape(batch, length, out_heads, heads_in // out_heads, -1).sum(3)


GRAM_CASES = [  # (batch, length, heads, d, block_q)
    (1, 100, 2, 32, None),      # one block, ragged length
    (2, 130, 3, 64, 64),        # blocks, the last one short
    (1, 64, 2, 256, None),      # d=256: 2 x 2 output tiles
    (1, 200, 1, 16, 32),
]

PROJECT_CASES = [  # (batch, length, heads_in, out_heads, c, e, nb, block_q)
    (1, 100, 2, 2, 64, 16, 1, None),     # Q_rep, ragged
    (2, 300, 2, 4, 32, 16, 1, None),     # K_fused with a head per query head (GQA)
    (1, 300, 4, 2, 16, 32, 1, None),     # its gradient: input heads summed
    (1, 300, 2, 2, 64, 32, 3, 128),      # per-block maps
    (1, 77, 4, 4, 128, 32, 5, 16),
]


@pytest.mark.parametrize("batch,length,heads,d,block_q", GRAM_CASES)
def test_head_grams(batch, length, heads, d, block_q):
  x = normal(np.random.default_rng(length + d), (batch, length, heads, d), jnp.bfloat16)
  got = prep.head_grams(x, block_q=block_q, interpret=INTERPRET)
  want = gram_oracle(x, block_q)
  assert got.shape == want.shape
  assert rel_error(got, want) < 1e-6  # bf16 products are exact; only the sum order differs


@pytest.mark.parametrize("batch,length,heads_in,out_heads,c,e,nb,block_q", PROJECT_CASES)
def test_project_heads_and_gradient(batch, length, heads_in, out_heads, c, e, nb, block_q):
  rng = np.random.default_rng(length + c + e)
  x = normal(rng, (batch, length, heads_in, c), jnp.bfloat16)
  w = normal(rng, (batch, max(heads_in, out_heads), nb, c, e))
  call = functools.partial(prep.project_heads, w=w, out_heads=out_heads, block_q=block_q,
                           interpret=INTERPRET)
  got = call(x)
  assert got.shape == (batch, length, out_heads, e) and got.dtype == x.dtype
  assert rel_error(got, project_oracle(x, w, out_heads, block_q)) < 4e-3  # bf16 output
  ct = normal(rng, got.shape)
  grad = jax.grad(lambda x: jnp.sum(call(x).astype(jnp.float32) * ct))(x)
  want = jax.grad(lambda x: jnp.sum(project_oracle(x, w, out_heads, block_q) * ct))(
      x.astype(jnp.float32))
  assert grad.dtype == x.dtype and rel_error(grad, want) < 8e-3


def test_bad_inputs_are_refused():
  x = jnp.zeros((1, 32, 2, 64), jnp.float32)
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    prep.head_grams(x)
  x = x.astype(jnp.bfloat16)
  with pytest.raises(ValueError, match="output width 24"):
    prep.project_heads(x, jnp.zeros((1, 2, 64, 24)))
  with pytest.raises(ValueError, match="power-of-two multiple"):
    prep.project_heads(x, jnp.zeros((1, 3, 64, 16)), out_heads=3)
  with pytest.raises(ValueError, match="block_q"):
    prep.project_heads(x, jnp.zeros((1, 2, 4, 64, 16)), block_q=8)
  assert not prep_dispatch.kernel_fits(x) or ON_GPU  # only on a GPU


H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                   platform="cuda")


@pytest.mark.parametrize("d,group_size", [(64, 4), (128, 4), (256, 8), (128, 8)])
def test_lowers_for_cuda_on_cpu(d, group_size):
  """Every width the narrow backends use: Grams (one block and 64-row blocks) and the
  projections with their gradients (GQA K_fused, per-block Q_rep)."""
  s = jax.ShapeDtypeStruct
  r = d // group_size

  def everything(q, k, wq, wk, wb):
    grams = prep.head_grams(q), prep.head_grams(q, block_q=64)
    loss = lambda q, k: jnp.sum(  # noqa: E731
        prep.project_heads(q, wq).astype(jnp.float32)) + jnp.sum(
            prep.project_heads(k, wk, out_heads=8).astype(jnp.float32)) + jnp.sum(
                prep.project_heads(q, wb, block_q=128).astype(jnp.float32))
    return grams, jax.grad(loss, argnums=(0, 1))(q, k)

  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=H100)
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")
    with jax.sharding.use_abstract_mesh(mesh):
      text = jax.jit(everything).trace(
          s((1, 1000, 8, d), jnp.bfloat16), s((1, 1000, 2, d), jnp.bfloat16),
          s((1, 8, d, r), jnp.float32), s((1, 8, d, r), jnp.float32),
          s((1, 8, 8, d, r), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
  assert "distr_head_grams" in text and "distr_project_heads" in text


# --- on a GPU -----------------------------------------------------------------------------


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("length,d,group_size,heads,kv_heads", [
    (16384, 128, 4, 16, 16), (1000, 64, 2, 4, 2), (4097, 256, 8, 2, 1), (999, 128, 4, 8, 2)])
def test_gpu_kernels_match_xla(length, d, group_size, heads, kv_heads):
  """The compiled kernels against the XLA einsums they replace: Grams, greedy
  permutations, Q_rep / K_fused and their gradients, and distr_attention through the
  mosaic and cudnn backends (which use them) against the XLA path."""
  rng = np.random.default_rng(length + d)
  q = normal(rng, (1, length, heads, d), jnp.bfloat16)
  k = normal(rng, (1, length, kv_heads, d), jnp.bfloat16)
  for block_q in (length, 256):
    got = prep_dispatch.head_grams(q, block_q, use_kernel=True)
    assert rel_error(got, gram_oracle(q, block_q)) < 2e-5  # float32 sums of 16K terms
  perm = jax.jit(lambda q: grouping.greedy_permutations(
      q, block_q=length, group_size=group_size, use_kernel=True))(q)
  red = grouping.HeadReduction.from_permutation(perm, group_size=group_size, block_q=length)
  scale = d ** -0.5
  fq = lambda q, u: red.q_rep(q, scale, use_kernel=u)  # noqa: E731
  fk = lambda k, u: red.k_fused(k, use_kernel=u)  # noqa: E731
  for f, x in ((fq, q), (fk, k)):
    got, want = jax.jit(lambda x: f(x, True))(x), jax.jit(lambda x: f(x, False))(x)
    assert got.shape == want.shape and rel_error(got, want) < 1e-2
    grads = [jax.jit(jax.grad(lambda x, u=u: jnp.sum(f(x, u).astype(jnp.float32) ** 2)))(x)
             for u in (True, False)]
    assert rel_error(*grads) < 2e-2
  if length > 4097:
    return  # the XLA oracle below materialises [H, T, T] float32 scores
  v = normal(rng, (1, length, kv_heads, d), jnp.bfloat16)
  kw = dict(group_size=group_size, block_q=1 << (length - 1).bit_length())  # one block
  ref = jax.jit(functools.partial(dj.distr_attention, implementation="xla", **kw))(
      *(x.astype(jnp.float32) for x in (q, k, v)))
  for impl in ("mosaic", "cudnn"):
    out = jax.jit(functools.partial(dj.distr_attention, implementation=impl, **kw))(q, k, v)
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    assert rel_error(out, ref) < 2e-2, impl
