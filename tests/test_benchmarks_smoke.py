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

import openlora_kernels as olk
from benchmarks import bench_kernels, bench_model, bench_swap, common, model_fixtures, report, roofline
from benchmarks import sanitizer_parity, workloads
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
    ours = {"olk-cpu", "olk-cpu[pool-B]", "olk-torch"} if olk.available_backends("cpu")["cpu"].usable else {"olk-torch"}
    assert {r["contender"] for r in timed} == ours | {"loop", "gather_bmm", "dense_one"}
    assert {r["extra"]["b_layout"] for r in timed if r["contender"].endswith("[pool-B]")} <= {"pool"}
    assert not [r for r in timed if r["contender"].endswith("[pool-B]") and r["kernel"] == "lora_shrink"]
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
    committed = [os.path.join(ROOT, "benchmarks", "results", f"{k}_cpu_quick.csv") for k in ("kernels", "model", "swap")]
    before = [_stamp(c) for c in committed]
    assert subprocess.run(["bash", "-n", "benchmarks/gpu_suite.sh"], cwd=ROOT).returncode == 0
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    summary = (out / "summary.txt").read_text()
    for step in ("backends", "bench_kernels", "report_kernels_cpu_quick", "bench_model", "bench_swap",
                 "report_model_cpu_quick", "report_swap_cpu_quick"):
        assert any(line.split()[:2] == [step, "ok"] for line in summary.splitlines()), summary
    assert "bench_hf_cpu_decode" not in summary          # a CPU benchmark: not part of the GPU session
    assert "gpu_suite summary" in proc.stdout and summary.strip().splitlines()[0] in proc.stdout
    listing = subprocess.run(["tar", "-tzf", str(out / "gpu_suite_results.tar.gz")], capture_output=True,
                             text=True).stdout.split()
    assert "results/kernels_cpu_quick.csv" in listing and "logs/bench_kernels.log" in listing
    rows = common.read_rows(str(out / "kernels_cpu_quick.csv"))
    ours = {"olk-cpu", "olk-cpu[pool-B]", "olk-torch"} if olk.available_backends("cpu")["cpu"].usable else {"olk-torch"}
    assert rows and {r["contender"] for r in rows if r["kernel"] == "add_lora"} == ours | {"loop"}
    for kind in ("model", "swap"):
        assert f"results/{kind}_cpu_quick.csv" in listing
        assert common.read_rows(str(tmp_path / "results" / f"{kind}_cpu_quick.csv"))[0]["benchmark"] == kind
    assert "targets (model_cpu_quick):" in proc.stdout
    assert [_stamp(c) for c in committed] == before, "the suite wrote into benchmarks/results despite SUITE_RESULTS_DIR"


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

        def synchronize(self):
            pass

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


def test_time_steps_resets_between_calls_outside_the_timing(monkeypatch):
    log = []
    t = common.time_steps(lambda: log.append("step"), lambda: log.append("reset"), torch.device("cpu"), reps=4,
                          warmup=2)
    assert log == ["step", "reset"] * 6 and t["reps"] == 4 and t["first_call_ms"] >= 0
    assert 0 <= t["p20"] <= t["median"] <= t["p80"]
    with pytest.raises(ValueError, match="clock"):
        common.time_steps(lambda: None, lambda: None, torch.device("cpu"), reps=1, clock="tsc")
    _FakeCuda.install(monkeypatch)                     # the CUDA-event path, with stand-ins
    log.clear()
    for clock in ("events", "wall"):
        g = common.time_steps(lambda: log.append("step"), lambda: log.append("reset"), torch.device("cuda"), reps=3,
                              warmup=1, clock=clock)
        assert g["reps"] == 3 and g["median"] >= 0
    assert log == ["step", "reset"] * 8


def test_capture_cuda_graph_keeps_what_the_capture_reads(monkeypatch):
    _FakeCuda.install(monkeypatch)
    dev, calls, order = torch.device("cuda"), [], []

    def fn():
        calls.append(len(calls))
        order.append("fn")
        return "out"

    graph, out, kept = common.capture_cuda_graph(fn, dev, warmup=2,
                                                 before_capture=lambda: order.append("keep") or "cache tensors")
    assert order == ["fn", "fn", "keep", "fn"] and out == "out" and kept == "cache tensors"
    before = _FakeCuda.CUDAGraph.replays
    t = common.time_steps(graph.replay, lambda: None, dev, reps=5, warmup=1)
    assert t["reps"] == 5 and _FakeCuda.CUDAGraph.replays == before + 6
    with pytest.raises(RuntimeError, match="CUDA"):
        common.capture_cuda_graph(fn, torch.device("cpu"))


# ------------------------------------------------------------------------ the model benchmark


def _lora_bytes(d, rank=16, elt=4):
    """One adapter on the seven projections of every layer, counted from the shapes of A and B."""
    return elt * rank * d.layers * sum(k + n for k, n in d.projections().values())


TINY_DIMS = model_fixtures.Dims(name="t", **model_fixtures.TINY)


def _llama_param_bytes(d, elt=4):
    """Parameters of a Llama model counted from its definition (not from the module)."""
    kv = d.kv_heads * d.head_dim
    layer = d.hidden * (2 * d.hidden + 2 * kv) + 3 * d.hidden * d.intermediate + 2 * d.hidden
    return elt * (2 * d.vocab * d.hidden + d.layers * layer + d.hidden)


def test_model_fixture_sizes_follow_the_llama_definition():
    d = model_fixtures.Dims(name="x", **model_fixtures.LLAMA2_7B)
    assert _llama_param_bytes(d, 2) == 2 * 6_738_415_616           # Llama-2-7B: 6.74 B parameters
    # one rank-16 adapter on the seven projections of Llama-2-7B, bf16: 16 * (4*8192 + 3*15104) * 32 layers
    assert model_fixtures.adapter_bytes(d, 16, torch.bfloat16) == 2 * 16 * (4 * 8192 + 3 * 15104) * 32 \
        == _lora_bytes(d, elt=2) == 79_953_920                      # 80 MB: 32 of them are 19.0% of the base
    assert 32 * 79_953_920 / _llama_param_bytes(d, 2) == pytest.approx(0.1898, abs=1e-4)
    m = model_fixtures.build_model(TINY_DIMS, torch.device("cpu"), torch.float32)
    assert model_fixtures.param_bytes(m) == _llama_param_bytes(TINY_DIMS)
    twin = model_fixtures.share_weights_copy(m)
    assert twin is not m and all(a is b for a, b in zip(m.parameters(), twin.parameters()))
    assert twin.model.layers[0].self_attn is not m.model.layers[0].self_attn


@pytest.fixture(scope="module")
def model_csv(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("model") / "model.csv")
    assert bench_model.main(["--quick", "--device", "cpu", "--out", out]) == 0
    return out


def test_bench_model_quick_writes_wellformed_rows(model_csv):
    rows = common.read_rows(model_csv)
    with open(model_csv, newline="", encoding="utf-8") as f:
        assert csv.DictReader(f).fieldnames == common.COLUMNS
    assert rows and all(r["device"].startswith("CPU: ") and r["benchmark"] == "model" and r["commit"] for r in rows)
    steps = [r for r in rows if r["kernel"] == "decode_step"]
    q = bench_model.QUICK
    want_cases = {(b, b) for b in q["batches"]} | {(q["adapters_batch"], n) for n in q["adapters"]}
    assert {(r["extra"]["B"], r["extra"]["N"]) for r in steps} == want_cases
    assert {r["metric"] for r in steps} == {"step_time", "tokens_per_s"}     # no CUDA graphs on a CPU
    by = {(r["contender"], r["metric"], r["extra"]["B"], r["extra"]["N"]): r for r in steps}
    assert len(by) == len(steps) == 2 * 3 * len(want_cases)
    for (c, metric, B, N), r in by.items():
        assert 0 < r["p20"] <= r["median"] <= r["p80"], r
        if metric != "tokens_per_s":
            continue
        t, base = by[(c, "step_time", B, N)], by[("base", "step_time", B, N)]
        assert r["median"] == pytest.approx(B / t["median"] * 1e3, rel=1e-9)
        assert r["p20"] == pytest.approx(B / t["p80"] * 1e3, rel=1e-9)
        e = r["extra"]
        if c == "base":
            assert "overhead_pct" not in e and "per_adapter_tokens_per_s" not in e
            continue
        assert e["overhead_pct"] == pytest.approx(100 * (t["median"] / base["median"] - 1), rel=1e-9)
        assert e["per_adapter_tokens_per_s"] == pytest.approx(r["median"] / N, rel=1e-9)
        assert e["adapter_bytes_over_base_pct"] == pytest.approx(
            100 * N * _lora_bytes(TINY_DIMS) / _llama_param_bytes(TINY_DIMS))
        if c == "openlora":    # agrees with PEFT's mixed batch on the first step's logits (float32)
            assert e["check"] == "ok" and e["rel_err_vs_peft"] < 1e-3 and e["lora_effect"] > 1e-2
            peft = by[("peft_mixed", "step_time", B, N)]
            assert e["speedup_vs_peft"] == pytest.approx(peft["median"] / t["median"], rel=1e-9)
    mem = [r for r in rows if r["kernel"] == "memory"]
    assert {r["metric"] for r in mem} == {"memory_computed"}                # CPU: nothing measured
    base_b, adapter_b = _llama_param_bytes(TINY_DIMS), _lora_bytes(TINY_DIMS)
    for r in mem:
        N, mib = r["extra"]["N"], 2 ** 20
        assert r["extra"]["slot_bytes_reported"] == N * adapter_b          # the pool's own figure, r = max_rank
        want = base_b + N * adapter_b if r["contender"] == "openlora_base_plus_adapters" else N * base_b
        assert r["median"] * mib == pytest.approx(want, rel=1e-12)
    assert {r["extra"]["N"] for r in mem} == set(q["adapters"])


def test_bench_model_plan_puts_the_headline_first():
    args = bench_model.parse_args([])
    cases = bench_model.plan_cases(args)
    assert cases[0] == (32, 32) and len(cases) == len(set(cases)) == 11 and (64, 64) in cases and (64, 4) in cases
    steps = bench_model.plan_steps(cases, args.batches)
    assert steps[:3] == [("case", (32, 32)), ("graph", 32), ("memory", None)]
    assert [a for w, a in steps if w == "case"] == cases
    assert [a for w, a in steps if w == "graph"] == [32, 1, 2, 4, 8, 16, 64]
    assert bench_model.plan_steps([(1, 1), (4, 4)], []) == [("case", (1, 1)), ("memory", None), ("case", (4, 4))]


def test_bench_model_check_catches_rows_served_the_wrong_adapter(tmp_path, monkeypatch):
    real = bench_model.Bench.call

    def shifted(self, contender, ids, cache, rows):      # ours serves each row its neighbour's adapter
        return real(self, contender, ids, cache, rows[1:] + rows[:1] if contender == "openlora" else rows)

    monkeypatch.setattr(bench_model.Bench, "call", shifted)
    out = str(tmp_path / "m.csv")
    args = ["--quick", "--device", "cpu", "--out", out, "--batches", "2", "--adapters", "2", "--adapters-batch", "2"]
    assert bench_model.main(args) == 1
    bad = [r for r in common.read_rows(out) if r["contender"] == "openlora" and r["kernel"] == "decode_step"]
    assert bad and all(r["extra"]["check"] == "FAILED" and r["extra"]["rel_err_vs_peft"] > 0.1 for r in bad)


def test_bench_model_gpu_only_parts_run_with_stand_ins(tmp_path, monkeypatch):
    """The CUDA-graph and allocator-measured code of bench_model on the CPU: a 'graph' whose
    replay re-runs the captured step eagerly, an allocator counter; then a capture that fails."""
    import itertools

    counter = itertools.count(1)
    monkeypatch.setattr(model_fixtures, "memory_allocated", lambda dev: 1000 * next(counter))

    class ReRun:
        def __init__(self, fn):
            self.fn, self.replays = fn, 0

        def replay(self):
            self.replays += 1
            self.fn()

    seen = {}

    def capture(fn, device, *, warmup=2, before_capture=None):
        for _ in range(warmup):
            fn()
        kept = before_capture()
        seen["kept"] = list(kept)
        return ReRun(fn), fn(), kept

    monkeypatch.setattr(common, "capture_cuda_graph", capture)
    out = str(tmp_path / "m.csv")
    b = bench_model.Bench(bench_model.parse_args(["--quick", "--device", "cpu", "--out", out, "--batches", "2",
                                                  "--adapters", "1", "2", "--adapters-batch", "2", "--no-peft"]))
    with torch.no_grad():
        b.setup()
        b.memory([1, 2])
        assert b.graph_case(2)
        assert len(seen["kept"]) == b.dims.layers and all(k.shape[2] == b.args.prompt for k, _ in seen["kept"])

        def broken(*a, **k):
            raise RuntimeError("operation not permitted when stream is capturing\nmore")

        monkeypatch.setattr(common, "capture_cuda_graph", broken)
        assert not b.graph_case(2)
    assert not b.failures
    rows = common.read_rows(out)
    g = [r for r in rows if r["metric"] in ("step_time_graph", "tokens_per_s_graph")]
    assert {(r["contender"], r["metric"]) for r in g} == {(c, m) for c in ("base", "openlora")
                                                            for m in ("step_time_graph", "tokens_per_s_graph")}
    assert all(r["extra"]["check"] == "ok" and r["extra"]["replay_vs_eager_rel_diff"] == 0 for r in g)
    ours = next(r for r in g if r["contender"] == "openlora" and r["metric"] == "tokens_per_s_graph")
    base = next(r for r in g if r["contender"] == "base" and r["metric"] == "step_time_graph")
    ours_t = next(r for r in g if r["contender"] == "openlora" and r["metric"] == "step_time_graph")
    assert ours["extra"]["overhead_pct"] == pytest.approx(100 * (ours_t["median"] / base["median"] - 1))
    failed = [r for r in rows if r["metric"] == "graph_failed"]
    assert len(failed) == 1 and failed[0]["extra"]["error"] == "RuntimeError: operation not permitted when stream " \
        "is capturing"
    measured = [r for r in rows if r["metric"] == "memory_measured"]
    assert {(r["contender"], r["extra"]["N"]) for r in measured} == {
        (c, n) for c in ("openlora_base_plus_adapters", "merged_copies") for n in (1, 2)}
    for r in measured:
        e = r["extra"]
        want = (e["base_bytes_measured"] + e["slot_bytes_measured"] if r["contender"] != "merged_copies"
                else e["N"] * e["base_bytes_measured"])
        assert r["median"] * 2**20 == pytest.approx(want)
    text = report.model_markdown(rows)
    assert "| 2 | " in report.model_graph_table(rows) and "CUDA graph capture of base at B=2 failed" in text


def test_report_and_plot_model(model_csv, tmp_path):
    md = tmp_path / "model.md"
    assert report.main([model_csv, "--out", str(md)]) == 0
    text = md.read_text()
    for heading in ("#### Decode throughput vs batch", "#### Per-adapter throughput as N grows", "#### CUDA graphs",
                    "#### Memory: one base + N adapters", "#### Targets"):
        assert heading in text
    assert "CPU run: the targets are GPU targets" in text and "computed from parameter bytes" in text
    rows = common.read_rows(model_csv)
    r = next(r for r in rows if r["metric"] == "tokens_per_s" and r["contender"] == "peft_mixed"
             and r["extra"]["B"] == 4)
    assert f"| {r['median']:,.0f} |" in text
    pytest.importorskip("matplotlib")
    from benchmarks import plot

    assert plot.main([model_csv, "--out-dir", str(tmp_path)]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["model_memory_vs_n.png", "model_overhead_vs_n.png", "model_per_adapter_vs_n.png",
                    "model_tokens_per_s.png"]


def _model_row(contender, metric, B, N, median, **extra):
    e = {"B": B, "N": N, **extra}
    return {"benchmark": "model", "kernel": "decode_step", "contender": contender, "shape": "s", "metric": metric,
            "median": median, "p20": median, "p80": median, "unit": "tok/s", "device": "NVIDIA H100 80GB HBM3",
            "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "commit": "abc", "date": "d", "extra": e}


def test_report_assesses_the_model_target_on_gpu_rows():
    rows = [_model_row("base", "tokens_per_s", 32, 32, 1000.0),
            _model_row("openlora", "tokens_per_s", 32, 32, 920.0, overhead_pct=8.7, adapter_bytes_over_base_pct=19.0),
            _model_row("peft_mixed", "tokens_per_s", 32, 32, 100.0, overhead_pct=900.0)]
    text = report.model_targets(rows)
    assert "LoRA overhead over the base model +8.7% (target <= 10%): met (the 32 adapters' bytes are 19.0%" in text
    assert "9.2x the per-adapter throughput of PEFT's mixed batch (target >= 10x): MISSED" in text
    rows[1] = _model_row("openlora", "tokens_per_s", 32, 32, 1500.0, overhead_pct=12.0)
    text = report.model_targets(rows)
    assert "+12.0% (target <= 10%): MISSED" in text and "15.0x" in text and "(target >= 10x): met" in text
    assert "not measured" in report.model_targets(rows[:1] + [_model_row("openlora", "tokens_per_s", 16, 16, 1.0)])


# ------------------------------------------------------------------------- the swap benchmark


@pytest.fixture(scope="module")
def swap_csv(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("swap") / "swap.csv")
    assert bench_swap.main(["--quick", "--device", "cpu", "--out", out]) == 0
    return out


def test_bench_swap_quick_writes_wellformed_rows(swap_csv):
    rows = common.read_rows(swap_csv)
    assert [r["contender"] for r in rows] == list(bench_swap.ADAPTER_STATES + bench_swap.RELOAD_STATES)
    d, adapter_b = TINY_DIMS, _lora_bytes(TINY_DIMS)
    by = {r["contender"]: r for r in rows}
    for r in rows:
        assert r["benchmark"] == "swap" and r["device"].startswith("CPU: ") and r["unit"] == "ms"
        assert 0 < r["p20"] <= r["median"] <= r["p80"], r
        assert r["extra"]["fs"] and r["extra"]["reps"] >= 1
    assert by["warm"]["extra"]["bytes_moved"] == by["warm"]["extra"]["adapter_bytes"] == adapter_b
    assert by["cold_disk"]["extra"]["file_bytes"] > adapter_b                 # safetensors header + config
    assert by["model_reload_disk"]["extra"]["model_bytes"] >= _llama_param_bytes(d)
    assert by["cold_disk"]["extra"]["page_cache"] == "dropped" and by["cold_page_cache"]["extra"]["page_cache"] == "cached"
    assert by["hit"]["median"] < by["warm"]["median"]      # a dictionary lookup against 14 slot copies


def test_bench_swap_refuses_to_time_a_state_it_did_not_reach(tmp_path, monkeypatch):
    import openlora_kernels as olk

    real = olk.MultiLoRAModel.acquire
    monkeypatch.setattr(olk.MultiLoRAModel, "acquire", lambda self, names: {n: None for n in names})
    with pytest.raises(bench_swap.StateError, match="slot"):
        bench_swap.main(["--quick", "--device", "cpu", "--out", str(tmp_path / "s.csv"), "--reps", "1"])
    monkeypatch.setattr(olk.MultiLoRAModel, "acquire", real)


def test_report_and_plot_swap(swap_csv, tmp_path):
    md = tmp_path / "swap.md"
    assert report.main([swap_csv, "--out", str(md)]) == 0
    text = md.read_text()
    rows = common.read_rows(swap_csv)
    assert "| cold_disk | PEFT dir (disk) -> host -> slot |" in text
    warm = next(r for r in rows if r["contender"] == "warm")
    assert f"| {warm['median']:,.3f} |" in text
    pytest.importorskip("matplotlib")
    from benchmarks import plot

    assert plot.main([swap_csv, "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "swap_latency.png").stat().st_size > 10_000


def test_docs_show_the_committed_model_and_swap_results():
    """docs/benchmarks.md pastes the report of the committed CPU files verbatim: a regenerated
    results file must come with its tables."""
    with open(os.path.join(ROOT, "docs", "benchmarks.md"), encoding="utf-8") as f:
        doc = f.read()
    for name, render in (("model", report.model_markdown), ("swap", report.swap_markdown)):
        rel = f"benchmarks/results/{name}_cpu_quick.csv"
        rows = common.read_rows(os.path.join(ROOT, rel))
        assert rows and rows[0]["device"].startswith("CPU: ") and "+dirty" not in rows[0]["commit"]
        assert render(rows, rel) in doc, f"docs/benchmarks.md does not show the tables of {rel}"


# ------------------------------------------------------------- where results go, and safely


def test_benchmarks_write_into_an_untracked_folder_by_default(tmp_path):
    from benchmarks import bench_hf_cpu_decode, bench_train, bench_vllm_wrapper

    if not os.environ.get("OPENLORA_BENCH_OUT"):
        assert common.RESULTS_DIR == os.path.join(ROOT, "benchmarks", "out")
    assert common.COMMITTED_DIR == os.path.join(ROOT, "benchmarks", "results")
    defaults = [bench_hf_cpu_decode.DEFAULT_OUT, bench_train.RESULTS, bench_vllm_wrapper.DEFAULT_OUT,
                bench_model.parse_args(["--quick"]).out_dir, bench_swap.parse_args(["--quick"]).out_dir,
                bench_kernels.parse_args(["--quick"]).out_dir]
    for d in defaults:
        assert os.path.commonpath([d, common.RESULTS_DIR]) == common.RESULTS_DIR, d
    if shutil.which("git") and os.path.exists(os.path.join(ROOT, ".git")):
        probes = [os.path.join("benchmarks", "out", "kernels_cpu_quick.csv"),
                  os.path.join("benchmarks", "results", "kernels_cpu_quick.csv.partial")]
        ignored = subprocess.run(["git", "check-ignore", *probes], cwd=ROOT, capture_output=True, text=True)
        assert ignored.stdout.split() == probes, "benchmarks/out/ and *.partial files must be git-ignored"
    code = "from benchmarks import common; print(common.RESULTS_DIR)"
    env = {**os.environ, "OPENLORA_BENCH_OUT": str(tmp_path / "mine")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tmp_path / "mine")


ROW = {"benchmark": "t", "kernel": "k", "contender": "c", "shape": "s", "metric": "time", "median": 1.0,
       "p20": 0.9, "p80": 1.1, "unit": "ms"}
ENV = {"device": "CPU: test", "torch": "0", "triton": "0", "cuda": "none", "commit": "abc", "date": "today"}


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_write_rows_appends_and_an_interrupted_write_leaves_the_file_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "r.csv")
    common.write_rows(path, [ROW, {**ROW, "contender": "d", "T": 8}], ENV)
    common.write_rows(path, [{**ROW, "contender": "e"}], ENV)
    rows = common.read_rows(path)
    assert [r["contender"] for r in rows] == ["c", "d", "e"] and rows[1]["extra"] == {"T": 8}
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)      # not mkstemp's private mode
    before = _bytes(path)

    def rows_then_ctrl_c():
        yield {**ROW, "contender": "f"}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        common.write_rows(path, rows_then_ctrl_c(), ENV)
    real_fsync = os.fsync

    def interrupted(fd):                  # interrupted while the new contents are being written out
        real_fsync(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        common.write_rows(path, [{**ROW, "contender": "g"}], ENV)
    monkeypatch.setattr(os, "fsync", real_fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        common.write_rows(path, [{**ROW, "contender": "h"}], ENV)
    assert _bytes(path) == before
    assert sorted(os.listdir(tmp_path)) == ["r.csv"]            # no temporary file left behind
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="other.csv is not a results file"):
        common.write_rows(str(tmp_path / "other.csv"), [ROW], ENV)
    assert (tmp_path / "other.csv").read_text() == "a,b\n1,2\n"


def test_a_fresh_run_replaces_the_old_file_only_when_it_ends(tmp_path):
    path = str(tmp_path / "r.csv")
    common.write_rows(path, [{**ROW, "contender": "old"}], ENV)
    before = _bytes(path)
    with pytest.raises(KeyboardInterrupt):
        with common.ResultsFile(path) as rf:
            rf.write([{**ROW, "contender": "new1"}], ENV)
            raise KeyboardInterrupt
    assert _bytes(path) == before
    assert [r["contender"] for r in common.read_rows(path + ".partial")] == ["new1"]
    with common.ResultsFile(path) as rf:                          # a run that ends
        rf.write([{**ROW, "contender": "new2"}], ENV)
        rf.write([{**ROW, "contender": "new3"}], ENV)
        assert _bytes(path) == before                             # not before the end
    assert [r["contender"] for r in common.read_rows(path)] == ["new2", "new3"]
    assert not os.path.exists(path + ".partial") and rf.rows == 2
    with pytest.raises(RuntimeError, match="closed"):
        rf.write([ROW], ENV)
    with pytest.raises(KeyboardInterrupt):                        # --append: rows go on the end, whole
        with common.ResultsFile(path, append=True) as rf:
            rf.write([{**ROW, "contender": "more"}], ENV)
            raise KeyboardInterrupt
    assert [r["contender"] for r in common.read_rows(path)] == ["new2", "new3", "more"]
    new = str(tmp_path / "new.csv")                               # no old file: straight to the path
    with pytest.raises(KeyboardInterrupt):
        with common.ResultsFile(new) as rf:
            rf.write([ROW], ENV)
            raise KeyboardInterrupt
    assert len(common.read_rows(new)) == 1 and not os.path.exists(new + ".partial")


def test_a_benchmark_killed_mid_run_leaves_the_results_file_intact(tmp_path):
    """bench_swap --quick over an existing results file, killed (SIGKILL: no clean-up of any kind)
    once it has measured something: the old file is byte for byte what it was."""
    import signal
    import time

    path = str(tmp_path / "swap.csv")
    common.write_rows(path, [{**ROW, "benchmark": "swap", "contender": "old"}], ENV)
    before = _bytes(path)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_swap", "--quick", "--device", "cpu", "--out", path],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(path + ".partial") and len(common.read_rows(path + ".partial")) >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "bench_swap ended before it could be interrupted: " + proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _bytes(path) == before
    assert common.read_rows(path + ".partial")[0]["benchmark"] == "swap"
    assert "bench_swap: " in proc.stderr.read()                # progress lines on stderr


def test_bench_hf_cpu_decode_shows_progress_on_stderr(tmp_path, capsys):
    from benchmarks import bench_hf_cpu_decode

    out = str(tmp_path / "hf.csv")
    bench_hf_cpu_decode.main(["--rows", "4", "--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "2",
                              "--vocab", "64", "--adapters", "2", "--rank", "4", "--rounds", "2", "--reps", "1",
                              "--out", out])
    cap = capsys.readouterr()
    progress = [ln for ln in cap.err.splitlines() if "bench_hf_cpu_decode:" in ln]
    assert len(progress) == 3 and "building the model and 2 PEFT adapters" in progress[0]
    assert progress[1].endswith("round 1/2 of 6 contenders") and progress[2].endswith("round 2/2 of 6 contenders")
    rows = common.read_rows(out)
    assert len(rows) == 6 and {r["contender"] for r in rows} >= {"base", "openlora", "peft_mixed"}
    assert "wrote " + out in cap.out


# ------------------------------------------------------------- training, prefetch, A/B (CPU)


def test_bench_train_small_run_writes_rows(tmp_path):
    from benchmarks import bench_train

    out = str(tmp_path / "train.csv")
    assert bench_train.main(["--adapters", "2", "--rows", "2", "--seq", "4", "--rounds", "1", "--out", out]) == 0
    rows = common.read_rows(out)
    assert [r["contender"] for r in rows] == ["ours", "peft"]
    assert all(r["median"] > 0 and "adamw=fused" in r["shape"] for r in rows)
    assert rows[0]["extra"]["peft_over_ours"] > 0


def test_bench_prefetch_small_run_writes_rows(tmp_path):
    from benchmarks import bench_prefetch

    out = str(tmp_path / "prefetch.csv")
    assert bench_prefetch.main(["--rounds", "1", "--delay", "0.05", "--out", out]) == 0
    got = {r["contender"]: r for r in common.read_rows(out)}
    assert set(got) == {"idle", "prefetch", "blocking_load", "first_use_prefetched", "first_use_cold"}
    # the cold first use reads the slow source inside the forward; the prefetched one does not
    assert got["first_use_cold"]["median"] >= 50


def test_bench_ab_compares_two_checkouts(tmp_path, capsys):
    from benchmarks import bench_ab

    out = str(tmp_path / "ab.csv")
    assert bench_ab.main(["--before", ROOT, "--after", ROOT, "--rounds", "2", "--reps", "1", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "max |after - before| over sampled logits = 0" in text
    rows = common.read_rows(out)
    assert sorted(r["contender"] for r in rows) == ["base@after", "base@before", "openlora@after", "openlora@before"]
    with pytest.raises(SystemExit, match="--before"):
        bench_ab.main(["--before", str(tmp_path)])


def test_bench_pool_quick_run_writes_rows(tmp_path):
    from benchmarks import bench_pool

    out = str(tmp_path / "pool.csv")
    assert bench_pool.main(["--quick", "--reps", "2", "--threads", "1", "--out", out]) == 0
    rows = common.read_rows(out)
    got = {(r["contender"], r["metric"], r["extra"].get("rank")) for r in rows}
    for c in ("padded", "packed"):
        assert (c, "resident_at_first_eviction", None) in got and (c, "decode_forward_ms", None) in got
        assert all((c, "load_ms", r) in got for r in bench_pool.RANKS)
    res = {r["contender"]: float(r["median"]) for r in rows if r["metric"] == "resident_at_first_eviction"}
    assert res["packed"] > res["padded"]          # same bytes, more adapters resident
    storage = {r["contender"]: r for r in rows if r["benchmark"] == "storage_dtype_cpu"}
    for t in ("fp32", "bf16", "fp16", "fp8"):     # the storage dtypes' speed and error (bench_storage_dtype)
        r = storage["openlora_" + t]
        assert float(r["median"]) > 0 and r["extra"]["adapter_dtype"] == t
        assert 0 <= float(r["extra"]["diff_vs_lora_effect"]) < {"fp32": 1e-4, "fp8": 0.3}.get(t, 0.05)
