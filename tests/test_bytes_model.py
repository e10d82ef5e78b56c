"""benchmarks/bytes_model.py: each launch plan's bytes against roofline.py's minimum, and the
model's inputs against the launchers' real plans."""
import pytest
import torch

import openlora_kernels as olk
from benchmarks import bytes_model as bm
from benchmarks.roofline import op_bytes, problem_from_batch


def _segments(indices, ranks, K, widths, R):
    rows = {}
    for i in indices:
        if 0 <= i < len(ranks):
            rows[i] = rows.get(i, 0) + 1
    return bm.Segments(tuple((n, ranks[s]) for s, n in sorted(rows.items())), len(indices), K, tuple(widths), R)


def test_a_plan_without_rereads_moves_exactly_the_roofline_bytes():
    idx, ranks = [0, 2, -1, 1, 2, 2, 0], [16, 8, 4]
    p = _segments(idx, ranks, 256, (128, 32, 32), 16)
    assert p.problem() == problem_from_batch(idx, ranks, 256, (128, 32, 32), R=16)
    roof = op_bytes("add_lora", p.problem())
    # every slot's rows in one tile, one column chunk: x, A, B and y each move once
    got = bm.plan_bytes("fused", p, block_m=64, chunks=(1, 1, 1))
    assert got["total"] - (3 - 1) * 2 * p.T_a * 256 == roof and got["h"] == 0     # (x once per slice)
    one = _segments(idx, ranks, 256, (192,), 16)
    assert bm.plan_bytes("fused", one, block_m=64, chunks=(1,))["total"] == op_bytes("add_lora", one.problem())
    # the split plan moves the same plus its fp32 intermediate
    got = bm.plan_bytes("split", p, block_m=64, rank_block=64, col_block=128)
    assert got["total"] - got["h"] - (3 - 1) * 2 * p.T_a * 256 == roof   # (x once per slice)
    assert got["h"] == 4 * 3 * p.T * 16 + sum(4 * n * r * (1 + -(-w // 128)) for n, r in p.segs for w in (128, 32, 32))


def test_fused_rereads_grow_with_tiles_and_chunks():
    p = bm.Segments(((8, 16),), 8, 4096, (4096,), 64)
    one = bm.plan_bytes("fused", p, block_m=8, chunks=(1,))
    many = bm.plan_bytes("fused", p, block_m=1, chunks=(4,))
    assert many["A"] == 8 * 4 * one["A"] and many["B"] == 8 * one["B"] and many["x"] == 4 * one["x"]
    assert many["y"] == one["y"]


@pytest.mark.parametrize("name,p", list(bm.headline_shapes()), ids=[n for n, _ in bm.headline_shapes()])
def test_segment_design_within_1_25x_of_the_roofline_at_the_headline_decode_shapes(name, p):
    assert bm.ratio("segment", p) <= 1.25


def test_fused_model_uses_the_launchers_grid(monkeypatch):
    """The fused plan's column chunks and tiles in the model are the ones the Triton launcher makes
    (its GPU heuristics, 132 SMs)."""
    from openlora_kernels.ops import configs, triton_sgmv

    monkeypatch.setattr(triton_sgmv, "kernel_config", lambda kind, device, **shape: configs.heuristic_config(kind, **shape))
    monkeypatch.setattr(triton_sgmv, "device_facts", lambda device: ("model", 132))
    for T, S, widths, R in ((1, 8, (4096,), 64), (8, 8, (4096, 1024, 1024), 16), (32, 64, (512,), 128)):
        x, y = torch.zeros(T, 4096, dtype=torch.bfloat16), torch.zeros(T, sum(widths), dtype=torch.bfloat16)
        a = [torch.zeros(S, R, 4096, dtype=torch.bfloat16) for _ in widths]
        b = [torch.zeros(S, R, w, dtype=torch.bfloat16).transpose(1, 2) for w in widths]
        meta = olk.build_batch_meta(torch.arange(T) % S, S)
        launches = triton_sgmv.fused_launches(y, x, a, b, torch.ones(S), None, meta)
        (kernel, grid, args, kw), = launches
        assert grid[0] == meta.num_tiles
        bn = bm.fused_block_n(meta.block_m, 4096, widths, R)
        assert kw["BLOCK_N"] == bn
        assert (grid[1],) * len(widths) == bm.fused_chunks(meta.num_tiles, widths, block_n=bn)


def test_segment_model_uses_the_launchers_geometry(monkeypatch):
    """The segment plan's K split, column chunk and rows per step in the model are the launcher's
    (ops/triton_segment.py with its GPU heuristics: the whole K per program) at the headline shapes'
    stacked rank (64, bf16), and its grids are (S, 1) and (S, column chunks, slices)."""
    from openlora_kernels.ops import configs, triton_segment

    monkeypatch.setattr(triton_segment, "kernel_config",
                        lambda kind, device, **shape: configs.heuristic_config(kind, **shape))
    T, S, widths, R = 64, 8, (4096, 1024, 1024), 64
    x, y = torch.zeros(T, 4096, dtype=torch.bfloat16), torch.zeros(T, sum(widths), dtype=torch.bfloat16)
    a = [torch.zeros(S, R, 4096, dtype=torch.bfloat16) for _ in widths]
    b = [torch.zeros(S, R, w, dtype=torch.bfloat16).transpose(1, 2) for w in widths]
    meta = olk.build_batch_meta(torch.arange(T) % S, S)
    h, launches = triton_segment.segment_launches(y, x, a, b, torch.ones(S), None, meta)
    (_, g_shrink, _, kw_s), (_, g_expand, _, kw_e) = launches
    cols = kw_e["BLOCK_N"] * (configs.heuristic_config("segment", block_m=1, K=4096, N=6144, R=R, n_slices=3,
                                                       dtype=torch.bfloat16)["COLS"] // kw_e["BLOCK_N"])
    assert g_shrink == (S, 1, 1) and kw_s["NS"] == 3 and not kw_s["ATOMIC"] and h is not None
    assert g_expand == (S, -(-4096 // cols), 3) and cols == 1024
    assert kw_s["BLOCK_M"] == kw_e["BLOCK_M"] == 64
    # and the model with these parameters is what test_segment_design_... checks
    p = bm.Segments(((64, 64),), 64, 4096, widths, R)
    assert bm.plan_bytes("segment", p) == bm.plan_bytes("segment", p, k_split_elems=0, seg_chunk_cols=cols,
                                                        seg_block_m=kw_s["BLOCK_M"])
