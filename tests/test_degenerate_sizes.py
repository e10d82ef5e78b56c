"""Degenerate sizes (S, R, K, N or T = 0, alone and combined) behave the same on every backend.

For every combination of zero and non-zero sizes, single- and multi-slice, with and without
``ranks``: add_lora, lora_shrink, lora_expand and BoundLoRA (and, on "cpu", BoundLoRA.add_rows)
raise nothing and give what the contract says, checked against a float64 loop written here and
against the torch backend:

* add_lora: every combination has a zero delta (no row, slot, rank, input feature or output
  column), so y is bit-for-bit unchanged;
* lora_shrink: h is [n, T, R] float32, all zeros, except when only N is 0 (N plays no part:
  the real h);
* lora_expand: y unchanged, except when only K is 0 (K plays no part: the real update).

The backward too (test_degenerate_sizes_backward): lora_backward and the gradients of the three
ops through autograd have the right shapes and dtypes and are zero, except the two real cases
(shrink when only N is 0, expand when only K is 0), checked against autograd through the float64
loops here; y's gradient passes through.
"""
import itertools

import pytest
import torch

import openlora_kernels as olk
from openlora_kernels.ops import cpu_ext

SIZES = dict(T=5, S=3, R=4, K=6, N=7)
COMBOS = [c for c in itertools.product((0, 1), repeat=5) if 0 in c]   # 1: the size above, 0: zero
BACKENDS = [b for b in ("torch", "cpu", "triton") if olk.available_backends("cpu")[b].usable]


def combo_id(c):
    zero = [k for k, on in zip(SIZES, c) if not on]
    return "zero_" + "_".join(zero)


def problem(combo, n_slices, with_ranks, seed=0):
    T, S, R, K, N = (v if on else 0 for v, on in zip(SIZES.values(), combo))
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    widths = [N] if n_slices == 1 else [min(N, 2), N - min(N, 2)]      # N = 0: two empty slices
    a = [rnd(S, R, K) for _ in widths]
    b = [rnd(S, w, R) for w in widths]
    idx = torch.randint(-1, S, (T,), generator=g) if S else torch.full((T,), -1)
    if S and T:
        idx[0] = S - 1                           # at least one row with an adapter
    ranks = torch.randint(0, R + 1, (S,), generator=g, dtype=torch.int32) if with_ranks else None
    if with_ranks and S and R:
        ranks[-1] = R
    return dict(T=T, S=S, R=R, K=K, N=N, x=rnd(T, K), y=rnd(T, N), a=a, b=b, idx=idx, scal=torch.rand(S, generator=g),
                ranks=ranks, h=rnd(len(widths), T, R), widths=widths)


def ref_shrink(p):
    h = torch.zeros(len(p["a"]), p["T"], p["R"], dtype=torch.float64)
    for t, s in enumerate(p["idx"].tolist()):
        if s < 0:
            continue
        r = p["R"] if p["ranks"] is None else int(p["ranks"][s])
        for i, A in enumerate(p["a"]):
            h[i, t, :r] = A[s, :r].double() @ p["x"][t].double()
    return h


def ref_expand(p, h):
    y = p["y"].double().clone()
    for t, s in enumerate(p["idx"].tolist()):
        if s < 0:
            continue
        r = p["R"] if p["ranks"] is None else int(p["ranks"][s])
        col = 0
        for i, B in enumerate(p["b"]):
            w = B.shape[1]
            y[t, col:col + w] += p["scal"][s].double() * (B[s, :, :r].double() @ h[i, t, :r].double())
            col += w
    return y


def args(p, n_slices):
    return (p["a"], p["b"]) if n_slices > 1 else (p["a"][0], p["b"][0])


@pytest.mark.parametrize("with_ranks", [False, True], ids=["ranks=None", "ranks"])
@pytest.mark.parametrize("n_slices", [1, 2], ids=["single", "multi"])
@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_sizes(backend, combo, n_slices, with_ranks):
    p = problem(combo, n_slices, with_ranks)
    la, lb = args(p, n_slices)
    meta = olk.build_batch_meta(p["idx"], p["S"])
    for indices in (p["idx"], meta):
        # add_lora: a zero delta, y bit-for-bit unchanged
        y = p["y"].clone()
        assert olk.add_lora(y, p["x"], la, lb, indices, p["scal"], p["ranks"], backend=backend) is y
        assert torch.equal(y, p["y"]), "add_lora must leave y unchanged"
        # lora_shrink: zeros, or the real h when only N is 0
        h = olk.lora_shrink(p["x"], la, indices, p["ranks"], backend=backend)
        assert h.dtype == torch.float32 and h.shape == (n_slices, p["T"], p["R"])
        want_h = ref_shrink(p)
        if combo_id(combo) != "zero_N":
            assert not want_h.any()
        torch.testing.assert_close(h.double(), want_h, atol=2e-5, rtol=2e-5)
        h_torch = olk.lora_shrink(p["x"], la, indices, p["ranks"], backend="torch")
        torch.testing.assert_close(h, h_torch, atol=2e-5, rtol=2e-5)
        # lora_expand: unchanged, or the real update when only K is 0
        y = p["y"].clone()
        assert olk.lora_expand(y, p["h"], lb, indices, p["scal"], p["ranks"], backend=backend) is y
        if combo_id(combo) == "zero_K":
            torch.testing.assert_close(y.double(), ref_expand(p, p["h"]), atol=2e-5, rtol=2e-5)
            y_torch = olk.lora_expand(p["y"].clone(), p["h"], lb, indices, p["scal"], p["ranks"], backend="torch")
            torch.testing.assert_close(y, y_torch, atol=2e-5, rtol=2e-5)
        else:
            assert torch.equal(y, p["y"]), "lora_expand must leave y unchanged"
    # BoundLoRA (and the patched layers' add_rows on the native CPU backend)
    op = olk.BoundLoRA(la, lb, p["scal"], p["ranks"], backend=backend)
    y = p["y"].clone()
    assert op(y, p["x"], meta) is y and torch.equal(y, p["y"])
    assert op(y, p["x"], p["idx"]) is y and torch.equal(y, p["y"])
    if backend == "cpu":
        rows = cpu_ext.row_args(meta)
        if not op.add_rows(y, p["x"], rows):
            op(y, p["x"], meta)
        assert torch.equal(y, p["y"]), "add_rows must leave y unchanged"


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _grads(out, dout, leaves):
    """Gradients of ``out`` (None where a leaf does not contribute; all None when nothing does)."""
    if not out.requires_grad:
        return [None] * len(leaves)
    return torch.autograd.grad(out, leaves, dout, allow_unused=True)


@pytest.mark.parametrize("with_ranks", [False, True], ids=["ranks=None", "ranks"])
@pytest.mark.parametrize("n_slices", [1, 2], ids=["single", "multi"])
@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_sizes_backward(backend, combo, n_slices, with_ranks):
    p = problem(combo, n_slices, with_ranks)
    la, lb = args(p, n_slices)
    meta = olk.build_batch_meta(p["idx"], p["S"])
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(p["T"], p["N"], generator=g)
    # lora_backward: zeros of the right shapes (every combination has a zero delta)
    dx, dA, dB = olk.lora_backward(dy, p["x"], la, lb, meta, p["scal"], p["ranks"], backend=backend)
    assert dx.shape == (p["T"], p["K"]) and not dx.any()
    assert [t.shape for t in dA] == [A.shape for A in p["a"]] and not any(t.any() for t in dA)
    assert [t.shape for t in dB] == [B.shape for B in p["b"]] and not any(t.any() for t in dB)
    # add_lora through autograd: the same zeros, y's gradient passes through
    y0, x, sc, *ab = _leaves(p["y"], p["x"], p["scal"], *p["a"], *p["b"])
    a, b = ab[:n_slices], ab[n_slices:]
    y = y0 * 1
    olk.add_lora(y, x, a if n_slices > 1 else a[0], b if n_slices > 1 else b[0], meta, sc, p["ranks"],
                 backend=backend)
    assert torch.equal(y.detach(), p["y"])
    grads = _grads(y, dy, [y0, x, sc, *ab])
    assert torch.equal(grads[0], dy)
    for got, leaf in zip(grads[1:], [x, sc, *ab]):
        assert got.shape == leaf.shape and not got.any()
    # lora_shrink / lora_expand through autograd against autograd through the float64 loops
    x, *a = _leaves(p["x"], *p["a"])
    h = olk.lora_shrink(x, a if n_slices > 1 else a[0], meta, p["ranks"], backend=backend)
    dh = torch.randn(h.shape, generator=g)
    got = _grads(h, dh, [x, *a])
    want = _grads(ref_shrink({**p, "x": x, "a": a}).float(), dh, [x, *a])
    for u, v in zip(got, want):
        torch.testing.assert_close(u, torch.zeros_like(u) if v is None else v, atol=2e-5, rtol=2e-5)
    if combo_id(combo) != "zero_N":
        assert not any(u.any() for u in got)
    y0, hh, sc, *b = _leaves(p["y"], p["h"], p["scal"], *p["b"])
    y = y0 * 1
    olk.lora_expand(y, hh, b if n_slices > 1 else b[0], meta, sc, p["ranks"], backend=backend)
    got = _grads(y, dy, [y0, hh, sc, *b])
    want = _grads(ref_expand({**p, "y": y0, "scal": sc, "b": b}, hh).float(), dy, [y0, hh, sc, *b])
    for u, v in zip(got, want):
        torch.testing.assert_close(u, torch.zeros_like(u) if v is None else v, atol=2e-5, rtol=2e-5)
    if combo_id(combo) != "zero_K":
        assert not any(u.any() for u in got[1:])


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the native CPU extension is not built")
def test_native_plan_takes_empty_metadata_and_h():
    """The native binding itself accepts what empty tensors give it (null data pointers for S = 0
    slots, T = 0 rows, R = 0): nothing to read, nothing written, no 'null pointer' error."""
    mod = cpu_ext._module()
    for S, R, T in ((0, 4, 3), (2, 0, 3), (2, 4, 0)):
        A, B = torch.randn(S, R, 5), torch.randn(S, 6, R)
        idx = torch.full((T,), -1) if S == 0 else torch.zeros(T, dtype=torch.int64)
        meta = olk.build_batch_meta(idx, S, block_m=1)
        x, y = torch.randn(T, 5), torch.randn(T, 6)
        y0 = y.clone()
        scal = torch.ones(S)
        plan, _keep = cpu_ext._plan(mod.OP_ADD, torch.float32, 5, R, S, [A], [B], scal, None)
        T_, srt, seg, _ = cpu_ext._meta_ptrs(meta)
        plan.add(T_, x.data_ptr(), 5, 1, y.data_ptr(), 6, 1, srt, seg)
        h = torch.zeros(1, T, R)
        shrink, _keep2 = cpu_ext._plan(mod.OP_SHRINK, torch.float32, 5, R, S, a_list=[A])
        shrink.run(T_, x.data_ptr(), 5, 1, 0, 0, 1, h.data_ptr(), 2, *h.stride(), srt, seg)
        assert torch.equal(y, y0) and not h.any()
