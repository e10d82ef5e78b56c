"""Decode step of a patched Hugging Face model on the CPU: base model vs openlora vs PEFT's mixed batch.

The issue's target (benchmark, not a timed test): a decode-shaped batch of 32 rows, one token
each, through a random-init Llama-shaped model (hidden 256, 4 layers), 16 distinct rank-16
adapters on all seven projections (two rows per adapter, interleaved). Our forward should take at
most 1.5x the base model's time and be at least 6x faster than PEFT's mixed batch
(``adapter_names=``), measured in the same run.

The contenders run in rotating order over several rounds (a shared 2-core machine is noisy); each
round times every contender with ``common.time_cpu`` and the reported figure is the median of the
round medians (p20/p80 over rounds). Diagnostic rows:

    floor_base_plus_adapter_read   the base forward, then one plain read (sum) of the adapter slot
                                   weights the batch uses: no implementation keeping the adapters
                                   in float32 can beat it
    openlora_without_lora_math     our forward with each layer's add_lora replaced by nothing
                                   (hooks, batch metadata, pool): the fixed cost of the patching
    openlora_reading_slots_only    each layer's add_lora replaced by a read of its slot weights,
                                   inside the forward (the weights then compete with the base
                                   model's for the caches)

Rows are appended to benchmarks/out/hf_cpu_decode.csv (untracked); the committed history is
benchmarks/results/hf_cpu_decode.csv: ``--out benchmarks/results/hf_cpu_decode.csv`` to add to it.
Progress (set-up, each round) goes to stderr.

    python -m benchmarks.bench_hf_cpu_decode            # ~1-2 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile

import torch

from benchmarks.common import RESULTS_DIR, env_info, progress, time_cpu, write_rows

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_VS_BASE = 1.5
TARGET_VS_PEFT = 6.0
DEFAULT_OUT = os.path.join(RESULTS_DIR, "hf_cpu_decode.csv")


def build(args):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    import openlora_kernels as olk

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=256)
    base = AutoModelForCausalLM.from_config(cfg).eval()
    tmp = tempfile.mkdtemp(prefix="olk_bench_")
    args.adapter_dir = tmp        # (the saved PEFT adapters, one folder per name: for other patchings)
    names = [f"adapter{i:02d}" for i in range(args.adapters)]
    lc = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=PROJECTIONS, init_lora_weights=False)
    peft_model = None
    for i, name in enumerate(names):
        torch.manual_seed(1000 + i)
        get_peft_model(copy.deepcopy(base), lc).save_pretrained(os.path.join(tmp, name))
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(tmp, name), adapter_name=name)
        else:
            peft_model.load_adapter(os.path.join(tmp, name), adapter_name=name)
    peft_model.eval()
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=args.adapters, max_rank=args.rank)
    for name in names:
        lm.load_adapter(name, os.path.join(tmp, name))
    with torch.no_grad():       # one forward first: the model finds its projection groups (hf_groups.py)
        lm(input_ids=torch.zeros(1, 1, dtype=torch.long), adapter_names=[None], use_cache=False)
    return base, lm, peft_model, names


def model_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The decode shape's arguments (what :func:`build` reads), shared with bench_storage_dtype."""
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    return ap


def main(argv=None):
    ap = model_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="CSV the rows are appended to (default: benchmarks/out/, untracked; "
                         "$OPENLORA_BENCH_OUT sets the folder)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)

    progress(f"bench_hf_cpu_decode: building the model and {args.adapters} PEFT adapters")
    base, lm, peft_model, names = build(args)
    ids = torch.randint(0, args.vocab, (args.rows, 1), generator=torch.Generator().manual_seed(1))
    row_names = [names[i % len(names)] for i in range(args.rows)]

    with torch.no_grad():
        ours = lm(input_ids=ids, use_cache=False, adapter_names=row_names).logits
        ref = peft_model(input_ids=ids, use_cache=False, adapter_names=row_names).logits
        base_out = base(input_ids=ids, use_cache=False).logits
    max_diff = (ours - ref).abs().max().item()
    lora_effect = (ref - base_out).abs().max().item()
    print(f"agreement with PEFT: max |ours - peft| = {max_diff:.3g} (LoRA changes logits by up to {lora_effect:.3g})")

    # A lower bound for any implementation: the base forward plus one read of the adapter weights
    # the batch uses (what the slots hold: 16 adapters x 7 projections x 4 layers), nothing else.
    slot_weights = [t for ls in lm.pool.layers.values() if ls.a is not None for t in (ls.a, ls.bt)]

    def floor():
        base(input_ids=ids, use_cache=False)
        for t in slot_weights:
            t.sum()

    # Breakdown of our forward: the same patched model with every layer's add_lora replaced by
    # nothing (hooks, batch metadata and pool only), or by a plain read of that layer's slots.
    layers = [ls for ls in lm.pool.layers.values() if ls.op is not None]
    real_ops = [ls.op for ls in layers]

    class DiagOp:
        """Stands in for a layer's op on both of the hook's paths (add_rows: the native fast path)."""

        def __init__(self, fn):
            self.fn = fn

        def __call__(self, y, x, meta):
            self.fn()
            return y

        def add_rows(self, y, x, rows):
            self.fn()
            return True

    def with_ops(make):
        def run():
            for ls in layers:
                ls.op = DiagOp(make(ls))
            try:
                return lm(input_ids=ids, use_cache=False, adapter_names=row_names)
            finally:
                for ls, op in zip(layers, real_ops):
                    ls.op = op
        return run

    contenders = {
        "base": lambda: base(input_ids=ids, use_cache=False),
        "openlora": lambda: lm(input_ids=ids, use_cache=False, adapter_names=row_names),
        "peft_mixed": lambda: peft_model(input_ids=ids, use_cache=False, adapter_names=row_names),
        "floor_base_plus_adapter_read": floor,
        "openlora_without_lora_math": with_ops(lambda ls: lambda: None),
        "openlora_reading_slots_only": with_ops(lambda ls: lambda: (ls.a.sum(), ls.bt.sum())),
    }
    medians = {k: [] for k in contenders}
    order = list(contenders)
    with torch.no_grad():
        for r in range(args.rounds):
            progress(f"bench_hf_cpu_decode: round {r + 1}/{args.rounds} of {len(order)} contenders")
            for name in order[r % len(order):] + order[:r % len(order)]:
                reps = max(3, args.reps // 5) if name == "peft_mixed" else args.reps
                medians[name].append(time_cpu(contenders[name], warmup=2, reps=reps)["median"])
    stats = {}
    for name, ms in medians.items():
        q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
        stats[name] = {"median": statistics.median(ms), "p20": q[1], "p80": q[7]}
    vs_base = stats["openlora"]["median"] / stats["base"]["median"]
    vs_peft = stats["peft_mixed"]["median"] / stats["openlora"]["median"]
    peft_vs_base = stats["peft_mixed"]["median"] / stats["base"]["median"]

    shape = (f"rows={args.rows},tokens=1,hidden={args.hidden},intermediate={args.intermediate},layers={args.layers},"
             f"vocab={args.vocab},adapters={args.adapters},r={args.rank},targets=7")
    weight_mb = sum(t.numel() * t.element_size() for t in slot_weights) / 2 ** 20
    print(f"adapter weights read per forward: {weight_mb:.1f} MiB (base model linear weights: "
          f"{sum(p.numel() * p.element_size() for n, p in base.named_parameters() if n.endswith('proj.weight')) / 2 ** 20:.1f} MiB)")
    for name, st in stats.items():
        print(f"{name:>28}: {st['median']:8.3f} ms (p20 {st['p20']:.3f}, p80 {st['p80']:.3f})"
              f"  {st['median'] / stats['base']['median']:.2f}x base")
    print(f"floor / base    = {stats['floor_base_plus_adapter_read']['median'] / stats['base']['median']:.2f}x "
          "(base forward + one read of the adapter weights)")
    print(f"openlora / base = {vs_base:.2f}x (target <= {TARGET_VS_BASE}x): {'met' if vs_base <= TARGET_VS_BASE else 'MISSED'}")
    print(f"peft / openlora = {vs_peft:.2f}x (target >= {TARGET_VS_PEFT}x): {'met' if vs_peft >= TARGET_VS_PEFT else 'MISSED'}")
    print(f"peft / base     = {peft_vs_base:.2f}x")
    if not args.no_write:
        env = env_info(torch.device("cpu"))
        rows = [{"benchmark": "hf_cpu_decode", "kernel": "model_forward", "contender": name, "shape": shape,
                 "metric": "latency", "unit": "ms", **st, "rounds": args.rounds,
                 "ratio_vs_base": st["median"] / stats["base"]["median"],
                 "max_abs_diff_vs_peft": max_diff if name == "openlora" else None}
                for name, st in stats.items()]
        print("wrote", write_rows(args.out, rows, env))


if __name__ == "__main__":
    main()
