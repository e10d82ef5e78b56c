"""backend="torch": pure-PyTorch multi-LoRA shrink / expand, on any device.

This is the CPU path and the readable statement of what the kernels compute:

    h[i, t, :r]   = x[t] @ A_i[s, :r].T                     (s = slot of row t, r = rank of s)
    y[t, cols_i] += scalings[s] * h[i, t, :r] @ B_i[s, :, :r].T

Arithmetic is done in float32 whatever the input dtype; entries of A/B beyond a slot's rank are
ignored (like the kernels), rows with slot -1 are left bit-for-bit untouched.

Three strategies, all vectorised over rows (never a Python loop over tokens):
  gather   gathers each row's A/B (chunks of rows, bounded memory) and uses bmm. Needs no host
           synchronisation, so it is the GPU choice (CUDA graphs, torch.compile).
  segment  loops over the slots that have rows (read from the metadata on the host, free on
           the CPU) and does one GEMM pair per slot: optimal work for long segments (prefill).
  padded   (CPU) the rows of each active slot gathered into a [U, L, K] block (U active slots,
           L = longest segment, short segments padded with a repeated row whose result is
           dropped), then two batched GEMMs against the active slots' A and B: about ten torch
           ops per call whatever the number of adapters, which is what decode-sized batches on
           a CPU need (a tiny op costs as much as a small GEMM there). The row layout is
           memoised on the batch metadata, so every layer of a forward reuses it.
The CPU choice between padded and segment is a cost model (``_cpu_strategy``) over the sizes.
Padding columns of A/B beyond a slot's rank are multiplied by zero in the padded strategy, and
0 * NaN is NaN: a non-finite result makes it redo the call with the segment strategy (which
slices to the rank), so whatever sits in the padding stays ignored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..metadata import LoRABatchMeta

# Elements of gathered weights held at once by the gather strategy.
_GATHER_BUDGET = 1 << 22


def _slice_ranks(ranks: Optional[torch.Tensor], i: int) -> Optional[torch.Tensor]:
    if ranks is None:
        return None
    return ranks[i] if ranks.dim() == 2 else ranks


def _rank_mask(ranks_i: Optional[torch.Tensor], slots: torch.Tensor, R: int) -> Optional[torch.Tensor]:
    """[t, R] bool: column j < rank of the row's slot (slots already clamped to be valid)."""
    if ranks_i is None:
        return None
    r = ranks_i.to(torch.int64).clamp(0, R).index_select(0, slots)
    return torch.arange(R, device=slots.device)[None, :] < r[:, None]


def _chunk_rows(T: int, R: int, width: int) -> int:
    return max(1, _GATHER_BUDGET // max(1, R * width))


# ------------------------------------------------------------------------------------ gather


def _shrink_gather(x, a_list, ranks, meta) -> torch.Tensor:
    n, T = len(a_list), x.shape[0]
    S, R, K = a_list[0].shape
    h = torch.zeros((n, T, R), dtype=torch.float32, device=x.device)
    slots_all = meta.token_slots.to(torch.int64)
    step = _chunk_rows(T, R, K)
    for t0 in range(0, T, step):
        slots = slots_all[t0:t0 + step]
        valid = slots >= 0
        safe = slots.clamp(min=0)
        xc = x[t0:t0 + step].to(torch.float32)
        for i, A in enumerate(a_list):
            Ag = A.index_select(0, safe).to(torch.float32)                       # [t, R, K]
            hc = torch.bmm(Ag, xc.unsqueeze(2)).squeeze(2)                       # [t, R]
            keep = valid[:, None]
            m = _rank_mask(_slice_ranks(ranks, i), safe, R)
            if m is not None:
                keep = keep & m
            h[i, t0:t0 + step] = torch.where(keep, hc, 0.0)
    return h


def _expand_gather(y, h, b_list, scalings, ranks, meta) -> None:
    T = y.shape[0]
    R = h.shape[2]
    slots_all = meta.token_slots.to(torch.int64)
    widths = [B.shape[1] for B in b_list]
    step = _chunk_rows(T, R, max(widths))
    for t0 in range(0, T, step):
        slots = slots_all[t0:t0 + step]
        valid = slots >= 0
        safe = slots.clamp(min=0)
        scale = scalings.index_select(0, safe).to(torch.float32)[:, None]
        off = 0
        for i, B in enumerate(b_list):
            Bg = B.index_select(0, safe).to(torch.float32)                       # [t, N_i, R]
            m = _rank_mask(_slice_ranks(ranks, i), safe, R)
            hc = h[i, t0:t0 + step].to(torch.float32)
            if m is not None:
                hc = torch.where(m, hc, 0.0)
                Bg = torch.where(m[:, None, :], Bg, 0.0)
            delta = torch.bmm(Bg, hc.unsqueeze(2)).squeeze(2) * scale            # [t, N_i]
            ys = y[t0:t0 + step, off:off + widths[i]]
            new = (ys.to(torch.float32) + delta).to(y.dtype)
            ys.copy_(torch.where(valid[:, None], new, ys))
            off += widths[i]


# ----------------------------------------------------------------------------------- segment


def _active_segments(meta: LoRABatchMeta):
    starts, lens = meta.seg_info.tolist()
    for s, (st, ln) in enumerate(zip(starts, lens)):
        if ln > 0:
            yield s, meta.sorted_tokens[st:st + ln].to(torch.int64)


def _ranks_host(ranks, n: int, S: int, R: int) -> List[List[int]]:
    if ranks is None:
        return [[R] * S for _ in range(n)]
    r = ranks.to(torch.int64).clamp(0, R)
    if r.dim() == 1:
        r = r.expand(n, S)
    return r.tolist()


def _shrink_segment(x, a_list, ranks, meta) -> torch.Tensor:
    n, T = len(a_list), x.shape[0]
    S, R, K = a_list[0].shape
    h = torch.zeros((n, T, R), dtype=torch.float32, device=x.device)
    rk = _ranks_host(ranks, n, S, R)
    for s, rows in _active_segments(meta):
        xs = x.index_select(0, rows).to(torch.float32)
        for i, A in enumerate(a_list):
            r = rk[i][s]
            if r:
                h[i, rows, :r] = xs @ A[s, :r].to(torch.float32).T
    return h


def _expand_segment(y, h, b_list, scalings, ranks, meta) -> None:
    n, R = len(b_list), h.shape[2]
    S = b_list[0].shape[0]
    rk = _ranks_host(ranks, n, S, R)
    scal = scalings.tolist()
    for s, rows in _active_segments(meta):
        off = 0
        for i, B in enumerate(b_list):
            Ni, r = B.shape[1], rk[i][s]
            if r:
                d = (h[i].index_select(0, rows)[:, :r] @ B[s, :, :r].to(torch.float32).T) * scal[s]
                cur = y[rows, off:off + Ni]
                y[rows, off:off + Ni] = (cur.to(torch.float32) + d).to(y.dtype)
            off += Ni


# ------------------------------------------------------------------------------------ padded

# Cost of one small torch op on the CPU, in multiply-adds of a large GEMM (~20 us on 2 cores).
_CPU_OP_COST = 1 << 19


@dataclass(frozen=True)
class _PaddedRows:
    """Rows of the batch laid out as [U, L] by slot (memoised per batch metadata)."""
    slots: Optional[torch.Tensor]  # [U] active slots, or None when every slot is active (U == S)
    index: torch.Tensor            # [U*L] row of x for each padded position
    keep: Optional[torch.Tensor]   # [U*L] positions that are real rows, None when there is no padding
    rows: torch.Tensor             # [n_valid] the real rows, in padded order
    inverse: Optional[torch.Tensor]  # [T] padded position of each row when rows is a permutation of all T
    U: int
    L: int


def _padded_rows(meta: LoRABatchMeta) -> Optional[_PaddedRows]:
    def build():
        start, length = meta.seg_info.tolist()
        active = [s for s, n in enumerate(length) if n > 0]
        if not active:
            return None
        S, T = meta.num_slots, meta.num_tokens
        U, L = len(active), max(length)
        act = torch.tensor(active, dtype=torch.int64)
        st = torch.tensor(start, dtype=torch.int64)[act]
        ln = torch.tensor(length, dtype=torch.int64)[act]
        pos = torch.arange(L).unsqueeze(0)
        real = (pos < ln.unsqueeze(1)).reshape(-1)
        src = torch.minimum(st.unsqueeze(1) + pos, (st + ln - 1).unsqueeze(1))   # pad: repeat the last row
        index = meta.sorted_tokens.to(torch.int64)[src.reshape(-1)]
        padded = U * L != int(ln.sum())
        keep = real.nonzero().squeeze(1) if padded else None
        rows = index[keep] if padded else index
        inverse = None
        if rows.numel() == T:
            inverse = torch.empty(T, dtype=torch.int64)
            inverse[rows] = torch.arange(T)
            if keep is not None:
                inverse = keep[inverse]
        return _PaddedRows(None if U == S else act, index, keep, rows, inverse, U, L)
    return meta.memo("torch_ref.padded_rows", build)


def _cpu_strategy(meta: LoRABatchMeta, R: int, K: int, N: int) -> str:
    """'padded' unless padding short segments to the longest one wastes more than the per-slot
    op cost of the segment strategy (e.g. one long prefill segment next to one-token ones)."""
    pr = _padded_rows(meta)
    if pr is None:
        return "segment"
    work = R * (K + N)
    padded = pr.U * pr.L * work + (0 if pr.slots is None else pr.U * work)
    segment = pr.U * _CPU_OP_COST + meta.num_tokens * work
    return "padded" if padded <= segment else "segment"


def _active(W: torch.Tensor, pr: _PaddedRows) -> torch.Tensor:
    return W if pr.slots is None else W.index_select(0, pr.slots)


def _slot_coeffs(scalings, ranks_i: Optional[torch.Tensor], R: int, pr: _PaddedRows) -> torch.Tensor:
    """[U, 1, R] (or [U, 1, 1]) float32: each active slot's scaling below its rank, 0 beyond."""
    c = _active(scalings.to(torch.float32), pr).view(-1, 1)
    if ranks_i is not None:
        c = torch.where(torch.arange(R).unsqueeze(0) < _active(ranks_i, pr).view(-1, 1), c, 0.0)
    return c.unsqueeze(1)


def _padded_shrink_slice(x32, A, pr: _PaddedRows) -> torch.Tensor:
    """[U, L, R] float32 x @ A[slot].T on the padded rows (padding columns not yet masked)."""
    xp = x32.index_select(0, pr.index).view(pr.U, pr.L, -1)
    return torch.bmm(xp, _active(A, pr).to(torch.float32).transpose(1, 2))


def _padded_scatter(y, cols: slice, out: torch.Tensor, pr: _PaddedRows) -> None:
    """y[rows, cols] += the real rows of out ([U*L, N_i] float32); other rows untouched."""
    ys = y[:, cols]
    if ys.dtype == torch.float32 and pr.inverse is not None:
        ys.add_(out.index_select(0, pr.inverse))
        return
    d = out if pr.keep is None else out.index_select(0, pr.keep)
    if ys.dtype == torch.float32:
        ys.index_add_(0, pr.rows, d)
    else:
        ys.index_copy_(0, pr.rows, (ys.index_select(0, pr.rows).to(torch.float32) + d).to(ys.dtype))


def _padded_expand_slices(y, hp_list, b_list, scalings, ranks, pr: _PaddedRows) -> bool:
    """y += scale * hp @ B over the slices; hp_list[i] is a fresh [U, L, R] (scaled in place).
    With ranks, returns False, writing nothing, if a result is not finite: NaN/inf in the
    padding beyond a rank met the zeros of the rank mask. Without ranks there is no padding."""
    R = hp_list[0].shape[2]
    outs = []
    for i, (hp, B) in enumerate(zip(hp_list, b_list)):
        hp.mul_(_slot_coeffs(scalings, _slice_ranks(ranks, i), R, pr))
        out = torch.bmm(hp, _active(B, pr).to(torch.float32).transpose(1, 2)).view(pr.U * pr.L, -1)
        if ranks is not None and not math.isfinite(float(out.sum())):
            return False
        outs.append(out)
    off = 0
    for out, B in zip(outs, b_list):
        _padded_scatter(y, slice(off, off + B.shape[1]), out, pr)
        off += B.shape[1]
    return True


def _shrink_padded(x, a_list, ranks, meta) -> torch.Tensor:
    pr = _padded_rows(meta)
    S, R, K = a_list[0].shape
    h = torch.zeros((len(a_list), x.shape[0], R), dtype=torch.float32)
    x32 = x.to(torch.float32)
    slots = (pr.slots if pr.slots is not None else torch.arange(S)).repeat_interleave(pr.L)
    if pr.keep is not None:
        slots = slots.index_select(0, pr.keep)
    for i, A in enumerate(a_list):
        hp = _padded_shrink_slice(x32, A, pr).view(pr.U * pr.L, R)
        if pr.keep is not None:
            hp = hp.index_select(0, pr.keep)
        m = _rank_mask(_slice_ranks(ranks, i), slots, R)
        h[i].index_copy_(0, pr.rows, hp if m is None else torch.where(m, hp, 0.0))
    return h


def _expand_padded(y, h, b_list, scalings, ranks, meta) -> bool:
    pr = _padded_rows(meta)
    hp = [h[i].index_select(0, pr.index).to(torch.float32).view(pr.U, pr.L, -1) for i in range(len(b_list))]
    return _padded_expand_slices(y, hp, b_list, scalings, ranks, pr)


def _add_padded(y, x, a_list, b_list, scalings, ranks, meta) -> bool:
    pr = _padded_rows(meta)
    x32 = x.to(torch.float32)
    hp = [_padded_shrink_slice(x32, A, pr) for A in a_list]
    return _padded_expand_slices(y, hp, b_list, scalings, ranks, pr)


# ---------------------------------------------------------------------------- backend entry


def _strategy(meta: LoRABatchMeta, R: int, K: int, N: int) -> str:
    if meta.device.type != "cpu":
        return "gather"  # host sync on a GPU: keep the sync-free path
    if meta.num_tokens == 0:
        return "segment"
    return _cpu_strategy(meta, R, K, N)


def shrink(x: torch.Tensor, a_list: Sequence[torch.Tensor], ranks: Optional[torch.Tensor], meta: LoRABatchMeta) -> torch.Tensor:
    S, R, K = a_list[0].shape
    how = _strategy(meta, R, K, 0)
    if how == "padded":
        return _shrink_padded(x, a_list, ranks, meta)
    if how == "segment":
        return _shrink_segment(x, a_list, ranks, meta)
    return _shrink_gather(x, a_list, ranks, meta)


def expand(y, h, b_list, scalings, ranks, meta: LoRABatchMeta) -> None:
    N = sum(B.shape[1] for B in b_list)
    how = _strategy(meta, h.shape[2], 0, N)
    if how == "padded" and _expand_padded(y, h, b_list, scalings, ranks, meta):
        return
    if how == "gather":
        _expand_gather(y, h, b_list, scalings, ranks, meta)
    else:
        _expand_segment(y, h, b_list, scalings, ranks, meta)


def add_lora(y, x, a_list, b_list, scalings, ranks, meta: LoRABatchMeta) -> None:
    S, R, K = a_list[0].shape
    how = _strategy(meta, R, K, y.shape[1])
    if how == "padded" and _add_padded(y, x, a_list, b_list, scalings, ranks, meta):
        return
    if how == "gather":
        _expand_gather(y, _shrink_gather(x, a_list, ranks, meta), b_list, scalings, ranks, meta)
    else:
        _expand_segment(y, _shrink_segment(x, a_list, ranks, meta), b_list, scalings, ranks, meta)
