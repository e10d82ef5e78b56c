"""fp8 (e4m3) weight storage in the native CPU backend (csrc/cpu, ops/cpu_ext.py).

The weights are float8_e4m3fn with one float32 scale per rank row (ops/fp8.py):
    A_true[s, j, :] = A[s, j, :] * a_scale[s, j]      B_true[s, :, j] = B[s, :, j] * b_scale[s, j]
and the backend functions take them as ``scales=WeightScales(a=(...), b=(...))``.

Checked here, on every instruction set that runs on this machine and with several thread splits:
  * against an independent float64 loop over rows (written from the formula above, sharing no
    code with the package but quantize_rows, which only makes the inputs), with the error bound
    of TOL below: add_lora, shrink, expand, bind() / BoundAdd and its add_rows, the padded and the
    packed form, both B layouts, 1-4 slices of different widths, mixed ranks with 0, decode and
    prefill batches, odd K / N, R = 1.., scales of any strides;
  * bit for bit: with power-of-two scales the result is the one of the same weights stored as
    float32 / float16 (every e4m3 value times a power of two is exact there), so the conversion,
    the scales' addressing and the paths are exact, not merely close;
  * the conversion itself: every one of the 256 e4m3 codes (NaN included) read by the shrink's and
    the expand's loads, vector lanes and scalar tails, equal to torch's;
  * rows with slot -1 are never written (y's NaN there keeps its bits) nor read (x is NaN there),
    weights and scales beyond each slot's rank hold NaN (never read);
  * the extra pair bf16 activations with fp16 weights.
"""
import math

import pytest
import torch

import openlora_kernels as olk
from openlora_kernels.metadata import build_batch_meta
from openlora_kernels.ops import cpu_ext
from openlora_kernels.ops.fp8 import FP8, WeightScales, quantize_rows
from openlora_kernels.ops.packed import views

pytestmark = pytest.mark.skipif(not olk.available_backends("cpu")["cpu"].usable,
                                reason=olk.available_backends("cpu")["cpu"].reason)
ACTS = [torch.float32, torch.float16, torch.bfloat16]
NAN8 = 0x7f            # an e4m3fn NaN code
U32 = 2.0 ** -24       # float32's unit roundoff

# Error bound per activation dtype: |out - ref| <= acc * n * sum|terms| + out * |ref| + atol, where
# sum|terms| is the same float64 loop on absolute values and n the number of float32 roundings
# one output element goes through (K + R + 8: the shrink's K-term sum, the expand's R-term sum,
# the scale products, the scaling and y's add).
#   acc: every product is of exact values (x is exact in fp32, each e4m3 weight converts exactly,
#        a scale is an fp32 value) and the kernel sums in fp32: the rigorous worst case of any
#        summation order is n * 2^-24 of the sum of the terms' magnitudes, whatever the paths.
#   out: a 16-bit y is rounded once more to nearest (half an ulp: 2^-11 fp16, 2^-8 bf16; fp32: 0,
#        its rounding is one of the n).
#   atol: fp16's subnormal spacing near 0 (a rounded output of |ref| < 2^-14), 0 otherwise.
TOL = {
    torch.float32: dict(acc=U32, out=0.0, atol=0.0),
    torch.float16: dict(acc=U32, out=2.0 ** -11, atol=2.0 ** -25),
    torch.bfloat16: dict(acc=U32, out=2.0 ** -8, atol=0.0),
}
# The wide dtype holding the same values exactly (for the bit-for-bit comparisons): the kernels'
# (activation, weight) pair whose loads give the same fp32 values in the same order.
WIDE = {torch.float32: torch.float32, torch.float16: torch.float16, torch.bfloat16: torch.float16}


def bits(t):
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


@pytest.fixture
def each_isa():
    """Iterate over the instruction sets that run here (each forced in turn), then restore."""
    before = cpu_ext.isa()

    def levels():
        for level in cpu_ext._module().isas():
            assert cpu_ext.set_isa("base" if level == "baseline" else level) == level
            yield level

    try:
        yield levels
    finally:
        cpu_ext.set_isa("base" if before == "baseline" else before)


@pytest.fixture
def threads():
    """Set a thread split (min_elements=0: every call split); the setting is restored."""
    before = cpu_ext.threading_info()

    def use(n):
        cpu_ext.set_threading(min_elements=0 if n > 1 else 10 ** 12, max_threads=n)
    yield use
    cpu_ext.set_threading(before["min_elements"], before["max_threads"])


# ------------------------------------------------------------------------------ problems

def odd_strides(sc, kind):
    """The float32 [S, R] scales in another memory layout: 'contig', 'transposed' ([R, S]
    storage) or 'padded' (rows further apart, NaN between)."""
    if kind == "contig":
        return sc.contiguous()
    if kind == "transposed":
        return sc.t().contiguous().t()
    buf = torch.full((sc.shape[0], sc.shape[1] + 3), float("nan"))
    buf[:, :sc.shape[1]] = sc
    return buf[:, :sc.shape[1]]


def pow2_scales(shape, g):
    """Random powers of two 2^-6 .. 2^4 (times an e4m3 value: exact in fp16 / bf16 / fp32)."""
    return torch.pow(2.0, torch.randint(-6, 5, shape, generator=g).to(torch.float32))


class Fp8Problem:
    """One random problem in the padded form: per slice fp8 A [S, R, K], B [S, N_i, R] (in
    `b_layout`), float32 scales [S, R] per slice, ranks (None, [S] or [n, S]), rows with slot -1
    (x NaN there, y NaN there). Weights and scales beyond each slot's rank are NaN."""

    def __init__(self, T, K, widths, S, R, act, ranks, seed, rows="decode", b_layout="rank_major",
                 scale_kind="contig", pow2=False):
        g = torch.Generator().manual_seed(seed)
        self.T, self.K, self.widths, self.S, self.R, self.act = T, K, list(widths), S, R, act
        n = len(widths)
        if ranks == "mixed":
            r = torch.randint(0, R + 1, (S,), generator=g)
            if S >= 2:
                r[0], r[1] = 0, R
            self.ranks = r.to(torch.int32)
        elif ranks == "per_slice":
            self.ranks = torch.randint(0, R + 1, (n, S), generator=g).to(torch.int64)
        else:
            self.ranks = None
        if rows == "decode":      # 1-8 rows per slot, shuffled, and a few -1 rows
            idx = torch.cat([torch.full((int(torch.randint(1, 9, (), generator=g)),), s) for s in range(S)]
                            + [torch.full((3,), -1)])
            idx = idx[torch.randperm(idx.numel(), generator=g)][:T] if T else idx
        else:                     # prefill: long runs per slot (several 32-row units), some -1
            idx = torch.randint(0, S, (T,), generator=g)
            idx[torch.rand(T, generator=g) < 0.1] = -1
        self.idx = idx.to(torch.int64)
        self.T = T = self.idx.numel()
        self.meta = build_batch_meta(self.idx, S)
        self.a, self.b, self.a_s, self.b_s = [], [], [], []
        for i, N in enumerate(widths):
            A = torch.randn(S, R, K, generator=g, dtype=torch.float64) * K ** -0.5
            B = torch.randn(S, N, R, generator=g, dtype=torch.float64) * max(R, 1) ** -0.5
            qa, sa = quantize_rows(A)
            qbt, sb = quantize_rows(B.transpose(1, 2).contiguous())     # [S, R, N] rank-major storage
            if pow2:
                sa, sb = pow2_scales((S, R), g), pow2_scales((S, R), g)
            for s in range(S):                                            # beyond the rank: NaN
                r = self.rank(i, s)
                qa.view(torch.uint8)[s, r:] = NAN8
                qbt.view(torch.uint8)[s, r:] = NAN8
                sa[s, r:] = float("nan")
                sb[s, r:] = float("nan")
            qb = qbt.transpose(1, 2)                                      # [S, N, R] view
            if b_layout == "standard":
                qb = qb.contiguous()
            self.a.append(qa)
            self.b.append(qb)
            self.a_s.append(odd_strides(sa, scale_kind))
            self.b_s.append(odd_strides(sb, scale_kind))
        self.scal = (torch.rand(S, generator=g) * 2 - 0.5).to(torch.float32)
        x = torch.randn(T, K, generator=g).to(act)
        x[self.idx < 0] = float("nan")
        self.x = x
        y = torch.randn(T, sum(widths), generator=g).to(act)
        y[self.idx < 0] = float("nan")
        self.y = y

    def rank(self, i, s):
        if self.ranks is None:
            return self.R
        return int(self.ranks[i, s] if self.ranks.dim() == 2 else self.ranks[s])

    @property
    def scales(self):
        return WeightScales(a=tuple(self.a_s), b=tuple(self.b_s))

    # the weights the reference reads: slot s of slice i, its r rank rows, dequantized in float64
    def a_true(self, i, s, r):
        return self.a[i][s, :r].double() * self.a_s[i][s, :r].double()[:, None]

    def b_true(self, i, s, r):
        return self.b[i][s, :, :r].double() * self.b_s[i][s, :r].double()[None, :]

    def wide(self, dtype):
        """(A, B) per slice with the scales multiplied in, in `dtype` (exact for pow2 problems)."""
        a = [(A.float() * sa[:, :, None]).to(dtype) for A, sa in zip(self.a, self.a_s)]
        b = [(B.float() * sb[:, None, :]).to(dtype) for B, sb in zip(self.b, self.b_s)]
        return a, b


class PackedFp8(Fp8Problem):
    """The same problem in the packed form: one [rows, K] A buffer, one B buffer ([rows, N] rank-major
    storage seen as [N, rows], or [N, rows] contiguous) and one [rows] vector per scale per slice;
    slot s at rows offsets[s] .. + rank (gaps between slots hold NaN weights and scales)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        S, R = self.S, self.R
        g = torch.Generator().manual_seed(1234)
        rmax = [max(self.rank(i, s) for i in range(len(self.widths))) for s in range(S)]
        offs, o = [], 2
        for s in range(S):
            offs.append(o)
            o += rmax[s] + int(torch.randint(0, 3, (), generator=g))
        rows = o + 1
        self.offsets = torch.tensor(offs, dtype=torch.int32)
        bufs_a, bufs_b, vec_a, vec_b = [], [], [], []
        for i, N in enumerate(self.widths):
            A = torch.full((rows, self.K), NAN8, dtype=torch.uint8).view(FP8)
            Bt = torch.full((rows, N), NAN8, dtype=torch.uint8).view(FP8)
            va = torch.full((rows,), float("nan"))
            vb = torch.full((rows,), float("nan"))
            for s in range(S):
                r = self.rank(i, s)
                A[offs[s]:offs[s] + r] = self.a[i][s, :r]
                Bt[offs[s]:offs[s] + r] = self.b[i][s, :, :r].t()
                va[offs[s]:offs[s] + r] = self.a_s[i][s, :r]
                vb[offs[s]:offs[s] + r] = self.b_s[i][s, :r]
            B = Bt.t() if kw.get("b_layout", "rank_major") == "rank_major" else Bt.t().contiguous()
            bufs_a.append(A)
            bufs_b.append(B)
            vec_a.append(va)
            vec_b.append(vb)
        ranks = self.ranks if self.ranks is not None else torch.full((S,), R, dtype=torch.int32)
        self.ranks = ranks
        a_v, b_v, self.packed = views(bufs_a, bufs_b, self.offsets, ranks, R)
        Rp = a_v[0].shape[1]
        sv = lambda v: v.as_strided((S, Rp), (0, v.stride(0)), v.storage_offset())   # noqa: E731
        self.pk = (a_v, b_v, [sv(v) for v in vec_a], [sv(v) for v in vec_b])

    @property
    def scales(self):
        return WeightScales(a=tuple(self.pk[2]), b=tuple(self.pk[3]))

    def kernel_args(self):
        return self.pk[0], self.pk[1]


def kernel_args(p):
    return p.kernel_args() if isinstance(p, PackedFp8) else (p.a, p.b)


def packed_of(p):
    return p.packed if isinstance(p, PackedFp8) else None


# ------------------------------------------------------------------------------ the reference

def reference(p, op, h_in=None):
    """float64 (value, sum of |terms|) of the op by a loop over rows: 'add' -> y [T, N] (from p.y),
    'shrink' -> h [n, T, R], 'expand' -> y from h_in [n, T, R]."""
    T, R, n = p.T, p.R, len(p.widths)
    x = p.x.double()
    idx = p.idx.tolist()
    if op == "shrink":
        out, mag = torch.zeros(n, T, R, dtype=torch.float64), torch.zeros(n, T, R, dtype=torch.float64)
    else:
        out = p.y.double().clone()
        mag = p.y.double().abs()
    col = 0
    for i, N in enumerate(p.widths):
        for t in range(T):
            s = idx[t]
            if s < 0:
                continue
            r = p.rank(i, s)
            if r == 0:
                continue
            if op in ("add", "shrink"):
                A = p.a_true(i, s, r)
                h, hm = A @ x[t], A.abs() @ x[t].abs()
            else:
                h, hm = h_in[i, t, :r].double(), h_in[i, t, :r].double().abs()
            if op == "shrink":
                out[i, t, :r], mag[i, t, :r] = h, hm
                continue
            B = p.b_true(i, s, r)
            sc = float(p.scal[s])
            out[t, col:col + N] += sc * (B @ h)
            mag[t, col:col + N] += abs(sc) * (B.abs() @ hm)
        col += N
    return out, mag


def check_close(got, ref, mag, dtype, n_round, what):
    tol = TOL[dtype]
    bound = tol["acc"] * n_round * mag + tol["out"] * ref.abs() + tol["atol"]
    err = (got.double() - ref).abs()
    bad = ~(err <= bound)
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} elements outside the bound, worst err "
                                 f"{float(err[bad].max())} at bound {float(bound[bad].min())}")


def check_add_result(p, y, what):
    none = p.idx < 0
    assert torch.equal(bits(y[none]), bits(p.y[none])), f"{what}: rows without adapter were written"
    ref, mag = reference(p, "add")
    check_close(y[~none], ref[~none], mag[~none], p.act, p.K + p.R + 8, what)


def run_add(p, scales=True):
    a, b = kernel_args(p)
    y = p.y.clone()
    cpu_ext.add_lora(y, p.x, a, b, p.scal, p.ranks, p.meta, packed=packed_of(p),
                     scales=p.scales if scales else None)
    return y


# ------------------------------------------------------------------------------ tests

CASES = [  # T (prefill) K, widths, S, R, ranks
    (None, 2048, [2048], 4, 16, None),           # the decode shape of the timings
    (None, 67, [45], 3, 1, None),
    (None, 131, [29, 7], 5, 13, "mixed"),
    (None, 200, [64, 17, 33], 4, 24, "per_slice"),
    (None, 19, [9, 40, 3, 21], 6, 7, "mixed"),
    (150, 83, [50, 11], 3, 9, "mixed"),
    (96, 256, [130], 2, 32, None),
    (120, 33, [17, 70, 5], 4, 5, "per_slice"),
]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("b_layout", ["rank_major", "standard"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("form", ["padded", "packed"])
def test_add_lora_matches_the_float64_reference(each_isa, act, b_layout, case, form):
    T, K, widths, S, R, ranks = CASES[case]
    rows = "decode" if T is None else "prefill"
    cls = PackedFp8 if form == "packed" else Fp8Problem
    p = cls(T or 0, K, widths, S, R, act, ranks, seed=100 + case, rows=rows, b_layout=b_layout,
            scale_kind=["contig", "transposed", "padded"][case % 3])
    for level in each_isa():
        check_add_result(p, run_add(p), f"{level} {form} {b_layout}")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("form", ["padded", "packed"])
def test_shrink_and_expand_match_the_float64_reference(each_isa, act, case, form):
    T, K, widths, S, R, ranks = CASES[case]
    cls = PackedFp8 if form == "packed" else Fp8Problem
    p = cls(T or 0, K, widths, S, R, act, ranks, seed=200 + case, rows="decode" if T is None else "prefill",
            b_layout="rank_major" if case % 2 else "standard", scale_kind=["contig", "transposed", "padded"][case % 3])
    a, b = kernel_args(p)
    g = torch.Generator().manual_seed(case)
    h_in = torch.randn(len(widths), p.T, R, generator=g)
    ref_h, mag_h = reference(p, "shrink")
    ref_y, mag_y = reference(p, "expand", h_in)
    none = p.idx < 0
    for level in each_isa():
        h = torch.full((len(widths), p.T, R), float("nan"))    # zero-filled by the op, then written
        h = cpu_ext.shrink(p.x, a, p.ranks, p.meta, out=h, packed=packed_of(p), scales=WeightScales(a=p.scales.a))
        assert not bool(h[:, none].any()), "shrink: rows without adapter must stay 0"
        check_close(h, ref_h, mag_h, torch.float32, K + 4, f"{level} {form} shrink")
        y = p.y.clone()
        cpu_ext.expand(y, h_in, b, p.scal, p.ranks, p.meta, packed=packed_of(p), scales=WeightScales(b=p.scales.b))
        assert torch.equal(bits(y[none]), bits(p.y[none])), "expand: rows without adapter were written"
        check_close(y[~none], ref_y[~none], mag_y[~none], act, R + 8, f"{level} {form} expand")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("form", ["padded", "packed"])
def test_power_of_two_scales_give_the_bits_of_the_wide_weights(each_isa, act, case, form):
    """With scales 2^k the fp8 call equals, bit for bit, the same call on the weights times their
    scales stored in WIDE[act] (exact): the conversion, the scales' addressing (slots, ranks,
    offsets, strides) and the h scaling are exact, on every path the shape takes."""
    T, K, widths, S, R, ranks = CASES[case]
    for b_layout in ("rank_major", "standard"):
        cls = PackedFp8 if form == "packed" else Fp8Problem
        p = cls(T or 0, K, widths, S, R, act, ranks, seed=300 + case, rows="decode" if T is None else "prefill",
                b_layout=b_layout, scale_kind=["padded", "contig", "transposed"][case % 3], pow2=True)
        wa, wb = p.wide(WIDE[act])
        if b_layout == "rank_major":
            wb = [B.transpose(1, 2).contiguous().transpose(1, 2) for B in wb]
        for level in each_isa():
            y_fp8 = run_add(p)
            y_wide = p.y.clone()
            cpu_ext.add_lora(y_wide, p.x, wa, wb, p.scal, p.ranks, p.meta)
            assert torch.equal(bits(y_fp8), bits(y_wide)), f"{level} {form} {b_layout}: add differs from the wide weights"
            a, b = kernel_args(p)
            h8 = cpu_ext.shrink(p.x, a, p.ranks, p.meta, packed=packed_of(p), scales=p.scales)
            hw = cpu_ext.shrink(p.x, wa, p.ranks, p.meta)
            assert torch.equal(bits(h8), bits(hw)), f"{level} {form}: shrink differs from the wide weights"
            y8, yw = p.y.clone(), p.y.clone()
            cpu_ext.expand(y8, hw, b, p.scal, p.ranks, p.meta, packed=packed_of(p), scales=p.scales)
            cpu_ext.expand(yw, hw, wb, p.scal, p.ranks, p.meta)
            assert torch.equal(bits(y8), bits(yw)), f"{level} {form}: expand differs from the wide weights"


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("form", ["padded", "packed"])
def test_bound_add_and_add_rows_equal_the_call(each_isa, act, form):
    cls = PackedFp8 if form == "packed" else Fp8Problem
    for case in (2, 5):
        T, K, widths, S, R, ranks = CASES[case]
        p = cls(T or 0, K, widths, S, R, act, ranks, seed=400 + case, rows="decode" if T is None else "prefill")
        a, b = kernel_args(p)
        bound = cpu_ext.bind(a, b, p.scal, p.ranks, packed=packed_of(p), act_dtype=act, scales=p.scales)
        assert isinstance(bound, cpu_ext.BoundAdd)
        for level in each_isa():
            y_call = run_add(p)
            y_bound = p.y.clone()
            bound(y_bound, p.x, p.meta)
            assert torch.equal(bits(y_bound), bits(y_call)), f"{level}: BoundAdd differs from add_lora"
            x = p.x.contiguous()
            y_rows = p.y.clone().contiguous()
            T_, srt, seg = cpu_ext.row_args(p.meta)
            bound.add_rows(T_, x.data_ptr(), y_rows.data_ptr(), srt, seg)
            assert torch.equal(bits(y_rows), bits(y_call)), f"{level}: add_rows differs from add_lora"
            check_add_result(p, y_rows, f"{level} add_rows")


@pytest.mark.parametrize("act", ACTS)
def test_results_do_not_depend_on_the_thread_split(each_isa, threads, act):
    for case in (0, 3, 6):
        T, K, widths, S, R, ranks = CASES[case]
        for cls in (Fp8Problem, PackedFp8):
            p = cls(T or 0, K, widths, S, R, act, ranks, seed=500 + case, rows="decode" if T is None else "prefill")
            a, b = kernel_args(p)
            bound = cpu_ext.bind(a, b, p.scal, p.ranks, packed=packed_of(p), act_dtype=act, scales=p.scales)
            for level in each_isa():
                threads(1)
                serial = run_add(p)
                h1 = cpu_ext.shrink(p.x, a, p.ranks, p.meta, packed=packed_of(p), scales=p.scales)
                for n in (2, 3, 7):
                    threads(n)
                    assert torch.equal(bits(run_add(p)), bits(serial)), f"{level}: {n} threads differ"
                    yb = p.y.clone()
                    bound(yb, p.x, p.meta)
                    assert torch.equal(bits(yb), bits(serial)), f"{level}: bound, {n} threads differ"
                    hn = cpu_ext.shrink(p.x, a, p.ranks, p.meta, packed=packed_of(p), scales=p.scales)
                    assert torch.equal(bits(hn), bits(h1)), f"{level}: shrink, {n} threads differ"


def all_codes():
    """The 256 e4m3 codes as fp8 values and torch's float32 reading of them."""
    q = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8)
    return q, q.float()


@pytest.mark.parametrize("rows_per_slot", [1, 3, 40])
def test_every_e4m3_code_is_read_exactly_by_the_shrink(each_isa, rows_per_slot):
    """A's rows hold every finite code (rotated per rank row, so each code meets vector lanes and
    the K % 16 scalar tail), x rows are one-hot: h equals torch's value of each code exactly.
    The NaN codes give NaN."""
    q, vals = all_codes()
    finite = torch.nonzero(~torch.isnan(vals)).flatten()
    K = finite.numel()                                # 254: 15 vector blocks and a 14-element tail
    R = 5
    A = torch.stack([q[finite.roll(-37 * j)] for j in range(R)])[None]        # [1, R, K]
    ref = torch.stack([vals[finite.roll(-37 * j)] for j in range(R)])        # [R, K]
    sc = torch.ones(1, R)
    ks = torch.arange(0, K, 1)
    T = ks.numel()
    x = torch.zeros(T, K)
    x[torch.arange(T), ks] = 1.0
    S = max(1, T // rows_per_slot)
    idx = torch.arange(T) % S if rows_per_slot < 8 else torch.zeros(T, dtype=torch.int64)
    S = int(idx.max()) + 1
    meta = build_batch_meta(idx, S)
    A_s = A.expand(S, R, K)                           # every slot the same weights (slot stride 0)
    for level in each_isa():
        for act in ACTS:
            if act is not torch.float32 and rows_per_slot != 3:
                continue
            h = cpu_ext.shrink(x.to(act), [A_s], None, meta, scales=WeightScales(a=(sc.expand(S, R),)))
            assert torch.equal(h[0], ref.t()[ks]), f"{level} {act}: e4m3 codes read wrongly by the shrink"
        for nan_code in (0x7f, 0xff):
            An = torch.zeros(1, R, 40, dtype=torch.uint8)
            An[0, 0, 5] = nan_code                    # a vector lane
            An[0, 1, 37] = nan_code                   # the tail
            tn = 9 if rows_per_slot == 40 else 4      # (9 rows of one slot: the A^T panel path)
            xn = torch.ones(tn, 40)
            mn = build_batch_meta(torch.zeros(tn, dtype=torch.int64) if rows_per_slot == 40
                                  else torch.arange(tn) % 2, 2)
            h = cpu_ext.shrink(xn, [An.view(FP8).expand(2, R, 40)], None, mn,
                               scales=WeightScales(a=(torch.ones(2, R),)))
            assert bool(h[0, :, :2].isnan().all()) and not bool(h[0, :, 2:].isnan().any()), f"{level}: NaN code"


@pytest.mark.parametrize("b_layout", ["rank_major", "standard"])
@pytest.mark.parametrize("rows_per_slot", [1, 3, 9])
def test_every_e4m3_code_is_read_exactly_by_the_expand(each_isa, b_layout, rows_per_slot):
    """B's rank rows hold every finite code (N = 254: vector chunks and a scalar tail), h one-hot
    at rank j: y = torch's value of each code, exactly, on the expand's loads of both layouts."""
    q, vals = all_codes()
    finite = torch.nonzero(~torch.isnan(vals)).flatten()
    N, R = finite.numel(), 20                   # (20 ranks: a 16-rank block and a tail in the dot path)
    Bt = torch.stack([q[finite.roll(-53 * j)] for j in range(R)])           # [R, N] rank-major
    ref = torch.stack([vals[finite.roll(-53 * j)] for j in range(R)])       # [R, N]
    B = Bt.t()[None] if b_layout == "rank_major" else Bt.t().contiguous()[None]   # [1, N, R]
    T = R * rows_per_slot
    idx = torch.arange(T) % R                   # slot s: rows_per_slot rows, h one-hot at rank s
    meta = build_batch_meta(idx, R)
    h = torch.zeros(1, T, R)
    h[0, torch.arange(T), idx] = 1.0
    for level in each_isa():
        y = torch.zeros(T, N)
        cpu_ext.expand(y, h, [B.expand(R, N, R)], torch.ones(R), None, meta,
                       scales=WeightScales(b=(torch.ones(1, R).expand(R, R),)))
        assert torch.equal(y, ref[idx]), f"{level}: e4m3 codes read wrongly by the expand"


def test_plan_requires_scales_for_fp8_and_none_keeps_other_storage_unchanged():
    p = Fp8Problem(0, 40, [24], 2, 4, torch.float32, None, seed=7)
    with pytest.raises(ValueError, match="scale"):
        cpu_ext.add_lora(p.y.clone(), p.x, p.a, p.b, p.scal, None, p.meta)
    with pytest.raises(ValueError, match="b_scale"):
        cpu_ext.add_lora(p.y.clone(), p.x, p.a, p.b, p.scal, None, p.meta, scales=WeightScales(a=tuple(p.a_s)))
    with pytest.raises(ValueError, match="a_scale"):
        cpu_ext.shrink(p.x, p.a, None, p.meta, scales=WeightScales(b=tuple(p.b_s)))
    for act in ACTS:
        assert (act, FP8) in cpu_ext.MIXED_STORAGE
    assert (torch.bfloat16, torch.float16) in cpu_ext.MIXED_STORAGE
    # scales=None with fp32 weights: today's call, the same bits as without the keyword
    wa, wb = p.wide(torch.float32)
    y1, y2 = p.y.clone(), p.y.clone()
    cpu_ext.add_lora(y1, p.x, wa, wb, p.scal, None, p.meta)
    cpu_ext.add_lora(y2, p.x, wa, wb, p.scal, None, p.meta, scales=None)
    assert torch.equal(bits(y1), bits(y2))


@pytest.mark.parametrize("case", [0, 2, 5])
def test_bf16_activations_with_fp16_weights(each_isa, case):
    """The extra (bf16, fp16) pair against the float64 loop (scales 1 here: the fp16 weights are
    the values)."""
    T, K, widths, S, R, ranks = CASES[case]
    p = Fp8Problem(T or 0, K, widths, S, R, torch.bfloat16, ranks, seed=600 + case,
                   rows="decode" if T is None else "prefill")
    wa, wb = p.wide(torch.float16)
    p.a = [A.to(torch.float16) for A in wa]
    p.b = [B.to(torch.float16) for B in wb]
    p.a_s = [torch.ones(S, R) for _ in widths]
    p.b_s = [torch.ones(S, R) for _ in widths]
    p.a_true = lambda i, s, r: p.a[i][s, :r].double()                       # noqa: E731
    p.b_true = lambda i, s, r: p.b[i][s, :, :r].double()                    # noqa: E731
    for level in each_isa():
        y = p.y.clone()
        cpu_ext.add_lora(y, p.x, p.a, p.b, p.scal, p.ranks, p.meta)
        check_add_result(p, y, f"{level} bf16 x fp16")
