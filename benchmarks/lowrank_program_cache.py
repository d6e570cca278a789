"""The lowrank factorisation program's GPU time alone, after an L2 flush and inside a call
(GPU only).

Inside an end-to-end call the program ran ~40% slower than back to back on its own
(H100, 2026-12-06: 0.104 vs 0.073 ms for 16 programs at d=128, r=32). This times each
variant twice from the device's own kernel timestamps (`kernel_profile`): 20 calls back
to back, then 20 calls each followed by a 256 MiB array op, which evicts the 50 MB L2 as
the attention kernel does in a real call; `--in-call` also times chosen variants inside
the end-to-end lowrank forward.

The variants are keyword arguments of `lowrank_factor.factor_grams_kernel` (plans,
`subspace_precision`, the code `form`, `select`, `orth_precision`), plus two experimental
bodies of
`lowrank_factor.factor_pair` defined here (the two inner half steps in one 2-trip loop,
the Gram chosen by `cond` or by 0/1 weights). Phase 1 compiles every variant in its own
process, in parallel, into JAX's persistent compilation cache; phase 2 times them in
one process. Results and their reading: docs/KERNEL_NOTES.md,
"Sixth session", "Eighth session", "Ninth session" and "Tenth session". In a call,
"default" runs the shipped path (the Grams written as one array by the Gram kernel); the
other cases run through a patched `factor_grams_kernel` (two Gram arrays, concatenated
where the case reads them by index).

    python -m benchmarks.lowrank_program_cache [--only a,b] [--tag=-runN]      (GPU)
        [--in-call default,keys_last_s3 --rounds 3]
"""

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import kernel_profile
from benchmarks import lowrank_kernel_variants as lkv
from benchmarks import timing
from pallas_kernels.mosaic_gpu import grams
from pallas_kernels.mosaic_gpu import project
from pallas_kernels.triton import lowrank_factor as lf

ORIG = lf.factor_pair


def semi(gq_mul, gk_mul, x0, *, plan=None, trace_q=1.0, trace_k=1.0, precision=lf.HIGHEST,
         small_precision=lf.HIGHEST, blend=False, **_):
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


# name: (factor_grams_kernel keyword arguments, factor_pair body); d=128, r=32, 8 warps,
# TF32x3 d-deep products and IEEE r x r ones unless the arguments say otherwise
# (`subspace_precision="tf32"`: the Gram products that only move the subspace in one
# TF32 pass, measured in the eighth session and not adopted). Each session's cases pin
# the settings that were defaults when they were measured (`TF32X3_ORTH`: the
# orthonormalisations' d-deep products in TF32x3, the default until the tenth session),
# so that later defaults do not change what they time. The eighth session's cases keep
# its straight-line code (`form="unrolled"`, which also runs a patched body).
TF32X3_ORTH = {"orth_precision": "tf32x3"}
OLD = {"subspace_precision": "tf32x3", "form": "unrolled", **TF32X3_ORTH}
ROLLED_BLEND = {"form": "rolled", "select": "blend", **TF32X3_ORTH}
CASES = {
    "default": ({}, ORIG),                                    # the shipped program
    "subspace_tf32": ({"subspace_precision": "tf32", "form": "unrolled", **TF32X3_ORTH},
                      ORIG),
    "old_plan": ({**OLD, "plan": lkv.OLD_DEFAULT}, ORIG),
    "one_step": ({**OLD, "steps": 1}, ORIG),
    "semi_cond": (OLD, semi),
    "semi_blend": (OLD, functools.partial(semi, blend=True)),
    "smalltf32x3": ({**OLD, "small_precision": "tf32x3"}, ORIG),
    "p0337": ({**OLD, "plan": (0, 3, 3, 7)}, ORIG),
    # eighth session: the parts of the chain (Gram products, orthonormalisations,
    # polynomials) by difference, and cheaper plans
    "p01": ({**OLD, "plan": (0, 1)}, ORIG),
    "p0001": ({**OLD, "plan": (0, 0, 0, 1)}, ORIG),
    "p0111": ({**OLD, "plan": (0, 1, 1, 1)}, ORIG),
    "p0336": ({**OLD, "plan": (0, 3, 3, 6)}, ORIG),
    "p0336_subspace_tf32": ({"plan": (0, 3, 3, 6), "subspace_precision": "tf32",
                             "form": "unrolled", **TF32X3_ORTH}, ORIG),
    # ninth session: the rolled form (one loop, `lowrank_factor.rolled_pair`, both Grams
    # read and blended; in run s9r1 it was the default, named "default", and the shipped
    # program "unrolled")
    "rolled": (ROLLED_BLEND, ORIG),
    "rolled_p0336": ({**ROLLED_BLEND, "plan": (0, 3, 3, 6)}, ORIG),
    "rolled_3steps": ({**ROLLED_BLEND, "steps": 3}, ORIG),
    # tenth session: the rolled form forms `x T` once after its loop (not in every half
    # step; the `rolled*` cases above now do too), reads only its half step's Gram
    # (`select="index"`), and the orthonormalisations' d-deep products in IEEE float32
    # (`orth_precision`); the plan of three Gram products
    "rolled_index": ({"form": "rolled", "select": "index", **TF32X3_ORTH}, ORIG),
    "orth_ieee": ({"form": "unrolled", "orth_precision": "ieee"}, ORIG),
    "rolled_index_orth_ieee": ({"form": "rolled", "select": "index",
                                "orth_precision": "ieee"}, ORIG),
    "p047": ({"form": "unrolled", "plan": (0, 4, 7), **TF32X3_ORTH}, ORIG),
    "rolled_index_ieee": ({"form": "rolled", "select": "index", "precision": "ieee",
                           "subspace_precision": "ieee"}, ORIG),
    "rolled_index_orth_ieee_w4": ({"form": "rolled", "select": "index",
                                   "orth_precision": "ieee", "num_warps": 4}, ORIG),
    "rolled_index_ieee_w4": ({"form": "rolled", "select": "index", "precision": "ieee",
                              "subspace_precision": "ieee",
                              "num_warps": 4}, ORIG),
    "rolled_orth_ieee": ({**ROLLED_BLEND, "orth_precision": "ieee"}, ORIG),
    # the program shipped until the tenth session (straight-line, TF32x3 orthonormalisations)
    "previous": ({"form": "unrolled", **TF32X3_ORTH}, ORIG),
}
# Eleventh session: the shipped program with other pipelines for the Gram kernel and the
# K_fused projection (`grams.TILES`, `project.TILES` swapped), for --in-call only. The
# cases of run s11r1 pin the pipelines that were the defaults then (`S10_GRAM`: rows read
# forward; `S10_PROJ`: 8 row tiles a CTA, two waves); `tiles_s10` is that pair.
S10_GRAM = grams.GramTiles(reverse=False, launch_per_array=False)
S10_PROJ = project.ProjectTiles(tiles_per_cta=8)
S11_GRAM = grams.GramTiles(reverse=True, launch_per_array=False)  # eleventh session's
TILE_CASES = {
    "gram_c2": {"gram": dataclasses.replace(S10_GRAM, consumers=2), "proj": S10_PROJ},
    "proj_s2": {"gram": S10_GRAM, "proj": dataclasses.replace(S10_PROJ, stages=2)},
    "proj_c2": {"gram": S10_GRAM, "proj": dataclasses.replace(S10_PROJ, consumers=2)},
    "proj_t16": {"gram": S10_GRAM, "proj": project.ProjectTiles(tiles_per_cta=16)},
    "proj_s2_c2": {"gram": S10_GRAM,
                   "proj": dataclasses.replace(S10_PROJ, stages=2, consumers=2)},
    "gram_c2_proj_c2": {"gram": dataclasses.replace(S10_GRAM, consumers=2),
                        "proj": dataclasses.replace(S10_PROJ, consumers=2)},
    "gram_c2_proj_s2": {"gram": dataclasses.replace(S10_GRAM, consumers=2),
                        "proj": dataclasses.replace(S10_PROJ, stages=2)},
    # the Gram kernel reads each CTA's rows backwards: K_fused's first tiles are in the L2
    "gram_rev": {"gram": grams.GramTiles(reverse=True), "proj": S10_PROJ},
    "gram_rev_proj_t16": {"gram": grams.GramTiles(reverse=True),
                          "proj": project.ProjectTiles(tiles_per_cta=16)},
    "gram_rev_c2_proj_t16": {"gram": grams.GramTiles(consumers=2, reverse=True),
                             "proj": project.ProjectTiles(tiles_per_cta=16)},
    # two Gram consumer warpgroups with the eleventh session's defaults (not yet timed)
    "gram_c2_rev": {"gram": grams.GramTiles(consumers=2)},
    # the pipelines shipped until the eleventh session (now the defaults are gram_rev_proj_t16)
    "tiles_s10": {"gram": S10_GRAM, "proj": S10_PROJ},
    # the maps split for the Mosaic kernels by XLA (two fusions), as until the twelfth
    # session, instead of by the factorisation program (HeadReduction.map_parts)
    "xla_split": {"parts": False},
    # the Gram kernel as one launch for Q and K, each CTA one array's rows (the default
    # until the thirteenth session, pinned)
    "gram_one_launch": {"gram": S11_GRAM},
    "gram_per_array": {"gram": grams.GramTiles(launch_per_array=True)},
    # one launch, each CTA reading its Q rows and then its K rows (the default since the
    # thirteenth session, run s13r1)
    "gram_keys_last": {"gram": grams.GramTiles(keys_last=True)},
    "per_array_xla_split": {"gram": grams.GramTiles(launch_per_array=True), "parts": False},
    # thirteenth session: keys_last's pipeline (slots, tile rows, reduce slices) and the
    # projection's with it (run s13r2)
    "keys_last_s3": {"gram": grams.GramTiles(keys_last=True, stages=3)},
    "keys_last_s5": {"gram": grams.GramTiles(keys_last=True, stages=5)},
    "keys_last_t64_s8": {"gram": grams.GramTiles(keys_last=True, tile_rows=64, stages=8)},
    "keys_last_t256_s2": {"gram": grams.GramTiles(keys_last=True, tile_rows=256, stages=2)},
    "keys_last_proj_s2": {"proj": project.ProjectTiles(stages=2)},
    "keys_last_proj_c2": {"proj": project.ProjectTiles(consumers=2)},
    "keys_last_r8": {"gram": grams.GramTiles(keys_last=True, reduce_slices=8)},
    "keys_last_r4": {"gram": grams.GramTiles(keys_last=True, reduce_slices=4)},
    # after run s13r2: three slots (the best there, 0.1589 ms, once), with the others
    # that gained there. Timed again in rounds (s15r1-s15r4): no faster than four slots
    # (median 4.995% of cuDNN's forward against 4.985%), so not the default
    "keys_last_s3_r4": {"gram": grams.GramTiles(keys_last=True, stages=3, reduce_slices=4)},
    "keys_last_s3_proj_c2": {"gram": grams.GramTiles(keys_last=True, stages=3),
                             "proj": project.ProjectTiles(consumers=2)},
    "keys_last_s3_r4_proj_c2": {"gram": grams.GramTiles(keys_last=True, stages=3,
                                                        reduce_slices=4),
                                "proj": project.ProjectTiles(consumers=2)},
    "default_repeat": {},  # the shipped pipelines again, later in the same process
}
DEFAULT_ONLY = "default,subspace_tf32"
D, RANK = 128, 32
# The kernels of a lowrank call the profiler names: the Mosaic attention kernel (all of
# the call but the pre-pass) and the factorisation program.
ATTENTION_KERNEL, PROGRAM_KERNEL = "entry_mosaic_gpu_kernel", "distr_lowrank_factor"


def _fn(name):
  kwargs, impl = CASES[name]
  lf.factor_pair = impl
  kwargs = {"rank": RANK, "num_warps": 8, "precision": "tf32x3", "small_precision": "ieee",
            **kwargs}
  # A new function per case: factor_grams_kernel's trace cache ignores the patched body.
  return jax.jit(lambda gq, gk: lf.factor_grams_kernel.__wrapped__(gq, gk, **kwargs))


def _inputs():
  q, k = lkv._data(D)
  gq, gk = lkv._grams(q, k)
  return q, k, gq, gk


def child(name):
  """Compile one case into the persistent cache: one JSON line."""
  _, _, gq, gk = _inputs()
  t0 = time.perf_counter()
  _fn(name).lower(gq, gk).compile()
  print(json.dumps({"compile_s": time.perf_counter() - t0}))


def _median(values):
  return float(np.median(values))


def _prepass_ms(kernels):
  """A lowrank call's GPU ms outside the attention kernel, from {kernel: ms}."""
  return sum(kernels.values()) - kernels.get(ATTENTION_KERNEL, 0.0)


def in_call(names, calls=10, rounds=1, shape=(1, 16384, 16), implementation="mosaic",
            exact=None):
  """{case: GPU ms} of the program, and of the whole call, inside the end-to-end lowrank
  forward (`shape` = (B, N, H), d=128, G=4, bf16, `implementation` backend), and the
  exact forward's (`exact`, default cuDNN's).

  Every case is compiled first (its pipelines swapped in while it traces), then all
  are timed in turn, the exact forward first, `rounds` times, the cases' order rotated
  by one each round (the place right after the exact forward is slower): cases compare
  within a round and the rounds show the run-to-run drift. A case's numbers are medians over the
  rounds (`prepass_of_cudnn`: of each round's ratio to that round's exact forward), and
  with rounds > 1 `prepass_rounds_ms` / `prepass_of_cudnn_rounds` keep every round's
  (`timed_after_cudnn_rounds`: the rounds in which the case came first)."""
  import distrattention_jax as dj  # pylint: disable=import-outside-toplevel
  from distrattention_jax import prep  # pylint: disable=import-outside-toplevel
  from distrattention_jax.backends import mosaic as mosaic_backend  # pylint: disable=import-outside-toplevel
  if exact is None:
    exact = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
  batch, length, heads = shape
  sets = timing.make_inputs(batch, length, length, heads, D, jnp.bfloat16, 2)
  orig = lf.factor_grams_kernel
  stacked = prep.stacked_head_grams
  gram_tiles, proj_tiles = grams.TILES, project.TILES  # the shipped pipelines
  takes_parts = mosaic_backend.MosaicBackend.takes_map_parts
  compiled = {"cudnn": jax.jit(exact).lower(*sets[0]).compile()}
  rows, first_out = {}, None
  for n in names:
    kwargs, impl = CASES.get(n, ({}, ORIG))
    tiles = TILE_CASES.get(n, {})
    grams.TILES = tiles.get("gram", gram_tiles)
    project.TILES = tiles.get("proj", proj_tiles)
    mosaic_backend.MosaicBackend.takes_map_parts = tiles.get("parts", takes_parts)
    jax.clear_caches()  # the kernels' jit caches hold the previous case's tiling
    if n != "default" and n not in TILE_CASES:
      # The variants run through factor_grams_kernel (patched here), so the Grams come as
      # two arrays (one concatenation where the variant reads them by index); "default"
      # is the shipped path: the Gram kernel writes one array, no XLA op between.
      prep.stacked_head_grams = lambda *a, **kw: None
      lf.factor_pair = impl
      lf.factor_grams_kernel = lambda gq, gk, kwargs=kwargs, **kw: orig.__wrapped__(
          gq, gk, **{**kw, "num_warps": 8, "precision": "tf32x3", "small_precision": "ieee",
                     **kwargs})
    try:
      fn = jax.jit(functools.partial(dj.distr_attention, group_size=D // RANK, block_q=None,
                                     grouping="lowrank", implementation=implementation))
      # Compiled now, with this case's pipelines: later rounds reuse the executable.
      compiled[n] = fn.lower(*sets[0]).compile()
      out = jax.block_until_ready(compiled[n](*sets[0])).astype(jnp.float32)
      if first_out is None:
        first_out = out
      # Every case against the first (same inputs): a check that a variant computes the
      # same attention (its maps may differ in their last bits: ~1e-3).
      rows[n] = {"rel_diff_to_first_case":
                 float(jnp.linalg.norm(out - first_out) / jnp.linalg.norm(first_out))}
    except Exception as e:  # noqa: BLE001
      rows[n] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    finally:
      lf.factor_grams_kernel, lf.factor_pair = orig, ORIG
      prep.stacked_head_grams = stacked
      grams.TILES, project.TILES = gram_tiles, proj_tiles
      mosaic_backend.MosaicBackend.takes_map_parts = takes_parts
  per_round = {n: [] for n in compiled}  # per round: {kernel: GPU ms per call}
  cases, orders = [n for n in compiled if n != "cudnn"], []
  for r in range(rounds):
    # The exact forward first, then the cases rotated by one each round: the case timed
    # right after cuDNN ran slower (the same 4-slot pipeline: 5.07% of cuDNN there,
    # 4.98-4.99% later in the round, its attention kernel 2.44-2.51 ms against 2.39;
    # H100, 2026-12-07, runs s15r3/s15r4), so no case may hold that place every round.
    shift = r % len(cases) if cases else 0
    orders.append(cases[shift:] + cases[:shift])
    for n in ["cudnn"] + orders[-1]:
      kernels = kernel_profile.kernel_ms_per_call(compiled[n], sets[0], calls)
      if n != "cudnn" and implementation == "mosaic" and not {
          ATTENTION_KERNEL, PROGRAM_KERNEL} <= set(kernels):
        raise KeyError(f"{n}: no {ATTENTION_KERNEL} / {PROGRAM_KERNEL} among the "
                       f"profiled kernels {sorted(kernels)}")
      per_round[n].append(kernels)
    this = {n: ks[r] for n, ks in per_round.items()}
    exact_ms = sum(this.pop("cudnn").values())
    prepass = {n: _prepass_ms(k) for n, k in this.items()}
    print(f"round {r}: cudnn {exact_ms:.4f} ms; pre-pass ms (% of cudnn):",
          ", ".join(f"{n} {p:.4f} ({100 * p / exact_ms:.2f}%)" for n, p in prepass.items()),
          flush=True)
  exact_rounds = [sum(k.values()) for k in per_round.pop("cudnn")]
  rows = {"cudnn": {"busy_ms": _median(exact_rounds),
                    **({"busy_rounds_ms": exact_rounds} if rounds > 1 else {})}, **rows}
  for n, kernel_rounds in per_round.items():
    busy = [sum(k.values()) for k in kernel_rounds]
    prepass = [_prepass_ms(k) for k in kernel_rounds]
    share = [p / e for p, e in zip(prepass, exact_rounds)]
    names_ = sorted(set().union(*kernel_rounds))
    rows[n].update({
        "program_ms": _median([k.get(PROGRAM_KERNEL, 0.0) for k in kernel_rounds]),
        "busy_ms": _median(busy),
        "attention_ms": _median([k.get(ATTENTION_KERNEL, 0.0) for k in kernel_rounds]),
        "prepass_ms": _median(prepass), "prepass_of_cudnn": _median(share),
        "kernels_ms": {k2: _median([k.get(k2, 0.0) for k in kernel_rounds])
                       for k2 in names_}})
    if rounds > 1:
      rows[n].update({"prepass_rounds_ms": prepass, "prepass_of_cudnn_rounds": share,
                      "timed_after_cudnn_rounds": [r for r, o in enumerate(orders)
                                                   if o[0] == n]})
  short = lambda v: (round(v, 4) if isinstance(v, float) else  # noqa: E731
                     {k.replace("_mosaic_gpu_kernel", ""): round(t, 4) for k, t in v.items()}
                     if isinstance(v, dict) else
                     [round(t, 4) for t in v] if isinstance(v, list) else v)
  for n in rows:
    print("in call", n, {k: short(v) for k, v in rows[n].items()
                         if k not in ("busy_ms", "attention_ms")}, flush=True)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--only", default=DEFAULT_ONLY, help="comma list of CASES names")
  p.add_argument("--in-call", default="",
                 help="comma list of CASES names also timed inside an end-to-end call")
  p.add_argument("--rounds", type=int, default=1,
                 help="--in-call: time every case this many times in turn (medians)")
  p.add_argument("--compile-timeout", type=float, default=240)
  p.add_argument("--child", default="", help=argparse.SUPPRESS)
  p.add_argument("--tag", default="")
  p.add_argument("--out-dir", default="benchmarks/results")
  args = p.parse_args(argv)
  cache = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                                os.path.join(tempfile.gettempdir(), "distr-jax-cache"))
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  if args.child:
    return child(args.child)
  names = [n for n in args.only.split(",") if n]
  unknown = [n for n in names if n not in CASES]
  unknown += [n for n in args.in_call.split(",") if n and n not in CASES | TILE_CASES]
  if unknown:
    raise ValueError(f"unknown cases {unknown}; known: {sorted(CASES | TILE_CASES)}")
  env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  procs = {n: subprocess.Popen([sys.executable, "-m", "benchmarks.lowrank_program_cache",
                                "--child", n], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env, text=True) for n in names}
  rows, t0 = {}, time.perf_counter()
  for n, proc in procs.items():
    try:
      out, err = proc.communicate(
          timeout=max(1.0, args.compile_timeout - (time.perf_counter() - t0)))
      rows[n] = (json.loads(out.strip().splitlines()[-1]) if proc.returncode == 0 else
                 {"compile_s": None, "error": err.strip().splitlines()[-1][:300]
                  if err.strip() else f"rc {proc.returncode}"})
    except subprocess.TimeoutExpired:
      proc.kill()
      rows[n] = {"compile_s": None, "error": f"compile > {args.compile_timeout:.0f} s"}
    print(n, rows[n], flush=True)
  big = jnp.ones((64 * 1024 * 1024,), jnp.float32)  # 256 MiB: flushes the 50 MB L2
  q, k, gq, gk = _inputs()
  for n in names:
    if rows[n].get("compile_s") is None:
      continue
    fn = _fn(n)
    a, b = jax.block_until_ready(fn(gq, gk))
    rel, best = lkv._rel_errors(q, k, np.asarray(a, np.float64), np.asarray(b, np.float64),
                                RANK)
    flush = jax.jit(lambda x: x * 1.0001)
    both = lambda gq, gk, x, fn=fn: (fn(gq, gk), flush(x))  # noqa: E731
    jax.block_until_ready(both(gq, gk, big))
    t_alone, _ = kernel_profile.device_kernel_times(fn, (gq, gk), 20)
    t_both, _ = kernel_profile.device_kernel_times(both, (gq, gk, big), 20)
    rows[n].update({"kwargs": {k2: list(v) if isinstance(v, tuple) else v
                               for k2, v in CASES[n][0].items()},
                    "rel_error": rel, "optimum": best,
                    "alone_ms": t_alone[PROGRAM_KERNEL] / 20 / 1e6,
                    "after_flush_ms": t_both[PROGRAM_KERNEL] / 20 / 1e6})
    print(n, {k2: round(v, 5) if isinstance(v, float) else v for k2, v in rows[n].items()},
          flush=True)
  lf.factor_pair = ORIG
  info = timing.device_info()
  path = os.path.join(args.out_dir, "lowrank-program-cache-{}-{}{}.json".format(
      info["device"].replace(" ", "_"), info["date"][:10], args.tag))
  result = {"info": info, "programs": 16, "d": D, "rank": RANK, "rows": rows}
  timing.write_json(path, result)
  if args.in_call:
    result["in_call"] = in_call([n for n in args.in_call.split(",") if n],
                                rounds=args.rounds)
    timing.write_json(path, result)
  print("wrote", path)


if __name__ == "__main__":
  main()
