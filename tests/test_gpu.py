"""GPU-only behaviour of the kernels: CUDA graphs, streams, no host syncs, index safety.

(The bf16 tensor-core parity runs in test_ops_parity.py, whose tests use CUDA tensors when a GPU
is present.) Skipped without CUDA; run with ``pytest -m gpu`` on a GPU machine.
"""
import pytest
import torch

import openlora_kernels as olk

from lora_reference import assert_close, make_problem, reference_delta

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ["triton", "cuda"]


def usable(backend):
    info = olk.available_backends("cuda")[backend]
    if not info.usable:
        pytest.skip(f"{backend}: {info.reason}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("T", [1, 7, 64, 300])
def test_cuda_graph_replay_with_changing_indices(backend, T):
    """Capture metadata build + add_lora once; replay with new indices and x each time."""
    usable(backend)
    torch.manual_seed(T)
    S, K, widths, R = 8, 256, [192, 64, 64], 16
    p = make_problem(T, K, widths, S, R, dtype=torch.bfloat16, device="cuda", ranks="mixed", poison_padding=False)
    x_static, idx_static = p.x.clone(), p.indices.clone()
    y_static = torch.empty_like(p.y)

    def step():
        y_static.copy_(p.y)
        olk.add_lora(y_static, x_static, p.a, p.b, idx_static, p.scalings, p.ranks, backend=backend)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up: JIT compilation and allocator
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for trial in range(4):
        new_idx = torch.randint(-1, S, (T,), device="cuda")
        if trial == 1:
            new_idx.fill_(-1)
        if trial == 2:
            new_idx.fill_(3)
        idx_static.copy_(new_idx)
        x_static.copy_(torch.randn_like(x_static))
        graph.replay()
        torch.cuda.synchronize()
        p.indices, p.x = new_idx, x_static.clone()
        assert_close(y_static, p.y.double().cpu() + reference_delta(p), torch.bfloat16, f"replay {trial}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_runs_on_the_current_stream(backend):
    """Work is queued on the caller's current stream, not the default one."""
    usable(backend)
    p = make_problem(96, 512, [384], 6, 16, dtype=torch.float16, device="cuda", ranks="mixed")
    side = torch.cuda.Stream()
    y = p.y.clone()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keep the side stream busy: work on the default stream would finish first
        olk.add_lora(y, p.x, p.a[0], p.b[0], p.indices, p.scalings, p.ranks, backend=backend)
        done = torch.cuda.Event()
        done.record(side)
    assert not done.query(), "the op should be queued behind the sleep on the side stream"
    side.synchronize()
    assert_close(y, p.y.double().cpu() + reference_delta(p), torch.float16)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_host_sync_in_add_lora(backend):
    usable(backend)
    p = make_problem(64, 256, [128, 32, 32], 8, 16, dtype=torch.bfloat16, device="cuda", ranks="per_slice")
    y = p.y.clone()
    olk.add_lora(y, p.x, p.a, p.b, p.indices, p.scalings, p.ranks, backend=backend)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        olk.add_lora(y, p.x, p.a, p.b, p.indices, p.scalings, p.ranks, backend=backend)
        h = olk.lora_shrink(p.x, p.a, p.indices, p.ranks, backend=backend)
        olk.lora_expand(y, h, p.b, p.indices, p.scalings, p.ranks, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_out_of_range_indices_and_ranks_are_safe_without_debug_checks(backend):
    """Garbage indices/ranks never cause out-of-bounds access: rows with bad slots are left alone
    and ranks are clamped. (Run under compute-sanitizer by benchmarks/gpu_suite.sh.)"""
    usable(backend)
    S, R = 4, 8
    p = make_problem(40, 128, [96], S, R, dtype=torch.float16, device="cuda", poison_padding=False)
    bad_idx = torch.randint(-50, 50, (40,), device="cuda")
    y = p.y.clone()
    olk.add_lora(y, p.x, p.a[0], p.b[0], bad_idx, p.scalings, backend=backend)
    torch.cuda.synchronize()
    p.indices = torch.where((bad_idx >= 0) & (bad_idx < S), bad_idx, -1)
    assert_close(y, p.y.double().cpu() + reference_delta(p), torch.float16)
    # ranks above R are clamped in-kernel when debug checks are off (the GPU check needs a sync)
    y2 = p.y.clone()
    big = torch.tensor([100, -3, 8, 2], dtype=torch.int32, device="cuda")
    olk.add_lora(y2, p.x, p.a[0], p.b[0], p.indices, p.scalings, big, backend=backend)
    torch.cuda.synchronize()
    p.ranks = big.clamp(0, R)
    assert_close(y2, p.y.double().cpu() + reference_delta(p), torch.float16)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_debug_checks_raise_on_gpu(backend):
    usable(backend)
    p = make_problem(8, 64, [32], 3, 4, device="cuda")
    prev = olk.set_debug_checks(True)
    try:
        with pytest.raises(IndexError):
            olk.add_lora(p.y.clone(), p.x, p.a[0], p.b[0], torch.full((8,), 5, device="cuda"), p.scalings,
                         backend=backend)
        with pytest.raises(ValueError, match="exceeds"):
            olk.add_lora(p.y.clone(), p.x, p.a[0], p.b[0], p.indices, p.scalings,
                         torch.tensor([1, 9, 1], dtype=torch.int32, device="cuda"), backend=backend)
    finally:
        olk.set_debug_checks(prev)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_large_offsets_beyond_int32(backend):
    """Row offsets T * stride beyond 2**31 elements must not overflow (int64 offset arithmetic)."""
    usable(backend)
    free, _ = torch.cuda.mem_get_info()
    K, T = 8192, (2**31 // 8192) + 64          # T*K > 2**31 elements of bf16: 4 GiB for x
    if free < 3 * T * K * 2:
        pytest.skip("not enough GPU memory")
    x = torch.empty(T, K, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.zeros(T, 64, dtype=torch.bfloat16, device="cuda")
    A = torch.randn(2, 16, K, dtype=torch.bfloat16, device="cuda") / K ** 0.5
    B = torch.randn(2, 64, 16, dtype=torch.bfloat16, device="cuda") / 4
    idx = torch.full((T,), -1, dtype=torch.int64, device="cuda")
    rows = torch.tensor([0, T // 2, T - 1], device="cuda")
    idx[rows] = torch.tensor([0, 1, 1], device="cuda")
    olk.add_lora(y, x, A, B, idx, torch.ones(2, device="cuda"), backend=backend)
    for r, s in zip(rows.tolist(), (0, 1, 1)):
        want = (x[r].float() @ A[s].float().T) @ B[s].float().T
        torch.testing.assert_close(y[r].float(), want, atol=3e-2, rtol=2e-2)
    assert int((y != 0).any(dim=1).sum()) <= 3
