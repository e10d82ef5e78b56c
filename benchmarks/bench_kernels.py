"""Kernel benchmark: add_lora, lora_shrink and lora_expand against torch baselines, on real model shapes.

What it measures (see docs/benchmarks.md for the full story):

* ops: add_lora, lora_shrink, lora_expand, and the batch-metadata build (timed separately: a
  serving stack builds it once per forward, outside every layer, so the op timings exclude it);
* shapes: Llama-2-7B 4096->4096, 4096->11008, 11008->4096 and Llama-3-8B's fused QKV
  4096->(4096, 1024, 1024) as one 3-slice call;
* T = 1..512 (decode: one row per request) and 2048..16384 (prefill: --prefill-requests
  requests of T / requests rows each); ranks 8, 16, 64, 128 and a mixed set (8..128 in one
  batch); adapter popularity distinct / uniform / skewed / identical (benchmarks/workloads.py);
* contenders: each usable backend of ours ("olk-<backend>"; on a CPU the native "cpu" backend
  and "torch"), and kernel_baselines.py's loop (PEFT-style), gather_bmm and dense_one (the
  one-LoRA floor); each result is first checked against a float32 reference (rel_err in the
  row). B is given in the usual layout, a list of per-slice [S, N_i, R] tensors (what PEFT and
  vLLM hold); on a CPU each of our backends is also timed on the adapter pool's layout
  ("olk-<backend>[pool-B]": rank-major [S, R, N_i] storage seen as [S, N_i, R] views, one
  buffer per slice; --b-layouts), so that the two layouts compare row for row;
* metrics: median, p20, p80 time per call (µs); achieved GB/s and % of the HBM roofline from
  roofline.py's minimum bytes over the bandwidth of a large device-to-device copy measured at
  the start of the same run; eager time (CUDA events around each call, inputs rotated over
  enough copies that the working set exceeds 2x the L2) and, where the roofline time is below
  --graph-below-us, CUDA-graph time (launch overhead removed).

The full plan runs in priority order (add_lora over T first) and stops starting new cases once
--budget-s is spent; rows are appended to the CSV case by case, so a cut-short run keeps what it
measured. --quick runs tiny shapes in seconds (CPU smoke test, no CUDA parts). On a CPU without
--quick the plan is the CPU preset (real shapes, T up to 512 and one prefill of 2048 rows: the
GPU plan's 16384-row prefills would take minutes per call on two cores).

    python -m benchmarks.bench_kernels --quick                       # CPU smoke run
    python -m benchmarks.bench_kernels --device cpu --threads 1      # CPU run (~15 minutes on 2 cores)
    python -m benchmarks.bench_kernels --budget-s 300                # full run on a GPU
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import common, roofline, workloads  # noqa: E402
from benchmarks import kernel_baselines as kb  # noqa: E402

# name -> (model and layer, K, output widths)
SHAPES: Dict[str, Tuple[str, int, Tuple[int, ...]]] = {
    "4096->4096": ("Llama-2-7B q/k/v/o_proj", 4096, (4096,)),
    "4096->11008": ("Llama-2-7B gate/up_proj", 4096, (11008,)),
    "11008->4096": ("Llama-2-7B down_proj", 11008, (4096,)),
    "4096->4096+1024+1024": ("Llama-3-8B fused qkv_proj (3 slices)", 4096, (4096, 1024, 1024)),
}
QUICK_DIVISOR = 64          # --quick divides every dimension of SHAPES by this
RANK_SETS: Dict[str, Tuple[int, ...]] = {
    "8": (8,), "16": (16,), "32": (32,), "64": (64,), "128": (128,), "mixed": (8, 16, 32, 64, 128),
}
OPS = ("add_lora", "lora_shrink", "lora_expand")
BASELINES = ("loop", "gather_bmm", "dense_one")
SWEEPS = ("meta", "T", "ranks", "workloads")

FULL = dict(decode=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), prefill=(2048, 4096, 8192, 16384),
            prefill_requests=16, sweep_tokens=(1, 16, 64, 256, 512, 4096, 16384),
            ranks=("8", "64", "128", "mixed"), base_rank="16", ops_order=("add_lora", "lora_shrink", "lora_expand"),
            budget_ms=60.0, min_reps=10, max_reps=200, graph_budget_ms=40.0, warmup=3)
QUICK = dict(decode=(1, 4), prefill=(64,), prefill_requests=4, sweep_tokens=(4, 64),
             ranks=("mixed",), base_rank="16", ops_order=("add_lora", "lora_shrink", "lora_expand"),
             budget_ms=4.0, min_reps=3, max_reps=20, graph_budget_ms=4.0, warmup=1)
# A CPU without --quick: the real shapes, decode up to 512 rows and one prefill of 2048.
CPU = dict(decode=(1, 4, 16, 64, 256, 512), prefill=(2048,), prefill_requests=16, sweep_tokens=(16, 256, 2048),
           ranks=("8", "64", "mixed"), base_rank="16", ops_order=("add_lora", "lora_shrink", "lora_expand"),
           budget_ms=150.0, min_reps=5, max_reps=60, graph_budget_ms=40.0, warmup=2)
B_LAYOUTS = ("standard", "pool")
SWEEP_SHAPES = ("4096->4096", "4096->4096+1024+1024")  # shapes of the rank and workload sweeps


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    shape: str
    rank: str
    workload: str
    T: int
    n_requests: int
    regime: str  # decode | prefill
    sweep: str


@dataclasses.dataclass
class InputSet:
    """One rotation copy of everything a call touches."""
    x: Optional[torch.Tensor] = None
    y: Optional[torch.Tensor] = None
    h: Optional[torch.Tensor] = None             # [n, T, R] fp32 (lora_expand input)
    a_list: List[torch.Tensor] = dataclasses.field(default_factory=list)
    b_list: List[torch.Tensor] = dataclasses.field(default_factory=list)
    b_pool: List[torch.Tensor] = dataclasses.field(default_factory=list)  # the same B, rank-major storage
    a_cat: Optional[torch.Tensor] = None         # dense_one: [n * r_f, K]
    b0_list: List[torch.Tensor] = dataclasses.field(default_factory=list)  # dense_one: [N_i, r_f]
    h0: Optional[torch.Tensor] = None            # dense_one expand input [T, n * r_f]


@dataclasses.dataclass
class Batch:
    """Per-case facts shared by every rotation set (built once, outside the timed region)."""
    K: int
    widths: Tuple[int, ...]
    R: int
    slot_ranks: List[int]
    indices: torch.Tensor        # [T] int32 on the device
    slots64: torch.Tensor        # [T] int64 on the device
    meta: Any                    # LoRABatchMeta
    ranks: Optional[torch.Tensor]
    scalings: torch.Tensor       # [U] fp32
    groups: List[kb.AdapterGroup]
    floor_rank: int
    floor_scale: float
    problem: roofline.LoRAProblem
    floor_problem: roofline.LoRAProblem


# --------------------------------------------------------------------------------- the plan


def shape_dims(shape: str, quick: bool) -> Tuple[str, int, Tuple[int, ...]]:
    """(model and layer, K, widths) of a SHAPES entry; --quick divides the sizes."""
    label, K, widths = SHAPES[shape]
    if quick:
        K, widths = K // QUICK_DIVISOR, tuple(w // QUICK_DIVISOR for w in widths)
        label += f" (sizes / {QUICK_DIVISOR}: --quick)"
    return label, K, widths


def shape_label(K: int, widths: Sequence[int]) -> str:
    """The shape column of a row: 'K->N', or 'K->N1+N2+N3' for a multi-slice call."""
    return f"{K}->" + "+".join(str(w) for w in widths)


def build_plan(args, preset) -> List[Case]:
    decode = [t for t in preset["decode"] if args.tokens is None or t in args.tokens]
    prefill = [t for t in preset["prefill"] if args.tokens is None or t in args.tokens]
    nreq = preset["prefill_requests"] if args.prefill_requests is None else args.prefill_requests

    def case(op, shape, rank, wl, T, sweep):
        regime = "prefill" if T in preset["prefill"] or T > max(preset["decode"]) else "decode"
        n_req = min(T, nreq) if regime == "prefill" else T
        return Case(op, shape, rank, wl, T, n_req, regime, sweep)

    plan: List[Case] = []
    base_rank = preset["base_rank"]
    sweep_T = [t for t in preset["sweep_tokens"] if args.tokens is None or t in args.tokens]
    sweep_shapes = [s for s in SWEEP_SHAPES if s in args.shapes]
    rank_extra = [r for r in args.ranks if r != base_rank]
    wl_extra = [w for w in args.workloads if w != "distinct"]
    # Priority order: the headline (add_lora over T), then ranks, workloads, then shrink / expand.
    order: List[Tuple[str, str]] = [("T", "add_lora"), ("ranks", "add_lora"), ("workloads", "add_lora"),
                                    ("T", "lora_shrink"), ("T", "lora_expand")]
    for sweep, op in order:
        if sweep not in args.sweeps or op not in args.ops:
            continue
        if sweep == "T":
            if base_rank in args.ranks and "distinct" in args.workloads:
                plan += [case(op, s, base_rank, "distinct", T, "T") for s in args.shapes for T in decode + prefill]
        elif sweep == "ranks":
            if "distinct" in args.workloads:
                plan += [case(op, s, r, "distinct", T, "ranks") for s in sweep_shapes for r in rank_extra for T in sweep_T]
        elif sweep == "workloads":
            if base_rank in args.ranks:
                plan += [case(op, s, base_rank, w, T, "workloads") for s in sweep_shapes for w in wl_extra for T in sweep_T]
    return plan


# ------------------------------------------------------------------------------ the inputs


def _floor_rank(problem: roofline.LoRAProblem, rank_set: Tuple[int, ...]) -> int:
    if len(rank_set) == 1:
        return rank_set[0]
    mean = problem.row_rank_sum / max(1, problem.T_active)
    return max(8, 8 * math.ceil(mean / 8))


def make_batch(case: Case, K: int, widths: Tuple[int, ...], device: torch.device, dtype: torch.dtype,
               pool_slots: int, seed: int) -> Batch:
    import openlora_kernels as olk

    seq = case.T // case.n_requests
    idx_host = workloads.token_slots(case.workload, case.n_requests, seq, seed=seed)
    U = int(idx_host.max()) + 1
    rank_set = RANK_SETS[case.rank]
    R = max(rank_set)
    gen = torch.Generator().manual_seed(seed + 1)
    if len(rank_set) == 1:
        slot_ranks = [R] * U
    else:  # each slot a rank of the set, cycled in a seeded order
        perm = torch.randperm(U, generator=gen).tolist()
        slot_ranks = [rank_set[p % len(rank_set)] for p in perm]
    scal_host = (0.5 + 1.5 * torch.rand(U, generator=gen)).tolist()
    idx_list = idx_host.tolist()
    elem = torch.finfo(dtype).bits // 8
    problem = roofline.problem_from_batch(idx_list, slot_ranks, K, widths, R=R, elem_bytes=elem)
    r_f = _floor_rank(problem, rank_set)
    floor_problem = roofline.problem_from_batch([0] * case.T, [r_f], K, widths, R=r_f, elem_bytes=elem)
    indices = idx_host.to(device=device, dtype=torch.int32)
    block_m = olk.choose_block_m(case.T, max(U, pool_slots))
    meta = olk.build_batch_meta(indices, U, block_m=block_m)
    ranks = None if len(rank_set) == 1 else torch.tensor(slot_ranks, dtype=torch.int32, device=device)
    scalings = torch.tensor(scal_host, dtype=torch.float32, device=device)
    groups = kb.adapter_groups(idx_list, slot_ranks, scal_host, device)
    return Batch(K, widths, R, slot_ranks, indices, indices.to(torch.int64), meta, ranks, scalings, groups,
                 r_f, float(scal_host[0]), problem, floor_problem)


def make_set(op: str, b: Batch, T: int, device: torch.device, dtype: torch.dtype, pool_b: bool = False) -> InputSet:
    """Random inputs (never zeros): |x|, |h| ~ 1 and weights scaled so that |delta| ~ |y| ~ 1."""
    U, R, K, n = len(b.slot_ranks), b.R, b.K, len(b.widths)
    s = InputSet()
    rank_t = torch.tensor(b.slot_ranks, device=device)
    lane = torch.arange(R, device=device)
    slot_mask = (lane[None, :] < rank_t[:, None]).to(dtype)           # [U, R]
    needs_x = op in ("add_lora", "lora_shrink")
    needs_y = op in ("add_lora", "lora_expand")
    if needs_x:
        s.x = torch.randn(T, K, device=device, dtype=dtype)
        s.a_list = [torch.randn(U, R, K, device=device, dtype=dtype).mul_(K ** -0.5).mul_(slot_mask[:, :, None])
                    for _ in range(n)]
        s.a_cat = torch.randn(n * b.floor_rank, K, device=device, dtype=dtype).mul_(K ** -0.5)
    if needs_y:
        s.y = torch.randn(T, sum(b.widths), device=device, dtype=dtype)
        s.b_list = [torch.randn(U, w, R, device=device, dtype=dtype).mul_(R ** -0.5).mul_(slot_mask[:, None, :])
                    for w in b.widths]
        s.b0_list = [torch.randn(w, b.floor_rank, device=device, dtype=dtype).mul_(b.floor_rank ** -0.5)
                     for w in b.widths]
        if pool_b:     # the pool's layout: [S, R, N_i] storage per slice, seen as [S, N_i, R]
            s.b_pool = [B.transpose(1, 2).contiguous().transpose(1, 2) for B in s.b_list]
    if op == "lora_expand":
        row_rank = rank_t.index_select(0, b.slots64)
        s.h = torch.randn(n, T, R, device=device, dtype=torch.float32).mul_((lane[None, :] < row_rank[:, None]))
        s.h0 = torch.randn(T, n * b.floor_rank, device=device, dtype=dtype)
    return s


# ----------------------------------------------------------------------------- contenders


@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    kind: str                 # olk | loop | gather_bmm | dense_one
    backend: Optional[str] = None
    b_layout: str = "standard"  # olk: "standard" ([S, N_i, R] per slice) or "pool" (rank-major views)

    @property
    def same_function(self) -> bool:
        """Computes the batch's multi-adapter result (checked against the reference)."""
        return self.kind != "dense_one"


def runner(c: Contender, op: str, b: Batch) -> Callable[[InputSet], Any]:
    """A function of one input set that runs contender ``c`` on ``op``."""
    if c.kind == "olk":
        import openlora_kernels as olk

        meta, ranks, sc, be = b.meta, b.ranks, b.scalings, c.backend
        pool = c.b_layout == "pool"
        if op == "add_lora":
            return lambda s: olk.add_lora(s.y, s.x, s.a_list, s.b_pool if pool else s.b_list, meta, sc, ranks,
                                          backend=be)
        if op == "lora_shrink":
            return lambda s: olk.lora_shrink(s.x, s.a_list, meta, ranks, backend=be)
        return lambda s: olk.lora_expand(s.y, s.h, s.b_pool if pool else s.b_list, meta, sc, ranks, backend=be)
    if c.kind == "loop":
        g, R = b.groups, b.R
        if op == "add_lora":
            return lambda s: kb.loop_add_lora(s.y, s.x, s.a_list, s.b_list, g)
        if op == "lora_shrink":
            return lambda s: kb.loop_shrink(s.x, s.a_list, g, R)
        return lambda s: kb.loop_expand(s.y, s.h, s.b_list, g)
    if c.kind == "gather_bmm":
        slots, sc = b.slots64, b.scalings
        if op == "add_lora":
            return lambda s: kb.gather_add_lora(s.y, s.x, s.a_list, s.b_list, slots, sc)
        if op == "lora_shrink":
            return lambda s: kb.gather_shrink(s.x, s.a_list, slots)
        return lambda s: kb.gather_expand(s.y, s.h, s.b_list, slots, sc)
    if c.kind == "dense_one":
        scale = b.floor_scale
        if op == "add_lora":
            return lambda s: kb.dense_add_lora(s.y, s.x, s.a_cat, s.b0_list, scale)
        if op == "lora_shrink":
            return lambda s: kb.dense_shrink(s.x, s.a_cat)
        return lambda s: kb.dense_expand(s.y, s.h0, s.b0_list, scale)
    raise ValueError(f"unknown contender kind {c.kind!r}")


def skip_reason(c: Contender, case: Case, b: Batch, device: torch.device, args, elem: int) -> Optional[str]:
    if c.kind == "gather_bmm":
        need = kb.gather_bytes(case.T, b.R, b.K, b.widths, elem)
        if need > args.gather_max_bytes:
            return f"would gather {need / 2**30:.1f} GiB of weights (> --gather-max-bytes)"
    if c.b_layout == "pool" and case.op == "lora_shrink":
        return "lora_shrink reads no B"
    if c.kind == "loop" and len(b.groups) > args.loop_max_adapters:
        return f"{len(b.groups)} adapters > --loop-max-adapters"
    if c.kind == "olk" and c.backend == "torch" and device.type == "cuda" and case.regime == "prefill" \
            and not args.torch_backend_prefill:
        return "backend torch on a GPU is a per-row gather: slow at prefill (--torch-backend-prefill to time it)"
    return None


def reference(op: str, b: Batch, s: InputSet, T: int) -> torch.Tensor:
    if op == "lora_shrink":
        return kb.reference_shrink(s.x, s.a_list, b.groups, b.R)
    h = s.h if op == "lora_expand" else kb.reference_shrink(s.x, s.a_list, b.groups, b.R)
    return kb.reference_delta(h, s.b_list, b.groups, T)


def check(run: Callable[[InputSet], Any], op: str, s: InputSet, ref: torch.Tensor) -> float:
    """rel_err of one call on a copy of set ``s`` against the reference."""
    if op == "lora_shrink":
        return kb.rel_err(run(s), ref)
    s2 = dataclasses.replace(s, y=s.y.clone())
    run(s2)
    return kb.rel_err(s2.y.float() - s.y.float(), ref)


# ------------------------------------------------------------------------------- measuring


class Runner:
    def __init__(self, args, preset, device: torch.device, dtype: torch.dtype, out: "common.ResultsFile"):
        self.args, self.preset, self.device, self.dtype, self.out = args, preset, device, dtype, out
        self.env = common.env_info(device)
        if self.env["commit"] == "unknown" and os.environ.get("OPENLORA_COMMIT"):
            # a copy of the tree without .git (a device machine): the caller names the commit
            self.env["commit"] = os.environ["OPENLORA_COMMIT"]
        self.failures: List[str] = []
        self.rows_written = 0
        self.cache = common.cache_bytes(device)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            self.mem_cap = int(min(args.max_set_gib * 2**30, 0.4 * free))
        else:
            self.mem_cap = int(args.max_set_gib * 2**30)
        self.peak_gbps = float("nan")

    def write(self, rows: List[Dict[str, Any]]) -> None:
        if rows:
            self.out.write(rows, self.env)      # a common.ResultsFile
            self.rows_written += len(rows)

    # ---- ceilings
    def ceilings(self) -> None:
        quick_cpu = self.args.quick and self.device.type != "cuda"
        bw = common.measure_copy_bandwidth(self.device, nbytes=2**24 if quick_cpu else None)
        mm = common.measure_matmul_tflops(self.device, n=256 if quick_cpu else None)
        self.peak_gbps = bw["median"]
        one = torch.randn(1, device=self.device)
        launch = {"launch": self._time(lambda j: one.add_(1.0), 1, False)}
        if self._graph_ok(0.0):
            launch["launch_graph"] = self._time(lambda j: one.add_(1.0), 1, True)
        print(f"ceilings: copy {bw['median']:.1f} GB/s (bytes read + written), "
              f"{mm['dtype']} matmul n={mm['n']}: {mm['median']:.2f} TFLOP/s; cache {self.cache / 2**20:.0f} MiB")
        self.write([
            {"benchmark": "kernels", "kernel": "ceiling", "contender": "torch copy_", "shape": f"{bw['bytes'] // 2} B",
             "metric": "bandwidth", "median": bw["median"], "p20": bw["p20"], "p80": bw["p80"], "unit": "GB/s",
             "bytes_moved": bw["bytes"], "reps": bw["reps"], "cache_bytes": self.cache},
            {"benchmark": "kernels", "kernel": "ceiling", "contender": "torch mm", "shape": f"{mm['n']}^3 {mm['dtype']}",
             "metric": "matmul", "median": mm["median"], "p20": mm["p20"], "p80": mm["p80"], "unit": "TFLOP/s",
             "reps": mm["reps"]},
        ] + [{"benchmark": "kernels", "kernel": "ceiling", "contender": "torch add_", "shape": "1 element",
              "metric": metric, "median": t["median"] * 1e3, "p20": t["p20"] * 1e3, "p80": t["p80"] * 1e3,
              "unit": "us", "reps": t["reps"]} for metric, t in launch.items()])

    # ---- one measurement
    def _time(self, fn: Callable[[int], Any], n_sets: int, graph: bool) -> Dict[str, float]:
        p = self.preset
        if graph:
            return common.time_cuda_graph(fn, n_sets, self.device, budget_ms=p["graph_budget_ms"])
        return common.time_rotating(fn, n_sets, self.device, budget_ms=p["budget_ms"], min_reps=p["min_reps"],
                                    max_reps=p["max_reps"], warmup=p["warmup"])

    def _graph_ok(self, roofline_us: float) -> bool:
        return self.device.type == "cuda" and not self.args.no_graphs and roofline_us < self.args.graph_below_us

    # ---- metadata build
    def meta_build(self, tokens: Sequence[int], nreq_prefill: int, prefill: Sequence[int]) -> None:
        import openlora_kernels as olk

        rows = []
        for T in tokens:
            n_req = min(T, nreq_prefill) if T in prefill else T
            idx = workloads.token_slots("distinct", n_req, T // n_req).to(self.device, torch.int32)
            S = max(n_req, self.args.pool_slots)
            fn = lambda j: olk.build_batch_meta(idx, S)  # noqa: E731
            modes = [("time", False)] + ([("time_graph", True)] if self._graph_ok(0.0) else [])
            for metric, graph in modes:
                try:
                    t = self._time(fn, 1, graph)
                except Exception as e:  # noqa: BLE001 - report and go on
                    self.failures.append(f"build_batch_meta T={T} {metric}: {type(e).__name__}: {e}")
                    print("FAIL", self.failures[-1])
                    continue
                bm = olk.choose_block_m(T, S)
                rows.append({"benchmark": "kernels", "kernel": "build_batch_meta", "contender": "olk",
                             "shape": f"T={T} S={S}", "metric": metric, "median": t["median"] * 1e3,
                             "p20": t["p20"] * 1e3, "p80": t["p80"] * 1e3, "unit": "us", "T": T, "S": S,
                             "block_m": bm, "workload": "distinct", "n_requests": n_req, "reps": t["reps"],
                             "sweep": "meta"})
                print(f"build_batch_meta T={T:6d} S={S:6d} {metric:10s} {t['median'] * 1e3:10.1f} us")
        self.write(rows)

    # ---- one case: every contender
    def run_case(self, case: Case, contenders: Sequence[Contender]) -> None:
        label, K, widths = shape_dims(case.shape, self.args.quick)
        shape = shape_label(K, widths)  # the sizes actually run (--quick shrinks them)
        dev, dtype = self.device, self.dtype
        elem = torch.finfo(dtype).bits // 8
        torch.manual_seed(self.args.seed)
        b = make_batch(case, K, widths, dev, dtype, self.args.pool_slots, self.args.seed)
        set_bytes = roofline.op_bytes(case.op, b.problem)
        # (the pool-layout copy of B each set also holds: counted against the memory cap only, as
        # one call reads one layout)
        copy_bytes = 0 if case.op == "lora_shrink" else len(b.slot_ranks) * sum(b.widths) * b.R * elem
        n_sets = common.rotation_sets(set_bytes, self.cache, max_sets=self.args.max_sets,
                                      max_total_bytes=self.mem_cap * set_bytes // (set_bytes + copy_bytes))
        pool_b = case.op != "lora_shrink" and any(c.b_layout == "pool" for c in contenders)
        sets = [make_set(case.op, b, case.T, dev, dtype, pool_b) for _ in range(n_sets)]
        ref = reference(case.op, b, sets[0], case.T)
        # the checks start from set 0's y as made (the timed calls accumulate into y: after a few
        # hundred of them its 16-bit rounding error is no longer small next to one call's delta)
        pristine = sets[0] if sets[0].y is None else dataclasses.replace(sets[0], y=sets[0].y.clone())
        rows = []
        common_extra = {
            "model": label, "K": K, "widths": list(widths), "n_slices": len(widths), "T": case.T,
            "regime": case.regime, "n_requests": case.n_requests, "workload": case.workload, "rank": case.rank,
            "R": b.R, "distinct": b.problem.distinct, "block_m": b.meta.block_m, "pool_slots": self.args.pool_slots,
            "dtype": str(dtype).replace("torch.", ""), "peak_gbps": self.peak_gbps, "n_sets": n_sets,
            "working_set_mb": n_sets * set_bytes / 1e6, "rotation_ok": (n_sets - 1) * set_bytes >= self.cache,
            "sweep": case.sweep,
        }
        # rel_err bounds of the sanity check (a wrong row or slot gives ~1): ours keeps fp32 until
        # the final rounding; the baselines round h and the product to 16 bits (and on a CPU the
        # bf16 matmul may accumulate in bf16), so they get more room.
        tol_ours, tol_base = (1e-3, 1e-3) if dtype == torch.float32 else (2e-2, 6e-2)
        for c in contenders:
            why = skip_reason(c, case, b, dev, self.args, elem)
            tag = f"{case.op:11s} {shape:20s} r={case.rank:5s} {case.workload:9s} T={case.T:5d} {c.name:11s}"
            if why:
                print(f"{tag} skipped: {why}")
                continue
            problem = b.problem if c.same_function else b.floor_problem
            try:
                run = runner(c, case.op, b)
                err = check(run, case.op, pristine, ref) if c.same_function else None
                fn = lambda j, run=run: run(sets[j])  # noqa: E731
                # a slow contender gets few calls: probe one call (after compiling) first
                fn(0)
                common.synchronize(dev)
                t0 = time.perf_counter()
                fn(1 % n_sets)
                common.synchronize(dev)
                one_ms = (time.perf_counter() - t0) * 1e3
                if one_ms > self.args.max_call_ms:
                    print(f"{tag} skipped: one call takes {one_ms:.0f} ms (> --max-call-ms)")
                    continue
                roof_us = roofline.roofline_time_s(roofline.op_bytes(case.op, problem), self.peak_gbps) * 1e6
                modes = [("time", False)] + ([("time_graph", True)] if self._graph_ok(roof_us) else [])
                for metric, graph in modes:
                    try:
                        t = self._time(fn, n_sets, graph)
                    except Exception as e:  # noqa: BLE001
                        self.failures.append(f"{tag} {metric}: {type(e).__name__}: {str(e)[:200]}")
                        print("FAIL", self.failures[-1])
                        continue
                    s = roofline.summary(case.op, problem, t["median"] * 1e-3, self.peak_gbps)
                    tol = tol_ours if c.kind == "olk" else tol_base
                    ok = err is None or err <= tol
                    if not ok:
                        self.failures.append(f"{tag}: rel_err {err:.3g} > {tol}")
                    rows.append({"benchmark": "kernels", "kernel": case.op, "contender": c.name, "shape": shape,
                                 "metric": metric, "median": t["median"] * 1e3, "p20": t["p20"] * 1e3,
                                 "p80": t["p80"] * 1e3, "unit": "us", **common_extra, **s, "reps": t["reps"],
                                 "rel_err": err, "check": "n/a" if err is None else ("ok" if ok else "FAIL"),
                                 "b_layout": c.b_layout if c.kind == "olk" else "standard",
                                 "task": "batch" if c.same_function else f"one adapter of rank {b.floor_rank}"})
                    print(f"{tag} {metric:10s} {t['median'] * 1e3:10.1f} us  {s['pct_roofline']:6.1f}% of roofline"
                          f" ({s['roofline_us']:.1f} us)" + ("" if err is None else f"  rel_err {err:.1e}")
                          + ("" if ok else "  CHECK FAILED"))
            except Exception as e:  # noqa: BLE001 - one broken contender must not stop the run
                self.failures.append(f"{tag}: {type(e).__name__}: {str(e)[:300]}")
                print("FAIL", self.failures[-1])
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
        self.write(rows)
        big = n_sets * set_bytes > 2**30
        sets.clear()  # the timed closures hold the list: emptying it frees the tensors
        if dev.type == "cuda" and big:  # hand large rotation sets back before the next case
            gc.collect()
            torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions (seconds on a CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"), help="default bfloat16")
    p.add_argument("--out", default=None, help="CSV path (default <out-dir>/kernels_<device>[_quick].csv)")
    p.add_argument("--out-dir", default=common.RESULTS_DIR, help="folder of the default CSV path (benchmarks/out, or $OPENLORA_BENCH_OUT; "
                   "committed files: an explicit --out benchmarks/results/<file>.csv)")
    p.add_argument("--append", action="store_true", help="append to --out instead of starting it afresh")
    p.add_argument("--budget-s", type=float, default=None, help="start no new case after this many seconds")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--ranks", nargs="+", default=None, choices=list(RANK_SETS),
                   help="rank sets (the T sweep uses 16; others go to the rank sweep)")
    p.add_argument("--workloads", nargs="+", default=list(workloads.WORKLOADS), choices=workloads.WORKLOADS)
    p.add_argument("--tokens", nargs="+", type=int, default=None, help="restrict T to these values")
    p.add_argument("--prefill-requests", type=int, default=None, help="requests in a prefill batch (16; quick 4)")
    p.add_argument("--sweeps", nargs="+", default=list(SWEEPS), choices=SWEEPS)
    p.add_argument("--backends", nargs="+", default=None,
                   help="our backends to time (default: every usable one; on a CPU: cpu and torch)")
    p.add_argument("--b-layouts", nargs="+", default=None, choices=B_LAYOUTS,
                   help="B layouts our backends are timed on (default: both on a CPU, standard on a GPU)")
    p.add_argument("--baselines", nargs="+", default=list(BASELINES), choices=BASELINES)
    p.add_argument("--pool-slots", type=int, default=64,
                   help="adapter slots the serving pool is modelled with (block_m is chosen from T and this)")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings")
    p.add_argument("--graph-below-us", type=float, default=50.0,
                   help="also time under a CUDA graph when the roofline time is below this (launch-bound)")
    p.add_argument("--gather-max-bytes", type=float, default=None,
                   help="skip gather_bmm when it would gather more (default 2 GiB on a GPU, 256 MiB on a CPU)")
    p.add_argument("--loop-max-adapters", type=int, default=1024)
    p.add_argument("--max-call-ms", type=float, default=None, help="skip a contender slower than this per call")
    p.add_argument("--max-sets", type=int, default=None, help="cap on rotation copies")
    p.add_argument("--max-set-gib", type=float, default=24.0, help="memory cap of all rotation copies together")
    p.add_argument("--torch-backend-prefill", action="store_true", help="also time backend torch at prefill on a GPU")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: 1 with --quick on a CPU, which keeps a shared machine's "
                        "noise down; else torch's default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = QUICK if args.quick else (FULL if device.type == "cuda" else CPU)
    dtype = getattr(torch, args.dtype or "bfloat16")
    if args.ranks is None:
        args.ranks = [preset["base_rank"], *preset["ranks"]]
    if args.max_sets is None:
        args.max_sets = 4 if (args.quick and device.type != "cuda") else 512
    if args.max_call_ms is None:
        args.max_call_ms = 2000.0 if device.type != "cuda" else 250.0
    if args.gather_max_bytes is None:
        args.gather_max_bytes = 2 * 2**30 if device.type == "cuda" else 2**28
    if device.type == "cpu" and args.backends and "triton" in args.backends:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels are first imported
    threads_before = torch.get_num_threads()
    threads = args.threads or (1 if (args.quick and device.type == "cpu") else None)
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(args, device, preset, dtype)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, device: torch.device, preset: Dict[str, Any], dtype: torch.dtype) -> int:
    import openlora_kernels as olk

    usable = {n: i for n, i in olk.available_backends(device).items() if i.usable}
    cpu_default = [n for n in ("cpu", "torch") if n in usable]
    wanted = args.backends or (cpu_default if device.type == "cpu" else list(usable))
    layouts = args.b_layouts or (list(B_LAYOUTS) if device.type == "cpu" else ["standard"])
    contenders = []
    for name in wanted:
        if name in usable:
            for lay in layouts:
                suffix = "" if lay == "standard" else "[pool-B]"
                if lay == "pool" and name == "torch" and "cpu" in wanted:
                    continue     # (fewer rows: the layouts are compared on the native backend)
                contenders.append(Contender(f"olk-{name}{suffix}", "olk", name, lay))
        else:
            info = olk.available_backends(device).get(name)
            print(f"backend {name}: not timed ({info.reason if info else 'unknown backend'})")
    contenders += [Contender(n, n) for n in args.baselines]

    slug = common.device_slug(device) + ("_quick" if args.quick else "")
    out = args.out or os.path.join(args.out_dir, f"kernels_{slug}.csv")
    # A fresh run over an existing file is staged in <out>.partial and replaces it only at the end:
    # an interrupted run leaves the old file as it was (common.ResultsFile).
    results = common.ResultsFile(out, append=args.append)
    runner_ = Runner(args, preset, device, dtype, results)
    print(f"device: {runner_.env['device']} | torch {runner_.env['torch']} | triton {runner_.env['triton']} | "
          f"commit {runner_.env['commit']} | contenders: {', '.join(c.name for c in contenders)}")
    t_start = time.monotonic()
    plan = build_plan(args, preset)
    with results, torch.inference_mode():
        runner_.ceilings()
        if "meta" in args.sweeps:
            tokens = [t for t in preset["decode"] + preset["prefill"] if args.tokens is None or t in args.tokens]
            nreq = preset["prefill_requests"] if args.prefill_requests is None else args.prefill_requests
            runner_.meta_build(tokens, nreq, preset["prefill"])
        done = 0
        for case in plan:
            if args.budget_s is not None and time.monotonic() - t_start > args.budget_s:
                print(f"budget of {args.budget_s:.0f} s spent: {len(plan) - done} of {len(plan)} cases not run")
                break
            runner_.run_case(case, contenders)
            done += 1
    elapsed = time.monotonic() - t_start
    print(f"\n{runner_.rows_written} rows -> {out} ({done}/{len(plan)} cases, {elapsed:.0f} s)")
    from benchmarks import report

    return common.finish(lambda: report.console_summary(common.read_rows(out)), runner_.failures)


if __name__ == "__main__":
    sys.exit(main())
