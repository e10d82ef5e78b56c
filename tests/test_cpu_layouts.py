"""The native CPU backend on every weight layout and batch shape it serves natively (csrc/cpu/):
the usual [S, N, R] B, the pool's rank-major B, per-slice buffers of unequal widths, padded and
fully strided B, K-major and strided A, strided x and y, decode- and prefill-like metadata
(segments longer than one work unit), odd sizes, rows without adapter, mixed and per-slice
ranks, every instruction set the machine runs, and the metadata build against the torch ops.

Each result is compared with the independent float64 loop of lora_reference.py; rows without
adapter must keep y's bits (their x rows hold NaN: never read), weights beyond each slot's rank
hold NaN (never read)."""
import pytest
import torch

import openlora_kernels as olk
from openlora_kernels.metadata import BLOCK_M_CHOICES, _build_impl, _build_native, _native_builder
from openlora_kernels.ops import cpu_ext

from lora_reference import TOL, make_problem, reference_delta, reference_shrink

pytestmark = pytest.mark.skipif(not olk.available_backends("cpu")["cpu"].usable,
                                reason=olk.available_backends("cpu")["cpu"].reason)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bits(t):
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


# ------------------------------------------------------------------------------ layouts

def rank_major(W):
    """[S, N, R] view of [S, R, N] storage (the pool's B; for A: K-major)."""
    return W.transpose(1, 2).contiguous().transpose(1, 2)


def padded(W, extra=3):
    """W inside a larger last dimension (NaN beyond): rows further apart than the rank."""
    buf = torch.full((*W.shape[:2], W.shape[2] + extra), float("nan"), dtype=W.dtype)
    buf[..., :W.shape[2]] = W
    return buf[..., :W.shape[2]]


def strided(W):
    """Every element two apart: neither dimension contiguous (the generic path)."""
    buf = torch.full((*W.shape, 2), float("nan"), dtype=W.dtype)
    buf[..., 0] = W
    return buf[..., 0]


B_LAYOUTS = {"standard": lambda B: B, "rank_major": rank_major, "padded": padded, "strided": strided}
A_LAYOUTS = {"standard": lambda A: A, "k_major": rank_major, "padded": padded, "strided": strided}


def problem(T, K, widths, S, R, dtype, ranks, seed, per_slot=None, none_rows=True):
    """A problem whose rows come in long runs per slot (per_slot rows each) or at random, with -1
    rows whose x is NaN, and y holding random values (the -1 rows must keep their bits)."""
    g = torch.Generator().manual_seed(seed)
    if per_slot:
        idx = (torch.arange(T) // per_slot) % S
        idx = idx[torch.randperm(T, generator=g)] if per_slot == 1 else idx
    else:
        idx = torch.randint(0, S, (T,), generator=g)
    if none_rows:
        idx[torch.rand(T, generator=g) < 0.2] = -1
    p = make_problem(T, K, widths, S, R, dtype=dtype, indices=idx, ranks=ranks, seed=seed)
    p.x[idx < 0] = float("nan")
    return p


def check_add(p, y, dtype):
    ref = p.y.double() + reference_delta(p)
    none = p.indices < 0
    assert torch.equal(bits(y[none]), bits(p.y[none])), "rows without adapter were written"
    torch.testing.assert_close(y[~none].double(), ref[~none], **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b_layout", list(B_LAYOUTS))
@pytest.mark.parametrize("a_layout", ["standard", "k_major", "strided"])
@pytest.mark.parametrize("block_m", [1, 16, 64])
def test_every_layout_is_served_natively_and_right(dtype, b_layout, a_layout, block_m):
    """add_lora on three slices of unequal widths (hitting full chunks, one-vector chunks, tails
    and several panels), mixed per-slice ranks (0 and R included), decode and prefill metadata."""
    p = problem(70, 37, [300, 24, 7], 4, 11, dtype, "per_slice", seed=block_m, per_slot=None if block_m == 1 else 40)
    p.a = [A_LAYOUTS[a_layout](A) for A in p.a]
    p.b = [B_LAYOUTS[b_layout](B) for B in p.b]
    meta = olk.build_batch_meta(p.indices, 4, block_m=block_m)
    y = p.y.clone()
    olk.add_lora(y, p.x, p.a, p.b, meta, p.scalings, p.ranks, backend="cpu")
    check_add(p, y, dtype)
    h = olk.lora_shrink(p.x, p.a, meta, p.ranks, backend="cpu")
    torch.testing.assert_close(h.double(), reference_shrink(p), **TOL[torch.float32])
    y2 = p.y.clone()
    olk.lora_expand(y2, h, p.b, meta, p.scalings, p.ranks, backend="cpu")
    check_add(p, y2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_b_layouts_give_the_same_bits(dtype):
    """Runs of more than 3 rows read the usual layout through fp32 panels and the rank-major one
    directly: the same arithmetic in the same order, so the same bits (decode and prefill
    metadata, mixed ranks). Shorter runs of the usual layout sum each column's products across
    vector lanes (another order): the reference's values, not the same bits."""
    p = problem(90, 48, [520, 40], 3, 16, dtype, "mixed", seed=5, per_slot=45)
    for bm in (1, 32):
        meta = olk.build_batch_meta(p.indices, 3, block_m=bm)
        outs = []
        for make in B_LAYOUTS.values():
            y = p.y.clone()
            olk.add_lora(y, p.x, p.a, [make(B) for B in p.b], meta, p.scalings, p.ranks, backend="cpu")
            outs.append(bits(y))
        assert all(torch.equal(o, outs[0]) for o in outs[1:])
    for per_slot in (1, 2, 3):          # the short runs: every layout right
        p = problem(24, 48, [97, 40], 8, 37, dtype, "mixed", seed=per_slot, per_slot=per_slot)
        meta = olk.build_batch_meta(p.indices, 8, block_m=1)
        for make in B_LAYOUTS.values():
            y = p.y.clone()
            olk.add_lora(y, p.x, p.a, [make(B) for B in p.b], meta, p.scalings, p.ranks, backend="cpu")
            check_add(p, y, dtype)


def test_weights_are_used_in_place():
    """The plan points into the given tensors, whatever their layout: per-slice rank-major views
    of unequal widths (the pool's fused QKV) are not copied (they used to be, on every call)."""
    p = make_problem(8, 32, [64, 16, 16], 3, 8)
    b_list = [rank_major(B) for B in p.b]
    mod = cpu_ext._module()
    plan, (a_kept, b_kept, _, _, _) = cpu_ext._plan(mod.OP_ADD, torch.float32, 32, 8, 3, p.a, b_list, p.scalings)
    assert all(k is t for k, t in zip(a_kept, p.a)) and all(k is t for k, t in zip(b_kept, b_list))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,widths,S,R,per_slot", [
    (1, 1, [1], 1, 1, None),           # the smallest
    (5, 3, [2, 9], 2, 3, None),        # below one vector everywhere
    (33, 9, [17], 1, 13, 33),          # one segment just over a work unit, rank not a multiple of 8
    (130, 64, [256, 264], 2, 8, 65),   # several units per segment, an exact panel and one more column
    (64, 16, [8], 64, 2, 1),           # one row per slot (decode), many slots
])
def test_odd_shapes_and_long_segments(dtype, T, K, widths, S, R, per_slot):
    p = problem(T, K, widths, S, R, dtype, "mixed" if S > 1 else None, seed=T, per_slot=per_slot)
    for bm in sorted({1, olk.choose_block_m(T, S), 64}):
        meta = olk.build_batch_meta(p.indices, S, block_m=bm)
        for layout in ("standard", "rank_major"):
            b = [B_LAYOUTS[layout](B) for B in p.b]
            y = p.y.clone()
            olk.add_lora(y, p.x, p.a if len(widths) > 1 else p.a[0], b if len(widths) > 1 else b[0], meta,
                         p.scalings, p.ranks, backend="cpu")
            check_add(p, y, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_x_and_y(dtype):
    """x strided along K (the shrink's fp32-copy path) and y strided along N (column stride)."""
    p = problem(40, 24, [30, 12], 3, 8, dtype, "mixed", seed=3, per_slot=20)
    meta = olk.build_batch_meta(p.indices, 3, block_m=16)
    x_t = torch.full((24, 40), float("nan"), dtype=dtype)
    x_t.copy_(p.x.t())
    y_t = p.y.t().contiguous()
    y = y_t.t()                                   # [T, N] with column stride T
    assert x_t.t().stride(1) != 1 and y.stride(1) != 1
    olk.add_lora(y, x_t.t(), p.a, p.b, meta, p.scalings, p.ranks, backend="cpu")
    check_add(p, y, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_split_over_threads_equals_serial(dtype):
    """Long segments are cut into units of 32 rows (multiples of the 4-row blocks): any number of
    threads gives the serial bits, on both B layouts."""
    if not cpu_ext.threading_info()["available"]:
        pytest.skip("no OpenMP runtime in this process")
    before = cpu_ext.threading_info()
    p = problem(200, 64, [96, 33], 2, 16, dtype, "per_slice", seed=9, per_slot=100)
    meta = olk.build_batch_meta(p.indices, 2, block_m=64)
    try:
        outs = []
        for threads in (1, 2, 3, 7):
            cpu_ext.set_threading(min_elements=0, max_threads=threads)
            for layout in ("standard", "rank_major"):
                y = p.y.clone()
                olk.add_lora(y, p.x, p.a, [B_LAYOUTS[layout](B) for B in p.b], meta, p.scalings, p.ranks,
                             backend="cpu")
                outs.append(bits(y))
    finally:
        cpu_ext.set_threading(before["min_elements"], before["max_threads"])
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    check_add(p, y, dtype)


def test_every_instruction_set_here_is_right():
    """Each level the CPU runs (x86-64-v4 / v3 / baseline), forced in turn, matches the reference;
    set_isa names what it chose and refuses unknown names."""
    mod = cpu_ext._module()
    before = mod.isa()
    levels = mod.isas()
    assert levels[-1] == "baseline" and before in levels
    try:
        for level in levels:
            assert cpu_ext.set_isa("base" if level == "baseline" else level) == level
            for dtype in DTYPES:
                p = problem(50, 40, [72, 9], 3, 12, dtype, "mixed", seed=11, per_slot=25)
                for bm in (1, 32):
                    for layout in ("standard", "rank_major"):
                        y = p.y.clone()
                        olk.add_lora(y, p.x, p.a, [B_LAYOUTS[layout](B) for B in p.b],
                                     olk.build_batch_meta(p.indices, 3, block_m=bm), p.scalings, p.ranks,
                                     backend="cpu")
                        check_add(p, y, dtype)
        with pytest.raises(ValueError, match="unknown instruction set"):
            cpu_ext.set_isa("pentium")
    finally:
        cpu_ext.set_isa(before if before != "baseline" else "base")
    assert mod.isa() == before


def test_bound_lora_add_rows_serves_prefill_batches():
    """A patched layer's fast path (BoundLoRA.add_rows with row_args) takes prefill-like
    metadata too, with the bits of the checked call."""
    p = problem(96, 40, [48], 3, 8, torch.float32, "mixed", seed=2, per_slot=32)
    p.b = [rank_major(B) for B in p.b]
    op = olk.BoundLoRA(p.a[0], p.b[0], p.scalings, p.ranks, backend="cpu")
    meta = olk.build_batch_meta(p.indices, 3)
    assert meta.block_m >= 16
    rows = cpu_ext.row_args(meta)
    assert rows is not None
    want = p.y.clone()
    op(want, p.x, meta)
    y = p.y.clone()
    assert op.add_rows(y, p.x, rows) is True
    assert torch.equal(y, want)
    check_add(p, y, torch.float32)


# ----------------------------------------------------------------------- batch metadata


@pytest.mark.skipif(_native_builder() is None, reason="the native extension has no build_meta")
@pytest.mark.parametrize("T,S", [(0, 0), (0, 3), (5, 0), (1, 1), (7, 3), (64, 64), (300, 5), (513, 40)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_native_metadata_equals_the_torch_build(T, S, dtype):
    """The C++ counting sort gives the torch ops' four tensors exactly, for every block_m, random
    and sorted indices, -1 rows, and a non-contiguous index tensor."""
    g = torch.Generator().manual_seed(T * 31 + S)
    for trial in range(3):
        idx = torch.randint(-1, max(S, 0), (T,), generator=g) if S else torch.full((T,), -1)
        if trial == 1:
            idx = idx.sort().values
        idx = idx.to(dtype)
        if trial == 2:
            idx = torch.stack([idx, torch.zeros_like(idx)], 1)[:, 0]      # stride 2
        for bm in BLOCK_M_CHOICES:
            want = _build_impl(idx, S, bm)
            got = _build_native(_native_builder(), idx, S, bm)
            for w, o in zip(want, got):
                assert w.dtype == o.dtype == torch.int32 and w.shape == o.shape and torch.equal(w, o)
            meta = olk.build_batch_meta(idx, S, block_m=bm)
            assert all(torch.equal(w, o) for w, o in zip(want, meta.tensors()))


@pytest.mark.skipif(_native_builder() is None, reason="the native extension has no build_meta")
def test_native_metadata_rejects_out_of_range_like_the_check():
    for bad, pos in (([0, 1, 3, -2], 2), ([-2, 0], 0), ([1, 0, -1, 5], 3)):
        idx = torch.tensor(bad)
        with pytest.raises(IndexError, match=rf"indices: value {bad[pos]} at position {pos} is out of range for 3"):
            olk.build_batch_meta(idx, 3)
