"""backend="torch": pure-PyTorch multi-LoRA shrink / expand, on any device.

This is the CPU path and the readable statement of what the kernels compute:

    h[i, t, :r]   = x[t] @ A_i[s, :r].T                     (s = slot of row t, r = rank of s)
    y[t, cols_i] += scalings[s] * h[i, t, :r] @ B_i[s, :, :r].T

Arithmetic is done in float32 whatever the input dtype; entries of A/B beyond a slot's rank are
ignored (like the kernels), rows with slot -1 are left bit-for-bit untouched.

Two strategies, both vectorised over rows (never a Python loop over tokens):
  gather   gathers each row's A/B (chunks of rows, bounded memory) and uses bmm. Needs no host
           synchronisation, so it is the GPU choice (CUDA graphs, torch.compile).
  segment  loops over the slots that have rows (read from the metadata on the host, free on
           the CPU) and does one GEMM pair per slot: optimal work for long segments (prefill).
"""
from __future__ import annotations

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


def _use_segments(meta: LoRABatchMeta, R: int, K: int, N: int) -> bool:
    if meta.device.type != "cpu":
        return False  # host sync on a GPU: keep the sync-free path
    # Gathering costs T*R*(K+N) element copies; per-slot GEMMs cost a few ops per active slot.
    return meta.num_tokens * R * (K + N) > (1 << 20)


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


# ---------------------------------------------------------------------------- backend entry


def shrink(x: torch.Tensor, a_list: Sequence[torch.Tensor], ranks: Optional[torch.Tensor], meta: LoRABatchMeta) -> torch.Tensor:
    S, R, K = a_list[0].shape
    if _use_segments(meta, R, K, 0):
        return _shrink_segment(x, a_list, ranks, meta)
    return _shrink_gather(x, a_list, ranks, meta)


def expand(y, h, b_list, scalings, ranks, meta: LoRABatchMeta) -> None:
    N = sum(B.shape[1] for B in b_list)
    if _use_segments(meta, h.shape[2], 0, N):
        _expand_segment(y, h, b_list, scalings, ranks, meta)
    else:
        _expand_gather(y, h, b_list, scalings, ranks, meta)


def add_lora(y, x, a_list, b_list, scalings, ranks, meta: LoRABatchMeta) -> None:
    S, R, K = a_list[0].shape
    N = y.shape[1]
    if _use_segments(meta, R, K, N):
        _expand_segment(y, _shrink_segment(x, a_list, ranks, meta), b_list, scalings, ranks, meta)
    else:
        _expand_gather(y, _shrink_gather(x, a_list, ranks, meta), b_list, scalings, ranks, meta)
