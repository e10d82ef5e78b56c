"""torch.library custom ops: ``openlora::add_lora``, ``openlora::lora_shrink``, ``openlora::lora_expand``
and their autograd.

They take already-validated arguments (see ``api.py``) and a concrete backend name, so
torch.compile sees one opaque op per call (fake implementations give output shapes; the mutated
``y`` is declared) and CUDA-graph capture records whatever the backend launches. Value checks
that read tensor contents (metadata consistency, ranks <= R) run inside the real implementations: always on CPU,
with debug checks on GPU (``checks.py``).

Backends are imported on first use, so importing the package never imports triton or touches a GPU.

In eager mode ``api.py`` calls the ``run_*`` functions below directly: they are exactly what the
ops run, minus the custom-op dispatch, which costs tens of microseconds per call in Python (as
much as a whole small LoRA layer on the CPU). Under torch.compile the ops are called.

Autograd: why two ops per mutating function
-------------------------------------------
``add_lora`` and ``lora_expand`` update ``y`` in place. torch.library's ``register_autograd``
accepts only FUNCTIONAL ops: it refuses a schema that mutates an argument ("Cannot register
autograd formula for non-functional operator ... Please create a functional operator"): the check
is in ``CustomOpDef.register_autograd`` from torch 2.4 on, so in 2.11 (the GPU machines) as in
2.13 (here, where it was run). A hand-written Autograd
kernel or an autograd.Function with ``mark_dirty`` around the mutating op would work in eager
mode, but is not what opcheck's autograd-registration test accepts, nor what AOTAutograd traces
reliably under torch.compile. So each mutating function has two registrations:

* ``openlora::add_lora`` / ``openlora::lora_expand`` (mutate ``y``, no autograd): the inference
  path. Used whenever grad mode is off or no argument requires grad: exactly the path and cost
  of an inference-only build (eager calls skip even the dispatcher, see above).
* ``openlora::add_lora_functional`` / ``openlora::lora_expand_functional`` (return a new
  ``y + delta``: a clone of y into which the same kernel adds, so the values are bit-for-bit the
  in-place ones) with ``register_autograd`` + ``setup_context``. ``api.py`` calls them when grad
  mode is on and an argument requires grad, then ``y.copy_(result)``: ``y`` is still updated in
  place and returned, and autograd records the copy like any in-place op (the version counter
  moves, so a backward that saved y's old value raises instead of using the new one; a leaf y
  that requires grad is refused, as torch refuses in-place ops on such leaves). The price of
  the autograd path is that clone and copy: two extra passes over y.

``openlora::lora_shrink`` is functional already: its autograd is registered on it directly.

The backward formulas call one custom op each (``openlora::add_lora_backward``,
``openlora::lora_shrink_backward``, ``openlora::lora_expand_backward``: opaque to torch.compile,
with fake implementations), whose real implementations (``backward.py``) reuse the backend's
shrink / expand kernels with the roles of A and B swapped for dx (and dh) and run the backend's
segmented weight-gradient product for dA and dB. They return float32 dA / dB, cast to the
weights' dtype by the backward formula. Gradients are computed only for the inputs that require
them (``ctx.needs_input_grad``); the gradient of y passes through unchanged. First order only:
the backward ops have no autograd of their own.
"""
from __future__ import annotations

import importlib
import weakref
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


# Metadata objects that eager calls passed to the ops (the autograd path calls the registered ops
# in eager mode too): id(tile_info) -> weak reference. An op given exactly that object's four
# tensors uses the object itself, so its memo (a CPU backend's row layout, the checks' verdict) is
# not rebuilt on every call and in the backward.
_known_meta: dict = {}
_KNOWN_META_MAX = 4096


def remember_meta(meta: LoRABatchMeta) -> None:
    """Let the ops' calls with ``meta``'s four tensors use ``meta`` itself (see _known_meta)."""
    ref = _known_meta.get(id(meta.tile_info))
    if ref is not None and ref() is meta:
        return
    if len(_known_meta) >= _KNOWN_META_MAX:
        _known_meta.clear()
    _known_meta[id(meta.tile_info)] = weakref.ref(meta)


def _meta(token_slots, sorted_tokens, seg_info, tile_info, num_slots: int, block_m: int, rows: int) -> LoRABatchMeta:
    """The metadata object of an op call (its structure is checked in __post_init__, a few
    attribute compares); ``rows``: the T of x / y, which the metadata must cover."""
    ref = _known_meta.get(id(tile_info))
    meta = ref() if ref is not None else None
    if (meta is None or meta.tile_info is not tile_info or meta.token_slots is not token_slots
            or meta.sorted_tokens is not sorted_tokens or meta.seg_info is not seg_info
            or meta.num_slots != num_slots or meta.block_m != block_m):
        meta = LoRABatchMeta(token_slots, sorted_tokens, seg_info, tile_info, num_slots=num_slots, block_m=block_m)
    if meta.num_tokens != rows:
        raise ValueError(f"indices: the batch metadata covers {meta.num_tokens} rows, but x/y have {rows}")
    return meta


# The value checks (metadata contents, ranks <= R) run here, before the backend: on CPU always,
# on GPU in debug mode; each memoises its verdict, so a layer's call pays a lookup.

def _packed_call(backend: str, what: str, packed, ranks, a_list=None, b_list=None, scales=None):
    """(module, a_list, b_list, ranks, packed, scales) for a backend call in the packed form: the
    backends with native packed addressing get it as it is; the reference ("torch") reads the
    slots' rows (and their fp8 scales) into padded stacks (ops/packed.py)."""
    from . import packed as _packed
    _packed.check_offsets(packed, ranks)
    mod = backend_module(backend)
    if getattr(mod, "SUPPORTS_PACKED", False):
        return mod, a_list, b_list, ranks, packed, scales
    if backend != "torch":
        raise NotImplementedError(f"offsets: the packed weight form is not implemented on backend {backend!r} "
                                  "yet (use backend 'cpu' or 'torch', or the padded [S, R, K] form)")
    a_pad, b_pad, eff = _packed.padded_from(packed, ranks, a_list, b_list)
    if scales is not None:
        scales = _packed.padded_scales(packed, scales)
    return mod, a_pad, b_pad, eff, None, scales


def _extra(packed, scales) -> dict:
    """The optional keyword arguments of a backend call (a backend without fp8 or packed support
    never sees them: the api refused those calls before)."""
    kw = {}
    if packed is not None:
        kw["packed"] = packed
    if scales is not None:
        kw["scales"] = scales
    return kw


def run_add_lora(y, x, lora_a, lora_b, scalings, ranks, meta: LoRABatchMeta, backend: str, packed=None,
                 scales=None) -> None:
    """``scales``: the fp8 weights' WeightScales (ops/fp8.py), or None."""
    check_batch_meta(meta)
    if ranks is not None:
        check_ranks(ranks, lora_a[0].shape[1])
    mod = backend_module(backend)
    if packed is not None:
        mod, lora_a, lora_b, ranks, packed, scales = _packed_call(backend, "add_lora", packed, ranks, lora_a, lora_b,
                                                                  scales)
    mod.add_lora(y, x, lora_a, lora_b, scalings, ranks, meta, **_extra(packed, scales))


def run_shrink(x, lora_a, ranks, meta: LoRABatchMeta, backend: str, out: Optional[torch.Tensor] = None,
               packed=None, scales=None) -> torch.Tensor:
    """``out``: internal, an [n, T, R] float32 tensor (any strides) to write h into instead of a new one."""
    check_batch_meta(meta)
    if ranks is not None:
        check_ranks(ranks, lora_a[0].shape[1])
    mod = backend_module(backend)
    if packed is not None:
        mod, lora_a, _, ranks, packed, scales = _packed_call(backend, "lora_shrink", packed, ranks, a_list=lora_a,
                                                             scales=scales)
    return mod.shrink(x, lora_a, ranks, meta, out=out, **_extra(packed, scales))


def run_expand(y, h, lora_b, scalings, ranks, meta: LoRABatchMeta, backend: str, packed=None, scales=None) -> None:
    check_batch_meta(meta)
    if ranks is not None:
        check_ranks(ranks, lora_b[0].shape[2])
    mod = backend_module(backend)
    if packed is not None:
        mod, _, lora_b, ranks, packed, scales = _packed_call(backend, "lora_expand", packed, ranks, b_list=lora_b,
                                                             scales=scales)
    mod.expand(y, h, lora_b, scalings, ranks, meta, **_extra(packed, scales))


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
    return x.new_empty((len(lora_a), x.shape[0], lora_a[0].shape[1]),
                       dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


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


# ------------------------------------------------------------------------------------ autograd
# (see the module docstring: functional twins of the mutating ops, register_autograd, and one
# opaque custom op per backward formula)

from . import backward as _bw  # noqa: E402  (backward.py calls the run_* functions above)


def _nondegenerate_add(y, x, lora_a) -> bool:
    S, R, K = lora_a[0].shape
    return x.shape[0] > 0 and y.shape[1] > 0 and S > 0 and R > 0 and K > 0


@torch.library.custom_op("openlora::add_lora_functional", mutates_args=())
def add_lora_functional_op(
    y: torch.Tensor, x: torch.Tensor, lora_a: List[torch.Tensor], lora_b: List[torch.Tensor],
    scalings: torch.Tensor, ranks: Optional[torch.Tensor],
    token_slots: torch.Tensor, sorted_tokens: torch.Tensor, seg_info: torch.Tensor, tile_info: torch.Tensor,
    block_m: int, backend: str,
) -> torch.Tensor:
    """``y + delta`` as a new tensor (y is not modified): ``openlora::add_lora`` on a clone."""
    meta = _meta(token_slots, sorted_tokens, seg_info, tile_info, lora_a[0].shape[0], block_m, x.shape[0])
    out = y.clone()
    if _nondegenerate_add(y, x, lora_a):
        run_add_lora(out, x, lora_a, lora_b, scalings, ranks, meta, backend)
    return out


@add_lora_functional_op.register_fake
def _(y, x, lora_a, lora_b, scalings, ranks, token_slots, sorted_tokens, seg_info, tile_info, block_m, backend):
    return torch.empty_like(y)


@torch.library.custom_op("openlora::add_lora_backward", mutates_args=())
def add_lora_backward_op(
    dy: torch.Tensor, x: torch.Tensor, lora_a: List[torch.Tensor], lora_b: List[torch.Tensor],
    scalings: torch.Tensor, ranks: Optional[torch.Tensor],
    token_slots: torch.Tensor, sorted_tokens: torch.Tensor, seg_info: torch.Tensor, tile_info: torch.Tensor,
    block_m: int, backend: str, need_x: bool, need_a: List[bool], need_b: List[bool], need_scal: bool,
) -> List[torch.Tensor]:
    """[dx (need_x)] + [dA_i for need_a[i]] + [dB_i for need_b[i]] + [dscalings (need_scal)];
    dA / dB float32 (dB in B_i's layout), dx in x's dtype."""
    meta = _meta(token_slots, sorted_tokens, seg_info, tile_info, lora_a[0].shape[0], block_m, x.shape[0])
    dx, dA, dB, ds = _bw.add_lora_backward(dy, x, lora_a, lora_b, scalings, ranks, meta, backend,
                                           need_x, need_a, need_b, need_scal)
    return _flat(dx, dA, dB, ds)


@add_lora_backward_op.register_fake
def _(dy, x, lora_a, lora_b, scalings, ranks, token_slots, sorted_tokens, seg_info, tile_info, block_m, backend,
      need_x, need_a, need_b, need_scal):
    dx = x.new_empty((x.shape[0], lora_a[0].shape[2])) if need_x else None
    dA = [_bw.a_grad_like(A) if need else None for A, need in zip(lora_a, need_a)]
    dB = [_bw.b_grad_like(B) if need else None for B, need in zip(lora_b, need_b)]
    return _flat(dx, dA, dB, scalings.new_empty(scalings.shape) if need_scal else None)


def _flat(*parts) -> List[torch.Tensor]:
    """The tensors of (tensor or None, list of tensors or None, ...) in order, Nones dropped."""
    out = []
    for p in parts:
        for t in (p if isinstance(p, list) else [p]):
            if t is not None:
                out.append(t)
    return out


def _take(outs: List[torch.Tensor], pos: int, need: bool):
    """(outs[pos] or None, next position)."""
    return (outs[pos], pos + 1) if need else (None, pos)


def _cast_list(outs, pos: int, need, like):
    """The gradients of a list argument (None where not needed), cast to each tensor's dtype."""
    res = []
    for t, nd in zip(like, need):
        g, pos = _take(outs, pos, nd)
        res.append(None if g is None else g.to(t.dtype))
    return res, pos


def _save_add(ctx, inputs, output):
    y, x, lora_a, lora_b, scalings, ranks, ts, st, seg, ti, block_m, backend = inputs
    ctx.n = len(lora_a)
    ctx.block_m, ctx.backend = block_m, backend
    ctx.save_for_backward(x, scalings, ranks, ts, st, seg, ti, *lora_a, *lora_b)


def _add_backward(ctx, dy):
    x, scalings, ranks, ts, st, seg, ti, *w = ctx.saved_tensors
    lora_a, lora_b = w[:ctx.n], w[ctx.n:]
    need = ctx.needs_input_grad
    need_y, need_x, need_a, need_b, need_scal = need[0], need[1], list(need[2]), list(need[3]), need[4]
    outs = []
    if need_x or any(need_a) or any(need_b) or need_scal:
        outs = torch.ops.openlora.add_lora_backward(dy, x, lora_a, lora_b, scalings, ranks, ts, st, seg, ti,
                                                   ctx.block_m, ctx.backend, need_x, need_a, need_b, need_scal)
    dx, pos = _take(outs, 0, need_x)
    dA, pos = _cast_list(outs, pos, need_a, lora_a)
    dB, pos = _cast_list(outs, pos, need_b, lora_b)
    ds, pos = _take(outs, pos, need_scal)
    return dy if need_y else None, dx, dA, dB, ds, None, None, None, None, None, None, None


add_lora_functional_op.register_autograd(_add_backward, setup_context=_save_add)


@torch.library.custom_op("openlora::lora_expand_functional", mutates_args=())
def lora_expand_functional_op(
    y: torch.Tensor, h: torch.Tensor, lora_b: List[torch.Tensor], scalings: torch.Tensor, ranks: Optional[torch.Tensor],
    token_slots: torch.Tensor, sorted_tokens: torch.Tensor, seg_info: torch.Tensor, tile_info: torch.Tensor,
    block_m: int, backend: str,
) -> torch.Tensor:
    """``y + scale * h Bᵀ`` as a new tensor: ``openlora::lora_expand`` on a clone of y."""
    meta = _meta(token_slots, sorted_tokens, seg_info, tile_info, lora_b[0].shape[0], block_m, y.shape[0])
    out = y.clone()
    if y.shape[0] and y.shape[1] and lora_b[0].shape[0] and h.shape[2]:
        run_expand(out, h, lora_b, scalings, ranks, meta, backend)
    return out


@lora_expand_functional_op.register_fake
def _(y, h, lora_b, scalings, ranks, token_slots, sorted_tokens, seg_info, tile_info, block_m, backend):
    return torch.empty_like(y)


@torch.library.custom_op("openlora::lora_expand_backward", mutates_args=())
def lora_expand_backward_op(
    dy: torch.Tensor, h: torch.Tensor, lora_b: List[torch.Tensor], scalings: torch.Tensor,
    ranks: Optional[torch.Tensor],
    token_slots: torch.Tensor, sorted_tokens: torch.Tensor, seg_info: torch.Tensor, tile_info: torch.Tensor,
    block_m: int, backend: str, need_h: bool, need_b: List[bool], need_scal: bool,
) -> List[torch.Tensor]:
    """[dh (need_h)] + [dB_i for need_b[i]] + [dscalings (need_scal)]; dh in h's dtype, dB float32."""
    meta = _meta(token_slots, sorted_tokens, seg_info, tile_info, lora_b[0].shape[0], block_m, dy.shape[0])
    dh, dB, ds = _bw.expand_backward(dy, h, lora_b, scalings, ranks, meta, backend, need_h, need_b, need_scal)
    return _flat(dh, dB, ds)


@lora_expand_backward_op.register_fake
def _(dy, h, lora_b, scalings, ranks, token_slots, sorted_tokens, seg_info, tile_info, block_m, backend,
      need_h, need_b, need_scal):
    dB = [_bw.b_grad_like(B) if need else None for B, need in zip(lora_b, need_b)]
    ds = scalings.new_empty(scalings.shape) if need_scal else None
    return _flat(h.new_empty(h.shape) if need_h else None, dB, ds)


def _save_expand(ctx, inputs, output):
    y, h, lora_b, scalings, ranks, ts, st, seg, ti, block_m, backend = inputs
    ctx.block_m, ctx.backend = block_m, backend
    ctx.save_for_backward(h, scalings, ranks, ts, st, seg, ti, *lora_b)


def _expand_backward(ctx, dy):
    h, scalings, ranks, ts, st, seg, ti, *lora_b = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_y, need_h, need_b, need_scal = need[0], need[1], list(need[2]), need[3]
    outs = []
    if need_h or any(need_b) or need_scal:
        outs = torch.ops.openlora.lora_expand_backward(dy, h, lora_b, scalings, ranks, ts, st, seg, ti,
                                                      ctx.block_m, ctx.backend, need_h, need_b, need_scal)
    dh, pos = _take(outs, 0, need_h)
    dB, pos = _cast_list(outs, pos, need_b, lora_b)
    ds, pos = _take(outs, pos, need_scal)
    return dy if need_y else None, dh, dB, ds, None, None, None, None, None, None, None


lora_expand_functional_op.register_autograd(_expand_backward, setup_context=_save_expand)


@torch.library.custom_op("openlora::lora_shrink_backward", mutates_args=())
def lora_shrink_backward_op(
    dh: torch.Tensor, x: torch.Tensor, lora_a: List[torch.Tensor], ranks: Optional[torch.Tensor],
    token_slots: torch.Tensor, sorted_tokens: torch.Tensor, seg_info: torch.Tensor, tile_info: torch.Tensor,
    block_m: int, backend: str, need_x: bool, need_a: List[bool],
) -> List[torch.Tensor]:
    """[dx (need_x)] + [dA_i for need_a[i]]; dx in x's dtype, dA float32."""
    meta = _meta(token_slots, sorted_tokens, seg_info, tile_info, lora_a[0].shape[0], block_m, x.shape[0])
    dx, dA = _bw.shrink_backward(dh, x, lora_a, ranks, meta, backend, need_x, need_a)
    return _flat(dx, dA)


@lora_shrink_backward_op.register_fake
def _(dh, x, lora_a, ranks, token_slots, sorted_tokens, seg_info, tile_info, block_m, backend, need_x, need_a):
    dx = x.new_empty((x.shape[0], lora_a[0].shape[2])) if need_x else None
    return _flat(dx, [_bw.a_grad_like(A) if need else None for A, need in zip(lora_a, need_a)])


def _save_shrink(ctx, inputs, output):
    x, lora_a, ranks, ts, st, seg, ti, block_m, backend = inputs
    ctx.block_m, ctx.backend = block_m, backend
    ctx.save_for_backward(x, ranks, ts, st, seg, ti, *lora_a)


def _shrink_backward(ctx, dh):
    x, ranks, ts, st, seg, ti, *lora_a = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_x, need_a = need[0], list(need[1])
    outs = []
    if need_x or any(need_a):
        outs = torch.ops.openlora.lora_shrink_backward(dh, x, lora_a, ranks, ts, st, seg, ti, ctx.block_m,
                                                      ctx.backend, need_x, need_a)
    dx, pos = _take(outs, 0, need_x)
    dA, pos = _cast_list(outs, pos, need_a, lora_a)
    return dx, dA, None, None, None, None, None, None, None


lora_shrink_op.register_autograd(_shrink_backward, setup_context=_save_shrink)
