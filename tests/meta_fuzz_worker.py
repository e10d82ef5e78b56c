"""Fuzz worker: random LoRABatchMeta CONTENTS fed to every backend that runs here, with guard regions.

Run by tests/test_meta_fuzz.py in a subprocess, so that a segfault fails that test (with the signal
and the last case printed) instead of killing pytest::

    python tests/meta_fuzz_worker.py --examples 80            # CPU: torch, cpu, triton (interpreter)
    python tests/meta_fuzz_worker.py --backends torch --examples 500 --shrink

What one example is (hypothesis draws it; ``derandomize`` makes the run the same every time):

* sizes T 0..9, S 0..4, G 0..6 tiles, block_m from BLOCK_M_CHOICES, 1-3 slices, K 0..6, R 0..4,
  N_i 0..5 (0 less often than the others), dtype float32 / float16 / bfloat16;
* the four metadata tensors with the right shapes and dtype (what LoRABatchMeta's structural check
  accepts) and ARBITRARY int32 contents: either all entries drawn (-1, 0, T, T+1, 10**6, -2**31,
  2**31-1, small values...), or a valid build_batch_meta result with 1-4 entries overwritten;
* ranks None, [S] or [n, S], int32 or int64, values including negatives, > R and the int32 extremes.

Each backend's own entry points (``add_lora``, ``shrink(out=)``, ``expand``, the backward's
``weight_grads`` for dA and for dB; for "triton" also ``fused`` and the weight-gradient kernel
split over rows (fp32 atomics); for "cpu" also the bound plan and its ``add_rows``; for "torch"
each of the gather / segment / padded strategies) are called directly, as the GPU path runs without
debug checks: they must neither raise nor write outside y / h / the gradient buffers. Then the
public ops (and lora_backward), which on the CPU check the metadata and ranks first: they may raise
ValueError / IndexError (documented), nothing else.

Guards: y is a strided view in the middle of a buffer filled with a sentinel (rows padded with
guard columns); the shrink writes h into such a view too; after each call every element outside
the view must hold the sentinel's exact bits. x, A, B, scalings and the h the expand reads are
views inside NaN-filled buffers, and all their values are finite: a read outside an input shows
up as a non-finite value in y / h (which garbage metadata may make wrong, but never non-finite).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=80, help="hypothesis max_examples")
    ap.add_argument("--backends", default="torch,cpu,triton", help="comma-separated; unusable ones are skipped")
    ap.add_argument("--shrink", action="store_true", help="let hypothesis shrink a failure (slower)")
    ap.add_argument("--keep-going", action="store_true", help="record failures and go on; summary at the end")
    ap.add_argument("--selftest-crash", action="store_true", help="print a case, then die of SIGSEGV (harness test)")
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.selftest_crash:
    print("CASE 0: selftest", flush=True)
    os.kill(os.getpid(), signal.SIGSEGV)

os.environ.setdefault("TRITON_INTERPRET", "1")      # CPU tensors on backend "triton" (before triton loads)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import openlora_kernels as olk  # noqa: E402
from openlora_kernels.metadata import BLOCK_M_CHOICES, LoRABatchMeta, _build_impl  # noqa: E402
from openlora_kernels.ops import custom_ops, torch_ref  # noqa: E402

I32_MIN, I32_MAX = -2 ** 31, 2 ** 31 - 1
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SENTINEL = -777.25                 # guard value of the written buffers (y, h): compared bit for bit
API_ERRORS = (ValueError, IndexError)


def int32s(T: int, S: int):
    special = sorted({-2, -1, 0, 1, T - 1, T, T + 1, S - 1, S, S + 1, 10 ** 6, I32_MIN, I32_MAX, I32_MAX - 1})
    return st.one_of(st.sampled_from(special), st.integers(-2, max(T, S) + 2), st.integers(I32_MIN, I32_MAX))


@st.composite
def cases(draw):
    # sizes: 0 (a degenerate call) is one choice among several repeats of the others, and listed
    # last (hypothesis favours the first choices)
    T = draw(st.sampled_from(list(range(1, 10)) * 2 + [0]), label="T")
    S = draw(st.sampled_from(list(range(1, 5)) * 3 + [0]), label="S")
    bm = draw(st.sampled_from(BLOCK_M_CHOICES), label="block_m")
    n = draw(st.integers(1, 3), label="slices")
    K = draw(st.sampled_from(list(range(1, 7)) * 3 + [0]), label="K")
    R = draw(st.sampled_from(list(range(1, 5)) * 3 + [0]), label="R")
    widths = draw(st.lists(st.sampled_from(list(range(1, 6)) * 2 + [0]), min_size=n, max_size=n), label="widths")
    dtype = draw(st.sampled_from(DTYPES), label="dtype")
    vals = int32s(T, S)
    if draw(st.booleans(), label="corrupt a valid build"):
        idx = torch.tensor(draw(st.lists(st.integers(-1, max(S - 1, -1)), min_size=T, max_size=T)), dtype=torch.int64)
        parts = [t.clone() for t in _build_impl(idx, S, bm)]
        for _ in range(draw(st.integers(1, 4), label="corruptions")):
            f = draw(st.integers(0, 3))
            if parts[f].numel():
                flat = parts[f].view(-1)
                flat[draw(st.integers(0, flat.numel() - 1))] = draw(vals)
        G = parts[3].shape[1]
    else:
        G = draw(st.sampled_from(list(range(1, 7)) * 2 + [0]), label="G")
        slot_vals = st.one_of(st.integers(-1, S), vals)
        parts = [torch.tensor(draw(st.lists(slot_vals, min_size=T, max_size=T)), dtype=torch.int32),
                 torch.tensor(draw(st.lists(st.one_of(st.integers(-1, T), vals), min_size=T, max_size=T)),
                              dtype=torch.int32),
                 torch.tensor(draw(st.lists(vals, min_size=2 * S, max_size=2 * S)), dtype=torch.int32).view(2, S),
                 torch.tensor(draw(st.lists(st.one_of(slot_vals, vals), min_size=3 * G, max_size=3 * G)),
                              dtype=torch.int32).view(3, G)]
        if draw(st.booleans(), label="valid tile slots"):
            parts[3][0] = torch.tensor(draw(st.lists(st.integers(-1, S - 1), min_size=G, max_size=G)),
                                       dtype=torch.int32)
    rank_kind = draw(st.sampled_from(["none", "slot", "slice"]), label="ranks")
    ranks = None
    if rank_kind != "none":
        shape = (S,) if rank_kind == "slot" else (n, S)
        size = S if rank_kind == "slot" else n * S
        rv = draw(st.lists(st.one_of(st.integers(-1, R + 1), vals), min_size=size, max_size=size))
        ranks = torch.tensor(rv, dtype=draw(st.sampled_from([torch.int32, torch.int64]))).view(shape)
    return dict(T=T, S=S, bm=bm, n=n, K=K, R=R, widths=widths, dtype=dtype, parts=parts, ranks=ranks,
                rank_major_b=draw(st.booleans(), label="rank-major B"),
                h_dtype=draw(st.sampled_from(DTYPES), label="h dtype"),
                split_k=draw(st.sampled_from([1, 1, 2]), label="triton SPLIT_K"),
                seed=draw(st.integers(0, 2 ** 16), label="seed"))


# ------------------------------------------------------------------------------------ guards


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


class Guarded:
    """A [shape] view in the middle of a buffer padded on every side; the padding holds ``fill``."""

    def __init__(self, shape, dtype, fill, pad=(2, 3, 1)):
        pad = pad[-len(shape):] if len(shape) <= len(pad) else (1,) * len(shape)
        self.buf = torch.full([d + 2 * p for d, p in zip(shape, pad)], fill, dtype=dtype)
        idx = tuple(slice(p, p + d) for d, p in zip(shape, pad))
        self.view = self.buf[idx]
        self.outside = torch.ones(self.buf.shape, dtype=torch.bool)
        self.outside[idx] = False

    def snapshot(self):
        return _bits(self.buf).clone()

    def changed_outside(self, before) -> int:
        return int((_bits(self.buf) != before)[self.outside].sum())


class GuardedFlat:
    """A contiguous [T, N] tensor inside a 1-D buffer with guard elements before and after."""

    def __init__(self, shape, dtype, fill, pad=5):
        numel = shape[0] * shape[1]
        self.buf = torch.full((numel + 2 * pad,), fill, dtype=dtype)
        self.view = self.buf[pad:pad + numel].view(shape)
        self.outside = torch.ones(self.buf.shape, dtype=torch.bool)
        self.outside[pad:pad + numel] = False

    snapshot = Guarded.snapshot
    changed_outside = Guarded.changed_outside


def _values(g: torch.Generator, shape, dtype) -> torch.Tensor:
    """Small multiples of 1/4: exact in every dtype, so sums stay finite and O(10^3) at most."""
    return (torch.randint(-4, 5, shape, generator=g).to(torch.float32) / 4).to(dtype)


def _input(g, shape, dtype):
    """Finite values in a view of a NaN-filled buffer (a read outside it gives NaN)."""
    gd = Guarded(shape, dtype, float("nan"), pad=(1, 2, 1))
    gd.view.copy_(_values(g, shape, dtype))
    return gd.view


# ------------------------------------------------------------------------------------ checks


class Failure(AssertionError):
    pass


def _check_written(what: str, gd, before, inside: torch.Tensor) -> None:
    n = gd.changed_outside(before)
    if n:
        raise Failure(f"{what}: {n} guard element(s) outside the output were written")
    if not bool(torch.isfinite(inside.to(torch.float32)).all()):
        raise Failure(f"{what}: non-finite values inside the output (a read outside an input?)")


def _run(what: str, fn, allowed=()):
    try:
        return fn(), None
    except allowed as e:          # documented exception types of the public ops
        return None, e
    except Exception as e:        # noqa: BLE001 - any other exception fails the case
        raise Failure(f"{what}: raised {type(e).__name__}: {e}") from e


def usable_backends(names):
    info = olk.available_backends("cpu")
    return [b for b in names if b in info and info[b].usable]


def live_tiles(c) -> int:
    """Tiles a Triton / CUDA kernel does work for (valid slot, non-empty after clamping to [0, T])."""
    T, S = c["T"], c["S"]
    if not (T and S and c["K"] and c["R"] and sum(c["widths"])):
        return 0
    live = 0
    for slot, start, end in zip(*c["parts"][3].tolist()):
        lo = min(max(start, 0), T)
        live += 0 <= slot < S and min(max(end, lo), T) > lo
    return live


def run_case(c, backends) -> None:
    T, S, bm, n, K, R = c["T"], c["S"], c["bm"], c["n"], c["K"], c["R"]
    widths, dtype, ranks = c["widths"], c["dtype"], c["ranks"]
    N = sum(widths)
    meta = LoRABatchMeta(*c["parts"], num_slots=S, block_m=bm)       # must pass the structural check
    g = torch.Generator().manual_seed(c["seed"])
    x = _input(g, (T, K), dtype)
    a_list = [_input(g, (S, R, K), dtype) for _ in range(n)]
    if c["rank_major_b"]:
        b_list = [_input(g, (S, R, w), dtype).transpose(1, 2) for w in widths]
    else:
        b_list = [_input(g, (S, w, R), dtype) for w in widths]
    scal = _input(g, (S,), torch.float32) * 2
    h_in = _input(g, (n, T, R), c["h_dtype"])
    y0 = _values(g, (T, N), dtype)
    g_list = [_input(g, (T, R), torch.float32) for _ in range(n)]          # the backward's dY B
    dy_list = [_input(g, (T, w), dtype) for w in widths]                    # dY's slices
    h_list = [_input(g, (T, R), torch.float32) for _ in range(n)]          # x Aᵀ
    dy_full = _input(g, (T, N), dtype)

    def with_y(what, fn, flat=False, allowed=()):
        gd = (GuardedFlat if flat else Guarded)((T, N), dtype, SENTINEL)
        gd.view.copy_(y0)
        before = gd.snapshot()
        _, err = _run(what, lambda: fn(gd.view), allowed)
        _check_written(what, gd, before, gd.view)
        return err

    def with_grads(what, fn, shapes):
        """fn(list of zero-filled fp32 views [S, P_i, Q_i] inside sentinel-filled buffers)."""
        gds = [Guarded(shape, torch.float32, SENTINEL, pad=(1, 2, 1)) for shape in shapes]
        for gd in gds:
            gd.view.zero_()
        before = [gd.snapshot() for gd in gds]
        _run(what, lambda: fn([gd.view for gd in gds]))
        for gd, b in zip(gds, before):
            _check_written(what, gd, b, gd.view)

    def weight_grads(label, mod):
        rk = [None if ranks is None else (ranks[i] if ranks.dim() == 2 else ranks) for i in range(n)]
        with_grads(f"{label}.weight_grads(dA)",
                   lambda outs: mod.weight_grads(g_list, [x] * n, scal, rk, meta, True, outs), [(S, R, K)] * n)
        with_grads(f"{label}.weight_grads(dB)",
                   lambda outs: mod.weight_grads(dy_list, h_list, scal, rk, meta, False, outs),
                   [(S, w, R) for w in widths])

    def with_h(what, fn, allowed=()):
        gd = Guarded((n, T, R), torch.float32, SENTINEL, pad=(1, 2, 3))
        before = gd.snapshot()
        out, err = _run(what, lambda: fn(gd.view), allowed)
        _check_written(what, gd, before, gd.view)
        if err is None and out is not None and out.data_ptr() != gd.view.data_ptr():
            raise Failure(f"{what}: did not return the out= buffer")
        return err

    for name in backends:
        mod = custom_ops.backend_module(name)
        variants = [(name, None)]
        if name == "torch":
            variants = [(f"torch[{s}]", s) for s in ("gather", "segment", "padded")]
        for label, strategy in variants:
            saved = torch_ref._strategy
            if strategy is not None:
                torch_ref._strategy = lambda *a, _s=strategy: _s
            try:
                with_y(f"{label}.add_lora", lambda y: mod.add_lora(y, x, a_list, b_list, scal, ranks, meta))
                with_h(f"{label}.shrink", lambda h: mod.shrink(x, a_list, ranks, meta, out=h))
                with_y(f"{label}.expand", lambda y: mod.expand(y, h_in, b_list, scal, ranks, meta))
                if name != "triton":
                    weight_grads(label, mod)
            finally:
                torch_ref._strategy = saved
        if name == "triton":
            from openlora_kernels.ops.configs import override_config
            with override_config("shrink", SPLIT_K=c["split_k"]):
                with_h("triton.shrink(SPLIT_K)", lambda h: mod.shrink(x, a_list, ranks, meta, out=h))
            with_y("triton.fused", lambda y: mod.fused(y, x, a_list, b_list, scal, ranks, meta))
            if c["split_k"] > 1:          # (a third of the cases: the split weight-gradient kernel too)
                with override_config("wgrad", SPLIT_T=2):
                    weight_grads("triton(SPLIT_T=2)", mod)
            else:
                weight_grads(name, mod)
        if name == "cpu" and S and R and K and N and T:
            # the bound plan (BoundLoRA's), unchecked metadata pointers: the kernel on its own
            bound = mod.bind(a_list, b_list, scal, ranks)
            with_y("cpu.bound plan", lambda y: mod._add(bound._plan, y, x, meta))
            if bm < 16:
                _, srt, seg, _keep = mod._meta_ptrs(meta)
                xc = x.contiguous()
                with_y("cpu.add_rows", lambda y: bound.add_rows(T, xc.data_ptr(), y.data_ptr(), srt, seg), flat=True)
            # ... and as BoundLoRA calls it: the metadata's contents are checked first (CPU)
            with_y("cpu.bound", lambda y: bound(y, x, meta), allowed=API_ERRORS)
            _run("cpu.row_args", lambda: mod.row_args(meta), API_ERRORS)
        # The public ops: value checks first on the CPU (documented ValueError / IndexError).
        la, lb = (a_list, b_list) if n > 1 else (a_list[0], b_list[0])
        with_y(f"olk.add_lora[{name}]", lambda y: olk.add_lora(y, x, la, lb, meta, scal, ranks, backend=name),
               allowed=API_ERRORS)
        _run(f"olk.lora_shrink[{name}]", lambda: olk.lora_shrink(x, la, meta, ranks, backend=name), API_ERRORS)
        with_y(f"olk.lora_expand[{name}]", lambda y: olk.lora_expand(y, h_in, lb, meta, scal, ranks, backend=name),
               allowed=API_ERRORS)
        _run(f"olk.lora_backward[{name}]",
             lambda: olk.lora_backward(dy_full, x, la, lb, meta, scal, ranks, backend=name), API_ERRORS)


def describe(c) -> str:
    p = c["parts"]
    r = None if c["ranks"] is None else (str(c["ranks"].dtype).replace("torch.", ""), c["ranks"].tolist())
    return (f"T={c['T']} S={c['S']} block_m={c['bm']} n={c['n']} K={c['K']} R={c['R']} widths={c['widths']} "
            f"dtype={str(c['dtype']).replace('torch.', '')} token_slots={p[0].tolist()} "
            f"sorted_tokens={p[1].tolist()} seg_info={p[2].tolist()} tile_info={p[3].tolist()} ranks={r} "
            f"rank_major_b={c['rank_major_b']} h_dtype={str(c['h_dtype']).replace('torch.', '')} "
            f"split_k={c['split_k']} seed={c['seed']}")


def main() -> int:
    args = ARGS
    backends = usable_backends([b.strip() for b in args.backends.split(",") if b.strip()])
    print(f"meta fuzz: backends {backends}, {args.examples} examples", flush=True)
    count, live = [0], [0]
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if args.shrink else [])

    @settings(max_examples=args.examples, derandomize=True, database=None, deadline=None, phases=phases,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(cases())
    def fuzz(c):
        count[0] += 1
        live[0] += live_tiles(c) > 0
        print(f"CASE {count[0]}: {describe(c)}", flush=True)    # flushed first: a crash names its case
        try:
            run_case(c, backends)
        except Failure as e:
            print(f"FAILED case {count[0]}: {e}", flush=True)
            if not args.keep_going:
                raise
            key = str(e).split(":")[0] + ": " + str(e).split(":", 1)[1][:60]
            failures[key] = failures.get(key, 0) + 1

    failures: dict = {}
    t0 = time.time()
    try:
        fuzz()
    except Failure:
        return 1
    if failures:
        print(f"meta fuzz: {sum(failures.values())} of {count[0]} cases failed:", flush=True)
        for k, v in sorted(failures.items()):
            print(f"  {v:4d}  {k}")
        return 1
    print(f"meta fuzz: {count[0]} cases passed in {time.time() - t0:.1f}s ({live[0]} with tiles that do work)",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
