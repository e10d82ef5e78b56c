"""The Llama-shaped random model and the PEFT-saved adapters that bench_model.py and bench_swap.py share.

* ``Dims``: the model's sizes. On a GPU the default is Llama-2-7B (hidden 4096, intermediate
  11008, 32 heads, vocab 32000) with ``--layers`` decoder layers (fewer than 32 to fit the time
  of one device call; every layer has the real shapes); ``--quick`` is a tiny model for CPU
  smoke runs.
* ``build_model``: random init (``LlamaConfig``), created directly on the device in the dtype
  asked (bfloat16 on a GPU, float32 on the CPU), eval mode.
* ``share_weights_copy``: a second module tree over the SAME parameter and buffer tensors (no
  weight memory), so the base model, our patched model and PEFT's model coexist on one GPU.
* ``save_peft_adapters``: N rank-r adapters on all seven projections, written by PEFT's own
  ``save_pretrained`` (adapter_config.json + adapter_model.safetensors) with seeded random
  weights, the files every contender then loads.
* ``drop_page_cache``: asks the kernel to forget a file's cached pages (posix_fadvise
  DONTNEED; no root needed) so the next read comes from the disk; on tmpfs it cannot.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import os
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional

import torch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Dims:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    layers: int
    name: str

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def projections(self) -> Dict[str, tuple]:
        """(in_features, out_features) of each projection of one decoder layer."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def label(self) -> str:
        return (f"{self.name}: hidden={self.hidden},intermediate={self.intermediate},heads={self.heads},"
                f"kv_heads={self.kv_heads},vocab={self.vocab},layers={self.layers}")


LLAMA2_7B = dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000, layers=32)
TINY = dict(hidden=64, intermediate=172, heads=4, kv_heads=4, vocab=512, layers=2)
GPU_DEFAULT_LAYERS = 8     # of Llama-2-7B's 32: a whole benchmark then fits in a share of one device call


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (default: Llama-2-7B dims on a GPU, tiny with --quick)")
    for flag in ("hidden", "intermediate", "heads", "kv-heads", "vocab"):
        g.add_argument(f"--{flag}", type=int, default=None)
    g.add_argument("--layers", type=int, default=None,
                   help=f"decoder layers (default {GPU_DEFAULT_LAYERS} of Llama-2-7B's 32; {TINY['layers']} with --quick)")
    g.add_argument("--rank", type=int, default=16, help="rank of every adapter (all seven projections)")
    g.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="default bfloat16 on a GPU, float32 on the CPU")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--seed", type=int, default=0)


def resolve(args: argparse.Namespace):
    """(dims, device, dtype) from the parsed arguments."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base = TINY if args.quick else LLAMA2_7B
    vals = {k: getattr(args, k) if getattr(args, k) is not None else base[k] for k in base}
    if not args.quick and args.layers is None:
        vals["layers"] = GPU_DEFAULT_LAYERS
    name = "tiny Llama (--quick)" if args.quick else "Llama-2-7B dims"
    if not args.quick and any(getattr(args, k) is not None for k in base if k != "layers"):
        name = "Llama-shaped (custom dims)"
    if vals["hidden"] % vals["heads"] or vals["heads"] % vals["kv_heads"]:
        raise ValueError(f"--hidden {vals['hidden']} must be a multiple of --heads {vals['heads']}, itself a "
                         f"multiple of --kv-heads {vals['kv_heads']}")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    return Dims(name=name, **vals), device, dtype


def build_model(dims: Dims, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=dims.vocab, hidden_size=dims.hidden, intermediate_size=dims.intermediate,
                      num_hidden_layers=dims.layers, num_attention_heads=dims.heads,
                      num_key_value_heads=dims.kv_heads, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):   # initialised where it runs: no host copy of a multi-GB model
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def share_weights_copy(model: torch.nn.Module) -> torch.nn.Module:
    """New modules over the same parameter and buffer tensors (deepcopy with those memoised)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters (each tensor once; buffers such as rotary tables are not
    counted: a few KiB)."""
    seen, total = set(), 0
    for t in model.parameters():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def adapter_bytes(dims: Dims, rank: int, dtype: torch.dtype) -> int:
    """Bytes of one adapter of rank ``rank`` on all seven projections of every layer (A and B)."""
    per_layer = sum(rank * (k + n) for k, n in dims.projections().values())
    return per_layer * dims.layers * torch.empty((), dtype=dtype).element_size()


def adapter_names(n: int) -> List[str]:
    return [f"adapter{i:03d}" for i in range(n)]


def save_peft_adapters(model: torch.nn.Module, root: str, names: Iterable[str], rank: int, seed: int = 0) -> List[str]:
    """Write one PEFT adapter directory per name under ``root`` (random weights, seeded by name
    order); returns the directories. A is N(0, 1/K), B N(0, 0.02^2): the delta is about a tenth
    of a projection's output on this random model."""
    from peft import LoraConfig, get_peft_model

    lc = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(PROJECTIONS), init_lora_weights=False)
    pm = get_peft_model(share_weights_copy(model), lc, autocast_adapter_dtype=False)
    params = [(n, p) for n, p in pm.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    dev = params[0][1].device
    dirs = []
    with torch.no_grad():
        for i, name in enumerate(names):
            g = torch.Generator(device=dev).manual_seed(seed * 100_003 + i)
            for n, p in params:
                std = p.shape[1] ** -0.5 if ".lora_A." in n else 0.02
                p.copy_(torch.randn(p.shape, generator=g, device=dev, dtype=torch.float32) * std)
            path = os.path.join(root, name)
            pm.save_pretrained(path)
            dirs.append(path)
    del pm
    return dirs


def files_under(path: str) -> List[str]:
    if os.path.isfile(path):
        return [path]
    return [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]


def drop_page_cache(path: str) -> bool:
    """Ask the kernel to drop the cached pages of ``path`` (a file or every file under a folder).
    True when the request was made; the kernel may keep pages it cannot drop (tmpfs keeps all)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for f in files_under(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            try:
                os.fsync(fd)          # dirty pages cannot be dropped: write them out first
            except OSError:
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def filesystem_of(path: str) -> str:
    """The type of the filesystem holding ``path`` (from /proc/mounts), e.g. 'ext4', 'tmpfs'."""
    path = os.path.realpath(path)
    best, fs = "", "unknown"
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (path == parts[1] or path.startswith(parts[1].rstrip("/") + "/")) \
                        and len(parts[1]) >= len(best):
                    best, fs = parts[1], parts[2]
    except OSError:
        pass
    return fs


def dims_extra(dims: Dims) -> Dict[str, object]:
    return {f"model_{k}": v for k, v in asdict(dims).items()}


def memory_allocated(device: torch.device) -> Optional[int]:
    """Bytes the caching allocator has handed out on a GPU (None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)
