"""backend="triton": segmented-gather multi-LoRA kernels (shrink, expand, fused decode).

Design note
-----------
Rows are grouped by adapter slot by the batch metadata (``metadata.py``): ``tile_info`` lists
tiles of at most BLOCK_M rows of one slot, ``sorted_tokens`` maps a tile position back to a row of
x / y. Every kernel launches a fixed grid whose first axis is the tile list (G programs, the
unused ones exit at once), so the grid never depends on the data and a forward can be captured in a
CUDA graph. Rows with slot -1 belong to no tile: they cost nothing and are never touched.

* shrink  grid (G, cdiv(R, BLOCK_R), n_slices * SPLIT_K). Each program computes a
          [BLOCK_M, BLOCK_R] block of h = x @ A[slot].T over its share of K. A program whose rank
          chunk starts at or beyond the slot's rank exits: a slot of rank r costs r, not R.
          SPLIT_K > 1 splits K across programs that add into h with fp32 atomics.
* expand  grid (G, cdiv(max N_i, BLOCK_N), n_slices). Each program owns a [BLOCK_M, BLOCK_N]
          block of y (no atomics), loops over rank chunks up to the slot's rank, and adds
          scale * h @ B[slot].T into y.
* fused   grid (G, N_CHUNKS, n_slices): shrink over the full K into registers (h never leaves the
          chip), then expand over this program's share of the slice's output tiles. Rank lanes
          beyond the slot's rank are masked out of every load (the memory traffic, which is what
          bounds these kernels, is proportional to the rank); their arithmetic is not skipped.
          N_CHUNKS > 1 recomputes the small shrink once per chunk (A re-read from L2) to spread a
          decode batch over the SMs.

BLOCK_M < 16 (decode-like batches) uses CUDA-core dot products (broadcast-multiply + sum), so a
one-token segment does not waste a 16-row tensor-core tile (with BLOCK_M == 1 the K loop keeps
per-lane partial sums and reduces once at the end); BLOCK_M >= 16 uses tl.dot. All
arithmetic accumulates in fp32. Multi-slice outputs (fused QKV, gate_up) run in one launch for up
to MAX_SLICES_PER_LAUNCH slices, each with its own A/B tensors selected by program id (plain
pointer arguments: no device pointer tables, which Triton's interpreter cannot read).

Index safety, whatever the metadata holds (docs/kernels.md): slots are re-checked against S
in-kernel (outside [0, S): the tile is skipped); a tile's start and end are clamped to [0, T] and
it covers at most BLOCK_M positions; row ids outside [0, T) are masked out of every load and
store (x, h, y); ranks are clamped to [0, R]; every load and store is masked; row and slot
offsets are computed in int64.

* wgrad   grid (S * SPLIT_T, cdiv(P, BLOCK_P), cdiv(Q, BLOCK_Q)): the backward's weight
          gradients, out[s] = scale_s * sum over the rows t of slot s of P[t]ᵀ Q[t] (dA: P = dY B,
          Q = x; dB: P = dY, Q = H), below the slot's rank on the rank dimension. A program owns
          one [BLOCK_P, BLOCK_Q] block of one slot's gradient and walks its share of that slot's
          segment (seg_info + sorted_tokens) BLOCK_T rows at a time: tl.dot of a [BLOCK_P, BLOCK_T]
          by a [BLOCK_T, BLOCK_Q] tile into fp32 registers. The slot's rows are the reduction axis:
          SPLIT_T > 1 splits a long segment over programs that add into the (zero-filled, fp32)
          output with fp32 atomics, so a prefill batch of one adapter still fills the GPU; with
          SPLIT_T = 1 the result is stored (deterministic). Blocks past the rank, empty segments and
          unused slots exit at once (their gradient stays 0). The fp32 operand (dY B or H) is
          rounded to the 16-bit input dtype for the tensor cores, as the forward's tensor-core paths
          round h; float32 inputs use input_precision="ieee".

* fp8 storage (ops/fp8.py): weights in float8_e4m3fn with one fp32 scale per rank row (a_scale
          [S, R], b_scale [S, R] per slice, any strides; the packed form's slot-stride-0 views
          are addressed like A's rows: base + slot * stride_s + (roff + j) * stride_r). W_SCALED
          (constexpr; off: the code of the unscaled compilations is unchanged) makes the kernels
          load the R-sized scale vectors (masked to the rank) and apply them to the rank-sized
          intermediate: the shrink multiplies its h by a_scale, the expand its h tile by b_scale
          (in fp32) before the product, the fused kernel folds a_scale * b_scale * scaling into h
          once. fp8 tiles are upcast where loaded: to the activations' dtype for the 16-bit
          tensor-core dot (exact: every e4m3 value is an fp16 and a bf16 value), to fp32
          everywhere else; h is rounded to the activations' dtype for a 16-bit dot, never to fp8.
          add_lora with scales takes the fused kernel or shrink + expand, never the segment plan.
          No 16-byte vector loads of fp8 B (b_access needs B and y of one element size).
* mixed 16-bit storage (bf16 activations, fp16 weights): FP32_DOT (both operands to fp32), with
          the fp32 configurations (_cfg_dtype; the 16-bit ones spill with fp32 dots), no 16-byte
          vectors in the tensor-core expand, never the segment plan (its kernels and configs are
          the activations' dtype's).

Interpreter (TRITON_INTERPRET=1): its bf16 tl.dot is wrong, so bf16 dots are upcast to fp32 there.
"""
from __future__ import annotations

import threading
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..metadata import TENSOR_CORE_MIN_M, LoRABatchMeta
from .backends import triton_interpreter_enabled
from .configs import device_facts, kernel_config, next_pow2
from .fp8 import WeightScales
from .launch_args import rank_strides, same_strides, slice_columns, slice_groups
from .torch_ref import new_h

# expand() takes a float32 y with 16-bit weights (ops/backward.py sums multi-slice dx in float32)
EXPAND_FP32_Y = True
# Weights stored in another dtype than the activations (adapter_dtype): (activation, weight) pairs
# the kernels run. They load each weight tile in its storage dtype and take it to fp32 before the
# product (FP32_DOT, chosen by the activations' dtype: fp32 dots, input_precision="ieee"), so
# add_lora and lora_shrink accumulate in fp32 from exact weights; a lone lora_expand with a float32
# y and 16-bit B keeps the backward's rule above (its tensor-core path rounds h to B's dtype).
# fp8 (e4m3) weights come with their scales (ops/fp8.py; ``scales=``) for any activation dtype;
# bf16 activations with fp16 weights take fp32 dots.
MIXED_STORAGE = frozenset({(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                           (torch.bfloat16, torch.float16),
                           *((act, torch.float8_e4m3fn) for act in (torch.float16, torch.bfloat16, torch.float32))})

MAX_SLICES_PER_LAUNCH = 4
# Per-slice ints are selected by program id (_pick); Triton turns an int argument equal to 1
# into a constant, and a branch merging a constant with a runtime int does not compile, so
# these are never specialised.
_PER_SLICE_INTS = [f"{p}{i}" for p in ("n", "c", "bs", "br") for i in range(MAX_SLICES_PER_LAUNCH)]
# T (the batch's row count, a bound of the index checks) changes every batch: not specialised,
# so it never adds a compiled variant (T == 1, T % 16 == 0).
_NO_SPECIALIZE = ["T", *_PER_SLICE_INTS]


# ------------------------------------------------------------------------------ jit helpers


@triton.jit
def _pick(sid, v0, v1, v2, v3):
    """Select the argument of slice ``sid`` (pointers or ints) among four."""
    if sid == 0:
        v = v0
    elif sid == 1:
        v = v1
    elif sid == 2:
        v = v2
    else:
        v = v3
    return v


@triton.jit
def _tile(tile_ptr, G, pid, T):
    """(slot, start, end) of tile ``pid`` from tile_info [3, G] int32, the sorted positions
    clamped to 0 <= start <= end <= T (whatever the metadata holds)."""
    slot = tl.load(tile_ptr + pid)
    start = tl.load(tile_ptr + G + pid)
    end = tl.load(tile_ptr + 2 * G + pid)
    start = tl.minimum(tl.maximum(start, 0), T)
    end = tl.minimum(tl.maximum(end, start), T)
    return slot, start, end


@triton.jit
def _tile_rows(sorted_ptr, start, end, T, BLOCK_M: tl.constexpr):
    """(rows int64, mask) of the tile's first BLOCK_M sorted positions: a position at or past
    ``end`` or a row id outside [0, T) is masked out of every load and store (its row reads 0)."""
    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    rows = tl.load(sorted_ptr + offs_m, mask=m_mask, other=0)
    m_mask = m_mask & (rows >= 0) & (rows < T)
    return tl.where(m_mask, rows, 0).to(tl.int64), m_mask


@triton.jit
def _rank(ranks_ptr, gsid, slot, stride_rn, stride_rs, R, HAS_RANKS: tl.constexpr):
    """Rank of ``slot`` for global slice ``gsid``, clamped to [0, R] (R when no ranks given)."""
    if HAS_RANKS:
        r = tl.load(ranks_ptr + gsid * stride_rn + slot * stride_rs).to(tl.int32)
        r = tl.minimum(tl.maximum(r, 0), R)
    else:
        r = R
    return r


@triton.jit
def _packed_rows(offs_ptr, slot, rows, rank, HAS_OFFS: tl.constexpr):
    """(rank, first row) of ``slot`` in the packed form (ops/packed.py): the offset loaded from
    ``offs_ptr`` (an integer tensor, not a pointer table) clamped to [0, rows], the rank to what
    is left of the buffer; (rank, 0) otherwise."""
    if HAS_OFFS:
        o = tl.load(offs_ptr + slot).to(tl.int64)
        o = tl.minimum(tl.maximum(o, 0), rows)
        rank = tl.minimum(rank, (rows - o).to(tl.int32))
    else:
        o = slot.to(tl.int64) * 0
    return rank, o


@triton.jit
def _mac_rowvec(a, b, part):
    """part[K, N] += a[0, K][:, None] * b[K, N]: one row's products, reduced over K after the loop
    (a GEMV keeps per-lane partial sums instead of a cross-thread reduction per K block)."""
    return part + tl.trans(a.to(tl.float32)) * b.to(tl.float32)


@triton.jit
def _mac(a, b, acc, USE_DOT: tl.constexpr, FP32_DOT: tl.constexpr):
    """acc[M, N] += a[M, K] @ b[K, N] in fp32 (a 16-bit dot takes b in a's dtype: an fp8 weight
    tile is upcast exactly; a no-op for b of a's dtype)."""
    if USE_DOT:
        if FP32_DOT:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b.to(a.dtype), acc)
    else:
        acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    return acc


@triton.jit
def _rank_scales(s_ptr, slot64, roff, offs_r, r_mask, stride_ss, stride_sr):
    """[len(offs_r)] fp32 scales of one slot's rank rows (fp8 storage, ops/fp8.py): scale[slot,
    roff + j] at ``s_ptr + slot * stride_ss + (roff + j) * stride_sr`` (int64), 0 outside ``r_mask``."""
    return tl.load(s_ptr + slot64 * stride_ss + (roff + offs_r.to(tl.int64)) * stride_sr, mask=r_mask, other=0.0)


@triton.jit
def _mult(v, VEC: tl.constexpr):
    """``v`` (an int the host proved a multiple of VEC) in a form the compiler can see is one:
    tl.multiple_of does not reach a value selected per slice (_pick) or a non-specialised
    argument, a multiply by the constant does."""
    return (v // VEC) * VEC


@triton.jit
def _load_b(b_ptr, offs_r, offs_n, rank, n_i, stride_br, stride_bn, B_LAYOUT: tl.constexpr, VEC: tl.constexpr):
    """[len(offs_r), len(offs_n)] tile of one slot's B_i (b_ptr at the slot): B[n, r] at (r, n), 0 at
    or beyond the rank and past n_i (never read there, except up to the next multiple of VEC in
    the rank when VEC > 1: within the slot's R entries, and zeroed).

    B_LAYOUT 1: rank-contiguous rows (the standard [S, N, R], stride over r = 1); 2: column-
    contiguous (the pool's [S, N, R] view of [S, R, N] storage, stride over n = 1); 0: any
    strides. VEC > 1: the host proved that every access of VEC elements along the contiguous
    axis is 16-byte aligned (base, slot, row strides; n_i, and for layout 1 R, multiples of VEC),
    so the loads can be 16-byte vectors: told to the compiler by writing those ints as multiples
    of VEC (_mult), so that the masks compare against values it knows to be multiples of VEC."""
    r_mask = offs_r < rank
    if B_LAYOUT == 1:
        if VEC > 1:
            rank_v = tl.cdiv(rank, VEC) * VEC
            bt = tl.load(b_ptr + offs_r[:, None] + offs_n[None, :] * _mult(stride_bn, VEC),
                         mask=(offs_r < rank_v)[:, None] & (offs_n < n_i)[None, :], other=0.0)
            bt = tl.where(r_mask[:, None], bt, 0.0)
        else:
            bt = tl.load(b_ptr + offs_r[:, None] + offs_n[None, :] * stride_bn,
                         mask=r_mask[:, None] & (offs_n < n_i)[None, :], other=0.0)
    elif B_LAYOUT == 2:
        if VEC > 1:
            bt = tl.load(b_ptr + offs_r[:, None] * _mult(stride_br, VEC) + offs_n[None, :],
                         mask=r_mask[:, None] & (offs_n < _mult(n_i, VEC))[None, :], other=0.0)
        else:
            bt = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :],
                         mask=r_mask[:, None] & (offs_n < n_i)[None, :], other=0.0)
    else:
        bt = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                     mask=r_mask[:, None] & (offs_n < n_i)[None, :], other=0.0)
    return bt


@triton.jit
def _y_ptrs(y_ptr, rows, col0, offs_n, n_i, stride_yt, stride_yn, VEC: tl.constexpr):
    """(pointers, column mask) of y[rows, col0 + offs_n]; VEC > 1: y's rows and the slice's first
    column and width are multiples of VEC with a unit column stride (16-byte vectors)."""
    if VEC > 1:
        cols = _mult(col0, VEC) + offs_n
        return (y_ptr + rows[:, None] * _mult(stride_yt, VEC) + cols[None, :].to(tl.int64),
                offs_n < _mult(n_i, VEC))
    cols = col0 + offs_n
    return y_ptr + rows[:, None] * stride_yt + cols[None, :].to(tl.int64) * stride_yn, offs_n < n_i


@triton.jit
def _shrink_rows(x_ptr, a_ptr, rows, m_mask, offs_r, r_mask, k_lo, k_hi,
                 stride_xt, stride_xk, stride_ar, stride_ak,
                 BLOCK_M: tl.constexpr, WIDTH_R: tl.constexpr, BLOCK_K: tl.constexpr,
                 USE_DOT: tl.constexpr, FP32_DOT: tl.constexpr):
    """[BLOCK_M, WIDTH_R] fp32: x[rows, k_lo:k_hi] @ A[offs_r, k_lo:k_hi].T (a_ptr at the slot),
    masked to the valid rows and rank lanes."""
    acc = tl.zeros((BLOCK_M, WIDTH_R), dtype=tl.float32)
    part = tl.zeros((BLOCK_K, WIDTH_R), dtype=tl.float32)          # used when BLOCK_M == 1
    offs_k0 = tl.arange(0, BLOCK_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + offs_k0
        k_mask = offs_k < k_hi
        xt = tl.load(x_ptr + rows[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)               # [BM, BK]
        at = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                     mask=r_mask[None, :] & k_mask[:, None], other=0.0)               # [BK, WIDTH_R]
        if BLOCK_M == 1:
            part = _mac_rowvec(xt, at, part)
        else:
            acc = _mac(xt, at, acc, USE_DOT, FP32_DOT)
    if BLOCK_M == 1:
        acc = tl.sum(part, axis=0)[None, :]
    return acc


# ----------------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["T"])
def _sgmv_shrink_kernel(
    x_ptr,                              # [T, K] fp16/bf16/fp32
    a0_ptr, a1_ptr, a2_ptr, a3_ptr,     # [S, R, K] per slice, x's dtype (or a storage dtype), strides shared
    h_ptr,                              # [n_slices, T, R] fp32, zero-filled by the launcher
    ranks_ptr,                          # [n_slices, S] int32/int64 via (stride_rn, stride_rs)
    sorted_ptr,                         # [T] int32: rows sorted by slot
    tile_ptr,                           # [3, G] int32: (slot, start, end) per tile
    offs_ptr, rows_p,                   # packed form: [S] first row of each slot, rows of the buffers
    sa0_ptr, sa1_ptr, sa2_ptr, sa3_ptr,  # W_SCALED: [S, R] fp32 a_scale per slice (any strides, shared)
    G, T, K, R, S,
    stride_xt, stride_xk,
    stride_as, stride_ar, stride_ak,
    stride_hn, stride_ht, stride_hr,
    stride_rn, stride_rs,
    stride_sas, stride_sar,             # a_scale's slot and rank strides (packed: 0 and the vector's)
    slice_base,                         # global index of this launch's slice 0
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, HAS_RANKS: tl.constexpr, USE_DOT: tl.constexpr, FP32_DOT: tl.constexpr,
    HAS_OFFS: tl.constexpr, W_SCALED: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_z = tl.program_id(2)
    sid = pid_z // SPLIT_K
    kid = pid_z % SPLIT_K
    slot, start, end = _tile(tile_ptr, G, pid_t, T)
    if (slot < 0) | (slot >= S) | (start >= end):
        return
    gsid = slice_base + sid
    rank = _rank(ranks_ptr, gsid, slot, stride_rn, stride_rs, R, HAS_RANKS)
    rank, roff = _packed_rows(offs_ptr, slot, rows_p, rank, HAS_OFFS)
    r0 = pid_r * BLOCK_R
    if r0 >= rank:
        return
    k_span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = kid * k_span
    k_hi = tl.minimum(K, k_lo + k_span)

    rows, m_mask = _tile_rows(sorted_ptr, start, end, T, BLOCK_M)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    a_ptr = _pick(sid, a0_ptr, a1_ptr, a2_ptr, a3_ptr) + slot.to(tl.int64) * stride_as + roff * stride_ar
    acc = _shrink_rows(x_ptr, a_ptr, rows, m_mask, offs_r, r_mask, k_lo, k_hi,
                       stride_xt, stride_xk, stride_ar, stride_ak,
                       BLOCK_M, BLOCK_R, BLOCK_K, USE_DOT, FP32_DOT)
    if W_SCALED:        # h_j *= a_scale_j (each K split its share: the sum is scaled the same)
        acc = acc * _rank_scales(_pick(sid, sa0_ptr, sa1_ptr, sa2_ptr, sa3_ptr), slot.to(tl.int64), roff, offs_r,
                                 r_mask, stride_sas, stride_sar)[None, :]

    h_ptrs = h_ptr + gsid.to(tl.int64) * stride_hn + rows[:, None] * stride_ht + offs_r[None, :] * stride_hr
    mask = m_mask[:, None] & r_mask[None, :]
    if SPLIT_K == 1:
        tl.store(h_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(h_ptrs, acc, mask=mask)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _sgmv_expand_kernel(
    h_ptr,                              # [n_slices, T, R] fp32/fp16/bf16
    b0_ptr, b1_ptr, b2_ptr, b3_ptr,     # [S, N_i, R] per slice, y's dtype (or a storage dtype)
    y_ptr,                              # [T, N] updated in place, N = sum N_i
    scal_ptr,                           # [S] fp32
    ranks_ptr, sorted_ptr, tile_ptr,    # as in the shrink kernel
    offs_ptr, rows_p,
    sb0_ptr, sb1_ptr, sb2_ptr, sb3_ptr,  # W_SCALED: [S, R] fp32 b_scale per slice (any strides, shared)
    G, T, R, S,
    n0, n1, n2, n3,                     # N_i of each slice
    c0, c1, c2, c3,                     # first column of each slice in y
    bs0, bs1, bs2, bs3,                 # slot stride of each B_i
    br0, br1, br2, br3,                 # rank stride of each B_i (the pool's rank-major B: N_i)
    stride_bn,                          # shared by all B_i
    stride_hn, stride_ht, stride_hr,
    stride_yt, stride_yn,
    stride_rn, stride_rs,
    stride_sbs, stride_sbr,             # b_scale's slot and rank strides
    slice_base,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_RANKS: tl.constexpr, USE_DOT: tl.constexpr, FP32_DOT: tl.constexpr,
    B_LAYOUT: tl.constexpr, VEC: tl.constexpr, HAS_OFFS: tl.constexpr, W_SCALED: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    sid = tl.program_id(2)
    slot, start, end = _tile(tile_ptr, G, pid_t, T)
    if (slot < 0) | (slot >= S) | (start >= end):
        return
    gsid = slice_base + sid
    rank = _rank(ranks_ptr, gsid, slot, stride_rn, stride_rs, R, HAS_RANKS)
    rank, roff = _packed_rows(offs_ptr, slot, rows_p, rank, HAS_OFFS)
    n_i = _pick(sid, n0, n1, n2, n3)
    n_lo = pid_n * BLOCK_N
    if (rank == 0) | (n_lo >= n_i):
        return

    rows, m_mask = _tile_rows(sorted_ptr, start, end, T, BLOCK_M)
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_i
    stride_br = _pick(sid, br0, br1, br2, br3)
    b_ptr = (_pick(sid, b0_ptr, b1_ptr, b2_ptr, b3_ptr) + slot.to(tl.int64) * _mult(_pick(sid, bs0, bs1, bs2, bs3), VEC)
             + _mult(roff * stride_br, VEC))   # (VEC > 1 only where the rank stride is a multiple of it)
    h_base = h_ptr + gsid.to(tl.int64) * stride_hn + rows[:, None] * stride_ht
    sb_ptr = _pick(sid, sb0_ptr, sb1_ptr, sb2_ptr, sb3_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        ht = tl.load(h_base + offs_r[None, :] * stride_hr,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)              # [BM, BR]
        bt = _load_b(b_ptr, offs_r, offs_n, rank, n_i, stride_br, stride_bn, B_LAYOUT, VEC)   # [BR, BN]
        if W_SCALED:    # h_j * b_scale_j in fp32; a 16-bit dot rounds it to y's dtype (and _mac takes B there)
            ht = ht.to(tl.float32) * _rank_scales(sb_ptr, slot.to(tl.int64), roff, offs_r, r_mask,
                                                  stride_sbs, stride_sbr)[None, :]
            if USE_DOT and not FP32_DOT:
                ht = ht.to(y_ptr.dtype.element_ty)
        elif USE_DOT and not FP32_DOT:
            ht = ht.to(bt.dtype)
        acc = _mac(ht, bt, acc, USE_DOT, FP32_DOT)

    scale = tl.load(scal_ptr + slot)
    y_ptrs, n_mask = _y_ptrs(y_ptr, rows, _pick(sid, c0, c1, c2, c3), offs_n, n_i, stride_yt, stride_yn, VEC)
    mask = m_mask[:, None] & n_mask[None, :]
    yv = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (yv.to(tl.float32) + acc * scale).to(yv.dtype), mask=mask)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _sgmv_fused_kernel(
    # what changes from call to call comes first (a bound plan passes these five, then the rest)
    x_ptr,                              # [T, K]
    y_ptr,                              # [T, N] updated in place
    sorted_ptr, tile_ptr,
    T,
    a0_ptr, a1_ptr, a2_ptr, a3_ptr,     # [S, R, K] per slice
    b0_ptr, b1_ptr, b2_ptr, b3_ptr,     # [S, N_i, R] per slice
    scal_ptr,                           # [S] fp32
    ranks_ptr,
    offs_ptr, rows_p,                   # packed form (see the shrink kernel)
    sa0_ptr, sa1_ptr, sa2_ptr, sa3_ptr,  # W_SCALED: [S, R] fp32 a_scale per slice (strides shared)
    sb0_ptr, sb1_ptr, sb2_ptr, sb3_ptr,  # W_SCALED: [S, R] fp32 b_scale per slice (strides shared)
    G, K, R, S,
    n0, n1, n2, n3,
    c0, c1, c2, c3,
    bs0, bs1, bs2, bs3,
    br0, br1, br2, br3,
    stride_xt, stride_xk,
    stride_as, stride_ar, stride_ak,
    stride_bn,
    stride_yt, stride_yn,
    stride_rn, stride_rs,
    stride_sas, stride_sar, stride_sbs, stride_sbr,   # the scales' slot and rank strides
    slice_base,
    tiles_per_chunk,                    # output tiles of BLOCK_N handled by one program
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    HAS_RANKS: tl.constexpr, USE_DOT: tl.constexpr, FP32_DOT: tl.constexpr,
    B_LAYOUT: tl.constexpr, VEC: tl.constexpr, HAS_OFFS: tl.constexpr, W_SCALED: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    sid = tl.program_id(2)
    slot, start, end = _tile(tile_ptr, G, pid_t, T)
    if (slot < 0) | (slot >= S) | (start >= end):
        return
    gsid = slice_base + sid
    rank = _rank(ranks_ptr, gsid, slot, stride_rn, stride_rs, R, HAS_RANKS)
    rank, roff = _packed_rows(offs_ptr, slot, rows_p, rank, HAS_OFFS)
    n_i = _pick(sid, n0, n1, n2, n3)
    nt_lo = pid_c * tiles_per_chunk
    nt_hi = tl.minimum(nt_lo + tiles_per_chunk, tl.cdiv(n_i, BLOCK_N))
    if (rank == 0) | (nt_lo >= nt_hi):
        return

    rows, m_mask = _tile_rows(sorted_ptr, start, end, T, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < rank
    slot64 = slot.to(tl.int64)

    # Shrink: h = x[rows] @ A[slot, :rank].T, kept in registers.
    a_ptr = _pick(sid, a0_ptr, a1_ptr, a2_ptr, a3_ptr) + slot64 * stride_as + roff * stride_ar
    h = _shrink_rows(x_ptr, a_ptr, rows, m_mask, offs_r, r_mask, 0, K,
                     stride_xt, stride_xk, stride_ar, stride_ak,
                     BLOCK_M, R_PAD, BLOCK_K, USE_DOT, FP32_DOT)
    if W_SCALED:        # a_scale * b_scale * scaling folded into h once
        asc = _rank_scales(_pick(sid, sa0_ptr, sa1_ptr, sa2_ptr, sa3_ptr), slot64, roff, offs_r, r_mask,
                           stride_sas, stride_sar)
        bsc = _rank_scales(_pick(sid, sb0_ptr, sb1_ptr, sb2_ptr, sb3_ptr), slot64, roff, offs_r, r_mask,
                           stride_sbs, stride_sbr)
        h = h * (asc * bsc * tl.load(scal_ptr + slot))[None, :]
    else:
        h = h * tl.load(scal_ptr + slot)

    # Expand: y[rows, cols] += h @ B[slot, cols, :rank].T over this program's output tiles.
    stride_br = _pick(sid, br0, br1, br2, br3)
    b_ptr = (_pick(sid, b0_ptr, b1_ptr, b2_ptr, b3_ptr) + slot64 * _mult(_pick(sid, bs0, bs1, bs2, bs3), VEC)
             + _mult(roff * stride_br, VEC))   # (VEC > 1 only where the rank stride is a multiple of it)
    col0 = _pick(sid, c0, c1, c2, c3)
    if USE_DOT and not FP32_DOT:
        if W_SCALED:    # (h in the activations' dtype, never fp8: _mac takes the fp8 B tile there)
            hd = h.to(x_ptr.dtype.element_ty)
        else:
            hd = h.to(b_ptr.dtype.element_ty)
    else:
        hd = h
    for nt in range(nt_lo, nt_hi):
        offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
        bt = _load_b(b_ptr, offs_r, offs_n, rank, n_i, stride_br, stride_bn, B_LAYOUT, VEC)   # [R_PAD, BN]
        out = _mac(hd, bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), USE_DOT, FP32_DOT)
        y_ptrs, n_mask = _y_ptrs(y_ptr, rows, col0, offs_n, n_i, stride_yt, stride_yn, VEC)
        mask = m_mask[:, None] & n_mask[None, :]
        yv = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (yv.to(tl.float32) + out).to(yv.dtype), mask=mask)


@triton.jit(do_not_specialize=["T"])
def _sgmv_wgrad_kernel(
    p_ptr,                              # [T, P] (any float dtype, strides)
    q_ptr,                              # [T, Q]
    o_ptr,                              # [S, P, Q] fp32, zero-filled by the launcher's caller
    scal_ptr,                           # [S] fp32
    ranks_ptr,                          # [S] int32/int64 via stride_rs
    sorted_ptr,                         # [T] int32: rows sorted by slot
    seg_ptr,                            # [2, S] int32: (start, length) per slot
    T, S, P, Q, R,
    stride_pt, stride_pp, stride_qt, stride_qq,
    stride_os, stride_op, stride_oq,
    stride_rs,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, SPLIT_T: tl.constexpr,
    RANK_ON_P: tl.constexpr, HAS_RANKS: tl.constexpr, DOT_DTYPE: tl.constexpr, FP32_DOT: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_q = tl.program_id(2)
    slot = pid_s // SPLIT_T
    part = pid_s % SPLIT_T
    # this slot's segment of sorted_tokens, clipped to [0, T) (int64: no overflow of start + length)
    start = tl.load(seg_ptr + slot).to(tl.int64)
    length = tl.load(seg_ptr + S + slot).to(tl.int64)
    start = tl.minimum(tl.maximum(start, 0), T)
    end = tl.minimum(tl.maximum(start + length, start), T)
    rank = _rank(ranks_ptr, 0, slot, 0, stride_rs, R, HAS_RANKS)
    if RANK_ON_P:
        p_lim = rank
        q_lim = Q
    else:
        p_lim = P
        q_lim = rank
    p0 = pid_p * BLOCK_P
    q0 = pid_q * BLOCK_Q
    if (start >= end) | (p0 >= p_lim) | (q0 >= q_lim):
        return
    span = tl.cdiv(tl.cdiv(end - start, SPLIT_T), BLOCK_T) * BLOCK_T
    lo = start + part * span
    hi = tl.minimum(end, lo + span)
    if lo >= hi:
        return

    offs_p = p0 + tl.arange(0, BLOCK_P)
    p_mask = offs_p < p_lim
    offs_q = q0 + tl.arange(0, BLOCK_Q)
    q_mask = offs_q < q_lim
    p_cols = offs_p.to(tl.int64) * stride_pp
    q_cols = offs_q.to(tl.int64) * stride_qq
    offs_t0 = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        offs_t = t0 + offs_t0
        t_mask = offs_t < hi
        rows = tl.load(sorted_ptr + offs_t, mask=t_mask, other=0)
        t_mask = t_mask & (rows >= 0) & (rows < T)
        rows = tl.where(t_mask, rows, 0).to(tl.int64)
        pt = tl.load(p_ptr + rows[:, None] * stride_pt + p_cols[None, :],
                     mask=t_mask[:, None] & p_mask[None, :], other=0.0)                  # [BT, BP]
        qt = tl.load(q_ptr + rows[:, None] * stride_qt + q_cols[None, :],
                     mask=t_mask[:, None] & q_mask[None, :], other=0.0)                  # [BT, BQ]
        if FP32_DOT:
            acc = tl.dot(tl.trans(pt.to(tl.float32)), qt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(pt.to(DOT_DTYPE)), qt.to(DOT_DTYPE), acc)

    acc = acc * tl.load(scal_ptr + slot)
    o_ptrs = (o_ptr + slot.to(tl.int64) * stride_os + offs_p.to(tl.int64)[:, None] * stride_op
              + offs_q.to(tl.int64)[None, :] * stride_oq)
    mask = p_mask[:, None] & q_mask[None, :]
    if SPLIT_T == 1:
        tl.store(o_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(o_ptrs, acc, mask=mask)


# ---------------------------------------------------------------------------------- launchers


def _fp32_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and triton_interpreter_enabled())


_SIXTEEN = (torch.float16, torch.bfloat16)


def _mixed16(act: torch.dtype, w: torch.dtype) -> bool:
    """16-bit weights of the other 16-bit dtype than the activations (bf16 x, fp16 weights)."""
    return w != act and w in _SIXTEEN and act in _SIXTEEN


def _dot32(act: torch.dtype, w: torch.dtype) -> bool:
    """FP32_DOT of a shrink / fused launch: fp32 activations (bf16 under the interpreter), or a
    mixed 16-bit pair. fp8 weights take the activations' rule (their tiles are upcast to x's
    dtype for a 16-bit dot)."""
    return _fp32_dot(act) or _mixed16(act, w)


def _cfg_dtype(act: torch.dtype, w: torch.dtype) -> torch.dtype:
    """The dtype of a launch's configuration key: float32 for a mixed 16-bit pair (its dots are
    fp32: the fp32 tile sizes keep it free of spills), else the activations'."""
    return torch.float32 if _mixed16(act, w) else act


def _norm_scales(scales: Optional[WeightScales], packed) -> Optional[WeightScales]:
    """The scales as the kernels take them (one slot stride and one rank stride per side, float32):
    each side's tensors as given when they already share their strides, else copies (padded:
    contiguous [S, R]; packed: a contiguous copy of the [rows] vector behind each view, viewed
    again with slot stride 0, so the offsets still address it). None stays None."""
    if scales is None:
        return None
    return WeightScales(a=_norm_side(scales.a, packed), b=_norm_side(scales.b, packed))


def _norm_side(ts, packed):
    """One side of :func:`_norm_scales` (a tuple of per-slice tensors, or None)."""
    if ts is None:
        return None
    ts = tuple(ts)
    if all(t.dtype == torch.float32 for t in ts) and len({t.stride() for t in ts}) == 1:
        return ts
    out = []
    for t in ts:
        if packed is None:
            out.append(t.to(torch.float32).contiguous())
        else:
            vec = t.as_strided((packed.rows,), (t.stride(1),), t.storage_offset()).to(torch.float32).contiguous()
            out.append(vec.as_strided(tuple(t.shape), (0, 1)))
    return tuple(out)


def _scale_args(ts, base: int, cnt: int, like: torch.Tensor):
    """(4 pointer tensors, slot stride, rank stride, W_SCALED) of one side's scales for the launch
    of slices base .. base + cnt (``ts``: normalised per-slice tensors), or placeholders (never
    read) and zeros when the side has none."""
    if ts is None:
        return [like] * MAX_SLICES_PER_LAUNCH, 0, 0, False
    return _pad4(ts[base:base + cnt]), ts[0].stride(0), ts[0].stride(1), True


def _ranks_args(ranks: Optional[torch.Tensor], like: torch.Tensor):
    """(pointer tensor, stride over slices, stride over slots, HAS_RANKS)."""
    return (like if ranks is None else ranks, *rank_strides(ranks), ranks is not None)


def _offs_args(packed, like: torch.Tensor):
    """(offsets tensor, rows, HAS_OFFS) of the packed form (ops/packed.py), or placeholders."""
    if packed is None:
        return like, 0, False
    return packed.offsets, packed.rows, True


def _vec_packed(layout: int, vec: int, packed) -> int:
    """A packed slot starts at any row: rank-contiguous B (layout 1) is then not vector aligned."""
    return 1 if packed is not None and layout == 1 else vec


def _pad4(items: Sequence, fill=None) -> List:
    items = list(items)
    return items + [items[0] if fill is None else fill] * (MAX_SLICES_PER_LAUNCH - len(items))


def b_access(b_list: Sequence[torch.Tensor], y: torch.Tensor, cols: Sequence[int]):
    """(B_LAYOUT, VEC) of an expand / fused launch over ``b_list`` into ``y`` (see _load_b): the
    B layout all slices share (1 rank-contiguous, 2 column-contiguous, 0 other), and VEC = the
    elements of a 16-byte vector when the host can prove every vector access of B and y aligned
    (pointers, slot / row strides, slice widths and first columns, and for layout 1 the stacked
    rank, all multiples of it), else 1."""
    if all(B.stride(2) == 1 for B in b_list):
        layout = 1
    elif all(B.stride(1) == 1 for B in b_list):
        layout = 2
    else:
        return 0, 1
    esz = y.element_size()
    v = 16 // esz
    ok = (y.stride(1) == 1 and y.stride(0) % v == 0 and y.data_ptr() % 16 == 0
          and all(c % v == 0 for c in cols)
          and all(B.element_size() == esz and B.data_ptr() % 16 == 0 and B.stride(0) % v == 0
                  and B.shape[1] % v == 0 for B in b_list))
    if ok and layout == 1:
        ok = all(B.stride(1) % v == 0 and B.shape[2] % v == 0 for B in b_list)
    elif ok:
        ok = all(B.stride(2) % v == 0 for B in b_list)
    return layout, (v if ok else 1)


# The packed weight form (ops/packed.py): a per-slot row offset, loaded from an integer tensor.
SUPPORTS_PACKED = True


def shrink(x: torch.Tensor, a_list: Sequence[torch.Tensor], ranks: Optional[torch.Tensor],
           meta: LoRABatchMeta, out: Optional[torch.Tensor] = None, packed=None,
           scales: Optional[WeightScales] = None) -> torch.Tensor:
    """h = x A^T per slice ([n, T, R] fp32); ``scales.a`` (fp8 storage): h_j *= a_scale[slot, j]."""
    T, K = x.shape
    S, R, _ = a_list[0].shape
    n = len(a_list)
    h = new_h(out, n, T, R, x.device)
    if T == 0 or R == 0 or S == 0 or K == 0 or meta.num_tiles == 0:
        return h
    a_list = same_strides(a_list, (0, 1, 2))
    cfg = kernel_config("shrink", block_m=meta.block_m, K=K, N=0, R=R, n_slices=n,
                        dtype=_cfg_dtype(x.dtype, a_list[0].dtype), device=x.device)
    rk, srn, srs, has_r = _ranks_args(ranks, meta.token_slots)
    op, rows_p, has_o = _offs_args(packed, meta.token_slots)
    sa_list = _norm_side(scales.a, packed) if scales is not None else None
    A0 = a_list[0]
    for base, cnt in slice_groups(n, MAX_SLICES_PER_LAUNCH):
        a = _pad4(a_list[base:base + cnt])
        sa, ss, sr, scaled = _scale_args(sa_list, base, cnt, meta.token_slots)
        grid = (meta.num_tiles, triton.cdiv(R, cfg["BLOCK_R"]), cnt * cfg["SPLIT_K"])
        _sgmv_shrink_kernel[grid](
            x, a[0], a[1], a[2], a[3], h, rk, meta.sorted_tokens, meta.tile_info, op, rows_p,
            sa[0], sa[1], sa[2], sa[3],
            meta.num_tiles, T, K, R, S,
            x.stride(0), x.stride(1),
            A0.stride(0), A0.stride(1), A0.stride(2),
            h.stride(0), h.stride(1), h.stride(2),
            srn, srs, ss, sr, base,
            BLOCK_M=meta.block_m, BLOCK_R=cfg["BLOCK_R"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=cfg["SPLIT_K"],
            HAS_RANKS=has_r, USE_DOT=meta.block_m >= TENSOR_CORE_MIN_M, FP32_DOT=_dot32(x.dtype, A0.dtype),
            HAS_OFFS=has_o, W_SCALED=scaled, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return h


def expand(y: torch.Tensor, h: torch.Tensor, b_list: Sequence[torch.Tensor], scalings: torch.Tensor,
           ranks: Optional[torch.Tensor], meta: LoRABatchMeta, packed=None, fp32_h: bool = False,
           scales: Optional[WeightScales] = None) -> None:
    """y += scale * h B^T. ``fp32_h``: products in fp32 from the fp32 h even when B is 16-bit
    (add_lora's route for fp32 activations with 16-bit storage); otherwise a 16-bit B's
    tensor-core path rounds h to B's dtype (bf16 y with fp16 B: fp32 products). ``scales.b``
    (fp8 storage): h_j *= b_scale[slot, j] in fp32 first, the tensor-core path rounding the
    result to y's dtype (fp32 y: fp32 products)."""
    T, N = y.shape
    S, _, R = b_list[0].shape
    n = len(b_list)
    if T == 0 or R == 0 or N == 0 or S == 0 or meta.num_tiles == 0:
        return
    b_list = same_strides(b_list, (1,))
    cfg = kernel_config("expand", block_m=meta.block_m, K=0, N=N, R=R, n_slices=n,
                        dtype=_cfg_dtype(y.dtype, b_list[0].dtype), device=y.device)
    rk, srn, srs, has_r = _ranks_args(ranks, meta.token_slots)
    op, rows_p, has_o = _offs_args(packed, meta.token_slots)
    cols = slice_columns(b_list)
    B0 = b_list[0]
    sb_list = _norm_side(scales.b, packed) if scales is not None else None
    if sb_list is not None:
        fp32_dot = _fp32_dot(y.dtype) or (fp32_h and h.dtype == torch.float32)
    else:
        fp32_dot = _fp32_dot(B0.dtype) or (fp32_h and h.dtype == torch.float32) or _mixed16(y.dtype, B0.dtype)
    for base, cnt in slice_groups(n, MAX_SLICES_PER_LAUNCH):
        b = b_list[base:base + cnt]
        sb, ss, sr, scaled = _scale_args(sb_list, base, cnt, meta.token_slots)
        widths = [B.shape[1] for B in b]
        grid = (meta.num_tiles, triton.cdiv(max(widths), cfg["BLOCK_N"]), cnt)
        bp, nn, cc, bs = _pad4(b), _pad4(widths, 0), _pad4(cols[base:base + cnt], 0), _pad4([B.stride(0) for B in b], 0)
        br = _pad4([B.stride(2) for B in b], 0)
        layout, vec = b_access(b, y, cols[base:base + cnt])
        vec = _vec_packed(layout, vec, packed)
        if meta.block_m >= TENSOR_CORE_MIN_M and _mixed16(y.dtype, B0.dtype):
            vec = 1         # (fp32 dots of 16-bit tiles: sm_90 compiles them without 16-byte loads anyway)
        _sgmv_expand_kernel[grid](
            h, bp[0], bp[1], bp[2], bp[3], y, scalings, rk, meta.sorted_tokens, meta.tile_info, op, rows_p,
            sb[0], sb[1], sb[2], sb[3],
            meta.num_tiles, T, R, S,
            nn[0], nn[1], nn[2], nn[3], cc[0], cc[1], cc[2], cc[3], bs[0], bs[1], bs[2], bs[3],
            br[0], br[1], br[2], br[3],
            B0.stride(1),
            h.stride(0), h.stride(1), h.stride(2),
            y.stride(0), y.stride(1),
            srn, srs, ss, sr, base,
            BLOCK_M=meta.block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"],
            HAS_RANKS=has_r, USE_DOT=meta.block_m >= TENSOR_CORE_MIN_M, FP32_DOT=fp32_dot,
            B_LAYOUT=layout, VEC=vec, HAS_OFFS=has_o, W_SCALED=scaled,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )


def fused_launches(y: torch.Tensor, x: torch.Tensor, a_list: Sequence[torch.Tensor], b_list: Sequence[torch.Tensor],
                   scalings: torch.Tensor, ranks: Optional[torch.Tensor], meta: LoRABatchMeta,
                   packed=None, scales: Optional[WeightScales] = None) -> List[tuple]:
    """The launches of :func:`fused` as (kernel, grid, args, kwargs), one per group of up to 4
    slices (empty for a zero delta). a_list / b_list must already share their strides;
    ``scales`` (fp8 storage) needs both sides (normalised here, _norm_scales: as given when they
    already share their strides, so a bound plan's tail holds the caller's scale pointers)."""
    T, K = x.shape
    N = y.shape[1]
    S, R, _ = a_list[0].shape
    n = len(a_list)
    if T == 0 or R == 0 or N == 0 or S == 0 or K == 0 or meta.num_tiles == 0:
        return []
    cfg = kernel_config("fused", block_m=meta.block_m, K=K, N=N, R=R, n_slices=n,
                        dtype=_cfg_dtype(x.dtype, a_list[0].dtype), device=x.device)
    use_dot = meta.block_m >= TENSOR_CORE_MIN_M
    r_pad = max(next_pow2(R), 16) if use_dot else next_pow2(R)
    rk, srn, srs, has_r = _ranks_args(ranks, scalings)
    op, rows_p, has_o = _offs_args(packed, scalings)
    cols = slice_columns(b_list)
    A0, B0 = a_list[0], b_list[0]
    if scales is not None and (scales.a is None or scales.b is None):
        raise ValueError("scales: add_lora with fp8 weights needs both a and b scales")
    scales = _norm_scales(scales, packed)
    out = []
    for base, cnt in slice_groups(n, MAX_SLICES_PER_LAUNCH):
        a, b = a_list[base:base + cnt], b_list[base:base + cnt]
        sa, sas, sar, scaled = _scale_args(scales.a if scales is not None else None, base, cnt, scalings)
        sb, sbs, sbr, _ = _scale_args(scales.b if scales is not None else None, base, cnt, scalings)
        widths = [B.shape[1] for B in b]
        n_tiles = triton.cdiv(max(widths), cfg["BLOCK_N"])
        chunks = cfg["N_CHUNKS"]
        if chunks <= 0:  # spread the launch over ~4 programs per SM
            _, sms = device_facts(x.device)
            chunks = triton.cdiv(4 * sms, meta.num_tiles * cnt)
        chunks = max(1, min(chunks, n_tiles))
        per_chunk = triton.cdiv(n_tiles, chunks)
        chunks = triton.cdiv(n_tiles, per_chunk)
        ap, bp = _pad4(a), _pad4(b)
        nn, cc, bs = _pad4(widths, 0), _pad4(cols[base:base + cnt], 0), _pad4([B.stride(0) for B in b], 0)
        br = _pad4([B.stride(2) for B in b], 0)
        args = (x, y, meta.sorted_tokens, meta.tile_info, T,
                ap[0], ap[1], ap[2], ap[3], bp[0], bp[1], bp[2], bp[3], scalings, rk, op, rows_p,
                sa[0], sa[1], sa[2], sa[3], sb[0], sb[1], sb[2], sb[3],
                meta.num_tiles, K, R, S,
                nn[0], nn[1], nn[2], nn[3], cc[0], cc[1], cc[2], cc[3], bs[0], bs[1], bs[2], bs[3],
                br[0], br[1], br[2], br[3],
                x.stride(0), x.stride(1),
                A0.stride(0), A0.stride(1), A0.stride(2),
                B0.stride(1),
                y.stride(0), y.stride(1),
                srn, srs, sas, sar, sbs, sbr, base, per_chunk)
        layout, vec = b_access(b, y, cols[base:base + cnt])
        vec = _vec_packed(layout, vec, packed)
        kwargs = dict(BLOCK_M=meta.block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], R_PAD=r_pad,
                      HAS_RANKS=has_r, USE_DOT=use_dot, FP32_DOT=_dot32(x.dtype, A0.dtype), B_LAYOUT=layout,
                      VEC=vec, HAS_OFFS=has_o, W_SCALED=scaled, num_warps=cfg["num_warps"],
                      num_stages=cfg["num_stages"])
        out.append((_sgmv_fused_kernel, (meta.num_tiles, chunks, cnt), args, kwargs))
    return out


def fused(y: torch.Tensor, x: torch.Tensor, a_list: Sequence[torch.Tensor], b_list: Sequence[torch.Tensor],
          scalings: torch.Tensor, ranks: Optional[torch.Tensor], meta: LoRABatchMeta, packed=None,
          scales: Optional[WeightScales] = None) -> None:
    a_list = same_strides(a_list, (0, 1, 2))
    b_list = same_strides(b_list, (1,))
    for kernel, grid, args, kwargs in fused_launches(y, x, a_list, b_list, scalings, ranks, meta, packed, scales):
        kernel[grid](*args, **kwargs)


def add_lora(y, x, a_list, b_list, scalings, ranks, meta: LoRABatchMeta, packed=None,
             scales: Optional[WeightScales] = None) -> None:
    """y += scalings * (x A^T) B^T per slice; ``scales`` (fp8 storage, ops/fp8.py): the fused kernel
    or shrink + expand (the segment plan takes no scales)."""
    T, K = x.shape
    S, R, _ = a_list[0].shape
    if T == 0 or K == 0 or R == 0 or S == 0 or y.shape[1] == 0:
        return      # a zero delta: y is not written
    route = kernel_config("route", block_m=meta.block_m, K=K, N=y.shape[1], R=R, n_slices=len(a_list),
                          dtype=x.dtype, device=x.device)
    if route["FUSED"]:
        from .triton_segment import decode_plan, segment
        # (the packed form's per-slot row offsets, fp8 scales and mixed 16-bit pairs are the fused
        # and split kernels'; not the segment plan's)
        if (packed is None and scales is None and not _mixed16(x.dtype, a_list[0].dtype)
                and decode_plan(x, y, a_list, meta, route) == "segment"):
            segment(y, x, a_list, b_list, scalings, ranks, meta)
        else:
            fused(y, x, a_list, b_list, scalings, ranks, meta, packed, scales)
    else:
        scales = _norm_scales(scales, packed)
        expand(y, shrink(x, a_list, ranks, meta, packed=packed, scales=scales), b_list, scalings, ranks, meta,
               packed, fp32_h=x.dtype == torch.float32, scales=scales)


# ------------------------------------------------------------------------------- bound plans
#
# A patched layer calls add_lora with the same weights every forward; what does not change between
# its calls is bound once (BoundAdd, through BoundLoRA, rebuilt on every pool change): the weight
# pointers and strides, the slice layout, the configuration and, per launch-plan key, the grid,
# the compiled kernel's launcher and the whole argument list. A call then fills in x, y, the
# metadata's two pointers and T and calls Triton's launcher directly (CompiledKernel.run, the
# call JITFunction.run itself ends with), skipping the JIT's binder, specialisation and cache
# lookup and our own launch arithmetic.
#
# The plan key holds everything the compiled kernel was specialised on that a call can change:
# block_m and G (the metadata's tile count: the grid and an int argument), the strides of x and y
# (int arguments: Triton specialises on == 1 and % 16), and the 16-byte alignment of the four
# pointers a call passes (pointer arguments: specialised on % 16). So a plan is only used for
# calls that the JIT would have sent to the same compiled kernel with the same arguments
# (tests/test_bound_plans.py checks the arguments against the JIT's).
#
# The first call of a key takes the JIT path (compiling when needed) and records the plan. Calls
# that do not fit (the interpreter, a prefill-like batch, which runs shrink then expand, a current
# device other than the layer's, a launch hook registered with Triton's knobs, weights whose
# slices do not share strides) take the general path, unchanged.

_PLAN_DYNAMIC = ("x_ptr", "y_ptr", "sorted_ptr", "tile_ptr", "T")   # the fused kernel's first five parameters
_MAX_PLANS = 64


def _launch_hooks():
    """Triton's launch hook chains (a profiler adds to them); calls with a hook registered take the
    JIT path, which passes them their launch metadata."""
    try:
        from triton import knobs
        rt = knobs.runtime
        return rt.launch_enter_hook, rt.launch_exit_hook
    except (ImportError, AttributeError):        # pragma: no cover - older Triton
        return None, None


def _device_getters(drv):
    """(current device index, current raw stream of a device index): torch's C functions when
    this is torch's CUDA (what Triton's driver wraps), else the driver's (a stub's)."""
    cur, stream = drv.get_current_device, drv.get_current_stream
    import torch as _t
    if cur is getattr(_t.cuda, "current_device", None) and hasattr(_t._C, "_cuda_getDevice"):
        cur = _t._C._cuda_getDevice
    return cur, stream


def _launch_entry(compiled, grid, tail):
    """One launch of a bound plan: how to call the compiled kernel's launcher with the five
    per-call arguments followed by ``tail`` (every other parameter, constexprs included, in
    order). Direct to the launcher's C function when its Python wrapper adds nothing (no scratch
    memory, no tensor descriptors, no sanitizer): Triton 3.9's generic launcher and 3.6's
    per-signature one take different argument lists; else through the wrapper, as
    JITFunction.run calls it."""
    run = compiled.run
    fn, packed = compiled.function, compiled.packed_metadata
    direct = (getattr(run, "global_scratch_size", 1) == 0 and getattr(run, "profile_scratch_size", 1) == 0
              and not getattr(run, "gsan_enabled", False) and hasattr(run, "launch")
              and hasattr(run, "launch_cooperative_grid") and hasattr(run, "launch_pdl"))
    if direct and hasattr(run, "arg_annotations") and hasattr(run, "kernel_signature"):
        return (1, run.launch, *grid, fn, run.launch_cooperative_grid, run.launch_pdl, packed,
                run.arg_annotations, run.kernel_signature, tuple(tail))
    if direct and not hasattr(run, "arg_annotations"):
        return (2, run.launch, *grid, fn, run.launch_cooperative_grid, run.launch_pdl, packed, None, None, tuple(tail))
    return (0, run, *grid, fn, None, None, packed, None, None, tuple(tail))


_H_LOCAL = threading.local()


def _segment_h(stream, shape, device) -> torch.Tensor:
    """The segment plan's [n, T, R] fp32 h for a bound call: one buffer per thread, stream and
    shape, reused by that thread's later calls. Safe without a zero fill or a sync: with one K
    split every entry the expand reads is first written by the shrink before it on the same
    stream, and a buffer is only ever used by one thread on one stream, whose launches run in
    the order they were made (two threads sharing a stream each have their own buffer)."""
    cache = getattr(_H_LOCAL, "bufs", None)
    if cache is None:
        cache = _H_LOCAL.bufs = {}
    key = (stream, shape, device)
    h = cache.get(key)
    if h is None:
        if len(cache) >= _MAX_PLANS:
            cache.clear()
        h = cache[key] = torch.empty(shape, dtype=torch.float32, device=device)
    return h


def meta_launch_key(meta: LoRABatchMeta):
    """(plan key part, sorted_tokens pointer, tile_info pointer, T, seg_info pointer), once per metadata object
    (every layer of a forward passes the same one; its tensors are not resized in place). The key
    part: block_m, G, T, S, the device and the pointers' alignment."""
    k = meta.__dict__.get("_triton_key")
    if k is None:
        sp, tp, gp = meta.sorted_tokens.data_ptr(), meta.tile_info.data_ptr(), meta.seg_info.data_ptr()
        ts = meta.token_slots
        T = ts.shape[0]
        k = ((meta.block_m, meta.tile_info.shape[1], T, meta.num_slots, ts.get_device(), sp & 15, tp & 15, gp & 15),
             sp, tp, T, gp)
        object.__setattr__(meta, "_triton_key", k)
    return k


class BoundAdd:
    """``add_lora`` on the Triton backend for one layer's fixed weights (see "bound plans" above)."""

    __slots__ = ("_a", "_b", "_scal", "_ranks", "_plans", "_ok", "_dev_index", "_stream", "_current",
                 "_hooks", "plan_hits", "_packed", "_scales", "__weakref__")

    def __init__(self, a_list, b_list, scalings, ranks, packed=None, scales: Optional[WeightScales] = None):
        self._packed = packed
        self._scales = scales
        a2, b2 = same_strides(a_list, (0, 1, 2)), same_strides(b_list, (1,))
        s2 = _norm_scales(scales, packed)
        # strided copies would go stale when the pool writes a slot: such weights (or scales) take
        # the general path
        self._ok = (all(p is q for p, q in zip(a2, a_list)) and all(p is q for p, q in zip(b2, b_list))
                    and (scales is None or (s2.a is not None and s2.b is not None
                                            and all(p is q for p, q in zip(s2.a, scales.a))
                                            and all(p is q for p, q in zip(s2.b, scales.b))))
                    and not triton_interpreter_enabled())
        self._a, self._b, self._scal, self._ranks = list(a_list), list(b_list), scalings, ranks
        dev = a_list[0].device
        self._dev_index = dev.index if dev.type == "cuda" and dev.index is not None else 0
        self._plans = {}
        self._stream = self._current = None
        self._hooks = ((), ())      # the launch hook chains' lists of hooks (non-empty: the JIT path)
        self.plan_hits = 0

    def _general(self, y, x, meta) -> None:
        add_lora(y, x, self._a, self._b, self._scal, self._ranks, meta, self._packed, self._scales)

    def fast(self, y, x, meta: LoRABatchMeta) -> bool:
        """Launch through the plan of this call's key; False, having done nothing, when there is none
        (BoundLoRA then checks the call and calls this object, which records the plan). The key
        holds x's and y's shapes, strides, dtypes and devices (a plan exists only for keys whose
        call passed BoundLoRA's checks) and the alignment of the four pointers."""
        mk = meta.__dict__.get("_triton_key")
        if mk is None:
            return False
        mkey, sp, tp, T, gp = mk
        xp, yp = x.data_ptr(), y.data_ptr()
        plan = self._plans.get((mkey, x.shape, y.shape, x.stride(), y.stride(), x.dtype, y.dtype,
                                x.get_device(), y.get_device(), xp & 15, yp & 15))
        if plan is None or self._hooks[0] or self._hooks[1] or self._current() != self._dev_index:
            return False
        stream = self._stream(self._dev_index)
        h_shape, entries = plan
        if h_shape is None:                      # the fused kernel: (x, y, sorted_tokens, tile_info, T)
            dyn = ((xp, yp, sp, tp, T),)
        else:                                    # the segment plan: its shrink, then its expand
            hp = _segment_h(stream, h_shape, x.device).data_ptr()
            dyn = ((xp, hp, sp, gp, T), (hp, yp, sp, gp, T))
        for (kind, launch, g0, g1, g2, fn, coop, pdl, packed, ann, ksig, tail, which) in entries:
            d = dyn[which]
            if kind == 1:        # Triton 3.9's generic C launcher
                launch(g0, g1, g2, stream, fn, coop, pdl, packed, None, None, None, None, None, ann, ksig,
                       (*d, *tail))
            elif kind == 2:      # Triton 3.6's per-signature C launcher
                launch(g0, g1, g2, stream, fn, coop, pdl, None, None, packed, None, None, None, *d, *tail)
            else:                # the launcher's Python wrapper (CompiledKernel.run)
                launch(g0, g1, g2, stream, fn, packed, None, None, None, *d, *tail)
        self.plan_hits += 1
        return True

    def __call__(self, y, x, meta: LoRABatchMeta) -> None:
        """A checked call (BoundLoRA's general path): the plan's launch, else the general path,
        recording the plan."""
        mkey = meta_launch_key(meta)[0]
        if self.fast(y, x, meta):
            return
        xp, yp = x.data_ptr(), y.data_ptr()
        key = (mkey, x.shape, y.shape, x.stride(), y.stride(), x.dtype, y.dtype, x.get_device(), y.get_device(),
               xp & 15, yp & 15)
        self._first(key, y, x, meta)

    def _first(self, key, y, x, meta) -> None:
        """The general path; records the plan of ``key`` when it can serve later calls."""
        T, K = x.shape
        S, R, _ = self._a[0].shape
        if (not self._ok or meta.block_m >= TENSOR_CORE_MIN_M or key in self._plans or T == 0 or K == 0 or R == 0 or S == 0
                or y.shape[1] == 0):
            return self._general(y, x, meta)
        route = kernel_config("route", block_m=meta.block_m, K=K, N=y.shape[1], R=R, n_slices=len(self._a),
                              dtype=x.dtype, device=x.device)
        from . import triton_segment
        if not route["FUSED"]:
            return self._general(y, x, meta)
        seg = (self._packed is None and self._scales is None and not _mixed16(x.dtype, self._a[0].dtype)
               and triton_segment.decode_plan(x, y, self._a, meta, route) == "segment")
        from triton.runtime import driver
        self._current, self._stream = _device_getters(driver.active)
        enter, exit_ = _launch_hooks()
        if self._current() != self._dev_index or getattr(enter, "calls", 1) or getattr(exit_, "calls", 1):
            return self._general(y, x, meta)
        h_shape = None
        if seg:
            # the h of this call: the thread's buffer for this stream and shape (see _segment_h)
            h_shape = (len(self._a), T, R)
            h = _segment_h(self._stream(self._dev_index), h_shape, x.device)
            h0, launches = triton_segment.segment_launches(y, x, self._a, self._b, self._scal, self._ranks, meta, h=h)
            if h0 is not h:                 # (a K-split shrink adds into a zero-filled h: the general path)
                return self._general(y, x, meta)
            dyn_names = {triton_segment._seg_shrink_kernel: (triton_segment.SHRINK_DYNAMIC, 0),
                         triton_segment._seg_expand_kernel: (triton_segment.EXPAND_DYNAMIC, 1)}
        else:
            # (fp8: the scale tensors are in the launch arguments, so in the plan's tail as pointers)
            launches = fused_launches(y, x, self._a, self._b, self._scal, self._ranks, meta, self._packed,
                                      self._scales)
            dyn_names = {_sgmv_fused_kernel: (_PLAN_DYNAMIC, 0)}
        plan = []
        for kernel, grid, args, kwargs in launches:
            compiled = kernel[grid](*args, **kwargs)
            if plan is None or compiled is None or not hasattr(compiled, "packed_metadata"):
                plan = None              # (the interpreter, or a Triton without this interface)
                continue
            names = kernel.arg_names
            dyn, which = dyn_names[kernel]
            assert tuple(names[:len(dyn)]) == dyn
            full = list(args) + [kwargs[nm] for nm in names[len(args):]]
            tail = [v.data_ptr() if isinstance(v, torch.Tensor) else v for v in full[len(dyn):]]
            plan.append((*_launch_entry(compiled, grid, tail), which))
        if plan:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            self._plans[key] = (h_shape, tuple(plan))
            self._hooks = (getattr(enter, "calls", ()), getattr(exit_, "calls", ()))


def bind(a_list, b_list, scalings, ranks, packed=None, act_dtype=None,
         scales: Optional[WeightScales] = None) -> BoundAdd:
    """A callable ``(y, x, meta) -> None`` equal to ``add_lora(y, x, a_list, b_list, scalings, ranks, meta)``
    (what ``BoundLoRA`` calls on this backend; see "bound plans" above). ``act_dtype``: x's and
    y's dtype when the weights are stored in another (the launches take it from x and y);
    ``scales``: the fp8 weights' scales (ops/fp8.py), bound with them."""
    return BoundAdd(a_list, b_list, scalings, ranks, packed, scales)


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def weight_grads(p_list, q_list, scalings: torch.Tensor, ranks_list, meta: LoRABatchMeta, rank_on_p: bool,
                 out_list) -> None:
    """The LoRA backward's segmented weight-gradient products (see torch_ref.weight_grads for the
    contract): one launch per slice. out_list[i] must be float32 and zero-filled."""
    T, S = meta.num_tokens, meta.num_slots
    for P, Q, ranks, out in zip(p_list, q_list, ranks_list, out_list):
        Pw, Qw = P.shape[1], Q.shape[1]
        if T == 0 or S == 0 or Pw == 0 or Qw == 0:
            continue
        if out.dtype != torch.float32:
            raise TypeError(f"out: expected float32 (fp32 atomics), got {out.dtype}")
        R = Pw if rank_on_p else Qw
        cfg = kernel_config("wgrad", block_m=meta.block_m, K=Qw if rank_on_p else Pw, N=T, R=R, n_slices=S,
                            dtype=P.dtype if P.dtype != torch.float32 else Q.dtype, device=P.device)
        bp, bq = (cfg["BLOCK_R"], cfg["BLOCK_F"]) if rank_on_p else (cfg["BLOCK_F"], cfg["BLOCK_R"])
        grid_pq = triton.cdiv(Pw, bp) * triton.cdiv(Qw, bq)
        split = cfg["SPLIT_T"]
        if split <= 0:       # enough programs for ~2 per SM, each with >= 4 row blocks of the expected segment
            _, sms = device_facts(P.device)
            rows = T / max(1, min(S, T))
            split = max(1, min(triton.cdiv(2 * sms, max(1, min(S, T)) * grid_pq),
                               int(rows // (4 * cfg["BLOCK_T"])) or 1, 64))
        sixteen = [t.dtype for t in (P, Q) if t.dtype != torch.float32]
        dot_dtype = sixteen[0] if sixteen and all(d == sixteen[0] for d in sixteen) else torch.float32
        fp32_dot = _fp32_dot(dot_dtype)
        rk = meta.token_slots if ranks is None else ranks
        srs = 0 if ranks is None else ranks.stride(-1)
        _sgmv_wgrad_kernel[(S * split, triton.cdiv(Pw, bp), triton.cdiv(Qw, bq))](
            P, Q, out, scalings, rk, meta.sorted_tokens, meta.seg_info,
            T, S, Pw, Qw, R,
            P.stride(0), P.stride(1), Q.stride(0), Q.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            srs,
            BLOCK_T=cfg["BLOCK_T"], BLOCK_P=bp, BLOCK_Q=bq, SPLIT_T=split,
            RANK_ON_P=rank_on_p, HAS_RANKS=ranks is not None, DOT_DTYPE=_TL_DTYPES[dot_dtype], FP32_DOT=fp32_dot,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
