"""Batch-metadata build on the CPU: build_batch_meta against vLLM's update_metadata, same batches.

The issue's target (benchmark, not a timed test): for T <= 512 rows, ``olk.build_batch_meta``
on this CPU under vLLM's ``PunicaWrapperCPU.update_metadata`` (the issue measured 100-289 µs)
and SGLang's ``prepare_lora_batch`` (92-132 µs in the issue; SGLang is not installed here, so
that figure is the issue's, not measured by this script), without adding host syncs on GPUs
(the GPU build is unchanged: device ops with fixed-size outputs; the CPU one is a counting sort
in the native extension).

Batches (benchmarks/workloads.py; the pool is modelled with max(64, U) slots, as bench_kernels
does): decode, T requests of one row each, every request its own adapter (distinct) or skewed
popularity; prefill, 8 requests of T / 8 rows. Contenders, timed on the same batch in rotating
order within each round (median of the round medians, p20/p80 over rounds):

    olk                  build_batch_meta(slots, S) from a [T] int32 CPU tensor: what a patched
                         model and the ops pay per forward
    olk_from_list        the same from a Python list of slots (torch.tensor first), as a server
                         holding its mapping in lists would
    olk_torch_ops        the device build (sort, scatter-add, cumsum, searchsorted) run on the
                         CPU: what build_batch_meta cost on the CPU before the native build
    vllm_update_metadata vLLM's PunicaWrapperCPU.update_metadata(mapping, ...) from a
                         LoRAMapping (LoRA id per token and per request), is_prefill as vLLM v1
                         always passes
    olk_vllm_wrapper     our PunicaWrapperOpenLoRA.update_metadata on the same LoRAMapping
                         (openlora_kernels/integrations/vllm.py): the like-for-like row

One torch thread by default (--threads): the build is serial work; a busy 2-core machine would
otherwise measure its scheduler. Rows go to --out (benchmarks/results/metadata_cpu.csv).

    python -m benchmarks.bench_metadata           # ~1 minute
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import namedtuple

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import torch  # noqa: E402

from benchmarks import workloads  # noqa: E402
from benchmarks.common import RESULTS_DIR, env_info, time_cpu, write_rows  # noqa: E402

Mapping = namedtuple("Mapping", "index_mapping prompt_mapping is_prefill")   # vllm.lora.layers.LoRAMapping's fields
Batch = namedtuple("Batch", "regime workload T requests")
BATCHES = [Batch("decode", w, T, T) for w in ("distinct", "skewed") for T in (1, 8, 32, 64, 128, 256, 512)] + \
          [Batch("prefill", "distinct", T, 8) for T in (64, 256, 512, 2048)]
QUICK = [Batch("decode", "distinct", 8, 8), Batch("prefill", "distinct", 64, 8)]
SGLANG_ISSUE_US = (92, 132)          # prepare_lora_batch, as quoted in the issue (not measured here)
VLLM_ISSUE_US = (100, 289)


def make(b: Batch, pool_slots: int):
    """(slot tensor, slot list, S, vLLM mapping, lora_index_to_id) of one batch."""
    seq = b.T // b.requests
    slots = workloads.token_slots(b.workload, b.requests, seq, seed=0)
    U = int(slots.max()) + 1
    S = max(pool_slots, U)
    ids = [s + 1 for s in slots.tolist()]                        # vLLM LoRA ids start at 1
    req = [ids[r * seq + seq - 1] for r in range(b.requests)]    # one sampled token per request
    return (slots.to(torch.int32), slots.tolist(), S, Mapping(tuple(ids), tuple(req), True),
            list(range(1, S + 1)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two batches, two rounds (smoke test)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--pool-slots", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "metadata_cpu.csv"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 9)
    reps = args.reps or (10 if args.quick else 60)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, QUICK if args.quick else BATCHES, rounds, reps)
    finally:
        torch.set_num_threads(threads)


def _run(args, batches, rounds: int, reps: int) -> int:
    import openlora_kernels as olk
    from openlora_kernels.metadata import _build_impl, _native_builder
    from openlora_kernels.checks import check_slot_indices

    try:
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

        from openlora_kernels.integrations import vllm as ours_vllm
        vllm_version = ours_vllm.check_vllm_version()
    except ImportError as e:
        PunicaWrapperCPU, vllm_version = None, None
        print(f"vLLM is not installed ({e}): its contenders are skipped")
    native = _native_builder() is not None
    print(f"native metadata build: {'yes' if native else 'no (the extension is not built: torch ops)'}; "
          f"vLLM {vllm_version}; {torch.get_num_threads()} thread(s)")
    env = env_info(torch.device("cpu"))
    rows = []
    for b in batches:
        slots, slot_list, S, mapping, index_to_id = make(b, args.pool_slots)
        contenders = {
            "olk": lambda: olk.build_batch_meta(slots, S),
            "olk_from_list": lambda: olk.build_batch_meta(torch.tensor(slot_list, dtype=torch.int32), S),
            "olk_torch_ops": lambda: (check_slot_indices(slots, S),
                                      _build_impl(slots, S, olk.choose_block_m(b.T, S))),
        }
        if PunicaWrapperCPU is not None:
            cap = max(b.T, 256)
            vw = PunicaWrapperCPU(cap, max(b.requests, 8), "cpu")
            ow = ours_vllm.PunicaWrapperOpenLoRA(cap, max(b.requests, 8), "cpu")
            contenders["vllm_update_metadata"] = lambda: vw.update_metadata(mapping, index_to_id, S + 1, 32000)
            contenders["olk_vllm_wrapper"] = lambda: ow.update_metadata(mapping, index_to_id, S + 1, 32000)
        medians = {k: [] for k in contenders}
        order = list(contenders)
        with torch.inference_mode():
            for r in range(rounds):
                for name in order[r % len(order):] + order[:r % len(order)]:
                    medians[name].append(time_cpu(contenders[name], warmup=3, reps=reps)["median"] * 1e3)
        shape = f"regime={b.regime},workload={b.workload},T={b.T},requests={b.requests},S={S}"
        stats = {}
        for name, us in medians.items():
            q = statistics.quantiles(us, n=10, method="inclusive") if len(us) > 1 else [us[0]] * 9
            stats[name] = {"median": statistics.median(us), "p20": q[1], "p80": q[7]}
        vl = stats.get("vllm_update_metadata")
        line = "  ".join(f"{n} {s['median']:7.1f}" for n, s in stats.items())
        print(f"{shape:58s} µs: {line}", flush=True)
        for name, st in stats.items():
            rows.append({"benchmark": "metadata", "kernel": "batch_metadata", "contender": name, "shape": shape,
                         "metric": "latency", "unit": "us", **st, "rounds": rounds, "reps": reps, "T": b.T,
                         "regime": b.regime, "workload": b.workload, "S": S, "native": native,
                         "vllm": vllm_version, "threads": torch.get_num_threads(),
                         "vs_vllm": (vl["median"] / st["median"]) if vl else None})
    ours = [r for r in rows if r["contender"] == "olk" and r["T"] <= 512]
    worst = max(r["median"] for r in ours)
    vllm_best = min((r["median"] for r in rows if r["contender"] == "vllm_update_metadata" and r["T"] <= 512),
                    default=None)
    print(f"build_batch_meta, T <= 512: at most {worst:.1f} µs; vLLM's update_metadata at least "
          + (f"{vllm_best:.1f} µs here" if vllm_best else "(not measured)")
          + f" ({VLLM_ISSUE_US[0]}-{VLLM_ISSUE_US[1]} in the issue); SGLang's prepare_lora_batch "
          f"{SGLANG_ISSUE_US[0]}-{SGLANG_ISSUE_US[1]} µs (from the issue, not measured): "
          + ("met" if worst < min(SGLANG_ISSUE_US[0], vllm_best or 1e9) else "MISSED"))
    if not args.no_write:
        print("wrote", write_rows(args.out, rows, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
