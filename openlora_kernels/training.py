"""Training many adapters at once over one frozen base: the model-level half (hf_patch uses it).

Design
------
* A trainable adapter is PINNED in its device slot, and its parameters ARE that slot: for every
  layer it targets, ``lora_A`` is the ``nn.Parameter`` view ``a[slot, :r]`` [r, K] of the layer's
  slot buffer and ``lora_B`` the view ``bt[slot, :r].T`` [N, r] (PEFT's shapes). An optimizer
  step updates the slot in place, so the next forward computes with the new weights: no copy per
  step, one copy of the weights in memory. Trainable adapters are never evicted or unpinned
  (unloading one drops it: save it first).
* A forward that builds a graph runs each patched layer's delta through :class:`SlotDelta`, an
  autograd Function whose forward is the usual in-place kernel call on the slot buffers and whose
  backward asks the kernels for dx (the SGMV with A and B swapped) and, when a trainable adapter
  of the batch targets the layer, for the segmented dA / dB products, then hands each trainable
  parameter its slot's slice (``ops.api.lora_backward``). Rows of other adapters (frozen ones,
  base rows) give their parameters nothing; every row gives x its true gradient.
* The batch the graph was built for must stay as it was until its backward has run: its call
  state (metadata, slot ids, the lease that keeps frozen adapters of the batch in their slots) is
  referenced by the graph and released when the graph is freed. Gradient checkpointing replays a
  layer's forward during the backward, outside the call: the checkpoint function is wrapped so
  the replay sees the batch it was first run with.
* New adapters start as PEFT starts them (``init_lora_weights=True``): lora_A Kaiming-uniform
  with a = sqrt(5) (nn.Linear's default), lora_B zero. :func:`save_adapter` writes PEFT's format,
  which ``PeftModel.from_pretrained`` loads back.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

_PREFIX = "base_model.model."


@dataclass
class TrainableAdapter:
    """A trainable adapter's parameters: per layer (slot, rank, lora_A view, lora_B view)."""

    name: str
    slot: int
    config: Dict[str, Any]
    layers: Dict[str, Tuple[int, nn.Parameter, nn.Parameter]]   # layer -> (rank, A [r, K], B [N, r])

    def parameters(self) -> Dict[str, nn.Parameter]:
        out = {}
        for layer, (_, a, b) in self.layers.items():
            out[f"{layer}.lora_A"] = a
            out[f"{layer}.lora_B"] = b
        return out


def fresh_adapter(layers: Dict[str, Tuple[int, int]], *, r: Any, lora_alpha: Any, target_modules: Any,
                  use_rslora: bool, fan_in_fan_out: bool) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(adapter_config, PEFT state dict) of a new adapter on ``layers`` ({name: (K, N)}, the
    patched layers) initialised like PEFT: lora_A Kaiming-uniform (a = sqrt(5)), lora_B zero."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r: expected a positive int, got {r!r}")
    if lora_alpha is None:
        lora_alpha = 8                                    # PEFT's default
    if (isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha)
            or lora_alpha <= 0):
        raise ValueError(f"lora_alpha: expected a positive finite number, got {lora_alpha!r}")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora: expected a bool, got {type(use_rslora).__name__}")
    picked = match_layers(list(layers), target_modules)
    tensors = {}
    for name in picked:
        K, N = layers[name]
        a = torch.empty(r, K)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = torch.zeros(N, r)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "use_rslora": use_rslora,
              "target_modules": picked, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": fan_in_fan_out,
              "init_lora_weights": True}
    return config, tensors


def match_layers(names: Sequence[str], target_modules: Any) -> List[str]:
    """The layer names ``target_modules`` selects, PEFT's rules: None / "all-linear" = all of them;
    a list = names equal to an entry or ending with "." + entry; another string = a regex the whole
    name must match."""
    if target_modules is None or target_modules == "all-linear":
        picked = list(names)
    elif isinstance(target_modules, str):
        try:
            rx = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules: {target_modules!r} is not a valid regex ({e})") from None
        picked = [n for n in names if rx.fullmatch(n)]
    elif isinstance(target_modules, (list, tuple, set, frozenset)) and all(isinstance(t, str) for t in target_modules):
        picked = [n for n in names if any(n == t or n.endswith("." + t) for t in target_modules)]
    else:
        raise TypeError(f"target_modules: expected None, 'all-linear', a regex or a list of module names, "
                        f"got {target_modules!r}")
    if not picked:
        raise ValueError(f"target_modules: {target_modules!r} matches none of the patched modules")
    return picked


def slot_parameters(name: str, slot: int, config: Dict[str, Any], pool_layers, ranks: Dict[str, int]) -> TrainableAdapter:
    """Parameters viewing ``slot`` of each layer the adapter targets (``ranks``: layer -> rank)."""
    layers = {}
    for layer, r in ranks.items():
        ls = pool_layers[layer]
        a = nn.Parameter(ls.a[slot, :r], requires_grad=True)
        b = nn.Parameter(ls.bt[slot, :r].t(), requires_grad=True)
        layers[layer] = (r, a, b)
    return TrainableAdapter(name, slot, config, layers)


def save_adapter(path: str, config: Dict[str, Any], weights: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` directly in ``path``:
    ``weights`` = {module name: (lora_A [r, K], lora_B [N, r])}. Written to temporary names first
    and renamed, so a failure leaves no half-written adapter."""
    from safetensors.torch import save_file

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a directory path, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"path: {path!r} exists and is not a directory")
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for module, (a, b) in sorted(weights.items()):
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = a.detach().to("cpu", copy=True).contiguous()
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = b.detach().to("cpu", copy=True).contiguous()
    cfg = {k: v for k, v in config.items() if k not in ("rank_pattern", "alpha_pattern") or v}
    cfg.setdefault("peft_type", "LORA")
    st, js = os.path.join(path, "adapter_model.safetensors"), os.path.join(path, "adapter_config.json")
    save_file(tensors, st + ".tmp", metadata={"format": "pt"})
    with open(js + ".tmp", "w", encoding="utf-8") as f:
        json.dump(_jsonable(cfg), f, indent=2, sort_keys=True)
    os.replace(st + ".tmp", st)
    os.replace(js + ".tmp", js)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_jsonable(x) for x in (sorted(v) if isinstance(v, (set, frozenset)) else v)]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(getattr(v, "value", v))          # enums (peft.PeftType, TaskType)


class SlotDelta(torch.autograd.Function):
    """``y += delta(x)`` of one patched layer, in place, with gradients for x and for the
    trainable parameters of the batch in this layer (module doc)."""

    @staticmethod
    def forward(ctx, y, x, op, meta, state, owners, *params):
        # y: the module's output [..., N] (itself, not a view: no CopySlices node); x: [T, K];
        # owners[i] = (slot, rank, is_a, dtype) of params[i]
        op(y.view(-1, y.shape[-1]), x, meta)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x)
        ctx.op, ctx.meta, ctx.state, ctx.owners = op, meta, state, owners
        return y

    @staticmethod
    def backward(ctx, dy_in):
        from .ops.api import lora_backward

        dy = dy_in
        (x,) = ctx.saved_tensors
        op, owners = ctx.op, ctx.owners
        dy = dy.reshape(-1, dy.shape[-1])
        need_x = ctx.needs_input_grad[1]
        need_ab = any(ctx.needs_input_grad[6:])
        dx, da, db = lora_backward(dy, x, op.lora_a, op.lora_b, ctx.meta, op.scalings, op.ranks,
                                   need_x=need_x, need_ab=need_ab, backend=op.backend)
        grads = []
        for (slot, r, is_a, dtype), need in zip(owners, ctx.needs_input_grad[6:]):
            if not need:
                grads.append(None)
            else:
                g = da[0][slot, :r] if is_a else db[0][slot, :, :r]
                grads.append(g if g.dtype == dtype else g.to(dtype))
        return (dy_in, dx if need_x else None, None, None, None, None, *grads)
