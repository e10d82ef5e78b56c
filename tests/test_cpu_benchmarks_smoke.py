"""Smoke runs of the CPU benchmarks added for the native backend (seconds each): the metadata
benchmark against vLLM (when installed) and the before/after harness on one tree against itself."""
import csv
import os

import pytest

import openlora_kernels as olk
from benchmarks import bench_cpu_ab, bench_metadata, common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_metadata_quick_writes_rows(tmp_path):
    out = str(tmp_path / "meta.csv")
    assert bench_metadata.main(["--quick", "--out", out]) == 0
    rows = common.read_rows(out)
    contenders = {r["contender"] for r in rows}
    assert {"olk", "olk_from_list", "olk_torch_ops"} <= contenders
    assert all(r["unit"] == "us" and 0 < r["p20"] <= r["median"] <= r["p80"] for r in rows)
    assert {r["extra"]["regime"] for r in rows} == {"decode", "prefill"}


@pytest.mark.skipif(not olk.available_backends("cpu")["cpu"].usable, reason="the native CPU extension is not built")
def test_bench_cpu_ab_runs_two_trees_in_turn(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_cpu_ab, "cases", lambda: {"tiny_rm": (8, 4, 32, 48, 4, "float32", "rm", None),
                                                        "tiny_std": (16, 2, 32, 48, 4, "bfloat16", "std", 8)})
    out = str(tmp_path / "ab.csv")
    assert bench_cpu_ab.main(["--tree", f"a={ROOT}@x1", "--tree", f"b={ROOT}@x2", "--rounds", "2", "--reps", "2",
                              "--out", out]) == 0
    with open(out, newline="", encoding="utf-8") as f:
        raw = list(csv.DictReader(f))
    assert len(raw) == 4
    rows = common.read_rows(out)
    assert {(r["contender"], r["extra"]["tree_commit"]) for r in rows} == {("a", "x1"), ("b", "x2")}
    assert all(r["extra"]["vs_a"] > 0 for r in rows)


@pytest.mark.skipif(not olk.available_backends("cpu")["cpu"].usable, reason="the native CPU extension is not built")
def test_bench_storage_dtype_rows_at_a_tiny_shape(tmp_path):
    """rows() (what bench_pool collects) and main's CSV at a tiny shape: every contender, the
    paired ratios, bf16 / fp16 storage with half the slot bytes of fp32 and a non-zero error."""
    from benchmarks import bench_storage_dtype

    argv = ["--rows", "4", "--hidden", "32", "--intermediate", "48", "--layers", "1", "--heads", "2", "--vocab", "64",
            "--adapters", "2", "--rank", "4", "--rounds", "3"]
    rows = bench_storage_dtype.rows(argv)
    by = {r["contender"]: r for r in rows}
    assert {"base", "openlora_fp32", "openlora_bf16", "openlora_fp16", "floor_bf16", "openlora_without_lora_math",
            "lora_calls_bf16"} <= set(by)
    assert by["base"]["ratio_vs_base"] == 1.0 and all(r["median"] > 0 and r["ratio_vs_base"] > 0 for r in rows)
    assert by["openlora_bf16"]["slot_bytes"] * 2 == by["openlora_fp32"]["slot_bytes"]
    assert 0 < by["openlora_fp16"]["max_abs_diff_vs_peft_fp32"] < by["openlora_bf16"]["max_abs_diff_vs_peft_fp32"]
    assert by["openlora_fp32"]["diff_vs_lora_effect"] < 1e-4
    # fp8: a byte per weight plus a float32 scale per rank row of A and of B, 4 bits kept per weight
    assert by["openlora_fp8"]["slot_bytes"] * 4 > by["openlora_fp32"]["slot_bytes"]
    assert by["openlora_fp8"]["slot_bytes"] < by["openlora_bf16"]["slot_bytes"]
    assert by["openlora_bf16"]["max_abs_diff_vs_peft_fp32"] < by["openlora_fp8"]["max_abs_diff_vs_peft_fp32"]
    assert by["openlora_fp8"]["diff_vs_lora_effect"] < 0.3 and "floor_fp8" in by
    # ours is PEFT on the weights quantized as we store them (B per rank row), up to fp32 sums
    fp8 = by["openlora_fp8"]
    assert abs(fp8["diff_vs_lora_effect"] - fp8["sim_diff_vs_lora_effect_b_per_rank"]) < 1e-4
    assert 0 < fp8["sim_diff_vs_lora_effect_b_per_output"] < 0.3
    for axis in ("rank", "output"):
        assert 0 < fp8[f"sim_jitter_b_per_{axis}_min"] <= fp8[f"sim_jitter_b_per_{axis}_max"] < 0.3
    out = str(tmp_path / "storage.csv")
    bench_storage_dtype.main(argv + ["--out", out])
    assert {r["contender"] for r in common.read_rows(out)} == set(by)
