"""One base model, many LoRA adapters, one mixed batch: ``python -m openlora_kernels.demo``.

Builds a small random-init Llama-shaped model (nothing is downloaded), saves a handful of PEFT
adapters with PEFT itself (different ranks and target modules, one rsLoRA, one with a rank
pattern), registers them with :func:`openlora_kernels.patch_model`, serves one left-padded batch
whose rows use different adapters (and the base model), and prints for every adapter how far our
rows are from PEFT's, then the time of our forward against PEFT's mixed batch and the base model.

Runs on the CPU (backend "torch"); with a GPU present the model goes there and backend "auto"
picks the Triton kernels. Needs transformers and peft (``pip install openlora_kernels[hf]``).
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


def _timed(fn, device: torch.device, reps: int) -> float:
    """Median wall time of fn() in milliseconds (after two warm-up calls)."""
    times = []
    for i in range(reps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m openlora_kernels.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=24, help="longest prompt in the batch (others are shorter, left-padded)")
    ap.add_argument("--reps", type=int, default=10)
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
    for what, kw in ((f"prefill, {int(mask.sum())} tokens", dict(input_ids=ids, attention_mask=mask)),
                     ("decode-shaped, 1 token per row", dict(input_ids=step, use_cache=False))):
        with torch.no_grad():
            t_base = _timed(lambda: base(**kw), device, args.reps)
            t_ours = _timed(lambda: lm(adapter_names=ROWS, **kw), device, args.reps)
            t_peft = _timed(lambda: peft(adapter_names=peft_names, **kw), device, args.reps)
        print(f"\nforward of the mixed batch, {what} (median of {args.reps}):")
        print(f"  base model, no adapters   {t_base:8.2f} ms")
        print(f"  openlora_kernels          {t_ours:8.2f} ms  ({t_ours / t_base:.2f}x base)")
        print(f"  PEFT mixed batch          {t_peft:8.2f} ms  ({t_peft / t_base:.2f}x base, {t_peft / t_ours:.1f}x ours)")
    print("\n" + str(lm.memory_report()))
    print(f"\n{'OK' if ok else 'MISMATCH'}: every row within {tol:g} of PEFT with that row's adapter")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
