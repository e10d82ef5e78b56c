"""Public multi-LoRA ops: ``add_lora``, ``lora_shrink``, ``lora_expand``.

These functions validate every argument (shape, dtype, device; a bad one raises ValueError or
TypeError naming it), build the batch metadata when given raw indices, resolve the backend and
call the registered custom op (``custom_ops.py``; in eager mode its implementation directly, without
the dispatch cost). They are plain Python over static tensor properties, so
torch.compile(fullgraph=True) traces straight through them.

Gradients: with grad mode on and an argument that requires grad (y, x, h, a lora_a / lora_b
tensor, scalings), the ops run through their autograd-registered functional custom ops
(``custom_ops.py``) and still update y in place; otherwise they take the inference path, whose
cost is unchanged. :func:`lora_backward` gives a model-patching layer that computes the
gradients itself in its own autograd.Function the same (dx, dA, dB) directly.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from .. import checks as _checks
from ..checks import check_batch_meta, check_ranks
from ..metadata import LoRABatchMeta, build_batch_meta
from . import backward as _backward
from . import custom_ops  # noqa: F401  (registers torch.ops.openlora.*)
from . import fp8 as _fp8
from . import packed as _packed
# fp8 storage's dtype and quantizer, re-exported: the pool and the patching reach them here
from .fp8 import FP8, WeightScales, dequantize_rows, quantize_rows  # noqa: F401
from .backends import resolve_backend

TensorOrList = Union[torch.Tensor, Sequence[torch.Tensor]]
Indices = Union[torch.Tensor, LoRABatchMeta]
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Storage dtypes of lora_a / lora_b for each activation dtype (x / y): the kernels upcast the
# weights on load and accumulate in float32 (docs/kernels.md, "Storage dtypes"). Which mixed
# pairs a backend runs: its module's MIXED_STORAGE (checked once the backend is resolved).
STORAGE_DTYPES = {
    torch.float32: (torch.float32, torch.bfloat16, torch.float16, _fp8.FP8),
    torch.bfloat16: (torch.bfloat16, torch.float16, _fp8.FP8),
    torch.float16: (torch.float16, _fp8.FP8),
    torch.float64: (torch.float64,),
}
_FP8 = _fp8.FP8_DTYPES


def _storage_ok(w_dtype: torch.dtype, act: torch.dtype, nm: str, act_name: str) -> None:
    """Refuses a weight dtype that is no storage dtype for activations of dtype ``act``."""
    if w_dtype in STORAGE_DTYPES.get(act, (act,)):
        return
    if w_dtype in _FP8 and w_dtype is not _fp8.FP8:
        raise TypeError(f"{nm}: storage dtype {w_dtype} is not supported; the fp8 storage dtype is "
                        "torch.float8_e4m3fn (with per-rank scales, ops/fp8.py)")
    allowed = ", ".join(str(d).replace("torch.", "") for d in STORAGE_DTYPES.get(act, (act,)))
    raise TypeError(f"{nm}: dtype {w_dtype} does not match {act_name}'s dtype {act} (storage dtypes for "
                    f"{str(act).replace('torch.', '')} activations: {allowed})")


def check_storage(backend: str, act: torch.dtype, a_list=(), b_list=()) -> None:
    """Refuses weights stored in a dtype other than ``act`` that backend ``backend`` (resolved)
    does not run (each backend's MIXED_STORAGE: the (activation, weight) dtype pairs it upcasts)."""
    ws = [("lora_a", W) for W in a_list] + [("lora_b", W) for W in b_list]
    if not ws:
        return
    if any(W.dtype is not ws[0][1].dtype for _, W in ws):
        odd = next((nm, W) for nm, W in ws if W.dtype is not act)
        other = next((nm, W) for nm, W in ws if W.dtype is not odd[1].dtype)
        raise TypeError(f"{odd[0]}: dtype {odd[1].dtype} does not match {other[0]}'s {other[1].dtype} (lora_a and "
                        "lora_b share one storage dtype)")
    w = ws[0][1].dtype
    if w is not act:
        mixed = getattr(custom_ops.backend_module(backend), "MIXED_STORAGE", frozenset())
        if (act, w) not in mixed:
            have = ", ".join(f"{str(b).replace('torch.', '')} weights with {str(a).replace('torch.', '')} "
                             "activations" for a, b in sorted(mixed, key=str)) or "none"
            raise TypeError(f"{ws[0][0]}: storage dtype {w} (adapter_dtype) with {act} activations is not "
                            f"supported by backend {backend!r} (its mixed storage dtypes: {have}); use "
                            "backend='torch' or store the adapters in the activations' dtype")


# ------------------------------------------------------------------------------ validation


def _tensor(v, name: str, dims: int) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(v).__name__}")
    if v.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}-D tensor, got shape {tuple(v.shape)}")
    return v


def _float(v: torch.Tensor, name: str, allow64: bool = False) -> None:
    """float16 / bfloat16 / float32; float64 too when ``allow64`` (backend "torch": the reference,
    computed in float64, e.g. for torch.autograd.gradcheck)."""
    if v.dtype not in FLOAT_DTYPES and not (allow64 and v.dtype == torch.float64):
        hint = " (float64 runs on backend='torch' only)" if v.dtype == torch.float64 else ""
        raise TypeError(f"{name}: expected float16, bfloat16 or float32, got {v.dtype}{hint}")


def _same_device(v: torch.Tensor, name: str, device: torch.device) -> None:
    if v.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {v.device}")


def _as_list(v: TensorOrList, name: str) -> Tuple[List[torch.Tensor], bool]:
    """(tensors, given_as_list)."""
    if isinstance(v, torch.Tensor):
        return [v], False
    if isinstance(v, (list, tuple)):
        if len(v) == 0:
            raise ValueError(f"{name}: expected a tensor or a non-empty list of tensors, got an empty list")
        for i, t in enumerate(v):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}]: expected a torch.Tensor, got {type(t).__name__}")
        return list(v), True
    raise TypeError(f"{name}: expected a tensor or a list of tensors, got {type(v).__name__}")


def _check_a(lora_a: TensorOrList, x: torch.Tensor) -> List[torch.Tensor]:
    a_list, is_list = _as_list(lora_a, "lora_a")
    shape = None
    for i, A in enumerate(a_list):
        nm = f"lora_a[{i}]" if is_list else "lora_a"
        _tensor(A, nm, 3)
        _same_device(A, nm, x.device)
        if A.dtype != x.dtype:
            _storage_ok(A.dtype, x.dtype, nm, "x")
        if A.shape[2] != x.shape[1]:
            raise ValueError(f"{nm}: shape {tuple(A.shape)} is [S, R, K] with K={A.shape[2]}, but x has K={x.shape[1]}")
        if shape is None:
            shape = A.shape
        elif A.shape != shape:
            raise ValueError(f"{nm}: shape {tuple(A.shape)} differs from lora_a[0]'s {tuple(shape)}; "
                             "all slices share [S, R, K]")
    return a_list


def _check_b(lora_b: TensorOrList, y: torch.Tensor, S: int, R: int, n_slices: int, a_is_list: Optional[bool],
             y_name: str = "y") -> List[torch.Tensor]:
    b_list, is_list = _as_list(lora_b, "lora_b")
    if a_is_list is not None and is_list != a_is_list:
        raise ValueError("lora_b: give lora_a and lora_b both as tensors or both as lists of per-slice tensors")
    if len(b_list) != n_slices:
        raise ValueError(f"lora_b: {len(b_list)} slices given, but lora_a has {n_slices}")
    for i, B in enumerate(b_list):
        nm = f"lora_b[{i}]" if is_list else "lora_b"
        _tensor(B, nm, 3)
        _same_device(B, nm, y.device)
        if B.dtype != y.dtype:
            _storage_ok(B.dtype, y.dtype, nm, y_name)
        if B.shape[0] != S:
            raise ValueError(f"{nm}: shape {tuple(B.shape)} is [S, N, R] with S={B.shape[0]}, but there are {S} slots")
        if B.shape[2] != R:
            raise ValueError(f"{nm}: shape {tuple(B.shape)} is [S, N, R] with R={B.shape[2]}, but the rank dimension is {R}")
    N = sum(B.shape[1] for B in b_list)
    if N != y.shape[1]:
        widths = " + ".join(str(B.shape[1]) for B in b_list)
        raise ValueError(f"{y_name}: has {y.shape[1]} columns, but lora_b's output widths sum to {N} ({widths})")
    return b_list


def _check_scalings(scalings, S: int, device: torch.device, allow64: bool = False) -> torch.Tensor:
    _tensor(scalings, "scalings", 1)
    if scalings.shape[0] != S:
        raise ValueError(f"scalings: expected shape [{S}] (one per slot), got {tuple(scalings.shape)}")
    if scalings.dtype != torch.float32 and not (allow64 and scalings.dtype == torch.float64):
        raise TypeError(f"scalings: expected dtype float32, got {scalings.dtype}")
    _same_device(scalings, "scalings", device)
    return scalings


def _check_ranks(ranks, S: int, n_slices: int, device: torch.device) -> Optional[torch.Tensor]:
    if ranks is None:
        return None
    if not isinstance(ranks, torch.Tensor):
        raise TypeError(f"ranks: expected a torch.Tensor or None, got {type(ranks).__name__}")
    if ranks.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ranks: expected dtype int32 or int64, got {ranks.dtype}")
    if tuple(ranks.shape) not in ((S,), (n_slices, S)):
        raise ValueError(f"ranks: expected shape [{S}] or [{n_slices}, {S}] (per slot, or per slice and slot), "
                         f"got {tuple(ranks.shape)}")
    _same_device(ranks, "ranks", device)
    return ranks


def _meta_for(indices: Indices, T: int, S: int, device: torch.device) -> LoRABatchMeta:
    if isinstance(indices, LoRABatchMeta):
        if indices.num_tokens != T:
            raise ValueError(f"indices: the batch metadata covers {indices.num_tokens} rows, but x/y have {T}")
        if indices.num_slots != S:
            raise ValueError(f"indices: the batch metadata was built for {indices.num_slots} slots, but the weights have {S}")
        _same_device(indices.token_slots, "indices", device)
        return indices
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices: expected a tensor of slot ids or a LoRABatchMeta, got {type(indices).__name__}")
    if indices.dim() != 1 or indices.shape[0] != T:
        raise ValueError(f"indices: expected shape [{T}] (one slot id per row), got {tuple(indices.shape)}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices: expected dtype int32 or int64, got {indices.dtype}")
    _same_device(indices, "indices", device)
    return build_batch_meta(indices, S)


def _x_y(x, y, y_name: str = "y", allow64: bool = False) -> None:
    _tensor(x, "x", 2)
    _tensor(y, y_name, 2)
    _float(x, "x", allow64)
    if y.dtype != x.dtype:
        raise TypeError(f"{y_name}: dtype {y.dtype} does not match x's dtype {x.dtype}")
    _same_device(y, y_name, x.device)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{y_name}: has {y.shape[0]} rows, but x has {x.shape[0]}")


def _any_requires_grad(*values) -> bool:
    """Whether a tensor, or a tensor in a list, among ``values`` requires grad (the caller tests
    torch.is_grad_enabled() first; the values need not be validated yet)."""
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.requires_grad:
                return True
        elif isinstance(v, (list, tuple)):
            for t in v:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    return True
    return False


def _check_in_place(y: torch.Tensor) -> None:
    """The autograd path updates y in place too: refused for a leaf that requires grad (as torch
    refuses any in-place op on one), before anything runs."""
    if y.requires_grad and y.is_leaf:
        raise RuntimeError("y: a leaf tensor that requires grad cannot be updated in place (like any in-place "
                           "op on such a leaf); pass a non-leaf y (e.g. the base layer's output, or y.clone())")


class _ForbidBackward(torch.autograd.Function):
    """Identity whose backward raises (see :func:`forbid_backward`)."""

    @staticmethod
    def forward(ctx, t, what):
        ctx.what = what
        if t.grad_fn is not None:
            ctx.mark_dirty(t)    # t itself, its history rebased onto this node: no copy, no view
        return t                 # (a leaf: autograd returns a view of it, no copy either)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            f"{ctx.what}: gradients through the LoRA delta are not implemented yet (inference only); "
            "run the model under torch.no_grad() or torch.inference_mode(), or detach the output")


def forbid_backward(t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` itself for autograd's purposes (same values, no copy) whose backward raises
    RuntimeError: '<what>: gradients through the LoRA delta are not implemented yet (inference
    only); ...'. For a model-patching layer that adds the LoRA delta into a module's output under
    ``torch.no_grad()``: the output keeps requiring grad, and a backward through it fails loudly
    instead of returning gradients without the LoRA term. Call only when
    ``torch.is_grad_enabled()`` and ``t.requires_grad``. (The ops themselves have gradients: a
    layer that routes its delta through them with grad on, or computes the delta's gradients
    with :func:`lora_backward`, needs no such mark.)

    A non-leaf ``t`` (e.g. the output of an ``nn.Linear``) is returned as the same tensor object,
    its autograd history rebased onto the raising node (like an in-place op); a leaf gives a view.

        >>> import torch
        >>> lin = torch.nn.Linear(4, 3)
        >>> y = lin(torch.randn(2, 4))
        >>> forbid_backward(y, "layers.0.q_proj") is y
        True
        >>> y.sum().backward()
        Traceback (most recent call last):
        ...
        RuntimeError: layers.0.q_proj: gradients through the LoRA delta are not implemented yet (inference only); ...
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t: expected a torch.Tensor, got {type(t).__name__}")
    return _ForbidBackward.apply(t, str(what))


# ------------------------------------------------------------------------- fp8 weight scales


def _check_scales(v, nm: str, w_list: List[torch.Tensor], w_name: str, packed, R: int):
    """The scales of one side's weights (``a_scales`` for lora_a, ``b_scales`` for lora_b) as a
    tuple of float32 [S, R] tensors per slice (ops/fp8.py), or None: required when the weights
    are fp8 (float8_e4m3fn), refused otherwise. Padded form: [S, R] per slice; packed form:
    [rows] per slice (one scale per buffer row, addressed by the offsets like the weights),
    returned as slot-stride-0 [S, R] views."""
    fp8 = w_list[0].dtype is _fp8.FP8
    if v is None:
        if fp8:
            raise TypeError(f"{nm}: required, {w_name} is stored in float8_e4m3fn (one float32 scale per rank "
                            "row: ops/fp8.py quantize_rows makes both)")
        return None
    if not fp8:
        raise TypeError(f"{nm}: given, but {w_name} is stored in {w_list[0].dtype}; scales go with float8_e4m3fn "
                        "weights only")
    s_list, is_list = _as_list(v, nm)
    if len(s_list) != len(w_list):
        raise ValueError(f"{nm}: {len(s_list)} scale tensors given, but {w_name} has {len(w_list)} slices")
    S = w_list[0].shape[0]
    out = []
    for i, t in enumerate(s_list):
        n = f"{nm}[{i}]" if is_list else nm
        if t.dtype != torch.float32:
            raise TypeError(f"{n}: expected dtype float32, got {t.dtype}")
        _same_device(t, n, w_list[0].device)
        if packed is not None:
            if t.dim() != 1 or t.shape[0] != packed.rows:
                raise ValueError(f"{n}: expected shape [{packed.rows}] (one scale per row of the packed buffer), "
                                 f"got {tuple(t.shape)}")
            t = t.as_strided((S, R), (0, t.stride(0)), t.storage_offset())
        elif tuple(t.shape) != (S, R):
            raise ValueError(f"{n}: expected shape [{S}, {R}] (one scale per slot and rank row), got {tuple(t.shape)}")
        out.append(t)
    return tuple(out)


def _weight_scales(a_scales, b_scales, a_list, b_list, packed, R: int) -> Optional[_fp8.WeightScales]:
    """WeightScales of a call (None: no fp8 weights)."""
    sa = _check_scales(a_scales, "a_scales", a_list, "lora_a", packed, R) if a_list is not None else None
    sb = _check_scales(b_scales, "b_scales", b_list, "lora_b", packed, R) if b_list is not None else None
    if a_list is None and a_scales is not None:
        raise TypeError("a_scales: this op takes no lora_a")
    if b_list is None and b_scales is not None:
        raise TypeError("b_scales: this op takes no lora_b")
    if sa is None and sb is None:
        return None
    return _fp8.WeightScales(sa, sb)


def _fp8_eager(scales, grad: bool) -> None:
    """fp8 weights run inference only, eagerly."""
    if scales is None:
        return
    if grad:
        raise NotImplementedError("a_scales / b_scales: gradients through fp8 (float8_e4m3fn) weights are not "
                                  "implemented (inference only: run under torch.no_grad(), or store the adapter "
                                  "in bfloat16 / float32 to train it)")
    if torch.compiler.is_compiling():
        raise NotImplementedError("a_scales / b_scales: fp8 weights are not registered with torch.compile yet "
                                  "(run them eagerly, or store the adapters in bfloat16)")


# ---------------------------------------------------------------------------------- the ops


def _packed_args(lora_a, lora_b, offsets, ranks, max_rank, a: bool = True, b: bool = True):
    """(lora_a, lora_b, Packed or None): the packed buffers as slot-stride-0 views (ops/packed.py)."""
    if offsets is None:
        if max_rank is not None:
            raise ValueError("max_rank: only taken with offsets (the packed form); the padded form's R is lora_a's dim 1")
        return lora_a, lora_b, None
    return _packed.views(lora_a, lora_b, offsets, ranks, max_rank, a, b)


def _no_packed_grad(packed) -> None:
    if packed is not None:
        raise NotImplementedError("offsets: gradients through the packed weight form are not implemented "
                                  "(inference only: run under torch.no_grad(), or use the padded [S, R, K] form)")


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: TensorOrList, lora_b: TensorOrList, indices: Indices,
             scalings: torch.Tensor, ranks: Optional[torch.Tensor] = None, *, offsets: Optional[torch.Tensor] = None,
             max_rank: Optional[int] = None, a_scales: Optional[TensorOrList] = None,
             b_scales: Optional[TensorOrList] = None, backend: str = "auto") -> torch.Tensor:
    """Add each row's LoRA delta into ``y`` in place and return ``y``.

    ``y[t, cols_i] += scalings[s] * (x[t] @ A_i[s, :r_s].T) @ B_i[s, :, :r_s].T`` for every row t
    whose slot ``s = indices[t]`` is not -1 (r_s = ``ranks[s]``, or R when ``ranks`` is None).

    Args:
        y: [T, N] output, same dtype as x, updated in place (rows may be strided).
        x: [T, K] float16 / bfloat16 / float32 (rows may be strided).
        lora_a: [S, R, K] stacked ``lora_A.weight`` of S slots (zero beyond each slot's rank), or a
            list of n such tensors, one per output slice (fused QKV, gate_up).
        lora_b: [S, N, R] stacked ``lora_B.weight``, or a list of n [S, N_i, R] with N = sum N_i.
        indices: [T] int32/int64 slot per row (-1 = no adapter), or a :class:`LoRABatchMeta`.
        scalings: [S] float32 (alpha / r, or alpha / sqrt(r) for rsLoRA).
        ranks: [S] (or [n, S], per slice) int32/int64 rank of each slot, or None for R everywhere.
        offsets: the PACKED form (ops/packed.py): [S] int32/int64, slot s uses rows
            ``offsets[s] .. offsets[s] + ranks[s]`` of ONE buffer per slice: ``lora_a`` is then
            [rows, K] and ``lora_b`` [N, rows] (or lists of such), ``ranks`` is required and
            ``max_rank`` (int) bounds them. Backends "torch" and "cpu"; inference only.
        max_rank: with ``offsets``, the largest rank a slot may have.
        a_scales, b_scales: required when lora_a / lora_b are stored in ``torch.float8_e4m3fn``
            (ops/fp8.py): float32 [S, R] per slice (packed form: [rows], one per buffer row),
            ``A_i[s, j, :] * a_scales_i[s, j]`` and ``B_i[s, :, j] * b_scales_i[s, j]`` being the
            weights. Inference only, eager only; backends "torch", "cpu", "triton".
        backend: "auto", "torch", "triton" or "cuda" (see :func:`available_backends`).

    Example::

        >>> import torch, openlora_kernels as olk
        >>> T, K, N, S, R = 4, 8, 6, 2, 4
        >>> x, y = torch.randn(T, K), torch.zeros(T, N)
        >>> A, B = torch.randn(S, R, K), torch.randn(S, N, R)
        >>> idx = torch.tensor([1, -1, 0, 1])
        >>> out = olk.add_lora(y, x, A, B, idx, torch.tensor([0.5, 2.0]))
        >>> torch.allclose(out[0], 2.0 * (x[0] @ A[1].T) @ B[1].T, atol=1e-5), bool(out[1].eq(0).all())
        (True, True)

    Gradients: with grad mode on and any of y, x, lora_a, lora_b, scalings requiring grad, the
    call is recorded by autograd (y is still updated in place and returned; a leaf y that requires
    grad is refused, as for any in-place op). dx, dA, dB, dscalings as in :func:`lora_backward`;
    y's gradient passes through unchanged.
    """
    grad = torch.is_grad_enabled() and _any_requires_grad(y, x, lora_a, lora_b, scalings)
    _x_y(x, y, allow64=backend == "torch")
    lora_a, lora_b, packed = _packed_args(lora_a, lora_b, offsets, ranks, max_rank)
    a_list = _check_a(lora_a, x)
    S, R, K = a_list[0].shape
    b_list = _check_b(lora_b, y, S, R, len(a_list), isinstance(lora_a, (list, tuple)))
    _check_scalings(scalings, S, x.device, x.dtype == torch.float64)
    ranks = _check_ranks(ranks, S, len(a_list), x.device)
    if packed is not None:
        _packed.check_offsets_arg(offsets, S, x.device)
    scales = _weight_scales(a_scales, b_scales, a_list, b_list, packed, R)
    meta = _meta_for(indices, x.shape[0], S, x.device)
    name = resolve_backend(backend, x.device)
    check_storage(name, x.dtype, a_list, b_list)
    _fp8_eager(scales, grad)
    if grad:
        _no_packed_grad(packed)
        return _add_autograd(y, x, a_list, b_list, scalings, ranks, meta, name)
    return _launch_add(y, x, a_list, b_list, scalings, ranks, meta, name, packed, scales)


def _add_autograd(y, x, a_list, b_list, scalings, ranks, meta: LoRABatchMeta, name: str) -> torch.Tensor:
    """add_lora recorded by autograd: the functional op (y + delta, registered backward), copied
    into y (custom_ops.py explains why). Degenerate sizes go through it too (zero gradients)."""
    _check_in_place(y)
    if not torch.compiler.is_compiling():
        custom_ops.remember_meta(meta)
    y.copy_(torch.ops.openlora.add_lora_functional(y, x, a_list, b_list, scalings, ranks, *meta.tensors(),
                                                   meta.block_m, name))
    return y


def _not_compiled(packed) -> None:
    if packed is not None:
        raise NotImplementedError("offsets: the packed weight form is not registered with torch.compile yet "
                                  "(run it eagerly, or use the padded [S, R, K] form)")


def _launch_add(y, x, a_list, b_list, scalings, ranks, meta: LoRABatchMeta, name: str, packed=None,
                scales=None) -> torch.Tensor:
    S, R, K = a_list[0].shape
    if x.shape[0] == 0 or y.shape[1] == 0 or S == 0 or R == 0 or K == 0:
        return y      # no row, column, slot, rank or input feature: a zero delta, y is not written
    if torch.compiler.is_compiling():
        _not_compiled(packed)
        _fp8_eager(scales, False)
        torch.ops.openlora.add_lora(y, x, a_list, b_list, scalings, ranks, *meta.tensors(), meta.block_m, name)
    else:
        custom_ops.run_add_lora(y, x, a_list, b_list, scalings, ranks, meta, name, packed, scales)
    return y


def _like(weights: TensorOrList, dim: int) -> torch.Tensor:
    """An empty [0, features] tensor with the weights' dtype and device (features: dim 2 of
    lora_a, the summed dim 1 of lora_b); an empty float32 CPU tensor when they are malformed
    (the checks then name the problem)."""
    ws = weights if isinstance(weights, (list, tuple)) else [weights]
    if not ws or not all(isinstance(w, torch.Tensor) and w.dim() == 3 for w in ws):
        return torch.empty(0, 0)
    return ws[0].new_empty((0, sum(w.shape[dim] for w in ws) if dim == 1 else ws[0].shape[dim]))


_grad_enabled = torch.is_grad_enabled
_is_compiling = torch.compiler.is_compiling
_FACTS = "_bound_facts"


def _meta_facts(meta: LoRABatchMeta):
    """(T, S, device index (-1: CPU), contents known to be consistent) of a metadata object, once
    per object (a forward's layers all pass the same one): what BoundLoRA's call compares."""
    ts = meta.token_slots
    ok = _checks.META_OK_ATTR in meta.__dict__ or not (ts.is_cpu or _checks._debug_checks)
    facts = (ts.shape[0], meta.num_slots, ts.get_device(), ok)
    if ok:        # (an unchecked object is checked by its first call, then asked again)
        object.__setattr__(meta, _FACTS, facts)
    return facts


class BoundLoRA:
    """:func:`add_lora` with the weight arguments checked once, for a layer that applies the same
    stacked adapters every forward (what a patched model layer does)::

        op = BoundLoRA(lora_a, lora_b, scalings, ranks)     # validated here, backend resolved here
        op(y, x, meta)                                      # == add_lora(y, x, lora_a, lora_b, meta, ...)

    Per call only x, y and the metadata are checked (a few attribute compares); anything unusual
    goes through :func:`add_lora`'s full checks, so errors name the argument as usual. The
    weights' values may change between calls (slot loads), not their shapes, dtype, device or
    storage. A backend that offers ``bind`` (the native CPU one) converts the weight arguments
    once here, too. fp8 weights take their ``a_scales`` / ``b_scales`` here (as in
    :func:`add_lora`); a pool writing new scales in place keeps them valid, like the weights.
    """

    __slots__ = ("lora_a", "lora_b", "scalings", "ranks", "backend", "_a", "_b", "_name", "_dtype", "_device",
                 "_S", "_R", "_K", "_N", "_bound", "_add_rows", "_weights", "_dev", "_ranks_host", "_ranks_seen", "_fast",
                 "offsets", "max_rank", "_packed", "a_scales", "b_scales", "_scales")
    # (_weights: every weight tensor argument, for the requires-grad test of a call)

    def __init__(self, lora_a: TensorOrList, lora_b: TensorOrList, scalings: torch.Tensor,
                 ranks: Optional[torch.Tensor] = None, *, offsets: Optional[torch.Tensor] = None,
                 max_rank: Optional[int] = None, a_scales: Optional[TensorOrList] = None,
                 b_scales: Optional[TensorOrList] = None, backend: str = "auto", dtype: Optional[torch.dtype] = None):
        # The checks of add_lora, against an empty x / y shaped like the weights, of the
        # activations' dtype: ``dtype`` (None: the weights' own; else the weights are stored in
        # a storage dtype of it, e.g. bfloat16 weights for float32 activations, STORAGE_DTYPES).
        self.offsets, self.max_rank = offsets, max_rank
        va, vb, self._packed = _packed_args(lora_a, lora_b, offsets, ranks, max_rank)
        x = _like(va, 2)
        if dtype is not None:
            if not isinstance(dtype, torch.dtype):
                raise TypeError(f"dtype: expected a torch.dtype or None, got {type(dtype).__name__}")
            _float(x.new_empty(0, dtype=dtype), "dtype", backend == "torch")
            x = x.to(dtype)
        y = x.new_empty((0, _like(vb, 1).shape[1]))
        _float(x, "lora_a", backend == "torch")
        a_list = _check_a(va, x)
        S, R, K = a_list[0].shape
        self._b = _check_b(vb, y, S, R, len(a_list), isinstance(lora_a, (list, tuple)))
        _check_scalings(scalings, S, x.device, x.dtype == torch.float64)
        self.ranks = _check_ranks(ranks, S, len(a_list), x.device)
        if self._packed is not None:
            _packed.check_offsets_arg(offsets, S, x.device)
        self.lora_a, self.lora_b, self.scalings, self.backend = lora_a, lora_b, scalings, backend
        self.a_scales, self.b_scales = a_scales, b_scales
        self._scales = _weight_scales(a_scales, b_scales, a_list, self._b, self._packed, R)
        self._a, self._name = a_list, resolve_backend(backend, x.device)
        check_storage(self._name, x.dtype, a_list, self._b)
        self._weights = (*a_list, *self._b, scalings)
        self._dtype, self._device, self._S, self._R, self._K, self._N = x.dtype, x.device, S, R, K, y.shape[1]
        self._dev = -1 if x.device.type == "cpu" else (x.device.index if x.device.index is not None else 0)
        # ranks on the host are value-checked on every call (memoised); on a GPU in debug mode only
        self._ranks_host = self.ranks is not None and self.ranks.device.type == "cpu"
        self._ranks_seen = None     # ranks' version counter when last checked
        mod = custom_ops.backend_module(self._name)
        bind = getattr(mod, "bind", None)
        if S == 0 or R == 0 or K == 0 or self._N == 0:
            bind = None        # a zero delta: the calls only check their arguments (_launch_add)
        mixed = {"act_dtype": x.dtype} if a_list[0].dtype is not x.dtype else {}
        if self._scales is not None:
            mixed["scales"] = self._scales
        if self._packed is not None:
            if not getattr(mod, "SUPPORTS_PACKED", False):
                bind = None    # the general path (the reference's reading, or the backend's error)
            self._ranks_host = self._ranks_host or self._packed.offsets.device.type == "cpu"
        if bind is None:
            self._bound = None
        elif self._packed is not None:
            self._bound = bind(self._a, self._b, scalings, self.ranks, self._packed, **mixed)
        else:
            self._bound = bind(self._a, self._b, scalings, self.ranks, **mixed)
        self._add_rows = getattr(self._bound, "add_rows", None)
        # (y, x, meta) -> bool: a launch through a recorded plan, False (nothing done) when there is none
        self._fast = getattr(self._bound, "fast", None)

    def __call__(self, y: torch.Tensor, x: torch.Tensor, indices: Indices) -> torch.Tensor:
        if _grad_enabled() and self._wants_grad(y, x):     # the autograd path: add_lora's
            return add_lora(y, x, self.lora_a, self.lora_b, indices, self.scalings, self.ranks, offsets=self.offsets,
                            max_rank=self.max_rank, a_scales=self.a_scales, b_scales=self.b_scales,
                            backend=self.backend)
        if type(indices) is LoRABatchMeta and type(x) is torch.Tensor and type(y) is torch.Tensor:
            fast = self._fast
            if fast is not None and not _is_compiling():
                # a bound plan's launch: its key holds x's and y's shapes, strides, dtypes and
                # devices, so a call that finds one passed this class's checks when it was made
                if self._ranks_host or _checks._debug_checks:
                    self._check_ranks()
                if fast(y, x, indices):
                    return y
            # the bound path: a few compares against what was checked at bind time (the metadata's
            # facts are read once per metadata object, see _meta_facts)
            T, S, dev, ok = indices.__dict__.get(_FACTS) or _meta_facts(indices)
            if (S == self._S and x.shape == (T, self._K) and y.shape == (T, self._N) and x.dtype is self._dtype
                    and y.dtype is self._dtype and dev == self._dev and x.get_device() == dev
                    and y.get_device() == dev):
                bound = self._bound
                if bound is not None and T and not _is_compiling():
                    if self._ranks_host or _checks._debug_checks:
                        self._check_ranks()
                    if not ok:
                        check_batch_meta(indices)     # (memoised on the object)
                    bound(y, x, indices)
                    return y
                return _launch_add(y, x, self._a, self._b, self.scalings, self.ranks, indices, self._name, self._packed,
                                   self._scales)
        return add_lora(y, x, self.lora_a, self.lora_b, indices, self.scalings, self.ranks, offsets=self.offsets,
                        max_rank=self.max_rank, a_scales=self.a_scales, b_scales=self.b_scales, backend=self.backend)

    def add_rows(self, y: torch.Tensor, x: torch.Tensor, rows) -> bool:
        """The patched-layer fast path of the native CPU backend: ``y += delta(x)`` for a
        contiguous ``x`` [..., K] and ``y`` [..., N] of this op's dtype holding the ``T`` rows of
        ``rows = cpu_ext.row_args(meta)`` (``None``: not natively served). Returns False, having
        done nothing, when any of that does not hold (then call the op as usual). It checks the
        call's arguments only: the weights, scalings and ranks are a pool's, validated when it
        bound them (the kernel also clamps each rank to [0, R]), and the result carries no
        autograd record: under grad mode it declines when x, y or a weight argument requires
        grad (the checked call, which it falls back to, is then recorded by autograd)."""
        fn = self._add_rows
        if fn is None or rows is None or type(x) is not torch.Tensor or type(y) is not torch.Tensor:
            return False
        T = rows[0]
        if (x.dtype is not self._dtype or y.dtype is not self._dtype or not x.is_cpu or not y.is_cpu
                or (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or self._weights_grad()))
                or not x.is_contiguous() or not y.is_contiguous()
                or x.shape[-1] != self._K or y.shape[-1] != self._N
                or x.numel() != T * self._K or y.numel() != T * self._N or not T or not self._N):
            return False
        fn(T, x.data_ptr(), y.data_ptr(), rows[1], rows[2])
        return True

    def _check_ranks(self) -> None:
        """check_ranks on the bound ranks, re-read only after an in-place change (version counter)."""
        ranks = self.ranks
        if ranks is None:
            return
        try:
            v = ranks._version
        except RuntimeError:      # an inference tensor has no version counter: check every time
            v = None
        if v is None or v != self._ranks_seen:
            check_ranks(ranks, self._R)
            self._ranks_seen = v
        if self._packed is not None:
            _packed.check_offsets(self._packed, ranks)     # (memoised on both tensors' versions)

    def _wants_grad(self, y, x) -> bool:
        """Whether a call's y, x or a weight argument requires grad (grad mode is on)."""
        return getattr(y, "requires_grad", False) or getattr(x, "requires_grad", False) or self._weights_grad()

    def _weights_grad(self) -> bool:
        for t in self._weights:
            if t.requires_grad:
                return True
        return False



def lora_shrink(x: torch.Tensor, lora_a: TensorOrList, indices: Indices, ranks: Optional[torch.Tensor] = None,
                *, offsets: Optional[torch.Tensor] = None, max_rank: Optional[int] = None,
                a_scales: Optional[TensorOrList] = None, backend: str = "auto") -> torch.Tensor:
    """First half of :func:`add_lora`: ``h[i, t, :r_s] = x[t] @ A_i[s, :r_s].T``.

    Returns a new [n_slices, T, R] float32 tensor; rows with slot -1 and columns at or beyond a
    slot's rank are 0. No scaling is applied (``lora_expand`` applies it).
    Gradients: with grad mode on and x or a lora_a tensor requiring grad, the call is recorded by
    autograd: dx[t] = sum_i dh[i, t, :r] @ A_i[s, :r], dA_i[s] = sum over s's rows of
    dh[i, t, :r]ᵀ x[t] (float32 accumulation; zero beyond ranks, on unused slots, from -1 rows).
    ``offsets`` / ``max_rank``: the packed form, as in :func:`add_lora` (``lora_a`` [rows, K]; h is
    [n, T, min(max_rank, rows)]). ``a_scales``: with fp8 lora_a, as in :func:`add_lora`
    (h is then ``a_scales[s, j] * x[t] @ A_i[s, j]``).
    """
    grad = torch.is_grad_enabled() and _any_requires_grad(x, lora_a)
    _tensor(x, "x", 2)
    _float(x, "x", backend == "torch")
    lora_a, _, packed = _packed_args(lora_a, None, offsets, ranks, max_rank, b=False)
    a_list = _check_a(lora_a, x)
    S, R, K = a_list[0].shape
    ranks = _check_ranks(ranks, S, len(a_list), x.device)
    if packed is not None:
        _packed.check_offsets_arg(offsets, S, x.device)
        if grad:
            _no_packed_grad(packed)
    scales = _weight_scales(a_scales, None, a_list, None, packed, R)
    meta = _meta_for(indices, x.shape[0], S, x.device)
    name = resolve_backend(backend, x.device)
    check_storage(name, x.dtype, a_list)
    _fp8_eager(scales, grad)
    if packed is not None or scales is not None:
        if x.shape[0] == 0 or S == 0 or R == 0 or K == 0:
            return x.new_zeros((len(a_list), x.shape[0], R), dtype=torch.float32)
        _not_compiled(packed if torch.compiler.is_compiling() else None)
        return custom_ops.run_shrink(x, a_list, ranks, meta, name, packed=packed, scales=scales)
    if grad:          # the registered op, so that autograd records it (degenerate sizes too)
        if not torch.compiler.is_compiling():
            custom_ops.remember_meta(meta)
        return torch.ops.openlora.lora_shrink(x, a_list, ranks, *meta.tensors(), meta.block_m, name)
    if x.shape[0] == 0 or S == 0 or R == 0 or K == 0:      # nothing to compute: h is all zeros
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.new_zeros((len(a_list), x.shape[0], R), dtype=dt)
    if torch.compiler.is_compiling():
        return torch.ops.openlora.lora_shrink(x, a_list, ranks, *meta.tensors(), meta.block_m, name)
    return custom_ops.run_shrink(x, a_list, ranks, meta, name)


def lora_expand(y: torch.Tensor, h: torch.Tensor, lora_b: TensorOrList, indices: Indices, scalings: torch.Tensor,
                ranks: Optional[torch.Tensor] = None, *, offsets: Optional[torch.Tensor] = None,
                b_scales: Optional[TensorOrList] = None, backend: str = "auto") -> torch.Tensor:
    """Second half of :func:`add_lora`: ``y[t, cols_i] += scalings[s] * h[i, t, :r_s] @ B_i[s, :, :r_s].T``.

    ``h`` is [n_slices, T, R] (float32 from :func:`lora_shrink`, or float16/bfloat16). Returns ``y``.
    Gradients: with grad mode on and y, h, a lora_b tensor or scalings requiring grad, the call is
    recorded by autograd (y still updated in place; a leaf y that requires grad is refused):
    dh[i, t, :r] = scale_s * dy[t, cols_i] @ B_i[s, :, :r] (0 beyond ranks and on -1 rows), dB
    and dscalings as for :func:`add_lora`; y's gradient passes through unchanged.
    ``offsets``: the packed form, as in :func:`add_lora` (``lora_b`` [N, rows], the slots' rank
    bound is h's dim 2). ``b_scales``: with fp8 lora_b, as in :func:`add_lora`.
    """
    grad = torch.is_grad_enabled() and _any_requires_grad(y, h, lora_b, scalings)
    packed = None
    if offsets is not None:
        _tensor(h, "h", 3)
        _, lora_b, packed = _packed_args(None, lora_b, offsets, ranks, h.shape[2], a=False)
        if grad:
            _no_packed_grad(packed)
    _tensor(y, "y", 2)
    _float(y, "y", backend == "torch")
    _tensor(h, "h", 3)
    _float(h, "h", y.dtype == torch.float64)
    if y.dtype == torch.float64 and h.dtype != torch.float64:
        raise TypeError(f"h: dtype {h.dtype} does not match y's dtype torch.float64 "
                        "(a float64 call is float64 throughout)")
    _same_device(h, "h", y.device)
    b_list, _ = _as_list(lora_b, "lora_b")
    if h.shape[1] != y.shape[0]:
        raise ValueError(f"h: has {h.shape[1]} rows (shape [n_slices, T, R] = {tuple(h.shape)}), but y has {y.shape[0]}")
    if h.shape[0] != len(b_list):
        raise ValueError(f"h: has {h.shape[0]} slices (shape {tuple(h.shape)}), but lora_b has {len(b_list)}")
    _tensor(b_list[0], "lora_b[0]" if isinstance(lora_b, (list, tuple)) else "lora_b", 3)
    S = b_list[0].shape[0]
    b_list = _check_b(lora_b, y, S, h.shape[2], h.shape[0], None)
    _check_scalings(scalings, S, y.device, y.dtype == torch.float64)
    ranks = _check_ranks(ranks, S, len(b_list), y.device)
    if packed is not None:
        _packed.check_offsets_arg(offsets, S, y.device)
        if h.shape[2] != b_list[0].shape[2]:
            raise ValueError(f"h: has {h.shape[2]} ranks, but the packed buffers have only {b_list[0].shape[2]} rows")
    scales = _weight_scales(None, b_scales, None, b_list, packed, h.shape[2])
    meta = _meta_for(indices, y.shape[0], S, y.device)
    name = resolve_backend(backend, y.device)
    check_storage(name, y.dtype, (), b_list)
    _fp8_eager(scales, grad)
    if packed is not None or scales is not None:
        if y.shape[0] == 0 or y.shape[1] == 0 or S == 0 or h.shape[2] == 0:
            return y
        _not_compiled(packed if torch.compiler.is_compiling() else None)
        custom_ops.run_expand(y, h, b_list, scalings, ranks, meta, name, packed=packed, scales=scales)
        return y
    if grad:
        _check_in_place(y)
        if not torch.compiler.is_compiling():
            custom_ops.remember_meta(meta)
        y.copy_(torch.ops.openlora.lora_expand_functional(y, h, b_list, scalings, ranks, *meta.tensors(),
                                                          meta.block_m, name))
        return y
    if y.shape[0] == 0 or y.shape[1] == 0 or S == 0 or h.shape[2] == 0:
        return y      # no row, column, slot or rank: a zero delta, y is not written
    if torch.compiler.is_compiling():
        torch.ops.openlora.lora_expand(y, h, b_list, scalings, ranks, *meta.tensors(), meta.block_m, name)
    else:
        custom_ops.run_expand(y, h, b_list, scalings, ranks, meta, name)
    return y


def lora_backward(dy: torch.Tensor, x: torch.Tensor, lora_a: TensorOrList, lora_b: TensorOrList, indices: Indices,
                  scalings: torch.Tensor, ranks: Optional[torch.Tensor] = None, *, need_x: bool = True,
                  need_ab: bool = True, backend: str = "auto"
                  ) -> Tuple[Optional[torch.Tensor], Optional[List[torch.Tensor]], Optional[List[torch.Tensor]]]:
    """(dx [T, K] in x's dtype or None, dA [S, R, K] fp32 per slice or None, dB [S, N_i, R] fp32 per slice or None)
    for ``y += add_lora(...)``; dA/dB zero beyond ranks, on unused slots, from -1 rows. Works with grad
    disabled (no graph).

    ``dy`` is the gradient of the updated y ([T, N], x's dtype, any strides); the other arguments
    are add_lora's, with the same checks (errors name the argument). For row t of slot s, rank r,
    slice i (dY_i = dy[:, cols_i]):

        dx[t]   = sum_i scalings[s] * (dY_i[t] @ B_i[s, :, :r]) @ A_i[s, :r]
        dA_i[s] = scalings[s] * sum over s's rows of (dY_i[t] @ B_i[s, :, :r])ᵀ x[t]     [r, K]
        dB_i[s] = scalings[s] * sum over s's rows of dY_i[t]ᵀ (x[t] @ A_i[s, :r].T)      [N_i, r]

    accumulated in float32. dx reuses the backend's shrink and expand kernels with the roles of A
    and B swapped; dA / dB are segmented products per slot (docs/kernels.md, "Gradients"). dB
    has B_i's layout (rank-major when B_i is an [S, N, R] view of [S, R, N] storage). For a
    model-patching layer that keeps its adapter parameters as views of slot buffers and computes
    their gradients in its own autograd.Function. Never records a graph.

    ``need_x`` / ``need_ab``: compute dx / (dA, dB); what is not asked for is returned as None.

        >>> import torch, openlora_kernels as olk
        >>> T, K, N, S, R = 4, 8, 6, 2, 4
        >>> x, A, B = torch.randn(T, K), torch.randn(S, R, K), torch.randn(S, N, R)
        >>> idx, sc = torch.tensor([1, -1, 0, 1]), torch.tensor([0.5, 2.0])
        >>> dy = torch.randn(T, N)
        >>> dx, (dA,), (dB,) = olk.lora_backward(dy, x, A, B, idx, sc)
        >>> torch.allclose(dx[0], 2.0 * (dy[0] @ B[1]) @ A[1], atol=1e-5), bool(dx[1].eq(0).all())
        (True, True)
        >>> rows = [0, 3]                                   # the rows of slot 1
        >>> torch.allclose(dA[1], 2.0 * (dy[rows] @ B[1]).T @ x[rows], atol=1e-5)
        True
        >>> torch.allclose(dB[1], 2.0 * dy[rows].T @ (x[rows] @ A[1].T), atol=1e-5), dB.dtype
        (True, torch.float32)
    """
    _x_y(x, dy, "dy", allow64=backend == "torch")
    a_list = _check_a(lora_a, x)
    S, R, K = a_list[0].shape
    b_list = _check_b(lora_b, dy, S, R, len(a_list), isinstance(lora_a, (list, tuple)), y_name="dy")
    _check_scalings(scalings, S, x.device, x.dtype == torch.float64)
    ranks = _check_ranks(ranks, S, len(a_list), x.device)
    meta = _meta_for(indices, x.shape[0], S, x.device)
    for nm, v in (("need_x", need_x), ("need_ab", need_ab)):
        if not isinstance(v, bool):
            raise TypeError(f"{nm}: expected a bool, got {type(v).__name__}")
    name = resolve_backend(backend, x.device)
    check_storage(name, x.dtype, a_list, b_list)
    if a_list[0].dtype is _fp8.FP8:
        raise NotImplementedError("lora_a: gradients through fp8 (float8_e4m3fn) weights are not implemented "
                                  "(inference only)")
    n = len(a_list)
    with torch.no_grad():
        if torch.compiler.is_compiling():
            outs = torch.ops.openlora.add_lora_backward(dy, x, a_list, b_list, scalings, ranks, *meta.tensors(),
                                                       meta.block_m, name, need_x, [need_ab] * n, [need_ab] * n,
                                                       False)
            dx = outs[0] if need_x else None
            dA = outs[int(need_x):int(need_x) + n] if need_ab else None
            dB = outs[int(need_x) + n:] if need_ab else None
            return dx, dA, dB
        dx, dA, dB, _ = _backward.add_lora_backward(dy, x, a_list, b_list, scalings, ranks, meta, name, need_x,
                                                    [need_ab] * n, [need_ab] * n, False)
    return dx, (dA if need_ab else None), (dB if need_ab else None)


# ------------------------------------------------------------------------- embedding LoRA


def _check_ids(ids, T: int, device: torch.device) -> torch.Tensor:
    _tensor(ids, "ids", 1)
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids: expected dtype int32 or int64 (token ids), got {ids.dtype}")
    if ids.shape[0] != T:
        raise ValueError(f"ids: has {ids.shape[0]} rows, but y has {T}")
    _same_device(ids, "ids", device)
    return ids


def lora_embedding_shrink(ids: torch.Tensor, lora_a: torch.Tensor, indices: Indices,
                          ranks: Optional[torch.Tensor] = None, *, offsets: Optional[torch.Tensor] = None,
                          max_rank: Optional[int] = None) -> torch.Tensor:
    """The shrink of an embedding LoRA: ``h[0, t, :] = A[s, :, ids[t]]`` (the columns of
    ``lora_embedding_A`` picked by token id: ``x`` is the token's one-hot vector), 0 for rows
    with slot -1 and beyond each slot's rank. Returns a new [1, T, R] float32 tensor, the ``h``
    :func:`lora_expand` takes.

    ``ids`` [T] int32/int64 token ids (clamped to [0, V): out-of-range ids are the base
    embedding's error, raised before this runs); ``lora_a`` [S, R, V] stacked
    ``lora_embedding_A`` of S slots. A gather, not a GEMM: plain PyTorch indexing on any device
    and backend, no host synchronisation. Never records a graph: no gradients for A here (the
    embedding's frozen adapters are served, not trained). ``offsets`` / ``max_rank``: the packed
    form (``lora_a`` [rows, V], slot s's rows from ``offsets[s]``; see :func:`add_lora`).
    """
    packed = None
    if offsets is not None:
        lora_a, _, packed = _packed_args(lora_a, None, offsets, ranks, max_rank, b=False)
    elif max_rank is not None:
        _packed_args(lora_a, None, None, ranks, max_rank)         # raises: max_rank only with offsets
    _tensor(lora_a, "lora_a", 3)
    _float(lora_a, "lora_a", True)
    S, R, V = lora_a.shape
    if packed is not None:
        _packed.check_offsets_arg(offsets, S, lora_a.device)
    _check_ids(ids, ids.shape[0] if isinstance(ids, torch.Tensor) else 0, lora_a.device)
    T = ids.shape[0]
    ranks = _check_ranks(ranks, S, 1, lora_a.device)
    meta = _meta_for(indices, T, S, lora_a.device)
    dt = torch.float64 if lora_a.dtype == torch.float64 else torch.float32
    if T == 0 or S == 0 or R == 0 or V == 0:
        return lora_a.new_zeros((1, T, R), dtype=dt)
    slots = meta.token_slots.long()
    keep = slots >= 0
    s = slots.clamp(min=0)
    with torch.no_grad():
        if packed is not None:
            _packed.check_offsets(packed, ranks)
            rows = packed.rows
            buf = _packed.buffer_of(lora_a, rows, 1)                   # [rows, V]
            off = packed.offsets.long().clamp(0, rows)
            j = (off[s][:, None] + torch.arange(R, device=buf.device)[None, :]).clamp(max=max(rows - 1, 0))
            h = buf[j, ids.long().clamp(0, V - 1)[:, None]].to(dt)    # [T, R]
            ranks = torch.minimum(ranks.reshape(-1, S)[0].long(), rows - off)
        else:
            h = lora_a[s, :, ids.long().clamp(0, V - 1)].to(dt)         # [T, R]
        if ranks is not None:
            r = ranks.reshape(-1, S)[0].long()[s]
            keep = keep[:, None] & (torch.arange(R, device=h.device)[None, :] < r[:, None])
        else:
            keep = keep[:, None]
        h = torch.where(keep, h, h.new_zeros(()))
    return h.unsqueeze(0)


def add_lora_embedding(y: torch.Tensor, ids: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       indices: Indices, scalings: torch.Tensor, ranks: Optional[torch.Tensor] = None, *,
                       offsets: Optional[torch.Tensor] = None, max_rank: Optional[int] = None,
                       backend: str = "auto") -> torch.Tensor:
    """An embedding LoRA, added into ``y`` in place (PEFT's ``lora_embedding_A`` / ``_B``):
    ``y[t] += scalings[s] * A[s, :r_s, ids[t]] @ B[s, :, :r_s].T`` for rows whose slot s is not -1.

    ``y`` [T, N] the embedding's output rows (float16 / bfloat16 / float32), ``ids`` [T] their
    token ids, ``lora_a`` [S, R, V] (stacked lora_embedding_A, V = num_embeddings), ``lora_b``
    [S, N, R] (stacked lora_embedding_B), the rest as in :func:`add_lora`. The shrink is the
    gather :func:`lora_embedding_shrink`; the expand is :func:`lora_expand` on ``backend``.
    """
    _tensor(y, "y", 2)
    _float(y, "y", backend == "torch")
    _check_ids(ids, y.shape[0], y.device)
    _tensor(lora_a, "lora_a", 2 if offsets is not None else 3)
    _same_device(lora_a, "lora_a", y.device)
    if lora_a.dtype != y.dtype:
        _storage_ok(lora_a.dtype, y.dtype, "lora_a", "y")
    if lora_a.dtype is _fp8.FP8:
        raise TypeError("lora_a: fp8 (float8_e4m3fn) storage is not supported for embedding LoRAs (their shrink "
                        "is a gather); store them in the embedding's dtype or bfloat16")
    h = lora_embedding_shrink(ids, lora_a, indices, ranks, offsets=offsets, max_rank=max_rank)
    return lora_expand(y, h, lora_b, indices, scalings, ranks, offsets=offsets, backend=backend)


class BoundEmbeddingLoRA:
    """:func:`add_lora_embedding` with the weight arguments checked once (a patched nn.Embedding's
    call: ``op(y, ids, meta)``)."""

    __slots__ = ("lora_a", "lora_b", "scalings", "ranks", "backend", "offsets", "max_rank")

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scalings: torch.Tensor,
                 ranks: Optional[torch.Tensor] = None, *, offsets: Optional[torch.Tensor] = None,
                 max_rank: Optional[int] = None, backend: str = "auto", dtype: Optional[torch.dtype] = None):
        y = lora_b.new_empty((0, lora_b.shape[0])) if offsets is not None and isinstance(lora_b, torch.Tensor) \
            and lora_b.dim() == 2 else _like(lora_b, 1)
        if dtype is not None:         # the embedding output's dtype (the weights: a storage dtype of it)
            y = y.to(dtype)
        add_lora_embedding(y, torch.zeros(0, dtype=torch.long, device=y.device), lora_a, lora_b,
                           torch.zeros(0, dtype=torch.int32, device=y.device), scalings, ranks, offsets=offsets,
                           max_rank=max_rank, backend=backend)
        self.lora_a, self.lora_b, self.scalings, self.ranks, self.backend = lora_a, lora_b, scalings, ranks, backend
        self.offsets, self.max_rank = offsets, max_rank

    def __call__(self, y: torch.Tensor, ids: torch.Tensor, indices: Indices) -> torch.Tensor:
        return add_lora_embedding(y, ids, self.lora_a, self.lora_b, indices, self.scalings, self.ranks,
                                  offsets=self.offsets, max_rank=self.max_rank, backend=self.backend)


# --------------------------------------------------------------------------------- DoRA


def dora_rescale(y: torch.Tensor, col_scale: torch.Tensor, dora_slots: torch.Tensor, indices: Indices,
                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DoRA's column scale of the base output, in place: ``y[t] += (g[s] - 1) * (y[t] - bias)``
    for every row t whose slot s has ``dora_slots[s]``; every other row is left untouched (not
    rewritten: bit for bit). Returns ``y``.

    DoRA (PEFT ``use_dora``) computes ``bias + g * (W x + scale * B A x)`` with the per-output
    column scale ``g = magnitude / ||W + scale * B A||`` (row norms of the [N, K] weight, treated
    as a constant: it depends only on the adapter). With ``g`` folded into the adapter's B
    (B' = diag(g) B, at load time), the LoRA term is the ordinary :func:`add_lora`; this is the
    other half, applied to the base output BEFORE the delta is added.

    ``y`` [T, N] float; ``col_scale`` [S, N] float32 holding ``g - 1`` per slot; ``dora_slots``
    [S] bool; ``bias`` [N] or None (the base layer's bias, not scaled by DoRA). Pure PyTorch on
    any device, no host synchronisation, never records a graph of its own (under grad mode the
    ops are recorded by autograd as usual).
    """
    _tensor(y, "y", 2)
    _float(y, "y", True)
    _tensor(col_scale, "col_scale", 2)
    S = col_scale.shape[0]
    if col_scale.shape[1] != y.shape[1]:
        raise ValueError(f"col_scale: shape {tuple(col_scale.shape)} is [S, N] with N={col_scale.shape[1]}, but y "
                         f"has {y.shape[1]} columns")
    _tensor(dora_slots, "dora_slots", 1)
    if dora_slots.dtype != torch.bool or dora_slots.shape[0] != S:
        raise ValueError(f"dora_slots: expected a bool tensor of shape [{S}], got {dora_slots.dtype} "
                         f"{tuple(dora_slots.shape)}")
    for nm, t in (("col_scale", col_scale), ("dora_slots", dora_slots)):
        _same_device(t, nm, y.device)
    if bias is not None:
        _tensor(bias, "bias", 1)
        if bias.shape[0] != y.shape[1]:
            raise ValueError(f"bias: shape {tuple(bias.shape)}, but y has {y.shape[1]} columns")
    meta = _meta_for(indices, y.shape[0], S, y.device)
    if y.shape[0] == 0 or y.shape[1] == 0 or S == 0:
        return y
    slots = meta.token_slots.long()
    s = slots.clamp(min=0)
    use = ((slots >= 0) & dora_slots[s])[:, None]
    base = y if bias is None else y - bias.to(y.dtype)
    scaled = torch.addcmul(y, col_scale[s].to(y.dtype), base)
    y.copy_(torch.where(use, scaled, y))
    return y
