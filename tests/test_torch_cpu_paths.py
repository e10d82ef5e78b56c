"""The torch backend's CPU strategies (padded batched GEMMs, per-slot segments) against float64.

Each strategy is forced in turn, on batches that exercise what the padded layout must get right:
segments of unequal length (padding rows that must be dropped), slots without rows (weights
gathered for the active slots only), rows without adapter (bit-for-bit untouched), ranks per slot
and per slice (NaN in the padding beyond a rank must not leak: the padded strategy falls back),
several output slices, strided x / y, and half precision.
"""
import pytest
import torch

import openlora_kernels as olk
from openlora_kernels.ops import torch_ref

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 2e-3), torch.bfloat16: (3e-2, 1.6e-2)}


def rows_reference(x, a_list, b_list, idx, scal, ranks):
    """float64 delta [T, N], one row at a time, from the op's definition."""
    T, R = x.shape[0], a_list[0].shape[1]
    cols = []
    for i, (A, B) in enumerate(zip(a_list, b_list)):
        out = torch.zeros(T, B.shape[1], dtype=torch.float64)
        for t, s in enumerate(idx.tolist()):
            if s < 0:
                continue
            r = R if ranks is None else int((ranks[i] if ranks.dim() == 2 else ranks)[s])
            out[t] = scal[s].double() * (B[s, :, :r].double() @ (A[s, :r].double() @ x[t].double()))
        cols.append(out)
    return torch.cat(cols, 1)


def problem(T, K, widths, S, R, *, dtype=torch.float32, ranks=None, idx=None, strided=False, poison=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    x = rnd(T, K + 5)[:, 2:2 + K] if strided else rnd(T, K)
    N = sum(widths)
    y = rnd(T, N + 3)[:, 1:1 + N] if strided else rnd(T, N)
    a = [rnd(S, R, K) / K ** 0.5 for _ in widths]
    b = [rnd(S, w, R) / R ** 0.5 for w in widths]
    if ranks == "mixed":
        ranks = torch.randint(0, R + 1, (S,), generator=g, dtype=torch.int32)
    elif ranks == "per_slice":
        ranks = torch.randint(0, R + 1, (len(widths), S), generator=g)
    if ranks is not None and poison:   # NaN in the padding: every strategy must ignore it
        for i in range(len(widths)):
            ri = ranks[i] if ranks.dim() == 2 else ranks
            for s in range(S):
                a[i][s, int(ri[s]):] = float("nan")
                b[i][s, :, int(ri[s]):] = float("nan")
    idx = idx if idx is not None else torch.randint(-1, S, (T,), generator=g)
    scal = torch.rand(S, generator=g) + 0.5
    return x, y, a, b, idx, scal, ranks


BATCHES = {
    # name: (T, S, index pattern)
    "decode_even": (32, 16, lambda T, S: torch.arange(T) % S),
    "skewed": (23, 5, lambda T, S: torch.tensor([0] * 12 + [1] * 3 + [3] * 5 + [-1] * 3)),
    "few_active": (9, 12, lambda T, S: torch.tensor([7, -1, 2, 7, 7, 2, -1, 11, 2])),
    "contiguous_subset": (10, 8, lambda T, S: torch.tensor([4, 3, 5, -1, 3, 3, 4, 5, 5, 4])),
    "one_row": (1, 4, lambda T, S: torch.tensor([3])),
}


@pytest.fixture(params=["padded", "segment"])
def strategy(request, monkeypatch):
    monkeypatch.setattr(torch_ref, "_cpu_strategy", lambda *a, **k: request.param)
    return request.param


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("ranks", [None, "mixed", "per_slice", "mixed_nan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_add_lora_matches_reference(strategy, batch, ranks, dtype):
    T, S, pattern = BATCHES[batch]
    x, y, a, b, idx, scal, rk = problem(T, 40, [24, 9], S, 8, dtype=dtype, ranks=ranks and ranks.replace("_nan", ""),
                                        idx=pattern(T, S), strided=batch == "skewed", poison=ranks == "mixed_nan")
    free = idx < 0
    y[free, 0], y[free, 1] = -0.0, float("nan")        # values an "add zero" would change
    y0 = y.clone()
    olk.add_lora(y, x, a, b, idx, scal, rk, backend="torch")
    want = y0.double() + rows_reference(x, a, b, idx, scal, rk)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y[~free].double(), want[~free], atol=atol, rtol=rtol)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(y[free].contiguous().view(bits), y0[free].contiguous().view(bits)), \
        "rows without adapter must be untouched bit for bit"


@pytest.mark.parametrize("batch", list(BATCHES))
def test_shrink_and_expand_halves(strategy, batch):
    T, S, pattern = BATCHES[batch]
    x, y, a, b, idx, scal, rk = problem(T, 33, [20, 8], S, 8, ranks="per_slice", idx=pattern(T, S), seed=3)
    h = olk.lora_shrink(x, a, idx, rk, backend="torch")
    for i in range(2):
        for t, s in enumerate(idx.tolist()):
            r = int(rk[i, s]) if s >= 0 else 0
            assert torch.equal(h[i, t, r:], torch.zeros_like(h[i, t, r:])), "h must be 0 beyond the rank / for -1 rows"
            if r:
                torch.testing.assert_close(h[i, t, :r].double(), a[i][s, :r].double() @ x[t].double(), atol=2e-5, rtol=2e-5)
    y0 = y.clone()
    olk.lora_expand(y, h, b, idx, scal, rk, backend="torch")
    torch.testing.assert_close(y.double(), y0.double() + rows_reference(x, a, b, idx, scal, rk), atol=2e-5, rtol=2e-5)


def test_padded_layout_is_built_once_per_metadata(monkeypatch):
    monkeypatch.setattr(torch_ref, "_cpu_strategy", lambda *a, **k: "padded")
    x, y, a, b, idx, scal, _ = problem(12, 16, [16], 4, 4, idx=torch.tensor([0, 1, 2, 3] * 3))
    meta = olk.build_batch_meta(idx, 4)
    calls = []
    real = meta.memo
    monkeypatch.setattr(meta.__class__, "memo", lambda self, k, f: real(k, lambda: calls.append(k) or f()))
    for _ in range(3):
        olk.add_lora(y, x, a[0], b[0], meta, scal, backend="torch")
    assert calls.count("torch_ref.padded_rows") == 1


def test_cost_model_picks_padded_for_decode_and_segments_for_one_long_prefill():
    decode = olk.build_batch_meta(torch.arange(32) % 16, 16)
    assert torch_ref._cpu_strategy(decode, 16, 256, 256) == "padded"
    prefill = olk.build_batch_meta(torch.tensor([0] * 4000 + list(range(1, 16))), 16)
    assert torch_ref._cpu_strategy(prefill, 16, 256, 256) == "segment"


def test_rows_already_grouped_by_slot_skip_the_gather(monkeypatch):
    """Serving stacks often sort rows by adapter: then the padded layout is the row order."""
    monkeypatch.setattr(torch_ref, "_cpu_strategy", lambda *a, **k: "padded")
    idx = torch.tensor([0, 0, 1, 1, 2, 2])
    x, y, a, b, _, scal, _ = problem(6, 16, [12], 3, 4, idx=idx)
    meta = olk.build_batch_meta(idx, 3)
    assert torch_ref._padded_rows(meta).identity
    y0 = y.clone()
    olk.add_lora(y, x, a[0], b[0], meta, scal, backend="torch")
    torch.testing.assert_close(y.double(), y0.double() + rows_reference(x, a, b, idx, scal, None), atol=2e-5, rtol=2e-5)
    h = olk.lora_shrink(x, a[0], meta, backend="torch")
    h0 = h.clone()
    y1 = y0.clone()
    olk.lora_expand(y1, h, b[0], meta, scal, backend="torch")
    assert torch.equal(h, h0), "lora_expand must not modify h"
    torch.testing.assert_close(y1, y)


@pytest.mark.parametrize("h_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", ["skewed", "few_active"])
def test_expand_takes_a_half_precision_h_on_every_strategy(strategy, batch, h_dtype):
    """lora_expand accepts an fp16 / bf16 h (the contract); the segment strategy used to multiply
    it with fp32 weights and raise a dtype mismatch."""
    T, S, pattern = BATCHES[batch]
    x, y, a, b, idx, scal, rk = problem(T, 24, [12, 5], S, 8, ranks="mixed", idx=pattern(T, S), poison=False, seed=5)
    h = torch.randn(2, T, 8, generator=torch.Generator().manual_seed(6)).to(h_dtype)
    got = olk.lora_expand(y.clone(), h, b, idx, scal, rk, backend="torch")
    want = y.double().clone()
    for t, s in enumerate(idx.tolist()):
        if s < 0:
            continue
        r, col = int(rk[s]), 0
        for i, B in enumerate(b):
            want[t, col:col + B.shape[1]] += scal[s].double() * (B[s, :, :r].double() @ h[i, t, :r].double())
            col += B.shape[1]
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
