"""Adapter storage dtypes (issue 15, point 2): bf16 / fp16 weights with fp32 activations.

Ops level, per backend that runs here (torch, the native cpu kernels, triton under the
interpreter) and per combination, two bounds, both stated from the contract:

* against the float64 reference computed from the STORED weights (exact in float64): the only
  error left is the kernels' fp32 accumulation, so the fp32 tolerance of lora_reference.TOL
  (STORED_TOL below, the same for every storage dtype: the weights reach the products exactly);
* against the float64 reference of the float32 weights before they were rounded to the storage
  dtype: each product of the delta carries the rounding of one A and one B element, relative
  error at most (1 + u)^2 - 1 ~ 2u, so |delta - delta_fp32| <= 2u * mag + fp32 noise, where mag is
  the same sum over absolute values (|scale| |B| |A| |x|) and u the storage's unit roundoff
  (bf16 2^-8, fp16 2^-11).

Outputs are poisoned: rows without an adapter hold NaN and must stay NaN (bit for bit, never
written), shrink outputs are fresh. Model level, ours with bf16 / fp16 storage: (1) against PEFT
run on the same weights rounded to the storage dtype, to the fp32 parity tolerance (the upcast is
exact, the sums fp32); (2) against PEFT's float32 result, per row within 2u * n * the row's LoRA
effect (max |PEFT - base|), n the adapter's patched modules: each module's delta is off by at
most ~2u of its own size, and the n errors may add up where the deltas partly cancel; base rows
bit for bit the unpatched model's.
"""
import copy
import zlib

import pytest
import torch

import openlora_kernels as olk
from openlora_kernels.ops.api import STORAGE_DTYPES, BoundLoRA, check_storage

from lora_reference import TOL, make_problem, reference_delta, reference_shrink

UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
STORED_TOL = {(torch.float32, torch.bfloat16): TOL[torch.float32], (torch.float32, torch.float16): TOL[torch.float32]}
STORAGES = [torch.bfloat16, torch.float16]
BACKENDS = ["torch", "cpu", "triton"]

# (T, K, widths, S, R, ranks, rank-major B) — odd sizes; decode-like (T <= 3) and longer runs
CASES = {
    "decode1": (1, 37, [29], 3, 8, None, False),
    "decode3_mixed": (3, 70, [45], 5, 16, "mixed", True),
    "odd_mixed": (13, 70, [45], 5, 16, "mixed", False),
    "long_rank_major": (70, 66, [40], 3, 16, "mixed", True),
    "qkv_per_slice": (11, 48, [40, 12, 12], 4, 16, "per_slice", True),
    "five_slices": (7, 24, [9, 1, 17, 5, 3], 3, 8, "mixed", False),
}
TRITON_CASES = ["decode1", "decode3_mixed", "long_rank_major", "qkv_per_slice"]   # (the interpreter is slow)


def usable(backend):
    info = olk.available_backends("cpu")[backend]
    if not info.usable:
        pytest.skip(f"{backend}: {info.reason}")


def _stored_problem(case, storage, seed):
    """(problem with fp32 x / y and weights in ``storage`` (NaN beyond each rank), the same
    problem's float32 weights before rounding)."""
    T, K, widths, S, R, ranks, rank_major = CASES[case]
    p = make_problem(T, K, widths, S, R, dtype=torch.float32, ranks=ranks, seed=seed)
    p32 = copy.copy(p)
    p32.a, p32.b = list(p.a), list(p.b)
    p.a = [A.to(storage) for A in p.a]
    if rank_major:   # the pool's layout: [S, R, N] storage seen as [S, N, R]
        p.b = [B.transpose(1, 2).contiguous().to(storage).transpose(1, 2) for B in p.b]
    else:
        p.b = [B.to(storage) for B in p.b]
    no_adapter = p.indices < 0
    p.y[no_adapter] = float("nan")          # poisoned: these rows must never be written
    p32.y = p.y
    return p, p32


def _magnitude(p32) -> torch.Tensor:
    """[T, N] float64 sum over |terms| of the delta (the rounding-error scale)."""
    q = copy.copy(p32)
    q.x = p32.x.abs()
    q.a = [A.double().abs().nan_to_num(0.0) for A in p32.a]
    q.b = [B.double().abs().nan_to_num(0.0) for B in p32.b]
    q.scalings = p32.scalings.abs()
    return reference_delta(q)


def _check(y, p, p32, storage, what):
    y64 = y.double()
    no_adapter = p.indices < 0
    assert torch.isnan(y64[no_adapter]).all(), f"{what}: a row without adapter was written"
    keep = ~no_adapter
    ref_stored = p.y.double() + reference_delta(p)
    tol = STORED_TOL[(torch.float32, storage)]
    err = (y64 - ref_stored).abs()[keep]
    bound = tol["atol"] + tol["rtol"] * ref_stored.abs()[keep]
    assert not torch.isnan(err).any(), f"{what}: NaN in the output"
    assert (err <= bound).all(), f"{what}: off the stored-weights reference by {float((err - bound).max()):.3g} " \
                                 "beyond the fp32 tolerance"
    # against the unrounded float32 weights: 2u * magnitude (+ the fp32 tolerance)
    ref32 = p.y.double() + reference_delta(p32)
    err32 = (y64 - ref32).abs()[keep]
    bound32 = 2 * UNIT_ROUNDOFF[storage] * _magnitude(p32)[keep] + tol["atol"] + tol["rtol"] * ref32.abs()[keep]
    assert (err32 <= bound32).all(), f"{what}: storage rounding error above 2u * magnitude"


@pytest.mark.parametrize("storage", STORAGES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_add_lora_storage_parity(backend, case, storage):
    usable(backend)
    if backend == "triton" and case not in TRITON_CASES:
        pytest.skip("triton interpreter: a subset of the cases")
    p, p32 = _stored_problem(case, storage, seed=zlib.crc32(f"{case}{storage}".encode()))
    y = p.y.clone()
    olk.add_lora(y, p.x, p.lora_a(), p.lora_b(), p.indices, p.scalings, p.ranks, backend=backend)
    _check(y, p, p32, storage, f"{backend} {case} {storage}")


@pytest.mark.parametrize("storage", STORAGES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_shrink_and_expand_storage_parity(backend, storage):
    usable(backend)
    p, p32 = _stored_problem("odd_mixed", storage, seed=7)
    h = olk.lora_shrink(p.x, p.lora_a(), p.indices, p.ranks, backend=backend)
    assert h.dtype == torch.float32
    href = reference_shrink(p)
    tol = STORED_TOL[(torch.float32, storage)]
    assert ((h.double() - href).abs() <= tol["atol"] + tol["rtol"] * href.abs()).all()
    y = p.y.clone()
    olk.lora_expand(y, h, p.lora_b(), p.indices, p.scalings, p.ranks, backend=backend)
    _check(y, p, p32, storage, f"{backend} shrink+expand {storage}")


@pytest.mark.parametrize("storage", STORAGES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bound_lora_storage_dtype(backend, storage):
    """BoundLoRA(dtype=float32) over 16-bit slots, as the pool binds them: the general call, a
    LoRABatchMeta call and (cpu) the patched layer's add_rows fast path."""
    usable(backend)
    from openlora_kernels.metadata import build_batch_meta
    from openlora_kernels.ops import cpu_ext

    p, p32 = _stored_problem("decode3_mixed", storage, seed=11)
    if storage is torch.bfloat16:     # (fp16 weights with bf16 activations are a storage pair)
        with pytest.raises(TypeError, match=f"lora_a: dtype {storage} does not match x's dtype torch.float16"):
            BoundLoRA(p.lora_a(), p.lora_b(), p.scalings, p.ranks, backend=backend, dtype=torch.float16)
    op = BoundLoRA(p.lora_a(), p.lora_b(), p.scalings, p.ranks, backend=backend, dtype=torch.float32)
    meta = build_batch_meta(p.indices, p.a[0].shape[0])
    for how in ("indices", "meta", "rows"):
        y = p.y.clone()
        if how == "rows":
            rows = cpu_ext.row_args(meta) if backend == "cpu" else None
            if rows is None:
                continue
            assert op.add_rows(y, p.x, rows)
        else:
            op(y, p.x, p.indices if how == "indices" else meta)
        _check(y, p, p32, storage, f"{backend} bound {how} {storage}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_activations_with_fp16_storage(backend):
    """bf16 x / y with fp16 weights (the issue's "bf16 / fp16 storage with fp32 or bf16
    activations"): the fp16 weights are upcast exactly, the sums fp32, so against the float64
    reference of the stored weights only the bf16 output rounding is left (TOL[bfloat16])."""
    usable(backend)
    from openlora_kernels.ops import custom_ops
    from lora_reference import assert_close

    if (torch.bfloat16, torch.float16) not in custom_ops.backend_module(backend).MIXED_STORAGE:
        pytest.skip(f"{backend}: no fp16 storage with bf16 activations (its MIXED_STORAGE)")
    for case in ("decode3_mixed", "qkv_per_slice") if backend == "triton" else ("decode3_mixed", "odd_mixed",
                                                                                 "qkv_per_slice", "long_rank_major"):
        p, _ = _stored_problem(case, torch.float16, seed=zlib.crc32(f"bf16x{case}".encode()))
        p.x, p.y = p.x.bfloat16(), p.y.bfloat16()
        y = p.y.clone()
        olk.add_lora(y, p.x, p.lora_a(), p.lora_b(), p.indices, p.scalings, p.ranks, backend=backend)
        no_adapter = p.indices < 0
        assert torch.isnan(y[no_adapter].float()).all(), f"{backend} {case}: a row without adapter was written"
        ref = p.y.double() + reference_delta(p)
        assert_close(y[~no_adapter], ref[~no_adapter], torch.bfloat16, f"{backend} {case} bf16 x fp16 w")


def test_refusals_name_the_problem():
    x, y = torch.randn(2, 8), torch.zeros(2, 6)
    idx, sc = torch.tensor([0, -1]), torch.ones(1)
    A16, B16 = torch.randn(1, 4, 8, dtype=torch.float16), torch.randn(1, 6, 4, dtype=torch.float16)
    # a 16-bit activation takes its own dtype, fp8 and (bf16 activations) fp16: never a wider one
    with pytest.raises(TypeError, match=r"lora_a: dtype torch.bfloat16 does not match x's dtype torch.float16"):
        olk.add_lora(y.half(), x.half(), A16.bfloat16(), B16, idx, sc, backend="torch")
    with pytest.raises(TypeError, match=r"lora_a: dtype torch.float32 does not match x's dtype torch.float16"):
        olk.add_lora(y.half(), x.half(), A16.float(), B16, idx, sc, backend="torch")
    # A and B share one storage dtype
    with pytest.raises(TypeError, match="share one storage dtype"):
        olk.add_lora(y, x, A16, B16.bfloat16(), idx, sc, backend="torch")
    # (fp8 storage and its refusals: tests/test_fp8_storage.py)
    # a backend without mixed storage (cuda: never built for it) is named
    with pytest.raises(TypeError, match=r"adapter_dtype.*backend 'cuda'"):
        check_storage("cuda", torch.float32, [A16])
    assert STORAGE_DTYPES[torch.float32] == (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)
    assert STORAGE_DTYPES[torch.bfloat16] == (torch.bfloat16, torch.float16, torch.float8_e4m3fn)


# ------------------------------------------------------------------------------ model level


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from hf_models import lora_configs, make_model, peft_model, save_adapters

    base = make_model("llama")
    paths = save_adapters(base, lora_configs("llama"), str(tmp_path_factory.mktemp("storage")))
    refs = {n: peft_model(base, p) for n, p in paths.items()}
    return base, paths, refs


ROWS = ["attn", None, "mlp", "mix", "mlp"]


@pytest.mark.parametrize("storage", STORAGES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_model_storage_vs_peft_fp32(llama, backend, storage):
    from hf_models import ATOL, RTOL, batch_inputs

    usable(backend)
    base, paths, refs = llama
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=4, max_rank=16, backend=backend, adapter_dtype=storage)
    lm32 = olk.patch_model(copy.deepcopy(base), max_adapters=4, max_rank=16, backend=backend)
    for n, p in paths.items():
        lm.load_adapter(n, p)
        lm32.load_adapter(n, p)
    layers = base.config.num_hidden_layers
    kw, keep = batch_inputs("llama", [7, 4, 6, 5, 3], seed=1)
    out = lm(adapter_names=ROWS, **kw).logits
    lm32(adapter_names=ROWS, **kw)      # (its adapters resident too: the memory reports compare)
    with torch.no_grad():
        base_logits = base(**kw).logits
        ref = {n: r(**kw).logits for n, r in refs.items()}
    u = UNIT_ROUNDOFF[storage]
    with torch.no_grad():       # PEFT on the same weights rounded to the storage dtype
        rounded = {}
        for n, r in refs.items():
            r = copy.deepcopy(r)
            for pn, prm in r.named_parameters():
                if "lora_" in pn:
                    prm.copy_(prm.to(storage).float())
            rounded[n] = r(**kw).logits
    n_modules = {n: sum(1 for pn, _ in r.named_parameters() if "lora_A" in pn) for n, r in refs.items()}
    for i, name in enumerate(ROWS):
        k = keep[i]
        if name is None:
            assert torch.equal(out[i], base_logits[i]), f"base row {i} differs from the unpatched model"
            continue
        # exact upcast + fp32 accumulation: PEFT on the rounded weights, to the fp32 parity tolerance
        torch.testing.assert_close(out[i][k], rounded[name][i][k], atol=ATOL, rtol=RTOL)
        effect = (ref[name][i][k] - base_logits[i][k]).abs().max()
        assert effect > 1e-2
        err = (out[i][k] - ref[name][i][k]).abs().max()
        bound = 2 * u * n_modules[name] * effect
        assert err <= bound, (f"row {i} ({name}): |ours - peft fp32| = {err:.3g} > 2u * {n_modules[name]} "
                              f"modules * {effect:.3g}")
        assert err > 0       # (the weights really are rounded)
    # storage dtype and bytes in the memory report: half of the fp32 storage's, host and slots
    rep, rep32 = lm.memory_report(), lm32.memory_report()
    assert {a.dtype for a in rep.adapters} == {storage}
    assert rep.host_bytes * 2 == rep32.host_bytes
    assert rep.device_bytes * 2 == rep32.device_bytes
    assert f" {str(storage).replace('torch.', '')} " in str(rep)
    assert all(ls.a.dtype is storage for ls in lm.pool.layers.values() if ls.a is not None)


def test_patch_model_adapter_dtype_refusals(llama):
    base = llama[0]
    with pytest.raises(ValueError, match=r"adapter_dtype: torch.bfloat16 is not a storage dtype"):
        olk.patch_model(copy.deepcopy(base).to(torch.float16), adapter_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"adapter_dtype: torch.float32 is not a storage dtype.*bfloat16 layers"):
        olk.patch_model(copy.deepcopy(base).to(torch.bfloat16), adapter_dtype=torch.float32)
    with pytest.raises(TypeError, match="adapter_dtype"):
        olk.patch_model(copy.deepcopy(base), adapter_dtype="bf16")
    lm = olk.patch_model(copy.deepcopy(base), adapter_dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="adapter_dtype"):
        lm.load_adapter("t", None, trainable=True, r=4)
    assert lm.adapters == [] or list(lm.adapters) == []


@pytest.mark.parametrize("storage", STORAGES, ids=["bf16", "fp16"])
def test_cpu_storage_kernels_on_every_isa(storage):
    """The native mixed kernels of each instruction set the CPU runs (x86-64-v4 runs v3's)."""
    usable("cpu")
    from openlora_kernels.ops import cpu_ext

    before = cpu_ext.isa()
    try:
        for level in cpu_ext._module().isas():
            assert cpu_ext.set_isa("base" if level == "baseline" else level) == level
            for case in ("decode1", "decode3_mixed", "long_rank_major", "qkv_per_slice"):
                p, p32 = _stored_problem(case, storage, seed=zlib.crc32(f"isa{level}{case}".encode()))
                y = p.y.clone()
                olk.add_lora(y, p.x, p.lora_a(), p.lora_b(), p.indices, p.scalings, p.ranks, backend="cpu")
                _check(y, p, p32, storage, f"cpu {level} {case} {storage}")
    finally:
        cpu_ext.set_isa(before)


def test_cpu_plan_refuses_unsupported_storage_pairs():
    """The native binding checks the (activation, weight) dtype codes itself (f16 = 0, bf16 = 1, f32 = 2)."""
    usable("cpu")
    from openlora_kernels.ops import cpu_ext

    mod = cpu_ext._module()
    A = torch.zeros(1, 4, 8, dtype=torch.float16)
    B = torch.zeros(1, 6, 4, dtype=torch.float16)
    sc = torch.ones(1)
    args = (mod.OP_ADD, 1, 8, 4, 1, [A.data_ptr()], 32, 8, 1, [B.data_ptr()], [6], 24, 4, 1, sc.data_ptr(), 0, False,
            0, 0)
    codes = {c: d for d, c in cpu_ext.DTYPE_CODES.items() if c in (0, 1, 2)}     # (the float dtypes)
    for act, ad in codes.items():
        for w, wd in codes.items():
            if act == w:
                continue
            if (ad, wd) in cpu_ext.MIXED_STORAGE:        # a pair the module declares: accepted
                mod.Plan(args[0], act, *args[2:], w_dtype=w)
            else:
                with pytest.raises(ValueError, match="w_dtype"):
                    mod.Plan(args[0], act, *args[2:], w_dtype=w)
    assert (torch.float32, torch.float16) in cpu_ext.MIXED_STORAGE
    assert (torch.float32, torch.bfloat16) in cpu_ext.MIXED_STORAGE
    assert (torch.float16, torch.float32) not in cpu_ext.MIXED_STORAGE


def _as_stored(pn: str, prm: torch.Tensor, storage) -> torch.Tensor:
    """A PEFT LoRA weight as ours stores it: rounded to ``storage``, or for fp8 quantized with a
    scale per rank row (lora_A's rows, lora_B's columns: ops/fp8.py) and dequantized."""
    from openlora_kernels.ops.fp8 import FP8, dequantize_rows, quantize_rows

    if storage is not FP8:
        return prm.to(storage).float()
    if "lora_A" in pn:
        return dequantize_rows(*quantize_rows(prm.float()))
    return dequantize_rows(*quantize_rows(prm.float().T)).T


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_race_serving_stored_adapters_while_the_pool_changes(tmp_path, backend, storage):
    """A serving thread (mixed batches, more adapters than slots) against a thread that loads,
    unloads, pins and unpins, with a host budget that makes adapters be re-read (and converted to
    bf16, or quantized to fp8 with their scales) from their sources meanwhile. Every served row must
    equal PEFT on the stored (rounded / dequantized) weights to the float32 parity tolerance (the docs/usage.md rule: the conversion happens while
    an adapter is read, under no pool lock; a slot is written only while no lease holds it)."""
    import os
    import random
    import threading
    import time

    from peft import LoraConfig

    from hf_models import ATOL, RTOL, left_padded_batch, make_model, peft_model, save_adapter

    usable(backend)
    from openlora_kernels.ops import custom_ops
    if storage is not torch.bfloat16 and (torch.float32, storage) not in custom_ops.backend_module(backend).MIXED_STORAGE:
        pytest.skip(f"{backend}: no {storage} storage with float32 activations")
    seconds = float(os.environ.get("OPENLORA_RACE_SECONDS", "5"))
    base = make_model("llama")
    stable, churn_names = ["s0", "s1", "s2"], ["c0", "c1"]
    targets = [["q_proj", "v_proj"], "all-linear", ["down_proj", "up_proj"], ["k_proj", "o_proj"], "all-linear"]
    paths = {n: save_adapter(base, LoraConfig(r=[2, 8, 16, 4, 6][i], lora_alpha=8, target_modules=targets[i],
                                              init_lora_weights=False), str(tmp_path / n), seed=70 + i)
             for i, n in enumerate(stable + churn_names)}
    ids, mask = left_padded_batch([6, 4, 5], seed=5)
    ref = {}
    with torch.no_grad():
        for n, p in paths.items():
            m = peft_model(base, p)
            for pn, prm in m.named_parameters():
                if "lora_" in pn:
                    prm.copy_(_as_stored(pn, prm, storage))
            ref[n] = m(input_ids=ids, attention_mask=mask).logits
        ref[None] = base(input_ids=ids, attention_mask=mask).logits
    budget = 2 * os.path.getsize(os.path.join(paths["s0"], "adapter_model.safetensors"))
    lm = olk.patch_model(copy.deepcopy(base), backend=backend, max_adapters=3, max_rank=16, host_budget_bytes=budget,
                         adapter_dtype=storage)
    for n in stable:
        lm.load_adapter(n, paths[n])
    stop, errors, served, changes = threading.Event(), [], [0], [0]
    names = stable + churn_names

    def serve():
        rng = random.Random(3)
        while not stop.is_set():
            picks = rng.sample(names, 2)
            rows = [rng.choice(picks + [None]) for _ in range(3)]
            try:
                out = lm(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
            except KeyError as e:                    # a churn adapter unloaded just now
                assert any(c in str(e) for c in churn_names), e
                continue
            except RuntimeError as e:                # every slot pinned / held
                assert "no device slot can be freed" in str(e), e
                continue
            for i, name in enumerate(rows):
                k = mask[i].bool()
                if name is None and not torch.equal(out[i], ref[None][i]):
                    errors.append(f"base row {i} changed")
                elif not torch.allclose(out[i][k], ref[name][i][k], atol=ATOL, rtol=RTOL):
                    errors.append(f"row {i} ({name}) off by {(out[i][k] - ref[name][i][k]).abs().max():.3g}")
            if errors:
                stop.set()
            served[0] += 1

    def churn():
        rng = random.Random(4)
        pinned = None
        while not stop.is_set():
            op = rng.choice(["load", "unload", "pin", "unpin"])
            try:
                if op == "load":
                    n = rng.choice(churn_names)
                    if n not in lm.adapters:
                        lm.load_adapter(n, paths[n])
                elif op == "unload":
                    n = rng.choice(churn_names)
                    if n in lm.adapters:
                        lm.unload_adapter(n)
                elif op == "pin" and pinned is None:
                    pinned = rng.choice(stable)
                    lm.pin(pinned)
                elif op == "unpin" and pinned is not None:
                    lm.unpin(pinned)
                    pinned = None
                changes[0] += 1
            except RuntimeError as e:
                assert "no device slot can be freed" in str(e), e
            except ValueError as e:
                assert "already loaded" in str(e), e
            time.sleep(rng.random() * 0.002)

    threads = [threading.Thread(target=serve), threading.Thread(target=churn)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors[:5]
    assert served[0] >= 20 and changes[0] >= 50, (served, changes)
    assert {a.dtype for a in lm.memory_report().adapters} == {storage}


def _rounded_peft(ref, storage):
    """A copy of PEFT model ``ref`` whose LoRA A / B weights are rounded to ``storage`` (float32
    again): what ours computes exactly when it stores them in ``storage``."""
    r = copy.deepcopy(ref)
    with torch.no_grad():
        for pn, prm in r.named_parameters():
            if "lora_A" in pn or "lora_B" in pn or "lora_embedding_A" in pn or "lora_embedding_B" in pn:
                prm.copy_(prm.to(storage).float())
    return r


@pytest.mark.parametrize("kind", ["embedding", "dora", "moe"])
def test_other_adapter_kinds_with_bf16_storage(tmp_path, kind):
    """Embedding LoRA (the gather then the 16-bit expand), DoRA (g folded into the stored B) and
    MoE expert / router LoRA with adapter_dtype=bfloat16 on backend cpu: every row within the
    2u * n * effect bound of PEFT's float32 result; embedding and MoE rows also equal PEFT on the
    rounded weights to the parity tolerance (DoRA's column norm is computed from the float32
    weights at load, PEFT's from the rounded ones: only the bound applies); base rows bit for bit
    (llama; the MoE base's default experts implementation is not row-independent)."""
    import test_hf_coverage as cov
    from hf_models import ATOL, RTOL, batch_inputs

    usable("cpu")
    if kind == "moe":
        arch, configs, base = "mixtral", cov.moe_configs(), cov.moe_base("mixtral")
    else:
        arch, base = "llama", None
        configs = cov.embedding_configs("llama") if kind == "embedding" else cov.dora_configs("llama")
    zoo = cov.Zoo(arch, configs, str(tmp_path), base=base)
    lm = zoo.patched("cpu", adapter_dtype=torch.bfloat16)
    rows = list(configs) + [None]
    kw, keep = batch_inputs(arch, [6, 3, 5, 4][:len(rows)], seed=1)
    out = lm(adapter_names=rows, **kw).logits
    base_logits = zoo.want("forward", None, kw)
    u = UNIT_ROUNDOFF[torch.bfloat16]
    for i, name in enumerate(rows):
        k = keep[i]
        if name is None:
            if kind != "moe":
                assert torch.equal(out[i], base_logits[i])
            continue
        ref = zoo.refs[name]
        want = zoo.want("forward", name, kw)[i]
        n = sum(1 for pn, _ in ref.named_parameters() if "lora_A" in pn or "lora_embedding_A" in pn)
        effect = (want[k] - base_logits[i][k]).abs().max()
        err = (out[i][k] - want[k]).abs().max()
        assert 0 < err <= 2 * u * n * effect, f"{kind} row {i} ({name}): {err:.3g} vs effect {effect:.3g}, n={n}"
        if kind != "dora":
            with torch.no_grad():
                exact = _rounded_peft(ref, torch.bfloat16)(**kw).logits[i]
            torch.testing.assert_close(out[i][k], exact[k], atol=ATOL, rtol=RTOL)
    assert {a.dtype for a in lm.memory_report().adapters} == {torch.bfloat16}
