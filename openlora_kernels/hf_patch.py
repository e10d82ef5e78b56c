"""Serve many PEFT adapters through one Hugging Face model: :func:`patch_model`.

    >>> lm = olk.patch_model(model, max_adapters=8, max_rank=64)              # doctest: +SKIP
    >>> lm.load_adapter("medical", "path/or/org-name")                         # doctest: +SKIP
    >>> out = lm(input_ids=ids, attention_mask=mask, adapter_names=["medical", None])  # doctest: +SKIP

How the model is patched
------------------------
* Modules are found by walking ``model.named_modules()`` and matching ``target_modules`` (no
  per-model tables): ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2; its weight is stored
  [in, out], which only matters for the base layer: PEFT's lora_A/lora_B are the same for both),
  ``nn.Embedding``, and MoE expert / router parameters (hf_params.py).
  ``target_modules=None`` (or "all-linear") = every Linear / Conv1D except the output embedding
  (``lm_head``), i.e. PEFT's "all-linear", plus the MoE parameters PEFT's "all-linear" adapts and
  the input embedding; an adapter with weights for a module that is not patched is refused with a
  message naming it.
* Each patched module's forward is wrapped (:class:`_ForwardWrap`: an instance attribute, no
  nn.Module hook, whose slow call path costs more than the LoRA call on a CPU decode step; the
  module's class, its weights and the model's state_dict are untouched): ``y = base(x)`` as before, then
  ``add_lora(y.view(-1, N), x.reshape(-1, K), A_slots, B_slots, meta, scalings, ranks)`` through
  a :class:`~openlora_kernels.ops.api.BoundLoRA` (the slot weights are checked once per change
  of the pool, not in every call).
  Fused projections (Phi-3 ``qkv_proj``/``gate_up_proj``, GPT-NeoX ``query_key_value``) are one
  module with one lora_A/lora_B in PEFT's format, so they are a single-slice call like any other.
  Decode-like batches on the native CPU backend take a shorter road: the model's pre-forward step also
  resolves the metadata's pointers once (``cpu_ext.row_args``) and each hook hands its contiguous
  input and output straight to :meth:`~openlora_kernels.ops.api.BoundLoRA.add_rows` (a few
  attribute checks and one C++ call; anything it does not serve falls back to the path above).
* Projection groups (hf_groups.py, ``group_projections=True``): sibling linears that read the
  same input tensor (q/k/v_proj, gate/up_proj; found during the first forward, confirmed on every
  call) make ONE multi-slice call: the first member's hook launches for all of them into a
  per-call scratch and adds its columns, the others add theirs (a Llama layer: 4 launches, not 7).
* The batch metadata is built ONCE per forward, by the top model's forward wrapper (before its own forward), from the
  per-row adapter slots and the input's [batch, seq] shape: one slot per TOKEN, in row-major
  order (and reused by later forwards with the same slots and shape: every decode step of a
  generate call, a server repeating a batch layout). Every layer receives its input flattened to [tokens, K], so models that flatten
  [batch, seq] themselves before a linear (OPT's fc1/fc2) get the right adapter per row. A
  layer that sees fewer positions per row than the input (an ``lm_head`` computing only the last
  position during generation) gets the metadata of that layout, built once per forward too.
* Rows whose adapter does not target a layer have rank 0 for its slot there: no delta. Padding
  (left or right) is the base model's business: deltas apply per token like PEFT's.
* Encoder-decoder models: the encoder and the decoder stacks get pre-forward hooks of their own
  that build the metadata of their input (``generate`` calls the encoder outside the model's
  forward); the enclosing layout is restored when they return.
* Beyond linear layers: nn.Embedding (embedding LoRA: a gather of lora_embedding_A's columns by
  token id, then the expand), DoRA on either (its column scale computed at load: B stored as
  diag(g) B, the base output of DoRA rows scaled by ops.dora_rescale), and the expert / router
  weights of transformers MoE blocks (hf_params.py). docs/usage.md, "Adapter kinds".

Serving stacks with packed / variable-length batches use :meth:`MultiLoRAModel.set_batch`
(per-token slots or a LoRABatchMeta) and then call ``lm.model`` with no extra arguments.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .adapters import (AdapterFormatError, AdapterWeights, Expectation, load_adapter_weights, resolve_source,
                       split_key, strip_base_layer)
from .hf_groups import ProjectionGroup, candidate_groups, finish_forward, observe, version
from .hf_params import experts_hook, experts_params, param_hooks, router_params
from .metadata import LoRABatchMeta, build_batch_meta
from .ops import cpu_ext
from .ops.api import _FP8 as _FP8_DTYPES
from .ops.api import FP8, STORAGE_DTYPES, check_storage, dora_rescale, quantize_rows
from .ops.backends import BACKEND_CHOICES, resolve_backend
from .pool import AdapterPool, HostLoRA, HostSlotArena, LayerSlots, Lease, MemoryReport, Prefetch, packed_layout
from .training import SlotDelta, TrainableAdapter, fresh_adapter, save_adapter, slot_parameters

BASE = "__base__"
TargetModules = Union[None, str, Sequence[str]]


# ---------------------------------------------------------------------------- module matching


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is optional
        return None
    return Conv1D


def linear_dims(module: nn.Module) -> Optional[Tuple[int, int]]:
    """(in_features, out_features) of an nn.Linear or transformers Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.shape[0], module.weight.shape[1]   # Conv1D stores weight [in, out]
    return None


@dataclass(frozen=True)
class Target:
    """One patchable place: a module (``param`` None) or a parameter of one. ``kind``: "linear"
    (Linear / Conv1D; also a 2-D router parameter, applied where F.linear uses it), "embedding"
    (nn.Embedding: K = num_embeddings, N = embedding_dim) or "experts" (a 3-D [E, ...] expert
    weight of a transformers experts module, E = ``experts``). ``name`` is the module's name, or
    ``module.param`` for a parameter (what adapters and ``target_modules`` match)."""

    name: str
    module: nn.Module
    in_features: int
    out_features: int
    kind: str = "linear"
    param: Optional[str] = None
    experts: int = 0

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.param or "weight")


def _plain(mod: nn.Module) -> bool:
    return linear_dims(mod) is not None or isinstance(mod, nn.Embedding)


def candidate_targets(model: nn.Module) -> List[Target]:
    """Every place an adapter can go: Linear / Conv1D and nn.Embedding modules, the 3-D weights of
    transformers experts modules and the 2-D weights of their routers (hf_params.py)."""
    out = []
    for name, mod in model.named_modules():
        dims = linear_dims(mod)
        if dims is not None:
            out.append(Target(name, mod, *dims))
        elif isinstance(mod, nn.Embedding):
            out.append(Target(name, mod, mod.num_embeddings, mod.embedding_dim, "embedding"))
        else:
            for pname, (E, K, N) in (experts_params(mod) or {}).items():
                out.append(Target(f"{name}.{pname}", mod, K, N, "experts", pname, E))
    for name, mod, pname, K, N in router_params(model, _plain):
        out.append(Target(f"{name}.{pname}", mod, K, N, "linear", pname))
    return out


def _default_target(model: nn.Module, t: Target, out_emb, in_emb) -> bool:
    """What target_modules=None / "all-linear" patches: PEFT's "all-linear" (every Linear /
    Conv1D but the output embedding, and, as PEFT does on transformers 5, the expert and router
    weights of MoE blocks), plus the input embedding and the embeddings tied to it (but not one
    with max_norm)."""
    if t.kind == "embedding":
        if t.module.max_norm is not None:       # (refused when named: it renormalises its weight in place)
            return False
        w = getattr(in_emb, "weight", None)
        return t.module is in_emb or (isinstance(w, torch.Tensor) and t.module.weight is w)
    return t.module is not out_emb


def _embeddings(model: nn.Module, get: str) -> Optional[nn.Module]:
    fn = getattr(model, get, None)
    try:
        return fn() if callable(fn) else None
    except (NotImplementedError, AttributeError, TypeError):     # a PreTrainedModel without them
        return None


def select_modules(model: nn.Module, target_modules: TargetModules) -> List[Target]:
    """The targets to patch (see :class:`Target`).

    None / "all-linear": :func:`_default_target`. A list: targets whose name equals an entry or
    ends with "." + entry (PEFT's rule). Another string: a regex the whole name must match.
    """
    out_emb, in_emb = _embeddings(model, "get_output_embeddings"), _embeddings(model, "get_input_embeddings")
    if isinstance(target_modules, str) and target_modules != "all-linear":
        rx = re.compile(target_modules)
        match = lambda n: rx.fullmatch(n) is not None  # noqa: E731
    elif target_modules is None or target_modules == "all-linear":
        match = None
    elif isinstance(target_modules, (list, tuple, set, frozenset)) and all(isinstance(t, str) for t in target_modules):
        names = list(target_modules)
        match = lambda n: any(n == t or n.endswith("." + t) for t in names)  # noqa: E731
    else:
        raise TypeError(f"target_modules: expected None, 'all-linear', a regex string or a list of module names, "
                        f"got {target_modules!r}")
    cands = candidate_targets(model)
    if match is None:
        picked = [t for t in cands if _default_target(model, t, out_emb, in_emb)]
    else:
        # a parameter is picked by its own name or by its module's ("experts", "gate")
        picked = [t for t in cands if t.name and (match(t.name) or (t.param and match(t.name.rsplit(".", 1)[0])))]
        known = {t.name for t in cands}
        for name, mod in model.named_modules():
            if name and name not in known and match(name) and not any(t.module is mod for t in picked):
                raise ValueError(f"target_modules: module {name!r} is a {type(mod).__name__}; only nn.Linear, "
                                 "transformers Conv1D, nn.Embedding modules and the expert / router weights of "
                                 "transformers MoE blocks can be patched")
    if not picked:
        raise ValueError(f"target_modules: {target_modules!r} matched no nn.Linear / Conv1D / nn.Embedding module "
                         "of the model")
    for t in picked:
        w = getattr(t.module, t.param or "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise NotImplementedError(
                f"module {t.name!r} ({type(t.module).__name__}) has {'no' if w is None else f'a {w.dtype}'} weight: "
                "quantized base layers are not supported; exclude it with target_modules")
        if t.kind == "embedding" and t.module.max_norm is not None:
            raise NotImplementedError(f"module {t.name!r}: nn.Embedding with max_norm (it renormalises its weight "
                                      "in place) is not supported; exclude it with target_modules")
    return picked


def _stacks(model: nn.Module) -> List[nn.Module]:
    """The encoder and decoder of an encoder-decoder model (``config.is_encoder_decoder``, through
    transformers' ``get_encoder`` / ``get_decoder``), else nothing."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return []
    out = []
    for get in ("get_encoder", "get_decoder"):
        fn = getattr(model, get, None)
        try:
            mod = fn() if callable(fn) else None
        except (TypeError, NotImplementedError, AttributeError):
            mod = None
        if isinstance(mod, nn.Module) and mod is not model and all(mod is not m for m in out):
            out.append(mod)
    return out


# ------------------------------------------------------------------------------- batch state


class _MetaCache:
    """Metadata of recent (row slots, input shape) pairs, shared by every call of one patched model
    (thread-safe): a decode loop or a server repeating a batch layout reuses it (and what the
    kernels memoised on it) instead of rebuilding it. The metadata only names slots, and a call
    looks it up with the slots its own lease holds, so sharing it across calls is safe. Least
    recently used layouts are evicted one at a time, never all at once. (A CUDA graph captured over
    a forward reads its layout's metadata tensors: give such a forward metadata you own, through
    set_batch(), rather than relying on this cache; see docs/usage.md.)"""

    CACHE_SIZE = 16

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._items: "OrderedDict[Tuple[Any, ...], Tuple[LoRABatchMeta, torch.Tensor]]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
            return hit

    def put(self, key, value) -> None:
        with self._lock:
            while len(self._items) >= self.CACHE_SIZE:
                self._items.popitem(last=False)
            self._items[key] = value

    def __len__(self) -> int:
        return len(self._items)


class _CallState:
    """What the hooks read during one call: one ``lm(...)`` / ``lm.generate(...)``, or one
    set_batch() .. clear_batch() span. It lives in a context variable, so it belongs to the thread
    (or asyncio task) that made it: concurrent calls never see each other's batch."""

    __slots__ = ("row_key", "fixed", "lease", "train", "meta", "rows_now", "layouts", "rows", "stack",
                 "pending", "observe", "__weakref__")

    def __init__(self, row_key: Optional[Tuple[int, ...]] = None, fixed: Optional[LoRABatchMeta] = None,
                 lease: Optional[Lease] = None, train: Optional[Dict[str, Tuple[tuple, tuple]]] = None):
        self.row_key = row_key      # slot per row ("rows" mode: adapter_names); None: every row is base
        self.fixed = fixed          # per-token metadata (serving-stack mode: set_batch)
        self.lease = lease          # the adapters this state's batch holds (released with the state)
        # trainable adapters of the batch, per layer: (((slot, rank, is_a), ...), (Parameter, ...))
        self.train = train
        if lease is not None:       # a graph built over this batch keeps it (and the lease) alive
            weakref.finalize(self, lease.release)
        self.meta: Optional[LoRABatchMeta] = None       # this forward's metadata
        self.rows_now: Optional[torch.Tensor] = None    # this forward's per-row slots
        self.layouts: Dict[Tuple[Any, ...], LoRABatchMeta] = {}
        self.rows = None        # cpu_ext.row_args(meta): the native CPU kernel's fast path, or None
        self.stack: List[tuple] = []    # the enclosing layouts while an encoder / decoder stack runs
        # projection groups (hf_groups.py): per (group, plan) the launch its first member made in this
        # forward, for the later members; and what a learning forward observed of each group
        self.pending: Dict[Any, tuple] = {}
        self.observe: Dict[Any, tuple] = {}

    def begin_forward(self, args: tuple, kwargs: dict, cache: _MetaCache) -> None:
        self.stack = []
        self.pending = {}
        self._set_meta(args, kwargs, cache)
        self._set_rows()

    def _set_rows(self) -> None:
        meta = self.meta
        fast = meta is not None and not torch.compiler.is_compiling() and not (self.train and torch.is_grad_enabled())
        self.rows = cpu_ext.row_args(meta) if fast else None

    def enter_stack(self, args: tuple, kwargs: dict, cache: _MetaCache) -> None:
        """An encoder / decoder stack of an encoder-decoder model starts (``generate`` calls the
        encoder by itself, outside the model's forward): its layers get the metadata of ITS input,
        [batch, its seq], each token carrying its row's adapter; the enclosing layout comes back
        with :meth:`exit_stack`. Only in per-row mode (adapter_names): a set_batch() batch is per
        token of the call as given."""
        if self.row_key is None or _model_input(args, kwargs, stack=True) is None:
            self.stack.append(None)
            return
        self.stack.append((self.meta, self.rows_now, self.layouts, self.rows))
        self._set_meta(args, kwargs, cache, stack=True)
        self._set_rows()

    def exit_stack(self) -> None:
        saved = self.stack.pop() if self.stack else None
        if saved is not None:
            self.meta, self.rows_now, self.layouts, self.rows = saved

    def _set_meta(self, args: tuple, kwargs: dict, cache: _MetaCache, stack: bool = False) -> None:
        self.layouts = {}
        if self.fixed is not None:
            self.meta, self.rows_now = self.fixed, None
            return
        if self.row_key is None:
            self.meta = self.rows_now = None
            return
        inp = _model_input(args, kwargs, stack=stack)
        if inp is None or inp.dim() < 2:
            raise ValueError("adapter_names: the model was called without input_ids / inputs_embeds of shape "
                             "[batch, seq, ...]; use set_batch() with per-token slots for other inputs")
        B, S = inp.shape[0], inp.shape[1]
        key = (self.row_key, B, S, inp.device)
        hit = cache.get(key)
        if hit is not None:
            self.meta, self.rows_now = hit
            return
        rows = torch.tensor(self.row_key, dtype=torch.int32)
        if B != rows.shape[0]:
            if B % rows.shape[0]:
                raise ValueError(f"adapter_names: {rows.shape[0]} names, but the model was called with batch size {B}")
            rows = rows.repeat_interleave(B // rows.shape[0])   # beams / num_return_sequences
        self.rows_now = rows.to(inp.device, non_blocking=True)
        self.meta = build_batch_meta(self.rows_now.repeat_interleave(S) if S != 1 else self.rows_now, cache.num_slots)
        cache.put(key, (self.meta, self.rows_now))

    def meta_for(self, lead: Tuple[int, ...], device: torch.device, layer: str) -> LoRABatchMeta:
        """Metadata for a layer whose token layout ``lead`` (its input's shape without the feature
        dimension; an embedding's: the ids' shape) or device differs from the forward's."""
        key = (device, lead)
        meta = self.layouts.get(key)
        if meta is not None:
            return meta
        T = 1
        for d in lead:
            T *= d
        if T == self.meta.num_tokens:
            slots = self.meta.token_slots
        elif self.rows_now is not None and len(lead) >= 2 and lead[0] == self.rows_now.shape[0]:
            slots = self.rows_now.repeat_interleave(T // lead[0])
        else:
            raise RuntimeError(
                f"layer {layer!r}: its input has {T} rows (token layout {tuple(lead)}), but the batch metadata covers "
                f"{self.meta.num_tokens} tokens; this layer lays the batch out in a way per-row adapter ids cannot "
                "follow: give per-token slots with set_batch()")
        meta = build_batch_meta(slots.to(device), self.meta.num_slots)
        self.layouts[key] = meta
        return meta

    def may_use(self, layers) -> bool:
        """Whether a row of this batch may have an adapter with weights in one of ``layers``
        (known exactly for per-row batches; a set_batch() batch is not read back: True)."""
        if self.row_key is None:
            return self.fixed is not None
        slots = set(self.row_key)
        return any(not slots.isdisjoint(ls.active) for ls in layers)


_INPUT_KEYS = ("input_ids", "inputs_embeds", "inputs")
# An encoder-decoder model called with its encoder's output already computed (every decoding step
# of generate) has only the decoder's input: that gives the forward's [batch, seq].
_DECODER_KEYS = ("decoder_input_ids", "decoder_inputs_embeds")


def _model_input(args: tuple, kwargs: dict, stack: bool = False) -> Optional[torch.Tensor]:
    """The tensor whose [batch, seq] leads the call's layout: the model's input, else (a decoding
    step of an encoder-decoder model: ``input_ids=None``) the decoder's. ``stack``: the call of an
    encoder / decoder stack (its own input only)."""
    for key in _INPUT_KEYS if stack else _INPUT_KEYS + _DECODER_KEYS:
        v = kwargs.get(key)
        if isinstance(v, torch.Tensor):
            return v
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return None


def _dora(slots: LayerSlots, state: _CallState, y: torch.Tensor, meta: LoRABatchMeta, bias) -> None:
    """DoRA's column scale of the base output of this batch's DoRA rows (ops.api.dora_rescale),
    before the delta (whose B already holds the scale) is added."""
    dora = slots.dora
    if dora is None:
        return
    col, has, host = dora
    if state.row_key is not None and host.isdisjoint(state.row_key):
        return
    dora_rescale(y.view(-1, y.shape[-1]), col, has, meta, bias)


_UNGROUPED = object()


def _needs_graph(state: _CallState, x: torch.Tensor, output: torch.Tensor) -> bool:
    """Not grouped: a batch with a trainable adapter (with grad on or not, so that a training step's
    forward and the same batch served under no_grad compute the same bits), and a call recording
    autograd for its input or output."""
    return bool(state.train) or (torch.is_grad_enabled() and (x.requires_grad or output.requires_grad))


def _grouped(slots: LayerSlots, group: ProjectionGroup, member: int, state: _CallState, module, x, output):
    """A group member's LoRA (hf_groups.py): the first member of its plan makes the group's one
    launch into a scratch; each member adds its columns of it. _UNGROUPED: take the usual path."""
    if torch.compiler.is_compiling():
        return _UNGROUPED
    b = group.bound
    where = b.pos.get(member)
    if where is None:
        return _UNGROUPED
    p, i = where
    key = (group, p)
    if i == 0:
        state.pending.pop(key, None)
        if _needs_graph(state, x, output):
            return _UNGROUPED
        meta = state.meta
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] != meta.num_tokens or meta.device != slots.device:
            meta = state.meta_for(tuple(x.shape[:-1]), slots.device, slots.name)
        op, scratch = b.ops[p], None
        if op is not None:
            xk = x2 if x2.dtype == slots.dtype else x2.to(slots.dtype)
            scratch = torch.zeros((x2.shape[0], b.width[p]), dtype=slots.dtype, device=slots.device)
            rows = state.rows
            if rows is None or not op.add_rows(scratch, xk, rows):
                op(scratch, xk, meta)
        res = bool(b.disagree) and (state.row_key is None or not b.disagree.isdisjoint(state.row_key))
        entry = (b, weakref.ref(x), version(x), scratch, res, meta)
        state.pending[key] = entry
    else:
        entry = state.pending.get(key)
        if entry is None or entry[0].pos.get(member) != where:      # (plans changed since its launch)
            return _UNGROUPED
        if entry[1]() is not x or entry[2] != version(x) or _needs_graph(state, x, output):
            if entry[1]() is not x:
                group.drop(member)      # not the plan's input (another call pattern): on its own from now on
            return _UNGROUPED
    b, _, _, scratch, res, meta = entry
    if i == len(b.plans[p]) - 1:
        state.pending.pop(key, None)    # the plan's last member: the scratch is not needed any more
    c = b.cols[p].get(member)
    rop = b.residual.get(member) if res else None
    if c is None and rop is None:
        return None                     # no adapter has weights in this member
    N = output.shape[-1]
    if output.numel() != meta.num_tokens * N:
        return _UNGROUPED
    y = output if output.is_contiguous() else output.contiguous()
    if slots.dora is not None:
        _dora(slots, state, y, meta, getattr(module, "bias", None))
    y2 = y.view(-1, N)
    if c is not None:
        y2.add_(scratch[:, c[0]:c[1]])
    if rop is not None:
        x2 = x.reshape(-1, x.shape[-1])
        rows = state.rows
        if rows is None or not rop.add_rows(y, x, rows):
            rop(y2, x2 if x2.dtype == slots.dtype else x2.to(slots.dtype), meta)
    return y


def _lora_hook(slots: LayerSlots, call: "contextvars.ContextVar[Optional[_CallState]]",
               group: Optional[Tuple[ProjectionGroup, int]] = None):
    name, device, dtype = slots.name, slots.device, slots.dtype
    group, member = group if group is not None else (None, -1)

    def hook(module, args, kwargs, output):
        state = call.get()
        if state is None:
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        if group is not None and group.bound.plans is None and not torch.compiler.is_compiling():
            observe(state, group, member, x)     # learning (any batch, base rows too): each on its own
        meta = state.meta
        if meta is None:
            return None
        if group is not None:
            out = _grouped(slots, group, member, state, module, x, output)
            if out is not _UNGROUPED:
                return out
        op = slots.op
        if op is None:
            return None
        if slots.dora is not None:
            y = output if output.is_contiguous() else output.contiguous()
            m = meta if y.numel() // max(y.shape[-1], 1) == meta.num_tokens and meta.device == device else \
                state.meta_for(tuple(x.shape[:-1]), device, name)
            _dora(slots, state, y, m, getattr(module, "bias", None))
            output = y
        # Decode-like CPU batches: one native call with the pointers of this forward's metadata
        # (a few attribute checks instead of the general path's; it declines anything unusual).
        rows = state.rows
        if rows is not None:
            add_rows = getattr(op, "add_rows", None)      # (BoundLoRA.add_rows)
            if add_rows is not None and add_rows(output, x, rows):
                return output
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] != meta.num_tokens or meta.device != device:
            meta = state.meta_for(tuple(x.shape[:-1]), device, name)
        y = output if output.is_contiguous() else output.contiguous()
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        # add_lora(y, x2, A_slots, B_slots, meta, scalings, ranks), weights checked once (BoundLoRA).
        # Building a graph (grad enabled and something requires grad: x, the base output, or a
        # trainable adapter of the batch here): the same call inside SlotDelta (training.py).
        if torch.is_grad_enabled():
            train = state.train.get(name) if state.train else None
            if train is not None or y.requires_grad or x2.requires_grad:
                owners, params = train or ((), ())
                return SlotDelta.apply(y, x2, op, meta, state, owners, *params)
        op(y.view(-1, y.shape[-1]), x2, meta)
        return y

    return hook


class _Forward:
    """A patched module's ``forward`` while it is patched (what :class:`_ForwardWrap` installs).
    A callable object rather than a closure: ``copy.deepcopy`` of the module copies it with the
    module, so the copy calls its own base forward (a closure would be shared and run the
    original module's), while the LoRA hook, a function, stays shared with the pool (as a hook
    would). ``__wrapped__`` keeps the wrapped forward's signature visible (generate() inspects
    it)."""

    def __init__(self, module: nn.Module, inner, hook, pre, post):
        self.module, self.__wrapped__ = module, inner
        self.hook, self.pre, self.post, self.active = hook, pre, post, True

    def __call__(self, *args, **kwargs):
        inner, module = self.__wrapped__, self.module
        if not self.active:
            return inner(*args, **kwargs)
        if self.pre is None:
            out = inner(*args, **kwargs)
            r = self.hook(module, args, kwargs, out)
            return out if r is None else r
        # the top model's: pre(module, args, kwargs) before, post(module, args) after, also when
        # the forward (or pre) raises, as an always_call forward hook would
        try:
            self.pre(module, args, kwargs)
            return inner(*args, **kwargs)
        finally:
            self.post(module, args)


class _ForwardWrap:
    """A patched module's LoRA, run inside its forward: ``out = forward(*args, **kwargs)``, then
    ``hook(module, args, kwargs, out)`` (its result, if not None, replaces ``out``), as a forward
    hook would, but without nn.Module's hook machinery: a module with any hook takes the slow
    call path, which on a CPU costs more than a decode step's native LoRA call (the patching's
    fixed cost, the "without the LoRA math" rows of benchmarks/results/pool_cpu.csv: 1.06x the
    base model with the top model's hooks at 7c614d5, 1.00x without at ff11e16). The wrapper
    (:class:`_Forward`) is an instance attribute ``forward`` over the module's own (class or
    instance) forward; other hooks of the module see the output with the LoRA added. The top
    model gets one too (``pre=`` / ``post=``: the batch metadata before its forward, the
    per-call state cleared after it, also when it raises). ``remove()`` restores the forward it
    found, or, when something wrapped the module's forward again after us (accelerate's hooks
    do), leaves that in place and makes ours a pass-through."""

    def __init__(self, module: nn.Module, hook=None, *, pre=None, post=None):
        self.module = module
        self.saved = module.__dict__.get("forward", _ForwardWrap)   # (a sentinel: nothing was set)
        self.wrapper = _Forward(module, module.forward, hook, pre, post)
        module.forward = self.wrapper

    def remove(self) -> None:
        m = self.module
        if m.__dict__.get("forward") is self.wrapper:
            if self.saved is _ForwardWrap:
                del m.forward
            else:
                m.forward = self.saved
        else:
            self.wrapper.active = False      # (wrapped again since: ours passes through)


def _embedding_hook(slots: LayerSlots, call: "contextvars.ContextVar[Optional[_CallState]]"):
    """An nn.Embedding's LoRA: the columns of lora_embedding_A picked by token id, then the expand
    (ops.api.add_lora_embedding), per row's adapter; DoRA's column scale like a linear layer's."""
    name, device = slots.name, slots.device

    def hook(module, args, kwargs, output):
        state = call.get()
        if state is None:
            return None
        meta, op = state.meta, slots.op
        if meta is None or op is None or not state.may_use([slots]):
            return None
        ids = args[0] if args else next(iter(kwargs.values()))
        if ids.numel() != meta.num_tokens or meta.device != device:
            meta = state.meta_for(tuple(ids.shape), device, name)
        y = output if output.is_contiguous() else output.contiguous()
        _dora(slots, state, y, meta, None)
        op(y.view(-1, y.shape[-1]), ids.reshape(-1), meta)
        return y

    return hook


# ------------------------------------------------------------------------------- the wrapper


def _storage_dtypes(picked: Sequence[Target], adapter_dtype: Optional[torch.dtype], backend: str
                    ) -> Dict[str, torch.dtype]:
    """Each patched layer's slot storage dtype for ``adapter_dtype`` (None: the layer's own), refused
    now (naming adapter_dtype, the layer and the backend) where no kernel would run it."""
    if adapter_dtype is None:
        return {t.name: t.weight.dtype for t in picked}
    if not isinstance(adapter_dtype, torch.dtype):
        raise TypeError(f"adapter_dtype: expected a torch.dtype or None, got {type(adapter_dtype).__name__}")
    if adapter_dtype in _FP8_DTYPES and adapter_dtype is not FP8:
        raise ValueError(f"adapter_dtype: {adapter_dtype} is not supported; the fp8 storage dtype is "
                         "torch.float8_e4m3fn (e4m3, a float32 scale per rank row: ops/fp8.py)")
    if adapter_dtype not in (torch.float32, torch.bfloat16, torch.float16, FP8):
        raise ValueError(f"adapter_dtype: expected torch.float32, torch.bfloat16, torch.float16, "
                         f"torch.float8_e4m3fn or None, got {adapter_dtype}")
    out = {}
    for t in picked:
        act = t.weight.dtype
        if adapter_dtype is FP8 and t.kind == "embedding":
            out[t.name] = act       # (an embedding LoRA's shrink is a gather: kept in the layer's dtype)
            continue
        if adapter_dtype not in STORAGE_DTYPES.get(act, (act,)):
            allowed = ", ".join(str(d).replace("torch.", "") for d in STORAGE_DTYPES.get(act, (act,)))
            raise ValueError(f"adapter_dtype: {adapter_dtype} is not a storage dtype for {t.name!r}, whose weights "
                             f"are {act} (storage dtypes of {str(act).replace('torch.', '')} layers: {allowed})")
        if adapter_dtype is not act:
            name = resolve_backend(backend, t.weight.device)
            w = torch.empty((0, 0, 0), dtype=adapter_dtype)
            try:
                check_storage(name, act, (w,))
            except TypeError as e:
                raise ValueError(f"adapter_dtype: {adapter_dtype} with {act} layers ({t.name!r}) is not supported "
                                 f"by backend {name!r}: {e}") from None
        out[t.name] = adapter_dtype
    return out


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what}: adapter names are strings, got {type(name).__name__}")
    if not name.strip():
        raise ValueError(f"{what}: empty adapter name {name!r}")
    if name == BASE:
        raise ValueError(f"{what}: {BASE!r} is reserved for the base model")
    return name


class MultiLoRAModel:
    """A Hugging Face model patched to serve many LoRA adapters at once (see :func:`patch_model`).

    The patched ``nn.Module`` is :attr:`model`; attributes not defined here (``config``,
    ``device``...) are forwarded to it. Inference only: calls run under ``torch.no_grad()``.
    """

    def __init__(self, model: nn.Module, *, max_adapters: int, max_rank: int, target_modules: TargetModules,
                 backend: str, host_budget_bytes: Optional[int], device_budget_bytes: Optional[int] = None,
                 adapter_dtype: Optional[torch.dtype] = None, group_projections: Union[bool, str] = "auto"):
        if not isinstance(group_projections, bool) and group_projections != "auto":
            raise TypeError(f"group_projections: expected a bool or \"auto\", got {group_projections!r}")
        for arg, v in (("max_adapters", max_adapters), ("max_rank", max_rank)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{arg}: expected a positive int, got {v!r}")
        if host_budget_bytes is not None and (not isinstance(host_budget_bytes, int) or host_budget_bytes < 0):
            raise ValueError(f"host_budget_bytes: expected None or a non-negative int, got {host_budget_bytes!r}")
        if backend not in BACKEND_CHOICES:
            raise ValueError(f"backend: unknown backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}")
        if getattr(model, "_openlora_patched", False):
            raise ValueError("model: already patched by openlora_kernels.patch_model; use that MultiLoRAModel")
        picked = select_modules(model, target_modules)
        for t in picked:
            resolve_backend(backend, t.weight.device)   # unavailable backend: fail now, not mid-forward
        storage = _storage_dtypes(picked, adapter_dtype, backend)
        self.model = model
        self.max_adapters, self.max_rank, self.backend = max_adapters, max_rank, backend
        self.adapter_dtype = adapter_dtype
        self.target_modules = target_modules
        arena = HostSlotArena()   # CPU layers' slots, packed in huge pages (pool.py)
        num_slots, rows = max_adapters, None
        if device_budget_bytes is not None:     # the rank-packed pool (pool.py, packed_layout)
            # each layer's rows in its slots' storage dtype (fp8: + two float32 scales per row)
            rows, num_slots = packed_layout([(t.in_features, t.out_features, t.experts) for t in picked],
                                            [storage[t.name].itemsize for t in picked], device_budget_bytes,
                                            max_rank, max_adapters,
                                            row_extra=[8 if storage[t.name] is FP8 else 0 for t in picked])
        self.num_slots = num_slots
        self._layers: Dict[str, LayerSlots] = {
            t.name: LayerSlots(t.name, t.in_features, t.out_features, num_slots, max_rank, t.weight.device,
                               t.weight.dtype, backend, arena, kind="embedding" if t.kind == "embedding" else
                               "experts" if t.kind == "experts" else "linear", experts=t.experts,
                               packed_rows=None if rows is None else rows * max(t.experts, 1),
                               storage_dtype=storage[t.name])
            for t in picked}
        self._targets: Dict[str, Target] = {t.name: t for t in picked}
        self._modules_by_name = dict(model.named_modules())
        self._all_modules = set(self._modules_by_name)
        self._all_params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        self._resolved: Dict[str, str] = {}
        # Weights files are checked against what this model accepts from their header, before
        # their data is read (a multi-GiB file with the wrong shapes is refused unread).
        expect = Expectation(check=self._check_shapes, max_bytes=self._max_adapter_bytes())
        self.pool = AdapterPool(self._layers, max_adapters, max_rank, self._bind, host_budget_bytes,
                                read=functools.partial(load_adapter_weights, expect=expect,
                                                       params=self._param_target),
                                device_budget_bytes=device_budget_bytes)
        self._meta_cache = _MetaCache(num_slots)
        # This model's batch state per call (module doc of _CallState); set_batch() spans, by id,
        # with the thread that opened them (a forward elsewhere without a batch of its own refuses
        # to guess whether it was meant to use one).
        self._call: "contextvars.ContextVar[Optional[_CallState]]" = contextvars.ContextVar(
            f"openlora_call_{id(self):x}", default=None)
        self._fixed: Dict[int, str] = {}
        self._hooks = [_ForwardWrap(model, pre=self._pre_forward, post=self._post_forward)]
        # Sibling linears reading the same input: one launch per group (hf_groups.py), with
        # group_projections=True. "auto" (the default) groups nothing for now: measured, the
        # group's scratch fill and slice adds cost more than the calls they save on every path so
        # far (a CPU decode step: bench_storage_dtype's openlora_bf16_grouped row; a CPU prefill;
        # the GPU host path, bench_host_overhead --grouped), until the kernels write each slice
        # into its own output (docs/architecture.md, "Projection groups").
        self.group_projections = group_projections
        self._groups = candidate_groups(picked, self._layers) if group_projections is True else {}
        # Encoder-decoder models: the encoder and the decoder each lay their tokens out as
        # [batch, their seq], and generate calls the encoder by itself (outside the model's forward).
        for stack in _stacks(model):
            self._hooks += [stack.register_forward_pre_hook(self._enter_stack, with_kwargs=True),
                            stack.register_forward_hook(self._exit_stack, always_call=True)]
        experts: Dict[int, Tuple[nn.Module, Dict[str, LayerSlots]]] = {}
        for t in picked:
            ls = self._layers[t.name]
            if t.kind == "experts":          # one hook per experts module, for all its patched weights
                experts.setdefault(id(t.module), (t.module, {}))[1][t.param] = ls
            elif t.param is not None:        # a router weight, applied where F.linear uses it
                pre, post = param_hooks(t.module, t.param, ls, self._call)
                self._hooks += [t.module.register_forward_pre_hook(pre),
                                t.module.register_forward_hook(post, always_call=True)]
            else:
                hook = _embedding_hook(ls, self._call) if t.kind == "embedding" else \
                    _lora_hook(ls, self._call, self._groups.get(t.name))
                self._hooks.append(_ForwardWrap(t.module, hook))
        for mod, params in experts.values():
            self._hooks.append(mod.register_forward_hook(experts_hook(params, self._call, num_slots),
                                                         with_kwargs=True))
        # Gradient checkpointing replays a layer's forward during the backward, outside the call:
        # the checkpoint function of every layer that has one is wrapped so the replay sees the batch
        # it first ran with (training.py).
        # (Checked by the model's pre-forward step, once per forward: a pre-hook on every decoder
        # layer would put each on nn.Module's slow call path.)
        self._checkpointing = [mod for mod in model.modules() if hasattr(mod, "gradient_checkpointing")]
        self._trainable: Dict[str, TrainableAdapter] = {}
        self._conv1d = any(t.param is None and linear_dims(t.module) is not None and not isinstance(t.module, nn.Linear)
                           for t in picked)
        model._openlora_patched = True

    # ------------------------------------------------------------------------------ adapters

    @property
    def adapters(self) -> Tuple[str, ...]:
        """Names of the registered adapters, in load order."""
        return self.pool.names

    @property
    def patched_modules(self) -> Tuple[str, ...]:
        return tuple(self._layers)

    def load_adapter(self, name: str, source: Any, *, pin: bool = False, trainable: bool = False,
                     r: Optional[int] = None, lora_alpha: Optional[float] = None, target_modules: Any = None,
                     use_rslora: Optional[bool] = None) -> None:
        """Register adapter ``name`` from ``source``: a PEFT adapter directory, a Hub repo id
        ("org/name"), an :class:`~openlora_kernels.adapters.AdapterSource` or a callable returning
        ``(config, tensors)``. It is read and checked now and kept in host memory; it is copied to
        a device slot when a batch first needs it (``pin=True``: now, and kept there).

        ``trainable=True`` (docs/training.md): the adapter is pinned and its weights become
        Parameters (:meth:`adapter_parameters`) that a batch's backward gives gradients to. With
        ``source=None`` a new adapter is created as PEFT creates one (lora_A Kaiming-uniform,
        lora_B zero) from ``r``, ``lora_alpha`` (default 8), ``target_modules`` (PEFT's rules over
        the patched modules; None: all of them) and ``use_rslora``; with a source, its config rules
        and passing any of those raises ValueError.

        Any error (missing files, unsupported config, shapes that do not fit, rank above
        max_rank...) leaves everything as it was: the name is not registered.
        """
        self._check_open()
        _check_name(name, "name")
        if not isinstance(trainable, bool):
            raise TypeError(f"trainable: expected a bool, got {type(trainable).__name__}")
        if trainable and self.pool.packed:
            raise ValueError("trainable: training needs the padded pool (its Parameters view [slot, rank, "
                             "features] slices); patch without device_budget_bytes to train")
        if trainable and any(ls.storage_dtype is not ls.dtype for ls in self._layers.values()):
            raise NotImplementedError(f"trainable: training an adapter stored in adapter_dtype={self.adapter_dtype} "
                                      "(not the layers' dtype) is not supported; patch the model without "
                                      "adapter_dtype to train")
        given = {k: v for k, v in (("r", r), ("lora_alpha", lora_alpha), ("target_modules", target_modules),
                                   ("use_rslora", use_rslora)) if v is not None}
        if source is None:
            if not trainable:
                raise ValueError("source: None creates a new adapter, which needs trainable=True")
            if r is None:
                raise ValueError("r: a new adapter (source=None) needs its rank")
            layers = {n: (ls.in_features, ls.out_features) for n, ls in self._layers.items()
                      if self._targets[n].kind == "linear" and self._targets[n].param is None}
            config, tensors = fresh_adapter(layers, r=r, lora_alpha=lora_alpha, target_modules=target_modules,
                                            use_rslora=bool(use_rslora), fan_in_fan_out=self._conv1d)
            src = resolve_source(lambda: (config, tensors))
        else:
            if given:
                raise ValueError(f"{', '.join(given)}: given with a source, whose adapter_config decides them; "
                                 "pass them only with source=None (a new adapter)")
            src = resolve_source(source)
        self.pool.register(name, src)
        if pin or trainable:
            try:
                slot = self.pool.pin(name)
                if trainable:
                    config, ranks = self.pool.adapter_info(name)
                    self._check_trainable(name, config, ranks)
                    self._trainable[name] = slot_parameters(name, slot, config, self._layers, ranks)
            except BaseException:
                self.pool.unregister(name)
                raise

    def prefetch(self, names: Union[str, Sequence[str], Dict[str, Any]]) -> Prefetch:
        """Bring adapters in ahead of use, in the background; returns at once.

        ``names``: a loaded adapter's name or a list of them (weights the host budget dropped are
        read again from their source; then each is copied into a device slot), or a dict
        ``{name: source}`` of new adapters (read and checked as :meth:`load_adapter` would, then
        copied into a slot). Meanwhile forwards go on; one that needs an adapter still in flight
        waits for that adapter alone. A failed prefetch changes nothing: its error is raised at the
        next use of the name (a forward, pin, acquire), once. Returns a handle with ``done()`` and
        ``wait(timeout=None)``. Bad arguments (an unknown name, a new name already loaded, a
        source of the wrong type) raise now.
        """
        self._check_open()
        if isinstance(names, str):
            names = [names]
        if isinstance(names, dict):
            items = {}
            for n, source in names.items():
                _check_name(n, "names")
                items[n] = resolve_source(source) if source is not None else None
        else:
            try:
                names = list(names)
            except TypeError:
                raise TypeError(f"names: expected a name, a list of names or a dict {{name: source}}, got "
                                f"{type(names).__name__}") from None
            for n in names:
                _check_name(n, "names")
            items = dict.fromkeys(names)
        return self.pool.prefetch(items)

    def _check_trainable(self, name: str, config: Dict[str, Any], ranks: Dict[str, int]) -> None:
        """Training covers plain LoRA on Linear / Conv1D modules (docs/training.md)."""
        if config.get("use_dora"):
            raise NotImplementedError(f"adapter {name!r}: training a DoRA adapter (use_dora) is not supported; "
                                      "load it with trainable=False to serve it")
        other = [n for n in ranks if self._targets[n].kind != "linear" or self._targets[n].param is not None]
        if other:
            raise NotImplementedError(f"adapter {name!r}: training LoRA on {other[0]!r} (an embedding or a parameter "
                                      "target) is not supported; load it with trainable=False to serve it")

    def unload_adapter(self, name: str) -> None:
        """Forget ``name``: its host memory is dropped and the name can be loaded again at once;
        its slot is freed now, or when the last batch being served with it ends (those finish with
        it). An adapter held with :meth:`acquire` must be released first (RuntimeError). A
        trainable adapter's weights are gone with it: :meth:`save_adapter` it first."""
        self._check_open()
        self.pool.unregister(name)
        self._trainable.pop(name, None)

    def pin(self, name: str) -> int:
        """Load ``name`` into a device slot now and never evict it until :meth:`unpin`."""
        self._check_open()
        return self.pool.pin(name)

    def unpin(self, name: str) -> None:
        self._check_open()
        if name in self._trainable:
            raise ValueError(f"name: adapter {name!r} is trainable: its weights live in its slot, which stays "
                             "pinned until unload_adapter (save_adapter it first)")
        self.pool.unpin(name)

    def adapter_parameters(self, name: str) -> Dict[str, nn.Parameter]:
        """``{f"{module}.lora_A": Parameter [r, K], f"{module}.lora_B": Parameter [N, r]}`` for each
        module the adapter targets (names as in ``model.named_modules()``, PEFT's shapes). For a
        trainable adapter they are views of its device slot, the same objects on every call: give
        them to an optimizer, and a step changes what the next forward computes. For a frozen one,
        detached copies of its weights that never receive a gradient."""
        self._check_open()
        t = self._trainable.get(name)
        if t is not None:
            return t.parameters()
        host = self.pool.host_weights(name)
        out = {}
        for layer, w in host.items():
            out[f"{layer}.lora_A"] = nn.Parameter(w.a.detach().clone(), requires_grad=False)
            out[f"{layer}.lora_B"] = nn.Parameter(w.bt.detach().t().clone(), requires_grad=False)
        return out

    def save_adapter(self, name: str, path: Union[str, "os.PathLike[str]"]) -> None:
        """Write ``name`` as a PEFT adapter directly in ``path`` (adapter_config.json and
        adapter_model.safetensors; ``PeftModel.from_pretrained(base, path)`` loads it back), with
        its current weights: a trainable adapter's as trained."""
        self._check_open()
        config, _ = self.pool.adapter_info(name)
        params = self.adapter_parameters(name)
        weights = {}
        for key, p in params.items():
            module, part = key.rsplit(".", 1)
            weights.setdefault(module, [None, None])[0 if part == "lora_A" else 1] = p
        save_adapter(path, config, {m: (a, b) for m, (a, b) in weights.items()})

    def memory_report(self) -> MemoryReport:
        """Bytes per adapter, device bytes of the slot buffers, host bytes (print it for a table)."""
        self._check_open()
        return self.pool.memory_report()

    def _max_adapter_bytes(self) -> int:
        """The most bytes an adapter this model accepts can hold: every patched layer at max_rank
        in float64 (per expert for expert weights; with DoRA's magnitude vector), plus copies of the
        embeddings PEFT saves beside adapters that target them, plus 1 MiB of slack. A weights file
        beyond it is refused before it is read."""
        lora = sum(8 * (self.max_rank * (ls.in_features + ls.out_features) * max(ls.experts, 1) + ls.out_features)
                   for ls in self._layers.values())
        emb = 0
        for get in ("get_input_embeddings", "get_output_embeddings"):
            mod = getattr(self.model, get, lambda: None)()
            w = getattr(mod, "weight", None)
            emb += 8 * w.numel() if isinstance(w, torch.Tensor) else 0
        return lora + emb + (1 << 20)

    def _model_module(self, module: str) -> Optional[str]:
        """The model's name for the adapter's ``module`` (another wrapping level: a suffix either
        way), if exactly one module fits."""
        cands = [n for n in self._all_modules if n and (n == module or n.endswith("." + module)
                                                        or module.endswith("." + n))]
        return cands[0] if len(cands) == 1 else None

    def _param_host(self, module: str) -> bool:
        """Whether the LoRA saved under the adapter's ``module`` can only be a parameter target
        (PEFT's ``.base_layer`` nesting, or a module that is not a Linear / Conv1D / Embedding):
        its meaning needs the adapter's config (_param_target)."""
        stripped, depth = strip_base_layer(module)
        if depth:
            return True
        name = self._model_module(stripped)
        return name is not None and not _plain(self._modules_by_name[name])

    def _param_target(self, module: str, config: Dict[str, Any]) -> Optional[Tuple[str, int]]:
        """PEFT's target_parameters: which parameter the LoRA saved under ``module`` belongs to
        (adapters.ParamResolver). PEFT wraps the targeted parameters of a module in the order the
        module registers them, each wrapper around the previous: the last one's LoRA is saved under
        ``module.lora_A``, the one before under ``module.base_layer.lora_A``..."""
        stripped, depth = strip_base_layer(module)
        name = self._model_module(stripped)
        if name is None:
            return None
        mod = self._modules_by_name[name]
        if _plain(mod):
            return None
        targets = config.get("target_parameters") or ()
        wrapped = [p for p, _ in mod.named_parameters(recurse=False)
                   if any(f"{stripped}.{p}" == t or f"{stripped}.{p}".endswith("." + t) for t in targets)]
        if not wrapped:
            return None
        if depth >= len(wrapped):
            raise AdapterFormatError(f"module {module!r}: {depth} '.base_layer' wrappers, but target_parameters "
                                     f"wraps only {wrapped} of {name!r}")
        p = wrapped[len(wrapped) - 1 - depth]
        w = getattr(mod, p)
        return f"{stripped}.{p}", (w.shape[0] if w.dim() == 3 else 0)

    def _check_shapes(self, origin: str, shapes: Dict[str, Tuple[int, ...]]) -> None:
        """An adapter's LoRA tensor shapes (from a weights file's header) against the patched
        layers: the checks of _bind that need no data, made before the data is read (parameter
        targets, whose meaning needs the config, and DoRA magnitudes are checked by _bind)."""
        for key, shape in shapes.items():
            try:
                hit = split_key(key)
            except NotImplementedError as e:
                raise NotImplementedError(f"{origin}: {e}") from None
            if hit is None:        # a saved copy of a base parameter (or not LoRA at all): checked
                continue           # with its data by _bind, within the max_bytes bound
            module, part = hit
            if part == "lora_magnitude_vector" or self._param_host(module):
                continue
            layer = self._layer_for(module, origin)
            ls = self._layers[layer]
            self._check_kind(origin, module, layer, "embedding" if part.startswith("lora_embedding") else "linear")
            is_a = part in ("lora_A", "lora_embedding_A")
            if len(shape) != 2 or shape[1 if is_a else 0] != (ls.in_features if is_a else ls.out_features):
                want = f"[r, {ls.in_features}]" if is_a else f"[{ls.out_features}, r]"
                raise ValueError(f"{origin}: module {module!r} does not fit the model: {key!r} has shape "
                                 f"{tuple(shape)}, expected {part} {want} ({layer!r} maps {ls.in_features} -> "
                                 f"{ls.out_features} features)")
            r = shape[0] if is_a else shape[1]
            if r > self.max_rank:
                raise ValueError(f"{origin}: module {module!r} has rank {r}, above max_rank={self.max_rank}")

    def _check_kind(self, origin: str, module: str, layer: str, kind: str) -> None:
        t = self._targets[layer]
        have = "experts" if t.kind == "experts" else "param" if t.param is not None else t.kind
        if have != kind:
            what = {"linear": "lora_A / lora_B of a linear layer", "embedding": "lora_embedding_A / _B",
                    "param": "the LoRA of a parameter (target_parameters)", "experts": "expert weights"}
            raise ValueError(f"{origin}: module {module!r} carries {what[kind]}, but {layer!r} is "
                             f"{'an' if have in ('embedding', 'experts') else 'a'} {have} target "
                             f"({type(t.module).__name__})")

    def _base_weight(self, layer: str) -> torch.Tensor:
        """The patched layer's weight as [out_features, in_features] (DoRA's norms)."""
        t = self._targets[layer]
        w = t.weight.detach()
        if t.kind == "embedding" or (t.param is None and not isinstance(t.module, nn.Linear)):
            w = w.t()                       # nn.Embedding [V, D], Conv1D [K, N]
        return w

    def _bind(self, weights: AdapterWeights) -> Dict[str, HostLoRA]:
        """Check an adapter against the patched layers; host weights per layer in their dtype.

        DoRA: g = magnitude / ||W + scaling * B A|| (row norms of the [N, K] weight, PEFT's
        definition, in float32 from the layer's weight) is computed here, once; B is stored as
        diag(g) B and g is kept for the base output's scale (ops.api.dora_rescale). An embedding
        with an ``embed_scale`` (scaled word embeddings) scales its LoRA too, as PEFT does: folded
        into the scaling."""
        self._check_base_copies(weights)
        out: Dict[str, HostLoRA] = {}
        for mod, m in weights.modules.items():
            layer = self._layer_for(mod, weights.origin)
            ls = self._layers[layer]
            t = self._targets[layer]
            self._check_kind(weights.origin, mod, layer, "experts" if m.kind == "param" and m.experts else m.kind)
            if m.rank > self.max_rank:
                raise ValueError(f"{weights.origin}: module {mod!r} has rank {m.rank}, above max_rank={self.max_rank}")
            if m.experts and m.experts != t.experts:
                raise ValueError(f"{weights.origin}: module {mod!r} has LoRA for {m.experts} experts, but {layer!r} "
                                 f"holds {t.experts}")
            if m.a.shape[-1] != ls.in_features or m.b.shape[-2] != ls.out_features:
                raise ValueError(
                    f"{weights.origin}: module {mod!r} does not fit the model: lora_A {tuple(m.a.shape)} and lora_B "
                    f"{tuple(m.b.shape)}, but {layer!r} maps {ls.in_features} -> {ls.out_features} features "
                    f"(expected lora_A [r, {ls.in_features}] and lora_B [{ls.out_features}, r])")
            if layer in out:
                raise ValueError(f"{weights.origin}: two modules of the adapter map to layer {layer!r}")
            b, scaling, g = m.b, m.scaling, None
            if m.magnitude is not None:      # (on the weight's device: no host copy of a big weight)
                w = self._base_weight(layer)
                a32, b32 = m.a.to(w.device, torch.float32), m.b.to(w.device, torch.float32)
                norm = torch.linalg.norm(w.float() + m.scaling * (b32 @ a32), dim=1)
                g = (m.magnitude.to(w.device, torch.float32) / norm).cpu()
                b = g[:, None] * m.b.float()
            es = getattr(t.module, "embed_scale", None) if t.kind == "embedding" else None
            if es is not None:
                es = float(es.reshape(()).item()) if isinstance(es, torch.Tensor) and es.numel() == 1 else float(es)
                scaling = scaling * es
            sa = sb = None
            if ls.storage_dtype is FP8:     # one float32 scale per rank row of A and of Bᵀ (ops/fp8.py)
                a, sa = quantize_rows(m.a, f"{weights.origin}: {mod!r} lora_A")
                bt, sb = quantize_rows(b.transpose(-1, -2), f"{weights.origin}: {mod!r} lora_B")
                bt = bt.contiguous()
            else:
                a = m.a.to(ls.storage_dtype).contiguous()        # (the host copy in the storage dtype too)
                bt = b.to(ls.storage_dtype).transpose(-1, -2).contiguous()
            if ls.device.type == "cuda":
                a, bt = a.pin_memory(), bt.pin_memory()
                g = g.pin_memory() if g is not None else None
                sa, sb = (sa.pin_memory(), sb.pin_memory()) if sa is not None else (None, None)
            out[layer] = HostLoRA(a, bt, scaling, dora_scale=g, a_scale=sa, b_scale=sb)
        return out

    def _check_base_copies(self, weights: AdapterWeights) -> None:
        """Base parameters saved with the adapter must be the model's own (else it needs weights
        this library does not swap per request: resized embeddings, modules_to_save...)."""
        if not weights.base_copies:
            return
        params = dict(self.model.named_parameters(remove_duplicate=False))     # tied weights under each name
        for name, t in weights.base_copies.items():
            hits = [n for n in params if n == name or n.endswith("." + name) or name.endswith("." + n)]
            if len(hits) != 1:
                raise ValueError(f"{weights.origin}: tensor {name!r} of the adapter matches no parameter of the model")
            p = params[hits[0]]
            if p.shape != t.shape or not torch.equal(p.detach().cpu(), t.to(p.dtype)):
                raise NotImplementedError(
                    f"{weights.origin}: the adapter carries its own {name!r} {tuple(t.shape)}, different from the "
                    f"model's {tuple(p.shape)}; replacing base weights per adapter is not supported")

    def _layer_for(self, module: str, origin: str) -> str:
        hit = self._resolved.get(module)
        if hit is not None:
            return hit
        if module in self._layers:
            hit = module
        else:   # the adapter was saved from another wrapping level (e.g. LlamaModel vs LlamaForCausalLM)
            cands = [n for n in self._layers if n.endswith("." + module) or module.endswith("." + n)]
            if len(cands) == 1:
                hit = cands[0]
            elif module in self._all_modules or any(n.endswith("." + module) for n in self._all_modules):
                raise ValueError(f"{origin}: module {module!r} is not patched (target_modules="
                                 f"{self.target_modules!r}); patch the model with target_modules including it")
            elif any(n == module or n.endswith("." + module) for n in self._all_params):
                raise ValueError(f"{origin}: parameter {module!r} is not patched: parameter targets "
                                 "(target_parameters) are served on the expert and router weights of transformers "
                                 f"MoE blocks (target_modules={self.target_modules!r})")
            else:
                raise ValueError(f"{origin}: module {module!r} does not exist in the model")
        self._resolved[module] = hit
        return hit

    # -------------------------------------------------------------------------------- batches

    def __call__(self, *args, adapter_names: Optional[Sequence[Optional[str]]] = None, **kwargs):
        """The model's forward with one adapter per batch row (PEFT's ``adapter_names`` meaning:
        None or "__base__" = the base model). Without adapter_names: the batch set with
        :meth:`set_batch`, else the base model."""
        self._check_open()
        with self._rows(adapter_names, args, kwargs) as training:
            # a graph only when grad is enabled and a trainable adapter is in the batch
            with contextlib.nullcontext() if training and torch.is_grad_enabled() else torch.no_grad():
                return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: Optional[Sequence[Optional[str]]] = None, **kwargs):
        """``model.generate`` with one adapter per batch row (beams and num_return_sequences follow
        their row)."""
        self._check_open()
        with self._rows(adapter_names, args, kwargs):
            return self.model.generate(*args, **kwargs)

    def forward(self, *args, **kwargs):
        return self(*args, **kwargs)

    @contextlib.contextmanager
    def _rows(self, adapter_names, args, kwargs) -> Iterator[bool]:
        """This call's batch state for ``adapter_names``; yields whether a trainable adapter is in
        it (the call may then build a graph, which keeps the state and its lease until it is
        freed)."""
        if adapter_names is None:
            state = self._call.get()
            yield bool(state is not None and state.train)
            return
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise TypeError(f"adapter_names: expected a list with one name (or None) per batch row, "
                            f"got {type(adapter_names).__name__}")
        inp = _model_input(args, kwargs)
        if inp is not None and inp.dim() >= 2 and len(adapter_names) != inp.shape[0]:
            raise ValueError(f"adapter_names: {len(adapter_names)} names for a batch of {inp.shape[0]} rows "
                             "(one name or None per row)")
        try:
            distinct = dict.fromkeys(adapter_names)   # each distinct name once (batches repeat names)
        except TypeError:
            raise TypeError("adapter_names: entries must be adapter names (str) or None") from None
        names = []
        for n in distinct:
            if n is None or n == BASE:
                continue
            if n not in self.pool:
                where = f"adapter_names[{list(adapter_names).index(n)}]"
                _check_name(n, where)
                known = ", ".join(repr(k) for k in self.pool.names) or "none"
                raise KeyError(f"{where}: adapter {n!r} is not loaded (loaded: {known})")
            names.append(n)     # registered names are non-empty strings: checked at load_adapter
        lease = self.pool.lease(names) if names else None    # held until the call returns
        try:
            # row_key None: every row is the base model (no metadata, the hooks do nothing)
            row_key = tuple(-1 if (n is None or n == BASE) else lease.slots[n] for n in adapter_names) if lease else None
            state = _CallState(row_key, lease=lease, train=self._train_layers(names))
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        token = self._call.set(state)
        try:
            yield state.train is not None
        finally:
            self._call.reset(token)
            if lease is not None and not (state.train and torch.is_grad_enabled()):
                lease.release()              # else with the state: when the graph built over it is freed

    def _train_layers(self, names: Sequence[str]) -> Optional[Dict[str, Tuple[tuple, tuple]]]:
        """Per layer, the (owner, Parameter) pairs of the trainable adapters among ``names``."""
        picked = [self._trainable[n] for n in names if n in self._trainable]
        if not picked:
            return None
        out: Dict[str, Tuple[list, list]] = {}
        for t in picked:
            for layer, (r, a, b) in t.layers.items():
                owners, params = out.setdefault(layer, ([], []))
                owners += [(t.slot, r, True, a.dtype), (t.slot, r, False, b.dtype)]
                params += [a, b]
        return {layer: (tuple(o), tuple(p)) for layer, (o, p) in out.items()}

    def _wrap_checkpointing(self, module) -> None:
        """(by the model's pre-forward step, for each layer that can checkpoint) Wrap its checkpoint
        function once, so that the replay during the backward runs with the batch state of the
        first run (gradient_checkpointing_enable() may set it between any two forwards)."""
        fn = module.__dict__.get("_gradient_checkpointing_func")
        if fn is None or getattr(fn, "_openlora_call", None) is self._call:
            return None
        call = self._call

        def checkpointed(function, *a, **kw):
            state = call.get()
            if state is None:
                return fn(function, *a, **kw)

            def run(*ra, **rk):
                token = call.set(state)
                try:
                    return function(*ra, **rk)
                finally:
                    call.reset(token)
            return fn(run, *a, **kw)

        checkpointed._openlora_call = call
        module._gradient_checkpointing_func = checkpointed
        return None

    def _enter_stack(self, module, args, kwargs):
        state = self._call.get()
        if state is not None:
            state.enter_stack(args, kwargs, self._meta_cache)
        return None

    def _exit_stack(self, module, args, output):
        state = self._call.get()
        if state is not None:
            state.exit_stack()
        return None

    def _post_forward(self, module, args):
        state = self._call.get()
        if state is not None:
            finish_forward(state)

    def _pre_forward(self, module, args, kwargs):
        for mod in self._checkpointing:
            if "_gradient_checkpointing_func" in mod.__dict__:
                self._wrap_checkpointing(mod)
        state = self._call.get()
        if state is not None:
            state.begin_forward(args, kwargs, self._meta_cache)
        elif self._fixed:
            owners = ", ".join(sorted(set(self._fixed.values())))
            raise RuntimeError(
                f"the patched model was called in thread {threading.current_thread().name!r} with no batch of its "
                f"own while set_batch() is active in thread(s) {owners}: batch state belongs to the thread that "
                "set it; call set_batch() (or lm(..., adapter_names=...)) in the thread that runs the forward")
        return None

    # ------------------------------------------------------------------ serving-stack entry

    def acquire(self, names: Sequence[str]) -> Dict[str, int]:
        """Load ``names`` into device slots and hold them there until :meth:`release`;
        returns {name: slot} for building per-token slot ids."""
        self._check_open()
        for i, n in enumerate(names):
            _check_name(n, f"names[{i}]")
        return self.pool.acquire(list(names))

    def release(self, names: Optional[Sequence[str]] = None) -> None:
        """Undo one :meth:`acquire` of each name (every acquire when ``names`` is None): counted,
        so a name acquired twice stays held until released twice."""
        self.pool.release(names)

    def set_batch(self, slots: Union[torch.Tensor, LoRABatchMeta, Sequence[Optional[str]]]) -> LoRABatchMeta:
        """Fix the adapters of every following forward IN THIS THREAD, per TOKEN, until
        :meth:`clear_batch`.

        ``slots``: a LoRABatchMeta, a [T] int tensor of slot ids (-1 = base; slots from
        :meth:`acquire` or :meth:`pin`, which keep them from being re-assigned), or a list of T
        adapter names (None / "__base__" = base; held here until clear_batch). The model must then
        be called with inputs flattening to exactly T tokens (packed / variable-length batches),
        with no extra arguments: ``lm.model(...)``. While it is active, a forward in another thread
        that has no batch of its own raises RuntimeError instead of guessing.
        """
        self._check_open()
        self.clear_batch()
        lease = None
        if isinstance(slots, LoRABatchMeta):
            if slots.num_slots != self.num_slots:
                raise ValueError(f"slots: the metadata was built for {slots.num_slots} slots, but the pool has "
                                 f"{self.num_slots} slot ids (max_adapters={self.max_adapters})")
            meta = slots
        elif isinstance(slots, torch.Tensor):
            meta = build_batch_meta(slots, self.num_slots)
        elif isinstance(slots, Sequence) and not isinstance(slots, str):
            for i, n in enumerate(slots):
                if n is not None and n != BASE:
                    _check_name(n, f"slots[{i}]")
            lease = self.pool.lease([n for n in slots if n is not None and n != BASE])
            device = next(iter(self._layers.values())).device
            ids = [-1 if (n is None or n == BASE) else lease.slots[n] for n in slots]
            try:
                meta = build_batch_meta(torch.tensor(ids, dtype=torch.int32).to(device), self.num_slots)
            except BaseException:
                lease.release()
                raise
        else:
            raise TypeError(f"slots: expected a LoRABatchMeta, a tensor of slot ids or a list of adapter names, "
                            f"got {type(slots).__name__}")
        train = self._train_layers([n for n in slots if n is not None and n != BASE]) if lease is not None else None
        state = _CallState(fixed=meta, lease=lease, train=train)
        self._fixed[id(state)] = threading.current_thread().name
        self._call.set(state)
        return meta

    def clear_batch(self) -> None:
        """End this thread's set_batch() (releasing what a list of names acquired); a no-op
        without one."""
        state = self._call.get()
        if state is None or state.fixed is None:
            return
        self._call.set(None)
        self._fixed.pop(id(state), None)
        if state.lease is not None and not state.train:
            state.lease.release()       # with trainable adapters: when the graphs built over it are freed

    @contextlib.contextmanager
    def batch(self, slots) -> Iterator[LoRABatchMeta]:
        """``with lm.batch(slots): lm.model(...)`` — set_batch / clear_batch around a block."""
        meta = self.set_batch(slots)
        try:
            yield meta
        finally:
            self.clear_batch()

    # ---------------------------------------------------------------------------------- misc

    def unpatch(self) -> nn.Module:
        """Remove the hooks and the slot buffers; returns the original model, unchanged. This
        object is closed afterwards: its methods raise RuntimeError (patch the model again)."""
        self.pool.close()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._layers.clear()
        self.model._openlora_patched = False
        self._closed = True
        return self.model

    def _check_open(self) -> None:
        if self.__dict__.get("_closed"):
            raise RuntimeError("this MultiLoRAModel was unpatched (unpatch()); call patch_model() again")

    def __getattr__(self, name: str):
        if name.startswith("_") or name in ("model", "pool"):
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        return (f"MultiLoRAModel({type(self.model).__name__}, {len(self._layers)} patched modules, "
                f"max_adapters={self.max_adapters}, max_rank={self.max_rank}, adapters={list(self.adapters)})")


def patch_model(model: nn.Module, max_adapters: int = 8, max_rank: int = 64, target_modules: TargetModules = None,
                backend: str = "auto", *, host_budget_bytes: Optional[int] = None,
                device_budget_bytes: Optional[int] = None, adapter_dtype: Optional[torch.dtype] = None,
                group_projections: Union[bool, str] = "auto") -> MultiLoRAModel:
    """Patch ``model`` in place (forward wrappers; weights untouched) to serve many LoRA adapters.

    Args:
        model: a Hugging Face ``PreTrainedModel`` (or any nn.Module with Linear / Conv1D layers).
        max_adapters: device slots per patched layer = most distinct adapters in one batch.
        max_rank: largest adapter rank accepted; slot buffers are [max_adapters, max_rank, features].
        target_modules: which modules can carry adapters. None / "all-linear": every Linear and
            Conv1D except the output embedding; a list of names (suffix match, like PEFT) or a regex.
        backend: kernel backend for add_lora ("auto": Triton on a GPU, torch on the CPU).
        host_budget_bytes: most bytes of adapter weights kept in host memory (None: no limit);
            past it the least recently used adapters are dropped and re-read from their source.
        device_budget_bytes: None (default): padded slots, [max_adapters, max_rank, features] per
            layer. An int: the RANK-PACKED pool: each layer holds one buffer of rows sized so that
            all layers together take at most this many bytes; a resident adapter occupies only its
            own ranks' rows, so many more than max_adapters stay resident (max_adapters still
            bounds the distinct adapters of one batch); least-recently-used adapters are evicted
            until a new one fits (docs/usage.md, "Device memory").
        adapter_dtype: the dtype adapters are stored in (host copies and device slots); None: each
            layer's own dtype. torch.bfloat16 / torch.float16 for a float32 model halves the
            adapter bytes (the kernels upcast on load and accumulate in float32; backends "torch",
            "cpu", "triton"; docs/usage.md, "Adapter storage dtype"); torch.float8_e4m3fn (any
            float model) stores a byte per weight plus a float32 scale per rank row (ops/fp8.py;
            inference only). A bfloat16 model also takes torch.float16; nothing wider than the
            model's own dtype.
        group_projections: sibling modules that read the same input (q/k/v_proj, gate/up_proj) make
            one multi-slice LoRA launch together instead of one each (hf_groups.py; found during the
            first forward). "auto" (default): no grouping for now; measured, the group's scratch
            fill and slice adds cost more than the calls they save (a CPU decode step, a CPU
            prefill, the GPU host path) until the kernels write each slice to
            its own output. True: every batch, every device. False: every module its own call.
    """
    return MultiLoRAModel(model, max_adapters=max_adapters, max_rank=max_rank, target_modules=target_modules,
                          backend=backend, host_budget_bytes=host_budget_bytes,
                          device_budget_bytes=device_budget_bytes, adapter_dtype=adapter_dtype,
                          group_projections=group_projections)
