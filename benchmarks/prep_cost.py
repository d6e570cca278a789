"""Where an end-to-end Mosaic call spends its time outside the attention kernel.

For one grouping (or factorisation) per sequence: cuDNN, the Mosaic attention kernel
alone (Q_rep / K_fused precomputed) and `distr_attention` end to end with the greedy
grouping ("e2e"); the Gram matrices, the grouping step and the `Q_rep` / `K_fused`
projections with their backward, each alone ("parts"); the lowrank pre-pass (its first
call, compile included, and its time) and lowrank end to end ("lowrank"). One JSON per
run, rewritten after every number (a timeout keeps what was measured).

    python -m benchmarks.prep_cost [--n 16384 --d 128 --groups 4 --causal 0 1 --what e2e]
    python -m benchmarks.prep_cost --quick                     (CPU smoke test)
"""

from __future__ import annotations

import argparse
import functools
import os
import time
import warnings

import jax
import jax.numpy as jnp

from benchmarks import lowrank_cost
from benchmarks import timing
import distrattention_jax as dj
from distrattention_jax import grouping
from distrattention_jax import lowrank
from distrattention_jax import prep

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")


def _grad_of(fn):
  """d/dx of sum(fn(x) * 1): the projection's backward (and its forward)."""
  return jax.jit(jax.grad(lambda x: jnp.sum(fn(x).astype(jnp.float32))))


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--n", type=int, default=16384)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--d", type=int, nargs="+", default=[128, 256, 64])
  p.add_argument("--groups", type=int, nargs="+", default=[4])
  p.add_argument("--causal", type=int, nargs="+", default=[0])
  p.add_argument("--what", default="e2e,parts,lowrank",
                 help="comma list: e2e (Mosaic kernel alone and end to end, greedy), parts "
                      "(Grams, grouping and projections alone), lowrank (its "
                      "pre-pass and end to end)")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--out-dir", default="benchmarks/results")
  args = p.parse_args(argv)
  gpu = jax.default_backend() == "gpu"
  what = set(args.what.split(","))
  if args.quick:
    args.n, args.heads, args.d, args.groups = 256, 2, [32], [4]
  t = functools.partial(timing.time_fn, warmup=2, reps=5 if args.quick else 10,
                        min_time_s=0 if args.quick else 0.2)
  info = timing.device_info()
  name = f"prep-cost-{info['device'].replace(' ', '_')}-{info['date'][:10]}-d{'-'.join(map(str, args.d))}.json"
  rows = []
  for d in args.d:
    sets = timing.make_inputs(1, args.n, args.n, args.heads, d, jnp.bfloat16, 2)
    row = {"d": d, "n": args.n, "heads": args.heads}
    rows.append(row)

    def record(key, value, row=row, d=d):
      row[key] = value
      print(f"d={d} {key}: {value:.4f}" if isinstance(value, float) else f"d={d} {key}: {value}",
            flush=True)
      timing.write_json(os.path.join(args.out_dir, name), {"info": info, "rows": rows})

    impl = "cudnn" if gpu else "xla"
    for causal in args.causal:
      c = "_causal" if causal else ""
      exact = functools.partial(jax.nn.dot_product_attention, implementation=impl,
                                is_causal=bool(causal))
      record(f"cudnn{c}_fwd_ms", t(jax.jit(exact), sets))
      record(f"cudnn{c}_fwd_bwd_ms", t(timing.loss_grad(exact), sets))
    for g in args.groups:
      group = jax.jit(lambda q, k, v, g=g: grouping.greedy_permutations(
          q, block_q=args.n, group_size=g, use_kernel=gpu))
      perm = group(*sets[0])
      red = grouping.HeadReduction.from_permutation(perm, group_size=g, block_q=args.n)
      if gpu and "e2e" in what:
        from pallas_kernels.mosaic_gpu import attention as mosaic  # pylint: disable=import-outside-toplevel
        ksets = [(red.q_rep(q, d ** -0.5).astype(q.dtype), red.k_fused(k), v)
                 for q, k, v in sets]
        for causal in args.causal:
          tag = f"G{g}{'_causal' if causal else ''}"
          kern = functools.partial(mosaic.attention, causal=bool(causal))
          record(f"{tag}_mosaic_kernel_fwd_ms", t(jax.jit(kern), ksets))
          record(f"{tag}_mosaic_kernel_fwd_bwd_ms", t(timing.loss_grad(kern), ksets))
          e2e = functools.partial(dj.distr_attention, group_size=g, block_q=args.n,
                                  is_causal=bool(causal), implementation="mosaic",
                                  grouping="greedy")
          record(f"{tag}_greedy_e2e_fwd_ms", t(jax.jit(e2e), sets))
          record(f"{tag}_greedy_e2e_fwd_bwd_ms", t(timing.loss_grad(e2e), sets))
      if "parts" in what:
        record(f"G{g}_greedy_grouping_ms", t(group, sets))
        grams = jax.jit(lambda q, k, v: (prep.head_grams(q, args.n), prep.head_grams(k, args.n)))
        record("grams_qk_ms", t(grams, sets))
        proj = jax.jit(lambda q, k, v, red=red: (red.q_rep(q, d ** -0.5), red.k_fused(k)))
        record(f"G{g}_project_qk_ms", t(proj, sets))
        grad_q = _grad_of(lambda q, red=red: red.q_rep(q, d ** -0.5))
        grad_k = _grad_of(lambda k, red=red: red.k_fused(k))
        record(f"G{g}_project_qk_fwd_bwd_ms",
               t(jax.jit(lambda q, k, v, gq=grad_q, gk=grad_k: (gq(q), gk(k))), sets))
      if "lowrank" in what:
        # Its pre-pass (Grams, factorisation, projections) as distr_attention runs it; the
        # first call's time includes the compile of the factorisation program.
        lr = lowrank_cost.prepass_fn(args.n, g, args.n, use_kernel=gpu,
                                     steps=lowrank.DEFAULT_STEPS, per_kv_head=True)
        t0 = time.perf_counter()
        jax.block_until_ready(lr(*sets[0]))
        record(f"G{g}_lowrank_prepass_first_call_s", time.perf_counter() - t0)
        record(f"G{g}_lowrank_prepass_ms", t(lr, sets))
        if gpu:
          # Also with maps held fixed (calibrated once, the causal-safe choice): no Grams
          # and no factorisation at run time, only the two projections.
          q0, k0, _ = sets[0]
          fixed = lowrank.calibrate_lowrank_maps(q0, k0, group_size=g, per_kv_head=True)
          for causal in args.causal:
            tag = f"G{g}{'_causal' if causal else ''}"
            for kind, extra in (("lowrank", {}), ("fixedmaps", {"lowrank_maps": fixed})):
              e2e = functools.partial(dj.distr_attention, group_size=g, block_q=args.n,
                                      grouping="lowrank", is_causal=bool(causal),
                                      implementation="mosaic", **extra)
              record(f"{tag}_{kind}_e2e_fwd_ms", t(jax.jit(e2e), sets))
              record(f"{tag}_{kind}_e2e_fwd_bwd_ms", t(timing.loss_grad(e2e), sets))
  print("wrote", os.path.join(args.out_dir, name))


if __name__ == "__main__":
  main()
