"""backend="torch": pure-PyTorch multi-LoRA shrink / expand, on any device.

This is the CPU path and the readable statement of what the kernels compute:

    h[i, t, :r]   = x[t] @ A_i[s, :r].T                     (s = slot of row t, r = rank of s)
    y[t, cols_i] += scalings[s] * h[i, t, :r] @ B_i[s, :, :r].T

Arithmetic is done in float32 whatever the input dtype (float64 for float64 inputs, which only
this backend takes: the reference for gradcheck); entries of A/B beyond a slot's rank are
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

Whatever the metadata holds, nothing is read or written outside the tensors (docs/kernels.md):
gather takes each row's slot from ``token_slots`` (outside [0, S): no adapter); segment and
padded take the rows of each slot's segment of ``sorted_tokens``, the segment clipped to [0, T)
and row ids outside [0, T) skipped (``_segments``, once per metadata object), so their work is
bounded by S·T rows whatever the segment lengths say.
Padding columns of A/B beyond a slot's rank are multiplied by zero in the padded strategy, and
0 * NaN is NaN: a non-finite result makes it redo the call with the segment strategy (which
slices to the rank), so whatever sits in the padding stays ignored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch

from ..metadata import LoRABatchMeta
from .fp8 import FP8, dequantized

# Elements of gathered weights held at once by the gather strategy.
_GATHER_BUDGET = 1 << 22
# expand() takes a float32 y with 16-bit weights (ops/backward.py sums multi-slice dx in float32)
EXPAND_FP32_Y = True
# Weights stored in another dtype than the activations (adapter_dtype): every operand is taken to
# float32 before its product here anyway, so every storage dtype of a float32 call runs.
# fp8 (float8_e4m3fn) weights come with per-rank scales (ops/fp8.py): read here as the float32
# weights they stand for (fp8.dequantized; a transient float32 copy per call: the readable
# statement of the semantics, not a fast path).
MIXED_STORAGE = frozenset({(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                           (torch.bfloat16, torch.float16)}
                          | {(act, FP8) for act in (torch.float32, torch.bfloat16, torch.float16)})


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


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of ``dtype``: float32, or float64 for float64 (this backend only)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def new_h(out: Optional[torch.Tensor], n: int, T: int, R: int, device,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [n, T, R] float32 (``dtype``) intermediate, zero-filled: ``out`` (the caller's buffer,
    any strides) when given, else a new tensor."""
    if out is None:
        return torch.zeros((n, T, R), dtype=dtype, device=device)
    if out.shape != (n, T, R) or out.dtype != dtype or out.device != torch.device(device):
        raise ValueError(f"out: expected a {str(dtype).replace('torch.', '')} [{n}, {T}, {R}] tensor on {device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    return out.zero_()


def _chunk_rows(T: int, R: int, width: int) -> int:
    return max(1, _GATHER_BUDGET // max(1, R * width))


# ------------------------------------------------------------------------------------ gather


def _shrink_gather(x, a_list, ranks, meta, out=None) -> torch.Tensor:
    n, T = len(a_list), x.shape[0]
    S, R, K = a_list[0].shape
    h = new_h(out, n, T, R, x.device, acc_dtype(x.dtype))
    slots_all = meta.token_slots.to(torch.int64)
    step = _chunk_rows(T, R, K)
    for t0 in range(0, T, step):
        slots = slots_all[t0:t0 + step]
        valid = (slots >= 0) & (slots < S)
        safe = torch.where(valid, slots, 0)
        xc = _f32(x[t0:t0 + step])
        for i, A in enumerate(a_list):
            Ag = _f32(A.index_select(0, safe))                                   # [t, R, K]
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
    S = b_list[0].shape[0]
    slots_all = meta.token_slots.to(torch.int64)
    widths = [B.shape[1] for B in b_list]
    step = _chunk_rows(T, R, max(widths))
    for t0 in range(0, T, step):
        slots = slots_all[t0:t0 + step]
        valid = (slots >= 0) & (slots < S)
        safe = torch.where(valid, slots, 0)
        scale = _f32(scalings.index_select(0, safe))[:, None]
        off = 0
        for i, B in enumerate(b_list):
            Bg = _f32(B.index_select(0, safe))                                   # [t, N_i, R]
            m = _rank_mask(_slice_ranks(ranks, i), safe, R)
            hc = _f32(h[i, t0:t0 + step])
            if m is not None:
                hc = torch.where(m, hc, 0.0)
                Bg = torch.where(m[:, None, :], Bg, 0.0)
            delta = torch.bmm(Bg, hc.unsqueeze(2)).squeeze(2) * scale            # [t, N_i]
            ys = y[t0:t0 + step, off:off + widths[i]]
            new = (_f32(ys) + delta).to(y.dtype)
            ys.copy_(torch.where(valid[:, None], new, ys))
            off += widths[i]


# ----------------------------------------------------------------------------------- segment


@dataclass(frozen=True)
class _Segments:
    """The rows of each slot's segment, sanitised (memoised per batch metadata): each segment
    of ``sorted_tokens`` clipped to [0, T), row ids outside [0, T) dropped."""
    rows: torch.Tensor             # [P] int64: the segments' rows, slot after slot, all in [0, T)
    active: List[int]              # slots with rows, ascending
    start: List[int]               # offset in ``rows`` of each active slot's rows
    length: List[int]              # number of rows of each active slot (> 0)

    def of(self, u: int) -> torch.Tensor:
        return self.rows[self.start[u]:self.start[u] + self.length[u]]


def _segments(meta: LoRABatchMeta) -> _Segments:
    def build():
        T, S, dev = meta.num_tokens, meta.num_slots, meta.device
        none = _Segments(torch.zeros(0, dtype=torch.int64, device=dev), [], [], [])
        if T == 0 or S == 0:
            return none
        starts, lens = meta.seg_info.tolist()
        lo = [min(max(st, 0), T) for st in starts]                      # Python ints: no overflow
        n = [min(max(st + ln, lo_s), T) - lo_s for st, ln, lo_s in zip(starts, lens, lo)]
        P = sum(n)                                                      # <= S * T
        if P == 0:
            return none
        n_t = torch.tensor(n, dtype=torch.int64, device=dev)
        seg = torch.repeat_interleave(torch.arange(S, device=dev), n_t)   # slot of each position
        first = torch.cumsum(n_t, 0) - n_t
        pos = (torch.tensor(lo, dtype=torch.int64, device=dev).index_select(0, seg)
               + torch.arange(P, device=dev) - first.index_select(0, seg))
        rows = meta.sorted_tokens.to(torch.int64).index_select(0, pos)
        ok = (rows >= 0) & (rows < T)
        if not bool(ok.all()):
            rows, seg = rows[ok], seg[ok]
            n = torch.bincount(seg, minlength=S).tolist()
        active = [s for s in range(S) if n[s] > 0]
        length = [n[s] for s in active]
        start, acc = [], 0
        for ln in length:
            start.append(acc)
            acc += ln
        return _Segments(rows, active, start, length)
    return meta.memo("torch_ref.segments", build)


def _active_segments(meta: LoRABatchMeta):
    segs = _segments(meta)
    for u, s in enumerate(segs.active):
        yield s, segs.of(u)


def _ranks_host(ranks, n: int, S: int, R: int) -> List[List[int]]:
    if ranks is None:
        return [[R] * S for _ in range(n)]
    r = ranks.to(torch.int64).clamp(0, R)
    if r.dim() == 1:
        r = r.expand(n, S)
    return r.tolist()


def _shrink_segment(x, a_list, ranks, meta, out=None) -> torch.Tensor:
    n, T = len(a_list), x.shape[0]
    S, R, K = a_list[0].shape
    h = new_h(out, n, T, R, x.device, acc_dtype(x.dtype))
    rk = _ranks_host(ranks, n, S, R)
    for s, rows in _active_segments(meta):
        xs = _f32(x.index_select(0, rows))
        for i, A in enumerate(a_list):
            r = rk[i][s]
            if r:
                h[i, rows, :r] = xs @ _f32(A[s, :r]).T
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
                d = (_f32(h[i].index_select(0, rows)[:, :r]) @ _f32(B[s, :, :r]).T) * scal[s]
                cur = y[rows, off:off + Ni]
                y[rows, off:off + Ni] = (_f32(cur) + d).to(y.dtype)
            off += Ni


# ------------------------------------------------------------------------------------ padded

# Cost of one small torch op on the CPU, in multiply-adds of a large GEMM (~20 us on 2 cores).
_CPU_OP_COST = 1 << 19


@dataclass(frozen=True)
class _PaddedRows:
    """Rows of the batch laid out as [U, L] by slot (memoised per batch metadata)."""
    slots: Union[None, slice, torch.Tensor]  # active slots: None = all S, a slice when contiguous, else [U]
    index: torch.Tensor            # [U*L] row of x for each padded position
    keep: Optional[torch.Tensor]   # [U*L] positions that are real rows, None when there is no padding
    rows: torch.Tensor             # [n_valid] the real rows, in padded order
    inverse: torch.Tensor          # [T] padded position of each row; rows without slot -> U*L (a -0.0 row)
    U: int
    L: int
    identity: bool                 # the padded order is the row order (rows already grouped, no padding)
    zero_row: bool                 # some rows have no slot: results get a -0.0 row at U*L for them


def _padded_rows(meta: LoRABatchMeta) -> Optional[_PaddedRows]:
    def build():
        segs = _segments(meta)
        active, length = segs.active, segs.length
        if not active:
            return None
        S, T = meta.num_slots, meta.num_tokens
        U, L = len(active), max(length)
        act = torch.tensor(active, dtype=torch.int64)
        st = torch.tensor(segs.start, dtype=torch.int64)
        ln = torch.tensor(length, dtype=torch.int64)
        n_valid = sum(length)
        if U * L == n_valid:     # equal segments: the sorted rows are the padded layout
            index, keep = segs.rows, None
        else:
            pos = torch.arange(L).unsqueeze(0)
            real = (pos < ln.unsqueeze(1)).reshape(-1)
            src = torch.minimum(st.unsqueeze(1) + pos, (st + ln - 1).unsqueeze(1))   # pad: repeat the last row
            index = segs.rows[src.reshape(-1)]
            keep = real.nonzero().squeeze(1)
        rows = index if keep is None else index[keep]
        # y += out[inverse]: a row without slot reads the extra row of -0.0 (x + -0.0 == x bit for
        # bit, -0.0 and NaN included), so every row is updated by one index_select + add_.
        # (With valid metadata each row is in at most one segment; a row listed twice by corrupt
        # metadata gets one of its results.)
        inverse = torch.full((T,), U * L, dtype=torch.int64)
        inverse[rows] = keep if keep is not None else torch.arange(U * L)
        zero_row = bool((inverse == U * L).any())
        identity = (not zero_row and keep is None and index.numel() == T
                    and bool((index == torch.arange(T)).all()))
        if U == S:
            slots = None
        elif active[-1] - active[0] + 1 == U:   # contiguous slots (the usual pool case): views, no copies
            slots = slice(active[0], active[-1] + 1)
        else:
            slots = act
        return _PaddedRows(slots, index, keep, rows, inverse, U, L, identity, zero_row)
    return meta.memo("torch_ref.padded_rows", build)


def _cpu_strategy(meta: LoRABatchMeta, R: int, K: int, N: int) -> str:
    """'padded' unless padding short segments to the longest one wastes more than the per-slot
    op cost of the segment strategy (e.g. one long prefill segment next to one-token ones)."""
    pr = _padded_rows(meta)
    if pr is None:
        return "segment"
    work = R * (K + N)
    padded = pr.U * pr.L * work + (pr.U * work if isinstance(pr.slots, torch.Tensor) else 0)
    segment = pr.U * _CPU_OP_COST + meta.num_tokens * work
    return "padded" if padded <= segment else "segment"


# Small-batch CPU calls are dominated by per-op cost: the helpers below skip no-op dtype
# conversions, slicing and gathers rather than dispatching them.

def _f32(t: torch.Tensor) -> torch.Tensor:
    """t in its accumulation dtype: float32 (float64 stays float64)."""
    return t if t.dtype == torch.float32 or t.dtype == torch.float64 else t.to(torch.float32)


def _active(W: torch.Tensor, pr: _PaddedRows) -> torch.Tensor:
    if pr.slots is None:
        return W
    return W[pr.slots] if isinstance(pr.slots, slice) else W.index_select(0, pr.slots)


_ARANGE: dict = {}


def _arange(n: int) -> torch.Tensor:
    """torch.arange(n) on the CPU, made once per n (read-only)."""
    t = _ARANGE.get(n)
    if t is None:
        t = _ARANGE[n] = torch.arange(n)
    return t


def _slot_coeffs(scalings, ranks_i: Optional[torch.Tensor], R: int, pr: _PaddedRows) -> torch.Tensor:
    """[U, 1, R] (or [U, 1, 1]) float32: each active slot's scaling below its rank, 0 beyond."""
    c = _active(_f32(scalings), pr)
    if ranks_i is None:
        return c.view(-1, 1, 1)
    return torch.where(_arange(R) < _active(ranks_i, pr).view(-1, 1), c.view(-1, 1), 0.0).unsqueeze(1)


def _padded_x(x, pr: _PaddedRows) -> torch.Tensor:
    """[U, L, K] float32: the rows of x in padded order."""
    xp = x if pr.identity else x.index_select(0, pr.index)
    return _f32(xp).view(pr.U, pr.L, -1)


def _padded_shrink_slice(xp, A, pr: _PaddedRows) -> torch.Tensor:
    """[U, L, R] float32 x @ A[slot].T on the padded rows (padding columns not yet masked)."""
    return torch.bmm(xp, _f32(_active(A, pr)).transpose(1, 2))


def _padded_scatter(y, cols: Optional[slice], out: torch.Tensor, pr: _PaddedRows) -> None:
    """y[rows, cols] += the real rows of out ([U*L (+1), N_i] float32); other rows unchanged."""
    ys = y if cols is None else y[:, cols]
    if ys.dtype == torch.float32 or ys.dtype == torch.float64:
        ys.add_(out if pr.identity else out.index_select(0, pr.inverse))
    elif not pr.zero_row:   # every row has a slot: round once from fp32
        ys.copy_((_f32(ys) + (out if pr.identity else out.index_select(0, pr.inverse))).to(ys.dtype))
    else:                   # write the rows with a slot only (a NaN's payload would not survive the round trip)
        d = out.index_select(0, pr.inverse.index_select(0, pr.rows))
        ys.index_copy_(0, pr.rows, (_f32(ys.index_select(0, pr.rows)) + d).to(ys.dtype))


def _padded_expand_slices(y, hp_list, b_list, scalings, ranks, pr: _PaddedRows) -> bool:
    """y += scale * hp @ B over the slices; hp_list[i] is a fresh [U, L, R] (scaled in place).
    With ranks, returns False, writing nothing, if a result is not finite: NaN/inf in the
    padding beyond a rank met the zeros of the rank mask. Without ranks there is no padding."""
    R = hp_list[0].shape[2]
    outs = []
    for i, (hp, B) in enumerate(zip(hp_list, b_list)):
        hp.mul_(_slot_coeffs(scalings, _slice_ranks(ranks, i), R, pr))
        Bt = _f32(_active(B, pr)).transpose(1, 2)
        if pr.zero_row:
            out = torch.empty((pr.U * pr.L + 1, Bt.shape[2]), dtype=hp.dtype)
            torch.bmm(hp, Bt, out=out[:-1].view(pr.U, pr.L, -1))
            out[-1].fill_(-0.0)
        else:
            out = torch.bmm(hp, Bt).view(pr.U * pr.L, -1)
        if ranks is not None and not math.isfinite(float(out.sum())):
            return False
        outs.append(out)
    if len(outs) == 1:
        _padded_scatter(y, None, outs[0], pr)
        return True
    off = 0
    for out, B in zip(outs, b_list):
        _padded_scatter(y, slice(off, off + B.shape[1]), out, pr)
        off += B.shape[1]
    return True


def _shrink_padded(x, a_list, ranks, meta, out=None) -> torch.Tensor:
    pr = _padded_rows(meta)
    S, R, K = a_list[0].shape
    h = new_h(out, len(a_list), x.shape[0], R, x.device, acc_dtype(x.dtype))
    if pr is None:           # no row has an adapter
        return h
    xp = _padded_x(x, pr)
    slots = _active(torch.arange(S), pr).repeat_interleave(pr.L)
    if pr.keep is not None:
        slots = slots.index_select(0, pr.keep)
    for i, A in enumerate(a_list):
        hp = _padded_shrink_slice(xp, A, pr).view(pr.U * pr.L, R)
        if pr.keep is not None:
            hp = hp.index_select(0, pr.keep)
        m = _rank_mask(_slice_ranks(ranks, i), slots, R)
        h[i].index_copy_(0, pr.rows, hp if m is None else torch.where(m, hp, 0.0))
    return h


def _expand_padded(y, h, b_list, scalings, ranks, meta) -> bool:
    pr = _padded_rows(meta)
    if pr is None:
        return True
    # fresh copies (index_select), since _padded_expand_slices scales them in place
    hp = [_f32(h[i].index_select(0, pr.index)).view(pr.U, pr.L, -1) for i in range(len(b_list))]
    return _padded_expand_slices(y, hp, b_list, scalings, ranks, pr)


def _add_padded(y, x, a_list, b_list, scalings, ranks, meta) -> bool:
    pr = _padded_rows(meta)
    if pr is None:
        return True
    xp = _padded_x(x, pr)
    hp = [_padded_shrink_slice(xp, A, pr) for A in a_list]
    return _padded_expand_slices(y, hp, b_list, scalings, ranks, pr)


# ---------------------------------------------------------------------------- backend entry


def _strategy(meta: LoRABatchMeta, R: int, K: int, N: int) -> str:
    if meta.device.type != "cpu":
        return "gather"  # host sync on a GPU: keep the sync-free path
    if meta.num_tokens == 0:
        return "segment"
    return _cpu_strategy(meta, R, K, N)


def shrink(x: torch.Tensor, a_list: Sequence[torch.Tensor], ranks: Optional[torch.Tensor], meta: LoRABatchMeta,
           out: Optional[torch.Tensor] = None, scales=None) -> torch.Tensor:
    """h [n, T, R] float32 (into ``out`` when given: internal, any strides). ``scales``: the
    fp8 weights' WeightScales (ops/fp8.py)."""
    S, R, K = a_list[0].shape
    if scales is not None:
        a_list, _ = dequantized(a_list, None, scales)
    if x.shape[0] == 0 or S == 0 or R == 0 or K == 0:
        return new_h(out, len(a_list), x.shape[0], R, x.device, acc_dtype(x.dtype))
    how = _strategy(meta, R, K, 0)
    if how == "padded":
        return _shrink_padded(x, a_list, ranks, meta, out)
    if how == "segment":
        return _shrink_segment(x, a_list, ranks, meta, out)
    return _shrink_gather(x, a_list, ranks, meta, out)


def expand(y, h, b_list, scalings, ranks, meta: LoRABatchMeta, scales=None) -> None:
    N = sum(B.shape[1] for B in b_list)
    if scales is not None:
        _, b_list = dequantized(None, b_list, scales)
    if y.shape[0] == 0 or N == 0 or b_list[0].shape[0] == 0 or h.shape[2] == 0:
        return
    how = _strategy(meta, h.shape[2], 0, N)
    if how == "padded" and _expand_padded(y, h, b_list, scalings, ranks, meta):
        return
    if how == "gather":
        _expand_gather(y, h, b_list, scalings, ranks, meta)
    else:
        _expand_segment(y, h, b_list, scalings, ranks, meta)


def add_lora(y, x, a_list, b_list, scalings, ranks, meta: LoRABatchMeta, scales=None) -> None:
    S, R, K = a_list[0].shape
    if x.shape[0] == 0 or y.shape[1] == 0 or S == 0 or R == 0 or K == 0:
        return      # a zero delta: y is not written
    if scales is not None:
        a_list, b_list = dequantized(a_list, b_list, scales)
    how = _strategy(meta, R, K, y.shape[1])
    if how == "padded" and _add_padded(y, x, a_list, b_list, scalings, ranks, meta):
        return
    if how == "gather":
        _expand_gather(y, _shrink_gather(x, a_list, ranks, meta), b_list, scalings, ranks, meta)
    else:
        _expand_segment(y, _shrink_segment(x, a_list, ranks, meta), b_list, scalings, ranks, meta)


# ---------------------------------------------------------------------- weight gradients
#
# out_i[s, p, q] += scalings[s] * sum over the rows t of slot s of P_i[t, p] * Q_i[t, q], for p, q
# below the slot's rank on the rank dimension (p when ``rank_on_p``, else q); 0 elsewhere. The
# LoRA backward's dA (P = dY B, Q = X) and dB (P = dY, Q = H = X Aᵀ) are such segmented products
# (ops/backward.py). Rows without a slot contribute nothing; entries beyond a rank, and slots no
# row uses, stay exactly 0 (torch.where, never a multiply by a 0 mask: P or Q may hold NaN there).


def _wgrad_rank_mask(ranks_i: Optional[torch.Tensor], R: int, rank_on_p: bool) -> Optional[torch.Tensor]:
    """[S', R, 1] (rank on p) or [S', 1, R] bool: index below each slot's rank (ranks_i [S'])."""
    if ranks_i is None:
        return None
    m = torch.arange(R, device=ranks_i.device)[None, :] < ranks_i.to(torch.int64).clamp(0, R)[:, None]
    return m[:, :, None] if rank_on_p else m[:, None, :]


def _wgrad_finish(acc: torch.Tensor, scale: torch.Tensor, ranks_i: Optional[torch.Tensor],
                  rank_on_p: bool) -> torch.Tensor:
    """acc [S', P, Q] masked beyond each slot's rank (exact zeros) and scaled per slot."""
    m = _wgrad_rank_mask(ranks_i, acc.shape[1] if rank_on_p else acc.shape[2], rank_on_p)
    if m is not None:
        acc = torch.where(m, acc, 0.0)
    return acc * scale.view(-1, 1, 1)


def _wgrad_gather(p_list, q_list, scalings, ranks_list, meta, rank_on_p, out_list) -> None:
    """Sync-free (the GPU choice): each row's outer product added into its slot (chunks of rows)."""
    T, S = meta.num_tokens, meta.num_slots
    slots_all = meta.token_slots.to(torch.int64)
    for P, Q, rk, out in zip(p_list, q_list, ranks_list, out_list):
        acc = torch.zeros(out.shape, dtype=out.dtype, device=out.device)
        step = max(1, _GATHER_BUDGET // max(1, P.shape[1] * Q.shape[1]))
        for t0 in range(0, T, step):
            slots = slots_all[t0:t0 + step]
            valid = (slots >= 0) & (slots < S)
            prod = _f32(P[t0:t0 + step])[:, :, None] * _f32(Q[t0:t0 + step])[:, None, :]
            acc.index_add_(0, torch.where(valid, slots, 0), torch.where(valid[:, None, None], prod, 0.0))
        out.add_(_wgrad_finish(acc, _f32(scalings), rk, rank_on_p))


def _wgrad_segment(p_list, q_list, scalings, ranks_list, meta, rank_on_p, out_list) -> None:
    """One GEMM per (active slot, slice), sliced to the rank (CPU: the slots come from the host)."""
    S = meta.num_slots
    scal = scalings.tolist()
    for P, Q, rk, out in zip(p_list, q_list, ranks_list, out_list):
        R = P.shape[1] if rank_on_p else Q.shape[1]
        r_host = [R] * S if rk is None else rk.to(torch.int64).clamp(0, R).tolist()
        for s, rows in _active_segments(meta):
            r = r_host[s]
            if r == 0:
                continue
            Ps, Qs = _f32(P.index_select(0, rows)), _f32(Q.index_select(0, rows))
            if rank_on_p:
                out[s, :r].add_(Ps[:, :r].T @ Qs, alpha=scal[s])
            else:
                out[s, :, :r].add_(Ps.T @ Qs[:, :r], alpha=scal[s])


def _wgrad_padded(p_list, q_list, scalings, ranks_list, meta, rank_on_p, out_list) -> None:
    """The rows in the padded [U, L] layout (padding rows zeroed), one batched GEMM per slice."""
    pr = _padded_rows(meta)
    if pr is None:
        return
    real = None
    if pr.keep is not None:
        real = torch.zeros(pr.U * pr.L, dtype=torch.bool).index_fill_(0, pr.keep, True)[:, None]
    scale = _active(_f32(scalings), pr)
    for P, Q, rk, out in zip(p_list, q_list, ranks_list, out_list):
        Pp = _f32(P.index_select(0, pr.index))
        if real is not None:
            Pp = torch.where(real, Pp, 0.0)          # a padding row repeats a real one: drop it
        Qp = _f32(Q.index_select(0, pr.index))
        acc = torch.bmm(Pp.view(pr.U, pr.L, -1).transpose(1, 2), Qp.view(pr.U, pr.L, -1))      # [U, P, Q]
        acc = _wgrad_finish(acc, scale, None if rk is None else _active(rk, pr), rank_on_p)
        if pr.slots is None:
            out.add_(acc)
        elif isinstance(pr.slots, slice):
            out[pr.slots].add_(acc)
        else:
            out.index_add_(0, pr.slots, acc)


def _add_to_active(out: torch.Tensor, acc: torch.Tensor, pr: _PaddedRows) -> None:
    """out[active slots] += acc ([U, ...])."""
    if pr.slots is None:
        out.add_(acc)
    elif isinstance(pr.slots, slice):
        out[pr.slots].add_(acc)
    else:
        out.index_add_(0, pr.slots, acc)


def add_lora_backward_padded(dy, x, a_list, b_list, scalings, ranks, meta: LoRABatchMeta, need_x: bool,
                             wa: Sequence[int], wb: Sequence[int], dA, dB) -> Optional[torch.Tensor]:
    """add_lora's backward in one pass of batched GEMMs over the padded [U, L] layout (CPU, where
    a small op costs as much as a small GEMM): per active slot and slice, with A and B masked to
    the slot's rank (exact zeros beyond it; whatever the padding holds is never multiplied),

        G = scale * dY B    dx = G A    dA += Gᵀ X    H = X Aᵀ    dB += scale * dYᵀ H

    dY's padding rows (repeats of a segment's last row) are zeroed so they add nothing. Fills
    dA[i] (i in wa) and dB[i] (i in wb), float32 in their given layouts; returns dx [T, K] in x's
    dtype (or None when not needed)."""
    pr = _padded_rows(meta)
    T, K = x.shape
    if pr is None:
        return x.new_zeros((T, K)) if need_x else None
    U, L = pr.U, pr.L
    S, R, _ = a_list[0].shape
    xp = _padded_x(x, pr)                                                  # [U, L, K]
    dyp = _f32(dy if pr.identity else dy.index_select(0, pr.index)).view(U, L, -1)
    if pr.keep is not None:
        real = torch.zeros(U * L, dtype=torch.bool).index_fill_(0, pr.keep, True).view(U, L, 1)
        dyp = torch.where(real, dyp, 0.0)
    scale = _active(_f32(scalings), pr).view(U, 1, 1)
    dxp, col = None, 0
    for i, (A, B) in enumerate(zip(a_list, b_list)):
        n_i = B.shape[1]
        Au, Bu = _f32(_active(A, pr)), _f32(_active(B, pr))               # [U, R, K], [U, N_i, R]
        rk = _slice_ranks(ranks, i)
        if rk is not None:
            m = _arange(R) < _active(rk, pr).to(torch.int64).clamp(0, R).view(-1, 1)
            Au, Bu = torch.where(m[:, :, None], Au, 0.0), torch.where(m[:, None, :], Bu, 0.0)
        d = dyp[:, :, col:col + n_i]
        col += n_i
        if need_x or i in wa:
            g = torch.bmm(d, Bu).mul_(scale)                                   # [U, L, R]
            if need_x:
                dxp = torch.bmm(g, Au) if dxp is None else dxp.baddbmm_(g, Au)
            if i in wa:
                _add_to_active(dA[i], torch.bmm(g.transpose(1, 2), xp), pr)
        if i in wb:
            h = torch.bmm(xp, Au.transpose(1, 2))                              # [U, L, R]
            _add_to_active(dB[i], torch.bmm(d.transpose(1, 2), h).mul_(scale), pr)
    if not need_x:
        return None
    if dxp is None:
        return x.new_zeros((T, K))
    flat = dxp.view(U * L, K)
    if pr.identity:                                   # rows already grouped, no padding: no scatter
        return flat.to(x.dtype)
    dx = torch.zeros((T, K), dtype=xp.dtype)
    dx.index_copy_(0, pr.rows, flat if pr.keep is None else flat.index_select(0, pr.keep))
    return dx.to(x.dtype)


def padded_backward_applies(meta: LoRABatchMeta, R: int, K: int, N: int) -> bool:
    """Whether :func:`add_lora_backward_padded` is the CPU strategy for this batch."""
    return meta.device.type == "cpu" and meta.num_tokens > 0 and _cpu_strategy(meta, R, K, N) == "padded"


def weight_grads(p_list: Sequence[torch.Tensor], q_list: Sequence[torch.Tensor], scalings: torch.Tensor,
                 ranks_list: Sequence[Optional[torch.Tensor]], meta: LoRABatchMeta, rank_on_p: bool,
                 out_list: Sequence[torch.Tensor]) -> None:
    """``out_i[s] += scalings[s] * P_i[rows of s].T @ Q_i[rows of s]`` below the rank (see above).

    p_list[i] [T, P_i], q_list[i] [T, Q_i] (any float dtype, any strides); ranks_list[i] [S] or
    None; out_list[i] [S, P_i, Q_i] float32 (float64 for float64 inputs; any strides; the caller
    zero-fills it)."""
    todo = [k for k, (P, Q) in enumerate(zip(p_list, q_list)) if P.shape[1] and Q.shape[1]]
    if meta.num_tokens == 0 or meta.num_slots == 0 or not todo:
        return
    args = ([p_list[k] for k in todo], [q_list[k] for k in todo], scalings, [ranks_list[k] for k in todo],
            meta, rank_on_p, [out_list[k] for k in todo])
    P0, Q0 = args[0][0], args[1][0]
    R = P0.shape[1] if rank_on_p else Q0.shape[1]
    how = _strategy(meta, R, (Q0 if rank_on_p else P0).shape[1], 0)
    if how == "gather":
        _wgrad_gather(*args)
    elif how == "padded":
        _wgrad_padded(*args)
    else:
        _wgrad_segment(*args)
