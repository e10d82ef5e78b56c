"""torch.library custom ops: ``openlora::add_lora``, ``openlora::lora_shrink``, ``openlora::lora_expand``.

They take already-validated arguments (see ``api.py``) and a concrete backend name, so
torch.compile sees one opaque op per call (fake implementations give output shapes; the mutated
``y`` is declared) and CUDA-graph capture records whatever the backend launches. Value checks
that read tensor contents (metadata consistency, ranks <= R) run inside the real implementations: always on CPU,
with debug checks on GPU (``checks.py``).

Backends are imported on first use, so importing the package never imports triton or touches a GPU.

In eager mode ``api.py`` calls the ``run_*`` functions below directly: they are exactly what the
ops run, minus the custom-op dispatch, which costs tens of microseconds per call in Python (as
much as a whole small LoRA layer on the CPU). Under torch.compile the ops are called.
"""
from __future__ import annotations

import importlib
from typing import List, Optional

import torch

from ..checks import check_batch_meta, check_ranks
from ..metadata import LoRABatchMeta

_BACKEND_MODULES = {"torch": "torch_ref", "cpu": "cpu_ext", "triton": "triton_sgmv", "cuda": "cuda_ext"}


_loaded = {}


def backend_module(name: str):
    mod = _loaded.get(name)
    if mod is None:
        mod = _loaded[name] = importlib.import_module(f"{__package__}.{_BACKEND_MODULES[name]}")
    return mod


def _meta(token_slots, sorted_tokens, seg_info, tile_info, num_slots: int, block_m: int, rows: int) -> LoRABatchMeta:
    """The metadata object of an op call (its structure is checked in __post_init__, a few
    attribute compares); ``rows``: the T of x / y, which the metadata must cover."""
    meta = LoRABatchMeta(token_slots, sorted_tokens, seg_info, tile_info, num_slots=num_slots, block_m=block_m)
    if meta.num_tokens != rows:
        raise ValueError(f"indices: the batch metadata covers {meta.num_tokens} rows, but x/y have {rows}")
    return meta


# The value checks (metadata contents, ranks <= R) run here, before the backend: on CPU always,
# on GPU in debug mode; each memoises its verdict, so a layer's call pays a lookup.

def run_add_lora(y, x, lora_a, lora_b, scalings, ranks, meta: LoRABatchMeta, backend: str) -> None:
    check_batch_meta(meta)
    if ranks is not None:
        check_ranks(ranks, lora_a[0].shape[1])
    backend_module(backend).add_lora(y, x, lora_a, lora_b, scalings, ranks, meta)


def run_shrink(x, lora_a, ranks, meta: LoRABatchMeta, backend: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out``: internal, an [n, T, R] float32 tensor (any strides) to write h into instead of a new one."""
    check_batch_meta(meta)
    if ranks is not None:
        check_ranks(ranks, lora_a[0].shape[1])
    return backend_module(backend).shrink(x, lora_a, ranks, meta, out=out)


def run_expand(y, h, lora_b, scalings, ranks, meta: LoRABatchMeta, backend: str) -> None:
    check_batch_meta(meta)
    if ranks is not None:
        check_ranks(ranks, lora_b[0].shape[2])
    backend_module(backend).expand(y, h, lora_b, scalings, ranks, meta)


@torch.library.custom_op("openlora::add_lora", mutates_args=("y",))
def add_lora_op(
    y: torch.Tensor, x: torch.Tensor, lora_a: List[torch.Tensor], lora_b: List[torch.Tensor],
    scalings: torch.Tensor, ranks: Optional[torch.Tensor],
    token_slots: torch.Tensor, sorted_tokens: torch.Tensor, seg_info: torch.Tensor, tile_info: torch.Tensor,
    block_m: int, backend: str,
) -> None:
    meta = _meta(token_slots, sorted_tokens, seg_info, tile_info, lora_a[0].shape[0], block_m, x.shape[0])
    run_add_lora(y, x, lora_a, lora_b, scalings, ranks, meta, backend)


@add_lora_op.register_fake
def _(y, x, lora_a, lora_b, scalings, ranks, token_slots, sorted_tokens, seg_info, tile_info, block_m, backend):
    return None


@torch.library.custom_op("openlora::lora_shrink", mutates_args=())
def lora_shrink_op(
    x: torch.Tensor, lora_a: List[torch.Tensor], ranks: Optional[torch.Tensor],
    token_slots: torch.Tensor, sorted_tokens: torch.Tensor, seg_info: torch.Tensor, tile_info: torch.Tensor,
    block_m: int, backend: str,
) -> torch.Tensor:
    meta = _meta(token_slots, sorted_tokens, seg_info, tile_info, lora_a[0].shape[0], block_m, x.shape[0])
    return run_shrink(x, lora_a, ranks, meta, backend)


@lora_shrink_op.register_fake
def _(x, lora_a, ranks, token_slots, sorted_tokens, seg_info, tile_info, block_m, backend):
    return x.new_empty((len(lora_a), x.shape[0], lora_a[0].shape[1]), dtype=torch.float32)


@torch.library.custom_op("openlora::lora_expand", mutates_args=("y",))
def lora_expand_op(
    y: torch.Tensor, h: torch.Tensor, lora_b: List[torch.Tensor], scalings: torch.Tensor, ranks: Optional[torch.Tensor],
    token_slots: torch.Tensor, sorted_tokens: torch.Tensor, seg_info: torch.Tensor, tile_info: torch.Tensor,
    block_m: int, backend: str,
) -> None:
    meta = _meta(token_slots, sorted_tokens, seg_info, tile_info, lora_b[0].shape[0], block_m, y.shape[0])
    run_expand(y, h, lora_b, scalings, ranks, meta, backend)


@lora_expand_op.register_fake
def _(y, h, lora_b, scalings, ranks, token_slots, sorted_tokens, seg_info, tile_info, block_m, backend):
    return None
