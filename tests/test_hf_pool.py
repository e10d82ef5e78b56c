"""The adapter pool behind patch_model: LRU device slots, host budget, pinning, failed loads.

Every batch is checked against PEFT run with each row's adapter alone, so a slot swapped in the
wrong place, stale rank padding or a half-written slot shows up as a wrong number.
"""
import copy
import json
import os

import pytest
import torch

import openlora_kernels as olk
from openlora_kernels.adapters import read_adapter_dir

from hf_models import ATOL, RTOL, left_padded_batch, make_model, peft_model, save_adapter

N_ADAPTERS = 5


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Five Llama adapters of different ranks and targets, their PEFT references on one batch."""
    from peft import LoraConfig

    base = make_model("llama")
    root = tmp_path_factory.mktemp("zoo")
    targets = [["q_proj", "v_proj"], ["down_proj"], "all-linear", ["k_proj", "up_proj"], ["o_proj", "gate_proj"]]
    paths = {}
    for i in range(N_ADAPTERS):
        cfg = LoraConfig(r=[2, 16, 4, 8, 6][i], lora_alpha=8, target_modules=targets[i], init_lora_weights=False)
        paths[f"a{i}"] = save_adapter(base, cfg, str(root / f"a{i}"), seed=10 + i)
    ids, mask = left_padded_batch([6, 4, 5], seed=7)
    with torch.no_grad():
        ref = {n: peft_model(base, p)(input_ids=ids, attention_mask=mask).logits for n, p in paths.items()}
        ref[None] = base(input_ids=ids, attention_mask=mask).logits
    return base, paths, ids, mask, ref


def patched(zoo, **kw):
    base, paths, *_ = zoo
    lm = olk.patch_model(copy.deepcopy(base), **{"max_adapters": 2, "max_rank": 16, **kw})
    for n, p in paths.items():
        lm.load_adapter(n, p)
    return lm


def check_batch(lm, zoo, rows):
    _, _, ids, mask, ref = zoo
    out = lm(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
    for i, name in enumerate(rows):
        keep = mask[i].bool()
        torch.testing.assert_close(out[i][keep], ref[name][i][keep], atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"rows {rows}, row {i} ({name}): {m}")
    return out


def adapter_bytes(path):
    """lora_A + lora_B bytes of a saved adapter (float32, like the model)."""
    from safetensors.torch import load_file
    return sum(t.numel() * 4 for t in load_file(f"{path}/adapter_model.safetensors").values())


def resident(lm):
    return {a.name: a.slot for a in lm.memory_report().adapters if a.slot is not None}


def test_more_adapters_than_slots_across_batches(zoo):
    lm = patched(zoo)
    sequence = [["a0", "a1", None], ["a2", None, "a2"], ["a1", "a3", "a1"], ["a4", "a0", None],
                ["a2", "a3", "a3"], ["a0", "a0", "a0"], ["a1", None, "a4"], ["a3", "a2", "a0"][:2] + [None]]
    for rows in sequence:
        check_batch(lm, zoo, rows)
        in_batch = {n for n in rows if n}
        assert in_batch <= set(resident(lm)) and len(resident(lm)) <= 2


def test_least_recently_used_slot_is_evicted(zoo):
    lm = patched(zoo)
    for n in ("a0", "a1"):
        check_batch(lm, zoo, [n, None, None])
    slot_a0 = resident(lm)["a0"]
    check_batch(lm, zoo, ["a2", None, None])            # evicts a0 (older than a1)
    assert set(resident(lm)) == {"a1", "a2"} and resident(lm)["a2"] == slot_a0
    check_batch(lm, zoo, [None, "a0", None])            # evicts a1
    assert set(resident(lm)) == {"a0", "a2"}


def test_lower_rank_adapter_in_a_slot_that_held_a_higher_rank_one(zoo):
    """a1 (r=16 on down_proj) then a0 (r=2) into the same slot: padding must not leak."""
    lm = patched(zoo, max_adapters=1)
    for rows in (["a1"] * 3, ["a0"] * 3, ["a2"] * 3, ["a1"] * 3, ["a3"] * 3):
        check_batch(lm, zoo, rows)


def test_too_many_distinct_adapters_in_one_batch_names_max_adapters(zoo):
    lm = patched(zoo)
    with pytest.raises(ValueError, match="max_adapters=2"):
        check_batch(lm, zoo, ["a0", "a1", "a2"])
    check_batch(lm, zoo, ["a0", "a1", "a1"])             # and the pool still works


def test_pinned_adapter_is_never_evicted(zoo):
    lm = patched(zoo)
    slot = lm.pin("a3")
    for n in ("a0", "a1", "a2", "a4", "a0"):
        check_batch(lm, zoo, [n, "a3", None])
        assert resident(lm)["a3"] == slot
    assert lm.memory_report().adapters[3].pinned
    lm.pin("a4")
    with pytest.raises(RuntimeError, match="max_adapters=2"):   # both slots pinned, a0 has no room
        check_batch(lm, zoo, ["a0", None, None])
    lm.unpin("a3")
    check_batch(lm, zoo, ["a0", "a4", None])
    assert "a3" not in resident(lm)


def test_host_budget_drops_lru_adapters_and_rereads_them(zoo):
    base, paths, *_ = zoo
    reads = {n: 0 for n in paths}

    def source(name):
        def load():
            reads[name] += 1
            return read_adapter_dir(paths[name])
        return load

    size = adapter_bytes(paths["a2"])           # room for the largest adapter (a2, all-linear) only
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=16, host_budget_bytes=size)
    for n in paths:
        lm.load_adapter(n, source(n))
    rep = lm.memory_report()
    assert rep.host_bytes <= size and sum(a.in_host_memory for a in rep.adapters) < N_ADAPTERS
    assert [a.in_host_memory for a in rep.adapters][-1], "the adapter just loaded stays in host memory"
    before = dict(reads)
    for rows in (["a0", "a1", None], ["a2", None, "a3"], ["a4", "a0", "a4"]):
        check_batch(lm, zoo, rows)
    assert sum(reads.values()) > sum(before.values()), "dropped adapters are re-read from their source"
    assert lm.memory_report().host_bytes <= size
    print(lm.memory_report())


def test_memory_report_counts_bytes(zoo):
    lm = patched(zoo, max_adapters=3)
    rep = lm.memory_report()
    assert rep.device_bytes == 0 and rep.max_adapters == 3
    assert rep.adapters[0].nbytes == adapter_bytes(zoo[1]["a0"])
    check_batch(lm, zoo, ["a0", "a2", None])
    rep = lm.memory_report()
    # a2 is all-linear: every patched linear layer now has [3, 16, K] + [3, 16, N] float32 slots
    # (the input embedding, patched too, is targeted by neither: no buffers)
    linear = [ls for ls in lm.pool.layers.values() if ls.kind == "linear"]
    assert [ls.kind for ls in lm.pool.layers.values() if ls not in linear] == ["embedding"]
    want = sum(3 * 16 * (ls.in_features + ls.out_features) * 4 for ls in linear)
    assert rep.device_bytes == want
    assert rep.host_bytes == sum(a.nbytes for a in rep.adapters) == sum(a.host_bytes for a in rep.adapters)
    by = {a.name: a for a in rep.adapters}
    cfgs = {n: json.load(open(os.path.join(p, "adapter_config.json"))) for n, p in zoo[1].items()}
    for n, a in by.items():
        assert a.rank == cfgs[n]["r"] and a.dtype == torch.float32
    # a resident adapter's slot: [16, K] + [16, N] float32 in each layer it targets (rank padded)
    a0_layers = [name for name, ls in lm.pool.layers.items() if name in lm.pool._entries["a0"].fingerprint]
    assert by["a0"].device_bytes == sum(16 * (lm.pool.layers[n].in_features + lm.pool.layers[n].out_features) * 4
                                        for n in a0_layers) > 0
    assert by["a1"].device_bytes == 0 and by["a1"].slot is None
    assert rep.device_bytes_used == by["a0"].nbytes + by["a2"].nbytes < rep.device_bytes
    assert "a0" in str(rep) and "float32" in str(rep)


def test_unload_frees_the_slot_and_the_name(zoo):
    lm = patched(zoo)
    check_batch(lm, zoo, ["a0", "a1", None])
    lm.unload_adapter("a0")
    assert "a0" not in lm.adapters and "a0" not in resident(lm)
    with pytest.raises(KeyError, match="a0"):
        check_batch(lm, zoo, ["a0", None, None])
    lm.load_adapter("a0", zoo[1]["a0"])
    check_batch(lm, zoo, ["a0", "a1", "a0"])
