"""Adapter swap benchmark: time to bring an adapter into a device slot, against reloading a model.

The model and adapters are those of bench_model.py (``model_fixtures.py``: a random Llama-shaped
model, Llama-2-7B dims with ``--layers`` of its 32 layers on a GPU, tiny with ``--quick``; rank-16
adapters on all seven projections, saved by PEFT). Every state is forced through the public API
of ``olk.patch_model`` and checked with ``lm.memory_report()`` before each timed call (the check
is not timed):

  cold_disk           ``lm.load_adapter(name, peft_dir)`` + ``lm.acquire([name])``: read the
                      directory (config + safetensors), check and bind the adapter to the model,
                      keep a host copy (pinned on a GPU), copy it into a slot. The files' pages
                      are dropped from the OS page cache first (posix_fadvise DONTNEED), so the
                      bytes come from the disk. Between calls: ``release()`` +
                      ``unload_adapter(name)``.
  cold_page_cache     the same with the files in the OS page cache (a recently used adapter).
  reread_disk         an adapter registered earlier whose host copy the host budget dropped
                      (``patch_model(..., host_budget_bytes=0)``): ``acquire`` re-reads it from its
                      directory (pages dropped) into a slot; what a server with a small host
                      budget pays.
  warm                in host memory, not in a slot (``max_adapters=2`` slots, three adapters
                      acquired in turn, so each one was evicted since its last use): ``acquire``
                      copies host -> slot.
  hit                 already in a slot: ``acquire`` finds it there.
  model_reload_disk / model_reload_page_cache
                      every weight of the model from a safetensors file:
                      ``safetensors.torch.load_file(path, device)`` + ``model.load_state_dict``;
                      what swapping merged per-adapter copies of the model costs.

Times are wall clock (perf_counter) from the call to its end with the whole device synchronised
(``torch.cuda.synchronize``: the slot copies run on a side stream); medians, p20 and p80 in ms.
Rows: ``benchmarks/out/swap_<device>[_quick].csv`` (committed files: ``--out
benchmarks/results/<file>.csv``) with the bytes moved and GB/s.

    python -m benchmarks.bench_swap --quick              # CPU smoke run, seconds
    python -m benchmarks.bench_swap --budget-s 60        # GPU: 8 of 32 Llama-2-7B layers
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks import model_fixtures as mf  # noqa: E402

ADAPTER_STATES = ("cold_disk", "cold_page_cache", "reread_disk", "warm", "hit")
RELOAD_STATES = ("model_reload_page_cache", "model_reload_disk")
FULL = dict(reps=20, hit_reps=200, reload_reps=3, warmup=2)
QUICK = dict(reps=8, hit_reps=50, reload_reps=3, warmup=1)
ROTATE = 3        # adapters taken in turn for warm / reread (more than the 2 slots)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, few repetitions (CPU smoke run)")
    mf.add_model_args(p)
    p.add_argument("--reps", type=int, default=None, help="timed loads per adapter state (20; quick 8)")
    p.add_argument("--hit-reps", type=int, default=None)
    p.add_argument("--reload-reps", type=int, default=None, help="timed model reloads per state, at most (3)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--dir", default=None, help="where the adapters and the model file are written "
                   "(default: a new temporary folder); its filesystem is recorded in every row")
    p.add_argument("--budget-s", type=float, default=None,
                   help="from the start: no model reload (the slow part) begins after this; reloads stop early")
    p.add_argument("--out", default=None, help="CSV path (default <out-dir>/swap_<device>[_quick].csv)")
    p.add_argument("--out-dir", default=common.RESULTS_DIR,
                   help="folder of the default CSV path ($OPENLORA_BENCH_OUT, else benchmarks/out: untracked)")
    p.add_argument("--append", action="store_true",
                   help="append to --out instead of starting it afresh (a fresh file replaces the old one "
                        "only when the run ends)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 with --quick on a CPU)")
    return p.parse_args(argv)


class StateError(RuntimeError):
    """The pool was not in the state a timing needs (a bug in this benchmark or in the pool)."""


class SwapBench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        for k, v in (QUICK if args.quick else FULL).items():
            if getattr(args, k, None) is None:
                setattr(args, k, v)
        self.dims, self.device, self.dtype = mf.resolve(args)
        self.t0 = time.monotonic()
        self.env = common.env_info(self.device)
        slug = common.device_slug(self.device) + ("_quick" if args.quick else "")
        self.results = common.ResultsFile(args.out or os.path.join(args.out_dir, f"swap_{slug}.csv"), args.append)
        self.out = self.results.path
        self.rows_written = 0
        self._tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="olk_bench_swap_")
        self.root = args.dir or self._tmp.name
        os.makedirs(self.root, exist_ok=True)
        self.fs = mf.filesystem_of(self.root)
        self.shape = (f"hidden {self.dims.hidden}, intermediate {self.dims.intermediate}, {self.dims.layers} layers, "
                      f"vocab {self.dims.vocab}, r={args.rank}")

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def write(self, row: Dict[str, Any]) -> None:
        base = {"benchmark": "swap", "shape": self.shape, "layers": self.dims.layers, "model": self.dims.name,
                "rank": self.args.rank, "dtype": str(self.dtype).replace("torch.", ""), "fs": self.fs,
                "dir": self.root}
        self.results.write([{**base, **row}], self.env)
        self.rows_written += 1

    def sync(self) -> None:
        common.synchronize(self.device)

    # --------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        import openlora_kernels as olk

        a = self.args
        t = time.monotonic()
        self.model = mf.build_model(self.dims, self.device, self.dtype, a.seed)
        n = a.reps + a.warmup + 1      # cold loads use a fresh adapter each (the pages of each are dropped)
        self.names = mf.adapter_names(max(n, ROTATE))
        self.dirs = mf.save_peft_adapters(self.model, os.path.join(self.root, "adapters"), self.names, a.rank, a.seed)
        self.adapter_bytes = mf.adapter_bytes(self.dims, a.rank, self.dtype)
        self.file_bytes = sum(os.path.getsize(f) for f in mf.files_under(self.dirs[0]))
        self.lm = olk.patch_model(mf.share_weights_copy(self.model), max_adapters=2, max_rank=a.rank)
        self.lm_budget = olk.patch_model(mf.share_weights_copy(self.model), max_adapters=2, max_rank=a.rank,
                                         host_budget_bytes=0)
        print(f"model {self.dims.label()}; {len(self.names)} adapters of {self.adapter_bytes / 2**20:.2f} MiB "
              f"saved by PEFT under {self.root} ({self.fs}) in {time.monotonic() - t:.1f} s")

    def entry(self, lm, name: str):
        return next(x for x in lm.memory_report().adapters if x.name == name)

    def expect(self, lm, name: Optional[str], *, registered: bool, host: bool = False, slot: bool = False) -> None:
        """Raise StateError unless ``name`` is in the state asked (checked before a timed call)."""
        names = lm.adapters
        if not registered:
            if name in names:
                raise StateError(f"{name} should not be registered")
            return
        e = self.entry(lm, name)
        if e.in_host_memory != host or (e.slot is not None) != slot:
            raise StateError(f"{name}: expected host={host} slot={slot}, found host={e.in_host_memory} slot={e.slot}")

    # ---------------------------------------------------------------------------- adapters

    def time_state(self, state: str) -> Dict[str, float]:
        a = self.args
        it = {"i": 0}

        def name() -> str:
            return self.names[it["i"] % len(self.names)] if state.startswith("cold") else self.names[it["i"] % ROTATE]

        def path() -> str:
            return self.dirs[self.names.index(name())]

        if state.startswith("cold"):
            lm = self.lm
            for n in list(lm.adapters):
                lm.unload_adapter(n)

            def arrange():
                if state == "cold_disk":
                    mf.drop_page_cache(path())
                else:
                    _read_files(path())
                self.expect(lm, name(), registered=False)

            def step():
                lm.load_adapter(name(), path())
                lm.acquire([name()])

            def reset():
                lm.release()
                lm.unload_adapter(name())
                it["i"] += 1
                arrange()
        elif state == "reread_disk":
            lm = self.lm_budget
            for n in self.names[:ROTATE]:
                if n not in lm.adapters:
                    lm.load_adapter(n, self.dirs[self.names.index(n)])
            lm.acquire([self.names[ROTATE - 1]])     # the last one in a slot, so the turn starts elsewhere
            lm.release()

            def arrange():
                mf.drop_page_cache(path())
                self.expect(lm, name(), registered=True, host=False, slot=False)

            def step():
                lm.acquire([name()])

            def reset():
                lm.release()
                it["i"] += 1
                arrange()
        elif state in ("warm", "hit"):
            lm = self.lm
            for n in self.names[:ROTATE]:
                if n not in lm.adapters:
                    lm.load_adapter(n, self.dirs[self.names.index(n)])
            lm.acquire([self.names[ROTATE - 1]])
            lm.release()
            if state == "hit":
                lm.acquire([self.names[0]])
                lm.release()

            def arrange():
                if state == "warm":
                    self.expect(lm, name(), registered=True, host=True, slot=False)
                else:
                    self.expect(lm, self.names[0], registered=True, host=True, slot=True)

            def step():
                lm.acquire([name() if state == "warm" else self.names[0]])

            def reset():
                lm.release()
                it["i"] += 1
                arrange()
        else:
            raise ValueError(state)
        arrange()
        reps = a.hit_reps if state == "hit" else a.reps
        return common.time_steps(step, reset, self.device, reps=reps, warmup=a.warmup, clock="wall")

    def adapters(self) -> None:
        for state in ADAPTER_STATES:
            t = self.time_state(state)
            moved = self.file_bytes if state in ("cold_disk", "cold_page_cache", "reread_disk") else (
                0 if state == "hit" else self.adapter_bytes)
            self.write({"kernel": "adapter_to_slot", "contender": state, "metric": "latency", "unit": "ms",
                        "median": t["median"], "p20": t["p20"], "p80": t["p80"], "reps": t["reps"],
                        "adapter_bytes": self.adapter_bytes, "file_bytes": self.file_bytes, "bytes_moved": moved,
                        "gbps": moved / (t["median"] * 1e-3) / 1e9 if moved else None,
                        "page_cache": {"cold_disk": "dropped", "reread_disk": "dropped",
                                       "cold_page_cache": "cached"}.get(state, "n/a")})
            print(f"{state:>24}: {t['median']:9.3f} ms (p20 {t['p20']:.3f}, p80 {t['p80']:.3f}, {t['reps']} reps)")

    # ------------------------------------------------------------------------------- model

    def model_reload(self) -> None:
        from safetensors.torch import load_file, save_file

        a = self.args
        if a.budget_s is not None and self.elapsed() > a.budget_s:
            print(f"budget of {a.budget_s:.0f} s spent: model reload not timed")
            return
        path = os.path.join(self.root, "model.safetensors")
        t = time.monotonic()
        save_file({k: v.detach().contiguous() for k, v in self.model.state_dict().items()}, path)
        nbytes = os.path.getsize(path)
        print(f"model file {nbytes / 2**20:,.0f} MiB written in {time.monotonic() - t:.1f} s")
        dev = str(self.device)

        def step():
            sd = load_file(path, device=dev)
            self.model.load_state_dict(sd, strict=True)
            del sd

        for state in RELOAD_STATES:
            drop = state.endswith("_disk")
            samples: List[float] = []
            for i in range(a.reload_reps + 1):           # the first is a warm-up (untimed) for the cached state
                if drop:
                    mf.drop_page_cache(path)
                elif i == 0:
                    _read_files(path)
                gc.collect()
                self.sync()
                t0 = time.perf_counter()
                step()
                self.sync()
                ms = (time.perf_counter() - t0) * 1e3
                if i > 0 or drop:
                    samples.append(ms)
                if a.budget_s is not None and self.elapsed() > a.budget_s and samples:
                    break
                if len(samples) >= a.reload_reps:
                    break
            q = common.quantiles(samples)
            self.write({"kernel": "model_reload", "contender": state, "metric": "latency", "unit": "ms", **q,
                        "reps": len(samples), "model_bytes": nbytes, "bytes_moved": nbytes,
                        "param_bytes": mf.param_bytes(self.model), "gbps": nbytes / (q["median"] * 1e-3) / 1e9,
                        "page_cache": "dropped" if drop else "cached"})
            print(f"{state:>24}: {q['median']:9.1f} ms ({len(samples)} reps, {nbytes / (q['median'] * 1e-3) / 1e9:.2f} GB/s)")
        os.remove(path)


def _read_files(path: str) -> None:
    """Read every file under ``path`` once (brings it into the OS page cache)."""
    for f in mf.files_under(path):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def main(argv=None) -> int:
    from benchmarks import report

    args = parse_args(argv)
    with common.cpu_threads(args.quick, args.device, args.threads), torch.no_grad():
        b = SwapBench(args)
        print(f"device: {b.env['device']} | torch {b.env['torch']} | commit {b.env['commit']} | out {b.out}")
        with b.results:      # the rows replace an old file only if the run gets to its end
            common.progress("bench_swap: writing the adapters and the model file")
            b.setup()
            common.progress(f"bench_swap: timing the adapter loads ({b.elapsed():.0f} s so far)")
            b.adapters()
            common.progress(f"bench_swap: timing the whole-model reloads ({b.elapsed():.0f} s so far)")
            b.model_reload()
        print(f"\n{b.rows_written} rows -> {b.out} ({b.elapsed():.0f} s)")
        return common.finish(lambda: report.swap_summary(common.read_rows(b.out)), [])


if __name__ == "__main__":
    sys.exit(main())
