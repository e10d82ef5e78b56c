"""The README's main command on a fresh machine, timed step by step (issue 17's install target).

A fresh ``git clone`` of this checkout's HEAD into a temporary folder, a plain ``python -m venv``
(no system site packages), then the three steps of the README's main command, each timed (wall
seconds, and the children's user + system CPU seconds):

1. ``pip install torch==2.13.0 triton==3.9.0``
2. ``pip install -e ".[hf]"`` (compiles the native CPU extension; CUDA only when asked / a GPU is visible)
3. ``python -m openlora_kernels.demo`` (exits 1 if a row disagrees with PEFT)

"Wheels cached" means pip finds every wheel locally (this machine's pip config points at local
wheel folders and indexes); pass ``--no-index --find-links DIR`` to make that explicit. The row
``total`` is the sum, the figure the README target (<= 150 s on the 2-core machine) is about.
A last row, not in the total, times the native CPU extension's compile alone in the same clone
(``OPENLORA_SKIP_CUDA=1 python setup.py build_ext --inplace --force``; target <= 20 s).

    python -m benchmarks.bench_install                                          # -> benchmarks/out/install_cpu.csv
    python -m benchmarks.bench_install --out benchmarks/results/install_cpu.csv # the committed history
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

from benchmarks import common

STEPS = [
    ("pip install torch==2.13.0 triton==3.9.0", ["{pip}", "install", "-q", "torch==2.13.0", "triton==3.9.0"]),
    ('pip install -e ".[hf]"', ["{pip}", "install", "-q", "-e", ".[hf]"]),
    ("python -m openlora_kernels.demo", ["{python}", "-m", "openlora_kernels.demo"]),
]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_steps(repo: str, workdir: str, pip_args: List[str], log) -> List[Dict[str, float]]:
    clone = os.path.join(workdir, "clone")
    subprocess.run(["git", "clone", "-q", repo, clone], check=True)
    venv = os.path.join(workdir, "venv")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    py = os.path.join(venv, "bin", "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.path.join(venv, "bin") + os.pathsep + env.get("PATH", "")
    out = []
    for name, argv in STEPS:
        cmd = [a.format(pip=os.path.join(venv, "bin", "pip"), python=py) for a in argv]
        if cmd[1] == "install":
            cmd = cmd[:2] + pip_args + cmd[2:]
        common.progress(f"install: {name}")
        cpu0, t0 = _children_cpu(), time.perf_counter()
        p = subprocess.run(cmd, cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT)
        wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
        if p.returncode != 0:
            raise SystemExit(f"bench_install: step {name!r} exited {p.returncode} (log: {log.name})")
        out.append({"step": name, "wall_s": wall, "cpu_s": cpu})
    return out


def time_cpu_build(workdir: str, log) -> Dict[str, float]:
    """The native CPU extension compiled again from scratch in the clone (CUDA skipped)."""
    clone, py = os.path.join(workdir, "clone"), os.path.join(workdir, "venv", "bin", "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OPENLORA_SKIP_CUDA"] = "1"
    common.progress("install: setup.py build_ext --inplace --force (CPU extension alone)")
    cpu0, t0 = _children_cpu(), time.perf_counter()
    p = subprocess.run([py, "setup.py", "build_ext", "--inplace", "--force"], cwd=clone, env=env,
                       stdout=log, stderr=subprocess.STDOUT)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if p.returncode != 0:
        raise SystemExit(f"bench_install: the CPU extension build exited {p.returncode} (log: {log.name})")
    return {"step": "setup.py build_ext --inplace --force (CPU extension alone, not in the total)",
            "wall_s": wall, "cpu_s": cpu}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "install_cpu.csv"))
    ap.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    help="the checkout to clone (its HEAD; default: this one)")
    ap.add_argument("--no-index", action="store_true", help="pass --no-index to pip (only local wheels)")
    ap.add_argument("--find-links", default=None, help="a folder of wheels for pip")
    args = ap.parse_args(argv)
    pip_args = (["--no-index"] if args.no_index else []) + (["--find-links", args.find_links] if args.find_links else [])
    load0 = os.getloadavg()[0]
    workdir = tempfile.mkdtemp(prefix="olk-install-")
    log_path = os.path.join(workdir, "install.log")
    try:
        with open(log_path, "w") as log:
            steps = run_steps(args.repo, workdir, pip_args, log)
            build = time_cpu_build(workdir, log)
        with open(log_path) as f:
            tail = f.read().splitlines()
    except SystemExit:
        with open(log_path) as f:
            sys.stderr.write(f.read()[-4000:])
        raise
    load1 = os.getloadavg()[0]
    total = {"step": "total", "wall_s": sum(s["wall_s"] for s in steps), "cpu_s": sum(s["cpu_s"] for s in steps)}
    rows = []
    for s in steps + [total, build]:
        rows.append({"benchmark": "install", "kernel": "readme_main_command", "contender": s["step"],
                     "shape": "fresh clone + venv, wheels cached", "metric": "wall_s", "median": round(s["wall_s"], 2),
                     "p20": "", "p80": "", "unit": "s", "cpu_s": round(s["cpu_s"], 2),
                     "loadavg_before": round(load0, 2), "loadavg_after": round(load1, 2),
                     "cores": os.cpu_count(), "pip_args": " ".join(pip_args)})
    with common.ResultsFile(args.out, append=True) as rf:
        rf.write(rows)
    for s in steps + [total, build]:
        print(f"{s['step']:<45} {s['wall_s']:7.1f} s wall  {s['cpu_s']:7.1f} s cpu")
    print("demo's last lines:\n  " + "\n  ".join(tail[-3:]))
    print(f"load average {load0:.2f} before, {load1:.2f} after; rows -> {args.out}")
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"install main_command_s={total['wall_s']:.1f} target<=150 cpu_ext_build_s={build['wall_s']:.1f} target<=20")
    return 0


if __name__ == "__main__":
    sys.exit(main())
