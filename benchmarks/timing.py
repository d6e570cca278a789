"""Timing helpers shared by the benchmark scripts: warm-up, rotated inputs, medians."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp


def make_inputs(batch, q_len, kv_len, heads, d, dtype, copies, seed=0):
  """`copies` independent (q, k, v) sets, rotated so caches do not flatter small sizes."""
  sets = []
  for c in range(copies):
    ks = jax.random.split(jax.random.key(seed + c), 3)
    sets.append(tuple(jax.random.normal(kk, (batch, n, heads, d), dtype)
                      for kk, n in zip(ks, (q_len, kv_len, kv_len))))
  return sets


def time_fn(fn, input_sets, *, warmup=3, reps=20, min_time_s=0.2, calls_per_sync=1):
  """Median wall time (ms) of `fn(*inputs)`, inputs rotated.

  calls_per_sync=1: each call synchronised on its own, so host dispatch of every kernel
  launch counts. calls_per_sync=k > 1: k calls dispatched back to back per
  synchronisation (the time per call), as in a jitted model whose host runs ahead of the
  GPU; this is close to GPU time. There the median is over max(3, reps // k + 1) rounds
  and min_time_s is not used."""
  for i in range(warmup):
    jax.block_until_ready(fn(*input_sets[i % len(input_sets)]))
  if calls_per_sync > 1:
    rounds = []
    for j in range(max(3, reps // calls_per_sync + 1)):
      t0 = time.perf_counter()
      for i in range(calls_per_sync):
        out = fn(*input_sets[(j + i) % len(input_sets)])
      jax.block_until_ready(out)
      rounds.append((time.perf_counter() - t0) * 1e3 / calls_per_sync)
    return statistics.median(rounds)
  times = []
  start = time.perf_counter()
  i = 0
  while i < reps or (time.perf_counter() - start < min_time_s and i < 10 * reps):
    args = input_sets[i % len(input_sets)]
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
    i += 1
  return statistics.median(times)


def device_info():
  dev = jax.devices()[0]
  info = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "host": platform.node()}
  try:
    info["driver"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    info["driver"] = None
  return info


def attention_flops(batch, heads, q_len, kv_len, d, causal, backward=False):
  """Exact-attention FLOPs (4 B H N^2 d; halved when causal; x3.5 with the backward)."""
  flops = 4.0 * batch * heads * q_len * kv_len * d * (0.5 if causal else 1.0)
  return flops * (3.5 if backward else 1.0)


def write_json(path, payload):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=1)
  return path


def loss_grad(fn):
  """jit(grad) of sum(fn(q, k, v) * 1) w.r.t. q, k, v: forward plus backward."""
  def loss(q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
