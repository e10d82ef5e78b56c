"""The packed weight form (add_lora / lora_shrink / lora_expand / BoundLoRA with offsets=) against
the float64 reference, on every usable backend.

Each problem is made padded (tests/lora_reference.py: mixed ranks, NaN beyond each rank), then
packed: every slot's rows copied into one buffer per slice, in a shuffled order, with gaps, and
every row no slot owns (gaps, the tail, the rows around the buffer) filled with NaN, so a read
outside a slot's own rows shows up as NaN. Outputs are random (a kernel must add, not overwrite),
rows with slot -1 must stay bit-for-bit untouched.
"""
import pytest
import torch

import openlora_kernels as olk
from openlora_kernels.ops import custom_ops
from openlora_kernels.ops import packed as packed_mod
from openlora_kernels.ops.api import BoundLoRA

from lora_reference import assert_close, make_problem, reference_delta, reference_shrink

BACKENDS = ["torch", "cpu", "triton", "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (T, K, widths, S, R, ranks, index pattern) - odd sizes, mixed ranks (0 and R included)
CASES = {
    "odd": (13, 70, [45], 5, 16, "mixed", "random"),
    "decode": (4, 37, [29], 6, 8, "mixed", "distinct"),
    "long_segments": (70, 66, [40], 3, 16, "mixed", "random"),
    "qkv_per_slice": (11, 48, [40, 12, 12], 4, 16, "per_slice", "random"),
    "five_slices": (7, 24, [9, 1, 17, 5, 3], 3, 8, "mixed", "random"),
    "rank_tiny": (10, 19, [23], 4, 2, "mixed", "random"),
}


def usable(backend, device, dtype=None):
    info = olk.available_backends(device)[backend]
    if not info.usable:
        pytest.skip(f"{backend}: {info.reason}")
    if backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
        pytest.skip("triton interpreter: bf16 tl.dot is wrong on the CPU (not a kernel property)")


def indices_for(pattern, T, S, g):
    if pattern == "random":
        return torch.randint(-1, S, (T,), generator=g)
    return torch.randperm(S, generator=g)[:T]


def pack(p, g, device):
    """(packed A list [rows, K], packed B list [N_i, rows] (views of rank-major [rows, N_i]),
    offsets [S] int32, rows, max_rank): the slots in a shuffled order, gaps of 0..3 rows."""
    S, R, K = p.a[0].shape
    n = len(p.a)
    r = p.ranks.reshape(-1, S).amax(0) if p.ranks is not None else torch.full((S,), R)
    order = torch.randperm(S, generator=g).tolist()
    offs, cur = [0] * S, 0
    for s in order:
        cur += int(torch.randint(0, 4, (1,), generator=g))
        offs[s] = cur
        cur += int(r[s])
    rows = cur + 2
    pad = 5                                   # NaN rows around the buffer, too
    a_bufs, b_bufs = [], []
    for i in range(n):
        N = p.b[i].shape[1]
        A = torch.full((rows + 2 * pad, K), float("nan"), dtype=p.a[i].dtype)
        Bt = torch.full((rows + 2 * pad, N), float("nan"), dtype=p.b[i].dtype)
        ri = p.ranks[i] if (p.ranks is not None and p.ranks.dim() == 2) else r
        for s in range(S):
            k = int(ri[s])
            A[pad + offs[s]:pad + offs[s] + k] = p.a[i][s, :k].cpu()
            Bt[pad + offs[s]:pad + offs[s] + k] = p.b[i][s, :, :k].T.cpu()
        A, Bt = A.to(device), Bt.to(device)
        a_bufs.append(A[pad:pad + rows])
        b_bufs.append(Bt[pad:pad + rows].T)
    return a_bufs, b_bufs, torch.tensor(offs, dtype=torch.int32, device=device), rows, R


def problem(case, dtype, device, seed):
    T, K, widths, S, R, ranks, pattern = CASES[case]
    g = torch.Generator().manual_seed(seed)
    p = make_problem(T, K, widths, S, R, dtype=dtype, device=device, ranks=ranks,
                     indices=indices_for(pattern, T, S, g), seed=seed)
    return p, pack(p, g, device)


def as_arg(p, bufs):
    return bufs if p.as_list else bufs[0]


def check_untouched(p, y):
    keep = p.indices.cpu() < 0
    assert torch.equal(y.cpu()[keep], p.y.cpu()[keep]), "rows with slot -1 must be bit-for-bit untouched"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_add_lora(case, dtype, backend, device):
    usable(backend, device, dtype)
    p, (A, B, offs, rows, R) = problem(case, dtype, device, seed=hash((case, str(dtype))) % 1000)
    ref = p.y.double().cpu() + reference_delta(p)
    y = p.y.clone()
    out = olk.add_lora(y, p.x, as_arg(p, A), as_arg(p, B), p.indices, p.scalings, p.ranks, offsets=offs,
                       max_rank=R, backend=backend)
    assert out is y
    assert_close(y, ref, dtype)
    check_untouched(p, y)
    # the bound form a pool layer uses (the native CPU backend binds it once in C++)
    op = BoundLoRA(as_arg(p, A), as_arg(p, B), p.scalings, p.ranks, offsets=offs, max_rank=R, backend=backend)
    y2 = p.y.clone()
    op(y2, p.x, olk.build_batch_meta(p.indices, p.scalings.shape[0]))
    assert_close(y2, ref, dtype, "BoundLoRA")
    check_untouched(p, y2)


@pytest.mark.parametrize("case", ["odd", "qkv_per_slice", "decode"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_shrink_expand(case, dtype, backend, device):
    usable(backend, device, dtype)
    p, (A, B, offs, rows, R) = problem(case, dtype, device, seed=7)
    h = olk.lora_shrink(p.x, as_arg(p, A), p.indices, p.ranks, offsets=offs, max_rank=R, backend=backend)
    assert h.shape == (len(p.a), p.x.shape[0], R)
    assert_close(h, reference_shrink(p), dtype if dtype != torch.float32 else torch.float32, "h")
    y = p.y.clone()
    olk.lora_expand(y, h, as_arg(p, B), p.indices, p.scalings, p.ranks, offsets=offs, backend=backend)
    assert_close(y, p.y.double().cpu() + reference_delta(p), dtype)
    check_untouched(p, y)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_hand_built_offsets_stay_in_bounds(backend):
    """Past the host checks (a backend called directly, as a GPU run without debug checks would):
    offsets beyond the buffer are clamped into it and ranks to what is left; nothing outside is
    read (it is NaN)."""
    device = torch.device("cpu")
    usable(backend, device)
    p, (A, B, offs, rows, R) = problem("odd", torch.float32, device, seed=3)
    S = offs.shape[0]
    wild = torch.tensor([rows + 40, -7, rows - 1, 2 ** 30, 0][:S], dtype=torch.int32)
    ranks = torch.full((S,), R, dtype=torch.int32)
    Af = A[0].clone()
    Af[Af.isnan()] = 0.5                    # finite rows inside the buffer, NaN only outside it
    Bf = B[0].clone()
    Bf[Bf.isnan()] = 0.25
    big_a = torch.full((rows + 64, Af.shape[1]), float("nan"))
    big_a[16:16 + rows] = Af
    big_b = torch.full((rows + 64, Bf.shape[0]), float("nan"))
    big_b[16:16 + rows] = Bf.T
    a2, b2 = big_a[16:16 + rows], big_b[16:16 + rows].T
    va, vb, pk = packed_mod.views(a2, b2, wild, ranks, R)
    y = p.y.clone()
    meta = olk.build_batch_meta(p.indices, S)
    mod = custom_ops.backend_module(backend)
    if getattr(mod, "SUPPORTS_PACKED", False):
        mod.add_lora(y, p.x, [va], [vb], p.scalings, ranks, meta, packed=pk)
    else:
        a_pad, b_pad, eff = packed_mod.padded_from(pk, ranks, [va], [vb])
        mod.add_lora(y, p.x, a_pad, b_pad, p.scalings, eff, meta)
    assert torch.isfinite(y).all(), "a clamped offset read outside the buffer"
    # the clamped reading: offset in [0, rows], rank <= rows - offset
    o = wild.long().clamp(0, rows)
    ref = p.y.double().clone()
    for t in range(p.x.shape[0]):
        s = int(p.indices[t])
        if s < 0:
            continue
        k = min(R, rows - int(o[s]))
        rows_a = Af[int(o[s]):int(o[s]) + k].double()
        rows_b = Bf[:, int(o[s]):int(o[s]) + k].double()
        ref[t] += float(p.scalings[s]) * (p.x[t].double() @ rows_a.T) @ rows_b.T
    assert_close(y, ref, torch.float32)


def test_packed_argument_errors():
    p, (A, B, offs, rows, R) = problem("odd", torch.float32, torch.device("cpu"), seed=1)
    A, B = A[0], B[0]
    S = offs.shape[0]

    def call(**kw):
        args = dict(lora_a=A, lora_b=B, ranks=p.ranks, offsets=offs, max_rank=R)
        args.update(kw)
        y = p.y.clone()
        olk.add_lora(y, p.x, args["lora_a"], args["lora_b"], p.indices, p.scalings, args["ranks"],
                     offsets=args["offsets"], max_rank=args["max_rank"], backend="torch")
        return y

    with pytest.raises(ValueError, match="ranks: required with offsets"):
        call(ranks=None)
    with pytest.raises(ValueError, match="max_rank"):
        call(max_rank=None)
    with pytest.raises(ValueError, match="max_rank: only taken with offsets"):
        olk.add_lora(p.y.clone(), p.x, p.a[0], p.b[0], p.indices, p.scalings, p.ranks, max_rank=R)
    with pytest.raises(ValueError, match="lora_a: with offsets, expected a 2-D"):
        call(lora_a=p.a[0])
    with pytest.raises(ValueError, match="offsets: expected shape"):
        call(offsets=offs[None])
    with pytest.raises(ValueError, match=r"scalings: expected shape \[4\]"):
        call(offsets=offs[:-1])                      # S is offsets' length
    with pytest.raises(TypeError, match="offsets: expected dtype"):
        call(offsets=offs.float())
    with pytest.raises(ValueError, match="lora_b.*rows"):
        call(lora_b=B[:, :-1])
    bad = offs.clone()
    bad[0] = -1
    with pytest.raises(ValueError, match="offsets: offsets must be >= 0"):
        call(offsets=bad)
    bad = offs.clone()
    s = int(torch.argmax(p.ranks))
    bad[s] = rows - int(p.ranks[s]) + 1
    with pytest.raises(ValueError, match=f"offsets: slot {s} uses rows"):
        call(offsets=bad)
    with pytest.raises(ValueError, match="exceeds the stacked rank"):
        call(max_rank=1)
    # nothing half-written: the refused calls left y alone (each call got its own clone), and a
    # valid call still works
    y = call()
    assert torch.isfinite(y).all()


def test_packed_refuses_gradients():
    p, (A, B, offs, rows, R) = problem("odd", torch.float32, torch.device("cpu"), seed=2)
    x = p.x.clone().requires_grad_(True)
    with pytest.raises(NotImplementedError, match="offsets: gradients"):
        olk.add_lora(p.y.clone(), x, A[0], B[0], p.indices, p.scalings, p.ranks, offsets=offs, max_rank=R)
