"""One base model, many LoRA adapters, one mixed batch: ``python -m openlora_kernels.demo``.

Builds a small random-init Llama-shaped model (nothing is downloaded), saves a handful of PEFT
adapters with PEFT itself (different ranks and target modules, one rsLoRA, one with a rank
pattern), registers them with :func:`openlora_kernels.patch_model`, serves one left-padded batch
whose rows use different adapters (and the base model), and prints for every adapter how far our
rows are from PEFT's, then the time of our forward against PEFT's mixed batch and the base model:
medians and p20-p80 over interleaved repeats, with a warning when the spread says the machine is
too busy for the figures to mean much. Exits 1 if a row disagrees with PEFT.

Runs on the CPU (backend "auto": the native CPU kernels when built, else "torch"); with a GPU
present the model goes there and backend "auto" picks the Triton kernels. Needs transformers and
peft (``pip install openlora_kernels[hf]``).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings

import torch

ADAPTERS = {
    # name: (rank, alpha, target modules, extra LoraConfig arguments)
    "medical": (8, 16, ["q_proj", "v_proj"], {}),
    "legal": (16, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              {"use_rslora": True}),
    "finance": (4, 8, ["gate_proj", "up_proj", "down_proj"], {}),
    "support": (12, 24, "all-linear", {"rank_pattern": {"o_proj": 4}, "alpha_pattern": {"down_proj": 6}}),
    "code": (32, 32, ["q_proj", "v_proj", "down_proj"], {}),
}
ROWS = ["medical", "legal", None, "finance", "support", "code", "legal", "medical", "__base__", "support"]


NOISY_SPREAD = 0.20   # p20-p80 wider than this fraction of the median: the machine is busy


def quantile(values, q: float) -> float:
    """The q-quantile (0..1) of ``values``, linear between the two nearest samples."""
    s = sorted(values)
    if not s:
        raise ValueError("quantile: no values")
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def spread(values) -> dict:
    """median, p20 and p80 of ``values``."""
    return {"median": quantile(values, 0.5), "p20": quantile(values, 0.2), "p80": quantile(values, 0.8)}


def time_interleaved(fns: dict, device: torch.device, repeats: int, warmup: int = 2) -> dict:
    """Wall time of each ``fns[name]()`` in ms, ``repeats`` samples each, interleaved: repeat i
    calls every contender once, starting with a different one each time, so a slow spell of a
    shared machine falls on all of them alike (after ``warmup`` untimed calls of each)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples = {name: [] for name in names}
    for i in range(repeats):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fns[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


def timing_report(samples: dict, labels: dict, noisy_spread: float = NOISY_SPREAD):
    """Lines describing interleaved timings of "base", "ours" and "peft" (ms samples, same repeats),
    and the reasons the machine looks too noisy to trust them ([] when it does not).

    Ratios are taken repeat by repeat (the contenders of one repeat ran back to back, so a slow
    spell hits both sides of a ratio): their median, with their p20-p80, worded one way: "ours
    took 1.16x the base model's time", "PEFT took 2.1x our time"."""
    st = {name: spread(v) for name, v in samples.items()}
    paired = {
        "ours": ("base", "ours took {r:.2f}x the base model's time", "{lo:.2f}x-{hi:.2f}x"),
        "peft": ("ours", "PEFT took {r:.1f}x our time", "{lo:.1f}x-{hi:.1f}x"),
    }
    lines, noisy = [], []
    for name in ("base", "ours", "peft"):
        s = st[name]
        line = f"  {labels[name]:<26}{s['median']:8.2f} ms  (p20-p80 {s['p20']:.2f}-{s['p80']:.2f})"
        if name in paired:
            ref, text, rng = paired[name]
            ratios = [a / b for a, b in zip(samples[name], samples[ref])]
            line += f"  {text.format(r=quantile(ratios, 0.5))} " \
                    f"(p20-p80 {rng.format(lo=quantile(ratios, 0.2), hi=quantile(ratios, 0.8))})"
        lines.append(line)
    widths = {name: (st[name]["p80"] - st[name]["p20"]) / st[name]["median"] for name in ("base", "ours", "peft")}
    worst = max(widths, key=widths.get)
    if widths[worst] > noisy_spread:
        noisy.append(f"p20-p80 spans up to {100 * widths[worst]:.0f}% of a median ({labels[worst].strip()})")
    if st["ours"]["median"] < st["base"]["p20"]:
        noisy.append("ours came out faster than the base model, which does strictly less work")
    return lines, noisy


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m openlora_kernels.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=24, help="longest prompt in the batch (others are shorter, left-padded)")
    ap.add_argument("--reps", type=int, default=15, help="interleaved timing repeats of each forward")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = ap.parse_args(argv)

    try:
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM, LlamaConfig
    except ImportError as e:
        print(f"the demo needs transformers and peft: pip install 'openlora_kernels[hf]' ({e})", file=sys.stderr)
        return 2
    import openlora_kernels as olk

    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=(args.hidden * 8 // 3 + 7) // 8 * 8,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, pad_token_id=0)
    base = AutoModelForCausalLM.from_config(cfg).eval()

    # 1. PEFT writes the adapters, exactly as a user's fine-tuning run would.
    tmp = tempfile.mkdtemp(prefix="openlora_demo_")
    paths = {}
    for i, (name, (r, alpha, targets, extra)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        lc = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **extra)
        paths[name] = os.path.join(tmp, name)
        get_peft_model(copy.deepcopy(base), lc).save_pretrained(paths[name])

    # 2. PEFT's own multi-adapter model: the reference and the contender.
    peft = None
    for name, path in paths.items():
        if peft is None:
            peft = PeftModel.from_pretrained(copy.deepcopy(base), path, adapter_name=name)
        else:
            peft.load_adapter(path, adapter_name=name)
    peft = peft.eval().to(device)

    # 3. Ours: patch a copy of the base model, register the adapters (read now, copied to a
    #    device slot when a batch first needs them).
    lm = olk.patch_model(copy.deepcopy(base).to(device), max_adapters=8, max_rank=32)
    for name, path in paths.items():
        lm.load_adapter(name, path)
    base = base.to(device)

    g = torch.Generator().manual_seed(1)
    lengths = [max(2, args.seq - 2 * i) for i in range(len(ROWS))]
    ids = torch.randint(3, cfg.vocab_size, (len(ROWS), args.seq), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, args.seq - n:] = 1
    ids[mask == 0] = 0
    ids, mask = ids.to(device), mask.to(device)
    peft_names = [n if n is not None else "__base__" for n in ROWS]

    with torch.no_grad():
        ours = lm(input_ids=ids, attention_mask=mask, adapter_names=ROWS).logits
        ref = peft(input_ids=ids, attention_mask=mask, adapter_names=peft_names).logits
        plain = base(input_ids=ids, attention_mask=mask).logits

    backend = olk.ops.backends.resolve_backend("auto", device)
    print(f"openlora_kernels demo: Llama-shaped random model, hidden {args.hidden}, {args.layers} layers, "
          f"batch of {len(ROWS)} rows (left-padded, up to {args.seq} tokens), device {device}, backend {backend}")
    tol = 1e-4 if device.type == "cpu" else 2e-2   # GPU fp32 matmuls may use TF32
    ok = True
    print(f"\n{'adapter':<10} {'rank':>4} {'rows':>5}  {'max |ours - PEFT|':>18}  {'max |adapter - base|':>20}")
    for name in list(ADAPTERS) + ["(base)"]:
        rows = [i for i, n in enumerate(ROWS) if (n == name) or (name == "(base)" and n in (None, "__base__"))]
        diff = max(float((ours[i] - ref[i])[mask[i].bool()].abs().max()) for i in rows)
        effect = max(float((ref[i] - plain[i])[mask[i].bool()].abs().max()) for i in rows)
        ok &= diff <= tol
        rank = ADAPTERS[name][0] if name in ADAPTERS else "-"
        print(f"{name:<10} {rank:>4} {len(rows):>5}  {diff:>18.2e}  {effect:>20.3f}")

    step = ids[:, -1:]      # decode-shaped: one token per row
    labels = {"base": "base model, no adapters", "ours": "openlora_kernels", "peft": "PEFT mixed batch"}
    any_noisy = []
    for what, kw in ((f"prefill, {int(mask.sum())} tokens", dict(input_ids=ids, attention_mask=mask)),
                     ("decode-shaped, 1 token per row", dict(input_ids=step, use_cache=False))):
        with torch.no_grad():
            samples = time_interleaved({"base": lambda: base(**kw), "ours": lambda: lm(adapter_names=ROWS, **kw),
                                        "peft": lambda: peft(adapter_names=peft_names, **kw)}, device, args.reps)
        lines, noisy = timing_report(samples, labels)
        print(f"\nforward of the mixed batch, {what}: median of {args.reps} interleaved repeats")
        print("\n".join(lines))
        any_noisy += [f"{what.split(',')[0]}: {n}" for n in noisy]
    if any_noisy:
        print(f"\nWARNING: this machine looks busy, so the timings above are unreliable "
              f"({'; '.join(any_noisy)}): other work is sharing the {device.type.upper()}. Rerun on a quiet "
              f"machine, or with more repeats (--reps {max(3 * args.reps, 30)}).")
    print("\n" + str(lm.memory_report()))
    print(f"\n{'OK' if ok else 'MISMATCH'}: every row within {tol:g} of PEFT with that row's adapter")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
