"""Run by tests/test_sharding.py in a fresh process with 4 fake CPU devices.

Checks that batch/head-sharded DistrAttention equals the unsharded call (forward and
gradients, XLA and Pallas-interpret paths) and that the compiled program moves no q/k/v
between devices (no all-gather / all-to-all / collective-permute).
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distrattention_jax as dj  # noqa: E402


COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce")


def inputs(batch=4, length=40, heads=4, kv_heads=2, d=32):
  """Fresh Gaussian float32 q `[B, T, H, d]`, k and v `[B, T, Hkv, d]` (seed 0)."""
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.standard_normal((batch, length, heads, d)), jnp.float32),
          jnp.asarray(rng.standard_normal((batch, length, kv_heads, d)), jnp.float32),
          jnp.asarray(rng.standard_normal((batch, length, kv_heads, d)), jnp.float32))


def meshes():
  """A 2 x 2 ("data", "model") mesh of the 4 fake devices, with Explicit then Auto axes."""
  assert jax.device_count() == 4, jax.devices()
  for axis_type in (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto):
    yield jax.make_mesh((2, 2), ("data", "model"), axis_types=(axis_type, axis_type))


def main():
  for mesh in meshes():
    check(mesh)
  print("SHARDING OK")


def check(mesh):
  q, k, v = inputs()
  batch, length = q.shape[:2]
  seg = jnp.asarray((np.arange(length)[None] >= 25).repeat(batch, 0), jnp.int32)
  lengths = jnp.array([40, 30, 20, 10])
  refs = {}  # the unsharded results per implementation (the same for every spec)
  for spec in (P("data", None, "model", None), P(("data", "model")), P(None, None, "model")):
    sharding = NamedSharding(mesh, spec)
    kv_sharding = NamedSharding(mesh, P(*(tuple(spec) + (None,) * 4)[:4]))
    qs, ks, vs = (jax.device_put(x, s) for x, s in ((q, sharding), (k, kv_sharding),
                                                   (v, kv_sharding)))
    for impl in ("xla", "pallas_interpret"):
      kw = dict(group_size=2, block_q=16, grouping="greedy", is_causal=True, segment_ids=seg,
                key_value_seq_lengths=lengths, implementation=impl)
      loss = lambda q, k, v, sh: jnp.sum(jnp.sin(dj.distr_attention(  # noqa: E731
          q, k, v, sharding=sh, **kw)))
      # Compiled once, then called and inspected (a call plus .lower().compile() would
      # compile twice: these compiles are most of this check's time).
      sharded = jax.jit(lambda q, k, v: dj.distr_attention(q, k, v, sharding=sharding, **kw))
      sharded = sharded.lower(qs, ks, vs).compile()
      out = sharded(qs, ks, vs)
      if impl not in refs:
        refs[impl] = (dj.distr_attention(q, k, v, **kw),
                      jax.grad(lambda q, k, v: loss(q, k, v, None), argnums=(0, 1, 2))(q, k, v))
      ref, ref_grads = refs[impl]
      np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
      grads = jax.jit(jax.grad(lambda q, k, v: loss(q, k, v, sharding), argnums=(0, 1, 2)))(
          qs, ks, vs)
      for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
      hlo = sharded.as_text()
      for collective in COLLECTIVES:
        assert collective not in hlo, (spec, impl, collective)
      print(f"ok {mesh.axis_types[0]} spec={spec} impl={impl}", flush=True)
  # Sequence sharding is refused with a clear error.
  try:
    dj.distr_attention(q, k, v, sharding=NamedSharding(mesh, P(None, "data")))
  except NotImplementedError as e:
    assert "batch and heads" in str(e)
  else:
    raise AssertionError("sequence sharding was not refused")


if __name__ == "__main__":
  main()
