"""Launch configurations of the Triton kernels: tuned tables as data, heuristics as fallback.

Nothing is autotuned at run time (no benchmarking on a serving hot path). A configuration is
chosen per call from:

1. an override installed by :func:`override_config` (tests, benchmarks, tuning scripts);
2. a tuned table ``configs/<gpu name>.json`` shipped in the package (see ``tuned_table_path``),
   whose rules are matched in order: ``{"kind": "fused", "match": {"block_m": [1, 4],
   "K": [1, 8192], "N": [1, 8192], "R": [1, 64], "dtype": ["bfloat16"]}, "config": {...}}``
   (each ``match`` entry is an inclusive [lo, hi] range, or a list of allowed values for
   strings; missing keys match anything);
3. the heuristics below (the safe default for unknown GPUs);
4. under Triton's interpreter, one pinned configuration (speed of the interpreter only).

Kinds and their keys:
  shrink  BLOCK_R, BLOCK_K, SPLIT_K, num_warps, num_stages
  expand  BLOCK_N, BLOCK_R, num_warps, num_stages
  fused   BLOCK_N, BLOCK_K, N_CHUNKS (0 = derive from the SM count), num_warps, num_stages
  route   FUSED (bool): add_lora runs a decode plan, else shrink then expand (prefill);
          DECODE ("fused" | "segment" | "auto"), SEGMENT_MIN_BYTES: which decode plan ("auto": the
          segment plan when the fused plan's modelled re-reads of A exceed SEGMENT_MIN_BYTES)
  segment BLOCK_M (most rows per step), BLOCK_K, K_SPAN (K per shrink program, 0: all), BLOCK_N, COLS
          (columns per expand program), num_warps (expand), SHRINK_WARPS, num_stages (triton_segment.py)
  wgrad   BLOCK_T (rows per step), BLOCK_R (rank block), BLOCK_F (block of the other dim: K for
          dA, N for dB), SPLIT_T (0 = derive from the SM count and T / S), num_warps, num_stages
          (the backward's weight gradients; key: K = the other dim, N = T, R, n_slices = S)
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from typing import Any, Dict, Iterator, List, Optional

import torch

from ..metadata import TENSOR_CORE_MIN_M
from .backends import triton_interpreter_enabled

_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
_overrides: Dict[str, Dict[str, Any]] = {}


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


@contextlib.contextmanager
def override_config(kind: str, **values: Any) -> Iterator[None]:
    """Force some keys of one kind's configuration inside a ``with`` block."""
    previous = _overrides.get(kind)
    _overrides[kind] = {**(previous or {}), **values}
    try:
        yield
    finally:
        if previous is None:
            _overrides.pop(kind, None)
        else:
            _overrides[kind] = previous


def gpu_table_name(device_name: str) -> str:
    """File stem of the tuned table for a GPU name, e.g. 'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3'."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_")


def tuned_table_path(device_name: str, config_dir: Optional[str] = None) -> str:
    return os.path.join(config_dir or _CONFIG_DIR, gpu_table_name(device_name) + ".json")


@functools.lru_cache(maxsize=None)
def load_tuned_table(device_name: str, config_dir: Optional[str] = None) -> List[Dict[str, Any]]:
    path = tuned_table_path(device_name, config_dir)
    if not os.path.exists(path):
        return []
    with open(path, "r", encoding="utf-8") as f:
        table = json.load(f)
    rules = table.get("rules", []) if isinstance(table, dict) else table
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict) or "kind" not in rule or "config" not in rule:
            raise ValueError(f"{path}: rule {i} needs 'kind' and 'config'")
    return rules


def _matches(match: Dict[str, Any], key: Dict[str, Any]) -> bool:
    for name, want in match.items():
        have = key.get(name)
        if isinstance(want, list) and len(want) == 2 and all(isinstance(v, int) for v in want):
            if have is None or not (want[0] <= have <= want[1]):
                return False
        elif isinstance(want, list):
            if have not in want:
                return False
        elif have != want:
            return False
    return True


@functools.lru_cache(maxsize=None)
def _device_facts(index: int):
    props = torch.cuda.get_device_properties(index)
    return props.name, props.multi_processor_count


def device_facts(device: torch.device):
    """(name, SM count) of a CUDA device; ('interpreter', 1) for CPU tensors."""
    if device.type != "cuda":
        return "interpreter", 1
    return _device_facts(device.index if device.index is not None else torch.cuda.current_device())


# ------------------------------------------------------------------------------ heuristics


def _heuristic(kind: str, key: Dict[str, Any]) -> Dict[str, Any]:
    """Untuned defaults. Sized so that no 16-bit configuration spills registers on sm_80/sm_90
    (checked offline by tests/triton_compile_check.py); GPU tuning refines them per shape."""
    bm, R = key["block_m"], key["R"]
    dot = bm >= TENSOR_CORE_MIN_M
    fp32 = key.get("dtype") == "float32"
    rp = next_pow2(R)
    # CUDA-core tiles hold BLOCK_M x BLOCK_R x BLOCK_K products in registers: keep that bounded.
    budget = 8192 if bm == 1 else 4096
    if kind == "route":
        # Decode-like batches are launch- and memory-bound: one fused launch while A's re-reads stay
        # within L2's reach (a quarter of a 32-50 MB L2: untimed guess, a GPU run's table moves it),
        # beyond that the segment plan, which reads every weight byte once (triton_segment.py).
        return {"FUSED": not dot, "DECODE": "auto", "SEGMENT_MIN_BYTES": 8 << 20}
    if kind == "segment":
        rpad = max(rp, 16)
        # rows per step: fp32 tiles of 32+ rows spill at R_PAD >= 64 (sm_90, tests/triton_compile_check.py)
        # (and 16-bit ones of 32 rows at R_PAD 128; 8 warps lose the expand's 16-byte loads)
        block_m = 16 if (fp32 or rpad >= 128) else 64
        # the shrink holds one [BLOCK_M, R_PAD] fp32 accumulator per slice (up to 4): 8 warps past
        # 256 lanes of them or 8192 elements (fused QKV at R_PAD 128, or 64 with 64 rows)
        acc = min(key["n_slices"], 4) * rpad
        # K_SPAN 0: the whole K per shrink program (h stored, no zero fill, no atomics: a bound plan
        # of two launches, deterministic); a GPU run may split K for more programs per segment
        return {"BLOCK_M": block_m, "BLOCK_K": 32 if fp32 else 64, "K_SPAN": 0,
                "BLOCK_N": 32 if fp32 else 64, "COLS": 1024, "num_warps": 4,
                "SHRINK_WARPS": 8 if (acc >= 256 or acc * block_m >= 8192) else 4,
                "num_stages": 1 if (fp32 and rpad >= 128) else 2}
    if kind == "shrink":
        # K blocks no longer than K itself (rounded up to 16): the backward's dY Bᵀ shrink runs over
        # a slice's width N_i, which can be small (a K block 16 times too long spills registers)
        kp = max(16, next_pow2(key["K"]))
        if dot:
            return {"BLOCK_R": _clamp(rp, 16, 64), "BLOCK_K": min(kp, 32 if fp32 else (64 if bm >= 64 else 128)),
                    "SPLIT_K": 1, "num_warps": 8 if fp32 else 4, "num_stages": 3}
        block_r = _clamp(rp, 1, 64)
        return {"BLOCK_R": block_r, "BLOCK_K": min(kp, _clamp(budget // (bm * block_r), 32, 256)), "SPLIT_K": 1,
                "num_warps": 4, "num_stages": 2}
    if kind == "expand":
        if dot:
            bn = (32 if bm >= 64 else 64) if fp32 else (64 if bm >= 64 else 128)
            return {"BLOCK_N": bn, "BLOCK_R": 16 if fp32 else _clamp(rp, 16, 32),
                    "num_warps": 8 if fp32 else 4, "num_stages": 2}
        block_r = _clamp(rp, 1, 64)
        return {"BLOCK_N": _clamp(budget // (bm * block_r), 32, 256), "BLOCK_R": block_r,
                "num_warps": 4, "num_stages": 2}
    if kind == "fused":
        if dot:
            rpad = max(rp, 16)
            wide = bm * rpad >= 4096 or fp32
            bn = 16 if (fp32 and bm * rpad >= 4096) else (32 if wide else 64)
            return {"BLOCK_N": bn, "BLOCK_K": 32 if wide else 64, "N_CHUNKS": 0,
                    "num_warps": 8 if fp32 else 4, "num_stages": 2}
        blk = _clamp(budget // (bm * rp), 16, 256)
        # fp32 at the clamp (BLOCK_M x R_PAD >= 512): 8 warps, so that a thread's share of the
        # [BLOCK_M, R_PAD, 16] products fits (4 warps spilled 8 bytes under Triton 3.6, sm_90)
        warps = 8 if fp32 and bm * rp >= 512 else 4
        return {"BLOCK_N": blk, "BLOCK_K": blk, "N_CHUNKS": 0, "num_warps": warps, "num_stages": 2}
    if kind == "wgrad":
        # tl.dot tiles (>= 16 each way); rows per step from the expected segment length T / S
        rows = key["N"] / max(1, min(key["n_slices"], key["N"]))
        return {"BLOCK_T": 16 if rows < 32 else (32 if fp32 else 64), "BLOCK_R": _clamp(rp, 16, 64),
                "BLOCK_F": 64 if fp32 or rp >= 64 else 128, "SPLIT_T": 0, "num_warps": 4, "num_stages": 2}
    raise ValueError(f"unknown kernel kind {kind!r}")


def _interpreter_pinned(kind: str, key: Dict[str, Any]) -> Dict[str, Any]:
    dot = key["block_m"] >= TENSOR_CORE_MIN_M
    if kind == "route":
        return {"FUSED": not dot, "DECODE": "auto", "SEGMENT_MIN_BYTES": 8 << 20}
    if kind == "segment":   # small K span and column chunk: the tests reach K splits and several chunks
        return {"BLOCK_M": 16, "BLOCK_K": 16, "K_SPAN": 32, "BLOCK_N": 16, "COLS": 32, "num_warps": 4,
                "SHRINK_WARPS": 4, "num_stages": 1}
    if kind == "shrink":
        return {"BLOCK_R": 16, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 4, "num_stages": 1}
    if kind == "expand":
        return {"BLOCK_N": 64, "BLOCK_R": 16, "num_warps": 4, "num_stages": 1}
    if kind == "fused":
        return {"BLOCK_N": 64, "BLOCK_K": 64, "N_CHUNKS": 2, "num_warps": 4, "num_stages": 1}
    if kind == "wgrad":
        return {"BLOCK_T": 16, "BLOCK_R": 16, "BLOCK_F": 32, "SPLIT_T": 1, "num_warps": 4, "num_stages": 1}
    raise ValueError(f"unknown kernel kind {kind!r}")


def config_key(*, block_m: int, K: int, N: int, R: int, n_slices: int, dtype: torch.dtype) -> Dict[str, Any]:
    return {"block_m": block_m, "K": K, "N": N, "R": R, "n_slices": n_slices,
            "dtype": str(dtype).replace("torch.", "")}


def heuristic_config(kind: str, **shape: Any) -> Dict[str, Any]:
    """The untuned default for a launch (what an unknown GPU gets); same keywords as kernel_config."""
    return _heuristic(kind, config_key(**shape))


def kernel_config(kind: str, *, block_m: int, K: int, N: int, R: int, n_slices: int,
                  dtype: torch.dtype, device: torch.device) -> Dict[str, Any]:
    """The configuration for one launch (see the module docstring for the order of sources)."""
    key = config_key(block_m=block_m, K=K, N=N, R=R, n_slices=n_slices, dtype=dtype)
    if device.type == "cpu" or triton_interpreter_enabled():
        cfg = _interpreter_pinned(kind, key)
    else:
        cfg = _heuristic(kind, key)
        name, _ = device_facts(device)
        for rule in load_tuned_table(name):
            if rule["kind"] == kind and _matches(rule.get("match", {}), key):
                cfg = {**cfg, **rule["config"]}
                break
    if kind in _overrides:
        cfg = {**cfg, **_overrides[kind]}
    return cfg
