"""Adapter storage dtype on the CPU decode step: base vs fp32 / bf16 / fp16 adapter storage.

Issue 15, point 2: ``patch_model(..., adapter_dtype=torch.bfloat16)`` on a float32 model keeps
the adapters' slots (and host copies) in bfloat16; the native kernels upcast on load and
accumulate in fp32. On a decode step the LoRA delta's time is mostly reading the adapter bytes
(bench_hf_cpu_decode's "floor" row), so halving them should bring the step close to the base
model's. Target: bf16 storage at most 1.15x the base model.

Shape: bench_hf_cpu_decode's (its model builder: a random-init Llama-shaped model, hidden 256,
4 layers, 16 rank-16 PEFT adapters on all seven projections, 32 decode rows, two per adapter).
Contenders, timed paired: a round calls each contender once, in an order rotating by round (a
shared machine's load changes within seconds; the contenders of one round see the same), after
three warm-up calls each. Per contender the median (p20 / p80) of its calls, and its ratio to the
base model: the median over rounds of its time over the base model's in the same round.

    base                      the unpatched model
    openlora_fp32 / _bf16 / _fp16 / _fp8   the patched model, adapters stored in that dtype
                              (fp8: float8_e4m3fn with a float32 scale per rank row, ops/fp8.py;
                              on the native cpu kernels where they run it, else backend "torch",
                              named in the row's ``backend``)
    floor_<dtype>             the base forward, then one read (sum) of that storage's slot
                              weights the batch uses (fp8: a max over its bytes, and its scales): no
                              implementation storing them in that dtype can beat it
    openlora_bf16_grouped     bf16 storage with group_projections=True (q/k/v and gate/up one
                              launch each; the default, "auto", groups nothing: this row is why)
    openlora_without_lora_math  the fp32-storage model with each layer's add_lora replaced by
                              nothing (hooks, metadata, pool: the fixed cost of the patching)
    lora_calls_<dtype>        the 28 native LoRA calls of a forward alone (each patched layer's
                              add_rows on the batch's rows), no model: the kernels' own time

fp8's scale axis: PEFT's adapters quantized and dequantized with lora_B's scales per rank row
(what we store) and per output channel (the alternative, N scales per adapter and layer),
against PEFT's float32 result, on the openlora_fp8 row (``sim_diff_vs_lora_effect_b_per_*``);
and the range of that error over six draws of each scale times a random factor in [1, 2)
(``sim_jitter_b_per_*_min`` / ``_max``: the same precision, other roundings).

Error: each storage's logits against PEFT's float32 mixed batch (``adapter_names=``), as the
largest absolute difference and relative to the LoRA's own effect on the logits (max |PEFT -
base|): fp32 storage only reorders sums; bf16 rounds every weight to 8 significant bits (relative
error up to u = 2^-8 per weight), fp16 to 11 (u = 2^-11), fp8 e4m3 to 4 (u = 2^-4).
tests/test_storage_dtype.py and tests/test_fp8_storage.py hold the model-level error to
(2u + u^2) per patched module, times the LoRA's effect.

    python -m benchmarks.bench_storage_dtype                       # ~2 minutes on 2 cores
    python -m benchmarks.bench_storage_dtype --out benchmarks/results/storage_dtype_cpu.csv

``rows(argv)`` returns the rows without writing them (benchmarks/bench_pool.py collects them).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from benchmarks import bench_hf_cpu_decode as decode
from benchmarks.common import RESULTS_DIR, env_info, no_lora_math, progress, write_rows

TARGET_BF16_VS_BASE = 1.15
DEFAULT_OUT = os.path.join(RESULTS_DIR, "storage_dtype_cpu.csv")
STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}


def peft_fp8(peft_model, b_axis: str, jitter: Optional[int] = None):
    """A copy of ``peft_model`` whose LoRA weights are quantized to fp8 e4m3 and dequantized:
    lora_A with a scale per row; lora_B per rank row (``b_axis="rank"``: what adapter_dtype=fp8
    stores, ops/fp8.py) or per output channel (``"output"``: a scale per row of B). ``jitter``: a
    seed; each scale is then multiplied by a random factor in [1, 2): the same precision (the
    row's largest value still inside e4m3's range, 3 mantissa bits for all), another rounding of
    each value: how much of an error is the particular rounding pattern."""
    from openlora_kernels.ops.fp8 import FP8, FP8_MAX, dequantize_rows, quantize_rows

    g = torch.Generator().manual_seed(jitter) if jitter is not None else None

    def q(w):
        if g is None:
            return dequantize_rows(*quantize_rows(w))
        amax = w.abs().amax(-1)
        sc = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)) * (1 + torch.rand(amax.shape, generator=g))
        return dequantize_rows((w / sc[..., None]).to(FP8), sc)

    m = copy.deepcopy(peft_model)
    with torch.no_grad():
        for pn, prm in m.named_parameters():
            if "lora_A" in pn or ("lora_B" in pn and b_axis == "output"):
                prm.copy_(q(prm.float()))
            elif "lora_B" in pn:
                prm.copy_(q(prm.float().T).T)
    return m


def _parser() -> argparse.ArgumentParser:
    ap = decode.model_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    ap.add_argument("--rounds", type=int, default=300, help="rounds of one call per contender")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave PyTorch's default)")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="CSV the rows are appended to (default: benchmarks/out/, untracked)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    return ap


def rows(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Runs the benchmark (arguments as on the command line) and returns its rows (not written)."""
    import openlora_kernels as olk

    args = _parser().parse_args(list(argv) if argv is not None else [])
    if args.threads:
        torch.set_num_threads(args.threads)
    progress(f"bench_storage_dtype: building the model and {args.adapters} PEFT adapters")
    base, lm32, peft_model, names = decode.build(args)
    models = {"fp32": lm32}
    from openlora_kernels.ops import cpu_ext
    backends = {"fp32": "cpu"}
    for tag in ("bf16", "fp16", "fp8"):
        # (fp8 on the native kernels where they run it, else on the reference: the row says which)
        backends[tag] = "cpu" if (torch.float32, STORAGE[tag]) in cpu_ext.MIXED_STORAGE else "torch"
        lm = olk.patch_model(copy.deepcopy(base), max_adapters=args.adapters, max_rank=args.rank,
                             adapter_dtype=STORAGE[tag], backend=backends[tag])
        for name in names:
            lm.load_adapter(name, os.path.join(args.adapter_dir, name))
        models[tag] = lm
    # bf16 storage with projection groups (group_projections=True: q/k/v and gate/up one launch
    # each; the default, "auto", groups nothing): what the default gives up, measured
    grouped = olk.patch_model(copy.deepcopy(base), max_adapters=args.adapters, max_rank=args.rank,
                              adapter_dtype=torch.bfloat16, group_projections=True)
    for name in names:
        grouped.load_adapter(name, os.path.join(args.adapter_dir, name))
    with torch.no_grad():       # (the first forward finds the groups)
        grouped(input_ids=torch.zeros(1, 1, dtype=torch.long), adapter_names=[None], use_cache=False)
    ids = torch.randint(0, args.vocab, (args.rows, 1), generator=torch.Generator().manual_seed(1))
    row_names = [names[i % len(names)] for i in range(args.rows)]

    with torch.no_grad():
        ref = peft_model(input_ids=ids, use_cache=False, adapter_names=row_names).logits
        base_out = base(input_ids=ids, use_cache=False).logits
        effect = (ref - base_out).abs().max().item()
        err = {}
        for tag, lm in models.items():
            d = (lm(input_ids=ids, use_cache=False, adapter_names=row_names).logits - ref).abs().max().item()
            err[tag] = (d, d / effect)
            print(f"{tag} storage: max |ours - peft fp32| = {d:.3g} ({d / effect:.3g} of the LoRA's effect "
                  f"{effect:.3g})")
        # fp8's scale axis for lora_B, simulated on PEFT: per rank row (ours: a column of B) against
        # per output channel (a row of B, N scales per adapter and layer); lora_A per row in both
        sim = {axis: peft_fp8(peft_model, axis)(input_ids=ids, use_cache=False, adapter_names=row_names).logits
               for axis in ("rank", "output")}
        fp8_sim = {axis: (lg - ref).abs().max().item() / effect for axis, lg in sim.items()}
        print(f"fp8, simulated on PEFT: B scaled per rank row {fp8_sim['rank']:.3g} of the effect, per output "
              f"channel {fp8_sim['output']:.3g}")
        jit = {axis: sorted((peft_fp8(peft_model, axis, seed)(input_ids=ids, use_cache=False, adapter_names=row_names)
                             .logits - ref).abs().max().item() / effect for seed in range(6))
               for axis in ("rank", "output")}
        for axis, v in jit.items():
            print(f"fp8, simulated, B per {axis}, scales x U[1, 2) (6 draws): {v[0]:.3g} .. {v[-1]:.3g} of the effect")

    def slot_weights(lm):
        return [t for ls in lm.pool.layers.values() if ls.a is not None
                for t in (ls.a, ls.bt, ls.a_scale, ls.b_scale) if t is not None]

    def floor(ws):
        # (fp8: no sum in torch; a max over its bytes reads each once, vectorised)
        ops = [(lambda t: t.view(torch.uint8).amax()) if t.dtype is STORAGE["fp8"] else torch.sum for t in ws]

        def run():
            base(input_ids=ids, use_cache=False)
            for op, t in zip(ops, ws):
                op(t)
        return run

    def without_math():
        with no_lora_math(lm32):          # (benchmarks/common.py: projection groups too)
            return lm32(input_ids=ids, use_cache=False, adapter_names=row_names)

    contenders = {"base": lambda: base(input_ids=ids, use_cache=False)}
    for tag, lm in models.items():
        contenders[f"openlora_{tag}"] = (lambda m: lambda: m(input_ids=ids, use_cache=False,
                                                             adapter_names=row_names))(lm)
    contenders["openlora_bf16_grouped"] = lambda: grouped(input_ids=ids, use_cache=False, adapter_names=row_names)
    for tag, lm in models.items():
        contenders[f"floor_{tag}"] = floor(slot_weights(lm))
    contenders["openlora_without_lora_math"] = without_math

    # The LoRA calls alone: each patched layer's native add_rows on the decode batch's rows (the
    # same slots, x and y of the layer's shapes), 28 calls, no model around them.
    from openlora_kernels.ops import cpu_ext

    def lora_calls(lm):
        slot = {a.name: a.slot for a in lm.memory_report().adapters}
        meta = olk.build_batch_meta(torch.tensor([slot[n] for n in row_names], dtype=torch.int32), args.adapters)
        rows_ = cpu_ext.row_args(meta)
        calls = [(ls.op, torch.randn(args.rows, ls.in_features), torch.zeros(args.rows, ls.out_features))
                 for ls in lm.pool.layers.values() if ls.op is not None]
        if rows_ is None or not all(op.add_rows(y, x, rows_) for op, x, y in calls):
            return None

        def run():
            for op, x, y in calls:
                op.add_rows(y, x, rows_)
        return run

    for tag, lm in models.items():
        if backends[tag] != "cpu":
            continue
        fn = lora_calls(lm)
        if fn is not None:
            contenders[f"lora_calls_{tag}"] = fn
    # Paired timing (a shared, loaded machine: another job's load changes within seconds): one
    # round calls every contender once, in an order rotating by round, so the contenders of a
    # round see the same load; a contender's ratio to the base model is the median over rounds
    # of its time divided by the base model's in the same round.
    times = {k: [] for k in contenders}
    order = list(contenders)
    with torch.no_grad():
        for fn in contenders.values():
            for _ in range(3):
                fn()
        for r in range(args.rounds):
            if r % max(1, args.rounds // 10) == 0:
                progress(f"bench_storage_dtype: round {r + 1}/{args.rounds} of {len(order)} contenders")
            for name in order[r % len(order):] + order[:r % len(order)]:
                t0 = time.perf_counter()
                contenders[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
    stats = {}
    for name, ms in times.items():
        q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
        ratios = [t / tb for t, tb in zip(ms, times["base"])]
        qr = statistics.quantiles(ratios, n=10, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 9
        stats[name] = {"median": statistics.median(ms), "p20": q[1], "p80": q[7],
                       "ratio": statistics.median(ratios), "ratio_p20": qr[1], "ratio_p80": qr[7]}
    shape = (f"rows={args.rows},tokens=1,hidden={args.hidden},intermediate={args.intermediate},layers={args.layers},"
             f"vocab={args.vocab},adapters={args.adapters},r={args.rank},targets=7")
    for tag, lm in models.items():
        mb = sum(t.numel() * t.element_size() for t in slot_weights(lm)) / 2 ** 20
        host = lm.memory_report().host_bytes / 2 ** 20
        print(f"{tag}: slot weights read per forward {mb:.2f} MiB, host copies {host:.2f} MiB")
    for name, st in stats.items():
        print(f"{name:>28}: {st['median']:8.3f} ms (p20 {st['p20']:.3f}, p80 {st['p80']:.3f})  {st['ratio']:.3f}x base "
              f"(paired; p20 {st['ratio_p20']:.3f}, p80 {st['ratio_p80']:.3f})")
    ratio = stats["openlora_bf16"]["ratio"]
    print(f"bf16 storage / base = {ratio:.2f}x (target <= {TARGET_BF16_VS_BASE}x): "
          f"{'met' if ratio <= TARGET_BF16_VS_BASE else 'MISSED'}")
    out = []
    for name, st in stats.items():
        tag = name.split("_")[1] if name.startswith(("openlora_fp", "openlora_bf")) else \
            name.rsplit("_", 1)[-1] if name.startswith(("floor_", "lora_calls_")) else None
        row = {"benchmark": "storage_dtype_cpu", "kernel": "model_forward", "contender": name, "shape": shape,
               "metric": "latency", "unit": "ms", "median": st["median"], "p20": st["p20"], "p80": st["p80"],
               "rounds": args.rounds, "ratio_vs_base": st["ratio"], "ratio_vs_base_p20": st["ratio_p20"],
               "ratio_vs_base_p80": st["ratio_p80"], "threads": torch.get_num_threads(), "adapter_dtype": tag,
               "backend": backends.get(tag, "") if name.startswith("openlora_") else ""}
        if name == f"openlora_{tag}" and tag in err:
            row["max_abs_diff_vs_peft_fp32"], row["diff_vs_lora_effect"] = err[tag]
            row["slot_bytes"] = sum(t.numel() * t.element_size() for t in slot_weights(models[tag]))
        if name == "openlora_fp8":
            for axis in ("rank", "output"):
                row[f"sim_diff_vs_lora_effect_b_per_{axis}"] = fp8_sim[axis]
                row[f"sim_jitter_b_per_{axis}_min"], row[f"sim_jitter_b_per_{axis}_max"] = jit[axis][0], jit[axis][-1]
        out.append(row)
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    rs = rows(argv)     # (sets the thread count before env_info reads it)
    if not args.no_write:
        print("wrote", write_rows(args.out, rs, env_info(torch.device("cpu"))))


if __name__ == "__main__":
    main()
