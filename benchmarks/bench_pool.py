"""The device pool: adapters resident per GiB, packed against padded, and the cost of a load (CPU).

    python -m benchmarks.bench_pool [--out benchmarks/results/pool_cpu.csv] [--quick]

A patched random Llama-shaped model (the seven projections of every layer: the layers the adapters
target, so that neither pool reserves bytes for a layer no adapter uses) and adapters of ranks
8 / 16 / 32 / 64 / 128 in equal shares, max_rank = 128:

  capacity   the padded pool (``patch_model(max_adapters=M, max_rank=128)``: M slots of 128 rows
             per layer) against the rank-packed pool given the SAME device bytes
             (``device_budget_bytes`` = the padded pool's slot bytes). Adapters are leased one at
             a time in rank order 8, 16, 32, 64, 128, 8, ...: ``resident_at_first_eviction`` is how
             many are resident when the first one has to be evicted; ``resident_churn_mean`` the
             mean resident count over a further 4 x that many leases of randomly chosen adapters
             (LRU eviction by bytes and compaction at work). Per GiB = count / budget in GiB.
  load       the time of one lease that has to load its adapter (evict, copy the rows, publish
             every layer) into a padded slot and into a packed one, per rank: two adapters of
             that rank alternate in a pool with room for one (padded: max_adapters=1; packed: a
             budget of exactly that rank), medians over interleaved repetitions.
  decode     one decode forward (8 rows, 8 distinct resident adapters of mixed ranks, one token)
             on the padded and on the packed pool, medians over interleaved repetitions: what
             the packed addressing costs the kernels.

Summary line: the packed / padded capacity ratio (target >= 2.5x), packed / padded load time
(target <= 1, within noise) and decode time.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import torch

from . import common
from .model_fixtures import PROJECTIONS, Dims, build_model, dims_extra, save_peft_adapters, share_weights_copy

OUT_DEFAULT = os.path.join(common.RESULTS_DIR, "pool_cpu.csv")
RANKS = (8, 16, 32, 64, 128)
MAX_RANK = 128


def sources(base, root: str) -> Dict[int, object]:
    """{rank: (config, tensors)} of one PEFT adapter per rank (all seven projections)."""
    from openlora_kernels.adapters import read_adapter_dir

    out = {}
    for r in RANKS:
        (path,) = save_peft_adapters(base, root, [f"r{r}"], rank=r, seed=r)
        out[r] = read_adapter_dir(path)
    return out


def olk_patch(base):
    import openlora_kernels as olk
    return olk.patch_model(share_weights_copy(base), target_modules=list(PROJECTIONS), max_adapters=1, max_rank=1)


def make_source(weights):
    return lambda: weights


def slot_bytes_padded(lm) -> int:
    return sum(ls.nbytes for ls in lm._layers.values())


def capacity(base, weights, M: int, churn_factor: int, seed: int, backend: str) -> List[dict]:
    import openlora_kernels as olk

    padded = olk.patch_model(share_weights_copy(base), target_modules=list(PROJECTIONS), max_adapters=M, max_rank=MAX_RANK, backend=backend)
    n_names = 4 * M               # (the packed pool holds ~2.6 M of them)
    names = [f"a{i:03d}" for i in range(n_names)]
    rank_of = {n: RANKS[i % len(RANKS)] for i, n in enumerate(names)}
    for n in names:
        padded.load_adapter(n, make_source(weights[rank_of[n]]))
    rows = []

    def first_eviction(lm) -> int:
        seen = 0
        for n in names:
            with lm.pool.lease([n]):
                pass
            res = sum(a.slot is not None for a in lm.memory_report().adapters)
            if res <= seen:
                return seen
            seen = res
        return seen

    def churn(lm, k: int) -> float:
        rng = random.Random(seed)
        counts = []
        for _ in range(k):
            with lm.pool.lease([rng.choice(names)]):
                pass
            counts.append(sum(a.slot is not None for a in lm.memory_report().adapters))
        return statistics.fmean(counts)

    n_pad = first_eviction(padded)
    budget = slot_bytes_padded(padded)        # the padded pool's slot bytes (every layer allocated now)
    churn_pad = churn(padded, churn_factor * n_pad)
    packed = olk.patch_model(share_weights_copy(base), target_modules=list(PROJECTIONS), max_adapters=M, max_rank=MAX_RANK, backend=backend, device_budget_bytes=budget)
    for n in names:
        packed.load_adapter(n, make_source(weights[rank_of[n]]))
    n_pack = first_eviction(packed)
    churn_pack = churn(packed, churn_factor * n_pack)
    rep = packed.memory_report()
    assert rep.device_bytes <= budget, (rep.device_bytes, budget)
    gib = budget / 2 ** 30
    for contender, first, mean in (("padded", n_pad, churn_pad), ("packed", n_pack, churn_pack)):
        rows.append({"contender": contender, "metric": "resident_at_first_eviction", "unit": "adapters",
                     "median": first, "per_gib": round(first / gib, 2), "budget_bytes": budget})
        rows.append({"contender": contender, "metric": "resident_churn_mean", "unit": "adapters",
                     "median": round(mean, 2), "per_gib": round(mean / gib, 2), "budget_bytes": budget})
    del padded, packed
    return rows


def load_times(base, weights, reps: int, backend: str, per_row: int) -> List[dict]:
    """Median time of a lease that loads its adapter, padded vs packed, per rank (interleaved)."""
    import openlora_kernels as olk

    rows = []
    for r in RANKS:
        pools = {
            "padded": olk.patch_model(share_weights_copy(base), target_modules=list(PROJECTIONS), max_adapters=1, max_rank=MAX_RANK, backend=backend),
            "packed": olk.patch_model(share_weights_copy(base), target_modules=list(PROJECTIONS), max_adapters=1, max_rank=MAX_RANK, backend=backend,
                                      device_budget_bytes=r * per_row),
        }
        for lm in pools.values():
            for n in ("x", "y"):
                lm.load_adapter(n, make_source(weights[r]))
            for n in ("x", "y", "x"):                  # warm: buffers allocated, ops bound
                with lm.pool.lease([n]):
                    pass
        times = {k: [] for k in pools}
        turn = {k: "y" for k in pools}
        for i in range(reps):
            order = list(pools) if i % 2 == 0 else list(pools)[::-1]
            for k in order:
                lm = pools[k]
                t0 = time.perf_counter()
                with lm.pool.lease([turn[k]]):
                    pass
                times[k].append((time.perf_counter() - t0) * 1e3)
                turn[k] = "x" if turn[k] == "y" else "y"
        for k, v in times.items():
            rows.append({"contender": k, "metric": "load_ms", "unit": "ms", "rank": r, **common.quantiles(v)})
        del pools
    return rows


def decode_times(base, weights, M: int, reps: int, backend: str, vocab: int) -> List[dict]:
    import openlora_kernels as olk

    names = [f"d{i}" for i in range(8)]
    ranks = [RANKS[i % len(RANKS)] for i in range(8)]
    M = max(M, len(names))
    ids = torch.randint(0, vocab, (8, 1), generator=torch.Generator().manual_seed(3))
    lms, outs = {}, {}
    for k in ("padded", "packed"):
        budget = slot_bytes_padded(lms["padded"]) if k == "packed" else None    # the same bytes
        lm = lms[k] = olk.patch_model(share_weights_copy(base), target_modules=list(PROJECTIONS), max_adapters=M, max_rank=MAX_RANK, backend=backend,
                                      device_budget_bytes=budget)
        for n, r in zip(names, ranks):
            lm.load_adapter(n, make_source(weights[r]), pin=True)
        with torch.no_grad():
            for _ in range(3):
                outs[k] = lm(input_ids=ids, adapter_names=names).logits
    if not torch.allclose(outs["packed"], outs["padded"], atol=1e-4, rtol=1e-4):
        raise AssertionError("decode: the packed pool's logits differ from the padded pool's")
    times = {k: [] for k in lms}
    for i in range(reps):
        for k in (list(lms) if i % 2 == 0 else list(lms)[::-1]):
            t0 = time.perf_counter()
            with torch.no_grad():
                lms[k](input_ids=ids, adapter_names=names)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return [{"contender": k, "metric": "decode_forward_ms", "unit": "ms", **common.quantiles(v)}
            for k, v in times.items()]


def storage_dtype_rows(quick: bool, threads: int) -> List[dict]:
    """The storage dtypes' (adapter_dtype= fp32 / bf16 / fp16) decode speed against the base model
    and error against PEFT's fp32 result: benchmarks/bench_storage_dtype.py's rows (its own model,
    the bench_hf_cpu_decode shape; fp8 is refused by every backend, so it has no row)."""
    from benchmarks import bench_storage_dtype
    argv = ["--threads", str(threads), "--no-write"]
    if quick:
        argv += ["--rows", "4", "--hidden", "64", "--intermediate", "96", "--layers", "1", "--adapters", "2",
                 "--rank", "4", "--rounds", "5", "--vocab", "64"]
    return bench_storage_dtype.rows(argv)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_pool", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small model and few repetitions (smoke run)")
    ap.add_argument("--max-adapters", type=int, default=16, help="the padded pool's slots (M)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--no-storage", action="store_true", help="skip the storage dtypes' rows (bench_storage_dtype)")
    ap.add_argument("--out", default=OUT_DEFAULT, help=f"CSV to append rows to (default {OUT_DEFAULT}; "
                    "commit only an explicit --out benchmarks/results/pool_cpu.csv from a clean commit)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        dims = Dims(hidden=64, intermediate=176, heads=4, kv_heads=4, vocab=128, layers=1, name="Llama-shaped")
        M, reps = min(args.max_adapters, 4), args.reps or 5
    else:
        dims = Dims(hidden=512, intermediate=1376, heads=8, kv_heads=8, vocab=512, layers=2, name="Llama-shaped")
        M, reps = args.max_adapters, args.reps or 31
    base = build_model(dims, torch.device("cpu"), torch.float32)
    probe = olk_patch(base)
    per_row = sum((ls.in_features + ls.out_features) * ls.dtype.itemsize for ls in probe._layers.values())
    del probe
    failures: List[str] = []
    rows: List[dict] = []
    with tempfile.TemporaryDirectory() as root:
        weights = sources(base, root)
        common.progress("capacity")
        rows += capacity(base, weights, M, 4, seed=5, backend=args.backend)
        common.progress("load times")
        rows += load_times(base, weights, reps, args.backend, per_row)
        common.progress("decode")
        try:
            rows += decode_times(base, weights, M, reps, args.backend, dims.vocab)
        except AssertionError as e:
            failures.append(str(e))
    shape = f"{dims.label()},ranks=8/16/32/64/128 equal shares,max_rank={MAX_RANK},max_adapters={M}"
    for r in rows:
        r.update({"benchmark": "pool", "kernel": "adapter_pool", "shape": shape, "reps": reps, **dims_extra(dims)})
    if not args.no_storage:
        common.progress("storage dtypes (bench_storage_dtype)")
        rows += storage_dtype_rows(args.quick, args.threads)
    for r in rows:
        extra = f" rank {r['rank']}" if "rank" in r else ""
        print(f"{r['contender']:>7} {r['metric']:<27}{extra:>9}: {r['median']:>9} {r['unit']}"
              + (f" ({r['per_gib']}/GiB)" if "per_gib" in r else ""))

    def val(c, m, rank=None):
        return next(r["median"] for r in rows if r["contender"] == c and r["metric"] == m
                    and r.get("rank") == rank)

    ratio = val("packed", "resident_at_first_eviction") / val("padded", "resident_at_first_eviction")
    churn = val("packed", "resident_churn_mean") / val("padded", "resident_churn_mean")
    load = statistics.fmean(val("packed", "load_ms", r) / val("padded", "load_ms", r) for r in RANKS)
    if ratio < 2.5 and not args.quick:      # (a --quick pool of 4 slots is too coarse for the target)
        failures.append(f"capacity: packed holds {ratio:.2f}x the padded pool's adapters (target >= 2.5x)")
    if args.out:
        print("wrote", common.write_rows(args.out, rows, common.env_info(torch.device("cpu"))))
    dec = (val("packed", "decode_forward_ms") / val("padded", "decode_forward_ms")
           if any(r["metric"] == "decode_forward_ms" for r in rows) else float("nan"))
    st = {r["contender"]: r for r in rows if r.get("benchmark") == "storage_dtype_cpu"}
    storage = "".join(f", {t} storage {st['openlora_' + t]['ratio_vs_base']:.2f}x base"
                      for t in ("fp32", "bf16", "fp16", "fp8") if "openlora_" + t in st)
    return common.finish(lambda: (f"packed pool: {ratio:.2f}x the adapters resident in the same bytes ({churn:.2f}x "
                                  f"under churn), loads {load:.2f}x the padded time (mean over ranks), decode "
                                  f"{dec:.2f}x" + storage), failures)


if __name__ == "__main__":
    sys.exit(main())
