"""Minimum bytes and flops of the multi-LoRA ops: the roofline every benchmark divides by.

Derivation
----------
Notation (one call of an op on one batch):

    T       rows of the batch; T_a of them have an adapter (slot != -1)
    K       input width (x is [T, K])
    N_i     width of output slice i, i = 1..n (n = 1, or 3 for a fused QKV); N = sum N_i
    U       distinct adapters among the rows; adapter u has rank r_u
    rho     = sum_u r_u, each distinct adapter counted ONCE (its weights are read once)
    sigma   = sum over rows t with an adapter of r_{s(t)}, each ROW counted (the arithmetic)
    R       stacked rank of the weight pool (lora_a is [S, R, K])
    b       bytes per element of x, y, A and B (2 for bf16 / fp16, 4 for fp32)
    b_h     bytes per element of the shrink output h (4: the contract makes h float32)

A perfect kernel moves each byte it needs through device memory once: it reads every input once
and writes every output once, and never touches what it does not need (rows without adapter,
adapters nobody uses, weight entries beyond an adapter's rank).

shrink   h[i, t, :r] = x[t] @ A_i[s(t), :r].T
    read x (rows with adapter)            b * T_a * K
    read A_i of each used adapter         n * b * rho * K
    write h                               b_h * n * T * R   (the contract returns the whole
                                          [n, T, R] float32 tensor, zeros included)
    flops                                 2 * n * sigma * K

expand   y[t, cols_i] += scale * h[i, t, :r] @ B_i[s(t), :, :r].T
    read the entries of h it needs        b_h * n * sigma
    read B_i of each used adapter         b * rho * N
    read and write y (rows with adapter)  2 * b * T_a * N
    flops                                 2 * sigma * N

add_lora (one fused pass: h never leaves the chip, so it costs no bytes)
    b * T_a * K + n * b * rho * K + b * rho * N + 2 * b * T_a * N
    flops                                 2 * sigma * (n * K + N)

With n = 1, every row holding an adapter and no intermediate these are the formulas of
shared/research/anchors.md ("The physical limit"): shrink b*T*K + b*R*K and expand b*R*N + 2*b*T*N
with R there the rank sum of the distinct adapters (rho here). Worked example of that page,
K = N = 4096, r = 16, 64 distinct adapters at decode, bf16: shrink reads 0.5 MB of x and 8 MB of A
("about 9 MB per op"); a 16k-token prefill reads 134 MB of x (shrink) and moves 268 MB of y
(expand). tests/test_benchmarks_smoke.py checks these numbers.

Why bytes, not flops: the arithmetic intensity is at most 2*sigma*K / (b*T_a*K) <= r for the
shrink (b = 2) and about r/2 for the expand, far below an H100's ridge point (~300 flop/byte), so
every op is memory-bound at every batch size and the floor is time = bytes / bandwidth, with the
bandwidth measured on the same GPU in the same run (common.measure_copy_bandwidth: a large
device-to-device copy, bytes read + written). Reported: achieved GB/s = bytes_min / t, and
% of roofline = (bytes_min / t) / measured bandwidth = roofline time / t.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

OPS = ("add_lora", "lora_shrink", "lora_expand")


@dataclass(frozen=True)
class LoRAProblem:
    """The sizes that decide the minimum traffic of one op call (see the module docstring)."""

    T: int                   # rows of the batch
    T_active: int            # rows with an adapter (T_a)
    K: int                   # input width
    widths: Tuple[int, ...]  # N_i of each output slice
    rank_sum: int            # rho: sum of ranks over the distinct adapters used
    row_rank_sum: int        # sigma: sum over rows with an adapter of their adapter's rank
    R: int                   # stacked rank of the pool
    distinct: int            # U: distinct adapters used
    elem_bytes: int = 2      # b
    h_bytes: int = 4         # b_h

    @property
    def n_slices(self) -> int:
        return len(self.widths)

    @property
    def N(self) -> int:
        return sum(self.widths)


def problem_from_batch(indices: Iterable[int], ranks: Sequence[int], K: int, widths: Sequence[int],
                       R: Optional[int] = None, elem_bytes: int = 2, h_bytes: int = 4) -> LoRAProblem:
    """Build a :class:`LoRAProblem` from per-row slot indices (-1 or out of range = no adapter)
    and the rank of each slot (``ranks[s]``, clamped to [0, R])."""
    idx = [int(i) for i in indices]
    S = len(ranks)
    R = max(ranks) if R is None else R
    rk = [max(0, min(int(r), R)) for r in ranks]
    active = [i for i in idx if 0 <= i < S]
    used = set(active)
    return LoRAProblem(T=len(idx), T_active=len(active), K=int(K), widths=tuple(int(w) for w in widths),
                       rank_sum=sum(rk[s] for s in used), row_rank_sum=sum(rk[s] for s in active),
                       R=int(R), distinct=len(used), elem_bytes=elem_bytes, h_bytes=h_bytes)


def op_bytes(op: str, p: LoRAProblem) -> int:
    """Minimum bytes one call of ``op`` must move through device memory."""
    b, n = p.elem_bytes, p.n_slices
    if op == "lora_shrink":
        return b * p.T_active * p.K + n * b * p.rank_sum * p.K + p.h_bytes * n * p.T * p.R
    if op == "lora_expand":
        return p.h_bytes * n * p.row_rank_sum + b * p.rank_sum * p.N + 2 * b * p.T_active * p.N
    if op == "add_lora":
        return b * p.T_active * p.K + n * b * p.rank_sum * p.K + b * p.rank_sum * p.N + 2 * b * p.T_active * p.N
    raise ValueError(f"op: unknown op {op!r}; expected one of {OPS}")


def op_flops(op: str, p: LoRAProblem) -> int:
    """Useful floating-point operations of one call (multiply-adds count 2)."""
    shrink = 2 * p.n_slices * p.row_rank_sum * p.K
    expand = 2 * p.row_rank_sum * p.N
    if op == "lora_shrink":
        return shrink
    if op == "lora_expand":
        return expand
    if op == "add_lora":
        return shrink + expand
    raise ValueError(f"op: unknown op {op!r}; expected one of {OPS}")


def roofline_time_s(nbytes: float, bandwidth_gbps: float) -> float:
    """Time to move ``nbytes`` at ``bandwidth_gbps`` (GB/s, 1e9 bytes per second)."""
    return nbytes / (bandwidth_gbps * 1e9)


def achieved_gbps(nbytes: float, time_s: float) -> float:
    return nbytes / time_s / 1e9


def pct_of_roofline(nbytes: float, time_s: float, bandwidth_gbps: float) -> float:
    """(bytes_min / t) / measured bandwidth, in percent (= roofline time / t)."""
    return 100.0 * achieved_gbps(nbytes, time_s) / bandwidth_gbps


def summary(op: str, p: LoRAProblem, time_s: float, bandwidth_gbps: float) -> Dict[str, float]:
    """bytes, flops, roofline time (µs), achieved GB/s and % of roofline of one timed call."""
    nb = op_bytes(op, p)
    return {"bytes_min": nb, "flops": op_flops(op, p),
            "roofline_us": roofline_time_s(nb, bandwidth_gbps) * 1e6,
            "gbps": achieved_gbps(nb, time_s), "pct_roofline": pct_of_roofline(nb, time_s, bandwidth_gbps)}
