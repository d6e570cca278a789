"""Our Mosaic GPU (Hopper) attention kernels: GPU parity against a float32 reference, and
lowering for CUDA on a CPU (abstract H100).

Run the GPU part on an H100/H200:  PYTHONPATH=. python -m pytest -q -m gpu tests/test_mosaic_gpu.py
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mosaic_gpu import attention as mosaic
from pallas_kernels.mosaic_gpu import tiles as mosaic_tiles
from conftest import lower_for_h100, rel_error, requires_gpu


def reference(q, k, v, causal, q_offset=0):
  """float32 softmax(q k^T) v with GQA by head index (q already scaled); also the lse.
  Under causal, query row i sits at position i + q_offset."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  heads, k_heads, v_heads = q.shape[2], k.shape[2], v.shape[2]
  k = jnp.repeat(k, heads // k_heads, axis=2)
  v = jnp.repeat(v, heads // v_heads, axis=2)
  s = jnp.einsum("bqhc,bkhc->bhqk", q, k, precision="highest")
  if causal:
    rows = jnp.arange(q.shape[1])[:, None] + q_offset
    cols = jnp.arange(k.shape[1])[None, :]
    s = jnp.where(cols <= rows, s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.exp(s - lse[..., None])
  return jnp.einsum("bhqk,bkhc->bqhc", p, v, precision="highest"), lse


def _inputs(seed, q_len, kv_len, heads, k_heads, v_heads, r, dv, dtype):
  ks = jax.random.split(jax.random.key(seed), 4)
  # Scale folded in (as the caller does); 2/sqrt(r) makes the softmax peaked enough
  # to catch row-max bookkeeping errors.
  q = (jax.random.normal(ks[0], (1, q_len, heads, r), jnp.float32) * 2 * r ** -0.5).astype(dtype)
  k = jax.random.normal(ks[1], (1, kv_len, k_heads, r), dtype)
  v = jax.random.normal(ks[2], (1, kv_len, v_heads, dv), dtype)
  d_out = jax.random.normal(ks[3], (1, q_len, heads, dv), dtype)
  return q, k, v, d_out


# (r, dv, causal, dtype, heads, k_heads, v_heads, q_len, kv_len, backward):
# backward "table" = the tile table's choice, "fused" / "split" = forced one-kernel
# (dQ by float32 reduce-add) / two-kernel backward.
CASES = [
    (128, 128, False, jnp.bfloat16, 4, 2, 2, 1000, 1000, "table"),
    (64, 128, False, jnp.float16, 4, 4, 2, 1000, 777, "table"),
    (64, 128, True, jnp.bfloat16, 4, 4, 2, 777, 1000, "split"),
    (32, 128, True, jnp.bfloat16, 4, 4, 2, 4096, 4096, "table"),
    (16, 128, True, jnp.float16, 4, 2, 2, 1000, 900, "table"),
    (64, 256, False, jnp.bfloat16, 4, 2, 2, 4096, 4096, "table"),
    (32, 256, True, jnp.bfloat16, 4, 4, 2, 777, 1000, "table"),
    (64, 64, True, jnp.bfloat16, 4, 4, 4, 1000, 1000, "table"),
    (32, 128, True, jnp.bfloat16, 2, 2, 2, 16384, 16384, "table"),
    # 64-key tiles in a buffer padded to 128 keys: 119 padding keys span two tiles (until
    # 2026-12-06 only the last was masked, and the other's zero keys entered the softmax).
    (128, 256, False, jnp.bfloat16, 4, 2, 2, 1000, 777, "table"),
    (128, 256, True, jnp.float16, 4, 4, 2, 777, 1100, "table"),
]


_reference_jit = jax.jit(reference, static_argnames=("causal",))


@functools.partial(jax.jit, static_argnames=("causal",))
def _reference_grads(q, k, v, d_out, causal):
  _, vjp = jax.vjp(lambda q, k, v: reference(q, k, v, causal)[0], q, k, v)
  return vjp(d_out.astype(jnp.float32))


def _tiles(r, dv, dtype, backward):
  tiles = mosaic_tiles.pick_tiles(r, dv, dtype)
  if backward == "table":
    return tiles
  return dataclasses.replace(tiles, fused_bwd=backward == "fused")


def _check(got, want, what, tol):
  err = rel_error(got, want)  # also fails on any non-finite value
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  worst = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
  assert err < tol and worst < 10 * tol, f"{what}: rel L2 {err:.2e}, worst {worst:.2e}"


def _tol(dtype):
  """Relative L2 tolerance of a kernel output against the float32 reference."""
  return 1e-2 if dtype == jnp.bfloat16 else 5e-3


def _check_forward(q, k, v, causal, tiles, tol):
  """The forward kernel's out and lse against the float32 reference; returns out_ref."""
  out, lse = mosaic.forward(q, k, v, causal=causal, kv_len=None, tiles=tiles)
  out_ref, lse_ref = _reference_jit(q, k, v, causal=causal)
  assert out.shape == q.shape[:3] + v.shape[3:] and out.dtype == q.dtype
  _check(out, out_ref, "out", tol)
  _check(lse, lse_ref, "lse", 1e-3)
  return out_ref


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("r,dv,causal,dtype,heads,k_heads,v_heads,q_len,kv_len,backward", CASES)
def test_forward_and_gradients(r, dv, causal, dtype, heads, k_heads, v_heads, q_len, kv_len,
                               backward):
  q, k, v, d_out = _inputs(r + dv + q_len + kv_len + causal, q_len, kv_len, heads,
                           k_heads, v_heads, r, dv, dtype)
  tiles = _tiles(r, dv, dtype, backward)
  tol = _tol(dtype)
  # Same static arguments as the custom VJP's forward, so that it compiles once.
  out_ref = _check_forward(q, k, v, causal, tiles, tol)

  out2, vjp = jax.vjp(lambda q, k, v: mosaic.attention(q, k, v, causal=causal, tiles=tiles),
                      q, k, v)
  grads = vjp(d_out)
  grads_ref = _reference_grads(q, k, v, d_out, causal=causal)
  _check(out2, out_ref, "out (vjp)", tol)
  for name, g, g_ref, x in zip(("dq", "dk", "dv"), grads, grads_ref, (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype, name
    _check(g, g_ref, name, 2 * tol)


@pytest.mark.gpu
@requires_gpu
def test_kv_len_ignores_keys_past_it():
  q, k, v, d_out = _inputs(7, 300, 500, 2, 2, 2, 64, 128, jnp.bfloat16)
  out, vjp = jax.vjp(lambda q, k, v: mosaic.attention(q, k, v, kv_len=321), q, k, v)
  out_ref, vjp_ref = jax.vjp(lambda q, k, v: reference(q, k[:, :321], v[:, :321], False)[0],
                             q, k, v)
  _check(out, out_ref, "out", 1e-2)
  for name, g, g_ref in zip(("dq", "dk", "dv"), vjp(d_out), vjp_ref(d_out.astype(jnp.float32))):
    _check(g, g_ref, name, 2e-2)


def _ramp_scores(q, k, ramp):
  """Adds about ramp * j / kv_len to every score of key j (a ramp on feature 0 of k, q's
  feature 0 raised by 1), so that rows' maxima keep growing from key tile to key tile."""
  pos = jnp.arange(k.shape[1], dtype=jnp.float32) / k.shape[1]
  k = k.astype(jnp.float32).at[..., 0].add(ramp * pos[None, :, None]).astype(k.dtype)
  q = q.astype(jnp.float32).at[..., 0].add(1.0).astype(q.dtype)
  return q, k


# (r, dv, causal, dtype, heads, k_heads, v_heads, q_len, kv_len, ramp): ramp > 0 makes
# the row maxima grow by ~ramp nats over the keys (~1.4 * ramp bits: several moves of
# the stale max by more than 8 bits), so the rescale branch runs after the first tile.
RESCALE_CASES = [
    (32, 128, False, jnp.bfloat16, 4, 4, 2, 4096, 4096, 0.0),
    (32, 128, True, jnp.float16, 4, 2, 2, 1000, 900, 0.0),
    (128, 128, False, jnp.bfloat16, 4, 2, 2, 1000, 1000, 0.0),
    (32, 128, False, jnp.bfloat16, 4, 4, 2, 4096, 4096, 48.0),
    (64, 128, True, jnp.float16, 4, 4, 2, 1000, 1000, 24.0),
]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("r,dv,causal,dtype,heads,k_heads,v_heads,q_len,kv_len,ramp",
                         RESCALE_CASES)
def test_forward_conditional_rescale(r, dv, causal, dtype, heads, k_heads, v_heads, q_len,
                                     kv_len, ramp):
  """Tiles(rescale_threshold=8): stale row max, O rescaled only when some row's max grew
  by more than 8 (log2: a factor 2^8); same output and lse as the reference."""
  q, k, v, _ = _inputs(3 * r + q_len + kv_len + causal, q_len, kv_len, heads, k_heads,
                       v_heads, r, dv, dtype)
  if ramp:
    q, k = _ramp_scores(q, k, ramp)
  tiles = dataclasses.replace(mosaic_tiles.pick_tiles(r, dv, dtype), rescale_threshold=8.0)
  _check_forward(q, k, v, causal, tiles, _tol(dtype))


# (r, dv, causal, dtype, heads, k_heads, v_heads, q_len, kv_len, tiles overrides):
# Tiles(stage_out=False) stores O from registers; the key tiles it makes room for.
DIRECT_OUT_CASES = [
    (64, 256, False, jnp.bfloat16, 4, 2, 2, 1000, 900, {"block_kv": 128}),
    (32, 256, True, jnp.float16, 4, 4, 2, 1000, 1000, {"block_kv": 128}),
    (64, 128, True, jnp.bfloat16, 4, 4, 4, 4096, 4096, {"block_kv": 256}),
    (128, 256, False, jnp.bfloat16, 4, 2, 2, 1000, 777, {}),
    (32, 128, False, jnp.float16, 4, 4, 2, 777, 1000, {}),
]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("r,dv,causal,dtype,heads,k_heads,v_heads,q_len,kv_len,overrides",
                         DIRECT_OUT_CASES)
def test_forward_direct_out(r, dv, causal, dtype, heads, k_heads, v_heads, q_len, kv_len,
                            overrides):
  """Tiles(stage_out=False): O written from registers; same output and lse as the
  reference, padded query rows included in the kernel's output but sliced off."""
  q, k, v, _ = _inputs(5 * r + q_len + kv_len + causal, q_len, kv_len, heads, k_heads,
                       v_heads, r, dv, dtype)
  tiles = dataclasses.replace(mosaic_tiles.pick_tiles(r, dv, dtype), stage_out=False,
                              **overrides)
  _check_forward(q, k, v, causal, tiles, _tol(dtype))


def reference_blocked(q, k, v, group_block_q, causal):
  """Per grouping block j: its query rows against its own K_fused k[:, j]."""
  outs = []
  for j in range(k.shape[1]):
    start = j * group_block_q
    q_block = q[:, start:start + group_block_q]
    outs.append(reference(q_block, k[:, j], v, causal, q_offset=start)[0])
  return jnp.concatenate(outs, axis=1)


# (r, dv, causal, dtype, heads, k_heads, v_heads, q_len, kv_len, group_block_q)
BLOCKED_CASES = [
    (32, 128, True, jnp.bfloat16, 4, 4, 2, 600, 700, 256),
    (64, 256, False, jnp.float16, 4, 2, 2, 600, 500, 256),
]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("r,dv,causal,dtype,heads,k_heads,v_heads,q_len,kv_len,group_block_q",
                         BLOCKED_CASES)
def test_k_fused_per_grouping_block(r, dv, causal, dtype, heads, k_heads, v_heads, q_len,
                                    kv_len, group_block_q):
  q, _, v, d_out = _inputs(11 + r + q_len, q_len, kv_len, heads, k_heads, v_heads, r, dv,
                           dtype)
  num_blocks = -(-q_len // group_block_q)
  k = jax.random.normal(jax.random.key(q_len), (1, num_blocks, kv_len, k_heads, r), dtype)
  tol = _tol(dtype)
  fn = functools.partial(mosaic.attention_blocked, group_block_q=group_block_q,
                         causal=causal)
  out, vjp = jax.vjp(fn, q, k, v)
  ref_fn = jax.jit(functools.partial(reference_blocked, group_block_q=group_block_q,
                                     causal=causal))
  out_ref, vjp_ref = jax.vjp(ref_fn, q, k, v)
  _check(out, out_ref, "out", tol)
  for name, g, g_ref, x in zip(("dq", "dk", "dv"), vjp(d_out),
                               vjp_ref(d_out.astype(jnp.float32)), (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype, name
    _check(g, g_ref, name, 2 * tol)


def test_tile_table_fits_shared_memory_and_widens_narrow_key_tiles():
  """Every shipped (r, dv) gets tiles that fit shared memory; narrow scores (r <= 32,
  dv <= 128) stream 256-key tiles (measured faster, tiles.py); O is stored from
  registers where only that buys the wider key tiles (r=64 at dv=128 and 256), and
  only G=1 at d=128 (r = dv = 128) keeps a stale row max."""
  want = {(128, 128): 128, (64, 128): 256, (64, 64): 128, (128, 256): 64, (64, 256): 128,
          (32, 256): 128}
  for r, dv in SHIPPED:
    tiles = mosaic_tiles.pick_tiles(r, dv, jnp.bfloat16)
    assert tiles.forward_smem_bytes(r, dv, 2) <= mosaic_tiles.SMEM_BYTES - 8192, (r, dv)
    assert tiles.block_kv == want.get((r, dv), 256), (r, dv, tiles.block_kv)
    assert tiles.kv_multiple % tiles.block_kv == 0
    assert tiles.stage_out == ((r, dv) not in ((64, 128), (64, 256))), (r, dv)
    assert tiles.rescale_threshold == (8.0 if r == dv == 128 else 0.0), (r, dv)
  # Staged O would not leave room for the direct-store tiles' key stages.
  for r, dv in ((64, 128), (64, 256)):
    tiles = dataclasses.replace(mosaic_tiles.pick_tiles(r, dv, jnp.bfloat16), stage_out=True)
    assert tiles.forward_smem_bytes(r, dv, 2) > mosaic_tiles.SMEM_BYTES - 8192, (r, dv)


def test_tiles_are_validated():
  with pytest.raises(ValueError):
    mosaic_tiles.Tiles(block_kv=96)
  with pytest.raises(ValueError):
    mosaic_tiles.Tiles(stages=1)


def test_rescale_threshold_is_validated():
  assert mosaic_tiles.Tiles().rescale_threshold == 0.0  # default: rescale every tile
  assert mosaic_tiles.Tiles(rescale_threshold=8.0).rescale_threshold == 8.0
  assert mosaic_tiles.Tiles(rescale_threshold=mosaic_tiles.MAX_RESCALE_THRESHOLD)
  # Negative, NaN, or so large that P (up to 2^threshold) overflows float16 (max 65504).
  for bad in (-1.0, float("nan"), 16.0, float("inf")):
    with pytest.raises(ValueError, match="rescale_threshold"):
      mosaic_tiles.Tiles(rescale_threshold=bad)


# --- CPU: Mosaic GPU kernels lower for CUDA on an abstract H100 (no GPU needed) --------

# Every (r, dv) the tile table is used for (d=64/128/256 at G=1/2/4/8).
SHIPPED = [(128, 128), (64, 128), (32, 128), (16, 128), (64, 64), (32, 64), (16, 64),
           (128, 256), (64, 256), (32, 256)]


@pytest.mark.parametrize("r,dv", SHIPPED)
def test_lowers_for_cuda_on_cpu(r, dv):
  causal = (r + dv) % 3 == 0  # alternate causal on/off across the table
  args = (jax.ShapeDtypeStruct((1, 1000, 4, r), jnp.bfloat16),
          jax.ShapeDtypeStruct((1, 900, 2, r), jnp.bfloat16),
          jax.ShapeDtypeStruct((1, 900, 2, dv), jnp.bfloat16))

  def loss(q, k, v):
    return jnp.sum(mosaic.attention(q, k, v, causal=causal).astype(jnp.float32))

  text = lower_for_h100(jax.grad(loss, argnums=(0, 1, 2)), *args)
  # Forward, then dQ and dK/dV kernels, or one fused backward kernel.
  fused = mosaic_tiles.pick_tiles(r, dv, jnp.bfloat16).fused_bwd
  assert text.count("stablehlo.custom_call @mosaic_gpu") == (2 if fused else 3)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("r", [32, 128])
def test_conditional_rescale_lowers_for_cuda_on_cpu(r, causal):
  dv = 128
  tiles = dataclasses.replace(mosaic_tiles.pick_tiles(r, dv, jnp.bfloat16),
                              rescale_threshold=8.0)
  args = (jax.ShapeDtypeStruct((1, 1000, 4, r), jnp.bfloat16),
          jax.ShapeDtypeStruct((1, 900, 2, r), jnp.bfloat16),
          jax.ShapeDtypeStruct((1, 900, 2, dv), jnp.bfloat16))

  def loss(q, k, v):
    out = mosaic.attention(q, k, v, causal=causal, tiles=tiles)
    return jnp.sum(out.astype(jnp.float32))

  text = lower_for_h100(jax.grad(loss, argnums=(0, 1, 2)), *args)
  assert text.count("stablehlo.custom_call @mosaic_gpu") == (2 if tiles.fused_bwd else 3)
  # The warpgroup-wide OR that guards the O rescale is in the forward kernel ...
  assert "bar.red.or.pred" in text
  # ... and only there; the table picks it for r = dv = 128 only.
  default = lower_for_h100(lambda q, k, v: mosaic.forward(q, k, v, causal=causal)[0], *args)
  assert ("bar.red.or.pred" in default) == (r == dv)


@pytest.mark.parametrize("r,dv,overrides", [(64, 256, {"block_kv": 128}),
                                             (64, 128, {"block_kv": 256})])
def test_direct_out_lowers_for_cuda_on_cpu(r, dv, overrides):
  """stage_out=False: no O staging buffer, so these key tiles fit shared memory (with
  the staging buffer they do not: the smem check rejects them)."""
  args = (jax.ShapeDtypeStruct((1, 1000, 4, r), jnp.bfloat16),
          jax.ShapeDtypeStruct((1, 900, 2, r), jnp.bfloat16),
          jax.ShapeDtypeStruct((1, 900, 2, dv), jnp.bfloat16))
  base = dataclasses.replace(mosaic_tiles.pick_tiles(r, dv, jnp.bfloat16), stage_out=True,
                             **overrides)
  direct = dataclasses.replace(base, stage_out=False)
  assert direct.forward_smem_bytes(r, dv, 2) <= mosaic_tiles.SMEM_BYTES
  assert base.forward_smem_bytes(r, dv, 2) > mosaic_tiles.SMEM_BYTES
  text = lower_for_h100(lambda q, k, v: mosaic.forward(q, k, v, causal=True, tiles=direct)[0],
                        *args)
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
  with pytest.raises(ValueError, match="shared memory"):
    lower_for_h100(lambda q, k, v: mosaic.forward(q, k, v, causal=True, tiles=base)[0], *args)


@pytest.mark.parametrize("causal", [False, True])
def test_blocked_lowers_for_cuda_on_cpu(causal):
  args = (jax.ShapeDtypeStruct((1, 1000, 4, 32), jnp.bfloat16),
          jax.ShapeDtypeStruct((1, 4, 1000, 4, 32), jnp.bfloat16),
          jax.ShapeDtypeStruct((1, 1000, 2, 128), jnp.bfloat16))

  def loss(q, k, v):
    out = mosaic.attention_blocked(q, k, v, group_block_q=256, causal=causal)
    return jnp.sum(out.astype(jnp.float32))

  text = lower_for_h100(jax.grad(loss, argnums=(0, 1, 2)), *args)
  # A forward and a fused backward kernel per distinct block call: non-causal, the three
  # full blocks share one jitted function and the short last block has its own; causal,
  # every block has its own query offset.
  assert text.count("stablehlo.custom_call @mosaic_gpu") == (8 if causal else 4)


# The query projection inside the forward kernel (`attention_projected`):
# (d, r, causal, dtype, heads, k_heads, q_len, kv_len)
PROJECTED_CASES = [
    (128, 32, False, jnp.bfloat16, 4, 2, 1000, 1000),
    (128, 32, True, jnp.bfloat16, 2, 2, 4096, 4096),
    (128, 16, True, jnp.float16, 4, 4, 777, 1000),
    (64, 32, False, jnp.bfloat16, 4, 2, 1000, 777),
    (64, 16, True, jnp.bfloat16, 4, 2, 1000, 1000),
]


def _projected_inputs(seed, d, r, dtype, heads, k_heads, q_len, kv_len):
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (2, q_len, heads, d), dtype)
  # A dense map with the softmax scale in it: Q_rep entries ~ 2 / sqrt(r) * N(0, 1)
  # (peaked enough to catch row-max errors, as `_inputs`).
  q_map = jax.random.normal(ks[1], (2, heads, d, r), jnp.float32) * (2 / np.sqrt(d * r))
  k = jax.random.normal(ks[2], (2, kv_len, k_heads, r), dtype)
  v = jax.random.normal(ks[3], (2, kv_len, k_heads, d), dtype)
  d_out = jax.random.normal(ks[4], (2, q_len, heads, d), dtype)
  return q, q_map, k, v, d_out


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("d,r,causal,dtype,heads,k_heads,q_len,kv_len", PROJECTED_CASES)
def test_projected_forward_and_gradients(d, r, causal, dtype, heads, k_heads, q_len, kv_len):
  q, q_map, k, v, d_out = _projected_inputs(d + r + q_len + causal, d, r, dtype, heads,
                                            k_heads, q_len, kv_len)
  tol = _tol(dtype)

  def ref(q, k, v):  # float32 attention at Q_rep = q q_map (the map held constant)
    q_rep = jnp.einsum("bthd,bhdr->bthr", q.astype(jnp.float32), q_map, precision="highest")
    return reference(q_rep, k, v, causal)[0]

  out, vjp = jax.vjp(lambda q, k, v: mosaic.attention_projected(q, q_map, k, v,
                                                                causal=causal), q, k, v)
  out_ref, vjp_ref = jax.vjp(ref, q, k, v)
  assert out.shape == q.shape and out.dtype == q.dtype
  _check(out, out_ref, "out", tol)
  # Against the kernel on the XLA projection: the same Q_rep up to the map's last bits.
  q_rep = mosaic.project_queries(q, q_map)
  _check(out, mosaic.attention(q_rep, k, v, causal=causal), "out vs unfused", tol / 4)
  _, lse = mosaic.forward_projected(q, q_map, k, v, causal=causal)
  _check(lse, mosaic.forward(q_rep, k, v, causal=causal)[1], "lse vs unfused", 1e-3)
  for name, g, g_ref, x in zip(("dq", "dk", "dv"), vjp(d_out),
                               vjp_ref(d_out.astype(jnp.float32)), (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype, name
    _check(g, g_ref, name, 2 * tol)


def test_projection_supported_names_what_is_wrong():
  ok = ((1, 100, 4, 128), (1, 4, 128, 32), (1, 100, 2, 128), jnp.bfloat16)
  assert mosaic.projection_supported(*ok) is None
  assert "differs from v" in mosaic.projection_supported(
      (1, 100, 4, 128), (1, 4, 128, 32), (1, 100, 2, 64), jnp.bfloat16)
  assert "map width" in mosaic.projection_supported(
      (1, 100, 4, 64), (1, 4, 64, 8), (1, 100, 2, 64), jnp.bfloat16)
  assert "does not match" in mosaic.projection_supported(
      (1, 100, 4, 128), (1, 2, 128, 32), (1, 100, 2, 128), jnp.bfloat16)
  # r=64 at dv=128 stores O from registers (no staging buffer for the Q tile)
  assert "staging" in mosaic.projection_supported(
      (1, 100, 4, 128), (1, 4, 128, 64), (1, 100, 2, 128), jnp.bfloat16)
  assert "shared memory" in mosaic.projection_supported(
      (1, 100, 4, 256), (1, 4, 256, 32), (1, 100, 2, 256), jnp.bfloat16)
  with pytest.raises(ValueError, match="forward_projected: .*staging"):
    mosaic.forward_projected(jnp.zeros((1, 128, 2, 128), jnp.bfloat16),
                             jnp.zeros((1, 2, 128, 64)), jnp.zeros((1, 128, 2, 64), jnp.bfloat16),
                             jnp.zeros((1, 128, 2, 128), jnp.bfloat16), causal=False)


@pytest.mark.parametrize("d,r,causal", [(128, 32, False), (64, 16, True)])
def test_projected_lowers_for_cuda_on_cpu(d, r, causal):
  args = (jax.ShapeDtypeStruct((1, 1000, 4, d), jnp.bfloat16),
          jax.ShapeDtypeStruct((1, 4, d, r), jnp.float32),
          jax.ShapeDtypeStruct((1, 900, 2, r), jnp.bfloat16),
          jax.ShapeDtypeStruct((1, 900, 2, d), jnp.bfloat16))

  def loss(q, q_map, k, v):
    return jnp.sum(mosaic.attention_projected(q, q_map, k, v, causal=causal)
                   .astype(jnp.float32))

  text = lower_for_h100(jax.grad(loss, argnums=(0, 2, 3)), *args)
  fused = mosaic_tiles.pick_tiles(r, d, jnp.bfloat16).fused_bwd
  assert text.count("stablehlo.custom_call @mosaic_gpu") == (2 if fused else 3)


def test_project_queries_is_the_sixteen_bit_map_product():
  """The XLA side of the projected path (Q_rep for the backward, dq): the map as two half
  parts, float32 products, one rounding; within bf16 rounding of the float32 product."""
  q, q_map, _, _, _ = _projected_inputs(0, 128, 32, jnp.bfloat16, 2, 2, 256, 256)
  got = mosaic.project_queries(q, q_map)
  want = jnp.einsum("bthd,bhdr->bthr", q.astype(jnp.float32), q_map, precision="highest")
  assert got.dtype == jnp.bfloat16
  assert rel_error(got, want) < 4e-3          # bf16 rounding of the output
  assert rel_error(got, want.astype(jnp.bfloat16)) < 1e-3  # and mostly the same rounding
