"""vLLM drop-in: a punica wrapper on openlora_kernels, chosen by vLLM's platform.

vLLM routes every LoRA computation through one object, the punica wrapper
(``vllm.lora.punica_wrapper.punica_base.PunicaWrapperBase``), which the platform names with
``current_platform.get_punica_wrapper()``. :class:`PunicaWrapperOpenLoRA` implements that whole
interface of vLLM 0.33 on our ops (``openlora_kernels.ops.api``) and batch metadata
(``openlora_kernels.metadata``); :func:`enable` makes the platform return it. Installing
openlora_kernels also registers a ``vllm.general_plugins`` entry point
(``openlora_kernels.integrations:vllm_plugin``) that calls :func:`enable` in every vLLM process when
``OPENLORA_VLLM=1`` is set, and does nothing otherwise. See docs/integrations.md.

What vLLM 0.33 hands the wrapper (read from its sources; some docstrings there say otherwise):

* Weights, used in place (views, never copied): A as ``[max_loras, 1, r, K]`` and B as
  ``[max_loras, 1, N, r]`` per slice, the scaling folded into B, every adapter zero-padded to
  ``max_lora_rank``. vLLM passes no ranks; :class:`PunicaWrapperOpenLoRA` finds each slot's rank
  from the weights (its last nonzero row of A, or column of B) once per weight update, through the
  tensors' version counters (no host sync), so a rank-8 adapter in a rank-64 stack costs rank 8.
* ``update_metadata(mapping, lora_index_to_id, max_loras=slots + 1, vocab_size)``, with
  ``mapping.is_prefill`` always True in vLLM v1. It fills the base class's buffers (the layers read
  ``_embeddings_indices``, ``token_lora_indices`` and ``sampler_indices`` directly) and our static
  per-row slot buffers, sized by ``max_num_batched_tokens``.
* ``add_shrink``'s y is one zeroed fp32 ``[n_slices, T, r]`` tensor, overwritten (rows without
  LoRA end up 0); ``add_expand`` reads that same tensor. The layers pass ``add_input=True`` (sic),
  which lands in ``**kwargs`` and, as in vLLM's own wrappers, is ignored.
* ``add_lora_linear`` gets ``buffer=None``; a dual-stream path passes ``add_inputs=False`` (LoRA
  rows overwritten, other rows untouched).
* ``add_lora_embedding``'s x is built by the layer from ``_embeddings_indices``: rows without LoRA
  carry slot 0's values and are masked here.
* ``add_lora_logits`` routes by ``sampler_indices`` (one row per sampled token, several per request
  under speculative decoding); y may be wider than the vocabulary (the padding is untouched) and
  fp32 while the weights are bf16.

Rows whose LoRA id is 0, columns outside the slices and the vocabulary padding are never written
(bit-for-bit unchanged). Not accelerated: the MoE methods raise NotImplementedError naming the
method and the vLLM setting that avoids them (vLLM's own CPU wrapper does not have them either).

Run under ``torch.inference_mode()`` (or ``no_grad``), as vLLM does: the ops are inference-only.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import VLLM_ENABLE_ENV

SUPPORTED_VLLM_SERIES = ("0.33",)
"""The vLLM release series this wrapper is written and tested against (``major.minor``)."""

BACKEND_ENV = "OPENLORA_VLLM_BACKEND"
PUNICA_WRAPPER_QUALNAME = f"{__name__}.PunicaWrapperOpenLoRA"


class VLLMVersionError(RuntimeError):
    """The installed vLLM is not a version this integration supports (or vLLM is missing)."""


def installed_vllm_version() -> Optional[str]:
    """The installed vLLM distribution's version, or None when vLLM is not installed."""
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_vllm_version(version: Optional[str] = None) -> str:
    """Return ``version`` (default: the installed vLLM's) if it is supported, else raise
    :class:`VLLMVersionError` naming the supported versions."""
    version = installed_vllm_version() if version is None else version
    supported = ", ".join(f"{s}.x" for s in SUPPORTED_VLLM_SERIES)
    if version is None:
        raise VLLMVersionError(f"openlora_kernels' vLLM integration needs vLLM {supported}, but vLLM is not installed")
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None or f"{m.group(1)}.{m.group(2)}" not in SUPPORTED_VLLM_SERIES:
        raise VLLMVersionError(
            f"openlora_kernels' vLLM integration supports vLLM {supported}, but vLLM {version} is installed: "
            f"install vllm=={SUPPORTED_VLLM_SERIES[-1]}.* or unset {VLLM_ENABLE_ENV} to keep vLLM's own punica wrapper")
    return version


# The classes below subclass this vLLM's own base class: refuse another version here, before
# importing it, so that a mismatch is one clear error instead of a crash inside a forward.
check_vllm_version()

from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase  # noqa: E402

from ..metadata import LoRABatchMeta, _native_builder, build_batch_meta, choose_block_m, max_tiles  # noqa: E402
from ..ops.api import BoundLoRA, add_lora, lora_expand, lora_shrink  # noqa: E402
from ..ops.backends import BACKEND_CHOICES, resolve_backend  # noqa: E402

if TYPE_CHECKING:  # vllm.lora.layers does not import on a CPU install without vLLM's dependencies
    from vllm.lora.layers import LoRAMapping


# ----------------------------------------------------------------------------- switching it on


def _wrapper_qualname() -> str:
    return PUNICA_WRAPPER_QUALNAME


def _check_backend(backend: str) -> str:
    if not isinstance(backend, str) or backend not in BACKEND_CHOICES:
        raise ValueError(f"backend: unknown backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    return backend


def enable(backend: Optional[str] = None) -> None:
    """Make vLLM's platform return :class:`PunicaWrapperOpenLoRA` as its punica wrapper.

    Call it before vLLM builds its model (before ``vllm.LLM(...)``). It also sets
    ``OPENLORA_VLLM=1`` (and ``OPENLORA_VLLM_BACKEND`` when ``backend`` is given) in this process's
    environment, so that the engine and worker processes vLLM starts afterwards switch it on too,
    through the plugin entry point. ``backend``: "auto" (default), "cpu", "torch", "triton" or
    "cuda" (see ``openlora_kernels.available_backends``).

    Raises :class:`VLLMVersionError` on a vLLM other than the supported series, RuntimeError on a
    platform our kernels do not run on (ROCm).
    """
    check_vllm_version()
    if backend is not None:
        os.environ[BACKEND_ENV] = _check_backend(backend)
    from vllm.platforms import current_platform

    if current_platform.is_rocm():
        raise RuntimeError("openlora_kernels' vLLM integration does not support ROCm; "
                           f"unset {VLLM_ENABLE_ENV} to keep vLLM's own punica wrapper")
    os.environ[VLLM_ENABLE_ENV] = "1"
    # An instance attribute shadows the platform class's classmethod in this process only.
    current_platform.get_punica_wrapper = _wrapper_qualname


def disable() -> None:
    """Undo :func:`enable` in this process (vLLM's own wrapper again for wrappers built from now on)."""
    os.environ.pop(VLLM_ENABLE_ENV, None)
    from vllm.platforms import current_platform

    if vars(current_platform).get("get_punica_wrapper") is _wrapper_qualname:
        del current_platform.get_punica_wrapper


def is_enabled() -> bool:
    """Whether vLLM's platform currently names our wrapper."""
    from vllm.platforms import current_platform

    return vars(current_platform).get("get_punica_wrapper") is _wrapper_qualname


# ------------------------------------------------------------------------------- host helpers


def _ints(seq) -> np.ndarray:
    """A tuple/list of ints (vLLM's mappings) as an int64 array."""
    if isinstance(seq, np.ndarray):
        return seq.astype(np.int64, copy=False)
    return np.fromiter(seq, dtype=np.int64, count=len(seq))


_DENSE_IDS = 1 << 20          # LoRA ids below this go through a dense table


def _slot_lookup(lora_index_to_id: Sequence[Optional[int]]):
    """vLLM's LoRA id -> slot map (a repeated id: its last slot), as a dense table indexed by id
    (-1 at index 0 and for ids <= 0: no LoRA; -2: an id in no slot; the last entry stands for every
    larger id), or, for very large ids, (sorted ids, their slots)."""
    last = {lid: i for i, lid in enumerate(lora_index_to_id) if lid is not None and lid > 0}
    top = max(last, default=0)
    if top < _DENSE_IDS:
        lut = np.full(top + 2, -2, dtype=np.int64)
        lut[0] = -1
        for lid, i in last.items():
            lut[lid] = i
        return lut
    ids = sorted(last)
    return np.array(ids, dtype=np.int64), np.array([last[i] for i in ids], dtype=np.int64)


def _to_slots(ids: np.ndarray, lookup, name: str) -> np.ndarray:
    """Slot of each LoRA id (ids <= 0: -1, no LoRA), or KeyError naming an id in no slot."""
    if isinstance(lookup, np.ndarray):
        out = lookup.take(ids, mode="clip")                   # ids <= 0 -> entry 0, large ids -> the last
        if ids.size and out.min() < -1:
            p = int(np.argmax(out < -1))
            known = np.flatnonzero(lookup >= 0).tolist()
            raise KeyError(f"{name}: LoRA id {int(ids[p])} at position {p} is in no slot of lora_index_to_id "
                           f"(ids in slots: {known})")
        return out
    keys, slots = lookup
    j = np.minimum(np.searchsorted(keys, ids), keys.size - 1)
    bad = (ids > 0) & (keys[j] != ids)
    if bad.any():
        p = int(np.argmax(bad))
        raise KeyError(f"{name}: LoRA id {int(ids[p])} at position {p} is in no slot of lora_index_to_id "
                       f"(ids in slots: {keys.tolist()})")
    return np.where(ids > 0, slots[j], -1)


_ARANGE = np.arange(1, dtype=np.int64)


def _arange(n: int) -> np.ndarray:
    """0..n (n + 1 values), from one cached array (read-only use)."""
    global _ARANGE
    if _ARANGE.shape[0] <= n:
        _ARANGE = np.arange(max(2 * n, 1024) + 1, dtype=np.int64)
    return _ARANGE[:n + 1]


def host_batch_meta(slots: np.ndarray, num_slots: int, block_m: int) -> LoRABatchMeta:
    """``build_batch_meta(torch.from_numpy(slots), num_slots, block_m=block_m)`` computed with numpy
    on the host, for CPU batches: the same fields (tested equal), in tens of microseconds instead of
    hundreds (about twenty small torch ops). ``slots``: [T] int array, -1 = no adapter."""
    T, S, bm = int(slots.shape[0]), int(num_slots), int(block_m)
    if T == 0 or S == 0:
        return build_batch_meta(torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int32)), S, block_m=bm)
    s = np.asarray(slots)
    return _host_meta(np.where((s >= 0) & (s < S), s, S), S, bm)


def _host_meta(key: np.ndarray, S: int, bm: int) -> LoRABatchMeta:
    """host_batch_meta from ``key``: each row's slot in [0, S), or S for no adapter (T, S > 0).
    With the native CPU extension built: its counting sort (build_batch_meta), else numpy."""
    if _native_builder() is not None:
        return build_batch_meta(torch.from_numpy(np.where(key < S, key, -1).astype(np.int32)), S, block_m=bm)
    T = key.shape[0]
    order = np.argsort(key, kind="stable")
    seg_len = np.bincount(key, minlength=S + 1)[:S]
    seg_end = np.cumsum(seg_len)
    seg_start = seg_end - seg_len
    seg_info = np.empty((2, S), dtype=np.int32)
    seg_info[0], seg_info[1] = seg_start, seg_len
    n = int(seg_end[-1])                                      # rows with a slot
    if bm == 1:                                               # tile p = sorted row p
        tile_info = np.zeros((3, T), dtype=np.int32)
        tile_info[0, n:] = -1
        tile_info[0, :n] = key[order[:n]]
        ar = _arange(n)
        tile_info[1, :n], tile_info[2, :n] = ar[:n], ar[1:]
    else:
        G = int(max_tiles(T, S, bm))
        tiles = (seg_len + (bm - 1)) // bm
        tiles_end = np.cumsum(tiles)
        p = _arange(G)[:G]
        tslot = np.searchsorted(tiles_end, p, side="right")
        has = tslot < S
        ts = np.minimum(tslot, S - 1)
        start = seg_start[ts] + (p - (tiles_end[ts] - tiles[ts])) * bm
        end = np.minimum(start + bm, seg_end[ts])
        tile_info = np.zeros((3, G), dtype=np.int32)
        tile_info[0] = np.where(has, tslot, -1)
        tile_info[1] = np.where(has, start, 0)
        tile_info[2] = np.where(has, end, 0)
    token_slots = np.where(key < S, key, -1).astype(np.int32)
    return LoRABatchMeta(torch.from_numpy(token_slots), torch.from_numpy(order.astype(np.int32)),
                         torch.from_numpy(seg_info), torch.from_numpy(tile_info), num_slots=S, block_m=bm)


def _not_moe(method: str):
    raise NotImplementedError(
        f"PunicaWrapperOpenLoRA.{method}: LoRA on MoE experts is not served by openlora_kernels. Restrict LoRA "
        "to the non-expert modules (LoRAConfig.target_modules, e.g. --lora-target-modules qkv_proj o_proj), or "
        f"unset {VLLM_ENABLE_ENV} to use vLLM's own punica wrapper for this model")


_FORWARD = []          # [get_forward_context, is_forward_context_available], or [None] without them


def _forward_token():
    """The current vLLM forward's ForwardContext (a new object per forward, CUDA-graph captures
    included), or None outside one. Metadata built on a GPU is reused within one forward only."""
    if not _FORWARD:
        try:
            from vllm.forward_context import get_forward_context, is_forward_context_available
            _FORWARD[:] = [get_forward_context, is_forward_context_available]
        except Exception:      # a CPU install without vLLM's dependencies: no forward contexts
            _FORWARD[:] = [None]
    if _FORWARD[0] is None or not _FORWARD[1]():
        return None
    return _FORWARD[0]()


# ------------------------------------------------------------------------------ layer weights


class _Weights:
    """One layer's stacked vLLM weights as our ops take them: [S, R, K] / [S, N, R] views of vLLM's
    4-D tensors (no copy), each slot's rank found from them (refreshed when the tensors' version
    counters move, i.e. after vLLM wrote a slot), and, for the fused op, a ``BoundLoRA``."""

    __slots__ = ("src", "a", "b", "ranks", "versions", "bound", "scal", "dtype")

    def __init__(self, src, a, b, scal, find_ranks: bool = True):
        self.src, self.a, self.b, self.scal = src, a, b, scal
        self.dtype = (b or a)[0].dtype
        self.versions = None
        self.bound = None
        ref = (a or b)[0]
        self.ranks: Optional[torch.Tensor] = None
        if find_ranks and _versions(src) is not None:   # inference tensors carry no version counter: pay the padding
            # a normal tensor even inside inference_mode: its version counter lets the ops' rank check
            # skip re-reading it on every call
            with torch.inference_mode(False):
                self.ranks = torch.zeros((len(a or b), ref.shape[0]), dtype=torch.int32, device=ref.device)

    def refresh(self) -> None:
        if self.ranks is None:
            return
        v = _versions(self.src)
        if v != self.versions:
            with torch.inference_mode(False), torch.no_grad():
                self.ranks.copy_(torch.stack([_rank_of(W, self.a is not None) for W in (self.a or self.b)]))
            self.versions = v


def _versions(tensors) -> Optional[tuple]:
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:
        return None


def _rank_of(W: torch.Tensor, is_a: bool) -> torch.Tensor:
    """[S] int32: 1 + the last rank lane of each slot holding a nonzero (A: a row of [S, R, K];
    B: a column of [S, N, R]); 0 for an empty slot. Lanes past it are zero padding, so skipping
    them changes nothing."""
    R = W.shape[1] if is_a else W.shape[2]
    nz = (W != 0).any(dim=2 if is_a else 1)                                      # [S, R]
    lanes = torch.arange(1, R + 1, dtype=torch.int32, device=W.device)
    return torch.where(nz, lanes, 0).amax(dim=1).to(torch.int32) if R else torch.zeros(W.shape[0], dtype=torch.int32,
                                                                                        device=W.device)


def _as_tuple(w) -> tuple:
    return tuple(w) if isinstance(w, (list, tuple)) else (w,)


def _view3(t: torch.Tensor, name: str) -> torch.Tensor:
    """vLLM's [S, 1, X, Y] stacked weight as an [S, X, Y] view (3-D tensors pass as they are)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 4:
        if t.shape[1] != 1:
            raise ValueError(f"{name}: expected vLLM's [max_loras, 1, ., .] layout, got shape {tuple(t.shape)}")
        return t[:, 0]
    if t.dim() == 3:
        return t
    raise ValueError(f"{name}: expected a 4-D [max_loras, 1, ., .] (or 3-D) tensor, got shape {tuple(t.shape)}")


# ------------------------------------------------------------------------------------ wrapper


class PunicaWrapperOpenLoRA(PunicaWrapperBase):
    """vLLM's punica wrapper on openlora_kernels (see the module docstring for what vLLM passes).

    Built by vLLM as ``(max_num_batched_tokens, max_batches=max_num_seqs, device=..., lora_config=...)``.
    ``backend=`` (or ``OPENLORA_VLLM_BACKEND``) picks the kernel backend ("auto" by default: triton
    on a GPU, the native cpu kernels on the CPU); ``find_ranks=False`` computes every slot at
    ``max_lora_rank`` like vLLM does (to measure what the padding costs).

    Metadata: ``update_metadata`` converts vLLM's mapping on the host (it arrives as Python tuples),
    fills the base class's buffers and our per-row slot buffers ``[max_num_batched_tokens]``
    int32 (-1 past the batch, so rows a CUDA graph pads are untouched), with one host-to-device copy
    and no sync. The batch metadata (``LoRABatchMeta``) is then built once per forward and kind
    (token rows, sampled rows): on the CPU right away, with numpy; on a GPU by the first LoRA call
    of the forward from the static slot buffer (device ops, no sync), so that a CUDA graph
    captures the build and replays it on the new slots. Every later layer of the forward reuses it.
    """

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device, **kwargs):
        super().__init__(max_num_batched_tokens, max_batches, device)
        self.lora_config = kwargs.get("lora_config")
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.backend = _check_backend(kwargs.get("backend") or os.environ.get(BACKEND_ENV, "auto"))
        resolve_backend(self.backend, dev)            # an unusable backend fails here, not in a forward
        self._dev = dev
        self._host = dev.type == "cpu"
        self._find_ranks = bool(kwargs.get("find_ranks", True))
        self._slots = {k: torch.full((max_num_batched_tokens,), -1, dtype=torch.int32, device=dev)
                       for k in ("tok", "smp")}
        self._high = {"tok": 0, "smp": 0}             # rows of _slots that may hold a slot id
        self._block_m = {"tok": 1, "smp": 1}
        self._no_lora = {"tok": True, "smp": True}
        self._metas: Dict[str, tuple] = {}            # kind -> (metadata, the forward it belongs to)
        self._traced: Dict[str, LoRABatchMeta] = {}   # the same, inside a torch.compile trace
        self._weights: Dict[tuple, _Weights] = {}
        self._scalings: Dict[tuple, torch.Tensor] = {}
        self._lookup_key: Optional[tuple] = None
        self._lookup = _slot_lookup([])
        if self._host:
            self._np = {"token_lora_indices": self._token_lora_indices.numpy(),
                        "sampler_indices": self._sampler_indices.numpy(),
                        "sampler_indices_padded": self._sampler_indices_padded.numpy(),
                        "embeddings_indices": self._embeddings_indices.numpy(),
                        "tok": self._slots["tok"].numpy(), "smp": self._slots["smp"].numpy()}
        self.no_lora = True

    # ------------------------------------------------------------------------------ metadata

    def update_metadata(self, mapping: "LoRAMapping", lora_index_to_id: List[Optional[int]], max_loras: int,
                        vocab_size: int, **kwargs) -> None:
        """Fill the base class's index buffers (same values as vLLM's ``convert_mapping``) and our
        slot buffers from ``mapping`` (``index_mapping``: LoRA id per token, ``prompt_mapping``: per
        sampled token; id 0 = no LoRA). ``max_loras`` is vLLM's slots + 1."""
        idx, prm = _ints(mapping.index_mapping), _ints(mapping.prompt_mapping)
        T, Ts, cap = idx.shape[0], prm.shape[0], self._slots["tok"].shape[0]
        for name, n in (("mapping.index_mapping", T), ("mapping.prompt_mapping", Ts)):
            if n > cap:
                raise ValueError(f"{name}: {n} entries, more than max_num_batched_tokens={cap}")
        key = tuple(lora_index_to_id)
        key_changed = key != self._lookup_key
        if key_changed:
            self._lookup, self._lookup_key = _slot_lookup(lora_index_to_id), key
        tok = _to_slots(idx, self._lookup, "mapping.index_mapping")
        smp = _to_slots(prm, self._lookup, "mapping.prompt_mapping")
        emb = np.maximum(tok, 0) * vocab_size                    # rows without LoRA read slot 0's rows
        padded = np.where(smp < 0, max_loras - 1, smp) * Ts + _arange(Ts)[:Ts]
        if self._host:
            v = self._np
            v["token_lora_indices"][:T] = tok
            v["embeddings_indices"][:T] = emb
            v["sampler_indices"][:Ts] = smp
            v["sampler_indices_padded"][:Ts] = padded
            for kind, vals in (("tok", tok), ("smp", smp)):
                v[kind][:vals.shape[0]] = vals
                if self._high[kind] > vals.shape[0]:
                    v[kind][vals.shape[0]:self._high[kind]] = -1
        else:
            self._write_device(T, Ts, tok, emb, smp, padded)
        self._high = {"tok": T, "smp": Ts}
        self.indices_len[:] = [T, Ts, Ts, T]
        self.is_prefill = bool(mapping.is_prefill)
        S = len(lora_index_to_id)
        self._no_lora = {"tok": T == 0 or int(tok.max()) < 0, "smp": Ts == 0 or int(smp.max()) < 0}
        self.no_lora = self._no_lora["tok"]
        self._block_m = {"tok": choose_block_m(T, S), "smp": choose_block_m(Ts, S)}
        self._metas.clear()
        self._traced.clear()
        if self._host:     # CPU: no graph to capture the build, so build the token rows' now (numpy);
            # the sampled rows' (logits, classification heads: rarely LoRA-targeted) on first use
            if T and S:
                self._metas["tok"] = (_host_meta(np.where(tok < 0, S, tok), S, self._block_m["tok"]), None)
        elif key_changed:  # new adapters in slots: refresh the ranks a CUDA graph replays (no call refreshes them)
            for st in self._weights.values():
                st.refresh()

    def _write_device(self, T, Ts, tok, emb, smp, padded) -> None:
        """One pinned host-to-device copy, then device copies into the static buffers (no sync)."""
        host = torch.from_numpy(np.concatenate((tok, emb, smp, padded)))
        if self._dev.type == "cuda":
            host = host.pin_memory()
        d = host.to(self._dev, non_blocking=True)
        self._token_lora_indices[:T].copy_(d[:T])
        self._embeddings_indices[:T].copy_(d[T:2 * T])
        self._sampler_indices[:Ts].copy_(d[2 * T:2 * T + Ts])
        self._sampler_indices_padded[:Ts].copy_(d[2 * T + Ts:])
        for kind, n, src in (("tok", T, d[:T]), ("smp", Ts, d[2 * T:2 * T + Ts])):
            self._slots[kind][:n].copy_(src)
            if self._high[kind] > n:
                self._slots[kind][n:self._high[kind]].fill_(-1)

    def _capturing(self) -> bool:
        return self._dev.type == "cuda" and torch.cuda.is_current_stream_capturing()

    def _meta(self, kind: str, T: int, S: int) -> LoRABatchMeta:
        """This forward's metadata for ``T`` rows over ``S`` slots, built by its first use.

        CPU: the one update_metadata built stays valid until the next. GPU: built from the static
        slot buffers by the first call of each vLLM forward (a CUDA-graph capture records the
        build; a metadata built outside the capture, or in another, is never baked into it). Inside
        a torch.compile trace: built in the graph, reused by the later layers of the trace."""
        compiling = torch.compiler.is_compiling()
        if compiling:
            m = self._traced.get(kind)
            fresh = m is not None and m.num_tokens == T and m.num_slots == S
        else:
            token = None if self._host else _forward_token()
            m, owner = self._metas.get(kind, (None, None))
            fresh = (m is not None and m.num_tokens == T and m.num_slots == S
                     and (self._host or (owner is token and not (token is None and self._capturing()))))
        if not fresh:
            buf = self._slots[kind]
            if T > buf.shape[0]:
                raise ValueError(f"x: {T} rows, more than max_num_batched_tokens={buf.shape[0]}")
            # Under torch.compile the block size is the one update_metadata chose (a constant of the
            # graph, as it must be for the kernels and the tiles to agree); eager: chosen from T.
            bm = self._block_m[kind] if compiling else choose_block_m(T, S)
            if self._host and not compiling:
                m = host_batch_meta(self._np[kind][:T], S, bm)
            else:
                m = build_batch_meta(buf[:T], S, block_m=bm)
            if compiling:
                self._traced[kind] = m
            else:
                self._metas[kind] = (m, token)
        return m

    def _skip(self, kind: str) -> bool:
        """No row of this batch has a LoRA: nothing to launch (never inside a trace or a CUDA-graph
        capture, which must record the launches for later batches)."""
        if not self._no_lora[kind] or torch.compiler.is_compiling():
            return False
        return not (self._dev.type == "cuda" and torch.cuda.is_current_stream_capturing())

    @property
    def prefill_metadata(self):
        """vLLM's sgmv metadata, computed on demand by vLLM's own ``compute_meta`` (a host sync on a
        GPU; nothing of ours reads it)."""
        self._update_prefill_metadata(self.token_lora_indices)
        return PunicaWrapperBase.prefill_metadata.fget(self)

    # ---------------------------------------------------------------------------- weights

    def _scal(self, S: int, scale: float) -> torch.Tensor:
        key = (S, float(scale))
        t = self._scalings.get(key)
        if t is None:
            t = torch.full((S,), float(scale), dtype=torch.float32, device=self._dev)
            if not self._capturing():    # made inside a capture, it would hold its value only in replays
                self._scalings[key] = t
        return t

    def _state(self, a_src: tuple, b_src: tuple, scale: float) -> _Weights:
        """The cached views, ranks and bound op of these weight tensors (a_src empty: expand only)."""
        src = a_src + b_src
        key = (tuple(map(id, src)), len(a_src), float(scale))
        st = self._weights.get(key)
        if st is None or any(p is not q for p, q in zip(st.src, src)):
            a = [_view3(t, f"lora_a_stacked[{i}]") for i, t in enumerate(a_src)] or None
            b = [_view3(t, f"lora_b_stacked[{i}]") for i, t in enumerate(b_src)] or None
            S = (a or b)[0].shape[0]
            if len(self._weights) >= 4096:
                self._weights.clear()
            st = self._weights[key] = _Weights(src, a, b, self._scal(S, scale), self._find_ranks)
        st.refresh()
        return st

    def _views(self, a_src: tuple, b_src: tuple, scale: float):
        """(a views, b views, scalings, ranks, state or None). Inside a torch.compile trace: plain
        views and no ranks (version counters and tensor identities are not traceable)."""
        if torch.compiler.is_compiling() or (self._capturing() and not self._ready(a_src, b_src, scale)):
            # (a state made inside a CUDA-graph capture would hold its ranks only in replays)
            a = [_view3(t, f"lora_a_stacked[{i}]") for i, t in enumerate(a_src)]
            b = [_view3(t, f"lora_b_stacked[{i}]") for i, t in enumerate(b_src)]
            return a, b, self._scal((a or b)[0].shape[0], scale), None, None
        st = self._state(a_src, b_src, scale)
        return st.a, st.b, st.scal, st.ranks, st

    def _ready(self, a_src: tuple, b_src: tuple, scale: float) -> bool:
        """These weights have a state whose ranks are current (nothing to make or recompute)."""
        src = a_src + b_src
        st = self._weights.get((tuple(map(id, src)), len(a_src), float(scale)))
        return (st is not None and all(p is q for p, q in zip(st.src, src))
                and (st.ranks is None or st.versions == _versions(src)))

    # ----------------------------------------------------------------------- the computations

    @staticmethod
    def _zero_rows(y: torch.Tensor, meta: LoRABatchMeta) -> None:
        """Zero the rows of y that have a LoRA (the others keep their bits): overwrite = zero + add."""
        y.masked_fill_((meta.token_slots >= 0).unsqueeze(1), 0)

    def _expand_into(self, y, h, b, scal, ranks, meta, add_inputs: bool) -> None:
        """``y[lora rows] (+)= scal * h @ B^T``; rows without LoRA keep their bits."""
        if not add_inputs:
            self._zero_rows(y, meta)
        if y.dtype == b[0].dtype:
            lora_expand(y, h, b, meta, scal, ranks, backend=self.backend)
            return
        # y's dtype differs from the weights' (fp32 logits, bf16 weights): our ops keep one dtype, so
        # expand into a temporary of the weights' dtype that starts at -0.0 (x + -0.0 == x bit for
        # bit, so rows without LoRA come out unchanged) and add it.
        tmp = torch.full(y.shape, -0.0, dtype=b[0].dtype, device=y.device)
        lora_expand(tmp, h, b, meta, scal, ranks, backend=self.backend)
        y.add_(tmp)

    def _linear(self, y, x, a, b, scal, ranks, st: Optional[_Weights], meta, add_inputs: bool) -> None:
        """``y[lora rows] (+)= scal * (x @ A^T) @ B^T`` over all slices in one launch."""
        if x.dtype != a[0].dtype:
            x = x.to(a[0].dtype)
        if y.dtype != b[0].dtype:
            h = lora_shrink(x, a, meta, ranks, backend=self.backend)
            self._expand_into(y, h, b, scal, ranks, meta, add_inputs)
            return
        if not add_inputs:
            self._zero_rows(y, meta)
        if st is not None and y.shape[1] == sum(B.shape[1] for B in b):
            if st.bound is None:
                st.bound = BoundLoRA(a, b, scal, ranks, backend=self.backend)
            st.bound(y, x, meta)
        else:
            add_lora(y, x, a, b, meta, scal, ranks, backend=self.backend)

    @staticmethod
    def _check_slices(b, output_slices, name="output_slices") -> int:
        if len(output_slices) != len(b):
            raise ValueError(f"{name}: {len(output_slices)} slices, but lora_b_stacked has {len(b)}")
        for i, (B, n) in enumerate(zip(b, output_slices)):
            if B.shape[1] != n:
                raise ValueError(f"{name}[{i}]: {n} columns, but lora_b_stacked[{i}] has {B.shape[1]} "
                                 f"(shape {tuple(B.shape)} is [max_loras, N, r])")
        return sum(output_slices)

    @staticmethod
    def _rows(t: torch.Tensor, T: int, name: str) -> None:
        if t.shape[0] != T:
            raise ValueError(f"{name}: has {t.shape[0]} rows, but x has {T}")

    # ------------------------------------------------------------------------ vLLM's interface

    def add_shrink(self, y, x: torch.Tensor, lora_a_stacked, scale: float, **kwargs):
        """``y[i] = scale * x @ A_i[slot]^T`` per slice, rows without LoRA 0 (overwritten, as vLLM's
        kernels do). y: one [n_slices, T, >= r] tensor (what vLLM passes) or a sequence of [T, >= r];
        columns past r are untouched."""
        x = x.reshape(-1, x.shape[-1])
        a, _, _, ranks, _ = self._views(_as_tuple(lora_a_stacked), (), 1.0)
        T, R = x.shape[0], a[0].shape[1]
        outs = [y[i] for i in range(y.shape[0])] if isinstance(y, torch.Tensor) and y.dim() == 3 else list(_as_tuple(y))
        if len(outs) != len(a):
            raise ValueError(f"y: {len(outs)} slices, but lora_a_stacked has {len(a)}")
        for i, o in enumerate(outs):
            if o.dim() != 2 or o.shape[0] != T or o.shape[1] < R:
                raise ValueError(f"y[{i}]: expected [T={T}, >= r={R}], got shape {tuple(o.shape)}")
        if self._skip("tok"):
            for o in outs:
                o[:, :R].zero_()
            return y
        xs = x if x.dtype == a[0].dtype else x.to(a[0].dtype)
        h = lora_shrink(xs, a, self._meta("tok", T, a[0].shape[0]), ranks, backend=self.backend)
        if isinstance(y, torch.Tensor) and y.dim() == 3:
            outs = [y[:, :, :R]]
            h = h if scale == 1.0 else h * scale
            outs[0].copy_(h)
        else:
            for o, hi in zip(outs, h):
                o[:, :R].copy_(hi if scale == 1.0 else hi * scale)
        return y

    def add_expand(self, y: torch.Tensor, x, lora_b_stacked, output_slices: Tuple[int, ...], offset_start: int = 0,
                   add_inputs=True, **kwargs):
        """``y[:, offset_start + slice i] (+)= x[i] @ B_i[slot]^T`` for rows with LoRA (overwritten
        when ``add_inputs`` is False); other rows and columns untouched. x: [n_slices, T, r]."""
        y2 = y.view(-1, y.shape[-1])
        h = x if isinstance(x, torch.Tensor) else torch.stack(list(x))
        _, b, scal, ranks, _ = self._views((), _as_tuple(lora_b_stacked), 1.0)
        total = self._check_slices(b, output_slices)
        if h.dim() != 3 or h.shape[0] != len(b):
            raise ValueError(f"x: expected [n_slices={len(b)}, T, r], got shape {tuple(h.shape)}")
        if not 0 <= offset_start <= y2.shape[1] - total:
            raise ValueError(f"offset_start: {offset_start} + the slices' {total} columns do not fit in y's "
                             f"{y2.shape[1]} columns")
        T = h.shape[1]
        self._rows(y2, T, "y")
        if not self._skip("tok"):
            self._expand_into(y2[:, offset_start:offset_start + total], h, b, scal, ranks,
                              self._meta("tok", T, b[0].shape[0]), bool(add_inputs))
        return y

    def add_lora_embedding(self, y: torch.Tensor, x: torch.Tensor, lora_b_stacked: torch.Tensor, add_inputs: bool = True,
                           **kwargs):
        """``y (+)= x @ B[slot]^T`` for rows with LoRA. x: [T, r], the layer's gather of each row's
        slot of the embedding A (rows without LoRA hold slot 0's and are masked)."""
        y2, x2 = y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])
        _, b, scal, ranks, _ = self._views((), (lora_b_stacked,), 1.0)
        T = x2.shape[0]
        self._rows(y2, T, "y")
        n = min(b[0].shape[1], y2.shape[1])
        if not self._skip("tok"):
            bb = b if n == b[0].shape[1] else [b[0][:, :n]]
            self._expand_into(y2[:, :n], x2.unsqueeze(0), bb, scal, ranks, self._meta("tok", T, b[0].shape[0]),
                              bool(add_inputs))
        return y

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked, lora_b_stacked, scale: float,
                        output_slices: Tuple[int, ...], *, buffer=None, **kwargs):
        """``y[:, slice i] += scale * (x @ A_i[slot]^T) @ B_i[slot]^T`` for rows with LoRA, all
        slices in one launch; ``add_inputs=False`` (keyword) overwrites those rows instead."""
        add_inputs = bool(kwargs.pop("add_inputs", True))
        a_src, b_src = _as_tuple(lora_a_stacked), _as_tuple(lora_b_stacked)
        if len(a_src) != len(b_src):
            raise ValueError(f"lora_b_stacked: {len(b_src)} slices, but lora_a_stacked has {len(a_src)}")
        if buffer is not None:       # vLLM 0.33 never passes one; the CPU wrapper's meaning
            self.add_shrink(buffer, x, a_src, scale)
            return self.add_expand(y, buffer, b_src, output_slices, 0, add_inputs)
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        a, b, scal, ranks, st = self._views(a_src, b_src, scale)
        total = self._check_slices(b, output_slices)
        T = x2.shape[0]
        self._rows(y2, T, "y")
        if y2.shape[1] < total:
            raise ValueError(f"y: has {y2.shape[1]} columns, but output_slices add up to {total}")
        if not self._skip("tok"):
            self._linear(y2[:, :total], x2, a, b, scal, ranks, st, self._meta("tok", T, a[0].shape[0]), add_inputs)
        return y

    def add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                        lora_b_stacked: torch.Tensor, scale, *, buffer=None, **kwargs):
        """``y[:, :V] += scale * (x @ A[slot]^T) @ B[slot]^T`` for each sampled row with LoRA
        (routed by ``sampler_indices``); y's columns past the vocabulary V are untouched; y may be
        fp32 with bf16 weights."""
        y2, x2 = y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])
        a, b, scal, ranks, st = self._views((lora_a_stacked,), (lora_b_stacked,), scale)
        T = x2.shape[0]
        self._rows(y2, T, "y")
        n = min(b[0].shape[1], y2.shape[1])
        if self._skip("smp"):
            if buffer is not None:
                buffer.view(T, -1)[:, :a[0].shape[1]].zero_()
            return y
        meta = self._meta("smp", T, a[0].shape[0])
        if n < b[0].shape[1]:
            b, st = [b[0][:, :n]], None
        if buffer is not None:       # the CPU wrapper's meaning: buffer = scale * x A^T, y += buffer B^T
            xs = x2 if x2.dtype == a[0].dtype else x2.to(a[0].dtype)
            h = lora_shrink(xs, a, meta, ranks, backend=self.backend)[0]
            buf = buffer.view(T, -1)[:, :h.shape[1]]
            buf.copy_(h if scale == 1.0 else h * scale)
            self._expand_into(y2[:, :n], buf.unsqueeze(0), b, self._scal(a[0].shape[0], 1.0), ranks, meta, True)
            return y
        self._linear(y2[:, :n], x2, a, b, scal, ranks, st, meta, True)
        return y

    def apply_lora_full_linear(self, y: torch.Tensor, x: torch.Tensor, weight_stacked: torch.Tensor,
                               bias_stacked: torch.Tensor, module_enabled: torch.Tensor):
        """Classification heads: rows (routed by ``sampler_indices``) whose slot has a full head get
        ``x @ W[slot]^T + bias[slot]``; the others keep y (vLLM's own selection)."""
        W = _view3(weight_stacked, "weight_stacked")
        x2 = x.reshape(-1, x.shape[-1])
        if self._skip("smp"):
            return y
        xs = x2 if x2.dtype == W.dtype else x2.to(W.dtype)
        h = lora_shrink(xs, W, self._meta("smp", x2.shape[0], W.shape[0]), backend=self.backend)[0]
        y.copy_(self._select_full_linear_output(y, h, bias_stacked, module_enabled))
        return y

    # MoE LoRA: not served (vLLM's own CPU wrapper does not serve it either).

    def moe_lora_align_block_size(self, *args, **kwargs):
        _not_moe("moe_lora_align_block_size")

    def add_lora_fused_moe(self, *args, **kwargs):
        _not_moe("add_lora_fused_moe")

    def add_lora_w13(self, *args, **kwargs):
        _not_moe("add_lora_w13")

    def add_lora_w2(self, *args, **kwargs):
        _not_moe("add_lora_w2")


__all__ = ["PunicaWrapperOpenLoRA", "enable", "disable", "is_enabled", "check_vllm_version",
           "installed_vllm_version", "host_batch_meta", "VLLMVersionError", "SUPPORTED_VLLM_SERIES",
           "PUNICA_WRAPPER_QUALNAME", "BACKEND_ENV", "VLLM_ENABLE_ENV"]
