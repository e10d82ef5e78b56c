"""The rank-packed pool (patch_model(..., device_budget_bytes=...)): every batch against PEFT run
with each row's adapter alone, after LRU evictions by bytes, after compaction, with mixed ranks;
the budget, the errors, memory_report."""
import copy

import pytest
import torch

import openlora_kernels as olk
from openlora_kernels.pool import NoFreeSlotError

from hf_models import ATOL, RTOL, left_padded_batch, make_model, peft_model, save_adapter

RANKS = {"r4a": 4, "r8": 8, "r4b": 4, "r8b": 8, "r16": 16, "mix": 6}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from peft import LoraConfig

    base = make_model("llama")
    root = tmp_path_factory.mktemp("packed_zoo")
    paths = {}
    for i, (name, r) in enumerate(RANKS.items()):
        kw = {}
        if name == "mix":            # per-module ranks: 6, and 2 in the v projections; not every layer
            kw = {"rank_pattern": {"v_proj": 2}, "target_modules": ["q_proj", "v_proj", "down_proj"]}
        cfg = LoraConfig(r=r, lora_alpha=2 * r + 1, init_lora_weights=False,
                         **({"target_modules": "all-linear"} | kw))
        paths[name] = save_adapter(base, cfg, str(root / name), seed=40 + i)
    ids, mask = left_padded_batch([5, 3, 6], seed=11)
    with torch.no_grad():
        ref = {n: peft_model(base, p)(input_ids=ids, attention_mask=mask).logits for n, p in paths.items()}
        ref[None] = base(input_ids=ids, attention_mask=mask).logits
    return base, paths, ids, mask, ref


def per_row_bytes(base) -> int:
    """Bytes of one rank row over every patched layer (what packed_layout divides the budget by)."""
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=1, max_rank=1)
    return sum((ls.in_features + ls.out_features) * max(ls.experts, 1) * ls.dtype.itemsize
               for ls in lm._layers.values())


def packed(zoo, rows: int, backend="auto", **kw):
    base, paths, *_ = zoo
    lm = olk.patch_model(copy.deepcopy(base), **{"max_adapters": 3, "max_rank": 16, "backend": backend,
                                                 "device_budget_bytes": rows * per_row_bytes(base), **kw})
    for n, p in paths.items():
        lm.load_adapter(n, p)
    return lm


def check_batch(lm, zoo, rows):
    _, _, ids, mask, ref = zoo
    with torch.no_grad():
        out = lm(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
    for i, name in enumerate(rows):
        keep = mask[i].bool()
        assert torch.isfinite(out[i][keep]).all()
        torch.testing.assert_close(out[i][keep], ref[name][i][keep], atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"rows {rows}, row {i} ({name}): {m}")


def resident(lm):
    return {a.name for a in lm.memory_report().adapters if a.slot is not None}


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_mixed_ranks_against_peft_after_evictions(zoo, backend):
    if backend == "cpu" and not olk.available_backends("cpu")["cpu"].usable:
        pytest.skip("native CPU backend not built")
    lm = packed(zoo, 24, backend)           # 24 rows per layer: r16 + r8, or r8 + r8 + r4 + r4
    layer = next(iter(lm._layers.values()))
    assert layer.packed and layer.capacity == 24
    check_batch(lm, zoo, ["r16", "r8", None])
    assert resident(lm) == {"r16", "r8"}
    check_batch(lm, zoo, ["r4a", "r8b", "r4b"])      # evicts r16 then r8 (least recently used)
    assert resident(lm) >= {"r4a", "r8b", "r4b"} and "r16" not in resident(lm)
    check_batch(lm, zoo, ["mix", "r16", None])
    check_batch(lm, zoo, ["r8", "mix", "r4a"])
    # every layer's allocations stay inside the buffer and never overlap
    for ls in lm._layers.values():
        spans = sorted(ls.extents.values())
        assert all(o >= 0 and o + n <= ls.capacity for o, n in spans)
        assert all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_compaction_moves_unheld_adapters_and_keeps_results(zoo):
    lm = packed(zoo, 16)
    check_batch(lm, zoo, ["r4a", "r8", "r4b"])       # rows 0..4, 4..12, 12..16 in every layer
    q = lm._layers[next(n for n in lm._layers if n.endswith("q_proj"))]
    slot8 = lm.pool.slot_of("r8")
    assert q.extents[slot8] == (4, 8)
    lm.unload_adapter("r4a")
    lm.unload_adapter("r4b")                        # 8 rows free, as 0..4 and 12..16
    lm.load_adapter("r8b", zoo[1]["r8b"]) if "r8b" not in lm.adapters else None
    check_batch(lm, zoo, ["r8b", "r8", None])         # fits only after r8 slides down to 0..8
    assert q.extents[lm.pool.slot_of("r8")] == (0, 8)
    assert resident(lm) == {"r8", "r8b"}
    check_batch(lm, zoo, ["r8", "r8b", "r8"])


def test_compaction_never_moves_a_held_adapter(zoo):
    lm = packed(zoo, 16)
    check_batch(lm, zoo, ["r4a", "r8", "r4b"])
    lm.unload_adapter("r4a")
    lm.unload_adapter("r4b")
    lm.acquire(["r8"])                              # held: it may not move, nor be evicted
    with pytest.raises(NoFreeSlotError, match="r8b"):
        check_batch(lm, zoo, ["r8b", None, None])
    q = lm._layers[next(n for n in lm._layers if n.endswith("q_proj"))]
    assert q.extents[lm.pool.slot_of("r8")] == (4, 8)
    check_batch(lm, zoo, ["r8", None, "r8"])          # unchanged after the refused load
    lm.release(["r8"])
    check_batch(lm, zoo, ["r8b", "r8", None])


def test_more_adapters_resident_than_max_adapters(zoo):
    lm = packed(zoo, 40)                  # room for r4a + r8 + r4b + r8b + r16 = 40 rows
    for rows in (["r4a", "r8", "r4b"], ["r8b", "r16", None]):
        check_batch(lm, zoo, rows)
    assert resident(lm) == {"r4a", "r8", "r4b", "r8b", "r16"}     # 5 > max_adapters=3
    with pytest.raises(ValueError, match="max_adapters"):
        lm.pool.lease(["r4a", "r8", "r4b", "r8b"])                 # the per-batch limit stays
    rep = lm.memory_report()
    assert rep.device_budget_bytes is not None and rep.num_slots >= 3
    by = {a.name: a for a in rep.adapters}
    for n in ("r4a", "r8", "r16"):
        assert by[n].device_bytes == by[n].nbytes > 0            # its own ranks' rows, no padding
        assert by[n].rank == RANKS[n] and by[n].dtype == torch.float32 and by[n].host_bytes > 0
    assert rep.device_bytes <= rep.device_budget_bytes
    assert "budget" in str(rep) and "packed" in str(rep)


def test_budget_errors(zoo):
    base, paths, *_ = zoo
    with pytest.raises(ValueError, match="device_budget_bytes"):
        olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=16, device_budget_bytes=0)
    with pytest.raises(ValueError, match="device_budget_bytes"):
        olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=16, device_budget_bytes=7)
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=16,
                         device_budget_bytes=12 * per_row_bytes(base))
    with pytest.raises(ValueError, match="'r16'.*12 rows"):
        lm.load_adapter("r16", paths["r16"])          # larger than the budget: refused, named
    assert "r16" not in lm.adapters
    lm.load_adapter("r8", paths["r8"])
    check_batch(lm, zoo, ["r8", None, "r8"])
