"""The Mosaic Gram kernel's GPU time per tiling (GPU only).

`pallas_kernels.mosaic_gpu.grams.gram_blocks_multi` of Q and K in one launch at B=1,
H=16, N=16384, d=128, bf16 (one Gram per sequence, as in the lowrank pre-pass), for
several (tile rows, pipeline stages, splits), and once on a head-contiguous copy of the
same data (`[B * H, T, 1, d]`: does the BTNH layout's strided rows cost bandwidth?). GPU
time per call from the device's kernel timestamps (`kernel_profile`). Results:
docs/KERNEL_NOTES.md, "Ninth session".

    python -m benchmarks.gram_tiles [--tag=-s9] [--out-dir benchmarks/results]   (GPU)
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp

from benchmarks import kernel_profile
from benchmarks import timing
from pallas_kernels.mosaic_gpu import grams

# (tile rows, stages, splits or None for the kernel's choice[, consumer warpgroups]), Q
# and K in one launch (the default; "per-array" below: one launch each); the first is the
# default. --only picks some by name.
VARIANTS = ((128, 4, None), (128, 2, None), (128, 5, None), (64, 4, None), (64, 8, None),
            (256, 2, None), (128, 4, 2), (128, 4, 8),
            (128, 4, None, 2), (128, 3, None, 2), (256, 2, None, 2), (64, 8, None, 2))
CONTIGUOUS = ((128, 4), (256, 2))


def _time(q, k, tiles, splits, calls=20):
  n = q.shape[1]
  fn = jax.jit(lambda q, k: grams.gram_blocks_multi(
      (q, k), block_rows=(n, n), num_blocks=(1, 1), splits=splits, tiles=tiles))
  return kernel_profile.kernel_ms_per_call(fn, (q, k), calls)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--tag", default="")
  p.add_argument("--out-dir", default="benchmarks/results")
  p.add_argument("--only", default="", help="comma-separated variant names")
  p.add_argument("--no-contiguous", action="store_true")
  args = p.parse_args(argv)
  only = set(filter(None, args.only.split(",")))
  q, k, _ = timing.make_inputs(1, 16384, 16384, 16, 128, jnp.bfloat16, 1)[0]
  rows = {}
  for rows_, stages, splits, *consumers in VARIANTS:
    consumers = consumers[0] if consumers else 1
    name = f"t{rows_}-s{stages}-sp{splits}" + (f"-c{consumers}" if consumers > 1 else "")
    if only and name not in only:
      continue
    try:
      rows[name] = _time(q, k, grams.GramTiles(rows_, stages, consumers,
                                               launch_per_array=False), splits)
    except Exception as e:  # noqa: BLE001  (a tiling that does not fit: recorded)
      rows[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    print(name, rows[name], flush=True)
  qc, kc = (jnp.transpose(x, (0, 2, 1, 3)).reshape(16, 16384, 1, 128) for x in (q, k))
  for rows_, stages in () if args.no_contiguous else CONTIGUOUS:
    name = f"contiguous-t{rows_}-s{stages}"
    rows[name] = _time(qc, kc, grams.GramTiles(rows_, stages, launch_per_array=False), None)
    print(name, rows[name], flush=True)
  # One launch per array (GramTiles.launch_per_array): Q's Grams, then K's.
  if not only or "per-array" in only:
    rows["per-array"] = _time(q, k, grams.GramTiles(launch_per_array=True), None)
    print("per-array", rows["per-array"], flush=True)
  info = timing.device_info()
  path = os.path.join(args.out_dir, "gram-tiles-{}-{}{}.json".format(
      info["device"].replace(" ", "_"), info["date"][:10], args.tag))
  timing.write_json(path, {"info": info, "rows": rows})
  print("wrote", path)


if __name__ == "__main__":
  main()
