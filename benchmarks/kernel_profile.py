"""Per-kernel GPU time of one jitted call, from JAX's profiler: where an end-to-end call spends.

`prep_cost.py` times parts alone (each synchronised call carries its own launch and sync
overhead) and wholes; this reads the device's own kernel timestamps for a whole call, so
parts and whole come from one measurement. For each setting it traces `--calls` calls
after warm-up and reports, per kernel name, the mean time per call, and the GPU busy time
per call (sum of kernel times) next to the synchronised wall median.

    python -m benchmarks.kernel_profile [--n 16384 --d 128 --groups 4 --batch 1]   (GPU)
    python -m benchmarks.kernel_profile --quick                           (CPU smoke test)
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import tempfile
import warnings

import jax

from benchmarks import timing
import distrattention_jax as dj
from distrattention_jax import grouping
from distrattention_jax import lowrank

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")


SKIP_HOST = ("ThreadpoolListener", "SlinkyThreadPool", "ThunkExecutor")


def device_kernel_times(fn, args, calls):
  """({kernel name: total ns over `calls` calls}, {line name: event count}) from the
  trace's GPU planes (their per-stream kernel lines); on a CPU, from the host's XLA
  execute threads (a smoke test of the parsing, not a measurement)."""
  from jax._src.lib import _profile_data  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir):
      for _ in range(calls):
        jax.block_until_ready(fn(*args))
    paths = [os.path.join(root, f) for root, _, files in os.walk(log_dir)
             for f in files if f.endswith(".xplane.pb")]
    if not paths:
      raise RuntimeError(f"no .xplane.pb written under {log_dir}")
    data = _profile_data.ProfileData.from_file(paths[0])
  totals, lines = collections.Counter(), collections.Counter()
  gpu = [p for p in data.planes if p.name.startswith("/device:GPU")]
  for plane in gpu or [p for p in data.planes if p.name == "/host:CPU"]:
    for line in plane.lines:
      events = list(line.events)
      lines[f"{plane.name} {line.name}"] += len(events)
      if gpu and not line.name.startswith("Stream"):
        continue  # "XLA Modules" / "XLA Ops" summarise the same time
      if not gpu and not line.name.startswith("tf_XLAExecute"):
        continue
      for event in events:
        if not event.name.startswith(SKIP_HOST):
          totals[event.name] += event.duration_ns
  return totals, lines


def kernel_ms_per_call(fn, args, calls=20):
  """{kernel name: GPU ms per call} of `fn(*args)`, after one warm-up call (compile)."""
  jax.block_until_ready(fn(*args))
  totals, _ = device_kernel_times(fn, args, calls)
  return {name: ns / calls / 1e6 for name, ns in totals.items()}


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--n", type=int, default=16384)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--d", type=int, default=128)
  p.add_argument("--groups", type=int, default=4)
  p.add_argument("--calls", type=int, default=10)
  p.add_argument("--settings", default="cudnn,kernel,greedy,lowrank,fixedmaps")
  p.add_argument("--backward", action="store_true", help="forward and backward")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--tag", default="")
  p.add_argument("--out-dir", default="benchmarks/results")
  args = p.parse_args(argv)
  gpu = jax.default_backend() == "gpu"
  if args.quick:
    args.n, args.heads, args.d, args.calls = 256, 2, 32, 2
    args.settings = "cudnn,lowrank"
  impl = "mosaic" if gpu else "xla"
  g, n = args.groups, args.n
  sets = timing.make_inputs(args.batch, n, n, args.heads, args.d, jax.numpy.bfloat16, 2)
  q0, k0, _ = sets[0]
  fns = {}
  for name in args.settings.split(","):
    if name == "cudnn":
      fn = functools.partial(jax.nn.dot_product_attention,
                             implementation="cudnn" if gpu else "xla")
    elif name == "kernel":  # the attention kernel alone, on precomputed narrow Q, K
      from pallas_kernels.mosaic_gpu import attention as mosaic  # pylint: disable=import-outside-toplevel
      red = grouping.HeadReduction.from_maps(
          *lowrank.lowrank_maps(q0, k0, block_q=n, group_size=g, per_kv_head=True),
          block_q=n)
      sets_k = [(red.q_rep(q, args.d ** -0.5), red.k_fused(k), v) for q, k, v in sets]
      fns[name] = (mosaic.attention, sets_k)
      continue
    elif name in ("grams-xla", "grams-kernel"):  # the pre-pass's Grams of Q and K alone
      from distrattention_jax import prep  # pylint: disable=import-outside-toplevel
      kernel = name == "grams-kernel"
      fn = lambda q, k, v, kernel=kernel: (  # noqa: E731
          prep.head_grams(q, n, per_batch_row=True, kernel=kernel),
          prep.head_grams(k, n, per_batch_row=True, kernel=kernel))
    elif name == "fixedmaps":
      fixed = lowrank.calibrate_lowrank_maps(q0, k0, group_size=g, per_kv_head=True)
      fn = functools.partial(dj.distr_attention, group_size=g, block_q=None,
                             grouping="lowrank", implementation=impl, lowrank_maps=fixed)
    else:
      fn = functools.partial(dj.distr_attention, group_size=g, block_q=None, grouping=name,
                             implementation=impl)
    fns[name] = (fn, sets)
  info = timing.device_info()
  rows = {}
  path = os.path.join(args.out_dir, "kernel-profile-{}-{}{}-n{}-d{}-G{}{}{}.json".format(
      info["device"].replace(" ", "_"), info["date"][:10],
      f"-b{args.batch}" if args.batch != 1 else "", n, args.d, g,
      "-bwd" if args.backward else "", args.tag))
  for name, (fn, fn_sets) in fns.items():
    jitted = timing.loss_grad(fn) if args.backward else jax.jit(fn)
    wall = timing.time_fn(jitted, fn_sets, warmup=3, reps=10)
    totals, lines = device_kernel_times(jitted, fn_sets[0], args.calls)
    per_call = {k: v / args.calls / 1e6 for k, v in totals.most_common()}
    rows[name] = {"wall_ms": wall, "busy_ms": sum(per_call.values()), "kernels_ms": per_call,
                  "trace_lines": dict(lines)}
    print(f"{name}: wall {wall:.4f} ms, GPU busy {rows[name]['busy_ms']:.4f} ms", flush=True)
    for k, v in list(per_call.items())[:12]:
      print(f"    {v:8.4f} ms  {k[:110]}", flush=True)
    timing.write_json(path, {"info": info, "batch": args.batch, "n": n, "heads": args.heads,
                             "d": args.d, "group_size": g, "backward": args.backward, "rows": rows})
  print("wrote", path)


if __name__ == "__main__":
  main()
