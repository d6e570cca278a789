"""The lowrank factorisation program's GPU time alone and after an L2 flush (GPU only).

Inside an end-to-end call the program ran ~40% slower than back to back on its own
(H100, 2026-12-06: 0.104 vs 0.073 ms for 16 programs at d=128, r=32). This times each
variant twice from the device's own kernel timestamps (`kernel_profile`): 20 calls back
to back, then 20 calls each followed by a 256 MiB array op, which evicts the 50 MB L2 as
the attention kernel does in a real call. Besides the shipped program it times
experimental bodies of `lowrank_factor.factor_pair` defined here (the two inner half
steps in one 2-trip loop, the Gram chosen by `cond` or by 0/1 weights), to see whether
less code (one copy of the orthonormalisation instead of two) pays for its loop. Results
and their reading: docs/KERNEL_NOTES.md, "Sixth session".

    python -m benchmarks.lowrank_program_cache [--tag=-runN]      (GPU)
"""

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import kernel_profile
from benchmarks import lowrank_kernel_variants as lkv
from benchmarks import timing
from pallas_kernels.triton import lowrank_factor as lf

ORIG = lf.factor_pair


def semi(gq_mul, gk_mul, x0, *, plan=None, trace_q=1.0, trace_k=1.0, precision=lf.HIGHEST,
         small_precision=lf.HIGHEST, blend=False):
  """plan (0, 4, 4, 7) with the two inner half steps in one static 2-trip loop."""
  unit_q, unit_k, scales = lf.unit_trace_muls(gq_mul, gk_mul, trace_q, trace_k)
  orth = functools.partial(lf.metric_orth, precision=precision, small_precision=small_precision)
  x = unit_q(x0)
  def body(i, x):
    if blend:
      w = (i == 0).astype(jnp.float32)
      gx = tuple(w * a + (1.0 - w) * b for a, b in zip(unit_k(x), unit_q(x)))
    else:
      gx = jax.lax.cond(i == 0, unit_k, unit_q, x)
    _, gx = orth(x, gx, iters=4, keep_w=False)
    return gx
  x = jax.lax.fori_loop(0, 2, body, x)
  gx = unit_k(x)
  z, gz = orth(x, gx, iters=7)
  return lf.balanced_maps(z, gz, unit_q, scales)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--tag", default="")
  p.add_argument("--out-dir", default="benchmarks/results")
  args = p.parse_args(argv)
  out = {}
  big = jnp.ones((64 * 1024 * 1024,), jnp.float32)  # 256 MiB: flushes the 50 MB L2
  shipped = (128, 32, 8, "tf32x3", "ieee", 2, 128)
  cases = [("unrolled", shipped, ORIG),
           ("old_plan", shipped + (lkv.OLD_DEFAULT,), ORIG),
           ("one_step", (128, 32, 8, "tf32x3", "ieee", 1, 128), ORIG),
           ("semi_cond", shipped, semi),
           ("semi_blend", shipped, functools.partial(semi, blend=True)),
           ("unrolled_smalltf32x3", (128, 32, 8, "tf32x3", "tf32x3", 2, 128), ORIG),
           ("unrolled_p0337", shipped + ((0, 3, 3, 7),), ORIG)]
  for name, v, impl in cases:
    lf.factor_pair = impl
    jax.clear_caches()  # factor_grams_kernel's trace cache ignores the patched body
    q, k = lkv._data(v[0])
    gq, gk = lkv._grams(q, k)
    fn = jax.jit(lambda gq, gk, v=v: lf.factor_grams_kernel(
        gq, gk, rank=v[1], num_warps=v[2], precision=v[3], small_precision=v[4],
        plan=v[7] if len(v) > 7 else None))
    a, b = jax.block_until_ready(fn(gq, gk))
    rel, best = lkv._rel_errors(q, k, np.asarray(a, np.float64), np.asarray(b, np.float64), v[1])
    flush = jax.jit(lambda x: x * 1.0001)
    both = lambda gq, gk, x, fn=fn: (fn(gq, gk), flush(x))  # noqa: E731
    jax.block_until_ready(both(gq, gk, big))
    t_alone, _ = kernel_profile.device_kernel_times(fn, (gq, gk), 20)
    t_both, _ = kernel_profile.device_kernel_times(both, (gq, gk, big), 20)
    out[name] = {"variant": lkv._name(v), "rel_error": rel, "optimum": best,
                 "alone_ms": t_alone["distr_lowrank_factor"] / 20 / 1e6,
                 "after_flush_ms": t_both["distr_lowrank_factor"] / 20 / 1e6}
    print(name, out[name], flush=True)
  info = timing.device_info()
  path = os.path.join(args.out_dir, "lowrank-program-cache-{}-{}{}.json".format(
      info["device"].replace(" ", "_"), info["date"][:10], args.tag))
  timing.write_json(path, {"info": info, "programs": 16, "rows": out})
  print("wrote", path)
  lf.factor_pair = ORIG


if __name__ == "__main__":
  main()
