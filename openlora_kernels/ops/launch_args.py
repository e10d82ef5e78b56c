"""How the kernel backends lay out their arguments: the pieces all three bridges need.

Shared by ``cpu_ext.py``, ``triton_sgmv.py`` and ``cuda_ext.py`` (imports neither triton nor the
GPU). Strides are in elements, as torch reports them.
"""
from __future__ import annotations

import itertools
from typing import List, Optional, Sequence, Tuple

import torch

# dtype codes of the compiled bindings (csrc/cpu/sgmv_cpu.h and csrc/include/openlora/params.h)
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def rank_strides(ranks: Optional[torch.Tensor]) -> Tuple[int, int]:
    """(stride over slices, stride over slots) of ranks given as [S] (shared by every slice: 0) or [n, S]."""
    if ranks is None:
        return 0, 0
    return (0, ranks.stride(0)) if ranks.dim() == 1 else (ranks.stride(0), ranks.stride(1))


def slice_columns(b_list: Sequence[torch.Tensor]) -> List[int]:
    """First column of each slice in y: the running sum of the slices' widths N_i."""
    return [0, *itertools.accumulate(B.shape[1] for B in b_list)][:len(b_list)]


def same_strides(tensors: Sequence[torch.Tensor], dims: Sequence[int]) -> List[torch.Tensor]:
    """The kernels take one set of strides for all slices along ``dims``: the tensors as they are
    when they already share them, else contiguous copies."""
    ref = [tensors[0].stride(d) for d in dims]
    if all([t.stride(d) for d in dims] == ref for t in tensors):
        return list(tensors)
    return [t.contiguous() for t in tensors]


def slice_groups(n: int, per_launch: int) -> List[Tuple[int, int]]:
    """(first slice, count) of each launch for n slices, at most ``per_launch`` per launch."""
    return [(b, min(per_launch, n - b)) for b in range(0, n, per_launch)]
