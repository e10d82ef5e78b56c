"""Bound plans of the GPU backends (BoundLoRA on "triton" and "cuda"), checked without a GPU: a
call through a bound plan must launch exactly what the general path launches (benchmarks/host_stub.py
stubs the launches; docs/kernels.md, "Host cost per call")."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import openlora_kernels as olk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _cuda_binding():
    try:
        from openlora_kernels.ops import _cuda_sgmv  # type: ignore[attr-defined]
    except ImportError:
        pytest.skip("the CUDA binding is not built (bash .ci/compile_cuda.sh)")
    if not hasattr(_cuda_sgmv, "set_launch_stub"):
        pytest.skip("the CUDA binding was built from older sources (no launch stub)")
    return _cuda_sgmv


def _weights(dt, widths, rk, layout, S, R=16, K=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(S, R, K, generator=g).to(dt) for _ in widths]
    if layout == "pool":
        b = [torch.randn(S, R, w, generator=g).to(dt).transpose(1, 2) for w in widths]
    else:
        b = [torch.randn(S, w, R, generator=g).to(dt) for w in widths]
    ranks = {"none": None, "per_slot": torch.randint(0, R + 1, (S,), generator=g, dtype=torch.int32),
             "per_slice": torch.randint(0, R + 1, (len(widths), S), generator=g)}[rk]
    return a, b, torch.rand(S, generator=g), ranks


@pytest.mark.parametrize("dt,widths,rk,layout,T,S,block_m", [
    (torch.bfloat16, (96,), "per_slot", "pool", 8, 8, 1),
    (torch.float16, (64, 32, 32), "none", "standard", 6, 3, 2),
    (torch.float32, (48, 16, 8, 8, 24, 8, 8, 8, 16), "per_slice", "pool", 9, 3, 4),    # 2 launch groups
    (torch.bfloat16, (64, 32, 32), "per_slot", "pool", 40, 2, 16),                      # shrink + expand
])
def test_cuda_bound_plan_launches_what_run_launches(dt, widths, rk, layout, T, S, block_m):
    from benchmarks.host_stub import stub_cuda
    from openlora_kernels.ops import cuda_ext

    _cuda_binding()
    a, b, sc, ranks = _weights(dt, widths, rk, layout, S)
    with stub_cuda() as mod, torch.no_grad():
        op = olk.BoundLoRA(a, b, sc, ranks, backend="cuda")
        assert isinstance(op._bound, cuda_ext.BoundAdd)
        x, y = torch.randn(T, 64).to(dt), torch.randn(T, sum(widths)).to(dt)
        meta = olk.build_batch_meta(torch.arange(T) % S, S, block_m=block_m)
        calls = []
        for _ in range(3):            # the checked call, then the fast path (twice)
            n0 = mod.stub_launch_count()
            op(y, x, meta)
            calls.append(mod.stub_launches()[-(mod.stub_launch_count() - n0):])
        n0 = mod.stub_launch_count()
        cuda_ext.add_lora(y, x, a, b, sc, ranks, meta)        # the general path
        general = mod.stub_launches()[-(mod.stub_launch_count() - n0):]
    groups = -(-len(widths) // cuda_ext.MAX_SLICES)
    assert len(general) == groups * (2 if block_m >= 16 else 1)
    for got in calls:
        assert [(g["kernel"], g["grid"], g["threads"], g["smem_bytes"]) for g in got] == \
               [(g["kernel"], g["grid"], g["threads"], g["smem_bytes"]) for g in general]
        if block_m < 16:        # (the split route's h is a new buffer per call)
            assert [g["params"] for g in got] == [g["params"] for g in general]


def test_cuda_fast_path_declines_what_it_has_not_seen():
    from benchmarks.host_stub import stub_cuda

    _cuda_binding()
    a, b, sc, ranks = _weights(torch.bfloat16, (32,), "per_slot", "pool", 4)
    with stub_cuda(), torch.no_grad():
        op = olk.BoundLoRA(a[0], b[0], sc, ranks, backend="cuda")
        meta = olk.build_batch_meta(torch.arange(4), 4)
        x, y = torch.randn(4, 64).bfloat16(), torch.randn(4, 32).bfloat16()
        assert not op._bound.fast(y, x, meta)            # nothing checked yet
        op(y, x, meta)
        assert op._bound.fast(y, x, meta)
        assert not op._bound.fast(y[:, :16], x, meta)    # another shape: BoundLoRA's checks first
        with pytest.raises(ValueError, match="y: has 16 columns"):
            op(y[:, :16], x, meta)
        with pytest.raises(TypeError, match="x: dtype|dtype torch.float16"):
            op(y, x.half(), meta)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc for the stand-in libcuda")
def test_triton_bound_plan_launches_what_the_jit_launches():
    """tests/triton_bound_check.py (kernels compiled for sm_90 offline, launches stubbed at the driver)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "triton_bound_check.py")],
                         capture_output=True, text=True, env=env, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "0 failed" in out.stdout


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc for the stand-in libcuda")
def test_bench_host_overhead_quick(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    out_csv = tmp_path / "host.csv"
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_host_overhead", "--quick", "--out", str(out_csv)],
                         capture_output=True, text=True, env=env, timeout=1200, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("host us/call triton=") and " cuda=" in last and " step_ms=" in last
    from benchmarks.common import read_rows
    rows = read_rows(str(out_csv))
    assert {r["metric"] for r in rows} >= {"host_us_per_call", "host_ms_per_step"}
    assert all(r["commit"] and r["device"] for r in rows)
