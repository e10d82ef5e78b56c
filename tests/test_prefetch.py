"""lm.prefetch: adapters read and copied in the background while other adapters are served.

Every served row is checked against PEFT with that row's adapter alone. The sources here count
their reads and sleep (0.5 s, as a slow disk or the Hub would), so "its first use reads nothing
from its source" and "serving does not wait for it" are observable facts, not timings of the
machine.
"""
import copy
import threading
import time

import pytest
import torch

import openlora_kernels as olk
from openlora_kernels.adapters import read_adapter_dir

from test_hf_concurrency import STABLE, check, mismatches, packed_budget, patched, zoo  # noqa: F401 (fixture)

SLOW = 0.5


class CountingSource:
    """A callable source (config, tensors) that sleeps, then reads a PEFT directory; counts calls."""

    def __init__(self, path, delay=SLOW, fail=None, gate=None):
        self.path, self.delay, self.fail, self.gate, self.reads = path, delay, fail, gate, 0
        self.started = threading.Event()

    def __call__(self):
        self.reads += 1
        self.started.set()
        time.sleep(self.delay)
        if self.gate is not None:
            assert self.gate.wait(60)
        if self.fail is not None:
            raise self.fail
        return read_adapter_dir(self.path)


def test_prefetch_returns_at_once_and_serving_goes_on(zoo):
    """While a new adapter's read runs in the background (0.5 s, then held until the forwards are
    done, so a forward that waited for it would hang here), ten forwards of resident adapters are
    served, right; the prefetched adapter's first use reads nothing more from its source."""
    base, paths, ids, mask, ref = zoo
    lm = patched(zoo, max_adapters=3)
    check(lm, zoo, ["s0", "s1", None])
    gate = threading.Event()
    src = CountingSource(paths["c0"], gate=gate)
    t0 = time.perf_counter()
    handle = lm.prefetch({"c0": src})
    assert time.perf_counter() - t0 < 0.25, "prefetch must return before its source is read"
    assert "c0" in lm.pool and not handle.done()
    assert src.started.wait(10)
    for _ in range(10):
        check(lm, zoo, ["s0", "s1", "s0"])
    assert not handle.done()
    gate.set()
    assert handle.wait(30) and handle.done()
    assert lm.pool.slot_of("c0") is not None, "a prefetched adapter is copied into a slot"
    check(lm, zoo, ["c0", "s1", None])
    assert src.reads == 1


def test_a_forward_that_needs_the_adapter_waits_for_it_alone(zoo):
    base, paths, ids, mask, ref = zoo
    lm = patched(zoo, max_adapters=3)
    check(lm, zoo, ["s0", None, None])
    src = CountingSource(paths["c1"])
    handle = lm.prefetch({"c1": src})
    t0 = time.perf_counter()
    check(lm, zoo, ["c1", "s0", None])           # waits for c1's read, then is right
    assert time.perf_counter() - t0 > SLOW / 2 and handle.wait(30)
    assert src.reads == 1


def test_a_failed_prefetch_changes_nothing_and_is_reported_at_next_use(zoo):
    base, paths, ids, mask, ref = zoo
    lm = patched(zoo, max_adapters=3)
    before = check(lm, zoo, ["s0", "s1", None]).clone()
    names = set(lm.adapters)
    report = str(lm.memory_report())
    handle = lm.prefetch({"bad": CountingSource(paths["c0"], delay=0.05, fail=OSError("disk on fire"))})
    assert handle.wait(30)
    assert set(lm.adapters) == names
    assert torch.equal(check(lm, zoo, ["s0", "s1", None]), before)
    with pytest.raises(RuntimeError, match=r"'bad': its prefetch failed \(OSError: disk on fire\)") as info:
        lm(input_ids=ids, attention_mask=mask, adapter_names=["bad", None, None])
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(KeyError, match="'bad' is not loaded"):          # reported once, then unknown
        lm(input_ids=ids, attention_mask=mask, adapter_names=["bad", None, None])
    assert str(lm.memory_report()) == report
    lm.load_adapter("bad", paths["c0"])                                 # the name is free again
    out = lm(input_ids=ids, attention_mask=mask, adapter_names=["bad", "s0", None]).logits
    assert not mismatches(out, zoo, ["c0", "s0", None])                  # "bad" holds c0's weights

    # a registered adapter whose re-read fails: unchanged, the error at its next use, then it works
    lm2 = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=16, host_budget_bytes=0)
    lm2.load_adapter("s0", paths["s0"])
    lm2.load_adapter("s1", paths["s1"])
    check(lm2, zoo, ["s0", None, None])
    good = lm2.pool._entries["s1"].source
    lm2.pool._entries["s1"].source = olk.adapters.CallableSource(
        CountingSource(paths["s1"], delay=0.01, fail=OSError("gone")))
    assert lm2.prefetch("s1").wait(30)
    with pytest.raises(RuntimeError, match="'s1': its prefetch failed.*unchanged"):
        lm2.pin("s1")
    lm2.pool._entries["s1"].source = good
    check(lm2, zoo, ["s1", "s0", None])


def test_prefetch_of_a_dropped_adapter_brings_it_back_without_a_read_at_use(zoo):
    base, paths, ids, mask, ref = zoo
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=16, host_budget_bytes=0)
    src = CountingSource(paths["s2"], delay=0.05)
    lm.load_adapter("s2", src)
    lm.load_adapter("s0", paths["s0"])
    check(lm, zoo, ["s0", None, None])
    lm.load_adapter("s1", paths["s1"])
    check(lm, zoo, ["s1", "s0", None])           # s2: dropped from host memory, not resident
    info = {a.name: a for a in lm.memory_report().adapters}["s2"]
    assert not info.in_host_memory and info.slot is None and src.reads == 1
    assert lm.prefetch(["s2"]).wait(30)
    assert src.reads == 2 and lm.pool.slot_of("s2") is not None
    check(lm, zoo, ["s2", None, "s2"])
    assert src.reads == 2


def test_prefetch_when_every_slot_is_held_keeps_it_in_host_memory(zoo):
    base, paths, ids, mask, ref = zoo
    lm = patched(zoo, max_adapters=2)
    lm.pin("s0"), lm.pin("s1")
    src = CountingSource(paths["c0"], delay=0.01)
    assert lm.prefetch({"c0": src}).wait(30)
    assert "c0" in lm.adapters and lm.pool.slot_of("c0") is None
    lm.unpin("s1")
    check(lm, zoo, ["c0", "s0", None])
    assert src.reads == 1


def test_prefetch_arguments(zoo):
    base, paths, *_ = zoo
    lm = patched(zoo)
    with pytest.raises(KeyError, match="'nope' is not loaded"):
        lm.prefetch(["nope"])
    with pytest.raises(ValueError, match="'s0' is already loaded"):
        lm.prefetch({"s0": paths["s0"]})
    with pytest.raises(TypeError, match="names"):
        lm.prefetch(3)
    with pytest.raises(TypeError, match="names: adapter names are strings"):
        lm.prefetch([3])
    assert set(lm.adapters) == set(STABLE)
    gate = threading.Event()
    handle = lm.prefetch({"p": lambda: (gate.wait(30), read_adapter_dir(paths["c0"]))[1]})
    with pytest.raises(ValueError, match="'p' is being prefetched"):
        lm.load_adapter("p", paths["c0"])
    with pytest.raises(ValueError, match="'p' is being prefetched"):
        lm.unload_adapter("p")
    gate.set()
    assert handle.wait(30) and "p" in lm.adapters


@pytest.mark.parametrize("pool", ["padded", "packed"])
def test_prefetch_races_with_serving(zoo, pool):
    """One thread prefetches, unloads and prefetches again two adapters (slow sources) while
    another serves batches that mix them with resident ones: every served row is right or the
    batch fails with the name unknown (it was unloaded at that moment), never wrong. (Five slots:
    a batch's three adapters plus the two a prefetch may be copying into at that moment.)"""
    base, paths, ids, mask, ref = zoo
    # packed: 30 rank rows per layer for ranks 2..16 (six adapters): prefetches evict by bytes
    lm = patched(zoo, max_adapters=5, **({"device_budget_bytes": packed_budget(base, 30)} if pool == "packed" else {}))
    stop = threading.Event()
    errors = []

    def churn():
        try:
            while not stop.is_set():
                handles = [lm.prefetch({n: CountingSource(paths[n], delay=0.02)}) for n in ("c0", "c1")]
                for h in handles:
                    h.wait(30)
                for n in ("c0", "c1"):
                    lm.unload_adapter(n)
        except BaseException as exc:          # noqa: BLE001 - reported below
            errors.append(repr(exc))

    t = threading.Thread(target=churn)
    t.start()
    served = 0
    deadline = time.perf_counter() + 4
    try:
        while time.perf_counter() < deadline:
            rows = [["c0", "s0", "c1"], ["s1", "c1", None], ["c0", None, "s2"]][served % 3]
            try:
                out = lm(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
            except KeyError as exc:
                assert "is not loaded" in str(exc) or "was unloaded while a batch" in str(exc), exc
                continue
            bad = mismatches(out, zoo, rows)
            assert not bad, bad
            served += 1
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    assert served > 0
