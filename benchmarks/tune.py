"""Sweeps kernel tile sizes on the GPU and prints the best per (layout, d, G).

python -m benchmarks.tune --out benchmarks/results/tune.json
The winners go into pallas_kernels/triton/tiles.py (TABLE), with the device and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import sys
import warnings

import jax
import jax.numpy as jnp

from benchmarks import timing
from distrattention_jax import config, grouping
from distrattention_jax.backends import triton as triton_backend
from pallas_kernels.triton import tiles as tiles_lib

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--n", type=int, default=16384)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--cases", default="128:1:64,128:4:64,128:4:128,128:4:1024,64:2:64,64:2:1024")
  p.add_argument("--backward", action="store_true")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  results = []
  for case in args.cases.split(","):
    d, g, bq = map(int, case.split(":"))
    sets = timing.make_inputs(1, args.n, args.n, args.heads, d, jnp.bfloat16, 2)
    cudnn = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
    cudnn = timing.loss_grad(cudnn) if args.backward else jax.jit(cudnn)
    print(f"d={d} cudnn {'fwd+bwd' if args.backward else 'fwd'} "
          f"{timing.time_fn(cudnn, sets, warmup=3, reps=20):.3f} ms", flush=True)
    masks = config.Masks()
    grid = []
    if args.backward:
      for bm, bk, w, s in itertools.product((64, 128), (64, 128), (4,), (1, 2)):
        grid.append(tiles_lib.Tiles(block_m=64, block_k=64, num_warps=4, num_stages=2,
                                    block_m_bwd=bm, block_k_bwd=bk, num_warps_bwd=w,
                                    num_stages_bwd=s))
    else:
      for bm, bk, w, s in itertools.product((64, 128), (64, 128), (4, 8), (2, 3)):
        grid.append(tiles_lib.Tiles(block_m=bm, block_k=bk, num_warps=w, num_stages=s))
    for t in grid:
      if g > 1 and bq < triton_backend.FUSED_MIN_BLOCK_Q and t.block_m != min(bq, 128) and not args.backward:
        continue  # the gather layout's query tile is the grouping block

      def fn(q, k, v, t=t):
        reduction = None if g == 1 else grouping.HeadReduction.from_permutation(
            grouping.block_permutations(q, block_q=bq, group_size=g), group_size=g,
            block_q=bq)
        return triton_backend.distr_attention_triton(q, k, v, reduction, masks,
                                                     scale=d ** -0.5, tiles=t)
      f = timing.loss_grad(fn) if args.backward else jax.jit(fn)
      try:
        ms = timing.time_fn(f, sets, warmup=3, reps=20, min_time_s=0.25)
      except Exception as e:  # noqa: BLE001  (shared-memory overflow etc.: skip config)
        print(f"d={d} G={g} bq={bq} {t}: FAILED {type(e).__name__}: {str(e)[:120]}",
              file=sys.stderr)
        continue
      results.append({"d": d, "G": g, "block_q": bq, "tiles": dataclasses.asdict(t), "ms": ms})
      print(f"d={d} G={g} bq={bq} {'bwd' if args.backward else 'fwd'} "
            f"{dataclasses.astuple(t)} {ms:.3f} ms", flush=True)
    best = min((r for r in results if (r["d"], r["G"], r["block_q"]) == (d, g, bq)),
               key=lambda r: r["ms"], default=None)
    if best:
      print("BEST", case, dataclasses.astuple(tiles_lib.Tiles(**best["tiles"])), f"{best['ms']:.3f} ms",
            flush=True)
  if args.out:
    timing.write_json(args.out, {**timing.device_info(), "n": args.n, "results": results})


if __name__ == "__main__":
  main()
