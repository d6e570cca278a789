"""The best rank-r factorisation of `Q K^T` from its two Gram matrices: one program each.

Given `Gq = Q^T Q` and `Gk = K^T K` (`d x d`, float32) this returns `A, B` (`d x r`) with
`(Q A)(K B)^T` close to the best rank-r approximation of `S = Q K^T` in the Frobenius
norm, using matmuls and element-wise operations only (no SVD, no eigh, no Gram inverted,
no column-by-column step):

1. Subspace iteration on S for its top-r right singular subspace, carried in key
   coefficients (`V = K Z`) and query coefficients (`U = Q P`), so that only `Gq` and
   `Gk` are needed: `P = Gk Z` (U = S V), `Z = Gq P` (V = S^T U), each orthonormalised
   in its own metric, for a few steps from a fixed Gaussian start.
2. Orthonormalise Z in the metric of Gk (`Z^T Gk Z = I`, so `K Z` has orthonormal
   columns); then `S (K Z)(K Z)^T = Q (Gk Z) (K Z)^T`: `A = Gk Z`, `B = Z` projects every
   row of S on the subspace, which is the optimum once the subspace is the top-r one.
3. A scalar balance (`A s`, `B / s`) gives `Q A` and `K B` equal Frobenius norms.

Orthonormalisation (`metric_orth`) multiplies `W` by `T ~ (C + ridge I)^(-1/2)`, where
`C = W^T G W / |.|_F` is the `r x r` metric Gram normalised to norm 1, computed by
Newton-Schulz polynomial iterations (`T <- T p(T^T C T)`, each polynomial the best for
the range the previous ones leave): a handful of small matmuls
instead of r sequential Gram-Schmidt steps, which made the previous program latency
bound (1.5 ms for 16 heads at d=128 on an H100, 2026-11-25). `T^T C T` is recomputed
from C at every iteration (not updated recursively), so rounding cannot accumulate.
The ridge (1e-6 of the largest eigenvalue) bounds T: a direction whose singular value
is below ~1e-3 of the largest keeps weight `c / (c + ridge)` < 1 instead of being blown
up from rounding noise, and null directions (padding, rank below r) get weight 0, so
singular and rank-deficient Grams (all-padding blocks included) give finite maps.

Everything is written on 2-D arrays with ops that the Pallas Triton lowering supports
(dots, transposes, element-wise ops, reductions, fori_loop), so `factor_pair` is at once
the XLA implementation (vmapped) and the body of the fused kernel `factor_grams_kernel`:
one program per (batch, head, block) runs every step on data held on chip, where XLA
would launch each of the ~200 tiny matmuls separately. Imports nothing from
distrattention_jax.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

HIGHEST = jax.lax.Precision.HIGHEST
RIDGE = 1e-6        # relative to the normalised metric Gram: singular values ~1e-3
TINY = 1e-30
# Newton-Schulz polynomials for T <- T p(T^T C T), p(y) = a + b y + c y^2: a singular value
# s of W in the metric goes to s p(s^2), an odd quintic. Each is the quintic closest to 1
# in the max norm on the range the previous ones leave, starting from [0.9e-3, 1.001]
# (the ridge keeps every s above 1e-3; |C|_F bounds the largest): the greedy sequence of
# Amsel et al.'s "Polar Express" (arXiv 2505.16932), computed here by a linear program on
# a fine grid (scipy.optimize.linprog, 2026-12-06; tests/test_lowrank.py checks the ranges
# below). After k polynomials every s in [1e-3, 1] lies in:
#   k=3: [0.127, 1.873]   k=4: [0.422, 1.578]   k=5: [0.863, 1.137]
#   k=6: [0.9984, 1.0016]  k=7: 1 to float32 precision
# (The previous fixed "Muon" quintic needed 5 iterations for [0.68, 1.2], plus 4 cubic
# ones to converge: 9 instead of 7, and 5 instead of 4 inside the subspace iteration.)
POLYNOMIALS = (
    (8.466280, -25.050296, 18.550219),
    (4.190192, -3.113813, 0.581190),
    (3.989304, -2.973397, 0.565180),
    (3.356828, -2.517058, 0.513286),
    (2.335010, -1.699565, 0.422127),
    (1.895002, -1.272049, 0.377212),
    (1.874929, -1.249854, 0.374926),
)
INNER_ITERS = 4     # per orthonormalisation inside the subspace iteration: conditioning only
FINAL_ITERS = 7     # the last one, whose columns must be orthonormal
# Whether to orthonormalise the random start first. Skipping it saves 15% of the program's
# GPU time (0.087 vs 0.102 ms, 16 programs, d=128, r=32, H100, 2026-12-06, twice) at the
# same score error on structured data (0.0700), and with unit-trace Grams
# (`lowrank.factor_iter`) it no longer overflows; but its error on steep spectra is 3x
# larger (0.0023 vs 0.0008) and on jax 0.12.1 a rank-deficient case missed 1e-4 (1.15e-4;
# tests/test_lowrank.py). Not worth 0.5% of a forward: kept on.
START_ORTH = True


# Dot precisions: IEEE float32 (XLA and interpret mode), or three TF32 tensor-core
# products (`tf32x3`, float32-level accuracy) in the Triton program, whose IEEE dots
# run on the FMA units as fully unrolled code (see factor_grams_kernel).
PRECISIONS = {"ieee": HIGHEST, "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
              # one TF32 product (10-bit mantissas): a variant to measure, not a default
              "tf32": jax.lax.DotAlgorithmPreset.TF32_TF32_F32}


def _dot(a, b, precision=HIGHEST):
  return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


def _total(x):
  """Sum of a 2-D array (two 1-D reductions: lowers everywhere a full reduction may not)."""
  return jnp.sum(jnp.sum(x, axis=1), axis=0)


# `[d, r]` matrices are carried as tuples of row chunks (`[d / n, r]` each): the kernel
# then multiplies by a Gram block by block (`d x d` float32 at d=256 is 256 KB, more
# than an H100's shared memory). With one chunk (d <= 128, and the XLA path) the code
# is plain matrix algebra.


def _inner(w, p, precision):
  """`w^T p` (`r x r`) of two chunked `[d, r]` matrices."""
  return sum(_dot(wi.T, pi, precision) for wi, pi in zip(w, p))


def _times(w, t, precision=HIGHEST):
  """`w t` of a chunked `[d, r]` matrix and an `r x r` one (or a scalar)."""
  if jnp.ndim(t) == 2:
    return tuple(_dot(wi, t, precision) for wi in w)
  return tuple(wi * t for wi in w)


def metric_orth(w, p, *, iters: int, precision=HIGHEST, small_precision=HIGHEST):
  """`(w T, p T)` with `(w T)^T G (w T) ~ I`, given `p = G w` (chunked `[d, r]` each).

  `T ~ (C / n + RIDGE I)^(-1/2) / sqrt(n)` with `C = w^T p`, `n = |C|_F`, from the first
  `iters` Newton-Schulz polynomials (`POLYNOMIALS`). Inside the subspace iteration a few
  suffice (only the conditioning of the columns matters there); the final call runs all
  seven so the kept columns are orthonormal. A zero `w` or `p` gives zeros.
  `precision`: the d-deep products; `small_precision`: the `r x r` ones.
  """
  if not 1 <= iters <= len(POLYNOMIALS):
    raise ValueError(f"iters must be in [1, {len(POLYNOMIALS)}], got {iters}")
  c = _inner(w, p, precision)
  r = c.shape[0]
  norm = jnp.sqrt(_total(c * c))
  ok = norm > TINY
  inv_norm = jnp.where(ok, 1.0 / jnp.maximum(norm, TINY), 0.0)
  rows = jax.lax.broadcasted_iota(jnp.int32, (r, r), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (r, r), 1)
  eye = (rows == cols).astype(jnp.float32)
  # Symmetrised and normalised (eigenvalues in [0, 1]), plus the ridge.
  y0 = (0.5 * inv_norm) * (c + c.T) + RIDGE * eye
  dot = functools.partial(_dot, precision=small_precision)

  def body(i, t):
    # Iteration i's coefficients (one loop body for all): sums of 0/1-weighted constants
    # (a scalar `jnp.where` mixes i1 and f32 operands in the Triton lowering).
    hits = [(i == j).astype(jnp.float32) for j in range(1, iters)]
    a, b, c2 = (sum(h * POLYNOMIALS[j][n] for j, h in enumerate(hits, start=1))
                for n in range(3))
    y = dot(t.T, dot(y0, t))           # the metric Gram of w T, recomputed from y0
    return dot(t, a * eye + b * y + c2 * dot(y, y))

  # The first iteration, from T = I, is the polynomial of y0 itself.
  a, b, c2 = POLYNOMIALS[0]
  t = a * eye + b * y0 + c2 * dot(y0, y0)
  t = jax.lax.fori_loop(1, iters, body, t)
  t = t * jnp.where(ok, jax.lax.rsqrt(jnp.maximum(norm, TINY)), 0.0)
  return _times(w, t, precision), _times(p, t, precision)


def factor_pair(gq_mul, gk_mul, z0, *, steps: int, precision=HIGHEST,
                small_precision=HIGHEST, inner_iters: int = INNER_ITERS,
                final_iters: int = FINAL_ITERS, start_orth: bool = START_ORTH):
  """`(A, B)` for one block, from `Gq @ x` and `Gk @ x` (callables) and a start.

  All `[d, r]` matrices are tuples of row chunks (one chunk: plain matrices); `z0` is
  the starting subspace (a fixed Gaussian matrix), `gq_mul`/`gk_mul` map chunked
  matrices to chunked matrices. Each of the `steps` (>= 1) iterations is two half steps
  of subspace iteration on S itself, in coefficients: left vectors `U = S V = Q (Gk Z)`
  (query coefficients `P = Gk Z`, orthonormalised in the metric Gq) and right vectors
  `V = S^T U = K (Gq P)` (key coefficients `Z = Gq P`, orthonormalised in the metric
  Gk). Orthonormalising each half step in its own metric keeps the conditioning at that
  of U or V (singular value ratios), not of `Gq Gk` (their squares), which float32 could
  not hold. One `d x d` product per half step. `inner_iters` / `final_iters`: Newton-Schulz
  polynomials per orthonormalisation inside the iteration / in the last one;
  `start_orth`: whether the random start is orthonormalised first (`START_ORTH`).
  """
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  orth = functools.partial(metric_orth, precision=precision, small_precision=small_precision)
  inner = functools.partial(orth, iters=inner_iters)

  def half_steps(z, gz):
    p, gp = inner(gz, gq_mul(gz))            # U = Q P, P = Gk Z
    z = gp                                   # V = K Z, Z = Gq P
    return z, gk_mul(z)

  def step(_, carry):
    return inner(*half_steps(*carry))

  z, gz = inner(z0, gk_mul(z0)) if start_orth else (z0, gk_mul(z0))
  z, gz = jax.lax.fori_loop(0, steps - 1, step, (z, gz))
  z, gz = half_steps(z, gz)
  z, gz = orth(z, gz, iters=final_iters)  # Z^T Gk Z = I
  a, b = gz, z
  qa2 = sum(_total(ai * gi) for ai, gi in zip(a, gq_mul(a)))  # |Q A|^2
  kb2 = sum(_total(bi * gi) for bi, gi in zip(b, gz))         # |K B|^2 (~ kept directions)
  ok = (qa2 > TINY) & (kb2 > TINY)
  s = jnp.where(ok, jnp.sqrt(jnp.sqrt(jnp.where(ok, kb2, 1.0) / jnp.where(ok, qa2, 1.0))), 1.0)
  return _times(a, s), _times(b, 1.0 / s)


def start_subspace(d: int, r: int) -> np.ndarray:
  """The fixed Gaussian starting subspace `[d, r]` (float32; the same on every device)."""
  return np.random.default_rng(20261125).standard_normal((d, r)).astype(np.float32)


def _kernel(gq_ref, gk_ref, z0_ref, a_ref, b_ref, *, steps, chunk, precision,
            small_precision, inner_iters, final_iters, start_orth):
  # The Grams are read block by block at every product (from L2) rather than held: two
  # d x d float32 values live through the whole program spilled at d=128 (H100,
  # 2026-11-25: a 124 s compile and 4.1 ms per call for B=1, H=16, N=16384, G=4), and
  # at d=256 one Gram alone is more than the shared memory.
  n = z0_ref.shape[0] // chunk

  def gram_mul(g_ref):
    def mul(x):
      return tuple(sum(_dot(g_ref[pl.ds(i * chunk, chunk), pl.ds(j * chunk, chunk)], x[j],
                            precision) for j in range(n)) for i in range(n))
    return mul

  z0 = tuple(z0_ref[pl.ds(i * chunk, chunk), :] for i in range(n))
  a, b = factor_pair(gram_mul(gq_ref), gram_mul(gk_ref), z0, steps=steps,
                     precision=precision, small_precision=small_precision,
                     inner_iters=inner_iters, final_iters=final_iters,
                     start_orth=start_orth)
  for i in range(n):
    a_ref[pl.ds(i * chunk, chunk), :] = a[i]
    b_ref[pl.ds(i * chunk, chunk), :] = b[i]


MAX_CHUNK = 128  # rows of a Gram block per product (128 x 128 float32: 64 KB)


@functools.partial(jax.jit, static_argnames=("rank", "steps", "kv_group", "num_warps",
                                             "precision", "small_precision", "block_d",
                                             "inner_iters", "final_iters", "start_orth",
                                             "interpret"))
def factor_grams_kernel(gq, gk, *, rank: int, steps: int = 2, kv_group: int = 1,
                        num_warps: int = 8, precision: str | None = None,
                        small_precision: str = "ieee", block_d: int | None = None,
                        inner_iters: int = INNER_ITERS, final_iters: int = FINAL_ITERS,
                        start_orth: bool = START_ORTH, interpret: bool = False):
  """`(A, B)` float32 `[M, d, r]` for M query Grams and M / kv_group key Grams.

  Args:
    gq: float32 `[M, d, d]` query Grams; gk: float32 `[M // kv_group, d, d]` key Grams,
      program i using key Gram `i // kv_group` (so a key Gram shared by the blocks and
      query heads of one kv head is read, not copied). d a power of two >= 16; above
      128 the Grams are multiplied in 128 x 128 blocks.
    rank: r; padded to 16 inside (Triton dots need 16); the extra columns start at zero
      and stay zero (their metric Gram block is the ridge alone, uncoupled).
    num_warps: warps per program (the programs are latency-bound chains of small
      matmuls; 8: 0.181 ms vs 0.227 with 4 at d=128, r=32, 16 programs, H100,
      2026-12-06; docs/KERNEL_NOTES.md).
    precision: "tf32x3" or "ieee" for the d-deep products (None: tf32x3 on a GPU, ieee
      when interpreted, where XLA's CPU dots have no TF32); small_precision: the same for
      the `r x r` products of the orthonormalisations.
    block_d: rows and columns of the Gram blocks multiplied at a time (default
      min(d, 128)); a divisor of d.
    inner_iters, final_iters, start_orth: see `factor_pair` (variants for the benchmark).
  """
  if precision is None:
    precision = "ieee" if interpret else "tf32x3"
  if interpret:
    small_precision = "ieee"
  for name, value in (("precision", precision), ("small_precision", small_precision)):
    if value not in PRECISIONS:
      raise ValueError(f"{name} must be one of {tuple(PRECISIONS)}, got {value!r}")
  m, d, _ = gq.shape
  block_d = min(d, MAX_CHUNK) if block_d is None else block_d
  if d % block_d or block_d < 16:
    raise ValueError(f"block_d must be a divisor of d={d} and >= 16, got {block_d}")
  width = max(16, rank)
  z0 = np.zeros((d, width), np.float32)
  z0[:, :rank] = start_subspace(d, rank)
  out = jax.ShapeDtypeStruct((m, d, width), jnp.float32)
  kwargs = {}
  if not interpret:
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
    kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
  a, b = pl.pallas_call(
      functools.partial(_kernel, steps=steps, chunk=block_d, inner_iters=inner_iters,
                        final_iters=final_iters, start_orth=start_orth,
                        precision=PRECISIONS[precision],
                        small_precision=PRECISIONS[small_precision]),
      grid=(m,),
      in_specs=[pl.BlockSpec((None, d, d), lambda i: (i, 0, 0)),
                pl.BlockSpec((None, d, d), lambda i: (i // kv_group, 0, 0)),
                pl.BlockSpec((d, width), lambda i: (0, 0))],
      out_specs=[pl.BlockSpec((None, d, width), lambda i: (i, 0, 0)),
                 pl.BlockSpec((None, d, width), lambda i: (i, 0, 0))],
      out_shape=[out, out],
      interpret=interpret,
      name="distr_lowrank_factor",
      **kwargs,
  )(gq.astype(jnp.float32), gk.astype(jnp.float32), jnp.asarray(z0))
  return a[..., :rank], b[..., :rank]
