"""backend="cpu": native CPU kernels (csrc/cpu/, module ``_cpu_sgmv``) behind the usual contract.

Every batch runs the native kernel, decode-like and prefill-like alike: one call per layer reads
each active adapter's A and B once per run of up to 32 of its rows, computes in fp32 and adds into
y, with no gathered weight copies and no per-slot PyTorch ops (whose fixed cost dominates small
CPU batches), split over PyTorch's own OpenMP threads. Any weight layout is read as it is: the
pool's rank-major B directly, the usual [S, N, R] B (and vLLM's) through 8 x 8 register
transposes into a small fp32 panel, per-slice buffers of different strides each with its own
strides (no copy). Weights may be stored narrower than the activations (MIXED_STORAGE), fp8
(e4m3) ones with float32 scales per rank row (``scales=``, ops/fp8.py: converted exactly on load,
the scales multiplied into the rank-sized h). ``auto`` picks this backend for CPU tensors when the module is built
(``pip install`` compiles it with the machine's C++ compiler; without one the backend reports
itself unavailable and ``auto`` uses "torch").

    >>> import torch, openlora_kernels as olk
    >>> x, y = torch.randn(3, 16), torch.zeros(3, 8)
    >>> A, B = torch.randn(2, 4, 16), torch.randn(2, 8, 4)
    >>> if olk.available_backends("cpu")["cpu"].usable:
    ...     _ = olk.add_lora(y, x, A, B, torch.tensor([1, -1, 0]), torch.ones(2), backend="cpu")
    ...     assert torch.allclose(y[0], (x[0] @ A[1].T) @ B[1].T, atol=1e-4) and not y[1].any()
"""
from __future__ import annotations

from typing import Optional

import torch

from ..checks import check_batch_meta
from ..metadata import LoRABatchMeta
from . import torch_ref
from .launch_args import DTYPE_CODES, rank_strides

_state = {}
# The native expand writes y in the weights' dtype (ops/backward.py: multi-slice dx sums 16-bit parts)
EXPAND_FP32_Y = False
# Weights stored in another dtype than the activations (adapter_dtype): (activation, weight)
# pairs the kernels run, converting the weights to fp32 where they are loaded (csrc/cpu). fp8
# (e4m3) weights come with their per-rank scales (ops/fp8.py), applied to the rank-sized h.
MIXED_STORAGE = frozenset({(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                           (torch.bfloat16, torch.float16)}
                          | {(act, torch.float8_e4m3fn) for act in (torch.float32, torch.float16, torch.bfloat16)})
# The binding's codes of the weights' storage dtypes (fp8 e4m3: weights only).
_W_CODES = {**DTYPE_CODES, torch.float8_e4m3fn: 3}
# The LoRA backward's segmented weight-gradient products (dA, dB) run on PyTorch's GEMMs: the
# torch backend's segment / padded strategies (ops/torch_ref.py).
weight_grads = torch_ref.weight_grads
# The packed weight form (ops/packed.py): a per-slot row offset into one buffer per slice.
SUPPORTS_PACKED = True


def _module():
    if "mod" not in _state:
        try:
            from . import _cpu_sgmv  # type: ignore[attr-defined]
            _state["mod"], _state["reason"] = _cpu_sgmv, None
        except ImportError as e:
            _state["mod"] = None
            _state["reason"] = ("the native CPU extension was not built (it needs a C++ compiler "
                                f"when the package is installed): {e}")
    return _state["mod"]


def unavailable_reason() -> Optional[str]:
    _module()
    return _state["reason"]


def set_threading(min_elements: Optional[int] = None, max_threads: Optional[int] = None) -> None:
    """How one native call is split over threads (process-wide; ``None`` keeps a setting).

    A call's active (slice, slot) units are claimed in runs of consecutive units (each half a
    thread's share of what is left, down to one), in memory order, by the threads of PyTorch's
    own intra-op OpenMP team (found in the process at load time; the
    extension links no OpenMP runtime of its own, so no second thread pool competes for the
    cores). ``min_elements``: a call reading fewer weight elements runs on the calling thread
    (default 49152, 192 KiB of fp32: below that a parallel region costs more than it saves).
    ``max_threads``: 0 (default) follows ``torch.set_num_threads``; 1 keeps every call serial.
    Results do not depend on the split: each unit is computed whole by one thread.

        >>> from openlora_kernels.ops import cpu_ext
        >>> if cpu_ext.unavailable_reason() is None:
        ...     before = cpu_ext.threading_info()
        ...     cpu_ext.set_threading(max_threads=1)
        ...     assert cpu_ext.threading_info()["max_threads"] == 1
        ...     cpu_ext.set_threading(before["min_elements"], before["max_threads"])
    """
    if _module() is None:
        raise RuntimeError(f"backend 'cpu' is unavailable: {unavailable_reason()}")
    _, cur_min, cur_max = _module().threading()
    for name, v in (("min_elements", min_elements), ("max_threads", max_threads)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
    _module().set_threading(cur_min if min_elements is None else min_elements,
                            cur_max if max_threads is None else max_threads)


def threading_info() -> dict:
    """``{"available": bool, "min_elements": int, "max_threads": int}``: available is False when
    no GNU OpenMP runtime (PyTorch's) is in the process, and every call then runs serially."""
    if _module() is None:
        return {"available": False, "min_elements": 0, "max_threads": 1}
    available, min_elements, max_threads = _module().threading()
    return {"available": bool(available), "min_elements": int(min_elements), "max_threads": int(max_threads)}


def _ranks_args(ranks: Optional[torch.Tensor]):
    """(pointer, int64?, stride over slices, stride over slots); a null pointer for no ranks."""
    if ranks is None:
        return 0, False, 0, 0
    return (ranks.data_ptr(), ranks.dtype == torch.int64, *rank_strides(ranks))


def _scale_args(name: str, tensors):
    """The Plan's keywords for one side's weight scales (float32 [S, R] per slice, any strides):
    pointers, slot strides, rank strides; none for None."""
    if tensors is None:
        return {}
    tensors = list(tensors)
    for t in tensors:
        if t.dtype != torch.float32 or t.dim() != 2:
            raise TypeError(f"{name}: expected float32 [S, R] scales, got {t.dtype} {tuple(t.shape)}")
    return {name: [t.data_ptr() for t in tensors], name + "_ss": [t.stride(0) for t in tensors],
            name + "_sr": [t.stride(1) for t in tensors]}


def _plan(op: int, dtype: torch.dtype, K: int, R: int, S: int, a_list=(), b_list=(), scalings=None, ranks=None,
          packed=None, scales=None):
    """The C++ Plan holding one layer's static arguments (weights, scalings, ranks, the packed
    form's offsets, fp8 weights' scales). Each slice keeps its own strides: the tensors are used
    as they are, whatever their layout (no copy). ``dtype``: x's / y's; the weights may be stored
    in another (MIXED_STORAGE). ``scales``: an fp8.WeightScales (its ``a`` for a shrink or an
    add, its ``b`` for an expand or an add), or None."""
    a_list, b_list = list(a_list), list(b_list)
    w_dtype = (a_list or b_list)[0].dtype
    rp, r64, srn, srs = _ranks_args(ranks)
    offs = packed.offsets if packed is not None else None
    a_sc = scales.a if scales is not None and a_list else None
    b_sc = scales.b if scales is not None and b_list else None
    plan = _module().Plan(
        op, DTYPE_CODES[dtype], K, R, S,
        [A.data_ptr() for A in a_list], [A.stride(0) for A in a_list], [A.stride(1) for A in a_list],
        [A.stride(2) for A in a_list],
        [B.data_ptr() for B in b_list], [B.shape[1] for B in b_list], [B.stride(0) for B in b_list],
        [B.stride(1) for B in b_list], [B.stride(2) for B in b_list],
        scalings.data_ptr() if scalings is not None else 0, rp, r64, srn, srs,
        offs.data_ptr() if offs is not None else 0, offs is not None and offs.dtype == torch.int64,
        packed.rows if packed is not None else 0, _W_CODES[w_dtype],
        **_scale_args("a_scale", a_sc), **_scale_args("b_scale", b_sc))
    # the tensors the plan points into: keep them alive (the scales beside the offsets)
    return plan, (a_list, b_list, scalings, ranks, (offs, a_sc, b_sc))


def _meta_ptrs(meta: LoRABatchMeta):
    """(num_tokens, sorted_tokens pointer, seg_info pointer), once per metadata object (every
    layer of a forward passes the same one). The metadata is contiguous (LoRABatchMeta's
    structural check); the tuple keeps the tensors alive. Its contents are not checked here:
    the ops check them before calling the backend, and the kernel stays in bounds regardless."""
    def build():
        srt, seg = meta.sorted_tokens, meta.seg_info
        return meta.num_tokens, srt.data_ptr(), seg.data_ptr(), (srt, seg)
    return meta.memo("cpu_ext.ptrs", build)


def _checked_ptrs(meta: LoRABatchMeta):
    """:func:`_meta_ptrs` after checks.check_batch_meta, once per metadata object: for the paths
    that bypass the ops' checks (BoundLoRA's bound call, add_rows via row_args), so that a call
    pays one lookup for both."""
    def build():
        check_batch_meta(meta)
        return _meta_ptrs(meta)
    return meta.memo("cpu_ext.checked_ptrs", build)


def row_args(meta: LoRABatchMeta):
    """``(num_tokens, sorted_tokens pointer, seg_info pointer)`` when the native kernel serves
    ``meta`` (CPU metadata) and the module is built, else None: what :meth:`BoundAdd.add_rows`
    takes, computed once per metadata object (a patched model asks once per forward, then every
    layer passes it)."""
    if not meta.token_slots.is_cpu or _module() is None:
        return None
    return _checked_ptrs(meta)[:3]


def _add(plan, y, x, meta: LoRABatchMeta, ptrs=_meta_ptrs) -> None:
    T, srt, seg, _ = ptrs(meta)
    sx, sy = x.stride(), y.stride()
    plan.add(T, x.data_ptr(), sx[0], sx[1], y.data_ptr(), sy[0], sy[1], srt, seg)


class BoundAdd:
    """add_lora for one layer's fixed weights (what ``BoundLoRA`` uses on this backend): the weight
    arguments are converted once; a call passes only x, y and the batch metadata."""

    __slots__ = ("_plan", "_keep", "add_rows")

    def __init__(self, a_list, b_list, scalings, ranks, packed=None, act_dtype=None, scales=None):
        S, R, K = a_list[0].shape
        self._plan, self._keep = _plan(_module().OP_ADD, act_dtype or a_list[0].dtype, K, R, S, a_list, b_list,
                                       scalings, ranks, packed, scales)
        # add_rows(T, x.data_ptr(), y.data_ptr(), *row_args(meta)[1:]) for contiguous x [T, K] and
        # y [T, N] of the plan's dtype: no checks at all (BoundLoRA.add_rows makes them).
        self.add_rows = self._plan.add_rows

    def __call__(self, y, x, meta: LoRABatchMeta) -> None:
        _add(self._plan, y, x, meta, _checked_ptrs)


def bind(a_list, b_list, scalings, ranks, packed=None, act_dtype=None, scales=None) -> BoundAdd:
    """A callable ``(y, x, meta) -> None`` equal to ``add_lora(y, x, a_list, b_list, meta, scalings, ranks)``
    (x and y of ``act_dtype``: None for the weights' dtype; ``scales``: fp8 weights' WeightScales)."""
    return BoundAdd(a_list, b_list, scalings, ranks, packed, act_dtype, scales)


def add_lora(y, x, a_list, b_list, scalings, ranks, meta: LoRABatchMeta, packed=None, scales=None) -> None:
    S, R, K = a_list[0].shape
    if x.shape[0] == 0 or y.shape[1] == 0 or S == 0 or R == 0 or K == 0:
        return      # a zero delta: y is not written
    plan, _keep = _plan(_module().OP_ADD, x.dtype, K, R, S, a_list, b_list, scalings, ranks, packed, scales)
    _add(plan, y, x, meta)


def shrink(x, a_list, ranks, meta: LoRABatchMeta, out: Optional[torch.Tensor] = None, packed=None,
           scales=None) -> torch.Tensor:
    """h [n, T, R] float32 = x A_i^T per slice (fp8 A: times scales.a per rank)."""
    S, R, K = a_list[0].shape
    h = torch_ref.new_h(out, len(a_list), x.shape[0], R, x.device)
    if x.shape[0] == 0 or S == 0 or R == 0 or K == 0:
        return h
    plan, _keep = _plan(_module().OP_SHRINK, x.dtype, K, R, S, a_list=a_list, ranks=ranks, packed=packed,
                        scales=scales)
    T, srt, seg, _ = _meta_ptrs(meta)
    plan.run(T, x.data_ptr(), x.stride(0), x.stride(1), 0, 0, 1,
             h.data_ptr(), DTYPE_CODES[h.dtype], h.stride(0), h.stride(1), h.stride(2), srt, seg)
    return h


def expand(y, h, b_list, scalings, ranks, meta: LoRABatchMeta, packed=None, scales=None) -> None:
    """y[:, cols_i] += scalings * h_i B_i^T per slice (fp8 B: h times scales.b per rank first)."""
    S, _, R = b_list[0].shape
    if y.shape[0] == 0 or y.shape[1] == 0 or S == 0 or R == 0:
        return
    plan, _keep = _plan(_module().OP_EXPAND, y.dtype, 0, R, S, b_list=b_list, scalings=scalings, ranks=ranks,
                        packed=packed, scales=scales)
    T, srt, seg, _ = _meta_ptrs(meta)
    plan.run(T, 0, 0, 1, y.data_ptr(), y.stride(0), y.stride(1),
             h.data_ptr(), DTYPE_CODES[h.dtype], h.stride(0), h.stride(1), h.stride(2), srt, seg)


def isa() -> str:
    """The instruction set the kernels run with: "x86-64-v4" (AVX-512), "x86-64-v3" (AVX2 + FMA)
    or "baseline": the best the CPU runs, chosen when the module loads (OPENLORA_CPU_ISA caps it)."""
    if _module() is None:
        raise RuntimeError(f"backend 'cpu' is unavailable: {unavailable_reason()}")
    return _module().isa()


def set_isa(name: str) -> str:
    """Run the kernels with the best instruction set the CPU runs, at most ``name`` ("best",
    "x86-64-v4", "x86-64-v3" or "base"); returns the one chosen. For tests and comparisons (the
    levels' results may differ in the last bits: their vector widths order the shrink's sums
    differently)."""
    if _module() is None:
        raise RuntimeError(f"backend 'cpu' is unavailable: {unavailable_reason()}")
    return _module().set_isa(name)
