"""Randomized property test: every implementation against `distr_attention_reference`.

Each case draws one configuration from its seed (batch, ragged lengths including 1 and
non-multiples of 16, GQA, head dims including non-powers of two, every G dividing d and
block_q from 1 to 256, causal, both representatives, every grouping, segment ids,
sequence lengths, dense masks, dtypes, a custom scale, sometimes huge float32 logits)
and checks, per implementation:

* the output matches the reference (tolerance by dtype), is finite, and rows with no
  key to attend are exactly 0;
* for some cases (float32/float64), the gradients match the reference's and are finite;
* a configuration an implementation refuses raises NotImplementedError with a message
  that names the implementation to use instead.

The number of cases: DISTR_PROPERTY_CASES (default 8, about a minute on a 2-core CPU);
e.g. `DISTR_PROPERTY_CASES=500 pytest tests/test_property.py` on a GPU machine.
DISTR_PROPERTY_SEED shifts the seeds (default 0).
"""

from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distrattention_jax as dj

# The implementations under test, in one place (to be pointed at the backend registry).
IMPLEMENTATIONS = ("xla", "pallas_interpret")
if jax.default_backend() == "gpu":
  IMPLEMENTATIONS += ("pallas", "cudnn")

NUM_CASES = int(os.environ.get("DISTR_PROPERTY_CASES", "8"))
FIRST_SEED = int(os.environ.get("DISTR_PROPERTY_SEED", "0"))

# Output tolerance (atol = rtol) against the float32 (float64) reference, by dtype.
TOLERANCE = {"float32": 2e-4, "float64": 1e-9, "float16": 1e-2, "bfloat16": 6e-2}
GRAD_TOLERANCE = {"float32": 1e-3, "float64": 1e-7}


def draw_config(seed: int) -> dict:
  """One random configuration (plain Python/numpy values) from `seed`."""
  rng = np.random.default_rng(seed)
  pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
  batch = int(pick([1, 2, 3]))
  q_len = int(pick([1, 2, 7, 16, 17, 33, 40, 64]))
  kv_len = q_len if rng.random() < 0.4 else int(pick([1, 5, 16, 23, 40, 65]))
  kv_heads = int(pick([1, 2]))
  heads = kv_heads * int(pick([1, 2, 3]))
  d = int(pick([4, 8, 12, 16, 20, 24, 32, 48, 64]))
  dv = d if rng.random() < 0.6 else int(pick([4, 8, 12, 16, 40]))
  group_size = int(pick([g for g in (1, 2, 4, 8, 16) if d % g == 0]))
  block_q = int(pick([1, 2, 4, 8, 16, 32, 64, 256]))
  dtype = str(pick(["float32", "float32", "bfloat16", "float16", "float64"]))
  masks = {}
  if rng.random() < 0.35:
    masks["is_causal"] = True
  if rng.random() < 0.3:
    q_seg = np.sort(rng.integers(0, 3, (batch, q_len)), axis=1)
    kv_seg = np.sort(rng.integers(0, 3, (batch, kv_len)), axis=1)
    masks["segment_ids"] = q_seg if q_len == kv_len and rng.random() < 0.5 else (q_seg,
                                                                                  kv_seg)
  if rng.random() < 0.3:
    masks["query_seq_lengths"] = rng.integers(0, q_len + 1, batch)
  if rng.random() < 0.3:
    masks["key_value_seq_lengths"] = rng.integers(0, kv_len + 1, batch)
  if rng.random() < 0.15:
    shape = (pick([1, batch]), pick([1, heads]), q_len, kv_len)
    masks["mask"] = rng.random(shape) < 0.7
  cfg = dict(
      seed=seed, batch=batch, q_len=q_len, kv_len=kv_len, heads=heads, kv_heads=kv_heads,
      d=d, dv=dv, dtype=dtype, masks=masks,
      options=dict(group_size=group_size, block_q=block_q,
                   representative=str(pick(["mean", "sample"])),
                   grouping=str(pick(["greedy", "lsh", "random"])),
                   num_projs=int(rng.integers(1, 31)), seed=int(rng.integers(0, 100)),
                   scale=None if rng.random() < 0.7 else float(rng.uniform(0.05, 0.5))),
      check_grad=dtype in ("float32", "float64") and rng.random() < 0.4)
  # Sometimes huge float32 logits (one-hot attention; drawn last, so the other draws
  # of a seed do not depend on it). Gradients are ill-conditioned there: not compared.
  cfg["logit_scale"] = 1e9 if dtype == "float32" and rng.random() < 0.15 else 1.0
  if cfg["logit_scale"] != 1.0:
    cfg["check_grad"] = False
  return cfg


def allowed_np(cfg) -> np.ndarray:
  """bool [B, H, Tq, Tk] of attended (query, key) pairs, from the config in numpy."""
  batch, heads, q_len, kv_len = cfg["batch"], cfg["heads"], cfg["q_len"], cfg["kv_len"]
  m = cfg["masks"]
  allowed = np.ones((batch, heads, q_len, kv_len), bool)
  if m.get("is_causal"):
    allowed &= np.tril(np.ones((q_len, kv_len), bool))
  if "mask" in m:
    allowed &= m["mask"]
  if "segment_ids" in m:
    seg = m["segment_ids"]
    q_seg, kv_seg = seg if isinstance(seg, tuple) else (seg, seg)
    allowed &= (q_seg[:, :, None] == kv_seg[:, None, :])[:, None]
  if "query_seq_lengths" in m:
    allowed &= (np.arange(q_len)[None] < m["query_seq_lengths"][:, None])[:, None, :, None]
  if "key_value_seq_lengths" in m:
    allowed &= (np.arange(kv_len)[None] < m["key_value_seq_lengths"][:, None])[:, None,
                                                                                None, :]
  return allowed


def _describe(cfg) -> str:
  masks = {k: (v if isinstance(v, bool) else "...") for k, v in cfg["masks"].items()}
  keys = ("batch", "q_len", "kv_len", "heads", "kv_heads", "d", "dv", "dtype", "logit_scale")
  return f"{ {k: cfg[k] for k in keys} } {cfg['options']} masks={masks}"


def _inputs(cfg):
  rng = np.random.default_rng(1000 + cfg["seed"])
  dtype = jnp.dtype(cfg["dtype"])
  b, tq, tk, h, hk = cfg["batch"], cfg["q_len"], cfg["kv_len"], cfg["heads"], cfg["kv_heads"]
  q = jnp.asarray(rng.standard_normal((b, tq, h, cfg["d"])) * cfg["logit_scale"], dtype)
  k = jnp.asarray(rng.standard_normal((b, tk, hk, cfg["d"])), dtype)
  v = jnp.asarray(rng.standard_normal((b, tk, hk, cfg["dv"])), dtype)
  return q, k, v


def _mask_kwargs(cfg):
  out = {}
  for name, value in cfg["masks"].items():
    if isinstance(value, tuple):
      out[name] = tuple(jnp.asarray(x) for x in value)
    elif isinstance(value, np.ndarray):
      out[name] = jnp.asarray(value)
    else:
      out[name] = value
  return out


def _loss(fn):
  return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v).astype(jnp.float32)))


@pytest.mark.parametrize("case", range(FIRST_SEED, FIRST_SEED + NUM_CASES))
def test_random_configuration_matches_reference(case):
  cfg = draw_config(case)
  what = _describe(cfg)
  x64 = jax.enable_x64(True) if cfg["dtype"] == "float64" else contextlib.nullcontext()
  with x64:
    q, k, v = _inputs(cfg)
    kw = dict(cfg["options"], **_mask_kwargs(cfg))
    reference = lambda q, k, v: dj.distr_attention_reference(q, k, v, **kw)  # noqa: E731
    want = np.asarray(reference(q, k, v).astype(jnp.float64 if cfg["dtype"] == "float64"
                                                else jnp.float32))
    no_key = ~allowed_np(cfg).any(-1)                           # [B, H, Tq]
    no_key = np.transpose(no_key, (0, 2, 1))[..., None]          # [B, Tq, H, 1]
    assert np.all(want[np.broadcast_to(no_key, want.shape)] == 0), what
    tol = TOLERANCE[cfg["dtype"]]
    want_grads = None
    if cfg["check_grad"]:
      want_grads = jax.grad(_loss(reference), argnums=(0, 1, 2))(q, k, v)
    ran = []
    for impl in IMPLEMENTATIONS:
      run = lambda q, k, v: dj.distr_attention(  # noqa: E731
          q, k, v, implementation=impl, **kw)  # noqa: B023
      try:
        got = run(q, k, v)
      except NotImplementedError as e:
        message = str(e)
        assert impl != "xla", f"xla refused: {message}\n{what}"
        assert "use implementation=" in message, (message, what)
        continue
      ran.append(impl)
      got = np.asarray(got.astype(want.dtype))
      assert got.shape == want.shape and got.dtype == want.dtype, (impl, what)
      assert np.all(np.isfinite(got)), f"{impl}: non-finite output\n{what}"
      assert np.all(got[np.broadcast_to(no_key, got.shape)] == 0), (
          f"{impl}: a row with no key is not exactly 0\n{what}")
      np.testing.assert_allclose(got, want, atol=tol, rtol=tol, err_msg=f"{impl}: {what}")
      if want_grads is not None:
        grads = jax.grad(_loss(run), argnums=(0, 1, 2))(q, k, v)
        gtol = GRAD_TOLERANCE[cfg["dtype"]]
        for name, g, w in zip("qkv", grads, want_grads):
          assert np.all(np.isfinite(g)), f"{impl}: non-finite d{name}\n{what}"
          np.testing.assert_allclose(g, w, atol=gtol, rtol=gtol,
                                     err_msg=f"{impl}: d{name} {what}")
    assert "xla" in ran


def test_configurations_cover_the_options():
  """The seeds of a large run reach every option (guards the generator itself)."""
  cfgs = [draw_config(s) for s in range(300)]
  seen = lambda f: {f(c) for c in cfgs}  # noqa: E731
  assert seen(lambda c: c["options"]["group_size"]) == {1, 2, 4, 8, 16}
  assert seen(lambda c: c["options"]["block_q"]) == {1, 2, 4, 8, 16, 32, 64, 256}
  assert seen(lambda c: c["options"]["grouping"]) == {"greedy", "lsh", "random"}
  assert seen(lambda c: c["options"]["representative"]) == {"mean", "sample"}
  assert seen(lambda c: c["dtype"]) == set(TOLERANCE)
  assert {1, 17, 33}.issubset(seen(lambda c: c["q_len"]))
  assert seen(lambda c: c["d"] & (c["d"] - 1) != 0) == {True, False}  # non-powers of two
  assert seen(lambda c: c["heads"] != c["kv_heads"]) == {True, False}  # GQA
  for name in ("is_causal", "segment_ids", "query_seq_lengths", "key_value_seq_lengths",
               "mask"):
    assert seen(lambda c: name in c["masks"]) == {True, False}, name  # noqa: B023
  assert seen(lambda c: c["check_grad"]) == {True, False}
  assert seen(lambda c: c["logit_scale"]) == {1.0, 1e9}
