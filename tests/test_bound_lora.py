"""BoundLoRA: add_lora with the weight arguments checked once (what a patched layer calls)."""
import pytest
import torch

import openlora_kernels as olk


def weights(S=3, R=4, K=10, widths=(7,), seed=0):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(S, R, K, generator=g) for _ in widths]
    b = [torch.randn(S, w, R, generator=g) for w in widths]
    return a, b, torch.rand(S, generator=g), torch.tensor([4, 0, 2], dtype=torch.int32)[:S]


@pytest.mark.parametrize("widths", [(7,), (5, 2, 2)])
def test_bound_call_equals_add_lora(widths):
    a, b, scal, ranks = weights(widths=widths)
    la, lb = (a, b) if len(widths) > 1 else (a[0], b[0])
    op = olk.BoundLoRA(la, lb, scal, ranks)
    x, y = torch.randn(9, 10), torch.randn(9, sum(widths))
    idx = torch.tensor([0, 1, 2, -1, 2, 0, 0, 1, -1])
    meta = olk.build_batch_meta(idx, 3)
    want = olk.add_lora(y.clone(), x, la, lb, meta, scal, ranks)
    assert torch.equal(op(y.clone(), x, meta), want)
    assert torch.equal(op(y.clone(), x, idx), want)          # raw indices: the full path
    ranks[2] = 3                                               # values may change after binding
    want = olk.add_lora(y.clone(), x, la, lb, meta, scal, ranks)
    assert torch.equal(op(y.clone(), x, meta), want)
    ranks[2] = 9
    with pytest.raises(ValueError, match="ranks: rank 9 exceeds"):
        op(y.clone(), x, meta)


def test_bad_weights_are_named_at_bind_time():
    a, b, scal, ranks = weights()
    with pytest.raises(TypeError, match="lora_a: expected a tensor or a list of tensors, got str"):
        olk.BoundLoRA("a", b[0], scal)
    with pytest.raises(ValueError, match="lora_a: expected a 3-D tensor"):
        olk.BoundLoRA(a[0][0], b[0], scal)
    with pytest.raises(TypeError, match="lora_b: dtype torch.float16 does not match"):
        olk.BoundLoRA(a[0], b[0].half(), scal)
    with pytest.raises(ValueError, match=r"lora_b: shape \(3, 7, 5\)"):
        olk.BoundLoRA(a[0], torch.randn(3, 7, 5), scal)
    with pytest.raises(ValueError, match="scalings: expected shape"):
        olk.BoundLoRA(a[0], b[0], scal[:2])
    with pytest.raises(ValueError, match="ranks: expected shape"):
        olk.BoundLoRA(a[0], b[0], scal, ranks[:2])
    with pytest.raises(ValueError, match="backend: unknown backend 'fast'"):
        olk.BoundLoRA(a[0], b[0], scal, backend="fast")


def test_bad_call_arguments_are_named():
    a, b, scal, _ = weights()
    op = olk.BoundLoRA(a[0], b[0], scal)
    meta = olk.build_batch_meta(torch.tensor([0, 1]), 3)
    with pytest.raises(TypeError, match="x: expected float16, bfloat16 or float32, got torch.float64"):
        op(torch.randn(2, 7), torch.randn(2, 10, dtype=torch.float64), meta)
    with pytest.raises(ValueError, match="K=10, but x has K=11"):
        op(torch.randn(2, 7), torch.randn(2, 11), meta)
    with pytest.raises(ValueError, match="y: has 8 columns"):
        op(torch.randn(2, 8), torch.randn(2, 10), meta)
    with pytest.raises(ValueError, match="indices: the batch metadata covers 2 rows, but x/y have 3"):
        op(torch.randn(3, 7), torch.randn(3, 10), meta)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_pool_layout_b_stored_transposed(backend):
    """The adapter pool keeps lora_B as [S, R, N] storage and passes the [S, N, R] view."""
    if not olk.available_backends("cpu")[backend].usable:
        pytest.skip(olk.available_backends("cpu")[backend].reason)
    g = torch.Generator().manual_seed(4)
    S, R, K, N = 3, 8, 24, 20
    a, bt = torch.randn(S, R, K, generator=g), torch.randn(S, R, N, generator=g)
    scal, ranks = torch.rand(S, generator=g), torch.tensor([8, 3, 0], dtype=torch.int32)
    x, y = torch.randn(7, K, generator=g), torch.randn(7, N, generator=g)
    idx = torch.tensor([0, 1, 2, -1, 1, 0, 0])
    op = olk.BoundLoRA(a, bt.transpose(1, 2), scal, ranks, backend=backend)
    got = op(y.clone(), x, olk.build_batch_meta(idx, S))
    want = olk.add_lora(y.clone(), x, a, bt.transpose(1, 2).contiguous(), idx, scal, ranks, backend="torch")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_multi_slice_pool_layout_sees_slot_writes_after_binding(backend):
    """Unequal slice widths in the pool's rank-major B (GQA q/k/v): the slices' rank strides differ.
    A bound op must see weights written after binding (no stale copies)."""
    if not olk.available_backends("cpu")[backend].usable:
        pytest.skip(olk.available_backends("cpu")[backend].reason)
    g = torch.Generator().manual_seed(5)
    S, R, K, widths = 3, 8, 24, (16, 8, 8)
    a = [torch.zeros(S, R, K) for _ in widths]
    bt = [torch.zeros(S, R, w) for w in widths]
    scal, ranks = torch.ones(S), torch.tensor([8, 5, 0], dtype=torch.int32)
    op = olk.BoundLoRA(a, [t.transpose(1, 2) for t in bt], scal, ranks, backend=backend)
    for t in (*a, *bt):                       # the pool writes its slots after binding
        t.copy_(torch.randn(t.shape, generator=g))
    x, y = torch.randn(6, K, generator=g), torch.randn(6, sum(widths), generator=g)
    meta = olk.build_batch_meta(torch.tensor([0, 1, 2, -1, 1, 0]), S)
    got = op(y.clone(), x, meta)
    want = olk.add_lora(y.clone(), x, a, [t.transpose(1, 2).contiguous() for t in bt], meta, scal, ranks,
                        backend="torch")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
