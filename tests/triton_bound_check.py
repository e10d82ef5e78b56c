"""Check, without a GPU, that a Triton bound plan launches exactly what the JIT would.

Run WITHOUT TRITON_INTERPRET (the kernels are compiled for sm_90 offline; benchmarks/host_stub.py
stands in for the driver). For each case a BoundLoRA makes a first call (the JIT path, which
records the plan) and a second (the bound plan); both reach Triton's C launcher, whose
arguments are recorded: grid, stream, function and every kernel argument must be identical.
A third and fourth call with another batch (another tile count) check a second plan key. Both
decode plans: the fused kernel (one launch per slice group) and the segment plan (shrink then
expand per slice group, ops/triton_segment.py). Exits 1
on a mismatch; prints "triton_bound_check: N cases, 0 failed".

    python tests/triton_bound_check.py [--quick]
"""
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("triton_bound_check: unset TRITON_INTERPRET")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import openlora_kernels as olk  # noqa: E402
from benchmarks.host_stub import stub_triton  # noqa: E402

# (dtype, slice widths, ranks kind, B layout, rows per batch, slots)
CASES = [
    (torch.bfloat16, (96,), "per_slot", "pool", (4, 7), 8),
    (torch.float16, (64, 32, 32), "none", "standard", (3, 6), 4),
    (torch.float32, (48, 16, 8, 8, 24), "per_slice", "pool", (5, 2), 6),
]


def weights(dt, widths, rk, layout, S, R=16, K=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(S, R, K, generator=g).to(dt) for _ in widths]
    if layout == "pool":                       # [S, R, N] storage, the [S, N, R] view
        b = [torch.randn(S, R, w, generator=g).to(dt).transpose(1, 2) for w in widths]
    else:
        b = [torch.randn(S, w, R, generator=g).to(dt) for w in widths]
    ranks = {"none": None, "per_slot": torch.randint(0, R + 1, (S,), generator=g, dtype=torch.int32),
             "per_slice": torch.randint(0, R + 1, (len(widths), S), generator=g)}[rk]
    return a, b, torch.rand(S, generator=g), ranks


def main() -> int:
    failures, n = [], 0
    cases = [(*c, plan) for plan in ("fused", "segment") for c in (CASES[:1] if "--quick" in sys.argv else CASES)]
    for dt, widths, rk, layout, rows, S, plan in cases:
        os.environ["OPENLORA_TRITON_DECODE"] = plan      # the decode plan under test (triton_segment.decode_plan)
        record = []
        with stub_triton(record), torch.no_grad():
            a, b, sc, ranks = weights(dt, widths, rk, layout, S)
            la, lb = (a, b) if len(widths) > 1 else (a[0], b[0])
            op = olk.BoundLoRA(la, lb, sc, ranks, backend="triton")
            for T in rows:
                x, y = torch.randn(T, a[0].shape[2]).to(dt), torch.randn(T, sum(widths)).to(dt)
                meta = olk.build_batch_meta(torch.arange(T) % S, S)
                start = len(record)
                hits = op._bound.plan_hits
                op(y, x, meta)               # the JIT path (records the plan)
                mid = len(record)
                op(y, x, meta)               # the bound plan
                first, second = record[start:mid], record[mid:]
                n += 1
                what = f"{plan}: {dt} widths={widths} ranks={rk} B={layout} T={T} block_m={meta.block_m}"
                per_call = -(-len(widths) // 4) * (2 if plan == "segment" else 1)
                if op._bound.plan_hits != hits + 1:
                    failures.append(f"{what}: the second call did not take the bound plan")
                elif not first or first != second:
                    failures.append(f"{what}: launches differ\n  jit:   {first}\n  bound: {second}")
                elif len(first) != per_call:
                    failures.append(f"{what}: {len(first)} launches per call, expected {per_call} ({plan} plan)")
    print(f"triton_bound_check: {n} cases, {len(failures)} failed")
    for f in failures:
        print("FAILED", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
