"""``python -m openlora_kernels``: list the backends usable here, run add_lora on a mixed batch with
each, compare with a float64 reference and print the timings.

    python -m openlora_kernels                    # GPU if present, else CPU
    python -m openlora_kernels --interpret        # also run the Triton kernels on CPU (interpreter)
    python -m openlora_kernels --T 64 --K 4096 --N 4096 --slots 32 --rank 16 --dtype bfloat16

Exit status 1 if a usable backend disagrees with the reference.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _reference(x, a, b, idx, scal, ranks):
    """float64 y-delta computed with plain gathers (independent of the backends)."""
    import torch

    x64, a64, b64 = x.double(), a.double(), b.double()
    valid = idx >= 0
    s = idx.clamp(min=0).long()
    r = ranks.long()[s]
    h = torch.einsum("tk,trk->tr", x64, a64[s])
    h = torch.where(torch.arange(a.shape[1], device=x.device)[None, :] < r[:, None], h, 0.0)
    d = torch.einsum("tr,tnr->tn", h, b64[s]) * scal.double()[s][:, None]
    return torch.where(valid[:, None], d, 0.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m openlora_kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--T", type=int, default=None, help="rows in the batch (default 48 on CPU, 256 on GPU)")
    ap.add_argument("--K", type=int, default=None, help="input features (default 512 CPU / 4096 GPU)")
    ap.add_argument("--N", type=int, default=None, help="output features (default 512 CPU / 4096 GPU)")
    ap.add_argument("--slots", type=int, default=16, help="adapter slots S")
    ap.add_argument("--rank", type=int, default=16, help="stacked rank R (slots get ranks in [0, R])")
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--interpret", action="store_true", help="enable Triton's interpreter for CPU tensors")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"

    import torch

    import openlora_kernels as olk

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = dev.type == "cuda"
    T = args.T or (256 if gpu else 48)
    K = args.K or (4096 if gpu else 512)
    N = args.N or (4096 if gpu else 512)
    S, R = args.slots, args.rank
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    reps = args.reps or (50 if gpu else 5)
    torch.manual_seed(args.seed)

    print(f"openlora_kernels {olk.__version__} | torch {torch.__version__} | device {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if gpu else ""))
    info = olk.available_backends(dev)
    for b in info.values():
        print(f"  {b}")

    x = torch.randn(T, K, device=dev, dtype=dtype)
    a = (torch.randn(S, R, K, device=dev) / K ** 0.5).to(dtype)
    b = (torch.randn(S, N, R, device=dev) / R ** 0.5).to(dtype)
    ranks = torch.randint(0, R + 1, (S,), device=dev, dtype=torch.int32)
    idx = torch.randint(-1, S, (T,), device=dev)
    scal = torch.rand(S, device=dev)
    y0 = torch.randn(T, N, device=dev, dtype=dtype)
    ref = y0.double() + _reference(x, a, b, idx, scal, ranks)
    meta = olk.build_batch_meta(idx, S)
    n_active = int((meta.seg_len > 0).sum())
    print(f"mixed batch: T={T} rows over {n_active} distinct adapters of {S} slots (+ rows without adapter), "
          f"K={K}, N={N}, ranks 0..{R}, {str(dtype).replace('torch.', '')}, block_m={meta.block_m}")

    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    failed = False
    print(f"{'backend':8} {'max |err|':>10} {'median ms':>10} {'min ms':>8}  result")
    for name, b_info in info.items():
        if not b_info.usable:
            continue
        y = y0.clone()
        olk.add_lora(y, x, a, b, meta, scal, ranks, backend=name)  # warm-up (JIT compile) + check
        err = (y.double() - ref).abs().max().item()
        ok = err <= tol * (1 + ref.abs().max().item())
        times = []
        for _ in range(reps):
            y.copy_(y0)
            if gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            olk.add_lora(y, x, a, b, meta, scal, ranks, backend=name)
            if gpu:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        failed |= not ok
        print(f"{name:8} {err:10.2e} {statistics.median(times):10.3f} {min(times):8.3f}  {'OK' if ok else 'MISMATCH'}")
    if gpu:
        print("(GPU times are host wall-clock around one synchronised call; benchmarks/ has event timings)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
