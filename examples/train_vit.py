"""Train a small ViT with DistrAttention (or exact attention) on an embedded dataset.

Config (the main job, runs on a CPU in a few minutes; on a GPU the Pallas kernels run):

    python examples/train_vit.py --compare

trains the same ViT (width 64, depth 4, 4 heads of 16 dims, 2x2 patches -> 16 tokens +
[cls]) on scikit-learn's handwritten digits (1,797 8x8 images, fixed 80/20 split) twice,
with exact attention and with DistrAttention (the library's defaults: G=2, grouping
"lowrank", one factorisation per sequence),
and writes `examples/out/summary.json`, `examples/out/curves.png` and a checkpoint per
run (`examples/out/checkpoint-{exact,distr}/state.msgpack`, used by `--resume`).
Expected (2-core CPU, XLA path, seed 0, jax 0.12.0.1, 2026-12-06): exact test accuracy
0.936, DistrAttention 0.936 (2026-11-25: `--grouping greedy --block-q 16` 0.942,
`--grouping lsh --block-q 16` 0.944), about 75 s of CPU time; jax 0.12.1 (2026-12-07):
exact 0.936, DistrAttention 0.925; other jax versions give other figures (README).

Other data: `--dataset cifar10 --data-dir DIR` reads the CIFAR-10 python batches
(data_batch_1..5, test_batch) from DIR. `--devices N` trains data-parallel over N local
devices (batch sharded, parameters replicated); `jax.distributed.initialize()` is called
when the usual multi-host environment variables are set.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from jax.sharding import NamedSharding, PartitionSpec as P

from distrattention_jax import grouping as grouping_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vit import AttentionConfig, ViT  # noqa: E402


def load_digits_dataset():
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]  # [N, 8, 8, 1]
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(labels))  # fixed split, any --seed
  test = order[: len(order) // 5]
  train = order[len(order) // 5:]
  return (images[train], labels[train]), (images[test], labels[test]), 10


def load_cifar10(data_dir):
  if not data_dir or not os.path.isdir(data_dir):
    raise FileNotFoundError(
        f"--data-dir {data_dir!r} is not a folder; it must hold the CIFAR-10 python batches "
        "(data_batch_1 .. data_batch_5 and test_batch, from cifar-10-python.tar.gz)")

  def read(name):
    path = os.path.join(data_dir, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"CIFAR-10 batch {path} is missing")
    try:
      with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
      data = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32)
      labels = np.asarray(batch[b"labels"], np.int32)
    except Exception as e:  # noqa: BLE001
      raise ValueError(f"{path} is not a CIFAR-10 python batch: {e}") from e
    return data.transpose(0, 2, 3, 1).astype(np.float32) / 255.0, labels

  parts = [read(f"data_batch_{i}") for i in range(1, 6)]
  train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
  return train, read("test_batch"), 10


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--attention", choices=["distr", "exact"], default="distr")
  p.add_argument("--compare", action="store_true", help="train exact and distr, same seed")
  p.add_argument("--group-size", type=int, default=2)
  p.add_argument("--block-q", type=lambda s: None if s.lower() == "none" else int(s),
                 default=None, help="query rows per grouping block; none (default): one "
                                    "per sequence")
  p.add_argument("--representative", default="mean", choices=["mean", "sample"])
  p.add_argument("--grouping", default="lowrank",
                 choices=list(grouping_lib.grouping_names()))
  p.add_argument("--implementation", default=None,
                 help="None (auto: cudnn or pallas on a GPU, xla on a CPU), xla, cudnn, pallas, "
                      "pallas_interpret")
  p.add_argument("--dataset", choices=["digits", "cifar10"], default="digits")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--epochs", type=int, default=30)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--patch-size", type=int, default=None, help="default: 2 (digits), 4 (cifar10)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--devices", type=int, default=None, help="data-parallel over N local devices")
  p.add_argument("--max-steps", type=int, default=None, help="stop after N steps (smoke tests)")
  p.add_argument("--out-dir", default="examples/out")
  p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
  p.add_argument("--init-from", default=None,
                 help="start from the parameters of a checkpoint (e.g. fine-tune an exact "
                      "model with DistrAttention): path of a state.msgpack")
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def make_mesh(num_devices):
  devices = jax.devices()[: num_devices or len(jax.devices())]
  if num_devices and len(devices) < num_devices:
    raise ValueError(f"--devices {num_devices}: only {len(jax.devices())} devices visible")
  return jax.sharding.Mesh(np.array(devices), ("data",))


def train_one(args, attention_kind, data, mesh):
  """Trains one model; returns its history dict. Checkpoints every epoch."""
  (x_train, y_train), (x_test, y_test), num_classes = data
  n_dev = mesh.size
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  if args.batch_size % n_dev:
    raise ValueError(f"--batch-size {args.batch_size} must be divisible by --devices {n_dev}")
  attention = AttentionConfig(
      kind=attention_kind, group_size=args.group_size, block_q=args.block_q,
      representative=args.representative, grouping=args.grouping,
      implementation=args.implementation,
      sharding=batch_sharding if n_dev > 1 else None)
  patch = args.patch_size or (2 if args.dataset == "digits" else 4)
  model = ViT(num_classes=num_classes, patch_size=patch, width=args.width, depth=args.depth,
              num_heads=args.heads, mlp_dim=2 * args.width, attention=attention)
  steps_per_epoch = len(x_train) // args.batch_size
  total_steps = steps_per_epoch * args.epochs
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, total_steps // 20),
                                                max(2, total_steps))
  tx = optax.adamw(schedule, weight_decay=1e-4)
  params = model.init(jax.random.key(args.seed), jnp.asarray(x_train[:2]))
  if args.init_from:  # both attentions share one parameter tree
    with open(args.init_from, "rb") as f:
      params = serialization.from_state_dict(
          params, serialization.msgpack_restore(f.read())["params"])
  opt_state = tx.init(params)
  state = {"params": params, "opt_state": opt_state, "epoch": 0, "step": 0,
           "history": json.dumps({"train_loss": [], "test_accuracy": [], "epoch_time_s": []})}
  ckpt_dir = os.path.join(args.out_dir, f"checkpoint-{attention_kind}")
  ckpt = os.path.join(ckpt_dir, "state.msgpack")
  if args.resume and os.path.isfile(ckpt):
    with open(ckpt, "rb") as f:
      restored = serialization.msgpack_restore(f.read())
    state = serialization.from_state_dict(state, restored)
    print(f"[{attention_kind}] resumed from {ckpt} at epoch {int(state['epoch'])}")
  history = json.loads(state["history"])
  params = jax.device_put(state["params"], replicated)
  opt_state = jax.device_put(state["opt_state"], replicated)

  def loss_fn(params, x, y):
    logits = model.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def predict(params, x):
    return jnp.argmax(model.apply(params, x), -1)

  def evaluate(params):
    correct = 0
    eval_batch = args.batch_size
    for i in range(0, len(x_test), eval_batch):
      xb, yb = x_test[i:i + eval_batch], y_test[i:i + eval_batch]
      pad = eval_batch - len(xb)  # keep shapes fixed (one compile) and divisible
      xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
      pred = np.asarray(predict(params, jax.device_put(xb, batch_sharding)))
      correct += int(np.sum(pred[: len(yb)] == yb))
    return correct / len(x_test)

  try:
    from tqdm import tqdm
  except ImportError:  # progress bars are optional
    tqdm = None
  rng = np.random.default_rng(args.seed)
  for _ in range(int(state["epoch"])):
    rng.permutation(len(x_train))  # same data order after a resume
  step = int(state["step"])
  for epoch in range(int(state["epoch"]), args.epochs):
    start = time.perf_counter()
    order = rng.permutation(len(x_train))
    losses = []
    batches = range(steps_per_epoch)
    if tqdm is not None and not args.no_progress:
      batches = tqdm(batches, desc=f"[{attention_kind}] epoch {epoch + 1}/{args.epochs}",
                     leave=False)
    for b in batches:
      idx = order[b * args.batch_size:(b + 1) * args.batch_size]
      xb = jax.device_put(x_train[idx], batch_sharding)
      yb = jax.device_put(y_train[idx], batch_sharding)
      params, opt_state, loss = train_step(params, opt_state, xb, yb)
      losses.append(float(loss))
      step += 1
      if args.max_steps and step >= args.max_steps:
        break
    accuracy = evaluate(params)
    elapsed = time.perf_counter() - start
    history["train_loss"].append(float(np.mean(losses)))
    history["test_accuracy"].append(accuracy)
    history["epoch_time_s"].append(elapsed)
    print(f"[{attention_kind}] epoch {epoch + 1}: train loss {np.mean(losses):.4f}  "
          f"test accuracy {accuracy:.4f}  ({elapsed:.1f} s)", flush=True)
    state.update(params=jax.device_get(params), opt_state=jax.device_get(opt_state),
                 epoch=epoch + 1, step=step, history=json.dumps(history))
    os.makedirs(ckpt_dir, exist_ok=True)
    with open(ckpt + ".tmp", "wb") as f:
      f.write(serialization.to_bytes(state))
    os.replace(ckpt + ".tmp", ckpt)
    if args.max_steps and step >= args.max_steps:
      break
  return {"attention": attention_kind, "steps": step, **history,
          "final_test_accuracy": history["test_accuracy"][-1]}


def plot(runs, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
  for run in runs:
    epochs = np.arange(1, len(run["train_loss"]) + 1)
    ax_loss.plot(epochs, run["train_loss"], marker=".", label=run["attention"])
    ax_acc.plot(epochs, run["test_accuracy"], marker=".", label=run["attention"])
  ax_loss.set(xlabel="epoch", ylabel="train loss", yscale="log", title="training loss")
  ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
  ax_acc.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  if any(v in os.environ for v in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")):
    jax.distributed.initialize()  # multi-host: the usual environment variables are set
  data = load_digits_dataset() if args.dataset == "digits" else load_cifar10(args.data_dir)
  mesh = make_mesh(args.devices)
  os.makedirs(args.out_dir, exist_ok=True)
  kinds = ["exact", "distr"] if args.compare else [args.attention]
  start = time.perf_counter()
  runs = [train_one(args, kind, data, mesh) for kind in kinds]
  summary = {"config": vars(args), "backend": jax.default_backend(),
             "devices": mesh.size, "device_kind": jax.devices()[0].device_kind,
             "jax": jax.__version__, "run_time_s": time.perf_counter() - start,
             "runs": runs}
  with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  plot(runs, os.path.join(args.out_dir, "curves.png"))
  for run in runs:
    print(f"{run['attention']:6s} final test accuracy {run['final_test_accuracy']:.4f}")
  print(f"wrote {args.out_dir}/summary.json and curves.png "
        f"({summary['run_time_s']:.0f} s)")
  return summary


if __name__ == "__main__":
  main()
