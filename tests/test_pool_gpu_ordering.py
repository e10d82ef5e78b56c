"""The pool's GPU stream ordering, checked without a GPU: torch.cuda's streams and events are
replaced by recording fakes, the layers by stand-ins on a "cuda" device that copy nothing.

What must hold (pool.py, "GPU ordering"): a copy into a slot waits for the loading thread's stream
AND for the events recorded when the leases that last read the slot ended (on whatever stream
they ran); a lease makes its stream wait for the copy of each of its slots. No host sync.
"""
import threading

import pytest
import torch

from openlora_kernels.adapters import AdapterWeights, ModuleLoRA
from openlora_kernels.pool import AdapterPool, HostLoRA

DEV = torch.device("cuda", 0)
log = []


class FakeStream:
    def __init__(self, device=DEV, name="side"):
        self.device, self.name = torch.device(device), name

    def wait_stream(self, other):
        log.append(("wait_stream", self.name, other.name))

    def wait_event(self, ev):
        log.append(("wait_event", self.name, ev.name))

    def __repr__(self):
        return f"FakeStream({self.name})"


class FakeEvent:
    count = 0

    def __init__(self):
        FakeEvent.count += 1
        self.name, self.stream = f"ev{FakeEvent.count}", None

    def record(self, stream=None):
        self.stream = stream or _current()
        log.append(("record", self.name, self.stream.name))

    def query(self):
        return False


_tls = threading.local()


def _current(device=None):
    return getattr(_tls, "stream", None) or _default


_default = FakeStream(name="default")


class _StreamCtx:
    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        self.prev = getattr(_tls, "stream", None)
        _tls.stream = self.stream

    def __exit__(self, *exc):
        _tls.stream = self.prev


class FakeLayer:
    """LayerSlots' interface, on a "cuda" device, without tensors on it."""

    def __init__(self, name):
        self.name, self.device, self.nbytes = name, DEV, 0
        self.ranks = {}

    def write(self, slot, w):
        log.append(("write", slot, None if w is None else w.rank))
        self.ranks[slot] = 0 if w is None else w.rank

    def publish(self, keep_alive):
        log.append(("publish", self.name))


@pytest.fixture
def pool(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream(device, "side"))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", _current)
    monkeypatch.setattr(torch.cuda, "stream", _StreamCtx)
    log.clear()
    layers = {"l0": FakeLayer("l0")}

    def read(source):
        r = source.load()
        return AdapterWeights({"l0": ModuleLoRA(torch.zeros(r, 4), torch.zeros(4, r), 1.0)}, {}, "fake")

    def bind(weights):
        m = weights.modules["l0"]
        return {"l0": HostLoRA(m.a, m.b.t().contiguous(), m.scaling)}

    class Src:
        def __init__(self, r):
            self.r = r

        def load(self):
            return self.r

    p = AdapterPool(layers, max_adapters=1, max_rank=8, bind=bind, read=read)
    p.register("A", Src(2))
    p.register("B", Src(3))
    return p


def test_a_copy_waits_for_the_last_readers_of_its_slot_on_every_stream(pool):
    x = FakeStream(name="X")
    y = FakeStream(name="Y")
    with _StreamCtx(x):
        lease = pool.lease(["A"])
    loaded = [e for e in log if e[0] != "publish"]
    # the copy: side waits for the loading stream, writes, records its ready event; X waits for it
    assert ("wait_stream", "side", "X") in loaded and ("write", 0, 2) in loaded
    ready = next(e[1] for e in loaded if e[0] == "record" and e[2] == "side")
    assert ("wait_event", "X", ready) in loaded
    assert loaded.index(("wait_stream", "side", "X")) < loaded.index(("write", 0, 2))

    log.clear()
    with _StreamCtx(x):
        lease.release()                                   # the forward on X ended: event on X
    reader = next(e[1] for e in log if e[0] == "record" and e[2] == "X")

    log.clear()
    with _StreamCtx(y):                                   # another thread, another stream
        lease_b = pool.lease(["B"])                       # evicts A from slot 0
    ops = [e for e in log if e[0] != "publish"]
    assert ("wait_event", "side", reader) in ops, ops     # waits for X's kernels that read slot 0
    assert ("wait_stream", "side", "Y") in ops
    first_write = next(i for i, e in enumerate(ops) if e[0] == "write")
    assert ops.index(("wait_event", "side", reader)) < first_write
    ready_b = next(e[1] for e in ops if e[0] == "record" and e[2] == "side")
    assert ("wait_event", "Y", ready_b) in ops
    lease_b.release()


def test_a_held_slot_is_never_written(pool):
    with pool.lease(["A"]):
        with pytest.raises(RuntimeError, match="no device slot can be freed"):
            pool.lease(["B"])
        assert not [e for e in log if e[0] == "write" and e[2] == 3]
    with pool.lease(["B"]) as lease:
        assert lease.slots == {"B": 0}


def test_lease_of_a_resident_adapter_on_another_stream_waits_for_its_copy(pool):
    with _StreamCtx(FakeStream(name="X")):
        pool.lease(["A"]).release()
    ready = next(e[1] for e in log if e[0] == "record" and e[2] == "side")
    log.clear()
    with _StreamCtx(FakeStream(name="Z")):
        pool.lease(["A"]).release()                       # no copy now, but Z must still wait for it
    assert ("wait_event", "Z", ready) in log and not [e for e in log if e[0] == "write"]
