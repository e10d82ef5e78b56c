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
        val = int(indices[pos])
        raise IndexError(
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
