"""Shared helpers of the benchmark scripts: environment facts, timing, and the results files.

Every row a benchmark writes carries the device, the versions and the git commit, so a figure
quoted in docs/ can always be traced to the run that produced it. Rows go to CSV files with the
columns in ``COLUMNS``; ``plot.py`` and ``report.py`` read them.

Where: by default under ``RESULTS_DIR``, an untracked folder (``$OPENLORA_BENCH_OUT``, else
benchmarks/out/, git-ignored), so a run never dirties the tree. The committed results live in
``COMMITTED_DIR`` (benchmarks/results/); writing there is an explicit ``--out
benchmarks/results/<file>.csv``. No run deletes or truncates a results file, even interrupted:
:func:`write_rows` appends through a temporary file renamed over the old one, and
:class:`ResultsFile` stages a run that starts a file afresh beside it until the run ends.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
COMMITTED_DIR = os.path.join(_HERE, "results")      # committed results: written only with an explicit --out
RESULTS_DIR = os.environ.get("OPENLORA_BENCH_OUT") or os.path.join(_HERE, "out")   # default output, untracked
COLUMNS = ["benchmark", "kernel", "contender", "shape", "metric", "median", "p20", "p80", "unit",
           "device", "torch", "triton", "cuda", "commit", "date", "extra"]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def env_info(device: Optional[torch.device] = None) -> Dict[str, str]:
    """Device name (GPU, or 'CPU: <model>, <n> threads'), versions, commit and date."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU: {_cpu_name()}, {torch.get_num_threads()} threads"
    try:
        import triton
        triton_v = triton.__version__
    except Exception:  # pragma: no cover
        triton_v = "absent"
    return {"device": name, "torch": torch.__version__, "triton": triton_v,
            "cuda": torch.version.cuda or "none", "commit": git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def quantiles(samples: List[float]) -> Dict[str, float]:
    """median, p20, p80 of a list of timings."""
    s = sorted(samples)
    q = statistics.quantiles(s, n=10, method="inclusive") if len(s) > 1 else [s[0]] * 9
    return {"median": statistics.median(s), "p20": q[1], "p80": q[7]}


def time_cpu(fn: Callable[[], Any], *, warmup: int = 3, reps: int = 20, min_time_s: float = 0.0) -> Dict[str, float]:
    """Wall-clock timings of ``fn`` in milliseconds (median, p20, p80) on the CPU."""
    for _ in range(warmup):
        fn()
    samples: List[float] = []
    start = time.perf_counter()
    while len(samples) < reps or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return quantiles(samples)


def _csv_lines(rows: Iterable[Dict[str, Any]], env: Dict[str, str], header: bool) -> str:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    if header:
        w.writeheader()
    for row in rows:
        extra = {k: v for k, v in row.items() if k not in COLUMNS}
        out = {**env, **{k: v for k, v in row.items() if k in COLUMNS}}
        if extra:
            out["extra"] = json.dumps(extra, sort_keys=True)
        w.writerow(out)
    return buf.getvalue()


def write_rows(path: str, rows: Iterable[Dict[str, Any]], env: Optional[Dict[str, str]] = None) -> str:
    """Append rows (dicts with some of COLUMNS; anything else goes into 'extra' as JSON) to a CSV.

    Atomic: the old contents and the new rows go to a temporary file beside ``path`` that then
    replaces it, so an interrupted call leaves the file as it was (never truncated, never half a
    row). A file whose header is not ``COLUMNS`` is refused (ValueError naming it)."""
    env = env or env_info()
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    old = None
    if os.path.exists(path):
        with open(path, newline="", encoding="utf-8") as f:
            old = f.read()
        first = old.splitlines()[0] if old else ""
        if old and next(csv.reader([first])) != COLUMNS:
            raise ValueError(f"write_rows: {path} is not a results file of these columns (header {first[:80]!r})")
    text = _csv_lines(rows, env, header=not old)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            if old:
                f.write(old if old.endswith("\n") else old + "\n")
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if old is not None:
            shutil.copymode(path, tmp)
        else:                                      # mkstemp makes it 0600: give it the usual mode
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


class ResultsFile:
    """The results file of one benchmark run: ``write(rows)`` as they are measured, ``close()`` at the end.

    ``append=True``: rows are appended to ``path`` as they come (each write atomic).
    ``append=False`` (the run starts the file afresh): when ``path`` does not exist yet the rows go
    straight there; when it does, they go to ``path + ".partial"``, which replaces ``path`` only at
    ``close()``. A run that does not reach ``close()`` (interrupted, killed, failed) leaves the
    old file exactly as it was, and what it measured in the ``.partial`` file. As a context
    manager it closes on a normal exit only."""

    def __init__(self, path: str, append: bool = False):
        self.path = os.path.abspath(path)
        self.append = append
        fresh_over_old = not append and os.path.exists(self.path)
        self.staging = self.path + ".partial" if fresh_over_old else self.path
        if fresh_over_old and os.path.exists(self.staging):
            os.remove(self.staging)            # what an earlier unfinished run left
        self.rows = 0
        self.closed = False

    def write(self, rows: Iterable[Dict[str, Any]], env: Optional[Dict[str, str]] = None) -> None:
        if self.closed:
            raise RuntimeError(f"ResultsFile: {self.path} is closed")
        rows = list(rows)
        write_rows(self.staging, rows, env)
        self.rows += len(rows)

    def close(self) -> str:
        """Put the run's rows in place (a staged fresh file replaces the old one); returns the path."""
        if not self.closed and self.staging != self.path and os.path.exists(self.staging):
            os.replace(self.staging, self.path)
        self.closed = True
        return self.path

    def __enter__(self) -> "ResultsFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self.staging != self.path and os.path.exists(self.staging):
            progress(f"run not finished: {self.path} left as it was; its {self.rows} rows are in {self.staging}")


def progress(msg: str) -> None:
    """A progress line on stderr (stdout keeps the results), with the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def read_rows(path: str) -> List[Dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("median", "p20", "p80"):
            if r.get(k) not in (None, ""):
                r[k] = float(r[k])
        r["extra"] = json.loads(r["extra"]) if r.get("extra") else {}
    return rows


# ------------------------------------------------------------------------------------------
# Device timing, cache rotation and the two ceilings (added for bench_kernels.py; device-neutral:
# CUDA events on a GPU, perf_counter on the CPU). Times are in milliseconds, like time_cpu.
# ------------------------------------------------------------------------------------------


def device_slug(device: Optional[torch.device] = None) -> str:
    """A file-name-safe name of the device: 'NVIDIA_H100_80GB_HBM3', or 'cpu'."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "cuda"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(device: torch.device) -> int:
    """Size of the last cache level repeated calls would hit: the GPU's L2 (50 MB on an H100),
    the CPU's largest cache from sysfs (32 MB when unknown)."""
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return int(size) if size else 50 * 2**20
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size"), encoding="utf-8") as f:
                    text = f.read().strip().upper()
            except OSError:
                continue
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            digits = text.rstrip("KMG")
            if digits.isdigit():
                best = max(best, int(digits) * mult)
    except OSError:
        pass
    return best or 32 * 2**20


def rotation_sets(set_bytes: int, cache: int, *, factor: float = 2.0, min_sets: int = 2, max_sets: int = 512,
                  max_total_bytes: Optional[int] = None) -> int:
    """How many input sets to cycle through so that a set has left the cache before it is used
    again: the other n - 1 sets together hold ``factor`` x the cache size. Bounded by
    ``max_sets`` and by ``max_total_bytes`` of memory (check ``(n - 1) * set_bytes >= cache``
    to know whether the bound cut the rotation short)."""
    set_bytes = max(1, int(set_bytes))
    n = -(-int(factor * cache) // set_bytes) + 1
    n = max(min_sets, min(max_sets, n))
    if max_total_bytes is not None:
        n = min(n, max(1, int(max_total_bytes) // set_bytes))
    return max(1, n)


def _reps_for(est_ms: float, budget_ms: float, min_reps: int, max_reps: int) -> int:
    if est_ms <= 0:
        return max_reps
    return int(max(min_reps, min(max_reps, budget_ms / est_ms)))


def time_rotating(fn: Callable[[int], Any], n_sets: int, device: torch.device, *, budget_ms: float = 100.0,
                  min_reps: int = 10, max_reps: int = 300, warmup: int = 3) -> Dict[str, float]:
    """Time ``fn(j)`` (j cycles over the ``n_sets`` input sets) call by call, in ms.

    The first call (compilation, first-touch) and ``warmup`` more are not timed; they also give
    an estimate that sets the number of repetitions (``budget_ms`` of timed calls, between
    ``min_reps`` and ``max_reps``). On a GPU every call sits between its own pair of CUDA events,
    so host overhead between the events (Python, launch) is part of the time: this is the eager
    time a caller sees. Returns median, p20, p80, reps and first_call_ms.
    """
    t0 = time.perf_counter()
    fn(0)
    synchronize(device)
    first_ms = (time.perf_counter() - t0) * 1e3
    n_warm = max(1, warmup)
    t0 = time.perf_counter()
    for i in range(n_warm):
        fn((i + 1) % n_sets)
    synchronize(device)
    est = (time.perf_counter() - t0) * 1e3 / n_warm
    reps = _reps_for(est, budget_ms, min_reps, max_reps)
    start_at = (n_warm + 1) % n_sets
    samples: List[float] = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            starts[i].record()
            fn((start_at + i) % n_sets)
            ends[i].record()
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for i in range(reps):
            t = time.perf_counter()
            fn((start_at + i) % n_sets)
            samples.append((time.perf_counter() - t) * 1e3)
    return {**quantiles(samples), "reps": reps, "first_call_ms": first_ms}


def time_cuda_graph(fn: Callable[[int], Any], n_sets: int, device: torch.device, *, budget_ms: float = 100.0,
                    min_reps: int = 5, max_reps: int = 100, min_calls: int = 32) -> Dict[str, float]:
    """Time ``fn`` replayed from a CUDA graph, in ms per call: launch gaps and host overhead gone.

    One graph holds ``calls`` >= ``min_calls`` calls cycling over the input sets (so the rotation
    still defeats the L2); each replay sits between CUDA events and its time / calls is one
    sample. ``fn`` must be capturable (no host syncs, no CPU tensors created on the fly).
    """
    if device.type != "cuda":
        raise RuntimeError("time_cuda_graph needs a CUDA device")
    calls = n_sets * max(1, -(-min_calls // n_sets))
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the capturing stream (allocator, lazy init)
        for j in range(min(n_sets, 3)):
            fn(j)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in range(calls):
            fn(c % n_sets)
    graph.replay()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize(device)
    est = (time.perf_counter() - t0) * 1e3
    reps = _reps_for(est, budget_ms, min_reps, max_reps)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize(device)
    samples = [s.elapsed_time(e) / calls for s, e in zip(starts, ends)]
    del graph
    return {**quantiles(samples), "reps": reps, "calls_per_graph": calls}


def measure_copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, reps: int = 20) -> Dict[str, float]:
    """Memory bandwidth in GB/s (1e9 B/s) from a large copy on ``device`` (bytes read + written).

    Default size: 1 GiB on a GPU (far beyond any L2), 64 MiB on the CPU. The source holds random
    bytes, never zeros. Returns median, p20, p80 GB/s and the bytes copied.
    """
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**26
    src = torch.randint(0, 256, (int(nbytes),), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = time_rotating(lambda j: dst.copy_(src), 1, device, budget_ms=0.0, min_reps=reps, max_reps=reps)
    gbps = {k: 2 * nbytes / (timing[k] * 1e-3) / 1e9 for k in ("median", "p20", "p80")}
    # a longer time is a lower bandwidth: p20 of bandwidth comes from p80 of time
    return {"median": gbps["median"], "p20": gbps["p80"], "p80": gbps["p20"], "bytes": 2 * nbytes,
            "reps": timing["reps"]}


def measure_matmul_tflops(device: torch.device, n: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                          reps: int = 10) -> Dict[str, Any]:
    """Dense matmul rate in TFLOP/s on random data: n x n x n in bf16 (8192) on a GPU, float32
    (512) on the CPU. Returns median, p20, p80 TFLOP/s, n and dtype."""
    if n is None:
        n = 8192 if device.type == "cuda" else 512
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing = time_rotating(lambda j: torch.mm(a, b), 1, device, budget_ms=0.0, min_reps=reps, max_reps=reps)
    flop = 2.0 * n ** 3
    tf = {k: flop / (timing[k] * 1e-3) / 1e12 for k in ("median", "p20", "p80")}
    return {"median": tf["median"], "p20": tf["p80"], "p80": tf["p20"], "n": n,
            "dtype": str(dtype).replace("torch.", ""), "reps": timing["reps"]}


# ------------------------------------------------------------------------------------------
# Timing a step that changes state (added for bench_model.py and bench_swap.py): a reset runs
# between the timed calls, outside the timed region; CUDA graphs of a whole step.
# ------------------------------------------------------------------------------------------


def time_steps(step: Callable[[], Any], reset: Callable[[], Any], device: torch.device, *, reps: int,
               warmup: int = 1, clock: str = "events") -> Dict[str, float]:
    """Time ``step()`` ``reps`` times in ms, calling ``reset()`` after every call (warm-up ones
    too) outside the timed region: a decode step then crop of the KV cache, a slot load then
    its eviction.

    The device is idle when each call starts (synchronised before it). On a GPU, ``clock="events"``
    times the call between CUDA events on the current stream (host work before the first kernel
    counts, since the GPU waits for it), ``clock="wall"`` with perf_counter around the call and a
    synchronize of the whole device (work on side streams included). On the CPU both are
    perf_counter. Returns median, p20, p80, reps and first_call_ms (the first warm-up call).
    """
    if clock not in ("events", "wall"):
        raise ValueError(f"clock: expected 'events' or 'wall', got {clock!r}")
    cuda_events = device.type == "cuda" and clock == "events"
    first_ms = None
    for _ in range(max(0, warmup)):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        first_ms = (time.perf_counter() - t0) * 1e3 if first_ms is None else first_ms
        reset()
    samples: List[float] = []
    for _ in range(max(1, reps)):
        synchronize(device)
        if cuda_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            synchronize(device)
            samples.append((time.perf_counter() - t0) * 1e3)
        reset()
    return {**quantiles(samples), "reps": len(samples), "first_call_ms": first_ms}


def capture_cuda_graph(fn: Callable[[], Any], device: torch.device, *, warmup: int = 2,
                       before_capture: Optional[Callable[[], Any]] = None):
    """Capture ONE call of ``fn`` into a CUDA graph after ``warmup`` calls on a side stream.

    Returns (graph, output of the captured call, what ``before_capture()`` returned). Replaying
    the graph re-runs the captured kernels on the same memory: the tensors the call reads must
    stay alive and unchanged, so ``before_capture`` (called right before the capture) should
    return them for the caller to hold while it replays (e.g. a KV cache's tensors, which the
    call itself replaces); outputs live in the graph's pool. ``fn`` must not synchronise with
    the host (the capture then raises). Time the replays with
    ``time_steps(graph.replay, lambda: None, device, reps=...)``."""
    if device.type != "cuda":
        raise RuntimeError("capture_cuda_graph needs a CUDA device")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    kept = before_capture() if before_capture is not None else None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize(device)
    return graph, out, kept


@contextlib.contextmanager
def cpu_threads(quick: bool, device: Optional[str], threads: Optional[int]) -> Iterator[None]:
    """torch's CPU threads for one benchmark run, restored afterwards: ``threads`` if given, else 1
    for a --quick run on the CPU (a shared machine's noise stays out of the smoke numbers)."""
    before = torch.get_num_threads()
    on_cpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    n = threads or (1 if quick and on_cpu else None)
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def finish(summary: Callable[[], str], failures: List[str]) -> int:
    """End of a benchmark run: print ``summary()`` (a convenience: its errors are shown, not
    raised) and the failures; returns the exit code (1 when anything failed)."""
    try:
        print(summary())
    except Exception as e:  # noqa: BLE001
        print(f"(summary unavailable: {type(e).__name__}: {e})")
    if failures:
        print(f"\n{len(failures)} failure(s):")
        for f in failures:
            print("  " + f)
        return 1
    return 0


class _NoLoRAMath:
    """A patched layer's op that adds nothing (its hooks, metadata and pool still run)."""

    def __call__(self, y, x, meta):
        return y

    def add_rows(self, y, x, rows):
        return True


@contextlib.contextmanager
def no_lora_math(lm) -> Iterator[None]:
    """Inside: ``lm`` (a patched model) runs its hooks, metadata build and pool as usual, but every
    layer's LoRA call is a no-op, projection groups included (they would otherwise launch over the
    layers' slots themselves and add their scratch). The "ours without the LoRA math" rows."""
    from openlora_kernels import hf_patch
    layers = [ls for ls in lm.pool.layers.values() if ls.op is not None]
    real = [ls.op for ls in layers]
    grouped = hf_patch._grouped
    for ls in layers:
        ls.op = _NoLoRAMath()
    hf_patch._grouped = lambda *a, **k: hf_patch._UNGROUPED
    try:
        yield
    finally:
        hf_patch._grouped = grouped
        for ls, op in zip(layers, real):
            ls.op = op

