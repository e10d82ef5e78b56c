"""Host time of a patched layer's LoRA call on the GPU backends, with the device launch stubbed.

    python -m benchmarks.bench_host_overhead [--out benchmarks/results/host_overhead_cpu.csv]
                                             [--label after] [--quick]

Measures on any machine, GPU or not (benchmarks/host_stub.py says exactly what is stubbed):

* **per call**: ``BoundLoRA(...)(y, x, meta)`` (what a patched layer calls) on backends "triton"
  and "cuda": bf16, T = 8 decode rows over 8 slots, K = N = 4096, S = 8, R = 64, the pool's
  rank-major B; and the unbound ``add_lora(...)`` for comparison. Microseconds per call.
* **per decode step**: a 32-layer model with all seven projections patched (q, k, v, o, gate,
  up, down; tiny widths: host time does not depend on them) plus the one ``build_batch_meta`` of
  the step's forward. As a patched model on a GPU runs them by default: one BoundLoRA call per
  projection, 224 a step (``--grouped``: with group_projections=True, per layer a 3-slice
  q/k/v call and a 2-slice gate/up call into a zero-filled scratch, whose columns are then added
  to the five outputs, and the o and down calls: 128 BoundLoRA calls a step, plus the fills and
  adds; hf_groups.py). The base layers are stood in for by one new output tensor each; each LoRA call adds
  into the output its base layer just produced (as a patched model's hook does), and the LoRA
  host time is the step with LoRA minus the step without, measured interleaved. Also given: the
  calls and the build alone (their inputs not fresh). Milliseconds per step.

Rows (benchmarks/common.py: machine, versions, commit) go to ``--out``; ``--label`` names the
code state (the results file holds a "before" row measured at the commit before bound plans, and
an "after" row). The last line printed is ``host us/call triton=<a> cuda=<b> step_ms=<c>`` (c:
the slower backend's LoRA ms per step).

Times are this thread's CPU time (``time.thread_time``: what the host spends, not counting the
time other processes of a shared machine hold the core); the rows also give the wall times.
On a CPU machine the tensors are CPU tensors: their host-only value checks (ranks, metadata) run
where a GPU's would not, so these numbers are, if anything, high.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402

from benchmarks import common, host_stub  # noqa: E402

LAYERS, PROJ = 32, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _blocks(fn: Callable[[], None], calls: int, blocks: int, warmup: int = 2):
    """(CPU-time, wall-time) microseconds per call of ``fn`` over ``blocks`` blocks of ``calls``
    calls each. CPU time is this thread's (``time.thread_time``): what the host spends on the
    call, not counting the time other processes of a shared machine hold its core."""
    for _ in range(warmup):
        for _ in range(calls):
            fn()
    cpu, wall = [], []
    for _ in range(blocks):
        c0, t0 = time.thread_time(), time.perf_counter()
        for _ in range(calls):
            fn()
        cpu.append((time.thread_time() - c0) / calls * 1e6)
        wall.append((time.perf_counter() - t0) / calls * 1e6)
    return cpu, wall


def _q(samples: List[float]) -> Dict[str, float]:
    return common.quantiles(samples)


def _calibration_ns() -> float:
    """ns per call of an empty Python function (the machine's speed and load at the time)."""
    def f():
        pass
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(100000):
            f()
        best = min(best, (time.perf_counter() - t0) / 100000 * 1e9)
    return best


def pool_weights(S: int, R: int, K: int, N: int, dtype):
    a = torch.zeros(S, R, K, dtype=dtype)
    bt = torch.zeros(S, R, N, dtype=dtype)                  # the pool's [S, R, N] storage
    return a, bt.transpose(1, 2), torch.ones(S), torch.full((S,), R, dtype=torch.int32)


def per_call(backend: str, quick: bool) -> Dict[str, Dict[str, float]]:
    import openlora_kernels as olk
    T, K, N, S, R, dt = 8, 4096, 4096, 8, 64, torch.bfloat16
    a, b, sc, rk = pool_weights(S, R, K, N, dt)
    op = olk.BoundLoRA(a, b, sc, rk, backend=backend)
    x, y = torch.zeros(T, K, dtype=dt), torch.zeros(T, N, dtype=dt)
    meta = olk.build_batch_meta(torch.arange(T), S)
    calls, blocks = (100, 10) if quick else (500, 40)
    with torch.no_grad():
        op(y, x, meta)                                      # compile / record the plan
        bound = _blocks(lambda: op(y, x, meta), calls, blocks)
        unbound = _blocks(lambda: olk.add_lora(y, x, a, b, meta, sc, rk, backend=backend), calls // 5, blocks)
        out = {"bound": bound, "add_lora": unbound}
        if backend == "triton":
            # the other decode plan, forced (ops/triton_segment.py: two launches and the thread's h)
            from openlora_kernels.ops import triton_segment
            other = "fused" if triton_segment.decode_plan(x, y, [a], meta, {"DECODE": "auto"}) == "segment" else "segment"
            old = os.environ.get("OPENLORA_TRITON_DECODE")
            os.environ["OPENLORA_TRITON_DECODE"] = other
            try:
                op2 = olk.BoundLoRA(a, b, sc, rk, backend=backend)
                op2(y, x, meta)
                out[f"bound[{other} plan]"] = _blocks(lambda: op2(y, x, meta), calls, blocks)
            finally:
                if old is None:
                    os.environ.pop("OPENLORA_TRITON_DECODE", None)
                else:
                    os.environ["OPENLORA_TRITON_DECODE"] = old
    return out


def per_step(backend: str, quick: bool, grouped: bool = True):
    """(LoRA ms per step: the model step minus the same step without LoRA, both as CPU-time
    medians of interleaved samples; the step with LoRA; the step without; the 224 calls and the
    metadata build alone, wall and CPU). The "model" stands in for the base layers with one new
    output tensor per layer (``x.new_empty``: a CPU matmul in bf16 costs milliseconds here and
    would bury the LoRA time in its noise), so each LoRA call adds into an output its base layer
    just made, as a patched model's hook does."""
    import openlora_kernels as olk
    T, S, R, dt = 8, 8, 16, torch.bfloat16
    widths = {"q_proj": (64, 64), "k_proj": (64, 16), "v_proj": (64, 16), "o_proj": (64, 64),
              "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
    groups = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)] if grouped \
        else [(p,) for p in PROJ]
    layers = []          # (op, [(output shape, first column, last column)], x, y)
    for _ in range(LAYERS):
        for group in groups:
            K = widths[group[0]][0]
            ws = [pool_weights(S, R, K, widths[p][1], dt) for p in group]
            rk = torch.full((len(group), S), R, dtype=torch.int32) if len(group) > 1 else ws[0][3]
            a, b = ([w[0] for w in ws], [w[1] for w in ws]) if len(group) > 1 else (ws[0][0], ws[0][1])
            cols, c0 = [], 0
            for p in group:
                cols.append(((T, widths[p][1]), c0, c0 + widths[p][1]))
                c0 += widths[p][1]
            layers.append((olk.BoundLoRA(a, b, ws[0][2], rk, backend=backend), cols, torch.zeros(T, K, dtype=dt),
                           torch.zeros(T, c0, dtype=dt)))
    rows = torch.arange(T, dtype=torch.int32) % S

    def base():
        for op, cols, x, _ in layers:
            for shape, _, _ in cols:
                x.new_empty(shape)

    def with_lora():
        meta = olk.build_batch_meta(rows, S)
        for op, cols, x, y in layers:
            if len(cols) == 1:
                op(x.new_empty(cols[0][0]), x, meta)
                continue
            outs = [x.new_empty(cols[0][0])]        # the first member's base output, then the launch
            scratch = x.new_zeros((T, y.shape[1]))
            op(scratch, x, meta)
            for i, (shape, c0, c1) in enumerate(cols):
                out = outs[0] if i == 0 else x.new_empty(shape)
                out.add_(scratch[:, c0:c1])

    def calls_only():
        meta = olk.build_batch_meta(rows, S)
        for op, _, x, y in layers:
            op(y, x, meta)

    n = 6 if quick else 30
    with torch.no_grad():
        with_lora()                                         # compile / record the plans
        for f in (base, with_lora, calls_only):
            _blocks(f, 1, 1, warmup=2)
        b_cpu, l_cpu, c_cpu, c_wall = [], [], [], []
        for _ in range(n):                                  # interleaved: the same load for both
            c, w = _blocks(base, 1, 1, warmup=0)
            b_cpu += c
            c, w = _blocks(with_lora, 1, 1, warmup=0)
            l_cpu += c
            c, w = _blocks(calls_only, 1, 1, warmup=0)
            c_cpu += c
            c_wall += w
    ms = lambda v: [u / 1e3 for u in v]                     # noqa: E731
    lora = [l_ - b_ for l_, b_ in zip(sorted(l_cpu), sorted(b_cpu))]   # quantile-matched differences
    return ms(lora), ms(l_cpu), ms(b_cpu), ms(c_cpu), ms(c_wall)


def _stub(backend: str, python_level: bool):
    return host_stub.stub_triton() if backend == "triton" else host_stub.stub_cuda(python_level=python_level)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "host_overhead_cpu.csv"))
    ap.add_argument("--label", default="after", help="the code state the rows measure (before / after)")
    ap.add_argument("--backends", default="triton,cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--grouped", action="store_true",
                    help="q/k/v and gate/up grouped (128 calls a step, scratch fill + slice adds: patch_model's "
                         "group_projections=True; its default on a GPU is one call per projection, 224 a step)")
    opts = ap.parse_args(argv)
    env = common.env_info(torch.device("cpu"))
    if env["commit"] == "unknown" and os.environ.get("OPENLORA_COMMIT"):
        env["commit"] = os.environ["OPENLORA_COMMIT"]
    calib = _calibration_ns()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else -1.0
    print(f"bench_host_overhead: {opts.label} at {env['commit']}, {env['device']}, triton {env['triton']}, "
          f"empty Python call {calib:.0f} ns, load {load:.1f}")
    rows, summary = [], {}
    for backend in opts.backends.split(","):
        try:
            from openlora_kernels.ops import cuda_ext  # noqa: F401
            python_level = backend == "cuda" and not hasattr(host_stub._cuda_module(), "set_launch_stub")
            with _stub(backend, python_level):
                calls = per_call(backend, opts.quick)
                step = per_step(backend, opts.quick, grouped=opts.grouped)
        except host_stub.StubUnavailable as e:
            print(f"  {backend}: skipped ({e})")
            continue
        how = host_stub.stub_info()[f"{backend}_stub"] + (" [Python-level: binding.run a no-op]" if python_level else "")
        extra = {"label": opts.label, "stub": how, "calib_empty_call_ns": round(calib, 1), "load_avg": round(load, 2),
                 "timing": "median/p20/p80: this thread's CPU time (time.thread_time); wall_*: perf_counter"}

        def row(kernel, contender, shape, metric, unit, cpu, wall):
            w = _q(wall)
            rows.append({"benchmark": "host_overhead", "kernel": kernel, "contender": contender, "shape": shape,
                         "metric": metric, **_q(cpu), "unit": unit, **extra, "wall_median": round(w["median"], 3),
                         "wall_p20": round(w["p20"], 3), "min": round(min(cpu), 3)})

        for what, (cpu, wall) in calls.items():
            row("add_lora", f"{backend}:{what}", "bf16 T=8 K=N=4096 S=8 R=64 pool-B", "host_us_per_call", "us",
                cpu, wall)
        lora, with_l, base, calls_cpu, calls_wall = step
        n_calls = LAYERS * (4 if opts.grouped else 7)
        how = ", q/k/v and gate/up grouped: scratch fill + slice adds" if opts.grouped else ""
        shape = f"{LAYERS} layers x 7 projections ({n_calls} calls{how}) + build_batch_meta, T=8 S=8 R=16"
        row("decode_step", f"{backend}:bound", shape + "; LoRA = step with LoRA - step without (224 fresh "
            "base outputs), CPU time", "host_ms_lora_per_step", "ms", lora, lora)
        row("decode_step", f"{backend}:bound", shape + f"; the {n_calls} calls and the build alone (inputs not fresh)",
            "host_ms_per_step_calls_only", "ms", calls_cpu, calls_wall)
        row("decode_step", "base:no-lora", f"{LAYERS} layers x 7 base outputs (new_empty), CPU time", "host_ms_per_step",
            "ms", base, base)
        b, s_ = _q(calls["bound"][0]), _q(lora)
        summary[backend] = (b["median"], s_["median"])
        print(f"  {backend:6s} BoundLoRA call {b['median']:7.2f} us CPU (p20 {b['p20']:.2f}, p80 {b['p80']:.2f}; "
              f"wall {_q(calls['bound'][1])['median']:.2f}); add_lora {_q(calls['add_lora'][0])['median']:7.2f} us; "
              f"decode step: LoRA {s_['median']:.2f} ms CPU (step {_q(with_l)['median']:.2f} - base "
              f"{_q(base)['median']:.2f}); the calls alone {_q(calls_cpu)['median']:.2f} ms CPU")
        for what in calls:
            if what.startswith("bound["):
                print(f"  {backend:6s} BoundLoRA call, {what[6:-1]}: {_q(calls[what][0])['median']:.2f} us CPU")
    if opts.out:
        common.write_rows(opts.out, rows, env)
        print(f"  rows -> {opts.out}")
    t = summary.get("triton", (float("nan"),) * 2)
    c = summary.get("cuda", (float("nan"),) * 2)
    step_ms = max(t[1], c[1]) if summary else float("nan")
    print(f"host us/call triton={t[0]:.2f} cuda={c[0]:.2f} step_ms={step_ms:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
