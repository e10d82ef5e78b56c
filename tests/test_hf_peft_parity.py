"""patch_model against PEFT on seventeen architectures: a mixed batch and greedy generation.

Every row of our mixed batch must equal PEFT run with that row's adapter alone, and base rows the
unpatched model bit for bit. Left padding throughout; adapters of different ranks and targets
(one limited to layer 1, one rsLoRA, one all-linear with rank_pattern / alpha_pattern) share the
batch. The patched models run with their projection groups (q/k/v, gate/up: one LoRA launch each,
hf_groups.py) already found. OPT flattens [batch, seq] before fc1/fc2 (PEFT's own mixed batch raises there); GPT-2 uses
Conv1D; Phi-3, GPT-NeoX, Falcon and BLOOM have fused qkv / gate_up projections; T5 and BART are
encoder-decoder models (generate calls the encoder by itself); BERT is an encoder; Mixtral and
Qwen3-MoE carry LoRA on their fused expert weights and routers (PEFT's target_parameters).
"""
import copy

import pytest
import torch

import openlora_kernels as olk

from hf_models import (ARCHS, ATOL, RTOL, batch_inputs, left_padded_batch, lora_configs, make_model, peft_model,
                       save_adapters, warm_up_groups)

ROW_ADAPTERS = ["attn", None, "mlp", "__base__", "mix"]


@pytest.fixture(scope="module", params=list(ARCHS))
def setup(request, tmp_path_factory):
    arch = request.param
    base = make_model(arch)
    paths = save_adapters(base, lora_configs(arch), str(tmp_path_factory.mktemp(arch)))
    refs = {n: peft_model(base, p) for n, p in paths.items()}
    # group_projections=True (the default, "auto", groups nothing): the tests below run with the
    # projection groups found; test_hf_coverage.py runs the default, ungrouped
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=4, max_rank=16, group_projections=True)
    for n, p in paths.items():
        lm.load_adapter(n, p)
    warm_up_groups(lm, arch)
    return arch, base, refs, lm


def test_mixed_batch_rows_equal_peft_per_adapter(setup):
    arch, base, refs, lm = setup
    kw, keep = batch_inputs(arch, [7, 4, 6, 5, 3], seed=1)
    out = lm(adapter_names=ROW_ADAPTERS, **kw).logits
    with torch.no_grad():
        base_logits = base(**kw).logits
        ref = {n: r(**kw).logits for n, r in refs.items()}
    for i, name in enumerate(ROW_ADAPTERS):
        k = keep[i]
        if name in (None, "__base__"):      # base rows: the unpatched model, bit for bit
            assert torch.equal(out[i], base_logits[i]), f"{arch} row {i} ({name})"
            continue
        torch.testing.assert_close(out[i][k], ref[name][i][k], atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"{arch} row {i} ({name}): {m}")
        assert (ref[name][i][k] - base_logits[i][k]).abs().max() > 1e-2    # the adapter really changes this row


def test_every_adapter_changes_only_its_targets(setup):
    """All rows on one adapter, then the patched layers it does not target saw no delta."""
    arch, base, refs, lm = setup
    kw, _ = batch_inputs(arch, [5, 5], seed=2)
    for name, ref in refs.items():
        out = lm(adapter_names=[name, name], **kw).logits
        with torch.no_grad():
            want = ref(**kw).logits
        torch.testing.assert_close(out, want, atol=ATOL, rtol=RTOL)


def test_greedy_generate_with_left_padding_equals_peft_per_row(setup):
    arch, base, refs, lm = setup
    if ARCHS[arch].kind == "masked":
        pytest.skip(f"{arch} is an encoder (no generate)")
    rows = ["mix", None, "attn", "mlp"]
    ids, mask = left_padded_batch([6, 3, 5, 4], seed=3)
    # min_new_tokens: every row generates all its tokens (tiny random models emit EOS early)
    kw = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    got = lm.generate(input_ids=ids, adapter_names=rows, **kw)
    with torch.no_grad():
        want_base = base.generate(input_ids=ids, **kw)
        want = {n: r.generate(input_ids=ids, **kw) for n, r in refs.items()}
    for i, name in enumerate(rows):
        expect = want_base[i] if name is None else want[name][i]
        assert torch.equal(got[i], expect), f"{arch} row {i} ({name}): {got[i].tolist()} != {expect.tolist()}"


def test_base_rows_are_bitwise_the_unpatched_model(setup):
    arch, base, refs, lm = setup
    kw, _ = batch_inputs(arch, [4, 6], seed=4)
    out = lm(adapter_names=[None, "__base__"], **kw).logits
    plain = lm(**kw).logits
    with torch.no_grad():
        want = base(**kw).logits
    assert torch.equal(out, want) and torch.equal(plain, want)


def test_patching_leaves_weights_and_state_dict_alone():
    base = make_model("gpt2")
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lm = olk.patch_model(model, max_adapters=2, max_rank=8)
    assert "transformer.h.0.attn.c_attn" in lm.patched_modules and "lm_head" not in lm.patched_modules
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert lm.unpatch() is model
    with pytest.raises(ValueError, match="already patched"):
        olk.patch_model(olk.patch_model(copy.deepcopy(base)).model)


def test_beam_search_rows_follow_their_adapter(tmp_path):
    """generate expands each row into num_beams rows: the adapter must follow (llama)."""
    base = make_model("llama")
    paths = save_adapters(base, lora_configs("llama"), str(tmp_path))
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=4, max_rank=16)
    for n, p in paths.items():
        lm.load_adapter(n, p)
    ids, mask = left_padded_batch([5, 3, 4], seed=8)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2,
              pad_token_id=0)
    rows = ["mlp", None, "mix"]
    got = lm.generate(input_ids=ids, adapter_names=rows, **kw)
    with torch.no_grad():
        for i, name in enumerate(rows):
            ref = base if name is None else peft_model(base, paths[name])
            want = ref.generate(input_ids=ids, **kw)
            assert torch.equal(got[2 * i:2 * i + 2], want[2 * i:2 * i + 2]), f"row {i} ({name})"


def test_triton_backend_path_matches_peft(tmp_path):
    """The arguments a GPU gets (full max_rank slots, ranks per slot, B stored transposed) through
    the Triton kernels, here under Triton's interpreter (llama, fp32)."""
    if not olk.available_backends("cpu")["triton"].usable:
        pytest.skip(olk.available_backends("cpu")["triton"].reason)
    base = make_model("llama")
    paths = save_adapters(base, lora_configs("llama"), str(tmp_path))
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=4, max_rank=16, backend="triton")
    for n, p in paths.items():
        lm.load_adapter(n, p)
    ids, mask = left_padded_batch([5, 3, 4], seed=1)
    rows = ["attn", None, "mix"]
    out = lm(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
    assert lm.pool.layers["model.layers.0.self_attn.q_proj"].op.lora_a.shape == (4, 16, 32)   # full max_rank
    with torch.no_grad():
        for i, name in enumerate(rows):
            want = (base if name is None else peft_model(base, paths[name]))(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(out[i][mask[i].bool()], want[i][mask[i].bool()], atol=ATOL, rtol=RTOL)
