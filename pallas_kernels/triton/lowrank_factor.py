"""The best rank-r factorisation of `Q K^T` from its two Gram matrices: one program each.

Given `Gq = Q^T Q` and `Gk = K^T K` (`d x d`, float32) this returns `A, B` (`d x r`) with
`(Q A)(K B)^T` close to the best rank-r approximation of `S = Q K^T` in the Frobenius
norm, using matmuls and vector operations only (no SVD, no eigh, no Gram inverted):

1. Subspace iteration on S for its top-r right singular subspace, carried in key
   coefficients (`V = K Z`) and query coefficients (`U = Q P`), so that only `Gq` and
   `Gk` are needed: `P = Gk Z` (U = S V), `Z = Gq P` (V = S^T U), each orthonormalised
   in its own metric, for a few steps from a fixed Gaussian start.
2. Orthonormalise Z in the metric of Gk (`Z^T Gk Z = I`, so `K Z` has orthonormal
   columns); then `S (K Z)(K Z)^T = Q (Gk Z) (K Z)^T`: `A = Gk Z`, `B = Z` projects every
   row of S on the subspace, which is the optimum once the subspace is the top-r one.
3. A scalar balance (`A s`, `B / s`) gives `Q A` and `K B` equal Frobenius norms.

Orthonormalisation is classical Gram-Schmidt in the metric `C = W^T G W` on the `r x r`
coefficients (a Cholesky factorisation in disguise), run twice at the end; a direction
whose squared metric norm is below `tol` times the largest is dropped (its column
becomes zero), so singular and rank-deficient Grams (all-padding blocks included) give
finite maps. Everything is written on 2-D arrays with ops that the Pallas Triton
lowering supports (dots, where, reductions, fori_loop), so `factor_pair` is at once the
XLA implementation (vmapped) and the body of the fused kernel `factor_grams_kernel`:
one program per (batch, head, block) runs every step on data held on chip, where XLA
would launch each of the ~100 tiny steps separately. Imports nothing from
distrattention_jax.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

HIGHEST = jax.lax.Precision.HIGHEST
INNER_FLOOR = 1e-7  # inside the iteration nothing is dropped: norms are floored instead
FINAL_TOL = 1e-8    # |K z|^2 below 1e-8 of the largest (singular values 1e-4): dropped
TINY = 1e-30


def _dot(a, b):
  return jnp.dot(a, b, precision=HIGHEST, preferred_element_type=jnp.float32)


def _total(x):
  """Sum of a 2-D array (two 1-D reductions: lowers everywhere a full reduction may not)."""
  return jnp.sum(jnp.sum(x, axis=1), axis=0)


def _column(x, j, cols):
  """Column j of a 2-D array as a vector (a masked reduction, no dynamic slicing)."""
  return jnp.sum(jnp.where(cols == j, x, 0.0), axis=1)


def metric_orth(w, p, tol, *, drop=True):
  """Orthonormalises the columns of `w` in the metric G, given `p = G w`.

  Returns `(w T, p T)` with T upper triangular and `(w T)^T G (w T) = I` on the kept
  columns: Gram-Schmidt on the r x r matrix `C = w^T p`, column by column. A column whose
  squared norm (after removing the earlier ones) is below `tol` times the largest is
  dropped (zero) if `drop`, else kept with unit Euclidean norm instead: inside the
  iteration a direction that one unlucky step leaves nearly dependent (rounding noise
  in float32) is kept, bounded, so the next step can grow it back if it is real (and
  it stays harmless noise if the scores have rank < r). A zero `w` stays zero.
  """
  r = w.shape[1]
  c = _dot(w.T, p)
  c = 0.5 * (c + c.T)
  rows = jax.lax.broadcasted_iota(jnp.int32, (r, r), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (r, r), 1)
  cmax = jnp.max(jnp.sum(jnp.where(rows == cols, c, 0.0), axis=1))
  ids = jax.lax.broadcasted_iota(jnp.int32, (r,), 0)

  def body(j, carry):
    t, ct, t_low, margin = carry  # columns < j: the orthonormal combinations so far, C t,
    # every column's unnormalised combination, and its squared norm minus the floor
    # (<= 0: below the floor). Only float selects with computed values: a select of
    # constants on a scalar predicate (`where(ok, 0., 1.)`) broke Triton's verifier.
    coeff = jnp.sum(jnp.where(rows == j, ct, 0.0), axis=0)  # <t_i, e_j>_C = (C t_i)[j]
    v = jnp.where(ids == j, 1.0, 0.0) - jnp.sum(t * coeff[None, :], axis=1)
    cv = _column(c, j, cols) - jnp.sum(ct * coeff[None, :], axis=1)
    n2 = jnp.sum(v * cv)
    floor = jnp.maximum(tol * cmax, TINY)
    ok = n2 > floor
    inv = jnp.where(ok, jax.lax.rsqrt(jnp.maximum(n2, floor)), 0.0)
    if not drop:  # kept unnormalised here; scaled to unit Euclidean norm below
      t_low = jnp.where(cols == j, v[:, None], t_low)
      margin = jnp.where(ids == j, n2 - floor, margin)
    t = jnp.where(cols == j, (v * inv)[:, None], t)
    ct = jnp.where(cols == j, (cv * inv)[:, None], ct)
    return t, ct, t_low, margin

  zero = jnp.zeros((r, r), jnp.float32)
  t, _, t_low, margin = jax.lax.fori_loop(0, r, body, (zero, zero, zero,
                                                       jnp.zeros((r,), jnp.float32)))
  if drop:
    return _dot(w, t), _dot(p, t)
  # Columns below the floor (margin <= 0): w t_j with unit Euclidean norm (metric norm
  # ~0); the columns above it are already in t (their scale here is 0).
  w_low = _dot(w, t_low)
  norm2 = jnp.sum(w_low * w_low, axis=0)
  scale = jnp.where((margin <= 0) & (norm2 > TINY),
                    jax.lax.rsqrt(jnp.maximum(norm2, TINY)), 0.0)
  t = t + t_low * scale[None, :]
  return _dot(w, t), _dot(p, t)


def factor_pair(gq_mul, gk_mul, z0, *, steps: int):
  """`(A, B)` `[d, r]` for one block, from `Gq @ x` and `Gk @ x` (callables) and a start.

  `z0 [d, r]` is the starting subspace (a fixed Gaussian matrix). Each of the `steps`
  iterations is two half steps of subspace iteration on S itself, in coefficients:
  left vectors `U = S V = Q (Gk Z)` (query coefficients `P = Gk Z`, orthonormalised in
  the metric Gq) and right vectors `V = S^T U = K (Gq P)` (key coefficients `Z = Gq P`,
  orthonormalised in the metric Gk). Orthonormalising each half step in its own metric
  keeps the conditioning at that of U or V (singular value ratios), not of `Gq Gk`
  (their squares), which float32 could not hold. One `d x d` product per half step.
  """
  z = z0
  gz = gk_mul(z)
  z, gz = metric_orth(z, gz, INNER_FLOOR, drop=False)
  for i in range(steps):
    p = gz                                   # U = Q P, P = Gk Z
    gp = gq_mul(p)
    p, gp = metric_orth(p, gp, INNER_FLOOR, drop=False)
    z = gp                                   # V = K Z, Z = Gq P
    gz = gk_mul(z)
    last = i == steps - 1
    z, gz = metric_orth(z, gz, FINAL_TOL if last else INNER_FLOOR, drop=last)
  z, gz = metric_orth(z, gz, FINAL_TOL)      # again: Z^T Gk Z = I to rounding
  a, b = gz, z
  qa2 = _total(a * gq_mul(a))  # |Q A|^2
  kb2 = _total(b * gz)         # |K B|^2 (= the number of kept directions)
  ok = (qa2 > TINY) & (kb2 > TINY)
  s = jnp.where(ok, jnp.sqrt(jnp.sqrt(jnp.where(ok, kb2, 1.0) / jnp.where(ok, qa2, 1.0))), 1.0)
  return a * s, b / s


def start_subspace(d: int, r: int) -> np.ndarray:
  """The fixed Gaussian starting subspace `[d, r]` (float32; the same on every device)."""
  return np.random.default_rng(20261125).standard_normal((d, r)).astype(np.float32)


def _kernel(gq_ref, gk_ref, z0_ref, a_ref, b_ref, *, steps):
  # The Grams are read at every product (from L2) rather than held: two d x d float32
  # values live through the whole program spilled at d=128 (H100, 2026-11-25: a 124 s
  # compile and 4.1 ms per call for B=1, H=16, N=16384, G=4).
  a, b = factor_pair(lambda x: _dot(gq_ref[...], x), lambda x: _dot(gk_ref[...], x),
                     z0_ref[...], steps=steps)
  a_ref[...] = a
  b_ref[...] = b


@functools.partial(jax.jit, static_argnames=("rank", "steps", "kv_group", "num_warps",
                                             "interpret"))
def factor_grams_kernel(gq, gk, *, rank: int, steps: int = 4, kv_group: int = 1,
                        num_warps: int = 8, interpret: bool = False):
  """`(A, B)` float32 `[M, d, r]` for M query Grams and M / kv_group key Grams.

  Args:
    gq: float32 `[M, d, d]` query Grams; gk: float32 `[M // kv_group, d, d]` key Grams,
      program i using key Gram `i // kv_group` (so a key Gram shared by the blocks and
      query heads of one kv head is read, not copied). d a power of two >= 16.
    rank: r; padded to 16 inside (Triton dots need 16), the extra columns drop out.
    num_warps: 8 by measurement (H100, 2026-11-25, B=1, H=16, d=64, G=4, 4 steps: 0.107
      ms for the 16 programs at 8 warps, 0.133 at 4, 0.346 at 1; the programs are
      latency-bound: r sequential Gram-Schmidt steps per orthonormalisation).
  """
  m, d, _ = gq.shape
  width = max(16, rank)
  z0 = np.zeros((d, width), np.float32)
  z0[:, :rank] = start_subspace(d, rank)
  out = jax.ShapeDtypeStruct((m, d, width), jnp.float32)
  kwargs = {}
  if not interpret:
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
    kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
  a, b = pl.pallas_call(
      functools.partial(_kernel, steps=steps),
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
