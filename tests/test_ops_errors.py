"""Bad input raises a Python exception naming the argument, before anything is written. Arguments
that require grad are served with gradients (tests/test_autograd.py checks their values) on every
backend, also under torch.compile; a leaf y that requires grad is refused, as for any in-place op."""
import re

import pytest
import torch

import openlora_kernels as olk
from openlora_kernels.ops.backends import BackendUnavailableError

T, K, N, S, R = 6, 10, 8, 3, 4


def good(**over):
    args = dict(
        y=torch.zeros(T, N), x=torch.randn(T, K), lora_a=torch.randn(S, R, K), lora_b=torch.randn(S, N, R),
        indices=torch.tensor([0, 1, -1, 2, 0, 1]), scalings=torch.ones(S), ranks=None,
    )
    args.update(over)
    return args


def call(**over):
    a = good(**over)
    return olk.add_lora(a["y"], a["x"], a["lora_a"], a["lora_b"], a["indices"], a["scalings"], a["ranks"],
                        backend=over.get("backend", "torch") if "backend" in over else "torch")


META = torch.device("meta")

BAD = {
    # argument: (overrides, exception, message fragment)
    "x_dims": (dict(x=torch.randn(T, K, 1)), ValueError, "x: expected a 2-D"),
    "x_dtype": (dict(x=torch.randn(T, K).double(), y=torch.zeros(T, N).double(), backend="auto"), TypeError,
                r"x: expected float16, bfloat16 or float32, got torch.float64 "
                r"\(float64 runs on backend='torch' only\)"),
    "x_int": (dict(x=torch.zeros(T, K, dtype=torch.int32)), TypeError, "x: expected float16"),
    "x_type": (dict(x=[[0.0] * K] * T), TypeError, "x: expected a torch.Tensor"),
    "y_dtype": (dict(y=torch.zeros(T, N, dtype=torch.float16)), TypeError, "y: dtype"),
    "y_rows": (dict(y=torch.zeros(T + 1, N)), ValueError, "y: has 7 rows"),
    "y_cols": (dict(y=torch.zeros(T, N + 1)), ValueError, "y: has 9 columns"),
    "y_device": (dict(y=torch.zeros(T, N, device=META)), ValueError, "y: expected a tensor on cpu"),
    "a_dims": (dict(lora_a=torch.randn(R, K)), ValueError, "lora_a: expected a 3-D"),
    "a_K": (dict(lora_a=torch.randn(S, R, K + 1)), ValueError, r"lora_a: shape .* K=11, but x has K=10"),
    "a_dtype": (dict(lora_a=torch.randn(S, R, K, dtype=torch.float16)), TypeError, "lora_a: dtype"),
    "a_device": (dict(lora_a=torch.randn(S, R, K, device=META)), ValueError, "lora_a: expected a tensor on cpu"),
    "a_empty_list": (dict(lora_a=[], lora_b=[]), ValueError, "lora_a: .*empty list"),
    "a_list_item": (dict(lora_a=[torch.randn(S, R, K), "nope"], lora_b=[torch.randn(S, 4, R)] * 2), TypeError,
                    r"lora_a\[1\]: expected a torch.Tensor"),
    "a_slices_differ": (dict(lora_a=[torch.randn(S, R, K), torch.randn(S, R + 1, K)],
                             lora_b=[torch.randn(S, 4, R)] * 2), ValueError, r"lora_a\[1\]: shape"),
    "b_S": (dict(lora_b=torch.randn(S + 1, N, R)), ValueError, "lora_b: .*S=4, but there are 3 slots"),
    "b_R": (dict(lora_b=torch.randn(S, N, R + 1)), ValueError, "lora_b: .*R=5"),
    "b_dtype": (dict(lora_b=torch.randn(S, N, R).half()), TypeError, "lora_b: dtype"),
    "b_count": (dict(lora_a=[torch.randn(S, R, K)] * 2, lora_b=[torch.randn(S, N, R)]), ValueError,
                "lora_b: 1 slices given, but lora_a has 2"),
    "b_list_vs_tensor": (dict(lora_a=[torch.randn(S, R, K)], lora_b=torch.randn(S, N, R)), ValueError,
                         "both as tensors or both as lists"),
    "b_widths": (dict(lora_a=[torch.randn(S, R, K)] * 2, lora_b=[torch.randn(S, 3, R), torch.randn(S, 4, R)]),
                 ValueError, r"y: has 8 columns, but lora_b's output widths sum to 7 \(3 \+ 4\)"),
    "scal_shape": (dict(scalings=torch.ones(S + 1)), ValueError, r"scalings: expected shape \[3\]"),
    "scal_dtype": (dict(scalings=torch.ones(S, dtype=torch.float16)), TypeError, "scalings: expected dtype float32"),
    "scal_dims": (dict(scalings=torch.ones(S, 1)), ValueError, "scalings: expected a 1-D"),
    "ranks_dtype": (dict(ranks=torch.ones(S)), TypeError, "ranks: expected dtype int32 or int64"),
    "ranks_shape": (dict(ranks=torch.ones(S + 1, dtype=torch.int32)), ValueError, r"ranks: expected shape \[3\]"),
    "ranks_type": (dict(ranks=[1, 2, 3]), TypeError, "ranks: expected a torch.Tensor"),
    "ranks_above_R": (dict(ranks=torch.tensor([1, R + 1, 2], dtype=torch.int32)), ValueError,
                      "ranks: rank 5 exceeds the stacked rank R=4"),
    "ranks_negative": (dict(ranks=torch.tensor([1, -1, 2], dtype=torch.int32)), ValueError, "ranks: ranks must be >= 0"),
    "idx_dtype": (dict(indices=torch.zeros(T)), TypeError, "indices: expected dtype int32 or int64"),
    "idx_len": (dict(indices=torch.zeros(T + 1, dtype=torch.int64)), ValueError, r"indices: expected shape \[6\]"),
    "idx_type": (dict(indices=[0] * T), TypeError, "indices: expected a tensor of slot ids or a LoRABatchMeta"),
    "idx_range": (dict(indices=torch.tensor([0, 1, 3, 2, 0, 1])), IndexError, "indices: value 3 at position 2"),
    "idx_range_low": (dict(indices=torch.tensor([0, 1, -2, 2, 0, 1])), IndexError, "indices: value -2"),
    "meta_T": (dict(indices=olk.build_batch_meta(torch.zeros(T + 1, dtype=torch.int64), S)), ValueError,
               "indices: the batch metadata covers 7 rows"),
    "meta_S": (dict(indices=olk.build_batch_meta(torch.zeros(T, dtype=torch.int64), S + 2)), ValueError,
               "indices: the batch metadata was built for 5 slots"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_add_lora_rejects(name):
    over, exc, msg = BAD[name]
    y = over.get("y", torch.zeros(T, N))
    over = {**over, "y": y}
    before = y.clone() if y.device.type == "cpu" else None
    with pytest.raises(exc, match=msg):
        call(**over)
    if before is not None:
        assert torch.equal(y, before), "nothing may be written when the input is rejected"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_rejects_before_writing_on_every_backend(backend):
    if not olk.available_backends("cpu")[backend].usable:
        pytest.skip("backend not usable here")
    y = torch.zeros(T, N)
    with pytest.raises(ValueError, match="ranks: rank 5 exceeds"):
        olk.add_lora(y, torch.randn(T, K), torch.randn(S, R, K), torch.randn(S, N, R),
                     torch.tensor([0, 1, -1, 2, 0, 1]), torch.ones(S), torch.tensor([1, 5, 2], dtype=torch.int32),
                     backend=backend)
    assert not y.any()


def test_unknown_backend_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="backend: unknown backend 'cutlass'"):
        call(backend="cutlass")


def test_unavailable_backends_say_why(monkeypatch):
    with pytest.raises(BackendUnavailableError, match="'cuda' is unavailable for cpu tensors"):
        call(backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        call(backend="triton")
    info = olk.available_backends("cpu")
    assert info["torch"].usable and not info["triton"].usable and not info["cuda"].usable
    assert "TRITON_INTERPRET" in info["triton"].reason


def test_available_backends_prints_as_a_table_and_stays_a_mapping():
    info = olk.available_backends("cpu")
    assert isinstance(info, dict) and list(info) == ["torch", "cpu", "triton", "cuda"]
    assert all(isinstance(b, olk.BackendInfo) and b.name == k for k, b in info.items())
    text = str(info)
    assert repr(info) == text and "BackendInfo(" not in text
    head, cols, *rows = text.splitlines()
    auto = olk.ops.backends.resolve_backend("auto", torch.device("cpu"))
    assert head == f'kernel backends for cpu tensors ("auto" picks {auto!r}):'
    assert cols.split() == ["backend", "usable", "why"]
    assert [r.split(None, 2) for r in rows] == [[b.name, "yes" if b.usable else "no", b.reason] for b in info.values()]


def test_shrink_and_expand_validate_too():
    x, A, B = torch.randn(T, K), torch.randn(S, R, K), torch.randn(S, N, R)
    idx = torch.tensor([0, 1, -1, 2, 0, 1])
    with pytest.raises(ValueError, match="lora_a: shape"):
        olk.lora_shrink(x, torch.randn(S, R, K + 2), idx, backend="torch")
    h = olk.lora_shrink(x, A, idx, backend="torch")
    with pytest.raises(ValueError, match=r"h: has 2 rows"):
        olk.lora_expand(torch.zeros(T, N), h[:, :2], B, idx, torch.ones(S), backend="torch")
    with pytest.raises(ValueError, match=r"h: has 1 slices .* but lora_b has 2"):
        olk.lora_expand(torch.zeros(T, 2 * N), h, [B, B], idx, torch.ones(S), backend="torch")
    with pytest.raises(ValueError, match=r"lora_b: .*R=4, but the rank dimension is 3"):
        olk.lora_expand(torch.zeros(T, N), h[:, :, :3], B, idx, torch.ones(S), backend="torch")
    with pytest.raises(TypeError, match="h: expected float16"):
        olk.lora_expand(torch.zeros(T, N), h.double(), B, idx, torch.ones(S), backend="torch")


def test_empty_batch_is_fine():
    y = torch.zeros(0, N)
    assert olk.add_lora(y, torch.randn(0, K), torch.randn(S, R, K), torch.randn(S, N, R),
                        torch.zeros(0, dtype=torch.int64), torch.ones(S)) is y
    h = olk.lora_shrink(torch.randn(0, K), torch.randn(S, R, K), torch.zeros(0, dtype=torch.int32))
    assert h.shape == (1, 0, R)


def test_debug_switch_roundtrip():
    prev = olk.set_debug_checks(True)
    assert olk.debug_checks_enabled()
    olk.set_debug_checks(prev)
    assert olk.debug_checks_enabled() == prev


# ------------------------------------------------------------------------------ autograd

GRAD_BACKENDS = [b for b in ("torch", "cpu", "triton") if olk.available_backends("cpu")[b].usable]
IDX = torch.tensor([0, 1, -1, 2, 0, 1])


def grad_args(multi: bool, grad: str = ""):
    """Fresh arguments of every op; the one named ``grad`` (e.g. "x", "lora_a[1]") requires grad."""
    g = torch.Generator().manual_seed(3)
    widths = [5, 3] if multi else [N]
    t = dict(y=torch.randn(T, N, generator=g), x=torch.randn(T, K, generator=g),
             lora_a=[torch.randn(S, R, K, generator=g) for _ in widths],
             lora_b=[torch.randn(S, w, R, generator=g) for w in widths],
             scalings=torch.rand(S, generator=g), h=torch.randn(len(widths), T, R, generator=g))
    if grad:
        name, _, i = grad.partition("[")
        target = t[name][int(i[:-1])] if i else (t[name][0] if name.startswith("lora") else t[name])
        target.requires_grad_(True)
    if not multi:
        t["lora_a"], t["lora_b"] = t["lora_a"][0], t["lora_b"][0]
    return t


def run_op(op, t, backend):
    if op == "add_lora":
        return olk.add_lora(t["y"], t["x"], t["lora_a"], t["lora_b"], IDX, t["scalings"], backend=backend)
    if op == "lora_shrink":
        return olk.lora_shrink(t["x"], t["lora_a"], IDX, backend=backend)
    if op == "lora_expand":
        return olk.lora_expand(t["y"], t["h"], t["lora_b"], IDX, t["scalings"], backend=backend)
    bound = olk.BoundLoRA(t["lora_a"], t["lora_b"], t["scalings"], backend=backend)
    return bound(t["y"], t["x"], olk.build_batch_meta(IDX, S))


GRAD_ARGS = {
    "add_lora": ["y", "x", "lora_a", "lora_b", "scalings"],
    "lora_shrink": ["x", "lora_a"],
    "lora_expand": ["y", "h", "lora_b", "scalings"],
    "BoundLoRA": ["y", "x", "lora_a", "lora_b", "scalings"],
}
GRAD_CASES = [(op, arg, multi) for op, args in GRAD_ARGS.items() for arg in args for multi in (False, True)]


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("op,arg,multi", GRAD_CASES,
                         ids=[f"{o}-{a}-{'multi' if m else 'single'}" for o, a, m in GRAD_CASES])
def test_requires_grad_is_served_with_a_gradient(backend, op, arg, multi):
    """With grad mode on, an argument that requires grad gets a gradient (no longer refused): the
    values are those of a no-grad call, y is still updated in place and returned, and a backward
    gives that argument a finite, non-zero gradient of its own shape and dtype."""
    name = f"{arg}[1]" if multi and arg.startswith("lora") else arg
    want = run_op("add_lora" if op == "BoundLoRA" else op, grad_args(multi), "torch")   # plain tensors
    t = grad_args(multi, name)
    leaf = t[arg][1] if multi and arg.startswith("lora") else t[arg]
    if arg == "y":                        # a non-leaf y (in place on a leaf that requires grad: refused)
        t["y"] = t["y"] * 1
    y_in = t["y"]
    got = run_op(op, t, backend)
    if op != "lora_shrink":
        assert got is y_in
    assert got.requires_grad
    torch.testing.assert_close(got.detach(), want, atol=1e-4, rtol=1e-4)
    got.backward(torch.ones_like(got))
    g = leaf.grad
    assert g is not None and g.shape == leaf.shape and g.dtype == leaf.dtype
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    for ctx in (torch.no_grad, torch.inference_mode):
        t = grad_args(multi, name)
        with ctx():
            out = run_op(op, t, backend)
        torch.testing.assert_close(out.detach(), want, atol=1e-4, rtol=1e-4)


def test_add_rows_declines_when_x_or_y_requires_grad():
    if "cpu" not in GRAD_BACKENDS:
        pytest.skip("the native CPU extension is not built")
    from openlora_kernels.ops import cpu_ext
    t = grad_args(False)
    op = olk.BoundLoRA(t["lora_a"], t["lora_b"], t["scalings"], backend="cpu")
    meta = olk.build_batch_meta(IDX, S, block_m=1)
    rows = cpu_ext.row_args(meta)
    y = t["y"].clone()
    assert op.add_rows(y, t["x"], rows)                      # the fast path serves plain tensors
    want = y
    for which in ("x", "y"):
        x2, y2 = t["x"].clone(), t["y"].clone()
        (x2 if which == "x" else y2).requires_grad_(True)
        before = y2.detach().clone()
        assert op.add_rows(y2, x2, rows) is False, f"add_rows must decline when {which} requires grad"
        assert torch.equal(y2.detach(), before)
        if which == "x":                                      # the checked path it falls back to: autograd
            assert op(y2, x2, meta) is y2 and y2.grad_fn is not None
            torch.testing.assert_close(y2.detach(), want)
        else:
            with pytest.raises(RuntimeError, match="^y: a leaf tensor that requires grad cannot be updated in place"):
                op(y2, x2, meta)


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_requires_grad_under_torch_compile(backend):
    torch._dynamo.reset()

    def f(y, x, a, b, sc):
        return olk.add_lora(y * 1, x, a, b, IDX, sc, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    t = grad_args(False)
    x = t["x"].clone().requires_grad_(True)
    got = compiled(t["y"].clone(), x, t["lora_a"], t["lora_b"], t["scalings"])
    got.sum().backward()
    x_eager = t["x"].clone().requires_grad_(True)
    want = f(t["y"].clone(), x_eager, t["lora_a"], t["lora_b"], t["scalings"])
    want.sum().backward()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad, x_eager.grad, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        got = compiled(t["y"].clone(), x, t["lora_a"], t["lora_b"], t["scalings"])
    torch.testing.assert_close(got, want.detach(), atol=1e-4, rtol=1e-4)


def test_forbid_backward_keeps_values_and_raises_on_backward():
    t = grad_args(False)
    lin = torch.nn.Linear(K, N)
    y = lin(t["x"])                                          # requires grad, not a leaf
    with torch.no_grad():                                    # the patched layer's delta, in place
        olk.add_lora(y, t["x"], t["lora_a"], t["lora_b"], IDX, t["scalings"])
    values = y.detach().clone()
    out = olk.forbid_backward(y, "model.layers.0.self_attn.q_proj")
    assert out is y and out.requires_grad                    # the same tensor: no copy
    assert torch.equal(out.detach(), values)
    with pytest.raises(RuntimeError, match=r"^model\.layers\.0\.self_attn\.q_proj: gradients through the LoRA "
                                           r"delta are not implemented yet \(inference only\)"):
        out.sum().backward()
    # a 3-D (batch, seq, features) output, which nn.Linear returns as a view, and a leaf
    y3 = lin(torch.randn(2, T, K))
    out3 = olk.forbid_backward(y3, "mlp.up_proj")
    assert out3 is y3 and torch.equal(out3.detach(), y3.detach())
    with pytest.raises(RuntimeError, match="^mlp.up_proj: gradients"):
        (out3 * 2).sum().backward()
    leaf = torch.randn(3, requires_grad=True)
    out_leaf = olk.forbid_backward(leaf, "leaf")
    assert out_leaf.data_ptr() == leaf.data_ptr() and torch.equal(out_leaf.detach(), leaf.detach())
    with pytest.raises(RuntimeError, match="^leaf: gradients"):
        out_leaf.sum().backward()
    with pytest.raises(TypeError, match="t: expected a torch.Tensor"):
        olk.forbid_backward([1.0], "x")
