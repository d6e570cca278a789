"""Run by tests/test_sharding.py in a fresh process with 4 fake CPU devices.

Inputs sharded over batch/heads by `jax.device_put`, then plain `jax.jit` with no
`sharding=` argument: the XLA path (every grouping) must partition without moving
q/k/v between devices (no all-gather / all-to-all / collective-permute / all-reduce)
and equal the unsharded call, forward and gradients. With Auto mesh axes GSPMD
partitions the computation; with Explicit ones the sharding in the query's type routes
it through the same per-shard path as `sharding=`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Sets XLA_FLAGS (4 fake devices) before JAX starts, and puts the repository on the path.
from sharding_check import COLLECTIVES, inputs, meshes  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import distrattention_jax as dj  # noqa: E402

REFS = {}  # unsharded results per (grouping, G, implementation[, "grad"])


def main():
  for mesh in meshes():
    check(mesh)
  print("PLAIN JIT SHARDING OK")


def check(mesh):
  q, k, v = inputs()
  explicit = mesh.axis_types[0] == jax.sharding.AxisType.Explicit
  specs = [P("data", None, "model"), P(("data", "model"))]
  if not explicit:
    specs += [P("data"), P(None, None, "model")]
  for spec in specs:
    sharding = NamedSharding(mesh, spec)
    used = {a for e in spec if e is not None for a in (e if isinstance(e, tuple) else (e,))}
    qs, ks, vs = (jax.device_put(x, sharding) for x in (q, k, v))
    # "random" under the per-shard route draws each shard's permutations from local
    # indices (as with sharding=), so it differs from the unsharded call: Auto only.
    with_grad = spec in specs[:2]
    cases = [("greedy", 2, "xla", with_grad), ("greedy", 4, "xla", False),
             ("lsh", 2, "xla", False)]
    cases += [("random", 2, "xla", False)] if not explicit else [
        ("greedy", 2, "pallas_interpret", False)]  # Pallas: explicit route only
    for grouping, group_size, impl, with_grad in cases:
      kw = dict(group_size=group_size, block_q=16, grouping=grouping, is_causal=True,
                implementation=impl)
      # Compiled once, then called and inspected (compiles are most of this check's time).
      fn = jax.jit(lambda q, k, v: dj.distr_attention(q, k, v, **kw))  # noqa: B023
      fn = fn.lower(qs, ks, vs).compile()
      out = fn(qs, ks, vs)
      key = (grouping, group_size, impl)
      if key not in REFS:  # the unsharded result, the same for every mesh and spec
        REFS[key] = dj.distr_attention(q, k, v, **kw)
      np.testing.assert_allclose(out, REFS[key], atol=1e-5, rtol=1e-5)
      hlo = fn.as_text()
      found = [c for c in COLLECTIVES if c in hlo]
      assert not found, (mesh.axis_types[0], spec, grouping, group_size, impl, found)
      if with_grad:
        loss = lambda q, k, v: jnp.sum(jnp.sin(dj.distr_attention(q, k, v, **kw)))  # noqa: B023,E731
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(qs, ks, vs).compile()
        if key + ("grad",) not in REFS:
          REFS[key + ("grad",)] = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(grad(qs, ks, vs), REFS[key + ("grad",)]):
          np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
        hlo = grad.as_text()
        allowed = ()
        if explicit and len(used) < len(mesh.axis_names):
          # Known: under shard_map (the explicit route, as with sharding=), gradients
          # of inputs replicated over an unused mesh axis are all-reduced over it.
          allowed = ("all-reduce",)
        found = [c for c in COLLECTIVES if c in hlo and c not in allowed]
        assert not found, ("grad", mesh.axis_types[0], spec, grouping, group_size, found)
      print(f"ok {mesh.axis_types[0]} spec={spec} {grouping} G={group_size} {impl}",
            flush=True)


if __name__ == "__main__":
  main()
