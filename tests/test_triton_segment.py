"""The Triton backend's segment plan for decode-like batches (ops/triton_segment.py) against the
float64 reference: every case of test_ops_parity, every dtype, both B layouts, K splits and column
chunks, an h buffer poisoned with NaN, hostile metadata, the route's choice, and the bytes model's
geometry. On a CPU-only machine the kernels run under Triton's interpreter."""
import pytest
import torch

import openlora_kernels as olk
from openlora_kernels.ops import triton_segment as seg
from openlora_kernels.ops.configs import kernel_config, override_config

from lora_reference import assert_close, make_problem, reference_delta
from test_ops_parity import CASES, DTYPES, check_add, problem, run_add, usable


@pytest.fixture
def segment_route():
    with override_config("route", FUSED=True, DECODE="segment"):
        yield


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_segment_cases(case, dtype, device, segment_route):
    """add_lora with the route forced to the segment plan, on test_ops_parity's odd shapes."""
    usable("triton", device)
    p = problem(case, dtype, device)
    check_add(p, run_add(p, "triton"), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_segment_geometry(dtype, block_m, device, segment_route):
    """K splits (atomics into a zero-filled h), several column chunks per slice, segments longer
    than BLOCK_M (the row loop), mixed ranks per slice; the metadata's block_m is irrelevant."""
    usable("triton", device)
    idx = torch.cat([torch.full((37,), 1), torch.randint(-1, 4, (20,))])[torch.randperm(57)]
    p = make_problem(57, 150, [70, 33, 9], 4, 16, dtype=dtype, device=device, ranks="per_slice", indices=idx)
    meta = olk.build_batch_meta(p.indices, 4, block_m=block_m)
    cfg = kernel_config("segment", block_m=block_m, K=150, N=112, R=16, n_slices=3, dtype=dtype, device=p.x.device)
    geo = seg.plan_shape(57, 150, cfg)
    assert geo["splits"] > 1 and geo["BLOCK_M"] < 37, geo          # the interpreter's pinned config
    check_add(p, run_add(p, "triton", meta), dtype)


@pytest.mark.parametrize("layout", ["standard", "pool"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_segment_b_layouts(layout, dtype, device, segment_route):
    """B as [S, N, R] and as the pool's rank-major [S, R, N] storage seen as [S, N, R]; widths and
    columns multiples of 8 so the 16-byte (VEC) paths are taken."""
    usable("triton", device)
    p = make_problem(19, 64, [64, 32, 32], 5, 16, dtype=dtype, device=device, ranks="mixed")
    if layout == "pool":
        p.b = [b.transpose(1, 2).contiguous().transpose(1, 2) for b in p.b]
        assert p.b[0].stride(1) == 1
    check_add(p, run_add(p, "triton"), dtype)


def test_segment_h_is_written_before_read(device):
    """With one K split h is not zero-filled: poison it with NaN; the result must not see it."""
    usable("triton", device)
    p = make_problem(11, 24, [40, 8], 4, 8, device=device, ranks="per_slice")
    meta = olk.build_batch_meta(p.indices, 4)
    cfg = kernel_config("segment", block_m=1, K=24, N=48, R=8, n_slices=2, dtype=p.x.dtype, device=p.x.device)
    assert seg.plan_shape(11, 24, cfg)["splits"] == 1
    y = p.y.clone()
    h = torch.full((2, 11, 8), float("nan"), dtype=torch.float32, device=p.x.device)
    _, launches = seg.segment_launches(y, p.x, p.a, p.b, p.scalings, p.ranks, meta, h=h)
    for kernel, grid, args, kwargs in launches:
        kernel[grid](*args, **kwargs)
    check_add(p, y, torch.float32)


def test_segment_hostile_metadata(device):
    """seg_info pointing past T, negative lengths, sorted_tokens holding out-of-range rows: nothing
    outside [0, T) is touched and rows of valid segments are still correct."""
    usable("triton", device)
    S = 4
    p = make_problem(10, 24, [16], S, 8, device=device, indices=torch.tensor([0, 0, 1, 1, 1, -1, 2, 2, 3, -1]))
    meta = olk.build_batch_meta(p.indices, S)
    bad = meta.seg_info.clone()
    bad[0, 3], bad[1, 3] = 1000, 5           # slot 3: starts past T
    bad[1, 2] = -7                           # slot 2: negative length
    sorted_bad = meta.sorted_tokens.clone()
    start2 = int(meta.seg_info[0, 2])
    sorted_bad[start2:start2 + 2] = 10**6    # slot 2's positions: rows far outside [0, T)
    big_y = torch.randn(14, 16, dtype=p.y.dtype, device=p.y.device)
    big_y[:10] = p.y
    y = big_y[:10]
    hostile = olk.LoRABatchMeta(meta.token_slots, sorted_bad, bad, meta.tile_info, num_slots=S, block_m=meta.block_m)
    guard = big_y[10:].clone()
    # straight to the launcher: add_lora would refuse this metadata on the CPU (checks.check_batch_meta)
    seg.segment(y, p.x, p.a, p.b, p.scalings, p.ranks, hostile)
    assert torch.equal(big_y[10:], guard), "rows past T were written"
    ref = p.y.double() + reference_delta(p)
    ok = torch.tensor([s in (0, 1) for s in p.indices.tolist()])
    assert_close(y[ok], ref[ok], torch.float32, "rows of valid segments")
    untouched = ~ok
    assert torch.equal(y[untouched], p.y[untouched]), "rows of broken segments must be left as they were"


def test_route_choice(monkeypatch, device):
    """"auto": the fused plan while its modelled re-reads of A stay under SEGMENT_MIN_BYTES, the
    segment plan past it; the environment variable overrides; the bound path follows the route."""
    usable("triton", device)
    p = make_problem(8, 64, [32], 8, 16, device=device, indices=torch.arange(8))
    meta = olk.build_batch_meta(p.indices, 8)
    route = {"FUSED": True, "DECODE": "auto", "SEGMENT_MIN_BYTES": 8 << 20}
    assert seg.decode_plan(p.x, p.y, p.a, meta, route) == "fused"
    assert seg.decode_plan(p.x, p.y, p.a, meta, {**route, "SEGMENT_MIN_BYTES": 0}) == "segment"
    assert seg.decode_plan(p.x, p.y, p.a, meta, {**route, "DECODE": "segment"}) == "segment"
    monkeypatch.setenv("OPENLORA_TRITON_DECODE", "fused")
    assert seg.decode_plan(p.x, p.y, p.a, meta, {**route, "SEGMENT_MIN_BYTES": 0}) == "fused"
    monkeypatch.setenv("OPENLORA_TRITON_DECODE", "segment")
    assert seg.decode_plan(p.x, p.y, p.a, meta, route) == "segment"
    # what "auto" computes, from shapes only: min(T, S) adapters x chunks x n x R x K x bytes
    assert seg.fused_reread_bytes(64, 4096, 64, 64, 3, 2, 9) == 64 * 9 * 3 * 64 * 4096 * 2
    assert seg.fused_reread_bytes(1, 4096, 16, 64, 1, 2, 16) == 16 * 16 * 4096 * 2

    calls = []
    real = seg.segment
    monkeypatch.setattr(seg, "segment", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    bound = olk.BoundLoRA(p.lora_a(), p.lora_b(), p.scalings, p.ranks, backend="triton")
    y = p.y.clone()
    bound(y, p.x, meta)
    assert calls, "the segment route was not taken through BoundLoRA"
    check_add(p, y, torch.float32)


def test_segment_grids_match_the_bytes_model(device):
    """The launches' grids are the bytes model's "segment" plan: (S, K splits) shrinks (all slices in one program) and
    (S, column chunks, slices) expands, fixed by the shapes (CUDA-graph capturable)."""
    usable("triton", device)
    p = make_problem(5, 100, [40, 20], 6, 8, device=device)
    meta = olk.build_batch_meta(p.indices, 6)
    cfg = kernel_config("segment", block_m=1, K=100, N=60, R=8, n_slices=2, dtype=p.x.dtype, device=p.x.device)
    geo = seg.plan_shape(5, 100, cfg)
    h, launches = seg.segment_launches(p.y.clone(), p.x, p.a, p.b, p.scalings, p.ranks, meta)
    tiles = cfg["COLS"] // cfg["BLOCK_N"]
    assert [g for _, g, _, _ in launches] == [(6, geo["splits"], 1), (6, -(-(-(-40 // cfg["BLOCK_N"])) // tiles), 2)]
    assert h.shape == (2, 5, 8) and h.dtype == torch.float32
    if geo["splits"] > 1:
        assert bool((h == 0).all()), "a K-split shrink adds into h: it must start zero-filled"
