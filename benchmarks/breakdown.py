"""Where the time of one DistrAttention forward goes: grouping, preparation, kernel.

python -m benchmarks.breakdown [--n 16384 --d 128 --groups 4 --block-q 64 128 1024 16384]
"""

from __future__ import annotations

import argparse
import functools
import warnings

import jax
import jax.numpy as jnp

from benchmarks import timing
import distrattention_jax as dj
from distrattention_jax import config, grouping
from distrattention_jax.backends import triton as triton_backend

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--n", type=int, default=16384)
  p.add_argument("--d", type=int, default=128)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--groups", type=int, nargs="+", default=[4])
  p.add_argument("--block-q", type=int, nargs="+", default=[64, 128, 1024, 16384])
  p.add_argument("--grouping", default="lsh")
  args = p.parse_args(argv)
  sets = timing.make_inputs(1, args.n, args.n, args.heads, args.d, jnp.bfloat16, 3)
  t = functools.partial(timing.time_fn, input_sets=sets, warmup=3, reps=30, min_time_s=0.5)
  cudnn = t(jax.jit(functools.partial(jax.nn.dot_product_attention, implementation="cudnn")))
  g1 = t(jax.jit(functools.partial(dj.distr_attention, group_size=1, implementation="pallas")))
  print(f"cudnn {cudnn:.3f} ms   ours G=1 {g1:.3f} ms")
  masks = config.Masks()
  for g in args.groups:
    for bq in args.block_q:
      perm_fn = jax.jit(lambda q, k, v: grouping.block_permutations(
          q, block_q=bq, group_size=g, grouping=args.grouping))
      t_group = t(perm_fn)
      # The permutation is an argument (a closed-over constant would be constant-folded).
      psets = [(q, k, v, perm_fn(q, k, v)) for q, k, v in sets]
      tp = functools.partial(timing.time_fn, input_sets=psets, warmup=3, reps=30,
                             min_time_s=0.5)
      def reduction(perm):
        return grouping.HeadReduction.from_permutation(perm, group_size=g, block_q=bq)
      if bq >= triton_backend.FUSED_MIN_BLOCK_Q:
        prep = jax.jit(lambda q, k, v, perm: (
            reduction(perm).q_rep(q), reduction(perm).k_fused_blocks(k)))
      else:
        prep = jax.jit(lambda q, k, v, perm: (
            reduction(perm).q_rep(q), reduction(perm).member_indices()))
      t_prep = tp(prep)
      kernel_only = jax.jit(lambda q, k, v, perm: triton_backend.distr_attention_triton(
          q, k, v, reduction(perm), masks, scale=args.d ** -0.5))
      t_kernel_prep = tp(kernel_only)
      full = jax.jit(functools.partial(dj.distr_attention, group_size=g, block_q=bq,
                                       grouping=args.grouping, implementation="pallas"))
      t_full = t(full)
      print(f"G={g} block_q={bq:6d}: grouping {t_group:.3f}  prep {t_prep:.3f}  "
            f"prep+kernel {t_kernel_prep:.3f} (kernel ~{t_kernel_prep - t_prep:.3f})  "
            f"total {t_full:.3f} ms  | vs cuDNN {cudnn / t_full:.2f}x  vs G=1 {g1 / t_full:.2f}x",
            flush=True)


if __name__ == "__main__":
  main()
