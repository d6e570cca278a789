"""Device memory of DistrAttention vs cuDNN, from XLA's compiled memory analysis.

python -m benchmarks.memory [--n 16384 65536 131072]

For each implementation and length: the bytes XLA allocates for the compiled forward and
forward+backward (temporaries + outputs, arguments excluded), which is what grows with
N. Linear growth means no N x N buffer. Writes benchmarks/results/memory-<device>-<date>.json.
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

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--n", type=int, nargs="+", default=[16384, 65536, 131072])
  p.add_argument("--d", type=int, default=128)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--out-dir", default="benchmarks/results")
  p.add_argument("--quick", action="store_true")
  args = p.parse_args(argv)
  gpu = jax.default_backend() == "gpu"
  if args.quick:
    args.n, args.d, args.heads = [128, 256], 32, 2
  impl = "pallas" if gpu else "pallas_interpret"
  fns = {
      "ours G=1": functools.partial(dj.distr_attention, group_size=1, implementation=impl),
      "distr G=4 bq=64": functools.partial(dj.distr_attention, group_size=4, block_q=64,
                                           implementation=impl, grouping="greedy"),
      "distr G=4 bq=1024": functools.partial(dj.distr_attention, group_size=4,
                                             block_q=1024, implementation=impl,
                                             grouping="greedy"),
  }
  if gpu:
    fns["cudnn"] = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
    fns["cudnn-distr G=4 bq=64"] = functools.partial(
        dj.distr_attention, group_size=4, block_q=64, implementation="cudnn",
        grouping="greedy")
    # Our Hopper kernels: exact (G=1), and one lowrank factorisation (the default) or greedy
    # grouping per sequence; greedy with 1024-row grouping blocks streams one K_fused per
    # block (N^2 / block_q).
    mosaic = functools.partial(dj.distr_attention, implementation="mosaic")
    fns["mosaic G=1"] = functools.partial(mosaic, group_size=1)
    fns["mosaic lowrank G=4 bq=N"] = functools.partial(mosaic, group_size=4)
    fns["mosaic greedy G=4 bq=N"] = functools.partial(mosaic, group_size=4, grouping="greedy")
    fns["mosaic greedy G=4 bq=1024"] = functools.partial(mosaic, group_size=4, block_q=1024,
                                                         grouping="greedy")
  rows = []
  for n in args.n:
    spec = jax.ShapeDtypeStruct((1, n, args.heads, args.d), jnp.bfloat16)
    if gpu:  # one grouping per sequence: the d/G-wide cuDNN call
      fns["cudnn-distr G=4 bq=N"] = functools.partial(
          dj.distr_attention, group_size=4, block_q=n, implementation="cudnn",
          grouping="greedy")
    for name, fn in fns.items():
      for mode in ("fwd", "fwdbwd"):
        f = jax.jit(fn) if mode == "fwd" else timing.loss_grad(fn)
        try:
          mem = f.lower(spec, spec, spec).compile().memory_analysis()
          used = mem.temp_size_in_bytes + mem.output_size_in_bytes
        except Exception as e:  # noqa: BLE001
          print(f"{name} n={n} {mode}: {type(e).__name__}: {str(e)[:150]}")
          used = None
        inputs = 3 * n * args.heads * args.d * 2
        rows.append({"impl": name, "n": n, "mode": mode, "bytes": used, "input_bytes": inputs})
        print(f"{name:20s} n={n:7d} {mode:7s} "
              f"{'-' if used is None else f'{used / 2**20:10.1f} MiB ({used / inputs:.2f}x inputs)'}",
              flush=True)
  tag = "quick" if args.quick else timing.device_info()["device"].replace(" ", "_")
  path = timing.write_json(
      os.path.join(args.out_dir, f"memory-{tag}-{datetime.date.today().isoformat()}.json"),
      {**timing.device_info(), "d": args.d, "heads": args.heads, "rows": rows})
  print("wrote", path)


if __name__ == "__main__":
  main()
