"""Compile time, run time and accuracy of the lowrank factorisation program's variants.

The fused program (`pallas_kernels/triton/lowrank_factor.py`) is a latency-bound chain
of small matmuls; how Triton compiles those matmuls (IEEE float32 on the FMA units,
fully unrolled, or TF32x3 on tensor cores) and the warp count decide both its compile
time and its speed. Phase 1 compiles every variant in its own process, in parallel,
into JAX's persistent compilation cache (a compile that runs past `--compile-timeout`
is reported as such); phase 2 times the variants that compiled, one after another in
one process (cache hits), on 16 programs (B=1, H=16, one factorisation per sequence),
and measures the relative score error of their maps against the optimum (numpy SVD of
the explicit scores) on structured data.

    python -m benchmarks.lowrank_kernel_variants            (GPU)
    python -m benchmarks.lowrank_kernel_variants --quick    (CPU smoke test, interpreted)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")

# (d, r, num_warps, precision of the d-deep products, of the r x r ones, steps, block_d
#  [, plan: Newton-Schulz polynomials per half step, lowrank_factor.factor_pair])
# Rows from before the sixth session named their plan by inner / final polynomial counts
# and whether the start was orthonormalised: "-i4-f7" with the start is the plan
# (4, 4, 4, 4, 7), "-nostart" drops the first 4. Their results are in the JSON files of
# 2026-12-06 (runs 1-6) under those names.
OLD_DEFAULT = (4, 4, 4, 4, 7)   # the plan shipped until the sixth session
VARIANTS = [
    (128, 32, 4, "tf32x3", "ieee", 4, 128), (128, 32, 4, "tf32x3", "ieee", 2, 128),
    (128, 32, 4, "tf32x3", "tf32x3", 2, 128), (128, 32, 2, "tf32x3", "ieee", 2, 128),
    (128, 32, 8, "tf32x3", "ieee", 2, 128), (128, 32, 4, "tf32x3", "ieee", 2, 64),
    (64, 16, 4, "ieee", "ieee", 2, 64), (64, 16, 4, "tf32x3", "ieee", 2, 64),
    (64, 16, 2, "ieee", "ieee", 2, 64),
    (256, 64, 4, "tf32x3", "ieee", 2, 128), (256, 64, 4, "tf32x3", "ieee", 2, 64),
    (256, 64, 8, "tf32x3", "ieee", 2, 64),
    (128, 64, 4, "tf32x3", "ieee", 2, 128), (128, 64, 8, "tf32x3", "ieee", 2, 64),
    # r=64 with its r x r products on tensor cores too: IEEE r x r dots are unrolled FMA
    # code 8x larger than at r=32. Fourth session, 2026-12-06: d=128 compiles in 39 s (4
    # warps) / 28 s (8), 0.240 / 0.275 ms of GPU time, error 0.0539 (optimum 0.0511): no
    # faster than the XLA-ops iteration it would replace, plus the compile; d=256 > 120 s.
    (128, 64, 4, "tf32x3", "tf32x3", 2, 128), (256, 64, 4, "tf32x3", "tf32x3", 2, 64),
    (128, 64, 8, "tf32x3", "tf32x3", 2, 128), (256, 64, 8, "tf32x3", "tf32x3", 2, 64),
    # 8 warps (shipped since 2026-12-06); one-pass TF32 r x r products and TF32 everywhere
    # (run 5, 2026-12-06: both NaN, rejected)
    (128, 32, 8, "tf32x3", "tf32", 2, 128), (128, 32, 8, "tf32", "tf32", 2, 128),
    (64, 16, 8, "tf32x3", "ieee", 2, 64), (64, 16, 8, "tf32x3", "tf32", 2, 64),
    # shorter chains (run 6, 2026-12-06; docs/KERNEL_NOTES.md): 3 inner / 6 final
    # polynomials, the start not orthonormalised, both
    (128, 32, 8, "tf32x3", "ieee", 2, 128, (3, 3, 3, 3, 7)),
    (128, 32, 8, "tf32x3", "ieee", 2, 128, (4, 4, 4, 4, 6)),
    (128, 32, 8, "tf32x3", "ieee", 2, 128, (3, 3, 3, 3, 6)),
    (128, 32, 8, "tf32x3", "ieee", 2, 128, (0, 4, 4, 4, 7)),
    (128, 32, 8, "tf32x3", "ieee", 2, 128, (0, 3, 3, 3, 6)),
    (64, 16, 8, "tf32x3", "ieee", 2, 64, (0, 3, 3, 3, 6)),
    # sixth session: the plan from a query-coefficient start (the default since), its
    # cheaper and one-step neighbours, the old default with the in-program trace scaling,
    # 16 warps, and tensor-core r x r products at 8 warps
    (128, 32, 8, "tf32x3", "ieee", 2, 128, OLD_DEFAULT),
    (128, 32, 8, "tf32x3", "ieee", 2, 128, (0, 3, 3, 7)),
    (128, 32, 8, "tf32x3", "ieee", 1, 128),
    (128, 32, 16, "tf32x3", "ieee", 2, 128),
    (128, 32, 8, "tf32x3", "tf32x3", 2, 128),
    (64, 16, 8, "tf32x3", "ieee", 2, 64, OLD_DEFAULT),
]


def _full(v):
  """The variant with its plan filled in (the steps' default plan)."""
  from pallas_kernels.triton import lowrank_factor  # pylint: disable=import-outside-toplevel
  return tuple(v[:7]) + (tuple(v[7]) if len(v) > 7 else lowrank_factor.plan_for_steps(v[5]),)


def _name(v):
  name = "d{}-r{}-w{}-{}-{}-s{}-b{}".format(*v[:7])
  return name + ("-p" + "".join(map(str, v[7])) if len(v) > 7 else "")


def _data(d, n=2048, heads=16, seed=0):
  """Structured Q, K `[heads, n, d]` (noisy copies of a few prototype columns)."""
  rng = np.random.default_rng(seed + d)
  q = rng.standard_normal((heads, n, 8))[..., rng.integers(0, 8, d)] + \
      0.3 * rng.standard_normal((heads, n, d))
  k = rng.standard_normal((heads, n, 8))[..., rng.integers(0, 8, d)] + \
      0.5 * rng.standard_normal((heads, n, d))
  return q, k


def _fn(v, interpret=False):
  from pallas_kernels.triton import lowrank_factor  # pylint: disable=import-outside-toplevel
  _, r, warps, precision, small, _, block_d, plan = _full(v)
  return jax.jit(lambda gq, gk: lowrank_factor.factor_grams_kernel(
      gq, gk, rank=r, plan=plan, num_warps=warps, precision=precision,
      small_precision=small, block_d=block_d, interpret=interpret))


def _steep(d, n=512, heads=4, alpha=2.0, seed=0):
  """Q, K `[heads, n, d]` with singular values falling as i^-alpha (a ~1e6 range within
  r at alpha=2) and a shared key mean: where shorter Newton-Schulz chains lose first."""
  rng = np.random.default_rng(seed + 10 * d)
  sv = np.arange(1, d + 1) ** -alpha
  def one():
    return (rng.standard_normal((n, d)) * sv) @ np.linalg.qr(rng.standard_normal((d, d)))[0]
  q = np.stack([one() for _ in range(heads)])
  k = np.stack([one() + 3.0 * rng.standard_normal(d) for _ in range(heads)])
  return q, k


def _rel_errors(q, k, a, b, rank, heads=4):
  """Mean relative score error of the maps and of the optimum over the first heads."""
  rel, best = [], []
  for h in range(min(heads, q.shape[0])):
    s = q[h] @ k[h].T
    sv = np.linalg.svd(s, compute_uv=False)
    rel.append(np.linalg.norm((q[h] @ a[h]) @ (k[h] @ b[h]).T - s) / np.linalg.norm(s))
    best.append(np.sqrt(np.sum(sv[rank:] ** 2)) / np.linalg.norm(s))
  return float(np.mean(rel)), float(np.mean(best))


def _grams(q, k):
  gq = jnp.asarray(np.einsum("hnd,hne->hde", q, q), jnp.float32)
  gk = jnp.asarray(np.einsum("hnd,hne->hde", k, k), jnp.float32)
  return gq, gk


def compile_one(v):
  q, k = _data(v[0])
  gq, gk = _grams(q, k)
  t0 = time.perf_counter()
  _fn(v).lower(gq, gk).compile()
  return time.perf_counter() - t0


def time_and_check(v, reps=20, n=2048, heads=16, interpret=False):
  q, k = _data(v[0], n=n, heads=heads)
  gq, gk = _grams(q, k)
  fn = _fn(v, interpret)
  t0 = time.perf_counter()
  a, b = jax.block_until_ready(fn(gq, gk))
  first = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(gq, gk))
    times.append(time.perf_counter() - t0)
  gpu_ms = None
  if not interpret:  # the program's own GPU time (the wall median carries launch + sync)
    from benchmarks import kernel_profile  # pylint: disable=import-outside-toplevel
    totals, _ = kernel_profile.device_kernel_times(fn, (gq, gk), reps)
    gpu_ms = sum(totals.values()) / reps / 1e6
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  rel, best = _rel_errors(q, k, a, b, v[1])
  # The Grams keep their shape, so no new compile (run 6 drew 4 heads: other data).
  qs, ks = _steep(v[0], n=min(n, 512), heads=heads)
  sa, sb = (np.asarray(x, np.float64) for x in fn(*_grams(qs, ks)))
  steep, steep_best = _rel_errors(qs, ks, sa, sb, v[1])
  return {"first_call_s": first, "ms": 1e3 * float(np.median(times)), "gpu_ms": gpu_ms,
          "rel_error": rel, "optimum": best, "steep_rel_error": steep,
          "steep_optimum": steep_best,
          "finite": bool(np.all(np.isfinite(a)) and np.all(np.isfinite(b))
                         and np.all(np.isfinite(sa)) and np.all(np.isfinite(sb)))}


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--compile-timeout", type=float, default=200)
  p.add_argument("--only", default="", help="comma list of variant names")
  p.add_argument("--child", default="", help=argparse.SUPPRESS)
  p.add_argument("--tag", default="", help="suffix of the JSON file name")
  p.add_argument("--quick", action="store_true", help="one small interpreted variant")
  p.add_argument("--out-dir", default="benchmarks/results")
  args = p.parse_args(argv)
  variants = [v for v in VARIANTS if not args.only or _name(v) in args.only.split(",")]
  if args.quick:  # no GPU needed: the program interpreted, no compile phase
    v = (32, 8, 4, "ieee", "ieee", 2, 32)
    rows = {_name(v): {"compile_s": None,
                       **time_and_check(v, reps=2, n=256, heads=2, interpret=True)}}
    print(_name(v), rows[_name(v)], flush=True)
    return _write(rows, args)
  if args.child:
    v = next(v for v in VARIANTS if _name(v) == args.child)
    print(json.dumps({"compile_s": compile_one(v)}))
    return
  cache = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                                os.path.join(tempfile.gettempdir(), "distr-jax-cache"))
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  procs = {_name(v): subprocess.Popen(
      [sys.executable, "-m", "benchmarks.lowrank_kernel_variants", "--child", _name(v),
      ], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      env=env, text=True) for v in variants}
  rows = {}
  t0 = time.perf_counter()
  for name, proc in procs.items():
    try:
      out, err = proc.communicate(
          timeout=max(1.0, args.compile_timeout - (time.perf_counter() - t0)))
      errors = [line for line in err.splitlines() if "Error" in line or "error" in line]
      rows[name] = json.loads(out.strip().splitlines()[-1]) if proc.returncode == 0 else {
          "compile_s": None, "error": f"rc {proc.returncode}: " + " | ".join(
              line[:300] for line in errors[-3:])}
    except subprocess.TimeoutExpired:
      proc.kill()
      rows[name] = {"compile_s": None, "error": f"compile > {args.compile_timeout:.0f} s"}
    print(name, rows[name], flush=True)
  for v in variants:
    name = _name(v)
    if rows[name].get("compile_s") is None:
      continue
    try:
      rows[name].update(time_and_check(v))
    except Exception as e:  # noqa: BLE001
      rows[name]["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(name, {k: round(x, 5) if isinstance(x, float) else x for k, x in rows[name].items()},
          flush=True)
  return _write(rows, args)


def _write(rows, args):
  from benchmarks import timing  # pylint: disable=import-outside-toplevel
  info = timing.device_info()
  path = os.path.join(args.out_dir, "lowrank-kernel-variants-{}-{}{}.json".format(
      info["device"].replace(" ", "_"), info["date"][:10], args.tag))
  timing.write_json(path, {"info": info, "programs": 16, "rows": rows})
  print("wrote", path)
  return path


if __name__ == "__main__":
  main()
