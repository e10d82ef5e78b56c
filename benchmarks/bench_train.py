"""Training step of many adapters at once, against PEFT looping over them (CPU).

    python -m benchmarks.bench_train                 # prints, and appends rows to --out
    python -m benchmarks.bench_train --no-write

The model is train_demo's tiny random Llama (frozen; ``--hidden`` / ``--layers`` change it). Each of
``--adapters`` adapters (rank 8, all linear layers, PEFT's init) has ``--rows`` rows of its own
synthetic task. One step:

  ours   one mixed batch of all rows through ``patch_model``'s model, one backward (each adapter's
         Parameters get the gradient of their own rows), one AdamW step over all adapters;
  peft   one PeftModel holding every adapter: for each adapter ``set_adapter``, forward and
         backward its own rows; then one AdamW step over all adapters (the same optimizer for both:
         PyTorch's fused AdamW by default; ``--adamw foreach`` / ``single`` for the multi-tensor
         and per-tensor versions).

Both start from the same adapters and the same data; the script first checks that one step gives
both the same gradients (fp32, relative 1e-5), so it times the same computation. Contenders
alternate in every round (load on the machine hits both); medians over rounds. Rows go to
benchmarks/out/train_cpu.csv (untracked; ``--out benchmarks/results/train_cpu.csv`` adds to the
committed history) with the device, versions and commit.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch

from . import common

RESULTS = os.path.join(common.RESULTS_DIR, "train_cpu.csv")


def main(argv=None) -> int:
    import openlora_kernels as olk
    from openlora_kernels.train_demo import make_base, save_fresh_adapters, tenant_rows, token_loss
    from peft import PeftModel

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_train", description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--adamw", choices=("fused", "foreach", "single"), default="fused",
                    help="the AdamW implementation both use: PyTorch's fused kernel (default), its "
                         "multi-tensor one (foreach=True) or its per-tensor loop (foreach=False)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    base = make_base(hidden=args.hidden, layers=args.layers)
    vocab = base.config.vocab_size
    names = [f"a{k}" for k in range(args.adapters)]
    data = [tenant_rows(k, args.rows, args.seq, vocab) for k in range(args.adapters)]
    ids = torch.cat([d[0] for d in data])
    rows = [n for n in names for _ in range(args.rows)]
    with tempfile.TemporaryDirectory() as root:
        paths = save_fresh_adapters(base, names, root)
        lm = olk.patch_model(copy.deepcopy(base), max_adapters=args.adapters, max_rank=8)
        for n in names:
            lm.load_adapter(n, paths[n], trainable=True)
        pm = PeftModel.from_pretrained(copy.deepcopy(base), paths[names[0]], adapter_name=names[0], is_trainable=True)
        for n in names[1:]:
            pm.load_adapter(paths[n], adapter_name=n, is_trainable=True)
    ours_params = {n: lm.adapter_parameters(n) for n in names}
    peft_params = {n: {k[len("base_model.model."):].replace(f".{n}.weight", ""): p
                       for k, p in pm.named_parameters() if f".{n}." in k and "lora_" in k} for n in names}
    opt_kw = dict(lr=1e-2, **{"fused": dict(fused=True), "foreach": dict(foreach=True),
                              "single": dict(foreach=False)}[args.adamw])
    ours_opt = torch.optim.AdamW([p for n in names for p in ours_params[n].values()], **opt_kw)
    peft_opt = torch.optim.AdamW([p for n in names for p in peft_params[n].values()], **opt_kw)

    def ours_step():
        ours_opt.zero_grad()
        logits = lm(input_ids=ids, adapter_names=rows).logits
        loss = sum(token_loss(logits[k * args.rows:(k + 1) * args.rows], data[k][1]) for k in range(args.adapters))
        loss.backward()
        ours_opt.step()

    def peft_step():
        peft_opt.zero_grad()
        for k, n in enumerate(names):
            pm.base_model.set_adapter(n)
            token_loss(pm(input_ids=data[k][0]).logits, data[k][1]).backward()
        peft_opt.step()

    # Same computation: from identical weights, one step's gradients agree (fp32, relative 1e-5).
    # (Weights after many AdamW steps are not compared: Adam normalises tiny gradients, e.g. lora_A's
    # while lora_B is still near its zero init, so rounding differences grow into visible ones.)
    failures = []
    ours_step(), peft_step()
    for n in names:
        for k, p in peft_params[n].items():
            g, w = ours_params[n][k].grad, p.grad
            if g is None or not torch.allclose(g, w, rtol=1e-5, atol=1e-6 * max(w.abs().max().item(), 1e-3)):
                failures.append(f"{n} {k}: our gradient differs from PEFT's")
    times = {"ours": [], "peft": []}
    for r in range(args.rounds + 2):
        order = (("ours", ours_step), ("peft", peft_step)) if r % 2 == 0 else (("peft", peft_step), ("ours", ours_step))
        for who, fn in order:
            t0 = time.perf_counter()
            fn()
            if r >= 2:
                times[who].append((time.perf_counter() - t0) * 1e3)
        print(f"\rround {r + 1}/{args.rounds + 2}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    q = {who: common.quantiles(t) for who, t in times.items()}
    speedup = q["peft"]["median"] / q["ours"]["median"]
    shape = (f"adapters={args.adapters},rows={args.rows},seq={args.seq},hidden={args.hidden},layers={args.layers},r=8,"
             f"adamw={args.adamw},threads={args.threads}")
    env = common.env_info(torch.device("cpu"))
    for who in ("ours", "peft"):
        print(f"{who:>5}: {q[who]['median']:8.2f} ms per step (p20 {q[who]['p20']:.2f}, p80 {q[who]['p80']:.2f})")
    print(f"PEFT took {speedup:.2f}x our time per step (target >= 3x): {'met' if speedup >= 3 else 'MISSED'}")
    if not args.no_write:
        out = [{"benchmark": "train", "kernel": "train_step", "contender": who, "shape": shape, "metric": "step_time",
                "unit": "ms", **q[who], "peft_over_ours": round(speedup, 3)} for who in ("ours", "peft")]
        print("wrote", common.write_rows(args.out, out, env))
    for f in failures[:5]:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
