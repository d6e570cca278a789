"""Warp-specialised FlashAttention backward for Hopper (Pallas Mosaic GPU).

Two kernels after an XLA pre-pass delta = rowsum(O * dO) (FlashAttention-2 Alg. 2):
- dQ: consumer warpgroups own `block_q_dq` query rows (Q_rep, dO, lse, delta stay in
  shared memory / registers); a TMA warpgroup streams K_fused and V tiles.
  P = exp(S - lse), dP = dO V^T, dS = P (dP - delta), dQ += dS K.
- dK/dV: consumer warpgroups own `block_kv_dkv` keys (K_fused and V stay); a TMA
  warpgroup streams Q_rep, dO, lse and delta tiles.
  P^T = exp(K Q^T - lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta),
  dK += dS^T Q.
Causal: dQ stops at the diagonal, dK/dV starts at it; only diagonal tiles are masked.
Scores are r wide, dO / V / dV dv wide. dK and dV come out per query head (the
wrapper sums them over the query heads that share a k / v head).
"""

from __future__ import annotations

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels.mosaic_gpu import common
from pallas_kernels.mosaic_gpu.common import LOG2E, WGMMA_COL, WGMMA_ROW, cdiv, i32
from pallas_kernels.mosaic_gpu.tiles import Tiles


def _regs(wgs: int) -> tuple[int, int]:
  """(consumer, producer) register caps: 65536 registers / 128 threads per warpgroup."""
  return {1: (256, 40), 2: (232, 40), 3: (160, 24)}[wgs]


def dq_call(q, k, v, do, lse, delta, *, causal: bool, kv_len: int, tiles: Tiles,
            q_offset: int = 0):
  batch, q_len, heads, r = q.shape
  _, kv_len_padded, k_heads, _ = k.shape
  v_heads, dv = v.shape[2], v.shape[3]
  dtype = q.dtype
  wgs, block_q, block_kv = tiles.compute_wgs_bwd, tiles.block_q_dq, tiles.block_kv_dq
  assert q_len % (wgs * block_q) == 0
  num_kv_tiles, kv_tail = common.streamed_key_tiles(kv_len, kv_len_padded, block_kv)
  stages = min(tiles.stages_bwd, num_kv_tiles)
  q_per_k, q_per_v = heads // k_heads, heads // v_heads
  cta_rows = wgs * block_q
  consumer_regs, producer_regs = _regs(wgs)

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, smem, rows_loaded,
             kv_loaded, kv_free):
    q_smems, do_smems, lse_smems, delta_smems, k_smems, v_smems = smem
    bi, hi, qi, wg, cta_tiles = common.query_tile_cta(
        q_len=q_len, cta_rows=cta_rows, block_kv=block_kv, num_kv_tiles=num_kv_tiles,
        causal=causal, q_offset=q_offset)

    @pl.when(wg < wgs)
    def _consumer():
      plgpu.set_max_registers(consumer_regs, action="increase")
      q_base = (qi * wgs + wg) * block_q
      q_pos = q_base + q_offset if q_offset else q_base  # position for the causal mask
      rows = pl.ds(q_base, block_q)
      q_smem, do_smem = q_smems.at[wg], do_smems.at[wg]
      lse_smem, delta_smem = lse_smems.at[wg], delta_smems.at[wg]
      barrier = rows_loaded.at[wg]  # 4 arrivals: one per copy
      plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], q_smem, barrier)
      plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, hi], do_smem, barrier)
      plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, rows], lse_smem, barrier)
      plgpu.copy_gmem_to_smem(delta_ref.at[bi, hi, rows], delta_smem, barrier)
      wg_tiles, plain_tiles = common.query_rows_key_tiles(
          q_pos, block_q, block_kv, num_kv_tiles, causal=causal, kv_tail=kv_tail)
      plgpu.barrier_wait(barrier)
      lse2 = plgpu.load(lse_smem, layout=WGMMA_ROW) * LOG2E
      delta = plgpu.load(delta_smem, layout=WGMMA_ROW)
      dq = common.zeros_acc((block_q, r))

      def kv_step(t, dq, *, masked):
        slot = lax.rem(t, i32(stages))
        plgpu.barrier_wait(kv_loaded.at[slot])

        def scores(s_ref):  # S = Q_rep K^T
          plgpu.wgmma(s_ref, q_smem, k_smems.at[slot].T)
          return s_ref[...]
        s = pl.run_scoped(scores, plgpu.ACC((block_q, block_kv), jnp.float32))
        p = jnp.exp2(s * LOG2E - common.row_bcast(lse2, s.shape))
        if masked:
          valid = common.key_mask(s.shape, q_pos, t, block_kv, causal=causal,
                                  kv_len=kv_len if kv_tail else None)
          p = jnp.where(valid, p, 0.0)

        def dprobs(dp_ref):  # dP = dO V^T
          plgpu.wgmma(dp_ref, do_smem, v_smems.at[slot].T)
          return dp_ref[...]
        dp = pl.run_scoped(dprobs, plgpu.ACC((block_q, block_kv), jnp.float32))
        ds = p * (dp - common.row_bcast(delta, dp.shape))

        def dq_update(acc_ref):  # dQ += dS K
          plgpu.wgmma(acc_ref, ds.astype(dtype), k_smems.at[slot])
        dq = pl.run_state(dq_update)(plgpu.ACC.init(dq))
        plgpu.barrier_arrive(kv_free.at[slot])
        return dq

      dq = common.kv_loop(kv_step, dq, plain_tiles, wg_tiles, masked_tail=causal or kv_tail)
      if causal:  # tiles streamed for a later warpgroup only: wait (pacing) and free
        def release(t, _):
          slot = lax.rem(t, i32(stages))
          plgpu.barrier_wait(kv_loaded.at[slot])
          plgpu.barrier_arrive(kv_free.at[slot])
        lax.fori_loop(wg_tiles, cta_tiles, release, None)

      q_smem[...] = dq.astype(dtype)  # Q_rep is no longer needed: reuse its buffer
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[bi, rows, hi])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(producer_regs, action="decrease")
      k_head = lax.div(hi, i32(q_per_k))
      v_head = lax.div(hi, i32(q_per_v))

      def tile(t):
        keys = pl.ds(t * block_kv, block_kv)
        return k_ref.at[bi, keys, k_head], v_ref.at[bi, keys, v_head]
      common.stream_tiles(tile, (k_smems, v_smems), kv_loaded, kv_free,
                          num_tiles=cta_tiles, stages=stages)

  def entry(*refs):
    smem = (
        plgpu.SMEM((wgs, block_q, r), dtype, transforms=common.smem_transforms(r, dtype)),
        plgpu.SMEM((wgs, block_q, dv), dtype, transforms=common.smem_transforms(dv, dtype)),
        plgpu.SMEM((wgs, block_q), jnp.float32),
        plgpu.SMEM((wgs, block_q), jnp.float32),
        plgpu.SMEM((stages, block_kv, r), dtype, transforms=common.smem_transforms(r, dtype)),
        plgpu.SMEM((stages, block_kv, dv), dtype,
                   transforms=common.smem_transforms(dv, dtype)),
    )
    pl.run_scoped(
        lambda *scoped: kernel(*refs, *scoped),
        smem,
        plgpu.Barrier(num_arrivals=4, num_barriers=wgs),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
        collective_axes="wg")

  return plgpu.kernel(
      entry,
      out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      grid=(heads, q_len // cta_rows, batch),
      grid_names=("heads", "q_tiles", "batch"),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q, k, v, do, lse, delta)


def dkv_call(q, k, v, do, lse, delta, *, causal: bool, kv_len: int, tiles: Tiles,
             dq_acc=None, q_offset: int = 0):
  """dK [B, Tk, H, r] and dV [B, Tk, H, dv] per query head.

  With `dq_acc` (a float32 Ref [B, Tq, H, r] holding zeros) the kernel also computes dQ
  (FlashAttention-3's fused backward): each step stores dS^T to shared memory, forms
  the partial dQ = dS K for its query tile and adds it into `dq_acc` with a TMA
  reduce-add, so S and dP are computed once instead of twice.
  """
  fuse_dq = dq_acc is not None
  # Keys past kv_len are zero padding: their dK/dV rows are sliced off, but with a fused
  # dQ their P must be 0 (exp(-lse) can overflow), so mask them then.
  kv_tail = fuse_dq and kv_len < k.shape[1]
  batch, q_len, heads, r = q.shape
  _, kv_len_padded, k_heads, _ = k.shape
  v_heads, dv = v.shape[2], v.shape[3]
  dtype = q.dtype
  wgs, block_kv, block_q = tiles.compute_wgs_bwd, tiles.block_kv_dkv, tiles.block_q_dkv
  assert kv_len_padded % (wgs * block_kv) == 0 and q_len % block_q == 0
  num_q_tiles = q_len // block_q
  q_per_k, q_per_v = heads // k_heads, heads // v_heads
  cta_keys = wgs * block_kv
  consumer_regs, producer_regs = _regs(wgs)

  def kernel(*refs):
    if fuse_dq:
      (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref, smem,
       kv_loaded, q_loaded, q_free) = refs
      k_smems, v_smems, q_smems, do_smems, lse_smems, delta_smems, ds_smems, dq_smems = smem
    else:
      (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, smem,
       kv_loaded, q_loaded, q_free) = refs
      k_smems, v_smems, q_smems, do_smems, lse_smems, delta_smems = smem
    bi = lax.axis_index("batch")
    hi = lax.axis_index("heads")
    ki = lax.axis_index("kv_tiles")
    wg = lax.axis_index("wg")
    # q tiles this CTA streams: [cta_first, num_q_tiles); causal starts at the diagonal.
    def first_q_tile(key):  # first query tile holding a query at position >= key
      if q_offset:
        key = jnp.maximum(key - q_offset, 0)
      return lax.div(key, i32(block_q))
    cta_first = first_q_tile(ki * cta_keys) if causal else 0
    stages = min(tiles.stages_bwd, num_q_tiles)

    @pl.when(wg < wgs)
    def _consumer():
      plgpu.set_max_registers(consumer_regs, action="increase")
      kv_base = (ki * wgs + wg) * block_kv
      keys = pl.ds(kv_base, block_kv)
      k_smem, v_smem = k_smems.at[wg], v_smems.at[wg]
      plgpu.copy_gmem_to_smem(k_ref.at[bi, keys, lax.div(hi, i32(q_per_k))], k_smem,
                              kv_loaded.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, keys, lax.div(hi, i32(q_per_v))], v_smem,
                              kv_loaded.at[wg])
      # [cta_first, wg_first): streamed for an earlier warpgroup only (causal);
      # [wg_first, plain_first): diagonal tiles, masked; [plain_first, end): unmasked.
      if causal:
        wg_first = jnp.minimum(first_q_tile(kv_base), num_q_tiles)
        last_key = kv_base + block_kv - 1
        if q_offset:
          last_key = jnp.maximum(last_key - q_offset, 0)
        plain_first = jnp.minimum(cdiv(last_key, block_q), num_q_tiles)
      else:
        wg_first = plain_first = 0
      plgpu.barrier_wait(kv_loaded.at[wg])
      dk = common.zeros_acc((block_kv, r))
      dv_acc = common.zeros_acc((block_kv, dv))

      def release(i, _):
        slot = lax.rem(i - cta_first, i32(stages))
        plgpu.barrier_wait(q_loaded.at[slot])
        plgpu.barrier_arrive(q_free.at[slot])
      if causal:
        lax.fori_loop(cta_first, wg_first, release, None)

      def q_step(i, carry, *, masked):
        dk, dv_acc = carry
        slot = lax.rem(i - cta_first, i32(stages))
        plgpu.barrier_wait(q_loaded.at[slot])
        q_smem, do_smem = q_smems.at[slot], do_smems.at[slot]

        def scores(s_ref):  # S^T = K Q_rep^T  [block_kv, block_q]
          plgpu.wgmma(s_ref, k_smem, q_smem.T)
          return s_ref[...]
        s_t = pl.run_scoped(scores, plgpu.ACC((block_kv, block_q), jnp.float32))
        lse2 = plgpu.load(lse_smems.at[slot], layout=WGMMA_COL) * LOG2E
        p_t = jnp.exp2(s_t * LOG2E - common.col_bcast(lse2, s_t.shape))
        if masked or kv_tail:
          key_j = kv_base + common.iota(s_t.shape, 0)
          valid = key_j < kv_len if kv_tail else None
          if masked:  # key j sees query i iff j <= i
            query_i = i * block_q + common.iota(s_t.shape, 1)
            if q_offset:
              query_i = query_i + q_offset
            causal_ok = key_j <= query_i
            valid = causal_ok if valid is None else jnp.logical_and(valid, causal_ok)
          p_t = jnp.where(valid, p_t, 0.0)

        def dv_and_dp(refs):  # dV += P^T dO ; dP^T = V dO^T (one wgmma group)
          dv_ref, dp_ref = refs
          plgpu.wgmma(dv_ref, p_t.astype(dtype), do_smem)
          plgpu.wgmma(dp_ref, v_smem, do_smem.T)
        dv_acc, dp_t = pl.run_state(dv_and_dp)(
            (plgpu.ACC.init(dv_acc), plgpu.ACC.init(common.zeros_acc((block_kv, block_q)))))
        delta = plgpu.load(delta_smems.at[slot], layout=WGMMA_COL)
        ds_t = p_t * (dp_t - common.col_bcast(delta, dp_t.shape))

        ds_lo = ds_t.astype(dtype)
        if fuse_dq:
          ds_smem = ds_smems.at[wg]
          ds_smem[...] = ds_lo
          plgpu.commit_smem()  # make the stores visible to the wgmma below

        def dk_update(acc_ref):  # dK += dS^T Q_rep
          plgpu.wgmma(acc_ref, ds_lo, q_smem)
        dk = pl.run_state(dk_update)(plgpu.ACC.init(dk))
        plgpu.barrier_arrive(q_free.at[slot])

        if fuse_dq:
          def dq_part(acc_ref):  # partial dQ = dS K  [block_q, r]
            plgpu.wgmma(acc_ref, ds_smem.T, k_smem)
            return acc_ref[...]
          part = pl.run_scoped(dq_part, plgpu.ACC((block_q, r), jnp.float32))
          dq_smem = dq_smems.at[wg]
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # last reduce has read it
          dq_smem[...] = part
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[bi, pl.ds(i * block_q, block_q), hi],
                                  reduction_op="add")
        return dk, dv_acc

      carry = (dk, dv_acc)
      if causal:
        carry = lax.cond(
            wg_first < plain_first,
            lambda: lax.fori_loop(wg_first, plain_first,
                                  lambda i, c: q_step(i, c, masked=True), carry),
            lambda: carry)
      dk, dv_acc = lax.fori_loop(plain_first, num_q_tiles,
                                 lambda i, c: q_step(i, c, masked=False), carry)

      k_smem[...] = dk.astype(dtype)
      v_smem[...] = dv_acc.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[bi, keys, hi], commit_group=False)
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[bi, keys, hi], commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(producer_regs, action="decrease")

      def tile(i):
        rows = pl.ds(i * block_q, block_q)
        return (q_ref.at[bi, rows, hi], do_ref.at[bi, rows, hi], lse_ref.at[bi, hi, rows],
                delta_ref.at[bi, hi, rows])
      common.stream_tiles(tile, (q_smems, do_smems, lse_smems, delta_smems), q_loaded,
                          q_free, num_tiles=num_q_tiles - cta_first, stages=stages,
                          first=cta_first)

  def entry(*refs):
    stages = min(tiles.stages_bwd, num_q_tiles)
    smem = (
        plgpu.SMEM((wgs, block_kv, r), dtype, transforms=common.smem_transforms(r, dtype)),
        plgpu.SMEM((wgs, block_kv, dv), dtype,
                   transforms=common.smem_transforms(dv, dtype)),
        plgpu.SMEM((stages, block_q, r), dtype, transforms=common.smem_transforms(r, dtype)),
        plgpu.SMEM((stages, block_q, dv), dtype,
                   transforms=common.smem_transforms(dv, dtype)),
        plgpu.SMEM((stages, block_q), jnp.float32),
        plgpu.SMEM((stages, block_q), jnp.float32),
    )
    if fuse_dq:
      smem += (
          # dS^T is the transposed A operand of dQ = dS K: its swizzle must match K's.
          plgpu.SMEM((wgs, block_kv, block_q), dtype,
                     transforms=common.smem_transforms(r, dtype)),
          plgpu.SMEM((wgs, block_q, r), jnp.float32),
      )
    pl.run_scoped(
        lambda *scoped: kernel(*refs, *scoped),
        smem,
        plgpu.Barrier(num_arrivals=2, num_barriers=wgs),
        plgpu.Barrier(num_arrivals=4, num_barriers=stages),
        plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
        collective_axes="wg")

  out_type = (jax.ShapeDtypeStruct((batch, kv_len_padded, heads, r), dtype),
              jax.ShapeDtypeStruct((batch, kv_len_padded, heads, dv), dtype))
  return plgpu.kernel(
      entry,
      out_type=out_type,
      grid=(heads, kv_len_padded // cta_keys, batch),
      grid_names=("heads", "kv_tiles", "batch"),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q, k, v, do, lse, delta, *([dq_acc] if fuse_dq else []))
