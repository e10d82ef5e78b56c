"""The Triton kernels' 16-byte access paths (VEC > 1, chosen by the host from alignment alone) and
per-slice B strides give add_lora's result: both B layouts, ranks not a multiple of the vector
width, NaN beyond each slot's rank (read up to the next multiple of VEC in the standard layout,
then zeroed), multi-slice pool B with unequal widths (no per-call copies)."""
import pytest
import torch

import openlora_kernels as olk
from openlora_kernels.ops import triton_sgmv


def _usable():
    info = olk.available_backends("cpu")["triton"]
    if not info.usable:
        pytest.skip(info.reason)


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["standard", "pool"])
@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_vector_paths_match_the_reference(dt, layout, block_m):
    _usable()
    g = torch.Generator().manual_seed(7)
    S, R, K, widths, T = 4, 16, 48, (32, 16, 16), 10
    ranks = torch.tensor([3, 16, 0, 9], dtype=torch.int32)          # not multiples of 8 (bf16's VEC)
    a = [torch.randn(S, R, K, generator=g).to(dt) for _ in widths]
    if layout == "pool":
        b = [torch.randn(S, R, w, generator=g).to(dt).transpose(1, 2) for w in widths]
    else:
        b = [torch.randn(S, w, R, generator=g).to(dt) for w in widths]
    for A, B in zip(a, b):                       # what lies beyond a slot's rank is never used
        for s, r in enumerate(ranks.tolist()):
            A[s, r:] = float("nan")
            B[s, :, r:] = float("nan")
    x, y = torch.randn(T, K, generator=g).to(dt), torch.randn(T, sum(widths), generator=g).to(dt)
    sc = torch.rand(S, generator=g)
    idx = torch.tensor([0, 1, 3, -1, 1, 0, 2, 3, 3, 1])
    meta = olk.build_batch_meta(idx, S, block_m=block_m)
    layout_code, vec = triton_sgmv.b_access(b, y, [0, 32, 48])
    assert layout_code == (2 if layout == "pool" else 1) and vec == 16 // y.element_size()
    want = olk.add_lora(y.clone(), x, a, b, meta, sc, ranks, backend="torch")
    got = olk.add_lora(y.clone(), x, a, b, meta, sc, ranks, backend="triton")
    assert not got.isnan().any()
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dt]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_unaligned_arguments_take_the_scalar_path():
    y = torch.zeros(4, 37, dtype=torch.bfloat16)                      # row stride 37: not a multiple of 8
    b = [torch.zeros(3, 37, 16, dtype=torch.bfloat16)]
    assert triton_sgmv.b_access(b, y, [0]) == (1, 1)
    b2 = [torch.zeros(3, 16, 40, dtype=torch.bfloat16).transpose(1, 2)]
    y2 = torch.zeros(4, 41, dtype=torch.bfloat16)[:, 1:]               # y's base pointer 2 bytes in
    assert triton_sgmv.b_access(b2, y2, [0]) == (2, 1)
    odd = [torch.zeros(3, 40, 16, dtype=torch.bfloat16)[:, :, 1:9]]    # rank-contiguous, 2 bytes off
    assert triton_sgmv.b_access(odd, torch.zeros(4, 40, dtype=torch.bfloat16), [0]) == (1, 1)
    strided = [torch.zeros(3, 40, 32, dtype=torch.bfloat16)[:, :, ::2]]  # no unit stride at all
    assert triton_sgmv.b_access(strided, torch.zeros(4, 40, dtype=torch.bfloat16), [0]) == (0, 1)


def test_multi_slice_pool_b_is_not_copied(monkeypatch):
    """Unequal slice widths in the pool's layout (GQA q/k/v): each slice keeps its own rank stride."""
    from openlora_kernels.ops import launch_args
    b = [torch.zeros(2, 8, w).transpose(1, 2) for w in (64, 16, 16)]
    assert launch_args.same_strides(b, (1,)) == b                      # no copies
