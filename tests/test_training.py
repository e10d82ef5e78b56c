"""Training many adapters in one batch over one frozen base (docs/training.md): every trainable
adapter's gradient from a mixed batch equals PEFT's on the same rows with that adapter alone, and
optimizer steps on our Parameters end where separate PEFT trainings end.

The loss is a fixed random weighting of the logits summed over tokens, so rows are independent and
per-adapter gradients add up across a mixed batch.
"""
import copy
import json
import math
import os

import pytest
import torch

import openlora_kernels as olk

from hf_models import left_padded_batch, make_model, peft_model, save_adapter

RTOL_GRAD, ATOL_GRAD = 1e-5, 1e-6        # fp32, relative to each gradient's scale (issue target 1e-5)
TRAIN = ["t0", "t1", "t2", "t3"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from peft import LoraConfig

    base = make_model("llama")
    for p in base.parameters():
        p.requires_grad_(False)                          # a frozen base, as in LoRA training
    root = tmp_path_factory.mktemp("train")
    cfgs = {
        "t0": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "t1": LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
        "t2": LoraConfig(r=2, lora_alpha=4, target_modules=["down_proj", "up_proj"], use_rslora=True,
                         init_lora_weights=False),
        "t3": LoraConfig(r=6, lora_alpha=6, target_modules=["o_proj", "gate_proj"],
                         rank_pattern={"o_proj": 3}, init_lora_weights=False),
        "f0": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    }
    paths = {n: save_adapter(base, c, str(root / n), seed=60 + i) for i, (n, c) in enumerate(cfgs.items())}
    ids, mask = left_padded_batch([6, 4, 5, 6, 3, 5, 4, 6], seed=9)
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(ids.shape[0], ids.shape[1], 128, generator=g)
    return base, paths, ids, mask, weight


def loss_of(logits, weight, mask, rows):
    m = mask[rows].unsqueeze(-1).to(logits.dtype)
    return (logits * weight[rows] * m).sum()


def patched(env, trainable=TRAIN, backend="auto", **kw):
    base, paths, *_ = env
    lm = olk.patch_model(copy.deepcopy(base), backend=backend, **{"max_adapters": 6, "max_rank": 16, **kw})
    for n in trainable:
        lm.load_adapter(n, paths[n], trainable=True)
    lm.load_adapter("f0", paths["f0"])
    return lm


def peft_grads(env, name, rows):
    """PEFT with adapter ``name`` alone, trained on ``rows``: {our param key: grad}."""
    from peft import PeftModel

    base, paths, ids, mask, weight = env
    pm = PeftModel.from_pretrained(copy.deepcopy(base), paths[name], is_trainable=True)
    out = pm(input_ids=ids[rows], attention_mask=mask[rows]).logits
    loss_of(out, weight, mask, rows).backward()
    return {ours_key(k): p.grad for k, p in pm.named_parameters() if p.requires_grad}


def ours_key(peft_key):
    k = peft_key[len("base_model.model."):]
    return k.replace(".default.weight", "")


def assert_grads_close(got, want, what):
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want)))
    for k in want:
        g, w = got[k], want[k]
        assert g is not None, f"{what}: {k} got no gradient"
        scale = w.abs().max().item()
        torch.testing.assert_close(g, w, rtol=RTOL_GRAD, atol=ATOL_GRAD * max(scale, 1e-3),
                                   msg=lambda m: f"{what}: {k}: {m}")


ROWS = ["t0", "t1", None, "f0", "t2", "t1", "t3", "t0"]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_mixed_batch_gradients_equal_peft_per_adapter(env, backend):
    if backend == "cpu" and not olk.available_backends("cpu")["cpu"].usable:
        pytest.skip("native CPU backend not built")
    base, paths, ids, mask, weight = env
    lm = patched(env, backend=backend)
    out = lm(input_ids=ids, attention_mask=mask, adapter_names=ROWS).logits
    assert out.requires_grad
    loss_of(out, weight, mask, list(range(len(ROWS)))).backward()
    for name in TRAIN:
        rows = [i for i, n in enumerate(ROWS) if n == name]
        got = {k: p.grad for k, p in lm.adapter_parameters(name).items()}
        assert_grads_close(got, peft_grads(env, name, rows), f"{backend} {name}")
    assert all(p.grad is None for p in lm.adapter_parameters("f0").values())
    # rows without a trainable adapter (base, frozen) answer as in inference, base rows bit for bit
    with torch.no_grad():
        inf = lm(input_ids=ids, attention_mask=mask, adapter_names=ROWS).logits
        plain = base(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out.detach()[2], plain[2])
    torch.testing.assert_close(out.detach(), inf, rtol=0, atol=0)


def test_parameters_are_the_slots(env):
    lm = patched(env, trainable=["t0"])
    p1, p2 = lm.adapter_parameters("t0"), lm.adapter_parameters("t0")
    assert all(p1[k] is p2[k] for k in p1)
    a = p1["model.layers.0.self_attn.q_proj.lora_A"]
    b = p1["model.layers.0.self_attn.q_proj.lora_B"]
    assert a.shape == (4, 32) and b.shape == (32, 4) and a.requires_grad and b.requires_grad
    ids, mask = env[2][:2], env[3][:2]
    before = lm(input_ids=ids, attention_mask=mask, adapter_names=["t0", None]).logits.detach()
    with torch.no_grad():
        b.mul_(2.0)                                      # an "optimizer step": no copy anywhere
    after = lm(input_ids=ids, attention_mask=mask, adapter_names=["t0", None]).logits.detach()
    assert not torch.allclose(before[0], after[0]) and torch.equal(before[1], after[1])
    with pytest.raises(ValueError, match="trainable"):
        lm.unpin("t0")


def test_twenty_adamw_steps_of_four_adapters_equal_four_peft_trainings(env):
    from peft import PeftModel

    base, paths, ids, mask, weight = env
    rows = ["t0", "t1", "t2", "t3", "t0", "t1", "t2", "t3"]
    lm = patched(env)
    params = [p for n in TRAIN for p in lm.adapter_parameters(n).values()]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    for _ in range(20):
        opt.zero_grad()
        out = lm(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
        loss_of(out, weight, mask, list(range(len(rows)))).backward()
        opt.step()
    for name in TRAIN:
        own = [i for i, n in enumerate(rows) if n == name]
        pm = PeftModel.from_pretrained(copy.deepcopy(base), paths[name], is_trainable=True)
        named = {ours_key(k): p for k, p in pm.named_parameters() if p.requires_grad}
        popt = torch.optim.AdamW(list(named.values()), lr=1e-2, weight_decay=0.01)
        for _ in range(20):
            popt.zero_grad()
            loss_of(pm(input_ids=ids[own], attention_mask=mask[own]).logits, weight, mask, own).backward()
            popt.step()
        ours = lm.adapter_parameters(name)
        for k, p in named.items():
            torch.testing.assert_close(ours[k].detach(), p.detach(), rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{name} {k} after 20 steps: {m}")


def test_new_adapter_starts_as_peft_does_and_saves_in_peft_format(env, tmp_path):
    from peft import PeftModel

    base, paths, ids, mask, weight = env
    lm = patched(env, trainable=[])
    torch.manual_seed(3)
    lm.load_adapter("new", None, trainable=True, r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"])
    ps = lm.adapter_parameters("new")
    assert sorted(ps) == sorted(f"model.layers.{i}.{m}.{p}" for i in (0, 1)
                                for m in ("self_attn.q_proj", "mlp.down_proj") for p in ("lora_A", "lora_B"))
    a = ps["model.layers.0.self_attn.q_proj.lora_A"]
    assert 0 < a.abs().max() <= 1 / math.sqrt(32) and not ps["model.layers.0.self_attn.q_proj.lora_B"].any()
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids, attention_mask=mask, adapter_names=["new"] * 8).logits,
                           base(input_ids=ids, attention_mask=mask).logits)       # B = 0: the base model
    opt = torch.optim.SGD(list(ps.values()), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        loss_of(lm(input_ids=ids, attention_mask=mask, adapter_names=["new"] * 8).logits, weight, mask,
                list(range(8))).backward()
        opt.step()
    lm.save_adapter("new", tmp_path / "saved")
    assert sorted(os.listdir(tmp_path / "saved")) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16 and cfg["peft_type"] == "LORA"
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "saved")).eval()
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=mask).logits
        got = lm(input_ids=ids, attention_mask=mask, adapter_names=["new"] * 8).logits
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    assert not torch.allclose(want, base(input_ids=ids, attention_mask=mask).logits)
    # a loaded adapter (frozen or trainable) saves with its own config and weights: PEFT agrees
    lm.load_adapter("t3", paths["t3"], trainable=True)
    for name in ("f0", "t3"):
        lm.save_adapter(name, tmp_path / name)
        cfg = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert cfg["r"] == json.loads(open(os.path.join(paths[name], "adapter_config.json")).read())["r"]
        with torch.no_grad():
            want = peft_model(base, str(tmp_path / name))(input_ids=ids, attention_mask=mask).logits
            got = lm(input_ids=ids, attention_mask=mask, adapter_names=[name] * 8).logits
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_trainable_arguments(env):
    base, paths, *_ = env
    lm = patched(env, trainable=[])
    with pytest.raises(ValueError, match="r, lora_alpha: given with a source"):
        lm.load_adapter("x", paths["t0"], trainable=True, r=4, lora_alpha=8)
    with pytest.raises(ValueError, match="target_modules: given with a source"):
        lm.load_adapter("x", paths["t0"], target_modules=["q_proj"])
    with pytest.raises(ValueError, match="trainable=True"):
        lm.load_adapter("x", None)
    with pytest.raises(ValueError, match="r: a new adapter"):
        lm.load_adapter("x", None, trainable=True)
    with pytest.raises(ValueError, match="matches none of the patched modules"):
        lm.load_adapter("x", None, trainable=True, r=4, target_modules=["nope"])
    with pytest.raises(ValueError, match="max_rank=16"):
        lm.load_adapter("x", None, trainable=True, r=32)
    assert lm.adapters == ("f0",)


def test_gradient_checkpointing_gives_the_same_gradients(env):
    base, paths, ids, mask, weight = env
    grads = []
    for ckpt in (False, True):
        lm = patched(env, trainable=["t1", "t3"])
        lm.model.train()
        if ckpt:
            lm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        rows = ["t1", "t3", None, "f0", "t1", "t3", "t1", None]
        out = lm(input_ids=ids, attention_mask=mask, adapter_names=rows, use_cache=False).logits
        loss_of(out, weight, mask, list(range(8))).backward()
        grads.append({k: p.grad.clone() for n in ("t1", "t3") for k, p in lm.adapter_parameters(n).items()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7)


def test_a_batch_keeps_its_frozen_adapters_until_its_backward(env):
    """Between the forward and the backward the pool is asked for more slots than are free: the
    frozen adapter of the graph's batch stays where it was (the graph holds its lease), so the
    backward reads the right weights; once the graph is freed the lease ends."""
    base, paths, ids, mask, weight = env
    lm = patched(env, trainable=["t0"], max_adapters=3)
    lm.load_adapter("o1", paths["t2"])
    lm.load_adapter("o2", paths["t3"])
    rows = ["t0", "f0", None, "f0", "t0", "f0", None, "t0"]
    out = lm(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
    loss = loss_of(out, weight, mask, list(range(8)))
    del out
    lm.pin("o1")                                        # the one free slot
    with pytest.raises(RuntimeError, match="no device slot can be freed"):
        lm.pin("o2")                                     # f0 is held by the graph
    loss.backward()
    want = peft_grads(env, "t0", [i for i, n in enumerate(rows) if n == "t0"])
    got = {k: p.grad for k, p in lm.adapter_parameters("t0").items()}
    # t0's rows alone give PEFT's gradient; f0's rows feed x's gradient only (frozen)
    assert_grads_close(got, want, "t0")
    del loss
    assert {a.name: a.leases for a in lm.memory_report().adapters}["f0"] == 0
    lm.pin("o2")
