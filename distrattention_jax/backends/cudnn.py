"""The "cudnn" backend: grouping in XLA, attention in cuDNN's fused kernels.

Two ways to hand DistrAttention to cuDNN, both the same function (the identity of
docs/DESIGN.md section 1):

* **narrow** (one grouping block per sequence, `d/G` a multiple of 8): cuDNN attention on
  `(Q_rep, K_fused, V)` with a `d/G`-wide score product and a full-width `V`. cuDNN calls
  a `Q K^T` head dim that differs from V's "MLA" (Hopper and newer, cuDNN >= 9.10), and
  JAX reaches it only through its internal binding `jax._src.cudnn.fused_attention_stablehlo`
  (the public `jax.nn.dot_product_attention` asks for equal head dims). This is the fast
  path: the score product shrinks G-fold inside a kernel as fast as cuDNN's exact one.
* **expand** (any `block_q`): cuDNN's exact attention on `(Q_exp, K, V)`, where `Q_exp`
  puts each group's representative into every column of its group. Exact-attention
  speed, no gain, but the accurate small grouping blocks at cuDNN's speed (our Triton
  kernels for those are slower than cuDNN's exact kernel).

Gradients come from JAX's autodiff of the XLA grouping products and cuDNN's own VJP,
with the grouping held constant (it is computed under `stop_gradient`). Both routes use
only the reduction's `q_rep`/`k_fused`/`q_exp`, so dense maps work as permutations do.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from distrattention_jax.backends import base

MAX_HEAD_DIM = 256  # cuDNN's flash attention on Hopper; head dims must be multiples of 8


def _internal_binding():
  """JAX's cuDNN attention binding (supports different Q/K and V head dims), or None."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as binding  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  if not hasattr(binding, "dot_product_attention") or not hasattr(binding, "MaskType"):
    return None
  return binding


def _supports(problem: base.Problem) -> str | None:
  """None if the cuDNN path handles these options, else what it does not handle."""
  dtype, head_dim, value_dim = problem.dtype, problem.head_dim, problem.value_dim
  if dtype not in (jnp.bfloat16, jnp.float16):
    return f"{jnp.dtype(dtype).name} inputs (cuDNN's fused attention takes bfloat16 or float16)"
  if problem.has_mask:
    return ("a dense boolean `mask` (express it with is_causal, query_seq_lengths or "
            "key_value_seq_lengths)")
  if problem.has_segment_ids:
    return "segment_ids"
  for name, dim in (("head_dim", head_dim), ("value head_dim", value_dim)):
    if dim % 8 or dim > MAX_HEAD_DIM:
      return f"{name}={dim} (cuDNN needs a multiple of 8, at most {MAX_HEAD_DIM})"
  if problem.platform == "gpu":  # off a GPU the caller says that a GPU is needed
    binding = _internal_binding()
    if binding is not None and not binding.check_compute_capability("8.0"):
      return "this GPU (cuDNN's fused attention needs compute capability 8.0 or newer)"
    if head_dim != value_dim and not _mla_supported():
      return (f"value head_dim {value_dim} != head_dim {head_dim} on this GPU/cuDNN "
              "(needs Hopper and cuDNN >= 9.10)")
  return None


@functools.cache
def _mla_supported() -> bool:
  """Whether cuDNN here takes a V head dim that differs from Q/K's (Hopper, cuDNN >= 9.10)."""
  binding = _internal_binding()
  if binding is None or jax.default_backend() != "gpu":
    return False
  try:
    return (binding.check_cudnn_version() >= 91000
            and binding.check_compute_capability("9.0"))
  except Exception:  # noqa: BLE001  (an internal API that changed: use the expand route)
    return False


def narrow_applies(num_blocks: int, head_dim: int, group_size: int) -> bool:
  """Whether the `d/G`-wide ("narrow") cuDNN call is used for these options."""
  return (group_size > 1 and num_blocks == 1 and (head_dim // group_size) % 8 == 0
          and _mla_supported())


def _pad_seq(x, size):
  return x if x.shape[1] == size else jnp.pad(x, ((0, 0), (0, size - x.shape[1]), (0, 0), (0, 0)))


def _call_cudnn(query, key, value, masks, scale):
  """cuDNN attention on BTNH arrays; V's head dim may differ from Q/K's ("MLA").

  Query/key lengths are padded to even sizes first: JAX's binding refuses odd lengths
  when differentiating ("Unsupported sequence length"), and the padding is masked
  through cuDNN's own sequence lengths.
  """
  batch, q_len, kv_len = query.shape[0], query.shape[1], key.shape[1]
  q_even, kv_even = q_len + q_len % 2, kv_len + kv_len % 2
  q_lengths, kv_lengths = masks.q_lengths, masks.kv_lengths
  if q_lengths is not None or kv_lengths is not None or (q_even, kv_even) != (q_len, kv_len):
    # cuDNN reads lengths past the sequence as the whole sequence; clip so both agree.
    q_lengths = (jnp.full((batch,), q_len, jnp.int32) if q_lengths is None
                 else jnp.clip(q_lengths, 0, q_len))
    kv_lengths = (jnp.full((batch,), kv_len, jnp.int32) if kv_lengths is None
                  else jnp.clip(kv_lengths, 1, kv_len))
    # A sequence with no key (length 0) is run with one key: cuDNN's backward gives NaN
    # for an empty key set (H100, 2026-11-25); its rows are set to 0 after the call, so
    # their cotangent is 0 and every gradient through them is exactly 0.
  query, key, value = _pad_seq(query, q_even), _pad_seq(key, kv_even), _pad_seq(value, kv_even)
  if query.shape[-1] == value.shape[-1]:
    out = jax.nn.dot_product_attention(
        query, key, value, scale=scale, is_causal=masks.is_causal,
        query_seq_lengths=q_lengths, key_value_seq_lengths=kv_lengths,
        implementation="cudnn")
  else:
    binding = _internal_binding()
    mask_type = {(False, False): binding.MaskType.NO_MASK,
                 (False, True): binding.MaskType.CAUSAL,
                 (True, False): binding.MaskType.PADDING,
                 (True, True): binding.MaskType.PADDING_CAUSAL}[
                     (q_lengths is not None, masks.is_causal)]
    out = binding.dot_product_attention(
        query, key, value, q_seqlen=q_lengths, kv_seqlen=kv_lengths, scale=scale,
        mask_type=mask_type, qkv_layout="BTNH")
  return out[:, :q_len]


class CudnnBackend(base.Backend):
  """DistrAttention through cuDNN (see the module docstring for the two routes)."""

  name = "cudnn"
  needs_gpu = True
  off_gpu_hint = "use 'xla' or 'triton_interpret' on a CPU"

  def supports(self, problem):
    return _supports(problem)

  def __call__(self, query, key, value, reduction, masks, problem):
    """`[B, Tq, H, dv]`; rows with no key to attend are 0."""
    batch, q_len, _, head_dim = query.shape
    kv_heads = key.shape[2]
    scale = problem.scale
    if reduction is None:
      out = _call_cudnn(query, key, value, masks, scale)
    elif narrow_applies(reduction.num_blocks, head_dim, reduction.group_size):
      # One projection per batch row on the GPU kernel path (prep.einsum_per_batch_row).
      rows = self.uses_grouping_kernel
      q_rep = reduction.q_rep(query, per_batch_row=rows)    # [B, Tq, H, d/G]
      k_fused = reduction.k_fused(key, per_batch_row=rows)  # [B, Tk, Hk, d/G] (one block)
      # cuDNN wants K and V with the same heads; K_fused may have one per query head.
      fused_heads = k_fused.shape[2]
      value_h = (jnp.repeat(value, fused_heads // kv_heads, axis=2)
                 if fused_heads != kv_heads else value)
      out = _call_cudnn(q_rep, k_fused, value_h, masks, scale)
    else:
      out = _call_cudnn(reduction.q_exp(query), key, value, masks, scale)
    # The contract: rows with no key to attend (padding rows, empty key sets) are 0.
    has_key = masks.query_valid(q_len)  # [B, Tq] or None
    if masks.kv_lengths is not None:
      some = jnp.broadcast_to((masks.kv_lengths > 0)[:, None], (batch, q_len))
      has_key = some if has_key is None else has_key & some
    if has_key is not None:
      out = jnp.where(has_key[:, :, None, None], out, jnp.zeros((), out.dtype))
    return out
