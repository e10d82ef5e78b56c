"""Markdown tables and target checks from a benchmark's CSV: kernels (bench_kernels.py), model
decode (bench_model.py) or adapter swap (bench_swap.py); the file's ``benchmark`` column says which.

    python -m benchmarks.report benchmarks/results/kernels_<device>.csv [--out report.md]
    python -m benchmarks.report benchmarks/results/model_<device>.csv
    python -m benchmarks.report benchmarks/results/swap_<device>.csv

Every number printed is read from, or divided out of, the rows of the file given, and each
table names the file's device, versions and commit, so docs/benchmarks.md can paste it as is.
"Ours" is the fastest of our backends (olk-*) in a cell; speed-ups divide a baseline's median
time by ours. The targets are those of issues 5 and 6, stated for an H100 / H200: on a CPU run
they are not assessed.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

BASELINES = ("loop", "gather_bmm", "dense_one")
Row = Dict[str, Any]


def _get(r: Row, k: str) -> Any:
    return r[k] if k in r and k != "extra" else r.get("extra", {}).get(k)


def select(rows: Iterable[Row], **want: Any) -> List[Row]:
    """Rows whose column or extra field ``k`` equals ``v`` (or is in ``v`` when v is a tuple/list)."""
    out = []
    for r in rows:
        ok = True
        for k, v in want.items():
            have = _get(r, k)
            if isinstance(v, (tuple, list, set)):
                ok = have in v
            else:
                ok = have == v
            if not ok:
                break
        if ok:
            out.append(r)
    return out


def is_ours(r: Row) -> bool:
    return str(r.get("contender", "")).startswith("olk-")


def best(rows: Iterable[Row]) -> Optional[Row]:
    rows = [r for r in rows if isinstance(r.get("median"), float)]
    return min(rows, key=lambda r: r["median"]) if rows else None


def _us(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v < 1000 else f"{v:,.0f}"


def _x(num: Optional[Row], den: Optional[Row]) -> str:
    if not num or not den:
        return "-"
    return f"{num['median'] / den['median']:.2f}x"


def _pct(r: Optional[Row]) -> str:
    return "-" if not r or _get(r, "pct_roofline") is None else f"{_get(r, 'pct_roofline'):.1f}%"


def _ours(r: Optional[Row], show_backend: bool) -> str:
    if not r:
        return "-"
    return _us(r["median"]) + (f" ({r['contender'][4:]})" if show_backend else "")


def table(header: Sequence[str], body: List[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _ordered(values: Iterable[Any]) -> List[Any]:
    return list(OrderedDict.fromkeys(values))


def provenance(rows: List[Row]) -> str:
    if not rows:
        return "(no rows)"
    r = rows[0]
    return (f"device: {r['device']}; torch {r['torch']}, triton {r['triton']}, CUDA {r['cuda']}; "
            f"commit {r['commit']}; {r['date']}")


def is_cpu(rows: List[Row]) -> bool:
    return bool(rows) and str(rows[0].get("device", "")).startswith("CPU")


# ------------------------------------------------------------------------------------ tables


def ceilings_table(rows: List[Row]) -> str:
    body = [[r["contender"], r["shape"], r["metric"], f"{r['median']:.2f}", f"{r['p20']:.2f}", f"{r['p80']:.2f}",
             r["unit"]] for r in select(rows, kernel="ceiling")]
    return table(["probe", "size", "metric", "median", "p20", "p80", "unit"], body)


def op_table(rows: List[Row], op: str, shape: str) -> str:
    """T sweep of one op on one shape: ours (eager, graph) against the baselines."""
    rs = select(rows, kernel=op, shape=shape, sweep="T")
    backends = _ordered(r["contender"] for r in rs if is_ours(r))
    body = []
    for T in sorted(_ordered(_get(r, "T") for r in rs)):
        at = select(rs, T=T)
        eager = select(at, metric="time")
        ours_e = best(r for r in eager if is_ours(r))
        ours_g = best(r for r in select(at, metric="time_graph") if is_ours(r))
        base = {b: best(select(eager, contender=b)) for b in BASELINES}
        ref = ours_e or ours_g
        body.append([T, _get(ref, "distinct") if ref else "-", _us(_get(ref, "roofline_us")) if ref else "-",
                     _ours(ours_e, len(backends) > 1), _pct(ours_e), _ours(ours_g, len(backends) > 1), _pct(ours_g),
                     _us(base["loop"] and base["loop"]["median"]), _us(base["gather_bmm"] and base["gather_bmm"]["median"]),
                     _us(base["dense_one"] and base["dense_one"]["median"]),
                     _x(base["loop"], ours_e), _x(base["gather_bmm"], ours_e), _x(ours_e, base["dense_one"])])
    return table(["T", "adapters", "roofline µs", "ours µs", "% roofline", "ours graph µs", "% roofline (graph)",
                  "loop µs", "gather_bmm µs", "dense_one µs", "vs loop", "vs gather_bmm", "ours / dense_one"], body)


def pivot_table(rows: List[Row], shape: str, sweep: str, column: str, base_value: str) -> str:
    """add_lora, best ours (eager) per T x ``column`` value (rank or workload); the column's base
    value comes from the T sweep."""
    rs = [r for r in select(rows, kernel="add_lora", shape=shape, metric="time") if is_ours(r)]
    sweep_rows = select(rs, sweep=sweep)
    if not sweep_rows:
        return ""
    Ts = sorted(_ordered(_get(r, "T") for r in sweep_rows))
    cols = [base_value] + [v for v in _ordered(_get(r, column) for r in sweep_rows) if v != base_value]
    body = []
    for T in Ts:
        cells = [T]
        for v in cols:
            src = select(rs, T=T, **{column: v}, sweep=("T", sweep))
            b = best(src)
            cells.append("-" if not b else f"{_us(b['median'])} ({_pct(b)})")
        body.append(cells)
    return table(["T"] + [f"{column} {v}" for v in cols], body)


def meta_table(rows: List[Row]) -> str:
    rs = select(rows, kernel="build_batch_meta")
    body = []
    for T in sorted(_ordered(_get(r, "T") for r in rs)):
        e = best(select(rs, T=T, metric="time"))
        g = best(select(rs, T=T, metric="time_graph"))
        ref = e or g
        body.append([T, _get(ref, "S"), _get(ref, "block_m"), _us(e and e["median"]), _us(g and g["median"])])
    return table(["T", "slots S", "block_m", "eager µs", "graph µs"], body)


# ----------------------------------------------------------------------------------- targets


def targets(rows: List[Row]) -> str:
    """The issues' targets, each with the measured figure and a verdict (GPU runs only)."""
    if is_cpu(rows):
        return "CPU run: the targets are GPU targets (H100 / H200) and are not assessed here."
    lines = []
    add = [r for r in select(rows, kernel="add_lora") if is_ours(r)]
    # 1. decode add_lora >= 75% of roofline where the roofline time exceeds 10 µs (best of eager / graph)
    cells = {}
    for r in select(add, regime="decode"):
        key = (r["shape"], _get(r, "rank"), _get(r, "workload"), _get(r, "T"))
        if (_get(r, "roofline_us") or 0) > 10 and (key not in cells or r["median"] < cells[key]["median"]):
            cells[key] = r
    miss = [(k, r) for k, r in cells.items() if _get(r, "pct_roofline") < 75]
    lines.append(f"- decode add_lora >= 75% of roofline where the roofline time > 10 µs: "
                 f"{len(cells) - len(miss)} of {len(cells)} cells met")
    for k, r in sorted(miss, key=lambda kr: _get(kr[1], "pct_roofline"))[:12]:
        lines.append(f"  - missed: {k[0]} r={k[1]} {k[2]} T={k[3]}: {_get(r, 'pct_roofline'):.1f}% "
                     f"({_us(r['median'])} µs {r['metric']}, roofline {_us(_get(r, 'roofline_us'))} µs)")
    # 2. below 10 µs: within 1.5x of one launch
    launch = best(select(rows, kernel="ceiling", metric="launch_graph")) or best(select(rows, kernel="ceiling", metric="launch"))
    small = {}
    for r in select(add, regime="decode", metric="time_graph" if launch and launch["metric"] == "launch_graph" else "time"):
        key = (r["shape"], _get(r, "rank"), _get(r, "workload"), _get(r, "T"))
        if (_get(r, "roofline_us") or 0) <= 10 and (key not in small or r["median"] < small[key]["median"]):
            small[key] = r
    if launch and small:
        limit = 1.5 * launch["median"]
        met = sum(1 for r in small.values() if r["median"] <= limit)
        worst = max(small.items(), key=lambda kr: kr[1]["median"])
        lines.append(f"- roofline <= 10 µs: within 1.5x of one launch ({launch['metric']} {_us(launch['median'])} µs, "
                     f"limit {_us(limit)} µs): {met} of {len(small)} cells met; slowest {worst[0][0]} r={worst[0][1]} "
                     f"{worst[0][2]} T={worst[0][3]}: {_us(worst[1]['median'])} µs")
    # 3./4. speed-ups at 64 distinct adapters (decode, T = 64, eager)
    for base, want in (("gather_bmm", 3.0), ("loop", 10.0)):
        for shape in _ordered(r["shape"] for r in select(rows, kernel="add_lora", sweep="T")):
            at = select(rows, kernel="add_lora", shape=shape, T=64, workload="distinct", rank="16", metric="time")
            o, b = best(r for r in at if is_ours(r)), best(select(at, contender=base))
            if o and b:
                x = b["median"] / o["median"]
                lines.append(f"- 64 distinct adapters, {shape}: {x:.2f}x faster than {base} (target >= {want:g}x): "
                             f"{'met' if x >= want else 'MISSED'}")
    # 5. prefill >= 60% of roofline (issue 6)
    pre = {}
    for r in select(add, regime="prefill"):
        key = (r["shape"], _get(r, "rank"), _get(r, "workload"), _get(r, "T"))
        if key not in pre or r["median"] < pre[key]["median"]:
            pre[key] = r
    if pre:
        met = sum(1 for r in pre.values() if _get(r, "pct_roofline") >= 60)
        worst = min(pre.items(), key=lambda kr: _get(kr[1], "pct_roofline"))
        lines.append(f"- prefill add_lora >= 60% of roofline: {met} of {len(pre)} cells met; lowest {worst[0][0]} "
                     f"r={worst[0][1]} {worst[0][2]} T={worst[0][3]}: {_get(worst[1], 'pct_roofline'):.1f}%")
    lines.append("- model decode overhead <= 10% and >= 10x PEFT per-adapter throughput: measured by the model "
                 "benchmark (model_<gpu>.csv), not by this file")
    return "\n".join(lines)



# ------------------------------------------------------------------------------ model decode


def _n(v: Optional[float], digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _tps(rows: List[Row], contender: str, B: int, N: int, metric: str = "tokens_per_s") -> Optional[Row]:
    hit = select(rows, kernel="decode_step", contender=contender, metric=metric, B=B, N=N)
    return hit[0] if hit else None


def _ratio(num: Optional[Row], den: Optional[Row]) -> str:
    if not num or not den:
        return "-"
    return f"{num['median'] / den['median']:.2f}x"


def _overhead(r: Optional[Row]) -> str:
    v = _get(r, "overhead_pct") if r else None
    return "-" if v is None else f"{v:+.1f}%"


def model_batch_table(rows: List[Row]) -> str:
    """Batch sweep, N = B (every request its own adapter): tokens/s per contender."""
    Bs = sorted({_get(r, "B") for r in select(rows, kernel="decode_step", metric="tokens_per_s")
                 if _get(r, "B") == _get(r, "N")})
    body = []
    for B in Bs:
        base, ours, peft = (_tps(rows, c, B, B) for c in ("base", "openlora", "peft_mixed"))
        step = select(rows, kernel="decode_step", contender="openlora", metric="step_time", B=B, N=B)
        floor = _get(ours, "adapter_bytes_over_base_pct") if ours else None
        body.append([B, _n(base and base["median"]), _n(ours and ours["median"]), _n(peft and peft["median"]),
                     _us(step[0]["median"]) if step else "-", _overhead(ours), _overhead(peft), _ratio(ours, peft),
                     "-" if floor is None else f"{floor:.1f}%", _get(ours, "check") if ours else "-"])
    return table(["B (= N adapters)", "base tok/s", "openlora tok/s", "PEFT mixed tok/s", "openlora ms/step",
                  "openlora overhead", "PEFT overhead", "openlora / PEFT", "adapter bytes / base bytes",
                  "check vs PEFT"], body)


def adapter_sweep_batch(rows: List[Row]) -> Optional[int]:
    """The batch of the adapter sweep: the largest B measured with more than one N."""
    tps = select(rows, kernel="decode_step", metric="tokens_per_s")
    Bs = [B for B in sorted({_get(r, "B") for r in tps}, reverse=True)
          if len({_get(r, "N") for r in select(tps, B=B)}) > 1]
    return Bs[0] if Bs else None


def model_adapters_table(rows: List[Row]) -> Tuple[Optional[int], str]:
    """Adapter sweep at the largest batch: per-adapter throughput as N grows."""
    B = adapter_sweep_batch(rows)
    if B is None:
        return None, ""
    tps = select(rows, kernel="decode_step", metric="tokens_per_s")
    body = []
    for N in sorted({_get(r, "N") for r in select(tps, B=B)}):
        base, ours, peft = (_tps(rows, c, B, N) for c in ("base", "openlora", "peft_mixed"))
        body.append([N, _n(base and base["median"]), _n(ours and ours["median"]), _n(peft and peft["median"]),
                     _n(_get(ours, "per_adapter_tokens_per_s") if ours else None, 1),
                     _n(_get(peft, "per_adapter_tokens_per_s") if peft else None, 1),
                     _overhead(ours), _overhead(peft), _ratio(ours, peft)])
    return B, table(["N adapters", "base tok/s", "openlora tok/s", "PEFT mixed tok/s", "openlora tok/s per adapter",
                     "PEFT tok/s per adapter", "openlora overhead", "PEFT overhead", "openlora / PEFT"], body)


def model_graph_table(rows: List[Row]) -> str:
    failed = select(rows, kernel="decode_step", metric="graph_failed")
    g = select(rows, kernel="decode_step", metric="step_time_graph")
    if not g and not failed:
        return "Not measured in this run (CUDA graphs are GPU-only, or the run was cut short)."
    body = []
    for B in sorted({_get(r, "B") for r in g}):
        base, ours = (_tps(rows, c, B, B, "step_time_graph") for c in ("base", "openlora"))
        eager = select(rows, kernel="decode_step", contender="openlora", metric="step_time", B=B, N=B)
        ours_t = _tps(rows, "openlora", B, B, "tokens_per_s_graph")
        body.append([B, _us(base and base["median"]), _us(ours and ours["median"]),
                     _us(eager[0]["median"]) if eager else "-", _overhead(ours_t),
                     f"{_get(ours, 'replay_vs_eager_rel_diff'):.1e}" if ours else "-"])
    text = table(["B (= N adapters)", "base graph ms", "openlora graph ms", "openlora eager ms",
                  "openlora overhead (graph)", "replay vs eager logits"], body) if body else ""
    for r in failed:
        text += f"\n\nCUDA graph capture of {r['contender']} at B={_get(r, 'B')} failed: {_get(r, 'error')}"
    return text.strip()


def model_memory_table(rows: List[Row]) -> str:
    mem = select(rows, kernel="memory")
    body = []
    for N in sorted({_get(r, "N") for r in mem}):
        def one(contender, metric):
            hit = select(mem, N=N, contender=contender, metric=metric)
            return hit[0] if hit else None

        oc, mc = one("openlora_base_plus_adapters", "memory_computed"), one("merged_copies", "memory_computed")
        om, mm = one("openlora_base_plus_adapters", "memory_measured"), one("merged_copies", "memory_measured")
        slots_m = _get(om, "slot_bytes_measured") if om else None
        body.append([N, _n(oc and oc["median"], 1), _n(mc and mc["median"], 1), _ratio(mc, oc),
                     _n(om and om["median"], 1), _n(mm and mm["median"], 1), _ratio(mm, om),
                     _n(_get(oc, "slot_bytes_reported") / 2**20, 2) if oc else "-",
                     "-" if slots_m is None else _n(slots_m / 2**20, 2)])
    return table(["N adapters", "one base + N adapters MiB (computed)", "N merged copies MiB (computed)",
                  "merged / ours", "one base + N adapters MiB (measured)", "N merged copies MiB (N x measured)",
                  "merged / ours (measured)", "pool slots MiB (reported)", "pool slots MiB (measured)"], body)


def model_targets(rows: List[Row]) -> str:
    """Issue 5's model target at B = 32 with 32 distinct adapters (GPU runs only)."""
    if is_cpu(rows):
        return "CPU run: the targets are GPU targets (H100 / H200) and are not assessed here."
    ours, peft = _tps(rows, "openlora", 32, 32), _tps(rows, "peft_mixed", 32, 32)
    if not ours:
        return "- model decode, batch 32, 32 distinct adapters: not measured in this file"
    lines = []
    ov = _get(ours, "overhead_pct")
    if ov is not None:
        floor = _get(ours, "adapter_bytes_over_base_pct")
        lines.append(f"- model decode, batch 32, 32 distinct adapters: LoRA overhead over the base model {ov:+.1f}% "
                     f"(target <= 10%): {'met' if ov <= 10.0 else 'MISSED'}"
                     + ("" if floor is None else f" (the 32 adapters' bytes are {floor:.1f}% of the base model's)"))
    if peft:
        x = ours["median"] / peft["median"]
        lines.append(f"- model decode, batch 32, 32 distinct adapters: {x:.1f}x the per-adapter throughput of PEFT's "
                     f"mixed batch (target >= 10x): {'met' if x >= 10.0 else 'MISSED'}")
    g = _tps(rows, "openlora", 32, 32, "tokens_per_s_graph")
    if g and _get(g, "overhead_pct") is not None:
        lines.append(f"  - for information: under CUDA graphs (base and ours both replayed) the overhead is "
                     f"{_get(g, 'overhead_pct'):+.1f}%")
    return "\n".join(lines)


def model_markdown(rows: List[Row], source: str = "") -> str:
    any_row = rows[0] if rows else {}
    out = [f"Source: `{source}`; {provenance(rows)}", "",
           f"Model: {_get(any_row, 'model')}, {any_row.get('shape', '')}; dtype {_get(any_row, 'dtype')}; "
           f"openlora backend {_get(any_row, 'backend')}.", "",
           "#### Decode throughput vs batch (N = B: every request its own adapter)", "", model_batch_table(rows)]
    B, t = model_adapters_table(rows)
    if t:
        out += ["", f"#### Per-adapter throughput as N grows (batch {B}, row i uses adapter i mod N)", "", t]
    out += ["", "#### CUDA graphs (one decode step replayed; base and openlora)", "", model_graph_table(rows),
            "", "#### Memory: one base + N adapters against N merged copies", "", model_memory_table(rows)]
    if is_cpu(rows):
        out += ["", "CPU run: memory figures are computed from parameter bytes (and the pool's own report); "
                    "nothing is measured with an allocator."]
    out += ["", "#### Targets", "", model_targets(rows)]
    return "\n".join(out) + "\n"


def model_summary(rows: List[Row]) -> str:
    B, t = model_adapters_table(rows)
    return "\n".join([provenance(rows), "", "decode tokens/s, N = B:", model_batch_table(rows)]
                     + (["", f"per adapter, batch {B}:", t] if t else []) + ["", "targets:", model_targets(rows)])


# -------------------------------------------------------------------------------- adapter swap


SWAP_ORDER = ("hit", "warm", "cold_page_cache", "cold_disk", "reread_disk", "model_reload_page_cache",
              "model_reload_disk")
SWAP_MEANING = {
    "hit": "already in a device slot",
    "warm": "host cache -> slot",
    "cold_page_cache": "PEFT dir (OS page cache) -> host -> slot",
    "cold_disk": "PEFT dir (disk) -> host -> slot",
    "reread_disk": "dropped by the host budget, re-read from disk -> slot",
    "model_reload_page_cache": "whole model: safetensors (page cache) -> load_state_dict",
    "model_reload_disk": "whole model: safetensors (disk) -> load_state_dict",
}


def _times(num: Optional[Row], den: Optional[Row]) -> str:
    if not num or not den:
        return "-"
    return f"{num['median'] / den['median']:.3g}x"


def swap_table(rows: List[Row]) -> str:
    body = []
    warm = best(select(rows, contender="warm"))
    cold = best(select(rows, contender="cold_disk"))
    for c in SWAP_ORDER:
        r = best(select(rows, contender=c))
        if not r:
            continue
        moved = _get(r, "bytes_moved")
        body.append([c, SWAP_MEANING[c], _n(r["median"], 3), _n(r["p20"], 3), _n(r["p80"], 3),
                     "-" if not moved else _n(moved / 2**20, 2),
                     "-" if _get(r, "gbps") is None else f"{_get(r, 'gbps'):.2f}",
                     _times(r, warm), _times(r, cold), _get(r, "reps")])
    return table(["state", "path", "median ms", "p20 ms", "p80 ms", "MiB read", "GB/s", "vs warm", "vs cold_disk",
                  "reps"], body)


def swap_markdown(rows: List[Row], source: str = "") -> str:
    r = rows[0] if rows else {}
    fs = _get(r, "fs")
    out = [f"Source: `{source}`; {provenance(rows)}", "",
           f"Model: {_get(r, 'model')}, {r.get('shape', '')}; dtype {_get(r, 'dtype')}; files on a {fs} filesystem"
           + (" (tmpfs holds files in memory: the 'disk' rows read memory)" if fs == "tmpfs" else "") + ".", "",
           swap_table(rows)]
    return "\n".join(out) + "\n"


def swap_summary(rows: List[Row]) -> str:
    return provenance(rows) + "\n" + swap_table(rows)


# -------------------------------------------------------------------------------- documents


def markdown(rows: List[Row], source: str = "") -> str:
    out = [f"Source: `{source}`; {provenance(rows)}", "", "#### Ceilings (measured in the same run)", "",
           ceilings_table(rows)]
    shapes = _ordered(r["shape"] for r in select(rows, sweep="T"))
    for op in ("add_lora", "lora_shrink", "lora_expand"):
        for shape in shapes:
            if select(rows, kernel=op, shape=shape, sweep="T"):
                model = _get(select(rows, kernel=op, shape=shape)[0], "model")
                out += ["", f"#### {op}, {shape} ({model}), rank 16, distinct adapters", "", op_table(rows, op, shape)]
    for sweep, column, base in (("ranks", "rank", "16"), ("workloads", "workload", "distinct")):
        for shape in _ordered(r["shape"] for r in select(rows, sweep=sweep)):
            t = pivot_table(rows, shape, sweep, column, base)
            if t:
                out += ["", f"#### add_lora by {column}, {shape}: ours µs (% of roofline)", "", t]
    if select(rows, kernel="build_batch_meta"):
        out += ["", "#### Batch metadata build (once per forward)", "", meta_table(rows)]
    out += ["", "#### Targets", "", targets(rows)]
    return "\n".join(out) + "\n"


def console_summary(rows: List[Row]) -> str:
    """Short text for the end of a run: the add_lora tables and the targets."""
    out = [provenance(rows)]
    for shape in _ordered(r["shape"] for r in select(rows, kernel="add_lora", sweep="T")):
        out += ["", f"add_lora {shape}, rank 16, distinct", op_table(rows, "add_lora", shape)]
    out += ["", "targets:", targets(rows)]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Markdown tables and target checks from benchmark CSVs")
    p.add_argument("csv", help="a results file written by bench_kernels.py, bench_model.py or bench_swap.py")
    p.add_argument("--out", default=None, help="write the markdown here (default: stdout)")
    a = p.parse_args(argv)
    rows = common.read_rows(a.csv)
    kind = rows[0]["benchmark"] if rows else "kernels"
    render = {"model": model_markdown, "swap": swap_markdown}.get(kind, markdown)
    text = render(rows, os.path.relpath(a.csv))
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
