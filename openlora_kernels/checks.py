"""Value checks that need to read tensor contents (slot indices, ranks), and the debug switch.

Shape/dtype/device checks are free and always on (see ``ops/api.py``). Checks of *values*
need the data on the host: on CPU tensors that costs nothing and they always run; on GPU
tensors they force a host synchronisation, so they only run when debug checks are on::

    import openlora_kernels as olk
    olk.set_debug_checks(True)          # or OPENLORA_DEBUG_CHECKS=1 in the environment

With checks off, GPU kernels still never read or write out of bounds: out-of-range slot
indices are treated as "no adapter" (-1) and ranks are clamped to [0, R].
"""
from __future__ import annotations

import os
import weakref

import torch

_debug_checks = os.environ.get("OPENLORA_DEBUG_CHECKS", "0").lower() in ("1", "true", "yes", "on")


def set_debug_checks(enabled: bool) -> bool:
    """Turn value checks on GPU tensors on or off; returns the previous setting."""
    global _debug_checks
    previous, _debug_checks = _debug_checks, bool(enabled)
    return previous


def debug_checks_enabled() -> bool:
    return _debug_checks


def _must_check(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" or _debug_checks


def check_slot_indices(indices: torch.Tensor, num_slots: int, name: str = "indices") -> None:
    """Raise IndexError if any index is outside [-1, num_slots)."""
    if indices.numel() == 0 or not _must_check(indices):
        return
    bad = (indices < -1) | (indices >= num_slots)
    if bool(bad.any()):
        pos = int(torch.argmax(bad.to(torch.int8)))
        raise slot_index_error(indices, pos, num_slots, name)


def slot_index_error(indices: torch.Tensor, pos: int, num_slots: int, name: str = "indices") -> IndexError:
    """The IndexError for the out-of-range index at position ``pos`` (the first one)."""
    val = int(indices[pos])
    return IndexError(
        f"{name}: value {val} at position {pos} is out of range for {num_slots} adapter slots "
        f"(valid values are -1 for 'no adapter' and 0..{num_slots - 1})"
    )


# ranks tensors already checked, with the version counter they had then: a layer passes the same
# ranks every forward, and re-reading them would cost two reductions per layer and call.
# id(tensor) -> (weak reference, version, data_ptr, R); the weak reference tells a recycled id apart.
_ranks_ok: dict = {}
_RANKS_OK_MAX = 4096


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:   # inference tensors have no version counter: check every time
        return None


def check_ranks(ranks: torch.Tensor, max_rank: int, name: str = "ranks") -> None:
    """Raise ValueError if any rank is negative or above the stacked rank R.

    A tensor that passed is not re-read until it is modified in place (its version changes)."""
    if ranks.numel() == 0 or not _must_check(ranks):
        return
    version = _version(ranks)
    seen = _ranks_ok.get(id(ranks))
    if (version is not None and seen is not None and seen[0]() is ranks
            and seen[1:] == (version, ranks.data_ptr(), max_rank)):
        return
    lo, hi = int(ranks.min()), int(ranks.max())
    if lo < 0:
        raise ValueError(f"{name}: ranks must be >= 0, got {lo}")
    if hi > max_rank:
        raise ValueError(
            f"{name}: rank {hi} exceeds the stacked rank R={max_rank} of lora_a/lora_b "
            f"(ranks above R are rejected)"
        )
    if version is not None:
        if len(_ranks_ok) >= _RANKS_OK_MAX:
            _ranks_ok.clear()
        _ranks_ok[id(ranks)] = (weakref.ref(ranks), version, ranks.data_ptr(), max_rank)


# ------------------------------------------------------------------------- batch metadata

# Tensor sets whose contents are known to be consistent: what the build op returned, or what
# passed check_batch_meta. The custom ops rebuild a LoRABatchMeta from the four tensors on every
# call (torch.compile), so the verdict is also kept per tensor set, not only per object.
# id(tile_info) -> (weak references to the four tensors, their versions, block_m)
_meta_ok: dict = {}
_META_OK_MAX = 4096
# The verdict on one metadata object: this attribute in its __dict__ (a one-lookup test that a
# layer's call can make inline; set with the object's memo of the same name).
META_OK_ATTR = "_checked_ok"


def _meta_record(tensors, block_m: int):
    return tuple(weakref.ref(t) for t in tensors), tuple(_version(t) for t in tensors), block_m


def trust_batch_meta_tensors(tensors, block_m: int) -> None:
    """Record (token_slots, sorted_tokens, seg_info, tile_info) as consistent (the metadata build
    calls this for what it returns): metadata objects made from exactly these tensors, unmodified,
    are not re-read by :func:`check_batch_meta`."""
    if len(_meta_ok) >= _META_OK_MAX:
        _meta_ok.clear()
    _meta_ok[id(tensors[3])] = _meta_record(tensors, block_m)


def _trusted(tensors, block_m: int) -> bool:
    rec = _meta_ok.get(id(tensors[3]))
    if rec is None or rec[2] != block_m:
        return False
    refs, versions, _ = rec
    return (all(r() is t for r, t in zip(refs, tensors))
            and all(v is None or v == _version(t) for v, t in zip(versions, tensors)))


def mark_batch_meta_ok(meta) -> None:
    """Memoise on ``meta`` that its contents are consistent (build_batch_meta: true by construction)."""
    meta.memo("checks.batch_meta", lambda: True)
    object.__setattr__(meta, META_OK_ATTR, True)


def check_batch_meta(meta) -> None:
    """Raise ValueError naming the field when the contents of a :class:`LoRABatchMeta` are
    inconsistent: token_slots outside [-1, S); sorted_tokens not a permutation of the rows that
    groups them by slot (rows without adapter last); seg_info not the (start, length) of each
    slot's group; tile_info with a slot outside [-1, S), a tile outside its slot's segment or
    longer than block_m, or tiles that do not cover every row with a slot exactly once.

    Runs on CPU metadata always and on GPU metadata only with debug checks on (it reads the
    data: a host sync). The verdict is memoised on the metadata object (``meta.memo``) and on its
    four tensors, so every layer of a forward pays a dictionary lookup. Metadata from
    :func:`~openlora_kernels.build_batch_meta` is consistent by construction and not re-read.
    Without the check (GPU, debug off) the kernels still never read or write out of bounds.
    """
    if META_OK_ATTR in meta.__dict__:
        return
    if not _must_check(meta.token_slots):
        return
    tensors = meta.tensors()
    if not _trusted(tensors, meta.block_m):
        _check_meta_values(meta)
        trust_batch_meta_tensors(tensors, meta.block_m)
    mark_batch_meta_ok(meta)


def _first(bad: torch.Tensor) -> int:
    return int(torch.argmax(bad.to(torch.int8)))


def _check_meta_values(meta) -> None:
    i64 = torch.int64
    S, bm = int(meta.num_slots), int(meta.block_m)
    slots = meta.token_slots.to(i64)
    order = meta.sorted_tokens.to(i64)
    seg = meta.seg_info.to(i64)
    tiles = meta.tile_info.to(i64)
    T = slots.shape[0]
    dev = slots.device

    bad = (slots < -1) | (slots >= S)
    if bool(bad.any()):
        p = _first(bad)
        raise ValueError(f"LoRABatchMeta.token_slots: value {int(slots[p])} at row {p} is outside [-1, {S}) "
                         f"(-1 = no adapter, 0..{S - 1} a slot)")

    bad = (order < 0) | (order >= T)
    if bool(bad.any()):
        p = _first(bad)
        raise ValueError(f"LoRABatchMeta.sorted_tokens: value {int(order[p])} at position {p} is not a row "
                         f"index in [0, {T})")
    seen = torch.zeros(T, dtype=i64, device=dev).scatter_add_(0, order, torch.ones_like(order))
    if T and bool((seen != 1).any()):
        r = _first(seen != 1)
        raise ValueError(f"LoRABatchMeta.sorted_tokens: not a permutation of the {T} rows "
                         f"(row {r} appears {int(seen[r])} times)")
    key = torch.where(slots >= 0, slots, S).index_select(0, order)       # slot of each sorted position
    if T > 1 and bool((key[1:] < key[:-1]).any()):
        p = _first(key[1:] < key[:-1]) + 1
        raise ValueError(f"LoRABatchMeta.sorted_tokens: rows are not grouped by slot (position {p} holds row "
                         f"{int(order[p])} of slot {int(key[p])} after a row of slot {int(key[p - 1])}; "
                         "rows without adapter come last)")

    counts = torch.zeros(S + 1, dtype=i64, device=dev).scatter_add_(0, key, torch.ones_like(key))[:S]
    starts = torch.cumsum(counts, 0) - counts
    bad = seg[1] != counts
    if bool(bad.any()):
        s = _first(bad)
        raise ValueError(f"LoRABatchMeta.seg_info: slot {s} has segment length {int(seg[1, s])}, but "
                         f"{int(counts[s])} rows have that slot")
    bad = (counts > 0) & (seg[0] != starts)
    if bool(bad.any()):
        s = _first(bad)
        raise ValueError(f"LoRABatchMeta.seg_info: slot {s}'s segment starts at {int(seg[0, s])}, but its rows "
                         f"are at sorted positions {int(starts[s])}..{int(starts[s] + counts[s]) - 1}")

    tslot, tstart, tend = tiles[0], tiles[1], tiles[2]
    bad = (tslot < -1) | (tslot >= S)
    if bool(bad.any()):
        g = _first(bad)
        raise ValueError(f"LoRABatchMeta.tile_info: tile {g} names slot {int(tslot[g])}, outside [-1, {S}) "
                         "(-1 = unused tile)")
    valid = tslot >= 0
    ts = tslot.clamp(min=0)
    if S:
        lo, hi = starts.index_select(0, ts), (starts + counts).index_select(0, ts)
    else:
        lo = hi = torch.zeros_like(tslot)
    bad = valid & ((tstart >= tend) | (tend - tstart > bm) | (tstart < lo) | (tend > hi))
    if bool(bad.any()):
        g = _first(bad)
        s = int(tslot[g])
        raise ValueError(f"LoRABatchMeta.tile_info: tile {g} (slot {s}, sorted positions {int(tstart[g])} to "
                         f"{int(tend[g])}) is not a non-empty run of at most block_m={bm} positions inside "
                         f"slot {s}'s segment [{int(lo[g])}, {int(hi[g])})")
    n_rows = int(counts.sum())
    covered = int(torch.where(valid, tend - tstart, 0).sum())
    if covered != n_rows:
        raise ValueError(f"LoRABatchMeta.tile_info: the tiles cover {covered} sorted positions, but {n_rows} "
                         "rows have a slot (each must be in exactly one tile)")
    if covered:
        st = tstart[valid]
        en = tend[valid]
        idx = torch.argsort(st)
        st, en = st[idx], en[idx]
        if st.numel() > 1 and bool((st[1:] < en[:-1]).any()):
            raise ValueError("LoRABatchMeta.tile_info: two tiles overlap (each row with a slot must be in "
                             "exactly one tile)")
