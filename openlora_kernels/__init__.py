"""openlora_kernels: serve many LoRA adapters through one resident base model.

Kernel contract (see docs/kernels.md)::

    add_lora(y, x, lora_a, lora_b, indices, scalings, ranks=None, *, backend="auto") -> y
    lora_shrink(x, lora_a, indices, ranks=None, *, backend="auto") -> h [n_slices, T, R] fp32
    lora_expand(y, h, lora_b, indices, scalings, ranks=None, *, backend="auto") -> y
    build_batch_meta(indices, num_slots) -> LoRABatchMeta   (once per forward, reused by every layer)
    available_backends(device=None) -> {name: BackendInfo(usable, reason)}

Importing the package touches no GPU and does not import triton.
"""
from .checks import debug_checks_enabled, set_debug_checks
from .metadata import LoRABatchMeta, build_batch_meta, choose_block_m
from .ops import (BackendInfo, BackendUnavailableError, add_lora, available_backends, lora_expand,
                  lora_shrink)

__version__ = "0.1.0"

__all__ = [
    "add_lora", "lora_shrink", "lora_expand",
    "LoRABatchMeta", "build_batch_meta", "choose_block_m",
    "available_backends", "BackendInfo", "BackendUnavailableError",
    "set_debug_checks", "debug_checks_enabled",
]
