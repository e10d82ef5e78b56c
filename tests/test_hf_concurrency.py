"""Serving while adapters come and go: a forward holds its adapters until its last layer has run,
batch state belongs to one call, and reading an adapter never stalls serving the others.

Every served row is checked against PEFT run with that row's adapter alone, so an adapter evicted
or overwritten mid-forward, or a batch served with another thread's slots, is a wrong number.
"""
import copy
import os
import random
import threading
import time

import pytest
import torch

import openlora_kernels as olk
from openlora_kernels.adapters import CallableSource, read_adapter_dir

from hf_models import ATOL, RTOL, left_padded_batch, make_model, peft_model, save_adapter

RACE_SECONDS = float(os.environ.get("OPENLORA_RACE_SECONDS", "10"))
STABLE = ["s0", "s1", "s2", "s3"]      # never unloaded by the churn thread (but evicted, pinned, acquired)
CHURN = ["c0", "c1"]                   # unloaded and loaded again under the same name, same weights


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from peft import LoraConfig

    base = make_model("llama")
    root = tmp_path_factory.mktemp("concurrency")
    targets = [["q_proj", "v_proj"], ["down_proj", "up_proj"], "all-linear", ["k_proj", "o_proj"],
               ["gate_proj", "q_proj"], "all-linear"]
    paths = {}
    for i, name in enumerate(STABLE + CHURN):
        cfg = LoraConfig(r=[2, 16, 4, 8, 6, 12][i], lora_alpha=8, target_modules=targets[i], init_lora_weights=False)
        paths[name] = save_adapter(base, cfg, str(root / name), seed=40 + i)
    ids, mask = left_padded_batch([6, 4, 5], seed=3)
    with torch.no_grad():
        ref = {n: peft_model(base, p)(input_ids=ids, attention_mask=mask).logits for n, p in paths.items()}
        ref[None] = base(input_ids=ids, attention_mask=mask).logits
    return base, paths, ids, mask, ref


def mismatches(out, zoo, rows):
    """Rows of ``out`` that differ from PEFT with the row's adapter alone (list of messages)."""
    _, _, _, mask, ref = zoo
    bad = []
    for i, name in enumerate(rows):
        keep = mask[i].bool()
        if not torch.allclose(out[i][keep], ref[name][i][keep], atol=ATOL, rtol=RTOL):
            err = (out[i][keep] - ref[name][i][keep]).abs().max().item()
            bad.append(f"rows {rows}: row {i} ({name}) differs from PEFT by {err:.3g}")
    return bad


def check(lm, zoo, rows):
    _, _, ids, mask, _ = zoo
    out = lm(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
    assert not mismatches(out, zoo, rows)
    return out


def patched(zoo, backend="auto", **kw):
    base, paths, *_ = zoo
    lm = olk.patch_model(copy.deepcopy(base), backend=backend, **{"max_adapters": 3, "max_rank": 16, **kw})
    for n in STABLE:
        lm.load_adapter(n, paths[n])
    return lm


def packed_budget(base, rows: int) -> int:
    """device_budget_bytes giving every patched layer of ``base`` ``rows`` packed rank rows."""
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=1, max_rank=1)
    return rows * sum((ls.in_features + ls.out_features) * max(ls.experts, 1) * ls.dtype.itemsize
                      for ls in lm._layers.values())


FULL = ("no device slot can be freed", "does not fit: every resident adapter")   # padded / packed pool


def backends():
    out = ["torch"]
    if olk.available_backends("cpu")["cpu"].usable:
        out.append("cpu")
    return out


# ------------------------------------------------------------------ inside one forward (deterministic)


def test_pool_changes_between_two_layers_of_a_forward_spare_its_adapters(zoo):
    """A hook on layer 0 (standing in for another thread) pins two more adapters while the batch
    holds two of the three slots: the first takes the free slot, the second finds none (the batch's
    adapters are held) and fails cleanly; the batch's rows stay right."""
    base, paths, *_ = zoo
    lm = patched(zoo)
    check(lm, zoo, ["s2", None, None])                  # s2 resident, then idle: evictable
    for n in CHURN:
        lm.load_adapter(n, paths[n])
    seen = []

    def meddle(module, args, output):
        lm.pin("c0")                                     # evicts s2, not s0 / s1
        with pytest.raises(RuntimeError, match="no device slot can be freed"):
            lm.pin("c1")
        with pytest.raises(RuntimeError, match="no device slot can be freed"):
            lm.load_adapter("late", paths["s3"], pin=True)
        seen.append(lm.pool.slot_of("s0") is not None and lm.pool.slot_of("s1") is not None)

    hook = lm.model.model.layers[0].register_forward_hook(meddle)
    try:
        check(lm, zoo, ["s0", "s1", "s0"])
    finally:
        hook.remove()
    assert seen == [True]
    assert "late" not in lm.adapters and lm.pool.slot_of("c0") is not None
    assert lm.pool.slot_of("s2") is None
    check(lm, zoo, ["c0", "s2", None])                   # s2 comes back into a slot the batch freed


def test_unload_during_a_forward_retires_the_adapter_after_it(zoo):
    base, paths, *_ = zoo
    lm = patched(zoo)
    check(lm, zoo, ["s1", None, None])
    slot = lm.pool.slot_of("s1")

    def meddle(module, args, output):
        lm.unload_adapter("s1")                          # the forward keeps it until its last layer
        assert "s1" not in lm.adapters
        lm.load_adapter("s1", paths["s3"])               # the name is free again at once (other weights)

    hook = lm.model.model.layers[0].register_forward_hook(meddle)
    try:
        check(lm, zoo, ["s1", "s0", None])
    finally:
        hook.remove()
    rep = {a.name: a for a in lm.memory_report().adapters}
    assert rep["s1"].slot is None and rep["s0"].leases == 0
    assert slot not in [a.slot for a in rep.values()]     # the retired adapter's slot was freed
    out = lm(input_ids=zoo[2], attention_mask=zoo[3], adapter_names=["s1", None, None]).logits
    assert not mismatches(out, zoo, ["s3", None, None])  # the new "s1" is s3's weights


def test_acquired_and_leased_counts(zoo):
    lm = patched(zoo)
    a = lm.acquire(["s0"])
    b = lm.acquire(["s0", "s1"])
    assert a["s0"] == b["s0"]
    lm.release(["s0"])
    rep = {x.name: x for x in lm.memory_report().adapters}
    assert rep["s0"].acquired == 1 and rep["s1"].acquired == 1
    with pytest.raises(RuntimeError, match="release"):
        lm.unload_adapter("s0")
    with lm.batch(["s2", "s2", None]):                   # set_batch(names) leases, clear_batch ends it
        assert {x.name: x.leases for x in lm.memory_report().adapters}["s2"] == 1
        lm.release()                                     # drops the acquires, not set_batch's lease
        assert {x.name: x.leases for x in lm.memory_report().adapters}["s2"] == 1
    assert all(x.leases == 0 and x.acquired == 0 for x in lm.memory_report().adapters)
    with pytest.raises(KeyError, match="nope"):
        lm.release(["nope"])


# ------------------------------------------------------------------ two threads, for real


@pytest.mark.parametrize("pool", ["padded", "packed"])
@pytest.mark.parametrize("backend", backends())
def test_serving_thread_beside_a_thread_that_changes_the_pool(zoo, backend, pool):
    """>= RACE_SECONDS of mixed batches (more adapters than slots) on one thread while another
    loads, pins, unpins, unloads, acquires and releases, with a host budget that makes adapters be
    re-read from their sources meanwhile. Every served row must equal PEFT. The packed pool (24
    rank rows per layer for ranks 2..16) evicts by bytes and compacts layers meanwhile."""
    base, paths, ids, mask, ref = zoo
    reads = {n: 0 for n in paths}

    def source(name):
        def load():
            reads[name] += 1
            time.sleep(0.002)                          # a slow source: serving must not wait for it
            return read_adapter_dir(paths[name])
        return load

    budget = sum(os.path.getsize(os.path.join(paths[n], "adapter_model.safetensors")) for n in ("s0", "s1"))
    extra = {"device_budget_bytes": packed_budget(base, 24)} if pool == "packed" else {}
    lm = olk.patch_model(copy.deepcopy(base), backend=backend, max_adapters=4, max_rank=16, host_budget_bytes=budget,
                         **extra)
    compactions = []
    if pool == "packed":
        write = lm.pool._write_packed

        def counting(slot, host, offs, moves, movers):
            compactions.append(sum(len(m) for m in moves.values()))
            return write(slot, host, offs, moves, movers)
        lm.pool._write_packed = counting
    for n in STABLE:
        lm.load_adapter(n, source(n))
    stop = threading.Event()
    errors, served, refused, changes = [], {"rows": 0, "churn": 0}, [], {}
    names = STABLE + CHURN

    def serve():
        rng = random.Random(1)
        while not stop.is_set():
            picks = rng.sample(names, 2)
            rows = [rng.choice(picks + [None]) for _ in range(3)]
            try:
                out = lm(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
            except KeyError as e:                     # a churn adapter unloaded just now
                assert any(c in str(e) for c in CHURN), e
                refused.append("unloaded")
                continue
            except RuntimeError as e:                 # every slot pinned / acquired / held
                assert any(m in str(e) for m in FULL), e
                refused.append("full")
                continue
            bad = mismatches(out, zoo, rows)
            if bad:
                errors.extend(bad)
                stop.set()
            served["rows"] += 1
            served["churn"] += any(r in CHURN for r in rows)

    def churn():
        rng = random.Random(2)
        pinned, acquired = None, None
        while not stop.is_set():
            op = rng.choice(["load", "unload", "pin", "unpin", "acquire", "release"])
            changes[op] = changes.get(op, 0) + 1
            try:
                if op == "load":
                    n = rng.choice(CHURN)
                    if n not in lm.adapters:
                        lm.load_adapter(n, source(n), pin=rng.random() < 0.3 and pinned is None)
                        if lm.memory_report().adapters[-1].pinned:
                            pinned = n
                elif op == "unload":
                    n = rng.choice(CHURN)
                    if n in lm.adapters and n != acquired:
                        lm.unload_adapter(n)
                        pinned = None if pinned == n else pinned
                elif op == "pin" and pinned is None:
                    n = rng.choice(STABLE)
                    lm.pin(n)
                    pinned = n
                elif op == "unpin" and pinned is not None:
                    lm.unpin(pinned)
                    pinned = None
                elif op == "acquire" and acquired is None:
                    n = rng.choice(STABLE)
                    lm.acquire([n])
                    acquired = n
                elif op == "release" and acquired is not None:
                    lm.release([acquired])
                    acquired = None
            except RuntimeError as e:
                assert any(m in str(e) for m in FULL), e
            except ValueError as e:
                assert "already loaded" in str(e), e
            time.sleep(rng.random() * 0.002)

    threads = [threading.Thread(target=serve, name="serve"), threading.Thread(target=churn, name="churn")]
    for t in threads:
        t.start()
    time.sleep(RACE_SECONDS)
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors[:5]
    assert served["rows"] >= 100 and served["churn"] >= 20, (served, refused)
    assert sum(changes.values()) >= 200 and all(changes.get(op, 0) > 10 for op in ("load", "unload", "pin")), changes
    assert sum(reads.values()) > len(STABLE) + 5, "adapters were re-read from their sources during the race"
    rep = lm.memory_report()
    assert all(a.leases == 0 for a in rep.adapters), "a lease outlived its forward"
    if pool == "packed":
        assert sum(1 for c in compactions if c) >= 3, f"too few compactions during the race: {compactions[:20]}"
        for ls in lm._layers.values():       # the allocator's runs stay in the buffer, disjoint
            spans = sorted(ls.extents.values())
            assert all(o >= 0 and o + n <= ls.capacity for o, n in spans)
            assert all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    lm.release()
    for n in list(lm.adapters):
        lm.unpin(n)
    check(lm, zoo, ["s0", "s1", None])
    check(lm, zoo, ["s2", "s3", "s2"])


def test_two_threads_calling_the_model_at_once(zoo):
    """Per-call batch state: concurrent calls with different adapters are both right, and nothing
    stays behind (the plain model and lm(ids) are the base model, bit for bit)."""
    base, paths, ids, mask, ref = zoo
    lm = patched(zoo, max_adapters=4)
    plans = [["s0", "s1", None], [None, "s2", "s3"], ["s3", "s3", "s0"], ["s1", None, "s2"]]
    errors, done = [], []
    start = threading.Barrier(2)

    def worker(k):
        rng = random.Random(k)
        start.wait()
        for _ in range(40):
            rows = rng.choice(plans)
            try:
                out = (lm(input_ids=ids, attention_mask=mask, adapter_names=rows).logits if rng.random() < 0.8 else
                       lm.generate(input_ids=ids, attention_mask=mask, adapter_names=rows, max_new_tokens=2,
                                   do_sample=False, pad_token_id=0, output_logits=True,
                                   return_dict_in_generate=True).logits[0][:, None])
            except Exception as e:        # noqa: BLE001 - reported below
                errors.append(repr(e))
                return
            if out.shape[1] == ids.shape[1]:
                errors.extend(mismatches(out, zoo, rows))
            else:                          # generate: its first step's logits are the last position's
                for i, n in enumerate(rows):
                    if not torch.allclose(out[i, 0], ref[n][i, -1], atol=ATOL, rtol=RTOL):
                        errors.append(f"generate row {i} ({n})")
            done.append(k)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:5]
    assert len(done) == 80
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(lm.model(input_ids=ids, attention_mask=mask).logits, want)
    assert torch.equal(lm(input_ids=ids, attention_mask=mask).logits, want)
    assert all(a.leases == 0 for a in lm.memory_report().adapters)


def test_set_batch_belongs_to_its_thread(zoo):
    """A forward in another thread without a batch of its own refuses to guess; with its own
    adapter_names it is served normally; after clear_batch the other thread gets the base model."""
    base, paths, ids, mask, ref = zoo
    lm = patched(zoo)
    x = ids[:1]
    slot = lm.acquire(["s0"])["s0"]
    lm.set_batch(torch.full((x.numel(),), slot))
    seen = {}

    def other():
        try:
            lm(input_ids=x)
        except RuntimeError as e:
            seen["plain"] = str(e)
        out = lm(input_ids=ids, attention_mask=mask, adapter_names=["s2", None, "s1"]).logits
        seen["own"] = mismatches(out, zoo, ["s2", None, "s1"])

    t = threading.Thread(target=other, name="other-thread")
    t.start()
    t.join(60)
    assert "set_batch" in seen["plain"] and "MainThread" in seen["plain"] and "other-thread" in seen["plain"]
    assert seen["own"] == []
    with torch.no_grad():
        mine = lm.model(input_ids=x).logits            # this thread: the batch it set
        lm.clear_batch()
        lm.release()
        with_s0 = lm(input_ids=x, adapter_names=["s0"]).logits
        assert torch.equal(mine, with_s0)
        t = threading.Thread(target=lambda: seen.__setitem__("after", lm.model(input_ids=x).logits))
        t.start()
        t.join(60)
        assert torch.equal(seen["after"], base(input_ids=x).logits)


def test_a_slow_source_does_not_stall_serving(zoo):
    """load_adapter reading from a source that blocks, and a re-read of a dropped adapter that
    blocks, while another thread serves resident adapters: serving goes on."""
    base, paths, ids, mask, ref = zoo
    gate = threading.Event()

    def blocking(name):
        def load():
            gate.wait(30)
            return read_adapter_dir(paths[name])
        return load

    lm = patched(zoo, max_adapters=3)
    check(lm, zoo, ["s0", "s1", None])
    loader = threading.Thread(target=lambda: lm.load_adapter("c0", blocking("c0")))
    loader.start()
    time.sleep(0.1)                                    # the loader is inside the source now
    t0 = time.perf_counter()
    for _ in range(3):
        check(lm, zoo, ["s0", "s1", "s0"])
    assert time.perf_counter() - t0 < 20
    assert loader.is_alive() and "c0" not in lm.adapters
    gate.set()
    loader.join(30)
    check(lm, zoo, ["c0", "s1", None])

    # a dropped adapter being re-read (host budget 0) does not block the resident ones either
    gate.clear()
    lm2 = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=16, host_budget_bytes=0)
    lm2.load_adapter("s0", paths["s0"])
    lm2.load_adapter("c1", paths["c1"])                 # registered, then dropped from host memory
    check(lm2, zoo, ["s0", None, None])
    assert not {a.name: a for a in lm2.memory_report().adapters}["c1"].in_host_memory
    lm2.pool._entries["c1"].source = CallableSource(blocking("c1"))   # its next read blocks
    got = []
    rereader = threading.Thread(target=lambda: got.append(
        mismatches(lm2(input_ids=ids, attention_mask=mask, adapter_names=["c1", None, None]).logits,
                   zoo, ["c1", None, None])))
    rereader.start()
    time.sleep(0.1)
    for _ in range(3):
        check(lm2, zoo, ["s0", None, "s0"])
    assert rereader.is_alive()
    gate.set()
    rereader.join(30)
    assert got == [[]]
