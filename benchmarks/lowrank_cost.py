"""Cost of the grouping="lowrank" pre-pass against cuDNN's exact forward, same run.

The pre-pass: Grams (`Q^T Q` per block, `K^T K`; bf16 inputs, float32 accumulation on
tensor cores), the factorisation (fused Pallas program per (batch, head, block), or the
same iteration as XLA ops, `--xla`), and the two projections `Q' = scale Q A`,
`K' = K B` (bf16 out). Times are medians of synchronised calls ("sync") and the mean of
back-to-back calls with one synchronisation at the end ("pipelined": device time
without the per-call host round trip); cuDNN's forward is timed the same two ways.
Also checks on the GPU that the kernel's maps reach the optimum (exact eigh/SVD maps)
on structured data.

    python -m benchmarks.lowrank_cost                    (GPU: B=1, H=16, N=16384)
    python -m benchmarks.lowrank_cost --quick            (CPU smoke test)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import time
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from distrattention_jax import grouping
from distrattention_jax import lowrank

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")


def pipelined_ms(fn, sets, calls=30):
  """Mean time per call of `calls` back-to-back dispatches, one sync at the end."""
  jax.block_until_ready(fn(*sets[0]))
  t0 = time.perf_counter()
  out = None
  for i in range(calls):
    out = fn(*sets[i % len(sets)])
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) * 1e3 / calls


def measure(fn, sets, quick):
  sync = timing.time_fn(fn, sets, warmup=2, reps=3 if quick else 20,
                        min_time_s=0 if quick else 0.2)
  return {"sync_ms": sync, "pipelined_ms": pipelined_ms(fn, sets, 3 if quick else 30)}


def prepass_fn(n, g, block_q, *, use_kernel, steps, per_kv_head=False):
  def fn(q, k, v):
    del v
    d = q.shape[-1]
    q_map, k_map = lowrank.lowrank_maps(q, k, block_q=block_q, group_size=g, method="iter",
                                        steps=steps, use_kernel=use_kernel,
                                        per_kv_head=per_kv_head)
    # The projections as the narrow backends run them.
    reduction = grouping.HeadReduction.from_maps(q_map, k_map, block_q=block_q)
    return reduction.q_rep(q, d ** -0.5), reduction.k_fused(k)
  return jax.jit(fn)


def accuracy_check(d, g, steps, n=2048, heads=4):
  """Relative score error of the kernel's maps and of exact maps, structured data."""
  rng = np.random.default_rng(d + g)
  base = rng.standard_normal((1, n, heads, 8))
  q = base[..., rng.integers(0, 8, size=d)] + 0.3 * rng.standard_normal((1, n, heads, d))
  k = rng.standard_normal((1, n, heads, 8))[..., rng.integers(0, 8, size=d)] + \
      0.5 * rng.standard_normal((1, n, heads, d))
  q, k = jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16)
  out = {}
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)
  for name, kw in (("kernel", dict(method="iter", steps=steps)),
                   ("exact", dict(method="exact"))):
    qm, km = lowrank.lowrank_maps(q, k, block_q=n, group_size=g, **kw)
    qp = jnp.einsum("bqhd,bhdr->bhqr", q.astype(jnp.float32), qm[:, :, 0],
                    precision=jax.lax.Precision.HIGHEST)
    kp = jnp.einsum("bkhd,bhdr->bhkr", k.astype(jnp.float32), km[:, :, 0],
                    precision=jax.lax.Precision.HIGHEST)
    approx = jnp.einsum("bhqr,bhkr->bhqk", qp, kp, precision=jax.lax.Precision.HIGHEST)
    out[name] = float(jnp.linalg.norm(approx - s) / jnp.linalg.norm(s))
  return out


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--n", type=int, default=16384)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--d", type=int, nargs="+", default=[64, 128, 256])
  p.add_argument("--groups", type=int, nargs="+", default=[2, 4, 8])
  p.add_argument("--steps", type=int, nargs="+", default=[2, 4],
                 help="subspace steps; the first is timed part by part")
  p.add_argument("--xla", action="store_true", help="also time the iteration as XLA ops")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--out-dir", default="benchmarks/results")
  args = p.parse_args(argv)
  gpu = jax.default_backend() == "gpu"
  if args.quick:
    args.n, args.heads, args.d, args.groups, args.steps = 256, 2, [32], [4], [2]
  info = timing.device_info()
  rows = []
  for d in args.d:
    sets = timing.make_inputs(1, args.n, args.n, args.heads, d, jnp.bfloat16, 2)
    if gpu:
      fwd = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation="cudnn"))
    else:
      fwd = jax.jit(jax.nn.dot_product_attention)
    ref = measure(fwd, sets, args.quick)
    print(f"d={d} cuDNN forward {ref['sync_ms']:.3f} ms (pipelined {ref['pipelined_ms']:.3f})",
          flush=True)
    for g in args.groups:
      variants = [("kernel", True, s, args.n) for s in args.steps]
      if g == 4:
        variants.append(("kernel", True, args.steps[0], 1024))
        if args.xla:
          variants.append(("xla", False, args.steps[0], args.n))
      for impl, use_kernel, steps, block_q in variants:
        row = {"d": d, "G": g, "steps": steps, "block_q": block_q, "impl": impl,
               "cudnn_fwd": ref}
        try:
          row["prepass"] = measure(prepass_fn(args.n, g, block_q, use_kernel=use_kernel,
                                              steps=steps), sets, args.quick)
          if block_q == args.n and steps == args.steps[0] and impl == "kernel":
            grams = jax.jit(lambda q, k, v: (lowrank.query_grams(q, args.n),
                                              lowrank.key_grams(k)))
            row["grams"] = measure(grams, sets, args.quick)
            gq, gk = grams(*sets[0])
            fac = jax.jit(lambda gq, gk: lowrank.factor_iter(
                gq, jnp.repeat(gk, 1, axis=1)[:, :, None], d // g, steps=steps,
                use_kernel=use_kernel))
            row["factor"] = measure(fac, [(gq, gk)], args.quick)
            qm, km = fac(gq, gk)
            if use_kernel and d <= lowrank.KERNEL_MAX_HEAD_DIM:  # other warp counts (4: default)
              from pallas_kernels.triton import lowrank_factor  # pylint: disable=import-outside-toplevel
              for warps in (2, 8):
                try:
                  ker = jax.jit(functools.partial(lowrank_factor.factor_grams_kernel,
                                                  rank=d // g, steps=steps, num_warps=warps,
                                                  interpret=not gpu))
                  row[f"factor_warps{warps}"] = measure(
                      ker, [(gq.reshape(-1, d, d), gk.reshape(-1, d, d))], args.quick)
                except Exception as e:  # noqa: BLE001
                  row[f"factor_warps{warps}"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            reduction = grouping.HeadReduction.from_maps(qm, km, block_q=args.n)
            proj = jax.jit(lambda q, k, v: (reduction.q_rep(q), reduction.k_fused(k)))
            row["projections"] = measure(proj, sets, args.quick)
          row["fraction_pipelined"] = row["prepass"]["pipelined_ms"] / ref["pipelined_ms"]
          row["fraction_sync"] = row["prepass"]["sync_ms"] / ref["sync_ms"]
          parts = " ".join(f"{k} {row[k].get('pipelined_ms', float('nan')):.3f}" for k in
                           ("grams", "factor", "factor_warps2", "factor_warps8",
                            "projections") if k in row)
          print(f"d={d} G={g} {impl} steps={steps} block_q={block_q}: pre-pass "
                f"{row['prepass']['sync_ms']:.3f} ms sync / {row['prepass']['pipelined_ms']:.3f}"
                f" pipelined = {100 * row['fraction_pipelined']:.1f}% of the forward "
                f"[{parts}]", flush=True)
        except Exception as e:  # noqa: BLE001  (record a compile failure, go on)
          row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
          print(f"d={d} G={g} {impl} steps={steps} block_q={block_q}: FAILED {row['error']}",
                flush=True)
          traceback.print_exc(limit=2)
        rows.append(row)
      if g == 4:
        try:
          acc = {s: accuracy_check(d, g, s, n=256 if args.quick else 2048) for s in args.steps}
          rows.append({"d": d, "G": g, "accuracy_rel_score_error": acc})
          print(f"d={d} G={g} relative score error (structured, N=2048): {acc}", flush=True)
        except Exception as e:  # noqa: BLE001
          print(f"d={d} accuracy check FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
  tag = "quick" if args.quick else info["device"].replace(" ", "_")
  path = timing.write_json(
      os.path.join(args.out_dir, f"lowrank-cost-{tag}-{datetime.date.today().isoformat()}.json"),
      {**info, "n": args.n, "heads": args.heads, "batch": 1, "dtype": "bfloat16",
       "rows": rows})
  print("wrote", path)


if __name__ == "__main__":
  main()
