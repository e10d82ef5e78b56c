"""Projection groups (hf_groups.py): sibling modules reading the same input make one LoRA launch.

Launches are counted at the dispatch layer: every BoundLoRA call, and every BoundLoRA.add_rows
that served a call (the native CPU fast path), is one launch. Every row of every batch is checked
against PEFT run with that row's adapter alone, base rows against the unpatched model bit for bit,
with the outputs of the grouped model also compared with the same model patched without grouping.
"""
import copy
import threading

import pytest
import torch
from torch import nn

import openlora_kernels as olk
from openlora_kernels.ops.api import BoundLoRA

from hf_models import ATOL, RTOL, left_padded_batch, make_model, peft_model, save_adapter

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def backends():
    out = ["torch"]
    info = olk.available_backends("cpu")
    if info["cpu"].usable:
        out.append("cpu")
    return out


BACKENDS = backends()


class Launches:
    """Counts LoRA launches (BoundLoRA calls and add_rows calls that served) while active."""

    def __init__(self, monkeypatch):
        self.n = 0
        call, rows = BoundLoRA.__call__, BoundLoRA.add_rows

        def counted_call(op, *a, **k):
            self.n += 1
            return call(op, *a, **k)

        def counted_rows(op, *a, **k):
            ok = rows(op, *a, **k)
            self.n += bool(ok)
            return ok

        monkeypatch.setattr(BoundLoRA, "__call__", counted_call)
        monkeypatch.setattr(BoundLoRA, "add_rows", counted_rows)

    def __call__(self, fn):
        self.n = 0
        out = fn()
        return out, self.n


def lcfg(targets, r=8, alpha=16, **kw):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **kw)


def patched(base, paths, backend, **kw):
    kw = {"max_adapters": 4, "max_rank": 16, "group_projections": True, **kw}   # ("auto" groups nothing)
    lm = olk.patch_model(copy.deepcopy(base), backend=backend, **kw)
    for n, p in paths.items():
        lm.load_adapter(n, p)
    return lm


_PEFT = {}


def check_rows(out, base, paths, kw, rows, keep):
    """Each row against PEFT with its adapter alone (base rows: the unpatched model, bitwise)."""
    with torch.no_grad():
        want_base = base(**kw).logits
        for i, name in enumerate(rows):
            if name is None:
                assert torch.equal(out[i], want_base[i]), f"base row {i} differs"
                continue
            if (id(base), paths[name]) not in _PEFT:
                _PEFT[(id(base), paths[name])] = (base, peft_model(base, paths[name]))
            want = _PEFT[(id(base), paths[name])][1](**kw).logits[i]
            k = keep[i]
            torch.testing.assert_close(out[i][k], want[k], atol=ATOL, rtol=RTOL, msg=lambda m: f"row {i} ({name}): {m}")
            assert (want[k] - want_base[i][k]).abs().max() > 1e-2, f"row {i} ({name}): the adapter changes nothing"


def run(lm, ids, mask, rows):
    return lm(input_ids=ids, attention_mask=mask, adapter_names=rows).logits


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    base = make_model("llama")
    root = tmp_path_factory.mktemp("groups")
    paths = {
        "all": save_adapter(base, lcfg(LLAMA_ALL), str(root / "all"), seed=1),
        "qv": save_adapter(base, lcfg(["q_proj", "v_proj"], r=4, alpha=8), str(root / "qv"), seed=2),
        # different ranks per member, one scaling everywhere (alpha / r = 2)
        "ranks": save_adapter(base, lcfg(LLAMA_ALL, r=8, alpha=16, rank_pattern={"k_proj": 4, "up_proj": 12},
                                         alpha_pattern={"k_proj": 8, "up_proj": 24}), str(root / "ranks"), seed=3),
        # scalings that differ between members of a group: rank_pattern alone, and alpha_pattern
        "scal": save_adapter(base, lcfg(LLAMA_ALL, r=6, alpha=12, rank_pattern={"q_proj": 2},
                                        alpha_pattern={"gate_proj": 20}), str(root / "scal"), seed=4),
    }
    return base, paths


@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_makes_four_launches_per_decoder_layer(llama, backend, monkeypatch):
    base, paths = llama
    count = Launches(monkeypatch)
    lm = patched(base, paths, backend)
    off = patched(base, paths, backend, group_projections=False)
    ids, mask = left_padded_batch([6, 4, 5, 3], seed=1)
    rows = ["all", None, "ranks", "qv"]
    layers = len(lm.model.model.layers)
    first, n_first = count(lambda: run(lm, ids, mask, rows))       # the learning forward: one call each
    assert n_first == 7 * layers
    torch.testing.assert_close(first, run(off, ids, mask, rows), atol=ATOL, rtol=RTOL)
    plans = {g.name: g.bound.plans for g, _ in lm._groups.values()}
    for i in range(layers):
        assert plans[f"model.layers.{i}.self_attn"] == ((0, 1, 2),)      # q, k, v (o_proj reads another input)
        assert plans[f"model.layers.{i}.mlp"] == ((0, 1),)              # gate, up (down_proj: act(gate) * up)
    for _ in range(2):          # a decode-like and a prefill-like shape, both grouped
        out, n = count(lambda: run(lm, ids, mask, rows))
        assert n == 4 * layers
        ref, n_off = count(lambda: run(off, ids, mask, rows))
        assert n_off == 7 * layers
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
        check_rows(out, base, paths, dict(input_ids=ids, attention_mask=mask), rows, mask.bool())
        ids, mask = ids[:, -1:], mask[:, -1:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_scalings_that_differ_between_members_stay_exact(llama, backend, monkeypatch):
    """rank_pattern / alpha_pattern changing alpha / r between members: the launch takes the
    members that agree, each differing member adds its own delta (one more launch each, only in
    batches holding such an adapter)."""
    base, paths = llama
    count = Launches(monkeypatch)
    lm = patched(base, paths, backend)
    ids, mask = left_padded_batch([5, 6, 4], seed=2)
    run(lm, ids, mask, [None, None, None])                          # learning forward, base rows only
    g = lm._groups["model.layers.0.self_attn.q_proj"][0]
    assert g.bound.plans == ((0, 1, 2),)
    rows = ["scal", None, "all"]
    out, n = count(lambda: run(lm, ids, mask, rows))
    layers = len(lm.model.model.layers)
    assert n == 6 * layers          # q (alpha / 2) and gate (alpha 20) each add their own delta
    check_rows(out, base, paths, dict(input_ids=ids, attention_mask=mask), rows, mask.bool())
    out, n = count(lambda: run(lm, ids, mask, ["all", None, "ranks"]))
    assert n == 4 * layers          # no such adapter in the batch: no extra launch
    check_rows(out, base, paths, dict(input_ids=ids, attention_mask=mask), ["all", None, "ranks"], mask.bool())


def test_partial_targets_launch_only_members_with_weights(llama, monkeypatch):
    """An adapter on q and v only: k_proj has no weights in any slot and is not in the launch."""
    base, paths = llama
    count = Launches(monkeypatch)
    lm = patched(base, {"qv": paths["qv"]}, "auto")
    ids, mask = left_padded_batch([5, 3], seed=4)
    run(lm, ids, mask, ["qv", None])
    g = lm._groups["model.layers.0.self_attn.q_proj"][0]
    assert set(g.bound.cols[0]) == {0, 2}                        # q and v columns only
    out, n = count(lambda: run(lm, ids, mask, ["qv", None]))
    assert n == len(lm.model.model.layers)                      # one launch per layer: q + v together
    check_rows(out, base, {"qv": paths["qv"]}, dict(input_ids=ids, attention_mask=mask), ["qv", None], mask.bool())
    lm.load_adapter("all", paths["all"], pin=True)              # k_proj gets weights: back in the launch
    assert set(g.bound.cols[0]) == {0, 1, 2}
    out, n = count(lambda: run(lm, ids, mask, ["all", "qv"]))
    assert n == 4 * len(lm.model.model.layers)
    check_rows(out, base, paths, dict(input_ids=ids, attention_mask=mask), ["all", "qv"], mask.bool())


def test_qwen3_q_norm_consumes_q_before_k_runs(tmp_path, monkeypatch):
    """Qwen3 normalises q_proj's output before k_proj is called: the first member's delta must
    be in its output when its hook returns."""
    import transformers as tf

    cfg = tf.Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    base = tf.AutoModelForCausalLM.from_config(cfg).eval()
    paths = {"a": save_adapter(base, lcfg(LLAMA_ALL, r=4, alpha=8), str(tmp_path / "a"), seed=5),
             "b": save_adapter(base, lcfg(["q_proj", "k_proj", "up_proj"], r=8, alpha=8), str(tmp_path / "b"), seed=6)}
    count = Launches(monkeypatch)
    lm = patched(base, paths, "auto")
    ids, mask = left_padded_batch([6, 4, 5], seed=5)
    rows = ["a", None, "b"]
    run(lm, ids, mask, rows)
    out, n = count(lambda: run(lm, ids, mask, rows))
    assert n == 4 * cfg.num_hidden_layers
    check_rows(out, base, paths, dict(input_ids=ids, attention_mask=mask), rows, mask.bool())


def test_gpt2_fused_c_attn_is_one_call_already(tmp_path, monkeypatch):
    base = make_model("gpt2")
    paths = {"a": save_adapter(base, lcfg(["c_attn", "c_proj", "c_fc"], r=4, alpha=8, fan_in_fan_out=True),
                               str(tmp_path / "a"), seed=7)}
    count = Launches(monkeypatch)
    lm = patched(base, paths, "auto")
    ids, mask = left_padded_batch([5, 4], seed=6)
    run(lm, ids, mask, ["a", None])
    assert all(g.bound.plans == () for g, _ in lm._groups.values())   # attn.c_attn / c_proj read other inputs
    out, n = count(lambda: run(lm, ids, mask, ["a", None]))
    assert n == 4 * len(lm.model.transformer.h)
    check_rows(out, base, paths, dict(input_ids=ids, attention_mask=mask), ["a", None], mask.bool())


def test_group_projections_false_and_bad_value(llama, monkeypatch):
    base, paths = llama
    lm = patched(base, {"all": paths["all"]}, "auto", group_projections=False)
    assert lm._groups == {}
    with pytest.raises(TypeError, match="group_projections"):
        olk.patch_model(copy.deepcopy(base), group_projections="yes")
    # the default, "auto": no groups for now (measured slower on the CPU's decode and prefill and
    # on the GPU's host path, hf_patch.py); True groups on any device
    auto = olk.patch_model(copy.deepcopy(base), target_modules=["q_proj", "k_proj", "v_proj"])
    assert auto.group_projections == "auto" and auto._groups == {}
    on = olk.patch_model(copy.deepcopy(base), target_modules=["q_proj", "k_proj", "v_proj"], group_projections=True)
    assert on._groups


# ------------------------------------------------------------- inputs that are not shared


class Block(nn.Module):
    """q, k, v siblings; k reads a copy of x (same values, another tensor), v reads x unless
    ``self.split``; out reads q + k + v."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.split = False

    def forward(self, x):
        return self.out(self.q(x) + self.k(x.clone()) + self.v(x * 1.0 if self.split else x))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, input_ids):
        h = self.emb(input_ids)
        for b in self.blocks:
            h = h + b(h)
        return h


def test_members_whose_input_is_another_tensor_are_not_grouped(tmp_path, monkeypatch):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    base = Tiny().eval()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "k", "v", "out"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(base), cfg).save_pretrained(str(tmp_path / "a"))
    ref = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    count = Launches(monkeypatch)
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=8, target_modules=["q", "k", "v", "out"],
                         group_projections=True)
    lm.load_adapter("a", str(tmp_path / "a"))
    ids = torch.randint(0, 32, (3, 5), generator=torch.Generator().manual_seed(1))
    rows = ["a", None, "a"]
    lm(ids, adapter_names=rows)
    g = lm._groups["blocks.0.q"][0]
    assert g.bound.plans == ((0, 2),)                    # q and v: the same tensor; k: a copy; out: another
    with torch.no_grad():
        want, plain = ref(ids), base(ids)

    def check(out):
        torch.testing.assert_close(out[[0, 2]], want[[0, 2]], atol=ATOL, rtol=RTOL)
        assert torch.equal(out[1], plain[1])

    out, n = count(lambda: lm(ids, adapter_names=rows))
    assert n == 3 * 2
    check(out)
    for blk in lm.model.blocks:                          # the call pattern changes: v reads another tensor now
        blk.split = True
    for blk in ref.base_model.model.blocks:
        blk.split = True
    out, n = count(lambda: lm(ids, adapter_names=rows))
    check(out)
    assert g.bound.plans == ()                           # v dropped from the plan, on its own from now on
    out, n = count(lambda: lm(ids, adapter_names=rows))
    assert n == 4 * 2
    check(out)


# ------------------------------------------------------------------------- call state


def test_a_forward_that_raises_midway_leaves_no_stale_scratch(llama):
    """set_batch() keeps its state across forwards: a forward that raises between q_proj and
    k_proj leaves q's launch behind; the next forward must not use it."""
    base, paths = llama
    lm = patched(base, paths, "auto")
    ids, mask = left_padded_batch([5, 5], seed=7)
    run(lm, ids, mask, ["all", None])                              # learn
    boom = [True]

    def fail(module, args):
        if boom[0]:
            boom[0] = False
            raise RuntimeError("boom")

    layer = lm.model.model.layers[1].self_attn
    h = layer.k_proj.register_forward_pre_hook(fail)
    try:
        with lm.batch(["all"] * 5 + [None] * 5):
            with pytest.raises(RuntimeError, match="boom"):
                lm.model(input_ids=ids, attention_mask=mask)
            state = lm._call.get()
            assert state.pending == {}                            # dropped when the forward ended
            with torch.no_grad():
                out = lm.model(input_ids=ids, attention_mask=mask).logits
    finally:
        h.remove()
    check_rows(out, base, paths, dict(input_ids=ids, attention_mask=mask), ["all", None], mask.bool())


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_threads_serving_different_adapters_grouped(llama, backend):
    """Two threads, each its own adapters, through the same grouped layers at once: each row must
    equal PEFT with its adapter (a scratch of the other thread's batch would be a wrong number)."""
    base, paths = llama
    lm = patched(base, paths, backend)
    ids, mask = left_padded_batch([6, 4, 5], seed=8)
    run(lm, ids, mask, [None, None, None])                          # learn
    assert lm._groups["model.layers.0.mlp.gate_proj"][0].bound.plans == ((0, 1),)
    batches = [["all", None, "qv"], ["ranks", "scal", None]]
    with torch.no_grad():
        want = {n: peft_model(base, p)(input_ids=ids, attention_mask=mask).logits for n, p in paths.items()}
        want[None] = base(input_ids=ids, attention_mask=mask).logits
    errors, stop = [], threading.Event()
    barrier = threading.Barrier(2)

    def serve(rows):
        try:
            barrier.wait()
            for _ in range(12):
                if stop.is_set():
                    return
                out = run(lm, ids, mask, rows)
                for i, n in enumerate(rows):
                    k = mask[i].bool()
                    if not torch.allclose(out[i][k], want[n][i][k], atol=ATOL, rtol=RTOL):
                        errors.append(f"rows {rows}: row {i} ({n}) wrong")
                        stop.set()
        except BaseException as e:       # noqa: BLE001 - reported below
            errors.append(repr(e))
            stop.set()

    threads = [threading.Thread(target=serve, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_training_through_grouped_modules_gives_peft_gradients(llama, monkeypatch):
    """A batch with a trainable adapter: every member its own call (SlotDelta with grad on: PEFT's
    gradients), grad on or off, so the training forward and the same batch under no_grad agree bit
    for bit; a batch of frozen adapters in the same model is grouped."""
    base, paths = llama
    count = Launches(monkeypatch)
    lm = olk.patch_model(copy.deepcopy(base), max_adapters=2, max_rank=8, group_projections=True)
    lm.load_adapter("t", None, trainable=True, r=4, lora_alpha=8, target_modules=LLAMA_ALL)
    lm.load_adapter("f", paths["all"])
    with torch.no_grad():
        for p in lm.adapter_parameters("t").values():
            p.copy_(torch.randn_like(p) * 0.1)
    ids, mask = left_padded_batch([5, 4], seed=9)
    layers = len(lm.model.model.layers)
    with torch.no_grad():
        run(lm, ids, mask, [None, None])                                  # learn
        served, n = count(lambda: run(lm, ids, mask, ["t", None]))
        assert n == 7 * layers
        frozen, n = count(lambda: run(lm, ids, mask, ["f", None]))
        assert n == 4 * layers
    check_rows(frozen, base, paths, dict(input_ids=ids, attention_mask=mask), ["all", None], mask.bool())
    params = lm.adapter_parameters("t")
    out, n = count(lambda: run(lm, ids, mask, ["t", None]))
    assert n == 7 * layers
    (out[0][mask[0].bool()] ** 2).mean().backward()
    assert torch.equal(out.detach(), served)
    # PEFT with the same weights
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_ALL))
    named = dict(pm.named_parameters())
    with torch.no_grad():
        for key, p in params.items():
            module, part = key.rsplit(".", 1)
            named[f"base_model.model.{module}.{part}.default.weight"].copy_(p)
    ref = pm(input_ids=ids, attention_mask=mask).logits
    (ref[0][mask[0].bool()] ** 2).mean().backward()
    torch.testing.assert_close(out.detach()[0], ref.detach()[0], atol=ATOL, rtol=RTOL)
    for key, p in params.items():
        module, part = key.rsplit(".", 1)
        g = named[f"base_model.model.{module}.{part}.default.weight"].grad
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")


def test_triton_backend_grouped_matches_peft(llama, monkeypatch):
    """The grouped launches (3 and 2 slices, unequal widths, ranks [n, S], full max_rank slots)
    and the residual calls through the Triton kernels, under Triton's interpreter."""
    if not olk.available_backends("cpu")["triton"].usable:
        pytest.skip(olk.available_backends("cpu")["triton"].reason)
    base, paths = llama
    count = Launches(monkeypatch)
    lm = patched(base, paths, "triton")
    ids, mask = left_padded_batch([5, 3, 4, 4], seed=10)
    run(lm, ids, mask, [None] * 4)
    rows = ["all", None, "ranks", "scal"]
    out, n = count(lambda: run(lm, ids, mask, rows))
    assert n == 6 * len(lm.model.model.layers)          # "scal": q_proj and gate_proj on their own
    check_rows(out, base, paths, dict(input_ids=ids, attention_mask=mask), rows, mask.bool())
