"""Warp-specialised FlashAttention forward for Hopper (Pallas Mosaic GPU).

One CTA = `compute_wgs` (2) consumer warpgroups of `block_q` query rows each + one TMA
producer warpgroup streaming K [block_kv, r] and V [block_kv, dv] tiles through `stages`
shared-memory buffers guarded by mbarriers. Scores are r wide (Q_rep, K_fused), the
accumulator and output dv wide. The two consumers ping-pong through a schedule barrier so
that one issues its wgmmas while the other computes its softmax (FlashAttention-3 §3.1).

Inputs are padded by the caller: Tq a multiple of compute_wgs * block_q, Tk of block_kv;
`kv_len` (static) is the real key count: tiles past it are not streamed, keys past it
in the last tile streamed are masked.
Outputs: out [B, Tq, H, dv] (input dtype) and lse [B, H, Tq] float32 (natural log).
"""

from __future__ import annotations

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels.mosaic_gpu import common
from pallas_kernels.mosaic_gpu.common import LN2, LOG2E, MASKED, WGMMA_ROW, i32
from pallas_kernels.mosaic_gpu.tiles import Tiles


def forward_call(q, k, v, *, causal: bool, kv_len: int, tiles: Tiles, q_offset: int = 0,
                 q_map_t=None):
  """`q_offset` (static, causal only): query row 0 sits at position q_offset, so query i
  sees keys j <= i + q_offset (one grouping block of a longer sequence).

  `q_map_t` (optional): the query projection done in the kernel. q is then the full
  `[B, Tq, H, d]` and q_map_t `[B, H, 2, r, d]` (q's dtype) the transposed map as a
  high and a low part (`map ~ hi + lo`, so `Q hi + Q lo` keeps ~16 bits of the float32
  map): each warpgroup computes its `Q_rep = Q map` tile with two wgmmas into float32,
  rounds it to the input dtype (as the XLA projection does) and goes on as usual. The
  full-width Q tile lands in the O staging buffer (free until the epilogue), so this
  needs `tiles.stage_out` and d == dv."""
  batch, q_len, heads, q_width = q.shape
  _, kv_len_padded, k_heads, r = k.shape
  project = q_map_t is not None
  if project:
    if not tiles.stage_out or q_width != v.shape[3]:
      raise ValueError("the in-kernel query projection needs stage_out tiles and d == dv")
    if q_map_t.shape != (batch, heads, 2, r, q_width):
      raise ValueError(f"q_map_t must be [B, H, 2, r, d] = {(batch, heads, 2, r, q_width)}, "
                       f"got {q_map_t.shape}")
  elif q_width != r:
    raise ValueError(f"q's width {q_width} must equal k's width {r}")
  v_heads, dv = v.shape[2], v.shape[3]
  dtype = q.dtype
  wgs, block_q, block_kv = tiles.compute_wgs, tiles.block_q, tiles.block_kv
  if wgs != 2:
    raise ValueError("the forward kernel ping-pongs exactly 2 consumer warpgroups")
  assert q_len % (wgs * block_q) == 0
  num_kv_tiles, kv_tail = common.streamed_key_tiles(kv_len, kv_len_padded, block_kv)
  stages = min(tiles.stages, num_kv_tiles)
  q_per_k, q_per_v = heads // k_heads, heads // v_heads
  rescale_threshold = float(tiles.rescale_threshold)  # 0: rescale O every tile
  cta_rows = wgs * block_q

  def kernel(q_ref, k_ref, v_ref, map_ref, out_ref, lse_ref, smem, loaded, free, schedule):
    q_smems, o_smems, lse_smems, k_smems, v_smems, map_smem = smem
    q_loaded, k_loaded, v_loaded, map_loaded = loaded
    k_free, v_free = free
    # Causal CTAs stream key tiles up to the diagonal of their last query row.
    bi, hi, qi, wg, cta_tiles = common.query_tile_cta(
        q_len=q_len, cta_rows=cta_rows, block_kv=block_kv, num_kv_tiles=num_kv_tiles,
        causal=causal, q_offset=q_offset)

    def schedule_sync():
      plgpu.barrier_arrive(schedule)
      plgpu.barrier_wait(schedule)

    @pl.when(wg < wgs)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      q_base = (qi * wgs + wg) * block_q
      q_pos = q_base + q_offset if q_offset else q_base  # position for the causal mask
      q_smem, lse_smem = q_smems.at[wg], lse_smems.at[wg]
      # With the projection the full-width tile lands in the O buffer (free until the end).
      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(q_base, block_q), hi],
                              o_smems.at[wg] if project else q_smem, q_loaded.at[wg])
      # This warpgroup's tiles: [0, wg_tiles); [0, plain_tiles) need no mask.
      wg_tiles, plain_tiles = common.query_rows_key_tiles(
          q_pos, block_q, block_kv, num_kv_tiles, causal=causal, kv_tail=kv_tail)

      m_i = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), WGMMA_ROW)
      l_i = plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32), WGMMA_ROW)
      acc = common.zeros_acc((block_q, dv))
      plgpu.barrier_wait(q_loaded.at[wg])
      if project:
        # Q_rep = Q (hi + lo)  ([block_q, r], contracted over d), rounded to the input
        # dtype like the XLA projection, then stored where the score wgmma reads it.
        plgpu.barrier_wait(map_loaded)
        q_rep = common.split_map_product(o_smems.at[wg], map_smem, block_q, r)
        q_smem[...] = q_rep.astype(dtype)
        plgpu.commit_smem()  # generic-proxy stores, read next by the wgmma (async proxy)

      @pl.when(wg_tiles > 0)
      def _():
        plgpu.barrier_wait(k_loaded.at[0])

      pl.when(wg == 1)(schedule_sync)  # offset warpgroup 1 by half a step

      def kv_step(t, carry, *, masked):
        acc, m_i, l_i = carry
        slot = lax.rem(t, i32(stages))

        # S = Q_rep K_fused^T  ([block_q, block_kv], contracted over r)
        def qk(s_ref):
          plgpu.wgmma(s_ref, q_smem, k_smems.at[slot].T)
          schedule_sync()
          return s_ref[...]
        s = pl.run_scoped(qk, plgpu.ACC((block_q, block_kv), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])

        if masked:  # diagonal tile (causal) and/or the tile holding padding keys
          valid = common.key_mask(s.shape, q_pos, t, block_kv, causal=causal,
                                  kv_len=kv_len if kv_tail else None)
          s = jnp.where(valid, s, MASKED)

        # Online softmax in base 2 (log2(e) folded into one FMA per score).
        m_new = jnp.maximum(m_i, s.max(axis=1) * LOG2E)
        if rescale_threshold:
          # Stale max: a row's max moves only when it would grow by more than the
          # threshold, so P <= 2^threshold. The first tile always moves it (m_i = -inf;
          # every row sees key 0 there, and masked scores are finite).
          m_new = jnp.where(m_new > m_i + rescale_threshold, m_new, m_i)
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s * LOG2E - common.row_bcast(m_new, s.shape))
        if rescale_threshold:
          # Rows whose max stayed have alpha = 1: skip the [block_q, dv] multiply unless
          # some row of this warpgroup moved (a uniform branch: no divergence).
          acc, l_i = lax.cond(
              common.any_row_greater(m_new, m_i),
              lambda: (acc * common.row_bcast(alpha, acc.shape), l_i * alpha),
              lambda: (acc, l_i))
        else:
          acc *= common.row_bcast(alpha, acc.shape)
          l_i *= alpha
        p_lo = p.astype(dtype)

        def softmax_done():
          plgpu.barrier_arrive(schedule)
          plgpu.barrier_wait(v_loaded.at[slot])
          plgpu.barrier_wait(schedule)  # the other warpgroup has issued its QK
        if dv <= 128:
          l_i += p.sum(axis=1)
          acc, l_i, m_new, p_lo = lax.optimization_barrier((acc, l_i, m_new, p_lo))
          softmax_done()
        else:
          softmax_done()
          l_i += p.sum(axis=1)

        # O += P V  ([block_q, dv], contracted over block_kv)
        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p_lo, v_smems.at[slot])
          nxt = t + 1

          @pl.when(nxt < wg_tiles)
          def _():
            plgpu.barrier_wait(k_loaded.at[lax.rem(nxt, i32(stages))])
        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l_i

      acc, m_i, l_i = common.kv_loop(kv_step, (acc, m_i, l_i), plain_tiles, wg_tiles,
                                     masked_tail=causal or kv_tail)

      if causal:
        # Tiles streamed for the other warpgroup only: wait for each (so the mbarrier
        # phases stay paced) and free it; keep the ping-pong schedule in step.
        def release(t, _):
          slot = lax.rem(t, i32(stages))
          plgpu.barrier_wait(k_loaded.at[slot])
          plgpu.barrier_arrive(k_free.at[slot])
          plgpu.barrier_wait(v_loaded.at[slot])
          plgpu.barrier_arrive(v_free.at[slot])
          schedule_sync()
          schedule_sync()
        lax.fori_loop(wg_tiles, cta_tiles, release, None)
      pl.when(wg == 0)(schedule_sync)

      # Epilogue: O / l and lse = ln(sum exp(s)) = ln2 * (m + log2 l).
      acc = acc * common.row_bcast(1.0 / l_i, acc.shape)
      out_view = out_ref.at[bi, pl.ds(q_base, block_q), hi]
      if o_smems is None:  # straight from registers (frees block_q * dv of shared memory)
        common.store_to_gmem(out_view, acc.astype(dtype))
      else:
        o_smems.at[wg][...] = acc.astype(dtype)
      lse_smem[...] = m_i * LN2 + jnp.log(l_i)
      plgpu.commit_smem()
      if o_smems is not None:
        plgpu.copy_smem_to_gmem(o_smems.at[wg], out_view)
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hi, pl.ds(q_base, block_q)])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      if project:  # the head's map (both parts), read by both consumers
        for part in range(2):
          plgpu.copy_gmem_to_smem(map_ref.at[bi, hi, part], map_smem.at[part], map_loaded)
      k_head = lax.div(hi, i32(q_per_k))  # GQA: index the shared head, no copies
      v_head = lax.div(hi, i32(q_per_v))

      def tile(t):
        keys = pl.ds(t * block_kv, block_kv)
        return k_ref.at[bi, keys, k_head], v_ref.at[bi, keys, v_head]
      common.stream_tiles(tile, (k_smems, v_smems), (k_loaded, v_loaded), (k_free, v_free),
                          num_tiles=cta_tiles, stages=stages)

  def entry(*refs):
    if project:
      q_ref, k_ref, v_ref, map_ref, out_ref, lse_ref = refs
    else:
      (q_ref, k_ref, v_ref, out_ref, lse_ref), map_ref = refs, None
    smem = (
        plgpu.SMEM((wgs, block_q, r), dtype, transforms=common.smem_transforms(r, dtype)),
        (plgpu.SMEM((wgs, block_q, dv), dtype, transforms=common.smem_transforms(dv, dtype))
         if tiles.stage_out else None),
        plgpu.SMEM((wgs, block_q), jnp.float32),
        plgpu.SMEM((stages, block_kv, r), dtype, transforms=common.smem_transforms(r, dtype)),
        plgpu.SMEM((stages, block_kv, dv), dtype,
                   transforms=common.smem_transforms(dv, dtype)),
        # The map's transposed parts [r, d]: rows of d elements, the swizzle of the
        # full-width Q tile (wgmma needs one swizzle for both operands).
        (plgpu.SMEM((2, r, q_width), dtype, transforms=common.smem_transforms(q_width, dtype))
         if project else None),
    )
    loaded = (plgpu.Barrier(num_barriers=wgs), plgpu.Barrier(num_barriers=stages),
              plgpu.Barrier(num_barriers=stages),
              plgpu.Barrier(num_arrivals=2) if project else None)
    free = (plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
            plgpu.Barrier(num_arrivals=wgs, num_barriers=stages))
    pl.run_scoped(
        lambda *scoped: kernel(q_ref, k_ref, v_ref, map_ref, out_ref, lse_ref, *scoped),
        smem, loaded, free, plgpu.Barrier(num_arrivals=wgs), collective_axes="wg")

  out_type = (jax.ShapeDtypeStruct((batch, q_len, heads, dv), dtype),
              jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32))
  return plgpu.kernel(
      entry,
      out_type=out_type,
      grid=(heads, q_len // cta_rows, batch),
      grid_names=("heads", "q_tiles", "batch"),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(q, k, v, *([q_map_t] if project else []))
