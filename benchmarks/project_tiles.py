"""The Mosaic row projection kernel's GPU time per pipeline shape (GPU only).

`pallas_kernels.mosaic_gpu.project.project_rows` at B=1, H=16, N=16384, d=128, r=32,
bf16 (`K_fused` of the lowrank pre-pass, issue 14's shape) for several (stages, row tiles
per CTA, consumer warpgroups). 64 MiB of K is read; GPU time per call from the device's
kernel timestamps (`kernel_profile`), with the HBM read rate. Results:
docs/KERNEL_NOTES.md, "Eleventh session".

    python -m benchmarks.project_tiles [--tag=-s11] [--out-dir benchmarks/results]   (GPU)
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import kernel_profile
from benchmarks import timing
from pallas_kernels.mosaic_gpu import project

# (stages, tiles per CTA, consumers); None: the kernel's choice. The first is the default.
VARIANTS = ((None, None, 1), (2, None, 1), (3, None, 1), (4, 16, 1), (2, 4, 1),
            (None, None, 2), (3, None, 2), (2, None, 2), (2, 16, 2), (4, 16, 2),
            (2, 4, 2))


def _time(x, w, tiles, calls=20):
  fn = jax.jit(lambda x, w: project.project_rows(x, w, tiles=tiles))
  return kernel_profile.kernel_ms_per_call(fn, (x, w), calls)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--tag", default="")
  p.add_argument("--out-dir", default="benchmarks/results")
  p.add_argument("--calls", type=int, default=20)
  p.add_argument("--only", default="", help="comma-separated variant names (s2-tNone-c1 ...)")
  args = p.parse_args(argv)
  only = set(filter(None, args.only.split(",")))
  _, k, _ = timing.make_inputs(1, 16384, 16384, 16, 128, jnp.bfloat16, 1)[0]
  w = jnp.asarray(np.random.default_rng(0).standard_normal((1, 16, 128, 32)) / 8,
                  jnp.float32)
  want = project._project_reference(k, w).astype(jnp.float32)
  rows = {}
  for stages, per_cta, consumers in VARIANTS:
    name = f"s{stages}-t{per_cta}-c{consumers}"
    if only and name not in only:
      continue
    tiles = project.ProjectTiles(stages, per_cta, consumers)
    try:
      got = project.project_rows(k, w, tiles=tiles).astype(jnp.float32)
      err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
      row = _time(k, w, tiles, args.calls)
      ms = row.get("distr_project_mosaic_gpu_kernel", float("nan"))
      rows[name] = {"kernels_ms": row, "ms": ms, "rel_error": err,
                    "tb_per_s": k.size * k.dtype.itemsize / ms / 1e9}
    except Exception as e:  # noqa: BLE001  (a shape that does not fit: recorded)
      rows[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    print(name, rows[name], flush=True)
  info = timing.device_info()
  path = "{}/project-tiles-{}-{}{}.json".format(
      args.out_dir, info["device"].replace(" ", "_"), info["date"][:10], args.tag)
  timing.write_json(path, {"info": info, "shape": [1, 16384, 16, 128], "r": 32,
                           "rows": rows})
  print("wrote", path)


if __name__ == "__main__":
  main()
