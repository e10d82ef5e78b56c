"""The gradients of the LoRA ops, built from the forward kernels and one weight-gradient product.

For ``y[t, cols_i] += scale_s * (x[t] @ A_i[s, :r].T) @ B_i[s, :, :r].T`` (s = slot of row t,
r = its rank for slice i), with dY_i = dy[:, cols_i]:

    G_i[t, :r] = dY_i[t] @ B_i[s, :, :r]           a SHRINK of dY_i with A' = B_iᵀ   [S, r, N_i]
    dx[t]      = sum_i scale_s * G_i[t, :r] @ A_i[s, :r]
                                                    an EXPAND of G_i with B' = A_iᵀ  [S, K, r]
    H_i[t, :r] = x[t] @ A_i[s, :r].T               the forward's shrink (recomputed, not saved)
    dA_i[s]    = scale_s * sum_{t in s} G_i[t, :r]ᵀ x[t]       [r, K]   } segmented products:
    dB_i[s]    = scale_s * sum_{t in s} dY_i[t]ᵀ H_i[t, :r]    [N_i, r] } backend.weight_grads
    dscale_s   = sum_{t in s} sum_i G_i[t, :r] . H_i[t, :r]    (torch ops over token_slots)
    dy passes through unchanged (y is only added to).

With the pool's rank-major B (an [S, N, R] view of [S, R, N] storage) B_iᵀ is a contiguous
[S, R, N_i]: the layout the shrink kernels read best (another B layout is copied to it, on the
kernel backends); A_iᵀ is the rank-major [S, K, R] layout the expand kernels of the CPU and Triton
backends read best. Every kernel masks by the slot's rank and reads only rows of a segment
or tile, so gradients are exactly zero beyond a slot's rank, on slots no row uses, and from rows
with slot -1; NaN in the weights' padding beyond a rank is never read.

Multi-slice dx: the n products G_i A_i all land in the same columns, so the expand runs once,
writing slice i into columns [i K, (i + 1) K) of a [T, n K] buffer, which is then summed over
slices in float32 and rounded once to x's dtype. The buffer is float32 on the backends whose
expand takes a float32 y with 16-bit weights (torch, triton: one rounding in all); on cpu and
cuda it has x's dtype (each slice's product is rounded once, then the sum once more).

These functions run eagerly on real tensors: the custom ops of ``custom_ops.py`` call them (and
give torch.compile their shapes); api.lora_backward calls them directly in eager mode.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..metadata import LoRABatchMeta
from . import custom_ops
from . import torch_ref
from ..metadata import TENSOR_CORE_MIN_M
from .torch_ref import acc_dtype


def slice_ranks(ranks: Optional[torch.Tensor], i: int) -> Optional[torch.Tensor]:
    """The ranks argument of slice i alone: [S] as given, or row i of [n, S] as [1, S]."""
    if ranks is None or ranks.dim() == 1:
        return ranks
    return ranks[i:i + 1]


def _slot_ranks(ranks: Optional[torch.Tensor], i: int) -> Optional[torch.Tensor]:
    """[S] ranks of slice i (or None)."""
    if ranks is None:
        return None
    return ranks[i] if ranks.dim() == 2 else ranks


def b_grad_like(B: torch.Tensor) -> torch.Tensor:
    """A zero float32 (float64 for float64 B) tensor shaped like B [S, N, R], in B's layout:
    rank-major (an [S, N, R] view of [S, R, N] storage, the pool's) when B is, else contiguous.
    (The custom ops' fake implementations use the same rule: it reads only strides.)"""
    S, N, R = B.shape
    if B.stride(1) < B.stride(2):
        return B.new_zeros((S, R, N), dtype=acc_dtype(B.dtype)).transpose(1, 2)
    return B.new_zeros((S, N, R), dtype=acc_dtype(B.dtype))


def a_grad_like(A: torch.Tensor) -> torch.Tensor:
    """A zero float32 (float64 for float64 A) [S, R, K] tensor, contiguous."""
    return A.new_zeros(A.shape, dtype=acc_dtype(A.dtype))


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` unless a stride is 0 (an expanded gradient such as ones from ``.sum()``): then a
    contiguous copy, so every kernel sees ordinary strides."""
    return t.contiguous() if 0 in t.stride() and t.numel() > 1 else t


def _mod(backend: str):
    return custom_ops.backend_module(backend)


def grad_h(dy: torch.Tensor, b_list: Sequence[torch.Tensor], ranks, meta: LoRABatchMeta, backend: str,
           which: Optional[Sequence[int]] = None) -> torch.Tensor:
    """G [n, T, R] float32: G_i[t, :r] = dy[t, cols_i] @ B_i[s, :, :r], 0 elsewhere (unscaled), by
    the backend's shrink with A' = B_iᵀ (one launch per slice: each reads its own columns of dy).
    ``which``: the slices to compute (the others stay 0)."""
    T = dy.shape[0]
    S, _, R = b_list[0].shape
    g = torch.zeros((len(b_list), T, R), dtype=acc_dtype(dy.dtype), device=dy.device)
    col = 0
    for i, B in enumerate(b_list):
        n_i = B.shape[1]
        if which is None or i in which:
            custom_ops.run_shrink(dy[:, col:col + n_i], [_swapped_a(B, backend)], slice_ranks(ranks, i), meta,
                                  backend, out=g[i:i + 1])
        col += n_i
    return g


def _swapped_a(B: torch.Tensor, backend: str) -> torch.Tensor:
    """Bᵀ [S, R, N], the shrink's A' for dY B: a view, contiguous along N for the pool's rank-major B;
    for another layout a contiguous copy on the kernel backends, whose shrink reads A' along its
    last dimension (a strided A' costs the native CPU kernel its SIMD path and the Triton one
    vectorised loads, and spills registers)."""
    At = B.transpose(1, 2)
    if backend != "torch" and At.stride(2) != 1 and At.numel() > 0:
        At = At.contiguous()
    return At


def grad_x_from(g: torch.Tensor, a_list: Sequence[torch.Tensor], scalings: torch.Tensor, ranks,
                meta: LoRABatchMeta, backend: str, dtype: torch.dtype) -> torch.Tensor:
    """dx [T, K] (``dtype``): sum_i scale_s * g_i[t, :r] @ A_i[s, :r], by the backend's expand with
    B' = A_iᵀ (one launch for all slices; see the module docstring for the multi-slice sum)."""
    n, T = len(a_list), g.shape[1]
    K = a_list[0].shape[2]
    bt = [A.transpose(1, 2) for A in a_list]
    if n == 1:
        dx = g.new_zeros((T, K), dtype=dtype)
        custom_ops.run_expand(dx, g, bt, scalings, ranks, meta, backend)
        return dx
    fp32 = getattr(_mod(backend), "EXPAND_FP32_Y", False)
    parts = g.new_zeros((T, n * K), dtype=acc_dtype(dtype) if fp32 else dtype)
    custom_ops.run_expand(parts, g, bt, scalings, ranks, meta, backend)
    return parts.view(T, n, K).sum(1, dtype=acc_dtype(dtype)).to(dtype)


def weight_grads(p_list, q_list, scalings, ranks, meta, backend: str, rank_on_p: bool, out_list,
                 slices: Sequence[int]) -> None:
    """The backend's segmented products (see torch_ref.weight_grads) for the given slices."""
    _mod(backend).weight_grads(p_list, q_list, scalings, [_slot_ranks(ranks, i) for i in slices], meta,
                               rank_on_p, out_list)


def grad_scalings(g: torch.Tensor, h: torch.Tensor, ranks, meta: LoRABatchMeta) -> torch.Tensor:
    """[S] float32: d/dscale_s = sum over the rows t of slot s and the slices i of g_i[t, :r] . h_i[t, :r]."""
    S, (n, T, R) = meta.num_slots, g.shape
    prod = g * h.to(g.dtype)
    slots = meta.token_slots.to(torch.int64)
    valid = (slots >= 0) & (slots < S)
    safe = torch.where(valid, slots, 0)
    if ranks is not None:     # h (lora_expand's argument) may hold anything beyond a rank
        rk = ranks.to(torch.int64).clamp(0, R)
        rk = rk.expand(n, S) if rk.dim() == 1 else rk
        r_row = rk.index_select(1, safe)                                   # [n, T]
        prod = torch.where(torch.arange(R, device=g.device) < r_row[:, :, None], prod, 0.0)
    v = torch.where(valid, prod.sum((0, 2)), 0.0)
    return torch.zeros(S, dtype=g.dtype, device=g.device).index_add_(0, safe, v)


def _row_scale(scalings: torch.Tensor, meta: LoRABatchMeta) -> torch.Tensor:
    """[T]: each row's scaling, 0 for rows without a slot."""
    S = meta.num_slots
    slots = meta.token_slots.to(torch.int64)
    valid = (slots >= 0) & (slots < S)
    if S == 0:
        return torch.zeros(slots.shape, dtype=scalings.dtype, device=slots.device)
    return torch.where(valid, scalings.index_select(0, torch.where(valid, slots, 0)), 0.0)


def _degenerate(T: int, S: int, R: int, K: int, N: int) -> bool:
    return T == 0 or S == 0 or R == 0 or K == 0 or N == 0


# ------------------------------------------------------------------------------------ ops


def add_lora_backward(dy, x, a_list, b_list, scalings, ranks, meta: LoRABatchMeta, backend: str,
                      need_x: bool, need_a: Sequence[bool], need_b: Sequence[bool], need_scal: bool):
    """(dx or None, [dA_i or None], [dB_i or None], dscal or None) of add_lora; dA / dB float32
    (dB in B_i's layout), dx in x's dtype."""
    n, T = len(a_list), x.shape[0]
    S, R, K = a_list[0].shape
    N = dy.shape[1]
    wa = [i for i in range(n) if need_a[i]]
    wb = [i for i in range(n) if need_b[i]]
    dx = x.new_zeros((T, K)) if need_x else None
    dA: List[Optional[torch.Tensor]] = [a_grad_like(a_list[i]) if need_a[i] else None for i in range(n)]
    dB: List[Optional[torch.Tensor]] = [b_grad_like(b_list[i]) if need_b[i] else None for i in range(n)]
    dscal = scalings.new_zeros((S,)) if need_scal else None
    if _degenerate(T, S, R, K, N) or not (need_x or wa or wb or need_scal):
        return dx, dA, dB, dscal
    dy = _dense(dy)
    # CPU batches the torch strategies serve with the padded layout (backend torch, and the cpu
    # backend's prefill-like batches): the whole backward in one pass of batched GEMMs.
    if (not need_scal and backend in ("torch", "cpu") and (backend == "torch" or meta.block_m >= TENSOR_CORE_MIN_M)
            and x.dtype != torch.float64 and torch_ref.padded_backward_applies(meta, R, K, N)):
        dx = torch_ref.add_lora_backward_padded(dy, x, a_list, b_list, scalings, ranks, meta, need_x, wa, wb, dA, dB)
        return dx, dA, dB, dscal
    g = None
    if need_x or need_scal or wa:
        g = grad_h(dy, b_list, ranks, meta, backend, None if (need_x or need_scal) else wa)
    h = custom_ops.run_shrink(x, list(a_list), ranks, meta, backend) if (wb or need_scal) else None
    if need_x:
        dx = grad_x_from(g, a_list, scalings, ranks, meta, backend, x.dtype)
    if wa:
        weight_grads([g[i] for i in wa], [x] * len(wa), scalings, ranks, meta, backend, True, [dA[i] for i in wa], wa)
    if wb:
        cols = [0]
        for B in b_list:
            cols.append(cols[-1] + B.shape[1])
        weight_grads([dy[:, cols[i]:cols[i + 1]] for i in wb], [h[i] for i in wb], scalings, ranks, meta, backend,
                     False, [dB[i] for i in wb], wb)
    if need_scal:
        dscal = grad_scalings(g, h, ranks, meta).to(scalings.dtype)
    return dx, dA, dB, dscal


def shrink_backward(dh, x, a_list, ranks, meta: LoRABatchMeta, backend: str, need_x: bool, need_a: Sequence[bool]):
    """(dx or None, [dA_i or None]) of lora_shrink (h = x Aᵀ per slice, unscaled), from dh [n, T, R]."""
    n, T = len(a_list), x.shape[0]
    S, R, K = a_list[0].shape
    wa = [i for i in range(n) if need_a[i]]
    dx = x.new_zeros((T, K)) if need_x else None
    dA = [a_grad_like(a_list[i]) if need_a[i] else None for i in range(n)]
    if _degenerate(T, S, R, K, 1) or not (need_x or wa):
        return dx, dA
    dh = _dense(dh)
    ones = torch.ones(S, dtype=acc_dtype(x.dtype), device=x.device)
    if need_x:
        dx = grad_x_from(dh, a_list, ones, ranks, meta, backend, x.dtype)
    if wa:
        weight_grads([dh[i] for i in wa], [x] * len(wa), ones, ranks, meta, backend, True, [dA[i] for i in wa], wa)
    return dx, dA


def expand_backward(dy, h, b_list, scalings, ranks, meta: LoRABatchMeta, backend: str, need_h: bool,
                    need_b: Sequence[bool], need_scal: bool):
    """(dh or None, [dB_i or None], dscal or None) of lora_expand; dh in h's dtype."""
    n, T, R = h.shape
    S = b_list[0].shape[0]
    N = dy.shape[1]
    wb = [i for i in range(n) if need_b[i]]
    dh = h.new_zeros(h.shape) if need_h else None
    dB = [b_grad_like(b_list[i]) if need_b[i] else None for i in range(n)]
    dscal = scalings.new_zeros((S,)) if need_scal else None
    if _degenerate(T, S, R, 1, N) or not (need_h or wb or need_scal):
        return dh, dB, dscal
    dy = _dense(dy)
    if need_h or need_scal:
        g = grad_h(dy, b_list, ranks, meta, backend)
        if need_h:
            dh = (g * _row_scale(scalings, meta)[None, :, None]).to(h.dtype)
        if need_scal:
            dscal = grad_scalings(g, h, ranks, meta).to(scalings.dtype)
    if wb:
        cols = [0]
        for B in b_list:
            cols.append(cols[-1] + B.shape[1])
        weight_grads([dy[:, cols[i]:cols[i + 1]] for i in wb], [h[i] for i in wb], scalings, ranks, meta, backend,
                     False, [dB[i] for i in wb], wb)
    return dh, dB, dscal
