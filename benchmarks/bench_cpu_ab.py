"""Before / after of the native CPU kernels: two builds of the package timed in turn on one machine.

Each tree (a copy of the package with its built ``_cpu_sgmv`` extension, e.g. ``git archive`` of
an older commit plus its build) runs in its own worker process; the driver asks the workers for
one timing of one case in turn, rotating which goes first, for several rounds, and reports the
median of the round medians (p20/p80 over rounds). A shared machine's load then hits both trees
alike, which separate runs minutes apart cannot promise. The call timed is the bound native
plan (``cpu_ext._plan`` + ``Plan.add``, what a patched layer runs), with the metadata built
outside: only the kernel.

Cases (bf16 and fp32; ``rm``: the adapter pool's rank-major B, ``std``: the usual [S, N, R]):

    dec_h256        32 rows, 16 adapters x 2 rows, 256 -> 256, r = 16 (bench_hf_cpu_decode's layer)
    dec_4096_<b>    32 rows, 32 adapters, 4096 -> 4096, r = 16
    pre_512x1024_<b>  512 rows, 8 adapters x 64 rows, 1024 -> 1024, r = 16
    pre_256x256_r32_<b>  256 rows, 4 adapters x 64 rows, 256 -> 688, r = 32

    python -m benchmarks.bench_cpu_ab --tree before=/tmp/old@5923915 --tree after=.@HEAD --out ...

A tree is ``label=path@commit`` (the commit names the rows; ``@HEAD`` resolves in the path's
git repository). One torch thread by default (--threads).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r'''
import json, sys, time
tree, threads = sys.argv[1], int(sys.argv[2])
sys.path.insert(0, tree)
import torch
torch.set_num_threads(threads)
import openlora_kernels as olk
from openlora_kernels.ops import cpu_ext
mod = cpu_ext._module()
assert mod is not None, cpu_ext.unavailable_reason()

def case(T, U, K, N, R, dtype, layout, per):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, K, generator=g).to(dtype)
    y = torch.randn(T, N, generator=g).to(dtype)
    A = (torch.randn(U, R, K, generator=g) * K ** -0.5).to(dtype)
    B = (torch.randn(U, N, R, generator=g) * R ** -0.5).to(dtype)
    if layout == "rm":
        B = B.transpose(1, 2).contiguous().transpose(1, 2)
    idx = torch.arange(T) % U if per is None else torch.arange(T) // per
    sc = torch.ones(U)
    meta = olk.build_batch_meta(idx, U, block_m=1)
    plan, keep = cpu_ext._plan(mod.OP_ADD, dtype, K, R, U, [A], [B], sc, None)
    _, srt, seg, _ = cpu_ext._meta_ptrs(meta)
    args = (T, x.data_ptr(), x.stride(0), 1, y.data_ptr(), y.stride(0), 1, srt, seg)
    keep = (x, y, A, B, sc, meta, keep)
    return lambda: plan.add(*args), keep

cases = json.loads(sys.argv[3])
fns = {}
for name, (T, U, K, N, R, dt, layout, per) in cases.items():
    fns[name] = case(T, U, K, N, R, getattr(torch, dt), layout, per)
for f, _ in fns.values():
    for _ in range(3):
        f()
print(json.dumps({"ready": list(fns)}), flush=True)
for line in sys.stdin:
    name, reps = line.split()
    f = fns[name][0]
    ts = []
    for _ in range(int(reps)):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    print(json.dumps(ts[len(ts) // 2] * 1e6), flush=True)
'''


def cases():
    out = {}
    for dt, dn in (("bfloat16", "bf16"), ("float32", "f32")):
        out[f"dec_h256_{dn}"] = (32, 16, 256, 256, 16, dt, "rm", None)
        for lay in ("rm", "std"):
            out[f"dec_4096_{lay}_{dn}"] = (32, 32, 4096, 4096, 16, dt, lay, None)
            out[f"pre_512x1024_{lay}_{dn}"] = (512, 8, 1024, 1024, 16, dt, lay, 64)
            out[f"pre_256x256_r32_{lay}_{dn}"] = (256, 4, 256, 688, 32, dt, lay, 64)
    return out


def resolve(spec: str):
    label, rest = spec.split("=", 1)
    path, _, commit = rest.partition("@")
    path = os.path.abspath(path)
    if commit in ("", "HEAD"):
        try:
            commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=path, capture_output=True,
                                    text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return label, path, commit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", required=True, help="label=path@commit (two or more)")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="CSV to append rows to (default: print only)")
    args = ap.parse_args(argv)
    from benchmarks.common import env_info, write_rows
    import torch

    trees = [resolve(t) for t in args.tree]
    plan = cases()
    procs = {}
    for label, path, _ in trees:
        env = dict(os.environ, PYTHONPATH=path)
        procs[label] = subprocess.Popen([sys.executable, "-c", WORKER, path, str(args.threads), json.dumps(plan)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        ready = procs[label].stdout.readline()
        if not ready:
            raise SystemExit(f"tree {label} ({path}): the worker did not start")
    res = {(lb, c): [] for lb in procs for c in plan}
    labels = list(procs)
    for r in range(args.rounds):
        order = labels[r % len(labels):] + labels[:r % len(labels)]
        for c in plan:
            for lb in order:
                p = procs[lb]
                p.stdin.write(f"{c} {args.reps}\n")
                p.stdin.flush()
                res[(lb, c)].append(json.loads(p.stdout.readline()))
        print(f"  round {r + 1}/{args.rounds}", flush=True)
    for p in procs.values():
        p.stdin.close()
        p.wait()
    first = labels[0]
    print(f"{'case':26s} " + " ".join(f"{lb:>12s}" for lb in labels) + f"   (µs; last / {first})")
    rows = []
    for c in plan:
        med = {}
        for lb, _, commit in trees:
            us = res[(lb, c)]
            q = statistics.quantiles(us, n=10, method="inclusive") if len(us) > 1 else [us[0]] * 9
            med[lb] = statistics.median(us)
            T, U, K, N, R, dt, lay, per = plan[c]
            rows.append({"benchmark": "cpu_ab", "kernel": "add_lora_plan", "contender": lb, "shape": c,
                         "metric": "latency", "unit": "us", "median": med[lb], "p20": q[1], "p80": q[7],
                         "tree_commit": commit, "T": T, "adapters": U, "K": K, "N": N, "R": R, "dtype": dt,
                         "b_layout": "rank-major" if lay == "rm" else "usual", "rounds": args.rounds,
                         "threads": args.threads})
        print(f"{c:26s} " + " ".join(f"{med[lb]:12.1f}" for lb in labels) + f"   {med[labels[-1]] / med[first]:.3f}")
    for r in rows:
        base = next(x["median"] for x in rows if x["shape"] == r["shape"] and x["contender"] == first)
        r["vs_" + first] = r["median"] / base
    if args.out:
        print("wrote", write_rows(args.out, rows, env_info(torch.device("cpu"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
