"""GPU-only behaviour of the kernels: CUDA graphs, streams, no host syncs, index safety, and the
backward (gradients against the float64 reference on the GPU backends, bf16 tensor cores, no host
sync, CUDA-graph capture).

(The bf16 tensor-core parity runs in test_ops_parity.py, whose tests use CUDA tensors when a GPU
is present.) Skipped without CUDA; run with ``pytest -m gpu`` on a GPU machine.
"""
import pytest
import torch

import openlora_kernels as olk

from lora_reference import assert_close, assert_grad_close, make_problem, reference_delta, reference_grads

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
    # warm up first: the first call compiles (Triton) or builds / loads (CUDA) its kernels, which
    # can outlast the sleep below and would let the side stream's work finish inside the window
    olk.add_lora(p.y.clone(), p.x, p.a[0], p.b[0], p.indices, p.scalings, p.ranks, backend=backend)
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


# ---------------------------------------------------------------------------------- backward


def _grad_problem(T, dtype, block_m=None, seed=0):
    """Mixed per-slice ranks (NaN beyond them), rank-major B (the pool's layout), -1 rows, a slot
    no row uses, slices of unequal widths; on the GPU."""
    S, K, widths, R = 6, 256, [192, 64, 32], 16
    g = torch.Generator().manual_seed(seed)
    idx = torch.tensor([-1, 0, 1, 3, 4, 5])[torch.randint(0, 6, (T,), generator=g)]   # slot 2: no row
    ranks = torch.tensor([[0, 16, 8, 5, 16, 1], [0, 16, 3, 16, 9, 2], [0, 16, 16, 7, 1, 12]])
    p = make_problem(T, K, widths, S, R, dtype=dtype, device="cuda", indices=idx, ranks=ranks, seed=seed)
    p.b = [B.transpose(1, 2).contiguous().transpose(1, 2) for B in p.b]
    meta = olk.build_batch_meta(p.indices, S, block_m=block_m)
    dy = torch.randn(p.y.shape, generator=g).to(dtype).cuda()
    return p, meta, dy


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,block_m", [(5, None), (300, None), (96, 16), (200, 64)])
def test_backward_parity(backend, dtype, T, block_m):
    """lora_backward and add_lora's autograd on the GPU backends (tensor-core weight gradients and
    swapped-role shrink / expand for 16-bit dtypes) against the float64 reference."""
    usable(backend)
    p, meta, dy = _grad_problem(T, dtype, block_m, seed=T)
    ref = reference_grads(p, dy)
    dx, dA, dB = olk.lora_backward(dy, p.x, p.a, p.b, meta, p.scalings, p.ranks, backend=backend)
    assert_grad_close(dx, ref["x"], dtype, "dx")
    for i in range(3):
        assert_grad_close(dA[i], (ref["a"][0][i], ref["a"][1][i]), dtype, f"dA[{i}]")
        assert_grad_close(dB[i], (ref["b"][0][i], ref["b"][1][i]), dtype, f"dB[{i}]")
    x = p.x.clone().requires_grad_()
    a = [t.clone().requires_grad_() for t in p.a]
    b = [t.clone().requires_grad_() for t in p.b]
    sc = p.scalings.clone().requires_grad_()
    y = p.y.clone()
    olk.add_lora(y, x, a, b, meta, sc, p.ranks, backend=backend)
    y.backward(dy)
    assert_grad_close(x.grad, ref["x"], dtype, "autograd dx")
    for i in range(3):
        assert_grad_close(a[i].grad, (ref["a"][0][i], ref["a"][1][i]), dtype, f"autograd dA[{i}]")
        assert_grad_close(b[i].grad, (ref["b"][0][i], ref["b"][1][i]), dtype, f"autograd dB[{i}]")
    assert_grad_close(sc.grad, ref["scalings"], torch.float32, "autograd dscalings")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_host_sync_in_the_backward(backend):
    usable(backend)
    p, meta, dy = _grad_problem(64, torch.bfloat16)
    x = p.x.clone().requires_grad_()
    a = [t.clone().requires_grad_() for t in p.a]
    b = [t.clone().requires_grad_() for t in p.b]

    def step():
        y = p.y.clone()
        olk.add_lora(y, x, a, b, meta, p.scalings, p.ranks, backend=backend)
        y.backward(dy)
        olk.lora_backward(dy, p.x, p.a, p.b, meta, p.scalings, p.ranks, backend=backend)

    step()                                   # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_backward_captured_in_a_cuda_graph(backend):
    """lora_backward captured once, replayed with new dy and x: the gradients of each replay."""
    usable(backend)
    p, meta, dy = _grad_problem(48, torch.bfloat16, seed=3)
    x_s, dy_s = p.x.clone(), dy.clone()

    def step():
        return olk.lora_backward(dy_s, x_s, p.a, p.b, meta, p.scalings, p.ranks, backend=backend)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for trial in range(3):
        dy_s.copy_(torch.randn_like(dy_s))
        x_s.copy_(torch.randn_like(x_s))
        graph.replay()
        torch.cuda.synchronize()
        p.x = x_s.clone()
        ref = reference_grads(p, dy_s)
        assert_grad_close(out[0], ref["x"], torch.bfloat16, f"replay {trial}: dx")
        for i in range(3):
            assert_grad_close(out[1][i], (ref["a"][0][i], ref["a"][1][i]), torch.bfloat16, f"replay {trial}: dA[{i}]")
            assert_grad_close(out[2][i], (ref["b"][0][i], ref["b"][1][i]), torch.bfloat16, f"replay {trial}: dB[{i}]")
