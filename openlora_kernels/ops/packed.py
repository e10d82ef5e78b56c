"""Packed (rank-packed) weight addressing: every slot's rows inside ONE buffer per slice.

Design
------
The padded contract stacks S slots at R rows each (``lora_a`` [S, R, K], ``lora_b`` [S, N, R]),
so a rank-8 adapter in an R=128 stack occupies 16 times its size. The packed form keeps one
buffer per slice, ``lora_a`` [rows, K] and ``lora_b`` [N, rows] (any strides: the pool passes
the [N, rows] view of rank-major [rows, N] storage), and an ``offsets`` [S] int32/int64 tensor:
slot s uses rows ``offsets[s] .. offsets[s] + ranks[s]`` of each buffer. ``max_rank`` (a Python
int) is the largest rank any slot may have (the width of ``h`` in a shrink), ``ranks`` is
required.

Inside the library the buffers travel as the padded contract's shapes so that every backend's
shape logic stays as it is: ``as_strided`` views [S, R', K] / [S, N, R'] with a slot stride of
0 (R' = min(max_rank, rows): the view never reaches past the buffer), plus :class:`Packed`
(offsets, rows). A kernel's address of (slot s, rank row j) becomes
``base + s * slot_stride + (offsets[s] + j) * rank_stride``: one integer load per slot from a
tensor (no pointer table, so it runs under the Triton interpreter too), and with a slot stride of
0 only the offset moves. Bounds: offsets are clamped to [0, rows] and each rank to
``rows - offset`` in every backend, so a hand-built offsets tensor cannot make a read out of
bounds; the values are also checked (``check_offsets``): always for CPU tensors, in debug mode
on GPUs (a host synchronisation).

The reference (backend "torch") gathers each slot's rows into a padded [S, R', K] stack and runs
the padded code: the readable statement of the semantics, not a fast path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .. import checks as _checks


@dataclass(frozen=True)
class Packed:
    """The packed addressing of one call: ``offsets`` [S] int32/int64 (first row of each slot)
    and ``rows`` (the rows of each slice's buffer)."""

    offsets: torch.Tensor
    rows: int


def check_offsets_arg(offsets, S: int, device: torch.device) -> torch.Tensor:
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"offsets: expected a torch.Tensor or None, got {type(offsets).__name__}")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"offsets: expected dtype int32 or int64, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.shape[0] != S:
        raise ValueError(f"offsets: expected shape [{S}] (one first row per slot), got {tuple(offsets.shape)}")
    if offsets.device != device:
        raise ValueError(f"offsets: expected a tensor on {device}, got one on {offsets.device}")
    return offsets


def _2d(v, name: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(v).__name__}")
    if v.dim() != 2:
        raise ValueError(f"{name}: with offsets, expected a 2-D packed buffer ([rows, K] for lora_a, [N, rows] "
                         f"for lora_b), got shape {tuple(v.shape)}")
    return v


def _list(v, name: str) -> Tuple[List[torch.Tensor], bool]:
    if isinstance(v, torch.Tensor):
        return [v], False
    if isinstance(v, (list, tuple)) and len(v) > 0:
        return list(v), True
    raise TypeError(f"{name}: expected a tensor or a non-empty list of tensors, got {type(v).__name__}")


def views(lora_a, lora_b, offsets, ranks, max_rank, a_required: bool = True, b_required: bool = True):
    """(lora_a as [S, R', K] views or None, lora_b as [S, N_i, R'] views or None, Packed) from
    the packed buffers; raises naming the argument. S is offsets' length."""
    if ranks is None:
        raise ValueError("ranks: required with offsets (the packed form has no implicit rank)")
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 0:
        raise ValueError(f"max_rank: with offsets, expected an int >= 0 (the largest rank of a slot), got {max_rank!r}")
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"offsets: expected a torch.Tensor or None, got {type(offsets).__name__}")
    if offsets.dim() != 1:
        raise ValueError(f"offsets: expected shape [S] (one first row per slot), got {tuple(offsets.shape)}")
    S = offsets.shape[0]
    rows = None
    a_views = b_views = None
    a_is_list = None
    if a_required:
        a_list, a_is_list = _list(lora_a, "lora_a")
        a_views = []
        for i, A in enumerate(a_list):
            nm = f"lora_a[{i}]" if a_is_list else "lora_a"
            _2d(A, nm)
            if rows is None:
                rows = A.shape[0]
            elif A.shape[0] != rows:
                raise ValueError(f"{nm}: has {A.shape[0]} rows, but lora_a[0] has {rows}; all slices share the rows")
    if b_required:
        b_list, b_is_list = _list(lora_b, "lora_b")
        if a_is_list is not None and a_is_list != b_is_list:
            raise ValueError("lora_b: give lora_a and lora_b both as tensors or both as lists of per-slice tensors")
        for i, B in enumerate(b_list):
            nm = f"lora_b[{i}]" if b_is_list else "lora_b"
            _2d(B, nm)
            if rows is None:
                rows = B.shape[1]
            elif B.shape[1] != rows:
                raise ValueError(f"{nm}: shape {tuple(B.shape)} is [N, rows] with rows={B.shape[1]}, but the packed "
                                 f"buffers have {rows} rows")
    R = min(max_rank, rows)
    if a_required:
        a_views = [A.as_strided((S, R, A.shape[1]), (0, A.stride(0), A.stride(1)), A.storage_offset())
                   for A in a_list]
        if not a_is_list:
            a_views = a_views[0]
    if b_required:
        b_views = [B.as_strided((S, B.shape[0], R), (0, B.stride(0), B.stride(1)), B.storage_offset())
                   for B in b_list]
        if not b_is_list:
            b_views = b_views[0]
    return a_views, b_views, Packed(offsets, rows)


def check_offsets(packed: Packed, ranks: torch.Tensor) -> None:
    """Raise ValueError if an offset is negative or a slot's rows run past the buffer (CPU tensors
    always, GPU tensors in debug mode; memoised on both tensors' versions)."""
    off = packed.offsets
    if off.numel() == 0 or not _checks._must_check(off):
        return
    key = (id(off), _checks._version(off), id(ranks), _checks._version(ranks), packed.rows)
    if key[1] is not None and key[3] is not None and _offsets_ok.get(key[0]) == key:
        return
    o = off.to(torch.int64)
    r = ranks.to(torch.int64).reshape(-1, off.shape[0]).amax(0) if ranks.numel() else torch.zeros_like(o)
    if bool((o < 0).any()):
        raise ValueError(f"offsets: offsets must be >= 0, got {int(o.min())}")
    end = o + r
    if bool((end > packed.rows).any()):
        s = int(torch.argmax((end > packed.rows).to(torch.int8)))
        raise ValueError(f"offsets: slot {s} uses rows {int(o[s])}..{int(end[s])} (offset + rank), past the "
                         f"{packed.rows} rows of the packed buffers")
    if key[1] is not None and key[3] is not None:
        if len(_offsets_ok) >= 4096:
            _offsets_ok.clear()
        _offsets_ok[key[0]] = key


_offsets_ok: dict = {}


def buffer_of(view: torch.Tensor, rows: int, rank_dim: int) -> torch.Tensor:
    """The 2-D packed buffer behind a slot-stride-0 view: [rows, K] (rank_dim 1, a lora_a view)
    or [N, rows] (rank_dim 2, a lora_b view)."""
    if rank_dim == 1:
        return view.as_strided((rows, view.shape[2]), (view.stride(1), view.stride(2)), view.storage_offset())
    return view.as_strided((view.shape[1], rows), (view.stride(1), view.stride(2)), view.storage_offset())


def padded_from(packed: Packed, ranks: Optional[torch.Tensor], a_list=None, b_list=None):
    """(padded copies of the views [S, R', K] / [S, N, R'], effective ranks): each slot's rows
    gathered from the buffers (offsets clamped into them, ranks clamped to what is left); the
    reference's reading of the packed form."""
    views_ = a_list if a_list is not None else b_list
    S = views_[0].shape[0]
    R = views_[0].shape[1] if a_list is not None else views_[0].shape[2]
    rows = packed.rows
    dev = views_[0].device
    off = packed.offsets.to(torch.int64).clamp(0, rows)
    idx = (off[:, None] + torch.arange(R, device=dev)[None, :]).clamp(max=max(rows - 1, 0))     # [S, R]
    left = (rows - off)
    if ranks is None:
        eff = left.clamp(max=R)
    else:
        eff = torch.minimum(ranks.to(torch.int64), left if ranks.dim() == 1 else left[None, :]).clamp(min=0)
    a_pad = b_pad = None
    if a_list is not None:
        a_pad = [buffer_of(A, rows, 1)[idx] if rows else A.new_zeros(A.shape) for A in a_list]        # [S, R, K]
    if b_list is not None:
        b_pad = [buffer_of(B, rows, 2)[:, idx].permute(1, 0, 2) if rows else B.new_zeros(B.shape)
                 for B in b_list]                                                                   # [S, N, R]
    return a_pad, b_pad, eff


def padded_scales(packed: Packed, scales):
    """The fp8 scales (ops/fp8.WeightScales of slot-stride-0 [S, R'] views over [rows] vectors)
    gathered like :func:`padded_from` gathers the weights: [S, R'] per slice, slot s's row j
    being the scale of buffer row ``offsets[s] + j`` (clamped into the buffer)."""
    from .fp8 import WeightScales

    def gather(views_):
        if views_ is None:
            return None
        S, R = views_[0].shape
        rows = packed.rows
        if not rows:
            return tuple(v.new_ones((S, R)) for v in views_)
        off = packed.offsets.to(torch.int64).clamp(0, rows)
        idx = (off[:, None] + torch.arange(R, device=off.device)[None, :]).clamp(max=rows - 1)
        return tuple(v.as_strided((rows,), (v.stride(1),), v.storage_offset())[idx] for v in views_)

    return WeightScales(gather(scales.a), gather(scales.b))
