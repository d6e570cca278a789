"""The benchmark scripts run end to end in their --quick CPU modes."""

import json
import os

from benchmarks import accuracy, memory, speed, timing


def test_speed_quick(tmp_path):
  speed.main(["--quick", "--modes", "fwd", "fwdbwd", "--out-dir", str(tmp_path)])
  (path,) = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
  rows = json.load(open(tmp_path / path))["rows"]
  assert {r["impl"] for r in rows} >= {"ours G=1", "distr G=2 bq=16", "xla"}
  assert all(r["ms"] and r["ms"] > 0 for r in rows)
  assert any(p.endswith(".png") for p in os.listdir(tmp_path))


def test_time_fn_counts_calls_per_sync():
  """calls_per_sync=k: k calls per synchronisation, time per call; every call runs."""
  calls = []

  def fn(x):
    calls.append(x)
    return x

  sets = [(1,), (2,)]
  ms = timing.time_fn(fn, sets, warmup=1, reps=20, min_time_s=0, calls_per_sync=5)
  assert ms >= 0
  assert len(calls) == 1 + 5 * 5  # warm-up, then max(3, 20 // 5 + 1) = 5 rounds of 5
  assert set(calls) == {1, 2}  # inputs rotated
  calls.clear()
  timing.time_fn(fn, sets, warmup=0, reps=4, min_time_s=0)
  assert len(calls) == 4  # one synchronised call per rep


def test_memory_quick(tmp_path):
  memory.main(["--quick", "--out-dir", str(tmp_path)])
  (path,) = os.listdir(tmp_path)
  assert all(r["bytes"] for r in json.load(open(tmp_path / path))["rows"])


def test_accuracy_quick(tmp_path):
  accuracy.main(["--quick", "--out-dir", str(tmp_path)])
  (path,) = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
  result = json.load(open(tmp_path / path))
  by = {(r["data"], r["grouping"], r["G"], r["block_q"]): r["rel_l2"] for r in result["rows"]}
  # Exact-distance grouping beats random grouping on structured data and real activations.
  assert by[("structured", "greedy", 2, 16)] < by[("structured", "random", 2, 16)]
  assert by[("vit", "greedy", 2, 16)] < by[("vit", "random", 2, 16)]
  assert result["vit"]["swaps"] and 0 <= result["vit"]["exact_accuracy"] <= 1


def test_grouping_cost_quick(tmp_path):
  from benchmarks import grouping_cost
  grouping_cost.main(["--quick", "--out-dir", str(tmp_path)])
  (path,) = os.listdir(tmp_path)
  rows = json.load(open(tmp_path / path))["rows"]
  assert {r["grouping"] for r in rows} == {"lsh", "greedy", "greedy-xla"}
  assert all(0 < r["fraction"] for r in rows)


def test_tradeoff_plot_from_committed_results(tmp_path):
  from benchmarks import tradeoff
  tradeoff.main(["--out-dir", str(tmp_path)])
  (path,) = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
  result = json.load(open(tmp_path / path))
  pts = result["points"]
  assert pts and all(0.5 < p["speedup"] < 2 and 0 < p["cosine_greedy"] <= 1 for p in pts)
  groupings = {p["grouping"] for p in result["mosaic_points"]}
  assert {"greedy", "lowrank", "lowrank_fixed"} <= groupings, groupings


def test_lowrank_kernel_variants_quick(tmp_path):
  from benchmarks import lowrank_kernel_variants
  path = lowrank_kernel_variants.main(["--quick", "--out-dir", str(tmp_path)])
  (row,) = json.load(open(path))["rows"].values()
  assert row["finite"] and row["ms"] > 0
  assert row["rel_error"] <= 1.1 * row["optimum"], row


def test_prep_cost_quick(tmp_path):
  from benchmarks import prep_cost
  prep_cost.main(["--quick", "--out-dir", str(tmp_path)])
  (path,) = os.listdir(tmp_path)
  (row,) = json.load(open(tmp_path / path))["rows"]
  assert row["G4_lowrank_prepass_ms"] > 0 and row["grams_qk_ms"] > 0


def test_kernel_profile_quick(tmp_path):
  """The profiler trace is parsed into per-op times (on a CPU: the host's XLA ops)."""
  from benchmarks import kernel_profile
  kernel_profile.main(["--quick", "--out-dir", str(tmp_path)])
  (path,) = os.listdir(tmp_path)
  rows = json.load(open(tmp_path / path))["rows"]
  assert set(rows) == {"cudnn", "lowrank"}
  for row in rows.values():
    assert row["wall_ms"] > 0 and row["busy_ms"] > 0 and row["kernels_ms"], row


def test_lowrank_program_cache_cases_run_interpreted():
  """Every case of the GPU-only program benchmark is a valid program: its arguments and
  body run the factorisation interpreted on a small problem and give finite maps."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from benchmarks import lowrank_program_cache as cache
  from pallas_kernels.triton import lowrank_factor as lf
  x = np.random.default_rng(0).standard_normal((2, 64, 32)).astype(np.float32)
  gram = jnp.asarray(np.einsum("hnd,hne->hde", x, x))
  try:
    for name, (kwargs, impl) in cache.CASES.items():
      lf.factor_pair = impl
      a, b = lf.factor_grams_kernel.__wrapped__(gram, gram, rank=8, interpret=True,
                                                **kwargs)
      assert a.shape == b.shape == (2, 32, 8), name
      assert bool(jnp.all(jnp.isfinite(a)) & jnp.all(jnp.isfinite(b))), name
  finally:
    lf.factor_pair = cache.ORIG


def test_lowrank_program_cache_in_call_rounds_on_cpu():
  """The in-call timing's bookkeeping (cases compiled once, timed in rounds, medians and
  per-round shares) on a CPU: the XLA backend and XLA's exact attention stand in for the
  Mosaic kernels and cuDNN, so the times are host times, not a measurement."""
  import jax  # pylint: disable=import-outside-toplevel
  from benchmarks import lowrank_program_cache as cache
  rows = cache.in_call(["default", "keys_last_s3"], calls=2, rounds=3, shape=(1, 256, 2),
                       implementation="xla", exact=jax.nn.dot_product_attention)
  assert list(rows) == ["cudnn", "default", "keys_last_s3"]
  assert len(rows["cudnn"]["busy_rounds_ms"]) == 3 and rows["cudnn"]["busy_ms"] > 0
  # the order rotates: each case comes right after the exact forward in turn
  assert rows["default"]["timed_after_cudnn_rounds"] == [0, 2]
  assert rows["keys_last_s3"]["timed_after_cudnn_rounds"] == [1]
  for name in ("default", "keys_last_s3"):
    row = rows[name]
    assert "error" not in row, row
    assert len(row["prepass_rounds_ms"]) == len(row["prepass_of_cudnn_rounds"]) == 3
    assert min(row["prepass_rounds_ms"]) <= row["prepass_ms"] <= max(row["prepass_rounds_ms"])
    assert row["prepass_of_cudnn"] > 0 and row["kernels_ms"]
  # the XLA path ignores the Mosaic tilings: both cases compute the same attention
  assert rows["keys_last_s3"]["rel_diff_to_first_case"] < 1e-6


def test_gram_tiles_variants_are_supported_tilings():
  """The GPU-only Gram tiling benchmark asks only for tilings the kernel takes at its
  shape (B=1, N=16384, H=16, d=128, bf16), with splits that divide a block's tiles."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from benchmarks import gram_tiles
  from pallas_kernels.mosaic_gpu import grams
  for rows, stages, splits, *consumers in gram_tiles.VARIANTS:
    tiles = grams.GramTiles(rows, stages, *consumers)
    assert grams.supports((1, 16384, 16, 128), jnp.bfloat16, 16384, 1, tiles) is None
    assert splits is None or (16384 // rows) % splits == 0
  assert gram_tiles.VARIANTS[0][:2] == (grams.TILES.tile_rows, grams.TILES.stages)


def test_project_tiles_variants_are_supported():
  """Likewise for the K_fused projection's pipeline benchmark (and the in-call tile cases
  of lowrank_program_cache): every shape lowers for an H100 at the benchmark's size."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from benchmarks import lowrank_program_cache, project_tiles
  from pallas_kernels.mosaic_gpu import project
  from conftest import lower_for_h100
  shapes = {project.ProjectTiles(*v) for v in project_tiles.VARIANTS}
  shapes |= {c["proj"] for c in lowrank_program_cache.TILE_CASES.values() if "proj" in c}
  assert project_tiles.VARIANTS[0] == (None, None, 1)
  for tiles in shapes:
    text = lower_for_h100(lambda x, w, tiles=tiles: project.project_rows(x, w, tiles=tiles),
                          jax.ShapeDtypeStruct((1, 16384, 16, 128), jnp.bfloat16),
                          jax.ShapeDtypeStruct((1, 16, 128, 32), jnp.float32))
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
