"""backend="cuda": bridge to the hand-written CUDA kernels in csrc/ (module ``_cuda_sgmv``).

The binding takes raw device pointers, sizes, strides (in elements), dtype codes and the CUDA
stream handle, so it links to no libtorch; this module turns tensors into those arguments.

Routing (same rule as the Triton backend; the metadata's ``block_m`` decides):
  add_lora, block_m < 16    one fused launch (shrink + expand, the intermediate stays on chip)
  add_lora, block_m >= 16   shrink into a zero-filled fp32 h, then expand (tensor cores for
                            fp16 / bf16; float32 runs the CUDA-core kernels)
  shrink / expand           the matching kernel for block_m and the dtype
Up to 8 slices go in one launch (``MAX_SLICES``); more are launched in groups of 8.

Where the binary comes from (``unavailable_reason`` decides, on first use, never at import):
the module installed with the package if it was built from the current sources and has code for
this GPU; else the per-user cache, built on first use when nvcc is there (``cuda_build.py``).

Example (on a GPU)::

    >>> import torch, openlora_kernels as olk
    >>> x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    >>> y = torch.zeros(4, 32, device="cuda", dtype=torch.bfloat16)
    >>> A = torch.randn(2, 8, 64, device="cuda", dtype=torch.bfloat16)
    >>> B = torch.randn(2, 32, 8, device="cuda", dtype=torch.bfloat16)
    >>> idx = torch.tensor([1, -1, 0, 1], device="cuda")
    >>> _ = olk.add_lora(y, x, A, B, idx, torch.ones(2, device="cuda"), backend="cuda")
"""
from __future__ import annotations

import os
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..metadata import TENSOR_CORE_MIN_M, LoRABatchMeta
from . import cuda_build, launch_args, torch_ref
from .backends import BackendUnavailableError
from .launch_args import DTYPE_CODES, rank_strides, slice_columns

MAX_SLICES = 8  # csrc/include/openlora/params.h kMaxSlices
# The expand kernels write y in the weights' dtype (ops/backward.py: multi-slice dx sums 16-bit parts)
EXPAND_FP32_Y = False
# Weights stored in another dtype than the activations (adapter_dtype): none on this backend yet
# (the templated kernels take one dtype for x, y and the weights); ops/api.check_storage refuses
# such calls naming the backend.
MIXED_STORAGE = frozenset()
OP_FUSED, OP_SHRINK, OP_EXPAND = 0, 1, 2

_lock = threading.Lock()
_state: Dict[str, Any] = {}  # "module", "reason", "origin"


# ------------------------------------------------------------------------ loading the binary


def _prebuilt() -> Tuple[Optional[Any], str]:
    """The module installed with the package, or (None, why not)."""
    try:
        from . import _cuda_sgmv  # type: ignore[attr-defined]
    except ImportError as e:
        if "_cuda_sgmv" in str(e):
            return None, "the package was installed without the CUDA extension (no nvcc at install time)"
        return None, f"importing the installed CUDA extension failed: {e}"
    return _cuda_sgmv, ""


def _prebuilt_problem(mod, arch: int, src_hash: Optional[str]) -> Optional[str]:
    """Why the installed module cannot serve this GPU (None: it can)."""
    info = mod.build_info()
    if not cuda_build.arch_supported(arch, info["sass_archs"], info["ptx_archs"]):
        return f"the installed CUDA extension has code for sm_{info['sass_archs']}, not for this sm_{arch} GPU"
    if src_hash is not None and info["source_hash"] != src_hash:
        return "the installed CUDA extension was built from other sources than csrc/ (stale build)"
    return None


def _load() -> Tuple[Optional[Any], Optional[str], str]:
    """(module, None, origin) or (None, reason, ""). Touches the GPU (first call only)."""
    if not torch.cuda.is_available():
        return None, "no CUDA device is available", ""
    if torch.version.hip is not None:
        return None, "ROCm is not supported by the CUDA kernels", ""
    major, minor = torch.cuda.get_device_capability()
    arch = 10 * major + minor
    if arch < cuda_build.MIN_ARCH:
        return None, f"the CUDA kernels need compute capability 8.0 or newer (sm_80); this GPU is sm_{arch}", ""
    mod, why = _prebuilt()
    if mod is not None:
        src = cuda_build.source_dir()
        why = _prebuilt_problem(mod, arch, cuda_build.source_hash(src) if src else None)
        if why is None:
            return mod, None, "installed"
    if os.environ.get("OPENLORA_CUDA_JIT", "1").lower() in ("0", "false", "no", "off"):
        return None, f"{why}; the on-first-use build is disabled (OPENLORA_CUDA_JIT=0)", ""
    jit, reason, path = cuda_build.load_or_build(arch)
    if jit is None:
        return None, f"{why}; {reason}", ""
    return jit, None, f"built on first use ({path})"


def _ensure() -> None:
    if "reason" not in _state:
        with _lock:
            if "reason" not in _state:
                mod, reason, origin = _load()
                _state.update(module=mod, origin=origin, reason=reason)


def unavailable_reason() -> Optional[str]:
    """None when backend "cuda" can run on the current CUDA device, else why not.

    The first call may compile the kernels into the per-user cache (see docs/cuda.md)."""
    _ensure()
    return _state["reason"]


def origin() -> str:
    """Where the loaded binary came from ("installed" or the cache path); "" when none."""
    _ensure()
    return _state["origin"]


def _module():
    _ensure()
    if _state["module"] is None:
        raise BackendUnavailableError(f"backend 'cuda' is unavailable: {_state['reason']}")
    return _state["module"]


# ------------------------------------------------------------------------- argument packing


def dtype_code(dtype: torch.dtype, name: str = "x") -> int:
    code = DTYPE_CODES.get(dtype)
    if code is None:
        raise TypeError(f"{name}: dtype {dtype} is not supported by the CUDA backend "
                        "(float16, bfloat16 or float32)")
    return code


def pack_slices(a_list: Optional[Sequence[torch.Tensor]], b_list: Optional[Sequence[torch.Tensor]],
                base: int, count: int) -> List[Tuple[int, ...]]:
    """One (a, a_ss, a_sr, a_sk, b, b_ss, b_sn, b_sr, n, col) tuple per slice base..base+count-1
    (pointers as ints, strides in elements; zeros for the side a launch does not read)."""
    cols = slice_columns(b_list) if b_list is not None else None
    out = []
    for i in range(base, base + count):
        a = (a_list[i].data_ptr(), *a_list[i].stride()) if a_list is not None else (0, 0, 0, 0)
        if b_list is not None:
            B = b_list[i]
            b = (B.data_ptr(), *B.stride(), B.shape[1], cols[i])
        else:
            b = (0, 0, 0, 0, 0, 0)
        out.append(tuple(int(v) for v in a + b))
    return out


def _ranks_args(ranks: Optional[torch.Tensor]) -> Dict[str, int]:
    if ranks is None:
        return {"ranks": 0, "sr_n": 0, "sr_s": 0, "ranks_i64": 0, "has_ranks": 0}
    sr_n, sr_s = rank_strides(ranks)
    return {"ranks": ranks.data_ptr(), "sr_n": sr_n, "sr_s": sr_s,
            "ranks_i64": int(ranks.dtype == torch.int64), "has_ranks": 1}


def pack_args(*, meta: LoRABatchMeta, K: int, R: int, S: int, ranks: Optional[torch.Tensor],
              x: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None,
              h: Optional[torch.Tensor] = None, scalings: Optional[torch.Tensor] = None,
              packed=None) -> Dict[str, int]:
    """The binding's ``args`` dict (see csrc/bindings.cpp); absent tensors become null pointers."""
    if meta.sorted_tokens.dtype != torch.int32 or meta.tile_info.dtype != torch.int32:
        raise TypeError("indices: the batch metadata must hold int32 sorted_tokens and tile_info")
    if not (meta.sorted_tokens.is_contiguous() and meta.tile_info.is_contiguous()):
        raise ValueError("indices: the batch metadata tensors must be contiguous")
    args = {
        "x": 0, "sx_t": 0, "sx_k": 0, "y": 0, "sy_t": 0, "sy_n": 0,
        "h": 0, "sh_n": 0, "sh_t": 0, "sh_r": 0, "scal": 0, "s_scal": 0,
        "sorted_tokens": meta.sorted_tokens.data_ptr(), "tile_info": meta.tile_info.data_ptr(),
        "G": meta.num_tiles, "T": meta.num_tokens, "K": K, "R": R, "S": S, "slice_base": 0,
    }
    args.update(_ranks_args(ranks))
    if x is not None:
        args.update(x=x.data_ptr(), sx_t=x.stride(0), sx_k=x.stride(1))
    if y is not None:
        args.update(y=y.data_ptr(), sy_t=y.stride(0), sy_n=y.stride(1))
    if h is not None:
        args.update(h=h.data_ptr(), sh_n=h.stride(0), sh_t=h.stride(1), sh_r=h.stride(2))
    if scalings is not None:
        args.update(scal=scalings.data_ptr(), s_scal=scalings.stride(0))
    if packed is not None:          # the packed form (ops/packed.py): optional keys of the binding
        args.update(offs=packed.offsets.data_ptr(), offs_i64=int(packed.offsets.dtype == torch.int64),
                    rows=packed.rows)
    return {k: int(v) for k, v in args.items()}


def slice_groups(n: int) -> List[Tuple[int, int]]:
    """(base, count) of each launch for n slices, at most MAX_SLICES per launch."""
    return launch_args.slice_groups(n, MAX_SLICES)


def _launch(op: int, dtype: torch.dtype, meta: LoRABatchMeta, args: Dict[str, int],
            a_list, b_list, n: int, device: torch.device) -> None:
    mod = _module()
    code = dtype_code(dtype)
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        for base, count in slice_groups(n):
            args["slice_base"] = base
            mod.run(op, code, meta.block_m, args, pack_slices(a_list, b_list, base, count), stream)


# ------------------------------------------------------------------------------ backend API

# The packed weight form (ops/packed.py): a per-slot row offset (SgmvParams.offs, load_offset).
SUPPORTS_PACKED = True


def shrink(x: torch.Tensor, a_list: Sequence[torch.Tensor], ranks: Optional[torch.Tensor],
           meta: LoRABatchMeta, out: Optional[torch.Tensor] = None, packed=None) -> torch.Tensor:
    """h [n_slices, T, R] fp32 = x @ A[slot, :rank].T per row (0 elsewhere), unscaled; into
    ``out`` (internal, any strides) when given."""
    T, K = x.shape
    S, R, _ = a_list[0].shape
    n = len(a_list)
    dtype_code(x.dtype)
    h = torch_ref.new_h(out, n, T, R, x.device)
    if T == 0 or R == 0 or K == 0 or S == 0 or meta.num_tiles == 0:
        return h
    args = pack_args(meta=meta, K=K, R=R, S=S, ranks=ranks, x=x, h=h, packed=packed)
    _launch(OP_SHRINK, x.dtype, meta, args, a_list, None, n, x.device)
    return h


def expand(y: torch.Tensor, h: torch.Tensor, b_list: Sequence[torch.Tensor], scalings: torch.Tensor,
           ranks: Optional[torch.Tensor], meta: LoRABatchMeta, packed=None) -> None:
    """y[t, cols_i] += scalings[s] * h[i, t, :rank] @ B_i[s, :, :rank].T for rows with a slot."""
    T, N = y.shape
    S, _, R = b_list[0].shape
    n = len(b_list)
    dtype_code(y.dtype, "y")
    if T == 0 or R == 0 or N == 0 or S == 0 or meta.num_tiles == 0:
        return
    h32 = h if h.dtype == torch.float32 else h.to(torch.float32)  # exact for fp16 / bf16
    args = pack_args(meta=meta, K=0, R=R, S=S, ranks=ranks, y=y, h=h32, scalings=scalings, packed=packed)
    _launch(OP_EXPAND, y.dtype, meta, args, None, b_list, n, y.device)


def add_lora(y: torch.Tensor, x: torch.Tensor, a_list: Sequence[torch.Tensor], b_list: Sequence[torch.Tensor],
             scalings: torch.Tensor, ranks: Optional[torch.Tensor], meta: LoRABatchMeta, packed=None) -> None:
    T, K = x.shape
    S, R, _ = a_list[0].shape
    N = y.shape[1]
    dtype_code(x.dtype)
    if T == 0 or R == 0 or N == 0 or K == 0 or S == 0 or meta.num_tiles == 0:
        return
    if meta.block_m >= TENSOR_CORE_MIN_M:
        expand(y, shrink(x, a_list, ranks, meta, packed=packed), b_list, scalings, ranks, meta, packed)
        return
    args = pack_args(meta=meta, K=K, R=R, S=S, ranks=ranks, x=x, y=y, scalings=scalings, packed=packed)
    _launch(OP_FUSED, x.dtype, meta, args, a_list, b_list, len(a_list), x.device)


# ------------------------------------------------------------------------------- bound plans
#
# What BoundLoRA calls on this backend: the layer's weights, strides, slices, scalings and ranks are
# parsed and validated once in C++ (``_cuda_sgmv.Bound``, rebuilt on every pool change); the batch
# metadata once per forward (``_cuda_sgmv.MetaArgs``, kept on the metadata object); a call passes
# x's and y's pointers and strides and the stream: one C++ call, which plans and launches exactly
# as ``run`` does (tests/test_bound_plans.py compares the launched parameter bytes).


# current device index and raw current stream of a device index: torch's C functions (one call each)
if hasattr(torch._C, "_cuda_getDevice") and hasattr(torch._C, "_cuda_getCurrentRawStream"):
    _current_device, _current_stream = torch._C._cuda_getDevice, torch._C._cuda_getCurrentRawStream
else:                                     # a CPU build of torch (the host stub of benchmarks/ replaces these)
    def _current_device() -> int:
        return torch.cuda.current_device()

    def _current_stream(index: int) -> int:
        return torch.cuda.current_stream(index).cuda_stream


def meta_args(meta: LoRABatchMeta):
    """The binding's MetaArgs of ``meta``, once per metadata object (its tensors are not resized in place)."""
    m = meta.__dict__.get("_cuda_args")
    if m is None:
        if meta.sorted_tokens.dtype != torch.int32 or meta.tile_info.dtype != torch.int32:
            raise TypeError("indices: the batch metadata must hold int32 sorted_tokens and tile_info")
        m = _module().MetaArgs(meta.sorted_tokens.data_ptr(), meta.tile_info.data_ptr(), meta.num_tiles,
                               meta.num_tokens, meta.block_m)
        ts = meta.token_slots
        object.__setattr__(meta, "_cuda_key", (meta.block_m, meta.num_tiles, ts.shape[0], meta.num_slots,
                                               ts.get_device()))
        object.__setattr__(meta, "_cuda_args", m)
    return m


class BoundAdd:
    """``add_lora`` on the CUDA backend for one layer's fixed weights (see "bound plans" above)."""

    __slots__ = ("_plan", "_keep", "_index", "_n", "_R", "_device", "_seen", "__weakref__")

    def __init__(self, a_list, b_list, scalings, ranks):
        mod = _module()
        S, R, K = a_list[0].shape
        ra = _ranks_args(ranks)
        self._plan = mod.Bound(dtype_code(a_list[0].dtype), K, R, S, scalings.data_ptr(), scalings.stride(0),
                               ra["ranks"], ra["sr_n"], ra["sr_s"], ra["ranks_i64"], ra["has_ranks"],
                               pack_slices(a_list, b_list, 0, len(a_list)))
        self._keep = (list(a_list), list(b_list), scalings, ranks)   # what the plan points into
        self._device = a_list[0].device
        self._index = self._device.index if self._device.index is not None else 0
        self._n, self._R = len(a_list), R
        self._seen = set()      # signatures of the checked calls (see fast)

    def fast(self, y, x, meta: LoRABatchMeta) -> bool:
        """The launch of a decode-like call whose signature (x's and y's shapes, strides, dtypes,
        devices; the metadata's facts) a checked call already had; False, having done nothing,
        otherwise (BoundLoRA then checks the call and calls this object, which records it)."""
        m = meta.__dict__.get("_cuda_args")
        if m is None or m.block_m >= TENSOR_CORE_MIN_M:
            return False
        sx, sy = x.stride(), y.stride()
        if ((meta.__dict__["_cuda_key"], x.shape, y.shape, sx, sy, x.dtype, y.dtype, x.get_device(), y.get_device())
                not in self._seen or _current_device() != self._index):
            return False
        self._plan.add(x.data_ptr(), sx[0], sx[1], y.data_ptr(), sy[0], sy[1], m, 0, 0, 0, 0,
                       _current_stream(self._index))
        return True

    def __call__(self, y, x, meta: LoRABatchMeta) -> None:
        """A checked call (BoundLoRA's general path)."""
        m = meta_args(meta)
        if _current_device() != self._index:
            a, b, scal, ranks = self._keep
            with torch.cuda.device(self._device):
                return add_lora(y, x, a, b, scal, ranks, meta)
        sx, sy = x.stride(), y.stride()
        if meta.block_m >= TENSOR_CORE_MIN_M:
            h = torch.zeros((self._n, x.shape[0], self._R), dtype=torch.float32, device=x.device)
            self._plan.add(x.data_ptr(), sx[0], sx[1], y.data_ptr(), sy[0], sy[1], m, h.data_ptr(), *h.stride(),
                           _current_stream(self._index))
            return
        self._plan.add(x.data_ptr(), sx[0], sx[1], y.data_ptr(), sy[0], sy[1], m, 0, 0, 0, 0,
                       _current_stream(self._index))
        if len(self._seen) >= 64:
            self._seen.clear()
        self._seen.add((meta.__dict__["_cuda_key"], x.shape, y.shape, sx, sy, x.dtype, y.dtype, x.get_device(),
                        y.get_device()))


class _BoundPacked:
    """The packed form on this backend: the checked general path each call (the C++ bound plan
    does not take offsets yet)."""

    __slots__ = ("_args",)

    def __init__(self, a_list, b_list, scalings, ranks, packed):
        self._args = (list(a_list), list(b_list), scalings, ranks, packed)

    def __call__(self, y, x, meta: LoRABatchMeta) -> None:
        a, b, scal, ranks, packed = self._args
        with torch.cuda.device(a[0].device):
            add_lora(y, x, a, b, scal, ranks, meta, packed)


def bind(a_list, b_list, scalings, ranks, packed=None):
    """A callable ``(y, x, meta) -> None`` equal to ``add_lora(y, x, a_list, b_list, scalings, ranks, meta)``
    (what ``BoundLoRA`` calls on this backend; see "bound plans" above)."""
    if packed is not None:
        return _BoundPacked(a_list, b_list, scalings, ranks, packed)
    return BoundAdd(a_list, b_list, scalings, ranks)


def weight_grads(p_list, q_list, scalings, ranks_list, meta: LoRABatchMeta, rank_on_p: bool, out_list) -> None:
    """The LoRA backward's segmented weight-gradient products (dA, dB; see torch_ref.weight_grads).
    csrc/ has no kernel for them: the Triton kernel when Triton can run on this GPU, else the torch
    backend's sync-free gather strategy. (dx and dh reuse this backend's own shrink / expand.)"""
    from .backends import _triton_reason

    if _triton_reason("cuda") is None:
        from . import triton_sgmv
        return triton_sgmv.weight_grads(p_list, q_list, scalings, ranks_list, meta, rank_on_p, out_list)
    return torch_ref.weight_grads(p_list, q_list, scalings, ranks_list, meta, rank_on_p, out_list)
