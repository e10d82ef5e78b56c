"""Shared helpers of the benchmark scripts: environment facts, timing, and the results files.

Every row a benchmark writes carries the device, the versions and the git commit, so a figure
quoted in docs/ can always be traced to the run that produced it. Rows go to CSV files under
benchmarks/results/ with the columns in ``COLUMNS``; ``plot.py`` reads them.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
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


def write_rows(path: str, rows: Iterable[Dict[str, Any]], env: Optional[Dict[str, str]] = None) -> str:
    """Append rows (dicts with some of COLUMNS; anything else goes into 'extra' as JSON) to a CSV."""
    env = env or env_info()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for row in rows:
            extra = {k: v for k, v in row.items() if k not in COLUMNS}
            out = {**env, **{k: v for k, v in row.items() if k in COLUMNS}}
            if extra:
                out["extra"] = json.dumps(extra, sort_keys=True)
            w.writerow(out)
    return path


def read_rows(path: str) -> List[Dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("median", "p20", "p80"):
            if r.get(k) not in (None, ""):
                r[k] = float(r[k])
        r["extra"] = json.loads(r["extra"]) if r.get("extra") else {}
    return rows
