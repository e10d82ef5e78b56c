"""Four tenants fine-tuned together over one frozen base: ``python -m openlora_kernels.train_demo``.

A small random-init Llama-shaped model (nothing is downloaded) is the frozen base. Each tenant
has its own synthetic task (map every token t to (a*t + b) mod vocab, with its own a and b) and
its own rank-8 LoRA adapter on all linear layers, created by PEFT (lora_B = 0: training starts
from the base model). Every step, ONE mixed batch of all tenants' rows goes through
``patch_model``'s model, one backward gives each adapter the gradient of its own rows, one AdamW
step updates all four. The same four adapters are also trained by PEFT one after another (the
usual way: one PEFT model per tenant, its own rows). The demo prints each tenant's loss curve from
both, checks that they agree, and times a step of each. Exits 1 if the curves disagree or a loss
does not fall. Needs transformers and peft (``pip install openlora_kernels[hf]``).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from typing import Dict, List, Tuple

import torch


def make_base(hidden: int = 64, layers: int = 2, vocab: int = 128, seed: int = 0):
    """A frozen random-init Llama-shaped causal LM (no download)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tenant_rows(k: int, rows: int, seq: int, vocab: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input ids, targets) [rows, seq] of tenant k's task: target = (a_k * token + b_k) mod vocab."""
    g = torch.Generator().manual_seed(1000 * seed + k)
    ids = torch.randint(1, vocab, (rows, seq), generator=g)
    return ids, (ids * (2 * k + 3) + 5 * k + 1) % vocab


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over tokens (so per-tenant losses, and gradients, simply add up)."""
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                             reduction="sum")


def save_fresh_adapters(base, names: List[str], root: str, r: int = 8, seed: int = 0) -> Dict[str, str]:
    """PEFT-created adapters (PEFT's default init: lora_B = 0), saved as PEFT saves them."""
    from peft import LoraConfig, get_peft_model

    paths = {}
    for i, name in enumerate(names):
        torch.manual_seed(seed + i)
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_peft_model(copy.deepcopy(base), cfg).save_pretrained(f"{root}/{name}")
        paths[name] = f"{root}/{name}"
    return paths


def main(argv=None) -> int:
    import openlora_kernels as olk
    from peft import PeftModel

    ap = argparse.ArgumentParser(prog="python -m openlora_kernels.train_demo", description=__doc__.split("\n")[0])
    ap.add_argument("--tenants", type=int, default=4)
    ap.add_argument("--rows", type=int, default=4, help="rows per tenant in a step")
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))

    base = make_base()
    vocab = base.config.vocab_size
    names = [f"tenant{k}" for k in range(args.tenants)]
    data = [tenant_rows(k, args.rows, args.seq, vocab) for k in range(args.tenants)]
    ids = torch.cat([d[0] for d in data])
    targets = torch.cat([d[1] for d in data])
    rows = [n for n in names for _ in range(args.rows)]
    with tempfile.TemporaryDirectory() as root:
        paths = save_fresh_adapters(base, names, root)
        lm = olk.patch_model(copy.deepcopy(base), max_adapters=args.tenants, max_rank=8)
        for n in names:
            lm.load_adapter(n, paths[n], trainable=True)
        ours_opt = torch.optim.AdamW([p for n in names for p in lm.adapter_parameters(n).values()], lr=args.lr)
        peft = [PeftModel.from_pretrained(copy.deepcopy(base), paths[n], is_trainable=True) for n in names]
        peft_opt = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=args.lr) for m in peft]

        def ours_step() -> List[float]:
            ours_opt.zero_grad()
            logits = lm(input_ids=ids, adapter_names=rows).logits
            per = [token_loss(logits[k * args.rows:(k + 1) * args.rows], data[k][1]) for k in range(args.tenants)]
            torch.stack(per).sum().backward()
            ours_opt.step()
            return [p.item() for p in per]

        def peft_step() -> List[float]:
            out = []
            for k, (m, opt) in enumerate(zip(peft, peft_opt)):
                opt.zero_grad()
                loss = token_loss(m(input_ids=data[k][0]).logits, data[k][1])
                loss.backward()
                opt.step()
                out.append(loss.item())
            return out

        curves = {"ours": [], "peft": []}
        times = {"ours": [], "peft": []}
        for step in range(args.steps):
            order = (("ours", ours_step), ("peft", peft_step)) if step % 2 == 0 else (("peft", peft_step), ("ours", ours_step))
            for who, fn in order:
                t0 = time.perf_counter()
                curves[who].append(fn())
                times[who].append((time.perf_counter() - t0) * 1e3)

    tokens = args.rows * args.seq
    print(f"{args.tenants} tenants x {args.rows} rows x {args.seq} tokens, rank-8 LoRA on all linear layers, "
          f"AdamW lr {args.lr}; loss per token (ours / PEFT trained alone):")
    header = "step " + " ".join(f"{n:>17}" for n in names)
    print(header)
    for step in sorted(set(list(range(0, args.steps, 5)) + [args.steps - 1])):
        cells = [f"{curves['ours'][step][k] / tokens:8.4f}/{curves['peft'][step][k] / tokens:<8.4f}"
                 for k in range(args.tenants)]
        print(f"{step:>4} " + " ".join(cells))
    worst = max(abs(a - b) / max(abs(b), 1e-6) for so, sp in zip(curves["ours"], curves["peft"]) for a, b in zip(so, sp))
    fell = all(curves["ours"][-1][k] < 0.8 * curves["ours"][0][k] for k in range(args.tenants))
    t_ours, t_peft = statistics.median(times["ours"][2:]), statistics.median(times["peft"][2:])
    print(f"largest relative difference of a loss, ours vs PEFT: {worst:.2e}")
    print(f"time per step (median): ours {t_ours:.1f} ms for all {args.tenants} tenants in one batch; "
          f"PEFT {t_peft:.1f} ms for the {args.tenants} trainings one after another "
          f"(PEFT took {t_peft / t_ours:.2f}x our time; CPU timings, one run)")
    ok = worst < 1e-3 and fell
    if not ok:
        print("FAILED: " + ("the curves disagree" if worst >= 1e-3 else "a loss did not fall by 20%"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
