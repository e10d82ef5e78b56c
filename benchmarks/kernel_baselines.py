"""The contenders our kernels are measured against, written with torch's own ops (no openlora code).

Every function takes the same tensors as the openlora ops (x [T, K]; per-slice lists of A [S, R, K]
and B [S, N_i, R] with zeros beyond each slot's rank; y [T, N] updated in place; h [n, T, R]) plus
host-side facts a serving stack knows before the forward (which rows use which adapter, ranks,
scalings as Python floats), prepared once per batch by :func:`adapter_groups`.

loop        PEFT's mixed batch: for each adapter present, select its rows, run its two small
            matmuls in the model dtype, add the result back (index_add_). Launches grow with the
            number of distinct adapters. (Favoured here: the row-index tensors are built once per
            batch, outside the timed region; PEFT rebuilds them from Python lists in every layer.)
gather_bmm  gather every row's A and B ([T, R, K] and [T, N_i, R] copies) and run two batched
            matmuls: one launch per step, but it moves T copies of the weights and pays the padded
            rank R for every row. Its memory grows with T * R * (K + N): infeasible at prefill.
dense_one   one adapter for the whole batch, two dense matmuls (addmm into y): the one-LoRA floor
            a multi-adapter kernel would like to match.
reference   float32 per-adapter loop, the independent result every contender is checked against.

Rows without adapter (slot -1) are supported by ``loop`` and ``reference``; ``gather_bmm``
assumes every row has one (the benchmark workloads do).
"""
from __future__ import annotations

from typing import List, NamedTuple, Sequence

import torch


class AdapterGroup(NamedTuple):
    slot: int
    rows: torch.Tensor   # [m] int64 row ids on the device
    rank: int
    scale: float


def adapter_groups(indices: Sequence[int], ranks: Sequence[int], scalings: Sequence[float],
                   device: torch.device) -> List[AdapterGroup]:
    """Rows of each adapter present in the batch (host lists in, device row ids out)."""
    rows = {}
    S = len(ranks)
    for t, s in enumerate(int(i) for i in indices):
        if 0 <= s < S:
            rows.setdefault(s, []).append(t)
    return [AdapterGroup(s, torch.tensor(r, dtype=torch.int64, device=device), int(ranks[s]), float(scalings[s]))
            for s, r in sorted(rows.items())]


def _columns(b_list: Sequence[torch.Tensor], dim: int = 1):
    """(first, end) column in y of each slice; the width is B.shape[dim] (1 for [S, N_i, R])."""
    c = 0
    for B in b_list:
        yield c, c + B.shape[dim]
        c += B.shape[dim]


# -------------------------------------------------------------------------------------- loop


def loop_add_lora(y, x, a_list, b_list, groups: Sequence[AdapterGroup]) -> None:
    cols = list(_columns(b_list))
    for g in groups:
        if g.rank == 0:
            continue
        xs = x.index_select(0, g.rows)
        for A, B, (c0, c1) in zip(a_list, b_list, cols):
            d = (xs @ A[g.slot, :g.rank].T) @ B[g.slot, :, :g.rank].T
            y[:, c0:c1].index_add_(0, g.rows, d * g.scale)


def loop_shrink(x, a_list, groups: Sequence[AdapterGroup], R: int) -> torch.Tensor:
    h = torch.zeros((len(a_list), x.shape[0], R), dtype=torch.float32, device=x.device)
    for g in groups:
        if g.rank == 0:
            continue
        xs = x.index_select(0, g.rows)
        for i, A in enumerate(a_list):
            h[i, g.rows, :g.rank] = (xs @ A[g.slot, :g.rank].T).float()
    return h


def loop_expand(y, h, b_list, groups: Sequence[AdapterGroup]) -> None:
    cols = list(_columns(b_list))
    for g in groups:
        if g.rank == 0:
            continue
        for i, (B, (c0, c1)) in enumerate(zip(b_list, cols)):
            hs = h[i].index_select(0, g.rows)[:, :g.rank].to(B.dtype)
            y[:, c0:c1].index_add_(0, g.rows, (hs @ B[g.slot, :, :g.rank].T) * g.scale)


# -------------------------------------------------------------------------------- gather_bmm


def gather_shrink(x, a_list, slots: torch.Tensor) -> torch.Tensor:
    """slots: [T] int64, every row a valid slot."""
    return torch.stack([torch.bmm(A.index_select(0, slots), x.unsqueeze(2)).squeeze(2) for A in a_list]).float()


def gather_expand(y, h, b_list, slots: torch.Tensor, scalings: torch.Tensor) -> None:
    scale = scalings.index_select(0, slots).to(y.dtype)[:, None]
    for i, (B, (c0, c1)) in enumerate(zip(b_list, _columns(b_list))):
        d = torch.bmm(B.index_select(0, slots), h[i].to(B.dtype).unsqueeze(2)).squeeze(2)
        y[:, c0:c1] += d * scale


def gather_add_lora(y, x, a_list, b_list, slots: torch.Tensor, scalings: torch.Tensor) -> None:
    scale = scalings.index_select(0, slots).to(y.dtype)[:, None]
    xs = x.unsqueeze(2)
    for A, B, (c0, c1) in zip(a_list, b_list, _columns(b_list)):
        h = torch.bmm(A.index_select(0, slots), xs)                       # [T, R, 1]
        y[:, c0:c1] += torch.bmm(B.index_select(0, slots), h).squeeze(2) * scale


def gather_bytes(T: int, R: int, K: int, widths: Sequence[int], elem_bytes: int) -> int:
    """Peak bytes of gathered weights one gather_bmm step holds (the larger of A and B copies)."""
    return T * R * max(K, max(widths)) * elem_bytes


# --------------------------------------------------------------------------------- dense_one


def dense_add_lora(y, x, a_cat: torch.Tensor, b0_list, scale: float) -> None:
    """a_cat: [n * r, K] (the slices' A stacked); b0_list: n x [N_i, r]."""
    h = x @ a_cat.T
    r = b0_list[0].shape[1]
    for i, (B, (c0, c1)) in enumerate(zip(b0_list, _columns(b0_list, 0))):
        y[:, c0:c1].addmm_(h[:, i * r:(i + 1) * r], B.T, alpha=scale)


def dense_shrink(x, a_cat: torch.Tensor) -> torch.Tensor:
    return x @ a_cat.T


def dense_expand(y, h0: torch.Tensor, b0_list, scale: float) -> None:
    """h0: [T, n * r] in y's dtype."""
    r = b0_list[0].shape[1]
    for i, (B, (c0, c1)) in enumerate(zip(b0_list, _columns(b0_list, 0))):
        y[:, c0:c1].addmm_(h0[:, i * r:(i + 1) * r], B.T, alpha=scale)


# --------------------------------------------------------------------------------- reference


def reference_shrink(x, a_list, groups: Sequence[AdapterGroup], R: int) -> torch.Tensor:
    h = torch.zeros((len(a_list), x.shape[0], R), dtype=torch.float32, device=x.device)
    for g in groups:
        xs = x.index_select(0, g.rows).float()
        for i, A in enumerate(a_list):
            h[i, g.rows, :g.rank] = xs @ A[g.slot, :g.rank].float().T
    return h


def reference_delta(h, b_list, groups: Sequence[AdapterGroup], T: int) -> torch.Tensor:
    """float32 [T, N]: what add_lora / lora_expand add to y (rows without adapter: 0)."""
    N = sum(B.shape[1] for B in b_list)
    out = torch.zeros((T, N), dtype=torch.float32, device=h.device)
    for g in groups:
        for i, (B, (c0, c1)) in enumerate(zip(b_list, _columns(b_list))):
            hs = h[i].index_select(0, g.rows)[:, :g.rank].float()
            out[g.rows, c0:c1] = (hs @ B[g.slot, :, :g.rank].float().T) * g.scale
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf on NaN; 0 when both are zero)."""
    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return float("inf")
    den = r.norm().item()
    num = (o - r).norm().item()
    return num / den if den > 0 else num
