"""LoRA on parameters (PEFT's ``target_parameters``) of transformers models, in mixed batches.

Transformers 5 stores the experts of a mixture-of-experts block as fused 3-D weights
(``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) in an experts module decorated with
``use_experts_implementation`` (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek...), and its router as a
module holding a 2-D ``weight`` it applies with ``F.linear``. PEFT adapts them as parameters:
``W'_e = W_e + s * B_e A_e`` for every expert e (one rank-r adapter per expert, saved as lora_A
[E*r, K] / lora_B [N, E*r]), and ``W' = W + s * B A`` for the router. Both are found here by
structure, never by model name:

* an **experts module** is one with transformers' experts attributes (``has_gate``,
  ``is_transposed``, ``_apply_gate``) and 3-D ``gate_up_proj`` (or ``up_proj``) and
  ``down_proj`` parameters. Its forward hook keeps the module's own output for every token whose
  row has no adapter on these weights (base rows stay exactly what the unpatched module
  computed), and recomputes the others: per (token, routed expert) pair the base projection of
  that expert (grouped by expert, as transformers' grouped_mm path does), plus the LoRA of the
  pair's (adapter, expert) through ONE add_lora call per projection over all pairs: the layer's
  slots are virtual, ``slot * E + e``; then the gate, the down projection (+ its LoRA), the
  routing weights and the sum over the top-k experts.
* a **router parameter** is a 2-D float parameter of a module that is not a Linear / Conv1D /
  Embedding and sits next to an experts module. While that module runs (a pre-forward hook
  enters, a forward hook leaves), a ``TorchFunctionMode`` adds the LoRA delta to the output of
  every ``F.linear(x, weight)`` whose weight IS that parameter; a forward that used the weight
  some other way raises RuntimeError instead of serving rows without their adapter.

Why Mixtral's base rows in a mixed batch can differ from the same rows of an all-base batch by a
few 1e-8: transformers' default experts implementations ("grouped_mm", "eager") multiply each
expert's tokens as one matrix, and a row's rounding depends on how many other tokens share that
GEMM; rows of other adapters route differently, so the groups change. The unpatched model does
the same when only the OTHER rows of its batch change (tests/test_hf_coverage.py shows it).
With a row-independent implementation (``model.set_experts_implementation("batched_mm")``) base
rows are bit-identical to the unpatched model whatever the rest of the batch holds.
"""
from __future__ import annotations

import threading
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .metadata import build_batch_meta


def experts_params(module: nn.Module) -> Optional[Dict[str, Tuple[int, int, int]]]:
    """{parameter name: (E, K, N)} of a transformers experts module, else None."""
    if not all(hasattr(module, a) for a in ("has_gate", "is_transposed", "_apply_gate")):
        return None
    names = ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")
    out = {}
    for n in names:
        w = module._parameters.get(n)
        if not isinstance(w, torch.Tensor) or w.dim() != 3 or not w.is_floating_point():
            return None
        E = w.shape[0]
        K, N = (w.shape[1], w.shape[2]) if module.is_transposed else (w.shape[2], w.shape[1])
        out[n] = (E, K, N)
    return out


def router_params(model: nn.Module, skip) -> List[Tuple[str, nn.Module, str, int, int]]:
    """(module name, module, parameter name, K, N) of every 2-D float parameter of a module that
    sits next to an experts module (a sibling under the same parent) and is not ``skip(module)``
    (Linear, Conv1D, Embedding)."""
    names = {id(m): n for n, m in model.named_modules()}
    out, seen = [], set()
    for parent in model.modules():
        children = list(parent.children())
        if not any(experts_params(c) is not None for c in children):
            continue
        for child in children:
            if id(child) in seen or experts_params(child) is not None or skip(child):
                continue
            seen.add(id(child))
            for pname, p in child.named_parameters(recurse=False):
                if p.dim() == 2 and p.is_floating_point():
                    out.append((names[id(child)], child, pname, p.shape[1], p.shape[0]))
    return out


def _expert_linear(x: torch.Tensor, w: torch.Tensor, e: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Row p of the result = x[p] through expert e[p]'s weight (w [E, N, K], or [E, K, N] when
    ``transposed``): the pairs grouped by expert as transformers' grouped_mm path does."""
    E = w.shape[0]
    order = torch.argsort(e, stable=True)
    xs = x[order]
    try:
        from transformers.integrations.moe import _grouped_linear
    except ImportError:                            # pragma: no cover - older transformers
        _grouped_linear = None
    if _grouped_linear is not None:
        counts = torch.zeros(E, dtype=torch.int64, device=e.device).scatter_add_(0, e, torch.ones_like(e))   # no sync
        ys = _grouped_linear(xs, w, torch.cumsum(counts, 0, dtype=torch.int32), bias=None, is_transposed=transposed)
    else:                                          # pragma: no cover
        ys = xs.new_empty((xs.shape[0], w.shape[2] if transposed else w.shape[1]))
        es = e[order]
        for i in range(E):
            sel = es == i
            ys[sel] = xs[sel] @ (w[i] if transposed else w[i].t())
    out = torch.empty_like(ys)
    out[order] = ys
    return out


def experts_hook(layers: Dict[str, "object"], call, num_slots: int):
    """Forward hook of an experts module whose parameters ``layers`` ({param: LayerSlots}) are
    patched (module doc)."""
    name = next(iter(layers.values())).name.rsplit(".", 1)[0]

    def hook(module, args, kwargs, output):
        state = call.get()
        if state is None or state.meta is None:
            return None
        ops = {p: (ls, ls.op) for p, ls in layers.items() if ls.op is not None}
        if not ops or not state.may_use(ls for ls, _ in ops.values()):
            return None
        hidden, top_k_index, top_k_weights = _experts_args(args, kwargs)
        device = hidden.device
        meta = state.meta_for(tuple(hidden.shape[:-1]), device, name)
        tok = meta.token_slots.long()
        T, k = hidden.shape[0], top_k_index.shape[-1]
        gate_name = "gate_up_proj" if module.has_gate else "up_proj"
        w1, w2 = getattr(module, gate_name), module.down_proj
        E = w1.shape[0]
        e = top_k_index.reshape(-1).long().clamp(0, E - 1)
        pair_tok = torch.arange(T, device=device).repeat_interleave(k)
        s = tok[pair_tok]
        vmeta = build_batch_meta(torch.where(s >= 0, s * E + e, -1).to(torch.int32), num_slots * E)
        x = hidden[pair_tok]
        h = _expert_linear(x, w1, e, module.is_transposed)
        if module.has_bias:
            h = h + getattr(module, f"{gate_name}_bias")[e]
        if gate_name in ops:
            ops[gate_name][1](h, x.to(ops[gate_name][0].dtype), vmeta)
        h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
        h = h.contiguous()
        d = _expert_linear(h, w2, e, module.is_transposed)
        if module.has_bias:
            d = d + module.down_proj_bias[e]
        if "down_proj" in ops:
            ops["down_proj"][1](d, h.to(ops["down_proj"][0].dtype), vmeta)
        if getattr(module, "has_post_expert_norm", False):
            d = module.post_expert_norm(d)
        out = (d * top_k_weights.reshape(-1, 1).to(d.dtype)).view(T, k, -1).sum(dim=1).to(output.dtype)
        mask = None
        for ls, _ in ops.values():
            mask = ls.active_mask if mask is None else mask | ls.active_mask
        use = (tok >= 0) & mask[tok.clamp(min=0)]
        return torch.where(use[:, None], out, output)

    return hook


def _experts_args(args: tuple, kwargs: dict):
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args[:3]) + [kwargs[n] for n in names[len(args):3] if n in kwargs]
    if len(vals) != 3:
        raise RuntimeError(f"experts module called with {len(args)} positional arguments and {sorted(kwargs)}: "
                           "expected (hidden_states, top_k_index, top_k_weights)")
    return vals


class _ParamLinear(TorchFunctionMode):
    """Adds a router parameter's LoRA delta to every ``F.linear(x, param)`` of one module call."""

    def __init__(self, param: torch.Tensor, slots, state):
        super().__init__()
        self.param, self.slots, self.state, self.applied = param, slots, state, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            if w is self.param:
                ls = self.slots
                x = args[0] if args else kwargs["input"]
                meta = self.state.meta_for(tuple(x.shape[:-1]), ls.device, ls.name)
                y = out if out.is_contiguous() else out.contiguous()
                ls.op(y.view(-1, ls.out_features), x.reshape(-1, ls.in_features).to(ls.dtype), meta)
                self.applied = True
                out = y
        return out


def param_hooks(module: nn.Module, pname: str, slots, call):
    """(pre-forward hook, forward hook) applying ``slots``' LoRA to ``module.<pname>`` used through
    F.linear (module doc)."""
    local = threading.local()       # this thread's open calls of the module (modes are per thread too)

    def pre(mod, args):
        state = call.get()
        mode = None
        if state is not None and state.meta is not None and slots.op is not None and state.may_use([slots]):
            mode = _ParamLinear(getattr(mod, pname), slots, state)
            mode.__enter__()
        local.__dict__.setdefault("stack", []).append(mode)
        return None

    def post(mod, args, output):
        stack = local.__dict__.get("stack")
        mode = stack.pop() if stack else None
        if mode is not None:
            mode.__exit__(None, None, None)
            if not mode.applied:
                raise RuntimeError(
                    f"parameter {slots.name!r}: an adapter of this batch has LoRA weights for it, but "
                    f"{type(mod).__name__}.forward did not use it through torch.nn.functional.linear, the only "
                    "use of a 2-D parameter target this library can apply per row")
        return None

    return pre, post
