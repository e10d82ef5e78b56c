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


# ------------------------------------------------------------------- structural validation

def _parts(T=6, S=3, bm=2, idx=None):
    idx = torch.tensor([0, 2, -1, 2, 1, 0]) if idx is None else idx
    return [t.clone() for t in _build_impl(idx, S, bm)], S, bm


def _with(f, value, **kw):
    parts, S, bm = _parts()
    kw = {"num_slots": S, "block_m": bm, **kw}
    if f is not None:
        parts[f] = value(parts[f])
    return olk.LoRABatchMeta(*parts, **kw)


STRUCT_BAD = {
    "token_slots_type": (0, lambda t: t.tolist(), TypeError, "LoRABatchMeta.token_slots: expected a torch.Tensor"),
    "token_slots_dtype": (0, lambda t: t.long(), TypeError, "LoRABatchMeta.token_slots: expected dtype int32"),
    "token_slots_dims": (0, lambda t: t.view(2, 3), ValueError, "LoRABatchMeta.token_slots: expected a 1-D"),
    "sorted_len": (1, lambda t: t[:5], ValueError, r"LoRABatchMeta.sorted_tokens: expected shape \[6\]"),
    "sorted_dtype": (1, lambda t: t.float(), TypeError, "LoRABatchMeta.sorted_tokens: expected dtype int32"),
    "sorted_strided": (1, lambda t: torch.stack([t, t], 1)[:, 0], ValueError,
                       "LoRABatchMeta.sorted_tokens: must be contiguous"),
    "seg_shape": (2, lambda t: t[:, :2], ValueError, r"LoRABatchMeta.seg_info: expected shape \[2, 3\]"),
    "seg_rows": (2, lambda t: t[:1], ValueError, r"LoRABatchMeta.seg_info: expected shape \[2, 3\]"),
    "seg_strided": (2, lambda t: t.t().contiguous().t(), ValueError, "LoRABatchMeta.seg_info: must be contiguous"),
    "tile_shape": (3, lambda t: t[:2], ValueError, r"LoRABatchMeta.tile_info: expected shape \[3, G\]"),
    "tile_dims": (3, lambda t: t.reshape(-1), ValueError, "LoRABatchMeta.tile_info: expected a 2-D"),
    "tile_device": (3, lambda t: t.to("meta"), ValueError, "LoRABatchMeta.tile_info: on meta, but token_slots is on cpu"),
}


@pytest.mark.parametrize("name", list(STRUCT_BAD))
def test_structure_is_checked_naming_the_field(name):
    f, value, exc, msg = STRUCT_BAD[name]
    with pytest.raises(exc, match=msg):
        _with(f, value)


@pytest.mark.parametrize("kw,msg", [
    (dict(num_slots=4), r"seg_info: expected shape \[2, 4\]"),
    (dict(num_slots=-1), "num_slots: expected a non-negative int"),
    (dict(num_slots=True), "num_slots: expected a non-negative int"),
    (dict(num_slots=3.0), "num_slots: expected a non-negative int"),
    (dict(block_m=8), r"block_m: expected one of \(1, 2, 4, 16, 32, 64\)"),
    (dict(block_m=None), "block_m: expected one of"),
])
def test_structure_checks_num_slots_and_block_m(kw, msg):
    with pytest.raises(ValueError, match="LoRABatchMeta." + msg):
        _with(None, None, **kw)


def test_any_tile_count_and_empty_sizes_are_structurally_fine():
    for T, S, G in ((0, 0, 0), (0, 3, 0), (4, 0, 5), (3, 2, 7)):
        olk.LoRABatchMeta(torch.zeros(T, dtype=torch.int32), torch.zeros(T, dtype=torch.int32),
                          torch.zeros(2, S, dtype=torch.int32), torch.zeros(3, G, dtype=torch.int32),
                          num_slots=S, block_m=1)


# --------------------------------------------------------------------- value checks (debug)

def _bad(edit, T=6, S=3, bm=2):
    parts, S, bm = _parts(T, S, bm)
    edit(parts)
    return olk.LoRABatchMeta(*parts, num_slots=S, block_m=bm)


def _set(f, index, value):
    def edit(parts):
        parts[f][index] = value
    return edit


# meta from _parts(): idx [0, 2, -1, 2, 1, 0], S=3, block_m=2: sorted [0, 5, 4, 1, 3, 2],
# seg_info [[0, 2, 3], [2, 1, 2]], tiles (0, 0..2), (1, 2..3), (2, 3..5), then unused
VALUE_BAD = {
    "slot_high": (_set(0, 2, 3), "token_slots: value 3 at row 2 is outside"),
    "slot_low": (_set(0, 1, -2), "token_slots: value -2 at row 1"),
    "sorted_range": (_set(1, 3, 6), "sorted_tokens: value 6 at position 3 is not a row index"),
    "sorted_negative": (_set(1, 0, -1), "sorted_tokens: value -1 at position 0"),
    "sorted_duplicate": (_set(1, 1, 0), "sorted_tokens: not a permutation of the 6 rows"),
    "sorted_ungrouped": (lambda p: p[1].copy_(torch.tensor([0, 4, 5, 1, 3, 2], dtype=torch.int32)),
                         "sorted_tokens: rows are not grouped by slot"),
    "no_adapter_first": (lambda p: p[1].copy_(torch.tensor([2, 0, 5, 4, 1, 3], dtype=torch.int32)),
                         "sorted_tokens: rows are not grouped by slot"),
    "seg_len": (_set(2, (1, 1), 2), "seg_info: slot 1 has segment length 2, but 1 rows have that slot"),
    "seg_start": (_set(2, (0, 2), 2), "seg_info: slot 2's segment starts at 2"),
    "tile_slot": (_set(3, (0, 0), 3), "tile_info: tile 0 names slot 3, outside"),
    "tile_outside_segment": (_set(3, (0, 1), 2), r"tile_info: tile 1 \(slot 2, .* inside slot 2's segment \[3, 5\)"),
    "tile_empty": (_set(3, (2, 1), 2), "tile_info: tile 1 .* not a non-empty run"),
    "tile_too_long": (lambda p: p[3][:, 0].copy_(torch.tensor([0, 0, 3])),
                      "tile_info: tile 0 .* at most block_m=2"),
    "tile_missing": (_set(3, (0, 2), -1), "tile_info: the tiles cover 3 sorted positions, but 5 rows"),
    "tile_overlap": (lambda p: p[3][:, 2:].copy_(torch.tensor([[2, 2], [3, 3], [4, 4]])),
                     "tile_info: two tiles overlap"),
}


@pytest.mark.parametrize("name", list(VALUE_BAD))
def test_inconsistent_contents_raise_naming_the_field(name):
    edit, msg = VALUE_BAD[name]
    meta = _bad(edit)
    with pytest.raises(ValueError, match="LoRABatchMeta." + msg):
        olk.check_batch_meta(meta)
    # ... and every op that takes it raises before writing anything (CPU: always checked)
    x, y = torch.randn(6, 4), torch.zeros(6, 5)
    A, B = torch.randn(3, 2, 4), torch.randn(3, 5, 2)
    for backend in [b for b in ("torch", "cpu", "triton") if olk.available_backends("cpu")[b].usable]:
        with pytest.raises(ValueError, match="LoRABatchMeta."):
            olk.add_lora(y, x, A, B, meta, torch.ones(3), backend=backend)
        with pytest.raises(ValueError, match="LoRABatchMeta."):
            olk.lora_shrink(x, A, meta, backend=backend)
        with pytest.raises(ValueError, match="LoRABatchMeta."):
            olk.lora_expand(y, torch.zeros(1, 6, 2), B, meta, torch.ones(3), backend=backend)
        with pytest.raises(ValueError, match="LoRABatchMeta."):
            olk.BoundLoRA(A, B, torch.ones(3), backend=backend)(y, x, meta)
        assert not y.any()


def test_consistent_hand_built_metadata_passes_and_is_read_once(monkeypatch):
    from openlora_kernels import checks
    calls = []
    real = checks._check_meta_values
    monkeypatch.setattr(checks, "_check_meta_values", lambda m: calls.append(1) or real(m))
    parts, S, bm = _parts()
    meta = olk.LoRABatchMeta(*parts, num_slots=S, block_m=bm)
    x, A, B = torch.randn(6, 4), torch.randn(3, 2, 4), torch.randn(3, 5, 2)
    for _ in range(3):
        olk.add_lora(torch.zeros(6, 5), x, A, B, meta, torch.ones(3), backend="torch")
    assert calls == [1], "the verdict is memoised on the metadata object"
    # the custom ops rebuild a metadata object from the same tensors: not re-read either
    torch.ops.openlora.add_lora(torch.zeros(6, 5), x, [A], [B], torch.ones(3), None, *parts, bm, "torch")
    assert calls == [1]
    # ... until a tensor changes in place
    parts[1][[1, 2]] = parts[1][[2, 1]].clone()             # rows of slots 0 and 1 swapped
    with pytest.raises(ValueError, match="LoRABatchMeta.sorted_tokens: rows are not grouped"):
        torch.ops.openlora.add_lora(torch.zeros(6, 5), x, [A], [B], torch.ones(3), None, *parts, bm, "torch")
    assert len(calls) == 2
    # built metadata is consistent by construction: never read by the check
    built = olk.build_batch_meta(torch.tensor([0, 2, -1, 2, 1, 0]), 3)
    olk.add_lora(torch.zeros(6, 5), x, A, B, built, torch.ones(3), backend="torch")
    assert len(calls) == 2


def test_custom_ops_check_the_metadata_they_rebuild():
    x, A, B = torch.randn(6, 4), torch.randn(3, 2, 4), torch.randn(3, 5, 2)
    parts, S, bm = _parts()
    parts[0][0] = 7
    with pytest.raises(ValueError, match="LoRABatchMeta.token_slots: value 7"):
        torch.ops.openlora.lora_shrink(x, [A], None, *parts, bm, "torch")
    with pytest.raises(ValueError, match="LoRABatchMeta.tile_info: expected a 2-D"):
        torch.ops.openlora.lora_shrink(x, [A], None, *parts[:3], parts[3].reshape(-1), bm, "torch")
    with pytest.raises(ValueError, match="indices: the batch metadata covers 6 rows, but x/y have 5"):
        torch.ops.openlora.lora_shrink(x[:5], [A], None, *_parts()[0], bm, "torch")


@pytest.mark.gpu
def test_gpu_metadata_contents_are_checked_in_debug_mode_only():
    parts, S, bm = _parts()
    parts[1][0] = 99                                          # a row id outside [0, T)
    meta = olk.LoRABatchMeta(*(t.cuda() for t in parts), num_slots=S, block_m=bm)
    x, y = torch.randn(6, 4, device="cuda"), torch.zeros(6, 5, device="cuda")
    A, B = torch.randn(3, 2, 4, device="cuda"), torch.randn(3, 5, 2, device="cuda")
    olk.check_batch_meta(meta)                                # debug off: not read (no sync)
    olk.add_lora(y, x, A, B, meta, torch.ones(3, device="cuda"))   # runs; never out of bounds
    torch.cuda.synchronize()
    prev = olk.set_debug_checks(True)
    try:
        with pytest.raises(ValueError, match="LoRABatchMeta.sorted_tokens: value 99"):
            olk.check_batch_meta(meta)
    finally:
        olk.set_debug_checks(prev)
