"""Every kernel configuration we ship lowers for CUDA, on a CPU (abstract H100).

Catches unimplemented primitives, non-power-of-two blocks, bad gather shapes and (through
conftest's verifier) invalid Triton ops without a GPU; it cannot catch Triton compile
errors or wrong results (the GPU tests do).
"""

import jax
import jax.numpy as jnp
import pytest

from conftest import TRITON_MODULES_VERIFIED, lower_for_h100
from distrattention_jax import config
from distrattention_jax import grouping
from distrattention_jax.backends import triton as triton_backend
from pallas_kernels.triton import greedy
from pallas_kernels.triton import tiles


def _lower_grad(q_shape, kv_shape, dtype, group_size, block_q, causal, segments):
  batch, q_len, heads, d = q_shape
  masks = config.Masks(
      is_causal=causal,
      q_segment_ids=jnp.zeros((batch, q_len), jnp.int32) if segments else None,
      kv_segment_ids=jnp.zeros((batch, kv_shape[1]), jnp.int32) if segments else None)

  def loss(q, k, v, perm):
    reduction = None if group_size == 1 else grouping.HeadReduction.from_permutation(
        perm, group_size=group_size, block_q=block_q)
    out = triton_backend.distr_attention_triton(q, k, v, reduction, masks,
                                                scale=d ** -0.5)
    return jnp.sum(out.astype(jnp.float32))

  args = (jax.ShapeDtypeStruct(q_shape, dtype), jax.ShapeDtypeStruct(kv_shape, dtype),
          jax.ShapeDtypeStruct(kv_shape, dtype),
          jax.ShapeDtypeStruct((batch, heads, -(-q_len // block_q), d), jnp.int32))
  return lower_for_h100(jax.grad(loss, argnums=(0, 1, 2)), *args)


# Every table entry (d and G that give its widths), the gather path, f32/f16, masks.
CONFIGS = [
    # (d, group_size, block_q, dtype, causal, segments)
    (128, 1, 64, jnp.bfloat16, False, False),
    (64, 1, 64, jnp.bfloat16, True, False),
    (128, 2, 1024, jnp.bfloat16, False, False),
    (128, 4, 1024, jnp.bfloat16, True, True),
    (64, 2, 4096, jnp.bfloat16, False, False),
    (64, 4, 256, jnp.bfloat16, False, False),
    (128, 4, 64, jnp.bfloat16, False, False),
    (128, 4, 128, jnp.bfloat16, True, False),
    (64, 2, 16, jnp.float16, False, True),
    (256, 8, 32, jnp.bfloat16, False, False),
    (32, 8, 512, jnp.float32, True, False),
    (96, 1, 64, jnp.float32, False, True),
]


@pytest.mark.parametrize("d,group_size,block_q,dtype,causal,segments", CONFIGS)
def test_lowers_for_cuda(d, group_size, block_q, dtype, causal, segments):
  text = _lower_grad((1, 1000, 4, d), (1, 900, 2, d), dtype, group_size, block_q, causal,
                     segments)
  # Forward, dQ and dK/dV kernels all became Triton calls.
  assert text.count("__gpu$xla.gpu.triton") == 3


def test_table_entries_are_powers_of_two():
  for key, t in tiles.TABLE.items():
    for size in (t.block_m, t.block_k, t.block_m_bwd, t.block_k_bwd):
      assert size >= 16 and size & (size - 1) == 0, (key, t)


@pytest.mark.parametrize("d,group_size", [(64, 4), (128, 2), (128, 4), (96, 8), (256, 4)])
def test_greedy_grouping_kernel_lowers_for_cuda(d, group_size):
  text = lower_for_h100(lambda g: greedy.greedy_groups(g, group_size),
                        jax.ShapeDtypeStruct((10, d, d), jnp.float32))
  assert text.count("__gpu$xla.gpu.triton") == 1


def test_lowered_triton_modules_are_verified():
  """The conftest fixture runs MLIR's verifier on each lowered Triton module (it is what
  catches invalid ops without a GPU; lowering alone does not)."""
  before = TRITON_MODULES_VERIFIED[0]
  lower_for_h100(lambda g: greedy.greedy_groups(g, 4),
                 jax.ShapeDtypeStruct((3, 48, 48), jnp.float32))  # a shape no other test lowers
  assert TRITON_MODULES_VERIFIED[0] > before, (
      "no Triton module was verified: JAX's Pallas Triton lowering moved "
      "(update verify_triton_modules in tests/conftest.py)")
