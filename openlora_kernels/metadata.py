"""Batch metadata: built once per forward from the per-token slot indices, shared by every layer.

Design
------
A multi-LoRA batch assigns each of its T rows (tokens) a slot s in [0, S) of the stacked
adapter weights, or -1 for "no adapter". The kernels want the rows grouped by slot so that a
program can load one adapter's weights once and apply them to a tile of rows. This module turns
the index vector into that grouping, on the device, with fixed-size outputs and no host
synchronisation, so the whole forward (metadata included) can be captured in a CUDA graph:

    token_slots   [T]     int32  the sanitised slot of each row: out-of-range values become -1
    sorted_tokens [T]     int32  row ids stably sorted by slot; rows without adapter come last
    seg_info      [2, S]  int32  (start, length) of each slot's segment inside sorted_tokens
    tile_info     [3, G]  int32  (slot or -1, start, end) of each tile of at most ``block_m``
                                 rows of one segment; G = max tiles any batch of T rows over S
                                 slots can need, so the kernels launch a fixed grid of G programs
                                 and the unused ones exit at once.

``block_m`` (rows per tile) is a property of the batch, not of a layer: 1, 2 or 4 for
decode-like batches (the kernels then use CUDA-core dot products and never waste a 16-row
tensor-core tile on a one-token segment), 16 to 64 for prefill-like batches (tensor cores).
:func:`choose_block_m` picks it from T and S alone (no data inspection, so no sync).

Example::

    >>> import torch, openlora_kernels as olk
    >>> meta = olk.build_batch_meta(torch.tensor([2, -1, 0, 2]), num_slots=3, block_m=1)
    >>> meta.sorted_tokens.tolist(), meta.seg_len.tolist()
    ([2, 0, 3, 1], [1, 0, 2])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch

from .checks import check_slot_indices, mark_batch_meta_ok, slot_index_error, trust_batch_meta_tensors

# Rows per tile the kernels are written for. Values < TENSOR_CORE_MIN_M use CUDA-core
# dot products (a tensor-core MMA needs 16 rows); larger values use tl.dot / mma.
BLOCK_M_CHOICES = (1, 2, 4, 16, 32, 64)
TENSOR_CORE_MIN_M = 16


def choose_block_m(num_tokens: int, num_slots: int) -> int:
    """Rows per tile for a batch of ``num_tokens`` rows over ``num_slots`` slots.

    Uses only the two sizes, never the index values, so it needs no host sync. The expected
    segment length T / min(T, S) decides: decode batches (about one row per adapter) get 1-row
    tiles, prefill batches get tensor-core tiles.
    """
    active = max(1, min(num_slots, num_tokens))
    per_slot = num_tokens / active
    if per_slot < 1.5:
        return 1
    if per_slot < 3:
        return 2
    if per_slot < 8:
        return 4
    if per_slot < 48:
        return 16
    if per_slot < 128:
        return 32
    return 64


def max_tiles(num_tokens, num_slots, block_m: int):
    """Upper bound G on the number of tiles: sum_s ceil(len_s / bm) <= (T + U*(bm-1)) / bm,
    U = min(S, T) segments at most. Works with SymInts (torch.compile dynamic shapes)."""
    if block_m == 1:
        return num_tokens
    active = torch.sym_min(num_slots, num_tokens)
    return (num_tokens + active * (block_m - 1)) // block_m


@dataclass(frozen=True)
class LoRABatchMeta:
    """Per-forward grouping of rows by adapter slot (see the module docstring for the layout).

    Build it with :func:`build_batch_meta`; pass it wherever an op takes ``indices``.
    """

    token_slots: torch.Tensor
    sorted_tokens: torch.Tensor
    seg_info: torch.Tensor
    tile_info: torch.Tensor
    num_slots: int
    block_m: int

    def __post_init__(self) -> None:
        # Structural checks only (static tensor properties: no data read, no sync, traceable by
        # torch.compile): what every kernel relies on to index the four tensors. Their CONTENTS
        # are checked by checks.check_batch_meta (CPU always, GPU in debug mode), and whatever
        # they hold no kernel reads or writes out of bounds (docs/kernels.md).
        _check_structure(self)

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]

    @property
    def num_tiles(self) -> int:
        return self.tile_info.shape[1]

    @property
    def device(self) -> torch.device:
        return self.token_slots.device

    @property
    def seg_start(self) -> torch.Tensor:
        return self.seg_info[0]

    @property
    def seg_len(self) -> torch.Tensor:
        return self.seg_info[1]

    @property
    def tile_slot(self) -> torch.Tensor:
        return self.tile_info[0]

    @property
    def tile_start(self) -> torch.Tensor:
        return self.tile_info[1]

    @property
    def tile_end(self) -> torch.Tensor:
        return self.tile_info[2]

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The four device tensors, in the order the custom ops take them."""
        return self.token_slots, self.sorted_tokens, self.seg_info, self.tile_info

    def memo(self, key: str, build: Callable[[], Any]) -> Any:
        """``build()`` once per metadata object, then the cached value: derived data that a
        backend would otherwise recompute in every layer of the forward (e.g. the CPU path's
        one-hot row/slot matrix). Not part of equality; never used on the sync-free GPU path."""
        cache = self.__dict__.get("_memo")
        if cache is None:
            cache = {}
            object.__setattr__(self, "_memo", cache)
        if key not in cache:
            cache[key] = build()
        return cache[key]


def _check_structure(meta: "LoRABatchMeta") -> None:
    """The structural checks of __post_init__: one boolean expression in the usual case (a few
    microseconds: the custom ops rebuild the object on every call), the detailed checks that name
    the field only when it fails."""
    ts, st, seg, ti = meta.token_slots, meta.sorted_tokens, meta.seg_info, meta.tile_info
    S, bm, i32 = meta.num_slots, meta.block_m, torch.int32
    try:
        ok = (ts.dtype is i32 and st.dtype is i32 and seg.dtype is i32 and ti.dtype is i32
              and ts.dim() == 1 and st.dim() == 1 and seg.dim() == 2 and ti.dim() == 2
              and type(S) is int and S >= 0 and type(bm) is int and bm in BLOCK_M_CHOICES
              and st.shape[0] == ts.shape[0] and seg.shape[0] == 2 and seg.shape[1] == S and ti.shape[0] == 3
              and ts.is_contiguous() and st.is_contiguous() and seg.is_contiguous() and ti.is_contiguous()
              and ((ts.is_cpu and st.is_cpu and seg.is_cpu and ti.is_cpu)
                   or ts.device == st.device == seg.device == ti.device))
    except AttributeError:           # not a tensor: the detailed checks name it
        ok = False
    if not ok:
        _check_structure_detailed(meta)


def _check_structure_detailed(meta: "LoRABatchMeta") -> None:
    fields = (("token_slots", meta.token_slots, 1), ("sorted_tokens", meta.sorted_tokens, 1),
              ("seg_info", meta.seg_info, 2), ("tile_info", meta.tile_info, 2))
    for name, t, dims in fields:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"LoRABatchMeta.{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise TypeError(f"LoRABatchMeta.{name}: expected dtype int32, got {t.dtype}")
        if t.dim() != dims:
            raise ValueError(f"LoRABatchMeta.{name}: expected a {dims}-D tensor, got shape {tuple(t.shape)}")
    S, bm = meta.num_slots, meta.block_m
    if not isinstance(S, (int, torch.SymInt)) or isinstance(S, bool) or S < 0:
        raise ValueError(f"LoRABatchMeta.num_slots: expected a non-negative int, got {S!r}")
    if not isinstance(bm, int) or isinstance(bm, bool) or bm not in BLOCK_M_CHOICES:
        raise ValueError(f"LoRABatchMeta.block_m: expected one of {BLOCK_M_CHOICES}, got {bm!r}")
    T = meta.token_slots.shape[0]
    if meta.sorted_tokens.shape[0] != T:
        raise ValueError(f"LoRABatchMeta.sorted_tokens: expected shape [{T}] (token_slots has {T} rows), "
                         f"got {tuple(meta.sorted_tokens.shape)}")
    if meta.seg_info.shape[0] != 2 or meta.seg_info.shape[1] != S:
        raise ValueError(f"LoRABatchMeta.seg_info: expected shape [2, {S}] (start, length per slot; "
                         f"num_slots={S}), got {tuple(meta.seg_info.shape)}")
    if meta.tile_info.shape[0] != 3:
        raise ValueError(f"LoRABatchMeta.tile_info: expected shape [3, G] (slot, start, end per tile), "
                         f"got {tuple(meta.tile_info.shape)}")
    device = meta.token_slots.device
    for name, t, _ in fields[1:]:
        if t.device != device:
            raise ValueError(f"LoRABatchMeta.{name}: on {t.device}, but token_slots is on {device} "
                             "(all four tensors must share one device)")
    for name, t, _ in fields:
        if not t.is_contiguous():
            raise ValueError(f"LoRABatchMeta.{name}: must be contiguous (the kernels index it densely)")


def build_batch_meta(indices: torch.Tensor, num_slots: int, *, block_m: Optional[int] = None) -> LoRABatchMeta:
    """Build the batch metadata from per-row slot indices ([T] int32/int64, -1 = no adapter).

    Runs on ``indices.device`` with no host synchronisation (safe inside CUDA-graph capture and
    torch.compile). On CPU tensors, indices outside [-1, num_slots) raise IndexError; on GPU
    that check needs a sync and only runs with :func:`openlora_kernels.set_debug_checks`; without
    it such rows are treated as -1.
    """
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices: expected a torch.Tensor, got {type(indices).__name__}")
    if indices.dim() != 1:
        raise ValueError(f"indices: expected a 1-D tensor [T], got shape {tuple(indices.shape)}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices: expected dtype int32 or int64, got {indices.dtype}")
    if not isinstance(num_slots, int) or isinstance(num_slots, bool) or num_slots < 0:
        raise ValueError(f"num_slots: expected a non-negative int, got {num_slots!r}")
    if block_m is None:
        block_m = choose_block_m(indices.shape[0], num_slots)
    elif block_m not in BLOCK_M_CHOICES:
        raise ValueError(f"block_m: expected one of {BLOCK_M_CHOICES}, got {block_m!r}")
    if torch.compiler.is_compiling():
        parts = torch.ops.openlora.build_batch_meta(indices, num_slots, block_m)
        return LoRABatchMeta(*parts, num_slots=num_slots, block_m=block_m)
    # eager: skip the custom-op dispatch (tens of microseconds), same code
    meta = LoRABatchMeta(*_build_checked(indices, num_slots, block_m), num_slots=num_slots, block_m=block_m)
    mark_batch_meta_ok(meta)     # consistent by construction: checks.check_batch_meta need not read it
    return meta


# --------------------------------------------------------------------------------------------
# The build, registered as a custom op: opaque to torch.compile (the CPU range check is
# data-dependent and would otherwise break fullgraph tracing), with a fake implementation that
# gives the fixed output shapes.
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("openlora::build_batch_meta", mutates_args=())
def _build_batch_meta_op(
    indices: torch.Tensor, num_slots: int, block_m: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    parts = _build_checked(indices, num_slots, block_m)
    trust_batch_meta_tensors(parts, block_m)   # the ops' metadata rebuilt from these is not re-read
    return parts


# CPU batches up to this many rows are grouped in Python (the same result as _build_impl): a few
# list passes and four tensor constructions instead of ~40 tensor ops, whose dispatch dominates a
# small decode batch's metadata on the host.
SMALL_CPU_ROWS = 256


def _build_checked(indices: torch.Tensor, num_slots: int, block_m: int):
    if indices.is_cpu:
        native = _native_builder()
        if native is not None:
            return _build_native(native, indices, num_slots, block_m)
        if indices.shape[0] <= SMALL_CPU_ROWS:
            return _build_small_cpu(indices, num_slots, block_m)
    check_slot_indices(indices, num_slots)
    return _build_impl(indices, num_slots, block_m)


def _build_small_cpu(indices: torch.Tensor, num_slots: int, block_m: int):
    """_build_impl's result for a small CPU batch, computed on Python lists (with the range check
    of check_slot_indices: IndexError naming the first bad value)."""
    idx = indices.tolist()
    S, bm, T = num_slots, block_m, len(idx)
    for pos, v in enumerate(idx):
        if v < -1 or v >= S:
            check_slot_indices(indices, num_slots)       # raises, with its message
    slots = [v if v >= 0 else -1 for v in idx]
    i32 = torch.int32
    G = max_tiles(T, S, bm)
    if S == 0:
        tile = [[-1] * G, [0] * G, [0] * G]
        return (torch.tensor(slots, dtype=i32), torch.arange(T, dtype=i32), torch.zeros((2, 0), dtype=i32),
                torch.tensor(tile, dtype=i32).reshape(3, G))
    key = [v if v >= 0 else S for v in slots]
    order = sorted(range(T), key=key.__getitem__)          # stable
    counts = [0] * (S + 1)
    for k in key:
        counts[k] += 1
    starts, lens = [0] * S, counts[:S]
    acc = 0
    for s_ in range(S):
        starts[s_] = acc
        acc += lens[s_]
    t_slot, t_start, t_end = [-1] * G, [0] * G, [0] * G
    p = 0
    for s_ in range(S):
        n = lens[s_]
        if n:
            a, e = starts[s_], starts[s_] + n
            for b in range(a, e, bm):
                t_slot[p], t_start[p], t_end[p] = s_, b, min(b + bm, e)
                p += 1
    return (torch.tensor(slots, dtype=i32), torch.tensor(order, dtype=i32), torch.tensor([starts, lens], dtype=i32),
            torch.tensor([t_slot, t_start, t_end], dtype=i32).reshape(3, G))


_native_state: dict = {}


def _native_builder():
    """The native CPU extension's ``build_meta`` (a counting sort in C++: a few microseconds
    where the device ops below cost ~200 on a CPU), or None when the extension is not built."""
    if "fn" not in _native_state:
        try:
            from .ops import _cpu_sgmv  # type: ignore[attr-defined]
            _native_state["fn"] = getattr(_cpu_sgmv, "build_meta", None)
        except ImportError:
            _native_state["fn"] = None
    return _native_state["fn"]


def _build_native(build, indices: torch.Tensor, num_slots: int, block_m: int):
    """:func:`_build_impl`'s four tensors for CPU indices, by the native counting sort (the same
    values: a stable sort by slot, rows without adapter last, the same tile list), with the
    range check of checks.check_slot_indices (the same IndexError)."""
    T, S = indices.shape[0], num_slots
    G = max_tiles(T, S, block_m)
    if not indices.is_contiguous():
        indices = indices.contiguous()
    i32 = torch.int32
    ts, st = torch.empty(T, dtype=i32), torch.empty(T, dtype=i32)
    seg, ti = torch.empty((2, S), dtype=i32), torch.empty((3, G), dtype=i32)
    bad = build(indices.data_ptr(), indices.dtype is torch.int64, T, S, block_m, G,
                ts.data_ptr(), st.data_ptr(), seg.data_ptr(), ti.data_ptr())
    if bad >= 0:
        raise slot_index_error(indices, bad, num_slots)
    return ts, st, seg, ti


@_build_batch_meta_op.register_fake
def _(indices, num_slots, block_m):
    T = indices.shape[0]
    G = max_tiles(T, num_slots, block_m)
    new = indices.new_empty
    i32 = torch.int32
    return new((T,), dtype=i32), new((T,), dtype=i32), new((2, num_slots), dtype=i32), new((3, G), dtype=i32)


def _build_impl(indices: torch.Tensor, num_slots: int, block_m: int):
    dev = indices.device
    T, S, bm = indices.shape[0], num_slots, block_m
    G = max_tiles(T, S, bm)
    i32, i64 = torch.int32, torch.int64
    idx = indices.to(i64)
    valid = (idx >= 0) & (idx < S)
    token_slots = torch.where(valid, idx, -1).to(i32)
    if S == 0:
        tile_info = torch.zeros((3, G), dtype=i32, device=dev)
        tile_info[0].fill_(-1)
        return token_slots, torch.arange(T, dtype=i32, device=dev), torch.zeros((2, 0), dtype=i32, device=dev), tile_info
    # Rows without adapter go to bucket S, which sorts last and is not a segment.
    key = torch.where(valid, idx, S)
    order = torch.sort(key, stable=True).indices
    counts = torch.zeros(S + 1, dtype=i64, device=dev).scatter_add_(0, key, torch.ones_like(key))
    seg_len = counts[:S]
    seg_end = torch.cumsum(seg_len, 0)
    seg_start = seg_end - seg_len
    tiles = (seg_len + (bm - 1)) // bm
    tiles_end = torch.cumsum(tiles, 0)                        # tiles of slots 0..s
    p = torch.arange(G, dtype=i64, device=dev)
    tslot = torch.searchsorted(tiles_end, p, right=True)      # slot owning tile p (S = none)
    has = tslot < S
    ts = tslot.clamp(max=S - 1)
    start = seg_start[ts] + (p - (tiles_end[ts] - tiles[ts])) * bm
    end = torch.minimum(start + bm, seg_end[ts])
    tile_info = torch.stack(
        (torch.where(has, tslot, -1), torch.where(has, start, 0), torch.where(has, end, 0))
    ).to(i32)
    seg_info = torch.stack((seg_start, seg_len)).to(i32)
    return token_slots, order.to(i32), seg_info, tile_info
