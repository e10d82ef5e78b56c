"""fp8 (e4m3) adapter storage (issue 15, point 2): float8_e4m3fn weights with a float32 scale per
rank row (ops/fp8.py), fp32 / bf16 / fp16 activations.

Ops level, per backend that declares the pair in its MIXED_STORAGE (the torch reference always;
cpu and triton where built), two bounds:

* against the float64 reference computed from the DEQUANTIZED stored weights (q * scale, exact in
  float64): what is left is the kernels' fp32 accumulation and the output's rounding to the
  activation dtype, so lora_reference.TOL of that dtype;
* against the float64 reference of the float32 weights before quantization: e4m3 keeps 3
  mantissa bits, so an element in the normal range is off by at most u = 2^-4 of itself, one
  below 2^-6 of its row's scale by at most half a subnormal step, 2^-10 * scale; a product of an
  A and a B element is then off by (2u + u^2) of |A'||B'| with |A'| = |A| + 2^-10 s_A / u (the
  absolute term folded in), so |delta - delta_fp32| <= (2u + u^2) * sum |scale||B'||A'||x| plus
  the TOL above.

Poisoning: A / B / scales beyond each slot's rank hold NaN (fp8's NaN byte, a NaN scale), rows
without an adapter hold NaN in y and must stay NaN; h is fresh.

Model level (the tiny llama of hf_models.py, float32 and bfloat16): ours with
adapter_dtype=float8_e4m3fn (1) against PEFT on the same adapters' dequantized weights, to the
fp32 parity tolerance; (2) against PEFT's float32 result per row within (2u + u^2) * n * the row's
LoRA effect, n the adapter's patched modules; base rows bit for bit the unpatched model's; the
packed pool after evictions too; the memory report names the dtype and counts the scales.
"""
import copy
import zlib

import pytest
import torch

import openlora_kernels as olk
from openlora_kernels.ops import custom_ops
from openlora_kernels.ops.fp8 import FP8, dequantize_rows, quantize_rows

from lora_reference import TOL, make_problem, reference_delta, reference_shrink

U8 = 2.0 ** -4                    # e4m3's unit roundoff (3 mantissa bits)
SUB = 2.0 ** -10                  # half of e4m3's subnormal step, in units of the row's scale
REL = 2 * U8 + U8 * U8
ACTS = [torch.float32, torch.bfloat16, torch.float16]
ACT_IDS = ["fp32", "bf16", "fp16"]
BACKENDS = ["torch", "cpu", "triton"]

# the shapes of tests/test_storage_dtype.py: (T, K, widths, S, R, ranks, rank-major B)
from test_storage_dtype import CASES, TRITON_CASES  # noqa: E402


def usable(backend, act):
    info = olk.available_backends("cpu")[backend]
    if not info.usable:
        pytest.skip(f"{backend}: {info.reason}")
    if (act, FP8) not in custom_ops.backend_module(backend).MIXED_STORAGE:
        pytest.skip(f"{backend}: no fp8 storage with {act} activations (its MIXED_STORAGE)")


def _rank(p, i, s):
    if p.ranks is None:
        return p.a[0].shape[1]
    rk = p.ranks
    return int(rk[i, s] if rk.dim() == 2 else rk[s])


def fp8_problem(case, act, seed):
    """(problem with x / y in ``act`` and its fp8 weights, a_scales, b_scales (lists per slice),
    the problem with the dequantized weights (float64), the problem with the float32 weights)."""
    T, K, widths, S, R, ranks, rank_major = CASES[case]
    p32 = make_problem(T, K, widths, S, R, dtype=torch.float32, ranks=ranks, seed=seed)
    nan8 = torch.tensor(float("nan")).to(FP8)
    qa, qb, sa, sb, da, db = [], [], [], [], [], []
    for i, (A, B) in enumerate(zip(p32.a, p32.b)):
        q_a = torch.full(A.shape, float("nan")).to(FP8)
        bt = torch.full((S, R, B.shape[1]), float("nan")).to(FP8)
        s_a = torch.full((S, R), float("nan"))
        s_b = torch.full((S, R), float("nan"))
        for s in range(S):
            r = _rank(p32, i, s)
            if r:
                q_a[s, :r], s_a[s, :r] = quantize_rows(A[s, :r])
                bt[s, :r], s_b[s, :r] = quantize_rows(B[s, :, :r].T)
        assert torch.isnan(q_a.float()).any() or all(_rank(p32, i, s) == R for s in range(S))
        q_b = bt.transpose(1, 2) if rank_major else bt.transpose(1, 2).contiguous()
        qa.append(q_a), qb.append(q_b), sa.append(s_a), sb.append(s_b)
        da.append(dequantize_rows(q_a, s_a, torch.float64))
        db.append(dequantize_rows(bt, s_b, torch.float64).transpose(1, 2))
    del nan8
    p = copy.copy(p32)
    p.x, p.y = p32.x.to(act), p32.y.to(act)
    p.y[p.indices < 0] = float("nan")          # poisoned: these rows must never be written
    pd = copy.copy(p)
    pd.a, pd.b = da, db
    p.a, p.b = qa, qb
    p32 = copy.copy(p32)
    p32.x, p32.y = p.x, p.y
    one = len(widths) == 1
    return p, (sa[0] if one else sa), (sb[0] if one else sb), pd, p32


def _magnitude(p32, sa_list) -> torch.Tensor:
    """[T, N] float64 sum over |terms| of the delta, |A| widened by the subnormal term."""
    q = copy.copy(p32)
    q.x = p32.x.double().abs()
    q.a = [A.double().abs().nan_to_num(0.0) + SUB / U8 * s.double().nan_to_num(0.0)[:, :, None]
           for A, s in zip(p32.a, sa_list)]
    q.b = [B.double().abs().nan_to_num(0.0) for B in p32.b]
    q.scalings = p32.scalings.abs()
    return reference_delta(q)


def _check(y, p, pd, p32, sa, act, what):
    y64 = y.double()
    no_adapter = p.indices < 0
    assert torch.isnan(y64[no_adapter]).all(), f"{what}: a row without adapter was written"
    keep = ~no_adapter
    tol = TOL[act]
    ref = p.y.double() + reference_delta(pd)
    err = (y64 - ref).abs()[keep]
    assert not torch.isnan(err).any(), f"{what}: NaN in the output"
    bound = tol["atol"] + tol["rtol"] * ref.abs()[keep]
    assert (err <= bound).all(), f"{what}: off the dequantized reference by {float((err - bound).max()):.3g}"
    ref32 = p.y.double() + reference_delta(p32)
    err32 = (y64 - ref32).abs()[keep]
    sa_list = sa if isinstance(sa, list) else [sa]
    bound32 = REL * _magnitude(p32, sa_list)[keep] + tol["atol"] + tol["rtol"] * ref32.abs()[keep]
    assert (err32 <= bound32).all(), f"{what}: fp8 error above (2u + u^2) * magnitude"
    return float(err32.max()) if err32.numel() else 0.0


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_add_lora_fp8_parity(backend, case, act):
    usable(backend, act)
    if backend == "triton" and case not in TRITON_CASES:
        pytest.skip("triton interpreter: a subset of the cases")
    p, sa, sb, pd, p32 = fp8_problem(case, act, seed=zlib.crc32(f"{case}{act}".encode()))
    y = p.y.clone()
    out = olk.add_lora(y, p.x, p.lora_a(), p.lora_b(), p.indices, p.scalings, p.ranks, a_scales=sa, b_scales=sb,
                       backend=backend)
    assert out is y
    _check(y, p, pd, p32, sa, act, f"{backend} {case} {act}")


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_shrink_and_expand_fp8_parity(backend, act):
    usable(backend, act)
    p, sa, sb, pd, p32 = fp8_problem("qkv_per_slice", act, seed=5)
    h = olk.lora_shrink(p.x, p.lora_a(), p.indices, p.ranks, a_scales=sa, backend=backend)
    assert h.dtype == torch.float32
    href = reference_shrink(pd)
    tol = TOL[torch.float32]
    assert ((h.double() - href).abs() <= tol["atol"] + tol["rtol"] * href.abs()).all(), "h off the reference"
    y = p.y.clone()
    olk.lora_expand(y, h, p.lora_b(), p.indices, p.scalings, p.ranks, b_scales=sb, backend=backend)
    _check(y, p, pd, p32, sa, act, f"{backend} shrink+expand {act}")


def _packed(p, sa, sb):
    """The packed form of an fp8 problem (one slice): [rows, K] A, the [N, rows] view of rank-major
    [rows, N] B, [rows] scales, offsets with gaps (rows between slots hold NaN)."""
    S, R, K = p.a[0].shape
    N = p.b[0].shape[1]
    ranks = p.ranks if p.ranks is not None else torch.full((S,), R, dtype=torch.int32)
    offs, cur = [], 3
    for s in range(S):
        offs.append(cur)
        cur += int(ranks[s]) + 2
    rows = cur + 1
    A = torch.full((rows, K), float("nan")).to(FP8)
    Bt = torch.full((rows, N), float("nan")).to(FP8)
    SA = torch.full((rows,), float("nan"))
    SB = torch.full((rows,), float("nan"))
    for s in range(S):
        r, o = int(ranks[s]), offs[s]
        A[o:o + r] = p.a[0][s, :r]
        Bt[o:o + r] = p.b[0][s, :, :r].T
        SA[o:o + r], SB[o:o + r] = sa[s, :r], sb[s, :r]
    return A, Bt.T, SA, SB, torch.tensor(offs, dtype=torch.int32), ranks


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_fp8_parity(backend, act):
    usable(backend, act)
    if not getattr(custom_ops.backend_module(backend), "SUPPORTS_PACKED", False) and backend != "torch":
        pytest.skip(f"{backend}: no packed form")
    for case in ("decode3_mixed", "long_rank_major"):
        p, sa, sb, pd, p32 = fp8_problem(case, act, seed=zlib.crc32(f"packed{case}".encode()))
        A, B, SA, SB, offs, ranks = _packed(p, sa, sb)
        y = p.y.clone()
        olk.add_lora(y, p.x, A, B, p.indices, p.scalings, ranks, offsets=offs, max_rank=p.a[0].shape[1],
                     a_scales=SA, b_scales=SB, backend=backend)
        _check(y, p, pd, p32, sa, act, f"{backend} packed {case} {act}")
        h = olk.lora_shrink(p.x, A, p.indices, ranks, offsets=offs, max_rank=p.a[0].shape[1], a_scales=SA,
                            backend=backend)
        y = p.y.clone()
        olk.lora_expand(y, h, B, p.indices, p.scalings, ranks, offsets=offs, b_scales=SB, backend=backend)
        _check(y, p, pd, p32, sa, act, f"{backend} packed shrink+expand {case} {act}")


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bound_lora_fp8(backend, act):
    """BoundLoRA over fp8 slots, as the pool binds them: indices, metadata and (cpu) add_rows."""
    usable(backend, act)
    from openlora_kernels.metadata import build_batch_meta
    from openlora_kernels.ops import cpu_ext
    from openlora_kernels.ops.api import BoundLoRA

    p, sa, sb, pd, p32 = fp8_problem("decode3_mixed", act, seed=13)
    op = BoundLoRA(p.lora_a(), p.lora_b(), p.scalings, p.ranks, a_scales=sa, b_scales=sb, backend=backend, dtype=act)
    meta = build_batch_meta(p.indices, p.a[0].shape[0])
    for how in ("indices", "meta", "meta again", "rows"):
        y = p.y.clone()
        if how == "rows":
            rows = cpu_ext.row_args(meta) if backend == "cpu" else None
            if rows is None:
                continue
            assert op.add_rows(y, p.x, rows)
        else:
            op(y, p.x, p.indices if how == "indices" else meta)
        _check(y, p, pd, p32, sa, act, f"{backend} bound {how} {act}")


def test_fp8_refusals_name_the_problem():
    x, y = torch.randn(2, 8).bfloat16(), torch.zeros(2, 6).bfloat16()
    idx, sc = torch.tensor([0, -1]), torch.ones(1)
    A, sa = quantize_rows(torch.randn(1, 4, 8))
    Bt, sb = quantize_rows(torch.randn(1, 4, 6))
    B = Bt.transpose(1, 2)
    with pytest.raises(TypeError, match=r"a_scales: required, lora_a is stored in float8_e4m3fn"):
        olk.add_lora(y, x, A, B, idx, sc, backend="torch")
    with pytest.raises(TypeError, match=r"b_scales: required"):
        olk.add_lora(y, x, A, B, idx, sc, a_scales=sa, backend="torch")
    with pytest.raises(TypeError, match=r"a_scales: given, but lora_a is stored in torch.bfloat16"):
        olk.add_lora(y, x, A.bfloat16(), B.bfloat16(), idx, sc, a_scales=sa, backend="torch")
    with pytest.raises(ValueError, match=r"a_scales: expected shape \[1, 4\]"):
        olk.add_lora(y, x, A, B, idx, sc, a_scales=sa[:, :3], b_scales=sb, backend="torch")
    with pytest.raises(TypeError, match=r"b_scales: expected dtype float32"):
        olk.add_lora(y, x, A, B, idx, sc, a_scales=sa, b_scales=sb.double(), backend="torch")
    with pytest.raises(ValueError, match=r"a_scales: 2 scale tensors given, but lora_a has 1 slices"):
        olk.add_lora(y, x, [A], [B], idx, sc, a_scales=[sa, sa], b_scales=[sb], backend="torch")
    if hasattr(torch, "float8_e5m2"):
        with pytest.raises(TypeError, match=r"float8_e5m2 is not supported; the fp8 storage dtype is "):
            olk.add_lora(y, x, A.float().to(torch.float8_e5m2), B.float().to(torch.float8_e5m2), idx, sc,
                         backend="torch")
    with pytest.raises(TypeError, match=r"b_scales: this op takes no lora_b|unexpected keyword"):
        olk.lora_shrink(x, A, idx, b_scales=sb, backend="torch")
    # inference only: gradients and torch.compile are refused, naming the arguments
    xg = x.float().requires_grad_()
    with pytest.raises(NotImplementedError, match=r"gradients through fp8"):
        olk.add_lora(y.float(), xg, A, B, idx, sc, a_scales=sa, b_scales=sb, backend="torch")
    with pytest.raises(NotImplementedError, match=r"gradients through fp8"):
        olk.lora_backward(y.float(), x.float(), A, B, idx, sc, backend="torch")
    # embedding LoRAs (a gather) do not take fp8
    with pytest.raises(TypeError, match=r"fp8 \(float8_e4m3fn\) storage is not supported for embedding"):
        olk.add_lora_embedding(y, torch.tensor([1, 2]), A[:, :, :8], B, idx, sc, backend="torch")
    # nothing was written by any refused call
    assert y.eq(0).all()
    # a backend without fp8 (cuda: never built for it) is named
    from openlora_kernels.ops.api import check_storage
    with pytest.raises(TypeError, match=r"adapter_dtype.*backend 'cuda'"):
        check_storage("cuda", torch.bfloat16, [A])


def test_quantize_rows():
    w = torch.randn(5, 33) * torch.logspace(-3, 2, 5)[:, None]
    w[2] = 0.0
    q, s = quantize_rows(w)
    assert q.dtype is FP8 and s.dtype == torch.float32 and s.shape == (5,)
    assert s[2] == 1.0 and q[2].float().eq(0).all()
    back = dequantize_rows(q, s)
    # the largest value of each non-zero row maps to 448 exactly; every element within u of itself
    # (or half a subnormal step of the scale)
    assert torch.equal(q.float().abs().amax(1)[[0, 1, 3, 4]], torch.full((4,), 448.0))
    assert ((back - w).abs() <= U8 * w.abs() + SUB * s[:, None]).all()
    with pytest.raises(ValueError, match="non-finite"):
        quantize_rows(torch.tensor([[1.0, float("inf")]]))


# ------------------------------------------------------------------------------ model level


# the tiny llama and its three PEFT adapters, and the batch's rows, of tests/test_storage_dtype.py
from test_storage_dtype import ROWS, _as_stored, llama  # noqa: E402,F401  (llama: a fixture)


def _dequantized_peft(r):
    """A copy of PEFT model ``r`` whose LoRA weights are what our fp8 storage keeps: lora_A per
    row, lora_B per column (its rank index), quantized and dequantized."""
    r = copy.deepcopy(r)
    with torch.no_grad():
        for pn, prm in r.named_parameters():
            if "lora_A" in pn or "lora_B" in pn:
                prm.copy_(_as_stored(pn, prm, FP8).to(prm.dtype))
    return r


def _fp8_backends():
    out = []
    for b in ("torch", "cpu"):
        info = olk.available_backends("cpu")[b]
        if info.usable and (torch.float32, FP8) in custom_ops.backend_module(b).MIXED_STORAGE:
            out.append(b)
    return out


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_model_fp8_vs_peft(llama, backend, packed):
    from hf_models import ATOL, RTOL, batch_inputs

    if backend not in _fp8_backends():
        pytest.skip(f"{backend}: no fp8 storage with float32 activations")
    base, paths, refs = llama
    kw8 = {}
    if packed:    # 14 rows per layer: two of the three adapters at a time (ranks 4, 8, 10), evictions between
        probe = olk.patch_model(copy.deepcopy(base), max_adapters=4, max_rank=16, backend=backend,
                                adapter_dtype=FP8, device_budget_bytes=1 << 30)
        per_row = sum(ls.row_bytes() * max(ls.experts, 1) for ls in probe.pool.layers.values())
        kw8 = dict(device_budget_bytes=14 * per_row)
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=4, max_rank=16, backend=backend,
                         adapter_dtype=FP8, **kw8)
    for n, p in paths.items():
        lm.load_adapter(n, p)
    kw, keep = batch_inputs("llama", [7, 4, 6, 5, 3], seed=1)
    with torch.no_grad():
        base_logits = base(**kw).logits
        ref = {n: r(**kw).logits for n, r in refs.items()}
        deq = {n: _dequantized_peft(r)(**kw).logits for n, r in refs.items()}
    n_modules = {n: sum(1 for pn, _ in r.named_parameters() if "lora_A" in pn) for n, r in refs.items()}
    rounds = ([["attn", None, "mlp", "attn", "mlp"], ["mix", "attn", None, "mix", "attn"],
               ["mlp", None, "attn", "mlp", "attn"], ["mix", None, "attn", "mix", "attn"]] if packed else [ROWS])
    for rows in rounds:
        out = lm(adapter_names=rows, **kw).logits
        for i, name in enumerate(rows):
            k = keep[i]
            if name is None:
                assert torch.equal(out[i], base_logits[i]), f"base row {i} differs from the unpatched model"
                continue
            # exact upcast of the stored fp8 values, fp32 sums: PEFT on the dequantized weights
            torch.testing.assert_close(out[i][k], deq[name][i][k], atol=ATOL, rtol=RTOL)
            effect = (ref[name][i][k] - base_logits[i][k]).abs().max()
            assert effect > 1e-2
            err = (out[i][k] - ref[name][i][k]).abs().max()
            bound = REL * n_modules[name] * effect
            assert err <= bound, (f"row {i} ({name}): |ours - peft fp32| = {err:.3g} > (2u + u^2) * "
                                  f"{n_modules[name]} modules * {effect:.3g}")
            assert err > 0
    rep = lm.memory_report()
    assert {a.dtype for a in rep.adapters} == {FP8}
    assert " float8_e4m3fn " in str(rep)
    for ls in lm.pool.layers.values():
        if ls.a is not None and ls.kind == "linear":
            assert ls.a.dtype is FP8 and ls.a_scale is not None
            assert ls.nbytes == ls.a.numel() + ls.bt.numel() + 4 * (ls.a_scale.numel() + ls.b_scale.numel())
    if packed:           # the last round's two adapters resident, the third evicted
        assert sorted(a.name for a in rep.adapters if a.slot is not None) == ["attn", "mix"]
        assert rep.device_bytes_used <= kw8["device_budget_bytes"]


def test_model_fp8_host_bytes(llama):
    """Host copies: 1 byte per weight plus 8 bytes of scales per rank row (A's and B's)."""
    base, paths, refs = llama
    lm8 = olk.patch_model(copy.deepcopy(base), max_adapters=4, max_rank=16, backend="torch", adapter_dtype=FP8)
    lm32 = olk.patch_model(copy.deepcopy(base), max_adapters=4, max_rank=16, backend="torch")
    for n, p in paths.items():
        lm8.load_adapter(n, p)
        lm32.load_adapter(n, p)
    for n in paths:
        h8, h32 = lm8.pool.host_weights(n), lm32.pool.host_weights(n)
        assert set(h8) == set(h32)
        for layer, w in h8.items():
            w32 = h32[layer]
            assert w.a.dtype is FP8 and w.bt.dtype is FP8
            assert w.nbytes == (w32.a.numel() + w32.b.numel()) + 8 * w32.rank
            torch.testing.assert_close(dequantize_rows(w.a, w.a_scale), w32.a, atol=0, rtol=U8)


def test_model_fp8_bf16_activations(llama):
    """A bfloat16 model with fp8 storage (backend torch; cpu / triton where they run it): against
    PEFT's bfloat16 model, within its own bf16 noise (ours with bf16 storage against the same
    PEFT) plus the fp8 bound."""
    from hf_models import batch_inputs

    base, paths, refs = llama
    b16 = copy.deepcopy(base).to(torch.bfloat16)
    backends = ["torch"] + [b for b in ("cpu",) if olk.available_backends("cpu")[b].usable
                            and (torch.bfloat16, FP8) in custom_ops.backend_module(b).MIXED_STORAGE]
    kw, keep = batch_inputs("llama", [7, 4, 6, 5, 3], seed=2)
    with torch.no_grad():
        base_logits = b16(**kw).logits.float()
        ref = {n: copy.deepcopy(r).to(torch.bfloat16)(**kw).logits.float() for n, r in refs.items()}
    n_modules = {n: sum(1 for pn, _ in r.named_parameters() if "lora_A" in pn) for n, r in refs.items()}
    for backend in backends:
        lm8 = olk.patch_model(copy.deepcopy(b16), max_adapters=4, max_rank=16, backend=backend, adapter_dtype=FP8)
        lm16 = olk.patch_model(copy.deepcopy(b16), max_adapters=4, max_rank=16, backend=backend)
        for n, p in paths.items():
            lm8.load_adapter(n, p)
            lm16.load_adapter(n, p)
        out8 = lm8(adapter_names=ROWS, **kw).logits.float()
        out16 = lm16(adapter_names=ROWS, **kw).logits.float()
        for i, name in enumerate(ROWS):
            k = keep[i]
            if name is None:
                assert torch.equal(out8[i], base_logits[i])
                continue
            noise = (out16[i][k] - ref[name][i][k]).abs().max()
            effect = (ref[name][i][k] - base_logits[i][k]).abs().max()
            err = (out8[i][k] - ref[name][i][k]).abs().max()
            assert err <= 2 * noise + REL * n_modules[name] * effect + 1e-2, (backend, i, err, noise, effect)


def test_patch_model_fp8_refusals(llama):
    base = llama[0]
    if hasattr(torch, "float8_e5m2"):
        with pytest.raises(ValueError, match=r"adapter_dtype: torch.float8_e5m2 is not supported"):
            olk.patch_model(copy.deepcopy(base), backend="torch", adapter_dtype=torch.float8_e5m2)
    lm = olk.patch_model(copy.deepcopy(base), backend="torch", adapter_dtype=FP8)
    with pytest.raises(NotImplementedError, match="adapter_dtype"):
        lm.load_adapter("t", None, trainable=True, r=4)


@pytest.mark.parametrize("kind", ["embedding", "dora", "moe"])
def test_other_adapter_kinds_with_fp8_storage(tmp_path, kind):
    """Embedding LoRA (kept in the embedding's dtype: its shrink is a gather), DoRA (g folded into
    B before quantization) and MoE expert / router LoRA with adapter_dtype=float8_e4m3fn: every
    row within (2u + u^2) * n * effect of PEFT's float32 result; base rows bit for bit (llama)."""
    import test_hf_coverage as cov
    from hf_models import batch_inputs

    backend = next(iter(_fp8_backends()[::-1]))       # the native cpu kernels where they run fp8
    if kind == "moe":
        arch, configs, base = "mixtral", cov.moe_configs(), cov.moe_base("mixtral")
    else:
        arch, base = "llama", None
        configs = cov.embedding_configs("llama") if kind == "embedding" else cov.dora_configs("llama")
    zoo = cov.Zoo(arch, configs, str(tmp_path), base=base)
    lm = zoo.patched(backend, adapter_dtype=FP8)
    rows = list(configs) + [None]
    kw, keep = batch_inputs(arch, [6, 3, 5, 4][:len(rows)], seed=1)
    out = lm(adapter_names=rows, **kw).logits
    base_logits = zoo.want("forward", None, kw)
    for i, name in enumerate(rows):
        k = keep[i]
        if name is None:
            if kind != "moe":
                assert torch.equal(out[i], base_logits[i])
            continue
        ref = zoo.refs[name]
        want = zoo.want("forward", name, kw)[i]
        n = sum(1 for pn, _ in ref.named_parameters() if "lora_A" in pn or "lora_embedding_A" in pn)
        effect = (want[k] - base_logits[i][k]).abs().max()
        err = (out[i][k] - want[k]).abs().max()
        assert 0 < err <= REL * n * effect, f"{kind} row {i} ({name}): {err:.3g} vs effect {effect:.3g}, n={n}"
    used = [ls for ls in lm.pool.layers.values() if ls.a is not None]
    assert used and all((ls.a.dtype is FP8) == (ls.kind != "embedding") for ls in used)
    assert (kind != "moe") == any(ls.kind == "embedding" for ls in used)     # (dora's zoo has one too)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_projection_groups_with_fp8_storage(llama, backend):
    """group_projections=True binds one launch over sibling projections' fp8 slots, their scales
    included: the same logits as the ungrouped layers (same weights, same fp32 sums per slice)."""
    from hf_models import ATOL, RTOL, batch_inputs, warm_up_groups

    if backend not in _fp8_backends():
        pytest.skip(f"{backend}: no fp8 storage with float32 activations")
    base, paths, _ = llama
    lms = [olk.patch_model(copy.deepcopy(base), max_adapters=4, max_rank=16, backend=backend, adapter_dtype=FP8,
                           group_projections=g) for g in (True, False)]
    for lm in lms:
        for n, p in paths.items():
            lm.load_adapter(n, p)
    warm_up_groups(lms[0], "llama")
    kw, _ = batch_inputs("llama", [5, 3, 4, 6, 2], seed=4)
    grouped, plain = (lm(adapter_names=ROWS, **kw).logits for lm in lms)
    groups = {g for g, _ in lms[0]._groups.values()}
    ops = [op for g in groups for op in g.bound.ops if op is not None]
    assert any(isinstance(op.lora_a, list) and len(op.lora_a) > 1 for op in ops), "no multi-slice group launch"
    assert all(op._scales is not None for op in ops)          # (each bound with its members' fp8 scales)
    torch.testing.assert_close(grouped, plain, atol=ATOL, rtol=RTOL)
