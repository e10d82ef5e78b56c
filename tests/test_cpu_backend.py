"""The native CPU backend ("cpu", csrc/cpu/): its number conversions, its binding's argument
errors, its routing, and what happens when it is not built. (Its parity with the float64
reference runs in test_ops_parity.py with the other backends.)"""
import numpy as np
import pytest
import torch

import openlora_kernels as olk
from openlora_kernels.ops import backends, cpu_ext

from lora_reference import make_problem, reference_delta

needs_ext = pytest.mark.skipif(not olk.available_backends("cpu")["cpu"].usable,
                               reason=olk.available_backends("cpu")["cpu"].reason)


def mod():
    return cpu_ext._module()


@needs_ext
def test_half_to_float_is_exact_for_every_half():
    bits = np.arange(65536, dtype=np.uint16)
    want = torch.from_numpy(bits.view(np.float16).astype(np.float32))
    got = torch.tensor([mod().f16_to_f32(int(b)) for b in bits])
    same = (want == got) | (torch.isnan(want) & torch.isnan(got))
    assert bool(same.all())


@needs_ext
def test_float_to_half_and_bfloat16_round_like_torch():
    g = torch.Generator().manual_seed(1)
    vals = torch.cat([
        torch.randn(20000, generator=g) * 10.0 ** torch.randint(-9, 6, (20000,), generator=g).float(),
        torch.tensor([0.0, -0.0, 65504.0, 65519.9, 65520.0, 5.96e-8, 2.9802322e-08, 6.1e-5, 1e30, -1e30,
                      float("inf"), -float("inf")]),
    ])
    want16 = vals.to(torch.float16).view(torch.int16).numpy().view(np.uint16)
    wantb = vals.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got16 = np.array([mod().f32_to_f16(float(v)) for v in vals], dtype=np.uint16)
    gotb = np.array([mod().f32_to_bf16(float(v)) for v in vals], dtype=np.uint16)
    assert (got16 == want16).all() and (gotb == wantb).all()
    nan16, nanb = mod().f32_to_f16(float("nan")), mod().f32_to_bf16(float("nan"))
    assert (nan16 & 0x7C00) == 0x7C00 and (nan16 & 0x3FF) and (nanb & 0x7F80) == 0x7F80 and (nanb & 0x7F)


@needs_ext
@pytest.mark.parametrize("args,msg", [
    (dict(op=7), "op: unknown op code 7"),
    (dict(dtype=9), "dtype: unknown dtype code 9"),
    (dict(a=[]), "a: no lora_a slices given"),
    (dict(widths=[1, 2]), "b: lora_b slices, widths and slot strides"),
    (dict(scal=0), "scalings: null pointer"),
])
def test_plan_rejects_bad_arguments(args, msg):
    base = dict(op=0, dtype=2, K=4, R=2, S=1, a=[1], a_ss=8, a_sr=4, a_sk=1, b=[1], widths=[3], b_ss=[6],
                b_sn=2, b_sr=1, scal=1, ranks=0, ranks64=False, s_rn=0, s_rs=1)
    base.update(args)
    with pytest.raises(ValueError, match=msg):
        mod().Plan(*base.values())


@needs_ext
def test_plan_rejects_null_metadata():
    A, B, sc = torch.randn(1, 2, 4), torch.randn(1, 3, 2), torch.ones(1)
    plan, _keep = cpu_ext._plan(mod().OP_ADD, torch.float32, 4, 2, 1, [A], [B], sc, None)
    x, y = torch.randn(1, 4), torch.zeros(1, 3)
    with pytest.raises(ValueError, match="metadata: null pointer"):
        plan.add(1, x.data_ptr(), 4, 1, y.data_ptr(), 3, 1, 0, 0)


@needs_ext
def test_prefill_like_batches_run_natively(monkeypatch):
    """Every batch runs the native kernel, prefill-like (block_m >= 16) too: the torch GEMMs are
    never called, and the result is the reference's."""
    calls = []
    for name in ("add_lora", "shrink", "expand"):
        monkeypatch.setattr(cpu_ext.torch_ref, name, lambda *a, _n=name, **k: calls.append(_n))
    p = make_problem(64, 32, [16], 2, 4, poison_padding=False)
    for bm in (16, 64, 4):
        y = p.y.clone()
        olk.add_lora(y, p.x, p.a[0], p.b[0], olk.build_batch_meta(p.indices, 2, block_m=bm), p.scalings,
                     backend="cpu")
        torch.testing.assert_close(y.double(), p.y.double() + reference_delta(p), atol=1e-4, rtol=1e-4)
    assert calls == []


@needs_ext
def test_bound_lora_uses_the_native_plan_and_sees_weight_updates():
    """BoundLoRA binds the weights once; in-place slot updates (what the pool does) are seen."""
    p = make_problem(10, 24, [12], 3, 4, poison_padding=False)
    ranks = torch.tensor([4, 2, 0], dtype=torch.int32)
    p.ranks = ranks
    op = olk.BoundLoRA(p.a[0], p.b[0], p.scalings, ranks, backend="cpu")
    assert isinstance(op._bound, cpu_ext.BoundAdd)
    meta = olk.build_batch_meta(p.indices, 3, block_m=1)
    y = p.y.clone()
    op(y, p.x, meta)
    torch.testing.assert_close(y.double(), p.y.double() + reference_delta(p), atol=1e-4, rtol=1e-4)
    p.a[0][1].mul_(2.0)           # a slot reload, in place
    ranks[2] = 3                  # a rank change (bumps the tensor's version: re-checked)
    y = p.y.clone()
    op(y, p.x, meta)
    torch.testing.assert_close(y.double(), p.y.double() + reference_delta(p), atol=1e-4, rtol=1e-4)
    ranks[0] = 9                  # above R: the cached check must notice the change
    with pytest.raises(ValueError, match="ranks: rank 9 exceeds"):
        op(p.y.clone(), p.x, meta)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bound_lora_add_rows_equals_the_checked_call(dtype):
    """add_rows (the patched layers' fast path) gives the bits of the general call for the pool's
    layout (rank-major B, widths hitting the 64-, 16- and partial-column chunks), and the rows'
    pointers come once per metadata object."""
    p = make_problem(13, 40, [97], 5, 8, dtype=dtype, ranks="mixed", poison_padding=False)
    p.b = [b.transpose(1, 2).contiguous().transpose(1, 2) for b in p.b]
    op = olk.BoundLoRA(p.a[0], p.b[0], p.scalings, p.ranks, backend="cpu")
    meta = olk.build_batch_meta(p.indices, 5, block_m=1)
    rows = cpu_ext.row_args(meta)
    assert rows is not None and rows[0] == 13 and cpu_ext.row_args(meta) == rows
    want = p.y.clone()
    op(want, p.x, meta)
    y = p.y.clone()
    assert op.add_rows(y, p.x, rows) is True
    assert torch.equal(y, want)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(y.double(), p.y.double() + reference_delta(p), atol=tol, rtol=tol)
    # a [batch, seq, K] input of the same rows is the same call
    y3 = p.y.clone()
    assert op.add_rows(y3.view(1, 13, 97), p.x.view(1, 13, 40), rows) is True
    assert torch.equal(y3, want)


@needs_ext
def test_bound_lora_add_rows_declines_what_it_does_not_serve():
    """Anything but contiguous CPU x / y of the op's dtype with the metadata's rows, a native
    plan and a decode-like batch: False, y untouched (the caller then takes the checked path)."""
    p = make_problem(9, 24, [16], 3, 4, poison_padding=False)
    op = olk.BoundLoRA(p.a[0], p.b[0], p.scalings, p.ranks, backend="cpu")
    rows = cpu_ext.row_args(olk.build_batch_meta(p.indices, 3, block_m=1))
    x, y = p.x, p.y.clone()
    declined = [
        (y, x, None),                                             # not natively served
        (y, x.double(), rows),                                    # dtype
        (y.double(), x, rows),
        (y, torch.randn(24, 9).t(), rows),                        # non-contiguous x
        (torch.randn(16, 9).t(), x, rows),                        # non-contiguous y
        (y, x[:8], rows),                                         # fewer rows than the metadata
        (y, torch.randn(9, 23), rows),                            # wrong K
        (torch.randn(9, 15), x, rows),                            # wrong N
        (y.clone().requires_grad_(), x, rows),                    # autograd would miss the delta
        (y, x.tolist(), rows),                                    # not a tensor
    ]
    for args in declined:
        before = args[0].detach().clone() if isinstance(args[0], torch.Tensor) else None
        assert op.add_rows(*args) is False
        assert torch.equal(args[0].detach(), before)
    torch_op = olk.BoundLoRA(p.a[0], p.b[0], p.scalings, p.ranks, backend="torch")
    assert torch_op.add_rows(y, x, rows) is False                # no native plan
    assert cpu_ext.row_args(olk.build_batch_meta(p.indices, 3, block_m=16)) is not None   # prefill-like: served


@needs_ext
def test_unbuilt_module_reports_why_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(cpu_ext, "_state", {"mod": None, "reason": "the native CPU extension was not built (test)"})
    info = olk.available_backends("cpu")["cpu"]
    assert not info.usable and "not built" in info.reason
    assert backends.resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(olk.BackendUnavailableError, match="'cpu' is unavailable for cpu tensors: the native CPU"):
        backends.resolve_backend("cpu", torch.device("cpu"))


def test_extension_is_built_where_ci_expects_it():
    """CI builds the native CPU extension (pip install -e .): a failed build must not pass as skips."""
    import os
    if os.environ.get("CI", "").lower() not in ("1", "true"):
        pytest.skip("only enforced in CI (CI=true)")
    info = olk.available_backends("cpu")["cpu"]
    assert info.usable, info.reason


# ------------------------------------------------------------------- calls split over threads


@pytest.fixture
def threading_setting():
    before = cpu_ext.threading_info()
    yield
    cpu_ext.set_threading(before["min_elements"], before["max_threads"])


@needs_ext
def test_torch_openmp_team_is_found_on_linux():
    """The split uses PyTorch's OpenMP runtime; on Linux with PyTorch's OpenMP backend it must be
    found (else every call silently runs on one core and the split tests below test nothing)."""
    import sys
    if not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("PyTorch here does not use GNU OpenMP")
    assert cpu_ext.threading_info()["available"]


@needs_ext
@pytest.mark.parametrize("threads", [2, 3, 7, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank_major_b", [False, True])
def test_split_over_threads_equals_serial_bit_for_bit(threads, dtype, rank_major_b, threading_setting):
    """Each (slice, slot) unit is computed whole by one thread: any split gives the serial bits,
    for unequal slices, mixed ranks (0 included), rows without adapter and more threads than units;
    B as given ([S, N, R]) or rank-major (the pool's layout: register-blocked expand, prefetched)."""
    if not cpu_ext.threading_info()["available"]:
        pytest.skip("no OpenMP runtime in this process")
    p = make_problem(45, 72, [40, 8, 97], 11, 8, dtype=dtype, ranks="per_slice")
    if rank_major_b:
        p.b = [b.transpose(1, 2).contiguous().transpose(1, 2) for b in p.b]
    meta = olk.build_batch_meta(p.indices, 11, block_m=1)
    cpu_ext.set_threading(min_elements=0, max_threads=1)
    serial = p.y.clone()
    olk.add_lora(serial, p.x, p.a, p.b, meta, p.scalings, p.ranks, backend="cpu")
    h_serial = olk.lora_shrink(p.x, p.a, meta, p.ranks, backend="cpu")
    cpu_ext.set_threading(min_elements=0, max_threads=threads)
    y = torch.full_like(p.y, float("nan"))
    y.copy_(p.y)
    olk.add_lora(y, p.x, p.a, p.b, meta, p.scalings, p.ranks, backend="cpu")
    assert torch.equal(y.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       serial.view(torch.int16 if dtype != torch.float32 else torch.int32))
    h = olk.lora_shrink(p.x, p.a, meta, p.ranks, backend="cpu")
    assert torch.equal(h, h_serial)
    y2 = p.y.clone()
    olk.lora_expand(y2, h, p.b, meta, p.scalings, p.ranks, backend="cpu")
    cpu_ext.set_threading(max_threads=1)
    y2_serial = p.y.clone()
    olk.lora_expand(y2_serial, h, p.b, meta, p.scalings, p.ranks, backend="cpu")
    assert torch.equal(y2.float(), y2_serial.float())
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(y.double(), p.y.double() + reference_delta(p), atol=tol, rtol=tol)


@needs_ext
def test_split_happens_only_above_the_threshold(threading_setting, monkeypatch):
    """min_elements decides: a call below it runs serially (checked through the same bits, and
    through the setting's round trip); bad settings raise naming the argument."""
    cpu_ext.set_threading(min_elements=10 ** 12, max_threads=4)
    assert cpu_ext.threading_info()["min_elements"] == 10 ** 12
    p = make_problem(20, 64, [48], 6, 4)
    meta = olk.build_batch_meta(p.indices, 6, block_m=1)
    y = p.y.clone()
    olk.add_lora(y, p.x, p.a, p.b, meta, p.scalings, backend="cpu")
    torch.testing.assert_close(y.double(), p.y.double() + reference_delta(p), atol=1e-4, rtol=1e-4)
    for kwargs, msg in ((dict(min_elements=-1), "min_elements"), (dict(max_threads=-2), "max_threads"),
                        (dict(max_threads=1.5), "max_threads")):
        with pytest.raises(ValueError, match=msg):
            cpu_ext.set_threading(**kwargs)
