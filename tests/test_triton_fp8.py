"""fp8 (e4m3) weight storage on the Triton backend (ops/fp8.py, ops/triton_sgmv.py ``scales=``),
under the interpreter, against an independent float64 reference written here.

Weights come from ``fp8.quantize_rows`` of fresh random float32 matrices (A per rank row, B per
rank column); the reference dequantizes them with the contract's formula
(``A_true[s, j, :] = A[s, j, :] * a_scale[s, j]``, ``B_true[s, :, j] = B[s, :, j] * b_scale[s, j]``)
and loops over the rows in float64. Everything a kernel must not read is NaN: x of rows with
slot -1, the fp8 weights and the scales beyond each slot's rank, every row of a packed buffer
no slot owns, h beyond a slot's rank (lone expand); everything it must not write is checked:
y of rows with slot -1 and of rank-0 rows keeps its bits, the shrink's h (the launcher's buffer
filled with NaN instead of zeros) stays NaN beyond each slot's rank and on rows with slot -1.

Tolerances (TOL, relative to the sum of the absolute values of the terms of each output,
including y's old value: |got - ref| <= TOL * (|y| + scal * sum_j |B_true| |h_j|-terms)).
The fp8 values are exact in every activation dtype and the products of a 16-bit x with them are
exact in fp32, so the only roundings are: fp32 accumulation (tiny at these K), the tensor-core
(block_m >= 16) path's rounding of the scaled rank-r intermediate to the activations' dtype
(u: 2^-11 fp16, 2^-8 bf16) and y's final rounding to its dtype (u). So 4u covers 16-bit
activations with a factor 2 of slack; float32 gets 1e-5, the worst case of its fp32 sums here
((K + R + 2) * 2^-24 of the |terms| with K <= 70, R <= 16: 5.2e-6; about 1e-7 is seen). The
shrink's h (fp32 sums of exact products) gets the same 1e-5 for every dtype.
"""
import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import openlora_kernels as olk  # noqa: E402
from openlora_kernels.ops import triton_sgmv  # noqa: E402
from openlora_kernels.ops import packed as packed_mod  # noqa: E402
from openlora_kernels.ops.fp8 import FP8, WeightScales, quantize_rows  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN = float("nan")
TOL = {torch.float32: 1e-5, torch.float16: 4 * 2.0 ** -11, torch.bfloat16: 4 * 2.0 ** -8}
H_TOL = 1e-5
DTYPES = [torch.float16, torch.float32, torch.bfloat16]

# name: (T, K, slice widths, S, R, ranks kind, block_m)
CASES = {
    "decode_bm1": (5, 37, [29], 6, 8, "mixed", 1),
    "decode_qkv_bm4": (7, 48, [40, 12, 12], 4, 16, "per_slice", 4),
    "five_slices_bm2": (9, 24, [9, 1, 17, 5, 3], 3, 4, "mixed", 2),
    "rank1_bm4": (10, 19, [23], 4, 1, "mixed", 4),
    "prefill_bm16": (40, 70, [45], 3, 16, "mixed", 16),
    "prefill_4slices_bm32": (36, 33, [9, 17, 5, 3], 3, 8, "per_slice", 32),
}
FORMS = ["standard", "pool", "packed"]


def _usable():
    info = olk.available_backends("cpu")["triton"]
    if not info.usable:
        pytest.skip(info.reason)


class Problem:
    """One random fp8 problem. Logical per-slot data (``q_a[i]`` [S, R, K] fp8, ``sa[i]`` [S, R],
    ``q_b[i]`` [S, N_i, R] fp8, ``sb[i]`` [S, R], ``ranks_i[i]`` [S]) for the reference; the
    kernels' arguments (``a``, ``b``, ``scales``, ``packed``) in the form asked for."""

    def __init__(self, case, dtype, form, seed, act_dtype=None):
        T, K, widths, S, R, rk, bm = CASES[case]
        g = torch.Generator().manual_seed(seed)
        self.T, self.K, self.widths, self.S, self.R, self.bm = T, K, widths, S, R, bm
        self.dtype = dtype
        n = len(widths)
        if rk == "per_slice":
            ranks = torch.randint(0, R + 1, (n, S), generator=g)
            ranks[:, 0] = 0                              # a rank-0 slot
            ranks[0, -1] = R
            self.ranks_i = [ranks[i] for i in range(n)]
        else:
            ranks = torch.randint(0, R + 1, (S,), generator=g, dtype=torch.int32)
            ranks[0] = 0
            ranks[-1] = R
            self.ranks_i = [ranks] * n
        self.ranks = ranks
        # each slot's rows: random magnitudes per rank row (the scales differ row by row)
        self.q_a, self.sa, self.q_b, self.sb = [], [], [], []
        for w in widths:
            A = torch.randn(S, R, K, generator=g) * torch.rand(S, R, 1, generator=g) * 0.3
            Bt = torch.randn(S, R, w, generator=g) * torch.rand(S, R, 1, generator=g) * 0.3     # [S, R, N] rank-major
            qa, sa = quantize_rows(A)
            qbt, sb = quantize_rows(Bt)
            self.q_a.append(qa)
            self.sa.append(sa)
            self.q_b.append(qbt.transpose(1, 2))                                                 # [S, N, R]
            self.sb.append(sb)
        # what a kernel must not read: beyond each rank (weights and scales) NaN
        for i in range(n):
            for s in range(S):
                r = int(self.ranks_i[i][s])
                self.q_a[i][s, r:] = NAN
                self.sa[i][s, r:] = NAN
                self.q_b[i][s, :, r:] = NAN
                self.sb[i][s, r:] = NAN
        idx = torch.randint(-1, S, (T,), generator=g)
        idx[0] = -1
        idx[1] = 0                                       # rank 0 (in every slice for "mixed")
        self.indices = idx
        self.scalings = torch.rand(S, generator=g) + 0.5
        self.x = torch.randn(T, K, generator=g).to(dtype)
        self.x[idx < 0] = NAN                            # never read
        self.y = torch.randn(T, sum(widths), generator=g).to(dtype)
        self.meta = olk.build_batch_meta(idx, S, block_m=bm)
        self.form = form
        self.packed = None
        if form == "packed":
            self._pack(g)
        else:
            self.a = list(self.q_a)
            if form == "pool":                           # the [S, N, R] view of rank-major [S, R, N] storage
                self.b = list(self.q_b)
            else:
                self.b = [B.contiguous() for B in self.q_b]
            # scales with assorted strides: slice 0 a transposed view, slice 1 (if any) strided
            sa, sb = [], []
            for i in range(n):
                if i == 0:
                    sa.append(self.sa[i].T.contiguous().T)
                    sb.append(self.sb[i])
                else:
                    buf = torch.full((S, R, 2), NAN)
                    buf[:, :, 0] = self.sa[i]
                    sa.append(buf[:, :, 0])
                    sb.append(self.sb[i].T.contiguous().T)
            self.scales = WeightScales(a=tuple(sa), b=tuple(sb))

    def _pack(self, g):
        """One NaN-filled [rows, K] / rank-major [rows, N_i] fp8 buffer and [rows] fp32 scale vector
        per slice and side, slots in a shuffled order with gaps, NaN rows around the buffers."""
        S, R, K, n = self.S, self.R, self.K, len(self.widths)
        rmax = torch.stack([r.to(torch.int64) for r in self.ranks_i]).amax(0)
        order = torch.randperm(S, generator=g).tolist()
        offs, cur = [0] * S, 0
        for s in order:
            cur += int(torch.randint(0, 3, (1,), generator=g))
            offs[s] = cur
            cur += int(rmax[s])
        rows, pad = cur + 2, 3
        a_bufs, b_bufs, sa_vecs, sb_vecs = [], [], [], []
        for i, w in enumerate(self.widths):
            A = torch.full((rows + 2 * pad, K), NAN).to(FP8)
            Bt = torch.full((rows + 2 * pad, w), NAN).to(FP8)
            # slice 0's scale vectors contiguous, the others' strided (a column of a [rows, 2] buffer)
            vsa = torch.full((rows + 2 * pad, 1 if i == 0 else 2), NAN)
            vsb = torch.full((rows + 2 * pad, 2 if i == 0 else 1), NAN)
            for s in range(S):
                r, o = int(self.ranks_i[i][s]), pad + offs[s]
                A[o:o + r] = self.q_a[i][s, :r]
                Bt[o:o + r] = self.q_b[i][s, :, :r].T
                vsa[o:o + r, 0] = self.sa[i][s, :r]
                vsb[o:o + r, 0] = self.sb[i][s, :r]
            a_bufs.append(A[pad:pad + rows])
            b_bufs.append(Bt[pad:pad + rows].T)
            sa_vecs.append(vsa[pad:pad + rows, 0])
            sb_vecs.append(vsb[pad:pad + rows, 0])
        offsets = torch.tensor(offs, dtype=torch.int32)
        self.a, self.b, self.packed = packed_mod.views(a_bufs, b_bufs, offsets, self.ranks, R)
        Rv = self.a[0].shape[1]

        def view(v):                                     # [S, R'] with slot stride 0 over the [rows] vector
            return v.as_strided((S, Rv), (0, v.stride(0)), v.storage_offset())

        self.scales = WeightScales(a=tuple(view(v) for v in sa_vecs), b=tuple(view(v) for v in sb_vecs))

    # ------------------------------------------------------------------ float64 reference

    def true_a(self, i, s):
        r = int(self.ranks_i[i][s])
        return self.q_a[i][s, :r].double() * self.sa[i][s, :r].double()[:, None]             # [r, K]

    def true_b(self, i, s):
        r = int(self.ranks_i[i][s])
        return self.q_b[i][s, :, :r].double() * self.sb[i][s, :r].double()[None, :]          # [N_i, r]

    def ref_h(self):
        """([n, T, R] float64 h, the same with |terms|); 0 beyond ranks and on -1 rows."""
        n = len(self.widths)
        h = torch.zeros(n, self.T, self.R, dtype=torch.float64)
        mag = torch.zeros_like(h)
        for t in range(self.T):
            s = int(self.indices[t])
            if s < 0:
                continue
            xt = self.x[t].double()
            for i in range(n):
                A = self.true_a(i, s)
                r = A.shape[0]
                h[i, t, :r] = A @ xt
                mag[i, t, :r] = A.abs() @ xt.abs()
        return h, mag

    def ref_expand(self, h, hmag):
        """(new y float64, magnitude) for y += scal * B_true h per row."""
        y = self.y.double().clone()
        mag = y.abs()
        cols = [0]
        for w in self.widths:
            cols.append(cols[-1] + w)
        for t in range(self.T):
            s = int(self.indices[t])
            if s < 0:
                continue
            sc = float(self.scalings[s])
            for i in range(len(self.widths)):
                B = self.true_b(i, s)
                r = B.shape[1]
                y[t, cols[i]:cols[i + 1]] += sc * (B @ h[i, t, :r])
                mag[t, cols[i]:cols[i + 1]] += sc * (B.abs() @ hmag[i, t, :r])
        return y, mag

    def ref_add(self):
        return self.ref_expand(*self.ref_h())

    def untouched_rows(self):
        """Rows y must keep bit for bit: slot -1, and rows whose slot has rank 0 in every slice."""
        keep = self.indices < 0
        for t in range(self.T):
            s = int(self.indices[t])
            if s >= 0 and all(int(r[s]) == 0 for r in self.ranks_i):
                keep[t] = True
        return keep


def assert_bounded(got, ref, mag, tol, what):
    err = (got.double() - ref).abs()
    bound = tol * mag + 1e-30
    assert not torch.isnan(got).any(), f"{what}: NaN in the output (a poisoned value was read)"
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} entries off; worst err/bound "
                           f"{float((err / bound).max()):.3g} (tol {tol:g})")


def same_bits(u, v):
    it = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[u.element_size()]
    return torch.equal(u.contiguous().view(it), v.contiguous().view(it))


def check_y(p, y, what):
    ref, mag = p.ref_add()
    keep = p.untouched_rows()
    assert same_bits(y[keep], p.y[keep]), f"{what}: untouched rows were written"
    assert_bounded(y[~keep], ref[~keep], mag[~keep], TOL[p.dtype], what)


def _seed(*parts):
    return sum(ord(c) * (i + 1) for i, c in enumerate("/".join(map(str, parts)))) % 10007


# ---------------------------------------------------------------------------------- add_lora


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(CASES))
def test_add_lora_fp8(case, dtype, form):
    """add_lora's route (fused decode kernel for block_m < 16, shrink + expand for >= 16)."""
    _usable()
    p = Problem(case, dtype, form, _seed(case, dtype, form))
    y = p.y.clone()
    triton_sgmv.add_lora(y, p.x, p.a, p.b, p.scalings, p.ranks, p.meta, p.packed, p.scales)
    check_y(p, y, f"add_lora {case} {dtype} {form}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", ["decode_qkv_bm4", "prefill_bm16", "prefill_4slices_bm32"])
def test_fused_kernel_fp8_every_tile_mode(case, dtype):
    """The fused kernel itself, also on tensor-core tiles (block_m >= 16: not add_lora's route)."""
    _usable()
    for form in ("pool", "packed"):
        p = Problem(case, dtype, form, _seed("fused", case, dtype, form))
        y = p.y.clone()
        triton_sgmv.fused(y, p.x, p.a, p.b, p.scalings, p.ranks, p.meta, p.packed, p.scales)
        check_y(p, y, f"fused {case} {dtype} {form}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=lambda d: str(d).split(".")[-1])
def test_segment_plan_is_not_taken_with_scales(dtype, monkeypatch):
    """OPENLORA_TRITON_DECODE=segment forces the segment plan for decode batches; with scales
    add_lora still runs the fused kernel (the segment kernels take no scales)."""
    _usable()
    from openlora_kernels.ops import triton_segment
    monkeypatch.setenv("OPENLORA_TRITON_DECODE", "segment")
    called = []
    monkeypatch.setattr(triton_segment, "segment", lambda *a, **k: called.append(1))
    p = Problem("decode_qkv_bm4", dtype, "standard", 11)
    y = p.y.clone()
    triton_sgmv.add_lora(y, p.x, p.a, p.b, p.scalings, p.ranks, p.meta, None, p.scales)
    assert not called
    check_y(p, y, "add_lora (segment forced)")


# ------------------------------------------------------------------------- shrink and expand


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", ["decode_bm1", "five_slices_bm2", "prefill_bm16", "prefill_4slices_bm32"])
def test_shrink_fp8_writes_only_its_entries(case, dtype, form, monkeypatch):
    """h = a_scale * x A^T; the launcher's buffer is filled with NaN instead of zeros, so every
    entry the kernel must not write (beyond the rank, rows with slot -1) stays NaN."""
    _usable()
    p = Problem(case, dtype, form, _seed("shrink", case, dtype, form))
    real_new_h = triton_sgmv.new_h
    monkeypatch.setattr(triton_sgmv, "new_h", lambda *a, **k: real_new_h(*a, **k).fill_(NAN))
    h = triton_sgmv.shrink(p.x, p.a, p.ranks, p.meta, packed=p.packed, scales=p.scales)
    ref, mag = p.ref_h()
    written = torch.zeros_like(ref, dtype=torch.bool)
    for t in range(p.T):
        s = int(p.indices[t])
        if s >= 0:
            for i in range(len(p.widths)):
                written[i, t, :int(p.ranks_i[i][s])] = True
    assert torch.isnan(h[~written]).all(), "shrink wrote beyond a slot's rank or into a row with slot -1"
    assert_bounded(h[written], ref[written], mag[written], H_TOL, f"shrink {case} {dtype} {form}")


@pytest.mark.parametrize("h_dtype", ["fp32", "act"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", ["decode_qkv_bm4", "rank1_bm4", "prefill_bm16", "prefill_4slices_bm32"])
def test_expand_fp8(case, dtype, form, h_dtype):
    """y += scal * B (b_scale * h) from a given h (fp32, or the activations' dtype), NaN beyond
    each slot's rank and on rows with slot -1 (never read)."""
    _usable()
    p = Problem(case, dtype, form, _seed("expand", case, dtype, form, h_dtype))
    g = torch.Generator().manual_seed(5)
    n = len(p.widths)
    h = torch.randn(n, p.T, p.R, generator=g).to(torch.float32 if h_dtype == "fp32" else dtype)
    for t in range(p.T):
        s = int(p.indices[t])
        for i in range(n):
            h[i, t, (0 if s < 0 else int(p.ranks_i[i][s])):] = NAN
    y = p.y.clone()
    triton_sgmv.expand(y, h, p.b, p.scalings, p.ranks, p.meta, p.packed,
                       fp32_h=dtype == torch.float32, scales=p.scales)
    hv = torch.nan_to_num(h.double(), nan=0.0)
    ref, mag = p.ref_expand(hv, hv.abs())
    keep = p.untouched_rows()
    assert same_bits(y[keep], p.y[keep]), "expand wrote rows it must not touch"
    assert_bounded(y[~keep], ref[~keep], mag[~keep], TOL[dtype], f"expand {case} {dtype} {form} h {h_dtype}")


def test_split_k_shrink_fp8():
    """SPLIT_K > 1: every K split scales its partial sum (fp32 atomics into the zero-filled h)."""
    _usable()
    from openlora_kernels.ops import configs
    p = Problem("prefill_bm16", torch.float32, "packed", 3)
    with configs.override_config("shrink", SPLIT_K=3, BLOCK_K=16):
        h = triton_sgmv.shrink(p.x, p.a, p.ranks, p.meta, packed=p.packed, scales=p.scales)
    ref, mag = p.ref_h()
    assert_bounded(h, ref, mag, H_TOL, "shrink SPLIT_K=3")


# ------------------------------------------------------------------------------------ bound


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", ["decode_qkv_bm4", "prefill_bm16"])
def test_bind_fp8(case, dtype, form):
    """bind(..., scales=) gives add_lora's result (the interpreter takes BoundAdd's general path)."""
    _usable()
    p = Problem(case, dtype, form, _seed("bind", case, dtype, form))
    op = triton_sgmv.bind(p.a, p.b, p.scalings, p.ranks, p.packed, act_dtype=dtype, scales=p.scales)
    for _ in range(2):
        y = p.y.clone()
        op(y, p.x, p.meta)
        check_y(p, y, f"bind {case} {dtype} {form}")


def test_no_scales_launches_unchanged(monkeypatch):
    """scales=None: no launch is W_SCALED, and the launches are those of the same call without the
    keyword (same kernels, grids and constexprs)."""
    _usable()
    seen = []

    class Rec:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def go(*args, **kw):
                seen.append((self.fn.__name__, grid, kw.get("W_SCALED"), kw.get("FP32_DOT")))
                return self.fn[grid](*args, **kw)
            return go

    for name in ("_sgmv_shrink_kernel", "_sgmv_expand_kernel", "_sgmv_fused_kernel"):
        monkeypatch.setattr(triton_sgmv, name, Rec(getattr(triton_sgmv, name)))
    g = torch.Generator().manual_seed(0)
    S, R, K = 3, 8, 24
    a = [torch.randn(S, R, K, generator=g).half()]
    b = [torch.randn(S, 20, R, generator=g).half()]
    for bm in (2, 16):
        idx = torch.randint(-1, S, (17,), generator=g)
        meta = olk.build_batch_meta(idx, S, block_m=bm)
        x = torch.randn(17, K, generator=g).half()
        y1 = torch.randn(17, 20, generator=g).half()
        y2 = y1.clone()
        sc = torch.rand(S, generator=g)
        triton_sgmv.add_lora(y1, x, a, b, sc, None, meta)
        n0 = len(seen)
        triton_sgmv.add_lora(y2, x, a, b, sc, None, meta, scales=None)
        assert seen[:n0] == seen[n0:] and all(w is False for _, _, w, _ in seen)
        assert same_bits(y1, y2)
        seen.clear()


# ------------------------------------------------------------------- bf16 x with fp16 weights


@pytest.mark.parametrize("plan", ["fused", "segment", "split"])
def test_bf16_activations_fp16_weights(plan, monkeypatch):
    """(bfloat16, float16) storage: fp32 products from the fp16 weights (FP32_DOT); a forced
    segment plan is not taken (its kernels run in the activations' dtype)."""
    _usable()
    from openlora_kernels.ops import triton_segment
    assert (torch.bfloat16, torch.float16) in triton_sgmv.MIXED_STORAGE
    g = torch.Generator().manual_seed(1)
    T, K, widths, S, R = (9, 40, (24, 8), 4, 8) if plan != "split" else (34, 40, (24, 8), 2, 8)
    ranks = torch.tensor([0, 8, 3, 5][:S], dtype=torch.int32)
    a = [torch.randn(S, R, K, generator=g).half() for _ in widths]
    b = [torch.randn(S, w, R, generator=g).half() for w in widths]
    idx = torch.randint(-1, S, (T,), generator=g)
    x = torch.randn(T, K, generator=g).bfloat16()
    y0 = torch.randn(T, sum(widths), generator=g).bfloat16()
    sc = torch.rand(S, generator=g)
    meta = olk.build_batch_meta(idx, S, block_m=16 if plan == "split" else 2)
    monkeypatch.setenv("OPENLORA_TRITON_DECODE", "segment" if plan == "segment" else "fused")
    called = []
    monkeypatch.setattr(triton_segment, "segment", lambda *a, **k: called.append(1))
    y = y0.clone()
    triton_sgmv.add_lora(y, x, a, b, sc, ranks, meta)
    assert not called
    ref = y0.double().clone()
    mag = ref.abs()
    col = 0
    for i, w in enumerate(widths):
        for t in range(T):
            s = int(idx[t])
            if s < 0:
                continue
            r = int(ranks[s])
            ht = a[i][s, :r].double() @ x[t].double()
            ref[t, col:col + w] += float(sc[s]) * (b[i][s, :, :r].double() @ ht)
            mag[t, col:col + w] += float(sc[s]) * (b[i][s, :, :r].double().abs() @ (a[i][s, :r].double().abs()
                                                                                      @ x[t].double().abs()))
        col += w
    # fp32 products from the exact inputs: only y's rounding to bf16 (u = 2^-8), and on the split
    # route h's rounding nowhere (fp32 dots); 2u
    assert_bounded(y, ref, mag, 2 * 2.0 ** -8, f"bf16 x / fp16 weights, {plan}")


# -------------------------------------------------------------- bound plans (offline sm_90)


def bound_plan_check() -> int:
    """Run WITHOUT TRITON_INTERPRET: a BoundAdd with fp8 weights records its fused plan on the
    first call and its second call launches exactly the same arguments (scale pointers included,
    in the plan's tail), launches stubbed at the driver (benchmarks/host_stub.py, as
    tests/triton_bound_check.py). Returns the number of failures."""
    sys.path.insert(0, ROOT)
    from benchmarks.host_stub import stub_triton

    failures = 0
    for dt, form, widths in ((torch.float16, "pool", (64, 32, 32)), (torch.bfloat16, "standard", (96,)),
                             (torch.float32, "packed", (48, 16))):
        S, R, K, T = 4, 16, 64, 5
        g = torch.Generator().manual_seed(0)
        ranks = torch.tensor([16, 0, 7, 12], dtype=torch.int32)
        qa = [quantize_rows(torch.randn(S, R, K, generator=g)) for _ in widths]
        qb = [quantize_rows(torch.randn(S, R, w, generator=g)) for w in widths]
        a = [q for q, _ in qa]
        b = [q.transpose(1, 2) if form == "pool" else q.transpose(1, 2).contiguous() for q, _ in qb]
        scales = WeightScales(a=tuple(s for _, s in qa), b=tuple(s for _, s in qb))
        packed = None
        if form == "packed":
            rows = S * R
            offs = torch.arange(S, dtype=torch.int32) * R
            a2 = [A.reshape(rows, K) for A in a]
            b2 = [q.reshape(rows, q.shape[-1]).T for q, _ in qb]
            a, b, packed = packed_mod.views(a2, b2, offs, ranks, R)
            scales = WeightScales(a=tuple(s.reshape(rows).as_strided((S, R), (0, 1)) for _, s in qa),
                                  b=tuple(s.reshape(rows).as_strided((S, R), (0, 1)) for _, s in qb))
        record = []
        with stub_triton(record), torch.no_grad():
            op = triton_sgmv.bind(a, b, torch.rand(S), ranks, packed, act_dtype=dt, scales=scales)
            x, y = torch.randn(T, K).to(dt), torch.randn(T, sum(widths)).to(dt)
            meta = olk.build_batch_meta(torch.arange(T) % S, S)
            op(y, x, meta)
            mid = len(record)
            hits = op.plan_hits
            op(y, x, meta)
            first, second = record[:mid], record[mid:]
            ptrs = {t.data_ptr() for t in (*scales.a, *scales.b)}
            args = {v for launch in first for v in launch[3]}
            what = f"{dt} {form} widths={widths}"
            if op.plan_hits != hits + 1:
                print("FAILED", what, ": the second call did not take the bound plan")
                failures += 1
            elif not first or first != second:
                print("FAILED", what, f": launches differ\n  jit:   {first}\n  bound: {second}")
                failures += 1
            elif not ptrs <= args:
                print("FAILED", what, ": the scale pointers are not among the launch arguments")
                failures += 1
            else:
                print("ok", what, f"{len(first)} launch(es)")
    print(f"fp8 bound plan check: {failures} failed")
    return failures


def test_bound_plan_fp8_offline():
    """bound_plan_check in a subprocess (needs gcc for the stand-in libcuda, and no interpreter)."""
    import shutil
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc for the stand-in libcuda")
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), *filter(None, [env.get("PYTHONPATH")])])
    code = "import sys, test_triton_fp8 as t; sys.exit(1 if t.bound_plan_check() else 0)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1200,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "fp8 bound plan check: 0 failed" in out.stdout


if __name__ == "__main__":
    sys.exit(1 if bound_plan_check() else 0)
