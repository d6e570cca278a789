"""Accuracy of DistrAttention against exact attention, per grouping method.

    python -m benchmarks.accuracy            (CPU is fine: XLA path, a few minutes)
    python -m benchmarks.accuracy --quick    (seconds; the CI smoke test)

Output error (relative L2, max abs, mean cosine of output rows) for grouping in
{lsh (16 and 8 projections), greedy, random}, G in {2, 4, 8}, block_q in
{16, 32, 64, 128, n} (n: one grouping per sequence) and both representatives, and the
best rank-d/G factorisation ("lowrank": distrattention_jax.lowrank's exact maps, applied
through the reference's transcription), on three kinds of data:
  gaussian    random normal Q/K/V (no column structure: every grouping is poor here);
  structured  Q columns are noisy copies of a few prototypes (like trained models' Q);
  vit         Q/K/V captured from every layer of the example ViT, trained on digits here.
Then the trained ViT's test accuracy with its attention swapped for DistrAttention (no
fine-tuning) and after a short fine-tune. Writes benchmarks/results/accuracy-<backend>-
<date>.json and a PNG (error per grouping; with --speed-json, speed vs error).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
import distrattention_jax as dj
from distrattention_jax import lowrank

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
GROUPINGS = {"lsh16": dict(grouping="lsh", num_projs=16), "lsh8": dict(grouping="lsh", num_projs=8),
             "greedy": dict(grouping="greedy"), "random": dict(grouping="random"),
             "lowrank": dict(grouping="lowrank"),
             "lowrank_kv": dict(grouping="lowrank", per_kv_head=True)}


def errors(out, exact):
  out, exact = np.asarray(out, np.float64), np.asarray(exact, np.float64)
  rows_o, rows_e = out.reshape(-1, out.shape[-1]), exact.reshape(-1, exact.shape[-1])
  cos = np.sum(rows_o * rows_e, -1) / (np.linalg.norm(rows_o, axis=-1) *
                                      np.linalg.norm(rows_e, axis=-1) + 1e-30)
  return {"rel_l2": float(np.linalg.norm(out - exact) / np.linalg.norm(exact)),
          "max_abs": float(np.max(np.abs(out - exact))), "cosine": float(np.mean(cos))}


def synthetic(kind, n, heads, d, seed=0, kv_heads=None):
  """kind "gaussian" or "structured"; `kv_heads` < heads: GQA (K/V with fewer heads)."""
  rng = np.random.default_rng(seed)
  kv_heads = heads if kv_heads is None else kv_heads
  k = rng.standard_normal((1, n, kv_heads, d))
  v = rng.standard_normal((1, n, kv_heads, d))
  if kind == "gaussian":
    q = rng.standard_normal((1, n, heads, d))
  else:
    protos = rng.standard_normal((1, n, heads, 8))
    q = protos[..., rng.integers(0, 8, size=d)] + 0.2 * rng.standard_normal((1, n, heads, d))
    k = 0.5 * k + protos[:, :, :kv_heads][..., rng.integers(0, 8, size=d)]
  return [tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))]


def train_exact_vit(out_dir, quick):
  sys.path.insert(0, EXAMPLES)
  import train_vit  # pylint: disable=import-outside-toplevel
  epochs = ["--epochs", "2", "--max-steps", "30"] if quick else ["--epochs", "30"]
  summary = train_vit.main(["--attention", "exact", "--out-dir", out_dir, "--no-progress"]
                           + epochs)
  return (train_vit, os.path.join(out_dir, "checkpoint-exact", "state.msgpack"),
          summary["runs"][0]["final_test_accuracy"])


def vit_activations(train_vit, ckpt, n_images):
  """q, k, v of every layer of the trained ViT on test images: list of (q, k, v)."""
  from flax import serialization  # pylint: disable=import-outside-toplevel
  from vit import ViT  # pylint: disable=import-outside-toplevel
  (_, _), (x_test, _), classes = train_vit.load_digits_dataset()
  model = ViT(num_classes=classes)
  params = model.init(jax.random.key(0), jnp.asarray(x_test[:2]))
  with open(ckpt, "rb") as f:
    params = serialization.from_state_dict(params, serialization.msgpack_restore(f.read())["params"])
  from vit import AttentionConfig  # pylint: disable=import-outside-toplevel
  model = ViT(num_classes=classes, attention=AttentionConfig(kind="exact"))
  _, inter = model.apply(params, jnp.asarray(x_test[:n_images]), capture_intermediates=True,
                         mutable=["intermediates"])
  layers = []
  for name in sorted(k for k in inter["intermediates"] if k.startswith("encoderblock")):
    att = inter["intermediates"][name]["attention"]
    layers.append(tuple(att[p]["__call__"][0] for p in ("query", "key", "value")))
  return layers, params


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--implementation", default="xla")
  p.add_argument("--n", type=int, default=512)
  p.add_argument("--skip-vit", action="store_true")
  p.add_argument("--speed-json", default=None)
  p.add_argument("--groupings", nargs="+", default=list(GROUPINGS), choices=list(GROUPINGS))
  p.add_argument("--groups", type=int, nargs="+", default=[2, 4, 8])
  p.add_argument("--blocks", type=int, nargs="+", default=None,
                 help="block_q values (default 16 32 64 128 n); n = one per sequence")
  p.add_argument("--representatives", nargs="+", default=["mean", "sample"])
  p.add_argument("--vit-swap-groupings", nargs="+", default=["lsh", "greedy", "random"])
  p.add_argument("--vit-swap-blocks", type=int, nargs="+", default=[16, 64])
  p.add_argument("--no-vit-swap", action="store_true",
                 help="skip the ViT swap/fine-tune runs (activations still measured)")
  p.add_argument("--tag", default="", help="suffix of the output file names")
  p.add_argument("--datasets", nargs="+", default=None,
                 help="subset of gaussian structured structured_gqa vit (default: all)")
  p.add_argument("--out-dir", default="benchmarks/results")
  args = p.parse_args(argv)
  groups_g, blocks, reps = (args.groups, args.blocks or [16, 32, 64, 128, args.n],
                            args.representatives)
  if args.quick:
    groups_g, blocks, reps, args.n = [2, 4], [16], ["mean"], 128
  datasets = {"gaussian": synthetic("gaussian", args.n, 4, 64),
              "structured": synthetic("structured", args.n, 4, 64)}
  if not args.quick:
    datasets["structured_gqa"] = synthetic("structured", args.n, 8, 64, kv_heads=2)
  vit_dir = tempfile.mkdtemp(prefix="distr-vit-")
  if not args.skip_vit:
    train_vit, ckpt, exact_accuracy = train_exact_vit(vit_dir, args.quick)
    datasets["vit"], vit_params = vit_activations(train_vit, ckpt, 64 if args.quick else 256)
  if args.datasets:
    datasets = {k: v for k, v in datasets.items() if k in args.datasets}
  rows = []
  for (name, layers), g, bq, rep, (gname, gkw) in itertools.product(
      datasets.items(), groups_g, blocks, reps,
      [(n, GROUPINGS[n]) for n in args.groupings]):
    if args.quick and gname in ("lsh8", "lowrank", "lowrank_kv"):
      continue
    if gname.startswith("lowrank") and rep != "mean":
      continue  # no representative: the maps are dense
    if gname == "lowrank_kv" and name != "structured_gqa":
      continue  # without GQA it is "lowrank"
    errs = []
    for q, k, v in layers:
      if q.shape[-1] % g:
        continue
      if gname.startswith("lowrank"):
        fn = jax.jit(functools.partial(_lowrank, group_size=g, block_q=bq,
                                       per_kv_head=gname == "lowrank_kv"))
      else:
        fn = jax.jit(functools.partial(dj.distr_attention, group_size=g, block_q=bq,
                                       representative=rep, implementation=args.implementation,
                                       **gkw))
      errs.append(errors(fn(q, k, v), dj.exact_attention(q, k, v)))
    if not errs:
      continue
    row = {"data": name, "grouping": gname, "G": g, "block_q": bq, "representative": rep,
           **{m: float(np.mean([e[m] for e in errs])) for m in errs[0]}}
    rows.append(row)
    print(f"{name:10s} {gname:7s} G={g} bq={bq:4d} {rep:6s} rel_l2 {row['rel_l2']:.4f} "
          f"cos {row['cosine']:.4f}", flush=True)

  vit_results = {}
  if not args.skip_vit and not args.no_vit_swap:
    vit_results = {"exact_accuracy": exact_accuracy,
                   "swaps": vit_swap(train_vit, ckpt, vit_dir, args.quick,
                                     groupings=args.vit_swap_groupings,
                                     blocks=args.vit_swap_blocks, groups=groups_g)}
    print(f"ViT exact test accuracy {exact_accuracy:.4f}")
  elif not args.skip_vit:
    vit_results = {"exact_accuracy": exact_accuracy}
  info = timing.device_info()
  day = datetime.date.today().isoformat()
  tag = ("quick" if args.quick else jax.default_backend()) + args.tag
  path = timing.write_json(os.path.join(args.out_dir, f"accuracy-{tag}-{day}.json"),
                           {**info, "n": args.n, "rows": rows, "vit": vit_results})
  print("wrote", path)
  plot(rows, args.speed_json, os.path.join(args.out_dir, f"accuracy-{tag}-{day}.png"))


def _lowrank(q, k, v, *, group_size, block_q, per_kv_head=False):
  """grouping="lowrank": exact maps from distrattention_jax.lowrank, reference scores."""
  maps = lowrank.lowrank_maps(q, k, block_q=block_q, group_size=group_size, method="exact",
                              per_kv_head=per_kv_head)
  return dj.distr_attention_reference(q, k, v, group_size=group_size, block_q=block_q,
                                      grouping="lowrank", lowrank_maps=maps)


def vit_swap(train_vit, ckpt, vit_dir, quick, groupings=("lsh", "greedy", "random"),
             blocks=(16, 64), groups=(2, 4)):
  """Test accuracy of the exact-trained ViT with DistrAttention swapped in, then fine-tuned."""
  results = []
  settings = [(g, bq, gr) for g in groups if g in (2, 4) for bq in blocks for gr in groupings]
  if quick:
    settings = [(2, 16, "greedy")]
  for g, bq, gr in settings:
    common = ["--attention", "distr", "--group-size", str(g), "--block-q", str(bq),
              "--grouping", gr, "--init-from", ckpt, "--no-progress"]
    swapped = train_vit.main(common + ["--epochs", "1", "--lr", "0", "--max-steps", "1",
                                       "--out-dir", os.path.join(vit_dir, f"swap-{g}-{bq}-{gr}")])
    tuned = train_vit.main(common + ["--epochs", "1" if quick else "3", "--lr", "5e-4",
                                     *(["--max-steps", "10"] if quick else []),
                                     "--out-dir", os.path.join(vit_dir, f"tune-{g}-{bq}-{gr}")])
    results.append({"G": g, "block_q": bq, "grouping": gr,
                    "swapped_accuracy": swapped["runs"][0]["final_test_accuracy"],
                    "finetuned_accuracy": tuned["runs"][0]["final_test_accuracy"],
                    "finetune_epochs": 1 if quick else 3})
    print(f"ViT swap G={g} bq={bq} {gr}: no fine-tune {results[-1]['swapped_accuracy']:.4f}, "
          f"fine-tuned {results[-1]['finetuned_accuracy']:.4f}", flush=True)
  return results


def plot(rows, speed_json, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  data = sorted({r["data"] for r in rows})
  fig, axes = plt.subplots(1, len(data) + (1 if speed_json else 0),
                           figsize=(4.5 * (len(data) + 1), 4), squeeze=False)
  for ax, name in zip(axes[0], data):
    for gname in dict.fromkeys(r["grouping"] for r in rows):
      pts = sorted((r["block_q"], r["rel_l2"]) for r in rows if r["data"] == name and
                   r["grouping"] == gname and r["G"] == 2 and r["representative"] == "mean")
      if pts:
        ax.plot(*zip(*pts), marker="o", label=gname)
    ax.set(xscale="log", xlabel="block_q", ylabel="relative L2 error (G=2, mean)", title=name)
    ax.legend(fontsize=8)
  if speed_json:
    import json  # pylint: disable=import-outside-toplevel
    with open(speed_json) as f:
      speed = json.load(f)["rows"]
    ax = axes[0][-1]
    for gname in ("lsh16", "greedy"):
      pts = []
      for r in speed:
        if r["mode"] != "fwd" or r["causal"] or not r.get("speedup_vs_cudnn"):
          continue
        if not r["impl"].startswith("distr"):
          continue
        g, bq = int(r["impl"].split("G=")[1].split()[0]), int(r["impl"].split("bq=")[1])
        acc = [x["rel_l2"] for x in rows if x["data"] == "structured" and x["G"] == g and
               x["grouping"] == gname and x["representative"] == "mean" and
               x["block_q"] == min(bq, 128)]
        if acc:
          pts.append((r["speedup_vs_cudnn"], acc[0]))
      if pts:
        ax.scatter(*zip(*pts), label=gname)
    ax.set(xlabel="forward speed-up over cuDNN", ylabel="relative L2 error (structured)",
           title="speed vs error")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print("wrote", path)


if __name__ == "__main__":
  main()
