"""openlora_kernels: serve many LoRA adapters through one resident base model.

Kernel contract (see docs/kernels.md)::

    add_lora(y, x, lora_a, lora_b, indices, scalings, ranks=None, *, backend="auto") -> y
    lora_shrink(x, lora_a, indices, ranks=None, *, backend="auto") -> h [n_slices, T, R] fp32
    lora_expand(y, h, lora_b, indices, scalings, ranks=None, *, backend="auto") -> y
    lora_backward(dy, x, lora_a, lora_b, indices, scalings, ranks=None) -> (dx, [dA_i], [dB_i])
    build_batch_meta(indices, num_slots) -> LoRABatchMeta   (once per forward, reused by every layer)
    available_backends(device=None) -> {name: BackendInfo(usable, reason)}   (a dict; prints as a table)

Serving many PEFT adapters through one Hugging Face model (see docs/usage.md)::

    lm = patch_model(model, max_adapters=8, max_rank=64)
    lm.load_adapter("medical", "path/to/peft-adapter")
    out = lm(input_ids=..., attention_mask=..., adapter_names=["medical", None])

Importing the package touches no GPU and imports neither triton nor transformers / peft: the
Hugging Face names below are loaded on first use.
"""
from .checks import check_batch_meta, debug_checks_enabled, set_debug_checks
from .metadata import LoRABatchMeta, build_batch_meta, choose_block_m
from .ops import (BackendInfo, BackendUnavailableError, BoundEmbeddingLoRA, BoundLoRA, add_lora, add_lora_embedding,
                  available_backends, dora_rescale, forbid_backward, lora_backward, lora_embedding_shrink, lora_expand,
                  lora_shrink)

__version__ = "0.1.0"

# Names served lazily from their modules (PEP 562), so `import openlora_kernels` stays light.
_LAZY = {
    "patch_model": "hf_patch", "MultiLoRAModel": "hf_patch",
    "AdapterPool": "pool", "MemoryReport": "pool", "AdapterMemory": "pool", "Lease": "pool",
    "AdapterSource": "adapters", "LocalSource": "adapters", "HubSource": "adapters",
    "CallableSource": "adapters", "AdapterFormatError": "adapters", "Expectation": "adapters",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'openlora_kernels' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "add_lora", "lora_shrink", "lora_expand", "lora_backward", "BoundLoRA", "forbid_backward",
    "add_lora_embedding", "lora_embedding_shrink", "BoundEmbeddingLoRA", "dora_rescale",
    "LoRABatchMeta", "build_batch_meta", "choose_block_m", "check_batch_meta",
    "available_backends", "BackendInfo", "BackendUnavailableError",
    "set_debug_checks", "debug_checks_enabled",
    *_LAZY,
]
