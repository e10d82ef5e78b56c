"""fp8 (e4m3) adapter storage: the weight scales of the kernel contract and their quantizer.

Design
------
An adapter stored in ``torch.float8_e4m3fn`` keeps one float32 scale per RANK ROW of each
matrix, beside the fp8 values:

    A_true[s, j, :] = A[s, j, :] * a_scale[s, j]      (lora_A's rows: its output channels)
    B_true[s, :, j] = B[s, :, j] * b_scale[s, j]      (lora_B's columns: the rank it reads)

so both scales are indexed like the ranks, [S, R] per slice in the padded form, and ride along
with the rows in the packed form (ops/packed.py: one [rows] scale vector per buffer, slot s's
scales at ``offsets[s] .. offsets[s] + ranks[s]``, passed to the backends as [S, R'] views with a
slot stride of 0, exactly like the weights). The kernels upcast the fp8 values on load (exactly:
every e4m3 value is a bf16, fp16 and fp32 value), accumulate in fp32, and apply the scales to the
rank-sized intermediate: ``h_j *= a_scale_j`` after the shrink, ``h_j *= b_scale_j`` before the
expand (add_lora folds both into one multiply), so a scale costs R multiplies per row, not one per
weight.

Why per rank row for B and not per output column n: a per-n scale costs N float32 per adapter
and layer, 4N bytes against the r·N bytes of the fp8 B itself (+50% at rank 8, +25% at 16, the
ranks adapters have), it would not follow the rows through the packed pool's compaction, and
the expand would multiply every output element instead of R values. e4m3 is a floating format
(3 mantissa bits at every magnitude above 2^-6 of the scale), so a scale only has to keep a
row's largest value at the top of the range; the relative error of the rest does not depend on
which axis shares the scale as long as the values of one row lie within 2^15 of each other. The
measured error against PEFT's fp32 result: benchmarks/results/pool_cpu.csv (``fp8`` rows) and the
bound in tests/test_storage_dtype.py.

Quantization (``quantize_rows``): scale = amax(|row|) / 448 (e4m3's largest finite value), 1 for
an all-zero row; values are divided by the scale in float32 and rounded to nearest (PyTorch's
cast), so no value saturates. Non-finite weights are refused (an fp8 cast would turn them into
NaN silently).

Example (one slot of rank 4, bf16 activations)::

    >>> import torch, openlora_kernels as olk
    >>> from openlora_kernels.ops.fp8 import quantize_rows, dequantize_rows
    >>> A, B = torch.randn(1, 4, 16), torch.randn(1, 8, 4)          # [S, R, K], [S, N, R]
    >>> qa, sa = quantize_rows(A)                                    # per row of A: [1, 4] scales
    >>> qbt, sb = quantize_rows(B.transpose(1, 2))                   # per column of B: [1, 4] scales
    >>> x, y = torch.randn(3, 16).bfloat16(), torch.zeros(3, 8).bfloat16()
    >>> idx, scal = torch.tensor([0, -1, 0]), torch.tensor([0.5])
    >>> out = olk.add_lora(y, x, qa, qbt.transpose(1, 2), idx, scal, a_scales=sa, b_scales=sb)
    >>> Ad, Bd = dequantize_rows(qa, sa), dequantize_rows(qbt, sb).transpose(1, 2)
    >>> want = 0.5 * (x[0].float() @ Ad[0].T) @ Bd[0].T
    >>> torch.allclose(out[0].float(), want, atol=0.05, rtol=0.02), bool(out[1].eq(0).all())
    (True, True)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# every fp8 dtype torch knows; only FP8 (e4m3fn) is a storage dtype
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2",
                                                "float8_e5m2fnuz") if hasattr(torch, n))


@dataclass(frozen=True)
class WeightScales:
    """The scales of fp8 weights as the backends get them (already validated by ops/api.py):
    ``a`` / ``b``: one float32 tensor per slice, [S, R] (any strides; in the packed form a view
    with slot stride 0 over the [rows] vector, addressed by the offsets like the weights), or
    None when that side's weights are not given (a lone shrink or expand)."""

    a: Optional[Tuple[torch.Tensor, ...]] = None
    b: Optional[Tuple[torch.Tensor, ...]] = None


def quantize_rows(w: torch.Tensor, name: str = "weight") -> Tuple[torch.Tensor, torch.Tensor]:
    """(fp8 e4m3 values of ``w``, float32 scale per row): ``w`` [..., n] quantized with one scale
    per row of its last dimension (``w ≈ q.float() * scale[..., None]``).

        >>> import torch
        >>> from openlora_kernels.ops.fp8 import quantize_rows, dequantize_rows
        >>> w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
        >>> q, s = quantize_rows(w)
        >>> q.dtype, s.tolist()
        (torch.float8_e4m3fn, [0.004464285913854837, 1.0])
        >>> torch.equal(dequantize_rows(q, s), w)     # these values are exact in e4m3
        True
    """
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() < 1:
        raise TypeError(f"{name}: expected a floating-point tensor with at least one dimension")
    wf = w.to(torch.float32)
    if not bool(torch.isfinite(wf).all()):
        raise ValueError(f"{name}: holds a non-finite value (inf or NaN), which fp8 storage cannot keep")
    amax = wf.abs().amax(dim=-1) if wf.shape[-1] else wf.new_zeros(wf.shape[:-1])
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (wf / scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale.contiguous()


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q.float() * scale[..., None]`` in ``dtype``: the values an fp8 row stands for."""
    return (q.to(torch.float32) * scale.to(torch.float32)[..., None]).to(dtype)


def dequantized(a_list: Optional[Sequence[torch.Tensor]], b_list: Optional[Sequence[torch.Tensor]],
                scales: WeightScales):
    """(float32 [S, R, K] A_i, float32 [S, N_i, R] B_i): the weights the scales stand for (the
    reference's reading of the padded form; the packed form is gathered into it first,
    ops/packed.py padded_from)."""
    a_out = b_out = None
    if a_list is not None:
        a_out = [A.to(torch.float32) * s.to(torch.float32)[:, :, None] for A, s in zip(a_list, scales.a)]
    if b_list is not None:
        b_out = [B.to(torch.float32) * s.to(torch.float32)[:, None, :] for B, s in zip(b_list, scales.b)]
    return a_out, b_out
