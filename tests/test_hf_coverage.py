"""Every adapter people train, served in mixed batches: encoder-decoder generate, DoRA, embedding
LoRA, LoRA on MoE expert weights and routers (PEFT's target_parameters).

Each row of a mixed batch must equal PEFT run with that row's adapter alone (forward and greedy
generate), base rows the unpatched model bit for bit; on backends torch and cpu, and triton
under its interpreter (fewer rows: the interpreter is slow). Tiny models built from configs,
adapters written by PEFT's save_pretrained (DoRA magnitudes perturbed: PEFT initialises them to
the column norms, where DoRA equals LoRA).
"""
import copy
import os
import warnings

import pytest
import torch

import openlora_kernels as olk
from openlora_kernels.adapters import AdapterFormatError

from hf_models import (ATOL, RTOL, VOCAB, batch_inputs, left_padded_batch, make_config, make_model, peft_model,
                       warm_up_groups)

DORA_TOL = 1e-5          # the bound for DoRA rows (fp32)


def backends():
    out = ["torch"]
    info = olk.available_backends("cpu")
    if info["cpu"].usable:
        out.append("cpu")
    if info["triton"].usable:
        out.append("triton")
    return out


BACKENDS = backends()


def save_peft(base, cfg, path, seed):
    """PEFT-save an adapter with random weights; DoRA magnitudes scaled by 1 +- 0.3 at random."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), cfg)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(1 + 0.3 * torch.randn_like(p))
        pm.save_pretrained(path)
    return path


class Zoo:
    """A base model, PEFT adapters for it and PEFT's outputs with each alone (computed once)."""

    def __init__(self, arch, configs, root, base=None, seed=10):
        self.arch = arch
        self.base = base if base is not None else make_model(arch)
        self.paths = {n: save_peft(self.base, c, os.path.join(root, n), seed + i)
                      for i, (n, c) in enumerate(configs.items())}
        self.refs = {n: peft_model(self.base, p) for n, p in self.paths.items()}
        self._cache = {}

    def patched(self, backend, names=None, **kw):
        lm = olk.patch_model(copy.deepcopy(self.base), backend=backend, **{"max_adapters": 4, "max_rank": 16, **kw})
        for n in self.paths if names is None else names:
            lm.load_adapter(n, self.paths[n])
        warm_up_groups(lm, self.arch)
        return lm

    def want(self, what, name, kw):
        """PEFT's (or, name None, the base model's) logits / generated ids for inputs ``kw``."""
        key = (what, name, tuple(sorted((k, tuple(v.flatten().tolist())) for k, v in kw.items()
                                        if isinstance(v, torch.Tensor))), tuple(sorted(
                                            (k, v) for k, v in kw.items() if not isinstance(v, torch.Tensor))))
        if key not in self._cache:
            model = self.base if name in (None, "__base__") else self.refs[name]
            with torch.no_grad():
                self._cache[key] = model(**kw).logits if what == "forward" else model.generate(**kw)
        return self._cache[key]


def check_forward(lm, zoo, rows, lengths, tol=(ATOL, RTOL), seed=1):
    kw, keep = batch_inputs(zoo.arch, lengths, seed=seed)
    out = lm(adapter_names=rows, **kw).logits
    base = zoo.want("forward", None, kw)
    for i, name in enumerate(rows):
        if name in (None, "__base__"):
            assert torch.equal(out[i], base[i]), f"{zoo.arch} row {i} ({name}): base row differs from the model"
            continue
        want = zoo.want("forward", name, kw)[i]
        k = keep[i]
        torch.testing.assert_close(out[i][k], want[k], atol=tol[0], rtol=tol[1],
                                   msg=lambda m: f"{zoo.arch} row {i} ({name}): {m}")
        assert (want[k] - base[i][k]).abs().max() > 1e-2, f"{zoo.arch} row {i} ({name}): the adapter changes nothing"
    return out


def check_generate(lm, zoo, rows, lengths, seed=3, changed=True, **extra):
    ids, mask = left_padded_batch(lengths, seed=seed)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
              **extra)
    got = lm.generate(adapter_names=rows, **kw)
    per = got.shape[0] // len(rows)
    differs = False
    for i, name in enumerate(rows):
        want = zoo.want("generate", name, kw)[per * i:per * (i + 1)]
        assert torch.equal(got[per * i:per * (i + 1)], want), \
            f"{zoo.arch} row {i} ({name}): {got[per * i].tolist()} != {want[0].tolist()}"
        differs |= name not in (None, "__base__") and not torch.equal(want, zoo.want("generate", None, kw)
                                                                      [per * i:per * (i + 1)])
    assert differs or not changed, f"{zoo.arch}: no adapter changed what was generated"


# ------------------------------------------------------------------------ encoder-decoder

def encdec_configs(arch):
    from peft import LoraConfig

    attn = ["q", "v"] if arch == "t5" else ["q_proj", "v_proj"]
    return {"mix": LoraConfig(r=6, lora_alpha=12, target_modules="all-linear", init_lora_weights=False),
            "attn": LoraConfig(r=4, lora_alpha=16, target_modules=attn, init_lora_weights=False)}


@pytest.fixture(scope="module", params=["t5", "bart"])
def encdec(request, tmp_path_factory):
    return Zoo(request.param, encdec_configs(request.param), str(tmp_path_factory.mktemp(request.param)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_decoder_generate_per_row_equals_peft(encdec, backend):
    """generate calls the encoder by itself, outside the model's forward: its tokens (and the
    decoder's) carry their row's adapter."""
    lm = encdec.patched(backend)
    if backend == "triton":          # (the interpreter is slow: T5 generates, BART runs a forward)
        if encdec.arch == "t5":
            check_generate(lm, encdec, ["mix", None], [5, 3], changed=False)
        else:
            check_forward(lm, encdec, ["mix", None, "attn"], [5, 3, 4])
        return
    check_forward(lm, encdec, ["mix", None, "attn", "__base__"], [6, 3, 5, 4])
    check_generate(lm, encdec, ["mix", None, "attn", "mix"], [6, 3, 5, 4])


def test_encoder_decoder_beams_follow_their_row(encdec):
    lm = encdec.patched("torch")
    check_generate(lm, encdec, ["attn", None, "mix"], [5, 3, 4], num_beams=2, num_return_sequences=2, changed=False)


def test_encoder_called_alone_serves_its_rows(encdec):
    """The encoder stack called by itself inside a call (as generate does) gets per-row metadata
    of its own input; afterwards nothing is left behind."""
    lm = encdec.patched("torch")
    ids, mask = left_padded_batch([5, 3], seed=7)
    enc = lm.model.get_encoder()
    with lm._rows(["mix", None], (), {"input_ids": ids}), torch.no_grad():
        got = enc(input_ids=ids, attention_mask=mask).last_hidden_state
    with torch.no_grad():
        want = encdec.refs["mix"].get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        base = encdec.base.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        plain = enc(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[0], want[0], atol=ATOL, rtol=RTOL)
    assert torch.equal(got[1], base[1]) and torch.equal(plain, base)


# ------------------------------------------------------------------------------------ DoRA

def dora_configs(arch):
    from peft import LoraConfig

    fifo = dict(fan_in_fan_out=arch == "gpt2", init_lora_weights=False)
    attn, mlp = {"llama": (["q_proj", "v_proj"], ["gate_proj", "down_proj"]),
                 "qwen2": (["q_proj", "k_proj", "v_proj"], ["up_proj"]),       # q/k/v have biases
                 "gpt2": (["c_attn"], ["c_fc", "mlp.c_proj"])}[arch]           # Conv1D with biases
    emb = ["embed_tokens"] if arch != "gpt2" else ["wte"]
    return {"dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=attn + mlp + emb, **fifo),
            "dora_l1": LoraConfig(r=6, lora_alpha=12, use_dora=True, use_rslora=True, target_modules=attn,
                                  layers_to_transform=[1], **fifo),
            "lora": LoraConfig(r=8, lora_alpha=16, target_modules=mlp, **fifo)}


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def dora(request, tmp_path_factory):
    return Zoo(request.param, dora_configs(request.param), str(tmp_path_factory.mktemp("dora_" + request.param)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dora_mixed_batch_rows_equal_peft(dora, backend):
    """DoRA, DoRA on layer 1 only (rsLoRA), plain LoRA and base rows in one batch: each row is
    PEFT's with its adapter alone to 1e-5 (fp32), base rows the unpatched model bit for bit."""
    lm = dora.patched(backend)
    if backend == "triton":
        check_forward(lm, dora, ["dora", None, "lora"], [5, 3, 4], tol=(DORA_TOL, DORA_TOL))
        return
    check_forward(lm, dora, ["dora", None, "lora", "dora_l1", "__base__"], [6, 3, 5, 4, 6], tol=(DORA_TOL, DORA_TOL))
    check_generate(lm, dora, ["dora_l1", "dora", None, "lora"], [6, 3, 5, 4], changed=False)


def test_dora_scale_is_computed_at_load(dora):
    """The column norm depends only on the adapter: computed when it is loaded, kept with it."""
    lm = dora.patched("torch", names=["dora", "lora"])
    host = lm.pool.host_weights("dora")
    assert all(w.dora_scale is not None and w.dora_scale.shape == (w.bt.shape[-1],) for w in host.values())
    assert all(w.dora_scale is None for w in lm.pool.host_weights("lora").values())
    check_forward(lm, dora, ["dora", "lora", None], [4, 5, 3], tol=(DORA_TOL, DORA_TOL))
    layer = next(iter(host))
    assert lm.pool.layers[layer].dora is not None


def test_dora_adapter_cannot_be_trained(dora):
    lm = dora.patched("torch", names=["lora"])
    with pytest.raises(NotImplementedError, match="DoRA"):
        lm.load_adapter("t", dora.paths["dora"], trainable=True)
    assert lm.adapters == ("lora",)


def test_dora_magnitude_and_config_must_agree(dora):
    from openlora_kernels.adapters import read_adapter_dir

    cfg, tensors = read_adapter_dir(dora.paths["dora"])
    lm = dora.patched("torch", names=[])
    with pytest.raises(AdapterFormatError, match="does not set use_dora"):
        lm.load_adapter("x", lambda: ({**cfg, "use_dora": False}, tensors))
    lost = {k: v for k, v in tensors.items() if "lora_magnitude_vector" not in k}
    with pytest.raises(AdapterFormatError, match="no lora_magnitude_vector"):
        lm.load_adapter("x", lambda: (cfg, lost))
    assert lm.adapters == ()


# --------------------------------------------------------------------------- embedding LoRA

def test_embedding_ops_match_a_reference_on_every_backend():
    S, R, V, N, T = 3, 4, 10, 6, 7
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(S, R, V, generator=g), torch.randn(S, N, R, generator=g)
    ids = torch.randint(0, V, (T,), generator=g)
    idx = torch.tensor([1, -1, 0, 2, 1, -1, 0])
    sc, ranks = torch.tensor([0.5, 2.0, 1.0]), torch.tensor([4, 2, 3])
    want = torch.zeros(T, N)
    for t in range(T):
        s = int(idx[t])
        if s >= 0:
            r = int(ranks[s])
            want[t] = sc[s] * A[s, :r, ids[t]] @ B[s, :, :r].T
    for backend in BACKENDS:
        y = torch.zeros(T, N)
        olk.add_lora_embedding(y, ids, A, B, idx, sc, ranks, backend=backend)
        torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-6, msg=lambda m: f"{backend}: {m}")
        assert y[1].eq(0).all() and y[5].eq(0).all()
    h = olk.lora_embedding_shrink(ids, A, idx, ranks)
    assert h.shape == (1, T, R) and h[0, 1].eq(0).all() and h[0, 0, 2:].eq(0).all()
    with pytest.raises(TypeError, match="ids"):
        olk.add_lora_embedding(torch.zeros(T, N), ids.float(), A, B, idx, sc)


def test_dora_rescale_scales_only_dora_rows():
    T, N, S = 6, 5, 3
    g = torch.Generator().manual_seed(1)
    y = torch.randn(T, N, generator=g)
    y[1, 0], y[4, 2] = float("inf"), float("nan")              # untouched rows stay as they are
    col = torch.randn(S, N, generator=g)                         # g - 1 per slot
    has = torch.tensor([True, False, True])
    bias = torch.randn(N, generator=g)
    idx = torch.tensor([0, -1, 2, 1, 1, 0])
    want = y.clone()
    for t in (0, 2, 5):
        want[t] = y[t] + col[idx[t]] * (y[t] - bias)
    got = olk.dora_rescale(y.clone(), col, has, idx, bias)
    torch.testing.assert_close(got[[0, 2, 5]], want[[0, 2, 5]], atol=1e-6, rtol=1e-6)
    assert torch.equal(got[[1, 3, 4]].nan_to_num(), y[[1, 3, 4]].nan_to_num())
    assert got[4, 2].isnan() and got[1, 0].isinf()
    with pytest.raises(ValueError, match="col_scale"):
        olk.dora_rescale(y, col[:, :2], has, idx)


def embedding_configs(arch, tied=False):
    from peft import LoraConfig

    emb = "wte" if arch == "gpt2" else "embed_tokens"
    out = {"emb": LoraConfig(r=4, lora_alpha=8, target_modules=[emb, "q_proj" if arch != "gpt2" else "c_attn"],
                             fan_in_fan_out=arch == "gpt2", init_lora_weights=False),
           "emb_only": LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=[emb], init_lora_weights=False)}
    if tied:       # PEFT ties an lm_head LoRA to the embedding's (saved as lm_head.lora_A / lora_B)
        out["tied"] = LoraConfig(r=4, lora_alpha=8, target_modules=[emb], ensure_weight_tying=True,
                                 init_lora_weights=False)
    return out


@pytest.fixture(scope="module", params=["llama", "gemma", "gpt2"])
def emb(request, tmp_path_factory):
    """llama: untied embeddings; gemma: tied, with a scaled embedding (embed_scale); gpt2: tied wte."""
    arch = request.param
    return Zoo(arch, embedding_configs(arch, tied=arch == "gemma"), str(tmp_path_factory.mktemp("emb_" + arch)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_lora_mixed_batch_rows_equal_peft(emb, backend):
    tied = "tied" in emb.paths
    kw = dict(target_modules=r".*(embed_tokens|q_proj|v_proj|gate_proj|lm_head)") if tied else {}
    lm = emb.patched(backend, **kw)
    if backend == "triton":
        check_forward(lm, emb, ["emb", None, "emb_only"], [5, 3, 4])
        return
    rows = ["emb", None, "emb_only", "__base__"] + (["tied"] if tied else [])
    check_forward(lm, emb, rows, [6, 3, 5, 4, 6][:len(rows)])
    check_generate(lm, emb, ["emb_only", "emb", None] + (["tied"] if tied else []), [6, 3, 5, 4][:3 + tied],
                   changed=False)


def test_embedding_is_patched_by_default_and_tied_heads_need_lm_head(emb):
    lm = emb.patched("torch", names=["emb"])
    kinds = {n: ls.kind for n, ls in lm.pool.layers.items()}
    name = "transformer.wte" if emb.arch == "gpt2" else "model.embed_tokens"
    assert kinds[name] == "embedding" and "lm_head" not in kinds
    if "tied" in emb.paths:
        with pytest.raises(ValueError, match=r"lm_head.*is not patched"):
            lm.load_adapter("tied", emb.paths["tied"])
        assert lm.adapters == ("emb",)
    with pytest.raises(NotImplementedError, match="embedding"):
        lm.load_adapter("t", emb.paths["emb_only"], trainable=True)


def test_embedding_lora_keys_on_a_linear_layer_are_refused():
    base = make_model("llama")
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=8)
    bad = {"model.layers.0.self_attn.q_proj.lora_embedding_A": torch.zeros(4, 32),
           "model.layers.0.self_attn.q_proj.lora_embedding_B": torch.zeros(32, 4)}
    with pytest.raises(ValueError, match=r"q_proj.*lora_embedding_A / _B.*is a linear target"):
        lm.load_adapter("x", lambda: ({"r": 4}, bad))
    no_emb = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=8, target_modules="all-linear")
    assert "model.embed_tokens" in no_emb.patched_modules       # "all-linear" = None: embeddings too
    only_q = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=8, target_modules=["q_proj"])
    good = {"model.embed_tokens.lora_embedding_A": torch.zeros(4, VOCAB),
            "model.embed_tokens.lora_embedding_B": torch.zeros(32, 4)}
    with pytest.raises(ValueError, match=r"embed_tokens.*is not patched"):
        only_q.load_adapter("x", lambda: ({"r": 4}, good))


# --------------------------------------------------------------------------------------- MoE

def moe_configs():
    from peft import LoraConfig

    return {"all": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
            "experts": LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"],
                                  target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                                  rank_pattern={"down_proj": 5}, init_lora_weights=False),
            "down": LoraConfig(r=3, lora_alpha=6, use_rslora=True, target_modules=["v_proj"],
                               target_parameters=["experts.down_proj"], init_lora_weights=False)}


def moe_base(arch, impl=None):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(make_config(arch)).eval()     # transformers' default experts
    if impl is not None:
        model.set_experts_implementation(impl)
    return model


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def moe(request, tmp_path_factory):
    arch = request.param
    return Zoo(arch, moe_configs(), str(tmp_path_factory.mktemp("moe_" + arch)), base=moe_base(arch))


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_expert_lora_mixed_batch_rows_equal_peft(moe, backend):
    """Per token, per routed expert, per adapter: all-linear (attention, every expert's
    gate_up/down and the router), the experts alone (rank_pattern on down_proj), down_proj alone
    (rsLoRA) and base rows in one batch, with transformers' default experts implementation."""
    assert moe.base.config._experts_implementation == "grouped_mm"
    lm = moe.patched(backend)
    assert lm.pool.layers[f"model.layers.0.mlp.experts.gate_up_proj"].kind == "experts"
    rows = ["all", None, "experts", "down"]
    if backend == "triton":
        rows, lengths = ["all", None, "down"], [5, 3, 4]
    else:
        lengths = [6, 3, 5, 4]
    kw, keep = batch_inputs(moe.arch, lengths, seed=1)
    out = lm(adapter_names=rows, **kw).logits
    for i, name in enumerate(rows):
        if name is None:
            continue          # bit for bit: test_moe_base_tokens_are_what_the_unpatched_experts_compute
        want = moe.want("forward", name, kw)[i]
        torch.testing.assert_close(out[i][keep[i]], want[keep[i]], atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"{moe.arch} row {i} ({name}): {m}")
    if backend != "triton":
        check_generate(lm, moe, ["experts", None, "all", "down"], [6, 3, 5, 4], changed=False)


def test_moe_base_tokens_are_what_the_unpatched_experts_compute(moe):
    """Base tokens of a mixed batch keep the experts module's own output, bit for bit: the
    unpatched module run on the same inputs gives the same numbers. (The whole model's base rows
    can differ from an all-base batch by ~1e-8: with grouped_mm a token's rounding depends on
    which other tokens share its expert's GEMM, and adapter rows route differently. The
    unpatched model does the same when other rows change; see the batched_mm test.)"""
    lm = moe.patched("torch")
    experts = lm.model.model.layers[1].mlp.experts
    seen = []
    h = experts.register_forward_hook(lambda m, a, o: seen.append(([t.clone() for t in a], o.clone())))
    try:
        kw, _ = batch_inputs(moe.arch, [5, 5, 5], seed=2)
        lm(adapter_names=["experts", None, "all"], **kw)
    finally:
        h.remove()
    (args, got), = seen
    with torch.no_grad():
        plain = moe.base.model.layers[1].mlp.experts(*args)
    S = kw["input_ids"].shape[1]
    assert torch.equal(got[S:2 * S], plain[S:2 * S])
    assert not torch.equal(got[:S], plain[:S]) and not torch.equal(got[2 * S:], plain[2 * S:])


def test_moe_base_rows_bitwise_with_a_row_independent_experts_implementation(moe, tmp_path):
    """With batched_mm (each token's experts computed on their own) the unpatched model's rows do
    not depend on their neighbours, and base rows of a mixed batch are bit-identical to it."""
    base = moe_base(moe.arch, "batched_mm")
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=4, max_rank=16)
    for n in ("all", "experts"):
        lm.load_adapter(n, moe.paths[n])
    kw, _ = batch_inputs(moe.arch, [6, 4, 5], seed=5)
    out = lm(adapter_names=["all", None, "experts"], **kw).logits
    with torch.no_grad():
        want = base(**kw).logits
        other = dict(kw, input_ids=torch.where(kw["attention_mask"].bool(), (kw["input_ids"] + 7) % VOCAB, 0))
        other["input_ids"][1] = kw["input_ids"][1]
        assert torch.equal(base(**other).logits[1], want[1])       # row-independent
    assert torch.equal(out[1], want[1])


def test_router_used_without_f_linear_is_refused(moe):
    """A router parameter is applied where F.linear uses it; a forward that uses it some other way
    raises instead of serving rows without their adapter."""
    lm = moe.patched("torch", names=["all", "experts"])
    gate = lm.model.model.layers[0].mlp.gate
    real = type(gate).forward

    def matmul_forward(self, hidden_states):
        w = self.weight
        self.weight = torch.nn.Parameter(w.detach().clone(), requires_grad=False)    # not the patched one
        try:
            return real(self, hidden_states)
        finally:
            self.weight = w
    gate.forward = matmul_forward.__get__(gate)
    kw, _ = batch_inputs(moe.arch, [4, 4], seed=1)
    with pytest.raises(RuntimeError, match=r"gate.weight.*did not use it through torch.nn.functional.linear"):
        lm(adapter_names=["all", None], **kw)
    out = lm(adapter_names=["experts", None], **kw).logits        # no router LoRA in this batch: served
    torch.testing.assert_close(out[0], moe.want("forward", "experts", kw)[0], atol=ATOL, rtol=RTOL)


def test_moe_parameter_adapters_cannot_be_trained(moe):
    lm = moe.patched("torch", names=["down"])
    with pytest.raises(NotImplementedError, match="parameter"):
        lm.load_adapter("t", moe.paths["experts"], trainable=True)
    assert lm.adapters == ("down",)


def test_parameter_targets_need_a_model():
    from openlora_kernels.adapters import parse_adapter

    t = {"m.experts.lora_A.weight": torch.zeros(8, 4), "m.experts.lora_B.weight": torch.zeros(4, 8)}
    with pytest.raises(NotImplementedError, match="target_parameters"):
        parse_adapter({"r": 2, "target_parameters": ["experts.down_proj"]}, t, "src")


def test_a_parameter_target_outside_moe_blocks_is_refused():
    """target_parameters are placed on the expert and router weights of transformers MoE blocks;
    another module's parameter is refused, naming it."""
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return x @ self.w.t()

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), Scaled())
    lm = olk.patch_model(model, max_adapters=2, max_rank=4)
    assert lm.patched_modules == ("0",)
    tensors = {"1.lora_A.weight": torch.zeros(2, 8), "1.lora_B.weight": torch.zeros(8, 2)}
    with pytest.raises(ValueError, match=r"parameter '1.w' is not patched.*MoE"):
        lm.load_adapter("x", lambda: ({"r": 2, "target_parameters": ["1.w"]}, tensors))
    assert lm.adapters == ()


def test_an_embedding_with_max_norm_is_left_out_by_default_and_refused_by_name():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8, max_norm=1.0), torch.nn.Linear(8, 8))
    model.get_input_embeddings = lambda: model[0]
    assert olk.patch_model(model, max_adapters=2, max_rank=4).patched_modules == ("1",)
    with pytest.raises(NotImplementedError, match=r"module '0'.*max_norm"):
        olk.patch_model(torch.nn.Sequential(torch.nn.Embedding(10, 8, max_norm=1.0)), target_modules=["0"])


# ------------------------------------------------------------------ the rank-packed pool (device_budget_bytes)


def packed_kw(zoo, rows: int = 40, **kw):
    """patch_model arguments of a rank-packed pool giving every patched layer ``rows`` rank rows."""
    probe = olk.patch_model(copy.deepcopy(zoo.base), max_adapters=1, max_rank=1, **kw)
    per_row = sum((ls.in_features + ls.out_features) * max(ls.experts, 1) * ls.dtype.itemsize
                  for ls in probe._layers.values())
    return {"device_budget_bytes": rows * per_row, **kw}


PACKED_BACKENDS = [b for b in ("torch", "cpu") if b in BACKENDS]


@pytest.mark.parametrize("backend", PACKED_BACKENDS)
def test_packed_pool_dora_rows_equal_peft(dora, backend):
    """DoRA and plain LoRA through the packed addressing: each row PEFT's with its adapter alone."""
    lm = dora.patched(backend, **packed_kw(dora))
    assert next(iter(lm.pool.layers.values())).packed
    check_forward(lm, dora, ["dora", None, "lora", "dora_l1", "__base__"], [6, 3, 5, 4, 6], tol=(DORA_TOL, DORA_TOL))


@pytest.mark.parametrize("backend", PACKED_BACKENDS)
def test_packed_pool_embedding_rows_equal_peft(emb, backend):
    """Embedding LoRA (the packed embedding shrink gathers each slot's rows by offset)."""
    tied = "tied" in emb.paths
    kw = dict(target_modules=r".*(embed_tokens|q_proj|v_proj|gate_proj|lm_head)") if tied else {}
    lm = emb.patched(backend, **packed_kw(emb, **kw))
    rows = ["emb", None, "emb_only", "__base__"] + (["tied"] if tied else [])
    check_forward(lm, emb, rows, [6, 3, 5, 4, 6][:len(rows)])


@pytest.mark.parametrize("backend", PACKED_BACKENDS)
def test_packed_pool_moe_expert_rows_equal_peft(moe, backend):
    """Expert LoRA: an adapter's experts packed one after another in the layer's buffer (E x rank
    rows, a virtual slot's offset per expert)."""
    lm = moe.patched(backend, **packed_kw(moe))
    ls = lm.pool.layers["model.layers.0.mlp.experts.gate_up_proj"]
    assert ls.kind == "experts" and ls.packed and ls.capacity == 40 * ls.experts
    rows = ["all", None, "experts", "down"]
    kw, keep = batch_inputs(moe.arch, [6, 3, 5, 4], seed=1)
    out = lm(adapter_names=rows, **kw).logits
    for i, name in enumerate(rows):
        if name is None:
            continue
        want = moe.want("forward", name, kw)[i]
        torch.testing.assert_close(out[i][keep[i]], want[keep[i]], atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"{moe.arch} row {i} ({name}): {m}")


def test_packed_pool_refuses_training(dora):
    lm = olk.patch_model(copy.deepcopy(dora.base), max_adapters=2, max_rank=16, **packed_kw(dora))
    with pytest.raises(ValueError, match="trainable.*device_budget_bytes"):
        lm.load_adapter("lora", dora.paths["lora"], trainable=True)
    assert "lora" not in lm.adapters
