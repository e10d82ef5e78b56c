"""The native CPU kernels' decode paths (csrc/cpu/sgmv_cpu_kernels.h): work units of fewer than
kPanelRows = 8 rows, where the shrink reads A in 16-element pairs (pair_rows / dot_pairs: row
blocks of 1, 2, 3 and 4 rows, 8 / 4 / 2 / 2 A rows per block, rank tails, a scalar K % 16 tail)
and the expand of bf16 rank-major B runs expand_chunk_pairs (chunks of 16 * V columns, then the
older 8-column chunks and the tail); fp16 weights go through F16C where the ISA has it.

One batch holds segments of 1..7 rows (blocks 1, 2, 3, 4, 4+1, 4+2, 4+3), of 9 rows (a panel
unit) and of 37 rows (a 32-row unit and a 5-row one), and rows without adapter; eleven slices
of widths 1..130 (every chunk boundary of the expand) with per-slice or per-slot ranks (0 and
ranks not multiples of 4 or 8 included) or none; K from 1 to 250 (around every 16-element
block). Every activation / weight pair the backend runs, ops add_lora, lora_shrink and
lora_expand, on every instruction set the CPU runs (forced in turn, restored after), B in the
usual [S, N, R] layout, the pool's rank-major view and a rank-major view with padded rows.

Checks: against the independent float64 loops of lora_reference.py (per-dtype tolerances of
lora_reference.TOL: the output's dtype; the weights reach the sums exactly, so fp32 outputs of
16-bit weights get fp32's); rows without adapter keep their bits (their x rows are NaN: never
read); x beyond K, A beyond K (padded rows), B beyond each rank and beyond each row (padded
rank-major rows), h beyond each rank hold NaN (never read); y beyond its last column keeps its
bits (never written); the rank-major layouts give the same bits as each other everywhere and as
the usual layout for units of 4 rows or more (the same arithmetic in the same order;
sgmv_cpu.h). fp16 weights: the bits of the same call with the weights converted to fp32
beforehand (exact), subnormals, 60000, 65504 and -0 among them; and sums built to be exact in
fp32 (fp16 subnormals, normals and large integers times small integers) equal the float64
reference exactly, so a conversion off by anything at all fails.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import openlora_kernels as olk
from openlora_kernels.ops import cpu_ext

from lora_reference import TOL, make_problem, reference_delta, reference_shrink
from test_cpu_layouts import A_LAYOUTS, B_LAYOUTS, bits

needs_ext = pytest.mark.skipif(not olk.available_backends("cpu")["cpu"].usable,
                               reason=olk.available_backends("cpu")["cpu"].reason)
pytestmark = needs_ext

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
NAN = float("nan")
# (activations, weights): same dtype, and fp32 activations over 16-bit storage (cpu_ext.MIXED_STORAGE)
PAIRS = [(F32, F32), (F16, F16), (BF16, BF16), (F32, BF16), (F32, F16)]
PAIR_IDS = ["f32", "f16", "bf16", "f32x-bf16w", "f32x-f16w"]
WIDTHS = [1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 130]     # one slice each
COUNTS = (1, 2, 3, 4, 5, 6, 7, 9, 37)                     # rows of each slot's segment
RANK_CHOICES = (0, 1, 3, 5, 13, 16, 17)
N_NONE = 4                                                # rows without adapter


def rank_major_padded(B, extra=5):
    """The pool's rank-major B with its rows further apart than N (NaN between: never read)."""
    S, N, R = B.shape
    buf = torch.full((S, R, N + extra), NAN, dtype=B.dtype)
    buf[..., :N] = B.transpose(1, 2)
    return buf[..., :N].transpose(1, 2)


LAYOUTS = {"standard": B_LAYOUTS["standard"], "rank_major": B_LAYOUTS["rank_major"],
           "rank_major_padded": rank_major_padded}


@pytest.fixture
def each_isa():
    """A function iterating over the instruction sets the CPU runs, each forced in turn; the
    level in use before is restored whatever happens."""
    before = cpu_ext.isa()

    def levels():
        for level in cpu_ext._module().isas():
            assert cpu_ext.set_isa("base" if level == "baseline" else level) == level
            yield level

    try:
        yield levels
    finally:
        cpu_ext.set_isa("base" if before == "baseline" else before)
    assert cpu_ext.isa() == before


# ------------------------------------------------------------------------------ problems

def slot_ranks(R, S, n, kind):
    """None (R everywhere); "per_slot" [S] int32; "per_slice" [n, S] int64: cycling through R, 0
    and the RANK_CHOICES below R, so that every segment length meets several ranks."""
    if kind is None:
        return None
    choices = [R] + [r for r in RANK_CHOICES if r < R]
    if kind == "per_slot":
        return torch.tensor([choices[s % len(choices)] for s in range(S)], dtype=torch.int32)
    return torch.tensor([[choices[(s + i) % len(choices)] for s in range(S)] for i in range(n)], dtype=torch.int64)


def rank_of(p, i, s):
    if p.ranks is None:
        return p.a[0].shape[1]
    return int(p.ranks[i, s] if p.ranks.dim() == 2 else p.ranks[s])


def decode_problem(K, R, act, w, ranks_kind, seed, counts=COUNTS, widths=WIDTHS):
    """make_problem with segments of exactly ``counts`` rows (slot s: counts[s] rows) and N_NONE
    rows without adapter, shuffled; weights stored in ``w`` (NaN beyond each rank), x [T, K] a
    view with NaN beyond K and on the rows without adapter, y NaN on those rows."""
    g = torch.Generator().manual_seed(seed)
    S = len(counts)
    idx = torch.cat([torch.full((c,), s, dtype=torch.int64) for s, c in enumerate(counts)]
                    + [torch.full((N_NONE,), -1, dtype=torch.int64)])
    idx = idx[torch.randperm(idx.numel(), generator=g)]
    T = idx.numel()
    p = make_problem(T, K, widths, S, R, dtype=act, indices=idx, ranks=slot_ranks(R, S, len(widths), ranks_kind),
                     seed=seed)
    if w is not act:
        p.a = [A.to(w) for A in p.a]
        p.b = [B.to(w) for B in p.b]
    none = idx < 0
    xb = torch.full((T, K + 7), NAN, dtype=act)
    xb[:, :K] = p.x
    xb[none] = NAN
    p.x = xb[:, :K]
    p.y[none] = NAN
    return p


def y_buffer(p, g):
    """[T, N + 9] of p.y's dtype: p.y, then random columns that must keep their bits."""
    T, N = p.y.shape
    buf = (torch.randn(T, N + 9, generator=g, dtype=torch.float64) * 100).to(p.y.dtype)
    buf[:, :N] = p.y
    return buf


def random_h(p, g, values=None):
    """An [n, T, R] fp32 h for lora_expand: random (or drawn from ``values``), NaN beyond each
    (slice, slot)'s rank and on the rows without adapter (never read)."""
    n, T, R = len(p.b), p.x.shape[0], p.b[0].shape[2]
    if values is None:
        h = torch.randn(n, T, R, generator=g)
    else:
        h = values[torch.randint(0, len(values), (n, T, R), generator=g)].float()
    for i in range(n):
        for t in range(T):
            s = int(p.indices[t])
            h[i, t, rank_of(p, i, s) if s >= 0 else 0:] = NAN
    return h


def reference_expand(p, h):
    """[T, N] float64 y + scalings[s] * h[i, t, :r] @ B_i[s, :, :r].T, by a loop over rows
    (from lora_expand's contract)."""
    out = p.y.double().clone()
    sc = p.scalings.double()
    col = 0
    for i, B in enumerate(p.b):
        B = B.double()
        w = B.shape[1]
        for t in range(p.y.shape[0]):
            s = int(p.indices[t])
            if s < 0:
                continue
            r = rank_of(p, i, s)
            if r:
                out[t, col:col + w] += sc[s] * (B[s, :, :r] @ h[i, t, :r].double())
        col += w
    return out


# -------------------------------------------------------------------------------- checks

def where_y(p, t, c):
    s, col = int(p.indices[t]), 0
    for i, w in enumerate(p.widths):
        if c < col + w:
            break
        col += w
    return (f"row {t} (slot {s}: a segment of {COUNTS[s] if s < len(COUNTS) else '?'} rows), slice {i} "
            f"(width {w}) column {c - col}, rank {rank_of(p, i, s)}")


def where_h(p, i, t, j):
    s = int(p.indices[t])
    rows = COUNTS[s] if 0 <= s < len(COUNTS) else "no adapter"
    r = rank_of(p, i, s) if s >= 0 else 0
    return f"slice {i} (width {p.widths[i]}), row {t} (slot {s}: {rows} rows), rank index {j} of {r}"


def check_y(buf, y0, ref, p, tol_dtype, what, exact=False):
    """buf: the op's [T, N + 9] buffer (y0 before): columns beyond N and rows without adapter
    keep their bits; the others are ``ref`` within TOL[tol_dtype] (``exact``: equal to ref
    rounded once to y's dtype)."""
    N = p.y.shape[1]
    none = p.indices < 0
    assert torch.equal(bits(buf[:, N:]), bits(y0[:, N:])), f"{what}: y written beyond its last column"
    assert torch.equal(bits(buf[none]), bits(y0[none])), f"{what}: a row without adapter was written"
    got = buf[:, :N].double()
    if exact:
        ok = got == ref.to(buf.dtype).double()
        msg = "exact"
    else:
        tol = TOL[tol_dtype]
        ok = (got - ref).abs() <= tol["atol"] + tol["rtol"] * ref.abs()
        msg = f"atol={tol['atol']}, rtol={tol['rtol']}"
    ok |= none[:, None]
    if not bool(ok.all()):
        bad = (~ok).nonzero()
        t, c = bad[0].tolist()
        raise AssertionError(f"{what}: {bad.shape[0]} of {ok.numel()} elements off ({msg}); first: {where_y(p, t, c)}: "
                             f"got {got[t, c].item():.8g}, want {ref[t, c].item():.8g}")


def check_h(h, ref, p, what, exact=False):
    """lora_shrink's fp32 h: ``ref`` within fp32's tolerance (``exact``: equal), and exactly 0 on
    rows without adapter and beyond each rank (ref holds 0 there)."""
    assert h.dtype == F32 and h.shape == ref.shape
    got = h.double()
    zero = torch.zeros(ref.shape, dtype=torch.bool)      # beyond each rank, rows without adapter
    for i in range(ref.shape[0]):
        for t in range(ref.shape[1]):
            s = int(p.indices[t])
            zero[i, t, rank_of(p, i, s) if s >= 0 else 0:] = True
    if exact:
        ok = got == ref
        msg = "exact"
    else:
        tol = TOL[F32]
        ok = (got - ref).abs() <= tol["atol"] + tol["rtol"] * ref.abs()
        msg = f"atol={tol['atol']}, rtol={tol['rtol']}"
    ok &= ~zero | (got == 0)
    if not bool(ok.all()):
        bad = (~ok).nonzero()
        i, t, j = bad[0].tolist()
        raise AssertionError(f"{what}: {bad.shape[0]} of {ok.numel()} elements off ({msg}; 0 beyond ranks and on "
                             f"rows without adapter); first: {where_h(p, i, t, j)}: got {got[i, t, j].item():.8g}, "
                             f"want {ref[i, t, j].item():.8g}")


def assert_same_bits(a, b, rows, what, p):
    """a, b: [T, N + 9] buffers; their ``rows`` equal bit for bit."""
    N = p.y.shape[1]
    same = bits(a[:, :N]) == bits(b[:, :N])
    bad = (~same) & rows[:, None]
    if bool(bad.any()):
        t, c = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} elements differ in their bits; first: {where_y(p, t, c)}: "
                             f"{a[t, c].item():.9g} vs {b[t, c].item():.9g}")


# ------------------------------------------------------------------ the decode paths, all pairs

# (K, R, ranks, A layout): K around the 16-element blocks (1 .. 250 = 15 * 16 + 10), ranks below,
# at and above the blocks' 2 / 4 / 8 A rows; padded A holds NaN beyond K.
CASES = [
    (1, 17, "per_slice", "standard"),
    (7, 1, None, "padded"),
    (15, 3, "per_slice", "standard"),
    (16, 5, None, "padded"),
    (17, 13, "per_slice", "padded"),
    (31, 16, None, "standard"),
    (32, 17, "per_slot", "padded"),
    (33, 13, None, "standard"),
    (250, 17, "per_slice", "padded"),
    (250, 16, "per_slot", "standard"),
]


@pytest.mark.parametrize("act,w", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("K,R,ranks_kind,a_layout", CASES)
def test_decode_units_match_the_reference_and_the_layouts(each_isa, act, w, K, R, ranks_kind, a_layout):
    """add_lora, lora_shrink and lora_expand (an independent h) on every ISA and B layout: the
    float64 reference within the output dtype's tolerance; rank-major layouts the same bits
    everywhere; the usual layout the rank-major bits on segments of 4 rows or more."""
    seed = K * 1000 + R * 10 + PAIRS.index((act, w))
    p = decode_problem(K, R, act, w, ranks_kind, seed)
    p.a = [A_LAYOUTS[a_layout](A) for A in p.a]
    g = torch.Generator().manual_seed(seed + 1)
    S, N = len(COUNTS), p.y.shape[1]
    meta = olk.build_batch_meta(p.indices, S)
    ref_add = p.y.double() + reference_delta(p)
    ref_h = reference_shrink(p)
    h_in = random_h(p, g)
    ref_exp = reference_expand(p, h_in)
    y0 = y_buffer(p, g)
    counts = torch.tensor(COUNTS)
    long_rows = (p.indices >= 0) & (counts[p.indices.clamp(min=0)] >= 4)
    all_rows = p.indices >= 0
    name = f"x {act}, weights {w}, K={K}, R={R}, ranks {ranks_kind}, A {a_layout}"
    for level in each_isa():
        h = olk.lora_shrink(p.x, p.a, meta, p.ranks, backend="cpu")
        check_h(h, ref_h, p, f"{level} lora_shrink ({name})")
        outs = {}
        for layout, make in LAYOUTS.items():
            b = [make(B) for B in p.b]
            what = f"{level} B {layout} ({name})"
            y_add = y0.clone()
            olk.add_lora(y_add[:, :N], p.x, p.a, b, meta, p.scalings, p.ranks, backend="cpu")
            check_y(y_add, y0, ref_add, p, act, f"add_lora {what}")
            y_exp = y0.clone()
            olk.lora_expand(y_exp[:, :N], h_in, b, meta, p.scalings, p.ranks, backend="cpu")
            check_y(y_exp, y0, ref_exp, p, act, f"lora_expand {what}")
            outs[layout] = (y_add, y_exp)
        for k, op in enumerate(("add_lora", "lora_expand")):
            assert_same_bits(outs["rank_major"][k], outs["rank_major_padded"][k], all_rows,
                             f"{level} {op}: rank-major vs padded rank-major B ({name})", p)
            assert_same_bits(outs["standard"][k], outs["rank_major"][k], long_rows,
                             f"{level} {op}: usual vs rank-major B, segments of >= 4 rows ({name})", p)


# --------------------------------------------------------------------------- fp16 weights

F16_SPECIALS = [0x0001, 0x8001, 0x03FF, 0x83FF, 0x0200, 0x0400, 0x8400,   # subnormals, the smallest normals
                0x7B53, 0xFB53, 0x7BFF, 0xFBFF,                             # +-60000, +-65504
                0x8000, 0x0000, 0x3C00, 0xBC00]                             # -0, 0, +-1


def f16_of_bits(b):
    return torch.from_numpy(np.asarray(b, dtype=np.int64).astype(np.uint16).view(np.float16).copy())


def sprinkle_f16_specials(W, g, frac=0.08):
    """W (fp16) with a fraction of its finite entries replaced by F16_SPECIALS."""
    W = W.clone()
    pick = (torch.rand(W.shape, generator=g) < frac) & ~torch.isnan(W)
    vals = f16_of_bits(F16_SPECIALS)[torch.randint(0, len(F16_SPECIALS), (int(pick.sum()),), generator=g)]
    W[pick] = vals
    return W


@pytest.mark.parametrize("K,R,ranks_kind", [(17, 13, "per_slice"), (250, 16, None), (33, 5, "per_slot")])
def test_fp16_weights_give_the_bits_of_their_fp32_conversion(each_isa, K, R, ranks_kind):
    """fp32 activations: fp16 weights (F16C where the ISA has it, else the integer conversion)
    must give the bits of the same call with the weights converted to fp32 beforehand (exact):
    the same kernels, the same values. Subnormals, the smallest normals, +-60000, +-65504 and -0
    among the weights; every op, B layout and segment length."""
    p = decode_problem(K, R, F32, F16, ranks_kind, seed=K + R)
    g = torch.Generator().manual_seed(K * R)
    p.a = [sprinkle_f16_specials(A, g) for A in p.a]
    p.b = [sprinkle_f16_specials(B, g) for B in p.b]
    a32 = [A.float() for A in p.a]
    S, N = len(COUNTS), p.y.shape[1]
    meta = olk.build_batch_meta(p.indices, S)
    h_in = random_h(p, g)
    y0 = y_buffer(p, g)
    every = torch.ones(p.indices.shape, dtype=torch.bool)
    for level in each_isa():
        h16 = olk.lora_shrink(p.x, p.a, meta, p.ranks, backend="cpu")
        h32 = olk.lora_shrink(p.x, a32, meta, p.ranks, backend="cpu")
        assert torch.isfinite(h16).all(), f"{level} lora_shrink: non-finite h from finite fp16 weights"
        assert torch.equal(bits(h16), bits(h32)), f"{level} lora_shrink: fp16 A differs from its fp32 conversion"
        for layout, make in LAYOUTS.items():
            b16 = [make(B) for B in p.b]
            b32 = [make(B.float()) for B in p.b]
            for op in ("add_lora", "lora_expand"):
                y16, y32 = y0.clone(), y0.clone()
                if op == "add_lora":
                    olk.add_lora(y16[:, :N], p.x, p.a, b16, meta, p.scalings, p.ranks, backend="cpu")
                    olk.add_lora(y32[:, :N], p.x, a32, b32, meta, p.scalings, p.ranks, backend="cpu")
                else:
                    olk.lora_expand(y16[:, :N], h_in, b16, meta, p.scalings, p.ranks, backend="cpu")
                    olk.lora_expand(y32[:, :N], h_in, b32, meta, p.scalings, p.ranks, backend="cpu")
                assert torch.isfinite(y16[p.indices >= 0]).all(), f"{level} {op} B {layout}: non-finite y"
                assert_same_bits(y16, y32, every, f"{level} {op} B {layout}: fp16 weights vs their fp32 conversion "
                                 f"(K={K}, R={R})", p)


# fp16 value classes whose sums with small-integer coefficients are exact in fp32 (K <= 250, rank
# <= 17): subnormals (k * 2^-24, |k| < 2^10), normals in [1/4, 4) (multiples of 2^-12), integers
# in [2^10, 65504]; each with random signs and -0.
F16_CLASSES = {"subnormal": (0x0001, 0x0400), "normal": (13 << 10, 17 << 10), "large": (25 << 10, 0x7C00)}


def f16_class(shape, cls, g):
    lo, hi = F16_CLASSES[cls]
    mag = torch.randint(lo, hi, shape, generator=g)
    if cls == "large":   # 60000 and 65504 among them
        mag[torch.rand(shape, generator=g) < 0.1] = 0x7B53
        mag[torch.rand(shape, generator=g) < 0.05] = 0x7BFF
    b = mag | (torch.randint(0, 2, shape, generator=g) << 15)
    b[torch.rand(shape, generator=g) < 0.05] = 0x8000
    return f16_of_bits(b.numpy())


@pytest.mark.parametrize("act", [F32, F16], ids=["f32x", "f16x"])
@pytest.mark.parametrize("K", [17, 250])
def test_fp16_weight_values_reach_the_sums_exactly(each_isa, act, K):
    """Sums built to be exact in fp32: x and h in {-1, 0, 1}, each A row (shrink) or B column
    (expand) of one fp16 class (subnormals, normals, integers up to 65504; -0 among them),
    power-of-two scalings, y = 0. lora_shrink's h must equal the float64 reference exactly and
    lora_expand's y must equal it rounded once to y's dtype, on every ISA, B layout and segment
    length: any conversion error shows."""
    R, classes = 17, list(F16_CLASSES)
    p = decode_problem(K, R, act, F16, "per_slice", seed=K + 7)
    g = torch.Generator().manual_seed(K * 3 + (act is F16))
    T, S, N = p.x.shape[0], len(COUNTS), p.y.shape[1]
    none = p.indices < 0
    coef = torch.tensor([-1.0, 0.0, 1.0])
    x = coef[torch.randint(0, 3, (T, K), generator=g)].to(act)
    x[none] = NAN
    p.x = x
    for i in range(len(WIDTHS)):
        A, B = p.a[i], p.b[i]
        for s in range(S):
            r = rank_of(p, i, s)
            for j in range(R):
                A[s, j] = f16_class((K,), classes[(j + s + i) % 3], g) if j < r else NAN
            for c in range(B.shape[1]):
                B[s, c] = f16_class((R,), classes[(c + s + i) % 3], g)
            B[s, :, r:] = NAN
    # |y| <= 17 * 65504 * scale: within fp16's range for scale <= 2^-5
    scales = [1.0, -2.0, 0.5, 4.0, -0.25] if act is F32 else [2.0 ** -5, -(2.0 ** -6), 2.0 ** -7]
    p.scalings = torch.tensor([scales[s % len(scales)] for s in range(S)], dtype=F32)
    p.y = torch.zeros(T, N, dtype=act)
    p.y[none] = NAN
    meta = olk.build_batch_meta(p.indices, S)
    ref_h = reference_shrink(p)
    h_in = random_h(p, g, values=coef)
    ref_exp = reference_expand(p, h_in)
    y0 = y_buffer(p, g)
    for level in each_isa():
        h = olk.lora_shrink(p.x, p.a, meta, p.ranks, backend="cpu")
        check_h(h, ref_h, p, f"{level} lora_shrink, {act} x, fp16 A, K={K}", exact=True)
        for layout, make in LAYOUTS.items():
            y = y0.clone()
            olk.lora_expand(y[:, :N], h_in, [make(B) for B in p.b], meta, p.scalings, p.ranks, backend="cpu")
            check_y(y, y0, ref_exp, p, act, f"{level} lora_expand, {act} y, fp16 B {layout}", exact=True)
