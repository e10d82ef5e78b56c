"""Bytes each launch plan moves, next to the roofline's minimum (benchmarks/roofline.py).

A launch plan's bytes are what its programs request from device memory (global loads and stores,
each element of a tile counted once per program that touches it), whether L2 then serves them
or not: re-reading a weight once per program is what a plan costs in memory traffic and what the
issue's 1.25x criterion is about. Rows without adapter, entries beyond a slot's rank and masked
lanes are not counted (every kernel masks them out of its loads).

Notation as in roofline.py: T_a rows with an adapter; segment s (a distinct adapter) has len_s
rows and rank r_s; rho = sum r_s, sigma = sum len_s * r_s; n slices of widths N_i; b bytes per
element of x, y, A, B; 4-byte fp32 intermediates.

Plans (``plan_bytes(plan, seg, ...)``):

* ``fused``: the Triton ``_sgmv_fused_kernel`` and the CUDA ``sgmv_simt_kernel`` (fused): grid
  (tiles, chunks, slices); each program reads its tile's x rows and the slot's whole A (the
  shrink, recomputed per column chunk), then B and y for its chunk. A slot with len_s rows has
  ceil(len_s / block_m) tiles. So: x n*chunks times, A tiles*chunks times, B tiles times.
* ``split``: shrink then expand (the prefill route, Triton and CUDA): h zero-filled, the shrink
  (grid tiles x rank chunks x slices x split-K) reads x once per rank chunk and slice, A once per
  tile; writes h (fp32 atomics when split-K: a read and a write per add); the expand (tiles x
  column blocks x slices) reads h once per column block, B once per tile, y once.
* ``segment``: the decode plan of ops/triton_segment.py (docs/kernels.md, "The segment decode
  plan"): launch 1, grid (slots, K splits): a program loads x's K-chunk of each row of its segment
  once and every slice's A[slot, :r, K-chunk] once per BLOCK_M rows, and adds its partial h (fp32
  atomics into a zero-filled [n, T, R] h; one K split: a plain store, no zero fill); launch 2,
  grid (slots, column chunks, slices): a program holds BLOCK_M of its segment's h rows in
  registers and walks its chunk's B sub-tiles once per BLOCK_M rows, updating y. With segments
  of at most BLOCK_M rows x, A, B and y move once; h costs the zero fill, 2 x 4 bytes per atomic
  add and one read per column chunk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

from benchmarks.roofline import LoRAProblem, op_bytes


@dataclass(frozen=True)
class Segments:
    """A decode batch as the kernels see it: per distinct adapter (rows, rank)."""

    segs: Tuple[Tuple[int, int], ...]     # (len_s, r_s) per distinct adapter with rows
    T: int                                # rows of the batch (with or without adapter)
    K: int
    widths: Tuple[int, ...]
    R: int                                # stacked rank (the pool's)
    b: int = 2

    @property
    def T_a(self) -> int:
        return sum(n for n, _ in self.segs)

    def problem(self) -> LoRAProblem:
        return LoRAProblem(T=self.T, T_active=self.T_a, K=self.K, widths=self.widths,
                           rank_sum=sum(r for _, r in self.segs), row_rank_sum=sum(n * r for n, r in self.segs),
                           R=self.R, distinct=len(self.segs), elem_bytes=self.b)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def plan_bytes(plan: str, p: Segments, *, block_m: int = 1, chunks: Sequence[int] = (), rank_block: int = 64,
               col_block: int = 64, split_k: int = 1, k_split_elems: int = 0, seg_chunk_cols: int = 1024,
               seg_block_m: int = 64) -> Dict[str, int]:
    """Bytes by tensor (x, A, B, y, h) and their total for one add_lora call under ``plan``.

    ``chunks``: per slice, the fused plan's column chunks (default 1 each); ``rank_block`` /
    ``col_block`` / ``split_k``: the split plan's BLOCK_R, BLOCK_N and SPLIT_K;
    ``k_split_elems`` / ``seg_chunk_cols`` / ``seg_block_m``: the segment plan's K per split, columns
    per chunk (0: the whole K) and rows per step (ops/configs.py, kind "segment": K_SPAN, COLS, BLOCK_M)."""
    b, K, n, N = p.b, p.K, len(p.widths), sum(p.widths)
    chunks = list(chunks) or [1] * n
    out = {"x": 0, "A": 0, "B": 0, "y": 0, "h": 0}
    if plan == "fused":
        for Ni, ch in zip(p.widths, chunks):
            for ln, r in p.segs:
                tiles = _cdiv(ln, block_m)
                out["x"] += ch * b * ln * K
                out["A"] += tiles * ch * b * r * K
                out["B"] += tiles * b * r * Ni
                out["y"] += 2 * b * ln * Ni
    elif plan == "split":
        out["h"] += 4 * n * p.T * p.R                                     # zero fill
        for Ni in p.widths:
            for ln, r in p.segs:
                tiles = _cdiv(ln, block_m)
                rchunks = _cdiv(r, rank_block)
                out["x"] += rchunks * b * ln * K
                out["A"] += tiles * b * r * K
                out["h"] += 4 * ln * r * (2 * split_k if split_k > 1 else 1)  # store, or atomic read + write
                out["h"] += 4 * ln * r * _cdiv(Ni, col_block)                 # the expand's reads
                out["B"] += tiles * b * r * Ni
                out["y"] += 2 * b * ln * Ni
    elif plan == "segment":
        splits = _cdiv(K, k_split_elems) if k_split_elems > 0 else 1      # 0: the whole K per program
        if splits > 1:
            out["h"] += 4 * n * p.T * p.R                                 # zero fill (atomics follow)
        for ln, r in p.segs:
            steps = _cdiv(ln, seg_block_m)                                 # row steps of the segment
            out["x"] += b * ln * K                                         # once: all slices per program
            for Ni in p.widths:
                out["A"] += steps * b * r * K
                out["h"] += (8 * splits if splits > 1 else 4) * ln * r    # atomic adds (read + write), or a store
                out["h"] += 4 * ln * r * _cdiv(Ni, seg_chunk_cols)        # h rows, once per column chunk
                out["B"] += steps * b * r * Ni
                out["y"] += 2 * b * ln * Ni
    else:
        raise ValueError(f"plan: unknown plan {plan!r}; expected fused, split or segment")
    out["total"] = sum(out.values())
    return out


def fused_block_n(block_m: int, K: int, widths: Sequence[int], R: int, dtype: str = "bfloat16") -> int:
    """BLOCK_N of the Triton fused kernel's GPU heuristic configuration (ops/configs.py)."""
    import torch

    from openlora_kernels.ops import configs
    return configs.heuristic_config("fused", block_m=block_m, K=K, N=sum(widths), R=R, n_slices=len(widths),
                                    dtype=getattr(torch, dtype))["BLOCK_N"]


def fused_chunks(G: int, widths: Sequence[int], sms: int = 132, block_n: int = 64) -> Tuple[int, ...]:
    """The Triton fused launcher's column chunks per slice group (N_CHUNKS = 0: ~4 programs per SM)."""
    n_tiles = _cdiv(max(widths), block_n)
    chunks = max(1, min(_cdiv(4 * sms, G * len(widths)), n_tiles))
    per = _cdiv(n_tiles, chunks)
    return tuple([_cdiv(n_tiles, per)] * len(widths))


def headline_shapes():
    """(name, Segments) of the headline decode shapes: T = 1..64 rows over U = 1..64 distinct
    adapters (rows spread evenly) of r = 16 and 64; K = N = 4096, and QKV 4096 -> 4096/1024/1024."""
    for widths in ((4096,), (4096, 1024, 1024)):
        for r in (16, 64):
            for T in (1, 8, 32, 64):
                for U in sorted({1, min(T, 8), T}):
                    base, extra = divmod(T, U)
                    segs = tuple((base + (1 if i < extra else 0), r) for i in range(U))
                    yield f"T={T} U={U} r={r} N={'/'.join(map(str, widths))}", Segments(segs, T, 4096, widths, max(r, 64))


def ratio(plan: str, p: Segments, **kw) -> float:
    """plan bytes / roofline bytes of add_lora."""
    return plan_bytes(plan, p, **kw)["total"] / op_bytes("add_lora", p.problem())


def table() -> str:
    """Markdown: the headline shapes, roofline MB and each plan's ratio (fused with the launcher's
    chunks at block_m 1 and 4; segment)."""
    lines = ["| shape | roofline (MB) | fused bm=1 | fused bm=4 | segment |", "|---|---|---|---|---|"]
    for name, p in headline_shapes():
        rf = op_bytes("add_lora", p.problem()) / 1e6
        f1 = ratio("fused", p, block_m=1,
                   chunks=fused_chunks(p.T_a, p.widths, block_n=fused_block_n(1, p.K, p.widths, p.R)))
        g4 = sum(math.ceil(ln / 4) for ln, _ in p.segs)
        f4 = ratio("fused", p, block_m=4,
                   chunks=fused_chunks(g4, p.widths, block_n=fused_block_n(4, p.K, p.widths, p.R)))
        sg = ratio("segment", p)
        lines.append(f"| {name} | {rf:.2f} | {f1:.2f}x | {f4:.2f}x | {sg:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
