"""Projection groups: one LoRA launch for sibling modules that read the same input.

Design
------
Hugging Face models keep q_proj / k_proj / v_proj (and gate_proj / up_proj) as separate linears
that read the same tensor. Patched one by one, each makes its own add_lora call; grouped, the
first one called makes ONE multi-slice call (``add_lora`` with n slices, unequal widths,
ranks [n, S]) for all of them and the others only add their slice of its result.

* Found by structure, no table of names. Statically (:func:`candidate_groups`): the patched plain
  linears (nn.Linear / Conv1D modules, not parameter targets, not embeddings, not MoE experts)
  that are children of one parent module, with the same in_features, module class, device and
  dtype. Which of them really read the same tensor, and in which order they run, is observed:
  during the first forward of a patched model (learning, every module its own call) each
  member's hook records whether its input IS the tensor an earlier member of the group saw (the
  same object and version counter); after that forward the members that shared an input form
  the group's plans (Llama: {q, k, v} and {gate, up}; o_proj and down_proj read other tensors
  and stay on their own; T5's cross-attention: {k, v}). Every later call confirms it: a member
  whose input is not the tensor the plan's first member saw in this forward falls back to its
  own call (correct, not grouped) and is dropped from the plan.
* Why the first member computes everything: models consume a projection's output before the
  next one runs (Qwen3's q_norm on q_proj's output, Llama's act_fn(gate) before up_proj), so
  deltas cannot be deferred to the last member. The first member's hook zero-fills a scratch
  [T, sum N_i] in the layer dtype, makes the one launch into it, and adds its own columns to its
  output; each later member adds its columns to its output (no launch). The scratch belongs to
  the call (``_CallState.pending``, a context variable: never shared between concurrent
  forwards), is found by the plan and checked against the member's input (a weak reference and
  the version counter, so a stale entry of a forward that raised never matches) and is dropped
  when the forward ends.
* Scalings. The kernels take one scaling per slot; members of a group usually agree (alpha / r
  of one adapter). Where an adapter's scalings differ between members of a group (rank_pattern /
  alpha_pattern), the launch carries the scaling most of its members have, and each member whose
  scaling differs is left out of the launch for that slot (rank 0 there) and adds that slot's
  delta with its own "residual" call restricted to those slots, made only when the batch holds
  such an adapter. Exact on every backend, no kernel change; a batch with such an adapter makes
  one more launch per differing member (docs/architecture.md).
* Rank 0 (an adapter that targets only some members) is the kernels' usual skip; a member no
  adapter has weights in is not in the launch at all. Different ranks per member: ranks [n, S].
* Not grouped: batches with a trainable adapter (grad on or off: a training step's forward and
  the same batch under no_grad give the same bits) and calls recording autograd for an input or
  output: each member then makes its own call (through SlotDelta when recording), as before.
  DoRA members are grouped (their column scale is applied to their own base output first).
* The bound launch (:class:`GroupBinding`, an immutable snapshot: plans, the BoundLoRA, the
  columns of each member) is rebuilt under the pool's write lock whenever a member's slots are
  published (``LayerSlots.listeners``) and once when the plans are learned; a forward reads one
  snapshot at its first member and keeps it for the group's other members.
"""
from __future__ import annotations

import threading
import weakref
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
from .ops.api import BoundLoRA
from .ops.backends import resolve_backend
from .pool import LayerSlots


def version(t: torch.Tensor) -> int:
    """The tensor's version counter (-1 for an inference tensor, which has none)."""
    try:
        return t._version
    except RuntimeError:
        return -1


class GroupBinding:
    """One immutable state of a group: ``plans`` (None: not learned yet; else tuples of member
    indices in call order), ``pos`` {member: (plan, position)}, per plan the launch ``ops[p]``
    (None when no member of it has weights), its ``cols[p]`` {member: (first, last column)} and
    ``width[p]``; ``disagree`` the slots left out of the launches (scalings differ between
    members), ``residual`` {member: BoundLoRA over those slots}."""

    __slots__ = ("plans", "pos", "ops", "cols", "width", "disagree", "residual")

    def __init__(self, plans=None, ops=(), cols=(), width=(), disagree: FrozenSet[int] = frozenset(),
                 residual: Optional[Dict[int, BoundLoRA]] = None):
        self.plans = plans
        self.pos = {j: (p, i) for p, plan in enumerate(plans or ()) for i, j in enumerate(plan)}
        self.ops, self.cols, self.width = tuple(ops), tuple(cols), tuple(width)
        self.disagree, self.residual = disagree, residual or {}


class ProjectionGroup:
    """Sibling linears of one parent that may read the same input (see the module doc)."""

    def __init__(self, name: str, members: Sequence[LayerSlots]):
        self.name = name
        self.members: List[LayerSlots] = list(members)
        self.backend = self.members[0].backend
        self._lock = threading.Lock()
        self._plans: Optional[Tuple[Tuple[int, ...], ...]] = None
        self._fixed: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}   # GPU: launch -> (ranks, scalings)
        self._fresh = False
        self.bound = GroupBinding()
        for m in self.members:
            m.listeners.append(self._on_publish)

    # ------------------------------------------------------------------------- plans

    def learn(self, classes: Sequence[Sequence[int]]) -> None:
        """Fix the plans from one forward's observation (members sharing an input, in call order);
        the first observation wins."""
        with self._lock:
            if self._plans is not None:
                return
            self._plans = tuple(tuple(c) for c in classes if len(c) >= 2)
            self._rebind([], fresh=True)

    def drop(self, member: int) -> None:
        """Take ``member`` out of its plan (its input was not the plan's in a forward)."""
        with self._lock:
            if self._plans is None:
                return
            plans = []
            for plan in self._plans:
                plan = tuple(j for j in plan if j != member)
                if len(plan) >= 2:
                    plans.append(plan)
            self._plans = tuple(plans)
            self._rebind([], fresh=True)

    def _on_publish(self, keep_alive: List[torch.Tensor]) -> None:
        with self._lock:
            self._rebind(keep_alive)

    # ------------------------------------------------------------------------- binding

    def _rebind(self, keep_alive: List[torch.Tensor], fresh: bool = False) -> None:
        """(lock held) A new GroupBinding from the members' current slots. ``fresh``: called from a
        forward (learn / drop), not from a pool publish: on a GPU its ranks and scalings go to new
        device tensors by a blocking copy (once per plan change), so that no other stream can read
        them before they are there and the pool's side-stream copies into the fixed tensors of
        later publishes are never overtaken."""
        self._fresh = fresh
        plans = self._plans
        if not plans:
            self.bound = GroupBinding(plans)
            return
        S = self.members[0].num_slots
        ops, cols, width = [], [], []
        disagree = set()
        residual: Dict[int, BoundLoRA] = {}
        for plan in plans:
            ms = {j: self.members[j] for j in plan if self.members[j].a is not None and any(self.members[j].ranks_host)}
            live = list(ms)
            if not live:
                ops.append(None), cols.append({}), width.append(0)
                continue
            # per slot the scaling of the launch: the one most members with weights there have (the
            # first of them on a tie); a member whose scaling differs gets rank 0 there, and a residual
            scal = [0.0] * S
            for s in range(S):
                vals = [ms[j].scal_host[s] for j in live if ms[j].ranks_host[s]]
                if vals:
                    scal[s] = max(vals, key=lambda v: (vals.count(v), -vals.index(v)))
            ranks, c, n0 = [], {}, 0
            for j in live:
                m = ms[j]
                ranks.append([r if r and m.scal_host[s] == scal[s] else 0 for s, r in enumerate(m.ranks_host)])
                rr = [r if r and m.scal_host[s] != scal[s] else 0 for s, r in enumerate(m.ranks_host)]
                if any(rr):
                    disagree.update(s for s, r in enumerate(rr) if r)
                    residual[j] = self._bind([j], [rr], list(m.scal_host), max(rr), keep_alive, ("res", j))
                c[j] = (n0, n0 + m.out_features)
                n0 += m.out_features
            r_eff = max(max(r) for r in ranks)
            op = self._bind(live, ranks, scal, r_eff, keep_alive, ("plan",) + tuple(live)) if r_eff else None
            ops.append(op), cols.append(c if op is not None else {}), width.append(n0)
        self.bound = GroupBinding(plans, ops, cols, width, frozenset(disagree), residual)

    def _bind(self, live: List[int], ranks: List[List[int]], scal: List[float], r_eff: int,
              keep_alive: List[torch.Tensor], key) -> BoundLoRA:
        ms = [self.members[j] for j in live]
        dev = ms[0].device
        rk = torch.tensor(ranks, dtype=torch.int32)
        sc = torch.tensor(scal, dtype=torch.float32)
        if dev.type != "cpu" and self._fresh:
            rk, sc = rk.to(dev), sc.to(dev)                    # blocking: the data is there on return
        elif dev.type != "cpu":
            fixed = self._fixed.get(key)
            if fixed is None or fixed[0].shape != rk.shape:
                fixed = self._fixed[key] = (torch.zeros(rk.shape, dtype=torch.int32, device=dev),
                                            torch.zeros(sc.shape, dtype=torch.float32, device=dev))
            rk, sc = rk.pin_memory(), sc.pin_memory()
            fixed[0].copy_(rk, non_blocking=True)
            fixed[1].copy_(sc, non_blocking=True)
            keep_alive += [rk, sc]
            rk, sc = fixed
        if resolve_backend(self.backend, dev) == "torch":      # (as LayerSlots.publish: ranks in use only)
            a = [m.a[:, :r_eff] for m in ms]
            b = [m.bt[:, :r_eff].transpose(1, 2) for m in ms]
        else:
            a = [m.a for m in ms]
            b = [m.bt.transpose(1, 2) for m in ms]
        # a storage dtype (adapter_dtype) other than the activations': BoundLoRA checks against those
        kw = {"dtype": ms[0].dtype} if ms[0].storage_dtype is not ms[0].dtype else {}
        if ms[0].fp8:         # fp8 storage: each member's per-rank-row scales (ops/fp8.py)
            cut = (lambda t: t[:, :r_eff]) if resolve_backend(self.backend, dev) == "torch" else (lambda t: t)
            kw["a_scales"] = [cut(m.a_scale) for m in ms]
            kw["b_scales"] = [cut(m.b_scale) for m in ms]
            if len(ms) == 1:
                kw["a_scales"], kw["b_scales"] = kw["a_scales"][0], kw["b_scales"][0]
        if len(ms) == 1:
            return BoundLoRA(a[0], b[0], sc, rk[0], backend=self.backend, **kw)
        return BoundLoRA(a, b, sc, rk, backend=self.backend, **kw)


def candidate_groups(targets, layers: Dict[str, LayerSlots]) -> Dict[str, Tuple["ProjectionGroup", int]]:
    """{layer name: (its group, its index in the group)} for the targets that can be grouped (see
    the module doc): plain linear modules, children of one parent, same in_features, module class,
    device and dtype, at least two of them."""
    by_key: Dict[tuple, List[str]] = {}
    for t in targets:
        if t.kind != "linear" or t.param is not None or layers[t.name].packed:
            continue          # (the rank-packed pool's slots are row ranges of one buffer: not grouped)
        parent = t.name.rsplit(".", 1)[0] if "." in t.name else ""
        w = t.weight
        key = (parent, t.in_features, type(t.module), w.device, w.dtype)
        by_key.setdefault(key, []).append(t.name)
    out: Dict[str, Tuple[ProjectionGroup, int]] = {}
    for (parent, *_), names in by_key.items():
        if len(names) < 2:
            continue
        g = ProjectionGroup(parent, [layers[n] for n in names])
        for i, n in enumerate(names):
            out[n] = (g, i)
    return out


def observe(state, group: ProjectionGroup, member: int, x: torch.Tensor) -> None:
    """(learning forward) Record which earlier member of ``group``, if any, saw the same input."""
    obs = state.observe.get(group)
    if obs is None:
        obs = state.observe[group] = ([], set())
    classes, seen = obs
    if member in seen:
        return
    seen.add(member)
    v = version(x)
    for c in classes:
        if c[0]() is x and c[1] == v:
            c[2].append(member)
            return
    classes.append((weakref.ref(x), v, [member]))


def finish_forward(state) -> None:
    """(end of a top-level forward) Learn the plans observed, drop this forward's scratches."""
    if state.observe:
        for g, (classes, _) in list(state.observe.items()):
            g.learn([c[2] for c in classes])
        state.observe = {}
    state.pending = {}
