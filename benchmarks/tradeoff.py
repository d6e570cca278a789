"""The speed/accuracy trade-off in one plot, from results already measured.

    python -m benchmarks.tradeoff

x: forward+backward speed-up over cuDNN (GPU speed JSON, d=128, N=16384, non-causal; the
cuDNN path from the speed JSON, our Mosaic kernels from their end-to-end runs);
y: embedding cosine of the pretrained model with DistrAttention swapped in
(`benchmarks.pretrained` JSON). Each point is one (G, grouping block) setting: speed at
block_q=64 and with one grouping per sequence, accuracy at block_q=64 and 128 (one
grouping per sequence for those texts). The two were measured on different shapes (the
model has d=32 and short texts), so read the plot as a map of the options, not a law.
Writes benchmarks/results/tradeoff-<date>.png and .json.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os

from benchmarks import timing

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _latest(pattern):
  paths = sorted(glob.glob(os.path.join(RESULTS, pattern)))
  if not paths:
    raise FileNotFoundError(f"no {pattern} under {RESULTS}: run the benchmark first")
  return paths[-1]


def points(speed, pretrained, n=16384, d=128):
  """[(label, G, speedup over cuDNN, cosine)] for greedy with both block settings."""
  ms = {r["impl"]: r["ms"] for r in speed["rows"]
        if r["n"] == n and r["d"] == d and not r["causal"] and r["mode"] == "fwdbwd" and r["ms"]}
  cos = {(r["G"], r["block_q"], r["grouping"]): r["mean_cos"] for r in pretrained["rows"]
         if r["representative"] == "mean"}
  whole = max(r["block_q"] for r in pretrained["rows"])
  out = []
  for g in sorted({r["G"] for r in pretrained["rows"]}):
    for label, impl, bq in ((f"cuDNN path G={g} bq=64", f"cudnn-distr G={g} bq=64", 64),
                            (f"cuDNN path G={g} per seq.", f"cudnn-distr G={g} bq=N",
                             whole)):
      if impl in ms and "cudnn" in ms and (g, bq, "greedy") in cos:
        out.append({"label": label, "G": g, "speedup": ms["cudnn"] / ms[impl],
                    "cosine_greedy": cos[(g, bq, "greedy")],
                    "cosine_lsh": cos.get((g, bq, "lsh"))})
  return out


def mosaic_points(mosaic_speed, lowrank_cost, pretrained, n=16384, d=128, fixed=None):
  """The Mosaic path, one grouping per sequence: greedy and lowrank fitted per sequence
  from the end-to-end speed run (`mosaic_speed`, `speed-*.json` rows "mosaic-distr G=g
  bq=N" / "mosaic-lowrank G=g bq=N"), and what that run lacks (lowrank with fixed,
  calibrated maps; greedy or lowrank at other G) from `lowrank_cost`
  (`prep-cost-*.json`); each ratio to the cuDNN time of its own run. The fixed maps'
  cosine from `fixed` (`pretrained-minilm-iter-fixed-*`)."""
  cos = {(r["G"], r["block_q"], r["grouping"]): r["mean_cos"] for r in pretrained["rows"]
         if r["representative"] == "mean"}
  whole = max(r["block_q"] for r in pretrained["rows"])
  fixed_cos = {} if fixed is None else {r["G"]: r["mean_cos"] for r in fixed["rows"]
                                        if r["grouping"] == "lowrank_fixed"}
  kinds = (  # (speed JSON impl prefix, prep-cost key part, label, grouping, cosine of G)
      ("mosaic-distr", "greedy", "greedy", "greedy", lambda g: cos.get((g, whole, "greedy"))),
      ("mosaic-lowrank", "lowrank", "lowrank", "lowrank",
       lambda g: cos.get((g, whole, "lowrank"))),
      (None, "fixedmaps", "fixed maps", "lowrank_fixed", fixed_cos.get))
  points_by = {}  # (G, grouping) -> point; the speed run first
  if mosaic_speed is not None:
    ms = {r["impl"]: r["ms"] for r in mosaic_speed["rows"] if r["n"] == n and r["d"] == d
          and not r["causal"] and r["mode"] == "fwdbwd" and r["ms"]}
    for prefix, _, label, grouping, cosine in kinds:
      for g in (2, 4, 8):
        impl = f"{prefix} G={g} bq=N"
        if prefix and impl in ms and "cudnn" in ms and cosine(g) is not None:
          points_by[(g, grouping)] = {"label": f"mosaic G={g} {label}", "G": g,
                                      "grouping": grouping,
                                      "speedup": ms["cudnn"] / ms[impl], "cosine": cosine(g)}
  for row in [] if lowrank_cost is None else lowrank_cost["rows"]:
    for _, kind, label, grouping, cosine in kinds:
      for g in (2, 4, 8):
        key = f"G{g}_{kind}_e2e_fwd_bwd_ms"
        if (row.get("d") == d and row.get("n") == n and key in row
            and cosine(g) is not None and (g, grouping) not in points_by):
          points_by[(g, grouping)] = {"label": f"mosaic G={g} {label}", "G": g,
                                      "grouping": grouping,
                                      "speedup": row["cudnn_fwd_bwd_ms"] / row[key],
                                      "cosine": cosine(g)}
  return list(points_by.values())


def _optional(path, pattern):
  try:
    with open(path or _latest(pattern)) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--speed-json", default=None, help="default: the latest speed-*-d128-<date>.json")
  p.add_argument("--pretrained-json", default=None,
                 help="default: the latest pretrained-minilm-<date>.json (the full table)")
  p.add_argument("--mosaic-speed-json", default=None,
                 help="default: the latest speed-mosaic-e2e-*.json (greedy and lowrank "
                      "on our kernels, e.g. speed-*-issue13-n16384-c0-*.json)")
  p.add_argument("--lowrank-cost-json", default=None,
                 help="default: the latest prep-cost-*-lowrank-d128.json (fixed maps, and "
                      "what the speed run lacks)")
  p.add_argument("--fixed-json", default=None,
                 help="default: the latest pretrained-minilm-iter-fixed-*.json (fixed maps)")
  p.add_argument("--out-dir", default=RESULTS)
  args = p.parse_args(argv)
  with open(args.speed_json or _latest("speed-*-d128-20*.json")) as f:
    speed = json.load(f)
  with open(args.pretrained_json or _latest("pretrained-minilm-20*.json")) as f:
    pretrained = json.load(f)
  pts = points(speed, pretrained)
  mosaic = mosaic_points(_optional(args.mosaic_speed_json, "speed-mosaic-e2e-*-20*.json"),
                         _optional(args.lowrank_cost_json, "prep-cost-*-lowrank-d128.json"),
                         pretrained,
                         fixed=_optional(args.fixed_json, "pretrained-minilm-iter-fixed-*.json"))
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for key, marker, name in (("cosine_greedy", "o", "greedy"), ("cosine_lsh", "x", "lsh")):
    xs = [q["speedup"] for q in pts if q[key] is not None]
    ys = [q[key] for q in pts if q[key] is not None]
    ax.scatter(xs, ys, marker=marker, label=f"{name} grouping")
    for q in pts:
      if q[key] is not None and name == "greedy":
        # block_q=64 points to the left of their label, per-sequence ones to the right.
        left = "bq=64" in q["label"]
        ax.annotate(q["label"], (q["speedup"], q[key]), fontsize=7,
                    xytext=(-6 if left else 6, -3), textcoords="offset points",
                    ha="right" if left else "left")
  for grouping, marker, name in (("greedy", "s", "greedy"), ("lowrank", "D", "lowrank"),
                                 ("lowrank_fixed", "P", "lowrank fixed maps")):
    sel = [q for q in mosaic if q["grouping"] == grouping]
    if sel:
      ax.scatter([q["speedup"] for q in sel], [q["cosine"] for q in sel], marker=marker,
                 label=f"{name}, our Mosaic kernels")
      for q in sel:
        ax.annotate(q["label"], (q["speedup"], q["cosine"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
  ax.scatter([1.0], [1.0], marker="*", s=80, color="k", label="exact cuDNN")
  ax.axvline(1.0, color="k", lw=0.5)
  ax.margins(x=0.35, y=0.08)
  speeds = [q["speedup"] for q in pts] + [q["speedup"] for q in mosaic] + [1.0]
  ax.set_xlim(min(speeds) - 0.22, max(speeds) + 0.25)  # room for the labels
  ax.set(xlabel=f"fwd+bwd speed-up over cuDNN ({speed['device']}, d=128, N=16384)",
         ylabel="embedding cosine vs exact (all-MiniLM-L6-v2)",
         title="DistrAttention: speed vs accuracy (cuDNN path and Mosaic kernels)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  day = datetime.date.today().isoformat()
  png = os.path.join(args.out_dir, f"tradeoff-{day}.png")
  os.makedirs(args.out_dir, exist_ok=True)
  fig.savefig(png, dpi=110)
  timing.write_json(os.path.join(args.out_dir, f"tradeoff-{day}.json"),
                    {"points": pts, "mosaic_points": mosaic})
  for q in mosaic:
    print(f"{q['label']:36s} speed-up {q['speedup']:.2f}  cosine {q['cosine']:.3f}")
  for q in pts:
    print(f"{q['label']:36s} speed-up {q['speedup']:.2f}  cosine greedy {q['cosine_greedy']:.3f}"
          f"  lsh {q['cosine_lsh'] if q['cosine_lsh'] is None else round(q['cosine_lsh'], 3)}")
  print("wrote", png)


if __name__ == "__main__":
  main()
