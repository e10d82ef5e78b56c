"""backend="triton": the segment plan of add_lora for decode-like batches (every weight byte read once).

Design note
-----------
The fused kernel (triton_sgmv.py) gives every (tile, column chunk) program the whole shrink, so a
decode batch spread over the SMs re-reads each used adapter's A once per tile and chunk: 2.3-158x
the roofline's bytes at the headline decode shapes (docs/kernels.md, "Bytes per launch plan").
This plan splits the work by adapter **segment** (``seg_info``: each slot's (start, length) in
``sorted_tokens``) instead of by tile, in three launches:

* h      [n, T, R] fp32: zero-filled when the shrink splits K (atomics), else left empty (every
         entry the expand reads is written first: rows of a segment, rank lanes below the rank).
         The default (K_SPAN 0) does not split K: two launches, deterministic, and a bound call
         (triton_sgmv.BoundAdd) reuses its thread's h for the stream (_segment_h).
* shrink grid (S, K splits; 1 by default). A program takes one slot's segment, BLOCK_M rows at a time (the M
         side of a tl.dot tile, masked; a longer segment loops, re-reading that K split of A from
         L2 once per BLOCK_M rows), and walks its K split in BLOCK_K steps: per step it loads the
         rows' x once and each slice's A[slot, :R_PAD] once, into one [BLOCK_M, R_PAD] fp32
         accumulator per slice (up to 4: fused QKV's x is read once, not once per slice), added
         into h with fp32 atomics (K splits > 1) or stored (one split).
* expand grid (S, column chunks of COLS, n_slices). A program loads its segment's h rows once per
         BLOCK_M rows (scaled by the slot's scaling, rounded to B's dtype for the tensor cores as
         the fused kernel rounds its h), then walks its chunk's B tiles of BLOCK_N columns once
         each: tl.dot, then y's read-modify-write. Chunks own disjoint columns: no atomics on y.

So A and B are read once per BLOCK_M rows of a segment and x once per K split of its rows
(bytes model: benchmarks/bytes_model.py, plan "segment": at most 1.21x the roofline at the
headline decode shapes). The grids depend on S, K and N only (never on the data), so a step is
CUDA-graph capturable; unused slots and programs past a slot's rank or a slice's width exit at
once. Index safety is the fused kernel's: segment starts / lengths clamped to [0, T], row ids
outside [0, T) masked out of every load and store, ranks clamped to [0, R], int64 offsets.

Cost against the fused kernel: three launches instead of one and an h round trip (8 bytes per
row and rank lane and K split), so the route (configs.py, kind "route": ``DECODE``) takes this plan
only when the fused plan's modelled re-reads of A exceed ``SEGMENT_MIN_BYTES`` (beyond L2's
reach, where bytes decide); a GPU run's tuned table can move that threshold per device.

Interpreter (TRITON_INTERPRET=1): its bf16 tl.dot is wrong, so bf16 dots are upcast to fp32 there
(``_fp32_dot``), and the fp32 atomics it supports carry the K splits.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..metadata import LoRABatchMeta
from .configs import device_facts, kernel_config, next_pow2
from .launch_args import same_strides, slice_columns, slice_groups
from .triton_sgmv import (MAX_SLICES_PER_LAUNCH, _NO_SPECIALIZE, _fp32_dot, _load_b, _mac, _mult, _pad4, _pick,
                          _rank, _ranks_args, _shrink_rows, _tile_rows, _y_ptrs, b_access)


# The per-call parameters a bound plan (triton_sgmv.BoundAdd) fills in, first in each kernel.
SHRINK_DYNAMIC = ("x_ptr", "h_ptr", "sorted_ptr", "seg_ptr", "T")
EXPAND_DYNAMIC = ("h_ptr", "y_ptr", "sorted_ptr", "seg_ptr", "T")


@triton.jit
def _segment(seg_ptr, slot, S, T):
    """(start, end) int64 of ``slot``'s segment of sorted_tokens, clamped to 0 <= start <= end <= T."""
    start = tl.load(seg_ptr + slot).to(tl.int64)
    length = tl.load(seg_ptr + S + slot).to(tl.int64)
    start = tl.minimum(tl.maximum(start, 0), T)
    end = tl.minimum(tl.maximum(start + length, start), T)
    return start, end


@triton.jit
def _seg_a_step(acc, xt, a_ptr, offs_k, k_mask, offs_r, rank, stride_ar, stride_ak, FP32_DOT: tl.constexpr):
    """acc[BM, R_PAD] += xt[BM, BK] @ A[offs_r, offs_k].T (a_ptr at the slot), lanes >= rank masked."""
    at = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                 mask=(offs_r < rank)[None, :] & k_mask[:, None], other=0.0)              # [BK, R_PAD]
    return _mac(xt, at, acc, True, FP32_DOT)


@triton.jit
def _seg_h_out(h_ptr, gsid, rows, m_mask, offs_r, rank, acc, stride_hn, stride_ht, stride_hr, ATOMIC: tl.constexpr):
    h_ptrs = h_ptr + gsid.to(tl.int64) * stride_hn + rows[:, None] * stride_ht + offs_r[None, :] * stride_hr
    mask = m_mask[:, None] & (offs_r < rank)[None, :]
    if ATOMIC:
        tl.atomic_add(h_ptrs, acc, mask=mask)
    else:
        tl.store(h_ptrs, acc, mask=mask)


@triton.jit(do_not_specialize=["T"])
def _seg_shrink_kernel(
    x_ptr,                              # [T, K] fp16/bf16/fp32
    h_ptr,                              # [n_slices, T, R] fp32 (zero-filled when ATOMIC)
    sorted_ptr,                         # [T] int32: rows sorted by slot
    seg_ptr,                            # [2, S] int32: (start, length) of each slot's segment
    T,
    a0_ptr, a1_ptr, a2_ptr, a3_ptr,     # [S, R, K] per slice, x's dtype, strides shared
    ranks_ptr,                          # [n_slices, S] int32/int64 via (stride_rn, stride_rs)
    K, R, S,
    stride_xt, stride_xk,
    stride_as, stride_ar, stride_ak,
    stride_hn, stride_ht, stride_hr,
    stride_rn, stride_rs,
    slice_base,                         # global index of this launch's slice 0
    k_span,                             # K elements per program (a multiple of BLOCK_K)
    NS: tl.constexpr,                   # slices of this launch (1..4): one accumulator each, x read once
    BLOCK_M: tl.constexpr, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr, HAS_RANKS: tl.constexpr, FP32_DOT: tl.constexpr,
):
    slot = tl.program_id(0)
    kid = tl.program_id(1)
    start, end = _segment(seg_ptr, slot, S, T)
    r0 = _rank(ranks_ptr, slice_base, slot, stride_rn, stride_rs, R, HAS_RANKS)
    r1 = 0
    r2 = 0
    r3 = 0
    if NS > 1:
        r1 = _rank(ranks_ptr, slice_base + 1, slot, stride_rn, stride_rs, R, HAS_RANKS)
    if NS > 2:
        r2 = _rank(ranks_ptr, slice_base + 2, slot, stride_rn, stride_rs, R, HAS_RANKS)
    if NS > 3:
        r3 = _rank(ranks_ptr, slice_base + 3, slot, stride_rn, stride_rs, R, HAS_RANKS)
    k_lo = kid * k_span
    if (start >= end) | (tl.maximum(tl.maximum(r0, r1), tl.maximum(r2, r3)) == 0) | (k_lo >= K):
        return
    k_hi = tl.minimum(K, k_lo + k_span)
    offs_r = tl.arange(0, R_PAD)
    offs_k0 = tl.arange(0, BLOCK_K)
    slot_off = slot.to(tl.int64) * stride_as
    for m0 in range(start, end, BLOCK_M):
        rows, m_mask = _tile_rows(sorted_ptr, m0, end, T, BLOCK_M)
        acc0 = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + offs_k0
            k_mask = offs_k < k_hi
            xt = tl.load(x_ptr + rows[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)           # [BM, BK], once
            acc0 = _seg_a_step(acc0, xt, a0_ptr + slot_off, offs_k, k_mask, offs_r, r0, stride_ar, stride_ak, FP32_DOT)
            if NS > 1:
                acc1 = _seg_a_step(acc1, xt, a1_ptr + slot_off, offs_k, k_mask, offs_r, r1, stride_ar, stride_ak,
                                   FP32_DOT)
            if NS > 2:
                acc2 = _seg_a_step(acc2, xt, a2_ptr + slot_off, offs_k, k_mask, offs_r, r2, stride_ar, stride_ak,
                                   FP32_DOT)
            if NS > 3:
                acc3 = _seg_a_step(acc3, xt, a3_ptr + slot_off, offs_k, k_mask, offs_r, r3, stride_ar, stride_ak,
                                   FP32_DOT)
        _seg_h_out(h_ptr, slice_base, rows, m_mask, offs_r, r0, acc0, stride_hn, stride_ht, stride_hr, ATOMIC)
        if NS > 1:
            _seg_h_out(h_ptr, slice_base + 1, rows, m_mask, offs_r, r1, acc1, stride_hn, stride_ht, stride_hr, ATOMIC)
        if NS > 2:
            _seg_h_out(h_ptr, slice_base + 2, rows, m_mask, offs_r, r2, acc2, stride_hn, stride_ht, stride_hr, ATOMIC)
        if NS > 3:
            _seg_h_out(h_ptr, slice_base + 3, rows, m_mask, offs_r, r3, acc3, stride_hn, stride_ht, stride_hr, ATOMIC)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _seg_expand_kernel(
    h_ptr,                              # [n_slices, T, R] fp32
    y_ptr,                              # [T, N] updated in place, N = sum N_i
    sorted_ptr, seg_ptr,                # as in the shrink kernel
    T,
    b0_ptr, b1_ptr, b2_ptr, b3_ptr,     # [S, N_i, R] per slice, y's dtype
    scal_ptr,                           # [S] fp32
    ranks_ptr,
    R, S,
    n0, n1, n2, n3,                     # N_i of each slice
    c0, c1, c2, c3,                     # first column of each slice in y
    bs0, bs1, bs2, bs3,                 # slot stride of each B_i
    br0, br1, br2, br3,                 # rank stride of each B_i (the pool's rank-major B: N_i)
    stride_bn,                          # shared by all B_i
    stride_hn, stride_ht, stride_hr,
    stride_yt, stride_yn,
    stride_rn, stride_rs,
    slice_base,
    tiles_per_prog,                     # output tiles of BLOCK_N columns of one program
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    HAS_RANKS: tl.constexpr, FP32_DOT: tl.constexpr, B_LAYOUT: tl.constexpr, VEC: tl.constexpr,
):
    slot = tl.program_id(0)
    pid_c = tl.program_id(1)
    sid = tl.program_id(2)
    start, end = _segment(seg_ptr, slot, S, T)
    gsid = slice_base + sid
    rank = _rank(ranks_ptr, gsid, slot, stride_rn, stride_rs, R, HAS_RANKS)
    n_i = _pick(sid, n0, n1, n2, n3)
    nt_lo = pid_c * tiles_per_prog
    nt_hi = tl.minimum(nt_lo + tiles_per_prog, tl.cdiv(n_i, BLOCK_N))
    if (start >= end) | (rank == 0) | (nt_lo >= nt_hi):
        return
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < rank
    slot64 = slot.to(tl.int64)
    b_ptr = _pick(sid, b0_ptr, b1_ptr, b2_ptr, b3_ptr) + slot64 * _mult(_pick(sid, bs0, bs1, bs2, bs3), VEC)
    stride_br = _pick(sid, br0, br1, br2, br3)
    col0 = _pick(sid, c0, c1, c2, c3)
    scale = tl.load(scal_ptr + slot)
    h_base = h_ptr + gsid.to(tl.int64) * stride_hn
    for m0 in range(start, end, BLOCK_M):
        rows, m_mask = _tile_rows(sorted_ptr, m0, end, T, BLOCK_M)
        h = tl.load(h_base + rows[:, None] * stride_ht + offs_r[None, :] * stride_hr,
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0) * scale            # [BM, R_PAD] fp32
        if FP32_DOT:
            hd = h
        else:
            hd = h.to(b_ptr.dtype.element_ty)
        for nt in range(nt_lo, nt_hi):      # (a tile index: the compiler sees offs_n's alignment)
            offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
            bt = _load_b(b_ptr, offs_r, offs_n, rank, n_i, stride_br, stride_bn, B_LAYOUT, VEC)   # [R_PAD, BN]
            out = _mac(hd, bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), True, FP32_DOT)
            y_ptrs, n_mask = _y_ptrs(y_ptr, rows, col0, offs_n, n_i, stride_yt, stride_yn, VEC)
            mask = m_mask[:, None] & n_mask[None, :]
            yv = tl.load(y_ptrs, mask=mask, other=0.0)
            tl.store(y_ptrs, (yv.to(tl.float32) + out).to(yv.dtype), mask=mask)


# ---------------------------------------------------------------------------------- launchers


def plan_shape(T: int, K: int, cfg) -> dict:
    """The launch geometry of one call: BLOCK_M (rows per step: 16..cfg's, the smallest power of
    two holding T), the K span per shrink program and the number of K splits."""
    block_m = max(16, min(cfg["BLOCK_M"], next_pow2(max(T, 1))))
    bk = cfg["BLOCK_K"]
    span = cdiv_k = max(bk, -(-max(K, 1) // bk) * bk)       # K_SPAN 0: the whole K (one split)
    if cfg["K_SPAN"] > 0:
        span = min(cdiv_k, max(bk, (cfg["K_SPAN"] // bk) * bk))
    return {"BLOCK_M": block_m, "k_span": span, "splits": triton.cdiv(K, span)}


def segment_launches(y: torch.Tensor, x: torch.Tensor, a_list: Sequence[torch.Tensor], b_list: Sequence[torch.Tensor],
                     scalings: torch.Tensor, ranks: Optional[torch.Tensor], meta: LoRABatchMeta,
                     h: Optional[torch.Tensor] = None):
    """(h, launches): the h buffer to use ([n, T, R] fp32, zero-filled when the shrink splits K)
    and the launches as (kernel, grid, args, kwargs), shrinks first. a_list / b_list must already
    share their strides; empty for a zero delta."""
    T, K = x.shape
    N = y.shape[1]
    S, R, _ = a_list[0].shape
    n = len(a_list)
    if T == 0 or R == 0 or N == 0 or S == 0 or K == 0:
        return None, []
    cfg = kernel_config("segment", block_m=meta.block_m, K=K, N=N, R=R, n_slices=n, dtype=x.dtype, device=x.device)
    geo = plan_shape(T, K, cfg)
    bm, span, splits = geo["BLOCK_M"], geo["k_span"], geo["splits"]
    r_pad = max(16, next_pow2(R))
    if h is None:
        h = (torch.zeros if splits > 1 else torch.empty)((n, T, R), dtype=torch.float32, device=x.device)
    rk, srn, srs, has_r = _ranks_args(ranks, scalings)
    fp32_dot = _fp32_dot(x.dtype)
    cols = slice_columns(b_list)
    A0, B0 = a_list[0], b_list[0]
    bn = cfg["BLOCK_N"]
    tiles = max(1, cfg["COLS"] // bn)         # output tiles per expand program
    shrinks, expands = [], []
    for base, cnt in slice_groups(n, MAX_SLICES_PER_LAUNCH):
        a, b = _pad4(a_list[base:base + cnt]), b_list[base:base + cnt]
        shrinks.append((_seg_shrink_kernel, (S, splits, 1),
                        (x, h, meta.sorted_tokens, meta.seg_info, T, a[0], a[1], a[2], a[3], rk, K, R, S,
                         x.stride(0), x.stride(1), A0.stride(0), A0.stride(1), A0.stride(2),
                         h.stride(0), h.stride(1), h.stride(2), srn, srs, base, span),
                        dict(NS=cnt, BLOCK_M=bm, R_PAD=r_pad, BLOCK_K=cfg["BLOCK_K"], ATOMIC=splits > 1, HAS_RANKS=has_r,
                             FP32_DOT=fp32_dot, num_warps=cfg.get("SHRINK_WARPS", cfg["num_warps"]),
                             num_stages=cfg["num_stages"])))
        widths = [B.shape[1] for B in b]
        bp, nn, cc = _pad4(b), _pad4(widths, 0), _pad4(cols[base:base + cnt], 0)
        bs, br = _pad4([B.stride(0) for B in b], 0), _pad4([B.stride(2) for B in b], 0)
        layout, vec = b_access(b, y, cols[base:base + cnt])
        expands.append((_seg_expand_kernel, (S, triton.cdiv(triton.cdiv(max(widths), bn), tiles), cnt),
                        (h, y, meta.sorted_tokens, meta.seg_info, T, bp[0], bp[1], bp[2], bp[3], scalings, rk, R, S,
                         nn[0], nn[1], nn[2], nn[3], cc[0], cc[1], cc[2], cc[3], bs[0], bs[1], bs[2], bs[3],
                         br[0], br[1], br[2], br[3], B0.stride(1),
                         h.stride(0), h.stride(1), h.stride(2), y.stride(0), y.stride(1), srn, srs, base, tiles),
                        dict(BLOCK_M=bm, BLOCK_N=bn, R_PAD=r_pad, HAS_RANKS=has_r,
                             # fp32 activations (16-bit storage too): products from the fp32 h
                             FP32_DOT=_fp32_dot(B0.dtype) or y.dtype == torch.float32,
                             B_LAYOUT=layout, VEC=vec, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])))
    return h, shrinks + expands


def segment(y: torch.Tensor, x: torch.Tensor, a_list: Sequence[torch.Tensor], b_list: Sequence[torch.Tensor],
            scalings: torch.Tensor, ranks: Optional[torch.Tensor], meta: LoRABatchMeta) -> None:
    """add_lora through the segment plan (y updated in place)."""
    a_list = same_strides(a_list, (0, 1, 2))
    b_list = same_strides(b_list, (1,))
    _, launches = segment_launches(y, x, a_list, b_list, scalings, ranks, meta)
    for kernel, grid, args, kwargs in launches:
        kernel[grid](*args, **kwargs)


def fused_reread_bytes(T: int, K: int, R: int, S: int, n: int, esize: int, chunks: int) -> int:
    """Upper bound of the bytes of A the fused plan reads for a call (each of at most min(T, S)
    adapters' A, per slice, once per column chunk): what the route compares with
    SEGMENT_MIN_BYTES. Host arithmetic only (no look at the data)."""
    return min(T, S) * chunks * n * R * K * esize


def decode_plan(x: torch.Tensor, y: torch.Tensor, a_list: Sequence[torch.Tensor], meta: LoRABatchMeta,
                route) -> str:
    """"fused" or "segment" for a decode-like call: ``route["DECODE"]`` unless "auto" (then the
    segment plan when :func:`fused_reread_bytes` exceeds ``route["SEGMENT_MIN_BYTES"]``);
    ``OPENLORA_TRITON_DECODE=fused|segment`` overrides both (A/B timing on a GPU). Host
    arithmetic on shapes only."""
    forced = os.environ.get("OPENLORA_TRITON_DECODE", "").strip().lower()
    choice = forced if forced in ("fused", "segment") else str(route.get("DECODE", "fused"))
    if choice != "auto":
        return "segment" if choice == "segment" else "fused"
    T, K = x.shape
    S, R, _ = a_list[0].shape
    n = len(a_list)
    cfg = kernel_config("fused", block_m=meta.block_m, K=K, N=y.shape[1], R=R, n_slices=n, dtype=x.dtype,
                        device=x.device)
    chunks = cfg["N_CHUNKS"]
    if chunks <= 0:
        _, sms = device_facts(x.device)
        chunks = triton.cdiv(4 * sms, max(1, meta.num_tiles) * min(n, MAX_SLICES_PER_LAUNCH))
    chunks = max(1, min(chunks, triton.cdiv(y.shape[1], cfg["BLOCK_N"])))
    big = fused_reread_bytes(T, K, R, S, n, x.element_size(), chunks) > int(route.get("SEGMENT_MIN_BYTES", 8 << 20))
    return "segment" if big else "fused"
