"""The adapter pool: registered adapters in host memory, a fixed set of device slots per layer.

Design
------
* Device: ``max_adapters`` slots per patched layer, each holding one adapter's weights at up to
  ``max_rank``: ``a`` [S, R, K] (lora_A rows) and ``bt`` [S, R, N] (lora_B transposed; the kernels
  get the [S, N, R] view ``bt.transpose(1, 2)``, whose rank-major storage lets the CPU path use
  plain GEMMs without copies). A layer's buffers are allocated once, at full size, the first time
  an adapter targeting it is loaded (layers no adapter targets cost nothing). Per slot and layer a
  rank (0 = this slot's adapter does not target this layer: no delta) and a scaling.
  An adapter occupies the same slot index in every layer, so one per-token slot vector (the batch
  metadata) serves the whole forward.
* Host: every registered adapter keeps its weights (already in the layers' dtype, lora_B
  transposed, pinned when the layers live on a GPU) until the host budget is exceeded; then the
  least recently used ones are dropped and re-read from their source when next needed.
* A batch calls :meth:`AdapterPool.prepare` with its adapter names: each one not resident is copied
  into a free slot, else into the least-recently-used slot whose adapter is neither in this batch,
  nor pinned, nor held by a serving stack (:meth:`prepare` with ``hold=True``). On a GPU the copies
  are non_blocking from pinned memory on a side stream, which first waits for the compute stream
  (queued kernels may still read the slot) and which the compute stream then waits for (the copy is
  ordered before the first use).
* Writing a slot first marks it empty in every layer (rank 0) and only publishes the new ranks once
  all copies are issued: a failure leaves an empty slot, never half an adapter. Ranks beyond an
  adapter's rank are zeroed in its slot (the kernels ignore them anyway).

This module knows nothing about models: the patching code gives it the layers and a ``bind``
function that checks an adapter against the model and returns per-layer host weights.
"""
from __future__ import annotations

import itertools
import math
import mmap
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .adapters import AdapterSource, AdapterWeights, ModuleLoRA, load_adapter_weights
from .ops.api import BoundLoRA
from .ops.backends import resolve_backend


@dataclass(frozen=True)
class HostLoRA(ModuleLoRA):
    """One layer's part of an adapter in host memory, ready for contiguous slot copies: ``a``
    [r, K] as in PEFT, but ``b`` holds lora_B TRANSPOSED, [r, N] (also available as ``bt``)."""

    @property
    def bt(self) -> torch.Tensor:
        return self.b


Bound = Dict[str, HostLoRA]          # layer name -> weights
Binder = Callable[[AdapterWeights], Bound]


class HostSlotArena:
    """Zeroed CPU slot buffers carved out of 2 MiB-aligned anonymous mappings advised for
    transparent huge pages (Linux ``madvise(MADV_HUGEPAGE)``; elsewhere plain ``torch.zeros``).

    A decode step streams every active adapter's slots from memory; with 4 KiB pages each 4 KiB
    of weights is another TLB miss (a two-level page walk inside a VM), with 2 MiB pages one per
    2 MiB. The buffers of all layers of one model are packed one after another in allocation
    order (64-byte aligned), so a forward reads the arena front to back. Mappings are never
    unmapped while a tensor views them (torch.frombuffer keeps the mapping alive); pages are
    committed only when written.
    """

    ALIGN = 2 << 20          # huge page size on x86-64 / arm64 (4 KiB base pages)
    CHUNK = 8 << 20          # smallest mapping; a bigger request gets its own

    def __init__(self) -> None:
        self._chunk: Optional[torch.Tensor] = None   # uint8 view of the current mapping
        self._used = 0

    @staticmethod
    def supported() -> bool:
        return hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS")

    def zeros(self, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if not self.supported() or nbytes == 0:
            return torch.zeros(shape, dtype=dtype)
        if self._chunk is None or self._used + nbytes > self._chunk.numel():
            self._new_chunk(nbytes)
        t = self._chunk[self._used:self._used + nbytes].view(dtype).view(shape)
        self._used += -(-nbytes // 64) * 64
        return t                                     # fresh anonymous memory reads as zeros

    def _new_chunk(self, nbytes: int) -> None:
        size = max(self.CHUNK, -(-nbytes // self.ALIGN) * self.ALIGN)
        mm = mmap.mmap(-1, size + self.ALIGN, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        whole = torch.frombuffer(mm, dtype=torch.uint8)          # keeps `mm` alive
        off = (-whole.data_ptr()) % self.ALIGN
        try:
            mm.madvise(mmap.MADV_HUGEPAGE, off, size)
        except OSError:
            pass                                                 # THP disabled: 4 KiB pages
        self._chunk, self._used = whole[off:off + size], 0


class LayerSlots:
    """The device slots of one patched layer and its add_lora call (``op``) over them."""

    def __init__(self, name: str, in_features: int, out_features: int, num_slots: int, max_rank: int,
                 device: torch.device, dtype: torch.dtype, backend: str = "auto",
                 arena: Optional[HostSlotArena] = None):
        self.name, self.in_features, self.out_features = name, in_features, out_features
        self.arena = arena if torch.device(device).type == "cpu" else None   # CPU slots only
        self.num_slots, self.max_rank, self.device, self.dtype = num_slots, max_rank, device, dtype
        self.backend = backend
        self.a: Optional[torch.Tensor] = None       # [S, R, K]
        self.bt: Optional[torch.Tensor] = None      # [S, R, N]
        self.ranks_host = [0] * num_slots
        self.scal_host = [0.0] * num_slots
        self.ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.scalings = torch.zeros(num_slots, dtype=torch.float32, device=device)
        # add_lora bound to this layer's slots: op(y, x, meta); None while no slot has weights here.
        self.op: Optional[BoundLoRA] = None

    @property
    def nbytes(self) -> int:
        if self.a is None:
            return 0
        return (self.a.numel() + self.bt.numel()) * self.a.element_size()

    def _allocate(self) -> None:
        if self.a is None:
            S, R = self.num_slots, self.max_rank
            if self.arena is not None:
                self.a = self.arena.zeros((S, R, self.in_features), self.dtype)
                self.bt = self.arena.zeros((S, R, self.out_features), self.dtype)
                return
            self.a = torch.zeros((S, R, self.in_features), dtype=self.dtype, device=self.device)
            self.bt = torch.zeros((S, R, self.out_features), dtype=self.dtype, device=self.device)

    def write(self, slot: int, w: Optional[HostLoRA]) -> None:
        """Copy ``w`` into ``slot`` (None: mark the slot empty here). Call publish() afterwards."""
        if w is None:
            self.ranks_host[slot], self.scal_host[slot] = 0, 0.0
            return
        self._allocate()
        r = w.rank
        self.a[slot, :r].copy_(w.a, non_blocking=True)
        self.a[slot, r:].zero_()
        self.bt[slot, :r].copy_(w.bt, non_blocking=True)
        self.bt[slot, r:].zero_()
        self.ranks_host[slot], self.scal_host[slot] = r, float(w.scaling)

    def publish(self, keep_alive: List[torch.Tensor]) -> None:
        """Send the host ranks/scalings to the device and rebind the add_lora call."""
        ranks = torch.tensor(self.ranks_host, dtype=torch.int32)
        scal = torch.tensor(self.scal_host, dtype=torch.float32)
        if self.device.type == "cpu":
            self.ranks, self.scalings = ranks, scal
        else:
            ranks, scal = ranks.pin_memory(), scal.pin_memory()
            self.ranks.copy_(ranks, non_blocking=True)
            self.scalings.copy_(scal, non_blocking=True)
            keep_alive += [ranks, scal]
        r_eff = max(self.ranks_host)
        if r_eff == 0:
            self.op = None
        elif resolve_backend(self.backend, self.device) == "torch":
            # The PyTorch backend's work grows with R: pass only the ranks in use (views, no
            # copies); ranks=None when every slot has exactly that rank here.
            uniform = all(r == r_eff for r in self.ranks_host)
            self.op = BoundLoRA(self.a[:, :r_eff], self.bt[:, :r_eff].transpose(1, 2), self.scalings,
                                None if uniform else self.ranks, backend=self.backend)
        else:
            # The kernels (cpu, triton, cuda): fixed shapes (CUDA-graph friendly); they skip the
            # rank padding given the ranks.
            self.op = BoundLoRA(self.a, self.bt.transpose(1, 2), self.scalings, self.ranks, backend=self.backend)


@dataclass(frozen=True)
class AdapterMemory:
    name: str
    nbytes: int                # size of its weights in the layers' dtype
    in_host_memory: bool       # False: dropped past the host budget, re-read on next use
    slot: Optional[int]        # device slot, None when not resident
    pinned: bool


@dataclass(frozen=True)
class MemoryReport:
    adapters: Tuple[AdapterMemory, ...]
    device_bytes: int          # slot buffers allocated on the device(s), all layers
    host_bytes: int            # adapter weights held in host memory
    host_budget_bytes: Optional[int]
    max_adapters: int
    max_rank: int

    def __str__(self) -> str:
        mb = 1 / 2 ** 20
        budget = "unlimited" if self.host_budget_bytes is None else f"{self.host_budget_bytes * mb:.2f} MiB"
        used = sum(a.slot is not None for a in self.adapters)
        lines = [f"device slots: {used}/{self.max_adapters} in use, max rank {self.max_rank}, "
                 f"{self.device_bytes * mb:.2f} MiB allocated",
                 f"host: {self.host_bytes * mb:.2f} MiB of adapter weights (budget {budget})",
                 f"{'adapter':<24} {'MiB':>9} {'host':>5} {'slot':>5} {'pinned':>6}"]
        for a in self.adapters:
            lines.append(f"{a.name:<24} {a.nbytes * mb:>9.3f} {'yes' if a.in_host_memory else 'no':>5} "
                         f"{'-' if a.slot is None else a.slot:>5} {'yes' if a.pinned else 'no':>6}")
        return "\n".join(lines)


class _Entry:
    def __init__(self, name: str, source: AdapterSource, host: Bound):
        self.name, self.source, self.host = name, source, host
        self.nbytes = sum(w.nbytes for w in host.values())
        self.fingerprint = {layer: (w.rank, w.scaling) for layer, w in host.items()}
        self.slot: Optional[int] = None
        self.pinned = False
        self.last_used = 0


class AdapterPool:
    """Registered adapters, host cache with a byte budget, LRU device slots (see module doc)."""

    def __init__(self, layers: Dict[str, LayerSlots], max_adapters: int, max_rank: int, bind: Binder,
                 host_budget_bytes: Optional[int] = None):
        self.layers, self.max_adapters, self.max_rank = layers, max_adapters, max_rank
        self.host_budget_bytes = host_budget_bytes
        self._bind = bind
        self._entries: Dict[str, _Entry] = {}
        self._owner: List[Optional[str]] = [None] * max_adapters
        self._held: set = set()
        self._clock = itertools.count(1)
        self._lock = threading.RLock()
        self._streams: Dict[torch.device, "torch.cuda.Stream"] = {}
        self._in_flight: List[Tuple["torch.cuda.Event", List[torch.Tensor]]] = []

    # ----------------------------------------------------------------------------- registry

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def register(self, name: str, source: AdapterSource) -> None:
        """Read, check and keep ``name`` in host memory. On any error nothing changes."""
        with self._lock:
            if name in self._entries:
                raise ValueError(f"name: adapter {name!r} is already loaded; unload_adapter({name!r}) first")
            host = self._read(source)
            entry = _Entry(name, source, host)
            entry.last_used = next(self._clock)
            self._entries[name] = entry
            self._trim_host(protect={name})

    def unregister(self, name: str) -> None:
        with self._lock:
            entry = self._entry(name)
            if name in self._held:
                raise RuntimeError(f"adapter {name!r} is held by the current batch (acquire); release() it first")
            if entry.slot is not None:
                touched: set = set()
                self._empty_slot(entry.slot, touched)
                self._publish_all(touched)
            del self._entries[name]

    def pin(self, name: str) -> int:
        """Load ``name`` into a slot now and keep it there until unpin(); returns the slot."""
        with self._lock:
            entry = self._entry(name)
            if not entry.pinned:
                pinned = sum(e.pinned for e in self._entries.values())
                if pinned >= self.max_adapters:
                    raise ValueError(f"pin: all max_adapters={self.max_adapters} slots are already pinned")
                slot = self.prepare([name])[name]
                entry.pinned = True
                return slot
            return entry.slot

    def unpin(self, name: str) -> None:
        with self._lock:
            self._entry(name).pinned = False

    # -------------------------------------------------------------------------------- batches

    def prepare(self, names: Sequence[str], *, hold: bool = False) -> Dict[str, int]:
        """Make every adapter in ``names`` resident; returns {name: slot}.

        Adapters of this call are never evicted by it; ``hold=True`` also protects them from
        later calls until :meth:`release` (serving stacks that set slots themselves).
        """
        with self._lock:
            unique = list(dict.fromkeys(names))
            if len(unique) > self.max_adapters:
                raise ValueError(f"adapter_names: {len(unique)} distinct adapters in one batch, but the pool has "
                                 f"max_adapters={self.max_adapters} slots; split the batch or patch with a larger "
                                 "max_adapters")
            entries = [self._entry(n) for n in unique]
            protect = set(unique) | self._held
            missing = [e for e in entries if e.slot is None]
            if missing:
                self._begin_copies()
                touched: set = set()
                try:
                    for e in missing:
                        self._load_into_slot(e, protect, touched)
                finally:
                    self._publish_all(touched)
                    self._end_copies()
            now = next(self._clock)
            for e in entries:
                e.last_used = now
            if hold:
                self._held |= set(unique)
            return {e.name: e.slot for e in entries}

    def release(self, names: Optional[Iterable[str]] = None) -> None:
        with self._lock:
            if names is None:
                self._held.clear()
            else:
                self._held -= set(names)

    def slot_of(self, name: str) -> Optional[int]:
        return self._entry(name).slot

    # --------------------------------------------------------------------------------- memory

    def memory_report(self) -> MemoryReport:
        with self._lock:
            adapters = tuple(AdapterMemory(e.name, e.nbytes, e.host is not None, e.slot, e.pinned)
                             for e in self._entries.values())
            return MemoryReport(adapters, sum(ls.nbytes for ls in self.layers.values()),
                                sum(e.nbytes for e in self._entries.values() if e.host is not None),
                                self.host_budget_bytes, self.max_adapters, self.max_rank)

    # ------------------------------------------------------------------------------- internals

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(repr(n) for n in self._entries) or "none"
            raise KeyError(f"adapter {name!r} is not loaded (loaded: {known})") from None

    def _read(self, source: AdapterSource) -> Bound:
        return self._bind(load_adapter_weights(source))

    def _host(self, entry: _Entry, protect: set) -> Bound:
        """The adapter's host weights, re-read from its source if they were dropped."""
        if entry.host is None:
            host = self._read(entry.source)
            if {layer: (w.rank, w.scaling) for layer, w in host.items()} != entry.fingerprint:
                raise RuntimeError(f"adapter {entry.name!r}: its source {entry.source!r} changed since it was "
                                   "loaded (other modules, ranks or scalings); unload and load it again")
            entry.host = host
            self._trim_host(protect | {entry.name})
        return entry.host

    def _trim_host(self, protect: set) -> None:
        if self.host_budget_bytes is None:
            return
        held = [e for e in self._entries.values() if e.host is not None]
        total = sum(e.nbytes for e in held)
        for e in sorted(held, key=lambda e: e.last_used):
            if total <= self.host_budget_bytes:
                break
            if e.pinned or e.name in protect:
                continue
            e.host = None
            total -= e.nbytes

    def _victim_slot(self, protect: set) -> int:
        for s, owner in enumerate(self._owner):
            if owner is None:
                return s
        candidates = [self._entries[o] for o in self._owner
                      if o not in protect and not self._entries[o].pinned]
        if not candidates:
            raise RuntimeError(f"no device slot can be freed: all max_adapters={self.max_adapters} slots hold "
                               "adapters that are pinned, held or in this batch")
        return min(candidates, key=lambda e: e.last_used).slot

    def _empty_slot(self, slot: int, touched: set) -> None:
        """Mark ``slot`` empty in every layer its adapter had weights in (added to ``touched``)."""
        owner = self._owner[slot]
        if owner is None:
            return
        entry = self._entries[owner]
        self._owner[slot], entry.slot = None, None
        for layer in entry.fingerprint:
            self.layers[layer].write(slot, None)
        touched |= set(entry.fingerprint)

    def _load_into_slot(self, entry: _Entry, protect: set, touched: set) -> None:
        host = self._host(entry, protect)           # may raise: nothing changed yet
        slot = self._victim_slot(protect)
        self._empty_slot(slot, touched)
        touched |= set(host)
        try:
            for layer, w in host.items():
                self.layers[layer].write(slot, w)
        except BaseException:
            for layer in host:
                self.layers[layer].write(slot, None)
            raise
        self._owner[slot], entry.slot = entry.name, slot
        self._keep_alive([t for w in host.values() for t in (w.a, w.bt)])

    def _publish_all(self, layer_names: set) -> None:
        keep: List[torch.Tensor] = []
        for name in layer_names:
            self.layers[name].publish(keep)
        self._keep_alive(keep)

    # -------------------------------------------------------------------- GPU stream ordering

    def _cuda_devices(self) -> List[torch.device]:
        return sorted({ls.device for ls in self.layers.values() if ls.device.type == "cuda"}, key=str)

    def _begin_copies(self) -> None:
        """On GPUs: switch to a side stream that first waits for the compute stream."""
        self._stream_ctx = []
        for dev in self._cuda_devices():
            stream = self._streams.get(dev)
            if stream is None:
                stream = self._streams[dev] = torch.cuda.Stream(dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            ctx = torch.cuda.stream(stream)
            ctx.__enter__()
            self._stream_ctx.append((dev, stream, ctx))

    def _end_copies(self) -> None:
        """Order the copies before the next use on the compute stream; keep sources alive."""
        for dev, stream, ctx in reversed(self._stream_ctx):
            ctx.__exit__(None, None, None)
            torch.cuda.current_stream(dev).wait_stream(stream)
        self._stream_ctx = []

    def _keep_alive(self, tensors: List[torch.Tensor]) -> None:
        """Host tensors read by in-flight non_blocking copies must outlive them."""
        self._in_flight = [(ev, ts) for ev, ts in self._in_flight if not ev.query()]
        if tensors and self._cuda_devices():
            ev = torch.cuda.Event()
            ev.record()
            self._in_flight.append((ev, tensors))
