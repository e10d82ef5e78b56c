"""Serving while an adapter is prefetched from a slow source (CPU).

    python -m benchmarks.bench_prefetch [--out benchmarks/results/prefetch_cpu.csv]

A patched random Llama-shaped model (hidden 256, 4 layers, rank-16 adapters on all seven
projections) serves decode batches (32 rows, one token) of 8 resident adapters. Each round times
ten such forwards in three conditions, in rotating order:

  idle          nothing else happens
  prefetch      ``lm.prefetch({name: source})`` was called just before; the source sleeps
                ``--delay`` seconds (a slow disk or the Hub) and then reads a PEFT directory
  blocking_load another thread runs ``lm.load_adapter(name, source)`` with the same source (what a
                serving stack without prefetch does from a loader thread)

and, after the ten forwards, the first forward that uses the new adapter:

  first_use_prefetched   after the prefetch ended (its read and its copy into a slot are done)
  first_use_cold         an adapter registered while its host copy is dropped (host budget 0),
                         so the first use reads the slow source inside the forward

Rows: median over rounds of the ten forwards' time per condition, and of the first uses; the
summary line gives prefetch / idle (target: no slower, within the machine's noise).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

import torch

from . import common
from .model_fixtures import Dims, build_model, save_peft_adapters

RESULTS = os.path.join(common.RESULTS_DIR, "prefetch_cpu.csv")


class SlowSource:
    """Callable source: sleep, then read a PEFT directory; counts its reads."""

    def __init__(self, path: str, delay: float):
        self.path, self.delay, self.reads = path, delay, 0

    def __call__(self):
        from openlora_kernels.adapters import read_adapter_dir

        self.reads += 1
        time.sleep(self.delay)
        return read_adapter_dir(self.path)


def main(argv=None) -> int:
    import openlora_kernels as olk

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_prefetch", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--delay", type=float, default=0.5, help="seconds the slow source sleeps before reading")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="CSV to append rows to (default: print only)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    dims = Dims(hidden=256, intermediate=688, heads=4, kv_heads=4, vocab=1024, layers=4, name="Llama-shaped")
    base = build_model(dims, torch.device("cpu"), torch.float32)
    resident = [f"r{i}" for i in range(8)]
    extra = [f"p{i}" for i in range(2 * args.rounds + 2)]
    failures = []
    with tempfile.TemporaryDirectory() as root:
        dirs = dict(zip(resident + extra, save_peft_adapters(base, root, resident + extra, rank=16)))
        lm = olk.patch_model(base, max_adapters=10, max_rank=16)
        for n in resident:
            lm.load_adapter(n, dirs[n], pin=True)
        ids = torch.randint(0, dims.vocab, (32, 1), generator=torch.Generator().manual_seed(1))
        rows = [resident[i % len(resident)] for i in range(32)]
        with torch.no_grad():
            want = lm(input_ids=ids, adapter_names=rows).logits

        def ten():
            t0 = time.perf_counter()
            for _ in range(10):
                with torch.no_grad():
                    out = lm(input_ids=ids, adapter_names=rows).logits
            dt = (time.perf_counter() - t0) * 1e3
            if not torch.equal(out, want):
                failures.append("a forward of resident adapters changed while another adapter was loaded")
            return dt

        def first_use(name):
            t0 = time.perf_counter()
            with torch.no_grad():
                lm(input_ids=ids[:1], adapter_names=[name])
            return (time.perf_counter() - t0) * 1e3

        with torch.no_grad():
            for _ in range(3):
                lm(input_ids=ids, adapter_names=rows)
        times = {k: [] for k in ("idle", "prefetch", "blocking_load", "first_use_prefetched", "first_use_cold")}
        names = iter(extra)
        conditions = ["idle", "prefetch", "blocking_load"]
        for r in range(args.rounds):
            for cond in conditions[r % 3:] + conditions[:r % 3]:
                if cond == "idle":
                    times[cond].append(ten())
                elif cond == "prefetch":
                    name = next(names)
                    src = SlowSource(dirs[name], args.delay)
                    handle = lm.prefetch({name: src})
                    times[cond].append(ten())
                    handle.wait(60)
                    times["first_use_prefetched"].append(first_use(name))
                    if src.reads != 1:
                        failures.append(f"{name}: its first use after the prefetch read its source again")
                    lm.unload_adapter(name)
                else:
                    name = next(names)
                    src = SlowSource(dirs[name], args.delay)
                    t = threading.Thread(target=lm.load_adapter, args=(name, src))
                    t.start()
                    times[cond].append(ten())
                    t.join(60)
                    lm.unload_adapter(name)
            # cold first use: registered, host copy dropped (the source is read inside the forward)
            name = f"cold{r}"
            src = SlowSource(dirs[extra[r]], args.delay)
            lm.load_adapter(name, src)
            lm.pool._entries[name].host = None          # as the host budget would drop it
            times["first_use_cold"].append(first_use(name))
            lm.unload_adapter(name)
            print(f"\rround {r + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)

    q = {k: common.quantiles(v) for k, v in times.items()}
    for k, v in q.items():
        what = "ten forwards" if not k.startswith("first") else "one forward"
        print(f"{k:>22}: {v['median']:9.2f} ms {what} (p20 {v['p20']:.2f}, p80 {v['p80']:.2f})")
    ratio = q["prefetch"]["median"] / q["idle"]["median"]
    spread = q["idle"]["p80"] / q["idle"]["p20"]
    print(f"ten forwards during a prefetch took {ratio:.2f}x their idle time (idle p80/p20 = {spread:.2f}); "
          f"a prefetched adapter's first use took {q['first_use_prefetched']['median']:.1f} ms, a cold one "
          f"{q['first_use_cold']['median']:.1f} ms")
    if args.out:
        shape = f"rows=32,tokens=1,hidden=256,layers=4,r=16,resident=8,delay_s={args.delay}"
        out = [{"benchmark": "prefetch", "kernel": "model_forward", "contender": k, "shape": shape,
                "metric": "latency_10_forwards" if not k.startswith("first") else "latency_first_use",
                "unit": "ms", **v, "prefetch_over_idle": round(ratio, 3), "rounds": args.rounds}
               for k, v in q.items()]
        print("wrote", common.write_rows(args.out, out, common.env_info(torch.device("cpu"))))
    for f in failures[:5]:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
