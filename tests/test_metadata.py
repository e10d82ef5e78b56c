"""The batch metadata: invariants on random index vectors (hypothesis), sanitising, fixed sizes."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import openlora_kernels as olk
from openlora_kernels.metadata import BLOCK_M_CHOICES, _build_impl, choose_block_m, max_tiles


def check_invariants(indices: torch.Tensor, S: int, bm: int, meta) -> None:
    T = indices.shape[0]
    idx = indices.tolist()
    slot_of = [s if 0 <= s < S else -1 for s in idx]
    # fixed sizes, int32
    assert meta.token_slots.shape == (T,) and meta.sorted_tokens.shape == (T,)
    assert meta.seg_info.shape == (2, S)
    assert meta.tile_info.shape == (3, max_tiles(T, S, bm))
    for t in meta.tensors():
        assert t.dtype == torch.int32
    assert meta.token_slots.tolist() == slot_of
    # sorted_tokens: a permutation, stably sorted by slot, rows without adapter last
    order = meta.sorted_tokens.tolist()
    assert sorted(order) == list(range(T))
    keys = [slot_of[t] if slot_of[t] >= 0 else S for t in order]
    assert keys == sorted(keys)
    for a, b in zip(range(len(order) - 1), range(1, len(order))):
        if keys[a] == keys[b]:
            assert order[a] < order[b], "stable order within a slot"
    # segments
    starts, lens = meta.seg_info.tolist() if S else ([], [])
    for s in range(S):
        rows = order[starts[s]:starts[s] + lens[s]]
        assert rows == [t for t in range(T) if slot_of[t] == s]
    # tiles: each valid row in exactly one tile, tiles within one segment, at most bm rows
    covered = []
    tiles = meta.tile_info.tolist()
    n_valid = 0
    for slot, start, end in zip(*tiles):
        if slot < 0:
            continue
        n_valid += 1
        assert 0 <= slot < S
        assert 0 < end - start <= bm
        assert starts[slot] <= start and end <= starts[slot] + lens[slot]
        covered.extend(order[start:end])
    assert sorted(covered) == sorted(t for t in range(T) if slot_of[t] >= 0)
    # valid tiles come first, so a kernel grid over G programs sees them contiguously
    assert all(s >= 0 for s in tiles[0][:n_valid]) and all(s < 0 for s in tiles[0][n_valid:])


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_metadata_invariants_random(data):
    S = data.draw(st.integers(0, 12), label="S")
    T = data.draw(st.integers(0, 80), label="T")
    bm = data.draw(st.sampled_from(BLOCK_M_CHOICES), label="block_m")
    # include out-of-range values: _build_impl (the sync-free kernel) must sanitise them to -1
    vals = data.draw(st.lists(st.integers(-3, S + 2), min_size=T, max_size=T), label="indices")
    dtype = data.draw(st.sampled_from([torch.int32, torch.int64]))
    indices = torch.tensor(vals, dtype=dtype)
    meta = olk.LoRABatchMeta(*_build_impl(indices, S, bm), num_slots=S, block_m=bm)
    check_invariants(indices, S, bm, meta)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_public_build_on_valid_indices(data):
    S = data.draw(st.integers(1, 10))
    T = data.draw(st.integers(0, 60))
    vals = data.draw(st.lists(st.integers(-1, S - 1), min_size=T, max_size=T))
    indices = torch.tensor(vals, dtype=torch.int64)
    meta = olk.build_batch_meta(indices, S)
    assert meta.block_m == choose_block_m(T, S)
    check_invariants(indices, S, meta.block_m, meta)


def test_out_of_range_raises_on_cpu():
    with pytest.raises(IndexError, match=r"indices: value 7 at position 2 .* 3 adapter slots"):
        olk.build_batch_meta(torch.tensor([0, -1, 7, 1]), 3)
    with pytest.raises(IndexError, match=r"value -2"):
        olk.build_batch_meta(torch.tensor([-2]), 3)


def test_block_m_choice_follows_rows_per_slot():
    assert choose_block_m(1, 64) == 1           # decode, one row
    assert choose_block_m(64, 64) == 1          # decode, one row per adapter
    assert choose_block_m(256, 64) == 4
    assert choose_block_m(2048, 4) == 64        # prefill
    assert choose_block_m(100, 4) == 16
    assert all(choose_block_m(t, s) in BLOCK_M_CHOICES for t in range(0, 300, 7) for s in range(0, 70, 5))


def test_max_tiles_is_tight_for_worst_case():
    # every segment as ragged as possible: U segments of (bm + 1) rows each
    for bm in BLOCK_M_CHOICES:
        for U in (1, 3, 8):
            T = U * (bm + 1)
            idx = torch.arange(U).repeat_interleave(bm + 1)
            meta = olk.build_batch_meta(idx, U, block_m=bm)
            n_valid = int((meta.tile_slot >= 0).sum())
            assert n_valid == U * (2 if bm > 1 else bm + 1)
            assert meta.num_tiles >= n_valid
            assert meta.num_tiles == max_tiles(T, U, bm)


@pytest.mark.parametrize("bad,exc,msg", [
    (torch.zeros(3, 2, dtype=torch.int64), ValueError, "1-D"),
    (torch.zeros(3), TypeError, "int32 or int64"),
    ([0, 1], TypeError, "torch.Tensor"),
])
def test_build_rejects_bad_indices(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        olk.build_batch_meta(bad, 3)


def test_build_rejects_bad_block_m_and_slots():
    with pytest.raises(ValueError, match="block_m"):
        olk.build_batch_meta(torch.zeros(3, dtype=torch.int64), 3, block_m=8)
    with pytest.raises(ValueError, match="num_slots"):
        olk.build_batch_meta(torch.zeros(3, dtype=torch.int64), -1)


@pytest.mark.gpu
def test_build_on_gpu_has_no_host_sync():
    """Building the metadata must not synchronise with the host (CUDA-graph safe)."""
    idx = torch.randint(-1, 8, (300,), device="cuda")
    olk.build_batch_meta(idx, 8)  # warm up allocations/kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        meta = olk.build_batch_meta(idx, 8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check_invariants(idx.cpu(), 8, meta.block_m, olk.LoRABatchMeta(*(t.cpu() for t in meta.tensors()),
                                                                    num_slots=8, block_m=meta.block_m))


@pytest.mark.gpu
def test_gpu_sanitises_out_of_range_without_debug_checks():
    idx = torch.tensor([0, 9, -5, 2], device="cuda")
    meta = olk.build_batch_meta(idx, 3)
    assert meta.token_slots.tolist() == [0, -1, -1, 2]
    prev = olk.set_debug_checks(True)
    try:
        with pytest.raises(IndexError):
            olk.build_batch_meta(idx, 3)
    finally:
        olk.set_debug_checks(prev)
