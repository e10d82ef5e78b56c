"""A/B of two checkouts of this library on one workload, interleaved forward by forward (CPU).

    python -m benchmarks.bench_ab --before /path/to/old/checkout [--after .] [--rounds 150]

A shared machine's load drifts over seconds, so two benchmark runs one after the other compare the
load more than the code. Here each checkout runs in its own worker process (its openlora_kernels
first on sys.path), both build the same workload with the same seeds (bench_hf_cpu_decode's decode
step: 32 rows, one token, 16 rank-16 adapters on all seven projections of a random Llama-shaped
model), and the parent asks them in turn for a few timed forwards: A, B, A, B, ... Every round
times ``--reps`` forwards of the base model and of the patched model in each worker, so a load
spike hits both checkouts alike. Reported per checkout: the median forward, its ratio to the base
model timed in the same worker, and the median over rounds of the paired ratio after/before.
Before the timings, the patched logits of both are compared with PEFT's (in the worker) and with
each other.

Rows go to ``--out`` (benchmark ``ab_hf_cpu_decode``; ``commit`` is the checkout's own commit).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The worker: openlora_kernels from CHECKOUT (imported first, so the workload's
# ``import openlora_kernels`` finds it in sys.modules), the workload from this file's checkout.
_WORKER = r"""
import json, os, sys, time
checkout, here, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, checkout)
import torch
torch.set_num_threads(threads)
import openlora_kernels
assert os.path.realpath(openlora_kernels.__file__).startswith(os.path.realpath(checkout)), openlora_kernels.__file__
sys.path.insert(0, here)
import argparse
from benchmarks.bench_hf_cpu_decode import build
args = argparse.Namespace(**json.loads(sys.argv[4]))
base, lm, peft_model, names = build(args)
ids = torch.randint(0, args.vocab, (args.rows, 1), generator=torch.Generator().manual_seed(1))
rows = [names[i % len(names)] for i in range(args.rows)]
with torch.no_grad():
    ours = lm(input_ids=ids, use_cache=False, adapter_names=rows).logits
    ref = peft_model(input_ids=ids, use_cache=False, adapter_names=rows).logits
commit = __import__("subprocess").run(["git", "rev-parse", "--short=12", "HEAD"], cwd=checkout,
                                      capture_output=True, text=True).stdout.strip() or "unknown"
dirty = __import__("subprocess").run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=checkout,
                                     capture_output=True, text=True).stdout.strip()
print(json.dumps({"ready": True, "diff_vs_peft": (ours - ref).abs().max().item(),
                  "logits": ours.flatten()[:: max(1, ours.numel() // 4096)].tolist(),
                  "commit": commit + ("+dirty" if dirty else "")}), flush=True)
fns = {"base": lambda: base(input_ids=ids, use_cache=False),
       "openlora": lambda: lm(input_ids=ids, use_cache=False, adapter_names=rows)}
with torch.no_grad():
    for fn in fns.values():
        for _ in range(3):
            fn()
    for line in sys.stdin:
        reps = int(line)
        out = {}
        for name, fn in fns.items():
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            out[name] = sorted(ts)[len(ts) // 2]
        print(json.dumps(out), flush=True)
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_ab", description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="a checkout of this repository (e.g. a git worktree at an old commit)")
    ap.add_argument("--after", default=HERE, help="another checkout (default: this one)")
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--reps", type=int, default=5, help="forwards per contender per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="CSV to append rows to (default: print only)")
    args = ap.parse_args(argv)
    for flag in ("before", "after"):
        path = getattr(args, flag)
        if not os.path.isfile(os.path.join(path, "openlora_kernels", "__init__.py")):
            raise SystemExit(f"--{flag}: {path!r} is not a checkout of openlora_kernels")
    workload = dict(rows=32, hidden=256, intermediate=688, layers=4, heads=4, vocab=1024, adapters=16, rank=16)

    procs, info = {}, {}
    for who in ("before", "after"):
        procs[who] = subprocess.Popen(
            [sys.executable, "-c", _WORKER, os.path.abspath(getattr(args, who)), HERE, str(args.threads),
             json.dumps(workload)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ""})
    try:
        for who, p in procs.items():
            line = p.stdout.readline()
            if not line:
                raise SystemExit(f"{who}: the worker exited before it was ready (rc {p.wait()})")
            info[who] = json.loads(line)
        same = max(abs(a - b) for a, b in zip(info["before"]["logits"], info["after"]["logits"]))
        for who in procs:
            print(f"{who:>6}: commit {info[who]['commit']}, max |ours - peft| = {info[who]['diff_vs_peft']:.3g}")
        print(f"max |after - before| over sampled logits = {same:.3g}")
        times = {who: {"base": [], "openlora": []} for who in procs}
        for r in range(args.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for who in order:
                procs[who].stdin.write(f"{args.reps}\n")
                procs[who].stdin.flush()
                got = json.loads(procs[who].stdout.readline())
                for k, v in got.items():
                    times[who][k].append(v)
            print(f"\rround {r + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait(timeout=60)

    def q(v):
        qs = statistics.quantiles(v, n=10, method="inclusive")
        return {"median": statistics.median(v), "p20": qs[1], "p80": qs[7]}

    paired = [a / b for a, b in zip(times["after"]["openlora"], times["before"]["openlora"])]
    rows = []
    for who in procs:
        ol, bs = q(times[who]["openlora"]), q(times[who]["base"])
        vs_base = statistics.median(o / b for o, b in zip(times[who]["openlora"], times[who]["base"]))
        print(f"{who:>6}: openlora {ol['median']:.3f} ms (p20 {ol['p20']:.3f}, p80 {ol['p80']:.3f}); base "
              f"{bs['median']:.3f} ms; ours took {vs_base:.3f}x the base model's time (median of paired rounds)")
        rows.append({"who": who, "commit_of_checkout": info[who]["commit"], "openlora": ol, "base": bs,
                     "vs_base": vs_base})
    pq = q(paired)
    print(f"after / before = {pq['median']:.3f} (p20 {pq['p20']:.3f}, p80 {pq['p80']:.3f}) over {args.rounds} paired rounds")
    if args.out:
        import torch

        sys.path.insert(0, HERE)
        from benchmarks.common import env_info, write_rows

        env = env_info(torch.device("cpu"))
        shape = ",".join(f"{k}={v}" for k, v in workload.items()) + ",tokens=1,targets=7"
        out = []
        for r in rows:
            for contender in ("openlora", "base"):
                out.append({"benchmark": "ab_hf_cpu_decode", "kernel": "model_forward",
                            "contender": f"{contender}@{r['who']}", "shape": shape, "metric": "latency", "unit": "ms",
                            **r[contender], **{**env, "commit": r["commit_of_checkout"]},
                            "ours_over_base": round(r["vs_base"], 3), "after_over_before": round(pq["median"], 3),
                            "rounds": args.rounds, "reps": args.reps})
        print("wrote", write_rows(args.out, out, {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
