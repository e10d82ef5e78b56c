"""add_lora / lora_shrink / lora_expand against the float64 reference, on every usable backend.

On a CPU-only machine: backend "torch", and "triton" under Triton's interpreter (fp32, fp16, and
bf16 through the interpreter-only fp32 upcast of tl.dot). With a GPU the same tests run on CUDA
tensors (bf16 then exercises the real tensor-core path).
"""
import pytest
import torch

import openlora_kernels as olk
from openlora_kernels.ops.configs import override_config

from lora_reference import assert_close, make_problem, reference_delta, reference_shrink

BACKENDS = ["torch", "cpu", "triton", "cuda"]


def usable(backend, device):
    info = olk.available_backends(device)[backend]
    if not info.usable:
        pytest.skip(f"{backend}: {info.reason}")


def run_add(p, backend, meta=None):
    y = p.y.clone()
    out = olk.add_lora(y, p.x, p.lora_a(), p.lora_b(), meta if meta is not None else p.indices, p.scalings,
                       p.ranks, backend=backend)
    assert out is y
    return y


def check_add(p, y_out, dtype):
    ref = p.y.double().cpu() + reference_delta(p)
    assert_close(y_out, ref, dtype)
    untouched = (p.indices.cpu() < 0)
    assert torch.equal(y_out.cpu()[untouched], p.y.cpu()[untouched]), "rows with slot -1 must be bit-for-bit untouched"


# (T, K, widths, S, R, ranks, index pattern) — odd sizes: no K or N is a multiple of any block size.
CASES = {
    "T0": (0, 37, [29], 3, 8, None, "random"),
    "T1": (1, 37, [29], 3, 8, None, "random"),
    "odd": (13, 70, [45], 5, 16, "mixed", "random"),
    "all_minus1": (9, 33, [21], 3, 8, None, "none"),
    "one_adapter": (21, 50, [31], 4, 16, None, "one"),
    "distinct": (6, 41, [27], 6, 8, "mixed", "distinct"),
    "long_segments": (70, 66, [40], 3, 16, "mixed", "random"),
    "qkv_unequal": (11, 48, [40, 12, 12], 4, 16, "per_slice", "random"),
    "five_slices": (7, 24, [9, 1, 17, 5, 3], 3, 8, "mixed", "random"),
    "rank_tiny": (10, 19, [23], 4, 2, "mixed", "random"),
}


def indices_for(pattern, T, S):
    if pattern == "random":
        return torch.randint(-1, S, (T,))
    if pattern == "none":
        return torch.full((T,), -1)
    if pattern == "one":
        return torch.full((T,), S - 1)
    if pattern == "distinct":
        return torch.randperm(S)[:T]
    raise ValueError(pattern)


def problem(case, dtype, device, **kw):
    T, K, widths, S, R, ranks, pattern = CASES[case]
    return make_problem(T, K, widths, S, R, dtype=dtype, device=device, ranks=ranks,
                        indices=indices_for(pattern, T, S), **kw)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_add_lora_cases(case, dtype, backend, device):
    usable(backend, device)
    p = problem(case, dtype, device)
    check_add(p, run_add(p, backend), dtype)


@pytest.mark.parametrize("block_m", [1, 2, 4, 16, 32, 64])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "shrink_expand"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_triton_tile_modes(block_m, fused, dtype, device):
    """Every tile mode (CUDA-core and tensor-core tiles) through both routes of the Triton backend."""
    usable("triton", device)
    p = make_problem(45, 70, [33, 10], 5, 16, dtype=dtype, device=device, ranks="per_slice")
    meta = olk.build_batch_meta(p.indices, 5, block_m=block_m)
    with override_config("route", FUSED=fused):
        check_add(p, run_add(p, "triton", meta), dtype)


@pytest.mark.parametrize("split_k", [2, 3])
def test_triton_split_k_shrink(split_k, device):
    usable("triton", device)
    p = make_problem(30, 200, [24], 4, 16, device=device, ranks="mixed")
    meta = olk.build_batch_meta(p.indices, 4, block_m=16)
    with override_config("shrink", SPLIT_K=split_k, BLOCK_K=32):
        h = olk.lora_shrink(p.x, p.lora_a(), meta, p.ranks, backend="triton")
    assert_close(h[0], reference_shrink(p)[0], torch.float32, "h")


@pytest.mark.parametrize("fused_chunks", [1, 3])
def test_triton_fused_output_chunks(fused_chunks, device):
    """The fused kernel splits a slice's output tiles over N_CHUNKS programs."""
    usable("triton", device)
    p = make_problem(9, 40, [150, 70], 3, 8, device=device, ranks="mixed")
    meta = olk.build_batch_meta(p.indices, 3, block_m=1)
    with override_config("fused", N_CHUNKS=fused_chunks, BLOCK_N=32), override_config("route", FUSED=True):
        check_add(p, run_add(p, "triton", meta), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_strided_x_and_y(backend, dtype, device):
    usable(backend, device)
    p = make_problem(17, 45, [30, 9], 4, 8, dtype=dtype, device=device, ranks="mixed", x_strided=True, y_strided=True)
    assert not p.x.is_contiguous() and not p.y.is_contiguous()
    check_add(p, run_add(p, backend), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_column_major_x(backend, device):
    """Non-unit stride along K still works (slow path, but correct)."""
    usable(backend, device)
    p = make_problem(12, 20, [16], 3, 4, device=device)
    p.x = p.x.t().contiguous().t()
    assert p.x.stride(1) != 1
    check_add(p, run_add(p, backend), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_shrink_then_expand(backend, dtype, device):
    """The two halves: h exactly 0 where the contract says so, and expand(shrink(x)) == add_lora."""
    usable(backend, device)
    p = make_problem(23, 52, [20, 8, 8], 5, 16, dtype=dtype, device=device, ranks="per_slice")
    h = olk.lora_shrink(p.x, p.a, p.indices, p.ranks, backend=backend)
    assert h.shape == (3, 23, 16) and h.dtype == torch.float32
    ref_h = reference_shrink(p)
    assert_close(h, ref_h, torch.float32 if dtype == torch.float32 else dtype, "h")
    zero = ref_h == 0
    assert torch.equal(h.cpu()[zero], torch.zeros_like(h.cpu()[zero])), "h must be 0 for -1 rows / beyond rank"
    y = p.y.clone()
    olk.lora_expand(y, h, p.b, p.indices, p.scalings, p.ranks, backend=backend)
    check_add(p, y, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expand_accepts_half_intermediate(backend, device):
    usable(backend, device)
    p = make_problem(10, 30, [14], 3, 8, dtype=torch.float16, device=device)
    h = olk.lora_shrink(p.x, p.a[0], p.indices, backend="torch").to(torch.float16)
    y = p.y.clone()
    olk.lora_expand(y, h, p.b[0], p.indices, p.scalings, backend=backend)
    check_add(p, y, torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_metadata_reused_across_layers(backend, device):
    """One LoRABatchMeta per forward, shared by layers of different shapes."""
    usable(backend, device)
    idx = torch.randint(-1, 4, (19,))
    meta = olk.build_batch_meta(idx.to(device), 4)
    for K, widths in ((40, [24]), (24, [40, 8, 8]), (64, [16])):
        p = make_problem(19, K, widths, 4, 8, device=device, indices=idx, ranks="mixed")
        check_add(p, run_add(p, backend, meta), torch.float32)


def test_backends_agree_on_a_larger_batch(device):
    """torch (both strategies) and triton agree on a batch big enough for the segment path."""
    p = make_problem(300, 96, [80, 16], 6, 16, device=device, ranks="mixed")
    outs = {"torch": run_add(p, "torch")}
    if olk.available_backends(device)["triton"].usable:
        outs["triton"] = run_add(p, "triton")
    for name, y in outs.items():
        check_add(p, y, torch.float32)


def test_rank_zero_slot_and_zero_scaling_leave_rows_unchanged(device):
    p = make_problem(8, 16, [12], 2, 4, device=device, indices=torch.tensor([0, 1, 0, 1, 0, 1, 0, 1]),
                     ranks=torch.tensor([0, 4], dtype=torch.int32))
    p.scalings = torch.tensor([1.0, 0.0], device=device)
    for backend in ("torch", "triton"):
        if not olk.available_backends(device)[backend].usable:
            continue
        y = run_add(p, backend)
        assert torch.equal(y[0::2].cpu(), p.y[0::2].cpu())       # rank 0: untouched
        torch.testing.assert_close(y[1::2], p.y[1::2])           # scaling 0: adds exact zeros


def test_default_backend_auto(device):
    p = make_problem(5, 16, [8], 2, 4, device=device)
    check_add(p, run_add(p, "auto"), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_rank_major_lora_b_view(backend, dtype, device):
    """lora_b given as the [S, N, R] view of rank-major [S, R, N] storage (what the adapter pool
    keeps): strides (R*N, 1, N). Multi-slice, mixed ranks, NaN in the rank padding."""
    usable(backend, device)
    p = make_problem(14, 40, [36, 12], 5, 8, dtype=dtype, device=device, ranks="mixed")
    p.b = [B.transpose(1, 2).contiguous().transpose(1, 2) for B in p.b]
    assert p.b[0].stride(1) == 1
    check_add(p, run_add(p, backend), dtype)
    h = olk.lora_shrink(p.x, p.a, p.indices, p.ranks, backend=backend)
    y = p.y.clone()
    olk.lora_expand(y, h, p.b, p.indices, p.scalings, p.ranks, backend=backend)
    check_add(p, y, dtype)


@pytest.mark.parametrize("block_m", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_cpu_native_kernel_on_long_segments(block_m, dtype):
    """The native CPU kernel takes any segment length in blocks of 4 rows (forced decode tiles)."""
    usable("cpu", "cpu")
    p = make_problem(75, 64, [40, 24], 3, 16, dtype=dtype, ranks="per_slice")
    meta = olk.build_batch_meta(p.indices, 3, block_m=block_m)
    check_add(p, run_add(p, "cpu", meta), dtype)
    h = olk.lora_shrink(p.x, p.a, meta, p.ranks, backend="cpu")
    assert_close(h, reference_shrink(p), torch.float32 if dtype == torch.float32 else dtype, "h")
