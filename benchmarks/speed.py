"""Speed of DistrAttention against exact attention, one process, one run.

GPU:   python -m benchmarks.speed                      (B=1, H=16, bf16; see --help)
CPU:   python -m benchmarks.speed --quick              (tiny shapes, smoke test)

Times forward and forward+backward (`jax.grad` of a sum) for: DistrAttention through our
Mosaic GPU kernels ("mosaic-distr", one grouping per sequence or per `--block-q-large`
rows; "mosaic-lowrank" with grouping="lowrank"), through cuDNN ("cudnn-distr"), and with
G in {2, 4} through our Triton kernels on the accurate path (grouping block = kernel tile, `--block-q-small`) and the
fast path (grouping block `--block-q-large`), our G=1, cuDNN, XLA (where it fits), JAX's
Pallas `mha`, and tokamax (if importable). Warm-up, medians, rotated inputs. Writes
`benchmarks/results/speed-<device>-<date>.json` and PNG plots.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
import warnings

import jax
import jax.numpy as jnp

from benchmarks import timing
import distrattention_jax as dj
from distrattention_jax import grouping as grouping_lib

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")
warnings.filterwarnings("ignore", message=".*pallas.ops.gpu.attention is deprecated")


def implementations(args, n, d, causal, gpu):
  """name -> fn(q, k, v) for everything timed at this shape."""
  impl = "pallas" if gpu else "pallas_interpret"
  fns = {}
  # "distr": the greedy grouping ("lowrank" rows name it).
  distr = functools.partial(dj.distr_attention, is_causal=causal, implementation=impl,
                            grouping="greedy")
  fns["ours G=1"] = functools.partial(distr, group_size=1)
  for g in args.groups:
    if d % g == 0:
      fns[f"distr G={g} bq={args.block_q_small}"] = functools.partial(
          distr, group_size=g, block_q=args.block_q_small)
      fns[f"distr G={g} bq={args.block_q_large}"] = functools.partial(
          distr, group_size=g, block_q=args.block_q_large)
  fns["xla"] = functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                                 implementation="xla")
  if gpu:
    cudnn = functools.partial(dj.distr_attention, is_causal=causal, implementation="cudnn",
                              grouping="greedy")
    for g in args.groups:
      if d % g == 0:
        # One grouping per sequence: the d/G-wide cuDNN call ("narrow").
        fns[f"cudnn-distr G={g} bq=N"] = functools.partial(cudnn, group_size=g, block_q=n)
        # Small grouping blocks: exact cuDNN on Q_exp ("expand").
        fns[f"cudnn-distr G={g} bq={args.block_q_small}"] = functools.partial(
            cudnn, group_size=g, block_q=args.block_q_small)
    mosaic = functools.partial(dj.distr_attention, is_causal=causal, implementation="mosaic",
                               grouping="greedy")
    fns["mosaic G=1"] = functools.partial(mosaic, group_size=1)
    for g in args.groups:
      if d % g == 0:
        # One grouping per sequence (one kernel call), and grouping blocks of
        # --block-q-large rows (K_fused per block, one call per block).
        fns[f"mosaic-distr G={g} bq=N"] = functools.partial(mosaic, group_size=g, block_q=n)
        fns[f"mosaic-distr G={g} bq={args.block_q_large}"] = functools.partial(
            mosaic, group_size=g, block_q=args.block_q_large)
        if "lowrank" in grouping_lib.grouping_names():
          fns[f"mosaic-lowrank G={g} bq=N"] = functools.partial(
              mosaic, group_size=g, block_q=n, grouping="lowrank")
    fns["cudnn"] = functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                                     implementation="cudnn")
    try:
      from jax.experimental.pallas.ops.gpu import attention as jax_mha
      fns["jax pallas mha"] = lambda q, k, v: jax_mha.mha(
          q, k, v, None, sm_scale=d ** -0.5, causal=causal)
    except ImportError as e:
      print("jax mha unavailable:", e, file=sys.stderr)
    try:
      import tokamax
      for name in ("triton", "mosaic"):
        fns[f"tokamax {name}"] = functools.partial(
            tokamax.dot_product_attention, is_causal=causal, implementation=name)
    except Exception as e:  # noqa: BLE001  (not installed, or a dependency missing)
      print(f"tokamax unavailable ({type(e).__name__}: {e}): skipped", file=sys.stderr)
  return fns


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
  p.add_argument("--d", type=int, nargs="+", default=[64, 128])
  p.add_argument("--groups", type=int, nargs="+", default=[2, 4])
  p.add_argument("--causal", type=int, nargs="+", default=[0, 1])
  p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"])
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--block-q-small", type=int, default=64)
  p.add_argument("--block-q-large", type=int, default=1024)
  p.add_argument("--xla-max-n", type=int, default=8192)
  p.add_argument("--only", default=None, help="comma-separated substrings of names to run")
  p.add_argument("--exact", action="store_true", help="--only lists whole names")
  p.add_argument("--quick", action="store_true", help="tiny CPU shapes (smoke test)")
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--min-time", type=float, default=0.3, help="seconds of timed calls, at least")
  p.add_argument("--calls-per-sync", type=int, default=1,
                 help="calls dispatched back to back per synchronisation (timing.time_fn)")
  p.add_argument("--tag", default="", help="suffix of the output file names")
  p.add_argument("--out-dir", default="benchmarks/results")
  args = p.parse_args(argv)
  gpu = jax.default_backend() == "gpu"
  if args.quick:
    args.n, args.d, args.heads, args.causal = [128], [32], 2, [0]
    args.block_q_small, args.block_q_large = 16, 64
  info = timing.device_info()
  rows = []
  for d in args.d:
    for n in args.n:
      sets = timing.make_inputs(args.batch, n, n, args.heads, d, jnp.bfloat16, 1 if args.quick else 3)
      for causal in map(bool, args.causal):
        fns = implementations(args, n, d, causal, gpu and not args.quick)
        for name, fn in fns.items():
          if args.only and not any((s == name) if args.exact else (s in name)
                                   for s in args.only.split(",")):
            continue
          if name == "xla" and n > args.xla_max_n:
            continue
          for mode in args.modes:
            f = jax.jit(fn) if mode == "fwd" else timing.loss_grad(fn)
            try:
              ms = timing.time_fn(f, sets, warmup=1 if args.quick else 3,
                                  reps=2 if args.quick else args.reps,
                                  min_time_s=0 if args.quick else args.min_time,
                                  calls_per_sync=args.calls_per_sync)
            except Exception as e:  # noqa: BLE001  (OOM, unsupported: recorded, not fatal)
              print(f"{name} n={n} d={d} causal={causal} {mode}: {type(e).__name__}: "
                    f"{str(e)[:200]}", file=sys.stderr)
              ms = None
            flops = timing.attention_flops(args.batch, args.heads, n, n, d, causal,
                                           backward=mode == "fwdbwd")
            tflops = None if ms is None else flops / ms / 1e9
            rows.append({"impl": name, "n": n, "d": d, "causal": causal, "mode": mode,
                         "ms": ms, "tflops_equiv": tflops})
            print(f"{name:28s} n={n:6d} d={d:4d} causal={int(causal)} {mode:7s} "
                  f"{'-' if ms is None else f'{ms:9.3f} ms  {tflops:6.1f} TF/s'}", flush=True)
  # Ratios against cuDNN and our G=1 at the same shape.
  index = {(r["impl"], r["n"], r["d"], r["causal"], r["mode"]): r["ms"] for r in rows}
  for r in rows:
    for base in ("cudnn", "ours G=1"):
      b = index.get((base, r["n"], r["d"], r["causal"], r["mode"]))
      r[f"speedup_vs_{base}"] = (b / r["ms"]) if (b and r["ms"]) else None
  tag = ("quick" if args.quick else info["device"].replace(" ", "_")) + args.tag
  day = datetime.date.today().isoformat()
  path = timing.write_json(os.path.join(args.out_dir, f"speed-{tag}-{day}.json"),
                           {**info, "batch": args.batch, "heads": args.heads,
                            "dtype": "bfloat16", "args": vars(args), "rows": rows})
  print("wrote", path)
  plot(rows, os.path.join(args.out_dir, f"speed-{tag}-{day}.png"))


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  keys = sorted({(r["d"], r["causal"], r["mode"]) for r in rows})
  fig, axes = plt.subplots(2, len(keys), figsize=(4.2 * len(keys), 7), squeeze=False)
  for col, (d, causal, mode) in enumerate(keys):
    sub = [r for r in rows if (r["d"], r["causal"], r["mode"]) == (d, causal, mode)]
    for impl in sorted({r["impl"] for r in sub}):
      pts = sorted((r["n"], r["ms"], r.get("speedup_vs_cudnn")) for r in sub
                   if r["impl"] == impl and r["ms"])
      if not pts:
        continue
      axes[0, col].plot([x[0] for x in pts], [x[1] for x in pts], marker="o", label=impl)
      sp = [(x[0], x[2]) for x in pts if x[2]]
      if sp:
        axes[1, col].plot([x[0] for x in sp], [x[1] for x in sp], marker="o", label=impl)
    axes[0, col].set(xscale="log", yscale="log", title=f"d={d} causal={causal} {mode}",
                     xlabel="sequence length", ylabel="ms")
    axes[1, col].set(xscale="log", xlabel="sequence length", ylabel="speed-up over cuDNN")
    axes[1, col].axhline(1.0, color="k", lw=0.5)
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print("wrote", path)


if __name__ == "__main__":
  main()
