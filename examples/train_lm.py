"""Train a byte-level causal language model on the Python standard library's source files,
then measure what DistrAttention costs it (perplexity, speed, causality).

    python examples/train_lm.py --compare          # the full study (one GPU, ~6-9 minutes)
    python examples/train_lm.py                    # train only (exact attention)
    python examples/train_lm.py --preset tiny      # the tiny CPU configuration (tests)

Data: every `.py` file under `sysconfig.get_paths()["stdlib"]` (site-packages excluded),
read as bytes, sorted by path, joined with a 0 byte. A file is held out when the CRC-32
of its relative path falls in the first `--heldout-percent` of 100 buckets, so the split
is deterministic and by file (the exact bytes depend on the machine's Python version:
the summary records file counts, sizes and a hash).

Model (`examples/lm.py`): decoder-only transformer, RoPE, RMSNorm, heads of `--head-dim`
(default 128) dims, `--layers` x `--heads`. Training uses exact attention
(`jax.nn.dot_product_attention`, cuDNN on a GPU) at `--context` bytes, with the last
`--long-frac` of the steps at `--long-context` (same bytes per step), so that the longer
evaluation contexts are ones the model has seen. Pass `--attention g2-greedy-b64` to
train with DistrAttention instead.

`--compare` then:
  1. evaluates held-out perplexity per byte at every `--contexts` length with exact
     attention and with each `--grid` setting swapped in post hoc (no training);
  2. times the attention forward of each setting at `--headline-context` (every context
     with --time-all-contexts; same shapes as the model's: eval batch, heads, head dim,
     dtype) and reports speed-up = exact time / the setting's;
  3. checks causality: changes the bytes after position i and reports the largest change
     of the logits at positions <= i (0 for strictly causal attention; a grouping block
     decides its grouping from all of its rows, so it can see later tokens);
  4. fine-tunes the trained model for `--finetune-steps` with each `--finetune` setting in
     place, and exact attention alike as the control, and evaluates again (ratios of
     fine-tuned settings are to the fine-tuned exact control).
It writes compare.md, compare.json and compare.png under `--out-dir` (the table after
every row). `--time-budget S` skips, and lists, the settings that would not fit in S
seconds (for a command with a time limit).

Setting names: `g{G}-{grouping}-b{block_q}`, e.g. `g2-greedy-b64`, `g4-lsh-b1024`,
`g2-lowrank-bseq` (`bseq`: one grouping per sequence, block_q = the context). Groupings
the installed library rejects (e.g. "lowrank" before it exists) are skipped, and said so.
Grouping `lowrankfixed` is "lowrank" with fixed maps: one factorisation per layer and
head calibrated once on `--calibration-sequences` training windows of
`--calibration-context` bytes (default: `--context`) (`lm.calibrate_lowrank_maps`) and held for every sequence, the strictly causal choice
(its rows are not fine-tuned: AdamW's weight decay would move the maps).

Outputs (default examples/out/lm/): summary.json, curves.png, checkpoint-*.msgpack
(`--resume` continues an interrupted run from them), compare.* with --compare.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lm as lm_lib  # noqa: E402

_START = time.perf_counter()


def log(message):
  """print, stamped with the seconds since the program started."""
  print(f"[{time.perf_counter() - _START:7.1f} s] {message}", flush=True)


# In the order a time budget should keep them: lowrank (the library's default, one
# factorisation per sequence, and 64-row blocks), its strictly causal fixed maps, then
# greedy (the default until 2026-12-06) at G in {2, 4, 8}, the paper's LSH, a 1024-row
# block and one grouping per sequence. (The 2026-11-25 H100 run listed greedy first and its time
# budget cut every lowrank row.)
DEFAULT_GRID = ("g2-lowrank-bseq,g2-lowrank-b64,g4-lowrank-bseq,"
                "g2-lowrankfixed-bseq,g4-lowrankfixed-bseq,"
                "g2-greedy-b64,g4-greedy-b64,g8-greedy-b64,g2-lsh-b64,g2-greedy-b1024,"
                "g2-greedy-bseq,g2-lsh-bseq,g4-greedy-bseq")
FULL_GRID = ",".join(f"g{g}-{grouping}-b{b}" for g in (2, 4, 8)
                     for grouping in ("lsh", "greedy", "lowrank", "lowrankfixed")
                     for b in ("64", "1024", "seq"))
FIXED_MAPS = "lowrankfixed"  # the grouping name of "lowrank" with calibrated fixed maps

PRESETS = {
    # One H100: a few minutes of training (estimated, not yet measured: summary.json
    # records the step times per context as timings.train_step_s_median). 3000 steps of
    # 16K bytes are ~5 epochs of a 10 MB standard library (Ubuntu's python3.12 has no
    # test package; pyenv/python.org builds have ~30 MB).
    "default": dict(layers=6, heads=4, head_dim=128, mlp_ratio=4, context=2048,
                    long_context=8192, long_frac=0.15, batch_size=8, steps=3000, lr=1e-3,
                    warmup=150, eval_every=500, eval_tokens=2 ** 17,
                    eval_batch_tokens=2 ** 15, contexts="1024,2048,4096,8192",
                    headline_context=4096, grid=DEFAULT_GRID,
                    finetune="g2-lowrank-bseq,g2-greedy-b64", finetune_steps=300,
                    finetune_lr=3e-4, finetune_context=0, timing_reps=20,
                    ckpt_every=500, dtype="auto"),
    # The smoke test's: a few seconds on a CPU.
    "tiny": dict(layers=2, heads=2, head_dim=16, mlp_ratio=2, context=64, long_context=0,
                 long_frac=0.0, batch_size=8, steps=30, lr=3e-3, warmup=5, eval_every=15,
                 eval_tokens=2048, eval_batch_tokens=1024, contexts="32,64",
                 headline_context=64, grid="g2-greedy-b16,g2-lsh-bseq,g2-lowrank-bseq",
                 finetune="g2-greedy-b16", finetune_steps=3, finetune_lr=1e-3,
                 finetune_context=0, timing_reps=2, ckpt_every=10, dtype="auto"),
}


# ----------------------------------------------------------------------------- data

def stdlib_files(root=None):
  """Sorted relative paths of the standard library's .py files (no site/dist-packages)."""
  root = root or sysconfig.get_paths()["stdlib"]
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in ("site-packages", "dist-packages", "__pycache__"))
    for name in filenames:
      if name.endswith(".py"):
        paths.append(os.path.relpath(os.path.join(dirpath, name), root))
  return root, sorted(paths)


_DATA_CACHE = {}


def load_data(heldout_percent: int = 5):
  """(train bytes, held-out bytes) as uint8 arrays, and a description of the split."""
  if heldout_percent in _DATA_CACHE:
    return _DATA_CACHE[heldout_percent]
  root, paths = stdlib_files()
  parts = {"train": [], "heldout": []}
  for rel in paths:
    with open(os.path.join(root, rel), "rb") as f:
      data = f.read()
    split = "heldout" if zlib.crc32(rel.encode()) % 100 < heldout_percent else "train"
    parts[split].append(data)
  streams, info = {}, {"root": root, "python": sys.version.split()[0],
                       "heldout_percent": heldout_percent}
  for split, docs in parts.items():
    blob = b"\0".join(docs)
    streams[split] = np.frombuffer(blob, np.uint8)
    info[split] = {"files": len(docs), "bytes": len(blob),
                   "sha256": hashlib.sha256(blob).hexdigest()[:16]}
  if not len(streams["train"]) or not len(streams["heldout"]):
    raise RuntimeError(f"no .py files found under {root} for one of the splits")
  _DATA_CACHE[heldout_percent] = (streams["train"], streams["heldout"], info)
  return _DATA_CACHE[heldout_percent]


def sample_batch(stream, batch, length, seed, step):
  """`[batch, length + 1]` random windows; a function of (seed, step) alone (resumable)."""
  rng = np.random.default_rng((seed, step))
  starts = rng.integers(0, len(stream) - length - 1, batch)
  return stream[starts[:, None] + np.arange(length + 1)].astype(np.int32)


def eval_windows(stream, length, num_tokens):
  """Evenly spaced, non-overlapping held-out windows `[n, length + 1]`, n*length ~ num_tokens."""
  n = max(1, min(num_tokens // length, (len(stream) - 1) // (length + 1)))
  starts = np.linspace(0, len(stream) - length - 1, n).astype(np.int64)
  return stream[starts[:, None] + np.arange(length + 1)].astype(np.int32)


# ----------------------------------------------------------------------------- settings

def parse_setting(name: str, implementation=None):
  """'exact' -> None; 'g2-greedy-b64' -> (G, grouping, block) with block an int or 'seq'."""
  if name == "exact":
    return None
  try:
    g, *middle, block = name.split("-")
    grouping = "-".join(middle)  # a grouping name may hold dashes
    assert g[0] == "g" and block[0] == "b" and grouping
    group_size = int(g[1:])
    block = block[1:] if block[1:] == "seq" else int(block[1:])
  except (ValueError, AssertionError):
    raise ValueError(f"setting {name!r} is not 'exact' or g{{G}}-{{grouping}}-b{{block_q|seq}}"
                     " (e.g. g2-greedy-b64, g4-lsh-bseq)") from None
  return {"group_size": group_size, "grouping": grouping, "block": block,
          "implementation": implementation, "fixed_maps": grouping == FIXED_MAPS}


def library_grouping(grouping: str) -> str:
  """The library's grouping name of a setting's ("lowrankfixed" is "lowrank")."""
  return "lowrank" if grouping == FIXED_MAPS else grouping


def options_for(setting, context):
  """The model's static attention argument for a parsed setting at one context length."""
  if setting is None:
    return None
  block = setting["block"]
  if block == "seq":
    block = 1 << max(0, (context - 1).bit_length())  # one grouping block per sequence
  return lm_lib.attention_options(group_size=setting["group_size"], block_q=block,
                                  grouping=library_grouping(setting["grouping"]),
                                  implementation=setting["implementation"])


def grouping_available(grouping: str) -> str | None:
  """None if distr_attention takes this grouping here, else the reason it refused."""
  q = jnp.ones((1, 16, 1, 8), jnp.float32) + jnp.arange(8, dtype=jnp.float32)
  try:
    options = dict(lm_lib.attention_options(group_size=2, block_q=16,
                                            grouping=library_grouping(grouping),
                                            implementation="xla"))
    lm_lib.distrattention_jax.distr_attention(q, q, q, is_causal=True, **options)
  except (ValueError, NotImplementedError, TypeError) as e:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return None


# ----------------------------------------------------------------------------- model

def make_model(args, attention=None):
  dtype = args.dtype
  if dtype == "auto":
    dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
  cfg = lm_lib.LMConfig(num_layers=args.layers, num_heads=args.heads,
                        head_dim=args.head_dim, mlp_ratio=args.mlp_ratio, dtype=dtype,
                        exact_implementation=args.exact_implementation)
  return lm_lib.LM(cfg, attention=attention)


_COMPILED = {}  # (kind, model) -> jitted function, shared by every run in this process


def nll_fn(model):
  """jit(params, tokens [B, T+1]) -> (nll [B, T] float32, logits [B, T, 256])."""
  if ("nll", model) not in _COMPILED:
    def run(params, tokens):
      logits = model.apply(params, tokens[:, :-1])
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
      return nll, logits
    _COMPILED["nll", model] = jax.jit(run)
  return _COMPILED["nll", model]


# AdamW as optax.adamw builds it, with the learning rate an argument of the step, so one
# compiled step serves every run (training, fine-tuning, resuming) of the same model.
OPTIMIZER = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(b2=0.95),
                        optax.add_decayed_weights(0.1))


def train_step_fn(model):
  """jit(params, opt_state, tokens, lr) -> (params, opt_state, loss)."""
  if ("train", model) not in _COMPILED:
    def loss_fn(params, tokens):
      logits = model.apply(params, tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def step(params, opt_state, tokens, lr):
      loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
      updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
      updates = jax.tree.map(lambda u: -lr * u, updates)
      return optax.apply_updates(params, updates), opt_state, loss
    _COMPILED["train", model] = jax.jit(step)
  return _COMPILED["train", model]


class Evaluator:
  """Held-out NLL per (attention, context), compiled once per pair."""

  def __init__(self, args, heldout):
    self.args, self.heldout, self._windows = args, heldout, {}

  def fn(self, attention):
    return nll_fn(make_model(self.args, attention))

  def batch_size(self, context):
    return max(1, self.args.eval_batch_tokens // context)

  def windows(self, context, num_tokens=None):
    key = (context, num_tokens)
    if key not in self._windows:
      self._windows[key] = eval_windows(self.heldout, context,
                                        num_tokens or self.args.eval_tokens)
    return self._windows[key]

  def nll(self, params, attention, context, num_tokens=None):
    """Mean held-out NLL (nats per byte)."""
    windows = self.windows(context, num_tokens)
    bs = self.batch_size(context)
    run = self.fn(attention)
    total, count = 0.0, 0
    for i in range(0, len(windows), bs):
      chunk = windows[i:i + bs]
      n = len(chunk)
      if n < bs:  # fixed shapes: one compile per context
        chunk = np.concatenate([chunk, np.repeat(chunk[:1], bs - n, 0)])
      nll, _ = run(params, jnp.asarray(chunk))
      total += float(jnp.sum(nll[:n]))
      count += n * context
    return total / count

  def causality(self, params, attention, context, position, seed=0):
    """Largest |change| of the logits at positions <= `position` when every later byte
    changes (same compiled function as the evaluation at this context)."""
    bs = max(2, self.batch_size(context))
    base = self.windows(context)[0]
    changed = base.copy()
    rng = np.random.default_rng(seed)
    tail = slice(position + 1, None)
    changed[tail] = (base[tail] + rng.integers(1, 256, base[tail].shape)) % 256
    tokens = np.stack([base, changed] + [base] * (bs - 2))
    _, logits = self.fn(attention)(params, jnp.asarray(tokens))
    logits = np.asarray(logits[:2, :position + 1], np.float64)
    return float(np.max(np.abs(logits[0] - logits[1])))


def time_attention(args, attention, context, reps, lowrank_maps=None):
  """Forward time (s) of the model's attention alone at this context: the best of three
  means of `reps` calls, after a compile and a warm-up call (`lowrank_maps`: one layer's
  fixed maps, for the fixed-map settings)."""
  model = make_model(args)
  dtype = jnp.dtype(model.config.dtype)
  bs = max(1, args.eval_batch_tokens // context)
  shape = (bs, context, args.heads, args.head_dim)
  q, k, v = (jax.random.normal(jax.random.key(i), shape, dtype) for i in range(3))
  fn = jax.jit(lambda q, k, v: lm_lib.causal_attention(
      q, k, v, attention, model.config.exact_implementation, lowrank_maps))
  fn(q, k, v).block_until_ready()  # compile
  fn(q, k, v).block_until_ready()
  best = math.inf
  for _ in range(3):  # best of three means of `reps` calls
    start = time.perf_counter()
    for _ in range(reps):
      out = fn(q, k, v)
    out.block_until_ready()
    best = min(best, (time.perf_counter() - start) / reps)
  return best


def is_oom(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


# ----------------------------------------------------------------------------- training

def train(args, name, attention, train_stream, evaluator, *, steps, lr, warmup,
          init_params=None, phases=None, eval_every=None):
  """Trains one model (resumable); returns (params, history).

  `phases`: list of (first_step, context, batch) in step order. Checkpoint:
  `{out_dir}/checkpoint-{name}.msgpack` every `--ckpt-every` steps and at the end.
  """
  model = make_model(args, attention)
  phases = phases or [(0, args.context, args.batch_size)]
  warmup = max(1, min(warmup, steps // 5))

  def schedule(step):  # linear warm-up, then cosine to lr / 10 (plain Python: no dispatch)
    if step < warmup:
      return lr * step / warmup
    done = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * done)))

  train_step = train_step_fn(model)
  params = init_params
  if params is None:
    params = model.init(jax.random.key(args.seed), jnp.zeros((1, 16), jnp.int32))
  state = {"params": params, "opt_state": OPTIMIZER.init(params), "step": 0,
           "history": json.dumps({"step": [], "train_loss": [], "eval_step": [],
                                  "eval_loss": [], "step_time_s": {}})}
  ckpt = os.path.join(args.out_dir, f"checkpoint-{name}.msgpack")
  if args.resume and os.path.isfile(ckpt):
    with open(ckpt, "rb") as f:
      state = serialization.from_bytes(state, f.read())
    log(f"[{name}] resumed from {ckpt} at step {int(state['step'])}")
  history = json.loads(state["history"])
  params, opt_state, step = state["params"], state["opt_state"], int(state["step"])

  def save():
    state.update(params=jax.device_get(params), opt_state=jax.device_get(opt_state),
                 step=step, history=json.dumps(history))
    with open(ckpt + ".tmp", "wb") as f:
      f.write(serialization.to_bytes(state))
    os.replace(ckpt + ".tmp", ckpt)

  try:
    from tqdm import tqdm
  except ImportError:  # progress bars are optional
    tqdm = None
  bar = None
  if tqdm is not None and not args.no_progress and step < steps:
    bar = tqdm(total=steps, initial=step, desc=f"[{name}]", mininterval=2.0,
               dynamic_ncols=True)
  eval_every = eval_every or args.eval_every
  eval_context = phases[0][1]

  def evaluate():
    eval_loss = evaluator.nll(params, attention, eval_context,
                              num_tokens=max(eval_context, args.eval_tokens // 4))
    history["eval_step"].append(step)
    history["eval_loss"].append(eval_loss)
    log(f"[{name}] step {step}: held-out loss {eval_loss:.4f} nats/byte "
        f"(ppl {math.exp(eval_loss):.3f}) at context {eval_context}")

  if init_params is not None and step == 0 and steps > 0:
    evaluate()  # where fine-tuning starts from
  pending, interval_start, interval_steps = [], time.perf_counter(), 0
  seen_contexts, interval_clean = set(), True  # clean: no compile inside the interval
  while step < steps:
    _, context, batch = [p for p in phases if p[0] <= step][-1]
    if context not in seen_contexts:
      seen_contexts.add(context)
      interval_clean = False
    tokens = jnp.asarray(sample_batch(train_stream, batch, context, args.seed, step))
    params, opt_state, loss = train_step(params, opt_state, tokens,
                                         np.float32(schedule(step)))
    pending.append(loss)
    step += 1
    interval_steps += 1
    if bar is not None:
      bar.update(1)
    if step % args.log_every == 0 or step == steps:
      mean = float(jnp.mean(jnp.stack(pending)))  # waits for the interval's steps
      pending = []
      if interval_clean:
        history["step_time_s"].setdefault(str(context), []).append(
            (time.perf_counter() - interval_start) / interval_steps)
      interval_start, interval_steps, interval_clean = time.perf_counter(), 0, True
      history["step"].append(step)
      history["train_loss"].append(mean)
      if bar is not None:
        bar.set_postfix(loss=f"{mean:.3f}", ctx=context)
      else:
        log(f"[{name}] step {step}/{steps} loss {mean:.4f} (ctx {context})")
    if step % eval_every == 0 or step == steps:
      evaluate()
      interval_start = time.perf_counter()  # the evaluation is not a training step
    if step % args.ckpt_every == 0 or step == steps:
      save()
  if bar is not None:
    bar.close()
  return params, history


def training_phases(args):
  """[(first_step, context, batch)]: `--context` then the last `--long-frac` at
  `--long-context` with the same bytes per step."""
  phases = [(0, args.context, args.batch_size)]
  if args.long_context and args.long_frac > 0:
    first = args.steps - int(round(args.steps * args.long_frac))
    batch = max(1, args.batch_size * args.context // args.long_context)
    if first < args.steps:
      phases.append((first, args.long_context, batch))
  return phases


# ----------------------------------------------------------------------------- compare

def compare(args, params, train_stream, evaluator, settings, on_update=lambda rows: None):
  """The post-hoc swap, causality check and fine-tuning; `on_update(rows)` after each row."""
  contexts = [int(c) for c in args.contexts.split(",")]
  rows = []
  timings = {}
  failed = {}  # setting -> error, reported with the skipped ones

  maps_by_g = {}

  def with_fixed_maps(setting, row_params):
    """`row_params` plus the "lowrank" collection for a fixed-map setting (calibrated
    once per G on training windows), else `row_params` unchanged."""
    if setting is None or not setting["fixed_maps"]:
      return row_params
    g = setting["group_size"]
    if g not in maps_by_g:
      calibration_context = args.calibration_context or args.context
      tokens = sample_batch(train_stream, args.calibration_sequences, calibration_context,
                            seed=args.seed + 1, step=0)[:, :-1]
      maps_by_g[g] = lm_lib.calibrate_lowrank_maps(make_model(args), row_params,
                                                   jnp.asarray(tokens), group_size=g)
      log(f"  calibrated fixed lowrank maps for G={g} on {len(tokens)} training windows "
          f"of {calibration_context} bytes")
    return {**row_params, "lowrank": maps_by_g[g]}

  def evaluate_row(label, setting_name, setting, row_params, finetuned=False):
    row = {"setting": label, "name": setting_name, "finetuned": finetuned,
           "group_size": 1 if setting is None else setting["group_size"],
           "grouping": None if setting is None else setting["grouping"],
           "block_q": None if setting is None else setting["block"],
           "ppl": {}, "ratio": {}, "speedup": {}, "attention_ms": {}}
    for context in contexts:
      attention = options_for(setting, context)
      try:
        nll = evaluator.nll(row_params, attention, context)
        row["ppl"][str(context)] = math.exp(nll)
      except Exception as e:  # noqa: BLE001
        if not is_oom(e):
          raise
        row["ppl"][str(context)] = None
        log(f"  {label} @ {context}: out of memory, skipped")
        continue
      key = (setting_name, context)
      timed = args.time_all_contexts or context == headline(args, contexts)
      if timed and key not in timings:
        maps = row_params.get("lowrank")
        layer0 = None if maps is None else (maps["layers"]["q_map"][0],
                                            maps["layers"]["k_map"][0])
        try:
          timings[key] = time_attention(args, attention, context, args.timing_reps, layer0)
        except Exception as e:  # noqa: BLE001
          if not is_oom(e):
            raise
          timings[key] = None
      seconds = timings.get(key)
      row["attention_ms"][str(context)] = None if seconds is None else 1e3 * seconds
      exact_t = timings.get(("exact", context))
      if exact_t and seconds:
        row["speedup"][str(context)] = exact_t / seconds
      log(f"  {label:32s} ctx {context:5d}: ppl {row['ppl'][str(context)]:.4f}"
          + ("" if seconds is None else f"  attention forward {1e3 * seconds:.3f} ms"))
    return row

  # causality: change everything after position i, mid-way through a grouping block
  causal_context = args.causality_context or args.context
  position = causal_context // 2 + 8

  def check_causality(row, setting, row_params):
    change = evaluator.causality(row_params, options_for(setting, causal_context),
                                 causal_context, position)
    row["causality"] = {"context": causal_context, "position": position,
                        "max_logit_change": change, "strictly_causal": change <= 1e-6}
    log(f"  {row['setting']:32s} causality at {causal_context}: max logit change at "
        f"positions <= {position} when the later bytes change: {change:.3g}")

  log("post-hoc swap: held-out perplexity per byte")
  exact_ppl = None
  for name, setting in [("exact", None)] + settings:
    elapsed = time.perf_counter() - _START
    if setting is not None and args.time_budget and \
        elapsed > args.time_budget - args.finetune_reserve:
      failed[name] = f"not run: {elapsed:.0f} s of --time-budget {args.time_budget} s spent"
      log(f"  {name}: {failed[name]}")
      continue
    try:
      row_params = with_fixed_maps(setting, params)
      row = evaluate_row(name, name, setting, row_params)
      exact_ppl = exact_ppl or row["ppl"]
      for c, p in row["ppl"].items():
        row["ratio"][c] = (p / exact_ppl[c]) if (p and exact_ppl.get(c)) else None
      check_causality(row, setting, row_params)
    except Exception as e:  # noqa: BLE001  (one failing setting must not end the study)
      if setting is None:
        raise
      log(f"  {name}: FAILED, skipped: {type(e).__name__}: {str(e)[:300]}")
      failed[name] = f"{type(e).__name__}: {str(e)[:300]}"
      continue
    rows.append(row)
    on_update(rows)

  # fine-tuning with the layer in place (and the exact control, trained alike)
  finetuned = []
  if args.finetune and args.finetune_steps > 0:
    ft_context = args.finetune_context or max(c for _, c, _ in training_phases(args))
    ft_batch = max(1, args.batch_size * args.context // ft_context)
    names = ["exact"] + [n for n in args.finetune.split(",") if n]
    available = {n for n, _ in settings} | {"exact"}
    control = None
    for name in names:
      setting = parse_setting(name, args.implementation)
      elapsed = time.perf_counter() - _START
      if args.time_budget and elapsed > args.time_budget - 60:
        failed[f"{name} (fine-tuned)"] = (f"not run: {elapsed:.0f} s of --time-budget "
                                          f"{args.time_budget} s spent")
        log(f"fine-tune {name}: {failed[f'{name} (fine-tuned)']}")
        continue
      if name not in available and setting is not None:
        reason = grouping_available(setting["grouping"])
        if reason:
          log(f"fine-tune {name}: skipped ({reason})")
          continue
      if setting is not None and setting["fixed_maps"]:
        failed[f"{name} (fine-tuned)"] = ("not run: fixed-map settings are not fine-tuned "
                                          "here (AdamW's weight decay would move the maps)")
        log(f"fine-tune {name}: {failed[f'{name} (fine-tuned)']}")
        continue
      log(f"fine-tune {name}: {args.finetune_steps} steps at context {ft_context}")
      start = time.perf_counter()
      try:
        ft_params, ft_history = train(
            args, f"finetune-{name}", options_for(setting, ft_context), train_stream,
            evaluator, steps=args.finetune_steps, lr=args.finetune_lr,
            warmup=max(1, args.finetune_steps // 10), init_params=params,
            phases=[(0, ft_context, ft_batch)],
            eval_every=max(args.log_every, args.finetune_steps // 3))
        row = evaluate_row(f"{name} (fine-tuned)", name, setting, ft_params,
                           finetuned=True)
      except Exception as e:  # noqa: BLE001
        log(f"fine-tune {name}: FAILED, skipped: {type(e).__name__}: {str(e)[:300]}")
        failed[f"{name} (fine-tuned)"] = f"{type(e).__name__}: {str(e)[:300]}"
        continue
      row["finetune"] = {"steps": args.finetune_steps, "context": ft_context,
                         "time_s": time.perf_counter() - start, "history": ft_history}
      if name == "exact":
        control = row
      base = control["ppl"] if control else exact_ppl
      row["ratio_to"] = "exact (fine-tuned)" if control else "exact"
      for c, p in row["ppl"].items():
        row["ratio"][c] = (p / base[c]) if (p and base.get(c)) else None
      finetuned.append(row)
      on_update(rows + finetuned)
  return rows + finetuned, failed


def headline(args, contexts):
  return args.headline_context if args.headline_context in contexts else max(contexts)


def write_table(path_md, rows, contexts, head_ctx, meta, skipped=None):
  def fmt(v, spec):
    return "—" if v is None else format(v, spec)

  lines = [f"# DistrAttention in a byte-level LM: held-out perplexity per byte",
           "",
           f"{meta}",
           "",
           "Cells: perplexity (ratio to exact; fine-tuned rows: to exact fine-tuned alike). "
           f"Speed-up: exact attention forward time / the setting's at {head_ctx} bytes. "
           "Max change: largest |logit change| at positions <= i when every byte after i "
           "changes.",
           "",
           "| setting | " + " | ".join(f"ppl @ {c}" for c in contexts)
           + f" | speed-up @ {head_ctx} | max change | strictly causal |",
           "|---|" + "---|" * len(contexts) + "---|---|---|"]
  for row in rows:
    cells = []
    for c in contexts:
      p, r = row["ppl"].get(str(c)), row["ratio"].get(str(c))
      cells.append("—" if p is None else f"{p:.4f} ({fmt(r, '.4f')})")
    causal = row.get("causality")
    lines.append(
        f"| {row['setting']} | " + " | ".join(cells)
        + f" | {fmt(row['speedup'].get(str(head_ctx)), '.2f')}"
        + f" | {fmt(causal and causal['max_logit_change'], '.3g')}"
        + f" | {'—' if not causal else ('yes' if causal['strictly_causal'] else 'no')} |")
  for name, reason in (skipped or {}).items():
    lines.append(f"\nSkipped {name}: {reason}")
  with open(path_md, "w") as f:
    f.write("\n".join(lines) + "\n")
  return "\n".join(lines)


def plot_compare(path, rows, head_ctx):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no compare plot")
    return False
  colors = {"greedy": "tab:blue", "lsh": "tab:orange", "lowrank": "tab:green",
            "random": "tab:gray", None: "black"}
  fig, ax = plt.subplots(figsize=(8, 5.5))
  key = str(head_ctx)
  for row in rows:
    x, y = row["speedup"].get(key), row["ratio"].get(key)
    if x is None or y is None:
      continue
    ax.scatter(x, y, color=colors.get(row["grouping"], "tab:purple"),
               marker="s" if row["finetuned"] else "o", s=40 if row["finetuned"] else 28,
               edgecolor="black" if row["finetuned"] else "none")
    ax.annotate(row["setting"].replace(" (fine-tuned)", " ft"), (x, y), fontsize=7,
                xytext=(3, 3), textcoords="offset points")
  ax.axhline(1.0, color="gray", lw=0.8)
  ax.axvline(1.0, color="gray", lw=0.8)
  ratios = [r["ratio"].get(key) for r in rows if r["ratio"].get(key)]
  if ratios and max(ratios) / min(ratios) > 1.5:
    ax.set_yscale("log")
  ax.set(xlabel=f"attention forward speed-up over exact at {head_ctx} bytes",
         ylabel=f"held-out perplexity / exact at {head_ctx} bytes",
         title="DistrAttention in a byte-level LM (o post hoc, ■ fine-tuned)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def plot_curves(path, runs):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no loss curves")
    return False
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name, history in runs:
    ax = axes[0] if not name.startswith("finetune") else axes[1]
    line, = ax.plot(history["step"], history["train_loss"], label=f"{name} train", lw=1)
    if history["eval_step"]:
      ax.plot(history["eval_step"], history["eval_loss"], "o--", color=line.get_color(),
              label=f"{name} held-out", ms=3)
  axes[0].set(xlabel="step", ylabel="loss (nats/byte)", title="training")
  axes[1].set(xlabel="fine-tune step", ylabel="loss (nats/byte)", title="fine-tuning")
  for ax in axes:
    if ax.lines:
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--preset", choices=sorted(PRESETS), default="default")
  preset = pre.parse_known_args(argv)[0].preset
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                 help="default: one H100, ~4 min of training; tiny: the CPU smoke test")
  p.add_argument("--compare", action="store_true", help="the post-hoc / fine-tune study")
  p.add_argument("--attention", default="exact",
                 help="training attention: exact or a setting name such as g2-greedy-b64")
  p.add_argument("--implementation", default=None,
                 help="distr_attention's backend (None: the library chooses)")
  p.add_argument("--layers", type=int)
  p.add_argument("--heads", type=int)
  p.add_argument("--head-dim", type=int)
  p.add_argument("--mlp-ratio", type=int)
  p.add_argument("--dtype", help="auto (bfloat16 on a GPU, float32 elsewhere), bfloat16, "
                 "float32")
  p.add_argument("--context", type=int, help="training context in bytes")
  p.add_argument("--long-context", type=int, help="context of the last training steps (0: off)")
  p.add_argument("--long-frac", type=float, help="fraction of steps at --long-context")
  p.add_argument("--batch-size", type=int, help="sequences per step at --context")
  p.add_argument("--steps", type=int)
  p.add_argument("--lr", type=float)
  p.add_argument("--warmup", type=int)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--heldout-percent", type=int, default=5)
  p.add_argument("--eval-every", type=int)
  p.add_argument("--eval-tokens", type=int, help="held-out bytes per evaluation context")
  p.add_argument("--eval-batch-tokens", type=int, help="bytes per evaluation batch")
  p.add_argument("--contexts", help="evaluation contexts, comma-separated")
  p.add_argument("--headline-context", type=int, help="context of the plot and speed-up column")
  p.add_argument("--causality-context", type=int, default=0, help="default: --context")
  p.add_argument("--grid", help="settings swapped in post hoc, comma-separated; 'full' = "
                 "G {2,4,8} x {lsh,greedy,lowrank,lowrankfixed} x block {64,1024,seq}")
  p.add_argument("--calibration-sequences", type=int, default=8,
                 help="training windows the fixed lowrank maps (grouping "
                      "'lowrankfixed') are calibrated on")
  p.add_argument("--calibration-context", type=int, default=0,
                 help="bytes per calibration window (default 0: --context)")
  p.add_argument("--finetune", help="settings fine-tuned with the layer in place")
  p.add_argument("--finetune-steps", type=int)
  p.add_argument("--finetune-lr", type=float)
  p.add_argument("--finetune-context", type=int, help="0: the longest training context")
  p.add_argument("--timing-reps", type=int)
  p.add_argument("--time-all-contexts", action="store_true",
                 help="time the attention at every context, not only the headline one")
  p.add_argument("--exact-implementation", default="auto",
                 help="jax.nn.dot_product_attention's implementation for exact attention: "
                      "auto (cudnn on a GPU with bf16/f16, else xla), cudnn, xla")
  p.add_argument("--time-budget", type=float, default=0,
                 help="seconds for the whole run (0: no limit): post-hoc settings not "
                      "started by budget - --finetune-reserve, and fine-tunes not started "
                      "by budget - 60, are skipped and listed")
  p.add_argument("--finetune-reserve", type=float, default=150,
                 help="seconds kept for fine-tuning under --time-budget")
  p.add_argument("--log-every", type=int, default=10)
  p.add_argument("--ckpt-every", type=int)
  p.add_argument("--out-dir", default="examples/out/lm")
  p.add_argument("--resume", action="store_true", help="continue from the checkpoints")
  p.add_argument("--no-progress", action="store_true")
  p.set_defaults(**PRESETS[preset])
  args = p.parse_args(argv)
  if args.grid == "full":
    args.grid = FULL_GRID
  return args


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out_dir, exist_ok=True)
  start = time.perf_counter()
  train_stream, heldout, data_info = load_data(args.heldout_percent)
  log(f"data: {data_info['train']['files']} train files ({data_info['train']['bytes']:,} "
        f"bytes), {data_info['heldout']['files']} held out "
        f"({data_info['heldout']['bytes']:,} bytes) from {data_info['root']}")
  evaluator = Evaluator(args, heldout)
  train_name = "exact" if args.compare else args.attention
  train_setting = parse_setting(train_name, args.implementation)
  phases = training_phases(args)
  model = make_model(args)
  timings = {}
  params, history = train(args, train_name, options_for(train_setting, args.context),
                          train_stream, evaluator, steps=args.steps, lr=args.lr,
                          warmup=args.warmup, phases=phases)
  timings["train_s"] = time.perf_counter() - start
  timings["train_step_s_median"] = {c: float(np.median(v))
                                    for c, v in history["step_time_s"].items()}
  log(f"[{train_name}] median step time per context: {timings['train_step_s_median']}")
  n_params = sum(x.size for x in jax.tree.leaves(params))
  runs = [(train_name, history)]
  summary = {
      "config": vars(args), "model": {"parameters": int(n_params),
                                      "width": model.config.width,
                                      "dtype": model.config.dtype},
      "training_phases": phases, "data": data_info, "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      "train": {"name": train_name, "history": history,
                "final_eval_loss": history["eval_loss"][-1] if history["eval_loss"] else None},
  }
  if history["eval_loss"]:
    log(f"[{train_name}] final held-out loss {history['eval_loss'][-1]:.4f} nats/byte "
          f"= {history['eval_loss'][-1] / math.log(2):.3f} bits/byte")

  if args.compare:
    settings, skipped = [], {}
    availability = {}
    for name in [n for n in args.grid.split(",") if n]:
      setting = parse_setting(name, args.implementation)
      grouping = setting["grouping"]
      if grouping not in availability:
        availability[grouping] = grouping_available(grouping)
      if availability[grouping]:
        skipped[name] = availability[grouping]
        continue
      settings.append((name, setting))
    for name, reason in skipped.items():
      log(f"skipped {name}: the library refused grouping: {reason}")
    contexts = [int(c) for c in args.contexts.split(",")]
    head_ctx = headline(args, contexts)
    meta = (f"{summary['device_kind']} ({summary['backend']}), jax {jax.__version__}, "
            f"{summary['date']}; model {args.layers} layers x {args.heads} heads x "
            f"{args.head_dim} dims ({n_params / 1e6:.1f}M parameters, "
            f"{model.config.dtype}), trained {args.steps} steps with exact attention "
            f"(phases [first step, context, batch]: {phases}); {args.eval_tokens} held-out "
            f"bytes per context; fine-tuning {args.finetune_steps} steps.")

    def write(rows):  # after every row, so an interrupted run leaves its table
      table = write_table(os.path.join(args.out_dir, "compare.md"), rows, contexts,
                          head_ctx, meta, skipped)
      compare_json = {
          "meta": meta, "contexts": contexts, "headline_context": head_ctx,
          "skipped": skipped,
          "rows": [{k: v for k, v in r.items() if k != "finetune"}
                   | ({"finetune": {k: v for k, v in r["finetune"].items()
                                    if k != "history"}} if "finetune" in r else {})
                   for r in rows]}
      with open(os.path.join(args.out_dir, "compare.json"), "w") as f:
        json.dump(compare_json, f, indent=1)
      return table, compare_json

    t0 = time.perf_counter()
    rows, failed = compare(args, params, train_stream, evaluator, settings, write)
    skipped.update(failed)
    timings["compare_s"] = time.perf_counter() - t0
    runs += [(f"finetune-{r['name']}", r["finetune"]["history"]) for r in rows
             if r.get("finetune")]
    table, compare_json = write(rows)
    plot_compare(os.path.join(args.out_dir, "compare.png"), rows, head_ctx)
    summary["compare"] = compare_json
    print(table, flush=True)
  timings["total_s"] = time.perf_counter() - start
  summary["timings"] = timings
  with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  plot_curves(os.path.join(args.out_dir, "curves.png"), runs)
  log(f"wrote {args.out_dir}/summary.json ({timings['total_s']:.0f} s)")
  return summary


if __name__ == "__main__":
  main()
