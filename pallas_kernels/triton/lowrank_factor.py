"""The best rank-r factorisation of `Q K^T` from its two Gram matrices: one program each.

Given `Gq = Q^T Q` and `Gk = K^T K` (`d x d`, float32) this returns `A, B` (`d x r`) with
`(Q A)(K B)^T` close to the best rank-r approximation of `S = Q K^T` in the Frobenius
norm, using matmuls and element-wise operations only (no SVD, no eigh, no Gram inverted,
no column-by-column step):

1. Subspace iteration on S for its top-r right singular subspace, carried in key
   coefficients (`V = K Z`) and query coefficients (`U = Q P`), so that only `Gq` and
   `Gk` are needed: `P = Gk Z` (U = S V), `Z = Gq P` (V = S^T U), each conditioned by
   a partial orthonormalisation in its own metric, for a few steps from a fixed
   Gaussian start (the plan: `plan_for_steps`).
2. Orthonormalise Z in the metric of Gk (`Z^T Gk Z = I`, so `K Z` has orthonormal
   columns); then `S (K Z)(K Z)^T = Q (Gk Z) (K Z)^T`: `A = Gk Z`, `B = Z` projects every
   row of S on the subspace, which is the optimum once the subspace is the top-r one.
3. A scalar balance (`A s`, `B / s`) gives `Q A` and `K B` equal Frobenius norms.
The Grams are normalised to unit trace inside (their traces are read from their
diagonals), so callers pass them as they are.

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
would launch each of the ~200 tiny matmuls separately. On the GPU the kernel runs the
same products as one loop (`rolled_pair`), reading its Grams by index from one array
(`factor_stacked_grams_kernel`, as the Mosaic Gram kernel writes them). Imports nothing
from distrattention_jax.
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
# The iteration's plan: Newton-Schulz polynomials per half step (see `factor_pair`), 0 for
# a half step left unorthonormalised; the last entry is the final orthonormalisation.
# Chosen on accuracy and GPU time together (docs/KERNEL_NOTES.md, sixth session). The
# previous plan, (4, 4, 4, 4, 7) from a key-coefficient start (23 polynomials, five
# orthonormalisations, five Gram products), took 0.103 ms for 16 programs at d=128, r=32
# on an H100 (0.12-0.15 ms inside an end-to-end call). This one starts from `Gq z0`
# (query coefficients: the same two subspace steps in four Gram products, the Gaussian
# start needing no conditioning) and orthonormalises the inner half steps with 4
# polynomials (s in [0.42, 1.58]; only the final one must be orthonormal): 15
# polynomials, three orthonormalisations. On a CPU: the pretrained MiniLM benchmark (250
# texts, one factorisation per sequence) G=2 0.9992 / 0.996 and G=4 0.9907 / 0.967
# (mean / 5th percentile cosine) against 0.9993 / 0.996 and 0.9910 / 0.964; relative
# score error on structured d=128 data 0.0685 against 0.0680 (optimum 0.0666), on steep
# spectra 0.0013 against 0.0008. 3 inner polynomials (0.0694) left 8-row blocks of d=16
# up to 0.015 above their optimum (tests/test_lowrank.py, padding), 4 keep them within
# 0.002: the conditioning an inner half step leaves is multiplied by the next one's
# singular value spread, and the final one's ridge drops what exceeds ~1e3.
INNER_POLYS = 4     # per inner orthonormalisation: conditioning only
FINAL_POLYS = 7     # the last one, whose columns must be orthonormal
# The kernel's Gram products that only move the subspace (every one but the last, and the
# balance's). One TF32 pass ("tf32") instead of three took the program from 0.1018 to
# 0.0972 ms inside a call, but one head of a steep i^-2 spectrum fitted 7.3e-3 against
# 1.4e-3 (H100, 2026-12-06; docs/KERNEL_NOTES.md, eighth session): not the default.
SUBSPACE_PRECISION = "tf32x3"
# The kernel's code form for regular plans (`factor_grams_kernel`) and the precision of the
# orthonormalisations' d-deep products. The rolled form (`rolled_pair`: one loop, each
# half step reading its Gram by index from one array, `x T` formed once after the loop)
# with those products in IEEE float32 on the FMA units took 0.067 ms alone, 0.067 after
# an L2 flush and 0.078-0.079 inside an end-to-end call, against 0.075 / 0.102 / 0.103
# for the straight-line form with TF32x3 products (16 programs, d=128, r=32, H100,
# 2026-12-06, docs/KERNEL_NOTES.md, tenth session). IEEE alone did nothing for the
# straight-line form (0.075 / 0.104); reading both Grams and blending them cost the
# rolled form 0.010 ms; the Gram products in IEEE too took 0.110.
FORM = "rolled"
ORTH_PRECISION = "ieee"


def plan_for_steps(steps: int) -> tuple[int, ...]:
  """The plan of `steps` subspace iterations (each a product by Gq, then by Gk): the first
  half step from the Gaussian start is not orthonormalised (the start is well
  conditioned), the inner ones get INNER_POLYS polynomials, the last FINAL_POLYS."""
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps must be an int >= 1, got {steps!r}")
  return (0,) + (INNER_POLYS,) * (2 * steps - 2) + (FINAL_POLYS,)


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


def _eye(n):
  """The `n x n` float32 identity from iotas (lowers in the Triton program)."""
  rows = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
  return (rows == cols).astype(jnp.float32)


def _inner(w, p, precision):
  """`w^T p` (`r x r`) of two chunked `[d, r]` matrices."""
  return sum(_dot(wi.T, pi, precision) for wi, pi in zip(w, p))


def _times(w, t, precision=HIGHEST):
  """`w t` of a chunked `[d, r]` matrix and an `r x r` one (or a scalar)."""
  if jnp.ndim(t) == 2:
    return tuple(_dot(wi, t, precision) for wi in w)
  return tuple(wi * t for wi in w)


def orth_factor(w, p, *, iters: int, precision=HIGHEST, small_precision=HIGHEST):
  """The `r x r` factor `T` of `metric_orth` (`(w T)^T G (w T) ~ I`), given `p = G w`."""
  static = isinstance(iters, int)
  if static and not 1 <= iters <= len(POLYNOMIALS):
    raise ValueError(f"iters must be in [1, {len(POLYNOMIALS)}], got {iters}")
  count = iters if static else len(POLYNOMIALS)
  c = _inner(w, p, precision)
  r = c.shape[0]
  norm = jnp.sqrt(_total(c * c))
  ok = norm > TINY
  inv_norm = jnp.where(ok, 1.0 / jnp.maximum(norm, TINY), 0.0)
  eye = _eye(r)
  # Symmetrised and normalised (eigenvalues in [0, 1]), plus the ridge.
  y0 = (0.5 * inv_norm) * (c + c.T) + RIDGE * eye
  dot = functools.partial(_dot, precision=small_precision)

  def body(i, t):
    # Iteration i's coefficients (one loop body for all): sums of 0/1-weighted constants
    # (a scalar `jnp.where` mixes i1 and f32 operands in the Triton lowering).
    hits = [(i == j).astype(jnp.float32) for j in range(1, count)]
    a, b, c2 = (sum(h * POLYNOMIALS[j][n] for j, h in enumerate(hits, start=1))
                for n in range(3))
    y = dot(t.T, dot(y0, t))           # the metric Gram of w T, recomputed from y0
    return dot(t, a * eye + b * y + c2 * dot(y, y))

  # The first iteration, from T = I, is the polynomial of y0 itself.
  a, b, c2 = POLYNOMIALS[0]
  t = a * eye + b * y0 + c2 * dot(y0, y0)
  t = jax.lax.fori_loop(1, iters, body, t)
  return t * jnp.where(ok, jax.lax.rsqrt(jnp.maximum(norm, TINY)), 0.0)


def metric_orth(w, p, *, iters: int, precision=HIGHEST, small_precision=HIGHEST,
                keep_w: bool = True):
  """`(w T, p T)` with `(w T)^T G (w T) ~ I`, given `p = G w` (chunked `[d, r]` each).

  `T ~ (C / n + RIDGE I)^(-1/2) / sqrt(n)` with `C = w^T p`, `n = |C|_F`, from the first
  `iters` Newton-Schulz polynomials (`POLYNOMIALS`; `orth_factor`). Inside the subspace
  iteration a few suffice (only the conditioning of the columns matters there); the final
  call runs all seven so the kept columns are orthonormal. A zero `w` or `p` gives zeros.
  `precision`: the d-deep products; `small_precision`: the `r x r` ones. `keep_w=False`
  returns `(None, p T)` (inside the iteration only `p T` goes on). `iters` may be a
  traced int32 (the rolled program, `rolled_pair`): the loop then looks up all seven
  polynomials' coefficients.
  """
  t = orth_factor(w, p, iters=iters, precision=precision, small_precision=small_precision)
  return (_times(w, t, precision) if keep_w else None), _times(p, t, precision)


def factor_pair(gq_mul, gk_mul, x0, *, plan=None, trace_q=1.0, trace_k=1.0,
                precision=HIGHEST, small_precision=HIGHEST, fast_muls=None,
                orth_precision=None):
  """`(A, B)` for one block, from `Gq @ x` and `Gk @ x` (callables) and a start.

  All `[d, r]` matrices are tuples of row chunks (one chunk: plain matrices); `x0` is the
  starting subspace (a fixed Gaussian matrix), `gq_mul`/`gk_mul` map chunked matrices to
  chunked matrices. Subspace iteration on S itself, in coefficients, alternating two
  kinds of half step: left vectors `U = S V = Q (Gk Z)` (query coefficients `P = Gk Z`,
  orthonormalised in the metric Gq) and right vectors `V = S^T U = K (Gq P)` (key
  coefficients `Z = Gq P`, orthonormalised in the metric Gk). Orthonormalising in each
  half step's own metric keeps the conditioning at that of U or V (singular value
  ratios), not of `Gq Gk` (their squares), which float32 could not hold. One `d x d`
  product per half step; its result is both the metric product the orthonormalisation
  needs and the next half step's coefficients.

  plan: Newton-Schulz polynomials per half step (0: not orthonormalised), the last
    entry the final orthonormalisation (Z^T Gk Z = I); the half steps alternate and end
    on key coefficients, so an even-length plan starts from query coefficients
    (`x0 -> Gq x0 -> ...`). Default `plan_for_steps(2)`.
  trace_q, trace_k: the Grams' traces (scalars). The iteration runs on unit-trace Grams:
    its products grow as powers of the Grams' scale, and float32 overflows for large
    activations (trace ~1e8 and more: long sequences, keys with a large mean). The best
    maps are scale-equivariant: fitted to `Q / sqrt(sq)` and `K / sqrt(sk)`, `A B^T` is
    unchanged and only the balance `|Q A| = |K B|` needs the factor `(sk / sq)^(1/4)`.
  fast_muls: optional `(Gq @ x, Gk @ x)` callables (a cheaper product) for every Gram
    product but the last one, and for the balance's scale (None: gq_mul, gk_mul). Those
    products only move the subspace, each iterate replaced by the next; the last one and
    the final orthonormalisation make the maps. A variant to measure (the kernel's
    `subspace_precision`); the inner orthonormalisations always keep `precision`: their
    `r x r` metric Gram sets how far weak directions are scaled up, and rounding it to
    TF32 made the maps depend on the Grams' last bits (docs/KERNEL_NOTES.md, eighth
    session).
  orth_precision: the orthonormalisations' d-deep products (`w^T p`, `w T`, `p T`);
    None: `precision`. (The kernel takes them in IEEE float32, `ORTH_PRECISION`.)
  """
  plan = plan_for_steps(2) if plan is None else tuple(plan)
  if not plan or plan[-1] < 1 or any(not 0 <= k <= len(POLYNOMIALS) for k in plan):
    raise ValueError(f"plan must end with a final orthonormalisation and count 0..."
                     f"{len(POLYNOMIALS)} polynomials per half step, got {plan}")
  unit_q, unit_k, scales = unit_trace_muls(gq_mul, gk_mul, trace_q, trace_k)
  fast_q, fast_k, _ = (unit_q, unit_k, None) if fast_muls is None else unit_trace_muls(
      *fast_muls, trace_q, trace_k)
  orth = functools.partial(metric_orth, small_precision=small_precision,
                           precision=precision if orth_precision is None else orth_precision)
  x = x0
  for i, polys in enumerate(plan):
    key_coeffs = (len(plan) - 1 - i) % 2 == 0
    last = i == len(plan) - 1
    mul_q, mul_k = (unit_q, unit_k) if last else (fast_q, fast_k)
    gx = (mul_k if key_coeffs else mul_q)(x)     # the metric product, and the next x
    if last:
      z, gz = orth(x, gx, iters=polys)           # Z^T Gk Z = I
      break
    if polys:
      _, gx = orth(x, gx, iters=polys, keep_w=False)
    x = gx
  return balanced_maps(z, gz, fast_q, scales)


def is_regular(plan) -> bool:
  """A plan `rolled_pair` runs: `(0, k, ..., k, final)` with k >= 1 (`plan_for_steps`)."""
  plan = tuple(plan)
  return (len(plan) >= 2 and len(plan) % 2 == 0 and plan[0] == 0 and plan[-1] >= 1
          and len(set(plan[1:-1])) <= 1 and min(plan[1:]) >= 1)


def rolled_pair(gq_mul, gk_mul, g_mul, x0, *, plan=None, trace_q=1.0, trace_k=1.0,
                precision=HIGHEST, small_precision=HIGHEST, orth_precision=None):
  """`factor_pair` for a regular plan (`is_regular`) as one loop: the same products in
  the same order, with one copy of the code.

  Every half step after the free first one (`Gq x0`) runs in one `fori_loop` whose trip
  count the compiler cannot see, so it is not unrolled; `g_mul(key, x)` is the half
  step's Gram times x, `Gk x` where `key` is 1.0 (the key-coefficient half steps), else
  `Gq x` (chunked, like `gq_mul`; the kernel reads that Gram by index, or blends both
  with 0/1 weights). The loop carries the last `x` and `T` and forms `Z = x T` once after
  it. Why: inside an end-to-end call the straight-line program ran ~0.03 ms slower than
  back to back (H100, 2026-12-06: 0.102 vs 0.074 ms for 16 programs at d=128), and that
  time came with its copies of the orthonormalisation code. Rolled, with one Gram read
  per product and IEEE orthonormalisations, it takes 0.067 ms back to back and after an
  L2 flush, ~0.078 in a call (see `FORM`; docs/KERNEL_NOTES.md, tenth session).
  """
  plan = plan_for_steps(2) if plan is None else tuple(plan)
  if not is_regular(plan):
    raise ValueError(f"rolled_pair takes plans (0, k, ..., k, final) with k >= 1, got {plan}")
  unit_q, _, scales = unit_trace_muls(gq_mul, gk_mul, trace_q, trace_k)  # Gk x: g_mul
  sq, sk = scales
  half, inner = len(plan) - 1, plan[1]
  # Traces are never negative: `opaque` is 0, but the compiler cannot know it. (Integer
  # arithmetic, not a scalar jnp.where: the Triton lowering typed that result i1.)
  opaque = (jnp.asarray(trace_q, jnp.float32) < -1.0).astype(jnp.int32)

  orth_precision = precision if orth_precision is None else orth_precision

  def half_step(i, carry):
    x, _, _ = carry
    key = (jnp.bitwise_and(i, 1) == 0).astype(jnp.float32)  # Gk, Gq, ..., Gk
    gx = _times(g_mul(key, x), key / sk + (1.0 - key) / sq)  # the unit-trace Gram
    iters = (i == half - 1).astype(jnp.int32) * (plan[-1] - inner) + inner
    t = orth_factor(x, gx, iters=iters, precision=orth_precision,
                    small_precision=small_precision)
    # The next coefficients `gx T`; `x T` is only needed after the last step (Z), so the
    # loop carries x and T for it instead of forming it every time.
    return _times(gx, t, orth_precision), x, t

  x = unit_q(x0)             # the free half step from the Gaussian start
  gz, x, t = jax.lax.fori_loop(0, opaque + half, half_step, (x, x, _eye(x[0].shape[1])))
  z = _times(x, t, orth_precision)   # Z^T Gk Z = I, with gz = Gk Z
  return balanced_maps(z, gz, unit_q, scales)


def unit_trace_muls(gq_mul, gk_mul, trace_q, trace_k):
  """`(Gq / sq) x` and `(Gk / sk) x` as callables, and `(sq, sk)` (a trace <= 0, e.g. an
  all-padding block, counts as 1): the Grams at unit trace (see `factor_pair`)."""
  sq, sk = (jnp.where(t > 0, t, 1.0) for t in (jnp.asarray(trace_q, jnp.float32),
                                               jnp.asarray(trace_k, jnp.float32)))
  unit_q = lambda x: _times(gq_mul(x), 1.0 / sq)  # noqa: E731
  unit_k = lambda x: _times(gk_mul(x), 1.0 / sk)  # noqa: E731
  return unit_q, unit_k, (sq, sk)


def balanced_maps(z, gz, unit_q, scales):
  """`(A, B)` from the final `Z` (`Z^T Gk Z = I`, unit-trace Gk) and `gz = Gk Z`: `A = Gk Z`,
  `B = Z`, scaled so `|Q A| = |K B|` for the Grams at their own scale (`scales = (sq, sk)`
  from `unit_trace_muls`)."""
  sq, sk = scales
  a, b = gz, z
  qa2 = sum(_total(ai * gi) for ai, gi in zip(a, unit_q(a)))  # |Q A|^2
  kb2 = sum(_total(bi * gi) for bi, gi in zip(b, gz))         # |K B|^2 (~ kept directions)
  ok = (qa2 > TINY) & (kb2 > TINY)
  s = jnp.where(ok, jnp.sqrt(jnp.sqrt(jnp.where(ok, kb2, 1.0) / jnp.where(ok, qa2, 1.0))), 1.0)
  s = s * jnp.sqrt(jnp.sqrt(sk / sq))
  return _times(a, s), _times(b, 1.0 / s)


def start_subspace(d: int, r: int) -> np.ndarray:
  """The fixed Gaussian starting subspace `[d, r]` (float32; the same on every device)."""
  return np.random.default_rng(20261125).standard_normal((d, r)).astype(np.float32)


def split_parts(m):
  """float32 `[rows, r]` -> bfloat16 `(hi, lo)`, each `[r, rows]`: the transposed map as
  its high part (the float32 value with its low 16 bits masked off, exact in bfloat16)
  and the rest rounded to bfloat16, so `hi + lo` keeps ~16 bits of every entry. The
  same split as the Mosaic GPU kernels' `project.split_map` (bfloat16), element for
  element, written here so the program's output needs no XLA op before those kernels."""
  bits = jax.lax.bitcast_convert_type(m, jnp.uint32) & jnp.uint32(0xFFFF0000)
  hi = jax.lax.bitcast_convert_type(bits, jnp.float32)
  return hi.T.astype(jnp.bfloat16), (m - hi).T.astype(jnp.bfloat16)


def _kernel(*refs, plan, chunk, precision, small_precision, subspace_precision,
            orth_precision, form, select, kv_group, num_query, parts_scale=None):
  # The Grams are read block by block at every product (from L2) rather than held: two
  # d x d float32 values live through the whole program spilled at d=128 (H100,
  # 2026-11-25: a 124 s compile and 4.1 ms per call for B=1, H=16, N=16384, G=4), and
  # at d=256 one Gram alone is more than the shared memory.
  parts_refs = ()
  if parts_scale is not None:  # the maps' bfloat16 parts as well (split_parts)
    refs, parts_refs = refs[:-2], refs[-2:]
  if select == "index":  # one array of every Gram: [M query Grams, M / kv_group key Grams]
    g_ref, z0_ref, a_ref, b_ref = refs
    prog = pl.program_id(0)
    q_index = prog
    k_index = num_query + prog // kv_group
  else:
    gq_ref, gk_ref, z0_ref, a_ref, b_ref = refs
  n = z0_ref.shape[0] // chunk

  def block(g_ref, i, j):  # a Gram's block (i, j), read from memory
    return g_ref[pl.ds(i * chunk, chunk), pl.ds(j * chunk, chunk)]

  def indexed(index, i, j):  # block (i, j) of Gram `index` of the one array
    return g_ref[index, pl.ds(i * chunk, chunk), pl.ds(j * chunk, chunk)]

  if select == "index":
    gq_block = functools.partial(indexed, q_index)
    gk_block = functools.partial(indexed, k_index)
  else:
    gq_block = functools.partial(block, gq_ref)
    gk_block = functools.partial(block, gk_ref)

  def product(gram_block, x, precision=precision):  # G x, block by block
    return tuple(sum(_dot(gram_block(i, j), x[j], precision) for j in range(n))
                 for i in range(n))

  def gram_mul(gram_block, precision=precision):
    return lambda x: product(gram_block, x, precision)

  def blend_mul(key, x):  # (key Gk + (1 - key) Gq) x, for the rolled form
    if select == "index":  # read only the Gram the half step uses
      index = q_index + key.astype(jnp.int32) * (k_index - q_index)
      return product(functools.partial(indexed, index), x)
    return product(lambda i, j: key * gk_block(i, j) + (1.0 - key) * gq_block(i, j), x)

  def trace(gram_block):  # the unit-trace scaling is done here, not by XLA ops around the call
    diag = _eye(chunk)
    return sum(_total(gram_block(i, i) * diag) for i in range(n))

  z0 = tuple(z0_ref[pl.ds(i * chunk, chunk), :] for i in range(n))
  if form == "rolled":
    a, b = rolled_pair(gram_mul(gq_block), gram_mul(gk_block), blend_mul, z0, plan=plan,
                       trace_q=trace(gq_block), trace_k=trace(gk_block), precision=precision,
                       small_precision=small_precision, orth_precision=orth_precision)
  else:
    a, b = factor_pair(gram_mul(gq_block), gram_mul(gk_block), z0, plan=plan,
                       trace_q=trace(gq_block), trace_k=trace(gk_block), precision=precision,
                       small_precision=small_precision, orth_precision=orth_precision,
                       fast_muls=(None if subspace_precision == precision else
                                  (gram_mul(gq_block, subspace_precision),
                                   gram_mul(gk_block, subspace_precision))))
  for i in range(n):
    a_ref[pl.ds(i * chunk, chunk), :] = a[i]
    b_ref[pl.ds(i * chunk, chunk), :] = b[i]
    for part_ref, m, scale in zip(parts_refs, (a[i], b[i]), (parts_scale, None)):
      hi, lo = split_parts(m if scale is None else m * scale)
      part_ref[0, :, pl.ds(i * chunk, chunk)] = hi
      part_ref[1, :, pl.ds(i * chunk, chunk)] = lo


MAX_CHUNK = 128  # rows of a Gram block per product (128 x 128 float32: 64 KB)


_STATIC = ("rank", "steps", "plan", "kv_group", "num_warps", "precision", "small_precision",
           "block_d", "interpret", "subspace_precision", "form", "orth_precision", "select")


@functools.partial(jax.jit, static_argnames=_STATIC)
def factor_grams_kernel(gq, gk, *, rank: int, steps: int = 2, plan=None, kv_group: int = 1,
                        num_warps: int = 8, precision: str | None = None,
                        small_precision: str = "ieee", block_d: int | None = None,
                        interpret: bool = False, subspace_precision: str | None = None,
                        form: str | None = None, orth_precision: str | None = None,
                        select: str | None = None):
  """`(A, B)` float32 `[M, d, r]` for M query Grams and M / kv_group key Grams.

  The Grams are taken as they are (any positive scale: the program normalises them to
  unit trace itself and rescales the maps, see `factor_pair`).

  Args:
    gq: float32 `[M, d, d]` query Grams; gk: float32 `[M // kv_group, d, d]` key Grams,
      program i using key Gram `i // kv_group` (so a key Gram shared by the blocks and
      query heads of one kv head is read, not copied). d a power of two >= 16; above
      128 the Grams are multiplied in 128 x 128 blocks.
    rank: r; padded to 16 inside (Triton dots need 16); the extra columns start at zero
      and stay zero (their metric Gram block is the ridge alone, uncoupled).
    num_warps: warps per program (the programs are latency-bound chains of small
      matmuls; 8: 0.181 ms vs 0.227 with 4 at d=128, r=32, 16 programs, H100,
      2026-12-06, the old plan; with the rolled program 0.067 ms against 0.103 with 4,
      tenth session; docs/KERNEL_NOTES.md).
    precision: "tf32x3" or "ieee" for the Gram products (None: tf32x3 on a GPU, ieee
      when interpreted, where XLA's CPU dots have no TF32); small_precision: the same for
      the `r x r` products of the orthonormalisations; orth_precision: for their d-deep
      products (`w^T p`, `p T`, `w T`; None: `ORTH_PRECISION` on a GPU, `precision`
      when interpreted).
    block_d: rows and columns of the Gram blocks multiplied at a time (default
      min(d, 128)); a divisor of d.
    steps: subspace iterations (`plan_for_steps`); plan: an explicit plan instead (a
      tuple, see `factor_pair`; variants for the benchmark).
    subspace_precision: the Gram products that only move the subspace (`factor_pair`'s
      `fast_muls`: every one but the last, and the balance's); None: `SUBSPACE_PRECISION`
      on a GPU, `precision` when interpreted.
    form: "rolled" (`rolled_pair`: the half steps in one loop) or "unrolled"
      (`factor_pair`: straight-line code); None: `FORM` where the plan is regular
      (`is_regular`) and the subspace products take `precision`, else "unrolled".
    select: how the rolled form reads a half step's Gram: "index" (the Grams as one
      array, `factor_stacked_grams_kernel`, after an XLA concatenation here) or "blend"
      (both read, weighted 0/1); None: "index" for the rolled form.
  """
  gq, gk = gq.astype(jnp.float32), gk.astype(jnp.float32)
  config = _config(plan=plan, steps=steps, precision=precision,
                   small_precision=small_precision, subspace_precision=subspace_precision,
                   form=form, orth_precision=orth_precision, select=select,
                   interpret=interpret)
  grams = (jnp.concatenate([gq, gk]),) if config["select"] == "index" else (gq, gk)
  return _factor_call(grams, num_query=gq.shape[0], rank=rank, kv_group=kv_group,
                      num_warps=num_warps, block_d=block_d, interpret=interpret, **config)


@functools.partial(jax.jit, static_argnames=_STATIC + ("num_query", "parts_scale"))
def factor_stacked_grams_kernel(grams, *, num_query: int, rank: int, steps: int = 2,
                                plan=None, kv_group: int = 1, num_warps: int = 8,
                                precision: str | None = None, small_precision: str = "ieee",
                                block_d: int | None = None, interpret: bool = False,
                                subspace_precision: str | None = None,
                                form: str | None = None, orth_precision: str | None = None,
                                select: str | None = None, parts_scale: float | None = None):
  """`factor_grams_kernel` of Grams given as one float32 array `[M + M / kv_group, d, d]`:
  the M query Grams, then the key Grams (as the Gram kernel writes them with
  `stacked=True`, so no concatenation runs). Same options; the form must be rolled with
  `select="index"` (the defaults).

  parts_scale: also write the maps as the Mosaic GPU kernels hold them, so no XLA op
  runs between this program and those kernels: returns `(A, B, A_parts, B_parts)` with
  `A_parts = split_parts(A * parts_scale)` and `B_parts = split_parts(B)`, bfloat16
  `[M, 2, r, d]` (the transposed map as a high part and the rest, see `split_parts`).
  Needs r a multiple of 16 (no padded columns to cut off)."""
  config = _config(plan=plan, steps=steps, precision=precision,
                   small_precision=small_precision, subspace_precision=subspace_precision,
                   form=form, orth_precision=orth_precision, select=select,
                   interpret=interpret)
  if config["select"] != "index":
    raise ValueError(f"stacked Grams are read by index: the rolled form with "
                     f"select='index', got form={config['form']!r}, "
                     f"select={config['select']!r}")
  if grams.ndim != 3 or grams.shape[0] != num_query + num_query // kv_group:
    raise ValueError(f"grams must be [num_query + num_query // kv_group, d, d] = "
                     f"[{num_query + num_query // kv_group}, d, d], got {grams.shape}")
  if parts_scale is not None and (rank % 16 or not isinstance(parts_scale, float)):
    raise ValueError(f"parts_scale needs a float scale and a rank that is a multiple of "
                     f"16, got parts_scale={parts_scale!r}, rank={rank}")
  return _factor_call((grams.astype(jnp.float32),), num_query=num_query, rank=rank,
                      kv_group=kv_group, num_warps=num_warps, block_d=block_d,
                      interpret=interpret, parts_scale=parts_scale, **config)


def _config(*, plan, steps, precision, small_precision, subspace_precision, form,
            orth_precision, select, interpret):
  """The program's options with their defaults filled in, checked."""
  if precision is None:
    precision = "ieee" if interpret else "tf32x3"
  if interpret:
    small_precision, subspace_precision, orth_precision = "ieee", precision, precision
  else:
    subspace_precision = SUBSPACE_PRECISION if subspace_precision is None else subspace_precision
    orth_precision = ORTH_PRECISION if orth_precision is None else orth_precision
  for name, value in (("precision", precision), ("small_precision", small_precision),
                      ("subspace_precision", subspace_precision),
                      ("orth_precision", orth_precision)):
    if value not in PRECISIONS:
      raise ValueError(f"{name} must be one of {tuple(PRECISIONS)}, got {value!r}")
  plan = plan_for_steps(steps) if plan is None else tuple(plan)
  rollable = is_regular(plan) and subspace_precision == precision
  if form is None:
    form = FORM if rollable else "unrolled"
  if form not in ("rolled", "unrolled"):
    raise ValueError(f"form must be 'rolled' or 'unrolled', got {form!r}")
  if form == "rolled" and not rollable:
    raise ValueError(f"form='rolled' needs a plan (0, k, ..., k, final) and one precision "
                     f"for every Gram product, got plan={plan}, precision={precision!r}, "
                     f"subspace_precision={subspace_precision!r}")
  if select is None:
    select = "index" if form == "rolled" else "blend"
  if select not in ("blend", "index"):
    raise ValueError(f"select must be 'blend' or 'index', got {select!r}")
  if select == "index" and form != "rolled":
    raise ValueError("select='index' is an option of form='rolled'")
  return {"plan": plan, "precision": precision, "small_precision": small_precision,
          "subspace_precision": subspace_precision, "orth_precision": orth_precision,
          "form": form, "select": select}


def _factor_call(grams, *, num_query, rank, kv_group, num_warps, block_d, interpret, plan,
                 precision, small_precision, subspace_precision, orth_precision, form,
                 select, parts_scale=None):
  """The pallas_call: `grams` is `(gq, gk)` ("blend") or `(stacked,)` ("index"); with
  `parts_scale` also the maps' bfloat16 parts (`factor_stacked_grams_kernel`)."""
  m, d = num_query, grams[0].shape[-1]
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
  if select == "index":  # the whole array: each program indexes its two Grams
    gram_specs = [pl.BlockSpec(grams[0].shape, lambda i: (0, 0, 0))]
  else:
    gram_specs = [pl.BlockSpec((None, d, d), lambda i: (i, 0, 0)),
                  pl.BlockSpec((None, d, d), lambda i: (i // kv_group, 0, 0))]
  out_specs = [pl.BlockSpec((None, d, width), lambda i: (i, 0, 0))] * 2
  out_shape = [out, out]
  if parts_scale is not None:  # A's and B's parts, [M, 2, r, d] each (width == rank)
    out_specs += [pl.BlockSpec((None, 2, width, d), lambda i: (i, 0, 0, 0))] * 2
    out_shape += [jax.ShapeDtypeStruct((m, 2, width, d), jnp.bfloat16)] * 2
  outs = pl.pallas_call(
      functools.partial(_kernel, plan=plan, form=form, chunk=block_d,
                        precision=PRECISIONS[precision],
                        small_precision=PRECISIONS[small_precision],
                        subspace_precision=PRECISIONS[subspace_precision],
                        orth_precision=PRECISIONS[orth_precision], select=select,
                        kv_group=kv_group, num_query=m, parts_scale=parts_scale),
      grid=(m,),
      in_specs=gram_specs + [pl.BlockSpec((d, width), lambda i: (0, 0))],
      out_specs=out_specs,
      out_shape=out_shape,
      interpret=interpret,
      name="distr_lowrank_factor",
      **kwargs,
  )(*grams, jnp.asarray(z0))
  return (outs[0][..., :rank], outs[1][..., :rank]) + tuple(outs[2:])
