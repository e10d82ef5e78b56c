"""Compile every Triton launch our launchers make, for real GPU targets, on a machine without a GPU.

Triton's interpreter runs kernels as NumPy and forgives things the compiler rejects (type
mismatches between branches, constexpr specialisation of ints equal to 1, layouts). This tool
records the launches that ``triton_sgmv`` makes for a matrix of realistic shapes and options,
specialises their arguments exactly as ``JITFunction.run`` would, and compiles them to cubin for
sm_90 (``--archs``) with the GPU heuristic configurations, and reads each kernel's resource usage
(cuobjdump on the cubin): a configuration that spills registers is a failure, and so is a fused /
expand launch whose host proved 16-byte alignment (VEC > 1) but whose PTX has no vector loads and
stores. The decode matrix compiles the fused kernel at every rank 8..128, block_m 1 / 2 / 4, both
B layouts (standard and the pool's rank-major) and every dtype; the storage-dtype launches (fp32
activations with bf16 / fp16 weights, adapter_dtype) compile too (:func:`storage_cases`), and
so do the fp8 (e4m3, scaled) weights for every activation dtype and bf16 activations with fp16
weights (:func:`fp8_cases`; ``--fp8-only`` compiles just those).
``--resources`` prints registers / stack / shared memory for every kernel; ``--table`` writes
them as markdown (docs/kernels.md).

Must run WITHOUT TRITON_INTERPRET. Uses Triton internals (tested with Triton 3.9, the CI pin, and
3.6, the GPU machines'; see .ci/triton36_compile_check.sh).

    python tests/triton_compile_check.py [--archs 90] [--full] [--resources] [--table FILE] [--fp8-only]
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("triton_compile_check: unset TRITON_INTERPRET (the interpreter does not compile)")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.runtime import jit as tjit  # noqa: E402

import openlora_kernels as olk  # noqa: E402
from openlora_kernels.ops import configs, triton_segment, triton_sgmv  # noqa: E402
from openlora_kernels.ops.fp8 import FP8, WeightScales  # noqa: E402

KERNELS = ("_sgmv_shrink_kernel", "_sgmv_expand_kernel", "_sgmv_fused_kernel", "_sgmv_wgrad_kernel")
SEGMENT_KERNELS = ("_seg_shrink_kernel", "_seg_expand_kernel")     # ops/triton_segment.py
# Position of the argument whose dtype is the problem's dtype (x, or B for expand: the backward's
# dx runs it with a float32 y; for the weight gradients P or Q, whichever is not the fp32 one).
DTYPE_ARG = {"_sgmv_shrink_kernel": 0, "_sgmv_expand_kernel": 1, "_sgmv_fused_kernel": 0, "_sgmv_wgrad_kernel": 0,
             "_seg_shrink_kernel": 0, "_seg_expand_kernel": 1}


# Position of the first weight argument (A, or B for expand): a weight dtype other than the
# activations' is a storage-dtype launch (adapter_dtype: fp32 x / y, 16-bit weights).
WEIGHT_ARG = {"_sgmv_shrink_kernel": 1, "_sgmv_expand_kernel": 1, "_sgmv_fused_kernel": 5}


def problem_dtype(name, args):
    if name == "_sgmv_wgrad_kernel" and args[0].dtype == torch.float32:
        return args[1].dtype
    if name in WEIGHT_ARG:
        act = args[5 if name == "_sgmv_expand_kernel" else 0].dtype      # (expand: y)
        w = args[WEIGHT_ARG[name]].dtype
        if w != act and ((act == torch.float32 and name != "_sgmv_expand_kernel") or w == FP8
                         or (act == torch.bfloat16 and w == torch.float16)):
            return f"{str(act).replace('torch.', '')}+{str(w).replace('torch.', '')} weights"
    return args[DTYPE_ARG[name]].dtype


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kw)`` records instead of launching."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
        return launch


def compile_launch(fn, args, kwargs, cap: int):
    """Compile one recorded launch as JITFunction.run would on an sm_<cap> device."""
    target = GPUTarget("cuda", cap, 32)
    backend = CUDABackend(target)
    binder = tjit.create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    key = (fn.__name__, cap, str(specialization), str(sorted(options.__dict__.items())))
    src = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
    return key, lambda: triton.compile(src, target=target, options=options.__dict__)


def resources(kernel) -> str:
    """cuobjdump's resource line for a compiled kernel (REG, STACK, SHARED, ...)."""
    tool = shutil.which("cuobjdump") or os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    if not os.path.exists(tool):
        return "(no cuobjdump)"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    lines = [ln.strip() for ln in out.splitlines() if "REG" in ln]
    return lines[0] if lines else out.strip()[:200]


_VEC_LD = re.compile(r"ld\.global(\.[a-z0-9:]+)*\.(v4\.(b32|f32|u32)|v2\.(b64|f64|u64))")


def vector_problem(name: str, kwargs, ptx: str) -> str:
    """'' when a decode (fused, block_m < 16) or expand launch whose host proved 16-byte alignment (VEC > 1) compiled to
    16-byte vector loads (ld.global.v4 of 32-bit words, or .v2 of 64-bit ones); else what is
    missing. (y's stores are as wide as the tile allows: a decode tile of BLOCK_M x BLOCK_N
    elements over 128 threads holds 2-8 per thread, so they are 4- to 16-byte accesses, each
    warp's contiguous: not checked.)"""
    if name not in ("_sgmv_fused_kernel", "_sgmv_expand_kernel", "_seg_expand_kernel") or kwargs.get("VEC", 1) <= 1:
        return ""
    if name == "_sgmv_fused_kernel" and kwargs.get("USE_DOT"):
        return ""          # (the fused kernel on tensor-core tiles: compiled for coverage, not a route add_lora takes)
    return "" if _VEC_LD.search(ptx) else f"VEC={kwargs['VEC']} but the PTX has no 16-byte vector loads"


def write_table(path: str, table) -> None:
    """Markdown: kernel, dtype, the config's tile sizes, B layout, VEC, registers, stack (spills)."""
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "R_PAD", "SPLIT_K", "B_LAYOUT", "VEC", "num_warps")
    lines = [f"Triton {triton.__version__}, sm_{{arch}} offline compile (tests/triton_compile_check.py --table)", "",
             "| arch | kernel | dtype | " + " | ".join(keys) + " | registers | stack (B) | shared (B) |",
             "|" + "---|" * (len(keys) + 6)]
    rows = set()
    for cap, name, dtype, cfg, res in table:
        reg = re.search(r"REG:(\d+)", res)
        stk = re.search(r"STACK:(\d+)", res)
        shm = re.search(r"SHARED:(\d+)", res)
        row = (f"| sm_{cap} | {name.strip('_').replace('sgmv_', '').replace('_kernel', '')} | {dtype} | "
               + " | ".join(str(cfg.get(k, "")) for k in keys)
               + f" | {reg.group(1) if reg else '?'} | {stk.group(1) if stk else '?'} | {shm.group(1) if shm else '?'} |")
        rows.add(row)
    lines += sorted(rows)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines).replace("{arch}", ",".join(sorted({str(c) for c, *_ in table}))) + "\n")


def cases(full: bool):
    """(dtype, block_m, ranks kind, slice widths, R, B layout, kernels) launches to compile.

    Default: a covering set in which every dtype meets every tile mode (block_m 1, 4, 16, 64), and
    the rank options, slice layouts (one slice; fused QKV; more than 4 slices with N_i = 1) and
    ranks (R_PAD 8..128) rotate across them; then the decode matrix (:func:`decode_cases`).
    ``full``: the whole product of the covering set (slow).
    """
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    block_ms = (1, 2, 4, 16, 32, 64) if full else (1, 4, 16, 64)
    ranks_opts = ("none", "per_slot", "per_slice")
    widths_opts = ((512,), (512, 128, 128), (256, 1, 64, 64, 8))
    R_opts = (8, 16, 64, 128)
    if full:
        for c in itertools.product(dtypes, block_ms, ranks_opts, widths_opts, R_opts):
            yield (*c, "standard", "all")
    else:
        for i, (dt, bm) in enumerate(itertools.product(dtypes, block_ms)):
            yield dt, bm, ranks_opts[i % 3], widths_opts[(i // 3 + i) % 3], R_opts[i % 4], "standard", "all"
    yield from decode_cases()
    yield from packed_cases()


def packed_cases():
    """The packed form (ops/packed.py: per-slot row offsets into one buffer per slice, the pool's
    rank-major B): fused, shrink and expand in both tile modes, every dtype."""
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for bm in (1, 4, 16):
            yield dt, bm, "per_slot", (512, 128, 128), 64, "packed", "all"


DECODE_RANKS = (8, 16, 32, 64, 128)


def decode_cases():
    """The decode kernel (fused, block_m 1 / 2 / 4) at every rank R in DECODE_RANKS, both B layouts
    (standard [S, N, R], one slice; the pool's rank-major view, fused QKV widths), every dtype:
    each must compile without spills and, B and y being 16-byte aligned here, with vector loads."""
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for layout, widths in (("standard", (512,)), ("pool", (512, 128, 128))):
            for bm in (1, 2, 4):
                for R in DECODE_RANKS:
                    if bm == 2 and R < 64:
                        continue
                    yield dt, bm, "per_slot", widths, R, layout, "fused"


def segment_cases():
    """The segment decode plan (triton_segment.py) at every rank in DECODE_RANKS, both B layouts,
    every dtype, rows per step 16 (T = 8) and the largest (T = 64), one K split (h stored) and
    several (h by atomics): no spills, and vector loads in the expand where VEC > 1."""
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for layout, widths in (("standard", (512,)), ("pool", (512, 128, 128))):
            for R in DECODE_RANKS:
                for T in (8, 64):
                    yield dt, R, layout, widths, T


def run_segment_case(dt, R, layout, widths, T):
    K, S = 1024, 3
    x = torch.randn(T, K, dtype=dt)
    y = torch.randn(T, sum(widths), dtype=dt)
    a = [torch.randn(S, R, K, dtype=dt) for _ in widths]
    if layout == "pool":
        b = [torch.randn(S, R, w, dtype=dt).transpose(1, 2) for w in widths]
    else:
        b = [torch.randn(S, w, R, dtype=dt) for w in widths]
    sc = torch.rand(S)
    ranks = torch.tensor([R, 0, R // 2], dtype=torch.int32)
    meta = olk.build_batch_meta(torch.randint(-1, S, (T,)), S, block_m=1)
    triton_segment.segment(y, x, a, b, sc, ranks, meta)                    # one split: h stored
    with configs.override_config("segment", K_SPAN=512):
        triton_segment.segment(y, x, a, b, sc, ranks, meta)                # K splits of 512: atomics


def storage_cases():
    """Storage dtypes (adapter_dtype): fp32 activations with bf16 / fp16 weights, the fused decode
    kernel (block_m 1 / 4, both B layouts, ranks 16 and 64) and the shrink + expand route of the
    tensor-core tiles (block_m 16 / 64: fp32 products from the 16-bit loads)."""
    for wdt in (torch.bfloat16, torch.float16):
        for layout, widths in (("standard", (512,)), ("pool", (512, 128, 128))):
            for bm in (1, 4):
                for R in (16, 64):
                    yield torch.float32, bm, "per_slot", widths, R, layout, "fused", wdt
        for bm, rk, widths, R in ((16, "per_slice", (512, 128, 128), 64), (64, "per_slot", (512,), 16)):
            yield torch.float32, bm, rk, widths, R, "pool", "all", wdt


def fp8_cases():
    """fp8 (e4m3) weights with their per-rank scales (ops/fp8.py, W_SCALED) for fp16, bf16 and fp32
    activations: the fused decode kernel (block_m 1 / 4, both B layouts, ranks 16 and 64), the
    shrink + expand route of the tensor-core tiles (block_m 16 / 64, also SPLIT_K 4) and the
    packed form (block_m 1 / 16); then bf16 activations with fp16 weights (fp32 products) on the
    same routes. The scales are [S, R] float32 (padded) or slot-stride-0 views of a [rows]
    vector (packed)."""
    for act in (torch.float16, torch.bfloat16, torch.float32):
        for layout, widths in (("standard", (512,)), ("pool", (512, 128, 128))):
            for bm in (1, 4):
                for R in (16, 64):
                    yield act, bm, "per_slot", widths, R, layout, "fused", FP8
        for bm, rk, widths, R in ((16, "per_slice", (512, 128, 128), 64), (64, "per_slot", (512,), 16)):
            yield act, bm, rk, widths, R, "pool", "all", FP8
        for bm in (1, 16):
            yield act, bm, "per_slot", (512, 128, 128), 64, "packed", "all", FP8
    for bm, layout, widths, R, kernels in ((1, "standard", (512,), 16, "fused"), (4, "pool", (512, 128, 128), 64, "fused"),
                                           (16, "pool", (512, 128, 128), 64, "all"), (64, "standard", (512,), 16, "all"),
                                           (1, "packed", (512, 128, 128), 16, "all")):
        yield torch.bfloat16, bm, "per_slot", widths, R, layout, kernels, torch.float16


def _rand_w(shape, wdt):
    return torch.randn(*shape).to(wdt)


def _fp8_scales(a, b, packed, wdt):
    """WeightScales for fp8 weights (None otherwise): [S, R] float32 per slice, or in the packed form
    [S, R'] views with slot stride 0 over a [rows] vector."""
    if wdt != FP8:
        return None
    if packed is None:
        return WeightScales(a=tuple(torch.rand(A.shape[0], A.shape[1]) for A in a),
                            b=tuple(torch.rand(B.shape[0], B.shape[2]) for B in b))
    S, R = a[0].shape[0], a[0].shape[1]
    return WeightScales(a=tuple(torch.rand(packed.rows).as_strided((S, R), (0, 1)) for _ in a),
                        b=tuple(torch.rand(packed.rows).as_strided((S, R), (0, 1)) for _ in b))


# (dtype, block_m) of the cases that also compile the backward's launches: the weight-gradient
# kernel in every dtype, the swapped-role shrink / expand in both tile modes.
BACKWARD_CASES = {(torch.float16, 16), (torch.bfloat16, 1), (torch.bfloat16, 64), (torch.float32, 16)}


def run_case(dt, bm, rk, widths, R, layout, kernels, split_k: int, wdt=None):
    T, K, S = 8, 384, 3
    n = len(widths)
    wdt = wdt or dt                                       # the weights' (storage) dtype
    x = torch.randn(T, K, dtype=dt)
    y = torch.randn(T, sum(widths), dtype=dt)
    a = [_rand_w((S, R, K), wdt) for _ in widths]
    packed = None
    if layout == "packed":                                # one [rows, K] / rank-major [rows, N] buffer per slice
        from openlora_kernels.ops import packed as packed_mod
        rows = S * R + 5
        offs = torch.tensor([3, R + 4, 2 * R + 5], dtype=torch.int32)
        ranks0 = torch.tensor([R, 0, R // 2], dtype=torch.int32)
        a2 = [_rand_w((rows, K), wdt) for _ in widths]
        b2 = [_rand_w((rows, w), wdt).T for w in widths]
        a, b, packed = packed_mod.views(a2, b2, offs, ranks0, R)
    elif layout == "pool":                                  # [S, R, N] storage, the [S, N, R] view
        b = [_rand_w((S, R, w), wdt).transpose(1, 2) for w in widths]
    else:
        b = [_rand_w((S, w, R), wdt) for w in widths]
    scales = _fp8_scales(a, b, packed, wdt)
    sc = torch.rand(S)
    ranks = {"none": None, "per_slot": torch.tensor([R, 0, R // 2], dtype=torch.int32),
             "per_slice": torch.full((n, S), R // 2, dtype=torch.int64)}[rk]
    meta = olk.build_batch_meta(torch.tensor([0, 2, -1, 1, 0, 0, 2, 1]), S, block_m=bm)
    if packed is not None:
        with configs.override_config("shrink", SPLIT_K=split_k):
            triton_sgmv.fused(y, x, a, b, sc, ranks, meta, packed, scales=scales)
            h = triton_sgmv.shrink(x, a, ranks, meta, packed=packed, scales=scales)
            triton_sgmv.expand(y, h, b, sc, ranks, meta, packed, fp32_h=dt == torch.float32 and wdt != dt,
                               scales=scales)
        return
    with configs.override_config("shrink", SPLIT_K=split_k):
        triton_sgmv.fused(y, x, a, b, sc, ranks, meta, scales=scales)
        if kernels == "fused":
            return
        h = triton_sgmv.shrink(x, a, ranks, meta, scales=scales)
        # (add_lora's route: fp32 products from the fp32 h for fp32 activations)
        triton_sgmv.expand(y, h, b, sc, ranks, meta, fp32_h=dt == torch.float32 and wdt != dt, scales=scales)
    if split_k == 1 and wdt == dt and (dt, bm) in BACKWARD_CASES:   # the backward: swapped-role shrink /
        # expand (dx, float32 y for several slices), the weight-gradient kernel for dA and dB; B
        # rank-major (the pool's layout)
        from openlora_kernels.ops import backward
        dy = torch.randn(T, sum(widths), dtype=dt)
        bb = [B.transpose(1, 2).contiguous().transpose(1, 2) for B in b]
        backward.add_lora_backward(dy, x, a, bb, sc, ranks, meta, "triton", True, [True] * n, [True] * n, False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="90")
    ap.add_argument("--table", default="", help="write a markdown table of registers / stack per config here")
    ap.add_argument("--full", action="store_true", help="the whole shape/option product (slow)")
    ap.add_argument("--resources", action="store_true")
    ap.add_argument("--only-segment", action="store_true", help="only the segment decode plan's launches")
    ap.add_argument("--packed-only", action="store_true", help="only the packed form's cases (quick)")
    ap.add_argument("--fp8-only", action="store_true",
                    help="only the fp8 (and bf16 x / fp16 weights) storage cases, fp8_cases (quick)")
    opts = ap.parse_args(argv)
    archs = [int(a) for a in opts.archs.split(",")]

    recorders = {name: _Recorder(getattr(triton_sgmv, name)) for name in KERNELS}
    for name, rec in recorders.items():
        setattr(triton_sgmv, name, rec)
    for name in SEGMENT_KERNELS:
        recorders[name] = _Recorder(getattr(triton_segment, name))
        setattr(triton_segment, name, recorders[name])
    # GPU heuristics rather than the interpreter's pinned config; an H100-like SM count.
    for mod in (triton_sgmv, triton_segment):
        mod.kernel_config = lambda kind, device, **shape: {
            **configs.heuristic_config(kind, **shape), **configs._overrides.get(kind, {})}
        mod.device_facts = lambda device: ("offline", 132)

    n_cases = 0
    quick = opts.only_segment or opts.packed_only or opts.fp8_only
    for case in ([] if opts.only_segment or opts.fp8_only else packed_cases() if opts.packed_only else cases(opts.full)):
        for split_k in ((1, 4) if case[1] >= 16 and case[-1] == "all" else (1,)):
            run_case(*case, split_k=split_k)
        n_cases += 1
    for case in ([] if opts.packed_only or opts.fp8_only else segment_cases()):
        run_segment_case(*case)
        n_cases += 1
    for case in ([] if quick else storage_cases()):
        run_case(*case[:-1], split_k=1, wdt=case[-1])
        n_cases += 1
    for case in ([] if opts.only_segment or opts.packed_only else fp8_cases()):
        for split_k in ((1, 4) if case[1] >= 16 and case[-2] == "all" else (1,)):
            run_case(*case[:-1], split_k=split_k, wdt=case[-1])
        n_cases += 1


    seen, failures, t0, table = {}, [], time.time(), []
    for name, rec in recorders.items():
        for grid, args, kwargs in rec.calls:
            for cap in archs:
                key, build = compile_launch(rec.fn, args, kwargs, cap)
                if key in seen:
                    continue
                cfg = {k: v for k, v in kwargs.items() if k.isupper() or k.startswith("num_")}
                try:
                    kernel = build()
                except Exception as e:  # report every failing specialisation, not just the first
                    seen[key] = None
                    failures.append((name, cap, cfg, repr(e).splitlines()[0][:300]))
                    continue
                seen[key] = kernel
                res = resources(kernel)
                stack = re.search(r"STACK:(\d+)", res)
                dtype = problem_dtype(name, args)
                if stack and int(stack.group(1)) > 0:
                    failures.append((name, cap, cfg, f"{dtype}: register spills ({res})"))
                vec = vector_problem(name, kwargs, kernel.asm.get("ptx", ""))
                if vec:
                    failures.append((name, cap, cfg, f"{dtype}: {vec}"))
                if opts.resources:
                    print(f"sm_{cap} {name} {dtype} {cfg}: {res}")
                table.append((cap, name, str(dtype).replace("torch.", ""), cfg, res))
    if opts.table:
        write_table(opts.table, table)
    print(f"triton_compile_check: triton {triton.__version__}, {n_cases} cases, {len(seen)} distinct compilations for sm_{archs}, "
          f"{len(failures)} failed, {time.time() - t0:.0f}s")
    for name, cap, kwargs, err in failures[:20]:
        print(f"FAILED sm_{cap} {name} {kwargs}: {err}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
