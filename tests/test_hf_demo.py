"""README's main command, `python -m openlora_kernels.demo`, on a tiny configuration; its timing
summary (medians and p20-p80 over interleaved repeats, ratios worded one way, a noise warning)."""
import re

import numpy as np
import pytest

import openlora_kernels.demo as demo
from openlora_kernels.hf_patch import MultiLoRAModel

TINY = ["--hidden", "64", "--layers", "2", "--seq", "12", "--reps", "3"]
MS = r"\d+\.\d\d ms  \(p20-p80 \d+\.\d\d-\d+\.\d\d\)"


def test_demo_runs_and_agrees_with_peft(capsys):
    assert demo.main(TINY) == 0
    out = capsys.readouterr().out
    assert "OK: every row within" in out and "legal" in out
    for regime in ("prefill", "decode-shaped"):
        block = out[out.index(f"forward of the mixed batch, {regime}"):]
        head, base, ours, peft = block.splitlines()[:4]
        assert head.endswith("median of 3 interleaved repeats")
        assert re.fullmatch(rf"  base model, no adapters +{MS}", base), base
        assert re.fullmatch(rf"  openlora_kernels +{MS}  ours took \d+\.\d\dx the base model's time "
                            rf"\(p20-p80 \d+\.\d\dx-\d+\.\d\dx\)", ours), ours
        assert re.fullmatch(rf"  PEFT mixed batch +{MS}  PEFT took \d+\.\dx our time "
                            rf"\(p20-p80 \d+\.\dx-\d+\.\dx\)", peft), peft
    assert "x base" not in out and "x ours" not in out       # the old two-way wording is gone


def test_demo_exits_1_when_a_row_disagrees_with_peft(capsys, monkeypatch):
    real_call = MultiLoRAModel.__call__

    def off_by_a_little(self, *args, **kwargs):
        out = real_call(self, *args, **kwargs)
        out.logits[0] += 1e-3            # above the demo's 1e-4 tolerance, on row 0 only
        return out

    monkeypatch.setattr(MultiLoRAModel, "__call__", off_by_a_little)
    assert demo.main(TINY) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "OK: every row" not in out


def test_quantiles_match_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 16):
        v = rng.exponential(size=n).tolist()
        for q in (0.2, 0.5, 0.8):
            assert demo.quantile(v, q) == pytest.approx(float(np.quantile(v, q)), rel=1e-12)
    assert demo.spread([4.0, 1.0, 3.0, 2.0, 5.0]) == {"median": 3.0, "p20": 1.8, "p80": 4.2}
    with pytest.raises(ValueError, match="no values"):
        demo.quantile([], 0.5)


def test_repeats_are_interleaved_in_rotating_order():
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    samples = demo.time_interleaved(fns, demo.torch.device("cpu"), repeats=3, warmup=1)
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab"
    assert {n: len(s) for n, s in samples.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for s in samples.values() for t in s)


LABELS = {"base": "base", "ours": "ours", "peft": "peft"}


def test_timing_report_words_ratios_one_way():
    samples = {"base": [10.0, 10.0, 11.0, 10.0, 10.0], "ours": [12.0, 12.0, 13.2, 12.0, 12.0],
               "peft": [30.0, 30.0, 26.4, 30.0, 30.0]}
    lines, noisy = demo.timing_report(samples, LABELS)
    assert noisy == []
    assert lines[0] == "  base                         10.00 ms  (p20-p80 10.00-10.20)"
    assert lines[1] == ("  ours                         12.00 ms  (p20-p80 12.00-12.24)  "
                        "ours took 1.20x the base model's time (p20-p80 1.20x-1.20x)")
    # per repeat: 2.5, 2.5, 26.4 / 13.2 = 2.0, 2.5, 2.5 -> median 2.5, p20 2.4
    assert lines[2].endswith("PEFT took 2.5x our time (p20-p80 2.4x-2.5x)")


def test_ratios_are_taken_repeat_by_repeat():
    # a slow spell in repeats 3-5 hits both contenders: the per-repeat ratio stays 1.5
    samples = {"base": [10.0, 10.0, 40.0, 40.0, 40.0], "ours": [15.0, 15.0, 60.0, 60.0, 60.0],
               "peft": [30.0, 30.0, 120.0, 120.0, 120.0]}
    lines, noisy = demo.timing_report(samples, LABELS)
    assert "ours took 1.50x the base model's time (p20-p80 1.50x-1.50x)" in lines[1]
    assert "PEFT took 2.0x our time (p20-p80 2.0x-2.0x)" in lines[2]
    assert noisy == ["p20-p80 spans up to 75% of a median (base)"]    # (40 - 10) / 40, the same for all three


def test_timing_report_warns_on_a_noisy_machine():
    quiet = [10.0] * 5
    lines, noisy = demo.timing_report({"base": quiet, "ours": [10.0, 12.0, 20.0, 30.0, 11.0],
                                       "peft": [40.0] * 5}, LABELS)
    assert noisy == ["p20-p80 spans up to 93% of a median (ours)"]   # (22 - 10.8) / 12
    # faster than the base model: impossible work-wise, so it is noise even with narrow spreads
    lines, noisy = demo.timing_report({"base": quiet, "ours": [8.0] * 5, "peft": [40.0] * 5}, LABELS)
    assert noisy == ["ours came out faster than the base model, which does strictly less work"]
    assert "ours took 0.80x the base model's time" in lines[1]
