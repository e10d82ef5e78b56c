"""Prefill of a patched Hugging Face model on the CPU: the demo's batch, base model vs openlora vs PEFT.

The issue's target (benchmark, not a timed test): the prefill of ``python -m openlora_kernels.demo``
through openlora at most 1.15x the base model's time, measured in the same run. The same model
and batch as the demo: a random-init Llama-shaped model (hidden 256, 4 layers, intermediate 688,
4 heads, 2 KV heads), its five PEFT adapters (ranks 4 to 32 on different target modules, one
rsLoRA, one with rank and alpha patterns; openlora_kernels.demo.ADAPTERS) and its left-padded batch
of 10 rows of 6 to 24 tokens (8 rows with an adapter, 2 without; demo.ROWS), all 240 positions
through every layer.

Contenders (rotating order within each round; the figure is the median of the round medians,
p20/p80 over rounds, as in bench_hf_cpu_decode.py):

    base                         the unpatched model
    openlora                     patch_model, backend "auto" (the native CPU kernels)
    openlora_torch_backend       patch_model with backend "torch": the torch strategies (gather /
                                 segment / padded GEMMs) that backend "cpu" used for prefill-like
                                 batches before they went through the native kernel
    peft_mixed                   PEFT's mixed batch (adapter_names=)
    openlora_without_lora_math   our forward with each layer's add_lora replaced by nothing (hooks,
                                 metadata, pool): the fixed cost of the patching

Torch's default threads (what the demo gets) unless --threads. Rows go to --out
(benchmarks/results/hf_cpu_prefill.csv by default).

    python -m benchmarks.bench_hf_cpu_prefill            # ~1 minute on 2 cores
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

from benchmarks.common import RESULTS_DIR, env_info, no_lora_math, time_cpu, write_rows

TARGET_VS_BASE = 1.15


def build(args):
    """The demo's model, adapters and batch (openlora_kernels/demo.py, same seeds)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    import openlora_kernels as olk
    from openlora_kernels.demo import ADAPTERS, ROWS

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=(args.hidden * 8 // 3 + 7) // 8 * 8,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, pad_token_id=0)
    base = AutoModelForCausalLM.from_config(cfg).eval()
    tmp = tempfile.mkdtemp(prefix="olk_bench_prefill_")
    paths = {}
    for i, (name, (r, alpha, targets, extra)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        lc = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **extra)
        paths[name] = os.path.join(tmp, name)
        get_peft_model(copy.deepcopy(base), lc).save_pretrained(paths[name])
    peft = None
    for name, path in paths.items():
        if peft is None:
            peft = PeftModel.from_pretrained(copy.deepcopy(base), path, adapter_name=name)
        else:
            peft.load_adapter(path, adapter_name=name)
    peft.eval()
    models = {}
    for backend in ("auto", "torch"):
        lm = olk.patch_model(copy.deepcopy(base), max_adapters=8, max_rank=32, backend=backend)
        for name, path in paths.items():
            lm.load_adapter(name, path)
        models[backend] = lm
    g = torch.Generator().manual_seed(1)
    lengths = [max(2, args.seq - 2 * i) for i in range(len(ROWS))]
    ids = torch.randint(3, cfg.vocab_size, (len(ROWS), args.seq), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, args.seq - n:] = 1
    ids[mask == 0] = 0
    return base, models, peft, ids, mask, list(ROWS), [n if n is not None else "__base__" for n in ROWS]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=24, help="longest prompt (the demo's default)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, as in the demo)")
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "hf_cpu_prefill.csv"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    base, models, peft, ids, mask, rows, peft_rows = build(args)
    lm, lm_torch = models["auto"], models["torch"]
    kw = dict(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        ours = lm(adapter_names=rows, **kw).logits
        ours_torch = lm_torch(adapter_names=rows, **kw).logits
        ref = peft(adapter_names=peft_rows, **kw).logits
        plain = base(**kw).logits
    valid = mask.bool()
    max_diff = (ours - ref)[valid].abs().max().item()
    max_diff_torch = (ours_torch - ref)[valid].abs().max().item()
    effect = (ref - plain)[valid].abs().max().item()
    from openlora_kernels.ops.backends import resolve_backend
    backend = resolve_backend("auto", torch.device("cpu"))
    print(f"demo prefill batch: {len(rows)} rows x {args.seq} positions ({int(mask.sum())} real tokens), hidden "
          f"{args.hidden}, {args.layers} layers, {torch.get_num_threads()} threads, backend auto = {backend}")
    print(f"agreement with PEFT: max |ours - peft| = {max_diff:.3g} (backend torch: {max_diff_torch:.3g}; "
          f"the adapters change logits by up to {effect:.3g})")

    def without_math():
        with no_lora_math(lm):          # (benchmarks/common.py: projection groups too)
            return lm(adapter_names=rows, **kw)

    contenders = {
        "base": lambda: base(**kw),
        "openlora": lambda: lm(adapter_names=rows, **kw),
        "openlora_torch_backend": lambda: lm_torch(adapter_names=rows, **kw),
        "peft_mixed": lambda: peft(adapter_names=peft_rows, **kw),
        "openlora_without_lora_math": without_math,
    }
    medians = {k: [] for k in contenders}
    order = list(contenders)
    t0 = time.monotonic()
    with torch.no_grad():
        for r in range(args.rounds):
            for name in order[r % len(order):] + order[:r % len(order)]:
                reps = max(3, args.reps // 2) if name == "peft_mixed" else args.reps
                medians[name].append(time_cpu(contenders[name], warmup=2, reps=reps)["median"])
            ratio = medians["openlora"][-1] / medians["base"][-1]
            print(f"  round {r + 1}/{args.rounds}: base {medians['base'][-1]:.2f} ms, openlora "
                  f"{medians['openlora'][-1]:.2f} ms ({ratio:.2f}x base)  [{time.monotonic() - t0:.0f} s]", flush=True)
    stats = {}
    for name, ms in medians.items():
        q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
        stats[name] = {"median": statistics.median(ms), "p20": q[1], "p80": q[7]}
    b = stats["base"]["median"]
    for name, st in stats.items():
        print(f"{name:>28}: {st['median']:8.3f} ms (p20 {st['p20']:.3f}, p80 {st['p80']:.3f})  {st['median'] / b:.2f}x base")
    vs_base = stats["openlora"]["median"] / b
    spread = max((st["p80"] - st["p20"]) / st["median"] for st in stats.values())
    print(f"openlora / base = {vs_base:.2f}x (target <= {TARGET_VS_BASE}x): {'met' if vs_base <= TARGET_VS_BASE else 'MISSED'}")
    print(f"PEFT took {stats['peft_mixed']['median'] / stats['openlora']['median']:.1f}x our time; the torch "
          f"strategies {stats['openlora_torch_backend']['median'] / stats['openlora']['median']:.1f}x")
    if spread > 0.25:
        print(f"note: the p20-p80 spread reaches {spread:.0%} of a median: the machine is busy", file=sys.stderr)
    if not args.no_write:
        shape = (f"rows={len(rows)},seq={args.seq},tokens={int(mask.sum())},hidden={args.hidden},layers={args.layers},"
                 f"adapters=demo(5: r=4..32),dtype=float32")
        env = env_info(torch.device("cpu"))
        out = [{"benchmark": "hf_cpu_prefill", "kernel": "model_forward", "contender": name, "shape": shape,
                "metric": "latency", "unit": "ms", **st, "rounds": args.rounds, "backend": backend,
                "ratio_vs_base": st["median"] / b,
                "max_abs_diff_vs_peft": {"openlora": max_diff, "openlora_torch_backend": max_diff_torch}.get(name)}
               for name, st in stats.items()]
        print("wrote", write_rows(args.out, out, env))


if __name__ == "__main__":
    main()
