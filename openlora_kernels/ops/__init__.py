"""Multi-LoRA kernels behind one dispatch.

  api.py          public ops (validation, metadata, backend resolution)
  custom_ops.py   torch.library registrations (torch.compile / CUDA-graph friendly)
  backends.py     which backends are usable here and what "auto" picks
  torch_ref.py    backend "torch": PyTorch reference and CPU path
  triton_sgmv.py  backend "triton": Triton kernels and launchers
  launch_args.py  argument layout shared by the kernel bridges (ranks, slices, strides)
  cuda_ext.py     backend "cuda": bridge to the csrc/ extension
  configs.py      launch configurations (tuned tables in configs/*.json, heuristics)
"""
from .api import (BoundEmbeddingLoRA, BoundLoRA, add_lora, add_lora_embedding, dora_rescale, forbid_backward,
                  lora_backward, lora_embedding_shrink, lora_expand, lora_shrink)
from .backends import BackendInfo, BackendUnavailableError, available_backends

__all__ = ["add_lora", "lora_shrink", "lora_expand", "lora_backward", "BoundLoRA", "add_lora_embedding",
           "lora_embedding_shrink", "BoundEmbeddingLoRA", "dora_rescale", "forbid_backward", "available_backends", "BackendInfo", "BackendUnavailableError"]
