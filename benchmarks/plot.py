"""Draw PNGs from the kernel benchmark's CSV rows (needs matplotlib; nothing else depends on it).

    python -m benchmarks.plot benchmarks/results/kernels_<device>.csv [--out-dir DIR]

For each op (add_lora, lora_shrink, lora_expand), one figure per metric with a panel per shape
(rank 16, distinct adapters, the T sweep):
  <op>_time.png      median time vs T per contender (p20-p80 band), ours also under CUDA graphs,
                     and the roofline time (minimum bytes / measured bandwidth)
  <op>_roofline.png  % of the HBM roofline vs T (the 75% decode target drawn in)
  <op>_speedup.png   our best time against each baseline's, vs T (3x and 10x drawn in)
and add_lora_ranks.png, add_lora_workloads.png (our best time per rank / popularity) and
meta_build.png. Every title names the device and commit of the rows.

For the model benchmark's CSV (bench_model.py): model_tokens_per_s.png (tokens/s vs batch per
contender, N = B; CUDA-graph timings dashed), model_overhead_vs_n.png (LoRA overhead in % over the
base model vs N adapters in the batch, 10% target dotted), model_per_adapter_vs_n.png (tokens/s
per adapter vs N) and model_memory_vs_n.png (one base + N adapters against N merged copies). For
the swap benchmark's CSV (bench_swap.py): swap_latency.png (median time per state, p20-p80 bars).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.report import (BASELINES, SWAP_ORDER, _get, _ordered, adapter_sweep_batch, best,  # noqa: E402
                               is_ours, select)

Row = Dict


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(plt, n: int):
    cols = 2 if n > 1 else 1
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    flat = [ax for line in axes for ax in line]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _title(rows: List[Row], what: str) -> str:
    r = rows[0]
    return f"{what}\n{r['device']} | torch {r['torch']} | triton {r['triton']} | commit {r['commit']}"


def _series(rows: List[Row], contender: str, metric: str):
    pts = sorted(((_get(r, "T"), r) for r in select(rows, contender=contender, metric=metric)), key=lambda p: p[0])
    return [p[0] for p in pts], [p[1] for p in pts]


def _best_ours(rows: List[Row], metric: str):
    Ts = sorted(_ordered(_get(r, "T") for r in rows))
    out = []
    for T in Ts:
        b = best(r for r in select(rows, T=T, metric=metric) if is_ours(r))
        if b:
            out.append((T, b))
    return out


def _logx(ax):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("T (rows in the batch)")
    ax.grid(True, which="both", alpha=0.3)


def _shape_figure(plt, rows: List[Row], shapes: List[str], draw, *, ylabel: str, log_y: bool, title: str,
                  out_dir: str, name: str, hlines=()) -> str:
    """One panel per shape: ``draw(ax, shape)`` adds the lines, this adds axes, guides and titles."""
    fig, axes = _panels(plt, len(shapes))
    for ax, shape in zip(axes, shapes):
        draw(ax, shape)
        for level in hlines:
            ax.axhline(level, color="gray", ls=":", lw=1)
        _logx(ax)
        if log_y:
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(shape, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(_title(rows, title), fontsize=9)
    return _save(fig, plt, out_dir, name)


def _contender_lines(ax, rows: List[Row], value, band: bool) -> None:
    """A line per contender and timing mode (graph dashed); ``value(row)`` is the y of a point."""
    for c in _ordered(r["contender"] for r in rows):
        for metric, style in (("time", "-"), ("time_graph", "--")):
            T, pts = _series(rows, c, metric)
            if not T:
                continue
            ax.plot(T, [value(p) for p in pts], style, marker="o", ms=3, lw=2 if c.startswith("olk-") else 1,
                    label=c + (" (graph)" if metric == "time_graph" else ""))
            if band:
                ax.fill_between(T, [p["p20"] for p in pts], [p["p80"] for p in pts], alpha=0.15)


def plot_op(plt, rows: List[Row], op: str, out_dir: str) -> List[str]:
    rs = select(rows, kernel=op, sweep="T")
    shapes = _ordered(r["shape"] for r in rs)
    if not shapes:
        return []

    def time_panel(ax, shape):
        sr = select(rs, shape=shape)
        _contender_lines(ax, sr, lambda p: p["median"], band=True)
        roof = sorted({(_get(r, "T"), _get(r, "roofline_us")) for r in sr if is_ours(r)})
        if roof:
            ax.plot([t for t, _ in roof], [u for _, u in roof], "k:", label="roofline")

    def roofline_panel(ax, shape):
        _contender_lines(ax, select(rs, shape=shape), lambda p: _get(p, "pct_roofline"), band=False)

    def speedup_panel(ax, shape):
        sr = select(rs, shape=shape, metric="time")
        ours = dict(_best_ours(sr, "time"))
        for base in BASELINES:
            pts = [(T, b["median"] / o["median"]) for T, o in sorted(ours.items())
                   for b in [best(select(sr, T=T, contender=base))] if b]
            if pts:
                ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", ms=3, label=f"{base} / ours")

    common_kw = dict(out_dir=out_dir)
    return [
        _shape_figure(plt, rows, shapes, time_panel, ylabel="µs per call (median)", log_y=True,
                      title=f"{op}: time vs T (rank 16, distinct adapters)", name=f"{op}_time.png", **common_kw),
        _shape_figure(plt, rows, shapes, roofline_panel, ylabel="% of HBM roofline", log_y=False, hlines=(75,),
                      title=f"{op}: % of roofline vs T (75% decode target dotted)", name=f"{op}_roofline.png",
                      **common_kw),
        _shape_figure(plt, rows, shapes, speedup_panel, ylabel="speed-up of ours (eager)", log_y=True,
                      hlines=(1, 3, 10), title=f"{op}: speed-up of our best backend over the baselines",
                      name=f"{op}_speedup.png", **common_kw),
    ]


def plot_sweep(plt, rows: List[Row], sweep: str, column: str, base: str, out_dir: str) -> Optional[str]:
    add = select(rows, kernel="add_lora", metric="time")
    shapes = _ordered(r["shape"] for r in select(add, sweep=sweep))
    if not shapes:
        return None

    def panel(ax, shape):
        sr = select(add, shape=shape, sweep=("T", sweep))
        Ts = set(_get(r, "T") for r in select(sr, sweep=sweep))
        values = [base] + [v for v in _ordered(_get(r, column) for r in select(sr, sweep=sweep)) if v != base]
        for v in values:
            pts = [(T, b) for T, b in _best_ours(select(sr, **{column: v}), "time") if T in Ts]
            if pts:
                ax.plot([t for t, _ in pts], [b["median"] for _, b in pts], marker="o", ms=3, label=f"{column} {v}")

    return _shape_figure(plt, rows, shapes, panel, ylabel="µs per call, ours (median)", log_y=True,
                         title=f"add_lora by {column}", out_dir=out_dir, name=f"add_lora_{sweep}.png")


def plot_meta(plt, rows: List[Row], out_dir: str) -> Optional[str]:
    rs = select(rows, kernel="build_batch_meta")
    if not rs:
        return None
    fig, (ax,) = _panels(plt, 1)
    for metric, style in (("time", "-"), ("time_graph", "--")):
        T, pts = _series(rs, "olk", metric)
        if T:
            ax.plot(T, [p["median"] for p in pts], style, marker="o", ms=3, label=metric)
    _logx(ax)
    ax.set_yscale("log")
    ax.set_ylabel("µs per build (median)")
    ax.legend(fontsize=7)
    fig.suptitle(_title(rows, "batch metadata build (once per forward)"), fontsize=9)
    return _save(fig, plt, out_dir, "meta_build.png")


# ------------------------------------------------------------------------ model decode, swap

MODEL_CONTENDERS = ("base", "openlora", "peft_mixed")


def _model_series(rows: List[Row], contender: str, metric: str, x: str, **want):
    pts = sorted(((_get(r, x), r) for r in select(rows, kernel="decode_step", contender=contender, metric=metric,
                                                  **want)), key=lambda p: p[0])
    return [p[0] for p in pts], [p[1] for p in pts]


def _axes(ax, xlabel: str, ylabel: str, *, log_y: bool) -> None:
    _logx(ax)
    ax.set_xlabel(xlabel)
    if log_y:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def _one_axis(plt, rows: List[Row], title: str):
    fig, ax = plt.subplots(figsize=(9, 5))
    fig.suptitle(_title(rows, title), fontsize=9)
    return fig, ax


def plot_model(plt, rows: List[Row], out_dir: str) -> List[str]:
    written = []
    distinct = [r for r in rows if _get(r, "B") is not None and _get(r, "B") == _get(r, "N")]
    fig, ax = _one_axis(plt, rows, "decode tokens/s vs batch (N = B distinct adapters)")
    for c in MODEL_CONTENDERS:
        for metric, style in (("tokens_per_s", "-"), ("tokens_per_s_graph", "--")):
            B, pts = _model_series(distinct, c, metric, "B")
            if B:
                ax.plot(B, [p["median"] for p in pts], style, marker="o", ms=3,
                        label=c + (" (CUDA graph)" if metric.endswith("graph") else ""))
    _axes(ax, "batch B (requests, one token each)", "tokens/s (median)", log_y=True)
    written.append(_save(fig, plt, out_dir, "model_tokens_per_s.png"))

    B = adapter_sweep_batch(rows)
    if B is not None:
        for name, field, ylabel, log_y, guide in (
                ("model_overhead_vs_n.png", "overhead_pct", "LoRA overhead over base (%)", False, 10.0),
                ("model_per_adapter_vs_n.png", "per_adapter_tokens_per_s", "tokens/s per adapter", True, None)):
            fig, ax = _one_axis(plt, rows, f"{ylabel} vs N adapters in a batch of {B}")
            for c in MODEL_CONTENDERS[1:]:
                N, pts = _model_series(rows, c, "tokens_per_s", "N", B=B)
                pts = [(n, _get(p, field)) for n, p in zip(N, pts) if _get(p, field) is not None]
                if pts:
                    ax.plot([n for n, _ in pts], [v for _, v in pts], marker="o", ms=3, label=c)
            if guide is not None:
                ax.axhline(guide, color="gray", ls=":", lw=1)
            _axes(ax, "N distinct adapters in the batch", ylabel, log_y=log_y)
            written.append(_save(fig, plt, out_dir, name))

    mem = select(rows, kernel="memory")
    if mem:
        fig, ax = _one_axis(plt, rows, "memory: one base + N adapters vs N merged copies")
        for c in ("openlora_base_plus_adapters", "merged_copies"):
            for metric, style in (("memory_computed", "-"), ("memory_measured", "--")):
                pts = sorted((_get(r, "N"), r["median"]) for r in select(mem, contender=c, metric=metric))
                if pts:
                    ax.plot([n for n, _ in pts], [v for _, v in pts], style, marker="o", ms=3,
                            label=f"{c} ({metric.split('_')[1]})")
        _axes(ax, "N adapters", "MiB", log_y=True)
        written.append(_save(fig, plt, out_dir, "model_memory_vs_n.png"))
    return written


def plot_swap(plt, rows: List[Row], out_dir: str) -> Optional[str]:
    pts = [(c, best(select(rows, contender=c))) for c in SWAP_ORDER]
    pts = [(c, r) for c, r in pts if r]
    if not pts:
        return None
    fig, ax = _one_axis(plt, rows, "time to bring weights onto the device (median, p20-p80)")
    y = list(range(len(pts)))
    med = [r["median"] for _, r in pts]
    err = [[r["median"] - r["p20"] for _, r in pts], [r["p80"] - r["median"] for _, r in pts]]
    ax.barh(y, med, xerr=err, color=["C0" if not c.startswith("model") else "C3" for c, _ in pts])
    ax.set_yticks(y)
    ax.set_yticklabels([c for c, _ in pts], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ms (log scale)")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    for yi, m in zip(y, med):
        ax.text(m, yi, f" {m:.3g} ms", va="center", fontsize=7)
    return _save(fig, plt, out_dir, "swap_latency.png")


def _save(fig, plt, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="PNG plots from a kernel benchmark CSV")
    p.add_argument("csv")
    p.add_argument("--out-dir", default=None, help="default: benchmarks/out/plots/<csv name>/ (untracked; $OPENLORA_BENCH_OUT sets the folder)")
    a = p.parse_args(argv)
    try:
        plt = _plt()
    except ImportError:
        print("plot: matplotlib is not installed (pip install matplotlib); no plots drawn")
        return 2
    rows = common.read_rows(a.csv)
    stem = os.path.splitext(os.path.basename(a.csv))[0]
    out_dir = a.out_dir or os.path.join(common.RESULTS_DIR, "plots", stem)
    os.makedirs(out_dir, exist_ok=True)
    kind = rows[0]["benchmark"] if rows else "kernels"
    if kind in ("model", "swap"):
        written = [w for w in (plot_model(plt, rows, out_dir) if kind == "model" else [plot_swap(plt, rows, out_dir)])
                   if w]
        print(f"plot: {len(written)} PNGs in {out_dir}")
        return 0
    written = []
    for op in ("add_lora", "lora_shrink", "lora_expand"):
        written += plot_op(plt, rows, op, out_dir)
    written += [plot_sweep(plt, rows, "ranks", "rank", "16", out_dir),
                plot_sweep(plt, rows, "workloads", "workload", "distinct", out_dir), plot_meta(plt, rows, out_dir)]
    written = [w for w in written if w]
    print(f"plot: {len(written)} PNGs in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
