"""vLLM's punica wrapper on the CPU: vLLM's own PunicaWrapperCPU against ours (PunicaWrapperOpenLoRA).

The issue's targets (benchmark, not a timed test), in one run on this CPU: ``add_lora_linear`` of a
fused QKV layer (K = 4096 -> 4096 / 1024 / 1024, r = 16) and ``update_metadata`` on

    decode    T = 32 tokens, one per request, 16 adapters (two rows each, interleaved)
    prefill   T = 512 tokens, 8 requests of 64 tokens, 8 adapters

ours must be >= 3x faster than vLLM's on decode and not slower on prefill. Both wrappers get the
same LoRAMapping (is_prefill=True, as vLLM v1 always passes) and the same weights in vLLM's layout
([S, 1, r, K] / [S, 1, N, r], ranks zero-padded to max_lora_rank), used in place. A diagnostic case,
``decode_padded``, holds rank-16 adapters in a max_lora_rank=64 stack: what vLLM's padding costs,
and what ours saves by finding the ranks (``openlora_no_ranks``: ours computing the padding too).

One torch thread by default (``--threads``): on a shared 2-core machine a parallel region waits
for whichever thread the scheduler took away, which costs milliseconds per op and would measure the
load instead of the code. The layer's weights rotate over enough copies to leave the caches between calls (a model's layers
each have their own). The machine is shared: the contenders run in rotating order within each of
several rounds, each round times every contender (``common.time_cpu``), and the figure reported is
the median of the round medians (p20/p80 over rounds). Rows go to
benchmarks/out/vllm_wrapper_cpu.csv (untracked; ``--out benchmarks/results/vllm_wrapper_cpu.csv``
adds to the committed history).

    python -m benchmarks.bench_vllm_wrapper             # a few minutes on 2 cores
    python -m benchmarks.bench_vllm_wrapper --quick     # small shapes, seconds (smoke test)
"""
from __future__ import annotations

import argparse
import os
import statistics
from collections import namedtuple

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import torch  # noqa: E402

from benchmarks.common import RESULTS_DIR, cache_bytes, env_info, progress, rotation_sets, time_cpu, write_rows  # noqa: E402

TARGET_DECODE = 3.0
TARGET_PREFILL = 1.0
Mapping = namedtuple("Mapping", "index_mapping prompt_mapping is_prefill")   # vllm.lora.layers.LoRAMapping's fields
Case = namedtuple("Case", "name T requests adapters K widths rank max_rank")

CASES = [
    Case("decode", 32, 32, 16, 4096, (4096, 1024, 1024), 16, 16),
    Case("prefill", 512, 8, 8, 4096, (4096, 1024, 1024), 16, 16),
    Case("decode_padded", 32, 32, 16, 4096, (4096, 1024, 1024), 16, 64),
]
QUICK = [
    Case("decode", 8, 8, 4, 256, (256, 64, 64), 8, 8),
    Case("prefill", 32, 4, 4, 256, (256, 64, 64), 8, 8),
    Case("decode_padded", 8, 8, 4, 256, (256, 64, 64), 8, 16),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

DEFAULT_OUT = os.path.join(RESULTS_DIR, "vllm_wrapper_cpu.csv")


def shape_of(c: Case, dtype: str) -> str:
    return (f"case={c.name},T={c.T},requests={c.requests},adapters={c.adapters},K={c.K},"
            f"N={'/'.join(map(str, c.widths))},r={c.rank},max_lora_rank={c.max_rank},dtype={dtype}")


def mapping_of(c: Case):
    """LoRA ids 1..adapters in slots 0..adapters-1 (vLLM's ids start at 1); requests cycle over them."""
    per = c.T // c.requests
    req = [1 + i % c.adapters for i in range(c.requests)]
    tok = tuple(r for r in req for _ in range(per))
    return Mapping(tok, tuple(req), True), list(range(1, c.adapters + 1))


def weight_sets(c: Case, dtype, n: int, g):
    """n copies of a layer's stacked weights in vLLM's layout, zero beyond rank c.rank."""
    sets = []
    for _ in range(n):
        A, B = [], []
        for w in c.widths:
            a = torch.zeros(c.adapters, 1, c.max_rank, c.K, dtype=dtype)
            b = torch.zeros(c.adapters, 1, w, c.max_rank, dtype=dtype)
            a[:, :, :c.rank] = (torch.randn(c.adapters, 1, c.rank, c.K, generator=g) * c.K ** -0.5).to(dtype)
            b[:, :, :, :c.rank] = (torch.randn(c.adapters, 1, w, c.rank, generator=g) * c.rank ** -0.5).to(dtype)
            A.append(a)
            B.append(b)
        sets.append((tuple(A), tuple(B)))
    return sets


def run_case(c: Case, dtype_name: str, args, cpu_cls, ours_mod):
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    mapping, ids = mapping_of(c)
    per_set = sum(c.adapters * c.max_rank * (c.K + w) for w in c.widths) * dtype.itemsize
    n_sets = rotation_sets(per_set, cache_bytes(torch.device("cpu")), max_sets=4 if args.quick else 64,
                           max_total_bytes=args.max_weight_mb * 2 ** 20)
    sets = weight_sets(c, dtype, n_sets, g)
    x = torch.randn(c.T, c.K, generator=g).to(dtype)
    y = torch.randn(c.T, sum(c.widths), generator=g).to(dtype)
    cap = max(c.T, 256)
    wrappers = {
        "vllm_cpu": cpu_cls(cap, max(c.requests, 8), "cpu"),
        "openlora": ours_mod.PunicaWrapperOpenLoRA(cap, max(c.requests, 8), "cpu", backend=args.backend),
    }
    if c.rank < c.max_rank:
        wrappers["openlora_no_ranks"] = ours_mod.PunicaWrapperOpenLoRA(cap, max(c.requests, 8), "cpu",
                                                                       backend=args.backend, find_ranks=False)
    for w in wrappers.values():
        w.update_metadata(mapping, ids, c.adapters + 1, 32000)

    # agreement on the timed problem (first weight set)
    outs = {}
    with torch.inference_mode():
        for name, w in wrappers.items():
            out = y.clone()
            w.add_lora_linear(out, x, *sets[0], 1.0, c.widths)
            outs[name] = out.double()
    scale = (outs["vllm_cpu"] - y.double()).abs().max().item()
    diffs = {name: (o - outs["vllm_cpu"]).abs().max().item() for name, o in outs.items()}

    def linear(w):
        state = {"i": 0}

        def fn():
            A, B = sets[state["i"] % n_sets]
            state["i"] += 1
            w.add_lora_linear(y, x, A, B, 1.0, c.widths)   # accumulates into y: same work every call
        return fn

    def metadata(w):
        return lambda: w.update_metadata(mapping, ids, c.adapters + 1, 32000)

    timed = {(op, name): make(w) for op, make in (("add_lora_linear", linear), ("update_metadata", metadata))
             for name, w in wrappers.items()}
    with torch.inference_mode():
        # Ours keeps per-layer state (weight views, ranks, the bound op) from a layer's first call
        # on: one pass over the weight copies first, as a model's first step does for its layers.
        for name in wrappers:
            if name != "vllm_cpu":
                for _ in range(n_sets):
                    timed[("add_lora_linear", name)]()
    medians = {k: [] for k in timed}
    order = list(timed)
    slow = c.T * c.K >= 512 * 4096 and not args.quick
    with torch.inference_mode():
        for r in range(args.rounds):
            for key in order[r % len(order):] + order[:r % len(order)]:
                reps = args.reps
                if key == ("add_lora_linear", "vllm_cpu") and slow:
                    reps = max(2, args.reps // 4)          # ~1 s a call: fewer, still interleaved
                medians[key].append(time_cpu(timed[key], warmup=1, reps=reps)["median"])
    rows = []
    for (op, name), ms in medians.items():
        q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
        rows.append({"benchmark": "vllm_wrapper", "kernel": op, "contender": name, "shape": shape_of(c, dtype_name),
                     "metric": "latency", "unit": "ms", "median": statistics.median(ms), "p20": q[1], "p80": q[7],
                     "rounds": args.rounds, "weight_sets": n_sets})
    base = {r["kernel"]: r["median"] for r in rows if r["contender"] == "vllm_cpu"}
    for r in rows:
        r["speedup_vs_vllm_cpu"] = base[r["kernel"]] / r["median"]
        if r["kernel"] == "add_lora_linear":
            r["max_abs_diff_vs_vllm_cpu"] = diffs[r["contender"]]
            r["max_abs_lora_delta"] = scale
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, 2 rounds (smoke test)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--cases", default="decode,prefill,decode_padded")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1, like the anchors' side-by-side run: on a shared 2-core "
                         "machine a parallel region waits for a descheduled thread, milliseconds per op)")
    ap.add_argument("--max-weight-mb", type=int, default=1024, help="memory bound of the rotated weight copies")
    ap.add_argument("--out", default=DEFAULT_OUT, help="CSV the rows are appended to (default: benchmarks/out/, "
                    "untracked; $OPENLORA_BENCH_OUT sets the folder)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 7)
    args.reps = args.reps or (3 if args.quick else 12)

    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from openlora_kernels.integrations import vllm as ours

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, ours, PunicaWrapperCPU)
    finally:
        torch.set_num_threads(threads)


def _run(args, ours, PunicaWrapperCPU) -> int:
    from openlora_kernels.ops.backends import resolve_backend

    env = env_info(torch.device("cpu"))
    vllm_version = ours.check_vllm_version()
    backend = resolve_backend(args.backend, torch.device("cpu"))
    cases = [c for c in (QUICK if args.quick else CASES) if c.name in args.cases.split(",")]
    rows = []
    todo = [(d, c) for d in args.dtypes.split(",") for c in cases]
    for i, (dtype_name, c) in enumerate(todo):
        progress(f"bench_vllm_wrapper: case {i + 1}/{len(todo)}: {c.name} {dtype_name}")
        got = run_case(c, dtype_name, args, PunicaWrapperCPU, ours)
        for r in got:
            r.update(vllm=vllm_version, backend=backend, quick=args.quick)
        rows += got
        for r in got:
            print(f"{r['shape']:>92} {r['kernel']:>16} {r['contender']:>18}: {r['median']:9.3f} ms "
                  f"(p20 {r['p20']:.3f}, p80 {r['p80']:.3f})  {r['speedup_vs_vllm_cpu']:6.2f}x vLLM"
                  + (f"  max|diff| {r['max_abs_diff_vs_vllm_cpu']:.2g} of {r['max_abs_lora_delta']:.2g}"
                     if "max_abs_diff_vs_vllm_cpu" in r else ""))
    for dtype_name in args.dtypes.split(","):
        for name, target in (("decode", TARGET_DECODE), ("prefill", TARGET_PREFILL)):
            hit = [r for r in rows if r["kernel"] == "add_lora_linear" and r["contender"] == "openlora"
                   and f"case={name}," in r["shape"] and r["shape"].endswith(f"dtype={dtype_name}")]
            for r in hit:
                sp = r["speedup_vs_vllm_cpu"]
                print(f"{name} {dtype_name}: ours {sp:.2f}x vLLM's PunicaWrapperCPU (target >= {target}x): "
                      f"{'met' if sp >= target else 'MISSED'}")
    if not args.no_write:
        print("wrote", write_rows(args.out, rows, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
