"""Time of the grouping step alone vs the DistrAttention forward at the same shape.

Groupings: "lsh", "greedy" (on a GPU its steps run in one Pallas kernel,
`pallas_kernels/triton/greedy.py`) and "greedy-xla" (the same steps as XLA ops, for comparison).
The forward is `distr_attention` with the default implementation (cuDNN on a GPU) and
that grouping; block_q 0 stands for one grouping per sequence (block_q = N).

    python -m benchmarks.grouping_cost            (GPU: B=1, H=16, N=16384)
    python -m benchmarks.grouping_cost --quick    (CPU smoke test)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import warnings

import jax
import jax.numpy as jnp

from benchmarks import timing
import distrattention_jax as dj
from distrattention_jax import grouping

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--n", type=int, default=16384)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--d", type=int, nargs="+", default=[64, 128])
  p.add_argument("--block-q", type=int, nargs="+", default=[16, 64, 128, 1024, 0])
  p.add_argument("--group-size", type=int, default=4)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--out-dir", default="benchmarks/results")
  args = p.parse_args(argv)
  gpu = jax.default_backend() == "gpu"
  if args.quick:
    args.n, args.heads, args.d, args.block_q = 256, 2, [32], [16, 64]
  impl = None if gpu else "xla"
  rows = []
  for d in args.d:
    sets = timing.make_inputs(1, args.n, args.n, args.heads, d, jnp.bfloat16, 2)
    t = functools.partial(timing.time_fn, input_sets=sets, warmup=2,
                          reps=3 if args.quick else 20, min_time_s=0 if args.quick else 0.2)
    for bq in args.block_q:
      bq = bq or args.n
      for method in ("lsh", "greedy", "greedy-xla"):
        use_kernel = {"greedy": None, "greedy-xla": False}.get(method)
        if method == "lsh":
          group = lambda q, k, v: grouping.block_permutations(
              q, block_q=bq, group_size=args.group_size, grouping="lsh")
        else:
          group = lambda q, k, v, use_kernel=use_kernel: grouping.greedy_permutations(
              q, block_q=bq, group_size=args.group_size, use_kernel=use_kernel)
        group_ms = t(jax.jit(group))
        fwd_ms = t(jax.jit(functools.partial(
            dj.distr_attention, group_size=args.group_size, block_q=bq,
            grouping=method.removesuffix("-xla"), implementation=impl)))
        rows.append({"d": d, "block_q": bq, "grouping": method, "grouping_ms": group_ms,
                     "forward_ms": fwd_ms, "fraction": group_ms / fwd_ms,
                     "implementation": impl or "default (cudnn)"})
        print(f"d={d} block_q={bq:5d} {method:10s} grouping {group_ms:7.3f} ms  forward "
              f"{fwd_ms:7.3f} ms  ({100 * group_ms / fwd_ms:4.1f}%)", flush=True)
  tag = "quick" if args.quick else timing.device_info()["device"].replace(" ", "_")
  path = timing.write_json(
      os.path.join(args.out_dir, f"grouping-cost-{tag}-{datetime.date.today().isoformat()}.json"),
      {**timing.device_info(), "n": args.n, "heads": args.heads, "G": args.group_size,
       "implementation": impl or "default", "rows": rows})
  print("wrote", path)


if __name__ == "__main__":
  main()
