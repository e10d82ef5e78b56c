"""Gradients through the LoRA ops: every backend that runs here against an independent float64
reference (tests/lora_reference.py), gradcheck on the float64 torch backend, opcheck of the
autograd registrations, torch.compile of a training step, lora_backward, and "only what requires
grad".

Every problem has mixed ranks (rank 0 and R among them; per slice for multi-slice ones), NaN in
the weights beyond each slot's rank, rows with slot -1 whose x and dy are NaN (nothing may read
them), a slot no row uses, and slices of unequal widths: gradients must be exactly zero beyond a
rank, on the unused slot and for -1 rows, and within GRAD_TOL of the reference elsewhere.
"""
import pytest
import torch

import openlora_kernels as olk
from openlora_kernels.ops import backward as bw
from openlora_kernels.ops import torch_ref

from lora_reference import (assert_grad_close, make_problem, reference_delta, reference_grads,
                            reference_shrink_grads)

BACKENDS = [b for b in ("torch", "cpu", "triton") if olk.available_backends("cpu")[b].usable]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# name: (T, K, widths, S, R, ranks, block_m, B rank-major, x / y strided). Slot 2 has no row;
# slot 0 has rank 0, slot 1 (the busiest) rank R; "per_slice" gives slots 3 and 4 a different
# rank in every slice.
CASES = {
    "single": (9, 24, [20], 5, 8, "mixed", None, False, False),
    "multi": (11, 20, [12, 5, 9], 5, 8, "per_slice", None, True, True),
    "prefill": (38, 24, [16, 9], 5, 8, "mixed", 16, True, False),
}
PER_SLICE = torch.tensor([[0, 8, 4, 3, 8], [0, 8, 0, 8, 2], [0, 8, 6, 1, 5]])


def problem(case, dtype, seed):
    T, K, widths, S, R, ranks, bm, rank_major, strided = CASES[case]
    g = torch.Generator().manual_seed(seed)
    idx = torch.tensor([-1, 0, 1, 3, 4])[torch.randint(0, 5, (T,), generator=g)]     # slot 2: no row
    idx[:5] = torch.tensor([0, 1, 3, 4, -1])
    if bm is not None and bm >= 16:
        idx[5:25] = 1                                                                # a long segment
    if ranks == "per_slice":
        ranks = PER_SLICE[:len(widths)].clone()
    p = make_problem(T, K, widths, S, R, dtype=dtype, indices=idx, ranks=ranks, x_strided=strided,
                     y_strided=strided, seed=seed)
    if rank_major:                          # the pool's layout: [S, N, R] views of [S, R, N] storage
        p.b = [B.transpose(1, 2).contiguous().transpose(1, 2) for B in p.b]
    free = p.indices < 0
    p.x[free] = float("nan")                # rows without adapter: never read
    meta = olk.build_batch_meta(p.indices, S, block_m=bm)
    return p, meta


def upstream(p, seed):
    g = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(p.y.shape, generator=g, dtype=torch.float64).to(p.y.dtype)
    dy[p.indices < 0] = float("nan")
    return dy


def leaves(p, dtype):
    xs = p.x.clone().requires_grad_()
    a = [A.clone().requires_grad_() for A in p.a]
    b = [B.clone().requires_grad_() for B in p.b]
    sc = p.scalings.clone().requires_grad_()
    return xs, a, b, sc


def arg(p, ts):
    return ts if p.as_list else ts[0]


def check_weights(p, ref, a_grads, b_grads, dtype):
    for i, (ga, gb) in enumerate(zip(a_grads, b_grads)):
        assert_grad_close(ga, (ref["a"][0][i], ref["a"][1][i]), dtype, f"dA[{i}]")
        assert_grad_close(gb, (ref["b"][0][i], ref["b"][1][i]), dtype, f"dB[{i}]")


# (lora_backward's test below covers every case in every dtype: this one, the autograd path)
AUTOGRAD_CASES = [("single", torch.float32), ("multi", torch.float32), ("multi", torch.float16),
                  ("prefill", torch.bfloat16)]


@pytest.mark.parametrize("case,dtype", AUTOGRAD_CASES, ids=[f"{c}-{DT_ID[d]}" for c, d in AUTOGRAD_CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_add_lora_gradients_match_float64_reference(backend, case, dtype):
    p, meta = problem(case, dtype, seed=11)
    dy = upstream(p, 11)
    x, a, b, sc = leaves(p, dtype)
    y0 = p.y.clone().requires_grad_()
    y = y0 * 1                                         # a non-leaf y, updated in place
    out = olk.add_lora(y, x, arg(p, a), arg(p, b), meta, sc, p.ranks, backend=backend)
    assert out is y and y.requires_grad
    free = p.indices < 0
    assert torch.equal(y.detach()[free], p.y[free]), "rows without adapter: y unchanged"
    ref_y = p.y.double() + reference_delta(p)
    assert torch.allclose(y.detach()[~free].double(), ref_y[~free], atol=0.05, rtol=0.02)
    y.backward(dy)
    ref = reference_grads(p, dy)
    assert_grad_close(x.grad, ref["x"], dtype, "dx")
    assert x.grad.dtype == dtype and a[0].grad.dtype == dtype and b[0].grad.dtype == dtype
    check_weights(p, ref, [t.grad for t in a], [t.grad for t in b], dtype)
    assert_grad_close(sc.grad, ref["scalings"], torch.float32, "dscalings")
    torch.testing.assert_close(y0.grad, dy, rtol=0, atol=0, equal_nan=True)   # passes through unchanged


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_backward_matches_float64_reference(backend, case, dtype):
    p, meta = problem(case, dtype, seed=5)
    dy = upstream(p, 5)
    with torch.enable_grad():
        dx, dA, dB = olk.lora_backward(dy, p.x, p.lora_a(), p.lora_b(), meta, p.scalings, p.ranks, backend=backend)
    ref = reference_grads(p, dy)
    assert dx.dtype == dtype and dx.grad_fn is None
    assert all(t.dtype == torch.float32 and t.grad_fn is None for t in dA + dB)
    assert_grad_close(dx, ref["x"], dtype, "dx")
    check_weights(p, ref, dA, dB, dtype)
    for B, g in zip(p.b, dB):        # dB in B's layout (rank-major for the pool's views)
        assert (B.stride(1) < B.stride(2)) == (g.stride(1) < g.stride(2))
    # raw indices give the same result as the metadata
    dx2, dA2, dB2 = olk.lora_backward(dy, p.x, p.lora_a(), p.lora_b(), p.indices, p.scalings, p.ranks,
                                      backend=backend)
    if meta.block_m == olk.choose_block_m(p.x.shape[0], p.a[0].shape[0]):
        assert torch.equal(dx2, dx) and all(torch.equal(u, v) for u, v in zip(dA2 + dB2, dA + dB))
    none = olk.lora_backward(dy, p.x, p.lora_a(), p.lora_b(), meta, p.scalings, p.ranks, need_x=False,
                             need_ab=False, backend=backend)
    assert none == (None, None, None)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not usable here")
@pytest.mark.parametrize("split", [1, 3])
def test_triton_weight_gradients_split_over_rows_and_tiled(split):
    """The weight-gradient kernel with several (P, Q) blocks per slot and a segment split over 3
    programs adding into dA / dB with fp32 atomics (one split program gets no rows)."""
    from openlora_kernels.ops.configs import override_config
    for case, dtype in (("prefill", torch.float32), ("multi", torch.float16)):
        p, meta = problem(case, dtype, seed=8)
        dy = upstream(p, 8)
        with override_config("wgrad", SPLIT_T=split, BLOCK_T=16, BLOCK_R=16, BLOCK_F=16):
            _, dA, dB = olk.lora_backward(dy, p.x, p.lora_a(), p.lora_b(), meta, p.scalings, p.ranks,
                                          need_x=False, backend="triton")
        check_weights(p, reference_grads(p, dy), dA, dB, dtype)


HALF_CASES = [("multi", torch.float32), ("prefill", torch.float16), ("multi", torch.bfloat16)]


@pytest.mark.parametrize("case,dtype", HALF_CASES, ids=[f"{c}-{DT_ID[d]}" for c, d in HALF_CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_shrink_and_expand_gradients_match_float64_reference(backend, case, dtype):
    p, meta = problem(case, dtype, seed=7)
    x, a, b, sc = leaves(p, dtype)
    h = olk.lora_shrink(x, arg(p, a), meta, p.ranks, backend=backend)
    assert h.requires_grad and h.dtype == torch.float32
    g = torch.Generator().manual_seed(3)
    dh = torch.randn(h.shape, generator=g, dtype=torch.float64)
    h.backward(dh.float())
    ref = reference_shrink_grads(p, dh.float())
    assert_grad_close(x.grad, ref["x"], dtype, "shrink dx")
    for i, t in enumerate(a):
        assert_grad_close(t.grad, (ref["a"][0][i], ref["a"][1][i]), dtype, f"shrink dA[{i}]")

    # expand: h given (NaN beyond each rank and on -1 rows: never read), y non-leaf, B and scalings
    hv = torch.randn(h.shape, generator=g).to(dtype)
    for i in range(len(p.a)):
        for s in range(p.a[0].shape[0]):
            rk = p.ranks[i] if p.ranks.dim() == 2 else p.ranks
            hv[i, p.indices == s, int(rk[s]):] = float("nan")
    hv[:, p.indices < 0] = float("nan")
    hl = hv.clone().requires_grad_()
    dy = upstream(p, 7)
    y0 = p.y.clone().requires_grad_()
    y = y0 * 1
    assert olk.lora_expand(y, hl, arg(p, b), meta, sc, p.ranks, backend=backend) is y
    y.backward(dy)
    ref = reference_grads(p, dy, h=hv)
    assert_grad_close(hl.grad, ref["h"], dtype, "expand dh")
    assert hl.grad.dtype == dtype
    for i, t in enumerate(b):
        assert_grad_close(t.grad, (ref["b"][0][i], ref["b"][1][i]), dtype, f"expand dB[{i}]")
    assert_grad_close(sc.grad, ref["scalings"], torch.float32, "expand dscal")
    torch.testing.assert_close(y0.grad, dy, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------ gradcheck


@pytest.mark.parametrize("strategy", ["padded", "segment", "gather"])
@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
def test_gradcheck_float64_torch_backend(monkeypatch, strategy, multi):
    """torch.autograd.gradcheck of all three ops (every differentiable input), float64, each of the
    torch backend's strategies forced, NaN in the weights beyond the ranks."""
    monkeypatch.setattr(torch_ref, "_strategy", lambda *a, **k: strategy)
    widths = [3, 1, 2] if multi else [4]
    idx = torch.tensor([1, -1, 0, 3, 1, 1, 3])                          # slot 2 unused
    ranks = torch.tensor([[0, 3, 2, 1], [3, 2, 0, 3], [1, 3, 3, 2]]) if multi else torch.tensor([0, 3, 2, 2])
    p = make_problem(7, 4, widths, 4, 3, dtype=torch.float64, indices=idx, ranks=ranks, seed=2)
    sc = p.scalings.double()
    n = len(widths)

    meta = olk.build_batch_meta(idx, 4)

    def add(y0, x, s, *ab):
        return olk.add_lora(y0 * 1, x, arg(p, list(ab[:n])), arg(p, list(ab[n:])), meta, s, ranks, backend="torch")

    def shrink(x, *a):
        return olk.lora_shrink(x, arg(p, list(a)), meta, ranks, backend="torch")

    def expand(y0, h, s, *b):
        return olk.lora_expand(y0 * 1, h, arg(p, list(b)), meta, s, ranks, backend="torch")

    req = lambda ts: [t.clone().requires_grad_() for t in ts]  # noqa: E731
    x, y0, s = req([p.x, p.y, sc])
    assert torch.autograd.gradcheck(add, (y0, x, s, *req(p.a), *req(p.b)))
    assert torch.autograd.gradcheck(shrink, (x, *req(p.a)))
    h = olk.lora_shrink(p.x, arg(p, p.a), idx, ranks, backend="torch")
    assert torch.autograd.gradcheck(expand, (y0, h.clone().requires_grad_(), s, *req(p.b)))


def test_float64_is_for_the_torch_backend_only():
    p = make_problem(4, 6, [5], 2, 3, dtype=torch.float64, seed=1)
    for backend in ("auto", *[b for b in BACKENDS if b != "torch"]):
        with pytest.raises(TypeError, match=r"x: expected float16, bfloat16 or float32, got torch.float64 "
                                            r"\(float64 runs on backend='torch' only\)"):
            olk.add_lora(p.y.clone(), p.x, p.a[0], p.b[0], p.indices, p.scalings, backend=backend)
    y = p.y.clone()
    olk.add_lora(y, p.x, p.a[0], p.b[0], p.indices, p.scalings.double(), backend="torch")
    assert torch.allclose(y, p.y + reference_delta(p), atol=1e-12, rtol=1e-12)
    assert olk.lora_shrink(p.x, p.a[0], p.indices, backend="torch").dtype == torch.float64
    with pytest.raises(TypeError, match="h: dtype torch.float32 does not match y's dtype torch.float64"):
        olk.lora_expand(p.y.clone(), torch.zeros(1, 4, 3), p.b[0], p.indices, p.scalings, backend="torch")


# ---------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_autograd_registrations(backend):
    """opcheck (schema, autograd registration, fake tensors, AOT dispatch with dynamic shapes) of
    the functional ops on every backend, and of the backward ops (backend-independent glue around
    the backend's kernels) on the torch backend."""
    p = make_problem(6, 8, [4, 3], 3, 4, ranks=torch.tensor([[0, 4, 2], [3, 4, 1]]), poison_padding=False,
                     indices=torch.tensor([1, -1, 0, 1, 2, 1]), seed=3)        # (no NaN: opcheck compares values)
    meta = olk.build_batch_meta(p.indices, 3)
    x = p.x
    mt, bm = meta.tensors(), meta.block_m
    req = lambda ts: [t.clone().requires_grad_() for t in ts]  # noqa: E731
    ops = torch.ops.openlora
    torch.library.opcheck(ops.add_lora_functional.default,
                          (p.y.clone().requires_grad_(), x.clone().requires_grad_(), req(p.a), req(p.b),
                           p.scalings.clone().requires_grad_(), p.ranks, *mt, bm, backend))
    torch.library.opcheck(ops.lora_shrink.default, (x.clone().requires_grad_(), req(p.a), p.ranks, *mt, bm, backend))
    h = olk.lora_shrink(x, p.a, meta, p.ranks, backend="torch")
    torch.library.opcheck(ops.lora_expand_functional.default,
                          (p.y.clone().requires_grad_(), h.clone().requires_grad_(), req(p.b),
                           p.scalings.clone().requires_grad_(), p.ranks, *mt, bm, backend))
    if backend != "torch":
        return
    dy = torch.randn(p.y.shape)
    n = len(p.a)
    torch.library.opcheck(ops.add_lora_backward.default, (dy, x, p.a, p.b, p.scalings, p.ranks, *mt, bm, backend,
                                                          True, [True] * n, [False, True], True))
    torch.library.opcheck(ops.lora_shrink_backward.default, (torch.randn(h.shape), x, p.a, p.ranks, *mt, bm, backend,
                                                             True, [False, True]))
    torch.library.opcheck(ops.lora_expand_backward.default, (dy, h, p.b, p.scalings, p.ranks, *mt, bm, backend,
                                                             True, [True] * n, True))


# -------------------------------------------------------------------------- torch.compile


class Captured:
    """An aot_autograd backend that records the forward and backward graphs it compiles."""

    def __init__(self):
        from torch._dynamo.backends.common import aot_autograd
        self.graphs = []

        def capture(gm, example_inputs):
            self.graphs.append(str(gm.graph))
            return gm.forward
        self.backend = aot_autograd(fw_compiler=capture, bw_compiler=capture)


@pytest.mark.parametrize("backend", [b for b in ("torch", "triton") if b in BACKENDS])
def test_compiled_training_step_equals_eager(backend):
    """torch.compile(fullgraph=True) of forward + loss; its compiled backward; an SGD update (also
    compiled): three steps give the eager losses, A and B."""
    torch._dynamo.reset()
    p = make_problem(7, 8, [4, 3], 3, 4, ranks=torch.tensor([[0, 4, 2], [3, 4, 1]]), poison_padding=False,
                     indices=torch.tensor([1, -1, 0, 1, 2, 1, 0]), seed=9)
    x = p.x
    W = torch.randn(p.y.shape[1], x.shape[1]) / 5                    # the frozen base layer
    target = torch.randn(p.y.shape)

    def loss_fn(x, A, B, idx, sc, rk):
        y = x @ W.T
        olk.add_lora(y, x, A, B, idx, sc, rk, backend=backend)
        return ((y - target) ** 2).mean()

    def sgd(params, lr: float):
        with torch.no_grad():
            for t in params:
                t.sub_(lr * t.grad)
                t.grad = None

    cap = Captured()
    compiled_loss = torch.compile(loss_fn, fullgraph=True, backend=cap.backend)
    compiled_sgd = torch.compile(sgd, fullgraph=True, backend="aot_eager")
    runs = {}
    for mode in ("eager", "compiled"):
        A = [t.clone().requires_grad_() for t in p.a]
        B = [t.clone().requires_grad_() for t in p.b]
        losses = []
        for _ in range(3):
            f = compiled_loss if mode == "compiled" else loss_fn
            loss = f(x, A, B, p.indices, p.scalings, p.ranks)
            loss.backward()
            (compiled_sgd if mode == "compiled" else sgd)(A + B, 0.5)
            losses.append(loss.detach())
        runs[mode] = (torch.stack(losses), A, B)
    (l0, A0, B0), (l1, A1, B1) = runs["eager"], runs["compiled"]
    assert l0[2] < l0[0], "the steps must reduce the loss (or the test could not fail)"
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    for u, v in zip(A1 + B1, A0 + B0):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)
    assert not torch.equal(A0[0], p.a[0]) and not torch.equal(B0[0], p.b[0]), "the update moved A and B"
    graphs = "\n".join(cap.graphs)
    assert "openlora.add_lora_functional" in graphs and "openlora.add_lora_backward" in graphs


def test_compiled_lora_backward_equals_eager():
    torch._dynamo.reset()
    p, meta = problem("single", torch.float32, seed=4)
    dy = upstream(p, 4)

    def f(dy, x, A, B, idx, sc, rk):
        return olk.lora_backward(dy, x, A, B, idx, sc, rk, backend="torch")

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(dy, p.x, p.a[0], p.b[0], p.indices, p.scalings, p.ranks)
    want = f(dy, p.x, p.a[0], p.b[0], p.indices, p.scalings, p.ranks)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1][0], want[1][0])
    torch.testing.assert_close(got[2][0], want[2][0])


# ------------------------------------------------------------------- only what requires grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_what_requires_grad_is_computed(backend, monkeypatch):
    calls = []
    for name in ("grad_h", "grad_x_from", "weight_grads", "grad_scalings"):
        orig = getattr(bw, name)
        monkeypatch.setattr(bw, name, lambda *a, _o=orig, _n=name, **k: (calls.append((_n, a[6] if _n == "weight_grads"
                                                                                        else None)), _o(*a, **k))[1])
    # the CPU one-pass path of the padded layout (torch_ref.add_lora_backward_padded): its own flags
    orig_padded = torch_ref.add_lora_backward_padded
    monkeypatch.setattr(torch_ref, "add_lora_backward_padded", lambda dy, x, al, bl, sc, rk, meta, need_x, wa, wb, dA, dB:
                        (calls.append(("padded", need_x, tuple(wa), tuple(wb))),
                         orig_padded(dy, x, al, bl, sc, rk, meta, need_x, wa, wb, dA, dB))[1])
    p, meta = problem("multi", torch.float32, seed=1)
    x, a, b, sc = leaves(p, torch.float32)
    want = reference_grads(p, upstream(p, 1))
    padded = {"a1": ("padded", False, (1,), ()), "b": ("padded", False, (), (0, 1, 2)), "x": ("padded", True, (), ())}
    for needs, expect in (("a1", {("grad_h", None), ("weight_grads", True)}),
                          ("b", {("weight_grads", False)}),
                          ("x", {("grad_h", None), ("grad_x_from", None)}),
                          ("s", {("grad_h", None), ("grad_scalings", None)})):
        calls.clear()
        xs, As, Bs, s = (x.detach().requires_grad_(needs == "x"), [t.detach().requires_grad_(needs == "a1" and i == 1)
                         for i, t in enumerate(a)], [t.detach().requires_grad_(needs == "b") for t in b],
                         sc.detach().requires_grad_(needs == "s"))
        y = p.y.clone()
        olk.add_lora(y, xs, As, Bs, meta, s, p.ranks, backend=backend)
        y.backward(upstream(p, 1))
        if calls and calls[0][0] == "padded":
            assert calls == [padded[needs]], (needs, calls)
        else:
            assert set(calls) == expect, (needs, calls)
        assert (xs.grad is not None) == (needs == "x") and (s.grad is not None) == (needs == "s")
        assert [t.grad is not None for t in As] == [needs == "a1" and i == 1 for i in range(3)]
        assert all((t.grad is not None) == (needs == "b") for t in Bs)
        if needs == "a1":
            assert_grad_close(As[1].grad, (want["a"][0][1], want["a"][1][1]), torch.float32, "dA[1]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_nothing_requiring_grad_take_the_inference_path(backend):
    p, meta = problem("single", torch.float32, seed=2)
    base = p.y.clone()
    olk.add_lora(base, p.x, p.a[0], p.b[0], meta, p.scalings, p.ranks, backend=backend)
    for ctx in (torch.no_grad, torch.enable_grad):
        y = p.y.clone()
        with ctx():
            assert olk.add_lora(y, p.x, p.a[0], p.b[0], meta, p.scalings, p.ranks, backend=backend) is y
        assert y.grad_fn is None and torch.equal(y, base)
    # the autograd path gives the same bits
    x = p.x.clone().requires_grad_()
    y = p.y.clone()
    olk.add_lora(y, x, p.a[0], p.b[0], meta, p.scalings, p.ranks, backend=backend)
    assert y.grad_fn is not None and torch.equal(y.detach(), base)


def test_leaf_y_that_requires_grad_is_refused_before_anything_runs():
    p, meta = problem("single", torch.float32, seed=2)
    y = p.y.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="^y: a leaf tensor that requires grad cannot be updated in place"):
        olk.add_lora(y, p.x, p.a[0], p.b[0], meta, p.scalings, p.ranks, backend="torch")
    with pytest.raises(RuntimeError, match="^y: a leaf tensor"):
        olk.lora_expand(y, torch.zeros(1, 9, 8), p.b[0], meta, p.scalings, p.ranks, backend="torch")
    assert torch.equal(y.detach(), p.y)
    with torch.no_grad():                       # (under no_grad it is an ordinary in-place update)
        olk.add_lora(y, p.x, p.a[0], p.b[0], meta, p.scalings, p.ranks, backend="torch")


def test_in_place_update_invalidates_saved_values():
    """y's old value saved by an earlier op (tanh saves its output): the in-place update bumps the
    version, so that backward raises instead of using the new values."""
    p, meta = problem("single", torch.float32, seed=2)
    x = p.x.nan_to_num(0.0).requires_grad_()
    y = torch.tanh(x @ torch.randn(p.x.shape[1], p.y.shape[1]))
    olk.add_lora(y, x, p.a[0].nan_to_num(0.0), p.b[0].nan_to_num(0.0), meta, p.scalings, p.ranks, backend="torch")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bound_lora_with_grad(backend):
    p, meta = problem("multi", torch.float32, seed=6)
    dy = upstream(p, 6)
    x, a, b, sc = leaves(p, torch.float32)
    op = olk.BoundLoRA(a, b, sc, p.ranks, backend=backend)
    y = p.y.clone()
    assert op(y, x, meta) is y
    y.backward(dy)
    ref = reference_grads(p, dy)
    assert_grad_close(x.grad, ref["x"], torch.float32, "dx")
    check_weights(p, ref, [t.grad for t in a], [t.grad for t in b], torch.float32)
    if backend == "cpu":      # add_rows (no autograd record) declines when a weight requires grad
        from openlora_kernels.ops import cpu_ext
        m1 = olk.build_batch_meta(p.indices, 5, block_m=1)
        y, xc = p.y.contiguous(), p.x.contiguous()
        assert op.add_rows(y, xc, cpu_ext.row_args(m1)) is False
        with torch.no_grad():
            assert op.add_rows(y, xc, cpu_ext.row_args(m1)) is True


# ------------------------------------------------------------------------------ lora_backward


def test_lora_backward_checks_its_arguments():
    p, meta = problem("multi", torch.float32, seed=1)
    dy = torch.randn(p.y.shape)
    call = lambda **o: olk.lora_backward(o.get("dy", dy), o.get("x", p.x), o.get("a", p.a), o.get("b", p.b),  # noqa
                                         o.get("idx", meta), o.get("sc", p.scalings), o.get("rk", p.ranks),
                                         **o.get("kw", {}))
    cases = [
        (dict(dy=dy[:, :-1]), ValueError, r"dy: has 25 columns, but lora_b's output widths sum to 26"),
        (dict(dy=dy.half()), TypeError, "dy: dtype torch.float16 does not match x's dtype"),
        (dict(dy=dy[:-1]), ValueError, "dy: has 10 rows, but x has 11"),
        (dict(dy=dy[0]), ValueError, "dy: expected a 2-D"),
        (dict(a=p.a[:2]), ValueError, "lora_b: 3 slices given, but lora_a has 2"),
        (dict(b=[B.half() for B in p.b]), TypeError,
             r"lora_b(\[0\])?: dtype torch.float16 does not match (dy's dtype|lora_a's torch.float32)"),
        (dict(sc=p.scalings[:2]), ValueError, r"scalings: expected shape \[5\]"),
        (dict(rk=p.ranks[:, :2]), ValueError, "ranks: expected shape"),
        (dict(idx=p.indices[:3]), ValueError, r"indices: expected shape \[11\]"),
        (dict(kw=dict(need_x=1)), TypeError, "need_x: expected a bool"),
        (dict(kw=dict(backend="cutlass")), ValueError, "backend: unknown backend 'cutlass'"),
    ]
    for over, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call(**over)


@pytest.mark.parametrize("triton_on_gpu", [False, True], ids=["dAdB=torch", "dAdB=triton"])
def test_cuda_backend_backward_glue(monkeypatch, triton_on_gpu):
    """backend "cuda" without a GPU: its shrink / expand stand-ins (the torch backend's, asserting
    what the CUDA kernels require: weights and y of one dtype) show that the backward reuses them
    with swapped roles, sums multi-slice dx from 16-bit parts, and routes dA / dB to the Triton
    kernel when Triton can run on the GPU, else to the torch backend's sync-free gather."""
    from types import SimpleNamespace

    from openlora_kernels.ops import backends, cuda_ext, custom_ops
    if triton_on_gpu and "triton" not in BACKENDS:
        pytest.skip("triton not usable here")
    seen = []

    def shrink(x, a_list, ranks, meta, out=None):
        assert all(A.dtype == x.dtype for A in a_list)
        seen.append("shrink")
        return torch_ref.shrink(x, a_list, ranks, meta, out=out)

    def expand(y, h, b_list, scalings, ranks, meta):
        assert all(B.dtype == y.dtype for B in b_list), "the CUDA expand writes y in the weights' dtype"
        seen.append("expand")
        torch_ref.expand(y, h, b_list, scalings, ranks, meta)

    fake = SimpleNamespace(shrink=shrink, expand=expand, EXPAND_FP32_Y=cuda_ext.EXPAND_FP32_Y,
                           weight_grads=cuda_ext.weight_grads)
    monkeypatch.setitem(custom_ops._loaded, "cuda", fake)
    monkeypatch.setattr(backends, "_triton_reason", lambda dev: None if triton_on_gpu else "no GPU here")
    monkeypatch.setattr(torch_ref, "_strategy", lambda *a, **k: "gather")       # what a GPU tensor gets
    from openlora_kernels.ops import triton_sgmv
    wg = []
    monkeypatch.setattr(triton_sgmv, "weight_grads", lambda *a, _f=triton_sgmv.weight_grads: (wg.append(1), _f(*a)))
    for dtype in (torch.float32, torch.bfloat16):
        p, meta = problem("multi", dtype, seed=12)
        dy = upstream(p, 12)
        dx, dA, dB, ds = bw.add_lora_backward(dy, p.x, p.a, p.b, p.scalings, p.ranks, meta, "cuda",
                                              True, [True] * 3, [True] * 3, True)
        ref = reference_grads(p, dy)
        assert_grad_close(dx, ref["x"], dtype, "dx")
        check_weights(p, ref, dA, dB, dtype)
        assert_grad_close(ds, ref["scalings"], torch.float32, "dscalings")
    assert seen.count("expand") == 2 and seen.count("shrink") == 2 * (3 + 1)    # per call: 1 expand, 3 + 1 shrinks
    assert bool(wg) == triton_on_gpu


@pytest.mark.parametrize("backend", BACKENDS)
def test_shrink_then_expand_chain_equals_add_lora(backend):
    """lora_expand(lora_shrink(x)) under autograd gives add_lora's gradients (h's gradient flows
    from the expand's backward into the shrink's)."""
    p, meta = problem("single", torch.float32, seed=13)
    dy = upstream(p, 13)
    grads = []
    for chain in (False, True):
        x, a, b, sc = leaves(p, torch.float32)
        y = p.y.clone()
        if chain:
            olk.lora_expand(y, olk.lora_shrink(x, a[0], meta, p.ranks, backend=backend), b[0], meta, sc, p.ranks,
                            backend=backend)
        else:
            olk.add_lora(y, x, a[0], b[0], meta, sc, p.ranks, backend=backend)
        y.backward(dy)
        grads.append([x.grad, a[0].grad, b[0].grad, sc.grad])
    for u, v in zip(*grads):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)
