"""PunicaWrapperOpenLoRA (openlora_kernels.integrations.vllm) against vLLM's own PunicaWrapperCPU.

Both wrappers get the same LoRAMapping and the same weights in vLLM's layout (A [S, 1, r, K], B
[S, 1, N, r], ranks zero-padded to max_lora_rank, LoRA ids that are not slot numbers, empty slots),
every method runs on both, and ours must agree with vLLM's within a per-dtype tolerance, with a
float64 reference too, and leave rows with LoRA id 0, columns outside the slices and the vocabulary
padding bit-for-bit as they were (poisoned with NaN, inf, -0.0 and large values beforehand).

vLLM's wheel is installed without its dependencies (``pip install --no-deps vllm==0.33.0``): its
punica modules import beside torch CPU with VLLM_TARGET_DEVICE=cpu; vllm.lora.layers and
vllm.config do not (cbor2, msgspec missing), so a stand-in mapping with LoRAMapping's fields is used.
Without vLLM these tests skip, except in CI (CI set), where they fail.
"""
import importlib
import math
import os
import random
import subprocess
import sys
import zlib
from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import openlora_kernels as olk
from openlora_kernels.metadata import BLOCK_M_CHOICES

from lora_reference import TOL

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# vLLM's CPU wrapper rounds the rank-r intermediate to the output dtype, computes the delta in it
# and rounds the sum again; ours rounds once from fp32. Two independent roundings of O(1) values:
# the agreement bound is the sum of both error budgets, twice the contract's TOL.
TOL_VLLM = {dt: {k: 2 * v for k, v in tol.items()} for dt, tol in TOL.items()}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CPU_BACKENDS = ["torch"] + (["cpu"] if olk.available_backends("cpu")["cpu"].usable else [])

Mapping = namedtuple("Mapping", "index_mapping prompt_mapping is_prefill")   # vllm.lora.layers.LoRAMapping's fields

# Fresh random inputs every run; a failure names the run's seed (rerun with OPENLORA_TEST_SEED=<seed>).
RUN_SEED = int(os.environ.get("OPENLORA_TEST_SEED") or random.SystemRandom().randrange(2 ** 31))


def gen(n):
    """A torch generator for this run and call site ``n``."""
    return torch.Generator().manual_seed(RUN_SEED + n)


@pytest.fixture(scope="module")
def V():
    """vLLM's CPU wrapper and our module (imported once; skip without vLLM, except in CI)."""
    try:
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"vLLM must be installed in CI (pip install --no-deps vllm==0.33.0): {e}")
        pytest.skip(f"vLLM is not installed: {e}")
    ours = importlib.import_module("openlora_kernels.integrations.vllm")
    return namedtuple("V", "cpu ours")(PunicaWrapperCPU, ours)


# ------------------------------------------------------------------------------------ cases


class Case:
    """A batch: vLLM LoRA ids per request, slots (lora_index_to_id with empty slots and ids that are
    not slot numbers), the mapping, and each row's slot (-1 for id 0)."""

    def __init__(self, mode, S, seed, spec=0, n_req=None):
        g = random.Random(RUN_SEED + seed)
        self.S = S
        ids = g.sample(range(3, 200), S)
        empty = set(g.sample(range(1, S), k=S // 3)) if S > 1 else set()
        self.lora_index_to_id = [None if i in empty else ids[i] for i in range(S)]
        active = [i for i in self.lora_index_to_id if i is not None]
        n_req = n_req or (9 if mode == "decode" else 5)
        req = [g.choice(active + [0]) for _ in range(n_req)]
        req[0], req[-1] = 0, active[-1]                         # rows without LoRA and with
        lens = [1] * n_req if mode == "decode" else [g.randint(1, 9) for _ in range(n_req)]
        tok = tuple(r for r, n in zip(req, lens) for _ in range(n))
        prm = tuple(r for r in req for _ in range(spec + 1))      # speculative decoding: spec + 1 per request
        # vLLM v1 always says is_prefill=True; False here makes vLLM's CPU wrapper take its bgmv path
        self.mapping = Mapping(tok, prm, mode != "decode")
        slot = {lid: i for i, lid in enumerate(self.lora_index_to_id) if lid is not None}
        self.tok_slots = [slot[r] if r > 0 else -1 for r in tok]
        self.smp_slots = [slot[r] if r > 0 else -1 for r in prm]
        self.T, self.Ts = len(tok), len(prm)
        self.ranks = None

    def wrappers(self, V, backend, vocab=64, cap=256):
        theirs = V.cpu(cap, 32, "cpu")
        ours = V.ours.PunicaWrapperOpenLoRA(cap, max_batches=32, device="cpu", backend=backend)
        for w in (theirs, ours):
            w.update_metadata(self.mapping, self.lora_index_to_id, self.S + 1, vocab)
        return theirs, ours

    def slot_ranks(self, R, seed):
        """Each slot's true rank: some below max_lora_rank R, R for one, 0 for empty slots."""
        g = random.Random(RUN_SEED + seed)
        r = [g.randint(1, R) if lid is not None else 0 for lid in self.lora_index_to_id]
        full = [i for i, lid in enumerate(self.lora_index_to_id) if lid is not None]
        r[full[0]] = R
        return r


def rnd(g, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def vllm_weights(g, S, R, K, widths, ranks, dtype):
    """vLLM's stacked weights, zero beyond each slot's rank (what its set_lora leaves)."""
    A, B = [], []
    for n in widths:
        a = torch.zeros(S, 1, R, K, dtype=dtype)
        b = torch.zeros(S, 1, n, R, dtype=dtype)
        for s, r in enumerate(ranks):
            if r:
                a[s, 0, :r] = rnd(g, r, K, scale=K ** -0.5, dtype=dtype)
                b[s, 0, :, :r] = rnd(g, n, r, scale=r ** -0.5, dtype=dtype)
        A.append(a)
        B.append(b)
    return tuple(A), tuple(B)


POISON = torch.tensor([float("nan"), float("inf"), -0.0, -float("inf"), 3.0e4, 0.0])


def poisoned(g, T, N, rows_without_lora, dtype, cols=None):
    """Random O(1) y; rows without LoRA (and, given ``cols``, every column outside it) hold
    NaN/inf/-0.0/large values, which a kernel writing there would be unlikely to keep."""
    y = rnd(g, T, N, dtype=dtype)
    pz = POISON.to(dtype)
    for t in rows_without_lora:
        y[t] = pz[torch.arange(N) % len(pz)]
    if cols is not None:
        mask = torch.ones(N, dtype=torch.bool)
        mask[cols] = False
        y[:, mask] = pz[torch.arange(int(mask.sum())) % len(pz)]
    return y


def same_bits(a, b):
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def assert_close(got, want, tol, what):
    got64, want64 = got.double(), want.double()
    assert not torch.isnan(got64).any(), f"{what}: NaN"
    err = (got64 - want64).abs()
    bound = tol["atol"] + tol["rtol"] * want64.abs()
    if (err > bound).any():
        i = int(torch.argmax(err - bound))
        raise AssertionError(f"{what}: {int((err > bound).sum())} of {err.numel()} off, worst got "
                             f"{got64.flatten()[i]:.6g} want {want64.flatten()[i]:.6g} (tol {tol}; "
                             f"OPENLORA_TEST_SEED={RUN_SEED})")


def check_rows(out, before, theirs, ref, lora_rows, cols, dtype, what, tol_dtype=None):
    """Rows with LoRA, within ``cols``: close to vLLM's and to the float64 reference; everything
    else bit-for-bit as before."""
    T, N = out.shape
    keep_rows = [t for t in range(T) if t not in set(lora_rows)]
    colmask = torch.zeros(N, dtype=torch.bool)
    colmask[cols] = True
    if keep_rows:
        assert same_bits(out[keep_rows], before[keep_rows]), f"{what}: a row without LoRA was written (seed {RUN_SEED})"
    if (~colmask).any():
        assert same_bits(out[:, ~colmask], before[:, ~colmask]), \
            f"{what}: a column outside the slices was written (seed {RUN_SEED})"
    if lora_rows:
        r, c = torch.tensor(lora_rows), colmask.nonzero().squeeze(1)
        td = tol_dtype or dtype
        assert_close(out[r][:, c], theirs[r][:, c], TOL_VLLM[td], f"{what} vs vLLM")
        assert_close(out[r][:, c], ref[r][:, c], TOL[td], f"{what} vs float64")


def ref_delta(x, A, B, slots, scale=1.0):
    """float64 y delta [T, sum N_i]: scale * (x @ A_i[s]^T) @ B_i[s]^T per row, 0 for slot -1."""
    T = x.shape[0]
    cols = []
    for a, b in zip(A, B):
        out = torch.zeros(T, b.shape[2], dtype=torch.float64)
        for t, s in enumerate(slots):
            if s >= 0:
                out[t] = b[s, 0].double() @ (scale * (a[s, 0].double() @ x[t].double()))
        cols.append(out)
    return torch.cat(cols, dim=1)


def lora_rows(slots):
    return [t for t, s in enumerate(slots) if s >= 0]


# ------------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("mode,spec,S", [("decode", 0, 1), ("decode", 0, 5), ("prefill", 0, 3),
                                          ("prefill", 2, 8), ("decode", 3, 4)])
def test_update_metadata_fills_vllms_buffers_and_our_metadata(V, mode, spec, S):
    case = Case(mode, S, seed=S * 7 + spec, spec=spec)
    theirs, ours = case.wrappers(V, "torch", vocab=1000)
    assert ours.indices_len == theirs.indices_len == [case.T, case.Ts, case.Ts, case.T]
    for name in ("token_lora_indices", "sampler_indices", "sampler_indices_padded"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    T = case.T
    assert torch.equal(ours._embeddings_indices[:T], theirs._embeddings_indices[:T])
    assert ours.is_prefill == theirs.is_prefill and ours.no_lora is False
    for kind, slots in (("tok", case.tok_slots), ("smp", case.smp_slots)):
        m = ours._meta(kind, len(slots), S)
        want = olk.build_batch_meta(torch.tensor(slots, dtype=torch.int32), S)
        for f in ("token_slots", "sorted_tokens", "seg_info", "tile_info"):
            assert torch.equal(getattr(m, f), getattr(want, f)), (kind, f)
        assert (m.num_slots, m.block_m) == (want.num_slots, want.block_m)
    # a smaller batch next: the slot buffers hold -1 past it (rows a CUDA graph pads stay untouched)
    small = Case("decode", S, seed=99, n_req=2)
    ours.update_metadata(small.mapping, small.lora_index_to_id, S + 1, 1000)
    assert ours._slots["tok"][:2].tolist() == small.tok_slots
    assert bool((ours._slots["tok"][2:] == -1).all()) and bool((ours._slots["smp"][2:] == -1).all())


def test_update_metadata_without_lora_rows_and_a_prompt_mapping_like_vllms(V):
    m = Mapping((0, 0, 0), (0,), True)
    theirs, ours = V.cpu(16, 4, "cpu"), V.ours.PunicaWrapperOpenLoRA(16, 4, "cpu", backend="torch")
    for w in (theirs, ours):
        w.update_metadata(m, [None, 4], 3, 10)
    assert ours.no_lora and torch.equal(ours.sampler_indices_padded, theirs.sampler_indices_padded)
    assert ours.prefill_metadata[3:] == theirs.prefill_metadata[3:]     # vLLM's own sgmv fields, on demand


def test_host_batch_meta_equals_build_batch_meta(V):
    g = np.random.default_rng(3)
    for trial in range(300):
        T, S = int(g.integers(0, 70)), int(g.integers(1, 10))
        bm = int(g.choice(BLOCK_M_CHOICES)) if trial % 3 else olk.choose_block_m(T, S)
        slots = g.integers(-1, S, T).astype(np.int32)
        if trial % 7 == 0:
            slots[:] = -1
        got = V.ours.host_batch_meta(slots, S, bm)
        want = olk.build_batch_meta(torch.from_numpy(slots.copy()), S, block_m=bm)
        for f in ("token_slots", "sorted_tokens", "seg_info", "tile_info"):
            a, b = getattr(got, f), getattr(want, f)
            assert a.dtype == b.dtype and torch.equal(a, b), (T, S, bm, f)
        assert (got.num_slots, got.block_m) == (want.num_slots, want.block_m)


# --------------------------------------------------------------------------- add_lora_linear


WIDTHS = {1: (40,), 2: (24, 40), 3: (48, 16, 24)}        # unequal slice widths (GQA QKV-like)


def _linear_case(V, backend, dtype, mode, n_slices, seed, S, K=64, R=8):
    case = Case(mode, S, seed)
    g = gen(seed)
    A, B = vllm_weights(g, S, R, K, WIDTHS[n_slices], case.slot_ranks(R, seed), dtype)
    x = rnd(g, case.T, K, dtype=dtype)
    y0 = poisoned(g, case.T, sum(WIDTHS[n_slices]), [t for t, s in enumerate(case.tok_slots) if s < 0], dtype)
    theirs, ours = case.wrappers(V, backend)
    return case, A, B, x, y0, theirs, ours


@pytest.mark.parametrize("n_slices", [1, 2, 3])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_add_lora_linear_matches_vllm(V, backend, dtype, mode, n_slices):
    seed = zlib.crc32(f"{backend}-{dtype}-{mode}-{n_slices}".encode()) % 1000
    S = [1, 3, 8][(n_slices + (mode == "prefill")) % 3]     # each mode sees every S
    case, A, B, x, y0, theirs, ours = _linear_case(V, backend, dtype, mode, n_slices, seed, S=S)
    slices = WIDTHS[n_slices]
    with torch.inference_mode():
        want = y0.clone()
        theirs.add_lora_linear(want, x, A, B, 1.0, slices)
        got = y0.clone()
        assert ours.add_lora_linear(got, x, A, B, 1.0, slices) is got
    ref = y0.double() + ref_delta(x, A, B, case.tok_slots)
    check_rows(got, y0, want, ref, lora_rows(case.tok_slots), slice(None), dtype, "add_lora_linear")


@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_add_lora_linear_with_add_inputs_false_overwrites_lora_rows_only(V, backend, dtype, mode):
    case, A, B, x, y0, theirs, ours = _linear_case(V, backend, dtype, mode, 3, seed=11 + len(mode), S=4)
    slices = WIDTHS[3]
    with torch.inference_mode():
        want = torch.zeros_like(y0)       # the dual-stream path's zeroed buffer (vLLM's CPU wrapper has no add_inputs)
        theirs.add_lora_linear(want, x, A, B, 1.0, slices)
        got = y0.clone()
        ours.add_lora_linear(got, x, A, B, 1.0, slices, add_inputs=False)
    check_rows(got, y0, want, ref_delta(x, A, B, case.tok_slots), lora_rows(case.tok_slots), slice(None), dtype,
               "add_lora_linear(add_inputs=False)")


def test_add_lora_linear_with_a_scale_and_the_cpu_wrappers_buffer(V):
    case, A, B, x, y0, theirs, ours = _linear_case(V, "torch", torch.float32, "prefill", 2, seed=5, S=3)
    slices = WIDTHS[2]
    with torch.inference_mode():
        want = y0.clone()
        theirs.add_lora_linear(want, x, A, B, 0.37, slices)
        got = y0.clone()
        ours.add_lora_linear(got, x, A, B, 0.37, slices)
        got_buf = y0.clone()
        buf = tuple(torch.full((case.T, 8), float("nan")) for _ in slices)      # overwritten first
        ours.add_lora_linear(got_buf, x, A, B, 0.37, slices, buffer=buf)
    ref = y0.double() + ref_delta(x, A, B, case.tok_slots, scale=0.37)
    for out, what in ((got, "scale"), (got_buf, "buffer")):
        check_rows(out, y0, want, ref, lora_rows(case.tok_slots), slice(None), torch.float32, what)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_the_gpu_metadata_path_run_on_the_cpu(V, mode):
    """What a GPU runs: one host-to-device copy into the static buffers, the metadata built by the
    first call of the forward from them (device ops, no numpy), here on CPU tensors."""
    case, A, B, x, y0, theirs, ours = _linear_case(V, "torch", torch.float32, mode, 3, seed=14, S=5)
    ours._host = False
    bigger = Case("decode", 5, seed=15, n_req=46)      # more rows than any case above
    assert bigger.T > case.T
    ours.update_metadata(bigger.mapping, bigger.lora_index_to_id, 6, 64)
    ours.update_metadata(case.mapping, case.lora_index_to_id, case.S + 1, 64)   # a smaller batch after a larger one
    assert not ours._metas
    for name in ("token_lora_indices", "sampler_indices", "sampler_indices_padded"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert torch.equal(ours._embeddings_indices[:case.T], theirs._embeddings_indices[:case.T])
    assert bool((ours._slots["tok"][case.T:] == -1).all()) and bool((ours._slots["smp"][case.Ts:] == -1).all())
    with torch.inference_mode():
        want = y0.clone()
        theirs.add_lora_linear(want, x, A, B, 1.0, WIDTHS[3])
        got = y0.clone()
        ours.add_lora_linear(got, x, A, B, 1.0, WIDTHS[3])
    assert set(ours._metas) == {"tok"}
    ref = y0.double() + ref_delta(x, A, B, case.tok_slots)
    check_rows(got, y0, want, ref, lora_rows(case.tok_slots), slice(None), torch.float32, "device path")


def test_gpu_metadata_is_built_once_per_forward_and_never_reused_across_captures(V, monkeypatch):
    """On the device path a metadata belongs to the vLLM forward (ForwardContext) that built it: a
    later forward, or a CUDA-graph capture (which must record the build), builds its own; inside a
    capture with no forward to scope by, every call builds, and no cached tensor is made."""
    case, A, B, x, y0, theirs, ours = _linear_case(V, "torch", torch.float32, "decode", 3, seed=6, S=4)
    ours._host = False
    ours.update_metadata(case.mapping, case.lora_index_to_id, case.S + 1, 64)
    ctx = [object()]
    monkeypatch.setattr(V.ours, "_forward_token", lambda: ctx[0])
    with torch.inference_mode():
        want = y0.clone()
        theirs.add_lora_linear(want, x, A, B, 1.0, WIDTHS[3])

        def call(scale=1.0):
            out = y0.clone()
            ours.add_lora_linear(out, x, A, B, scale, WIDTHS[3])
            return out, ours._metas["tok"][0]

        (g1, m1), (g2, m2) = call(), call()
        assert m1 is m2                                    # the later layers of a forward reuse it
        ctx[0] = object()
        g3, m3 = call()
        assert m3 is not m1                                # the next forward builds its own
        n_states, n_scal = len(ours._weights), len(ours._scalings)
        monkeypatch.setattr(ours, "_capturing", lambda: True)
        monkeypatch.setattr(V.ours, "_forward_token", lambda: None)
        (g4, m4), (g5, m5) = call(0.5), call(0.5)
        assert m4 is not m5 and m4 is not m3               # capture without a forward: per call
        assert (len(ours._weights), len(ours._scalings)) == (n_states, n_scal)
    ref = y0.double() + ref_delta(x, A, B, case.tok_slots)
    for out in (g1, g2, g3):
        check_rows(out, y0, want, ref, lora_rows(case.tok_slots), slice(None), torch.float32, "device path")
    ref_half = y0.double() + ref_delta(x, A, B, case.tok_slots, scale=0.5)
    for out in (g4, g5):
        assert_close(out[lora_rows(case.tok_slots)], ref_half[lora_rows(case.tok_slots)], TOL[torch.float32], "capture")


def test_a_new_slot_layout_refreshes_the_ranks_before_any_layer_runs(V):
    """CUDA-graph replays run no Python: update_metadata refreshes the ranks when vLLM put new
    adapters in slots (it calls update_metadata after writing them)."""
    case, A, B, x, y0, theirs, ours = _linear_case(V, "torch", torch.float32, "decode", 2, seed=12, S=3)
    ours._host = False
    with torch.inference_mode():
        ours.add_lora_linear(y0.clone(), x, A, B, 1.0, WIDTHS[2])
    st = ours._state(A, B, 1.0)
    before = st.ranks.clone()
    with torch.inference_mode():
        for a in A:
            a[:, 0, 1:] = 0                                # every slot now rank 1 (or 0)
    ids = list(case.lora_index_to_id)
    ids.reverse()
    ours.update_metadata(Mapping((0,), (0,), True), ids, case.S + 1, 64)
    assert st.ranks.tolist() == [[min(int(r), 1) for r in row] for row in before.tolist()]


def test_rows_past_the_mapping_are_untouched(V):
    """A CUDA graph pads x past the batch's tokens: those rows get no LoRA (as in vLLM's GPU wrapper)."""
    case, A, B, x, y0, theirs, ours = _linear_case(V, "torch", torch.float32, "decode", 3, seed=2, S=3)
    g = gen(9)
    xp = torch.cat([x, rnd(g, 4, x.shape[1])])
    yp = torch.cat([y0, poisoned(g, 4, y0.shape[1], range(4), torch.float32)])
    with torch.inference_mode():
        want = y0.clone()
        theirs.add_lora_linear(want, x, A, B, 1.0, WIDTHS[3])
        got = yp.clone()
        ours.add_lora_linear(got, xp, A, B, 1.0, WIDTHS[3])
    assert same_bits(got[case.T:], yp[case.T:])
    ref = y0.double() + ref_delta(x, A, B, case.tok_slots)
    check_rows(got[:case.T], y0, want, ref, lora_rows(case.tok_slots), slice(None), torch.float32, "padded")


# ---------------------------------------------------------------------- add_shrink / add_expand


@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_add_shrink_and_add_expand_match_vllm(V, backend, dtype, mode):
    """The column- and row-parallel layers' path: shrink into one zeroed fp32 [n, T, r] buffer
    (overwritten), then expand from it at an output offset, passing ``add_input=True`` (sic)."""
    S, K, R, widths = 5, 48, 8, (32, 8, 16)
    case = Case(mode, S, seed=len(mode) + S)
    g = gen(21)
    A, B = vllm_weights(g, S, R, K, widths, case.slot_ranks(R, 4), dtype)
    theirs, ours = case.wrappers(V, backend)
    x = rnd(g, case.T, K, dtype=dtype)
    T, rows = case.T, lora_rows(case.tok_slots)
    with torch.inference_mode():
        buf_theirs = torch.zeros(3, T, R)
        theirs.add_shrink(buf_theirs, x, A, 0.5)
        buf = torch.full((3, T, R + 3), float("nan"))        # wider than r: the extra columns are untouched
        buf[..., R:] = 7.0
        ours.add_shrink(buf, x, A, 0.5)
    assert same_bits(buf[..., R:], torch.full((3, T, 3), 7.0))
    norow = [t for t in range(T) if t not in rows]
    assert bool((buf[:, norow, :R] == 0).all()), "rows without LoRA must be overwritten with 0"
    h_ref = torch.stack([torch.stack([0.5 * (a[s, 0].double() @ x[t].double()) if s >= 0 else torch.zeros(R, dtype=torch.float64)
                                      for t, s in enumerate(case.tok_slots)]) for a in A])
    assert_close(buf[..., :R], buf_theirs, TOL_VLLM[torch.float32], "add_shrink vs vLLM")
    assert_close(buf[..., :R], h_ref, TOL[torch.float32] if dtype == torch.float32 else TOL[torch.float16], "add_shrink")

    h = buf_theirs                     # both expand the same intermediate
    N, off = sum(widths), 5
    cols = slice(off, off + N)
    y0 = poisoned(g, T, N + 9, norow, dtype, cols=cols)
    href = torch.zeros(T, N, dtype=torch.float64)
    c = 0
    for hi, b in zip(h, B):
        for t, s in enumerate(case.tok_slots):
            if s >= 0:
                href[t, c:c + b.shape[2]] = b[s, 0].double() @ hi[t].double()
        c += b.shape[2]
    with torch.inference_mode():
        want = y0.clone()
        theirs.add_expand(want, h, B, widths, offset_start=off, add_input=True)
        got = y0.clone()
        ours.add_expand(got, h, B, widths, offset_start=off, add_input=True)
        want_o = torch.zeros_like(y0)
        theirs.add_expand(want_o, h, B, widths, offset_start=off, add_inputs=False)
        got_o = y0.clone()
        ours.add_expand(got_o, h, B, widths, offset_start=off, add_inputs=False)
    ref = y0.double()
    ref[:, cols] += href
    check_rows(got, y0, want, ref, rows, cols, dtype, "add_expand")
    ref_o = torch.zeros_like(ref)
    ref_o[:, cols] = href
    check_rows(got_o, y0, want_o, ref_o, rows, cols, dtype, "add_expand(add_inputs=False)")


# ------------------------------------------------------------------------- add_lora_embedding


@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_add_lora_embedding_matches_vllm(V, backend, dtype, mode):
    """The embedding layer builds x from the wrapper's private _embeddings_indices (rows without
    LoRA read slot 0) and passes ``add_input=True``; only the expand runs here."""
    S, vocab, D, R = 4, 50, 40, 8
    case = Case(mode, S, seed=31 + len(mode))
    g = gen(7)
    ranks = case.slot_ranks(R, 8)
    emb_a = torch.zeros(S, vocab, R, dtype=dtype)
    emb_b = torch.zeros(S, 1, D, R, dtype=dtype)
    for s, r in enumerate(ranks):
        if r:
            emb_a[s, :, :r] = rnd(g, vocab, r, dtype=dtype)
            emb_b[s, 0, :, :r] = rnd(g, D, r, scale=r ** -0.5, dtype=dtype)
    theirs, ours = case.wrappers(V, backend, vocab=vocab)
    tokens = torch.randint(0, vocab, (case.T,), generator=g)
    T = case.T
    assert torch.equal(ours._embeddings_indices[:T], theirs._embeddings_indices[:T])
    x = F.embedding(tokens + ours._embeddings_indices[:T], emb_a.view(S * vocab, R))
    rows = lora_rows(case.tok_slots)
    y0 = poisoned(g, T, D, [t for t in range(T) if t not in rows], dtype)
    with torch.inference_mode():
        want = y0.clone()
        theirs.add_lora_embedding(want, x, emb_b, add_input=True)
        got = y0.clone()
        ours.add_lora_embedding(got, x, emb_b, add_input=True)
    ref = y0.double()
    for t, s in enumerate(case.tok_slots):
        if s >= 0:
            ref[t] += emb_b[s, 0].double() @ emb_a[s, tokens[t]].double()
    check_rows(got, y0, want, ref, rows, slice(None), dtype, "add_lora_embedding")


# ---------------------------------------------------------------------------- add_lora_logits


@pytest.mark.parametrize("mode,spec", [("decode", 0), ("prefill", 0), ("decode", 2)])
@pytest.mark.parametrize("y_dtype,w_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                             (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
                         ids=["fp32", "fp16", "bf16", "fp32-logits-bf16-weights"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_add_lora_logits_matches_vllm(V, backend, y_dtype, w_dtype, mode, spec):
    """Routed by sampler_indices (one row per sampled token, spec + 1 per request); y wider than the
    vocabulary, its padding untouched; fp32 logits with bf16 weights."""
    S, H, vocab, pad, R = 3, 48, 70, 6, 8
    case = Case(mode, S, seed=41 + spec + len(mode), spec=spec)
    g = gen(13)
    A, B = vllm_weights(g, S, R, H, (vocab,), case.slot_ranks(R, 3), w_dtype)
    theirs, ours = case.wrappers(V, backend)
    Ts, rows = case.Ts, lora_rows(case.smp_slots)
    x = rnd(g, Ts, H, dtype=w_dtype)
    y0 = poisoned(g, Ts, vocab + pad, [t for t in range(Ts) if t not in rows], y_dtype, cols=slice(0, vocab))
    with torch.inference_mode():
        want = y0.clone()
        theirs.add_lora_logits(want, x, A[0], B[0], 1.0)
        got = y0.clone()
        ours.add_lora_logits(got, x, A[0], B[0], 1.0)
    ref = y0.double()
    ref[:, :vocab] += ref_delta(x, A, B, case.smp_slots)
    check_rows(got, y0, want, ref, rows, slice(0, vocab), y_dtype, "add_lora_logits", tol_dtype=w_dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_apply_lora_full_linear_matches_vllm(V, backend):
    """Classification heads: rows whose slot has a full head get x W^T + bias, others keep y."""
    S, H, L = 4, 32, 6
    case = Case("prefill", S, seed=77)
    g = gen(17)
    W = rnd(g, S, 1, L, H)
    bias = rnd(g, S, L)
    used = sorted({s for s in case.smp_slots if s >= 0})
    enabled = torch.ones(S, dtype=torch.bool)
    if len(used) > 1:
        enabled[used[0]] = False                          # a slot without a full head
    theirs, ours = case.wrappers(V, backend)
    x = rnd(g, case.Ts, H)
    y0 = rnd(g, case.Ts, L)
    with torch.inference_mode():
        want = y0.clone()
        theirs.apply_lora_full_linear(want, x, W, bias, enabled)
        got = y0.clone()
        ours.apply_lora_full_linear(got, x, W, bias, enabled)
    use = [s >= 0 and bool(enabled[s]) for s in case.smp_slots]
    assert any(use) and not all(use)
    ref = torch.stack([(W[s, 0].double() @ x[t].double() + bias[s].double()) if u else y0[t].double()
                       for t, (s, u) in enumerate(zip(case.smp_slots, use))])
    assert_close(got, want, TOL_VLLM[torch.float32], "apply_lora_full_linear vs vLLM")
    assert_close(got, ref, TOL[torch.float32], "apply_lora_full_linear vs float64")
    assert same_bits(got[[not u for u in use]], y0[[not u for u in use]])


# ------------------------------------------------------------------------------ ranks, no LoRA


def test_ranks_are_found_from_the_weights_and_follow_slot_updates(V):
    case, A, B, x, y0, theirs, ours = _linear_case(V, "torch", torch.float32, "prefill", 3, seed=8, S=4)
    true = case.slot_ranks(8, 8)
    st = ours._state(A, B, 1.0)
    assert st.ranks.tolist() == [true] * 3
    # vLLM's set_lora: reset the slot, then copy an adapter of another rank into it
    s = next(i for i, lid in enumerate(case.lora_index_to_id) if lid is not None)
    g = gen(4)
    with torch.inference_mode():          # in-place writes into the (normal) stacked tensors still count
        for a, b in zip(A, B):
            a[s] = 0
            b[s] = 0
            a[s, 0, :3].copy_(rnd(g, 3, a.shape[-1], scale=0.2))
            b[s, 0, :, :3].copy_(rnd(g, b.shape[2], 3, scale=0.5))
    with torch.inference_mode():
        want = y0.clone()
        theirs.add_lora_linear(want, x, A, B, 1.0, WIDTHS[3])
        got = y0.clone()
        ours.add_lora_linear(got, x, A, B, 1.0, WIDTHS[3])
    assert ours._state(A, B, 1.0).ranks[:, s].tolist() == [3, 3, 3]
    ref = y0.double() + ref_delta(x, A, B, case.tok_slots)
    check_rows(got, y0, want, ref, lora_rows(case.tok_slots), slice(None), torch.float32, "after a slot update")


def test_a_batch_without_lora_changes_nothing(V):
    case, A, B, x, y0, theirs, ours = _linear_case(V, "torch", torch.float32, "decode", 2, seed=1, S=2)
    m = Mapping((0,) * case.T, (0,) * case.T, True)
    ours.update_metadata(m, case.lora_index_to_id, case.S + 1, 64)
    buf = torch.full((2, case.T, 8), 5.0)
    with torch.inference_mode():
        got = y0.clone()
        ours.add_lora_linear(got, x, A, B, 1.0, WIDTHS[2])
        ours.add_expand(got, buf, B, WIDTHS[2], add_inputs=False)
        ours.add_shrink(buf, x, A, 1.0)
    assert same_bits(got, y0) and bool((buf == 0).all())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_compiled_graph_serves_successive_batches(V, backend):
    """Under torch.compile(fullgraph=True) (vLLM compiles its model), the metadata is built inside the
    graph from the static slot buffers: one graph, no recompiles, right results for new mappings."""
    from torch._dynamo.utils import counters

    S, K, R, widths = 3, 32, 8, (16, 8, 8)
    ids = [4, None, 9]                                  # slot 1 empty
    batches = [(4, 0, 9, 9, 4, 0), (9, 9, 0, 4, 4, 4), (0, 4, 9, 0, 9, 4), (4, 0, 9, 9, 4, 0)]
    g = gen(3)
    A, B = vllm_weights(g, S, R, K, widths, [R, 0, 5], torch.float32)
    ours = V.ours.PunicaWrapperOpenLoRA(64, 8, "cpu", backend=backend)
    x, y0 = rnd(g, 6, K), rnd(g, 6, sum(widths))

    def step(y, x):
        ours.add_lora_linear(y, x, A, B, 1.0, widths)
        ours.add_lora_logits(y[:, :16], x, A[0], B[0], 1.0)
        return y

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    results = []
    with torch.inference_mode():
        for ids_per_row in batches:
            ours.update_metadata(Mapping(ids_per_row, ids_per_row, True), ids, S + 1, 10)
            want = step(y0.clone(), x)
            got = compiled(y0.clone(), x)
            assert_close(got, want, TOL[torch.float32], "compiled vs eager")
            results.append(got)
    assert not torch.equal(results[0], results[1]) and torch.equal(results[0], results[3])
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    torch._dynamo.reset()


# ------------------------------------------------------------------------- not accelerated, errors


@pytest.mark.parametrize("method", ["moe_lora_align_block_size", "add_lora_fused_moe", "add_lora_w13", "add_lora_w2"])
def test_moe_methods_raise_naming_the_method_and_the_setting(V, method):
    w = V.ours.PunicaWrapperOpenLoRA(8, 2, "cpu", backend="torch")
    with pytest.raises(NotImplementedError, match=rf"PunicaWrapperOpenLoRA\.{method}: .*target_modules.*OPENLORA_VLLM"):
        getattr(w, method)(None, None)


def test_the_whole_interface_of_vllms_base_class_is_served(V):
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperABC, PunicaWrapperBase

    cls = V.ours.PunicaWrapperOpenLoRA
    assert not cls.__abstractmethods__
    inherited_on_purpose = {"token_lora_indices", "sampler_indices", "sampler_indices_padded",
                            "_update_base_metadata", "_update_prefill_metadata", "_select_full_linear_output"}
    names = {n for base in (PunicaWrapperABC, PunicaWrapperBase) for n in vars(base)
             if not n.startswith("__") and n not in ("_abc_impl",)}
    missing = sorted(n for n in names - inherited_on_purpose if n not in vars(cls))
    assert not missing, f"vLLM's punica interface has methods we neither serve nor inherit on purpose: {missing}"
    # built the way vLLM's model manager builds it
    w = cls(64, max_batches=8, device=torch.device("cpu"), lora_config=None)
    assert w.backend == "auto" and w._slots["tok"].shape == (64,)


def test_bad_input_raises_naming_the_argument(V):
    case, A, B, x, y0, theirs, ours = _linear_case(V, "torch", torch.float32, "decode", 2, seed=3, S=3)
    W = V.ours.PunicaWrapperOpenLoRA
    with pytest.raises(KeyError, match="mapping.index_mapping: LoRA id 999"):
        ours.update_metadata(Mapping((999,), (0,), True), case.lora_index_to_id, case.S + 1, 64)
    with pytest.raises(ValueError, match="mapping.index_mapping: 300 entries, more than max_num_batched_tokens=256"):
        ours.update_metadata(Mapping((0,) * 300, (0,), True), case.lora_index_to_id, case.S + 1, 64)
    with pytest.raises(ValueError, match="backend: unknown backend 'fast'"):
        W(8, 2, "cpu", backend="fast")
    ours.update_metadata(case.mapping, case.lora_index_to_id, case.S + 1, 64)
    with pytest.raises(ValueError, match=r"output_slices\[1\]: 7 columns, but lora_b_stacked\[1\] has 40"):
        ours.add_lora_linear(y0.clone(), x, A, B, 1.0, (24, 7))
    with pytest.raises(ValueError, match="y: has 3 rows, but x has"):
        ours.add_lora_linear(y0[:3].clone(), x, A, B, 1.0, WIDTHS[2])
    with pytest.raises(ValueError, match="offset_start: 10"):
        ours.add_expand(y0.clone(), torch.zeros(2, case.T, 8), B, WIDTHS[2], offset_start=10)
    with pytest.raises(ValueError, match=r"y\[0\]: expected \[T=.*, >= r=8\]"):
        ours.add_shrink(torch.zeros(2, case.T, 4), x, A, 1.0)
    with pytest.raises(ValueError, match="lora_a_stacked"):
        ours.add_lora_linear(y0.clone(), x, (A[0][:, :, None],) * 2, B, 1.0, WIDTHS[2])


# ------------------------------------------------------------------- Triton, under the interpreter


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_triton_backend_matches_vllm_on_small_shapes(V, mode, dtype):
    if not olk.available_backends("cpu")["triton"].usable:
        pytest.skip(olk.available_backends("cpu")["triton"].reason)
    S, K, R, widths = 3, 32, 8, (16, 8, 8)
    case = Case(mode, S, seed=50 + len(mode), n_req=4 if mode == "decode" else 3)
    g = gen(23)
    A, B = vllm_weights(g, S, R, K, widths, case.slot_ranks(R, 1), dtype)
    theirs, ours = case.wrappers(V, "triton")
    x = rnd(g, case.T, K, dtype=dtype)
    rows = lora_rows(case.tok_slots)
    norow = [t for t in range(case.T) if t not in rows]
    y0 = poisoned(g, case.T, sum(widths), norow, dtype)
    Ts, smp_rows = case.Ts, lora_rows(case.smp_slots)
    yl0 = poisoned(g, Ts, 16, [t for t in range(Ts) if t not in smp_rows], dtype)
    with torch.inference_mode():
        want = y0.clone()
        theirs.add_lora_linear(want, x, A, B, 1.0, widths)
        got = y0.clone()
        ours.add_lora_linear(got, x, A, B, 1.0, widths)
        buf_w, buf = torch.zeros(3, case.T, R), torch.full((3, case.T, R), float("nan"))
        theirs.add_shrink(buf_w, x, A, 1.0)
        ours.add_shrink(buf, x, A, 1.0)
        want_e, got_e = y0.clone(), y0.clone()
        theirs.add_expand(want_e, buf_w, B, widths, add_input=True)
        ours.add_expand(got_e, buf_w, B, widths, add_input=True)
        want_l, got_l = yl0.clone(), yl0.clone()
        theirs.add_lora_logits(want_l, x[:Ts], A[0], B[0], 1.0)
        ours.add_lora_logits(got_l, x[:Ts], A[0], B[0], 1.0)
    ref = y0.double() + ref_delta(x, A, B, case.tok_slots)
    check_rows(got, y0, want, ref, rows, slice(None), dtype, "triton add_lora_linear")
    assert_close(buf, buf_w, TOL_VLLM[torch.float32], "triton add_shrink")
    check_rows(got_e, y0, want_e, ref, rows, slice(None), dtype, "triton add_expand")
    ref_l = yl0.double() + ref_delta(x[:Ts], A[:1], B[:1], case.smp_slots)
    check_rows(got_l, yl0, want_l, ref_l, smp_rows, slice(None), dtype, "triton logits")


# ------------------------------------------------------------------------ switching it on


def _fake_dist(tmp_path):
    """A dist-info declaring pyproject.toml's vllm.general_plugins entry points, so that vLLM's own
    plugin loader finds them whatever this checkout's installed metadata says."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        eps = tomllib.load(f)["project"]["entry-points"]["vllm.general_plugins"]
    d = tmp_path / "openlora_kernels-0.1.0.dist-info"
    d.mkdir()
    (d / "METADATA").write_text("Metadata-Version: 2.1\nName: openlora_kernels\nVersion: 0.1.0\n")
    (d / "entry_points.txt").write_text("[vllm.general_plugins]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    return eps


@pytest.fixture
def platform(V, monkeypatch):
    from vllm.platforms import current_platform

    monkeypatch.delenv("OPENLORA_VLLM", raising=False)
    monkeypatch.delenv(V.ours.BACKEND_ENV, raising=False)
    yield current_platform
    V.ours.disable()


def test_pyproject_declares_the_plugin_entry_point():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        eps = tomllib.load(f)["project"]["entry-points"]["vllm.general_plugins"]
    assert eps == {"openlora": "openlora_kernels.integrations:vllm_plugin"}


def test_the_plugin_is_inert_without_the_variable_and_switches_the_wrapper_with_it(V, platform, monkeypatch, tmp_path):
    from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group
    from vllm.utils.import_utils import resolve_obj_by_qualname

    _fake_dist(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    before = platform.get_punica_wrapper()
    assert before == "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"

    plugins = load_plugins_by_group(DEFAULT_PLUGINS_GROUP)       # what vLLM does in every process
    assert "openlora" in plugins
    for fn in plugins.values():
        fn()
    assert platform.get_punica_wrapper() == before and not V.ours.is_enabled()

    monkeypatch.setenv("OPENLORA_VLLM", "1")
    for fn in plugins.values():
        fn()
    qualname = platform.get_punica_wrapper()
    assert qualname == V.ours.PUNICA_WRAPPER_QUALNAME and V.ours.is_enabled()
    cls = resolve_obj_by_qualname(qualname)                      # what vLLM's selector does with it
    assert cls is V.ours.PunicaWrapperOpenLoRA
    w = cls(32, max_batches=4, device="cpu", lora_config=None)
    assert isinstance(w, V.cpu.__mro__[1])                       # a PunicaWrapperBase
    V.ours.disable()
    assert platform.get_punica_wrapper() == before and "OPENLORA_VLLM" not in os.environ


def test_enable_sets_the_variables_for_vllms_processes_and_checks_the_backend(V, platform):
    with pytest.raises(ValueError, match="backend: unknown backend 'gpu'"):
        V.ours.enable(backend="gpu")
    V.ours.enable(backend="torch")
    assert os.environ["OPENLORA_VLLM"] == "1" and os.environ[V.ours.BACKEND_ENV] == "torch"
    assert V.ours.PunicaWrapperOpenLoRA(8, 2, "cpu").backend == "torch"
    V.ours.enable()                                              # twice: harmless
    assert V.ours.is_enabled()


def test_another_vllm_version_is_refused_at_enable_with_the_supported_ones(V, platform, monkeypatch):
    ours = V.ours
    assert ours.check_vllm_version("0.33.0") == "0.33.0" and ours.check_vllm_version("0.33.2+cpu")
    for bad in ("0.34.0", "0.32.1", "1.0.0", "dev"):
        with pytest.raises(ours.VLLMVersionError, match=r"supports vLLM 0\.33\.x, but vLLM .* is installed"):
            ours.check_vllm_version(bad)
    monkeypatch.setattr(ours, "installed_vllm_version", lambda: "0.34.1")
    with pytest.raises(ours.VLLMVersionError, match=r"0\.33\.x, but vLLM 0\.34\.1"):
        ours.enable()
    monkeypatch.setenv("OPENLORA_VLLM", "1")
    from openlora_kernels.integrations import vllm_plugin

    with pytest.raises(ours.VLLMVersionError):
        vllm_plugin()
    assert not ours.is_enabled()
    monkeypatch.setattr(ours, "installed_vllm_version", lambda: None)
    with pytest.raises(ours.VLLMVersionError, match="vLLM is not installed"):
        ours.enable()


def test_importing_the_package_and_an_inert_plugin_imports_no_vllm():
    code = ("import sys, openlora_kernels, openlora_kernels.integrations as i; i.vllm_plugin(); "
            "bad = [m for m in ('vllm', 'triton', 'openlora_kernels.integrations.vllm') if m in sys.modules]; "
            "assert not bad, bad")
    env = {k: v for k, v in os.environ.items() if k != "OPENLORA_VLLM"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_benchmark_runs_and_writes_wellformed_rows(V, tmp_path):
    from benchmarks import bench_vllm_wrapper
    from benchmarks.common import read_rows

    out = str(tmp_path / "vllm_wrapper.csv")
    assert bench_vllm_wrapper.main(["--quick", "--rounds", "1", "--reps", "1", "--dtypes", "fp32", "--out", out]) == 0
    rows = read_rows(out)
    got = {(r["kernel"], r["contender"], r["shape"].split(",")[0]) for r in rows}
    for case in ("case=decode", "case=prefill", "case=decode_padded"):
        for op in ("add_lora_linear", "update_metadata"):
            assert {(op, "vllm_cpu", case), (op, "openlora", case)} <= got
    assert ("add_lora_linear", "openlora_no_ranks", "case=decode_padded") in got
    for r in rows:
        assert r["median"] > 0 and r["p20"] <= r["median"] <= r["p80"] and r["unit"] == "ms"
        assert r["device"].startswith("CPU") and r["commit"] and r["extra"]["vllm"].startswith("0.33")
        if r["kernel"] == "add_lora_linear":     # the timed problem agrees with vLLM's
            assert r["extra"]["max_abs_diff_vs_vllm_cpu"] <= 1e-4 * max(1.0, r["extra"]["max_abs_lora_delta"])
