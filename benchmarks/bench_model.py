"""Model decode benchmark: a Llama-shaped model decoding with a KV cache, N adapters in the batch.

What runs (``model_fixtures.py``): a random-init Llama model (Llama-2-7B dims on a GPU with
``--layers`` of its 32 decoder layers, default 8; a tiny model with ``--quick``) and N rank-16
adapters on all seven projections, written by PEFT's ``save_pretrained``. Three contenders share
the one set of base weights:

  base          the model alone
  openlora      ``olk.patch_model`` + ``load_adapter`` from the PEFT directories,
                called as ``lm(..., adapter_names=rows)``
  peft_mixed    ``PeftModel.from_pretrained`` + ``load_adapter``, called with PEFT's mixed
                batch ``adapter_names=rows`` (its defaults: adapters upcast to float32)

A case is (batch B, adapters N): B requests of a ``--prompt``-token prompt, row i using adapter
i mod N. Each contender prefills its own KV cache (a DynamicCache; LoRA changes k and v), then
one decode step (one new token per row) is timed again and again; between timed steps the cache
is cropped back by one token (``DynamicCache.crop(-1)``, outside the timed region), so every
step decodes position ``--prompt`` over the same cache, identically for each contender. The
first step's logits check that ours agree with PEFT's (``rel_err`` = max |ours - peft| over
max |peft - base|, the size of the LoRA effect).

Sweeps: batch B in 1..64 with N = B (every request its own adapter), then N in 1, 4, 16, 32, 64
at B = ``--adapters-batch`` (64). Order (``plan_steps``): the target case (B = 32, N = 32), its
CUDA-graph timing, the memory rows, the other cases, the other graphs; with ``--budget-s`` a run
cut short keeps those first. Rows (``benchmarks/out/model_<device>[_quick].csv``; committed files:
``--out benchmarks/results/<file>.csv``):
``step_time`` (ms per decode step) and ``tokens_per_s`` (B / step time; extra: per-adapter
throughput = tokens/s / N, LoRA overhead in % over the base model, speed-up over PEFT, and
``adapter_bytes_over_base_pct`` = N adapters' bytes over the base's: where decode is bound by
reading weights, no implementation can add less than that) per contender and case; ``memory_computed`` (parameter bytes: one base + N adapters against N merged
copies) and, on a GPU, ``memory_measured`` (torch.cuda.memory_allocated around building the
model and around a pool of N slots; N merged copies = N x the measured copy, not allocated);
and on a GPU, our patched model and the base model replayed from a CUDA graph of one decode
step (``step_time_graph``; PEFT's mixed batch builds index lists on the host and cannot be
captured).

    python -m benchmarks.bench_model --quick            # CPU smoke run, seconds
    python -m benchmarks.bench_model --budget-s 120     # GPU: 8 of 32 Llama-2-7B layers
    python -m benchmarks.bench_model --layers 32        # GPU: the whole Llama-2-7B shape (minutes)
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks import model_fixtures as mf  # noqa: E402

CONTENDERS = ("base", "openlora", "peft_mixed")
GRAPH_CONTENDERS = ("base", "openlora")
TARGET_CASE = (32, 32)          # issue 5: batch 32 with 32 distinct adapters
TARGET_OVERHEAD_PCT = 10.0
TARGET_VS_PEFT = 10.0
FULL = dict(batches=[1, 2, 4, 8, 16, 32, 64], adapters=[1, 4, 16, 32, 64], adapters_batch=64, prompt=128,
            reps=20, peft_reps=5, warmup=2, graph_reps=30)
QUICK = dict(batches=[1, 4, 16], adapters=[1, 4, 16], adapters_batch=16, prompt=8,
             reps=5, peft_reps=3, warmup=1, graph_reps=5)
# Relative error of ours against PEFT (over the LoRA effect on the logits) accepted per dtype:
# float32 agrees to rounding; in 16 bits both round every layer's output, and the differences grow
# through the layers of a random model.
CHECK_TOL = {torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.05}
# A replayed graph runs the eager step's kernels on the same inputs: only the order of atomic
# additions can differ. Garbage (a replay reading freed memory) is far above this.
GRAPH_TOL = 1e-2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, few cases and repetitions (CPU smoke run)")
    mf.add_model_args(p)
    p.add_argument("--batches", nargs="+", type=int, default=None, help="B of the batch sweep (N = B)")
    p.add_argument("--adapters", nargs="+", type=int, default=None, help="N of the adapter sweep")
    p.add_argument("--adapters-batch", type=int, default=None, help="B of the adapter sweep (64; quick 16)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens per request (128; quick 8)")
    p.add_argument("--reps", type=int, default=None, help="timed decode steps, base and openlora (20; quick 5)")
    p.add_argument("--peft-reps", type=int, default=None, help="timed decode steps of PEFT (5; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before timing (2; quick 1)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new case after this many seconds from the start (setup included)")
    p.add_argument("--no-peft", action="store_true", help="skip PEFT's mixed batch")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings (GPU)")
    p.add_argument("--graph-batches", nargs="+", type=int, default=None,
                   help="B (with N = B) of the CUDA-graph timings (default: the batches; B = 32 first)")
    p.add_argument("--out", default=None, help="CSV path (default <out-dir>/model_<device>[_quick].csv)")
    p.add_argument("--out-dir", default=common.RESULTS_DIR,
                   help="folder of the default CSV path ($OPENLORA_BENCH_OUT, else benchmarks/out: untracked)")
    p.add_argument("--append", action="store_true",
                   help="append to --out instead of starting it afresh (a fresh file replaces the old one "
                        "only when the run ends)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: 1 with --quick on a CPU, like bench_kernels)")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dims, self.device, self.dtype = mf.resolve(args)
        self.t0 = time.monotonic()
        self.failures: List[str] = []
        self.rows_written = 0
        self.env = common.env_info(self.device)
        slug = common.device_slug(self.device) + ("_quick" if args.quick else "")
        self.results = common.ResultsFile(args.out or os.path.join(args.out_dir, f"model_{slug}.csv"), args.append)
        self.out = self.results.path
        self.shape = (f"hidden {self.dims.hidden}, intermediate {self.dims.intermediate}, {self.dims.layers} layers, "
                      f"vocab {self.dims.vocab}, r={args.rank}, prompt {args.prompt}")
        self.max_n = max([*args.adapters, *args.batches])

    # ------------------------------------------------------------------------------ helpers

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def over_budget(self, what: str) -> bool:
        if self.args.budget_s is not None and self.elapsed() > self.args.budget_s:
            print(f"budget of {self.args.budget_s:.0f} s spent ({self.elapsed():.0f} s): {what} not run")
            return True
        return False

    def write(self, rows: List[Dict[str, Any]]) -> None:
        base = {"benchmark": "model", "shape": self.shape, "layers": self.dims.layers, "model": self.dims.name,
                "rank": self.args.rank, "dtype": str(self.dtype).replace("torch.", ""), "prompt": self.args.prompt,
                "backend": getattr(self, "backend", None)}
        self.results.write([{**base, **r} for r in rows], self.env)
        self.rows_written += len(rows)

    def cleanup(self) -> None:
        """Free the previous contender's KV cache before the next one measures its memory (GPU)."""
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    # -------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        import openlora_kernels as olk

        a, dev = self.args, self.device
        m0 = mf.memory_allocated(dev)
        t = time.monotonic()
        self.model = mf.build_model(self.dims, dev, self.dtype, a.seed)
        m1 = mf.memory_allocated(dev)
        self.base_bytes = mf.param_bytes(self.model)
        self.adapter_bytes = mf.adapter_bytes(self.dims, a.rank, self.dtype)
        self.base_measured = None if m0 is None else m1 - m0
        self.tmp = tempfile.TemporaryDirectory(prefix="olk_bench_model_")
        self.names = mf.adapter_names(self.max_n)
        self.dirs = mf.save_peft_adapters(self.model, self.tmp.name, self.names, a.rank, a.seed)
        print(f"model {self.dims.label()}, {self.base_bytes / 2**20:.0f} MiB of parameters; {self.max_n} adapters "
              f"of rank {a.rank} saved by PEFT ({time.monotonic() - t:.1f} s)")
        t = time.monotonic()
        self.lm = olk.patch_model(mf.share_weights_copy(self.model), max_adapters=self.max_n, max_rank=a.rank)
        for name, path in zip(self.names, self.dirs):
            self.lm.load_adapter(name, path)
        self.lm.acquire(self.names)       # all slots filled once, outside every timing
        self.lm.release()
        self.pm = None
        if not a.no_peft:
            from peft import PeftModel

            self.pm = PeftModel.from_pretrained(mf.share_weights_copy(self.model), self.dirs[0],
                                                adapter_name=self.names[0])
            for name, path in zip(self.names[1:], self.dirs[1:]):
                self.pm.load_adapter(path, adapter_name=name)
            self.pm.eval()
        from openlora_kernels.ops.backends import resolve_backend

        self.backend = resolve_backend("auto", dev)
        print(f"adapters loaded into openlora{'' if self.pm is None else ' and PEFT'} "
              f"({time.monotonic() - t:.1f} s); openlora: {self.max_n} slots, backend {self.backend}")

    def call(self, contender: str, ids: torch.Tensor, cache, rows: List[str]):
        kw = dict(input_ids=ids, past_key_values=cache, use_cache=True)
        if contender == "base":
            return self.model(**kw)
        if contender == "openlora":
            return self.lm(adapter_names=rows, **kw)
        return self.pm(adapter_names=rows, **kw)

    # --------------------------------------------------------------------------------- cases

    def inputs(self, B: int, N: int) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
        g = torch.Generator().manual_seed(self.args.seed * 7919 + B * 1000 + N)
        prompt = torch.randint(0, self.dims.vocab, (B, self.args.prompt), generator=g).to(self.device)
        tok = torch.randint(0, self.dims.vocab, (B, 1), generator=g).to(self.device)
        return prompt, tok, [self.names[i % N] for i in range(B)]

    def run_case(self, B: int, N: int, order: List[str]) -> None:
        a, dev = self.args, self.device
        prompt, tok, rows = self.inputs(B, N)
        res: Dict[str, Dict[str, Any]] = {}
        logits: Dict[str, torch.Tensor] = {}
        for c in order:
            if c == "peft_mixed" and self.pm is None:
                continue
            self.cleanup()
            m0 = mf.memory_allocated(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            cache = self.call(c, prompt, None, rows).past_key_values      # prefill (untimed)
            logits[c] = self.call(c, tok, cache, rows).logits[:, -1].float().cpu()   # the step checked
            cache.crop(-1)
            t = common.time_steps(lambda: self.call(c, tok, cache, rows), lambda: cache.crop(-1), dev,
                                  reps=a.peft_reps if c == "peft_mixed" else a.reps, warmup=max(0, a.warmup - 1))
            assert cache.get_seq_length() == a.prompt, "the KV cache was not restored between steps"
            if m0 is not None:
                t["peak_work_mib"] = (torch.cuda.max_memory_allocated(dev) - m0) / 2**20
            res[c] = t
            cache = None        # freed before the next contender prefills
        check, rel, effect = "n/a", None, None
        if "peft_mixed" in logits:
            effect = (logits["peft_mixed"] - logits["base"]).abs().max().item()
            rel = (logits["openlora"] - logits["peft_mixed"]).abs().max().item() / max(effect, 1e-30)
            ok = effect > 0 and rel <= CHECK_TOL[self.dtype]
            check = "ok" if ok else "FAILED"
            if not ok:
                self.failures.append(f"B={B} N={N}: ours vs PEFT rel_err {rel:.3g} (LoRA effect {effect:.3g}, "
                                     f"tolerance {CHECK_TOL[self.dtype]})")
        self.write(self.case_rows(B, N, res, check, rel, effect, metric="step_time"))
        line = "  ".join(f"{c} {res[c]['median']:.2f} ms ({B / res[c]['median'] * 1e3:,.0f} tok/s)" for c in res)
        print(f"B={B:>3} N={N:>3}: {line}  check {check}" + (f" (rel_err {rel:.2g})" if rel is not None else ""))

    def case_rows(self, B: int, N: int, res: Dict[str, Dict[str, Any]], check: str, rel: Optional[float],
                  effect: Optional[float], metric: str) -> List[Dict[str, Any]]:
        """step time and tokens/s rows of one case (eager or graph), ratios against base and PEFT."""
        suffix = metric[len("step_time"):]
        base, peft = res.get("base"), res.get("peft_mixed")
        rows = []
        for c, t in res.items():
            common_extra = {"B": B, "N": N, "reps": t["reps"], "check": check if c == "openlora" else "n/a"}
            if c == "openlora" and rel is not None:
                common_extra.update(rel_err_vs_peft=rel, lora_effect=effect)
            if "peak_work_mib" in t:
                common_extra["peak_work_mib"] = t["peak_work_mib"]
            rows.append({"kernel": "decode_step", "contender": c, "metric": metric, "unit": "ms",
                         "median": t["median"], "p20": t["p20"], "p80": t["p80"],
                         "first_call_ms": t.get("first_call_ms"), **common_extra})
            tps = {k: B / (t[k] * 1e-3) for k in ("median", "p20", "p80")}
            extra = dict(common_extra)
            if c != "base":
                extra["per_adapter_tokens_per_s"] = tps["median"] / N
            if c != "base":
                # the adapters' bytes over the base's: the overhead floor where decode is weight-bound
                extra["adapter_bytes_over_base_pct"] = 100.0 * N * self.adapter_bytes / self.base_bytes
            if base is not None and c != "base":
                extra["overhead_pct"] = 100.0 * (t["median"] / base["median"] - 1.0)
            if peft is not None and c == "openlora":
                extra["speedup_vs_peft"] = peft["median"] / t["median"]
            rows.append({"kernel": "decode_step", "contender": c, "metric": "tokens_per_s" + suffix, "unit": "tok/s",
                         "median": tps["median"], "p20": tps["p80"], "p80": tps["p20"], **extra})
        return rows

    # -------------------------------------------------------------------------------- memory

    def memory(self, Ns: List[int]) -> None:
        """One base + N adapters against N merged copies, for each N: computed from parameter bytes
        (always); then a pool of N slots is built and filled, giving the pool's own report of its
        slot bytes and, on a GPU, the measured bytes (torch.cuda.memory_allocated before and after)."""
        import openlora_kernels as olk

        a, dev = self.args, self.device
        each = self.adapter_bytes
        mib = 1 / 2**20
        rows = []
        for N in Ns:
            reported = measured = None
            if not self.over_budget(f"the pool of {N} slots (memory measured / reported)"):
                self.cleanup()
                m0 = mf.memory_allocated(dev)
                lmN = olk.patch_model(mf.share_weights_copy(self.model), max_adapters=N, max_rank=a.rank)
                for name, path in zip(self.names[:N], self.dirs[:N]):
                    lmN.load_adapter(name, path)
                lmN.acquire(self.names[:N])
                m1 = mf.memory_allocated(dev)
                reported = lmN.memory_report().device_bytes
                measured = None if m0 is None else m1 - m0
                lmN.release()
                lmN.unpatch()
                del lmN
            ours_c, merged_c = self.base_bytes + N * each, N * self.base_bytes
            base_extra = {"kernel": "memory", "unit": "MiB", "N": N, "adapter_bytes": each,
                          "base_bytes": self.base_bytes, "slot_bytes_reported": reported}
            rows += [
                {**base_extra, "contender": "openlora_base_plus_adapters", "metric": "memory_computed",
                 "median": ours_c * mib, "p20": ours_c * mib, "p80": ours_c * mib,
                 "method": "parameter bytes: base + N x adapter (A and B, 7 projections, every layer)",
                 "merged_over_ours": merged_c / ours_c},
                {**base_extra, "contender": "merged_copies", "metric": "memory_computed",
                 "median": merged_c * mib, "p20": merged_c * mib, "p80": merged_c * mib,
                 "method": "parameter bytes: N x base"}]
            if measured is not None:
                ours_m, merged_m = self.base_measured + measured, N * self.base_measured
                rows += [
                    {**base_extra, "contender": "openlora_base_plus_adapters", "metric": "memory_measured",
                     "median": ours_m * mib, "p20": ours_m * mib, "p80": ours_m * mib, "slot_bytes_measured": measured,
                     "base_bytes_measured": self.base_measured, "merged_over_ours": merged_m / ours_m,
                     "method": "torch.cuda.memory_allocated: after building the model, and after filling N slots"},
                    {**base_extra, "contender": "merged_copies", "metric": "memory_measured",
                     "median": merged_m * mib, "p20": merged_m * mib, "p80": merged_m * mib,
                     "base_bytes_measured": self.base_measured,
                     "method": "N x the measured bytes of one copy (a merged copy has the base's parameters); "
                               "the N copies are not allocated"}]
            print(f"memory N={N:>3}: one base + N adapters {ours_c * mib:,.1f} MiB computed"
                  + ("" if measured is None else f", {(self.base_measured + measured) * mib:,.1f} MiB measured")
                  + f"; N merged copies {merged_c * mib:,.1f} MiB computed")
        self.cleanup()
        self.write(rows)

    # -------------------------------------------------------------------------------- graphs

    def graph_case(self, B: int) -> bool:
        """base and openlora replayed from a CUDA graph of one decode step (N = B). False when a
        capture failed (no further graphs are tried)."""
        a, dev = self.args, self.device
        N = B
        prompt, tok, rows = self.inputs(B, N)
        res: Dict[str, Dict[str, Any]] = {}
        for c in GRAPH_CONTENDERS:
            self.cleanup()
            cache = self.call(c, prompt, None, rows).past_key_values
            ref = self.call(c, tok, cache, rows).logits[:, -1].float()
            cache.crop(-1)

            def step():
                out = self.call(c, tok, cache, rows)
                cache.crop(-1)      # Python-side views: the replay always decodes over the same P tokens
                return out.logits

            try:
                graph, out, kept = common.capture_cuda_graph(
                    step, dev, warmup=2, before_capture=lambda: [(layer.keys, layer.values) for layer in cache.layers])
                t = common.time_steps(graph.replay, lambda: None, dev, reps=a.graph_reps, warmup=2)
                diff = (out[:, -1].float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
            except Exception as e:  # noqa: BLE001 - recorded, then the eager rows stand alone
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                print(f"CUDA graph of {c}, B={B}: capture or replay failed: {msg}")
                self.write([{"kernel": "decode_step", "contender": c, "metric": "graph_failed", "unit": "-",
                             "B": B, "N": N, "error": msg}])
                return False
            t["replay_vs_eager_rel_diff"] = diff
            res[c] = t
            kept.clear()                      # the tensors the replays read: free now
            graph = out = cache = None        # the graph's pool and the cache go before the next
        rows_out = self.case_rows(B, N, res, "n/a", None, None, metric="step_time_graph")
        for r in rows_out:
            diff = res[r["contender"]]["replay_vs_eager_rel_diff"]
            r["replay_vs_eager_rel_diff"] = diff
            r["check"] = "ok" if diff <= GRAPH_TOL else "FAILED"
        for c, t in res.items():
            if t["replay_vs_eager_rel_diff"] > GRAPH_TOL:
                self.failures.append(f"CUDA graph of {c}, B={B}: replayed logits differ from the eager step's by "
                                     f"{t['replay_vs_eager_rel_diff']:.3g} of their size (tolerance {GRAPH_TOL})")
        self.write(rows_out)
        print(f"graph B={B:>3} N={N:>3}: " + "  ".join(f"{c} {t['median']:.2f} ms" for c, t in res.items()))
        return True


def plan_cases(args) -> List[Tuple[int, int]]:
    """(B, N): the target case first, then the batch sweep (N = B), then the adapter sweep."""
    cases = [(B, B) for B in args.batches] + [(args.adapters_batch, N) for N in args.adapters]
    cases = list(dict.fromkeys(c for c in cases if c[1] <= c[0]))
    if TARGET_CASE in cases:
        cases.remove(TARGET_CASE)
        cases.insert(0, TARGET_CASE)
    return cases


def plan_steps(cases: List[Tuple[int, int]], graph_batches: List[int]) -> List[Tuple[str, Any]]:
    """The order of the work (rows are written as they come, so a run cut short by --budget-s
    keeps the most useful ones): the headline case, its CUDA-graph timing, the memory rows, the
    other cases, the other graphs (each B of ``graph_batches`` once, with N = B)."""
    graphs = list(dict.fromkeys(graph_batches))
    first = cases[:1]
    head = [B for B, N in first if B == N and B in graphs]
    steps: List[Tuple[str, Any]] = [("case", c) for c in first] + [("graph", B) for B in head] + [("memory", None)]
    steps += [("case", c) for c in cases[1:]] + [("graph", B) for B in graphs if B not in head]
    return steps


def main(argv=None) -> int:
    args = parse_args(argv)
    with common.cpu_threads(args.quick, args.device, args.threads), torch.no_grad():
        return _run(args)


def _run(args) -> int:
    if min(args.batches) < 1 or any(not 1 <= N <= args.adapters_batch for N in args.adapters):
        raise ValueError(f"--batches must be >= 1 and --adapters in 1..--adapters-batch ({args.adapters_batch}); "
                         f"got {args.batches} and {args.adapters}")
    if args.graph_batches and not all(1 <= B <= max([*args.batches, *args.adapters]) for B in args.graph_batches):
        raise ValueError(f"--graph-batches: each B must be in 1..{max([*args.batches, *args.adapters])} (the adapters "
                         f"saved); got {args.graph_batches}")
    b = Bench(args)
    print(f"device: {b.env['device']} | torch {b.env['torch']} | commit {b.env['commit']} | dtype {b.dtype} | "
          f"out {b.out}")
    with b.results:          # the rows replace an old file only if the run gets to its end
        return _run_steps(b, args)


def _run_steps(b: "Bench", args) -> int:
    common.progress("bench_model: building the model and the adapters")
    b.setup()
    cases = plan_cases(args)
    graph_batches = [] if b.device.type != "cuda" or args.no_graphs else (args.graph_batches or args.batches)
    graphs = "not run (CPU)" if b.device.type != "cuda" else ("not run (--no-graphs)" if args.no_graphs else "done")
    done = 0
    steps = plan_steps(cases, graph_batches)
    for i, (what, arg) in enumerate(steps):
        common.progress(f"bench_model: step {i + 1}/{len(steps)}: {what} {arg if arg is not None else ''} "
                        f"({b.elapsed():.0f} s so far)")
        if what == "memory":
            b.memory(sorted(set(args.adapters)))      # computed rows always; the pools while the budget lasts
        elif b.over_budget(f"{what} {arg}"):
            graphs = "cut short by the budget" if what == "graph" and graphs == "done" else graphs
        elif what == "case":
            order = list(CONTENDERS[done % 3:] + CONTENDERS[:done % 3])    # rotating order: drift hits everyone
            b.run_case(*arg, order)
            done += 1
        elif graphs == "done" and not b.graph_case(arg):
            graphs = "capture failed"             # no further capture is tried
    b.results.close()
    print(f"\n{b.rows_written} rows -> {b.out} ({done}/{len(cases)} cases, {b.elapsed():.0f} s); CUDA graphs: {graphs}")
    from benchmarks import report

    return common.finish(lambda: report.model_summary(common.read_rows(b.out)), b.failures)


if __name__ == "__main__":
    sys.exit(main())
