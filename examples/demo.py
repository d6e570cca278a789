"""A short demo: DistrAttention vs exact attention, error and time, on any backend.

    python examples/demo.py [--n 1024 --d 64 --heads 8]

Q has column structure like a trained model's (columns are noisy copies of a few
prototypes; on structureless Gaussian Q/K every grouping is poor, see the README), K and
V are Gaussian. Prints the relative L2 error of the output against exact attention and
the time per call, for several group sizes and grouping blocks.
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import distrattention_jax as dj


def structured_query(rng, batch, length, heads, d, prototypes=8, noise=0.1):
  protos = rng.standard_normal((batch, length, heads, prototypes))
  owner = rng.integers(0, prototypes, size=d)
  q = protos[..., owner] + noise * rng.standard_normal((batch, length, heads, d))
  return jnp.asarray(q, jnp.float32)


def timed(fn, *args, reps=5):
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / reps * 1e3


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--n", type=int, default=1024)
  p.add_argument("--d", type=int, default=64)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--implementation", default=None)
  args = p.parse_args()
  rng = np.random.default_rng(0)
  q = structured_query(rng, 1, args.n, args.heads, args.d)
  k = jnp.asarray(rng.standard_normal((1, args.n, args.heads, args.d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((1, args.n, args.heads, args.d)), jnp.float32)
  exact = jax.jit(functools.partial(dj.distr_attention, group_size=1,
                                    implementation=args.implementation))
  ref = exact(q, k, v)
  print(f"backend {jax.default_backend()}, N={args.n}, d={args.d}, heads={args.heads}")
  print(f"{'setting':34s} {'rel. L2 error':>14s} {'ms/call':>9s}")
  print(f"{'exact (G=1)':34s} {0.0:14.4f} {timed(exact, q, k, v):9.2f}")
  for g in (2, 4):
    for grouping in ("lsh", "greedy", "random"):
      for block_q in (16, 128, args.n):
        fn = jax.jit(functools.partial(dj.distr_attention, group_size=g, block_q=block_q,
                                       grouping=grouping,
                                       implementation=args.implementation))
        out = fn(q, k, v)
        err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        name = f"G={g} block_q={block_q} {grouping}"
        print(f"{name:34s} {err:14.4f} {timed(fn, q, k, v):9.2f}")


if __name__ == "__main__":
  main()
