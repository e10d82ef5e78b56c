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
* Host: every registered adapter keeps its weights (already in the slots' storage dtype: the
  layers' dtype, or ``adapter_dtype`` (e.g. bfloat16 for a float32 model), lora_B
  transposed, pinned when the layers live on a GPU) until the host budget is exceeded; then the
  least recently used ones are dropped and re-read from their source when next needed.
* A batch takes a :class:`Lease` (:meth:`AdapterPool.lease`): every named adapter is made
  resident and HELD (a reference count) until ``lease.release()``. A patched model's forward holds
  its adapters from the moment its names become slot ids until its last layer has run. A slot is
  filled from a free one, else from the least-recently-used adapter that nothing holds: not leased,
  not pinned (:meth:`pin`), not acquired by a serving stack (:meth:`acquire`, counted, until
  :meth:`release`).
* Concurrency: a thread may load, pin, unpin, unload, acquire and release while others serve.
  The rule is two locks and one invariant:
    - the STATE lock guards the registry, the slot owners, the reference counts and the LRU clock.
      It is held for bookkeeping only, never during I/O, conversions or copies; leasing adapters
      that are already resident takes nothing else.
    - the WRITE lock serialises writing slots (copies, ranks, rebinding the layers' ops). Only
      loads and unloads take it; a forward whose adapters are resident never waits for it.
    - invariant: layer buffers are only ever written in slots that no lease holds, so a forward
      never sees a slot change under it; it may see a layer's op rebound between two layers,
      which changes nothing for the slots it holds.
  Reading an adapter (its source, the dtype conversion, pinning host memory) happens under no pool
  lock at all (a per-adapter lock keeps two threads from reading the same adapter twice), so a
  slow source never stalls serving the others. Unloading a held adapter retires it: the name is
  gone at once (it can be loaded again), its slot is freed when the last lease holding it ends.
* Prefetch (:meth:`AdapterPool.prefetch`): worker threads read adapters (new ones, or registered
  ones whose host copy was dropped) and copy them into slots while other threads serve. A new
  name is PENDING from the call until its read ends: it counts as known, a batch that names it
  waits for that read alone, and loading the same name again is refused. A failed prefetch
  changes nothing; its error is raised once, at the next use of the name (a batch, pin). A
  prefetch that finds no slot it may take (all held) leaves the adapter in host memory.
* GPU ordering: slot copies are non_blocking from pinned memory on a side stream, which first
  waits for the loading thread's compute stream and for the events recorded when the last leases
  that read the target slot ended (another thread's queued kernels may still read it). After the
  copies a "ready" event is recorded for the slot; a lease makes its thread's current stream wait
  for the ready events of its slots, so a forward on any stream reads a slot only after its copy.
  No host synchronisation anywhere.
* Writing a slot marks it empty (rank 0) in every layer its previous adapter had weights in
  and only publishes the new ranks once all copies are issued: a failure leaves an empty slot,
  never half an adapter. Ranks beyond an adapter's rank are zeroed in its slot (the kernels
  ignore them anyway).

This module knows nothing about models: the patching code gives it the layers and a ``bind``
function that checks an adapter against the model and returns per-layer host weights.
"""
from __future__ import annotations

import concurrent.futures
import functools
import itertools
import math
import mmap
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch

from .adapters import AdapterSource, AdapterWeights, ModuleLoRA, load_adapter_weights
from .ops.api import FP8, BoundEmbeddingLoRA, BoundLoRA
from .ops.backends import resolve_backend


@dataclass(frozen=True)
class HostLoRA(ModuleLoRA):
    """One layer's part of an adapter in host memory, ready for contiguous slot copies: ``a``
    [r, K] as in PEFT, but ``b`` holds lora_B TRANSPOSED, [r, N] (also available as ``bt``); for
    an experts layer one of each per expert, [E, r, K] and [E, r, N]. ``dora_scale``: DoRA's
    column scale g [N] (float32) when the adapter is DoRA here; then ``b`` already holds
    diag(g) lora_B (transposed), so only the base output still needs the scale. ``a_scale`` /
    ``b_scale``: with fp8 (float8_e4m3fn) storage, the float32 scale of each rank row of ``a``
    and of ``b`` (lora_B's columns), [r] (or [E, r]): ops/fp8.py."""

    dora_scale: Optional[torch.Tensor] = None
    a_scale: Optional[torch.Tensor] = None
    b_scale: Optional[torch.Tensor] = None

    @property
    def bt(self) -> torch.Tensor:
        return self.b

    @property
    def nbytes(self) -> int:
        n = self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()
        for t in (self.dora_scale, self.a_scale, self.b_scale):
            if t is not None:
                n += t.numel() * t.element_size()
        return n


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


def packed_layout(dims: Sequence[Tuple[int, int, int]], itemsize, device_budget_bytes: int, max_rank: int,
                  max_adapters: int, row_extra=0) -> Tuple[int, int]:
    """(rows per expert-unit C, slot ids) of a packed pool over layers ``dims`` [(K, N, E)]: every
    layer gets C rows (C * E for an experts layer), so that all of them together take at most
    ``device_budget_bytes``; an adapter of rank r in every layer then takes r / C of the budget.
    Slot ids: one per resident adapter, at least max_adapters, room for C / 8 adapters (rank 8
    in every layer), at most 4096 (the batch metadata and the CPU kernel's loop are per slot id).
    ``itemsize``: the slots' storage bytes per element, one int for every layer or one per layer;
    ``row_extra``: bytes per row beside the weights (fp8 storage: its two float32 scales), the
    same way."""
    n = len(dims)
    sizes = list(itemsize) if isinstance(itemsize, (list, tuple)) else [itemsize] * n
    extras = list(row_extra) if isinstance(row_extra, (list, tuple)) else [row_extra] * n
    per_row = sum(((K + N) * sz + ex) * max(E, 1) for (K, N, E), sz, ex in zip(dims, sizes, extras))
    if isinstance(device_budget_bytes, bool) or not isinstance(device_budget_bytes, int) or device_budget_bytes < 1:
        raise ValueError(f"device_budget_bytes: expected None or a positive int, got {device_budget_bytes!r}")
    C = device_budget_bytes // per_row if per_row else 0
    if C < 1:
        raise ValueError(f"device_budget_bytes: {device_budget_bytes} bytes hold no rank row of the patched layers "
                         f"({per_row} bytes per rank over all of them)")
    return C, max(max_adapters, min(4096, C // 8))


class LayerSlots:
    """The device slots of one patched layer and its add_lora call (``op``) over them.

    ``kind``: "linear" (nn.Linear / Conv1D, and a 2-D parameter used as a linear weight),
    "embedding" (nn.Embedding: K = num_embeddings, ``op(y, ids, meta)``) or "experts" (a 3-D
    [E, ...] expert weight: ``experts`` = E virtual slots per adapter slot, virtual slot
    ``slot * E + e`` holding expert e's LoRA, so one add_lora call over (token, expert) pairs
    serves every adapter and expert of a batch). ``dora``: None, or (g - 1 [S, N] float32,
    which slots are DoRA [S] bool, the same as a frozenset) once a DoRA adapter is in a slot.
    """

    def __init__(self, name: str, in_features: int, out_features: int, num_slots: int, max_rank: int,
                 device: torch.device, dtype: torch.dtype, backend: str = "auto",
                 arena: Optional[HostSlotArena] = None, kind: str = "linear", experts: int = 0,
                 packed_rows: Optional[int] = None, storage_dtype: Optional[torch.dtype] = None):
        self.name, self.in_features, self.out_features = name, in_features, out_features
        self.arena = arena if torch.device(device).type == "cpu" else None   # CPU slots only
        self.num_slots, self.max_rank, self.device, self.dtype = num_slots, max_rank, device, dtype
        # dtype: the layer's activations; storage_dtype: the slots' weights (adapter_dtype; the
        # kernels upcast them on load, ops/api.py STORAGE_DTYPES)
        self.storage_dtype = storage_dtype if storage_dtype is not None else dtype
        self.backend, self.kind, self.experts = backend, kind, experts
        V = num_slots * max(experts, 1)             # (virtual) slots of the buffers
        self.num_virtual = V
        self.a: Optional[torch.Tensor] = None       # [V, R, K]
        self.bt: Optional[torch.Tensor] = None      # [V, R, N]
        # fp8 storage (ops/fp8.py): float32 scale of each rank row of a and of bt, [V, R] (packed: [rows])
        self.fp8 = self.storage_dtype is FP8
        self.a_scale: Optional[torch.Tensor] = None
        self.b_scale: Optional[torch.Tensor] = None
        self.ranks_host = [0] * V
        self.scal_host = [0.0] * V
        self.ranks = torch.zeros(V, dtype=torch.int32, device=device)
        self.scalings = torch.zeros(V, dtype=torch.float32, device=device)
        # add_lora bound to this layer's slots: op(y, x, meta); None while no slot has weights here.
        self.op: Optional[BoundLoRA] = None
        self._dora_m1: Optional[torch.Tensor] = None       # [S, N] g - 1 per slot (allocated on first use)
        self._dora_host: Set[int] = set()
        self.dora: Optional[Tuple[torch.Tensor, torch.Tensor, frozenset]] = None
        self.active: frozenset = frozenset()        # adapter slots with weights here
        self.active_mask = torch.zeros(num_slots, dtype=torch.bool, device=device)   # the same, [S] on the device
        # called with publish()'s keep_alive list after each publish (a projection group rebinding
        # its launch over this layer's slots: hf_groups.py); under the pool's write lock
        self.listeners: List[Callable[[List[torch.Tensor]], None]] = []
        # Packed mode (``packed_rows``: the rows of this layer's one buffer): ``a`` [rows, K], ``bt``
        # [rows, N]; an adapter slot holds the rows [off, off + E * rank) (its experts one after
        # another), virtual slot v's offset in ``offsets`` [V] (int32). ``extents``: {slot: (off,
        # rows)}, the allocator's view (guarded by the pool's state lock; the rows' contents by
        # its write lock).
        self.packed = packed_rows is not None
        self.capacity = int(packed_rows) if self.packed else 0
        self.offsets_host = [0] * V
        self.offsets = torch.zeros(V, dtype=torch.int32, device=device)
        self.extents: Dict[int, Tuple[int, int]] = {}

    # ------------------------------------------------------------------ packed row allocator

    def row_bytes(self) -> int:
        """Bytes of one packed row (one rank of A and of B, and their fp8 scales)."""
        return (self.in_features + self.out_features) * self.storage_dtype.itemsize + (8 if self.fp8 else 0)

    def rows_for(self, w: HostLoRA) -> int:
        return max(self.experts, 1) * w.rank

    @property
    def free_rows(self) -> int:
        return self.capacity - sum(n for _, n in self.extents.values())

    def find(self, n: int) -> Optional[int]:
        """First row of the lowest free run of ``n`` rows, or None."""
        cur = 0
        for off, m in sorted(self.extents.values()):
            if off - cur >= n:
                return cur
            cur = max(cur, off + m)
        return cur if self.capacity - cur >= n else None

    def compaction_moves(self, movable: Callable[[int], bool]) -> List[Tuple[int, int, int, int]]:
        """(slot, old offset, new offset, rows) that slide the movable slots' runs down over the
        free rows (in ascending order: each move's target lies below its source and above the
        previous moves' targets); runs of unmovable slots stay where they are. Updates extents."""
        moves, cur = [], 0
        for slot, (off, n) in sorted(self.extents.items(), key=lambda kv: kv[1][0]):
            if movable(slot) and off > cur:
                moves.append((slot, off, cur, n))
                self.extents[slot] = (cur, n)
                off = cur
            cur = off + n
        return moves

    def move(self, slot: int, old: int, new: int, n: int) -> None:
        """(write lock held; nothing reads ``slot``) Copy its rows from ``old`` to ``new`` and
        repoint its virtual slots. Call publish() afterwards."""
        if n and self.a is not None:
            self.a[new:new + n].copy_(self.a[old:old + n].clone())
            self.bt[new:new + n].copy_(self.bt[old:old + n].clone())
            if self.fp8:
                self.a_scale[new:new + n].copy_(self.a_scale[old:old + n].clone())
                self.b_scale[new:new + n].copy_(self.b_scale[old:old + n].clone())
        E = max(self.experts, 1)
        for v in range(slot * E, (slot + 1) * E):
            self.offsets_host[v] += new - old

    @property
    def nbytes(self) -> int:
        if self.a is None:
            return 0
        n = (self.a.numel() + self.bt.numel()) * self.a.element_size()
        for t in (self._dora_m1, self.a_scale, self.b_scale):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    def _allocate(self) -> None:
        if self.a is None and self.fp8:
            shape = (self.capacity,) if self.packed else (self.num_virtual, self.max_rank)
            self.a_scale = torch.zeros(shape, dtype=torch.float32, device=self.device)
            self.b_scale = torch.zeros(shape, dtype=torch.float32, device=self.device)
        if self.a is None and self.packed:
            C = self.capacity
            if self.arena is not None:
                self.a = self.arena.zeros((C, self.in_features), self.storage_dtype)
                self.bt = self.arena.zeros((C, self.out_features), self.storage_dtype)
                return
            self.a = torch.zeros((C, self.in_features), dtype=self.storage_dtype, device=self.device)
            self.bt = torch.zeros((C, self.out_features), dtype=self.storage_dtype, device=self.device)
            return
        if self.a is None:
            S, R = self.num_virtual, self.max_rank
            if self.arena is not None:
                self.a = self.arena.zeros((S, R, self.in_features), self.storage_dtype)
                self.bt = self.arena.zeros((S, R, self.out_features), self.storage_dtype)
                return
            self.a = torch.zeros((S, R, self.in_features), dtype=self.storage_dtype, device=self.device)
            self.bt = torch.zeros((S, R, self.out_features), dtype=self.storage_dtype, device=self.device)

    def write(self, slot: int, w: Optional[HostLoRA], off: Optional[int] = None) -> None:
        """Copy ``w`` into ``slot`` (None: mark the slot empty here). Call publish() afterwards.
        Packed mode: into rows [off, off + rows_for(w)) (reserved in ``extents`` by the pool)."""
        E = max(self.experts, 1)
        self._dora_host.discard(slot)
        if w is None:
            for v in range(slot * E, (slot + 1) * E):
                self.ranks_host[v], self.scal_host[v] = 0, 0.0
            return
        self._allocate()
        r = w.rank
        a, bt = (w.a, w.bt) if self.experts else (w.a[None], w.bt[None])
        v0 = slot * E
        if self.packed:
            n = E * r
            if off is None or off < 0 or off + n > self.capacity:
                raise ValueError(f"{self.name}: rows {off}..{(off or 0) + n} are outside the packed buffer's "
                                 f"{self.capacity} rows")
            self.a[off:off + n].copy_(a.reshape(n, self.in_features), non_blocking=True)
            self.bt[off:off + n].copy_(bt.reshape(n, self.out_features), non_blocking=True)
            if self.fp8:
                self.a_scale[off:off + n].copy_(w.a_scale.reshape(n), non_blocking=True)
                self.b_scale[off:off + n].copy_(w.b_scale.reshape(n), non_blocking=True)
            for e in range(E):
                self.offsets_host[v0 + e] = off + e * r
        else:
            self.a[v0:v0 + E, :r].copy_(a, non_blocking=True)
            self.a[v0:v0 + E, r:].zero_()
            self.bt[v0:v0 + E, :r].copy_(bt, non_blocking=True)
            self.bt[v0:v0 + E, r:].zero_()
            if self.fp8:
                self.a_scale[v0:v0 + E, :r].copy_(w.a_scale.reshape(E, r), non_blocking=True)
                self.a_scale[v0:v0 + E, r:].zero_()
                self.b_scale[v0:v0 + E, :r].copy_(w.b_scale.reshape(E, r), non_blocking=True)
                self.b_scale[v0:v0 + E, r:].zero_()
        for v in range(v0, v0 + E):
            self.ranks_host[v], self.scal_host[v] = r, float(w.scaling)
        if w.dora_scale is not None:
            if self._dora_m1 is None:
                self._dora_m1 = torch.zeros((self.num_slots, self.out_features), dtype=torch.float32,
                                            device=self.device)
            self._dora_m1[slot].copy_(w.dora_scale, non_blocking=True)
            self._dora_m1[slot].sub_(1.0)
            self._dora_host.add(slot)

    def publish(self, keep_alive: List[torch.Tensor]) -> None:
        """Send the host ranks/scalings to the device and rebind the add_lora call."""
        ranks = torch.tensor(self.ranks_host, dtype=torch.int32)
        scal = torch.tensor(self.scal_host, dtype=torch.float32)
        offs = torch.tensor(self.offsets_host, dtype=torch.int32) if self.packed else None
        if self.device.type == "cpu":
            self.ranks, self.scalings = ranks, scal
            if offs is not None:
                self.offsets = offs
        else:
            ranks, scal = ranks.pin_memory(), scal.pin_memory()
            self.ranks.copy_(ranks, non_blocking=True)
            self.scalings.copy_(scal, non_blocking=True)
            keep_alive += [ranks, scal]
            if offs is not None:
                offs = offs.pin_memory()
                self.offsets.copy_(offs, non_blocking=True)
                keep_alive.append(offs)
        if self._dora_host:
            has = torch.zeros(self.num_slots, dtype=torch.bool)
            has[sorted(self._dora_host)] = True
            if self.device.type != "cpu":
                has = has.pin_memory()
                keep_alive.append(has)
                has = has.to(self.device, non_blocking=True)
            self.dora = (self._dora_m1, has, frozenset(self._dora_host))
        else:
            self.dora = None
        E = max(self.experts, 1)
        self.active = frozenset(v // E for v, r in enumerate(self.ranks_host) if r)
        mask = torch.zeros(self.num_slots, dtype=torch.bool)
        if self.active:
            mask[sorted(self.active)] = True
        if self.device.type != "cpu":
            mask = mask.pin_memory()
            keep_alive.append(mask)
            mask = mask.to(self.device, non_blocking=True)
        self.active_mask = mask
        bound = BoundEmbeddingLoRA if self.kind == "embedding" else BoundLoRA
        if self.storage_dtype is not self.dtype:       # the activations' dtype, for the checks
            bound = functools.partial(bound, dtype=self.dtype)
        r_eff = max(self.ranks_host)
        if self.fp8 and r_eff:      # the scales of each rank row, addressed like the weights' rows
            sa, sb = self.a_scale, self.b_scale
            if not self.packed and resolve_backend(self.backend, self.device) == "torch":
                sa, sb = sa[:, :r_eff], sb[:, :r_eff]
            bound = functools.partial(bound, a_scales=sa, b_scales=sb)
        if r_eff == 0:
            self.op = None
        elif self.packed:
            # One buffer, a row offset per (virtual) slot: ops/packed.py.
            self.op = bound(self.a, self.bt.transpose(0, 1), self.scalings, self.ranks, offsets=self.offsets,
                            max_rank=self.max_rank, backend=self.backend)
        elif resolve_backend(self.backend, self.device) == "torch":
            # The PyTorch backend's work grows with R: pass only the ranks in use (views, no
            # copies); ranks=None when every slot has exactly that rank here.
            uniform = all(r == r_eff for r in self.ranks_host)
            self.op = bound(self.a[:, :r_eff], self.bt[:, :r_eff].transpose(1, 2), self.scalings,
                            None if uniform else self.ranks, backend=self.backend)
        else:
            # The kernels (cpu, triton, cuda): fixed shapes (CUDA-graph friendly); they skip the
            # rank padding given the ranks.
            self.op = bound(self.a, self.bt.transpose(1, 2), self.scalings, self.ranks, backend=self.backend)
        for listener in self.listeners:
            listener(keep_alive)


@dataclass(frozen=True)
class AdapterMemory:
    name: str
    nbytes: int                # size of its weights (its own ranks) in the storage dtype
    in_host_memory: bool       # False: dropped past the host budget, re-read on next use
    slot: Optional[int]        # device slot, None when not resident
    pinned: bool
    leases: int = 0            # batches being served that hold it (forwards, set_batch)
    acquired: int = 0          # acquire() calls not yet released
    rank: int = 0              # its largest rank over the layers it targets
    dtype: Optional[torch.dtype] = None   # storage dtype of its weights (host and slots)
    device_bytes: int = 0      # what it occupies on the device in the layers it targets: its own
                               # ranks' rows in a packed pool, its slot (rank padded to max_rank)
                               # in a padded one; 0 when not resident

    @property
    def host_bytes(self) -> int:
        return self.nbytes if self.in_host_memory else 0


@dataclass(frozen=True)
class MemoryReport:
    adapters: Tuple[AdapterMemory, ...]
    device_bytes: int          # slot buffers allocated on the device(s), all layers
    host_bytes: int            # adapter weights held in host memory
    host_budget_bytes: Optional[int]
    max_adapters: int
    max_rank: int
    device_budget_bytes: Optional[int] = None   # a packed pool's budget (None: a padded pool)
    num_slots: int = 0                          # slot ids (a packed pool has more than max_adapters)

    @property
    def device_bytes_used(self) -> int:
        """Bytes the resident adapters' own weights take in the slots (the rest is rank padding
        and empty slots)."""
        return sum(a.nbytes for a in self.adapters if a.slot is not None)

    def __str__(self) -> str:
        mb = 1 / 2 ** 20
        budget = "unlimited" if self.host_budget_bytes is None else f"{self.host_budget_bytes * mb:.2f} MiB"
        used = sum(a.slot is not None for a in self.adapters)
        if self.device_budget_bytes is not None:
            resident = sum(a.device_bytes for a in self.adapters)
            head = (f"device (packed): {used} adapters resident in {resident * mb:.2f} MiB of a "
                    f"{self.device_budget_bytes * mb:.2f} MiB budget ({self.device_bytes * mb:.2f} MiB allocated), "
                    f"{self.num_slots} slot ids, at most {self.max_adapters} adapters per batch, max rank {self.max_rank}")
        else:
            head = (f"device slots: {used}/{self.max_adapters} in use, max rank {self.max_rank}, "
                    f"{self.device_bytes * mb:.2f} MiB allocated, of which the resident adapters' weights "
                    f"{self.device_bytes_used * mb:.2f} MiB")
        lines = [head,
                 f"host: {self.host_bytes * mb:.2f} MiB of adapter weights (budget {budget})",
                 f"{'adapter':<24} {'rank':>4} {'dtype':>8} {'MiB':>9} {'dev MiB':>9} {'host MiB':>9} {'slot':>5} "
                 f"{'pinned':>6} {'held':>5}"]
        for a in self.adapters:
            dt = str(a.dtype).replace("torch.", "") if a.dtype is not None else "-"
            lines.append(f"{a.name:<24} {a.rank:>4} {dt:>8} {a.nbytes * mb:>9.3f} {a.device_bytes * mb:>9.3f} "
                         f"{a.host_bytes * mb:>9.3f} {'-' if a.slot is None else a.slot:>5} "
                         f"{'yes' if a.pinned else 'no':>6} {a.leases + a.acquired:>5}")
        return "\n".join(lines)


class _Entry:
    """A registered adapter. Every field but ``host`` (set under ``read_lock`` too) is guarded by
    the pool's state lock."""

    def __init__(self, name: str, source: AdapterSource, host: Bound, config: Dict[str, Any]):
        self.name, self.source, self.host, self.config = name, source, host, config
        self.nbytes = sum(w.nbytes for w in host.values())
        self.fingerprint = {layer: (w.rank, w.scaling) for layer, w in host.items()}
        self.dtype = next((w.a.dtype for w in host.values()), None)
        self.slot: Optional[int] = None
        self.pinned = False
        self.leases = 0           # Lease objects holding it
        self.acquired = 0         # acquire() calls not yet released
        self.retired = False      # unloaded; a held one keeps its slot until its last lease ends
        self.last_used = 0
        self.read_lock = threading.Lock()   # one re-read of the source at a time

    def evictable(self) -> bool:
        return not (self.leases or self.acquired or self.pinned)


class Lease:
    """Adapters held in their device slots until :meth:`release` (idempotent; also a context
    manager). ``slots``: {name: slot}. What a batch being served holds: while it lives, its adapters
    are neither evicted nor overwritten, and unloading them only retires them."""

    __slots__ = ("slots", "_pool", "_entries")

    def __init__(self, pool: "AdapterPool", entries: List[_Entry], slots: Dict[str, int]):
        self._pool, self._entries, self.slots = pool, entries, slots

    def release(self) -> None:
        entries, self._entries = self._entries, None
        if entries:
            self._pool._end_lease(entries)

    @property
    def released(self) -> bool:
        return self._entries is None

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class NoFreeSlotError(RuntimeError):
    """Every device slot holds an adapter that is pinned, acquired or in a batch being served."""


class Prefetch:
    """What :meth:`AdapterPool.prefetch` started: ``done()``, ``wait(timeout)``. It never raises
    the jobs' errors: a failed prefetch is reported at the next use of its name."""

    __slots__ = ("names", "_futures")

    def __init__(self, names: Tuple[str, ...], futures: List["concurrent.futures.Future"]):
        self.names, self._futures = names, futures

    def done(self) -> bool:
        return all(f.done() for f in self._futures)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until every job ended (or ``timeout`` seconds passed); True if all ended."""
        _, pending = concurrent.futures.wait(self._futures, timeout=timeout)
        return not pending

    def __repr__(self) -> str:
        return f"Prefetch({list(self.names)}, {'done' if self.done() else 'in flight'})"


class AdapterPool:
    """Registered adapters, host cache with a byte budget, LRU device slots, leases (module doc)."""

    PREFETCH_WORKERS = 2       # threads reading and copying prefetched adapters (I/O bound)

    def __init__(self, layers: Dict[str, LayerSlots], max_adapters: int, max_rank: int, bind: Binder,
                 host_budget_bytes: Optional[int] = None, read: Optional[Callable[[AdapterSource], AdapterWeights]] = None,
                 device_budget_bytes: Optional[int] = None):
        self.layers, self.max_adapters, self.max_rank = layers, max_adapters, max_rank
        self.host_budget_bytes = host_budget_bytes
        self.device_budget_bytes = device_budget_bytes
        self._bind = bind
        self._load = read or load_adapter_weights
        self._entries: Dict[str, _Entry] = {}
        # Packed pool (layers built with packed_rows, see packed_layout): slot ids number
        # num_slots >= max_adapters (an id per resident adapter; max_adapters bounds a batch).
        self.packed = any(getattr(ls, "packed", False) for ls in layers.values())
        if self.packed and not all(getattr(ls, "packed", False) for ls in layers.values()):
            raise ValueError("layers: either every layer is packed or none is")
        S = next(iter(layers.values())).num_slots if (self.packed and layers) else max_adapters
        self.num_slots = S
        self._freed_readers: List["torch.cuda.Event"] = []   # GPU: last readers of rows freed since the last write
        self._owner: List[Optional[_Entry]] = [None] * S         # a slot's adapter (set before its copies end)
        self._slot_layers: List[Set[str]] = [set() for _ in range(S)]   # layers where a slot has weights
        self._clock = itertools.count(1)
        self._lock = threading.Lock()          # the state lock (module doc)
        self._write_lock = threading.Lock()    # the write lock; taken before the state lock, never after
        self._cuda = self._cuda_devices()
        self._streams: Dict[torch.device, "torch.cuda.Stream"] = {}
        self._in_flight: List[Tuple["torch.cuda.Event", List[torch.Tensor]]] = []
        # GPU only, per slot: the last event of each stream whose leases read the slot, and the
        # event after the slot's last copy, per device.
        self._readers: List[Dict[Any, "torch.cuda.Event"]] = [{} for _ in range(S)]
        self._ready: List[Dict[torch.device, "torch.cuda.Event"]] = [{} for _ in range(S)]
        # prefetch: new names being read (set when the read ends), errors not yet reported
        self._pending: Dict[str, threading.Event] = {}
        self._failed: Dict[str, BaseException] = {}
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None

    # ----------------------------------------------------------------------------- registry

    @property
    def names(self) -> Tuple[str, ...]:
        with self._lock:
            return tuple(self._entries)

    def __contains__(self, name: str) -> bool:
        """Registered, being prefetched, or with a failed prefetch not yet reported (its next
        use raises that error)."""
        return name in self._entries or name in self._pending or name in self._failed

    def register(self, name: str, source: AdapterSource) -> None:
        """Read, check and keep ``name`` in host memory. On any error nothing changes. The source
        is read under no lock: serving goes on meanwhile."""
        with self._lock:
            self._check_free(name)
        host, config = self._read(source)
        with self._lock:
            self._check_free(name)
            self._add_entry(name, source, host, config)

    def _check_fits(self, name: str, host: Bound) -> None:
        """A packed pool refuses an adapter that needs more rows in a layer than the budget gives it."""
        if not self.packed:
            return
        for layer, w in host.items():
            ls = self.layers[layer]
            n = ls.rows_for(w)
            if n > ls.capacity:
                raise ValueError(f"adapter {name!r}: layer {layer!r} needs {n} rows (rank {w.rank}), but "
                                 f"device_budget_bytes={self.device_budget_bytes} gives each layer room for "
                                 f"{ls.capacity} rows; raise the budget or lower the adapter's rank")

    def _add_entry(self, name: str, source: AdapterSource, host: Bound, config: Dict[str, Any]) -> _Entry:
        """(state lock held)"""
        self._check_fits(name, host)
        entry = _Entry(name, source, host, config)
        entry.last_used = next(self._clock)
        self._entries[name] = entry
        self._failed.pop(name, None)
        self._trim_host(protect={name})
        return entry

    def unregister(self, name: str) -> None:
        """Forget ``name``. Its slot is freed now, or, while batches being served hold it, when the
        last of them ends (they finish with it); the name can be loaded again at once."""
        with self._write_lock:
            with self._lock:
                if name not in self._entries and self._failed.pop(name, None) is not None:
                    return                   # a failed prefetch: forgotten, nothing else to undo
                if name in self._pending:
                    raise ValueError(f"name: adapter {name!r} is being prefetched; wait for the prefetch "
                                     "(Prefetch.wait()) before unloading it")
                entry = self._entry(name)
                if entry.acquired:
                    raise RuntimeError(f"adapter {name!r} is held by the serving stack (acquire, {entry.acquired} "
                                       "not released); release() it first")
                del self._entries[name]
                entry.retired, entry.pinned, entry.host = True, False, None
                if entry.leases or entry.slot is None:
                    return
                slot = self._detach(entry)
            self._write_slot(slot, {})

    def pin(self, name: str) -> int:
        """Load ``name`` into a slot now and keep it there until unpin(); returns the slot."""
        self._await_prefetch([name])
        with self._lock:
            entry = self._entry(name)
            was_pinned = entry.pinned
            if not was_pinned:
                if sum(e.pinned for e in self._entries.values()) >= self.max_adapters:
                    raise ValueError(f"pin: all max_adapters={self.max_adapters} slots are already pinned")
                entry.pinned = True
        try:
            self._make_resident([entry])
        except BaseException:
            if not was_pinned:
                with self._lock:
                    entry.pinned = False
            raise
        with self._lock:
            return entry.slot

    def unpin(self, name: str) -> None:
        with self._lock:
            self._entry(name).pinned = False

    # -------------------------------------------------------------------------------- batches

    def lease(self, names: Sequence[str]) -> Lease:
        """Make every adapter in ``names`` resident and hold it until the lease is released.

        The adapters are held first (so that loading one never evicts another of the same
        batch), then the missing ones are loaded. On any error nothing stays held.
        """
        unique = list(dict.fromkeys(names))
        if len(unique) > self.max_adapters:
            raise ValueError(f"adapter_names: {len(unique)} distinct adapters in one batch, but the pool has "
                             f"max_adapters={self.max_adapters} slots; split the batch or patch with a larger "
                             "max_adapters")
        if self._pending or self._failed:
            self._await_prefetch(unique)
        with self._lock:
            entries = [self._entry(n) for n in unique]
            now = next(self._clock)
            for e in entries:
                e.leases += 1
                e.last_used = now
            missing = [e for e in entries if e.slot is None]
        lease = Lease(self, entries, {})
        try:
            if missing:
                self._make_resident(missing, entries)
            with self._lock:
                lease.slots = {e.name: e.slot for e in entries}
                ready = [self._ready[e.slot] for e in entries] if self._cuda else ()
            for events in ready:                      # this thread's stream reads after the copies
                for dev, ev in events.items():
                    torch.cuda.current_stream(dev).wait_event(ev)
        except BaseException:
            lease.release()
            raise
        return lease

    def acquire(self, names: Sequence[str]) -> Dict[str, int]:
        """Load ``names`` and hold them for a serving stack until :meth:`release` (counted: each
        acquire of a name needs one release); returns {name: slot}."""
        with self.lease(names) as lease:
            with self._lock:
                for e in lease._entries:
                    e.acquired += 1
            return dict(lease.slots)

    def release(self, names: Optional[Iterable[str]] = None) -> None:
        """Undo one :meth:`acquire` of each name (every acquire of every adapter when None)."""
        with self._lock:
            if names is None:
                entries = [e for e in self._entries.values() if e.acquired]
                for e in entries:
                    e.acquired = 0
                return
            entries = [self._entry(n) for n in dict.fromkeys(names)]
            for e in entries:
                e.acquired = max(0, e.acquired - 1)

    # ------------------------------------------------------------------------------- prefetch

    def prefetch(self, items: Dict[str, Optional[AdapterSource]]) -> Prefetch:
        """Bring adapters in the background; returns at once (module doc, "Prefetch").

        ``items``: {name: source} registers a new adapter as :meth:`register` would (its source
        read, checked, kept in host memory); {name: None} is a registered one, whose host copy is
        read again from its source if it was dropped. Either is then copied into a device slot
        (least recently used one that nothing holds). Errors in the arguments raise now; errors of
        the jobs are raised at the next use of the name.
        """
        jobs = []
        with self._lock:
            for name, source in items.items():
                if source is None:
                    if name not in self._entries and name not in self._pending:
                        self._entry(name)                     # KeyError naming the loaded ones
                else:
                    self._check_free(name)
            for name, source in items.items():
                if source is not None:
                    self._pending[name] = threading.Event()
                    self._failed.pop(name, None)
                jobs.append((name, source))
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    self.PREFETCH_WORKERS, thread_name_prefix="openlora-prefetch")
            executor = self._executor
        futures = []
        for name, source in jobs:
            try:
                futures.append(executor.submit(self._prefetch_job, name, source))
            except BaseException as exc:                       # interpreter shutting down
                with self._lock:
                    ev = self._pending.pop(name, None)
                if ev is not None:
                    ev.set()
                raise RuntimeError(f"prefetch: could not start the job for {name!r}: {exc}") from exc
        return Prefetch(tuple(items), futures)

    def _prefetch_job(self, name: str, source: Optional[AdapterSource]) -> None:
        entry = None
        try:
            if source is not None:
                host, config = self._read(source)              # no lock held
                with self._lock:
                    entry = self._add_entry(name, source, host, config)
            else:
                if name in self._pending:                      # a prefetch of the same new name
                    self._await_prefetch([name], report=False)
                with self._lock:
                    entry = self._entries.get(name)
                if entry is None:
                    return                                     # unloaded meanwhile
                self._host(entry)
        except BaseException as exc:
            with self._lock:
                if source is not None or name in self._entries:
                    self._failed[name] = exc
            return
        finally:
            if source is not None:
                with self._lock:
                    ev = self._pending.pop(name, None)
                if ev is not None:
                    ev.set()
        # Into a slot, holding the adapter meanwhile (as a batch would) so that nothing evicts it
        # half-way; a pool whose slots are all held leaves it in host memory (not an error).
        with self._lock:
            if entry.retired or entry.slot is not None:
                return
            entry.leases += 1
            entry.last_used = next(self._clock)
        try:
            self._make_resident([entry])
        except (NoFreeSlotError, KeyError):
            pass                    # no slot free of holders / unloaded meanwhile: next use loads it
        except BaseException as exc:
            with self._lock:
                if not entry.retired:
                    self._failed[name] = exc
        finally:
            self._end_lease([entry])

    def _await_prefetch(self, names: Sequence[str], report: bool = True) -> None:
        """Wait for the pending reads among ``names``; then raise the first unreported prefetch
        error among them (once: the name is forgotten, or stays as it was before the prefetch)."""
        for n in names:
            ev = self._pending.get(n)
            if ev is not None:
                ev.wait()
        if not report:
            return
        with self._lock:
            for n in names:
                exc = self._failed.pop(n, None)
                if exc is not None:
                    raise RuntimeError(f"adapter {n!r}: its prefetch failed ({type(exc).__name__}: {exc}); "
                                       + ("load it again" if n not in self._entries else
                                          "the adapter is unchanged")) from exc

    def close(self) -> None:
        """Stop taking prefetches; jobs already running finish."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)

    def slot_of(self, name: str) -> Optional[int]:
        with self._lock:
            return self._entry(name).slot

    def host_weights(self, name: str) -> Bound:
        """``name``'s host weights per layer (re-read from its source if they were dropped)."""
        with self._lock:
            entry = self._entry(name)
        return self._host(entry)

    def adapter_info(self, name: str) -> Tuple[Dict[str, Any], Dict[str, int]]:
        """(its adapter_config as parsed, {layer: rank})."""
        with self._lock:
            e = self._entry(name)
            return dict(e.config), {layer: r for layer, (r, _) in e.fingerprint.items()}

    # --------------------------------------------------------------------------------- memory

    def memory_report(self) -> MemoryReport:
        def slot_bytes(e: _Entry) -> int:
            if e.slot is None:
                return 0
            if self.packed:
                return sum(ls.extents.get(e.slot, (0, 0))[1] * ls.row_bytes()
                           for name, ls in self.layers.items() if name in e.fingerprint)
            return sum(ls.nbytes // ls.num_slots for name, ls in self.layers.items() if name in e.fingerprint)

        with self._lock:
            adapters = tuple(AdapterMemory(e.name, e.nbytes, e.host is not None, e.slot, e.pinned, e.leases,
                                           e.acquired, max((r for r, _ in e.fingerprint.values()), default=0),
                                           e.dtype, slot_bytes(e)) for e in self._entries.values())
            return MemoryReport(adapters, sum(ls.nbytes for ls in self.layers.values()),
                                sum(e.nbytes for e in self._entries.values() if e.host is not None),
                                self.host_budget_bytes, self.max_adapters, self.max_rank,
                                self.device_budget_bytes if self.packed else None, self.num_slots)

    # ------------------------------------------------------------------------------- internals

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            known = ", ".join(repr(n) for n in self._entries) or "none"
            raise KeyError(f"adapter {name!r} is not loaded (loaded: {known})") from None

    def _check_free(self, name: str) -> None:
        if name in self._entries:
            raise ValueError(f"name: adapter {name!r} is already loaded; unload_adapter({name!r}) first")
        if name in self._pending:
            raise ValueError(f"name: adapter {name!r} is being prefetched; it is loaded when the prefetch ends")

    def _read(self, source: AdapterSource) -> Tuple[Bound, Dict[str, Any]]:
        weights = self._load(source)
        return self._bind(weights), weights.config

    def _host(self, entry: _Entry) -> Bound:
        """The adapter's host weights, re-read from its source if they were dropped (no pool lock
        held while reading)."""
        host = entry.host
        if host is not None:
            return host
        with entry.read_lock:
            if entry.host is not None:
                return entry.host
            host, _ = self._read(entry.source)
            if {layer: (w.rank, w.scaling) for layer, w in host.items()} != entry.fingerprint:
                raise RuntimeError(f"adapter {entry.name!r}: its source {entry.source!r} changed since it was "
                                   "loaded (other modules, ranks or scalings); unload and load it again")
            with self._lock:
                if not entry.retired:
                    entry.host = host
                    self._trim_host({entry.name})
        return host

    def _trim_host(self, protect: set) -> None:
        """(state lock held) Drop least-recently-used host copies past the budget."""
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

    def _make_resident(self, entries: Sequence[_Entry], held: Optional[Sequence[_Entry]] = None) -> None:
        """Load each entry into a slot unless it is (or becomes, by another thread) resident.
        The caller holds the entries (lease or pin), so nothing evicts them meanwhile."""
        for e in entries:
            with self._lock:
                if e.slot is not None:
                    continue
            host = self._host(e)                     # may read the source: no lock held
            if self.packed:
                self._make_resident_packed(e, host, entries if held is None else held)
                continue
            with self._write_lock:
                with self._lock:
                    if e.retired:
                        raise KeyError(f"adapter {e.name!r} was unloaded while a batch was being prepared for it")
                    if e.slot is not None:
                        continue                     # another thread loaded it meanwhile
                    slot = self._victim_slot()
                    self._detach(self._owner[slot])
                    self._owner[slot] = e            # reserved; e.slot is set once the copies are issued
                try:
                    self._write_slot(slot, host)
                except BaseException:
                    with self._lock:
                        self._owner[slot] = None
                    raise
                with self._lock:
                    e.slot = slot

    # ------------------------------------------------------------------------ packed pool

    def _make_resident_packed(self, e: _Entry, host: Bound, own: Sequence[_Entry] = ()) -> None:
        """Packed pool: place ``e`` (held by the caller) in a slot id and runs of rows in every
        layer it targets, evicting least-recently-used adapters nothing holds and compacting
        layers (sliding runs of adapters nothing else holds down) until it fits. ``own``: the
        entries the caller holds once each (its batch, not yet served): they may move too."""
        with self._write_lock:
            with self._lock:
                if e.retired:
                    raise KeyError(f"adapter {e.name!r} was unloaded while a batch was being prepared for it")
                if e.slot is not None:
                    return                           # another thread loaded it meanwhile
                slot, offs, moves, movers = self._place_packed(e, host, own)
                self._owner[slot] = e                # reserved; e.slot is set once the copies are issued
                for z in movers:                     # not resident while their rows move: a batch
                    self._owner[z].slot = None       # that names one waits for the write lock
            try:
                self._write_packed(slot, host, offs, moves, movers)
            except BaseException:
                with self._lock:
                    self._owner[slot] = None
                    for ls in self.layers.values():
                        ls.extents.pop(slot, None)
                    for z in movers:                 # their rows may be half moved: not resident
                        owner, self._owner[z] = self._owner[z], None
                        for ls in self.layers.values():
                            ls.extents.pop(z, None)
                raise
            with self._lock:
                e.slot = slot
                for z in movers:
                    self._owner[z].slot = z

    def _place_packed(self, e: _Entry, host: Bound, own: Sequence[_Entry] = ()):
        """(both locks held) (slot id, {layer: first row}, {layer: moves}, slots that move),
        the extents already reserved; evicted adapters are detached."""
        need = {layer: self.layers[layer].rows_for(w) for layer, w in host.items()}
        moves: Dict[str, List[Tuple[int, int, int, int]]] = {}
        mine = {id(o) for o in own}

        def movable(s: int) -> bool:
            # resident, and held by nothing but (once) the caller's own batch, which is not served yet
            o = self._owner[s]
            return (o is not None and o is not e and o.slot == s and not (o.pinned or o.acquired)
                    and o.leases == (1 if id(o) in mine else 0))

        while True:
            slot = next((s for s, o in enumerate(self._owner) if o is None), None)
            if slot is not None:
                offs = {layer: self.layers[layer].find(n) for layer, n in need.items()}
                short = [layer for layer, o in offs.items() if o is None]
                if short and all(self.layers[layer].free_rows >= need[layer] for layer in short):
                    for layer in short:              # fragmented: compact (off the hot path)
                        moves.setdefault(layer, []).extend(self.layers[layer].compaction_moves(movable))
                    offs = {layer: self.layers[layer].find(n) for layer, n in need.items()}
                    short = [layer for layer, o in offs.items() if o is None]
                if not short:
                    for layer, n in need.items():
                        self.layers[layer].extents[slot] = (offs[layer], n)
                    movers = sorted({z for mv in moves.values() for z, *_ in mv
                                     if self._owner[z] is not None and self._owner[z].slot == z})
                    for z in movers:
                        self._freed_readers.extend(self._readers[z].values())
                    return slot, offs, moves, movers
            candidates = [o for o in self._owner if o is not None and o is not e and o.slot is not None
                          and o.evictable()]
            if not candidates:
                raise NoFreeSlotError(
                    f"adapter {e.name!r} does not fit: every resident adapter is pinned, acquired or in a batch "
                    f"being served (device_budget_bytes={self.device_budget_bytes}, {self.num_slots} slot ids)")
            self._detach(min(candidates, key=lambda c: c.last_used))

    def _write_packed(self, slot: int, host: Bound, offs: Dict[str, int],
                      moves: Dict[str, List[Tuple[int, int, int, int]]], movers: Sequence[int]) -> None:
        """(write lock held; nothing reads ``slot`` or the moving slots) Empty the slot's old
        layers and the evicted slots', apply the compaction moves in order, copy ``host`` into its
        rows, publish the touched layers."""
        old = self._slot_layers[slot]
        self._slot_layers[slot] = set()
        touched = old | set(host) | set(moves)
        with self._lock:
            waits, self._readers[slot] = self._readers[slot], {}
            freed, self._freed_readers = self._freed_readers, []
            stale = [(s, self._slot_layers[s]) for s, o in enumerate(self._owner) if o is None and s != slot
                     and self._slot_layers[s]]
        self._begin_copies(waits, freed)
        try:
            for layer in old:
                self.layers[layer].write(slot, None)
            for s, layers in stale:                   # evicted / freed slots: empty everywhere
                for layer in layers:
                    self.layers[layer].write(s, None)
                touched |= layers
                self._slot_layers[s] = set()
            for layer, mv in moves.items():
                for z, src, dst, n in mv:
                    self.layers[layer].move(z, src, dst, n)
            self._write_adapter(slot, host, offs)
        finally:
            keep = self._publish(touched, host)
            self._end_copies(slot, movers)
            self._keep_alive(keep)

    def _victim_slot(self) -> int:
        """(state lock held) A free slot, else the least recently used evictable adapter's."""
        for s, owner in enumerate(self._owner):
            if owner is None:
                return s
        candidates = [e for e in self._owner if e.slot is not None and e.evictable()]
        if not candidates:
            raise NoFreeSlotError(f"no device slot can be freed: all max_adapters={self.max_adapters} slots hold "
                               "adapters that are pinned, acquired or in a batch being served")
        return min(candidates, key=lambda e: e.last_used).slot

    def _detach(self, entry: Optional[_Entry]) -> Optional[int]:
        """(state lock held) Take ``entry``'s slot away from it (its weights stay until the slot
        is written again); returns the slot."""
        if entry is None or entry.slot is None:
            return None
        slot, entry.slot = entry.slot, None
        self._owner[slot] = None
        if self.packed:          # its rows are free (their contents stay until overwritten)
            for ls in self.layers.values():
                ls.extents.pop(slot, None)
            self._freed_readers.extend(self._readers[slot].values())
        return slot

    def _end_lease(self, entries: List[_Entry]) -> None:
        readers = self._reader_events() if self._cuda else None
        with self._lock:
            for e in entries:
                e.leases -= 1
                if e.slot is None:
                    continue
                if readers:
                    self._readers[e.slot].update(readers)
                if e.retired and not e.leases:
                    self._detach(e)       # free; cleared by the next write into it

    def _write_slot(self, slot: int, host: Bound) -> None:
        """(write lock held; no lease holds ``slot``) Empty the slot in every layer it has weights
        in, copy ``host`` into it and publish the touched layers."""
        if self.packed:
            if host:
                raise RuntimeError("packed pool: slots are written by _make_resident_packed")
            self._write_packed(slot, {}, {}, {}, ())
            return
        old = self._slot_layers[slot]
        self._slot_layers[slot] = set()
        touched = old | set(host)
        with self._lock:
            waits, self._readers[slot] = self._readers[slot], {}
        self._begin_copies(waits)
        try:
            for layer in old:
                self.layers[layer].write(slot, None)
            self._write_adapter(slot, host)
        finally:
            keep = self._publish(touched, host)
            self._end_copies(slot)
            self._keep_alive(keep)

    def _write_adapter(self, slot: int, host: Bound, offs: Optional[Dict[str, int]] = None) -> None:
        """(both slot writers) Each layer's weights of one adapter into ``slot`` (packed: at that
        layer's row offset, ``offs``); if any write fails, the slot is emptied in every layer of the
        adapter and the error re-raised: never half an adapter."""
        try:
            for layer, w in host.items():
                if offs is None:
                    self.layers[layer].write(slot, w)
                else:
                    self.layers[layer].write(slot, w, offs[layer])
        except BaseException:
            for layer in host:
                self.layers[layer].write(slot, None)
            raise
        self._slot_layers[slot] = set(host)

    def _publish(self, touched, host: Bound) -> List[torch.Tensor]:
        """(both slot writers, at the end) Publishes the touched layers' new slot views; returns what
        must outlive the copies in flight: the tensors the old views held and every host tensor
        copied from (weights, fp8 scales, DoRA scales: non_blocking copies from pinned memory)."""
        keep: List[torch.Tensor] = []
        for name in touched:
            self.layers[name].publish(keep)
        for w in host.values():
            keep += [t for t in (w.a, w.bt, w.a_scale, w.b_scale, w.dora_scale) if t is not None]
        return keep

    # -------------------------------------------------------------------- GPU stream ordering

    def _cuda_devices(self) -> List[torch.device]:
        return sorted({ls.device for ls in self.layers.values() if ls.device.type == "cuda"}, key=str)

    def _reader_events(self) -> Dict[Any, "torch.cuda.Event"]:
        """An event on each device's current stream, after the kernels a lease's forward queued."""
        out = {}
        for dev in self._cuda:
            stream = torch.cuda.current_stream(dev)
            ev = torch.cuda.Event()
            ev.record(stream)
            out[stream] = ev
        return out

    def _begin_copies(self, waits: Dict[Any, "torch.cuda.Event"], freed: Sequence["torch.cuda.Event"] = ()) -> None:
        """On GPUs: switch to a side stream that first waits for this thread's compute stream and
        for the last readers of the slot on every stream (and, in a packed pool, of the rows freed
        or moved since the last write: ``freed``)."""
        self._stream_ctx = []
        for dev in self._cuda:
            stream = self._streams.get(dev)
            if stream is None:
                stream = self._streams[dev] = torch.cuda.Stream(dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            for reader, ev in waits.items():
                if reader.device == dev:
                    stream.wait_event(ev)
            for ev in freed:
                stream.wait_event(ev)       # (an event of another device is waited on across devices)
            ctx = torch.cuda.stream(stream)
            ctx.__enter__()
            self._stream_ctx.append((dev, stream, ctx))

    def _end_copies(self, slot: int, movers: Sequence[int] = ()) -> None:
        """Record the slot's ready event; order the copies before this thread's next use."""
        ready = {}
        for dev, stream, ctx in reversed(self._stream_ctx):
            ctx.__exit__(None, None, None)
            ev = torch.cuda.Event()
            ev.record(stream)
            ready[dev] = ev
            torch.cuda.current_stream(dev).wait_stream(stream)
        self._stream_ctx = []
        if ready:
            self._ready[slot] = ready
            for z in movers:
                self._ready[z] = ready

    def _keep_alive(self, tensors: List[torch.Tensor]) -> None:
        """Host tensors read by in-flight non_blocking copies must outlive them (write lock held)."""
        self._in_flight = [(ev, ts) for ev, ts in self._in_flight if not ev.query()]
        if tensors and self._cuda:
            ev = torch.cuda.Event()
            ev.record()
            self._in_flight.append((ev, tensors))
