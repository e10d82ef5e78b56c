"""Independent float64 reference, random problems and tolerances for the kernel parity tests.

The reference is a plain loop over rows in float64, written from the contract alone (it shares no
code with openlora_kernels): y[t, cols_i] += scalings[s] * (x[t] @ A_i[s, :r].T) @ B_i[s, :, :r].T.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

# Per-dtype tolerances for |out - ref| <= atol + rtol * |ref| on outputs of magnitude ~1.
# fp16/bf16 outputs are rounded once to their dtype (rtol ~ one ulp); tensor-core paths also round
# the rank-r intermediate to the input dtype before the expand (atol covers that on O(1) deltas).
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=1.6e-2),
}


@dataclass
class Problem:
    x: torch.Tensor
    y: torch.Tensor                    # the y given to the op (kept pristine; ops get a clone)
    a: List[torch.Tensor]
    b: List[torch.Tensor]
    indices: torch.Tensor
    scalings: torch.Tensor
    ranks: Optional[torch.Tensor]
    widths: List[int] = field(default_factory=list)

    @property
    def as_list(self) -> bool:
        return len(self.a) > 1

    def lora_a(self):
        return self.a if self.as_list else self.a[0]

    def lora_b(self):
        return self.b if self.as_list else self.b[0]


def make_problem(T: int, K: int, widths: Sequence[int], S: int, R: int, *, dtype=torch.float32, device="cpu",
                 indices: Optional[torch.Tensor] = None, ranks=None, poison_padding: bool = True,
                 x_strided: bool = False, y_strided: bool = False, seed: Optional[int] = None) -> Problem:
    """Random multi-LoRA problem with O(1) outputs.

    ranks: None (all R), "mixed" (random per slot, including 0 and R), "per_slice" ([n, S]), or a tensor.
    poison_padding: fill A/B beyond each slot's rank with NaN: every backend must ignore it.
    """
    g = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**31 - 1, ()).item())
    n = len(widths)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    if isinstance(ranks, str):
        if ranks == "mixed":
            r = torch.randint(0, R + 1, (S,), generator=g)
            if S >= 2:
                r[0], r[1] = 0, R
            ranks = r.to(torch.int32)
        elif ranks == "per_slice":
            ranks = torch.randint(0, R + 1, (n, S), generator=g).to(torch.int64)
        else:
            raise ValueError(ranks)
    if indices is None:
        indices = torch.randint(-1, S, (T,), generator=g)
    a = [rnd(S, R, K, scale=K ** -0.5) for _ in widths]
    b = [rnd(S, w, R, scale=max(R, 1) ** -0.5) for w in widths]
    if ranks is not None and poison_padding:
        for i in range(n):
            ri = ranks[i] if ranks.dim() == 2 else ranks
            for s in range(S):
                a[i][s, int(ri[s]):] = float("nan")
                b[i][s, :, int(ri[s]):] = float("nan")
    if x_strided:  # rows further apart than K, and a column offset
        x = rnd(T, K + 9)[:, 5:5 + K]
    else:
        x = rnd(T, K)
    N = sum(widths)
    if y_strided:
        y = rnd(T, N + 7)[:, 3:3 + N]
    else:
        y = rnd(T, N)
    scal = (torch.rand(S, generator=g) * 2 - 0.5).to(torch.float32)
    dev = torch.device(device)
    return Problem(x.to(dev), y.to(dev), [t.to(dev) for t in a], [t.to(dev) for t in b], indices.to(dev),
                   scal.to(dev), ranks.to(dev) if ranks is not None else None, list(widths))


def reference_delta(p: Problem) -> torch.Tensor:
    """[T, N] float64 delta from the contract, by a loop over rows."""
    T, N = p.y.shape
    out = torch.zeros(T, N, dtype=torch.float64)
    x = p.x.double().cpu()
    idx = p.indices.cpu().tolist()
    sc = p.scalings.double().cpu()
    R = p.a[0].shape[1]
    col = 0
    for i, (A, B) in enumerate(zip(p.a, p.b)):
        A, B = A.double().cpu(), B.double().cpu()
        for t in range(T):
            s = idx[t]
            if s < 0:
                continue
            if p.ranks is None:
                r = R
            else:
                rk = p.ranks.cpu()
                r = int(rk[i, s] if rk.dim() == 2 else rk[s])
            if r == 0:
                continue
            h = A[s, :r] @ x[t]
            out[t, col:col + B.shape[1]] = sc[s] * (B[s, :, :r] @ h)
        col += B.shape[1]
    return out


def reference_shrink(p: Problem) -> torch.Tensor:
    """[n, T, R] float64 h from the contract (0 for -1 rows and beyond-rank columns)."""
    T = p.x.shape[0]
    n, R = len(p.a), p.a[0].shape[1]
    h = torch.zeros(n, T, R, dtype=torch.float64)
    x = p.x.double().cpu()
    idx = p.indices.cpu().tolist()
    for i, A in enumerate(p.a):
        A = A.double().cpu()
        for t in range(T):
            s = idx[t]
            if s < 0:
                continue
            rk = p.ranks.cpu() if p.ranks is not None else None
            r = R if rk is None else int(rk[i, s] if rk.dim() == 2 else rk[s])
            h[i, t, :r] = A[s, :r] @ x[t]
    return h


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output") -> None:
    out64 = out.double().cpu()
    assert not torch.isnan(out64).any(), f"{what}: NaN in output"
    tol = TOL[dtype]
    err = (out64 - ref).abs()
    bound = tol["atol"] + tol["rtol"] * ref.abs()
    bad = err > bound
    if bad.any():
        i = int(torch.argmax((err - bound).flatten()))
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.numel()} elements off; worst at flat index {i}: "
                             f"got {out64.flatten()[i].item():.6g}, want {ref.flatten()[i].item():.6g} "
                             f"(tol atol={tol['atol']}, rtol={tol['rtol']})")


# ----------------------------------------------------------------------------- gradients

# Per-dtype tolerances for gradients: |got - ref| <= atol + rtol * mag, where mag is the same
# float64 formula over absolute values (|dy| |B| |A| ...): the bound of rounding errors in a sum of
# products, whatever cancellation the exact value has. rtol matches TOL's: the fp32 sums, the
# rank-r intermediate rounded to the input dtype on tensor-core paths, and the result rounded to
# its dtype (dx; multi-slice dx on cpu sums per-slice 16-bit parts) each cost about one unit
# roundoff u of |mag| (fp16 u = 4.9e-4, bf16 u = 3.9e-3).
GRAD_TOL = {
    torch.float32: dict(atol=1e-6, rtol=2e-5),
    torch.float16: dict(atol=1e-5, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-4, rtol=1.6e-2),
}


def _rank_of(p: Problem, i: int, s: int) -> int:
    R = p.a[0].shape[1]
    if p.ranks is None:
        return R
    rk = p.ranks.cpu()
    return int(rk[i, s] if rk.dim() == 2 else rk[s])


def reference_grads(p: Problem, dy: torch.Tensor, h: Optional[torch.Tensor] = None):
    """float64 gradients of ``y += delta`` (or, with ``h`` [n, T, R], of lora_expand's
    ``y += scale * h Bᵀ``) for the upstream gradient ``dy`` [T, N], by a loop over rows, from the
    contract alone. Returns {name: (value, magnitude)} for "x" [T, K], "a" / "b" (lists per slice,
    [S, R, K] / [S, N_i, R]), "scalings" [S], and "h" [n, T, R]; magnitude is the same formula
    over absolute values (see GRAD_TOL)."""
    T, K = p.x.shape
    n, S, R = len(p.a), p.a[0].shape[0], p.a[0].shape[1]
    x = p.x.double().cpu()
    d = dy.double().cpu()
    sc = p.scalings.double().cpu()
    idx = p.indices.cpu().tolist()
    z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
    out = {"x": (z(T, K), z(T, K)), "scalings": (z(S), z(S)), "h": (z(n, T, R), z(n, T, R)),
           "a": ([z(S, R, K) for _ in range(n)], [z(S, R, K) for _ in range(n)]),
           "b": ([z(S, B.shape[1], R) for B in p.b], [z(S, B.shape[1], R) for B in p.b])}
    col = 0
    for i, (A, B) in enumerate(zip(p.a, p.b)):
        A, B = A.double().cpu(), B.double().cpu()
        w = B.shape[1]
        for t in range(T):
            s = idx[t]
            if s < 0:
                continue
            r = _rank_of(p, i, s)
            if r == 0:
                continue
            dyt = d[t, col:col + w]
            g, gm = dyt @ B[s, :, :r], dyt.abs() @ B[s, :, :r].abs()                  # [r]
            if h is None:
                hv, hm = A[s, :r] @ x[t], A[s, :r].abs() @ x[t].abs()
            else:
                hv = h[i, t, :r].double().cpu()
                hm = hv.abs()
            out["x"][0][t] += sc[s] * (g @ A[s, :r])
            out["x"][1][t] += sc[s].abs() * (gm @ A[s, :r].abs())
            out["a"][0][i][s, :r] += sc[s] * torch.outer(g, x[t])
            out["a"][1][i][s, :r] += sc[s].abs() * torch.outer(gm, x[t].abs())
            out["b"][0][i][s, :, :r] += sc[s] * torch.outer(dyt, hv)
            out["b"][1][i][s, :, :r] += sc[s].abs() * torch.outer(dyt.abs(), hm)
            out["scalings"][0][s] += g @ hv
            out["scalings"][1][s] += gm @ hm
            out["h"][0][i, t, :r] = sc[s] * g
            out["h"][1][i, t, :r] = sc[s].abs() * gm
        col += w
    return out


def reference_shrink_grads(p: Problem, dh: torch.Tensor):
    """float64 gradients of h = lora_shrink(x, A) for the upstream ``dh`` [n, T, R]:
    {"x": (value, magnitude) [T, K], "a": ([S, R, K] per slice, magnitudes)}."""
    T, K = p.x.shape
    n, S, R = len(p.a), p.a[0].shape[0], p.a[0].shape[1]
    x = p.x.double().cpu()
    d = dh.double().cpu()
    idx = p.indices.cpu().tolist()
    z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
    out = {"x": (z(T, K), z(T, K)), "a": ([z(S, R, K) for _ in range(n)], [z(S, R, K) for _ in range(n)])}
    for i, A in enumerate(p.a):
        A = A.double().cpu()
        for t in range(T):
            s = idx[t]
            if s < 0:
                continue
            r = _rank_of(p, i, s)
            if r == 0:
                continue
            g = d[i, t, :r]
            out["x"][0][t] += g @ A[s, :r]
            out["x"][1][t] += g.abs() @ A[s, :r].abs()
            out["a"][0][i][s, :r] += torch.outer(g, x[t])
            out["a"][1][i][s, :r] += torch.outer(g.abs(), x[t].abs())
    return out


def assert_grad_close(got: torch.Tensor, ref, dtype: torch.dtype, what: str) -> None:
    """``got`` against (value, magnitude) from reference_grads, with GRAD_TOL[dtype]; entries whose
    magnitude is 0 (beyond a rank, unused slots, rows without adapter) must be exactly 0."""
    val, mag = ref
    g = got.detach().double().cpu()
    assert g.shape == val.shape, f"{what}: shape {tuple(g.shape)}, want {tuple(val.shape)}"
    assert torch.isfinite(g).all(), f"{what}: non-finite values"
    zero = mag == 0
    if zero.any() and not torch.equal(g[zero], torch.zeros_like(g[zero])):
        k = int(torch.nonzero(zero & (g != 0))[0].tolist()[0]) if g.dim() == 1 else \
            tuple(torch.nonzero(zero & (g != 0))[0].tolist())
        raise AssertionError(f"{what}: must be exactly 0 where nothing contributes (beyond ranks, unused slots, "
                             f"-1 rows), got {g[zero & (g != 0)][0].item():.3g} at {k}")
    tol = GRAD_TOL[dtype]
    err = (g - val).abs()
    bound = tol["atol"] + tol["rtol"] * mag
    bad = err > bound
    if bad.any():
        i = int(torch.argmax((err - bound).flatten()))
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.numel()} elements off; worst at flat index {i}: "
                             f"got {g.flatten()[i].item():.6g}, want {val.flatten()[i].item():.6g} "
                             f"(magnitude {mag.flatten()[i].item():.3g}, tol atol={tol['atol']}, rtol={tol['rtol']})")
