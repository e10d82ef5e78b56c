"""Parity run over awkward inputs, small enough to run under compute-sanitizer memcheck.

Every op (add_lora, lora_shrink, lora_expand) on every usable backend, against the float32
reference of kernel_baselines.py, with slot indices that mix valid slots, -1 (no adapter) and
out-of-range values (treated as -1 on a GPU when debug checks are off; rejected with IndexError
on the CPU, which this script also checks), odd K, 1 and 3 output slices of unequal widths, a
mixed-rank pool with a rank-0 slot, and block_m forced to every tile regime. Checks: the
result's rel_err within the dtype's bound, rows without adapter bit-for-bit untouched in y and
exactly zero in h. Exit status 1 on any mismatch.

gpu_suite.sh runs it twice on the GPU: plainly (parity, and it fills Triton's compile cache),
then under ``compute-sanitizer --tool memcheck`` with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that
every tensor is its own allocation and an access past a tensor's end is reported.

    python -m benchmarks.sanitizer_parity [--device cuda] [--quick] [--backends triton cuda]
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import List, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import kernel_baselines as kb  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
H_TOL = 1e-3  # h is accumulated in fp32 from exact products of 16-bit inputs


def make_indices(T: int, S: int, gen: torch.Generator, out_of_range: bool) -> torch.Tensor:
    """[T] int64: valid slots, -1, and (optionally) values outside [-1, S)."""
    idx = torch.randint(-1, S, (T,), generator=gen)
    if out_of_range and T >= 3:
        pos = torch.randperm(T, generator=gen)[: max(1, T // 4)]
        bad = torch.tensor([S, S + 7, -2, 2**31 - 1, -(2**31)])
        idx[pos] = bad[torch.arange(len(pos)) % len(bad)]
    return idx


def sanitize(idx: torch.Tensor, S: int) -> torch.Tensor:
    return torch.where((idx >= 0) & (idx < S), idx, torch.full_like(idx, -1))


def run_case(olk, backend: str, device: torch.device, dtype: torch.dtype, T: int, K: int, widths: Sequence[int],
             R: int, S: int, mixed: bool, block_m: Optional[int], gen: torch.Generator) -> List[str]:
    """All three ops on one random problem; returns failure messages."""
    fails: List[str] = []
    n = len(widths)
    ranks_host = [0, R, R // 2, 1, R][:S] if mixed else [R] * S
    lane = torch.arange(R)
    mask = (lane[None, :] < torch.tensor(ranks_host)[:, None]).to(torch.float32)
    A = [(torch.randn(S, R, K, generator=gen) * K ** -0.5 * mask[:, :, None]).to(device, dtype) for _ in range(n)]
    B = [(torch.randn(S, w, R, generator=gen) * R ** -0.5 * mask[:, None, :]).to(device, dtype) for w in widths]
    x = torch.randn(T, K, generator=gen).to(device, dtype)
    y0 = torch.randn(T, sum(widths), generator=gen).to(device, dtype)
    scal_host = (0.5 + torch.rand(S, generator=gen)).tolist()
    scalings = torch.tensor(scal_host, dtype=torch.float32, device=device)
    ranks = torch.tensor(ranks_host, dtype=torch.int32, device=device) if mixed else None
    raw = make_indices(T, S, gen, out_of_range=True)
    clean = sanitize(raw, S)
    groups = kb.adapter_groups(clean.tolist(), ranks_host, scal_host, device)
    h_ref = kb.reference_shrink(x, A, groups, R)
    d_ref = kb.reference_delta(h_ref, B, groups, T)
    no_adapter = (clean < 0).to(device)
    tag = f"{backend} {str(dtype)[6:]} T={T} K={K} N={tuple(widths)} R={R} mixed={mixed} block_m={block_m}"

    if device.type == "cpu":  # out-of-range values are rejected on the CPU, never silently dropped
        try:
            olk.add_lora(y0.clone(), x, A, B, raw.to(device), scalings, ranks, backend=backend)
            if not torch.equal(raw, clean):
                fails.append(f"{tag}: out-of-range indices were not rejected on the CPU")
        except IndexError:
            pass
        indices = clean.to(device)
    else:
        indices = raw.to(device)
    indices = indices.to(torch.int32) if T % 2 else indices  # both index dtypes
    meta = olk.build_batch_meta(indices, S, block_m=block_m) if block_m else indices

    def check_y(name: str, y: torch.Tensor) -> None:
        if not torch.equal(y[no_adapter], y0[no_adapter]):
            fails.append(f"{tag} {name}: rows without adapter were modified")
        err = kb.rel_err(y.float() - y0.float(), d_ref)
        if not err <= TOL[dtype]:
            fails.append(f"{tag} {name}: rel_err {err:.3g} > {TOL[dtype]}")

    y = y0.clone()
    olk.add_lora(y, x, A, B, meta, scalings, ranks, backend=backend)
    check_y("add_lora", y)
    h = olk.lora_shrink(x, A, meta, ranks, backend=backend)
    if h.shape != (n, T, R) or h.dtype != torch.float32:
        fails.append(f"{tag} lora_shrink: h has shape {tuple(h.shape)} dtype {h.dtype}")
    else:
        if bool((h[:, no_adapter] != 0).any()):
            fails.append(f"{tag} lora_shrink: rows without adapter are not zero")
        err = kb.rel_err(h, h_ref)
        if not err <= H_TOL:
            fails.append(f"{tag} lora_shrink: rel_err {err:.3g} > {H_TOL}")
    y = y0.clone()
    olk.lora_expand(y, h_ref, B, meta, scalings, ranks, backend=backend)
    check_y("lora_expand", y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # surface asynchronous faults here, with this case's tag
    return fails


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="parity over awkward inputs (for compute-sanitizer)")
    p.add_argument("--device", default=None)
    p.add_argument("--backends", nargs="+", default=None, help="default: every usable backend")
    p.add_argument("--quick", action="store_true", help="a subset of the cases (what the sanitizer runs)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    import openlora_kernels as olk

    olk.set_debug_checks(False)  # the GPU path under test: out-of-range slots become -1 in-kernel
    info = olk.available_backends(device)
    backends = [b for b in (a.backends or list(info)) if b in info and info[b].usable]
    skipped = [f"{b} ({info[b].reason})" for b in (a.backends or list(info)) if b in info and not info[b].usable]
    if device.type == "cuda":
        dtypes = (torch.bfloat16, torch.float32) if a.quick else (torch.bfloat16, torch.float16, torch.float32)
    else:
        dtypes = (torch.float32, torch.bfloat16)
    tokens = (5, 70) if a.quick else (1, 5, 40, 200)
    block_ms = (None, 1, 64) if a.quick else (None, 1, 2, 4, 16, 32, 64)
    shapes = (((40,), 24), ((24, 16, 8), 40))  # (widths, K): odd sizes, unequal slices
    gen = torch.Generator().manual_seed(a.seed)
    fails: List[str] = []
    count = 0
    with torch.inference_mode():
        for backend, dtype, T, (widths, K), mixed, bm in itertools.product(
                backends, dtypes, tokens, shapes, (False, True), block_ms):
            try:
                fails += run_case(olk, backend, device, dtype, T, K, widths, 16, 5, mixed, bm, gen)
            except Exception as e:  # noqa: BLE001 - report every broken case, then fail
                fails.append(f"{backend} {dtype} T={T} widths={widths} mixed={mixed} block_m={bm}: "
                             f"{type(e).__name__}: {str(e)[:300]}")
            count += 1
    print(f"sanitizer_parity: device {device}, backends {', '.join(backends) or 'none'}; "
          f"{count} cases x 3 ops; {len(fails)} failure(s)"
          + (f"; not usable: {'; '.join(skipped)}" if skipped else ""))
    for f in fails[:50]:
        print("  FAIL " + f)
    return 1 if fails or not backends else 0


if __name__ == "__main__":
    sys.exit(main())
