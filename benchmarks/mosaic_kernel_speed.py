"""Kernel-level speed of our Mosaic GPU attention against cuDNN, in one process per group.

Times the kernels alone (Q pre-scaled, K_fused given; no grouping step): forward, and
forward+backward (jax.vjp with a random cotangent), medians of rounds after warm-up.
cuDNN is jax.nn.dot_product_attention(implementation="cudnn") at the full width d.
Each group runs in a child process with a time limit, so a hang costs one group only.

  PYTHONPATH=. python benchmarks/mosaic_kernel_speed.py --groups cudnn,d128,d256,variants
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

BATCH, HEADS, SEQ = 1, 16, 16384


def _groups():
  """name -> list of (label, d, G, tiles overrides or None); G=0 means cuDNN."""
  ours = lambda d, gs: [(f"ours d={d} G={g}", d, g, None) for g in gs]
  return {
      "cudnn": [("cudnn d=64", 64, 0, None), ("cudnn d=128", 128, 0, None),
                ("cudnn d=256", 256, 0, None)],
      "d128": ours(128, (1, 2, 4, 8)),
      "d256": ours(256, (2, 4, 8)),
      # Backward variants (timed forward+backward only).
      "variants": [
          ("d=128 G=1 fused bwd", 128, 1, {"fused_bwd": True}),
          ("d=128 G=4 split bwd", 128, 4, {"fused_bwd": False}),
          ("d=256 G=4 split bwd", 256, 4, {"fused_bwd": False}),
          ("d=128 G=4 fused block_q_dkv=128", 128, 4, {"block_q_dkv": 128}),
          ("d=128 G=8 fused block_q_dkv=64", 128, 8, {"block_q_dkv": 64, "block_kv_dq": 64}),
          ("d=128 G=4 fused stages_bwd=3", 128, 4, {"stages_bwd": 3}),
      ],
      # Wider key tiles for narrow scores, against the shipped forward (timed forward only).
      "fwd_block_kv": [
          ("d=128 G=4 block_kv=128", 128, 4, {"block_kv": 128}),
          ("d=128 G=4 block_kv=192", 128, 4, {"block_kv": 192}),
          ("d=128 G=4 block_kv=256", 128, 4, {"block_kv": 256}),
          ("d=128 G=8 block_kv=128", 128, 8, {"block_kv": 128}),
          ("d=128 G=8 block_kv=256", 128, 8, {"block_kv": 256}),
      ],
      # The same at d=64 (shipped: block_kv=256 for r <= 32), forward only.
      "fwd_block_kv_d64": [
          ("d=64 G=2", 64, 2, None),
          ("d=64 G=2 block_kv=128", 64, 2, {"block_kv": 128}),
          ("d=64 G=4", 64, 4, None),
          ("d=64 G=4 block_kv=128", 64, 4, {"block_kv": 128}),
      ],
      # Conditional O rescale (stale row max, Tiles.rescale_threshold) against the
      # shipped forward (timed forward only).
      "fwd_rescale": [
          ("d=128 G=4", 128, 4, None),
          ("d=128 G=4 rescale_threshold=8", 128, 4, {"rescale_threshold": 8.0}),
          ("d=128 G=8", 128, 8, None),
          ("d=128 G=8 rescale_threshold=8", 128, 8, {"rescale_threshold": 8.0}),
          ("d=128 G=1", 128, 1, None),
          ("d=128 G=1 rescale_threshold=8", 128, 1, {"rescale_threshold": 8.0}),
          ("d=64 G=4", 64, 4, None),
          ("d=64 G=4 rescale_threshold=8", 64, 4, {"rescale_threshold": 8.0}),
      ],
      # O stored from registers (Tiles.stage_out=False), which frees shared memory for
      # wider key tiles where O's staging buffer was what stopped them (timed forward only).
      "fwd_direct_out": [
          ("d=256 G=4", 256, 4, None),
          ("d=256 G=4 direct out", 256, 4, {"stage_out": False}),
          ("d=256 G=4 direct out block_kv=128", 256, 4, {"stage_out": False, "block_kv": 128}),
          ("d=256 G=8", 256, 8, None),
          ("d=256 G=8 direct out block_kv=128", 256, 8, {"stage_out": False, "block_kv": 128}),
          ("d=128 G=2", 128, 2, None),
          ("d=128 G=2 direct out block_kv=256", 128, 2, {"stage_out": False, "block_kv": 256}),
          ("d=128 G=4", 128, 4, None),
          ("d=128 G=4 direct out", 128, 4, {"stage_out": False}),
          ("d=128 G=1", 128, 1, None),
          ("d=128 G=1 rescale_threshold=8", 128, 1, {"rescale_threshold": 8.0}),
      ],
      # The table after the direct-out run: dv=256 at r=32 stages O (it fits at 128 keys).
      "fwd_table_d256": [
          ("d=256 G=8 (staged, block_kv=128)", 256, 8, None),
          ("d=256 G=8 direct out block_kv=128", 256, 8, {"stage_out": False}),
          ("d=256 G=4 (direct out, block_kv=128)", 256, 4, None),
          ("d=256 G=2", 256, 2, None),
      ],
      # Three consumer warpgroups in the backward kernels (64 queries / keys each; 160
      # registers a thread instead of 232), timed forward+backward.
      "bwd_wgs3": [
          ("d=128 G=4", 128, 4, None),
          ("d=128 G=4 compute_wgs_bwd=3", 128, 4, {"compute_wgs_bwd": 3}),
          ("d=128 G=1", 128, 1, None),
          ("d=128 G=1 compute_wgs_bwd=3", 128, 1, {"compute_wgs_bwd": 3}),
      ],
      # The exact (G=1) backward's tiles (timed forward+backward only).
      "g1_bwd": [
          ("d=128 G=1", 128, 1, None),
          ("d=128 G=1 block_kv_dq=128", 128, 1, {"block_kv_dq": 128}),
          ("d=128 G=1 block_q_dkv=128", 128, 1, {"block_q_dkv": 128}),
          ("d=128 G=1 stages_bwd=3", 128, 1, {"stages_bwd": 3}),
      ],
      # Forward variants (timed forward only).
      "fwd_variants": [
          ("d=256 G=4 stages=3", 256, 4, {"stages": 3}),
          ("d=128 G=4 stages=3", 128, 4, {"stages": 3, "block_kv": 128}),
      ],
  }


def _time(fn, args, rounds=5, iters=10):
  import jax
  jax.block_until_ready(fn(*args))  # compile
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / iters * 1e3)
  return statistics.median(times), min(times)


# Groups of backward variants: timed forward+backward only ("fwd_*" groups: forward only).
BACKWARD_GROUPS = ("variants", "g1_bwd", "bwd_wgs3")


def run_group(name, modes, out_path):
  import jax
  import jax.numpy as jnp
  from pallas_kernels.mosaic_gpu import attention as mosaic
  from pallas_kernels.mosaic_gpu import tiles as mosaic_tiles

  group_modes = (["fwd"] if name.startswith("fwd_") else
                 ["fwd+bwd"] if name in BACKWARD_GROUPS else modes)
  for label, d, group, overrides in _groups()[name]:
    for causal in (False, True):
      r = d if group == 0 else d // group
      dv = d
      ks = jax.random.split(jax.random.key(d + group), 4)
      q = (jax.random.normal(ks[0], (BATCH, SEQ, HEADS, r), jnp.float32)
           * d ** -0.5).astype(jnp.bfloat16)
      k = jax.random.normal(ks[1], (BATCH, SEQ, HEADS, r), jnp.bfloat16)
      v = jax.random.normal(ks[2], (BATCH, SEQ, HEADS, dv), jnp.bfloat16)
      do = jax.random.normal(ks[3], (BATCH, SEQ, HEADS, dv), jnp.bfloat16)
      tiles = None
      if group == 0:
        attn = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn")
      else:
        tiles = mosaic_tiles.pick_tiles(r, dv, jnp.bfloat16)
        if overrides:
          tiles = dataclasses.replace(tiles, **overrides)
        attn = lambda q, k, v, tiles=tiles: mosaic.attention(q, k, v, causal=causal,
                                                             tiles=tiles)
      fns = {
          "fwd": jax.jit(attn),
          "fwd+bwd": jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do)),
      }
      for mode in group_modes:
        args = (q, k, v) if mode == "fwd" else (q, k, v, do)
        row = dict(label=label, d=d, G=group, r=r, dv=dv, causal=causal, mode=mode,
                   tiles=None if tiles is None else dataclasses.asdict(tiles))
        try:
          row["ms"], row["ms_min"] = _time(fns[mode], args)
        except Exception as e:  # record and go on (e.g. shared memory overflow)
          row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(row), flush=True)
        with open(out_path, "a") as f:
          f.write(json.dumps(row) + "\n")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--groups", default="cudnn,d128,d256")
  parser.add_argument("--modes", default="fwd,fwd+bwd")
  parser.add_argument("--json", default=None,
                      help="default: benchmarks/results/mosaic-kernel-speed-DEVICE-DATE.json")
  parser.add_argument("--group-timeout", type=float, default=240)
  parser.add_argument("--child", default=None)
  parser.add_argument("--rows", default=None)
  args = parser.parse_args()
  modes = args.modes.split(",")
  if args.child:
    run_group(args.child, modes, args.rows)
    return

  import jax
  if args.json is None:
    device = jax.devices()[0].device_kind.replace(" ", "_")
    args.json = (f"benchmarks/results/mosaic-kernel-speed-{device}-"
                 f"{datetime.date.today().isoformat()}.json")
  rows_path = args.json + ".rows"
  if os.path.exists(rows_path):
    os.remove(rows_path)
  status = {}
  for name in args.groups.split(","):
    cmd = [sys.executable, __file__, "--child", name, "--rows", rows_path, "--modes",
           args.modes]
    try:
      proc = subprocess.run(cmd, timeout=args.group_timeout)
      status[name] = proc.returncode
    except subprocess.TimeoutExpired:
      status[name] = "timeout"
    print(f"group {name}: {status[name]}", flush=True)
  rows = []
  if os.path.exists(rows_path):
    with open(rows_path) as f:
      rows = [json.loads(line) for line in f]
    os.remove(rows_path)
  result = dict(
      device=jax.devices()[0].device_kind, date=datetime.datetime.now(
          datetime.timezone.utc).isoformat(timespec="minutes"),
      jax=jax.__version__, batch=BATCH, heads=HEADS, seq=SEQ, dtype="bfloat16",
      groups=status, rows=rows)
  os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(result, f, indent=1)
  print_table(result)


def print_table(result):
  rows = [r for r in result["rows"] if "ms" in r]
  cudnn = {(r["d"], r["causal"], r["mode"]): r["ms"] for r in rows if r["G"] == 0}
  print(f"{result['device']}  jax {result['jax']}  {result['date']}  B={result['batch']} "
        f"H={result['heads']} N={result['seq']} bf16 (ms, cuDNN/ours)")
  for r in rows:
    base = cudnn.get((r["d"], r["causal"], r["mode"]))
    ratio = f"{base / r['ms']:.2f}x" if base and r["G"] else ""
    print(f"{r['label']:<40} causal={int(r['causal'])} {r['mode']:<8} {r['ms']:8.3f} {ratio}")
  for r in result["rows"]:
    if "error" in r:
      print("ERROR", r["label"], r["causal"], r["mode"], r["error"][:200])


if __name__ == "__main__":
  main()
