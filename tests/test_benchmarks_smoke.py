"""Smoke tests of the benchmark scripts (CPU, --quick): they run, and what they write is well formed.

Timings are not asserted (performance targets live in the benchmarks, not in tests); the byte
formulas are, against the worked examples of shared/research/anchors.md.
"""
import csv
import os
import shutil
import subprocess
import sys

import pytest
import torch

from benchmarks import bench_kernels, common, report, roofline, sanitizer_parity, workloads
from benchmarks import kernel_baselines as kb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1e6


# ------------------------------------------------------------------------------- formulas


def test_roofline_bytes_match_the_anchor_examples():
    # K = N = 4096, r = 16, 64 distinct adapters at decode, bf16: "about 9 MB per op"
    p = roofline.problem_from_batch(range(64), [16] * 64, 4096, [4096], R=16)
    assert (p.T_active, p.distinct, p.rank_sum, p.row_rank_sum) == (64, 64, 64 * 16, 64 * 16)
    x_and_a = 2 * 64 * 4096 + 2 * 64 * 16 * 4096
    assert roofline.op_bytes("lora_shrink", p) == x_and_a + 4 * 64 * 16
    assert 8.5 * MB < roofline.op_bytes("lora_shrink", p) < 9.0 * MB
    assert 8.5 * MB < roofline.op_bytes("lora_expand", p) < 9.5 * MB
    fused = roofline.op_bytes("add_lora", p)
    assert fused == 2 * 64 * 4096 + 2 * 2 * 64 * 16 * 4096 + 2 * 2 * 64 * 4096   # no intermediate
    # prefill of 16k tokens: ~135 MB shrink (x), ~269 MB expand (y read + written)
    q = roofline.problem_from_batch([i // 1024 for i in range(16384)], [16] * 16, 4096, [4096], R=16)
    x_bytes, y_rmw = 2 * 16384 * 4096, 2 * 2 * 16384 * 4096
    assert x_bytes == pytest.approx(134.2 * MB, rel=1e-3) and y_rmw == pytest.approx(268.4 * MB, rel=1e-3)
    assert roofline.op_bytes("lora_shrink", q) == x_bytes + 2 * 16 * 16 * 4096 + 4 * 16384 * 16
    assert roofline.op_bytes("lora_expand", q) == 4 * 16384 * 16 + 2 * 16 * 16 * 4096 + y_rmw
    assert roofline.op_flops("add_lora", q) == 2 * 16384 * 16 * (4096 + 4096)


def test_roofline_counts_slices_ranks_and_rows_without_adapter():
    # 3 slices (fused QKV), ranks 8 and 64 used, one row without adapter, an unused slot of rank 16
    p = roofline.problem_from_batch([0, 1, 1, -1, 7], [8, 64, 16], 4096, [4096, 1024, 1024], R=64)
    assert (p.T, p.T_active, p.distinct, p.rank_sum, p.row_rank_sum) == (5, 3, 2, 72, 136)
    b = 2
    want = b * 3 * 4096 + 3 * b * 72 * 4096 + b * 72 * 6144 + 2 * b * 3 * 6144
    assert roofline.op_bytes("add_lora", p) == want
    assert roofline.op_bytes("lora_shrink", p) == b * 3 * 4096 + 3 * b * 72 * 4096 + 4 * 3 * 5 * 64
    s = roofline.summary("add_lora", p, time_s=want / 1e12, bandwidth_gbps=2000.0)
    assert s["gbps"] == pytest.approx(1000.0) and s["pct_roofline"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="op"):
        roofline.op_bytes("merge", p)


def test_workloads_follow_their_definitions():
    for n in (1, 7, 64, 512):
        for w in workloads.WORKLOADS:
            sizes = workloads.group_sizes(w, n)
            assert sum(sizes) == n and all(s > 0 for s in sizes)
            assert sizes == sorted(sizes, reverse=True)
        assert len(workloads.group_sizes("distinct", n)) == n
        assert workloads.group_sizes("identical", n) == [n]
    assert workloads.group_sizes("uniform", 64) == [8] * 8
    zipf = workloads.group_sizes("skewed", 64)
    assert zipf[0] > 2 * zipf[1] > 0 and 1 < len(zipf) < 64
    rows = workloads.token_slots("uniform", 4, seq=3, seed=1)
    assert rows.shape == (12,) and all(len(set(rows[i:i + 3].tolist())) == 1 for i in range(0, 12, 3))
    with pytest.raises(ValueError, match="workload"):
        workloads.group_sizes("bursty", 4)


def test_rotation_and_cache_helpers():
    cache = 50 * 2**20
    n = common.rotation_sets(280_000, cache)
    assert (n - 1) * 280_000 >= 2 * cache and n <= 512
    assert common.rotation_sets(10 * cache, cache) == 2
    assert common.rotation_sets(2**20, cache, max_total_bytes=8 * 2**20) == 8
    assert common.cache_bytes(torch.device("cpu")) > 0
    assert common.device_slug(torch.device("cpu")) == "cpu"


# --------------------------------------------------------------------- the kernel benchmark


@pytest.fixture(scope="module")
def quick_csv(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench") / "kernels.csv")
    assert bench_kernels.main(["--quick", "--device", "cpu", "--out", out]) == 0
    return out


def test_bench_kernels_quick_writes_wellformed_rows(quick_csv):
    with open(quick_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == common.COLUMNS
        raw = list(reader)
    rows = common.read_rows(quick_csv)
    assert len(rows) == len(raw) > 100
    for r in rows:
        for k in ("benchmark", "kernel", "contender", "shape", "metric", "unit", "device", "torch", "triton", "cuda",
                  "commit", "date"):
            assert r[k], f"empty {k} in {r}"
        assert r["device"].startswith("CPU: ")
        assert 0 < r["p20"] <= r["median"] <= r["p80"], r
    timed = [r for r in rows if r["kernel"] in roofline.OPS]
    assert {r["kernel"] for r in rows} == {"ceiling", "build_batch_meta", *roofline.OPS}
    assert {r["contender"] for r in timed} == {"olk-torch", "loop", "gather_bmm", "dense_one"}
    quick_shapes = {bench_kernels.shape_label(*bench_kernels.shape_dims(s, True)[1:]) for s in bench_kernels.SHAPES}
    assert {r["shape"] for r in timed} == quick_shapes == {"64->64", "64->172", "172->64", "64->64+16+16"}
    assert all(r["extra"]["model"].endswith("--quick)") for r in timed)
    assert bench_kernels.shape_label(*bench_kernels.shape_dims("4096->4096+1024+1024", False)[1:]) == \
        "4096->4096+1024+1024"
    assert {r["extra"]["workload"] for r in timed} == set(workloads.WORKLOADS)
    assert {r["extra"]["rank"] for r in timed} == {"16", "mixed"}
    assert {r["extra"]["regime"] for r in timed} == {"decode", "prefill"}
    assert {r["extra"]["sweep"] for r in rows if r["kernel"] != "ceiling"} == {"meta", "T", "ranks", "workloads"}
    for r in timed:
        e = r["extra"]
        assert r["unit"] == "us" and r["metric"] == "time"     # no CUDA graph timing on a CPU
        assert e["bytes_min"] > 0 and e["roofline_us"] > 0 and e["gbps"] > 0 and e["pct_roofline"] > 0
        assert e["pct_roofline"] == pytest.approx(100 * e["roofline_us"] / r["median"], rel=1e-6)
        assert e["check"] == ("n/a" if r["contender"] == "dense_one" else "ok"), r
    bw = [r for r in rows if r["kernel"] == "ceiling" and r["metric"] == "bandwidth"]
    assert len(bw) == 1 and bw[0]["unit"] == "GB/s"
    assert all(r["extra"]["peak_gbps"] == pytest.approx(bw[0]["median"]) for r in timed)


def test_report_renders_tables_from_the_rows(quick_csv, tmp_path):
    md = tmp_path / "report.md"
    assert report.main([quick_csv, "--out", str(md)]) == 0
    text = md.read_text()
    for heading in ("#### Ceilings", "#### add_lora, 64->64", "#### lora_shrink", "#### lora_expand",
                    "#### add_lora by rank", "#### add_lora by workload", "#### Batch metadata build", "#### Targets"):
        assert heading in text
    assert "CPU run: the targets are GPU targets" in text
    rows = common.read_rows(quick_csv)
    t1 = min((r for r in rows if r["kernel"] == "add_lora" and r["shape"] == "64->64" and r["extra"]["T"] == 1
              and r["contender"] == "loop"), key=lambda r: r["median"])
    assert f"| {t1['median']:.1f} |" in text           # a number of the table is the file's number


def test_plot_draws_pngs(quick_csv, tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import plot

    assert plot.main([quick_csv, "--out-dir", str(tmp_path)]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "add_lora_time.png" in pngs and "add_lora_roofline.png" in pngs and "add_lora_speedup.png" in pngs
    assert all((tmp_path / p).stat().st_size > 10_000 for p in pngs)


# ---------------------------------------------------------------- parity run for the sanitizer


def test_sanitizer_parity_passes_on_the_torch_backend():
    assert sanitizer_parity.main(["--quick", "--device", "cpu", "--backends", "torch"]) == 0


class _BrokenOps:
    """Stands in for openlora_kernels with ops that go wrong in the ways the parity run must catch."""

    def __init__(self, flaw):
        import openlora_kernels as olk

        self.olk, self.flaw = olk, flaw
        self.build_batch_meta = olk.build_batch_meta

    def add_lora(self, y, *args, **kw):
        self.olk.add_lora(y, *args, **kw)
        if self.flaw == "touches base rows":
            y.add_(1.0)
        elif self.flaw == "wrong scale":
            y.mul_(1.1)
        return y

    def lora_shrink(self, *args, **kw):
        return self.olk.lora_shrink(*args, **kw)

    def lora_expand(self, *args, **kw):
        return self.olk.lora_expand(*args, **kw)


@pytest.mark.parametrize("flaw", ["touches base rows", "wrong scale"])
def test_sanitizer_parity_catches_wrong_results(flaw):
    gen = torch.Generator().manual_seed(3)
    fails = sanitizer_parity.run_case(_BrokenOps(flaw), "torch", torch.device("cpu"), torch.float32, 40, 24, (24, 16),
                                      16, 5, True, None, gen)
    assert any("add_lora" in f for f in fails), fails
    clean = sanitizer_parity.run_case(_BrokenOps(None), "torch", torch.device("cpu"), torch.float32, 40, 24, (24, 16),
                                      16, 5, True, None, gen)
    assert clean == []


def test_baselines_agree_with_the_reference():
    torch.manual_seed(0)
    T, K, widths, S, R = 9, 24, (16, 8), 4, 8
    idx = [0, 2, 2, 1, 3, 0, 1, 1, 2]
    ranks, scal = [8, 4, 8, 2], [0.5, 1.0, 2.0, 1.5]
    lane = torch.arange(R)
    mask = (lane[None, :] < torch.tensor(ranks)[:, None]).float()
    A = [torch.randn(S, R, K) * mask[:, :, None] for _ in widths]
    B = [torch.randn(S, w, R) * mask[:, None, :] for w in widths]
    x, y0 = torch.randn(T, K), torch.randn(T, sum(widths))
    groups = kb.adapter_groups(idx, ranks, scal, torch.device("cpu"))
    h = kb.reference_shrink(x, A, groups, R)
    want = torch.cat([torch.stack([scal[s] * (x[t] @ A[i][s].T) @ B[i][s].T for t, s in enumerate(idx)])
                      for i in range(len(widths))], dim=1)
    assert kb.rel_err(kb.reference_delta(h, B, groups, T), want) < 1e-5
    slots, sc = torch.tensor(idx), torch.tensor(scal)
    for fn in (lambda y: kb.loop_add_lora(y, x, A, B, groups), lambda y: kb.gather_add_lora(y, x, A, B, slots, sc),
               lambda y: kb.loop_expand(y, h, B, groups), lambda y: kb.gather_expand(y, h, B, slots, sc)):
        y = y0.clone()
        fn(y)
        assert kb.rel_err(y - y0, want) < 1e-5
    assert kb.rel_err(kb.loop_shrink(x, A, groups, R), h) < 1e-5
    assert kb.rel_err(kb.gather_shrink(x, A, slots), h) < 1e-5
    y = y0.clone()
    kb.dense_add_lora(y, x, torch.cat([a[0] for a in A]), [b[0] for b in B], 0.5)
    one = torch.cat([0.5 * (x @ A[i][0].T) @ B[i][0].T for i in range(len(widths))], dim=1)
    assert kb.rel_err(y - y0, one) < 1e-5


# ------------------------------------------------------------------------------ gpu_suite.sh


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_suite_runs_end_to_end_in_quick_mode(tmp_path):
    """The orchestration (limits, logs, packaging, summary) on a CPU: the benchmark part only."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # keep Triton's slow interpreter out
    env.update(OUT=str(tmp_path / "out"), SUITE_RESULTS_DIR=str(tmp_path / "results"), SUITE_QUICK="1",
               SUITE_STEPS="backends,bench,report", PYTHON=sys.executable,
               BENCH_ARGS="--device cpu --ops add_lora --shapes 4096->4096 --sweeps T --baselines loop")
    committed = os.path.join(ROOT, "benchmarks", "results", "kernels_cpu_quick.csv")
    before = _stamp(committed)
    assert subprocess.run(["bash", "-n", "benchmarks/gpu_suite.sh"], cwd=ROOT).returncode == 0
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    summary = (out / "summary.txt").read_text()
    for step in ("backends", "bench_kernels", "report_kernels_cpu_quick"):
        assert any(line.split()[:2] == [step, "ok"] for line in summary.splitlines()), summary
    assert "gpu_suite summary" in proc.stdout and summary.strip().splitlines()[0] in proc.stdout
    listing = subprocess.run(["tar", "-tzf", str(out / "gpu_suite_results.tar.gz")], capture_output=True,
                             text=True).stdout.split()
    assert "results/kernels_cpu_quick.csv" in listing and "logs/bench_kernels.log" in listing
    rows = common.read_rows(str(out / "kernels_cpu_quick.csv"))
    assert rows and {r["contender"] for r in rows if r["kernel"] == "add_lora"} == {"olk-torch", "loop"}
    assert _stamp(committed) == before, "the suite wrote into benchmarks/results despite SUITE_RESULTS_DIR"


def _stamp(path):
    return os.stat(path).st_mtime_ns if os.path.exists(path) else None


def _gpu_row(kernel, contender, T, median, *, metric="time", regime="decode", roofline_us=None, unit="us", **extra):
    e = {"T": T, "regime": regime, "rank": "16", "workload": "distinct", "sweep": "T", "distinct": T,
         "model": "Llama-2-7B q/k/v/o_proj"}
    if roofline_us is not None:
        e.update(roofline_us=roofline_us, pct_roofline=100 * roofline_us / median)
    e.update(extra)
    return {"benchmark": "kernels", "kernel": kernel, "contender": contender, "shape": "4096->4096",
            "metric": metric, "median": median, "p20": median * 0.95, "p80": median * 1.05, "unit": unit,
            "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0",
            "commit": "abc", "date": "2026-11-22T00:00:00Z", "extra": e}


def test_report_assesses_the_targets_on_gpu_rows():
    rows = [
        _gpu_row("ceiling", "torch add_", None, 4.0, metric="launch_graph"),
        _gpu_row("add_lora", "olk-triton", 64, 20.0, roofline_us=16.0),         # 80% of roofline
        _gpu_row("add_lora", "olk-triton", 64, 17.0, metric="time_graph", roofline_us=16.0),
        _gpu_row("add_lora", "loop", 64, 300.0, roofline_us=16.0),
        _gpu_row("add_lora", "gather_bmm", 64, 50.0, roofline_us=16.0),
        _gpu_row("add_lora", "olk-triton", 128, 50.0, roofline_us=30.0),        # 60%: a miss
        _gpu_row("add_lora", "olk-triton", 1, 9.0, roofline_us=2.0),
        _gpu_row("add_lora", "olk-triton", 1, 5.0, metric="time_graph", roofline_us=2.0),  # <= 1.5 x 4 us
        _gpu_row("add_lora", "olk-triton", 4096, 400.0, regime="prefill", roofline_us=200.0),  # 50%
    ]
    text = report.targets(rows)
    assert "where the roofline time > 10 µs: 1 of 2 cells met" in text
    assert "missed: 4096->4096 r=16 distinct T=128: 60.0%" in text
    assert "within 1.5x of one launch (launch_graph 4.0 µs, limit 6.0 µs): 1 of 1 cells met" in text
    assert "4096->4096: 2.50x faster than gather_bmm (target >= 3x): MISSED" in text
    assert "4096->4096: 15.00x faster than loop (target >= 10x): met" in text
    assert "prefill add_lora >= 60% of roofline: 0 of 1 cells met" in text
    table = report.op_table(rows, "add_lora", "4096->4096")
    assert "| 64 | 64 | 16.0 | 20.0 | 80.0% | 17.0 | 94.1% | 300.0 | 50.0 | - | 15.00x | 2.50x | - |" in table


class _FakeCuda:
    """CPU stand-ins for the torch.cuda calls of common.py's GPU timing, to run its logic here."""

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self, stream=None):
            import time

            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    class CUDAGraph:
        replays = 0

        def replay(self):
            _FakeCuda.CUDAGraph.replays += 1

    @staticmethod
    def install(monkeypatch):
        import contextlib

        fake = _FakeCuda
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "Event", fake.Event)
        monkeypatch.setattr(torch.cuda, "Stream", fake.Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: fake.Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", fake.CUDAGraph)
        monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())


def test_gpu_timing_paths_with_stand_ins(monkeypatch):
    _FakeCuda.install(monkeypatch)
    dev = torch.device("cuda")
    seen = []
    t = common.time_rotating(seen.append, 5, dev, budget_ms=0.0, min_reps=7, max_reps=7, warmup=2)
    assert t["reps"] == 7 and len(seen) == 1 + 2 + 7 and set(seen) == set(range(5))
    assert 0 <= t["p20"] <= t["median"] <= t["p80"]
    seen.clear()
    g = common.time_cuda_graph(seen.append, 5, dev, budget_ms=0.0, min_reps=4, max_reps=4, min_calls=12)
    assert g["calls_per_graph"] == 15 and g["reps"] == 4
    assert seen == [0, 1, 2] + [c % 5 for c in range(15)]        # warm-up, then one capture
    assert _FakeCuda.CUDAGraph.replays >= 4 + 2
    with pytest.raises(RuntimeError, match="CUDA"):
        common.time_cuda_graph(seen.append, 1, torch.device("cpu"))
